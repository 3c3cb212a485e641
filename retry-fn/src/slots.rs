//! One process's side of the connection slots a destination shares with
//! every process that delivers to it (`max_connections_per_destination`
//! across a fleet of pollers and Lambda invocations).
//!
//! The shared slots live in the store, one item per slot index; taking one
//! is a conditional write. This module decides, without I/O, which indices
//! a process asks for: never one it holds itself, starting at a random
//! place so that processes asking at once spread over the free ones, one
//! at a time, and only a few per ticket, so that a busy destination costs a bounded
//! number of requests before the ticket goes back to wait. A process also
//! holds a permit per slot before it asks at all: its own tickets beyond
//! the limit wait here, at no cost, instead of asking the store.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use tokio::sync::Semaphore;

use relay_core::address::DomainName;
use relay_core::sync::Mutex;

/// Slot indices one ticket asks for before it goes back to wait.
pub const TAKE_TRIES: usize = 3;

/// A shared slot this process holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldSlot {
    pub index: usize,
    /// The name it is held under in the store.
    pub holder: String,
    /// Its lease's end as last written (Unix seconds).
    pub until: u64,
}

/// This process's part of one destination's slots.
#[derive(Debug)]
pub struct LocalSlots {
    /// One permit per slot: a ticket asks the store only holding one.
    pub permits: Arc<Semaphore>,
    /// The indices this process holds (or is asking for) now.
    held: Mutex<BTreeSet<usize>>,
    /// Held slots no attempt uses now, each with the number of its parking:
    /// the next ticket for the destination takes one without a request (a
    /// drain costs no slot requests per message), and one still idle a
    /// moment later is given back.
    idle: Mutex<Vec<(HeldSlot, u64)>>,
    parkings: std::sync::atomic::AtomicU64,
    limit: usize,
}

impl LocalSlots {
    pub fn new(limit: usize) -> Self {
        let limit = limit.max(1);
        LocalSlots {
            permits: Arc::new(Semaphore::new(limit)),
            held: Mutex::new(BTreeSet::new()),
            idle: Mutex::new(Vec::new()),
            parkings: std::sync::atomic::AtomicU64::new(0),
            limit,
        }
    }

    /// An idle held slot, if any (the most recently parked).
    pub fn take_idle(&self) -> Option<HeldSlot> {
        self.idle.lock().pop().map(|(slot, _)| slot)
    }

    /// Parks a held slot after its attempt; returns the parking's number
    /// for [`reclaim_idle`](Self::reclaim_idle).
    pub fn park(&self, slot: HeldSlot) -> u64 {
        let n = self
            .parkings
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.idle.lock().push((slot, n));
        n
    }

    /// Takes back the slot of parking `n` if it is still idle (to give it
    /// back to the store).
    pub fn reclaim_idle(&self, n: u64) -> Option<HeldSlot> {
        let mut idle = self.idle.lock();
        let at = idle.iter().position(|(_, p)| *p == n)?;
        Some(idle.swap_remove(at).0)
    }

    /// Every idle slot (a Lambda invocation gives them back before it
    /// returns: a frozen instance must not hold them).
    pub fn drain_idle(&self) -> Vec<HeldSlot> {
        self.idle.lock().drain(..).map(|(slot, _)| slot).collect()
    }

    /// The next index to ask for, marked held until
    /// [`release`](Self::release)d: the first from `start` (a random number
    /// from the caller) that this process neither holds nor is asking for,
    /// nor `tried` for this ticket. One at a time, so that a process's
    /// tickets asking at once do not keep each other's candidates.
    pub fn reserve_next(&self, start: usize, tried: &[usize]) -> Option<usize> {
        let mut held = self.held.lock();
        let next = candidates(self.limit, &held, start, self.limit)
            .into_iter()
            .find(|i| !tried.contains(i))?;
        held.insert(next);
        Some(next)
    }

    /// Forgets `indices` (not taken, or given back).
    pub fn release(&self, indices: impl IntoIterator<Item = usize>) {
        let mut held = self.held.lock();
        for i in indices {
            held.remove(&i);
        }
    }
}

