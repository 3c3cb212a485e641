//! Limits on what a client can learn about a domain's users through us.
//!
//! A backup MX with callouts answers "does this user exist?" for the
//! primary, and the primary sees only our address: its own per-client
//! limits never apply. Without limits a harvester checks a directory at
//! the speed of the callout cache. Two limits close that:
//!
//! - **Unknown-recipient penalty** (as Postfix's anvil and
//!   `smtpd_hard_error_limit`): a client (an IPv4 address, or an IPv6
//!   /64) that collects `limit` unknown-user refusals within `window`,
//!   across sessions, is refused for `penalty`: `421` to new sessions,
//!   `451` to further recipients.
//! - **Callout rates**: token buckets per client and per domain. A callout
//!   beyond them is not made; the recipient gets `451 4.7.1` (try later),
//!   not a verdict.
//!
//! State is per process (each ingest container keeps its own), bounded in
//! size; a client that cannot be tracked is not limited (fails open).

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::address::DomainName;
use crate::sync::Mutex;

/// Clients tracked at most; past it, idle ones are forgotten first and new
/// ones go untracked.
const MAX_CLIENTS: usize = 100_000;

/// A throttle is logged at most this often per client or domain.
const LOG_EVERY: Duration = Duration::from_secs(60);

/// `[smtp] unknown_recipient_*` and `[recipient_verify] callouts_*`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HarvestSettings {
    /// Unknown-user refusals within `window` that start a penalty; 0 turns
    /// the penalty off.
    pub unknown_recipient_limit: u32,
    pub unknown_recipient_window: Duration,
    /// How long a penalised client is refused.
    pub penalty: Duration,
    /// Callouts per second for one client (0: no limit), and how many it
    /// may make at once after being quiet.
    pub client_callout_rate: f64,
    pub client_callout_burst: f64,
    /// Callouts per second to one domain's primary, all clients together
    /// (0: no limit).
    pub domain_callout_rate: f64,
}

impl Default for HarvestSettings {
    fn default() -> Self {
        HarvestSettings {
            unknown_recipient_limit: 20,
            unknown_recipient_window: Duration::from_secs(600),
            penalty: Duration::from_secs(600),
            client_callout_rate: 5.0,
            client_callout_burst: 20.0,
            domain_callout_rate: 20.0,
        }
    }
}

/// Why a callout was not made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Throttled {
    /// The client asked too fast.
    Client,
    /// All clients together asked this domain too fast.
    Domain,
}

impl Throttled {
    pub fn label(self) -> &'static str {
        match self {
            Throttled::Client => "throttled_client",
            Throttled::Domain => "throttled_domain",
        }
    }
}

/// A token bucket: `rate` tokens a second up to `burst`.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
    /// When this bucket's throttling was last logged.
    logged: Option<Instant>,
}

impl Bucket {
    fn full(burst: f64, now: Instant) -> Self {
        Bucket {
            tokens: burst,
            at: now,
            logged: None,
        }
    }

    /// Refills for the time since the last look; whether a token is there.
    fn refill(&mut self, rate: f64, burst: f64, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        self.at = now;
        self.tokens >= 1.0
    }

    /// `true` the first time in a while: the caller logs.
    fn should_log(&mut self, now: Instant) -> bool {
        if self
            .logged
            .is_some_and(|at| now.saturating_duration_since(at) < LOG_EVERY)
        {
            return false;
        }
        self.logged = Some(now);
        true
    }
}

#[derive(Debug)]
struct Client {
    /// When its recent unknown-user refusals were (at most `limit`).
    unknown: VecDeque<Instant>,
    penalised_until: Option<Instant>,
    callouts: Bucket,
    last_seen: Instant,
}

/// What [`HarvestGuard::unknown_recipient`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counted {
    /// Counted; no penalty yet.
    Counted,
    /// This refusal started a penalty.
    PenaltyStarts,
}

/// The limits, shared by every session of a process.
#[derive(Debug)]
pub struct HarvestGuard {
    settings: HarvestSettings,
    clients: Mutex<HashMap<IpAddr, Client>>,
    domains: Mutex<HashMap<DomainName, Bucket>>,
}

impl HarvestGuard {
    pub fn new(settings: HarvestSettings) -> Self {
        HarvestGuard {
            settings,
            clients: Mutex::new(HashMap::new()),
            domains: Mutex::new(HashMap::new()),
        }
    }

    pub fn settings(&self) -> &HarvestSettings {
        &self.settings
    }

