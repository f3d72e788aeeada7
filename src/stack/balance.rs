//! Target choice by load (`routing = "latency"`) and by price (`routing =
//! "cost"`): one estimate of time to first token per target, and the picks
//! over them. `Route::pick` calls it for the first attempt, the failover
//! policy for the next one, and the hedge for its second choice.
//!
//! The estimate is the peak-sensitive EWMA of Finagle's `PeakEwma`
//! (finagle-core, `loadbalancer/PeakEwma.scala`), as tower ported it
//! (`tower::load::peak_ewma`) and linkerd2-proxy runs it behind power of
//! two choices (`tower::balance::p2c`): a sample above the estimate replaces
//! it at once; one below pulls it down by `1 - e^(-Δt/τ)`, with Δt the time
//! since the last sample, so that it comes down with time rather than with
//! the number of requests. The load compared is estimate × (in flight + 1).
//! The decaying failure penalty is linkerd2-proxy's (PR #4537).
//!
//! tower's types are not used: they wrap a service and are polled for
//! readiness, while relaygate picks a target per attempt, with some to
//! avoid (the upstreams a request has tried); and `PeakEwma` keeps each
//! estimate behind a mutex taken per request. Here every value is an atomic
//! word (a value and its timestamp packed together), and no lock is taken.
//!
//! Rules the anchors got wrong, and how they are kept here:
//! - **TTFT, not total latency**: a stream's sample is its first SSE event,
//!   a plain answer's its response headers.
//! - **Waiting counts**: attempts still waiting for their first byte count
//!   as at least their mean elapsed time, so a hanging upstream looks slow
//!   at once, not when it finally times out.
//! - **Failures are never fast samples**: a failure (5xx, reset, timeout,
//!   malformed, 401/403) adds a penalty (the slowest estimate of the model,
//!   at least 1 s; renewed, not summed) that decays with the same half-life;
//!   its elapsed time may only raise the estimate. A 429 adds a penalty that
//!   lasts its Retry-After (capped like the cooldown), then the target
//!   starts over as recovered.
//! - **New and recovered targets start pessimistic**: a target with no
//!   sample, or one whose breaker or cooldown just let it back, is
//!   estimated at 4× the tier's median, decaying toward the median. Its
//!   first sample replaces that.
//! - **Nobody starves, nobody floods**: with two targets, power of two
//!   choices always compares the same pair, so the slower would never be
//!   measured again. A target not picked for `PROBE_EVERY` picks of its
//!   model, with nothing waiting on it, gets the next one (a probe): at
//!   least 1 pick in 50, and no more than that from probes. A fresh target
//!   is due one probe at once, then its prior keeps its share small until
//!   it decays or a sample replaces it.
//! - **Breaker and cooldown are read on every pick** (`Upstream::available`),
//!   never cached.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::route::Target;
use crate::config::{Routing, Strategy};

/// A target not picked for this many picks of its model (and with no
/// attempt waiting on it) gets the next pick. 50: a stale target costs at
/// most 2 % of traffic, and a window of 100 requests always measures it.
pub const PROBE_EVERY: u64 = 50;

/// A new or recovered target starts at this many times the tier's median.
const PRIOR_FACTOR: f64 = 4.0;

/// The estimate, in seconds, of a target in a tier where nothing has been
/// measured yet (all of them are new: they are equal, whatever it is).
const UNKNOWN: f64 = 1.0;

/// A failure adds the slowest estimate of its tier, and at least this
/// (seconds): enough to rank a fast-failing target behind every healthy
/// one for about a half-life.
const MIN_PENALTY: f64 = 1.0;

/// How sharply the pair's comparison prefers the lower load: the lower
/// wins with probability 1 / (1 + (lower/higher)^SHARPNESS). Equal loads
/// split evenly, 10 % apart 70/30, twice as slow wins 1 pick in 257. A
/// strict comparison would lock two near-equal targets into one of them.
const SHARPNESS: i32 = 8;

/// Attempts timed at once per target; more than this are counted in
/// flight but not timed (16 bits of the waiting word).
const MAX_TIMED: u64 = 0xFFFF;

/// A value (f32 seconds) and the millisecond it was set (u32, wrapping
/// after 49 days), in one word: a read-modify-write is one CAS, so a value
/// and its timestamp never disagree.
struct Stamped(AtomicU64);

const EMPTY: u64 = u64::MAX; // a NaN value: never stored otherwise

