//! The bounce-storm guard's shell around its pure core ([`super::storm`]):
//! it reads the primary's shared state (when did the drain start, for
//! every process), turns held-back refusals into temporary failures,
//! holds the domain on a trip and sends the alert.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use relay_proto::client::{Envelope, RcptResult};

use crate::address::DomainName;
use crate::alerts::Alerter;
use crate::domain::{Hold, HoldReason};
use crate::store::{DomainRegistry, RecipientCache};
use crate::sync::Mutex;
use crate::time::unix_seconds;
use crate::verify::PrimaryState;

use super::storm::{StormGuard, StormSettings, StormVerdict};

/// How long a shared primary state read for drain detection is reused.
const SHARED_STATE_TTL: Duration = Duration::from_secs(5);

pub(crate) struct StormWatch {
    guard: StormGuard,
    registry: Arc<dyn DomainRegistry>,
    /// Where the primaries' shared states are (with learning only).
    cache: Option<Arc<dyn RecipientCache>>,
    pub(crate) alerts: Option<Arc<Alerter>>,
    /// Shared primary states read for drain detection, per domain, with
    /// when they were read (kept a few seconds: one read per domain per
    /// process, not per attempt).
    shared_states: Mutex<HashMap<DomainName, (Option<PrimaryState>, Instant)>>,
}

impl StormWatch {
    pub(crate) fn new(settings: StormSettings, registry: Arc<dyn DomainRegistry>) -> Self {
        StormWatch {
            guard: StormGuard::new(settings),
            registry,
            cache: None,
            alerts: None,
            shared_states: Default::default(),
        }
    }

    pub(crate) fn with_cache(mut self, cache: Arc<dyn RecipientCache>) -> Self {
        self.cache = Some(cache);
        self
    }

    /// No server of `domain` answered: the next answer starts a drain.
    pub(crate) fn destination_down(&self, domain: &DomainName) {
        self.guard.destination_down(domain);
    }

    /// The guard on one attempt's answers: during a drain, remote refusals
    /// of the outage's mail become temporary (no DSN); if nearly all of
    /// the drain was refused, the domain is held and an alert sent.
    /// `received` is when each message was accepted: mail that came in
    /// after the primary answered again is not part of the drain, and its
    /// refusals stay final (a DSN at once, not after the window).
    pub(crate) async fn judge(
        &self,
        domain: &DomainName,
        envelopes: &[Envelope],
        received: &[u64],
        results: &mut [Vec<RcptResult>],
        now: SystemTime,
    ) -> StormVerdict {
        let now_secs = unix_seconds(now);
        let any_refused = results
            .iter()
            .flatten()
            .any(|r| matches!(r, RcptResult::Permanent(_)));
        if any_refused {
            if let Some(state) = self.shared_state(domain).await {
                if state.up {
                    self.guard.drain_started(domain, state.since, now_secs);
                } else {
                    // Recorded down, and this attempt got an answer: the
                    // primary is back, whether or not another process has
                    // recorded it yet. Recorded here too, so the drain has
                    // one start for every process and ends with its window.
                    self.guard.answered_while_recorded_down(domain, now_secs);
                    self.record_primary(domain, true, now_secs).await;
                }
            }
        }
        let start = self.guard.drain_start(domain, now_secs);
        let outage_mail: Vec<bool> = (0..envelopes.len())
            .map(|i| received.get(i).is_none_or(|&at| at <= start))
            .collect();
        let mut delivered = Vec::new();
        let mut refused = Vec::new();
        for ((env, rs), _) in envelopes
            .iter()
            .zip(results.iter())
            .zip(&outage_mail)
            .filter(|(_, outage)| **outage)
        {
            for (addr, r) in env.recipients.iter().zip(rs) {
                match r {
                    RcptResult::Delivered(_) => delivered.push(addr.as_str()),
                    RcptResult::Permanent(_) => refused.push(addr.as_str()),
                    RcptResult::Transient(_) => {}
                }
            }
        }
        let verdict = self.guard.answered(domain, &delivered, &refused, now_secs);
        let note = match verdict {
            StormVerdict::Normal => return verdict,
            StormVerdict::HoldBack { .. } => {
                "held back: the primary answered again after an outage, refusals wait for the drain's end"
            }
            StormVerdict::Trip { refused, answered } => {
                // One storm is one event: attempts already under way when
                // the domain was held trip again, and say nothing more.
                if self.hold(domain, refused, answered, now_secs).await {
                    metrics::counter!("backupmx_bounce_storms_total").increment(1);
                    tracing::warn!(event = "bounce_storm", domain = %domain, refused, answered,
                        "the primary refused nearly all of a drain: domain held, no DSN sent");
                }
                "held by the bounce-storm guard: the primary refused nearly all of a drain"
            }
        };
        for (rs, _) in results
            .iter_mut()
            .zip(&outage_mail)
            .filter(|(_, outage)| **outage)
        {
            for r in rs.iter_mut() {
                if let RcptResult::Permanent(text) = r {
                    *r = RcptResult::Transient(format!("{text} ({note})"));
                }
            }
        }
        verdict
    }

