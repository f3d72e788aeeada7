//! The memory backend: entries bounded by their total weight (`max_bytes`),
//! least recently used out first, each with its model's TTL.
//!
//! Written here rather than with moka: at 0 % hits every request is a
//! lookup that misses and an insert that evicts, and moka's were 5.8k of
//! the miss path's 10k instructions beyond the key (callgrind,
//! `cache/miss_store/1KiB`): a read and a write record per call, replayed
//! into its deques and timer wheel by the next caller, and several allocations
//! per entry. Here a lookup is one lock and one probe, and an insert into
//! a full cache reuses the slot and map room of the entry it evicts.
//!
//! - Shards: a mutex each, picked by a byte of the key, so that requests on
//!   different threads rarely meet. Each holds `max_bytes / shards`; there
//!   are fewer shards for a small cache, so that one holds an entry of
//!   `max_entry_bytes` four times over.
//! - Order: a doubly linked list through a slab (`nodes`), by index, most
//!   recently read or written first. The tail goes first when a shard is
//!   over its bound.
//! - Expiry: each entry keeps its deadline (its TTL from the store, on the
//!   monotonic clock) and is checked when read: an expired entry is a miss,
//!   and is removed then. Expired entries no one reads are removed when
//!   they reach the tail, when their room is needed, or when the size is
//!   read (`size`, `per_model`: the metrics scrape and the admin view).
//! - Weight: an entry's own (`Entry::weight`: its body, and itself in its
//!   `Arc`) and its place here (`SLOT_OVERHEAD`), so that `max_bytes` bounds
//!   the memory the cache takes, small answers included. An estimate: the
//!   test `max_bytes_bounds_the_memory_taken` measures it.
//! - Keys are SHA-256 digests already, so the map hashes one by taking 8 of
//!   its bytes rather than running SipHash over all 32.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

use super::entry::Entry;
use super::key::Key;

/// What a store hands the backend.
pub struct Stored {
    pub entry: Arc<Entry>,
    pub model: Arc<str>,
    pub ttl: Duration,
}

/// An entry's place in a shard: its node in the slab, and its slot and
/// control byte in the map, which after it doubles is 7/16 full (so twice
/// the slot, rather than the 8/7 of a full map).
const SLOT_OVERHEAD: usize = size_of::<Node>() + 2 * (size_of::<(Key, u32)>() + 1);

/// At most this many shards (a power of two).
const MAX_SHARDS: usize = 16;

/// No node (the list's ends).
const NIL: u32 = u32::MAX;

#[derive(Clone)]
pub struct Memory {
    shards: Arc<[Mutex<Shard>]>,
}

struct Shard {
    map: HashMap<Key, u32, DigestHash>,
    nodes: Vec<Node>,
    /// Nodes whose entry was removed, for the next insert.
    free: Vec<u32>,
    /// Most recently used.
    head: u32,
    /// Least recently used: evicted first.
    tail: u32,
    bytes: u64,
    max_bytes: u64,
}

struct Node {
    key: Key,
    /// `None` while the node is on the free list.
    value: Option<Value>,
    prev: u32,
    next: u32,
}

struct Value {
    entry: Arc<Entry>,
    model: Arc<str>,
    expires: Instant,
    weight: u64,
}

impl Memory {
    /// A cache of at most `max_bytes`, for answers of at most
    /// `max_entry_bytes`.
    pub fn new(max_bytes: u64, max_entry_bytes: usize) -> Self {
        let heaviest = (Entry::weight_of_body(max_entry_bytes) + SLOT_OVERHEAD) as u64;
        let mut n = MAX_SHARDS;
        while n > 1 && max_bytes / n as u64 / 4 < heaviest {
            n /= 2;
        }
        let shards = (0..n)
            .map(|_| {
                Mutex::new(Shard {
                    map: HashMap::with_hasher(DigestHash),
                    nodes: Vec::new(),
                    free: Vec::new(),
                    head: NIL,
                    tail: NIL,
                    bytes: 0,
                    max_bytes: max_bytes / n as u64,
                })
            })
            .collect();
        Self { shards }
    }

