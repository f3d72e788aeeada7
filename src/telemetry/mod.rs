//! What observes requests: Prometheus metrics, the access log, the usage
//! ledger, OTLP traces, the `/health` windows, and log setup.

pub mod access_log;
pub mod comparison;
pub mod ledger;
pub mod logging;
pub mod metrics;
pub mod otel;
pub mod request;
pub mod window;

use std::sync::Arc;

use comparison::Comparison;
use ledger::Ledger;
use metrics::{Metrics, ModelMetrics};
use otel::Exporter;
use window::Window;

/// Where finished requests are recorded; one per app.
pub struct Sinks {
    pub metrics: Arc<Metrics>,
    /// The handles of the model label `other`, for requests that never
    /// matched a configured model.
    pub other_model: Arc<ModelMetrics>,
    /// All requests, for `/health`.
    pub window: Window,
    pub ledger: Option<Ledger>,
    pub otel: Option<Exporter>,
    /// Primary vs shadow, per shadowed model (`GET /admin/shadow`).
    pub comparison: Comparison,
}
