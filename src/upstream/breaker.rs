//! A circuit breaker per upstream: closed → open → half-open → closed. The
//! tower layer that gates attempts with it is `stack::circuit`.
//!
//! The hot path takes no lock: admission in the closed state is one atomic
//! load, and outcomes are atomic counters (consecutive failures, and a ring
//! of per-slice success/failure counts for the failure-rate window). Only
//! transitions, which are rare, serialise on a mutex.
//!
//! - closed → open: `consecutive_failures` in a row, or a failure rate ≥
//!   `failure_rate` over `window` with at least `min_requests`.
//! - open lasts `open_for`; each re-open without a close in between doubles
//!   it, with ±20% jitter, up to `max_open_for`.
//! - half-open admits `half_open_probes` probes. All succeed → closed; one
//!   fails → open again. A probe that ends without a verdict (client gone,
//!   4xx) frees its slot, and every probe is bounded by the attempt's
//!   first-byte timeout, so half-open can never stick.
//! - forced open (admin `POST /admin/upstreams/{name}/open`) stays open until
//!   an admin reset.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::{IntCounterVec, IntGauge};
use tokio::time::Instant;

use crate::config::BreakerConfig;
use crate::telemetry::metrics::{ErrorType, Metrics};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Closed,
    HalfOpen,
    Open,
    ForcedOpen,
}

impl State {
    fn from_u8(v: u8) -> State {
        match v {
            0 => State::Closed,
            1 => State::HalfOpen,
            2 => State::Open,
            _ => State::ForcedOpen,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::HalfOpen => "half_open",
            State::Open => "open",
            State::ForcedOpen => "forced_open",
        }
    }

    /// The value of `relaygate_circuit_state`: 0 closed, 1 half-open, 2 open.
    fn gauge(self) -> i64 {
        match self {
            State::Closed => 0,
            State::HalfOpen => 1,
            State::Open | State::ForcedOpen => 2,
        }
    }
}

/// Why a breaker last opened: for the status page and the admin API, so a
/// reader sees "5 failures in a row" rather than only "open".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenReason {
    /// `consecutive_failures` in a row.
    Consecutive,
    /// `failure_rate` over `window` with at least `min_requests`.
    FailureRate,
    /// A half-open probe failed.
    ProbeFailed,
    /// `POST /admin/upstreams/{name}/open`.
    Admin,
}

impl OpenReason {
    const ALL: [OpenReason; 4] = [
        OpenReason::Consecutive,
        OpenReason::FailureRate,
        OpenReason::ProbeFailed,
        OpenReason::Admin,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            OpenReason::Consecutive => "consecutive_failures",
            OpenReason::FailureRate => "failure_rate",
            OpenReason::ProbeFailed => "probe_failed",
            OpenReason::Admin => "admin",
        }
    }
}

const SLICES: u64 = 10;

/// Success and failure counts over `window`, in `SLICES` slices.
struct Window {
    slice_ms: u64,
    slices: [Slice; SLICES as usize],
}

#[derive(Default)]
struct Slice {
    epoch: AtomicU64,
    ok: AtomicU32,
    failed: AtomicU32,
}

impl Window {
    fn new(window: Duration) -> Self {
        Self {
            slice_ms: (window.as_millis() as u64 / SLICES).max(1),
            slices: Default::default(),
        }
    }

