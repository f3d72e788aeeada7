//! The engine on the local backend, with an injected clock.

use std::sync::Arc;

use super::*;

/// 2025-06-15T12:00:00Z, a Sunday.
const NOON: i64 = 1_749_988_800;
const DAY: i64 = 86_400;

fn budget(name: &str, scope: Scope, matches: Option<&str>, usd: f64, period: Period, on_exceed: OnExceed) -> Budget {
    Budget {
        name: name.into(),
        scope,
        matches: matches.map(Into::into),
        micros: (usd * 1e6) as i64,
        period,
        zone: Zone::UTC,
        on_exceed,
        warn_at: vec![0.5, 0.9],
    }
}

async fn engine(budgets: Vec<Budget>, clock: &Arc<ManualClock>) -> (Budgets, prometheus::Registry) {
    let registry = prometheus::Registry::new();
    let b = Budgets::new(BudgetSettings::default(), budgets, &registry, Box::new(clock.clone()))
        .await
        .unwrap();
    (b, registry)
}

fn metric(registry: &prometheus::Registry, name: &str, labels: &[(&str, &str)]) -> f64 {
    registry
        .gather()
        .iter()
        .filter(|f| f.name() == name)
        .flat_map(|f| f.get_metric().iter())
        .filter(|m| {
            labels
                .iter()
                .all(|(k, v)| m.get_label().iter().any(|l| l.name() == *k && l.value() == *v))
        })
        .map(|m| {
            if m.get_gauge().has_value() {
                m.get_gauge().value()
            } else {
                m.get_counter().value()
            }
        })
        .sum()
}

async fn spent(b: &Budgets, name: &str, bucket: &str) -> f64 {
    b.report()
        .await
        .into_iter()
        .find(|r| r.name == name)
        .and_then(|r| r.buckets.into_iter().find(|n| n.name == bucket))
        .map_or(0.0, |n| n.spent_usd)
}

async fn settle(r: Reservation, cost: i64) {
    r.settle_in_background(cost);
}

#[tokio::test]
async fn no_budgets_is_nothing() {
    let clock = Arc::new(ManualClock::new(NOON));
    let (b, registry) = engine(Vec::new(), &clock).await;
    assert!(b.is_empty());
    assert!(registry.gather().is_empty(), "no budget metrics without budgets");
    assert!(b.reserve_request("k", "m", 1).await.unwrap().is_none());
}

#[tokio::test]
async fn every_matching_budget_must_admit_and_a_refusal_takes_nothing() {
    let clock = Arc::new(ManualClock::new(NOON));
    let (b, registry) = engine(
        vec![
            budget("key-a", Scope::Key, Some("a"), 1.0, Period::Day, OnExceed::Reject),
            budget("each-model", Scope::Model, None, 0.5, Period::Day, OnExceed::Reject),
            budget("all", Scope::Global, None, 100.0, Period::Month, OnExceed::Reject),
        ],
        &clock,
    )
    .await;
    let r1 = b.reserve_request("a", "m1", 400_000).await.unwrap();
    // m1's own budget has 0.1 left: refused there, and nothing is taken
    // from key-a or all.
    let e = b.reserve_request("a", "m1", 400_000).await.unwrap_err();
    assert_eq!(
        (e.budget.as_str(), e.scope, e.name.as_str()),
        ("each-model", Scope::Model, "m1")
    );
    assert_eq!(
        (e.spent_micros, e.reserved_micros, e.limit_micros),
        (0, 400_000, 500_000)
    );
    assert_eq!(e.resets_at.as_deref(), Some("2025-06-16T00:00:00Z"));
    assert_eq!(e.retry_after, Some(Duration::from_secs(12 * 3600)));
    let msg = e.message();
    for part in [
        "'each-model'",
        "model 'm1'",
        "per day",
        "$0.400000 reserved",
        "$0.50",
        "2025-06-16T00:00:00Z",
    ] {
        assert!(msg.contains(part), "{part} in {msg}");
    }
    // Another model has its own budget; key-a now holds 0.8.
    let r2 = b.reserve_request("a", "m2", 400_000).await.unwrap();
    let e = b.reserve_request("a", "m3", 400_000).await.unwrap_err();
    assert_eq!(e.budget, "key-a");
    // Key b meets only each-model and all.
    let r3 = b.reserve_request("b", "m3", 400_000).await.unwrap();
    assert_eq!(
        metric(
            &registry,
            "relaygate_budget_rejections_total",
            &[("budget", "each-model")]
        ),
        1.0
    );
    assert_eq!(
        metric(&registry, "relaygate_budget_rejections_total", &[("budget", "key-a")]),
        1.0
    );
    assert_eq!(
        metric(&registry, "relaygate_budget_reserved_usd", &[("budget", "all")]),
        1.2
    );
    // Settled at the real cost, the reservations free their room.
    settle(r1, 10_000).await;
    settle(r2, 20_000).await;
    settle(r3, 0).await;
    assert_eq!(spent(&b, "key-a", "a").await, 0.03);
    assert_eq!(spent(&b, "all", "*").await, 0.03);
    assert_eq!(
        metric(&registry, "relaygate_budget_reserved_usd", &[("budget", "all")]),
        0.0
    );
    assert_eq!(
        metric(&registry, "relaygate_budget_spent_usd", &[("budget", "all")]),
        0.03
    );
    assert_eq!(
        metric(&registry, "relaygate_budget_limit_usd", &[("budget", "all")]),
        100.0
    );
    b.reserve_request("a", "m1", 400_000)
        .await
        .unwrap()
        .settle_in_background(0);
}

