//! GCRA arithmetic shared by both backends, and the `x-ratelimit-*` headers.
//!
//! A bucket is described by its *level*: how long until it is full again
//! (the theoretical arrival time minus now, never negative). One unit (a
//! request, a token) adds `interval` to the level; the bucket admits a cost
//! `n` while `level + n × interval <= capacity × interval` (the window).
//! The decisions themselves are made by `governor` (local) or by the Lua
//! script (Redis); this module only reads levels back into numbers.

use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};

use super::config::Limit;

/// One limit as GCRA parameters, in nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Gcra {
    /// As configured, for `x-ratelimit-limit-*`.
    pub per_minute: u64,
    /// Time for one unit to refill: 60 s / per_minute.
    pub interval: u64,
    /// Units the bucket holds.
    pub capacity: u64,
}

const MINUTE_NANOS: u64 = 60_000_000_000;

impl Gcra {
    pub fn of(limit: Limit) -> Gcra {
        Gcra {
            per_minute: u64::from(limit.per_minute),
            interval: (MINUTE_NANOS / u64::from(limit.per_minute)).max(1),
            capacity: u64::from(limit.capacity),
        }
    }

    /// The share of one of `instances` replicas: the same burst spread over
    /// them, refilling `instances` times slower.
    pub fn divided(self, instances: u32) -> Gcra {
        let n = u64::from(instances.max(1));
        Gcra {
            per_minute: (self.per_minute / n).max(1),
            interval: self.interval.saturating_mul(n),
            capacity: (self.capacity / n).max(1),
        }
    }

    pub fn window(&self) -> u64 {
        self.interval.saturating_mul(self.capacity)
    }

    /// What a cost reserves: a cost larger than the whole bucket reserves the
    /// whole bucket (it waits for a full bucket rather than never fitting).
    pub fn reservable(&self, cost: u64) -> u64 {
        cost.min(self.capacity)
    }

    /// Units that could be taken now at this level.
    pub fn remaining(&self, level: u64) -> u64 {
        self.window().saturating_sub(level) / self.interval
    }

    /// How long until `cost` units fit, at this level.
    pub fn wait(&self, level: u64, cost: u64) -> u64 {
        level
            .saturating_add(cost.saturating_mul(self.interval))
            .saturating_sub(self.window())
    }
}

/// The numbers behind one family of headers (`-requests` or `-tokens`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Dim {
    pub limit: u64,
    pub remaining: u64,
    /// Until the bucket is full again.
    pub reset: Duration,
}

impl Dim {
    pub fn of(gcra: &Gcra, level: u64) -> Dim {
        Dim {
            limit: gcra.per_minute,
            remaining: gcra.remaining(level),
            reset: Duration::from_nanos(level),
        }
    }

    /// The tighter of two: fewer remaining, then the later reset.
    pub fn tighter(a: Option<Dim>, b: Option<Dim>) -> Option<Dim> {
        match (a, b) {
            (Some(a), Some(b)) => Some(
                if (b.remaining, std::cmp::Reverse(b.reset)) < (a.remaining, std::cmp::Reverse(a.reset)) {
                    b
                } else {
                    a
                },
            ),
            (a, None) => a,
            (None, b) => b,
        }
    }
}

/// The header numbers of an admission or rejection: for each family, the
/// tightest of the buckets involved (which may be two different rules).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Info {
    pub requests: Option<Dim>,
    pub tokens: Option<Dim>,
}

impl Info {
    pub fn merge(self, other: Info) -> Info {
        Info {
            requests: Dim::tighter(self.requests, other.requests),
            tokens: Dim::tighter(self.tokens, other.tokens),
        }
    }

    /// Names from constants and numbers through `HeaderValue::from(u64)`:
    /// this runs on every admitted request (with `format!`s it was 5 % of the
    /// instructions per request).
    pub fn write(&self, headers: &mut HeaderMap) {
        const NAMES: [[HeaderName; 3]; 2] = [
            [
                HeaderName::from_static("x-ratelimit-limit-requests"),
                HeaderName::from_static("x-ratelimit-remaining-requests"),
                HeaderName::from_static("x-ratelimit-reset-requests"),
            ],
            [
                HeaderName::from_static("x-ratelimit-limit-tokens"),
                HeaderName::from_static("x-ratelimit-remaining-tokens"),
                HeaderName::from_static("x-ratelimit-reset-tokens"),
            ],
        ];
        for (dim, [limit, remaining, reset]) in [self.requests, self.tokens].into_iter().zip(NAMES) {
            let Some(dim) = dim else { continue };
            headers.insert(limit, HeaderValue::from(dim.limit));
            headers.insert(remaining, HeaderValue::from(dim.remaining));
            if let Ok(value) = HeaderValue::try_from(go_duration(dim.reset)) {
                headers.insert(reset, value);
            }
        }
    }
}

