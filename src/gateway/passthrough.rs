//! The pass-through: `/v1/*` requests that relaygate does not serve itself
//! (moderations, audio, images, files, batches, …), sent on unchanged to one
//! upstream, and the Responses API's stored-response calls
//! (`/v1/responses/{id}…`) to the upstream that answered them.
//!
//! What applies: load shedding, client-key auth, the upstream's key in
//! place of the client's, hop-by-hop headers stripped both ways, the
//! upstream's timeouts, bounded retries, metrics (`endpoint="passthrough"`),
//! the access log. What does not: rate limits, budgets, the cache, the
//! breaker (its verdicts are about the routed endpoints), usage.
//!
//! Bodies stream both ways: an upload goes upstream as it arrives and a
//! download goes to the client as it arrives, with one chunk in flight, so
//! a file of any size holds no more memory than a chat request. The one
//! exception is a JSON body small enough to be a request (at most
//! `server.max_body_bytes`): it is read, so that a `model` that names a
//! configured model can send it to that model's first target, renamed.
//!
//! Retries happen only before the response's first byte: for GET, HEAD,
//! DELETE and PUT (with a body that was read whole) on a connect failure, a
//! reset, a first-byte timeout or a 502/503/504; for any other method only
//! when the connection could not be made, so nothing was sent.

use std::future::Future as _;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{header, HeaderMap, Method, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::{Body as _, Frame, SizeHint};
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};
use tower_http::request_id::RequestId;

use crate::error::GatewayError;
use crate::gateway::record::RequestRecord;
use crate::gateway::state::{AppState, Model, Runtime};
use crate::outcome::{ErrorType, Outcome};
use crate::request::{self, Endpoint};
use crate::upstream::{passthrough_headers, response_headers, BodyFailed, OutBody, Upstream};

/// A PUT body up to this size is read whole, so the PUT can be retried.
const RETRYABLE_PUT_BYTES: u64 = 64 * 1024;

pub async fn handle(state: AppState, req: http::Request<axum::body::Body>) -> Response {
    let started = Instant::now();
    let request_id = req.extensions().get::<RequestId>().map(|id| id.header_value().clone());
    let mut record = RequestRecord::new(state.sinks().clone(), Endpoint::Passthrough, started, request_id);
    let Some(slot) = state.try_admit() else {
        return refuse(record, GatewayError::Overloaded);
    };
    record.hold(Some(slot));
    let runtime = state.runtime();
    match run(&state, &runtime, req, &mut record, started).await {
        Ok((status, headers, body, upstream)) => {
            let deadline = started + upstream.config.request_timeout;
            let body = Download::new(body, &upstream, status, deadline, record);
            let mut response = Response::new(axum::body::Body::new(body));
            *response.status_mut() = status;
            *response.headers_mut() = headers;
            response
        }
        Err(error) => refuse(record, error),
    }
}

fn refuse(record: RequestRecord, error: GatewayError) -> Response {
    record.finish_error(&error);
    error.into_response()
}

/// The stored-response calls of the Responses API: `/v1/responses/{id}`
/// and below it. Served whether the pass-through is on or not.
pub fn is_stored_response(path: &str) -> bool {
    path.strip_prefix("/v1/responses/").is_some_and(|rest| !rest.is_empty())
}

/// Notes which upstream stored a Responses API answer: its `id`, from a
/// plain answer's body or a stream's first events (`response.created`).
pub fn remember_response(state: &AppState, answer: &[u8], stream: bool, upstream: &Arc<str>) {
    #[derive(serde::Deserialize)]
    struct Stored {
        id: Option<String>,
    }
    #[derive(serde::Deserialize)]
    struct Event {
        response: Option<Stored>,
    }
    let id = if stream {
        crate::sse::events(answer).find_map(|e| serde_json::from_slice::<Event>(&e.data).ok()?.response?.id)
    } else {
        serde_json::from_slice::<Stored>(answer).ok().and_then(|s| s.id)
    };
    if let Some(id) = id {
        state.stored_responses().insert(id, upstream.clone());
    }
}

