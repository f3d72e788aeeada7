//! Micro-benchmarks of the per-request and per-chunk pieces of relaygate,
//! through the library's public API: SSE event splitting, usage extraction,
//! the model-field rewrite, breaker and limiter admission, metric
//! recording, and the pick of a target (`route_pick`). `cargo bench` runs
//! them all in a few minutes; `cargo bench -- sse` runs the ones whose name
//! contains `sse`. What the numbers mean, and
//! the end-to-end benchmark: bench/README.md.
//!
//! Each group keeps its measurement short (2 s) so the whole run stays
//! bounded. A note on time: benches are built with the dev-dependencies, and
//! so with tokio's `test-util`, whose `Instant::now` consults a mockable
//! clock. That adds a few ns to anything that reads the time (breaker,
//! limiter) compared with the release binary.

use std::hint::black_box;
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use futures_util::{FutureExt, StreamExt};
use relaygate::config::BreakerConfig;
use relaygate::ratelimit::{self, Limiter, RawRule};
use relaygate::request::{self, Endpoint};
use relaygate::sse::{self, BodyError, SseReader};
use relaygate::telemetry::metrics::{AnsweredBy, ErrorType, Metrics, ModelMetrics, Outcome, UpstreamMetrics};
use relaygate::upstream::breaker::Breaker;
use relaygate::usage;

/// One streamed chat chunk, shaped like DeepSeek's and OpenAI's (~230 bytes).
fn content_event(i: usize) -> String {
    format!(
        "data: {{\"id\":\"chatcmpl-7f3a9c2e\",\"object\":\"chat.completion.chunk\",\"created\":1760000000,\
         \"model\":\"deepseek-chat\",\"system_fingerprint\":\"fp_8802369eaa_prod0623\",\"choices\":[{{\"index\":0,\
         \"delta\":{{\"content\":\" word{i}\"}},\"logprobs\":null,\"finish_reason\":null}}]}}\n\n"
    )
}

/// The last events of a stream: the usage-only chunk and `[DONE]`.
const USAGE_AND_DONE: &str = "data: {\"id\":\"chatcmpl-7f3a9c2e\",\"object\":\"chat.completion.chunk\",\
\"created\":1760000000,\"model\":\"deepseek-chat\",\"choices\":[],\"usage\":{\"prompt_tokens\":1523,\
\"completion_tokens\":412,\"total_tokens\":1935,\"prompt_tokens_details\":{\"cached_tokens\":1024},\
\"completion_tokens_details\":{\"reasoning_tokens\":0},\"prompt_cache_hit_tokens\":1024,\
\"prompt_cache_miss_tokens\":499}}\n\ndata: [DONE]\n\n";

/// A non-streaming chat completion (~700 bytes) with its usage at the end.
fn completion_body() -> Vec<u8> {
    let content = "Hello! ".repeat(60);
    format!(
        "{{\"id\":\"chatcmpl-7f3a9c2e\",\"object\":\"chat.completion\",\"created\":1760000000,\
         \"model\":\"deepseek-chat\",\"choices\":[{{\"index\":0,\"message\":{{\"role\":\"assistant\",\
         \"content\":\"{content}\"}},\"logprobs\":null,\"finish_reason\":\"stop\"}}],\"usage\":{{\
         \"prompt_tokens\":1523,\"completion_tokens\":412,\"total_tokens\":1935,\
         \"prompt_tokens_details\":{{\"cached_tokens\":1024}},\"prompt_cache_hit_tokens\":1024,\
         \"prompt_cache_miss_tokens\":499}},\"system_fingerprint\":\"fp_8802369eaa_prod0623\"}}"
    )
    .into_bytes()
}

/// A chat request (~1.3 KiB): a system prompt, a few turns, sampling fields
/// and a vendor extension that must reach the upstream untouched.
fn chat_request(stream: bool) -> Bytes {
    let turn = "Explain the difference between a mutex and a semaphore, briefly. ".repeat(4);
    Bytes::from(format!(
        "{{\"model\":\"deepseek-chat\",\"messages\":[\
         {{\"role\":\"system\",\"content\":\"You are a concise assistant.\"}},\
         {{\"role\":\"user\",\"content\":\"{turn}\"}},\
         {{\"role\":\"assistant\",\"content\":\"{turn}\"}},\
         {{\"role\":\"user\",\"content\":\"{turn}\"}}],\
         \"temperature\":0.2,\"top_p\":0.95,\"max_tokens\":512,\"stream\":{stream},\
         \"x_vendor_extension\":{{\"keep\":[1,2.50,\"three\"]}}}}"
    ))
}

