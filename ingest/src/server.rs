//! `backupmx run` and `backupmx ingest`: build the parts from the
//! configuration, serve SMTP (and the admin and metrics listeners), wait
//! for the signal to stop, and drain.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use relay_core::config::{Backend, Config};
use relay_core::delivery::worker::Worker;
use relay_core::delivery::Engine;
use relay_core::dns::Resolver;
use relay_core::smtp::SessionConfig;
use tokio::sync::{watch, Semaphore};

use crate::backends::{open_backends, prepare_spool_dir, with_faults, Backends};
use crate::connection::{Delivery, Etrn, Resources, Shared};
use crate::listener::{accept_loop, listen, Limits, PerIp, ProxyPolicy};
use crate::services::{build_policy, spawn_maintenance, start_delivery, QUEUE_AGE_CHECK};
use crate::shutdown::wait_for_shutdown;
use crate::tls::Tls;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// `backupmx run`: everything in one process on the local store.
    Embedded,
    /// `backupmx ingest`: SMTP only, on the configured backend.
    IngestOnly,
}

pub(crate) async fn run(config: Config, mode: Mode) -> anyhow::Result<()> {
    if mode == Mode::Embedded && config.storage.backend != Backend::Local {
        bail!("`backupmx run` is the embedded mode and needs storage.backend = \"local\"; use `backupmx ingest` for other backends");
    }
    // Build: files named by the config are checked before anything is
    // logged or opened, so a wrong path is the one line an operator sees.
    let tls = load_tls(&config).await?;
    // One server per data directory (its queue, its spool), for as long
    // as this one runs.
    relay_core::store::space::prepare_data_dir(&config.storage.data_dir).with_context(|| {
        format!(
            "cannot prepare the data directory {}",
            config.storage.data_dir.display()
        )
    })?;
    let _lock = relay_core::store::space::DataDirLock::take(&config.storage.data_dir)?;
    let max_connections = crate::limits::raise_open_files(&config);
    let backends = open_backends(&config).await?;
    if let Some(store) = &backends.local {
        // The runtime's threads commit what their sessions wait for
        // (main.rs installs the hook).
        store.commit_on_runtime_threads();
    }
    store_configured_domains(&config, &backends).await?;
    let metrics_handle = start_metrics(&config, &backends).await?;
    let needs_dns = mode == Mode::Embedded
        || config.storage.backend == Backend::Aws
        || !config.dnsbl.zones.is_empty()
        || !config.dnsbl.allow_zones.is_empty();
    // Sender authentication needs DNS in every shape (per domain, `auth`).
    let (dns, authenticator) = relay_core::setup::resolver_and_authenticator(&config)?;
    let resolver = needs_dns.then_some(dns);
    let alerter = relay_core::setup::alerter(&config)?;
    if let Some(a) = &config.admin {
        let web = crate::web::Web {
            admin: backends.admin(alerter.clone(), config.smtp.max_message_size),
            token: a.token().map(str::to_string),
            hostname: config.hostname.clone(),
            metrics: metrics_handle.clone(),
            sessions: Default::default(),
            brake: Default::default(),
        };
        crate::web::serve(a.listen, Arc::new(web)).await?;
    }
    let history = relay_core::setup::history_recorder(
        backends.history.clone(),
        backends.queue.clone(),
        alerter.clone(),
    );
    if mode == Mode::Embedded {
        // The AWS shape samples and prunes from the sweeper.
        crate::services::spawn_history_upkeep(&config, &backends);
    }
    // Every process that can compute a route to a primary has an engine.
    let engine: Option<Arc<Engine>> = resolver
        .clone()
        .filter(|_| mode == Mode::Embedded || config.storage.backend == Backend::Aws)
        .map(|r| {
            Arc::new(
                relay_core::setup::engine(
                    &config,
                    r,
                    backends.registry.clone(),
                    backends.recipients.clone(),
                    alerter.clone(),
                    backends.tls_reports.clone(),
                )
                .with_history(Some(history.clone())),
            )
        });
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (delivery, etrn, worker) = start_delivery_tier(&config, mode, &backends, engine.clone())?;
    let worker_task = worker.map(|w| tokio::spawn(w.run(shutdown_rx.clone())));
    if let (Mode::Embedded, Some(resolver)) = (mode, resolver.clone()) {
        // The AWS shape sends them from the sweeper.
        if let Some(reporter) = relay_core::setup::tls_reporter(
            &config,
            resolver,
            backends.tls_reports.clone(),
            backends.spool.clone(),
        ) {
            tokio::spawn(send_tls_reports(reporter, config.tlsrpt.interval));
        }
    }
    let shared = Arc::new(Shared {
        auth: Some(authenticator),
        history: Some(history),
        ..shared_state(
            &config,
            &backends,
            resolver,
            engine,
            tls.clone(),
            delivery,
            etrn,
        )?
    });
    // Serve.
    let limits = Arc::new(Limits {
        proxy: config.smtp.proxy_protocol.then(|| ProxyPolicy {
            trusted: config.smtp.trusted_proxies.clone(),
            timeout: config.smtp.proxy_header_timeout,
        }),
        total: Arc::new(Semaphore::new(max_connections)),
        max_total: max_connections,
        per_ip: Arc::new(PerIp::default()),
        max_per_ip: config.smtp.max_connections_per_ip,
        hostname: config.hostname.clone(),
    });
    let mut accept_tasks = Vec::new();
    for addr in &config.smtp.listen {
        let l = listen(*addr).with_context(|| format!("cannot listen on {addr}"))?;
        tracing::info!(event = "listening", addr = %l.local_addr().unwrap_or(*addr), hostname = %config.hostname);
        accept_tasks.push(tokio::spawn(accept_loop(
            l,
            shared.clone(),
            limits.clone(),
            shutdown_rx.clone(),
        )));
    }
    // Wait, then drain.
    wait_for_shutdown(tls).await;
    tracing::info!(
        event = "shutdown_started",
        grace_secs = config.smtp.shutdown_grace.as_secs()
    );
    let _ = shutdown_tx.send(true);
    for t in accept_tasks {
        t.abort();
    }
    // Every session holds a permit; having them all back means all ended.
    let all = u32::try_from(limits.max_total).unwrap_or(u32::MAX);
    let drained = async {
        let _ = limits.total.acquire_many(all).await;
        if let Some(t) = worker_task {
            let _ = t.await;
        }
    };
    match tokio::time::timeout(config.smtp.shutdown_grace, drained).await {
        Ok(()) => tracing::info!(event = "shutdown_complete"),
        Err(_) => tracing::warn!(
            event = "shutdown_grace_expired",
            "sessions or deliveries still open were cut off"
        ),
    }
    Ok(())
}

