//! The storage backends the configuration names, opened behind their
//! traits: the embedded store (one SQLite database and spool) or AWS
//! (DynamoDB, S3, SQS). Servers and operator commands open them here.

use std::sync::Arc;

use anyhow::{bail, Context};
use relay_core::config::{Backend, Config};
use relay_core::store::aws::AwsStore;
use relay_core::store::local::{LocalStore, StoreOptions};
use relay_core::store::{DeliveryQueue, DomainRegistry, MessageStore, SplitSpool, Spool};

use relay_core::greylist::GreylistStore;

/// The storage backends, behind their traits.
pub(crate) struct Backends {
    pub registry: Arc<dyn DomainRegistry>,
    pub greylist: Arc<dyn GreylistStore>,
    pub spool: Arc<dyn Spool>,
    pub queue: Arc<dyn DeliveryQueue>,
    pub messages: Arc<dyn MessageStore>,
    /// The callout cache and the primaries' states.
    pub recipients: Arc<dyn relay_core::store::RecipientCache>,
    /// TLS report counters (RFC 8460).
    pub tls_reports: Arc<dyn relay_core::store::TlsReportStore>,
    /// Each domain's outage history and queue-depth samples.
    pub history: Arc<dyn relay_core::store::HistoryStore>,
    /// Set for the embedded backend (the delivery worker needs it).
    pub local: Option<Arc<LocalStore>>,
}

impl Backends {
    /// The operator's operations on these backends (CLI and admin API).
    pub(crate) fn admin(
        &self,
        alerter: Option<Arc<relay_core::alerts::Alerter>>,
        message_limit: u64,
    ) -> relay_core::admin::Admin {
        relay_core::admin::Admin::new(
            self.registry.clone(),
            self.queue.clone(),
            self.messages.clone(),
            self.recipients.clone(),
            alerter,
        )
        .with_message_limit(message_limit)
        .with_history(self.history.clone())
    }
}

/// Opens the configured backend, creating the local store if needed.
pub(crate) async fn open_backends(config: &Config) -> anyhow::Result<Backends> {
    open_backends_as(config, true).await
}

/// Opens the configured backend; with `create` false a local store that
/// does not exist yet is an error instead of a new empty store (commands
/// that only read or change what is there must not make one in the wrong
/// directory and report it empty).
pub(crate) async fn open_backends_as(config: &Config, create: bool) -> anyhow::Result<Backends> {
    match config.storage.backend {
        Backend::Local => {
            let db = config
                .storage
                .data_dir
                .join(relay_core::store::local::DB_FILE);
            if !create && !db.exists() {
                bail!(
                    "no store in the data directory {} ({} does not exist): run this command with the server's configuration (--config FILE), or start `backupmx run` first",
                    config.storage.data_dir.display(),
                    db.display()
                );
            }
            let store = Arc::new(
                LocalStore::open_with(
                    &config.storage.data_dir,
                    StoreOptions::from(&config.storage),
                )
                .with_context(|| {
                    format!(
                        "cannot open the data directory {}",
                        config.storage.data_dir.display()
                    )
                })?,
            );
            Ok(Backends {
                registry: store.clone(),
                greylist: store.clone(),
                spool: store.clone(),
                queue: store.clone(),
                messages: store.clone(),
                recipients: store.clone(),
                tls_reports: store.clone(),
                history: store.clone(),
                local: Some(store),
            })
        }
        Backend::Aws => {
            let store = Arc::new(connect_aws(config).await?);
            Ok(Backends {
                registry: store.clone(),
                greylist: store.clone(),
                spool: Arc::new(SplitSpool {
                    messages: store.clone(),
                    queue: store.clone(),
                    history: Some(store.clone()),
                }),
                queue: store.clone(),
                recipients: store.clone(),
                tls_reports: store.clone(),
                history: store.clone(),
                messages: store,
                local: None,
            })
        }
    }
}

async fn connect_aws(config: &Config) -> anyhow::Result<AwsStore> {
    Ok(relay_core::setup::aws_store(config).await?)
}

/// The directory big messages are spilled to while they arrive
/// (`DATA_DIR/incoming`, private). What is in it at start was left by a
/// process that died before storing it (the client got no 250): removed.
pub(crate) fn prepare_spool_dir(data_dir: &std::path::Path) -> anyhow::Result<std::path::PathBuf> {
    let dir = data_dir.join("incoming");
    relay_core::store::space::prepare_data_dir(&dir)
        .with_context(|| format!("cannot prepare the spool directory {}", dir.display()))?;
    for entry in std::fs::read_dir(&dir)?.flatten() {
        let _ = std::fs::remove_file(entry.path());
    }
    Ok(dir)
}

/// The webhook alerter, when `[alerts] webhook` is set.
pub(crate) fn alerter(config: &Config) -> anyhow::Result<Option<Arc<relay_core::alerts::Alerter>>> {
    Ok(relay_core::setup::alerter(config)?)
}

/// Debug builds only: `FAULT_INJECTION=spool:N` fails every N-th message
/// before it is stored, to test the 451 path end to end.
pub(crate) fn with_faults(spool: Arc<dyn Spool>) -> Arc<dyn Spool> {
    if !cfg!(debug_assertions) {
        return spool;
    }
    match std::env::var("FAULT_INJECTION")
        .ok()
        .as_deref()
        .and_then(relay_core::store::fault::FaultySpool::parse_spec)
    {
        Some(every) => {
            tracing::warn!(
                event = "fault_injection_active",
                every,
                "every N-th message will fail to store"
            );
            Arc::new(relay_core::store::fault::FaultySpool::new(spool, every))
        }
        None => spool,
    }
}
