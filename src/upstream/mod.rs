//! The upstream client: one pooled HTTP client per upstream, and one
//! attempt = one HTTP exchange, with its first-byte and total deadlines.
//!
//! An attempt ends in one of two ways:
//! - `Reply::Full`: a complete, buffered body (JSON answers and all errors);
//! - `Reply::Stream`: SSE whose first whole event has already arrived. A
//!   stream is committed only then, so everything before it (connect errors,
//!   bad statuses, a silent upstream) is still an ordinary attempt failure.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode, Uri};
use http_body_util::BodyExt;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::config::UpstreamConfig;
use crate::error::{GatewayError, TimeoutKind};
use crate::request::Endpoint;
use crate::sse::{BodyError, ReadError, SseReader};
use crate::telemetry::metrics::{ErrorType, Metrics, UpstreamMetrics};
use crate::telemetry::window::Window;
use crate::upstream::breaker::Breaker;
use crate::usage::{self, Usage};

pub mod breaker;
mod pool;
pub use pool::{Body, BodyFailed, OutBody, Pool, SendError, Unsent};

pub struct Upstream {
    pub name: Arc<str>,
    /// Position in `Config::upstreams`.
    pub index: usize,
    pub config: UpstreamConfig,
    /// Health that outlives a config reload: breaker, 429 cooldown, latency.
    pub state: Arc<UpstreamState>,
    /// `max_concurrency`, when set.
    pub limit: Option<Arc<Semaphore>>,
    /// `base_url` + each routed endpoint's path, parsed once at config load.
    uris: [Uri; 4],
    /// The host of `base_url` (for traces and admin output; never the key).
    pub host: String,
    /// Attempt metrics, resolved at config load.
    pub metrics: Arc<UpstreamMetrics>,
    /// Keep-alive HTTP/1.1 or shared HTTP/2 connections (`pool`).
    pool: Pool,
    /// `Bearer <api_key>`, marked sensitive so it never shows in debug output.
    authorization: Option<HeaderValue>,
}

/// What relaygate knows about an upstream's health, kept across reloads.
pub struct UpstreamState {
    pub breaker: Arc<Breaker>,
    base: Instant,
    /// A 429 asked us to leave this upstream alone until then (ms since `base`).
    cooldown_until: AtomicU64,
    /// Recent time-to-first-byte samples, for `hedge_after = "p95"`.
    pub first_byte: LatencyRing,
    /// Requests this upstream answered, for `/health`.
    pub window: Window,
}

impl UpstreamState {
    pub fn new(breaker: Arc<Breaker>, health_window: Duration) -> Self {
        Self {
            breaker,
            base: Instant::now(),
            cooldown_until: AtomicU64::new(0),
            first_byte: LatencyRing::default(),
            window: Window::new(health_window),
        }
    }

    pub fn cool_for(&self, d: Duration) {
        let until = (self.base.elapsed() + d).as_millis() as u64;
        self.cooldown_until.fetch_max(until, Ordering::AcqRel);
    }

    /// Time left on a 429 cooldown (zero when none).
    pub fn cooldown(&self) -> Duration {
        let until = self.cooldown_until.load(Ordering::Acquire);
        if until == 0 {
            // Never cooled (or cleared): no clock read, on every pick of every target.
            return Duration::ZERO;
        }
        let now = self.base.elapsed().as_millis() as u64;
        if until <= now {
            // Over: back to the fast path (a newer cooldown wins the race).
            let _ = self
                .cooldown_until
                .compare_exchange(until, 0, Ordering::AcqRel, Ordering::Acquire);
        }
        Duration::from_millis(until.saturating_sub(now))
    }

    pub fn clear_cooldown(&self) {
        self.cooldown_until.store(0, Ordering::Release);
    }
}

/// The last `N` latencies, lock-free; good enough for a p95 that decides
/// when to hedge. Written by hand because a histogram crate would need a
/// lock or a per-thread merge for the same answer.
pub struct LatencyRing {
    samples: Box<[AtomicU32]>,
    next: AtomicUsize,
}

const RING: usize = 512;
/// Fewer samples than this and the p95 is not trusted (no hedge).
pub const MIN_SAMPLES: usize = 20;

