//! `relaygate doctor`: the "connection timeout / blocked IP / DNS"
//! troubleshooting, built in. For each upstream it runs each step on its own
//! (DNS, TCP connect, TLS handshake, then `GET {base_url}/models` with the
//! upstream's key) and prints one row with each step's result and latency,
//! so the failing step is obvious.
//!
//! With `--stream-usage` it also sends each upstream one streamed chat
//! request (`max_tokens: 1`, for the first model that targets it) asking
//! for usage (`stream_options.include_usage`), and says whether the usage
//! chunk came. An upstream that ignores the option gets its tokens
//! estimated (docs/ledger.md), so its bill lines are estimates. Opt-in,
//! because it spends a few tokens on each upstream.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, Request, Uri};
use http_body_util::{BodyExt, Limited};
use tokio::net::TcpStream;

use futures_util::StreamExt;

use crate::config::{Config, UpstreamConfig};
use crate::sse::{BodyError, SseReader};
use crate::upstream::{authorization_header, tls_config, OutBody, Pool, USER_AGENT};

#[derive(Debug, Clone)]
pub enum Step {
    Ok { ms: f64, detail: String },
    Failed { ms: f64, reason: String },
    Skipped(&'static str),
}

impl Step {
    fn ok(&self) -> bool {
        !matches!(self, Step::Failed { .. })
    }

