//! backupmx protocol code: everything that turns bytes into decisions and
//! back, with no sockets, clock, randomness, metrics or configuration files.
//!
//! The crate's dependencies are the rule made a compile-time fact: no tokio,
//! no metrics, no rand, no config types. Time and random seeds come in as
//! arguments; replies, requests for the driver, deadlines and counters go
//! out. The drivers, stores, delivery engine and policy live in `relay-core`.
//!
//! # Layout
//! - [`smtp`]: the server side of RFC 5321 — command grammar, replies, DATA
//!   framing (the SMTP-smuggling defence) and the session.
//! - [`client`]: the client side, for delivery to a primary (RFC 5321,
//!   RFC 2920 PIPELINING, RFC 3207 STARTTLS).
//! - [`address`]: envelope addresses and domain names.
//! - [`domain`]: hosted-domain records.
//! - [`queue`]: queue ids, accepted messages and the versioned queue record.
//! - [`dsn`]: delivery status notifications (RFC 3464).
//! - [`dsn_params`]: what a sender asks of them (RFC 3461).
//! - [`proxy`]: PROXY protocol v1/v2 headers.
//! - [`time`]: RFC 5322 dates and Unix-second helpers.
//! - [`verify`]: recipient verification (callout replies, cache records).

#![warn(missing_docs)]

pub mod address;
pub mod client;
pub mod dane;
pub mod domain;
pub mod dsn;
pub mod dsn_params;
pub mod mta_sts;
pub mod proxy;
pub mod queue;
pub mod smtp;
pub mod time;
pub mod verify;