impl Stamped {
    fn empty() -> Self {
        Self(AtomicU64::new(EMPTY))
    }

    fn load(&self) -> Option<(f64, u32)> {
        unpack(self.0.load(Ordering::Acquire))
    }

    fn store(&self, value: f64, ms: u32) {
        self.0.store(pack(value, ms), Ordering::Release);
    }

    fn clear(&self) {
        self.0.store(EMPTY, Ordering::Release);
    }

    /// Replaces the value with `f(old)`; `None` leaves it as it is.
    fn update(&self, f: impl Fn(Option<(f64, u32)>) -> Option<(f64, u32)>) {
        let _ = self.0.fetch_update(Ordering::AcqRel, Ordering::Acquire, |word| {
            f(unpack(word)).map(|(v, ms)| pack(v, ms))
        });
    }
}

fn pack(value: f64, ms: u32) -> u64 {
    (u64::from((value as f32).to_bits()) << 32) | u64::from(ms)
}

fn unpack(word: u64) -> Option<(f64, u32)> {
    (word != EMPTY).then(|| (f64::from(f32::from_bits((word >> 32) as u32)), word as u32))
}

/// Milliseconds from `stamp` to `now`, both wrapping u32.
fn since(now: u32, stamp: u32) -> f64 {
    f64::from(now.wrapping_sub(stamp))
}

/// `e^(-Δt/τ)`: what is left of a value after `ms`.
fn remains(ms: f64, tau_ms: f64) -> f64 {
    (-ms / tau_ms).exp()
}

/// What relaygate knows about one target's speed. Kept across reloads
/// (`LoadRegistry`), per model, upstream and upstream model.
pub struct Load {
    base: Instant,
    /// Peak-EWMA of time to first token; empty before the first sample.
    ewma: Stamped,
    /// The failure penalty, decaying from its stamp.
    penalty: Stamped,
    /// A 429's penalty, whole until its stamp (the end of Retry-After).
    hold: Stamped,
    /// Since when (ms + 1) the target counts as new or recovered; 0 when
    /// it has been measured since.
    fresh_since: AtomicU64,
    /// Attempts on it, a committed stream to its end.
    in_flight: AtomicU32,
    /// Attempts waiting for their first byte: the count in the low 16
    /// bits, the sum of their start times (ms since `base`) above, so that
    /// one load gives both.
    waiting: AtomicU64,
    /// The model's pick number from which this target is due a probe:
    /// `PROBE_EVERY` after it was last picked, 0 (now) when fresh.
    due: AtomicU64,
    /// The last pick saw its breaker or cooldown refuse.
    unavailable: AtomicBool,
}

impl Load {
    fn new() -> Self {
        Self {
            base: Instant::now(),
            ewma: Stamped::empty(),
            penalty: Stamped::empty(),
            hold: Stamped::empty(),
            fresh_since: AtomicU64::new(1),
            in_flight: AtomicU32::new(0),
            waiting: AtomicU64::new(0),
            due: AtomicU64::new(0),
            unavailable: AtomicBool::new(false),
        }
    }

