//! The memory backend: moka's concurrent cache, bounded by the total weight
//! of its entries (`max_bytes`), each entry with its model's TTL.
//!
//! LRU, not moka's default TinyLFU: TinyLFU may refuse a new entry when the
//! cache is full (its estimated frequency is lower than the victim's), so
//! an answer counted `stored` would miss at once; and the frequency sketch
//! it keeps cost a miss more than the lookup itself (perf, 0 % hits). Keys
//! are SHA-256 digests already, so the map hashes them by taking 8 of their
//! bytes rather than running SipHash over all 32.

use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::policy::EvictionPolicy;
use moka::sync::Cache;
use moka::Expiry;

use super::entry::Entry;
use super::key::Key;

#[derive(Clone)]
pub struct Stored {
    pub entry: Arc<Entry>,
    pub model: Arc<str>,
    pub ttl: Duration,
}

struct PerEntryTtl;

impl Expiry<Key, Stored> for PerEntryTtl {
    fn expire_after_create(&self, _: &Key, value: &Stored, _: Instant) -> Option<Duration> {
        Some(value.ttl)
    }

    /// A refresh (`no-cache`) replaces an entry: its lifetime starts again.
    fn expire_after_update(&self, _: &Key, value: &Stored, _: Instant, _: Option<Duration>) -> Option<Duration> {
        Some(value.ttl)
    }
}

#[derive(Clone)]
pub struct Memory {
    cache: Cache<Key, Stored, DigestHash>,
}

/// Hashes a `Key` (a SHA-256 digest, uniformly distributed) to 8 of its
/// bytes.
#[derive(Clone, Default)]
pub struct DigestHash;

impl std::hash::BuildHasher for DigestHash {
    type Hasher = DigestHasher;
    fn build_hasher(&self) -> DigestHasher {
        DigestHasher(0)
    }
}

pub struct DigestHasher(u64);

impl std::hash::Hasher for DigestHasher {
    fn write(&mut self, bytes: &[u8]) {
        // `Key` derives Hash: one write of its 32 bytes (after nothing else;
        // arrays hash without a length prefix).
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 ^= u64::from_le_bytes(word);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

impl Memory {
    pub fn new(max_bytes: u64) -> Self {
        let cache = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|_: &Key, v: &Stored| u32::try_from(v.entry.weight()).unwrap_or(u32::MAX))
            .expire_after(PerEntryTtl)
            .eviction_policy(EvictionPolicy::lru())
            .support_invalidation_closures()
            .build_with_hasher(DigestHash);
        Self { cache }
    }

    pub fn get(&self, key: &Key) -> Option<Arc<Entry>> {
        self.cache.get(key).map(|s| s.entry)
    }

    pub fn insert(&self, key: Key, value: Stored) {
        self.cache.insert(key, value);
    }

    /// Removes every entry, or one model's; returns how many there were.
    pub fn purge(&self, model: Option<&str>) -> u64 {
        let doomed = self
            .cache
            .iter()
            .filter(|(_, v)| model.is_none_or(|m| &*v.model == m))
            .count() as u64;
        match model {
            None => self.cache.invalidate_all(),
            Some(model) => {
                let model: Arc<str> = Arc::from(model);
                // Only fails without `support_invalidation_closures`, set above.
                let _ = self.cache.invalidate_entries_if(move |_, v| v.model == model);
            }
        }
        self.cache.run_pending_tasks();
        doomed
    }

    /// (entries, bytes), after applying pending evictions.
    pub fn size(&self) -> (u64, u64) {
        self.cache.run_pending_tasks();
        (self.cache.entry_count(), self.cache.weighted_size())
    }

    /// Entries and bytes per model (admin only: walks every entry).
    pub fn per_model(&self) -> Vec<(Arc<str>, u64, u64)> {
        let mut out: Vec<(Arc<str>, u64, u64)> = Vec::new();
        for (_, v) in self.cache.iter() {
            let weight = v.entry.weight() as u64;
            match out.iter_mut().find(|(m, _, _)| *m == v.model) {
                Some((_, n, bytes)) => {
                    *n += 1;
                    *bytes += weight;
                }
                None => out.push((v.model.clone(), 1, weight)),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    fn stored(model: &str, body_len: usize) -> Stored {
        Stored {
            entry: Arc::new(Entry {
                stream: false,
                status: 200,
                content_type: None,
                body: Bytes::from(vec![b'x'; body_len]),
                usage: None,
                stored_at_ms: 0,
            }),
            model: Arc::from(model),
            ttl: Duration::from_secs(600),
        }
    }

    fn key(i: u32) -> Key {
        let mut k = [0u8; 32];
        k[..4].copy_from_slice(&i.to_le_bytes());
        Key(k)
    }

    #[test]
    fn weight_stays_under_max_bytes() {
        let max = 1024 * 1024;
        let memory = Memory::new(max);
        for i in 0..10_000 {
            memory.insert(key(i), stored("m", 200 + (i as usize * 37) % 1800));
        }
        let (entries, bytes) = memory.size();
        assert!(bytes <= max, "{bytes} bytes in a cache of {max}");
        assert!(entries > 100, "it keeps what fits: {entries}");
        assert!(bytes > max / 2, "and fills most of it: {bytes}");
    }

    #[test]
    fn purge_one_model_or_all() {
        let memory = Memory::new(1 << 20);
        memory.insert(key(1), stored("a", 10));
        memory.insert(key(2), stored("b", 10));
        assert_eq!(memory.purge(Some("a")), 1);
        assert!(memory.get(&key(1)).is_none());
        assert!(memory.get(&key(2)).is_some());
        memory.purge(None);
        assert_eq!(memory.size().0, 0);
    }
}
