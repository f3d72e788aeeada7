//! The Prometheus metrics. Names and labels are a contract (see
//! docs/metrics.md): dashboards, alert rules and users' queries depend on them.
//!
//! Label values come only from config names (models, upstreams) and closed
//! sets (`Outcome`, `ErrorType`, status codes). A model a client typed that
//! is not in the config is labelled `other`, so a client cannot create series.
//!
//! Each `App` owns its own `Registry`, so several gateways in one test
//! process do not share counters.

use std::sync::{Arc, OnceLock};

use tokio::time::Instant;

pub use crate::outcome::{ErrorType, Outcome};
use prometheus::{
    Counter, CounterVec, Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// The label for a model or upstream that is not in the config.
pub const OTHER: &str = "other";

/// `relaygate_client_timeouts_total{kind}`: a closed set, in the order of
/// `edge::server`'s `Closed`.
pub const TIMEOUT_KINDS: [&str; 3] = ["header", "keepalive", "send"];

/// Token kinds: `relaygate_tokens_total{type}`.
pub const TOKEN_TYPES: [&str; 4] = ["prompt", "completion", "cached_prompt", "reasoning"];

/// Whole-request latency. LLM calls span five orders of magnitude: a cached
/// or tiny completion in ~50 ms, a typical chat answer in 1-20 s, a long
/// reasoning stream in minutes. The buckets are dense below 1 s, where the
/// latency SLO lives (0.12 s is a boundary so that the default 120 ms SLO is
/// read exactly), and sparse up to 300 s, past which requests time out.
pub const REQUEST_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.12, 0.15, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0,
    30.0, 45.0, 60.0, 90.0, 120.0, 180.0, 300.0,
];

/// Time to first token: from ~50 ms (hot cache, close relay) to a minute
/// (reasoning models that think before the first content token).
pub const TTFT_BUCKETS: &[f64] = &[
    0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0,
];

