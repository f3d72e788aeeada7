//! The OTLP/HTTP+JSON exporter against a fake collector: an axum server on
//! an ephemeral port that records what is POSTed to /v1/traces.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use relaygate::telemetry::otel::{new_span_id, AttemptSpan, Exporter, ExporterOptions, RequestSpan, TraceContext};
use serde_json::{json, Value};

const INCOMING: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

#[derive(Clone, Default)]
struct Recorded {
    /// (Content-Type, decoded body) per POST.
    posts: Arc<Mutex<Vec<(String, Value)>>>,
    hits: Arc<AtomicUsize>,
    hang: bool,
}

async fn traces(State(r): State<Recorded>, headers: HeaderMap, body: Bytes) -> &'static str {
    r.hits.fetch_add(1, Ordering::SeqCst);
    if r.hang {
        std::future::pending::<()>().await;
    }
    let content_type = headers
        .get(http::header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let value = serde_json::from_slice(&body).expect("the exporter sends JSON");
    r.posts.lock().unwrap().push((content_type, value));
    "{}"
}

async fn collector(hang: bool) -> (String, Recorded) {
    let recorded = Recorded {
        hang,
        ..Recorded::default()
    };
    let app = Router::new()
        .route("/v1/traces", post(traces))
        .with_state(recorded.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), recorded)
}

/// A port nothing listens on: bound, then released.
async fn closed_port() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}")
}

fn at(secs: u64, nanos: u32) -> SystemTime {
    UNIX_EPOCH + Duration::new(secs, nanos)
}

