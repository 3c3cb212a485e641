//! Greylisting (RFC 6647) with postgrey's semantics.
//!
//! A triplet (client network, normalised sender, recipient) seen for the
//! first time is deferred with `450 4.2.0`; the same triplet retried after
//! `delay` and within `retry_window` passes and is then let through at once
//! for `max_age`, refreshed on every pass (written at most once a day, so
//! a busy sender does not cost a write per message). A client network that passes
//! often enough is whitelisted as a whole. Time is an argument; state lives
//! behind [`GreylistStore`], and any store failure lets the mail through.

use std::net::IpAddr;
use std::time::Duration;

use async_trait::async_trait;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::address::{Mailbox, ReversePath};
use crate::store::StoreError;

/// State of one triplet. Times are Unix seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TripletState {
    pub first_seen: u64,
    /// Passed and whitelisted until then.
    pub passed_until: Option<u64>,
    /// When the record is useless and may be deleted.
    pub expires: u64,
}

/// State of one client network for auto-whitelisting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientState {
    pub passes: u32,
    /// The last pass that was counted (at most one an hour counts).
    pub last_counted: u64,
    pub expires: u64,
}

/// Where greylisting state lives. Every write is conditional (insert only
/// if absent, replace only if unchanged since it was read), so concurrent
/// sessions and ingest instances never lose each other's updates.
#[async_trait]
pub trait GreylistStore: Send + Sync {
    async fn triplet(&self, key: &str) -> Result<Option<TripletState>, StoreError>;
    /// Returns `false` if the key already existed (nothing written).
    async fn insert_triplet(&self, key: &str, state: &TripletState) -> Result<bool, StoreError>;
    /// Replaces `previous` with `state`; `false` if the record changed meanwhile.
    async fn replace_triplet(
        &self,
        key: &str,
        previous: &TripletState,
        state: &TripletState,
    ) -> Result<bool, StoreError>;
    async fn client(&self, network: &str) -> Result<Option<ClientState>, StoreError>;
    /// Writes `state` if the record is still `previous` (`None`: absent);
    /// `false` if another writer got there first.
    async fn put_client(
        &self,
        network: &str,
        previous: Option<&ClientState>,
        state: &ClientState,
    ) -> Result<bool, StoreError>;
    /// Deletes records that expired before `now`.
    async fn sweep(&self, now: u64) -> Result<(), StoreError>;
}

/// A passing triplet's `passed_until` is rewritten only when it would move
/// by more than this (one day).
const REFRESH_SLACK_SECS: u64 = 86_400;

/// Greylisting settings.
#[derive(Debug, Clone)]
pub struct GreylistSettings {
    pub delay: Duration,
    pub retry_window: Duration,
    pub max_age: Duration,
    pub ipv4_prefix: u8,
    pub ipv6_prefix: u8,
    /// Passes (at most one counted per hour) after which a client network
    /// is whitelisted; 0 turns auto-whitelisting off.
    pub auto_whitelist_after: u32,
    pub whitelist_clients: Vec<IpNet>,
    /// Sender domains (lower-case) never greylisted.
    pub whitelist_sender_domains: Vec<String>,
    /// Recipients (lower-case addresses) never greylisted.
    pub whitelist_recipients: Vec<String>,
}

/// What greylisting decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Let it through: why.
    Pass(PassReason),
    /// `450 4.2.0`: try again later.
    Defer,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PassReason {
    Exempt,
    ClientWhitelisted,
    Retried,
    KnownTriplet,
    /// The store failed: fail open.
    StoreError,
}

/// The client network a triplet is keyed by.
pub fn client_network(ip: IpAddr, settings: &GreylistSettings) -> IpNet {
    let prefix = match ip {
        IpAddr::V4(_) => settings.ipv4_prefix,
        IpAddr::V6(_) => settings.ipv6_prefix,
    };
    // The prefix is validated in config; fall back to the host address.
    IpNet::new(ip, prefix)
        .map(|n| n.trunc())
        .unwrap_or_else(|_| IpNet::from(ip))
}

