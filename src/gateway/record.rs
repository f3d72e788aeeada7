//! One record per client request: it follows the request (into the stream
//! body, for streams) and, exactly once at the end, writes everything that
//! observes requests: the metrics, the `/health` windows, the access-log line,
//! the usage ledger and the trace spans. If the request is dropped before it
//! finishes (the client went away), `Drop` records it as cancelled.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use http::HeaderValue;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

use crate::budget::Reservation;
use crate::cache::CacheResult;
use crate::config::Price;
use crate::error::GatewayError;
use crate::outcome::{ErrorType, Outcome};
use crate::ratelimit::Admission;
use crate::request::Endpoint;
use crate::sse;
use crate::stack::balance::InFlight;
use crate::telemetry::comparison::content_hash;
use crate::telemetry::metrics::{ModelMetrics, ModelUpstreamMetrics};
use crate::telemetry::otel::{AttemptSpan, TraceContext};
use crate::telemetry::request::{Finished, Trace};
use crate::telemetry::Sinks;
use crate::upstream::breaker::Ticket;
use crate::upstream::Upstream;
use crate::usage::{self, Usage};

/// The status logged for a request the client abandoned (nginx's convention).
const CLIENT_CLOSED: u16 = 499;

pub struct RequestRecord {
    sinks: Arc<Sinks>,
    started: Instant,
    endpoint: Endpoint,
    upstream_model: Option<String>,
    /// Prompt tokens estimated from the body, for a stream that ends before
    /// its usage chunk. Only the number is kept: holding the body for the
    /// life of a stream would cost memory per open stream.
    prompt_estimate: u64,
    /// Bytes of text the stream generated, for the completion estimate
    /// when its usage never comes (`Usage::estimated`).
    text_bytes: u64,
    /// Reads the stream's batches, remembering how its chunks begin.
    inspector: sse::Inspector,
    usage_estimated: bool,
    trace: Option<Trace>,
    /// The model has a shadow: this request feeds the comparison.
    compared: bool,
    /// The answer's text, collected for `temperature: 0` requests that were
    /// mirrored, to compare with the shadow's.
    text: Option<String>,
    request_id: Option<HeaderValue>,
    key: Arc<str>,
    model: Arc<ModelMetrics>,
    price: Option<Price>,
    /// The upstream that answered (or, for an error, the last one tried).
    upstream: Option<Arc<Upstream>>,
    attempts: u32,
    /// A committed stream: the breaker verdict its attempt owes (none for a
    /// half-open probe, settled at the first event), and when it began.
    stream_attempt: Option<(Option<Ticket>, Instant)>,
    upstream_wait: Duration,
    /// Concurrency slots held to the request's end.
    permits: Vec<OwnedSemaphorePermit>,
    in_flight: Option<InFlight>,
    /// Rate-limit reservations, reconciled with the real usage at the end.
    admission: Option<Admission>,
    /// Spend-budget reservations, settled with the real cost at the end.
    budget: Option<Reservation>,
    usage: Option<Usage>,
    ttft: Option<Duration>,
    stream: bool,
    saw_done: bool,
    last_batch: Option<Instant>,
    finished: bool,
    /// The response cache's result, for a model that uses it.
    cache: Option<CacheResult>,
    /// A hit: the price of the usage it replayed.
    saved_usd: f64,
}

impl RequestRecord {
    pub fn new(sinks: Arc<Sinks>, endpoint: Endpoint, started: Instant, request_id: Option<HeaderValue>) -> Self {
        sinks.metrics.in_flight.inc();
        let model = sinks.other_model.clone();
        Self {
            sinks,
            started,
            endpoint,
            upstream_model: None,
            prompt_estimate: 0,
            text_bytes: 0,
            inspector: sse::Inspector::default(),
            usage_estimated: false,
            trace: None,
            compared: false,
            text: None,
            request_id,
            key: Arc::from("-"),
            model,
            price: None,
            upstream: None,
            attempts: 0,
            stream_attempt: None,
            upstream_wait: Duration::ZERO,
            permits: Vec::new(),
            in_flight: None,
            admission: None,
            budget: None,
            usage: None,
            ttft: None,
            stream: false,
            saw_done: false,
            last_batch: None,
            finished: false,
            cache: None,
            saved_usd: 0.0,
        }
    }

    pub fn set_key(&mut self, name: Arc<str>) {
        self.key = name;
    }

    /// The configured model name: from here on it is a metric label.
    pub fn set_model(&mut self, model: Arc<ModelMetrics>, price: Option<Price>, stream: bool) {
        self.model = model;
        self.price = price;
        self.stream = stream;
    }

    /// The upstream that answered (or, for an error, the last one tried).
    pub fn set_upstream(&mut self, upstream: &Arc<Upstream>, upstream_model: Option<&str>) {
        self.upstream = Some(upstream.clone());
        self.upstream_model = upstream_model.map(str::to_owned);
    }

