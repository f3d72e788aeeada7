//! Latency and cost routing end to end: the gateway in front of simulated
//! upstreams whose time to first byte and failures are set by their knobs.
//! The statistics are tested on the paused clock in `src/stack/balance_tests.rs`;
//! these check that the real path feeds and follows them. Counts, not
//! times: the bounds hold however slow the machine is.

use std::time::Duration;

use relaygate::sim::{Faults, Sim};
use serde_json::Value;

use crate::common::process::{temp_file, BIN};
use crate::common::*;

const ADMIN: &str = "sk-admin-key-for-tests-000";

/// `deepseek-chat` over a and b, both priority 0, with `model_keys` (its
/// `routing` and the like) and each target's extra keys.
fn routed(a: &Sim, b: &Sim, model_keys: &str, a_keys: &str, b_keys: &str, extra: &str) -> String {
    let base = config_for(&[("a", a), ("b", b)]);
    let base = base.replace(
        r#"targets = [{ upstream = "a", model = "deepseek-v3.2" }]"#,
        &format!(
            "{model_keys}\ntargets = [{{ upstream = \"a\", model = \"deepseek-v3.2\"{a_keys} }}, \
             {{ upstream = \"b\", model = \"deepseek-v3.2\"{b_keys} }}]"
        ),
    );
    let at = base.find("[[upstreams]]").unwrap();
    format!("{}{extra}\n{}", &base[..at], &base[at..])
}

fn delayed(ms: u64) -> Faults {
    Faults {
        header_delay: Duration::from_millis(ms),
        ..Faults::default()
    }
}

/// Sends `n` requests one after the other; the upstream that answered each.
async fn one_by_one(gw: &Gateway, n: usize, stream: bool) -> Vec<String> {
    let mut by = Vec::with_capacity(n);
    for _ in 0..n {
        let resp = post_chat(gw, &chat(stream)).await;
        assert_eq!(resp.status(), 200);
        by.push(resp.headers()["x-relaygate-upstream"].to_str().unwrap().to_owned());
        resp.bytes().await.unwrap();
    }
    by
}

fn count(by: &[String], upstream: &str) -> usize {
    by.iter().filter(|u| *u == upstream).count()
}

async fn admin_upstreams(gw: &Gateway) -> Value {
    client()
        .get(format!("{}/admin/upstreams", gw.url))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test]
