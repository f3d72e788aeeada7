//! The simulated OpenAI-compatible upstream, used by `relaygate demo` and by
//! every test: one implementation, with fault knobs that can be changed while
//! it runs.
//!
//! It answers `POST /v1/chat/completions` (JSON and SSE, with `usage`),
//! `POST /v1/completions`, `POST /v1/embeddings` and `GET /v1/models`, and it
//! counts what it saw (requests, streams opened, completed and cancelled by
//! the peer) so tests can assert upstream behaviour, not only responses.
//!
//! Its streams are compact JSON on one `data:` line per event with LF line
//! ends, as OpenAI sends them, unless the shape knobs ask for other legal
//! SSE (`sse_spaced_json`, `split_data_lines`, `line_ending`) or for an
//! upstream that leaves usage out (`ignore_include_usage`, `omit_usage`).

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use hyper_util::rt::TokioExecutor;
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};

/// Fault knobs. The default is a healthy, instant upstream.
#[derive(Debug, Clone)]
pub struct Faults {
    /// Answer this status, with an OpenAI error body, instead of a completion.
    pub status: Option<u16>,
    /// Apply `status` only to the next N requests, then answer normally.
    pub status_times: Option<u64>,
    /// `Retry-After` header sent with `status`.
    pub retry_after: Option<String>,
    /// Share of requests (0.0-1.0) answered with a random 500/502/503.
    pub error_rate: f64,
    /// Delay before the response headers.
    pub header_delay: Duration,
    /// Extra random delay before the headers, uniform in `[0, latency_jitter)`.
    pub latency_jitter: Duration,
    /// Gap between stream chunks.
    pub chunk_interval: Duration,
    /// Content chunks per stream (and words per answer).
    pub chunks: usize,
    /// After this many content chunks, hang until `Sim::release`.
    pub stall_after: Option<usize>,
    /// After this many content chunks, abort the connection.
    pub reset_after: Option<usize>,
    /// Answer 200 with a body that is not JSON (or, for streams, not SSE).
    pub garbage_body: bool,
    /// Send every SSE event in two writes, split inside its JSON.
    pub split_events: bool,
    /// Cached prompt tokens reported in `usage`.
    pub cached_tokens: u64,
    /// Reasoning tokens reported in `usage.completion_tokens_details`.
    pub reasoning_tokens: u64,
    /// Require this bearer key (401 otherwise).
    pub require_key: Option<String>,
    /// Answer `307 Temporary Redirect` to this URL (an upstream that tries
    /// to send the request, and its key, elsewhere).
    pub redirect_to: Option<String>,
    /// Write stream chunks as Python's `json.dumps` does, with a space after
    /// every `:` and `,`: `{"delta": {"content": "Hello"}}`.
    pub sse_spaced_json: bool,
    /// Send each JSON event (the usage chunk too) as two `data:` lines,
    /// split after its first `,` outside a string; by the SSE spec they join
    /// with a newline, which is JSON whitespace there.
    pub split_data_lines: bool,
    /// Never send the usage chunk, even when the request asks for it with
    /// `stream_options.include_usage` (as many compatible servers do).
    pub ignore_include_usage: bool,
    /// Plain (non-stream) answers come without a `usage` object.
    pub omit_usage: bool,
    /// How every line of a stream ends.
    pub line_ending: LineEnding,
    /// Reasoning deltas (`reasoning_content`) before the content, and a
    /// `reasoning_content` in plain answers, as DeepSeek's reasoner sends.
    pub reasoning_chunks: usize,
    /// End with a tool call (`get_weather`), its arguments streamed in two
    /// deltas; the finish reason becomes `tool_calls`.
    pub tool_call: bool,
    /// The last chunk's `finish_reason` (default `stop`), e.g. `length`.
    pub finish_reason: Option<String>,
}

/// The line end of an SSE body: the spec allows all three.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LineEnding {
    #[default]
    Lf,
    CrLf,
    Cr,
}

