//! The usage ledger: the bounded writer (`relaygate::telemetry::ledger`) and the
//! `relaygate usage` report (`relaygate::cmd::usage`).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use clap::Parser;
use prometheus::IntCounter;
use relaygate::cmd::usage::{report, GroupBy, UsageArgs};
use relaygate::telemetry::ledger::{format_time, Ledger, LedgerLine};
use serde_json::Value;

fn temp_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("relaygate-ledger-{}-{}", std::process::id(), fastrand::u64(..)));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn dropped_counter() -> IntCounter {
    IntCounter::new("relaygate_ledger_dropped_total", "Ledger lines dropped").unwrap()
}

fn line(request_id: &str) -> LedgerLine {
    LedgerLine {
        time: format_time(SystemTime::now()),
        request_id: request_id.to_owned(),
        key: "team-a".into(),
        model: "deepseek-chat".into(),
        upstream: Some("holysheep".into()),
        upstream_model: Some("deepseek-v3.2".into()),
        status: 200,
        outcome: "success".into(),
        stream: true,
        prompt_tokens: 1000,
        completion_tokens: 200,
        cached_tokens: 400,
        reasoning_tokens: 50,
        billable_input_tokens: 600,
        billable_output_tokens: 200,
        cost_usd: 0.000_263_2,
        latency_ms: 812.25,
        ttft_ms: Some(120.5),
        attempts: 2,
        usage_estimated: false,
        shadow: false,
        content_hash: None,
        cache: None,
        saved_usd: None,
    }
}

fn read_lines(path: &Path) -> Vec<LedgerLine> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("unparsable ledger line {l:?}: {e}")))
        .collect()
}

// ---------------------------------------------------------------- writer

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_burst_is_written_one_to_one_after_close() {
    const TASKS: usize = 50;
    const PER_TASK: usize = 100;
    let path = temp_dir().join("usage.jsonl");
    let dropped = dropped_counter();
    // Room for every line: nothing may be dropped, so the file must hold all of them.
    let ledger = Ledger::open(&path, TASKS * PER_TASK, dropped.clone()).unwrap();

    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let ledger = ledger.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..PER_TASK {
                let mut l = line(&format!("req-{t}-{i}"));
                l.prompt_tokens = (t * PER_TASK + i) as u64;
                ledger.record(l);
                if i % 10 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    ledger.close().await;

    let lines = read_lines(&path);
    assert_eq!(dropped.get(), 0);
    assert_eq!(lines.len(), TASKS * PER_TASK);
    let ids: HashSet<&str> = lines.iter().map(|l| l.request_id.as_str()).collect();
    assert_eq!(ids.len(), TASKS * PER_TASK, "duplicate request ids in the ledger");
    for t in 0..TASKS {
        for i in 0..PER_TASK {
            assert!(ids.contains(format!("req-{t}-{i}").as_str()), "req-{t}-{i} missing");
        }
    }
    // Each line is the one recorded, not just one with the same id.
    for l in &lines {
        let (t, i) = l.request_id["req-".len()..].split_once('-').unwrap();
        let n = t.parse::<usize>().unwrap() * PER_TASK + i.parse::<usize>().unwrap();
        let mut expected = line(&l.request_id);
        expected.prompt_tokens = n as u64;
        expected.time = l.time.clone();
        assert_eq!(*l, expected);
    }
}

/// On a current-thread runtime the writer cannot run while the loop below
/// runs (it never yields), so exactly `capacity` lines are queued and every
/// other one is dropped: the count is exact, not "some".
#[tokio::test]
async fn a_full_queue_drops_and_counts_without_blocking() {
    const N: u64 = 10_000;
    const CAPACITY: usize = 4;
    let path = temp_dir().join("tiny.jsonl");
    let dropped = dropped_counter();
    let ledger = Ledger::open(&path, CAPACITY, dropped.clone()).unwrap();

    let started = Instant::now();
    for i in 0..N {
        ledger.record(line(&format!("req-{i}")));
    }
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_secs(1), "10,000 records took {elapsed:?}");
    assert_eq!(dropped.get(), N - CAPACITY as u64);

    ledger.close().await;
    let lines = read_lines(&path);
    let ids: Vec<&str> = lines.iter().map(|l| l.request_id.as_str()).collect();
    assert_eq!(ids, ["req-0", "req-1", "req-2", "req-3"]);
}

