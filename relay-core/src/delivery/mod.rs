//! Delivery: from a queue entry to the primary's `250`, or to a bounce.
//!
//! [`Engine::attempt`] is one delivery attempt for one queue entry; it is
//! shared by the embedded worker ([`worker`]) and the AWS retry function.
//! It returns the updated entry (per-recipient status, attempts, next
//! attempt) and the DSN to send, and never touches storage itself.
//!
//! The engine is an orchestrator over typed parts, each in its own file
//! with its pure core unit-tested: [`router`] (record, next hops,
//! lifetime), `hops` (the TLS plan of each hop and the loop over them),
//! [`outcome`] (what the answers make of an entry, and how it is stored),
//! `bounce` (the DSN), `storm_watch` (the bounce-storm guard) and
//! [`crate::observations`] (what deliveries teach recipient verification).

pub use relay_proto::{client, dsn};
mod bounce;
pub mod channel;
pub mod dane;
pub mod destinations;
pub mod etrn;
pub mod handshake;
mod history_hook;
mod hops;
pub mod mta_sts;
pub mod outcome;
pub(crate) mod probe;
pub mod route;
pub mod router;
pub mod storm;
mod storm_watch;
pub mod transport;
pub mod worker;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use client::{Envelope, RcptResult};
use route::{RouteError, SelfIdentity};
use transport::Timeouts;

use crate::address::DomainName;
use crate::alerts::Alerter;
use crate::dns::Resolver;
use crate::queue::{HeldRefusal, QueueEntry, QueueId, RecipientStatus};
use crate::store::{DomainRegistry, MessageStore, RecipientCache};
use crate::time::unix_seconds;

pub use outcome::{commit_outcome, record_attempt, AttemptReport, Backoff, OutcomeWriter};
pub use router::Router;

/// Settings for delivery attempts.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub me: SelfIdentity,
    /// Static next hops per destination domain.
    pub routes: BTreeMap<String, String>,
    pub retry_initial: Duration,
    pub retry_max: Duration,
    pub queue_lifetime: Duration,
    pub timeouts: Timeouts,
    /// Offer STARTTLS to next hops when they advertise it.
    pub opportunistic_tls: bool,
    /// Certificates (PEM) trusted besides the Web PKI roots when a hop's
    /// certificate must be verified (a private CA).
    pub tls_ca_file: Option<std::path::PathBuf>,
    /// Honour destination domains' MTA-STS policies (RFC 8461).
    pub mta_sts: bool,
    /// The HTTPS port policies are fetched from (443; tests use others).
    pub mta_sts_port: u16,
    /// Honour DNSSEC-validated TLSA records (DANE, RFC 7672).
    pub dane: bool,
    /// Most bytes of the original headers a DSN returns.
    pub bounce_headers_max: usize,
    /// A message still queued this long gets one "delayed" notice.
    pub delay_warning: Option<Duration>,
    /// The bounce-storm guard's thresholds.
    pub storm: storm::StormSettings,
}

/// A held domain's mail is looked at again after this long (a release
/// makes it due at once anyway).
const HOLD_RECHECK_SECS: u64 = 3600;

pub struct Engine {
    cfg: EngineConfig,
    router: Arc<Router>,
    hops: hops::Hops,
    bouncer: bounce::Bouncer,
    /// Where delivery results teach recipient verification.
    learning: Option<crate::observations::Learning>,
    storm: storm_watch::StormWatch,
    alerts: Option<Arc<Alerter>>,
    /// Where hosted domains' outages are recorded.
    history: Option<Arc<crate::outages::Recorder>>,
}

impl Engine {
    pub fn new(
        cfg: EngineConfig,
        resolver: Arc<dyn Resolver>,
        registry: Arc<dyn DomainRegistry>,
    ) -> Self {
        let router = Router::new(
            cfg.me.clone(),
            cfg.routes.clone(),
            cfg.queue_lifetime,
            resolver.clone(),
            registry.clone(),
        );
        Engine {
            hops: hops::Hops::new(&cfg, resolver),
            bouncer: bounce::Bouncer {
                hostname: cfg.me.hostname.clone(),
                headers_max: cfg.bounce_headers_max,
            },
            storm: storm_watch::StormWatch::new(cfg.storm, registry),
            router: Arc::new(router),
            learning: None,
            alerts: None,
            history: None,
            cfg,
        }
    }