    /// Whether `client` is serving a penalty at `now`.
    pub fn penalised(&self, client: IpAddr, now: Instant) -> bool {
        self.clients
            .lock()
            .get(&key(client))
            .and_then(|c| c.penalised_until)
            .is_some_and(|until| now < until)
    }

    /// `client` got an unknown-user refusal at `now`.
    pub fn unknown_recipient(&self, client: IpAddr, now: Instant) -> Counted {
        let s = self.settings;
        if s.unknown_recipient_limit == 0 {
            return Counted::Counted;
        }
        let mut clients = self.clients.lock();
        let Some(c) = client_entry(&mut clients, &s, client, now) else {
            return Counted::Counted;
        };
        if c.penalised_until.is_some_and(|until| now < until) {
            return Counted::Counted;
        }
        while c
            .unknown
            .front()
            .is_some_and(|&at| now.saturating_duration_since(at) >= s.unknown_recipient_window)
        {
            c.unknown.pop_front();
        }
        c.unknown.push_back(now);
        if c.unknown.len() >= s.unknown_recipient_limit as usize {
            c.unknown.clear();
            c.penalised_until = Some(now + s.penalty);
            return Counted::PenaltyStarts;
        }
        Counted::Counted
    }

    /// Takes a callout from `client` to `domain`'s primary at `now`, or
    /// says which limit it is over; the `bool` is whether to log it (once
    /// a minute per client or domain).
    pub fn take_callout(
        &self,
        client: IpAddr,
        domain: &DomainName,
        now: Instant,
    ) -> Result<(), (Throttled, bool)> {
        let s = self.settings;
        // Both locks at once, always in this order: a callout refused by
        // one limit must not spend the other's token (a harvester would
        // drain the domain's budget for everyone).
        let mut clients = self.clients.lock();
        let mut domains = self.domains.lock();
        let client_bucket = if s.client_callout_rate > 0.0 {
            let burst = s.client_callout_burst.max(1.0);
            match client_entry(&mut clients, &s, client, now) {
                Some(c) => {
                    if !c.callouts.refill(s.client_callout_rate, burst, now) {
                        return Err((Throttled::Client, c.callouts.should_log(now)));
                    }
                    Some(&mut c.callouts)
                }
                None => None,
            }
        } else {
            None
        };
        if s.domain_callout_rate > 0.0 {
            let burst = s.domain_callout_rate.max(1.0);
            let b = domains
                .entry(domain.clone())
                .or_insert_with(|| Bucket::full(burst, now));
            if !b.refill(s.domain_callout_rate, burst, now) {
                return Err((Throttled::Domain, b.should_log(now)));
            }
            b.tokens -= 1.0;
        }
        if let Some(c) = client_bucket {
            c.tokens -= 1.0;
        }
        Ok(())
    }
}

/// IPv6 clients are limited per /64: one host holds a whole /64.
fn key(client: IpAddr) -> IpAddr {
    match client {
        IpAddr::V4(_) => client,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let bits = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(bits.into())
            }
        },
    }
}