/// Lower-case; BATV (`prvs=tag=user@`) and SRS-like tags, `+extension` and
/// digit runs (VERP counters) removed from the local part, so one sender's
/// changing bounce addresses form one triplet.
pub fn normalise_sender(sender: &ReversePath) -> String {
    let ReversePath::Mailbox(m) = sender else {
        return String::new();
    };
    let local = m.local.to_lowercase();
    let mut local = local.as_str();
    if let Some(rest) = local
        .strip_prefix("prvs=")
        .or_else(|| local.strip_prefix("msprvs1="))
    {
        local = rest.split_once('=').map_or(rest, |(_, user)| user);
    } else if let Some((user, tag)) = local.split_once("=") {
        // `user=tag` BATV variant: keep the user part when the tag looks generated.
        if tag.len() >= 4 && tag.bytes().all(|b| b.is_ascii_alphanumeric()) {
            local = user;
        }
    }
    let local = local.split('+').next().unwrap_or(local);
    let mut out = String::with_capacity(local.len());
    let mut in_digits = false;
    for c in local.chars() {
        if c.is_ascii_digit() {
            if !in_digits {
                out.push('#');
            }
            in_digits = true;
        } else {
            out.push(c);
            in_digits = false;
        }
    }
    let domain = m
        .domain()
        .map(|d| d.as_str().to_string())
        .unwrap_or_default();
    format!("{out}@{domain}")
}

fn triplet_key(network: &IpNet, sender: &str, recipient: &str) -> String {
    format!("{network}/{sender}/{recipient}")
}

/// Local parts that must always reach their domain (RFC 2142).
fn is_role_account(rcpt: &Mailbox) -> bool {
    let local = rcpt.local.to_ascii_lowercase();
    local == "postmaster" || local == "abuse"
}

/// Greylisting over a store.
pub struct Greylist<S: ?Sized> {
    pub settings: GreylistSettings,
    pub store: std::sync::Arc<S>,
}

