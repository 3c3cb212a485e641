//! What happens when a destination goes down or comes back, for both
//! schedulers (the embedded worker and the AWS retry function): counted,
//! logged, recorded where every process sees it (drains and the
//! bounce-storm guard start from it) and alerted. Each scheduler decides
//! the transition itself (an in-memory set, or a conditional write to the
//! shared queue table) and releases its own queue.

use std::sync::Arc;

use crate::address::DomainName;
use crate::store::DeliveryQueue;

use super::Engine;

/// Reports destination transitions. Cheap to share.
#[derive(Clone)]
pub struct DestinationWatch {
    engine: Arc<Engine>,
    queue: Arc<dyn DeliveryQueue>,
}

impl DestinationWatch {
    pub fn new(engine: Arc<Engine>, queue: Arc<dyn DeliveryQueue>) -> Self {
        DestinationWatch { engine, queue }
    }

    /// `domain` was just found down (no server reachable): its mail waits
    /// for a probe.
    pub async fn went_down(&self, domain: &DomainName, now: u64, error: &str) {
        metrics::counter!("backupmx_destination_down_total").increment(1);
        tracing::warn!(event = "destination_down", domain = %domain, error);
        self.engine.record_primary(domain, false, now).await;
        if let Some(a) = self.engine.alerts() {
            let queued = self.queue.list(Some(domain)).await.map_or(0, |l| l.len());
            a.send(
                "primary_down",
                Some(domain.as_str()),
                serde_json::json!({ "queued": queued }),
            );
        }
    }

    /// `domain` answers again (a probe or a delivery got through); the
    /// caller releases its queue.
    pub async fn came_back(&self, domain: &DomainName, now: u64) {
        tracing::info!(event = "destination_back", domain = %domain);
        // The drain starts now, for every process (bounce-storm guard).
        self.engine.record_primary(domain, true, now).await;
        if let Some(a) = self.engine.alerts() {
            a.send("primary_up", Some(domain.as_str()), serde_json::json!({}));
        }
    }
}
