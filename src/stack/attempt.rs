//! The innermost service: one HTTP exchange with the target's upstream, and
//! the attempt's metrics and trace span.

use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;
use tower::Service;

use super::balance::Settled;
use super::call::{classify, Answer, AttemptError, BoxFuture, Call};
use super::retry::cooldown_after;
use crate::outcome::{ErrorType, Verdict};
use crate::telemetry::metrics::UpstreamMetrics;
use crate::telemetry::otel::{new_span_id, AttemptSpan};
use crate::upstream::{Attempt, Reply, Upstream};

/// The innermost service: one HTTP exchange with the target's upstream. It
/// records the attempt's metrics, except for a committed stream, whose
/// attempt ends with the stream (see `gateway::record`).
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
            let target = call.target();
            let upstream = &target.upstream;
            ctx.attempts.fetch_add(1, Ordering::AcqRel);
            let mut headers = ctx.headers.clone();
            let span = ctx.trace.as_ref().map(|(context, _)| {
                let id = new_span_id();
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
            // Latency and cost routing: waiting, then in flight (dropped
            // unsettled when this future is, as a lost hedge is).
            let pending = ctx.route.begin(call.target);
            let mut headers_at = None;
            let result = upstream
                .send_timed(attempt, ctx.route.max_response_bytes, &mut headers_at)
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
            let mut result = result.map(|reply| Answer {
                reply,
                target: call.target,
                started,
                permit: None,
                admission: None,
                budget: None,
                ticket: None,
                in_flight: None,
            });
            if let Some(pending) = pending {
                let how = settled(
                    &result,
                    headers_at.map(|at| at - started),
                    ctx.route.retry.retry_after_cap,
                );
                let in_flight = ctx.route.settle(call.target, pending, how);
                if let Ok(
                    answer @ Answer {
                        reply: Reply::Stream { .. },
                        ..
                    },
                ) = &mut result
                {
                    answer.in_flight = in_flight;
                }
            }
            result
        })
    }
}

/// What an attempt's result teaches its target's estimate (`balance`), by
/// the table in `outcome`: a success is a sample, at the headers of a plain
/// answer and the first event of a stream; a failure, a 401/403 (a key the
/// upstream refuses fails every request over) and a timeout at the
/// request's deadline are penalties; a 429 holds it for its cooldown.
fn settled(result: &Result<Answer, AttemptError>, headers_after: Option<Duration>, cap: Duration) -> Settled {
    match classify(result) {
        Verdict::Success => match result {
            Ok(Answer {
                reply: Reply::Stream { .. },
                ..
            }) => Settled::FirstByte(None),
            _ => Settled::FirstByte(headers_after),
        },
        Verdict::Failure(_) | Verdict::Auth => Settled::Failure,
        Verdict::RateLimited => Settled::RateLimited(cooldown_after(result, cap)),
        Verdict::Final if matches!(result, Err(e) if e.error_type == ErrorType::Timeout) => Settled::Failure,
        Verdict::Final | Verdict::Neutral | Verdict::Skip(_) => Settled::Neutral,
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
