//! Rate limiting: requests-per-minute and tokens-per-minute rules per client
//! key, model, upstream or globally (issue 4). How it works, and how to run
//! several replicas on one Redis: docs/ratelimit.md.
//!
//! - `config`: the `[rate_limit]` table and `[[rate_limits]]` rules.
//! - `gcra`: the arithmetic shared by the backends, and the headers.
//! - `local`: in-process buckets decided by `governor`.
//! - `redis`: shared buckets, one atomic Lua script per call.
//! - `estimate`: the token estimate reserved before the usage is known.
//! - `metrics`: the rate limiter's Prometheus metrics.
//!
//! The engine here: which rules match a call (`admit_request`: scopes key,
//! model, global; `admit_upstream`: scope upstream), one all-or-nothing
//! decision over all of them, queueing for `on_limit = "queue"` rules, and
//! the failover from Redis to the local fallback (`Health`).

pub mod backend;
pub mod config;
mod estimate;
mod gcra;
mod local;
mod metrics;
mod redis;

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{header, HeaderMap, HeaderValue};
use tokio::time::Instant;

use self::backend::Health;
pub use self::config::{
    check_matches, validate, Backend, FailMode, Limit, OnLimit, RateLimitSettings, RawRateLimit, RawRule, Rule,
};
pub use self::estimate::{estimate, estimate_prompt_tokens, estimate_tokens};
pub(crate) use self::estimate::{from_fields as estimate_from_fields, Counted};
use self::gcra::{retry_after_secs, Dim, Gcra, Info};
use self::local::LocalStore;
use self::metrics::{Metrics, QueueResult};
use self::redis::RedisStore;

/// What a rule counts per: each client key, each model, each upstream, or
/// everything together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    Key,
    Model,
    Upstream,
    Global,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Key => "key",
            Scope::Model => "model",
            Scope::Upstream => "upstream",
            Scope::Global => "global",
        }
    }

    pub fn parse(text: &str) -> Option<Scope> {
        match text {
            "key" => Some(Scope::Key),
            "model" => Some(Scope::Model),
            "upstream" => Some(Scope::Upstream),
            "global" => Some(Scope::Global),
            _ => None,
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

use self::backend::REDIS_RETRY_EVERY;

/// A queued request re-checks at least this often: capacity can come back
/// before the computed wait when `reconcile` gives tokens back.
const QUEUE_POLL_MAX: Duration = Duration::from_millis(250);
const QUEUE_POLL_MIN: Duration = Duration::from_millis(1);

/// The rate-limiting engine. Cheap to clone (an `Arc` inside).
#[derive(Clone)]
pub struct Limiter {
    inner: Arc<Inner>,
}

impl fmt::Debug for Limiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Limiter")
            .field("rules", &self.inner.slots.len())
            .field("settings", &self.inner.settings)
            .finish()
    }
}

struct Inner {
    settings: RateLimitSettings,
    slots: Vec<Slot>,
    store: Store,
    metrics: Metrics,
}

struct Slot {
    rule: Rule,
    /// The rule's queue. tokio's mutex is fair (FIFO), and a waiter whose
    /// future is dropped leaves it. Held by the head of the queue while it
    /// waits for capacity.
    queue: tokio::sync::Mutex<()>,
    /// Callers queued or queueing on this rule; while nonzero, newcomers
    /// queue behind them instead of trying first.
    waiting: AtomicUsize,
}

// One per limiter, never moved around: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
enum Store {
    Local(LocalStore),
    Redis {
        redis: RedisStore,
        /// The same rules at `limit / expected_instances`, used while Redis
        /// is down with `fail_mode = "open"`.
        fallback: LocalStore,
        health: Health,
        fail_mode: FailMode,
        timeout: Duration,
    },
}

/// Which store decided, so that `reconcile` goes back to the same one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Local,
    Redis,
    Fallback,
}

/// The GCRA parameters of one rule's limits in one store.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RuleParams {
    requests: Option<Gcra>,
    tokens: Option<Gcra>,
}

impl RuleParams {
    fn of(rule: &Rule) -> RuleParams {
        RuleParams {
            requests: rule.requests.map(Gcra::of),
            tokens: rule.tokens.map(Gcra::of),
        }
    }

    fn divided(self, instances: u32) -> RuleParams {
        RuleParams {
            requests: self.requests.map(|g| g.divided(instances)),
            tokens: self.tokens.map(|g| g.divided(instances)),
        }
    }

