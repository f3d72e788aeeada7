//! The one error type for everything relaygate answers by itself. Each variant
//! maps to an HTTP status and OpenAI's error shape:
//! `{"error":{"message":…,"type":…,"code":…}}`. Messages never carry secrets:
//! upstream URLs and keys stay out, only config names appear.

use std::time::Duration;

use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{header, HeaderValue, StatusCode};
use serde::Serialize;

use crate::telemetry::metrics::Outcome;

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("{0}")]
    InvalidRequest(String),
    #[error("Missing API key. Send it as 'Authorization: Bearer <key>'.")]
    MissingApiKey,
    #[error("Incorrect API key provided.")]
    InvalidApiKey,
    #[error("The model `{0}` does not exist or you do not have access to it.")]
    ModelNotFound(String),
    #[error("Request body is larger than the limit of {limit} bytes.")]
    PayloadTooLarge { limit: usize },
    #[error("The request body stopped arriving: nothing for {}.", humantime::format_duration(*after))]
    RequestBodyTimeout { after: Duration },
    /// Written by the connection itself (`server::ClientIo`): hyper has no
    /// request to answer yet.
    #[error("The request head did not arrive within {}.", humantime::format_duration(*after))]
    RequestHeaderTimeout { after: Duration },
    #[error("Unknown endpoint {method} {path}.")]
    NotFound { method: String, path: String },
    #[error("Could not connect to upstream '{upstream}'.")]
    UpstreamConnect { upstream: String },
    #[error("The connection to upstream '{upstream}' was reset before a complete response.")]
    UpstreamReset { upstream: String },
    #[error("Upstream '{upstream}' sent a malformed response: {detail}.")]
    UpstreamMalformed { upstream: String, detail: &'static str },
    #[error("Upstream '{upstream}' answered with HTTP {status}.")]
    UpstreamStatus { upstream: String, status: u16 },
    #[error("Upstream '{upstream}' timed out: {kind}.")]
    UpstreamTimeout { upstream: String, kind: TimeoutKind },
    #[error("relaygate is shutting down; retry on another instance.")]
    Draining,
    #[error("Every upstream for this model is failing (circuit open); retry after {} s.", retry_after_secs(*retry_after))]
    CircuitOpen { retry_after: Duration },
    #[error("relaygate is at its concurrency limit; retry shortly.")]
    Overloaded,
    #[error("Rate limit reached (rule '{rule}'); retry after {} s.", retry_after_secs(*retry_after))]
    RateLimited {
        rule: String,
        retry_after: Duration,
        /// `retry-after` and `x-ratelimit-*` (boxed: keeps every `Result` small).
        headers: Box<http::HeaderMap>,
    },
    #[error("The shared rate limiter is unavailable and fail_mode is closed; retry shortly.")]
    RateLimiterUnavailable { retry_after: Duration },
    /// A spend budget has no room: OpenAI's `insufficient_quota`, which
    /// apps already stop on; the SDKs do not retry it (`x-should-retry`).
    #[error("{message}")]
    BudgetExceeded {
        budget: String,
        message: String,
        /// Until the period resets; `None` for a `total` budget.
        retry_after: Option<Duration>,
    },
    #[error("The shared budget store is unavailable and fail_mode is closed; retry shortly.")]
    BudgetUnavailable,
}

impl From<crate::budget::Rejection> for GatewayError {
    fn from(r: crate::budget::Rejection) -> Self {
        if r.unavailable {
            GatewayError::BudgetUnavailable
        } else {
            GatewayError::BudgetExceeded {
                message: r.message(),
                budget: r.budget,
                retry_after: r.retry_after,
            }
        }
    }
}

impl From<crate::ratelimit::Rejection> for GatewayError {
    fn from(r: crate::ratelimit::Rejection) -> Self {
        if r.unavailable {
            GatewayError::RateLimiterUnavailable {
                retry_after: r.retry_after,
            }
        } else {
            GatewayError::RateLimited {
                rule: r.rule,
                retry_after: r.retry_after,
                headers: Box::new(r.headers),
            }
        }
    }
}

/// Whole seconds for `Retry-After`, rounded up, at least 1.
pub fn retry_after_secs(d: Duration) -> u64 {
    d.as_millis().div_ceil(1000).max(1) as u64
}

/// Which of the per-upstream timeouts fired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeoutKind {
    /// No response headers (or, for a stream, no first event) in `first_byte_timeout`.
    FirstByte,
    /// No stream chunk for `idle_timeout`.
    Idle,
    /// `request_timeout`, which covers the whole request.
    Request,
}

impl std::fmt::Display for TimeoutKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TimeoutKind::FirstByte => "no first byte within first_byte_timeout",
            TimeoutKind::Idle => "no stream data within idle_timeout",
            TimeoutKind::Request => "the request took longer than request_timeout",
        })
    }
}