    fn record(&self, now_ms: u64, ok: bool) {
        let epoch = now_ms / self.slice_ms + 1; // 0 marks an unused slice
        let slice = &self.slices[(epoch % SLICES) as usize];
        let seen = slice.epoch.load(Ordering::Acquire);
        if seen != epoch
            && slice
                .epoch
                .compare_exchange(seen, epoch, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            // A concurrent increment between the swap and these stores can be
            // lost: the window is an estimate, and one count does not matter.
            slice.ok.store(0, Ordering::Relaxed);
            slice.failed.store(0, Ordering::Relaxed);
        }
        let counter = if ok { &slice.ok } else { &slice.failed };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// (requests, failures) over the window ending at `now_ms`.
    fn totals(&self, now_ms: u64) -> (u32, u32) {
        let current = now_ms / self.slice_ms + 1;
        let mut total = (0, 0);
        for s in &self.slices {
            let e = s.epoch.load(Ordering::Acquire);
            if e != 0 && e + SLICES > current {
                let (ok, failed) = (s.ok.load(Ordering::Relaxed), s.failed.load(Ordering::Relaxed));
                total.0 += ok + failed;
                total.1 += failed;
            }
        }
        total
    }

    fn clear(&self) {
        for s in &self.slices {
            s.epoch.store(0, Ordering::Release);
            s.ok.store(0, Ordering::Relaxed);
            s.failed.store(0, Ordering::Relaxed);
        }
    }
}

pub struct Breaker {
    name: Arc<str>,
    cfg: BreakerConfig,
    base: Instant,
    state: AtomicU8,
    consecutive: AtomicU32,
    window: Window,
    /// While open: when half-open begins, in ms since `base`.
    open_until: AtomicU64,
    /// Opens since the last close, for the doubling.
    reopens: AtomicU32,
    probes_started: AtomicU32,
    probes_ok: AtomicU32,
    last_error: AtomicU8,
    last_error_at: AtomicU64,
    /// When the current state began, in ms since `base`; written only on
    /// transitions, so it costs the hot path nothing.
    since: AtomicU64,
    /// `OpenReason` as its index; `u8::MAX` before the first open.
    open_reason: AtomicU8,
    transition: Mutex<()>,
    gauge: IntGauge,
    transitions: IntCounterVec,
}

impl std::fmt::Debug for Breaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Breaker")
            .field("name", &self.name)
            .field("state", &self.state())
            .finish()
    }
}

/// What an admitted attempt owes the breaker: a verdict, or (on drop) none.
pub struct Ticket {
    breaker: Arc<Breaker>,
    probe: bool,
    settled: bool,
}

impl Ticket {
    /// Admitted as one of the half-open probes.
    pub fn is_probe(&self) -> bool {
        self.probe
    }

    pub fn success(mut self) {
        self.settled = true;
        self.breaker.on_success(self.probe);
    }

