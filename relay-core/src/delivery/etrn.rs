//! ETRN (RFC 1985): the primary, back up, asks us to send its queue now.
//!
//! Only the domain's own primaries may do this (its explicit next hops or
//! its better-preference MX hosts), plus networks the operator lists, so a
//! stranger cannot make us hammer a recovering server.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use ipnet::IpNet;

use super::worker::Worker;
use super::Router;
use crate::address::DomainName;
use crate::smtp::Reply;
use crate::store::{DeliveryQueue, DomainRegistry, StoreError};
use crate::time::unix_seconds;

/// What ETRN sets off: the queued mail of a domain made due now.
#[async_trait]
pub trait Release: Send + Sync {
    /// Returns how many entries the domain has queued, or `None` if the
    /// release goes on in the background (the count is not known yet).
    async fn release(&self, domain: &DomainName) -> Result<Option<u64>, StoreError>;
}

/// The embedded worker: forgets the destination is down and wakes up.
#[async_trait]
impl Release for Worker {
    async fn release(&self, domain: &DomainName) -> Result<Option<u64>, StoreError> {
        Worker::release(self, Some(domain)).await.map(Some)
    }
}

/// A shared queue that the delivery tier works from (AWS: the records are
/// made due and given tickets, whichever process delivers them). A domain
/// back from an outage may have thousands: the release runs in the
/// background and the client is answered at once (RFC 1985's 250).
pub struct QueueRelease(pub Arc<dyn DeliveryQueue>);

#[async_trait]
impl Release for QueueRelease {
    async fn release(&self, domain: &DomainName) -> Result<Option<u64>, StoreError> {
        let queue = self.0.clone();
        let domain = domain.clone();
        tokio::spawn(async move {
            match queue
                .release(Some(&domain), unix_seconds(SystemTime::now()))
                .await
            {
                Ok(n) => tracing::info!(event = "etrn_released", domain = %domain, entries = n),
                // Nothing is lost: the mail keeps its schedule.
                Err(e) => {
                    tracing::warn!(event = "release_failed", domain = %domain, error = %crate::error::Report(&e))
                }
            }
        });
        Ok(None)
    }
}

/// Answers one `ETRN node` from `client`.
pub async fn handle(
    node: &str,
    client: IpAddr,
    networks: &[IpNet],
    registry: &dyn DomainRegistry,
    router: &Router,
    release: &dyn Release,
) -> Reply {
    if node.starts_with('#') {
        return Reply::new(
            458,
            "4.3.0",
            format!("Unable to queue messages for node {node}: named queues are not supported"),
        );
    }
    // `@domain` asks for the domain and its subdomains; we host exact
    // domains, so both forms mean the domain itself.
    let name = node.strip_prefix('@').unwrap_or(node);
    let Ok(domain) = DomainName::parse(name) else {
        return Reply::new(501, "5.5.4", "Syntax: ETRN domain");
    };
    match registry.get(&domain).await {
        Ok(Some(d)) if d.enabled => {}
        Ok(_) => {
            return Reply::new(
                458,
                "4.3.0",
                format!("Unable to queue messages for node {domain}: not a hosted domain"),
            )
        }
        Err(_) => {
            return Reply::new(
                458,
                "4.3.0",
                format!("Unable to queue messages for node {domain}: temporary failure"),
            )
        }
    }
    if !authorized(client, networks, router, &domain).await {
        metrics::counter!("backupmx_etrn_total", "result" => "denied").increment(1);
        return Reply::new(
            459,
            "4.7.1",
            format!("Node {domain} not allowed: {client} is not a primary of {domain}"),
        );
    }
    match release.release(&domain).await {
        Ok(None) => {
            metrics::counter!("backupmx_etrn_total", "result" => "started").increment(1);
            tracing::info!(event = "etrn_release", domain = %domain, client = %client);
            Reply::new(250, "2.0.0", format!("Queuing for node {domain} started"))
        }
        Ok(Some(0)) => {
            metrics::counter!("backupmx_etrn_total", "result" => "empty").increment(1);
            Reply::new(
                251,
                "2.0.0",
                format!("OK, no messages waiting for node {domain}"),
            )
        }
        Ok(Some(n)) => {
            metrics::counter!("backupmx_etrn_total", "result" => "started").increment(1);
            tracing::info!(event = "etrn_release", domain = %domain, client = %client, entries = n);
            Reply::new(
                253,
                "2.0.0",
                format!("OK, {n} pending messages for node {domain} started"),
            )
        }
        Err(_) => Reply::new(
            458,
            "4.3.0",
            format!("Unable to queue messages for node {domain}: temporary failure"),
        ),
    }
}

async fn authorized(
    client: IpAddr,
    networks: &[IpNet],
    router: &Router,
    domain: &DomainName,
) -> bool {
    if networks.iter().any(|n| n.contains(&client)) {
        return true;
    }
    match router.targets_for(domain).await {
        Ok(targets) => targets
            .iter()
            .flat_map(|t| t.addrs.iter())
            .any(|a| a.ip() == client),
        Err(_) => false,
    }
}
