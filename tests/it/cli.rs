//! The real binary: `check`, `serve` (with SIGTERM), `doctor`, `demo`, and
//! the promise that no secret ever reaches its output.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use relaygate::sim::{Faults, Sim};
use serde_json::{json, Value};
use tokio::process::Command;

use crate::common::process::{temp_file, Proc, BIN};
use crate::common::*;

fn repo_file(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path)
}

async fn run(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(args).stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .expect("command finishes")
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn help_on_every_command() {
    for args in [
        vec!["--help"],
        vec!["serve", "--help"],
        vec!["check", "--help"],
        vec!["doctor", "--help"],
        vec!["demo", "--help"],
    ] {
        let (code, out, _) = run(&args, &[]).await;
        assert_eq!(code, 0, "{args:?}");
        assert!(out.contains("Usage:"), "{args:?}: {out}");
    }
}

#[tokio::test]
async fn check_accepts_the_example_config_and_names_the_key_on_error() {
    let example = repo_file("config/relaygate.example.toml");
    let env = [
        ("HOLYSHEEP_API_KEY", "sk-holysheep-example-secret"),
        ("APP_A_KEY", "sk-app-a-example-secret"),
        ("RELAYGATE_ADMIN_KEY", "sk-admin-example-secret"),
    ];
    let (code, out, err) = run(&["check", "--config", example.to_str().unwrap()], &env).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("OK") && out.contains("holysheep") && out.contains("deepseek-chat"),
        "{out}"
    );
    assert!(!out.contains("sk-holysheep-example-secret") && !out.contains("sk-app-a-example-secret"));

    // The same file without the variables: the error names the variable.
    let (code, _, err) = run(&["check", "--config", example.to_str().unwrap()], &[]).await;
    assert_eq!(code, 1);
    assert!(err.contains("is not set"), "{err}");

    let bad = temp_file(
        "bad.toml",
        "[[upstreams]]\nname = \"a\"\nbase_url = \"https://example.invalid/v1\"\nfirst_byte_timeout = \"soon\"\n",
    );
    let (code, _, err) = run(&["check", "--config", bad.to_str().unwrap()], &[]).await;
    assert_eq!(code, 1);
    assert!(
        err.contains(&format!(
            "{}: upstreams[0].first_byte_timeout: invalid duration \"soon\"",
            bad.display()
        )),
        "{err}"
    );

    // RELAYGATE_CONFIG works in place of --config.
    let (code, out, _) = run(&["check"], &[("RELAYGATE_CONFIG", bad.to_str().unwrap())]).await;
    assert_eq!(code, 1, "{out}");
}

#[tokio::test]
async fn serve_drains_on_sigterm_and_never_logs_secrets() {
    let sim = Sim::start(
        "holysheep",
        Faults {
            chunks: 10,
            chunk_interval: Duration::from_millis(30),
            ..Faults::default()
        },
    )
    .await
    .unwrap();
    let rejecting = Sim::start(
        "rejecting",
        Faults {
            require_key: Some("a-different-key".into()),
            ..Faults::default()
        },
    )
    .await
    .unwrap();
    let upstream_key = "sk-upstream-SECRET-aaaa1111";
    let client_key = "sk-client-SECRET-bbbb2222";
    let admin_key = "sk-admin-SECRET-cccc3333";
    let config = temp_file(
        "relaygate.toml",
        &format!(
            r#"
[server]
listen = "127.0.0.1:0"
shutdown_grace = "10s"

[admin]
key = "${{ADMIN_KEY}}"

[[upstreams]]
name = "holysheep"
base_url = "{}"
api_key = "${{UPSTREAM_KEY}}"

[[upstreams]]
name = "rejecting"
base_url = "{}"
api_key = "${{UPSTREAM_KEY}}"

[[models]]
name = "deepseek-chat"
targets = [{{ upstream = "holysheep" }}]

[[models]]
name = "misconfigured"
targets = [{{ upstream = "rejecting" }}]

[[keys]]
name = "app-a"
key = "${{CLIENT_KEY}}"
"#,
            sim.base_url(),
            rejecting.base_url()
        ),
    );
    let proc = Proc::spawn(
        &["serve", "--config", config.to_str().unwrap(), "--log-format", "json"],
        &[
            ("UPSTREAM_KEY", upstream_key),
            ("CLIENT_KEY", client_key),
            ("ADMIN_KEY", admin_key),
            ("RUST_LOG", "trace"),
        ],
    )
    .await;
    let c = client();
    let url = format!("{}/v1/chat/completions", proc.url);
    let mut seen = String::new();
    for (key, model) in [
        (Some(client_key), "deepseek-chat"),
        (Some("sk-client-SECRET-bbbb2223"), "deepseek-chat"),
        (None, "deepseek-chat"),
        (Some(client_key), "unknown-model"),
        (Some(client_key), "misconfigured"),
    ] {
        let mut req = c.post(&url).json(&json!({ "model": model, "messages": [] }));
        if let Some(key) = key {
            req = req.bearer_auth(key);
        }
        let resp = req.send().await.unwrap();
        seen.push_str(&format!("{:?}", resp.headers()));
        seen.push_str(&resp.text().await.unwrap());
    }
    seen.push_str(
        &c.get(format!("{}/metrics", proc.url))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    );
    seen.push_str(
        &c.get(format!("{}/health", proc.url))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    );

    // Start a stream, then SIGTERM: the stream finishes, then the process exits 0.
    let mut stream = c
        .post(&url)
        .bearer_auth(client_key)
        .json(&json!({ "model": "deepseek-chat", "messages": [], "stream": true }))
        .send()
        .await
        .unwrap();
    let mut buf = Vec::new();
    read_until(&mut stream, &mut buf, |b| content_chunks(b) >= 1).await;
    proc.signal("-TERM");
    buf.extend_from_slice(&read_all(stream).await);
    assert_eq!(content_chunks(&buf), 10, "the open stream is drained");
    assert!(buf.ends_with(b"data: [DONE]\n\n"));
    let (code, out, err) = proc.finish().await;
    assert_eq!(code, 0, "{err}");

    let everything = format!("{seen}\n{out}\n{err}");
    for secret in [upstream_key, client_key, admin_key, "sk-client-SECRET-bbbb2223"] {
        assert!(!everything.contains(secret), "secret {secret} leaked");
    }
    // The access log is there, one JSON line per request, naming the key.
    let access: Vec<Value> = err
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["target"] == "relaygate::access")
        .collect();
    assert_eq!(access.len(), 6, "{err}");
    assert!(access
        .iter()
        .any(|v| v["key"] == "app-a" && v["status"] == 200 && v["upstream"] == "holysheep"));
    assert!(access
        .iter()
        .all(|v| v["request_id"].as_str().is_some_and(|id| id.starts_with("req_"))));
    assert!(
        err.contains("upstream rejected relaygate's credentials"),
        "401/403 is called out"
    );
}

