//! Log setup. Logs go to stderr (stdout carries the `listening on` line that
//! scripts and tests read). `RUST_LOG` filters, default `info`.

use std::io::IsTerminal;
use std::sync::OnceLock;

use clap::ValueEnum;
use tracing_subscriber::EnvFilter;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line, for log pipelines.
    Json,
    /// Human-readable lines.
    Pretty,
}

/// The format `init` installed, for the access log's own writer.
static FORMAT: OnceLock<LogFormat> = OnceLock::new();

pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(true);
    let installed = match format {
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).try_init(),
        LogFormat::Pretty => builder.compact().with_ansi(std::io::stderr().is_terminal()).try_init(),
    };
    if installed.is_ok() {
        let _ = FORMAT.set(format);
    }
}

/// The log format, when `init` installed the subscriber.
pub fn format() -> Option<LogFormat> {
    FORMAT.get().copied()
}
