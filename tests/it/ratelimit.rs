//! The rate-limiting engine (`relaygate::ratelimit`), local and on a real
//! `redis-server` (started per test on an ephemeral port).
//!
//! Local tests that depend on time run on tokio's paused clock, so their
//! numbers are exact. Redis tests run on real time (Redis's `TIME` is the
//! clock) with limits whose refill is slow next to the test, or with bounds
//! that account for the elapsed time. Nothing sleeps to synchronise: waits
//! are polls under a deadline.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus::{Encoder, Registry, TextEncoder};
use relaygate::ratelimit::{validate, Admission, Limiter, RawRateLimit, RawRule, Rejection, Scope};
use serde::Deserialize;
use tokio::sync::Barrier;
use tokio::time::Instant;

use crate::redis_support::RedisServer;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    rate_limit: Option<RawRateLimit>,
    #[serde(default)]
    rate_limits: Vec<RawRule>,
}

/// A limiter from TOML (`[rate_limit]` and `[[rate_limits]]`), with its own registry.
async fn limiter(toml_text: &str) -> (Limiter, Registry) {
    let file: File = toml::from_str(toml_text).expect("test TOML parses");
    let (settings, rules) = validate(file.rate_limit, file.rate_limits).expect("test config is valid");
    let registry = Registry::new();
    let limiter = Limiter::new(settings, rules, &registry).await.expect("limiter builds");
    (limiter, registry)
}

/// `[rate_limit]` for a Redis backend. Exactness tests use a generous
/// timeout so that a loaded test machine never falls back by accident (and
/// they check that it did not).
fn redis_table(redis: &RedisServer, extra: &str) -> String {
    format!(
        "[rate_limit]\nbackend = \"redis\"\nredis_url = \"{}\"\n{extra}\n",
        redis.url()
    )
}

/// The value of one series in the registry's text exposition, 0 if absent.
fn sample(registry: &Registry, series: &str) -> f64 {
    let mut out = Vec::new();
    TextEncoder::new().encode(&registry.gather(), &mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

fn backend_errors(registry: &Registry) -> f64 {
    sample(registry, "relaygate_ratelimit_backend_errors_total")
}

fn fallback_active(registry: &Registry) -> f64 {
    sample(registry, "relaygate_ratelimit_fallback_active")
}

fn rate_limited(registry: &Registry, scope: &str, rule: &str) -> f64 {
    sample(
        registry,
        &format!("relaygate_rate_limited_total{{rule=\"{rule}\",scope=\"{scope}\"}}"),
    )
}

fn queue_waits(registry: &Registry, result: &str) -> f64 {
    sample(
        registry,
        &format!("relaygate_ratelimit_queue_wait_seconds_count{{result=\"{result}\"}}"),
    )
}

fn header<'a>(headers: &'a http::HeaderMap, name: &str) -> &'a str {
    headers
        .get(name)
        .unwrap_or_else(|| panic!("missing {name} in {headers:?}"))
        .to_str()
        .unwrap()
}

fn remaining(headers: &http::HeaderMap, family: &str) -> u64 {
    header(headers, &format!("x-ratelimit-remaining-{family}"))
        .parse()
        .unwrap()
}

/// `tasks` callers start together (a barrier) and each makes one request
/// for `key`, spread over `limiters`. Returns how many were admitted.
async fn burst(limiters: &[Limiter], tasks: usize, key: &str) -> usize {
    let barrier = Arc::new(Barrier::new(tasks));
    let mut handles = Vec::with_capacity(tasks);
    for i in 0..tasks {
        let limiter = limiters[i % limiters.len()].clone();
        let barrier = barrier.clone();
        let key = key.to_owned();
        handles.push(tokio::spawn(async move {
            barrier.wait().await;
            limiter.admit_request(&key, "m", 0).await.is_ok()
        }));
    }
    let mut admitted = 0;
    for h in handles {
        admitted += usize::from(h.await.unwrap());
    }
    admitted
}

/// Admits until refused; returns the count.
async fn drain(limiter: &Limiter, key: &str, max: usize) -> usize {
    for n in 0..max {
        if limiter.admit_request(key, "m", 0).await.is_err() {
            return n;
        }
    }
    panic!("{key}: still admitting after {max}");
}

