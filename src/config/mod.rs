//! Configuration: parsed once, in two stages, into validated types.
//!
//! 1. The TOML text is parsed into a `toml::Value` and every string is
//!    interpolated (`interpolate`: `${VAR}`, `${VAR:-default}`, `$${` for a literal `${`).
//! 2. The interpolated tree is deserialised into the `Raw*` structs
//!    (`deny_unknown_fields`), with `serde_path_to_error` so that an error
//!    names the key path: `upstreams[0].first_byte_timeout: invalid duration "soon"`.
//! 3. `Raw*` is validated into `Config` (`validate`): cross references, uniqueness and
//!    ranges. Nothing downstream re-checks what this module guarantees.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Deserializer};

mod interpolate;
mod validate;

pub use interpolate::interpolate;
use interpolate::interpolate_value;

/// A config error. Its `Display` names the file (when there is one), the key
/// path and what is wrong. It never contains a secret: interpolated values
/// are not echoed.
#[derive(Debug, thiserror::Error)]
#[error("{}{message}", origin.as_ref().map(|p| format!("{}: ", p.display())).unwrap_or_default())]
pub struct ConfigError {
    origin: Option<PathBuf>,
    message: String,
}

impl ConfigError {
    fn new(message: impl Into<String>) -> Self {
        Self {
            origin: None,
            message: message.into(),
        }
    }

    fn at(path: &str, message: impl fmt::Display) -> Self {
        Self::new(format!("{path}: {message}"))
    }

    fn with_origin(mut self, path: &Path) -> Self {
        self.origin = Some(path.to_path_buf());
        self
    }
}

/// A secret from the config (an upstream key, a client key, the admin key).
/// Its `Debug` is redacted and it has no `Display` and no `Serialize`.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct Secret(SecretString);

impl Secret {
    pub fn new(value: &str) -> Self {
        Self(SecretString::from(value.to_owned()))
    }

    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([REDACTED])")
    }
}

// ---------------------------------------------------------------------------
// Stage 2: the raw, deserialised shape.
// ---------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    admin: Option<RawAdmin>,
    #[serde(default)]
    upstreams: Vec<RawUpstream>,
    #[serde(default)]
    models: Vec<RawModel>,
    #[serde(default)]
    keys: Vec<RawKey>,
    #[serde(default)]
    retry: RawRetry,
    #[serde(default)]
    circuit_breaker: RawBreaker,
    rate_limit: Option<crate::ratelimit::RawRateLimit>,
    #[serde(default)]
    rate_limits: Vec<crate::ratelimit::RawRule>,
    budget: Option<crate::budget::RawBudgetSettings>,
    #[serde(default)]
    budgets: Vec<crate::budget::RawBudget>,
    ledger: Option<RawLedger>,
    otel: Option<RawOtel>,
    #[serde(default)]
    health: RawHealth,
    cache: Option<RawCache>,
    passthrough: Option<RawPassthrough>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPassthrough {
    upstream: String,
    paths: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCache {
    #[serde(default = "d_cache_backend")]
    backend: String,
    redis_url: Option<SecretString>,
    #[serde(default = "d_cache_max_bytes")]
    max_bytes: u64,
    #[serde(default = "d_cache_max_entry_bytes")]
    max_entry_bytes: u64,
    #[serde(default = "d_cache_ttl", deserialize_with = "duration")]
    ttl: Duration,
    #[serde(default = "d_cache_scope")]
    scope: String,
    #[serde(default, deserialize_with = "opt_duration")]
    redis_timeout: Option<Duration>,
}

impl Default for RawCache {
    fn default() -> Self {
        Self {
            backend: d_cache_backend(),
            redis_url: None,
            max_bytes: d_cache_max_bytes(),
            max_entry_bytes: d_cache_max_entry_bytes(),
            ttl: d_cache_ttl(),
            scope: d_cache_scope(),
            redis_timeout: None,
        }
    }
}

fn d_cache_backend() -> String {
    "memory".into()
}
fn d_cache_max_bytes() -> u64 {
    256 * 1024 * 1024
}
fn d_cache_max_entry_bytes() -> u64 {
    1024 * 1024
}
fn d_cache_ttl() -> Duration {
    Duration::from_secs(600)
}
fn d_cache_scope() -> String {
    "key".into()
}

/// A model's `cache = { ttl = "10m", when = "deterministic" }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModelCache {
    #[serde(default, deserialize_with = "opt_duration")]
    ttl: Option<Duration>,
    #[serde(default = "d_cache_when")]
    when: String,
}

