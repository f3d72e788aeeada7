//! The Redis backend: entries shared by every replica on one Redis, under
//! `{<key_prefix>}:cache:<model>:<key hex>`, each with its TTL (`PX`), so
//! Redis expires them and a purge of one model is a `SCAN` of its prefix.
//!
//! Every call is bounded by `timeout`; a failure or a timeout is an error
//! for the caller to count and go upstream without the cache. After a
//! failure the backend is skipped for a second, so a Redis that is down
//! costs one bounded call per second, not one per request.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::OnceCell;

use super::entry::Entry;
use super::key::Key;

/// How long the backend is skipped after a failed call.
const BACKOFF: Duration = Duration::from_secs(1);
/// Keys one admin walk (stats or purge) looks at, at most.
const MAX_WALK: usize = 1_000_000;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis: timed out")]
    Timeout,
    #[error("redis: skipped after a recent failure")]
    Backoff,
}

pub struct RedisCache {
    client: redis::Client,
    conn: OnceCell<ConnectionManager>,
    config: ConnectionManagerConfig,
    timeout: Duration,
    prefix: String,
    /// Until when (ms since the backend was made) calls are skipped.
    skip_until_ms: AtomicU64,
    epoch: std::time::Instant,
}

impl RedisCache {
    pub fn new(url: &SecretString, timeout: Duration, key_prefix: &str) -> Result<Self, String> {
        let client = redis::Client::open(url.expose_secret())
            .map_err(|_| "cache.redis_url: not a valid Redis URL".to_string())?;
        let config = ConnectionManagerConfig::new()
            .set_number_of_retries(0)
            .set_connection_timeout(timeout)
            .set_response_timeout(timeout);
        Ok(Self {
            client,
            conn: OnceCell::new(),
            config,
            timeout,
            prefix: format!("{{{key_prefix}}}:cache:"),
            skip_until_ms: AtomicU64::new(0),
            epoch: std::time::Instant::now(),
        })
    }

    fn entry_key(&self, model: &str, key: &Key) -> String {
        format!("{}{}:{}", self.prefix, model, key.hex())
    }

    /// Runs `f` on a connection within the timeout, with the backoff.
    async fn call<T, F, Fut>(&self, f: F) -> Result<T, Error>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let now = self.epoch.elapsed().as_millis() as u64;
        if now < self.skip_until_ms.load(Ordering::Relaxed) {
            return Err(Error::Backoff);
        }
        let result = tokio::time::timeout(self.timeout, async {
            let conn = self
                .conn
                .get_or_try_init(|| ConnectionManager::new_with_config(self.client.clone(), self.config.clone()))
                .await?
                .clone();
            f(conn).await
        })
        .await;
        let result = match result {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) => Error::Redis(e),
            Err(_) => Error::Timeout,
        };
        self.skip_until_ms
            .store(now + BACKOFF.as_millis() as u64, Ordering::Relaxed);
        Err(result)
    }

    /// The entry, if any; an entry this build cannot read is a miss.
    pub async fn get(&self, model: &str, key: &Key) -> Result<Option<Entry>, Error> {
        let k = self.entry_key(model, key);
        let bytes: Option<Vec<u8>> = self
            .call(|mut c| async move { redis::cmd("GET").arg(k).query_async(&mut c).await })
            .await?;
        Ok(bytes.and_then(|b| Entry::decode(Bytes::from(b))))
    }

    pub async fn set(&self, model: &str, key: &Key, entry: &Entry, ttl: Duration) -> Result<(), Error> {
        let k = self.entry_key(model, key);
        let value = entry.encode();
        let ms = ttl.as_millis().max(1) as u64;
        self.call(|mut c| async move {
            redis::cmd("SET")
                .arg(k)
                .arg(&value[..])
                .arg("PX")
                .arg(ms)
                .query_async::<()>(&mut c)
                .await
        })
        .await
    }

    /// Walks the entries of one model (or all) with `SCAN`, in batches.
    /// Admin calls: each batch is bounded by the timeout, not the walk.
    async fn walk(&self, model: Option<&str>, mut each: impl FnMut(&[String], &[i64])) -> Result<(), Error> {
        let pattern = match model {
            // Exactly 64 characters after `<model>:`, so that purging model
            // `a` leaves model `a:b`'s entries alone.
            Some(m) => format!("{}{}:{}", self.prefix, glob_escape(m), "?".repeat(64)),
            None => format!("{}*", self.prefix),
        };
        let mut cursor: u64 = 0;
        let mut seen = 0;
        loop {
            let pattern = pattern.clone();
            let (next, keys): (u64, Vec<String>) = self
                .call(|mut c| async move {
                    redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(pattern)
                        .arg("COUNT")
                        .arg(1000)
                        .query_async(&mut c)
                        .await
                })
                .await?;
            if !keys.is_empty() {
                let batch = keys.clone();
                let lens: Vec<i64> = self
                    .call(|mut c| async move {
                        let mut pipe = redis::pipe();
                        for k in &batch {
                            pipe.cmd("STRLEN").arg(k);
                        }
                        pipe.query_async(&mut c).await
                    })
                    .await?;
                each(&keys, &lens);
            }
            seen += keys.len();
            cursor = next;
            if cursor == 0 || seen >= MAX_WALK {
                return Ok(());
            }
        }
    }

    /// Entries and bytes per model, by `SCAN` (admin only).
    pub async fn per_model(&self) -> Result<Vec<(String, u64, u64)>, Error> {
        let mut out: Vec<(String, u64, u64)> = Vec::new();
        let prefix_len = self.prefix.len();
        self.walk(None, |keys, lens| {
            for (k, &len) in keys.iter().zip(lens) {
                // `<model>:<hex>`: the model is everything before the last colon
                // (model names may contain colons; the hex never does).
                let Some(model) = k
                    .get(prefix_len..)
                    .and_then(|rest| rest.rsplit_once(':'))
                    .map(|(m, _)| m)
                else {
                    continue;
                };
                let len = u64::try_from(len).unwrap_or(0);
                match out.iter_mut().find(|(m, _, _)| m == model) {
                    Some((_, n, bytes)) => {
                        *n += 1;
                        *bytes += len;
                    }
                    None => out.push((model.to_owned(), 1, len)),
                }
            }
        })
        .await?;
        Ok(out)
    }

    /// Deletes every entry, or one model's; returns how many.
    pub async fn purge(&self, model: Option<&str>) -> Result<u64, Error> {
        let mut doomed: Vec<String> = Vec::new();
        self.walk(model, |keys, _| doomed.extend_from_slice(keys)).await?;
        let mut deleted = 0;
        for batch in doomed.chunks(1000) {
            let batch = batch.to_vec();
            let n: u64 = self
                .call(|mut c| async move { redis::cmd("UNLINK").arg(batch).query_async(&mut c).await })
                .await?;
            deleted += n;
        }
        Ok(deleted)
    }
}

/// A model name as a literal in a `SCAN MATCH` pattern. Names are
/// `[A-Za-z0-9._:/-]` (config), but escaping keeps that from mattering.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}
