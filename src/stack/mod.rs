//! The upstream stack: every attempt of a proxied request goes through these
//! tower layers. This comment is the one place that lists their order.
//!
//! ```text
//! proxy::handle          shed (server.max_in_flight) → auth → body → parse → route
//!  └─ Retry<FailoverPolicy>   retry.rs    picks the next target after a retryable failure:
//!     │                                   a different upstream first (failover, no sleep),
//!     │                                   the same one after full-jitter backoff; spends the
//!     │                                   model's retry budget; never sleeps past the deadline;
//!     │                                   cools an upstream on 429 (Retry-After, capped)
//!     └─ Hedge                hedge.rs    optional per model: after `hedge_after` without an
//!        │                                answer, the same call to the next target; first wins
//!        └─ Circuit           circuit.rs  the target upstream's breaker: refuses fast when open,
//!           │                             admits probes when half-open, learns every outcome
//!           └─ UpstreamLimit  ratelimit.rs upstream-scoped rate limits (the relay account's quota)
//!           └─ Concurrency    this file   the upstream's max_concurrency: a fast refusal when full
//!              └─ Attempt     this file   one HTTP exchange (Upstream::send): connect_timeout,
//!                                         first_byte_timeout and request_timeout are enforced
//!                                         there, because a stream's "first byte" is its first
//!                                         SSE event, which only the reader of the body sees
//! ```
//!
//! Why this order: the breaker sits inside the hedge and the retry so that
//! each attempt (a retry, a failover, a hedge) consults and feeds the breaker
//! of the upstream it actually goes to. The upstream rate limit and the
//! concurrency gate sit inside the breaker so that a refusal for quota or
//! load is never taken as ill health, and outside the attempt so that a
//! refused attempt makes no upstream call. The
//! retry policy is outermost because it owns the request's one deadline.
//!
//! Rate limiting (key, model and global scopes) runs before this stack, in
//! `proxy`; upstream-scoped limits are checked per attempt.

pub mod circuit;
pub mod hedge;
pub mod limits;
pub mod retry;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tower::retry::budget::TpsBudget;
use tower::{Layer, Service, ServiceBuilder, ServiceExt};

use crate::config::{ModelConfig, TargetConfig};
use crate::gateway::state::Runtime;
use crate::ratelimit::{Admission, Limiter};
use crate::request::{Endpoint, ParsedRequest};
use crate::telemetry::metrics::{ErrorType, Metrics, UpstreamMetrics};
use crate::telemetry::otel::{AttemptSpan, TraceContext};
use crate::upstream::{Attempt, Reply, Upstream};

pub use crate::upstream::AttemptError;

/// Everything about one client request that its attempts share.
pub struct CallContext {
    pub runtime: Arc<Runtime>,
    pub metrics: Arc<Metrics>,
    pub model: usize,
    pub endpoint: Endpoint,
    pub parsed: ParsedRequest,
    pub body: Bytes,
    pub headers: HeaderMap,
    /// `request_timeout` of the first target, from the request's arrival.
    pub deadline: Instant,
    /// Upstream calls made so far (refusals by a breaker or a limit excluded).
    pub attempts: AtomicU32,
    pub limiter: Limiter,
    /// Tokens reserved per rate-limit admission before usage is known.
    pub estimated_tokens: u64,
    /// With OTLP export on: the trace context for attempt spans (parent =
    /// the request span) and where the attempts put their spans.
    pub trace: Option<(TraceContext, Arc<Mutex<Vec<AttemptSpan>>>)>,
}

impl CallContext {
    pub fn model(&self) -> &ModelConfig {
        &self.runtime.config.models[self.model]
    }

    pub fn model_label(&self) -> &str {
        &self.runtime.model_metrics[self.model].label
    }

    pub fn upstream_of(&self, target: usize) -> &Upstream {
        &self.runtime.upstreams[self.model().targets[target].upstream]
    }

    /// A target for the next attempt: the lowest priority among the
    /// available targets that pass `keep`, by weight within that priority.
    pub fn pick(&self, keep: impl Fn(&TargetConfig) -> bool) -> Option<usize> {
        let targets = &self.model().targets;
        let candidates: Vec<usize> = (0..targets.len())
            .filter(|&i| keep(&targets[i]) && self.runtime.upstreams[targets[i].upstream].available())
            .collect();
        let best = candidates.iter().map(|&i| targets[i].priority).min()?;
        let tier: Vec<usize> = candidates
            .into_iter()
            .filter(|&i| targets[i].priority == best)
            .collect();
        let total: u64 = tier.iter().map(|&i| u64::from(targets[i].weight)).sum();
        let mut ticket = fastrand::u64(..total.max(1));
        for &i in &tier {
            let w = u64::from(targets[i].weight);
            if ticket < w {
                return Some(i);
            }
            ticket -= w;
        }
        tier.last().copied()
    }