/// Up to `tries` indices below `limit` not in `held`, beginning at `start`
/// (mod `limit`) and going round.
pub fn candidates(limit: usize, held: &BTreeSet<usize>, start: usize, tries: usize) -> Vec<usize> {
    let limit = limit.max(1);
    (0..limit)
        .map(|k| (start + k) % limit)
        .filter(|i| !held.contains(i))
        .take(tries)
        .collect()
}

/// Every destination's [`LocalSlots`] in this process.
#[derive(Debug, Default)]
pub struct SlotTable {
    by_domain: Mutex<HashMap<DomainName, Arc<LocalSlots>>>,
}

impl SlotTable {
    /// Every destination with its slots.
    pub fn all(&self) -> Vec<(DomainName, Arc<LocalSlots>)> {
        self.by_domain
            .lock()
            .iter()
            .map(|(d, s)| (d.clone(), s.clone()))
            .collect()
    }

    pub fn for_domain(&self, domain: &DomainName, limit: usize) -> Arc<LocalSlots> {
        self.by_domain
            .lock()
            .entry(domain.clone())
            .or_insert_with(|| Arc::new(LocalSlots::new(limit)))
            .clone()
    }
}

/// A slot's lease (seconds): a crashed holder's slot (a killed poller, a
/// Lambda invocation cut by its timeout) is free again within this.
pub const SLOT_LEASE_SECS: u64 = 30;

/// How often a holder renews its slot's lease while the attempt runs: an
/// attempt shorter than this (nearly all) costs no renewal. An idle slot
/// whose lease ends sooner than this is renewed before it is used again.
pub const SLOT_RENEWAL: std::time::Duration = std::time::Duration::from_secs(10);

/// How long a parked slot waits for the next ticket before it is given
/// back (tickets of a drain follow each other within milliseconds).
pub const IDLE_GIVE_BACK: std::time::Duration = std::time::Duration::from_secs(1);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_go_round_from_the_start_and_skip_held_ones() {
        let held = BTreeSet::from([1, 3]);
        assert_eq!(candidates(5, &held, 3, 3), vec![4, 0, 2]);
        assert_eq!(candidates(5, &held, 0, 10), vec![0, 2, 4]);
        assert_eq!(candidates(4, &BTreeSet::new(), 6, 3), vec![2, 3, 0]);
    }

    #[test]
    fn a_process_holding_every_slot_asks_for_none() {
        let held = BTreeSet::from([0, 1]);
        assert!(candidates(2, &held, 0, 3).is_empty());
        // A zero limit means one slot, not a division by zero.
        assert_eq!(candidates(0, &BTreeSet::new(), 7, 3), vec![0]);
    }

    #[test]
    fn reserved_indices_are_not_offered_twice_until_released() {
        let slots = LocalSlots::new(3);
        assert_eq!(slots.reserve_next(0, &[]), Some(0));
        assert_eq!(slots.reserve_next(0, &[]), Some(1));
        // Tried for this ticket already: skipped.
        assert_eq!(slots.reserve_next(0, &[2]), None);
        assert_eq!(slots.reserve_next(5, &[]), Some(2));
        assert_eq!(slots.reserve_next(0, &[]), None);
        slots.release([1]);
        assert_eq!(slots.reserve_next(2, &[]), Some(1));
    }

    #[test]
    fn parked_slots_are_reused_or_reclaimed_once() {
        let slots = LocalSlots::new(2);
        let slot = |index| HeldSlot {
            index,
            holder: format!("h{index}"),
            until: 100,
        };
        let first = slots.park(slot(0));
        let second = slots.park(slot(1));
        // The most recent first.
        assert_eq!(slots.take_idle(), Some(slot(1)));
        // Taken for an attempt: no longer reclaimable under its parking.
        assert_eq!(slots.reclaim_idle(second), None);
        assert_eq!(slots.reclaim_idle(first), Some(slot(0)));
        assert_eq!(slots.reclaim_idle(first), None);
        slots.park(slot(1));
        assert_eq!(slots.drain_idle(), vec![slot(1)]);
        assert_eq!(slots.take_idle(), None);
    }

    #[test]
    fn a_slot_is_renewed_well_before_its_lease_ends() {
        assert!(SLOT_RENEWAL.as_secs() * 2 < SLOT_LEASE_SECS);
    }
}