    fn ms(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.base).as_millis() as u64
    }

    fn fresh(&self) -> Option<u32> {
        match self.fresh_since.load(Ordering::Acquire) {
            0 => None,
            since => Some((since - 1) as u32),
        }
    }

    /// New, or just let back in: start over, and be measured at once.
    fn mark_fresh(&self, t: u64) {
        self.penalty.clear();
        self.hold.clear();
        self.fresh_since.store((t as u32 as u64) + 1, Ordering::Release);
        self.due.store(0, Ordering::Release);
    }

    /// Seconds: the mean elapsed time of the attempts waiting for their
    /// first byte (a lower bound for the oldest), 0 when none.
    fn waiting_for(&self, t: u64) -> f64 {
        let word = self.waiting.load(Ordering::Acquire);
        let count = word & MAX_TIMED;
        if count == 0 {
            return 0.0;
        }
        let mean_start = (word >> 16) / count;
        t.saturating_sub(mean_start) as f64 / 1000.0
    }

    /// The estimate of time to first token in seconds, penalties included.
    /// `median`: the tier's, for a fresh target.
    fn estimate_at(&self, t: u64, median: f64, tau_ms: f64) -> f64 {
        let now = t as u32;
        let base = match (self.fresh(), self.ewma.load()) {
            (None, Some((v, _))) => v,
            (Some(since_ms), _) => median * (1.0 + (PRIOR_FACTOR - 1.0) * remains(since(now, since_ms), tau_ms)),
            (None, None) => median,
        };
        let penalty = self
            .penalty
            .load()
            .map_or(0.0, |(v, at)| v * remains(since(now, at), tau_ms));
        let held = match self.hold.load() {
            Some((v, until)) if (until.wrapping_sub(now) as i32) > 0 => v,
            _ => 0.0,
        };
        base.max(self.waiting_for(t)) + penalty + held
    }

    /// Estimate × (in flight + 1): what the pair's comparison weighs.
    fn load_at(&self, t: u64, median: f64, tau_ms: f64) -> f64 {
        self.estimate_at(t, median, tau_ms) * f64::from(self.in_flight.load(Ordering::Acquire) + 1)
    }

    fn waiting_count(&self) -> u64 {
        self.waiting.load(Ordering::Acquire) & MAX_TIMED
    }

    /// Reads the target's breaker and cooldown (`healthy`) for this pick:
    /// a target they let back in, or whose 429 hold ended, starts over.
    fn note(&self, healthy: bool, t: u64) {
        if !healthy {
            if !self.unavailable.load(Ordering::Relaxed) {
                self.unavailable.store(true, Ordering::Relaxed);
            }
            return;
        }
        if self.unavailable.load(Ordering::Relaxed) && self.unavailable.swap(false, Ordering::AcqRel) {
            self.mark_fresh(t);
        }
        let word = self.hold.0.load(Ordering::Acquire);
        if let Some((_, until)) = unpack(word) {
            if (until.wrapping_sub(t as u32) as i32) <= 0
                && self
                    .hold
                    .0
                    .compare_exchange(word, EMPTY, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
            {
                self.mark_fresh(t);
            }
        }
    }

    /// A first byte after `ttft`: a sample.
    fn observe(&self, t: u64, ttft: f64, tau_ms: f64) {
        let now = t as u32;
        if self.fresh_since.swap(0, Ordering::AcqRel) != 0 {
            self.ewma.store(ttft, now);
            return;
        }
        self.ewma.update(|old| {
            Some(match old {
                Some((v, at)) if ttft < v => {
                    let w = remains(since(now, at), tau_ms);
                    (v * w + ttft * (1.0 - w), now)
                }
                _ => (ttft, now),
            })
        });
    }

    /// No first byte after `elapsed`: the estimate may only rise (a
    /// failure or a cancelled attempt is never a fast sample).
    fn censor(&self, t: u64, elapsed: f64) {
        if self.fresh().is_some() {
            return;
        }
        self.ewma.update(|old| match old {
            Some((v, _)) if v >= elapsed => None,
            _ => Some((elapsed, t as u32)),
        });
    }

    /// A failure: the penalty is `amount` again, decaying from now. It
    /// does not stack: a run of failures is the breaker's business, and a
    /// sum would grow with the traffic a target gets, exiling an upstream
    /// that fails 1 request in 10 for as long as it is used at all.
    fn penalize(&self, t: u64, amount: f64, tau_ms: f64) {
        let now = t as u32;
        self.penalty.update(|old| {
            let left = old.map_or(0.0, |(v, at)| v * remains(since(now, at), tau_ms));
            Some((left.max(amount), now))
        });
    }

    fn hold_for(&self, t: u64, amount: f64, d: Duration) {
        let until = (t + d.as_millis() as u64) as u32;
        self.hold.store(amount, until);
    }

    fn state(&self, t: u64, tau_ms: f64) -> &'static str {
        let now = t as u32;
        if matches!(self.hold.load(), Some((_, until)) if (until.wrapping_sub(now) as i32) > 0) {
            "held"
        } else if self
            .penalty
            .load()
            .is_some_and(|(v, at)| v * remains(since(now, at), tau_ms) > 0.001)
        {
            "penalized"
        } else if self.fresh().is_some() {
            "fresh"
        } else {
            "measured"
        }
    }
}

/// An attempt on a target, until its first byte: it counts as waiting and
/// in flight. Dropped unsettled (a lost hedge, a client gone), its elapsed
/// time may raise the estimate.
pub struct Pending {
    /// `None` once settled.
    in_flight: Option<InFlight>,
    start: Instant,
    /// Its start (ms since the load's base), while timed and waiting.
    timed: Option<u64>,
}

