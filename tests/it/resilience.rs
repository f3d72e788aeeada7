//! Failover, retries, 429 handling, circuit breakers, hedging, load
//! shedding, the admin API and config reload, against simulated upstreams.
//! Each test asserts the response, the upstream call counts and the metrics.

use std::time::{Duration, Instant};

use relaygate::sim::{Faults, Sim};
use serde_json::Value;

use crate::common::*;

const ADMIN: &str = "sk-admin-key-for-tests-000";

/// `deepseek-chat` → a (priority 0), then b (priority 1). `extra` is TOML
/// appended at the top level (e.g. `[retry]`, `[circuit_breaker]`).
fn pair(a: &Sim, b: &Sim, extra: &str) -> String {
    let base = config_for(&[("a", a), ("b", b)]);
    let base = base.replace(
        r#"targets = [{ upstream = "a", model = "deepseek-v3.2" }]"#,
        r#"targets = [{ upstream = "a", model = "deepseek-v3.2" }, { upstream = "b", model = "deepseek-v3.2", priority = 1 }]"#,
    );
    with_extra(&base, extra)
}

/// Inserts top-level tables before the first `[[upstreams]]`, replacing the
/// harness's `[retry]` when `extra` has its own.
fn with_extra(base: &str, extra: &str) -> String {
    let mut base = base.to_owned();
    if extra.contains("[retry]") {
        base = base.replace("[retry]\nbase_delay = \"10ms\"\nmax_delay = \"50ms\"\n", "");
    }
    let at = base.find("[[upstreams]]").unwrap();
    format!("{}{extra}\n{}", &base[..at], &base[at..])
}

/// `config` with more `[server]` keys (`lines`, newline-separated).
fn with_server_keys(config: &str, lines: &str) -> String {
    config.replace("shutdown_grace = \"5s\"", &format!("shutdown_grace = \"5s\"\n{lines}"))
}

async fn sim(faults: Faults) -> Sim {
    Sim::start("sim", faults).await.unwrap()
}

fn failing(status: u16) -> Faults {
    Faults {
        status: Some(status),
        ..Faults::default()
    }
}

async fn admin(gw: &Gateway, method: reqwest::Method, path: &str, key: Option<&str>) -> reqwest::Response {
    let mut req = client().request(method, format!("{}{path}", gw.url));
    if let Some(key) = key {
        req = req.bearer_auth(key);
    }
    req.send().await.unwrap()
}