    /// The primary's state as every process on the store sees it (read at
    /// most every few seconds per domain).
    async fn shared_state(&self, domain: &DomainName) -> Option<PrimaryState> {
        let cache = self.cache.as_ref()?;
        if let Some((state, at)) = self.shared_states.lock().get(domain) {
            if at.elapsed() < SHARED_STATE_TTL {
                return *state;
            }
        }
        let state = cache.primary_state(domain).await.ok().flatten();
        self.shared_states
            .lock()
            .insert(domain.clone(), (state, Instant::now()));
        state
    }

    /// Records a primary going down or coming back where every process
    /// sees it (drains start here).
    pub(crate) async fn record_primary(&self, domain: &DomainName, up: bool, now: u64) {
        if let Some(cache) = &self.cache {
            crate::observations::observe_primary(cache.as_ref(), domain, up, now).await;
            self.shared_states.lock().remove(domain);
        }
    }

    /// Holds `domain` for a storm and alerts; `true` if this call held it
    /// (not held already, and the hold stored).
    async fn hold(&self, domain: &DomainName, refused: usize, answered: usize, now: u64) -> bool {
        match self.registry.get(domain).await {
            Ok(Some(mut d)) if d.hold.is_none() => {
                d.hold = Some(Hold {
                    reason: HoldReason::BounceStorm,
                    since: now,
                });
                if let Err(e) = self.registry.put(&d).await {
                    tracing::error!(event = "hold_not_stored", domain = %domain, error = %crate::error::Report(&e));
                    return false;
                }
                if let Some(a) = &self.alerts {
                    a.send(
                        "domain_held",
                        Some(domain.as_str()),
                        serde_json::json!({
                            "reason": "bounce_storm",
                            "refused": refused,
                            "answered": answered,
                        }),
                    );
                }
                true
            }
            Ok(_) => false,
            Err(e) => {
                tracing::error!(event = "hold_not_stored", domain = %domain, error = %crate::error::Report(&e));
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Domain;
    use crate::store::local::LocalStore;

    fn envelope(recipients: &[&str]) -> Envelope {
        Envelope {
            sender: "s@sender.test".into(),
            recipients: recipients.iter().map(|r| r.to_string()).collect(),
            size: 10,
            smtputf8: false,
            eight_bit: false,
        }
    }

    #[tokio::test]
    async fn a_drain_refused_nearly_whole_holds_the_domain_and_sends_no_dsn() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(LocalStore::open(dir.path()).unwrap());
        let name = DomainName::parse("example.test").unwrap();
        DomainRegistry::put(store.as_ref(), &Domain::new(name.clone()))
            .await
            .unwrap();
        let watch = StormWatch::new(
            StormSettings {
                min_recipients: 3,
                ratio: 0.9,
                window: Duration::from_secs(600),
            },
            store.clone(),
        );
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(10_000);
        watch.destination_down(&name);
        // Back: the first refusal of the drain is held back, not final.
        let env = [envelope(&["a@example.test"])];
        let mut results = vec![vec![RcptResult::Permanent("550 5.1.1 unknown".into())]];
        let verdict = watch.judge(&name, &env, &[1], &mut results, now).await;
        assert_eq!(verdict, StormVerdict::HoldBack { until: 10_600 });
        assert!(matches!(&results[0][0], RcptResult::Transient(t) if t.contains("held back")));
        assert!(store.get(&name).await.unwrap().unwrap().hold.is_none());
        // Two more refusals: the guard trips and the domain is held.
        let env = [envelope(&["b@example.test", "c@example.test"])];
        let mut results = vec![vec![RcptResult::Permanent("550 5.1.1 unknown".into()); 2]];
        let verdict = watch.judge(&name, &env, &[1], &mut results, now).await;
        assert_eq!(
            verdict,
            StormVerdict::Trip {
                refused: 3,
                answered: 3
            }
        );
        assert!(results[0]
            .iter()
            .all(|r| matches!(r, RcptResult::Transient(_))));
        let hold = store.get(&name).await.unwrap().unwrap().hold.unwrap();
        assert_eq!(hold.reason, HoldReason::BounceStorm);
        assert_eq!(hold.since, 10_000);
        // A batch that was under way trips again: its refusals wait too,
        // and the hold (and its alert) is not made a second time.
        assert!(!watch.hold(&name, 3, 3, 10_001).await);
        let env = [envelope(&[
            "d@example.test",
            "e@example.test",
            "f@example.test",
        ])];
        let mut results = vec![vec![RcptResult::Permanent("550 5.1.1 unknown".into()); 3]];
        let later = now + Duration::from_secs(1);
        let verdict = watch.judge(&name, &env, &[1], &mut results, later).await;
        assert!(matches!(verdict, StormVerdict::Trip { .. }), "{verdict:?}");
        assert!(results[0]
            .iter()
            .all(|r| matches!(r, RcptResult::Transient(_))));
        let still = store.get(&name).await.unwrap().unwrap().hold.unwrap();
        assert_eq!(still.since, 10_000, "the first hold stands");
    }

    #[tokio::test]
    async fn mail_accepted_after_the_primary_answered_again_is_not_held_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(LocalStore::open(dir.path()).unwrap());
        let name = DomainName::parse("example.test").unwrap();
        let watch = StormWatch::new(
            StormSettings {
                min_recipients: 10,
                ratio: 0.9,
                window: Duration::from_secs(600),
            },
            store,
        );
        let at = |s: u64| SystemTime::UNIX_EPOCH + Duration::from_secs(s);
        watch.destination_down(&name);
        // The drain starts at 10 000 with the outage's mail (received 9 000).
        let env = [envelope(&["old@example.test"])];
        let mut results = vec![vec![RcptResult::Permanent("550 5.1.1 unknown".into())]];
        let verdict = watch
            .judge(&name, &env, &[9_000], &mut results, at(10_000))
            .await;
        assert!(matches!(verdict, StormVerdict::HoldBack { .. }));
        assert!(matches!(results[0][0], RcptResult::Transient(_)));
        // A message accepted at 10 005, refused at 10 010: final now.
        let env = [
            envelope(&["new@example.test"]),
            envelope(&["old2@example.test"]),
        ];
        let mut results = vec![
            vec![RcptResult::Permanent("550 5.1.1 unknown".into())],
            vec![RcptResult::Permanent("550 5.1.1 unknown".into())],
        ];
        watch
            .judge(&name, &env, &[10_005, 9_500], &mut results, at(10_010))
            .await;
        assert!(
            matches!(results[0][0], RcptResult::Permanent(_)),
            "fresh mail bounces"
        );
        assert!(
            matches!(results[1][0], RcptResult::Transient(_)),
            "outage mail waits"
        );
    }

    #[tokio::test]
    async fn outside_a_drain_refusals_are_final() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(LocalStore::open(dir.path()).unwrap());
        let name = DomainName::parse("example.test").unwrap();
        let watch = StormWatch::new(
            StormSettings {
                min_recipients: 3,
                ratio: 0.9,
                window: Duration::from_secs(600),
            },
            store,
        );
        let env = [envelope(&["a@example.test"])];
        let mut results = vec![vec![RcptResult::Permanent("550 5.1.1 unknown".into())]];
        let verdict = watch
            .judge(&name, &env, &[1], &mut results, SystemTime::now())
            .await;
        assert_eq!(verdict, StormVerdict::Normal);
        assert!(matches!(results[0][0], RcptResult::Permanent(_)));
    }
}