    pub fn failure(mut self, error: ErrorType) {
        self.settled = true;
        self.breaker.on_failure(self.probe, error);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        // No verdict (a 4xx, a cancelled request): free a probe slot.
        if !self.settled && self.probe {
            self.breaker.probes_started.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Breaker {
    pub fn new(name: &str, cfg: BreakerConfig, metrics: &Metrics) -> Arc<Self> {
        let gauge = metrics.circuit_state.with_label_values(&[name]);
        gauge.set(0);
        Arc::new(Self {
            name: Arc::from(name),
            window: Window::new(cfg.window),
            cfg,
            base: Instant::now(),
            state: AtomicU8::new(0),
            consecutive: AtomicU32::new(0),
            open_until: AtomicU64::new(0),
            reopens: AtomicU32::new(0),
            probes_started: AtomicU32::new(0),
            probes_ok: AtomicU32::new(0),
            last_error: AtomicU8::new(u8::MAX),
            last_error_at: AtomicU64::new(0),
            since: AtomicU64::new(0),
            open_reason: AtomicU8::new(u8::MAX),
            transition: Mutex::new(()),
            gauge,
            transitions: metrics.circuit_transitions.clone(),
        })
    }

    pub fn config(&self) -> &BreakerConfig {
        &self.cfg
    }

    fn now_ms(&self) -> u64 {
        self.base.elapsed().as_millis() as u64
    }

    pub fn state(&self) -> State {
        State::from_u8(self.state.load(Ordering::Acquire))
    }

    /// Admits an attempt, or says how long until the breaker may admit one.
    pub fn try_acquire(self: &Arc<Self>) -> Result<Ticket, Duration> {
        loop {
            match self.state() {
                State::Closed => return Ok(self.ticket(false)),
                State::ForcedOpen => return Err(self.cfg.open_for),
                State::Open => {
                    let until = self.open_until.load(Ordering::Acquire);
                    let now = self.now_ms();
                    if now < until {
                        return Err(Duration::from_millis(until - now));
                    }
                    self.transition_from(State::Open, State::HalfOpen, None);
                }
                State::HalfOpen => {
                    let started = self.probes_started.fetch_add(1, Ordering::AcqRel);
                    if started < self.cfg.half_open_probes {
                        return Ok(self.ticket(true));
                    }
                    self.probes_started.fetch_sub(1, Ordering::AcqRel);
                    // Probes are in flight; they end within a first-byte timeout.
                    return Err(Duration::from_secs(1));
                }
            }
        }
    }

    fn ticket(self: &Arc<Self>, probe: bool) -> Ticket {
        Ticket {
            breaker: self.clone(),
            probe,
            settled: false,
        }
    }

    /// Whether `try_acquire` would admit now (no slot is taken).
    pub fn available(&self) -> bool {
        match self.state() {
            State::Closed => true,
            State::ForcedOpen => false,
            State::Open => self.now_ms() >= self.open_until.load(Ordering::Acquire),
            State::HalfOpen => self.probes_started.load(Ordering::Acquire) < self.cfg.half_open_probes,
        }
    }

    /// Time until this breaker next admits a request (zero when it does now).
    pub fn retry_after(&self) -> Duration {
        match self.state() {
            State::Open => Duration::from_millis(self.open_until.load(Ordering::Acquire).saturating_sub(self.now_ms())),
            State::ForcedOpen => self.cfg.open_for,
            State::HalfOpen if !self.available() => Duration::from_secs(1),
            _ => Duration::ZERO,
        }
    }

    fn on_success(&self, probe: bool) {
        self.consecutive.store(0, Ordering::Release);
        self.window.record(self.now_ms(), true);
        if probe && self.state() == State::HalfOpen {
            let ok = self.probes_ok.fetch_add(1, Ordering::AcqRel) + 1;
            if ok >= self.cfg.half_open_probes {
                self.transition_from(State::HalfOpen, State::Closed, None);
            }
        }
    }

    fn on_failure(&self, probe: bool, error: ErrorType) {
        let now = self.now_ms();
        self.last_error.store(error as u8, Ordering::Relaxed);
        self.last_error_at.store(now, Ordering::Relaxed);
        let consecutive = self.consecutive.fetch_add(1, Ordering::AcqRel) + 1;
        self.window.record(now, false);
        match self.state() {
            State::HalfOpen if probe => {
                self.transition_from(State::HalfOpen, State::Open, Some(OpenReason::ProbeFailed))
            }
            State::Closed => {
                let (requests, failures) = self.window.totals(now);
                let rate_tripped = requests >= self.cfg.min_requests.max(1)
                    && f64::from(failures) >= self.cfg.failure_rate * f64::from(requests);
                if consecutive >= self.cfg.consecutive_failures {
                    self.transition_from(State::Closed, State::Open, Some(OpenReason::Consecutive));
                } else if rate_tripped {
                    self.transition_from(State::Closed, State::Open, Some(OpenReason::FailureRate));
                }
            }
            _ => {}
        }
    }

    /// The last failure's class and how long ago it happened.
    pub fn last_error(&self) -> Option<(ErrorType, Duration)> {
        let code = self.last_error.load(Ordering::Relaxed);
        let error = ErrorType::ALL.get(usize::from(code)).copied()?;
        let ago = self.now_ms().saturating_sub(self.last_error_at.load(Ordering::Relaxed));
        Some((error, Duration::from_millis(ago)))
    }

    /// How long the breaker has been in its current state.
    pub fn since(&self) -> Duration {
        Duration::from_millis(self.now_ms().saturating_sub(self.since.load(Ordering::Acquire)))
    }

    /// Why it last opened (it may have closed since); `None` if it never did.
    pub fn open_reason(&self) -> Option<OpenReason> {
        OpenReason::ALL
            .get(usize::from(self.open_reason.load(Ordering::Acquire)))
            .copied()
    }

    /// (requests, failures, consecutive failures) in the current window.
    pub fn counts(&self) -> (u32, u32, u32) {
        let (requests, failures) = self.window.totals(self.now_ms());
        (requests, failures, self.consecutive.load(Ordering::Acquire))
    }

    /// Admin: close now and forget the failures.
    pub fn reset(&self) {
        let _guard = self.transition.lock().unwrap_or_else(|e| e.into_inner());
        let from = self.state();
        self.enter(from, State::Closed, None);
    }

    /// Admin: drain by hand; stays open until `reset`.
    pub fn force_open(&self) {
        let _guard = self.transition.lock().unwrap_or_else(|e| e.into_inner());
        let from = self.state();
        self.enter(from, State::ForcedOpen, Some(OpenReason::Admin));
    }

    fn transition_from(&self, from: State, to: State, reason: Option<OpenReason>) {
        let _guard = self.transition.lock().unwrap_or_else(|e| e.into_inner());
        if self.state() == from {
            self.enter(from, to, reason);
        }
    }

    /// Enters `to` (for an open state, because of `reason`); the caller
    /// holds the transition lock.
    fn enter(&self, from: State, to: State, reason: Option<OpenReason>) {
        if let Some(reason) = reason {
            self.open_reason.store(reason as u8, Ordering::Release);
        }
        match to {
            State::Open => {
                let reopens = self.reopens.fetch_add(1, Ordering::AcqRel);
                let mut open_for = self.cfg.open_for.saturating_mul(1u32 << reopens.min(16));
                if reopens > 0 {
                    // Jitter re-opens so that replicas do not probe in lockstep.
                    open_for = open_for.mul_f64(0.8 + 0.4 * fastrand::f64());
                }
                let open_for = open_for.min(self.cfg.max_open_for);
                self.open_until
                    .store(self.now_ms() + open_for.as_millis() as u64, Ordering::Release);
            }
            State::HalfOpen => {
                self.probes_started.store(0, Ordering::Release);
                self.probes_ok.store(0, Ordering::Release);
            }
            State::Closed => {
                self.reopens.store(0, Ordering::Release);
                self.consecutive.store(0, Ordering::Release);
                self.window.clear();
            }
            State::ForcedOpen => {}
        }
        if from != to {
            self.since.store(self.now_ms(), Ordering::Release);
        }
        self.state.store(to as u8, Ordering::Release);
        if from != to {
            self.gauge.set(to.gauge());
            self.transitions
                .with_label_values(&[&self.name, from.as_str(), to.as_str()])
                .inc();
            tracing::warn!(upstream = %self.name, from = from.as_str(), to = to.as_str(), "circuit breaker");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(cfg: BreakerConfig) -> Arc<Breaker> {
        Breaker::new("t", cfg, &Metrics::new())
    }

    fn cfg() -> BreakerConfig {
        BreakerConfig {
            consecutive_failures: 3,
            failure_rate: 0.5,
            min_requests: 10,
            window: Duration::from_secs(10),
            open_for: Duration::from_secs(1),
            max_open_for: Duration::from_secs(3),
            half_open_probes: 2,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn opens_on_consecutive_failures_then_half_opens_and_closes() {
        let b = breaker(cfg());
        for _ in 0..2 {
            b.try_acquire().unwrap().failure(ErrorType::ServerError);
        }
        assert_eq!(b.state(), State::Closed);
        assert_eq!(b.open_reason(), None);
        tokio::time::advance(Duration::from_millis(300)).await;
        b.try_acquire().unwrap().failure(ErrorType::ServerError);
        assert_eq!(b.state(), State::Open);
        assert_eq!(b.open_reason(), Some(OpenReason::Consecutive));
        assert_eq!(b.since(), Duration::ZERO, "since the open, not the start");
        assert!(b.try_acquire().is_err());
        assert_eq!(b.retry_after(), Duration::from_secs(1));

        tokio::time::advance(Duration::from_millis(1001)).await;
        let p1 = b.try_acquire().unwrap();
        assert_eq!(b.state(), State::HalfOpen);
        let p2 = b.try_acquire().unwrap();
        assert!(b.try_acquire().is_err(), "only half_open_probes probes");
        p1.success();
        assert_eq!(b.state(), State::HalfOpen);
        p2.success();
        assert_eq!(b.state(), State::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_reopens_for_longer_and_caps() {
        let b = breaker(cfg());
        for _ in 0..3 {
            b.try_acquire().unwrap().failure(ErrorType::Timeout);
        }
        let mut last = Duration::ZERO;
        for _ in 0..4 {
            let wait = b.retry_after();
            assert!(wait >= last.min(Duration::from_millis(2400)), "{wait:?} after {last:?}");
            assert!(wait <= Duration::from_secs(3));
            tokio::time::advance(wait + Duration::from_millis(1)).await;
            b.try_acquire().unwrap().failure(ErrorType::Timeout);
            assert_eq!(b.state(), State::Open);
            assert_eq!(b.open_reason(), Some(OpenReason::ProbeFailed));
            last = wait;
        }
        assert!(
            b.retry_after() >= Duration::from_millis(2400),
            "capped near max_open_for"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_without_verdict_frees_its_slot() {
        let b = breaker(cfg());
        for _ in 0..3 {
            b.try_acquire().unwrap().failure(ErrorType::Reset);
        }
        tokio::time::advance(Duration::from_secs(2)).await;
        let p1 = b.try_acquire().unwrap();
        let p2 = b.try_acquire().unwrap();
        assert!(b.try_acquire().is_err());
        drop(p1); // e.g. the client went away
        let p3 = b.try_acquire().unwrap();
        p2.success();
        p3.success();
        assert_eq!(b.state(), State::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn opens_on_failure_rate_with_enough_requests() {
        let b = breaker(BreakerConfig {
            consecutive_failures: 100,
            ..cfg()
        });
        // Alternate: never 3 in a row, but 50% failures.
        for i in 0..9 {
            let t = b.try_acquire().unwrap();
            if i % 2 == 0 {
                t.failure(ErrorType::ServerError)
            } else {
                t.success()
            }
        }
        assert_eq!(b.state(), State::Closed, "below min_requests");
        b.try_acquire().unwrap().failure(ErrorType::ServerError);
        assert_eq!(b.counts().0, 10);
        assert_eq!(b.state(), State::Open);
        assert_eq!(b.open_reason(), Some(OpenReason::FailureRate));
    }

    #[tokio::test(start_paused = true)]
    async fn old_outcomes_leave_the_window() {
        let b = breaker(BreakerConfig {
            consecutive_failures: 100,
            ..cfg()
        });
        for _ in 0..4 {
            b.try_acquire().unwrap().failure(ErrorType::ServerError);
            b.try_acquire().unwrap().success();
        }
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(b.counts().0, 0);
        b.try_acquire().unwrap().failure(ErrorType::ServerError);
        b.try_acquire().unwrap().success();
        assert_eq!(b.state(), State::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn forced_open_stays_until_reset() {
        let b = breaker(cfg());
        b.force_open();
        tokio::time::advance(Duration::from_secs(600)).await;
        assert!(b.try_acquire().is_err());
        assert_eq!(b.open_reason(), Some(OpenReason::Admin));
        assert_eq!(b.since(), Duration::from_secs(600));
        b.reset();
        assert!(b.try_acquire().is_ok());
        assert_eq!(b.state(), State::Closed);
    }
}
