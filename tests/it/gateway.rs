//! The core gateway, end to end over loopback: round trips, pass-through,
//! errors, auth, timeouts, cancellation and draining.

use std::time::{Duration, Instant};

use relaygate::sim::{Faults, Sim};
use serde_json::{json, Value};

use crate::common::*;

#[tokio::test]
async fn json_round_trip_rewrites_only_the_model_and_swaps_credentials() {
    let sim = Sim::start("a", Faults::default()).await.unwrap();
    let gw = Gateway::with_sim(&sim).await;
    let resp = client()
        .post(gw.v1("/chat/completions"))
        .bearer_auth(CLIENT_KEY)
        .header("x-request-id", "req-from-client-1")
        .header("openai-beta", "keep-me")
        .json(&chat(false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-request-id"], "req-from-client-1");
    assert_eq!(resp.headers()["x-relaygate-upstream"], "a");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], "deepseek-v3.2", "the upstream's answer passes through");
    assert_eq!(body["usage"]["completion_tokens"], 5);

    let seen = sim.last_request().unwrap();
    assert_eq!(seen.path, "/v1/chat/completions");
    let mut expected = chat(false);
    expected["model"] = json!("deepseek-v3.2");
    assert_eq!(
        serde_json::from_slice::<Value>(&seen.body).unwrap(),
        expected,
        "unknown fields survive"
    );
    assert_eq!(
        seen.headers["authorization"], "Bearer sk-upstream-a-secret-9876543210",
        "the upstream key replaces the client's"
    );
    assert_eq!(seen.headers["x-request-id"], "req-from-client-1");
    assert_eq!(seen.headers["openai-beta"], "keep-me");
    // The upstream's own authority, once: not the gateway's, which the client sent.
    let hosts: Vec<_> = seen.headers.get_all("host").iter().collect();
    assert_eq!(hosts, [sim.addr().to_string().as_str()]);

    let m = gw.metrics().await;
    assert_eq!(
        metric_value(
            &m,
            r#"relaygate_requests_total{model="deepseek-chat",outcome="success",status="200"}"#
        ),
        1.0
    );
    assert_eq!(
        metric_value(
            &m,
            r#"relaygate_tokens_total{model="deepseek-chat",type="completion",upstream="a"}"#
        ),
        5.0
    );
    assert_eq!(metric_value(&m, "relaygate_overhead_seconds_count"), 1.0);
    // The upstream wait is excluded: relaygate's own share is far below 50 ms
    // (a generous bound that only a bug, such as counting the upstream, breaks).
    assert!(metric_value(&m, "relaygate_overhead_seconds_sum") < 0.05);
}

#[tokio::test]
async fn request_ids_are_generated_when_missing() {
    let sim = Sim::start("a", Faults::default()).await.unwrap();
    let gw = Gateway::with_sim(&sim).await;
    let resp = post_chat(&gw, &chat(false)).await;
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert!(id.starts_with("req_") && id.len() == 36, "{id}");
    assert_eq!(sim.last_request().unwrap().headers["x-request-id"], id.as_str());
}

#[tokio::test]
async fn unsafe_client_request_ids_are_replaced() {
    let sim = Sim::start("a", Faults::default()).await.unwrap();
    let gw = Gateway::with_sim(&sim).await;
    for bad in ["has space", "x".repeat(200).as_str(), "quote\"d"] {
        let resp = client()
            .post(gw.v1("/chat/completions"))
            .bearer_auth(CLIENT_KEY)
            .header("x-request-id", bad)
            .json(&chat(false))
            .send()
            .await
            .unwrap();
        let id = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
        assert!(id.starts_with("req_"), "{bad} -> {id}");
    }
}

#[tokio::test]
async fn request_timeout_bounds_a_long_stream() {
    let sim = Sim::start(
        "a",
        Faults {
            chunks: 1000,
            chunk_interval: Duration::from_millis(50),
            ..Faults::default()
        },
    )
    .await
    .unwrap();
    let config = config_for(&[("a", &sim)]).replace("request_timeout = \"10s\"", "request_timeout = \"1s\"");
    let gw = Gateway::start(&config, &[]).await;
    let started = Instant::now();
    let body = read_all(post_chat(&gw, &chat(true)).await).await;
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "{took:?}"
    );
    let last: Value = serde_json::from_str(data_lines(&body).last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "upstream_request_timeout");
    assert!(content_chunks(&body) > 5);
    eventually(Duration::from_secs(1), "the upstream stream is closed", || async {
        sim.stats().streams_cancelled == 1
    })
    .await;
}

