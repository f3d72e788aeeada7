//! The response cache: exact-match answers, in memory or in Redis, as one
//! step of the request path (`gateway::handle`, between routing and the
//! rate limits).
//!
//! - Which requests: a model opts in (`cache = { … }`); with `when =
//!   "deterministic"` only requests with `temperature` 0 or a `seed`
//!   (embeddings always). `Cache-Control` on the request can skip the read
//!   (`no-cache`), skip both read and write (`no-store`) or bound the age
//!   (`max-age=N`).
//! - The key (`key`): SHA-256 over a format version, the scope (client key
//!   name or `*`), endpoint, model, the model's resolved targets, stream or
//!   not, and the canonical JSON of the body.
//! - What is stored (`entry`): only complete successes. A plain 2xx read
//!   whole; a stream that ended with `[DONE]` after a `finish_reason` other
//!   than `length`, with no break and no client abort (`Capture`). Streams
//!   are stored as the upstream's SSE bytes and replayed byte for byte.
//! - Single flight (`flight`): identical plain requests on one replica
//!   wait for the one in flight. Streams are not merged: a waiter would get
//!   nothing until the leader's stream ended, which is what streaming is
//!   there to avoid; the first complete stream stores the entry.
//! - A failing backend never fails a request: the call is bounded, counted
//!   in `relaygate_cache_backend_errors_total`, and the request goes upstream.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::HeaderMap;

use crate::config::{CacheBackend, CacheConfig, CacheScope, CacheWhen, ModelCache};
use crate::usage::Usage;

pub mod entry;
pub mod flight;
pub mod key;
mod memory;
pub mod metrics;
mod redis;

pub use entry::Entry;
pub use key::Key;
pub use metrics::CacheResult;

use flight::{Flights, Joined, Leader};
use memory::{Memory, Stored};
use metrics::Metrics;
pub use metrics::ModelCounters;
use redis::RedisCache;

pub struct Cache {
    backend: Backend,
    flights: Flights,
    pub metrics: Metrics,
    max_entry_bytes: usize,
    scope: CacheScope,
}

enum Backend {
    Memory(Memory),
    Redis(Box<RedisCache>),
}

/// What the request lets the cache do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Not cacheable (the model's `when`), or `Cache-Control: no-store`.
    Bypass,
    /// `Cache-Control: no-cache`: go upstream, store the fresh answer.
    Refresh,
    /// Read, and store on a miss; `max-age=N` bounds an entry's age.
    Read { max_age: Option<u64> },
}

impl Mode {
    /// The value of `x-relaygate-cache` before the lookup.
    fn result(self) -> CacheResult {
        match self {
            Mode::Bypass => CacheResult::Bypass,
            Mode::Refresh => CacheResult::Refresh,
            Mode::Read { .. } => CacheResult::Miss,
        }
    }
}

/// One request's use of the cache, from the lookup to the store.
pub struct Plan {
    pub mode: Mode,
    key: Key,
    model: Arc<str>,
    ttl: Duration,
    /// `x-relaygate-cache`: hit, miss, bypass or refresh.
    pub result: CacheResult,
    /// The flight this request leads (plain requests that missed).
    leader: Option<Leader>,
    counters: Arc<ModelCounters>,
    /// `stored` or `not_stored` was counted (or nothing is owed: a bypass,
    /// a hit). A plan dropped before that (an error, a client that left, a
    /// cut stream) counts `not_stored`.
    settled: bool,
}

impl Drop for Plan {
    fn drop(&mut self) {
        if !self.settled && self.mode != Mode::Bypass && self.result != CacheResult::Hit {
            self.counters.count(CacheResult::NotStored);
        }
    }
}

/// A request as the cache sees it.
pub struct Request<'a> {
    pub policy: &'a ModelCache,
    /// The client key's name (`-` without client keys).
    pub client: &'a str,
    /// The endpoint's path, e.g. `/v1/chat/completions`.
    pub endpoint: &'a str,
    pub model: &'a Arc<str>,
    /// The model's counters (`Metrics::for_model`).
    pub counters: &'a Arc<ModelCounters>,
    pub targets: &'a [(&'a str, &'a str)],
    pub stream: bool,
    pub embeddings: bool,
    pub headers: &'a HeaderMap,
    pub body: &'a [u8],
}