impl Default for LatencyRing {
    fn default() -> Self {
        Self {
            samples: (0..RING).map(|_| AtomicU32::new(0)).collect(),
            next: AtomicUsize::new(0),
        }
    }
}

impl LatencyRing {
    pub fn record(&self, d: Duration) {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        let micros = u32::try_from(d.as_micros()).unwrap_or(u32::MAX).max(1);
        self.samples[i % RING].store(micros, Ordering::Relaxed);
    }

    pub fn p95(&self) -> Option<Duration> {
        let n = self.next.load(Ordering::Relaxed).min(RING);
        if n < MIN_SAMPLES {
            return None;
        }
        let mut v: Vec<u32> = self
            .samples
            .iter()
            .map(|s| s.load(Ordering::Relaxed))
            .filter(|&m| m > 0)
            .collect();
        if v.len() < MIN_SAMPLES {
            return None;
        }
        // Nearest rank: the smallest sample with at least 95% at or below it.
        let rank = (v.len() * 95).div_ceil(100) - 1;
        let (_, p95, _) = v.select_nth_unstable(rank);
        Some(Duration::from_micros(u64::from(*p95)))
    }
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// One request to send upstream.
pub struct Attempt {
    pub endpoint: Endpoint,
    pub body: Bytes,
    /// Client headers that may be forwarded (see `forwardable_headers`).
    pub headers: HeaderMap,
    pub stream: bool,
    /// Covers this attempt and everything after it (`request_timeout`).
    pub deadline: Instant,
}

pub enum Reply {
    Full {
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
        usage: Option<Usage>,
    },
    Stream {
        status: StatusCode,
        headers: HeaderMap,
        first: Bytes,
        reader: SseReader,
    },
}

/// A failed attempt: the error the client would see, and how to count it.
#[derive(Debug)]
pub struct AttemptError {
    pub error: GatewayError,
    pub error_type: ErrorType,
    pub status: Option<u16>,
    /// The upstream's index, once known.
    pub upstream: Option<usize>,
}

impl AttemptError {
    /// The breaker refused: no upstream call was made.
    pub fn circuit_open(upstream: usize, retry_after: Duration) -> Self {
        Self {
            error: GatewayError::CircuitOpen { retry_after },
            error_type: ErrorType::CircuitOpen,
            status: None,
            upstream: Some(upstream),
        }
    }