#[tokio::test]
async fn stream_is_byte_identical_even_with_events_split_across_packets() {
    for split in [false, true] {
        let sim = Sim::start(
            "a",
            Faults {
                split_events: split,
                chunk_interval: Duration::from_millis(2),
                ..Faults::default()
            },
        )
        .await
        .unwrap();
        let gw = Gateway::with_sim(&sim).await;
        let mut body = chat(true);
        body["stream_options"] = json!({ "include_usage": true });
        let mut resp = post_chat(&gw, &body).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-type"], "text/event-stream");
        let mut received = Vec::new();
        let mut chunks = Vec::new();
        while let Some(chunk) = resp.chunk().await.unwrap() {
            received.extend_from_slice(&chunk);
            chunks.push(chunk);
        }
        assert_eq!(
            String::from_utf8_lossy(&received),
            String::from_utf8_lossy(&sim.last_stream_bytes()),
            "split={split}"
        );
        assert!(received.ends_with(b"data: [DONE]\n\n"));
        // relaygate forwards whole events only, never half of one.
        for chunk in &chunks {
            assert!(chunk.ends_with(b"\n\n"), "partial event forwarded: {chunk:?}");
        }
        let m = gw.metrics().await;
        assert_eq!(
            metric_value(
                &m,
                r#"relaygate_tokens_total{model="deepseek-chat",type="completion",upstream="a"}"#
            ),
            5.0
        );
        assert_eq!(
            metric_value(
                &m,
                r#"relaygate_time_to_first_token_seconds_count{model="deepseek-chat",upstream="a"}"#
            ),
            1.0
        );
    }
}

#[tokio::test]
async fn first_chunk_reaches_the_client_before_the_upstream_sends_the_second() {
    let sim = Sim::start(
        "a",
        Faults {
            stall_after: Some(1),
            ..Faults::default()
        },
    )
    .await
    .unwrap();
    // A long idle timeout: the stall here is the test holding the upstream.
    let config = config_for(&[("a", &sim)]).replace("idle_timeout = \"500ms\"", "idle_timeout = \"30s\"");
    let gw = Gateway::start(&config, &[]).await;
    let mut resp = post_chat(&gw, &chat(true)).await;
    let mut buf = Vec::new();
    read_until(&mut resp, &mut buf, |b| content_chunks(b) == 1).await;
    assert_eq!(
        sim.stats().chunks_sent,
        1,
        "the upstream has sent only the first content chunk"
    );
    sim.release();
    let rest = read_all(resp).await;
    buf.extend_from_slice(&rest);
    assert_eq!(content_chunks(&buf), 5);
    assert!(buf.ends_with(b"data: [DONE]\n\n"));
}

#[tokio::test]
async fn completions_embeddings_and_models() {
    let sim = Sim::start("a", Faults::default()).await.unwrap();
    let gw = Gateway::with_sim(&sim).await;
    let c = client();
    let r = post_v1(
        &gw,
        "/completions",
        &json!({ "model": "deepseek-chat", "prompt": "Say hi" }),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["object"], "text_completion");
    assert_eq!(sim.last_request().unwrap().path, "/v1/completions");

    let r = post_v1(
        &gw,
        "/embeddings",
        &json!({ "model": "deepseek-chat", "input": ["a", "b"] }),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["data"].as_array().unwrap().len(), 2);
    assert_eq!(sim.last_request().unwrap().path, "/v1/embeddings");

    let requests_before = sim.stats().requests;
    let r = c.get(gw.v1("/models")).bearer_auth(CLIENT_KEY).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let list: Value = r.json().await.unwrap();
    assert_eq!(list["object"], "list");
    assert_eq!(list["data"][0]["id"], "deepseek-chat");
    assert_eq!(list["data"][0]["object"], "model");
    assert_eq!(sim.stats().requests, requests_before, "answered from the config");
    let r = c.get(gw.v1("/models")).send().await.unwrap();
    assert_eq!(r.status(), 401);
}