    fn shard(&self, key: &Key) -> MutexGuard<'_, Shard> {
        // The map hashes the first 8 bytes (`DigestHash`); the shard is
        // picked by another.
        let i = usize::from(key.0[31]) & (self.shards.len() - 1);
        lock(&self.shards[i])
    }

    /// The entry, if there is one that has not expired.
    pub fn get(&self, key: &Key) -> Option<Arc<Entry>> {
        let mut shard = self.shard(key);
        let i = *shard.map.get(key)?;
        let value = shard.nodes[i as usize].value.as_ref()?;
        // The clock is read for an entry found only: a miss reads none.
        let (expired, entry) = (value.expires <= Instant::now(), value.entry.clone());
        if expired {
            shard.remove(i);
            return None;
        }
        shard.bump(i);
        Some(entry)
    }

    /// Stores an entry, replacing the key's (a refresh: its lifetime starts
    /// again), and evicts the least recently used past the bound. An entry
    /// heavier than a shard's bound (a cache smaller than its largest
    /// answer) is not stored: `false`.
    pub fn insert(&self, key: Key, stored: Stored) -> bool {
        let now = Instant::now();
        let weight = (stored.entry.weight() + SLOT_OVERHEAD) as u64;
        let value = Value {
            entry: stored.entry,
            model: stored.model,
            expires: now + stored.ttl,
            weight,
        };
        let mut shard = self.shard(&key);
        if weight > shard.max_bytes {
            return false;
        }
        // The least recently used entry has had its chance: an expired
        // one goes now rather than waiting for its room to be needed.
        let tail = shard.tail;
        let tail_expired = shard
            .nodes
            .get(tail as usize)
            .and_then(|n| n.value.as_ref())
            .is_some_and(|v| v.expires <= now);
        if tail_expired {
            shard.remove(tail);
        }
        if let Some(&i) = shard.map.get(&key) {
            let old = shard.nodes[i as usize].value.replace(value);
            shard.bytes = shard.bytes - old.map_or(0, |v| v.weight) + weight;
            shard.bump(i);
        } else {
            let i = match shard.free.pop() {
                Some(i) => {
                    shard.nodes[i as usize] = Node {
                        key,
                        value: Some(value),
                        prev: NIL,
                        next: NIL,
                    };
                    i
                }
                None => {
                    let i = u32::try_from(shard.nodes.len()).expect("fewer than 2^32 entries per shard");
                    shard.nodes.push(Node {
                        key,
                        value: Some(value),
                        prev: NIL,
                        next: NIL,
                    });
                    i
                }
            };
            shard.push_front(i);
            shard.map.insert(key, i);
            shard.bytes += weight;
        }
        while shard.bytes > shard.max_bytes && shard.tail != NIL {
            let tail = shard.tail;
            shard.remove(tail);
        }
        true
    }

    /// Removes every entry, or one model's; returns how many there were
    /// (not counting expired ones).
    pub fn purge(&self, model: Option<&str>) -> u64 {
        let now = Instant::now();
        let mut removed = 0;
        for shard in self.shards.iter() {
            let mut shard = lock(shard);
            for i in 0..shard.nodes.len() as u32 {
                let (doomed, live) = match &shard.nodes[i as usize].value {
                    Some(v) => (model.is_none_or(|m| &*v.model == m), v.expires > now),
                    None => continue,
                };
                if doomed {
                    removed += u64::from(live);
                    shard.remove(i);
                }
            }
        }
        removed
    }

    /// (entries, bytes), after removing expired entries.
    pub fn size(&self) -> (u64, u64) {
        let now = Instant::now();
        let (mut entries, mut bytes) = (0, 0);
        for shard in self.shards.iter() {
            let mut shard = lock(shard);
            shard.remove_expired(now);
            entries += shard.map.len() as u64;
            bytes += shard.bytes;
        }
        (entries, bytes)
    }

    /// Entries and bytes per model (admin only: walks every entry).
    pub fn per_model(&self) -> Vec<(Arc<str>, u64, u64)> {
        let now = Instant::now();
        let mut out: Vec<(Arc<str>, u64, u64)> = Vec::new();
        for shard in self.shards.iter() {
            let mut shard = lock(shard);
            shard.remove_expired(now);
            for v in shard.nodes.iter().filter_map(|n| n.value.as_ref()) {
                match out.iter_mut().find(|(m, _, _)| *m == v.model) {
                    Some((_, n, bytes)) => {
                        *n += 1;
                        *bytes += v.weight;
                    }
                    None => out.push((v.model.clone(), 1, v.weight)),
                }
            }
        }
        out
    }
}