impl<S: GreylistStore + ?Sized> Greylist<S> {
    /// Decides on one recipient. `now` in Unix seconds.
    pub async fn check(
        &self,
        client: IpAddr,
        sender: &ReversePath,
        rcpt: &Mailbox,
        now: u64,
    ) -> Decision {
        match self.try_check(client, sender, rcpt, now).await {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(event = "greylist_store_failed", error = %crate::error::Report(&e));
                metrics::counter!("backupmx_greylist_errors_total").increment(1);
                Decision::Pass(PassReason::StoreError)
            }
        }
    }

    fn exempt(&self, client: IpAddr, sender: &ReversePath, rcpt: &Mailbox) -> bool {
        let s = &self.settings;
        if is_role_account(rcpt) || s.whitelist_clients.iter().any(|n| n.contains(&client)) {
            return true;
        }
        if s.whitelist_recipients.contains(&rcpt.canonical()) {
            return true;
        }
        if let ReversePath::Mailbox(m) = sender {
            if let Some(d) = m.domain() {
                return s.whitelist_sender_domains.iter().any(|w| w == d.as_str());
            }
        }
        false
    }

    async fn try_check(
        &self,
        client: IpAddr,
        sender: &ReversePath,
        rcpt: &Mailbox,
        now: u64,
    ) -> Result<Decision, StoreError> {
        if self.exempt(client, sender, rcpt) {
            return Ok(Decision::Pass(PassReason::Exempt));
        }
        let s = &self.settings;
        let network = client_network(client, s);
        let net_key = network.to_string();
        // Read once: the pass count below starts from the same state.
        let client_state = if s.auto_whitelist_after > 0 {
            let c = self.store.client(&net_key).await?;
            if let Some(c) = &c {
                if c.expires >= now && c.passes >= s.auto_whitelist_after {
                    return Ok(Decision::Pass(PassReason::ClientWhitelisted));
                }
            }
            c
        } else {
            None
        };
        let key = triplet_key(&network, &normalise_sender(sender), &rcpt.canonical());
        let fresh = TripletState {
            first_seen: now,
            passed_until: None,
            expires: now + s.retry_window.as_secs(),
        };
        let state = match self.store.triplet(&key).await? {
            Some(state) => state,
            None => {
                if self.store.insert_triplet(&key, &fresh).await? {
                    return Ok(Decision::Defer);
                }
                // Another session inserted it first: use what it wrote.
                match self.store.triplet(&key).await? {
                    Some(state) => state,
                    None => return Ok(Decision::Defer),
                }
            }
        };
        let passed = TripletState {
            first_seen: state.first_seen,
            passed_until: Some(now + s.max_age.as_secs()),
            expires: now + s.max_age.as_secs(),
        };
        // A lost race on the writes below means another session made the
        // same decision at the same moment; the decision stands either way.
        if state.passed_until.is_some_and(|until| until >= now) {
            // Refreshed at most once a day: `max_age` is a matter of days,
            // and a write per message is what a busy sender would cost.
            if state
                .passed_until
                .is_some_and(|until| until.saturating_add(REFRESH_SLACK_SECS) < passed.expires)
            {
                self.store.replace_triplet(&key, &state, &passed).await?;
            }
            self.count_pass(&net_key, client_state, now).await?;
            return Ok(Decision::Pass(PassReason::KnownTriplet));
        }
        let elapsed = now.saturating_sub(state.first_seen);
        if state.passed_until.is_some() || elapsed > s.retry_window.as_secs() {
            // Too late (or a whitelisting that lapsed): start over.
            self.store.replace_triplet(&key, &state, &fresh).await?;
            return Ok(Decision::Defer);
        }
        if elapsed < s.delay.as_secs() {
            return Ok(Decision::Defer);
        }
        self.store.replace_triplet(&key, &state, &passed).await?;
        self.count_pass(&net_key, client_state, now).await?;
        Ok(Decision::Pass(PassReason::Retried))
    }

    /// Counts a pass for the client network, whose state was read as
    /// `state` at the start of this decision.
    async fn count_pass(
        &self,
        network: &str,
        state: Option<ClientState>,
        now: u64,
    ) -> Result<(), StoreError> {
        if self.settings.auto_whitelist_after == 0 {
            return Ok(());
        }
        let max_age = self.settings.max_age.as_secs();
        let next = match state {
            Some(c) if c.expires >= now && now < c.last_counted + 3600 => return Ok(()),
            Some(c) if c.expires >= now => ClientState {
                passes: c.passes + 1,
                last_counted: now,
                expires: now + max_age,
            },
            _ => ClientState {
                passes: 1,
                last_counted: now,
                expires: now + max_age,
            },
        };
        self.store
            .put_client(network, state.as_ref(), &next)
            .await
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// The configuration's defaults, as the server runs them.
    fn defaults() -> GreylistSettings {
        (&crate::config::GreylistConfig::default()).into()
    }
    use crate::address::{parse_forward_path, parse_reverse_path};
    use crate::store::local::LocalStore;

    const T0: u64 = 1_795_842_826;

    struct Fixture {
        _dir: tempfile::TempDir,
        grey: Greylist<LocalStore>,
    }

    fn fixture(settings: GreylistSettings) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(LocalStore::open(dir.path()).unwrap());
        Fixture {
            _dir: dir,
            grey: Greylist { settings, store },
        }
    }

    async fn check(f: &Fixture, ip: &str, from: &str, to: &str, now: u64) -> Decision {
        f.grey
            .check(
                ip.parse().unwrap(),
                &parse_reverse_path(from).unwrap(),
                &parse_forward_path(to).unwrap(),
                now,
            )
            .await
    }

    #[tokio::test]
    async fn first_sight_defers_then_retry_after_delay_passes() {
        let f = fixture(defaults());
        let (ip, from, to) = ("192.0.2.10", "a@remote.test", "u@example.test");
        assert_eq!(check(&f, ip, from, to, T0).await, Decision::Defer);
        assert_eq!(
            check(&f, ip, from, to, T0 + 60).await,
            Decision::Defer,
            "before delay"
        );
        assert_eq!(check(&f, ip, from, to, T0 + 299).await, Decision::Defer);
        assert_eq!(
            check(&f, ip, from, to, T0 + 300).await,
            Decision::Pass(PassReason::Retried)
        );
        assert_eq!(
            check(&f, ip, from, to, T0 + 301).await,
            Decision::Pass(PassReason::KnownTriplet)
        );
        // A neighbour in the same /24 shares the triplet.
        assert_eq!(
            check(&f, "192.0.2.99", from, to, T0 + 302).await,
            Decision::Pass(PassReason::KnownTriplet)
        );
        // Another /24, another sender or another recipient: new triplets.
        assert_eq!(
            check(&f, "192.0.3.10", from, to, T0 + 303).await,
            Decision::Defer
        );
        assert_eq!(
            check(&f, ip, "b@remote.test", to, T0 + 303).await,
            Decision::Defer
        );
        assert_eq!(
            check(&f, ip, from, "v@example.test", T0 + 303).await,
            Decision::Defer
        );
    }

    #[tokio::test]
    async fn a_retry_after_the_window_counts_as_new() {
        let f = fixture(defaults());
        let (ip, from, to) = ("192.0.2.10", "a@remote.test", "u@example.test");
        assert_eq!(check(&f, ip, from, to, T0).await, Decision::Defer);
        let late = T0 + 2 * 86_400 + 1;
        assert_eq!(check(&f, ip, from, to, late).await, Decision::Defer);
        assert_eq!(
            check(&f, ip, from, to, late + 300).await,
            Decision::Pass(PassReason::Retried)
        );
    }

    #[tokio::test]
    async fn passing_triplets_expire_after_max_age_and_refresh_on_use() {
        let f = fixture(defaults());
        let (ip, from, to) = ("192.0.2.10", "a@remote.test", "u@example.test");
        check(&f, ip, from, to, T0).await;
        check(&f, ip, from, to, T0 + 300).await;
        let day = 86_400;
        // Used on day 30: refreshed to day 65.
        assert_eq!(
            check(&f, ip, from, to, T0 + 30 * day).await,
            Decision::Pass(PassReason::KnownTriplet)
        );
        assert_eq!(
            check(&f, ip, from, to, T0 + 64 * day).await,
            Decision::Pass(PassReason::KnownTriplet)
        );
        // Unused for more than 35 days: greylisted again.
        assert_eq!(
            check(&f, ip, from, to, T0 + 100 * day).await,
            Decision::Defer
        );
    }

    #[tokio::test]
    async fn a_passing_triplet_is_rewritten_at_most_once_a_day() {
        let f = fixture(defaults());
        let (ip, from, to) = ("192.0.2.10", "a@remote.test", "u@example.test");
        check(&f, ip, from, to, T0).await;
        check(&f, ip, from, to, T0 + 300).await;
        let key = triplet_key(
            &"192.0.2.0/24".parse().unwrap(),
            "a@remote.test",
            "u@example.test",
        );
        let until = |f: &Fixture| {
            let store = f.grey.store.clone();
            let key = key.clone();
            async move { store.triplet(&key).await.unwrap().unwrap().passed_until }
        };
        let first = until(&f).await;
        let day = 86_400;
        check(&f, ip, from, to, T0 + day / 2).await;
        assert_eq!(until(&f).await, first, "not rewritten within a day");
        check(&f, ip, from, to, T0 + 2 * day).await;
        assert_eq!(
            until(&f).await,
            Some(T0 + 2 * day + defaults().max_age.as_secs())
        );
    }

    #[tokio::test]
    async fn clients_are_auto_whitelisted_after_five_passes_an_hour_apart() {
        let f = fixture(defaults());
        let ip = "198.51.100.7";
        let to = "u@example.test";
        let mut now = T0;
        for i in 0..5 {
            let from = format!("s{}x@remote{i}.test", "ab".repeat(i));
            assert_eq!(check(&f, ip, &from, to, now).await, Decision::Defer);
            assert_eq!(
                check(&f, ip, &from, to, now + 300).await,
                Decision::Pass(PassReason::Retried)
            );
            // A second pass within the hour does not count twice.
            assert!(matches!(
                check(&f, ip, &from, to, now + 301).await,
                Decision::Pass(_)
            ));
            now += 3600 + 300;
        }
        assert_eq!(
            check(&f, "198.51.100.200", "never@seen.test", to, now).await,
            Decision::Pass(PassReason::ClientWhitelisted)
        );
    }

    #[tokio::test]
    async fn passes_within_an_hour_count_once() {
        let f = fixture(defaults());
        for i in 0..6 {
            let from = format!("user{}@r{}.test", "x".repeat(i), "y".repeat(i));
            check(&f, "203.0.113.1", &from, "u@example.test", T0).await;
            check(
                &f,
                "203.0.113.1",
                &from,
                "u@example.test",
                T0 + 300 + i as u64,
            )
            .await;
        }
        assert_eq!(
            check(
                &f,
                "203.0.113.1",
                "fresh@new.test",
                "u@example.test",
                T0 + 400
            )
            .await,
            Decision::Defer
        );
    }

    #[tokio::test]
    async fn exemptions() {
        let f = fixture(GreylistSettings {
            whitelist_clients: vec!["10.0.0.0/8".parse().unwrap()],
            whitelist_sender_domains: vec!["friend.test".into()],
            whitelist_recipients: vec!["vip@example.test".into()],
            ..defaults()
        });
        let pass = Decision::Pass(PassReason::Exempt);
        assert_eq!(
            check(&f, "192.0.2.1", "a@b.test", "postmaster@example.test", T0).await,
            pass
        );
        assert_eq!(
            check(&f, "192.0.2.1", "a@b.test", "Abuse@example.test", T0).await,
            pass
        );
        assert_eq!(
            check(&f, "10.1.2.3", "a@b.test", "u@example.test", T0).await,
            pass
        );
        assert_eq!(
            check(&f, "192.0.2.1", "a@friend.test", "u@example.test", T0).await,
            pass
        );
        assert_eq!(
            check(&f, "192.0.2.1", "a@b.test", "VIP@example.test", T0).await,
            pass
        );
    }

    #[test]
    fn senders_are_normalised() {
        let n = |s: &str| normalise_sender(&parse_reverse_path(s).unwrap());
        assert_eq!(n("User+tag@Remote.TEST"), "user@remote.test");
        assert_eq!(n("prvs=1234abcd=user@remote.test"), "user@remote.test");
        assert_eq!(n("bounce-12345-678@list.test"), "bounce-#-#@list.test");
        assert_eq!(n("bounce-99999-1@list.test"), n("bounce-12-3@list.test"));
        assert_eq!(n(""), "");
    }

    #[test]
    fn networks_follow_the_prefixes() {
        let s = defaults();
        assert_eq!(
            client_network("192.0.2.77".parse().unwrap(), &s).to_string(),
            "192.0.2.0/24"
        );
        assert_eq!(
            client_network("2001:db8:1:2:3:4:5:6".parse().unwrap(), &s).to_string(),
            "2001:db8:1:2::/64"
        );
    }

    struct Broken;
    #[async_trait]
    impl GreylistStore for Broken {
        async fn triplet(&self, _: &str) -> Result<Option<TripletState>, StoreError> {
            Err(StoreError::io(
                "greylist",
                std::io::ErrorKind::NotConnected.into(),
            ))
        }
        async fn insert_triplet(&self, _: &str, _: &TripletState) -> Result<bool, StoreError> {
            Err(StoreError::io(
                "greylist",
                std::io::ErrorKind::NotConnected.into(),
            ))
        }
        async fn replace_triplet(
            &self,
            _: &str,
            _: &TripletState,
            _: &TripletState,
        ) -> Result<bool, StoreError> {
            Err(StoreError::io(
                "greylist",
                std::io::ErrorKind::NotConnected.into(),
            ))
        }
        async fn client(&self, _: &str) -> Result<Option<ClientState>, StoreError> {
            Err(StoreError::io(
                "greylist",
                std::io::ErrorKind::NotConnected.into(),
            ))
        }
        async fn put_client(
            &self,
            _: &str,
            _: Option<&ClientState>,
            _: &ClientState,
        ) -> Result<bool, StoreError> {
            Err(StoreError::io(
                "greylist",
                std::io::ErrorKind::NotConnected.into(),
            ))
        }
        async fn sweep(&self, _: u64) -> Result<(), StoreError> {
            Err(StoreError::io(
                "greylist",
                std::io::ErrorKind::NotConnected.into(),
            ))
        }
    }

    #[tokio::test]
    async fn a_broken_store_fails_open() {
        let g = Greylist {
            settings: defaults(),
            store: Arc::new(Broken),
        };
        let d = g
            .check(
                "192.0.2.1".parse().unwrap(),
                &parse_reverse_path("a@b.test").unwrap(),
                &parse_forward_path("u@example.test").unwrap(),
                T0,
            )
            .await;
        assert_eq!(d, Decision::Pass(PassReason::StoreError));
    }
}
