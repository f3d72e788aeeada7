//! A model's route: its targets with their upstreams, and what the stack
//! needs to move between them (retry settings, retry budget, hedge), with
//! the metric handles it counts in, resolved once at config load.

use std::sync::Arc;
use std::time::Duration;

use prometheus::{Gauge, IntCounter};
use tokio::time::Instant;
use tower::retry::budget::TpsBudget;

use super::balance::{Balancer, InFlight, LoadRegistry, Pending, Settled, TargetLoad};
use crate::config::{Hedge, ModelConfig, Price, RetryConfig, Routing};
use crate::error::GatewayError;
use crate::telemetry::metrics::Metrics;
use crate::upstream::Upstream;

/// One place a model's requests can go.
pub struct Target {
    pub upstream: Arc<Upstream>,
    /// The model name sent upstream.
    pub model: String,
    pub priority: u32,
    pub weight: u32,
    /// Its own price, else the model's.
    pub price: Option<Price>,
}

pub struct Route {
    /// The model's name: a config name, so a metric label.
    pub label: Arc<str>,
    /// Sorted by priority.
    pub targets: Vec<Target>,
    pub retry: RetryConfig,
    pub hedge: Option<Hedge>,
    /// Retries and hedges spend it (tower's `TpsBudget`).
    pub budget: Arc<TpsBudget>,
    /// `server.max_response_bytes`: the most an attempt buffers.
    pub max_response_bytes: usize,
    /// `relaygate_failovers_total{model,from,to}` by [from target][to
    /// target]; `None` where both are on one upstream.
    failovers: Vec<Vec<Option<IntCounter>>>,
    /// `relaygate_hedges_total{model,result}`: won, lost.
    hedges: Option<[IntCounter; 2]>,
    pub routing: Routing,
    /// The estimates and picks of `latency` and `cost`; `None` for `priority`.
    balancer: Option<Balancer>,
    /// `relaygate_route_picks_total{model,upstream,strategy}`, by target.
    picks: Vec<IntCounter>,
    /// `relaygate_target_load{model,upstream}`, by target, with a balancer.
    load_gauges: Vec<Gauge>,
}

impl Route {
    /// `upstreams`: every configured upstream, in config order; `loads`:
    /// the estimates that outlive a reload.
    pub fn new(
        model: &ModelConfig,
        upstreams: &[Arc<Upstream>],
        retry: &RetryConfig,
        max_response_bytes: usize,
        metrics: &Metrics,
        loads: &LoadRegistry,
    ) -> Self {
        let targets: Vec<Target> = model
            .targets
            .iter()
            .map(|t| Target {
                upstream: upstreams[t.upstream].clone(),
                model: t.model.clone(),
                priority: t.priority,
                weight: t.weight,
                price: t.price,
            })
            .collect();
        let strategy = model.routing.strategy.as_str();
        let picks = targets
            .iter()
            .map(|t| {
                metrics
                    .route_picks
                    .with_label_values(&[model.name.as_str(), &t.upstream.name, strategy])
            })
            .collect();
        let balancer = Balancer::new(&model.name, &model.routing, &targets, loads);
        let load_gauges = match balancer {
            None => Vec::new(),
            Some(_) => targets
                .iter()
                .map(|t| {
                    metrics
                        .target_load
                        .with_label_values(&[model.name.as_str(), &t.upstream.name])
                })
                .collect(),
        };
        let failovers = targets
            .iter()
            .map(|from| {
                targets
                    .iter()
                    .map(|to| {
                        (from.upstream.index != to.upstream.index).then(|| {
                            metrics
                                .failovers
                                .with_label_values(&[&*model.name, &from.upstream.name, &to.upstream.name])
                        })
                    })
                    .collect()
            })
            .collect();
        let hedges = model
            .hedge
            .map(|_| ["won", "lost"].map(|result| metrics.hedges.with_label_values(&[&model.name, result])));
        Self {
            label: Arc::from(model.name.as_str()),
            targets,
            retry: retry.clone(),
            hedge: model.hedge,
            budget: budget(retry),
            max_response_bytes,
            failovers,
            hedges,
            routing: model.routing,
            balancer,
            picks,
            load_gauges,
        }
    }

    /// A target for the next attempt among the available targets that pass
    /// `keep`, by the model's `routing`; counted in
    /// `relaygate_route_picks_total`.
    pub fn pick(&self, keep: impl Fn(&Target) -> bool) -> Option<usize> {
        match &self.balancer {
            None => self.count_pick(self.pick_by_priority(keep)),
            Some(b) => self.count_pick(b.pick(&self.targets, keep, Instant::now(), &mut fastrand::Rng::new())),
        }
    }

