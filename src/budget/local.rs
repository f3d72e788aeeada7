//! Spend in this process: one `Bucket` per budget and name (the matched
//! key, model or upstream; `*` for global), each holding its current period.
//!
//! No lock on the request path. A period's state is three atomics: `used`
//! (spent + reserved, what admission checks), `spent`, and the thresholds
//! already crossed (a bit set). Admission is a compare-and-swap loop on
//! `used` per budget, in budget order; if a later budget refuses, the
//! earlier reservations are subtracted again. In that window (a few
//! nanoseconds) a concurrent request may be refused by an earlier budget
//! that would have had room: the error is on the safe side, and no budget
//! is ever over-admitted. N concurrent requests against a cap worth K of
//! them get exactly K.
//!
//! A new period is a new `PeriodState` swapped in (`ArcSwap`), not a reset
//! that could race with a write. A reservation keeps the `Arc` of the
//! period it reserved in, so a request that straddles midnight is settled
//! in the period it started in (the Redis backend does the same: its keys
//! are named by period).

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use super::config::{Budget, OnExceed};
use super::fixed_bucket;
use super::period::Bounds;

pub(crate) struct PeriodState {
    pub bounds: Bounds,
    /// Spent + reserved, micro-dollars.
    pub used: AtomicI64,
    pub spent: AtomicI64,
    /// Bit i: `warn_at[i]` crossed in this period.
    pub crossed: AtomicU32,
}

impl PeriodState {
    fn new(bounds: Bounds) -> PeriodState {
        PeriodState {
            bounds,
            used: AtomicI64::new(0),
            spent: AtomicI64::new(0),
            crossed: AtomicU32::new(0),
        }
    }

    pub fn spent(&self) -> i64 {
        self.spent.load(Ordering::Acquire)
    }

    pub fn reserved(&self) -> i64 {
        (self.used.load(Ordering::Acquire) - self.spent()).max(0)
    }
}

pub(crate) struct Bucket {
    current: ArcSwap<PeriodState>,
}

impl Bucket {
    fn new(bounds: Bounds) -> Bucket {
        Bucket {
            current: ArcSwap::from_pointee(PeriodState::new(bounds)),
        }
    }

    /// The state of the period `bounds`, swapping in a fresh one when the
    /// bucket still holds an older period. A period older than the one held
    /// (a clock stepped back) gets the held one: spend is never forgotten.
    pub fn period(&self, bounds: Bounds) -> Arc<PeriodState> {
        loop {
            let cur = self.current.load_full();
            if cur.bounds.start >= bounds.start {
                return cur;
            }
            let fresh = Arc::new(PeriodState::new(bounds));
            let prev = self.current.compare_and_swap(&cur, fresh.clone());
            if Arc::ptr_eq(&prev, &cur) {
                return fresh;
            }
        }
    }

    /// The period holding `now`: on the request path one load and two
    /// compares, the bounds computed (`bounds`) only when the held period
    /// has ended, once per bucket and period.
    pub fn at(&self, now: i64, bounds: impl FnOnce() -> Bounds) -> Arc<PeriodState> {
        let cur = self.current.load_full();
        if cur.bounds.contains(now) {
            return cur;
        }
        drop(cur);
        self.period(bounds())
    }

    /// The held period if it is `bounds`' (for reports: an older one means
    /// nothing was spent in this period yet).
    pub fn peek(&self, bounds: Bounds) -> Option<Arc<PeriodState>> {
        let cur = self.current.load_full();
        (cur.bounds.start >= bounds.start).then_some(cur)
    }
}

/// One budget's buckets in one store, with the cap this store enforces.
pub(crate) struct Slot {
    pub cap: i64,
    pub enforce: bool,
    /// `warn_at` in micro-dollars, computed once.
    pub thresholds: Box<[i64]>,
    /// The one bucket of a budget with `match` (or a global one), found
    /// without hashing its name; also in `buckets`.
    fixed: Option<(Box<str>, Arc<Bucket>)>,
    /// Name → bucket. Read without a lock; a name not seen before (a new
    /// key after a reload) is added under `grow`, copy-on-write.
    buckets: ArcSwap<HashMap<Box<str>, Arc<Bucket>>>,
    grow: Mutex<()>,
}