    pub(crate) fn get(&self, kind: Kind) -> Option<Gcra> {
        match kind {
            Kind::Requests => self.requests,
            Kind::Tokens => self.tokens,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Requests,
    Tokens,
}

/// One bucket touched by a decision, and what it costs there.
#[derive(Debug, Clone)]
pub(crate) struct Charge {
    rule: usize,
    bucket: String,
    kind: Kind,
    cost: u64,
}

/// What a store answers for a list of charges: admitted (all committed) or
/// not (none), and each bucket's level (ns until full): after the commit
/// when admitted, as found otherwise.
#[derive(Debug)]
pub(crate) struct Outcome {
    admitted: bool,
    levels: Vec<u64>,
}

/// A rule that applies to a call, and its bucket.
struct Candidate {
    rule: usize,
    bucket: String,
}

/// A store's answer, read into what the engine needs.
struct Verdict {
    source: Source,
    admitted: bool,
    info: Info,
    /// Not admitted: the rule that needs the longest wait, and that wait.
    binding: usize,
    wait: Duration,
    /// Not admitted, and every refusing rule queues.
    queueable: bool,
    /// Admitted: the token reservation in each matching rule with a TPM limit.
    reservations: Vec<Reservation>,
}

enum Decision {
    Verdict(Verdict),
    /// Redis is down and `fail_mode = "closed"`.
    Unavailable,
}

impl Limiter {
    /// Builds the engine and registers its metrics on `registry`. With the
    /// Redis backend it connects once (bounded by `redis_timeout`); an
    /// unreachable Redis is not an error here: `fail_mode` applies until it
    /// answers.
    pub async fn new(
        settings: RateLimitSettings,
        rules: Vec<Rule>,
        registry: &prometheus::Registry,
    ) -> Result<Limiter, String> {
        let metrics = Metrics::register(registry, &rules)?;
        let params: Vec<RuleParams> = rules.iter().map(RuleParams::of).collect();
        let store = match &settings.backend {
            Backend::Local => Store::Local(LocalStore::new(params)),
            Backend::Redis { url } => {
                let fallback = params.iter().map(|p| p.divided(settings.expected_instances)).collect();
                Store::Redis {
                    redis: RedisStore::new(url, &settings, &rules, params)?,
                    fallback: LocalStore::new(fallback),
                    health: Health::new(
                        "rate limit",
                        metrics.backend_errors.clone(),
                        metrics.fallback_active.clone(),
                    ),
                    fail_mode: settings.fail_mode,
                    timeout: settings.redis_timeout,
                }
            }
        };
        if let Store::Redis {
            redis, health, timeout, ..
        } = &store
        {
            if !rules.is_empty() {
                let result = tokio::time::timeout(*timeout, redis.ping()).await;
                match result {
                    Ok(Ok(())) => tracing::info!("rate limit: connected to Redis"),
                    Ok(Err(e)) => health.failed(&format!("{e}")),
                    Err(_) => health.failed("timed out"),
                }
            }
        }
        let slots = rules
            .into_iter()
            .map(|rule| Slot {
                rule,
                queue: tokio::sync::Mutex::new(()),
                waiting: AtomicUsize::new(0),
            })
            .collect();
        Ok(Limiter {
            inner: Arc::new(Inner {
                settings,
                slots,
                store,
                metrics,
            }),
        })
    }

    pub fn has_rules(&self) -> bool {
        !self.inner.slots.is_empty()
    }

    /// Whether any rule limits tokens (so admissions need a token estimate).
    pub fn counts_tokens(&self) -> bool {
        self.inner.slots.iter().any(|s| s.rule.tokens.is_some())
    }

    pub fn settings(&self) -> &RateLimitSettings {
        &self.inner.settings
    }

    /// Each rule with the requests it has refused since start
    /// (`relaygate_rate_limited_total`), for the status page.
    pub fn rejections(&self) -> impl Iterator<Item = (&Rule, u64)> {
        self.inner.slots.iter().map(|slot| {
            let rule = &slot.rule;
            let refused = self
                .inner
                .metrics
                .rate_limited
                .with_label_values(&[rule.scope.as_str(), &rule.name])
                .get();
            (rule, refused)
        })
    }

    /// The request-phase rules (scopes key, model and global) that match this
    /// client key name and model name. Pass the configured model name (after
    /// routing), not an arbitrary one a client typed: rules without `match`
    /// keep one bucket per name.
    pub async fn admit_request(&self, key: &str, model: &str, estimated_tokens: u64) -> Result<Admission, Rejection> {
        let candidates = self.candidates(|scope| match scope {
            Scope::Key => Some(key),
            Scope::Model => Some(model),
            Scope::Global => Some("*"),
            Scope::Upstream => None,
        });
        self.admit(candidates, estimated_tokens).await
    }

    /// A request answered from the response cache: it is a client request,
    /// so key- and global-scope rules count it, but it buys no tokens and
    /// reaches no model or upstream.
    pub async fn admit_cache_hit(&self, key: &str) -> Result<Admission, Rejection> {
        let candidates = self.candidates(|scope| match scope {
            Scope::Key => Some(key),
            Scope::Global => Some("*"),
            Scope::Model | Scope::Upstream => None,
        });
        self.admit(candidates, 0).await
    }

    /// The attempt-phase rules (scope upstream) for the chosen upstream.
    pub async fn admit_upstream(&self, upstream: &str, estimated_tokens: u64) -> Result<Admission, Rejection> {
        let candidates = self.candidates(|scope| (scope == Scope::Upstream).then_some(upstream));
        self.admit(candidates, estimated_tokens).await
    }

    fn candidates<'a>(&self, name_for: impl Fn(Scope) -> Option<&'a str>) -> Vec<Candidate> {
        let mut out = Vec::new();
        for (i, slot) in self.inner.slots.iter().enumerate() {
            let Some(name) = name_for(slot.rule.scope) else {
                continue;
            };
            match &slot.rule.matches {
                Some(m) if m != name => {}
                _ => out.push(Candidate {
                    rule: i,
                    bucket: name.to_owned(),
                }),
            }
        }
        out
    }

    async fn admit(&self, candidates: Vec<Candidate>, tokens: u64) -> Result<Admission, Rejection> {
        if candidates.is_empty() {
            return Ok(Admission::none());
        }
        let slots = &self.inner.slots;
        // Candidates are in rule order, so the queues are locked in one
        // global order and two callers cannot deadlock.
        let queues: Vec<usize> = candidates
            .iter()
            .map(|c| c.rule)
            .filter(|&r| slots[r].rule.on_limit == OnLimit::Queue)
            .collect();
        if queues.iter().all(|&r| slots[r].waiting.load(Ordering::Acquire) == 0) {
            match self.decide(&candidates, tokens, true).await {
                Decision::Unavailable => return Err(self.unavailable(&candidates)),
                Decision::Verdict(v) if v.admitted => return Ok(self.admission(v)),
                Decision::Verdict(v) if !v.queueable => return Err(self.reject(&v)),
                Decision::Verdict(_) => {}
            }
        }
        self.queue(&candidates, &queues, tokens).await
    }

    /// Waits in the queues of `queues` (first come, first served), then for
    /// capacity, until the shortest `max_queue_wait` of them has passed.
    async fn queue(&self, candidates: &[Candidate], queues: &[usize], tokens: u64) -> Result<Admission, Rejection> {
        let slots = &self.inner.slots;
        let started = Instant::now();
        let max_wait = queues
            .iter()
            .map(|&r| slots[r].rule.max_queue_wait)
            .min()
            .unwrap_or_default();
        let deadline = started + max_wait;
        let mut watch = QueueWatch::enter(&self.inner, queues, started);
        let mut held = Vec::with_capacity(queues.len());
        for &r in queues {
            match tokio::time::timeout_at(deadline, slots[r].queue.lock()).await {
                Ok(guard) => held.push(guard),
                Err(_) => {
                    watch.result = QueueResult::Rejected;
                    // Still behind others: report the state without taking anything.
                    return Err(match self.decide(candidates, tokens, false).await {
                        Decision::Verdict(v) if !v.admitted => self.reject(&v),
                        Decision::Verdict(v) => self.reject(&Verdict { binding: r, ..v }),
                        Decision::Unavailable => self.unavailable(candidates),
                    });
                }
            }
        }
        loop {
            match self.decide(candidates, tokens, true).await {
                Decision::Unavailable => {
                    watch.result = QueueResult::Rejected;
                    return Err(self.unavailable(candidates));
                }
                Decision::Verdict(v) if v.admitted => {
                    watch.result = QueueResult::Admitted;
                    return Ok(self.admission(v));
                }
                Decision::Verdict(v) => {
                    let now = Instant::now();
                    if !v.queueable || now >= deadline {
                        watch.result = QueueResult::Rejected;
                        return Err(self.reject(&v));
                    }
                    let nap = v.wait.clamp(QUEUE_POLL_MIN, QUEUE_POLL_MAX);
                    tokio::time::sleep_until((now + nap).min(deadline)).await;
                }
            }
        }
    }

    /// One decision over all candidates, in Redis while it answers, else in
    /// the fallback (open) or not at all (closed).
    async fn decide(&self, candidates: &[Candidate], tokens: u64, commit: bool) -> Decision {
        let inner = &self.inner;
        match &inner.store {
            Store::Local(local) => {
                Decision::Verdict(self.decide_local(local, Source::Local, candidates, tokens, commit))
            }
            Store::Redis {
                redis,
                fallback,
                health,
                fail_mode,
                timeout,
            } => {
                let charges = charges(candidates, tokens, redis.params());
                if charges.is_empty() {
                    // Only TPM rules and no estimate: nothing to decide now,
                    // the usage is charged at reconcile.
                    let outcome = Outcome {
                        admitted: true,
                        levels: Vec::new(),
                    };
                    return Decision::Verdict(self.verdict(Source::Redis, redis.params(), candidates, &[], outcome));
                }
                if health.may_call() {
                    match tokio::time::timeout(*timeout, redis.decide(&charges, commit)).await {
                        Ok(Ok(outcome)) => {
                            health.succeeded();
                            return Decision::Verdict(self.verdict(
                                Source::Redis,
                                redis.params(),
                                candidates,
                                &charges,
                                outcome,
                            ));
                        }
                        Ok(Err(e)) => health.failed(&format!("{e}")),
                        Err(_) => health.failed("timed out"),
                    }
                }
                match fail_mode {
                    FailMode::Open => {
                        Decision::Verdict(self.decide_local(fallback, Source::Fallback, candidates, tokens, commit))
                    }
                    FailMode::Closed => Decision::Unavailable,
                }
            }
        }
    }

    fn decide_local(
        &self,
        store: &LocalStore,
        source: Source,
        candidates: &[Candidate],
        tokens: u64,
        commit: bool,
    ) -> Verdict {
        let charges = charges(candidates, tokens, store.params());
        let outcome = store.decide(&charges, commit);
        self.verdict(source, store.params(), candidates, &charges, outcome)
    }

    fn verdict(
        &self,
        source: Source,
        params: &[RuleParams],
        candidates: &[Candidate],
        charges: &[Charge],
        outcome: Outcome,
    ) -> Verdict {
        let mut info = Info::default();
        let mut binding = (candidates[0].rule, 0u64);
        let mut queueable = true;
        for (charge, &level) in charges.iter().zip(&outcome.levels) {
            let Some(gcra) = params[charge.rule].get(charge.kind) else {
                continue;
            };
            let dim = Some(Dim::of(&gcra, level));
            info = info.merge(match charge.kind {
                Kind::Requests => Info {
                    requests: dim,
                    tokens: None,
                },
                Kind::Tokens => Info {
                    requests: None,
                    tokens: dim,
                },
            });
            if !outcome.admitted {
                let wait = gcra.wait(level, charge.cost);
                if wait > 0 {
                    queueable &= self.inner.slots[charge.rule].rule.on_limit == OnLimit::Queue;
                    if wait > binding.1 {
                        binding = (charge.rule, wait);
                    }
                }
            }
        }
        if !outcome.admitted && binding.1 == 0 {
            // Refused at a boundary the levels cannot show (Redis rounds to
            // microseconds): the first rule's queueing decides.
            queueable = self.inner.slots[binding.0].rule.on_limit == OnLimit::Queue;
        }
        let reservations = if outcome.admitted {
            candidates
                .iter()
                .filter(|c| params[c.rule].tokens.is_some())
                .map(|c| Reservation {
                    source,
                    rule: c.rule,
                    bucket: c.bucket.clone(),
                    tokens: charges
                        .iter()
                        .find(|ch| ch.rule == c.rule && ch.kind == Kind::Tokens)
                        .map_or(0, |ch| ch.cost),
                })
                .collect()
        } else {
            Vec::new()
        };
        Verdict {
            source,
            admitted: outcome.admitted,
            info,
            binding: binding.0,
            wait: Duration::from_nanos(binding.1),
            queueable: !outcome.admitted && queueable,
            reservations,
        }
    }

    fn admission(&self, v: Verdict) -> Admission {
        debug_assert!(v.admitted, "{:?}", v.source);
        Admission {
            limiter: Some(self.inner.clone()),
            reservations: v.reservations,
            info: v.info,
        }
    }

    fn reject(&self, v: &Verdict) -> Rejection {
        let rule = &self.inner.slots[v.binding].rule;
        self.inner
            .metrics
            .rate_limited
            .with_label_values(&[rule.scope.as_str(), &rule.name])
            .inc();
        let mut headers = HeaderMap::new();
        v.info.write(&mut headers);
        headers.insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs(v.wait)));
        Rejection {
            retry_after: v.wait,
            headers,
            rule: rule.name.clone(),
            scope: rule.scope,
            unavailable: false,
        }
    }

    fn unavailable(&self, candidates: &[Candidate]) -> Rejection {
        let rule = &self.inner.slots[candidates[0].rule].rule;
        let mut headers = HeaderMap::new();
        headers.insert(header::RETRY_AFTER, HeaderValue::from(1u64));
        Rejection {
            retry_after: REDIS_RETRY_EVERY,
            headers,
            rule: rule.name.clone(),
            scope: rule.scope,
            unavailable: true,
        }
    }
}

