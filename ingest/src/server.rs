//! Listeners, connection limits, signals and graceful shutdown.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use relay_core::sync::Mutex;
use std::time::Duration;

use anyhow::{bail, Context};
use relay_core::config::{Backend, Config};
use relay_core::delivery::worker::{Worker, WorkerConfig};
use relay_core::delivery::{Engine, EngineConfig};
use relay_core::dns::{HickoryResolver, Resolver};
use relay_core::dnsbl::Dnsbl;
use relay_core::greylist::{Greylist, GreylistStore};
use relay_core::policy::Policy;
use relay_core::smtp::{Session, SessionConfig};
use relay_core::store::aws::{AwsNames, AwsStore};
use relay_core::store::local::{LocalStore, StoreOptions};
use relay_core::store::{DeliveryQueue, DomainRegistry, MessageStore, SplitSpool, Spool};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};

use crate::connection::{self, Delivery, Etrn, Resources, Shared};
use crate::tls::Tls;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// `backupmx run`: everything in one process on the local store.
    Embedded,
    /// `backupmx ingest`: SMTP only, on the configured backend.
    IngestOnly,
}

/// The storage backends, behind their traits.
pub(crate) struct Backends {
    pub registry: Arc<dyn DomainRegistry>,
    pub greylist: Arc<dyn GreylistStore>,
    pub spool: Arc<dyn Spool>,
    pub queue: Arc<dyn DeliveryQueue>,
    pub messages: Arc<dyn MessageStore>,
    /// The callout cache and the primaries' states.
    pub recipients: Arc<dyn relay_core::store::RecipientCache>,
    /// Set for the embedded backend (the delivery worker needs it).
    pub local: Option<Arc<LocalStore>>,
}

impl Backends {
    /// The operator's operations on these backends (CLI and admin API).
    pub(crate) fn admin(
        &self,
        alerter: Option<Arc<relay_core::alerts::Alerter>>,
    ) -> relay_core::admin::Admin {
        relay_core::admin::Admin::new(
            self.registry.clone(),
            self.queue.clone(),
            self.messages.clone(),
            self.recipients.clone(),
            alerter,
        )
    }
}

/// Opens the configured backend, creating the local store if needed.
async fn open_backends(config: &Config) -> anyhow::Result<Backends> {
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
                }),
                queue: store.clone(),
                recipients: store.clone(),
                messages: store,
                local: None,
            })
        }
    }
}

async fn connect_aws(config: &Config) -> anyhow::Result<AwsStore> {
    let conf = relay_core::store::aws::sdk_config().await;
    AwsStore::connect(&conf, AwsNames::from(&config.aws))
        .await
        .context(
            "cannot reach the AWS backend (is AWS_ENDPOINT_URL or the AWS configuration right?)",
        )
}

/// Counts connections per client address.
#[derive(Default)]
struct PerIp(Mutex<HashMap<IpAddr, usize>>);

struct PerIpGuard {
    table: Arc<PerIp>,
    ip: IpAddr,
}