fn sse(c: &mut Criterion) {
    let mut g = c.benchmark_group("sse");

    // The reader's common case: each read holds exactly one event.
    let events: Vec<Bytes> = (0..16).map(|i| Bytes::from(content_event(i))).collect();
    let total: usize = events.iter().map(Bytes::len).sum();
    g.throughput(Throughput::Bytes(total as u64));
    g.bench_function("reader/16_events_one_per_read", |b| b.iter(|| read_all(events.clone())));

    // Events split inside their JSON: the reader holds the partial event.
    let split: Vec<Bytes> = events
        .iter()
        .flat_map(|e| [e.slice(..e.len() / 2), e.slice(e.len() / 2..)])
        .collect();
    g.bench_function("reader/16_events_split_in_two", |b| b.iter(|| read_all(split.clone())));

    // Many events coalesced in one read (a fast upstream, a slow reader).
    let coalesced = vec![Bytes::from(events.iter().flat_map(|e| e.to_vec()).collect::<Vec<u8>>())];
    g.bench_function("reader/16_events_one_read", |b| b.iter(|| read_all(coalesced.clone())));

    // The boundary scan itself, on a batch ending in a complete event.
    let batch: Vec<u8> = events.iter().flat_map(|e| e.to_vec()).collect();
    g.bench_function("last_event_end/16_events", |b| {
        b.iter(|| sse::last_event_end(black_box(&batch)))
    });
    // Worst case: 16 KiB of one unfinished event, scanned from the start.
    let partial = vec![b'x'; 16 * 1024];
    g.throughput(Throughput::Bytes(partial.len() as u64));
    g.bench_function("last_event_end/16KiB_no_boundary", |b| {
        b.iter(|| sse::last_event_end(black_box(&partial)))
    });
    g.finish();
}

/// Drains an `SseReader` over `chunks`. The stream is always ready, so the
/// futures complete on their first poll: no runtime in the measurement.
fn read_all(chunks: Vec<Bytes>) -> usize {
    let upstream = futures_util::stream::iter(chunks.into_iter().map(Ok::<_, BodyError>)).boxed();
    let mut reader = SseReader::new(upstream);
    let mut n = 0;
    while let Some(batch) = reader
        .next_batch()
        .now_or_never()
        .expect("ready stream")
        .expect("well-formed SSE")
    {
        n += batch.len();
    }
    n
}

fn usage_extraction(c: &mut Criterion) {
    let mut g = c.benchmark_group("usage");
    let content = content_event(3);
    // A content event in a stream: the stream's inspector has seen its
    // earlier events, which begin alike (`sse::Inspector`).
    let stream: Vec<String> = (0..4).map(content_event).collect();
    let mut inspector = sse::Inspector::default();
    let mut i = 0;
    g.bench_function("inspect/content_event", |b| {
        b.iter(|| {
            i = if i + 1 == stream.len() { 0 } else { i + 1 };
            inspector.inspect(black_box(stream[i].as_bytes()))
        })
    });
    // A stream's first event, or one that begins unlike the last.
    g.bench_function("inspect/content_event_first", |b| {
        b.iter(|| sse::inspect(black_box(content.as_bytes())))
    });
    g.bench_function("inspect/usage_and_done", |b| {
        b.iter(|| sse::inspect(black_box(USAGE_AND_DONE.as_bytes())))
    });
    // inspect's two parts: the spec's event parse, and the text scan.
    g.bench_function("events/content_event", |b| {
        b.iter(|| sse::events(black_box(content.as_bytes())).count())
    });
    let data = content.trim_start_matches("data: ").trim_end();
    g.bench_function("generated_text_bytes/content_event", |b| {
        b.iter(|| usage::generated_text_bytes(black_box(data.as_bytes())))
    });
    let body = completion_body();
    g.bench_function("from_json/chat_completion", |b| {
        b.iter(|| usage::from_json(black_box(&body)).expect("JSON"))
    });
    g.finish();
}

