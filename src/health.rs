//! Health endpoints: `/health/live` (the process runs), `/health/ready`
//! (serving, 503 while draining) and `/health` (a JSON summary).

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json, Response};
use serde_json::json;

use crate::app::AppState;

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

pub async fn summary(State(state): State<AppState>) -> Response {
    let runtime = state.runtime();
    let upstreams: Vec<_> = runtime.upstreams.iter().map(|u| json!({ "name": &*u.name })).collect();
    let status = if state.is_draining() { "draining" } else { "healthy" };
    let code = if state.is_draining() {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    let body = json!({
        "status": status,
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": state.uptime().as_secs(),
        "in_flight": state.metrics().in_flight.get(),
        "upstreams": upstreams,
    });
    (code, Json(body)).into_response()
}
