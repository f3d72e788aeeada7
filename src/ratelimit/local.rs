//! The local backend: in-process buckets, decided by `governor`.
//!
//! Each bucket (rule × key, model or upstream name) has one governor
//! `RateLimiter` per limit (requests, tokens). Two things governor does not
//! offer are added around it, through its own extension points:
//!
//! - **Giving a reservation back** (a later rule of the same request refused
//!   it, or `reconcile` found the token estimate too high) and **charging
//!   usage after the fact** (the estimate was too low). governor can only
//!   take. So the limiter's state lives in `Tat`, a `StateStore` that we
//!   share with it: governor makes every admission decision on it, and we
//!   only move its theoretical arrival time back (give back) or forward
//!   (charge) by `units × interval`, which is exactly what GCRA would have
//!   done had the request cost that much in the first place.
//! - **One instant per decision.** All rules of one request are decided at
//!   the same time, like the Redis script does with one `TIME`: the clock
//!   (`DecisionClock`) is set once per decision, under the store's lock. It
//!   counts `tokio::time::Instant` from the store's origin, so tests can run
//!   on paused time.
//!
//! All-or-nothing across rules: under the locks of the buckets involved,
//! take from each bucket in turn; when one refuses, give back what was
//! taken. Nobody can see the intermediate state, so N concurrent callers
//! against a limit of L admit exactly L.
//!
//! The buckets are spread over `SHARDS` shards by (rule, name), each with
//! its own lock and decision clock, so requests for different keys do not
//! queue on one mutex. A decision locks the shards of its buckets in index
//! order (no deadlock) and sets their clocks to one instant.

use std::collections::HashMap;
use std::num::{NonZeroU32, NonZeroU64};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::{NotKeyed, StateStore};
use governor::{Quota, RateLimiter};
use tokio::time::Instant;

use super::gcra::Gcra;
use super::{Charge, Kind, Outcome, RuleParams};

/// Once a rule has this many buckets (`PRUNE_AT / SHARDS` in one shard),
/// full ones (indistinguishable from new ones) are dropped. Bucket names come from config (keys, upstreams) or
/// configured models, so this is a guard, not the normal path.
const PRUNE_AT: usize = 1024;
/// Independent locks. More than the cores of any host relaygate runs on as
/// a sidecar; a bucket's shard is a hash of its rule and name.
const SHARDS: usize = 16;

/// The instant of the decision being made, in nanoseconds since the store's
/// origin.
#[derive(Clone, Default)]
struct DecisionClock(Arc<AtomicU64>);

impl Clock for DecisionClock {
    type Instant = Nanos;

    fn now(&self) -> Nanos {
        Nanos::from(self.0.load(Ordering::Acquire))
    }
}

/// governor's state for one limiter: the theoretical arrival time (TAT) in
/// nanoseconds since the limiter's start, 0 for "never used".
#[derive(Clone, Default)]
struct Tat(Arc<AtomicU64>);

impl StateStore for Tat {
    type Key = NotKeyed;

    fn measure_and_replace<T, F, E>(&self, _key: &NotKeyed, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        let mut prev = self.0.load(Ordering::Acquire);
        loop {
            let (out, next) = f(NonZeroU64::new(prev).map(|n| Nanos::from(n.get())))?;
            match self
                .0
                .compare_exchange_weak(prev, next.as_u64(), Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Ok(out),
                Err(current) => prev = current,
            }
        }
    }
}

impl Tat {
    fn update(&self, f: impl Fn(u64) -> u64) {
        let _ = self.0.fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| Some(f(t)));
    }
}

/// One limit of one bucket.
struct Cell {
    limiter: RateLimiter<NotKeyed, Tat, DecisionClock, NoOpMiddleware<Nanos>>,
    tat: Tat,
    /// The decision clock when the limiter was made: governor measures its
    /// TAT from there.
    start: u64,
    gcra: Gcra,
}

impl Cell {
    fn new(gcra: Gcra, clock: &DecisionClock, now: u64) -> Cell {
        // interval >= 1 ns and 1 <= capacity <= u32::MAX: see `Gcra` and config validation.
        let quota = Quota::with_period(Duration::from_nanos(gcra.interval))
            .unwrap_or(Quota::per_second(NonZeroU32::MAX))
            .allow_burst(NonZeroU32::new(gcra.capacity.min(u64::from(u32::MAX)) as u32).unwrap_or(NonZeroU32::MIN));
        let tat = Tat::default();
        Cell {
            limiter: RateLimiter::new(quota, tat.clone(), clock.clone()),
            tat,
            start: now,
            gcra,
        }
    }

    /// Now, as governor measures it for this limiter.
    fn t0(&self, now: u64) -> u64 {
        now.saturating_sub(self.start)
    }