    /// This model's metrics at the upstream that answered.
    fn model_at_upstream(&self) -> Option<&ModelUpstreamMetrics> {
        self.model.at(self.upstream.as_ref()?.index)
    }

    /// Estimates the prompt tokens from the request body (bytes / 4 of its
    /// text, as the rate limiter estimates them, without its `max_tokens`).
    pub fn set_prompt_estimate(&mut self, body: &[u8]) {
        self.prompt_estimate = crate::ratelimit::estimate_prompt_tokens(body);
    }

    /// `set_prompt_estimate` with the count already made (`parse_with_estimate`).
    pub fn set_prompt_tokens(&mut self, tokens: u64) {
        self.prompt_estimate = tokens;
    }

    /// A plain answer came without `usage`: its tokens are estimated, the
    /// prompt from the request body, the completion from the answer's text.
    pub fn estimate_usage(&mut self, request: &[u8], answer: &[u8]) {
        self.usage = Some(Usage::estimated(
            crate::ratelimit::estimate_prompt_tokens(request),
            usage::generated_text_bytes(answer),
        ));
        self.usage_estimated = true;
    }

    /// The model has a shadow; `collect_text` when this request was mirrored
    /// with `temperature: 0`, so its answer is compared with the shadow's.
    pub fn compare(&mut self, collect_text: bool) {
        self.compared = true;
        if collect_text {
            self.text = Some(String::new());
        }
    }

    /// The text of a buffered answer, for the comparison.
    pub fn set_answer(&mut self, body: &[u8]) {
        if self.text.is_some() {
            self.text = crate::telemetry::comparison::message_text(body);
        }
    }

