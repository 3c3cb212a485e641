//! Where a domain's mail goes (RFC 5321 §5.1): explicit primaries, static
//! routes, or MX records sorted by preference with equal preferences
//! shuffled; our own MX and everything at or above its preference dropped
//! so we never deliver to ourselves or another backup; implicit MX when
//! there are no MX records; null MX (RFC 7505) refused.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use rand::seq::SliceRandom;

use crate::dns::{DnsError, MxRecord, Resolver};
use crate::domain::NextHop;

/// One host to try, with its addresses in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Host name (for TLS SNI and logs) or IP literal.
    pub host: String,
    pub addrs: Vec<SocketAddr>,
}

/// Why no target could be found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// Bounce: `status` is the RFC 3463 code for the DSN.
    #[error("{status} {text}")]
    Permanent { status: &'static str, text: String },
    #[error("{0}")]
    Transient(String),
}

/// Who we are, to recognise ourselves in MX lists.
#[derive(Debug, Clone)]
pub struct SelfIdentity {
    pub hostname: String,
    pub listen: Vec<SocketAddr>,
    /// Port MX hosts are contacted on (25 in production).
    pub mx_port: u16,
}

impl SelfIdentity {
    fn is_self(&self, host: &str, addrs: &[SocketAddr]) -> bool {
        if host.eq_ignore_ascii_case(self.hostname.trim_end_matches('.')) {
            return true;
        }
        addrs.iter().any(|a| {
            self.listen.iter().any(|l| {
                l.port() == a.port()
                    && (l.ip() == a.ip() || (l.ip().is_unspecified() && a.ip().is_loopback()))
            })
        })
    }
}

async fn resolve_host(
    resolver: &dyn Resolver,
    host: &str,
    port: u16,
) -> Result<Vec<SocketAddr>, DnsError> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    let ips = resolver.ips(host).await?;
    Ok(ips
        .into_iter()
        .map(|ip| SocketAddr::new(ip, port))
        .collect())
}

/// Targets for explicitly configured `host[:port]` next hops. A name that
/// does not resolve is an operator's mistake to fix, so it is retried.
pub async fn explicit_targets(
    resolver: &dyn Resolver,
    hops: &[String],
    default_port: u16,
) -> Result<Vec<Target>, RouteError> {
    let mut targets = Vec::new();
    let mut last_error = String::from("no next hop configured");
    for hop in hops {
        // Validated when it was set; a stored record is read again here.
        let Ok(NextHop { host, port }) = NextHop::parse(hop) else {
            last_error = format!("invalid next hop {hop:?}");
            continue;
        };
        let port = port.unwrap_or(default_port);
        match resolve_host(resolver, &host, port).await {
            Ok(addrs) => targets.push(Target { host, addrs }),
            Err(e) => last_error = format!("{host}: {e}"),
        }
    }
    if targets.is_empty() {
        return Err(RouteError::Transient(last_error));
    }
    Ok(targets)
}

/// Orders MX records by preference, shuffling equal ones (RFC 5321 §5.1).
pub fn order_mx(mut records: Vec<MxRecord>) -> Vec<MxRecord> {
    records.shuffle(&mut rand::rng());
    records.sort_by_key(|r| r.preference);
    records
}

