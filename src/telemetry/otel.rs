//! Optional OpenTelemetry trace export: one SERVER span per client request and
//! one CLIENT span per upstream attempt, with the GenAI semantic-convention
//! attributes, plus W3C trace-context propagation (`traceparent`).
//!
//! # Why not `opentelemetry-otlp`
//! That crate pulls tonic, prost and about a hundred more crates into a
//! two-core build, for what is a few `POST`s a second. This module speaks
//! OTLP/HTTP with the JSON encoding instead: `POST {endpoint}/v1/traces` with
//! `Content-Type: application/json`, the body an `ExportTraceServiceRequest`
//! in protobuf's canonical JSON mapping, with OTLP/JSON's exceptions (trace and
//! span ids as lowercase hex, enums as integers, 64-bit integers as decimal
//! strings). OTLP/HTTP+JSON is a stable part of the OTLP specification
//! (<https://opentelemetry.io/docs/specs/otlp/#otlphttp>), and every collector
//! that accepts OTLP/HTTP accepts it. The endpoint is the collector's HTTP
//! port (4318 by convention), not its gRPC port (4317).
//!
//! # The exporter
//! `Exporter::export` is a `try_send` into a bounded queue: it never blocks or
//! awaits. When the queue is full the span is dropped and counted
//! (`dropped()`). One background task takes up to `max_batch` requests per
//! `POST`, waiting up to `linger` for a batch to fill, and sends with a short
//! timeout. A failed batch is dropped and counted (`failed()`), with a warning
//! at most once per 10 s: a collector that is down must cost the gateway
//! nothing but lost spans. `shutdown()` sends what is queued, bounded by a
//! timeout, then stops the task.
//!
//! # Sampling
//! Parent-based: a request whose incoming `traceparent` has the sampled flag
//! clear is not exported (and not counted as dropped), and the flag is passed
//! on upstream. A request without a valid `traceparent` starts a sampled trace.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, HeaderValue};
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio::task::AbortHandle;
use tokio::time::Instant;

/// The W3C trace-context request header.
pub const TRACEPARENT: &str = "traceparent";

/// OTLP `SpanKind`.
const KIND_SERVER: u8 = 2;
const KIND_CLIENT: u8 = 3;
/// OTLP `StatusCode`.
const STATUS_OK: u8 = 1;
const STATUS_ERROR: u8 = 2;

/// The length of a version-00 `traceparent`: 2 + 1 + 32 + 1 + 16 + 1 + 2.
const TRACEPARENT_LEN: usize = 55;

/// At most one export-failure warning per this interval.
const WARN_INTERVAL: Duration = Duration::from_secs(10);

/// W3C trace context: parse an incoming `traceparent` header
/// (`00-<32 hex trace id>-<16 hex span id>-<2 hex flags>`), make new ids, and
/// format the header to send upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: [u8; 16],
    /// The caller's span, if it sent a valid `traceparent`: our request span's parent.
    pub parent_span_id: Option<[u8; 8]>,
    pub sampled: bool,
}

impl TraceContext {
    /// A valid incoming `traceparent` continues that trace (its span id
    /// becomes our parent, its sampled flag is kept); otherwise a new random
    /// trace id, no parent, sampled. Several `traceparent` headers are
    /// invalid, as the spec says.
    pub fn from_headers(headers: &HeaderMap) -> TraceContext {
        let mut values = headers.get_all(TRACEPARENT).iter();
        let incoming = match (values.next(), values.next()) {
            (Some(v), None) => v.to_str().ok().and_then(parse_traceparent),
            _ => None,
        };
        incoming.unwrap_or_else(TraceContext::new_root)
    }

    /// A new sampled trace with no parent.
    pub fn new_root() -> TraceContext {
        TraceContext {
            trace_id: new_trace_id(),
            parent_span_id: None,
            sampled: true,
        }
    }

    /// The `traceparent` for a child span with this id (version 00; the
    /// sampled flag is ours, passed on).
    pub fn traceparent(&self, span_id: [u8; 8]) -> HeaderValue {
        let flags = if self.sampled { "01" } else { "00" };
        let value = format!("00-{}-{}-{flags}", hex(&self.trace_id), hex(&span_id));
        HeaderValue::from_str(&value).expect("hex and dashes are a valid header value")
    }
}