/// The certificate `[tls]` names, reloaded every `reload_every` if set.
async fn load_tls(config: &Config) -> anyhow::Result<Option<Tls>> {
    let tls = match &config.tls {
        Some(files) => Some(Tls::new(files).await?),
        None => None,
    };
    if let (Some(t), Some(every)) = (
        tls.clone(),
        config.tls.as_ref().and_then(|f| f.reload_every()),
    ) {
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                t.reload().await;
            }
        });
    }
    Ok(tls)
}

/// Stores the `[[domain]]` entries of the configuration.
async fn store_configured_domains(config: &Config, backends: &Backends) -> anyhow::Result<()> {
    for d in &config.domains {
        // validate() already checked every entry.
        let mut domain = d
            .to_domain()
            .with_context(|| format!("[[domain]] {}", d.name))?;
        let stored = backends.registry.get(&domain.name).await.ok().flatten();
        // A hold is the operator's (or the bounce-storm guard's) until
        // released: a configuration that does not mention it keeps it, and
        // one that says `hold = true` keeps its reason and time.
        if d.hold != Some(false) {
            if let Some(h) = stored.as_ref().and_then(|s| s.hold) {
                domain.hold = Some(h);
            }
        }
        // Unchanged records are not written again, and a write that fails
        // (a full disk) must not keep the server from serving the domains
        // it already has: mail for them is what the disk is full of.
        if stored.as_ref() == Some(&domain) {
            continue;
        }
        if let Err(e) = backends.registry.put(&domain).await {
            tracing::error!(event = "domain_upsert_failed", domain = %d.name, error = %relay_core::error::Report(&e),
                "[[domain]] from the config file not stored; the stored record (if any) stays in use");
        }
    }
    Ok(())
}

