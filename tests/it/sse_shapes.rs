//! Legal but less common SSE from an upstream (issue 21), through the
//! gateway, with the official `openai` Python SDK as the client: JSON with a
//! space after `:` and `,`, events split over two `data:` lines, an upstream
//! that ignores `stream_options.include_usage`, CR and CRLF line ends, and
//! the shapes together; and a plain answer without `usage`.
//!
//! For each shape, what the SDK assembles is the simulator's text; the
//! tokens are the upstream's where it sent usage, and the estimate (the
//! text's UTF-8 bytes / 4, rounded up) where it did not, flagged as such;
//! the usage-only chunk reaches the client only when the client asked for
//! it; and the metrics, the ledger line and the TPM bucket agree.
//!
//! Needs a Python with `openai`, found as `openai_sdk.rs` finds it
//! (`RELAYGATE_PYTHON`, `.venv/bin/python`, `python3`); set
//! `RELAYGATE_SKIP_SDK=1` to skip the SDK's part on purpose (the check of
//! the raw bytes a client receives still runs).

use std::path::Path;
use std::time::{Duration, Instant};

use relaygate::sim::{self, Faults, LineEnding, Sim};
use serde_json::{json, Value};

use crate::common::*;

/// The models of the test config, one TPM bucket each: a stream whose
/// client does not ask for usage, one whose client does, a plain call.
const STREAMED: &str = "deepseek-chat";
const STREAMED_WITH_USAGE: &str = "with-usage";
const PLAIN: &str = "plain";

/// The price of every model (DeepSeek V3.2's), per million tokens.
const INPUT_PER_MTOK: f64 = 0.28;
const OUTPUT_PER_MTOK: f64 = 0.42;

fn messages() -> Value {
    json!([{ "role": "user", "content": "Say hello" }])
}

/// The harness config plus the two other models, the ledger, and a TPM
/// rule per model of one token a minute. Such a bucket says, to the
/// minute, how many tokens were charged to it: see `tpm_charged`.
fn config(sim: &Sim, ledger: &Path) -> String {
    let mut c = config_for(&[("a", sim)]);
    for model in [STREAMED_WITH_USAGE, PLAIN] {
        c.push_str(&format!(
            "\n[[models]]\nname = \"{model}\"\ntargets = [{{ upstream = \"a\", model = \"deepseek-v3.2\" }}]\n\
             price = {{ input_per_mtok = {INPUT_PER_MTOK}, output_per_mtok = {OUTPUT_PER_MTOK}, cached_input_per_mtok = 0.028 }}\n"
        ));
    }
    c.push_str(&format!(
        "\n[ledger]\npath = \"{}\"\n\n[[rate_limits]]\nscope = \"model\"\ntokens_per_minute = 1\n",
        ledger.display()
    ));
    c
}

struct Call {
    model: &'static str,
    stream: bool,
    include_usage: bool,
}

