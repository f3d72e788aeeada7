//! Writing one finished request, once, to everything that observes
//! requests: the metrics, the `/health` windows, the usage ledger and the
//! shadow comparison, the trace, and the access-log line. The facts come
//! from the gateway's request record (`gateway::record`), which follows the
//! request to its end; this is the writer, and knows nothing of requests in
//! flight.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use super::access_log::AccessLine;
use super::ledger::LedgerLine;
use super::metrics::{AnsweredBy, ModelMetrics};
use super::otel::{AttemptSpan, RequestSpan, TraceContext};
use super::window::{Sample, Window};
use super::Sinks;
use crate::outcome::Outcome;

/// The trace of one request, when OTLP export is on.
pub struct Trace {
    pub context: TraceContext,
    pub span_id: [u8; 8],
    pub started: SystemTime,
    /// Filled by the attempts (see `stack::attempt`).
    pub attempts: Arc<Mutex<Vec<AttemptSpan>>>,
}

/// Token counts in `metrics::TOKEN_TYPES` order: prompt, completion,
/// cached prompt, reasoning.
pub type Tokens = [u64; 4];

/// What one request was, at its end: plain facts, plus the metric handles
/// they are counted in.
pub struct Finished<'a> {
    pub request_id: &'a str,
    /// The client key's name, never the key.
    pub key: &'a str,
    /// `gen_ai.operation.name` for traces.
    pub operation: &'static str,
    /// The `endpoint` label: an index into `metrics::ENDPOINTS`.
    pub endpoint: usize,
    /// The model's metric handles (the label `other` for a request that
    /// matched none).
    pub model: &'a ModelMetrics,
    /// The upstream that answered, or the last one tried: its name and its
    /// index in the config.
    pub upstream: Option<(&'a str, usize)>,
    /// That upstream's `/health` window.
    pub upstream_window: Option<&'a Window>,
    /// The model name sent upstream.
    pub upstream_model: Option<&'a str>,
    pub status: u16,
    pub outcome: Outcome,
    pub error_code: Option<&'a str>,
    pub stream: bool,
    /// Upstream calls made (refusals excluded).
    pub attempts: u32,
    pub latency: Duration,
    pub ttft: Option<Duration>,
    pub tokens: Option<Tokens>,
    pub usage_estimated: bool,
    pub cost_usd: f64,
    /// The model has a shadow: the request feeds the comparison.
    pub compared: bool,
    /// A fingerprint of the answer's text, for the comparison.
    pub content_hash: Option<String>,
    pub trace: Option<Trace>,
    /// The response cache's result (`hit`, `miss`, `refresh`, `bypass`) for
    /// a model that uses it.
    pub cache: Option<&'static str>,
    /// A hit: the price of the usage it replayed.
    pub saved_usd: f64,
}

impl Finished<'_> {
    fn cache_hit(&self) -> bool {
        self.cache == Some("hit")
    }
}

impl Sinks {
    /// Writes one finished request everywhere it is observed.
    pub fn write(&self, mut f: Finished<'_>) {
        self.count(&f);
        self.observe_health(&f);
        self.write_ledger(&f);
        if let Some(trace) = f.trace.take() {
            self.export_trace(&f, trace);
        }
        super::access_log::write(&AccessLine {
            request_id: f.request_id,
            key: f.key,
            model: &f.model.label,
            upstream: match f.upstream {
                _ if f.cache_hit() => "cache",
                Some((name, _)) => name,
                None => "-",
            },
            status: f.status,
            outcome: f.outcome.as_str(),
            error: f.error_code.unwrap_or("-"),
            stream: f.stream,
            attempts: f.attempts,
            latency: f.latency,
            ttft: f.ttft,
            tokens: f.tokens.map(|t| (t[0], t[1])),
            usage_estimated: f.usage_estimated,
        });
    }

    fn count(&self, f: &Finished<'_>) {
        let by = match f.upstream {
            _ if f.cache_hit() => AnsweredBy::Cache,
            Some((_, index)) => AnsweredBy::Upstream(index),
            None => AnsweredBy::None,
        };
        f.model.request(f.status, f.outcome, by, f.endpoint).inc();
        f.model.duration.observe(f.latency.as_secs_f64());
        let at = f.upstream.and_then(|(_, index)| f.model.at(index));
        if let (Some(tokens), Some(at)) = (f.tokens, at) {
            for (counter, n) in at.tokens.iter().zip(tokens) {
                if n > 0 {
                    counter.inc_by(n);
                }
            }
            if f.cost_usd > 0.0 {
                at.cost.inc_by(f.cost_usd);
            }
            if f.usage_estimated {
                at.usage_estimated.inc();
            }
        }
    }

    fn observe_health(&self, f: &Finished<'_>) {
        let sample = Sample {
            latency: f.latency,
            ttft: f.ttft,
            // The same requests the availability SLO counts.
            eligible: !matches!(
                f.outcome,
                Outcome::ClientError | Outcome::RateLimited | Outcome::Cancelled
            ),
            ok: f.outcome == Outcome::Success,
        };
        self.window.record(&sample);
        if let Some(window) = f.upstream_window {
            window.record(&sample);
        }
    }

    fn write_ledger(&self, f: &Finished<'_>) {
        if self.ledger.is_none() && !f.compared {
            return;
        }
        let [prompt, completion, cached, reasoning] = f.tokens.unwrap_or_default();
        let line = LedgerLine {
            time: super::ledger::format_time(SystemTime::now()),
            request_id: f.request_id.to_owned(),
            key: f.key.to_owned(),
            model: f.model.label.to_string(),
            upstream: f.upstream.map(|(name, _)| name.to_owned()),
            upstream_model: f.upstream_model.map(str::to_owned),
            status: f.status,
            outcome: f.outcome.as_str().to_owned(),
            stream: f.stream,
            prompt_tokens: prompt,
            completion_tokens: completion,
            cached_tokens: cached,
            reasoning_tokens: reasoning,
            billable_input_tokens: prompt.saturating_sub(cached),
            billable_output_tokens: completion,
            cost_usd: f.cost_usd,
            latency_ms: f.latency.as_secs_f64() * 1000.0,
            ttft_ms: f.ttft.map(|t| t.as_secs_f64() * 1000.0),
            attempts: f.attempts,
            usage_estimated: f.usage_estimated,
            shadow: false,
            content_hash: f.content_hash.clone(),
            cache: f.cache.map(str::to_owned),
            saved_usd: f.cache_hit().then_some(f.saved_usd),
        };
        if f.compared {
            self.comparison.add(&line);
        }
        if let Some(ledger) = &self.ledger {
            ledger.record(line);
        }
    }

    fn export_trace(&self, f: &Finished<'_>, trace: Trace) {
        let Some(exporter) = &self.otel else {
            return;
        };
        let attempts = std::mem::take(&mut *trace.attempts.lock().unwrap_or_else(|e| e.into_inner()));
        exporter.export(RequestSpan {
            context: trace.context,
            span_id: trace.span_id,
            operation: f.operation,
            model: f.model.label.to_string(),
            start: trace.started,
            end: SystemTime::now(),
            status: f.status,
            outcome: f.outcome.as_str().to_owned(),
            stream: f.stream,
            key: f.key.to_owned(),
            response_model: f.upstream_model.map(str::to_owned),
            input_tokens: f.tokens.map(|t| t[0]),
            output_tokens: f.tokens.map(|t| t[1]),
            ttft: f.ttft,
            attempts,
        });
    }
}