#[tokio::test]
async fn doctor_reports_each_step() {
    let good = Sim::start("good", Faults::default()).await.unwrap();
    let wrong_key = Sim::start(
        "wrong-key",
        Faults {
            require_key: Some("the-right-key".into()),
            ..Faults::default()
        },
    )
    .await
    .unwrap();
    let closed = closed_port().await;
    let config = |extra: &str| {
        format!(
            r#"
[[upstreams]]
name = "good"
base_url = "{}"
api_key = "sk-doctor-secret-1"
{extra}
[[models]]
name = "m"
targets = [{{ upstream = "good" }}]
"#,
            good.base_url()
        )
    };
    let ok_file = temp_file("ok.toml", &config(""));
    let (code, out, err) = run(&["doctor", "--config", ok_file.to_str().unwrap()], &[]).await;
    assert_eq!(code, 0, "{out}{err}");
    let row = out.lines().find(|l| l.starts_with("good")).unwrap();
    assert!(
        row.contains("ok") && row.contains("HTTP 200, 2 models") && row.ends_with("OK"),
        "{row}"
    );

    let extra = format!(
        r#"
[[upstreams]]
name = "wrong-key"
base_url = "{}"
api_key = "sk-doctor-secret-2"

[[upstreams]]
name = "down"
base_url = "http://127.0.0.1:{closed}/v1"
connect_timeout = "1s"

[[upstreams]]
name = "nxdomain"
base_url = "https://relaygate-doctor-test.invalid/v1"
connect_timeout = "2s"
"#,
        wrong_key.base_url()
    );
    let bad_file = temp_file("bad.toml", &config(&extra));
    let (code, out, _) = run(&["doctor", "--config", bad_file.to_str().unwrap()], &[]).await;
    assert_eq!(code, 1, "{out}");
    let row = |name: &str| out.lines().find(|l| l.starts_with(name)).unwrap().to_owned();
    assert!(row("wrong-key").contains("HTTP 401"), "{out}");
    assert!(row("down").contains("FAIL") && row("down").contains("refused"), "{out}");
    assert!(
        row("nxdomain").contains("FAIL") && row("nxdomain").contains("resolve"),
        "{out}"
    );
    assert!(!out.contains("sk-doctor-secret"));
}