fn d_cache_when() -> String {
    "deterministic".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLedger {
    path: PathBuf,
    #[serde(default = "d_ledger_capacity")]
    capacity: usize,
}

fn d_ledger_capacity() -> usize {
    8192
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOtel {
    endpoint: String,
    #[serde(default = "d_service_name")]
    service_name: String,
}

fn d_service_name() -> String {
    "relaygate".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawHealth {
    #[serde(deserialize_with = "duration")]
    window: Duration,
    degraded_below: f64,
    unhealthy_below: f64,
}

impl Default for RawHealth {
    fn default() -> Self {
        Self {
            window: Duration::from_secs(300),
            degraded_below: 0.99,
            unhealthy_below: 0.90,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawRetry {
    max_attempts: u32,
    #[serde(deserialize_with = "duration")]
    base_delay: Duration,
    #[serde(deserialize_with = "duration")]
    max_delay: Duration,
    budget_ratio: f64,
    min_retries_per_second: u32,
    #[serde(deserialize_with = "duration")]
    retry_after_cap: Duration,
}

impl Default for RawRetry {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            base_delay: Duration::from_millis(250),
            max_delay: Duration::from_secs(2),
            budget_ratio: 0.2,
            min_retries_per_second: 5,
            retry_after_cap: Duration::from_secs(10),
        }
    }
}

/// The breaker settings; every field optional so that an upstream's
/// `circuit_breaker = { ... }` overrides only what it names.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBreaker {
    consecutive_failures: Option<u32>,
    failure_rate: Option<f64>,
    min_requests: Option<u32>,
    #[serde(default, deserialize_with = "opt_duration")]
    window: Option<Duration>,
    #[serde(default, deserialize_with = "opt_duration")]
    open_for: Option<Duration>,
    #[serde(default, deserialize_with = "opt_duration")]
    max_open_for: Option<Duration>,
    half_open_probes: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawServer {
    listen: String,
    max_body_bytes: u64,
    max_response_bytes: u64,
    max_passthrough_body_bytes: u64,
    #[serde(deserialize_with = "duration")]
    shutdown_grace: Duration,
    max_in_flight: usize,
    #[serde(deserialize_with = "duration")]
    send_timeout: Duration,
    #[serde(deserialize_with = "duration")]
    request_body_timeout: Duration,
    #[serde(deserialize_with = "duration")]
    header_read_timeout: Duration,
    #[serde(deserialize_with = "duration")]
    keepalive_timeout: Duration,
}

impl Default for RawServer {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            max_body_bytes: 10 * 1024 * 1024,
            max_response_bytes: 64 * 1024 * 1024,
            // OpenAI's own limit for a file upload; streamed, never held.
            max_passthrough_body_bytes: 512 * 1024 * 1024,
            shutdown_grace: Duration::from_secs(30),
            max_in_flight: 4096,
            send_timeout: Duration::from_secs(60),
            request_body_timeout: Duration::from_secs(60),
            header_read_timeout: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(75),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    key: Option<Secret>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    name: String,
    base_url: String,
    api_key: Option<Secret>,
    #[serde(default = "d_connect", deserialize_with = "duration")]
    connect_timeout: Duration,
    #[serde(default = "d_first_byte", deserialize_with = "duration")]
    first_byte_timeout: Duration,
    #[serde(default = "d_idle", deserialize_with = "duration")]
    idle_timeout: Duration,
    #[serde(default = "d_request", deserialize_with = "duration")]
    request_timeout: Duration,
    #[serde(default)]
    max_concurrency: usize,
    #[serde(default)]
    http_version: HttpVersion,
    circuit_breaker: Option<RawBreaker>,
}

/// The HTTP version relaygate speaks to an upstream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum HttpVersion {
    /// HTTP/1.1 with a keep-alive pool: one connection per concurrent
    /// request. The default: an upstream's HTTP/2 stream limit can never
    /// hold a request back.
    #[default]
    #[serde(rename = "1.1")]
    Http1,
    /// HTTP/2 when the upstream offers it in the TLS handshake (ALPN), else
    /// HTTP/1.1.
    #[serde(rename = "auto")]
    Auto,
    /// HTTP/2 only: ALPN over TLS, prior knowledge (h2c) over `http://`.
    #[serde(rename = "2")]
    Http2,
}

fn d_connect() -> Duration {
    Duration::from_secs(5)
}
fn d_first_byte() -> Duration {
    Duration::from_secs(60)
}
fn d_idle() -> Duration {
    Duration::from_secs(30)
}
fn d_request() -> Duration {
    Duration::from_secs(600)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    name: String,
    targets: Vec<RawTarget>,
    price: Option<Price>,
    hedge_after: Option<String>,
    shadow: Option<RawShadow>,
    cache: Option<RawModelCache>,
    routing: Option<String>,
    #[serde(default, deserialize_with = "opt_duration")]
    routing_decay: Option<Duration>,
    #[serde(default, deserialize_with = "opt_duration")]
    max_ttft: Option<Duration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawShadow {
    upstream: String,
    model: Option<String>,
    sample: f64,
    #[serde(default = "d_shadow_in_flight")]
    max_in_flight: usize,
    price: Option<Price>,
}

fn d_shadow_in_flight() -> usize {
    16
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTarget {
    upstream: String,
    model: Option<String>,
    #[serde(default)]
    priority: u32,
    #[serde(default = "d_weight")]
    weight: u32,
    /// Overrides the model's price (`routing = "cost"` ranks by it).
    price: Option<Price>,
}

fn d_weight() -> u32 {
    1
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    name: String,
    key: Secret,
}

/// Human durations (`"250ms"`, `"30s"`, `"1m 30s"`). Written by hand over
/// `humantime` rather than with `humantime-serde` so that the error says
/// `invalid duration "soon"` and nothing about serde internals.
fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    humantime::parse_duration(text.trim()).map_err(|_| {
        serde::de::Error::custom(format!(
            "invalid duration {text:?} (expected e.g. \"250ms\", \"30s\", \"5m\")"
        ))
    })
}

fn opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration(d).map(Some)
}

// ---------------------------------------------------------------------------
// Stage 3: validated types.
// ---------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub admin_key: Option<Secret>,
    pub upstreams: Vec<UpstreamConfig>,
    pub models: Vec<ModelConfig>,
    pub keys: Vec<KeyConfig>,
    pub retry: RetryConfig,
    pub rate_limit: crate::ratelimit::RateLimitSettings,
    pub rate_limits: Vec<crate::ratelimit::Rule>,
    /// `[budget]`: where spend is kept (defaults from `[rate_limit]`).
    pub budget: crate::budget::BudgetSettings,
    /// `[[budgets]]`: USD caps per period (docs/budgets.md).
    pub budgets: Vec<crate::budget::Budget>,
    pub ledger: Option<LedgerConfig>,
    pub otel: Option<OtelConfig>,
    pub health: HealthConfig,
    /// `[cache]`: set when the section is there or a model opts in (then
    /// with its defaults: memory, 256 MiB).
    pub cache: Option<CacheConfig>,
    /// `[passthrough]`: the rest of `/v1/*` to one upstream (docs/endpoints.md).
    pub passthrough: Option<PassthroughConfig>,
}

/// `[passthrough]`: which `/v1/*` paths go, unchanged, to which upstream.
#[derive(Debug, Clone)]
pub struct PassthroughConfig {
    /// Index into `Config::upstreams`.
    pub upstream: usize,
    /// `None`: every `/v1/*` path relaygate does not serve itself.
    pub paths: Option<Vec<PathPattern>>,
}

/// A `[passthrough] paths` entry: an exact path, or a prefix ending in `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathPattern {
    Exact(String),
    Prefix(String),
}

impl PathPattern {
    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathPattern::Exact(p) => path == p,
            PathPattern::Prefix(p) => path.starts_with(p.as_str()),
        }
    }
}