async fn expect_error(resp: reqwest::Response, status: u16, code: &str) -> Value {
    assert_eq!(resp.status().as_u16(), status);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(
        body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(body["error"]["type"].as_str().is_some(), "{body}");
    body
}

#[tokio::test]
async fn bad_requests_get_400_and_never_reach_upstream() {
    let sim = Sim::start("a", Faults::default()).await.unwrap();
    let gw = Gateway::with_sim(&sim).await;
    let c = client();
    for body in [
        "{not json",
        "[]",
        "",
        r#"{"messages":[]}"#,
        r#"{"model":"deepseek-chat","messages":"hello"}"#,
        r#"{"model":"deepseek-chat"}"#,
        r#"{"model":7,"messages":[]}"#,
    ] {
        let resp = c
            .post(gw.v1("/chat/completions"))
            .bearer_auth(CLIENT_KEY)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let e = expect_error(resp, 400, "invalid_request").await;
        assert_eq!(e["error"]["type"], "invalid_request_error");
    }
    assert_eq!(sim.stats().requests, 0);
}

#[tokio::test]
async fn unknown_model_is_404_and_labelled_other() {
    let sim = Sim::start("a", Faults::default()).await.unwrap();
    let gw = Gateway::with_sim(&sim).await;
    let mut body = chat(false);
    body["model"] = json!("gpt-secret-project-x");
    let e = expect_error(post_chat(&gw, &body).await, 404, "model_not_found").await;
    assert!(e["error"]["message"].as_str().unwrap().contains("gpt-secret-project-x"));
    let m = gw.metrics().await;
    assert!(
        !m.contains("gpt-secret-project-x"),
        "raw model names never become labels"
    );
    assert_eq!(
        metric_value(
            &m,
            r#"relaygate_requests_total{model="other",outcome="client_error",status="404"}"#
        ),
        1.0
    );
    assert_eq!(sim.stats().requests, 0);
}

#[tokio::test]
async fn oversized_bodies_get_413_declared_or_chunked() {
    let sim = Sim::start("a", Faults::default()).await.unwrap();
    let gw = Gateway::with_sim(&sim).await;
    let big = json!({ "model": "deepseek-chat", "messages": [{ "role": "user", "content": "x".repeat(70_000) }] });
    let resp = post_chat(&gw, &big).await;
    expect_error(resp, 413, "payload_too_large").await;

    // No Content-Length: the limit is enforced while reading.
    let bytes = serde_json::to_vec(&big).unwrap();
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = bytes.chunks(8192).map(|c| Ok(c.to_vec())).collect();
    let resp = client()
        .post(gw.v1("/chat/completions"))
        .bearer_auth(CLIENT_KEY)
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(chunks)))
        .send()
        .await
        .unwrap();
    expect_error(resp, 413, "payload_too_large").await;
    assert_eq!(sim.stats().requests, 0);
}

#[tokio::test]
async fn unknown_paths_are_openai_shaped_404s() {
    let sim = Sim::start("a", Faults::default()).await.unwrap();
    let gw = Gateway::with_sim(&sim).await;
    let resp = client().get(gw.v1("/assistants")).send().await.unwrap();
    expect_error(resp, 404, "unknown_url").await;
    let resp = client().get(gw.v1("/chat/completions")).send().await.unwrap();
    expect_error(resp, 404, "unknown_url").await;
    // Only the exact paths are proxied; a query string does not matter.
    let resp = post_v1(&gw, "/chat/completions/", &chat(false)).await;
    expect_error(resp, 404, "unknown_url").await;
    let resp = post_v1(&gw, "/chat/completions?x=1", &chat(false)).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(sim.stats().requests, 1);
}

