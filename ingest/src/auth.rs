//! Who may use the admin listener: sign-in sessions for the status page,
//! and a brake on wrong tokens.
//!
//! The sign-in form trades the token for a random session id (the cookie),
//! kept here with an expiry: the token itself never sits in a browser,
//! sign-out ends the session, and a stolen cookie dies with it. Wrong
//! tokens from one client address are counted; past a few a minute the
//! address gets `429` until the minute is over (a guessing script gets
//! a handful of tries a minute instead of thousands a second), and the log
//! says so once per address and minute instead of once per guess.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use relay_core::sync::Mutex;

/// How long a sign-in lasts.
pub(crate) const SESSION_LIFETIME: Duration = Duration::from_secs(12 * 3600);
/// Sessions kept at once; the oldest goes first.
const MAX_SESSIONS: usize = 1000;
/// Wrong tokens a client address may send per window.
const FAILURES_ALLOWED: u32 = 5;
/// The window failures are counted in.
const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// Client addresses tracked at once (a spray from many addresses must not
/// grow the table without bound).
const MAX_TRACKED: usize = 10_000;

/// Signed-in browsers, by session id.
#[derive(Default)]
pub(crate) struct Sessions(Mutex<HashMap<String, Instant>>);

impl Sessions {
    /// A new session (its id for the cookie), valid until `now + lifetime`.
    pub(crate) fn open(&self, now: Instant) -> String {
        let id = format!(
            "{:016x}{:016x}",
            rand::random::<u64>(),
            rand::random::<u64>()
        );
        let mut map = self.0.lock();
        map.retain(|_, until| *until > now);
        if map.len() >= MAX_SESSIONS {
            if let Some(oldest) = map.iter().min_by_key(|(_, u)| **u).map(|(k, _)| k.clone()) {
                map.remove(&oldest);
            }
        }
        map.insert(id.clone(), now + SESSION_LIFETIME);
        id
    }

    /// Whether `id` is a session that has not expired at `now`.
    pub(crate) fn valid(&self, id: &str, now: Instant) -> bool {
        self.0.lock().get(id).is_some_and(|until| *until > now)
    }

    /// Ends a session (sign-out).
    pub(crate) fn close(&self, id: &str) {
        self.0.lock().remove(id);
    }
}

/// What the brake says about a client's next wrong token.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Failure {
    /// Counted; the first of this window for the address (log it).
    First,
    /// Counted; logged already this window.
    Again,
    /// Over the limit: refuse with 429 until `retry_after`.
    Blocked { retry_after: Duration },
}

/// Wrong tokens per client address and window.
#[derive(Default)]
pub(crate) struct FailureBrake(Mutex<HashMap<IpAddr, (Instant, u32)>>);

impl FailureBrake {
    /// Whether `ip` is over the limit now (checked before the token is).
    pub(crate) fn blocked(&self, ip: IpAddr, now: Instant) -> Option<Duration> {
        let map = self.0.lock();
        let (start, count) = map.get(&ip)?;
        let end = *start + FAILURE_WINDOW;
        (*count >= FAILURES_ALLOWED && end > now).then(|| end - now)
    }

    /// Counts a wrong token from `ip`.
    pub(crate) fn failed(&self, ip: IpAddr, now: Instant) -> Failure {
        let mut map = self.0.lock();
        if map.len() >= MAX_TRACKED && !map.contains_key(&ip) {
            map.retain(|_, (start, _)| *start + FAILURE_WINDOW > now);
            if map.len() >= MAX_TRACKED {
                map.clear();
            }
        }
        let entry = map.entry(ip).or_insert((now, 0));
        if entry.0 + FAILURE_WINDOW <= now {
            *entry = (now, 0);
        }
        entry.1 += 1;
        match entry.1 {
            1 => Failure::First,
            n if n > FAILURES_ALLOWED => Failure::Blocked {
                retry_after: (entry.0 + FAILURE_WINDOW).saturating_duration_since(now),
            },
            _ => Failure::Again,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_lasts_its_lifetime_and_ends_at_sign_out() {
        let s = Sessions::default();
        let t0 = Instant::now();
        let id = s.open(t0);
        assert_eq!(id.len(), 32);
        assert_ne!(id, s.open(t0), "ids are random");
        assert!(s.valid(&id, t0 + Duration::from_secs(60)));
        assert!(!s.valid(&id, t0 + SESSION_LIFETIME));
        assert!(!s.valid("not-a-session", t0));
        s.close(&id);
        assert!(!s.valid(&id, t0));
    }

    #[test]
    fn wrong_tokens_are_braked_per_address_and_window() {
        let b = FailureBrake::default();
        let t0 = Instant::now();
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let other: IpAddr = "192.0.2.8".parse().unwrap();
        assert_eq!(b.failed(ip, t0), Failure::First);
        for _ in 1..FAILURES_ALLOWED {
            assert_eq!(b.failed(ip, t0), Failure::Again);
        }
        assert_eq!(b.blocked(ip, t0), Some(FAILURE_WINDOW));
        assert!(matches!(b.failed(ip, t0), Failure::Blocked { .. }));
        assert_eq!(b.blocked(other, t0), None, "another address is not braked");
        // A new window starts over.
        let later = t0 + FAILURE_WINDOW;
        assert_eq!(b.blocked(ip, later), None);
        assert_eq!(b.failed(ip, later), Failure::First);
    }
}
