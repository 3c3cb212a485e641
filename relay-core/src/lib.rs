//! backupmx core: the drivers' shared logic — policy, stores, delivery —
//! around the sans-I/O protocol code of [`relay_proto`].
//!
//! # Layout
//! - [`smtp`], [`address`], [`domain`], [`proxy`], [`time`]: re-exported
//!   from `relay-proto`, which has no runtime, clock or randomness.
//! - [`queue`]: the protocol crate's queue records, and [`queue::new_id`],
//!   which draws the random part of an id.
//! - [`policy`]: relay control (which recipients we accept).
//! - [`delivery`]: the engine that delivers queued mail, with the protocol
//!   crate's client session and DSN builder re-exported as
//!   [`delivery::client`] and [`delivery::dsn`].
//! - [`store`]: storage traits (`DomainRegistry`, `MessageStore`,
//!   `DeliveryQueue`, `Spool`) and their backends (`store::local`).
//! - [`config`]: the typed configuration file.
//!
//! Data flows `ingest → Spool (body + queue entry) → delivery`.

pub use relay_proto::{address, dane, domain, dsn_params, mta_sts, proxy, smtp, time, verify};

pub mod admin;
pub mod alerts;
pub mod auth;
pub mod budget;
pub mod config;
pub mod delivery;
pub mod dns;
pub mod dnsbl;
pub mod doctor;
pub mod error;
pub mod filter;
pub mod greylist;
pub mod harvest;
pub mod history;
pub mod observations;
pub mod outages;
pub mod policy;
pub mod queue;
pub mod recipients;
pub mod setup;
pub mod store;
pub mod sync;
pub mod tlsrpt;
