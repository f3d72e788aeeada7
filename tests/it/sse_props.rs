//! The SSE reader against the spec, by property, and a bounded fuzz run of
//! it and of the request parser (issue 21).
//!
//! The property: a stream of chat chunks, a usage-only chunk and `[DONE]`,
//! written with random line ends (LF, CRLF, CR, mixed), JSON whitespace
//! (spaces, and newlines, which split an event's data over several `data:`
//! lines), comments, other fields, the optional space after `data:`, and
//! cut into random reads, yields what the plain form (compact JSON, one
//! `data: ` line, LF) yields: the same events, `[DONE]`, usage and text
//! estimate; the batches are the upstream's bytes, unchanged; and stripping
//! the usage-only chunk removes exactly that event's bytes, however many
//! lines it spans.
//!
//! Along the way, `inspect` (which cuts one-line LF events itself) reads
//! what `inspect_by_events` (the spec's parse for every event) reads.
//!
//! The fuzz run: arbitrary bytes, in arbitrary reads, through the reader,
//! `inspect` (against `inspect_by_events`) and `strip_usage_only`, and
//! arbitrary bodies through `request::parse`: no panic, no hang, batches
//! that add up to at most the input. It runs for `RELAYGATE_FUZZ_SECONDS`
//! (2 by default; CI sets 60) and prints its executions. A proptest loop,
//! not `cargo fuzz`: that needs a nightly toolchain, which this project's
//! machines do not have.

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use relaygate::request::{self, Endpoint};
use relaygate::sse::{self, BodyError, ReadError, SseReader};
use relaygate::usage;

/// Polls a future whose inputs are all in memory: it must be ready at once.
fn now<F: Future>(f: F) -> F::Output {
    match pin!(f).poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("a read from memory was pending"),
    }
}

fn reader(bytes: &[u8], cuts: &[usize]) -> SseReader {
    let mut reads = Vec::new();
    let mut at = 0;
    for &cut in cuts {
        let end = (at + cut).min(bytes.len());
        if end > at {
            reads.push(Ok(Bytes::copy_from_slice(&bytes[at..end])));
            at = end;
        }
    }
    if at < bytes.len() {
        reads.push(Ok(Bytes::copy_from_slice(&bytes[at..])));
    }
    SseReader::new(futures_util::stream::iter(reads).boxed())
}

/// Every batch the reader gives, and how it ended.
fn read_all(mut r: SseReader) -> (Vec<Bytes>, Result<(), ReadError>) {
    let mut batches = Vec::new();
    loop {
        match now(r.next_batch()) {
            Ok(Some(b)) => batches.push(b),
            Ok(None) => return (batches, Ok(())),
            Err(e) => return (batches, Err(e)),
        }
    }
}

#[derive(Debug, Clone)]
struct Chunks {
    texts: Vec<String>,
    usage: Option<(u64, u64)>,
    done: bool,
}

/// How a stream is written: each choice is taken in turn, cycling.
#[derive(Debug, Clone)]
struct Style {
    /// 0 LF, 1 CRLF, 2 CR, per line.
    line_ends: Vec<u8>,
    /// A space after `data:`, per data line.
    spaces: Vec<bool>,
    /// Between JSON tokens: 0 nothing, 1 a space, 2 a newline (a new `data:` line).
    gaps: Vec<u8>,
    /// A comment line, then an `event:`/`id:` line, before an event.
    extras: Vec<(bool, bool)>,
    /// Read sizes.
    cuts: Vec<usize>,
}

struct Cycle<'a, T>(&'a [T], usize);

impl<T: Copy> Cycle<'_, T> {
    fn next(&mut self) -> T {
        let v = self.0[self.1 % self.0.len()];
        self.1 += 1;
        v
    }
}

fn json_tokens(chunk: Option<&str>, usage: Option<(u64, u64)>) -> Vec<String> {
    let mut t: Vec<String> = ["{", "\"choices\"", ":", "["].map(String::from).to_vec();
    if let Some(text) = chunk {
        t.extend(
            [
                "{",
                "\"index\"",
                ":",
                "0",
                ",",
                "\"delta\"",
                ":",
                "{",
                "\"content\"",
                ":",
            ]
            .map(String::from),
        );
        t.push(serde_json::to_string(text).unwrap());
        t.extend(["}", "}"].map(String::from));
    }
    t.push("]".into());
    if let Some((p, c)) = usage {
        t.extend([",", "\"usage\"", ":", "{", "\"prompt_tokens\"", ":"].map(String::from));
        t.push(p.to_string());
        t.extend([",", "\"completion_tokens\"", ":"].map(String::from));
        t.push(c.to_string());
        t.push("}".into());
    }
    t.push("}".into());
    t
}

