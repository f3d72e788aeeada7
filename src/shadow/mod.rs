//! Shadow comparison: a sampled share of a model's requests is sent, in the
//! background, to a candidate upstream/model as well, read to the end and
//! discarded. The client never sees it and never waits for it: the shadow
//! is spawned beside the primary, holds none of the client's slots, makes a
//! single attempt (no retries, no failover), and counts only against the
//! shadow upstream's own breaker and upstream-scoped rate limits. At most
//! `max_in_flight` shadows run per model; beyond that they are dropped and
//! counted.
//!
//! Everything about shadows is recorded apart from the primary traffic:
//! `relaygate_shadow_*` metrics, ledger lines with `shadow: true`, and the
//! in-memory `Comparison` behind `GET /admin/shadow`. `relaygate compare`
//! builds the same comparison from a ledger file.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http::HeaderMap;
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::app::Runtime;
use crate::gateway::record::Sinks;
use crate::request::{Endpoint, ParsedRequest};
use crate::sse::ReadError;
use crate::telemetry::ledger::LedgerLine;
use crate::telemetry::metrics::{Metrics, Outcome, TOKEN_TYPES};
use crate::upstream::{Attempt, Reply};
use crate::usage::Usage;

/// Per-model shadow slots (`max_in_flight`), same order as `config.models`.
pub fn slots(runtime_models: &[crate::config::ModelConfig]) -> Vec<Option<Arc<Semaphore>>> {
    runtime_models
        .iter()
        .map(|m| m.shadow.as_ref().map(|s| Arc::new(Semaphore::new(s.max_in_flight))))
        .collect()
}

/// What a shadow needs from the primary request.
pub struct Mirror {
    pub runtime: Arc<Runtime>,
    pub sinks: Arc<Sinks>,
    pub model: usize,
    pub endpoint: Endpoint,
    pub parsed: ParsedRequest,
    pub body: Bytes,
    pub headers: HeaderMap,
    pub request_id: String,
    pub key: Arc<str>,
}

/// Decides whether this request is mirrored and, if so, spawns the shadow.
/// Returns true when a shadow was started.
pub fn maybe_mirror(mirror: Mirror) -> bool {
    let model = &mirror.runtime.config.models[mirror.model];
    let Some(shadow) = &model.shadow else {
        return false;
    };
    if fastrand::f64() >= shadow.sample {
        return false;
    }
    let Some(slots) = &mirror.runtime.shadow_slots[mirror.model] else {
        return false;
    };
    let Ok(permit) = slots.clone().try_acquire_owned() else {
        mirror
            .sinks
            .metrics
            .shadow_dropped
            .with_label_values(&[&model.name])
            .inc();
        return false;
    };
    tokio::spawn(async move {
        run(&mirror).await;
        drop(permit);
    });
    true
}

/// How one shadow went.
struct Outcome2 {
    outcome: Outcome,
    status: u16,
    usage: Option<Usage>,
    ttft: Option<Duration>,
    text: Option<String>,
}

