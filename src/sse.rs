//! SSE, read as the WHATWG HTML spec defines it ("server-sent events"):
//! lines end in LF, CRLF or CR; a line starting with `:` is a comment; a
//! field's value follows its colon, less one optional space; `data` lines
//! join with LF; a blank line dispatches the event (if it has data).
//!
//! Bytes go to the client exactly as the upstream sent them, but only in
//! whole events: a partial event is held until its blank line arrives. That
//! costs nothing in latency (a client cannot act on half an event) and it
//! means that when a stream breaks, the error event relaygate appends starts
//! on an event boundary and is never glued to half a JSON chunk.
//!
//! There is no channel between upstream and client: the client's body pulls
//! from the upstream body, so a slow reader applies TCP backpressure to the
//! upstream instead of growing a buffer. The only buffer is one partial
//! event, bounded by `MAX_EVENT_BYTES`.
//!
//! What relaygate reads of the events (`inspect`: `[DONE]`, usage, the
//! generated text) it reads per event, after the spec's parse, so the
//! choice of line ends, data lines split or not, comments and JSON
//! whitespace change nothing. The common event, one `data:` line of
//! compact JSON, is parsed without a copy.

use std::borrow::Cow;
use std::ops::Range;

use bytes::{Bytes, BytesMut};
use futures_util::stream::BoxStream;
use futures_util::StreamExt;

use crate::request::Endpoint;
use crate::usage::{self, Usage, USAGE_KEY};

/// Longest single SSE event accepted. Chat chunks are hundreds of bytes; a
/// megabyte without a blank line is a broken or hostile upstream.
pub const MAX_EVENT_BYTES: usize = 1024 * 1024;

/// The upstream's body failed mid-way (reset, protocol error).
#[derive(Debug)]
pub struct BodyError;

pub type ByteStream = BoxStream<'static, Result<Bytes, BodyError>>;

#[derive(Debug, PartialEq, Eq)]
pub enum ReadError {
    /// The connection broke mid-stream.
    Reset,
    /// An event grew past `MAX_EVENT_BYTES`.
    EventTooLarge,
    /// The upstream closed cleanly in the middle of an event.
    Truncated,
}

/// Reads an upstream SSE body in batches of complete events.
pub struct SseReader {
    upstream: ByteStream,
    buf: BytesMut,
    /// Where the scan of `buf` for event ends has got to.
    scan: Scanner,
}

impl SseReader {
    pub fn new(upstream: ByteStream) -> Self {
        Self {
            upstream,
            buf: BytesMut::new(),
            scan: Scanner::default(),
        }
    }

    /// The next run of complete events, or `None` at a clean end of stream.
    /// Cancel-safe: bytes already read stay in the buffer if the future is
    /// dropped (as it is when a timeout fires).
    pub async fn next_batch(&mut self) -> Result<Option<Bytes>, ReadError> {
        loop {
            match self.upstream.next().await {
                Some(Ok(chunk)) if self.buf.is_empty() => {
                    // The common case, a read that ends on an event
                    // boundary: pass the chunk on without copying it, and
                    // without a scan when its last two line ends tell (an
                    // LF after a line end, or CRLF CRLF, ends a blank line:
                    // the scanner would end where it starts).
                    if chunk.ends_with(b"\n\n") || chunk.ends_with(b"\r\n\r\n") {
                        return Ok(Some(chunk));
                    }
                    match self.scan.scan(&chunk) {
                        Some(end) if end == chunk.len() => {
                            self.scan.consumed(end);
                            return Ok(Some(chunk));
                        }
                        Some(end) => {
                            self.scan.consumed(end);
                            self.buf.extend_from_slice(&chunk[end..]);
                            return Ok(Some(chunk.slice(..end)));
                        }
                        None if chunk.len() > MAX_EVENT_BYTES => return Err(ReadError::EventTooLarge),
                        None => self.buf.extend_from_slice(&chunk),
                    }
                }
                Some(Ok(chunk)) => {
                    self.buf.extend_from_slice(&chunk);
                    if let Some(end) = self.scan.scan(&self.buf) {
                        self.scan.consumed(end);
                        return Ok(Some(self.buf.split_to(end).freeze()));
                    }
                    if self.buf.len() > MAX_EVENT_BYTES {
                        return Err(ReadError::EventTooLarge);
                    }
                }
                Some(Err(BodyError)) => return Err(ReadError::Reset),
                None => {
                    // An event whose blank line is a CR at the very end.
                    if let Some(end) = self.scan.finish(&self.buf) {
                        self.scan.consumed(end);
                        return Ok(Some(self.buf.split_to(end).freeze()));
                    }
                    return if self.buf.iter().all(u8::is_ascii_whitespace) {
                        Ok(None)
                    } else {
                        Err(ReadError::Truncated)
                    };
                }
            }
        }
    }
}

