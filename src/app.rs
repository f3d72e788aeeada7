//! The application: shared state, `build_app`, and serving with a bounded,
//! graceful drain.
//!
//! Per-config data lives in `Runtime`, behind an `ArcSwap`: a request loads
//! it once at its start and keeps that `Arc` to its end, so a config swap
//! never changes a request half-way, and loading it takes no lock.

use std::collections::HashMap;
use std::future::{Future, IntoFuture};
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use axum::serve::ListenerExt;
use axum::Router;
use bytes::Bytes;
use tokio::net::TcpListener;
use tokio::sync::Notify;

use crate::auth::ClientKeys;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::upstream::Upstream;

/// Everything derived from one config.
pub struct Runtime {
    pub config: Config,
    /// Same order as `config.upstreams`.
    pub upstreams: Vec<Upstream>,
    /// Model name → index into `config.models`.
    pub models: HashMap<String, usize>,
    /// Model names as shared label strings, same order as `config.models`.
    pub model_labels: Vec<Arc<str>>,
    pub keys: ClientKeys,
    /// The `/v1/models` answer, built once.
    pub models_json: Bytes,
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("cannot build the HTTP client for upstream '{upstream}': {source}")]
    Client {
        upstream: String,
        #[source]
        source: reqwest::Error,
    },
}

impl Runtime {
    pub fn new(config: Config) -> Result<Self, BuildError> {
        let upstreams = config
            .upstreams
            .iter()
            .map(|u| {
                Upstream::new(u.clone()).map_err(|source| BuildError::Client {
                    upstream: u.name.clone(),
                    source,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let models = config
            .models
            .iter()
            .enumerate()
            .map(|(i, m)| (m.name.clone(), i))
            .collect();
        let model_labels = config.models.iter().map(|m| Arc::from(m.name.as_str())).collect();
        let created = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let data: Vec<_> = config
            .models
            .iter()
            .map(
                |m| serde_json::json!({ "id": m.name, "object": "model", "created": created, "owned_by": "relaygate" }),
            )
            .collect();
        let models_json = Bytes::from(serde_json::json!({ "object": "list", "data": data }).to_string());
        Ok(Self {
            keys: ClientKeys::new(&config.keys),
            upstreams,
            models,
            model_labels,
            models_json,
            config,
        })
    }
}

#[derive(Clone)]
pub struct AppState {
    inner: Arc<Shared>,
}

struct Shared {
    runtime: ArcSwap<Runtime>,
    metrics: Arc<Metrics>,
    draining: AtomicBool,
    started: Instant,
}

impl AppState {
    pub fn runtime(&self) -> Arc<Runtime> {
        self.inner.runtime.load_full()
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::Relaxed)
    }

    pub fn set_draining(&self) {
        self.inner.draining.store(true, Ordering::Relaxed);
    }

    pub fn uptime(&self) -> Duration {
        self.inner.started.elapsed()
    }
}

/// A built gateway: its router and state, ready to serve.
pub struct App {
    state: AppState,
    router: Router,
}

/// Builds the gateway for a validated config. Tests call this directly.
pub fn build_app(config: Config) -> Result<App, BuildError> {
    let runtime = Runtime::new(config)?;
    let metrics = Arc::new(Metrics::new());
    metrics.preregister(runtime.config.models.iter().map(|m| {
        let upstreams = m.targets.iter().map(|t| &*runtime.upstreams[t.upstream].name).collect();
        (m.name.as_str(), upstreams)
    }));
    if !runtime.keys.enabled() {
        tracing::warn!("no [[keys]] configured: client authentication is OFF and any client can use the upstream keys");
    }
    let state = AppState {
        inner: Arc::new(Shared {
            runtime: ArcSwap::from_pointee(runtime),
            metrics,
            draining: AtomicBool::new(false),
            started: Instant::now(),
        }),
    };
    let router = crate::routes::router(state.clone());
    Ok(App { state, router })
}

impl App {
    pub fn state(&self) -> &AppState {
        &self.state
    }

    pub fn router(&self) -> Router {
        self.router.clone()
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
        let state = self.state.clone();
        let signalled = Arc::new(Notify::new());
        let notify = signalled.clone();
        let listener = listener.tap_io(|tcp| {
            // Small SSE events must not wait for Nagle's algorithm.
            let _ = tcp.set_nodelay(true);
        });
        let server = axum::serve(listener, self.router).with_graceful_shutdown(async move {
            shutdown.await;
            state.set_draining();
            tracing::info!(grace = ?grace, "shutting down: draining in-flight requests");
            notify.notify_one();
        });
        tokio::select! {
            result = server.into_future() => result,
            _ = async { signalled.notified().await; tokio::time::sleep(grace).await } => {
                tracing::warn!(
                    in_flight = self.state.metrics().in_flight.get(),
                    "shutdown_grace expired: closing the remaining requests"
                );
                Ok(())
            }
        }
    }
}
