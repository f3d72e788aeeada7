//! The token estimate reserved at admission, before the usage is known.
//!
//! It only has to be cheap and in the right range: `Admission::reconcile`
//! replaces it with the real usage when the response (or the usage chunk of
//! a stream) arrives.

use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

/// Bytes per token of English text and JSON for OpenAI-style BPE tokenizers
/// (the usual rule of thumb; code and non-Latin scripts run denser, and
/// reconcile corrects either way).
const BYTES_PER_TOKEN: u64 = 4;

/// An inline `data:` URL (a base64 image or audio clip) counts as 765
/// tokens, what OpenAI bills for a 1024×1024 image at high detail, instead
/// of its base64 length / 4, which would be hundreds of times too many.
const INLINE_MEDIA_TOKENS: u64 = 765;

/// The prompt-side fields of the OpenAI-compatible request bodies
/// (chat completions, completions, embeddings, responses).
/// `request::CountingProbe` reads the same fields in the parse's own pass
/// (`request::parse_with_estimate`); a property test in
/// tests/it/sse_props.rs holds the two to the same answers.
#[derive(Deserialize)]
struct Body {
    messages: Option<Counted>,
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

/// Tokens to reserve for a request: prompt + completion.
///
/// - Prompt: the bytes of every string (keys included, which stands in for
///   the per-message framing of chat formats) under `messages`, `prompt`,
///   `input`, `instructions`, `tools` and `functions`, divided by 4 and
///   rounded up; a number (a token-id prompt) counts as one token, an inline
///   `data:` URL as 765.
/// - Completion: `max_completion_tokens`, else `max_tokens`, else
///   `max_output_tokens`, else `default_max_tokens`; times `n` (choices).
///   Pass `default_max_tokens = 0` for endpoints that generate nothing
///   (embeddings).
///
/// A body that is not a JSON object of that shape: its length / 4 plus
/// `default_max_tokens`.
pub fn estimate_tokens(body: &[u8], default_max_tokens: u64) -> u64 {
    let (prompt, completion) = estimate(body, default_max_tokens);
    prompt.saturating_add(completion)
}

/// The prompt part of `estimate_tokens` alone: a request's prompt tokens
/// when the provider reports no usage (docs/ledger.md, "Estimated usage").
pub fn estimate_prompt_tokens(body: &[u8]) -> u64 {
    estimate(body, 0).0
}

/// (prompt, completion) as `estimate_tokens` documents them: the spend
/// budgets price the two at their own rates.
pub fn estimate(body: &[u8], default_max_tokens: u64) -> (u64, u64) {
    let Ok(b) = serde_json::from_slice::<Body>(body) else {
        return ((body.len() as u64).div_ceil(BYTES_PER_TOKEN), default_max_tokens);
    };
    let prompt = [b.messages, b.prompt, b.input, b.instructions, b.tools, b.functions];
    let limits = [b.max_completion_tokens, b.max_tokens, b.max_output_tokens, b.n];
    from_fields(&prompt, limits, default_max_tokens)
}

/// The estimate from a body's fields, parsed by `estimate` or, in the same
/// pass as the rest of the request, by `request::parse_with_estimate`:
/// the prompt fields, then `max_completion_tokens`, `max_tokens`,
/// `max_output_tokens` and `n`.
pub(crate) fn from_fields(prompt: &[Option<Counted>], limits: [Option<u64>; 4], default_max_tokens: u64) -> (u64, u64) {
    let mut count = Count::default();
    for c in prompt.iter().flatten() {
        count.bytes += c.count.bytes;
        count.tokens += c.count.tokens;
    }
    let [max_completion_tokens, max_tokens, max_output_tokens, n] = limits;
    let completion = max_completion_tokens
        .or(max_tokens)
        .or(max_output_tokens)
        .unwrap_or(default_max_tokens)
        .saturating_mul(n.unwrap_or(1).max(1));
    (count.tokens(), completion)
}

#[derive(Default)]
struct Count {
    bytes: u64,
    tokens: u64,
}

impl Count {
    fn tokens(&self) -> u64 {
        self.bytes.div_ceil(BYTES_PER_TOKEN).saturating_add(self.tokens)
    }
}

/// One prompt field, counted while it is parsed: the bytes of every string
/// and key, one token per number, 765 per inline `data:` URL. Counting in
/// serde's visitor rather than over a parsed `serde_json::Value` avoids an
/// allocation per string, array and object, which was most of the cost.
pub(crate) struct Counted {
    count: Count,
    /// The value is an array (what `messages` must be).
    array: bool,
}

impl Counted {
    pub(crate) fn is_array(&self) -> bool {
        self.array
    }
}

impl<'de> Deserialize<'de> for Counted {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut count = Count::default();
        let array = Counter(&mut count).deserialize(d)?;
        Ok(Counted { count, array })
    }
}

