//! The upstream stack: every attempt of a proxied request goes through these
//! tower layers. This comment is the one place that lists their order.
//!
//! ```text
//! gateway::handle        shed (server.max_in_flight) → auth → body → parse → limits
//!  └─ Retry<FailoverPolicy>   retry.rs    picks the next target after a retryable failure:
//!     │                                   a different upstream first (failover, no sleep),
//!     │                                   the same one after full-jitter backoff; spends the
//!     │                                   model's retry budget; never sleeps past the deadline;
//!     │                                   cools an upstream on 429 (Retry-After, capped)
//!     └─ Hedge                hedge.rs    optional per model: after `hedge_after` without an
//!        │                                answer, the same call to the next target; first wins
//!        └─ Circuit           circuit.rs  the target upstream's breaker: refuses fast when open,
//!           │                             admits probes when half-open; one verdict per attempt
//!           └─ UpstreamLimit  limits.rs   upstream-scoped rate limits (the relay account's quota)
//!              └─ Concurrency limits.rs   the upstream's max_concurrency: a fast refusal when full
//!                 └─ Attempt  attempt.rs  one HTTP exchange (Upstream::send): connect_timeout,
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
//! refused attempt makes no upstream call. The retry policy is outermost
//! because it owns the request's one deadline.
//!
//! The stack is built per request from what it needs and nothing else: the
//! model's `Route` (its targets with their upstreams, retry settings, retry
//! budget, hedge, and metric handles resolved at config load) and the
//! request (`CallContext`). No layer sees the app or its config.
//!
//! Rate limiting (key, model and global scopes) runs before this stack, in
//! `gateway::handle`; upstream-scoped limits are checked per attempt.

pub mod attempt;
pub mod balance;
pub mod call;
pub mod circuit;
pub mod hedge;
pub mod limits;
pub mod retry;
pub mod route;

use std::sync::Arc;

use tower::retry::budget::Budget;
use tower::{ServiceBuilder, ServiceExt};

pub use call::{classify, Answer, AttemptError, BoxFuture, Call, CallContext};
pub use route::{Route, Target};

/// Runs one client request through the stack, starting at target `first`.
pub async fn call(ctx: Arc<CallContext>, first: usize) -> Result<Answer, AttemptError> {
    let route = ctx.route.clone();
    route.budget.deposit();
    let stack = ServiceBuilder::new()
        .layer(tower::retry::RetryLayer::new(retry::FailoverPolicy::new(route.clone())))
        .layer(hedge::HedgeLayer::new(route))
        .layer(circuit::CircuitLayer)
        .layer(limits::UpstreamLimitLayer)
        .layer(limits::ConcurrencyLayer)
        .service(attempt::AttemptService);
    stack.oneshot(Call { target: first, ctx }).await
}

#[cfg(test)]
mod tests;
