//! `relaygate demo`: the gateway on its embedded default config
//! (`config/demo.toml`) in front of two simulated upstreams on loopback, one
//! healthy and one flaky. No key and no network; any client key works.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;

use crate::config::Config;
use crate::sim::{Faults, LineEnding, Sim};

/// The embedded default config.
pub const DEMO_CONFIG: &str = include_str!("../../config/demo.toml");

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Listen address for the gateway (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Share of requests the flaky upstream fails with a 5xx.
    #[arg(long, default_value_t = 0.1)]
    pub flaky_error_rate: f64,
    /// Extra random latency of the flaky upstream, before its headers.
    #[arg(long, default_value = "300ms", value_parser = humantime::parse_duration)]
    pub flaky_latency: Duration,
    /// Do not drive traffic (and print no live summary); just serve.
    #[arg(long)]
    pub no_traffic: bool,
    /// Requests per second the built-in traffic sends.
    #[arg(long, default_value_t = 20)]
    pub rps: u32,
    /// Every this long, the flaky upstream goes down for `--outage` (0 = never).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub outage_every: Duration,
    /// How long each outage of the flaky upstream lasts.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub outage: Duration,
    /// Every this long, the healthy upstream slows down for `--slow`
    /// without failing (0 = never): watch `deepseek-fastest` move away.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub slow_every: Duration,
    /// How long each slow phase lasts.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub slow: Duration,
    /// How many times its time to first token grows in a slow phase.
    #[arg(long, default_value_t = 6)]
    pub slow_factor: u32,
    /// The admin key (the status page's admin actions, `/admin/*`); by
    /// default a random one, printed at start.
    #[arg(long)]
    pub admin_key: Option<String>,
    /// Legal but less common SSE from both simulated upstreams, to see how
    /// relaygate reads it (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub sse_shape: Vec<SseShape>,
}

/// Stream shapes the simulated upstreams can send (`sim::Faults`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SseShape {
    /// JSON with a space after `:` and `,`, as Python's json.dumps writes it.
    SpacedJson,
    /// Each event's JSON over two `data:` lines.
    SplitDataLines,
    /// No usage: streams ignore `stream_options.include_usage`, plain
    /// answers have no `usage` (relaygate estimates the tokens).
    NoUsage,
    /// Lines end in CR.
    Cr,
    /// Lines end in CRLF.
    Crlf,
}

impl SseShape {
    fn apply(self, f: &mut Faults) {
        match self {
            SseShape::SpacedJson => f.sse_spaced_json = true,
            SseShape::SplitDataLines => f.split_data_lines = true,
            SseShape::NoUsage => {
                f.ignore_include_usage = true;
                f.omit_usage = true;
            }
            SseShape::Cr => f.line_ending = LineEnding::Cr,
            SseShape::Crlf => f.line_ending = LineEnding::CrLf,
        }
    }
}

/// Starts the two simulators and returns them with the demo config that
/// points at them.
pub async fn setup(args: &DemoArgs) -> Result<(Vec<Sim>, Config), String> {
    let shaped = |mut f: Faults| {
        for shape in &args.sse_shape {
            shape.apply(&mut f);
        }
        f
    };
    let healthy = Sim::start(
        "sim-healthy",
        shaped(Faults {
            header_delay: Duration::from_millis(40),
            latency_jitter: Duration::from_millis(40),
            chunk_interval: Duration::from_millis(25),
            chunks: 12,
            ..Faults::default()
        }),
    )
    .await
    .map_err(|e| format!("cannot start the simulated upstream: {e}"))?;
    let flaky = Sim::start(
        "sim-flaky",
        shaped(Faults {
            error_rate: args.flaky_error_rate.clamp(0.0, 1.0),
            header_delay: Duration::from_millis(60),
            latency_jitter: args.flaky_latency,
            chunk_interval: Duration::from_millis(40),
            chunks: 12,
            ..Faults::default()
        }),
    )
    .await
    .map_err(|e| format!("cannot start the simulated upstream: {e}"))?;
    let (healthy_url, flaky_url) = (healthy.base_url(), flaky.base_url());
    let admin_key = admin_key(args);
    let config = Config::parse(DEMO_CONFIG, |name| match name {
        "HEALTHY_URL" => Some(healthy_url.clone()),
        "FLAKY_URL" => Some(flaky_url.clone()),
        "DEMO_ADMIN_KEY" => Some(admin_key.clone()),
        _ => None,
    })
    .map_err(|e| format!("embedded demo config: {e}"))?;
    Ok((vec![healthy, flaky], config))
}

