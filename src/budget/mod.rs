//! Spend budgets (issue 17): USD caps per client key, model, upstream or
//! globally, per day, week, month or in total, reserved at admission and
//! settled from the real usage. How they behave: docs/budgets.md.
//!
//! - `config`: the `[budget]` table and `[[budgets]]`.
//! - `period`: calendar periods in a zone, and the `Clock`.
//! - `local`: lock-free spend in this process (the local backend, Redis's
//!   fallback, and the mirror of Redis that metrics and the admin API read).
//! - `redis`: spend shared by replicas, one atomic script per call.
//! - `metrics`: the budgets' Prometheus metrics.
//!
//! The engine here: which budgets match a call, one all-or-nothing
//! reservation over all of them, the settle (exactly once, in the
//! background when it needs Redis), and the failover from Redis to the
//! local fallback, with settled money kept until Redis takes it.
//!
//! Like `ratelimit`, this module knows nothing of prices or requests:
//! callers pass micro-dollars (`micros`), and the gateway prices tokens.

pub mod config;
mod local;
mod metrics;
pub mod period;
mod redis;

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use serde::Serialize;

pub use self::config::{check_matches, validate, Budget, BudgetSettings, OnExceed, RawBudget, RawBudgetSettings};
use self::local::{cross, Held, LocalStore};
use self::metrics::{threshold_label, Metrics};
use self::period::{rfc3339, Bounds};
pub use self::period::{Clock, ManualClock, Period, SystemClock, Zone};
use self::redis::{RedisStore, Reserved, Target};
use crate::ratelimit::backend::{Health, REDIS_RETRY_EVERY};
use crate::ratelimit::{Backend, FailMode, Scope};

/// Tokens × USD per million tokens is micro-dollars: the worst case a
/// request may cost, rounded up.
pub fn micros_of(tokens: u64, usd_per_mtok: f64) -> i64 {
    let v = (tokens as f64 * usd_per_mtok).ceil();
    if v.is_finite() && v > 0.0 {
        v.min(i64::MAX as f64 / 4.0) as i64
    } else {
        0
    }
}

/// A cost in USD (as the ledger and `relaygate_cost_usd_total` have it) in
/// micro-dollars, rounded to the nearest. The ledger rebuild and the
/// settle both use it, so they agree to the micro-dollar.
pub fn usd_to_micros(usd: f64) -> i64 {
    let v = (usd * 1e6).round();
    if v.is_finite() && v > 0.0 {
        v as i64
    } else {
        0
    }
}

/// Which calls a reservation is for: the budgets each matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Once per client request, after the rate limits: key, model, global.
    Request,
    /// Per upstream attempt: upstream.
    Upstream,
    /// A shadow request: real money, but not the client's. Upstream, global.
    Shadow,
}

/// What the `/metrics` collector and the admin API read, shared with them.
pub(crate) struct Shared {
    budgets: Vec<Budget>,
    /// The local backend's spend, or, with Redis, the last values Redis
    /// returned (a mirror).
    view: LocalStore,
    clock: Box<dyn Clock>,
}

/// The spend-budget engine. Cheap to clone. `Budgets::none()` (no
/// `[[budgets]]`) costs the request path one `is_empty` check.
#[derive(Clone, Default)]
pub struct Budgets {
    inner: Option<Arc<Inner>>,
}

impl fmt::Debug for Budgets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.inner.as_ref().map_or(0, |i| i.shared.budgets.len());
        f.debug_struct("Budgets").field("budgets", &n).finish()
    }
}

struct Inner {
    shared: Arc<Shared>,
    /// Whether any budget has upstream scope: attempts reserve only then.
    upstream: bool,
    redis: Option<RedisSide>,
    metrics: Metrics,
}

struct RedisSide {
    store: RedisStore,
    /// The budgets at `usd / expected_instances`, while Redis is down.
    fallback: LocalStore,
    health: Health,
    fail_mode: FailMode,
    timeout: Duration,
    /// Settles Redis has not taken yet. Money is never dropped: they are
    /// retried, each with its op id, until Redis answers.
    pending: Mutex<Vec<PendingOp>>,
    flushing: AtomicBool,
}

