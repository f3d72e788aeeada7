//! The breaker as a tower layer: it gates each attempt with the target
//! upstream's breaker (`upstream::breaker`) and feeds it the attempt's outcome.

use std::task::{Context, Poll};

use tower::{Layer, Service};

use super::call::{classify, Answer, AttemptError, BoxFuture, Call};
use crate::outcome::Verdict;
use crate::upstream::Reply;

/// Gates attempts with the target upstream's breaker and feeds it each
/// attempt's outcome.
#[derive(Clone, Default)]
pub struct CircuitLayer;

impl<S> Layer<S> for CircuitLayer {
    type Service = Circuit<S>;
    fn layer(&self, inner: S) -> Circuit<S> {
        Circuit { inner }
    }
}

#[derive(Clone)]
pub struct Circuit<S> {
    inner: S,
}

impl<S> Service<Call> for Circuit<S>
where
    S: Service<Call, Response = Answer, Error = AttemptError> + Clone + Send + 'static,
    S::Future: Send,
{
    type Response = Answer;
    type Error = AttemptError;
    type Future = BoxFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), AttemptError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, call: Call) -> Self::Future {
        let breaker = call.upstream().state.breaker.clone();
        let ticket = match breaker.try_acquire() {
            Ok(t) => t,
            Err(retry_after) => {
                let upstream = call.upstream().index;
                return Box::pin(async move { Err(AttemptError::circuit_open(upstream, retry_after)) });
            }
        };
        let fut = self.inner.call(call);
        Box::pin(async move {
            let mut result = fut.await;
            match (classify(&result), &mut result) {
                // A committed stream is judged when it ends (the request
                // record settles the ticket), so a stream that breaks after
                // its first event counts once, as a failure. A half-open
                // probe settles here, at the first event: holding the probe
                // slot for a minutes-long stream would keep the breaker
                // half-open that long.
                (
                    Verdict::Success,
                    Ok(
                        answer @ Answer {
                            reply: Reply::Stream { .. },
                            ..
                        },
                    ),
                ) if !ticket.is_probe() => answer.ticket = Some(ticket),
                (Verdict::Success, _) => ticket.success(),
                (Verdict::Failure(error), _) => ticket.failure(error),
                // 429, 401/403, client 4xx, 501/505 and skips say nothing
                // about health.
                _ => drop(ticket),
            }
            result
        })
    }
}
