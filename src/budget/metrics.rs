//! The budgets' metrics. Names are a contract (docs/metrics.md); labels
//! are budget names from the config and `warn_at` values, nothing a request
//! chooses.
//!
//! The three gauges (spent, reserved, limit) are read when `/metrics` is
//! scraped, not written per request: the request path touches only its
//! atomics, and a period that ended shows 0 at the next scrape even when no
//! request came to roll it over. For a budget without `match` (one budget
//! per key, model or upstream) they show the name nearest its cap; `GET
//! /admin/budgets` lists every name.

use std::sync::Arc;

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{GaugeVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

use super::Shared;

#[derive(Clone)]
pub(crate) struct Metrics {
    pub rejections: IntCounterVec,
    pub crossed: IntCounterVec,
    pub backend_errors: IntCounter,
    pub fallback_active: IntGauge,
}

struct Gauges {
    spent: GaugeVec,
    reserved: GaugeVec,
    limit: GaugeVec,
    resets_at: GaugeVec,
    shared: Arc<Shared>,
}

impl Collector for Gauges {
    fn desc(&self) -> Vec<&Desc> {
        [&self.spent, &self.reserved, &self.limit, &self.resets_at]
            .into_iter()
            .flat_map(|g| g.desc())
            .collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let now = self.shared.clock.now();
        for (i, b) in self.shared.budgets.iter().enumerate() {
            let bounds = b.period.bounds(&b.zone, now);
            let (spent, reserved) = self.shared.view.slots[i]
                .buckets()
                .into_iter()
                .filter_map(|(_, bucket)| bucket.peek(bounds))
                .map(|p| (p.spent(), p.reserved()))
                .max_by_key(|(s, r)| s + r)
                .unwrap_or((0, 0));
            let name = [b.name.as_str()];
            self.spent.with_label_values(&name).set(spent as f64 / 1e6);
            self.reserved.with_label_values(&name).set(reserved as f64 / 1e6);
            self.limit.with_label_values(&name).set(b.micros as f64 / 1e6);
            if bounds.resets() {
                self.resets_at.with_label_values(&name).set(bounds.end as f64);
            }
        }
        [&self.spent, &self.reserved, &self.limit, &self.resets_at]
            .into_iter()
            .flat_map(|g| g.collect())
            .collect()
    }
}

impl Metrics {
    pub fn register(registry: &Registry, shared: &Arc<Shared>) -> Result<Metrics, String> {
        let e = |e: prometheus::Error| e.to_string();
        let gauge = |name: &str, help: &str| GaugeVec::new(Opts::new(name, help), &["budget"]).map_err(e);
        let gauges = Gauges {
            spent: gauge(
                "relaygate_budget_spent_usd",
                "Settled spend in the budget's current period, USD (a budget without match: its name nearest the cap).",
            )?,
            reserved: gauge(
                "relaygate_budget_reserved_usd",
                "Worst-case cost reserved by requests in flight in the budget's current period, USD.",
            )?,
            limit: gauge("relaygate_budget_limit_usd", "The budget's cap per period, USD.")?,
            resets_at: gauge(
                "relaygate_budget_resets_at_seconds",
                "When the budget's current period ends, Unix seconds (absent for total budgets): the horizon of BudgetBurnTooFast.",
            )?,
            shared: shared.clone(),
        };
        let m = Metrics {
            rejections: IntCounterVec::new(
                Opts::new(
                    "relaygate_budget_rejections_total",
                    "Requests refused (429 insufficient_quota) by a spend budget.",
                ),
                &["budget"],
            )
            .map_err(e)?,
            crossed: IntCounterVec::new(
                Opts::new(
                    "relaygate_budget_threshold_crossed_total",
                    "A budget's warn_at threshold crossed: once per period and threshold.",
                ),
                &["budget", "threshold"],
            )
            .map_err(e)?,
            backend_errors: IntCounter::new(
                "relaygate_budget_backend_errors_total",
                "Failed or timed-out calls to the shared budget backend (Redis).",
            )
            .map_err(e)?,
            fallback_active: IntGauge::new(
                "relaygate_budget_fallback_active",
                "1 while Redis is considered down: budgets are enforced locally at usd / expected_instances (fail_mode open), or requests are refused (closed).",
            )
            .map_err(e)?,
        };
        let collectors: [Box<dyn Collector>; 5] = [
            Box::new(gauges),
            Box::new(m.rejections.clone()),
            Box::new(m.crossed.clone()),
            Box::new(m.backend_errors.clone()),
            Box::new(m.fallback_active.clone()),
        ];
        for c in collectors {
            registry.register(c).map_err(|e| format!("budget metrics: {e}"))?;
        }
        for b in shared.budgets.iter() {
            m.rejections.with_label_values(&[&b.name]);
            for t in &b.warn_at {
                m.crossed.with_label_values(&[&b.name, &threshold_label(*t)]);
            }
        }
        Ok(m)
    }
}

/// `0.8` → `"0.8"`: the value as written, without float noise.
pub(crate) fn threshold_label(t: f64) -> String {
    let s = format!("{t:.4}");
    s.trim_end_matches('0').trim_end_matches('.').to_owned()
}