/// A settle Redis still owes.
struct PendingOp {
    op: String,
    targets: Vec<Target>,
    budgets: Vec<usize>,
    cost: i64,
    /// Sent at least once, so it may have run: its op id is frozen. Until
    /// then, the spend of fallback requests on the same budgets is added
    /// to it, which keeps a long outage to one entry per budget set.
    attempted: bool,
    mergeable: bool,
}

/// More pending settles than this are merged where they can be.
const MAX_PENDING_UNMERGED: usize = 1024;

/// Process-unique op ids: a random prefix per process and a counter.
fn new_op() -> String {
    static PREFIX: std::sync::LazyLock<u64> = std::sync::LazyLock::new(|| fastrand::u64(..));
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("{:016x}{:x}", *PREFIX, NEXT.fetch_add(1, Ordering::Relaxed))
}

/// A ledger line, as the local backend's rebuild needs it.
#[derive(Debug, Clone, Copy)]
pub struct Spend<'a> {
    /// When the request finished (Unix seconds).
    pub unix: i64,
    pub key: &'a str,
    pub model: &'a str,
    pub upstream: Option<&'a str>,
    pub shadow: bool,
    pub micros: i64,
}

impl Budgets {
    /// No budgets: nothing to do on any request.
    pub fn none() -> Budgets {
        Budgets { inner: None }
    }

    /// Builds the engine and registers its metrics. With Redis it pings
    /// once (bounded by `redis_timeout`); an unreachable Redis is not an
    /// error: `fail_mode` applies until it answers.
    pub async fn new(
        settings: BudgetSettings,
        budgets: Vec<Budget>,
        registry: &prometheus::Registry,
        clock: Box<dyn Clock>,
    ) -> Result<Budgets, String> {
        if budgets.is_empty() {
            return Ok(Budgets::none());
        }
        let shared = Arc::new(Shared {
            view: LocalStore::new(&budgets, 1),
            budgets,
            clock,
        });
        let metrics = Metrics::register(registry, &shared)?;
        // Budgets with `match` (and global ones) exist before any request,
        // so that `/admin/budgets` shows them from the start (the store made
        // their buckets): here they enter their current period.
        let now = shared.clock.now();
        for (i, b) in shared.budgets.iter().enumerate() {
            if let Some(name) = fixed_bucket(b) {
                let bounds = || b.period.bounds(&b.zone, now);
                shared.view.slots[i].bucket(name, bounds).at(now, bounds);
            }
        }
        let redis = match &settings.backend {
            Backend::Local => None,
            Backend::Redis { url } => Some(RedisSide {
                store: RedisStore::new(url, settings.redis_timeout, &settings.key_prefix)?,
                fallback: LocalStore::new(&shared.budgets, settings.expected_instances),
                health: Health::new(
                    "budget",
                    metrics.backend_errors.clone(),
                    metrics.fallback_active.clone(),
                ),
                fail_mode: settings.fail_mode,
                timeout: settings.redis_timeout,
                pending: Mutex::new(Vec::new()),
                flushing: AtomicBool::new(false),
            }),
        };
        let upstream = shared.budgets.iter().any(|b| b.scope == Scope::Upstream);
        let inner = Arc::new(Inner {
            shared,
            upstream,
            redis,
            metrics,
        });
        if let Some(r) = &inner.redis {
            match tokio::time::timeout(r.timeout, r.store.ping()).await {
                Ok(Ok(())) => tracing::info!("budget: connected to Redis"),
                Ok(Err(e)) => r.health.failed(&e.to_string()),
                Err(_) => r.health.failed("timed out"),
            }
            tokio::spawn(retry_pending(Arc::downgrade(&inner)));
        }
        Ok(Budgets { inner: Some(inner) })
    }

    pub fn is_empty(&self) -> bool {
        self.inner.is_none()
    }

    pub fn budgets(&self) -> &[Budget] {
        self.inner.as_ref().map_or(&[], |i| &i.shared.budgets)
    }

    /// Whether any budget has upstream scope (so attempts reserve): one
    /// load, checked per attempt.
    pub fn has_upstream_budgets(&self) -> bool {
        self.inner.as_ref().is_some_and(|i| i.upstream)
    }

