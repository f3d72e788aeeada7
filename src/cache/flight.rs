//! Single flight: while a cacheable request is in flight upstream,
//! identical requests on this replica wait for its answer instead of
//! sending their own.
//!
//! The first request for a key becomes its leader; later ones subscribe to
//! a `watch` channel the leader holds. A leader that stores an answer sends
//! it and every waiter is served from it. A leader that fails, or is
//! dropped (its client left), sends nothing: dropping its sender wakes the
//! waiters with nothing, and each goes back to the cache and the flight
//! table, where one of them becomes the next leader. So no waiter inherits
//! an error that was not its own.
//!
//! Written here rather than with a crate: the single-flight crates found
//! either share the leader's error with every waiter or cannot hand the
//! lead on.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use super::entry::Entry;
use super::key::Key;

type Slot = Option<Arc<Entry>>;

#[derive(Default, Clone)]
pub struct Flights {
    inner: Arc<Mutex<Table>>,
}

#[derive(Default)]
struct Table {
    next_id: u64,
    flights: HashMap<Key, (u64, watch::Receiver<Slot>)>,
}

pub enum Joined {
    Leader(Leader),
    Waiter(Waiter),
}

/// The request that goes upstream for its key.
pub struct Leader {
    flights: Flights,
    key: Key,
    id: u64,
    tx: watch::Sender<Slot>,
}

pub struct Waiter(watch::Receiver<Slot>);

impl Flights {
    pub fn join(&self, key: Key) -> Joined {
        let mut table = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, rx)) = table.flights.get(&key) {
            // A flight whose leader has gone but whose entry is still here
            // (its `Drop` is about to remove it) is as good as none.
            if rx.has_changed().is_ok() {
                return Joined::Waiter(Waiter(rx.clone()));
            }
        }
        table.next_id += 1;
        let id = table.next_id;
        let (tx, rx) = watch::channel(None);
        table.flights.insert(key, (id, rx));
        Joined::Leader(Leader {
            flights: self.clone(),
            key,
            id,
            tx,
        })
    }

    /// Flights in progress (for tests and the admin view).
    pub fn len(&self) -> usize {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).flights.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Leader {
    /// Hands the answer to every waiter, and ends the flight.
    pub fn complete(self, entry: Arc<Entry>) {
        // `send_replace` stores the value even with no receiver left.
        self.tx.send_replace(Some(entry));
    }
}

impl Drop for Leader {
    fn drop(&mut self) {
        let mut table = self.flights.inner.lock().unwrap_or_else(|e| e.into_inner());
        if table.flights.get(&self.key).is_some_and(|(id, _)| *id == self.id) {
            table.flights.remove(&self.key);
        }
        // The sender drops after this: waiters wake.
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
