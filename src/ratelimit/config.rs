//! The rate-limit config: the `[rate_limit]` table and the `[[rate_limits]]`
//! rules, in two stages like the rest of the config (`crate::config`).
//!
//! The `Raw*` structs are what serde reads (`deny_unknown_fields`; strings
//! for enums and durations so that `validate` can word the errors).
//! `validate` turns them into `RateLimitSettings` and `Rule`s; every error
//! starts with the key path: `rate_limits[2].scope: unknown scope "team" …`.
//! Nothing in the engine re-checks what this module guarantees.

use std::collections::HashMap;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use super::Scope;

/// The `[rate_limit]` table. Every field is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimit {
    /// `"local"` (default) or `"redis"`.
    pub backend: Option<String>,
    /// Required with `backend = "redis"`: `redis://[user:password@]host:port[/db]`,
    /// `rediss://…` (TLS) or `redis+unix:///path`. It may hold a password, so
    /// it is a secret: never in Debug output or in an error.
    pub redis_url: Option<SecretString>,
    /// `"open"` (default): fall back to local limits while Redis is down.
    /// `"closed"`: refuse (503) while Redis is down.
    pub fail_mode: Option<String>,
    /// How many gateway replicas share the Redis limits (default 1). The
    /// local fallback enforces `limit / expected_instances` per replica.
    pub expected_instances: Option<u32>,
    /// Bound on every Redis call (default `"50ms"`).
    pub redis_timeout: Option<String>,
    /// Namespace of the Redis keys (default `"relaygate"`).
    pub key_prefix: Option<String>,
    /// Completion-token estimate for a request without `max_tokens` (default 1024).
    pub default_max_tokens: Option<u64>,
}

/// One `[[rate_limits]]` entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    pub name: Option<String>,
    /// `key`, `model`, `upstream` or `global`.
    pub scope: String,
    /// Optional: the one key, model or upstream name the rule applies to.
    /// Without it, the rule applies to each name separately (one bucket per
    /// key, model or upstream). Not allowed with `global`.
    #[serde(rename = "match")]
    pub r#match: Option<String>,
    pub requests_per_minute: Option<u64>,
    pub tokens_per_minute: Option<u64>,
    pub burst: Option<u64>,
    /// `"reject"` (default) or `"queue"`.
    pub on_limit: Option<String>,
    /// With `on_limit = "queue"`: the longest a request waits (default `"5s"`).
    pub max_queue_wait: Option<String>,
}

