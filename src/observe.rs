//! One record per client request: it follows the request (into the stream
//! body, for streams) and, exactly once at the end, writes the metrics and the
//! one access-log line. If the request is dropped before it finishes (the
//! client went away), `Drop` records it as cancelled.

use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

use crate::config::Price;
use crate::error::GatewayError;
use crate::layers::circuit::Breaker;
use crate::metrics::{ErrorType, Metrics, Outcome, OTHER, TOKEN_TYPES};
use crate::ratelimit::Admission;
use crate::streaming;
use crate::usage::Usage;

/// The status logged for a request the client abandoned (nginx's convention).
const CLIENT_CLOSED: u16 = 499;

pub struct RequestRecord {
    metrics: Arc<Metrics>,
    started: Instant,
    request_id: Option<HeaderValue>,
    key: Arc<str>,
    model: Arc<str>,
    price: Option<Price>,
    upstream: Option<Arc<str>>,
    attempts: u32,
    /// A committed stream: its upstream's breaker and when its attempt began.
    stream_attempt: Option<(Arc<Breaker>, Instant)>,
    upstream_wait: Duration,
    /// Concurrency slots held to the request's end.
    permits: Vec<OwnedSemaphorePermit>,
    /// Rate-limit reservations, reconciled with the real usage at the end.
    admission: Option<Admission>,
    usage: Option<Usage>,
    ttft: Option<Duration>,
    stream: bool,
    saw_done: bool,
    last_batch: Option<Instant>,
    finished: bool,
}

impl RequestRecord {
    pub fn new(metrics: Arc<Metrics>, started: Instant, request_id: Option<HeaderValue>) -> Self {
        metrics.in_flight.inc();
        Self {
            metrics,
            started,
            request_id,
            key: Arc::from("-"),
            model: Arc::from(OTHER),
            price: None,
            upstream: None,
            attempts: 0,
            stream_attempt: None,
            upstream_wait: Duration::ZERO,
            permits: Vec::new(),
            admission: None,
            usage: None,
            ttft: None,
            stream: false,
            saw_done: false,
            last_batch: None,
            finished: false,
        }
    }

    pub fn set_key(&mut self, name: Arc<str>) {
        self.key = name;
    }

    /// The configured model name: from here on it is a metric label.
    pub fn set_model(&mut self, name: Arc<str>, price: Option<Price>, stream: bool) {
        self.model = name;
        self.price = price;
        self.stream = stream;
    }

    /// The upstream that answered (or, for an error, the last one tried).
    pub fn set_upstream(&mut self, upstream: Arc<str>) {
        self.upstream = Some(upstream);
    }

    pub fn set_attempts(&mut self, attempts: u32) {
        self.attempts = attempts;
    }

    /// Adds rate-limit reservations (the request's, then the attempt's).
    pub fn set_admission(&mut self, admission: Admission) {
        self.admission = Some(match self.admission.take() {
            Some(earlier) => earlier.merge(admission),
            None => admission,
        });
    }

    /// `x-ratelimit-*` for the response, when a rule matched.
    pub fn rate_limit_headers(&self) -> Option<http::HeaderMap> {
        let headers = self.admission.as_ref()?.headers();
        (!headers.is_empty()).then_some(headers)
    }

    /// Keeps a concurrency slot until this request ends.
    pub fn hold(&mut self, permit: Option<OwnedSemaphorePermit>) {
        self.permits.extend(permit);
    }

    /// Time spent waiting on upstreams, excluded from the overhead metric.
    pub fn add_upstream_wait(&mut self, waited: Duration) {
        self.upstream_wait += waited;
    }

    pub fn upstream_wait(&self) -> Duration {
        self.upstream_wait
    }

    /// The stream's first event arrived: from here the record owns the
    /// attempt's metrics and reports a later break to the breaker.
    pub fn commit_stream(&mut self, breaker: Arc<Breaker>, attempt_started: Instant) {
        self.stream_attempt = Some((breaker, attempt_started));
        self.first_token();
    }

    pub fn set_usage(&mut self, usage: Option<Usage>) {
        if usage.is_some() {
            self.usage = usage;
        }
    }

    /// The first stream event arrived from upstream.
    fn first_token(&mut self) {
        let now = Instant::now();
        self.ttft = Some(now - self.started);
        self.last_batch = Some(now);
        if let Some(upstream) = &self.upstream {
            self.metrics
                .ttft
                .with_label_values(&[&self.model, upstream])
                .observe((now - self.started).as_secs_f64());
        }
    }

    /// Called for each batch of events forwarded to the client.
    pub fn on_stream_batch(&mut self, batch: &[u8]) {
        let now = Instant::now();
        if let (Some(last), Some(upstream)) = (self.last_batch, &self.upstream) {
            if self.ttft.is_some() && now > last {
                self.metrics
                    .inter_token
                    .with_label_values(&[&self.model, upstream])
                    .observe((now - last).as_secs_f64());
            }
        }
        self.last_batch = Some(now);
        let info = streaming::inspect(batch);
        self.saw_done |= info.done;
        self.set_usage(info.usage);
    }

