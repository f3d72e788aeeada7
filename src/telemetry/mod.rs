//! What observes requests: Prometheus metrics, the access log, the usage
//! ledger, OTLP traces, the `/health` windows, and log setup.

pub mod access_log;
pub mod ledger;
pub mod logging;
pub mod metrics;
pub mod otel;
pub mod window;