#[tokio::test]
async fn auth_is_required_and_checked() {
    let sim = Sim::start("a", Faults::default()).await.unwrap();
    let gw = Gateway::with_sim(&sim).await;
    let c = client();
    let resp = c
        .post(gw.v1("/chat/completions"))
        .json(&chat(false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["www-authenticate"], "Bearer");
    expect_error(resp, 401, "invalid_api_key").await;
    let resp = c
        .post(gw.v1("/chat/completions"))
        .bearer_auth("sk-client-app-a-012345678")
        .json(&chat(false))
        .send()
        .await
        .unwrap();
    expect_error(resp, 401, "invalid_api_key").await;
    assert_eq!(sim.stats().requests, 0);
    assert_eq!(post_chat(&gw, &chat(false)).await.status(), 200);
}

#[tokio::test]
async fn upstream_4xx_and_json_5xx_pass_through_unchanged() {
    let sim = Sim::start(
        "a",
        Faults {
            status: Some(422),
            ..Faults::default()
        },
    )
    .await
    .unwrap();
    let gw = Gateway::with_sim(&sim).await;
    let resp = post_chat(&gw, &chat(false)).await;
    assert_eq!(resp.status(), 422);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "simulated");
    assert_eq!(sim.stats().requests, 1);

    sim.update(|f| f.status = Some(503));
    let resp = post_chat(&gw, &chat(true)).await;
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.json::<Value>().await.unwrap()["error"]["code"], "simulated");
    let m = gw.metrics().await;
    assert_eq!(
        metric_value(
            &m,
            r#"relaygate_upstream_requests_total{error_type="client_error",status="422",upstream="a"}"#
        ),
        1.0
    );
    assert_eq!(
        metric_value(
            &m,
            r#"relaygate_requests_total{model="deepseek-chat",outcome="upstream_error",status="503"}"#
        ),
        1.0
    );
}

#[tokio::test]
async fn connection_refused_is_502() {
    let port = closed_port().await;
    let sim = Sim::start("a", Faults::default()).await.unwrap();
    let config = config_for(&[("a", &sim)]).replace(&sim.base_url(), &format!("http://127.0.0.1:{port}/v1"));
    let gw = Gateway::start(&config, &[]).await;
    let started = Instant::now();
    let e = expect_error(post_chat(&gw, &chat(false)).await, 502, "upstream_connect_error").await;
    assert!(started.elapsed() < Duration::from_secs(1), "fails fast");
    assert!(
        !e.to_string().contains(&port.to_string()),
        "no upstream address in the error: {e}"
    );
    let m = gw.metrics().await;
    assert_eq!(
        metric_value(
            &m,
            r#"relaygate_upstream_requests_total{error_type="connect",status="none",upstream="a"}"#
        ),
        3.0,
        "retried up to retry.max_attempts"
    );
    assert_eq!(
        metric_value(&m, r#"relaygate_retries_total{reason="connect",upstream="a"}"#),
        2.0
    );
}

#[tokio::test]
async fn garbage_body_is_502() {
    let sim = Sim::start(
        "a",
        Faults {
            garbage_body: true,
            ..Faults::default()
        },
    )
    .await
    .unwrap();
    let gw = Gateway::with_sim(&sim).await;
    expect_error(post_chat(&gw, &chat(false)).await, 502, "upstream_malformed_response").await;
    // A stream whose body is not SSE at all is malformed too (before it commits).
    expect_error(post_chat(&gw, &chat(true)).await, 502, "upstream_malformed_response").await;
}

#[tokio::test]
async fn http_version_is_per_upstream_and_http1_by_default() {
    let sim = Sim::start("a", Faults::default()).await.unwrap();
    let gw = Gateway::with_sim(&sim).await;
    assert_eq!(post_chat(&gw, &chat(false)).await.status(), 200);
    assert_eq!(sim.last_request().unwrap().version, http::Version::HTTP_11);

    // "2" over http:// is h2c with prior knowledge, for plain and streamed
    // answers alike; many streams share the connection.
    let config = config_for(&[("a", &sim)]).replace(
        "request_timeout = \"10s\"",
        "request_timeout = \"10s\"\nhttp_version = \"2\"",
    );
    let gw = Gateway::start(&config, &[]).await;
    let resp = post_chat(&gw, &chat(false)).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.json::<Value>().await.unwrap()["usage"]["completion_tokens"], 5);
    assert_eq!(sim.last_request().unwrap().version, http::Version::HTTP_2);
    let sent = send_concurrently(&gw, 20, 20, &chat(true)).await;
    for s in &sent {
        assert_eq!(s.status, 200);
        assert!(s.body.ends_with(b"data: [DONE]\n\n"));
        assert_eq!(content_chunks(&s.body), 5);
    }
    assert_eq!(sim.last_request().unwrap().version, http::Version::HTTP_2);
}