    /// Each budget with the requests it has refused since start.
    pub fn rejections(&self) -> Vec<(&Budget, u64)> {
        let Some(inner) = &self.inner else {
            return Vec::new();
        };
        inner
            .shared
            .budgets
            .iter()
            .map(|b| (b, inner.metrics.rejections.with_label_values(&[&b.name]).get()))
            .collect()
    }

    /// The key, model and global budgets of a client request (the
    /// configured model name, after routing). `micros`: its worst case.
    pub async fn reserve_request(&self, key: &str, model: &str, micros: i64) -> Result<Reservation, Rejection> {
        self.reserve(Phase::Request, key, model, None, micros).await
    }

    /// The upstream budgets of one attempt at `upstream`.
    pub async fn reserve_upstream(&self, upstream: &str, micros: i64) -> Result<Reservation, Rejection> {
        self.reserve(Phase::Upstream, "", "", Some(upstream), micros).await
    }

    /// A shadow request to `upstream`: its upstream and the global budgets,
    /// never the client key's or the model's.
    pub async fn reserve_shadow(&self, upstream: &str, micros: i64) -> Result<Reservation, Rejection> {
        self.reserve(Phase::Shadow, "", "", Some(upstream), micros).await
    }

    async fn reserve(
        &self,
        phase: Phase,
        key: &str,
        model: &str,
        upstream: Option<&str>,
        micros: i64,
    ) -> Result<Reservation, Rejection> {
        let Some(inner) = &self.inner else {
            return Ok(Reservation::none());
        };
        let mut matching = inner.matching(phase, key, model, upstream).peekable();
        if matching.peek().is_none() {
            return Ok(Reservation::none());
        }
        let amount = micros.max(0);
        let now = inner.shared.clock.now();
        let Some(redis) = &inner.redis else {
            // Local: the matches go straight into the held periods.
            let view = &inner.shared.view;
            let held: Vec<Held> = matching
                .map(|(b, bucket)| inner.held_at(view, b, bucket, now))
                .collect();
            return match view.reserve(&held, amount) {
                Ok(()) => Ok(inner.reservation(Part {
                    source: Source::Local,
                    op: String::new(),
                    amount,
                    held,
                    targets: Vec::new(),
                })),
                Err(i) => {
                    let m = inner
                        .matching(phase, key, model, upstream)
                        .nth(i)
                        .unwrap_or((held[i].budget, ""));
                    Err(inner.reject(&m, held[i].period.bounds, view, &held[i], amount))
                }
            };
        };
        let matched: Vec<(usize, &str)> = matching.collect();
        // The mirror's periods name the Redis keys: their bounds are
        // computed once per period, not per request.
        let mirror = inner.held_now(&inner.shared.view, &matched, now);
        let bounds: Vec<Bounds> = mirror.iter().map(|h| h.period.bounds).collect();
        let targets: Vec<Target> = matched
            .iter()
            .zip(&bounds)
            .map(|(&(b, bucket), &bounds)| inner.target(redis, b, bucket, bounds))
            .collect();
        if redis.health.may_call() {
            let op = new_op();
            match tokio::time::timeout(redis.timeout, redis.store.reserve(&op, &targets, amount)).await {
                Ok(Ok(reply)) => {
                    if redis.health.succeeded() {
                        inner.kick_flush();
                    }
                    return match reply {
                        Reserved::Admitted(values) => {
                            for (h, (spent, reserved)) in mirror.iter().zip(values) {
                                mirror_set(h, spent, reserved);
                            }
                            Ok(inner.reservation(Part {
                                source: Source::Redis,
                                op,
                                amount,
                                held: mirror,
                                targets,
                            }))
                        }
                        Reserved::Refused { index, spent, reserved } => {
                            let i = index.min(matched.len() - 1);
                            mirror_set(&mirror[i], spent, reserved);
                            Err(inner.reject(&matched[i], bounds[i], &inner.shared.view, &mirror[i], amount))
                        }
                    };
                }
                Ok(Err(e)) => redis.health.failed(&e.to_string()),
                Err(_) => redis.health.failed("timed out"),
            }
            // The script may have run: give its reservation back (if it
            // made one) once Redis answers.
            inner.owe(PendingOp {
                op,
                budgets: matched.iter().map(|&(b, _)| b).collect(),
                targets: targets.clone(),
                cost: 0,
                attempted: true,
                mergeable: false,
            });
        }
        match redis.fail_mode {
            FailMode::Closed => Err(Rejection {
                unavailable: true,
                ..inner.rejection_of(&matched[0], bounds[0], 0, 0, 0)
            }),
            FailMode::Open => {
                let held = held_in(&redis.fallback, &matched, &bounds);
                match redis.fallback.reserve(&held, amount) {
                    Ok(()) => Ok(inner.reservation(Part {
                        source: Source::Fallback,
                        op: new_op(),
                        amount,
                        held,
                        targets,
                    })),
                    Err(i) => Err(inner.reject(&matched[i], bounds[i], &redis.fallback, &held[i], amount)),
                }
            }
        }
    }

