//! How a status or an error counts: the closed label sets of the metrics
//! (`Outcome` per request, `ErrorType` per attempt).

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
        match status {
            200..=399 => Outcome::Success,
            429 => Outcome::RateLimited,
            400..=499 => Outcome::ClientError,
            _ => Outcome::UpstreamError,
        }
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
        match status {
            200..=399 => ErrorType::None,
            401 | 403 => ErrorType::Auth,
            429 => ErrorType::RateLimited,
            400..=499 => ErrorType::ClientError,
            _ => ErrorType::ServerError,
        }
    }
}