/// Gaps between stream chunks: decoding runs at 10-100 tokens/s, so 10-100 ms
/// is normal; seconds mean a stall.
const INTER_TOKEN_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// relaygate's own time per request: the claim is tens of microseconds, and
/// anything above a few milliseconds is a bug worth seeing.
const OVERHEAD_BUCKETS: &[f64] = &[
    0.00001, 0.000025, 0.00005, 0.0001, 0.00015, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
];

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub in_flight: IntGauge,
    pub upstream_requests: IntCounterVec,
    pub upstream_duration: HistogramVec,
    pub ttft: HistogramVec,
    pub inter_token: HistogramVec,
    pub overhead: Histogram,
    pub tokens: IntCounterVec,
    pub cost: CounterVec,
    pub usage_estimated: IntCounterVec,
    pub config_reloads: IntCounterVec,
    pub build_info: IntGaugeVec,
    pub retries: IntCounterVec,
    pub failovers: IntCounterVec,
    pub hedges: IntCounterVec,
    pub route_picks: IntCounterVec,
    pub target_load: GaugeVec,
    pub circuit_state: IntGaugeVec,
    pub circuit_transitions: IntCounterVec,
    pub ledger_dropped: IntCounter,
    pub client_connections: IntGauge,
    pub client_timeouts: IntCounterVec,
    pub shadow_requests: IntCounterVec,
    pub shadow_duration: HistogramVec,
    pub shadow_ttft: HistogramVec,
    pub shadow_tokens: IntCounterVec,
    pub shadow_cost: CounterVec,
    pub shadow_dropped: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let r = &registry;
        let m = Metrics {
            requests: reg(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "relaygate_requests_total",
                        "Requests answered, by model, the upstream that answered (or was last tried; \
                         `cache` for a cache hit, `none` when none was), HTTP status, outcome and \
                         endpoint (chat_completions, completions, embeddings, responses, passthrough).",
                    ),
                    &["model", "upstream", "status", "outcome", "endpoint"],
                ),
            ),
            request_duration: reg(
                r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "relaygate_request_duration_seconds",
                        "Whole-request latency, to the last byte sent.",
                    )
                    .buckets(REQUEST_BUCKETS.to_vec()),
                    &["model"],
                ),
            ),
            in_flight: reg(
                r,
                IntGauge::new(
                    "relaygate_in_flight_requests",
                    "Requests being served now, streams included.",
                ),
            ),
            upstream_requests: reg(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "relaygate_upstream_requests_total",
                        "Upstream attempts, by upstream, HTTP status and error type.",
                    ),
                    &["upstream", "status", "error_type"],
                ),
            ),
            upstream_duration: reg(
                r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "relaygate_upstream_duration_seconds",
                        "Upstream attempt duration, to the last byte received.",
                    )
                    .buckets(REQUEST_BUCKETS.to_vec()),
                    &["upstream"],
                ),
            ),
            ttft: reg(
                r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "relaygate_time_to_first_token_seconds",
                        "Streams: time from request to the first upstream event.",
                    )
                    .buckets(TTFT_BUCKETS.to_vec()),
                    &["model", "upstream"],
                ),
            ),
            inter_token: reg(
                r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "relaygate_inter_token_seconds",
                        "Streams: gaps between upstream chunks.",
                    )
                    .buckets(INTER_TOKEN_BUCKETS.to_vec()),
                    &["model", "upstream"],
                ),
            ),
            overhead: reg(
                r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "relaygate_overhead_seconds",
                        "Time spent inside relaygate per request, upstream wait excluded.",
                    )
                    .buckets(OVERHEAD_BUCKETS.to_vec()),
                ),
            ),
            tokens: reg(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "relaygate_tokens_total",
                        "Tokens from upstream usage, by type (prompt, completion, cached_prompt, reasoning).",
                    ),
                    &["model", "upstream", "type"],
                ),
            ),
            cost: reg(
                r,
                CounterVec::new(
                    Opts::new(
                        "relaygate_cost_usd_total",
                        "Cost in USD from the configured price table.",
                    ),
                    &["model", "upstream"],
                ),
            ),
            usage_estimated: reg(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "relaygate_usage_estimated_total",
                        "Requests whose tokens were estimated (no usage from upstream: a cut stream, or an upstream that ignores stream_options.include_usage).",
                    ),
                    &["model", "upstream"],
                ),
            ),
            config_reloads: reg(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "relaygate_config_reloads_total",
                        "Config reloads, by result (success, error).",
                    ),
                    &["result"],
                ),
            ),
            build_info: reg(
                r,
                IntGaugeVec::new(
                    Opts::new("relaygate_build_info", "Always 1; the version is in the label."),
                    &["version"],
                ),
            ),
            retries: reg(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "relaygate_retries_total",
                        "Extra upstream attempts, by the upstream that failed and why.",
                    ),
                    &["upstream", "reason"],
                ),
            ),
            failovers: reg(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "relaygate_failovers_total",
                        "Attempts moved from one upstream to another, by model.",
                    ),
                    &["model", "from", "to"],
                ),
            ),
            hedges: reg(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "relaygate_hedges_total",
                        "Hedged requests, by whether the hedge's answer was used (won) or not (lost).",
                    ),
                    &["model", "result"],
                ),
            ),
            route_picks: reg(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "relaygate_route_picks_total",
                        "Targets picked for an attempt (first, failover or hedge), by model, upstream and \
                         the model's routing strategy (priority, latency, cost).",
                    ),
                    &["model", "upstream", "strategy"],
                ),
            ),
            target_load: reg(
                r,
                GaugeVec::new(
                    Opts::new(
                        "relaygate_target_load",
                        "Latency and cost routing: the target's estimated time to first token in seconds \
                         (peak EWMA, failure penalties included), as of the scrape.",
                    ),
                    &["model", "upstream"],
                ),
            ),
            circuit_state: reg(
                r,
                IntGaugeVec::new(
                    Opts::new(
                        "relaygate_circuit_state",
                        "Circuit breaker state per upstream: 0 closed, 1 half-open, 2 open.",
                    ),
                    &["upstream"],
                ),
            ),
            circuit_transitions: reg(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "relaygate_circuit_transitions_total",
                        "Circuit breaker transitions per upstream.",
                    ),
                    &["upstream", "from", "to"],
                ),
            ),
            ledger_dropped: reg(r, IntCounter::new(
                "relaygate_ledger_dropped_total",
                "Usage ledger lines dropped: the writer fell behind, a write failed, or the line came after shutdown.",
            )),
            client_connections: reg(r, IntGauge::new(
                "relaygate_client_connections",
                "Open client connections, idle keep-alive connections included.",
            )),
            client_timeouts: reg(r, IntCounterVec::new(
                Opts::new(
                    "relaygate_client_timeouts_total",
                    "Client connections closed by a server timeout: header, keepalive or send.",
                ),
                &["kind"],
            )),
            shadow_requests: reg(r, IntCounterVec::new(
                Opts::new("relaygate_shadow_requests_total", "Shadow (mirrored) requests, by model, shadow upstream and outcome."),
                &["model", "upstream", "outcome"],
            )),
            shadow_duration: reg(r, HistogramVec::new(
                HistogramOpts::new("relaygate_shadow_duration_seconds", "Shadow request latency, read to the end.")
                    .buckets(REQUEST_BUCKETS.to_vec()),
                &["model", "upstream"],
            )),
            shadow_ttft: reg(r, HistogramVec::new(
                HistogramOpts::new("relaygate_shadow_time_to_first_token_seconds", "Shadow streams: time to the first event.")
                    .buckets(TTFT_BUCKETS.to_vec()),
                &["model", "upstream"],
            )),
            shadow_tokens: reg(r, IntCounterVec::new(
                Opts::new("relaygate_shadow_tokens_total", "Tokens used by shadow requests, by type."),
                &["model", "upstream", "type"],
            )),
            shadow_cost: reg(r, CounterVec::new(
                Opts::new("relaygate_shadow_cost_usd_total", "Cost in USD of shadow requests, from the shadow's price."),
                &["model", "upstream"],
            )),
            shadow_dropped: reg(r, IntCounterVec::new(
                Opts::new("relaygate_shadow_dropped_total", "Sampled shadow requests dropped because max_in_flight was reached."),
                &["model"],
            )),
            registry,
        };
        m.build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        for result in ["success", "error"] {
            m.config_reloads.with_label_values(&[result]);
        }
        for kind in TIMEOUT_KINDS {
            m.client_timeouts.with_label_values(&[kind]);
        }
        #[cfg(target_os = "linux")]
        {
            // process_cpu_seconds_total, process_resident_memory_bytes, process_open_fds, …
            let _ = m
                .registry
                .register(Box::new(prometheus::process_collector::ProcessCollector::for_self()));
        }
        m
    }

    /// Creates the series of every configured model and its upstreams up
    /// front, so that dashboards and `rate()` see zeros instead of gaps.
    pub fn preregister<'a>(&self, routes: impl Iterator<Item = (&'a str, Vec<&'a str>)>) {
        for (model, upstreams) in routes {
            self.request_duration.with_label_values(&[model]);
            for upstream in upstreams {
                for kind in TOKEN_TYPES {
                    self.tokens.with_label_values(&[model, upstream, kind]);
                }
                self.cost.with_label_values(&[model, upstream]);
                self.upstream_duration.with_label_values(&[upstream]);
            }
        }
    }

    pub fn render(&self) -> String {
        let mut out = Vec::with_capacity(16 * 1024);
        // Encoding into a Vec cannot fail for well-formed metric families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn cost_counter(&self, model: &str, upstream: &str) -> Counter {
        self.cost.with_label_values(&[model, upstream])
    }
}