fn model_rewrite(c: &mut Criterion) {
    let mut g = c.benchmark_group("request");
    for stream in [false, true] {
        let body = chat_request(stream);
        let kind = if stream { "stream" } else { "json" };
        g.throughput(Throughput::Bytes(body.len() as u64));
        g.bench_function(format!("parse/{kind}"), |b| {
            b.iter(|| request::parse(Endpoint::ChatCompletions, black_box(&body)).expect("valid"))
        });
        // With token limits or budgets: the estimate in the same pass, and
        // as it was, a second pass.
        g.bench_function(format!("parse_with_estimate/{kind}"), |b| {
            b.iter(|| request::parse_with_estimate(Endpoint::ChatCompletions, black_box(&body), 1024).expect("valid"))
        });
        g.bench_function(format!("parse_then_estimate/{kind}"), |b| {
            b.iter(|| {
                let p = request::parse(Endpoint::ChatCompletions, black_box(&body)).expect("valid");
                (p, ratelimit::estimate(black_box(&body), 1024))
            })
        });
        let parsed = request::parse(Endpoint::ChatCompletions, &body).expect("valid");
        g.bench_function(format!("body_for/{kind}/model_renamed"), |b| {
            b.iter(|| parsed.body_for(black_box(&body), black_box("deepseek-v3.2")))
        });
        g.bench_function(format!("parse_and_body_for/{kind}"), |b| {
            b.iter(|| {
                let p = request::parse(Endpoint::ChatCompletions, black_box(&body)).expect("valid");
                p.body_for(&body, "deepseek-v3.2")
            })
        });
    }
    g.finish();
}

fn breaker(c: &mut Criterion) {
    let metrics = Metrics::new();
    let breaker = Breaker::new("bench", BreakerConfig::default(), &metrics);
    c.bench_function("breaker/try_acquire_success", |b| {
        b.iter(|| breaker.try_acquire().expect("closed").success())
    });
}

fn limiter(c: &mut Criterion) {
    // The benchmark config's rule: one bucket per client key, generous
    // enough never to refuse here (the burst outlasts any run).
    let rule = RawRule {
        name: None,
        scope: "key".into(),
        r#match: None,
        requests_per_minute: Some(100_000_000),
        tokens_per_minute: None,
        burst: Some(100_000_000),
        on_limit: None,
        max_queue_wait: None,
    };
    let (settings, rules) = ratelimit::validate(None, vec![rule]).expect("valid rule");
    let registry = prometheus::Registry::new();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let limiter = rt.block_on(Limiter::new(settings, rules, &registry)).expect("limiter");
    // The local backend decides without awaiting: each future completes on
    // its first poll, so no runtime is in the measurement.
    c.bench_function("limiter/admit_request_reconcile", |b| {
        b.iter(|| {
            let admission = limiter
                .admit_request(black_box("app-a"), black_box("deepseek-chat"), 0)
                .now_or_never()
                .expect("local admission does not wait")
                .expect("admitted");
            admission
                .reconcile(0)
                .now_or_never()
                .expect("local reconcile does not wait");
        })
    });
}