/// The metrics recorder (with `[metrics]` or `[admin]`), its listener and
/// the queue-depth gauge.
async fn start_metrics(
    config: &Config,
    backends: &Backends,
) -> anyhow::Result<Option<metrics_exporter_prometheus::PrometheusHandle>> {
    if config.metrics.is_none() && config.admin.is_none() {
        return Ok(None);
    }
    let handle = crate::metrics::install()?;
    if let Some(m) = &config.metrics {
        crate::metrics::serve(m.listen, handle.clone()).await?;
    }
    let queue = backends.queue.clone();
    // Counting the AWS queue reads the whole table (billed by size):
    // every 5 minutes there, every 10 s on the local store.
    let every = match config.storage.backend {
        Backend::Local => Duration::from_secs(10),
        Backend::Aws => Duration::from_secs(300),
    };
    tokio::spawn(async move {
        loop {
            if let Ok(n) = queue.depth().await {
                metrics::gauge!("backupmx_queue_depth").set(n as f64);
            }
            tokio::time::sleep(every).await;
        }
    });
    Ok(Some(handle))
}

/// What a server delivers with: the embedded delivery (and the worker to
/// run), and ETRN.
type DeliveryTier = (Option<Delivery>, Option<Etrn>, Option<Arc<Worker>>);

/// The embedded worker (with its queue-age alert) and ETRN; on AWS, ETRN
/// only (it makes the domain's records due and gives them tickets; the
/// retry function delivers).
fn start_delivery_tier(
    config: &Config,
    mode: Mode,
    backends: &Backends,
    engine: Option<Arc<Engine>>,
) -> anyhow::Result<DeliveryTier> {
    let networks = config.delivery.etrn_networks.clone();
    match (mode, engine, backends.local.as_ref()) {
        (Mode::Embedded, Some(engine), Some(store)) => {
            let (delivery, worker) = start_delivery(config, store, engine)?;
            if let Some(a) = delivery.engine.alerts().cloned() {
                let queue = backends.queue.clone();
                let threshold = config.alerts.queue_age;
                // Every minute, or often enough for a short threshold.
                let every = QUEUE_AGE_CHECK
                    .min(threshold / 2)
                    .max(Duration::from_secs(1));
                tokio::spawn(async move {
                    let watch = relay_core::alerts::QueueAgeWatch::default();
                    loop {
                        let now = relay_core::time::unix_seconds(std::time::SystemTime::now());
                        watch.check(queue.as_ref(), &a, threshold, now).await;
                        tokio::time::sleep(every).await;
                    }
                });
            }
            let etrn = Etrn {
                router: delivery.engine.router().clone(),
                release: worker.clone(),
                networks,
            };
            Ok((Some(delivery), Some(etrn), Some(worker)))
        }
        (Mode::IngestOnly, Some(engine), None) if config.storage.backend == Backend::Aws => {
            let etrn = Etrn {
                router: engine.router().clone(),
                release: Arc::new(relay_core::delivery::etrn::QueueRelease(
                    backends.queue.clone(),
                )),
                networks,
            };
            Ok((None, Some(etrn), None))
        }
        _ => Ok((None, None, None)),
    }
}