/// The stream's bytes, and the byte range of its usage-only event.
fn write(chunks: &Chunks, style: Option<&Style>) -> (Vec<u8>, Option<std::ops::Range<usize>>) {
    let plain = Style {
        line_ends: vec![0],
        spaces: vec![true],
        gaps: vec![0],
        extras: vec![(false, false)],
        cuts: vec![1],
    };
    let style = style.unwrap_or(&plain);
    let (mut ends, mut spaces, mut gaps, mut extras) = (
        Cycle(&style.line_ends, 0),
        Cycle(&style.spaces, 0),
        Cycle(&style.gaps, 0),
        Cycle(&style.extras, 0),
    );
    let mut out = Vec::new();
    let mut last_end = 0u8;
    let mut line = |out: &mut Vec<u8>, text: &[u8], ends: &mut Cycle<u8>| {
        out.extend_from_slice(text);
        let mut end = ends.next();
        // CR then an LF-ended blank line would read as one CRLF.
        if text.is_empty() && last_end == 2 && end == 0 {
            end = 1;
        }
        out.extend_from_slice([&b"\n"[..], b"\r\n", b"\r"][end as usize]);
        last_end = end;
    };
    let mut event = |out: &mut Vec<u8>, data: &str, ends: &mut Cycle<u8>| {
        let (comment, field) = extras.next();
        if comment {
            line(out, b": keep-alive", ends);
        }
        if field {
            line(out, b"event: message", ends);
            line(out, b"id: 7", ends);
        }
        for piece in data.split('\n') {
            let prefix: &[u8] = if spaces.next() { b"data: " } else { b"data:" };
            line(out, &[prefix, piece.as_bytes()].concat(), ends);
        }
        line(out, b"", ends);
    };
    let mut json = |tokens: Vec<String>| {
        let mut s = String::new();
        for (i, t) in tokens.iter().enumerate() {
            if i > 0 {
                s.push_str(["", " ", "\n"][gaps.next() as usize]);
            }
            s.push_str(t);
        }
        s
    };
    for text in &chunks.texts {
        let data = json(json_tokens(Some(text), None));
        event(&mut out, &data, &mut ends);
    }
    let mut usage_span = None;
    if let Some(usage) = chunks.usage {
        let data = json(json_tokens(None, Some(usage)));
        let start = out.len();
        event(&mut out, &data, &mut ends);
        usage_span = Some(start..out.len());
    }
    if chunks.done {
        event(&mut out, "[DONE]", &mut ends);
    }
    (out, usage_span)
}

/// What relaygate reads of a stream: events, `[DONE]`, the last usage, the
/// text estimate.
fn seen(batches: &[Bytes]) -> (usize, bool, Option<(u64, u64)>, u64) {
    let (mut events, mut done, mut usage, mut text) = (0, false, None, 0);
    let mut inspector = sse::Inspector::default();
    for b in batches {
        events += sse::events(b).count();
        let info = inspector.inspect(b);
        done |= info.done;
        if let Some(u) = info.usage {
            usage = Some((u.prompt, u.completion));
        }
        text += info.text_bytes;
    }
    (events, done, usage, text)
}

/// `sse::inspect` by the spec's parse alone: what it does for every event
/// that is not one `data:` line ended by LF LF, which it cuts itself.
fn inspect_by_events(batch: &[u8]) -> sse::BatchInfo {
    let mut info = sse::BatchInfo::default();
    for event in sse::events(batch) {
        let data = &*event.data;
        if data == b"[DONE]" {
            info.done = true;
            continue;
        }
        let scan = usage::scan(data);
        info.text_bytes += scan.text_bytes;
        if scan.mentions_usage {
            if let Ok(Some(u)) = usage::from_json(data) {
                info.usage = Some(u);
            }
        }
    }
    info
}

