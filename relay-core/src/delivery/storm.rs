//! The bounce-storm guard: a primary that comes back misconfigured and
//! refuses everyone must not turn the queue into bounces — and a healthy
//! primary refusing the spam queued during its outage must not be taken
//! for a broken one.
//!
//! A *drain* is the `window` after a domain's primary answers again
//! following an outage (or after the domain is released). What tells a
//! broken primary from a healthy one is how it treats recipients known to
//! exist — *known-good* ones: `postmaster@` (RFC 5321 §4.5.1 requires
//! it), the domain's static list, the callout cache's valid entries (which
//! deliveries teach too), and anyone it accepted during the drain.
//! Refusals of never-seen addresses say nothing: after an outage the queue
//! is mostly spam to made-up users.
//!
//! - Some known-good recipient accepted, and known-good refusals not
//!   dominant: the primary is **healthy**; every refusal is final (a DSN).
//! - Known-good recipients refused (`ratio` of those answered, and either
//!   `min_recipients` of them or `postmaster@` among them): **broken**;
//!   the guard trips and the domain is held with reason `bounce_storm`.
//! - Neither yet: refusals are held back (the recipients stay queued, no
//!   DSN) and the shell asks the primary about known-good addresses
//!   (`postmaster@` first) to decide. When it cannot ask (a 4xx, no
//!   connection), the old count decides: `min_recipients` distinct answers
//!   of which `ratio` refused trip it.
//!
//! Outside drains nothing changes. State is per process (the embedded
//! worker, one `retry-fn poll`, one Lambda instance); the hold it sets is
//! in the shared domain record. Every process asks the primary itself,
//! and gets the same answer, so no process lets a refusal through as a DSN
//! before the primary is known to be healthy.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use crate::address::DomainName;
use crate::sync::Mutex;

/// `[delivery] bounce_storm_*`.
#[derive(Debug, Clone, Copy)]
pub struct StormSettings {
    /// Distinct recipients with an answer before the guard may trip; 0
    /// turns the guard off.
    pub min_recipients: usize,
    /// Share of them refused (5xx) that trips it.
    pub ratio: f64,
    /// How long a drain lasts.
    pub window: Duration,
}

/// What the guard says about one attempt's refusals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StormVerdict {
    /// Not in a drain, nothing refused, or the primary is healthy:
    /// refusals are final.
    Normal,
    /// In a drain, health not known yet: keep the refused recipients
    /// queued and look again at `recheck` (the drain's end at the latest).
    HoldBack {
        /// When the held-back refusals are tried again (Unix seconds).
        recheck: u64,
    },
    /// The guard tripped while this attempt was under way: its refusals
    /// are held back with the domain (which the tripping attempt holds).
    Held,
    /// Known-good recipients refused: hold the domain.
    Trip {
        /// Distinct recipients refused in the drain.
        refused: usize,
        /// Distinct recipients answered in the drain.
        answered: usize,
    },
}

/// One recipient's answer in an attempt.
#[derive(Debug, Clone, Copy)]
pub struct Answer<'a> {
    pub address: &'a str,
    /// Known to exist before this answer (postmaster, the static list,
    /// the callout cache's valid entries).
    pub known_good: bool,
    /// Refused for good (5xx); else delivered.
    pub refused: bool,
}

/// What asking the primary about a known-good address gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Asked {
    Accepted,
    Refused,
    /// A 4xx, or no connection: says nothing.
    Inconclusive,
}

/// Held-back refusals are looked at again this often while a drain is
/// undecided: once the primary is known healthy they are final at once,
/// not at the drain's end.
const HOLD_BACK_RECHECK_SECS: u64 = 60;

#[derive(Debug, Default)]
struct Watch {
    /// The last attempt found the primary unreachable.
    was_down: bool,
    drain_start: Option<u64>,
    refused: HashSet<String>,
    delivered: HashSet<String>,
    /// Known-good recipients refused, and accepted (deliveries count).
    good_refused: HashSet<String>,
    good_accepted: HashSet<String>,
    postmaster_refused: bool,
    /// The primary was asked about known-good addresses in this drain.
    asked: bool,
    /// ... and said nothing conclusive.
    asked_inconclusive: bool,
    tripped: bool,
}

