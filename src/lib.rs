//! relaygate: a reverse-proxy gateway for OpenAI-compatible LLM APIs.
//!
//! `build_app(config)` builds the gateway; `App::serve` runs it. The path of
//! a request is described in `proxy`, the server layers in `routes`.
#![forbid(unsafe_code)]

pub mod access_log;
pub mod admin;
pub mod app;
pub mod auth;
pub mod cli;
pub mod config;
pub mod demo;
pub mod doctor;
pub mod error;
pub mod health;
pub mod layers;
pub mod ledger;
pub mod logging;
pub mod metrics;
pub mod observe;
pub mod otel;
pub mod proxy;
pub mod ratelimit;
pub mod request;
pub mod routes;
pub mod server;
pub mod shadow;
pub mod sim;
pub mod streaming;
pub mod upstream;
pub mod usage;
pub mod usage_report;
pub mod window;

pub use app::{build_app, App, AppState};
pub use config::Config;
