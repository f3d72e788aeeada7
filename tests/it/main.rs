//! The integration tests, as one test binary.
//!
//! Each `tests/*.rs` file is a crate of its own that cargo links against the
//! whole dependency tree: twelve files were twelve links of a ~175 MB debug
//! binary after every change to `src/`. As modules of this crate they are
//! linked once. Measured on a 2-core machine, `touch src/lib.rs` then
//! `cargo test --all-targets --no-run`: 13.0 s wall, 17.3 s CPU before, 6.3 s
//! and 8.5 s after; the run of the whole suite went from 34.8 s to about
//! 30 s, as two test threads now share out one list instead of twelve.
//!
//! The price: every test here runs in one process, beside the others. None
//! may change process-global state (a global tracing subscriber, environment
//! variables, the current directory, a fixed temp path, a static another
//! test reads). Scope it instead: `tracing::subscriber::set_default` on a
//! current-thread runtime (as `otel` does), a fresh temp dir per test
//! (`common::process::temp_dir`), env vars passed to a child process only.
//!
//! What stays separate, and why:
//! - `tests/memory.rs`: it measures the RSS growth of its own process while
//!   it holds 1,000 streams open; tests allocating beside it would break the
//!   bound. It includes `common` by path.
//! - The library's unit tests (`src/`) and `benches/` are targets of their
//!   own anyway.

mod common;
mod redis_support;

mod architecture;
mod budget;
mod cache;
mod cli;
mod gateway;
mod ledger;
mod observability;
mod openai_sdk;
mod otel;
mod passthrough;
mod ratelimit;
mod ratelimit_gateway;
mod reload;
mod resilience;
mod responses;
mod routing;
mod shadow;
mod sse_props;
mod sse_shapes;
mod status;