    /// The upstream of the current attempt, for error messages.
    pub fn upstream_name(&self) -> String {
        self.upstream.as_deref().unwrap_or("-").to_owned()
    }

    pub fn saw_done(&self) -> bool {
        self.saw_done
    }

    /// The end of a stream: clean (`None`) or broken after it started.
    pub fn finish_stream(mut self, error: Option<&GatewayError>) {
        let error_type = match error {
            None => ErrorType::None,
            Some(GatewayError::UpstreamTimeout { .. }) => ErrorType::Timeout,
            Some(GatewayError::UpstreamReset { .. }) => ErrorType::Reset,
            Some(_) => ErrorType::Malformed,
        };
        self.end_stream_attempt(error_type);
        let outcome = error.map(GatewayError::outcome).unwrap_or(Outcome::Success);
        self.finish(200, outcome, error.map(GatewayError::code));
    }

    /// Writes the request's metrics and its access-log line.
    pub fn finish(mut self, status: u16, outcome: Outcome, error_code: Option<&str>) {
        self.write(status, outcome, error_code);
    }

    fn write(&mut self, status: u16, outcome: Outcome, error_code: Option<&str>) {
        self.finished = true;
        if let Some(admission) = self.admission.take() {
            // Replace the token estimate with the usage. A failed plain
            // request used none; a stream cut before its usage keeps the
            // estimate charged (the safe side).
            if let Some(u) = self.usage {
                tokio::spawn(admission.reconcile(u.prompt + u.completion));
            } else if outcome != Outcome::Success && !self.stream {
                tokio::spawn(admission.reconcile(0));
            }
        }
        let elapsed = self.started.elapsed();
        let m = &self.metrics;
        m.requests
            .with_label_values(&[&self.model, status_label(status), outcome.as_str()])
            .inc();
        m.request_duration
            .with_label_values(&[&self.model])
            .observe(elapsed.as_secs_f64());
        if let (Some(usage), Some(upstream)) = (self.usage, &self.upstream) {
            let counts = [usage.prompt, usage.completion, usage.cached_prompt, usage.reasoning];
            for (kind, n) in TOKEN_TYPES.iter().zip(counts) {
                if n > 0 {
                    m.tokens.with_label_values(&[&*self.model, &**upstream, kind]).inc_by(n);
                }
            }
            if let Some(price) = &self.price {
                let cost = usage.cost(price);
                if cost > 0.0 {
                    m.cost_counter(&self.model, upstream).inc_by(cost);
                }
            }
        }
        let request_id = self.request_id.as_ref().and_then(|v| v.to_str().ok()).unwrap_or("-");
        tracing::info!(
            target: "relaygate::access",
            request_id,
            key = %self.key,
            model = %self.model,
            upstream = self.upstream.as_deref().unwrap_or("-"),
            status,
            outcome = outcome.as_str(),
            error = error_code.unwrap_or("-"),
            stream = self.stream,
            attempts = self.attempts,
            latency_ms = elapsed.as_secs_f64() * 1000.0,
            ttft_ms = self.ttft.map(|t| t.as_secs_f64() * 1000.0),
            prompt_tokens = self.usage.map(|u| u.prompt),
            completion_tokens = self.usage.map(|u| u.completion),
            "request"
        );
    }
}

impl RequestRecord {
    /// Records a committed stream's attempt; a break counts against the breaker.
    fn end_stream_attempt(&mut self, error_type: ErrorType) {
        let (Some((breaker, started)), Some(upstream)) = (self.stream_attempt.take(), &self.upstream) else {
            return;
        };
        let status = (error_type != ErrorType::Cancelled).then_some(200);
        crate::layers::record_attempt(&self.metrics, upstream, status, error_type, started);
        if !matches!(error_type, ErrorType::None | ErrorType::Cancelled) {
            breaker.on_failure(false, error_type);
        }
    }
}

impl Drop for RequestRecord {
    fn drop(&mut self) {
        if !self.finished {
            // The client disconnected: the handler future or the stream body
            // was dropped. Record it once, the same way as every other ending.
            self.end_stream_attempt(ErrorType::Cancelled);
            self.write(CLIENT_CLOSED, Outcome::Cancelled, Some("client_disconnected"));
        }
        self.metrics.in_flight.dec();
    }
}

/// Status codes as static label strings; anything unusual is `other`.
pub fn status_label(status: u16) -> &'static str {
    match status {
        200 => "200",
        201 => "201",
        204 => "204",
        400 => "400",
        401 => "401",
        403 => "403",
        404 => "404",
        405 => "405",
        408 => "408",
        409 => "409",
        413 => "413",
        422 => "422",
        429 => "429",
        499 => "499",
        500 => "500",
        502 => "502",
        503 => "503",
        504 => "504",
        _ => OTHER,
    }
}