/// An attempt in flight on a target: for a committed stream, to its end.
pub struct InFlight(Arc<Load>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Pending {
    fn new(load: &Arc<Load>, now: Instant) -> Self {
        let t = load.ms(now);
        load.in_flight.fetch_add(1, Ordering::AcqRel);
        let timed = load
            .waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
                (w & MAX_TIMED < MAX_TIMED).then(|| w.wrapping_add((t << 16) + 1))
            })
            .is_ok()
            .then_some(t);
        Self {
            in_flight: Some(InFlight(load.clone())),
            start: now,
            timed,
        }
    }

    /// No longer waiting: the in-flight count that remains, and the time
    /// waited in seconds.
    fn stop_waiting(&mut self, now: Instant) -> Option<(InFlight, f64)> {
        let in_flight = self.in_flight.take()?;
        if let Some(t) = self.timed.take() {
            in_flight.0.waiting.fetch_sub((t << 16) + 1, Ordering::AcqRel);
        }
        Some((in_flight, now.saturating_duration_since(self.start).as_secs_f64()))
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if self.in_flight.is_none() {
            return;
        }
        let now = Instant::now();
        if let Some((in_flight, elapsed)) = self.stop_waiting(now) {
            let load = &in_flight.0;
            load.censor(load.ms(now), elapsed);
        }
    }
}

/// How an attempt ended, for its target's estimate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Settled {
    /// The first byte: response headers (`Some`, for a plain answer, the
    /// time they took) or a stream's first event (`None`: now).
    FirstByte(Option<Duration>),
    /// 5xx, reset, timeout, malformed, 401/403: a decaying penalty.
    Failure,
    /// 429: a penalty for this long (the cooldown).
    RateLimited(Duration),
    /// A 4xx about the request, 501/505: nothing learnt.
    Neutral,
}

/// One target's estimate as `/admin/upstreams` and `/metrics` show it.
#[derive(Debug, Clone, PartialEq)]
pub struct TargetLoad {
    /// Seconds: the estimated time to first token, penalties included.
    pub estimate: f64,
    pub in_flight: u32,
    pub waiting: u64,
    /// `measured`, `fresh` (new or recovered, no sample since), `penalized`
    /// (a failure's penalty still counts) or `held` (a 429's).
    pub state: &'static str,
}

/// The estimates of one model's targets and the picks over them, built
/// with its `Route` at config load.
pub struct Balancer {
    strategy: Strategy,
    /// τ of the decay in ms: half-life / ln 2.
    tau_ms: f64,
    /// Seconds.
    max_ttft: Option<f64>,
    /// By target index.
    loads: Vec<Arc<Load>>,
    /// Blended USD per million tokens, by target index (`cost`).
    prices: Vec<f64>,
    /// The model's picks so far, kept across reloads.
    picks: Arc<AtomicU64>,
}

impl Balancer {
    /// `None` for `routing = "priority"`, which needs no estimates.
    pub fn new(model: &str, routing: &Routing, targets: &[Target], registry: &LoadRegistry) -> Option<Self> {
        if routing.strategy == Strategy::Priority {
            return None;
        }
        let (picks, loads) = registry.model(model, targets);
        Some(Self {
            strategy: routing.strategy,
            tau_ms: routing.decay.as_secs_f64() * 1000.0 / std::f64::consts::LN_2,
            max_ttft: routing.max_ttft.map(|d| d.as_secs_f64()),
            loads,
            prices: targets
                .iter()
                .map(|t| t.price.map_or(f64::INFINITY, |p| p.blended()))
                .collect(),
            picks,
        })
    }

    /// The attempt on `target` starts now.
    pub fn begin(&self, target: usize, now: Instant) -> Pending {
        Pending::new(&self.loads[target], now)
    }

    /// The attempt ended as `how`; the stream's in-flight count, which a
    /// committed stream holds to its end, for a first byte.
    pub fn settle(&self, target: usize, mut pending: Pending, how: Settled, now: Instant) -> Option<InFlight> {
        let (in_flight, waited) = pending.stop_waiting(now)?;
        let load = &self.loads[target];
        let t = load.ms(now);
        match how {
            Settled::FirstByte(at) => {
                let ttft = at.map_or(waited, |d| d.as_secs_f64());
                load.observe(t, ttft, self.tau_ms);
                return Some(in_flight);
            }
            Settled::Failure => {
                load.censor(t, waited);
                load.penalize(t, self.penalty(now), self.tau_ms);
            }
            Settled::RateLimited(cooldown) => load.hold_for(t, self.penalty(now), cooldown),
            Settled::Neutral => {}
        }
        None
    }