/// Targets for a domain from DNS.
pub async fn mx_targets(
    resolver: &dyn Resolver,
    me: &SelfIdentity,
    domain: &str,
) -> Result<Vec<Target>, RouteError> {
    let records = match resolver.mx(domain).await {
        Ok(r) => r,
        Err(DnsError::NoRecords) => vec![MxRecord {
            preference: 0,
            exchange: domain.to_string(),
        }],
        Err(DnsError::NxDomain) => {
            return Err(RouteError::Permanent {
                status: "5.1.2",
                text: format!("domain {domain} does not exist"),
            })
        }
        Err(e) => {
            return Err(RouteError::Transient(format!(
                "MX lookup for {domain}: {e}"
            )))
        }
    };
    if records.iter().any(|r| r.exchange.is_empty()) {
        return Err(RouteError::Permanent {
            status: "5.1.10",
            text: format!("domain {domain} does not accept mail (null MX, RFC 7505)"),
        });
    }
    let ordered = order_mx(records);
    let mut resolved = Vec::new();
    let mut transient = None;
    for mx in &ordered {
        match resolve_host(resolver, &mx.exchange, me.mx_port).await {
            Ok(addrs) => resolved.push((
                mx.preference,
                Target {
                    host: mx.exchange.clone(),
                    addrs,
                },
            )),
            Err(e) => {
                if e.is_transient() {
                    transient = Some(format!("{}: {e}", mx.exchange));
                }
                resolved.push((
                    mx.preference,
                    Target {
                        host: mx.exchange.clone(),
                        addrs: Vec::new(),
                    },
                ));
            }
        }
    }
    // RFC 5321 §5.1: if we are in the list, only strictly better MXs count.
    if let Some(own) = resolved
        .iter()
        .filter(|(_, t)| me.is_self(&t.host, &t.addrs))
        .map(|(p, _)| *p)
        .min()
    {
        resolved.retain(|(p, _)| *p < own);
        if resolved.is_empty() {
            return Err(RouteError::Permanent {
                status: "5.4.6",
                text: format!("mail for {domain} loops back to myself"),
            });
        }
    }
    let targets: Vec<Target> = resolved
        .into_iter()
        .map(|(_, t)| t)
        .filter(|t| !t.addrs.is_empty())
        .collect();
    if targets.is_empty() {
        return Err(match transient {
            Some(e) => RouteError::Transient(e),
            None => RouteError::Permanent {
                status: "5.4.4",
                text: format!("no MX host of {domain} has an address"),
            },
        });
    }
    Ok(targets)
}

