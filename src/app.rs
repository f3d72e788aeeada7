//! The application: `build_app`, and serving with a bounded, graceful drain.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Notify;

use crate::config::Config;
pub use crate::gateway::state::{AppState, BuildError};

/// A built gateway: its service (router and server layers) and state,
/// ready to serve.
pub struct App {
    state: AppState,
    service: crate::edge::routes::Service,
}

/// Builds the gateway for a validated config. Tests call this directly.
/// It connects to Redis when the rate limiter uses it (bounded by
/// `redis_timeout`; an unreachable Redis is not an error: `fail_mode` applies).
pub async fn build_app(config: Config) -> Result<App, BuildError> {
    let state = AppState::new(config).await?;
    let service = crate::edge::routes::service(state.clone());
    Ok(App { state, service })
}

impl App {
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Remembers the file the config came from, for `reload` (SIGHUP and
    /// `POST /admin/reload`).
    pub fn with_config_path(self, path: &std::path::Path) -> Self {
        self.state.set_config_path(path);
        self
    }

    pub fn service(&self) -> crate::edge::routes::Service {
        self.service.clone()
    }

    /// Serves until `shutdown` resolves, then drains: no new connections,
    /// `/health/ready` answers 503, and in-flight requests and streams get up
    /// to `server.shutdown_grace` to finish. Returns once drained or when
    /// the grace runs out.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> io::Result<()> {
        let grace = self.state.runtime().config.server.shutdown_grace;
        let anchor = tokio::spawn(timer_anchor());
        let state = self.state.clone();
        let signalled = Arc::new(Notify::new());
        let notify = signalled.clone();
        let limits = crate::edge::server::ClientLimits::new(&self.state.runtime().config.server, self.state.metrics());
        let server = crate::edge::server::serve(listener, self.service, limits, async move {
            shutdown.await;
            state.set_draining();
            tracing::info!(grace = ?grace, "shutting down: draining in-flight requests");
            notify.notify_one();
        });
        tokio::select! {
            () = server => {}
            _ = async { signalled.notified().await; tokio::time::sleep(grace).await } => {
                tracing::warn!(
                    in_flight = self.state.metrics().in_flight.get(),
                    "shutdown_grace expired: closing the remaining requests"
                );
            }
        }
        anchor.abort();
        self.state.flush().await;
        Ok(())
    }
}

/// Keeps a timer due within a second in tokio's timer wheel.
///
/// tokio's time driver wakes itself (an eventfd write, then one more
/// `epoll_wait`) whenever a new timer is due before every timer it already
/// holds. Between requests none is pending, so each request's first-byte
/// deadline used to cost those two extra syscalls on its path. With this
/// tick pending, deadlines seconds away are never the earliest: measured
/// with `strace -c` at 1,000 req/s, one eventfd write per request before,
/// about one per second after (docs/performance.md).
async fn timer_anchor() {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
    }
}
