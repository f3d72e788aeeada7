//! The gateway's state: per-config data in `Runtime`, behind an `ArcSwap`. A
//! request loads it once at its start and keeps that `Arc` to its end, so a
//! config swap never changes a request half-way, and loading it takes no lock.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::budget::Budgets;
use crate::cache::{Cache, ModelCounters};
use crate::config::{Config, ModelConfig, UpstreamConfig};
use crate::gateway::auth::ClientKeys;
use crate::outcome::Outcome;
use crate::ratelimit::Limiter;
use crate::request::Endpoint;
use crate::shadow::Shadow;
use crate::stack::balance::LoadRegistry;
use crate::stack::Route;
use crate::telemetry::comparison::Comparison;
use crate::telemetry::ledger::Ledger;
use crate::telemetry::metrics::{AnsweredBy, Metrics, ModelMetrics};
use crate::telemetry::otel::Exporter;
use crate::telemetry::window::Window;
use crate::telemetry::Sinks;
use crate::upstream::breaker::Breaker;
use crate::upstream::{Upstream, UpstreamState};

/// Everything derived from one config.
pub struct Runtime {
    pub config: Config,
    /// Same order as `config.upstreams`.
    pub upstreams: Vec<Arc<Upstream>>,
    /// Same order as `config.models`.
    pub models: Vec<Model>,
    /// Model name → index into `models`.
    by_name: HashMap<String, usize>,
    pub keys: ClientKeys,
    /// The `/v1/models` answer, built once.
    pub models_json: Bytes,
    /// The models' `created` (this config's load time), for `/v1/models/{id}`.
    pub models_created: u64,
}

/// One configured model, with everything its requests need.
pub struct Model {
    pub config: ModelConfig,
    /// What the stack needs: targets, retry settings and budget, hedge.
    pub route: Arc<Route>,
    pub metrics: Arc<ModelMetrics>,
    pub shadow: Option<Arc<Shadow>>,
    /// With a `[cache]` and the model's `cache = {…}`: its cache counters.
    pub cache: Option<Arc<ModelCounters>>,
}

/// Upstream health by upstream name, kept across config reloads so that a
/// reload does not forget an open breaker or a 429 cooldown; and the
/// routing estimates of latency- and cost-routed targets, for the same reason.
#[derive(Default)]
pub struct UpstreamRegistry {
    states: Mutex<HashMap<String, Arc<UpstreamState>>>,
    pub loads: LoadRegistry,
}

impl UpstreamRegistry {
    /// The state for `config`, reused when the name and breaker settings are unchanged.
    pub fn state_for(&self, config: &UpstreamConfig, metrics: &Metrics, health_window: Duration) -> Arc<UpstreamState> {
        let mut states = self.states.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = states.get(&config.name) {
            if s.breaker.config() == &config.circuit_breaker {
                return s.clone();
            }
        }
        let state = Arc::new(UpstreamState::new(
            Breaker::new(&config.name, config.circuit_breaker.clone(), metrics),
            health_window,
        ));
        states.insert(config.name.clone(), state.clone());
        state
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("rate limiting: {0}")]
    RateLimit(String),
    #[error("budgets: {0}")]
    Budget(String),
    #[error("response cache: {0}")]
    Cache(String),
    #[error("cannot open the usage ledger: {0}")]
    Ledger(std::io::Error),
    #[error("cannot build the HTTP client for upstream '{upstream}': {source}")]
    Client {
        upstream: String,
        #[source]
        source: rustls::Error,
    },
}

