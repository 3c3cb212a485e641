//! backupmx core: everything a backup MX does that a test would want to
//! exercise without sockets.
//!
//! # Layout
//! - [`smtp`]: the server side of RFC 5321 as a sans-I/O state machine —
//!   command grammar, replies, DATA framing (the SMTP-smuggling defence), the
//!   session that turns bytes into replies and requests for its driver.
//! - [`address`]: envelope addresses and domain names.
//! - [`policy`]: relay control (which recipients we accept).
//! - [`domain`]: hosted-domain records.
//! - [`queue`]: queue ids, accepted messages and the versioned queue record.
//! - [`store`]: storage traits (`DomainRegistry`, `MessageStore`,
//!   `DeliveryQueue`, `Spool`) and their backends (`store::local`).
//! - [`config`]: the typed configuration file.
//!
//! Data flows `ingest → Spool (body + queue entry) → delivery`.

pub mod address;
pub mod budget;
pub mod config;
pub mod delivery;
pub mod dns;
pub mod dnsbl;
pub mod domain;
pub mod greylist;
pub mod policy;
pub mod proxy;
pub mod queue;
pub mod smtp;
pub mod store;
pub mod time;
