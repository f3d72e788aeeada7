//! The path of one proxied request, in order:
//!
//! 0. load shedding: `server.max_in_flight`, before anything else;
//! 1. auth: the client key, before the body is read;
//! 2. body: `Content-Length` checked against `max_body_bytes` before reading,
//!    and the stream counted while reading (chunked bodies);
//! 3. parse once (`request::parse`): `model`, `stream`, `messages`;
//! 4. route: the model's first available target by priority and weight;
//!    the response cache (`cache`), for a model that uses it: a hit answers
//!    here, a plain miss may wait for an identical request in flight;
//!    then the key, model and global rate limits, then the key, model and
//!    global spend budgets (`budget`);
//! 5. the upstream stack (`stack`): retries, failover, hedging, breakers and
//!    concurrency limits around each attempt, under one deadline;
//! 6. the reply: a buffered body, or a stream forwarded event by event
//!    (`gateway::stream::forward`) under the idle and total deadlines.
//!
//! The `RequestRecord` follows the request to its end (into the stream body
//! for streams) and records metrics and the access log exactly once.

use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{header, HeaderName, HeaderValue, StatusCode};
use http_body_util::{BodyExt, Limited};
use tokio::time::Instant;
use tower_http::request_id::RequestId;

use super::cached::Lookup;
use crate::cache::{self, Capture};
use crate::error::{clip, GatewayError};
use crate::gateway::record::RequestRecord;
use crate::gateway::state::{AppState, Runtime};
use crate::request::{self, Endpoint};
use crate::sse::SseReader;
use crate::stack::{self, CallContext};
use crate::telemetry::metrics::Outcome;
use crate::upstream::{forwardable_headers, Reply};

/// Names the upstream that answered, for debugging through a chain of proxies.
static UPSTREAM_HEADER: HeaderName = HeaderName::from_static("x-relaygate-upstream");
/// The response cache's part in the answer: hit, miss, bypass or refresh.
static CACHE_HEADER: HeaderName = HeaderName::from_static("x-relaygate-cache");

pub async fn handle(state: AppState, endpoint: Endpoint, req: Request) -> Response {
    let started = Instant::now();
    let runtime = state.runtime();
    let request_id = req.extensions().get::<RequestId>().map(|id| id.header_value().clone());
    let mut record = RequestRecord::new(state.sinks().clone(), endpoint, started, request_id);
    // Load shedding first: it is the cheapest refusal. The slot is held to
    // the request's last byte (for a stream, its end).
    let Some(slot) = state.try_admit() else {
        let error = GatewayError::Overloaded;
        record.finish_error(&error);
        return error.into_response();
    };
    record.hold(Some(slot));
    let result = run(&runtime, &state, endpoint, req, &mut record, started).await;
    let cache_result = record.cache_result();
    // Everything up to here that was not spent waiting on the upstream is
    // relaygate's own time (for streams: up to the first event).
    state
        .metrics()
        .overhead
        .observe(started.elapsed().saturating_sub(record.upstream_wait()).as_secs_f64());
    let mut response = match result {
        Ok(Proxied::Full {
            status,
            mut headers,
            body,
            upstream,
        }) => {
            record.write_rate_limit_headers(&mut headers);
            record.finish(status.as_u16(), Outcome::of_status(status.as_u16()), None);
            headers.insert(UPSTREAM_HEADER.clone(), upstream);
            headers
                .entry(header::CONTENT_TYPE)
                .or_insert(HeaderValue::from_static("application/octet-stream"));
            // The upstream's header map becomes the response's: no copy.
            let mut response = Response::new(axum::body::Body::from(body));
            *response.status_mut() = status;
            *response.headers_mut() = headers;
            response
        }
        Ok(Proxied::Stream {
            status,
            mut headers,
            first,
            reader,
            idle,
            deadline,
            strip_usage,
            upstream,
            capture,
        }) => {
            record.write_rate_limit_headers(&mut headers);
            let body = super::stream::forward(reader, first, idle, deadline, strip_usage, record, capture.map(|c| *c));
            headers.insert(UPSTREAM_HEADER.clone(), upstream);
            let mut response = Response::new(body);
            *response.status_mut() = status;
            *response.headers_mut() = headers;
            response
        }
        Err(error) => {
            record.finish_error(&error);
            error.into_response()
        }
    };
    // Every answer of a cache-enabled model says what the cache did, errors too.
    if let Some(result) = cache_result {
        response
            .headers_mut()
            .insert(CACHE_HEADER.clone(), HeaderValue::from_static(result.as_str()));
    }
    response
}

