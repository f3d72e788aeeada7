//! Retries and failover, as a `tower::retry::Policy`.
//!
//! After a retryable failure the policy picks the next target:
//! 1. a target on an upstream this request has not tried yet, available
//!    (breaker, 429 cooldown, concurrency): a failover, sent at once;
//! 2. else, when the failure allows it, an available target on an upstream
//!    already tried, after full-jitter exponential backoff
//!    (`random(0, min(max_delay, base_delay * 2^(n-1)))`);
//! 3. after a 429 with nowhere else to go: the same target once its cooldown
//!    ends, if that fits in the deadline; otherwise the 429 goes to the
//!    client with `Retry-After`.
//!
//! Every extra upstream call spends the model's retry budget (tower's
//! `TpsBudget`: `budget_ratio` of requests plus `min_retries_per_second`), so
//! when everything fails, attempts stay close to requests instead of
//! multiplying load. Refusals by a breaker or a concurrency limit made no
//! upstream call and spend nothing. No sleep ever ends past the request's
//! deadline. A client that goes away drops the whole future, sleeps included,
//! so no further attempt is made. Nothing here runs after a stream commits:
//! the stack returns at a stream's first event.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;
use tokio::time::Instant;
use tower::retry::budget::Budget;
use tower::retry::Policy;

use super::call::{classify, Answer, AttemptError, Call};
use super::route::Route;
use crate::error::retry_after_secs;
use crate::outcome::{ErrorType, Verdict};
use crate::upstream::{retry_after_hint, Reply};

/// A 429 without a usable hint cools its upstream this long.
const DEFAULT_COOLDOWN: Duration = Duration::from_secs(1);

#[derive(Clone)]
pub struct FailoverPolicy {
    route: Arc<Route>,
    /// Upstreams this request has been sent to (or refused by), in order.
    tried: Vec<usize>,
}

impl FailoverPolicy {
    pub fn new(route: Arc<Route>) -> Self {
        Self {
            route,
            tried: Vec::with_capacity(4),
        }
    }
}

type Sleep = Pin<Box<dyn Future<Output = ()> + Send>>;

impl Policy<Call, Answer, AttemptError> for FailoverPolicy {
    type Future = Sleep;

    fn clone_request(&mut self, req: &Call) -> Option<Call> {
        Some(req.clone())
    }

    fn retry(&mut self, req: &mut Call, result: &mut Result<Answer, AttemptError>) -> Option<Sleep> {
        let route = &*self.route;
        let failed = req.upstream().index;
        if !self.tried.contains(&failed) {
            self.tried.push(failed);
        }
        let retry = &route.retry;
        let verdict = classify(result);
        let (reason, same_upstream_ok) = match verdict {
            Verdict::Success | Verdict::Neutral | Verdict::Final => return None,
            Verdict::Failure(e) => (e, true),
            Verdict::Auth => (ErrorType::Auth, false),
            Verdict::Skip(e) => (e, false),
            Verdict::RateLimited => {
                req.upstream()
                    .state
                    .cool_for(cooldown_after(result, retry.retry_after_cap));
                (ErrorType::RateLimited, false)
            }
        };
        let skip = matches!(verdict, Verdict::Skip(_));
        let attempts = req.ctx.attempts.load(Ordering::Acquire);
        if !skip && attempts >= retry.max_attempts {
            finish_rate_limited(req, result);
            return None;
        }

        let tried = &self.tried;
        let untried = route.pick(|t| !tried.contains(&t.upstream.index));
        let (next, wait) = match untried {
            Some(t) => (t, Duration::ZERO),
            None if same_upstream_ok => match route.pick(|_| true) {
                Some(t) => (t, backoff(retry.base_delay, retry.max_delay, attempts)),
                None => return None,
            },
            None if verdict == Verdict::RateLimited => {
                // Nowhere else to go: wait out this upstream's cooldown if it fits.
                let cooldown = req.upstream().state.cooldown();
                (req.target, cooldown)
            }
            None => {
                finish_rate_limited(req, result);
                return None;
            }
        };
        if Instant::now() + wait >= req.ctx.deadline {
            finish_rate_limited(req, result);
            return None;
        }
        if !skip && !route.budget.withdraw() {
            tracing::debug!(model = &*route.label, "retry budget exhausted");
            finish_rate_limited(req, result);
            return None;
        }

        if !skip {
            req.upstream().metrics.retry(reason);
        }
        route.count_failover(req.target, next);
        req.target = next;
        Some(Box::pin(async move {
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
        }))
    }
}

/// How long a 429 cools its upstream: its hint (`Retry-After` and the
/// like), else `DEFAULT_COOLDOWN`, at most `cap` (`retry.retry_after_cap`).
pub fn cooldown_after(result: &Result<Answer, AttemptError>, cap: Duration) -> Duration {
    let hint = match result {
        Ok(Answer {
            reply: Reply::Full { headers, .. },
            ..
        }) => retry_after_hint(headers),
        _ => None,
    };
    hint.unwrap_or(DEFAULT_COOLDOWN).min(cap)
}

/// Full jitter: uniform in `[0, min(max, base * 2^(attempts-1)))`.
fn backoff(base: Duration, max: Duration, attempts: u32) -> Duration {
    let exp = base.saturating_mul(1u32 << attempts.saturating_sub(1).min(20));
    exp.min(max).mul_f64(fastrand::f64())
}

/// A 429 that goes back to the client carries `Retry-After`: the upstream's
/// own, or the remaining cooldown.
fn finish_rate_limited(req: &Call, result: &mut Result<Answer, AttemptError>) {
    if let Ok(Answer {
        reply: Reply::Full { status, headers, .. },
        ..
    }) = result
    {
        if status.as_u16() == 429 && !headers.contains_key(http::header::RETRY_AFTER) {
            let wait = req.upstream().state.cooldown().max(Duration::from_secs(1));
            headers.insert(http::header::RETRY_AFTER, HeaderValue::from(retry_after_secs(wait)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_full_jitter_and_capped() {
        let (base, max) = (Duration::from_millis(250), Duration::from_secs(2));
        for attempts in 1..10 {
            for _ in 0..100 {
                let d = backoff(base, max, attempts);
                let cap = base.saturating_mul(1 << (attempts - 1)).min(max);
                assert!(d < cap || d.is_zero(), "{d:?} >= {cap:?}");
            }
        }
        let spread: Vec<_> = (0..50).map(|_| backoff(base, max, 3)).collect();
        assert!(spread.iter().any(|d| *d < Duration::from_millis(300)));
        assert!(
            spread.iter().any(|d| *d > Duration::from_millis(700)),
            "jitter spreads over the range"
        );
    }
}
