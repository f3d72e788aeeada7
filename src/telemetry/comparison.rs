//! Primary vs shadow, per shadowed model: success, latency, TTFT, tokens and
//! cost side by side, and how often `temperature: 0` answers match exactly.
//! Fed with ledger lines, by the gateway as requests finish (`GET
//! /admin/shadow`) or from a ledger file (`relaygate compare`).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::SystemTime;

use hdrhistogram::Histogram;
use serde::Serialize;

use super::ledger::LedgerLine;

/// `choices[0].message.content` (chat) or `choices[0].text` (completions).
pub fn message_text(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let choice = &v["choices"][0];
    choice["message"]["content"]
        .as_str()
        .or_else(|| choice["text"].as_str())
        .map(str::to_owned)
}

/// Appends the text delta of one SSE event's data (read by `sse::events`,
/// so any legal writing of the stream gives the same text).
pub fn delta_text(data: &[u8], out: &mut String) {
    if data.starts_with(b"{") {
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) {
            let choice = &v["choices"][0];
            if let Some(t) = choice["delta"]["content"].as_str().or_else(|| choice["text"].as_str()) {
                out.push_str(t);
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
            cache: None,
            saved_usd: None,
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
        delta_text(br#"{"choices":[{"delta":{"content":"a\u00e9"}}]}"#, &mut s);
        delta_text(b"[DONE]", &mut s);
        assert_eq!(s, "a\u{e9}");
        assert_eq!(content_hash("abc"), content_hash("abc"));
        assert_ne!(content_hash("abc"), content_hash("abd"));
    }
}