impl LineEnding {
    pub fn as_str(self) -> &'static str {
        match self {
            LineEnding::Lf => "\n",
            LineEnding::CrLf => "\r\n",
            LineEnding::Cr => "\r",
        }
    }
}

impl Default for Faults {
    fn default() -> Self {
        Self {
            status: None,
            status_times: None,
            retry_after: None,
            error_rate: 0.0,
            header_delay: Duration::ZERO,
            latency_jitter: Duration::ZERO,
            chunk_interval: Duration::ZERO,
            chunks: 5,
            stall_after: None,
            reset_after: None,
            garbage_body: false,
            split_events: false,
            cached_tokens: 0,
            reasoning_tokens: 0,
            require_key: None,
            redirect_to: None,
            sse_spaced_json: false,
            split_data_lines: false,
            ignore_include_usage: false,
            omit_usage: false,
            line_ending: LineEnding::Lf,
            reasoning_chunks: 0,
            tool_call: false,
            finish_reason: None,
        }
    }
}

impl Faults {
    /// `finish_reason` of the answer's end.
    fn final_reason(&self) -> &str {
        match &self.finish_reason {
            Some(reason) => reason,
            None if self.tool_call => "tool_calls",
            None => "stop",
        }
    }

    /// Events are written other than as compact JSON on one LF line. Off,
    /// the common case, they take the plain `format!` path.
    fn shapes_events(&self) -> bool {
        self.sse_spaced_json || self.split_data_lines || self.line_ending != LineEnding::Lf
    }
}

/// What the simulator has seen.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub requests: u64,
    pub streams_opened: u64,
    pub streams_completed: u64,
    /// Streams whose body was dropped before the end: the peer went away.
    pub streams_cancelled: u64,
    /// Non-stream requests dropped before the response: the peer went away.
    pub requests_cancelled: u64,
    /// Content chunks written so far, over all streams.
    pub chunks_sent: u64,
}

/// The last request received, for header and body assertions.
#[derive(Debug, Clone)]
pub struct Captured {
    pub version: http::Version,
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

struct Inner {
    name: String,
    faults: Mutex<Faults>,
    last: Mutex<Option<Captured>>,
    /// Every byte of the most recent stream, as written.
    last_stream: Mutex<Vec<u8>>,
    release: watch::Sender<bool>,
    requests: AtomicU64,
    streams_opened: AtomicU64,
    streams_completed: AtomicU64,
    streams_cancelled: AtomicU64,
    requests_cancelled: AtomicU64,
    chunks_sent: AtomicU64,
}

/// A running simulated upstream on `127.0.0.1:<ephemeral>`. Stops when dropped.
pub struct Sim {
    addr: SocketAddr,
    inner: Arc<Inner>,
    _stop: oneshot::Sender<()>,
}

impl Sim {
    pub async fn start(name: &str, faults: Faults) -> io::Result<Sim> {
        Self::start_on("127.0.0.1:0".parse().expect("valid address"), name, faults).await
    }

    pub async fn start_on(addr: SocketAddr, name: &str, faults: Faults) -> io::Result<Sim> {
        Self::serve_on(addr, name, faults, None).await
    }

    /// A simulator whose HTTP/2 connections take at most `max_streams`
    /// concurrent streams (`SETTINGS_MAX_CONCURRENT_STREAMS`), like most
    /// real servers (100-256), for the client pool's tests.
    pub async fn start_h2_limited(name: &str, faults: Faults, max_streams: u32) -> io::Result<Sim> {
        Self::serve_on(
            "127.0.0.1:0".parse().expect("valid address"),
            name,
            faults,
            Some(max_streams),
        )
        .await
    }