/// A shard's lock; a panic while holding one left its list whole (no
/// operation panics halfway), so a poisoned lock is used as it is.
fn lock(shard: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    shard.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shard {
    fn unlink(&mut self, i: u32) {
        let (prev, next) = {
            let n = &self.nodes[i as usize];
            (n.prev, n.next)
        };
        match prev {
            NIL => self.head = next,
            p => self.nodes[p as usize].next = next,
        }
        match next {
            NIL => self.tail = prev,
            n => self.nodes[n as usize].prev = prev,
        }
    }

    fn push_front(&mut self, i: u32) {
        let head = self.head;
        let node = &mut self.nodes[i as usize];
        node.prev = NIL;
        node.next = head;
        match head {
            NIL => self.tail = i,
            h => self.nodes[h as usize].prev = i,
        }
        self.head = i;
    }

    /// Makes node `i` the most recently used.
    fn bump(&mut self, i: u32) {
        if self.head != i {
            self.unlink(i);
            self.push_front(i);
        }
    }

    /// Removes node `i`'s entry (it must hold one) and frees the node.
    fn remove(&mut self, i: u32) {
        self.unlink(i);
        let node = &mut self.nodes[i as usize];
        let value = node.value.take();
        let key = node.key;
        self.bytes -= value.map_or(0, |v| v.weight);
        self.map.remove(&key);
        self.free.push(i);
    }

    fn remove_expired(&mut self, now: Instant) {
        for i in 0..self.nodes.len() as u32 {
            if self.nodes[i as usize].value.as_ref().is_some_and(|v| v.expires <= now) {
                self.remove(i);
            }
        }
    }
}

/// Hashes a `Key` (a SHA-256 digest, uniformly distributed) to 8 of its
/// bytes.
#[derive(Clone, Copy, Default)]
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
        // `Key` derives Hash: one write of its 32 bytes (arrays hash
        // without a length prefix). The first 8 are as random as any.
        let mut word = [0u8; 8];
        let n = bytes.len().min(8);
        word[..n].copy_from_slice(&bytes[..n]);
        self.0 ^= u64::from_le_bytes(word);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    fn stored(model: &str, body_len: usize, ttl: Duration) -> Stored {
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
            ttl,
        }
    }

    const TEN_MINUTES: Duration = Duration::from_secs(600);

    fn key(i: u32) -> Key {
        let mut k = [0u8; 32];
        k[..4].copy_from_slice(&i.to_le_bytes());
        k[31] = i as u8;
        Key(k)
    }

    #[test]
    fn weight_stays_under_max_bytes() {
        let max = 1024 * 1024;
        let memory = Memory::new(max, 15 * 1024);
        assert_eq!(memory.shards.len(), 16);
        for i in 0..10_000 {
            memory.insert(key(i), stored("m", 200 + (i as usize * 37) % 1800, TEN_MINUTES));
        }
        let (entries, bytes) = memory.size();
        assert!(bytes <= max, "{bytes} bytes in a cache of {max}");
        assert!(entries > 100, "it keeps what fits: {entries}");
        assert!(bytes > max / 2, "and fills most of it: {bytes}");
        // The newest entries are the ones kept.
        assert!(memory.get(&key(9_999)).is_some());
        assert!(memory.get(&key(0)).is_none());
    }

    #[test]
    fn the_least_recently_used_goes_first() {
        // One shard (a small cache for its entry size) of 10 entries' room.
        let weight = (stored("m", 100, TEN_MINUTES).entry.weight() + SLOT_OVERHEAD) as u64;
        let memory = Memory::new(10 * weight, 10 * weight as usize);
        assert_eq!(memory.shards.len(), 1);
        for i in 0..10 {
            memory.insert(key(i), stored("m", 100, TEN_MINUTES));
        }
        assert!(memory.get(&key(0)).is_some(), "read: now the most recent");
        memory.insert(key(10), stored("m", 100, TEN_MINUTES));
        assert!(memory.get(&key(1)).is_none(), "the least recent went");
        assert!(memory.get(&key(0)).is_some());
        assert_eq!(memory.size(), (10, 10 * weight));
        // An entry replaced is one entry, of its new weight.
        memory.insert(key(0), stored("m", 50, TEN_MINUTES));
        assert_eq!(memory.size(), (10, 10 * weight - 50));
        // An entry heavier than the cache is not stored, and says so.
        assert!(!memory.insert(key(99), stored("m", 20_000, TEN_MINUTES)));
        assert!(memory.get(&key(99)).is_none());
        assert_eq!(memory.size().0, 10);
    }

    /// A shard holds its largest answer with the overhead counted, even
    /// where the overhead is most of the weight.
    #[test]
    fn a_shard_holds_an_answer_of_max_entry_bytes() {
        for (max_bytes, max_entry_bytes) in [(6_400, 100), (1 << 20, 1 << 14), (1 << 30, 1 << 20), (1_000, 10)] {
            let memory = Memory::new(max_bytes, max_entry_bytes);
            let stored = stored("m", max_entry_bytes, TEN_MINUTES);
            let fits = memory.insert(key(1), stored);
            let room = max_bytes as usize / memory.shards.len();
            assert!(
                fits,
                "{max_entry_bytes} bytes in {} shards of {room}",
                memory.shards.len()
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_expired_entry_is_a_miss() {
        let memory = Memory::new(1 << 20, 1 << 10);
        memory.insert(key(1), stored("m", 10, Duration::from_secs(10)));
        memory.insert(key(2), stored("m", 10, Duration::from_secs(30)));
        tokio::time::advance(Duration::from_secs(9)).await;
        assert!(memory.get(&key(1)).is_some(), "read before its TTL");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(memory.get(&key(1)).is_none(), "expired at its TTL, read or not");
        assert_eq!(memory.size().0, 1, "and removed");
        // A refresh starts the lifetime again.
        memory.insert(key(2), stored("m", 10, Duration::from_secs(30)));
        tokio::time::advance(Duration::from_secs(25)).await;
        assert!(memory.get(&key(2)).is_some());
        // Expired entries no one reads are not counted, and go.
        memory.insert(key(3), stored("m", 10, Duration::from_secs(1)));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(memory.per_model()[0].1, 1);
        assert_eq!(memory.size().0, 1);
        memory.insert(key(4), stored("m", 10, Duration::from_secs(1)));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(memory.purge(None), 1, "only the live entry counts as purged");
    }

    /// `max_bytes` bounds the memory a full cache really takes, for small
    /// answers (where the overhead per entry is most of it) and larger ones.
    /// Each size fills a cache in a process of its own (this test binary,
    /// running only `fill_and_report`), so that no other test's
    /// allocations are counted, and RSS is not lowered by what an earlier
    /// size freed.
    #[test]
    fn max_bytes_bounds_the_memory_taken() {
        const MAX_BYTES: u64 = 32 << 20;
        for body_len in [20, 600, 4000] {
            let out = std::process::Command::new(std::env::current_exe().expect("the test binary"))
                .args([
                    "--exact",
                    "cache::memory::tests::fill_and_report",
                    "--ignored",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env("RELAYGATE_FILL_BODY", body_len.to_string())
                .env("RELAYGATE_FILL_MAX_BYTES", MAX_BYTES.to_string())
                .output()
                .expect("runs");
            let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
            let growth: u64 = text
                .lines()
                .find_map(|l| Some(l.split_once("rss growth: ")?.1))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or_else(|| panic!("no figure from the filling process:\n{text}"));
            // The weight leaves out the allocator's slack: the slab's and
            // the map's old buffers from before they doubled, and chunks
            // split under churn. Measured: 1.26x for 20-byte answers, 1.12x
            // for 600 and 4,000 (64 bytes an entry, as before: 4.6x for 20).
            let bound = MAX_BYTES + MAX_BYTES / 100 * 35;
            assert!(
                growth <= bound,
                "{body_len}-byte answers: a cache of {MAX_BYTES} bytes took {growth} ({:.2}x)",
                growth as f64 / MAX_BYTES as f64
            );
            // And the measure is real: the cache did fill its bound.
            assert!(growth >= MAX_BYTES / 2, "{body_len}-byte answers: only {growth} bytes");
        }
    }

    /// Fills a cache twice over with answers of one size and prints
    /// how much RSS grew; run by `max_bytes_bounds_the_memory_taken`, or
    /// by hand (`-- --ignored`: 20-byte answers in 32 MiB).
    #[test]
    #[ignore = "run by max_bytes_bounds_the_memory_taken, in a process of its own"]
    fn fill_and_report() {
        let env = |name: &str, default: u64| -> u64 {
            std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
        };
        let body_len = env("RELAYGATE_FILL_BODY", 20) as usize;
        let max_bytes = env("RELAYGATE_FILL_MAX_BYTES", 32 << 20);
        let body = vec![b'x'; body_len];
        // The thread's first allocations set up its arena (some MiB): not
        // the cache's.
        drop(Memory::new(1 << 16, 1 << 10));
        let before = rss_bytes();
        let memory = Memory::new(max_bytes, 1 << 20);
        // Twice what would fit if an entry weighed 64 bytes besides its body.
        for i in 0..2 * max_bytes / (body_len as u64 + 64) {
            // Spread over the shards and the map like digests.
            let mut k = [0u8; 32];
            k[..8].copy_from_slice(&i.wrapping_mul(0x9E37_79B9_7F4A_7C15).to_le_bytes());
            k[31] = k[0] ^ k[5];
            let mut entry = stored("m", 0, TEN_MINUTES);
            Arc::get_mut(&mut entry.entry).expect("new").body = Bytes::copy_from_slice(&body);
            memory.insert(Key(k), entry);
        }
        let (entries, bytes) = memory.size();
        assert!(
            entries > 0 && bytes <= max_bytes,
            "{bytes} bytes in a cache of {max_bytes}"
        );
        assert!(bytes > max_bytes / 10 * 9, "it filled: {bytes} of {max_bytes} bytes");
        println!("rss growth: {}", rss_bytes().saturating_sub(before));
    }

    fn rss_bytes() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS");
        kib * 1024
    }

    #[test]
    fn purge_one_model_or_all() {
        // One shard, to see its nodes used again.
        let memory = Memory::new(1 << 20, 1 << 20);
        assert_eq!(memory.shards.len(), 1);
        memory.insert(key(1), stored("a", 10, TEN_MINUTES));
        memory.insert(key(2), stored("b", 10, TEN_MINUTES));
        memory.insert(key(3), stored("b", 10, TEN_MINUTES));
        assert_eq!(memory.purge(Some("a")), 1);
        assert!(memory.get(&key(1)).is_none());
        assert!(memory.get(&key(2)).is_some());
        let mut models = memory.per_model();
        models.sort();
        assert_eq!(models.len(), 1);
        assert_eq!((&*models[0].0, models[0].1), ("b", 2));
        assert_eq!(memory.purge(None), 2);
        assert_eq!(memory.size(), (0, 0));
        // Freed nodes are used again.
        memory.insert(key(4), stored("a", 10, TEN_MINUTES));
        assert!(memory.get(&key(4)).is_some());
        assert_eq!(lock(&memory.shards[0]).nodes.len(), 3);
    }
}