pub(super) enum Proxied {
    Full {
        status: StatusCode,
        headers: http::HeaderMap,
        body: Bytes,
        upstream: HeaderValue,
    },
    Stream {
        status: StatusCode,
        headers: http::HeaderMap,
        first: Bytes,
        reader: SseReader,
        idle: Duration,
        deadline: Instant,
        strip_usage: bool,
        upstream: HeaderValue,
        capture: Option<Box<Capture>>,
    },
}

async fn run(
    runtime: &Arc<Runtime>,
    state: &AppState,
    endpoint: Endpoint,
    req: Request,
    record: &mut RequestRecord,
    started: Instant,
) -> Result<Proxied, GatewayError> {
    let (parts, body) = req.into_parts();
    let key = runtime.keys.authenticate(&parts.headers)?;
    record.set_key(key.clone());

    let limit = runtime.config.server.max_body_bytes;
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(GatewayError::PayloadTooLarge { limit });
    }
    // A client that stops sending its body must not hold the request (and
    // its in-flight slot) forever: at most `request_body_timeout` between
    // two pieces of it, as nginx's `client_body_timeout`.
    let pause = runtime.config.server.request_body_timeout;
    let body = Limited::new(PausedBody::new(body, pause), limit)
        .collect()
        .await
        .map_err(|e| body_error(&*e, limit, pause))?
        .to_bytes();

    // The (prompt, completion) token estimate, for whichever needs it (token
    // rate limits, spend budgets), from the same pass as the parse.
    let limiter = state.limiter();
    let budgets = state.budgets();
    let (parsed, estimate) = if limiter.counts_tokens() || !budgets.is_empty() {
        let default_max_tokens = match endpoint {
            Endpoint::Embeddings => 0,
            _ => limiter.settings().default_max_tokens,
        };
        let (parsed, estimate) = request::parse_with_estimate(endpoint, &body, default_max_tokens)?;
        if parsed.stream {
            record.set_prompt_tokens(estimate.0);
        }
        (parsed, estimate)
    } else {
        let parsed = request::parse(endpoint, &body)?;
        if parsed.stream {
            record.set_prompt_estimate(&body);
        }
        (parsed, (0, 0))
    };
    let model = runtime
        .model(&parsed.model)
        .ok_or_else(|| GatewayError::ModelNotFound(clip(&parsed.model)))?;
    let route = &model.route;
    record.set_model(model.metrics.clone(), model.config.price, parsed.stream);
    // One deadline for the whole request: the first target's request_timeout.
    let deadline = started + route.targets[0].upstream.config.request_timeout;

    // The response cache: a hit answers here; a miss carries its plan to
    // the store.
    let plan = match super::cached::look_up(
        state,
        model,
        endpoint,
        &parts.headers,
        &body,
        &parsed,
        &key,
        deadline,
        record,
    )
    .await?
    {
        Lookup::Hit(answer) => return Ok(answer),
        Lookup::Miss(plan) => Some(plan),
        Lookup::Off => None,
    };

    // Key, model and global rate limits, once per request (queue rules may
    // wait here, bounded; a client that leaves drops out of the queue).
    let estimated_tokens = if limiter.has_rules() {
        let tokens = if limiter.counts_tokens() {
            estimate.0.saturating_add(estimate.1)
        } else {
            0
        };
        record.set_admission(limiter.admit_request(&key, &route.label, tokens).await?);
        tokens
    } else {
        0
    };

    // Spend budgets of the key, the model and globally, once per request,
    // after the rate limits (a request they refuse reserves nothing) and
    // never for a cache hit (answered above). Upstream budgets are reserved
    // per attempt, at the upstream it goes to (`stack::limits`).
    let budget_micros = if budgets.is_empty() {
        0
    } else {
        let micros = crate::usage::worst_case_micros(model.config.price.as_ref(), estimate);
        record.set_budget(budgets.reserve_request(&key, &route.label, micros).await?);
        micros
    };

    let headers = forwardable_headers(&parts.headers);
    // A sampled share of a shadowed model's requests is mirrored, in the
    // background, beside the primary (see `shadow`).
    if let Some(shadow) = &model.shadow {
        let mirrored = crate::shadow::maybe_mirror(crate::shadow::Mirror {
            shadow: shadow.clone(),
            sinks: state.sinks().clone(),
            limiter: limiter.clone(),
            budgets: budgets.clone(),
            endpoint,
            parsed: parsed.clone(),
            body: body.clone(),
            headers: headers.clone(),
            request_id: record.request_id().to_owned(),
            key: key.clone(),
        });
        record.compare(mirrored && parsed.temperature_zero);
    }

    let ctx = Arc::new(CallContext {
        route: route.clone(),
        endpoint,
        parsed,
        body,
        headers,
        deadline,
        attempts: AtomicU32::new(0),
        limiter: limiter.clone(),
        estimated_tokens,
        budgets: budgets.clone(),
        budget_micros,
        trace: record.start_trace(&parts.headers),
    });
    let first = route.first_target()?;

    let sent = Instant::now();
    let result = stack::call(ctx.clone(), first).await;
    record.add_upstream_wait(sent.elapsed());
    record.set_attempts(ctx.attempts.load(Ordering::Acquire));
    let answer = result.map_err(|e| {
        if let Some(u) = e.upstream {
            record.set_upstream(&runtime.upstreams[u], None);
        }
        e.error
    })?;
    let target = &route.targets[answer.target];
    let upstream = &target.upstream;
    record.set_upstream(upstream, Some(&target.model));
    if target.price.is_some() {
        record.set_price(target.price);
    }
    record.hold(answer.permit);
    record.hold_in_flight(answer.in_flight);
    if let Some(admission) = answer.admission {
        record.set_admission(admission);
    }
    if let Some(budget) = answer.budget {
        record.set_budget(budget);
    }
    let upstream_label = HeaderValue::from_str(&upstream.name).unwrap_or(HeaderValue::from_static("-"));
    match answer.reply {
        Reply::Full {
            status,
            headers,
            body,
            usage,
        } => {
            match usage {
                None if status.is_success() => record.estimate_usage(&ctx.body, &body),
                usage => record.set_usage(usage),
            }
            record.set_answer(&body);
            if endpoint == Endpoint::Responses && status.is_success() {
                super::passthrough::remember_response(state, &body, false, &upstream.name);
            }
            if let Some((cache, mut plan)) = plan {
                cache.store(&mut plan, cache::plain_entry(status, &headers, body.clone(), usage));
            }
            Ok(Proxied::Full {
                status,
                headers,
                body,
                upstream: upstream_label,
            })
        }
        Reply::Stream {
            status,
            headers,
            first,
            reader,
        } => {
            record.commit_stream(answer.ticket, answer.started);
            if endpoint == Endpoint::Responses {
                super::passthrough::remember_response(state, &first, true, &upstream.name);
            }
            let capture = plan.and_then(|(cache, plan)| Capture::new(cache, plan, status, &headers).map(Box::new));
            Ok(Proxied::Stream {
                status,
                headers,
                first,
                reader,
                idle: upstream.config.idle_timeout,
                deadline,
                strip_usage: ctx.parsed.inject_usage,
                upstream: upstream_label,
                capture,
            })
        }
    }
}

