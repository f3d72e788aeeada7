//! Token usage as upstreams report it, and its cost from the price table.
//!
//! OpenAI reports `prompt_tokens_details.cached_tokens` and
//! `completion_tokens_details.reasoning_tokens`; DeepSeek reports
//! `prompt_cache_hit_tokens` / `prompt_cache_miss_tokens`. Both are read.

use serde::Deserialize;

use crate::config::Price;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt: u64,
    pub completion: u64,
    /// Prompt tokens served from the provider's cache (billed at the cached price).
    pub cached_prompt: u64,
    /// Completion tokens spent on reasoning (already included in `completion`).
    pub reasoning: u64,
}

#[derive(Deserialize)]
struct RawUsage {
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
    #[serde(default)]
    prompt_tokens_details: Option<PromptDetails>,
    #[serde(default)]
    completion_tokens_details: Option<CompletionDetails>,
    #[serde(default)]
    prompt_cache_hit_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct PromptDetails {
    #[serde(default)]
    cached_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct CompletionDetails {
    #[serde(default)]
    reasoning_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct WithUsage {
    #[serde(default)]
    usage: Option<RawUsage>,
}

impl From<RawUsage> for Usage {
    fn from(r: RawUsage) -> Self {
        let cached = r
            .prompt_tokens_details
            .and_then(|d| d.cached_tokens)
            .or(r.prompt_cache_hit_tokens)
            .unwrap_or(0);
        Usage {
            prompt: r.prompt_tokens,
            completion: r.completion_tokens,
            cached_prompt: cached.min(r.prompt_tokens),
            reasoning: r
                .completion_tokens_details
                .and_then(|d| d.reasoning_tokens)
                .unwrap_or(0),
        }
    }
}

/// Parses a JSON response body (or one SSE event's data): `Err` when it is not
/// JSON at all, `Ok(None)` when it is JSON without a `usage` object.
pub fn from_json(body: &[u8]) -> Result<Option<Usage>, serde_json::Error> {
    if let Some(usage) = usage_at_the_end(body) {
        return Ok(Some(usage));
    }
    let parsed: WithUsage = serde_json::from_slice(body)?;
    Ok(parsed.usage.map(Usage::from))
}

/// The fast path for a whole answer: providers put `usage` near the end, so
/// find the last `"usage":` key and parse from there, not the whole body (a
/// full parse of a 600-byte answer was 7 % of the instructions per request).
///
/// The object is taken only when it is provably a member of the outermost
/// object: the body is `{…}`, the key follows `{` or `,`, and what comes after
/// the usage value closes the outermost object (`}`, or `,` + members + `}`,
/// checked by parsing that tail). The text before the key is not validated:
/// a body that starts with `{`, ends with a valid tail and is broken in the
/// middle is taken as JSON. Anything else falls back to the full parse.
fn usage_at_the_end(body: &[u8]) -> Option<Usage> {
    const KEY: &[u8] = b"\"usage\"";
    let body = body.trim_ascii();
    if body.first() != Some(&b'{') || body.last() != Some(&b'}') {
        return None;
    }
    let at = memchr::memmem::rfind(body, KEY)?;
    if !matches!(body[..at].trim_ascii_end().last(), Some(b',' | b'{')) {
        return None;
    }
    let value = body[at + KEY.len()..].trim_ascii_start().strip_prefix(b":")?;
    let mut values = serde_json::Deserializer::from_slice(value).into_iter::<RawUsage>();
    let raw = values.next()?.ok()?;
    let tail = value[values.byte_offset()..].trim_ascii();
    let closes_outermost = tail == b"}"
        || tail.strip_prefix(b",").is_some_and(|members| {
            let mut object = Vec::with_capacity(members.len() + 1);
            object.push(b'{');
            object.extend_from_slice(members);
            serde_json::from_slice::<serde::de::IgnoredAny>(&object).is_ok()
        });
    closes_outermost.then(|| Usage::from(raw))
}

impl Usage {
    /// Cost in USD. Cached prompt tokens are billed at the cached price when
    /// one is set, otherwise at the input price.
    pub fn cost(&self, price: &Price) -> f64 {
        let cached_price = price.cached_input_per_mtok.unwrap_or(price.input_per_mtok);
        let uncached = self.prompt.saturating_sub(self.cached_prompt);
        (uncached as f64 * price.input_per_mtok
            + self.cached_prompt as f64 * cached_price
            + self.completion as f64 * price.output_per_mtok)
            / 1_000_000.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_openai_and_deepseek_shapes() {
        let openai = br#"{"usage":{"prompt_tokens":100,"completion_tokens":50,"total_tokens":150,
            "prompt_tokens_details":{"cached_tokens":40},"completion_tokens_details":{"reasoning_tokens":7}}}"#;
        assert_eq!(
            from_json(openai).unwrap(),
            Some(Usage {
                prompt: 100,
                completion: 50,
                cached_prompt: 40,
                reasoning: 7
            })
        );
        let deepseek = br#"{"id":"x","usage":{"prompt_tokens":10,"completion_tokens":2,
            "prompt_cache_hit_tokens":6,"prompt_cache_miss_tokens":4}}"#;
        assert_eq!(from_json(deepseek).unwrap().unwrap().cached_prompt, 6);
        assert_eq!(from_json(br#"{"choices":[]}"#).unwrap(), None);
        assert_eq!(from_json(br#"{"usage":null}"#).unwrap(), None);
        assert!(from_json(b"<html>").is_err());
    }

    #[test]
    fn the_fast_path_takes_only_the_outermost_usage() {
        let u = |p: u64| Usage {
            prompt: p,
            completion: 2,
            ..Usage::default()
        };
        let body = |s: &str| s.as_bytes().to_vec();
        // OpenAI's order: usage, then scalar members.
        let openai = body(
            r#"{"id":"x","choices":[{"message":{"content":"say \"usage\": {}"}}],
               "usage":{"prompt_tokens":3,"completion_tokens":2},"service_tier":"default","system_fingerprint":null}"#,
        );
        assert_eq!(usage_at_the_end(&openai), Some(u(3)));
        assert_eq!(from_json(&openai).unwrap(), Some(u(3)));
        // A nested "usage" after the real one is not taken by the fast path,
        // and the full parse still finds the outermost one.
        let nested = body(
            r#"{"usage":{"prompt_tokens":3,"completion_tokens":2},"extra":{"usage":{"prompt_tokens":99,"completion_tokens":2}}}"#,
        );
        assert_eq!(usage_at_the_end(&nested), None);
        assert_eq!(from_json(&nested).unwrap(), Some(u(3)));
        let inner_last = body(r#"{"a":{"usage":{"prompt_tokens":99,"completion_tokens":2}}}"#);
        assert_eq!(usage_at_the_end(&inner_last), None);
        assert_eq!(from_json(&inner_last).unwrap(), None);
        // "usage" as a string value, not a key.
        assert_eq!(usage_at_the_end(br#"{"a":"usage","b":1}"#), None);
        // Truncated or not an object: full parse, which fails.
        assert!(from_json(br#"{"usage":{"prompt_tokens":3,"completion_tokens":2}"#).is_err());
        assert_eq!(usage_at_the_end(br#"[{"usage":{"prompt_tokens":3}}]"#), None);
        assert!(from_json(br#"{"usage":{"prompt_tokens":3,"completion_tokens":2},"x":}"#).is_err());
    }

    #[test]
    fn cost_uses_the_cached_price() {
        let price = Price {
            input_per_mtok: 0.28,
            output_per_mtok: 0.42,
            cached_input_per_mtok: Some(0.028),
        };
        let u = Usage {
            prompt: 1_000_000,
            completion: 1_000_000,
            cached_prompt: 500_000,
            reasoning: 0,
        };
        let expected = 0.5 * 0.28 + 0.5 * 0.028 + 0.42;
        assert!((u.cost(&price) - expected).abs() < 1e-12);
    }
}
