//! The innermost service: one HTTP exchange with the target's upstream, and
//! the attempt's metrics and trace span.

use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use tokio::time::Instant;
use tower::Service;

use super::call::{Answer, AttemptError, BoxFuture, Call};
use crate::outcome::ErrorType;
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
            let result = upstream.send(attempt, ctx.route.max_response_bytes).await;
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
                started,
                permit: None,
                admission: None,
                ticket: None,
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
