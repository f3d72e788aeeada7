//! Test harness: a gateway in-process on an ephemeral port, in front of
//! simulated upstreams, plus polling helpers. No fixed ports, no sleeps.

pub mod process;

use std::future::Future;
use std::time::Duration;

use relaygate::sim::Sim;
use relaygate::{build_app, AppState, Config};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const CLIENT_KEY: &str = "sk-client-app-a-0123456789";

pub struct Gateway {
    /// `http://127.0.0.1:<port>`
    pub url: String,
    pub state: AppState,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl Gateway {
    /// Starts a gateway for `config`, where `${NAME}` is looked up in `vars`.
    pub async fn start(config: &str, vars: &[(&str, String)]) -> Gateway {
        let config = Config::parse(config, |name| {
            vars.iter().find(|(n, _)| *n == name).map(|(_, v)| v.clone())
        })
        .expect("test config is valid");
        let app = build_app(config).await.expect("app builds");
        Self::serve(app).await
    }

    /// Starts a gateway from a config file, which `POST /admin/reload` and
    /// `state.reload()` re-read.
    pub async fn from_file(path: &std::path::Path) -> Gateway {
        let config = Config::load(path).expect("test config is valid");
        let app = build_app(config).await.expect("app builds").with_config_path(path);
        Self::serve(app).await
    }

    async fn serve(app: relaygate::App) -> Gateway {
        let state = app.state().clone();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(app.serve(listener, async move {
            let _ = stopped.await;
        }));
        Gateway {
            url,
            state,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// The standard single-upstream gateway in front of `sim` (see `config_for`).
    pub async fn with_sim(sim: &Sim) -> Gateway {
        Gateway::start(&config_for(&[("a", sim)]), &[]).await
    }

    pub fn v1(&self, path: &str) -> String {
        format!("{}/v1{}", self.url, path)
    }

    pub fn begin_shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Resolves when the server has stopped (after `begin_shutdown`).
    pub async fn stopped(&mut self) -> std::io::Result<()> {
        self.task.take().expect("not awaited twice").await.expect("server task")
    }

    pub async fn metrics(&self) -> String {
        reqwest::get(format!("{}/metrics", self.url))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// The sum of the samples in `/metrics` that a selector matches, 0 if none.
    pub async fn metric(&self, series: &str) -> f64 {
        metric_value(&self.metrics().await, series)
    }
}

/// The sum of the samples a selector matches, as PromQL's `sum(name{labels})`
/// would: `name{a="x",b="y"}` matches every sample of `name` that has those
/// labels, whatever others it has; `name` alone matches all of its samples.
pub fn metric_value(text: &str, series: &str) -> f64 {
    let (name, wanted) = split_series(series);
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter(|(s, _)| {
            let (n, labels) = split_series(s);
            n == name && wanted.iter().all(|w| labels.contains(w))
        })
        .map(|(_, v)| v.trim().parse::<f64>().unwrap())
        .sum()
}

/// `name{a="x",b="y"}` as its name and its `a="x"` pairs.
fn split_series(series: &str) -> (&str, Vec<&str>) {
    match series.split_once('{') {
        None => (series, Vec::new()),
        Some((name, rest)) => {
            let inner = rest.strip_suffix('}').unwrap_or(rest);
            // Label values here never contain `",` (config names and closed sets).
            let pairs = inner
                .split("\",")
                .map(|p| p.trim_end_matches('"'))
                .filter(|p| !p.is_empty());
            (name, pairs.collect())
        }
    }
}

/// A config with one model `deepseek-chat` routed to the first upstream as
/// `deepseek-v3.2`, short timeouts, one client key and a small body limit.
pub fn config_for(upstreams: &[(&str, &Sim)]) -> String {
    let mut text = String::from(
        r#"
[server]
listen = "127.0.0.1:0"
max_body_bytes = 65536
shutdown_grace = "5s"

[admin]
key = "sk-admin-key-for-tests-000"

[retry]
base_delay = "10ms"
max_delay = "50ms"

[[keys]]
name = "app-a"
key = "sk-client-app-a-0123456789"
"#,
    );
    for (name, sim) in upstreams {
        text.push_str(&format!(
            r#"
[[upstreams]]
name = "{name}"
base_url = "{}"
api_key = "sk-upstream-{name}-secret-9876543210"
connect_timeout = "1s"
first_byte_timeout = "1s"
idle_timeout = "500ms"
request_timeout = "10s"
"#,
            sim.base_url()
        ));
    }
    text.push_str(&format!(
        r#"
[[models]]
name = "deepseek-chat"
targets = [{{ upstream = "{}", model = "deepseek-v3.2" }}]
price = {{ input_per_mtok = 0.28, output_per_mtok = 0.42, cached_input_per_mtok = 0.028 }}
"#,
        upstreams[0].0
    ));
    text
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder().build().unwrap()
}

pub fn chat(stream: bool) -> Value {
    json!({
        "model": "deepseek-chat",
        "messages": [{ "role": "user", "content": "Say hello" }],
        "stream": stream,
        "temperature": 0.2,
        "x_vendor_extension": { "keep": [1, 2.50, "three"] },
    })
}

pub async fn post_chat(gw: &Gateway, body: &Value) -> reqwest::Response {
    post_v1(gw, "/chat/completions", body).await
}

/// `POST /v1{path}` with the client key and a JSON body.
pub async fn post_v1(gw: &Gateway, path: &str, body: &Value) -> reqwest::Response {
    client()
        .post(gw.v1(path))
        .bearer_auth(CLIENT_KEY)
        .json(body)
        .send()
        .await
        .unwrap()
}

/// The head of a raw HTTP/1.1 `POST /v1/chat/completions` with the client
/// key, for tests that drive the socket themselves; `extra` is more header
/// lines, each ending in CRLF.
pub fn raw_chat_head(body_len: usize, extra: &str) -> String {
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: relaygate\r\nauthorization: Bearer {CLIENT_KEY}\r\n\
         content-type: application/json\r\ncontent-length: {body_len}\r\n{extra}\r\n"
    )
}

/// Everything a raw connection receives until the peer closes it (or resets
/// it, after which what came before is still returned).
pub async fn read_to_close(stream: &mut (impl tokio::io::AsyncRead + Unpin)) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return received,
            Ok(n) => received.extend_from_slice(&buf[..n]),
        }
    }
}

