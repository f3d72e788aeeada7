//! The simulated OpenAI-compatible upstream, used by `relaygate demo` and by
//! every test: one implementation, with fault knobs that can be changed while
//! it runs.
//!
//! It answers `POST /v1/chat/completions` (JSON and SSE, with `usage`),
//! `POST /v1/completions`, `POST /v1/embeddings`, `GET /v1/models` and
//! `GET /v1/models/{id}`, and it counts what it saw (requests, streams
//! opened, completed and cancelled by the peer) and keeps the last request
//! (`Captured`) so tests can assert upstream behaviour, not only responses.
//!
//! The Responses API: `POST /v1/responses` (a Response object, or named SSE
//! events from `response.created` to `response.completed`, without
//! `[DONE]`); it stores what it created, for `GET` and `DELETE
//! /v1/responses/{id}` and `POST /v1/responses/{id}/cancel`.
//!
//! For the pass-through: `POST /v1/moderations`; `POST
//! /v1/audio/transcriptions`, a multipart upload read as it streams, whose
//! answer is the SHA-256 and length of its `file` part (`Sim::last_upload`);
//! `GET /v1/files/{id}/content`, `download_bytes` bytes streamed 64 KiB at a
//! time (`download_bytes()` rebuilds them); any other path, captured and
//! answered with OpenAI's 404.
//!
//! Its streams are compact JSON on one `data:` line per event with LF line
//! ends, as OpenAI sends them, unless the shape knobs ask for other legal
//! SSE (`sse_spaced_json`, `split_data_lines`, `line_ending`) or for an
//! upstream that leaves usage out (`ignore_include_usage`, `omit_usage`).
//! The fault knobs apply to every endpoint where they mean something;
//! `reset_after_body` closes the connection once a request's body is read.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use futures_util::StreamExt;
use hyper_util::rt::TokioExecutor;
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch, Notify};
use tower::ServiceExt;

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
    /// Read the whole request body, then close the connection without an
    /// answer: a request that was sent but may or may not have been acted on.
    /// With HTTP/2 that closes the connection's other streams too.
    pub reset_after_body: bool,
    /// The length of `GET /v1/files/{id}/content` (see `download_bytes`).
    pub download_bytes: usize,
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
            reset_after_body: false,
            download_bytes: 4 * 1024 * 1024,
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
    pub method: http::Method,
    /// The path and query, as received.
    pub path: String,
    pub headers: HeaderMap,
    /// Empty for uploads (`/v1/audio/transcriptions`), which are never held.
    pub body: Bytes,
}

