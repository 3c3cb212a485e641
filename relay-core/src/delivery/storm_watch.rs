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
use crate::domain::{Domain, Hold, HoldReason};
use crate::queue::{HeldRefusal, QueueEntry};
use crate::store::{DomainRegistry, RecipientCache};
use crate::sync::Mutex;
use crate::time::unix_seconds;
use crate::verify::{PrimaryState, Verdict};

use super::storm::{Answer, Asked, StormGuard, StormSettings, StormVerdict};

/// Known-good addresses asked about besides `postmaster@`: from the
/// static list, and from the callout cache.
const ASK_LISTED: usize = 2;
const ASK_CACHED: usize = 2;

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
    /// One question to a primary per drain: attempts that need its answer
    /// wait for the one asking.
    asking: Mutex<HashMap<DomainName, Arc<tokio::sync::Mutex<()>>>>,
}

impl StormWatch {
    pub(crate) fn new(settings: StormSettings, registry: Arc<dyn DomainRegistry>) -> Self {
        StormWatch {
            guard: StormGuard::new(settings),
            registry,
            cache: None,
            alerts: None,
            shared_states: Default::default(),
            asking: Default::default(),
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
    /// of the outage's mail become temporary (no DSN) until the primary is
    /// known to be healthy; if it refuses known-good recipients, the
    /// domain is held and an alert sent. `ask` asks the primary about
    /// known-good addresses when the drain cannot be decided otherwise.
    /// `received` is when each message was accepted: mail that came in
    /// after the primary answered again is not part of the drain, and its
    /// refusals stay final (a DSN at once, not after the window).
    /// `released` marks recipients whose held-back refusal an operator
    /// released: final too, and not counted.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn judge<F, Fut>(
        &self,
        record: &Domain,
        envelopes: &[Envelope],
        (received, released): (&[u64], &[Vec<bool>]),
        results: &mut [Vec<RcptResult>],
        now: SystemTime,
        ask: F,
    ) -> StormVerdict
    where
        F: FnOnce(Vec<String>) -> Fut,
        Fut: std::future::Future<Output = Vec<(String, Asked)>>,
    {
        let domain = &record.name;
        if !record.bounce_storm_guard {
            return StormVerdict::Normal;
        }
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
        let is_released = |m: usize, k: usize| {
            released
                .get(m)
                .and_then(|r| r.get(k))
                .copied()
                .unwrap_or(false)
        };
        let mut answers: Vec<(&str, bool)> = Vec::new();
        for (m, ((env, rs), _)) in envelopes
            .iter()
            .zip(results.iter())
            .zip(&outage_mail)
            .enumerate()
            .filter(|(_, (_, outage))| **outage)
        {
            for (k, (addr, r)) in env.recipients.iter().zip(rs).enumerate() {
                if is_released(m, k) {
                    continue;
                }
                match r {
                    RcptResult::Delivered(_) => answers.push((addr.as_str(), false)),
                    RcptResult::Permanent(_) => answers.push((addr.as_str(), true)),
                    RcptResult::Transient(_) => {}
                }
            }
        }
        let mut tagged = Vec::with_capacity(answers.len());
        for (address, refused) in answers {
            let known_good = refused && self.known_good(record, address, now_secs).await;
            tagged.push(Answer {
                address,
                known_good,
                refused,
            });
        }
        let mut verdict = self.guard.answered(domain, &tagged, now_secs);
        if matches!(verdict, StormVerdict::HoldBack { .. }) {
            verdict = self.ask_once(record, now_secs, ask).await;
        }
        let note = match verdict {
            StormVerdict::Normal => return verdict,
            StormVerdict::HoldBack { .. } => {
                "held back: the primary answered again after an outage and is not yet known to be healthy"
            }
            StormVerdict::Trip { refused, answered } => {
                // One storm is one event: attempts already under way when
                // the domain was held trip again, and say nothing more.
                if self.hold(domain, refused, answered, now_secs).await {
                    metrics::counter!("backupmx_bounce_storms_total").increment(1);
                    tracing::warn!(event = "bounce_storm", domain = %domain, refused, answered,
                        "the primary refused known-good recipients after an outage: domain held, no DSN sent");
                }
                "held by the bounce-storm guard: the primary refused known-good recipients"
            }
            StormVerdict::Held => {
                "held by the bounce-storm guard: the primary refused known-good recipients"
            }
        };
        for (m, (rs, _)) in results
            .iter_mut()
            .zip(&outage_mail)
            .enumerate()
            .filter(|(_, (_, outage))| **outage)
        {
            for (k, r) in rs.iter_mut().enumerate() {
                if is_released(m, k) {
                    continue;
                }
                if let RcptResult::Permanent(text) = r {
                    *r = RcptResult::Transient(format!("{text} ({note})"));
                }
            }
        }
        verdict
    }

    /// Asks the primary about known-good addresses, once per drain and
    /// domain (attempts that need the answer meanwhile wait for it), and
    /// returns the verdict with what it said.
    async fn ask_once<F, Fut>(&self, record: &Domain, now: u64, ask: F) -> StormVerdict
    where
        F: FnOnce(Vec<String>) -> Fut,
        Fut: std::future::Future<Output = Vec<(String, Asked)>>,
    {
        let domain = &record.name;
        let gate = self
            .asking
            .lock()
            .entry(domain.clone())
            .or_default()
            .clone();
        let _asking = gate.lock().await;
        if !self.guard.wants_asking(domain, now) {
            return self.guard.verdict_now(domain, now);
        }
        let addresses = self.known_good_sample(record, now).await;
        let answers = ask(addresses).await;
        let said: Vec<String> = answers.iter().map(|(a, r)| format!("{a}: {r:?}")).collect();
        let verdict = self.guard.asked(domain, &answers, now);
        tracing::info!(event = "storm_guard_asked", domain = %domain, answers = ?said, verdict = ?verdict,
            "asked the primary about known-good recipients to tell a healthy primary from a broken one");
        verdict
    }

    /// Whether `address` is known to exist at `record`'s primary:
    /// `postmaster@`, the static list, or a valid callout-cache entry
    /// (which deliveries teach too).
    async fn known_good(&self, record: &Domain, address: &str, now: u64) -> bool {
        let Ok(mailbox) = crate::address::parse_forward_path(address) else {
            return false;
        };
        let canonical = mailbox.canonical();
        let postmaster = canonical
            .rsplit_once('@')
            .is_some_and(|(local, _)| local.eq_ignore_ascii_case("postmaster"));
        if postmaster || record.lists_recipient(&mailbox) {
            return true;
        }
        let Some(cache) = &self.cache else {
            return false;
        };
        matches!(
            cache.recipient(&canonical, now).await,
            Ok(Some(hit)) if hit.verdict == Verdict::Valid
        )
    }

    /// Known-good addresses to ask about: `postmaster@` first, then a few
    /// from the static list and the callout cache's valid entries.
    async fn known_good_sample(&self, record: &Domain, now: u64) -> Vec<String> {
        let mut sample = vec![format!("postmaster@{}", record.name)];
        let listed = record.recipients.iter().flatten().take(ASK_LISTED);
        sample.extend(listed.cloned());
        if let Some(cache) = &self.cache {
            if let Ok(known) = cache.recipients(&record.name, now).await {
                sample.extend(
                    known
                        .into_iter()
                        .filter(|r| r.verdict == Verdict::Valid)
                        .map(|r| r.address)
                        .take(ASK_CACHED),
                );
            }
        }
        sample.dedup();
        sample
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

/// Which of `entry`'s `pending` recipients have a refusal an operator
/// released (final: not held back again).
pub(crate) fn released(entry: &QueueEntry, pending: &[usize]) -> Vec<bool> {
    pending
        .iter()
        .map(|&r| entry.recipients[r].held_refusal == Some(HeldRefusal::Final))
        .collect()
}

/// Which results are refusals for good, per message and recipient.
pub(crate) fn refused(results: &[Vec<RcptResult>]) -> Vec<Vec<bool>> {
    results
        .iter()
        .map(|rs| {
            rs.iter()
                .map(|r| matches!(r, RcptResult::Permanent(_)))
                .collect()
        })
        .collect()
}

/// Which refusals (`refused_before` the guard judged) it held back.
pub(crate) fn held_back(refused_before: &[Vec<bool>], after: &[Vec<RcptResult>]) -> Vec<Vec<bool>> {
    refused_before
        .iter()
        .zip(after)
        .map(|(before, now)| {
            before
                .iter()
                .zip(now)
                .map(|(was, r)| *was && matches!(r, RcptResult::Transient(_)))
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Domain;
    use crate::store::local::LocalStore;

    /// What the primary says when asked about known-good addresses.
    fn says(answer: Asked) -> impl FnOnce(Vec<String>) -> std::future::Ready<Vec<(String, Asked)>> {
        move |addresses| std::future::ready(addresses.into_iter().map(|a| (a, answer)).collect())
    }

    /// A store holding the hosted domain, and a guard over it with
    /// `min_recipients` (ratio 0.9, a 10-minute drain).
    async fn setup(
        min_recipients: usize,
    ) -> (tempfile::TempDir, Arc<LocalStore>, DomainName, StormWatch) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(LocalStore::open(dir.path()).unwrap());
        let name = DomainName::parse("example.test").unwrap();
        DomainRegistry::put(store.as_ref(), &hosted(&name))
            .await
            .unwrap();
        let watch = StormWatch::new(
            StormSettings {
                min_recipients,
                ratio: 0.9,
                window: Duration::from_secs(600),
            },
            store.clone(),
        );
        (dir, store, name, watch)
    }

    fn hosted(name: &DomainName) -> Domain {
        Domain::new(name.clone())
    }

    fn envelope(recipients: &[&str]) -> Envelope {
        Envelope {
            dsn: Default::default(),
            recipient_dsn: Vec::new(),
            sender: "s@sender.test".into(),
            recipients: recipients.iter().map(|r| r.to_string()).collect(),
            size: 10,
            smtputf8: false,
            eight_bit: false,
            tls_request: None,
        }
    }

    #[tokio::test]
    async fn a_drain_refused_nearly_whole_holds_the_domain_and_sends_no_dsn_when_the_primary_cannot_be_asked(
    ) {
        let (_dir, store, name, watch) = setup(3).await;
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(10_000);
        watch.destination_down(&name);
        // Back: the first refusal of the drain is held back, not final.
        let env = [envelope(&["a@example.test"])];
        let mut results = vec![vec![RcptResult::Permanent("550 5.1.1 unknown".into())]];
        let verdict = watch
            .judge(
                &hosted(&name),
                &env,
                (&[1], &[]),
                &mut results,
                now,
                says(Asked::Inconclusive),
            )
            .await;
        assert_eq!(verdict, StormVerdict::HoldBack { recheck: 10_060 });
        assert!(matches!(&results[0][0], RcptResult::Transient(t) if t.contains("held back")));
        assert!(store.get(&name).await.unwrap().unwrap().hold.is_none());
        // The primary could not be asked (postmaster got a 4xx): two more
        // refusals, and the count trips the guard; the domain is held.
        let env = [envelope(&["b@example.test", "c@example.test"])];
        let mut results = vec![vec![RcptResult::Permanent("550 5.1.1 unknown".into()); 2]];
        let verdict = watch
            .judge(
                &hosted(&name),
                &env,
                (&[1], &[]),
                &mut results,
                now,
                says(Asked::Inconclusive),
            )
            .await;
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
        let verdict = watch
            .judge(
                &hosted(&name),
                &env,
                (&[1], &[]),
                &mut results,
                later,
                says(Asked::Inconclusive),
            )
            .await;
        assert!(matches!(verdict, StormVerdict::Trip { .. }), "{verdict:?}");
        assert!(results[0]
            .iter()
            .all(|r| matches!(r, RcptResult::Transient(_))));
        let still = store.get(&name).await.unwrap().unwrap().hold.unwrap();
        assert_eq!(still.since, 10_000, "the first hold stands");
    }

    #[tokio::test]
    async fn mail_accepted_after_the_primary_answered_again_is_not_held_back() {
        let (_dir, _store, name, watch) = setup(10).await;
        let at = |s: u64| SystemTime::UNIX_EPOCH + Duration::from_secs(s);
        watch.destination_down(&name);
        // The drain starts at 10 000 with the outage's mail (received 9 000).
        let env = [envelope(&["old@example.test"])];
        let mut results = vec![vec![RcptResult::Permanent("550 5.1.1 unknown".into())]];
        let verdict = watch
            .judge(
                &hosted(&name),
                &env,
                (&[9_000], &[]),
                &mut results,
                at(10_000),
                says(Asked::Inconclusive),
            )
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
            .judge(
                &hosted(&name),
                &env,
                (&[10_005, 9_500], &[]),
                &mut results,
                at(10_010),
                says(Asked::Inconclusive),
            )
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
        let (_dir, _store, name, watch) = setup(3).await;
        let env = [envelope(&["a@example.test"])];
        let mut results = vec![vec![RcptResult::Permanent("550 5.1.1 unknown".into())]];
        let verdict = watch
            .judge(
                &hosted(&name),
                &env,
                (&[1], &[]),
                &mut results,
                SystemTime::now(),
                says(Asked::Inconclusive),
            )
            .await;
        assert_eq!(verdict, StormVerdict::Normal);
        assert!(matches!(results[0][0], RcptResult::Permanent(_)));
    }

    #[tokio::test]
    async fn a_primary_that_knows_postmaster_gets_its_refusals_final_at_once() {
        let (_dir, store, name, watch) = setup(3).await;
        watch.destination_down(&name);
        let spam: Vec<String> = (0..20).map(|i| format!("spam{i}@example.test")).collect();
        let spam: Vec<&str> = spam.iter().map(String::as_str).collect();
        let env = [envelope(&spam)];
        let mut results = vec![vec![RcptResult::Permanent("550 5.1.1 unknown".into()); 20]];
        let verdict = watch
            .judge(
                &hosted(&name),
                &env,
                (&[1], &[]),
                &mut results,
                SystemTime::now(),
                says(Asked::Accepted),
            )
            .await;
        assert_eq!(verdict, StormVerdict::Normal);
        assert!(results[0]
            .iter()
            .all(|r| matches!(r, RcptResult::Permanent(_))));
        assert!(store.get(&name).await.unwrap().unwrap().hold.is_none());
    }

    #[tokio::test]
    async fn a_primary_that_refuses_postmaster_is_held_at_its_first_refusal() {
        let (_dir, store, name, watch) = setup(10).await;
        watch.destination_down(&name);
        let env = [envelope(&["a@example.test"])];
        let mut results = vec![vec![RcptResult::Permanent("550 5.1.1 unknown".into())]];
        let verdict = watch
            .judge(
                &hosted(&name),
                &env,
                (&[1], &[]),
                &mut results,
                SystemTime::now(),
                says(Asked::Refused),
            )
            .await;
        assert!(matches!(verdict, StormVerdict::Trip { .. }), "{verdict:?}");
        assert!(matches!(results[0][0], RcptResult::Transient(_)));
        let hold = store.get(&name).await.unwrap().unwrap().hold.unwrap();
        assert_eq!(hold.reason, HoldReason::BounceStorm);
    }

    #[tokio::test]
    async fn a_domain_with_the_guard_off_gets_its_refusals_final() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(LocalStore::open(dir.path()).unwrap());
        let name = DomainName::parse("example.test").unwrap();
        let mut record = hosted(&name);
        record.bounce_storm_guard = false;
        let watch = StormWatch::new(
            StormSettings {
                min_recipients: 1,
                ratio: 0.9,
                window: Duration::from_secs(600),
            },
            store,
        );
        watch.destination_down(&name);
        let env = [envelope(&["a@example.test"])];
        let mut results = vec![vec![RcptResult::Permanent("550 5.1.1 unknown".into())]];
        let verdict = watch
            .judge(
                &record,
                &env,
                (&[1], &[]),
                &mut results,
                SystemTime::now(),
                says(Asked::Refused),
            )
            .await;
        assert_eq!(verdict, StormVerdict::Normal);
        assert!(matches!(results[0][0], RcptResult::Permanent(_)));
    }

    #[tokio::test]
    async fn a_released_refusal_is_final_and_not_counted() {
        let (_dir, _store, name, watch) = setup(1).await;
        watch.destination_down(&name);
        let env = [envelope(&["released@example.test", "held@example.test"])];
        let mut results = vec![vec![RcptResult::Permanent("550 5.1.1 unknown".into()); 2]];
        watch
            .judge(
                &hosted(&name),
                &env,
                (&[1], &[vec![true, false]]),
                &mut results,
                SystemTime::now(),
                says(Asked::Inconclusive),
            )
            .await;
        assert!(matches!(results[0][0], RcptResult::Permanent(_)));
        assert!(matches!(results[0][1], RcptResult::Transient(_)));
    }
}