impl Slot {
    pub fn bucket(&self, name: &str, bounds: impl FnOnce() -> Bounds) -> Arc<Bucket> {
        if let Some((fixed, b)) = &self.fixed {
            if **fixed == *name {
                return b.clone();
            }
        }
        if let Some(b) = self.buckets.load().get(name) {
            return b.clone();
        }
        let _guard = self.grow.lock().unwrap_or_else(|p| p.into_inner());
        let map = self.buckets.load();
        if let Some(b) = map.get(name) {
            return b.clone();
        }
        let bucket = Arc::new(Bucket::new(bounds()));
        let mut next = HashMap::clone(&map);
        next.insert(name.into(), bucket.clone());
        self.buckets.store(Arc::new(next));
        bucket
    }

    /// Every bucket, by name.
    pub fn buckets(&self) -> Vec<(String, Arc<Bucket>)> {
        let mut out: Vec<_> = self
            .buckets
            .load()
            .iter()
            .map(|(n, b)| (n.to_string(), b.clone()))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}

/// What one request holds in one budget's period.
#[derive(Clone)]
pub(crate) struct Held {
    pub budget: usize,
    pub period: Arc<PeriodState>,
}

pub(crate) struct LocalStore {
    pub slots: Vec<Slot>,
}

impl LocalStore {
    /// `divide`: the fallback's share (`usd / expected_instances`).
    pub fn new(budgets: &[Budget], divide: u32) -> LocalStore {
        LocalStore {
            slots: budgets
                .iter()
                .map(|b| {
                    // Its first period starts with the first request (no
                    // instant is in an empty range).
                    let fixed = fixed_bucket(b).map(|name| {
                        let empty = Bounds {
                            start: i64::MIN,
                            end: i64::MIN,
                        };
                        (Box::from(name), Arc::new(Bucket::new(empty)))
                    });
                    let buckets: HashMap<Box<str>, Arc<Bucket>> = fixed.iter().cloned().collect();
                    Slot {
                        cap: b.micros / i64::from(divide.max(1)),
                        enforce: b.on_exceed == OnExceed::Reject,
                        thresholds: b.thresholds().collect(),
                        fixed,
                        buckets: ArcSwap::from_pointee(buckets),
                        grow: Mutex::new(()),
                    }
                })
                .collect(),
        }
    }

    /// Reserves `amount` in every period of `targets` (budget index, its
    /// period), all or nothing. `Err(i)`: `targets[i]` refused (nothing is
    /// reserved anywhere).
    pub fn reserve(&self, targets: &[Held], amount: i64) -> Result<(), usize> {
        for (i, t) in targets.iter().enumerate() {
            let slot = &self.slots[t.budget];
            let used = &t.period.used;
            if !slot.enforce {
                used.fetch_add(amount, Ordering::AcqRel);
                continue;
            }
            let mut seen = used.load(Ordering::Acquire);
            loop {
                if seen.saturating_add(amount) > slot.cap {
                    for done in &targets[..i] {
                        done.period.used.fetch_sub(amount, Ordering::AcqRel);
                    }
                    return Err(i);
                }
                match used.compare_exchange_weak(seen, seen + amount, Ordering::AcqRel, Ordering::Acquire) {
                    Ok(_) => break,
                    Err(now) => seen = now,
                }
            }
        }
        Ok(())
    }