impl PassthroughConfig {
    /// Whether a `/v1/*` path that relaygate does not serve itself goes through.
    pub fn covers(&self, path: &str) -> bool {
        match &self.paths {
            None => path.starts_with("/v1/"),
            Some(patterns) => patterns.iter().any(|p| p.matches(path)),
        }
    }
}

/// `[cache]`: the response cache's store. Which models use it, and for how
/// long, is per model (`ModelConfig::cache`).
#[derive(Debug, Clone)]
pub struct CacheConfig {
    pub backend: CacheBackend,
    /// An answer larger than this is not stored.
    pub max_entry_bytes: usize,
    /// The default entry lifetime (a model's own `ttl` wins).
    pub ttl: Duration,
    pub scope: CacheScope,
}

#[derive(Debug, Clone)]
pub enum CacheBackend {
    /// In this process, bounded by the total weight of its entries.
    Memory { max_bytes: u64 },
    /// Shared by every replica, under `{key_prefix}:cache:…`.
    Redis {
        url: SecretString,
        /// Bound on every cache call to Redis; past it the cache is bypassed.
        timeout: Duration,
        key_prefix: String,
    },
}

/// Who shares an entry: only requests with the same client key name, or
/// every client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheScope {
    Key,
    Global,
}

/// A model's opt-in to the response cache.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModelCache {
    pub ttl: Duration,
    pub when: CacheWhen,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheWhen {
    /// Requests with `temperature` 0 or a `seed` (embeddings always).
    Deterministic,
    Always,
}

/// `[ledger]`: one JSON line per finished request.
#[derive(Debug, Clone, PartialEq)]
pub struct LedgerConfig {
    pub path: PathBuf,
    /// Lines waiting to be written; beyond it lines are dropped and counted.
    pub capacity: usize,
}

/// `[otel]`: OTLP/HTTP trace export.
#[derive(Debug, Clone, PartialEq)]
pub struct OtelConfig {
    /// The collector's OTLP/HTTP base URL (port 4318 by convention).
    pub endpoint: String,
    pub service_name: String,
}