struct Counter<'a>(&'a mut Count);

/// Counts a value into its `Count`; its own value says whether the value
/// was an array.
impl<'de> DeserializeSeed<'de> for Counter<'_> {
    type Value = bool;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Counter<'_> {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_str<E>(self, s: &str) -> Result<bool, E> {
        if s.starts_with("data:") {
            self.0.tokens += INLINE_MEDIA_TOKENS;
        } else {
            self.0.bytes += s.len() as u64;
        }
        Ok(false)
    }

    fn visit_u64<E>(self, _: u64) -> Result<bool, E> {
        self.0.tokens += 1;
        Ok(false)
    }

    fn visit_i64<E>(self, _: i64) -> Result<bool, E> {
        self.0.tokens += 1;
        Ok(false)
    }

    fn visit_f64<E>(self, _: f64) -> Result<bool, E> {
        self.0.tokens += 1;
        Ok(false)
    }

    fn visit_bool<E>(self, _: bool) -> Result<bool, E> {
        Ok(false)
    }

    fn visit_unit<E>(self) -> Result<bool, E> {
        Ok(false)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<bool, A::Error> {
        while seq.next_element_seed(Counter(self.0))?.is_some() {}
        Ok(true)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<bool, A::Error> {
        while let Some(key) = map.next_key_seed(KeyLen)? {
            self.0.bytes += key;
            map.next_value_seed(Counter(self.0))?;
        }
        Ok(false)
    }
}

/// An object key's length, without allocating the key.
struct KeyLen;

impl<'de> DeserializeSeed<'de> for KeyLen {
    type Value = u64;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<u64, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeyLen {
    type Value = u64;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string")
    }

    fn visit_str<E>(self, s: &str) -> Result<u64, E> {
        Ok(s.len() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_prompt_plus_max_tokens() {
        // "role"(4) + "user"(4) + "content"(7) + 21 bytes of text = 36 bytes = 9 tokens.
        let body = br#"{"model":"m","messages":[{"role":"user","content":"Say hello in one word"}],"max_tokens":100}"#;
        assert_eq!(estimate_tokens(body, 1024), 9 + 100);
        // Without max_tokens: the default; with n choices: n times the completion.
        let body = br#"{"model":"m","messages":[{"role":"user","content":"Say hello in one word"}],"n":3}"#;
        assert_eq!(estimate_tokens(body, 1024), 9 + 3 * 1024);
        // max_completion_tokens wins over max_tokens.
        let body = br#"{"messages":[],"max_tokens":100,"max_completion_tokens":7}"#;
        assert_eq!(estimate_tokens(body, 1024), 7);
    }

    /// The counting visitor gives what counting a parsed `Value` gives (the
    /// definition it replaced), on every JSON type and on escaped text.
    #[test]
    fn counting_while_parsing_matches_counting_a_value() {
        fn reference(v: &serde_json::Value) -> Count {
            fn add(c: &mut Count, v: &serde_json::Value) {
                use serde_json::Value;
                match v {
                    Value::String(s) if s.starts_with("data:") => c.tokens += INLINE_MEDIA_TOKENS,
                    Value::String(s) => c.bytes += s.len() as u64,
                    Value::Number(_) => c.tokens += 1,
                    Value::Array(items) => items.iter().for_each(|i| add(c, i)),
                    Value::Object(fields) => fields.iter().for_each(|(k, v)| {
                        c.bytes += k.len() as u64;
                        add(c, v)
                    }),
                    Value::Bool(_) | Value::Null => {}
                }
            }
            let mut c = Count::default();
            add(&mut c, v);
            c
        }
        for json in [
            r#""plain""#,
            r#""caf\u00e9 \"quoted\" \n tab\t""#,
            r#""data:image/png;base64,AAAA""#,
            r#"[1, -2, 3.5, 1e300, 18446744073709551616, true, false, null]"#,
            r#"{"role":"user","content":[{"type":"text","text":"hi"},{"type":"image_url","image_url":{"url":"data:x"}}]}"#,
            r#"[{"type":"function","function":{"name":"f","parameters":{"type":"object","properties":{"a":{"type":"integer","minimum":0}}}}}]"#,
            r#"{"k\u00e9y":[[[]]],"":{},"n":null}"#,
            "[]",
            "{}",
            "null",
        ] {
            let counted: Counted = serde_json::from_str(json).unwrap();
            let expected = reference(&serde_json::from_str(json).unwrap());
            assert_eq!(
                (counted.count.bytes, counted.count.tokens),
                (expected.bytes, expected.tokens),
                "{json}"
            );
            assert_eq!(counted.is_array(), json.starts_with('['), "{json}");
        }
        // Broken JSON inside a prompt field fails the whole body, as before.
        assert_eq!(estimate_tokens(br#"{"messages":[{"a":1,}]}"#, 10), 6 + 10);
    }

    #[test]
    fn other_shapes() {
        // Completions with a token-id prompt: one token per id.
        assert_eq!(estimate_tokens(br#"{"prompt":[1,2,3],"max_tokens":5}"#, 1024), 3 + 5);
        // Embeddings: pass 0 as the default completion.
        assert_eq!(estimate_tokens(br#"{"input":["abcd","efgh"]}"#, 0), 2);
        // Responses API.
        assert_eq!(
            estimate_tokens(
                br#"{"input":"abcdefgh","instructions":"abcd","max_output_tokens":10}"#,
                1024
            ),
            3 + 10
        );
        // An inline image counts as a fixed 765, not its base64 length.
        let image = format!(
            r#"{{"messages":[{{"role":"user","content":[{{"type":"image_url","image_url":{{"url":"data:image/png;base64,{}"}}}}]}}],"max_tokens":0}}"#,
            "A".repeat(100_000)
        );
        let t = estimate_tokens(image.as_bytes(), 1024);
        assert!((765..800).contains(&t), "{t}");
        // Not JSON: the length / 4 plus the default.
        assert_eq!(estimate_tokens(b"not json at all", 10), 4 + 10);
        assert_eq!(estimate_tokens(b"", 10), 10);
        // Wrong types are treated like non-JSON, not as zero.
        assert_eq!(estimate_tokens(br#"{"max_tokens":"lots"}"#, 10), 6 + 10);
    }

    #[test]
    fn the_prompt_part_leaves_out_the_completion() {
        let body = br#"{"model":"m","max_tokens":1000,"messages":[{"role":"user","content":"hello"}]}"#;
        let prompt = estimate_prompt_tokens(body);
        assert_eq!(estimate_tokens(body, 0), prompt + 1000);
        assert_eq!(estimate_tokens(body, 77), prompt + 1000, "the client's max_tokens wins");
        assert!(prompt > 0 && prompt < 20, "{prompt}");
        assert_eq!(estimate_prompt_tokens(b"not json!"), 3);
    }
}
