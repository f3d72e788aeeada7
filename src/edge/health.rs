//! Health endpoints: `/health/live` (the process runs), `/health/ready`
//! (serving, 503 while draining) and `/health` (a JSON summary).

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json, Response};
use serde_json::{json, Value};

use crate::gateway::state::{AppState, Runtime};
use crate::telemetry::window::Summary;
use crate::upstream::breaker::State as BreakerState;

pub async fn live() -> Response {
    Json(json!({ "status": "alive" })).into_response()
}

pub async fn ready(State(state): State<AppState>) -> Response {
    if state.is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, Json(json!({ "status": "draining" }))).into_response()
    } else {
        Json(json!({ "status": "ready" })).into_response()
    }
}

/// What `/health` reports; the status page (`edge::status`) shows the same.
pub struct Report {
    /// `healthy`, `degraded`, `unhealthy` or `draining`.
    pub status: &'static str,
    pub overall: Summary,
    /// Each upstream's window, in config order (`Runtime::upstreams`).
    pub upstreams: Vec<Summary>,
}

/// The status over the rolling window (`health.window`, 5 minutes by
/// default), overall and per upstream, with breaker states.
///
/// - `degraded`: success below `health.degraded_below` (99%), or any breaker open;
/// - `unhealthy`: success below `health.unhealthy_below` (90%), or every breaker open;
/// - `draining`: shutting down.
pub fn report(state: &AppState, runtime: &Runtime) -> Report {
    let cfg = &runtime.config.health;
    let overall = state.sinks().window.summary();
    let upstreams: Vec<Summary> = runtime.upstreams.iter().map(|u| u.state.window.summary()).collect();
    let open = runtime
        .upstreams
        .iter()
        .filter(|u| matches!(u.state.breaker.state(), BreakerState::Open | BreakerState::ForcedOpen))
        .count();
    let rate = overall.success_rate;
    let status = if state.is_draining() {
        "draining"
    } else if (open > 0 && open == upstreams.len()) || rate.is_some_and(|r| r < cfg.unhealthy_below) {
        "unhealthy"
    } else if open > 0 || rate.is_some_and(|r| r < cfg.degraded_below) {
        "degraded"
    } else {
        "healthy"
    };
    Report {
        status,
        overall,
        upstreams,
    }
}

/// `/health`: the `Report` as JSON. The HTTP status is 503 for `unhealthy`
/// and `draining`, else 200.
pub async fn summary(State(state): State<AppState>) -> Response {
    let runtime = state.runtime();
    let report = report(&state, &runtime);
    let upstreams: Vec<Value> = runtime
        .upstreams
        .iter()
        .zip(&report.upstreams)
        .map(|(u, window)| {
            let mut v = serde_json::to_value(window).unwrap_or_default();
            v["name"] = json!(&*u.name);
            v["breaker"] = json!(u.state.breaker.state().as_str());
            v
        })
        .collect();
    let code = if matches!(report.status, "unhealthy" | "draining") {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    let mut body = serde_json::to_value(&report.overall).unwrap_or_default();
    body["status"] = json!(report.status);
    body["version"] = json!(env!("CARGO_PKG_VERSION"));
    body["uptime_seconds"] = json!(state.uptime().as_secs());
    body["in_flight"] = json!(state.metrics().in_flight.get());
    body["upstreams"] = json!(upstreams);
    (code, Json(body)).into_response()
}
