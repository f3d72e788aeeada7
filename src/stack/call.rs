//! What travels through the stack: the request its attempts share
//! (`CallContext`), one attempt (`Call`), and a successful one (`Answer`).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::AtomicU32;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::HeaderMap;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

use super::balance::InFlight;
use super::route::{Route, Target};
use crate::budget::{Budgets, Reservation};
use crate::error::{GatewayError, TimeoutKind};
use crate::outcome::{Status, Verdict};
use crate::ratelimit::{Admission, Limiter};
use crate::request::{Endpoint, ParsedRequest};
use crate::telemetry::otel::{AttemptSpan, TraceContext};
use crate::upstream::breaker::Ticket;
use crate::upstream::{Reply, Upstream};

pub use crate::upstream::AttemptError;

/// Everything about one client request that its attempts share.
pub struct CallContext {
    /// The model's targets, retry settings, budget and hedge.
    pub route: Arc<Route>,
    pub endpoint: Endpoint,
    pub parsed: ParsedRequest,
    pub body: Bytes,
    /// The client headers that are forwarded.
    pub headers: HeaderMap,
    /// `request_timeout` of the first target, from the request's arrival.
    pub deadline: Instant,
    /// Upstream calls made so far (refusals by a breaker or a limit excluded).
    pub attempts: AtomicU32,
    /// For upstream-scoped rate limits, per attempt.
    pub limiter: Limiter,
    /// Tokens reserved per rate-limit admission before usage is known.
    pub estimated_tokens: u64,
    /// For upstream-scoped spend budgets, per attempt.
    pub budgets: Budgets,
    /// The request's worst-case cost, reserved per budget (micro-dollars).
    pub budget_micros: i64,
    /// With OTLP export on: the trace context for attempt spans (parent =
    /// the request span) and where the attempts put their spans.
    pub trace: Option<(TraceContext, Arc<Mutex<Vec<AttemptSpan>>>)>,
}

/// One attempt: which target, and the shared request.
#[derive(Clone)]
pub struct Call {
    /// Index into the route's targets.
    pub target: usize,
    pub ctx: Arc<CallContext>,
}

impl Call {
    pub fn target(&self) -> &Target {
        &self.ctx.route.targets[self.target]
    }

    pub fn upstream(&self) -> &Arc<Upstream> {
        &self.target().upstream
    }
}

/// A successful attempt (any HTTP status that is passed through).
pub struct Answer {
    pub reply: Reply,
    /// Index into the route's targets.
    pub target: usize,
    pub started: Instant,
    /// Held until the request ends (for a stream, its last byte).
    pub permit: Option<OwnedSemaphorePermit>,
    /// Upstream-scoped rate-limit reservations, reconciled with the usage.
    pub admission: Option<Admission>,
    /// Upstream-scoped budget reservations, settled with the real cost.
    pub budget: Option<Reservation>,
    /// A committed stream's breaker verdict, owed when the stream ends
    /// (`circuit`): the attempt counts once, as what it turned out to be.
    pub ticket: Option<Ticket>,
    /// With latency or cost routing, a committed stream counts in flight on
    /// its target until it ends (`balance`).
    pub in_flight: Option<InFlight>,
}

pub type BoxFuture = Pin<Box<dyn Future<Output = Result<Answer, AttemptError>> + Send>>;

/// What an attempt's result means for the retry policy and the breaker,
/// by the one table in `outcome`.
pub fn classify(result: &Result<Answer, AttemptError>) -> Verdict {
    match result {
        Ok(answer) => match &answer.reply {
            Reply::Stream { .. } => Verdict::Success,
            Reply::Full { status, .. } => Status::of(status.as_u16()).verdict,
        },
        Err(e) => match (&e.error, e.status) {
            // A status whose body was replaced (a 5xx in HTML): the same row.
            (GatewayError::UpstreamStatus { .. }, Some(status)) => Status::of(status).verdict,
            (
                GatewayError::UpstreamTimeout {
                    kind: TimeoutKind::Request,
                    ..
                },
                _,
            ) => Verdict::of_error(e.error_type, true),
            _ => Verdict::of_error(e.error_type, false),
        },
    }
}
