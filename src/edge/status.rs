//! The status page: `GET /` and `/status` (one HTML page), its script and
//! style (`/status.js`, `/status.css`, `/favicon.svg`), and the JSON it polls
//! every 2 s (`/status.json`). All of it is compiled into the binary
//! (`include_str!`), 26 KiB, and nothing on it loads from elsewhere.
//!
//! **No cost on the proxied path.** `/status.json` reads what exists
//! already: the `/health` windows (`health::report`), breaker and cooldown
//! state (`admin::describe`), and the Prometheus counters and histograms,
//! as cumulative totals. The page keeps the last 5 minutes of polls and
//! draws rates and per-interval percentiles from their differences, so the
//! server keeps no history and no state per viewer.
//!
//! **Access.** Without a key the JSON holds what `/health` and `/metrics`
//! already publish without one (plus the breaker's timing and reason, and
//! the config's model targets). With `Authorization: Bearer <admin key>` it
//! adds an `admin` section: client key names, rate-limit matches on keys,
//! and the shadow comparison of `/admin/shadow`. A wrong key is a 403.
//! Secrets never appear: upstream, client and admin keys are `Secret`s,
//! which do not serialise.
//!
//! **Panels come and go with their section.** Every panel after the first
//! two is an optional top-level key (`rate_limits`, `shadow`, `admin`; later
//! `cache`, `budgets`, `routing`), absent when its feature is not
//! configured, and the page shows a panel only when its key is there.

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use axum::Router;
use prometheus::core::Collector;
use prometheus::proto::{Metric, MetricFamily};
use serde_json::{json, Map, Value};

use crate::edge::admin::{self, Access};
use crate::edge::health;
use crate::gateway::state::{AppState, Runtime};
use crate::outcome::ErrorType;
use crate::telemetry::metrics::{REQUEST_BUCKETS, TTFT_BUCKETS};
use crate::upstream::breaker::State as BreakerState;

const INDEX_HTML: &str = include_str!("status/index.html");
const STATUS_JS: &str = include_str!("status/status.js");
const STATUS_CSS: &str = include_str!("status/status.css");
const FAVICON_SVG: &str = include_str!("status/favicon.svg");

/// Same-origin script, style, images and fetches only; no inline script or
/// style (the page has none), no frames, no form posts (the admin key form
/// is handled by the script, so it cannot leak the key into a URL even if
/// the script fails).
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; \
                   frame-ancestors 'none'";

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/", get(page))
        .route("/status", get(page))
        .route("/status.js", get(|| asset("text/javascript; charset=utf-8", STATUS_JS)))
        .route("/status.css", get(|| asset("text/css; charset=utf-8", STATUS_CSS)))
        .route("/favicon.svg", get(|| asset("image/svg+xml", FAVICON_SVG)))
        .route("/status.json", get(status_json))
}