/// Finds event ends in a growing buffer that starts on a line start,
/// scanning each byte once: the state between reads is where the scan got
/// to, where the current line began, and an event end held back because
/// its blank line ended in a CR that was the last byte read (an LF after it
/// would belong to it, as CRLF).
#[derive(Debug, Default, Clone, Copy)]
struct Scanner {
    pos: usize,
    line_start: usize,
    /// The byte at `pos - 1` is a CR that ended a line.
    after_cr: bool,
    /// That CR ended a blank line: an event ends at `pos`, or at `pos + 1`
    /// if the next byte is LF.
    held: bool,
}

impl Scanner {
    /// Scans what `buf` holds past the last scan; the end (exclusive) of the
    /// last complete event in `buf`, if any.
    fn scan(&mut self, buf: &[u8]) -> Option<usize> {
        let mut last = None;
        let mut i = self.pos;
        if self.after_cr && i < buf.len() {
            self.after_cr = false;
            if buf[i] == b'\n' {
                i += 1;
                self.line_start = i;
            }
            if std::mem::take(&mut self.held) {
                last = Some(i);
            }
        }
        for p in memchr::memchr2_iter(b'\n', b'\r', &buf[i..]) {
            let p = p + i;
            if p < self.line_start {
                continue; // the LF of a CRLF, taken with its CR
            }
            let blank = p == self.line_start;
            let end = if buf[p] == b'\r' && buf.get(p + 1) == Some(&b'\n') {
                p + 2
            } else {
                p + 1
            };
            self.line_start = end;
            if end == buf.len() && buf[p] == b'\r' && end == p + 1 {
                // A CR last: an LF may follow in the next read.
                self.after_cr = true;
                self.held = blank;
            } else if blank {
                last = Some(end);
            }
        }
        self.pos = buf.len();
        last
    }

    /// At the end of the stream: an event held back for a possible LF ends
    /// here.
    fn finish(&mut self, buf: &[u8]) -> Option<usize> {
        (self.held && self.pos == buf.len()).then(|| {
            self.held = false;
            self.after_cr = false;
            buf.len()
        })
    }

    /// The buffer's first `n` bytes were handed on.
    fn consumed(&mut self, n: usize) {
        self.pos -= n;
        self.line_start -= n;
    }
}

/// The end (exclusive) of the last complete event in `buf`, which starts on
/// a line start. An event whose blank line ends in a CR as the last byte
/// counts as complete here (no more bytes are coming).
pub fn last_event_end(buf: &[u8]) -> Option<usize> {
    let mut scan = Scanner::default();
    scan.scan(buf).max(scan.finish(buf))
}

/// One dispatched event of a batch.
#[derive(Debug, PartialEq, Eq)]
pub struct Event<'a> {
    /// Its bytes in the batch: from its first line to the end of the blank
    /// line that dispatched it (comment lines in it included).
    pub span: Range<usize>,
    /// Its `data` lines' values, joined with LF. Borrowed for the usual
    /// event of one `data` line.
    pub data: Cow<'a, [u8]>,
}

