//! DNS blocklists (RFC 5782) and allowlists.
//!
//! A client address is looked up in every configured zone at once when it
//! connects; the weights of the zones that list it are added up and
//! compared to the threshold at RCPT time. Answers outside 127.0.0.0/8,
//! and 127.255.255.0/24 (Spamhaus' "refused / public resolver / rate
//! limited" codes), are errors, never listings. Timeouts and errors fail
//! open. Answers are cached for their TTL (with a floor).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use crate::sync::Mutex;
use std::time::{Duration, Instant};

use crate::dns::{DnsError, Resolver};

/// One configured zone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZoneConfig {
    pub zone: String,
    pub weight: u32,
    /// Answers that count as a listing; empty means any valid answer.
    pub codes: Vec<Ipv4Addr>,
}

/// The answer of one zone for one address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ZoneAnswer {
    Listed(Ipv4Addr),
    NotListed,
    /// Not a listing: a refusal, a bogus answer, a timeout.
    Error(String),
}

/// The reverse-order query name (RFC 5782 §2.1 for IPv4, §2.4 for IPv6).
pub fn query_name(ip: IpAddr, zone: &str) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            format!("{}.{}.{}.{}.{zone}", o[3], o[2], o[1], o[0])
        }
        IpAddr::V6(v6) => {
            let mut name = String::with_capacity(64 + zone.len());
            for byte in v6.octets().iter().rev() {
                name.push_str(&format!("{:x}.{:x}.", byte & 0xf, byte >> 4));
            }
            name.push_str(zone);
            name
        }
    }
}

/// Interprets the A records of a DNSBL answer.
pub fn interpret(answers: &[Ipv4Addr], codes: &[Ipv4Addr]) -> ZoneAnswer {
    if answers.is_empty() {
        return ZoneAnswer::NotListed;
    }
    for a in answers {
        let o = a.octets();
        if o[0] != 127 {
            return ZoneAnswer::Error(format!("answer {a} is outside 127.0.0.0/8"));
        }
        if o[1] == 255 && o[2] == 255 {
            return ZoneAnswer::Error(format!(
                "answer {a}: the list operator refused the query (public resolver or rate limit?)"
            ));
        }
    }
    match answers
        .iter()
        .find(|a| codes.is_empty() || codes.contains(a))
    {
        Some(a) => ZoneAnswer::Listed(*a),
        None => ZoneAnswer::NotListed,
    }
}

/// The verdict on one client.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verdict {
    /// `(zone, answer)` of every zone that lists the client.
    pub listed: Vec<(String, Ipv4Addr)>,
    pub score: u32,
    /// Listed on an allowlist zone.
    pub allowlisted: bool,
}

impl Verdict {
    pub fn rejects(&self, threshold: u32) -> bool {
        threshold > 0 && self.score >= threshold
    }
}

struct Cached {
    answer: ZoneAnswer,
    until: Instant,
}

/// Most cache entries before the cache is emptied.
const CACHE_LIMIT: usize = 100_000;

/// The blocklist checker, shared by all sessions.
pub struct Dnsbl {
    zones: Vec<ZoneConfig>,
    allow_zones: Vec<ZoneConfig>,
    pub threshold: u32,
    resolver: Arc<dyn Resolver>,
    min_ttl: Duration,
    cache: Mutex<HashMap<(IpAddr, String), Cached>>,
    /// Zones that failed their self-test and are skipped until they pass.
    disabled: Mutex<Vec<String>>,
}

