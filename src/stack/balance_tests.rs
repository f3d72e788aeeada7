//! The picks over scripted targets, on tokio's paused clock with a seeded
//! generator: the same picks every run, no socket, no wall-clock bound.
//! What a target "does" is a time to first byte and an outcome per attempt.

use std::sync::Arc;
use std::time::Duration;

use fastrand::Rng;
use tokio::time::{advance, Instant};

use super::{LoadRegistry, Settled, PROBE_EVERY};
use crate::config::Config;
use crate::stack::route::Route;
use crate::telemetry::metrics::Metrics;
use crate::upstream::breaker::Breaker;
use crate::upstream::{Upstream, UpstreamState};

const MS: Duration = Duration::from_millis(1);

/// Upstreams `a` to `h`; model `m` with `model_toml` (its `routing` and
/// `targets`), built over `upstreams` (made by `upstreams()`) and `loads`.
fn route(model_toml: &str, upstreams: &[Arc<Upstream>], loads: &LoadRegistry, metrics: &Metrics) -> Route {
    let config = Config::parse(&config_text(model_toml), |_| None).expect("valid test config");
    Route::new(&config.models[0], upstreams, &config.retry, 1 << 20, metrics, loads)
}

fn config_text(model_toml: &str) -> String {
    let mut text = String::new();
    for name in ["a", "b", "c", "d", "e", "f", "g", "h"] {
        text.push_str(&format!(
            "[[upstreams]]\nname = \"{name}\"\nbase_url = \"http://127.0.0.1:9/v1\"\n"
        ));
    }
    format!("{text}[[models]]\nname = \"m\"\n{model_toml}\n")
}

fn upstreams(metrics: &Metrics) -> Vec<Arc<Upstream>> {
    let config = Config::parse(&config_text("targets = [{ upstream = \"a\" }]"), |_| None).unwrap();
    config
        .upstreams
        .iter()
        .enumerate()
        .map(|(i, u)| {
            let breaker = Breaker::new(&u.name, u.circuit_breaker.clone(), metrics);
            let state = Arc::new(UpstreamState::new(breaker, Duration::from_secs(60)));
            Arc::new(Upstream::new(u.clone(), i, state, metrics).unwrap())
        })
        .collect()
}

/// A latency-routed model over `names`, all priority 0.
fn latency(names: &[&str]) -> String {
    let targets: Vec<String> = names.iter().map(|n| format!("{{ upstream = \"{n}\" }}")).collect();
    format!("routing = \"latency\"\ntargets = [{}]", targets.join(", "))
}

/// `ttft` with ±10 % jitter.
fn jittered(rng: &mut Rng, ttft: Duration) -> Duration {
    ttft.mul_f64(0.9 + 0.2 * rng.f64())
}

/// Sends `n` requests one at a time: each picks a target, which takes
/// `behave(target, request)` (a delay and how it ends) to answer.
async fn sequential(
    route: &Route,
    rng: &mut Rng,
    n: usize,
    mut behave: impl FnMut(usize, &mut Rng) -> (Duration, Settled),
) -> Vec<usize> {
    let mut picks = Vec::with_capacity(n);
    for _ in 0..n {
        let i = route.pick_with(|_| true, Instant::now(), rng).expect("a target");
        let pending = route.begin(i).expect("a balancer");
        let (after, how) = behave(i, rng);
        advance(after).await;
        drop(route.settle(i, pending, how));
        advance(MS).await;
        picks.push(i);
    }
    picks
}

fn share(picks: &[usize], target: usize) -> f64 {
    picks.iter().filter(|&&i| i == target).count() as f64 / picks.len() as f64
}

