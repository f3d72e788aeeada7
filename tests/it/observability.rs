//! The metrics contract, token and cost accounting (plain and streamed),
//! the injected usage chunk's stripping, `/health` percentiles, the usage
//! ledger after a burst and a graceful shutdown, `promtool check metrics`,
//! and OTLP trace export through the gateway.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use relaygate::sim::{Faults, Sim};
use serde_json::{json, Value};

use crate::common::*;

const MODEL: &str = r#"model="deepseek-chat""#;

#[tokio::test]
async fn counts_and_labels_after_a_scripted_mix() {
    let sim = Sim::start("a", Faults::default()).await.unwrap();
    let config = config_for(&[("a", &sim)]).replace("[retry]\n", "[retry]\nmax_attempts = 1\n");
    let gw = Gateway::start(&config, &[]).await;
    for _ in 0..3 {
        assert_eq!(post_chat(&gw, &chat(false)).await.status(), 200);
    }
    for _ in 0..2 {
        read_all(post_chat(&gw, &chat(true)).await).await;
    }
    sim.set_faults(Faults {
        status: Some(500),
        ..Faults::default()
    });
    assert_eq!(post_chat(&gw, &chat(false)).await.status(), 500);
    let mut unknown = chat(false);
    unknown["model"] = json!("nope");
    assert_eq!(post_chat(&gw, &unknown).await.status(), 404);

    let m = gw.metrics().await;
    let v = |series: &str| metric_value(&m, series);
    assert_eq!(
        v(&format!(
            r#"relaygate_requests_total{{{MODEL},outcome="success",status="200"}}"#
        )),
        5.0
    );
    assert_eq!(
        v(&format!(
            r#"relaygate_requests_total{{{MODEL},outcome="upstream_error",status="500"}}"#
        )),
        1.0
    );
    assert_eq!(
        v(r#"relaygate_requests_total{model="other",outcome="client_error",status="404"}"#),
        1.0
    );
    assert_eq!(
        v(&format!(r#"relaygate_request_duration_seconds_count{{{MODEL}}}"#)),
        6.0
    );
    assert_eq!(
        v(r#"relaygate_upstream_requests_total{error_type="none",status="200",upstream="a"}"#),
        5.0
    );
    assert_eq!(
        v(r#"relaygate_upstream_requests_total{error_type="server_error",status="500",upstream="a"}"#),
        1.0
    );
    assert_eq!(v(r#"relaygate_upstream_duration_seconds_count{upstream="a"}"#), 6.0);
    assert_eq!(
        v(&format!(
            r#"relaygate_time_to_first_token_seconds_count{{{MODEL},upstream="a"}}"#
        )),
        2.0
    );
    assert!(
        v(&format!(
            r#"relaygate_inter_token_seconds_count{{{MODEL},upstream="a"}}"#
        )) >= 2.0
    );
    assert_eq!(v("relaygate_overhead_seconds_count"), 7.0);
    assert_eq!(v("relaygate_in_flight_requests"), 0.0);
    assert_eq!(
        v(&format!(
            r#"relaygate_build_info{{version="{}"}}"#,
            env!("CARGO_PKG_VERSION")
        )),
        1.0
    );
    assert!(m.contains("process_resident_memory_bytes"));
    assert!(m.contains("relaygate_config_reloads_total{result=\"error\"} 0"));
}

#[tokio::test]
async fn tokens_and_cost_from_plain_and_streamed_usage() {
    let sim = Sim::start(
        "a",
        Faults {
            cached_tokens: 4,
            reasoning_tokens: 2,
            ..Faults::default()
        },
    )
    .await
    .unwrap();
    let gw = Gateway::with_sim(&sim).await;
    let body: Value = post_chat(&gw, &chat(false)).await.json().await.unwrap();
    let prompt = body["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(prompt > 4);
    // The client streams without asking for usage: relaygate asks for it.
    read_all(post_chat(&gw, &chat(true)).await).await;
    assert_eq!(
        serde_json::from_slice::<Value>(&sim.last_request().unwrap().body).unwrap()["stream_options"],
        json!({ "include_usage": true })
    );

    let m = gw.metrics().await;
    let tokens = |kind: &str| {
        metric_value(
            &m,
            &format!(r#"relaygate_tokens_total{{{MODEL},type="{kind}",upstream="a"}}"#),
        )
    };
    assert_eq!(tokens("prompt"), 2.0 * prompt as f64);
    assert_eq!(tokens("completion"), 10.0);
    assert_eq!(tokens("cached_prompt"), 8.0);
    assert_eq!(tokens("reasoning"), 4.0);
    // $0.28/M uncached input, $0.028/M cached, $0.42/M output.
    let per_request = ((prompt - 4) as f64 * 0.28 + 4.0 * 0.028 + 5.0 * 0.42) / 1e6;
    let cost = metric_value(&m, &format!(r#"relaygate_cost_usd_total{{{MODEL},upstream="a"}}"#));
    assert!(
        (cost - 2.0 * per_request).abs() < 1e-12,
        "{cost} vs {}",
        2.0 * per_request
    );
}

#[tokio::test]
async fn the_injected_usage_chunk_is_stripped_and_nothing_else() {
    let sim = Sim::start(
        "a",
        Faults {
            split_events: true,
            ..Faults::default()
        },
    )
    .await
    .unwrap();
    let gw = Gateway::with_sim(&sim).await;
    let client_bytes = read_all(post_chat(&gw, &chat(true)).await).await;
    let upstream_bytes = sim.last_stream_bytes();
    assert!(
        String::from_utf8_lossy(&upstream_bytes).contains("\"usage\""),
        "usage was requested upstream"
    );
    assert!(
        !String::from_utf8_lossy(&client_bytes).contains("\"usage\""),
        "and not shown to the client"
    );
    let expected = relaygate::sse::strip_usage_only(upstream_bytes.clone().into());
    assert_eq!(
        String::from_utf8_lossy(&client_bytes),
        String::from_utf8_lossy(&expected)
    );
    assert_eq!(
        client_bytes.len() + usage_event_len(&upstream_bytes),
        upstream_bytes.len()
    );
}

fn usage_event_len(stream: &[u8]) -> usize {
    String::from_utf8_lossy(stream)
        .split("\n\n")
        .find(|e| e.contains("\"usage\""))
        .map(|e| e.len() + 2)
        .unwrap()
}

#[tokio::test]
async fn health_percentiles_follow_a_known_latency_distribution() {
    let sim = Sim::start(
        "a",
        Faults {
            header_delay: Duration::from_millis(50),
            ..Faults::default()
        },
    )
    .await
    .unwrap();
    let gw = Gateway::with_sim(&sim).await;
    let c = client();
    // 19 requests at ~50 ms, then 1 at ~400 ms: p50 ~50 ms, p95 ~50 ms
    // (rank 19 of 20), p99 ~400 ms (rank 20).
    let run = |n: usize| {
        let gw = &gw;
        async move {
            let sent = send_concurrently(gw, n, n, &chat(false)).await;
            assert!(sent.iter().all(|s| s.status == 200));
        }
    };
    run(19).await;
    sim.update(|f| f.header_delay = Duration::from_millis(400));
    run(1).await;

    let health: Value = c
        .get(format!("{}/health", gw.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["status"], "healthy", "{health}");
    assert_eq!(health["window_seconds"], 300);
    assert_eq!(health["request_count"], 20);
    assert_eq!(health["success_rate"], 1.0);
    let p = |q: &str| health["latency_ms"][q].as_f64().unwrap();
    assert!((48.0..300.0).contains(&p("p50")), "{health}");
    assert!(
        (48.0..300.0).contains(&p("p95")),
        "nearest rank: the 19th of 20, {health}"
    );
    assert!((395.0..700.0).contains(&p("p99")), "{health}");
    assert!(p("avg") > p("p50") && p("avg") < p("p99"));
    let upstream = &health["upstreams"][0];
    assert_eq!(
        (upstream["name"].as_str(), upstream["breaker"].as_str()),
        (Some("a"), Some("closed"))
    );
    assert_eq!(upstream["request_count"], 20);

    // One failure in 21: 95% success, below the 99% threshold.
    sim.set_faults(Faults {
        status: Some(503),
        ..Faults::default()
    });
    post_chat(&gw, &chat(false)).await;
    let health: Value = c
        .get(format!("{}/health", gw.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["status"], "degraded", "{health}");
    assert!(health["success_rate"].as_f64().unwrap() < 0.99);
}

#[tokio::test]
async fn ledger_lines_match_requests_one_to_one_after_a_burst_and_shutdown() {
    let sim = Sim::start("a", Faults::default()).await.unwrap();
    let broken = Sim::start(
        "b",
        Faults {
            reset_after: Some(3),
            ..Faults::default()
        },
    )
    .await
    .unwrap();
    let ledger = crate::common::process::temp_dir().join("usage.jsonl");
    let mut config = config_for(&[("a", &sim), ("b", &broken)]);
    config.push_str(&format!(
        "\n[ledger]\npath = \"{}\"\n\n[[models]]\nname = \"cut\"\ntargets = [{{ upstream = \"b\" }}]\n",
        ledger.display()
    ));
    let mut gw = Gateway::start(&config, &[]).await;
    let c = client();
    let mut tasks = Vec::new();
    for i in 0..60 {
        let (c, url) = (c.clone(), gw.v1("/chat/completions"));
        tasks.push(tokio::spawn(async move {
            let r = c
                .post(url)
                .bearer_auth(CLIENT_KEY)
                .json(&chat(i % 3 == 0))
                .send()
                .await
                .unwrap();
            let id = r.headers()["x-request-id"].to_str().unwrap().to_owned();
            r.bytes().await.unwrap();
            id
        }));
    }
    let mut ids: Vec<String> = Vec::new();
    for t in tasks {
        ids.push(t.await.unwrap());
    }
    let mut cut = chat(true);
    cut["model"] = json!("cut");
    let r = post_chat(&gw, &cut).await;
    ids.push(r.headers()["x-request-id"].to_str().unwrap().to_owned());
    read_all(r).await;

    gw.begin_shutdown();
    gw.stopped().await.unwrap();
    let text = std::fs::read_to_string(&ledger).unwrap();
    let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 61, "one line per request");
    let mut logged: Vec<String> = lines
        .iter()
        .map(|l| l["request_id"].as_str().unwrap().to_owned())
        .collect();
    logged.sort();
    ids.sort();
    assert_eq!(logged, ids);
    let normal = lines
        .iter()
        .find(|l| l["stream"] == true && l["model"] == "deepseek-chat")
        .unwrap();
    assert_eq!(normal["completion_tokens"], 5);
    assert_eq!(normal["usage_estimated"], false);
    assert_eq!(normal["upstream"], "a");
    assert_eq!(normal["upstream_model"], "deepseek-v3.2");
    assert_eq!(normal["key"], "app-a");
    assert!(normal["cost_usd"].as_f64().unwrap() > 0.0);
    let cut = lines.iter().find(|l| l["model"] == "cut").unwrap();
    assert_eq!(cut["usage_estimated"], true, "{cut}");
    // Estimated from the text seen, "Hello from the": 14 bytes / 4, rounded up.
    assert_eq!(cut["completion_tokens"], 4, "{cut}");
    assert_eq!(cut["outcome"], "upstream_error");

    // `relaygate usage` reads it back.
    let args = relaygate::cmd::usage::UsageArgs {
        ledger: ledger.clone(),
        since: None,
        by: relaygate::cmd::usage::GroupBy::Model,
        include_shadow: false,
        config: None,
        gateway: None,
    };
    let report = relaygate::cmd::usage::report(&args, std::time::SystemTime::now()).unwrap();
    assert!(report.contains("deepseek-chat") && report.contains("TOTAL"), "{report}");
}

#[tokio::test]
async fn promtool_check_metrics_is_clean() {
    if std::env::var("RELAYGATE_SKIP_PROMTOOL").is_ok_and(|v| v == "1") {
        eprintln!("skipped: RELAYGATE_SKIP_PROMTOOL=1");
        return;
    }
    let sim = Sim::start("a", Faults::default()).await.unwrap();
    let gw = Gateway::with_sim(&sim).await;
    post_chat(&gw, &chat(false)).await;
    read_all(post_chat(&gw, &chat(true)).await).await;
    let text = gw.metrics().await;
    let mut child = tokio::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; .ci/run installs it) or RELAYGATE_SKIP_PROMTOOL=1");
    use tokio::io::AsyncWriteExt;
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(text.as_bytes()).await.unwrap();
    drop(stdin);
    let out = child.wait_with_output().await.unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{report}");
    assert!(report.trim().is_empty(), "promtool reports: {report}");
}

#[tokio::test]
async fn traces_are_exported_with_the_clients_trace_id() {
    // A fake OTLP/HTTP collector.
    let received: Arc<Mutex<Vec<Value>>> = Arc::default();
    let sink = received.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let sink = sink.clone();
            async move {
                sink.lock().unwrap().push(serde_json::from_slice(&body).unwrap());
                "{}"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let collector = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });

    let (a, b) = (
        Sim::start(
            "a",
            Faults {
                status: Some(503),
                ..Faults::default()
            },
        )
        .await
        .unwrap(),
        Sim::start("b", Faults::default()).await.unwrap(),
    );
    let mut config = config_for(&[("a", &a), ("b", &b)]).replace(
        r#"targets = [{ upstream = "a", model = "deepseek-v3.2" }]"#,
        r#"targets = [{ upstream = "a", model = "deepseek-v3.2" }, { upstream = "b", model = "deepseek-v3.2", priority = 1 }]"#,
    );
    config.push_str(&format!("\n[otel]\nendpoint = \"{collector}\"\n"));
    let mut gw = Gateway::start(&config, &[]).await;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let resp = client()
        .post(gw.v1("/chat/completions"))
        .bearer_auth(CLIENT_KEY)
        .header("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01"))
        .json(&chat(false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let upstream_tp = b.last_request().unwrap().headers["traceparent"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(upstream_tp.starts_with(&format!("00-{trace_id}-")), "{upstream_tp}");
    gw.begin_shutdown();
    gw.stopped().await.unwrap();

    let batches = received.lock().unwrap().clone();
    let spans: Vec<Value> = batches
        .iter()
        .flat_map(|b| {
            b["resourceSpans"][0]["scopeSpans"][0]["spans"]
                .as_array()
                .unwrap()
                .clone()
        })
        .collect();
    assert_eq!(spans.len(), 3, "one request span and two attempts: {spans:?}");
    assert!(spans.iter().all(|s| s["traceId"] == trace_id));
    let request = spans.iter().find(|s| s["kind"] == 2).unwrap();
    assert_eq!(request["parentSpanId"], "00f067aa0ba902b7");
    assert_eq!(request["name"], "chat deepseek-chat");
    let attempts: Vec<_> = spans.iter().filter(|s| s["kind"] == 3).collect();
    assert!(attempts.iter().all(|s| s["parentSpanId"] == request["spanId"]));
    let attr = |s: &Value, key: &str| {
        s["attributes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["key"] == key)
            .map(|a| a["value"].clone())
    };
    assert_eq!(
        attr(request, "gen_ai.request.model").unwrap()["stringValue"],
        "deepseek-chat"
    );
    assert_eq!(attr(request, "gen_ai.usage.output_tokens").unwrap()["intValue"], "5");
    let upstreams: Vec<_> = attempts
        .iter()
        .map(|s| attr(s, "relaygate.upstream").unwrap()["stringValue"].clone())
        .collect();
    assert_eq!(upstreams, vec![json!("a"), json!("b")]);
    // The upstream saw the attempt span as the parent.
    let b_span = attempts
        .iter()
        .find(|s| attr(s, "relaygate.upstream").unwrap()["stringValue"] == "b")
        .unwrap();
    assert!(upstream_tp.contains(b_span["spanId"].as_str().unwrap()));
}