/// `--admin-key`, or a random key for this run: the demo may listen beyond
/// loopback (`--listen`), so its admin API gets no well-known key.
fn admin_key(args: &DemoArgs) -> String {
    args.admin_key
        .clone()
        .unwrap_or_else(|| format!("demo-admin-{:016x}", fastrand::u64(..)))
}

pub async fn run(mut args: DemoArgs) -> Result<ExitCode, String> {
    // Chosen once, so that the key printed is the key configured.
    args.admin_key = Some(admin_key(&args));
    let (sims, config) = setup(&args).await?;
    let listener = tokio::net::TcpListener::bind(args.listen).await.map_err(|e| {
        format!(
            "cannot listen on {}: {e} (try `relaygate demo --listen 127.0.0.1:0`)",
            args.listen
        )
    })?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    let app = crate::build_app(config).await.map_err(|e| e.to_string())?;
    let base = format!("http://{local}/v1");
    println!("relaygate listening on http://{local}");
    println!();
    println!("relaygate demo: the gateway in front of two simulated upstreams (no key, no network)");
    for sim in &sims {
        println!("  upstream {:<12} {}", sim.name(), sim.base_url());
    }
    if !args.sse_shape.is_empty() {
        let shapes: Vec<String> = args
            .sse_shape
            .iter()
            .filter_map(|s| clap::ValueEnum::to_possible_value(s).map(|v| v.get_name().to_owned()))
            .collect();
        println!("  both upstreams send SSE shaped: {}", shapes.join(", "));
    }
    println!("  models:");
    println!(
        "    deepseek-chat    sim-flaky (fails {:.0}% of requests), failing over to sim-healthy;",
        args.flaky_error_rate * 100.0
    );
    println!("                     10% is also mirrored to a shadow candidate (see /metrics relaygate_shadow_*)");
    println!("    deepseek-hedged  the same pair, hedged after 250 ms");
    println!("    deepseek-cached  the same pair behind the response cache (see /admin/cache)");
    println!("    deepseek-flaky   sim-flaky alone: its errors reach the client");
    println!("    deepseek-fastest the same pair, routed by latency (time to first token; failures never look fast)");
    println!("  budgets (see /admin/budgets and the dashboard's Spend budgets row):");
    println!("    demo-daily          $0.005 a day, warn only: the traffic crosses 80% and 95% within a minute");
    println!("    demo-flaky-monthly  $1 a month on deepseek-flaky: 429 insufficient_quota once spent");
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
    println!("Open http://{local}/ in a browser: the live status page.");
    println!(
        "Admin key (the page's admin actions, /admin/*): {}",
        args.admin_key.as_deref().unwrap_or_default()
    );
    println!("Metrics: http://{local}/metrics   Health: http://{local}/health   Stop: Ctrl-C");
    if !args.outage_every.is_zero() {
        println!(
            "The flaky upstream goes down for {} every {}.",
            humantime::format_duration(args.outage),
            humantime::format_duration(args.outage_every)
        );
        tokio::spawn(outages(
            sims[1].faults(),
            sims[1].handle(),
            args.outage_every,
            args.outage,
        ));
    }
    if !args.slow_every.is_zero() {
        println!(
            "The healthy upstream answers {}x slower, without failing, for {} every {} (first at {}).",
            args.slow_factor,
            humantime::format_duration(args.slow),
            humantime::format_duration(args.slow_every),
            humantime::format_duration(SLOW_FIRST),
        );
        tokio::spawn(slow_phases(
            sims[0].faults(),
            sims[0].handle(),
            args.slow_every,
            args.slow,
            args.slow_factor,
        ));
    }
    let traffic = (!args.no_traffic).then(|| {
        println!(
            "Driving {} requests/s (--no-traffic to stop it); one summary line per second:",
            args.rps
        );
        tokio::spawn(traffic(base.clone(), args.rps.max(1), app.state().clone()))
    });
    println!();
    // The demo's own client stops at the signal, before the gateway drains:
    // what it sent during the drain would be refused, and its last summary
    // line would count that as failures. Requests already sent finish.
    let shutdown = async move {
        crate::cmd::shutdown_signal().await;
        if let Some(traffic) = traffic {
            traffic.abort();
        }
    };
    app.serve(listener, shutdown)
        .await
        .map_err(|e| format!("server error: {e}"))?;
    drop(sims);
    Ok(ExitCode::SUCCESS)
}