/// `doctor --stream-usage` says which upstream sends usage for streams and
/// which does not (its tokens are then estimated), without failing the row.
#[tokio::test]
async fn doctor_says_whether_an_upstream_sends_usage_for_streams() {
    let sends = Sim::start("sends", Faults::default()).await.unwrap();
    let silent = Sim::start(
        "silent",
        Faults {
            ignore_include_usage: true,
            ..Faults::default()
        },
    )
    .await
    .unwrap();
    let file = temp_file(
        "usage.toml",
        &format!(
            r#"
[[upstreams]]
name = "sends"
base_url = "{}"

[[upstreams]]
name = "silent"
base_url = "{}"

[[upstreams]]
name = "unused"
base_url = "{}"

[[models]]
name = "m"
targets = [{{ upstream = "sends" }}, {{ upstream = "silent", model = "other-model" }}]
"#,
            sends.base_url(),
            silent.base_url(),
            sends.base_url()
        ),
    );
    let (code, out, err) = run(&["doctor", "--stream-usage", "--config", file.to_str().unwrap()], &[]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.lines().next().unwrap().contains("STREAM USAGE"), "{out}");
    let row = |name: &str| out.lines().find(|l| l.starts_with(name)).unwrap().to_owned();
    assert!(row("sends").contains("sent:") && row("sends").ends_with("OK"), "{out}");
    assert!(
        row("silent").contains("NOT SENT: stream tokens are estimated") && row("silent").ends_with("OK"),
        "{out}"
    );
    assert!(row("unused").contains("no model targets it"), "{out}");
    let seen = silent.last_request().unwrap();
    let body: Value = serde_json::from_slice(&seen.body).unwrap();
    assert_eq!(body["model"], "other-model", "the target's upstream model name");
    assert_eq!(body["max_tokens"], 1);
    assert_eq!(body["stream_options"]["include_usage"], true);

    assert_eq!(sends.stats().streams_opened, 1);

    // Without the flag, no column and no stream.
    let (code, out, _) = run(&["doctor", "--config", file.to_str().unwrap()], &[]).await;
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains("STREAM USAGE"), "{out}");
    assert_eq!(sends.stats().streams_opened, 1, "GET /models only");
}

#[tokio::test]
async fn demo_serves_without_a_key_or_network() {
    let proc = Proc::spawn(&["demo", "--listen", "127.0.0.1:0"], &[]).await;
    let c = client();
    let resp = c
        .post(format!("{}/v1/chat/completions", proc.url))
        .bearer_auth("anything")
        .json(&json!({ "model": "deepseek-chat", "messages": [{ "role": "user", "content": "hi" }] }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert!(body["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .starts_with("Hello"));
    let resp = c
        .post(format!("{}/v1/chat/completions", proc.url))
        .json(&json!({ "model": "deepseek-chat", "messages": [], "stream": true }))
        .send()
        .await
        .unwrap();
    let body = read_all(resp).await;
    assert!(body.ends_with(b"data: [DONE]\n\n"));
    proc.signal("-INT");
    let (code, out, err) = proc.finish().await;
    assert_eq!(code, 0);
    assert!(out.contains("from openai import OpenAI"), "{out}");
    // The access log (its own writer, see src/telemetry/access_log.rs) is on by
    // default, one line per request, and RUST_LOG turns it off.
    assert!(
        err.lines()
            .any(|l| l.contains(" INFO relaygate::access: request request_id=\"req_")),
        "{err}"
    );
    let quiet = Proc::spawn(
        &["demo", "--listen", "127.0.0.1:0"],
        &[("RUST_LOG", "info,relaygate::access=off")],
    )
    .await;
    let resp = c
        .post(format!("{}/v1/chat/completions", quiet.url))
        .json(&json!({ "model": "deepseek-chat", "messages": [] }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    quiet.signal("-INT");
    let (code, _, err) = quiet.finish().await;
    assert_eq!(code, 0);
    assert!(!err.contains("relaygate::access"), "{err}");
    assert!(
        err.contains(" INFO relaygate::app: shutting down"),
        "other logs stay: {err}"
    );
}

/// The demo's own traffic stops at Ctrl-C/SIGTERM, before the gateway
/// drains: requests sent during the drain were refused, and the last
/// summary line showed them as failures (about 60 % success at 200 req/s).
#[tokio::test]
async fn demo_stops_its_traffic_before_draining() {
    // Quiet: at 200 req/s the access log would fill the unread stderr pipe.
    // Answers of up to 1.5 s keep the drain longer than a summary period,
    // wherever in the second the signal lands.
    let mut proc = Proc::spawn(
        &[
            "demo",
            "--listen",
            "127.0.0.1:0",
            "--rps",
            "200",
            "--flaky-latency",
            "1500ms",
        ],
        &[("RUST_LOG", "warn")],
    )
    .await;
    let mut summaries = 0;
    while summaries < 2 {
        if proc.next_line().await.starts_with('[') {
            summaries += 1;
        }
    }
    proc.signal("-TERM");
    let (code, out, _) = proc.finish().await;
    assert_eq!(code, 0);
    for line in out.lines().filter(|l| l.starts_with('[')) {
        assert!(
            line.contains("success 100.0%"),
            "a summary after the signal: {line}\n{out}"
        );
    }
}
