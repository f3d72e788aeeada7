//! The cache's metrics. Names are a contract (docs/metrics.md); labels are
//! configured model names and closed sets (`CacheResult`, token types).

use std::sync::Arc;

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{CounterVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

use crate::usage::Usage;

/// `relaygate_cache_requests_total{result}`: the lookup's result (hit,
/// miss, bypass, refresh), and the store's (stored, not_stored).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheResult {
    Hit,
    Miss,
    Bypass,
    Refresh,
    Stored,
    NotStored,
}

impl CacheResult {
    /// In the order of their discriminants (`ModelCounters` indexes by them).
    pub const ALL: [CacheResult; 6] = [
        CacheResult::Hit,
        CacheResult::Miss,
        CacheResult::Bypass,
        CacheResult::Refresh,
        CacheResult::Stored,
        CacheResult::NotStored,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CacheResult::Hit => "hit",
            CacheResult::Miss => "miss",
            CacheResult::Bypass => "bypass",
            CacheResult::Refresh => "refresh",
            CacheResult::Stored => "stored",
            CacheResult::NotStored => "not_stored",
        }
    }
}

/// `relaygate_cache_requests_total`'s series for one model, one per result:
/// counted without a lookup by label (two per miss, 2.4 % of criterion
/// `cache/miss_store/1KiB`).
pub struct ModelCounters([IntCounter; 6]);

impl ModelCounters {
    pub fn count(&self, result: CacheResult) {
        self.0[result as usize].inc();
    }
}

/// Reads (entries, bytes) from a backend that knows them.
pub type SizeFn = Box<dyn Fn() -> (u64, u64) + Send + Sync>;

#[derive(Clone)]
pub struct Metrics {
    requests: IntCounterVec,
    saved_usd: CounterVec,
    tokens_served: IntCounterVec,
    pub backend_errors: IntCounter,
}

impl Metrics {
    /// Registers on `registry`; `size`, when the backend knows its size
    /// (memory), reports `relaygate_cache_entries` and `relaygate_cache_bytes`
    /// at each scrape.
    pub fn register(registry: &Registry, size: Option<SizeFn>) -> Result<Self, String> {
        let e = |e: prometheus::Error| e.to_string();
        let m = Metrics {
            requests: IntCounterVec::new(
                Opts::new(
                    "relaygate_cache_requests_total",
                    "Response cache lookups (hit, miss, bypass, refresh) and stores (stored, not_stored), by model.",
                ),
                &["model", "result"],
            )
            .map_err(e)?,
            saved_usd: CounterVec::new(
                Opts::new(
                    "relaygate_cache_saved_usd_total",
                    "The price of the usage that cache hits replayed instead of buying it upstream, by model.",
                ),
                &["model"],
            )
            .map_err(e)?,
            tokens_served: IntCounterVec::new(
                Opts::new(
                    "relaygate_cache_tokens_served_total",
                    "Tokens of the answers served from the cache, by model and type.",
                ),
                &["model", "type"],
            )
            .map_err(e)?,
            backend_errors: IntCounter::new(
                "relaygate_cache_backend_errors_total",
                "Failed or timed-out cache backend calls (Redis); the request went upstream.",
            )
            .map_err(e)?,
        };
        registry.register(Box::new(m.requests.clone())).map_err(e)?;
        registry.register(Box::new(m.saved_usd.clone())).map_err(e)?;
        registry.register(Box::new(m.tokens_served.clone())).map_err(e)?;
        registry.register(Box::new(m.backend_errors.clone())).map_err(e)?;
        if let Some(size) = size {
            registry.register(Box::new(SizeCollector::new(size)?)).map_err(e)?;
        }
        Ok(m)
    }

    /// A cache-enabled model's counters, resolved once (at config load):
    /// its series exist from then on, so dashboards see zeros.
    pub fn for_model(&self, model: &str) -> Arc<ModelCounters> {
        self.saved_usd.with_label_values(&[model]);
        Arc::new(ModelCounters(
            CacheResult::ALL.map(|r| self.requests.with_label_values(&[model, r.as_str()])),
        ))
    }

    /// A hit replayed `usage` worth `saved_usd`.
    pub fn served(&self, model: &str, usage: &Usage, saved_usd: f64) {
        if saved_usd > 0.0 {
            self.saved_usd.with_label_values(&[model]).inc_by(saved_usd);
        }
        let types = crate::telemetry::metrics::TOKEN_TYPES;
        for (kind, n) in types
            .iter()
            .zip([usage.prompt, usage.completion, usage.cached_prompt, usage.reasoning])
        {
            if n > 0 {
                self.tokens_served.with_label_values(&[model, kind]).inc_by(n);
            }
        }
    }

    /// What `relaygate_cache_saved_usd_total` says for one model.
    pub fn saved_usd(&self, model: &str) -> f64 {
        self.saved_usd.with_label_values(&[model]).get()
    }

    /// What `relaygate_cache_requests_total` says for one model and result.
    pub fn get(&self, model: &str, result: CacheResult) -> u64 {
        self.requests.with_label_values(&[model, result.as_str()]).get()
    }
}

/// `relaygate_cache_entries` and `relaygate_cache_bytes`, read from the
/// backend at each scrape rather than kept in step on every insert and
/// eviction.
struct SizeCollector {
    size: SizeFn,
    entries: IntGauge,
    bytes: IntGauge,
    descs: Vec<Desc>,
}

impl SizeCollector {
    fn new(size: SizeFn) -> Result<Self, String> {
        let entries = IntGauge::new(
            "relaygate_cache_entries",
            "Entries in the response cache (memory backend).",
        )
        .map_err(|e| e.to_string())?;
        let bytes = IntGauge::new(
            "relaygate_cache_bytes",
            "Weight of the response cache's entries in bytes, bounded by max_bytes (memory backend).",
        )
        .map_err(|e| e.to_string())?;
        let descs = entries.desc().into_iter().chain(bytes.desc()).cloned().collect();
        Ok(Self {
            size,
            entries,
            bytes,
            descs,
        })
    }
}

impl Collector for SizeCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let (entries, bytes) = (self.size)();
        self.entries.set(i64::try_from(entries).unwrap_or(i64::MAX));
        self.bytes.set(i64::try_from(bytes).unwrap_or(i64::MAX));
        self.entries.collect().into_iter().chain(self.bytes.collect()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `ModelCounters` indexes by discriminant: `ALL` must list them in order.
    #[test]
    fn all_results_are_in_discriminant_order() {
        for (i, r) in CacheResult::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "{}", r.as_str());
        }
    }
}