#[derive(Debug, Clone)]
pub enum Backend {
    Local,
    Redis { url: SecretString },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailMode {
    Open,
    Closed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnLimit {
    Reject,
    Queue,
}

/// The validated `[rate_limit]` table.
#[derive(Debug, Clone)]
pub struct RateLimitSettings {
    pub backend: Backend,
    pub fail_mode: FailMode,
    /// At least 1.
    pub expected_instances: u32,
    /// Greater than zero.
    pub redis_timeout: Duration,
    /// Non-empty, without braces or whitespace: the engine wraps it in a
    /// Redis Cluster hash tag (`{relaygate}:…`).
    pub key_prefix: String,
    pub default_max_tokens: u64,
}

impl Default for RateLimitSettings {
    fn default() -> Self {
        Self {
            backend: Backend::Local,
            fail_mode: FailMode::Open,
            expected_instances: 1,
            redis_timeout: Duration::from_millis(50),
            key_prefix: "relaygate".into(),
            default_max_tokens: 1024,
        }
    }
}

/// One limit of a rule: `per_minute` units (requests or tokens) refill at a
/// steady rate; the bucket holds at most `capacity` units.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    pub per_minute: u32,
    pub capacity: u32,
}

/// A validated rule.
#[derive(Debug, Clone)]
pub struct Rule {
    /// Unique among the rules; a metric label and part of the Redis keys.
    /// Default: `"{scope}:{match}"`, or `"{scope}:*"` without `match`.
    pub name: String,
    pub scope: Scope,
    /// `Some(name)`: only that key, model or upstream (one bucket).
    /// `None`: every name, each with its own bucket (`global`: one bucket).
    pub matches: Option<String>,
    /// Capacity: `burst`, by default `requests_per_minute / 10` (at least 1).
    pub requests: Option<Limit>,
    /// Capacity: one minute of tokens (`tokens_per_minute`); `burst` does not
    /// apply. Why not a tenth like requests: one request reserves its prompt
    /// plus its whole `max_tokens` (often thousands), so a bucket of a tenth
    /// of the minute would turn ordinary requests away against a modest TPM,
    /// and the providers whose quota these rules mirror meter TPM over the
    /// minute too. A request whose estimate exceeds the capacity reserves the
    /// full bucket (it waits for a full bucket instead of never fitting), and
    /// `reconcile` then charges its real usage.
    pub tokens: Option<Limit>,
    pub on_limit: OnLimit,
    /// Meaningful with `OnLimit::Queue` only.
    pub max_queue_wait: Duration,
}

const DEFAULT_MAX_QUEUE_WAIT: Duration = Duration::from_secs(5);

/// Validates `[rate_limit]` (absent: the defaults, local backend) and the
/// `[[rate_limits]]` rules. Errors name the key path.
pub fn validate(raw: Option<RawRateLimit>, rules: Vec<RawRule>) -> Result<(RateLimitSettings, Vec<Rule>), String> {
    let settings = validate_settings(raw.unwrap_or_default())?;
    let mut out: Vec<Rule> = Vec::with_capacity(rules.len());
    let mut names: HashMap<String, usize> = HashMap::new();
    for (i, raw) in rules.into_iter().enumerate() {
        let path = format!("rate_limits[{i}]");
        let rule = validate_rule(&path, raw)?;
        if let Some(first) = names.insert(rule.name.clone(), i) {
            return Err(format!(
                "{path}.name: duplicate rule name {:?} (also rate_limits[{first}]; give the rules distinct names)",
                rule.name
            ));
        }
        out.push(rule);
    }
    Ok((settings, out))
}

/// Cross-checks each rule's `match` against the names the rest of the
/// config defines (call it once they are known): a `match` that names no
/// configured key, model or upstream would never apply, which is almost
/// always a typo. `exists(scope, name)` answers for the scope's names.
pub fn check_matches(rules: &[Rule], exists: impl Fn(Scope, &str) -> bool) -> Result<(), String> {
    check_scope_matches(
        "rate_limits",
        rules.iter().map(|r| (r.scope, r.matches.as_deref())),
        exists,
    )
}

/// The `match` check for any section of scoped entries (`rate_limits`,
/// `budgets`): entry i's `match` must be a name `exists` knows in its scope.
pub fn check_scope_matches<'a>(
    section: &str,
    entries: impl IntoIterator<Item = (Scope, Option<&'a str>)>,
    exists: impl Fn(Scope, &str) -> bool,
) -> Result<(), String> {
    for (i, (scope, matches)) in entries.into_iter().enumerate() {
        if let Some(name) = matches {
            if !exists(scope, name) {
                return Err(format!("{section}[{i}].match: no {scope} named {name:?} in the config"));
            }
        }
    }
    Ok(())
}

fn validate_settings(raw: RawRateLimit) -> Result<RateLimitSettings, String> {
    let d = RateLimitSettings::default();
    let backend = match raw.backend.as_deref().unwrap_or("local") {
        "local" => {
            if raw.redis_url.is_some() {
                return Err(
                    "rate_limit.redis_url: set, but backend is \"local\" (set backend = \"redis\" or remove it)".into(),
                );
            }
            Backend::Local
        }
        "redis" => {
            let url = raw
                .redis_url
                .ok_or("rate_limit.redis_url: required with backend = \"redis\"")?;
            // The URL may hold a password: the error does not echo it.
            if redis::Client::open(url.expose_secret()).is_err() {
                return Err(
                    "rate_limit.redis_url: not a valid Redis URL (expected redis://host:port, \
                            rediss://host:port or redis+unix:///path)"
                        .into(),
                );
            }
            Backend::Redis { url }
        }
        other => {
            return Err(format!(
                "rate_limit.backend: unknown backend {other:?} (expected local or redis)"
            ))
        }
    };
    let fail_mode = match raw.fail_mode.as_deref().unwrap_or("open") {
        "open" => FailMode::Open,
        "closed" => FailMode::Closed,
        other => {
            return Err(format!(
                "rate_limit.fail_mode: unknown fail mode {other:?} (expected open or closed)"
            ))
        }
    };
    let expected_instances = raw.expected_instances.unwrap_or(d.expected_instances);
    if expected_instances == 0 {
        return Err("rate_limit.expected_instances: must be at least 1".into());
    }
    let redis_timeout = match raw.redis_timeout {
        Some(text) => positive_duration("rate_limit.redis_timeout", &text)?,
        None => d.redis_timeout,
    };
    let key_prefix = raw.key_prefix.unwrap_or(d.key_prefix);
    if key_prefix.is_empty() || key_prefix.chars().any(|c| c == '{' || c == '}' || c.is_whitespace()) {
        return Err(format!(
            "rate_limit.key_prefix: {key_prefix:?} must be non-empty, without braces or whitespace \
             (relaygate wraps it in a hash tag itself)"
        ));
    }
    Ok(RateLimitSettings {
        backend,
        fail_mode,
        expected_instances,
        redis_timeout,
        key_prefix,
        default_max_tokens: raw.default_max_tokens.unwrap_or(d.default_max_tokens),
    })
}

fn validate_rule(path: &str, raw: RawRule) -> Result<Rule, String> {
    let scope = Scope::parse(&raw.scope).ok_or_else(|| {
        format!(
            "{path}.scope: unknown scope {:?} (expected key, model, upstream or global)",
            raw.scope
        )
    })?;
    let matches = match raw.r#match {
        Some(_) if scope == Scope::Global => {
            return Err(format!(
                "{path}.match: not allowed with scope \"global\" (a global rule has one bucket)"
            ))
        }
        Some(m) if m.is_empty() => return Err(format!("{path}.match: must not be empty")),
        m => m,
    };
    let name = match raw.name {
        Some(n) if n.trim().is_empty() => return Err(format!("{path}.name: must not be empty")),
        Some(n) => n,
        None => format!("{}:{}", scope.as_str(), matches.as_deref().unwrap_or("*")),
    };