    fn level(&self, now: u64) -> u64 {
        self.tat.0.load(Ordering::Acquire).saturating_sub(self.t0(now))
    }

    /// governor decides. `cost` is at most the capacity (`Gcra::reservable`).
    fn take(&self, cost: u64) -> bool {
        let Some(n) = NonZeroU32::new(cost.min(u64::from(u32::MAX)) as u32) else {
            return true;
        };
        matches!(self.limiter.check_n(n), Ok(Ok(())))
    }

    fn give_back(&self, units: u64) {
        let back = units.saturating_mul(self.gcra.interval);
        self.tat.update(|t| t.saturating_sub(back));
    }

    fn charge(&self, now: u64, units: u64) {
        let more = units.saturating_mul(self.gcra.interval);
        let t0 = self.t0(now);
        self.tat.update(|t| t.max(t0).saturating_add(more));
    }
}

#[derive(Default)]
struct Bucket {
    requests: Option<Cell>,
    tokens: Option<Cell>,
}

impl Bucket {
    fn cell(&self, kind: Kind) -> Option<&Cell> {
        match kind {
            Kind::Requests => self.requests.as_ref(),
            Kind::Tokens => self.tokens.as_ref(),
        }
    }

    fn is_full(&self, now: u64) -> bool {
        [&self.requests, &self.tokens]
            .into_iter()
            .flatten()
            .all(|c| c.level(now) == 0)
    }
}

struct State {
    /// Per rule: bucket name → bucket.
    buckets: Vec<HashMap<String, Bucket>>,
    prune_at: Vec<usize>,
}

struct Shard {
    /// The clock of this shard's cells, set under its lock.
    clock: DecisionClock,
    state: Mutex<State>,
}

pub(crate) struct LocalStore {
    origin: Instant,
    params: Vec<RuleParams>,
    shards: Box<[Shard]>,
}

