//! The pass-through (`[passthrough]`): the rest of `/v1/*` to one upstream,
//! bodies streamed both ways, keys swapped, hop-by-hop headers stripped,
//! retried only when safe; and `GET /v1/models/{id}` (issue #19).

use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use relaygate::sim::{download_bytes, sha256_hex, Faults, Sim};
use serde_json::{json, Value};

use crate::common::process::{proc_status_bytes, temp_file, Proc, BIN};
use crate::common::*;

const UPSTREAM_KEY_P: &str = "Bearer sk-upstream-p-secret-9876543210";
const MIB: usize = 1024 * 1024;

/// `config_for(upstreams)` with `[passthrough] upstream = "p"` and `extra`
/// lines in that section.
fn with_passthrough(upstreams: &[(&str, &Sim)], extra: &str) -> String {
    let mut config = config_for(upstreams);
    config.push_str(&format!("\n[passthrough]\nupstream = \"p\"\n{extra}\n"));
    config
}

/// `[server] max_passthrough_body_bytes` set in a `config_for` config.
fn with_passthrough_limit(config: String, bytes: usize) -> String {
    let limit = "max_body_bytes = 65536\n";
    assert!(config.contains(limit));
    config.replacen(limit, &format!("{limit}max_passthrough_body_bytes = {bytes}\n"), 1)
}

/// Asserts that no header the upstream saw carries the client's key.
fn assert_no_client_key(sim: &Sim) {
    let seen = sim.last_request().expect("the upstream saw a request");
    for (name, value) in &seen.headers {
        assert!(
            !String::from_utf8_lossy(value.as_bytes()).contains(CLIENT_KEY),
            "{name} carries the client key"
        );
    }
}

/// Sends a multipart upload of `file` to `/v1/audio/transcriptions` at
/// `base` (`http://host:port`), streamed in 64 KiB chunks with its length
/// announced, as the openai SDK sends one.
async fn upload(base: &str, file: &[u8]) -> reqwest::Response {
    let (content_type, body) = multipart_upload(file);
    client()
        .post(format!("{base}/v1/audio/transcriptions"))
        .bearer_auth(CLIENT_KEY)
        .header("content-type", content_type)
        .header("content-length", body.len())
        .body(chunked_body(Bytes::from(body)))
        .send()
        .await
        .unwrap()
}

/// Downloads file `id` from `base`, hashing it as it arrives; returns the
/// SHA-256 (hex) and the length.
async fn download(base: &str, id: &str) -> (String, usize) {
    let mut resp = client()
        .get(format!("{base}/v1/files/{id}/content"))
        .bearer_auth(CLIENT_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/octet-stream");
    let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
    let mut len = 0;
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(10), resp.chunk())
        .await
        .expect("the download moves")
        .unwrap()
    {
        digest.update(&chunk);
        len += chunk.len();
    }
    let hex = digest.finish().as_ref().iter().map(|b| format!("{b:02x}")).collect();
    (hex, len)
}