/// With the writer draining concurrently, how many are dropped varies, but
/// every record is either in the file or counted, never both or neither.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn under_concurrent_draining_written_plus_dropped_is_everything() {
    const TASKS: u64 = 8;
    const PER_TASK: u64 = 2_500;
    let path = temp_dir().join("tiny-mt.jsonl");
    let dropped = dropped_counter();
    let ledger = Ledger::open(&path, 4, dropped.clone()).unwrap();
    let started = Instant::now();
    let tasks: Vec<_> = (0..TASKS)
        .map(|t| {
            let ledger = ledger.clone();
            tokio::spawn(async move {
                for i in 0..PER_TASK {
                    ledger.record(line(&format!("req-{t}-{i}")));
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_secs(1), "20,000 records took {elapsed:?}");
    ledger.close().await;
    let written = read_lines(&path).len() as u64;
    assert_eq!(written + dropped.get(), TASKS * PER_TASK);
}

#[tokio::test]
async fn appends_to_an_existing_file() {
    let path = temp_dir().join("existing.jsonl");
    let old = serde_json::to_string(&line("old")).unwrap();
    std::fs::write(&path, format!("{old}\n")).unwrap();

    let ledger = Ledger::open(&path, 16, dropped_counter()).unwrap();
    ledger.record(line("new-1"));
    ledger.close().await;
    // A second run (a restart) appends too.
    let ledger = Ledger::open(&path, 16, dropped_counter()).unwrap();
    ledger.record(line("new-2"));
    ledger.close().await;

    let ids: Vec<String> = read_lines(&path).into_iter().map(|l| l.request_id).collect();
    assert_eq!(ids, ["old", "new-1", "new-2"]);
}

#[tokio::test]
async fn close_is_idempotent_and_concurrent_closers_all_wait() {
    let path = temp_dir().join("close.jsonl");
    let ledger = Ledger::open(&path, 64, dropped_counter()).unwrap();
    for i in 0..50 {
        ledger.record(line(&format!("req-{i}")));
    }
    let (a, b) = (ledger.clone(), ledger.clone());
    tokio::join!(a.close(), b.close());
    // Both returned only after the flush: the file is complete now.
    assert_eq!(read_lines(&path).len(), 50);
    ledger.close().await;
}

#[test]
fn ledger_line_round_trips_through_json_with_the_documented_field_names() {
    let full = line("req-1");
    let json = serde_json::to_string(&full).unwrap();
    assert!(!json.contains('\n'), "a ledger line must be one line");
    assert_eq!(serde_json::from_str::<LedgerLine>(&json).unwrap(), full);

    let value: Value = serde_json::from_str(&json).unwrap();
    let mut keys: Vec<&str> = value.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort_unstable();
    let mut expected = vec![
        "time",
        "request_id",
        "key",
        "model",
        "upstream",
        "upstream_model",
        "status",
        "outcome",
        "stream",
        "prompt_tokens",
        "completion_tokens",
        "cached_tokens",
        "reasoning_tokens",
        "billable_input_tokens",
        "billable_output_tokens",
        "cost_usd",
        "latency_ms",
        "ttft_ms",
        "attempts",
        "usage_estimated",
        "shadow",
    ];
    expected.sort_unstable();
    assert_eq!(keys, expected);

    let empty = LedgerLine {
        upstream: None,
        upstream_model: None,
        ttft_ms: None,
        shadow: true,
        content_hash: None,
        ..line("req-2")
    };
    let json = serde_json::to_string(&empty).unwrap();
    assert!(
        json.contains("\"upstream\":null") && json.contains("\"ttft_ms\":null"),
        "{json}"
    );
    assert_eq!(serde_json::from_str::<LedgerLine>(&json).unwrap(), empty);
}

// ---------------------------------------------------------------- report

/// "now" for the report tests: 2025-06-02T12:00:00Z.
fn now() -> SystemTime {
    humantime::parse_rfc3339("2025-06-02T12:00:00Z").unwrap()
}

/// A hand-written ledger. Prices are DeepSeek V3.2's: $0.28/M input (cache
/// miss), $0.028/M cached, $0.42/M output.
/// - a: 06-01 10:00, team-a, deepseek-chat, holysheep, success: 1000 prompt (400 cached), 200 out
///   = (600*0.28 + 400*0.028 + 200*0.42)/1e6 = 0.0002632. No `shadow` field.
/// - b: 06-02 09:30, team-b, deepseek-chat, deepseek-direct, success, streamed, usage estimated:
///   2000 prompt, 1000 out (300 reasoning) = 0.00098
/// - c: 06-02 11:59, team-a, gpt-4o-mini, holysheep, upstream_error 502, no tokens
/// - d: 06-02 11:00 exactly an hour before now, team-a, deepseek-chat, no upstream, rate_limited 429
/// - e: 06-02 11:30, team-a, deepseek-chat, holysheep, shadow: 500 prompt, 100 out = 0.000182
/// - three malformed lines (not JSON, cut JSON, a `time` that is not a time) and a blank line.
const LEDGER: &str = r#"{"time":"2025-06-01T10:00:00.000Z","request_id":"a","key":"team-a","model":"deepseek-chat","upstream":"holysheep","upstream_model":"deepseek-v3.2","status":200,"outcome":"success","stream":false,"prompt_tokens":1000,"completion_tokens":200,"cached_tokens":400,"reasoning_tokens":0,"billable_input_tokens":600,"billable_output_tokens":200,"cost_usd":0.0002632,"latency_ms":900.0,"ttft_ms":null,"attempts":1,"usage_estimated":false}
{"time":"2025-06-02T09:30:00.500Z","request_id":"b","key":"team-b","model":"deepseek-chat","upstream":"deepseek-direct","upstream_model":"deepseek-chat","status":200,"outcome":"success","stream":true,"prompt_tokens":2000,"completion_tokens":1000,"cached_tokens":0,"reasoning_tokens":300,"billable_input_tokens":2000,"billable_output_tokens":1000,"cost_usd":0.00098,"latency_ms":5000.0,"ttft_ms":300.0,"attempts":1,"usage_estimated":true,"shadow":false}
not json at all
{"time":"2025-06-02T11:59:00.000Z","request_id":"c","key":"team-a","model":"gpt-4o-mini","upstream":"holysheep","upstream_model":"gpt-4o-mini","status":502,"outcome":"upstream_error","stream":false,"prompt_tokens":0,"completion_tokens":0,"cached_tokens":0,"reasoning_tokens":0,"billable_input_tokens":0,"billable_output_tokens":0,"cost_usd":0.0,"latency_ms":30000.0,"ttft_ms":null,"attempts":3,"usage_estimated":false,"shadow":false}
{"time":"2025-06-02T11:00:00.000Z","request_id":"d","key":"team-a","model":"deepseek-chat","upstream":null,"upstream_model":null,"status":429,"outcome":"rate_limited","stream":false,"prompt_tokens":0,"completion_tokens":0,"cached_tokens":0,"reasoning_tokens":0,"billable_input_tokens":0,"billable_output_tokens":0,"cost_usd":0.0,"latency_ms":0.2,"ttft_ms":null,"attempts":0,"usage_estimated":false,"shadow":false}
{"time":"2025-06-02T11:1

{"time":"2025-06-02T11:30:00.000Z","request_id":"e","key":"team-a","model":"deepseek-chat","upstream":"holysheep","upstream_model":"deepseek-v3.2","status":200,"outcome":"success","stream":false,"prompt_tokens":500,"completion_tokens":100,"cached_tokens":0,"reasoning_tokens":0,"billable_input_tokens":500,"billable_output_tokens":100,"cost_usd":0.000182,"latency_ms":700.0,"ttft_ms":null,"attempts":1,"usage_estimated":false,"shadow":true}
{"time":"yesterday","request_id":"f","key":"team-a","model":"deepseek-chat","upstream":null,"upstream_model":null,"status":200,"outcome":"success","stream":false,"prompt_tokens":1,"completion_tokens":1,"cached_tokens":0,"reasoning_tokens":0,"billable_input_tokens":1,"billable_output_tokens":1,"cost_usd":1.0,"latency_ms":1.0,"ttft_ms":null,"attempts":1,"usage_estimated":false}
"#;

fn ledger_file(contents: &str) -> PathBuf {
    let path = temp_dir().join("usage.jsonl");
    std::fs::write(&path, contents).unwrap();
    path
}

fn args(path: &Path, by: GroupBy, since: Option<&str>, include_shadow: bool) -> UsageArgs {
    UsageArgs {
        ledger: path.to_path_buf(),
        since: since.map(|s| humantime::parse_duration(s).unwrap()),
        by,
        include_shadow,
        config: None,
        gateway: None,
    }
}

/// The table's rows (header first, TOTAL last), each split into cells.
fn table(out: &str) -> Vec<Vec<String>> {
    out.lines()
        .skip(1) // the scope line
        .take_while(|l| !l.starts_with("note:"))
        .map(|l| l.split_whitespace().map(str::to_owned).collect())
        .collect()
}

/// Cells after the group name: requests, errors, prompt, cached, completion, reasoning, cost, estimated,
/// estimated share.
fn row<'a>(rows: &'a [Vec<String>], name: &str) -> Vec<&'a str> {
    let r = rows
        .iter()
        .find(|r| r[0] == name)
        .unwrap_or_else(|| panic!("no row {name} in {rows:?}"));
    r[1..].iter().map(String::as_str).collect()
}

fn names(rows: &[Vec<String>]) -> Vec<&str> {
    rows.iter().map(|r| r[0].as_str()).collect()
}

#[test]
fn report_by_model_sums_rows_and_total_with_cost_to_six_decimals() {
    let path = ledger_file(LEDGER);
    let out = report(&args(&path, GroupBy::Model, None, false), now()).unwrap();
    let rows = table(&out);
    assert_eq!(
        names(&rows),
        ["MODEL", "deepseek-chat", "gpt-4o-mini", "TOTAL"],
        "{out}"
    );
    assert_eq!(
        rows[0][1..],
        [
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
            "SAVED_USD"
        ]
    );
    // a + b + d; e is shadow, f is malformed.
    assert_eq!(
        row(&rows, "deepseek-chat"),
        ["3", "1", "3000", "400", "1200", "300", "0.001243", "1", "33.3", "0", "0.000000"],
        "{out}"
    );
    assert_eq!(
        row(&rows, "gpt-4o-mini"),
        ["1", "1", "0", "0", "0", "0", "0.000000", "0", "0.0", "0", "0.000000"]
    );
    // 0.0002632 + 0.00098 = 0.0012432
    assert_eq!(
        row(&rows, "TOTAL"),
        ["4", "2", "3000", "400", "1200", "300", "0.001243", "1", "25.0", "0", "0.000000"]
    );
    assert!(out.contains("note: skipped 3 malformed lines"), "{out}");
    assert!(out.contains("note: excluded 1 shadow requests"), "{out}");
}

#[test]
fn report_columns_are_aligned() {
    let path = ledger_file(LEDGER);
    let out = report(&args(&path, GroupBy::Upstream, None, false), now()).unwrap();
    let lines: Vec<&str> = out.lines().skip(1).take_while(|l| !l.starts_with("note:")).collect();
    assert_eq!(lines.len(), 5, "{out}");
    // Numbers are right-aligned: every row ends at the same column, and each
    // cell of the header ends where the cells below it end.
    let width = lines[0].len();
    assert!(lines.iter().all(|l| l.len() == width), "{out}");
    let cell_ends = |l: &str| -> Vec<usize> {
        let b = l.as_bytes();
        (0..b.len())
            .filter(|&i| b[i] != b' ' && (i + 1 == b.len() || b[i + 1] == b' '))
            .collect()
    };
    let header_ends = cell_ends(lines[0]);
    for l in &lines[1..] {
        assert_eq!(cell_ends(l)[1..], header_ends[1..], "{out}");
    }
}

#[test]
fn report_by_key() {
    let path = ledger_file(LEDGER);
    let rows = table(&report(&args(&path, GroupBy::Key, None, false), now()).unwrap());
    assert_eq!(names(&rows), ["KEY", "team-a", "team-b", "TOTAL"]);
    // a, c, d
    assert_eq!(
        row(&rows, "team-a"),
        ["3", "2", "1000", "400", "200", "0", "0.000263", "0", "0.0", "0", "0.000000"]
    );
    assert_eq!(
        row(&rows, "team-b"),
        ["1", "0", "2000", "0", "1000", "300", "0.000980", "1", "100.0", "0", "0.000000"]
    );
    assert_eq!(row(&rows, "TOTAL")[..2], ["4", "2"]);
}

#[test]
fn report_by_upstream_puts_requests_without_an_upstream_under_a_dash() {
    let path = ledger_file(LEDGER);
    let rows = table(&report(&args(&path, GroupBy::Upstream, None, false), now()).unwrap());
    assert_eq!(names(&rows), ["UPSTREAM", "-", "deepseek-direct", "holysheep", "TOTAL"]);
    assert_eq!(
        row(&rows, "-"),
        ["1", "1", "0", "0", "0", "0", "0.000000", "0", "0.0", "0", "0.000000"]
    );
    assert_eq!(row(&rows, "deepseek-direct")[..3], ["1", "0", "2000"]);
    assert_eq!(
        row(&rows, "holysheep"),
        ["2", "1", "1000", "400", "200", "0", "0.000263", "0", "0.0", "0", "0.000000"]
    );
}

/// Cache hits: counted as requests with what they saved, under `cache` by
/// upstream; their tokens are not spend.
#[test]
fn report_shows_cache_hits_and_savings() {
    let mut text = String::new();
    for (i, hit) in [true, true, false].into_iter().enumerate() {
        let mut l = line(&format!("req-{i}"));
        if hit {
            (l.upstream, l.cost_usd, l.prompt_tokens, l.completion_tokens) = (None, 0.0, 0, 0);
            (l.cache, l.saved_usd) = (Some("hit".into()), Some(0.25));
        } else {
            l.cache = Some("miss".into());
        }
        text.push_str(&serde_json::to_string(&l).unwrap());
        text.push('\n');
    }
    let path = ledger_file(&text);
    let out = report(&args(&path, GroupBy::Upstream, None, false), now()).unwrap();
    let rows = table(&out);
    assert_eq!(rows[0][10..], ["CACHE_HITS", "SAVED_USD"], "{out}");
    assert_eq!(row(&rows, "cache")[9..], ["2", "0.500000"], "{out}");
    assert_eq!(row(&rows, "cache")[6], "0.000000", "hits cost nothing");
    assert_eq!(row(&rows, "TOTAL")[9..], ["2", "0.500000"], "{out}");
}

/// An upstream that ignores `stream_options.include_usage` shows at 100%
/// estimated, beside one whose only estimate is a cut stream.
#[test]
fn report_by_upstream_shows_the_share_of_estimated_requests() {
    let mut text = String::new();
    for (i, (upstream, estimated)) in [
        ("relay", true),
        ("relay", true),
        ("relay", true),
        ("direct", false),
        ("direct", true),
        ("direct", false),
        ("direct", false),
    ]
    .into_iter()
    .enumerate()
    {
        let mut l = line(&format!("req-{i}"));
        l.time = "2025-06-02T10:00:00.000Z".into();
        l.upstream = Some(upstream.into());
        l.usage_estimated = estimated;
        text.push_str(&serde_json::to_string(&l).unwrap());
        text.push('\n');
    }
    let path = ledger_file(&text);
    let out = report(&args(&path, GroupBy::Upstream, None, false), now()).unwrap();
    let rows = table(&out);
    assert_eq!(rows[0][8..10], ["ESTIMATED", "EST_%"], "{out}");
    assert_eq!(row(&rows, "relay")[7..9], ["3", "100.0"], "{out}");
    assert_eq!(row(&rows, "direct")[7..9], ["1", "25.0"], "{out}");
    // 4 of 7: 57.142...
    assert_eq!(row(&rows, "TOTAL")[7..9], ["4", "57.1"], "{out}");
}

#[test]
fn report_by_day_uses_the_utc_date() {
    let path = ledger_file(LEDGER);
    let rows = table(&report(&args(&path, GroupBy::Day, None, false), now()).unwrap());
    assert_eq!(names(&rows), ["DAY", "2025-06-01", "2025-06-02", "TOTAL"]);
    assert_eq!(
        row(&rows, "2025-06-01"),
        ["1", "0", "1000", "400", "200", "0", "0.000263", "0", "0.0", "0", "0.000000"]
    );
    assert_eq!(
        row(&rows, "2025-06-02"),
        ["3", "2", "2000", "0", "1000", "300", "0.000980", "1", "33.3", "0", "0.000000"]
    );
}

#[test]
fn report_since_keeps_only_recent_lines_inclusive_of_the_cutoff() {
    let path = ledger_file(LEDGER);
    // Cutoff 2025-06-01T12:00:00Z drops a.
    let out = report(&args(&path, GroupBy::Model, Some("24h"), false), now()).unwrap();
    assert!(
        out.lines().next().unwrap().contains("since 2025-06-01T12:00:00Z"),
        "{out}"
    );
    let rows = table(&out);
    assert_eq!(
        row(&rows, "deepseek-chat"),
        ["2", "1", "2000", "0", "1000", "300", "0.000980", "1", "50.0", "0", "0.000000"]
    );
    assert_eq!(row(&rows, "TOTAL")[..2], ["3", "2"]);
    // Cutoff 11:00:00 exactly: d (at 11:00:00) and c stay, b goes.
    let rows = table(&report(&args(&path, GroupBy::Key, Some("1h"), false), now()).unwrap());
    assert_eq!(names(&rows), ["KEY", "team-a", "TOTAL"]);
    assert_eq!(row(&rows, "TOTAL")[..2], ["2", "2"]);
    // Filtered-out lines are not malformed: the count stays 3.
    let out = report(&args(&path, GroupBy::Key, Some("1m"), false), now()).unwrap();
    assert_eq!(row(&table(&out), "TOTAL")[..2], ["1", "1"]);
    assert!(out.contains("note: skipped 3 malformed lines"), "{out}");
}

#[test]
fn report_includes_shadow_requests_only_when_asked() {
    let path = ledger_file(LEDGER);
    let out = report(&args(&path, GroupBy::Model, None, true), now()).unwrap();
    let rows = table(&out);
    // + e: 500 prompt, 100 out, 0.000182 → 0.0014252
    assert_eq!(
        row(&rows, "deepseek-chat"),
        ["4", "1", "3500", "400", "1300", "300", "0.001425", "1", "25.0", "0", "0.000000"]
    );
    assert_eq!(row(&rows, "TOTAL")[..3], ["5", "2", "3500"]);
    assert!(!out.contains("shadow"), "{out}");
}

#[test]
fn report_of_an_empty_ledger_is_a_zero_total() {
    let path = ledger_file("");
    let out = report(&args(&path, GroupBy::Day, None, false), now()).unwrap();
    let rows = table(&out);
    assert_eq!(names(&rows), ["DAY", "TOTAL"]);
    assert_eq!(
        row(&rows, "TOTAL"),
        ["0", "0", "0", "0", "0", "0", "0.000000", "0", "-", "0", "0.000000"]
    );
    assert!(!out.contains("note:"), "{out}");
}

#[test]
fn report_on_a_missing_file_names_the_path() {
    let path = temp_dir().join("no-such-ledger.jsonl");
    let err = report(&args(&path, GroupBy::Model, None, false), now()).unwrap_err();
    assert!(err.contains(&path.display().to_string()), "{err}");
}

#[tokio::test]
async fn report_reads_what_the_writer_wrote() {
    let path = temp_dir().join("roundtrip.jsonl");
    let ledger = Ledger::open(&path, 64, dropped_counter()).unwrap();
    for i in 0..10 {
        let mut l = line(&format!("req-{i}"));
        l.time = "2025-06-02T10:00:00.000Z".into();
        l.key = if i % 2 == 0 { "even" } else { "odd" }.into();
        ledger.record(l);
    }
    ledger.close().await;
    let rows = table(&report(&args(&path, GroupBy::Key, Some("24h"), false), now()).unwrap());
    assert_eq!(
        row(&rows, "even"),
        ["5", "0", "5000", "2000", "1000", "250", "0.001316", "0", "0.0", "0", "0.000000"]
    );
    assert_eq!(
        row(&rows, "TOTAL"),
        ["10", "0", "10000", "4000", "2000", "500", "0.002632", "0", "0.0", "0", "0.000000"]
    );
}

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    usage: UsageArgs,
}

#[test]
fn usage_args_parse_from_the_command_line() {
    let cli = Cli::try_parse_from(["usage", "--ledger", "u.jsonl"]).unwrap();
    assert_eq!(cli.usage.by, GroupBy::Model);
    assert_eq!(cli.usage.since, None);
    assert!(!cli.usage.include_shadow);

    let cli = Cli::try_parse_from([
        "usage",
        "--ledger",
        "u.jsonl",
        "--since",
        "24h",
        "--by",
        "day",
        "--include-shadow",
    ])
    .unwrap();
    assert_eq!(cli.usage.ledger, PathBuf::from("u.jsonl"));
    assert_eq!(cli.usage.since, Some(Duration::from_secs(24 * 3600)));
    assert_eq!(cli.usage.by, GroupBy::Day);
    assert!(cli.usage.include_shadow);

    assert!(Cli::try_parse_from(["usage", "--ledger", "u.jsonl", "--by", "colour"]).is_err());
    assert!(Cli::try_parse_from(["usage", "--ledger", "u.jsonl", "--since", "soon"]).is_err());
}
