//! Shadow comparison: a sampled share of a model's requests is sent, in the
//! background, to a candidate upstream/model as well, read to the end and
//! discarded. The client never sees it and never waits for it: the shadow
//! is spawned beside the primary, holds none of the client's slots, makes a
//! single attempt (no retries, no failover), and counts only against the
//! shadow upstream's own breaker and upstream-scoped rate limits. At most
//! `max_in_flight` shadows run per model; beyond that they are dropped and
//! counted.
//!
//! Everything about shadows is recorded apart from the primary traffic:
//! `relaygate_shadow_*` metrics, ledger lines with `shadow: true`, and the
//! in-memory `Comparison` behind `GET /admin/shadow`. `relaygate compare`
//! builds the same comparison from a ledger file.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::HeaderMap;
use prometheus::{Counter, Histogram, IntCounter};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::budget::{Budgets, Reservation};
use crate::config::ShadowConfig;
use crate::outcome::{ErrorType, Outcome, Status, Verdict};
use crate::ratelimit::Limiter;
use crate::request::{Endpoint, ParsedRequest};
use crate::sse::ReadError;
use crate::telemetry::comparison::{content_hash, delta_text, message_text};
use crate::telemetry::ledger::LedgerLine;
use crate::telemetry::metrics::{Metrics, TOKEN_TYPES};
use crate::telemetry::Sinks;
use crate::upstream::{Attempt, Reply, Upstream};
use crate::usage::Usage;

/// A model's shadow, built once per config: where it goes, its slots
/// (`max_in_flight`), and its metric handles.
pub struct Shadow {
    /// The primary model's name (a metric label).
    model: Arc<str>,
    config: ShadowConfig,
    upstream: Arc<Upstream>,
    slots: Arc<Semaphore>,
    max_response_bytes: usize,
    dropped: IntCounter,
    duration: Histogram,
    ttft: Histogram,
    cost: Counter,
}

impl Shadow {
    pub fn new(
        model: &str,
        config: ShadowConfig,
        upstream: Arc<Upstream>,
        max_response_bytes: usize,
        metrics: &Metrics,
    ) -> Self {
        let labels = [model, &*upstream.name];
        Self {
            model: Arc::from(model),
            slots: Arc::new(Semaphore::new(config.max_in_flight)),
            dropped: metrics.shadow_dropped.with_label_values(&[model]),
            duration: metrics.shadow_duration.with_label_values(&labels),
            ttft: metrics.shadow_ttft.with_label_values(&labels),
            cost: metrics.shadow_cost.with_label_values(&labels),
            config,
            upstream,
            max_response_bytes,
        }
    }
}

/// What a shadow needs from the primary request.
pub struct Mirror {
    pub shadow: Arc<Shadow>,
    pub sinks: Arc<Sinks>,
    /// Shadows count against the shadow upstream's rate limits.
    pub limiter: Limiter,
    /// And spend its upstream's and the global budgets (never the key's).
    pub budgets: Budgets,
    pub endpoint: Endpoint,
    pub parsed: ParsedRequest,
    pub body: Bytes,
    pub headers: HeaderMap,
    pub request_id: String,
    pub key: Arc<str>,
}

/// Decides whether this request is mirrored and, if so, spawns the shadow.
/// Returns true when a shadow was started.
pub fn maybe_mirror(mirror: Mirror) -> bool {
    let shadow = &mirror.shadow;
    if fastrand::f64() >= shadow.config.sample {
        return false;
    }
    let Ok(permit) = shadow.slots.clone().try_acquire_owned() else {
        shadow.dropped.inc();
        return false;
    };
    tokio::spawn(async move {
        run(&mirror).await;
        drop(permit);
    });
    true
}

/// How one shadow went.
struct Outcome2 {
    outcome: Outcome,
    status: u16,
    usage: Option<Usage>,
    ttft: Option<Duration>,
    text: Option<String>,
    /// The shadow upstream's and the global budgets' reservation.
    budget: Option<Reservation>,
}

async fn run(m: &Mirror) {
    let shadow = &*m.shadow;
    let upstream = &shadow.upstream;
    let started = Instant::now();
    let result = attempt(m, started).await;
    let elapsed = started.elapsed();

    let metrics = &m.sinks.metrics;
    let labels = [&*shadow.model, &*upstream.name];
    metrics
        .shadow_requests
        .with_label_values(&[labels[0], labels[1], result.outcome.as_str()])
        .inc();
    shadow.duration.observe(elapsed.as_secs_f64());
    if let Some(t) = result.ttft {
        shadow.ttft.observe(t.as_secs_f64());
    }
    let usage = result.usage.unwrap_or_default();
    for (kind, n) in TOKEN_TYPES
        .iter()
        .zip([usage.prompt, usage.completion, usage.cached_prompt, usage.reasoning])
    {
        if n > 0 {
            metrics
                .shadow_tokens
                .with_label_values(&[labels[0], labels[1], kind])
                .inc_by(n);
        }
    }
    let cost = shadow.config.price.map_or(0.0, |p| usage.cost(&p));
    if cost > 0.0 {
        shadow.cost.inc_by(cost);
    }
    if let Some(budget) = result.budget {
        budget.settle_in_background(crate::budget::usd_to_micros(cost));
    }
    let hash = (m.parsed.temperature_zero)
        .then(|| result.text.as_deref().map(content_hash))
        .flatten();
    let line = LedgerLine {
        time: crate::telemetry::ledger::format_time(SystemTime::now()),
        request_id: m.request_id.clone(),
        key: m.key.to_string(),
        model: shadow.model.to_string(),
        upstream: Some(upstream.name.to_string()),
        upstream_model: Some(shadow.config.model.clone()),
        status: result.status,
        outcome: result.outcome.as_str().to_owned(),
        stream: m.parsed.stream,
        prompt_tokens: usage.prompt,
        completion_tokens: usage.completion,
        cached_tokens: usage.cached_prompt,
        reasoning_tokens: usage.reasoning,
        billable_input_tokens: usage.prompt.saturating_sub(usage.cached_prompt),
        billable_output_tokens: usage.completion,
        cost_usd: cost,
        latency_ms: elapsed.as_secs_f64() * 1000.0,
        ttft_ms: result.ttft.map(|t| t.as_secs_f64() * 1000.0),
        attempts: 1,
        usage_estimated: false,
        shadow: true,
        content_hash: hash,
        cache: None,
        saved_usd: None,
    };
    m.sinks.comparison.add(&line);
    if let Some(ledger) = &m.sinks.ledger {
        ledger.record(line);
    }
}

