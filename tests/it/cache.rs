//! The response cache (issue 16), end to end through the gateway: what is
//! stored and what is not, replays byte for byte, scopes, request controls,
//! single flight, purge and reload, the accounting, and Redis.

use std::time::Duration;

use relaygate::sim::{Faults, Sim};
use serde_json::{json, Value};
use tokio::time::Instant;

use crate::common::process::{temp_file, Proc};
use crate::common::*;
use crate::redis_support::RedisServer;

const ADMIN: &str = "sk-admin-key-for-tests-000";
const KEY_B: &str = "sk-client-app-b-0123456789";
const MODEL_SERIES: &str = r#"model="deepseek-chat""#;

/// The harness config with the cache on for `deepseek-chat` (`model_cache`
/// is its `cache = {…}`), a `[cache]` section, and a second client key.
fn cached_config(sim: &Sim, model_cache: &str, section: &str) -> String {
    format!(
        "{}cache = {model_cache}\n\n[cache]\n{section}\n\n[[keys]]\nname = \"app-b\"\nkey = \"{KEY_B}\"\n",
        config_for(&[("a", sim)])
    )
}

async fn gateway(sim: &Sim, model_cache: &str, section: &str) -> Gateway {
    Gateway::start(&cached_config(sim, model_cache, section), &[]).await
}

fn question(text: &str, stream: bool) -> Value {
    json!({
        "model": "deepseek-chat",
        "messages": [{ "role": "user", "content": text }],
        "temperature": 0,
        "stream": stream,
    })
}

struct Answer {
    status: u16,
    cache: String,
    headers: reqwest::header::HeaderMap,
    body: bytes::Bytes,
}

async fn send(gw: &Gateway, key: &str, body: &Value, cache_control: Option<&str>) -> Answer {
    send_raw(gw, key, serde_json::to_vec(body).unwrap(), cache_control).await
}

async fn send_raw(gw: &Gateway, key: &str, body: Vec<u8>, cache_control: Option<&str>) -> Answer {
    let mut req = client()
        .post(gw.v1("/chat/completions"))
        .bearer_auth(key)
        .header("content-type", "application/json")
        .body(body);
    if let Some(cc) = cache_control {
        req = req.header("cache-control", cc);
    }
    let r = req.send().await.unwrap();
    let (status, headers) = (r.status().as_u16(), r.headers().clone());
    let cache = headers
        .get("x-relaygate-cache")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    Answer {
        status,
        cache,
        headers,
        body: r.bytes().await.unwrap(),
    }
}

async fn cache_metric(gw: &Gateway, result: &str) -> f64 {
    gw.metric(&format!(
        r#"relaygate_cache_requests_total{{{MODEL_SERIES},result="{result}"}}"#
    ))
    .await
}