#[tokio::test]
async fn large_answers_arrive_whole_and_are_bounded() {
    // ~140 KB of JSON: several reads on the upstream connection.
    let sim = Sim::start(
        "a",
        Faults {
            chunks: 20_000,
            ..Faults::default()
        },
    )
    .await
    .unwrap();
    let gw = Gateway::with_sim(&sim).await;
    let resp = post_chat(&gw, &chat(false)).await;
    assert_eq!(resp.status(), 200);
    let body = resp.bytes().await.unwrap();
    assert!(body.len() > 100_000, "{}", body.len());
    let answer: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(answer["usage"]["completion_tokens"], 20_000);
    let direct: Value = client()
        .post(format!("{}/chat/completions", sim.base_url()))
        .json(&chat(false))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["choices"], direct["choices"], "the same text, whole");

    let small = config_for(&[("a", &sim)]).replace(
        "max_body_bytes = 65536",
        "max_body_bytes = 65536\nmax_response_bytes = 50000",
    );
    let gw = Gateway::start(&small, &[]).await;
    expect_error(post_chat(&gw, &chat(false)).await, 502, "upstream_malformed_response").await;
}

#[tokio::test]
async fn redirects_are_never_followed() {
    // Following one would send the request, with the upstream key, to
    // whatever host the Location names.
    let elsewhere = Sim::start("elsewhere", Faults::default()).await.unwrap();
    let sim = Sim::start(
        "a",
        Faults {
            redirect_to: Some(format!("{}/chat/completions", elsewhere.base_url())),
            ..Faults::default()
        },
    )
    .await
    .unwrap();
    let gw = Gateway::with_sim(&sim).await;
    expect_error(post_chat(&gw, &chat(false)).await, 502, "upstream_error").await;
    assert!(sim.stats().requests >= 1);
    assert_eq!(elsewhere.stats().requests, 0, "the redirect was followed");
    let seen = sim.last_request().unwrap();
    assert!(
        seen.headers["user-agent"].to_str().unwrap().starts_with("relaygate/"),
        "{:?}",
        seen.headers["user-agent"]
    );
}

