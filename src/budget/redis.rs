//! The Redis backend: spend shared by every gateway on one Redis.
//!
//! Each budget's period is one hash, `{prefix}:budget:<name>:<bucket>:<start>`
//! (`<start>` the period's first local day as `YYYYMMDD`, or `total`), with
//! fields `spent` and `reserved` in integer micro-dollars and `t`, the
//! thresholds already crossed. It expires a day after its period ends, so a
//! reset is a new key, never a write that can be lost. `total` never expires.
//!
//! A request's operation (one admission phase) has its own key,
//! `{prefix}:budget:op:<id>`, `<id>` unique per process and call (never the
//! client's `x-request-id`, which a client could repeat to settle for free):
//! - `RESERVE` checks every budget and reserves in all of them or none, and
//!   writes the op key with the amount reserved. Run twice (a retry after a
//!   timeout), it changes nothing the second time.
//! - `SETTLE` gives the op's reservation back (if the op key says there was
//!   one: a reservation that timed out may or may not have run), adds the
//!   real cost to `spent`, and marks the op settled for `SETTLED_KEEP`. A
//!   replay finds the mark and changes nothing: a settle retried after a
//!   timeout never counts twice.
//!
//! Both return `spent` and `reserved` after the call, which the engine
//! mirrors for `/metrics` and `/admin/budgets`. Amounts go to `HINCRBY` as
//! the strings they came in: Lua 5.1 prints numbers above 10^14 as
//! `1e+14`, which `HINCRBY` refuses.

use redis::{RedisResult, Script};
use secrecy::SecretString;

use crate::ratelimit::backend::{escape, Connection};

/// An op key outlives any request (request_timeout is at most minutes):
/// it is deleted down to `SETTLED_KEEP` by the settle.
pub(crate) const RESERVED_KEEP_MS: u64 = 6 * 3600 * 1000;
/// How long a settled op is remembered, so that a replay is recognised.
/// Retries come within seconds (Redis is retried once a second while it is
/// down), and the memory is ~100 bytes per request: 30 MB at 1,000 req/s.
pub(crate) const SETTLED_KEEP_MS: u64 = 5 * 60 * 1000;