    /// `pick` at `now` with `rng`: for tests and benchmarks that need the
    /// same picks every run.
    pub fn pick_with(&self, keep: impl Fn(&Target) -> bool, now: Instant, rng: &mut fastrand::Rng) -> Option<usize> {
        match &self.balancer {
            None => self.count_pick(self.pick_by_priority(keep)),
            Some(b) => self.count_pick(b.pick(&self.targets, keep, now, rng)),
        }
    }

    fn count_pick(&self, chosen: Option<usize>) -> Option<usize> {
        if let Some(i) = chosen {
            self.picks[i].inc();
        }
        chosen
    }

    /// `routing = "priority"`: the lowest priority among the available
    /// targets that pass `keep`, by weight within that priority.
    fn pick_by_priority(&self, keep: impl Fn(&Target) -> bool) -> Option<usize> {
        let targets = &self.targets;
        let candidates: Vec<usize> = (0..targets.len())
            .filter(|&i| keep(&targets[i]) && targets[i].upstream.available())
            .collect();
        let best = candidates.iter().map(|&i| targets[i].priority).min()?;
        let tier: Vec<usize> = candidates
            .into_iter()
            .filter(|&i| targets[i].priority == best)
            .collect();
        let total: u64 = tier.iter().map(|&i| u64::from(targets[i].weight)).sum();
        let mut ticket = fastrand::u64(..total.max(1));
        for &i in &tier {
            let w = u64::from(targets[i].weight);
            if ticket < w {
                return Some(i);
            }
            ticket -= w;
        }
        tier.last().copied()
    }

    /// The first target, or why there is none: every breaker open (503 with
    /// the time to the first half-open), or every upstream cooling or full.
    pub fn first_target(&self) -> Result<usize, GatewayError> {
        if let Some(t) = self.pick(|_| true) {
            return Ok(t);
        }
        let upstreams = || self.targets.iter().map(|t| &t.upstream);
        if upstreams().all(|u| !u.state.breaker.available()) {
            let retry_after = upstreams()
                .map(|u| u.state.breaker.retry_after())
                .min()
                .unwrap_or_default();
            return Err(GatewayError::CircuitOpen { retry_after });
        }
        // Cooling after a 429, or at max_concurrency: let the first target's
        // attempt decide (the retry policy waits out a cooldown that fits).
        Ok(0)
    }

    /// Counts a move from one target to another on a different upstream.
    pub fn count_failover(&self, from: usize, to: usize) {
        if let Some(counter) = &self.failovers[from][to] {
            counter.inc();
        }
    }

    /// An attempt on `target` starts: with a balancer, it counts as waiting
    /// and in flight until `settle` (or its drop).
    pub fn begin(&self, target: usize) -> Option<Pending> {
        Some(self.balancer.as_ref()?.begin(target, Instant::now()))
    }

    /// What an attempt begun with `begin` taught; for a first byte, the
    /// in-flight count a committed stream holds to its end.
    pub fn settle(&self, target: usize, pending: Pending, how: Settled) -> Option<InFlight> {
        self.balancer.as_ref()?.settle(target, pending, how, Instant::now())
    }

    /// `relaygate_route_picks_total` of each target, in target order.
    pub fn pick_counts(&self) -> Vec<u64> {
        self.picks.iter().map(IntCounter::get).collect()
    }

    /// Each target's estimate, in target order; `None` for `priority`.
    pub fn loads(&self) -> Option<Vec<TargetLoad>> {
        Some(self.balancer.as_ref()?.snapshot(&self.targets, Instant::now()))
    }

    /// Sets `relaygate_target_load` to the estimates now (at each scrape:
    /// they decay with time, not only when a sample arrives). Two targets
    /// of one upstream share a series: it shows the lower.
    pub fn export_loads(&self) {
        let Some(loads) = self.loads() else {
            return;
        };
        for (i, gauge) in self.load_gauges.iter().enumerate() {
            let upstream = self.targets[i].upstream.index;
            let lowest = (0..self.targets.len())
                .filter(|&j| self.targets[j].upstream.index == upstream)
                .map(|j| loads[j].estimate)
                .fold(f64::INFINITY, f64::min);
            gauge.set(lowest);
        }
    }

    pub fn count_hedge(&self, won: bool) {
        if let Some([w, l]) = &self.hedges {
            if won { w } else { l }.inc();
        }
    }
}

/// The retry budget of one model: tower's, from `[retry]`.
pub fn budget(cfg: &RetryConfig) -> Arc<TpsBudget> {
    Arc::new(TpsBudget::new(
        Duration::from_secs(10),
        cfg.min_retries_per_second,
        cfg.budget_ratio as f32,
    ))
}
