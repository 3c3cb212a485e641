//! Queue records live in the protocol crate ([`relay_proto::queue`]); this
//! module adds what needs randomness.

use std::time::{Duration, SystemTime};

pub use relay_proto::queue::*;

/// The longest queue lifetime an operator may set.
pub const MAX_QUEUE_LIFETIME: Duration = Duration::from_secs(60 * 86_400);

/// A new queue id for a message that arrived at `now`. The random part
/// comes from a thread-local CSPRNG seeded from the OS: no system call per
/// id, and no collision across ingest instances.
pub fn new_id(now: SystemTime) -> QueueId {
    QueueId::new(now, rand::random())
}
