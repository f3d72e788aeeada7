//! Configuration: parsed once, in two stages, into validated types.
//!
//! 1. The TOML text is parsed into a `toml::Value` and every string is
//!    interpolated (`${VAR}`, `${VAR:-default}`, `$${` for a literal `${`).
//! 2. The interpolated tree is deserialised into the `Raw*` structs
//!    (`deny_unknown_fields`), with `serde_path_to_error` so that an error
//!    names the key path: `upstreams[0].first_byte_timeout: invalid duration "soon"`.
//! 3. `Raw*` is validated into `Config`: cross references, uniqueness and
//!    ranges. Nothing downstream re-checks what this module guarantees.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Deserializer};

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
    ledger: Option<RawLedger>,
    otel: Option<RawOtel>,
    #[serde(default)]
    health: RawHealth,
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
    pub ledger: Option<LedgerConfig>,
    pub otel: Option<OtelConfig>,
    pub health: HealthConfig,
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

impl RawConfig {
    fn validate(self) -> Result<Config, ConfigError> {
        let listen: SocketAddr = self.server.listen.parse().map_err(|_| {
            ConfigError::at(
                "server.listen",
                format!(
                    "invalid address {:?} (expected e.g. \"127.0.0.1:8080\")",
                    self.server.listen
                ),
            )
        })?;
        if self.server.max_body_bytes == 0 {
            return Err(ConfigError::at("server.max_body_bytes", "must be greater than 0"));
        }
        if self.server.max_response_bytes == 0 {
            return Err(ConfigError::at("server.max_response_bytes", "must be greater than 0"));
        }
        let server = ServerConfig {
            listen,
            max_body_bytes: usize::try_from(self.server.max_body_bytes).unwrap_or(usize::MAX),
            max_response_bytes: usize::try_from(self.server.max_response_bytes).unwrap_or(usize::MAX),
            shutdown_grace: self.server.shutdown_grace,
            max_in_flight: self.server.max_in_flight,
            send_timeout: self.server.send_timeout,
            request_body_timeout: self.server.request_body_timeout,
            header_read_timeout: self.server.header_read_timeout,
            keepalive_timeout: self.server.keepalive_timeout,
        };
        if server.max_in_flight == 0 {
            return Err(ConfigError::at("server.max_in_flight", "must be at least 1"));
        }
        all_positive([
            ("server.send_timeout", server.send_timeout),
            ("server.request_body_timeout", server.request_body_timeout),
            ("server.header_read_timeout", server.header_read_timeout),
            ("server.keepalive_timeout", server.keepalive_timeout),
        ])?;

        let r = &self.retry;
        if r.max_attempts == 0 {
            return Err(ConfigError::at(
                "retry.max_attempts",
                "must be at least 1 (1 means no retries)",
            ));
        }
        if r.max_delay < r.base_delay {
            return Err(ConfigError::at("retry.max_delay", "must be at least base_delay"));
        }
        if !(0.0..=1000.0).contains(&r.budget_ratio) || !r.budget_ratio.is_finite() {
            return Err(ConfigError::at("retry.budget_ratio", "must be between 0 and 1000"));
        }
        let retry = RetryConfig {
            max_attempts: r.max_attempts,
            base_delay: r.base_delay,
            max_delay: r.max_delay,
            budget_ratio: r.budget_ratio,
            min_retries_per_second: r.min_retries_per_second,
            retry_after_cap: r.retry_after_cap,
        };
        let breaker = self
            .circuit_breaker
            .resolve(&BreakerConfig::default(), "circuit_breaker")?;

        let admin_key = match self.admin.and_then(|a| a.key) {
            Some(k) if k.expose().is_empty() => {
                return Err(ConfigError::at(
                    "admin.key",
                    "is empty; remove [admin] to turn the admin API off",
                ))
            }
            other => other,
        };

        if self.upstreams.is_empty() {
            return Err(ConfigError::at(
                "upstreams",
                "at least one [[upstreams]] entry is required",
            ));
        }
        let mut upstreams = Vec::with_capacity(self.upstreams.len());
        let mut seen = HashSet::new();
        for (i, u) in self.upstreams.into_iter().enumerate() {
            let at = |key: &str| format!("upstreams[{i}].{key}");
            check_name(&at("name"), &u.name)?;
            if !seen.insert(u.name.clone()) {
                return Err(ConfigError::at(
                    &at("name"),
                    format!("duplicate upstream name {:?}", u.name),
                ));
            }
            let base_url = validate_base_url(&at("base_url"), &u.base_url)?;
            all_positive(
                [
                    ("connect_timeout", u.connect_timeout),
                    ("first_byte_timeout", u.first_byte_timeout),
                    ("idle_timeout", u.idle_timeout),
                    ("request_timeout", u.request_timeout),
                ]
                .map(|(key, d)| (at(key), d)),
            )?;
            if u.first_byte_timeout > u.request_timeout {
                return Err(ConfigError::at(
                    &at("first_byte_timeout"),
                    "is longer than request_timeout, which bounds the whole request",
                ));
            }
            upstreams.push(UpstreamConfig {
                name: u.name,
                base_url,
                api_key: u.api_key.filter(|k| !k.expose().is_empty()),
                connect_timeout: u.connect_timeout,
                first_byte_timeout: u.first_byte_timeout,
                idle_timeout: u.idle_timeout,
                request_timeout: u.request_timeout,
                max_concurrency: u.max_concurrency,
                http_version: u.http_version,
                circuit_breaker: match &u.circuit_breaker {
                    Some(over) => over.resolve(&breaker, &at("circuit_breaker"))?,
                    None => breaker.clone(),
                },
            });
        }
        let upstream_index: HashMap<&str, usize> = upstreams
            .iter()
            .enumerate()
            .map(|(i, u)| (u.name.as_str(), i))
            .collect();

        if self.models.is_empty() {
            return Err(ConfigError::at("models", "at least one [[models]] entry is required"));
        }
        let mut models = Vec::with_capacity(self.models.len());
        let mut seen = HashSet::new();
        for (i, m) in self.models.into_iter().enumerate() {
            let at = |key: &str| format!("models[{i}].{key}");
            check_name(&at("name"), &m.name)?;
            if m.name == crate::telemetry::metrics::OTHER {
                return Err(ConfigError::at(
                    &at("name"),
                    "\"other\" is reserved for unknown models in metrics",
                ));
            }
            if !seen.insert(m.name.clone()) {
                return Err(ConfigError::at(
                    &at("name"),
                    format!("duplicate model name {:?}", m.name),
                ));
            }
            if m.targets.is_empty() {
                return Err(ConfigError::at(&at("targets"), "at least one target is required"));
            }
            let mut targets = Vec::with_capacity(m.targets.len());
            for (j, t) in m.targets.into_iter().enumerate() {
                let at = |key: &str| format!("models[{i}].targets[{j}].{key}");
                let Some(&upstream) = upstream_index.get(t.upstream.as_str()) else {
                    return Err(ConfigError::at(
                        &at("upstream"),
                        format!("unknown upstream {:?} (not in [[upstreams]])", t.upstream),
                    ));
                };
                if t.weight == 0 {
                    return Err(ConfigError::at(&at("weight"), "must be at least 1"));
                }
                let model = t.model.unwrap_or_else(|| m.name.clone());
                if model.is_empty() {
                    return Err(ConfigError::at(&at("model"), "must not be empty"));
                }
                targets.push(TargetConfig {
                    upstream,
                    model,
                    priority: t.priority,
                    weight: t.weight,
                });
            }
            targets.sort_by_key(|t| t.priority);
            if let Some(p) = &m.price {
                let prices = [Some(p.input_per_mtok), Some(p.output_per_mtok), p.cached_input_per_mtok];
                if prices.into_iter().flatten().any(|v| !v.is_finite() || v < 0.0) {
                    return Err(ConfigError::at(&at("price"), "prices must be finite and not negative"));
                }
            }
            let hedge = match m.hedge_after.as_deref().map(str::trim) {
                None => None,
                Some("p95") => Some(Hedge::P95),
                Some(text) => match humantime::parse_duration(text) {
                    Ok(d) if !d.is_zero() => Some(Hedge::After(d)),
                    _ => {
                        return Err(ConfigError::at(
                            &at("hedge_after"),
                            format!("invalid value {text:?} (expected a duration like \"800ms\" or \"p95\")"),
                        ))
                    }
                },
            };
            if hedge.is_some() && targets.len() < 2 {
                return Err(ConfigError::at(
                    &at("hedge_after"),
                    "hedging needs at least two targets",
                ));
            }
            let shadow = match m.shadow {
                None => None,
                Some(sh) => {
                    let Some(&upstream) = upstream_index.get(sh.upstream.as_str()) else {
                        return Err(ConfigError::at(
                            &at("shadow.upstream"),
                            format!("unknown upstream {:?} (not in [[upstreams]])", sh.upstream),
                        ));
                    };
                    if !(0.0..=1.0).contains(&sh.sample) {
                        return Err(ConfigError::at(&at("shadow.sample"), "must be between 0 and 1"));
                    }
                    if sh.max_in_flight == 0 {
                        return Err(ConfigError::at(&at("shadow.max_in_flight"), "must be at least 1"));
                    }
                    Some(ShadowConfig {
                        upstream,
                        model: sh.model.unwrap_or_else(|| m.name.clone()),
                        sample: sh.sample,
                        max_in_flight: sh.max_in_flight,
                        price: sh.price.or(m.price),
                    })
                }
            };
            models.push(ModelConfig {
                name: m.name,
                targets,
                price: m.price,
                hedge,
                shadow,
            });
        }

        let mut keys = Vec::with_capacity(self.keys.len());
        let mut seen = HashSet::new();
        for (i, k) in self.keys.into_iter().enumerate() {
            let at = |key: &str| format!("keys[{i}].{key}");
            check_name(&at("name"), &k.name)?;
            if !seen.insert(k.name.clone()) {
                return Err(ConfigError::at(&at("name"), format!("duplicate key name {:?}", k.name)));
            }
            if k.key.expose().len() < 8 {
                return Err(ConfigError::at(&at("key"), "is shorter than 8 characters"));
            }
            keys.push(KeyConfig {
                name: k.name,
                key: k.key,
            });
        }
        let mut secrets = HashSet::new();
        if keys.iter().any(|k| !secrets.insert(k.key.expose())) {
            return Err(ConfigError::at("keys", "two client keys have the same secret"));
        }

        let (rate_limit, rate_limits) =
            crate::ratelimit::validate(self.rate_limit, self.rate_limits).map_err(ConfigError::new)?;
        crate::ratelimit::check_matches(&rate_limits, |scope, name| match scope {
            crate::ratelimit::Scope::Key => keys.iter().any(|k| k.name == name),
            crate::ratelimit::Scope::Model => models.iter().any(|m| m.name == name),
            crate::ratelimit::Scope::Upstream => upstreams.iter().any(|u| u.name == name),
            crate::ratelimit::Scope::Global => true,
        })
        .map_err(ConfigError::new)?;

        let ledger = match self.ledger {
            None => None,
            Some(l) if l.path.as_os_str().is_empty() => {
                return Err(ConfigError::at(
                    "ledger.path",
                    "must not be empty; remove [ledger] to turn it off",
                ))
            }
            Some(l) => Some(LedgerConfig {
                path: l.path,
                capacity: l.capacity.max(1),
            }),
        };
        let otel = match self.otel {
            None => None,
            Some(o) => {
                crate::telemetry::otel::check_endpoint(&o.endpoint).map_err(|e| ConfigError::at("otel.endpoint", e))?;
                Some(OtelConfig {
                    endpoint: o.endpoint,
                    service_name: o.service_name,
                })
            }
        };
        let h = self.health;
        if h.window < Duration::from_secs(20) {
            return Err(ConfigError::at("health.window", "must be at least 20s"));
        }
        for (key, v) in [
            ("degraded_below", h.degraded_below),
            ("unhealthy_below", h.unhealthy_below),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return Err(ConfigError::at(&format!("health.{key}"), "must be between 0 and 1"));
            }
        }
        if h.unhealthy_below > h.degraded_below {
            return Err(ConfigError::at(
                "health.unhealthy_below",
                "must not be above degraded_below",
            ));
        }
        let health = HealthConfig {
            window: h.window,
            degraded_below: h.degraded_below,
            unhealthy_below: h.unhealthy_below,
        };