impl PerIp {
    fn try_take(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<PerIpGuard> {
        let mut map = self.0.lock();
        let n = map.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(PerIpGuard {
            table: self.clone(),
            ip,
        })
    }
}

impl Drop for PerIpGuard {
    fn drop(&mut self) {
        let mut map = self.table.0.lock();
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

pub(crate) async fn run(config: Config, mode: Mode) -> anyhow::Result<()> {
    if mode == Mode::Embedded && config.storage.backend != Backend::Local {
        bail!("`backupmx run` is the embedded mode and needs storage.backend = \"local\"; use `backupmx ingest` for other backends");
    }
    // Files named by the config are checked before anything is logged or
    // opened, so a wrong path is the one line an operator sees.
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
    let metrics_handle = if config.metrics.is_some() || config.admin.is_some() {
        Some(crate::metrics::install()?)
    } else {
        None
    };
    if let Some(handle) = &metrics_handle {
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
    }
    let needs_dns = mode == Mode::Embedded
        || config.storage.backend == Backend::Aws
        || !config.dnsbl.zones.is_empty()
        || !config.dnsbl.allow_zones.is_empty();
    let resolver: Option<Arc<dyn Resolver>> = if needs_dns {
        let r = HickoryResolver::with_trust_anchors(
            &config.dns.servers,
            config.dns.timeout,
            &config.dns.dnssec_trust_anchors,
        )
        .map_err(|e| anyhow::anyhow!("cannot set up the DNS resolver: {e}"))?;
        Some(Arc::new(r))
    } else {
        None
    };
    let alerter = alerter(&config)?;
    if let Some(a) = &config.admin {
        let web = crate::web::Web {
            admin: backends.admin(alerter.clone()),
            token: a.token().map(str::to_string),
            hostname: config.hostname.clone(),
            metrics: metrics_handle.clone(),
        };
        crate::web::serve(a.listen, Arc::new(web)).await?;
    }
    // The delivery engine: routes for delivery, probes, ETRN and callouts.
    // Every process that can compute a route to a primary has one.
    let engine: Option<Arc<Engine>> = resolver
        .clone()
        .filter(|_| mode == Mode::Embedded || config.storage.backend == Backend::Aws)
        .map(|r| {
            Arc::new(
                Engine::new(EngineConfig::from(&config), r, backends.registry.clone())
                    .with_learning(
                        backends.recipients.clone(),
                        config.recipient_verify.valid_ttl,
                        config.recipient_verify.invalid_ttl,
                    )
                    .with_alerts(alerter.clone()),
            )
        });
    let verifier = engine.clone().map(|e| {
        Arc::new(relay_core::recipients::RecipientVerifier::new(
            backends.recipients.clone(),
            e,
            relay_core::recipients::VerifySettings::from(&config),
        ))
    });
    let policy = Arc::new(build_policy(&config, &backends, resolver.clone(), verifier));
    spawn_maintenance(&config, &backends, &policy);
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let mut worker_task = None;
    let etrn_networks = config.delivery.etrn_networks.clone();
    let (delivery, etrn) = match (mode, engine, backends.local.as_ref()) {
        (Mode::Embedded, Some(engine), Some(store)) => {
            let (delivery, worker) = start_delivery(&config, store, engine)?;
            worker_task = Some(tokio::spawn(worker.clone().run(shutdown_rx.clone())));
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
                engine: delivery.engine.clone(),
                release: worker,
                networks: etrn_networks,
            };
            (Some(delivery), Some(etrn))
        }
        // Ingest only, on the shared AWS queue: ETRN makes the domain's
        // records due and gives them tickets; the retry function delivers.
        (Mode::IngestOnly, Some(engine), None) if config.storage.backend == Backend::Aws => {
            let etrn = Etrn {
                engine,
                release: Arc::new(relay_core::delivery::etrn::QueueRelease(
                    backends.queue.clone(),
                )),
                networks: etrn_networks,
            };
            (None, Some(etrn))
        }
        _ => (None, None),
    };
    let mut listeners = Vec::new();
    for addr in &config.smtp.listen {
        let l = listen(*addr).with_context(|| format!("cannot listen on {addr}"))?;
        tracing::info!(event = "listening", addr = %l.local_addr().unwrap_or(*addr), hostname = %config.hostname);
        listeners.push(l);
    }
    let spool_dir = prepare_spool_dir(&config.storage.data_dir)?;
    let shared = Arc::new(Shared {
        spool_dir,
        resources: Resources {
            memory: relay_core::budget::MemoryBudget::new(config.smtp.memory_budget),
            disk: (config.storage.backend == Backend::Local).then(|| {
                let disk = relay_core::store::space::FreeSpace::new(
                    &config.storage.data_dir,
                    config.storage.min_free_space,
                )
                .with_reserve(config.storage.reserve_space);
                match backends.local.clone() {
                    Some(store) => {
                        disk.with_store_free(Box::new(move || match store.space_inside() {
                            Ok(space) => {
                                metrics::gauge!("backupmx_store_bytes")
                                    .set(space.file_bytes as f64);
                                metrics::gauge!("backupmx_store_free_bytes")
                                    .set(space.free_bytes as f64);
                                metrics::gauge!("backupmx_store_wal_bytes")
                                    .set(space.wal_bytes as f64);
                                space.free_adjustment()
                            }
                            Err(_) => 0,
                        }))
                    }
                    None => disk,
                }
            }),
        },
        session: Arc::new(SessionConfig {
            tls_available: tls.is_some(),
            etrn_available: etrn.is_some(),
            admit_mail: true,
            ..SessionConfig::from(&config)
        }),
        policy,
        spool: with_faults(backends.spool.clone()),
        tls: tls.clone(),
        delivery,
        etrn,
        filter: config
            .filter_settings()
            .context("[filter]")?
            .map(relay_core::filter::Rspamd::new),
    });
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
    for l in listeners {
        accept_tasks.push(tokio::spawn(accept_loop(
            l,
            shared.clone(),
            limits.clone(),
            shutdown_rx.clone(),
        )));
    }
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

/// The directory big messages are spilled to while they arrive
/// (`DATA_DIR/incoming`, private). What is in it at start was left by a
/// process that died before storing it (the client got no 250): removed.
fn prepare_spool_dir(data_dir: &std::path::Path) -> anyhow::Result<std::path::PathBuf> {
    let dir = data_dir.join("incoming");
    relay_core::store::space::prepare_data_dir(&dir)
        .with_context(|| format!("cannot prepare the spool directory {}", dir.display()))?;
    for entry in std::fs::read_dir(&dir)?.flatten() {
        let _ = std::fs::remove_file(entry.path());
    }
    Ok(dir)
}

/// The delivery engine and worker of the embedded mode.
fn start_delivery(
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

/// `backupmx admin`: the status page and API alone, on the configured
/// store (the AWS shape's view; or beside a local server).
pub(crate) async fn admin_only(config: Config, source: &str) -> anyhow::Result<()> {
    let Some(a) = config.admin.clone() else {
        bail!(
            "`backupmx admin` needs [admin] listen = \"ADDR:PORT\" in the configuration ({source})"
        );
    };
    let handle = crate::metrics::install()?;
    let (admin, _backends) = crate::admin::open_admin(&config, false, source).await?;
    let web = crate::web::Web {
        admin,
        token: a.token().map(str::to_string),
        hostname: config.hostname.clone(),
        metrics: Some(handle),
    };
    crate::web::serve(a.listen, Arc::new(web)).await?;
    wait_for_shutdown(None).await;
    tracing::info!(event = "stopped");
    Ok(())
}

async fn wait_for_shutdown(tls: Option<Tls>) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        tracing::error!(event = "signals_unavailable");
        return std::future::pending().await;
    };
    loop {
        tokio::select! {
            _ = term.recv() => return,
            _ = int.recv() => return,
            _ = hup.recv() => {
                if let Some(t) = &tls { t.reload().await; }
            }
        }
    }
}

struct Limits {
    proxy: Option<ProxyPolicy>,
    total: Arc<Semaphore>,
    max_total: usize,
    per_ip: Arc<PerIp>,
    max_per_ip: usize,
    hostname: String,
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    limits: Arc<Limits>,
    shutdown: watch::Receiver<bool>,
) {
    static SESSION_IDS: AtomicU64 = AtomicU64::new(1);
    let mut backoff = ACCEPT_BACKOFF_MIN;
    // A descriptor held back for the moment the process has none left: it
    // is closed to accept one waiting client and tell it 421 rather than
    // leave it hanging with no greeting.
    let mut spare = std::fs::File::open("/dev/null").ok();
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => {
                backoff = ACCEPT_BACKOFF_MIN;
                x
            }
            Err(e) => {
                let out_of_files = matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE));
                tracing::warn!(event = "accept_failed", error = %relay_core::error::Report(&e));
                if out_of_files {
                    metrics::counter!("backupmx_accept_out_of_files_total").increment(1);
                    if spare.take().is_some() {
                        if let Ok((stream, peer)) = listener.accept().await {
                            refuse_now(&stream, peer, &limits.hostname);
                        }
                        spare = std::fs::File::open("/dev/null").ok();
                    }
                }
                // Wait rather than spin while descriptors are short.
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                continue;
            }
        };
        let Ok(permit) = limits.total.clone().try_acquire_owned() else {
            refuse(
                stream,
                peer,
                &limits.hostname,
                "too many connections",
                "connection_limit",
            );
            continue;
        };
        let id = SESSION_IDS.fetch_add(1, Ordering::Relaxed);
        let shared = shared.clone();
        let limits = limits.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            // Behind a load balancer the real client comes from the PROXY header.
            let mut stream = stream;
            let (client, early) = match &limits.proxy {
                None => (peer, Vec::new()),
                Some(proxy) => match proxy.accept(&mut stream, peer).await {
                    Some(found) => found,
                    None => return,
                },
            };
            let accepted = Accepted {
                stream,
                client,
                early,
                id,
                permit,
            };
            run_session(accepted, shared, limits, shutdown).await;
        });
    }
}

