//! Upstream-scoped rate limits, per attempt: the relay account's own quota.
//! A refusal made no upstream call, so the retry policy treats it like a
//! full upstream and fails over; with nowhere to go, the client gets the
//! limiter's 429. Key, model and global rules run once per request, before
//! the stack, in `proxy`.

use std::task::{Context, Poll};

use tower::{Layer, Service};

use super::{Answer, AttemptError, BoxFuture, Call};
use crate::telemetry::metrics::ErrorType;

#[derive(Clone, Default)]
pub struct UpstreamLimitLayer;

impl<S> Layer<S> for UpstreamLimitLayer {
    type Service = UpstreamLimit<S>;
    fn layer(&self, inner: S) -> UpstreamLimit<S> {
        UpstreamLimit { inner }
    }
}

#[derive(Clone)]
pub struct UpstreamLimit<S> {
    inner: S,
}

impl<S> Service<Call> for UpstreamLimit<S>
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

    fn call(&mut self, call: Call) -> BoxFuture {
        let limiter = call.ctx.limiter.clone();
        if !limiter.has_rules() {
            return Box::pin(self.inner.call(call));
        }
        let mut inner = self.inner.clone();
        Box::pin(async move {
            let upstream = call.upstream_index();
            let name = call.upstream().name.clone();
            let admission = limiter
                .admit_upstream(&name, call.ctx.estimated_tokens)
                .await
                .map_err(|rejection| AttemptError {
                    error: rejection.into(),
                    error_type: ErrorType::RateLimited,
                    status: None,
                    upstream: Some(upstream),
                })?;
            match inner.call(call).await {
                Ok(mut answer) => {
                    answer.admission = Some(admission);
                    Ok(answer)
                }
                Err(e) => {
                    // The attempt used no tokens.
                    admission.reconcile_in_background(0);
                    Err(e)
                }
            }
        })
    }
}