/// What one local budget adds to a request (issue 17: at most 1 µs): the
/// estimate split into prompt and completion, priced into micro-dollars,
/// the lock-free reservation, and the settle at the real cost. A budget per
/// key without `match` (a name lookup) and a `warn_at` check included;
/// `_match_paris`: one key's budget (`match`, no lookup by name) in a named
/// zone.
fn budget(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let engine = |matches: Option<&str>, timezone: Option<&str>| {
        let raw = relaygate::budget::RawBudget {
            name: "per-key".into(),
            scope: "key".into(),
            r#match: matches.map(Into::into),
            usd: 1e9,
            period: "month".into(),
            timezone: timezone.map(Into::into),
            on_exceed: None,
            warn_at: None,
        };
        let (settings, budgets) =
            relaygate::budget::validate(None, vec![raw], &ratelimit::RateLimitSettings::default())
                .expect("valid budget");
        rt.block_on(relaygate::budget::Budgets::new(
            settings,
            budgets,
            &prometheus::Registry::new(),
            Box::new(relaygate::budget::SystemClock),
        ))
        .expect("budgets")
    };
    let per_key = engine(None, None);
    let paris = engine(Some("app-a"), Some("Europe/Paris"));
    let price = relaygate::config::Price {
        input_per_mtok: 0.28,
        output_per_mtok: 0.42,
        cached_input_per_mtok: Some(0.028),
    };
    let body = chat_request(false);
    let used = usage::Usage {
        prompt: 20,
        completion: 12,
        cached_prompt: 0,
        reasoning: 0,
    };
    let mut g = c.benchmark_group("budget");
    for (name, engine) in [("reserve_settle", &per_key), ("reserve_settle_match_paris", &paris)] {
        g.bench_function(name, |b| {
            b.iter(|| {
                let r = engine
                    .reserve_request(black_box("app-a"), black_box("deepseek-chat"), black_box(420))
                    .now_or_never()
                    .expect("a local reservation does not wait")
                    .expect("admitted");
                r.settle_in_background(used.cost_micros(&price));
            })
        });
    }
    g.bench_function("estimate_price_reserve_settle", |b| {
        b.iter(|| {
            let micros = usage::worst_case_micros(Some(&price), ratelimit::estimate(black_box(&body), 1024));
            let r = per_key
                .reserve_request(black_box("app-a"), black_box("deepseek-chat"), micros)
                .now_or_never()
                .expect("a local reservation does not wait")
                .expect("admitted");
            r.settle_in_background(used.cost_micros(&price));
        })
    });
    g.bench_function("none", |b| {
        let none = relaygate::budget::Budgets::none();
        b.iter(|| black_box(&none).is_empty())
    });
    g.finish();
}

fn metrics(c: &mut Criterion) {
    let mut g = c.benchmark_group("metrics");
    let m = Metrics::new();
    let model = "deepseek-chat";
    let upstream = "fast-a";
    // What the end of one request recorded before the handles were resolved
    // once: label lookups by value on every call.
    g.bench_function("record_request/with_label_values", |b| {
        b.iter(|| {
            m.in_flight.inc();
            m.requests
                .with_label_values(&[
                    black_box(model),
                    upstream,
                    "200",
                    Outcome::Success.as_str(),
                    "chat_completions",
                ])
                .inc();
            m.request_duration
                .with_label_values(&[black_box(model)])
                .observe(0.0042);
            m.upstream_requests
                .with_label_values(&[black_box(upstream), "200", "none"])
                .inc();
            m.upstream_duration
                .with_label_values(&[black_box(upstream)])
                .observe(0.0041);
            for (kind, n) in [("prompt", 1523), ("completion", 412)] {
                m.tokens
                    .with_label_values(&[black_box(model), upstream, kind])
                    .inc_by(n);
            }
            m.overhead.observe(0.00004);
            m.in_flight.dec();
        })
    });
    // The same through the handles resolved at config load, as
    // observe.rs and layers/mod.rs record now.
    let model_metrics = ModelMetrics::new(&m, model, &[upstream], &[0]);
    let upstream_metrics = UpstreamMetrics::new(&m, upstream);
    let started = tokio::time::Instant::now();
    g.bench_function("record_request/resolved_handles", |b| {
        b.iter(|| {
            m.in_flight.inc();
            model_metrics
                .request(black_box(200), Outcome::Success, AnsweredBy::Upstream(black_box(0)), 0)
                .inc();
            model_metrics.duration.observe(black_box(0.0042));
            upstream_metrics.attempt(black_box(Some(200)), ErrorType::None, started);
            let at = model_metrics.at(black_box(0)).expect("a target");
            at.tokens[0].inc_by(black_box(1523));
            at.tokens[1].inc_by(black_box(412));
            m.overhead.observe(black_box(0.00004));
            m.in_flight.dec();
        })
    });
    // A scrape of the registry holding those series.
    g.bench_function("render", |b| b.iter(|| m.render()));
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(50)
}

