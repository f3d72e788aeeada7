//! Config hot reload: `POST /admin/reload` and SIGHUP swap the config
//! atomically; a bad file is rejected and the old config stays; breaker
//! state of unchanged upstreams survives; in-flight requests finish on the
//! config they started with.

use std::path::PathBuf;
use std::time::Duration;

use relaygate::sim::{Faults, Sim};
use serde_json::Value;

use crate::common::process::{temp_file, Proc};
use crate::common::*;

const ADMIN: &str = "sk-admin-key-for-tests-000";

fn temp_config(text: &str) -> PathBuf {
    temp_file("relaygate.toml", text)
}

/// The harness config with a second model, `extra-model`, on the same upstream.
fn with_extra_model(base: &str) -> String {
    format!("{base}\n[[models]]\nname = \"extra-model\"\ntargets = [{{ upstream = \"a\" }}]\n")
}

async fn reload(url: &str) -> reqwest::Response {
    client()
        .post(format!("{url}/admin/reload"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
}

async fn model_ids(url: &str) -> Vec<String> {
    let list: Value = client()
        .get(format!("{url}/v1/models"))
        .bearer_auth(CLIENT_KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn admin_reload_swaps_rejects_bad_files_and_keeps_breaker_state() {
    let sim = Sim::start(
        "a",
        Faults {
            chunks: 20,
            chunk_interval: Duration::from_millis(20),
            ..Faults::default()
        },
    )
    .await
    .unwrap();
    let base = config_for(&[("a", &sim)]);
    let path = temp_config(&base);
    let gw = Gateway::from_file(&path).await;
    let state = gw.state.clone();
    let url = gw.url.clone();

    // A stream in flight on the old config.
    let mut stream = client()
        .post(format!("{url}/v1/chat/completions"))
        .bearer_auth(CLIENT_KEY)
        .json(&chat(true))
        .send()
        .await
        .unwrap();
    let mut buf = Vec::new();
    read_until(&mut stream, &mut buf, |b| content_chunks(b) >= 1).await;

    // Drain upstream a by hand: its breaker state must survive reloads.
    let r = client()
        .post(format!("{url}/admin/upstreams/a/open"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // A bad file is rejected, names the problem, and changes nothing.
    std::fs::write(&path, base.replace("max_body_bytes", "max_body_byts")).unwrap();
    let r = reload(&url).await;
    assert_eq!(r.status(), 422);
    let body: Value = r.json().await.unwrap();
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("server.max_body_byts") && message.contains("unknown field"),
        "{message}"
    );
    assert_eq!(model_ids(&url).await, vec!["deepseek-chat"]);
    let m = reqwest::get(format!("{url}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        metric_value(&m, r#"relaygate_config_reloads_total{result="error"}"#),
        1.0
    );

    // A good file: the new model appears; the breaker is still forced open.
    std::fs::write(&path, with_extra_model(&base)).unwrap();
    assert_eq!(reload(&url).await.status(), 200);
    assert_eq!(model_ids(&url).await, vec!["deepseek-chat", "extra-model"]);
    let upstreams: Value = client()
        .get(format!("{url}/admin/upstreams"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(upstreams["upstreams"][0]["breaker"]["state"], "forced_open");
    let m = reqwest::get(format!("{url}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        metric_value(&m, r#"relaygate_config_reloads_total{result="success"}"#),
        1.0
    );

    // The stream that started before both reloads finishes normally.
    buf.extend_from_slice(&read_all(stream).await);
    assert_eq!(content_chunks(&buf), 20);
    assert!(buf.ends_with(b"data: [DONE]\n\n"));
    assert!(!state.is_draining());
}

#[tokio::test]
async fn sighup_reloads_the_config_file() {
    let sim = Sim::start("a", Faults::default()).await.unwrap();
    let base = config_for(&[("a", &sim)]);
    let path = temp_config(&base);
    let proc = Proc::spawn_quiet(&["serve", "--config", path.to_str().unwrap(), "--listen", "127.0.0.1:0"]).await;
    let url = proc.url.clone();
    assert_eq!(model_ids(&url).await, vec!["deepseek-chat"]);
    std::fs::write(&path, with_extra_model(&base)).unwrap();
    proc.signal("-HUP");
    eventually(Duration::from_secs(5), "SIGHUP reloads the file", || async {
        model_ids(&url).await.len() == 2
    })
    .await;
    // The process is still serving.
    assert_eq!(post_chat_url(&url).await, 200);
}

async fn post_chat_url(url: &str) -> u16 {
    client()
        .post(format!("{url}/v1/chat/completions"))
        .bearer_auth(CLIENT_KEY)
        .json(&chat(false))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}