/// The charges of a call in a store: one request in each rule with an RPM
/// limit, the token estimate (at most a full bucket) in each with a TPM limit.
fn charges(candidates: &[Candidate], tokens: u64, params: &[RuleParams]) -> Vec<Charge> {
    let mut out = Vec::with_capacity(candidates.len() * 2);
    for c in candidates {
        let p = params[c.rule];
        if p.requests.is_some() {
            out.push(Charge {
                rule: c.rule,
                bucket: c.bucket.clone(),
                kind: Kind::Requests,
                cost: 1,
            });
        }
        if let Some(g) = p.tokens {
            if tokens > 0 {
                out.push(Charge {
                    rule: c.rule,
                    bucket: c.bucket.clone(),
                    kind: Kind::Tokens,
                    cost: g.reservable(tokens),
                });
            }
        }
    }
    out
}

/// Counts a queued caller in and out of its queues, and observes its wait
/// when it leaves, however it leaves (a dropped future is `cancelled`).
struct QueueWatch<'a> {
    inner: &'a Inner,
    queues: &'a [usize],
    started: Instant,
    result: QueueResult,
}

impl<'a> QueueWatch<'a> {
    fn enter(inner: &'a Inner, queues: &'a [usize], started: Instant) -> QueueWatch<'a> {
        for &r in queues {
            inner.slots[r].waiting.fetch_add(1, Ordering::AcqRel);
        }
        QueueWatch {
            inner,
            queues,
            started,
            result: QueueResult::Cancelled,
        }
    }
}

