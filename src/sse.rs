//! SSE pass-through.
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

use std::sync::LazyLock;

use bytes::{Bytes, BytesMut};
use futures_util::stream::BoxStream;
use futures_util::StreamExt;
use memchr::memmem::Finder;

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
}

impl SseReader {
    pub fn new(upstream: ByteStream) -> Self {
        Self {
            upstream,
            buf: BytesMut::new(),
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
                    // boundary: pass the chunk on without copying it.
                    match last_event_end(&chunk, 0) {
                        Some(end) if end == chunk.len() => return Ok(Some(chunk)),
                        Some(end) => {
                            self.buf.extend_from_slice(&chunk[end..]);
                            return Ok(Some(chunk.slice(..end)));
                        }
                        None if chunk.len() > MAX_EVENT_BYTES => return Err(ReadError::EventTooLarge),
                        None => self.buf.extend_from_slice(&chunk),
                    }
                }
                Some(Ok(chunk)) => {
                    let scan_from = self.buf.len().saturating_sub(3);
                    self.buf.extend_from_slice(&chunk);
                    if let Some(end) = last_event_end(&self.buf, scan_from) {
                        return Ok(Some(self.buf.split_to(end).freeze()));
                    }
                    if self.buf.len() > MAX_EVENT_BYTES {
                        return Err(ReadError::EventTooLarge);
                    }
                }
                Some(Err(BodyError)) => return Err(ReadError::Reset),
                None if self.buf.iter().all(u8::is_ascii_whitespace) => return Ok(None),
                None => return Err(ReadError::Truncated),
            }
        }
    }
}

/// The end (exclusive) of the last complete event in `buf`, looking for the
/// blank line at or after `from`. SSE allows LF, CRLF and CR line endings.
pub fn last_event_end(buf: &[u8], from: usize) -> Option<usize> {
    let mut i = buf.len();
    while i >= 2 && i >= from + 2 {
        let w = &buf[..i];
        if w.ends_with(b"\n\n") || w.ends_with(b"\r\r") || w.ends_with(b"\r\n\r\n") {
            return Some(i);
        }
        i -= 1;
    }
    None
}

/// What one batch of events says about the stream.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct BatchInfo {
    /// `data: [DONE]` was seen.
    pub done: bool,
    /// The last usage object in the batch.
    pub usage: Option<Usage>,
    /// Events that carry generated text (`"content":"…"` or `"text":"…"`,
    /// non-empty): the completion-token estimate when usage never comes.
    pub content_events: u64,
}

/// Reads the `data:` lines of a batch of complete events. Only lines that
/// mention `"usage"` are parsed as JSON, so ordinary chunks cost a scan.
pub fn inspect(batch: &[u8]) -> BatchInfo {
    let mut info = BatchInfo::default();
    for line in lines(batch) {
        let Some(data) = line.strip_prefix(b"data:") else {
            continue;
        };
        let data = data.strip_prefix(b" ").unwrap_or(data);
        if data == b"[DONE]" {
            info.done = true;
            continue;
        }
        let has_text = |key: &Finder| {
            key.find(data)
                .is_some_and(|at| data.get(at + key.needle().len()).is_some_and(|&c| c != b'"'))
        };
        if has_text(&CONTENT) || has_text(&TEXT) {
            info.content_events += 1;
        }
        if USAGE_KEY.find(data).is_some() {
            if let Ok(Some(u)) = usage::from_json(data) {
                info.usage = Some(u);
            }
        }
    }
    info
}

// `memchr::memmem::find` builds its searcher on every call, which cost more
// than the searches (about 10,000 instructions per streamed request); these
// are built once (and `"usage"`'s in `usage`).
static CONTENT: LazyLock<Finder> = LazyLock::new(|| Finder::new(b"\"content\":\""));
static TEXT: LazyLock<Finder> = LazyLock::new(|| Finder::new(b"\"text\":\""));

/// The pieces of `batch` between line terminators, as `batch.split(|b| b is
/// CR or LF)` gives them (so a CRLF leaves an empty piece), found with
/// memchr instead of a closure per byte.
fn lines(batch: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut ends = memchr::memchr2_iter(b'\n', b'\r', batch);
    let mut start = Some(0);
    std::iter::from_fn(move || {
        let from = start?;
        let end = ends.next();
        start = end.map(|e| e + 1);
        Some(&batch[from..end.unwrap_or(batch.len())])
    })
}

