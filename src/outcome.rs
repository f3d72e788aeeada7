//! How a status or an error counts, in one table: the metric labels
//! (`Outcome` per request, `ErrorType` per attempt), whether the retry
//! policy tries again, and what the breaker learns. Metrics, retries, the
//! breaker and shadows all read it from here (docs/ARCHITECTURE.md shows it).
//!
//! | upstream status      | error_type    | outcome        | retry / failover       | breaker  |
//! |----------------------|---------------|----------------|------------------------|----------|
//! | 200-399              | none          | success        | no                     | success  |
//! | 401, 403             | auth          | client_error   | fail over (other only) | neutral  |
//! | 429                  | rate_limited  | rate_limited   | cool, fail over        | neutral  |
//! | other 4xx            | client_error  | client_error   | no (passed through)    | neutral  |
//! | 501, 505             | server_error  | upstream_error | no (passed through)    | neutral  |
//! | 500, 502-504, 5xx    | server_error  | upstream_error | yes                    | failure  |
//!
//! 501 (Not Implemented) and 505 (HTTP Version Not Supported) describe the
//! request, not the upstream's health: another try would get the same
//! answer, and an upstream that lacks one endpoint is not down. Every
//! other 5xx, including a CDN's 520-527 in front of a relay, is ill health.
//! Errors without a status (`Verdict::of_error`): connect, reset, timeout
//! and malformed answers are failures; a refusal that made no upstream call
//! (breaker open, concurrency full, upstream rate limit) is skipped; a
//! request past its deadline or cancelled is final.

/// How a request ended. A closed set: `relaygate_requests_total{outcome}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Outcome {
    Success,
    ClientError,
    UpstreamError,
    Timeout,
    RateLimited,
    CircuitOpen,
    Overloaded,
    Cancelled,
}

impl Outcome {
    pub const COUNT: usize = 8;

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::ClientError => "client_error",
            Outcome::UpstreamError => "upstream_error",
            Outcome::Timeout => "timeout",
            Outcome::RateLimited => "rate_limited",
            Outcome::CircuitOpen => "circuit_open",
            Outcome::Overloaded => "overloaded",
            Outcome::Cancelled => "cancelled",
        }
    }

    /// The outcome of a response relaygate passes through from upstream.
    pub fn of_status(status: u16) -> Outcome {
        Status::of(status).outcome
    }
}

/// How one upstream attempt ended. A closed set:
/// `relaygate_upstream_requests_total{error_type}`, and the `reason` of
/// `relaygate_retries_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ErrorType {
    None,
    Connect,
    Timeout,
    Reset,
    ServerError,
    ClientError,
    RateLimited,
    Auth,
    Malformed,
    CircuitOpen,
    Cancelled,
    Overloaded,
}

impl ErrorType {
    /// Every variant, indexed by its `repr(u8)` value.
    pub const ALL: [ErrorType; 12] = [
        ErrorType::None,
        ErrorType::Connect,
        ErrorType::Timeout,
        ErrorType::Reset,
        ErrorType::ServerError,
        ErrorType::ClientError,
        ErrorType::RateLimited,
        ErrorType::Auth,
        ErrorType::Malformed,
        ErrorType::CircuitOpen,
        ErrorType::Cancelled,
        ErrorType::Overloaded,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorType::None => "none",
            ErrorType::Connect => "connect",
            ErrorType::Timeout => "timeout",
            ErrorType::Reset => "reset",
            ErrorType::ServerError => "server_error",
            ErrorType::ClientError => "client_error",
            ErrorType::RateLimited => "rate_limited",
            ErrorType::Auth => "auth",
            ErrorType::Malformed => "malformed",
            ErrorType::CircuitOpen => "circuit_open",
            ErrorType::Cancelled => "cancelled",
            ErrorType::Overloaded => "overloaded",
        }
    }

    pub fn of_status(status: u16) -> ErrorType {
        Status::of(status).error_type
    }
}