// ---------------------------------------------------------------------------
// Handles resolved once. The request path records through these: an array
// index and an atomic add, no label vector hashed per request. They are built
// when the config loads (and again on reload, from the same registry, so the
// series carry on). Cells keyed by a status code are filled on first use, so
// that only the combinations that happen become series, as before.
// ---------------------------------------------------------------------------

/// The status codes that are labels of their own; any other is `other`.
const STATUS_CODES: [(u16, &str); 18] = [
    (200, "200"),
    (201, "201"),
    (204, "204"),
    (400, "400"),
    (401, "401"),
    (403, "403"),
    (404, "404"),
    (405, "405"),
    (408, "408"),
    (409, "409"),
    (413, "413"),
    (422, "422"),
    (429, "429"),
    (499, "499"),
    (500, "500"),
    (502, "502"),
    (503, "503"),
    (504, "504"),
];
/// Cell slots: one per code above, then `other`, then `none` (an attempt
/// that got no status).
const OTHER_SLOT: usize = STATUS_CODES.len();
const NONE_SLOT: usize = STATUS_CODES.len() + 1;
const STATUS_SLOTS: usize = STATUS_CODES.len() + 2;

fn status_slot(status: Option<u16>) -> usize {
    match status {
        None => NONE_SLOT,
        Some(code) => STATUS_CODES.iter().position(|&(c, _)| c == code).unwrap_or(OTHER_SLOT),
    }
}

