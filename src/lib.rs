//! relaygate: a reverse-proxy gateway for OpenAI-compatible LLM APIs.
//!
//! `build_app(config)` builds the gateway; `App::serve` runs it. The path of
//! a request is described in `gateway::handle`, the server layers in
//! `edge::routes`.
#![forbid(unsafe_code)]

pub mod app;
pub mod budget;
pub mod cache;
pub mod cmd;
pub mod config;
pub mod edge;
pub mod error;
pub mod gateway;
pub mod net;
pub mod outcome;
pub mod ratelimit;
pub mod request;
pub mod shadow;
pub mod sim;
pub mod sse;
pub mod stack;
pub mod telemetry;
pub mod upstream;
pub mod usage;

pub use app::{build_app, App, AppState};
pub use config::Config;