/// The events of a batch that starts on a line start, as the spec parses
/// them: only events with data are dispatched, and a last event without
/// its blank line is not.
pub fn events(batch: &[u8]) -> impl Iterator<Item = Event<'_>> {
    let mut lines = Lines { batch, pos: 0 };
    let mut start = 0;
    std::iter::from_fn(move || {
        let mut data: Option<Cow<'_, [u8]>> = None;
        loop {
            let (line, end) = lines.next()?;
            if line.is_empty() {
                let span = start..end;
                start = end;
                match data.take() {
                    Some(data) => return Some(Event { span, data }),
                    None => continue,
                }
            }
            if line[0] == b':' {
                continue; // a comment
            }
            let (field, value) = match memchr::memchr(b':', line) {
                Some(colon) => {
                    let value = &line[colon + 1..];
                    (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
                }
                None => (line, &b""[..]),
            };
            if field == b"data" {
                data = Some(match data {
                    None => Cow::Borrowed(value),
                    Some(earlier) => {
                        let mut joined = earlier.into_owned();
                        joined.push(b'\n');
                        joined.extend_from_slice(value);
                        Cow::Owned(joined)
                    }
                });
            }
        }
    })
}

/// The lines of a batch, each with the offset just past its terminator
/// (LF, CRLF or CR), found with memchr. A last line without a terminator
/// is not a line yet.
struct Lines<'a> {
    batch: &'a [u8],
    pos: usize,
}

impl<'a> Lines<'a> {
    fn next(&mut self) -> Option<(&'a [u8], usize)> {
        let rest = self.batch.get(self.pos..)?;
        let at = memchr::memchr2(b'\n', b'\r', rest)?;
        let start = self.pos;
        let p = start + at;
        let end = if self.batch[p] == b'\r' && self.batch.get(p + 1) == Some(&b'\n') {
            p + 2
        } else {
            p + 1
        };
        self.pos = end;
        Some((&self.batch[start..p], end))
    }
}

/// What one batch of events says about the stream.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct BatchInfo {
    /// `data: [DONE]` was seen.
    pub done: bool,
    /// The last usage object in the batch.
    pub usage: Option<Usage>,
    /// Bytes of generated text (content, reasoning, tool-call arguments,
    /// completion text), decoded: the completion estimate when usage never
    /// comes (`usage::estimate_completion`).
    pub text_bytes: u64,
}

/// Reads the events of a batch of complete events, with no memory of the
/// stream (`Inspector` for one that remembers).
pub fn inspect(batch: &[u8]) -> BatchInfo {
    Inspector {
        remember: false,
        ..Inspector::default()
    }
    .inspect(batch)
}

/// Reads one stream's batches of complete events. An event is parsed as
/// JSON only when it mentions `"usage"`; the generated text is measured by
/// `usage::scan`, a scan without a parse.
///
/// Events of one `data:` line ended by LF LF, the shape every provider
/// sends, are cut here with one memchr, not `events`' parse line by line
/// (criterion `usage/events`: 19 ns a chat chunk, a quarter of `inspect`);
/// the first other event hands the rest of the batch to `events`. Both
/// read the same (tests/it/sse_props.rs compares them).
///
/// A stream's chunks begin alike and end alike: `{"id":…,"object":…,
/// "created":…,"model":…,"system_fingerprint":…,"choices":[{"index":0,
/// "delta":{` is 190 of a chat chunk's 230 bytes, `},"logprobs":null,
/// "finish_reason":null}]}` 40 more, and neither holds a key that
/// `usage::scan` looks for. The inspector keeps, of the events it scanned:
/// - a prefix, up to a `{` before the first key;
/// - a tail, from where the last key ends.
///
/// The next event is searched only between the prefix, if it begins with
/// it, and the part of the tail it ends with, and finds what a
/// whole scan would. No key lies inside either part, since none did where
/// they were learnt. None runs across the prefix's end, which is `{`, nor
/// across the tail's start, which is moved on to a byte that no key holds.
/// Two comparisons cost less than Teddy's pass over those bytes: criterion
/// `usage/inspect/content_event`, 41.5 ns without the inspector's memory,
/// 37 with it (docs/performance.md, round 10).
#[derive(Debug)]
pub struct Inspector {
    prefix: Vec<u8>,
    tail: Vec<u8>,
    /// Learns from the events it reads (not for a one-off batch: learning
    /// allocates).
    remember: bool,
}