/// KEYS[1]: the op. KEYS[2..]: budget periods.
/// ARGV[1]: amount. ARGV[2]: op TTL (ms). Per budget j (1-based):
/// ARGV[2j+1]: cap (-1: never refuse), ARGV[2j+2]: expire-at (ms, 0: none).
/// Returns {1, spent_1, reserved_1, …} or {0, j, spent_j, reserved_j}.
const RESERVE: &str = r#"
local amount = tonumber(ARGV[1])
local out = {1}
if redis.call('EXISTS', KEYS[1]) == 1 then
  for i = 2, #KEYS do
    local v = redis.call('HMGET', KEYS[i], 'spent', 'reserved')
    out[#out + 1] = tonumber(v[1]) or 0
    out[#out + 1] = tonumber(v[2]) or 0
  end
  return out
end
for i = 2, #KEYS do
  local v = redis.call('HMGET', KEYS[i], 'spent', 'reserved')
  local spent = tonumber(v[1]) or 0
  local reserved = tonumber(v[2]) or 0
  local cap = tonumber(ARGV[2 * i - 1])
  if cap >= 0 and spent + reserved + amount > cap then
    return {0, i - 2, spent, reserved}
  end
  out[#out + 1] = spent
  out[#out + 1] = reserved + amount
end
for i = 2, #KEYS do
  redis.call('HINCRBY', KEYS[i], 'reserved', ARGV[1])
  local at = tonumber(ARGV[2 * i])
  if at > 0 then redis.call('PEXPIREAT', KEYS[i], at) end
end
redis.call('HSET', KEYS[1], 'r', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return out
"#;

/// KEYS[1]: the op. KEYS[2..]: budget periods.
/// ARGV[1]: the cost. ARGV[2]: how long the settled op is kept (ms).
/// Per budget j: ARGV[2j+1]: expire-at (ms, 0: none), ARGV[2j+2]: its
/// thresholds, comma-separated micro-dollars ("" for none).
/// Returns {0} for a replay, else {1, spent_1, reserved_1, crossed_1, …}
/// where crossed is the bit set of thresholds this call crossed.
const SETTLE: &str = r#"
if redis.call('HEXISTS', KEYS[1], 's') == 1 then return {0} end
local held = redis.call('HGET', KEYS[1], 'r')
local out = {1}
for i = 2, #KEYS do
  local k = KEYS[i]
  local reserved
  if held and held ~= '0' then
    reserved = redis.call('HINCRBY', k, 'reserved', '-' .. held)
  else
    reserved = tonumber(redis.call('HGET', k, 'reserved')) or 0
  end
  if reserved < 0 then
    redis.call('HSET', k, 'reserved', 0)
    reserved = 0
  end
  local spent = redis.call('HINCRBY', k, 'spent', ARGV[1])
  local at = tonumber(ARGV[2 * i - 1])
  if at > 0 then redis.call('PEXPIREAT', k, at) end
  local had = tonumber(redis.call('HGET', k, 't')) or 0
  local new, bit = 0, 1
  for t in string.gmatch(ARGV[2 * i], '[^,]+') do
    if spent >= tonumber(t) and had % (2 * bit) < bit then new = new + bit end
    bit = bit * 2
  end
  if new > 0 then redis.call('HSET', k, 't', had + new) end
  out[#out + 1] = spent
  out[#out + 1] = reserved
  out[#out + 1] = new
end
redis.call('HSET', KEYS[1], 's', 1)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return out
"#;

/// One budget period in Redis, as a call names it.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub key: String,
    /// -1: never refuse (`warn`).
    pub cap: i64,
    /// Unix ms, 0 for `total`.
    pub expire_at_ms: i64,
    /// Comma-separated micro-dollars.
    pub thresholds: String,
}

pub(crate) enum Reserved {
    /// `(spent, reserved)` per target, after the reservation.
    Admitted(Vec<(i64, i64)>),
    /// Target `index` refused, with its `(spent, reserved)`.
    Refused { index: usize, spent: i64, reserved: i64 },
}

/// After a settle: per target `(spent, reserved, newly crossed)`; `None`
/// for a replay.
pub(crate) type Settled = Option<Vec<(i64, i64, u32)>>;

pub(crate) struct RedisStore {
    conn: Connection,
    reserve: Script,
    settle: Script,
    prefix: String,
}

impl RedisStore {
    pub fn new(url: &SecretString, timeout: std::time::Duration, key_prefix: &str) -> Result<RedisStore, String> {
        Ok(RedisStore {
            conn: Connection::new(url, timeout, "budget.redis_url")?,
            reserve: Script::new(RESERVE),
            settle: Script::new(SETTLE),
            prefix: format!("{{{key_prefix}}}:budget:"),
        })
    }

    pub async fn ping(&self) -> RedisResult<()> {
        self.conn.ping().await
    }

    pub fn period_key(&self, budget: &str, bucket: &str, label: &str) -> String {
        format!("{}{}:{}:{label}", self.prefix, escape(budget), escape(bucket))
    }

    fn op_key(&self, op: &str) -> String {
        format!("{}op:{op}", self.prefix)
    }

    pub async fn reserve(&self, op: &str, targets: &[Target], amount: i64) -> RedisResult<Reserved> {
        let mut call = self.reserve.prepare_invoke();
        call.key(self.op_key(op)).arg(amount).arg(RESERVED_KEEP_MS);
        for t in targets {
            call.key(&t.key).arg(t.cap).arg(t.expire_at_ms);
        }
        let mut conn = self.conn.get().await?;
        let reply: Vec<i64> = call.invoke_async(&mut conn).await?;
        match reply.first() {
            Some(1) if reply.len() == 1 + 2 * targets.len() => {
                Ok(Reserved::Admitted(reply[1..].chunks(2).map(|c| (c[0], c[1])).collect()))
            }
            Some(0) if reply.len() == 4 => Ok(Reserved::Refused {
                index: usize::try_from(reply[1]).unwrap_or(0),
                spent: reply[2],
                reserved: reply[3],
            }),
            _ => Err(bad_reply("budget reserve")),
        }
    }

    pub async fn settle(&self, op: &str, targets: &[Target], cost: i64) -> RedisResult<Settled> {
        let mut call = self.settle.prepare_invoke();
        call.key(self.op_key(op)).arg(cost).arg(SETTLED_KEEP_MS);
        for t in targets {
            call.key(&t.key).arg(t.expire_at_ms).arg(&t.thresholds);
        }
        let mut conn = self.conn.get().await?;
        let reply: Vec<i64> = call.invoke_async(&mut conn).await?;
        match reply.first() {
            Some(0) if reply.len() == 1 => Ok(None),
            Some(1) if reply.len() == 1 + 3 * targets.len() => Ok(Some(
                reply[1..]
                    .chunks(3)
                    .map(|c| (c[0], c[1], u32::try_from(c[2]).unwrap_or(0)))
                    .collect(),
            )),
            _ => Err(bad_reply("budget settle")),
        }
    }

    /// `(spent, reserved)` of each key (0 for a key that does not exist).
    pub async fn read(&self, keys: &[String]) -> RedisResult<Vec<(i64, i64)>> {
        let mut pipe = redis::pipe();
        for k in keys {
            pipe.cmd("HMGET").arg(k).arg("spent").arg("reserved");
        }
        let mut conn = self.conn.get().await?;
        let rows: Vec<(Option<i64>, Option<i64>)> = pipe.query_async(&mut conn).await?;
        Ok(rows
            .into_iter()
            .map(|(s, r)| (s.unwrap_or(0), r.unwrap_or(0)))
            .collect())
    }
}

fn bad_reply(what: &'static str) -> redis::RedisError {
    redis::RedisError::from((redis::ErrorKind::TypeError, what, "unexpected reply".to_owned()))
}