/// What every session shares: limits, policy, spool, TLS, delivery, ETRN
/// and the content filter.
fn shared_state(
    config: &Config,
    backends: &Backends,
    resolver: Option<Arc<dyn Resolver>>,
    engine: Option<Arc<Engine>>,
    tls: Option<Tls>,
    delivery: Option<Delivery>,
    etrn: Option<Etrn>,
) -> anyhow::Result<Shared> {
    let harvest = Arc::new(relay_core::harvest::HarvestGuard::new(config.into()));
    let verifier = engine.map(|e| {
        Arc::new(
            relay_core::setup::verifier(config, backends.recipients.clone(), e)
                .with_harvest(harvest.clone()),
        )
    });
    let policy = Arc::new(build_policy(config, backends, resolver, verifier, harvest));
    spawn_maintenance(config, backends, &policy);
    Ok(Shared {
        spool_dir: prepare_spool_dir(&config.storage.data_dir)?,
        resources: Resources {
            memory: relay_core::budget::MemoryBudget::new(config.smtp.memory_budget),
            disk: (config.storage.backend == Backend::Local).then(|| disk_space(config, backends)),
        },
        session: Arc::new(SessionConfig {
            tls_available: tls.is_some(),
            etrn_available: etrn.is_some(),
            admit_mail: true,
            ..SessionConfig::from(config)
        }),
        policy,
        spool: with_faults(backends.spool.clone()),
        tls,
        delivery,
        etrn,
        filter: config
            .filter_settings()
            .context("[filter]")?
            .map(relay_core::filter::Rspamd::new),
        auth: None,
        history: None,
    })
}

/// The free-space check of the embedded store: the disk's, with the
/// database's own free pages counted as free (and exported as gauges).
fn disk_space(config: &Config, backends: &Backends) -> relay_core::store::space::FreeSpace {
    let disk = relay_core::store::space::FreeSpace::new(
        &config.storage.data_dir,
        config.storage.min_free_space,
    )
    .with_reserve(config.storage.reserve_space);
    match backends.local.clone() {
        Some(store) => disk.with_store_free(Box::new(move || match store.space_inside() {
            Ok(space) => {
                metrics::gauge!("backupmx_store_bytes").set(space.file_bytes as f64);
                metrics::gauge!("backupmx_store_free_bytes").set(space.free_bytes as f64);
                metrics::gauge!("backupmx_store_wal_bytes").set(space.wal_bytes as f64);
                space.free_adjustment()
            }
            Err(_) => 0,
        })),
        None => disk,
    }
}

/// `backupmx admin`: the status page and API alone, on the configured
/// store (the AWS shape's view; or beside a local server).
pub(crate) async fn admin_only(config: Config, source: &str) -> anyhow::Result<()> {
    let Some(a) = config.admin.clone() else {
        bail!(
            "`backupmx admin` needs [admin] listen = \"ADDR:PORT\" in the configuration ({source})"
        );
    };
    let handle = crate::metrics::install()?;
    let (admin, _backends) = crate::cli::open_admin(&config, false, source).await?;
    let web = crate::web::Web {
        admin,
        token: a.token().map(str::to_string),
        hostname: config.hostname.clone(),
        metrics: Some(handle),
        sessions: Default::default(),
        brake: Default::default(),
    };
    crate::web::serve(a.listen, Arc::new(web)).await?;
    wait_for_shutdown(None).await;
    tracing::info!(event = "stopped");
    Ok(())
}

/// Every `interval`, the TLS reports of the whole days not sent yet.
async fn send_tls_reports(reporter: relay_core::tlsrpt::send::TlsReporter, interval: Duration) {
    let mut tick = tokio::time::interval(interval.max(Duration::from_secs(60)));
    loop {
        tick.tick().await;
        match reporter.send_due(std::time::SystemTime::now(), false).await {
            Ok(sent) if sent.reports > 0 => tracing::info!(
                event = "tlsrpt_pass",
                reports = sent.reports,
                posted = sent.posted,
                mailed = sent.mailed,
                failed = sent.failed
            ),
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(event = "tlsrpt_pass_failed", error = %relay_core::error::Report(&e))
            }
        }
    }
}