/// `Retry-After` in whole seconds: rounded up, at least 1 (0 would invite an
/// immediate retry that is refused again).
pub(crate) fn retry_after_secs(wait: Duration) -> u64 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.max(1)
}

/// A duration as OpenAI writes `x-ratelimit-reset-*` (Go's
/// `time.Duration.String`, to the millisecond): `"0s"`, `"250ms"`, `"1s"`,
/// `"1.5s"`, `"6m0s"`, `"1h2m3s"`. Rounded up, so a client that waits this
/// long finds the capacity.
pub(crate) fn go_duration(d: Duration) -> String {
    // Runs on every admitted request (the reset header): numbers through
    // itoa into one small string, no `format!`.
    let ms = d.as_nanos().div_ceil(1_000_000);
    let mut out = String::with_capacity(16);
    let mut push = |n: u128, unit: &str| {
        out.push_str(itoa::Buffer::new().format(n));
        out.push_str(unit);
    };
    if ms < 1000 {
        push(ms, if ms == 0 { "s" } else { "ms" });
        return out;
    }
    let (h, rest) = (ms / 3_600_000, ms % 3_600_000);
    let (m, rest) = (rest / 60_000, rest % 60_000);
    let (s, frac) = (rest / 1000, rest % 1000);
    if h > 0 {
        push(h, "h");
    }
    if h > 0 || m > 0 {
        push(m, "m");
    }
    if frac == 0 {
        push(s, "s");
    } else {
        push(s, ".");
        // Milliseconds as three digits, trailing zeros dropped: 1.02s, 1.5s.
        let digits = [frac / 100, frac / 10 % 10, frac % 10];
        let keep = if digits[2] != 0 {
            3
        } else if digits[1] != 0 {
            2
        } else {
            1
        };
        for d in &digits[..keep] {
            out.push(char::from(b'0' + *d as u8));
        }
        out.push('s');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations() {
        let ms = Duration::from_millis;
        assert_eq!(go_duration(Duration::ZERO), "0s");
        assert_eq!(go_duration(Duration::from_nanos(1)), "1ms");
        assert_eq!(go_duration(ms(250)), "250ms");
        assert_eq!(go_duration(ms(1000)), "1s");
        assert_eq!(go_duration(ms(1500)), "1.5s");
        assert_eq!(go_duration(ms(1_020)), "1.02s");
        assert_eq!(go_duration(ms(1_007)), "1.007s");
        assert_eq!(go_duration(ms(999)), "999ms");
        assert_eq!(go_duration(ms(61_250)), "1m1.25s");
        assert_eq!(go_duration(ms(360_000)), "6m0s");
        assert_eq!(go_duration(ms(3_723_000)), "1h2m3s");
        assert_eq!(go_duration(ms(3_600_000)), "1h0m0s");
    }

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(2)), 2);
        assert_eq!(retry_after_secs(Duration::from_millis(2001)), 3);
    }

    #[test]
    fn levels_to_numbers() {
        // 600 rpm, burst 50: 100 ms per request, a 5 s window.
        let g = Gcra::of(Limit {
            per_minute: 600,
            capacity: 50,
        });
        assert_eq!(g.interval, 100_000_000);
        assert_eq!(g.remaining(0), 50);
        assert_eq!(g.remaining(g.window()), 0);
        assert_eq!(g.remaining(g.window() + 1), 0);
        assert_eq!(g.wait(g.window(), 1), 100_000_000);
        assert_eq!(g.wait(0, 50), 0);
        assert_eq!(g.reservable(70), 50);
        let d = g.divided(3);
        assert_eq!((d.interval, d.capacity, d.per_minute), (300_000_000, 16, 200));
    }
}