fn slot_label(slot: usize) -> &'static str {
    match STATUS_CODES.get(slot) {
        Some(&(_, label)) => label,
        None if slot == NONE_SLOT => "none",
        None => OTHER,
    }
}

/// Status codes as static label strings; anything unusual is `other`.
pub fn status_label(status: u16) -> &'static str {
    slot_label(status_slot(Some(status)))
}

/// A counter per (status, last label) of a family whose leading labels are
/// fixed, each resolved on first use.
struct StatusCells<const N: usize> {
    family: IntCounterVec,
    fixed: Box<[Arc<str>]>,
    cells: Box<[[OnceLock<IntCounter>; N]; STATUS_SLOTS]>,
}

impl<const N: usize> StatusCells<N> {
    fn new(family: &IntCounterVec, fixed: &[&str]) -> Self {
        Self {
            family: family.clone(),
            fixed: fixed.iter().map(|&f| Arc::from(f)).collect(),
            cells: Box::new(std::array::from_fn(|_| std::array::from_fn(|_| OnceLock::new()))),
        }
    }

    /// The cell `last` of `status`; `after` are the labels that follow
    /// the status (they name `last`).
    fn get(&self, status: Option<u16>, last: usize, after: &[&str]) -> &IntCounter {
        let slot = status_slot(status);
        self.cells[slot][last].get_or_init(|| {
            let mut labels: Vec<&str> = self.fixed.iter().map(|f| &**f).collect();
            labels.push(slot_label(slot));
            labels.extend_from_slice(after);
            self.family.with_label_values(&labels)
        })
    }
}

/// The `endpoint` label of `relaygate_requests_total`, a closed set indexed
/// by `request::Endpoint`'s discriminants.
pub const ENDPOINTS: [&str; 5] = [
    "chat_completions",
    "completions",
    "embeddings",
    "responses",
    "passthrough",
];

/// `relaygate_requests_total` cells: one per (outcome, endpoint).
const REQUEST_CELLS: usize = Outcome::COUNT * ENDPOINTS.len();

fn request_cell(cells: &StatusCells<REQUEST_CELLS>, status: u16, outcome: Outcome, endpoint: usize) -> &IntCounter {
    cells.get(
        Some(status),
        endpoint * Outcome::COUNT + outcome as usize,
        &[outcome.as_str(), ENDPOINTS[endpoint]],
    )
}

/// One upstream's attempt metrics.
pub struct UpstreamMetrics {
    attempts: StatusCells<{ ErrorType::ALL.len() }>,
    duration: Histogram,
    /// `relaygate_retries_total{upstream,reason}`, in `RETRY_REASONS` order.
    retries: [IntCounter; RETRY_REASONS.len()],
    retries_family: IntCounterVec,
    upstream: Arc<str>,
}

/// The reasons an attempt is retried for (the failures of the table in
/// `outcome`, and the two that fail over: 429 and 401/403).
pub const RETRY_REASONS: [ErrorType; 7] = [
    ErrorType::Connect,
    ErrorType::Timeout,
    ErrorType::Reset,
    ErrorType::ServerError,
    ErrorType::Malformed,
    ErrorType::RateLimited,
    ErrorType::Auth,
];

impl UpstreamMetrics {
    pub fn new(metrics: &Metrics, upstream: &str) -> Self {
        Self {
            attempts: StatusCells::new(&metrics.upstream_requests, &[upstream]),
            duration: metrics.upstream_duration.with_label_values(&[upstream]),
            retries: RETRY_REASONS.map(|r| metrics.retries.with_label_values(&[upstream, r.as_str()])),
            retries_family: metrics.retries.clone(),
            upstream: Arc::from(upstream),
        }
    }