/// Explicit primaries first, then a static route, then DNS.
pub async fn targets(
    resolver: &dyn Resolver,
    me: &SelfIdentity,
    routes: &BTreeMap<String, String>,
    domain: &str,
    primaries: &[String],
) -> Result<Vec<Target>, RouteError> {
    if !primaries.is_empty() {
        return explicit_targets(resolver, primaries, me.mx_port).await;
    }
    if let Some(hop) = routes.get(domain) {
        return explicit_targets(resolver, std::slice::from_ref(hop), me.mx_port).await;
    }
    mx_targets(resolver, me, domain).await
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use async_trait::async_trait;

    use super::*;
    use crate::dns::AAnswer;

    #[derive(Default)]
    struct FakeDns {
        mx: HashMap<String, Result<Vec<MxRecord>, DnsError>>,
        ips: HashMap<String, Vec<IpAddr>>,
    }

    #[async_trait]
    impl Resolver for FakeDns {
        async fn mx(&self, domain: &str) -> Result<Vec<MxRecord>, DnsError> {
            self.mx
                .get(domain)
                .cloned()
                .unwrap_or(Err(DnsError::NxDomain))
        }
        async fn ips(&self, host: &str) -> Result<Vec<IpAddr>, DnsError> {
            self.ips.get(host).cloned().ok_or(DnsError::NxDomain)
        }
        async fn a(&self, _: &str) -> Result<AAnswer, DnsError> {
            Err(DnsError::NxDomain)
        }
    }

    fn mx(p: u16, h: &str) -> MxRecord {
        MxRecord {
            preference: p,
            exchange: h.into(),
        }
    }

    fn me() -> SelfIdentity {
        SelfIdentity {
            hostname: "mx2.test".into(),
            listen: vec!["127.0.0.9:25".parse().unwrap()],
            mx_port: 25,
        }
    }

    fn dns() -> FakeDns {
        let mut d = FakeDns::default();
        for (h, ip) in [
            ("mx1.test", "127.0.0.1"),
            ("mx2.test", "127.0.0.9"),
            ("mx3.test", "127.0.0.3"),
            ("alias.test", "127.0.0.9"),
        ] {
            d.ips.insert(h.into(), vec![ip.parse().unwrap()]);
        }
        d
    }

    async fn hosts(d: &FakeDns, domain: &str) -> Result<Vec<String>, RouteError> {
        mx_targets(d, &me(), domain)
            .await
            .map(|t| t.into_iter().map(|t| t.host).collect())
    }

    #[tokio::test]
    async fn mx_table() {
        let mut d = dns();
        d.mx.insert(
            "sorted.test".into(),
            Ok(vec![mx(20, "mx3.test"), mx(10, "mx1.test")]),
        );
        d.mx.insert(
            "withus.test".into(),
            Ok(vec![
                mx(10, "mx1.test"),
                mx(20, "mx2.test"),
                mx(30, "mx3.test"),
            ]),
        );
        d.mx.insert(
            "onlyus.test".into(),
            Ok(vec![mx(10, "mx2.test"), mx(20, "mx3.test")]),
        );
        d.mx.insert(
            "byaddr.test".into(),
            Ok(vec![mx(5, "alias.test"), mx(1, "mx1.test")]),
        );
        d.mx.insert("null.test".into(), Ok(vec![mx(0, "")]));
        d.mx.insert("none.test".into(), Err(DnsError::NoRecords));
        d.ips
            .insert("none.test".into(), vec!["127.0.0.5".parse().unwrap()]);
        d.mx.insert(
            "flaky.test".into(),
            Err(DnsError::Temporary("timeout".into())),
        );
        d.mx.insert("ghost.test".into(), Ok(vec![mx(10, "nowhere.test")]));
        assert_eq!(
            hosts(&d, "sorted.test").await.unwrap(),
            ["mx1.test", "mx3.test"]
        );
        assert_eq!(hosts(&d, "withus.test").await.unwrap(), ["mx1.test"]);
        assert_eq!(hosts(&d, "byaddr.test").await.unwrap(), ["mx1.test"]);
        assert_eq!(hosts(&d, "none.test").await.unwrap(), ["none.test"]);
        for (domain, expected) in [
            ("onlyus.test", "5.4.6"),
            ("null.test", "5.1.10"),
            ("missing.test", "5.1.2"),
            ("ghost.test", "5.4.4"),
        ] {
            match hosts(&d, domain).await {
                Err(RouteError::Permanent { status, .. }) => {
                    assert_eq!(status, expected, "{domain}")
                }
                other => panic!("{domain}: {other:?}"),
            }
        }
        assert!(matches!(
            hosts(&d, "flaky.test").await,
            Err(RouteError::Transient(_))
        ));
    }

    #[tokio::test]
    async fn equal_preferences_are_shuffled() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..64 {
            let order: Vec<String> =
                order_mx(vec![mx(10, "a"), mx(10, "b"), mx(10, "c"), mx(5, "first")])
                    .into_iter()
                    .map(|m| m.exchange)
                    .collect();
            assert_eq!(order[0], "first");
            seen.insert(order);
        }
        assert!(seen.len() > 1, "never shuffled");
    }

    #[tokio::test]
    async fn explicit_primaries_and_routes_win_over_mx() {
        let d = dns();
        let routes = BTreeMap::from([("routed.test".to_string(), "127.0.0.7:2626".to_string())]);
        let t = targets(
            &d,
            &me(),
            &routes,
            "any.test",
            &["mx1.test:2525".into(), "[::1]:26".into()],
        )
        .await
        .unwrap();
        assert_eq!(t[0].addrs, vec!["127.0.0.1:2525".parse().unwrap()]);
        assert_eq!(t[1].addrs, vec!["[::1]:26".parse().unwrap()]);
        let t = targets(&d, &me(), &routes, "routed.test", &[])
            .await
            .unwrap();
        assert_eq!(t[0].addrs, vec!["127.0.0.7:2626".parse().unwrap()]);
        assert!(matches!(
            targets(&d, &me(), &routes, "x.test", &["nowhere.test".into()]).await,
            Err(RouteError::Transient(_))
        ));
    }
}