impl Dnsbl {
    pub fn new(
        zones: Vec<ZoneConfig>,
        allow_zones: Vec<ZoneConfig>,
        threshold: u32,
        resolver: Arc<dyn Resolver>,
        min_ttl: Duration,
    ) -> Self {
        Dnsbl {
            zones,
            allow_zones,
            threshold,
            resolver,
            min_ttl,
            cache: Mutex::new(HashMap::new()),
            disabled: Mutex::new(Vec::new()),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.zones.is_empty() && self.allow_zones.is_empty()
    }

    fn is_disabled(&self, zone: &str) -> bool {
        self.disabled.lock().iter().any(|z| z == zone)
    }

    /// One zone, through the cache.
    pub async fn lookup_zone(&self, ip: IpAddr, zone: &ZoneConfig) -> ZoneAnswer {
        let key = (ip, zone.zone.clone());
        {
            let cache = self.cache.lock();
            if let Some(c) = cache.get(&key) {
                if c.until > Instant::now() {
                    return c.answer.clone();
                }
            }
        }
        let name = query_name(ip, &zone.zone);
        let (answer, ttl) = match self.resolver.a(&name).await {
            Ok(a) => (interpret(&a.addrs, &zone.codes), a.ttl),
            Err(DnsError::NxDomain | DnsError::NoRecords) => (ZoneAnswer::NotListed, self.min_ttl),
            Err(e) => (ZoneAnswer::Error(e.to_string()), Duration::ZERO),
        };
        let result = match &answer {
            ZoneAnswer::Listed(_) => "listed",
            ZoneAnswer::NotListed => "clean",
            ZoneAnswer::Error(why) => {
                tracing::warn!(event = "dnsbl_error", zone = %zone.zone, client = %ip, error = %why);
                "error"
            }
        };
        metrics::counter!("backupmx_dnsbl_lookups_total", "zone" => zone.zone.clone(), "result" => result).increment(1);
        // Errors are not cached: the next client gets a fresh try.
        if !matches!(answer, ZoneAnswer::Error(_)) {
            let mut cache = self.cache.lock();
            if cache.len() >= CACHE_LIMIT {
                cache.clear();
            }
            cache.insert(
                key,
                Cached {
                    answer: answer.clone(),
                    until: Instant::now() + ttl.max(self.min_ttl),
                },
            );
        }
        answer
    }

    /// Every zone at once.
    pub async fn check(self: &Arc<Self>, ip: IpAddr) -> Verdict {
        let mut tasks = Vec::new();
        for (allow, zone) in self
            .zones
            .iter()
            .map(|z| (false, z))
            .chain(self.allow_zones.iter().map(|z| (true, z)))
        {
            if self.is_disabled(&zone.zone) {
                continue;
            }
            let me = self.clone();
            let zone = zone.clone();
            tasks.push(tokio::spawn(async move {
                let answer = me.lookup_zone(ip, &zone).await;
                (allow, zone, answer)
            }));
        }
        let mut verdict = Verdict::default();
        for t in tasks {
            let Ok((allow, zone, answer)) = t.await else {
                continue;
            };
            if let ZoneAnswer::Listed(code) = answer {
                if allow {
                    verdict.allowlisted = true;
                } else {
                    verdict.score += zone.weight;
                    verdict.listed.push((zone.zone.clone(), code));
                }
            }
        }
        verdict
    }

    /// RFC 5782 §5: 127.0.0.2 must be listed and 127.0.0.1 must not. A zone
    /// that fails is skipped (with a warning) until it passes again.
    pub async fn self_test(&self) {
        for zone in self.zones.iter().chain(self.allow_zones.iter()) {
            let listed = self
                .resolver
                .a(&query_name(
                    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)),
                    &zone.zone,
                ))
                .await;
            let clean = self
                .resolver
                .a(&query_name(
                    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)),
                    &zone.zone,
                ))
                .await;
            let listed_ok = matches!(&listed, Ok(a) if matches!(interpret(&a.addrs, &[]), ZoneAnswer::Listed(_)));
            let clean_ok = matches!(clean, Err(DnsError::NxDomain | DnsError::NoRecords));
            let ok = listed_ok && clean_ok;
            let mut disabled = self.disabled.lock();
            let was_disabled = disabled.contains(&zone.zone);
            if ok && was_disabled {
                disabled.retain(|z| *z != zone.zone);
                tracing::info!(event = "dnsbl_zone_enabled", zone = %zone.zone);
            } else if !ok && !was_disabled {
                disabled.push(zone.zone.clone());
                tracing::warn!(event = "dnsbl_zone_disabled", zone = %zone.zone, listed_test = ?listed, "zone failed its RFC 5782 self-test and is skipped");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use async_trait::async_trait;

    use super::*;
    use crate::dns::{AAnswer, MxRecord};

    #[test]
    fn query_names_follow_rfc5782() {
        assert_eq!(
            query_name("192.0.2.99".parse().unwrap(), "bl.test"),
            "99.2.0.192.bl.test"
        );
        assert_eq!(
            query_name("2001:db8:1:2:3:4:567:89ab".parse().unwrap(), "bl.test"),
            "b.a.9.8.7.6.5.0.4.0.0.0.3.0.0.0.2.0.0.0.1.0.0.0.8.b.d.0.1.0.0.2.bl.test"
        );
    }

    #[test]
    fn answers_table() {
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        assert_eq!(
            interpret(&[ip("127.0.0.2")], &[]),
            ZoneAnswer::Listed(ip("127.0.0.2"))
        );
        assert_eq!(interpret(&[], &[]), ZoneAnswer::NotListed);
        for refused in ["127.255.255.252", "127.255.255.254", "127.255.255.255"] {
            assert!(
                matches!(interpret(&[ip(refused)], &[]), ZoneAnswer::Error(_)),
                "{refused}"
            );
        }
        assert!(matches!(
            interpret(&[ip("10.0.0.1")], &[]),
            ZoneAnswer::Error(_)
        ));
        assert_eq!(
            interpret(&[ip("127.0.0.10")], &[ip("127.0.0.2")]),
            ZoneAnswer::NotListed
        );
        assert_eq!(
            interpret(&[ip("127.0.0.10"), ip("127.0.0.2")], &[ip("127.0.0.2")]),
            ZoneAnswer::Listed(ip("127.0.0.2"))
        );
    }

    struct Fake {
        queries: AtomicUsize,
    }

    #[async_trait]
    impl Resolver for Fake {
        async fn mx(&self, _: &str) -> Result<Vec<MxRecord>, DnsError> {
            Err(DnsError::NxDomain)
        }
        async fn ips(&self, _: &str) -> Result<Vec<IpAddr>, DnsError> {
            Err(DnsError::NxDomain)
        }
        async fn a(&self, name: &str) -> Result<AAnswer, DnsError> {
            self.queries.fetch_add(1, Ordering::SeqCst);
            let first = name.split('.').next().unwrap_or("");
            let ttl = Duration::from_secs(300);
            match (
                first,
                name.ends_with("good.test"),
                name.ends_with("slow.test"),
            ) {
                (_, _, true) => Err(DnsError::Temporary("timed out".into())),
                ("2", true, _) | ("3", true, _) => Ok(AAnswer {
                    addrs: vec!["127.0.0.2".parse().unwrap()],
                    ttl,
                }),
                ("4", true, _) => Ok(AAnswer {
                    addrs: vec!["127.255.255.254".parse().unwrap()],
                    ttl,
                }),
                _ => Err(DnsError::NxDomain),
            }
        }
    }

    fn zone(z: &str, weight: u32) -> ZoneConfig {
        ZoneConfig {
            zone: z.into(),
            weight,
            codes: vec![],
        }
    }

    #[tokio::test]
    async fn weights_add_up_and_errors_fail_open() {
        let fake = Arc::new(Fake {
            queries: AtomicUsize::new(0),
        });
        let bl = Arc::new(Dnsbl::new(
            vec![
                zone("a.good.test", 1),
                zone("b.good.test", 2),
                zone("x.slow.test", 5),
            ],
            vec![],
            3,
            fake.clone(),
            Duration::from_secs(60),
        ));
        let listed = bl.check("127.0.0.3".parse().unwrap()).await;
        assert_eq!(listed.score, 3);
        assert!(listed.rejects(3));
        let refused = bl.check("127.0.0.4".parse().unwrap()).await;
        assert_eq!(refused.score, 0, "127.255.255.254 is not a listing");
        let clean = bl.check("127.0.0.5".parse().unwrap()).await;
        assert_eq!(clean, Verdict::default());
        // Answers are cached; errors are not.
        let before = fake.queries.load(Ordering::SeqCst);
        bl.check("127.0.0.3".parse().unwrap()).await;
        assert_eq!(
            fake.queries.load(Ordering::SeqCst),
            before + 1,
            "only the erroring zone is asked again"
        );
    }

    #[tokio::test]
    async fn self_test_disables_broken_zones() {
        let fake = Arc::new(Fake {
            queries: AtomicUsize::new(0),
        });
        let bl = Arc::new(Dnsbl::new(
            vec![zone("a.good.test", 1), zone("x.slow.test", 1)],
            vec![],
            1,
            fake,
            Duration::from_secs(60),
        ));
        bl.self_test().await;
        assert!(!bl.is_disabled("a.good.test"));
        assert!(bl.is_disabled("x.slow.test"));
    }

    #[tokio::test]
    async fn allowlists_are_reported() {
        let fake = Arc::new(Fake {
            queries: AtomicUsize::new(0),
        });
        let bl = Arc::new(Dnsbl::new(
            vec![],
            vec![zone("wl.good.test", 0)],
            1,
            fake,
            Duration::from_secs(60),
        ));
        assert!(bl.check("127.0.0.3".parse().unwrap()).await.allowlisted);
        assert!(!bl.check("127.0.0.5".parse().unwrap()).await.allowlisted);
    }
}