impl Cache {
    pub fn new(config: &CacheConfig, registry: &prometheus::Registry) -> Result<Arc<Self>, String> {
        let (backend, size): (Backend, Option<metrics::SizeFn>) = match &config.backend {
            CacheBackend::Memory { max_bytes } => {
                let memory = Memory::new(*max_bytes, config.max_entry_bytes);
                let for_metrics = memory.clone();
                (Backend::Memory(memory), Some(Box::new(move || for_metrics.size())))
            }
            CacheBackend::Redis {
                url,
                timeout,
                key_prefix,
            } => (
                Backend::Redis(Box::new(RedisCache::new(url, *timeout, key_prefix)?)),
                None,
            ),
        };
        Ok(Arc::new(Self {
            backend,
            flights: Flights::default(),
            metrics: Metrics::register(registry, size)?,
            max_entry_bytes: config.max_entry_bytes,
            scope: config.scope,
        }))
    }

    pub fn backend_name(&self) -> &'static str {
        match self.backend {
            Backend::Memory(_) => "memory",
            Backend::Redis(_) => "redis",
        }
    }

    /// Decides what the request may do with the cache, and computes its key.
    pub fn plan(&self, r: &Request<'_>) -> Plan {
        let (no_store, no_cache, max_age) = cache_control(r.headers);
        let body = key::canonical(r.body);
        let eligible = body
            .as_ref()
            .is_some_and(|b| r.embeddings || r.policy.when == CacheWhen::Always || b.deterministic);
        let mode = match () {
            _ if no_store || !eligible => Mode::Bypass,
            _ if no_cache => Mode::Refresh,
            _ => Mode::Read { max_age },
        };
        let key = match (&body, mode) {
            (Some(body), Mode::Read { .. } | Mode::Refresh) => key::key(
                &key::KeyParts {
                    scope: match self.scope {
                        CacheScope::Key => r.client,
                        CacheScope::Global => "*",
                    },
                    endpoint: r.endpoint,
                    model: r.model,
                    targets: r.targets,
                    stream: r.stream,
                },
                &body.bytes,
            ),
            // A bypass has no key: it neither reads nor writes.
            _ => Key([0; 32]),
        };
        Plan {
            mode,
            key,
            model: r.model.clone(),
            ttl: r.policy.ttl,
            result: mode.result(),
            leader: None,
            counters: r.counters.clone(),
            settled: false,
        }
    }

    /// The stored answer for a `Read` plan, if there is one young enough.
    /// A backend failure is a miss (and counted).
    pub async fn get(&self, plan: &Plan) -> Option<Arc<Entry>> {
        let Mode::Read { max_age } = plan.mode else {
            return None;
        };
        let entry = match &self.backend {
            Backend::Memory(m) => m.get(&plan.key),
            Backend::Redis(r) => match r.get(&plan.model, &plan.key).await {
                Ok(entry) => entry.map(Arc::new),
                Err(e) => {
                    self.backend_error(&e);
                    None
                }
            },
        }?;
        match max_age {
            Some(max) if entry.age().as_secs() > max => None,
            _ => Some(entry),
        }
    }

    /// Looks the request up. For a plain request that misses, joins the
    /// single flight: waits (up to `deadline`) for an identical request in
    /// flight, or becomes the one that goes upstream. Counts the result.
    /// `Err(())`: the deadline passed while waiting.
    pub async fn lookup(
        &self,
        plan: &mut Plan,
        stream: bool,
        deadline: tokio::time::Instant,
    ) -> Result<Option<Arc<Entry>>, ()> {
        let found = self.lookup_inner(plan, stream, deadline).await;
        match found {
            Ok(Some(_)) => plan.result = CacheResult::Hit,
            // It waited out its deadline and never went upstream: nothing
            // to store, so no `not_stored`.
            Err(()) => plan.settled = true,
            Ok(None) => {}
        }
        plan.counters.count(plan.result);
        found
    }

    async fn lookup_inner(
        &self,
        plan: &mut Plan,
        stream: bool,
        deadline: tokio::time::Instant,
    ) -> Result<Option<Arc<Entry>>, ()> {
        if !matches!(plan.mode, Mode::Read { .. }) {
            return Ok(None);
        }
        loop {
            if let Some(entry) = self.get(plan).await {
                return Ok(Some(entry));
            }
            if stream {
                return Ok(None);
            }
            match self.flights.join(plan.key) {
                Joined::Leader(leader) => {
                    plan.leader = Some(leader);
                    return Ok(None);
                }
                Joined::Waiter(waiter) => match tokio::time::timeout_at(deadline, waiter.answer()).await {
                    Err(_) => return Err(()),
                    Ok(Some(entry)) => return Ok(Some(entry)),
                    // The leader ended without an answer: look again, and
                    // perhaps lead.
                    Ok(None) => continue,
                },
            }
        }
    }

    /// A miss's (or refresh's) answer: stores it when it is a complete
    /// success that fits, and hands it to the flight's waiters. Counts
    /// `stored` or `not_stored`.
    pub fn store(self: &Arc<Self>, plan: &mut Plan, entry: Option<Entry>) {
        if plan.mode == Mode::Bypass || plan.settled {
            return;
        }
        plan.settled = true;
        let Some(mut entry) = entry else {
            plan.counters.count(CacheResult::NotStored);
            plan.leader = None; // waiters look again, and one leads
            return;
        };
        // The answer's size, as a stream's is counted while it is captured.
        let fits = entry.body.len() <= self.max_entry_bytes;
        if fits && matches!(self.backend, Backend::Memory(_)) {
            // A plain answer's body is a slice of the upstream connection's
            // read buffer (hyper's, 8 KiB or more); a stream's, of a buffer
            // grown by doubling. Held in the cache, either would pin the
            // whole buffer, and hyper would allocate a new one for the next
            // answer: new memory on every miss. A copy of its own size
            // holds what the entry weighs.
            entry.body = Bytes::copy_from_slice(&entry.body);
        }
        let entry = Arc::new(entry);
        if let Some(leader) = plan.leader.take() {
            leader.complete(entry.clone());
        }
        if !fits {
            plan.counters.count(CacheResult::NotStored);
            return;
        }
        let stored = match &self.backend {
            Backend::Memory(m) => m.insert(
                plan.key,
                Stored {
                    entry,
                    model: plan.model.clone(),
                    ttl: plan.ttl,
                },
            ),
            Backend::Redis(_) => {
                let (cache, model, key, ttl) = (self.clone(), plan.model.clone(), plan.key, plan.ttl);
                tokio::spawn(async move {
                    if let Backend::Redis(r) = &cache.backend {
                        if let Err(e) = r.set(&model, &key, &entry, ttl).await {
                            cache.backend_error(&e);
                        }
                    }
                });
                true
            }
        };
        plan.counters.count(if stored {
            CacheResult::Stored
        } else {
            CacheResult::NotStored
        });
    }

    /// Counts a request that could not use the backend (a failed call, or
    /// one skipped in the backoff after a failure); logs real failures.
    fn backend_error(&self, e: &redis::Error) {
        self.metrics.backend_errors.inc();
        if !matches!(e, redis::Error::Backoff) {
            tracing::warn!(error = %e, "cache backend call failed; the request went upstream without the cache");
        }
    }

    /// Removes every entry, or one model's; returns how many.
    pub async fn purge(&self, model: Option<&str>) -> Result<u64, String> {
        match &self.backend {
            Backend::Memory(m) => Ok(m.purge(model)),
            Backend::Redis(r) => r.purge(model).await.map_err(|e| e.to_string()),
        }
    }

    /// Entries and bytes per model, as the backend holds them.
    pub async fn per_model(&self) -> Result<Vec<(String, u64, u64)>, String> {
        match &self.backend {
            Backend::Memory(m) => Ok(m
                .per_model()
                .into_iter()
                .map(|(model, n, bytes)| (model.to_string(), n, bytes))
                .collect()),
            Backend::Redis(r) => r.per_model().await.map_err(|e| e.to_string()),
        }
    }

    /// (entries, bytes) when the backend knows them (memory).
    pub fn size(&self) -> Option<(u64, u64)> {
        match &self.backend {
            Backend::Memory(m) => Some(m.size()),
            Backend::Redis(_) => None,
        }
    }

    /// Single flights in progress.
    pub fn flights_in_progress(&self) -> usize {
        self.flights.len()
    }
}