impl Drop for QueueWatch<'_> {
    fn drop(&mut self) {
        for &r in self.queues {
            self.inner.slots[r].waiting.fetch_sub(1, Ordering::AcqRel);
        }
        self.inner
            .metrics
            .queue_wait
            .with_label_values(&[self.result.as_str()])
            .observe(self.started.elapsed().as_secs_f64());
    }
}

/// A token reservation in one rule's bucket, to reconcile.
#[derive(Debug, Clone)]
struct Reservation {
    source: Source,
    rule: usize,
    bucket: String,
    tokens: u64,
}

/// What an admitted call reserved. Reconcile it with the real usage; if it
/// is dropped instead, the estimate stays charged (the safe side).
#[must_use = "reconcile the admission with the real token usage"]
pub struct Admission {
    limiter: Option<Arc<Inner>>,
    reservations: Vec<Reservation>,
    info: Info,
}

impl fmt::Debug for Admission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Admission")
            .field("reservations", &self.reservations)
            .field("info", &self.info)
            .finish()
    }
}

impl Admission {
    /// No rule matched: no headers, nothing to reconcile.
    pub fn none() -> Admission {
        Admission {
            limiter: None,
            reservations: Vec::new(),
            info: Info::default(),
        }
    }

    /// One admission for the request phase and the attempt phase together:
    /// the headers show the tighter of both, `reconcile` reconciles both.
    pub fn merge(mut self, other: Admission) -> Admission {
        self.limiter = self.limiter.or(other.limiter);
        self.reservations.extend(other.reservations);
        self.info = self.info.merge(other.info);
        self
    }