/// Parses a `traceparent` value per W3C Trace Context level 1: version `ff`
/// is invalid; version 00 is exactly 55 characters; a later version may be
/// longer, its extra fields after a `-` ignored. Hex must be lowercase, and
/// all-zero trace or span ids are invalid.
fn parse_traceparent(value: &str) -> Option<TraceContext> {
    let b = value.trim_matches([' ', '\t']).as_bytes();
    if b.len() < TRACEPARENT_LEN || b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
        return None;
    }
    let [version] = parse_hex::<1>(&b[0..2])?;
    match version {
        0xff => return None,
        0 if b.len() != TRACEPARENT_LEN => return None,
        _ if b.len() > TRACEPARENT_LEN && b[TRACEPARENT_LEN] != b'-' => return None,
        _ => {}
    }
    let trace_id = parse_hex::<16>(&b[3..35])?;
    let span_id = parse_hex::<8>(&b[36..52])?;
    let [flags] = parse_hex::<1>(&b[53..55])?;
    if trace_id == [0; 16] || span_id == [0; 8] {
        return None;
    }
    Some(TraceContext {
        trace_id,
        parent_span_id: Some(span_id),
        sampled: flags & 0x01 != 0,
    })
}

/// Lowercase hex only: `traceparent` and OTLP/JSON both spell ids that way.
fn parse_hex<const N: usize>(text: &[u8]) -> Option<[u8; N]> {
    fn nibble(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        }
    }
    if text.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (byte, pair) in out.iter_mut().zip(text.chunks_exact(2)) {
        *byte = (nibble(pair[0])? << 4) | nibble(pair[1])?;
    }
    Some(out)
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(2 * bytes.len());
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 0x0f)] as char);
    }
    s
}

/// A random span id, never all-zero (which the spec reserves for "invalid").
/// fastrand is not a CSPRNG; ids need to be unique, not secret.
pub fn new_span_id() -> [u8; 8] {
    loop {
        let id = fastrand::u64(..);
        if id != 0 {
            return id.to_be_bytes();
        }
    }
}

/// A random trace id, never all-zero.
pub fn new_trace_id() -> [u8; 16] {
    loop {
        let id = fastrand::u128(..);
        if id != 0 {
            return id.to_be_bytes();
        }
    }
}

/// One upstream attempt, finished.
#[derive(Debug, Clone)]
pub struct AttemptSpan {
    pub span_id: [u8; 8],
    /// The upstream's config name.
    pub upstream: String,
    pub upstream_model: String,
    /// The host of the upstream's `base_url`.
    pub server_address: String,
    pub start: SystemTime,
    pub end: SystemTime,
    /// The upstream's HTTP status, if a response arrived.
    pub status: Option<u16>,
    /// A closed set (`metrics::ErrorType::as_str`, e.g. "timeout"); `None` on success.
    pub error_type: Option<String>,
}

/// One client request, finished, with its attempts.
#[derive(Debug, Clone)]
pub struct RequestSpan {
    pub context: TraceContext,
    pub span_id: [u8; 8],
    /// "chat", "text_completion" or "embeddings".
    pub operation: &'static str,
    pub model: String,
    pub start: SystemTime,
    pub end: SystemTime,
    pub status: u16,
    /// `metrics::Outcome` as a string; anything but "success" is an error.
    pub outcome: String,
    pub stream: bool,
    /// The key's NAME, never the key.
    pub key: String,
    pub response_model: Option<String>,
    pub input_tokens: Option<u64>,
    pub output_tokens: Option<u64>,
    pub ttft: Option<Duration>,
    pub attempts: Vec<AttemptSpan>,
}

/// Knobs of the exporter; `Default` is what `Exporter::start` uses.
#[derive(Debug, Clone)]
pub struct ExporterOptions {
    /// Requests queued before `export` starts dropping.
    pub queue_capacity: usize,
    /// Requests (each with its attempts) per `POST`.
    pub max_batch: usize,
    /// How long the task waits for a batch to fill before sending a partial one.
    pub linger: Duration,
    /// The whole of one `POST`, connect to last byte.
    pub export_timeout: Duration,
    /// How long `shutdown` waits for the queue to be sent.
    pub shutdown_timeout: Duration,
}