/// The shards one decision holds: usually one (a request's buckets for one
/// rule share a shard), without allocating; else several, in index order.
enum Locked<'a> {
    One(MutexGuard<'a, State>),
    Many(Vec<(usize, MutexGuard<'a, State>)>),
}

impl Locked<'_> {
    fn state(&mut self, shard: usize) -> &mut State {
        match self {
            Locked::One(state) => state,
            Locked::Many(guards) => {
                let at = guards.iter().position(|(s, _)| *s == shard).expect("locked");
                &mut guards[at].1
            }
        }
    }

    fn get(&self, shard: usize) -> &State {
        match self {
            Locked::One(state) => state,
            Locked::Many(guards) => &guards.iter().find(|(s, _)| *s == shard).expect("locked").1,
        }
    }
}

impl LocalStore {
    pub fn new(params: Vec<RuleParams>) -> LocalStore {
        let n = params.len();
        let shard = || Shard {
            clock: DecisionClock::default(),
            state: Mutex::new(State {
                buckets: (0..n).map(|_| HashMap::new()).collect(),
                prune_at: vec![PRUNE_AT / SHARDS; n],
            }),
        };
        LocalStore {
            origin: Instant::now(),
            params,
            shards: (0..SHARDS).map(|_| shard()).collect(),
        }
    }

    pub fn params(&self) -> &[RuleParams] {
        &self.params
    }

    /// FNV-1a of the rule and the name: cheap, and the worst an adversarial
    /// name can do is share a shard, i.e. the single lock of old.
    fn shard_of(rule: usize, bucket: &str) -> usize {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in rule.to_le_bytes().iter().chain(bucket.as_bytes()) {
            h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
        (h % SHARDS as u64) as usize
    }

    /// Locks `shards` (in index order) and sets their clocks to now, read
    /// under the locks so each shard's clock only moves forward.
    fn lock(&self, shards: &[usize]) -> (Locked<'_>, u64) {
        // A panic while holding a lock leaves consistent atomics behind.
        let lock = |s: usize| self.shards[s].state.lock().unwrap_or_else(|p| p.into_inner());
        let now = || {
            let now = Instant::now().saturating_duration_since(self.origin).as_nanos();
            u64::try_from(now).unwrap_or(u64::MAX)
        };
        let first = shards.first().copied().unwrap_or(0);
        if shards.iter().all(|&s| s == first) {
            let guard = lock(first);
            let now = now();
            self.shards[first].clock.0.store(now, Ordering::Release);
            return (Locked::One(guard), now);
        }
        let mut order = shards.to_vec();
        order.sort_unstable();
        order.dedup();
        let guards: Vec<_> = order.iter().map(|&s| (s, lock(s))).collect();
        let now = now();
        for &s in &order {
            self.shards[s].clock.0.store(now, Ordering::Release);
        }
        (Locked::Many(guards), now)
    }

    /// Decides `charges` all or nothing. With `commit == false` only reads
    /// (the levels, and whether all would be admitted).
    pub fn decide(&self, charges: &[Charge], commit: bool) -> Outcome {
        // Each bucket's shard, hashed once per decision.
        let shards: Vec<usize> = charges.iter().map(|c| Self::shard_of(c.rule, &c.bucket)).collect();
        let (mut locked, now) = self.lock(&shards);
        for (c, &shard) in charges.iter().zip(&shards) {
            let Some(gcra) = self.params[c.rule].get(c.kind) else {
                continue;
            };
            let buckets = &mut locked.state(shard).buckets[c.rule];
            // No String per request for a bucket that exists.
            if !buckets.contains_key(&c.bucket) {
                buckets.insert(c.bucket.clone(), Bucket::default());
            }
            let bucket = buckets.get_mut(&c.bucket).expect("just inserted");
            let slot = match c.kind {
                Kind::Requests => &mut bucket.requests,
                Kind::Tokens => &mut bucket.tokens,
            };
            if slot.is_none() {
                *slot = Some(Cell::new(gcra, &self.shards[shard].clock, now));
            }
        }
        let cells: Vec<&Cell> = charges
            .iter()
            .zip(&shards)
            .filter_map(|(c, &shard)| {
                locked.get(shard).buckets[c.rule]
                    .get(&c.bucket)
                    .and_then(|b| b.cell(c.kind))
            })
            .collect();
        debug_assert_eq!(cells.len(), charges.len());
        let before: Vec<u64> = cells.iter().map(|c| c.level(now)).collect();
        let outcome = if !commit {
            let admitted = cells
                .iter()
                .zip(charges)
                .zip(&before)
                .all(|((cell, charge), &level)| cell.gcra.wait(level, charge.cost) == 0);
            Outcome {
                admitted,
                levels: before,
            }
        } else {
            let mut taken = 0;
            while taken < cells.len() && cells[taken].take(charges[taken].cost) {
                taken += 1;
            }
            if taken == cells.len() {
                Outcome {
                    admitted: true,
                    levels: cells.iter().map(|c| c.level(now)).collect(),
                }
            } else {
                for (cell, charge) in cells[..taken].iter().zip(charges) {
                    cell.give_back(charge.cost);
                }
                Outcome {
                    admitted: false,
                    levels: before,
                }
            }
        };
        drop(cells);
        for (c, &shard) in charges.iter().zip(&shards) {
            Self::prune(locked.state(shard), c.rule, now);
        }
        outcome
    }

    /// Moves token buckets by `delta` units: positive charges, negative gives back.
    pub fn adjust(&self, items: &[(usize, &str, i64)]) {
        for &(rule, bucket, delta) in items {
            let Some(gcra) = self.params[rule].tokens else {
                continue;
            };
            let shard = Self::shard_of(rule, bucket);
            let (mut locked, now) = self.lock(&[shard]);
            let buckets = &mut locked.state(shard).buckets[rule];
            if delta > 0 {
                let b = buckets.entry(bucket.to_owned()).or_default();
                b.tokens
                    .get_or_insert_with(|| Cell::new(gcra, &self.shards[shard].clock, now))
                    .charge(now, delta.unsigned_abs());
            } else if let Some(cell) = buckets.get(bucket).and_then(|b| b.tokens.as_ref()) {
                // A bucket that is gone was full: nothing to give back.
                cell.give_back(delta.unsigned_abs());
            }
        }
    }

    fn prune(state: &mut State, rule: usize, now: u64) {
        let len = state.buckets[rule].len();
        if len < state.prune_at[rule] {
            return;
        }
        state.buckets[rule].retain(|_, b| !b.is_full(now));
        state.prune_at[rule] = (state.buckets[rule].len() * 2).max(PRUNE_AT / SHARDS);
    }

    #[cfg(test)]
    fn bucket_count(&self, rule: usize) -> usize {
        self.shards
            .iter()
            .map(|s| s.state.lock().unwrap().buckets[rule].len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ratelimit::config::Limit;

    fn store(rpm: u32, burst: u32, tpm: Option<u32>) -> LocalStore {
        LocalStore::new(vec![RuleParams {
            requests: Some(Gcra::of(Limit {
                per_minute: rpm,
                capacity: burst,
            })),
            tokens: tpm.map(|t| {
                Gcra::of(Limit {
                    per_minute: t,
                    capacity: t,
                })
            }),
        }])
    }

    fn req(bucket: &str) -> Charge {
        Charge {
            rule: 0,
            bucket: bucket.into(),
            kind: Kind::Requests,
            cost: 1,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn governor_decides_and_levels_follow() {
        // 60 rpm, burst 3: one request a second.
        let s = store(60, 3, None);
        for i in 0..3 {
            let o = s.decide(&[req("a")], true);
            assert!(o.admitted, "request {i}");
            assert_eq!(o.levels, vec![(i + 1) * 1_000_000_000]);
        }
        let o = s.decide(&[req("a")], true);
        assert!(!o.admitted);
        assert_eq!(o.levels, vec![3_000_000_000]);
        // A peek changes nothing.
        assert!(!s.decide(&[req("a")], false).admitted);
        tokio::time::advance(Duration::from_millis(999)).await;
        assert!(!s.decide(&[req("a")], true).admitted);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(s.decide(&[req("a")], true).admitted);
        // Another bucket of the same rule is untouched.
        assert_eq!(s.decide(&[req("b")], true).levels, vec![1_000_000_000]);
    }

    #[tokio::test(start_paused = true)]
    async fn refused_charges_are_given_back() {
        let s = store(60, 2, Some(600));
        let tokens = |cost| Charge {
            rule: 0,
            bucket: "a".into(),
            kind: Kind::Tokens,
            cost,
        };
        // 500 of 600 tokens fit, the request too.
        assert!(s.decide(&[req("a"), tokens(500)], true).admitted);
        // 200 more tokens do not: the request taken first is given back.
        let o = s.decide(&[req("a"), tokens(200)], true);
        assert!(!o.admitted);
        assert_eq!(o.levels, vec![1_000_000_000, 50_000_000_000]);
        assert_eq!(s.decide(&[req("a")], false).levels, vec![1_000_000_000]);
        // Usage after the fact: 300 more than reserved, then 700 given back.
        s.adjust(&[(0, "a", 300)]);
        assert_eq!(s.decide(&[tokens(0)], false).levels, vec![80_000_000_000]);
        s.adjust(&[(0, "a", -700)]);
        assert_eq!(s.decide(&[tokens(0)], false).levels, vec![10_000_000_000]);
        // Giving back more than was taken cannot make room beyond the capacity.
        s.adjust(&[(0, "a", -10_000)]);
        assert_eq!(s.decide(&[tokens(0)], false).levels, vec![0]);
        assert!(s.decide(&[tokens(600)], true).admitted);
        assert!(!s.decide(&[tokens(1)], true).admitted);
    }

    #[tokio::test(start_paused = true)]
    async fn full_buckets_are_pruned() {
        let s = store(6000, 100, None);
        // Buckets of one shard, up to its pruning threshold.
        let per_shard = PRUNE_AT / SHARDS;
        let names: Vec<String> = (0..)
            .map(|i| format!("k{i}"))
            .filter(|n| LocalStore::shard_of(0, n) == 3)
            .take(per_shard)
            .collect();
        for name in &names[..per_shard - 1] {
            assert!(s.decide(&[req(name)], true).admitted);
        }
        assert_eq!(s.bucket_count(0), per_shard - 1);
        // All of them are full again after 10 ms; the next new bucket prunes.
        tokio::time::advance(Duration::from_millis(10)).await;
        assert!(s.decide(&[req(&names[per_shard - 1])], true).admitted);
        assert_eq!(s.bucket_count(0), 1);
    }

    /// Two rules whose buckets sit in different shards, decided from many
    /// threads in both orders: exact admission, and no deadlock.
    #[test]
    fn decisions_across_shards_are_exact() {
        let rule = |burst| RuleParams {
            requests: Some(Gcra::of(Limit {
                per_minute: 1,
                capacity: burst,
            })),
            tokens: None,
        };
        let s = LocalStore::new(vec![rule(50), rule(1_000_000)]);
        let key = "key-a".to_owned();
        let models: Vec<String> = (0..)
            .map(|i| format!("model-{i}"))
            .filter(|m| LocalStore::shard_of(1, m) != LocalStore::shard_of(0, &key))
            .take(8)
            .collect();
        let admitted = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|scope| {
            for (t, model) in models.iter().enumerate() {
                let (s, key, admitted) = (&s, &key, &admitted);
                scope.spawn(move || {
                    let charge = |rule, bucket: &str| Charge {
                        rule,
                        bucket: bucket.into(),
                        kind: Kind::Requests,
                        cost: 1,
                    };
                    for _ in 0..40 {
                        let mut charges = vec![charge(0, key), charge(1, model)];
                        if t % 2 == 1 {
                            charges.reverse();
                        }
                        if s.decide(&charges, true).admitted {
                            admitted.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert_eq!(admitted.into_inner(), 50, "the key's burst, exactly");
    }

    #[test]
    fn buckets_spread_over_the_shards() {
        let mut used = [0usize; SHARDS];
        for i in 0..1600 {
            used[LocalStore::shard_of(i % 3, &format!("key-{i}"))] += 1;
        }
        assert!(used.iter().all(|&n| (50..=150).contains(&n)), "{used:?}");
        assert_eq!(LocalStore::shard_of(1, "a"), LocalStore::shard_of(1, "a"));
    }
}