    /// The upstream's `max_concurrency` is reached: no upstream call was made.
    pub fn overloaded(upstream: usize) -> Self {
        Self {
            error: GatewayError::Overloaded,
            error_type: ErrorType::Overloaded,
            status: None,
            upstream: Some(upstream),
        }
    }
}

/// TLS for upstreams: the webpki roots, ring, TLS 1.2 and 1.3. No ALPN: the
/// pool sets it from `http_version` (h2, http/1.1).
pub fn tls_config() -> Result<rustls::ClientConfig, rustls::Error> {
    let roots = rustls::RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    Ok(
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

pub const USER_AGENT: HeaderValue = HeaderValue::from_static(concat!("relaygate/", env!("CARGO_PKG_VERSION")));
const APPLICATION_JSON: HeaderValue = HeaderValue::from_static("application/json");

/// `Authorization: Bearer <api_key>`, marked sensitive.
pub fn authorization_header(config: &UpstreamConfig) -> Option<HeaderValue> {
    let key = config.api_key.as_ref()?;
    let mut v = HeaderValue::from_str(&format!("Bearer {}", key.expose())).ok()?;
    v.set_sensitive(true);
    Some(v)
}

/// How long an upstream's 429 asks us to wait: `retry-after-ms`, then
/// `Retry-After` (seconds or an HTTP date), then OpenAI's
/// `x-ratelimit-reset-requests` / `-tokens` (the longer of the two). A
/// value that does not parse is ignored.
pub fn retry_after_hint(headers: &HeaderMap) -> Option<Duration> {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
    if let Some(ms) = text("retry-after-ms").and_then(|v| v.parse::<f64>().ok()) {
        if ms.is_finite() && ms >= 0.0 {
            return Some(Duration::from_secs_f64((ms / 1000.0).min(86_400.0)));
        }
    }
    if let Some(v) = text("retry-after") {
        if let Ok(secs) = v.parse::<f64>() {
            if secs.is_finite() && secs >= 0.0 {
                return Some(Duration::from_secs_f64(secs.min(86_400.0)));
            }
        } else if let Ok(at) = httpdate::parse_http_date(v) {
            return Some(
                at.duration_since(std::time::SystemTime::now())
                    .unwrap_or(Duration::ZERO),
            );
        }
    }
    ["x-ratelimit-reset-requests", "x-ratelimit-reset-tokens"]
        .into_iter()
        .filter_map(|h| text(h).and_then(|v| humantime::parse_duration(v).ok()))
        .max()
}

impl Upstream {
    pub fn new(
        config: UpstreamConfig,
        index: usize,
        state: Arc<UpstreamState>,
        metrics: &Metrics,
    ) -> Result<Self, rustls::Error> {
        let uri = |e: Endpoint| {
            // base_url was validated as an http(s) URL when the config loaded.
            Uri::try_from(format!("{}{}", config.base_url, e.upstream_path())).expect("validated base_url")
        };
        let uris = Endpoint::ROUTED.map(uri);
        Ok(Self {
            name: Arc::from(config.name.as_str()),
            index,
            host: uris[0].host().unwrap_or_default().to_owned(),
            metrics: Arc::new(UpstreamMetrics::new(metrics, &config.name)),
            uris,
            pool: Pool::new(&config, tls_config()?)?,
            authorization: authorization_header(&config),
            limit: (config.max_concurrency > 0).then(|| Arc::new(Semaphore::new(config.max_concurrency))),
            state,
            config,
        })
    }

    /// Whether a new attempt could go here now: breaker, 429 cooldown and
    /// concurrency all allow it.
    pub fn available(&self) -> bool {
        self.healthy() && self.has_capacity()
    }

    /// Whether its breaker and 429 cooldown allow an attempt now.
    pub fn healthy(&self) -> bool {
        self.state.breaker.available() && self.state.cooldown().is_zero()
    }

    /// Whether `max_concurrency` has a slot free now.
    pub fn has_capacity(&self) -> bool {
        self.limit.as_ref().is_none_or(|l| l.available_permits() > 0)
    }

    /// Sends one attempt and reads it up to the point where it can no longer
    /// fail over: the whole body, or a stream's first event.
    pub async fn send(&self, attempt: Attempt, max_response_bytes: usize) -> Result<Reply, AttemptError> {
        self.send_timed(attempt, max_response_bytes, &mut None).await
    }

    /// `send`, noting when the response headers arrived in `headers_at`
    /// (a plain answer's time to first byte, for latency routing).
    pub async fn send_timed(
        &self,
        attempt: Attempt,
        max_response_bytes: usize,
        headers_at: &mut Option<Instant>,
    ) -> Result<Reply, AttemptError> {
        let first_byte_at = (Instant::now() + self.config.first_byte_timeout).min(attempt.deadline);
        let timeout_kind = |at: Instant| {
            if at < attempt.deadline {
                TimeoutKind::FirstByte
            } else {
                TimeoutKind::Request
            }
        };

        let mut request = Request::new(OutBody::from(attempt.body));
        *request.method_mut() = Method::POST;
        *request.uri_mut() = self.uris[attempt.endpoint as usize].clone();
        let headers = request.headers_mut();
        *headers = attempt.headers;
        headers.insert(header::CONTENT_TYPE, APPLICATION_JSON);
        headers.insert(header::USER_AGENT, USER_AGENT);
        if let Some(auth) = &self.authorization {
            headers.insert(header::AUTHORIZATION, auth.clone());
        }

        let response = match tokio::time::timeout_at(first_byte_at, self.pool.send(request)).await {
            Err(_) => return Err(self.timeout(timeout_kind(first_byte_at), None)),
            Ok(Err(e)) if e.is_connect() => {
                return Err(self.fail(
                    GatewayError::UpstreamConnect { upstream: self.name() },
                    ErrorType::Connect,
                    None,
                ))
            }
            Ok(Err(_)) => {
                return Err(self.fail(
                    GatewayError::UpstreamReset { upstream: self.name() },
                    ErrorType::Reset,
                    None,
                ))
            }
            Ok(Ok(r)) => r,
        };
        *headers_at = Some(Instant::now());

        let status = response.status();
        let (parts, body) = response.into_parts();
        let headers = response_headers(parts.headers);
        let is_sse = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        let mut body = body.into_data_stream().map(|r| r.map_err(|_| BodyError)).boxed();

        if attempt.stream && status.is_success() && is_sse {
            let mut reader = SseReader::new(body);
            return match tokio::time::timeout_at(first_byte_at, reader.next_batch()).await {
                Err(_) => Err(self.timeout(timeout_kind(first_byte_at), Some(status.as_u16()))),
                Ok(Ok(Some(first))) => Ok(Reply::Stream {
                    status,
                    headers,
                    first,
                    reader,
                }),
                Ok(Ok(None)) | Ok(Err(ReadError::Truncated)) | Ok(Err(ReadError::EventTooLarge)) => Err(self.fail(
                    GatewayError::UpstreamMalformed {
                        upstream: self.name(),
                        detail: "the stream ended before its first event",
                    },
                    ErrorType::Malformed,
                    Some(status.as_u16()),
                )),
                Ok(Err(ReadError::Reset)) => Err(self.fail(
                    GatewayError::UpstreamReset { upstream: self.name() },
                    ErrorType::Reset,
                    Some(status.as_u16()),
                )),
            };
        }

        // A buffered body: bounded in size, and by idle gaps and the deadline.
        // A body that arrives in one chunk (the usual case) is kept as that
        // chunk; only a body in several is copied together.
        let mut single: Option<Bytes> = None;
        let mut buf = BytesMut::new();
        loop {
            let idle_at = (Instant::now() + self.config.idle_timeout).min(attempt.deadline);
            match tokio::time::timeout_at(idle_at, body.next()).await {
                Err(_) => {
                    let kind = if idle_at < attempt.deadline {
                        TimeoutKind::Idle
                    } else {
                        TimeoutKind::Request
                    };
                    return Err(self.timeout(kind, Some(status.as_u16())));
                }
                Ok(Some(Ok(chunk))) => {
                    let so_far = single.as_ref().map_or(buf.len(), Bytes::len);
                    if so_far + chunk.len() > max_response_bytes {
                        return Err(self.fail(
                            GatewayError::UpstreamMalformed {
                                upstream: self.name(),
                                detail: "the response is larger than server.max_response_bytes",
                            },
                            ErrorType::Malformed,
                            Some(status.as_u16()),
                        ));
                    }
                    if single.is_none() && buf.is_empty() {
                        single = Some(chunk);
                    } else {
                        if let Some(first) = single.take() {
                            buf.extend_from_slice(&first);
                        }
                        buf.extend_from_slice(&chunk);
                    }
                }
                Ok(Some(Err(BodyError))) => {
                    return Err(self.fail(
                        GatewayError::UpstreamReset { upstream: self.name() },
                        ErrorType::Reset,
                        Some(status.as_u16()),
                    ))
                }
                Ok(None) => break,
            }
        }
        let body = single.unwrap_or_else(|| buf.freeze());
        let parsed = usage::from_json(&body);

        if status.is_success() {
            return match parsed {
                Ok(usage) => Ok(Reply::Full {
                    status,
                    headers,
                    body,
                    usage,
                }),
                Err(_) => Err(self.fail(
                    GatewayError::UpstreamMalformed {
                        upstream: self.name(),
                        detail: "the body is not JSON",
                    },
                    ErrorType::Malformed,
                    Some(status.as_u16()),
                )),
            };
        }
        let error_type = ErrorType::of_status(status.as_u16());
        if error_type == ErrorType::Auth {
            tracing::warn!(
                upstream = %self.name,
                status = status.as_u16(),
                "upstream rejected relaygate's credentials: check upstreams.api_key for this upstream"
            );
        }
        if status.is_client_error() || parsed.is_ok() {
            // Upstream 4xx, and 5xx with a JSON error body, pass through as
            // sent; the caller classifies them by status.
            return Ok(Reply::Full {
                status,
                headers,
                body,
                usage: None,
            });
        }
        // A 5xx with an HTML or empty body: replace it with an OpenAI-shaped 502.
        Err(self.fail(
            GatewayError::UpstreamStatus {
                upstream: self.name(),
                status: status.as_u16(),
            },
            error_type,
            Some(status.as_u16()),
        ))
    }

    fn name(&self) -> String {
        self.name.to_string()
    }

    /// One pass-through exchange (`gateway::passthrough`): the client's
    /// method, `/v1` path and query on this upstream's `base_url`, its
    /// headers as `passthrough_headers` left them, and this upstream's key.
    /// No deadline here: the caller holds the clock.
    pub async fn send_passthrough(
        &self,
        method: Method,
        path_and_query: &str,
        headers: HeaderMap,
        body: OutBody,
    ) -> Result<http::Response<Body>, Unsent> {
        let suffix = path_and_query.strip_prefix("/v1").unwrap_or(path_and_query);
        let mut request = Request::new(body);
        *request.method_mut() = method;
        // base_url was validated and the path came in a parsed request URI.
        if let Ok(uri) = Uri::try_from(format!("{}{suffix}", self.config.base_url)) {
            *request.uri_mut() = uri;
        }
        *request.headers_mut() = headers;
        request.headers_mut().insert(header::USER_AGENT, USER_AGENT);
        if let Some(auth) = &self.authorization {
            request.headers_mut().insert(header::AUTHORIZATION, auth.clone());
        }
        self.pool.send_or_return(request).await
    }

    fn fail(&self, error: GatewayError, error_type: ErrorType, status: Option<u16>) -> AttemptError {
        AttemptError {
            error,
            error_type,
            status,
            upstream: Some(self.index),
        }
    }

    fn timeout(&self, kind: TimeoutKind, status: Option<u16>) -> AttemptError {
        self.fail(
            GatewayError::UpstreamTimeout {
                upstream: self.name(),
                kind,
            },
            ErrorType::Timeout,
            status,
        )
    }
}

/// Hop-by-hop headers (RFC 9110 §7.6.1), never forwarded in either direction.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// The header names a message's `Connection` headers list (RFC 9110
/// §7.6.1): hop-by-hop too. Every `Connection` line counts, not only the
/// first (a client may send `Connection: keep-alive` and `Connection: X-Foo`).
fn connection_listed(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Client headers to send upstream: everything but hop-by-hop headers, the
/// client's credentials (the upstream key is injected instead), and headers
/// relaygate sets itself.
pub fn forwardable_headers(client: &HeaderMap) -> HeaderMap {
    let has_connection = client.contains_key(header::CONNECTION);
    let mut out = HeaderMap::with_capacity(client.len());
    for (name, value) in client {
        let drop = HOP_BY_HOP.contains(name)
            || (has_connection && connection_listed(client).any(|t| t.eq_ignore_ascii_case(name.as_str())))
            || matches!(
                name.as_str(),
                "authorization"
                    | "api-key"
                    | "x-api-key"
                    | "cookie"
                    | "host"
                    | "content-length"
                    | "content-type"
                    | "accept-encoding"
                    | "user-agent"
                    | "expect"
            );
        if !drop {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

/// Client headers for a pass-through request: `forwardable_headers`, and
/// the body's own headers back (its type, with a multipart boundary, and
/// length), and `accept-encoding`: relaygate does not read the answer, so
/// it may come compressed.
pub fn passthrough_headers(client: &HeaderMap) -> HeaderMap {
    let mut out = forwardable_headers(client);
    for name in [header::CONTENT_TYPE, header::CONTENT_LENGTH, header::ACCEPT_ENCODING] {
        for value in client.get_all(&name) {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

/// Upstream response headers to pass to the client: everything but
/// hop-by-hop headers, the length (the server recomputes it), cookies (the
/// relay's session is not the app's), and the upstream's request id, which
/// is kept as `x-upstream-request-id` because relaygate sets its own.
/// Edits the upstream's map in place: rebuilding it showed in the profile.
pub fn response_headers(mut headers: HeaderMap) -> HeaderMap {
    // Names as constants: `remove(&str)` would parse each one per response.
    const ALSO_DROPPED: [HeaderName; 5] = [
        header::CONTENT_LENGTH,
        header::SET_COOKIE,
        header::DATE,
        header::SERVER,
        HeaderName::from_static("alt-svc"),
    ];
    // One `Connection` line at a time (a cheap clone of its bytes), since
    // removing what it lists needs the map mutably; no allocation.
    let mut line = 0;
    while let Some(value) = headers.get_all(header::CONNECTION).iter().nth(line).cloned() {
        for name in value.to_str().unwrap_or_default().split(',') {
            headers.remove(name.trim());
        }
        line += 1;
    }
    for name in HOP_BY_HOP.iter().chain(&ALSO_DROPPED) {
        headers.remove(name);
    }
    if let Some(id) = headers.remove(X_REQUEST_ID) {
        headers.insert(X_UPSTREAM_REQUEST_ID, id);
    }
    headers
}

const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const X_UPSTREAM_REQUEST_ID: HeaderName = HeaderName::from_static("x-upstream-request-id");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_hints() {
        let h = |pairs: &[(&'static str, &'static str)]| {
            let mut m = HeaderMap::new();
            for (k, v) in pairs {
                m.insert(*k, HeaderValue::from_static(v));
            }
            retry_after_hint(&m)
        };
        assert_eq!(h(&[("retry-after", "2")]), Some(Duration::from_secs(2)));
        assert_eq!(h(&[("retry-after", "1.5")]), Some(Duration::from_millis(1500)));
        assert_eq!(
            h(&[("retry-after-ms", "250"), ("retry-after", "9")]),
            Some(Duration::from_millis(250))
        );
        assert_eq!(
            h(&[("retry-after", "Wed, 21 Oct 2015 07:28:00 GMT")]),
            Some(Duration::ZERO),
            "a past date"
        );
        assert_eq!(
            h(&[
                ("x-ratelimit-reset-requests", "1s"),
                ("x-ratelimit-reset-tokens", "6m0s")
            ]),
            Some(Duration::from_secs(360))
        );
        assert_eq!(h(&[("retry-after", "soon")]), None, "garbage is ignored");
        assert_eq!(h(&[("retry-after", "-3")]), None);
        assert_eq!(h(&[]), None);
    }

    #[test]
    fn p95_is_nearest_rank() {
        let ring = LatencyRing::default();
        for ms in 1..=19 {
            ring.record(Duration::from_millis(ms));
        }
        assert_eq!(ring.p95(), None, "too few samples");
        ring.record(Duration::from_millis(20));
        // 20 samples: rank ceil(0.95 * 20) = 19 → 19 ms.
        assert_eq!(ring.p95(), Some(Duration::from_millis(19)));
        for _ in 0..1000 {
            ring.record(Duration::from_millis(100));
        }
        assert_eq!(ring.p95(), Some(Duration::from_millis(100)));
    }

    #[test]
    fn strips_credentials_and_hop_by_hop() {
        let mut h = HeaderMap::new();
        h.insert("authorization", HeaderValue::from_static("Bearer client-secret"));
        h.insert("x-api-key", HeaderValue::from_static("client-secret"));
        h.insert("connection", HeaderValue::from_static("keep-alive, x-custom-hop"));
        h.append("connection", HeaderValue::from_static("X-Second-Hop"));
        h.insert("x-custom-hop", HeaderValue::from_static("1"));
        h.insert("x-second-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("openai-beta", HeaderValue::from_static("assistants=v2"));
        h.insert("x-request-id", HeaderValue::from_static("abc"));
        let out = forwardable_headers(&h);
        let names: Vec<_> = out.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, vec!["openai-beta", "x-request-id"]);
    }

    #[test]
    fn response_headers_keep_rate_limit_info() {
        let mut h = HeaderMap::new();
        h.insert("content-type", HeaderValue::from_static("application/json"));
        h.insert("x-ratelimit-remaining-requests", HeaderValue::from_static("9"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("set-cookie", HeaderValue::from_static("__cf_bm=1"));
        h.insert("x-request-id", HeaderValue::from_static("up-1"));
        h.insert("connection", HeaderValue::from_static("keep-alive, X-Hop"));
        h.append("connection", HeaderValue::from_static("x-other-hop"));
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert("x-other-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.append("set-cookie", HeaderValue::from_static("b=2"));
        let out = response_headers(h);
        assert_eq!(out.len(), 3, "{out:?}");
        assert_eq!(out["x-upstream-request-id"], "up-1");
        assert!(out.contains_key("x-ratelimit-remaining-requests"));
    }
}
