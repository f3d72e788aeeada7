//! Parsing a client request, once, for only what routing needs (`model`,
//! `stream`, and that `messages` is an array), and rewriting the model field
//! in place. The rest of the body is forwarded as the client's bytes: unknown
//! fields, key order and number formatting survive untouched.

use std::ops::Range;

use bytes::{Bytes, BytesMut};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::error::{clip, GatewayError};
use crate::ratelimit::{estimate_from_fields, Counted};

/// The OpenAI endpoints relaygate serves (the discriminants index
/// per-endpoint tables): four routed by `model`, and the pass-through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    ChatCompletions = 0,
    Completions = 1,
    Embeddings = 2,
    /// `POST /v1/responses`, the Responses API.
    Responses = 3,
    /// Any other `/v1/*` request, sent on unchanged (`gateway::passthrough`).
    Passthrough = 4,
}

impl Endpoint {
    /// Every endpoint, in discriminant order.
    pub const ALL: [Endpoint; 5] = [
        Endpoint::ChatCompletions,
        Endpoint::Completions,
        Endpoint::Embeddings,
        Endpoint::Responses,
        Endpoint::Passthrough,
    ];
    /// The endpoints routed by `model` (they have an `upstream_path`).
    pub const ROUTED: [Endpoint; 4] = [
        Endpoint::ChatCompletions,
        Endpoint::Completions,
        Endpoint::Embeddings,
        Endpoint::Responses,
    ];

    /// `gen_ai.operation.name` for traces.
    pub fn operation(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions | Endpoint::Responses => "chat",
            Endpoint::Completions => "text_completion",
            Endpoint::Embeddings => "embeddings",
            Endpoint::Passthrough => "passthrough",
        }
    }

    /// The `endpoint` label of `relaygate_requests_total`: a closed set.
    pub fn label(self) -> &'static str {
        crate::telemetry::metrics::ENDPOINTS[self as usize]
    }

    /// The path appended to an upstream's `base_url` (which ends in `/v1`);
    /// the pass-through keeps the client's.
    pub fn upstream_path(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "/chat/completions",
            Endpoint::Completions => "/completions",
            Endpoint::Embeddings => "/embeddings",
            Endpoint::Responses => "/responses",
            Endpoint::Passthrough => "",
        }
    }

    /// A stream of this endpoint ends with `data: [DONE]` (chat and text
    /// completions), or with a terminal `response.*` event (Responses).
    pub fn is_responses(self) -> bool {
        self == Endpoint::Responses
    }
}

/// What relaygate needs to know about a request body.
#[derive(Debug, Clone)]
pub struct ParsedRequest {
    pub model: String,
    pub stream: bool,
    /// A stream whose client did not ask for usage: relaygate asks upstream
    /// for it (`stream_options.include_usage`) to count tokens, and strips
    /// the extra usage-only chunk from what the client receives.
    pub inject_usage: bool,
    /// `temperature: 0`: answers should be deterministic, so a shadow's can
    /// be compared with the primary's for an exact match.
    pub temperature_zero: bool,
    /// Byte range of the `model` value (with its quotes) in the body.
    model_span: Range<usize>,
    /// Where `stream_options` goes: the range of the client's value, or an
    /// empty range just inside the top-level `{`.
    stream_options_span: Range<usize>,
    /// The client's `stream_options` members other than `include_usage`.
    stream_options_rest: Option<String>,
}

#[derive(Deserialize)]
struct Probe<'a> {
    #[serde(borrow)]
    model: Option<&'a RawValue>,
    #[serde(borrow)]
    stream: Option<&'a RawValue>,
    /// `null` is kept as a value: present, and not an array.
    #[serde(borrow, default, deserialize_with = "present")]
    messages: Option<&'a RawValue>,
    #[serde(borrow)]
    temperature: Option<&'a RawValue>,
    /// `null` is kept as a value (not `None`), so that relaygate replaces it
    /// rather than adding a second `stream_options` key.
    #[serde(borrow, default, deserialize_with = "present")]
    stream_options: Option<&'a RawValue>,
}