/// `/v1/responses/{id}…` → the id.
fn response_id(path: &str) -> Option<&str> {
    let rest = path.strip_prefix("/v1/responses/")?;
    Some(rest.split('/').next().unwrap_or(rest))
}

/// Where a request goes, and the model it names, if any.
fn choose<'r>(
    state: &AppState,
    runtime: &'r Runtime,
    path: &str,
    model: Option<&'r Model>,
) -> Option<&'r Arc<Upstream>> {
    if let Some(model) = model {
        return Some(&model.route.targets[0].upstream);
    }
    if is_stored_response(path) {
        // The upstream that answered it, if this relaygate served it and
        // remembers; else the pass-through's; else the first model's first
        // target (docs/endpoints.md).
        let learned = response_id(path)
            .and_then(|id| state.stored_responses().get(id))
            .and_then(|name| runtime.upstreams.iter().find(|u| *u.name == *name));
        let configured = runtime
            .config
            .passthrough
            .as_ref()
            .map(|p| &runtime.upstreams[p.upstream]);
        return learned
            .or(configured)
            .or_else(|| runtime.models.first().map(|m| &m.route.targets[0].upstream));
    }
    let p = runtime.config.passthrough.as_ref()?;
    Some(&runtime.upstreams[p.upstream])
}

type Answer = (StatusCode, HeaderMap, crate::upstream::Body, Arc<Upstream>);

async fn run(
    state: &AppState,
    runtime: &Arc<Runtime>,
    req: http::Request<axum::body::Body>,
    record: &mut RequestRecord,
    started: Instant,
) -> Result<Answer, GatewayError> {
    let (parts, body) = req.into_parts();
    record.set_key(runtime.keys.authenticate(&parts.headers)?);
    let server = &runtime.config.server;
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > server.max_passthrough_body_bytes) {
        return Err(GatewayError::PayloadTooLarge {
            limit: usize::try_from(server.max_passthrough_body_bytes).unwrap_or(usize::MAX),
        });
    }
    let path = parts.uri.path();
    let path_and_query = parts.uri.path_and_query().map_or(path, |p| p.as_str());
    let bodyless = matches!(parts.method, Method::GET | Method::HEAD | Method::DELETE)
        && declared.unwrap_or(0) == 0
        && !parts.headers.contains_key(header::TRANSFER_ENCODING);
    let is_json = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().starts_with("application/json"));
    // Read the body whole when it is empty, a small JSON request (it may
    // name a model), or a PUT small enough to retry.
    let read_whole = bodyless
        || (is_json && declared.is_none_or(|n| n <= server.max_body_bytes as u64))
        || (parts.method == Method::PUT && declared.is_some_and(|n| n <= RETRYABLE_PUT_BYTES));
    let pause = server.request_body_timeout;
    let mut headers = passthrough_headers(&parts.headers);
    let mut model = None;
    let body = if read_whole && !bodyless {
        let limit = if is_json {
            server.max_body_bytes
        } else {
            RETRYABLE_PUT_BYTES as usize
        };
        let bytes = Limited::new(super::handle::PausedBody::new(body, pause), limit)
            .collect()
            .await
            .map_err(|e| super::handle::body_error(&*e, limit, pause))?
            .to_bytes();
        Whole(if is_json {
            rename_model(runtime, bytes, &mut model, &mut headers)
        } else {
            bytes
        })
    } else if bodyless {
        Whole(Bytes::new())
    } else {
        Streamed(Some(body))
    };
    let upstream = choose(state, runtime, path, model)
        .ok_or_else(|| GatewayError::NotFound {
            method: parts.method.to_string(),
            path: crate::error::clip(path),
        })?
        .clone();
    if let Some(model) = model {
        record.set_model(model.metrics.clone(), None, false);
    }
    record.set_upstream(&upstream, None);

    let retry = &runtime.config.retry;
    let idempotent = matches!(parts.method, Method::GET | Method::HEAD | Method::DELETE | Method::PUT);
    let deadline = started + upstream.config.request_timeout;
    let mut body = body;
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        record.set_attempts(attempt);
        let (out, upload) = body.take(server.max_passthrough_body_bytes, pause);
        let attempt_started = Instant::now();
        let sent = upstream.send_passthrough(parts.method.clone(), path_and_query, headers.clone(), out);
        let outcome = await_headers(sent, upload.as_ref(), &upstream, deadline).await;
        let retry_after = match outcome {
            Exchange::Answered(response) => {
                let status = response.status().as_u16();
                upstream
                    .metrics
                    .attempt(Some(status), ErrorType::of_status(status), attempt_started);
                let retryable = idempotent && matches!(status, 502..=504) && body.again();
                if !retryable || attempt >= retry.max_attempts {
                    let (parts, body) = response.into_parts();
                    return Ok((parts.status, response_headers(parts.headers), body, upstream));
                }
                ErrorType::ServerError
            }
            Exchange::Failed {
                error,
                error_type,
                unsent,
            } => {
                upstream.metrics.attempt(None, error_type, attempt_started);
                if let Some(failed) = upload.as_ref().and_then(|u| u.failure()) {
                    // The client's body failed, not the upstream.
                    return Err(failed.error(server.max_passthrough_body_bytes, pause));
                }
                match unsent {
                    // Nothing was written: safe to send again, any method.
                    Some(request) => body = Again(Some(request.into_body()), upload.clone()),
                    None if idempotent && body.again() => {}
                    None => return Err(error),
                }
                if attempt >= retry.max_attempts {
                    return Err(error);
                }
                error_type
            }
        };
        upstream.metrics.retry(retry_after);
        // Full jitter, as the routed endpoints back off (`stack::retry`).
        let cap = retry
            .base_delay
            .saturating_mul(1 << (attempt - 1).min(16))
            .min(retry.max_delay);
        let pause_for = cap.mul_f64(fastrand::f64());
        if Instant::now() + pause_for >= deadline {
            return Err(GatewayError::UpstreamTimeout {
                upstream: upstream.name.to_string(),
                kind: crate::error::TimeoutKind::Request,
            });
        }
        tokio::time::sleep(pause_for).await;
    }
}