    /// Starts the request's trace (OTLP export on): continues the client's
    /// `traceparent` if it sent one. Returns the attempts' span list.
    pub fn start_trace(&mut self, headers: &http::HeaderMap) -> Option<(TraceContext, Arc<Mutex<Vec<AttemptSpan>>>)> {
        self.sinks.otel.as_ref()?;
        let context = TraceContext::from_headers(headers);
        let attempts = Arc::new(Mutex::new(Vec::new()));
        let span_id = crate::telemetry::otel::new_span_id();
        self.trace = Some(Trace {
            context,
            span_id,
            started: SystemTime::now() - self.started.elapsed(),
            attempts: attempts.clone(),
        });
        // Attempts are children of the request span.
        let child = TraceContext {
            parent_span_id: Some(span_id),
            ..context
        };
        Some((child, attempts))
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

    /// Adds spend-budget reservations (the request's, then the attempt's).
    pub fn set_budget(&mut self, reservation: Reservation) {
        if reservation.is_none() {
            return;
        }
        self.budget = Some(match self.budget.take() {
            Some(earlier) => earlier.merge(reservation),
            None => reservation,
        });
    }

    /// The `x-ratelimit-*` headers of the rules this request matched.
    pub fn write_rate_limit_headers(&self, headers: &mut http::HeaderMap) {
        if let Some(admission) = &self.admission {
            admission.write_headers(headers);
        }
    }

    /// Keeps a concurrency slot until this request ends.
    pub fn hold(&mut self, permit: Option<OwnedSemaphorePermit>) {
        self.permits.extend(permit);
    }

    /// Keeps a committed stream counted in flight on its target (latency
    /// and cost routing) until this request ends.
    pub fn hold_in_flight(&mut self, in_flight: Option<InFlight>) {
        self.in_flight = in_flight;
    }

    /// The answering target's price, where it has its own (`targets[].price`).
    pub fn set_price(&mut self, price: Option<Price>) {
        self.price = price;
    }

    /// Time spent waiting on upstreams, excluded from the overhead metric.
    pub fn add_upstream_wait(&mut self, waited: Duration) {
        self.upstream_wait += waited;
    }

    pub fn upstream_wait(&self) -> Duration {
        self.upstream_wait
    }

    /// The stream's first event arrived: from here the record owns the
    /// attempt's metrics and its breaker verdict.
    pub fn commit_stream(&mut self, ticket: Option<Ticket>, attempt_started: Instant) {
        self.stream_attempt = Some((ticket, attempt_started));
        self.first_token();
    }

    /// The response cache's lookup result (`x-relaygate-cache`).
    pub fn set_cache(&mut self, result: CacheResult) {
        self.cache = Some(result);
    }

    pub fn cache_result(&self) -> Option<CacheResult> {
        self.cache
    }

    /// Answered from the cache: no upstream, no tokens bought; `saved_usd`
    /// is what the replayed usage would have cost.
    pub fn served_from_cache(&mut self, saved_usd: f64) {
        self.cache = Some(CacheResult::Hit);
        self.saved_usd = saved_usd;
    }

    /// The usage the upstream sent so far (never an estimate).
    pub fn upstream_usage(&self) -> Option<Usage> {
        self.usage.filter(|_| !self.usage_estimated)
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
        if let Some(at) = self.model_at_upstream() {
            at.ttft.observe((now - self.started).as_secs_f64());
        }
    }

    /// Called for each batch of events forwarded to the client.
    pub fn on_stream_batch(&mut self, batch: &[u8]) {
        let now = Instant::now();
        if let (Some(last), Some(at)) = (self.last_batch, self.model_at_upstream()) {
            if self.ttft.is_some() && now > last {
                at.inter_token.observe((now - last).as_secs_f64());
            }
        }
        self.last_batch = Some(now);
        let info = self.inspector.inspect_for(self.endpoint, batch);
        self.saw_done |= info.done;
        self.text_bytes += info.text_bytes;
        self.set_usage(info.usage);
        if let Some(text) = self.text.as_mut() {
            sse::events(batch).for_each(|e| crate::telemetry::comparison::delta_text(&e.data, text));
        }
    }

    pub fn request_id(&self) -> &str {
        self.request_id.as_ref().and_then(|v| v.to_str().ok()).unwrap_or("-")
    }

    /// The upstream of the current attempt, for error messages.
    pub fn upstream_name(&self) -> String {
        self.upstream.as_ref().map_or("-", |u| &*u.name).to_owned()
    }

    pub fn endpoint(&self) -> Endpoint {
        self.endpoint
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

    /// `finish` for a request relaygate answered with `error`.
    pub fn finish_error(self, error: &GatewayError) {
        self.finish(error.status().as_u16(), error.outcome(), Some(error.code()));
    }

    fn write(&mut self, status: u16, outcome: Outcome, error_code: Option<&str>) {
        self.finished = true;
        if self.usage.is_none() && self.stream && self.ttft.is_some() {
            // A stream cut before its usage chunk, or from an upstream that
            // ignores `stream_options.include_usage`: estimate from what was seen.
            self.usage = Some(Usage::estimated(self.prompt_estimate, self.text_bytes));
            self.usage_estimated = true;
        }
        if let Some(admission) = self.admission.take() {
            // Replace the token estimate with the usage. A failed plain
            // request used none; a stream cut before its usage keeps the
            // estimate charged (the safe side).
            if let Some(u) = self.usage {
                admission.reconcile_in_background(u.prompt + u.completion);
            } else if outcome != Outcome::Success && !self.stream {
                admission.reconcile_in_background(0);
            }
        }
        let usage = self.usage;
        let cost_usd = match (usage, &self.price) {
            (Some(u), Some(price)) => u.cost(price),
            _ => 0.0,
        };
        if let Some(budget) = self.budget.take() {
            // The real cost: from the upstream's usage, or for a stream cut
            // short (the client left) its estimate from what was streamed;
            // never the whole reservation. No usage (a failed attempt): 0.
            let micros = match (usage, &self.price) {
                (Some(u), Some(price)) => u.cost_micros(price),
                _ => 0,
            };
            budget.settle_in_background(micros);
        }
        let content_hash = self.text.as_deref().map(content_hash);
        let trace = self.trace.take();
        self.sinks.write(Finished {
            request_id: self.request_id(),
            key: &self.key,
            operation: self.endpoint.operation(),
            endpoint: self.endpoint as usize,
            model: &self.model,
            upstream: self.upstream.as_ref().map(|u| (&*u.name, u.index)),
            upstream_window: self.upstream.as_ref().map(|u| &u.state.window),
            upstream_model: self.upstream_model.as_deref(),
            status,
            outcome,
            error_code,
            stream: self.stream,
            attempts: self.attempts,
            latency: self.started.elapsed(),
            ttft: self.ttft,
            tokens: usage.map(|u| [u.prompt, u.completion, u.cached_prompt, u.reasoning]),
            usage_estimated: self.usage_estimated,
            cost_usd,
            compared: self.compared,
            content_hash,
            trace,
            cache: self.cache.map(CacheResult::as_str),
            saved_usd: self.saved_usd,
        });
    }
}

impl RequestRecord {
    /// Records a committed stream's attempt, and gives the breaker its one
    /// verdict: a clean end is a success, a break a failure, and a client
    /// that left says nothing about the upstream.
    fn end_stream_attempt(&mut self, error_type: ErrorType) {
        let (Some((ticket, started)), Some(upstream)) = (self.stream_attempt.take(), &self.upstream) else {
            return;
        };
        let status = (error_type != ErrorType::Cancelled).then_some(200);
        upstream.metrics.attempt(status, error_type, started);
        if let Some(ticket) = ticket {
            match error_type {
                ErrorType::None => ticket.success(),
                ErrorType::Cancelled => drop(ticket),
                error => ticket.failure(error),
            }
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
        self.sinks.metrics.in_flight.dec();
    }
}
