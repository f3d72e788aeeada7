//! `POST /v1/responses` (the Responses API), routed by `model` like chat, and
//! `GET`/`DELETE /v1/responses/{id}` and `POST /v1/responses/{id}/cancel`,
//! sent to the upstream that served the response (issue #19).

use std::time::Duration;

use relaygate::sim::{answer, input_tokens, Faults, Sim};
use serde_json::{json, Value};

use crate::common::*;

const UPSTREAM_KEY_A: &str = "Bearer sk-upstream-a-secret-9876543210";

/// `config_for` plus `gpt-failover` (targets `b`, then `c`) and `broken`
/// (on `d`), for gateways in front of four simulators.
fn four_upstreams(a: &Sim, b: &Sim, c: &Sim, d: &Sim) -> String {
    let mut config = config_for(&[("a", a), ("b", b), ("c", c), ("d", d)]);
    config.push_str(
        r#"
[[models]]
name = "gpt-failover"
targets = [
  { upstream = "b", model = "gpt-4.1", priority = 0 },
  { upstream = "c", model = "gpt-4.1-mini", priority = 1 },
]

[[models]]
name = "broken"
targets = [{ upstream = "d" }]
"#,
    );
    config
}

/// Four simulators behind one gateway, `b` (`gpt-failover`'s first
/// target) answering 503.
async fn failing_first_target() -> (Sim, Sim, Sim, Sim, Gateway) {
    let sim = |name| Sim::start(name, Faults::default());
    let failing = Faults {
        status: Some(503),
        ..Faults::default()
    };
    let (a, b) = (sim("a").await.unwrap(), Sim::start("b", failing).await.unwrap());
    let (c, d) = (sim("c").await.unwrap(), sim("d").await.unwrap());
    let gw = Gateway::start(&four_upstreams(&a, &b, &c, &d), &[]).await;
    (a, b, c, d, gw)
}

fn responses_request(stream: bool) -> Value {
    json!({
        "model": "deepseek-chat",
        "input": [{ "role": "user", "content": "Say hello" }],
        "stream": stream,
        "x_vendor_extension": { "keep": [1, 2.50, "three"] },
    })
}

async fn tokens(gw: &Gateway, model: &str, upstream: &str, kind: &str) -> f64 {
    gw.metric(&format!(
        r#"relaygate_tokens_total{{model="{model}",type="{kind}",upstream="{upstream}"}}"#
    ))
    .await
}