/// A JSON body that names a configured model goes to that model's first
/// target, with the model renamed to the target's.
fn rename_model<'r>(
    runtime: &'r Runtime,
    body: Bytes,
    found: &mut Option<&'r Model>,
    headers: &mut HeaderMap,
) -> Bytes {
    let Ok(parsed) = request::parse(Endpoint::Passthrough, &body) else {
        return body;
    };
    let Some(model) = runtime.model(&parsed.model) else {
        return body;
    };
    *found = Some(model);
    let renamed = parsed.body_for(&body, &model.route.targets[0].model);
    if renamed.len() != body.len() {
        headers.insert(header::CONTENT_LENGTH, http::HeaderValue::from(renamed.len()));
    }
    renamed
}

use PassBody::{Again, Streamed, Whole};

/// The request body across attempts.
enum PassBody {
    /// Read whole: sent again as often as needed.
    Whole(Bytes),
    /// The client's body, streamed: sent once.
    Streamed(Option<axum::body::Body>),
    /// The body of a request handed back unsent (no connection was made),
    /// and the watch on it if it is the client's upload.
    Again(Option<OutBody>, Option<Arc<Upload>>),
}

impl PassBody {
    /// Whether an attempt that got this far may be repeated.
    fn again(&self) -> bool {
        matches!(self, Whole(_))
    }

    /// The body for the next attempt, and the watch on a streamed upload.
    fn take(&mut self, limit: u64, pause: Duration) -> (OutBody, Option<Arc<Upload>>) {
        match self {
            Whole(bytes) => (OutBody::from(bytes.clone()), None),
            Streamed(body) => match body.take() {
                Some(body) => {
                    let watch = Arc::new(Upload::default());
                    let upload = UploadBody {
                        body,
                        stall: crate::net::Stall::new(pause),
                        seen: 0,
                        limit,
                        watch: watch.clone(),
                    };
                    (OutBody::Stream(Box::pin(upload)), Some(watch))
                }
                None => (OutBody::from(Bytes::new()), None),
            },
            Again(body, upload) => (
                body.take().unwrap_or_else(|| OutBody::from(Bytes::new())),
                upload.clone(),
            ),
        }
    }
}