fn nanos(t: SystemTime) -> String {
    t.duration_since(UNIX_EPOCH).unwrap().as_nanos().to_string()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attempt(
    upstream: &str,
    model: &str,
    start: SystemTime,
    ms: u64,
    status: Option<u16>,
    error: Option<&str>,
) -> AttemptSpan {
    AttemptSpan {
        span_id: new_span_id(),
        upstream: upstream.into(),
        upstream_model: model.into(),
        server_address: format!("{upstream}.example.com"),
        start,
        end: start + Duration::from_millis(ms),
        status,
        error_type: error.map(Into::into),
    }
}

/// A streamed chat that timed out on `a`, then succeeded on `b`; a fresh trace.
fn streamed_success() -> RequestSpan {
    let start = at(1_700_000_000, 123_456_789);
    RequestSpan {
        context: TraceContext::from_headers(&HeaderMap::new()),
        span_id: new_span_id(),
        operation: "chat",
        model: "deepseek-chat".into(),
        start,
        end: start + Duration::from_millis(1500),
        status: 200,
        outcome: "success".into(),
        stream: true,
        key: "team-a".into(),
        response_model: Some("deepseek-v3.2".into()),
        input_tokens: Some(1234),
        output_tokens: Some(56),
        ttft: Some(Duration::from_micros(250_500)),
        attempts: vec![
            attempt(
                "a",
                "deepseek-v3.2",
                start + Duration::from_millis(1),
                1000,
                None,
                Some("timeout"),
            ),
            attempt(
                "b",
                "deepseek-v3.2-b",
                start + Duration::from_millis(1001),
                490,
                Some(200),
                None,
            ),
        ],
    }
}

/// A plain completion under an incoming trace, failed with a 503 upstream.
fn failed_under_incoming_trace() -> RequestSpan {
    let mut headers = HeaderMap::new();
    headers.insert("traceparent", HeaderValue::from_static(INCOMING));
    let start = at(1_700_000_100, 5);
    RequestSpan {
        context: TraceContext::from_headers(&headers),
        span_id: new_span_id(),
        operation: "text_completion",
        model: "gpt-x".into(),
        start,
        end: start + Duration::from_millis(20),
        status: 502,
        outcome: "upstream_error".into(),
        stream: false,
        key: "team-b".into(),
        response_model: None,
        input_tokens: None,
        output_tokens: None,
        ttft: None,
        attempts: vec![attempt("c", "gpt-x-2", start, 15, Some(503), Some("server_error"))],
    }
}

fn all_spans(posts: &[(String, Value)]) -> Vec<Value> {
    let mut spans = Vec::new();
    for (_, body) in posts {
        for rs in body["resourceSpans"].as_array().unwrap() {
            for ss in rs["scopeSpans"].as_array().unwrap() {
                spans.extend(ss["spans"].as_array().unwrap().iter().cloned());
            }
        }
    }
    spans
}

fn span_by_id(spans: &[Value], id: [u8; 8]) -> &Value {
    let id = hex(&id);
    let found: Vec<_> = spans.iter().filter(|s| s["spanId"] == id.as_str()).collect();
    assert_eq!(found.len(), 1, "span {id} exported once: {spans:#?}");
    found[0]
}

/// The attributes as a `{key: value}` object, so whole sets can be compared.
fn attributes(span: &Value) -> Value {
    let mut map = serde_json::Map::new();
    for kv in span["attributes"].as_array().unwrap() {
        let key = kv["key"].as_str().unwrap().to_owned();
        assert!(
            map.insert(key.clone(), kv["value"].clone()).is_none(),
            "duplicate attribute {key}"
        );
    }
    Value::Object(map)
}

#[tokio::test]
async fn exports_request_and_attempt_spans_with_genai_attributes() {
    let (endpoint, recorded) = collector(false).await;
    let exporter = Exporter::start(&endpoint, "relaygate-test");
    let ok = streamed_success();
    let failed = failed_under_incoming_trace();
    exporter.export(ok.clone());
    exporter.export(failed.clone());
    exporter.shutdown().await;
    assert_eq!((exporter.dropped(), exporter.failed()), (0, 0));

    let posts = recorded.posts.lock().unwrap().clone();
    assert!(!posts.is_empty());
    for (content_type, body) in &posts {
        assert_eq!(content_type, "application/json");
        let rs = &body["resourceSpans"];
        assert_eq!(rs.as_array().unwrap().len(), 1);
        assert_eq!(
            rs[0]["resource"]["attributes"],
            json!([
                {"key": "service.name", "value": {"stringValue": "relaygate-test"}},
                {"key": "service.version", "value": {"stringValue": env!("CARGO_PKG_VERSION")}},
            ])
        );
        assert_eq!(rs[0]["scopeSpans"][0]["scope"]["name"], "relaygate");
    }
    let spans = all_spans(&posts);
    assert_eq!(spans.len(), 2 + 3, "two request spans, three attempt spans");

    // The request without a traceparent: a new trace, no parent, SERVER.
    let request = span_by_id(&spans, ok.span_id);
    let trace = hex(&ok.context.trace_id);
    assert_eq!(trace.len(), 32);
    assert_ne!(trace, "0".repeat(32));
    assert_eq!(request["traceId"], trace.as_str());
    assert!(
        request.get("parentSpanId").is_none(),
        "a root span has no parent: {request}"
    );
    assert_eq!(request["name"], "chat deepseek-chat");
    assert_eq!(request["kind"], 2);
    assert_eq!(request["startTimeUnixNano"], "1700000000123456789");
    assert_eq!(request["endTimeUnixNano"], "1700000001623456789");
    assert_eq!(request["status"], json!({"code": 1}));
    assert_eq!(
        attributes(request),
        json!({
            "gen_ai.operation.name": {"stringValue": "chat"},
            "gen_ai.request.model": {"stringValue": "deepseek-chat"},
            "gen_ai.response.model": {"stringValue": "deepseek-v3.2"},
            "gen_ai.usage.input_tokens": {"intValue": "1234"},
            "gen_ai.usage.output_tokens": {"intValue": "56"},
            "http.response.status_code": {"intValue": "200"},
            "relaygate.outcome": {"stringValue": "success"},
            "relaygate.stream": {"boolValue": true},
            "relaygate.key": {"stringValue": "team-a"},
            "relaygate.ttft_ms": {"doubleValue": 250.5},
        })
    );

    // Its attempts: CLIENT children of the request span, in the same trace.
    let timed_out = span_by_id(&spans, ok.attempts[0].span_id);
    assert_eq!(timed_out["traceId"], trace.as_str());
    assert_eq!(timed_out["parentSpanId"], hex(&ok.span_id).as_str());
    assert_eq!(timed_out["name"], "chat deepseek-v3.2");
    assert_eq!(timed_out["kind"], 3);
    assert_eq!(timed_out["startTimeUnixNano"], nanos(ok.attempts[0].start).as_str());
    assert_eq!(timed_out["endTimeUnixNano"], nanos(ok.attempts[0].end).as_str());
    assert_eq!(timed_out["startTimeUnixNano"], "1700000000124456789");
    assert_eq!(timed_out["status"], json!({"code": 2, "message": "timeout"}));
    assert_eq!(
        attributes(timed_out),
        json!({
            "gen_ai.operation.name": {"stringValue": "chat"},
            "gen_ai.system": {"stringValue": "openai"},
            "gen_ai.request.model": {"stringValue": "deepseek-v3.2"},
            "server.address": {"stringValue": "a.example.com"},
            "relaygate.upstream": {"stringValue": "a"},
            "error.type": {"stringValue": "timeout"},
        })
    );
    let second = span_by_id(&spans, ok.attempts[1].span_id);
    assert_eq!(second["traceId"], trace.as_str());
    assert_eq!(second["parentSpanId"], hex(&ok.span_id).as_str());
    assert_eq!(second["name"], "chat deepseek-v3.2-b");
    assert_eq!(second["kind"], 3);
    assert_eq!(second["endTimeUnixNano"], nanos(ok.attempts[1].end).as_str());
    assert_eq!(second["status"], json!({"code": 1}));
    assert_eq!(
        attributes(second),
        json!({
            "gen_ai.operation.name": {"stringValue": "chat"},
            "gen_ai.system": {"stringValue": "openai"},
            "gen_ai.request.model": {"stringValue": "deepseek-v3.2-b"},
            "server.address": {"stringValue": "b.example.com"},
            "relaygate.upstream": {"stringValue": "b"},
            "http.response.status_code": {"intValue": "200"},
        })
    );

    // The request under an incoming traceparent keeps its trace id, and the
    // caller's span is its parent. Optional attributes are absent, not empty.
    let request = span_by_id(&spans, failed.span_id);
    assert_eq!(request["traceId"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(request["parentSpanId"], "00f067aa0ba902b7");
    assert_eq!(request["name"], "text_completion gpt-x");
    assert_eq!(request["kind"], 2);
    assert_eq!(request["startTimeUnixNano"], "1700000100000000005");
    assert_eq!(request["endTimeUnixNano"], "1700000100020000005");
    assert_eq!(request["status"], json!({"code": 2, "message": "upstream_error"}));
    assert_eq!(
        attributes(request),
        json!({
            "gen_ai.operation.name": {"stringValue": "text_completion"},
            "gen_ai.request.model": {"stringValue": "gpt-x"},
            "http.response.status_code": {"intValue": "502"},
            "relaygate.outcome": {"stringValue": "upstream_error"},
            "relaygate.stream": {"boolValue": false},
            "relaygate.key": {"stringValue": "team-b"},
        })
    );
    let upstream = span_by_id(&spans, failed.attempts[0].span_id);
    assert_eq!(upstream["traceId"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(upstream["parentSpanId"], hex(&failed.span_id).as_str());
    assert_eq!(upstream["kind"], 3);
    assert_eq!(upstream["name"], "text_completion gpt-x-2");
    assert_eq!(upstream["status"], json!({"code": 2, "message": "server_error"}));
    assert_eq!(
        attributes(upstream)["http.response.status_code"],
        json!({"intValue": "503"})
    );
    assert_eq!(
        attributes(upstream)["error.type"],
        json!({"stringValue": "server_error"})
    );

    // The header we send upstream names the attempt span in the same trace.
    let header = failed.context.traceparent(failed.attempts[0].span_id);
    assert_eq!(
        header.to_str().unwrap(),
        format!(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-{}-01",
            hex(&failed.attempts[0].span_id)
        )
    );

    // Shut down: later exports are dropped and counted; shutdown is idempotent.
    exporter.export(streamed_success());
    assert_eq!(exporter.dropped(), 1);
    let t = Instant::now();
    exporter.shutdown().await;
    assert!(t.elapsed() < Duration::from_millis(500));
    assert_eq!(recorded.hits.load(Ordering::SeqCst), posts.len());
}

#[tokio::test]
async fn batches_are_sent_without_shutdown_after_the_linger() {
    let (endpoint, recorded) = collector(false).await;
    let options = ExporterOptions {
        linger: Duration::from_millis(50),
        max_batch: 3,
        ..ExporterOptions::default()
    };
    let exporter = Exporter::start_with(&endpoint, "relaygate", options);
    for _ in 0..7 {
        exporter.export(failed_under_incoming_trace());
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let posts = recorded.posts.lock().unwrap().clone();
        if all_spans(&posts).len() == 7 * 2 {
            // At most three requests (six spans) per POST.
            assert!(posts.len() >= 3);
            assert!(posts.iter().all(|p| all_spans(std::slice::from_ref(p)).len() <= 6));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the exporter sent nothing without a shutdown"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    exporter.shutdown().await;
}

#[tokio::test]
async fn unsampled_traces_are_not_exported() {
    let (endpoint, recorded) = collector(false).await;
    let exporter = Exporter::start(&endpoint, "relaygate");
    let mut headers = HeaderMap::new();
    let unsampled_header = format!("{}00", &INCOMING[..53]);
    headers.insert("traceparent", HeaderValue::from_str(&unsampled_header).unwrap());
    let context = TraceContext::from_headers(&headers);
    assert!(!context.sampled);
    let mut skipped = failed_under_incoming_trace();
    skipped.context = context;
    let kept = streamed_success();
    exporter.export(skipped.clone());
    exporter.export(kept.clone());
    exporter.shutdown().await;

    let spans = all_spans(&recorded.posts.lock().unwrap());
    assert_eq!(spans.len(), 3, "only the sampled request and its attempts");
    assert!(spans
        .iter()
        .all(|s| s["traceId"] == hex(&kept.context.trace_id).as_str()));
    assert_eq!(exporter.dropped(), 0, "skipping an unsampled trace is not a drop");
    // The unsampled decision travels upstream.
    assert!(skipped
        .context
        .traceparent(new_span_id())
        .to_str()
        .unwrap()
        .ends_with("-00"));
}

/// Counts WARN events from the exporter on this thread.
struct WarnCounter(Arc<AtomicUsize>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for WarnCounter {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        if *event.metadata().level() == tracing::Level::WARN
            && event.metadata().target() == "relaygate::telemetry::otel"
        {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// A current-thread runtime: the export task cannot run while the test
/// exports, so the numbers are exact.
#[tokio::test]
async fn export_never_blocks_when_the_collector_is_down() {
    use tracing_subscriber::layer::SubscriberExt;
    let warnings = Arc::new(AtomicUsize::new(0));
    let subscriber = tracing_subscriber::registry().with(WarnCounter(warnings.clone()));
    let _guard = tracing::subscriber::set_default(subscriber);

    let exporter = Exporter::start(&closed_port().await, "relaygate");
    let span = streamed_success();
    let t = Instant::now();
    for _ in 0..10_000 {
        exporter.export(span.clone());
    }
    let elapsed = t.elapsed();
    assert!(elapsed < Duration::from_millis(500), "10,000 exports took {elapsed:?}");
    let queue = ExporterOptions::default().queue_capacity as u64;
    assert_eq!(exporter.dropped(), 10_000 - queue, "a full queue drops, never waits");

    let t = Instant::now();
    exporter.shutdown().await;
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "refused connections fail fast: {:?}",
        t.elapsed()
    );
    assert_eq!(
        exporter.failed(),
        queue,
        "every queued request was tried, in failed batches"
    );
    assert_eq!(exporter.dropped() + exporter.failed(), 10_000);
    // Eight failed batches, one warning: failures are logged at most once per 10 s.
    assert_eq!(warnings.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_is_bounded_when_the_collector_hangs() {
    let (endpoint, recorded) = collector(true).await;
    let bound = Duration::from_millis(300);
    let options = ExporterOptions {
        shutdown_timeout: bound,
        ..ExporterOptions::default()
    };
    assert!(
        options.export_timeout > bound * 10,
        "the POST alone would outlast the bound"
    );
    let exporter = Exporter::start_with(&endpoint, "relaygate", options);
    exporter.export(streamed_success());
    let t = Instant::now();
    exporter.shutdown().await;
    let elapsed = t.elapsed();
    assert!(elapsed >= bound, "shutdown waited for the send: {elapsed:?}");
    assert!(
        elapsed < bound + Duration::from_secs(1),
        "shutdown overran its bound: {elapsed:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while recorded.hits.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "the batch never reached the collector");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(recorded.hits.load(Ordering::SeqCst), 1);

    // Idempotent, and immediate now that the task is gone.
    let t = Instant::now();
    exporter.shutdown().await;
    assert!(t.elapsed() < Duration::from_millis(100));
    exporter.export(streamed_success());
    assert_eq!(exporter.dropped(), 1);
}

#[test]
fn default_bounds() {
    let o = ExporterOptions::default();
    assert_eq!(o.queue_capacity, 4096);
    assert_eq!(o.max_batch, 512);
    assert_eq!(o.export_timeout, Duration::from_secs(5));
    assert_eq!(o.shutdown_timeout, Duration::from_secs(5));
}