/// One attempt at the shadow upstream, read to the end.
async fn attempt(m: &Mirror, started: Instant) -> Outcome2 {
    let shadow = &*m.shadow;
    let upstream = &shadow.upstream;
    let fail = |outcome, status| Outcome2 {
        outcome,
        status,
        usage: None,
        ttft: None,
        text: None,
        budget: None,
    };
    let ticket = match upstream.state.breaker.try_acquire() {
        Ok(t) => t,
        Err(_) => return fail(Outcome::CircuitOpen, 503),
    };
    let limiter = &m.limiter;
    let admission = if limiter.has_rules() {
        let estimate = crate::ratelimit::estimate_tokens(&m.body, limiter.settings().default_max_tokens);
        match limiter.admit_upstream(&upstream.name, estimate).await {
            Ok(a) => Some(a),
            Err(_) => return fail(Outcome::RateLimited, 429),
        }
    } else {
        None
    };
    let budget = if m.budgets.is_empty() {
        None
    } else {
        let micros = crate::usage::worst_case_micros(
            shadow.config.price.as_ref(),
            crate::ratelimit::estimate(&m.body, limiter.settings().default_max_tokens),
        );
        match m.budgets.reserve_shadow(&upstream.name, micros).await {
            Ok(r) => Some(r),
            Err(_) => {
                if let Some(a) = admission {
                    a.reconcile_in_background(0);
                }
                return fail(Outcome::RateLimited, 429);
            }
        }
    };
    let deadline = started + upstream.config.request_timeout;
    let reply = upstream
        .send(
            Attempt {
                endpoint: m.endpoint,
                body: m.parsed.body_for(&m.body, &shadow.config.model),
                headers: m.headers.clone(),
                stream: m.parsed.stream,
                deadline,
            },
            shadow.max_response_bytes,
        )
        .await;
    let want_text = m.parsed.temperature_zero;
    let out = match reply {
        Err(e) => {
            ticket.failure(e.error_type);
            fail(e.error.outcome(), e.error.status().as_u16())
        }
        Ok(Reply::Full {
            status, body, usage, ..
        }) => {
            let code = status.as_u16();
            let row = Status::of(code);
            match row.verdict {
                Verdict::Success => ticket.success(),
                Verdict::Failure(error) => ticket.failure(error),
                _ => drop(ticket),
            }
            Outcome2 {
                outcome: row.outcome,
                status: code,
                usage,
                ttft: None,
                text: want_text.then(|| message_text(&body)).flatten(),
                budget: None,
            }
        }
        Ok(Reply::Stream { first, mut reader, .. }) => {
            let ttft = started.elapsed();
            let mut usage = None;
            let mut text = String::new();
            let mut done = false;
            let mut batch = Some(first);
            let mut broken = false;
            let mut inspector = crate::sse::Inspector::default();
            while let Some(b) = batch.take() {
                let info = inspector.inspect_for(m.endpoint, &b);
                done |= info.done;
                usage = info.usage.or(usage);
                if want_text {
                    crate::sse::events(&b).for_each(|e| delta_text(&e.data, &mut text));
                }
                let idle_at = (Instant::now() + upstream.config.idle_timeout).min(deadline);
                match tokio::time::timeout_at(idle_at, reader.next_batch()).await {
                    Ok(Ok(Some(next))) => batch = Some(next),
                    Ok(Ok(None)) => {}
                    Ok(Err(ReadError::Reset | ReadError::Truncated | ReadError::EventTooLarge)) | Err(_) => {
                        broken = true
                    }
                }
            }
            if broken || !done {
                ticket.failure(ErrorType::Reset);
            } else {
                ticket.success();
            }
            Outcome2 {
                outcome: if broken || !done {
                    Outcome::UpstreamError
                } else {
                    Outcome::Success
                },
                status: 200,
                usage,
                ttft: Some(ttft),
                text: want_text.then_some(text),
                budget: None,
            }
        }
    };
    if let Some(admission) = admission {
        let used = out.usage.map_or(0, |u| u.prompt + u.completion);
        admission.reconcile(used).await;
    }
    Outcome2 { budget, ..out }
}
