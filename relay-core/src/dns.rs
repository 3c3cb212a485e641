//! DNS behind our own trait. This is the only module that imports hickory.
//!
//! NXDOMAIN and "no records" are answers, not failures; timeouts, SERVFAIL
//! and refused queries are transient errors.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use async_trait::async_trait;
use hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::NetError;
use hickory_resolver::proto::rr::Name;
use hickory_resolver::proto::rr::RData;
use hickory_resolver::TokioResolver;

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
    /// TLSA records validated with DNSSEC (DANE).
    async fn tlsa_validated(&self, name: &str) -> TlsaAnswer {
        let _ = name;
        TlsaAnswer::NotApplicable
    }
}

/// What a DNSSEC-validated TLSA lookup found (RFC 7672 §2.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsaAnswer {
    /// Validated TLSA records: DANE applies to the host.
    Secure(Vec<TlsaRecord>),
    /// No TLSA records, or records from an unsigned zone: DANE does not
    /// apply (the domain's other policies do).
    NotApplicable,
    /// Validation failed (bogus) or the lookup failed: the host must not
    /// be used now.
    Failed(String),
}

/// hickory-resolver with our nameservers (or the system's), and a second,
/// validating one (DNSSEC) for DANE's TLSA lookups.
pub struct HickoryResolver {
    inner: TokioResolver,
    validating: TokioResolver,
}

impl HickoryResolver {
    /// `servers` empty: the system configuration (/etc/resolv.conf). The
    /// validating resolver trusts the root zone's keys.
    pub fn new(servers: &[SocketAddr], timeout: Duration) -> Result<Self, DnsError> {
        Self::with_trust_anchors(servers, timeout, &[])
    }

    /// As [`HickoryResolver::new`], validating from `anchors` (DNSKEY
    /// RDATA as written in zone files: `257 3 13 BASE64…`) instead of the
    /// root's keys when given: a private signed zone, or tests.
    pub fn with_trust_anchors(
        servers: &[SocketAddr],
        timeout: Duration,
        anchors: &[String],
    ) -> Result<Self, DnsError> {
        let mut opts = ResolverOpts::default();
        opts.timeout = timeout;
        opts.attempts = 2;
        opts.use_hosts_file = ResolveHosts::Never;
        opts.ndots = 0;
        let inner = build_resolver(servers, opts.clone(), None)?;
        let trust = if anchors.is_empty() {
            hickory_resolver::proto::dnssec::TrustAnchors::default()
        } else {
            trust_anchors(anchors)?
        };
        opts.validate = true;
        opts.edns0 = true;
        let validating = build_resolver(servers, opts, Some(std::sync::Arc::new(trust)))?;
        Ok(HickoryResolver { inner, validating })
    }

    /// Sender authentication's checker on this resolver: its lookups
    /// share the cache of every other lookup.
    pub fn authenticator(&self) -> mail_auth::MessageAuthenticator {
        mail_auth::MessageAuthenticator(self.inner.clone())
    }

    async fn validated_tlsa(&self, name: &str) -> TlsaAnswer {
        use hickory_resolver::proto::dnssec::Proof;
        use hickory_resolver::proto::rr::RecordType;
        let Ok(absolute_name) = absolute(name) else {
            return TlsaAnswer::NotApplicable;
        };
        match self
            .validating
            .lookup(absolute_name, RecordType::TLSA)
            .await
        {
            Ok(lookup) => {
                let records: Vec<_> = lookup
                    .answers()
                    .iter()
                    .filter(|r| r.record_type() == RecordType::TLSA)
                    .collect();
                if records.is_empty() {
                    return TlsaAnswer::NotApplicable;
                }
                // hickory calls records whose signatures fail "insecure"
                // when it finds no other chain for them: in a zone that
                // is itself validated as signed, they are bogus.
                if records.iter().any(|r| r.proof == Proof::Insecure)
                    && records.iter().all(|r| r.proof != Proof::Bogus)
                {
                    if self.zone_is_signed(name).await {
                        return TlsaAnswer::Failed(format!(
                            "TLSA records at {name} do not validate in a signed zone (bogus)"
                        ));
                    }
                    return TlsaAnswer::NotApplicable;
                }
                if let Some(bad) = records.iter().find(|r| r.proof != Proof::Secure) {
                    return TlsaAnswer::Failed(format!(
                        "TLSA records at {name} do not validate ({})",
                        bad.proof
                    ));
                }
                TlsaAnswer::Secure(
                    records
                        .iter()
                        .filter_map(|r| tlsa_record(&r.data))
                        .collect(),
                )
            }
            // A validated (or insecure) denial: no TLSA.
            Err(e) if e.is_no_records_found() || e.is_nx_domain() => TlsaAnswer::NotApplicable,
            Err(NetError::Dns(hickory_resolver::net::DnsError::DnssecBogus)) => {
                TlsaAnswer::Failed(format!("TLSA records at {name} do not validate (bogus)"))
            }
            Err(e) => TlsaAnswer::Failed(format!("TLSA lookup for {name}: {e}")),
        }
    }