    let per_minute = |key: &str, value: Option<u64>| -> Result<Option<u32>, String> {
        match value {
            None => Ok(None),
            Some(v) if v == 0 || v > u64::from(u32::MAX) => {
                Err(format!("{path}.{key}: must be between 1 and {}", u32::MAX))
            }
            Some(v) => Ok(Some(v as u32)),
        }
    };
    let rpm = per_minute("requests_per_minute", raw.requests_per_minute)?;
    let tpm = per_minute("tokens_per_minute", raw.tokens_per_minute)?;
    if rpm.is_none() && tpm.is_none() {
        return Err(format!(
            "{path}: needs requests_per_minute or tokens_per_minute (or both)"
        ));
    }
    let requests = match (rpm, raw.burst) {
        (None, Some(_)) => {
            return Err(format!(
                "{path}.burst: only applies to requests_per_minute (a token bucket holds one minute of tokens)"
            ))
        }
        (None, None) => None,
        (Some(rpm), burst) => {
            // Up to an hour of requests: beyond that a "per minute" limit
            // means nothing, and GCRA's window (interval × capacity) stays
            // far from overflowing nanoseconds.
            let max = u64::from(rpm) * 60;
            let capacity = match burst {
                Some(b) if b == 0 || b > max || b > u64::from(u32::MAX) => {
                    return Err(format!(
                        "{path}.burst: must be between 1 and 60 × requests_per_minute ({})",
                        max.min(u64::from(u32::MAX))
                    ))
                }
                Some(b) => b as u32,
                None => (rpm / 10).max(1),
            };
            Some(Limit {
                per_minute: rpm,
                capacity,
            })
        }
    };
    let tokens = tpm.map(|tpm| Limit {
        per_minute: tpm,
        capacity: tpm,
    });

