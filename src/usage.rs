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
    let parsed: WithUsage = serde_json::from_slice(body)?;
    Ok(parsed.usage.map(Usage::from))
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