impl Watch {
    fn start_drain(&mut self, now: u64) {
        *self = Watch {
            drain_start: Some(now),
            ..Watch::default()
        };
    }

    fn running(&self, now: u64, window: u64) -> bool {
        self.drain_start.is_some_and(|start| now < start + window)
    }

    /// The verdict on the drain so far, for refusals seen at `now`.
    fn verdict(&mut self, s: &StormSettings, any_refused: bool, now: u64) -> StormVerdict {
        let good_answered = self.good_refused.len() + self.good_accepted.len();
        let good_refused = self.good_refused.len();
        let answered = self.refused.len() + self.delivered.len();
        let broken = good_refused > 0
            && good_refused as f64 >= s.ratio * good_answered as f64
            && (good_answered >= s.min_recipients || self.postmaster_refused);
        let by_count = self.asked_inconclusive
            && self.good_accepted.is_empty()
            && answered >= s.min_recipients
            && self.refused.len() as f64 >= s.ratio * answered as f64;
        if broken || by_count {
            self.tripped = true;
            return StormVerdict::Trip {
                refused: self.refused.len(),
                answered,
            };
        }
        if !any_refused || !self.good_accepted.is_empty() {
            return StormVerdict::Normal;
        }
        let end = self.drain_start.unwrap_or(now) + s.window.as_secs();
        StormVerdict::HoldBack {
            recheck: (now + HOLD_BACK_RECHECK_SECS).min(end),
        }
    }
}

fn is_postmaster(address: &str) -> bool {
    address
        .rsplit_once('@')
        .is_some_and(|(local, _)| local.eq_ignore_ascii_case("postmaster"))
}

/// Per-domain drain bookkeeping.
#[derive(Debug)]
pub struct StormGuard {
    settings: StormSettings,
    domains: Mutex<HashMap<DomainName, Watch>>,
}

impl StormGuard {
    /// A guard with these thresholds.
    pub fn new(settings: StormSettings) -> Self {
        StormGuard {
            settings,
            domains: Mutex::new(HashMap::new()),
        }
    }

    /// An attempt found `domain`'s primary unreachable: its next answer
    /// starts a drain.
    pub fn destination_down(&self, domain: &DomainName) {
        if self.settings.min_recipients == 0 {
            return;
        }
        self.domains
            .lock()
            .entry(domain.clone())
            .or_default()
            .was_down = true;
    }

    /// A drain began at `start` (another process found the primary back,
    /// as recorded in the shared primary state): starts it here too,
    /// unless this process already knows of that drain or a later one.
    pub fn drain_started(&self, domain: &DomainName, start: u64, now: u64) {
        if self.settings.min_recipients == 0 || now >= start + self.settings.window.as_secs() {
            return;
        }
        let mut domains = self.domains.lock();
        let w = domains.entry(domain.clone()).or_default();
        if w.drain_start.is_none_or(|s| s < start) && !w.tripped {
            w.was_down = false;
            w.start_drain(start);
        }
    }

    /// An attempt got answers while the shared primary state still says
    /// the primary is down (no process has recorded it back yet): the
    /// primary is back, and a drain starts now unless this process already
    /// has one running. Without this, the first attempts of a process that
    /// did not see the outage itself (a fresh Lambda instance or poller)
    /// took refusals as final and bounced them before any process held the
    /// domain.
    pub fn answered_while_recorded_down(&self, domain: &DomainName, now: u64) {
        if self.settings.min_recipients == 0 {
            return;
        }
        let window = self.settings.window.as_secs();
        let mut domains = self.domains.lock();
        let w = domains.entry(domain.clone()).or_default();
        let running = w.drain_start.is_some_and(|start| now < start + window);
        if !running && !w.tripped {
            w.was_down = false;
            w.start_drain(now);
        }
    }