/// What one attempt's result means for the retry policy and the breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// A 2xx (for a stream: its first event arrived). Breaker: success.
    Success,
    /// The answer describes the request (a client 4xx, 501, 505): pass it
    /// through, do not retry; breaker: no verdict.
    Neutral,
    /// The upstream is unhealthy: breaker failure; retryable, on the same
    /// upstream too.
    Failure(ErrorType),
    /// 429: cool the upstream and fail over; breaker: no verdict.
    RateLimited,
    /// 401/403: relaygate's key for this upstream is wrong; fail over to
    /// another upstream only; breaker: no verdict.
    Auth,
    /// No upstream call was made (breaker open, concurrency full, upstream
    /// rate limit): fail over without spending the retry budget.
    Skip(ErrorType),
    /// Not retryable: the request's deadline is spent, or it was cancelled.
    Final,
}

/// The row of the table for one upstream status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    pub error_type: ErrorType,
    pub outcome: Outcome,
    pub verdict: Verdict,
}

impl Status {
    pub fn of(status: u16) -> Status {
        let (error_type, outcome, verdict) = match status {
            200..=399 => (ErrorType::None, Outcome::Success, Verdict::Success),
            401 | 403 => (ErrorType::Auth, Outcome::ClientError, Verdict::Auth),
            429 => (ErrorType::RateLimited, Outcome::RateLimited, Verdict::RateLimited),
            400..=499 => (ErrorType::ClientError, Outcome::ClientError, Verdict::Neutral),
            501 | 505 => (ErrorType::ServerError, Outcome::UpstreamError, Verdict::Neutral),
            _ => (
                ErrorType::ServerError,
                Outcome::UpstreamError,
                Verdict::Failure(ErrorType::ServerError),
            ),
        };
        Status {
            error_type,
            outcome,
            verdict,
        }
    }
}

impl Verdict {
    /// The verdict on an attempt that ended without an answer to pass on.
    /// `deadline_spent`: it was the request's own deadline that ran out.
    pub fn of_error(error_type: ErrorType, deadline_spent: bool) -> Verdict {
        match error_type {
            ErrorType::CircuitOpen | ErrorType::Overloaded | ErrorType::RateLimited => Verdict::Skip(error_type),
            ErrorType::Timeout if deadline_spent => Verdict::Final,
            ErrorType::Cancelled => Verdict::Final,
            other => Verdict::Failure(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table() {
        let row = |s| {
            let r = Status::of(s);
            (r.error_type.as_str(), r.outcome.as_str(), r.verdict)
        };
        assert_eq!(row(200), ("none", "success", Verdict::Success));
        assert_eq!(row(304), ("none", "success", Verdict::Success));
        assert_eq!(row(400), ("client_error", "client_error", Verdict::Neutral));
        assert_eq!(row(401), ("auth", "client_error", Verdict::Auth));
        assert_eq!(row(403), ("auth", "client_error", Verdict::Auth));
        assert_eq!(row(404), ("client_error", "client_error", Verdict::Neutral));
        assert_eq!(row(429), ("rate_limited", "rate_limited", Verdict::RateLimited));
        let failure = Verdict::Failure(ErrorType::ServerError);
        for s in [500, 502, 503, 504, 507, 520, 524, 599] {
            assert_eq!(row(s), ("server_error", "upstream_error", failure), "{s}");
        }
        for s in [501, 505] {
            assert_eq!(row(s), ("server_error", "upstream_error", Verdict::Neutral), "{s}");
        }
    }

    #[test]
    fn errors_without_a_status() {
        assert_eq!(
            Verdict::of_error(ErrorType::Connect, false),
            Verdict::Failure(ErrorType::Connect)
        );
        assert_eq!(
            Verdict::of_error(ErrorType::Timeout, false),
            Verdict::Failure(ErrorType::Timeout)
        );
        assert_eq!(Verdict::of_error(ErrorType::Timeout, true), Verdict::Final);
        assert_eq!(Verdict::of_error(ErrorType::Cancelled, false), Verdict::Final);
        for skip in [ErrorType::CircuitOpen, ErrorType::Overloaded, ErrorType::RateLimited] {
            assert_eq!(Verdict::of_error(skip, false), Verdict::Skip(skip));
        }
    }
}