async fn run(m: &Mirror) {
    let runtime = &m.runtime;
    let model = &runtime.config.models[m.model];
    let Some(shadow) = &model.shadow else {
        return;
    };
    let upstream = &runtime.upstreams[shadow.upstream];
    let started = Instant::now();
    let result = attempt(m, shadow, started).await;
    let elapsed = started.elapsed();

    let metrics = &m.sinks.metrics;
    let labels = [model.name.as_str(), &*upstream.name];
    metrics
        .shadow_requests
        .with_label_values(&[labels[0], labels[1], result.outcome.as_str()])
        .inc();
    metrics
        .shadow_duration
        .with_label_values(&labels)
        .observe(elapsed.as_secs_f64());
    if let Some(t) = result.ttft {
        metrics.shadow_ttft.with_label_values(&labels).observe(t.as_secs_f64());
    }
    let usage = result.usage.unwrap_or_default();
    for (kind, n) in TOKEN_TYPES
        .iter()
        .zip([usage.prompt, usage.completion, usage.cached_prompt, usage.reasoning])
    {
        if n > 0 {
            metrics
                .shadow_tokens
                .with_label_values(&[labels[0], labels[1], kind])
                .inc_by(n);
        }
    }
    let cost = shadow.price.map_or(0.0, |p| usage.cost(&p));
    if cost > 0.0 {
        metrics.shadow_cost.with_label_values(&labels).inc_by(cost);
    }
    let hash = (m.parsed.temperature_zero)
        .then(|| result.text.as_deref().map(content_hash))
        .flatten();
    let line = LedgerLine {
        time: crate::telemetry::ledger::format_time(SystemTime::now()),
        request_id: m.request_id.clone(),
        key: m.key.to_string(),
        model: model.name.clone(),
        upstream: Some(upstream.name.to_string()),
        upstream_model: Some(shadow.model.clone()),
        status: result.status,
        outcome: result.outcome.as_str().to_owned(),
        stream: m.parsed.stream,
        prompt_tokens: usage.prompt,
        completion_tokens: usage.completion,
        cached_tokens: usage.cached_prompt,
        reasoning_tokens: usage.reasoning,
        billable_input_tokens: usage.prompt.saturating_sub(usage.cached_prompt),
        billable_output_tokens: usage.completion,
        cost_usd: cost,
        latency_ms: elapsed.as_secs_f64() * 1000.0,
        ttft_ms: result.ttft.map(|t| t.as_secs_f64() * 1000.0),
        attempts: 1,
        usage_estimated: false,
        shadow: true,
        content_hash: hash,
    };
    m.sinks.comparison.add(&line);
    if let Some(ledger) = &m.sinks.ledger {
        ledger.record(line);
    }
}

/// One attempt at the shadow upstream, read to the end.
async fn attempt(m: &Mirror, shadow: &crate::config::ShadowConfig, started: Instant) -> Outcome2 {
    let upstream = &m.runtime.upstreams[shadow.upstream];
    let fail = |outcome, status| Outcome2 {
        outcome,
        status,
        usage: None,
        ttft: None,
        text: None,
    };
    let ticket = match upstream.state.breaker.try_acquire() {
        Ok(t) => t,
        Err(_) => return fail(Outcome::CircuitOpen, 503),
    };
    let limiter = m.sinks.limiter.clone();
    let admission = if limiter.has_rules() {
        let estimate = crate::ratelimit::estimate_tokens(&m.body, limiter.settings().default_max_tokens);
        match limiter.admit_upstream(&upstream.name, estimate).await {
            Ok(a) => Some(a),
            Err(_) => return fail(Outcome::RateLimited, 429),
        }
    } else {
        None
    };
    let deadline = started + upstream.config.request_timeout;
    let reply = upstream
        .send(
            Attempt {
                endpoint: m.endpoint,
                body: m.parsed.body_for(&m.body, &shadow.model),
                headers: m.headers.clone(),
                stream: m.parsed.stream,
                deadline,
            },
            m.runtime.config.server.max_response_bytes,
        )
        .await;
    let want_text = m.parsed.temperature_zero;
    let out = match reply {
        Err(e) => {
            ticket.failure(e.error_type);
            fail(e.error.outcome(), e.error.status().as_u16())
        }
        Ok(Reply::Full {
            status, body, usage, ..
        }) => {
            let code = status.as_u16();
            match crate::stack::classify_status(code) {
                Some(error) => ticket.failure(error),
                None if status.is_success() => ticket.success(),
                None => drop(ticket),
            }
            Outcome2 {
                outcome: Outcome::of_status(code),
                status: code,
                usage,
                ttft: None,
                text: want_text.then(|| message_text(&body)).flatten(),
            }
        }
        Ok(Reply::Stream { first, mut reader, .. }) => {
            let ttft = started.elapsed();
            let mut usage = None;
            let mut text = String::new();
            let mut done = false;
            let mut batch = Some(first);
            let mut broken = false;
            while let Some(b) = batch.take() {
                let info = crate::sse::inspect(&b);
                done |= info.done;
                usage = info.usage.or(usage);
                if want_text {
                    stream_text(&b, &mut text);
                }
                let idle_at = (Instant::now() + upstream.config.idle_timeout).min(deadline);
                match tokio::time::timeout_at(idle_at, reader.next_batch()).await {
                    Ok(Ok(Some(next))) => batch = Some(next),
                    Ok(Ok(None)) => {}
                    Ok(Err(ReadError::Reset | ReadError::Truncated | ReadError::EventTooLarge)) | Err(_) => {
                        broken = true
                    }
                }
            }
            if broken || !done {
                ticket.failure(crate::telemetry::metrics::ErrorType::Reset);
            } else {
                ticket.success();
            }
            Outcome2 {
                outcome: if broken || !done {
                    Outcome::UpstreamError
                } else {
                    Outcome::Success
                },
                status: 200,
                usage,
                ttft: Some(ttft),
                text: want_text.then_some(text),
            }
        }
    };
    if let Some(admission) = admission {
        let used = out.usage.map_or(0, |u| u.prompt + u.completion);
        admission.reconcile(used).await;
    }
    out
}

