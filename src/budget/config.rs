//! The budget config: the `[budget]` table and the `[[budgets]]` entries,
//! read raw (`deny_unknown_fields`, strings for enums) and validated here,
//! like `ratelimit::config`. Every error starts with its key path:
//! `budgets[1].period: unknown period "year" …`.

use std::collections::HashMap;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use super::period::{Period, Zone};
use crate::ratelimit::{Backend, FailMode, RateLimitSettings, Scope};

/// `[budget]`: where the spend is kept. Every field is optional; the Redis
/// ones default to `[rate_limit]`'s, so one Redis serves both.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBudgetSettings {
    /// `"local"` (default) or `"redis"`.
    pub backend: Option<String>,
    /// Default: `[rate_limit] redis_url`. A secret: never echoed.
    pub redis_url: Option<SecretString>,
    /// Default: `[rate_limit] fail_mode`.
    pub fail_mode: Option<String>,
    /// Default: `[rate_limit] expected_instances`.
    pub expected_instances: Option<u32>,
    /// Default: `[rate_limit] redis_timeout`.
    pub redis_timeout: Option<String>,
}

/// One `[[budgets]]` entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBudget {
    pub name: String,
    pub scope: String,
    #[serde(rename = "match")]
    pub r#match: Option<String>,
    pub usd: f64,
    pub period: String,
    pub timezone: Option<String>,
    pub on_exceed: Option<String>,
    pub warn_at: Option<Vec<f64>>,
}

/// The validated `[budget]` table.
#[derive(Debug, Clone)]
pub struct BudgetSettings {
    pub backend: Backend,
    pub fail_mode: FailMode,
    pub expected_instances: u32,
    pub redis_timeout: Duration,
    /// `[rate_limit] key_prefix`: keys are `{prefix}:budget:…`.
    pub key_prefix: String,
}