#[tokio::test]
async fn a_plain_hit_replays_the_answer_without_the_upstream_and_costs_nothing() {
    let sim = Sim::start("a", Faults::default()).await.unwrap();
    let ledger = temp_file("ledger.jsonl", "");
    let config = format!(
        "{}\n[ledger]\npath = \"{}\"\n\n[[models]]\nname = \"uncached\"\ntargets = [{{ upstream = \"a\" }}]\n",
        cached_config(&sim, r#"{ ttl = "10m" }"#, ""),
        ledger.display()
    );
    let gw = Gateway::start(&config, &[]).await;
    let body = question("What is 2+2?", false);

    let miss = send(&gw, CLIENT_KEY, &body, None).await;
    assert_eq!((miss.status, miss.cache.as_str()), (200, "miss"));
    assert!(miss.headers.get("age").is_none());
    let cost = r#"relaygate_cost_usd_total{model="deepseek-chat"}"#;
    let completion = r#"relaygate_tokens_total{model="deepseek-chat",type="completion"}"#;
    let (cost_after_miss, tokens_after_miss) = (gw.metric(cost).await, gw.metric(completion).await);
    assert!(cost_after_miss > 0.0 && tokens_after_miss > 0.0);

    let hit = send(&gw, CLIENT_KEY, &body, None).await;
    assert_eq!((hit.status, hit.cache.as_str()), (200, "hit"));
    assert_eq!(hit.body, miss.body, "the stored answer, byte for byte");
    assert_eq!(hit.headers["age"], "0");
    assert_eq!(hit.headers["x-relaygate-upstream"], "cache");
    assert_eq!(hit.headers["content-type"], miss.headers["content-type"]);
    assert_eq!(sim.stats().requests, 1, "the hit never reached the upstream");

    // JSON-equal but byte-different: same entry. One sampling field changed: not.
    let reordered = br#"{ "stream": false, "temperature": 0.0,
        "messages": [ { "content": "What is 2+2?", "role": "user" } ], "model": "deepseek-chat", "user": "end-user-7" }"#;
    assert_eq!(send_raw(&gw, CLIENT_KEY, reordered.to_vec(), None).await.cache, "hit");
    for (field, value) in [
        ("seed", json!(7)),
        ("max_tokens", json!(64)),
        ("top_p", json!(0.9)),
        (
            "tools",
            json!([{ "type": "function", "function": { "name": "f", "parameters": {} } }]),
        ),
        ("response_format", json!({ "type": "json_object" })),
        ("logit_bias", json!({ "50256": -100 })),
    ] {
        let mut changed = body.clone();
        changed[field] = value;
        assert_eq!(send(&gw, CLIENT_KEY, &changed, None).await.cache, "miss", "{field}");
    }
    assert_eq!(sim.stats().requests, 7);

    // Accounting: a hit is a request answered by `cache`, not spend.
    assert_eq!(
        gw.metric(r#"relaygate_requests_total{model="deepseek-chat",upstream="cache",status="200"}"#)
            .await,
        2.0
    );
    assert_eq!(cache_metric(&gw, "hit").await, 2.0);
    assert_eq!(cache_metric(&gw, "stored").await, 7.0);
    let saved = gw
        .metric(&format!("relaygate_cache_saved_usd_total{{{MODEL_SERIES}}}"))
        .await;
    assert!(
        (saved - 2.0 * cost_after_miss).abs() < 1e-12,
        "saved {saved}, two hits of a miss that cost {cost_after_miss}"
    );
    assert_eq!(
        gw.metric(&format!(
            r#"relaygate_cache_tokens_served_total{{{MODEL_SERIES},type="completion"}}"#
        ))
        .await,
        2.0 * tokens_after_miss
    );

    // The ledger: hits are lines with cost 0, no tokens bought, and what they saved.
    gw.state.flush().await;
    let lines: Vec<Value> = std::fs::read_to_string(&ledger)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let hits: Vec<&Value> = lines.iter().filter(|l| l["cache"] == "hit").collect();
    assert_eq!(hits.len(), 2);
    for h in &hits {
        assert_eq!(h["cost_usd"], 0.0);
        assert_eq!(h["completion_tokens"], 0);
        assert_eq!(h["upstream"], Value::Null);
        assert!(h["saved_usd"].as_f64().unwrap() > 0.0);
    }
    assert_eq!(lines.iter().filter(|l| l["cache"] == "miss").count(), 7);
    let spent: f64 = lines.iter().map(|l| l["cost_usd"].as_f64().unwrap()).sum();
    let counted = gw.metric(cost).await;
    assert!((spent - counted).abs() < 1e-12, "ledger {spent} vs metrics {counted}");

    // A model without `cache` gets no header.
    let mut uncached = body.clone();
    uncached["model"] = json!("uncached");
    let other = send(&gw, CLIENT_KEY, &uncached, None).await;
    assert_eq!((other.status, other.cache.as_str()), (200, ""));
}

#[tokio::test]
async fn streams_replay_byte_for_byte_with_reasoning_and_tool_call_deltas() {
    let sim = Sim::start(
        "a",
        Faults {
            reasoning_chunks: 3,
            tool_call: true,
            ..Faults::default()
        },
    )
    .await
    .unwrap();
    let gw = gateway(&sim, r#"{ when = "always" }"#, "").await;

    // First without include_usage: the client's bytes have no usage chunk.
    let plain = question("weather in Paris?", true);
    let miss = send(&gw, CLIENT_KEY, &plain, None).await;
    assert_eq!(miss.cache, "miss");
    let text = String::from_utf8_lossy(&miss.body).into_owned();
    assert!(text.contains("reasoning_content") && text.contains("tool_calls") && text.ends_with("data: [DONE]\n\n"));
    assert!(!text.contains("\"usage\""), "usage was not asked for");
    let hit = send(&gw, CLIENT_KEY, &plain, None).await;
    assert_eq!(hit.cache, "hit");
    assert_eq!(hit.body, miss.body, "replayed byte for byte, event by event");
    assert_eq!(hit.headers["content-type"], "text/event-stream");
    // The same entry with include_usage: the upstream's usage chunk is kept.
    let mut with_usage = plain.clone();
    with_usage["stream_options"] = json!({ "include_usage": true });
    let hit_usage = send(&gw, CLIENT_KEY, &with_usage, None).await;
    assert_eq!(hit_usage.cache, "hit");
    let upstream_bytes = sim.last_stream_bytes();
    assert_eq!(
        &hit_usage.body[..],
        &upstream_bytes[..],
        "the upstream's bytes, usage and all"
    );
    assert_eq!(sim.stats().requests, 1);

    // The other order: stored by a client that asked for usage.
    let asked = {
        let mut q = question("weather in Rome?", true);
        q["stream_options"] = json!({ "include_usage": true });
        q
    };
    let miss = send(&gw, CLIENT_KEY, &asked, None).await;
    assert!(String::from_utf8_lossy(&miss.body).contains("\"usage\""));
    assert_eq!(send(&gw, CLIENT_KEY, &asked, None).await.body, miss.body);
    let mut not_asked = asked.clone();
    not_asked.as_object_mut().unwrap().remove("stream_options");
    let hit = send(&gw, CLIENT_KEY, &not_asked, None).await;
    assert_eq!(hit.cache, "hit");
    assert_eq!(
        hit.body,
        relaygate::sse::strip_usage_only(miss.body.clone()),
        "the usage chunk stripped, as on a miss"
    );
    // Streamed and plain answers are separate entries.
    let mut as_plain = asked.clone();
    as_plain["stream"] = json!(false);
    as_plain.as_object_mut().unwrap().remove("stream_options");
    assert_eq!(send(&gw, CLIENT_KEY, &as_plain, None).await.cache, "miss");
    assert_eq!(sim.stats().requests, 3);
}

#[tokio::test]
async fn embeddings_are_cached_without_a_temperature() {
    let sim = Sim::start("a", Faults::default()).await.unwrap();
    let gw = gateway(&sim, "{}", "").await;
    let body = json!({ "model": "deepseek-chat", "input": ["the same document"] });
    let first = post_v1(&gw, "/embeddings", &body).await;
    assert_eq!(first.headers()["x-relaygate-cache"], "miss");
    let first = first.bytes().await.unwrap();
    let second = post_v1(&gw, "/embeddings", &body).await;
    assert_eq!(
        second.headers()["x-relaygate-cache"],
        "hit",
        "when = deterministic does not apply"
    );
    assert_eq!(second.bytes().await.unwrap(), first);
    // A chat request without temperature 0 or a seed is not cached by that rule.
    let mut warm = question("the same document", false);
    warm.as_object_mut().unwrap().remove("temperature");
    assert_eq!(send(&gw, CLIENT_KEY, &warm, None).await.cache, "bypass");
    assert_eq!(sim.stats().requests, 2);
}

#[tokio::test]
async fn entries_expire_after_their_ttl() {
    let sim = Sim::start("a", Faults::default()).await.unwrap();
    let gw = gateway(&sim, r#"{ ttl = "2s" }"#, r#"ttl = "1h""#).await;
    let body = question("short-lived", false);
    assert_eq!(send(&gw, CLIENT_KEY, &body, None).await.cache, "miss");
    assert_eq!(send(&gw, CLIENT_KEY, &body, None).await.cache, "hit");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let a = send(&gw, CLIENT_KEY, &body, None).await;
        if a.cache == "miss" {
            break;
        }
        assert!(Instant::now() < deadline, "still a hit after 15 s with a 2 s ttl");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(send(&gw, CLIENT_KEY, &body, None).await.cache, "hit", "stored again");
}

#[tokio::test]
async fn scope_key_keeps_clients_apart_and_global_shares() {
    let sim = Sim::start("a", Faults::default()).await.unwrap();
    let per_key = gateway(&sim, "{}", "").await;
    let body = question("tenant data", false);
    assert_eq!(send(&per_key, CLIENT_KEY, &body, None).await.cache, "miss");
    assert_eq!(send(&per_key, CLIENT_KEY, &body, None).await.cache, "hit");
    assert_eq!(
        send(&per_key, KEY_B, &body, None).await.cache,
        "miss",
        "B never sees A's entry"
    );
    assert_eq!(send(&per_key, KEY_B, &body, None).await.cache, "hit");

    let global = gateway(&sim, "{}", r#"scope = "global""#).await;
    assert_eq!(send(&global, CLIENT_KEY, &body, None).await.cache, "miss");
    assert_eq!(send(&global, KEY_B, &body, None).await.cache, "hit");
}

#[tokio::test]
async fn request_cache_control_and_when() {
    let sim = Sim::start("a", Faults::default()).await.unwrap();
    let gw = gateway(&sim, "{}", "").await;
    let body = question("controls", false);

    let r = send(&gw, CLIENT_KEY, &body, Some("no-store")).await;
    assert_eq!(r.cache, "bypass");
    assert_eq!(cache_metric(&gw, "stored").await, 0.0, "no-store writes nothing");
    let first = send(&gw, CLIENT_KEY, &body, None).await;
    assert_eq!(first.cache, "miss");
    assert_eq!(
        send(&gw, CLIENT_KEY, &body, Some("no-store")).await.cache,
        "bypass",
        "and reads nothing"
    );

    // no-cache: upstream again, and the fresh answer replaces the entry.
    let fresh = send(&gw, CLIENT_KEY, &body, Some("no-cache")).await;
    assert_eq!(fresh.cache, "refresh");
    assert_ne!(fresh.body, first.body, "a new upstream answer (its id differs)");
    let hit = send(&gw, CLIENT_KEY, &body, None).await;
    assert_eq!((hit.cache.as_str(), &hit.body), ("hit", &fresh.body));

    // max-age: an entry older than N seconds is not accepted.
    assert_eq!(send(&gw, CLIENT_KEY, &body, Some("max-age=3600")).await.cache, "hit");
    let deadline = Instant::now() + Duration::from_secs(10);
    while send(&gw, CLIENT_KEY, &body, None).await.headers["age"] == "0" {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before = sim.stats().requests;
    assert_eq!(send(&gw, CLIENT_KEY, &body, Some("max-age=0")).await.cache, "miss");
    assert_eq!(sim.stats().requests, before + 1);

    // when = "deterministic": temperature 0.7 without a seed is not cached;
    // with a seed it is.
    let mut warm = body.clone();
    warm["temperature"] = json!(0.7);
    assert_eq!(send(&gw, CLIENT_KEY, &warm, None).await.cache, "bypass");
    assert_eq!(send(&gw, CLIENT_KEY, &warm, None).await.cache, "bypass");
    warm["seed"] = json!(42);
    assert_eq!(send(&gw, CLIENT_KEY, &warm, None).await.cache, "miss");
    assert_eq!(send(&gw, CLIENT_KEY, &warm, None).await.cache, "hit");
}

#[tokio::test]
async fn failures_and_incomplete_answers_are_never_stored() {
    let sim = Sim::start("a", Faults::default()).await.unwrap();
    let config = cached_config(&sim, "{}", "").replace("[retry]\n", "[retry]\nmax_attempts = 1\n");
    let gw = Gateway::start(&config, &[]).await;

    // Each case: the faulty answer, then the same request answered normally
    // must be a miss (nothing was stored), and only then a hit.
    let cases: Vec<(&str, Faults, bool)> = vec![
        (
            "500",
            Faults {
                status: Some(500),
                ..Faults::default()
            },
            false,
        ),
        (
            "429",
            Faults {
                status: Some(429),
                ..Faults::default()
            },
            false,
        ),
        (
            "a cut stream",
            Faults {
                reset_after: Some(2),
                ..Faults::default()
            },
            true,
        ),
        (
            "finish_reason length",
            Faults {
                finish_reason: Some("length".into()),
                ..Faults::default()
            },
            true,
        ),
    ];
    for (i, (case, faults, stream)) in cases.into_iter().enumerate() {
        let body = question(&format!("case {i}"), stream);
        sim.set_faults(faults);
        let bad = send(&gw, CLIENT_KEY, &body, None).await;
        assert_eq!(bad.cache, "miss", "{case}");
        sim.set_faults(Faults::default());
        // Forget the 429's cooldown.
        let reset = client()
            .post(format!("{}/admin/upstreams/a/reset", gw.url))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap();
        assert_eq!(reset.status(), 200);
        assert_eq!(
            send(&gw, CLIENT_KEY, &body, None).await.cache,
            "miss",
            "{case} was stored"
        );
        assert_eq!(send(&gw, CLIENT_KEY, &body, None).await.cache, "hit", "{case}");
    }
    assert_eq!(cache_metric(&gw, "not_stored").await, 4.0, "one per case");

    // A client that leaves mid-stream.
    sim.set_faults(Faults {
        stall_after: Some(2),
        ..Faults::default()
    });
    let body = question("the client leaves", true);
    let mut r = client()
        .post(gw.v1("/chat/completions"))
        .bearer_auth(CLIENT_KEY)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert!(r.chunk().await.unwrap().is_some());
    drop(r);
    wait_for(Duration::from_secs(5), || async {
        cache_metric(&gw, "not_stored").await == 5.0
    })
    .await;
    sim.release();
    sim.set_faults(Faults::default());
    assert_eq!(send(&gw, CLIENT_KEY, &body, None).await.cache, "miss");
}

#[tokio::test]
async fn answers_over_max_entry_bytes_are_served_not_stored() {
    let sim = Sim::start("a", Faults::default()).await.unwrap();
    let gw = gateway(&sim, "{}", "max_entry_bytes = 200").await;
    let body = question("a long answer", false);
    let first = send(&gw, CLIENT_KEY, &body, None).await;
    assert!(first.body.len() > 200);
    assert_eq!(send(&gw, CLIENT_KEY, &body, None).await.cache, "miss");
    assert_eq!(cache_metric(&gw, "not_stored").await, 2.0);
    assert_eq!(cache_metric(&gw, "stored").await, 0.0);
}

#[tokio::test]
async fn identical_concurrent_misses_make_one_upstream_call() {
    let sim = Sim::start(
        "a",
        Faults {
            header_delay: Duration::from_millis(300),
            ..Faults::default()
        },
    )
    .await
    .unwrap();
    let config = cached_config(&sim, "{}", "").replace("[retry]\n", "[retry]\nmax_attempts = 1\n");
    let gw = Gateway::start(&config, &[]).await;
    let body = question("everyone asks this", false);
    let sent = send_concurrently(&gw, 20, 20, &body).await;
    assert!(sent.iter().all(|s| s.status == 200), "all 20 answered");
    assert!(sent.iter().all(|s| s.body == sent[0].body), "with the one answer");
    assert_eq!(sim.stats().requests, 1, "one upstream call for 20 identical requests");
    assert_eq!(
        sent.iter().filter(|s| s.headers["x-relaygate-cache"] == "miss").count(),
        1,
        "one leader; the rest are served from its answer"
    );

    // The leader's upstream fails: the leader gets its own error, and the
    // waiters are not handed it: one of them leads, and the rest share its answer.
    sim.set_faults(Faults {
        header_delay: Duration::from_millis(300),
        status: Some(500),
        status_times: Some(1),
        ..Faults::default()
    });
    let body = question("the first try fails", false);
    let sent = send_concurrently(&gw, 20, 20, &body).await;
    let failed: Vec<&Sent> = sent.iter().filter(|s| s.status != 200).collect();
    assert_eq!(failed.len(), 1, "only the failed leader's own client sees its error");
    assert_eq!(failed[0].status, 500, "the upstream's own 500");
    let ok: Vec<&Sent> = sent.iter().filter(|s| s.status == 200).collect();
    assert!(ok.iter().all(|s| s.body == ok[0].body));
    assert_eq!(sim.stats().requests, 3, "the failed call and one more");
    assert_eq!(gw.state.cache().unwrap().flights_in_progress(), 0);
}

#[tokio::test]
async fn admin_purges_and_a_reload_with_new_targets_misses() {
    let sim = Sim::start("a", Faults::default()).await.unwrap();
    let base = cached_config(&sim, "{}", "");
    let path = temp_file("relaygate.toml", &base);
    let gw = Gateway::from_file(&path).await;
    let state = gw.state.clone();
    let url = gw.url.clone();
    let gw_url = |p: &str| format!("{url}{p}");
    let ask = |text: &'static str| {
        let url = url.clone();
        async move {
            let r = client()
                .post(format!("{url}/v1/chat/completions"))
                .bearer_auth(CLIENT_KEY)
                .json(&question(text, false))
                .send()
                .await
                .unwrap();
            r.headers()["x-relaygate-cache"].to_str().unwrap().to_owned()
        }
    };
    assert_eq!(ask("one").await, "miss");
    assert_eq!(ask("two").await, "miss");
    assert_eq!(ask("one").await, "hit");

    let admin = |method: reqwest::Method, path: &str| {
        let request = client().request(method, gw_url(path)).bearer_auth(ADMIN);
        async move { request.send().await.unwrap().json::<Value>().await.unwrap() }
    };
    let stats = admin(reqwest::Method::GET, "/admin/cache").await;
    assert_eq!(stats["backend"], "memory");
    let model = &stats["models"][0];
    assert_eq!(
        (model["model"].as_str(), model["entries"].as_u64()),
        (Some("deepseek-chat"), Some(2))
    );
    assert!(model["bytes"].as_u64().unwrap() > 100);
    assert_eq!(model["hit_ratio"].as_f64(), Some(1.0 / 3.0));
    assert_eq!(
        client().get(gw_url("/admin/cache")).send().await.unwrap().status(),
        401,
        "admin only"
    );

    let purged = admin(reqwest::Method::DELETE, "/admin/cache?model=deepseek-chat").await;
    assert_eq!(purged["entries_removed"], 2);
    assert_eq!(ask("one").await, "miss", "purged");
    assert_eq!(ask("one").await, "hit");

    // A reload that changes the model's target: the old entries are not served.
    std::fs::write(
        &path,
        base.replace("model = \"deepseek-v3.2\"", "model = \"deepseek-v3.2-exp\""),
    )
    .unwrap();
    state.reload().unwrap();
    assert_eq!(ask("one").await, "miss", "the old target's answer is not served");
    let sent: Value = serde_json::from_slice(&sim.last_request().unwrap().body).unwrap();
    assert_eq!(sent["model"], "deepseek-v3.2-exp");
    assert_eq!(ask("one").await, "hit");

    let all = admin(reqwest::Method::DELETE, "/admin/cache").await;
    assert_eq!(all["entries_removed"], 2, "one: the old target's and the new one's");
    let text = serde_json::to_string(&stats).unwrap() + &all.to_string();
    for secret in [CLIENT_KEY, KEY_B, ADMIN, "sk-upstream-a-secret"] {
        assert!(!text.contains(secret), "a secret in the admin output");
    }
}

#[tokio::test]
async fn rate_limits_count_a_hit_as_a_client_request_only() {
    let sim = Sim::start("a", Faults::default()).await.unwrap();
    let config = format!(
        "{}\n[[rate_limits]]\nname = \"per-key\"\nscope = \"key\"\nrequests_per_minute = 3\nburst = 3\n\n\
         [[rate_limits]]\nname = \"per-model\"\nscope = \"model\"\nrequests_per_minute = 1\nburst = 1\n",
        cached_config(&sim, "{}", "")
    );
    let gw = Gateway::start(&config, &[]).await;
    let body = question("limits", false);
    let mut seen = Vec::new();
    for _ in 0..4 {
        let a = send(&gw, CLIENT_KEY, &body, None).await;
        seen.push((a.status, a.cache));
    }
    // The model rule (1 a minute) let the two hits through: hits reach no
    // model. The key rule (3 a minute) counted them: they are requests.
    let expected = [(200, "miss"), (200, "hit"), (200, "hit"), (429, "hit")];
    assert_eq!(seen, expected.map(|(s, c)| (s, c.to_owned())));
    assert_eq!(
        gw.metric(r#"relaygate_rate_limited_total{scope="key",rule="per-key"}"#)
            .await,
        1.0
    );
    // B's miss goes upstream, so the model rule counts it.
    let b = send(&gw, KEY_B, &body, None).await;
    assert_eq!((b.status, b.cache.as_str()), (429, "miss"));
    assert_eq!(
        gw.metric(r#"relaygate_rate_limited_total{scope="model",rule="per-model"}"#)
            .await,
        1.0
    );
    assert_eq!(sim.stats().requests, 1);
}

#[tokio::test]
async fn the_openai_sdk_sees_hits_identical_to_misses() {
    let Some(python) = sdk_python() else { return };
    let sim = Sim::start(
        "a",
        Faults {
            reasoning_chunks: 2,
            tool_call: true,
            ..Faults::default()
        },
    )
    .await
    .unwrap();
    let gw = gateway(&sim, "{}", "").await;
    let stdout = run_sdk_script(&python, "cache_sdk.py", &gw, &[]).await;
    assert!(stdout.contains("ALL OK"), "{stdout}");
    // Plain: one call; streamed with and without usage: one call.
    assert_eq!(sim.stats().requests, 2);
}

async fn spawn_gateway(config: &str) -> Proc {
    let path = temp_file("relaygate.toml", config);
    Proc::spawn_quiet(&["serve", "--config", path.to_str().unwrap(), "--listen", "127.0.0.1:0"]).await
}

async fn post_to(url: &str, body: &Value) -> (u16, String) {
    let r = client()
        .post(format!("{url}/v1/chat/completions"))
        .bearer_auth(CLIENT_KEY)
        .json(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let cache = r.headers()["x-relaygate-cache"].to_str().unwrap().to_owned();
    (status, cache)
}

async fn metric_of(url: &str, series: &str) -> f64 {
    let text = reqwest::get(format!("{url}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    metric_value(&text, series)
}

#[tokio::test]
async fn two_processes_share_entries_in_redis_and_survive_its_loss() {
    let mut redis = RedisServer::start().await;
    let sim = Sim::start("a", Faults::default()).await.unwrap();
    let prefix = format!("rg-{}", fastrand::u32(..));
    let config = cached_config(
        &sim,
        "{}",
        &format!(
            "backend = \"redis\"\nredis_url = \"{}\"\nredis_timeout = \"200ms\"",
            redis.url()
        ),
    ) + &format!("\n[rate_limit]\nkey_prefix = \"{prefix}\"\n");
    let (one, two) = (spawn_gateway(&config).await, spawn_gateway(&config).await);
    let body = question("shared across replicas", false);
    assert_eq!(post_to(&one.url, &body).await, (200, "miss".into()));
    // The store is written in the background: poll the other replica.
    wait_for(Duration::from_secs(5), || async {
        post_to(&two.url, &body).await.1 == "hit"
    })
    .await;
    assert_eq!(sim.stats().requests, 1, "the second replica was served from Redis");

    // Keys hold the model and the hash, never a client key.
    let keys = redis_cli(&redis, &["--scan", "--pattern", &format!("{{{prefix}}}:cache:*")]).await;
    assert_eq!(keys.lines().count(), 1, "{keys}");
    assert!(
        keys.starts_with(&format!("{{{prefix}}}:cache:deepseek-chat:")),
        "{keys}"
    );
    assert!(!keys.contains(CLIENT_KEY) && !keys.contains("app-a"));

    redis.kill();
    let errors = r#"relaygate_cache_backend_errors_total"#;
    for i in 0..3 {
        let started = Instant::now();
        let (status, cache) = post_to(&one.url, &question(&format!("redis is down {i}"), false)).await;
        assert_eq!((status, cache.as_str()), (200, "miss"));
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "bounded by redis_timeout, not stuck"
        );
    }
    assert!(metric_of(&one.url, errors).await >= 1.0);
    assert_eq!(sim.stats().requests, 4);
}

async fn redis_cli(redis: &RedisServer, args: &[&str]) -> String {
    let port = redis.url().rsplit(':').next().unwrap().trim_end_matches('/').to_owned();
    let out = tokio::process::Command::new("redis-cli")
        .args(["-p", &port])
        .args(args)
        .output()
        .await
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Polls `check` until it holds, failing after `within`.
async fn wait_for<F, Fut>(within: Duration, check: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !check().await {
        assert!(Instant::now() < deadline, "condition not met within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