/// `Probe` with the fields of the token estimate (those of
/// `ratelimit::estimate`'s `Body`), counted as they are parsed
/// (`parse_with_estimate`).
#[derive(Deserialize)]
struct CountingProbe<'a> {
    #[serde(borrow)]
    model: Option<&'a RawValue>,
    #[serde(borrow)]
    stream: Option<&'a RawValue>,
    /// `null` kept as a value, as `Probe` keeps it: not an array.
    #[serde(default, deserialize_with = "present_counted")]
    messages: Option<Counted>,
    #[serde(borrow)]
    temperature: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    stream_options: Option<&'a RawValue>,
    prompt: Option<Counted>,
    input: Option<Counted>,
    instructions: Option<Counted>,
    tools: Option<Counted>,
    functions: Option<Counted>,
    max_completion_tokens: Option<u64>,
    max_tokens: Option<u64>,
    max_output_tokens: Option<u64>,
    n: Option<u64>,
}

fn present_counted<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Counted>, D::Error> {
    Counted::deserialize(d).map(Some)
}

fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

/// The offset of `part` (borrowed from `text`) within `text`.
fn offset(text: &str, part: &str) -> usize {
    part.as_ptr() as usize - text.as_ptr() as usize
}

/// Validates the body and extracts `model` and `stream`. Every other field
/// is skipped by serde without being built into a value; serde_json's
/// recursion limit (128) turns hostile nesting into a 400, not a crash.
pub fn parse(endpoint: Endpoint, body: &[u8]) -> Result<ParsedRequest, GatewayError> {
    let text = body_text(body)?;
    let probe: Probe<'_> = serde_json::from_str(text).map_err(not_json)?;
    let messages = probe.messages.map(|m| m.get().starts_with('['));
    finish(
        endpoint,
        text,
        probe.model,
        probe.stream,
        messages,
        probe.temperature,
        probe.stream_options,
    )
}

/// `parse`, and the request's token estimate (`ratelimit::estimate`'s
/// numbers) from the same pass over the body: for requests that need both
/// (token rate limits, spend budgets), a second parse was most of what a
/// budget cost (3.1k of its 4.8k instructions per request). A body that
/// this probe cannot take (a duplicate field, a `max_tokens` that is not a
/// number) goes the two-pass way, so the answers are always the same.
pub fn parse_with_estimate(
    endpoint: Endpoint,
    body: &[u8],
    default_max_tokens: u64,
) -> Result<(ParsedRequest, (u64, u64)), GatewayError> {
    let text = body_text(body)?;
    let Ok(p) = serde_json::from_str::<CountingProbe<'_>>(text) else {
        return Ok((
            parse(endpoint, body)?,
            crate::ratelimit::estimate(body, default_max_tokens),
        ));
    };
    let messages = p.messages.as_ref().map(Counted::is_array);
    let parsed = finish(
        endpoint,
        text,
        p.model,
        p.stream,
        messages,
        p.temperature,
        p.stream_options,
    )?;
    let prompt = [p.messages, p.prompt, p.input, p.instructions, p.tools, p.functions];
    let limits = [p.max_completion_tokens, p.max_tokens, p.max_output_tokens, p.n];
    Ok((parsed, estimate_from_fields(&prompt, limits, default_max_tokens)))
}

fn body_text(body: &[u8]) -> Result<&str, GatewayError> {
    let text = std::str::from_utf8(body)
        .map_err(|_| GatewayError::InvalidRequest("Request body is not valid UTF-8.".into()))?;
    if text.trim_start().is_empty() {
        return Err(GatewayError::InvalidRequest(
            "Request body is empty; expected a JSON object.".into(),
        ));
    }
    Ok(text)
}