        Ok(Config {
            server,
            admin_key,
            upstreams,
            models,
            keys,
            retry,
            rate_limit,
            rate_limits,
            ledger,
            otel,
            health,
        })
    }
}

fn check_name(path: &str, name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '/'));
    if ok {
        Ok(())
    } else {
        Err(ConfigError::at(
            path,
            format!("invalid name {name:?} (1-{MAX_NAME_LEN} characters of A-Z a-z 0-9 - _ . : /)"),
        ))
    }
}

/// Every duration greater than zero, or an error at the first key that is not.
fn all_positive<K: AsRef<str>>(durations: impl IntoIterator<Item = (K, Duration)>) -> Result<(), ConfigError> {
    for (key, d) in durations {
        if d.is_zero() {
            return Err(ConfigError::at(key.as_ref(), "must be greater than 0"));
        }
    }
    Ok(())
}

fn validate_base_url(path: &str, url: &str) -> Result<String, ConfigError> {
    let parsed = reqwest::Url::parse(url).map_err(|e| ConfigError::at(path, format!("invalid URL {url:?}: {e}")))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
        return Err(ConfigError::at(
            path,
            format!("invalid URL {url:?}: expected http:// or https:// with a host"),
        ));
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err(ConfigError::at(path, "must not have a query or fragment"));
    }
    let base = url.trim_end_matches('/');
    // The upstream client takes an `http::Uri`, which is stricter than a URL
    // parser (it takes no raw non-ASCII, for one).
    if http::Uri::try_from(format!("{base}/chat/completions")).is_err() {
        return Err(ConfigError::at(
            path,
            format!("invalid URL {url:?}: not a valid HTTP URI (write a non-ASCII host in punycode, xn--…)"),
        ));
    }
    Ok(base.to_owned())
}

