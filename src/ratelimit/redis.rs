//! The Redis backend: the same GCRA buckets, shared by every gateway that
//! uses the same Redis and `key_prefix`.
//!
//! One call (all the buckets one request touches) is one Lua script, so it
//! is atomic: it reads every bucket, and writes all of them only when all
//! admit. Time is Redis's `TIME`, read inside the script, so gateways with
//! skewed clocks still agree. The script is sent with EVALSHA and falls back
//! to EVAL on NOSCRIPT (a restarted or flushed Redis): the `redis` crate's
//! `Script` does that.
//!
//! Keys: `{<key_prefix>}:<rule>:<bucket>:r` (requests) and `…:t` (tokens),
//! rule and bucket names with `%` and `:` escaped. The braces are a Redis
//! Cluster hash tag: every key of one call lives in one slot, which a
//! multi-key script needs. Each key holds a TAT and expires when its bucket
//! would be full again, which is the same as the key being absent.
//!
//! This module does not bound its calls: the engine wraps each one in
//! `redis_timeout` and handles failures (`Health`, the fallback).

use redis::{RedisResult, Script};
use secrecy::SecretString;

use super::backend::{escape, Connection};
use super::config::{RateLimitSettings, Rule};
use super::gcra::Gcra;
use super::{Charge, Kind, Outcome, RuleParams};

/// All buckets of one call, all or nothing. Returns `{admitted, level_1, …}`
/// where a level is microseconds until that bucket is full again: after
/// the commit when admitted, as found otherwise.
///
/// KEYS[i]: bucket i. ARGV[1]: "1" to commit, "0" to only read.
/// ARGV[3i-1], ARGV[3i], ARGV[3i+1]: bucket i's interval (µs per unit,
/// may be fractional), capacity (units) and cost (units).
const ADMIT: &str = r#"
local t = redis.call('TIME')
-- Microseconds since 2023-11-14: small enough that a double keeps
-- sub-microsecond precision.
local now = (tonumber(t[1]) - 1700000000) * 1000000 + tonumber(t[2])
local base = {}
local admit = true
for i = 1, #KEYS do
  local interval = tonumber(ARGV[3 * i - 1])
  local capacity = tonumber(ARGV[3 * i])
  local cost = tonumber(ARGV[3 * i + 1])
  local tat = tonumber(redis.call('GET', KEYS[i])) or now
  if tat < now then tat = now end
  base[i] = tat
  if tat + cost * interval - now > interval * capacity then admit = false end
end
local out = {admit and 1 or 0}
for i = 1, #KEYS do
  local level = base[i]
  if admit and ARGV[1] == '1' then
    level = base[i] + tonumber(ARGV[3 * i + 1]) * tonumber(ARGV[3 * i - 1])
    if level > now then
      redis.call('SET', KEYS[i], string.format('%.17g', level), 'PX', math.ceil((level - now) / 1000) + 1000)
    end
  end
  out[i + 1] = math.ceil(level - now)
end
return out
"#;

/// Moves buckets by a signed number of units after the fact (`reconcile`):
/// positive charges, negative gives back; never below "full".
///
/// KEYS[i]: bucket i. ARGV[2i-1], ARGV[2i]: its interval (µs) and the delta (units).
const ADJUST: &str = r#"
local t = redis.call('TIME')
local now = (tonumber(t[1]) - 1700000000) * 1000000 + tonumber(t[2])
for i = 1, #KEYS do
  local tat = tonumber(redis.call('GET', KEYS[i])) or now
  if tat < now then tat = now end
  local level = tat + tonumber(ARGV[2 * i]) * tonumber(ARGV[2 * i - 1])
  if level > now then
    redis.call('SET', KEYS[i], string.format('%.17g', level), 'PX', math.ceil((level - now) / 1000) + 1000)
  else
    redis.call('DEL', KEYS[i])
  end
end
return 1
"#;