    /// When the drain an answer to `domain` at `now` belongs to began:
    /// the running drain's start, or `now` if the answer starts one (or
    /// there is none). Mail received after it came in while the primary
    /// answered again: it is not the outage's, and its refusals are final.
    pub fn drain_start(&self, domain: &DomainName, now: u64) -> u64 {
        let window = self.settings.window.as_secs();
        match self.domains.lock().get(domain) {
            Some(w) if !w.was_down && !w.tripped => w
                .drain_start
                .filter(|start| now < start + window)
                .unwrap_or(now),
            _ => now,
        }
    }

    /// An attempt got answers (delivered, or permanently refused).
    pub fn answered(&self, domain: &DomainName, answers: &[Answer<'_>], now: u64) -> StormVerdict {
        let s = self.settings;
        if s.min_recipients == 0 {
            return StormVerdict::Normal;
        }
        let mut domains = self.domains.lock();
        let w = domains.entry(domain.clone()).or_default();
        if w.was_down || w.tripped {
            // Back after an outage, or released after the guard tripped:
            // a new drain.
            w.was_down = false;
            w.start_drain(now);
        }
        if !w.running(now, s.window.as_secs()) {
            w.drain_start = None;
            return StormVerdict::Normal;
        }
        let mut any_refused = false;
        for a in answers {
            let address = a.address.to_string();
            if a.refused {
                any_refused = true;
                if a.known_good {
                    w.postmaster_refused |= is_postmaster(a.address);
                    w.good_refused.insert(address.clone());
                }
                w.refused.insert(address);
            } else {
                w.refused.remove(&address);
                w.good_refused.remove(&address);
                w.good_accepted.insert(address.clone());
                w.delivered.insert(address);
            }
        }
        w.verdict(&s, any_refused, now)
    }

    /// Whether the drain of `domain` is undecided and its primary not yet
    /// asked about known-good addresses: the shell should ask.
    pub fn wants_asking(&self, domain: &DomainName, now: u64) -> bool {
        let window = self.settings.window.as_secs();
        self.domains.lock().get(domain).is_some_and(|w| {
            w.running(now, window) && !w.tripped && !w.asked && w.good_accepted.is_empty()
        })
    }

    /// The verdict on refusals of `domain` now, with what the drain knows
    /// (another attempt asked the primary meanwhile).
    pub fn verdict_now(&self, domain: &DomainName, now: u64) -> StormVerdict {
        let s = self.settings;
        let mut domains = self.domains.lock();
        match domains.get_mut(domain) {
            // Tripped while this attempt waited: it is held back too.
            Some(w) if w.tripped => StormVerdict::Held,
            Some(w) if w.running(now, s.window.as_secs()) => w.verdict(&s, true, now),
            _ => StormVerdict::Normal,
        }
    }

    /// What the primary said about known-good `addresses`, and the
    /// verdict on the drain's refusals with it.
    pub fn asked(
        &self,
        domain: &DomainName,
        answers: &[(String, Asked)],
        now: u64,
    ) -> StormVerdict {
        let s = self.settings;
        let mut domains = self.domains.lock();
        let Some(w) = domains.get_mut(domain) else {
            return StormVerdict::Normal;
        };
        if !w.running(now, s.window.as_secs()) || w.tripped {
            return StormVerdict::Normal;
        }
        w.asked = true;
        let mut conclusive = false;
        for (address, answer) in answers {
            match answer {
                Asked::Accepted => {
                    conclusive = true;
                    w.good_refused.remove(address);
                    w.good_accepted.insert(address.clone());
                }
                Asked::Refused => {
                    conclusive = true;
                    w.postmaster_refused |= is_postmaster(address);
                    w.good_refused.insert(address.clone());
                }
                Asked::Inconclusive => {}
            }
        }
        w.asked_inconclusive = !conclusive;
        w.verdict(&s, true, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard() -> StormGuard {
        StormGuard::new(StormSettings {
            min_recipients: 10,
            ratio: 0.9,
            window: Duration::from_secs(600),
        })
    }

    fn d() -> DomainName {
        DomainName::parse("example.test").unwrap()
    }

    fn names(prefix: &str, n: usize) -> Vec<String> {
        (0..n)
            .map(|i| format!("{prefix}{i}@example.test"))
            .collect()
    }

    /// Refusals of never-seen addresses.
    fn strangers(addresses: &[String]) -> Vec<Answer<'_>> {
        addresses
            .iter()
            .map(|a| Answer {
                address: a,
                known_good: false,
                refused: true,
            })
            .collect()
    }

    fn delivered(addresses: &[String]) -> Vec<Answer<'_>> {
        addresses
            .iter()
            .map(|a| Answer {
                address: a,
                known_good: false,
                refused: false,
            })
            .collect()
    }

    fn postmaster(answer: Asked) -> Vec<(String, Asked)> {
        vec![("postmaster@example.test".to_string(), answer)]
    }

    #[test]
    fn a_drain_starts_with_the_first_answer_and_ends_with_its_window() {
        let g = guard();
        let d = d();
        assert_eq!(g.drain_start(&d, 500), 500, "no drain: now");
        g.destination_down(&d);
        assert_eq!(g.drain_start(&d, 1000), 1000, "the next answer starts one");
        g.answered(&d, &strangers(&names("a", 1)), 1000);
        assert_eq!(g.drain_start(&d, 1300), 1000, "mail after 1000 is fresh");
        assert_eq!(g.drain_start(&d, 1600), 1600, "the window is over");
    }

    #[test]
    fn a_healthy_primary_refusing_the_outages_spam_is_recognised() {
        let g = guard();
        g.destination_down(&d());
        let spam = names("spam", 300);
        // The first refusals of never-seen addresses decide nothing: held
        // back, looked at again within a minute, and the primary is asked.
        assert_eq!(
            g.answered(&d(), &strangers(&spam[..50]), 1000),
            StormVerdict::HoldBack { recheck: 1060 }
        );
        assert!(g.wants_asking(&d(), 1000));
        // postmaster@ exists: healthy. Every refusal is final from now on.
        assert_eq!(
            g.asked(&d(), &postmaster(Asked::Accepted), 1001),
            StormVerdict::Normal
        );
        assert!(!g.wants_asking(&d(), 1001));
        assert_eq!(
            g.answered(&d(), &strangers(&spam[50..]), 1002),
            StormVerdict::Normal
        );
    }

    #[test]
    fn a_delivery_in_the_drain_shows_the_primary_healthy() {
        let g = guard();
        g.destination_down(&d());
        let real = names("real", 1);
        let spam = names("spam", 30);
        let mut answers = delivered(&real);
        answers.extend(strangers(&spam));
        assert_eq!(g.answered(&d(), &answers, 1000), StormVerdict::Normal);
        assert!(!g.wants_asking(&d(), 1000), "nothing to ask");
    }

    #[test]
    fn a_primary_refusing_postmaster_trips_the_guard() {
        let g = guard();
        g.destination_down(&d());
        let all = names("u", 3);
        assert!(matches!(
            g.answered(&d(), &strangers(&all), 1000),
            StormVerdict::HoldBack { .. }
        ));
        assert_eq!(
            g.asked(&d(), &postmaster(Asked::Refused), 1001),
            StormVerdict::Trip {
                refused: 3,
                answered: 3
            }
        );
        // Attempts that waited for the answer are held back too.
        assert_eq!(g.verdict_now(&d(), 1001), StormVerdict::Held);
        // Released and still broken: a new drain, undecided again until
        // the primary is asked again.
        assert!(matches!(
            g.answered(&d(), &strangers(&all), 2000),
            StormVerdict::HoldBack { .. }
        ));
        assert!(g.wants_asking(&d(), 2000));
    }

    #[test]
    fn known_good_recipients_refused_trip_the_guard_without_asking() {
        let g = guard();
        g.destination_down(&d());
        let users = names("user", 10);
        let answers: Vec<Answer> = users
            .iter()
            .map(|a| Answer {
                address: a,
                known_good: true,
                refused: true,
            })
            .collect();
        assert_eq!(
            g.answered(&d(), &answers[..9], 1000),
            StormVerdict::HoldBack { recheck: 1060 },
            "nine known users: not yet min_recipients"
        );
        assert_eq!(
            g.answered(&d(), &answers[9..], 1001),
            StormVerdict::Trip {
                refused: 10,
                answered: 10
            }
        );
    }

    #[test]
    fn one_deleted_user_among_accepted_ones_is_a_normal_refusal() {
        let g = guard();
        g.destination_down(&d());
        let ok = names("ok", 5);
        let gone = "gone@example.test".to_string();
        let mut answers = delivered(&ok);
        answers.push(Answer {
            address: &gone,
            known_good: true,
            refused: true,
        });
        assert_eq!(g.answered(&d(), &answers, 1000), StormVerdict::Normal);
    }

    #[test]
    fn when_the_primary_cannot_be_asked_the_count_decides() {
        let g = guard();
        g.destination_down(&d());
        let all = names("u", 12);
        assert!(matches!(
            g.answered(&d(), &strangers(&all[..4]), 1000),
            StormVerdict::HoldBack { .. }
        ));
        assert!(matches!(
            g.asked(&d(), &postmaster(Asked::Inconclusive), 1001),
            StormVerdict::HoldBack { .. }
        ));
        assert_eq!(
            g.answered(&d(), &strangers(&all[4..]), 1010),
            StormVerdict::Trip {
                refused: 12,
                answered: 12
            }
        );
    }

    #[test]
    fn held_back_refusals_are_rechecked_within_a_minute_and_final_after_the_window() {
        let g = guard();
        g.destination_down(&d());
        let one = names("n", 1);
        assert_eq!(
            g.answered(&d(), &strangers(&one), 1000),
            StormVerdict::HoldBack { recheck: 1060 }
        );
        assert_eq!(
            g.answered(&d(), &strangers(&one), 1580),
            StormVerdict::HoldBack { recheck: 1600 },
            "never past the drain's end"
        );
        assert_eq!(
            g.answered(&d(), &strangers(&one), 1600),
            StormVerdict::Normal
        );
    }

    #[test]
    fn a_process_that_finds_the_primary_recorded_down_holds_refusals_back() {
        let g = guard();
        let refused = names("r", 5);
        // Concurrent attempts of a fresh process, all before any process
        // recorded the primary back: one drain, counted together.
        g.answered_while_recorded_down(&d(), 100);
        assert!(matches!(
            g.answered(&d(), &strangers(&refused[..2]), 100),
            StormVerdict::HoldBack { .. }
        ));
        g.answered_while_recorded_down(&d(), 101);
        assert!(matches!(
            g.answered(&d(), &strangers(&refused[2..]), 101),
            StormVerdict::HoldBack { .. }
        ));
        assert_eq!(g.drain_start(&d(), 102), 100);
    }

    #[test]
    fn outside_a_drain_refusals_are_final() {
        let g = guard();
        let refused = names("r", 20);
        assert_eq!(
            g.answered(&d(), &strangers(&refused), 100),
            StormVerdict::Normal
        );
        assert!(!g.wants_asking(&d(), 100));
    }

    #[test]
    fn a_drain_another_process_saw_begin_counts_here() {
        let g = guard();
        let all = names("u", 10);
        // Never saw the outage itself; the shared state says "up since 1000".
        g.drain_started(&d(), 1000, 1005);
        assert!(matches!(
            g.answered(&d(), &strangers(&all), 1005),
            StormVerdict::HoldBack { .. }
        ));
        // A drain that ended long ago starts nothing.
        let g = guard();
        g.drain_started(&d(), 1000, 5000);
        assert_eq!(
            g.answered(&d(), &strangers(&all), 5000),
            StormVerdict::Normal
        );
    }

    #[test]
    fn zero_min_recipients_turns_the_guard_off() {
        let g = StormGuard::new(StormSettings {
            min_recipients: 0,
            ratio: 0.9,
            window: Duration::from_secs(600),
        });
        g.destination_down(&d());
        assert_eq!(
            g.answered(&d(), &strangers(&names("a", 1)), 1),
            StormVerdict::Normal
        );
    }
}
