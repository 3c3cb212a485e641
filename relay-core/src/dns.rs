//! DNS behind our own trait. This is the only module that imports hickory.
//!
//! NXDOMAIN and "no records" are answers, not failures; timeouts, SERVFAIL
//! and refused queries are transient errors.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use async_trait::async_trait;
use hickory_resolver::config::{NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::rr::Name;
use hickory_resolver::proto::xfer::Protocol;
use hickory_resolver::{ResolveError, TokioResolver};

/// One MX record. `exchange` is lower-case without the trailing dot; empty
/// for the null MX (RFC 7505).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MxRecord {
    pub preference: u16,
    pub exchange: String,
}

/// A TLSA record: how a server's certificate is to be matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsaRecord {
    /// 0 PKIX-TA, 1 PKIX-EE, 2 DANE-TA, 3 DANE-EE.
    pub usage: u8,
    /// 0 the whole certificate, 1 its SubjectPublicKeyInfo.
    pub selector: u8,
    /// 0 exact, 1 SHA-256, 2 SHA-512.
    pub matching: u8,
    /// What is compared.
    pub data: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DnsError {
    /// The name does not exist (permanent).
    #[error("domain does not exist (NXDOMAIN)")]
    NxDomain,
    /// The name exists but has no records of the type asked for.
    #[error("no records of that type")]
    NoRecords,
    /// Timeout, SERVFAIL, refused, network trouble: try again later.
    #[error("temporary DNS failure: {0}")]
    Temporary(String),
}

impl DnsError {
    pub fn is_transient(&self) -> bool {
        matches!(self, DnsError::Temporary(_))
    }
}

/// A-record answer with the TTL to cache it for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AAnswer {
    pub addrs: Vec<Ipv4Addr>,
    pub ttl: Duration,
}

#[async_trait]
pub trait Resolver: Send + Sync {
    async fn mx(&self, domain: &str) -> Result<Vec<MxRecord>, DnsError>;
    /// A and AAAA records of a host.
    async fn ips(&self, host: &str) -> Result<Vec<IpAddr>, DnsError>;
    /// A records with their TTL (DNSBL queries).
    async fn a(&self, name: &str) -> Result<AAnswer, DnsError>;
    /// TLSA records (RFC 6698) at a name such as `_25._tcp.mx.example.com`.
    async fn tlsa(&self, name: &str) -> Result<Vec<TlsaRecord>, DnsError> {
        let _ = name;
        Err(DnsError::NoRecords)
    }
    /// TXT records, each as the concatenation of its strings (MTA-STS, SPF).
    async fn txt(&self, name: &str) -> Result<Vec<String>, DnsError> {
        let _ = name;
        Err(DnsError::NoRecords)
    }
}

/// hickory-resolver with our nameservers (or the system's).
pub struct HickoryResolver {
    inner: TokioResolver,
}

impl HickoryResolver {
    /// `servers` empty: the system configuration (/etc/resolv.conf).
    pub fn new(servers: &[SocketAddr], timeout: Duration) -> Result<Self, DnsError> {
        let mut opts = ResolverOpts::default();
        opts.timeout = timeout;
        opts.attempts = 2;
        opts.use_hosts_file = ResolveHosts::Never;
        opts.ndots = 0;
        let inner = if servers.is_empty() {
            let mut builder = TokioResolver::builder_tokio()
                .map_err(|e| DnsError::Temporary(format!("system resolver configuration: {e}")))?;
            *builder.options_mut() = opts;
            builder.build()
        } else {
            let mut config = ResolverConfig::new();
            for s in servers {
                config.add_name_server(NameServerConfig::new(*s, Protocol::Udp));
                config.add_name_server(NameServerConfig::new(*s, Protocol::Tcp));
            }
            TokioResolver::builder_with_config(config, TokioConnectionProvider::default())
                .with_options(opts)
                .build()
        };
        Ok(HickoryResolver { inner })
    }
}

fn absolute(name: &str) -> Result<Name, DnsError> {
    let fqdn = if name.ends_with('.') {
        name.to_string()
    } else {
        format!("{name}.")
    };
    Name::from_utf8(&fqdn).map_err(|e| DnsError::Temporary(format!("invalid name {name:?}: {e}")))
}

fn classify(e: &ResolveError) -> DnsError {
    if e.is_nx_domain() {
        DnsError::NxDomain
    } else if e.is_no_records_found() {
        DnsError::NoRecords
    } else {
        DnsError::Temporary(e.to_string())
    }
}

fn host_string(name: &Name) -> String {
    let s = name.to_utf8().to_lowercase();
    s.strip_suffix('.').unwrap_or(&s).to_string()
}

#[async_trait]
impl Resolver for HickoryResolver {
    async fn mx(&self, domain: &str) -> Result<Vec<MxRecord>, DnsError> {
        let lookup = self
            .inner
            .mx_lookup(absolute(domain)?)
            .await
            .map_err(|e| classify(&e))?;
        let records: Vec<MxRecord> = lookup
            .iter()
            .map(|mx| MxRecord {
                preference: mx.preference(),
                exchange: host_string(mx.exchange()),
            })
            .collect();
        if records.is_empty() {
            return Err(DnsError::NoRecords);
        }
        Ok(records)
    }

    async fn ips(&self, host: &str) -> Result<Vec<IpAddr>, DnsError> {
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(vec![ip]);
        }
        let lookup = self
            .inner
            .lookup_ip(absolute(host)?)
            .await
            .map_err(|e| classify(&e))?;
        let ips: Vec<IpAddr> = lookup.iter().collect();
        if ips.is_empty() {
            return Err(DnsError::NoRecords);
        }
        Ok(ips)
    }

    async fn tlsa(&self, name: &str) -> Result<Vec<TlsaRecord>, DnsError> {
        use hickory_resolver::proto::rr::{RData, RecordType};
        let lookup = self
            .inner
            .lookup(absolute(name)?, RecordType::TLSA)
            .await
            .map_err(|e| classify(&e))?;
        let records: Vec<TlsaRecord> = lookup
            .iter()
            .filter_map(|r| match r {
                RData::TLSA(t) => Some(TlsaRecord {
                    usage: t.cert_usage().into(),
                    selector: t.selector().into(),
                    matching: t.matching().into(),
                    data: t.cert_data().to_vec(),
                }),
                _ => None,
            })
            .collect();
        if records.is_empty() {
            return Err(DnsError::NoRecords);
        }
        Ok(records)
    }

    async fn txt(&self, name: &str) -> Result<Vec<String>, DnsError> {
        let lookup = self
            .inner
            .txt_lookup(absolute(name)?)
            .await
            .map_err(|e| classify(&e))?;
        Ok(lookup
            .iter()
            .map(|t| {
                t.txt_data()
                    .iter()
                    .map(|part| String::from_utf8_lossy(part))
                    .collect::<String>()
            })
            .collect())
    }

    async fn a(&self, name: &str) -> Result<AAnswer, DnsError> {
        let lookup = self
            .inner
            .ipv4_lookup(absolute(name)?)
            .await
            .map_err(|e| classify(&e))?;
        let ttl = lookup
            .as_lookup()
            .records()
            .iter()
            .map(|r| r.ttl())
            .min()
            .unwrap_or(0);
        Ok(AAnswer {
            addrs: lookup.iter().map(|a| a.0).collect(),
            ttl: Duration::from_secs(u64::from(ttl)),
        })
    }
}