// ---------------------------------------------------------------------------
// Stage 1: interpolation.
// ---------------------------------------------------------------------------

fn interpolate_value(
    value: &mut toml::Value,
    path: &mut String,
    lookup: &impl Fn(&str) -> Option<String>,
) -> Result<(), ConfigError> {
    match value {
        toml::Value::String(s) if s.contains('$') => {
            *s = interpolate(s, lookup).map_err(|m| ConfigError::at(path, m))?;
        }
        toml::Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                interpolate_value(item, path, lookup)?;
                path.truncate(len);
            }
        }
        toml::Value::Table(table) => {
            for (key, item) in table.iter_mut() {
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(key);
                interpolate_value(item, path, lookup)?;
                path.truncate(len);
            }
        }
        _ => {}
    }
    Ok(())
}

/// Expands `${VAR}` and `${VAR:-default}`; `$${` is a literal `${`. A `$` not
/// followed by `{` is kept as it is, so keys containing `$` need no escaping.
pub fn interpolate(text: &str, lookup: &impl Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(lit) = after.strip_prefix("${") {
            out.push_str("${");
            rest = lit;
        } else if let Some(body) = after.strip_prefix('{') {
            let end = body
                .find('}')
                .ok_or_else(|| "unterminated ${...} (missing '}')".to_string())?;
            let expr = &body[..end];
            let (name, default) = match expr.split_once(":-") {
                Some((n, d)) => (n, Some(d)),
                None => (expr, None),
            };
            let valid = !name.is_empty()
                && !name.starts_with(|c: char| c.is_ascii_digit())
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                return Err(format!("invalid variable name {name:?} in ${{...}}"));
            }
            match (lookup(name), default) {
                (Some(v), _) => out.push_str(&v),
                (None, Some(d)) => out.push_str(d),
                (None, None) => {
                    return Err(format!(
                        "environment variable {name} is not set (use ${{{name}:-default}} for a default)"
                    ))
                }
            }
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
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
}