impl Default for BudgetSettings {
    fn default() -> Self {
        let r = RateLimitSettings::default();
        BudgetSettings {
            backend: Backend::Local,
            fail_mode: r.fail_mode,
            expected_instances: r.expected_instances,
            redis_timeout: r.redis_timeout,
            key_prefix: r.key_prefix,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnExceed {
    Reject,
    Warn,
}

/// A validated budget.
#[derive(Debug, Clone)]
pub struct Budget {
    /// Unique; a metric label and part of the Redis keys.
    pub name: String,
    pub scope: Scope,
    /// `Some`: that one key, model or upstream. `None`: each name has its
    /// own budget of `usd` (`global`: one for everything).
    pub matches: Option<String>,
    /// The cap in micro-dollars (`usd` × 10⁶, rounded).
    pub micros: i64,
    pub period: Period,
    pub zone: Zone,
    pub on_exceed: OnExceed,
    /// Fractions of the cap, ascending, each in (0, 1].
    pub warn_at: Vec<f64>,
}

impl Budget {
    /// The thresholds in micro-dollars, in `warn_at` order.
    pub fn thresholds(&self) -> impl Iterator<Item = i64> + '_ {
        self.warn_at.iter().map(|f| (self.micros as f64 * f).ceil() as i64)
    }
}

/// At most this many thresholds per budget: their crossed state is a bit set.
const MAX_THRESHOLDS: usize = 16;
/// A billion dollars: far above any budget, far below i64 micro-dollars.
const MAX_USD: f64 = 1e9;

/// Validates `[budget]` (defaults from the validated `[rate_limit]`) and
/// the `[[budgets]]` entries.
pub fn validate(
    raw: Option<RawBudgetSettings>,
    budgets: Vec<RawBudget>,
    rate_limit: &RateLimitSettings,
) -> Result<(BudgetSettings, Vec<Budget>), String> {
    let settings = validate_settings(raw.unwrap_or_default(), rate_limit)?;
    let mut out: Vec<Budget> = Vec::with_capacity(budgets.len());
    let mut names: HashMap<String, usize> = HashMap::new();
    for (i, raw) in budgets.into_iter().enumerate() {
        let path = format!("budgets[{i}]");
        let budget = validate_budget(&path, raw)?;
        if let Some(first) = names.insert(budget.name.clone(), i) {
            return Err(format!(
                "{path}.name: duplicate budget name {:?} (also budgets[{first}])",
                budget.name
            ));
        }
        out.push(budget);
    }
    Ok((settings, out))
}

/// Each budget's `match` must name a configured key, model or upstream.
pub fn check_matches(budgets: &[Budget], exists: impl Fn(Scope, &str) -> bool) -> Result<(), String> {
    crate::ratelimit::config::check_scope_matches(
        "budgets",
        budgets.iter().map(|b| (b.scope, b.matches.as_deref())),
        exists,
    )
}

fn validate_settings(raw: RawBudgetSettings, rate_limit: &RateLimitSettings) -> Result<BudgetSettings, String> {
    let backend = match raw.backend.as_deref().unwrap_or("local") {
        "local" => {
            if raw.redis_url.is_some() {
                return Err(
                    "budget.redis_url: set, but backend is \"local\" (set backend = \"redis\" or remove it)".into(),
                );
            }
            Backend::Local
        }
        "redis" => {
            let url = match (raw.redis_url, &rate_limit.backend) {
                (Some(url), _) => url,
                (None, Backend::Redis { url }) => url.clone(),
                (None, Backend::Local) => return Err(
                    "budget.redis_url: required with backend = \"redis\" (or set [rate_limit] redis_url to share it)"
                        .into(),
                ),
            };
            if redis::Client::open(url.expose_secret()).is_err() {
                return Err("budget.redis_url: not a valid Redis URL (expected redis://host:port, \
                            rediss://host:port or redis+unix:///path)"
                    .into());
            }
            Backend::Redis { url }
        }
        other => {
            return Err(format!(
                "budget.backend: unknown backend {other:?} (expected local or redis)"
            ))
        }
    };
    let fail_mode = match raw.fail_mode.as_deref() {
        None => rate_limit.fail_mode,
        Some("open") => FailMode::Open,
        Some("closed") => FailMode::Closed,
        Some(other) => {
            return Err(format!(
                "budget.fail_mode: unknown fail mode {other:?} (expected open or closed)"
            ))
        }
    };
    let expected_instances = raw.expected_instances.unwrap_or(rate_limit.expected_instances);
    if expected_instances == 0 {
        return Err("budget.expected_instances: must be at least 1".into());
    }
    let redis_timeout = match raw.redis_timeout {
        None => rate_limit.redis_timeout,
        Some(text) => match humantime::parse_duration(text.trim()) {
            Ok(d) if !d.is_zero() => d,
            Ok(_) => return Err("budget.redis_timeout: must be greater than zero".into()),
            Err(_) => {
                return Err(format!(
                    "budget.redis_timeout: invalid duration {text:?} (expected e.g. \"50ms\")"
                ))
            }
        },
    };
    Ok(BudgetSettings {
        backend,
        fail_mode,
        expected_instances,
        redis_timeout,
        key_prefix: rate_limit.key_prefix.clone(),
    })
}

fn validate_budget(path: &str, raw: RawBudget) -> Result<Budget, String> {
    let name = raw.name;
    let name_ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'));
    if !name_ok {
        return Err(format!(
            "{path}.name: invalid name {name:?} (1-64 characters of A-Z a-z 0-9 - _ . /)"
        ));
    }
    let scope = Scope::parse(&raw.scope).ok_or_else(|| {
        format!(
            "{path}.scope: unknown scope {:?} (expected key, model, upstream or global)",
            raw.scope
        )
    })?;
    let matches = match raw.r#match {
        Some(_) if scope == Scope::Global => {
            return Err(format!(
                "{path}.match: not allowed with scope \"global\" (a global budget is one for everything)"
            ))
        }
        Some(m) if m.is_empty() => return Err(format!("{path}.match: must not be empty")),
        m => m,
    };
    if !(raw.usd.is_finite() && raw.usd > 0.0 && raw.usd <= MAX_USD) {
        return Err(format!("{path}.usd: must be greater than 0 and at most {MAX_USD:e}"));
    }
    let micros = (raw.usd * 1e6).round() as i64;
    if micros == 0 {
        return Err(format!("{path}.usd: must be at least 0.000001"));
    }
    let period = Period::parse(&raw.period).ok_or_else(|| {
        format!(
            "{path}.period: unknown period {:?} (expected day, week, month or total)",
            raw.period
        )
    })?;
    let zone = match raw.timezone.as_deref() {
        None => Zone::UTC,
        Some(text) => Zone::parse(text).ok_or_else(|| {
            format!(
                "{path}.timezone: {text:?} is not a time zone (expected UTC, a fixed offset like \"+08:00\" \
                 or an IANA name like \"Europe/Paris\")"
            )
        })?,
    };
    let on_exceed = match raw.on_exceed.as_deref().unwrap_or("reject") {
        "reject" => OnExceed::Reject,
        "warn" => OnExceed::Warn,
        other => {
            return Err(format!(
                "{path}.on_exceed: unknown value {other:?} (expected reject or warn)"
            ))
        }
    };
    let warn_at = raw.warn_at.unwrap_or_else(|| vec![0.8, 0.95]);
    if warn_at.len() > MAX_THRESHOLDS {
        return Err(format!("{path}.warn_at: at most {MAX_THRESHOLDS} thresholds"));
    }
    if warn_at.iter().any(|f| !(f.is_finite() && *f > 0.0 && *f <= 1.0)) {
        return Err(format!("{path}.warn_at: each threshold must be in (0, 1]"));
    }
    if warn_at.windows(2).any(|w| w[0] >= w[1]) {
        return Err(format!("{path}.warn_at: thresholds must be ascending, without repeats"));
    }
    Ok(Budget {
        name,
        scope,
        matches,
        micros,
        period,
        zone,
        on_exceed,
        warn_at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct File {
        budget: Option<RawBudgetSettings>,
        #[serde(default)]
        budgets: Vec<RawBudget>,
    }

    fn parse(text: &str) -> Result<(BudgetSettings, Vec<Budget>), String> {
        let file: File = toml::from_str(text).map_err(|e| e.to_string())?;
        validate(file.budget, file.budgets, &RateLimitSettings::default())
    }

    #[test]
    fn the_issue_example_and_defaults() {
        let (s, b) = parse(
            r#"
            [[budgets]]
            name = "team-a"
            scope = "key"
            match = "app-a"
            usd = 50
            period = "month"
            timezone = "+08:00"
            on_exceed = "reject"
            warn_at = [0.8, 0.95]

            [[budgets]]
            name = "all"
            scope = "global"
            usd = 0.25
            period = "total"
            "#,
        )
        .unwrap();
        assert!(matches!(s.backend, Backend::Local));
        assert_eq!(s.fail_mode, FailMode::Open);
        assert_eq!(b[0].micros, 50_000_000);
        assert_eq!(b[0].zone, Zone::parse("+08:00").unwrap());
        assert_eq!(b[0].thresholds().collect::<Vec<_>>(), [40_000_000, 47_500_000]);
        assert_eq!(
            (b[1].micros, b[1].period, b[1].on_exceed),
            (250_000, Period::Total, OnExceed::Reject)
        );
        assert_eq!(b[1].warn_at, [0.8, 0.95]);
        assert_eq!(b[1].zone, Zone::UTC);
    }

    #[test]
    fn redis_settings_default_to_the_rate_limiters() {
        let file: File = toml::from_str("[budget]\nbackend = \"redis\"").unwrap();
        let rl = RateLimitSettings {
            backend: Backend::Redis {
                url: SecretString::from("redis://:hunter2@127.0.0.1:1"),
            },
            fail_mode: FailMode::Closed,
            expected_instances: 3,
            ..RateLimitSettings::default()
        };
        let (s, _) = validate(file.budget, file.budgets, &rl).unwrap();
        assert!(matches!(s.backend, Backend::Redis { .. }));
        assert_eq!((s.fail_mode, s.expected_instances), (FailMode::Closed, 3));
        assert!(!format!("{s:?}").contains("hunter2"));
    }

    #[test]
    fn errors_name_the_key_path() {
        let one =
            |extra: &str| format!("[[budgets]]\nname = \"b\"\nscope = \"key\"\nusd = 1\nperiod = \"day\"\n{extra}");
        let cases = [
            (
                one("timezone = \"Mars/Olympus\""),
                "budgets[0].timezone: \"Mars/Olympus\" is not a time zone (expected UTC, a fixed offset",
            ),
            (
                one("on_exceed = \"shout\""),
                "budgets[0].on_exceed: unknown value \"shout\"",
            ),
            (
                one("warn_at = [0.9, 0.5]"),
                "budgets[0].warn_at: thresholds must be ascending",
            ),
            (
                one("warn_at = [1.5]"),
                "budgets[0].warn_at: each threshold must be in (0, 1]",
            ),
            (one("match = \"\""), "budgets[0].match: must not be empty"),
            (
                one("").replace("usd = 1", "usd = 0"),
                "budgets[0].usd: must be greater than 0",
            ),
            (
                one("").replace("usd = 1", "usd = -3"),
                "budgets[0].usd: must be greater than 0",
            ),
            (
                one("").replace("\"day\"", "\"year\""),
                "budgets[0].period: unknown period \"year\"",
            ),
            (
                one("").replace("\"key\"", "\"team\""),
                "budgets[0].scope: unknown scope \"team\"",
            ),
            (
                one("").replace("name = \"b\"", "name = \"a b\""),
                "budgets[0].name: invalid name \"a b\"",
            ),
            (
                format!("{}{}", one(""), one("")),
                "budgets[1].name: duplicate budget name \"b\" (also budgets[0])",
            ),
            (
                "[[budgets]]\nname = \"g\"\nscope = \"global\"\nmatch = \"x\"\nusd = 1\nperiod = \"day\"".into(),
                "budgets[0].match: not allowed with scope \"global\"",
            ),
            (
                "[budget]\nbackend = \"redis\"".into(),
                "budget.redis_url: required with backend = \"redis\"",
            ),
            (
                "[budget]\nbackend = \"disk\"".into(),
                "budget.backend: unknown backend \"disk\"",
            ),
            (
                "[budget]\nfail_mode = \"ajar\"".into(),
                "budget.fail_mode: unknown fail mode \"ajar\"",
            ),
            (
                "[budget]\nexpected_instances = 0".into(),
                "budget.expected_instances: must be at least 1",
            ),
            (
                "[budget]\nredis_timeout = \"0s\"".into(),
                "budget.redis_timeout: must be greater than zero",
            ),
            (
                "[budget]\nredis_url = \"redis://x:1\"".into(),
                "budget.redis_url: set, but backend is \"local\"",
            ),
        ];
        for (text, want) in cases {
            let got = parse(&text).expect_err(&text);
            assert!(got.starts_with(want), "for\n{text}\nwant {want:?}\ngot  {got:?}");
        }
        let e = parse("[budget]\nbackend = \"redis\"\nredis_url = \"http://:hunter2@x\"").unwrap_err();
        assert!(
            e.starts_with("budget.redis_url: not a valid Redis URL") && !e.contains("hunter2"),
            "{e}"
        );
        assert!(parse(&one("cap = 1")).unwrap_err().contains("unknown field `cap`"));
    }

    #[test]
    fn matches_are_checked() {
        let (_, b) =
            parse("[[budgets]]\nname = \"m\"\nscope = \"model\"\nmatch = \"gpt\"\nusd = 1\nperiod = \"day\"").unwrap();
        assert_eq!(check_matches(&b, |s, n| s == Scope::Model && n == "gpt"), Ok(()));
        assert_eq!(
            check_matches(&b, |_, _| false),
            Err("budgets[0].match: no model named \"gpt\" in the config".into())
        );
    }
}