    /// `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` as OpenAI
    /// sends them (reset as `"1s"`, `"6m0s"`, `"250ms"`): for each family,
    /// the matching rule with the fewest remaining. Empty when no rule matched.
    pub fn headers(&self) -> HeaderMap {
        let mut headers = HeaderMap::new();
        self.write_headers(&mut headers);
        headers
    }

    /// `headers()`, written into a response's own map.
    pub fn write_headers(&self, headers: &mut HeaderMap) {
        self.info.write(headers);
    }

    /// Replaces the token estimate with the real usage in every rule that
    /// has a TPM limit: gives back what was over-reserved, charges what was
    /// under (a bucket can go into debt; later calls then wait). An attempt
    /// that used no tokens (failed upstream) reconciles with 0. Bounded by
    /// `redis_timeout`; a failure is counted and otherwise ignored.
    /// Reconciles now when that needs no I/O (the local backend, or nothing
    /// reserved), else in a spawned task: a request never waits on it.
    pub fn reconcile_in_background(self, actual_tokens: u64) {
        // Most requests match no TPM rule: nothing reserved, nothing to do
        // (and no future to box, which showed in the profile).
        let Some(inner) = self.limiter.as_ref().filter(|_| !self.reservations.is_empty()) else {
            return;
        };
        if let Store::Local(local) = &inner.store {
            local.adjust(&self.deltas(actual_tokens, Source::Local));
            return;
        }
        use futures_util::FutureExt;
        let mut fut = Box::pin(self.reconcile(actual_tokens));
        if (&mut fut).now_or_never().is_none() {
            tokio::spawn(fut);
        }
    }

