//! `relaygate usage`: totals from the usage ledger (`ledger`), as a table to
//! hold against a provider's bill.
//!
//! ```text
//! relaygate usage --ledger FILE [--since 24h] [--by key|model|upstream|day] [--include-shadow]
//! ```
//!
//! One row per group, sorted by name, then a TOTAL row. `EST_%` is the
//! share of a row's requests whose usage relaygate estimated because the
//! upstream sent none: `--by upstream`, it shows whose bill lines relaygate
//! can only approximate. Lines that do not
//! parse are skipped and counted in a note under the table; blank lines are
//! ignored. Shadow (mirrored) requests are left out unless asked for: the
//! provider bills them, but they are not client traffic, so the note says how
//! many were left out.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use crate::telemetry::ledger::LedgerLine;

/// What the rows of the table are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum GroupBy {
    /// Client key name.
    Key,
    /// Configured model name.
    Model,
    /// Upstream that answered (`-` when no upstream was tried).
    Upstream,
    /// UTC date of the request's end, YYYY-MM-DD (providers bill by UTC day).
    Day,
}

impl GroupBy {
    fn header(self) -> &'static str {
        match self {
            GroupBy::Key => "KEY",
            GroupBy::Model => "MODEL",
            GroupBy::Upstream => "UPSTREAM",
            GroupBy::Day => "DAY",
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct UsageArgs {
    /// Ledger file (JSON lines, as written by `[ledger] path`).
    #[arg(long)]
    pub ledger: PathBuf,
    /// Only requests that finished within this long before now, e.g. 24h, 7d, 90m.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub since: Option<Duration>,
    /// Group rows by this field.
    #[arg(long, value_enum, default_value = "model")]
    pub by: GroupBy,
    /// Also include shadow requests (default: excluded).
    #[arg(long)]
    pub include_shadow: bool,
}

/// The sums for one row.
#[derive(Debug, Default, Clone, Copy)]
struct Totals {
    requests: u64,
    errors: u64,
    prompt: u64,
    cached: u64,
    completion: u64,
    reasoning: u64,
    cost_usd: f64,
    estimated: u64,
    /// Requests answered from the response cache: no tokens bought.
    hits: u64,
    saved_usd: f64,
}

impl Totals {
    fn add(&mut self, l: &LedgerLine) {
        self.requests += 1;
        self.errors += u64::from(l.outcome != "success");
        self.prompt += l.prompt_tokens;
        self.cached += l.cached_tokens;
        self.completion += l.completion_tokens;
        self.reasoning += l.reasoning_tokens;
        self.cost_usd += l.cost_usd;
        self.estimated += u64::from(l.usage_estimated);
        self.hits += u64::from(l.cache.as_deref() == Some("hit"));
        self.saved_usd += l.saved_usd.unwrap_or(0.0);
    }

    fn merge(&mut self, o: &Totals) {
        self.requests += o.requests;
        self.errors += o.errors;
        self.prompt += o.prompt;
        self.cached += o.cached;
        self.completion += o.completion;
        self.reasoning += o.reasoning;
        self.cost_usd += o.cost_usd;
        self.estimated += o.estimated;
        self.hits += o.hits;
        self.saved_usd += o.saved_usd;
    }

    /// `EST_%`: the share of requests with estimated usage, in percent to
    /// one decimal; `-` for a row without requests.
    fn estimated_share(&self) -> String {
        if self.requests == 0 {
            return "-".to_owned();
        }
        format!("{:.1}", self.estimated as f64 * 100.0 / self.requests as f64)
    }

    fn cells(&self, name: &str) -> [String; 12] {
        [
            name.to_owned(),
            self.requests.to_string(),
            self.errors.to_string(),
            self.prompt.to_string(),
            self.cached.to_string(),
            self.completion.to_string(),
            self.reasoning.to_string(),
            format!("{:.6}", self.cost_usd),
            self.estimated.to_string(),
            self.estimated_share(),
            self.hits.to_string(),
            format!("{:.6}", self.saved_usd),
        ]
    }
}

const COLUMNS: [&str; 11] = [
    "REQUESTS",
    "ERRORS",
    "PROMPT",
    "CACHED",
    "COMPLETION",
    "REASONING",
    "COST_USD",
    "ESTIMATED",
    "EST_%",
    "CACHE_HITS",
    "SAVED_USD",
];

/// Reads the ledger and renders the table. `now` is injected so tests can
/// pin `--since`.
pub fn report(args: &UsageArgs, now: SystemTime) -> Result<String, String> {
    let path = &args.ledger;
    let file = File::open(path).map_err(|e| format!("cannot open ledger {}: {e}", path.display()))?;
    // A `--since` longer than the clock goes back means "everything".
    let cutoff = args.since.and_then(|d| now.checked_sub(d));

    let mut groups: BTreeMap<String, Totals> = BTreeMap::new();
    let mut malformed = 0u64;
    let mut shadow_excluded = 0u64;
    let mut reader = BufReader::new(file);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let n = reader
            .read_until(b'\n', &mut buf)
            .map_err(|e| format!("cannot read ledger {}: {e}", path.display()))?;
        if n == 0 {
            break;
        }
        if buf.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        // A line whose `time` does not parse is as unusable as one that is not JSON.
        let Some((line, time)) = serde_json::from_slice::<LedgerLine>(&buf)
            .ok()
            .and_then(|l| humantime::parse_rfc3339_weak(&l.time).ok().map(|t| (l, t)))
        else {
            malformed += 1;
            continue;
        };
        if cutoff.is_some_and(|c| time < c) {
            continue;
        }
        if line.shadow && !args.include_shadow {
            shadow_excluded += 1;
            continue;
        }
        let name = match args.by {
            GroupBy::Key => line.key.clone(),
            GroupBy::Model => line.model.clone(),
            GroupBy::Upstream => match &line.upstream {
                Some(upstream) => upstream.clone(),
                None if line.cache.as_deref() == Some("hit") => "cache".to_owned(),
                None => "-".to_owned(),
            },
            // format_rfc3339 is always UTC: its first 10 characters are the date.
            GroupBy::Day => humantime::format_rfc3339_seconds(time).to_string()[..10].to_owned(),
        };
        groups.entry(name).or_default().add(&line);
    }

    let mut total = Totals::default();
    for t in groups.values() {
        total.merge(t);
    }
    let mut rows: Vec<[String; 12]> = Vec::with_capacity(groups.len() + 2);
    rows.push(std::array::from_fn(|i| match i {
        0 => args.by.header().to_owned(),
        _ => COLUMNS[i - 1].to_owned(),
    }));
    rows.extend(groups.iter().map(|(name, t)| t.cells(name)));
    rows.push(total.cells("TOTAL"));

    let mut widths = [0usize; 12];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    match (args.since, cutoff) {
        (Some(d), Some(c)) => {
            let _ = writeln!(
                out,
                "ledger {}: requests that finished since {} (last {})",
                path.display(),
                humantime::format_rfc3339_seconds(c),
                humantime::format_duration(d)
            );
        }
        _ => {
            let _ = writeln!(out, "ledger {}: all requests", path.display());
        }
    }
    for row in &rows {
        let mut text = format!("{:<w$}", row[0], w = widths[0]);
        for (cell, w) in row.iter().zip(widths).skip(1) {
            let _ = write!(text, "  {cell:>w$}");
        }
        out.push_str(text.trim_end());
        out.push('\n');
    }
    if shadow_excluded > 0 {
        let _ = writeln!(
            out,
            "note: excluded {shadow_excluded} shadow requests (--include-shadow counts them)"
        );
    }
    if malformed > 0 {
        let _ = writeln!(out, "note: skipped {malformed} malformed lines");
    }
    Ok(out)
}

/// `relaygate usage`: prints `report(args, now)` to stdout.
pub fn run(args: UsageArgs) -> Result<ExitCode, String> {
    let table = report(&args, SystemTime::now())?;
    print!("{table}");
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_count_errors_and_estimates() {
        let mut t = Totals::default();
        let mut l: LedgerLine = serde_json::from_str(
            r#"{"time":"2025-06-01T00:00:00.000Z","request_id":"a","key":"k","model":"m","upstream":null,
            "upstream_model":null,"status":502,"outcome":"upstream_error","stream":true,"prompt_tokens":3,
            "completion_tokens":4,"cached_tokens":1,"reasoning_tokens":2,"billable_input_tokens":2,
            "billable_output_tokens":4,"cost_usd":0.5,"latency_ms":1.0,"ttft_ms":null,"attempts":2,
            "usage_estimated":true}"#,
        )
        .unwrap();
        t.add(&l);
        l.outcome = "success".into();
        l.usage_estimated = false;
        t.add(&l);
        assert_eq!((t.requests, t.errors, t.estimated), (2, 1, 1));
        assert_eq!((t.prompt, t.cached, t.completion, t.reasoning), (6, 2, 8, 4));
        assert_eq!(t.cells("x")[7], "1.000000");
        assert_eq!(t.cells("x")[9], "50.0");
    }

    #[test]
    fn the_estimated_share_is_of_requests_to_one_decimal() {
        let share = |requests, estimated| {
            Totals {
                requests,
                estimated,
                ..Totals::default()
            }
            .estimated_share()
        };
        assert_eq!(share(0, 0), "-", "no requests, no share");
        assert_eq!(share(7, 0), "0.0");
        assert_eq!(share(3, 1), "33.3");
        assert_eq!(share(3, 2), "66.7");
        assert_eq!(share(8, 1), "12.5");
        assert_eq!(share(1000, 1), "0.1");
        assert_eq!(share(4, 4), "100.0");
    }
}
