//! The SMTP listeners' accept loops: the connection limits (in all and
//! per client address), the PROXY protocol header from a trusted load
//! balancer, and a `421` for whoever cannot be served, even when the
//! process is out of file descriptors.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use relay_core::smtp::Session;
use relay_core::sync::Mutex;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};

use crate::connection::{self, Shared};

/// Counts connections per client address.
#[derive(Default)]
pub(crate) struct PerIp(Mutex<HashMap<IpAddr, usize>>);

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

/// What every accepted connection is checked against.
pub(crate) struct Limits {
    pub proxy: Option<ProxyPolicy>,
    /// One permit per session (`smtp.max_connections`).
    pub total: Arc<Semaphore>,
    pub max_total: usize,
    pub per_ip: Arc<PerIp>,
    pub max_per_ip: usize,
    pub hostname: String,
}

/// Accepts connections on `listener` until the task is aborted.
pub(crate) async fn accept_loop(
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
    if shared
        .policy
        .harvest
        .penalised(client.ip(), std::time::Instant::now())
    {
        refuse(
            stream,
            client,
            &limits.hostname,
            "too many unknown recipients from your address",
            "unknown_recipients",
        );
        return;
    }
    metrics::counter!("backupmx_sessions_total").increment(1);
    metrics::gauge!("backupmx_sessions_active").increment(1.0);
    connection::serve(stream, client, early, id, shared, shutdown).await;
    metrics::gauge!("backupmx_sessions_active").decrement(1.0);
    drop(ip_guard);
    drop(permit);
}

/// PROXY protocol on a listener: who may send headers, and how long to wait.
pub(crate) struct ProxyPolicy {
    pub trusted: Vec<ipnet::IpNet>,
    pub timeout: Duration,
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

/// Binds with a deep accept backlog: a backup MX takes a burst of
/// connections the moment a primary goes down.
pub(crate) fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}