fn not_json(e: serde_json::Error) -> GatewayError {
    GatewayError::InvalidRequest(format!(
        "Request body is not a valid JSON object: {}",
        clip(&e.to_string())
    ))
}

/// What `parse` checks and keeps, from the probe's raw values; `messages`:
/// present, and whether it is an array.
fn finish(
    endpoint: Endpoint,
    text: &str,
    model: Option<&RawValue>,
    stream: Option<&RawValue>,
    messages: Option<bool>,
    temperature: Option<&RawValue>,
    stream_options: Option<&RawValue>,
) -> Result<ParsedRequest, GatewayError> {
    let invalid = |m: String| GatewayError::InvalidRequest(m);

    let raw_model = model.ok_or_else(|| invalid("Missing required parameter: 'model'.".into()))?;
    let model: String = serde_json::from_str(raw_model.get())
        .map_err(|_| invalid("Invalid type for 'model': expected a string.".into()))?;
    if model.is_empty() {
        return Err(invalid("Invalid value for 'model': must not be empty.".into()));
    }
    // `RawValue::get` borrows from `text`, so its address gives its offset.
    let start = offset(text, raw_model.get());
    let model_span = start..start + raw_model.get().len();

    let stream = match stream.map(RawValue::get) {
        None | Some("null") | Some("false") => false,
        Some("true") => true,
        Some(_) => return Err(invalid("Invalid type for 'stream': expected a boolean.".into())),
    };

    if endpoint == Endpoint::ChatCompletions {
        match messages {
            None => return Err(invalid("Missing required parameter: 'messages'.".into())),
            Some(false) => return Err(invalid("Invalid type for 'messages': expected an array.".into())),
            Some(true) => {}
        }
    }

    // Usage for streams: only chat and text completions have stream_options
    // (a Responses stream always ends with its usage, in `response.completed`).
    let mut inject_usage = false;
    let mut stream_options_span = 0..0;
    let mut stream_options_rest = None;
    if stream && matches!(endpoint, Endpoint::ChatCompletions | Endpoint::Completions) {
        match stream_options {
            None => {
                let brace = text.find('{').unwrap_or(0) + 1;
                inject_usage = true;
                stream_options_span = brace..brace;
            }
            Some(raw) => {
                let options: serde_json::Map<String, serde_json::Value> = match raw.get() {
                    "null" => serde_json::Map::new(),
                    other => serde_json::from_str(other)
                        .map_err(|_| invalid("Invalid type for 'stream_options': expected an object.".into()))?,
                };
                if options.get("include_usage") != Some(&serde_json::Value::Bool(true)) {
                    let start = offset(text, raw.get());
                    inject_usage = true;
                    stream_options_span = start..start + raw.get().len();
                    let mut rest = options;
                    rest.remove("include_usage");
                    stream_options_rest = Some(serde_json::Value::Object(rest).to_string());
                }
            }
        }
    }

    let temperature_zero = temperature
        .and_then(|t| t.get().parse::<f64>().ok())
        .is_some_and(|t| t == 0.0);

    Ok(ParsedRequest {
        model,
        stream,
        inject_usage,
        temperature_zero,
        model_span,
        stream_options_span,
        stream_options_rest,
    })
}