    /// Alerts for what the engine sees (a bounce storm, expiries).
    pub fn with_alerts(mut self, alerts: Option<Arc<Alerter>>) -> Self {
        self.storm.alerts = alerts.clone();
        self.alerts = alerts;
        self
    }

    /// Delivery sessions are counted in `store` for TLS reports.
    pub fn with_tls_reports(
        mut self,
        store: Option<Arc<dyn crate::store::TlsReportStore>>,
    ) -> Self {
        self.hops.tls_reports = store;
        self
    }

    /// Where alerts go, if anywhere.
    pub fn alerts(&self) -> Option<&Arc<Alerter>> {
        self.alerts.as_ref()
    }

    /// Deliveries to domains with callouts or defer-while-primary-up
    /// record what they learn in `cache`: a recipient the primary took is
    /// valid, one it refused as unknown invalid, and whether the primary
    /// answered at all.
    pub fn with_learning(
        mut self,
        cache: Arc<dyn RecipientCache>,
        valid_ttl: Duration,
        invalid_ttl: Duration,
    ) -> Self {
        self.storm = self.storm.with_cache(cache.clone());
        self.learning = Some(crate::observations::Learning {
            cache,
            valid_ttl,
            invalid_ttl,
        });
        self
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// Routes and lifetimes (ETRN, probes and callouts ask it too).
    pub fn router(&self) -> &Arc<Router> {
        &self.router
    }

    /// The backoff between attempts.
    pub fn backoff(&self) -> Backoff {
        Backoff {
            initial: self.cfg.retry_initial,
            max: self.cfg.retry_max,
        }
    }

    /// How long mail for `domain` may stay queued now.
    pub async fn lifetime_of(&self, domain: &DomainName) -> Duration {
        self.router.lifetime_of(domain).await
    }

    /// Records a primary going down or coming back where every process
    /// sees it (the schedulers' transitions; drains start here).
    pub async fn record_primary(&self, domain: &DomainName, up: bool, now: u64) {
        self.storm.record_primary(domain, up, now).await;
    }

    /// One delivery attempt for the pending recipients of `entry`, whose
    /// body is read from `bodies` piece by piece.
    pub async fn attempt(
        &self,
        entry: &QueueEntry,
        bodies: &dyn MessageStore,
        now: SystemTime,
    ) -> AttemptReport {
        let mut reports = self
            .attempt_batch(std::slice::from_ref(entry), bodies, now)
            .await;
        reports
            .pop()
            .unwrap_or_else(|| AttemptReport::unchanged(entry.clone(), false))
    }

    /// An attempt that could not be made (for `reason`, e.g. the body is
    /// missing from the store): every pending recipient counts a temporary
    /// failure, so the entry backs off and, at the end of its lifetime,
    /// bounces like any other, instead of being retried forever.
    pub async fn attempt_failed(
        &self,
        entry: &QueueEntry,
        reason: &str,
        bodies: &dyn MessageStore,
        now: SystemTime,
    ) -> AttemptReport {
        let mut entry = entry.clone();
        entry.attempts += 1;
        let pending = outcome::pending_of(&entry);
        let results = vec![(RcptResult::Transient(reason.to_string()), ""); pending.len()];
        let record = self.router.hosted(&entry.domain).await.ok().flatten();
        let lifetime = self.router.lifetime(record.as_ref());
        self.finish(
            entry,
            &pending,
            results,
            Vec::new(),
            false,
            lifetime,
            bodies,
            now,
        )
        .await
    }

    /// One attempt for several entries of the same destination domain,
    /// over one connection (one transaction each): fewer handshakes for a
    /// primary that has a queue to catch up on.
    ///
    /// Bodies are read from `bodies` in pieces while they are sent, so a
    /// connection holds [`crate::store::BODY_CHUNK`] of a message at a time.
    pub async fn attempt_batch(
        &self,
        items: &[QueueEntry],
        bodies: &dyn MessageStore,
        now: SystemTime,
    ) -> Vec<AttemptReport> {
        // Entries with nothing pending are finished as they are.
        let mut reports: Vec<Option<AttemptReport>> = Vec::with_capacity(items.len());
        let mut work = Vec::new();
        for entry in items {
            let pending = outcome::pending_of(entry);
            if pending.is_empty() {
                reports.push(Some(AttemptReport::unchanged(entry.clone(), true)));
                continue;
            }
            reports.push(None);
            let mut entry = entry.clone();
            entry.attempts += 1;
            work.push((reports.len() - 1, entry, pending));
        }
        let Some(domain) = work.first().map(|(_, e, _)| e.domain.clone()) else {
            return reports.into_iter().flatten().collect();
        };
        let hosted = self.router.hosted(&domain).await;
        if let Ok(Some(record)) = &hosted {
            if let Some(hold) = record.hold {
                // Held: no attempt, no attempt counted, no expiry; looked
                // at again in an hour (a release makes it due at once).
                tracing::info!(event = "delivery_held", domain = %domain, reason = %hold.reason,
                    entries = work.len());
                let later = unix_seconds(now) + HOLD_RECHECK_SECS;
                for (i, _, _) in &work {
                    let mut entry = items[*i].clone();
                    entry.next_attempt = later;
                    reports[*i] = Some(AttemptReport::unchanged(entry, false));
                }
                return reports.into_iter().flatten().collect();
            }
        }
        let hosted_domain = matches!(hosted, Ok(Some(_)));
        let lifetime = self
            .router
            .lifetime(hosted.as_ref().ok().and_then(Option::as_ref));
        let routed = match hosted {
            Ok(record) => self
                .router
                .route(&domain, record.as_ref())
                .await
                .map(|targets| (record, targets)),
            Err(e) => Err(e),
        };
        let mut destination_down = false;
        let mut answered = false;
        // Which recipients' refusals the bounce-storm guard held back, per
        // message.
        let mut held_back: Vec<Vec<bool>> = Vec::new();
        // The primary offered DSN: success notices are its to send.
        let mut dsn_offered = false;
        // Refusals held back by the bounce-storm guard are looked at again
        // soon (final once the primary is known healthy).
        let mut held_back_until: Option<u64> = None;
        let per_message: Vec<Vec<outcome::RecipientResult>> = match routed {
            Err(RouteError::Permanent { status, text }) => work
                .iter()
                .map(|(_, _, p)| vec![(RcptResult::Permanent(text.clone()), status); p.len()])
                .collect(),
            Err(RouteError::Transient(text)) => work
                .iter()
                .map(|(_, _, p)| vec![(RcptResult::Transient(text.clone()), ""); p.len()])
                .collect(),
            Ok((record, targets)) => {
                let envelopes: Vec<Envelope> = work
                    .iter()
                    .map(|(_, e, pending)| transport::envelope_of(e, pending))
                    .collect();
                let ids: Vec<QueueId> = work.iter().map(|(_, e, _)| e.id.clone()).collect();
                let source = transport::Bodies {
                    store: bodies,
                    ids: &ids,
                };
                let explicit = self.router.explicit(&domain, record.as_ref());
                let plans = self
                    .hops
                    .plans(
                        &domain,
                        record.as_ref(),
                        explicit,
                        targets,
                        unix_seconds(now),
                        &envelopes,
                    )
                    .await;
                let mut report = match plans {
                    Ok(plans) => {
                        self.hops
                            .deliver(&domain, &plans, &envelopes, &source)
                            .await
                    }
                    Err(why) => hops::policy_refusal(&envelopes, &why),
                };
                // A hop that answers but cannot meet the TLS policy is not
                // down: its mail backs off per message (no probe storm).
                dsn_offered = report.dsn_offered;
                answered = report.transaction_started;
                destination_down = !report.transaction_started
                    && !report.tls_policy_failed
                    && report
                        .results
                        .iter()
                        .flatten()
                        .all(|r| matches!(r, RcptResult::Transient(_)));
                let mut verdict = storm::StormVerdict::Normal;
                if destination_down {
                    self.storm.destination_down(&domain);
                } else if let Some(hosted) = &record {
                    let received: Vec<u64> = work.iter().map(|(_, e, _)| e.received_at).collect();
                    // Refusals an operator released are final: the guard
                    // does not hold them back again.
                    let released: Vec<Vec<bool>> = work
                        .iter()
                        .map(|(_, e, pending)| storm_watch::released(e, pending))
                        .collect();
                    let refused_before = storm_watch::refused(&report.results);
                    let ask = |addresses| self.ask_recipients(&domain, addresses);
                    verdict = self
                        .storm
                        .judge(
                            hosted,
                            &envelopes,
                            (&received, &released),
                            &mut report.results,
                            now,
                            ask,
                        )
                        .await;
                    if let storm::StormVerdict::HoldBack { recheck } = verdict {
                        held_back_until = Some(recheck);
                    }
                    held_back = storm_watch::held_back(&refused_before, &report.results);
                }
                let storming = verdict != storm::StormVerdict::Normal;
                if let (Some(record), Some(learning), false) = (&record, &self.learning, storming) {
                    let taught: Vec<(&str, &RcptResult)> = envelopes
                        .iter()
                        .zip(&report.results)
                        .flat_map(|(env, results)| {
                            env.recipients.iter().map(String::as_str).zip(results)
                        })
                        .collect();
                    learning
                        .teach(record, &taught, !destination_down, unix_seconds(now))
                        .await;
                }
                report
                    .results
                    .into_iter()
                    .map(|m| m.into_iter().map(|r| (r, "")).collect())
                    .collect()
            }
        };
        for (m, ((i, entry, pending), results)) in work.into_iter().zip(per_message).enumerate() {
            let relayed = if dsn_offered {
                Vec::new()
            } else {
                bounce::relayed_notices(&entry, &pending, &results)
            };
            let mut report = self
                .finish(
                    entry,
                    &pending,
                    results,
                    relayed,
                    destination_down,
                    lifetime,
                    bodies,
                    now,
                )
                .await;
            let held = held_back.get(m);
            for (k, &r) in pending.iter().enumerate() {
                let state = &mut report.entry.recipients[r];
                let was_held = held.and_then(|h| h.get(k)).copied().unwrap_or(false);
                if state.status == RecipientStatus::Pending
                    && state.held_refusal != Some(HeldRefusal::Final)
                {
                    state.held_refusal = was_held.then_some(HeldRefusal::Held);
                }
            }
            if let (Some(until), false) = (held_back_until, report.finished) {
                // Tried again soon: final once the primary is known healthy,
                // or as the drain ends.
                report.entry.next_attempt = until;
            }
            reports[i] = Some(report);
        }
        let reports: Vec<AttemptReport> = reports.into_iter().flatten().collect();
        let seen = history_hook::Seen::new(hosted_domain, destination_down, answered);
        self.record_history(&domain, seen, items, &reports, now);
        reports
    }

    /// Applies an attempt's results to an entry, alerts an expiry and
    /// builds the DSN for what failed for good.
    #[allow(clippy::too_many_arguments)]
    async fn finish(
        &self,
        entry: QueueEntry,
        pending: &[usize],
        results: Vec<outcome::RecipientResult>,
        relayed: Vec<dsn::FailedRecipient>,
        destination_down: bool,
        lifetime: Duration,
        bodies: &dyn MessageStore,
        now: SystemTime,
    ) -> AttemptReport {
        let applied = outcome::apply(
            entry,
            pending,
            results,
            destination_down,
            lifetime,
            self.backoff(),
            now,
        );
        let mut report = applied.report;
        if let (Some(days), Some(a)) = (applied.expired_after_days, &self.alerts) {
            // One per domain and ten minutes, however many expire.
            a.send_coalesced(
                "expired",
                report.entry.domain.as_str(),
                Duration::from_secs(600),
                serde_json::json!({ "queue_id": report.entry.id.as_str(), "lifetime_days": days }),
            );
        }
        let mut notices = applied.failed;
        notices.extend(relayed);
        if let Some(after) = self.cfg.delay_warning {
            notices.extend(bounce::delay_notices(&mut report.entry, after, now));
        }
        report.bounce = self
            .bouncer
            .bounce_for(&report.entry, &notices, bodies, now)
            .await;
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Domain, Hold, HoldReason};
    use crate::queue::{RecipientState, QUEUE_RECORD_VERSION};
    use crate::store::local::LocalStore;

    fn engine(store: Arc<LocalStore>) -> Engine {
        let mut cfg = EngineConfig::from(&crate::config::Config::default());
        cfg.retry_initial = Duration::from_secs(60);
        cfg.timeouts.connect = Duration::from_secs(2);
        let resolver = crate::dns::HickoryResolver::new(
            &["127.0.0.1:9".parse().unwrap()],
            Duration::from_secs(1),
        )
        .unwrap();
        Engine::new(cfg, Arc::new(resolver), store)
    }

    fn entry(domain: &DomainName, statuses: &[RecipientStatus]) -> QueueEntry {
        QueueEntry {
            delay_warned: false,
            tls_request: None,
            dsn: Default::default(),
            version: QUEUE_RECORD_VERSION,
            id: crate::queue::new_id(SystemTime::now()),
            domain: domain.clone(),
            sender: "s@sender.test".into(),
            recipients: statuses
                .iter()
                .enumerate()
                .map(|(i, status)| RecipientState {
                    address: format!("r{i}@{domain}"),
                    status: status.clone(),
                    last_reply: None,
                    held_refusal: None,
                    dsn: Default::default(),
                })
                .collect(),
            client_ip: "192.0.2.1".parse().unwrap(),
            helo: "client.test".into(),
            received_at: unix_seconds(SystemTime::now()),
            attempts: 0,
            next_attempt: 0,
            last_error: None,
            size: 10,
            smtputf8: false,
            eight_bit: false,
        }
    }

    #[test]
    fn one_delay_notice_per_message_to_the_recipients_that_want_it() {
        let d = DomainName::parse("example.test").unwrap();
        let mut e = entry(
            &d,
            &[
                RecipientStatus::Pending,
                RecipientStatus::Pending,
                RecipientStatus::Pending,
                RecipientStatus::Delivered,
            ],
        );
        e.received_at = 1_000;
        e.recipients[0].last_reply = Some("451 4.3.0 try later".into());
        e.recipients[1].dsn.notify = crate::dsn_params::Notify::parse("NEVER");
        e.recipients[2].dsn.notify = crate::dsn_params::Notify::parse("FAILURE,DELAY");
        let four_hours = Duration::from_secs(4 * 3600);
        let at = |s: u64| SystemTime::UNIX_EPOCH + Duration::from_secs(s);
        assert!(bounce::delay_notices(&mut e, four_hours, at(1_000 + 3 * 3600)).is_empty());
        assert!(!e.delay_warned, "not yet");
        let notices = bounce::delay_notices(&mut e, four_hours, at(1_000 + 4 * 3600));
        let to: Vec<&str> = notices.iter().map(|n| n.address.as_str()).collect();
        assert_eq!(to, ["r0@example.test", "r2@example.test"]);
        assert!(notices.iter().all(|n| n.action == dsn::Action::Delayed));
        assert_eq!(notices[0].status, "4.3.0");
        assert_eq!(notices[1].status, "4.0.0");
        assert!(e.delay_warned);
        assert!(bounce::delay_notices(&mut e, four_hours, at(1_000 + 9 * 3600)).is_empty());
    }

    /// A hosted domain whose primary is a closed port on loopback.
    async fn hosted(store: &LocalStore, hold: Option<Hold>) -> DomainName {
        let name = DomainName::parse("example.test").unwrap();
        let mut d = Domain::new(name.clone());
        d.primary = vec!["127.0.0.1:9".into()];
        d.hold = hold;
        DomainRegistry::put(store, &d).await.unwrap();
        name
    }

    #[tokio::test]
    async fn a_held_domain_is_not_attempted_and_is_looked_at_again_in_an_hour() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(LocalStore::open(dir.path()).unwrap());
        let hold = Hold {
            reason: HoldReason::Operator,
            since: 1,
        };
        let name = hosted(&store, Some(hold)).await;
        let engine = engine(store.clone());
        let now = SystemTime::now();
        let e = entry(&name, &[RecipientStatus::Pending]);
        let report = engine.attempt(&e, store.as_ref(), now).await;
        assert_eq!(report.entry.attempts, 0, "a held attempt is not counted");
        assert_eq!(
            report.entry.next_attempt,
            unix_seconds(now) + HOLD_RECHECK_SECS
        );
        assert!(!report.finished && !report.destination_down && report.bounce.is_none());
    }

    #[tokio::test]
    async fn an_unreachable_primary_is_down_and_the_entry_backs_off() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(LocalStore::open(dir.path()).unwrap());
        let name = hosted(&store, None).await;
        let engine = engine(store.clone());
        let now = SystemTime::now();
        let done = entry(&name, &[RecipientStatus::Delivered]);
        let open = entry(&name, &[RecipientStatus::Pending, RecipientStatus::Failed]);
        let reports = engine
            .attempt_batch(&[done, open], store.as_ref(), now)
            .await;
        assert_eq!(reports.len(), 2);
        assert!(reports[0].finished, "nothing pending: finished as it is");
        let r = &reports[1];
        assert!(r.destination_down);
        assert!(!r.finished);
        assert_eq!(r.entry.attempts, 1);
        assert_eq!(r.entry.next_attempt, unix_seconds(now) + 60);
        assert_eq!(r.entry.recipients[0].status, RecipientStatus::Pending);
        assert!(r.bounce.is_none());
    }
}