impl Default for Inspector {
    fn default() -> Self {
        Self {
            prefix: Vec::new(),
            tail: Vec::new(),
            remember: true,
        }
    }
}

/// The most an `Inspector` keeps of each: a stream's memory stays small
/// whatever its events.
const MAX_KEPT: usize = 1024;

/// A tail that the next event ends with only in part is cut to that part
/// if the part is at least half of it and this long; else it is learnt
/// again from the event, so that a change of shape is learnt, not
/// whittled down to a tail too short to skip anything.
const MIN_KEPT: usize = 4;

impl Inspector {
    pub fn inspect(&mut self, batch: &[u8]) -> BatchInfo {
        let mut info = BatchInfo::default();
        let mut rest = batch;
        while !rest.is_empty() {
            let Some((data, len, known_start)) = one_line_event(rest, &self.prefix) else {
                for event in events(rest) {
                    let known_start = begins_with(&event.data, &self.prefix);
                    self.add(&mut info, &event.data, known_start);
                }
                break;
            };
            self.add(&mut info, data, known_start);
            rest = &rest[len..];
        }
        info
    }

    /// `inspect`, or `inspect_responses` for a Responses API stream.
    pub fn inspect_for(&mut self, endpoint: Endpoint, batch: &[u8]) -> BatchInfo {
        if endpoint.is_responses() {
            inspect_responses(batch)
        } else {
            self.inspect(batch)
        }
    }

    /// One event's data; `known_start`: it begins with the prefix.
    fn add(&mut self, info: &mut BatchInfo, data: &[u8], known_start: bool) {
        if data == b"[DONE]" {
            info.done = true;
            return;
        }
        let start = if known_start { self.prefix.len() } else { 0 };
        let same_end = common_suffix(data, &self.tail);
        let mut end = data.len() - same_end;
        while end < data.len() && in_a_key(data[end]) {
            end += 1;
        }
        let scan = usage::scan_within(data, start..end);
        info.text_bytes += scan.text_bytes;
        if scan.mentions_usage {
            if let Ok(Some(u)) = usage::from_json(data) {
                info.usage = Some(u);
            }
        }
        if !self.remember {
            return;
        }
        if !known_start {
            // Up to the last `{` before the first key, and never one with
            // a line end (an event of several `data:` lines joined):
            // `one_line_event` looks for the line's end after it.
            let before = scan.first_key.unwrap_or(data.len()).min(MAX_KEPT);
            self.prefix.clear();
            if let Some(brace) = memchr::memrchr(b'{', &data[..before]) {
                if memchr::memchr2(b'\n', b'\r', &data[..brace]).is_none() {
                    self.prefix.extend_from_slice(&data[..=brace]);
                }
            }
        }
        if same_end < self.tail.len() && same_end >= MIN_KEPT && same_end * 2 >= self.tail.len() {
            // What the two end with alike is kept, so that the next event
            // ends with all of it.
            self.tail.drain(..self.tail.len() - same_end);
        } else if same_end < self.tail.len() || self.tail.is_empty() {
            let from = scan.after_keys.max(data.len().saturating_sub(MAX_KEPT));
            self.tail.clear();
            self.tail.extend_from_slice(&data[from..]);
        }
    }
}

/// Whether `data` begins with an inspector's `prefix` (an empty one, none
/// learnt yet, skips nothing).
fn begins_with(data: &[u8], prefix: &[u8]) -> bool {
    !prefix.is_empty() && data.starts_with(prefix)
}