impl GatewayError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::InvalidRequest(_) => StatusCode::BAD_REQUEST,
            Self::MissingApiKey | Self::InvalidApiKey => StatusCode::UNAUTHORIZED,
            Self::ModelNotFound(_) | Self::NotFound { .. } => StatusCode::NOT_FOUND,
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::RequestBodyTimeout { .. } | Self::RequestHeaderTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            Self::UpstreamConnect { .. }
            | Self::UpstreamReset { .. }
            | Self::UpstreamMalformed { .. }
            | Self::UpstreamStatus { .. } => StatusCode::BAD_GATEWAY,
            Self::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Self::Draining
            | Self::CircuitOpen { .. }
            | Self::Overloaded
            | Self::RateLimiterUnavailable { .. }
            | Self::BudgetUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::RateLimited { .. } | Self::BudgetExceeded { .. } => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    /// OpenAI's `type` field.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::InvalidRequest(_)
            | Self::MissingApiKey
            | Self::InvalidApiKey
            | Self::ModelNotFound(_)
            | Self::PayloadTooLarge { .. }
            | Self::RequestBodyTimeout { .. }
            | Self::RequestHeaderTimeout { .. }
            | Self::NotFound { .. } => "invalid_request_error",
            Self::UpstreamTimeout { .. } => "timeout_error",
            Self::UpstreamConnect { .. }
            | Self::UpstreamReset { .. }
            | Self::UpstreamMalformed { .. }
            | Self::UpstreamStatus { .. } => "upstream_error",
            Self::Draining
            | Self::CircuitOpen { .. }
            | Self::Overloaded
            | Self::RateLimiterUnavailable { .. }
            | Self::BudgetUnavailable => "service_unavailable",
            // OpenAI's type for rate limits it counts in requests.
            Self::RateLimited { .. } => "requests",
            // OpenAI's type and code when a quota is spent.
            Self::BudgetExceeded { .. } => "insufficient_quota",
        }
    }

    /// OpenAI's `code` field: stable, documented strings clients can match on.
    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidRequest(_) => "invalid_request",
            Self::MissingApiKey | Self::InvalidApiKey => "invalid_api_key",
            Self::ModelNotFound(_) => "model_not_found",
            Self::PayloadTooLarge { .. } => "payload_too_large",
            Self::RequestBodyTimeout { .. } => "request_body_timeout",
            Self::RequestHeaderTimeout { .. } => "request_header_timeout",
            Self::NotFound { .. } => "unknown_url",
            Self::UpstreamConnect { .. } => "upstream_connect_error",
            Self::UpstreamReset { .. } => "upstream_reset",
            Self::UpstreamMalformed { .. } => "upstream_malformed_response",
            Self::UpstreamStatus { .. } => "upstream_error",
            Self::UpstreamTimeout { kind, .. } => match kind {
                TimeoutKind::FirstByte => "upstream_first_byte_timeout",
                TimeoutKind::Idle => "upstream_idle_timeout",
                TimeoutKind::Request => "upstream_request_timeout",
            },
            Self::Draining => "shutting_down",
            Self::CircuitOpen { .. } => "circuit_open",
            Self::Overloaded => "overloaded",
            Self::RateLimited { .. } => "rate_limit_exceeded",
            Self::RateLimiterUnavailable { .. } => "rate_limiter_unavailable",
            Self::BudgetExceeded { .. } => "insufficient_quota",
            Self::BudgetUnavailable => "budget_unavailable",
        }
    }

    /// How the request ends, for `relaygate_requests_total{outcome}`.
    pub fn outcome(&self) -> Outcome {
        match self {
            Self::InvalidRequest(_)
            | Self::MissingApiKey
            | Self::InvalidApiKey
            | Self::ModelNotFound(_)
            | Self::PayloadTooLarge { .. }
            | Self::RequestBodyTimeout { .. }
            | Self::RequestHeaderTimeout { .. }
            | Self::NotFound { .. } => Outcome::ClientError,
            Self::UpstreamTimeout { .. } => Outcome::Timeout,
            Self::UpstreamConnect { .. }
            | Self::UpstreamReset { .. }
            | Self::UpstreamMalformed { .. }
            | Self::UpstreamStatus { .. } => Outcome::UpstreamError,
            Self::Draining | Self::Overloaded => Outcome::Overloaded,
            Self::CircuitOpen { .. } => Outcome::CircuitOpen,
            Self::RateLimited { .. } => Outcome::RateLimited,
            Self::RateLimiterUnavailable { .. } | Self::BudgetUnavailable => Outcome::Overloaded,
            Self::BudgetExceeded { .. } => Outcome::RateLimited,
        }
    }

    /// The JSON body, also used as the `data:` of an SSE error event.
    pub fn body(&self) -> Bytes {
        #[derive(Serialize)]
        struct Envelope<'a> {
            error: Inner<'a>,
        }
        #[derive(Serialize)]
        struct Inner<'a> {
            message: String,
            r#type: &'a str,
            code: &'a str,
            param: Option<&'a str>,
        }
        let body = Envelope {
            error: Inner {
                message: self.to_string(),
                r#type: self.kind(),
                code: self.code(),
                param: None,
            },
        };
        // Serialising a struct of strings cannot fail.
        Bytes::from(serde_json::to_vec(&body).unwrap_or_default())
    }

    /// The SSE event that ends a Responses API stream which broke after it
    /// started: the API's own `error` event (`type`, `code`, `message`,
    /// `param`), with the OpenAI error object beside them, which is what
    /// makes the official SDKs raise rather than yield it as one more event.
    pub fn responses_sse_event(&self) -> Bytes {
        #[derive(Serialize)]
        struct Event<'a> {
            r#type: &'static str,
            code: &'a str,
            message: &'a str,
            param: Option<&'a str>,
            error: Inner<'a>,
        }
        #[derive(Serialize)]
        struct Inner<'a> {
            message: &'a str,
            r#type: &'a str,
            code: &'a str,
            param: Option<&'a str>,
        }
        let message = self.to_string();
        let event = Event {
            r#type: "error",
            code: self.code(),
            message: &message,
            param: None,
            error: Inner {
                message: &message,
                r#type: self.kind(),
                code: self.code(),
                param: None,
            },
        };
        let mut out = b"event: error\ndata: ".to_vec();
        // Serialising a struct of strings cannot fail.
        serde_json::to_writer(&mut out, &event).unwrap_or_default();
        out.extend_from_slice(b"\n\n");
        Bytes::from(out)
    }

    /// The SSE event that ends a stream which broke after it started. It has
    /// no `[DONE]` after it, so no client mistakes it for a clean end.
    pub fn sse_event(&self) -> Bytes {
        let body = self.body();
        let mut out = Vec::with_capacity(body.len() + 8);
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(&body);
        out.extend_from_slice(b"\n\n");
        Bytes::from(out)
    }
}