/// A chat request of about `bytes` bytes: a system prompt and a question,
/// the bulk in the messages' text.
fn sized_request(bytes: usize) -> Vec<u8> {
    let filler = "The quick brown fox jumps over the lazy dog. ".repeat(bytes / 45);
    serde_json::to_vec(&serde_json::json!({
        "model": "deepseek-chat",
        "temperature": 0,
        "max_tokens": 256,
        "messages": [
            { "role": "system", "content": filler },
            { "role": "user", "content": "Summarise the above in one line." },
        ],
    }))
    .expect("serialises")
}

/// The response cache's cost per request: the key (parse into a value,
/// canonical JSON, SHA-256) on every request of a cache-enabled model,
/// beside the request parse every request pays, and a raw SHA-256 of the
/// same bytes; a hit's whole lookup; and a miss's, with the store of its
/// answer.
fn cache(c: &mut Criterion) {
    use relaygate::cache::{self, Cache, Entry};
    use relaygate::config::{CacheBackend, CacheConfig, CacheScope, CacheWhen, ModelCache};
    let mut g = c.benchmark_group("cache");
    let config = CacheConfig {
        backend: CacheBackend::Memory { max_bytes: 64 << 20 },
        max_entry_bytes: 1 << 20,
        ttl: Duration::from_secs(600),
        scope: CacheScope::Key,
    };
    let store = Cache::new(&config, &prometheus::Registry::new()).expect("cache");
    let policy = ModelCache {
        ttl: Duration::from_secs(600),
        when: CacheWhen::Deterministic,
    };
    let model: std::sync::Arc<str> = std::sync::Arc::from("deepseek-chat");
    let counters = store.metrics.for_model(&model);
    let headers = http::HeaderMap::new();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    for (name, size) in [("1KiB", 1024), ("64KiB", 64 * 1024)] {
        let body = sized_request(size);
        g.throughput(Throughput::Bytes(body.len() as u64));
        let request = cache::Request {
            policy: &policy,
            client: "app-a",
            endpoint: "/chat/completions",
            model: &model,
            counters: &counters,
            targets: &[("holysheep", "deepseek-v3.2")],
            stream: false,
            embeddings: false,
            headers: &headers,
            body: &body,
        };
        g.bench_function(format!("key/{name}"), |b| b.iter(|| store.plan(black_box(&request))));
        g.bench_function(format!("request_parse/{name}"), |b| {
            b.iter(|| request::parse(Endpoint::ChatCompletions, black_box(&body)).expect("valid"))
        });
        g.bench_function(format!("sha256_of_body/{name}"), |b| {
            b.iter(|| ring::digest::digest(&ring::digest::SHA256, black_box(&body)))
        });
        let mut plan = store.plan(&request);
        let mut json = http::HeaderMap::new();
        json.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        let answer = cache::plain_entry(http::StatusCode::OK, &json, bytes::Bytes::from(vec![b'x'; 600]), None);
        store.store(&mut plan, answer);
        g.bench_function(format!("hit/{name}"), |b| {
            b.iter(|| {
                let plan = store.plan(black_box(&request));
                let found: Option<std::sync::Arc<Entry>> = rt.block_on(store.get(&plan));
                found.expect("a hit")
            })
        });
    }
    // A miss at 0 % hits: the plan (key), the lookup that misses and leads
    // the single flight, and the store of the answer (600 bytes, which the
    // store copies). A counter in the body makes every request new. Its own
    // cache, held at 4 MiB: full within the warm-up, so every store also
    // evicts, the steady state of a busy cache (and the `hit` lookups above
    // keep a small table). What the proxy path has anyway is made outside
    // the timing (`iter_batched`'s set-up): the request's body and deadline,
    // and the upstream's answer (a slice of hyper's read buffer there).
    let config = CacheConfig {
        backend: CacheBackend::Memory { max_bytes: 4 << 20 },
        ..config
    };
    let misses = Cache::new(&config, &prometheus::Registry::new()).expect("cache");
    let miss_counters = misses.metrics.for_model(&model);
    let mut json = http::HeaderMap::new();
    json.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    let answer = bytes::Bytes::from(vec![b'x'; 8192]);
    for (name, size) in [("1KiB", 1024), ("64KiB", 64 * 1024)] {
        let template = sized_request(size);
        let at = template
            .windows(9)
            .position(|w| w == b"Summarise")
            .expect("the question");
        let mut n: u64 = 0;
        g.throughput(Throughput::Bytes(template.len() as u64));
        g.bench_function(format!("miss_store/{name}"), |b| {
            b.iter_batched(
                || {
                    n += 1;
                    let mut body = template.clone();
                    for (i, byte) in body[at..at + 9].iter_mut().enumerate() {
                        *byte = b'a' + ((n >> (4 * i)) & 0xf) as u8;
                    }
                    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
                    (body, deadline, answer.slice(..600))
                },
                |(body, deadline, answer)| {
                    let mut plan = misses.plan(&cache::Request {
                        policy: &policy,
                        client: "app-a",
                        endpoint: "/chat/completions",
                        model: &model,
                        counters: &miss_counters,
                        targets: &[("holysheep", "deepseek-v3.2")],
                        stream: false,
                        embeddings: false,
                        headers: &headers,
                        body: &body,
                    });
                    let found = misses
                        .lookup(&mut plan, false, deadline)
                        .now_or_never()
                        .expect("a memory miss does not wait");
                    assert!(matches!(found, Ok(None)), "a miss");
                    misses.store(&mut plan, cache::plain_entry(http::StatusCode::OK, &json, answer, None));
                    body
                },
                criterion::BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

/// A model over `n` upstreams, all priority 0, routed by `routing`, each
/// target measured a few times (`latency`) so that a pick compares real
/// estimates.
fn routed(n: usize, routing: &str, metrics: &Metrics) -> relaygate::stack::Route {
    use relaygate::stack::balance::{LoadRegistry, Settled};
    use relaygate::upstream::{Upstream, UpstreamState};
    let mut text = String::new();
    for i in 0..n {
        text.push_str(&format!(
            "[[upstreams]]\nname = \"u{i}\"\nbase_url = \"http://127.0.0.1:9/v1\"\n"
        ));
    }
    let targets: Vec<String> = (0..n).map(|i| format!("{{ upstream = \"u{i}\" }}")).collect();
    text.push_str(&format!(
        "[[models]]\nname = \"m\"\n{routing}\ntargets = [{}]\n",
        targets.join(", ")
    ));
    let config = relaygate::Config::parse(&text, |_| None).expect("valid bench config");
    let upstreams: Vec<std::sync::Arc<Upstream>> = config
        .upstreams
        .iter()
        .enumerate()
        .map(|(i, u)| {
            let breaker = Breaker::new(&u.name, u.circuit_breaker.clone(), metrics);
            let state = std::sync::Arc::new(UpstreamState::new(breaker, Duration::from_secs(60)));
            std::sync::Arc::new(Upstream::new(u.clone(), i, state, metrics).expect("client"))
        })
        .collect();
    let route = relaygate::stack::Route::new(
        &config.models[0],
        &upstreams,
        &config.retry,
        1 << 20,
        metrics,
        &LoadRegistry::default(),
    );
    for _ in 0..3 {
        for t in 0..n {
            if let Some(pending) = route.begin(t) {
                let ttft = Duration::from_millis(20 + 10 * t as u64);
                drop(route.settle(t, pending, Settled::FirstByte(Some(ttft))));
            }
        }
    }
    route
}

/// One pick of the target for a request's first attempt, as
/// `gateway::handle` makes it (`Route::pick`: the clock, a generator, the
/// breaker and cooldown of every target, the counter): `latency` (power
/// of two choices over the estimates) against `priority` (by weight).
fn routing(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let _runtime = rt.enter();
    let metrics = Metrics::new();
    let mut g = c.benchmark_group("route_pick");
    for n in [2, 8] {
        for routing in ["latency", "priority"] {
            let route = routed(n, &format!("routing = \"{routing}\""), &metrics);
            g.bench_function(format!("{routing}/{n}_targets"), |b| {
                b.iter(|| {
                    route
                        .pick(black_box(|_: &relaygate::stack::Target| true))
                        .expect("a target")
                })
            });
        }
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = config();
    targets = sse, usage_extraction, model_rewrite, breaker, limiter, budget, metrics, cache, routing
}
criterion_main!(benches);
