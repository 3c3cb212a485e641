//! Delivery: from a queue entry to the primary's `250`, or to a bounce.

pub mod client;
pub mod route;