fn client_entry<'a>(
    clients: &'a mut HashMap<IpAddr, Client>,
    s: &HarvestSettings,
    client: IpAddr,
    now: Instant,
) -> Option<&'a mut Client> {
    let k = key(client);
    if !clients.contains_key(&k) && clients.len() >= MAX_CLIENTS {
        let keep = s.unknown_recipient_window.max(s.penalty);
        clients.retain(|_, c| {
            c.penalised_until.is_some_and(|until| now < until)
                || now.saturating_duration_since(c.last_seen) < keep
        });
        if clients.len() >= MAX_CLIENTS {
            return None;
        }
    }
    let c = clients.entry(k).or_insert_with(|| Client {
        unknown: VecDeque::new(),
        penalised_until: None,
        callouts: Bucket::full(s.client_callout_burst.max(1.0), now),
        last_seen: now,
    });
    c.last_seen = now;
    Some(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn d(s: &str) -> DomainName {
        DomainName::parse(s).unwrap()
    }

    #[test]
    fn twenty_unknown_recipients_in_ten_minutes_start_a_ten_minute_penalty() {
        let g = HarvestGuard::new(HarvestSettings::default());
        let t0 = Instant::now();
        let client = ip("192.0.2.1");
        for i in 0..19 {
            let at = t0 + Duration::from_secs(i * 30);
            assert_eq!(g.unknown_recipient(client, at), Counted::Counted);
            assert!(!g.penalised(client, at));
        }
        let at = t0 + Duration::from_secs(19 * 30);
        assert_eq!(g.unknown_recipient(client, at), Counted::PenaltyStarts);
        assert!(g.penalised(client, at));
        assert!(!g.penalised(ip("192.0.2.2"), at), "another client is not");
        assert!(g.penalised(client, at + Duration::from_secs(599)));
        assert!(!g.penalised(client, at + Duration::from_secs(600)));
    }

    #[test]
    fn unknown_recipients_spread_beyond_the_window_never_add_up() {
        let g = HarvestGuard::new(HarvestSettings::default());
        let t0 = Instant::now();
        for i in 0..100 {
            // One every 31 s: at most 19 within any ten minutes.
            let at = t0 + Duration::from_secs(i * 32);
            assert_eq!(g.unknown_recipient(ip("192.0.2.1"), at), Counted::Counted);
        }
    }

    #[test]
    fn an_ipv6_slash_64_is_one_client() {
        let g = HarvestGuard::new(HarvestSettings {
            unknown_recipient_limit: 2,
            ..HarvestSettings::default()
        });
        let t0 = Instant::now();
        g.unknown_recipient(ip("2001:db8:1:2::1"), t0);
        g.unknown_recipient(ip("2001:db8:1:2:ffff::9"), t0);
        assert!(g.penalised(ip("2001:db8:1:2::77"), t0));
        assert!(!g.penalised(ip("2001:db8:1:3::1"), t0));
    }

    #[test]
    fn a_limit_of_zero_turns_the_penalty_off() {
        let g = HarvestGuard::new(HarvestSettings {
            unknown_recipient_limit: 0,
            ..HarvestSettings::default()
        });
        let t0 = Instant::now();
        for _ in 0..100 {
            g.unknown_recipient(ip("192.0.2.1"), t0);
        }
        assert!(!g.penalised(ip("192.0.2.1"), t0));
    }

    #[test]
    fn a_client_gets_its_burst_then_its_rate() {
        let g = HarvestGuard::new(HarvestSettings {
            domain_callout_rate: 0.0,
            ..HarvestSettings::default()
        });
        let t0 = Instant::now();
        let (client, domain) = (ip("192.0.2.1"), d("example.test"));
        for _ in 0..20 {
            assert_eq!(g.take_callout(client, &domain, t0), Ok(()));
        }
        assert_eq!(
            g.take_callout(client, &domain, t0),
            Err((Throttled::Client, true))
        );
        assert_eq!(
            g.take_callout(client, &domain, t0),
            Err((Throttled::Client, false)),
            "logged once"
        );
        assert!(g.take_callout(ip("192.0.2.2"), &domain, t0).is_ok());
        // 5 a second refill.
        let later = t0 + Duration::from_secs(1);
        for _ in 0..5 {
            assert_eq!(g.take_callout(client, &domain, later), Ok(()));
        }
        assert!(g.take_callout(client, &domain, later).is_err());
    }

    #[test]
    fn all_clients_together_stay_under_the_domain_rate() {
        let g = HarvestGuard::new(HarvestSettings::default());
        let t0 = Instant::now();
        let domain = d("example.test");
        let mut made = 0;
        // 1 000 clients, one callout each, over 10 seconds.
        for i in 0..1000u32 {
            let at = t0 + Duration::from_millis(u64::from(i) * 10);
            let client = IpAddr::from(std::net::Ipv4Addr::from(0x0A00_0000 + i));
            match g.take_callout(client, &domain, at) {
                Ok(()) => made += 1,
                Err((why, _)) => assert_eq!(why, Throttled::Domain),
            }
        }
        // 20 at once, then 20 a second for ~10 s.
        assert!((200..=221).contains(&made), "{made}");
        assert_eq!(
            g.take_callout(ip("192.0.2.9"), &d("other.test"), t0),
            Ok(())
        );
        // Refused by the domain's limit, a client keeps its own tokens.
        let g = HarvestGuard::new(HarvestSettings {
            domain_callout_rate: 1.0,
            client_callout_burst: 2.0,
            ..HarvestSettings::default()
        });
        let client = ip("192.0.2.7");
        assert!(g.take_callout(client, &domain, t0).is_ok());
        for _ in 0..10 {
            assert_eq!(
                g.take_callout(client, &domain, t0).unwrap_err().0,
                Throttled::Domain
            );
        }
        assert!(g.take_callout(client, &d("other.test"), t0).is_ok());
    }
}
