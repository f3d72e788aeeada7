//! The command line: `serve`, `check`, `doctor`, `demo`.

pub mod compare;
pub mod demo;
pub mod doctor;
pub mod usage;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use tokio::net::TcpListener;

use crate::config::Config;
use crate::telemetry::logging::{self, LogFormat};

#[derive(Debug, Parser)]
#[command(
    name = "relaygate",
    version,
    about = "A reliable, observable gateway for OpenAI-compatible LLM APIs"
)]
pub struct Cli {
    /// Log format.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "pretty",
        env = "RELAYGATE_LOG_FORMAT"
    )]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway.
    Serve {
        #[command(flatten)]
        config: ConfigArg,
        /// Listen address; overrides `server.listen` (use port 0 for any free port).
        #[arg(long)]
        listen: Option<SocketAddr>,
    },
    /// Validate a config file and print a summary.
    Check {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Check each upstream step by step: DNS, TCP connect, TLS, then GET /models with its key.
    Doctor(crate::cmd::doctor::DoctorArgs),
    /// Run the gateway in front of simulated upstreams: no key, no network.
    Demo(crate::cmd::demo::DemoArgs),
    /// Totals from a usage ledger (requests, tokens by type, cost), to compare with a provider's bill.
    Usage(crate::cmd::usage::UsageArgs),
    /// Primary vs shadow, side by side, from a usage ledger written with shadows on.
    Compare(compare::CompareArgs),
}

#[derive(Debug, Args)]
pub struct ConfigArg {
    /// Config file (TOML).
    #[arg(long, short = 'c', env = "RELAYGATE_CONFIG")]
    pub config: PathBuf,
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve { config, listen } => serve(&config.config, listen).await,
            Command::Check { config } => check(&config.config),
            Command::Doctor(args) => crate::cmd::doctor::run(args).await,
            Command::Demo(args) => crate::cmd::demo::run(args).await,
            Command::Usage(args) => crate::cmd::usage::run(args).await,
            Command::Compare(args) => compare::compare(args),
        }
    });
    match result {
        Ok(code) => code,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(path: &Path, listen: Option<SocketAddr>) -> Result<ExitCode, String> {
    let config = Config::load(path).map_err(|e| e.to_string())?;
    let addr = listen.unwrap_or(config.server.listen);
    let app = crate::build_app(config)
        .await
        .map_err(|e| e.to_string())?
        .with_config_path(path);
    reload_on_sighup(app.state().clone());
    run_server(app, addr).await
}

/// SIGHUP re-reads the config file (see `AppState::reload`).
fn reload_on_sighup(state: crate::AppState) {
    #[cfg(unix)]
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            return;
        };
        while hup.recv().await.is_some() {
            let _ = state.reload();
        }
    });
}

/// Binds, prints `relaygate listening on http://ADDR` on stdout, and serves
/// until SIGTERM or SIGINT, then drains.
pub async fn run_server(app: crate::App, addr: SocketAddr) -> Result<ExitCode, String> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    println!("relaygate listening on http://{local}");
    tracing::info!(%local, "listening");
    app.serve(listener, shutdown_signal())
        .await
        .map_err(|e| format!("server error: {e}"))?;
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn check(path: &Path) -> Result<ExitCode, String> {
    let config = Config::load(path).map_err(|e| e.to_string())?;
    let mut out = String::new();
    let _ = writeln!(out, "{}: OK", path.display());
    let _ = writeln!(out, "  listen        {}", config.server.listen);
    let _ = writeln!(out, "  max body      {} bytes", config.server.max_body_bytes);
    let _ = writeln!(
        out,
        "  shutdown      {}",
        humantime::format_duration(config.server.shutdown_grace)
    );
    let _ = writeln!(
        out,
        "  admin API     {}",
        if config.admin_key.is_some() {
            "on"
        } else {
            "off (no [admin] key)"
        }
    );
    let _ = writeln!(
        out,
        "  client auth   {}",
        if config.keys.is_empty() {
            "OFF (no [[keys]]): any client can use the upstreams".to_owned()
        } else {
            format!(
                "{} key(s): {}",
                config.keys.len(),
                names(config.keys.iter().map(|k| k.name.as_str()))
            )
        }
    );
    let backend = match config.rate_limit.backend {
        crate::ratelimit::Backend::Local => "local",
        crate::ratelimit::Backend::Redis { .. } => "redis",
    };
    let _ = writeln!(
        out,
        "  rate limits   {} rule(s), backend {backend}",
        config.rate_limits.len()
    );
    let ledger = config.ledger.as_ref().map(|l| l.path.display().to_string());
    let _ = writeln!(out, "  ledger        {}", ledger.as_deref().unwrap_or("off"));
    let otel = config.otel.as_ref().map(|o| o.endpoint.as_str());
    let _ = writeln!(out, "  traces        {}", otel.unwrap_or("off"));
    let _ = writeln!(out, "  upstreams     {}", config.upstreams.len());
    for u in &config.upstreams {
        let _ = writeln!(
            out,
            "    {:<16} {}  key={}  timeouts: connect {} / first byte {} / idle {} / request {}",
            u.name,
            u.base_url,
            if u.api_key.is_some() { "set" } else { "none" },
            humantime::format_duration(u.connect_timeout),
            humantime::format_duration(u.first_byte_timeout),
            humantime::format_duration(u.idle_timeout),
            humantime::format_duration(u.request_timeout),
        );
    }
    let _ = writeln!(out, "  models        {}", config.models.len());
    for m in &config.models {
        let targets = m.targets.iter().map(|t| {
            format!(
                "{}:{} (priority {})",
                config.upstreams[t.upstream].name, t.model, t.priority
            )
        });
        let routing = match (m.routing.strategy, m.routing.max_ttft) {
            (crate::config::Strategy::Priority, _) => String::new(),
            (strategy, None) => format!("  [routing {}]", strategy.as_str()),
            (strategy, Some(bound)) => format!(
                "  [routing {}, max_ttft {}]",
                strategy.as_str(),
                humantime::format_duration(bound)
            ),
        };
        let _ = writeln!(
            out,
            "    {:<16} -> {}{}{routing}",
            m.name,
            names(targets),
            if m.price.is_some() { "  [priced]" } else { "" }
        );
    }
    print_out(&out);
    Ok(ExitCode::SUCCESS)
}

/// Writes to stdout, ignoring a closed pipe (`relaygate check | head`).
pub fn print_out(text: &str) {
    use std::io::Write;
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
}

fn names<S: AsRef<str>>(items: impl Iterator<Item = S>) -> String {
    items.map(|s| s.as_ref().to_owned()).collect::<Vec<_>>().join(", ")
}