#[tokio::test]
async fn a_settlement_replayed_moves_nothing() {
    let clock = Arc::new(ManualClock::new(NOON));
    let (b, _) = engine(
        vec![budget("g", Scope::Global, None, 1.0, Period::Day, OnExceed::Reject)],
        &clock,
    )
    .await;
    let s = b.reserve_request("k", "m", 500_000).await.unwrap().settlement(1234);
    b.apply(&s).await;
    b.apply(&s).await;
    b.apply(&s.clone()).await;
    assert_eq!(spent(&b, "g", "*").await, 0.001234);
    let r = &b.report().await[0].buckets[0];
    assert_eq!(r.reserved_usd, 0.0);
}

#[tokio::test]
async fn periods_roll_over_on_the_clock_and_total_never_resets() {
    let clock = Arc::new(ManualClock::new(NOON));
    let (b, registry) = engine(
        vec![
            budget("daily", Scope::Global, None, 1.0, Period::Day, OnExceed::Reject),
            budget("weekly", Scope::Global, None, 10.0, Period::Week, OnExceed::Reject),
            budget("credit", Scope::Global, None, 1.5, Period::Total, OnExceed::Reject),
        ],
        &clock,
    )
    .await;
    settle(b.reserve_request("k", "m", 1_000_000).await.unwrap(), 1_000_000).await;
    let e = b.reserve_request("k", "m", 1).await.unwrap_err();
    assert_eq!(e.budget, "daily");
    // One second before midnight: still today.
    clock.set(NOON + 12 * 3600 - 1);
    assert_eq!(
        b.reserve_request("k", "m", 1).await.unwrap_err().retry_after,
        Some(Duration::from_secs(1))
    );
    // Monday 00:00: a new day and a new ISO week; the credit keeps its spend.
    clock.set(NOON + 12 * 3600);
    assert_eq!(
        metric(&registry, "relaygate_budget_spent_usd", &[("budget", "daily")]),
        0.0,
        "at the scrape, without traffic"
    );
    assert_eq!(
        metric(&registry, "relaygate_budget_spent_usd", &[("budget", "credit")]),
        1.0
    );
    settle(b.reserve_request("k", "m", 300_000).await.unwrap(), 250_000).await;
    assert_eq!(spent(&b, "daily", "*").await, 0.25);
    assert_eq!(spent(&b, "weekly", "*").await, 0.25);
    assert_eq!(spent(&b, "credit", "*").await, 1.25);
    let report = b.report().await;
    assert_eq!(report[0].period_start, "2025-06-16T00:00:00Z");
    assert_eq!(report[1].resets_at.as_deref(), Some("2025-06-23T00:00:00Z"));
    assert_eq!(report[2].resets_at, None);
    // A year on, the credit still holds what was spent.
    clock.set(NOON + 365 * DAY);
    assert_eq!(spent(&b, "credit", "*").await, 1.25);
    let e = b.reserve_request("k", "m", 500_000).await.unwrap_err();
    assert_eq!(
        (e.budget.as_str(), e.resets_at.as_deref(), e.retry_after),
        ("credit", None, None)
    );
    assert!(e.message().contains("does not reset"), "{}", e.message());
}

