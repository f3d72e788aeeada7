//! `relaygate demo`: the gateway on its embedded default config
//! (`config/demo.toml`) in front of two simulated upstreams on loopback, one
//! healthy and one flaky. No key and no network; any client key works.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;

use crate::config::Config;
use crate::sim::{Faults, Sim};

/// The embedded default config.
pub const DEMO_CONFIG: &str = include_str!("../config/demo.toml");

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Listen address for the gateway (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Share of requests the flaky upstream fails with a 5xx.
    #[arg(long, default_value_t = 0.2)]
    pub flaky_error_rate: f64,
    /// Extra random latency of the flaky upstream, before its headers.
    #[arg(long, default_value = "300ms", value_parser = humantime::parse_duration)]
    pub flaky_latency: Duration,
}

/// Starts the two simulators and returns them with the demo config that
/// points at them.
pub async fn setup(args: &DemoArgs) -> Result<(Vec<Sim>, Config), String> {
    let healthy = Sim::start(
        "sim-healthy",
        Faults {
            header_delay: Duration::from_millis(40),
            latency_jitter: Duration::from_millis(40),
            chunk_interval: Duration::from_millis(25),
            chunks: 12,
            ..Faults::default()
        },
    )
    .await
    .map_err(|e| format!("cannot start the simulated upstream: {e}"))?;
    let flaky = Sim::start(
        "sim-flaky",
        Faults {
            error_rate: args.flaky_error_rate.clamp(0.0, 1.0),
            header_delay: Duration::from_millis(60),
            latency_jitter: args.flaky_latency,
            chunk_interval: Duration::from_millis(40),
            chunks: 12,
            ..Faults::default()
        },
    )
    .await
    .map_err(|e| format!("cannot start the simulated upstream: {e}"))?;
    let (healthy_url, flaky_url) = (healthy.base_url(), flaky.base_url());
    let config = Config::parse(DEMO_CONFIG, |name| match name {
        "HEALTHY_URL" => Some(healthy_url.clone()),
        "FLAKY_URL" => Some(flaky_url.clone()),
        _ => None,
    })
    .map_err(|e| format!("embedded demo config: {e}"))?;
    Ok((vec![healthy, flaky], config))
}

pub async fn run(args: DemoArgs) -> Result<ExitCode, String> {
    let (sims, config) = setup(&args).await?;
    let listener = tokio::net::TcpListener::bind(args.listen).await.map_err(|e| {
        format!(
            "cannot listen on {}: {e} (try `relaygate demo --listen 127.0.0.1:0`)",
            args.listen
        )
    })?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    let app = crate::build_app(config).map_err(|e| e.to_string())?;
    let base = format!("http://{local}/v1");
    println!("relaygate listening on http://{local}");
    println!();
    println!("relaygate demo: the gateway in front of two simulated upstreams (no key, no network)");
    for sim in &sims {
        println!("  upstream {:<12} {}", sim.name(), sim.base_url());
    }
    println!(
        "  models: deepseek-chat (healthy upstream), deepseek-flaky (fails {:.0}% of requests)",
        args.flaky_error_rate * 100.0
    );
    println!();
    println!("Base URL: {base}   (any API key works)");
    println!();
    println!("curl:");
    println!(
        "  curl -s {base}/chat/completions -H 'Authorization: Bearer demo' -H 'Content-Type: application/json' \\"
    );
    println!("    -d '{{\"model\":\"deepseek-chat\",\"messages\":[{{\"role\":\"user\",\"content\":\"Hello\"}}]}}'");
    println!(
        "  curl -sN {base}/chat/completions -H 'Authorization: Bearer demo' -H 'Content-Type: application/json' \\"
    );
    println!("    -d '{{\"model\":\"deepseek-chat\",\"stream\":true,\"messages\":[{{\"role\":\"user\",\"content\":\"Hello\"}}]}}'");
    println!();
    println!("Python (pip install openai):");
    println!("  from openai import OpenAI");
    println!("  client = OpenAI(base_url=\"{base}\", api_key=\"demo\")");
    println!("  r = client.chat.completions.create(model=\"deepseek-chat\", messages=[{{\"role\": \"user\", \"content\": \"Hello\"}}])");
    println!("  print(r.choices[0].message.content, r.usage)");
    println!();
    println!("Metrics: http://{local}/metrics   Health: http://{local}/health   Stop: Ctrl-C");
    app.serve(listener, crate::cli::shutdown_signal())
        .await
        .map_err(|e| format!("server error: {e}"))?;
    drop(sims);
    Ok(ExitCode::SUCCESS)
}