    /// The first target, or why there is none: every breaker open (503 with
    /// the time to the first half-open), or every upstream cooling or full.
    pub fn first_target(&self) -> Result<usize, crate::error::GatewayError> {
        if let Some(t) = self.pick(|_| true) {
            return Ok(t);
        }
        let upstreams = || self.model().targets.iter().map(|t| &self.runtime.upstreams[t.upstream]);
        if upstreams().all(|u| !u.state.breaker.available()) {
            let retry_after = upstreams()
                .map(|u| u.state.breaker.retry_after())
                .min()
                .unwrap_or_default();
            return Err(crate::error::GatewayError::CircuitOpen { retry_after });
        }
        // Cooling after a 429, or at max_concurrency: let the first target's
        // attempt decide (the retry policy waits out a cooldown that fits).
        Ok(0)
    }
}

/// One attempt: which target, and the shared request.
#[derive(Clone)]
pub struct Call {
    pub target: usize,
    pub ctx: Arc<CallContext>,
}

impl Call {
    pub fn upstream(&self) -> &Upstream {
        self.ctx.upstream_of(self.target)
    }

    pub fn upstream_index(&self) -> usize {
        self.ctx.model().targets[self.target].upstream
    }
}

/// A successful attempt (any HTTP status that is passed through).
pub struct Answer {
    pub reply: Reply,
    /// Index into the model's targets.
    pub target: usize,
    pub upstream: usize,
    pub started: Instant,
    /// Held until the request ends (for a stream, its last byte).
    pub permit: Option<OwnedSemaphorePermit>,
    /// Upstream-scoped rate-limit reservations, reconciled with the usage.
    pub admission: Option<Admission>,
}

/// What an attempt's result means for breakers and retries.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Class {
    /// A 2xx (for a stream: its first event arrived).
    Success,
    /// A client 4xx from upstream: pass it through; health unaffected.
    Neutral,
    /// The upstream is unhealthy: counts against its breaker; retryable.
    Failure(ErrorType),
    /// 429: cool the upstream for the hinted time; fail over.
    RateLimited(Option<Duration>),
    /// 401/403: relaygate's key for this upstream is wrong; fail over.
    Auth,
    /// No upstream call was made (breaker open, concurrency full).
    Skip(ErrorType),
    /// Not retryable: the deadline is spent.
    Final,
}

/// The breaker failure an upstream HTTP status stands for, if any.
pub fn classify_status(status: u16) -> Option<ErrorType> {
    matches!(status, 500 | 502 | 503 | 504).then_some(ErrorType::ServerError)
}

pub fn classify(result: &Result<Answer, AttemptError>) -> Class {
    match result {
        Ok(answer) => match &answer.reply {
            Reply::Stream { .. } => Class::Success,
            Reply::Full { status, headers, .. } => match status.as_u16() {
                200..=399 => Class::Success,
                429 => Class::RateLimited(crate::upstream::retry_after_hint(headers)),
                401 | 403 => Class::Auth,
                s if classify_status(s).is_some() => Class::Failure(ErrorType::ServerError),
                400..=499 => Class::Neutral,
                // Other 5xx (501, 505, …) describe the request, not health.
                _ => Class::Neutral,
            },
        },
        Err(e) => match e.error_type {
            ErrorType::CircuitOpen | ErrorType::Overloaded => Class::Skip(e.error_type),
            // Refused by an upstream-scoped rate limit: no call was made.
            ErrorType::RateLimited => Class::Skip(ErrorType::RateLimited),
            ErrorType::Timeout
                if matches!(
                    e.error,
                    crate::error::GatewayError::UpstreamTimeout {
                        kind: crate::error::TimeoutKind::Request,
                        ..
                    }
                ) =>
            {
                Class::Final
            }
            ErrorType::Cancelled => Class::Final,
            other => Class::Failure(other),
        },
    }
}

/// Runs one client request through the stack, starting at `first`.
pub async fn call(ctx: Arc<CallContext>, first: usize) -> Result<Answer, AttemptError> {
    let budget = ctx.runtime.budgets[ctx.model].clone();
    tower::retry::budget::Budget::deposit(&*budget);
    let hedge = ctx.model().hedge;
    let stack = ServiceBuilder::new()
        .layer(tower::retry::RetryLayer::new(retry::FailoverPolicy::new(
            budget.clone(),
        )))
        .layer(hedge::HedgeLayer::new(hedge, budget))
        .layer(circuit::CircuitLayer)
        .layer(limits::UpstreamLimitLayer)
        .layer(ConcurrencyLayer)
        .service(AttemptService);
    stack.oneshot(Call { target: first, ctx }).await
}

pub type BoxFuture = Pin<Box<dyn Future<Output = Result<Answer, AttemptError>> + Send>>;

/// The upstream's `max_concurrency`: refuse at once when it is full, so the
/// retry policy can fail over instead of queueing without bound.
#[derive(Clone, Default)]
pub struct ConcurrencyLayer;

impl<S> Layer<S> for ConcurrencyLayer {
    type Service = Concurrency<S>;
    fn layer(&self, inner: S) -> Concurrency<S> {
        Concurrency { inner }
    }
}

