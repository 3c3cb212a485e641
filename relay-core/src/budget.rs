//! A byte budget shared by tasks that hold message data in memory: the
//! sessions receiving DATA, the deliveries loading queued bodies. Past it,
//! work is refused or waits instead of the process growing until the OOM
//! killer ends it.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug)]
pub struct MemoryBudget {
    limit: u64,
    used: AtomicU64,
}

impl MemoryBudget {
    pub fn new(limit: u64) -> Self {
        MemoryBudget {
            limit,
            used: AtomicU64::new(0),
        }
    }

    /// Takes `bytes` if they fit, or if nothing is taken at all (one
    /// holder may always go over, so a message larger than the budget can
    /// still be handled on its own).
    pub fn try_reserve(&self, bytes: u64) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                let after = used.checked_add(bytes)?;
                (after <= self.limit || used == 0).then_some(after)
            })
            .is_ok()
    }

    /// Gives back what [`MemoryBudget::try_reserve`] took.
    pub fn release(&self, bytes: u64) {
        let _ = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                Some(used.saturating_sub(bytes))
            });
    }

    /// Bytes not taken.
    pub fn available(&self) -> u64 {
        self.limit.saturating_sub(self.used.load(Ordering::Acquire))
    }

    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_stay_within_the_limit_except_a_first_one() {
        let b = MemoryBudget::new(100);
        assert!(b.try_reserve(60));
        assert!(!b.try_reserve(41));
        assert!(b.try_reserve(40));
        assert_eq!(b.available(), 0);
        b.release(100);
        assert!(b.try_reserve(500), "alone, one holder may go over");
        assert!(!b.try_reserve(1));
        b.release(500);
        assert_eq!(b.used(), 0);
    }
}