impl ParsedRequest {
    /// The body to send upstream: `model` replaced by `upstream_model` and,
    /// for a stream, `stream_options.include_usage` set. Only those bytes
    /// change; when nothing changes the client's bytes are reused.
    pub fn body_for(&self, body: &Bytes, upstream_model: &str) -> Bytes {
        let model_changes = upstream_model != self.model;
        if !model_changes && !self.inject_usage {
            return body.clone();
        }
        let mut edits: Vec<(Range<usize>, String)> = Vec::with_capacity(2);
        if model_changes {
            // A `String` serialises as a JSON string literal; this cannot fail.
            edits.push((
                self.model_span.clone(),
                serde_json::to_string(upstream_model).unwrap_or_default(),
            ));
        }
        if self.inject_usage {
            let value = match &self.stream_options_rest {
                // Inserted as the first member of the top-level object.
                None => "\"stream_options\":{\"include_usage\":true},".to_owned(),
                Some(rest) if rest == "{}" => "{\"include_usage\":true}".to_owned(),
                Some(rest) => format!("{{\"include_usage\":true,{}", &rest[1..]),
            };
            edits.push((self.stream_options_span.clone(), value));
        }
        edits.sort_by_key(|(range, _)| range.start);
        let mut out = BytesMut::with_capacity(body.len() + 48);
        let mut at = 0;
        for (range, replacement) in edits {
            out.extend_from_slice(&body[at..range.start]);
            out.extend_from_slice(replacement.as_bytes());
            at = range.end;
        }
        out.extend_from_slice(&body[at..]);
        out.freeze()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(body: &str) -> Result<ParsedRequest, GatewayError> {
        parse(Endpoint::ChatCompletions, body.as_bytes())
    }

    fn message(r: Result<ParsedRequest, GatewayError>) -> String {
        let e = r.expect_err("should be rejected");
        assert!(matches!(e, GatewayError::InvalidRequest(_)), "{e:?}");
        e.to_string()
    }

    #[test]
    fn extracts_model_and_stream() {
        let p = chat(r#"{"model":"m","messages":[],"stream":true}"#).unwrap();
        assert_eq!((p.model.as_str(), p.stream), ("m", true));
        let p = chat(r#"{"messages":[{"role":"user","content":"hi"}],"model":"m","stream":null}"#).unwrap();
        assert!(!p.stream);
    }

    #[test]
    fn rewrites_only_the_model_value() {
        let body = Bytes::from_static(
            br#"{ "model" : "deepseek-chat", "messages":[{"content":"model: \"x\""}], "x-unknown": 1.50e3 }"#,
        );
        let p = parse(Endpoint::ChatCompletions, &body).unwrap();
        let out = p.body_for(&body, "deepseek-v3.2\"q");
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{ "model" : "deepseek-v3.2\"q", "messages":[{"content":"model: \"x\""}], "x-unknown": 1.50e3 }"#
        );
        assert_eq!(p.body_for(&body, "deepseek-chat").as_ptr(), body.as_ptr());
    }

    #[test]
    fn streams_get_include_usage_injected() {
        let upstream = |body: &'static str| {
            let body = Bytes::from_static(body.as_bytes());
            let p = parse(Endpoint::ChatCompletions, &body).unwrap();
            let out = p.body_for(&body, "up");
            (
                p.inject_usage,
                serde_json::from_slice::<serde_json::Value>(&out).unwrap(),
            )
        };
        let (inject, v) = upstream(r#" {"model":"m","messages":[],"stream":true}"#);
        assert!(inject);
        assert_eq!(v["stream_options"], serde_json::json!({ "include_usage": true }));
        assert_eq!(v["model"], "up");
        let (inject, v) =
            upstream(r#"{"model":"m","messages":[],"stream":true,"stream_options":{"x":1,"include_usage":false}}"#);
        assert!(inject);
        assert_eq!(
            v["stream_options"],
            serde_json::json!({ "include_usage": true, "x": 1 })
        );
        let (inject, v) = upstream(r#"{"model":"m","messages":[],"stream":true,"stream_options":null}"#);
        assert!(inject);
        assert_eq!(v["stream_options"]["include_usage"], true);
        let (inject, v) =
            upstream(r#"{"model":"m","messages":[],"stream":true,"stream_options":{"include_usage":true}}"#);
        assert!(!inject, "the client asked for usage itself");
        assert_eq!(v["stream_options"]["include_usage"], true);
        let (inject, _) = upstream(r#"{"model":"m","messages":[]}"#);
        assert!(!inject, "not a stream");
        let e = parse(
            Endpoint::ChatCompletions,
            br#"{"model":"m","messages":[],"stream":true,"stream_options":3}"#,
        );
        assert!(message(e).contains("stream_options"));
    }

    #[test]
    fn endpoint_labels_follow_the_discriminants() {
        let labels: Vec<_> = Endpoint::ALL.iter().map(|e| e.label()).collect();
        assert_eq!(
            labels,
            [
                "chat_completions",
                "completions",
                "embeddings",
                "responses",
                "passthrough"
            ]
        );
    }

    #[test]
    fn responses_streams_need_no_usage_injected_nor_messages() {
        let body = Bytes::from_static(br#"{"model":"m","input":"hi","stream":true}"#);
        let p = parse(Endpoint::Responses, &body).unwrap();
        assert!(p.stream && !p.inject_usage);
        assert_eq!(&p.body_for(&body, "m")[..], &body[..]);
        assert!(parse(Endpoint::ChatCompletions, &body).is_err(), "chat needs messages");
    }

    #[test]
    fn escaped_model_names_are_decoded() {
        let p = chat(r#"{"model":"deep\u0073eek","messages":[]}"#).unwrap();
        assert_eq!(p.model, "deepseek");
    }

    #[test]
    fn rejects_bad_bodies() {
        assert!(message(chat("")).contains("empty"));
        assert!(message(chat("{")).contains("not a valid JSON object"));
        assert!(message(chat("[1,2]")).contains("not a valid JSON object"));
        assert!(message(chat(r#"{"messages":[]}"#)).contains("'model'"));
        assert!(message(chat(r#"{"model":5,"messages":[]}"#)).contains("'model'"));
        assert!(message(chat(r#"{"model":"m"}"#)).contains("'messages'"));
        assert!(message(chat(r#"{"model":"m","messages":"hi"}"#)).contains("'messages'"));
        // `null` is there, of the wrong type; so says the one-pass parse too.
        let null = br#"{"model":"m","messages":null}"#;
        let wrong_type = "Invalid type for 'messages': expected an array.";
        assert_eq!(message(parse(Endpoint::ChatCompletions, null)), wrong_type);
        let one_pass = parse_with_estimate(Endpoint::ChatCompletions, null, 1).map(|(p, _)| p);
        assert_eq!(message(one_pass), wrong_type);
        assert!(message(chat(r#"{"model":"m","messages":[],"stream":"yes"}"#)).contains("'stream'"));
        assert!(message(chat(r#"{"model":"m","model":"n","messages":[]}"#)).contains("duplicate"));
        assert!(message(parse(Endpoint::ChatCompletions, b"\xff\xfe")).contains("UTF-8"));
        // Embeddings need no messages.
        assert!(parse(Endpoint::Embeddings, br#"{"model":"e","input":"x"}"#).is_ok());
    }

    #[test]
    fn hostile_nesting_is_bounded_not_a_crash() {
        // serde_json skips ignored values iteratively, so depth costs no stack:
        // a million levels in an unknown field (or in `messages`) parse in
        // bounded memory; the body size limit bounds the rest.
        let deep = format!(
            r#"{{"model":"m","messages":[],"x":{}{}}}"#,
            "[".repeat(1_000_000),
            "]".repeat(1_000_000)
        );
        assert_eq!(chat(&deep).unwrap().model, "m");
        let deep = format!(
            r#"{{"model":"m","messages":[{}{}]}}"#,
            "[".repeat(1_000_000),
            "]".repeat(1_000_000)
        );
        assert!(chat(&deep).is_ok());
        // Where a value is built (`model`), the recursion limit turns depth into a 400.
        let deep = format!(
            r#"{{"model":{}"m"{},"messages":[]}}"#,
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        assert!(message(chat(&deep)).contains("'model'"));
        // Unbalanced: an error, not a hang.
        assert!(message(chat(&format!(
            r#"{{"model":"m","messages":[],"x":{}"#,
            "[".repeat(100_000)
        )))
        .contains("JSON"));
    }
}