pub(crate) struct RedisStore {
    conn: Connection,
    admit: Script,
    adjust: Script,
    prefix: String,
    rule_names: Vec<String>,
    params: Vec<RuleParams>,
}

impl RedisStore {
    pub fn new(
        url: &SecretString,
        settings: &RateLimitSettings,
        rules: &[Rule],
        params: Vec<RuleParams>,
    ) -> Result<RedisStore, String> {
        Ok(RedisStore {
            conn: Connection::new(url, settings.redis_timeout, "rate_limit.redis_url")?,
            admit: Script::new(ADMIT),
            adjust: Script::new(ADJUST),
            prefix: settings.key_prefix.clone(),
            rule_names: rules.iter().map(|r| escape(&r.name)).collect(),
            params,
        })
    }

    pub fn params(&self) -> &[RuleParams] {
        &self.params
    }

    pub async fn ping(&self) -> RedisResult<()> {
        self.conn.ping().await
    }

    fn key(&self, rule: usize, bucket: &str, kind: Kind) -> String {
        let kind = match kind {
            Kind::Requests => "r",
            Kind::Tokens => "t",
        };
        format!(
            "{{{}}}:{}:{}:{kind}",
            self.prefix,
            self.rule_names[rule],
            escape(bucket)
        )
    }

    fn gcra(&self, rule: usize, kind: Kind) -> Option<Gcra> {
        self.params[rule].get(kind)
    }

    pub async fn decide(&self, charges: &[Charge], commit: bool) -> RedisResult<Outcome> {
        let mut invocation = self.admit.prepare_invoke();
        invocation.arg(if commit { "1" } else { "0" });
        for c in charges {
            let gcra = self.gcra(c.rule, c.kind).unwrap_or(Gcra {
                per_minute: 1,
                interval: 1,
                capacity: 1,
            });
            invocation
                .key(self.key(c.rule, &c.bucket, c.kind))
                .arg(micros(gcra.interval))
                .arg(gcra.capacity)
                .arg(c.cost);
        }
        let mut conn = self.conn.get().await?;
        let reply: Vec<i64> = invocation.invoke_async(&mut conn).await?;
        if reply.len() != charges.len() + 1 {
            return Err(redis::RedisError::from((
                redis::ErrorKind::TypeError,
                "rate limit script: unexpected reply length",
            )));
        }
        Ok(Outcome {
            admitted: reply[0] == 1,
            levels: reply[1..]
                .iter()
                .map(|&us| u64::try_from(us).unwrap_or(0).saturating_mul(1000))
                .collect(),
        })
    }

    /// Token buckets only: `(rule, bucket, delta units)`.
    pub async fn adjust(&self, items: &[(usize, &str, i64)]) -> RedisResult<()> {
        let mut invocation = self.adjust.prepare_invoke();
        let mut any = false;
        for &(rule, bucket, delta) in items {
            let Some(gcra) = self.gcra(rule, Kind::Tokens) else {
                continue;
            };
            any = true;
            invocation
                .key(self.key(rule, bucket, Kind::Tokens))
                .arg(micros(gcra.interval))
                .arg(delta);
        }
        if !any {
            return Ok(());
        }
        let mut conn = self.conn.get().await?;
        invocation.invoke_async::<i64>(&mut conn).await.map(drop)
    }
}

/// Nanoseconds as (possibly fractional) microseconds for the script.
fn micros(nanos: u64) -> String {
    if nanos % 1000 == 0 {
        (nanos / 1000).to_string()
    } else {
        format!("{}.{:03}", nanos / 1000, nanos % 1000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_escaped_and_intervals_sent_in_micros() {
        assert_eq!(escape("a:b%c"), "a%3Ab%25c");
        assert_eq!(micros(6_000_000_000), "6000000");
        assert_eq!(micros(8_571_428_571), "8571428.571");
        assert_eq!(micros(60), "0.060");
    }
}