    /// One retry away from this upstream, in `relaygate_retries_total`.
    pub fn retry(&self, reason: ErrorType) {
        match RETRY_REASONS.iter().position(|&r| r == reason) {
            Some(i) => self.retries[i].inc(),
            // Not a reason the table retries for; counted all the same.
            None => self
                .retries_family
                .with_label_values(&[&*self.upstream, reason.as_str()])
                .inc(),
        }
    }

    /// One attempt in `relaygate_upstream_requests_total` and
    /// `relaygate_upstream_duration_seconds`.
    pub fn attempt(&self, status: Option<u16>, error_type: ErrorType, started: Instant) {
        self.attempts
            .get(status, error_type as usize, &[error_type.as_str()])
            .inc();
        self.duration.observe(started.elapsed().as_secs_f64());
    }
}

/// What answered a request, for `relaygate_requests_total{upstream}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnsweredBy {
    /// The upstream (an index) that answered, or was the last one tried.
    Upstream(usize),
    Cache,
    /// No upstream was tried (refused before routing, or no target).
    None,
}

/// One model's request metrics, and those it shares with each upstream it
/// routes to.
pub struct ModelMetrics {
    pub label: Arc<str>,
    /// `relaygate_requests_total` with `upstream="none"` (no upstream was
    /// tried) and `upstream="cache"` (a cache hit); those with an upstream
    /// are in `ModelUpstreamMetrics`.
    requests: StatusCells<REQUEST_CELLS>,
    cache_hits: StatusCells<REQUEST_CELLS>,
    pub duration: Histogram,
    /// By upstream index; `Some` for the model's targets.
    upstreams: Vec<Option<ModelUpstreamMetrics>>,
}

pub struct ModelUpstreamMetrics {
    requests: StatusCells<REQUEST_CELLS>,
    pub ttft: Histogram,
    pub inter_token: Histogram,
    /// In `TOKEN_TYPES` order.
    pub tokens: [IntCounter; 4],
    pub cost: Counter,
    pub usage_estimated: IntCounter,
}

impl ModelMetrics {
    /// `upstreams`: every configured upstream name, by index; `targets`: the
    /// indexes this model routes to.
    pub fn new(metrics: &Metrics, label: &str, upstreams: &[&str], targets: &[usize]) -> Self {
        let by_upstream = upstreams
            .iter()
            .enumerate()
            .map(|(i, upstream)| {
                targets.contains(&i).then(|| ModelUpstreamMetrics {
                    requests: StatusCells::new(&metrics.requests, &[label, upstream]),
                    ttft: metrics.ttft.with_label_values(&[label, upstream]),
                    inter_token: metrics.inter_token.with_label_values(&[label, upstream]),
                    tokens: TOKEN_TYPES.map(|kind| metrics.tokens.with_label_values(&[label, upstream, kind])),
                    cost: metrics.cost.with_label_values(&[label, upstream]),
                    usage_estimated: metrics.usage_estimated.with_label_values(&[label, upstream]),
                })
            })
            .collect();
        Self {
            label: Arc::from(label),
            requests: StatusCells::new(&metrics.requests, &[label, "none"]),
            cache_hits: StatusCells::new(&metrics.requests, &[label, "cache"]),
            duration: metrics.request_duration.with_label_values(&[label]),
            upstreams: by_upstream,
        }
    }

    /// The model label `other`: a request that never matched a model.
    pub fn other(metrics: &Metrics) -> Self {
        Self::new(metrics, OTHER, &[], &[])
    }

    /// The request counter for an answer from `by` to `endpoint` (an index
    /// into `ENDPOINTS`).
    pub fn request(&self, status: u16, outcome: Outcome, by: AnsweredBy, endpoint: usize) -> &IntCounter {
        let cells = match by {
            AnsweredBy::Upstream(i) => self.at(i).map_or(&self.requests, |at| &at.requests),
            AnsweredBy::Cache => &self.cache_hits,
            AnsweredBy::None => &self.requests,
        };
        request_cell(cells, status, outcome, endpoint)
    }