/// Polls `admit_request` on fresh keys until the fallback gauge is 0 again.
async fn wait_for_shared_limits(limiter: &Limiter, registry: &Registry) {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut n = 0;
    while fallback_active(registry) != 0.0 {
        assert!(Instant::now() < deadline, "Redis never came back into use");
        let _ = limiter.admit_request(&format!("probe-{n}"), "m", 0).await;
        n += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------
// Exactness under concurrency
// ---------------------------------------------------------------------------

/// One request per minute refills: during the test only the burst counts.
const BURST_20: &str = "[[rate_limits]]\nscope = \"key\"\nrequests_per_minute = 1\nburst = 20\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn local_burst_from_many_tasks_admits_exactly_the_limit() {
    let (l, registry) = limiter(BURST_20).await;
    assert_eq!(burst(std::slice::from_ref(&l), 200, "app-a").await, 20);
    assert_eq!(rate_limited(&registry, "key", "key:*"), 180.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_burst_from_many_tasks_admits_exactly_the_limit() {
    let redis = RedisServer::start().await;
    let (l, registry) = limiter(&format!("{}{BURST_20}", redis_table(&redis, "redis_timeout = \"5s\""))).await;
    assert_eq!(burst(std::slice::from_ref(&l), 200, "app-a").await, 20);
    assert_eq!(backend_errors(&registry), 0.0, "no call fell back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_limiters_sharing_one_redis_admit_the_shared_limit_once() {
    let redis = RedisServer::start().await;
    let config = format!("{}{BURST_20}", redis_table(&redis, "redis_timeout = \"5s\""));
    let (a, registry_a) = limiter(&config).await;
    let (b, registry_b) = limiter(&config).await;
    // Two gateways, 100 callers each: 20 in total, not 40.
    assert_eq!(burst(&[a.clone(), b.clone()], 200, "app-a").await, 20);
    // And both see the shared bucket empty.
    assert!(a.admit_request("app-a", "m", 0).await.is_err());
    assert!(b.admit_request("app-a", "m", 0).await.is_err());
    assert_eq!(backend_errors(&registry_a) + backend_errors(&registry_b), 0.0);
}

/// Callers hammer one global limit for a while: what is admitted never
/// exceeds the burst plus the refill over the elapsed time, and nothing is
/// left unused either (beyond scheduling slack).
async fn sustained(limiters: &[Limiter], tasks: usize) -> (u64, Duration) {
    let admitted = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let run_for = Duration::from_millis(1200);
    let mut handles = Vec::new();
    for i in 0..tasks {
        let limiter = limiters[i % limiters.len()].clone();
        let admitted = admitted.clone();
        handles.push(tokio::spawn(async move {
            while started.elapsed() < run_for {
                if limiter.admit_request(&format!("k{i}"), "m", 0).await.is_ok() {
                    admitted.fetch_add(1, Ordering::Relaxed);
                }
                tokio::task::yield_now().await;
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    (admitted.load(Ordering::Relaxed), started.elapsed())
}

/// 600 rpm = 10 per second, burst 5.
const TEN_PER_SECOND: &str = "[[rate_limits]]\nscope = \"global\"\nrequests_per_minute = 600\nburst = 5\n";

fn assert_within_limit(admitted: u64, elapsed: Duration) {
    let most = 5 + (elapsed.as_secs_f64() * 10.0).ceil() as u64;
    assert!(
        admitted <= most,
        "admitted {admitted} in {elapsed:?}: more than the limit allows ({most})"
    );
    assert!(
        admitted >= most / 2,
        "admitted {admitted} in {elapsed:?}: far below {most}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn local_concurrent_requests_never_exceed_the_limit() {
    let (l, _) = limiter(TEN_PER_SECOND).await;
    let (admitted, elapsed) = sustained(&[l], 8).await;
    assert_within_limit(admitted, elapsed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_concurrent_requests_never_exceed_the_limit() {
    let redis = RedisServer::start().await;
    let config = format!("{}{TEN_PER_SECOND}", redis_table(&redis, "redis_timeout = \"5s\""));
    let (a, registry_a) = limiter(&config).await;
    let (b, registry_b) = limiter(&config).await;
    let (admitted, elapsed) = sustained(&[a, b], 6).await;
    assert_within_limit(admitted, elapsed);
    assert_eq!(backend_errors(&registry_a) + backend_errors(&registry_b), 0.0);
}

// ---------------------------------------------------------------------------
// Keys, several rules
// ---------------------------------------------------------------------------

const PER_KEY_AND_APP_A: &str = "
[[rate_limits]]
scope = \"key\"
requests_per_minute = 1
burst = 3

[[rate_limits]]
name = \"app-a-tight\"
scope = \"key\"
match = \"app-a\"
requests_per_minute = 1
burst = 2
";

async fn check_keys_are_independent(l: &Limiter, registry: &Registry) {
    // app-a meets both rules and the tighter one (2) binds.
    assert_eq!(drain(l, "app-a", 10).await, 2);
    let r = l.admit_request("app-a", "m", 0).await.unwrap_err();
    assert_eq!((r.rule.as_str(), r.scope), ("app-a-tight", Scope::Key));
    // app-b and app-c have their own buckets of the per-key rule, untouched by app-a.
    assert_eq!(drain(l, "app-b", 10).await, 3);
    assert_eq!(drain(l, "app-c", 10).await, 3);
    assert_eq!(rate_limited(registry, "key", "app-a-tight"), 2.0);
    assert_eq!(rate_limited(registry, "key", "key:*"), 2.0);
}

#[tokio::test(start_paused = true)]
async fn local_different_keys_do_not_affect_each_other() {
    let (l, registry) = limiter(PER_KEY_AND_APP_A).await;
    check_keys_are_independent(&l, &registry).await;
}

#[tokio::test]
async fn redis_different_keys_do_not_affect_each_other() {
    let redis = RedisServer::start().await;
    let (l, registry) = limiter(&format!(
        "{}{PER_KEY_AND_APP_A}",
        redis_table(&redis, "redis_timeout = \"5s\"")
    ))
    .await;
    check_keys_are_independent(&l, &registry).await;
}

/// A global rule first, a per-key rule second: a call that the key rule
/// refuses must not keep its reservation in the global rule.
const GLOBAL_THEN_KEY: &str = "
[[rate_limits]]
scope = \"global\"
requests_per_minute = 1
burst = 5

[[rate_limits]]
scope = \"key\"
match = \"app-a\"
requests_per_minute = 1
burst = 1
";

async fn check_refusals_release_reservations(l: &Limiter) {
    let _ = l.admit_request("app-a", "m", 0).await.unwrap();
    for _ in 0..10 {
        let r = l.admit_request("app-a", "m", 0).await.unwrap_err();
        assert_eq!(r.rule, "key:app-a");
    }
    // The global bucket still has its other 4.
    assert_eq!(drain(l, "app-b", 10).await, 4);
    let r = l.admit_request("app-b", "m", 0).await.unwrap_err();
    assert_eq!((r.rule.as_str(), r.scope), ("global:*", Scope::Global));
}

#[tokio::test(start_paused = true)]
async fn local_a_refused_rule_releases_what_earlier_rules_reserved() {
    let (l, _) = limiter(GLOBAL_THEN_KEY).await;
    check_refusals_release_reservations(&l).await;
}

#[tokio::test]
async fn redis_a_refused_rule_releases_what_earlier_rules_reserved() {
    let redis = RedisServer::start().await;
    let (l, _) = limiter(&format!(
        "{}{GLOBAL_THEN_KEY}",
        redis_table(&redis, "redis_timeout = \"5s\"")
    ))
    .await;
    check_refusals_release_reservations(&l).await;
}

// ---------------------------------------------------------------------------
// Tokens: reservation and reconcile
// ---------------------------------------------------------------------------

/// 60 tokens per minute: one token a second refills, so on real time the
/// numbers move by at most the elapsed seconds.
const SIXTY_TPM: &str = "[[rate_limits]]\nscope = \"key\"\ntokens_per_minute = 60\n";

async fn check_token_reconcile(l: &Limiter) {
    let started = Instant::now();
    let slack = || started.elapsed().as_secs() + 1;
    let near = |got: u64, want: u64| {
        assert!(
            (want..=want + slack()).contains(&got),
            "remaining tokens {got}, expected {want} (+ refill)"
        );
    };

    // Reserve the estimate: 40 of 60.
    let a = l.admit_request("app-a", "m", 40).await.unwrap();
    assert_eq!(header(&a.headers(), "x-ratelimit-limit-tokens"), "60");
    near(remaining(&a.headers(), "tokens"), 20);
    // 30 more do not fit: refused with the time until they do (10 tokens, ~10 s).
    let r = l.admit_request("app-a", "m", 30).await.unwrap_err();
    assert!(
        r.retry_after > Duration::from_secs(8) && r.retry_after <= Duration::from_secs(10),
        "{:?}",
        r.retry_after
    );
    assert_eq!(header(&r.headers, "retry-after"), "10");
    // Used 10 of the 40: 30 come back, so now 30 fit and leave 20.
    a.reconcile(10).await;
    let b = l.admit_request("app-a", "m", 30).await.unwrap();
    near(remaining(&b.headers(), "tokens"), 20);
    // Used 50, not 30: 20 more are charged, the bucket is at 0.
    b.reconcile(50).await;
    let r = l.admit_request("app-a", "m", 1).await.unwrap_err();
    assert!(r.retry_after > Duration::ZERO);
    // Another key is untouched.
    let c = l.admit_request("app-b", "m", 60).await.unwrap();
    near(remaining(&c.headers(), "tokens"), 0);
    // A call larger than the whole bucket reserves the whole bucket
    // instead of never fitting.
    let d = l.admit_request("app-c", "m", 1000).await.unwrap();
    assert_eq!(remaining(&d.headers(), "tokens"), 0);
    d.reconcile(0).await;
    let e = l.admit_request("app-c", "m", 1).await.unwrap();
    near(remaining(&e.headers(), "tokens"), 59);
}

#[tokio::test(start_paused = true)]
async fn local_tokens_are_reserved_then_reconciled() {
    let (l, _) = limiter(SIXTY_TPM).await;
    check_token_reconcile(&l).await;
}

#[tokio::test]
async fn redis_tokens_are_reserved_then_reconciled() {
    let redis = RedisServer::start().await;
    let (l, registry) = limiter(&format!("{}{SIXTY_TPM}", redis_table(&redis, "redis_timeout = \"5s\""))).await;
    check_token_reconcile(&l).await;
    assert_eq!(backend_errors(&registry), 0.0);
}

#[tokio::test(start_paused = true)]
async fn request_and_attempt_admissions_merge() {
    let (l, _) = limiter(
        "[[rate_limits]]\nscope = \"key\"\nrequests_per_minute = 60\nburst = 10\ntokens_per_minute = 1000\n\
         [[rate_limits]]\nscope = \"upstream\"\nrequests_per_minute = 60\nburst = 3\ntokens_per_minute = 600\n",
    )
    .await;
    let request = l.admit_request("app-a", "m", 100).await.unwrap();
    let attempt = l.admit_upstream("u1", 100).await.unwrap();
    let both = request.merge(attempt);
    // The tighter of each family: the upstream's 2 requests and 500 tokens.
    assert_eq!(remaining(&both.headers(), "requests"), 2);
    assert_eq!(remaining(&both.headers(), "tokens"), 500);
    assert_eq!(header(&both.headers(), "x-ratelimit-limit-tokens"), "600");
    // One reconcile settles both: 400 more tokens in each.
    both.reconcile(500).await;
    assert_eq!(
        remaining(&l.admit_upstream("u1", 1).await.unwrap().headers(), "tokens"),
        99
    );
    assert_eq!(
        remaining(&l.admit_request("app-a", "m", 1).await.unwrap().headers(), "tokens"),
        499
    );
}

// ---------------------------------------------------------------------------
// Queueing
// ---------------------------------------------------------------------------

/// One request per second, no burst; waits up to `wait`.
fn queue_rule(wait: &str) -> String {
    format!(
        "[[rate_limits]]\nscope = \"key\"\nrequests_per_minute = 60\nburst = 1\non_limit = \"queue\"\nmax_queue_wait = \"{wait}\"\n"
    )
}

#[tokio::test(start_paused = true)]
async fn queue_waits_then_admits() {
    let (l, registry) = limiter(&queue_rule("5s")).await;
    let started = Instant::now();
    let _ = l.admit_request("app-a", "m", 0).await.unwrap();
    let _ = l.admit_request("app-a", "m", 0).await.unwrap();
    assert_eq!(started.elapsed(), Duration::from_secs(1), "waited for the next slot");
    let _ = l.admit_request("app-a", "m", 0).await.unwrap();
    assert_eq!(started.elapsed(), Duration::from_secs(2));
    assert_eq!(queue_waits(&registry, "admitted"), 2.0);
    assert_eq!(
        sample(
            &registry,
            "relaygate_ratelimit_queue_wait_seconds_sum{result=\"admitted\"}"
        ),
        2.0
    );
    assert_eq!(rate_limited(&registry, "key", "key:*"), 0.0);
}

#[tokio::test(start_paused = true)]
async fn queue_times_out_cleanly() {
    let (l, registry) = limiter(&queue_rule("400ms")).await;
    let started = Instant::now();
    let _ = l.admit_request("app-a", "m", 0).await.unwrap();
    let r = l.admit_request("app-a", "m", 0).await.unwrap_err();
    assert_eq!(
        started.elapsed(),
        Duration::from_millis(400),
        "waited max_queue_wait, no more"
    );
    assert!(!r.unavailable);
    assert_eq!(r.retry_after, Duration::from_millis(600));
    assert_eq!(header(&r.headers, "retry-after"), "1");
    assert_eq!(header(&r.headers, "x-ratelimit-remaining-requests"), "0");
    assert_eq!(queue_waits(&registry, "rejected"), 1.0);
    assert_eq!(rate_limited(&registry, "key", "key:*"), 1.0);
    // The caller that gave up took nothing: the next slot is on time.
    tokio::time::sleep_until(started + Duration::from_secs(1)).await;
    let _ = l.admit_request("app-a", "m", 0).await.unwrap();
    assert_eq!(started.elapsed(), Duration::from_secs(1));
}

#[tokio::test(start_paused = true)]
async fn a_dropped_waiter_leaves_the_queue_and_order_holds() {
    let (l, registry) = limiter(&queue_rule("10s")).await;
    let started = Instant::now();
    let _ = l.admit_request("app-a", "m", 0).await.unwrap();
    let order = Arc::new(std::sync::Mutex::new(Vec::new()));
    let spawn = |name: &'static str| {
        let (l, order) = (l.clone(), order.clone());
        tokio::spawn(async move {
            let _ = l.admit_request("app-a", "m", 0).await.unwrap();
            order.lock().unwrap().push((name, started.elapsed()));
        })
    };
    // A, B and C queue in that order (each runs until it waits before the next is spawned).
    let a = spawn("A");
    settle().await;
    let b = spawn("B");
    settle().await;
    let c = spawn("C");
    settle().await;
    // B's client goes away.
    b.abort();
    assert!(b.await.unwrap_err().is_cancelled());
    a.await.unwrap();
    c.await.unwrap();
    // C takes the slot B would have had: 2 s, not 3 s, and after A.
    assert_eq!(
        *order.lock().unwrap(),
        vec![("A", Duration::from_secs(1)), ("C", Duration::from_secs(2))]
    );
    assert_eq!(queue_waits(&registry, "cancelled"), 1.0);
    assert_eq!(queue_waits(&registry, "admitted"), 2.0);
}

#[tokio::test(start_paused = true)]
async fn the_queue_is_first_come_first_served() {
    // One token a second, up to 60 s of waiting.
    let (l, _) = limiter(
        "[[rate_limits]]\nscope = \"key\"\ntokens_per_minute = 60\non_limit = \"queue\"\nmax_queue_wait = \"60s\"\n",
    )
    .await;
    let started = Instant::now();
    let _ = l.admit_request("app-a", "m", 50).await.unwrap();
    let order = Arc::new(std::sync::Mutex::new(Vec::new()));
    let spawn = |name: &'static str, tokens: u64| {
        let (l, order) = (l.clone(), order.clone());
        tokio::spawn(async move {
            let _ = l.admit_request("app-a", "m", tokens).await.unwrap();
            order.lock().unwrap().push((name, started.elapsed()));
        })
    };
    // A needs 50 tokens (there are 10: it waits 40 s). B needs 1, which is
    // there now, but B came second: it does not overtake A.
    let a = spawn("A", 50);
    settle().await;
    let b = spawn("B", 1);
    a.await.unwrap();
    b.await.unwrap();
    assert_eq!(
        *order.lock().unwrap(),
        vec![("A", Duration::from_secs(40)), ("B", Duration::from_secs(41))]
    );
}

/// Lets spawned tasks run until they all wait (single-threaded runtime).
async fn settle() {
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_reject_rule_is_not_queued_behind() {
    // app-a meets a queueing rule and a rejecting one; the rejecting one binds.
    let (l, registry) = limiter(&format!(
        "{}[[rate_limits]]\nscope = \"global\"\nrequests_per_minute = 1\nburst = 1\n",
        queue_rule("5s")
    ))
    .await;
    let started = Instant::now();
    let _ = l.admit_request("app-a", "m", 0).await.unwrap();
    let r = l.admit_request("app-b", "m", 0).await.unwrap_err();
    assert_eq!(r.rule, "global:*");
    assert_eq!(started.elapsed(), Duration::ZERO, "refused at once");
    assert_eq!(queue_waits(&registry, "rejected"), 0.0);
}

#[tokio::test]
async fn redis_queue_waits_then_admits() {
    let redis = RedisServer::start().await;
    // 600 rpm, burst 1: a slot every 100 ms.
    let (l, registry) = limiter(&format!(
        "{}[[rate_limits]]\nscope = \"key\"\nrequests_per_minute = 600\nburst = 1\non_limit = \"queue\"\nmax_queue_wait = \"3s\"\n",
        redis_table(&redis, "redis_timeout = \"5s\"")
    ))
    .await;
    let _ = l.admit_request("app-a", "m", 0).await.unwrap();
    let started = Instant::now();
    for _ in 0..3 {
        let _ = l.admit_request("app-a", "m", 0).await.unwrap();
    }
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    assert_eq!(queue_waits(&registry, "admitted"), 3.0);
}

// ---------------------------------------------------------------------------
// Redis down, hung, back
// ---------------------------------------------------------------------------

#[tokio::test]
async fn redis_killed_fails_open_at_the_fallback_share_then_recovers() {
    let mut redis = RedisServer::start().await;
    // 10 per burst shared; 5 per replica while Redis is down (2 instances).
    let config = format!(
        "{}[[rate_limits]]\nscope = \"key\"\nrequests_per_minute = 2\nburst = 10\n",
        redis_table(&redis, "redis_timeout = \"200ms\"\nexpected_instances = 2")
    );
    let (l, registry) = limiter(&config).await;
    for _ in 0..3 {
        let _ = l.admit_request("app-a", "m", 0).await.unwrap();
    }
    assert_eq!(fallback_active(&registry), 0.0);

    redis.kill();
    // The fallback enforces limit / expected_instances, and every call is bounded.
    let mut admitted = 0;
    for _ in 0..8 {
        let t = Instant::now();
        let result = l.admit_request("app-a", "m", 0).await;
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "a call took {:?}",
            t.elapsed()
        );
        match result {
            Ok(_) => admitted += 1,
            Err(r) => assert!(!r.unavailable, "fail_mode open never answers unavailable"),
        }
    }
    assert_eq!(admitted, 5);
    assert_eq!(fallback_active(&registry), 1.0);
    assert!(backend_errors(&registry) >= 1.0);

    // Redis comes back (empty, so its scripts are gone too: EVALSHA gets
    // NOSCRIPT and the script is sent again).
    redis.restart().await;
    wait_for_shared_limits(&l, &registry).await;
    // Shared limiting resumes: two gateways together admit one burst.
    let (other, _) = limiter(&config).await;
    assert_eq!(burst(&[l.clone(), other], 40, "app-z").await, 10);
    assert_eq!(fallback_active(&registry), 0.0);
}

#[tokio::test]
async fn hung_redis_costs_one_timeout_then_is_skipped_until_retried() {
    let redis = RedisServer::start().await;
    let (l, registry) = limiter(&format!(
        "{}[[rate_limits]]\nscope = \"key\"\nrequests_per_minute = 2\nburst = 100\n",
        redis_table(&redis, "redis_timeout = \"200ms\"")
    ))
    .await;
    let _ = l.admit_request("app-a", "m", 0).await.unwrap();

    redis.pause();
    // The first call waits the Redis timeout, no more.
    let t = Instant::now();
    let _ = l.admit_request("app-a", "m", 0).await.unwrap();
    let first = t.elapsed();
    assert!(
        first >= Duration::from_millis(150) && first < Duration::from_millis(500),
        "{first:?}"
    );
    assert_eq!(backend_errors(&registry), 1.0);
    assert_eq!(fallback_active(&registry), 1.0);
    // The next ones do not wait on Redis at all until the retry period passes.
    let t = Instant::now();
    for _ in 0..10 {
        let _ = l.admit_request("app-a", "m", 0).await.unwrap();
    }
    assert!(t.elapsed() < Duration::from_millis(150), "{:?}", t.elapsed());
    assert_eq!(backend_errors(&registry), 1.0);

    redis.resume();
    wait_for_shared_limits(&l, &registry).await;
    // One retry a second at most while it was down.
    assert!(backend_errors(&registry) <= 4.0, "{}", backend_errors(&registry));
}

#[tokio::test]
async fn fail_mode_closed_answers_unavailable() {
    let mut redis = RedisServer::start().await;
    let config = format!(
        "{}[[rate_limits]]\nscope = \"key\"\nrequests_per_minute = 2\nburst = 100\n",
        redis_table(&redis, "redis_timeout = \"200ms\"\nfail_mode = \"closed\"")
    );
    let (l, registry) = limiter(&config).await;
    let _ = l.admit_request("app-a", "m", 0).await.unwrap();

    redis.kill();
    let t = Instant::now();
    let r: Rejection = l.admit_request("app-a", "m", 0).await.unwrap_err();
    assert!(t.elapsed() < Duration::from_millis(500));
    assert!(r.unavailable);
    assert_eq!(r.scope, Scope::Key);
    assert_eq!(header(&r.headers, "retry-after"), "1");
    assert_eq!(rate_limited(&registry, "key", "key:*"), 0.0, "not a rate-limit refusal");
    assert_eq!(fallback_active(&registry), 1.0);

    // A gateway that starts while Redis is down starts, and refuses too.
    let (late, late_registry) = limiter(&config).await;
    assert!(late.admit_request("app-a", "m", 0).await.unwrap_err().unavailable);
    assert_eq!(fallback_active(&late_registry), 1.0);

    redis.restart().await;
    let deadline = Instant::now() + Duration::from_secs(15);
    let admitted: Admission = loop {
        match late.admit_request("app-a", "m", 0).await {
            Ok(a) => break a,
            Err(r) => assert!(r.unavailable && Instant::now() < deadline, "{r:?}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(!admitted.headers().is_empty());
    assert_eq!(fallback_active(&late_registry), 0.0);
}

#[tokio::test]
async fn redis_keys_are_namespaced_hash_tagged_and_expire() {
    let redis = RedisServer::start().await;
    let (l, _) = limiter(&format!(
        "{}[[rate_limits]]\nscope = \"key\"\nrequests_per_minute = 60\nburst = 5\ntokens_per_minute = 600\n",
        redis_table(&redis, "redis_timeout = \"5s\"\nkey_prefix = \"rg-test\"")
    ))
    .await;
    let a = l.admit_request("team:a", "m", 100).await.unwrap();
    a.reconcile(50).await;
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let mut keys: Vec<String> = redis::cmd("KEYS").arg("*").query_async(&mut conn).await.unwrap();
    keys.sort();
    assert_eq!(
        keys,
        vec!["{rg-test}:key%3A*:team%3Aa:r", "{rg-test}:key%3A*:team%3Aa:t"]
    );
    for key in keys {
        let ttl: i64 = redis::cmd("PTTL").arg(&key).query_async(&mut conn).await.unwrap();
        // Until the bucket is full again, plus a second: 1 s for the request, 5 s for 50 tokens.
        assert!(ttl > 0 && ttl <= 7_000, "{key}: {ttl}");
    }
}