    /// Adds one ledger line's cost to the periods it falls in (the local
    /// backend's rebuild at start; Redis keeps its own). Thresholds the
    /// rebuilt spend has reached are marked crossed without counting them
    /// again.
    pub fn restore(&self, line: Spend<'_>) {
        let Some(inner) = &self.inner else { return };
        if inner.redis.is_some() || line.micros <= 0 {
            return;
        }
        let now = inner.shared.clock.now();
        let scopes = if line.shadow {
            inner.matching(Phase::Shadow, "", "", line.upstream).collect()
        } else {
            let mut m: Vec<_> = inner.matching(Phase::Request, line.key, line.model, None).collect();
            m.extend(inner.matching(Phase::Upstream, "", "", line.upstream));
            m
        };
        for (b, bucket) in scopes {
            let budget = &inner.shared.budgets[b];
            let bounds = budget.period.bounds(&budget.zone, now);
            if !bounds.contains(line.unix) {
                continue;
            }
            let period = inner.shared.view.slots[b].bucket(bucket, || bounds).period(bounds);
            period.used.fetch_add(line.micros, Ordering::AcqRel);
            let spent = period.spent.fetch_add(line.micros, Ordering::AcqRel) + line.micros;
            cross(&inner.shared.view.slots[b].thresholds, &period.crossed, spent);
        }
    }

    /// Per budget: each name's spend, reservations, cap and reset, for
    /// `GET /admin/budgets`. With Redis, read from Redis (bounded by
    /// `redis_timeout`); if it does not answer, this process's last view,
    /// marked so.
    pub async fn report(&self) -> Vec<BudgetReport> {
        let Some(inner) = &self.inner else {
            return Vec::new();
        };
        let now = inner.shared.clock.now();
        let mut out = Vec::new();
        let mut keys = Vec::new();
        for (i, b) in inner.shared.budgets.iter().enumerate() {
            let bounds = b.period.bounds(&b.zone, now);
            let mut names = Vec::new();
            for (name, bucket) in inner.shared.view.slots[i].buckets() {
                let (spent, reserved) = bucket.peek(bounds).map_or((0, 0), |p| (p.spent(), p.reserved()));
                if let Some(r) = &inner.redis {
                    keys.push((out.len(), names.len(), inner.target(r, i, &name, bounds).key));
                }
                names.push(BucketReport {
                    name,
                    spent_usd: usd(spent),
                    reserved_usd: usd(reserved),
                    remaining_usd: usd((b.micros - spent - reserved).max(0)),
                });
            }
            out.push(BudgetReport {
                name: b.name.clone(),
                scope: b.scope.as_str(),
                r#match: b.matches.clone(),
                period: b.period.as_str(),
                timezone: b.zone.to_string(),
                on_exceed: match b.on_exceed {
                    OnExceed::Reject => "reject",
                    OnExceed::Warn => "warn",
                },
                limit_usd: usd(b.micros),
                warn_at: b.warn_at.clone(),
                period_start: rfc3339(bounds.start),
                resets_at: bounds.resets().then(|| rfc3339(bounds.end)),
                source: if inner.redis.is_some() { "redis" } else { "local" },
                buckets: names,
            });
        }
        if let Some(r) = &inner.redis {
            let list: Vec<String> = keys.iter().map(|(_, _, k)| k.clone()).collect();
            match tokio::time::timeout(r.timeout, r.store.read(&list)).await {
                Ok(Ok(values)) => {
                    for ((b, n, _), (spent, reserved)) in keys.iter().zip(values) {
                        let report = &mut out[*b];
                        let cap = inner.shared.budgets[*b].micros;
                        report.buckets[*n].spent_usd = usd(spent);
                        report.buckets[*n].reserved_usd = usd(reserved);
                        report.buckets[*n].remaining_usd = usd((cap - spent - reserved).max(0));
                    }
                }
                _ => out
                    .iter_mut()
                    .for_each(|r| r.source = "local view (Redis did not answer)"),
            }
        }
        out
    }