/// The request's `Cache-Control`: (no-store, no-cache, max-age). Directive
/// names are case-insensitive; an unparsable `max-age` is ignored.
fn cache_control(headers: &HeaderMap) -> (bool, bool, Option<u64>) {
    let (mut no_store, mut no_cache, mut max_age) = (false, false, None);
    for value in headers.get_all(http::header::CACHE_CONTROL) {
        let Ok(value) = value.to_str() else { continue };
        for directive in value.split(',') {
            let (name, arg) = match directive.split_once('=') {
                Some((n, a)) => (n.trim(), Some(a.trim().trim_matches('"'))),
                None => (directive.trim(), None),
            };
            if name.eq_ignore_ascii_case("no-store") {
                no_store = true;
            } else if name.eq_ignore_ascii_case("no-cache") {
                no_cache = true;
            } else if name.eq_ignore_ascii_case("max-age") {
                if let Some(n) = arg.and_then(|a| a.parse::<u64>().ok()) {
                    max_age = Some(max_age.map_or(n, |m: u64| m.min(n)));
                }
            }
        }
    }
    (no_store, no_cache, max_age)
}

/// An upstream answer that may be stored: a 2xx its upstream did not mark
/// `Cache-Control: no-store`.
fn storable(status: http::StatusCode, headers: &HeaderMap) -> bool {
    status.is_success() && !cache_control(headers).0
}

