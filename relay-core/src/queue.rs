//! Queue records live in the protocol crate ([`relay_proto::queue`]); this
//! module adds what needs randomness.

use std::time::SystemTime;

pub use relay_proto::queue::*;

/// A new queue id for a message that arrived at `now`. The random part
/// comes from a thread-local CSPRNG seeded from the OS: no system call per
/// id, and no collision across ingest instances.
pub fn new_id(now: SystemTime) -> QueueId {
    QueueId::new(now, rand::random())
}