/// What one request of a concurrent batch saw (its body read to the end).
pub struct Sent {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: bytes::Bytes,
    pub latency: Duration,
}

/// Sends `n` copies of `body` to `/v1/chat/completions` with the client
/// key, `concurrency` at a time.
pub async fn send_concurrently(gw: &Gateway, n: usize, concurrency: usize, body: &Value) -> Vec<Sent> {
    let c = client();
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let batch = concurrency.min(n - out.len());
        let tasks: Vec<_> = (0..batch)
            .map(|_| {
                let (c, url, body) = (c.clone(), gw.v1("/chat/completions"), body.clone());
                tokio::spawn(async move {
                    let started = tokio::time::Instant::now();
                    let r = c.post(url).bearer_auth(CLIENT_KEY).json(&body).send().await.unwrap();
                    let (status, headers) = (r.status().as_u16(), r.headers().clone());
                    let body = r.bytes().await.unwrap();
                    Sent {
                        status,
                        headers,
                        body,
                        latency: started.elapsed(),
                    }
                })
            })
            .collect();
        for t in tasks {
            out.push(t.await.unwrap());
        }
    }
    out
}

/// Sends a plain chat request and gives up on it after `after`, as a client
/// with a short timeout would (the connection is dropped).
pub async fn abandon_chat(gw: &Gateway, after: Duration) {
    let c = reqwest::Client::builder().timeout(after).build().unwrap();
    let r = c
        .post(gw.v1("/chat/completions"))
        .bearer_auth(CLIENT_KEY)
        .json(&chat(false))
        .send()
        .await;
    assert!(r.unwrap_err().is_timeout(), "the client gives up first");
}

/// Polls `check` until it returns true, panicking after `within`.
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check().await {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {within:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Reads a streaming response until `pred` holds for what arrived so far.
pub async fn read_until(resp: &mut reqwest::Response, buf: &mut Vec<u8>, pred: impl Fn(&[u8]) -> bool) {
    while !pred(buf) {
        match tokio::time::timeout(Duration::from_secs(5), resp.chunk()).await {
            Ok(Ok(Some(chunk))) => buf.extend_from_slice(&chunk),
            Ok(Ok(None)) => panic!("stream ended early: {}", String::from_utf8_lossy(buf)),
            Ok(Err(e)) => panic!("stream error: {e}"),
            Err(_) => panic!("no data within 5 s: {}", String::from_utf8_lossy(buf)),
        }
    }
}

/// Reads a streaming response to its end.
pub async fn read_all(resp: reqwest::Response) -> Vec<u8> {
    tokio::time::timeout(Duration::from_secs(10), resp.bytes())
        .await
        .expect("stream ends within 10 s")
        .expect("stream reads")
        .to_vec()
}

/// The `data:` payloads of an SSE body.
pub fn data_lines(body: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(body)
        .lines()
        .filter_map(|l| l.strip_prefix("data: ").map(str::to_owned))
        .collect()
}

/// Number of content chunks (`delta.content` non-empty) in an SSE body.
pub fn content_chunks(body: &[u8]) -> usize {
    data_lines(body)
        .iter()
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .is_some_and(|c| !c.is_empty())
        })
        .count()
}

/// A port with nothing listening on it.
pub async fn closed_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap().port()
}