/// The answer's content type; the two that answers nearly always carry are
/// not copied (an allocation per stored entry, and a free per evicted one).
fn content_type(headers: &HeaderMap) -> Option<Cow<'static, str>> {
    const COMMON: [&str; 2] = ["application/json", "text/event-stream"];
    let v = headers.get(http::header::CONTENT_TYPE)?.to_str().ok()?;
    Some(match COMMON.iter().find(|c| **c == v) {
        Some(c) => Cow::Borrowed(c),
        None => Cow::Owned(v.to_owned()),
    })
}

/// A stream's bytes, collected as they go to the client, and stored at its
/// clean end. Dropped before that (a break, a client that left), it stores
/// nothing, and its plan counts `not_stored`.
pub struct Capture {
    cache: Arc<Cache>,
    plan: Plan,
    content_type: Option<Cow<'static, str>>,
    status: u16,
    buf: BytesMut,
    /// Past `max_entry_bytes`: collecting stopped.
    over: bool,
}

impl Capture {
    /// `None` when the plan stores nothing (a bypass), or the answer may not
    /// be stored (then the plan, dropped, counts `not_stored`).
    pub fn new(cache: Arc<Cache>, plan: Plan, status: http::StatusCode, headers: &HeaderMap) -> Option<Self> {
        (plan.mode != Mode::Bypass && storable(status, headers)).then(|| Self {
            cache,
            plan,
            content_type: content_type(headers),
            status: status.as_u16(),
            buf: BytesMut::new(),
            over: false,
        })
    }

    /// A batch of whole events, as the upstream sent them (usage included).
    pub fn push(&mut self, batch: &[u8]) {
        if self.over {
            return;
        }
        if self.buf.len() + batch.len() > self.cache.max_entry_bytes {
            self.over = true;
            self.buf = BytesMut::new();
            return;
        }
        self.buf.extend_from_slice(batch);
    }

    /// The stream ended cleanly with `[DONE]`; `usage` is the upstream's
    /// (not an estimate).
    pub fn finish(mut self, usage: Option<Usage>) {
        let body = std::mem::take(&mut self.buf).freeze();
        let complete = !self.over && finished_normally(&body);
        let entry = complete.then(|| Entry {
            stream: true,
            status: self.status,
            content_type: self.content_type.take(),
            body,
            usage,
            stored_at_ms: Entry::now_ms(),
        });
        let cache = self.cache.clone();
        cache.store(&mut self.plan, entry);
    }
}

/// Every `finish_reason` the stream sent, if any was sent, is one that ends
/// an answer normally: not `length` (cut at `max_tokens`).
fn finished_normally(sse: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Chunk {
        #[serde(default)]
        choices: Vec<Choice>,
    }
    #[derive(serde::Deserialize)]
    struct Choice {
        #[serde(default)]
        finish_reason: Option<String>,
    }
    let finder = memchr::memmem::Finder::new(b"finish_reason");
    let mut seen = false;
    for event in crate::sse::events(sse) {
        if finder.find(&event.data).is_none() {
            continue;
        }
        let Ok(chunk) = serde_json::from_slice::<Chunk>(&event.data) else {
            continue;
        };
        for reason in chunk.choices.into_iter().filter_map(|c| c.finish_reason) {
            if reason == "length" {
                return false;
            }
            seen = true;
        }
    }
    seen
}

