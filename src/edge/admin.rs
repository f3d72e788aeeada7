//! The admin API, under `/admin`, behind `Authorization: Bearer <[admin] key>`.
//! Without a configured key it is off (404). A missing key gets 401, a wrong
//! one 403. Nothing it returns contains a secret: upstreams are shown by
//! name and host, never by key.
//!
//! - `GET  /admin/upstreams`               breaker state, counts, cooldown, last error, routing estimates
//! - `POST /admin/upstreams/{name}/reset`  force the breaker closed, clear a 429 cooldown
//! - `POST /admin/upstreams/{name}/open`   drain an upstream by hand (open until reset)
//! - `POST /admin/reload`                  re-read the config file (like SIGHUP)
//! - `GET  /admin/shadow`                  primary vs shadow comparison per shadowed model
//! - `GET  /admin/cache`                   response cache: entries, bytes and hit ratio per model
//! - `DELETE /admin/cache[?model=NAME]`    purge the response cache, or one model's entries
//! - `GET  /admin/budgets`                 spend budgets: spent, reserved, limit and reset per name

use axum::extract::{Path, Query, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use axum::Router;
use http::{HeaderMap, StatusCode};
use serde_json::{json, Value};
use subtle::ConstantTimeEq;

use crate::error::GatewayError;
use crate::gateway::auth::bearer;
use crate::gateway::state::{AppState, Runtime};
use crate::upstream::Upstream;

pub fn router(state: AppState) -> Router<AppState> {
    Router::new()
        .route("/admin/upstreams", get(upstreams))
        .route("/admin/upstreams/{name}/reset", post(reset))
        .route("/admin/upstreams/{name}/open", post(open))
        .route("/admin/reload", post(reload))
        .route("/admin/shadow", get(shadow))
        .route("/admin/cache", get(cache_stats).delete(cache_purge))
        .route("/admin/budgets", get(budgets))
        .route_layer(axum::middleware::from_fn_with_state(state, require_admin))
}

fn admin_error(status: StatusCode, code: &str, message: &str) -> Response {
    let body = json!({ "error": { "message": message, "type": "invalid_request_error", "code": code, "param": null } });
    (status, Json(body)).into_response()
}

/// What a request's `Authorization` header is worth to the admin API.
pub enum Access {
    /// No `[admin] key` configured: the admin API is off.
    Off,
    Missing,
    Granted,
    Wrong,
}

/// Checks the bearer token against `[admin] key`, in constant time.
pub fn access(runtime: &Runtime, headers: &HeaderMap) -> Access {
    let Some(key) = &runtime.config.admin_key else {
        return Access::Off;
    };
    match bearer(headers) {
        None => Access::Missing,
        Some(token) if bool::from(key.expose().as_bytes().ct_eq(token)) => Access::Granted,
        Some(_) => Access::Wrong,
    }
}

/// The answer to a wrong admin key (403, OpenAI-shaped).
pub fn wrong_key() -> Response {
    admin_error(StatusCode::FORBIDDEN, "invalid_admin_key", "Incorrect admin key.")
}

async fn require_admin(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let runtime = state.runtime();
    match access(&runtime, req.headers()) {
        Access::Off => GatewayError::NotFound {
            method: req.method().to_string(),
            path: req.uri().path().to_owned(),
        }
        .into_response(),
        Access::Missing => admin_error(
            StatusCode::UNAUTHORIZED,
            "missing_admin_key",
            "The admin API needs 'Authorization: Bearer <admin key>'.",
        ),
        Access::Granted => next.run(req).await,
        Access::Wrong => wrong_key(),
    }
}

/// The public description of one upstream.
pub fn describe(u: &Upstream) -> Value {
    let breaker = &u.state.breaker;
    let (requests, failures, consecutive) = breaker.counts();
    let last_error = breaker
        .last_error()
        .map(|(class, ago)| json!({ "class": class.as_str(), "seconds_ago": ago.as_secs_f64() }));
    json!({
        "name": &*u.name,
        "host": u.host,
        "breaker": {
            "state": breaker.state().as_str(),
            "state_seconds": breaker.since().as_secs_f64(),
            "last_open_reason": breaker.open_reason().map(|r| r.as_str()),
            "open_remaining_seconds": breaker.retry_after().as_secs_f64(),
            "window_requests": requests,
            "window_failures": failures,
            "failure_rate": if requests == 0 { 0.0 } else { f64::from(failures) / f64::from(requests) },
            "consecutive_failures": consecutive,
        },
        "cooldown_remaining_seconds": u.state.cooldown().as_secs_f64(),
        "max_concurrency": u.config.max_concurrency,
        "available_slots": u.limit.as_ref().map(|l| l.available_permits()),
        "last_error": last_error,
    })
}

async fn upstreams(State(state): State<AppState>) -> Response {
    let runtime = state.runtime();
    let mut list: Vec<Value> = runtime.upstreams.iter().map(|u| describe(u)).collect();
    for (u, v) in runtime.upstreams.iter().zip(&mut list) {
        v["routing"] = Value::Array(routing(&runtime, u.index));
    }
    Json(json!({ "upstreams": list })).into_response()
}

/// The routing estimates of the latency- and cost-routed targets on one
/// upstream: per model, what the picks compare.
fn routing(runtime: &Runtime, upstream: usize) -> Vec<Value> {
    let mut out = Vec::new();
    for model in &runtime.models {
        let route = &model.route;
        let Some(loads) = route.loads() else { continue };
        for (target, load) in route.targets.iter().zip(loads) {
            if target.upstream.index != upstream {
                continue;
            }
            out.push(json!({
                "model": &*route.label,
                "upstream_model": target.model,
                "strategy": route.routing.strategy.as_str(),
                "priority": target.priority,
                "price_per_mtok_blended": target.price.map(|p| p.blended()),
                "estimate_seconds": load.estimate,
                "in_flight": load.in_flight,
                "waiting_first_byte": load.waiting,
                "state": load.state,
            }));
        }
    }
    out
}

/// Applies `action` to the named upstream and answers with its new state.
fn act_on(state: &AppState, name: &str, action: impl Fn(&Upstream)) -> Response {
    let runtime = state.runtime();
    match runtime.upstreams.iter().find(|u| &*u.name == name) {
        None => admin_error(
            StatusCode::NOT_FOUND,
            "upstream_not_found",
            &format!("No upstream named {:?}.", crate::error::clip(name)),
        ),
        Some(u) => {
            action(u);
            Json(describe(u)).into_response()
        }
    }
}

async fn reset(State(state): State<AppState>, Path(name): Path<String>) -> Response {
    act_on(&state, &name, |u| {
        u.state.breaker.reset();
        u.state.clear_cooldown();
        tracing::info!(upstream = %u.name, "admin: breaker reset");
    })
}

async fn open(State(state): State<AppState>, Path(name): Path<String>) -> Response {
    act_on(&state, &name, |u| {
        u.state.breaker.force_open();
        tracing::info!(upstream = %u.name, "admin: upstream drained by hand");
    })
}

/// Primary vs shadow per shadowed model, since start.
async fn shadow(State(state): State<AppState>) -> Response {
    Json(json!({ "models": state.sinks().comparison.report() })).into_response()
}

async fn reload(State(state): State<AppState>) -> Response {
    match state.reload() {
        Ok(()) => Json(json!({ "result": "success" })).into_response(),
        Err(e) => admin_error(StatusCode::UNPROCESSABLE_ENTITY, "reload_failed", &e),
    }
}

/// Each budget's current period: per name, spent, reserved and what is
/// left; the cap, the period and when it resets. With Redis, read from
/// Redis (`source` says when it did not answer and this is the local view).
async fn budgets(State(state): State<AppState>) -> Response {
    let budgets = state.budgets();
    Json(json!({
        "budgets": budgets.report().await,
        "pending_settles": budgets.pending_settles(),
    }))
    .into_response()
}

fn cache_off() -> Response {
    admin_error(
        StatusCode::NOT_FOUND,
        "cache_not_configured",
        "The response cache is off: no [cache] section and no model with `cache`.",
    )
}

/// Entries and bytes per model as the backend holds them, and each
/// model's lookups since start.
async fn cache_stats(State(state): State<AppState>) -> Response {
    use crate::cache::CacheResult::{Hit, Miss};
    let Some(cache) = state.cache() else {
        return cache_off();
    };
    let stored = match cache.per_model().await {
        Ok(stored) => stored,
        Err(e) => return admin_error(StatusCode::SERVICE_UNAVAILABLE, "cache_backend_unavailable", &e),
    };
    let runtime = state.runtime();
    let mut names: Vec<String> = runtime
        .models
        .iter()
        .filter(|m| m.config.cache.is_some())
        .map(|m| m.config.name.clone())
        .collect();
    // Entries of models no longer configured (or no longer cached) too.
    for (model, _, _) in &stored {
        if !names.contains(model) {
            names.push(model.clone());
        }
    }
    let models: Vec<Value> = names
        .iter()
        .map(|name| {
            let (entries, bytes) = stored
                .iter()
                .find(|(m, _, _)| m == name)
                .map_or((0, 0), |(_, n, b)| (*n, *b));
            let (hits, misses) = (cache.metrics.get(name, Hit), cache.metrics.get(name, Miss));
            let lookups = hits + misses;
            json!({
                "model": name,
                "entries": entries,
                "bytes": bytes,
                "hits": hits,
                "misses": misses,
                "hit_ratio": if lookups == 0 { Value::Null } else { json!(hits as f64 / lookups as f64) },
            })
        })
        .collect();
    Json(json!({
        "backend": cache.backend_name(),
        "flights_in_progress": cache.flights_in_progress(),
        "models": models,
    }))
    .into_response()
}

#[derive(serde::Deserialize)]
struct PurgeQuery {
    model: Option<String>,
}

async fn cache_purge(State(state): State<AppState>, Query(q): Query<PurgeQuery>) -> Response {
    let Some(cache) = state.cache() else {
        return cache_off();
    };
    let model = q.model.as_deref().map(crate::error::clip);
    match cache.purge(q.model.as_deref()).await {
        Ok(removed) => {
            let model = model.as_deref().unwrap_or("*");
            tracing::info!(model, removed, "admin: response cache purged");
            Json(json!({ "purged": model, "entries_removed": removed })).into_response()
        }
        Err(e) => admin_error(StatusCode::SERVICE_UNAVAILABLE, "cache_backend_unavailable", &e),
    }
}
