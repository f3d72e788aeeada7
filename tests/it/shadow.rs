//! Shadow comparison: sampling, isolation from the client (latency, errors,
//! limits), the in-flight cap, separate accounting, and `relaygate compare`.

use std::time::Duration;

use relaygate::sim::{Faults, Sim};
use serde_json::{json, Value};

use crate::common::*;

/// `deepseek-chat` on upstream `a`, shadowed to `s` as `candidate-model`.
fn shadowed(a: &Sim, s: &Sim, sample: f64, max_in_flight: usize) -> String {
    config_for(&[("a", a), ("s", s)]).replace(
        "price = { input_per_mtok = 0.28",
        &format!(
            "shadow = {{ upstream = \"s\", model = \"candidate-model\", sample = {sample}, max_in_flight = {max_in_flight}, \
             price = {{ input_per_mtok = 1.0, output_per_mtok = 2.0 }} }}\nprice = {{ input_per_mtok = 0.28"
        ),
    )
}

async fn shadow_total(gw: &Gateway) -> f64 {
    let m = gw.metrics().await;
    m.lines()
        .filter(|l| l.starts_with("relaygate_shadow_requests_total{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum()
}

async fn send_many(gw: &Gateway, n: usize, concurrency: usize) -> Vec<Duration> {
    let sent = send_concurrently(gw, n, concurrency, &chat(false)).await;
    assert!(sent.iter().all(|s| s.status == 200));
    sent.into_iter().map(|s| s.latency).collect()
}

fn p99(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[(v.len() * 99).div_ceil(100) - 1]
}

#[tokio::test]
async fn the_sampling_ratio_holds() {
    let (a, s) = (
        Sim::start("a", Faults::default()).await.unwrap(),
        Sim::start("s", Faults::default()).await.unwrap(),
    );
    let gw = Gateway::start(&shadowed(&a, &s, 0.3, 1000), &[]).await;
    let n = 2000;
    send_many(&gw, n, 25).await;
    eventually(Duration::from_secs(5), "every shadow has finished", || async {
        shadow_total(&gw).await == s.stats().requests as f64
    })
    .await;
    let shadows = s.stats().requests as f64;
    // Binomial(2000, 0.3): mean 600, sd ~20.5; allow 5 sd.
    assert!((497.0..=703.0).contains(&shadows), "{shadows} shadows for {n} requests");
    assert_eq!(a.stats().requests, n as u64);
    assert_eq!(
        serde_json::from_slice::<Value>(&s.last_request().unwrap().body).unwrap()["model"],
        "candidate-model"
    );
}

#[tokio::test]
async fn a_slow_shadow_leaves_client_latency_unchanged() {
    let a = Sim::start("a", Faults::default()).await.unwrap();
    let slow = Sim::start(
        "s",
        Faults {
            header_delay: Duration::from_secs(2),
            ..Faults::default()
        },
    )
    .await
    .unwrap();
    let without = Gateway::with_sim(&a).await;
    let with = Gateway::start(&shadowed(&a, &slow, 1.0, 64), &[]).await;
    let base = p99(send_many(&without, 40, 4).await);
    let shadowed = p99(send_many(&with, 40, 4).await);
    eprintln!("client p99 without shadow {base:?}, with a 2 s shadow {shadowed:?}");
    assert!(shadowed < base + Duration::from_millis(300), "{shadowed:?} vs {base:?}");
    assert!(shadowed < Duration::from_secs(1), "never waits for the 2 s shadow");
    assert!(slow.stats().requests > 0);
}

#[tokio::test]
async fn a_failing_shadow_is_invisible_to_the_client() {
    let a = Sim::start("a", Faults::default()).await.unwrap();
    let failing = Sim::start(
        "s",
        Faults {
            status: Some(500),
            ..Faults::default()
        },
    )
    .await
    .unwrap();
    let gw = Gateway::start(&shadowed(&a, &failing, 1.0, 64), &[]).await;
    for stream in [false, true, false] {
        let r = post_chat(&gw, &chat(stream)).await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-relaygate-upstream"], "a");
        let body = read_all(r).await;
        if stream {
            assert!(body.ends_with(b"data: [DONE]\n\n"));
        }
    }
    eventually(Duration::from_secs(2), "the shadows are recorded as errors", || async {
        gw.metric(r#"relaygate_shadow_requests_total{model="deepseek-chat",outcome="upstream_error",upstream="s"}"#)
            .await
            == 3.0
    })
    .await;
    let m = gw.metrics().await;
    assert_eq!(
        metric_value(
            &m,
            r#"relaygate_requests_total{model="deepseek-chat",outcome="success",status="200"}"#
        ),
        3.0
    );
    assert_eq!(
        metric_value(&m, r#"relaygate_retries_total{reason="server_error",upstream="s"}"#),
        0.0
    );
}

#[tokio::test]
async fn the_in_flight_cap_holds_and_drops_are_counted() {
    let a = Sim::start("a", Faults::default()).await.unwrap();
    let hanging = Sim::start(
        "s",
        Faults {
            header_delay: Duration::from_secs(30),
            ..Faults::default()
        },
    )
    .await
    .unwrap();
    let gw = Gateway::start(&shadowed(&a, &hanging, 1.0, 2), &[]).await;
    send_many(&gw, 10, 1).await;
    eventually(Duration::from_secs(2), "two shadows reach the upstream", || async {
        hanging.stats().requests == 2
    })
    .await;
    assert_eq!(
        gw.metric(r#"relaygate_shadow_dropped_total{model="deepseek-chat"}"#)
            .await,
        8.0
    );
    assert_eq!(hanging.stats().requests, 2);
}

#[tokio::test]
async fn shadow_tokens_and_cost_are_recorded_separately() {
    let a = Sim::start("a", Faults::default()).await.unwrap();
    let s = Sim::start(
        "s",
        Faults {
            chunks: 8,
            ..Faults::default()
        },
    )
    .await
    .unwrap();
    let gw = Gateway::start(&shadowed(&a, &s, 1.0, 64), &[]).await;
    let body: Value = post_chat(&gw, &chat(false)).await.json().await.unwrap();
    let prompt = body["usage"]["prompt_tokens"].as_u64().unwrap() as f64;
    eventually(Duration::from_secs(2), "the shadow finished", || async {
        shadow_total(&gw).await == 1.0
    })
    .await;
    let m = gw.metrics().await;
    let primary = |t: &str| {
        metric_value(
            &m,
            &format!(r#"relaygate_tokens_total{{model="deepseek-chat",type="{t}",upstream="a"}}"#),
        )
    };
    let shadow = |t: &str| {
        metric_value(
            &m,
            &format!(r#"relaygate_shadow_tokens_total{{model="deepseek-chat",type="{t}",upstream="s"}}"#),
        )
    };
    assert_eq!((primary("prompt"), primary("completion")), (prompt, 5.0));
    assert_eq!((shadow("prompt"), shadow("completion")), (prompt, 8.0));
    assert_eq!(
        metric_value(
            &m,
            r#"relaygate_tokens_total{model="deepseek-chat",type="completion",upstream="s"}"#
        ),
        0.0
    );
    let cost = metric_value(
        &m,
        r#"relaygate_shadow_cost_usd_total{model="deepseek-chat",upstream="s"}"#,
    );
    let expected = (prompt * 1.0 + 8.0 * 2.0) / 1e6;
    assert!((cost - expected).abs() < 1e-12, "{cost} vs {expected}");
}

#[tokio::test]
async fn shadows_do_not_spend_the_clients_rate_limit() {
    let (a, s) = (
        Sim::start("a", Faults::default()).await.unwrap(),
        Sim::start("s", Faults::default()).await.unwrap(),
    );
    let config = shadowed(&a, &s, 1.0, 64);
    let at = config.find("[[upstreams]]").unwrap();
    let config = format!(
        "{}[[rate_limits]]\nscope = \"key\"\nrequests_per_minute = 5\nburst = 5\n\n{}",
        &config[..at],
        &config[at..]
    );
    let gw = Gateway::start(&config, &[]).await;
    let mut ok = 0;
    for _ in 0..8 {
        ok += usize::from(post_chat(&gw, &chat(false)).await.status() == 200);
    }
    assert_eq!(ok, 5, "the key's 5 requests, none taken by shadows");
}

#[tokio::test]
async fn compare_prints_the_table_from_a_ledger_and_admin_shadow_agrees() {
    let (a, s) = (
        Sim::start("a", Faults::default()).await.unwrap(),
        Sim::start("s", Faults::default()).await.unwrap(),
    );
    let ledger = crate::common::process::temp_dir().join("usage.jsonl");
    let mut config = shadowed(&a, &s, 1.0, 64);
    config.push_str(&format!("\n[ledger]\npath = \"{}\"\n", ledger.display()));
    let mut gw = Gateway::start(&config, &[]).await;
    for stream in [false, true, false, true] {
        let mut body = chat(stream);
        body["temperature"] = json!(0);
        read_all(post_chat(&gw, &body).await).await;
    }
    eventually(Duration::from_secs(2), "the shadows finished", || async {
        shadow_total(&gw).await == 4.0
    })
    .await;
    let admin: Value = client()
        .get(format!("{}/admin/shadow", gw.url))
        .bearer_auth("sk-admin-key-for-tests-000")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let model = &admin["models"][0];
    assert_eq!(model["model"], "deepseek-chat");
    assert_eq!(model["primary"]["requests"], 4);
    assert_eq!(model["shadow"]["requests"], 4);
    assert_eq!(model["deterministic_pairs"], 4);
    assert_eq!(model["exact_match_rate"], 1.0, "the simulators answer the same text");
    gw.begin_shutdown();
    gw.stopped().await.unwrap();

    let lines: Vec<Value> = std::fs::read_to_string(&ledger)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.iter().filter(|l| l["shadow"] == true).count(), 4);
    assert!(lines
        .iter()
        .filter(|l| l["shadow"] == true)
        .all(|l| l["upstream"] == "s"));

    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_relaygate"))
        .args(["compare", "--ledger", ledger.to_str().unwrap()])
        .output()
        .await
        .unwrap();
    assert!(out.status.success());
    let table = String::from_utf8_lossy(&out.stdout);
    for row in [
        "model deepseek-chat",
        "success rate",
        "latency p95 (ms)",
        "TTFT p50 (ms)",
        "tokens / request",
        "$ / 1,000 requests",
        "projected $ / month",
        "exact match (temp 0)",
    ] {
        assert!(table.contains(row), "{row} missing in\n{table}");
    }
    assert!(table.contains("100.00%"), "{table}");
}