/// `[health]`: the `/health` window and its thresholds.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthConfig {
    pub window: Duration,
    /// Success rate below which `/health` says `degraded`.
    pub degraded_below: f64,
    /// Success rate below which `/health` says `unhealthy`.
    pub unhealthy_below: f64,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub max_body_bytes: usize,
    pub max_response_bytes: usize,
    /// The body limit of pass-through requests (streamed, never buffered).
    pub max_passthrough_body_bytes: u64,
    pub shutdown_grace: Duration,
    /// Requests (streams included) served at once; over it, a fast 503.
    pub max_in_flight: usize,
    /// How long a client may leave relaygate unable to write to it (its
    /// receive window full) before its connection is closed.
    pub send_timeout: Duration,
    /// How long the client may pause while sending its request body.
    pub request_body_timeout: Duration,
    /// How long a request head may take to arrive once it has begun.
    pub header_read_timeout: Duration,
    /// How long a connection may stay idle: after an answer, or since it
    /// was opened.
    pub keepalive_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RetryConfig {
    /// Upstream attempts per request, the first included.
    pub max_attempts: u32,
    pub base_delay: Duration,
    pub max_delay: Duration,
    /// Retries allowed as a share of requests (tower's budget).
    pub budget_ratio: f64,
    /// Retries always allowed per second, whatever the ratio.
    pub min_retries_per_second: u32,
    /// Upper bound on any Retry-After / rate-limit reset an upstream asks for.
    pub retry_after_cap: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BreakerConfig {
    pub consecutive_failures: u32,
    pub failure_rate: f64,
    pub min_requests: u32,
    pub window: Duration,
    pub open_for: Duration,
    pub max_open_for: Duration,
    pub half_open_probes: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            failure_rate: 0.5,
            min_requests: 20,
            window: Duration::from_secs(30),
            open_for: Duration::from_secs(10),
            max_open_for: Duration::from_secs(120),
            half_open_probes: 3,
        }
    }
}

impl RawBreaker {
    /// `self` over `base`, field by field, then validated.
    fn resolve(&self, base: &BreakerConfig, path: &str) -> Result<BreakerConfig, ConfigError> {
        let b = BreakerConfig {
            consecutive_failures: self.consecutive_failures.unwrap_or(base.consecutive_failures),
            failure_rate: self.failure_rate.unwrap_or(base.failure_rate),
            min_requests: self.min_requests.unwrap_or(base.min_requests),
            window: self.window.unwrap_or(base.window),
            open_for: self.open_for.unwrap_or(base.open_for),
            max_open_for: self.max_open_for.unwrap_or(base.max_open_for),
            half_open_probes: self.half_open_probes.unwrap_or(base.half_open_probes),
        };
        let at = |key: &str| format!("{path}.{key}");
        if b.consecutive_failures == 0 {
            return Err(ConfigError::at(&at("consecutive_failures"), "must be at least 1"));
        }
        if !(b.failure_rate > 0.0 && b.failure_rate <= 1.0) {
            return Err(ConfigError::at(&at("failure_rate"), "must be in (0, 1]"));
        }
        if b.window < Duration::from_secs(1) {
            return Err(ConfigError::at(&at("window"), "must be at least 1s"));
        }
        if b.open_for.is_zero() {
            return Err(ConfigError::at(&at("open_for"), "must be greater than 0"));
        }
        if b.max_open_for < b.open_for {
            return Err(ConfigError::at(&at("max_open_for"), "must be at least open_for"));
        }
        if b.half_open_probes == 0 {
            return Err(ConfigError::at(&at("half_open_probes"), "must be at least 1"));
        }
        Ok(b)
    }
}

/// When to hedge a request to the next target.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Hedge {
    /// After this long without response headers.
    After(Duration),
    /// After the primary upstream's observed first-byte p95.
    P95,
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub name: String,
    /// Without a trailing slash: `https://api.holysheep.ai/v1`.
    pub base_url: String,
    pub api_key: Option<Secret>,
    pub connect_timeout: Duration,
    pub first_byte_timeout: Duration,
    pub idle_timeout: Duration,
    pub request_timeout: Duration,
    /// Concurrent requests to this upstream; 0 is unlimited.
    pub max_concurrency: usize,
    pub http_version: HttpVersion,
    pub circuit_breaker: BreakerConfig,
}

#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub name: String,
    /// Sorted by priority (stable, so equal priorities keep file order).
    pub targets: Vec<TargetConfig>,
    pub price: Option<Price>,
    pub hedge: Option<Hedge>,
    pub shadow: Option<ShadowConfig>,
    /// Off (`None`) unless the model opts in.
    pub cache: Option<ModelCache>,
    pub routing: Routing,
}

/// How a model chooses among its targets (docs/routing.md).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Routing {
    pub strategy: Strategy,
    /// The half-life of the TTFT estimates and failure penalties
    /// (`routing_decay`, default 10 s).
    pub decay: Duration,
    /// `cost` only: the cheapest target whose estimate is under this.
    pub max_ttft: Option<Duration>,
}