    /// Settles Redis still owes (for tests and the admin API).
    pub fn pending_settles(&self) -> usize {
        self.inner
            .as_ref()
            .and_then(|i| i.redis.as_ref())
            .map_or(0, |r| r.pending.lock().unwrap_or_else(|p| p.into_inner()).len())
    }

    /// Applies a settlement. Exactly once: replaying one (a retry after a
    /// timeout) moves no spend, locally by its flag, in Redis by its op id.
    /// Redis failures leave it owed, retried until Redis takes it.
    pub async fn apply(&self, s: &Settlement) {
        let Some(inner) = &self.inner else { return };
        inner.apply(s).await;
    }
}

/// One budget of `/admin/budgets`.
#[derive(Debug, Clone, Serialize)]
pub struct BudgetReport {
    pub name: String,
    pub scope: &'static str,
    #[serde(rename = "match")]
    pub r#match: Option<String>,
    pub period: &'static str,
    pub timezone: String,
    pub on_exceed: &'static str,
    pub limit_usd: f64,
    pub warn_at: Vec<f64>,
    pub period_start: String,
    /// `None` for `total`.
    pub resets_at: Option<String>,
    pub source: &'static str,
    pub buckets: Vec<BucketReport>,
}

/// One name of a budget (`*` for global).
#[derive(Debug, Clone, Serialize)]
pub struct BucketReport {
    pub name: String,
    pub spent_usd: f64,
    pub reserved_usd: f64,
    pub remaining_usd: f64,
}

fn usd(micros: i64) -> f64 {
    micros as f64 / 1e6
}

/// The one bucket of a budget with `match`, or of a global one.
pub(crate) fn fixed_bucket(b: &Budget) -> Option<&str> {
    match (&b.matches, b.scope) {
        (Some(m), _) => Some(m),
        (None, Scope::Global) => Some("*"),
        (None, _) => None,
    }
}

fn held_in(store: &LocalStore, matched: &[(usize, &str)], bounds: &[Bounds]) -> Vec<Held> {
    matched
        .iter()
        .zip(bounds)
        .map(|(&(b, bucket), &bounds)| Held {
            budget: b,
            period: store.slots[b].bucket(bucket, || bounds).period(bounds),
        })
        .collect()
}

fn mirror_set(h: &Held, spent: i64, reserved: i64) {
    h.period.spent.store(spent, Ordering::Release);
    h.period.used.store(spent + reserved, Ordering::Release);
}

impl Inner {
    /// The periods holding `now` of the `matched` budgets in `store`.
    fn held_now(&self, store: &LocalStore, matched: &[(usize, &str)], now: i64) -> Vec<Held> {
        matched
            .iter()
            .map(|&(b, bucket)| self.held_at(store, b, bucket, now))
            .collect()
    }

    /// The period holding `now` of budget `b`'s `bucket` in `store`.
    fn held_at(&self, store: &LocalStore, b: usize, bucket: &str, now: i64) -> Held {
        let budget = &self.shared.budgets[b];
        let bounds = || budget.period.bounds(&budget.zone, now);
        Held {
            budget: b,
            period: store.slots[b].bucket(bucket, bounds).at(now, bounds),
        }
    }

