//! Every end-to-end test, in one test binary: one link instead of one per
//! file, one rspamd and one emulator check per run. Each file is a module
//! named after what it tests (`cargo test -p backupmx-tests --test e2e
//! aws_queue::` runs one of them).

mod abuse;
mod admin;
mod aws;
mod aws_queue;
mod cli;
mod delivery;
mod doctor;
mod durability;
mod filter;
mod filters;
mod history;
mod infra;
mod infra_deploy;
mod interop;
mod limits;
mod proxy;
mod relay;
mod resources;
mod sender_auth;
mod soak;
mod steer;
mod tls;
mod tls_policy;
mod verify;