    /// Whether the zone holding `name` validates as signed: the SOA of
    /// its apex (the nearest name above it that has one) is proven secure.
    async fn zone_is_signed(&self, name: &str) -> bool {
        use hickory_resolver::proto::dnssec::Proof;
        use hickory_resolver::proto::rr::RecordType;
        let mut candidate = name.trim_end_matches('.');
        loop {
            if let Ok(absolute_name) = absolute(candidate) {
                if let Ok(lookup) = self.validating.lookup(absolute_name, RecordType::SOA).await {
                    let soas: Vec<_> = lookup
                        .answers()
                        .iter()
                        .filter(|r| r.record_type() == RecordType::SOA)
                        .collect();
                    if !soas.is_empty() {
                        return soas.iter().all(|r| r.proof == Proof::Secure);
                    }
                }
            }
            match candidate.split_once('.') {
                Some((_, parent)) if !parent.is_empty() => candidate = parent,
                _ => return false,
            }
        }
    }
}

fn tlsa_record(data: &hickory_resolver::proto::rr::RData) -> Option<TlsaRecord> {
    match data {
        hickory_resolver::proto::rr::RData::TLSA(t) => Some(TlsaRecord {
            usage: t.cert_usage.into(),
            selector: t.selector.into(),
            matching: t.matching.into(),
            data: t.cert_data.clone(),
        }),
        _ => None,
    }
}

fn build_resolver(
    servers: &[SocketAddr],
    opts: ResolverOpts,
    trust: Option<std::sync::Arc<hickory_resolver::proto::dnssec::TrustAnchors>>,
) -> Result<TokioResolver, DnsError> {
    let mut builder = if servers.is_empty() {
        TokioResolver::builder_tokio()
            .map_err(|e| DnsError::Temporary(format!("system resolver configuration: {e}")))?
    } else {
        let name_servers = servers
            .iter()
            .map(|s| {
                let mut udp = ConnectionConfig::udp();
                udp.port = s.port();
                let mut tcp = ConnectionConfig::tcp();
                tcp.port = s.port();
                NameServerConfig::new(s.ip(), true, vec![udp, tcp])
            })
            .collect();
        TokioResolver::builder_with_config(
            ResolverConfig::from_name_servers(name_servers),
            TokioRuntimeProvider::default(),
        )
    };
    *builder.options_mut() = opts;
    if let Some(t) = trust {
        builder = builder.with_trust_anchor(t);
    }
    builder
        .build()
        .map_err(|e| DnsError::Temporary(format!("DNS resolver: {e}")))
}

/// Trust anchors from DNSKEY records as written in zone files: the zone's
/// name, then the RDATA (`example.org. [IN DNSKEY] 257 3 13 BASE64…`). A
/// bare RDATA (no name) is a key of the root zone: a private root.
pub fn trust_anchors(
    anchors: &[String],
) -> Result<hickory_resolver::proto::dnssec::TrustAnchors, DnsError> {
    use base64::Engine as _;
    use hickory_resolver::proto::dnssec::{Algorithm, PublicKeyBuf, TrustAnchors};
    use hickory_resolver::proto::rr::LowerName;
    let mut trust = TrustAnchors::empty();
    for a in anchors {
        let bad = || {
            DnsError::Temporary(format!(
                "invalid DNSSEC trust anchor {a:?}: expected \"ZONE. 257 3 ALGORITHM BASE64\""
            ))
        };
        let mut fields: Vec<&str> = a.split_whitespace().collect();
        // Hickory matches an anchor only at its own zone (0.26).
        let zone = match fields.first() {
            Some(first) if first.parse::<u16>().is_err() => {
                let zone = absolute(first).map_err(|_| bad())?;
                fields.remove(0);
                fields
                    .retain(|f| !f.eq_ignore_ascii_case("IN") && !f.eq_ignore_ascii_case("DNSKEY"));
                zone
            }
            _ => Name::root(),
        };
        let [_, _, algorithm, key @ ..] = fields.as_slice() else {
            return Err(bad());
        };
        let algorithm: u8 = algorithm.parse().map_err(|_| bad())?;
        let key = base64::engine::general_purpose::STANDARD
            .decode(key.concat())
            .map_err(|_| bad())?;
        if key.is_empty() {
            return Err(bad());
        }
        trust.insert_with_name(
            &PublicKeyBuf::new(key, Algorithm::from_u8(algorithm)),
            LowerName::new(&zone),
        );
    }
    Ok(trust)
}