async fn upstream_state(gw: &Gateway, name: &str) -> Value {
    let body: Value = admin(gw, reqwest::Method::GET, "/admin/upstreams", Some(ADMIN))
        .await
        .json()
        .await
        .unwrap();
    body["upstreams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["name"] == name)
        .unwrap()
        .clone()
}

#[tokio::test]
async fn a_503_once_is_retried_and_the_client_gets_200() {
    let a = sim(Faults {
        status: Some(503),
        status_times: Some(1),
        ..Faults::default()
    })
    .await;
    let gw = Gateway::with_sim(&a).await;
    let resp = post_chat(&gw, &chat(false)).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(a.stats().requests, 2);
    let m = gw.metrics().await;
    assert_eq!(
        metric_value(&m, r#"relaygate_retries_total{reason="server_error",upstream="a"}"#),
        1.0
    );
    assert_eq!(
        metric_value(
            &m,
            r#"relaygate_upstream_requests_total{error_type="server_error",status="503",upstream="a"}"#
        ),
        1.0
    );
}

#[tokio::test]
async fn a_500_fails_over_to_b() {
    let (a, b) = (sim(failing(500)).await, sim(Faults::default()).await);
    let gw = Gateway::start(&pair(&a, &b, ""), &[]).await;
    let resp = post_chat(&gw, &chat(false)).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-relaygate-upstream"], "b");
    assert_eq!((a.stats().requests, b.stats().requests), (1, 1));
    assert_eq!(
        gw.metric(r#"relaygate_failovers_total{from="a",model="deepseek-chat",to="b"}"#)
            .await,
        1.0
    );
}

#[tokio::test]
async fn connection_refused_fails_over() {
    let (a, b) = (sim(Faults::default()).await, sim(Faults::default()).await);
    let port = closed_port().await;
    let config = pair(&a, &b, "").replace(&a.base_url(), &format!("http://127.0.0.1:{port}/v1"));
    let gw = Gateway::start(&config, &[]).await;
    let resp = post_chat(&gw, &chat(false)).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(b.stats().requests, 1);
    assert_eq!(
        gw.metric(r#"relaygate_retries_total{reason="connect",upstream="a"}"#)
            .await,
        1.0
    );
}

#[tokio::test]
async fn every_upstream_down_is_an_openai_shaped_error() {
    // Both answer 503 with a JSON error: the last one passes through.
    let (a, b) = (sim(failing(503)).await, sim(failing(503)).await);
    let gw = Gateway::start(&pair(&a, &b, ""), &[]).await;
    let resp = post_chat(&gw, &chat(false)).await;
    assert_eq!(resp.status(), 503);
    let body: Value = resp.json().await.unwrap();
    assert!(body["error"]["message"].is_string());
    assert_eq!(a.stats().requests + b.stats().requests, 3, "max_attempts");

    // Both refuse connections: relaygate's own 502.
    let (p, q) = (closed_port().await, closed_port().await);
    let config = pair(&a, &b, "")
        .replace(&a.base_url(), &format!("http://127.0.0.1:{p}/v1"))
        .replace(&b.base_url(), &format!("http://127.0.0.1:{q}/v1"));
    let gw = Gateway::start(&config, &[]).await;
    let resp = post_chat(&gw, &chat(true)).await;
    assert_eq!(resp.status(), 502);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "upstream_connect_error");
}

#[tokio::test]
async fn headers_past_first_byte_timeout_fail_over_and_the_client_gets_200() {
    let a = sim(Faults {
        header_delay: Duration::from_secs(30),
        ..Faults::default()
    })
    .await;
    let b = sim(Faults::default()).await;
    let gw = Gateway::start(&pair(&a, &b, ""), &[]).await;
    for stream in [false, true] {
        let resp = post_chat(&gw, &chat(stream)).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-relaygate-upstream"], "b");
        let body = read_all(resp).await;
        if stream {
            assert!(body.ends_with(b"data: [DONE]\n\n"));
        }
    }
    assert_eq!(
        gw.metric(r#"relaygate_retries_total{reason="timeout",upstream="a"}"#)
            .await,
        2.0
    );
}

#[tokio::test]
async fn a_stream_that_breaks_after_3_chunks_is_never_retried() {
    for faults in [
        Faults {
            reset_after: Some(3),
            ..Faults::default()
        },
        Faults {
            stall_after: Some(3),
            ..Faults::default()
        },
    ] {
        let (a, b) = (sim(faults).await, sim(Faults::default()).await);
        let gw = Gateway::start(&pair(&a, &b, ""), &[]).await;
        let body = read_all(post_chat(&gw, &chat(true)).await).await;
        assert_eq!(content_chunks(&body), 3);
        let last: Value = serde_json::from_str(data_lines(&body).last().unwrap()).unwrap();
        assert!(last["error"]["code"].is_string(), "{last}");
        assert_eq!(a.stats().streams_opened, 1);
        assert_eq!(b.stats().requests, 0, "no retry after the stream committed");
        // The break still counts against a's breaker.
        let state = upstream_state(&gw, "a").await;
        assert_eq!(state["breaker"]["window_failures"], 1, "{state}");
    }
}

#[tokio::test]
async fn a_502_before_the_first_stream_byte_is_retried_cleanly() {
    let (a, b) = (sim(failing(502)).await, sim(Faults::default()).await);
    let gw = Gateway::start(&pair(&a, &b, ""), &[]).await;
    let body = read_all(post_chat(&gw, &chat(true)).await).await;
    assert_eq!(content_chunks(&body), 5);
    assert!(body.ends_with(b"data: [DONE]\n\n"));
    // b's stream exactly, less the usage chunk relaygate asked for itself.
    let expected = relaygate::sse::strip_usage_only(b.last_stream_bytes().into());
    assert_eq!(String::from_utf8_lossy(&body), String::from_utf8_lossy(&expected));
}

#[tokio::test]
async fn a_429_fails_over_at_once_and_cools_the_upstream() {
    let a = sim(Faults {
        status: Some(429),
        retry_after: Some("2".into()),
        ..Faults::default()
    })
    .await;
    let b = sim(Faults { ..Faults::default() }).await;
    let gw = Gateway::start(&pair(&a, &b, ""), &[]).await;
    // No wait before failing over, and the cooldown's length: on the
    // paused clock in stack::tests (a_429_cools_its_upstream_…).
    let resp = post_chat(&gw, &chat(false)).await;
    assert_eq!(resp.status(), 200);
    let state = upstream_state(&gw, "a").await;
    let cooldown = state["cooldown_remaining_seconds"].as_f64().unwrap();
    assert!(cooldown > 1.5 && cooldown <= 2.0, "{cooldown}");
    assert_eq!(state["breaker"]["window_failures"], 0, "a 429 is not a breaker failure");

    // While cooled, requests go straight to b.
    for _ in 0..3 {
        assert_eq!(post_chat(&gw, &chat(false)).await.status(), 200);
    }
    assert_eq!(a.stats().requests, 1);
    // After the cooldown, a is tried again.
    a.set_faults(Faults::default());
    eventually(Duration::from_secs(4), "a is used again after ~2 s", || async {
        post_chat(&gw, &chat(false)).await.headers()["x-relaygate-upstream"] == "a"
    })
    .await;
}

#[tokio::test]
async fn huge_or_garbage_retry_after_is_capped_or_ignored() {
    for (hint, max_cooldown) in [("99999", 3.0), ("soon", 1.0), ("Wed, 21 Oct 2099 07:28:00 GMT", 3.0)] {
        let a = sim(Faults {
            status: Some(429),
            retry_after: Some(hint.into()),
            ..Faults::default()
        })
        .await;
        let b = sim(Faults::default()).await;
        let config = pair(&a, &b, "[retry]\nretry_after_cap = \"3s\"\n");
        let gw = Gateway::start(&config, &[]).await;
        assert_eq!(post_chat(&gw, &chat(false)).await.status(), 200);
        let cooldown = upstream_state(&gw, "a").await["cooldown_remaining_seconds"]
            .as_f64()
            .unwrap();
        assert!(cooldown > 0.0 && cooldown <= max_cooldown, "{hint}: {cooldown}");
    }
}

#[tokio::test]
async fn a_429_with_nowhere_else_to_go_returns_429_with_retry_after() {
    let a = sim(Faults {
        status: Some(429),
        retry_after: Some("30".into()),
        ..Faults::default()
    })
    .await;
    // The cooldown (capped at 10 s) does not fit in a 2 s deadline: answer now.
    let config = config_for(&[("a", &a)]).replace("request_timeout = \"10s\"", "request_timeout = \"2s\"");
    let gw = Gateway::start(&config, &[]).await;
    let started = Instant::now();
    let resp = post_chat(&gw, &chat(false)).await;
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["retry-after"], "30");
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(a.stats().requests, 1);
}

#[tokio::test]
async fn an_upstream_400_passes_through_untouched() {
    let (a, b) = (sim(failing(400)).await, sim(Faults::default()).await);
    let gw = Gateway::start(&pair(&a, &b, ""), &[]).await;
    let resp = post_chat(&gw, &chat(false)).await;
    assert_eq!(resp.status(), 400);
    assert_eq!((a.stats().requests, b.stats().requests), (1, 0));
    let state = upstream_state(&gw, "a").await;
    assert_eq!(state["breaker"]["window_requests"], 0, "{state}");
    assert_eq!(state["breaker"]["consecutive_failures"], 0);
}

const FAST_BREAKER: &str = "[retry]\nmax_attempts = 1\n\n[circuit_breaker]\nconsecutive_failures = 3\nopen_for = \"300ms\"\nmax_open_for = \"1s\"\nhalf_open_probes = 2\n";

#[tokio::test]
async fn the_breaker_opens_refuses_fast_half_opens_and_closes() {
    let a = sim(failing(500)).await;
    let config = with_extra(&config_for(&[("a", &a)]), FAST_BREAKER);
    let gw = Gateway::start(&config, &[]).await;
    for _ in 0..3 {
        assert_eq!(post_chat(&gw, &chat(false)).await.status(), 500);
    }
    assert_eq!(upstream_state(&gw, "a").await["breaker"]["state"], "open");

    // Refused without an upstream call (timing: stack::tests, paused clock).
    let resp = post_chat(&gw, &chat(false)).await;
    assert_eq!(resp.status(), 503);
    let retry_after: u64 = resp.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(retry_after >= 1);
    assert_eq!(resp.json::<Value>().await.unwrap()["error"]["code"], "circuit_open");
    assert_eq!(a.stats().requests, 3, "no upstream call while open");

    a.set_faults(Faults::default());
    eventually(Duration::from_secs(3), "the breaker half-opens and closes", || async {
        post_chat(&gw, &chat(false)).await.status() == 200
            && upstream_state(&gw, "a").await["breaker"]["state"] == "closed"
    })
    .await;
    let m = gw.metrics().await;
    for (from, to) in [("closed", "open"), ("open", "half_open"), ("half_open", "closed")] {
        let series = format!(r#"relaygate_circuit_transitions_total{{from="{from}",to="{to}",upstream="a"}}"#);
        assert_eq!(metric_value(&m, &series), 1.0, "{series}");
    }
    assert_eq!(metric_value(&m, r#"relaygate_circuit_state{upstream="a"}"#), 0.0);
    // At least the one above; the polling loop may have met the open breaker too.
    assert!(
        metric_value(
            &m,
            r#"relaygate_requests_total{model="deepseek-chat",outcome="circuit_open",status="503"}"#
        ) >= 1.0
    );
}

#[tokio::test]
async fn a_hung_half_open_probe_counts_as_a_failure_and_frees_its_slot() {
    let a = sim(failing(500)).await;
    let config = with_extra(&config_for(&[("a", &a)]), FAST_BREAKER)
        .replace("first_byte_timeout = \"1s\"", "first_byte_timeout = \"300ms\"");
    let gw = Gateway::start(&config, &[]).await;
    for _ in 0..3 {
        post_chat(&gw, &chat(false)).await;
    }
    // The upstream now hangs: the half-open probe times out.
    a.set_faults(Faults {
        header_delay: Duration::from_secs(60),
        ..Faults::default()
    });
    eventually(Duration::from_secs(3), "a probe is admitted and times out", || async {
        post_chat(&gw, &chat(false)).await.status() == 504
    })
    .await;
    assert_eq!(
        upstream_state(&gw, "a").await["breaker"]["state"],
        "open",
        "re-opened, not stuck"
    );
    // Recovery: the breaker half-opens again and closes.
    a.set_faults(Faults::default());
    eventually(Duration::from_secs(5), "the breaker closes after recovery", || async {
        post_chat(&gw, &chat(false)).await.status() == 200
            && upstream_state(&gw, "a").await["breaker"]["state"] == "closed"
    })
    .await;
}

#[tokio::test]
async fn all_breakers_open_answers_503_fast_with_retry_after() {
    let (a, b) = (sim(Faults::default()).await, sim(Faults::default()).await);
    let gw = Gateway::start(&pair(&a, &b, ""), &[]).await;
    for name in ["a", "b"] {
        let r = admin(
            &gw,
            reqwest::Method::POST,
            &format!("/admin/upstreams/{name}/open"),
            Some(ADMIN),
        )
        .await;
        assert_eq!(r.status(), 200);
    }
    let resp = post_chat(&gw, &chat(true)).await;
    assert_eq!(resp.status(), 503);
    assert!(resp.headers().contains_key("retry-after"));
    assert_eq!(resp.json::<Value>().await.unwrap()["error"]["code"], "circuit_open");
    assert_eq!(a.stats().requests + b.stats().requests, 0);
    // Reset brings traffic back.
    admin(&gw, reqwest::Method::POST, "/admin/upstreams/a/reset", Some(ADMIN)).await;
    assert_eq!(post_chat(&gw, &chat(false)).await.status(), 200);
}

#[tokio::test]
async fn with_every_upstream_failing_the_retry_budget_holds_attempts_near_requests() {
    let (a, b) = (sim(failing(500)).await, sim(failing(500)).await);
    // Breakers that never open, so every attempt reaches an upstream.
    let extra =
        "[retry]\nbase_delay = \"1ms\"\nmax_delay = \"2ms\"\nmin_retries_per_second = 1\nbudget_ratio = 0.2\n\n\
                 [circuit_breaker]\nconsecutive_failures = 100000\nmin_requests = 100000\n";
    let gw = Gateway::start(&pair(&a, &b, extra), &[]).await;
    let requests = 400;
    for sent in send_concurrently(&gw, requests, 50, &chat(false)).await {
        assert_eq!(sent.status, 500);
    }
    let attempts = a.stats().requests + b.stats().requests;
    let ratio = attempts as f64 / requests as f64;
    eprintln!("attempts/requests = {attempts}/{requests} = {ratio:.3}");
    assert!(ratio <= 1.3, "{ratio}");
    assert!(ratio > 1.0, "some retries were allowed");
}

#[tokio::test]
async fn a_client_disconnect_while_waiting_stops_further_attempts() {
    // One upstream answering 429 Retry-After: 2: the policy waits out the
    // cooldown (it fits the deadline) before trying again.
    let a = sim(Faults {
        status: Some(429),
        retry_after: Some("2".into()),
        ..Faults::default()
    })
    .await;
    let gw = Gateway::with_sim(&a).await;
    abandon_chat(&gw, Duration::from_millis(300)).await;
    eventually(
        Duration::from_secs(1),
        "the request is recorded as cancelled",
        || async {
            gw.metric(r#"relaygate_requests_total{model="deepseek-chat",outcome="cancelled",status="499"}"#)
                .await
                == 1.0
        },
    )
    .await;
    // Past the 2 s cooldown: still one upstream call.
    let waited = Instant::now();
    eventually(Duration::from_secs(4), "the cooldown has passed", || async {
        waited.elapsed() > Duration::from_millis(2500)
    })
    .await;
    assert_eq!(a.stats().requests, 1);
}

#[tokio::test]
async fn hedging_returns_the_faster_answer_and_cancels_the_slower() {
    let a = sim(Faults {
        header_delay: Duration::from_millis(800),
        ..Faults::default()
    })
    .await;
    let b = sim(Faults::default()).await;
    let config = pair(&a, &b, "")
        .replace("first_byte_timeout = \"1s\"", "first_byte_timeout = \"5s\"")
        .replace("price = {", "hedge_after = \"100ms\"\nprice = {");
    let gw = Gateway::start(&config, &[]).await;
    // b answers and a is cancelled; when the hedge starts and how long the
    // race takes: stack::tests (a_hedge_races_…), on the paused clock.
    for stream in [false, true] {
        let resp = post_chat(&gw, &chat(stream)).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-relaygate-upstream"], "b");
        read_all(resp).await;
    }
    eventually(Duration::from_secs(1), "the slower attempts are cancelled", || async {
        a.stats().requests_cancelled == 2
    })
    .await;
    let m = gw.metrics().await;
    assert_eq!(
        metric_value(&m, r#"relaygate_hedges_total{model="deepseek-chat",result="won"}"#),
        2.0
    );
    assert_eq!(
        metric_value(
            &m,
            r#"relaygate_upstream_requests_total{error_type="cancelled",status="none",upstream="a"}"#
        ),
        2.0
    );
    // A fast primary is never hedged.
    a.set_faults(Faults::default());
    let before = b.stats().requests;
    assert_eq!(
        post_chat(&gw, &chat(false)).await.headers()["x-relaygate-upstream"],
        "a"
    );
    assert_eq!(b.stats().requests, before);
}

#[tokio::test]
async fn admin_endpoints_require_the_key_and_never_print_secrets() {
    let (a, b) = (sim(Faults::default()).await, sim(Faults::default()).await);
    let gw = Gateway::start(&pair(&a, &b, ""), &[]).await;
    let r = admin(&gw, reqwest::Method::GET, "/admin/upstreams", None).await;
    assert_eq!(r.status(), 401);
    let r = admin(
        &gw,
        reqwest::Method::GET,
        "/admin/upstreams",
        Some("sk-admin-key-for-tests-001"),
    )
    .await;
    assert_eq!(r.status(), 403);
    let r = admin(&gw, reqwest::Method::POST, "/admin/upstreams/a/open", Some(CLIENT_KEY)).await;
    assert_eq!(r.status(), 403, "a client key is not an admin key");
    let r = admin(&gw, reqwest::Method::GET, "/admin/upstreams", Some(ADMIN)).await;
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    for secret in [ADMIN, CLIENT_KEY, "sk-upstream-a-secret", "sk-upstream-b-secret"] {
        assert!(!text.contains(secret), "{secret} in {text}");
    }
    let body: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(body["upstreams"][0]["breaker"]["state"], "closed");
    assert_eq!(body["upstreams"][0]["host"], "127.0.0.1");
    let r = admin(&gw, reqwest::Method::POST, "/admin/upstreams/nope/reset", Some(ADMIN)).await;
    assert_eq!(r.status(), 404);

    // Drained by hand: traffic goes to b; reset brings a back.
    let r = admin(&gw, reqwest::Method::POST, "/admin/upstreams/a/open", Some(ADMIN)).await;
    assert_eq!(r.json::<Value>().await.unwrap()["breaker"]["state"], "forced_open");
    assert_eq!(
        post_chat(&gw, &chat(false)).await.headers()["x-relaygate-upstream"],
        "b"
    );
    admin(&gw, reqwest::Method::POST, "/admin/upstreams/a/reset", Some(ADMIN)).await;
    assert_eq!(
        post_chat(&gw, &chat(false)).await.headers()["x-relaygate-upstream"],
        "a"
    );

    // Without an [admin] key the API does not exist.
    let config = config_for(&[("a", &a)]).replace("[admin]\nkey = \"sk-admin-key-for-tests-000\"\n", "");
    let gw = Gateway::start(&config, &[]).await;
    let r = admin(&gw, reqwest::Method::GET, "/admin/upstreams", Some(ADMIN)).await;
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn load_shedding_answers_503_overloaded_fast() {
    let slow = Faults {
        stall_after: Some(1),
        ..Faults::default()
    };
    let (a, b) = (sim(slow.clone()).await, sim(slow).await);
    let config = with_server_keys(&pair(&a, &b, ""), "max_in_flight = 3")
        .replace("idle_timeout = \"500ms\"", "idle_timeout = \"30s\"")
        .replace(
            "connect_timeout = \"1s\"",
            "connect_timeout = \"1s\"\nmax_concurrency = 1",
        );
    let gw = Gateway::start(&config, &[]).await;
    // Two open streams: one on a, and (a being full) one failed over to b.
    let mut open = Vec::new();
    for expected in ["a", "b"] {
        let mut resp = post_chat(&gw, &chat(true)).await;
        assert_eq!(resp.headers()["x-relaygate-upstream"], expected);
        let mut buf = Vec::new();
        read_until(&mut resp, &mut buf, |b| content_chunks(b) >= 1).await;
        open.push(resp);
    }
    // Both upstreams are at max_concurrency: a fast 503 overloaded.
    let resp = post_chat(&gw, &chat(false)).await;
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.json::<Value>().await.unwrap()["error"]["code"], "overloaded");
    a.release();
    b.release();
    for resp in open {
        read_all(resp).await;
    }
    assert_eq!(post_chat(&gw, &chat(false)).await.status(), 200);
}

#[tokio::test]
async fn max_in_flight_sheds_the_excess() {
    let a = sim(Faults {
        stall_after: Some(1),
        ..Faults::default()
    })
    .await;
    let config = with_server_keys(&config_for(&[("a", &a)]), "max_in_flight = 2")
        .replace("idle_timeout = \"500ms\"", "idle_timeout = \"30s\"");
    let gw = Gateway::start(&config, &[]).await;
    let mut open = Vec::new();
    for _ in 0..2 {
        let mut resp = post_chat(&gw, &chat(true)).await;
        let mut buf = Vec::new();
        read_until(&mut resp, &mut buf, |b| content_chunks(b) >= 1).await;
        open.push(resp);
    }
    let started = Instant::now();
    let resp = post_chat(&gw, &chat(false)).await;
    assert_eq!(resp.status(), 503);
    assert!(started.elapsed() < Duration::from_millis(100));
    assert_eq!(resp.json::<Value>().await.unwrap()["error"]["code"], "overloaded");
    assert_eq!(a.stats().requests, 2);
    a.release();
    for resp in open {
        read_all(resp).await;
    }
    eventually(Duration::from_secs(1), "slots are freed when streams end", || async {
        post_chat(&gw, &chat(false)).await.status() == 200
    })
    .await;
    assert_eq!(
        gw.metric(r#"relaygate_requests_total{model="other",outcome="overloaded",status="503"}"#)
            .await,
        1.0
    );
}

/// A client that stops reading a fast stream fills its socket; hyper then
/// stops polling the response body, so the stream's own deadlines (checked
/// as it is polled) never fire and the request held its upstream connection
/// and in-flight slot for as long as the client kept the connection open.
/// `server.send_timeout` closes such a connection.
#[tokio::test]
async fn a_client_that_stops_reading_is_cut_off_after_send_timeout() {
    // About 40 MB of SSE as fast as it can be read.
    let a = sim(Faults {
        chunks: 200_000,
        ..Faults::default()
    })
    .await;
    let config = with_server_keys(&config_for(&[("a", &a)]), "send_timeout = \"1s\"");
    let gw = Gateway::start(&config, &[]).await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stuck = socket
        .connect(gw.url["http://".len()..].parse().unwrap())
        .await
        .unwrap();
    let body = chat(true).to_string();
    let request = raw_chat_head(body.len(), "") + &body;
    tokio::io::AsyncWriteExt::write_all(&mut stuck, request.as_bytes())
        .await
        .unwrap();
    eventually(Duration::from_secs(5), "the stream starts", || async {
        gw.metric("relaygate_in_flight_requests").await == 1.0
    })
    .await;
    // Never read. The request deadline is 10 s; the slot must be free well
    // before it, through the send timeout (1 s) alone.
    eventually(Duration::from_secs(8), "the stalled client is cut off", || async {
        gw.metric("relaygate_in_flight_requests").await == 0.0
    })
    .await;
    assert_eq!(client_timeouts(&gw).await, ["send"]);
    assert_eq!(a.stats().requests, 1);
    // A client that reads is served as before.
    let small = sim(Faults::default()).await;
    let gw2 = Gateway::with_sim(&small).await;
    let body = read_all(post_chat(&gw2, &chat(true)).await).await;
    assert!(body.ends_with(b"data: [DONE]\n\n"));
}

/// A client that stops sending its request body gets a 408 after
/// `server.request_body_timeout` instead of holding its in-flight slot for
/// as long as it keeps the connection; a shorter pause is fine.
#[tokio::test]
async fn a_request_body_that_stops_arriving_gets_408() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (a, gw, addr) = raw_gateway(Faults::default(), "request_body_timeout = \"500ms\"").await;
    let body = chat(false).to_string();
    let head = raw_chat_head(body.len(), "connection: close\r\n");
    let (first, rest) = body.as_bytes().split_at(body.len() / 2);

    // Half the body, then a pause shorter than the limit, then the rest: 200.
    let mut ok = tokio::net::TcpStream::connect(addr).await.unwrap();
    ok.write_all(head.as_bytes()).await.unwrap();
    ok.write_all(first).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    ok.write_all(rest).await.unwrap();
    let mut answer = String::new();
    ok.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    // Half the body and nothing more: 408 in about the limit, not never.
    let mut stuck = tokio::net::TcpStream::connect(addr).await.unwrap();
    stuck.write_all(head.as_bytes()).await.unwrap();
    stuck.write_all(first).await.unwrap();
    let started = Instant::now();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(5), stuck.read_to_string(&mut answer))
        .await
        .expect("an answer, not a hang")
        .unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "{:?}",
        started.elapsed()
    );
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    let json: Value = serde_json::from_str(&answer[answer.find("\r\n\r\n").unwrap() + 4..]).unwrap();
    assert_eq!(json["error"]["code"], "request_body_timeout");
    assert_eq!(json["error"]["type"], "invalid_request_error");
    assert_eq!(gw.metric("relaygate_in_flight_requests").await, 0.0);
    assert_eq!(a.stats().requests, 1, "only the complete request went upstream");
}

/// `server.header_read_timeout`: a request head that does not arrive in time
/// gets a 408 in OpenAI's shape. The time counts from the first wait after
/// the head began and is not restarted by each byte, so a client trickling
/// its head gains nothing. A connection that sends nothing is idle: closed
/// without an answer after `server.keepalive_timeout`.
#[tokio::test]
async fn a_request_head_that_does_not_arrive_in_time_gets_408() {
    use tokio::io::AsyncWriteExt;
    let (a, gw, addr) = raw_gateway(
        Faults::default(),
        "header_read_timeout = \"300ms\"\nkeepalive_timeout = \"1500ms\"",
    )
    .await;

    // Half a head, then one more header line every 50 ms for up to 10 s.
    let started = Instant::now();
    let (mut reader, mut writer) = tokio::net::TcpStream::connect(addr).await.unwrap().into_split();
    writer
        .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: relaygate\r\n")
        .await
        .unwrap();
    let trickle = tokio::spawn(async move {
        for _ in 0..200 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if writer.write_all(b"x-padding: 1\r\n").await.is_err() {
                return;
            }
        }
    });
    let answer = tokio::time::timeout(Duration::from_secs(8), read_to_close(&mut reader))
        .await
        .expect("a 408 and a close while the head trickles in, not after");
    let elapsed = started.elapsed();
    trickle.abort();
    assert!(
        elapsed >= Duration::from_millis(250) && elapsed < Duration::from_secs(5),
        "{elapsed:?}"
    );
    let answer = String::from_utf8(answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
    let json: Value = serde_json::from_str(&answer[answer.find("\r\n\r\n").unwrap() + 4..]).unwrap();
    assert_eq!(json["error"]["code"], "request_header_timeout");
    assert_eq!(json["error"]["type"], "invalid_request_error");
    assert!(json["error"]["message"].as_str().unwrap().contains("300ms"), "{json}");

    // Nothing at all: closed as idle, and nothing written.
    let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    let idle = closed_without_a_word(&mut silent, Instant::now()).await;
    assert!(idle >= Duration::from_millis(1000), "closed after {idle:?}");

    assert_eq!(client_timeouts(&gw).await, ["header", "keepalive"]);
    assert_eq!(a.stats().requests, 0);
    // A client that sends its request at once is served.
    assert_eq!(post_chat(&gw, &chat(false)).await.status(), 200);
}

/// The read timeouts never cut a request that is being answered, however
/// long the answer takes (hyper keeps reading the socket meanwhile, to see a
/// client leave). Between requests the connection is idle, and closes after
/// `server.keepalive_timeout`, not after the shorter header timeout.
#[tokio::test]
async fn keep_alive_connections_close_when_idle_but_not_while_answering() {
    use tokio::io::AsyncWriteExt;
    // Headers after 400 ms, then six events 200 ms apart: each stream takes
    // longer than the header timeout.
    let faults = Faults {
        header_delay: Duration::from_millis(400),
        chunks: 6,
        chunk_interval: Duration::from_millis(200),
        ..Faults::default()
    };
    let (a, gw, addr) = raw_gateway(
        faults,
        "header_read_timeout = \"300ms\"\nkeepalive_timeout = \"1500ms\"",
    )
    .await;
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    let body = chat(true).to_string();
    // Two streams, one after the other on the one connection.
    for _ in 0..2 {
        conn.write_all((raw_chat_head(body.len(), "") + &body).as_bytes())
            .await
            .unwrap();
        // A chunked answer ends with an empty chunk.
        let answer = read_answer(&mut conn, b"0\r\n\r\n").await;
        assert!(answer.starts_with(b"HTTP/1.1 200 "));
        assert_eq!(content_chunks(&answer), 6);
        assert!(data_lines(&answer).iter().any(|l| l == "[DONE]"));
    }
    let idle = closed_without_a_word(&mut conn, Instant::now()).await;
    assert!(
        idle >= Duration::from_millis(1000),
        "closed after {idle:?}: the keep-alive limit is 1.5 s, the header limit 300 ms"
    );
    assert_eq!(a.stats().requests, 2);
    assert_eq!(client_timeouts(&gw).await, ["keepalive"]);
    // Only the scrape's own connection is left.
    eventually(Duration::from_secs(5), "closed connections leave the gauge", || async {
        gw.metric("relaygate_client_connections").await == 1.0
    })
    .await;
}

/// The keep-alive time counts from the last answer: a connection used again
/// before its timeout gets the whole timeout again from that answer.
#[tokio::test]
async fn keep_alive_counts_from_the_last_answer() {
    use tokio::io::AsyncWriteExt;
    let (a, gw, addr) = raw_gateway(Faults::default(), "keepalive_timeout = \"1500ms\"").await;
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    let body = chat(false).to_string();
    let request = raw_chat_head(body.len(), "") + &body;
    let mut answered = Instant::now();
    for pause in [Duration::ZERO, Duration::from_millis(1000)] {
        // Idle for less than the timeout between the two requests.
        tokio::time::sleep(pause).await;
        conn.write_all(request.as_bytes()).await.unwrap();
        let answer = read_answer(&mut conn, b"}").await;
        assert!(
            answer.starts_with(b"HTTP/1.1 200 "),
            "{}",
            String::from_utf8_lossy(&answer)
        );
        answered = Instant::now();
    }
    let idle = closed_without_a_word(&mut conn, answered).await;
    // 1.5 s from the second answer; 0.5 s if counted from the first.
    assert!(
        idle >= Duration::from_millis(1000),
        "closed {idle:?} after the last answer"
    );
    assert_eq!(a.stats().requests, 2);
    assert_eq!(client_timeouts(&gw).await, ["keepalive"]);
}

/// Waits (10 s at most) for the gateway to close an idle connection, which
/// must send nothing first; returns the time from `since` to the close.
async fn closed_without_a_word(conn: &mut tokio::net::TcpStream, since: Instant) -> Duration {
    let rest = tokio::time::timeout(Duration::from_secs(10), read_to_close(conn))
        .await
        .expect("an idle connection is closed");
    assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
    since.elapsed()
}

/// Reads one answer from a raw connection: until what came ends with `end`
/// (10 s at most per read, and the connection must stay open).
async fn read_answer(conn: &mut tokio::net::TcpStream, end: &[u8]) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while !answer.ends_with(end) {
        let n = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut buf))
            .await
            .expect("the answer goes on")
            .unwrap();
        assert!(n > 0, "closed mid-answer: {}", String::from_utf8_lossy(&answer));
        answer.extend_from_slice(&buf[..n]);
    }
    answer
}

/// A gateway in front of one simulator with `faults`, with more `[server]`
/// keys, and its address for raw connections.
async fn raw_gateway(faults: Faults, server_keys: &str) -> (Sim, Gateway, std::net::SocketAddr) {
    let a = sim(faults).await;
    let gw = Gateway::start(&with_server_keys(&config_for(&[("a", &a)]), server_keys), &[]).await;
    let addr = gw.url["http://".len()..].parse().unwrap();
    (a, gw, addr)
}

/// `relaygate_client_timeouts_total` as a list of kinds, each as many times
/// as it was counted.
async fn client_timeouts(gw: &Gateway) -> Vec<&'static str> {
    let text = gw.metrics().await;
    let mut kinds = Vec::new();
    for kind in ["header", "keepalive", "send"] {
        let n = metric_value(&text, &format!("relaygate_client_timeouts_total{{kind=\"{kind}\"}}"));
        kinds.extend(std::iter::repeat_n(kind, n as usize));
    }
    kinds
}
