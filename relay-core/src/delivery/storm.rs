//! The bounce-storm guard: a primary that comes back misconfigured and
//! refuses everyone must not turn the queue into bounces.
//!
//! A *drain* is the `window` after a domain's primary answers again
//! following an outage (or after the domain is released). During a drain,
//! permanent refusals are held back (the recipients stay queued, no DSN)
//! and counted per distinct recipient; when at least `min_recipients` have
//! an answer and `ratio` of them were refused, the guard trips: the domain
//! is held with reason `bounce_storm`. A drain that ends without tripping
//! lets its held-back refusals go to their next attempt, after the window,
//! where a refusal is final as usual. Outside drains nothing changes.
//!
//! State is per process (the embedded worker, one `retry-fn poll`, one
//! Lambda instance); the hold it sets is in the shared domain record.

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
    /// Not in a drain, or nothing refused: refusals are final.
    Normal,
    /// In a drain: keep the refused recipients queued until `until`.
    HoldBack {
        /// When the drain ends (Unix seconds).
        until: u64,
    },
    /// Nearly everything refused: hold the domain.
    Trip {
        /// Distinct recipients refused in the drain.
        refused: usize,
        /// Distinct recipients answered in the drain.
        answered: usize,
    },
}

#[derive(Debug, Default)]
struct Watch {
    /// The last attempt found the primary unreachable.
    was_down: bool,
    drain_start: Option<u64>,
    refused: HashSet<String>,
    delivered: HashSet<String>,
    tripped: bool,
}

impl Watch {
    fn start_drain(&mut self, now: u64) {
        self.drain_start = Some(now);
        self.refused.clear();
        self.delivered.clear();
        self.tripped = false;
    }
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

    /// An attempt got answers: `delivered` and (permanently) `refused`
    /// recipients.
    pub fn answered(
        &self,
        domain: &DomainName,
        delivered: &[&str],
        refused: &[&str],
        now: u64,
    ) -> StormVerdict {
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
        let Some(start) = w.drain_start else {
            return StormVerdict::Normal;
        };
        let until = start + s.window.as_secs();
        if now >= until {
            w.drain_start = None;
            return StormVerdict::Normal;
        }
        for d in delivered {
            w.refused.remove(*d);
            w.delivered.insert((*d).to_string());
        }
        for r in refused {
            w.refused.insert((*r).to_string());
        }
        let answered = w.refused.len() + w.delivered.len();
        if answered >= s.min_recipients && w.refused.len() as f64 >= s.ratio * answered as f64 {
            w.tripped = true;
            return StormVerdict::Trip {
                refused: w.refused.len(),
                answered,
            };
        }
        if refused.is_empty() {
            StormVerdict::Normal
        } else {
            StormVerdict::HoldBack { until }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_drain_starts_with_the_first_answer_and_ends_with_its_window() {
        let g = guard();
        let d = d();
        assert_eq!(g.drain_start(&d, 500), 500, "no drain: now");
        g.destination_down(&d);
        assert_eq!(g.drain_start(&d, 1000), 1000, "the next answer starts one");
        g.answered(&d, &[], &["a@example.test"], 1000);
        assert_eq!(g.drain_start(&d, 1300), 1000, "mail after 1000 is fresh");
        assert_eq!(g.drain_start(&d, 1600), 1600, "the window is over");
    }

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

    #[test]
    fn a_process_that_finds_the_primary_recorded_down_holds_refusals_back() {
        let g = guard();
        let refused = names("r", 5);
        let refused: Vec<&str> = refused.iter().map(String::as_str).collect();
        // Concurrent attempts of a fresh process, all before any process
        // recorded the primary back: one drain, counted together.
        g.answered_while_recorded_down(&d(), 100);
        assert_eq!(
            g.answered(&d(), &[], &refused[..2], 100),
            StormVerdict::HoldBack { until: 700 }
        );
        g.answered_while_recorded_down(&d(), 101);
        assert_eq!(
            g.answered(&d(), &[], &refused[2..], 101),
            StormVerdict::HoldBack { until: 700 }
        );
        let more = names("s", 10);
        let more: Vec<&str> = more.iter().map(String::as_str).collect();
        g.answered_while_recorded_down(&d(), 102);
        assert!(matches!(
            g.answered(&d(), &[], &more, 102),
            StormVerdict::Trip {
                refused: 15,
                answered: 15
            }
        ));
    }

    #[test]
    fn outside_a_drain_refusals_are_final() {
        let g = guard();
        let refused = names("r", 20);
        let refused: Vec<&str> = refused.iter().map(String::as_str).collect();
        assert_eq!(g.answered(&d(), &[], &refused, 100), StormVerdict::Normal);
    }

    #[test]
    fn a_primary_refusing_everyone_after_an_outage_trips_the_guard() {
        let g = guard();
        g.destination_down(&d());
        let all = names("u", 12);
        let first: Vec<&str> = all[..4].iter().map(String::as_str).collect();
        let rest: Vec<&str> = all[4..].iter().map(String::as_str).collect();
        // Too few answers to decide: held back until the drain ends.
        assert_eq!(
            g.answered(&d(), &[], &first, 1000),
            StormVerdict::HoldBack { until: 1600 }
        );
        assert_eq!(
            g.answered(&d(), &[], &rest, 1010),
            StormVerdict::Trip {
                refused: 12,
                answered: 12
            }
        );
        // Released and still broken: a new drain, tripped again.
        assert_eq!(
            g.answered(&d(), &[], &first, 2000),
            StormVerdict::HoldBack { until: 2600 }
        );
    }

    #[test]
    fn a_drain_with_a_few_unknown_users_does_not_trip_and_ends() {
        let g = guard();
        g.destination_down(&d());
        let good = names("g", 30);
        let good: Vec<&str> = good.iter().map(String::as_str).collect();
        assert_eq!(g.answered(&d(), &good, &[], 1000), StormVerdict::Normal);
        // The same unknown user refused again and again counts once.
        for t in 0..20 {
            assert_eq!(
                g.answered(&d(), &[], &["nobody@example.test"], 1001 + t),
                StormVerdict::HoldBack { until: 1600 }
            );
        }
        // After the window, refusals are final.
        assert_eq!(
            g.answered(&d(), &[], &["nobody@example.test"], 1600),
            StormVerdict::Normal
        );
    }

    #[test]
    fn a_drain_another_process_saw_begin_counts_here() {
        let g = guard();
        let all = names("u", 10);
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        // Never saw the outage itself; the shared state says "up since 1000".
        g.drain_started(&d(), 1000, 1005);
        assert_eq!(
            g.answered(&d(), &[], &all, 1005),
            StormVerdict::Trip {
                refused: 10,
                answered: 10
            }
        );
        // A drain that ended long ago starts nothing.
        let g = guard();
        g.drain_started(&d(), 1000, 5000);
        assert_eq!(g.answered(&d(), &[], &all, 5000), StormVerdict::Normal);
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
            g.answered(&d(), &[], &["a@example.test"], 1),
            StormVerdict::Normal
        );
    }
}