/// Takes the flaky upstream down (every request a 503) for `outage`, every `every`.
async fn outages(normal: Faults, sim: crate::sim::SimHandle, every: Duration, outage: Duration) {
    loop {
        tokio::time::sleep(every.saturating_sub(outage)).await;
        sim.update(|f| f.status = Some(503));
        tokio::time::sleep(outage).await;
        sim.set_faults(normal.clone());
    }
}

/// When the first slow phase starts: once the estimates have settled, and
/// before the first outage (20-30 s with the defaults), which with the
/// breaker's backoff keeps the flaky upstream out for most of each period.
const SLOW_FIRST: Duration = Duration::from_secs(5);

/// Slows the healthy upstream `factor` times (its delay before headers and
/// first event, and its jitter) for `slow`, every `every`, without failing.
/// It is the healthy upstream that slows because latency routing keeps
/// `deepseek-fastest` off the flaky one already: its failures are never fast.
async fn slow_phases(normal: Faults, sim: crate::sim::SimHandle, every: Duration, slow: Duration, factor: u32) {
    tokio::time::sleep(SLOW_FIRST).await;
    loop {
        sim.update(|f| {
            f.header_delay = normal.header_delay * factor;
            f.latency_jitter = normal.latency_jitter * factor;
        });
        tokio::time::sleep(slow).await;
        sim.set_faults(normal.clone());
        tokio::time::sleep(every.saturating_sub(slow)).await;
    }
}

/// What the demo traffic asks `deepseek-cached`.
const QUESTIONS: [&str; 4] = [
    "What is the capital of France?",
    "Summarise the plot of Hamlet in one line.",
    "Translate 'good morning' into Spanish.",
    "What is 17 times 23?",
];

/// One second of client-side observations.
#[derive(Default)]
struct Second {
    ok: u32,
    failed: u32,
    latencies_ms: Vec<f64>,
}