/// Whether a key `usage::scan` looks for can hold byte `b` (a quote, a
/// lowercase letter or `_`; a few bytes more than the keys hold).
fn in_a_key(b: u8) -> bool {
    b == b'"' || b == b'_' || b.is_ascii_lowercase()
}

/// How many bytes `a` and `b` end with alike.
fn common_suffix(a: &[u8], b: &[u8]) -> usize {
    let n = a.len().min(b.len());
    let (a, b) = (&a[a.len() - n..], &b[b.len() - n..]);
    let mut i = n;
    // Eight bytes at a time, then one: a tail is tens of bytes (as words,
    // not slices, which compare by a call to memcmp).
    let word = |s: &[u8], i: usize| u64::from_ne_bytes(s[i - 8..i].try_into().expect("eight bytes"));
    while i >= 8 && word(a, i) == word(b, i) {
        i -= 8;
    }
    while i > 0 && a[i - 1] == b[i - 1] {
        i -= 1;
    }
    n - i
}

/// `data:` (a space, optional) and a value without CR or LF, then LF LF, at
/// the start of `batch`: the event's data, its length, and whether the data
/// begins with `prefix` (which holds no CR or LF, so the line's end is
/// looked for after it). The spec's parse of those bytes dispatches the
/// same data (`events`).
fn one_line_event<'a>(batch: &'a [u8], prefix: &[u8]) -> Option<(&'a [u8], usize, bool)> {
    let line = batch.strip_prefix(b"data:")?;
    let value_at = usize::from(line.first() == Some(&b' '));
    let known_start = begins_with(&line[value_at..], prefix);
    let from = if known_start { value_at + prefix.len() } else { 0 };
    let end = from + memchr::memchr2(b'\n', b'\r', &line[from..])?;
    if line[end] != b'\n' || line.get(end + 1) != Some(&b'\n') {
        return None;
    }
    Some((&line[value_at..end], b"data:".len() + end + 2, known_start))
}

/// `inspect` for a Responses API stream: named events, no `[DONE]`; the
/// stream's clean end is its terminal event (`response.completed`,
/// `response.incomplete`, `response.failed`, or the upstream's `error`).
pub fn inspect_responses(batch: &[u8]) -> BatchInfo {
    let mut info = BatchInfo::default();
    for event in events(batch) {
        let seen = usage::responses_event(&event.data);
        info.done |= seen.terminal;
        info.text_bytes += seen.text_bytes;
        if seen.usage.is_some() {
            info.usage = seen.usage;
        }
    }
    info
}

/// Removes usage-only events (`"choices": []` with a `usage` object: the
/// chunk relaygate asked for on the client's behalf) from a batch of whole
/// events, each as a whole, however many lines it spans. Every other byte
/// is kept; a batch without one is returned as is.
pub fn strip_usage_only(batch: Bytes) -> Bytes {
    if USAGE_KEY.find(&batch).is_none() {
        return batch;
    }
    let mut kept = BytesMut::with_capacity(batch.len());
    let mut start = 0;
    for event in events(&batch) {
        if is_usage_only(&event.data) {
            kept.extend_from_slice(&batch[start..event.span.start]);
            start = event.span.end;
        }
    }
    if start == 0 {
        return batch;
    }
    kept.extend_from_slice(&batch[start..]);
    kept.freeze()
}