fn chunks() -> impl Strategy<Value = Chunks> {
    let text = prop::collection::vec(any::<char>(), 0..12).prop_map(String::from_iter);
    (
        prop::collection::vec(text, 0..8),
        prop::option::of((0..100_000u64, 0..100_000u64)),
        any::<bool>(),
    )
        .prop_map(|(texts, usage, done)| Chunks { texts, usage, done })
}

fn style() -> impl Strategy<Value = Style> {
    (
        prop::collection::vec(0..3u8, 1..16),
        prop::collection::vec(any::<bool>(), 1..8),
        prop::collection::vec(0..3u8, 1..16),
        prop::collection::vec((any::<bool>(), any::<bool>()), 1..6),
        prop::collection::vec(1..40usize, 1..16),
    )
        .prop_map(|(line_ends, spaces, gaps, extras, cuts)| Style {
            line_ends,
            spaces,
            gaps,
            extras,
            cuts,
        })
}

proptest! {
    #![proptest_config(Config { cases: 512, ..Config::default() })]

    #[test]
    fn any_legal_writing_reads_as_the_plain_form(chunks in chunks(), style in style()) {
        let (plain, _) = write(&chunks, None);
        let (bytes, usage_span) = write(&chunks, Some(&style));
        let (plain_batches, plain_end) = read_all(reader(&plain, &[plain.len()]));
        let (batches, end) = read_all(reader(&bytes, &style.cuts));
        prop_assert_eq!(plain_end, Ok(()));
        prop_assert_eq!(end, Ok(()), "{:?}", String::from_utf8_lossy(&bytes));

        // The batches are the upstream's bytes, in order, nothing added.
        prop_assert_eq!(batches.concat(), bytes.clone());
        let want = seen(&plain_batches);
        let text: u64 = chunks.texts.iter().map(|t| t.len() as u64).sum();
        prop_assert_eq!(want, (chunks.texts.len() + chunks.usage.is_some() as usize + chunks.done as usize,
            chunks.done, chunks.usage, text));
        prop_assert_eq!(seen(&batches), want, "{:?}", String::from_utf8_lossy(&bytes));
        // inspect's cut of one-line events reads what the spec's parse reads,
        // per batch and over the whole stream at once, plain and as written.
        // So does one stream's inspector, which learns how its events begin
        // and end, carried here across all of them.
        let whole = [Bytes::from(plain.clone()), Bytes::from(bytes.clone())];
        let mut inspector = sse::Inspector::default();
        for b in batches.iter().chain(&plain_batches).chain(&whole) {
            let want = inspect_by_events(b);
            prop_assert_eq!(&sse::inspect(b), &want, "{:?}", String::from_utf8_lossy(b));
            prop_assert_eq!(inspector.inspect(b), want, "{:?}", String::from_utf8_lossy(b));
        }

        // Stripping removes the usage-only event, all of its lines, and nothing else.
        let stripped: Vec<u8> = batches.iter().flat_map(|b| sse::strip_usage_only(b.clone()).to_vec()).collect();
        let mut expected = bytes.clone();
        if let Some(span) = usage_span {
            expected.drain(span);
        }
        prop_assert_eq!(String::from_utf8_lossy(&stripped), String::from_utf8_lossy(&expected));
    }
}

/// Bytes that keys are made of and that stand around them, members with
/// text or usage, and decoys: the halves of a key, a key's quote escaped,
/// Teddy's filler.
fn key_soup() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        Just(&b"\"content\""[..]),
        Just(&b"\"reasoning_content\""[..]),
        Just(&b"\"reasoning\""[..]),
        Just(&b"\"arguments\""[..]),
        Just(&b"\"text\""[..]),
        Just(&b"\"usage\""[..]),
        Just(&b"\"con"[..]),
        Just(&b"tent\""[..]),
        Just(&b"\\\""[..]),
        Just(&b"{\"content\":\"ab\""[..]),
        Just(&b",\"text\": \"cd\""[..]),
        Just(&b"{\"reasoning_content\":\"e\"}"[..]),
        Just(&b",\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}"[..]),
        Just(&b"ntent\":\"fg\""[..]),
        Just(&b"\"ab\""[..]),
        Just(&b"\""[..]),
        Just(&b":"[..]),
        Just(&b"{"[..]),
        Just(&b"}"[..]),
        Just(&b","[..]),
        Just(&b" "[..]),
        Just(&b"_"[..]),
        Just(&b"ab"[..]),
        Just(&b"[1]"[..]),
        Just(&b"\0\0\0"[..]),
    ];
    prop::collection::vec(piece, 0..12).prop_map(|p| p.concat())
}