    fn cell(&self) -> String {
        match self {
            Step::Ok { ms, detail } if detail.is_empty() => format!("ok {ms:.1}ms"),
            Step::Ok { ms, detail } => format!("ok {ms:.1}ms ({detail})"),
            Step::Failed { ms, reason } => format!("FAIL after {ms:.1}ms: {reason}"),
            Step::Skipped(why) => format!("- ({why})"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Report {
    pub upstream: String,
    pub dns: Step,
    pub tcp: Step,
    pub tls: Step,
    pub models: Step,
    /// With `--stream-usage`: whether a stream's usage chunk came.
    pub stream_usage: Option<Step>,
}

/// `relaygate doctor`.
#[derive(Debug, clap::Args)]
pub struct DoctorArgs {
    #[command(flatten)]
    pub config: super::ConfigArg,
    /// Also send each upstream one streamed request (max_tokens 1) and say
    /// whether it sends usage for streams; spends a few tokens.
    #[arg(long)]
    pub stream_usage: bool,
}

impl Report {
    pub fn ok(&self) -> bool {
        [&self.dns, &self.tcp, &self.tls, &self.models].iter().all(|s| s.ok())
    }
}

pub async fn run(args: DoctorArgs) -> Result<ExitCode, String> {
    let config = Config::load(&args.config.config).map_err(|e| e.to_string())?;
    let mut reports = check_all(&config).await;
    if args.stream_usage {
        let checks = reports.iter().map(|r| stream_usage(&config, &r.upstream));
        let steps = futures_util::future::join_all(checks).await;
        for (report, step) in reports.iter_mut().zip(steps) {
            report.stream_usage = Some(step);
        }
    }
    let usage_header = if args.stream_usage {
        format!("{:<44} ", "STREAM USAGE")
    } else {
        String::new()
    };
    let mut out = format!(
        "{:<16} {:<28} {:<28} {:<28} {:<36} {usage_header}RESULT\n",
        "UPSTREAM", "DNS", "TCP", "TLS", "GET /models"
    );
    for r in &reports {
        let usage = r
            .stream_usage
            .as_ref()
            .map(|s| format!("{:<44} ", s.cell()))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "{:<16} {:<28} {:<28} {:<28} {:<36} {usage}{}",
            r.upstream,
            r.dns.cell(),
            r.tcp.cell(),
            r.tls.cell(),
            r.models.cell(),
            if r.ok() { "OK" } else { "FAIL" }
        );
    }
    crate::cmd::print_out(&out);
    Ok(if reports.iter().all(Report::ok) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Checks every upstream concurrently.
pub async fn check_all(config: &Config) -> Vec<Report> {
    let checks = config.upstreams.iter().cloned().map(check);
    futures_util::future::join_all(checks).await
}

pub async fn check(config: UpstreamConfig) -> Report {
    let mut report = Report {
        upstream: config.name.clone(),
        dns: Step::Skipped("not run"),
        tcp: Step::Skipped("not run"),
        tls: Step::Skipped("not run"),
        models: Step::Skipped("not run"),
        stream_usage: None,
    };
    let timeout = config.connect_timeout;
    // base_url was validated as an http(s) URL with a host when the config loaded.
    let Ok(url) = reqwest::Url::parse(&config.base_url) else {
        return report;
    };
    let host = url.host_str().unwrap_or_default().trim_matches(['[', ']']).to_owned();
    let port = url.port_or_known_default().unwrap_or(443);
    let https = url.scheme() == "https";

    let started = Instant::now();
    let addrs: Vec<SocketAddr> =
        match tokio::time::timeout(timeout, tokio::net::lookup_host((host.as_str(), port))).await {
            Ok(Ok(addrs)) => addrs.collect(),
            Ok(Err(e)) => {
                report.dns = failed(started, format!("cannot resolve {host}: {e}"));
                return report;
            }
            Err(_) => {
                report.dns = failed(started, format!("no answer in {}", humantime::format_duration(timeout)));
                return report;
            }
        };
    let Some(&addr) = addrs.first() else {
        report.dns = failed(started, format!("{host} has no addresses"));
        return report;
    };
    report.dns = ok(started, addr.ip().to_string());

    let started = Instant::now();
    let tcp = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            report.tcp = failed(started, format!("{e} (firewall, blocked IP or wrong port?)"));
            return report;
        }
        Err(_) => {
            report.tcp = failed(
                started,
                format!(
                    "timed out after {} (blocked IP or firewall?)",
                    humantime::format_duration(timeout)
                ),
            );
            return report;
        }
    };
    report.tcp = ok(started, String::new());

    report.tls = if https {
        let started = Instant::now();
        match tokio::time::timeout(timeout, tls_handshake(tcp, &host)).await {
            Ok(Ok(alpn)) => ok(started, alpn),
            Ok(Err(e)) => {
                report.tls = failed(started, e);
                return report;
            }
            Err(_) => {
                report.tls = failed(started, "handshake timed out".into());
                return report;
            }
        }
    } else {
        drop(tcp);
        Step::Skipped("http")
    };

    let started = Instant::now();
    let limit = config.first_byte_timeout.min(Duration::from_secs(30));
    report.models = match tokio::time::timeout(limit, list_models(&config)).await {
        Err(_) => failed(started, format!("no answer in {}", humantime::format_duration(limit))),
        Ok(Err(reason)) => failed(started, reason),
        Ok(Ok((status, body))) => {
            if status.is_success() {
                let count = serde_json::from_slice::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| v["data"].as_array().map(Vec::len));
                match count {
                    Some(n) => ok(started, format!("HTTP {}, {n} models", status.as_u16())),
                    None => failed(started, format!("HTTP {} but not a model list", status.as_u16())),
                }
            } else if status.as_u16() == 401 || status.as_u16() == 403 {
                failed(
                    started,
                    format!(
                        "HTTP {}: the upstream rejects api_key (rotated or wrong key?)",
                        status.as_u16()
                    ),
                )
            } else {
                failed(started, format!("HTTP {}", status.as_u16()))
            }
        }
    };
    report
}

async fn tls_handshake(tcp: TcpStream, host: &str) -> Result<String, String> {
    let mut config = tls_config().map_err(|e| e.to_string())?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let name = rustls::pki_types::ServerName::try_from(host.to_owned()).map_err(|e| e.to_string())?;
    let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| format!("{e} (certificate, SNI or interception problem?)"))?;
    let (_, session) = stream.get_ref();
    let alpn = session
        .alpn_protocol()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .unwrap_or_else(|| "no ALPN".into());
    let version = session.protocol_version().map(|v| format!("{v:?}")).unwrap_or_default();
    Ok(format!("{version} {alpn}").trim().to_owned())
}

/// `GET {base_url}/models` with the upstream's key, through the same
/// connection pool the gateway uses. The answer is read up to 1 MiB.
async fn list_models(config: &UpstreamConfig) -> Result<(http::StatusCode, Bytes), String> {
    let pool = tls_config()
        .and_then(|tls| Pool::new(config, tls))
        .map_err(|e| format!("cannot build client: {e}"))?;
    let uri = Uri::try_from(format!("{}/models", config.base_url)).map_err(|e| e.to_string())?;
    let mut request = Request::new(OutBody::from(Bytes::new()));
    *request.uri_mut() = uri;
    request.headers_mut().insert(header::USER_AGENT, USER_AGENT);
    if let Some(auth) = authorization_header(config) {
        request.headers_mut().insert(header::AUTHORIZATION, auth);
    }
    let response = pool
        .send(request)
        .await
        .map_err(|e| format!("request failed: {}", with_sources(&e)))?;
    let status = response.status();
    let body = Limited::new(response.into_body(), 1 << 20)
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    Ok((status, body))
}

/// One streamed chat request to `upstream`, for the first model that
/// targets it, asking for usage: whether the usage chunk came. Not sending
/// it is not a failure of the upstream (the row's result stays as it is),
/// but its streams' tokens will be estimates.
async fn stream_usage(config: &Config, upstream: &str) -> Step {
    let Some(index) = config.upstream_index(upstream) else {
        return Step::Skipped("not configured");
    };
    let upstream = &config.upstreams[index];
    let Some(model) = config
        .models
        .iter()
        .flat_map(|m| &m.targets)
        .find(|t| t.upstream == index)
        .map(|t| t.model.clone())
    else {
        return Step::Skipped("no model targets it");
    };
    let started = Instant::now();
    let limit = upstream.request_timeout.min(Duration::from_secs(30));
    match tokio::time::timeout(limit, read_stream_usage(upstream, &model)).await {
        Err(_) => failed(started, format!("no end in {}", humantime::format_duration(limit))),
        Ok(Err(reason)) => failed(started, reason),
        Ok(Ok(Some(usage))) => ok(
            started,
            format!("sent: {} prompt, {} completion", usage.prompt, usage.completion),
        ),
        Ok(Ok(None)) => Step::Ok {
            ms: started.elapsed().as_secs_f64() * 1000.0,
            detail: "NOT SENT: stream tokens are estimated".into(),
        },
    }
}

async fn read_stream_usage(config: &UpstreamConfig, model: &str) -> Result<Option<crate::usage::Usage>, String> {
    let pool = tls_config()
        .and_then(|tls| Pool::new(config, tls))
        .map_err(|e| format!("cannot build client: {e}"))?;
    let uri = Uri::try_from(format!("{}/chat/completions", config.base_url)).map_err(|e| e.to_string())?;
    let body = serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": "Say OK."}],
        "max_tokens": 1,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let mut request = Request::new(OutBody::from(Bytes::from(body.to_string())));
    *request.method_mut() = http::Method::POST;
    *request.uri_mut() = uri;
    let headers = request.headers_mut();
    headers.insert(header::USER_AGENT, USER_AGENT);
    headers.insert(header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    if let Some(auth) = authorization_header(config) {
        headers.insert(header::AUTHORIZATION, auth);
    }
    let response = pool
        .send(request)
        .await
        .map_err(|e| format!("request failed: {}", with_sources(&e)))?;
    let status = response.status();
    if !status.is_success() {
        return Err(format!("HTTP {}", status.as_u16()));
    }
    let body = response
        .into_body()
        .into_data_stream()
        .map(|r| r.map_err(|_| BodyError))
        .boxed();
    let mut reader = SseReader::new(body);
    let mut usage = None;
    let mut inspector = crate::sse::Inspector::default();
    while let Some(batch) = reader
        .next_batch()
        .await
        .map_err(|e| format!("the stream broke: {e:?}"))?
    {
        let info = inspector.inspect(&batch);
        usage = info.usage.or(usage);
        if info.done {
            break;
        }
    }
    Ok(usage)
}

/// An error and its causes on one line (hyper's own message is only
/// "client error (Connect)").
fn with_sources(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

fn ok(started: Instant, detail: String) -> Step {
    Step::Ok {
        ms: started.elapsed().as_secs_f64() * 1000.0,
        detail,
    }
}

fn failed(started: Instant, reason: String) -> Step {
    Step::Failed {
        ms: started.elapsed().as_secs_f64() * 1000.0,
        reason,
    }
}
