//! The status page (`edge::status`): its JSON and headers over HTTP, then
//! the page itself in a real headless Chromium in front of `relaygate demo`,
//! asserting what a person would see.
//!
//! The browser is driven through chromedriver's WebDriver HTTP API with the
//! reqwest client the tests already use: no Selenium, no Python, no new
//! crate. chromedriver is started on port 0 and prints the port it took.
//! Without Chromium the test fails and says what to install: it never skips.
//!
//! The screenshot goes to `$CARGO_TARGET_TMPDIR/status-page.png` on every
//! run, and to `docs/status-page.png` (the README's) with
//! `RELAYGATE_UPDATE_SCREENSHOT=1`, so that a test run leaves the checkout
//! clean.

use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::common::process::Proc;
use crate::common::{chat, client, config_for, post_chat, Gateway, CLIENT_KEY};
use relaygate::sim::{Faults, Sim};

const ADMIN_KEY: &str = "sk-admin-key-for-tests-000";
/// The page, its script, style and icon: the budget is ~60 KiB.
const PAGE_BUDGET: usize = 60 * 1024;

#[tokio::test]
async fn status_json_shows_health_without_a_key_and_secrets_never() {
    let sim = Sim::start("a", Faults::default()).await.unwrap();
    // A per-key budget: its buckets are client key names, admin only.
    let config =
        config_for(&[("a", &sim)]) + "\n[[budgets]]\nname = \"per-key\"\nscope = \"key\"\nusd = 5\nperiod = \"day\"\n";
    let gw = Gateway::start(&config, &[]).await;
    assert_eq!(post_chat(&gw, &chat(false)).await.status(), 200);
    let c = client();
    let get = |path: &str, key: Option<&str>| {
        let mut r = c.get(format!("{}{path}", gw.url));
        if let Some(key) = key {
            r = r.bearer_auth(key);
        }
        r.send()
    };

    let mut page_bytes = 0;
    for (path, kind) in [
        ("/", "text/html"),
        ("/status", "text/html"),
        ("/status.js", "text/javascript"),
        ("/status.css", "text/css"),
        ("/favicon.svg", "image/svg+xml"),
    ] {
        let r = get(path, None).await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        let csp = r.headers()["content-security-policy"].to_str().unwrap().to_owned();
        assert!(csp.starts_with("default-src 'self'"), "{path}: {csp}");
        assert!(!csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"), "{csp}");
        assert!(
            r.headers()["content-type"].to_str().unwrap().starts_with(kind),
            "{path}"
        );
        let text = r.text().await.unwrap();
        if path != "/status" {
            page_bytes += text.len();
        }
        // The SVG namespace is a name, not a request.
        let text = text.replace("http://www.w3.org/2000/svg", "");
        assert!(
            !text.contains("http://") && !text.contains("https://"),
            "{path} names another origin"
        );
    }
    assert!(page_bytes < PAGE_BUDGET, "the page is {page_bytes} bytes");

    let public: Value = get("/status.json", None).await.unwrap().json().await.unwrap();
    assert_eq!(public["status"], "healthy");
    assert_eq!(public["overall"]["request_count"], 1);
    assert_eq!(public["overall"]["totals"]["ok"], 1.0);
    assert_eq!(public["upstreams"][0]["name"], "a");
    assert_eq!(public["upstreams"][0]["breaker"]["state"], "closed");
    assert_eq!(public["models"][0]["targets"][0]["upstream"], "a");
    assert_eq!(public["admin_enabled"], true);
    assert!(public.get("admin").is_none(), "{public}");
    assert!(public.get("rate_limits").is_none() && public.get("shadow").is_none());
    assert!(public.get("cache").is_none(), "no cache configured, no panel");
    assert!(public.get("routing").is_none(), "no latency or cost routing, no panel");
    let budget = &public["budgets"][0];
    assert_eq!(
        (budget["name"].as_str(), budget["limit_usd"].as_f64()),
        (Some("per-key"), Some(5.0))
    );
    assert_eq!(
        budget["buckets"],
        json!([]),
        "per-key spend needs the admin key: {budget}"
    );
    assert_eq!(public["models"][0]["totals"]["requests_by_upstream"]["a"], 1.0);

    let wrong = get("/status.json", Some("sk-not-the-admin-key")).await.unwrap();
    assert_eq!(wrong.status(), 403);
    let body: Value = wrong.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_admin_key", "{body}");

    let admin: Value = get("/status.json", Some(ADMIN_KEY))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(admin["admin"]["keys"], json!(["app-a"]), "{admin}");
    assert_eq!(admin["budgets"][0]["buckets"][0]["name"], "app-a", "{admin}");

    // No secret, in any form the page could receive: the JSON without and
    // with the admin key, and the page's files.
    let mut seen = vec![public.to_string(), admin.to_string()];
    for path in ["/", "/status.js", "/status.css"] {
        seen.push(get(path, Some(ADMIN_KEY)).await.unwrap().text().await.unwrap());
    }
    for text in &seen {
        for secret in [ADMIN_KEY, CLIENT_KEY, "sk-upstream-a-secret-9876543210", "secret"] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
    }
}

/// A chromedriver process and one browser session in it.
struct Browser {
    http: reqwest::Client,
    session: String,
    _driver: Child,
}

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

impl Browser {
    async fn start() -> Browser {
        let driver = std::env::var("RELAYGATE_CHROMEDRIVER").unwrap_or_else(|_| "chromedriver".into());
        let mut child = Command::new(&driver)
            .arg("--port=0")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {driver}: {e}. The status page test needs Chromium: \
                     `apt-get install chromium chromium-driver` (.ci/run does), or set RELAYGATE_CHROMEDRIVER"
                )
            });
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let port = tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if let Some(rest) = line.split("started successfully on port ").nth(1) {
                    return rest.trim_end_matches('.').parse::<u16>().unwrap();
                }
            }
            panic!("{driver} exited before it started");
        })
        .await
        .unwrap_or_else(|_| panic!("{driver} did not start within 10 s"));
        // Keep reading its stdout, so that a full pipe never blocks it.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });

        let http = reqwest::Client::new();
        let mut options = json!({
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--hide-scrollbars", "--window-size=1280,1400"],
        });
        if let Ok(binary) = std::env::var("RELAYGATE_CHROMIUM") {
            options["binary"] = json!(binary);
        }
        let caps = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": options,
            "goog:loggingPrefs": { "browser": "ALL" },
        }}});
        let r: Value = http
            .post(format!("http://127.0.0.1:{port}/session"))
            .json(&caps)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let Some(id) = r["value"]["sessionId"].as_str() else {
            panic!("Chromium did not start (is the chromium package installed?): {r}");
        };
        Browser {
            http,
            session: format!("http://127.0.0.1:{port}/session/{id}"),
            _driver: child,
        }
    }

    /// One WebDriver command; its `value`, or a panic with the error.
    async fn cmd(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut r = self.http.request(method, format!("{}{path}", self.session));
        if let Some(body) = body {
            r = r.json(&body);
        }
        let r: Value = r.send().await.unwrap().json().await.unwrap();
        if r["value"]["error"].is_string() {
            panic!("webdriver {path}: {}", r["value"]);
        }
        r["value"].clone()
    }

    async fn post(&self, path: &str, body: Value) -> Value {
        self.cmd(reqwest::Method::POST, path, Some(body)).await
    }

    async fn js(&self, script: &str) -> Value {
        self.post("/execute/sync", json!({ "script": script, "args": [] }))
            .await
    }

    /// Polls `script` until it returns something truthy, for up to `within`.
    async fn until(&self, within: Duration, what: &str, script: &str) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let v = self.js(script).await;
            if !(v.is_null() || v == json!(false) || v == json!("") || v == json!(0)) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {within:?} waiting for: {what}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn polls(&self) -> u64 {
        let v = self.js("return Number(document.body.dataset.polls || 0)").await;
        v.as_u64().unwrap_or(0)
    }

    /// Waits for the page to complete `n` more polls of /status.json.
    async fn next_polls(&self, n: u64) -> u64 {
        let target = self.polls().await + n;
        let script = format!("return Number(document.body.dataset.polls || 0) >= {target}");
        self.until(Duration::from_secs(3 * n + 3), "the next poll", &script)
            .await;
        target
    }

    async fn element(&self, css: &str) -> String {
        let v = self
            .post("/element", json!({ "using": "css selector", "value": css }))
            .await;
        v[ELEMENT].as_str().unwrap().to_owned()
    }

    async fn click(&self, css: &str) {
        let id = self.element(css).await;
        self.post(&format!("/element/{id}/click"), json!({})).await;
    }

    async fn text_of(&self, css: &str) -> String {
        let script = format!("const e = document.querySelector({css:?}); return e ? e.innerText : null");
        self.js(&script).await.as_str().unwrap_or_default().to_owned()
    }
}