/// The end offsets of the complete events in `batch`.
fn event_ends(batch: &[u8]) -> impl Iterator<Item = usize> + '_ {
    // Every pattern ends with CR or LF: only those positions are candidates.
    memchr::memchr2_iter(b'\n', b'\r', batch)
        .map(|p| p + 1)
        .filter(move |&i| {
            let w = &batch[..i];
            (w.ends_with(b"\n\n") && !w.ends_with(b"\r\n\n")) || w.ends_with(b"\r\r") || w.ends_with(b"\r\n\r\n")
        })
}

/// Removes usage-only events (`"choices": []` with a `usage` object: the
/// chunk relaygate asked for on the client's behalf) from a batch of whole
/// events. Every other byte is kept; a batch without one is returned as is.
pub fn strip_usage_only(batch: Bytes) -> Bytes {
    if USAGE_KEY.find(&batch).is_none() {
        return batch;
    }
    let mut kept = BytesMut::with_capacity(batch.len());
    let mut start = 0;
    let mut changed = false;
    for end in event_ends(&batch) {
        let event = &batch[start..end];
        if is_usage_only(event) {
            changed = true;
        } else {
            kept.extend_from_slice(event);
        }
        start = end;
    }
    kept.extend_from_slice(&batch[start..]);
    if changed {
        kept.freeze()
    } else {
        batch
    }
}

fn is_usage_only(event: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Chunk {
        #[serde(default)]
        choices: Option<Vec<serde::de::IgnoredAny>>,
        #[serde(default)]
        usage: Option<serde::de::IgnoredAny>,
    }
    lines(event).filter_map(|line| line.strip_prefix(b"data:")).any(|data| {
        let data = data.strip_prefix(b" ").unwrap_or(data);
        USAGE_KEY.find(data).is_some()
            && serde_json::from_slice::<Chunk>(data)
                .is_ok_and(|c| c.usage.is_some() && c.choices.is_some_and(|v| v.is_empty()))
    })
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
        assert_eq!(last_event_end(b"data: a\n\ndata: b", 0), Some(9));
        assert_eq!(last_event_end(b"data: a\n\ndata: b\n\n", 0), Some(18));
        assert_eq!(last_event_end(b"data: a\r\n\r\n", 0), Some(11));
        assert_eq!(last_event_end(b"data: a\r\rx", 0), Some(9));
        assert_eq!(last_event_end(b"data: a\n", 0), None);
        assert_eq!(last_event_end(b"", 0), None);
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

    /// `lines` and `event_ends` find their candidates with memchr; both must
    /// give exactly what the byte-by-byte definitions give, on every string
    /// of up to seven bytes over the characters that matter.
    #[test]
    fn line_and_event_splitting_match_the_byte_by_byte_definitions() {
        let alphabet = [b'a', b'\n', b'\r', b':'];
        let mut checked = 0;
        for len in 0..=7u32 {
            for mut n in 0..4usize.pow(len) {
                let mut s = Vec::with_capacity(len as usize);
                for _ in 0..len {
                    s.push(alphabet[n % 4]);
                    n /= 4;
                }
                let split: Vec<&[u8]> = s.split(|&b| b == b'\n' || b == b'\r').collect();
                assert_eq!(lines(&s).collect::<Vec<_>>(), split, "{s:?}");
                let naive: Vec<usize> = (2..=s.len())
                    .filter(|&i| {
                        let w = &s[..i];
                        (w.ends_with(b"\n\n") && !w.ends_with(b"\r\n\n"))
                            || w.ends_with(b"\r\r")
                            || w.ends_with(b"\r\n\r\n")
                    })
                    .collect();
                assert_eq!(event_ends(&s).collect::<Vec<_>>(), naive, "{s:?}");
                checked += 1;
            }
        }
        assert_eq!(checked, 21_845);
    }

    #[test]
    fn inspect_finds_done_and_usage() {
        let batch = b"data: {\"choices\":[{\"delta\":{\"content\":\"usage\"}}]}\n\n\
data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4}}\n\ndata: [DONE]\n\n";
        let info = inspect(batch);
        assert!(info.done);
        assert_eq!(info.usage.unwrap().completion, 4);
        assert_eq!(inspect(b"data: {\"x\":1}\n\n"), BatchInfo::default());
    }
}