#[tokio::test(start_paused = true)]
async fn the_fast_target_takes_nine_tenths_and_the_slow_one_is_never_starved() {
    let metrics = Metrics::new();
    let ups = upstreams(&metrics);
    let route = route(&latency(&["a", "b"]), &ups, &LoadRegistry::default(), &metrics);
    let mut rng = Rng::with_seed(7);
    let ttft = [300 * MS, 30 * MS];
    let answer = |i: usize, rng: &mut Rng| (jittered(rng, ttft[i]), Settled::FirstByte(None));
    sequential(&route, &mut rng, 20, answer).await; // warm-up
    let picks = sequential(&route, &mut rng, 200, answer).await;
    let fast = share(&picks, 1);
    assert!(fast >= 0.9, "the 30 ms target got {:.0} %", fast * 100.0);
    assert!(fast < 1.0, "the 300 ms target is still measured");
    for (start, window) in picks.windows(100).enumerate() {
        assert!(
            window.contains(&0),
            "no pick of the slow target in requests {start}..{}",
            start + 100
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_slowdown_moves_traffic_within_50_requests_and_recovery_brings_it_back() {
    let metrics = Metrics::new();
    let ups = upstreams(&metrics);
    let route = route(&latency(&["a", "b"]), &ups, &LoadRegistry::default(), &metrics);
    let mut rng = Rng::with_seed(11);
    let mut ttft = [30 * MS, 300 * MS];
    let warm = sequential(&route, &mut rng, 100, |i, rng| {
        (jittered(rng, ttft[i]), Settled::FirstByte(None))
    })
    .await;
    assert!(share(&warm[50..], 0) >= 0.9);

    // `a` slows to 600 ms without failing.
    ttft[0] = 600 * MS;
    let slow = sequential(&route, &mut rng, 50, |i, rng| {
        (jittered(rng, ttft[i]), Settled::FirstByte(None))
    })
    .await;
    let moved = slow.iter().position(|&i| i == 1).expect("traffic moves");
    assert!(moved <= 2, "the first request to b was number {moved}");
    assert!(share(&slow[5..], 1) >= 0.9, "{slow:?}");

    // It recovers: a probe measures it, and traffic comes back.
    ttft[0] = 30 * MS;
    let back = sequential(&route, &mut rng, 150, |i, rng| {
        (jittered(rng, ttft[i]), Settled::FirstByte(None))
    })
    .await;
    let returned = back
        .windows(20)
        .position(|w| share(w, 0) >= 0.8)
        .expect("traffic returns");
    assert!(
        returned <= 2 * PROBE_EVERY as usize,
        "back after {returned} requests: {back:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_target_failing_fast_does_not_attract_traffic() {
    let metrics = Metrics::new();
    let ups = upstreams(&metrics);
    let route = route(&latency(&["a", "b"]), &ups, &LoadRegistry::default(), &metrics);
    let mut rng = Rng::with_seed(3);
    // `a` answers a 500 in 1 ms: "fast", but never a sample.
    let picks = sequential(&route, &mut rng, 300, |i, rng| match i {
        0 => (MS, Settled::Failure),
        _ => (jittered(rng, 300 * MS), Settled::FirstByte(None)),
    })
    .await;
    let failing = share(&picks, 0);
    assert!(failing <= 0.05, "the failing target got {:.1} %", failing * 100.0);
    let loads = route.loads().unwrap();
    assert_eq!(loads[0].state, "penalized");
    assert!(loads[0].estimate > loads[1].estimate, "{loads:?}");
}

#[tokio::test(start_paused = true)]
async fn a_hanging_target_stops_being_picked_before_its_first_timeout() {
    let metrics = Metrics::new();
    let ups = upstreams(&metrics);
    let route = route(&latency(&["a", "b"]), &ups, &LoadRegistry::default(), &metrics);
    let mut rng = Rng::with_seed(5);
    // A request every 20 ms; `a` never answers and times out after 2 s, `b`
    // answers in 100 ms.
    let timeout = Duration::from_secs(2);
    let start = Instant::now();
    let mut outstanding = Vec::new();
    let mut picks_of_a = Vec::new();
    while start.elapsed() < timeout {
        let now = Instant::now();
        let i = route.pick_with(|_| true, now, &mut rng).unwrap();
        let pending = route.begin(i).unwrap();
        let (at, how) = match i {
            0 => {
                picks_of_a.push(now - start);
                (now + timeout, Settled::Failure)
            }
            _ => (now + 100 * MS, Settled::FirstByte(None)),
        };
        outstanding.push((at, i, pending, how));
        advance(20 * MS).await;
        let now = Instant::now();
        let (due, rest): (Vec<_>, Vec<_>) = outstanding.into_iter().partition(|o| o.0 <= now);
        outstanding = rest;
        for (_, i, pending, how) in due {
            drop(route.settle(i, pending, how));
        }
    }
    assert!(!picks_of_a.is_empty(), "new targets are tried");
    let last = *picks_of_a.last().unwrap();
    assert!(
        last < Duration::from_millis(500) && picks_of_a.len() <= 4,
        "the hanging target was picked at {picks_of_a:?}, its first attempt times out at 2 s"
    );
}

#[tokio::test(start_paused = true)]
async fn equal_latencies_split_evenly() {
    for seed in [1, 2, 3] {
        let metrics = Metrics::new();
        let ups = upstreams(&metrics);
        let route = route(&latency(&["a", "b"]), &ups, &LoadRegistry::default(), &metrics);
        let mut rng = Rng::with_seed(seed);
        let picks = sequential(&route, &mut rng, 1000, |_, rng| {
            (jittered(rng, 100 * MS), Settled::FirstByte(None))
        })
        .await;
        let a = share(&picks, 0);
        assert!((0.35..=0.65).contains(&a), "seed {seed}: a got {:.1} %", a * 100.0);
    }
}

#[tokio::test(start_paused = true)]
async fn eight_targets_the_fast_one_wins_its_pairs_the_failing_one_none() {
    let metrics = Metrics::new();
    let ups = upstreams(&metrics);
    let all = ["a", "b", "c", "d", "e", "f", "g", "h"];
    let route = route(&latency(&all), &ups, &LoadRegistry::default(), &metrics);
    let mut rng = Rng::with_seed(9);
    // `a` 20 ms, `h` fails at once, the others 200 ms.
    let picks = sequential(&route, &mut rng, 600, |i, rng| match i {
        0 => (jittered(rng, 20 * MS), Settled::FirstByte(None)),
        7 => (MS, Settled::Failure),
        _ => (jittered(rng, 200 * MS), Settled::FirstByte(None)),
    })
    .await;
    // Power of two choices: the fastest wins every pair it is drawn into,
    // 1 - C(7,2)/C(8,2) = 25 % of picks when nothing is in flight (under
    // load, in-flight counts shift more to it); the failing one wins none.
    let tail = &picks[100..];
    let fast = share(tail, 0);
    assert!(fast >= 0.2, "the fast target got {:.0} %", fast * 100.0);
    for t in 1..8 {
        assert!(share(tail, t) < fast, "target {t} got more than the fastest");
        assert!(tail.contains(&t), "target {t} is still measured");
    }
    assert!(
        share(tail, 7) <= 0.03,
        "the failing one got {:.1} %",
        share(tail, 7) * 100.0
    );
}

#[tokio::test(start_paused = true)]
async fn a_target_added_by_reload_is_probed_at_once_and_the_others_keep_their_estimates() {
    let metrics = Metrics::new();
    let ups = upstreams(&metrics);
    let loads = LoadRegistry::default();
    let mut rng = Rng::with_seed(13);
    let before = route(&latency(&["a", "c"]), &ups, &loads, &metrics);
    let ttft = |i: usize| [40 * MS, 400 * MS, 40 * MS][i];
    sequential(&before, &mut rng, 100, |i, rng| {
        (jittered(rng, ttft(i)), Settled::FirstByte(None))
    })
    .await;
    let estimate_a = before.loads().unwrap()[0].estimate;

    // The reload adds `b` (target 1 of the new route; `c` moves to 2).
    let after = route(&latency(&["a", "b", "c"]), &ups, &loads, &metrics);
    let loads_now = after.loads().unwrap();
    assert_eq!(loads_now[0].state, "measured", "a keeps what was measured");
    assert!((loads_now[0].estimate - estimate_a).abs() < 1e-6);
    assert_eq!(loads_now[1].state, "fresh");
    assert!(
        loads_now[1].estimate > loads_now[0].estimate * 3.0,
        "a new target starts pessimistic: {loads_now:?}"
    );
    let picks = sequential(&after, &mut rng, 100, |i, rng| {
        let ttft = [40 * MS, 40 * MS, 40 * MS][i];
        (jittered(rng, ttft), Settled::FirstByte(None))
    })
    .await;
    let first = picks.iter().position(|&i| i == 1).expect("the new target gets traffic");
    assert!(first <= 2, "first pick of the new target: request {first}");
    // As fast as the others once measured: it takes a fair share.
    assert!(share(&picks[50..], 1) >= 0.15, "{picks:?}");
}

#[tokio::test(start_paused = true)]
async fn a_recovered_target_starts_pessimistic_and_decays_toward_the_median() {
    let metrics = Metrics::new();
    let ups = upstreams(&metrics);
    let route = route(&latency(&["a", "b", "c"]), &ups, &LoadRegistry::default(), &metrics);
    let mut rng = Rng::with_seed(17);
    sequential(&route, &mut rng, 60, |_, _| (100 * MS, Settled::FirstByte(None))).await;
    let breaker = &ups[0].state.breaker;
    breaker.force_open();
    let picks = sequential(&route, &mut rng, 30, |_, _| (100 * MS, Settled::FirstByte(None))).await;
    assert!(!picks.contains(&0), "an open breaker is read on every pick");
    breaker.reset();
    // The next pick reads the breaker again: `a` is back, as fresh, at 4× the median.
    route.pick_with(|t| &*t.upstream.name != "a", Instant::now(), &mut rng);
    let loads = route.loads().unwrap();
    assert_eq!(loads[0].state, "fresh");
    assert!((loads[0].estimate - 0.4).abs() < 0.01, "{loads:?}");
    advance(Duration::from_secs(10)).await; // one half-life
    let loads = route.loads().unwrap();
    assert!((loads[0].estimate - 0.25).abs() < 0.01, "{loads:?}");
    // Its first probe replaces the prior.
    let picks = sequential(&route, &mut rng, 3, |_, _| (100 * MS, Settled::FirstByte(None))).await;
    assert!(picks.contains(&0), "{picks:?}");
    assert_eq!(route.loads().unwrap()[0].state, "measured");
}

#[tokio::test(start_paused = true)]
async fn a_429_holds_the_target_for_its_retry_after() {
    let metrics = Metrics::new();
    let ups = upstreams(&metrics);
    let route = route(&latency(&["a", "b"]), &ups, &LoadRegistry::default(), &metrics);
    let mut rng = Rng::with_seed(19);
    sequential(&route, &mut rng, 10, |_, _| (50 * MS, Settled::FirstByte(None))).await;
    let pending = route.begin(0).unwrap();
    drop(route.settle(0, pending, Settled::RateLimited(Duration::from_secs(3))));
    let loads = route.loads().unwrap();
    assert_eq!(loads[0].state, "held");
    assert!(loads[0].estimate >= 1.0, "{loads:?}");
    advance(Duration::from_millis(2900)).await;
    assert_eq!(route.loads().unwrap()[0].state, "held", "whole until its end");
    advance(Duration::from_millis(200)).await;
    route.pick_with(|_| true, Instant::now(), &mut rng);
    assert_eq!(route.loads().unwrap()[0].state, "fresh", "then it starts over");
}

#[tokio::test(start_paused = true)]
async fn a_lost_attempt_counts_as_at_least_its_elapsed_time() {
    let metrics = Metrics::new();
    let ups = upstreams(&metrics);
    let route = route(&latency(&["a", "b"]), &ups, &LoadRegistry::default(), &metrics);
    let mut rng = Rng::with_seed(23);
    sequential(&route, &mut rng, 10, |_, _| (50 * MS, Settled::FirstByte(None))).await;
    let pending = route.begin(0).unwrap();
    advance(800 * MS).await;
    let waiting = &route.loads().unwrap()[0];
    assert!(waiting.estimate >= 0.79 && waiting.waiting == 1, "{waiting:?}");
    drop(pending); // a hedge that lost, or a client that left
    let after = &route.loads().unwrap()[0];
    assert!(after.estimate >= 0.79 && after.in_flight == 0, "{after:?}");
}

fn cost(max_ttft: Option<&str>) -> String {
    let bound = max_ttft.map_or(String::new(), |b| format!("max_ttft = \"{b}\"\n"));
    format!(
        "routing = \"cost\"\n{bound}price = {{ input_per_mtok = 2.0, output_per_mtok = 2.0 }}\n\
         targets = [{{ upstream = \"c\" }}, \
         {{ upstream = \"a\", price = {{ input_per_mtok = 0.5, output_per_mtok = 1.0 }} }}, \
         {{ upstream = \"b\", price = {{ input_per_mtok = 1.0, output_per_mtok = 1.0 }} }}]"
    )
}

#[tokio::test(start_paused = true)]
async fn cost_takes_the_cheapest_until_its_breaker_opens_then_the_next() {
    let metrics = Metrics::new();
    let ups = upstreams(&metrics);
    let route = route(&cost(None), &ups, &LoadRegistry::default(), &metrics);
    let names = |picks: &[usize]| -> Vec<String> {
        picks
            .iter()
            .map(|&i| route.targets[i].upstream.name.to_string())
            .collect()
    };
    let mut rng = Rng::with_seed(29);
    let answer = |_: usize, _: &mut Rng| (50 * MS, Settled::FirstByte(None));
    let picks = sequential(&route, &mut rng, 100, answer).await;
    assert!(names(&picks).iter().all(|n| n == "a"), "{:?}", names(&picks));
    // Failover ranks the same way: after a, b.
    let next = route.pick_with(|t| &*t.upstream.name != "a", Instant::now(), &mut rng);
    assert_eq!(next.map(|i| &*route.targets[i].upstream.name), Some("b"));

    ups[0].state.breaker.force_open();
    let picks = sequential(&route, &mut rng, 50, answer).await;
    assert!(names(&picks).iter().all(|n| n == "b"), "{:?}", names(&picks));
    ups[1].state.breaker.force_open();
    let picks = sequential(&route, &mut rng, 10, answer).await;
    assert!(names(&picks).iter().all(|n| n == "c"), "{:?}", names(&picks));
    ups[0].state.breaker.reset();
    let picks = sequential(&route, &mut rng, 10, answer).await;
    assert!(names(&picks).iter().all(|n| n == "a"), "{:?}", names(&picks));
}

#[tokio::test(start_paused = true)]
async fn cost_with_max_ttft_skips_a_cheap_target_that_is_too_slow() {
    let metrics = Metrics::new();
    let ups = upstreams(&metrics);
    let route = route(&cost(Some("800ms")), &ups, &LoadRegistry::default(), &metrics);
    let upstream = |i: usize| route.targets[i].upstream.name.to_string();
    let mut rng = Rng::with_seed(31);
    // a (cheapest) takes 2 s, b 300 ms, c (dearest) 100 ms.
    let ttft = |name: &str| match name {
        "a" => 2000 * MS,
        "b" => 300 * MS,
        _ => 100 * MS,
    };
    let picks = sequential(&route, &mut rng, 200, |i, rng| {
        (jittered(rng, ttft(&upstream(i))), Settled::FirstByte(None))
    })
    .await;
    let names: Vec<String> = picks.iter().map(|&i| upstream(i)).collect();
    let tail = &names[20..];
    let b = tail.iter().filter(|n| *n == "b").count() as f64 / tail.len() as f64;
    assert!(
        b >= 0.95,
        "b, the cheapest under 800 ms, got {:.0} %: {names:?}",
        b * 100.0
    );
    let a = tail.iter().filter(|n| *n == "a").count();
    assert!((1..=5).contains(&a), "a is probed now and then, not used: {a}");

    // Nothing under the bound: the fastest.
    let slow = |name: &str| match name {
        "a" => 3000 * MS,
        "b" => 2000 * MS,
        _ => 1000 * MS,
    };
    let picks = sequential(&route, &mut rng, 120, |i, rng| {
        (jittered(rng, slow(&upstream(i))), Settled::FirstByte(None))
    })
    .await;
    let names: Vec<String> = picks[20..].iter().map(|&i| upstream(i)).collect();
    let c = names.iter().filter(|n| *n == "c").count() as f64 / names.len() as f64;
    assert!(c >= 0.9, "c, the fastest, got {:.0} %: {names:?}", c * 100.0);
}

#[tokio::test(start_paused = true)]
async fn priority_routing_has_no_balancer_and_picks_by_weight() {
    let metrics = Metrics::new();
    let ups = upstreams(&metrics);
    let text = "targets = [{ upstream = \"a\", weight = 3 }, { upstream = \"b\" }, { upstream = \"c\", priority = 1 }]";
    let route = route(text, &ups, &LoadRegistry::default(), &metrics);
    assert!(route.begin(0).is_none() && route.loads().is_none());
    let picks: Vec<usize> = (0..4000).map(|_| route.pick(|_| true).unwrap()).collect();
    assert!(!picks.contains(&2), "priority 1 only when priority 0 is out");
    let a = share(&picks, 0);
    assert!((0.7..0.8).contains(&a), "weight 3 of 4: {a}");
    let text = metrics.render();
    assert!(
        text.contains(r#"relaygate_route_picks_total{model="m",strategy="priority",upstream="a"}"#),
        "{text}"
    );
}