    async fn serve_on(addr: SocketAddr, name: &str, faults: Faults, max_streams: Option<u32>) -> io::Result<Sim> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let inner = Arc::new(Inner {
            name: name.to_owned(),
            faults: Mutex::new(faults),
            last: Mutex::new(None),
            last_stream: Mutex::new(Vec::new()),
            release: watch::channel(false).0,
            requests: AtomicU64::new(0),
            streams_opened: AtomicU64::new(0),
            streams_completed: AtomicU64::new(0),
            streams_cancelled: AtomicU64::new(0),
            requests_cancelled: AtomicU64::new(0),
            chunks_sent: AtomicU64::new(0),
        });
        let router = Router::new()
            .route("/v1/chat/completions", post(chat))
            .route("/v1/completions", post(completions))
            .route("/v1/embeddings", post(embeddings))
            .route("/v1/models", get(models))
            .with_state(inner.clone());
        let (stop, stopped) = oneshot::channel::<()>();
        // HTTP/1.1 and HTTP/2 with prior knowledge (h2c), without hyper's
        // limit of 200 concurrent streams (or with `max_streams`): the
        // simulator stands in for an inference server holding thousands.
        let mut builder = Builder::new(TokioExecutor::new());
        builder.http2().max_concurrent_streams(max_streams);
        let service = TowerToHyperService::new(router);
        let shutdown = async move {
            let _ = stopped.await;
        };
        tokio::spawn(crate::net::accept(listener, shutdown, move |io, graceful| {
            let connection = builder.serve_connection(io, service.clone()).into_owned();
            tokio::spawn(graceful.watch(connection));
        }));
        Ok(Sim {
            addr,
            inner,
            _stop: stop,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port>/v1`, the value for `upstreams.base_url`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    pub fn faults(&self) -> Faults {
        self.inner.faults.lock().expect("sim lock").clone()
    }

    pub fn set_faults(&self, faults: Faults) {
        self.handle().set_faults(faults);
    }

    pub fn update(&self, change: impl FnOnce(&mut Faults)) {
        self.handle().update(change);
    }

    /// Lets stalled streams (`stall_after`) continue.
    pub fn release(&self) {
        self.inner.release.send_replace(true);
    }

    pub fn stats(&self) -> Stats {
        let i = &self.inner;
        Stats {
            requests: i.requests.load(Ordering::SeqCst),
            streams_opened: i.streams_opened.load(Ordering::SeqCst),
            streams_completed: i.streams_completed.load(Ordering::SeqCst),
            streams_cancelled: i.streams_cancelled.load(Ordering::SeqCst),
            requests_cancelled: i.requests_cancelled.load(Ordering::SeqCst),
            chunks_sent: i.chunks_sent.load(Ordering::SeqCst),
        }
    }

    /// The bytes of the most recent stream, exactly as written to the socket.
    pub fn last_stream_bytes(&self) -> Vec<u8> {
        self.inner.last_stream.lock().expect("sim lock").clone()
    }

    /// A handle that can change faults from another task while `Sim` lives.
    pub fn handle(&self) -> SimHandle {
        SimHandle(self.inner.clone())
    }

    pub fn last_request(&self) -> Option<Captured> {
        self.inner.last.lock().expect("sim lock").clone()
    }
}

/// Changes a running simulator's faults (see `Sim::handle`).
#[derive(Clone)]
pub struct SimHandle(Arc<Inner>);

impl SimHandle {
    pub fn set_faults(&self, faults: Faults) {
        *self.0.faults.lock().expect("sim lock") = faults;
    }

    pub fn update(&self, change: impl FnOnce(&mut Faults)) {
        change(&mut self.0.faults.lock().expect("sim lock"));
    }
}

const WORDS: [&str; 8] = [
    "Hello",
    " from",
    " the",
    " relaygate",
    " simulated",
    " upstream",
    ".",
    " Bye",
];

/// The text of an answer of `chunks` words (content chunks, for a stream).
pub fn answer(chunks: usize) -> String {
    (0..chunks).map(|i| WORDS[i % WORDS.len()]).collect()
}

/// Counts a non-stream request as cancelled if it is dropped unanswered.
struct Pending<'a>(&'a Inner, bool);

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if !self.1 {
            self.0.requests_cancelled.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// Common start of every POST: capture, check the key, apply the delay and
/// the status faults. `Err` is the response to send instead of an answer.
async fn prologue(inner: &Inner, req: Request) -> Result<(Faults, Value), Response> {
    inner.requests.fetch_add(1, Ordering::SeqCst);
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, 64 * 1024 * 1024).await.unwrap_or_default();
    *inner.last.lock().expect("sim lock") = Some(Captured {
        version: parts.version,
        path: parts.uri.path().to_owned(),
        headers: parts.headers.clone(),
        body: body.clone(),
    });
    let faults = {
        let mut f = inner.faults.lock().expect("sim lock");
        let snapshot = f.clone();
        if f.status.is_some() {
            if let Some(n) = f.status_times.as_mut() {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    f.status = None;
                    f.status_times = None;
                }
            }
        }
        snapshot
    };

    let mut pending = Pending(inner, false);
    let jitter = if faults.latency_jitter.is_zero() {
        Duration::ZERO
    } else {
        faults.latency_jitter.mul_f64(fastrand::f64())
    };
    if !(faults.header_delay + jitter).is_zero() {
        tokio::time::sleep(faults.header_delay + jitter).await;
    }
    pending.1 = true;

    if let Some(key) = &faults.require_key {
        let expected = format!("Bearer {key}");
        if parts.headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(expected.as_str()) {
            return Err(error(401, "invalid_api_key", "Incorrect API key provided.", None));
        }
    }
    if let Some(status) = faults.status {
        return Err(error(
            status,
            "simulated",
            "simulated failure",
            faults.retry_after.as_deref(),
        ));
    }
    if faults.error_rate > 0.0 && fastrand::f64() < faults.error_rate {
        let status = [500, 502, 503][fastrand::usize(..3)];
        return Err(error(status, "simulated", "simulated random failure", None));
    }
    if let Some(to) = &faults.redirect_to {
        return Err((StatusCode::TEMPORARY_REDIRECT, [("location", to.as_str())]).into_response());
    }
    if faults.garbage_body {
        return Err((
            StatusCode::OK,
            [("content-type", "application/json")],
            "<html><body>upstream proxy error</body></html>",
        )
            .into_response());
    }
    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    if !request.is_object() {
        return Err(error(400, "invalid_request", "body is not a JSON object", None));
    }
    Ok((faults, request))
}

fn error(status: u16, code: &str, message: &str, retry_after: Option<&str>) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = json!({ "error": { "message": message, "type": "server_error", "code": code } });
    let mut response = (status, axum::Json(body)).into_response();
    if let Some(v) = retry_after.and_then(|v| HeaderValue::from_str(v).ok()) {
        response.headers_mut().insert("retry-after", v);
    }
    response
}

/// The `prompt_tokens` the simulator reports for a chat request.
pub fn prompt_tokens(request: &Value) -> u64 {
    (request["messages"].to_string().len() / 4).max(1) as u64
}

fn usage(request: &Value, completion: usize, faults: &Faults) -> Value {
    let prompt = prompt_tokens(request);
    let cached = faults.cached_tokens.min(prompt);
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion as u64,
        "prompt_tokens_details": { "cached_tokens": cached },
        "completion_tokens_details": { "reasoning_tokens": faults.reasoning_tokens.min(completion as u64) },
        "prompt_cache_hit_tokens": cached,
        "prompt_cache_miss_tokens": prompt - cached,
    })
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

async fn chat(State(inner): State<Arc<Inner>>, req: Request) -> Response {
    let (faults, request) = match prologue(&inner, req).await {
        Ok(v) => v,
        Err(response) => return response,
    };
    let model = request["model"].as_str().unwrap_or("unknown").to_owned();
    let id = format!("chatcmpl-{}-{:x}", inner.name, fastrand::u64(..));
    if request["stream"].as_bool() == Some(true) {
        let include_usage = request["stream_options"]["include_usage"].as_bool() == Some(true);
        return stream(inner.clone(), faults, request, model, id, include_usage);
    }
    let content = answer(faults.chunks);
    let mut body = json!({
        "id": id,
        "object": "chat.completion",
        "created": now(),
        "model": model,
        "choices": [{ "index": 0, "message": { "role": "assistant", "content": content }, "finish_reason": faults.final_reason() }],
        "system_fingerprint": "fp_relaygate_sim",
    });
    if faults.reasoning_chunks > 0 {
        let thoughts: String = (0..faults.reasoning_chunks).map(|i| format!("step {i}, ")).collect();
        body["choices"][0]["message"]["reasoning_content"] = json!(thoughts);
    }
    if faults.tool_call {
        body["choices"][0]["message"]["tool_calls"] = json!([{
            "id": "call_sim_0", "type": "function",
            "function": { "name": "get_weather", "arguments": "{\"city\":\"Paris\"}" },
        }]);
    }
    if !faults.omit_usage {
        body["usage"] = usage(&request, faults.chunks, &faults);
    }
    axum::Json(body).into_response()
}

/// Tracks one stream; counts it as cancelled if the body is dropped early.
struct StreamGuard {
    inner: Arc<Inner>,
    done: bool,
}

impl StreamGuard {
    fn record(&self, bytes: &[u8]) {
        self.inner
            .last_stream
            .lock()
            .expect("sim lock")
            .extend_from_slice(bytes);
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let counter = if self.done {
            &self.inner.streams_completed
        } else {
            &self.inner.streams_cancelled
        };
        counter.fetch_add(1, Ordering::SeqCst);
    }
}

fn stream(
    inner: Arc<Inner>,
    faults: Faults,
    request: Value,
    model: String,
    id: String,
    include_usage: bool,
) -> Response {
    let created = now();
    let chunk = |delta: Value, finish: Value| {
        json!({
            "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": "fp_relaygate_sim",
            "choices": [{ "index": 0, "delta": delta, "finish_reason": finish }],
        })
    };
    // The default shape keeps to one `format!` per event: the benchmark's
    // upstream runs this path for every chunk it sends.
    let shaped = faults.shapes_events();
    let event = |value: &Value| if shaped { shaped_sse(value, &faults) } else { sse(value) };
    let mut events: Vec<Event> = Vec::with_capacity(faults.chunks + 4);
    events.push((
        None,
        event(&chunk(json!({ "role": "assistant", "content": "" }), Value::Null)),
    ));
    for i in 0..faults.reasoning_chunks {
        let thought = json!({ "reasoning_content": format!("step {i}, ") });
        events.push((None, event(&chunk(thought, Value::Null))));
    }
    for i in 0..faults.chunks {
        let word = WORDS[i % WORDS.len()];
        events.push((Some(i + 1), event(&chunk(json!({ "content": word }), Value::Null))));
    }
    if faults.tool_call {
        let call = |first: bool, args: &str| {
            let mut call = json!({ "index": 0, "function": { "arguments": args } });
            if first {
                call["id"] = json!("call_sim_0");
                call["type"] = json!("function");
                call["function"]["name"] = json!("get_weather");
            }
            json!({ "tool_calls": [call] })
        };
        events.push((None, event(&chunk(call(true, "{\"city\":"), Value::Null))));
        events.push((None, event(&chunk(call(false, "\"Paris\"}"), Value::Null))));
    }
    events.push((None, event(&chunk(json!({}), json!(faults.final_reason())))));
    if include_usage && !faults.ignore_include_usage {
        let u = json!({
            "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [], "usage": usage(&request, faults.chunks, &faults),
        });
        events.push((None, event(&u)));
    }
    let eol = faults.line_ending.as_str();
    events.push((None, format!("data: [DONE]{eol}{eol}")));
    sse_response(inner, faults, events)
}

/// One event of a simulated stream, as written; `Some(n)` marks the n-th
/// content event (1-based), where `reset_after` and `stall_after` count.
type Event = (Option<usize>, String);

/// Writes `events` as an SSE body under the stream knobs (`chunk_interval`,
/// `reset_after`, `stall_after`, `split_events`, `garbage_body`), keeping
/// its bytes in `last_stream` and counting it in `Stats`.
fn sse_response(inner: Arc<Inner>, faults: Faults, mut events: Vec<Event>) -> Response {
    inner.streams_opened.fetch_add(1, Ordering::SeqCst);
    inner.last_stream.lock().expect("sim lock").clear();
    if faults.garbage_body {
        events = vec![(None, "this is not server-sent events\n".to_owned())];
    }

    let release = inner.release.subscribe();
    let guard = StreamGuard { inner, done: false };
    let state = (events.into_iter(), guard, faults, release, None::<Bytes>, true);
    let body = futures_util::stream::unfold(
        state,
        |(mut events, mut guard, faults, mut release, pending, first)| async move {
            if let Some(rest) = pending {
                tokio::time::sleep(faults.chunk_interval.max(Duration::from_millis(1))).await;
                guard.record(&rest);
                return Some((Ok::<_, io::Error>(rest), (events, guard, faults, release, None, false)));
            }
            let Some((content_index, event)) = events.next() else {
                guard.done = true;
                drop(guard);
                return None;
            };
            if !first && !faults.chunk_interval.is_zero() {
                tokio::time::sleep(faults.chunk_interval).await;
            }
            if let Some(n) = content_index {
                if faults.reset_after.is_some_and(|limit| n > limit) {
                    // hyper drops unflushed writes when a body fails; give the
                    // chunks before the reset time to reach the socket.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    return Some((
                        Err(io::Error::new(io::ErrorKind::ConnectionReset, "simulated reset")),
                        (events, guard, faults, release, None, false),
                    ));
                }
                if faults.stall_after.is_some_and(|limit| n > limit) {
                    let _ = release.wait_for(|released| *released).await;
                }
                guard.inner.chunks_sent.fetch_add(1, Ordering::SeqCst);
            }
            let bytes = Bytes::from(event);
            if faults.split_events && bytes.len() > 4 {
                let mid = bytes.len() / 2;
                let head = bytes.slice(..mid);
                let tail = bytes.slice(mid..);
                guard.record(&head);
                return Some((Ok(head), (events, guard, faults, release, Some(tail), false)));
            }
            guard.record(&bytes);
            Some((Ok(bytes), (events, guard, faults, release, None, false)))
        },
    );
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(Body::from_stream(body))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

fn sse(value: &Value) -> String {
    format!("data: {value}\n\n")
}

/// One event in the shape the knobs ask for (`sse_spaced_json`,
/// `split_data_lines`, `line_ending`).
fn shaped_sse(value: &Value, faults: &Faults) -> String {
    let json = if faults.sse_spaced_json {
        spaced_json(value)
    } else {
        value.to_string()
    };
    let eol = faults.line_ending.as_str();
    let split = faults.split_data_lines.then(|| after_first_comma(&json)).flatten();
    match split {
        Some(at) => format!("data: {}{eol}data: {}{eol}{eol}", &json[..at], &json[at..]),
        None => format!("data: {json}{eol}{eol}"),
    }
}

/// JSON as Python's `json.dumps` writes it by default: `", "` between
/// members and elements, `": "` after keys.
fn spaced_json(value: &Value) -> String {
    struct Spaced;
    impl serde_json::ser::Formatter for Spaced {
        fn begin_array_value<W: ?Sized + io::Write>(&mut self, w: &mut W, first: bool) -> io::Result<()> {
            if first {
                Ok(())
            } else {
                w.write_all(b", ")
            }
        }
        fn begin_object_key<W: ?Sized + io::Write>(&mut self, w: &mut W, first: bool) -> io::Result<()> {
            if first {
                Ok(())
            } else {
                w.write_all(b", ")
            }
        }
        fn begin_object_value<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
            w.write_all(b": ")
        }
    }
    let mut out = Vec::with_capacity(256);
    let mut ser = serde_json::Serializer::with_formatter(&mut out, Spaced);
    serde::Serialize::serialize(value, &mut ser).expect("a Value serialises");
    String::from_utf8(out).expect("JSON is UTF-8")
}

/// The offset just past the first `,` of `json` outside a string, where a
/// line break is JSON whitespace.
fn after_first_comma(json: &str) -> Option<usize> {
    let (mut in_string, mut escaped) = (false, false);
    for (i, b) in json.bytes().enumerate() {
        match b {
            _ if escaped => escaped = false,
            b'\\' if in_string => escaped = true,
            b'"' => in_string = !in_string,
            b',' if !in_string => return Some(i + 1),
            _ => {}
        }
    }
    None
}

async fn completions(State(inner): State<Arc<Inner>>, req: Request) -> Response {
    let (faults, request) = match prologue(&inner, req).await {
        Ok(v) => v,
        Err(response) => return response,
    };
    let mut body = json!({
        "id": format!("cmpl-{:x}", fastrand::u64(..)),
        "object": "text_completion",
        "created": now(),
        "model": request["model"],
        "choices": [{ "index": 0, "text": answer(faults.chunks), "finish_reason": "stop", "logprobs": null }],
    });
    if !faults.omit_usage {
        body["usage"] = usage(&request, faults.chunks, &faults);
    }
    axum::Json(body).into_response()
}

async fn embeddings(State(inner): State<Arc<Inner>>, req: Request) -> Response {
    let (_faults, request) = match prologue(&inner, req).await {
        Ok(v) => v,
        Err(response) => return response,
    };
    let inputs = match &request["input"] {
        Value::Array(items) => items.len().max(1),
        _ => 1,
    };
    let data: Vec<Value> = (0..inputs)
        .map(|i| json!({ "object": "embedding", "index": i, "embedding": [0.1, -0.2, 0.3, 0.0, 0.5, -0.6, 0.7, 0.8] }))
        .collect();
    axum::Json(json!({
        "object": "list",
        "data": data,
        "model": request["model"],
        "usage": { "prompt_tokens": 4 * inputs, "total_tokens": 4 * inputs },
    }))
    .into_response()
}

async fn models(State(inner): State<Arc<Inner>>, headers: HeaderMap) -> Response {
    inner.requests.fetch_add(1, Ordering::SeqCst);
    let required = inner.faults.lock().expect("sim lock").require_key.clone();
    if let Some(key) = required {
        let expected = format!("Bearer {key}");
        if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(expected.as_str()) {
            return error(401, "invalid_api_key", "Incorrect API key provided.", None);
        }
    }
    axum::Json(json!({
        "object": "list",
        "data": [
            { "id": "deepseek-chat", "object": "model", "created": 0, "owned_by": inner.name },
            { "id": "deepseek-reasoner", "object": "model", "created": 0, "owned_by": inner.name },
        ],
    }))
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spaced_json_is_what_python_writes() {
        let v = json!({ "choices": [{ "delta": { "content": "v0 " } }], "n": [1, 2], "s": "a,b: c" });
        // json.dumps(v) in Python, keys in the same (sorted) order.
        assert_eq!(
            spaced_json(&v),
            r#"{"choices": [{"delta": {"content": "v0 "}}], "n": [1, 2], "s": "a,b: c"}"#
        );
    }

    #[test]
    fn shaped_events_join_back_to_the_same_json() {
        let v = json!({ "a": "x,\"y\\", "b": { "c": [1, 2] } });
        let faults = Faults {
            split_data_lines: true,
            line_ending: LineEnding::CrLf,
            ..Faults::default()
        };
        let event = shaped_sse(&v, &faults);
        assert_eq!(
            event,
            "data: {\"a\":\"x,\\\"y\\\\\",\r\ndata: \"b\":{\"c\":[1,2]}}\r\n\r\n"
        );
        // The spec's join: data values, newline between them.
        let joined: Vec<&str> = event.split("\r\n").filter_map(|l| l.strip_prefix("data: ")).collect();
        assert_eq!(serde_json::from_str::<Value>(&joined.join("\n")).unwrap(), v);
        // Nothing to split at: one line.
        assert_eq!(shaped_sse(&json!([]), &faults), "data: []\r\n\r\n");
        let cr = Faults {
            sse_spaced_json: true,
            line_ending: LineEnding::Cr,
            ..Faults::default()
        };
        assert_eq!(shaped_sse(&json!({ "a": 1 }), &cr), "data: {\"a\": 1}\r\r");
        assert!(!Faults::default().shapes_events());
    }
}