fn absolute(name: &str) -> Result<Name, DnsError> {
    let fqdn = if name.ends_with('.') {
        name.to_string()
    } else {
        format!("{name}.")
    };
    Name::from_utf8(&fqdn).map_err(|e| DnsError::Temporary(format!("invalid name {name:?}: {e}")))
}

fn classify(e: &NetError) -> DnsError {
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
            .answers()
            .iter()
            .filter_map(|r| match &r.data {
                RData::MX(mx) => Some(MxRecord {
                    preference: mx.preference,
                    exchange: host_string(&mx.exchange),
                }),
                _ => None,
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
        use hickory_resolver::proto::rr::RecordType;
        let lookup = self
            .inner
            .lookup(absolute(name)?, RecordType::TLSA)
            .await
            .map_err(|e| classify(&e))?;
        let records: Vec<TlsaRecord> = lookup
            .answers()
            .iter()
            .filter_map(|r| tlsa_record(&r.data))
            .collect();
        if records.is_empty() {
            return Err(DnsError::NoRecords);
        }
        Ok(records)
    }

    async fn tlsa_validated(&self, name: &str) -> TlsaAnswer {
        self.validated_tlsa(name).await
    }

    async fn txt(&self, name: &str) -> Result<Vec<String>, DnsError> {
        let lookup = self
            .inner
            .txt_lookup(absolute(name)?)
            .await
            .map_err(|e| classify(&e))?;
        Ok(lookup
            .answers()
            .iter()
            .filter_map(|r| match &r.data {
                RData::TXT(t) => Some(t),
                _ => None,
            })
            .map(|t| {
                t.txt_data
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
        let ttl = lookup.answers().iter().map(|r| r.ttl).min().unwrap_or(0);
        Ok(AAnswer {
            addrs: lookup
                .answers()
                .iter()
                .filter_map(|r| match &r.data {
                    RData::A(a) => Some(a.0),
                    _ => None,
                })
                .collect(),
            ttl: Duration::from_secs(u64::from(ttl)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str =
        "mdsswUyr3DPW132mOi8V9xESWE8jTo0dxCjjnopKl+GqJxpVXckHAeF+KkxLbxILfDLUT0rAK9iUzy1L53eKGQ==";

    #[test]
    fn trust_anchors_name_their_zone_or_are_root_keys() {
        use base64::Engine as _;
        use hickory_resolver::proto::dnssec::{Algorithm, PublicKeyBuf};
        use hickory_resolver::proto::rr::LowerName;
        let key = PublicKeyBuf::new(
            base64::engine::general_purpose::STANDARD
                .decode(KEY)
                .expect("base64"),
            Algorithm::ECDSAP256SHA256,
        );
        let zone = |n: &str| LowerName::new(&absolute(n).expect("name"));
        for written in [
            format!("corp.example. IN DNSKEY 257 3 13 {KEY}"),
            format!("corp.example 257 3 13 {KEY}"),
        ] {
            let named = trust_anchors(&[written]).expect("named anchor");
            assert!(named.contains_with_name(&key, &zone("corp.example")));
            assert!(!named.contains_with_name(&key, &zone("other.example")));
            assert!(!named.contains(&key), "a named anchor is not a root key");
        }
        let root = trust_anchors(&[format!("257 3 13 {KEY}")]).expect("root anchor");
        assert!(root.contains(&key));
    }

    #[test]
    fn a_malformed_trust_anchor_is_refused() {
        for bad in [
            "",
            "corp.example.",
            "257 3 x AAAA",
            "corp.example. 257 3 13",
            "257 3 13 !!",
        ] {
            assert!(trust_anchors(&[bad.to_string()]).is_err(), "{bad:?}");
        }
    }
}
