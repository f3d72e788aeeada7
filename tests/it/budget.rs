//! Spend budgets through the gateway (docs/budgets.md): exactness under
//! concurrency, locally and across two processes on one Redis; charging
//! from real or estimated usage; the ledger rebuild; Redis outages; the
//! 429 as the OpenAI SDK sees it; warn budgets; shadows.

use std::time::{Duration, Instant};

use relaygate::sim::{Faults, Sim};
use serde_json::{json, Value};

use crate::common::process::{temp_dir, temp_file, Proc};
use crate::common::*;
use crate::redis_support::RedisServer;

const ADMIN_KEY: &str = "sk-admin-key-for-tests-000";
/// Output at $2,000 a million tokens and free input: the simulator's 5
/// completion tokens cost exactly $0.01, which is also what a request with
/// `max_tokens = 5` reserves. A budget of $0.10 is worth exactly 10.
const EXACT_PRICE: &str = "price = { input_per_mtok = 0.0, output_per_mtok = 2000.0 }";
const DEFAULT_PRICE: &str = "price = { input_per_mtok = 0.28, output_per_mtok = 0.42, cached_input_per_mtok = 0.028 }";

/// The harness config with `extra` TOML before the first `[[upstreams]]`.
fn with(base: String, extra: &str) -> String {
    let at = base.find("[[upstreams]]").unwrap();
    format!("{}{extra}\n{}", &base[..at], &base[at..])
}

fn exact(base: String, extra: &str) -> String {
    with(base.replace(DEFAULT_PRICE, EXACT_PRICE), extra)
}

fn five_tokens() -> Value {
    let mut body = chat(false);
    body["max_tokens"] = json!(5);
    body
}