/// Why a client's body (read whole, within `limit`) could not be read.
pub(super) fn body_error(e: &(dyn std::error::Error + 'static), limit: usize, pause: Duration) -> GatewayError {
    if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() {
        GatewayError::PayloadTooLarge { limit }
    } else if e.downcast_ref::<BodyPaused>().is_some() {
        GatewayError::RequestBodyTimeout { after: pause }
    } else {
        GatewayError::InvalidRequest("The request body could not be read.".into())
    }
}

/// The client's request body, failing when the client pauses longer than
/// `server.request_body_timeout` between two pieces of it. Written here
/// rather than tower-http's `TimeoutBody`, which arms its timer before it
/// polls the body, i.e. on every request; a body already in hyper's buffer,
/// the usual case, never waits and never needs one (`net::Stall`).
pub(super) struct PausedBody<B> {
    body: B,
    stall: crate::net::Stall,
}

impl<B> PausedBody<B> {
    pub(super) fn new(body: B, pause: Duration) -> Self {
        Self {
            body,
            stall: crate::net::Stall::new(pause),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the client paused its request body for longer than server.request_body_timeout")]
struct BodyPaused;

impl<B> hyper::body::Body for PausedBody<B>
where
    B: hyper::body::Body + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = B::Data;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<B::Data>, Self::Error>>> {
        let this = &mut *self;
        let frame = Pin::new(&mut this.body).poll_frame(cx);
        Poll::Ready(match ready!(this.stall.watch(cx, frame)) {
            Some(frame) => frame.map(|f| f.map_err(Into::into)),
            None => Some(Err(Box::new(BodyPaused))),
        })
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}
