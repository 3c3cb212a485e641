//! The composition root: the one place that reads [`Config`] and builds
//! the parts both binaries run (the resolver, the AWS store, the delivery
//! engine, the recipient verifier, the alerter). Subsystems own their
//! small settings types and never read the configuration themselves;
//! `config` converts it into them.

use std::sync::Arc;

use crate::alerts::Alerter;
use crate::config::Config;
use crate::delivery::{Engine, EngineConfig};
use crate::dns::{HickoryResolver, Resolver};
use crate::recipients::{RecipientVerifier, VerifySettings};
use crate::store::{DomainRegistry, RecipientCache, Spool, TlsReportStore};

/// Why a part could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SetupError {
    #[error("cannot set up the DNS resolver: {0}")]
    Resolver(#[source] crate::dns::DnsError),
    #[error("[alerts] webhook: {0}")]
    Webhook(String),
    #[cfg(feature = "aws")]
    #[error("cannot reach the AWS backend (is AWS_ENDPOINT_URL or the AWS configuration right?)")]
    Aws(#[source] crate::store::StoreError),
}

/// The resolver `[dns]` asks for (its servers, timeout and trust anchors).
pub fn resolver(config: &Config) -> Result<Arc<dyn Resolver>, SetupError> {
    let r = HickoryResolver::with_trust_anchors(
        &config.dns.servers,
        config.dns.timeout,
        &config.dns.dnssec_trust_anchors,
    )
    .map_err(SetupError::Resolver)?;
    Ok(Arc::new(r))
}

/// The resolver `[dns]` asks for, and sender authentication's checker on
/// the same resolver (one cache), naming us `[hostname]`.
pub fn resolver_and_authenticator(
    config: &Config,
) -> Result<(Arc<dyn Resolver>, Arc<crate::auth::Authenticator>), SetupError> {
    let r = HickoryResolver::with_trust_anchors(
        &config.dns.servers,
        config.dns.timeout,
        &config.dns.dnssec_trust_anchors,
    )
    .map_err(SetupError::Resolver)?;
    let auth = crate::auth::Authenticator::new(r.authenticator(), config.hostname.clone());
    Ok((Arc::new(r), Arc::new(auth)))
}

/// The webhook alerter (started), or `None` without `[alerts] webhook`.
pub fn alerter(config: &Config) -> Result<Option<Arc<Alerter>>, SetupError> {
    Alerter::for_webhook(&config.alerts.webhook).map_err(SetupError::Webhook)
}

/// The delivery engine: routes for delivery, probes, ETRN and callouts.
/// Deliveries teach `cache` what callouts and defer mode read (the
/// recipients the primary took or refused, whether it answers).
pub fn engine(
    config: &Config,
    resolver: Arc<dyn Resolver>,
    registry: Arc<dyn DomainRegistry>,
    cache: Arc<dyn RecipientCache>,
    alerts: Option<Arc<Alerter>>,
    tls_reports: Arc<dyn TlsReportStore>,
) -> Engine {
    Engine::new(EngineConfig::from(config), resolver, registry)
        .with_tls_reports(config.tlsrpt.enabled.then_some(tls_reports))
        .with_learning(
            cache,
            config.recipient_verify.valid_ttl,
            config.recipient_verify.invalid_ttl,
        )
        .with_alerts(alerts)
}

/// The TLS report sender `[tlsrpt]` asks for (`None` when off): counts
/// from `store`, `mailto:` reports queued in `spool`.
pub fn tls_reporter(
    config: &Config,
    resolver: Arc<dyn Resolver>,
    store: Arc<dyn TlsReportStore>,
    spool: Arc<dyn Spool>,
) -> Option<crate::tlsrpt::send::TlsReporter> {
    if !config.tlsrpt.enabled {
        return None;
    }
    let extra_roots = config
        .delivery
        .tls_ca_file
        .as_deref()
        .and_then(|p| crate::delivery::transport::load_ca_file(p).ok())
        .unwrap_or_default();
    let hostname = config.hostname.clone();
    let or = |value: &str, default: String| {
        if value.is_empty() {
            default
        } else {
            value.to_string()
        }
    };
    Some(crate::tlsrpt::send::TlsReporter {
        store,
        resolver,
        spool,
        tls: crate::delivery::transport::verifying_tls(&extra_roots),
        submitter: crate::tlsrpt::Submitter {
            organization: or(&config.tlsrpt.organization, hostname.clone()),
            contact: or(&config.tlsrpt.contact, format!("postmaster@{hostname}")),
            hostname,
        },
        timeout: std::time::Duration::from_secs(30),
    })
}

/// Recipient verification at RCPT time over `engine`'s routes.
pub fn verifier(
    config: &Config,
    cache: Arc<dyn RecipientCache>,
    engine: Arc<Engine>,
) -> RecipientVerifier {
    RecipientVerifier::new(cache, engine, VerifySettings::from(config))
}

/// The AWS store `[aws]` names, connected.
#[cfg(feature = "aws")]
pub async fn aws_store(config: &Config) -> Result<crate::store::aws::AwsStore, SetupError> {
    let conf = crate::store::aws::sdk_config().await;
    crate::store::aws::AwsStore::connect(&conf, crate::store::aws::AwsNames::from(&config.aws))
        .await
        .map_err(SetupError::Aws)
}

/// The outage recorder of a process that delivers or takes mail: its
/// outages, tallies and `outage_report` alerts.
pub fn history_recorder(
    store: Arc<dyn crate::store::HistoryStore>,
    queue: Arc<dyn crate::store::DeliveryQueue>,
    alerter: Option<Arc<crate::alerts::Alerter>>,
) -> Arc<crate::outages::Recorder> {
    Arc::new(crate::outages::Recorder::new(store, queue, alerter))
}

/// The history's sampling and pruning as `[history]` asks.
pub fn history_upkeep(config: &Config) -> crate::outages::Upkeep {
    crate::outages::Upkeep::new(config.history.keep)
}