impl IntoResponse for GatewayError {
    fn into_response(self) -> Response {
        let mut response = (self.status(), self.body()).into_response();
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Self::RateLimited { headers, .. } = &self {
            response.headers_mut().extend((**headers).clone());
        }
        let retry_after = match &self {
            Self::CircuitOpen { retry_after } | Self::RateLimiterUnavailable { retry_after } => {
                Some(retry_after_secs(*retry_after))
            }
            Self::RateLimited { retry_after, .. } => Some(retry_after_secs(*retry_after)),
            Self::BudgetExceeded { retry_after, .. } => retry_after.map(retry_after_secs),
            Self::Overloaded | Self::Draining | Self::BudgetUnavailable => Some(1),
            _ => None,
        };
        if let Some(secs) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if let Self::BudgetExceeded { budget, .. } = &self {
            let h = response.headers_mut();
            // The OpenAI SDKs honour it: a spent budget is not retried.
            h.insert("x-should-retry", HeaderValue::from_static("false"));
            if let Ok(v) = HeaderValue::from_str(budget) {
                h.insert("x-relaygate-budget", v);
            }
        }
        if matches!(self, Self::MissingApiKey | Self::InvalidApiKey) {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// Shortens a client-supplied value before it is echoed in an error message.
pub fn clip(value: &str) -> String {
    const MAX: usize = 128;
    if value.len() <= MAX {
        return value.to_owned();
    }
    let mut end = MAX;
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &value[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_is_openai_shaped() {
        let e = GatewayError::ModelNotFound("gpt-9".into());
        let v: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["code"], "model_not_found");
        assert!(v["error"]["message"].as_str().unwrap().contains("gpt-9"));
        assert_eq!(e.status(), StatusCode::NOT_FOUND);
    }

    #[test]
    fn responses_error_event_is_the_apis_shape_with_the_error_object() {
        let e = GatewayError::UpstreamReset { upstream: "a".into() };
        let event = e.responses_sse_event();
        let text = std::str::from_utf8(&event).unwrap();
        let data = text
            .strip_prefix("event: error\ndata: ")
            .and_then(|t| t.strip_suffix("\n\n"))
            .expect(text);
        let v: serde_json::Value = serde_json::from_str(data).unwrap();
        assert_eq!(v["type"], "error");
        assert_eq!(v["code"], e.code());
        assert_eq!(v["message"], v["error"]["message"]);
        assert_eq!(v["error"]["type"], e.kind());
        assert!(v["param"].is_null());
    }

    #[test]
    fn sse_event_is_one_complete_event() {
        let e = GatewayError::UpstreamTimeout {
            upstream: "a".into(),
            kind: TimeoutKind::Idle,
        };
        let ev = e.sse_event();
        assert!(ev.starts_with(b"data: {\"error\":"));
        assert!(ev.ends_with(b"}\n\n"));
        assert_eq!(ev.windows(2).filter(|w| w == b"\n\n").count(), 1);
    }

    #[test]
    fn clip_respects_char_boundaries() {
        let long = "é".repeat(200);
        let c = clip(&long);
        assert!(c.len() <= 128 + '…'.len_utf8());
        assert_eq!(clip("short"), "short");
    }
}