    /// Per reservation from `source`: (rule, bucket, actual − reserved),
    /// the non-zero ones.
    fn deltas(&self, actual_tokens: u64, source: Source) -> Vec<(usize, &str, i64)> {
        let actual = i64::try_from(actual_tokens).unwrap_or(i64::MAX);
        self.reservations
            .iter()
            .filter(|r| r.source == source)
            .map(|r| {
                (
                    r.rule,
                    r.bucket.as_str(),
                    actual - i64::try_from(r.tokens).unwrap_or(i64::MAX),
                )
            })
            .filter(|&(_, _, delta)| delta != 0)
            .collect()
    }

    pub async fn reconcile(self, actual_tokens: u64) {
        let Some(inner) = &self.limiter else {
            return;
        };
        let items = |source: Source| self.deltas(actual_tokens, source);
        match &inner.store {
            Store::Local(local) => local.adjust(&items(Source::Local)),
            Store::Redis {
                redis,
                fallback,
                health,
                timeout,
                ..
            } => {
                fallback.adjust(&items(Source::Fallback));
                let shared = items(Source::Redis);
                // While Redis is down the adjustment is dropped: the shared
                // buckets refill on their own within a minute.
                if !shared.is_empty() && health.may_call() {
                    match tokio::time::timeout(*timeout, redis.adjust(&shared)).await {
                        Ok(Ok(())) => drop(health.succeeded()),
                        Ok(Err(e)) => health.failed(&format!("{e}")),
                        Err(_) => health.failed("timed out"),
                    }
                }
            }
        }
    }
}

/// A refused call.
#[derive(Debug, Clone)]
pub struct Rejection {
    /// Until the refusing rule would admit the call (for `unavailable`: when
    /// Redis is tried again).
    pub retry_after: Duration,
    /// `x-ratelimit-*` and `retry-after` (whole seconds, rounded up, at least 1).
    pub headers: HeaderMap,
    /// The refusing rule's name (`unavailable`: the first matching rule).
    pub rule: String,
    pub scope: Scope,
    /// Redis is down and `fail_mode = "closed"`: answer 503, not 429.
    pub unavailable: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(name: &str, scope: Scope, matches: Option<&str>, rpm: Option<u32>, burst: u32, tpm: Option<u32>) -> Rule {
        Rule {
            name: name.into(),
            scope,
            matches: matches.map(Into::into),
            requests: rpm.map(|per_minute| Limit {
                per_minute,
                capacity: burst,
            }),
            tokens: tpm.map(|per_minute| Limit {
                per_minute,
                capacity: per_minute,
            }),
            on_limit: OnLimit::Reject,
            max_queue_wait: Duration::from_secs(5),
        }
    }

