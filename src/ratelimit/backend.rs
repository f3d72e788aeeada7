//! What every Redis-backed engine shares (the rate limiter here, the spend
//! budgets in `budget`): the connection, made lazily and never retried
//! inside the client, and `Health`, which decides when Redis is tried
//! again after a failure.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use prometheus::{IntCounter, IntGauge};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::RedisResult;
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::OnceCell;
use tokio::time::Instant;

/// While Redis is down, it is tried again at most this often (by one
/// caller; the others use the fallback meanwhile without waiting on Redis).
pub const REDIS_RETRY_EVERY: Duration = Duration::from_secs(1);

/// One Redis endpoint, connected on first use.
pub struct Connection {
    client: redis::Client,
    /// Made on first use (and retried until it succeeds), so a gateway
    /// starts while Redis is down. The manager reconnects by itself after.
    conn: OnceCell<ConnectionManager>,
    config: ConnectionManagerConfig,
}

impl Connection {
    /// `what` names the config key in the error (`rate_limit.redis_url`);
    /// the URL itself is never echoed: it may hold a password.
    pub fn new(url: &SecretString, timeout: Duration, what: &str) -> Result<Connection, String> {
        let client = redis::Client::open(url.expose_secret()).map_err(|_| format!("{what}: not a valid Redis URL"))?;
        // No retries inside the manager: a failed (re)connection fails the
        // call at once, and the engine decides when to try again (at most
        // once a second while Redis is down). Each call is bounded by the
        // engine; the connection timeout only keeps a dead connect from
        // lingering in the background.
        let config = ConnectionManagerConfig::new()
            .set_number_of_retries(0)
            .set_connection_timeout(timeout);
        Ok(Connection {
            client,
            conn: OnceCell::new(),
            config,
        })
    }

    pub async fn get(&self) -> RedisResult<ConnectionManager> {
        self.conn
            .get_or_try_init(|| ConnectionManager::new_with_config(self.client.clone(), self.config.clone()))
            .await
            .cloned()
    }

    pub async fn ping(&self) -> RedisResult<()> {
        let mut conn = self.get().await?;
        redis::cmd("PING").query_async::<String>(&mut conn).await.map(drop)
    }
}

/// Whether Redis is usable. After a failure, Redis is tried again at most
/// once per `REDIS_RETRY_EVERY` (by whichever caller comes first); the other
/// callers go straight to the fallback, so an outage costs one
/// `redis_timeout` per second, not one per request.
pub struct Health {
    /// For the logs: "rate limit", "budget".
    what: &'static str,
    errors: IntCounter,
    fallback_active: IntGauge,
    down: AtomicBool,
    next_try: Mutex<Option<Instant>>,
}

impl Health {
    pub fn new(what: &'static str, errors: IntCounter, fallback_active: IntGauge) -> Health {
        Health {
            what,
            errors,
            fallback_active,
            down: AtomicBool::new(false),
            next_try: Mutex::new(None),
        }
    }

    pub fn is_down(&self) -> bool {
        self.down.load(Ordering::Acquire)
    }

    pub fn may_call(&self) -> bool {
        if !self.down.load(Ordering::Acquire) {
            return true;
        }
        let mut next = self.next_try.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        match *next {
            Some(at) if now < at => false,
            _ => {
                *next = Some(now + REDIS_RETRY_EVERY);
                true
            }
        }
    }

    pub fn failed(&self, error: &str) {
        self.errors.inc();
        *self.next_try.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now() + REDIS_RETRY_EVERY);
        if !self.down.swap(true, Ordering::AcqRel) {
            self.fallback_active.set(1);
            tracing::warn!(
                error,
                "{}: Redis unavailable, using the fallback (fail_mode applies)",
                self.what
            );
        } else {
            tracing::debug!(error, "{}: Redis still unavailable", self.what);
        }
    }

    /// Returns true when Redis was down until this call.
    pub fn succeeded(&self) -> bool {
        if self.down.load(Ordering::Acquire) && self.down.swap(false, Ordering::AcqRel) {
            self.fallback_active.set(0);
            tracing::info!("{}: Redis is back, shared state resumes", self.what);
            return true;
        }
        false
    }
}

/// Names go into keys between `:`; escaping `%` and `:` keeps
/// `("a:b", "c")` and `("a", "b:c")` apart.
pub fn escape(name: &str) -> String {
    name.replace('%', "%25").replace(':', "%3A")
}