enum Exchange {
    Answered(http::Response<crate::upstream::Body>),
    Failed {
        error: GatewayError,
        error_type: ErrorType,
        /// The request, when none of it was written.
        unsent: Option<Box<http::Request<OutBody>>>,
    },
}

/// The response's headers: within `first_byte_timeout` of the request body's
/// end (an upload may take long; the upstream's answer should not), and
/// within the request's deadline.
async fn await_headers(
    sent: impl std::future::Future<Output = Result<http::Response<crate::upstream::Body>, crate::upstream::Unsent>>,
    upload: Option<&Arc<Upload>>,
    upstream: &Upstream,
    deadline: Instant,
) -> Exchange {
    let first_byte = upstream.config.first_byte_timeout;
    let uploaded = async {
        if let Some(upload) = upload {
            upload.finished().await;
        }
        tokio::time::sleep(first_byte).await;
    };
    let timeout = |kind| Exchange::Failed {
        error: GatewayError::UpstreamTimeout {
            upstream: upstream.name.to_string(),
            kind,
        },
        error_type: ErrorType::Timeout,
        unsent: None,
    };
    tokio::select! {
        result = sent => match result {
            Ok(response) => Exchange::Answered(response),
            Err(unsent) => {
                let connect = unsent.error.is_connect();
                Exchange::Failed {
                    error: if connect {
                        GatewayError::UpstreamConnect { upstream: upstream.name.to_string() }
                    } else {
                        GatewayError::UpstreamReset { upstream: upstream.name.to_string() }
                    },
                    error_type: if connect { ErrorType::Connect } else { ErrorType::Reset },
                    unsent: unsent.request,
                }
            }
        },
        _ = uploaded => timeout(crate::error::TimeoutKind::FirstByte),
        _ = tokio::time::sleep_until(deadline) => timeout(crate::error::TimeoutKind::Request),
    }
}

/// Why a streamed upload stopped early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UploadFailure {
    TooLarge,
    Paused,
    Broken,
}

impl UploadFailure {
    fn error(self, limit: u64, pause: Duration) -> GatewayError {
        match self {
            UploadFailure::TooLarge => GatewayError::PayloadTooLarge {
                limit: usize::try_from(limit).unwrap_or(usize::MAX),
            },
            UploadFailure::Paused => GatewayError::RequestBodyTimeout { after: pause },
            UploadFailure::Broken => GatewayError::InvalidRequest("The request body could not be read.".into()),
        }
    }
}

/// What the upload body tells the exchange: how it ended, once it has
/// (`None` while it is still going).
struct Upload(watch::Sender<Option<Result<(), UploadFailure>>>);

impl Default for Upload {
    fn default() -> Self {
        Upload(watch::Sender::new(None))
    }
}

impl Upload {
    fn failure(&self) -> Option<UploadFailure> {
        (*self.0.borrow())?.err()
    }

    fn finish(&self, failure: Option<UploadFailure>) {
        self.0.send_replace(Some(failure.map_or(Ok(()), Err)));
    }

    /// Resolves once the whole body has gone upstream (never, if it failed:
    /// the exchange fails then anyway).
    async fn finished(&self) {
        let mut ended = self.0.subscribe();
        match ended.wait_for(Option::is_some).await.map(|end| *end) {
            Ok(Some(Ok(()))) => {}
            _ => std::future::pending().await,
        }
    }
}

/// The client's body on its way upstream: counted against the limit, and
/// failed when the client pauses longer than `server.request_body_timeout`.
struct UploadBody {
    body: axum::body::Body,
    stall: crate::net::Stall,
    seen: u64,
    limit: u64,
    watch: Arc<Upload>,
}