    let on_limit = match raw.on_limit.as_deref().unwrap_or("reject") {
        "reject" => OnLimit::Reject,
        "queue" => OnLimit::Queue,
        other => {
            return Err(format!(
                "{path}.on_limit: unknown value {other:?} (expected reject or queue)"
            ))
        }
    };
    let max_queue_wait = match (raw.max_queue_wait, on_limit) {
        (Some(_), OnLimit::Reject) => {
            return Err(format!("{path}.max_queue_wait: only applies with on_limit = \"queue\""))
        }
        (Some(text), OnLimit::Queue) => positive_duration(&format!("{path}.max_queue_wait"), &text)?,
        (None, _) => DEFAULT_MAX_QUEUE_WAIT,
    };
    Ok(Rule {
        name,
        scope,
        matches,
        requests,
        tokens,
        on_limit,
        max_queue_wait,
    })
}

fn positive_duration(path: &str, text: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(text.trim())
        .map_err(|_| format!("{path}: invalid duration {text:?} (expected e.g. \"50ms\", \"5s\")"))?;
    if d.is_zero() {
        return Err(format!("{path}: must be greater than zero"));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct File {
        rate_limit: Option<RawRateLimit>,
        #[serde(default)]
        rate_limits: Vec<RawRule>,
    }

    fn parse(text: &str) -> Result<(RateLimitSettings, Vec<Rule>), String> {
        let file: File = toml::from_str(text).map_err(|e| e.to_string())?;
        validate(file.rate_limit, file.rate_limits)
    }

    fn err(text: &str) -> String {
        parse(text).expect_err("config is invalid")
    }

    #[test]
    fn defaults_and_issue_example() {
        let (s, rules) = parse(
            r#"
            [rate_limit]
            backend = "redis"
            redis_url = "redis://127.0.0.1:6379"
            fail_mode = "open"
            expected_instances = 3

            [[rate_limits]]
            scope = "key"
            match = "app-a"
            requests_per_minute = 600
            tokens_per_minute = 200000
            burst = 50
            on_limit = "queue"
            max_queue_wait = "2s"

            [[rate_limits]]
            scope = "global"
            requests_per_minute = 5
            "#,
        )
        .unwrap();
        assert!(matches!(s.backend, Backend::Redis { .. }));
        assert_eq!(s.fail_mode, FailMode::Open);
        assert_eq!(s.expected_instances, 3);
        assert_eq!(s.redis_timeout, Duration::from_millis(50));
        assert_eq!(s.key_prefix, "relaygate");
        assert_eq!(s.default_max_tokens, 1024);
        assert!(!format!("{s:?}").contains("127.0.0.1"), "the URL is a secret");

        let a = &rules[0];
        assert_eq!(a.name, "key:app-a");
        assert_eq!(a.scope, Scope::Key);
        assert_eq!(a.matches.as_deref(), Some("app-a"));
        assert_eq!(
            a.requests,
            Some(Limit {
                per_minute: 600,
                capacity: 50
            })
        );
        assert_eq!(
            a.tokens,
            Some(Limit {
                per_minute: 200_000,
                capacity: 200_000
            })
        );
        assert_eq!(a.on_limit, OnLimit::Queue);
        assert_eq!(a.max_queue_wait, Duration::from_secs(2));

        let g = &rules[1];
        assert_eq!(g.name, "global:*");
        // burst defaults to a tenth of the minute, at least 1.
        assert_eq!(
            g.requests,
            Some(Limit {
                per_minute: 5,
                capacity: 1
            })
        );
        assert_eq!(g.tokens, None);
        assert_eq!(g.on_limit, OnLimit::Reject);

        let (s, rules) = parse("").unwrap();
        assert!(matches!(s.backend, Backend::Local));
        assert!(rules.is_empty());
    }

    #[test]
    fn errors_name_the_key_path() {
        let cases = [
            (
                "[[rate_limits]]\nscope = \"key\"\nrequests_per_minute = 1\n[[rate_limits]]\nscope = \"model\"\nrequests_per_minute = 1\n[[rate_limits]]\nscope = \"team\"\nrequests_per_minute = 1",
                "rate_limits[2].scope: unknown scope \"team\" (expected key, model, upstream or global)",
            ),
            (
                "[[rate_limits]]\nscope = \"key\"",
                "rate_limits[0]: needs requests_per_minute or tokens_per_minute",
            ),
            (
                "[[rate_limits]]\nscope = \"key\"\nrequests_per_minute = 0",
                "rate_limits[0].requests_per_minute: must be between 1 and",
            ),
            (
                "[[rate_limits]]\nscope = \"global\"\nmatch = \"x\"\nrequests_per_minute = 1",
                "rate_limits[0].match: not allowed with scope \"global\"",
            ),
            (
                "[[rate_limits]]\nscope = \"key\"\ntokens_per_minute = 10\nburst = 3",
                "rate_limits[0].burst: only applies to requests_per_minute",
            ),
            (
                "[[rate_limits]]\nscope = \"key\"\nrequests_per_minute = 1\nburst = 61",
                "rate_limits[0].burst: must be between 1 and 60 × requests_per_minute (60)",
            ),
            (
                "[[rate_limits]]\nscope = \"key\"\nrequests_per_minute = 1\non_limit = \"wait\"",
                "rate_limits[0].on_limit: unknown value \"wait\" (expected reject or queue)",
            ),
            (
                "[[rate_limits]]\nscope = \"key\"\nrequests_per_minute = 1\non_limit = \"queue\"\nmax_queue_wait = \"soon\"",
                "rate_limits[0].max_queue_wait: invalid duration \"soon\"",
            ),
            (
                "[[rate_limits]]\nscope = \"key\"\nrequests_per_minute = 1\nmax_queue_wait = \"1s\"",
                "rate_limits[0].max_queue_wait: only applies with on_limit = \"queue\"",
            ),
            (
                "[[rate_limits]]\nscope = \"key\"\nmatch = \"a\"\nrequests_per_minute = 1\n[[rate_limits]]\nscope = \"key\"\nmatch = \"a\"\ntokens_per_minute = 1",
                "rate_limits[1].name: duplicate rule name \"key:a\" (also rate_limits[0]",
            ),
            (
                "[[rate_limits]]\nname = \" \"\nscope = \"key\"\nrequests_per_minute = 1",
                "rate_limits[0].name: must not be empty",
            ),
            (
                "[rate_limit]\nbackend = \"memcached\"",
                "rate_limit.backend: unknown backend \"memcached\" (expected local or redis)",
            ),
            ("[rate_limit]\nbackend = \"redis\"", "rate_limit.redis_url: required"),
            (
                "[rate_limit]\nredis_url = \"redis://h:1\"",
                "rate_limit.redis_url: set, but backend is \"local\"",
            ),
            (
                "[rate_limit]\nfail_mode = \"ajar\"",
                "rate_limit.fail_mode: unknown fail mode \"ajar\" (expected open or closed)",
            ),
            (
                "[rate_limit]\nexpected_instances = 0",
                "rate_limit.expected_instances: must be at least 1",
            ),
            ("[rate_limit]\nredis_timeout = \"0ms\"", "rate_limit.redis_timeout: must be greater than zero"),
            ("[rate_limit]\nkey_prefix = \"{rg}\"", "rate_limit.key_prefix: \"{rg}\" must be non-empty"),
        ];
        for (text, want) in cases {
            let got = err(text);
            assert!(got.starts_with(want), "for\n{text}\nwant {want:?}\ngot  {got:?}");
        }
        // Unknown keys are refused by serde, whatever the table.
        assert!(err("[rate_limit]\nbakend = \"local\"").contains("unknown field `bakend`"));
        assert!(err("[[rate_limits]]\nscope = \"key\"\nrpm = 1").contains("unknown field `rpm`"));
    }

    #[test]
    fn matches_are_checked_against_configured_names() {
        let (_, rules) = parse(
            "[[rate_limits]]\nscope = \"global\"\nrequests_per_minute = 1\n\
             [[rate_limits]]\nscope = \"model\"\nmatch = \"gpt-4o\"\nrequests_per_minute = 1\n",
        )
        .unwrap();
        assert_eq!(
            check_matches(&rules, |scope, name| scope == Scope::Model && name == "gpt-4o"),
            Ok(())
        );
        assert_eq!(
            check_matches(&rules, |_, _| false),
            Err("rate_limits[1].match: no model named \"gpt-4o\" in the config".to_string())
        );
    }

    #[test]
    fn a_bad_redis_url_is_not_echoed() {
        let e = err("[rate_limit]\nbackend = \"redis\"\nredis_url = \"http://:hunter2@host\"");
        assert!(e.starts_with("rate_limit.redis_url: not a valid Redis URL"), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
    }
}