impl Default for Routing {
    fn default() -> Self {
        Self {
            strategy: Strategy::Priority,
            decay: Duration::from_secs(10),
            max_ttft: None,
        }
    }
}

/// `routing`: a closed set, so also a metric label
/// (`relaygate_route_picks_total{strategy}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// The lowest priority with an available target, by weight within it.
    Priority,
    /// Power of two choices over peak-EWMA time to first token.
    Latency,
    /// The cheapest available target (under `max_ttft`, when set).
    Cost,
}

impl Strategy {
    pub const ALL: [Strategy; 3] = [Strategy::Priority, Strategy::Latency, Strategy::Cost];

    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Priority => "priority",
            Strategy::Latency => "latency",
            Strategy::Cost => "cost",
        }
    }
}

/// A model's shadow: a share of its requests mirrored, in the background, to
/// a candidate upstream/model for comparison. Never seen by the client.
#[derive(Debug, Clone, PartialEq)]
pub struct ShadowConfig {
    /// Index into `Config::upstreams`.
    pub upstream: usize,
    pub model: String,
    /// Share of requests mirrored, 0 to 1.
    pub sample: f64,
    /// Shadow requests at once for this model; beyond it they are dropped.
    pub max_in_flight: usize,
    /// The shadow's price (default: the model's own).
    pub price: Option<Price>,
}

#[derive(Debug, Clone)]
pub struct TargetConfig {
    /// Index into `Config::upstreams`.
    pub upstream: usize,
    /// The model name sent upstream.
    pub model: String,
    pub priority: u32,
    pub weight: u32,
    /// The target's own price, else the model's.
    pub price: Option<Price>,
}

/// USD per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    pub input_per_mtok: f64,
    pub output_per_mtok: f64,
    #[serde(default)]
    pub cached_input_per_mtok: Option<f64>,
}

impl Price {
    /// One figure to rank targets by (`routing = "cost"`): USD per million
    /// tokens blended 3:1 input to output, the convention of public price
    /// comparisons (a chat request reads more than it writes).
    pub fn blended(&self) -> f64 {
        (3.0 * self.input_per_mtok + self.output_per_mtok) / 4.0
    }
}

#[derive(Debug, Clone)]
pub struct KeyConfig {
    pub name: String,
    pub key: Secret,
}

/// Labels and names are limited so that a config cannot make metric series
/// or log fields unreadable.
const MAX_NAME_LEN: usize = 64;

