//! Does a destination answer again? Connect, greeting, EHLO, QUIT: what
//! both delivery tiers (the embedded worker, the AWS sweeper and retry
//! function) do to release a domain's queue the moment its primary is back,
//! without sending mail to find out.

use std::time::Duration;

use super::handshake::{Greeted, HopError};
use super::route::RouteError;
use super::Engine;
use crate::address::DomainName;

/// How long each step of a probe may take.
const PROBE_WAIT: Duration = Duration::from_secs(10);

/// Why a destination does not answer (from the last address tried).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProbeError {
    #[error("no route: {0}")]
    NoRoute(#[from] RouteError),
    #[error("no address to connect to")]
    NoAddress,
    #[error(transparent)]
    Hop(#[from] HopError),
}

impl Engine {
    /// Connect + greeting + EHLO: does the destination answer again? The
    /// error says why not (for the log), from the last address tried.
    pub async fn probe(&self, domain: &DomainName) -> Result<(), ProbeError> {
        let targets = self.router.targets_for(domain).await?;
        let mut why = ProbeError::NoAddress;
        for target in targets {
            for addr in target.addrs {
                let answered = async {
                    let mut hop = Greeted::connect(addr, b"", PROBE_WAIT).await?;
                    hop.ehlo(&self.cfg.me.hostname).await?;
                    hop.quit().await;
                    Ok::<(), HopError>(())
                };
                match answered.await {
                    Ok(()) => return Ok(()),
                    Err(e) => why = e.into(),
                }
            }
        }
        Err(why)
    }
}