#[tokio::test]
async fn headers_delayed_past_first_byte_timeout_is_504_and_cancels_upstream() {
    let sim = Sim::start(
        "a",
        Faults {
            header_delay: Duration::from_secs(30),
            ..Faults::default()
        },
    )
    .await
    .unwrap();
    let gw = Gateway::with_sim(&sim).await; // first_byte_timeout = 1s
    for stream in [false, true] {
        let started = Instant::now();
        let e = expect_error(post_chat(&gw, &chat(stream)).await, 504, "upstream_first_byte_timeout").await;
        assert_eq!(e["error"]["type"], "timeout_error");
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_secs(5),
            "{took:?}"
        );
    }
    // The seconds spent waiting on the upstream are not relaygate's overhead.
    assert!(gw.metric("relaygate_overhead_seconds_sum").await < 0.1);
    eventually(
        Duration::from_secs(2),
        "the upstream sees every attempt abandoned",
        || async { sim.stats().requests_cancelled == 5 },
    )
    .await;
    // 3 attempts for the first request, 2 for the second: the fifth
    // consecutive timeout opened the breaker, so no sixth call was made.
    assert_eq!(sim.stats().requests, 5);
    assert_eq!(gw.metric(r#"relaygate_circuit_state{upstream="a"}"#).await, 2.0);
}

#[tokio::test]
async fn a_silent_stream_after_its_headers_is_a_first_byte_timeout() {
    let sim = Sim::start(
        "a",
        Faults {
            stall_after: Some(0),
            ..Faults::default()
        },
    )
    .await
    .unwrap();
    let gw = Gateway::with_sim(&sim).await;
    // The role chunk arrives, so the stream commits; then nothing: idle timeout.
    let resp = post_chat(&gw, &chat(true)).await;
    assert_eq!(resp.status(), 200);
    let body = read_all(resp).await;
    let data = data_lines(&body);
    let last: Value = serde_json::from_str(data.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "upstream_idle_timeout");
}

async fn broken_stream(faults: Faults, code: &str) {
    let sim = Sim::start("a", faults).await.unwrap();
    let gw = Gateway::with_sim(&sim).await;
    let resp = post_chat(&gw, &chat(true)).await;
    assert_eq!(resp.status(), 200);
    let body = read_all(resp).await;
    assert_eq!(content_chunks(&body), 3, "{}", String::from_utf8_lossy(&body));
    let data = data_lines(&body);
    assert!(
        !data.iter().any(|d| d == "[DONE]"),
        "a broken stream never looks finished"
    );
    let last: Value = serde_json::from_str(data.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], code, "{last}");
    assert!(body.ends_with(b"}\n\n"));
    assert_eq!(sim.stats().streams_opened, 1);
    let m = gw.metrics().await;
    let outcome = if code == "upstream_idle_timeout" {
        "timeout"
    } else {
        "upstream_error"
    };
    assert_eq!(
        metric_value(
            &m,
            &format!(r#"relaygate_requests_total{{model="deepseek-chat",outcome="{outcome}",status="200"}}"#)
        ),
        1.0
    );
}

#[tokio::test]
async fn a_stall_after_three_chunks_ends_with_an_error_event() {
    broken_stream(
        Faults {
            stall_after: Some(3),
            ..Faults::default()
        },
        "upstream_idle_timeout",
    )
    .await;
}

#[tokio::test]
async fn a_reset_after_three_chunks_ends_with_an_error_event() {
    broken_stream(
        Faults {
            reset_after: Some(3),
            ..Faults::default()
        },
        "upstream_reset",
    )
    .await;
}

#[tokio::test]
async fn client_disconnect_cancels_the_upstream_stream() {
    let sim = Sim::start(
        "a",
        Faults {
            chunks: 10_000,
            chunk_interval: Duration::from_millis(20),
            ..Faults::default()
        },
    )
    .await
    .unwrap();
    let gw = Gateway::with_sim(&sim).await;
    let mut resp = post_chat(&gw, &chat(true)).await;
    let mut buf = Vec::new();
    read_until(&mut resp, &mut buf, |b| content_chunks(b) >= 1).await;
    let dropped = Instant::now();
    drop(resp);
    eventually(Duration::from_secs(1), "the upstream stream is cancelled", || async {
        sim.stats().streams_cancelled == 1
    })
    .await;
    assert!(dropped.elapsed() < Duration::from_secs(1));
    eventually(
        Duration::from_secs(1),
        "the request is recorded as cancelled",
        || async {
            gw.metric(r#"relaygate_requests_total{model="deepseek-chat",outcome="cancelled",status="499"}"#)
                .await
                == 1.0
        },
    )
    .await;
    assert_eq!(gw.metric("relaygate_in_flight_requests").await, 0.0);
}

#[tokio::test]
async fn client_disconnect_cancels_a_pending_plain_request() {
    let sim = Sim::start(
        "a",
        Faults {
            header_delay: Duration::from_millis(900),
            ..Faults::default()
        },
    )
    .await
    .unwrap();
    let gw = Gateway::with_sim(&sim).await;
    abandon_chat(&gw, Duration::from_millis(200)).await;
    eventually(
        Duration::from_millis(600),
        "the upstream request is dropped",
        || async { sim.stats().requests_cancelled == 1 },
    )
    .await;
}

#[tokio::test]
async fn shutdown_drains_an_open_stream() {
    let sim = Sim::start(
        "a",
        Faults {
            chunks: 20,
            chunk_interval: Duration::from_millis(25),
            ..Faults::default()
        },
    )
    .await
    .unwrap();
    let mut gw = Gateway::with_sim(&sim).await;
    let ready = client().get(format!("{}/health/ready", gw.url)).send().await.unwrap();
    assert_eq!(ready.status(), 200);

    let mut resp = post_chat(&gw, &chat(true)).await;
    let mut buf = Vec::new();
    read_until(&mut resp, &mut buf, |b| content_chunks(b) >= 1).await;
    gw.begin_shutdown();
    eventually(Duration::from_secs(1), "draining", || async { gw.state.is_draining() }).await;
    // New connections are refused while the open stream carries on.
    let refused = reqwest::Client::new()
        .get(format!("{}/health/live", gw.url))
        .send()
        .await;
    assert!(refused.is_err(), "no new connections while draining");
    buf.extend_from_slice(&read_all(resp).await);
    assert_eq!(content_chunks(&buf), 20);
    assert!(buf.ends_with(b"data: [DONE]\n\n"));
    tokio::time::timeout(Duration::from_secs(3), gw.stopped())
        .await
        .expect("server stops once drained")
        .unwrap();
    assert_eq!(sim.stats().streams_completed, 1);
}

#[tokio::test]
async fn shutdown_grace_bounds_the_drain() {
    let sim = Sim::start(
        "a",
        Faults {
            stall_after: Some(1),
            ..Faults::default()
        },
    )
    .await
    .unwrap();
    let config = config_for(&[("a", &sim)])
        .replace("shutdown_grace = \"5s\"", "shutdown_grace = \"300ms\"")
        .replace("idle_timeout = \"500ms\"", "idle_timeout = \"60s\"");
    let mut gw = Gateway::start(&config, &[]).await;
    let mut resp = post_chat(&gw, &chat(true)).await;
    let mut buf = Vec::new();
    read_until(&mut resp, &mut buf, |b| content_chunks(b) >= 1).await;
    let started = Instant::now();
    gw.begin_shutdown();
    tokio::time::timeout(Duration::from_secs(5), gw.stopped())
        .await
        .expect("the drain is bounded by shutdown_grace")
        .unwrap();
    assert!(started.elapsed() >= Duration::from_millis(250));
}

#[tokio::test]
async fn health_endpoints() {
    let sim = Sim::start("a", Faults::default()).await.unwrap();
    let gw = Gateway::with_sim(&sim).await;
    let c = client();
    let live = c.get(format!("{}/health/live", gw.url)).send().await.unwrap();
    assert_eq!(live.status(), 200);
    let health: Value = c
        .get(format!("{}/health", gw.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["status"], "healthy");
    gw.state.set_draining();
    let ready = c.get(format!("{}/health/ready", gw.url)).send().await.unwrap();
    assert_eq!(ready.status(), 503);
}

#[tokio::test]
async fn a_thousand_random_model_names_add_no_series() {
    let sim = Sim::start("a", Faults::default()).await.unwrap();
    let gw = Gateway::with_sim(&sim).await;
    post_chat(&gw, &json!({ "model": "warm-up", "messages": [] })).await;
    let before = gw.metrics().await.lines().filter(|l| !l.starts_with('#')).count();
    for i in 0..1000 {
        let body = json!({ "model": format!("random-{i}-{}", fastrand::u64(..)), "messages": [] });
        let r = post_chat(&gw, &body).await;
        assert_eq!(r.status(), 404);
    }
    let text = gw.metrics().await;
    let after = text.lines().filter(|l| !l.starts_with('#')).count();
    assert_eq!(before, after, "no new series");
    assert!(!text.contains("random-"));
}

/// RFC 9110 §7.6.1: the headers a client's `Connection` lists are hop-by-hop
/// and stop at relaygate, whichever of several `Connection` lines names them.
#[tokio::test]
async fn headers_named_in_connection_are_not_forwarded() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let sim = Sim::start("a", Faults::default()).await.unwrap();
    let gw = Gateway::with_sim(&sim).await;
    let body = chat(false).to_string();
    let extra = "connection: X-Foo\r\nconnection: keep-alive, x-bar\r\nx-foo: 1\r\nx-bar: 2\r\nx-keep: 3\r\n";
    let mut conn = tokio::net::TcpStream::connect(gw.url.trim_start_matches("http://"))
        .await
        .unwrap();
    conn.write_all(format!("{}{body}", raw_chat_head(body.len(), extra)).as_bytes())
        .await
        .unwrap();
    let mut head = vec![0u8; 12];
    conn.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    let seen = sim.last_request().unwrap().headers;
    assert_eq!(seen["x-keep"], "3", "{seen:?}");
    for hop in ["x-foo", "x-bar", "connection", "keep-alive"] {
        assert!(!seen.contains_key(hop), "{hop} reached the upstream: {seen:?}");
    }
}
