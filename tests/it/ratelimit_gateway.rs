//! Rate limiting through the gateway: 429s with OpenAI's headers, headers on
//! successes, token reconciliation from real usage, upstream-scoped limits
//! that fail over, and two real `relaygate` processes sharing one Redis.

use std::time::{Duration, Instant};

use relaygate::sim::{Faults, Sim};
use serde_json::{json, Value};

use crate::common::process::{temp_file, Proc};
use crate::common::*;
use crate::redis_support::RedisServer;

/// The harness config plus `extra` TOML before the first `[[upstreams]]`.
fn with(base: String, extra: &str) -> String {
    let at = base.find("[[upstreams]]").unwrap();
    format!("{}{extra}\n{}", &base[..at], &base[at..])
}

async fn burst(gw: &Gateway, n: usize) -> Vec<Sent> {
    send_concurrently(gw, n, n, &chat(false)).await
}

#[tokio::test]
async fn a_burst_admits_exactly_the_limit_and_rejects_with_openai_headers() {
    let sim = Sim::start("a", Faults::default()).await.unwrap();
    let config = with(
        config_for(&[("a", &sim)]),
        "[[rate_limits]]\nscope = \"key\"\nmatch = \"app-a\"\nrequests_per_minute = 6\nburst = 4\n",
    );
    let gw = Gateway::start(&config, &[]).await;
    let responses = burst(&gw, 20).await;
    let (ok, limited): (Vec<_>, Vec<_>) = responses.into_iter().partition(|r| r.status == 200);
    assert_eq!(ok.len(), 4, "exactly the burst is admitted");
    assert_eq!(limited.len(), 16);
    assert_eq!(sim.stats().requests, 4, "rejected requests never reach upstream");
    for r in &ok {
        assert_eq!(r.headers["x-ratelimit-limit-requests"], "6");
        assert!(r.headers.contains_key("x-ratelimit-remaining-requests"));
        assert!(r.headers.contains_key("x-ratelimit-reset-requests"));
    }
    let r = limited.into_iter().next().unwrap();
    assert_eq!(r.status, 429);
    let retry_after: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=10).contains(&retry_after), "{retry_after}");
    assert_eq!(r.headers["x-ratelimit-remaining-requests"], "0");
    let body: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    let m = gw.metrics().await;
    assert_eq!(
        metric_value(&m, r#"relaygate_rate_limited_total{rule="key:app-a",scope="key"}"#),
        16.0
    );
    assert_eq!(
        metric_value(
            &m,
            r#"relaygate_requests_total{model="deepseek-chat",outcome="rate_limited",status="429"}"#
        ),
        16.0
    );
}