impl Default for ExporterOptions {
    fn default() -> Self {
        Self {
            queue_capacity: 4096,
            max_batch: 512,
            linger: Duration::from_secs(1),
            export_timeout: Duration::from_secs(5),
            shutdown_timeout: Duration::from_secs(5),
        }
    }
}

/// Checks an `[otel] endpoint`: an absolute http(s) URL with a host.
pub fn check_endpoint(endpoint: &str) -> Result<(), String> {
    let url = reqwest::Url::parse(endpoint).map_err(|e| format!("invalid OTLP endpoint {endpoint:?}: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(format!(
            "OTLP endpoint {endpoint:?} must be an http:// or https:// URL with a host"
        ));
    }
    Ok(())
}

/// `{endpoint}/v1/traces`, unless the endpoint already ends so.
fn traces_url(endpoint: &str) -> String {
    let base = endpoint.trim_end_matches('/');
    if base.ends_with("/v1/traces") {
        base.to_owned()
    } else {
        format!("{base}/v1/traces")
    }
}

#[derive(Default)]
struct Counters {
    dropped: AtomicU64,
    failed: AtomicU64,
}

struct Inner {
    queue: mpsc::Sender<RequestSpan>,
    counters: Arc<Counters>,
    shutdown: watch::Sender<bool>,
    /// Set to true by the task when it has sent everything; closed if it was aborted.
    done: watch::Receiver<bool>,
    task: AbortHandle,
    shutdown_timeout: Duration,
}

/// The OTLP/HTTP+JSON span exporter. Cheap to clone (one `Arc`).
#[derive(Clone)]
pub struct Exporter {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Exporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exporter")
            .field("dropped", &self.dropped())
            .field("failed", &self.failed())
            .finish_non_exhaustive()
    }
}

impl Exporter {
    /// `endpoint`: the base URL of an OTLP/HTTP collector, e.g.
    /// `http://127.0.0.1:4318` (the exporter appends `/v1/traces`). Spawns
    /// the background task on the current Tokio runtime (panics outside one).
    pub fn start(endpoint: &str, service_name: &str) -> Exporter {
        Self::start_with(endpoint, service_name, ExporterOptions::default())
    }

    pub fn start_with(endpoint: &str, service_name: &str, options: ExporterOptions) -> Exporter {
        let (queue, rx) = mpsc::channel(options.queue_capacity.max(1));
        let (shutdown, shutdown_rx) = watch::channel(false);
        let (done_tx, done) = watch::channel(false);
        let counters = Arc::new(Counters::default());
        let client = reqwest::Client::builder()
            .timeout(options.export_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("relaygate/", env!("CARGO_PKG_VERSION")))
            .build()
            .unwrap_or_else(|e| {
                tracing::warn!(error = %e, "otel: cannot configure the HTTP client; using the default one");
                reqwest::Client::new()
            });
        let worker = Worker {
            client,
            url: traces_url(endpoint),
            resource: Resource {
                attributes: vec![
                    KeyValue::string("service.name", service_name),
                    KeyValue::string("service.version", env!("CARGO_PKG_VERSION")),
                ],
            },
            counters: counters.clone(),
            max_batch: options.max_batch.max(1),
            linger: options.linger,
            last_warning: None,
            suppressed: 0,
        };
        let task = tokio::spawn(worker.run(rx, shutdown_rx, done_tx)).abort_handle();
        Exporter {
            inner: Arc::new(Inner {
                queue,
                counters,
                shutdown,
                done,
                task,
                shutdown_timeout: options.shutdown_timeout,
            }),
        }
    }

