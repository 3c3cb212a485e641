//! Fault injection for tests of the failure paths: a [`Spool`] wrapper
//! that fails every N-th message before anything is written, as a full
//! disk or an unreachable backend would.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;

use super::{Spool, StoreError};
use crate::queue::{AcceptedMessage, QueueId};

pub struct FaultySpool {
    inner: Arc<dyn Spool>,
    every: u64,
    count: AtomicU64,
}

impl FaultySpool {
    /// Fails accepts number `every`, `2 * every`, … (counting from 1).
    pub fn new(inner: Arc<dyn Spool>, every: u64) -> Self {
        FaultySpool {
            inner,
            every: every.max(1),
            count: AtomicU64::new(0),
        }
    }

    /// Parses `spool:N` (the `FAULT_INJECTION` variable of debug builds).
    pub fn parse_spec(spec: &str) -> Option<u64> {
        spec.strip_prefix("spool:")?.parse().ok().filter(|&n| n > 0)
    }
}

#[async_trait]
impl Spool for FaultySpool {
    async fn accept(&self, message: AcceptedMessage) -> Result<Vec<QueueId>, StoreError> {
        let n = self.count.fetch_add(1, Ordering::SeqCst) + 1;
        if n.is_multiple_of(self.every) {
            return Err(StoreError::io(
                "accept",
                std::io::Error::other(format!("injected fault (message {n})")),
            ));
        }
        self.inner.accept(message).await
    }
}