/// Sends `rps` requests per second (a quarter of them streams) and prints
/// one summary line per second: requests, success, p50/p99, breaker states.
async fn traffic(base: String, rps: u32, state: crate::AppState) {
    let client = reqwest::Client::new();
    let window = std::sync::Arc::new(std::sync::Mutex::new(Second::default()));
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rps)));
    let mut report = tokio::time::interval(Duration::from_secs(1));
    report.tick().await;
    let mut seconds: u64 = 0;
    let mut n: u64 = 0;
    let mut picks = Picks::default();
    loop {
        tokio::select! {
            _ = tick.tick() => {
                n += 1;
                let (client, window, url) = (client.clone(), window.clone(), format!("{base}/chat/completions"));
                let stream = n % 4 == 0;
                let model = match n % 10 {
                    0 => "deepseek-hedged",
                    1 | 6 => "deepseek-cached",
                    3 | 5 | 8 => "deepseek-fastest",
                    _ => "deepseek-chat",
                };
                // The cached model is asked the same few questions, so most are hits.
                let content = if model == "deepseek-cached" {
                    QUESTIONS[(n / 5) as usize % QUESTIONS.len()]
                } else {
                    "Hello from the demo traffic"
                };
                tokio::spawn(async move {
                    let t = std::time::Instant::now();
                    let body = serde_json::json!({
                        "model": model,
                        "stream": stream,
                        "messages": [{ "role": "user", "content": content }],
                    });
                    let ok = match client
                        .post(url)
                        .bearer_auth("demo")
                        .header("content-type", "application/json")
                        .body(body.to_string())
                        .send()
                        .await {
                        Ok(r) if r.status().is_success() => match r.bytes().await {
                            // A stream that broke ends with an error event, not
                            // [DONE] (whatever the line ends, `--sse-shape`).
                            Ok(b) => !stream || b.trim_ascii_end().ends_with(b"data: [DONE]"),
                            Err(_) => false,
                        },
                        _ => false,
                    };
                    let mut w = window.lock().unwrap_or_else(|e| e.into_inner());
                    if ok { w.ok += 1 } else { w.failed += 1 }
                    w.latencies_ms.push(t.elapsed().as_secs_f64() * 1000.0);
                });
            }
            _ = report.tick() => {
                seconds += 1;
                let mut second = std::mem::take(&mut *window.lock().unwrap_or_else(|e| e.into_inner()));
                println!("{}{}", summary_line(seconds, &mut second, &state), picks.line(&state));
            }
        }
    }
}

/// `deepseek-fastest`'s picks per upstream in the last second (failovers
/// and hedges included), and its estimates: traffic moving away from a slow
/// upstream and back.
#[derive(Default)]
struct Picks {
    last: Vec<u64>,
}

impl Picks {
    fn line(&mut self, state: &crate::AppState) -> String {
        let runtime = state.runtime();
        let Some(model) = runtime.model("deepseek-fastest") else {
            return String::new();
        };
        let route = &model.route;
        let counts = route.pick_counts();
        let delta: Vec<u64> = counts
            .iter()
            .enumerate()
            .map(|(i, c)| c - self.last.get(i).copied().unwrap_or(0))
            .collect();
        self.last = counts;
        let loads = route.loads().unwrap_or_default();
        let parts: Vec<String> = route
            .targets
            .iter()
            .zip(&delta)
            .zip(&loads)
            .map(|((t, d), l)| {
                let name = t.upstream.name.strip_prefix("sim-").unwrap_or(&t.upstream.name);
                format!("{name} {d:>2} ({:>4.0}ms)", l.estimate * 1000.0)
            })
            .collect();
        format!("  fastest picks: {}", parts.join(" "))
    }
}

fn summary_line(seconds: u64, s: &mut Second, state: &crate::AppState) -> String {
    let total = s.ok + s.failed;
    s.latencies_ms.sort_by(f64::total_cmp);
    let pct = |q: f64| -> f64 {
        if s.latencies_ms.is_empty() {
            return 0.0;
        }
        let rank = ((q * s.latencies_ms.len() as f64).ceil() as usize).clamp(1, s.latencies_ms.len());
        s.latencies_ms[rank - 1]
    };
    let runtime = state.runtime();
    let breakers: Vec<String> = runtime
        .upstreams
        .iter()
        .map(|u| format!("{}={}", u.name, u.state.breaker.state().as_str()))
        .collect();
    let cache = state.cache().map_or(String::new(), |c| {
        use crate::cache::CacheResult::{Hit, Miss};
        let (hits, misses) = (
            c.metrics.get("deepseek-cached", Hit),
            c.metrics.get("deepseek-cached", Miss),
        );
        let ratio = if hits + misses == 0 {
            0.0
        } else {
            100.0 * hits as f64 / (hits + misses) as f64
        };
        format!("  cache hits {ratio:>3.0}%")
    });
    format!(
        "[{:>4}s] {:>3} req/s  success {:>5.1}%  p50 {:>5.0}ms  p99 {:>5.0}ms  breakers: {}{cache}",
        seconds,
        total,
        if total == 0 {
            100.0
        } else {
            100.0 * f64::from(s.ok) / f64::from(total)
        },
        pct(0.50),
        pct(0.99),
        breakers.join(" ")
    )
}