/// `choices[0].message.content` (chat) or `choices[0].text` (completions).
pub fn message_text(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let choice = &v["choices"][0];
    choice["message"]["content"]
        .as_str()
        .or_else(|| choice["text"].as_str())
        .map(str::to_owned)
}

/// Appends the text deltas of a batch of SSE events.
pub fn stream_text(batch: &[u8], out: &mut String) {
    for line in batch.split(|&b| b == b'\n') {
        let Some(data) = line.strip_prefix(b"data:") else {
            continue;
        };
        let data = data.strip_prefix(b" ").unwrap_or(data);
        if data.starts_with(b"{") {
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) {
                let choice = &v["choices"][0];
                if let Some(t) = choice["delta"]["content"].as_str().or_else(|| choice["text"].as_str()) {
                    out.push_str(t);
                }
            }
        }
    }
}

/// FNV-1a, 64 bit, as hex: a stable fingerprint of an answer's text (not a
/// security hash; collisions only blur the match rate).
pub fn content_hash(text: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

// ---------------------------------------------------------------------------
// The comparison: primary and shadow side by side, per model.
// ---------------------------------------------------------------------------

#[derive(Default)]
struct Side {
    requests: u64,
    ok: u64,
    latency: Option<Histogram<u32>>,
    ttft: Option<Histogram<u32>>,
    tokens: u64,
    cost: f64,
}

impl Side {
    fn add(&mut self, line: &LedgerLine) {
        self.requests += 1;
        self.ok += u64::from(line.outcome == "success");
        let record = |h: &mut Option<Histogram<u32>>, ms: f64| {
            let h = h.get_or_insert_with(|| Histogram::new_with_bounds(1, 3_600_000_000, 2).expect("valid bounds"));
            let _ = h.record(((ms * 1000.0) as u64).clamp(1, 3_600_000_000));
        };
        record(&mut self.latency, line.latency_ms);
        if let Some(t) = line.ttft_ms {
            record(&mut self.ttft, t);
        }
        self.tokens += line.prompt_tokens + line.completion_tokens;
        self.cost += line.cost_usd;
    }
}

#[derive(Default)]
struct ModelComparison {
    primary: Side,
    shadow: Side,
    /// Earliest and latest primary request time (seconds since the epoch).
    span: Option<(f64, f64)>,
    /// temperature-0 answers waiting for their other half, by request id.
    pending: HashMap<(String, bool), String>,
    order: VecDeque<(String, bool)>,
    pairs: u64,
    matches: u64,
}

/// Pending halves kept per model before the oldest are forgotten.
const MAX_PENDING: usize = 10_000;

impl ModelComparison {
    fn add(&mut self, line: &LedgerLine) {
        if line.shadow {
            self.shadow.add(line);
        } else {
            self.primary.add(line);
            if let Some(t) = time_secs(&line.time) {
                self.span = Some(self.span.map_or((t, t), |(a, b)| (a.min(t), b.max(t))));
            }
        }
        let Some(hash) = &line.content_hash else {
            return;
        };
        let other = (line.request_id.clone(), !line.shadow);
        if let Some(theirs) = self.pending.remove(&other) {
            self.pairs += 1;
            self.matches += u64::from(&theirs == hash);
        } else {
            let mine = (line.request_id.clone(), line.shadow);
            self.pending.insert(mine.clone(), hash.clone());
            self.order.push_back(mine);
            while self.order.len() > MAX_PENDING {
                if let Some(old) = self.order.pop_front() {
                    self.pending.remove(&old);
                }
            }
        }
    }
}

fn time_secs(rfc3339: &str) -> Option<f64> {
    humantime::parse_rfc3339_weak(rfc3339.trim_end_matches('Z'))
        .ok()
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map(|d| d.as_secs_f64())
}

/// Primary vs shadow per model; fed by finished requests (or a ledger file).
#[derive(Default)]
pub struct Comparison {
    models: Mutex<HashMap<String, ModelComparison>>,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct SideReport {
    pub requests: u64,
    pub success_rate: Option<f64>,
    pub latency_ms_p50: Option<f64>,
    pub latency_ms_p95: Option<f64>,
    pub latency_ms_p99: Option<f64>,
    pub ttft_ms_p50: Option<f64>,
    pub tokens_per_request: Option<f64>,
    pub usd_per_1k_requests: Option<f64>,
    /// At the primary's observed request rate, for 30 days.
    pub projected_usd_per_month: Option<f64>,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct ModelReport {
    pub model: String,
    pub primary: SideReport,
    pub shadow: SideReport,
    /// temperature-0 pairs compared, and the share whose answers match exactly.
    pub deterministic_pairs: u64,
    pub exact_match_rate: Option<f64>,
}

impl Comparison {
    /// Lines of models without a shadow are fed too; only models that have
    /// shadow lines are reported.
    pub fn add(&self, line: &LedgerLine) {
        let mut models = self.models.lock().unwrap_or_else(|e| e.into_inner());
        models.entry(line.model.clone()).or_default().add(line);
    }

    pub fn report(&self) -> Vec<ModelReport> {
        let models = self.models.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<ModelReport> = models
            .iter()
            .filter(|(_, m)| m.shadow.requests > 0)
            .map(|(name, m)| {
                // Requests per second of primary traffic, over the observed span.
                let rate = m
                    .span
                    .and_then(|(a, b)| (b - a >= 1.0).then(|| m.primary.requests as f64 / (b - a)));
                ModelReport {
                    model: name.clone(),
                    primary: side_report(&m.primary, rate),
                    shadow: side_report(&m.shadow, rate),
                    deterministic_pairs: m.pairs,
                    exact_match_rate: (m.pairs > 0).then(|| m.matches as f64 / m.pairs as f64),
                }
            })
            .collect();
        out.sort_by(|a, b| a.model.cmp(&b.model));
        out
    }
}

fn side_report(s: &Side, primary_rate: Option<f64>) -> SideReport {
    let q = |h: &Option<Histogram<u32>>, q: f64| h.as_ref().map(|h| h.value_at_quantile(q) as f64 / 1000.0);
    let per = |x: f64| (s.requests > 0).then(|| x / s.requests as f64);
    let cost_per_request = per(s.cost);
    SideReport {
        requests: s.requests,
        success_rate: per(s.ok as f64),
        latency_ms_p50: q(&s.latency, 0.50),
        latency_ms_p95: q(&s.latency, 0.95),
        latency_ms_p99: q(&s.latency, 0.99),
        ttft_ms_p50: q(&s.ttft, 0.50),
        tokens_per_request: per(s.tokens as f64),
        usd_per_1k_requests: cost_per_request.map(|c| c * 1000.0),
        projected_usd_per_month: cost_per_request.zip(primary_rate).map(|(c, r)| c * r * 86_400.0 * 30.0),
    }
}

/// The comparison as a text table.
pub fn render(reports: &[ModelReport]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    if reports.is_empty() {
        out.push_str("no shadow traffic recorded\n");
        return out;
    }
    let f = |v: Option<f64>, digits: usize| v.map_or("-".to_owned(), |v| format!("{v:.digits$}"));
    let pct = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{:.2}%", v * 100.0));
    for r in reports {
        let _ = writeln!(out, "model {}", r.model);
        let _ = writeln!(out, "  {:<26} {:>16} {:>16}", "", "primary", "shadow");
        let both = |get: &dyn Fn(&SideReport) -> String| (get(&r.primary), get(&r.shadow));
        let rows: [(&str, (String, String)); 10] = [
            ("requests", both(&|s| s.requests.to_string())),
            ("success rate", both(&|s| pct(s.success_rate))),
            ("latency p50 (ms)", both(&|s| f(s.latency_ms_p50, 1))),
            ("latency p95 (ms)", both(&|s| f(s.latency_ms_p95, 1))),
            ("latency p99 (ms)", both(&|s| f(s.latency_ms_p99, 1))),
            ("TTFT p50 (ms)", both(&|s| f(s.ttft_ms_p50, 1))),
            ("tokens / request", both(&|s| f(s.tokens_per_request, 1))),
            ("$ / 1,000 requests", both(&|s| f(s.usd_per_1k_requests, 6))),
            ("projected $ / month", both(&|s| f(s.projected_usd_per_month, 2))),
            (
                "exact match (temp 0)",
                (pct(r.exact_match_rate), format!("{} pairs", r.deterministic_pairs)),
            ),
        ];
        for (name, (p, s)) in rows {
            let _ = writeln!(out, "  {name:<26} {p:>16} {s:>16}");
        }
    }
    out
}

/// `relaygate compare --ledger FILE`.
#[derive(Debug, clap::Args)]
pub struct CompareArgs {
    /// A usage ledger written with shadows enabled.
    #[arg(long)]
    pub ledger: std::path::PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn compare(args: CompareArgs) -> Result<std::process::ExitCode, String> {
    let text = std::fs::read_to_string(&args.ledger)
        .map_err(|e| format!("cannot read ledger {}: {e}", args.ledger.display()))?;
    let comparison = Comparison::default();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        if let Ok(line) = serde_json::from_str::<LedgerLine>(line) {
            comparison.add(&line);
        }
    }
    let reports = comparison.report();
    let out = if args.json {
        serde_json::to_string_pretty(&reports).unwrap_or_default() + "\n"
    } else {
        render(&reports)
    };
    crate::cmd::print_out(&out);
    Ok(std::process::ExitCode::SUCCESS)
}

/// Metric handles exist for every shadowed model up front.
pub fn preregister(metrics: &Metrics, runtime: &Runtime) {
    for m in &runtime.config.models {
        if let Some(s) = &m.shadow {
            let upstream = &*runtime.upstreams[s.upstream].name;
            metrics.shadow_dropped.with_label_values(&[&m.name]);
            metrics.shadow_cost.with_label_values(&[&m.name, upstream]);
            metrics.shadow_duration.with_label_values(&[&m.name, upstream]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(id: &str, shadow: bool, ms: f64, cost: f64, hash: Option<&str>) -> LedgerLine {
        LedgerLine {
            time: "2026-11-28T10:00:00.000Z".into(),
            request_id: id.into(),
            key: "k".into(),
            model: "m".into(),
            upstream: Some(if shadow { "s" } else { "p" }.into()),
            upstream_model: None,
            status: 200,
            outcome: "success".into(),
            stream: false,
            prompt_tokens: 10,
            completion_tokens: 5,
            cached_tokens: 0,
            reasoning_tokens: 0,
            billable_input_tokens: 10,
            billable_output_tokens: 5,
            cost_usd: cost,
            latency_ms: ms,
            ttft_ms: None,
            attempts: 1,
            usage_estimated: false,
            shadow,
            content_hash: hash.map(str::to_owned),
        }
    }

    #[test]
    fn pairs_and_matches() {
        let c = Comparison::default();
        c.add(&line("1", false, 100.0, 0.001, Some("aa")));
        c.add(&line("1", true, 200.0, 0.0005, Some("aa")));
        c.add(&line("2", true, 300.0, 0.0005, Some("bb")));
        c.add(&line("2", false, 100.0, 0.001, Some("cc")));
        c.add(&line("3", false, 100.0, 0.001, None));
        let r = c.report();
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].deterministic_pairs, 2);
        assert_eq!(r[0].exact_match_rate, Some(0.5));
        assert_eq!(r[0].primary.requests, 3);
        assert_eq!(r[0].shadow.requests, 2);
        assert!((r[0].shadow.usd_per_1k_requests.unwrap() - 0.5).abs() < 1e-9);
        let table = render(&r);
        assert!(
            table.contains("exact match (temp 0)") && table.contains("50.00%"),
            "{table}"
        );
    }

    #[test]
    fn text_extraction() {
        assert_eq!(
            message_text(br#"{"choices":[{"message":{"content":"hi"}}]}"#),
            Some("hi".to_owned())
        );
        let mut s = String::new();
        stream_text(
            b"data: {\"choices\":[{\"delta\":{\"content\":\"a\\u00e9\"}}]}\n\ndata: [DONE]\n\n",
            &mut s,
        );
        assert_eq!(s, "a\u{e9}");
        assert_eq!(content_hash("abc"), content_hash("abc"));
        assert_ne!(content_hash("abc"), content_hash("abd"));
    }
}