#[derive(Clone)]
pub struct Concurrency<S> {
    inner: S,
}

impl<S> Service<Call> for Concurrency<S>
where
    S: Service<Call, Response = Answer, Error = AttemptError> + Send + 'static,
    S::Future: Send,
{
    type Response = Answer;
    type Error = AttemptError;
    type Future = BoxFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), AttemptError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, call: Call) -> BoxFuture {
        let permit = match &call.upstream().limit {
            None => None,
            Some(limit) => match limit.clone().try_acquire_owned() {
                Ok(p) => Some(p),
                Err(_) => {
                    let upstream = call.upstream_index();
                    return Box::pin(async move { Err(AttemptError::overloaded(upstream)) });
                }
            },
        };
        let fut = self.inner.call(call);
        Box::pin(async move {
            let mut answer = fut.await?;
            answer.permit = permit;
            Ok(answer)
        })
    }
}

/// The innermost service: one HTTP exchange with the target's upstream. It
/// records the attempt's metrics, except for a committed stream, whose
/// attempt ends with the stream (see `observe`).
#[derive(Clone, Copy, Default)]
pub struct AttemptService;

impl Service<Call> for AttemptService {
    type Response = Answer;
    type Error = AttemptError;
    type Future = BoxFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), AttemptError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, call: Call) -> BoxFuture {
        Box::pin(async move {
            let ctx = &call.ctx;
            let upstream = call.upstream();
            let target = &ctx.model().targets[call.target];
            ctx.attempts.fetch_add(1, Ordering::AcqRel);
            let mut headers = ctx.headers.clone();
            let span = ctx.trace.as_ref().map(|(context, _)| {
                let id = crate::telemetry::otel::new_span_id();
                headers.insert(http::HeaderName::from_static("traceparent"), context.traceparent(id));
                (id, std::time::SystemTime::now())
            });
            let attempt = Attempt {
                endpoint: ctx.endpoint,
                body: ctx.parsed.body_for(&ctx.body, &target.model),
                headers,
                stream: ctx.parsed.stream,
                deadline: ctx.deadline,
            };
            let mut guard = AttemptGuard {
                metrics: &upstream.metrics,
                started: Instant::now(),
                done: false,
            };
            let result = upstream
                .send(attempt, ctx.runtime.config.server.max_response_bytes)
                .await;
            let started = guard.started;
            if let (Some(span), Some((_, spans))) = (span, &ctx.trace) {
                spans.lock().unwrap_or_else(|e| e.into_inner()).push(attempt_span(
                    span,
                    upstream,
                    &target.model,
                    &result,
                ));
            }
            match &result {
                Ok(Reply::Stream { .. }) => {
                    upstream.state.first_byte.record(started.elapsed());
                    guard.done = true; // recorded when the stream ends
                }
                Ok(Reply::Full { status, .. }) => {
                    if status.is_success() {
                        upstream.state.first_byte.record(started.elapsed());
                    }
                    guard.finish(Some(status.as_u16()), ErrorType::of_status(status.as_u16()));
                }
                Err(e) => guard.finish(e.status, e.error_type),
            }
            result.map(|reply| Answer {
                reply,
                target: call.target,
                upstream: upstream.index,
                started,
                permit: None,
                admission: None,
            })
        })
    }
}

/// The trace span of one finished attempt.
fn attempt_span(
    (span_id, start): ([u8; 8], std::time::SystemTime),
    upstream: &Upstream,
    upstream_model: &str,
    result: &Result<Reply, AttemptError>,
) -> AttemptSpan {
    let (status, error_type) = match result {
        Ok(Reply::Full { status, .. }) | Ok(Reply::Stream { status, .. }) => (Some(status.as_u16()), None),
        Err(e) => (e.status, Some(e.error_type.as_str().to_owned())),
    };
    AttemptSpan {
        span_id,
        upstream: upstream.name.to_string(),
        upstream_model: upstream_model.to_owned(),
        server_address: upstream.host.clone(),
        start,
        end: std::time::SystemTime::now(),
        status,
        error_type,
    }
}

/// Records one attempt in `relaygate_upstream_requests_total` and
/// `relaygate_upstream_duration_seconds`; if dropped first (the client left,
/// or a hedge lost), as `cancelled`.
struct AttemptGuard<'a> {
    metrics: &'a UpstreamMetrics,
    started: Instant,
    done: bool,
}

impl AttemptGuard<'_> {
    fn finish(&mut self, status: Option<u16>, error_type: ErrorType) {
        self.done = true;
        self.metrics.attempt(status, error_type, self.started);
    }
}

impl Drop for AttemptGuard<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.metrics.attempt(None, ErrorType::Cancelled, self.started);
        }
    }
}

/// The retry budget of one model: tower's, from `[retry]`.
pub fn budget(cfg: &crate::config::RetryConfig) -> Arc<TpsBudget> {
    Arc::new(TpsBudget::new(
        Duration::from_secs(10),
        cfg.min_retries_per_second,
        cfg.budget_ratio as f32,
    ))
}
