//! Single flight: while a cacheable request is in flight upstream,
//! identical requests on this replica wait for its answer instead of
//! sending their own.
//!
//! The first request for a key becomes its leader; later ones subscribe to
//! a `watch` channel kept in the flight's row of the table. A leader that
//! stores an answer sends it and every waiter is served from it. A leader that fails, or is
//! dropped (its client left), sends nothing: dropping its sender wakes the
//! waiters with nothing, and each goes back to the cache and the flight
//! table, where one of them becomes the next leader. So no waiter inherits
//! an error that was not its own.
//!
//! Written here rather than with a crate: the single-flight crates found
//! either share the leader's error with every waiter or cannot hand the
//! lead on.
//!
//! A flight costs its leader two table updates and no allocation: the
//! channel is made by the first waiter, which most flights never have. A
//! channel per flight had cost a miss about 2k instructions (callgrind,
//! `cache/miss_store/1KiB`): its allocation, SipHash of the key twice, and
//! waking the channel's eight `Notify`s with no one waiting.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::watch;

use super::entry::Entry;
use super::key::Key;
use super::memory::DigestHash;

type Slot = Option<Arc<Entry>>;

#[derive(Default, Clone)]
pub struct Flights {
    inner: Arc<Mutex<Table>>,
}

#[derive(Default)]
struct Table {
    next_id: u64,
    flights: HashMap<Key, Flight, DigestHash>,
}

struct Flight {
    id: u64,
    /// Made by the first waiter.
    tx: Option<watch::Sender<Slot>>,
}

pub enum Joined {
    Leader(Leader),
    Waiter(Waiter),
}

/// The request that goes upstream for its key. Completed or dropped, it
/// ends its flight.
pub struct Leader {
    flights: Flights,
    key: Key,
    id: u64,
}

pub struct Waiter(watch::Receiver<Slot>);

impl Flights {
    fn table(&self) -> MutexGuard<'_, Table> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn join(&self, key: Key) -> Joined {
        let mut table = self.table();
        if let Some(flight) = table.flights.get_mut(&key) {
            let rx = match &flight.tx {
                Some(tx) => tx.subscribe(),
                None => {
                    let (tx, rx) = watch::channel(None);
                    flight.tx = Some(tx);
                    rx
                }
            };
            return Joined::Waiter(Waiter(rx));
        }
        table.next_id += 1;
        let id = table.next_id;
        table.flights.insert(key, Flight { id, tx: None });
        Joined::Leader(Leader {
            flights: self.clone(),
            key,
            id,
        })
    }

    /// Flights in progress (for tests and the admin view).
    pub fn len(&self) -> usize {
        self.table().flights.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Leader {
    /// Hands the answer to every waiter, and ends the flight.
    pub fn complete(self, entry: Arc<Entry>) {
        if let Some(tx) = self.end() {
            // `send_replace` stores the value even with no receiver left.
            tx.send_replace(Some(entry));
        }
    }

    /// Removes the flight (if it is still this leader's), and hands back
    /// its channel if a waiter made one. Waiters wake when it drops.
    fn end(&self) -> Option<watch::Sender<Slot>> {
        let mut table = self.flights.table();
        match table.flights.get(&self.key) {
            Some(flight) if flight.id == self.id => table.flights.remove(&self.key).and_then(|f| f.tx),
            _ => None,
        }
    }
}

impl Drop for Leader {
    fn drop(&mut self) {
        // After `complete` the flight is gone and this finds nothing. Else
        // the leader failed: the channel drops with nothing in it, and its
        // waiters look again.
        drop(self.end());
    }
}

impl Waiter {
    /// The leader's answer, or `None` if it ended without one.
    pub async fn answer(mut self) -> Option<Arc<Entry>> {
        loop {
            if let Some(entry) = self.0.borrow_and_update().clone() {
                return Some(entry);
            }
            if self.0.changed().await.is_err() {
                return self.0.borrow().clone();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    fn entry() -> Arc<Entry> {
        Arc::new(Entry {
            stream: false,
            status: 200,
            content_type: None,
            body: Bytes::from_static(b"{}"),
            usage: None,
            stored_at_ms: 0,
        })
    }

    #[tokio::test]
    async fn waiters_get_the_leaders_answer() {
        let flights = Flights::default();
        let Joined::Leader(leader) = flights.join(Key([1; 32])) else {
            panic!("the first request leads")
        };
        let waiters: Vec<_> = (0..5)
            .map(|_| match flights.join(Key([1; 32])) {
                Joined::Waiter(w) => tokio::spawn(w.answer()),
                Joined::Leader(_) => panic!("a second leader for the same key"),
            })
            .collect();
        assert!(
            matches!(flights.join(Key([2; 32])), Joined::Leader(_)),
            "other keys lead their own"
        );
        leader.complete(entry());
        for w in waiters {
            assert_eq!(w.await.unwrap(), Some(entry()));
        }
        assert!(flights.is_empty());
    }

    #[tokio::test]
    async fn a_failed_leader_hands_the_lead_on() {
        let flights = Flights::default();
        let Joined::Leader(leader) = flights.join(Key([1; 32])) else {
            panic!()
        };
        let Joined::Waiter(waiter) = flights.join(Key([1; 32])) else {
            panic!()
        };
        let waiting = tokio::spawn(waiter.answer());
        drop(leader); // failed, or its client left
        assert_eq!(waiting.await.unwrap(), None, "no answer, and no error inherited");
        assert!(
            matches!(flights.join(Key([1; 32])), Joined::Leader(_)),
            "the next request leads"
        );
    }
}