fn is_usage_only(data: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Chunk {
        #[serde(default)]
        choices: Option<Vec<serde::de::IgnoredAny>>,
        #[serde(default)]
        usage: Option<serde::de::IgnoredAny>,
    }
    USAGE_KEY.find(data).is_some()
        && serde_json::from_slice::<Chunk>(data)
            .is_ok_and(|c| c.usage.is_some() && c.choices.is_some_and(|v| v.is_empty()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reader(chunks: Vec<Result<&'static [u8], BodyError>>) -> SseReader {
        let items: Vec<Result<Bytes, BodyError>> = chunks.into_iter().map(|c| c.map(Bytes::from_static)).collect();
        SseReader::new(futures_util::stream::iter(items).boxed())
    }

    #[test]
    fn boundaries() {
        assert_eq!(last_event_end(b"data: a\n\ndata: b"), Some(9));
        assert_eq!(last_event_end(b"data: a\n\ndata: b\n\n"), Some(18));
        assert_eq!(last_event_end(b"data: a\r\n\r\n"), Some(11));
        assert_eq!(last_event_end(b"data: a\r\rx"), Some(9));
        // Mixed line ends: a line's end, then a blank line's.
        assert_eq!(last_event_end(b"data: a\r\n\n"), Some(10));
        assert_eq!(last_event_end(b"data: a\n\r\n"), Some(10));
        assert_eq!(
            last_event_end(b"data: a\n\r"),
            Some(9),
            "a CR last ends the stream's last event"
        );
        assert_eq!(last_event_end(b"data: a\n"), None);
        assert_eq!(last_event_end(b""), None);
    }

    /// Event ends by the spec's definition, a byte at a time: after the
    /// terminator (LF, CRLF or CR) of a blank line.
    fn spec_event_ends(s: &[u8]) -> Vec<usize> {
        let (mut ends, mut line_start, mut i) = (Vec::new(), 0, 0);
        while i < s.len() {
            let end = match s[i] {
                b'\r' if s.get(i + 1) == Some(&b'\n') => i + 2,
                b'\r' | b'\n' => i + 1,
                _ => {
                    i += 1;
                    continue;
                }
            };
            if i == line_start {
                ends.push(end);
            }
            line_start = end;
            i = end;
        }
        ends
    }

    /// The scanner finds what the byte-at-a-time definition finds, on every
    /// string of up to seven bytes over the characters that matter, read
    /// whole and read in two pieces split anywhere (a CRLF split included).
    #[test]
    fn event_ends_match_the_spec_on_every_short_string_and_split() {
        let alphabet = [b'a', b'\n', b'\r', b':'];
        let mut checked = 0;
        for len in 0..=7u32 {
            for mut n in 0..4usize.pow(len) {
                let mut s = Vec::with_capacity(len as usize);
                for _ in 0..len {
                    s.push(alphabet[n % 4]);
                    n /= 4;
                }
                let want = spec_event_ends(&s).last().copied();
                assert_eq!(last_event_end(&s), want, "{s:?}");
                for k in 0..=s.len() {
                    let mut scan = Scanner::default();
                    let first = scan.scan(&s[..k]);
                    let second = scan.scan(&s);
                    let got = first.max(second).max(scan.finish(&s));
                    assert_eq!(got, want, "{s:?} split at {k}");
                }
                let mut lines = Lines { batch: &s, pos: 0 };
                let blank_ends: Vec<usize> = std::iter::from_fn(|| lines.next())
                    .filter_map(|(line, end)| line.is_empty().then_some(end))
                    .collect();
                assert_eq!(blank_ends, spec_event_ends(&s), "{s:?}");
                checked += 1;
            }
        }
        assert_eq!(checked, 21_845);
    }

    #[test]
    fn events_follow_the_spec() {
        let data = |batch: &[u8]| -> Vec<Vec<u8>> { events(batch).map(|e| e.data.into_owned()).collect() };
        // Comments, an optional space, `data` without a colon, other fields.
        assert_eq!(
            data(b": hi\nevent: x\nid: 1\nretry: 5\ndata:a\ndata\ndata:  b\n\n"),
            vec![b"a\n\n b".to_vec()]
        );
        // No data, no event; a last event without its blank line: none yet.
        assert_eq!(data(b": keep-alive\n\nevent: ping\n\ndata: x"), Vec::<Vec<u8>>::new());
        // Every line end, mixed.
        assert_eq!(
            data(b"data: 1\rdata: 2\r\n\ndata: 3\r\r"),
            vec![b"1\n2".to_vec(), b"3".to_vec()]
        );
        // One data line is borrowed, not copied.
        let batch = b"data: {\"a\":1}\n\n";
        let event = events(batch).next().unwrap();
        assert!(matches!(event.data, Cow::Borrowed(_)));
        assert_eq!(event.span, 0..batch.len());
    }

    #[tokio::test]
    async fn batches_only_whole_events_across_chunk_splits() {
        let mut r = reader(vec![
            Ok(b"data: {\"a\""),
            Ok(b":1}\n"),
            Ok(b"\ndata: {\"b\":2}\n\nda"),
            Ok(b"ta: [DONE]\n\n"),
        ]);
        assert_eq!(
            r.next_batch().await.unwrap().unwrap(),
            &b"data: {\"a\":1}\n\ndata: {\"b\":2}\n\n"[..]
        );
        assert_eq!(r.next_batch().await.unwrap().unwrap(), &b"data: [DONE]\n\n"[..]);
        assert_eq!(r.next_batch().await.unwrap(), None);
    }

    #[tokio::test]
    async fn whole_event_reads_pass_through_without_a_copy() {
        static WHOLE: &[u8] = b"data: 1\n\ndata: 2\n\n";
        static WITH_TAIL: &[u8] = b"data: 3\n\ndata: 4";
        let mut r = reader(vec![Ok(WHOLE), Ok(WITH_TAIL), Ok(b"\n\n")]);
        let batch = r.next_batch().await.unwrap().unwrap();
        assert_eq!(batch, WHOLE);
        assert_eq!(batch.as_ptr(), WHOLE.as_ptr(), "the chunk itself, not a copy");
        let batch = r.next_batch().await.unwrap().unwrap();
        assert_eq!(batch, &b"data: 3\n\n"[..]);
        assert_eq!(batch.as_ptr(), WITH_TAIL.as_ptr());
        assert_eq!(r.next_batch().await.unwrap().unwrap(), &b"data: 4\n\n"[..]);
        assert_eq!(r.next_batch().await.unwrap(), None);
    }

    #[tokio::test]
    async fn reports_resets_and_truncation() {
        let mut r = reader(vec![Ok(b"data: 1\n\n"), Err(BodyError)]);
        assert!(r.next_batch().await.unwrap().is_some());
        assert_eq!(r.next_batch().await.unwrap_err(), ReadError::Reset);
        let mut r = reader(vec![Ok(b"data: {\"half")]);
        assert_eq!(r.next_batch().await.unwrap_err(), ReadError::Truncated);
    }

    #[tokio::test]
    async fn bounds_a_single_event() {
        let big: &'static [u8] = Box::leak(vec![b'x'; MAX_EVENT_BYTES + 1].into_boxed_slice());
        let mut r = reader(vec![Ok(big)]);
        assert_eq!(r.next_batch().await.unwrap_err(), ReadError::EventTooLarge);
    }

    #[test]
    fn strips_only_the_usage_only_event() {
        let usage = "data: {\"id\":\"x\",\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4}}\n\n";
        let content = "data: {\"choices\":[{\"delta\":{\"content\":\"\\\"usage\\\"\"}}]}\n\n";
        let done = "data: [DONE]\n\n";
        let batch = Bytes::from(format!("{content}{usage}{done}"));
        assert_eq!(strip_usage_only(batch), Bytes::from(format!("{content}{done}")));
        let only = Bytes::from(usage.to_owned());
        assert!(strip_usage_only(only).is_empty());
        // Usage attached to a chunk with choices is the client's data: kept.
        let mixed = Bytes::from_static(b"data: {\"choices\":[{\"index\":0}],\"usage\":{\"prompt_tokens\":1}}\n\n");
        assert_eq!(strip_usage_only(mixed.clone()), mixed);
        let crlf = Bytes::from(format!("{}{}", usage.replace("\n\n", "\r\n\r\n"), done));
        assert_eq!(strip_usage_only(crlf), Bytes::from_static(done.as_bytes()));
    }

    /// A stream's inspector skips what its events share, and finds a key
    /// that runs into the shared end (tests/it/sse_props.rs generates more).
    #[test]
    fn an_inspector_skips_only_bytes_without_keys() {
        let mut inspector = Inspector::default();
        let chunk = |text: &str| {
            format!("data: {{\"id\":\"c1\",\"choices\":[{{\"delta\":{{\"content\":\"{text}\"}},\"x\":null}}]}}\n\n")
        };
        for text in ["ab", "cde", "f"] {
            let e = chunk(text);
            assert_eq!(inspector.inspect(e.as_bytes()), inspect(e.as_bytes()));
        }
        assert_eq!(
            String::from_utf8_lossy(&inspector.prefix),
            r#"{"id":"c1","choices":[{"delta":{"#
        );
        assert_eq!(String::from_utf8_lossy(&inspector.tail), r#""},"x":null}]}"#);
        // The tail learnt, `tent":"fg"}`, begins inside this event's key.
        inspector.inspect(b"data: {\"a\":\"text\"tent\":\"fg\"}\n\n");
        let e = b"data: {\"content\":\"fg\"}\n\n";
        assert_eq!(inspector.inspect(e).text_bytes, 2);
    }

    /// The shape `inspect` cuts itself, and the ones it leaves to `events`
    /// (tests/it/sse_props.rs checks that both read the same).
    #[test]
    fn one_line_events_are_cut_without_the_line_parse() {
        assert_eq!(
            one_line_event(b"data: {\"a\":1}\n\nda", b""),
            Some((&b"{\"a\":1}"[..], 15, false))
        );
        assert_eq!(
            one_line_event(b"data:[DONE]\n\n", b""),
            Some((&b"[DONE]"[..], 13, false))
        );
        assert_eq!(one_line_event(b"data:  x\n\n", b""), Some((&b" x"[..], 10, false)));
        // A known prefix: the line's end is looked for after it.
        assert_eq!(
            one_line_event(b"data: {\"a\":{\"b\":1}}\n\n", b"{\"a\":{"),
            Some((&b"{\"a\":{\"b\":1}}"[..], 21, true))
        );
        assert_eq!(
            one_line_event(b"data:{\"a\"\n\n", b"{\"a\":{"),
            Some((&b"{\"a\""[..], 11, false))
        );
        for other in [
            &b"data: 1\r\n\r\n"[..],
            b"data: 1\r\r",
            b"data: 1\n\r\n",
            b"data: 1\ndata: 2\n\n",
            b"data: 1\nid: 2\n\n",
            b": hi\ndata: 1\n\n",
            b"event: x\ndata: 1\n\n",
            b"data 1\n\n",
            b"data: 1\n",
        ] {
            assert_eq!(one_line_event(other, b""), None, "{:?}", String::from_utf8_lossy(other));
            assert_eq!(
                one_line_event(other, b"1"),
                None,
                "{:?}",
                String::from_utf8_lossy(other)
            );
        }
        // A batch that starts in that shape and goes on in another.
        let info =
            inspect(b"data: {\"content\":\"ab\"}\n\ndata: {\"content\":\r\ndata: \"cd\"}\r\n\r\ndata: [DONE]\n\n");
        assert_eq!((info.text_bytes, info.done), (4, true));
    }

    #[test]
    fn inspect_finds_done_and_usage() {
        let batch = b"data: {\"choices\":[{\"delta\":{\"content\":\"usage\"}}]}\n\n\
data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4}}\n\ndata: [DONE]\n\n";
        let info = inspect(batch);
        assert!(info.done);
        assert_eq!(info.usage.unwrap().completion, 4);
        assert_eq!(info.text_bytes, 5, "the content \"usage\"");
        assert_eq!(inspect(b"data: {\"x\":1}\n\n"), BatchInfo::default());
    }
}