    async fn limiter(rules: Vec<Rule>) -> Limiter {
        Limiter::new(RateLimitSettings::default(), rules, &prometheus::Registry::new())
            .await
            .unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn rules_match_by_scope_and_name() {
        let l = limiter(vec![
            rule("a", Scope::Key, Some("app-a"), Some(60), 1, None),
            rule("each-model", Scope::Model, None, Some(60), 2, None),
            rule("up", Scope::Upstream, Some("u1"), Some(60), 1, None),
        ])
        .await;
        // key app-a + model m: rules a and each-model.
        let a = l.admit_request("app-a", "m", 0).await.unwrap();
        assert_eq!(a.reservations.len(), 0);
        assert_eq!(a.headers()["x-ratelimit-remaining-requests"], "0");
        let r = l.admit_request("app-a", "m2", 0).await.unwrap_err();
        assert_eq!((r.rule.as_str(), r.scope), ("a", Scope::Key));
        // Another key only meets the per-model rule, whose bucket for m has one left.
        let _ = l.admit_request("app-b", "m", 0).await.unwrap();
        let r = l.admit_request("app-b", "m", 0).await.unwrap_err();
        assert_eq!(r.rule, "each-model");
        // Upstream rules only in the attempt phase.
        let _ = l.admit_upstream("u1", 0).await.unwrap();
        assert_eq!(l.admit_upstream("u1", 0).await.unwrap_err().scope, Scope::Upstream);
        let none = l.admit_upstream("u2", 0).await.unwrap();
        assert!(none.headers().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn rejection_headers_and_retry_after() {
        let l = limiter(vec![rule("k", Scope::Key, None, Some(30), 1, Some(6000))]).await;
        let a = l.admit_request("k1", "m", 1000).await.unwrap();
        let h = a.headers();
        assert_eq!(h["x-ratelimit-limit-requests"], "30");
        assert_eq!(h["x-ratelimit-remaining-requests"], "0");
        assert_eq!(h["x-ratelimit-reset-requests"], "2s");
        assert_eq!(h["x-ratelimit-limit-tokens"], "6000");
        assert_eq!(h["x-ratelimit-remaining-tokens"], "5000");
        assert_eq!(h["x-ratelimit-reset-tokens"], "10s");
        tokio::time::advance(Duration::from_millis(500)).await;
        let r = l.admit_request("k1", "m", 1000).await.unwrap_err();
        assert!(!r.unavailable);
        assert_eq!(r.retry_after, Duration::from_millis(1500));
        assert_eq!(r.headers["retry-after"], "2");
        assert_eq!(r.headers["x-ratelimit-reset-requests"], "1.5s");
        assert_eq!(r.headers["x-ratelimit-remaining-tokens"], "5050");
        // The refused call took nothing: its tokens were given back.
        a.reconcile(1000).await;
        tokio::time::advance(Duration::from_millis(1500)).await;
        let a = l.admit_request("k1", "m", 1000).await.unwrap();
        assert_eq!(a.headers()["x-ratelimit-remaining-tokens"], "4200");
    }

    #[tokio::test]
    async fn metrics_are_registered_once_per_registry() {
        let registry = prometheus::Registry::new();
        let rules = vec![rule("k", Scope::Key, None, Some(30), 1, None)];
        Limiter::new(RateLimitSettings::default(), rules.clone(), &registry)
            .await
            .unwrap();
        let e = Limiter::new(RateLimitSettings::default(), rules, &registry)
            .await
            .unwrap_err();
        assert!(e.contains("rate limit metrics"), "{e}");
        let names: Vec<String> = registry.gather().iter().map(|f| f.name().to_owned()).collect();
        for name in [
            "relaygate_rate_limited_total",
            "relaygate_ratelimit_queue_wait_seconds",
            "relaygate_ratelimit_backend_errors_total",
            "relaygate_ratelimit_fallback_active",
        ] {
            assert!(names.iter().any(|n| n == name), "{name} in {names:?}");
        }
    }
}
