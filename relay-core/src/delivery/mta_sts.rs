//! MTA-STS policies of destination domains (RFC 8461): the `_mta-sts` TXT
//! record looked up at each delivery, the policy fetched over verified
//! HTTPS when its id changes, and kept for its `max_age`, so that an
//! attacker who strips the TXT record or blocks the fetch later cannot
//! downgrade a domain that had a policy.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::address::DomainName;
use crate::dns::Resolver;
use crate::mta_sts::{parse_policy, parse_record, policy_from_response, Policy, MAX_POLICY_SIZE};
use crate::sync::Mutex;

/// A failed fetch is not tried again for the same id before this long.
const FAILED_FETCH_PAUSE: Duration = Duration::from_secs(300);

/// Why a domain's policy could not be had.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StsUnavailable {
    /// The `_mta-sts` TXT record could not be looked up (DNS trouble).
    Lookup(String),
    /// A record announces a policy, but it is invalid or cannot be fetched.
    Fetch(String),
}

#[derive(Clone)]
struct Cached {
    id: String,
    policy: Policy,
    /// Unix seconds.
    expires: u64,
}

/// The policies of the domains we deliver to, fetched and cached.
pub struct StsPolicies {
    resolver: Arc<dyn Resolver>,
    tls: Arc<rustls::ClientConfig>,
    port: u16,
    timeout: Duration,
    cache: Mutex<HashMap<DomainName, Cached>>,
    failed: Mutex<HashMap<DomainName, (String, Instant)>>,
}

impl StsPolicies {
    /// Fetches over `tls` (it must verify certificates) from `port` (443
    /// but in tests), each fetch within `timeout`.
    pub fn new(
        resolver: Arc<dyn Resolver>,
        tls: Arc<rustls::ClientConfig>,
        port: u16,
        timeout: Duration,
    ) -> StsPolicies {
        StsPolicies {
            resolver,
            tls,
            port,
            timeout,
            cache: Mutex::new(HashMap::new()),
            failed: Mutex::new(HashMap::new()),
        }
    }

    /// The policy that applies to `domain` now, if any.
    pub async fn policy(&self, domain: &DomainName, now: u64) -> Option<Policy> {
        let cached = self
            .cache
            .lock()
            .get(domain)
            .cloned()
            .filter(|c| c.expires > now);
        let record = match self.resolver.txt(&format!("_mta-sts.{domain}")).await {
            Ok(txts) => match parse_record(&txts) {
                Ok(r) => r,
                Err(e) => {
                    tracing::info!(event = "mta_sts_record_invalid", domain = %domain, error = %e);
                    None
                }
            },
            Err(_) => None,
        };
        // No record now (removed, or DNS trouble): a cached policy still
        // holds until it expires (RFC 8461 §5.1).
        let Some(record) = record else {
            return cached.map(|c| c.policy);
        };
        if let Some(c) = &cached {
            if c.id == record.id {
                return Some(c.policy.clone());
            }
        }
        let recently_failed = self
            .failed
            .lock()
            .get(domain)
            .is_some_and(|(id, at)| *id == record.id && at.elapsed() < FAILED_FETCH_PAUSE);
        if recently_failed {
            return cached.map(|c| c.policy);
        }
        match self.fetch(domain).await {
            Ok(policy) => {
                tracing::info!(event = "mta_sts_policy", domain = %domain, id = %record.id,
                    mode = %policy.mode, mx = ?policy.mx, max_age = policy.max_age);
                metrics::counter!("backupmx_mta_sts_fetches_total", "result" => "ok").increment(1);
                self.failed.lock().remove(domain);
                self.cache.lock().insert(
                    domain.clone(),
                    Cached {
                        id: record.id,
                        policy: policy.clone(),
                        expires: now.saturating_add(policy.max_age),
                    },
                );
                Some(policy)
            }
            Err(e) => {
                tracing::warn!(event = "mta_sts_fetch_failed", domain = %domain, id = %record.id, error = %e);
                metrics::counter!("backupmx_mta_sts_fetches_total", "result" => "failed")
                    .increment(1);
                self.failed
                    .lock()
                    .insert(domain.clone(), (record.id, Instant::now()));
                cached.map(|c| c.policy)
            }
        }
    }

    /// The domain's policy as a sender fetching it now would get it (no
    /// cache), or why it cannot be had: for `backupmx doctor`.
    pub async fn fetch_now(&self, domain: &DomainName) -> Result<Option<Policy>, StsUnavailable> {
        let txts = match self.resolver.txt(&format!("_mta-sts.{domain}")).await {
            Ok(t) => t,
            Err(crate::dns::DnsError::NoRecords | crate::dns::DnsError::NxDomain) => {
                return Ok(None)
            }
            Err(e) => {
                return Err(StsUnavailable::Lookup(format!(
                    "TXT lookup of _mta-sts.{domain}: {e}"
                )))
            }
        };
        match parse_record(&txts) {
            Ok(None) => Ok(None),
            Ok(Some(_)) => self
                .fetch(domain)
                .await
                .map(Some)
                .map_err(StsUnavailable::Fetch),
            Err(e) => Err(StsUnavailable::Fetch(format!("_mta-sts.{domain}: {e}"))),
        }
    }

    /// `https://mta-sts.DOMAIN/.well-known/mta-sts.txt`, certificate
    /// verified for that name, no redirects.
    async fn fetch(&self, domain: &DomainName) -> Result<Policy, String> {
        let host = format!("mta-sts.{domain}");
        let work = async {
            let ips = self
                .resolver
                .ips(&host)
                .await
                .map_err(|e| format!("{host}: {e}"))?;
            let mut last = format!("{host}: no address");
            for ip in ips {
                match self.get(SocketAddr::new(ip, self.port), &host).await {
                    Ok(text) => return parse_policy(&text).map_err(|e| e.to_string()),
                    Err(e) => last = e,
                }
            }
            Err(last)
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| format!("fetching the policy from {host} timed out"))?
    }

    async fn get(&self, addr: SocketAddr, host: &str) -> Result<String, String> {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect to {host} ({addr}): {e}"))?;
        let name = ServerName::try_from(host.to_string()).map_err(|e| format!("{host}: {e}"))?;
        let mut tls = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS to {host}: {e}"))?;
        let request = format!(
            "GET /.well-known/mta-sts.txt HTTP/1.1\r\nHost: {host}\r\nUser-Agent: backupmx\r\nAccept: text/plain\r\nConnection: close\r\n\r\n"
        );
        tls.write_all(request.as_bytes())
            .await
            .map_err(|e| format!("{host}: {e}"))?;
        let mut raw = Vec::new();
        let limit = (MAX_POLICY_SIZE + 16 * 1024) as u64;
        let read = (&mut tls).take(limit).read_to_end(&mut raw).await;
        // Servers that close without close_notify are common; what was
        // read is judged by its length headers.
        if let Err(e) = read {
            if raw.is_empty() || e.kind() != std::io::ErrorKind::UnexpectedEof {
                return Err(format!("{host}: {e}"));
            }
        }
        policy_from_response(&raw).map_err(|e| format!("{host}: {e}"))
    }
}
