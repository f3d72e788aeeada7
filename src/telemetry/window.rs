//! Rolling-window request statistics for `/health`: a ring of HdrHistograms,
//! one slot per 30 s, covering `health.window` (5 minutes by default).
//!
//! Recording costs O(1): find the current slot (resetting it if it is
//! stale) and record into two histograms. Memory is fixed by the ring: every
//! slot's histograms are allocated with the window, so a process's memory is
//! flat from its start instead of creeping up for the first five minutes
//! (which a soak test cannot tell from a leak).
//! Reading merges the live slots and asks HdrHistogram for quantiles, which
//! it computes from bucket counts: no list of requests, no sort, and the
//! nearest-rank definition (no off-by-one p95).
//!
//! The ring sits behind one mutex per window, held for a few dozen
//! nanoseconds per request; an atomic design would need a histogram per
//! thread and a merge, for no measurable gain at LLM request rates.

use std::sync::Mutex;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::time::Instant;

/// 30 s slots: a slot's two histograms take 20 KiB, so a 5-minute window is
/// 10 slots, 200 KiB per window (one per upstream, plus one). Finer slots
/// cost memory for an edge nobody reads on a 5-minute window.
const SLOT: Duration = Duration::from_secs(30);
/// Latencies are recorded in microseconds, from 0.1 ms (finer resolution is
/// noise for `/health`, and costs 30 % more counters) up to an hour, with 2
/// significant digits (1 % resolution).
const MIN_MICROS: u64 = 100;
const MAX_MICROS: u64 = 3_600_000_000;

pub struct Window {
    base: Instant,
    slots: Mutex<Vec<Slot>>,
}

struct Slot {
    /// Which `SLOT` period this slot holds (`1 +` periods since `base`; 0 = unused).
    period: u64,
    total: u64,
    /// Requests whose outcome counts toward availability (see `Outcome`).
    eligible: u64,
    ok: u64,
    latency: Histogram<u32>,
    ttft: Histogram<u32>,
}