/// `GET /admin/budgets` of the gateway at `url`.
async fn report(url: &str) -> Value {
    client()
        .get(format!("{url}/admin/budgets"))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// A budget's spend (its only name, or `name`) as `/admin/budgets` shows it.
fn spent_in(report: &Value, budget: &str, name: &str) -> f64 {
    let b = report["budgets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == budget)
        .unwrap_or_else(|| panic!("no budget {budget} in {report}"));
    b["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == name)
        .map_or(0.0, |n| n["spent_usd"].as_f64().unwrap())
}

async fn wait_spent(url: &str, budget: &str, name: &str, want: f64) {
    eventually(Duration::from_secs(5), &format!("{budget} spent {want}"), || async {
        (spent_in(&report(url).await, budget, name) - want).abs() < 1e-9
    })
    .await;
}

fn usage_cost(body: &[u8], per_mtok_out: f64) -> f64 {
    let v: Value = serde_json::from_slice(body).unwrap();
    v["usage"]["completion_tokens"].as_f64().unwrap() * per_mtok_out / 1e6
}

#[tokio::test]
async fn fifty_concurrent_requests_against_a_budget_worth_ten_admit_exactly_ten() {
    let sim = Sim::start("a", Faults::default()).await.unwrap();
    let config = exact(
        config_for(&[("a", &sim)]),
        "[[budgets]]\nname = \"app-a-daily\"\nscope = \"key\"\nmatch = \"app-a\"\nusd = 0.1\nperiod = \"day\"\n",
    );
    let gw = Gateway::start(&config, &[]).await;
    let responses = send_concurrently(&gw, 50, 50, &five_tokens()).await;
    let (ok, refused): (Vec<_>, Vec<_>) = responses.into_iter().partition(|r| r.status == 200);
    assert_eq!(ok.len(), 10, "exactly the budget");
    assert_eq!(sim.stats().requests, 10, "refused requests never reach the upstream");
    let r = &refused[0];
    assert_eq!(r.status, 429);
    assert_eq!(r.headers["x-should-retry"], "false");
    assert_eq!(r.headers["x-relaygate-budget"], "app-a-daily");
    let retry_after: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=86_400).contains(&retry_after), "{retry_after}");
    let body: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(body["error"]["type"], "insufficient_quota");
    assert_eq!(body["error"]["code"], "insufficient_quota");
    let message = body["error"]["message"].as_str().unwrap();
    for part in ["'app-a-daily'", "key 'app-a'", "per day", "of $0.10", "resets at"] {
        assert!(message.contains(part), "{part} in {message}");
    }
    assert!(!message.contains(CLIENT_KEY), "{message}");
    // The settled spend is the sum of what the upstream's usage costs.
    let expected: f64 = ok.iter().map(|r| usage_cost(&r.body, 2000.0)).sum();
    assert!((expected - 0.1).abs() < 1e-9, "{expected}");
    wait_spent(&gw.url, "app-a-daily", "app-a", expected).await;
    let m = gw.metrics().await;
    assert_eq!(
        metric_value(&m, r#"relaygate_budget_rejections_total{budget="app-a-daily"}"#),
        40.0
    );
    assert_eq!(
        metric_value(&m, r#"relaygate_budget_spent_usd{budget="app-a-daily"}"#),
        0.1
    );
    assert_eq!(
        metric_value(&m, r#"relaygate_budget_reserved_usd{budget="app-a-daily"}"#),
        0.0
    );
    assert_eq!(
        metric_value(&m, r#"relaygate_budget_limit_usd{budget="app-a-daily"}"#),
        0.1
    );
    assert_eq!(
        metric_value(&m, r#"relaygate_budget_threshold_crossed_total{budget="app-a-daily"}"#),
        2.0,
        "0.8 and 0.95, once each"
    );
}

async fn spawn_gateway(config: &str) -> Proc {
    let path = temp_file("relaygate.toml", config);
    Proc::spawn_quiet(&["serve", "--config", path.to_str().unwrap(), "--listen", "127.0.0.1:0"]).await
}

#[tokio::test]
async fn two_processes_on_one_redis_admit_ten_between_them() {
    let redis = RedisServer::start().await;
    let sim = Sim::start("a", Faults::default()).await.unwrap();
    let config = exact(
        config_for(&[("a", &sim)]),
        &format!(
            "[rate_limit]\nredis_url = \"{}\"\nbackend = \"redis\"\nkey_prefix = \"rg-{}\"\nexpected_instances = 2\n\n\
             [budget]\nbackend = \"redis\"\n\n\
             [[budgets]]\nname = \"shared\"\nscope = \"global\"\nusd = 0.1\nperiod = \"month\"\n",
            redis.url(),
            fastrand::u32(..)
        ),
    );
    let (one, two) = (spawn_gateway(&config).await, spawn_gateway(&config).await);
    let c = client();
    let mut tasks = Vec::new();
    for i in 0..50 {
        let url = format!("{}/v1/chat/completions", if i % 2 == 0 { &one.url } else { &two.url });
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let r = c
                .post(url)
                .bearer_auth(CLIENT_KEY)
                .json(&five_tokens())
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.bytes().await.unwrap())
        }));
    }
    let mut costs = Vec::new();
    for t in tasks {
        let (status, body) = t.await.unwrap();
        assert!(status == 200 || status == 429, "{status}");
        if status == 200 {
            costs.push(usage_cost(&body, 2000.0));
        }
    }
    assert_eq!(costs.len(), 10, "the shared budget, not twice it");
    assert_eq!(sim.stats().requests, 10);
    // Both read the same spend from Redis: the sum of the usage.
    let expected: f64 = costs.iter().sum();
    wait_spent(&one.url, "shared", "*", expected).await;
    let r = report(&two.url).await;
    assert!((spent_in(&r, "shared", "*") - expected).abs() < 1e-9);
    assert_eq!(r["budgets"][0]["source"], "redis");
    assert_eq!(r["budgets"][0]["buckets"][0]["reserved_usd"], 0.0);
}

#[tokio::test]
async fn streams_and_a_client_that_leaves_are_charged_their_real_or_estimated_usage() {
    let sim = Sim::start(
        "a",
        Faults {
            cached_tokens: 3,
            chunks: 40,
            chunk_interval: Duration::from_millis(20),
            ..Faults::default()
        },
    )
    .await
    .unwrap();
    let config = with(
        config_for(&[("a", &sim)]),
        "[[budgets]]\nname = \"all\"\nscope = \"global\"\nusd = 5\nperiod = \"day\"\non_exceed = \"warn\"\n",
    );
    let gw = Gateway::start(&config, &[]).await;
    let cost_total = || async { gw.metric("relaygate_cost_usd_total").await };
    // A whole stream: charged from its usage chunk (stripped before the
    // client), cached prompt tokens at their own price: the same cost as
    // relaygate_cost_usd_total.
    let mut body = chat(true);
    body["max_tokens"] = json!(4000);
    let reservation = 4000.0 * 0.42 / 1e6;
    read_all(post_chat(&gw, &body).await).await;
    eventually(Duration::from_secs(5), "the stream is settled", || async {
        let spent = spent_in(&report(&gw.url).await, "all", "*");
        spent > 0.0 && (spent - cost_total().await).abs() < 2e-6
    })
    .await;
    let whole = spent_in(&report(&gw.url).await, "all", "*");
    assert!(whole > 0.0 && whole < reservation / 10.0, "{whole}");
    // A client that leaves after the first events: no usage chunk came, so
    // the estimate from what was streamed, flagged as estimated.
    let mut resp = post_chat(&gw, &body).await;
    let mut buf = Vec::new();
    read_until(&mut resp, &mut buf, |b| content_chunks(b) >= 3).await;
    drop(resp);
    eventually(Duration::from_secs(5), "the abandoned stream is settled", || async {
        spent_in(&report(&gw.url).await, "all", "*") > whole
    })
    .await;
    let left = spent_in(&report(&gw.url).await, "all", "*") - whole;
    assert!(left > 0.0, "never $0");
    assert!(left < reservation / 10.0, "never the whole reservation: {left}");
    assert!((spent_in(&report(&gw.url).await, "all", "*") - cost_total().await).abs() < 2e-6);
    let m = gw.metrics().await;
    assert_eq!(
        metric_value(&m, "relaygate_usage_estimated_total"),
        1.0,
        "flagged as estimated"
    );
    // A failed request costs nothing.
    sim.set_faults(Faults {
        status: Some(500),
        ..Faults::default()
    });
    let before = spent_in(&report(&gw.url).await, "all", "*");
    assert!(post_chat(&gw, &chat(false)).await.status().is_server_error());
    eventually(Duration::from_secs(5), "nothing reserved", || async {
        report(&gw.url).await["budgets"][0]["buckets"][0]["reserved_usd"] == 0.0
    })
    .await;
    assert_eq!(spent_in(&report(&gw.url).await, "all", "*"), before);
}

#[tokio::test]
async fn the_local_backend_restarted_with_a_ledger_keeps_its_spend() {
    let sim = Sim::start("a", Faults::default()).await.unwrap();
    let ledger = temp_dir().join("usage.jsonl");
    let config = exact(
        config_for(&[("a", &sim)]),
        &format!(
            "[ledger]\npath = \"{}\"\n\n[[budgets]]\nname = \"monthly\"\nscope = \"model\"\nmatch = \"deepseek-chat\"\nusd = 0.05\nperiod = \"month\"\n",
            ledger.display()
        ),
    );
    let mut gw = Gateway::start(&config, &[]).await;
    for _ in 0..3 {
        assert_eq!(post_chat(&gw, &five_tokens()).await.status(), 200);
    }
    wait_spent(&gw.url, "monthly", "deepseek-chat", 0.03).await;
    gw.begin_shutdown();
    gw.stopped().await.unwrap();
    let gw = Gateway::start(&config, &[]).await;
    assert_eq!(spent_in(&report(&gw.url).await, "monthly", "deepseek-chat"), 0.03);
    let statuses = send_concurrently(&gw, 5, 5, &five_tokens()).await;
    assert_eq!(
        statuses.iter().filter(|r| r.status == 200).count(),
        2,
        "what was left after the restart"
    );
}

#[tokio::test]
async fn redis_killed_fails_open_at_a_share_and_the_spend_reaches_redis_when_it_returns() {
    let mut redis = RedisServer::start().await;
    let sim = Sim::start("a", Faults::default()).await.unwrap();
    let config = exact(
        config_for(&[("a", &sim)]),
        &format!(
            "[budget]\nbackend = \"redis\"\nredis_url = \"{}\"\nexpected_instances = 2\n\n\
             [[budgets]]\nname = \"shared\"\nscope = \"global\"\nusd = 0.1\nperiod = \"total\"\n",
            redis.url()
        ),
    );
    let gw = Gateway::start(&config, &[]).await;
    assert_eq!(post_chat(&gw, &five_tokens()).await.status(), 200);
    wait_spent(&gw.url, "shared", "*", 0.01).await;
    redis.kill();
    // Fail open: this process enforces its share, $0.10 / 2.
    let mut admitted = 0;
    for _ in 0..8 {
        let r = post_chat(&gw, &five_tokens()).await;
        assert!(r.status() == 200 || r.status() == 429, "{}", r.status());
        if r.status() == 429 {
            assert_eq!(r.headers()["x-relaygate-budget"], "shared");
            assert!(
                r.headers().get("retry-after").is_none(),
                "a total budget does not reset"
            );
        }
        admitted += usize::from(r.status() == 200);
    }
    assert_eq!(admitted, 5);
    assert_eq!(gw.metric("relaygate_budget_fallback_active").await, 1.0);
    assert!(gw.metric("relaygate_budget_backend_errors_total").await >= 1.0);
    eventually(Duration::from_secs(5), "the fallback's settles are owed", || async {
        report(&gw.url).await["pending_settles"].as_u64().unwrap() >= 1
    })
    .await;
    // Back, empty (nothing persisted): the spend of the outage is added.
    redis.restart().await;
    eventually(Duration::from_secs(10), "the owed spend reaches Redis", || async {
        let r = report(&gw.url).await;
        r["pending_settles"] == 0
            && r["budgets"][0]["source"] == "redis"
            && (spent_in(&r, "shared", "*") - 0.05).abs() < 1e-9
    })
    .await;
    assert_eq!(gw.metric("relaygate_budget_fallback_active").await, 0.0);
}

#[tokio::test]
async fn fail_closed_answers_503_fast_and_no_secret_leaks() {
    let sim = Sim::start("a", Faults::default()).await.unwrap();
    let port = closed_port().await;
    let config = with(
        config_for(&[("a", &sim)]),
        &format!(
            "[budget]\nbackend = \"redis\"\nredis_url = \"redis://:hunter2-secret@127.0.0.1:{port}\"\nfail_mode = \"closed\"\n\n\
             [[budgets]]\nname = \"g\"\nscope = \"global\"\nusd = 10\nperiod = \"day\"\n"
        ),
    );
    let gw = Gateway::start(&config, &[]).await;
    let started = Instant::now();
    let r = post_chat(&gw, &chat(false)).await;
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    let body = r.text().await.unwrap();
    assert!(body.contains("\"budget_unavailable\""), "{body}");
    assert_eq!(sim.stats().requests, 0);
    let admin = report(&gw.url).await.to_string();
    for secret in ["hunter2", CLIENT_KEY, "sk-upstream-a-secret", ADMIN_KEY] {
        assert!(!body.contains(secret) && !admin.contains(secret), "{secret} leaked");
    }
    assert!(admin.contains("Redis did not answer"), "{admin}");
}

#[tokio::test]
async fn the_openai_sdk_stops_at_one_request_with_insufficient_quota() {
    let Some(python) = sdk_python() else { return };
    let sim = Sim::start("a", Faults::default()).await.unwrap();
    let config = with(
        config_for(&[("a", &sim)]),
        "[[budgets]]\nname = \"tiny\"\nscope = \"key\"\nusd = 0.000001\nperiod = \"week\"\n",
    );
    let gw = Gateway::start(&config, &[]).await;
    let script = r#"
import os, openai
client = openai.OpenAI(base_url=os.environ["RELAYGATE_BASE_URL"], api_key=os.environ["RELAYGATE_API_KEY"])
assert client.max_retries == 2, client.max_retries
try:
    client.chat.completions.create(model="deepseek-chat", messages=[{"role": "user", "content": "hi"}], max_tokens=100)
    print("NO ERROR")
except openai.RateLimitError as e:
    print("RateLimitError", e.status_code, e.code, e.type)
    print("MESSAGE", e.message)
"#;
    let stdout = run_sdk_script(&python, script, &gw, &[]).await;
    assert!(
        stdout.contains("RateLimitError 429 insufficient_quota insufficient_quota"),
        "{stdout}"
    );
    assert!(stdout.contains("Budget 'tiny'"), "{stdout}");
    let m = gw.metrics().await;
    assert_eq!(
        metric_value(&m, r#"relaygate_requests_total{outcome="rate_limited"}"#),
        1.0,
        "exactly one request reached relaygate: the SDK did not retry"
    );
    assert_eq!(
        metric_value(&m, r#"relaygate_budget_rejections_total{budget="tiny"}"#),
        1.0
    );
}

#[tokio::test]
async fn warn_budgets_never_reject_and_count_each_threshold_once() {
    let sim = Sim::start("a", Faults::default()).await.unwrap();
    let config = exact(
        config_for(&[("a", &sim)]),
        "[[budgets]]\nname = \"soft\"\nscope = \"model\"\nusd = 0.02\nperiod = \"day\"\non_exceed = \"warn\"\nwarn_at = [0.5, 1.0]\n",
    );
    let gw = Gateway::start(&config, &[]).await;
    for _ in 0..6 {
        assert_eq!(post_chat(&gw, &five_tokens()).await.status(), 200);
    }
    wait_spent(&gw.url, "soft", "deepseek-chat", 0.06).await;
    let m = gw.metrics().await;
    assert_eq!(
        metric_value(
            &m,
            r#"relaygate_budget_threshold_crossed_total{budget="soft",threshold="0.5"}"#
        ),
        1.0
    );
    assert_eq!(
        metric_value(
            &m,
            r#"relaygate_budget_threshold_crossed_total{budget="soft",threshold="1"}"#
        ),
        1.0
    );
    assert_eq!(metric_value(&m, "relaygate_budget_rejections_total"), 0.0);
}

#[tokio::test]
async fn shadow_spend_reaches_only_upstream_and_global_budgets() {
    let (a, b) = (
        Sim::start("a", Faults::default()).await.unwrap(),
        Sim::start("b", Faults::default()).await.unwrap(),
    );
    let base = config_for(&[("a", &a), ("b", &b)]).replace(
        DEFAULT_PRICE,
        &format!("{EXACT_PRICE}\nshadow = {{ upstream = \"b\", model = \"candidate\", sample = 1.0 }}"),
    );
    let budget = |name: &str, scope: &str, m: &str| {
        format!("[[budgets]]\nname = \"{name}\"\nscope = \"{scope}\"\n{m}usd = 1\nperiod = \"day\"\n")
    };
    let config = with(
        base,
        &[
            budget("key", "key", "match = \"app-a\"\n"),
            budget("model", "model", ""),
            budget("relay-a", "upstream", "match = \"a\"\n"),
            budget("relay-b", "upstream", "match = \"b\"\n"),
            budget("all", "global", ""),
        ]
        .concat(),
    );
    let gw = Gateway::start(&config, &[]).await;
    assert_eq!(post_chat(&gw, &five_tokens()).await.status(), 200);
    eventually(Duration::from_secs(5), "the shadow ran and settled", || async {
        let r = report(&gw.url).await;
        b.stats().requests == 1 && (spent_in(&r, "all", "*") - 0.02).abs() < 1e-9
    })
    .await;
    let r = report(&gw.url).await;
    assert_eq!(spent_in(&r, "key", "app-a"), 0.01, "the primary only");
    assert_eq!(spent_in(&r, "model", "deepseek-chat"), 0.01, "the primary only");
    assert_eq!(spent_in(&r, "relay-a", "a"), 0.01);
    assert_eq!(spent_in(&r, "relay-b", "b"), 0.01, "the shadow's upstream");
    assert_eq!(spent_in(&r, "all", "*"), 0.02, "both: it is real money");
}

#[tokio::test]
async fn an_exhausted_upstream_budget_fails_over_and_cache_hits_cost_nothing() {
    let (a, b) = (
        Sim::start("a", Faults::default()).await.unwrap(),
        Sim::start("b", Faults::default()).await.unwrap(),
    );
    let base = config_for(&[("a", &a), ("b", &b)])
        .replace(
            r#"targets = [{ upstream = "a", model = "deepseek-v3.2" }]"#,
            r#"targets = [{ upstream = "a", model = "deepseek-v3.2" }, { upstream = "b", model = "deepseek-v3.2", priority = 1 }]"#,
        )
        .replace(DEFAULT_PRICE, &format!("{EXACT_PRICE}\ncache = {{ when = \"always\" }}"));
    let config = with(
        base,
        "[[budgets]]\nname = \"credit-a\"\nscope = \"upstream\"\nmatch = \"a\"\nusd = 0.02\nperiod = \"total\"\n\
         [[budgets]]\nname = \"all\"\nscope = \"global\"\nusd = 1\nperiod = \"day\"\n",
    );
    let gw = Gateway::start(&config, &[]).await;
    let mut served_by = Vec::new();
    for i in 0..4 {
        let mut body = five_tokens();
        body["messages"][0]["content"] = json!(format!("question {i}"));
        let r = post_chat(&gw, &body).await;
        assert_eq!(r.status(), 200);
        served_by.push(r.headers()["x-relaygate-upstream"].to_str().unwrap().to_owned());
        read_all(r).await;
        wait_spent(&gw.url, "all", "*", 0.01 * (i + 1) as f64).await;
    }
    assert_eq!(served_by, ["a", "a", "b", "b"], "a's credit ran out: fail over");
    // The same question again: a cache hit, which reserves and costs nothing.
    let mut body = five_tokens();
    body["messages"][0]["content"] = json!("question 0");
    let r = post_chat(&gw, &body).await;
    assert_eq!(r.headers()["x-relaygate-cache"], "hit");
    let r = report(&gw.url).await;
    assert_eq!(spent_in(&r, "all", "*"), 0.04);
    assert_eq!(spent_in(&r, "credit-a", "a"), 0.02);
}

#[tokio::test]
async fn a_settle_replayed_against_redis_counts_once() {
    use relaygate::budget::{BudgetSettings, Budgets, SystemClock};
    let redis = RedisServer::start().await;
    let text = format!(
        "[[upstreams]]\nname = \"u\"\nbase_url = \"http://127.0.0.1:9\"\n[[models]]\nname = \"m\"\ntargets = [{{ upstream = \"u\" }}]\n\
         [budget]\nbackend = \"redis\"\nredis_url = \"{}\"\n\
         [[budgets]]\nname = \"g\"\nscope = \"global\"\nusd = 1\nperiod = \"day\"\n",
        redis.url()
    );
    let config = relaygate::Config::parse(&text, |_| None).unwrap();
    let settings: BudgetSettings = config.budget.clone();
    let budgets = Budgets::new(
        settings,
        config.budgets.clone(),
        &prometheus::Registry::new(),
        Box::new(SystemClock),
    )
    .await
    .unwrap();
    let settlement = budgets
        .reserve_request("k", "m", 500_000)
        .await
        .unwrap()
        .settlement(1234);
    for _ in 0..3 {
        // As a retry after a timeout would: the same op id each time.
        budgets.apply(&settlement).await;
        budgets.apply(&settlement.clone()).await;
    }
    let r = budgets.report().await;
    assert_eq!(r[0].source, "redis");
    assert_eq!(r[0].buckets[0].spent_usd, 0.001234);
    assert_eq!(r[0].buckets[0].reserved_usd, 0.0);
    // A second request settles on top, once.
    let s2 = budgets.reserve_request("k", "m", 10).await.unwrap().settlement(6);
    budgets.apply(&s2).await;
    budgets.apply(&s2).await;
    assert_eq!(budgets.report().await[0].buckets[0].spent_usd, 0.00124);
}

#[tokio::test]
async fn usage_by_budget_reconciles_the_ledger_with_the_counters() {
    use relaygate::cmd::usage::{budgets, GroupBy, UsageArgs};
    let sim = Sim::start("a", Faults::default()).await.unwrap();
    let ledger = temp_dir().join("usage.jsonl");
    let config = exact(
        config_for(&[("a", &sim)]),
        &format!(
            "[ledger]\npath = \"{}\"\n\n[[budgets]]\nname = \"per-key\"\nscope = \"key\"\nusd = 1\nperiod = \"week\"\n",
            ledger.display()
        ),
    );
    let path = temp_file("relaygate.toml", &config);
    let mut gw = Gateway::start(&config, &[]).await;
    for _ in 0..3 {
        assert_eq!(post_chat(&gw, &five_tokens()).await.status(), 200);
    }
    wait_spent(&gw.url, "per-key", "app-a", 0.03).await;
    // The ledger is written in batches: wait for its three lines.
    eventually(Duration::from_secs(5), "three ledger lines", || async {
        std::fs::read_to_string(&ledger).map_or(0, |t| t.lines().count()) == 3
    })
    .await;
    let args = UsageArgs {
        ledger: ledger.clone(),
        since: None,
        by: GroupBy::Budget,
        include_shadow: false,
        config: Some(path.clone()),
        gateway: Some(gw.url.clone()),
    };
    let (table, differs) = budgets(&args).await.unwrap();
    assert!(!differs, "{table}");
    assert!(table.contains("ledger and counters agree"), "{table}");
    let row = table.lines().find(|l| l.starts_with("per-key")).unwrap();
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(
        cells[1..],
        ["app-a", cells[2], "1.000000", "0.030000", "0.030000", "+0.000000"]
    );
    // One more request the ledger has not seen (as if its line was lost).
    gw.begin_shutdown();
    gw.stopped().await.unwrap();
    let text = std::fs::read_to_string(&ledger).unwrap();
    std::fs::write(&ledger, text.lines().take(2).collect::<Vec<_>>().join("\n")).unwrap();
    let gw = Gateway::start(
        &config.replace(
            &ledger.display().to_string(),
            &temp_dir().join("other.jsonl").display().to_string(),
        ),
        &[],
    )
    .await;
    assert_eq!(post_chat(&gw, &five_tokens()).await.status(), 200);
    wait_spent(&gw.url, "per-key", "app-a", 0.01).await;
    let (table, differs) = budgets(&UsageArgs {
        gateway: Some(gw.url.clone()),
        ..args
    })
    .await
    .unwrap();
    assert!(differs, "{table}");
    assert!(table.contains("DIFFERENCE in per-key/app-a"), "{table}");
    assert!(table.contains("-0.010000"), "{table}");
}

#[tokio::test]
async fn named_time_zones_align_periods_and_check_refuses_unknown_ones() {
    let sim = Sim::start("a", Faults::default()).await.unwrap();
    let budgets = "[[budgets]]\nname = \"paris\"\nscope = \"global\"\nusd = 1\nperiod = \"day\"\ntimezone = \"Europe/Paris\"\n\n\
                   [[budgets]]\nname = \"ny\"\nscope = \"global\"\nusd = 1\nperiod = \"month\"\ntimezone = \"america/new_york\"\n";
    let config = exact(config_for(&[("a", &sim)]), budgets);
    let gw = Gateway::start(&config, &[]).await;
    assert_eq!(post_chat(&gw, &five_tokens()).await.status(), 200);
    wait_spent(&gw.url, "paris", "*", 0.01).await;
    let report = report(&gw.url).await;
    let unix = |v: &Value| {
        humantime::parse_rfc3339(v.as_str().unwrap())
            .unwrap()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    };
    for (name, zone, utc_hours, lengths) in [
        // Paris midnight is 22:00 UTC in summer, 23:00 in winter; a day is
        // 23, 24 or 25 hours.
        ("paris", "Europe/Paris", [22, 23], 23..=25),
        // New York's is 04:00 or 05:00 UTC; a month 28 to 31 days, ± 1 hour.
        ("ny", "America/New_York", [4, 5], 28 * 24 - 1..=31 * 24 + 1),
    ] {
        let b = report["budgets"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["name"] == name)
            .unwrap();
        assert_eq!(b["timezone"], zone, "the database's spelling: {b}");
        let (start, end) = (unix(&b["period_start"]), unix(&b["resets_at"]));
        assert_eq!(start % 3600, 0, "{b}");
        assert!(utc_hours.contains(&(start.rem_euclid(86_400) / 3600)), "{b}");
        assert!(lengths.contains(&((end - start) / 3600)), "{b}");
    }

    // `relaygate check` names the key of a zone that does not exist.
    let bad = temp_file(
        "bad-zone.toml",
        &config.replace("\"america/new_york\"", "\"Mars/Olympus\""),
    );
    let out = tokio::process::Command::new(crate::common::process::BIN)
        .args(["check", "--config", bad.to_str().unwrap()])
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("budgets[1].timezone: \"Mars/Olympus\" is not a time zone"),
        "{err}"
    );
}