    /// Queues a finished request for export. Never blocks, never awaits: when
    /// the queue is full, or after `shutdown`, the span is dropped and
    /// counted. An unsampled trace is skipped.
    pub fn export(&self, span: RequestSpan) {
        if !span.context.sampled {
            return;
        }
        if self.inner.queue.try_send(span).is_err() {
            self.inner.counters.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Requests never queued: the queue was full, or the exporter shut down.
    pub fn dropped(&self) -> u64 {
        self.inner.counters.dropped.load(Ordering::Relaxed)
    }

    /// Requests queued but lost because the `POST` of their batch failed.
    pub fn failed(&self) -> u64 {
        self.inner.counters.failed.load(Ordering::Relaxed)
    }

    /// Stops taking spans, sends everything queued and waits, bounded by the
    /// shutdown timeout (5 s by default); past it the task is aborted and what
    /// it still held is lost, uncounted. Idempotent: a second call returns as
    /// soon as the first has finished.
    pub async fn shutdown(&self) {
        self.inner.shutdown.send_replace(true);
        let mut done = self.inner.done.clone();
        let finished = tokio::time::timeout(self.inner.shutdown_timeout, done.wait_for(|d| *d)).await;
        if finished.is_err() {
            tracing::warn!(
                timeout = ?self.inner.shutdown_timeout,
                "otel: the collector did not take the last spans in time; giving up on them"
            );
            self.inner.task.abort();
        }
    }
}

/// The background task: the only owner of the queue's receiving end.
struct Worker {
    client: reqwest::Client,
    url: String,
    resource: Resource,
    counters: Arc<Counters>,
    max_batch: usize,
    linger: Duration,
    last_warning: Option<Instant>,
    suppressed: u64,
}

/// Resolves once shutdown is asked for, or every `Exporter` is gone.
async fn shutdown_requested(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

impl Worker {
    async fn run(
        mut self,
        mut rx: mpsc::Receiver<RequestSpan>,
        mut shutdown: watch::Receiver<bool>,
        done: watch::Sender<bool>,
    ) {
        let mut batch = Vec::with_capacity(self.max_batch);
        let mut closing = false;
        loop {
            // The first request of a batch.
            tokio::select! {
                biased;
                _ = shutdown_requested(&mut shutdown), if !closing => {
                    // No new spans; what is queued still comes out of recv_many.
                    rx.close();
                    closing = true;
                    continue;
                }
                n = rx.recv_many(&mut batch, self.max_batch) => if n == 0 { break },
            }
            // Then fill it for at most `linger` (not at all once closing).
            let fill_until = Instant::now() + self.linger;
            while batch.len() < self.max_batch && !closing {
                let room = self.max_batch - batch.len();
                tokio::select! {
                    biased;
                    _ = shutdown_requested(&mut shutdown) => {
                        rx.close();
                        closing = true;
                    }
                    n = rx.recv_many(&mut batch, room) => if n == 0 { break },
                    _ = tokio::time::sleep_until(fill_until) => break,
                }
            }
            self.send(&batch).await;
            batch.clear();
        }
        done.send_replace(true);
    }

    async fn send(&mut self, batch: &[RequestSpan]) {
        let body = encode(&self.resource, batch);
        let result = self
            .client
            .post(&self.url)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await;
        let error = match result {
            // Read the body so the connection goes back to the pool.
            Ok(resp) if resp.status().is_success() => match resp.bytes().await {
                Ok(_) => return,
                Err(e) => e.to_string(),
            },
            Ok(resp) => format!("collector answered {}", resp.status()),
            Err(e) => e.to_string(),
        };
        self.counters.failed.fetch_add(batch.len() as u64, Ordering::Relaxed);
        let now = Instant::now();
        if self.last_warning.is_some_and(|t| now.duration_since(t) < WARN_INTERVAL) {
            self.suppressed += 1;
            return;
        }
        tracing::warn!(
            url = %self.url,
            error = %error,
            requests = batch.len(),
            failures_not_logged = self.suppressed,
            "otel: span export failed; the batch is dropped"
        );
        self.last_warning = Some(now);
        self.suppressed = 0;
    }
}

// ---- OTLP/JSON encoding -------------------------------------------------

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ExportTraceServiceRequest<'a> {
    resource_spans: [ResourceSpans<'a>; 1],
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ResourceSpans<'a> {
    resource: &'a Resource,
    scope_spans: [ScopeSpans; 1],
}

#[derive(Serialize)]
struct Resource {
    attributes: Vec<KeyValue>,
}

#[derive(Serialize)]
struct ScopeSpans {
    scope: Scope,
    spans: Vec<Span>,
}

#[derive(Serialize)]
struct Scope {
    name: &'static str,
    version: &'static str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Span {
    trace_id: String,
    span_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    parent_span_id: Option<String>,
    name: String,
    kind: u8,
    start_time_unix_nano: String,
    end_time_unix_nano: String,
    attributes: Vec<KeyValue>,
    status: Status,
}

#[derive(Serialize)]
struct Status {
    code: u8,
    /// OTel allows a description only on ERROR.
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<String>,
}

impl Status {
    fn ok() -> Self {
        Status {
            code: STATUS_OK,
            message: None,
        }
    }

    fn error(message: &str) -> Self {
        Status {
            code: STATUS_ERROR,
            message: Some(message.to_owned()),
        }
    }
}

#[derive(Serialize)]
struct KeyValue {
    key: &'static str,
    value: AnyValue,
}

/// OTLP `AnyValue`: externally tagged, so `{"stringValue": "..."}`.
#[derive(Serialize)]
enum AnyValue {
    #[serde(rename = "stringValue")]
    String(String),
    /// int64 is a decimal string in OTLP/JSON.
    #[serde(rename = "intValue")]
    Int(String),
    #[serde(rename = "boolValue")]
    Bool(bool),
    #[serde(rename = "doubleValue")]
    Double(f64),
}

impl KeyValue {
    fn string(key: &'static str, value: impl Into<String>) -> Self {
        KeyValue {
            key,
            value: AnyValue::String(value.into()),
        }
    }

    fn int(key: &'static str, value: impl Into<u64>) -> Self {
        KeyValue {
            key,
            value: AnyValue::Int(value.into().to_string()),
        }
    }
}

fn unix_nanos(t: SystemTime) -> String {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos()).to_string()
}

/// The `POST` body for a batch: one resource, one scope, every span.
fn encode(resource: &Resource, batch: &[RequestSpan]) -> Vec<u8> {
    let mut spans = Vec::with_capacity(batch.iter().map(|r| 1 + r.attempts.len()).sum());
    for request in batch {
        let trace_id = hex(&request.context.trace_id);
        spans.push(request_span(request, trace_id.clone()));
        for attempt in &request.attempts {
            spans.push(attempt_span(request, attempt, trace_id.clone()));
        }
    }
    let body = ExportTraceServiceRequest {
        resource_spans: [ResourceSpans {
            resource,
            scope_spans: [ScopeSpans {
                scope: Scope {
                    name: "relaygate",
                    version: env!("CARGO_PKG_VERSION"),
                },
                spans,
            }],
        }],
    };
    serde_json::to_vec(&body).expect("the OTLP structs always serialise")
}

fn request_span(r: &RequestSpan, trace_id: String) -> Span {
    let mut attributes = vec![
        KeyValue::string("gen_ai.operation.name", r.operation),
        KeyValue::string("gen_ai.request.model", &*r.model),
    ];
    if let Some(model) = &r.response_model {
        attributes.push(KeyValue::string("gen_ai.response.model", &**model));
    }
    if let Some(n) = r.input_tokens {
        attributes.push(KeyValue::int("gen_ai.usage.input_tokens", n));
    }
    if let Some(n) = r.output_tokens {
        attributes.push(KeyValue::int("gen_ai.usage.output_tokens", n));
    }
    attributes.extend([
        KeyValue::int("http.response.status_code", r.status),
        KeyValue::string("relaygate.outcome", &*r.outcome),
        KeyValue {
            key: "relaygate.stream",
            value: AnyValue::Bool(r.stream),
        },
        KeyValue::string("relaygate.key", &*r.key),
    ]);
    if let Some(ttft) = r.ttft {
        attributes.push(KeyValue {
            key: "relaygate.ttft_ms",
            value: AnyValue::Double(ttft.as_secs_f64() * 1000.0),
        });
    }
    Span {
        trace_id,
        span_id: hex(&r.span_id),
        parent_span_id: r.context.parent_span_id.map(|p| hex(&p)),
        name: format!("{} {}", r.operation, r.model),
        kind: KIND_SERVER,
        start_time_unix_nano: unix_nanos(r.start),
        end_time_unix_nano: unix_nanos(r.end),
        attributes,
        status: if r.outcome == "success" {
            Status::ok()
        } else {
            Status::error(&r.outcome)
        },
    }
}

fn attempt_span(r: &RequestSpan, a: &AttemptSpan, trace_id: String) -> Span {
    let mut attributes = vec![
        KeyValue::string("gen_ai.operation.name", r.operation),
        KeyValue::string("gen_ai.system", "openai"),
        KeyValue::string("gen_ai.request.model", &*a.upstream_model),
        KeyValue::string("server.address", &*a.server_address),
        KeyValue::string("relaygate.upstream", &*a.upstream),
    ];
    if let Some(status) = a.status {
        attributes.push(KeyValue::int("http.response.status_code", status));
    }
    // HTTP semantic conventions: a client span with a status >= 400 failed,
    // and without a better name its error.type is the status code.
    let error_type = a
        .error_type
        .clone()
        .or_else(|| a.status.filter(|s| *s >= 400).map(|s| s.to_string()));
    let status = match &error_type {
        Some(e) => Status::error(e),
        None => Status::ok(),
    };
    if let Some(e) = error_type {
        attributes.push(KeyValue::string("error.type", e));
    }
    Span {
        trace_id,
        span_id: hex(&a.span_id),
        parent_span_id: Some(hex(&r.span_id)),
        name: format!("{} {}", r.operation, a.upstream_model),
        kind: KIND_CLIENT,
        start_time_unix_nano: unix_nanos(a.start),
        end_time_unix_nano: unix_nanos(a.end),
        attributes,
        status,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn ctx(value: &str) -> Option<TraceContext> {
        parse_traceparent(value)
    }

    fn headers(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(TRACEPARENT, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn parses_a_valid_traceparent() {
        let c = ctx(VALID).unwrap();
        assert_eq!(hex(&c.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(c.trace_id[0], 0x4b);
        assert_eq!(c.parent_span_id.map(|s| hex(&s)).as_deref(), Some("00f067aa0ba902b7"));
        assert!(c.sampled);
        let c = TraceContext::from_headers(&headers(&[VALID]));
        assert_eq!(c, ctx(VALID).unwrap());
    }

    #[test]
    fn flags_set_sampling_from_bit_zero_only() {
        let with = |flags: &str| ctx(&format!("{}{flags}", &VALID[..53])).unwrap().sampled;
        assert!(with("01"));
        assert!(!with("00"));
        assert!(!with("02"), "bit 1 (random) is not the sampled bit");
        assert!(with("03"));
        assert!(with("ff"));
        assert!(ctx(&format!("{}0g", &VALID[..53])).is_none());
        assert!(ctx(&format!("{}1", &VALID[..53])).is_none());
    }

    #[test]
    fn rejects_invalid_versions() {
        assert!(ctx(&format!("ff{}", &VALID[2..])).is_none(), "version ff is forbidden");
        assert!(ctx(&format!("0g{}", &VALID[2..])).is_none());
        assert!(ctx(&format!("0{}", &VALID[2..])).is_none());
        assert!(ctx(&format!("0A{}", &VALID[2..])).is_none(), "uppercase");
        // Version 00 must be exactly 55 characters.
        assert!(ctx(&format!("{VALID}-extra")).is_none());
        assert!(ctx(&format!("{VALID}0")).is_none());
        // A later version may carry more fields after a dash, not glued on.
        let later = ctx(&format!("01{}-what-comes-next", &VALID[2..])).unwrap();
        assert_eq!(later.trace_id, ctx(VALID).unwrap().trace_id);
        assert!(ctx(&format!("01{}", &VALID[2..])).is_some());
        assert!(ctx(&format!("01{}x", &VALID[2..])).is_none());
    }

    #[test]
    fn rejects_bad_lengths_separators_and_hex() {
        assert!(ctx("").is_none());
        assert!(ctx(&VALID[..54]).is_none());
        assert!(
            ctx("00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01").is_none(),
            "31-digit trace id"
        );
        assert!(
            ctx("00-4bf92f3577b34da6a3ce929d0e0e47366-0f067aa0ba902b7-01").is_none(),
            "misplaced dash"
        );
        assert!(ctx("00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").is_none());
        assert!(ctx("00-4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7-01").is_none());
        assert!(ctx("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7_01").is_none());
        assert!(
            ctx("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01").is_none(),
            "uppercase"
        );
        assert!(ctx("00-4bf92f3577b34da6a3ce929d0e0e473z-00f067aa0ba902b7-01").is_none());
        assert!(ctx("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902bx-01").is_none());
        assert!(ctx("00-+bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").is_none());
        // Surrounding optional whitespace is allowed.
        assert!(ctx(&format!(" {VALID}\t")).is_some());
    }

    #[test]
    fn rejects_all_zero_ids() {
        assert!(ctx("00-00000000000000000000000000000000-00f067aa0ba902b7-01").is_none());
        assert!(ctx("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01").is_none());
    }

    #[test]
    fn an_invalid_or_repeated_header_starts_a_new_sampled_root() {
        for h in [
            HeaderMap::new(),
            headers(&["garbage"]),
            headers(&["00-00000000000000000000000000000000-00f067aa0ba902b7-00"]),
            headers(&[VALID, VALID]),
        ] {
            let c = TraceContext::from_headers(&h);
            assert_eq!(c.parent_span_id, None);
            assert!(c.sampled);
            assert_ne!(c.trace_id, [0; 16]);
            assert_ne!(c.trace_id, ctx(VALID).unwrap().trace_id);
        }
        let a = TraceContext::from_headers(&HeaderMap::new());
        let b = TraceContext::from_headers(&HeaderMap::new());
        assert_ne!(a.trace_id, b.trace_id);
    }

    #[test]
    fn formats_a_child_traceparent_that_parses_back() {
        let c = ctx(VALID).unwrap();
        let child = [0xde, 0xad, 0xbe, 0xef, 0x00, 0x01, 0x02, 0x03];
        let v = c.traceparent(child);
        assert_eq!(
            v.to_str().unwrap(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-deadbeef00010203-01"
        );
        let back = ctx(v.to_str().unwrap()).unwrap();
        assert_eq!(back.trace_id, c.trace_id);
        assert_eq!(back.parent_span_id, Some(child));
        assert!(back.sampled);

        let unsampled = TraceContext { sampled: false, ..c };
        assert!(unsampled.traceparent(child).to_str().unwrap().ends_with("-00"));

        let root = TraceContext::new_root();
        let id = new_span_id();
        let back = ctx(root.traceparent(id).to_str().unwrap()).unwrap();
        assert_eq!(
            (back.trace_id, back.parent_span_id, back.sampled),
            (root.trace_id, Some(id), true)
        );
    }

    #[test]
    fn new_ids_are_nonzero_and_distinct() {
        let spans: std::collections::HashSet<_> = (0..10_000).map(|_| new_span_id()).collect();
        assert_eq!(spans.len(), 10_000);
        assert!(!spans.contains(&[0; 8]));
        let traces: std::collections::HashSet<_> = (0..10_000).map(|_| new_trace_id()).collect();
        assert_eq!(traces.len(), 10_000);
        assert!(!traces.contains(&[0; 16]));
    }

    #[test]
    fn hex_round_trips() {
        let bytes: Vec<u8> = (0..=255).collect();
        let text = hex(&bytes);
        assert_eq!(&text[..6], "000102");
        assert_eq!(&text[text.len() - 4..], "feff");
        for chunk in bytes.chunks(16) {
            let arr: [u8; 16] = chunk.try_into().unwrap();
            assert_eq!(parse_hex::<16>(hex(&arr).as_bytes()), Some(arr));
        }
    }

    #[test]
    fn endpoints() {
        assert_eq!(traces_url("http://c:4318"), "http://c:4318/v1/traces");
        assert_eq!(traces_url("http://c:4318/"), "http://c:4318/v1/traces");
        assert_eq!(traces_url("http://c:4318/otlp"), "http://c:4318/otlp/v1/traces");
        assert_eq!(traces_url("http://c:4318/v1/traces"), "http://c:4318/v1/traces");
        assert!(check_endpoint("http://127.0.0.1:4318").is_ok());
        assert!(check_endpoint("https://otel.example.com").is_ok());
        assert!(check_endpoint("127.0.0.1:4318").is_err());
        assert!(check_endpoint("ftp://x").is_err());
        assert!(check_endpoint("").is_err());
    }

    #[test]
    fn times_are_decimal_unix_nanos() {
        let t = UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789);
        assert_eq!(unix_nanos(t), "1700000000123456789");
        assert_eq!(unix_nanos(UNIX_EPOCH - Duration::from_secs(1)), "0");
    }
}
