//! Token usage as upstreams report it, and its cost from the price table.
//!
//! OpenAI reports `prompt_tokens_details.cached_tokens` and
//! `completion_tokens_details.reasoning_tokens`; DeepSeek reports
//! `prompt_cache_hit_tokens` / `prompt_cache_miss_tokens`. Both are read.
//! The Responses API names them `input_tokens` (`input_tokens_details`)
//! and `output_tokens` (`output_tokens_details`): read as the same fields.

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

#[derive(Deserialize, Default)]
struct RawUsage {
    #[serde(default, alias = "input_tokens")]
    prompt_tokens: u64,
    #[serde(default, alias = "output_tokens")]
    completion_tokens: u64,
    #[serde(default, alias = "input_tokens_details")]
    prompt_tokens_details: Option<PromptDetails>,
    #[serde(default, alias = "output_tokens_details")]
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
        return Ok(usage);
    }
    let parsed: WithUsage = serde_json::from_slice(body)?;
    Ok(parsed.usage.map(Usage::from))
}

const USAGE_KEY_BYTES: &[u8] = b"\"usage\"";

/// A searcher for `"usage"`, built once: `memchr::memmem::find` builds one
/// per call, which costs more than the search. Shared with `sse`.
pub(crate) static USAGE_KEY: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
    std::sync::LazyLock::new(|| memchr::memmem::Finder::new(USAGE_KEY_BYTES));

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
///
/// `Some(None)`: the member is `"usage": null`, which OpenAI sends on every
/// chunk of a stream that asked for usage but the last; taken here too, or
/// each of those chunks would get the full parse.
fn usage_at_the_end(body: &[u8]) -> Option<Option<Usage>> {
    let body = body.trim_ascii();
    if body.first() != Some(&b'{') || body.last() != Some(&b'}') {
        return None;
    }
    // The last occurrence, found forwards: memchr's forward search is
    // vectorised and its reverse one is not (about 400 vs 885 instructions
    // on the simulator's 420-byte answer).
    let at = USAGE_KEY.find_iter(body).last()?;
    if !matches!(body[..at].trim_ascii_end().last(), Some(b',' | b'{')) {
        return None;
    }
    let value = body[at + USAGE_KEY_BYTES.len()..]
        .trim_ascii_start()
        .strip_prefix(b":")?;
    let null = value.trim_ascii_start().strip_prefix(b"null");
    let (raw, end) = match null {
        Some(after) => (None, value.len() - after.len()),
        None => match Scan::new(value).usage() {
            Some((raw, end)) => (Some(raw), end),
            None => {
                let mut values = serde_json::Deserializer::from_slice(value).into_iter::<RawUsage>();
                let raw = values.next()?.ok()?;
                (Some(raw), values.byte_offset())
            }
        },
    };
    let tail = value[end..].trim_ascii();
    let closes_outermost = tail == b"}"
        || tail.strip_prefix(b",").is_some_and(|members| {
            let mut object = Vec::with_capacity(members.len() + 1);
            object.push(b'{');
            object.extend_from_slice(members);
            serde_json::from_slice::<serde::de::IgnoredAny>(&object).is_ok()
        });
    closes_outermost.then(|| raw.map(Usage::from))
}