/// A connection let in by the accept loop, with its client's address
/// (from the PROXY header when there is one).
struct Accepted {
    stream: TcpStream,
    client: SocketAddr,
    /// Bytes that came in with the PROXY header.
    early: Vec<u8>,
    id: u64,
    /// Its place in `smtp.max_connections`, held until the session ends.
    permit: tokio::sync::OwnedSemaphorePermit,
}

async fn run_session(
    accepted: Accepted,
    shared: Arc<Shared>,
    limits: Arc<Limits>,
    shutdown: watch::Receiver<bool>,
) {
    let Accepted {
        stream,
        client,
        early,
        id,
        permit,
    } = accepted;
    let Some(ip_guard) = limits.per_ip.try_take(client.ip(), limits.max_per_ip) else {
        refuse(
            stream,
            client,
            &limits.hostname,
            "too many connections from your address",
            "connection_limit_ip",
        );
        return;
    };
    metrics::counter!("backupmx_sessions_total").increment(1);
    metrics::gauge!("backupmx_sessions_active").increment(1.0);
    connection::serve(stream, client, early, id, shared, shutdown).await;
    metrics::gauge!("backupmx_sessions_active").decrement(1.0);
    drop(ip_guard);
    drop(permit);
}

/// PROXY protocol on a listener: who may send headers, and how long to wait.
struct ProxyPolicy {
    trusted: Vec<ipnet::IpNet>,
    timeout: Duration,
}