#[tokio::test]
async fn warn_budgets_never_refuse_and_cross_each_threshold_once_per_period() {
    let clock = Arc::new(ManualClock::new(NOON));
    let (b, registry) = engine(
        vec![budget("soft", Scope::Key, None, 1.0, Period::Day, OnExceed::Warn)],
        &clock,
    )
    .await;
    let crossed = |t: &str| {
        metric(
            &registry,
            "relaygate_budget_threshold_crossed_total",
            &[("budget", "soft"), ("threshold", t)],
        )
    };
    for _ in 0..30 {
        // Each reserves far more than the cap: a warn budget admits anyway.
        settle(b.reserve_request("k", "m", 5_000_000).await.unwrap(), 100_000).await;
    }
    assert_eq!(spent(&b, "soft", "k").await, 3.0);
    assert_eq!((crossed("0.5"), crossed("0.9")), (1.0, 1.0));
    // Another key has its own budget, and its own crossings.
    settle(b.reserve_request("k2", "m", 0).await.unwrap(), 600_000).await;
    assert_eq!((crossed("0.5"), crossed("0.9")), (2.0, 1.0));
    clock.set(NOON + DAY);
    settle(b.reserve_request("k", "m", 0).await.unwrap(), 950_000).await;
    assert_eq!(
        (crossed("0.5"), crossed("0.9")),
        (3.0, 2.0),
        "once more in the new period"
    );
    assert_eq!(metric(&registry, "relaygate_budget_rejections_total", &[]), 0.0);
}

#[tokio::test]
async fn shadows_and_attempts_meet_only_their_scopes() {
    let clock = Arc::new(ManualClock::new(NOON));
    let (b, _) = engine(
        vec![
            budget("key", Scope::Key, None, 1.0, Period::Day, OnExceed::Reject),
            budget("model", Scope::Model, None, 1.0, Period::Day, OnExceed::Reject),
            budget("relay", Scope::Upstream, Some("u1"), 1.0, Period::Day, OnExceed::Reject),
            budget("all", Scope::Global, None, 1.0, Period::Day, OnExceed::Reject),
        ],
        &clock,
    )
    .await;
    settle(b.reserve_shadow("u1", 1000).await.unwrap(), 1000).await;
    settle(b.reserve_shadow("u2", 1000).await.unwrap(), 1000).await;
    settle(b.reserve_upstream("u1", 1000).await.unwrap(), 1000).await;
    let r = b.report().await;
    let total = |i: usize| r[i].buckets.iter().map(|n| n.spent_usd).sum::<f64>();
    assert_eq!((total(0), total(1)), (0.0, 0.0), "never a client key's or a model's");
    assert_eq!(total(2), 0.002, "the shadow to u1 and the attempt at u1");
    assert_eq!(total(3), 0.002, "both shadows; an attempt is not the global phase");
}

#[tokio::test]
async fn the_ledger_rebuilds_the_current_periods() {
    let clock = Arc::new(ManualClock::new(NOON));
    let (b, registry) = engine(
        vec![
            budget("key", Scope::Key, Some("a"), 1.0, Period::Day, OnExceed::Reject),
            budget("relay", Scope::Upstream, None, 1.0, Period::Day, OnExceed::Reject),
            budget("all", Scope::Global, None, 1.0, Period::Total, OnExceed::Reject),
        ],
        &clock,
    )
    .await;
    let line = |unix, key, shadow, micros| Spend {
        unix,
        key,
        model: "m",
        upstream: Some("u"),
        shadow,
        micros,
    };
    b.restore(line(NOON - 60, "a", false, 600_000));
    b.restore(line(NOON - DAY, "a", false, 300_000)); // yesterday
    b.restore(line(NOON - 30, "a", true, 100_000)); // a shadow
    b.restore(line(NOON - 30, "b", false, 10_000));
    assert_eq!(spent(&b, "key", "a").await, 0.6);
    assert_eq!(spent(&b, "relay", "u").await, 0.71);
    assert_eq!(spent(&b, "all", "*").await, 1.01);
    // Thresholds reached before the restart are not counted again.
    assert_eq!(metric(&registry, "relaygate_budget_threshold_crossed_total", &[]), 0.0);
    assert!(
        b.reserve_request("b", "m", 1).await.is_err(),
        "the total credit is spent"
    );
}