    /// What a failure adds: the slowest measured estimate of the model's
    /// targets, at least `MIN_PENALTY`.
    fn penalty(&self, now: Instant) -> f64 {
        self.loads
            .iter()
            .filter(|l| l.fresh().is_none())
            .map(|l| l.estimate_at(l.ms(now), UNKNOWN, self.tau_ms))
            .fold(MIN_PENALTY, f64::max)
    }

    /// The median estimate of the measured targets among `tier`, or
    /// `UNKNOWN`: where a fresh target's estimate decays to.
    fn median(&self, tier: impl Iterator<Item = usize>, now: Instant) -> f64 {
        let mut measured: Vec<f64> = tier
            .filter(|&i| self.loads[i].fresh().is_none())
            .map(|i| {
                let l = &self.loads[i];
                l.estimate_at(l.ms(now), UNKNOWN, self.tau_ms)
            })
            .collect();
        if measured.is_empty() {
            return UNKNOWN;
        }
        measured.sort_by(f64::total_cmp);
        let mid = measured.len() / 2;
        if measured.len() % 2 == 1 {
            measured[mid]
        } else {
            (measured[mid - 1] + measured[mid]) / 2.0
        }
    }

    fn estimate(&self, i: usize, median: f64, now: Instant) -> f64 {
        let l = &self.loads[i];
        l.estimate_at(l.ms(now), median, self.tau_ms)
    }

    /// Each target's estimate, in flight and state, in target order.
    pub fn snapshot(&self, targets: &[Target], now: Instant) -> Vec<TargetLoad> {
        (0..targets.len())
            .map(|i| {
                let tier = (0..targets.len()).filter(|&j| targets[j].priority == targets[i].priority);
                let l = &self.loads[i];
                let median = if l.fresh().is_some() {
                    self.median(tier, now)
                } else {
                    UNKNOWN
                };
                TargetLoad {
                    estimate: self.estimate(i, median, now),
                    in_flight: l.in_flight.load(Ordering::Acquire),
                    waiting: l.waiting_count(),
                    state: l.state(l.ms(now), self.tau_ms),
                }
            })
            .collect()
    }

    /// A target for the next attempt among those that pass `keep` and are
    /// available now, by the model's strategy.
    pub fn pick(
        &self,
        targets: &[Target],
        keep: impl Fn(&Target) -> bool,
        now: Instant,
        rng: &mut fastrand::Rng,
    ) -> Option<usize> {
        let seq = self.picks.fetch_add(1, Ordering::Relaxed);
        let mut candidates = Vec::with_capacity(targets.len());
        for (i, target) in targets.iter().enumerate() {
            let load = &self.loads[i];
            let healthy = target.upstream.healthy();
            load.note(healthy, load.ms(now));
            if healthy && target.upstream.has_capacity() && keep(target) {
                candidates.push(i);
            }
        }
        let chosen = match self.strategy {
            Strategy::Cost => self.cheapest(targets, &candidates, seq, now, rng)?,
            _ => {
                // Targets are sorted by priority: the first candidate's is the lowest.
                let first = *candidates.first()?;
                candidates.retain(|&i| targets[i].priority == targets[first].priority);
                self.fastest(&candidates, seq, now, rng)
            }
        };
        self.loads[chosen].due.fetch_max(seq + PROBE_EVERY, Ordering::AcqRel);
        Some(chosen)
    }

    /// `latency`: a stale target's probe, else the lighter of two chosen at
    /// random, compared softly (`SHARPNESS`).
    fn fastest(&self, tier: &[usize], seq: u64, now: Instant, rng: &mut fastrand::Rng) -> usize {
        if tier.len() == 1 {
            return tier[0];
        }
        if let Some(probe) = self.probe(tier.iter().copied(), seq) {
            return probe;
        }
        let median = if tier.iter().any(|&i| self.loads[i].fresh().is_some()) {
            self.median(tier.iter().copied(), now)
        } else {
            UNKNOWN
        };
        let a = rng.usize(..tier.len());
        let mut b = rng.usize(..tier.len() - 1);
        if b >= a {
            b += 1;
        }
        let (a, b) = (tier[a], tier[b]);
        let load = |i: usize| {
            let l = &self.loads[i];
            l.load_at(l.ms(now), median, self.tau_ms)
        };
        if rng.f64() < prefer(load(a), load(b)) {
            a
        } else {
            b
        }
    }

