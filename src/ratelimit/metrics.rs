//! The rate limiter's metrics. Names are a contract (docs/metrics.md).
//! Labels come only from config (rule names and their scopes) and a closed
//! set (`QueueResult`), so no request value can create series.

use prometheus::{HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

use super::config::Rule;

/// How a queued request left the queue: `relaygate_ratelimit_queue_wait_seconds{result}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum QueueResult {
    Admitted,
    /// Timed out, or refused by a rule that does not queue.
    Rejected,
    /// The caller went away (its future was dropped) while waiting.
    Cancelled,
}

impl QueueResult {
    pub fn as_str(self) -> &'static str {
        match self {
            QueueResult::Admitted => "admitted",
            QueueResult::Rejected => "rejected",
            QueueResult::Cancelled => "cancelled",
        }
    }
}

/// Time spent queued. A slot opens one request interval after the last one
/// (10 ms at 6000 rpm, 1 s at 60 rpm), and waits end at `max_queue_wait`
/// (5 s by default, rarely configured past 30 s): dense below a second, a
/// bucket at the default wait, sparse up to a minute.
const QUEUE_WAIT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0,
];

#[derive(Clone)]
pub(crate) struct Metrics {
    pub rate_limited: IntCounterVec,
    pub queue_wait: HistogramVec,
    pub backend_errors: IntCounter,
    pub fallback_active: IntGauge,
}

impl Metrics {
    /// Registers on `registry`. Fails when the names are already there (one
    /// `Limiter` per registry).
    pub fn register(registry: &Registry, rules: &[Rule]) -> Result<Metrics, String> {
        let m = Metrics {
            rate_limited: IntCounterVec::new(
                Opts::new(
                    "relaygate_rate_limited_total",
                    "Requests refused by a rate-limit rule (429), by the rule's scope and name.",
                ),
                &["scope", "rule"],
            )
            .map_err(|e| e.to_string())?,
            queue_wait: HistogramVec::new(
                HistogramOpts::new(
                    "relaygate_ratelimit_queue_wait_seconds",
                    "Time requests waited in a rate-limit queue, by how they left it.",
                )
                .buckets(QUEUE_WAIT_BUCKETS.to_vec()),
                &["result"],
            )
            .map_err(|e| e.to_string())?,
            backend_errors: IntCounter::new(
                "relaygate_ratelimit_backend_errors_total",
                "Failed or timed-out calls to the shared rate-limit backend (Redis).",
            )
            .map_err(|e| e.to_string())?,
            fallback_active: IntGauge::new(
                "relaygate_ratelimit_fallback_active",
                "1 while Redis is considered down: local fallback limits apply (fail_mode open) or requests are refused (closed).",
            )
            .map_err(|e| e.to_string())?,
        };
        let collectors: [Box<dyn prometheus::core::Collector>; 4] = [
            Box::new(m.rate_limited.clone()),
            Box::new(m.queue_wait.clone()),
            Box::new(m.backend_errors.clone()),
            Box::new(m.fallback_active.clone()),
        ];
        for c in collectors {
            registry.register(c).map_err(|e| format!("rate limit metrics: {e}"))?;
        }
        // Zeros instead of gaps for dashboards and rate().
        for rule in rules {
            m.rate_limited.with_label_values(&[rule.scope.as_str(), &rule.name]);
        }
        for result in [QueueResult::Admitted, QueueResult::Rejected, QueueResult::Cancelled] {
            m.queue_wait.with_label_values(&[result.as_str()]);
        }
        Ok(m)
    }
}