impl Config {
    /// Reads and validates a config file, interpolating from the process environment.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::new(format!("cannot read: {e}")).with_origin(path))?;
        Self::parse(&text, |name| std::env::var(name).ok()).map_err(|e| e.with_origin(path))
    }

    /// Parses config text; `lookup` resolves `${VAR}` references.
    pub fn parse(text: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let mut value: toml::Value =
            toml::from_str(text).map_err(|e| ConfigError::new(format!("invalid TOML: {}", e.message().trim())))?;
        interpolate_value(&mut value, &mut String::new(), &lookup)?;
        let raw: RawConfig = serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner().message().trim().to_owned();
            if path == "." {
                ConfigError::new(inner)
            } else {
                ConfigError::at(&path, inner)
            }
        })?;
        raw.validate()
    }

    pub fn upstream_index(&self, name: &str) -> Option<usize> {
        self.upstreams.iter().position(|u| u.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[[upstreams]]
name = "sim"
base_url = "http://127.0.0.1:9/v1/"
api_key = "${UP_KEY}"

[[models]]
name = "deepseek-chat"
targets = [{ upstream = "sim" }]
"#;

    fn env(name: &str) -> Option<String> {
        match name {
            "UP_KEY" => Some("sk-upstream-secret".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    fn err(text: &str) -> String {
        Config::parse(text, env).unwrap_err().to_string()
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::parse(MINIMAL, env).unwrap();
        assert_eq!(c.server.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.server.max_body_bytes, 10 * 1024 * 1024);
        assert_eq!(c.server.shutdown_grace, Duration::from_secs(30));
        assert_eq!(c.server.send_timeout, Duration::from_secs(60));
        assert_eq!(c.server.request_body_timeout, Duration::from_secs(60));
        assert_eq!(c.server.header_read_timeout, Duration::from_secs(30));
        assert_eq!(c.server.keepalive_timeout, Duration::from_secs(75));
        let u = &c.upstreams[0];
        assert_eq!(u.base_url, "http://127.0.0.1:9/v1");
        assert_eq!(u.first_byte_timeout, Duration::from_secs(60));
        assert_eq!(u.api_key.as_ref().unwrap().expose(), "sk-upstream-secret");
        assert_eq!(c.models[0].targets[0].model, "deepseek-chat");
        assert!(c.keys.is_empty() && c.admin_key.is_none());
    }

    #[test]
    fn bad_duration_names_the_key_path() {
        let text = MINIMAL.replace("api_key", "first_byte_timeout = \"soon\"\napi_key");
        assert_eq!(
            err(&text),
            "upstreams[0].first_byte_timeout: invalid duration \"soon\" (expected e.g. \"250ms\", \"30s\", \"5m\")"
        );
    }

    #[test]
    fn unknown_keys_are_errors() {
        let text = MINIMAL.replace("api_key", "first_byte_timout = \"1s\"\napi_key");
        let e = err(&text);
        assert!(
            e.starts_with("upstreams[0].first_byte_timout: unknown field `first_byte_timout`"),
            "{e}"
        );
        let e = err(&format!("[server]\nlisten = \"127.0.0.1:1\"\ncolour = 1\n{MINIMAL}"));
        assert!(e.starts_with("server.colour: unknown field `colour`"), "{e}");
    }

    #[test]
    fn missing_variable_is_named() {
        let text = MINIMAL.replace("UP_KEY", "NOPE_KEY");
        assert_eq!(
            err(&text),
            "upstreams[0].api_key: environment variable NOPE_KEY is not set (use ${NOPE_KEY:-default} for a default)"
        );
    }

    #[test]
    fn interpolation_forms() {
        assert_eq!(interpolate("a${UP_KEY}b", &env).unwrap(), "ask-upstream-secretb");
        assert_eq!(interpolate("${MISSING:-x:y}", &env).unwrap(), "x:y");
        assert_eq!(interpolate("${EMPTY:-d}", &env).unwrap(), "");
        assert_eq!(interpolate("$${UP_KEY} $5", &env).unwrap(), "${UP_KEY} $5");
        assert!(interpolate("${UP_KEY", &env).is_err());
        assert!(interpolate("${1BAD}", &env).is_err());
    }

    #[test]
    fn cross_references_and_ranges_are_checked() {
        let e = err(&MINIMAL.replace("upstream = \"sim\"", "upstream = \"nope\""));
        assert_eq!(
            e,
            "models[0].targets[0].upstream: unknown upstream \"nope\" (not in [[upstreams]])"
        );
        let e = err(&MINIMAL.replace("http://127.0.0.1:9/v1/", "ftp://x"));
        assert!(e.starts_with("upstreams[0].base_url: invalid URL"), "{e}");
        let e = err(&format!("{MINIMAL}\n[[keys]]\nname = \"a\"\nkey = \"short\"\n"));
        assert_eq!(e, "keys[0].key: is shorter than 8 characters");
        let e = err(&MINIMAL.replace("name = \"deepseek-chat\"", "name = \"other\""));
        assert!(e.starts_with("models[0].name: \"other\" is reserved"), "{e}");
        let e = err("[server]\nlisten = \"nowhere\"\n");
        assert!(e.starts_with("server.listen: invalid address"), "{e}");
        for key in [
            "send_timeout",
            "request_body_timeout",
            "header_read_timeout",
            "keepalive_timeout",
        ] {
            let e = err(&format!("[server]\n{key} = \"0s\"\n{MINIMAL}"));
            assert_eq!(e, format!("server.{key}: must be greater than 0"));
        }
        let e = err("not toml = = 1");
        assert!(e.starts_with("invalid TOML"), "{e}");
        let with_version = |v: &str| MINIMAL.replace("api_key =", &format!("http_version = {v}\napi_key ="));
        let e = err(&with_version("\"3\""));
        assert!(e.starts_with("upstreams[0].http_version: unknown variant `3`"), "{e}");
        let e = err(&with_version("2"));
        assert!(
            e.starts_with("upstreams[0].http_version: "),
            "a number is not a version string: {e}"
        );
        let c = Config::parse(&with_version("\"auto\""), env).unwrap();
        assert_eq!(c.upstreams[0].http_version, HttpVersion::Auto);
        assert_eq!(
            Config::parse(MINIMAL, env).unwrap().upstreams[0].http_version,
            HttpVersion::Http1
        );
    }

    #[test]
    fn breaker_overrides_merge_field_by_field() {
        let text = format!(
            "[circuit_breaker]\nopen_for = \"2s\"\n{}",
            MINIMAL.replace("api_key", "circuit_breaker = { consecutive_failures = 2 }\napi_key")
        );
        let c = Config::parse(&text, env).unwrap();
        let b = &c.upstreams[0].circuit_breaker;
        assert_eq!(
            (b.consecutive_failures, b.open_for, b.half_open_probes),
            (2, Duration::from_secs(2), 3)
        );
        let e = err(&MINIMAL.replace("api_key", "circuit_breaker = { failure_rate = 1.5 }\napi_key"));
        assert_eq!(e, "upstreams[0].circuit_breaker.failure_rate: must be in (0, 1]");
    }

    #[test]
    fn hedge_after_forms() {
        let two = MINIMAL.replace(
            "targets = [{ upstream = \"sim\" }]",
            "targets = [{ upstream = \"sim\" }, { upstream = \"sim\", priority = 1 }]\nhedge_after = \"HEDGE\"",
        );
        let c = Config::parse(&two.replace("HEDGE", "p95"), env).unwrap();
        assert_eq!(c.models[0].hedge, Some(Hedge::P95));
        let c = Config::parse(&two.replace("HEDGE", "800ms"), env).unwrap();
        assert_eq!(c.models[0].hedge, Some(Hedge::After(Duration::from_millis(800))));
        assert!(err(&two.replace("HEDGE", "soon")).starts_with("models[0].hedge_after: invalid value"));
        let one = MINIMAL.replace(
            "targets = [{ upstream = \"sim\" }]",
            "targets = [{ upstream = \"sim\" }]\nhedge_after = \"1s\"",
        );
        assert_eq!(err(&one), "models[0].hedge_after: hedging needs at least two targets");
    }

    #[test]
    fn routing_defaults_and_forms() {
        let c = Config::parse(MINIMAL, env).unwrap();
        assert_eq!(c.models[0].routing, Routing::default());
        assert_eq!(c.models[0].routing.strategy, Strategy::Priority);
        let two = |model_keys: &str| {
            format!(
                "{}\n[[upstreams]]\nname = \"b\"\nbase_url = \"http://127.0.0.1:2\"\n",
                MINIMAL.replace(
                    "targets = [{ upstream = \"sim\" }]",
                    &format!("targets = [{{ upstream = \"sim\" }}, {{ upstream = \"b\", price = {{ input_per_mtok = 1.0, output_per_mtok = 2.0 }} }}]\n{model_keys}"),
                )
            )
        };
        let c = Config::parse(&two("routing = \"latency\"\nrouting_decay = \"30s\""), env).unwrap();
        let r = c.models[0].routing;
        assert_eq!(
            (r.strategy, r.decay, r.max_ttft),
            (Strategy::Latency, Duration::from_secs(30), None)
        );
        assert_eq!(c.models[0].targets[0].price, None);
        assert_eq!(c.models[0].targets[1].price.unwrap().output_per_mtok, 2.0);
        // A target's price overrides the model's; the others inherit it.
        let priced =
            two("routing = \"cost\"\nmax_ttft = \"800ms\"\nprice = { input_per_mtok = 4.0, output_per_mtok = 4.0 }");
        let c = Config::parse(&priced, env).unwrap();
        let m = &c.models[0];
        assert_eq!(m.routing.max_ttft, Some(Duration::from_millis(800)));
        assert_eq!(m.routing.decay, Duration::from_secs(10));
        assert_eq!(m.targets[0].price.unwrap().input_per_mtok, 4.0);
        assert_eq!(m.targets[1].price.unwrap().blended(), 1.25);
    }

    #[test]
    fn routing_errors_name_the_key() {
        let with = |keys: &str| {
            MINIMAL.replace(
                "targets = [{ upstream = \"sim\" }]",
                &format!("targets = [{{ upstream = \"sim\" }}]\n{keys}"),
            )
        };
        assert_eq!(
            err(&with("routing = \"fastest\"")),
            "models[0].routing: unknown strategy \"fastest\" (expected \"priority\", \"latency\" or \"cost\")"
        );
        assert_eq!(
            err(&with("routing_decay = \"5s\"")),
            "models[0].routing_decay: applies only with routing = \"latency\" or \"cost\""
        );
        assert_eq!(
            err(&with("routing = \"latency\"\nmax_ttft = \"1s\"")),
            "models[0].max_ttft: applies only with routing = \"cost\""
        );
        assert_eq!(
            err(&with("routing = \"latency\"\nrouting_decay = \"0s\"")),
            "models[0].routing_decay: must be at least 100ms"
        );
        assert!(err(&with("routing = \"latency\"\nrouting_decay = \"soon\""))
            .starts_with("models[0].routing_decay: invalid duration"));
        // `cost` needs a price for every target: the error names the target.
        let e = err(&with("routing = \"cost\""));
        assert!(
            e.starts_with("models[0].targets[0].price: routing = \"cost\" ranks targets by price, and target \"sim\" (model \"deepseek-chat\") has none"),
            "{e}"
        );
        let e = err(&MINIMAL.replace(
            "targets = [{ upstream = \"sim\" }]",
            "routing = \"cost\"\ntargets = [{ upstream = \"sim\", price = { input_per_mtok = 1.0, output_per_mtok = 1.0 } }, { upstream = \"sim\", model = \"other-model\", priority = 1 }]",
        ));
        assert!(e.starts_with("models[0].targets[1].price: "), "{e}");
        assert!(e.contains("\"other-model\""), "{e}");
        let e = err(&MINIMAL.replace(
            "targets = [{ upstream = \"sim\" }]",
            "targets = [{ upstream = \"sim\", price = { input_per_mtok = -1.0, output_per_mtok = 1.0 } }]",
        ));
        assert_eq!(e, "models[0].targets[0].price: prices must be finite and not negative");
    }

    #[test]
    fn secrets_are_redacted_in_debug() {
        let c = Config::parse(MINIMAL, env).unwrap();
        let dump = format!("{c:?}");
        assert!(!dump.contains("sk-upstream-secret"), "{dump}");
        assert!(dump.contains("REDACTED"));
    }

    #[test]
    fn targets_sort_by_priority_stably() {
        let text = r#"
[[upstreams]]
name = "a"
base_url = "http://127.0.0.1:1"
[[upstreams]]
name = "b"
base_url = "http://127.0.0.1:2"
[[models]]
name = "m"
targets = [{ upstream = "a", priority = 2 }, { upstream = "b", priority = 1, model = "m2" }, { upstream = "a", priority = 1 }]
"#;
        let c = Config::parse(text, env).unwrap();
        let order: Vec<_> = c.models[0]
            .targets
            .iter()
            .map(|t| (t.upstream, t.model.as_str()))
            .collect();
        assert_eq!(order, vec![(1, "m2"), (0, "m"), (0, "m")]);
    }

    #[test]
    fn cache_is_off_unless_a_model_opts_in() {
        let c = Config::parse(MINIMAL, env).unwrap();
        assert!(c.cache.is_none() && c.models[0].cache.is_none());
        // A model that opts in gets the memory defaults, and [cache]'s ttl.
        let opted = MINIMAL.replace(
            "targets = [{ upstream = \"sim\" }]",
            "targets = [{ upstream = \"sim\" }]\ncache = {}",
        );
        let c = Config::parse(&opted, env).unwrap();
        let cache = c.cache.expect("defaults");
        assert!(matches!(cache.backend, CacheBackend::Memory { max_bytes } if max_bytes == 256 << 20));
        assert_eq!((cache.max_entry_bytes, cache.scope), (1 << 20, CacheScope::Key));
        assert_eq!(
            c.models[0].cache,
            Some(ModelCache {
                ttl: Duration::from_secs(600),
                when: CacheWhen::Deterministic
            })
        );
        let own_ttl = opted.replace("cache = {}", "cache = { ttl = \"30s\", when = \"always\" }");
        let m = Config::parse(&own_ttl, env).unwrap().models[0].cache.unwrap();
        assert_eq!((m.ttl, m.when), (Duration::from_secs(30), CacheWhen::Always));
        // The Redis URL comes from [rate_limit] when the cache has none.
        let shared = format!(
            "{opted}\n[cache]\nbackend = \"redis\"\n\n[rate_limit]\nbackend = \"redis\"\nredis_url = \"redis://127.0.0.1:6379\"\n"
        );
        let c = Config::parse(&shared, env).unwrap().cache.unwrap();
        assert!(matches!(c.backend, CacheBackend::Redis { ref key_prefix, timeout, .. }
            if key_prefix == "relaygate" && timeout == Duration::from_millis(50)));
    }

    #[test]
    fn cache_errors_name_the_key() {
        let opted = MINIMAL.replace(
            "targets = [{ upstream = \"sim\" }]",
            "targets = [{ upstream = \"sim\" }]\ncache = {}",
        );
        for (section, expected) in [
            ("backend = \"disk\"", "cache.backend: unknown backend \"disk\" (expected memory or redis)"),
            ("scope = \"team\"", "cache.scope: unknown scope \"team\" (expected key or global)"),
            ("ttl = \"0s\"", "cache.ttl: must be greater than 0"),
            ("max_bytes = 0", "cache.max_bytes: must be greater than 0"),
            ("max_entry_bytes = 0", "cache.max_entry_bytes: must be greater than 0"),
            ("backend = \"redis\"", "cache.redis_url: required with backend = \"redis\" (or set [rate_limit] redis_url to share it)"),
            ("redis_url = \"redis://x\"", "cache.redis_url: set, but backend is \"memory\" (set backend = \"redis\" or remove it)"),
            ("backend = \"redis\"\nredis_url = \"http://x\"", "cache.redis_url: not a valid Redis URL (expected redis://host:port, rediss://host:port or redis+unix:///path)"),
            ("colour = 1", "cache.colour: unknown field `colour`"),
        ] {
            let e = err(&format!("{opted}\n[cache]\n{section}\n"));
            assert!(e.starts_with(expected), "{section}: {e}");
        }
        let when = opted.replace("cache = {}", "cache = { when = \"sometimes\" }");
        assert!(
            err(&when).starts_with("models[0].cache.when: unknown value \"sometimes\""),
            "{}",
            err(&when)
        );
        // A secret in redis_url is never echoed.
        let e = err(&format!(
            "{opted}\n[cache]\nbackend = \"redis\"\nredis_url = \"http://:hunter2@x\"\n"
        ));
        assert!(!e.contains("hunter2"), "{e}");
    }
}