impl Drop for Browser {
    /// Ends the session, so that chromedriver closes Chromium before it is
    /// killed (`kill_on_drop` would leave Chromium running). Written on a
    /// plain socket so that it also runs while a failed test unwinds.
    fn drop(&mut self) {
        use std::io::{Read, Write};
        let rest = self.session.trim_start_matches("http://");
        let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        if let Ok(mut s) = std::net::TcpStream::connect(host) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
            let request =
                format!("DELETE {path} HTTP/1.1\r\nhost: {host}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
            if s.write_all(request.as_bytes()).is_ok() {
                let _ = s.read_to_end(&mut Vec::new());
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_in_chromium_against_the_demo() {
    let started = Instant::now();
    let mut demo = Proc::spawn_quiet(&[
        "demo",
        "--listen",
        "127.0.0.1:0",
        "--outage-every",
        "0",
        "--admin-key",
        ADMIN_KEY,
    ])
    .await;
    let origin = demo.url.clone();
    loop {
        let line = demo.next_line().await;
        if line.starts_with("Open http://") {
            assert!(line.starts_with(&format!("Open {origin}/ in a browser")), "{line}");
            break;
        }
    }
    let page = client().get(format!("{origin}/")).send().await.unwrap();
    let csp = page.headers()["content-security-policy"].to_str().unwrap().to_owned();
    assert!(csp.starts_with("default-src 'self'"), "{csp}");

    let b = Browser::start().await;
    b.post("/url", json!({ "url": format!("{origin}/") })).await;
    b.next_polls(1).await;

    // Both simulated upstreams, in config order.
    let names = b
        .js("return [...document.querySelectorAll('#upstream-table tbody tr')].map(r => r.dataset.upstream)")
        .await;
    assert_eq!(names, json!(["sim-healthy", "sim-flaky"]));

    // The numbers move from one poll to the next (the demo sends 20 req/s).
    let count = b.text_of("[data-metric=request_count] .value").await;
    b.next_polls(1).await;
    let later = b.text_of("[data-metric=request_count] .value").await;
    assert_ne!(count, later, "the request count did not change between two polls");
    let rps = b.text_of("[data-metric=rps] .value").await;
    assert!(rps.parse::<f64>().is_ok_and(|r| r > 0.0), "requests/s: {rps:?}");
    let sparks = b.js("return document.querySelectorAll('#tiles polyline').length").await;
    assert!(sparks.as_u64().unwrap() >= 1, "no sparkline drawn");

    // Without the key: no admin panels, no admin actions, and the key form.
    let hidden = b
        .js(
            "return [document.getElementById('keys').hidden, document.body.classList.contains('admin'), \
             document.querySelectorAll('[data-action]').length, document.getElementById('unlock').hidden]",
        )
        .await;
    assert_eq!(hidden, json!([true, false, 0, false]));

    // Forced open through the admin API: the page shows it at the next
    // poll that starts after the call (the one in flight may predate it).
    let r = client()
        .post(format!("{origin}/admin/upstreams/sim-flaky/open"))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let by = b.polls().await + 2;
    b.until(
        Duration::from_secs(6),
        "sim-flaky shown as forced open",
        "return document.querySelector('[data-upstream=sim-flaky] .state').innerText.includes('forced open')",
    )
    .await;
    assert!(b.polls().await <= by, "shown later than the next poll");
    let state = b.text_of("[data-upstream=sim-flaky] .state").await;
    assert_eq!(state, "✕ forced open", "a text label, not only a colour");

    // The key, typed into the page: admin panels and actions appear.
    let key = b.element("#key").await;
    b.post(&format!("/element/{key}/value"), json!({ "text": ADMIN_KEY }))
        .await;
    b.click("#unlock button").await;
    b.until(
        Duration::from_secs(6),
        "the admin panels",
        "return document.body.classList.contains('admin') && !document.getElementById('keys').hidden \
         && document.querySelectorAll('[data-action]').length === 4",
    )
    .await;
    let stored = b.js("return sessionStorage.getItem('relaygate.adminKey')").await;
    assert_eq!(stored, json!(ADMIN_KEY), "kept in sessionStorage");
    let cookies = b.js("return document.cookie").await;
    assert_eq!(cookies, json!(""), "never in a cookie");

    // Traffic has failed over: the page shows the healthy upstream answering.
    b.next_polls(2).await;
    let served = b.text_of("[data-model=deepseek-chat] td:nth-child(3)").await;
    assert!(served.contains("sim-healthy"), "served by: {served:?}");
    // The demo's cached model: its panel, with hits since start.
    let hits = b.text_of("[data-cache-model=deepseek-cached] td:nth-child(3)").await;
    assert!(hits.ends_with('%') && hits != "0%", "cache hit ratio: {hits:?}");
    let served = b.text_of("[data-model=deepseek-cached] td:nth-child(3)").await;
    assert!(served.contains("cache"), "served by the cache: {served:?}");
    // The demo's budgets and its latency-routed model have their panels.
    let spent = b.text_of("[data-budget=demo-daily] td:nth-child(3)").await;
    assert!(spent.contains(" of $"), "budget spent: {spent:?}");
    let estimate = b
        .text_of("[data-route='deepseek-fastest/sim-healthy'] td:nth-child(4)")
        .await;
    assert!(
        estimate.ends_with("ms") || estimate.ends_with(" s"),
        "TTFT estimate: {estimate:?}"
    );
    let attempts = b.text_of("[data-upstream=sim-flaky] td:nth-child(7)").await;
    assert!(attempts.starts_with("0.0/s"), "sim-flaky still attempted: {attempts:?}");
    let png = b.cmd(reqwest::Method::GET, "/screenshot", None).await;
    save_screenshot(png.as_str().unwrap());

    // An admin action asks first, then acts.
    b.click("[data-upstream=sim-flaky] [data-action=reset]").await;
    let question = b.cmd(reqwest::Method::GET, "/alert/text", None).await;
    assert!(question.as_str().unwrap().contains("sim-flaky"), "{question}");
    b.post("/alert/accept", json!({})).await;
    b.until(
        Duration::from_secs(6),
        "sim-flaky closed again",
        "return document.querySelector('[data-upstream=sim-flaky] .state').innerText.includes('closed')",
    )
    .await;

    // A phone's width: the page itself does not scroll sideways (wide tables
    // scroll in their own box). Emulated: a headless window has a minimum width.
    let phone = json!({ "width": 390, "height": 844, "deviceScaleFactor": 1, "mobile": true });
    b.post(
        "/goog/cdp/execute",
        json!({ "cmd": "Emulation.setDeviceMetricsOverride", "params": phone }),
    )
    .await;
    let width = b
        .until(
            Duration::from_secs(5),
            "the narrow layout",
            "return window.innerWidth <= 400 && document.documentElement.scrollWidth",
        )
        .await;
    let inner = b.js("return window.innerWidth").await;
    assert!(
        width.as_u64() <= inner.as_u64(),
        "page {width} px wide in a {inner} px window"
    );

    // Nothing left for another origin, and the key never went into a URL.
    let urls = b
        .js("return performance.getEntries().filter(e => e.entryType === 'navigation' || e.entryType === 'resource').map(e => e.name)")
        .await;
    let urls: Vec<String> = serde_json::from_value(urls).unwrap();
    assert!(urls.iter().any(|u| u.ends_with("/status.json")), "{urls:?}");
    for url in &urls {
        assert!(
            url.starts_with(&format!("{origin}/")),
            "a request to another origin: {url}"
        );
        assert!(!url.contains(ADMIN_KEY), "the key in a URL: {url}");
    }

    // No console error (a CSP violation would be one) since the page loaded.
    let log = b.post("/se/log", json!({ "type": "browser" })).await;
    let errors: Vec<&Value> = log
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["level"] == "SEVERE")
        .collect();
    assert!(errors.is_empty(), "console errors: {errors:?}");

    drop(b);
    demo.signal("-INT");
    eprintln!("status page test: {:?}", started.elapsed());
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "took {:?}",
        started.elapsed()
    );
}

fn save_screenshot(base64: &str) {
    let png = decode_base64(base64);
    assert!(png.starts_with(b"\x89PNG"), "not a PNG");
    let tmp = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-page.png");
    std::fs::write(&tmp, &png).unwrap();
    if std::env::var("RELAYGATE_UPDATE_SCREENSHOT").is_ok_and(|v| v == "1") {
        let docs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/status-page.png");
        std::fs::write(&docs, &png).unwrap();
        eprintln!("wrote {}", docs.display());
    }
}

/// Standard base64 (WebDriver's screenshot encoding), without a crate for it.
fn decode_base64(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let bytes: Vec<u8> = text
        .bytes()
        .filter(|&c| c != b'=' && !c.is_ascii_whitespace())
        .collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            n |= u32::from(value(c)) << (18 - 6 * i);
        }
        out.extend_from_slice(&n.to_be_bytes()[1..chunk.len()]);
    }
    out
}