proptest! {
    #![proptest_config(Config { cases: 1024, ..Config::default() })]

    /// A stream's inspector, which skips the beginning and end that an
    /// event shares with the ones before, reads each event as a fresh one
    /// does: events that share beginnings and ends made of keys, parts of
    /// keys and the bytes around them, one event a batch or several.
    #[test]
    fn an_inspector_reads_each_event_as_a_fresh_one(
        starts in prop::collection::vec(key_soup(), 1..3),
        ends in prop::collection::vec((0..3usize, key_soup()), 1..3),
        events in prop::collection::vec((key_soup(), 0..5usize, 0..3usize, 0..3usize, any::<bool>()), 1..12),
    ) {
        // An end may begin with the last part of a key, and a middle end
        // with its first part or a whole key: a key then runs across where
        // the end the events share begins.
        const HEADS: [&[u8]; 5] = [b"", b",\"con", b",\"te", b",\"content\"", b",\"text\""];
        const TAILS: [&[u8]; 3] = [b"", b"tent\":\"ab\"", b"xt\":\"cd\""];
        let mut inspector = sse::Inspector::default();
        let mut batch = Vec::new();
        for (middle, head, start, end, flush) in events {
            let start = starts.get(start).map_or(&b""[..], |s| &s[..]);
            let end = ends.get(end).map_or(Vec::new(), |(tail, soup)| [TAILS[*tail], soup].concat());
            batch.extend_from_slice(b"data: ");
            batch.extend_from_slice(&[start, &middle[..], HEADS[head], &end[..]].concat());
            batch.extend_from_slice(b"\n\n");
            if flush {
                prop_assert_eq!(inspector.inspect(&batch), sse::inspect(&batch), "{:?}", String::from_utf8_lossy(&batch));
                batch.clear();
            }
        }
        prop_assert_eq!(inspector.inspect(&batch), sse::inspect(&batch), "{:?}", String::from_utf8_lossy(&batch));
    }
}

/// One fuzz execution: arbitrary bytes in arbitrary reads, and the same
/// bytes as a request body.
fn fuzz_one(bytes: &[u8], cuts: &[usize]) {
    let (batches, _) = read_all(reader(bytes, cuts));
    let total: usize = batches.iter().map(Bytes::len).sum();
    assert!(total <= bytes.len());
    assert_eq!(sse::inspect(bytes), inspect_by_events(bytes), "{bytes:?}");
    let mut inspector = sse::Inspector::default();
    for b in &batches {
        assert_eq!(sse::inspect(b), inspect_by_events(b), "{b:?}");
        assert_eq!(inspector.inspect(b), inspect_by_events(b), "{b:?}");
        let stripped = sse::strip_usage_only(b.clone());
        assert!(stripped.len() <= b.len());
        let _ = sse::events(b).count();
    }
    let body = Bytes::copy_from_slice(bytes);
    for endpoint in [Endpoint::ChatCompletions, Endpoint::Completions, Endpoint::Embeddings] {
        if let Ok(parsed) = request::parse(endpoint, &body) {
            let _ = parsed.body_for(&body, "renamed");
        }
    }
    assert_parse_with_estimate_agrees(bytes);
    let _ = relaygate::usage::generated_text_bytes(bytes);
}

/// `parse_with_estimate` (one pass) answers exactly as `parse` and
/// `ratelimit::estimate` (two), for every routed endpoint.
fn assert_parse_with_estimate_agrees(body: &[u8]) {
    for endpoint in Endpoint::ROUTED {
        let one = request::parse_with_estimate(endpoint, body, 77).map(|(p, e)| (format!("{p:?}"), e));
        let two = request::parse(endpoint, body).map(|p| (format!("{p:?}"), relaygate::ratelimit::estimate(body, 77)));
        match (one, two) {
            (Ok(one), Ok(two)) => assert_eq!(one, two, "{:?}", String::from_utf8_lossy(body)),
            (Err(one), Err(two)) => assert_eq!(one.to_string(), two.to_string()),
            (one, two) => panic!("{one:?} vs {two:?} for {:?}", String::from_utf8_lossy(body)),
        }
    }
}