/// The headers every status response carries.
fn hardened(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

async fn page() -> Response {
    asset("text/html; charset=utf-8", INDEX_HTML).await
}

async fn asset(content_type: &'static str, body: &'static str) -> Response {
    hardened(([(header::CONTENT_TYPE, HeaderValue::from_static(content_type))], body).into_response())
}

async fn status_json(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let runtime = state.runtime();
    let admin = match admin::access(&runtime, &headers) {
        Access::Granted => true,
        Access::Off | Access::Missing => false,
        Access::Wrong => return hardened(admin::wrong_key()),
    };
    let mut body = snapshot(&state, &runtime, admin);
    if let Some(budgets) = budgets(&state, admin).await {
        body["budgets"] = budgets;
    }
    let mut response = Json(body).into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// The whole `/status.json` body.
pub fn snapshot(state: &AppState, runtime: &Runtime, admin: bool) -> Value {
    let metrics = state.metrics();
    let report = health::report(state, runtime);
    let requests = Samples::of(&metrics.requests);
    let durations = Samples::of(&metrics.request_duration);
    let ttfts = Samples::of(&metrics.ttft);

    let mut overall = serde_json::to_value(&report.overall).unwrap_or_default();
    overall["in_flight"] = json!(metrics.in_flight.get());
    overall["totals"] = request_totals(&requests, |_| true);
    overall["latency_buckets"] = json!(durations.buckets(|_| true));
    overall["ttft_buckets"] = json!(ttfts.buckets(|_| true));

    let mut body = json!({
        "version": env!("CARGO_PKG_VERSION"),
        "status": report.status,
        "uptime_ms": state.uptime().as_millis() as u64,
        "admin_enabled": runtime.config.admin_key.is_some(),
        "bounds": { "latency_seconds": REQUEST_BUCKETS, "ttft_seconds": TTFT_BUCKETS },
        "overall": overall,
        "upstreams": upstreams(state, runtime, &report, &ttfts, admin),
        "models": models(state, runtime, &requests, &durations),
    });
    let limits: Vec<Value> = state
        .limiter()
        .rejections()
        .map(|(rule, refused)| {
            // A key-scoped rule's match is a client key name: admin only.
            let shown = admin || rule.scope != crate::ratelimit::Scope::Key;
            json!({
                "name": rule.name,
                "scope": rule.scope.as_str(),
                "match": rule.matches.as_ref().filter(|_| shown),
                "requests_per_minute": rule.requests.map(|l| l.per_minute),
                "tokens_per_minute": rule.tokens.map(|l| l.per_minute),
                "queues": rule.on_limit == crate::ratelimit::OnLimit::Queue,
                "rejected": refused,
            })
        })
        .collect();
    if !limits.is_empty() {
        body["rate_limits"] = json!(limits);
    }
    if let Some(cache) = state.cache() {
        body["cache"] = cache_section(cache, runtime);
    }
    let routing = routing(state, runtime);
    if !routing.is_empty() {
        body["routing"] = json!(routing);
    }
    let shadows = shadows(state, runtime);
    if !shadows.is_empty() {
        body["shadow"] = json!(shadows);
    }
    if admin {
        let keys: Vec<&str> = runtime.config.keys.iter().map(|k| k.name.as_str()).collect();
        body["admin"] = json!({
            "keys": keys,
            "hosts": runtime.upstreams.iter().map(|u| (u.name.to_string(), json!(u.host))).collect::<Map<_, _>>(),
            "comparison": state.sinks().comparison.report(),
        });
    }
    body
}

fn upstreams(state: &AppState, runtime: &Runtime, report: &health::Report, ttfts: &Samples, admin: bool) -> Vec<Value> {
    let metrics = state.metrics();
    let attempts = Samples::of(&metrics.upstream_requests);
    let retries = Samples::of(&metrics.retries);
    let durations = Samples::of(&metrics.upstream_duration);
    runtime
        .upstreams
        .iter()
        .zip(&report.upstreams)
        .map(|(u, window)| {
            let name = &*u.name;
            let mut v = admin::describe(u);
            if !admin {
                // The host of base_url is not on /health; it is on /admin/upstreams.
                v.as_object_mut().map(|o| o.remove("host"));
            }
            let breaker = u.state.breaker.state();
            v["breaker"]["next_probe_seconds"] = match breaker {
                BreakerState::Open => json!(u.state.breaker.retry_after().as_secs_f64()),
                BreakerState::HalfOpen => json!(0.0),
                BreakerState::Closed | BreakerState::ForcedOpen => Value::Null,
            };
            v["window"] = serde_json::to_value(window).unwrap_or_default();
            // Counted only where a semaphore exists (max_concurrency > 0):
            // counting every upstream would add work per attempt.
            v["in_flight"] = json!(u
                .limit
                .as_ref()
                .map(|l| u.config.max_concurrency.saturating_sub(l.available_permits())));
            let of = |m: &Metric| label(m, "upstream") == name;
            let error = |m: &Metric| {
                let e = label(m, "error_type");
                ErrorType::ALL.iter().find(|t| t.as_str() == e).copied()
            };
            v["totals"] = json!({
                "attempts": attempts.sum(of),
                "ok": attempts.sum(|m| of(m) && error(m) == Some(ErrorType::None)),
                "failed": attempts.sum(|m| of(m) && error(m).is_some_and(is_failure)),
                "rate_limited": attempts.sum(|m| of(m) && error(m) == Some(ErrorType::RateLimited)),
                "retries": retries.sum(of),
            });
            v["latency_buckets"] = json!(durations.buckets(of));
            v["ttft_buckets"] = json!(ttfts.buckets(of));
            v
        })
        .collect()
}

/// An attempt's error that counts against the upstream's health (the
/// breaker's failures, `outcome.rs`).
fn is_failure(e: ErrorType) -> bool {
    matches!(
        e,
        ErrorType::Connect | ErrorType::Timeout | ErrorType::Reset | ErrorType::ServerError | ErrorType::Malformed
    )
}

fn models(state: &AppState, runtime: &Runtime, requests: &Samples, durations: &Samples) -> Vec<Value> {
    let metrics = state.metrics();
    let failovers = Samples::of(&metrics.failovers);
    let hedges = Samples::of(&metrics.hedges);
    let cost = Samples::of(&metrics.cost);
    runtime
        .models
        .iter()
        .map(|m| {
            let name = m.config.name.as_str();
            let of = |s: &Metric| label(s, "model") == name;
            let targets: Vec<Value> = m
                .route
                .targets
                .iter()
                .map(|t| json!({ "upstream": &*t.upstream.name, "model": t.model, "priority": t.priority, "weight": t.weight }))
                .collect();
            // Which upstreams answered (or were last tried), `cache` for
            // cache hits: requests by upstream; the page turns them into shares.
            let mut served = Map::new();
            for sample in requests.series().filter(|s| of(s)) {
                let upstream = label(sample, "upstream");
                if upstream != "none" {
                    let n = served.get(upstream).and_then(Value::as_f64).unwrap_or(0.0);
                    served.insert(upstream.to_owned(), json!(n + sample.get_counter().value()));
                }
            }
            let mut totals = request_totals(requests, of);
            totals["failovers"] = json!(failovers.sum(of));
            totals["hedges"] = json!(hedges.sum(of));
            totals["cost_usd"] = json!(cost.sum(of));
            totals["requests_by_upstream"] = Value::Object(served);
            json!({
                "name": name,
                "targets": targets,
                "hedge_after": m.config.hedge.map(|h| match h {
                    crate::config::Hedge::After(d) => humantime::format_duration(d).to_string(),
                    crate::config::Hedge::P95 => "p95".to_owned(),
                }),
                "shadowed": m.shadow.is_some(),
                "totals": totals,
                "latency_buckets": durations.buckets(of),
            })
        })
        .collect()
}

/// The response cache: its backend and size, and per cache-enabled model
/// the lookups and stores since start and what the hits saved.
fn cache_section(cache: &crate::cache::Cache, runtime: &Runtime) -> Value {
    use crate::cache::CacheResult::*;
    let models: Vec<Value> = runtime
        .models
        .iter()
        .filter(|m| m.config.cache.is_some())
        .map(|m| {
            let name = m.config.name.as_str();
            let mut totals = Map::new();
            for result in [Hit, Miss, Bypass, Refresh, Stored, NotStored] {
                totals.insert(result.as_str().to_owned(), json!(cache.metrics.get(name, result)));
            }
            totals.insert("saved_usd".into(), json!(cache.metrics.saved_usd(name)));
            json!({ "model": name, "totals": totals })
        })
        .collect();
    let (entries, bytes) = cache.size().unzip();
    json!({ "backend": cache.backend_name(), "entries": entries, "bytes": bytes, "models": models })
}

/// Spend budgets, as `/admin/budgets` reports them (with Redis, read from
/// it: one call per poll, bounded by its timeout). A key-scoped budget's
/// buckets are client key names: their spend and the rule's `match` need
/// the admin key, like `/admin`; the budget's cap and period do not.
async fn budgets(state: &AppState, admin: bool) -> Option<Value> {
    let report = state.budgets().report().await;
    if report.is_empty() {
        return None;
    }
    let mut list = serde_json::to_value(report).ok()?;
    if !admin {
        for b in list.as_array_mut()?.iter_mut().filter(|b| b["scope"] == "key") {
            b["match"] = Value::Null;
            b["buckets"] = json!([]);
            b["buckets_hidden"] = json!(true);
        }
    }
    Some(list)
}

/// The latency- and cost-routed models: each target's estimate and state
/// (what the picks compare, `stack::balance`), and the picks since start.
fn routing(state: &AppState, runtime: &Runtime) -> Vec<Value> {
    let picks = Samples::of(&state.metrics().route_picks);
    runtime
        .models
        .iter()
        .filter_map(|m| {
            let route = &m.route;
            let loads = route.loads()?;
            let name = m.config.name.as_str();
            let targets: Vec<Value> = route
                .targets
                .iter()
                .zip(loads)
                .map(|(t, load)| {
                    let upstream = &*t.upstream.name;
                    json!({
                        "upstream": upstream,
                        "model": t.model,
                        "priority": t.priority,
                        "estimate_seconds": load.estimate,
                        "in_flight": load.in_flight,
                        "state": load.state,
                        "picks": picks.sum(|s| label(s, "model") == name && label(s, "upstream") == upstream),
                    })
                })
                .collect();
            Some(json!({ "model": name, "strategy": route.routing.strategy.as_str(), "targets": targets }))
        })
        .collect()
}

/// Requests, those that count toward the success rate (as in the `/health`
/// window: not a client error, a rate limit or a cancel), and successes.
fn request_totals(requests: &Samples, keep: impl Fn(&Metric) -> bool) -> Value {
    let outcome = |m: &Metric| label(m, "outcome").to_owned();
    json!({
        "requests": requests.sum(&keep),
        "eligible": requests.sum(|m| keep(m) && !matches!(&*outcome(m), "client_error" | "rate_limited" | "cancelled")),
        "ok": requests.sum(|m| keep(m) && outcome(m) == "success"),
    })
}

fn shadows(state: &AppState, runtime: &Runtime) -> Vec<Value> {
    let metrics = state.metrics();
    let requests = Samples::of(&metrics.shadow_requests);
    let cost = Samples::of(&metrics.shadow_cost);
    let dropped = Samples::of(&metrics.shadow_dropped);
    runtime
        .models
        .iter()
        .filter_map(|m| Some((m, m.config.shadow.as_ref()?)))
        .map(|(m, s)| {
            let name = m.config.name.as_str();
            let of = |x: &Metric| label(x, "model") == name;
            json!({
                "model": name,
                "upstream": runtime.config.upstreams[s.upstream].name,
                "upstream_model": s.model,
                "sample": s.sample,
                "totals": {
                    "requests": requests.sum(of),
                    "ok": requests.sum(|x| of(x) && label(x, "outcome") == "success"),
                    "dropped": dropped.sum(of),
                    "cost_usd": cost.sum(of),
                },
            })
        })
        .collect()
}

/// The series of one metric family, read once per poll: a few dozen
/// atomics, never a lock the request path takes.
struct Samples(Vec<MetricFamily>);

impl Samples {
    fn of(collector: &impl Collector) -> Self {
        Samples(collector.collect())
    }

    fn series(&self) -> impl Iterator<Item = &Metric> {
        self.0.iter().flat_map(|f| f.get_metric())
    }

    /// The sum of the counters that `keep` picks.
    fn sum(&self, keep: impl Fn(&Metric) -> bool) -> f64 {
        self.series().filter(|m| keep(m)).map(|m| m.get_counter().value()).sum()
    }

    /// The histograms that `keep` picks, added: cumulative counts per bucket
    /// bound, then the total count (the `+Inf` bucket).
    fn buckets(&self, keep: impl Fn(&Metric) -> bool) -> Vec<u64> {
        let mut out: Vec<u64> = Vec::new();
        for m in self.series().filter(|m| keep(m)) {
            let h = m.get_histogram();
            let counts = h.get_bucket().iter().map(|b| b.cumulative_count());
            let counts: Vec<u64> = counts.chain([h.get_sample_count()]).collect();
            if out.is_empty() {
                out = counts;
            } else {
                out.iter_mut().zip(counts).for_each(|(a, b)| *a += b);
            }
        }
        out
    }
}

fn label<'a>(m: &'a Metric, name: &str) -> &'a str {
    m.get_label()
        .iter()
        .find(|l| l.name() == name)
        .map_or("", |l| l.value())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    /// Every group of cumulative counts in a snapshot has one count per bucket
    /// bound plus the total; `bounds` says which bounds.
    fn bucket_lengths(v: &Value) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        let mut walk = vec![("".to_owned(), v)];
        while let Some((path, v)) = walk.pop() {
            match v {
                Value::Object(o) => walk.extend(o.iter().map(|(k, v)| (format!("{path}.{k}"), v))),
                Value::Array(a) if path.ends_with("_buckets") => {
                    out.insert(path, a.len());
                }
                Value::Array(a) => walk.extend(a.iter().enumerate().map(|(i, v)| (format!("{path}[{i}]"), v))),
                _ => {}
            }
        }
        out
    }

    fn config(extra: &str) -> crate::Config {
        let text = format!(
            r#"
[admin]
key = "sk-admin-secret-000"
[[keys]]
name = "app-a"
key = "sk-client-secret-111"
[[upstreams]]
name = "a"
base_url = "http://127.0.0.1:9/v1"
api_key = "sk-upstream-secret-222"
[[models]]
name = "chat"
targets = [{{ upstream = "a", model = "m" }}]
{extra}
"#
        );
        crate::Config::parse(&text, |_| None).expect("valid")
    }

    #[tokio::test]
    async fn optional_sections_appear_only_when_configured() {
        let state = AppState::new(config("")).await.unwrap();
        let v = snapshot(&state, &state.runtime(), false);
        for absent in ["rate_limits", "shadow", "admin", "cache", "budgets", "routing"] {
            assert!(v.get(absent).is_none(), "{absent} in {v}");
        }
        let limited = config("[[rate_limits]]\nscope = \"key\"\nmatch = \"app-a\"\nrequests_per_minute = 60\n");
        let state = AppState::new(limited).await.unwrap();
        let public = snapshot(&state, &state.runtime(), false);
        assert_eq!(public["rate_limits"][0]["rejected"], 0);
        assert_eq!(
            public["rate_limits"][0]["match"],
            Value::Null,
            "a key name is admin-only"
        );
        let admin = snapshot(&state, &state.runtime(), true);
        assert_eq!(admin["rate_limits"][0]["match"], "app-a");
        assert_eq!(admin["admin"]["keys"][0], "app-a");
        assert!(public.get("admin").is_none());
        assert!(public["upstreams"][0].get("host").is_none());
    }

    #[tokio::test]
    async fn histograms_carry_one_count_per_bound_and_the_total() {
        let state = AppState::new(config("")).await.unwrap();
        let runtime = state.runtime();
        runtime.models[0].metrics.duration.observe(0.2);
        let v = snapshot(&state, &runtime, false);
        let lengths = bucket_lengths(&v);
        assert!(lengths.contains_key(".overall.latency_buckets"), "{lengths:?}");
        for (path, len) in &lengths {
            let bounds = if path.contains("ttft") {
                TTFT_BUCKETS
            } else {
                REQUEST_BUCKETS
            };
            // Empty: no series yet (a TTFT before the first stream).
            assert!(*len == 0 || *len == bounds.len() + 1, "{path}: {len}");
        }
        let overall = v["overall"]["latency_buckets"].as_array().unwrap();
        assert_eq!(overall.last().unwrap(), 1);
        let le_025 = REQUEST_BUCKETS.iter().position(|&b| b == 0.25).unwrap();
        assert_eq!(overall[le_025], 1);
        assert_eq!(overall[le_025 - 1], 0);
    }
}
