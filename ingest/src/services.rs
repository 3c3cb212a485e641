//! The services a server runs beside its listeners: the session policy
//! (DNSBL, relay control, greylisting, recipient verification), the
//! embedded delivery worker, and the background upkeep of both.

use std::sync::Arc;
use std::time::Duration;

use relay_core::config::Config;
use relay_core::delivery::worker::{Worker, WorkerConfig};
use relay_core::delivery::Engine;
use relay_core::dns::Resolver;
use relay_core::dnsbl::Dnsbl;
use relay_core::greylist::Greylist;
use relay_core::policy::Policy;
use relay_core::store::local::LocalStore;

use crate::backends::Backends;
use crate::connection::Delivery;

/// How often the embedded server looks at the age of its oldest message.
pub(crate) const QUEUE_AGE_CHECK: Duration = Duration::from_secs(60);

/// DNSBL, relay control and greylisting, as configured.
pub(crate) fn build_policy(
    config: &Config,
    backends: &Backends,
    resolver: Option<Arc<dyn Resolver>>,
    verifier: Option<Arc<relay_core::recipients::RecipientVerifier>>,
    harvest: Arc<relay_core::harvest::HarvestGuard>,
) -> Policy {
    let dnsbl = resolver
        .filter(|_| !config.dnsbl.zones.is_empty() || !config.dnsbl.allow_zones.is_empty())
        .map(|r| {
            Arc::new(Dnsbl::new(
                config.dnsbl.zones.iter().map(|z| z.to_zone()).collect(),
                config
                    .dnsbl
                    .allow_zones
                    .iter()
                    .map(|z| z.to_zone())
                    .collect(),
                config.dnsbl.threshold,
                r,
                config.dnsbl.min_cache_ttl,
            ))
        });
    let greylist = config.greylist.enabled.then(|| Greylist {
        settings: (&config.greylist).into(),
        store: backends.greylist.clone(),
    });
    Policy {
        registry: backends.registry.clone(),
        greylist,
        dnsbl,
        verifier,
        harvest,
    }
}

/// DNSBL self-tests and greylist expiry, in the background.
pub(crate) fn spawn_maintenance(config: &Config, backends: &Backends, policy: &Arc<Policy>) {
    if let Some(dnsbl) = policy.dnsbl.clone() {
        let every = config.dnsbl.self_test_interval;
        tokio::spawn(async move {
            loop {
                dnsbl.self_test().await;
                tokio::time::sleep(every).await;
            }
        });
    }
    if config.greylist.enabled {
        let store = backends.greylist.clone();
        tokio::spawn(async move {
            loop {
                let now = relay_core::time::unix_seconds(std::time::SystemTime::now());
                if let Err(e) = store.sweep(now).await {
                    tracing::warn!(event = "greylist_sweep_failed", error = %relay_core::error::Report(&e));
                }
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
        });
    }
}

/// The delivery engine and worker of the embedded mode.
pub(crate) fn start_delivery(
    config: &Config,
    store: &Arc<LocalStore>,
    engine: Arc<Engine>,
) -> anyhow::Result<(Delivery, Arc<Worker>)> {
    let worker = Worker::new(
        engine.clone(),
        store.clone(),
        store.clone(),
        store.clone(),
        WorkerConfig::from(config),
    );
    Ok((
        Delivery {
            engine,
            worker: worker.clone(),
        },
        worker,
    ))
}

/// The embedded server's queue-depth samples (every minute) and the
/// pruning of its outage history (hourly).
pub(crate) fn spawn_history_upkeep(config: &Config, backends: &Backends) {
    let store = backends.history.clone();
    let registry = backends.registry.clone();
    let upkeep = relay_core::setup::history_upkeep(config);
    let every = config.history.sample_interval;
    tokio::spawn(async move {
        let mut last_prune: Option<std::time::Instant> = None;
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            let now = relay_core::time::unix_seconds(std::time::SystemTime::now());
            if let Err(e) = upkeep.sample(store.as_ref(), registry.as_ref(), now).await {
                tracing::warn!(event = "queue_sample_failed", error = %relay_core::error::Report(&e));
            }
            if last_prune.is_none_or(|t| t.elapsed() >= Duration::from_secs(3600)) {
                last_prune = Some(std::time::Instant::now());
                if let Err(e) = upkeep.prune(store.as_ref(), now).await {
                    tracing::warn!(event = "history_prune_failed", error = %relay_core::error::Report(&e));
                }
            }
        }
    });
}
