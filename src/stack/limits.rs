//! The per-attempt gates of an upstream, inside the breaker (a refusal is not
//! ill health) and outside the attempt (a refused attempt makes no call):
//!
//! - `UpstreamLimit`: upstream-scoped rate limits, the relay account's own
//!   quota, then upstream-scoped spend budgets (a relay's prepaid credit).
//!   A refusal made no upstream call, so the retry policy treats it like a
//!   full upstream and fails over; with nowhere to go, the client gets the
//!   429. Key, model and global rules and budgets run once per request,
//!   before the stack, in `gateway::handle`.
//! - `Concurrency`: the upstream's `max_concurrency`, a fast refusal when full.

use std::task::{Context, Poll};

use tower::{Layer, Service};

use super::call::{Answer, AttemptError, BoxFuture, Call};
use crate::error::GatewayError;
use crate::outcome::ErrorType;

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
        // Without upstream budgets an attempt neither reserves nor clones
        // the engine (with key or global budgets too).
        let budgets = call.ctx.budgets.has_upstream_budgets();
        if !call.ctx.limiter.has_rules() && !budgets {
            return Box::pin(self.inner.call(call));
        }
        let limiter = call.ctx.limiter.clone();
        let mut inner = self.inner.clone();
        Box::pin(async move {
            let upstream = call.upstream().index;
            let name = call.upstream().name.clone();
            let refused = |error: GatewayError| AttemptError {
                error,
                error_type: ErrorType::RateLimited,
                status: None,
                upstream: Some(upstream),
            };
            let admission = if limiter.has_rules() {
                Some(
                    limiter
                        .admit_upstream(&name, call.ctx.estimated_tokens)
                        .await
                        .map_err(|r| refused(r.into()))?,
                )
            } else {
                None
            };
            // Boxed: the reservation's future (Redis included) is large, and
            // inline it would grow every attempt's future, budgets or not.
            let budget = if budgets {
                let reserve = Box::pin(call.ctx.budgets.reserve_upstream(&name, call.ctx.budget_micros));
                match reserve.await {
                    Ok(r) => Some(r),
                    Err(rejection) => {
                        if let Some(a) = admission {
                            a.reconcile_in_background(0);
                        }
                        return Err(refused(rejection.into()));
                    }
                }
            } else {
                None
            };
            match inner.call(call).await {
                Ok(mut answer) => {
                    answer.admission = admission;
                    answer.budget = budget;
                    Ok(answer)
                }
                Err(e) => {
                    // The attempt used no tokens and cost nothing.
                    if let Some(a) = admission {
                        a.reconcile_in_background(0);
                    }
                    if let Some(b) = budget {
                        b.settle_in_background(0);
                    }
                    Err(e)
                }
            }
        })
    }
}

/// The upstream's `max_concurrency`: refuse at once when it is full, so the
/// retry policy can fail over instead of queueing without bound. tower's
/// `ConcurrencyLimit` would wait for a slot, and free it when the response
/// headers go out; a stream holds its slot to its last byte (`Answer::permit`).
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
                    let upstream = call.upstream().index;
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
