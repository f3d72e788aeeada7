//! The layers on their own, over a scripted inner service and tokio's
//! paused clock: no socket, no simulator, no wall-clock bound.

use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode};
use tokio::time::Instant;
use tower::retry::budget::Budget;
use tower::{service_fn, Service, ServiceBuilder, ServiceExt};

use super::call::{Answer, AttemptError, Call, CallContext};
use super::circuit::CircuitLayer;
use super::hedge::HedgeLayer;
use super::retry::FailoverPolicy;
use super::route::Route;
use crate::config::Config;
use crate::error::GatewayError;
use crate::outcome::ErrorType;
use crate::ratelimit::Limiter;
use crate::request::Endpoint;
use crate::sse::SseReader;
use crate::telemetry::metrics::Metrics;
use crate::upstream::breaker::{Breaker, State};
use crate::upstream::{Reply, Upstream, UpstreamState};

/// Upstreams `a`, `b` and `c`; model `m` targets them in that priority
/// order. `extra` goes into the TOML (e.g. `[retry]` settings).
async fn setup(extra: &str, model_extra: &str) -> (Arc<Route>, Arc<CallContext>, Metrics) {
    let text = format!(
        r#"
{extra}
[[upstreams]]
name = "a"
base_url = "http://127.0.0.1:9/v1"
[[upstreams]]
name = "b"
base_url = "http://127.0.0.1:9/v1"
[[upstreams]]
name = "c"
base_url = "http://127.0.0.1:9/v1"
[[models]]
name = "m"
{model_extra}
targets = [{{ upstream = "a", priority = 0 }}, {{ upstream = "b", priority = 1 }}, {{ upstream = "c", priority = 2 }}]
"#
    );
    let config = Config::parse(&text, |_| None).expect("valid test config");
    let metrics = Metrics::new();
    let upstreams: Vec<Arc<Upstream>> = config
        .upstreams
        .iter()
        .enumerate()
        .map(|(i, u)| {
            let breaker = Breaker::new(&u.name, u.circuit_breaker.clone(), &metrics);
            let state = Arc::new(UpstreamState::new(breaker, Duration::from_secs(60)));
            Arc::new(Upstream::new(u.clone(), i, state, &metrics).unwrap())
        })
        .collect();
    let route = Arc::new(Route::new(
        &config.models[0],
        &upstreams,
        &config.retry,
        1 << 20,
        &metrics,
        &super::balance::LoadRegistry::default(),
    ));
    let body = Bytes::from_static(br#"{"model":"m","messages":[]}"#);
    let limiter = Limiter::new(config.rate_limit.clone(), Vec::new(), metrics.registry())
        .await
        .unwrap();
    let ctx = Arc::new(CallContext {
        route: route.clone(),
        endpoint: Endpoint::ChatCompletions,
        parsed: crate::request::parse(Endpoint::ChatCompletions, &body).unwrap(),
        body,
        headers: HeaderMap::new(),
        deadline: Instant::now() + Duration::from_secs(60),
        attempts: AtomicU32::new(0),
        limiter,
        estimated_tokens: 0,
        budgets: crate::budget::Budgets::none(),
        budget_micros: 0,
        trace: None,
    });
    (route, ctx, metrics)
}

fn full(status: u16) -> Reply {
    Reply::Full {
        status: StatusCode::from_u16(status).unwrap(),
        headers: HeaderMap::new(),
        body: Bytes::new(),
        usage: None,
    }
}

fn stream() -> Reply {
    Reply::Stream {
        status: StatusCode::OK,
        headers: HeaderMap::new(),
        first: Bytes::from_static(b"data: {}\n\n"),
        reader: SseReader::new(Box::pin(futures_util::stream::empty())),
    }
}

fn answer(call: &Call, reply: Reply) -> Result<Answer, AttemptError> {
    Ok(Answer {
        reply,
        target: call.target,
        started: Instant::now(),
        permit: None,
        admission: None,
        budget: None,
        ticket: None,
        in_flight: None,
    })
}

fn reset(call: &Call) -> Result<Answer, AttemptError> {
    Err(AttemptError {
        error: GatewayError::UpstreamReset {
            upstream: call.upstream().name.to_string(),
        },
        error_type: ErrorType::Reset,
        status: None,
        upstream: Some(call.upstream().index),
    })
}

/// A scripted upstream side: `script(upstream name, its nth call)` gives a
/// delay and a reply. Records the upstreams called, in order.
#[derive(Clone)]
struct Script {
    calls: Arc<Mutex<Vec<String>>>,
}

impl Script {
    fn new() -> Self {
        Self {
            calls: Arc::new(Mutex::new(Vec::new())),
        }
    }

    fn service<F>(
        &self,
        script: F,
    ) -> impl Service<Call, Response = Answer, Error = AttemptError, Future = super::BoxFuture> + Clone + Send + 'static
    where
        F: Fn(&Call, usize) -> (Duration, Result<Answer, AttemptError>) + Clone + Send + Sync + 'static,
    {
        let calls = self.calls.clone();
        service_fn(move |call: Call| -> super::BoxFuture {
            let name = call.upstream().name.to_string();
            let nth = {
                let mut calls = calls.lock().unwrap();
                calls.push(name.clone());
                calls.iter().filter(|n| **n == name).count() - 1
            };
            call.ctx.attempts.fetch_add(1, Ordering::AcqRel);
            let (delay, result) = script(&call, nth);
            Box::pin(async move {
                tokio::time::sleep(delay).await;
                result
            })
        })
    }

    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
}

async fn through_retry(
    route: &Arc<Route>,
    ctx: &Arc<CallContext>,
    inner: impl Service<Call, Response = Answer, Error = AttemptError, Future = super::BoxFuture> + Clone + Send + 'static,
) -> Result<Answer, AttemptError> {
    route.budget.deposit();
    ServiceBuilder::new()
        .layer(tower::retry::RetryLayer::new(FailoverPolicy::new(route.clone())))
        .layer(CircuitLayer)
        .service(inner)
        .oneshot(Call {
            target: 0,
            ctx: ctx.clone(),
        })
        .await
}

fn status_of(result: &Result<Answer, AttemptError>) -> Option<u16> {
    match result {
        Ok(Answer {
            reply: Reply::Full { status, .. },
            ..
        }) => Some(status.as_u16()),
        Ok(_) => Some(200),
        Err(_) => None,
    }
}

#[tokio::test(start_paused = true)]
async fn failover_goes_down_the_priorities_without_waiting() {
    let (route, ctx, metrics) = setup("", "").await;
    let script = Script::new();
    let inner = script.service(|call, _| {
        let reply = match &*call.upstream().name {
            "c" => answer(call, full(200)),
            _ => answer(call, full(502)),
        };
        (Duration::from_millis(10), reply)
    });
    let started = Instant::now();
    let result = through_retry(&route, &ctx, inner).await;
    assert_eq!(status_of(&result), Some(200));
    assert_eq!(script.calls(), ["a", "b", "c"]);
    // Three attempts of 10 ms each, no backoff between different upstreams.
    assert_eq!(started.elapsed(), Duration::from_millis(30));
    let failovers = |from: &str, to: &str| metrics.failovers.with_label_values(&["m", from, to]).get();
    assert_eq!(
        (failovers("a", "b"), failovers("b", "c"), failovers("a", "c")),
        (1, 1, 0)
    );
    assert_eq!(metrics.retries.with_label_values(&["a", "server_error"]).get(), 1);
}

#[tokio::test(start_paused = true)]
async fn the_same_upstream_again_only_after_full_jitter_backoff_within_its_cap() {
    let retry = "[retry]\nmax_attempts = 4\nbase_delay = \"100ms\"\nmax_delay = \"250ms\"";
    let mut longest = Duration::ZERO;
    for _ in 0..20 {
        let (route, ctx, _) = setup(retry, "").await;
        let script = Script::new();
        let inner = script.service(|call, _| (Duration::ZERO, reset(call)));
        let started = Instant::now();
        let result = through_retry(&route, &ctx, inner).await;
        assert!(result.is_err());
        // a, b, c (failovers, no wait), then a again after backoff with
        // attempts = 3: uniform in [0, min(250ms, 100ms * 2^2)), which
        // tokio's millisecond timer rounds up.
        assert_eq!(script.calls(), ["a", "b", "c", "a"]);
        let waited = started.elapsed();
        assert!(waited <= Duration::from_millis(250), "{waited:?}");
        longest = longest.max(waited);
    }
    // Jitter, not zero: all of 20 draws under 100 ms has odds of 0.4^20.
    assert!(longest > Duration::from_millis(100), "{longest:?}");
}

#[tokio::test(start_paused = true)]
async fn an_empty_retry_budget_stops_retries() {
    let retry = "[retry]\nbudget_ratio = 0.0\nmin_retries_per_second = 0";
    let (route, ctx, _) = setup(retry, "").await;
    // Spend what the budget starts with, as earlier requests would have.
    while route.budget.withdraw() {}
    let script = Script::new();
    let inner = script.service(|call, _| (Duration::ZERO, answer(call, full(503))));
    let result = through_retry(&route, &ctx, inner).await;
    assert_eq!(status_of(&result), Some(503), "the failure goes back as it is");
    assert_eq!(script.calls(), ["a"]);
}

#[tokio::test(start_paused = true)]
async fn nothing_is_retried_once_a_stream_has_committed_or_the_answer_is_the_clients() {
    let (route, ctx, _) = setup("", "").await;
    let script = Script::new();
    let inner = script.service(|call, _| (Duration::ZERO, answer(call, stream())));
    let result = through_retry(&route, &ctx, inner).await;
    assert!(matches!(
        result,
        Ok(Answer {
            reply: Reply::Stream { .. },
            ..
        })
    ));
    assert_eq!(script.calls(), ["a"]);

    for status in [400, 404, 501, 505] {
        let (route, ctx, _) = setup("", "").await;
        let script = Script::new();
        let inner = script.service(move |call, _| (Duration::ZERO, answer(call, full(status))));
        let result = through_retry(&route, &ctx, inner).await;
        assert_eq!(status_of(&result), Some(status));
        assert_eq!(script.calls(), ["a"], "{status} is passed through, not retried");
        assert_eq!(
            route.targets[0].upstream.state.breaker.counts(),
            (0, 0, 0),
            "{status} is neutral"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_429_cools_its_upstream_for_the_hint_capped_and_fails_over() {
    let (route, ctx, _) = setup("[retry]\nretry_after_cap = \"5s\"", "").await;
    let script = Script::new();
    let inner = script.service(|call, _| {
        let reply = match &*call.upstream().name {
            "a" => {
                let mut headers = HeaderMap::new();
                headers.insert("retry-after", HeaderValue::from_static("60"));
                Reply::Full {
                    status: StatusCode::TOO_MANY_REQUESTS,
                    headers,
                    body: Bytes::new(),
                    usage: None,
                }
            }
            _ => full(200),
        };
        (Duration::ZERO, answer(call, reply))
    });
    let started = Instant::now();
    let result = through_retry(&route, &ctx, inner).await;
    assert_eq!(status_of(&result), Some(200));
    assert_eq!(script.calls(), ["a", "b"]);
    assert_eq!(started.elapsed(), Duration::ZERO, "no wait before failing over");
    let a = &route.targets[0].upstream;
    assert_eq!(a.state.cooldown(), Duration::from_secs(5), "60 s asked, capped at 5 s");
    assert!(!a.available());
    assert_eq!(a.state.breaker.counts(), (0, 0, 0), "a 429 is not ill health");
    tokio::time::advance(Duration::from_secs(5)).await;
    assert!(a.available());
}

/// Counts futures of the scripted service that were dropped before they
/// finished: a hedge loser must be cancelled, not left running.
struct DropGuard(Arc<AtomicUsize>, bool);

impl Drop for DropGuard {
    fn drop(&mut self) {
        if !self.1 {
            self.0.fetch_add(1, Ordering::AcqRel);
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_hedge_races_the_next_upstream_and_cancels_the_loser() {
    let (route, ctx, metrics) = setup("", "hedge_after = \"100ms\"").await;
    let cancelled = Arc::new(AtomicUsize::new(0));
    let calls = Arc::new(Mutex::new(Vec::new()));
    let inner = {
        let (cancelled, calls) = (cancelled.clone(), calls.clone());
        service_fn(move |call: Call| -> super::BoxFuture {
            let name = call.upstream().name.to_string();
            calls.lock().unwrap().push(name.clone());
            let delay = if name == "a" { 1_000 } else { 50 };
            let guard = DropGuard(cancelled.clone(), false);
            Box::pin(async move {
                let mut guard = guard; // moved in whole, so it drops with the future
                tokio::time::sleep(Duration::from_millis(delay)).await;
                guard.1 = true;
                answer(&call, full(200))
            })
        })
    };
    let mut hedge = ServiceBuilder::new()
        .layer(HedgeLayer::new(route.clone()))
        .service(inner);
    let started = Instant::now();
    let result = hedge.ready().await.unwrap().call(Call { target: 0, ctx }).await;
    let answer = result.unwrap();
    assert_eq!(answer.target, 1, "the hedge to b won");
    assert_eq!(
        started.elapsed(),
        Duration::from_millis(150),
        "hedged at 100 ms, answered 50 ms later"
    );
    assert_eq!(*calls.lock().unwrap(), ["a", "b"]);
    assert_eq!(
        cancelled.load(Ordering::Acquire),
        1,
        "the primary was dropped, which cancels it"
    );
    let hedges = |r: &str| metrics.hedges.with_label_values(&["m", r]).get();
    assert_eq!((hedges("won"), hedges("lost")), (1, 0));
}

#[tokio::test(start_paused = true)]
async fn no_hedge_when_the_primary_answers_in_time_or_the_budget_is_empty() {
    let (route, ctx, metrics) = setup(
        "[retry]\nbudget_ratio = 0.0\nmin_retries_per_second = 0",
        "hedge_after = \"100ms\"",
    )
    .await;
    let script = Script::new();
    let inner = script.service(|call, _| {
        let delay = if &*call.upstream().name == "a" { 300 } else { 1 };
        (Duration::from_millis(delay), answer(call, full(200)))
    });
    while route.budget.withdraw() {}
    let mut hedge = ServiceBuilder::new()
        .layer(HedgeLayer::new(route.clone()))
        .service(inner);
    let result = hedge.ready().await.unwrap().call(Call { target: 0, ctx }).await;
    assert_eq!(result.unwrap().target, 0);
    assert_eq!(script.calls(), ["a"], "an empty budget allows no hedge");
    assert_eq!(metrics.hedges.with_label_values(&["m", "won"]).get(), 0);
}

#[tokio::test(start_paused = true)]
async fn the_circuit_layer_opens_refuses_without_a_call_then_probes_and_closes() {
    let breaker = "[circuit_breaker]\nconsecutive_failures = 2\nopen_for = \"10s\"\nhalf_open_probes = 1";
    let (route, ctx, _) = setup(breaker, "").await;
    let fail = Arc::new(AtomicUsize::new(1));
    let script = Script::new();
    let inner = {
        let fail = fail.clone();
        script.service(move |call, _| {
            let reply = if fail.load(Ordering::Acquire) == 1 {
                full(500)
            } else {
                stream()
            };
            (Duration::ZERO, answer(call, reply))
        })
    };
    let mut circuit = ServiceBuilder::new().layer(CircuitLayer).service(inner);
    let call = || Call {
        target: 0,
        ctx: ctx.clone(),
    };
    let a = &route.targets[0].upstream.state.breaker;
    for _ in 0..2 {
        let _ = circuit.ready().await.unwrap().call(call()).await;
    }
    assert_eq!(a.state(), State::Open);
    let refused = circuit.ready().await.unwrap().call(call()).await;
    assert!(matches!(
        refused,
        Err(AttemptError {
            error_type: ErrorType::CircuitOpen,
            ..
        })
    ));
    assert_eq!(script.calls().len(), 2, "an open breaker makes no upstream call");

    tokio::time::advance(Duration::from_secs(10)).await;
    fail.store(0, Ordering::Release);
    let probe = circuit.ready().await.unwrap().call(call()).await.unwrap();
    assert!(probe.ticket.is_none(), "a probe settles at its first event");
    assert_eq!(a.state(), State::Closed);

    // Closed: a committed stream carries its verdict to its end.
    let answer = circuit.ready().await.unwrap().call(call()).await.unwrap();
    let ticket = answer.ticket.expect("the stream's verdict is owed");
    assert_eq!(a.counts().0, 0, "nothing counted at the first event");
    ticket.failure(ErrorType::Reset);
    assert_eq!(a.counts(), (1, 1, 1), "the stream counts once, as a failure");
}