/// The Python that runs the official `openai` SDK in the end-to-end tests:
/// `RELAYGATE_PYTHON`, else `.venv/bin/python` in the repo (what `.ci/run`
/// creates), else `python3`. `None` when `RELAYGATE_SKIP_SDK=1` asks to
/// skip the SDK's part on purpose.
/// Runs a Python script that drives `gw` with the openai SDK, with
/// `RELAYGATE_BASE_URL` and `RELAYGATE_API_KEY` (the client key) set and
/// `env` besides: `script` is a file under `tests/e2e/`, or (starting with a
/// newline) the program itself. Fails the test with the script's output,
/// or with the setup to do if the SDK is not installed. Returns stdout.
pub async fn run_sdk_script(python: &std::path::Path, script: &str, gw: &Gateway, env: &[(&str, String)]) -> String {
    run_sdk_script_at(python, script, &gw.v1(""), CLIENT_KEY, env).await
}

/// `run_sdk_script` against any OpenAI-compatible `base_url` (a simulator's,
/// say) with `api_key`.
pub async fn run_sdk_script_at(
    python: &std::path::Path,
    script: &str,
    base_url: &str,
    api_key: &str,
    env: &[(&str, String)],
) -> String {
    let mut cmd = tokio::process::Command::new(python);
    if script.starts_with('\n') {
        cmd.args(["-c", script]);
    } else {
        cmd.arg(
            std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("tests/e2e")
                .join(script),
        );
    }
    cmd.env("RELAYGATE_BASE_URL", base_url)
        .env("RELAYGATE_API_KEY", api_key);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("the SDK script finishes within 60 s")
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("No module named 'openai'"),
        "{} cannot import openai: run `python3 -m venv .venv && .venv/bin/pip install -r tests/requirements.txt`, \
         set RELAYGATE_PYTHON, or set RELAYGATE_SKIP_SDK=1 to skip this test",
        python.display()
    );
    assert!(out.status.success(), "SDK script failed:\n{stdout}\n{stderr}");
    stdout
}

pub fn sdk_python() -> Option<std::path::PathBuf> {
    if std::env::var("RELAYGATE_SKIP_SDK").is_ok_and(|v| v == "1") {
        eprintln!("skipped: RELAYGATE_SKIP_SDK=1");
        return None;
    }
    if let Ok(p) = std::env::var("RELAYGATE_PYTHON") {
        return Some(p.into());
    }
    let venv = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    Some(if venv.exists() { venv } else { "python3".into() })
}

/// Asserts an OpenAI-shaped error (`{"error":{"message","type","code"}}`)
/// with this status and code, and returns its body.
pub async fn expect_openai_error(resp: reqwest::Response, status: u16, code: &str) -> Value {
    assert_eq!(resp.status().as_u16(), status);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(
        body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(body["error"]["type"].as_str().is_some(), "{body}");
    body
}

/// The events of an SSE body whose events are named, as the Responses API
/// sends them: `(event, data)` for each, in order. Panics on a partial event
/// or one that is not `event:` then one `data:` line of JSON.
pub fn named_events(body: &[u8]) -> Vec<(String, Value)> {
    let text = std::str::from_utf8(body).expect("an SSE body is UTF-8");
    assert!(text.is_empty() || text.ends_with("\n\n"), "whole events only: {text}");
    text.split_terminator("\n\n")
        .map(|event| {
            let (name, data) = event
                .split_once('\n')
                .unwrap_or_else(|| panic!("not a named event: {event}"));
            let name = name
                .strip_prefix("event: ")
                .unwrap_or_else(|| panic!("no event name: {event}"));
            let data = data
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("no data: {event}"));
            let data = serde_json::from_str(data).unwrap_or_else(|e| panic!("{e}: {data}"));
            (name.to_owned(), data)
        })
        .collect()
}

/// `value` with every number as an f64, to compare JSON that went through a
/// client which reads `1` as `1.0` (the openai SDK's float fields).
pub fn numbers_as_f64(value: &Value) -> Value {
    match value {
        Value::Number(n) => json!(n.as_f64().expect("a finite number")),
        Value::Array(items) => Value::Array(items.iter().map(numbers_as_f64).collect()),
        Value::Object(map) => Value::Object(map.iter().map(|(k, v)| (k.clone(), numbers_as_f64(v))).collect()),
        other => other.clone(),
    }
}

/// A `multipart/form-data` body with a `model` field and a `file` part
/// holding `file`, and its content type, built by hand so a test knows the
/// exact bytes (reqwest's multipart is not enabled).
pub fn multipart_upload(file: &[u8]) -> (String, Vec<u8>) {
    let boundary = format!("relaygate-test-{:016x}", fastrand::u64(..));
    let mut body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n\
         --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"audio.wav\"\r\n\
         Content-Type: audio/wav\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(file);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

/// `bytes` as a streamed request body of 64 KiB chunks (no copy).
pub fn chunked_body(bytes: bytes::Bytes) -> reqwest::Body {
    let chunks: Vec<Result<bytes::Bytes, std::io::Error>> = (0..bytes.len())
        .step_by(64 * 1024)
        .map(|at| Ok(bytes.slice(at..(at + 64 * 1024).min(bytes.len()))))
        .collect();
    reqwest::Body::wrap_stream(futures_util::stream::iter(chunks))
}