impl hyper::body::Body for UploadBody {
    type Data = Bytes;
    type Error = BodyFailed;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyFailed>>> {
        let this = &mut *self;
        let frame = Pin::new(&mut this.body).poll_frame(cx);
        let failed = |this: &mut Self, why: UploadFailure, what: &'static str| {
            this.watch.finish(Some(why));
            Poll::Ready(Some(Err(BodyFailed(what))))
        };
        match ready!(this.stall.watch(cx, frame)) {
            None => failed(this, UploadFailure::Paused, "the client paused its body"),
            Some(None) => {
                this.watch.finish(None);
                Poll::Ready(None)
            }
            Some(Some(Err(_))) => failed(this, UploadFailure::Broken, "the client's body broke off"),
            Some(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.seen += data.len() as u64;
                    if this.seen > this.limit {
                        return failed(this, UploadFailure::TooLarge, "over server.max_passthrough_body_bytes");
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The upstream's answer on its way to the client: each chunk within the
/// upstream's `idle_timeout` of the last, all of it within `request_timeout`
/// of the request's start.
/// It holds the request's record, written at the end: complete, broken
/// (the client's connection is cut, as a proxy must for a body it cannot
/// finish), or abandoned by the client (`Drop`, 499).
struct Download {
    body: crate::upstream::Body,
    idle: crate::net::Stall,
    deadline: Pin<Box<Sleep>>,
    status: StatusCode,
    record: Option<RequestRecord>,
    upstream: Arc<str>,
}

impl Download {
    fn new(
        body: crate::upstream::Body,
        upstream: &Upstream,
        status: StatusCode,
        deadline: Instant,
        record: RequestRecord,
    ) -> Self {
        Self {
            body,
            idle: crate::net::Stall::new(upstream.config.idle_timeout),
            deadline: Box::pin(tokio::time::sleep_until(deadline)),
            status,
            record: Some(record),
            upstream: upstream.name.clone(),
        }
    }

    fn end(&mut self, error: Option<GatewayError>) {
        if let Some(record) = self.record.take() {
            match error {
                None => record.finish(self.status.as_u16(), Outcome::of_status(self.status.as_u16()), None),
                Some(e) => record.finish(self.status.as_u16(), e.outcome(), Some(e.code())),
            }
        }
    }
}

impl Drop for Download {
    /// hyper stops polling a body that says it has ended (a known length,
    /// all sent, or none at all): that is a complete answer, not a client
    /// that left.
    fn drop(&mut self) {
        if self.record.is_some() && self.body.is_end_stream() {
            self.end(None);
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the upstream's answer broke off")]
struct DownloadFailed;

impl hyper::body::Body for Download {
    type Data = Bytes;
    type Error = DownloadFailed;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, DownloadFailed>>> {
        let this = &mut *self;
        if this.record.is_none() {
            return Poll::Ready(None);
        }
        let upstream = |this: &Self| this.upstream.to_string();
        if this.deadline.as_mut().poll(cx).is_ready() {
            this.end(Some(GatewayError::UpstreamTimeout {
                upstream: upstream(this),
                kind: crate::error::TimeoutKind::Request,
            }));
            return Poll::Ready(Some(Err(DownloadFailed)));
        }
        let frame = Pin::new(&mut this.body).poll_frame(cx);
        match ready!(this.idle.watch(cx, frame)) {
            Some(Some(Ok(frame))) => Poll::Ready(Some(Ok(frame))),
            Some(None) => {
                this.end(None);
                Poll::Ready(None)
            }
            Some(Some(Err(_))) => {
                this.end(Some(GatewayError::UpstreamReset {
                    upstream: upstream(this),
                }));
                Poll::Ready(Some(Err(DownloadFailed)))
            }
            None => {
                this.end(Some(GatewayError::UpstreamTimeout {
                    upstream: upstream(this),
                    kind: crate::error::TimeoutKind::Idle,
                }));
                Poll::Ready(Some(Err(DownloadFailed)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