/// Runs tests/e2e/sse_shapes.py: what the SDK made of each call.
async fn run_sdk(python: &Path, gw: &Gateway, calls: &[Call]) -> Vec<Value> {
    let calls: Vec<Value> = calls
        .iter()
        .map(|c| json!({ "model": c.model, "stream": c.stream, "include_usage": c.include_usage }))
        .collect();
    let env = [
        ("RELAYGATE_MESSAGES", messages().to_string()),
        ("RELAYGATE_CALLS", Value::from(calls).to_string()),
    ];
    let stdout = run_sdk_script(python, "sse_shapes.py", gw, &env).await;
    serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("SDK script output: {e}\n{stdout}"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Tokens {
    prompt: u64,
    completion: u64,
}

impl Tokens {
    /// What the simulator reports in `usage`.
    fn reported(faults: &Faults) -> Tokens {
        Tokens {
            prompt: sim::prompt_tokens(&json!({ "messages": messages() })),
            completion: faults.chunks as u64,
        }
    }

    /// relaygate's estimate when usage never comes: the prompt as the rate
    /// limiter estimates it, the completion from the generated text, its
    /// UTF-8 bytes / 4 rounded up (computed here from the text, not by
    /// relaygate's code).
    fn estimated(faults: &Faults) -> Tokens {
        let body = json!({ "messages": messages() }).to_string();
        let text = sim::answer(faults.chunks);
        Tokens {
            prompt: relaygate::ratelimit::estimate_prompt_tokens(body.as_bytes()),
            completion: (text.len() as u64).div_ceil(4),
        }
    }

    fn cost(self) -> f64 {
        (self.prompt as f64 * INPUT_PER_MTOK + self.completion as f64 * OUTPUT_PER_MTOK) / 1e6
    }
}

/// The tokens charged to `model`'s TPM bucket. The bucket refills one token
/// a minute, so a probe is refused and its `x-ratelimit-reset-tokens` is
/// the bucket's level in time: the tokens charged times a minute, less the
/// time since the first reservation (more than a millisecond, less than a
/// minute), rounded up to the millisecond. Its ceiling in minutes is then
/// exactly the tokens charged.
async fn tpm_charged(gw: &Gateway, model: &str) -> u64 {
    let probe = post_chat(gw, &json!({ "model": model, "messages": [], "max_tokens": 1 })).await;
    assert_eq!(probe.status(), 429, "{model}: the bucket is in debt");
    let reset = probe.headers()["x-ratelimit-reset-tokens"].to_str().unwrap().to_owned();
    go_duration_ms(&reset).div_ceil(60_000)
}

/// Go's `time.Duration` text (`"16m59.5s"`, `"250ms"`, `"1h2m3s"`) in ms.
fn go_duration_ms(text: &str) -> u64 {
    let (mut ms, mut rest) = (0.0, text);
    while !rest.is_empty() {
        let number_end = rest.find(|c: char| c.is_ascii_alphabetic()).expect("a unit");
        let unit_end = rest[number_end..]
            .find(|c: char| !c.is_ascii_alphabetic())
            .map_or(rest.len(), |i| number_end + i);
        let n: f64 = rest[..number_end].parse().unwrap_or_else(|_| panic!("{text}"));
        ms += n * match &rest[number_end..unit_end] {
            "h" => 3_600_000.0,
            "m" => 60_000.0,
            "s" => 1_000.0,
            "ms" => 1.0,
            unit => panic!("unit {unit} in {text}"),
        };
        rest = &rest[unit_end..];
    }
    ms.round() as u64
}

/// What one finished request left behind, besides its ledger line.
struct Counted {
    model: &'static str,
    request_id: String,
    tokens: Tokens,
    cost: f64,
    estimated: f64,
}

/// Reads `model`'s metrics and TPM bucket once its one request is recorded.
/// `started`: before the request was sent.
async fn counted(gw: &Gateway, model: &'static str, seen: &Value, started: Instant) -> Counted {
    let series = |name: &str, extra: &str| format!(r#"{name}{{model="{model}",{extra}upstream="a"}}"#);
    eventually(Duration::from_secs(5), "the request is recorded", || async {
        let m = gw.metrics().await;
        metric_value(
            &m,
            &format!(r#"relaygate_requests_total{{model="{model}",outcome="success",status="200"}}"#),
        ) == 1.0
    })
    .await;
    // Recorded means reconciled: the record reconciles, then writes the metrics.
    let m = gw.metrics().await;
    let tokens = Tokens {
        prompt: metric_value(&m, &series("relaygate_tokens_total", r#"type="prompt","#)) as u64,
        completion: metric_value(&m, &series("relaygate_tokens_total", r#"type="completion","#)) as u64,
    };
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "tpm_charged reads to the minute"
    );
    let charged = tpm_charged(gw, model).await;
    assert_eq!(
        charged,
        tokens.prompt + tokens.completion,
        "{model}: the TPM bucket was reconciled with the tokens counted"
    );
    Counted {
        model,
        request_id: seen["request_id"].as_str().expect("a request id").to_owned(),
        tokens,
        cost: metric_value(&m, &series("relaygate_cost_usd_total", "")),
        estimated: metric_value(&m, &series("relaygate_usage_estimated_total", "")),
    }
}

/// The counts of each request equal `expected`, in the metrics and in its
/// ledger line, and are flagged estimated or not in both.
fn check_counts(ledger: &Path, all: &[Counted], expected: Tokens, estimated: bool) {
    let lines: Vec<Value> = std::fs::read_to_string(ledger)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for c in all {
        let model = c.model;
        assert_eq!(c.tokens, expected, "{model}: tokens in the metrics");
        assert!(c.tokens.completion > 0, "{model}");
        assert!((c.cost - expected.cost()).abs() < 1e-12, "{model}: cost {}", c.cost);
        assert!(c.cost > 0.0, "{model}");
        assert_eq!(
            c.estimated,
            if estimated { 1.0 } else { 0.0 },
            "{model}: usage_estimated_total"
        );
        let line = lines
            .iter()
            .find(|l| l["request_id"] == c.request_id.as_str())
            .unwrap_or_else(|| panic!("{model}: no ledger line for {}", c.request_id));
        assert_eq!(line["model"], model);
        assert_eq!(line["outcome"], "success", "{line}");
        assert_eq!(line["prompt_tokens"], expected.prompt, "{line}");
        assert_eq!(line["completion_tokens"], expected.completion, "{line}");
        assert_eq!(line["usage_estimated"], estimated, "{line}");
        let cost = line["cost_usd"].as_f64().unwrap();
        assert!(
            (cost - c.cost).abs() < 1e-12,
            "ledger {cost} and metrics {} agree",
            c.cost
        );
    }
}

/// An SSE body cut into its events, each with its blank line: the simulator
/// ends every event with two `eol`s and has no other.
fn sse_events<'a>(body: &'a str, eol: &str) -> Vec<&'a str> {
    body.split_inclusive(&format!("{eol}{eol}")).collect()
}

/// One shape, end to end: the raw bytes a client receives, then the SDK's
/// streams with and without usage asked for, and what was counted.
async fn check_shape(faults: Faults) {
    let sim = Sim::start("a", faults.clone()).await.unwrap();
    let sends_usage = !faults.ignore_include_usage;
    let text = sim::answer(faults.chunks);
    let gw = Gateway::with_sim(&sim).await;

    // The bytes: exactly the upstream's, less the usage event relaygate
    // asked for, whole (both of its lines when it is split).
    let eol = faults.line_ending.as_str();
    let got = read_all(post_chat(&gw, &chat(true)).await).await;
    let sent = String::from_utf8(sim.last_stream_bytes()).unwrap();
    let (usage_events, rest): (Vec<&str>, Vec<&str>) = sse_events(&sent, eol)
        .into_iter()
        .partition(|e| e.contains("\"usage\""));
    assert_eq!(usage_events.len(), usize::from(sends_usage), "{sent:?}");
    assert_eq!(String::from_utf8(got).unwrap(), rest.concat());
    let mut body = chat(true);
    body["stream_options"] = json!({ "include_usage": true });
    let got = read_all(post_chat(&gw, &body).await).await;
    assert_eq!(got, sim.last_stream_bytes(), "asked for: all of it");
    drop(gw);

    let Some(python) = sdk_python() else { return };
    let ledger = crate::common::process::temp_dir().join("usage.jsonl");
    let mut gw = Gateway::start(&config(&sim, &ledger), &[]).await;

    let started = Instant::now();
    let seen = run_sdk(
        &python,
        &gw,
        &[
            Call {
                model: STREAMED,
                stream: true,
                include_usage: false,
            },
            Call {
                model: STREAMED_WITH_USAGE,
                stream: true,
                include_usage: true,
            },
        ],
    )
    .await;
    let (not_asked, asked) = (&seen[0], &seen[1]);
    for s in &seen {
        assert_eq!(s["text"], text.as_str(), "the content is intact: {s}");
    }
    // relaygate asked the upstream for usage on the client's behalf: the
    // usage-only chunk (the one chunk without choices) is not the client's.
    assert_eq!(not_asked["choiceless"], json!([]), "stripped: {not_asked}");
    assert_eq!(not_asked["with_usage"], json!([]), "{not_asked}");
    if sends_usage {
        let last = asked["chunks"].as_u64().unwrap() - 1;
        assert_eq!(asked["choiceless"], json!([last]), "kept, last: {asked}");
        assert_eq!(asked["with_usage"], json!([last]), "{asked}");
        let reported = Tokens::reported(&faults);
        assert_eq!(
            asked["last_usage"],
            json!({ "prompt_tokens": reported.prompt, "completion_tokens": reported.completion }),
        );
    } else {
        assert_eq!(asked["with_usage"], json!([]), "no usage came to keep: {asked}");
    }

    let all = [
        counted(&gw, STREAMED, not_asked, started).await,
        counted(&gw, STREAMED_WITH_USAGE, asked, started).await,
    ];
    gw.begin_shutdown();
    gw.stopped().await.unwrap();
    let (expected, estimated) = if sends_usage {
        (Tokens::reported(&faults), false)
    } else {
        (Tokens::estimated(&faults), true)
    };
    check_counts(&ledger, &all, expected, estimated);
}

#[tokio::test]
async fn spaced_json() {
    check_shape(Faults {
        sse_spaced_json: true,
        ..Faults::default()
    })
    .await;
}

#[tokio::test]
async fn data_split_over_two_lines() {
    check_shape(Faults {
        split_data_lines: true,
        ..Faults::default()
    })
    .await;
}

#[tokio::test]
async fn an_upstream_that_ignores_include_usage() {
    check_shape(Faults {
        ignore_include_usage: true,
        ..Faults::default()
    })
    .await;
}

#[tokio::test]
async fn cr_line_ends() {
    check_shape(Faults {
        line_ending: LineEnding::Cr,
        ..Faults::default()
    })
    .await;
}

#[tokio::test]
async fn crlf_line_ends() {
    check_shape(Faults {
        line_ending: LineEnding::CrLf,
        ..Faults::default()
    })
    .await;
}

/// Every knob at once: spaced JSON split over CR-ended lines from an
/// upstream that never sends usage.
#[tokio::test]
async fn all_shapes_at_once() {
    check_shape(Faults {
        sse_spaced_json: true,
        split_data_lines: true,
        ignore_include_usage: true,
        line_ending: LineEnding::Cr,
        ..Faults::default()
    })
    .await;
}

/// The same, but with the usage sent: a spaced, split, CR-ended usage
/// event, stripped or kept whole.
#[tokio::test]
async fn all_shapes_with_the_usage_sent() {
    check_shape(Faults {
        sse_spaced_json: true,
        split_data_lines: true,
        line_ending: LineEnding::Cr,
        ..Faults::default()
    })
    .await;
}

/// A plain answer without `usage`: estimated from the message text, and
/// flagged.
#[tokio::test]
async fn a_plain_answer_without_usage() {
    let Some(python) = sdk_python() else { return };
    let faults = Faults {
        omit_usage: true,
        ..Faults::default()
    };
    let sim = Sim::start("a", faults.clone()).await.unwrap();
    let ledger = crate::common::process::temp_dir().join("usage.jsonl");
    let mut gw = Gateway::start(&config(&sim, &ledger), &[]).await;
    let started = Instant::now();
    let seen = run_sdk(
        &python,
        &gw,
        &[Call {
            model: PLAIN,
            stream: false,
            include_usage: false,
        }],
    )
    .await;
    assert_eq!(seen[0]["text"], sim::answer(faults.chunks).as_str());
    assert_eq!(seen[0]["last_usage"], Value::Null, "the answer had none");
    let all = [counted(&gw, PLAIN, &seen[0], started).await];
    gw.begin_shutdown();
    gw.stopped().await.unwrap();
    check_counts(&ledger, &all, Tokens::estimated(&faults), true);
}

#[test]
fn go_durations_read_as_milliseconds() {
    assert_eq!(go_duration_ms("0s"), 0);
    assert_eq!(go_duration_ms("250ms"), 250);
    assert_eq!(go_duration_ms("16m59.5s"), 1_019_500);
    assert_eq!(go_duration_ms("1h2m3s"), 3_723_000);
}

/// The prompt estimate is the prompt's: a client's `max_tokens` is what it
/// allows the completion, not part of its prompt. Both estimates (a stream
/// without usage, a plain answer without it) once added `max_tokens`: with
/// `max_tokens: 1000` the ledger and the metrics counted 1006 prompt tokens
/// for a 6-token prompt, billed at the input price, and TPM reconciled to
/// the same.
#[tokio::test]
async fn the_prompt_estimate_leaves_out_max_tokens() {
    let sim = Sim::start(
        "a",
        Faults {
            ignore_include_usage: true,
            omit_usage: true,
            ..Faults::default()
        },
    )
    .await
    .unwrap();
    let gw = Gateway::with_sim(&sim).await;
    let prompt = Tokens::estimated(&Faults::default()).prompt;
    for stream in [true, false] {
        let mut body = json!({ "model": STREAMED, "messages": messages(), "stream": stream, "max_tokens": 1000 });
        if !stream {
            body.as_object_mut().unwrap().remove("stream");
        }
        read_all(post_chat(&gw, &body).await).await;
    }
    let series = r#"relaygate_tokens_total{model="deepseek-chat",type="prompt",upstream="a"}"#;
    eventually(Duration::from_secs(5), "both requests are recorded", || async {
        gw.metric(r#"relaygate_usage_estimated_total{model="deepseek-chat",upstream="a"}"#)
            .await
            == 2.0
    })
    .await;
    assert_eq!(gw.metric(series).await, (2 * prompt) as f64, "{series}");
}

/// `relaygate demo --sse-shape` puts the shapes in front of a user: the
/// stream arrives as the upstream shaped it, and its tokens are estimated.
#[tokio::test]
async fn the_demo_sends_the_shapes_it_is_asked_for() {
    use crate::common::process::Proc;
    let demo = Proc::spawn_quiet(&[
        "demo",
        "--listen",
        "127.0.0.1:0",
        "--no-traffic",
        "--outage-every",
        "0s",
        "--flaky-error-rate",
        "0",
        "--sse-shape",
        "spaced-json,split-data-lines,no-usage,cr",
    ])
    .await;
    let c = client();
    let chat = |stream: bool| {
        c.post(format!("{}/v1/chat/completions", demo.url))
            .bearer_auth("demo")
            .json(&json!({ "model": "deepseek-flaky", "messages": messages(), "stream": stream }))
            .send()
    };
    let body = String::from_utf8(read_all(chat(true).await.unwrap()).await).unwrap();
    assert!(body.contains("\"content\": \"Hello\"},\rdata: "), "{body:?}");
    assert!(body.ends_with("data: [DONE]\r\r"), "{body:?}");
    let plain: Value = chat(false).await.unwrap().json().await.unwrap();
    assert_eq!(plain["usage"], Value::Null, "{plain}");
    eventually(Duration::from_secs(5), "both requests estimated", || async {
        let m = reqwest::get(format!("{}/metrics", demo.url))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        metric_value(
            &m,
            r#"relaygate_usage_estimated_total{model="deepseek-flaky",upstream="sim-flaky"}"#,
        ) == 2.0
    })
    .await;
}