#[tokio::test]
async fn moderations_pass_through_with_the_upstream_key_and_never_the_clients() {
    let a = Sim::start("a", Faults::default()).await.unwrap();
    let p = Sim::start("p", Faults::default()).await.unwrap();
    let gw = Gateway::start(&with_passthrough(&[("a", &a), ("p", &p)], ""), &[]).await;

    let body = json!({ "model": "omni-moderation-latest", "input": ["one", "two"], "x_extra": [1, 2.50] });
    let resp = client()
        .post(gw.v1("/moderations?trace=1"))
        .bearer_auth(CLIENT_KEY)
        .header("openai-beta", "keep-me")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let answer: Value = resp.json().await.unwrap();
    assert!(answer["id"].as_str().unwrap().starts_with("modr-"), "{answer}");
    assert_eq!(answer["results"].as_array().unwrap().len(), 2);

    let seen = p.last_request().unwrap();
    assert_eq!(seen.path, "/v1/moderations?trace=1", "path and query unchanged");
    assert_eq!(
        seen.body,
        serde_json::to_vec(&body).unwrap(),
        "the body unchanged, byte for byte"
    );
    assert_eq!(seen.headers["authorization"], UPSTREAM_KEY_P);
    assert_eq!(seen.headers["openai-beta"], "keep-me");
    assert_no_client_key(&p);
    assert_eq!(a.stats().requests, 0);

    // Client-key auth as for chat: nothing reaches the upstream without it.
    let no_key = client().post(gw.v1("/moderations")).json(&body).send().await.unwrap();
    assert_eq!(no_key.status(), 401);
    let bad_key = client()
        .post(gw.v1("/moderations"))
        .bearer_auth("sk-not-a-client-key-000")
        .json(&body)
        .send()
        .await
        .unwrap();
    expect_openai_error(bad_key, 401, "invalid_api_key").await;
    assert_eq!(p.stats().requests, 1);

    // Counted under the closed label, never under the raw path.
    eventually(Duration::from_secs(5), "the pass-through is counted", || async {
        gw.metric(r#"relaygate_requests_total{endpoint="passthrough",status="200"}"#)
            .await
            == 1.0
    })
    .await;
    assert!(!gw.metrics().await.contains("/v1/moderations"));
}

#[tokio::test]
async fn hop_by_hop_headers_stop_at_relaygate() {
    let a = Sim::start("a", Faults::default()).await.unwrap();
    let p = Sim::start("p", Faults::default()).await.unwrap();
    let send = |url: String| {
        client()
            .post(url)
            .bearer_auth(CLIENT_KEY)
            .header("connection", "keep-alive, x-hop-named")
            .header("x-hop-named", "only for relaygate")
            .header("keep-alive", "timeout=5")
            .header("proxy-authorization", "Basic c2VjcmV0")
            .header("x-end-to-end", "kept")
            .json(&json!({ "input": "hello" }))
            .send()
    };
    // The control: sent straight to the upstream, the client sends them all.
    assert_eq!(
        send(format!("{}/moderations", p.base_url())).await.unwrap().status(),
        200
    );
    let direct = p.last_request().unwrap().headers;
    for hop in ["x-hop-named", "keep-alive", "proxy-authorization"] {
        assert!(direct.get(hop).is_some(), "the client did not send {hop}");
    }

    let gw = Gateway::start(&with_passthrough(&[("a", &a), ("p", &p)], ""), &[]).await;
    assert_eq!(send(gw.v1("/moderations")).await.unwrap().status(), 200);
    let seen = p.last_request().unwrap().headers;
    assert_eq!(seen["x-end-to-end"], "kept");
    for hop in ["x-hop-named", "keep-alive", "proxy-authorization"] {
        assert!(seen.get(hop).is_none(), "{hop} was forwarded");
    }
    for value in seen.get_all("connection") {
        assert!(!value.to_str().unwrap().contains("x-hop-named"));
    }
}

#[tokio::test]
async fn a_json_body_naming_a_configured_model_goes_to_its_first_target_renamed() {
    let a = Sim::start("a", Faults::default()).await.unwrap();
    let p = Sim::start("p", Faults::default()).await.unwrap();
    let mut config = config_for(&[("a", &a), ("p", &p)]);
    config.push_str(
        "\n[[models]]\nname = \"moderation\"\ntargets = [{ upstream = \"a\", model = \"omni-moderation-latest\" }]\n",
    );
    config.push_str("\n[passthrough]\nupstream = \"p\"\n");
    let gw = Gateway::start(&config, &[]).await;
    let resp = post_v1(&gw, "/moderations", &json!({ "model": "moderation", "input": "hello" })).await;
    assert_eq!(resp.status(), 200);
    let answer: Value = resp.json().await.unwrap();
    assert_eq!(answer["model"], "omni-moderation-latest");
    let seen = a.last_request().unwrap();
    assert_eq!(seen.path, "/v1/moderations");
    let sent: Value = serde_json::from_slice(&seen.body).unwrap();
    assert_eq!(sent, json!({ "model": "omni-moderation-latest", "input": "hello" }));
    assert_eq!(seen.headers["authorization"], "Bearer sk-upstream-a-secret-9876543210");
    assert_eq!(p.stats().requests, 0);

    // A model relaygate does not know goes to the pass-through upstream, as is.
    let resp = post_v1(
        &gw,
        "/moderations",
        &json!({ "model": "text-moderation-007", "input": "x" }),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(p.stats().requests, 1);
    assert_eq!(p.last_request().unwrap().headers["authorization"], UPSTREAM_KEY_P);
}

#[tokio::test]
async fn a_multi_mib_upload_and_download_arrive_byte_identical() {
    let a = Sim::start("a", Faults::default()).await.unwrap();
    let p = Sim::start(
        "p",
        Faults {
            download_bytes: 8 * MIB + 5,
            ..Faults::default()
        },
    )
    .await
    .unwrap();
    // Far above max_body_bytes (64 KiB here): pass-through bodies have their own limit.
    let gw = Gateway::start(&with_passthrough(&[("a", &a), ("p", &p)], ""), &[]).await;

    let file = download_bytes("the-upload", 8 * MIB + 3);
    let resp = upload(&gw.url, &file).await;
    assert_eq!(resp.status(), 200);
    let answer: Value = resp.json().await.unwrap();
    assert_eq!(answer["text"], format!("{} {}", sha256_hex(&file), file.len()));
    assert_eq!(p.last_upload(), Some((file.len() as u64, sha256_hex(&file))));
    assert_eq!(p.last_request().unwrap().headers["authorization"], UPSTREAM_KEY_P);
    assert_no_client_key(&p);

    let (hash, len) = download(&gw.url, "file-xyz").await;
    assert_eq!(len, 8 * MIB + 5);
    assert_eq!(hash, sha256_hex(&download_bytes("file-xyz", len)));
    assert_eq!(p.last_request().unwrap().path, "/v1/files/file-xyz/content");
    assert_no_client_key(&p);
}

/// The helpers' upload and download against the simulator itself, without
/// relaygate: the byte-identity checks above can tell a good transfer from a
/// bad one.
#[tokio::test]
async fn the_upload_and_download_helpers_agree_with_the_sim_directly() {
    let p = Sim::start(
        "p",
        Faults {
            download_bytes: 2 * MIB + 5,
            ..Faults::default()
        },
    )
    .await
    .unwrap();
    let direct = format!("http://{}", p.addr());
    let file = download_bytes("direct", 3 * MIB + 1);
    let resp = upload(&direct, &file).await;
    assert_eq!(resp.status(), 200);
    let answer: Value = resp.json().await.unwrap();
    assert_eq!(answer["text"], format!("{} {}", sha256_hex(&file), file.len()));
    let seen = p.last_request().unwrap();
    assert_eq!(
        seen.headers["content-length"],
        (file.len() + multipart_upload(b"").1.len()).to_string().as_str()
    );
    assert!(seen.body.is_empty(), "the sim does not hold uploads");
    let (hash, len) = download(&direct, "file-1").await;
    assert_eq!(
        (hash, len),
        (sha256_hex(&download_bytes("file-1", 2 * MIB + 5)), 2 * MIB + 5)
    );
    let (other, _) = download(&direct, "file-2").await;
    assert_ne!(other, sha256_hex(&download_bytes("file-1", 2 * MIB + 5)));
}

/// `max_passthrough_body_bytes` in the upload tests: small enough that the
/// client can write the whole body into the socket's buffers before it
/// reads an early 413.
const UPLOAD_LIMIT: usize = 256 * 1024;

/// A gateway over the chat upstream `a` and the pass-through upstream `p`
/// (both returned, to keep them running), with uploads limited to
/// `UPLOAD_LIMIT`.
async fn upload_limited_gateway() -> (Sim, Sim, Gateway) {
    let a = Sim::start("a", Faults::default()).await.unwrap();
    let p = Sim::start("p", Faults::default()).await.unwrap();
    let config = with_passthrough_limit(with_passthrough(&[("a", &a), ("p", &p)], ""), UPLOAD_LIMIT);
    let gw = Gateway::start(&config, &[]).await;
    (a, p, gw)
}

#[tokio::test]
async fn max_passthrough_body_bytes_limits_uploads() {
    let (_a, p, gw) = upload_limited_gateway().await;
    let limit = UPLOAD_LIMIT;
    let resp = upload(&gw.url, &vec![7u8; limit / 2]).await;
    assert_eq!(resp.status(), 200, "under the limit");
    let resp = upload(&gw.url, &vec![7u8; 2 * limit]).await;
    expect_openai_error(resp, 413, "payload_too_large").await;
    assert_eq!(p.last_upload().map(|(len, _)| len), Some((limit / 2) as u64));
}

/// Without a length (chunked), the limit is counted while the upload
/// streams: the upstream exchange is abandoned and the client gets a 413.
#[tokio::test]
async fn a_chunked_upload_over_the_limit_is_cut_with_a_413() {
    let (_a, p, gw) = upload_limited_gateway().await;
    let limit = UPLOAD_LIMIT;
    let (content_type, body) = multipart_upload(&vec![7u8; 2 * limit]);
    let resp = client()
        .post(format!("{}/v1/audio/transcriptions", gw.url))
        .bearer_auth(CLIENT_KEY)
        .header("content-type", content_type)
        .body(chunked_body(Bytes::from(body)))
        .send()
        .await
        .unwrap();
    expect_openai_error(resp, 413, "payload_too_large").await;
    assert_eq!(p.last_upload(), None, "the upstream never got a whole file");
}

/// Peak resident memory of a process.
fn vm_hwm_bytes(pid: u32) -> usize {
    proc_status_bytes(&pid.to_string(), "VmHWM") as usize
}

/// Measured on the real binary as a child process, by its peak RSS (VmHWM).
/// Not the test process's RSS: the other tests of this binary run beside
/// this one and allocate, and a body held whole for a moment and then freed
/// would leave the current RSS where it was. The peak of a process that
/// does nothing else catches both.
#[tokio::test]
async fn uploads_and_downloads_stream_through_without_being_held() {
    let a = Sim::start("a", Faults::default()).await.unwrap();
    let p = Sim::start(
        "p",
        Faults {
            download_bytes: MIB,
            ..Faults::default()
        },
    )
    .await
    .unwrap();
    let config = temp_file("relaygate.toml", &with_passthrough(&[("a", &a), ("p", &p)], ""));
    let proc = Proc::spawn_quiet(&["serve", "--config", config.to_str().unwrap()]).await;
    let pid = proc.child.id().unwrap();

    // Warm up every path first (pools, buffers, worker threads).
    assert_eq!(upload(&proc.url, &vec![1u8; MIB]).await.status(), 200);
    assert_eq!(download(&proc.url, "warm-up").await.1, MIB);
    let before = vm_hwm_bytes(pid);

    let size = 32 * MIB;
    let file = download_bytes("the-big-upload", size);
    let resp = upload(&proc.url, &file).await;
    assert_eq!(resp.status(), 200);
    let answer: Value = resp.json().await.unwrap();
    assert_eq!(answer["text"], format!("{} {size}", sha256_hex(&file)));
    drop(file);
    p.update(|f| f.download_bytes = size);
    let (hash, len) = download(&proc.url, "the-big-download").await;
    assert_eq!(
        (hash, len),
        (sha256_hex(&download_bytes("the-big-download", size)), size)
    );

    let grown = vm_hwm_bytes(pid).saturating_sub(before);
    assert!(
        grown < 16 * MIB,
        "relaygate's peak RSS grew by {} MiB for a {} MiB upload and download",
        grown / MIB,
        size / MIB
    );
}

#[tokio::test]
async fn a_post_is_not_retried_after_a_reset_once_its_body_was_sent() {
    let a = Sim::start("a", Faults::default()).await.unwrap();
    let p = Sim::start(
        "p",
        Faults {
            reset_after_body: true,
            ..Faults::default()
        },
    )
    .await
    .unwrap();
    let gw = Gateway::start(&with_passthrough(&[("a", &a), ("p", &p)], ""), &[]).await;
    let resp = post_v1(&gw, "/moderations", &json!({ "input": "charge my card once" })).await;
    assert!(resp.status().is_server_error(), "{}", resp.status());
    let body: Value = resp.json().await.unwrap();
    assert!(body["error"]["code"].is_string(), "OpenAI-shaped: {body}");
    assert_eq!(p.stats().requests, 1, "the POST reached the upstream once");

    // The same fault on a GET, which is safe to repeat: retried.
    let resp = client()
        .get(gw.v1("/files/file-1/content"))
        .bearer_auth(CLIENT_KEY)
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_server_error(), "{}", resp.status());
    assert!(p.stats().requests > 2, "the GET was retried: {:?}", p.stats());
}

#[tokio::test]
async fn the_upstreams_first_byte_timeout_applies_and_a_post_is_not_retried_after_it() {
    let a = Sim::start("a", Faults::default()).await.unwrap();
    // config_for's first_byte_timeout is 1 s.
    let p = Sim::start(
        "p",
        Faults {
            header_delay: Duration::from_millis(1500),
            ..Faults::default()
        },
    )
    .await
    .unwrap();
    let gw = Gateway::start(&with_passthrough(&[("a", &a), ("p", &p)], ""), &[]).await;
    // Without the timeout the answer would come, after 1.5 s, as a 200.
    let resp = post_v1(&gw, "/moderations", &json!({ "input": "slow" })).await;
    expect_openai_error(resp, 504, "upstream_first_byte_timeout").await;
    assert_eq!(p.stats().requests, 1);
}

#[tokio::test]
async fn a_redirect_is_returned_never_followed() {
    let a = Sim::start("a", Faults::default()).await.unwrap();
    let elsewhere = Sim::start("elsewhere", Faults::default()).await.unwrap();
    let p = Sim::start(
        "p",
        Faults {
            redirect_to: Some(format!("{}/files/file-1/content", elsewhere.base_url())),
            ..Faults::default()
        },
    )
    .await
    .unwrap();
    let gw = Gateway::start(&with_passthrough(&[("a", &a), ("p", &p)], ""), &[]).await;
    let no_redirects = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let resp = no_redirects
        .get(gw.v1("/files/file-1/content"))
        .bearer_auth(CLIENT_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 307);
    assert_eq!(
        resp.headers()["location"],
        format!("{}/files/file-1/content", elsewhere.base_url()).as_str()
    );
    assert_eq!(p.stats().requests, 1);
    assert_eq!(
        elsewhere.stats().requests,
        0,
        "relaygate did not follow it with the upstream key"
    );
}

#[tokio::test]
async fn paths_limit_what_passes_through() {
    let a = Sim::start("a", Faults::default()).await.unwrap();
    let p = Sim::start("p", Faults::default()).await.unwrap();
    let config = with_passthrough(&[("a", &a), ("p", &p)], r#"paths = ["/v1/moderations", "/v1/files/*"]"#);
    let gw = Gateway::start(&config, &[]).await;
    assert_eq!(
        post_v1(&gw, "/moderations", &json!({ "input": "x" })).await.status(),
        200
    );
    assert_eq!(download(&gw.url, "file-1").await.1, Faults::default().download_bytes);
    let resp = post_v1(&gw, "/images/generations", &json!({ "prompt": "a cat" })).await;
    expect_openai_error(resp, 404, "unknown_url").await;
    let resp = upload(&gw.url, b"RIFF").await;
    expect_openai_error(resp, 404, "unknown_url").await;
    assert_eq!(p.stats().requests, 2);
}

#[tokio::test]
async fn models_by_id_are_answered_for_configured_models_and_passed_through_otherwise() {
    let a = Sim::start("a", Faults::default()).await.unwrap();
    let p = Sim::start("p", Faults::default()).await.unwrap();
    let get = |gw: &Gateway, id: &str| {
        client()
            .get(gw.v1(&format!("/models/{id}")))
            .bearer_auth(CLIENT_KEY)
            .send()
    };

    let on = Gateway::start(&with_passthrough(&[("a", &a), ("p", &p)], ""), &[]).await;
    let resp = get(&on, "deepseek-chat").await.unwrap();
    assert_eq!(resp.status(), 200);
    let model: Value = resp.json().await.unwrap();
    assert_eq!(
        (&model["id"], &model["object"], &model["owned_by"]),
        (&json!("deepseek-chat"), &json!("model"), &json!("relaygate"))
    );
    assert!(model["created"].is_u64(), "{model}");
    assert_eq!(p.stats().requests, 0);
    let resp = get(&on, "whisper-1").await.unwrap();
    assert_eq!(resp.status(), 200);
    let model: Value = resp.json().await.unwrap();
    assert_eq!((&model["id"], &model["owned_by"]), (&json!("whisper-1"), &json!("p")));
    assert_eq!(p.last_request().unwrap().path, "/v1/models/whisper-1");
    assert_eq!(p.last_request().unwrap().headers["authorization"], UPSTREAM_KEY_P);

    let off = Gateway::start(&config_for(&[("a", &a), ("p", &p)]), &[]).await;
    let resp = get(&off, "deepseek-chat").await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.json::<Value>().await.unwrap()["owned_by"], "relaygate");
    let resp = get(&off, "whisper-1").await.unwrap();
    assert_eq!(resp.status(), 404);
    let body: Value = resp.json().await.unwrap();
    assert!(
        body["error"]["code"] == "model_not_found" || body["error"]["code"] == "unknown_url",
        "OpenAI-shaped: {body}"
    );
    assert_eq!(p.stats().requests, 1);
    assert_eq!(a.stats().requests, 0);
}

#[tokio::test]
async fn with_the_passthrough_off_these_paths_are_openai_shaped_404s() {
    let a = Sim::start("a", Faults::default()).await.unwrap();
    let gw = Gateway::with_sim(&a).await;
    let resp = post_v1(&gw, "/moderations", &json!({ "input": "x" })).await;
    expect_openai_error(resp, 404, "unknown_url").await;
    expect_openai_error(upload(&gw.url, b"RIFF").await, 404, "unknown_url").await;
    let resp = client()
        .get(gw.v1("/files/file-1/content"))
        .bearer_auth(CLIENT_KEY)
        .send()
        .await
        .unwrap();
    expect_openai_error(resp, 404, "unknown_url").await;
    assert_eq!(a.stats().requests, 0);
}

#[tokio::test]
async fn the_sims_passthrough_endpoints_are_what_the_openai_sdk_expects() {
    let Some(python) = sdk_python() else { return };
    let p = Sim::start("p", Faults::default()).await.unwrap();
    let env = [
        ("PASSTHROUGH", "on".to_owned()),
        ("UPLOAD_BYTES", (MIB + 7).to_string()),
        ("DOWNLOAD_ID", "file-direct".to_owned()),
    ];
    let stdout = run_sdk_script_at(&python, "passthrough_sdk.py", &p.base_url(), "sk-any", &env).await;
    assert!(stdout.contains("ALL OK"), "{stdout}");
    let n = Faults::default().download_bytes;
    let expected = sha256_hex(&download_bytes("file-direct", n));
    assert!(stdout.contains(&format!("DOWNLOAD {expected} {n}")), "{stdout}");
    assert_eq!(p.last_upload().map(|(len, _)| len), Some((MIB + 7) as u64));
}

#[tokio::test]
async fn the_openai_sdk_uses_the_passthrough() {
    let Some(python) = sdk_python() else { return };
    let a = Sim::start("a", Faults::default()).await.unwrap();
    let p = Sim::start(
        "p",
        Faults {
            download_bytes: 6 * MIB + 1,
            ..Faults::default()
        },
    )
    .await
    .unwrap();

    let on = Gateway::start(&with_passthrough(&[("a", &a), ("p", &p)], ""), &[]).await;
    let env = [
        ("PASSTHROUGH", "on".to_owned()),
        ("UPLOAD_BYTES", (6 * MIB + 7).to_string()),
        ("DOWNLOAD_ID", "file-sdk".to_owned()),
    ];
    let stdout = run_sdk_script(&python, "passthrough_sdk.py", &on, &env).await;
    assert!(stdout.contains("ALL OK"), "{stdout}");
    let expected = sha256_hex(&download_bytes("file-sdk", 6 * MIB + 1));
    assert!(
        stdout.contains(&format!("DOWNLOAD {expected} {}", 6 * MIB + 1)),
        "{stdout}"
    );
    assert_eq!(p.last_upload().map(|(len, _)| len), Some((6 * MIB + 7) as u64));
    assert_eq!(p.stats().requests, 3);
    assert_no_client_key(&p);
}

#[tokio::test]
async fn the_openai_sdk_gets_openai_shaped_404s_with_the_passthrough_off() {
    let Some(python) = sdk_python() else { return };
    let a = Sim::start("a", Faults::default()).await.unwrap();
    let p = Sim::start("p", Faults::default()).await.unwrap();
    let off = Gateway::start(&config_for(&[("a", &a), ("p", &p)]), &[]).await;
    let env = [("PASSTHROUGH", "off".to_owned())];
    let stdout = run_sdk_script(&python, "passthrough_sdk.py", &off, &env).await;
    assert!(stdout.contains("ALL OK"), "{stdout}");
    assert_eq!((a.stats().requests, p.stats().requests), (0, 0));
}

#[tokio::test]
async fn check_rejects_a_passthrough_upstream_that_does_not_exist_naming_it() {
    let a = Sim::start("a", Faults::default()).await.unwrap();
    let mut config = config_for(&[("a", &a)]);
    config.push_str("\n[passthrough]\nupstream = \"no-such-relay\"\n");
    let path = temp_file("relaygate.toml", &config);
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(BIN)
            .args(["check", "--config", path.to_str().unwrap()])
            .stdin(Stdio::null())
            .output(),
    )
    .await
    .expect("check finishes")
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "check accepted it: {err}");
    assert!(err.contains("passthrough.upstream"), "{err}");
    assert!(err.contains("no-such-relay"), "{err}");

    // The same file with the upstream that exists passes.
    let good = temp_file("relaygate.toml", &config.replace("no-such-relay", "a"));
    let out = tokio::process::Command::new(BIN)
        .args(["check", "--config", good.to_str().unwrap()])
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
