//! A stored answer, and its bytes in Redis.

use std::borrow::Cow;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};

use crate::usage::Usage;

/// One complete, successful answer, as the upstream sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub stream: bool,
    pub status: u16,
    pub content_type: Option<Cow<'static, str>>,
    /// The plain answer's body, or the stream's SSE bytes with its usage
    /// chunk (stripped on replay unless the client asked for usage).
    pub body: Bytes,
    /// The usage the answer carried: what a hit saves.
    pub usage: Option<Usage>,
    /// When it was stored, in milliseconds since the Unix epoch: wall time,
    /// because replicas sharing Redis compute `Age` from it.
    pub stored_at_ms: u64,
}

/// What an allocation costs beyond the bytes asked for: glibc's 8-byte
/// chunk header, and its rounding to 16 bytes (8 on average).
const ALLOCATION_OVERHEAD: usize = 16;

/// An entry's own allocation (`Arc`'s two counts and the `Entry`) and the
/// overhead of that allocation and of its body's.
const ENTRY_OVERHEAD: usize = 2 * size_of::<usize>() + size_of::<Entry>() + 2 * ALLOCATION_OVERHEAD;

/// The format's first bytes; a change to the layout changes it (and
/// `key::FORMAT_VERSION`).
const MAGIC: &[u8; 4] = b"RGC1";

impl Entry {
    pub fn now_ms() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    }

    /// How long ago it was stored (zero if the clocks disagree).
    pub fn age(&self) -> Duration {
        Duration::from_millis(Self::now_ms().saturating_sub(self.stored_at_ms))
    }

    /// The memory it takes, counted against the memory backend's
    /// `max_bytes`: its body, a content type of its own, and itself in its
    /// `Arc`, with the allocator's header and rounding for each allocation.
    pub fn weight(&self) -> usize {
        let content_type = match &self.content_type {
            Some(Cow::Owned(c)) => c.len() + ALLOCATION_OVERHEAD,
            _ => 0,
        };
        Self::weight_of_body(self.body.len()) + content_type
    }

    /// The weight of an entry with a body of `len` bytes and a common
    /// content type (one not copied into it).
    pub const fn weight_of_body(len: usize) -> usize {
        len + ENTRY_OVERHEAD
    }

    pub fn encode(&self) -> Bytes {
        let ct = self.content_type.as_deref().unwrap_or("").as_bytes();
        let ct = &ct[..ct.len().min(u16::MAX as usize)];
        let mut out = BytesMut::with_capacity(self.body.len() + ct.len() + 56);
        out.put_slice(MAGIC);
        out.put_u8(u8::from(self.stream) | (u8::from(self.usage.is_some()) << 1));
        out.put_u16_le(self.status);
        out.put_u64_le(self.stored_at_ms);
        if let Some(u) = &self.usage {
            for n in [u.prompt, u.completion, u.cached_prompt, u.reasoning] {
                out.put_u64_le(n);
            }
        }
        out.put_u16_le(ct.len() as u16);
        out.put_slice(ct);
        out.put_slice(&self.body);
        out.freeze()
    }

    /// `None` for bytes this build did not write (another format, or corrupt).
    pub fn decode(bytes: Bytes) -> Option<Entry> {
        let mut r = Reader { bytes, pos: 0 };
        if r.take(4)? != &MAGIC[..] {
            return None;
        }
        let flags = r.take(1)?[0];
        let status = u16::from_le_bytes(r.take(2)?.try_into().ok()?);
        let stored_at_ms = r.u64()?;
        let usage = if flags & 2 != 0 {
            Some(Usage {
                prompt: r.u64()?,
                completion: r.u64()?,
                cached_prompt: r.u64()?,
                reasoning: r.u64()?,
            })
        } else {
            None
        };
        let ct_len = u16::from_le_bytes(r.take(2)?.try_into().ok()?) as usize;
        let ct = std::str::from_utf8(r.take(ct_len)?).ok()?;
        let content_type = (!ct.is_empty()).then(|| Cow::Owned(ct.to_owned()));
        Some(Entry {
            stream: flags & 1 != 0,
            status,
            content_type,
            body: r.bytes.slice(r.pos..),
            usage,
            stored_at_ms,
        })
    }
}

struct Reader {
    bytes: Bytes,
    pos: usize,
}

impl Reader {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        let end = self.pos.checked_add(n)?;
        let out = self.bytes.get(self.pos..end)?;
        self.pos = end;
        Some(out)
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let with_usage = Entry {
            stream: true,
            status: 200,
            content_type: Some("text/event-stream".into()),
            body: Bytes::from_static(b"data: {}\n\ndata: [DONE]\n\n"),
            usage: Some(Usage {
                prompt: 11,
                completion: 22,
                cached_prompt: 3,
                reasoning: 4,
            }),
            stored_at_ms: 1_700_000_000_123,
        };
        let without = Entry {
            stream: false,
            content_type: None,
            usage: None,
            body: Bytes::new(),
            ..with_usage.clone()
        };
        for e in [with_usage, without] {
            assert_eq!(Entry::decode(e.encode()), Some(e));
        }
    }

    #[test]
    fn foreign_or_cut_bytes_are_refused() {
        let e = Entry {
            stream: false,
            status: 200,
            content_type: Some("application/json".into()),
            body: Bytes::from_static(b"{}"),
            usage: Some(Usage::default()),
            stored_at_ms: 1,
        };
        let bytes = e.encode();
        assert_eq!(Entry::decode(Bytes::from_static(b"RGC0xxxxxxxxxxxxxxxx")), None);
        // Cut anywhere inside the header: refused, never a panic.
        for n in 0..(bytes.len() - e.body.len()) {
            assert_eq!(Entry::decode(bytes.slice(..n)), None, "cut at {n}");
        }
    }
}