    /// The metrics of this model at `upstream` (an index), if it routes there.
    pub fn at(&self, upstream: usize) -> Option<&ModelUpstreamMetrics> {
        self.upstreams.get(upstream)?.as_ref()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn reg<C: prometheus::core::Collector + Clone + 'static>(registry: &Registry, c: prometheus::Result<C>) -> C {
    // Names and label sets are constants above; a failure here is a
    // programming error caught by every test.
    let c = c.expect("valid metric definition");
    registry.register(Box::new(c.clone())).expect("metric registered once");
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_contract_names() {
        let m = Metrics::new();
        m.preregister([("deepseek-chat", vec!["holysheep"])].into_iter());
        m.requests
            .with_label_values(&["deepseek-chat", "holysheep", "200", "success", "chat_completions"])
            .inc();
        let text = m.render();
        for name in [
            "relaygate_requests_total{endpoint=\"chat_completions\",model=\"deepseek-chat\",outcome=\"success\",status=\"200\",upstream=\"holysheep\"} 1",
            "relaygate_request_duration_seconds_bucket{model=\"deepseek-chat\",le=\"0.12\"} 0",
            "relaygate_in_flight_requests 0",
            "relaygate_build_info{version=\"",
            "relaygate_tokens_total{model=\"deepseek-chat\",type=\"cached_prompt\",upstream=\"holysheep\"} 0",
            "relaygate_config_reloads_total{result=\"error\"} 0",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
    }

    #[test]
    fn resolved_handles_record_under_the_right_labels() {
        let m = Metrics::new();
        let model = ModelMetrics::new(&m, "chat", &["a", "b", "c"], &[0, 2]);
        model
            .request(503, Outcome::UpstreamError, AnsweredBy::Upstream(2), 0)
            .inc();
        model
            .request(503, Outcome::UpstreamError, AnsweredBy::Upstream(2), 0)
            .inc();
        model.request(418, Outcome::ClientError, AnsweredBy::None, 0).inc();
        model.request(200, Outcome::Success, AnsweredBy::Cache, 0).inc();
        // An index that is not a target counts as no upstream.
        model
            .request(418, Outcome::ClientError, AnsweredBy::Upstream(1), 0)
            .inc();
        model.at(2).expect("a target").tokens[3].inc_by(7);
        assert!(model.at(1).is_none(), "b is not a target");
        let upstream = UpstreamMetrics::new(&m, "a");
        upstream.attempt(None, ErrorType::Cancelled, Instant::now());
        upstream.attempt(Some(429), ErrorType::RateLimited, Instant::now());
        let text = m.render();
        for series in [
            r#"relaygate_requests_total{endpoint="chat_completions",model="chat",outcome="upstream_error",status="503",upstream="c"} 2"#,
            r#"relaygate_requests_total{endpoint="chat_completions",model="chat",outcome="client_error",status="other",upstream="none"} 2"#,
            r#"relaygate_requests_total{endpoint="chat_completions",model="chat",outcome="success",status="200",upstream="cache"} 1"#,
            r#"relaygate_tokens_total{model="chat",type="reasoning",upstream="c"} 7"#,
            r#"relaygate_upstream_requests_total{error_type="cancelled",status="none",upstream="a"} 1"#,
            r#"relaygate_upstream_requests_total{error_type="rate_limited",status="429",upstream="a"} 1"#,
        ] {
            assert!(text.contains(series), "missing {series} in\n{text}");
        }
        // Only combinations that happened are series.
        assert!(!text.contains(r#"status="200",upstream="c"}"#), "{text}");
        // Every code is its own label or `other`, and the listed ones are themselves.
        for code in 100..600 {
            let label = status_label(code);
            assert!(label == code.to_string() || label == OTHER, "{code} -> {label}");
        }
        for code in [
            200, 201, 204, 400, 401, 403, 404, 405, 408, 409, 413, 422, 429, 499, 500, 502, 503, 504,
        ] {
            assert_eq!(status_label(code), code.to_string());
        }
        assert_eq!(status_label(418), OTHER);
        assert_eq!(slot_label(status_slot(None)), "none");
    }
}