struct Inner {
    name: String,
    faults: Mutex<Faults>,
    last: Mutex<Option<Captured>>,
    /// Every byte of the most recent stream, as written.
    last_stream: Mutex<Vec<u8>>,
    /// Responses API objects by id, as `GET /v1/responses/{id}` returns them.
    responses: Mutex<HashMap<String, Value>>,
    /// The length and SHA-256 (hex) of the last upload's `file` part.
    last_upload: Mutex<Option<(u64, String)>>,
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
            responses: Mutex::new(HashMap::new()),
            last_upload: Mutex::new(None),
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
            .route("/v1/models/{id}", get(model))
            .route("/v1/responses", post(responses))
            .route("/v1/responses/{id}", get(stored_response).delete(delete_response))
            .route("/v1/responses/{id}/cancel", post(cancel_response))
            .route("/v1/moderations", post(moderations))
            .route("/v1/audio/transcriptions", post(transcriptions))
            .route("/v1/files/{id}/content", get(file_content))
            .fallback(unknown_path)
            .with_state(inner.clone());
        let (stop, stopped) = oneshot::channel::<()>();
        // HTTP/1.1 and HTTP/2 with prior knowledge (h2c), without hyper's
        // limit of 200 concurrent streams (or with `max_streams`): the
        // simulator stands in for an inference server holding thousands.
        let mut builder = Builder::new(TokioExecutor::new());
        builder.http2().max_concurrent_streams(max_streams);
        let shutdown = async move {
            let _ = stopped.await;
        };
        tokio::spawn(crate::net::accept(listener, shutdown, move |io, graceful| {
            // `reset_after_body` closes the connection from inside a handler:
            // each request carries its connection's `Abort`.
            let abort = Abort(Arc::new(Notify::new()));
            let tag = abort.clone();
            let service = TowerToHyperService::new(router.clone().map_request(
                move |mut req: http::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(tag.clone());
                    req
                },
            ));
            let connection = graceful.watch(builder.serve_connection(io, service).into_owned());
            tokio::spawn(async move {
                tokio::select! {
                    _ = connection => {}
                    _ = abort.0.notified() => {}
                }
            });
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

    /// The length and SHA-256 (hex) of the `file` part of the last complete
    /// upload to `/v1/audio/transcriptions`.
    pub fn last_upload(&self) -> Option<(u64, String)> {
        self.inner.last_upload.lock().expect("sim lock").clone()
    }

    /// A Responses API object this simulator created, as it stands now.
    pub fn stored_response(&self, id: &str) -> Option<Value> {
        self.inner.responses.lock().expect("sim lock").get(id).cloned()
    }
}

/// Drops the connection a request came on (see `reset_connection`).
#[derive(Clone)]
struct Abort(Arc<Notify>);

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

impl Inner {
    fn capture(&self, parts: &Parts, body: Bytes) {
        let path = parts.uri.path_and_query().map_or(parts.uri.path(), |p| p.as_str());
        *self.last.lock().expect("sim lock") = Some(Captured {
            version: parts.version,
            method: parts.method.clone(),
            path: path.to_owned(),
            headers: parts.headers.clone(),
            body,
        });
    }
}

/// Common start of every POST with a JSON body: `receive`, then parse.
/// `Err` is the response to send instead of an answer.
async fn prologue(inner: &Inner, req: Request) -> Result<(Faults, Value), Response> {
    let (faults, body) = receive(inner, req).await?;
    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    if !request.is_object() {
        return Err(error(400, "invalid_request", "body is not a JSON object", None));
    }
    Ok((faults, request))
}

/// Common start of every request but an upload: count it, read its (small)
/// body, capture it, `admit` it, and honour `reset_after_body`.
async fn receive(inner: &Inner, req: Request) -> Result<(Faults, Bytes), Response> {
    inner.requests.fetch_add(1, Ordering::SeqCst);
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, 64 * 1024 * 1024).await.unwrap_or_default();
    inner.capture(&parts, body.clone());
    let faults = admit(inner, &parts).await?;
    if faults.reset_after_body {
        return Err(reset_connection(&parts).await);
    }
    Ok((faults, body))
}

/// Closes the connection `parts` came on without an answer. Never returns:
/// the connection's task drops this handler with the connection.
async fn reset_connection(parts: &Parts) -> Response {
    if let Some(Abort(abort)) = parts.extensions.get::<Abort>() {
        abort.notify_one();
    }
    std::future::pending().await
}

/// Checks the key and applies the delay and the status faults, in that
/// order; `Err` is the response to send instead of an answer.
async fn admit(inner: &Inner, parts: &Parts) -> Result<Faults, Response> {
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
    Ok(faults)
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
    /// A Responses object to store as its stream's last event goes out.
    store: Option<(String, Value)>,
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
    sse_response(inner, faults, events, None)
}

/// One event of a simulated stream, as written; `Some(n)` marks the n-th
/// content event (1-based), where `reset_after` and `stall_after` count.
type Event = (Option<usize>, String);

/// Writes `events` as an SSE body under the stream knobs (`chunk_interval`,
/// `reset_after`, `stall_after`, `split_events`, `garbage_body`), keeping
/// its bytes in `last_stream` and counting it in `Stats`. `store` is put in
/// `responses` just before the last event is written (not after it, which a
/// client could outrun).
fn sse_response(inner: Arc<Inner>, faults: Faults, mut events: Vec<Event>, store: Option<(String, Value)>) -> Response {
    inner.streams_opened.fetch_add(1, Ordering::SeqCst);
    inner.last_stream.lock().expect("sim lock").clear();
    if faults.garbage_body {
        events = vec![(None, "this is not server-sent events\n".to_owned())];
    }

    let release = inner.release.subscribe();
    let guard = StreamGuard {
        inner,
        done: false,
        store,
    };
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
            if events.len() == 0 {
                if let Some((id, object)) = guard.store.take() {
                    guard.inner.responses.lock().expect("sim lock").insert(id, object);
                }
            }
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

async fn model(State(inner): State<Arc<Inner>>, Path(id): Path<String>, req: Request) -> Response {
    if let Err(response) = receive(&inner, req).await {
        return response;
    }
    axum::Json(json!({ "id": id, "object": "model", "created": 0, "owned_by": inner.name })).into_response()
}

/// Any other path: captured, then OpenAI's answer to a URL it does not serve.
async fn unknown_path(State(inner): State<Arc<Inner>>, req: Request) -> Response {
    let what = format!("{} {}", req.method(), req.uri().path());
    if let Err(response) = receive(&inner, req).await {
        return response;
    }
    let body = json!({ "error": {
        "message": format!("Invalid URL ({what})"), "type": "invalid_request_error", "param": null, "code": null,
    } });
    (StatusCode::NOT_FOUND, axum::Json(body)).into_response()
}

// The Responses API (`/v1/responses`).

/// The `input_tokens` the simulator reports for a Responses request, whose
/// `input` is a string or a list of messages (as `prompt_tokens` for chat).
pub fn input_tokens(request: &Value) -> u64 {
    (request["input"].to_string().len() / 4).max(1) as u64
}

fn response_usage(request: &Value, output: usize, faults: &Faults) -> Value {
    let input = input_tokens(request);
    json!({
        "input_tokens": input,
        "input_tokens_details": { "cached_tokens": faults.cached_tokens.min(input) },
        "output_tokens": output,
        "output_tokens_details": { "reasoning_tokens": faults.reasoning_tokens.min(output as u64) },
        "total_tokens": input + output as u64,
    })
}

/// A Response object with the fields OpenAI sends (the SDK's `Response`).
fn response_object(id: &str, model: &str, created_at: u64, status: &str, output: Value, usage: Value) -> Value {
    json!({
        "id": id, "object": "response", "created_at": created_at, "status": status,
        "background": false, "error": null, "incomplete_details": null, "instructions": null,
        "max_output_tokens": null, "metadata": {}, "model": model, "output": output,
        "parallel_tool_calls": true, "previous_response_id": null,
        "reasoning": { "effort": null, "summary": null }, "store": true, "temperature": 1.0,
        "text": { "format": { "type": "text" } }, "tool_choice": "auto", "tools": [], "top_p": 1.0,
        "truncation": "disabled", "usage": usage, "user": null,
    })
}

fn output_message(id: &str, status: &str, text: Option<&str>) -> Value {
    let content: Vec<Value> = text.map(output_text).into_iter().collect();
    json!({ "id": id, "type": "message", "status": status, "role": "assistant", "content": content })
}

fn output_text(text: &str) -> Value {
    json!({ "type": "output_text", "text": text, "annotations": [], "logprobs": [] })
}

async fn responses(State(inner): State<Arc<Inner>>, req: Request) -> Response {
    let (faults, request) = match prologue(&inner, req).await {
        Ok(v) => v,
        Err(response) => return response,
    };
    let model = request["model"].as_str().unwrap_or("unknown");
    let id = format!("resp_{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
    let item_id = format!("msg_{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
    let text = answer(faults.chunks);
    let usage = if faults.omit_usage {
        Value::Null
    } else {
        response_usage(&request, faults.chunks, &faults)
    };
    let output = json!([output_message(&item_id, "completed", Some(&text))]);
    let done = response_object(&id, model, now(), "completed", output, usage);
    if request["stream"].as_bool() == Some(true) {
        return response_stream(inner, faults, id, item_id, done);
    }
    inner.responses.lock().expect("sim lock").insert(id, done.clone());
    axum::Json(done).into_response()
}

/// A Responses stream: named events with increasing `sequence_number`, one
/// `response.output_text.delta` per word, ending with `response.completed`
/// (which carries the usage) and no `[DONE]`.
fn response_stream(inner: Arc<Inner>, faults: Faults, id: String, item_id: String, done: Value) -> Response {
    let mut started = done.clone();
    started["status"] = json!("in_progress");
    started["output"] = json!([]);
    started["usage"] = Value::Null;
    let text = answer(faults.chunks);
    let mut sequence = 0u64;
    let mut event = |kind: &str, mut fields: Value| {
        fields["type"] = json!(kind);
        fields["sequence_number"] = json!(sequence);
        sequence += 1;
        if faults.shapes_events() {
            format!(
                "event: {kind}{}{}",
                faults.line_ending.as_str(),
                shaped_sse(&fields, &faults)
            )
        } else {
            format!("event: {kind}\ndata: {fields}\n\n")
        }
    };
    let at = |mut fields: Value| {
        fields["item_id"] = json!(item_id);
        fields["output_index"] = json!(0);
        fields["content_index"] = json!(0);
        fields
    };
    let mut events: Vec<Event> = Vec::with_capacity(faults.chunks + 8);
    events.push((None, event("response.created", json!({ "response": started }))));
    events.push((None, event("response.in_progress", json!({ "response": started }))));
    let item = output_message(&item_id, "in_progress", None);
    events.push((
        None,
        event("response.output_item.added", json!({ "output_index": 0, "item": item })),
    ));
    let part = at(json!({ "part": output_text("") }));
    events.push((None, event("response.content_part.added", part)));
    for i in 0..faults.chunks {
        let delta = at(json!({ "delta": WORDS[i % WORDS.len()], "logprobs": [] }));
        events.push((Some(i + 1), event("response.output_text.delta", delta)));
    }
    let text_done = at(json!({ "text": text, "logprobs": [] }));
    events.push((None, event("response.output_text.done", text_done)));
    let part_done = at(json!({ "part": output_text(&text) }));
    events.push((None, event("response.content_part.done", part_done)));
    let item_done = json!({ "output_index": 0, "item": done["output"][0] });
    events.push((None, event("response.output_item.done", item_done)));
    events.push((None, event("response.completed", json!({ "response": done }))));

    inner.responses.lock().expect("sim lock").insert(id.clone(), started);
    sse_response(inner, faults, events, Some((id, done)))
}

fn response_not_found(id: &str) -> Response {
    let body = json!({ "error": {
        "message": format!("Response with id '{id}' not found."),
        "type": "invalid_request_error", "param": null, "code": null,
    } });
    (StatusCode::NOT_FOUND, axum::Json(body)).into_response()
}

async fn stored_response(State(inner): State<Arc<Inner>>, Path(id): Path<String>, req: Request) -> Response {
    if let Err(response) = receive(&inner, req).await {
        return response;
    }
    let stored = inner.responses.lock().expect("sim lock").get(&id).cloned();
    match stored {
        Some(object) => axum::Json(object).into_response(),
        None => response_not_found(&id),
    }
}

async fn delete_response(State(inner): State<Arc<Inner>>, Path(id): Path<String>, req: Request) -> Response {
    if let Err(response) = receive(&inner, req).await {
        return response;
    }
    let removed = inner.responses.lock().expect("sim lock").remove(&id);
    match removed {
        Some(_) => axum::Json(json!({ "id": id, "object": "response", "deleted": true })).into_response(),
        None => response_not_found(&id),
    }
}

async fn cancel_response(State(inner): State<Arc<Inner>>, Path(id): Path<String>, req: Request) -> Response {
    if let Err(response) = receive(&inner, req).await {
        return response;
    }
    let cancelled = inner.responses.lock().expect("sim lock").get_mut(&id).map(|object| {
        object["status"] = json!("cancelled");
        object.clone()
    });
    match cancelled {
        Some(object) => axum::Json(object).into_response(),
        None => response_not_found(&id),
    }
}

// Endpoints relaygate passes through.

/// The categories of a moderation result, as the SDK's `Moderation` names them.
const MODERATION_CATEGORIES: [&str; 13] = [
    "harassment",
    "harassment/threatening",
    "hate",
    "hate/threatening",
    "illicit",
    "illicit/violent",
    "self-harm",
    "self-harm/instructions",
    "self-harm/intent",
    "sexual",
    "sexual/minors",
    "violence",
    "violence/graphic",
];

async fn moderations(State(inner): State<Arc<Inner>>, req: Request) -> Response {
    let (_faults, request) = match prologue(&inner, req).await {
        Ok(v) => v,
        Err(response) => return response,
    };
    let inputs = match &request["input"] {
        Value::Array(items) => items.len().max(1),
        _ => 1,
    };
    let (mut categories, mut applied, mut scores) =
        (serde_json::Map::new(), serde_json::Map::new(), serde_json::Map::new());
    for name in MODERATION_CATEGORIES {
        categories.insert(name.to_owned(), json!(false));
        applied.insert(name.to_owned(), json!(["text"]));
        scores.insert(name.to_owned(), json!(0.0001));
    }
    let result = json!({
        "flagged": false, "categories": categories,
        "category_applied_input_types": applied, "category_scores": scores,
    });
    let model = match &request["model"] {
        Value::Null => json!("omni-moderation-latest"),
        model => model.clone(),
    };
    axum::Json(json!({
        "id": format!("modr-{:016x}", fastrand::u64(..)),
        "model": model,
        "results": vec![result; inputs],
    }))
    .into_response()
}

/// A multipart upload, read as it streams (never held whole): answers
/// `{"text": "<sha256 hex of the file part> <its length>"}`, so a client,
/// the openai SDK's `transcription.text` included, can check what arrived.
async fn transcriptions(State(inner): State<Arc<Inner>>, req: Request) -> Response {
    inner.requests.fetch_add(1, Ordering::SeqCst);
    let (parts, body) = req.into_parts();
    inner.capture(&parts, Bytes::new());
    let faults = match admit(&inner, &parts).await {
        Ok(faults) => faults,
        Err(response) => return response,
    };
    let Some(boundary) = multipart_boundary(&parts.headers) else {
        return error(
            400,
            "invalid_request",
            "expected multipart/form-data with a boundary",
            None,
        );
    };
    let mut scan = FilePart::new(&boundary);
    let mut body = body.into_data_stream();
    while let Some(chunk) = body.next().await {
        let Ok(chunk) = chunk else {
            return error(400, "invalid_request", "the upload broke off", None);
        };
        if let Err(why) = scan.feed(&chunk) {
            return error(400, "invalid_request", why, None);
        }
    }
    if faults.reset_after_body {
        return reset_connection(&parts).await;
    }
    match scan.finish() {
        Ok((len, hash)) => {
            let text = format!("{hash} {len}");
            *inner.last_upload.lock().expect("sim lock") = Some((len, hash));
            axum::Json(json!({ "text": text })).into_response()
        }
        Err(why) => error(400, "invalid_request", why, None),
    }
}

/// The `boundary` of a `multipart/form-data` content type.
fn multipart_boundary(headers: &HeaderMap) -> Option<String> {
    let content_type = headers.get("content-type")?.to_str().ok()?;
    let (mime, params) = content_type.split_once(';')?;
    if !mime.trim().eq_ignore_ascii_case("multipart/form-data") {
        return None;
    }
    params
        .split(';')
        .filter_map(|p| p.split_once('='))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("boundary"))
        .map(|(_, v)| v.trim().trim_matches('"').to_owned())
        .filter(|b| !b.is_empty())
}

/// `sha256` of `bytes`, in lower-case hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(2 * bytes.len()), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Finds the part named `file` in a `multipart/form-data` body as it streams
/// past, and hashes its bytes. Between chunks it keeps at most one
/// delimiter's length (or one part's headers, up to 16 KiB), so an upload of
/// any size costs the same memory.
struct FilePart {
    /// `CRLF--boundary`, which ends every part.
    delimiter: Vec<u8>,
    buf: Vec<u8>,
    state: PartState,
    digest: ring::digest::Context,
    len: u64,
    found: bool,
}

#[derive(Clone, Copy)]
enum PartState {
    /// Inside a part's body (or the preamble), looking for the delimiter.
    Body { file: bool },
    /// Just past a delimiter: `--` ends the body, CRLF starts a part.
    Delimited,
    /// Reading a part's headers, up to the blank line.
    Headers,
    /// Past the closing delimiter: the rest is epilogue.
    Done,
}

impl FilePart {
    fn new(boundary: &str) -> Self {
        Self {
            delimiter: format!("\r\n--{boundary}").into_bytes(),
            // The first delimiter has no CRLF before it; one here lets a
            // single search find them all.
            buf: b"\r\n".to_vec(),
            state: PartState::Body { file: false },
            digest: ring::digest::Context::new(&ring::digest::SHA256),
            len: 0,
            found: false,
        }
    }

    fn feed(&mut self, chunk: &[u8]) -> Result<(), &'static str> {
        if matches!(self.state, PartState::Done) {
            return Ok(());
        }
        self.buf.extend_from_slice(chunk);
        loop {
            match self.state {
                PartState::Body { file } => {
                    let (content, delimited) = match memchr::memmem::find(&self.buf, &self.delimiter) {
                        Some(at) => (at, true),
                        // Hold back what could be the start of a delimiter.
                        None => (self.buf.len().saturating_sub(self.delimiter.len() - 1), false),
                    };
                    if file {
                        self.digest.update(&self.buf[..content]);
                        self.len += content as u64;
                    }
                    if !delimited {
                        self.buf.drain(..content);
                        return Ok(());
                    }
                    self.buf.drain(..content + self.delimiter.len());
                    self.state = PartState::Delimited;
                }
                PartState::Delimited => {
                    if self.buf.len() < 2 {
                        return Ok(());
                    }
                    if self.buf.starts_with(b"--") {
                        self.state = PartState::Done;
                        self.buf = Vec::new();
                        return Ok(());
                    }
                    if !self.buf.starts_with(b"\r\n") {
                        return Err("malformed multipart delimiter");
                    }
                    self.buf.drain(..2);
                    self.state = PartState::Headers;
                }
                PartState::Headers => {
                    let end = if self.buf.starts_with(b"\r\n") {
                        Some((0, 2))
                    } else {
                        memchr::memmem::find(&self.buf, b"\r\n\r\n").map(|at| (at, at + 4))
                    };
                    let Some((at, next)) = end else {
                        if self.buf.len() > 16 * 1024 {
                            return Err("multipart part headers over 16 KiB");
                        }
                        return Ok(());
                    };
                    let file = is_file_part(&self.buf[..at]);
                    if file && std::mem::replace(&mut self.found, true) {
                        return Err("more than one `file` part");
                    }
                    self.buf.drain(..next);
                    self.state = PartState::Body { file };
                }
                PartState::Done => return Ok(()),
            }
        }
    }

    /// The file part's length and SHA-256 (hex), once the body has ended.
    fn finish(self) -> Result<(u64, String), &'static str> {
        if !matches!(self.state, PartState::Done) {
            return Err("multipart body ends before its closing delimiter");
        }
        if !self.found {
            return Err("no `file` part");
        }
        Ok((self.len, hex(self.digest.finish().as_ref())))
    }
}

/// A part's headers say `Content-Disposition: form-data; name="file"`.
fn is_file_part(headers: &[u8]) -> bool {
    String::from_utf8_lossy(headers).split("\r\n").any(|line| {
        let Some((name, value)) = line.split_once(':') else {
            return false;
        };
        name.trim().eq_ignore_ascii_case("content-disposition")
            && value.split(';').skip(1).any(|param| {
                param
                    .split_once('=')
                    .is_some_and(|(k, v)| k.trim().eq_ignore_ascii_case("name") && v.trim().trim_matches('"') == "file")
            })
    })
}

/// `GET /v1/files/{id}/content`: `download_bytes` bytes of
/// `download_bytes(id, n)`, made and sent 64 KiB at a time (`reset_after`
/// and `stall_after` count these chunks), with their `content-length`.
async fn file_content(State(inner): State<Arc<Inner>>, Path(id): Path<String>, req: Request) -> Response {
    let faults = match receive(&inner, req).await {
        Ok((faults, _)) => faults,
        Err(response) => return response,
    };
    let total = faults.download_bytes;
    let release = inner.release.subscribe();
    let state = (Download::new(&id), total, 0usize, faults, release);
    let body = futures_util::stream::unfold(state, |(mut bytes, left, sent, faults, mut release)| async move {
        if left == 0 {
            return None;
        }
        if sent > 0 && !faults.chunk_interval.is_zero() {
            tokio::time::sleep(faults.chunk_interval).await;
        }
        if faults.reset_after.is_some_and(|limit| sent >= limit) {
            // As for streams: let what was sent reach the socket first.
            tokio::time::sleep(Duration::from_millis(20)).await;
            let reset = io::Error::new(io::ErrorKind::ConnectionReset, "simulated reset");
            return Some((Err(reset), (bytes, 0, sent, faults, release)));
        }
        if faults.stall_after.is_some_and(|limit| sent >= limit) {
            let _ = release.wait_for(|released| *released).await;
        }
        let mut chunk = vec![0; left.min(DOWNLOAD_CHUNK)];
        bytes.fill(&mut chunk);
        let left = left - chunk.len();
        Some((Ok(Bytes::from(chunk)), (bytes, left, sent + 1, faults, release)))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/octet-stream")
        .header("content-length", total)
        .body(Body::from_stream(body))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// A download's bytes go out in chunks of this size (a multiple of 8, so
/// chunking never changes the sequence).
const DOWNLOAD_CHUNK: usize = 64 * 1024;

/// The body of `GET /v1/files/{id}/content` for a `download_bytes` of `n`,
/// for tests to compare with what arrived.
pub fn download_bytes(id: &str, n: usize) -> Vec<u8> {
    let mut out = vec![0; n];
    Download::new(id).fill(&mut out);
    out
}

/// splitmix64 seeded by the FNV-1a hash of a file id: cheap, and the same
/// bytes for the same id on every run.
struct Download(u64);

impl Download {
    fn new(id: &str) -> Self {
        let seed = id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        Self(seed)
    }

    fn fill(&mut self, out: &mut [u8]) {
        for word in out.chunks_mut(8) {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            word.copy_from_slice(&z.to_le_bytes()[..word.len()]);
        }
    }
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

    /// The events of a Responses stream: `(event name, data)`.
    fn named_events(body: &[u8]) -> Vec<(String, Value)> {
        let text = std::str::from_utf8(body).unwrap();
        assert!(text.ends_with("\n\n"), "whole events only");
        text.split_terminator("\n\n")
            .map(|event| {
                let (name, data) = event.split_once('\n').unwrap();
                let name = name.strip_prefix("event: ").unwrap();
                let data: Value = serde_json::from_str(data.strip_prefix("data: ").unwrap()).unwrap();
                (name.to_owned(), data)
            })
            .collect()
    }

    async fn post(sim: &Sim, path: &str, body: Value) -> reqwest::Response {
        let url = format!("{}{path}", sim.base_url());
        reqwest::Client::new().post(url).json(&body).send().await.unwrap()
    }

    #[tokio::test]
    async fn a_responses_stream_is_named_events_that_end_with_response_completed() {
        let sim = Sim::start(
            "a",
            Faults {
                cached_tokens: 2,
                ..Faults::default()
            },
        )
        .await
        .unwrap();
        let request = json!({ "model": "m", "input": [{ "role": "user", "content": "hi there" }], "stream": true });
        let resp = post(&sim, "/responses", request.clone()).await;
        assert_eq!(resp.headers()["content-type"], "text/event-stream");
        let body = resp.bytes().await.unwrap();
        assert_eq!(&body[..], &sim.last_stream_bytes()[..]);
        let events = named_events(&body);
        let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
        let mut expected = vec![
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
        ];
        expected.extend(["response.output_text.delta"; 5]);
        expected.extend([
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.completed",
        ]);
        assert_eq!(names, expected);
        for (i, (name, data)) in events.iter().enumerate() {
            assert_eq!(data["type"], name.as_str());
            assert_eq!(data["sequence_number"], i as u64);
        }
        let deltas: String = events.iter().filter_map(|(_, d)| d["delta"].as_str()).collect();
        assert_eq!(deltas, answer(5));
        let done = &events.last().unwrap().1["response"];
        assert_eq!(done["status"], "completed");
        assert_eq!(done["model"], "m");
        assert_eq!(done["output"][0]["content"][0]["text"], answer(5));
        let input = input_tokens(&request);
        assert_eq!(done["usage"]["input_tokens"], input);
        assert_eq!(done["usage"]["input_tokens_details"]["cached_tokens"], 2);
        assert_eq!(done["usage"]["output_tokens"], 5);
        assert_eq!(done["usage"]["total_tokens"], input + 5);
        assert_eq!(events[0].1["response"]["status"], "in_progress");
        assert!(!String::from_utf8_lossy(&body).contains("[DONE]"));

        // Stored as it ended, for GET /v1/responses/{id}.
        let id = done["id"].as_str().unwrap();
        assert!(id.starts_with("resp_"), "{id}");
        let url = format!("{}/responses/{id}", sim.base_url());
        let got: Value = reqwest::get(&url).await.unwrap().json().await.unwrap();
        assert_eq!(&got, done);
        let stats = sim.stats();
        assert_eq!(
            (stats.streams_opened, stats.streams_completed, stats.chunks_sent),
            (1, 1, 5)
        );
    }

    #[tokio::test]
    async fn a_responses_stream_resets_after_n_deltas_and_stays_in_progress() {
        let sim = Sim::start(
            "a",
            Faults {
                reset_after: Some(2),
                ..Faults::default()
            },
        )
        .await
        .unwrap();
        let mut resp = post(
            &sim,
            "/responses",
            json!({ "model": "m", "input": "hi", "stream": true }),
        )
        .await;
        let mut body = Vec::new();
        let broke = loop {
            match resp.chunk().await {
                Ok(Some(chunk)) => body.extend_from_slice(&chunk),
                Ok(None) => break false,
                Err(_) => break true,
            }
        };
        assert!(broke, "the body ends in an error, not cleanly");
        let events = named_events(&body);
        assert_eq!(events.len(), 4 + 2, "the four opening events and two deltas");
        assert_eq!(events.last().unwrap().0, "response.output_text.delta");
        let id = events[0].1["response"]["id"].as_str().unwrap();
        assert_eq!(sim.stored_response(id).unwrap()["status"], "in_progress");
        eventually_stats(&sim, |s| s.streams_cancelled == 1).await;
    }

    async fn eventually_stats(sim: &Sim, check: impl Fn(Stats) -> bool) {
        for _ in 0..500 {
            if check(sim.stats()) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("stats never matched: {:?}", sim.stats());
    }

    #[tokio::test]
    async fn stored_responses_can_be_read_cancelled_and_deleted() {
        let sim = Sim::start("a", Faults::default()).await.unwrap();
        let created: Value = post(&sim, "/responses", json!({ "model": "m", "input": "hi" }))
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(created["object"], "response");
        assert_eq!(created["output"][0]["content"][0]["text"], answer(5));
        assert_eq!(
            created["usage"]["input_tokens"],
            input_tokens(&json!({ "input": "hi" }))
        );
        let id = created["id"].as_str().unwrap();
        let url = format!("{}/responses/{id}", sim.base_url());
        let c = reqwest::Client::new();
        assert_eq!(
            c.get(&url).send().await.unwrap().json::<Value>().await.unwrap(),
            created
        );
        let cancelled: Value = c
            .post(format!("{url}/cancel"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(cancelled["status"], "cancelled");
        let deleted: Value = c.delete(&url).send().await.unwrap().json().await.unwrap();
        assert_eq!(deleted, json!({ "id": id, "object": "response", "deleted": true }));
        let gone = c.get(&url).send().await.unwrap();
        assert_eq!(gone.status(), 404);
        assert_eq!(
            gone.json::<Value>().await.unwrap()["error"]["type"],
            "invalid_request_error"
        );
        let seen = sim.last_request().unwrap();
        assert_eq!(
            (seen.method, seen.path),
            (http::Method::GET, format!("/v1/responses/{id}"))
        );
        assert_eq!(sim.stats().requests, 5);
    }

    #[tokio::test]
    async fn a_download_is_deterministic_and_sent_in_chunks() {
        // Not a multiple of the chunk nor of 8: the last chunk is short.
        let n = 3 * DOWNLOAD_CHUNK + 1001;
        let sim = Sim::start(
            "a",
            Faults {
                download_bytes: n,
                ..Faults::default()
            },
        )
        .await
        .unwrap();
        let url = format!("{}/files/file-abc/content?x=1", sim.base_url());
        let resp = reqwest::get(&url).await.unwrap();
        assert_eq!(resp.headers()["content-type"], "application/octet-stream");
        assert_eq!(resp.content_length(), Some(n as u64));
        let body = resp.bytes().await.unwrap();
        assert_eq!(body.len(), n);
        assert!(body[..] == download_bytes("file-abc", n)[..]);
        assert!(download_bytes("file-abd", n) != download_bytes("file-abc", n));
        assert_eq!(download_bytes("file-abc", 10), download_bytes("file-abc", n)[..10]);
        assert_eq!(sim.last_request().unwrap().path, "/v1/files/file-abc/content?x=1");

        sim.update(|f| f.reset_after = Some(2));
        let resp = reqwest::get(&url).await.unwrap();
        assert!(resp.bytes().await.is_err(), "cut after two chunks");
    }

    fn multipart(boundary: &str, file: &[u8]) -> Vec<u8> {
        let mut body = format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n\
             --{boundary}\r\nContent-Disposition: form-data; name=\"audio\"; filename=\"file\"\r\n\r\nnot this\r\n\
             --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\
             Content-Type: audio/wav\r\n\r\n"
        )
        .into_bytes();
        body.extend_from_slice(file);
        body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
        body
    }

    #[test]
    fn the_file_part_is_found_and_hashed_however_the_body_is_cut() {
        let boundary = "xYzZY";
        // Content that looks like the start of a delimiter, and ends with CR.
        let mut file = b"RIFF\r\n--xYzZ\r\n--xYz".to_vec();
        file.extend((0..70_000u32).map(|i| (i * 7 % 251) as u8));
        file.extend_from_slice(b"\r\n-\r");
        let body = multipart(boundary, &file);
        for size in [1, 2, 7, 64, 4096, body.len()] {
            let mut scan = FilePart::new(boundary);
            for chunk in body.chunks(size) {
                scan.feed(chunk).unwrap();
            }
            assert_eq!(
                scan.finish().unwrap(),
                (file.len() as u64, sha256_hex(&file)),
                "chunks of {size}"
            );
        }
        let mut cut = FilePart::new(boundary);
        cut.feed(&body[..body.len() - 10]).unwrap();
        assert!(cut.finish().is_err(), "no closing delimiter");
        let mut none = FilePart::new(boundary);
        none.feed(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nx\r\n--{boundary}--")
                .as_bytes(),
        )
        .unwrap();
        assert_eq!(none.finish(), Err("no `file` part"));
    }

    #[tokio::test]
    async fn an_upload_is_hashed_as_it_streams() {
        let sim = Sim::start("a", Faults::default()).await.unwrap();
        let file: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
        let body = multipart("b0undary", &file);
        let chunks: Vec<Result<Vec<u8>, io::Error>> = body.chunks(10_000).map(|c| Ok(c.to_vec())).collect();
        let resp = reqwest::Client::new()
            .post(format!("{}/audio/transcriptions", sim.base_url()))
            .header("content-type", "multipart/form-data; boundary=\"b0undary\"")
            .body(reqwest::Body::wrap_stream(futures_util::stream::iter(chunks)))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let answer: Value = resp.json().await.unwrap();
        assert_eq!(answer["text"], format!("{} {}", sha256_hex(&file), file.len()));
        assert_eq!(sim.last_upload(), Some((file.len() as u64, sha256_hex(&file))));
        assert!(sim.last_request().unwrap().body.is_empty(), "an upload is not held");
    }

    #[tokio::test]
    async fn reset_after_body_reads_the_request_then_closes_without_an_answer() {
        let sim = Sim::start(
            "a",
            Faults {
                reset_after_body: true,
                ..Faults::default()
            },
        )
        .await
        .unwrap();
        let sent = reqwest::Client::new()
            .post(format!("{}/moderations", sim.base_url()))
            .json(&json!({ "input": "hello" }))
            .send()
            .await;
        assert!(sent.is_err(), "no answer: {sent:?}");
        assert_eq!(sim.stats().requests, 1);
        assert_eq!(&sim.last_request().unwrap().body[..], br#"{"input":"hello"}"#);

        sim.update(|f| f.reset_after_body = false);
        let moderation: Value = post(&sim, "/moderations", json!({ "input": ["a", "b"] }))
            .await
            .json()
            .await
            .unwrap();
        assert!(moderation["id"].as_str().unwrap().starts_with("modr-"));
        assert_eq!(moderation["results"].as_array().unwrap().len(), 2);
        assert_eq!(moderation["results"][0]["categories"]["self-harm/intent"], false);
        let unknown = post(&sim, "/images/generations", json!({})).await;
        assert_eq!(unknown.status(), 404);
        assert_eq!(sim.last_request().unwrap().path, "/v1/images/generations");
    }
}