    /// The budgets a call meets, with the name of its bucket in each, in
    /// budget order.
    fn matching<'a>(
        &'a self,
        phase: Phase,
        key: &'a str,
        model: &'a str,
        upstream: Option<&'a str>,
    ) -> impl Iterator<Item = (usize, &'a str)> + 'a {
        self.shared.budgets.iter().enumerate().filter_map(move |(i, b)| {
            let name = match (phase, b.scope) {
                (Phase::Request, Scope::Key) => key,
                (Phase::Request, Scope::Model) => model,
                (Phase::Request | Phase::Shadow, Scope::Global) => "*",
                (Phase::Upstream | Phase::Shadow, Scope::Upstream) => upstream?,
                _ => return None,
            };
            b.matches.as_deref().is_none_or(|m| m == name).then_some((i, name))
        })
    }

    fn target(&self, redis: &RedisSide, b: usize, bucket: &str, bounds: Bounds) -> Target {
        let budget = &self.shared.budgets[b];
        Target {
            key: redis
                .store
                .period_key(&budget.name, bucket, &bounds.label(&budget.zone)),
            cap: if budget.on_exceed == OnExceed::Reject {
                budget.micros
            } else {
                -1
            },
            // A day past the period's end: a replica whose clock runs a
            // little behind still finds the key.
            expire_at_ms: if bounds.resets() {
                bounds.end.saturating_add(86_400).saturating_mul(1000)
            } else {
                0
            },
            thresholds: budget.thresholds().map(|t| t.to_string()).collect::<Vec<_>>().join(","),
        }
    }

    fn reservation(self: &Arc<Self>, part: Part) -> Reservation {
        Reservation {
            inner: Some(self.clone()),
            parts: vec![part],
        }
    }

    fn rejection_of(&self, m: &(usize, &str), bounds: Bounds, spent: i64, reserved: i64, cap: i64) -> Rejection {
        let b = &self.shared.budgets[m.0];
        Rejection {
            budget: b.name.clone(),
            scope: b.scope,
            name: m.1.to_owned(),
            spent_micros: spent,
            reserved_micros: reserved,
            limit_micros: cap,
            period: b.period,
            resets_at: bounds.resets().then(|| rfc3339(bounds.end)),
            retry_after: bounds
                .resets()
                .then(|| Duration::from_secs(u64::try_from(bounds.end - self.shared.clock.now()).unwrap_or(0).max(1))),
            unavailable: false,
        }
    }

    fn reject(&self, m: &(usize, &str), bounds: Bounds, store: &LocalStore, held: &Held, _amount: i64) -> Rejection {
        self.metrics
            .rejections
            .with_label_values(&[&self.shared.budgets[m.0].name])
            .inc();
        let cap = store.slots[m.0].cap;
        self.rejection_of(m, bounds, held.period.spent(), held.period.reserved(), cap)
    }

    fn count_crossed(&self, budget: usize, bits: u32) {
        if bits == 0 {
            return;
        }
        let b = &self.shared.budgets[budget];
        for (i, t) in b.warn_at.iter().enumerate() {
            if bits & (1 << i) != 0 {
                self.metrics
                    .crossed
                    .with_label_values(&[&b.name, &threshold_label(*t)])
                    .inc();
                tracing::warn!(budget = %b.name, threshold = t, "budget: threshold crossed");
            }
        }
    }

    fn owe(&self, op: PendingOp) {
        let Some(redis) = &self.redis else { return };
        let mut pending = redis.pending.lock().unwrap_or_else(|p| p.into_inner());
        if op.mergeable && pending.len() >= MAX_PENDING_UNMERGED {
            if let Some(same) = pending.iter_mut().find(|p| {
                p.mergeable && !p.attempted && p.targets.iter().map(|t| &t.key).eq(op.targets.iter().map(|t| &t.key))
            }) {
                same.cost += op.cost;
                return;
            }
        }
        pending.push(op);
    }

    fn kick_flush(self: &Arc<Self>) {
        let Some(redis) = &self.redis else { return };
        if redis.pending.lock().unwrap_or_else(|p| p.into_inner()).is_empty() {
            return;
        }
        let inner = self.clone();
        tokio::spawn(async move { inner.flush().await });
    }

    /// Sends what Redis owes, oldest first, until one fails.
    async fn flush(&self) {
        let Some(redis) = &self.redis else { return };
        if redis.flushing.swap(true, Ordering::AcqRel) {
            return;
        }
        loop {
            let next = {
                let mut pending = redis.pending.lock().unwrap_or_else(|p| p.into_inner());
                match pending.first_mut() {
                    None => break,
                    Some(op) => {
                        op.attempted = true;
                        (op.op.clone(), op.targets.clone(), op.budgets.clone(), op.cost)
                    }
                }
            };
            let (op, targets, budgets, cost) = next;
            match tokio::time::timeout(redis.timeout, redis.store.settle(&op, &targets, cost)).await {
                Ok(Ok(settled)) => {
                    redis.health.succeeded();
                    if let Some(rows) = settled {
                        for (b, (_, _, crossed)) in budgets.iter().zip(rows) {
                            self.count_crossed(*b, crossed);
                        }
                    }
                    let mut pending = redis.pending.lock().unwrap_or_else(|p| p.into_inner());
                    if pending.first().is_some_and(|p| p.op == op) {
                        pending.remove(0);
                    }
                }
                Ok(Err(e)) => {
                    redis.health.failed(&e.to_string());
                    break;
                }
                Err(_) => {
                    redis.health.failed("timed out");
                    break;
                }
            }
        }
        redis.flushing.store(false, Ordering::Release);
    }

    /// The local parts of a settle: two atomic adds per budget, and the
    /// thresholds.
    fn settle_local(&self, parts: &[Part], cost: i64) {
        for part in parts.iter().filter(|p| p.source == Source::Local) {
            LocalStore::settle(&part.held, part.amount, cost);
            for h in &part.held {
                let bits = cross(
                    &self.shared.view.slots[h.budget].thresholds,
                    &h.period.crossed,
                    h.period.spent(),
                );
                self.count_crossed(h.budget, bits);
            }
        }
    }

    async fn apply(self: &Arc<Self>, s: &Settlement) {
        let first = !s.applied.swap(true, Ordering::AcqRel);
        for part in &s.parts {
            match part.source {
                Source::Local => {
                    if first {
                        self.settle_local(std::slice::from_ref(part), s.cost);
                    }
                }
                Source::Redis | Source::Fallback => {
                    let Some(redis) = &self.redis else { continue };
                    let fallback = part.source == Source::Fallback;
                    if fallback && first {
                        LocalStore::settle(&part.held, part.amount, s.cost);
                    }
                    // A fallback request reserved nothing in Redis: only its
                    // cost goes there, under its own op id.
                    if fallback && s.cost == 0 {
                        continue;
                    }
                    let budgets: Vec<usize> = part.held.iter().map(|h| h.budget).collect();
                    let tried = redis.health.may_call();
                    let sent = tried
                        && match tokio::time::timeout(
                            redis.timeout,
                            redis.store.settle(&part.op, &part.targets, s.cost),
                        )
                        .await
                        {
                            Ok(Ok(settled)) => {
                                if redis.health.succeeded() {
                                    // Redis is back: what it owes goes now.
                                    self.kick_flush();
                                }
                                if let Some(rows) = settled {
                                    for ((h, b), (spent, reserved, crossed)) in part.held.iter().zip(&budgets).zip(rows)
                                    {
                                        if !fallback {
                                            mirror_set(h, spent, reserved);
                                        }
                                        self.count_crossed(*b, crossed);
                                    }
                                }
                                true
                            }
                            Ok(Err(e)) => {
                                redis.health.failed(&e.to_string());
                                false
                            }
                            Err(_) => {
                                redis.health.failed("timed out");
                                false
                            }
                        };
                    if !sent && first {
                        self.owe(PendingOp {
                            op: part.op.clone(),
                            targets: part.targets.clone(),
                            budgets,
                            cost: s.cost,
                            // Sent and failed: it may have run, so its op id
                            // is frozen. Never sent: only ours yet.
                            attempted: tried,
                            mergeable: fallback,
                        });
                    }
                }
            }
        }
    }
}