async fn latency_routing_sends_most_requests_to_the_fast_upstream_and_measures_the_slow_one() {
    let (a, b) = (
        Sim::start("a", delayed(300)).await.unwrap(),
        Sim::start("b", delayed(30)).await.unwrap(),
    );
    let gw = Gateway::start(&routed(&a, &b, "routing = \"latency\"", "", "", ""), &[]).await;
    let warm = one_by_one(&gw, 10, true).await;
    let by = one_by_one(&gw, 60, false).await;
    assert!(
        count(&by, "b") >= 54,
        "the 30 ms upstream answered {} of 60",
        count(&by, "b")
    );
    let all: Vec<String> = warm.into_iter().chain(by).collect();
    assert!(count(&all, "a") >= 1, "the slow one is still measured");

    let m = gw.metrics().await;
    let picks = |u: &str| {
        metric_value(
            &m,
            &format!(r#"relaygate_route_picks_total{{model="deepseek-chat",strategy="latency",upstream="{u}"}}"#),
        )
    };
    assert_eq!(
        picks("a") + picks("b"),
        70.0,
        "one pick per request: nothing failed over"
    );
    let load = |u: &str| {
        metric_value(
            &m,
            &format!(r#"relaygate_target_load{{model="deepseek-chat",upstream="{u}"}}"#),
        )
    };
    assert!(
        load("a") >= 0.25 && load("b") < 0.25,
        "a {} s, b {} s",
        load("a"),
        load("b")
    );

    let body = admin_upstreams(&gw).await;
    let b_routing = &body["upstreams"][1]["routing"][0];
    assert_eq!(b_routing["model"], "deepseek-chat");
    assert_eq!(b_routing["strategy"], "latency");
    assert_eq!(b_routing["state"], "measured");
    assert_eq!(b_routing["in_flight"], 0);
    assert!(b_routing["estimate_seconds"].as_f64().unwrap() < 0.25, "{b_routing}");
}

#[tokio::test]
async fn an_upstream_failing_fast_does_not_attract_traffic() {
    let failing = Faults {
        status: Some(500),
        ..Faults::default()
    };
    let (a, b) = (
        Sim::start("a", failing).await.unwrap(),
        Sim::start("b", delayed(50)).await.unwrap(),
    );
    let gw = Gateway::start(&routed(&a, &b, "routing = \"latency\"", "", "", ""), &[]).await;
    let by = one_by_one(&gw, 40, false).await;
    assert_eq!(count(&by, "b"), 40, "every request fails over, or goes to b");
    assert!(
        a.stats().requests <= 2,
        "the instant 500s were sent {} requests",
        a.stats().requests
    );
    let body = admin_upstreams(&gw).await;
    assert_eq!(body["upstreams"][0]["routing"][0]["state"], "penalized");
}

#[tokio::test]
async fn a_hanging_upstream_stops_being_picked_before_its_first_timeout() {
    let hanging = delayed(60_000);
    let (a, b) = (
        Sim::start("a", hanging).await.unwrap(),
        Sim::start("b", delayed(20)).await.unwrap(),
    );
    let config = routed(&a, &b, "routing = \"latency\"", "", "", "").replacen(
        "first_byte_timeout = \"1s\"",
        "first_byte_timeout = \"5s\"",
        1,
    );
    let gw = std::sync::Arc::new(Gateway::start(&config, &[]).await);
    // 40 requests, one every 10 ms, none awaited before the next is sent.
    let mut sent = Vec::new();
    for _ in 0..40 {
        let gw = gw.clone();
        sent.push(tokio::spawn(async move {
            let resp = post_chat(&gw, &chat(false)).await;
            resp.status().as_u16()
        }));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let before_any_timeout = a.stats().requests;
    for s in sent {
        assert_eq!(s.await.unwrap(), 200, "the ones sent to a fail over after its timeout");
    }
    assert!(
        before_any_timeout <= 3,
        "{before_any_timeout} of 40 requests went to the upstream that never answers"
    );
}

#[tokio::test]
async fn a_target_added_by_reload_gets_traffic() {
    let (a, b) = (
        Sim::start("a", delayed(20)).await.unwrap(),
        Sim::start("b", delayed(20)).await.unwrap(),
    );
    let only_a = routed(&a, &b, "routing = \"latency\"", "", "", "")
        .replace(r#", { upstream = "b", model = "deepseek-v3.2" }]"#, "]");
    assert!(!only_a.contains("upstream = \"b\""), "{only_a}");
    let path = temp_file("relaygate.toml", &only_a);
    let gw = Gateway::from_file(&path).await;
    let url = gw.url.clone();
    let send = |n: usize| {
        let url = url.clone();
        async move {
            for _ in 0..n {
                let r = client()
                    .post(format!("{url}/v1/chat/completions"))
                    .bearer_auth(CLIENT_KEY)
                    .json(&chat(false))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200);
            }
        }
    };
    send(20).await;
    assert_eq!(b.stats().requests, 0);

    std::fs::write(&path, routed(&a, &b, "routing = \"latency\"", "", "", "")).unwrap();
    let r = client()
        .post(format!("{url}/admin/reload"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    send(5).await;
    assert!(b.stats().requests >= 1, "the new target is probed at once");
    send(45).await;
    assert!(
        b.stats().requests >= 5,
        "as fast as a, it takes a share: {} of 50",
        b.stats().requests
    );
}

const CHEAP: &str = ", price = { input_per_mtok = 0.1, output_per_mtok = 0.2 }";
const DEAR: &str = ", price = { input_per_mtok = 1.0, output_per_mtok = 2.0 }";

#[tokio::test]
async fn cost_routing_takes_the_cheapest_until_its_breaker_opens() {
    let (a, b) = (
        Sim::start("a", Faults::default()).await.unwrap(),
        Sim::start("b", Faults::default()).await.unwrap(),
    );
    let breaker = "[circuit_breaker]\nconsecutive_failures = 3\nopen_for = \"30s\"\n";
    let gw = Gateway::start(&routed(&a, &b, "routing = \"cost\"", CHEAP, DEAR, breaker), &[]).await;
    assert_eq!(count(&one_by_one(&gw, 10, false).await, "a"), 10);
    assert_eq!(b.stats().requests, 0);

    a.update(|f| f.status = Some(500));
    let by = one_by_one(&gw, 10, false).await;
    assert_eq!(count(&by, "b"), 10, "a's failures fail over to the next cheapest");
    assert_eq!(a.stats().requests, 13, "a is tried until its breaker opens, after 3");
    let m = gw.metrics().await;
    assert_eq!(
        metric_value(&m, r#"relaygate_route_picks_total{strategy="cost",upstream="b"}"#),
        10.0
    );
    // The answering target's price is what the request cost.
    let cost = |u: &str| metric_value(&m, &format!(r#"relaygate_cost_usd_total{{upstream="{u}"}}"#));
    assert!(cost("b") > 0.0 && cost("a") > 0.0);
    assert!(
        cost("b") / 10.0 > 5.0 * cost("a") / 10.0,
        "a {} b {}",
        cost("a"),
        cost("b")
    );
}

#[tokio::test]
async fn cost_routing_with_max_ttft_skips_a_cheap_upstream_that_is_too_slow() {
    let (a, b) = (
        Sim::start("a", delayed(400)).await.unwrap(),
        Sim::start("b", delayed(10)).await.unwrap(),
    );
    let model = "routing = \"cost\"\nmax_ttft = \"200ms\"";
    let gw = Gateway::start(&routed(&a, &b, model, CHEAP, DEAR, ""), &[]).await;
    let by = one_by_one(&gw, 30, true).await;
    assert!(
        count(&by, "a") <= 3,
        "the cheap but slow upstream answered {} of 30",
        count(&by, "a")
    );
    assert!(count(&by, "a") >= 1, "it was measured");
}

#[tokio::test]
async fn check_names_the_target_without_a_price_in_a_cost_model() {
    let text = "[[upstreams]]\nname = \"cheap\"\nbase_url = \"http://127.0.0.1:9/v1\"\n\
                [[upstreams]]\nname = \"dear\"\nbase_url = \"http://127.0.0.1:9/v1\"\n\
                [[models]]\nname = \"m\"\nrouting = \"cost\"\ntargets = [\
                { upstream = \"cheap\", price = { input_per_mtok = 0.1, output_per_mtok = 0.2 } }, \
                { upstream = \"dear\" }]\n";
    let path = temp_file("cost.toml", text);
    let out = tokio::process::Command::new(BIN)
        .args(["check", "--config", path.to_str().unwrap()])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("models[0].targets[1].price: routing = \"cost\" ranks targets by price, and target \"dear\""),
        "{err}"
    );
}