/// The entry a plain answer is stored as, if it may be stored.
pub fn plain_entry(status: http::StatusCode, headers: &HeaderMap, body: Bytes, usage: Option<Usage>) -> Option<Entry> {
    storable(status, headers).then(|| Entry {
        stream: false,
        status: status.as_u16(),
        content_type: content_type(headers),
        body,
        usage,
        stored_at_ms: Entry::now_ms(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(cc: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(http::header::CACHE_CONTROL, cc.parse().unwrap());
        h
    }

    #[test]
    fn cache_control_directives() {
        assert_eq!(cache_control(&HeaderMap::new()), (false, false, None));
        assert_eq!(cache_control(&headers("no-store")), (true, false, None));
        assert_eq!(cache_control(&headers("No-Cache")), (false, true, None));
        assert_eq!(cache_control(&headers("max-age=30, private")), (false, false, Some(30)));
        assert_eq!(cache_control(&headers("max-age=\"5\"")), (false, false, Some(5)));
        assert_eq!(cache_control(&headers("max-age=soon")), (false, false, None));
    }

    /// A memory cache of `max_bytes`, and a plain request that it may
    /// store, to model `m`.
    fn memory_cache(max_bytes: u64) -> (Arc<Cache>, ModelCache, Arc<str>, Arc<ModelCounters>) {
        let config = CacheConfig {
            backend: CacheBackend::Memory { max_bytes },
            max_entry_bytes: 1 << 16,
            ttl: Duration::from_secs(60),
            scope: CacheScope::Key,
        };
        let cache = Cache::new(&config, &prometheus::Registry::new()).unwrap();
        let policy = ModelCache {
            ttl: Duration::from_secs(60),
            when: CacheWhen::Always,
        };
        let model: Arc<str> = Arc::from("m");
        let counters = cache.metrics.for_model(&model);
        (cache, policy, model, counters)
    }

    fn request<'a>(policy: &'a ModelCache, model: &'a Arc<str>, counters: &'a Arc<ModelCounters>) -> Request<'a> {
        static NO_HEADERS: std::sync::LazyLock<HeaderMap> = std::sync::LazyLock::new(HeaderMap::new);
        Request {
            policy,
            client: "app",
            endpoint: "/chat/completions",
            model,
            counters,
            targets: &[("up", "m-up")],
            stream: false,
            embeddings: false,
            headers: &NO_HEADERS,
            body: br#"{"messages":[]}"#,
        }
    }

    /// Looks `request` up (a miss) and stores `body` as its answer.
    fn miss_and_store(cache: &Arc<Cache>, request: &Request<'_>, body: Bytes) {
        use futures_util::FutureExt;
        let mut plan = cache.plan(request);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        let found = cache.lookup(&mut plan, false, deadline).now_or_never().unwrap();
        assert!(matches!(found, Ok(None)), "a miss");
        let entry = plain_entry(http::StatusCode::OK, &HeaderMap::new(), body, None);
        cache.store(&mut plan, entry);
    }

    /// The memory backend keeps a copy of the body, not the buffer the
    /// answer was read into (which, from hyper, is a slice of a larger one).
    #[test]
    fn a_stored_body_is_a_copy_of_its_own() {
        use futures_util::FutureExt;
        let (cache, policy, model, counters) = memory_cache(1 << 20);
        let request = request(&policy, &model, &counters);
        let read_buffer = Bytes::from(vec![b'x'; 8192]);
        let body = read_buffer.slice(..100);
        miss_and_store(&cache, &request, body.clone());
        let stored = cache.get(&cache.plan(&request)).now_or_never().unwrap().expect("a hit");
        assert_eq!(stored.body, body);
        let within = read_buffer.as_ptr_range();
        assert!(
            !within.contains(&stored.body.as_ptr()),
            "not a slice of the read buffer"
        );
    }

    /// An answer within `max_entry_bytes` that a cache smaller than it
    /// cannot hold is counted `not_stored`, not `stored`.
    #[test]
    fn an_answer_the_memory_cannot_hold_is_not_stored() {
        let (cache, policy, model, counters) = memory_cache(1_000);
        let request = request(&policy, &model, &counters);
        miss_and_store(&cache, &request, Bytes::from(vec![b'x'; 2_000]));
        assert_eq!(cache.metrics.get("m", CacheResult::NotStored), 1);
        assert_eq!(cache.metrics.get("m", CacheResult::Stored), 0);
        miss_and_store(&cache, &request, Bytes::from(vec![b'x'; 100]));
        assert_eq!(cache.metrics.get("m", CacheResult::Stored), 1);
    }

    #[test]
    fn only_normal_finishes_are_stored() {
        let stop = b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"},\"finish_reason\":null}]}\n\n\
data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}]}\n\ndata: [DONE]\n\n";
        assert!(finished_normally(stop));
        let length = String::from_utf8_lossy(stop).replace("\"stop\"", "\"length\"");
        assert!(!finished_normally(length.as_bytes()));
        assert!(
            !finished_normally(b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\ndata: [DONE]\n\n"),
            "no finish_reason at all"
        );
        let tools = String::from_utf8_lossy(stop).replace("\"stop\"", "\"tool_calls\"");
        assert!(finished_normally(tools.as_bytes()));
    }
}
