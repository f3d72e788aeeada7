//! Hedging, opt-in per model (`hedge_after = "800ms"` or `"p95"`).
//!
//! If the first target has not answered (response headers, or a stream's
//! first event) within the delay, the same call goes to the next available
//! target on another upstream as well. The first success wins; the other
//! future is dropped, which cancels its upstream request. A hedge spends the
//! retry budget like a retry, so hedging cannot multiply load when an
//! upstream is slow for everyone. With `"p95"` the delay is the primary
//! upstream's observed first-byte p95 (no hedge until enough samples).

use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::{select, Either};
use tower::retry::budget::Budget;
use tower::{Layer, Service, ServiceExt};

use super::call::{Answer, AttemptError, BoxFuture, Call};
use super::route::Route;
use crate::config::Hedge;

#[derive(Clone)]
pub struct HedgeLayer {
    route: Arc<Route>,
}

impl HedgeLayer {
    pub fn new(route: Arc<Route>) -> Self {
        Self { route }
    }
}

impl<S> Layer<S> for HedgeLayer {
    type Service = HedgeService<S>;
    fn layer(&self, inner: S) -> HedgeService<S> {
        HedgeService {
            inner,
            route: self.route.clone(),
        }
    }
}

#[derive(Clone)]
pub struct HedgeService<S> {
    inner: S,
    route: Arc<Route>,
}

impl<S> Service<Call> for HedgeService<S>
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
        let delay = match self.route.hedge {
            None => None,
            Some(Hedge::After(d)) => Some(d),
            Some(Hedge::P95) => call.upstream().state.first_byte.p95(),
        };
        let Some(delay) = delay else {
            return Box::pin(self.inner.call(call));
        };
        let inner = self.inner.clone();
        let primary_fut = Box::pin(self.inner.call(call.clone()));
        let route = self.route.clone();
        Box::pin(async move {
            let mut primary = primary_fut;
            let sleep = Box::pin(tokio::time::sleep(delay));
            match select(primary, sleep).await {
                Either::Left((result, _)) => return result,
                Either::Right(((), pending)) => primary = pending,
            }
            let primary_upstream = call.upstream().index;
            let Some(target) = route.pick(|t| t.upstream.index != primary_upstream) else {
                return primary.await;
            };
            if !route.budget.withdraw() {
                return primary.await;
            }
            let hedge_call = Call { target, ctx: call.ctx };
            let hedge = Box::pin(inner.oneshot(hedge_call));
            match select(primary, hedge).await {
                Either::Left((Ok(answer), _)) => {
                    route.count_hedge(false);
                    Ok(answer)
                }
                Either::Right((Ok(answer), _)) => {
                    route.count_hedge(true);
                    Ok(answer)
                }
                // One failed: the other may still answer.
                Either::Left((Err(_), hedge)) => {
                    let result = hedge.await;
                    route.count_hedge(result.is_ok());
                    result
                }
                Either::Right((Err(_), primary)) => {
                    route.count_hedge(false);
                    primary.await
                }
            }
        })
    }
}

/// The delay a model would hedge after, for docs and admin output.
pub fn describe(hedge: Option<Hedge>) -> Option<String> {
    match hedge? {
        Hedge::After(d) => Some(humantime::format_duration(d).to_string()),
        Hedge::P95 => Some("p95".into()),
    }
}