    /// The target longest due a probe (not picked for `PROBE_EVERY` picks,
    /// or fresh) with nothing waiting on it, claimed for this pick: one
    /// probe per target, however many picks race for it.
    fn probe(&self, among: impl Iterator<Item = usize>, seq: u64) -> Option<usize> {
        let (i, due) = among
            .map(|i| (i, self.loads[i].due.load(Ordering::Acquire)))
            .filter(|&(i, due)| seq >= due && self.loads[i].waiting_count() == 0)
            .min_by_key(|&(_, due)| due)?;
        self.loads[i]
            .due
            .compare_exchange(due, seq + PROBE_EVERY, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
            .then_some(i)
    }

    /// `cost`: the cheapest candidate (with `max_ttft`: the cheapest whose
    /// estimate is under it, else the fastest); among equal prices, the
    /// lowest priority, then by weight.
    fn cheapest(
        &self,
        targets: &[Target],
        candidates: &[usize],
        seq: u64,
        now: Instant,
        rng: &mut fastrand::Rng,
    ) -> Option<usize> {
        let Some(bound) = self.max_ttft else {
            return self.cheapest_of(targets, candidates.iter().copied(), rng);
        };
        let median = self.median(candidates.iter().copied(), now);
        let estimates: Vec<(usize, f64)> = candidates.iter().map(|&i| (i, self.estimate(i, median, now))).collect();
        let chosen = match self.cheapest_of(
            targets,
            estimates.iter().filter(|&&(_, e)| e <= bound).map(|&(i, _)| i),
            rng,
        ) {
            Some(i) => i,
            None => estimates.iter().min_by(|x, y| x.1.total_cmp(&y.1))?.0,
        };
        // A cheaper target skipped for its estimate is measured again now
        // and then, or it would never be chosen once it is fast again; a
        // fresh one once at once, or its prior would keep it out.
        let due = candidates
            .iter()
            .copied()
            .filter(|&i| i != chosen && (self.prices[i] < self.prices[chosen] || self.loads[i].fresh().is_some()));
        Some(self.probe(due, seq).unwrap_or(chosen))
    }

    fn cheapest_of(
        &self,
        targets: &[Target],
        among: impl Iterator<Item = usize> + Clone,
        rng: &mut fastrand::Rng,
    ) -> Option<usize> {
        let rank = |i: usize| (self.prices[i], targets[i].priority);
        let best = among
            .clone()
            .map(rank)
            .min_by(|x, y| x.0.total_cmp(&y.0).then(x.1.cmp(&y.1)))?;
        let tied = among.filter(|&i| rank(i) == best);
        let total: u64 = tied.clone().map(|i| u64::from(targets[i].weight)).sum();
        let mut ticket = rng.u64(..total.max(1));
        let mut last = None;
        for i in tied {
            let w = u64::from(targets[i].weight);
            if ticket < w {
                return Some(i);
            }
            ticket -= w;
            last = Some(i);
        }
        last
    }
}

/// The probability that the pair's first, with load `a`, wins over one
/// with load `b`: 1 / (1 + (a/b)^SHARPNESS).
fn prefer(a: f64, b: f64) -> f64 {
    match (a > 0.0, b > 0.0) {
        (false, false) => 0.5,
        (false, true) => 1.0,
        (true, false) => 0.0,
        (true, true) => 1.0 / (1.0 + (a / b).powi(SHARPNESS)),
    }
}

/// The estimates of every latency- and cost-routed target, by model,
/// upstream and upstream model, kept across reloads so that a reload does
/// not forget what was measured. Locked only at config load.
#[derive(Default)]
pub struct LoadRegistry {
    inner: Mutex<Registered>,
}

#[derive(Default)]
struct Registered {
    loads: HashMap<(String, String, String), Arc<Load>>,
    picks: HashMap<String, Arc<AtomicU64>>,
}

impl LoadRegistry {
    /// `model`'s pick counter and its targets' loads, in target order.
    fn model(&self, model: &str, targets: &[Target]) -> (Arc<AtomicU64>, Vec<Arc<Load>>) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let picks = inner.picks.entry(model.to_owned()).or_default().clone();
        let loads = targets
            .iter()
            .map(|t| {
                let key = (model.to_owned(), t.upstream.name.to_string(), t.model.clone());
                inner.loads.entry(key).or_insert_with(|| Arc::new(Load::new())).clone()
            })
            .collect();
        (picks, loads)
    }
}

#[cfg(test)]
#[path = "balance_tests.rs"]
mod tests;
