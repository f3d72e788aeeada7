//! Parsing a client request, once, for only what routing needs (`model`,
//! `stream`, and that `messages` is an array), and rewriting the model field
//! in place. The rest of the body is forwarded as the client's bytes: unknown
//! fields, key order and number formatting survive untouched.

use std::ops::Range;

use bytes::{Bytes, BytesMut};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::error::{clip, GatewayError};

/// The OpenAI endpoints relaygate forwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    ChatCompletions,
    Completions,
    Embeddings,
}

impl Endpoint {
    /// The path appended to an upstream's `base_url` (which ends in `/v1`).
    pub fn upstream_path(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "/chat/completions",
            Endpoint::Completions => "/completions",
            Endpoint::Embeddings => "/embeddings",
        }
    }
}

/// What relaygate needs to know about a request body.
#[derive(Debug, Clone)]
pub struct ParsedRequest {
    pub model: String,
    pub stream: bool,
    /// Byte range of the `model` value (with its quotes) in the body.
    model_span: Range<usize>,
}

#[derive(Deserialize)]
struct Probe<'a> {
    #[serde(borrow)]
    model: Option<&'a RawValue>,
    #[serde(borrow)]
    stream: Option<&'a RawValue>,
    #[serde(borrow)]
    messages: Option<&'a RawValue>,
}

/// Validates the body and extracts `model` and `stream`. Every other field
/// is skipped by serde without being built into a value; serde_json's
/// recursion limit (128) turns hostile nesting into a 400, not a crash.
pub fn parse(endpoint: Endpoint, body: &[u8]) -> Result<ParsedRequest, GatewayError> {
    let invalid = |m: String| GatewayError::InvalidRequest(m);
    let text = std::str::from_utf8(body).map_err(|_| invalid("Request body is not valid UTF-8.".into()))?;
    if text.trim_start().is_empty() {
        return Err(invalid("Request body is empty; expected a JSON object.".into()));
    }
    let probe: Probe<'_> = serde_json::from_str(text).map_err(|e| {
        invalid(format!(
            "Request body is not a valid JSON object: {}",
            clip(&e.to_string())
        ))
    })?;

    let raw_model = probe
        .model
        .ok_or_else(|| invalid("Missing required parameter: 'model'.".into()))?;
    let model: String = serde_json::from_str(raw_model.get())
        .map_err(|_| invalid("Invalid type for 'model': expected a string.".into()))?;
    if model.is_empty() {
        return Err(invalid("Invalid value for 'model': must not be empty.".into()));
    }
    // `RawValue::get` borrows from `text`, so its address gives its offset.
    let start = raw_model.get().as_ptr() as usize - text.as_ptr() as usize;
    let model_span = start..start + raw_model.get().len();

    let stream = match probe.stream.map(RawValue::get) {
        None | Some("null") | Some("false") => false,
        Some("true") => true,
        Some(_) => return Err(invalid("Invalid type for 'stream': expected a boolean.".into())),
    };

    if endpoint == Endpoint::ChatCompletions {
        match probe.messages.map(RawValue::get) {
            None => return Err(invalid("Missing required parameter: 'messages'.".into())),
            Some(m) if !m.starts_with('[') => {
                return Err(invalid("Invalid type for 'messages': expected an array.".into()))
            }
            Some(_) => {}
        }
    }

    Ok(ParsedRequest {
        model,
        stream,
        model_span,
    })
}

impl ParsedRequest {
    /// The body with `model` replaced by `upstream_model`. When the names are
    /// equal the client's bytes are reused without a copy.
    pub fn body_for(&self, body: &Bytes, upstream_model: &str) -> Bytes {
        if upstream_model == self.model {
            return body.clone();
        }
        // A `String` serialises as a JSON string literal; this cannot fail.
        let literal = serde_json::to_string(upstream_model).unwrap_or_default();
        let mut out = BytesMut::with_capacity(body.len() + literal.len());
        out.extend_from_slice(&body[..self.model_span.start]);
        out.extend_from_slice(literal.as_bytes());
        out.extend_from_slice(&body[self.model_span.end..]);
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