#[tokio::test]
async fn a_plain_response_is_routed_by_model_renamed_and_counted() {
    let a = Sim::start("a", Faults::default()).await.unwrap();
    let gw = Gateway::with_sim(&a).await;
    let request = responses_request(false);
    let resp = post_v1(&gw, "/responses", &request).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-relaygate-upstream"], "a");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["object"], "response");
    assert_eq!(body["model"], "deepseek-v3.2", "the upstream's answer passes through");
    assert_eq!(body["output"][0]["content"][0]["text"], answer(5));
    assert_eq!(&a.stored_response(body["id"].as_str().unwrap()).unwrap(), &body);

    let seen = a.last_request().unwrap();
    assert_eq!(seen.path, "/v1/responses");
    let mut renamed = request.clone();
    renamed["model"] = json!("deepseek-v3.2");
    assert_eq!(
        serde_json::from_slice::<Value>(&seen.body).unwrap(),
        renamed,
        "only the model changes"
    );
    assert_eq!(seen.headers["authorization"], UPSTREAM_KEY_A);

    // Usage from the plain body: input_tokens and output_tokens.
    assert_eq!(
        tokens(&gw, "deepseek-chat", "a", "prompt").await,
        input_tokens(&request) as f64
    );
    assert_eq!(tokens(&gw, "deepseek-chat", "a", "completion").await, 5.0);
    let responses =
        r#"relaygate_requests_total{endpoint="responses",model="deepseek-chat",outcome="success",status="200"}"#;
    assert_eq!(gw.metric(responses).await, 1.0);
    assert_eq!(
        gw.metric(r#"relaygate_requests_total{endpoint="chat_completions"}"#)
            .await,
        0.0
    );

    // The same label set tells chat from responses.
    assert_eq!(post_chat(&gw, &chat(false)).await.status(), 200);
    let m = gw.metrics().await;
    assert_eq!(
        metric_value(&m, r#"relaygate_requests_total{endpoint="chat_completions"}"#),
        1.0
    );
    assert_eq!(metric_value(&m, responses), 1.0);

    // Routed by model: an unknown one is relaygate's 404, as for chat.
    let mut unknown = request;
    unknown["model"] = json!("no-such-model");
    expect_openai_error(post_v1(&gw, "/responses", &unknown).await, 404, "model_not_found").await;
    assert_eq!(a.stats().requests, 2);
}

#[tokio::test]
async fn a_responses_stream_reaches_the_client_byte_for_byte_and_its_usage_is_counted() {
    let a = Sim::start(
        "a",
        Faults {
            cached_tokens: 3,
            reasoning_tokens: 2,
            ..Faults::default()
        },
    )
    .await
    .unwrap();
    let gw = Gateway::with_sim(&a).await;
    let request = responses_request(true);
    let resp = post_v1(&gw, "/responses", &request).await;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let body = read_all(resp).await;
    assert_eq!(
        String::from_utf8_lossy(&body),
        String::from_utf8_lossy(&a.last_stream_bytes()),
        "every event, unchanged"
    );
    let events = named_events(&body);
    assert_eq!(events.last().unwrap().0, "response.completed");
    assert!(!String::from_utf8_lossy(&body).contains("[DONE]"));
    let renamed: Value = serde_json::from_slice(&a.last_request().unwrap().body).unwrap();
    assert_eq!(renamed["model"], "deepseek-v3.2");
    assert_eq!(renamed["stream"], true);
    assert!(
        renamed.get("stream_options").is_none(),
        "a Responses stream always ends with its usage: nothing to ask for"
    );

    // Usage from the last event, `response.completed`.
    let prompt = input_tokens(&request) as f64;
    eventually(Duration::from_secs(5), "the stream's usage is counted", || async {
        tokens(&gw, "deepseek-chat", "a", "completion").await == 5.0
    })
    .await;
    assert_eq!(tokens(&gw, "deepseek-chat", "a", "prompt").await, prompt);
    assert_eq!(tokens(&gw, "deepseek-chat", "a", "cached_prompt").await, 3.0);
    assert_eq!(tokens(&gw, "deepseek-chat", "a", "reasoning").await, 2.0);
    assert_eq!(
        gw.metric(r#"relaygate_requests_total{endpoint="responses",outcome="success"}"#)
            .await,
        1.0
    );
}

#[tokio::test]
async fn a_503_before_the_first_event_fails_over() {
    let (_a, b, c, _d, gw) = failing_first_target().await;

    let mut request = responses_request(true);
    request["model"] = json!("gpt-failover");
    let resp = post_v1(&gw, "/responses", &request).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-relaygate-upstream"], "c");
    let body = read_all(resp).await;
    assert_eq!(body, c.last_stream_bytes(), "the second target's stream, whole");
    assert_eq!(named_events(&body).last().unwrap().0, "response.completed");
    assert_eq!(b.stats().requests, 1);
    let seen: Value = serde_json::from_slice(&c.last_request().unwrap().body).unwrap();
    assert_eq!(seen["model"], "gpt-4.1-mini", "renamed for the target that served it");

    request["stream"] = json!(false);
    let resp = post_v1(&gw, "/responses", &request).await;
    assert_eq!(resp.status(), 200);
    let plain: Value = resp.json().await.unwrap();
    assert_eq!(plain["output"][0]["content"][0]["text"], answer(5));
    assert_eq!(b.stats().requests, 2);
    assert_eq!(c.stats().requests, 2);
    eventually(Duration::from_secs(5), "both requests recorded", || async {
        gw.metric(
            r#"relaygate_requests_total{endpoint="responses",model="gpt-failover",outcome="success",upstream="c"}"#,
        )
        .await
            == 2.0
    })
    .await;
}

#[tokio::test]
async fn a_stream_that_breaks_after_its_first_event_ends_with_an_error_event_and_is_not_retried() {
    let a = Sim::start("a", Faults::default()).await.unwrap();
    let b = Sim::start("b", Faults::default()).await.unwrap();
    let c = Sim::start("c", Faults::default()).await.unwrap();
    let d = Sim::start(
        "d",
        Faults {
            reset_after: Some(2),
            ..Faults::default()
        },
    )
    .await
    .unwrap();
    let gw = Gateway::start(&four_upstreams(&a, &b, &c, &d), &[]).await;
    let mut request = responses_request(true);
    request["model"] = json!("broken");
    let resp = post_v1(&gw, "/responses", &request).await;
    assert_eq!(resp.status(), 200, "committed at the first event");
    let body = read_all(resp).await;

    let sent = d.last_stream_bytes();
    assert!(!sent.is_empty());
    assert!(
        body.starts_with(&sent),
        "what the upstream sent comes first, unchanged:\n{}",
        String::from_utf8_lossy(&body)
    );
    let events = named_events(&body[sent.len()..]);
    assert_eq!(events.len(), 1, "then one event: {events:?}");
    let (name, error) = &events[0];
    assert_eq!(name, "error");
    assert_eq!(error["type"], "error");
    assert!(error["code"].as_str().is_some_and(|c| !c.is_empty()), "{error}");
    assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()), "{error}");
    assert!(error["param"].is_null(), "{error}");
    assert_eq!(error["error"]["code"], error["code"]);
    assert!(error["error"]["message"].is_string() && error["error"]["type"].is_string());
    assert!(!String::from_utf8_lossy(&body).contains("[DONE]"));
    let deltas = named_events(&sent)
        .iter()
        .filter(|(n, _)| n == "response.output_text.delta")
        .count();
    assert_eq!(deltas, 2);

    assert_eq!(d.stats().requests, 1, "never retried after the first event");
    assert_eq!(d.stats().streams_opened, 1);
    assert_eq!((b.stats().requests, c.stats().requests), (0, 0));
    eventually(Duration::from_secs(5), "the request is recorded", || async {
        gw.metric(r#"relaygate_requests_total{endpoint="responses",model="broken"}"#)
            .await
            == 1.0
    })
    .await;
    assert_eq!(
        gw.metric(r#"relaygate_requests_total{endpoint="responses",model="broken",outcome="success"}"#)
            .await,
        0.0,
        "a broken stream is not a success"
    );
}

#[tokio::test]
async fn a_stored_response_is_read_cancelled_and_deleted_at_the_upstream_that_served_it() {
    // The model's first target (`b`) fails: were the id's requests sent
    // there, they would fail too.
    let (_a, b, c, _d, gw) = failing_first_target().await;

    let mut request = responses_request(false);
    request["model"] = json!("gpt-failover");
    let created: Value = post_v1(&gw, "/responses", &request).await.json().await.unwrap();
    let id = created["id"].as_str().unwrap().to_owned();
    request["stream"] = json!(true);
    let streamed = read_all(post_v1(&gw, "/responses", &request).await).await;
    let streamed_id = named_events(&streamed).last().unwrap().1["response"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(b.stats().requests, 2, "both creates tried b first");
    let url = gw.v1(&format!("/responses/{id}"));

    let got = client().get(&url).bearer_auth(CLIENT_KEY).send().await.unwrap();
    assert_eq!(got.status(), 200);
    assert_eq!(got.json::<Value>().await.unwrap(), c.stored_response(&id).unwrap());
    let seen = c.last_request().unwrap();
    assert_eq!(
        (seen.method.as_str(), seen.path.as_str()),
        ("GET", format!("/v1/responses/{id}").as_str())
    );
    assert_eq!(seen.headers["authorization"], "Bearer sk-upstream-c-secret-9876543210");

    let got = client()
        .get(gw.v1(&format!("/responses/{streamed_id}")))
        .bearer_auth(CLIENT_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(got.status(), 200);
    assert_eq!(got.json::<Value>().await.unwrap()["status"], "completed");

    let cancelled = client()
        .post(format!("{url}/cancel"))
        .bearer_auth(CLIENT_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(cancelled.status(), 200);
    assert_eq!(cancelled.json::<Value>().await.unwrap()["status"], "cancelled");
    let deleted = client().delete(&url).bearer_auth(CLIENT_KEY).send().await.unwrap();
    assert_eq!(deleted.status(), 200);
    assert_eq!(
        deleted.json::<Value>().await.unwrap(),
        json!({ "id": id, "object": "response", "deleted": true })
    );
    assert_eq!(c.last_request().unwrap().method, http::Method::DELETE);
    // The upstream's 404 for an id it no longer has passes through.
    let gone = client().get(&url).bearer_auth(CLIENT_KEY).send().await.unwrap();
    assert_eq!(gone.status(), 404);
    let gone: Value = gone.json().await.unwrap();
    assert_eq!(gone["error"]["message"], format!("Response with id '{id}' not found."));
    assert_eq!(b.stats().requests, 2, "b never saw the id");

    // The client's key is relaygate's business only.
    let without_key = client().get(&url).send().await.unwrap();
    assert_eq!(without_key.status(), 401);
    for h in c.last_request().unwrap().headers.values() {
        assert!(!h.to_str().unwrap_or("").contains(CLIENT_KEY));
    }
}

#[tokio::test]
async fn an_id_relaygate_did_not_serve_goes_to_the_first_target_or_the_passthrough_upstream() {
    let a = Sim::start("a", Faults::default()).await.unwrap();
    let p = Sim::start("p", Faults::default()).await.unwrap();
    let create_at = |sim: &Sim| {
        let url = format!("{}/responses", sim.base_url());
        async move {
            let r: Value = client()
                .post(url)
                .json(&json!({ "model": "m", "input": "hi" }))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            r["id"].as_str().unwrap().to_owned()
        }
    };

    // Without [passthrough]: the first target of the first model.
    let gw = Gateway::start(&config_for(&[("a", &a), ("p", &p)]), &[]).await;
    let id = create_at(&a).await;
    let got = client()
        .get(gw.v1(&format!("/responses/{id}")))
        .bearer_auth(CLIENT_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(got.status(), 200);
    assert_eq!(got.json::<Value>().await.unwrap()["id"], id.as_str());
    assert_eq!(a.last_request().unwrap().headers["authorization"], UPSTREAM_KEY_A);
    assert_eq!(p.stats().requests, 0);

    // With it: the pass-through upstream.
    let mut config = config_for(&[("a", &a), ("p", &p)]);
    config.push_str("\n[passthrough]\nupstream = \"p\"\n");
    let gw = Gateway::start(&config, &[]).await;
    let id = create_at(&p).await;
    let a_before = a.stats().requests;
    let got = client()
        .get(gw.v1(&format!("/responses/{id}")))
        .bearer_auth(CLIENT_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(got.status(), 200);
    assert_eq!(got.json::<Value>().await.unwrap()["id"], id.as_str());
    assert_eq!(
        p.last_request().unwrap().headers["authorization"],
        "Bearer sk-upstream-p-secret-9876543210"
    );
    assert_eq!(a.stats().requests, a_before);
}

/// The SDK's events, as `EVENT <json>` lines of the script's output.
fn sdk_events(stdout: &str) -> Vec<Value> {
    stdout
        .lines()
        .filter_map(|l| l.strip_prefix("EVENT "))
        .map(|j| serde_json::from_str(j).unwrap())
        .collect()
}

/// The SDK parsed every event the upstream sent, in order, and kept every
/// field: each event's data, with numbers compared as the SDK reads them.
fn assert_same_events(sdk: &[Value], sent: &[u8]) {
    let sent: Vec<Value> = named_events(sent).into_iter().map(|(_, data)| data).collect();
    assert_eq!(sdk.len(), sent.len(), "one SDK event per event sent");
    for (got, want) in sdk.iter().zip(&sent) {
        assert_eq!(numbers_as_f64(got), numbers_as_f64(want));
    }
}

#[tokio::test]
async fn the_sims_responses_api_is_what_the_openai_sdk_expects() {
    let Some(python) = sdk_python() else { return };
    let sim = Sim::start("a", Faults::default()).await.unwrap();
    let env = [("RESPONSES_MODEL", "gpt-4.1".to_owned())];
    let stdout = run_sdk_script_at(&python, "responses_sdk.py", &sim.base_url(), "sk-any", &env).await;
    assert!(stdout.contains("ALL OK"), "{stdout}");
    assert_same_events(&sdk_events(&stdout), &sim.last_stream_bytes());
    assert_eq!(sim.stats().streams_completed, 2);
}

#[tokio::test]
async fn the_openai_sdk_drives_the_responses_api_through_relaygate() {
    let Some(python) = sdk_python() else { return };
    let a = Sim::start("a", Faults::default()).await.unwrap();
    let b = Sim::start(
        "b",
        Faults {
            status: Some(503),
            ..Faults::default()
        },
    )
    .await
    .unwrap();
    let c = Sim::start("c", Faults::default()).await.unwrap();
    let d = Sim::start(
        "d",
        Faults {
            reset_after: Some(3),
            ..Faults::default()
        },
    )
    .await
    .unwrap();
    let gw = Gateway::start(&four_upstreams(&a, &b, &c, &d), &[]).await;
    let env = [
        ("RESPONSES_MODEL", "deepseek-chat".to_owned()),
        ("RESPONSES_FAILOVER_MODEL", "gpt-failover".to_owned()),
        ("RESPONSES_BROKEN_MODEL", "broken".to_owned()),
        ("RESPONSES_BROKEN_AFTER", "3".to_owned()),
    ];
    let stdout = run_sdk_script(&python, "responses_sdk.py", &gw, &env).await;
    assert!(stdout.contains("ALL OK"), "{stdout}");

    // Event for event, as `a` sent them.
    assert_same_events(&sdk_events(&stdout), &a.last_stream_bytes());
    // Failed over from b to c, and retrieved from c.
    let failover_id = stdout
        .lines()
        .find_map(|l| l.strip_prefix("FAILOVER_ID "))
        .expect("the script printed the id");
    assert!(c.stored_response(failover_id).is_some());
    assert!(b.stored_response(failover_id).is_none());
    assert_eq!(b.stats().requests, 2, "a stream and a plain call, each tried once on b");
    // The break: one attempt, no retry.
    assert_eq!(d.stats().requests, 1);

    // The usage the SDK saw from `a` (plain, helper stream, stream) is what relaygate counted.
    let (mut input, mut output) = (0.0, 0.0);
    for l in stdout.lines().filter_map(|l| l.strip_prefix("USAGE ")).take(3) {
        let (i, o) = l.split_once(' ').unwrap();
        input += i.parse::<f64>().unwrap();
        output += o.parse::<f64>().unwrap();
    }
    assert_eq!(output, 15.0);
    eventually(Duration::from_secs(5), "the SDK's usage is counted", || async {
        tokens(&gw, "deepseek-chat", "a", "completion").await == output
    })
    .await;
    assert_eq!(tokens(&gw, "deepseek-chat", "a", "prompt").await, input);
}
