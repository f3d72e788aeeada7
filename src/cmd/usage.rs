//! `relaygate usage`: totals from the usage ledger (`ledger`), as a table to
//! hold against a provider's bill.
//!
//! ```text
//! relaygate usage --ledger FILE [--since 24h] [--by key|model|upstream|day] [--include-shadow]
//! relaygate usage --ledger FILE --by budget --config FILE [--gateway URL]
//! ```
//!
//! `--by budget` is a reconciliation: each `[[budgets]]` entry's spend in
//! its current period, summed from the ledger the way the budgets count it
//! (shadows against upstream and global budgets only), beside the live
//! counters of a running gateway (`GET /admin/budgets` with the config's
//! admin key), with the difference. It exits 1 when they differ.
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
    /// Each spend budget's current period, ledger against live counters
    /// (needs --config; --gateway for the counters).
    Budget,
}

impl GroupBy {
    fn header(self) -> &'static str {
        match self {
            GroupBy::Key => "KEY",
            GroupBy::Model => "MODEL",
            GroupBy::Upstream => "UPSTREAM",
            GroupBy::Day => "DAY",
            GroupBy::Budget => "BUDGET",
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
    /// The config whose `[[budgets]]` `--by budget` reconciles.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// A running gateway (`http://host:port`) whose budget counters
    /// `--by budget` compares with the ledger, with the config's admin key.
    #[arg(long)]
    pub gateway: Option<String>,
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
            GroupBy::Budget => unreachable!("--by budget is reported by `budgets`"),
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
pub async fn run(args: UsageArgs) -> Result<ExitCode, String> {
    if args.by == GroupBy::Budget {
        let (table, differs) = budgets(&args).await?;
        print!("{table}");
        return Ok(if differs { ExitCode::FAILURE } else { ExitCode::SUCCESS });
    }
    let table = report(&args, SystemTime::now())?;
    print!("{table}");
    Ok(ExitCode::SUCCESS)
}

/// `--by budget`: the table, and whether ledger and counters differ.
pub async fn budgets(args: &UsageArgs) -> Result<(String, bool), String> {
    use crate::budget::{BudgetSettings, Budgets, Spend, SystemClock};
    let path = args
        .config
        .as_ref()
        .ok_or("--by budget needs --config (the [[budgets]] to reconcile)")?;
    let config = crate::config::Config::load(path).map_err(|e| e.to_string())?;
    if config.budgets.is_empty() {
        return Err(format!("{}: no [[budgets]]", path.display()));
    }
    // The ledger replayed into a local engine of the same budgets: the
    // same matching and periods as the gateway's own rebuild.
    let engine = Budgets::new(
        BudgetSettings::default(),
        config.budgets.clone(),
        &prometheus::Registry::new(),
        Box::new(SystemClock),
    )
    .await?;
    let mut lines = 0u64;
    crate::telemetry::ledger::read(&args.ledger, |l| {
        let Ok(t) = humantime::parse_rfc3339_weak(&l.time) else {
            return;
        };
        let unix = t
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        lines += 1;
        engine.restore(Spend {
            unix,
            key: &l.key,
            model: &l.model,
            upstream: l.upstream.as_deref(),
            shadow: l.shadow,
            micros: crate::budget::usd_to_micros(l.cost_usd),
        });
    })
    .map_err(|e| format!("cannot read ledger {}: {e}", args.ledger.display()))?;
    let counters = match &args.gateway {
        None => None,
        Some(url) => Some(fetch_counters(url, config.admin_key.as_ref()).await?),
    };
    let mut rows = vec![[
        "BUDGET",
        "NAME",
        "PERIOD_START",
        "LIMIT_USD",
        "LEDGER_USD",
        "COUNTER_USD",
        "DIFF_USD",
    ]
    .map(str::to_owned)];
    let mut differs = Vec::new();
    for b in engine.report().await {
        let mut names: Vec<String> = b.buckets.iter().map(|n| n.name.clone()).collect();
        if let Some(c) = &counters {
            for (budget, name, _) in c {
                if *budget == b.name && !names.contains(name) {
                    names.push(name.clone());
                }
            }
        }
        for name in names {
            let ledger = b.buckets.iter().find(|n| n.name == name).map_or(0.0, |n| n.spent_usd);
            let counter = counters.as_ref().map(|c| {
                c.iter()
                    .find(|(budget, n, _)| *budget == b.name && *n == name)
                    .map_or(0.0, |(_, _, spent)| *spent)
            });
            let diff = counter.map(|c| c - ledger);
            if diff.is_some_and(|d| d.abs() >= 0.000_001) {
                differs.push(format!("{}/{name}", b.name));
            }
            rows.push([
                b.name.clone(),
                name,
                b.period_start.clone(),
                format!("{:.6}", b.limit_usd),
                format!("{ledger:.6}"),
                counter.map_or("-".into(), |c| format!("{c:.6}")),
                diff.map_or("-".into(), |d| format!("{d:+.6}")),
            ]);
        }
    }
    let mut widths = [0usize; 7];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = format!(
        "ledger {}: {lines} lines, against the current period of each budget in {}\n",
        args.ledger.display(),
        path.display()
    );
    for row in &rows {
        let mut text = format!("{:<w0$}  {:<w1$}", row[0], row[1], w0 = widths[0], w1 = widths[1]);
        for (cell, w) in row.iter().zip(widths).skip(2) {
            let _ = write!(text, "  {cell:>w$}");
        }
        out.push_str(text.trim_end());
        out.push('\n');
    }
    match (&counters, differs.is_empty()) {
        (None, _) => out.push_str("note: pass --gateway URL to compare with a running gateway's counters\n"),
        (Some(_), true) => out.push_str("ledger and counters agree\n"),
        (Some(_), false) => {
            let _ = writeln!(
                out,
                "DIFFERENCE in {}: requests in flight, ledger lines dropped \
                 (relaygate_ledger_dropped_total), or replicas whose ledgers are elsewhere",
                differs.join(", ")
            );
        }
    }
    Ok((out, !differs.is_empty()))
}

/// `(budget, name, spent_usd)` from a gateway's `GET /admin/budgets`.
async fn fetch_counters(
    url: &str,
    admin_key: Option<&crate::config::Secret>,
) -> Result<Vec<(String, String, f64)>, String> {
    let key = admin_key.ok_or("--gateway needs [admin] key in the config")?;
    let url = format!("{}/admin/budgets", url.trim_end_matches('/'));
    let response = reqwest::Client::new()
        .get(&url)
        .bearer_auth(key.expose())
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .map_err(|e| format!("GET {url}: {e}"))?;
    if !response.status().is_success() {
        return Err(format!("GET {url}: HTTP {}", response.status()));
    }
    let bytes = response.bytes().await.map_err(|e| format!("GET {url}: {e}"))?;
    let body: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| format!("GET {url}: {e}"))?;
    let mut out = Vec::new();
    for b in body["budgets"].as_array().into_iter().flatten() {
        for n in b["buckets"].as_array().into_iter().flatten() {
            out.push((
                b["name"].as_str().unwrap_or_default().to_owned(),
                n["name"].as_str().unwrap_or_default().to_owned(),
                n["spent_usd"].as_f64().unwrap_or(0.0),
            ));
        }
    }
    Ok(out)
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