/// One request, as the window sees it.
pub struct Sample {
    pub latency: Duration,
    pub ttft: Option<Duration>,
    /// Counts toward the success rate (not a client error, rate limit or cancel).
    pub eligible: bool,
    pub ok: bool,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Quantiles {
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub avg: Option<f64>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Summary {
    pub window_seconds: u64,
    pub request_count: u64,
    /// Success over eligible requests; `None` with no eligible request.
    pub success_rate: Option<f64>,
    pub latency_ms: Option<Quantiles>,
    pub ttft_ms: Option<Quantiles>,
}

fn histogram() -> Histogram<u32> {
    // Bounds are constants that HdrHistogram accepts.
    Histogram::new_with_bounds(MIN_MICROS, MAX_MICROS, 2).expect("valid histogram bounds")
}

/// A slot's histogram, with its pages touched now: the allocator hands out
/// zeroed pages that only count as resident once written, and `reset`
/// writes them all, so an untouched histogram would grow RSS on its first
/// reset, five minutes in.
fn resident_histogram() -> Histogram<u32> {
    let mut h = histogram();
    h.reset();
    h
}

fn micros(d: Duration) -> u64 {
    (d.as_micros() as u64).clamp(1, MAX_MICROS)
}

impl Window {
    pub fn new(window: Duration) -> Self {
        let n = (window.as_secs().div_ceil(SLOT.as_secs())).max(1) as usize;
        Self {
            base: Instant::now(),
            slots: Mutex::new(
                (0..n)
                    .map(|_| Slot {
                        period: 0,
                        total: 0,
                        eligible: 0,
                        ok: 0,
                        latency: resident_histogram(),
                        ttft: resident_histogram(),
                    })
                    .collect(),
            ),
        }
    }

    fn period(&self) -> u64 {
        self.base.elapsed().as_secs() / SLOT.as_secs() + 1
    }

    pub fn record(&self, sample: &Sample) {
        let period = self.period();
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let n = slots.len() as u64;
        let slot = &mut slots[(period % n) as usize];
        if slot.period != period {
            slot.period = period;
            slot.total = 0;
            slot.eligible = 0;
            slot.ok = 0;
            slot.latency.reset();
            slot.ttft.reset();
        }
        slot.total += 1;
        if sample.eligible {
            slot.eligible += 1;
            slot.ok += u64::from(sample.ok);
        }
        let _ = slot.latency.record(micros(sample.latency));
        if let Some(ttft) = sample.ttft {
            let _ = slot.ttft.record(micros(ttft));
        }
    }

    pub fn summary(&self) -> Summary {
        let period = self.period();
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let n = slots.len() as u64;
        let (mut total, mut eligible, mut ok) = (0, 0, 0);
        let mut latency = histogram();
        let mut ttft = histogram();
        for slot in slots.iter().filter(|s| s.period != 0 && s.period + n > period) {
            total += slot.total;
            eligible += slot.eligible;
            ok += slot.ok;
            let _ = latency.add(&slot.latency);
            let _ = ttft.add(&slot.ttft);
        }
        let ms = |h: &Histogram<u32>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        let quantiles = |h: &Histogram<u32>, avg: bool| {
            (!h.is_empty()).then(|| Quantiles {
                p50: ms(h, 0.50),
                p95: ms(h, 0.95),
                p99: ms(h, 0.99),
                avg: avg.then(|| h.mean() / 1000.0),
            })
        };
        Summary {
            window_seconds: n * SLOT.as_secs(),
            request_count: total,
            success_rate: (eligible > 0).then(|| ok as f64 / eligible as f64),
            latency_ms: quantiles(&latency, true),
            ttft_ms: quantiles(&ttft, false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(ms: u64, ok: bool) -> Sample {
        Sample {
            latency: Duration::from_millis(ms),
            ttft: Some(Duration::from_millis(ms / 2)),
            eligible: true,
            ok,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn quantiles_are_nearest_rank_within_one_percent() {
        let w = Window::new(Duration::from_secs(300));
        for ms in 1..=100 {
            w.record(&sample(ms, ms <= 90));
        }
        let s = w.summary();
        assert_eq!(s.request_count, 100);
        assert_eq!(s.success_rate, Some(0.9));
        let l = s.latency_ms.unwrap();
        let close = |got: f64, want: f64| (got - want).abs() <= want * 0.01 + 0.001;
        assert!(close(l.p50, 50.0), "{l:?}");
        assert!(close(l.p95, 95.0), "{l:?}");
        assert!(close(l.p99, 99.0), "{l:?}");
        assert!(close(l.avg.unwrap(), 50.5), "{l:?}");
        assert!(close(s.ttft_ms.unwrap().p50, 25.0));
    }

    #[tokio::test(start_paused = true)]
    async fn old_slots_leave_the_window_and_memory_is_reused() {
        let w = Window::new(Duration::from_secs(60));
        for _ in 0..10 {
            w.record(&sample(500, false));
        }
        tokio::time::advance(Duration::from_secs(30)).await;
        w.record(&sample(10, true));
        assert_eq!(w.summary().request_count, 11);
        tokio::time::advance(Duration::from_secs(45)).await;
        let s = w.summary();
        assert_eq!(s.request_count, 1, "the first slot has aged out");
        assert_eq!(s.success_rate, Some(1.0));
        assert!(s.latency_ms.unwrap().p99 < 11.0);
        // A full lap later everything has aged out.
        tokio::time::advance(Duration::from_secs(120)).await;
        let s = w.summary();
        assert_eq!((s.request_count, s.success_rate, s.latency_ms), (0, None, None));
    }

    #[test]
    fn a_slot_is_20_kib() {
        // The figure the SLOT comment and docs/performance.md quote.
        let counters = histogram().distinct_values();
        assert_eq!(counters * std::mem::size_of::<u32>() * 2, 20 * 1024);
    }

    #[tokio::test(start_paused = true)]
    async fn ineligible_requests_count_but_do_not_move_the_success_rate() {
        let w = Window::new(Duration::from_secs(300));
        w.record(&sample(5, true));
        w.record(&Sample {
            latency: Duration::from_millis(1),
            ttft: None,
            eligible: false,
            ok: false,
        });
        let s = w.summary();
        assert_eq!(s.request_count, 2);
        assert_eq!(s.success_rate, Some(1.0));
    }
}