/// While Redis owes settles, try them once a second.
async fn retry_pending(inner: Weak<Inner>) {
    let mut tick = tokio::time::interval(REDIS_RETRY_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        let Some(redis) = &inner.redis else { return };
        let owed = !redis.pending.lock().unwrap_or_else(|p| p.into_inner()).is_empty();
        if owed && redis.health.may_call() {
            inner.flush().await;
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Local,
    Redis,
    Fallback,
}

/// One phase's reservation in one store.
#[derive(Clone)]
struct Part {
    source: Source,
    /// The Redis op id (`Redis`; `Fallback`: for its spend, sent later).
    op: String,
    amount: i64,
    /// Local/fallback: the periods reserved in. Redis: the mirror's.
    held: Vec<Held>,
    /// The Redis periods (also for the fallback: its spend goes there later).
    targets: Vec<Target>,
}

/// What an admitted call reserved. Settle it with the real cost; dropped
/// unsettled, the reservation stays held until its period ends (the safe
/// side), so every path settles, with 0 when nothing was spent.
#[must_use = "settle the reservation with the real cost"]
#[derive(Default)]
pub struct Reservation {
    inner: Option<Arc<Inner>>,
    parts: Vec<Part>,
}

impl fmt::Debug for Reservation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reservation").field("parts", &self.parts.len()).finish()
    }
}