/// A JSON value of the kinds a request's fields hold, the wrong kinds too.
fn json_value() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        Just("null".to_owned()),
        Just("true".to_owned()),
        Just("0".to_owned()),
        Just("64".to_owned()),
        Just("-3".to_owned()),
        Just("2.5".to_owned()),
        Just("1e3".to_owned()),
        Just(r#""m""#.to_owned()),
        Just(r#""Say hello""#.to_owned()),
        Just(r#""deep\u0073eek \"q\"""#.to_owned()),
        Just(r#""data:image/png;base64,AAAA""#.to_owned()),
        Just(r#""""#.to_owned()),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(|v| format!("[{}]", v.join(","))),
            prop::collection::vec(
                (
                    prop::sample::select(vec!["role", "content", "type", "text", "k"]),
                    inner
                ),
                0..4
            )
            .prop_map(|v| {
                let members: Vec<String> = v.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
                format!("{{{}}}", members.join(","))
            }),
        ]
    })
}

proptest! {
    #![proptest_config(Config { cases: 2048, ..Config::default() })]

    /// Request bodies of the fields both passes read, in any order, any
    /// kind, sometimes twice.
    #[test]
    fn parse_with_estimate_agrees_with_parse_and_estimate(
        members in prop::collection::vec(
            (
                prop::sample::select(vec![
                    "model", "messages", "prompt", "input", "instructions", "tools", "functions",
                    "max_tokens", "max_completion_tokens", "max_output_tokens", "n", "stream",
                    "temperature", "stream_options", "user",
                ]),
                json_value(),
            ),
            0..10,
        ),
        with_model in any::<bool>(),
    ) {
        let mut members: Vec<String> = members.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
        if with_model {
            members.insert(0, r#""model":"m""#.to_owned());
        }
        let body = format!("{{{}}}", members.join(","));
        assert_parse_with_estimate_agrees(body.as_bytes());
    }
}

/// Bytes drawn mostly from what the reader and the parsers look at.
fn fuzz_input() -> impl Strategy<Value = (Vec<u8>, Vec<usize>)> {
    let piece = prop_oneof![
        Just(b"data:".to_vec()),
        Just(b"data: ".to_vec()),
        Just(b"\n".to_vec()),
        Just(b"\r".to_vec()),
        Just(b"\r\n".to_vec()),
        Just(b":".to_vec()),
        Just(b"[DONE]".to_vec()),
        Just(b"{\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}}".to_vec()),
        Just(b"\"content\"".to_vec()),
        Just(b"\"model\":\"m\"".to_vec()),
        Just(b"\"stream\":true".to_vec()),
        Just(b"\\u".to_vec()),
        Just(b"\\".to_vec()),
        Just(b"\"".to_vec()),
        Just(b"{".to_vec()),
        Just(b"}".to_vec()),
        prop::collection::vec(any::<u8>(), 0..8),
    ];
    (
        prop::collection::vec(piece, 0..64).prop_map(|p| p.concat()),
        prop::collection::vec(1..64usize, 1..8),
    )
}

#[test]
fn fuzz_the_reader_and_the_request_parser_for_a_bounded_time() {
    let seconds: u64 = std::env::var("RELAYGATE_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut runner = TestRunner::new(Config {
        failure_persistence: None,
        ..Config::default()
    });
    let strategy = fuzz_input();
    let (mut executions, mut bytes) = (0u64, 0u64);
    while Instant::now() < deadline {
        let tree = strategy.new_tree(&mut runner).unwrap();
        let (input, cuts) = proptest::strategy::ValueTree::current(&tree);
        fuzz_one(&input, &cuts);
        executions += 1;
        bytes += input.len() as u64;
    }
    println!("fuzz: {executions} executions, {bytes} bytes in {seconds} s");
    assert!(executions > 100, "{executions} executions");
}

/// An event that never ends is bounded: the reader fails at 1 MiB instead
/// of buffering without end.
#[test]
fn an_event_that_never_ends_is_bounded() {
    let reads: Vec<Result<Bytes, BodyError>> = (0..200).map(|_| Ok(Bytes::from(vec![b'x'; 8 * 1024]))).collect();
    let (batches, end) = read_all(SseReader::new(futures_util::stream::iter(reads).boxed()));
    assert!(batches.is_empty());
    assert_eq!(end, Err(ReadError::EventTooLarge));
}