impl Runtime {
    pub fn new(
        config: Config,
        registry: &UpstreamRegistry,
        metrics: &Metrics,
        cache: Option<&Cache>,
    ) -> Result<Self, BuildError> {
        let upstreams = config
            .upstreams
            .iter()
            .enumerate()
            .map(|(i, u)| {
                let state = registry.state_for(u, metrics, config.health.window);
                Upstream::new(u.clone(), i, state, metrics).map_err(|source| BuildError::Client {
                    upstream: u.name.clone(),
                    source,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let upstreams: Vec<Arc<Upstream>> = upstreams.into_iter().map(Arc::new).collect();
        let upstream_names: Vec<&str> = config.upstreams.iter().map(|u| u.name.as_str()).collect();
        let max_response_bytes = config.server.max_response_bytes;
        let models: Vec<Model> = config
            .models
            .iter()
            .map(|m| {
                let targets: Vec<usize> = m.targets.iter().map(|t| t.upstream).collect();
                Model {
                    config: m.clone(),
                    route: Arc::new(Route::new(
                        m,
                        &upstreams,
                        &config.retry,
                        max_response_bytes,
                        metrics,
                        &registry.loads,
                    )),
                    metrics: Arc::new(ModelMetrics::new(metrics, &m.name, &upstream_names, &targets)),
                    shadow: m.shadow.as_ref().map(|s| {
                        let upstream = upstreams[s.upstream].clone();
                        Arc::new(Shadow::new(&m.name, s.clone(), upstream, max_response_bytes, metrics))
                    }),
                    cache: cache
                        .filter(|_| m.cache.is_some())
                        .map(|c| c.metrics.for_model(&m.name)),
                }
            })
            .collect();
        let by_name = models
            .iter()
            .enumerate()
            .map(|(i, m)| (m.config.name.clone(), i))
            .collect();
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
            by_name,
            models_json,
            models_created: created,
            config,
        })
    }

    /// The configured model of this name.
    pub fn model(&self, name: &str) -> Option<&Model> {
        self.by_name.get(name).map(|&i| &self.models[i])
    }
}

#[derive(Clone)]
pub struct AppState {
    inner: Arc<Shared>,
}

struct Shared {
    runtime: ArcSwap<Runtime>,
    metrics: Arc<Metrics>,
    /// Where finished requests are recorded (metrics, /health, ledger, traces).
    sinks: Arc<Sinks>,
    upstreams: UpstreamRegistry,
    /// `server.max_in_flight`: one permit per request, held to its last byte.
    in_flight: Arc<Semaphore>,
    draining: AtomicBool,
    started: Instant,
    /// The file `reload` re-reads; unset for apps built from a `Config` value.
    config_path: OnceLock<PathBuf>,
    /// Built once: its buckets (and its Redis connection) outlive reloads.
    limiter: Limiter,
    /// Built once like the limiter: `[[budgets]]` apply at start.
    budgets: Budgets,
    /// The response cache's store, built once like the limiter: `[cache]`
    /// applies at start; which models use it follows reloads.
    cache: Option<Arc<Cache>>,
    /// Responses API ids → the upstream that answered them, so that
    /// `/v1/responses/{id}` finds the stored response (`passthrough`).
    stored_responses: moka::sync::Cache<String, Arc<str>>,
}

/// Ids remembered, and for how long: OpenAI keeps stored responses 30 days.
const STORED_RESPONSES: u64 = 100_000;
const STORED_RESPONSES_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

impl AppState {
    pub fn runtime(&self) -> Arc<Runtime> {
        self.inner.runtime.load_full()
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    pub fn sinks(&self) -> &Arc<Sinks> {
        &self.inner.sinks
    }

    pub fn limiter(&self) -> &Limiter {
        &self.inner.limiter
    }

    pub fn budgets(&self) -> &Budgets {
        &self.inner.budgets
    }

    pub fn cache(&self) -> Option<&Arc<Cache>> {
        self.inner.cache.as_ref()
    }

    pub fn stored_responses(&self) -> &moka::sync::Cache<String, Arc<str>> {
        &self.inner.stored_responses
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

    /// Re-reads the config file and swaps it in atomically. A bad file is
    /// rejected and the running config stays. Breakers, cooldowns and limiter
    /// state of unchanged upstreams carry over; in-flight requests finish on
    /// the config they started with. `server.listen` and `server.max_in_flight`
    /// apply at the next start only.
    pub fn reload(&self) -> Result<(), String> {
        let inner = &self.inner;
        let Some(path) = inner.config_path.get() else {
            return Err("relaygate was not started from a config file".into());
        };
        let built = Config::load(path).map_err(|e| e.to_string()).and_then(|c| {
            Runtime::new(c, &inner.upstreams, &inner.metrics, inner.cache.as_deref()).map_err(|e| e.to_string())
        });
        match built {
            Ok(runtime) => {
                let rule_names = |c: &Config| c.rate_limits.iter().map(|r| format!("{r:?}")).collect::<Vec<_>>();
                if rule_names(&runtime.config) != rule_names(&inner.runtime.load().config) {
                    tracing::warn!("rate limit rules changed: they apply at the next start, not on reload");
                }
                let budgets = |c: &Config| c.budgets.iter().map(|b| format!("{b:?}")).collect::<Vec<_>>();
                if budgets(&runtime.config) != budgets(&inner.runtime.load().config) {
                    tracing::warn!("budgets changed: they apply at the next start, not on reload");
                }
                // Debug, not the config itself: the Redis URL is a secret and
                // prints redacted, so a changed URL alone goes unnoticed here.
                let cache = |c: &Config| format!("{:?}", c.cache);
                if cache(&runtime.config) != cache(&inner.runtime.load().config) {
                    tracing::warn!("[cache] changed: it applies at the next start, not on reload");
                }
                preregister(&inner.metrics, &runtime);
                inner.runtime.store(Arc::new(runtime));
                inner.metrics.config_reloads.with_label_values(&["success"]).inc();
                tracing::info!(path = %path.display(), "config reloaded");
                Ok(())
            }
            Err(error) => {
                inner.metrics.config_reloads.with_label_values(&["error"]).inc();
                tracing::error!(%error, "config reload rejected; keeping the running config");
                Err(error)
            }
        }
    }

    /// Writes out the ledger and the trace spans still queued (on shutdown).
    pub async fn flush(&self) {
        let sinks = &self.inner.sinks;
        if let Some(ledger) = &sinks.ledger {
            if tokio::time::timeout(Duration::from_secs(10), ledger.close())
                .await
                .is_err()
            {
                tracing::error!("usage ledger: could not write out every line within 10 s");
            }
        }
        if let Some(otel) = &sinks.otel {
            otel.shutdown().await;
        }
    }

    /// A slot under `server.max_in_flight`, or `None` when full. tower's
    /// `ConcurrencyLimit` is not used because it frees its slot when the
    /// response headers go out, and a stream must hold its slot to the end.
    pub fn try_admit(&self) -> Option<OwnedSemaphorePermit> {
        self.inner.in_flight.clone().try_acquire_owned().ok()
    }
}

impl AppState {
    /// The state for a validated config. It connects to Redis when the rate
    /// limiter uses it (bounded by `redis_timeout`; an unreachable Redis is
    /// not an error: `fail_mode` applies).
    pub async fn new(config: Config) -> Result<Self, BuildError> {
        let metrics = Arc::new(Metrics::new());
        let limiter = Limiter::new(
            config.rate_limit.clone(),
            config.rate_limits.clone(),
            metrics.registry(),
        )
        .await
        .map_err(BuildError::RateLimit)?;
        let budgets = Budgets::new(
            config.budget.clone(),
            config.budgets.clone(),
            metrics.registry(),
            Box::new(crate::budget::SystemClock),
        )
        .await
        .map_err(BuildError::Budget)?;
        restore_budgets(&budgets, &config);
        warn_unpriced(&config);
        let ledger = match &config.ledger {
            None => None,
            Some(l) => {
                Some(Ledger::open(&l.path, l.capacity, metrics.ledger_dropped.clone()).map_err(BuildError::Ledger)?)
            }
        };
        let otel = config
            .otel
            .as_ref()
            .map(|o| Exporter::start(&o.endpoint, &o.service_name));
        let sinks = Arc::new(Sinks {
            other_model: Arc::new(ModelMetrics::other(&metrics)),
            metrics: metrics.clone(),
            window: Window::new(config.health.window),
            ledger,
            otel,
            comparison: Comparison::default(),
        });
        let cache = match &config.cache {
            None => None,
            Some(c) => Some(Cache::new(c, metrics.registry()).map_err(BuildError::Cache)?),
        };
        let upstreams = UpstreamRegistry::default();
        let runtime = Runtime::new(config, &upstreams, &metrics, cache.as_deref())?;
        let in_flight = Arc::new(Semaphore::new(runtime.config.server.max_in_flight));
        preregister(&metrics, &runtime);
        if !runtime.keys.enabled() {
            tracing::warn!(
                "no [[keys]] configured: client authentication is OFF and any client can use the upstream keys"
            );
        }
        Ok(AppState {
            inner: Arc::new(Shared {
                runtime: ArcSwap::from_pointee(runtime),
                metrics,
                sinks,
                upstreams,
                in_flight,
                draining: AtomicBool::new(false),
                started: Instant::now(),
                config_path: OnceLock::new(),
                limiter,
                budgets,
                cache,
                stored_responses: moka::sync::Cache::builder()
                    .max_capacity(STORED_RESPONSES)
                    .time_to_live(STORED_RESPONSES_TTL)
                    .build(),
            }),
        })
    }

    /// Remembers the file the config came from, for `reload`.
    pub fn set_config_path(&self, path: &std::path::Path) {
        let _ = self.inner.config_path.set(path.to_path_buf());
    }
}

/// The local backend keeps spend in memory: at start, the current periods
/// are rebuilt from the ledger, when there is one (docs/budgets.md). Before
/// the ledger is opened for writing, so no line is read twice.
fn restore_budgets(budgets: &Budgets, config: &Config) {
    let (Some(ledger), false) = (&config.ledger, budgets.is_empty()) else {
        return;
    };
    if !matches!(config.budget.backend, crate::ratelimit::Backend::Local) {
        return;
    }
    let started = std::time::Instant::now();
    let mut lines = 0u64;
    let read = crate::telemetry::ledger::read(&ledger.path, |line| {
        let Some(unix) = humantime::parse_rfc3339_weak(&line.time)
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        else {
            return;
        };
        lines += 1;
        budgets.restore(crate::budget::Spend {
            unix: unix.as_secs() as i64,
            key: &line.key,
            model: &line.model,
            upstream: line.upstream.as_deref(),
            shadow: line.shadow,
            micros: crate::budget::usd_to_micros(line.cost_usd),
        });
    });
    match read {
        Ok(()) => tracing::info!(
            lines,
            took_ms = started.elapsed().as_millis() as u64,
            "budgets: spend of the current periods rebuilt from the ledger"
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(error = %e, "budgets: cannot read the ledger; spend starts from 0"),
    }
}

/// A budget that meets a model without a price never sees its requests
/// cost anything: say so once, at start.
fn warn_unpriced(config: &Config) {
    if config.budgets.is_empty() {
        return;
    }
    for m in config.models.iter().filter(|m| m.price.is_none()) {
        tracing::warn!(
            model = %m.name,
            "budgets: this model has no price, so its requests spend nothing against any budget"
        );
    }
}

/// Creates zero-valued series for what the config makes possible, so that
/// dashboards and `rate()` see zeros rather than gaps before first use.
/// Series with a handle resolved at config load (failovers, hedges,
/// retries, per-model latency, tokens and cost, shadows, cache results)
/// exist already.
fn preregister(metrics: &Metrics, runtime: &Runtime) {
    for u in &runtime.upstreams {
        metrics.upstream_requests.with_label_values(&[&u.name, "200", "none"]);
        for (from, to) in [
            ("closed", "open"),
            ("open", "half_open"),
            ("half_open", "closed"),
            ("half_open", "open"),
        ] {
            metrics.circuit_transitions.with_label_values(&[&u.name, from, to]);
        }
    }
    for m in &runtime.models {
        let first = AnsweredBy::Upstream(m.route.targets[0].upstream.index);
        m.metrics
            .request(200, Outcome::Success, first, Endpoint::ChatCompletions as usize);
    }
    metrics.preregister(runtime.models.iter().map(|m| {
        let upstreams = m.route.targets.iter().map(|t| &*t.upstream.name).collect();
        (&*m.route.label, upstreams)
    }));
}