impl ProxyPolicy {
    /// Reads and checks the header; `None` closes the connection.
    async fn accept(
        &self,
        stream: &mut TcpStream,
        peer: SocketAddr,
    ) -> Option<(SocketAddr, Vec<u8>)> {
        use relay_core::proxy::{parse, Parsed, ProxyHeader, V2_MAX};
        use tokio::io::AsyncReadExt;
        let refuse = |why: &str| {
            metrics::counter!("backupmx_rejections_total", "reason" => "proxy_header", "code" => "close").increment(1);
            tracing::warn!(event = "proxy_header_refused", peer = %peer, why);
        };
        let trusted = self.trusted.iter().any(|n| n.contains(&peer.ip()));
        // The container's own health check runs on this host and sends a
        // LOCAL header (no forwarded address): it needs no trust, and it
        // is the only header taken from a host outside trusted_proxies.
        let this_host = peer.ip() == IpAddr::from(std::net::Ipv4Addr::LOCALHOST)
            || peer.ip() == IpAddr::from(std::net::Ipv6Addr::LOCALHOST);
        if !trusted && !this_host {
            refuse("not a trusted proxy");
            return None;
        }
        let mut buf = Vec::with_capacity(256);
        let read = tokio::time::timeout(self.timeout, async {
            loop {
                match parse(&buf) {
                    Ok(Parsed::Done(header, used)) => return Ok((header, used)),
                    Ok(Parsed::NeedMore) => {}
                    Err(e) => return Err(Some(e.to_string())),
                }
                let mut chunk = [0u8; 512];
                let want = chunk.len().min(V2_MAX + 512 - buf.len());
                match stream.read(&mut chunk[..want]).await {
                    // A bare TCP check (the NLB's): connect, close.
                    Ok(0) | Err(_) if buf.is_empty() => return Err(None),
                    Ok(0) | Err(_) => {
                        return Err(Some("connection closed before the header".to_string()))
                    }
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
        })
        .await;
        match read {
            Ok(Ok((header, used))) => {
                let client = match header {
                    ProxyHeader::Tcp { source, .. } if trusted => source,
                    ProxyHeader::Tcp { .. } => {
                        refuse("a forwarded address from a host that is not a trusted proxy");
                        return None;
                    }
                    ProxyHeader::Local => peer,
                };
                Some((client, buf.split_off(used)))
            }
            Ok(Err(Some(why))) => {
                refuse(&why);
                None
            }
            Ok(Err(None)) => {
                tracing::debug!(event = "tcp_health_check", peer = %peer);
                None
            }
            Err(_) => {
                refuse("timed out waiting for the header");
                None
            }
        }
    }
}

const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_millis(200);

/// `421 4.3.2` written without waiting, for a client accepted on the spare
/// descriptor: the socket closes when `stream` is dropped right after.
fn refuse_now(stream: &TcpStream, peer: SocketAddr, hostname: &str) {
    metrics::counter!("backupmx_rejections_total", "reason" => "out_of_files", "code" => "421")
        .increment(1);
    tracing::warn!(event = "connection_refused", peer = %peer, reason = "out_of_files");
    let reply = relay_core::smtp::Reply::new(
        421,
        "4.3.2",
        format!("{hostname} out of resources, try again later"),
    );
    let _ = stream.try_write(&reply.to_bytes());
}

fn refuse(
    mut stream: TcpStream,
    peer: SocketAddr,
    hostname: &str,
    why: &str,
    reason: &'static str,
) {
    metrics::counter!("backupmx_rejections_total", "reason" => reason, "code" => "421")
        .increment(1);
    tracing::info!(event = "connection_refused", peer = %peer, reason);
    let reply = Session::refuse(hostname, why).to_bytes();
    tokio::spawn(async move {
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            let _ = stream.write_all(&reply).await;
            let _ = stream.shutdown().await;
        })
        .await;
    });
}

/// DNSBL, relay control and greylisting, as configured.
/// How often the embedded server looks at the age of its oldest message.
const QUEUE_AGE_CHECK: Duration = Duration::from_secs(60);

/// The webhook alerter, when `[alerts] webhook` is set.
pub(crate) fn alerter(config: &Config) -> anyhow::Result<Option<Arc<relay_core::alerts::Alerter>>> {
    relay_core::alerts::Alerter::for_webhook(&config.alerts.webhook).map_err(|e| anyhow::anyhow!(e))
}

fn build_policy(
    config: &Config,
    backends: &Backends,
    resolver: Option<Arc<dyn Resolver>>,
    verifier: Option<Arc<relay_core::recipients::RecipientVerifier>>,
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
    }
}

/// DNSBL self-tests and greylist expiry, in the background.
fn spawn_maintenance(config: &Config, backends: &Backends, policy: &Arc<Policy>) {
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

/// Debug builds only: `FAULT_INJECTION=spool:N` fails every N-th message
/// before it is stored, to test the 451 path end to end.
fn with_faults(spool: Arc<dyn Spool>) -> Arc<dyn Spool> {
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

/// Binds with a deep accept backlog: a backup MX takes a burst of
/// connections the moment a primary goes down.
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}