    /// Replaces `reserved` with `actual` in each held period.
    pub fn settle(held: &[Held], reserved: i64, actual: i64) {
        for h in held {
            h.period.used.fetch_add(actual - reserved, Ordering::AcqRel);
            h.period.spent.fetch_add(actual, Ordering::AcqRel);
        }
    }
}

/// The `thresholds` (a budget's, in micro-dollars) that `spent` has
/// reached and `crossed` did not hold yet; marks them. Bit i is `warn_at[i]`.
pub(crate) fn cross(thresholds: &[i64], crossed: &AtomicU32, spent: i64) -> u32 {
    let mut reached = 0u32;
    for (i, &t) in thresholds.iter().enumerate() {
        if spent >= t {
            reached |= 1 << i;
        }
    }
    if reached == 0 {
        return 0;
    }
    let before = crossed.fetch_or(reached, Ordering::AcqRel);
    reached & !before
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::period::{Period, Zone};
    use crate::ratelimit::Scope;

    fn budget(micros: i64, on_exceed: OnExceed) -> Budget {
        Budget {
            name: "b".into(),
            scope: Scope::Global,
            matches: None,
            micros,
            period: Period::Day,
            zone: Zone::UTC,
            on_exceed,
            warn_at: vec![0.5, 1.0],
        }
    }

    #[test]
    fn concurrent_reservations_admit_exactly_the_cap() {
        let budgets = [budget(10_000, OnExceed::Reject), budget(1_000_000, OnExceed::Reject)];
        let store = Arc::new(LocalStore::new(&budgets, 1));
        let bounds = Bounds { start: 0, end: 86_400 };
        let admitted = Arc::new(AtomicI64::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (store, admitted) = (store.clone(), admitted.clone());
                std::thread::spawn(move || {
                    for _ in 0..50 {
                        let held: Vec<Held> = (0..2)
                            .map(|b| Held {
                                budget: b,
                                period: store.slots[b].bucket("*", || bounds).period(bounds),
                            })
                            .collect();
                        if store.reserve(&held, 100).is_ok() {
                            admitted.fetch_add(1, Ordering::AcqRel);
                        }
                    }
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        assert_eq!(admitted.load(Ordering::Acquire), 100);
        let second = store.slots[1].bucket("*", || bounds).period(bounds);
        assert_eq!(second.used.load(Ordering::Acquire), 10_000, "refusals were rolled back");
    }

    #[test]
    fn thresholds_cross_once() {
        let b: Vec<i64> = budget(1000, OnExceed::Warn).thresholds().collect();
        let crossed = AtomicU32::new(0);
        assert_eq!(cross(&b, &crossed, 499), 0);
        assert_eq!(cross(&b, &crossed, 500), 0b01);
        assert_eq!(cross(&b, &crossed, 700), 0);
        assert_eq!(cross(&b, &crossed, 5000), 0b10);
        assert_eq!(cross(&b, &crossed, 6000), 0);
    }

    #[test]
    fn a_new_period_starts_empty_and_an_old_one_is_never_swapped_back() {
        let bucket = Bucket::new(Bounds { start: 0, end: 10 });
        let p0 = bucket.period(Bounds { start: 0, end: 10 });
        p0.spent.store(5, Ordering::Release);
        let p1 = bucket.period(Bounds { start: 10, end: 20 });
        assert_eq!(p1.spent(), 0);
        assert_eq!(bucket.period(Bounds { start: 0, end: 10 }).bounds.start, 10);
        assert!(bucket.peek(Bounds { start: 20, end: 30 }).is_none());
    }

    #[test]
    fn bounds_are_computed_only_when_the_held_period_ends() {
        let bucket = Bucket::new(Bounds { start: 0, end: 10 });
        let never = || -> Bounds { panic!("computed within the held period") };
        assert_eq!(bucket.at(0, never).bounds.start, 0);
        assert_eq!(bucket.at(9, never).bounds.start, 0);
        let mut computed = 0;
        let next = bucket.at(10, || {
            computed += 1;
            Bounds { start: 10, end: 23 }
        });
        assert_eq!((next.bounds.end, computed), (23, 1));
        assert_eq!(bucket.at(22, never).bounds.start, 10);
        // A clock stepped back keeps the newer period (spend never forgotten).
        assert_eq!(bucket.at(5, || Bounds { start: 0, end: 10 }).bounds.start, 10);
    }
}