#[tokio::test]
async fn tokens_are_reconciled_from_usage_for_plain_and_streamed_responses() {
    let sim = Sim::start("a", Faults::default()).await.unwrap();
    // 2,000 tokens a minute; each request reserves ~1,500 (max_tokens) but
    // really uses ~12. Without reconciliation only one request would fit.
    let config = with(
        config_for(&[("a", &sim)]),
        "[[rate_limits]]\nscope = \"model\"\ntokens_per_minute = 2000\n",
    );
    let gw = Gateway::start(&config, &[]).await;
    for stream in [false, true, false, true] {
        let mut body = chat(stream);
        body["max_tokens"] = json!(1500);
        let resp = post_chat(&gw, &body).await;
        assert_eq!(resp.status(), 200, "stream={stream}");
        read_all(resp).await;
        // Reconciliation runs when the request ends; wait for the bucket to refill.
        eventually(Duration::from_secs(2), "the reservation is reconciled", || async {
            let probe = client()
                .post(gw.v1("/chat/completions"))
                .bearer_auth(CLIENT_KEY)
                .json(&json!({ "model": "deepseek-chat", "messages": [], "max_tokens": 1 }))
                .send()
                .await
                .unwrap();
            let remaining: u64 = probe.headers()["x-ratelimit-remaining-tokens"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            probe.status() == 200 && remaining > 1700
        })
        .await;
    }
}

#[tokio::test]
async fn an_exhausted_upstream_quota_fails_over() {
    let (a, b) = (
        Sim::start("a", Faults::default()).await.unwrap(),
        Sim::start("b", Faults::default()).await.unwrap(),
    );
    let base = config_for(&[("a", &a), ("b", &b)]).replace(
        r#"targets = [{ upstream = "a", model = "deepseek-v3.2" }]"#,
        r#"targets = [{ upstream = "a", model = "deepseek-v3.2" }, { upstream = "b", model = "deepseek-v3.2", priority = 1 }]"#,
    );
    let config = with(
        base,
        "[[rate_limits]]\nscope = \"upstream\"\nmatch = \"a\"\nrequests_per_minute = 2\nburst = 2\n",
    );
    let gw = Gateway::start(&config, &[]).await;
    let mut served_by = Vec::new();
    for _ in 0..5 {
        let r = post_chat(&gw, &chat(false)).await;
        assert_eq!(r.status(), 200);
        served_by.push(r.headers()["x-relaygate-upstream"].to_str().unwrap().to_owned());
    }
    assert_eq!(served_by, ["a", "a", "b", "b", "b"]);
    assert_eq!(a.stats().requests, 2);
}

#[tokio::test]
async fn queue_mode_waits_for_a_slot() {
    let sim = Sim::start("a", Faults::default()).await.unwrap();
    // One request per second, burst 1, queue up to 3 s.
    let config = with(
        config_for(&[("a", &sim)]),
        "[[rate_limits]]\nscope = \"global\"\nrequests_per_minute = 60\nburst = 1\non_limit = \"queue\"\nmax_queue_wait = \"3s\"\n",
    );
    let gw = Gateway::start(&config, &[]).await;
    let started = Instant::now();
    let responses = burst(&gw, 2).await;
    assert!(responses.iter().all(|r| r.status == 200));
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(800) && took < Duration::from_secs(3),
        "{took:?}"
    );
}

#[tokio::test]
async fn fail_closed_without_redis_answers_503() {
    let sim = Sim::start("a", Faults::default()).await.unwrap();
    let port = closed_port().await;
    let config = with(
        config_for(&[("a", &sim)]),
        &format!(
            "[rate_limit]\nbackend = \"redis\"\nredis_url = \"redis://127.0.0.1:{port}\"\nfail_mode = \"closed\"\n\n\
             [[rate_limits]]\nscope = \"key\"\nrequests_per_minute = 100\n"
        ),
    );
    let gw = Gateway::start(&config, &[]).await;
    let started = Instant::now();
    let r = post_chat(&gw, &chat(false)).await;
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(r.status(), 503);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "rate_limiter_unavailable"
    );
    assert_eq!(sim.stats().requests, 0);
    assert_eq!(gw.metric("relaygate_ratelimit_fallback_active").await, 1.0);
}

async fn spawn_gateway(config: &str) -> Proc {
    let path = temp_file("relaygate.toml", config);
    Proc::spawn_quiet(&["serve", "--config", path.to_str().unwrap(), "--listen", "127.0.0.1:0"]).await
}

#[tokio::test]
async fn two_gateway_processes_sharing_one_redis_admit_the_shared_limit_once() {
    let redis = RedisServer::start().await;
    let sim = Sim::start("a", Faults::default()).await.unwrap();
    let config = with(
        config_for(&[("a", &sim)]),
        &format!(
            "[rate_limit]\nbackend = \"redis\"\nredis_url = \"{}\"\nkey_prefix = \"rg-{}\"\nexpected_instances = 2\n\n\
             [[rate_limits]]\nscope = \"key\"\nrequests_per_minute = 1\nburst = 10\n",
            redis.url(),
            fastrand::u32(..)
        ),
    );
    let (one, two) = (spawn_gateway(&config).await, spawn_gateway(&config).await);
    let c = client();
    let mut tasks = Vec::new();
    for i in 0..40 {
        let url = format!("{}/v1/chat/completions", if i % 2 == 0 { &one.url } else { &two.url });
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            c.post(url)
                .bearer_auth(CLIENT_KEY)
                .json(&chat(false))
                .send()
                .await
                .unwrap()
                .status()
        }));
    }
    let mut admitted = 0;
    for t in tasks {
        let status = t.await.unwrap();
        assert!(status == 200 || status == 429, "{status}");
        admitted += usize::from(status == 200);
    }
    assert_eq!(admitted, 10, "the shared burst, not twice it");
    assert_eq!(sim.stats().requests, 10);
}