impl Reservation {
    /// Nothing matched: nothing to settle.
    pub fn none() -> Reservation {
        Reservation::default()
    }

    pub fn is_none(&self) -> bool {
        self.parts.is_empty()
    }

    /// One reservation for the request phase and the attempt phase.
    pub fn merge(mut self, other: Reservation) -> Reservation {
        self.inner = self.inner.or(other.inner);
        self.parts.extend(other.parts);
        self
    }

    /// The settlement of this reservation at `cost` micro-dollars, to
    /// apply with `Budgets::apply` (replays are no-ops).
    pub fn settlement(self, cost: i64) -> Settlement {
        Settlement {
            parts: self.parts,
            cost: cost.max(0),
            applied: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Settles at `cost`: at once when that needs no I/O (the local
    /// backend), else in a spawned task. A request never waits on it.
    pub fn settle_in_background(self, cost: i64) {
        let Some(inner) = self.inner.clone() else { return };
        if self.parts.is_empty() {
            return;
        }
        if self.parts.iter().all(|p| p.source == Source::Local) {
            // No I/O and consumed here: no settlement to make replayable.
            inner.settle_local(&self.parts, cost.max(0));
            return;
        }
        let settlement = self.settlement(cost);
        tokio::spawn(async move { inner.apply(&settlement).await });
    }
}

/// A reservation turned into its final cost.
#[derive(Clone)]
pub struct Settlement {
    parts: Vec<Part>,
    cost: i64,
    applied: Arc<AtomicBool>,
}

/// A refused call.
#[derive(Debug, Clone)]
pub struct Rejection {
    pub budget: String,
    pub scope: Scope,
    /// The key, model or upstream name (`*` for global).
    pub name: String,
    pub spent_micros: i64,
    pub reserved_micros: i64,
    /// The cap the refusing store enforces (the fallback: its share).
    pub limit_micros: i64,
    pub period: Period,
    /// RFC 3339; `None` for `total`.
    pub resets_at: Option<String>,
    /// Until the reset; `None` for `total`.
    pub retry_after: Option<Duration>,
    /// Redis is down and `fail_mode = "closed"`: answer 503.
    pub unavailable: bool,
}

impl Rejection {
    /// What the client reads: which budget, its scope, spend, cap and reset.
    pub fn message(&self) -> String {
        let scope = match self.scope {
            Scope::Global => "global".to_owned(),
            s => format!("{s} '{}'", self.name),
        };
        let reset = match &self.resets_at {
            Some(at) => format!("it resets at {at}"),
            None => "it is a total budget and does not reset".to_owned(),
        };
        format!(
            "Budget '{}' ({scope}, per {}) has no room for this request: ${:.6} spent and ${:.6} reserved of ${:.2}; {reset}.",
            self.budget,
            self.period.as_str(),
            usd(self.spent_micros),
            usd(self.reserved_micros),
            usd(self.limit_micros),
        )
    }
}

#[cfg(test)]
mod tests;