/// Reads a usage object of the shape every provider sends: keys without
/// escapes, values that are unsigned integers, `null`, or one level of
/// objects of those (`prompt_tokens_details`, …). Anything else is `None`
/// and serde decides, so the answer is always serde's.
///
/// Written by hand because serde's derived parse of `RawUsage` was ~4,400
/// instructions per answer (5 % of a request) for ~200 bytes.
struct Scan<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Scan<'a> {
    fn new(b: &'a [u8]) -> Self {
        Self { b, i: 0 }
    }

    /// The next byte after whitespace (JSON's four), not consumed.
    fn peek(&mut self) -> Option<u8> {
        while let Some(b' ' | b'\n' | b'\r' | b'\t') = self.b.get(self.i) {
            self.i += 1;
        }
        self.b.get(self.i).copied()
    }

    fn eat(&mut self, c: u8) -> Option<()> {
        (self.peek()? == c).then(|| self.i += 1)
    }

    /// `"key":`, for a key without escapes.
    fn key(&mut self) -> Option<&'a [u8]> {
        self.eat(b'"')?;
        let start = self.i;
        let len = memchr::memchr2(b'"', b'\\', &self.b[start..])?;
        if self.b[start + len] != b'"' {
            return None;
        }
        self.i = start + len + 1;
        self.eat(b':')?;
        Some(&self.b[start..start + len])
    }

    /// An unsigned integer that fits in u64, or `null` (`Some(None)`).
    fn number(&mut self) -> Option<Option<u64>> {
        if self.peek()? == b'n' {
            return self.b[self.i..].starts_with(b"null").then(|| {
                self.i += 4;
                None
            });
        }
        let start = self.i;
        let digits = self.b[start..].iter().take_while(|c| c.is_ascii_digit()).count();
        self.i += digits;
        let text = &self.b[start..self.i];
        // A fraction, an exponent, a leading zero: serde's call.
        if digits == 0 || (digits > 1 && text[0] == b'0') || matches!(self.b.get(self.i), Some(b'.' | b'e' | b'E')) {
            return None;
        }
        text.iter()
            .try_fold(0u64, |n, d| n.checked_mul(10)?.checked_add(u64::from(d - b'0')))
            .map(Some)
    }

    /// `{ "k": number, … }`, or `null`: the value of `wanted`, if present.
    fn details(&mut self, wanted: &[u8]) -> Option<Option<u64>> {
        if self.peek()? == b'n' {
            return self.number().map(|_| None);
        }
        let mut found = None;
        self.members(|scan, key| {
            let value = scan.number()?;
            if key == wanted {
                // A duplicate is an error for serde; let it say so.
                if found.is_some() {
                    return None;
                }
                found = Some(value);
            }
            Some(())
        })?;
        Some(found.flatten())
    }

    /// `{` members `}`, each handed to `member` after its key.
    fn members(&mut self, mut member: impl FnMut(&mut Self, &'a [u8]) -> Option<()>) -> Option<()> {
        self.eat(b'{')?;
        if self.peek()? == b'}' {
            self.i += 1;
            return Some(());
        }
        loop {
            let key = self.key()?;
            member(self, key)?;
            match self.peek()? {
                b',' => self.i += 1,
                b'}' => {
                    self.i += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    /// The usage object and the offset just past it.
    fn usage(mut self) -> Option<(RawUsage, usize)> {
        let mut raw = RawUsage::default();
        let mut seen = 0u8;
        self.members(|scan, key| {
            let field = match key {
                // The Responses API's names are aliases: both in one
                // object is a duplicate, an error for serde too.
                b"prompt_tokens" | b"input_tokens" => 1,
                b"completion_tokens" | b"output_tokens" => 2,
                b"prompt_tokens_details" | b"input_tokens_details" => 4,
                b"completion_tokens_details" | b"output_tokens_details" => 8,
                b"prompt_cache_hit_tokens" => 16,
                _ => 0,
            };
            if seen & field != 0 {
                return None;
            }
            seen |= field;
            match field {
                // `null` is an error for these two in serde.
                1 => raw.prompt_tokens = scan.number()??,
                2 => raw.completion_tokens = scan.number()??,
                4 => {
                    raw.prompt_tokens_details = Some(PromptDetails {
                        cached_tokens: scan.details(b"cached_tokens")?,
                    })
                }
                8 => {
                    raw.completion_tokens_details = Some(CompletionDetails {
                        reasoning_tokens: scan.details(b"reasoning_tokens")?,
                    })
                }
                16 => raw.prompt_cache_hit_tokens = scan.number()?,
                _ if scan.peek()? == b'{' => {
                    scan.details(b"")?;
                }
                _ => {
                    scan.number()?;
                }
            }
            Some(())
        })?;
        Some((raw, self.i))
    }
}

/// Keys whose string values are generated text, as they appear before a
/// colon: chat deltas and messages (`content`), reasoning as DeepSeek
/// (`reasoning_content`) and others (`reasoning`) send it, tool-call
/// arguments, and completions' `text`.
/// And, last, `"usage"`: not text, but found in the same pass, so that an
/// event is parsed for its usage only when it mentions it.
const SCAN_KEYS: [&[u8]; 6] = [
    b"\"content\"",
    b"\"reasoning_content\"",
    b"\"reasoning\"",
    b"\"arguments\"",
    b"\"text\"",
    USAGE_KEY_BYTES,
];
const USAGE_PATTERN: usize = 5;

/// The six keys found in one pass: aho-corasick's Teddy, a SIMD
/// multi-pattern searcher, where the CPU has what it needs (x86-64 with
/// SSSE3, aarch64), else its general automaton. Built once. On a 230-byte
/// chat chunk (criterion `usage/generated_text_bytes`) Teddy took 46 ns,
/// four memchr substring searches 72, a pass over every colon 71, and the
/// general automaton 252 (it is slow on haystacks this short).
enum KeySearch {
    Teddy(aho_corasick::packed::Searcher),
    Automaton(aho_corasick::AhoCorasick),
}

/// A pattern Teddy is given only to make it fingerprint three bytes of each
/// key rather than four (it takes the shortest pattern's length, at most
/// four): six byte shuffles per 32 bytes of haystack instead of eight; a
/// timing loop of the pass over the 230-byte chunk, 34 -> 27 ns. Three NULs
/// cannot overlap a key (quotes, letters, `_`), so the keys' matches are the
/// same with it; a match of it is skipped.
const FILLER: &[u8] = b"\0\0\0";
const FILLER_PATTERN: usize = SCAN_KEYS.len();

static KEY_SEARCH: std::sync::LazyLock<KeySearch> =
    std::sync::LazyLock::new(
        || match aho_corasick::packed::Searcher::new(SCAN_KEYS.iter().chain([&FILLER])) {
            Some(teddy) => KeySearch::Teddy(teddy),
            None => automaton(),
        },
    );

fn automaton() -> KeySearch {
    KeySearch::Automaton(
        aho_corasick::AhoCorasick::builder()
            .match_kind(aho_corasick::MatchKind::LeftmostFirst)
            .build(SCAN_KEYS)
            .expect("six short patterns"),
    )
}

/// Bytes of generated text in a JSON answer or chunk: the decoded UTF-8
/// length of every string value of a text key (`SCAN_KEYS` but `"usage"`), whatever the JSON
/// whitespace. A value that is not a string (`null`, an array of parts)
/// counts 0.
///
/// A scan, not a parse: in valid JSON a `"name"` followed by `:` and
/// preceded by `{` or `,` (whitespace aside) is a key, since quotes inside
/// strings are escaped.
pub fn generated_text_bytes(json: &[u8]) -> u64 {
    scan(json).text_bytes
}

/// What one pass over a JSON event finds.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct EventScan {
    /// As `generated_text_bytes`.
    pub text_bytes: u64,
    /// The bytes `"usage"` appear: the event may carry a usage object.
    pub mentions_usage: bool,
    /// Where the first of the searched keys' bytes start, if any do: no key
    /// begins before it (`sse::Inspector` skips such bytes next time).
    pub first_key: Option<usize>,
    /// Where the last key's bytes end, or where the search began if it
    /// found none: no key begins at or after it.
    pub after_keys: usize,
}

/// The generated text of a JSON event, and whether it mentions `"usage"`,
/// in one pass.
pub fn scan(json: &[u8]) -> EventScan {
    scan_with(&KEY_SEARCH, json, 0..json.len())
}

/// `scan`, for a caller that knows that every key's bytes in `json` lie
/// within `span`: the same result, without searching the rest (a key's
/// value is still read from the whole of `json`).
pub fn scan_within(json: &[u8], span: std::ops::Range<usize>) -> EventScan {
    scan_with(&KEY_SEARCH, json, span)
}

fn scan_with(search: &KeySearch, json: &[u8], span: std::ops::Range<usize>) -> EventScan {
    let value_at = |start: usize, end: usize| -> u64 {
        let Some(value) = json[end..].trim_ascii_start().strip_prefix(b":") else {
            return 0;
        };
        if !matches!(json[..start].trim_ascii_end().last(), Some(b'{' | b',')) {
            return 0;
        }
        match value.trim_ascii_start().strip_prefix(b"\"") {
            Some(string) => decoded_len(string).map_or(0, |(len, _)| len),
            None => 0,
        }
    };
    let mut out = EventScan::default();
    let mut last_end = None;
    let mut found = |pattern: usize, start: usize, end: usize| {
        if pattern == FILLER_PATTERN {
            return; // no key: three NULs cannot overlap one
        }
        out.first_key.get_or_insert(start);
        last_end = Some(end);
        match pattern {
            USAGE_PATTERN => out.mentions_usage = true,
            _ => out.text_bytes += value_at(start, end),
        }
    };
    let end = span.end.min(json.len());
    let from = span.start.min(end);
    let mut at = from;
    // Both searchers report leftmost-first, non-overlapping matches: the
    // first is where the first key's bytes start.
    match search {
        KeySearch::Teddy(teddy) => loop {
            // Teddy hands a span shorter than its block to Rabin-Karp, and
            // its own set-up costs more than walking the few quotes of a
            // short span: on the 18 bytes a stream's chunk leaves to search
            // (`sse::Inspector`), Teddy's call was a fifth of the chunk's
            // `inspect`.
            let m = if end - at < teddy.minimum_len().max(SHORT_SPAN) {
                key_at_a_quote(json, at, end)
            } else {
                teddy
                    .find_in(json, aho_corasick::Span::from(at..end))
                    .map(|m| (m.pattern().as_usize(), m.start(), m.end()))
            };
            let Some((pattern, start, key_end)) = m else { break };
            at = key_end;
            found(pattern, start, key_end);
        },
        KeySearch::Automaton(any) => any
            .find_iter(aho_corasick::Input::new(json).span(at..end))
            .for_each(|m| found(m.pattern().as_usize(), m.start(), m.end())),
    }
    out.after_keys = last_end.unwrap_or(from);
    out
}

/// Shorter spans than this are searched quote by quote (`key_at_a_quote`).
const SHORT_SPAN: usize = 32;

/// The leftmost key in `json[at..end]` (the first of `SCAN_KEYS` where two
/// start at one quote), as Teddy's leftmost-first search reports it:
/// (pattern, start, end).
fn key_at_a_quote(json: &[u8], mut at: usize, end: usize) -> Option<(usize, usize, usize)> {
    // A byte loop: memchr's set-up costs more on a span this short.
    while let Some(i) = json[at..end].iter().position(|&b| b == b'"') {
        let start = at + i;
        let rest = &json[start..end];
        // Keys differ in their second byte but for two (`reasoning…`).
        let second = rest.get(1).copied();
        if let Some(p) = SCAN_KEYS
            .iter()
            .position(|k| second == Some(k[1]) && rest.starts_with(k))
        {
            return Some((p, start, start + SCAN_KEYS[p].len()));
        }
        at = start + 1;
    }
    None
}

/// The UTF-8 length of a JSON string's value, given the bytes after its
/// opening quote, and the offset of its closing quote; `None` if it does
/// not end.
fn decoded_len(s: &[u8]) -> Option<(u64, usize)> {
    // A streamed delta is a token or two: its end is looked for eight bytes
    // at a time in the first sixteen, before memchr's setup (a timing loop
    // on the chunk's " word3": 5.8 -> 2.8 ns).
    for at in [0, 8] {
        let Some(word) = s.get(at..at + 8) else { break };
        let word = u64::from_le_bytes(word.try_into().expect("eight bytes"));
        let hits = bytes_equal(word, b'"') | bytes_equal(word, b'\\');
        if hits != 0 {
            let i = at + hits.trailing_zeros() as usize / 8;
            if s[i] == b'"' {
                return Some((i as u64, i));
            }
            break;
        }
    }
    let mut n = 0u64;
    let mut i = 0;
    loop {
        let at = memchr::memchr2(b'"', b'\\', &s[i..])?;
        n += at as u64;
        i += at;
        if s[i] == b'"' {
            return Some((n, i));
        }
        // An escape: `\uXXXX` is a code point (a surrogate pair, two of them,
        // is one 4-byte character); any other is one byte.
        let hex = |from: usize| {
            let digits = s.get(from..from + 4)?;
            u32::from_str_radix(std::str::from_utf8(digits).ok()?, 16).ok()
        };
        match *s.get(i + 1)? {
            b'u' => {
                let cp = hex(i + 2)?;
                i += 6;
                let low = (0xD800..0xDC00).contains(&cp) && s.get(i..i + 2) == Some(b"\\u");
                if low && hex(i + 2).is_some_and(|low| (0xDC00..0xE000).contains(&low)) {
                    i += 6;
                    n += 4;
                    continue;
                }
                n += match cp {
                    0..0x80 => 1,
                    0x80..0x800 => 2,
                    _ => 3,
                };
            }
            _ => {
                i += 2;
                n += 1;
            }
        }
    }
}

/// The top bit of each byte of `word` that equals `b`, and no other bit
/// (no borrow runs between bytes, unlike the shorter `has_zero` trick).
fn bytes_equal(word: u64, b: u8) -> u64 {
    const LOW7: u64 = 0x7f7f_7f7f_7f7f_7f7f;
    let x = word ^ (u64::from(b) * 0x0101_0101_0101_0101);
    !(((x & LOW7) + LOW7) | x | LOW7)
}

/// Completion tokens estimated from generated text, at the prompt
/// estimate's rule (`ratelimit::estimate_tokens`): 4 bytes a token, rounded up.
pub fn estimate_completion(text_bytes: u64) -> u64 {
    text_bytes.div_ceil(4)
}

impl Usage {
    /// The usage relaygate estimates when the provider reports none
    /// (docs/ledger.md, "Estimated usage"): the prompt as estimated from
    /// the request, the completion from the bytes of text generated; no
    /// cached or reasoning tokens, since nothing tells them.
    pub fn estimated(prompt: u64, text_bytes: u64) -> Usage {
        Usage {
            prompt,
            completion: estimate_completion(text_bytes),
            cached_prompt: 0,
            reasoning: 0,
        }
    }
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

    /// `cost` in micro-dollars, as the spend budgets settle it.
    pub fn cost_micros(&self, price: &Price) -> i64 {
        crate::budget::usd_to_micros(self.cost(price))
    }
}

/// The most a request can cost, in micro-dollars, what a budget reserves:
/// the prompt estimate at the input price and `max_tokens` (or the
/// default) at the output price, from `ratelimit::estimate`. 0 without a
/// price.
pub fn worst_case_micros(price: Option<&Price>, (prompt, completion): (u64, u64)) -> i64 {
    match price {
        None => 0,
        Some(p) => crate::budget::micros_of(prompt, p.input_per_mtok)
            .saturating_add(crate::budget::micros_of(completion, p.output_per_mtok)),
    }
}

/// What one Responses API stream event says: whether it ends the stream,
/// its usage (`response.usage`, on the terminal events), and the bytes of
/// generated text it carries (`delta` of the `….delta` events).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ResponsesEvent {
    pub terminal: bool,
    pub usage: Option<Usage>,
    pub text_bytes: u64,
}

/// Reads one Responses API event's data. Parsed whole: unlike chat chunks,
/// the events that matter (the terminal one carries the whole response) are
/// few, and their types need reading anyway. Not JSON: nothing.
pub fn responses_event(data: &[u8]) -> ResponsesEvent {
    #[derive(Deserialize)]
    struct Event {
        #[serde(default, rename = "type")]
        kind: String,
        #[serde(default)]
        delta: Option<serde_json::Value>,
        #[serde(default)]
        response: Option<WithUsage>,
    }
    let Ok(event) = serde_json::from_slice::<Event>(data) else {
        return ResponsesEvent::default();
    };
    let terminal = matches!(
        event.kind.as_str(),
        "response.completed" | "response.incomplete" | "response.failed" | "error"
    );
    let text_bytes = match &event.delta {
        Some(serde_json::Value::String(text)) if event.kind.ends_with(".delta") => text.len() as u64,
        _ => 0,
    };
    ResponsesEvent {
        terminal,
        usage: event.response.and_then(|r| r.usage).map(Usage::from),
        text_bytes,
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
        assert_eq!(usage_at_the_end(&openai), Some(Some(u(3))));
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
        // `"usage": null`, OpenAI's on every stream chunk but the last: no
        // usage, without the full parse; the same answer as serde's.
        let chunk = body(r#"{"id":"c","choices":[{"delta":{"content":"hi"}}],"usage":null}"#);
        assert_eq!(usage_at_the_end(&chunk), Some(None));
        assert_eq!(from_json(&chunk).unwrap(), None);
        let chunk = body(r#"{"choices":[],"usage": null ,"obfuscation":"x"}"#);
        assert_eq!(usage_at_the_end(&chunk), Some(None));
        assert_eq!(usage_at_the_end(br#"{"usage":nullx}"#), None, "not null: serde decides");
        assert!(from_json(br#"{"usage":nullx}"#).is_err());
        // Truncated or not an object: full parse, which fails.
        assert!(from_json(br#"{"usage":{"prompt_tokens":3,"completion_tokens":2}"#).is_err());
        assert_eq!(usage_at_the_end(br#"[{"usage":{"prompt_tokens":3}}]"#), None);
        assert!(from_json(br#"{"usage":{"prompt_tokens":3,"completion_tokens":2},"x":}"#).is_err());
    }

    /// The scanner answers only where it agrees with serde, and it does
    /// answer for the shapes providers send (else it would be dead code).
    #[test]
    fn the_scanner_agrees_with_serde_or_leaves_it_to_serde() {
        let serde = |s: &str| serde_json::from_str::<RawUsage>(s).ok().map(Usage::from);
        let scan = |s: &str| {
            Scan::new(s.as_bytes())
                .usage()
                .map(|(raw, end)| (Usage::from(raw), end))
        };
        let common = [
            r#"{"completion_tokens":5,"completion_tokens_details":{"reasoning_tokens":0},"prompt_cache_hit_tokens":0,"prompt_cache_miss_tokens":8,"prompt_tokens":8,"prompt_tokens_details":{"cached_tokens":0},"total_tokens":13}"#,
            r#"{"prompt_tokens":100,"completion_tokens":50,"total_tokens":150,"prompt_tokens_details":{"cached_tokens":40,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":7,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}"#,
            r#"{ "prompt_tokens" : 10 ,"completion_tokens":2,
                "prompt_cache_hit_tokens":6,"prompt_cache_miss_tokens":4 }"#,
            r#"{"prompt_tokens":3,"completion_tokens":2,"prompt_tokens_details":null,"prompt_cache_hit_tokens":null}"#,
            r#"{"prompt_tokens":18446744073709551615,"completion_tokens":0,"prompt_tokens_details":{}}"#,
            r#"{"prompt_tokens":5,"completion_tokens":1,"prompt_tokens_details":{"cached_tokens":9}}"#,
            r#"{}"#,
        ];
        for s in common {
            let (usage, end) = scan(s).unwrap_or_else(|| panic!("scanner declined {s}"));
            assert_eq!(Some(usage), serde(s), "{s}");
            assert_eq!(end, s.len(), "{s}");
        }
        let then_more = r#"{"prompt_tokens":1,"completion_tokens":2},"x":1}"#;
        assert_eq!(scan(then_more).unwrap().1, then_more.find("},").unwrap() + 1);
        let left_to_serde = [
            r#"{"prompt_tokens":1.5,"completion_tokens":2}"#,
            r#"{"prompt_tokens":1e3,"completion_tokens":2}"#,
            r#"{"prompt_tokens":-1,"completion_tokens":2}"#,
            r#"{"prompt_tokens":01,"completion_tokens":2}"#,
            r#"{"prompt_tokens":null,"completion_tokens":2}"#,
            r#"{"prompt_tokens":18446744073709551616}"#,
            r#"{"prompt_tokens":1,"prompt_tokens":2}"#,
            r#"{"prompt_tokens_details":{"cached_tokens":1,"cached_tokens":2}}"#,
            r#"{"prompt_\u0074okens":7}"#,
            r#"{"prompt_tokens":1,"model":"x"}"#,
            r#"{"prompt_tokens":1,"x":[1]}"#,
            r#"{"prompt_tokens":1,}"#,
            r#"{"prompt_tokens":1"#,
            r#"{"prompt_tokens":nul}"#,
            r#"null"#,
        ];
        for s in left_to_serde {
            assert_eq!(scan(s).map(|(u, _)| u), None, "{s}");
        }
        // Through the fast path, the declined ones still get serde's answer.
        let body = |u: &str| format!(r#"{{"id":"x","usage":{u}}}"#);
        assert_eq!(from_json(body(left_to_serde[9]).as_bytes()).unwrap().unwrap().prompt, 1);
        assert!(from_json(body(left_to_serde[4]).as_bytes()).is_err());
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

    #[test]
    fn generated_text_is_measured_whatever_the_json_whitespace() {
        let compact = br#"{"choices":[{"delta":{"content":"v0 "}}]}"#;
        let spaced = br#"{"choices": [{"delta": {"content" : "v0 "}}]}"#;
        assert_eq!(generated_text_bytes(compact), 3);
        assert_eq!(generated_text_bytes(spaced), 3);
        // Reasoning, tool-call arguments, completions' text; null and
        // non-string values count nothing; a key's name inside a string
        // (quotes escaped) is not a key.
        let mixed = br#"{"choices":[{"delta":{"content":null,"reasoning_content":"think","tool_calls":[{"function":{"arguments":"{\"a\":1}"}}]},"text":"x"}],"note":"\"content\": \"no\""}"#;
        assert_eq!(generated_text_bytes(mixed), 5 + 7 + 1);
        assert_eq!(
            generated_text_bytes(br#"{"reasoning":"ab","content":[{"type":"text","text":"cd"}]}"#),
            4
        );
        // Escapes decode: \n is 1 byte, \u00e9 2, \u20ac 3, a surrogate pair 4.
        assert_eq!(
            generated_text_bytes(br#"{"content":"a\nb\u00e9\u20ac\ud83d\ude00"}"#),
            1 + 1 + 1 + 2 + 3 + 4
        );
        assert_eq!(generated_text_bytes(br#"{"content":"unterminated"#), 0);
        assert_eq!(estimate_completion(0), 0);
        assert_eq!(estimate_completion(5), 2);
    }

    proptest::proptest! {
        /// Teddy with the filler pattern finds what it finds without it, and
        /// what the general automaton finds, on text made of keys, the
        /// filler's NULs and the bytes around keys.
        #[test]
        fn the_filler_changes_no_match(json in json_ish()) {
            let plain = aho_corasick::packed::Searcher::new(SCAN_KEYS).map(KeySearch::Teddy);
            let with_filler = scan(&json);
            proptest::prop_assert_eq!(with_filler, scan_with(&automaton(), &json, 0..json.len()));
            if let Some(plain) = plain {
                proptest::prop_assert_eq!(with_filler, scan_with(&plain, &json, 0..json.len()));
            }
        }

        /// The decoded length, on the short path and memchr's, is the
        /// length of the string serde reads, whatever is escaped.
        #[test]
        fn decoded_len_is_serdes(
            text in "[a-z \"\\\\\n\u{e9}\u{20ac}\u{1f600}]{0,40}",
            escape in proptest::collection::vec(proptest::bool::ANY, 40),
        ) {
            let mut json = String::from("\"");
            for (c, escape) in text.chars().zip(escape.iter().cycle()) {
                match c {
                    // Escaped as JSON must: two bytes each.
                    '"' | '\\' | '\n' => json.push_str(&serde_json::to_string(&c.to_string()).unwrap()[1..3]),
                    c if *escape => {
                        let mut units = [0u16; 2];
                        for unit in c.encode_utf16(&mut units) {
                            json.push_str(&format!("\\u{unit:04x}"));
                        }
                    }
                    c => json.push(c),
                }
            }
            json.push_str("\",\"x\":1}");
            let decoded: String =
                serde_json::Deserializer::from_str(&json).into_iter().next().unwrap().unwrap();
            proptest::prop_assert_eq!(decoded.len(), text.len());
            let (len, end) = decoded_len(&json.as_bytes()[1..]).unwrap();
            proptest::prop_assert_eq!(len, text.len() as u64);
            proptest::prop_assert_eq!(&json[1 + end..], "\",\"x\":1}");
        }
    }

    fn json_ish() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
        use proptest::prelude::*;
        let piece = prop_oneof![
            Just(&b"\"content\""[..]),
            Just(&b"\"reasoning_content\""[..]),
            Just(&b"\"reasoning\""[..]),
            Just(&b"\"arguments\""[..]),
            Just(&b"\"text\""[..]),
            Just(&b"\"usage\""[..]),
            Just(&b"\0"[..]),
            Just(&b"\""[..]),
            Just(&b":"[..]),
            Just(&b"{"[..]),
            Just(&b","[..]),
            Just(&b" "[..]),
            Just(&b"\\"[..]),
            Just(&b"ab"[..]),
            Just(&b"\"x\""[..]),
        ];
        proptest::collection::vec(piece, 0..24).prop_map(|p| p.concat())
    }

    /// The fallback for CPUs without Teddy finds what Teddy finds.
    #[test]
    fn the_automaton_fallback_agrees() {
        let fallback = automaton();
        for json in [
            &br#"{"choices": [{"delta": {"content" : "v0 "}}]}"#[..],
            br#"{"choices":[{"delta":{"content":null,"reasoning_content":"think","tool_calls":[{"function":{"arguments":"{\"a\":1}"}}]},"text":"x"}]}"#,
            br#"{"reasoning":"ab","content":[{"type":"text","text":"cd"}]}"#,
            br#"{"note":"\"content\": \"no\""}"#,
        ] {
            assert_eq!(scan_with(&fallback, json, 0..json.len()), scan(json));
            assert!(generated_text_bytes(json) > 0 || json.starts_with(br#"{"note""#));
        }
    }

    #[test]
    fn responses_api_usage_is_read_as_the_same_fields() {
        let body = br#"{"id":"resp_1","object":"response","output":[],"usage":{"input_tokens":36,"input_tokens_details":{"cached_tokens":4},"output_tokens":87,"output_tokens_details":{"reasoning_tokens":5},"total_tokens":123}}"#;
        let expected = Usage {
            prompt: 36,
            completion: 87,
            cached_prompt: 4,
            reasoning: 5,
        };
        assert_eq!(from_json(body).unwrap(), Some(expected), "the hand scan");
        // The same object where the scan gives up (a float) goes to serde.
        let spaced = br#"{"usage": {"input_tokens": 36, "input_tokens_details": {"cached_tokens": 4}, "output_tokens": 87, "output_tokens_details": {"reasoning_tokens": 5}, "x": 1.5}, "y": [1]}"#;
        assert_eq!(from_json(spaced).unwrap(), Some(expected), "serde's aliases");
        let both = br#"{"usage":{"prompt_tokens":1,"input_tokens":2}}"#;
        assert!(from_json(both).is_err(), "a duplicate, as serde sees it");
    }

    #[test]
    fn responses_events_end_on_their_terminal_types_and_carry_usage() {
        let delta = br#"{"type":"response.output_text.delta","item_id":"m","output_index":0,"content_index":0,"delta":"Hello","sequence_number":4}"#;
        assert_eq!(
            responses_event(delta),
            ResponsesEvent {
                terminal: false,
                usage: None,
                text_bytes: 5
            }
        );
        let completed = br#"{"type":"response.completed","response":{"id":"resp_1","status":"completed","usage":{"input_tokens":3,"output_tokens":9,"total_tokens":12},"user":null},"sequence_number":9}"#;
        let seen = responses_event(completed);
        assert!(seen.terminal);
        assert_eq!(seen.usage.map(|u| (u.prompt, u.completion)), Some((3, 9)));
        for kind in ["response.incomplete", "response.failed", "error"] {
            let data = format!(r#"{{"type":"{kind}"}}"#);
            assert!(responses_event(data.as_bytes()).terminal, "{kind}");
        }
        let created = br#"{"type":"response.created","response":{"id":"resp_1","status":"in_progress","usage":null}}"#;
        assert_eq!(responses_event(created), ResponsesEvent::default());
        assert_eq!(responses_event(b"not json"), ResponsesEvent::default());
        // `[DONE]` means nothing here; a text `done` event is not a delta.
        let done = br#"{"type":"response.output_text.done","text":"Hello"}"#;
        assert_eq!(responses_event(done), ResponsesEvent::default());
    }
}
