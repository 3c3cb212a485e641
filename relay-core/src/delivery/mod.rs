//! Delivery: from a queue entry to the primary's `250`, or to a bounce.
//!
//! [`Engine::attempt`] is one delivery attempt for one queue entry; it is
//! shared by the embedded worker ([`worker`]) and the AWS retry function.
//! It returns the updated entry (per-recipient status, attempts, next
//! attempt) and the DSN to send, and never touches storage itself.

pub use relay_proto::{client, dsn};
pub mod channel;
pub mod dane;
pub mod destinations;
pub mod etrn;
pub mod mta_sts;
pub(crate) mod probe;
pub mod route;
pub mod storm;
pub mod transport;
pub mod worker;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use client::{Envelope, RcptResult};
use route::{RouteError, SelfIdentity, Target};
use transport::{SessionReport, Timeouts};

use crate::address::DomainName;
use crate::dns::Resolver;
use crate::queue::{AcceptedMessage, AcceptedRecipient, QueueEntry, QueueId, RecipientStatus};
use crate::store::{DomainRegistry, MessageStore};
use crate::time::unix_seconds;

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
    /// The bounce-storm guard's thresholds.
    pub storm: storm::StormSettings,
}

/// The outcome of one attempt.
#[derive(Debug, Clone)]
pub struct AttemptReport {
    /// The entry with its new state; store it (or remove it if finished).
    pub entry: QueueEntry,
    /// No recipient is pending any more: remove the entry.
    pub finished: bool,
    /// A DSN for the sender, to be queued before the entry is updated.
    pub bounce: Option<AcceptedMessage>,
    /// No server could be reached at all (connection refused, timeout,
    /// 421 at greeting): the whole domain should wait.
    pub destination_down: bool,
    /// Recipients delivered in this attempt.
    pub delivered: usize,
}

/// Where an attempt's outcome is written. The embedded store and the AWS
/// queue differ only here; [`commit_outcome`] keeps the order both must.
#[async_trait::async_trait]
pub trait OutcomeWriter: Sync {
    type Error: std::error::Error + Send;
    /// Queues a DSN (a new message to the sender).
    async fn queue_bounce(&self, bounce: &AcceptedMessage) -> Result<(), Self::Error>;
    /// Removes the entry of a message with nothing left pending.
    async fn remove(&self, entry: &QueueEntry) -> Result<(), Self::Error>;
    /// Stores the entry's new state (recipients, attempts, next attempt).
    async fn update(&self, entry: &QueueEntry) -> Result<(), Self::Error>;
}

/// Logs and counts one attempt: the same event and counters whichever
/// process made it (the embedded worker or retry-fn).
pub fn record_attempt(report: &AttemptReport) {
    let e = &report.entry;
    tracing::info!(
        event = "delivery_attempt", queue_id = %e.id, domain = %e.domain, attempt = e.attempts,
        delivered = report.delivered, finished = report.finished, error = e.last_error.as_deref().unwrap_or("")
    );
    metrics::counter!("backupmx_delivered_total").increment(report.delivered as u64);
}

/// Stores an attempt's outcome, for both backends: the DSN first (so a
/// crash in between repeats the attempt rather than losing the bounce),
/// then the entry removed or updated. A DSN once stored is taken out of
/// the report, so a retry after a failed entry write does not queue it
/// twice.
pub async fn commit_outcome<W: OutcomeWriter + ?Sized>(
    report: &mut AttemptReport,
    writer: &W,
) -> Result<(), W::Error> {
    if let Some(bounce) = &report.bounce {
        writer.queue_bounce(bounce).await?;
        tracing::info!(event = "bounce_queued", queue_id = %report.entry.id, dsn_id = %bounce.id,
            to = %report.entry.sender);
        metrics::counter!("backupmx_bounces_queued_total").increment(1);
        report.bounce = None;
    }
    if report.finished {
        writer.remove(&report.entry).await
    } else {
        writer.update(&report.entry).await
    }
}

/// A held domain's mail is looked at again after this long (a release
/// makes it due at once anyway).
const HOLD_RECHECK_SECS: u64 = 3600;

pub struct Engine {
    cfg: EngineConfig,
    resolver: Arc<dyn Resolver>,
    registry: Arc<dyn DomainRegistry>,
    tls: Option<Arc<rustls::ClientConfig>>,
    /// STARTTLS with any certificate, for `tls = "required"` hops.
    any_certificate: Arc<rustls::ClientConfig>,
    /// STARTTLS with a certificate valid for the hop's name.
    verifying: Arc<rustls::ClientConfig>,
    /// MTA-STS policies of the destinations.
    sts: Option<mta_sts::StsPolicies>,
    /// Destinations already logged as not hosted.
    unhosted: crate::sync::Mutex<std::collections::HashSet<DomainName>>,
    /// Where delivery results teach recipient verification.
    learning: Option<crate::observations::Learning>,
    storm: storm::StormGuard,
    alerts: Option<Arc<crate::alerts::Alerter>>,
    /// Shared primary states read for drain detection, per domain, with
    /// when they were read (kept a few seconds: one read per domain per
    /// process, not per attempt).
    shared_states: crate::sync::Mutex<
        std::collections::HashMap<
            DomainName,
            (Option<crate::verify::PrimaryState>, std::time::Instant),
        >,
    >,
}

/// How long a shared primary state read for drain detection is reused.
const SHARED_STATE_TTL: Duration = Duration::from_secs(5);

impl Engine {
    pub fn new(
        cfg: EngineConfig,
        resolver: Arc<dyn Resolver>,
        registry: Arc<dyn DomainRegistry>,
    ) -> Self {
        let tls = cfg.opportunistic_tls.then(transport::opportunistic_tls);
        let extra_roots = match &cfg.tls_ca_file {
            None => Vec::new(),
            // The configuration's validation read it already; a file gone
            // since then leaves the Web PKI roots only.
            Some(path) => transport::load_ca_file(path).unwrap_or_else(|e| {
                tracing::error!(event = "tls_ca_file_unreadable", error = %e);
                Vec::new()
            }),
        };
        let cfg_storm = cfg.storm;
        let verifying = transport::verifying_tls(&extra_roots);
        let sts = cfg.mta_sts.then(|| {
            mta_sts::StsPolicies::new(
                resolver.clone(),
                verifying.clone(),
                cfg.mta_sts_port,
                cfg.timeouts.connect.min(Duration::from_secs(30)),
            )
        });
        Engine {
            cfg,
            resolver,
            registry,
            tls,
            any_certificate: transport::opportunistic_tls(),
            verifying,
            sts,
            unhosted: Default::default(),
            learning: None,
            storm: storm::StormGuard::new(cfg_storm),
            alerts: None,
            shared_states: Default::default(),
        }
    }

    /// Alerts for what the engine sees (a bounce storm, expiries).
    pub fn with_alerts(mut self, alerts: Option<Arc<crate::alerts::Alerter>>) -> Self {
        self.alerts = alerts;
        self
    }

    /// Where alerts go, if anywhere.
    pub fn alerts(&self) -> Option<&Arc<crate::alerts::Alerter>> {
        self.alerts.as_ref()
    }

    /// Deliveries to domains with callouts or defer-while-primary-up
    /// record what they learn in `cache`: a recipient the primary took is
    /// valid, one it refused as unknown invalid, and whether the primary
    /// answered at all.
    pub fn with_learning(
        mut self,
        cache: Arc<dyn crate::store::RecipientCache>,
        valid_ttl: Duration,
        invalid_ttl: Duration,
    ) -> Self {
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

    pub fn resolver(&self) -> &Arc<dyn Resolver> {
        &self.resolver
    }

    /// Exponential backoff: `retry_initial` doubling up to `retry_max`.
    pub fn backoff(&self, attempts: u32) -> Duration {
        let factor = 1u32
            .checked_shl(attempts.saturating_sub(1).min(31))
            .unwrap_or(u32::MAX);
        self.cfg
            .retry_initial
            .saturating_mul(factor)
            .min(self.cfg.retry_max)
    }

    /// Where mail for `domain` goes now.
    pub async fn targets_for(&self, domain: &DomainName) -> Result<Vec<Target>, RouteError> {
        self.route_for(domain).await.map(|(_, targets)| targets)
    }

    /// Where mail for `domain` goes now, and its hosted-domain record.
    async fn route_for(
        &self,
        domain: &DomainName,
    ) -> Result<(Option<crate::domain::Domain>, Vec<Target>), RouteError> {
        let record = self.hosted(domain).await?;
        let targets = self.route(domain, record.as_ref()).await?;
        Ok((record, targets))
    }

    /// The hosted-domain record of `domain` (`None`: not hosted, delivered
    /// by MX). One read serves the hold check, the route, the lifetime and
    /// what the attempt learns.
    async fn hosted(
        &self,
        domain: &DomainName,
    ) -> Result<Option<crate::domain::Domain>, RouteError> {
        let record = match self.registry.get(domain).await {
            Ok(Some(d)) => Some(d),
            Ok(None) => {
                // Queued mail of a domain that was removed (or a DSN's
                // destination): said once per domain, then by MX.
                let first = {
                    let mut seen = self.unhosted.lock();
                    if seen.len() >= 10_000 {
                        seen.clear();
                    }
                    seen.insert(domain.clone())
                };
                if first && !self.cfg.routes.contains_key(domain.as_str()) {
                    tracing::info!(event = "delivering_by_mx", domain = %domain,
                        "not a hosted domain (a DSN's destination, or removed with mail queued): delivered to its MX hosts");
                }
                None
            }
            Err(e) => {
                return Err(RouteError::Transient(format!(
                    "domain lookup: {}",
                    crate::error::Report(&e)
                )))
            }
        };
        Ok(record)
    }

    /// The targets for `domain` with its record's primaries.
    async fn route(
        &self,
        domain: &DomainName,
        record: Option<&crate::domain::Domain>,
    ) -> Result<Vec<Target>, RouteError> {
        let primaries = record.map_or(&[][..], |d| d.primary.as_slice());
        route::targets(
            self.resolver.as_ref(),
            &self.cfg.me,
            &self.cfg.routes,
            domain.as_str(),
            primaries,
        )
        .await
    }

    /// How long mail for `domain` may stay queued now (its own lifetime,
    /// or the global one; the global one if the record cannot be read).
    pub async fn lifetime_of(&self, domain: &DomainName) -> Duration {
        let record = self.registry.get(domain).await.ok().flatten();
        self.lifetime(record.as_ref())
    }

    /// How long mail for this domain may stay queued.
    fn lifetime(&self, record: Option<&crate::domain::Domain>) -> Duration {
        record
            .and_then(|d| d.queue_lifetime)
            .map_or(self.cfg.queue_lifetime, Duration::from_secs)
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
        reports.pop().unwrap_or_else(|| AttemptReport {
            entry: entry.clone(),
            finished: false,
            bounce: None,
            destination_down: false,
            delivered: 0,
        })
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
        let pending: Vec<usize> = (0..entry.recipients.len())
            .filter(|&i| entry.recipients[i].status == RecipientStatus::Pending)
            .collect();
        let results = vec![(RcptResult::Transient(reason.to_string()), ""); pending.len()];
        let record = self.hosted(&entry.domain).await.ok().flatten();
        let lifetime = self.lifetime(record.as_ref());
        let (mut report, failed) =
            self.finish_entry(entry, &pending, results, false, lifetime, now);
        report.bounce = self.bounce_for(&report.entry, &failed, bodies, now).await;
        report
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
        struct Work {
            entry: QueueEntry,
            pending: Vec<usize>,
        }
        let mut work = Vec::new();
        let mut reports: Vec<Option<AttemptReport>> = Vec::new();
        for entry in items {
            let pending: Vec<usize> = (0..entry.recipients.len())
                .filter(|&i| entry.recipients[i].status == RecipientStatus::Pending)
                .collect();
            if pending.is_empty() {
                reports.push(Some(AttemptReport {
                    entry: entry.clone(),
                    finished: true,
                    bounce: None,
                    destination_down: false,
                    delivered: 0,
                }));
            } else {
                reports.push(None);
            }
            let mut entry = entry.clone();
            entry.attempts += 1;
            work.push(Work { entry, pending });
        }
        let active: Vec<usize> = (0..items.len()).filter(|&i| reports[i].is_none()).collect();
        let Some(&first) = active.first() else {
            return reports.into_iter().flatten().collect();
        };
        let domain = work[first].entry.domain.clone();
        let mut destination_down = false;
        // Refusals held back by the bounce-storm guard wait for the drain's end.
        let mut held_back_until: Option<u64> = None;
        let hosted = self.hosted(&domain).await;
        if let Ok(Some(record)) = &hosted {
            if let Some(hold) = record.hold {
                // Held: no attempt, no attempt counted, no expiry; looked
                // at again in an hour (a release makes it due at once).
                tracing::info!(event = "delivery_held", domain = %domain, reason = %hold.reason,
                    entries = active.len());
                let later = unix_seconds(now) + HOLD_RECHECK_SECS;
                for &i in &active {
                    let mut entry = items[i].clone();
                    entry.next_attempt = later;
                    reports[i] = Some(AttemptReport {
                        entry,
                        finished: false,
                        bounce: None,
                        destination_down: false,
                        delivered: 0,
                    });
                }
                return reports.into_iter().flatten().collect();
            }
        }
        let lifetime = self.lifetime(hosted.as_ref().ok().and_then(Option::as_ref));
        let routed = match hosted {
            Ok(record) => self
                .route(&domain, record.as_ref())
                .await
                .map(|targets| (record, targets)),
            Err(e) => Err(e),
        };
        let per_message: Vec<Vec<(RcptResult, &'static str)>> = match routed {
            Err(RouteError::Permanent { status, text }) => active
                .iter()
                .map(|&i| {
                    vec![(RcptResult::Permanent(text.clone()), status); work[i].pending.len()]
                })
                .collect(),
            Err(RouteError::Transient(text)) => active
                .iter()
                .map(|&i| vec![(RcptResult::Transient(text.clone()), ""); work[i].pending.len()])
                .collect(),
            Ok((record, targets)) => {
                let envelopes: Vec<Envelope> = active
                    .iter()
                    .map(|&i| {
                        let e = &work[i].entry;
                        Envelope {
                            sender: e.sender.clone(),
                            recipients: work[i]
                                .pending
                                .iter()
                                .map(|&r| e.recipients[r].address.clone())
                                .collect(),
                            size: e.size,
                            smtputf8: e.smtputf8,
                            eight_bit: e.eight_bit,
                        }
                    })
                    .collect();
                let ids: Vec<QueueId> = active.iter().map(|&i| work[i].entry.id.clone()).collect();
                let source = transport::Bodies {
                    store: bodies,
                    ids: &ids,
                };
                let plans = self
                    .hop_plans(&domain, record.as_ref(), targets, unix_seconds(now))
                    .await;
                let mut report = match plans {
                    Ok(plans) => self.try_targets(&domain, &plans, &envelopes, &source).await,
                    Err(why) => policy_refusal(&envelopes, &why),
                };
                // A hop that answers but cannot meet the TLS policy is not
                // down: its mail backs off per message (no probe storm).
                destination_down = !report.transaction_started
                    && !report.tls_policy_failed
                    && report
                        .results
                        .iter()
                        .flatten()
                        .all(|r| matches!(r, RcptResult::Transient(_)));
                let mut storm_verdict = storm::StormVerdict::Normal;
                if destination_down {
                    self.storm.destination_down(&domain);
                } else if record.is_some() {
                    storm_verdict = self
                        .guard_storm(&domain, &envelopes, &mut report.results, now)
                        .await;
                    if let storm::StormVerdict::HoldBack { until } = storm_verdict {
                        held_back_until = Some(until);
                    }
                }
                let storming = storm_verdict != storm::StormVerdict::Normal;
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
        for (&i, results) in active.iter().zip(per_message) {
            let w = &work[i];
            let (mut report, failed) = self.finish_entry(
                w.entry.clone(),
                &w.pending,
                results,
                destination_down,
                lifetime,
                now,
            );
            if let (Some(until), false) = (held_back_until, report.finished) {
                // Tried again as the drain ends, when a refusal is final.
                report.entry.next_attempt = until;
            }
            report.bounce = self.bounce_for(&report.entry, &failed, bodies, now).await;
            reports[i] = Some(report);
        }
        reports.into_iter().flatten().collect()
    }

    /// The bounce-storm guard on one attempt's answers: during a drain,
    /// remote refusals become temporary (no DSN); if nearly all of the
    /// drain was refused, the domain is held and an alert sent.
    async fn guard_storm(
        &self,
        domain: &DomainName,
        envelopes: &[Envelope],
        results: &mut [Vec<RcptResult>],
        now: SystemTime,
    ) -> storm::StormVerdict {
        let mut delivered = Vec::new();
        let mut refused = Vec::new();
        for (env, rs) in envelopes.iter().zip(results.iter()) {
            for (addr, r) in env.recipients.iter().zip(rs) {
                match r {
                    RcptResult::Delivered(_) => delivered.push(addr.as_str()),
                    RcptResult::Permanent(_) => refused.push(addr.as_str()),
                    RcptResult::Transient(_) => {}
                }
            }
        }
        let now_secs = unix_seconds(now);
        if !refused.is_empty() {
            if let Some(state) = self.shared_state(domain).await {
                if state.up {
                    self.storm.drain_started(domain, state.since, now_secs);
                } else {
                    // Recorded down, and this attempt got an answer: the
                    // primary is back, whether or not another process has
                    // recorded it yet. Recorded here too, so the drain has
                    // one start for every process and ends with its window.
                    self.storm.answered_while_recorded_down(domain, now_secs);
                    self.record_primary(domain, true, now_secs).await;
                }
            }
        }
        let verdict = self.storm.answered(domain, &delivered, &refused, now_secs);
        let note = match verdict {
            storm::StormVerdict::Normal => return verdict,
            storm::StormVerdict::HoldBack { .. } => {
                "held back: the primary answered again after an outage, refusals wait for the drain's end"
            }
            storm::StormVerdict::Trip { refused, answered } => {
                metrics::counter!("backupmx_bounce_storms_total").increment(1);
                tracing::warn!(event = "bounce_storm", domain = %domain, refused, answered,
                    "the primary refused nearly all of a drain: domain held, no DSN sent");
                self.hold_for_storm(domain, refused, answered, now_secs).await;
                "held by the bounce-storm guard: the primary refused nearly all of a drain"
            }
        };
        for r in results.iter_mut().flatten() {
            if let RcptResult::Permanent(text) = r {
                *r = RcptResult::Transient(format!("{text} ({note})"));
            }
        }
        verdict
    }

    /// The primary's state as every process on the store sees it (read at
    /// most every few seconds per domain).
    async fn shared_state(&self, domain: &DomainName) -> Option<crate::verify::PrimaryState> {
        let learning = self.learning.as_ref()?;
        if let Some((state, at)) = self.shared_states.lock().get(domain) {
            if at.elapsed() < SHARED_STATE_TTL {
                return *state;
            }
        }
        let state = learning.cache.primary_state(domain).await.ok().flatten();
        self.shared_states
            .lock()
            .insert(domain.clone(), (state, std::time::Instant::now()));
        state
    }

    /// Records a primary going down or coming back where every process
    /// sees it (the AWS retry function's transitions; drains start here).
    pub async fn record_primary(&self, domain: &DomainName, up: bool, now: u64) {
        if let Some(l) = &self.learning {
            crate::observations::observe_primary(l.cache.as_ref(), domain, up, now).await;
            self.shared_states.lock().remove(domain);
        }
    }

    async fn hold_for_storm(&self, domain: &DomainName, refused: usize, answered: usize, now: u64) {
        match self.registry.get(domain).await {
            Ok(Some(mut d)) if d.hold.is_none() => {
                d.hold = Some(crate::domain::Hold {
                    reason: crate::domain::HoldReason::BounceStorm,
                    since: now,
                });
                if let Err(e) = self.registry.put(&d).await {
                    tracing::error!(event = "hold_not_stored", domain = %domain, error = %crate::error::Report(&e));
                    return;
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
            }
            Ok(_) => {}
            Err(e) => {
                tracing::error!(event = "hold_not_stored", domain = %domain, error = %crate::error::Report(&e));
            }
        }
    }

    /// Applies one attempt's per-recipient results to an entry; returns the
    /// report (without its DSN) and the recipients that failed for good.
    fn finish_entry(
        &self,
        mut entry: QueueEntry,
        pending: &[usize],
        results: Vec<(RcptResult, &'static str)>,
        destination_down: bool,
        lifetime: Duration,
        now: SystemTime,
    ) -> (AttemptReport, Vec<dsn::FailedRecipient>) {
        let mut failed = Vec::new();
        let mut delivered = 0;
        let mut errors = Vec::new();
        for (&i, (result, route_status)) in pending.iter().zip(results) {
            let rcpt = &mut entry.recipients[i];
            match result {
                RcptResult::Delivered(text) => {
                    rcpt.status = RecipientStatus::Delivered;
                    rcpt.last_reply = Some(text);
                    delivered += 1;
                }
                RcptResult::Transient(text) => {
                    errors.push(text.clone());
                    rcpt.last_reply = Some(text);
                }
                RcptResult::Permanent(text) => {
                    rcpt.status = RecipientStatus::Failed;
                    let (status, remote) = if route_status.is_empty() {
                        (dsn::status_from_reply(&text, "5.0.0"), true)
                    } else {
                        (route_status.to_string(), false)
                    };
                    if status.starts_with("5.1.") {
                        // The backscatter a backup MX still causes: a
                        // recipient we took that the primary does not know.
                        metrics::counter!("backupmx_unknown_user_bounces_total").increment(1);
                    }
                    failed.push(dsn::FailedRecipient {
                        address: rcpt.address.clone(),
                        status,
                        diagnostic: text.clone(),
                        remote,
                    });
                    errors.push(text.clone());
                    rcpt.last_reply = Some(text);
                }
            }
        }
        entry.last_error = errors.into_iter().next();
        let now_secs = unix_seconds(now);
        let still_pending = entry
            .recipients
            .iter()
            .any(|r| r.status == RecipientStatus::Pending);
        if still_pending && now_secs >= entry.received_at.saturating_add(lifetime.as_secs()) {
            let days = lifetime.as_secs() / 86_400;
            if let Some(a) = &self.alerts {
                // One per domain and ten minutes, however many expire.
                a.send_coalesced(
                    "expired",
                    entry.domain.as_str(),
                    Duration::from_secs(600),
                    serde_json::json!({ "queue_id": entry.id.as_str(), "lifetime_days": days }),
                );
            }
            for rcpt in entry
                .recipients
                .iter_mut()
                .filter(|r| r.status == RecipientStatus::Pending)
            {
                rcpt.status = RecipientStatus::Failed;
                let last = rcpt.last_reply.clone().unwrap_or_default();
                failed.push(dsn::FailedRecipient {
                    address: rcpt.address.clone(),
                    status: "4.4.7".into(),
                    diagnostic: format!(
                        "message expired after {days} days in the queue; last error: {last}"
                    ),
                    remote: false,
                });
            }
        }
        let finished = !entry
            .recipients
            .iter()
            .any(|r| r.status == RecipientStatus::Pending);
        if !finished {
            entry.next_attempt = now_secs + self.backoff(entry.attempts).as_secs();
        }
        let report = AttemptReport {
            entry,
            finished,
            bounce: None,
            destination_down,
            delivered,
        };
        (report, failed)
    }

    /// Each target with the TLS it must get: the domain's own policy,
    /// raised by its MTA-STS policy (RFC 8461 §4–5) and by DANE. An
    /// enforced policy that no MX host matches, or TLSA lookups that fail
    /// for every host, are an error (the mail waits).
    async fn hop_plans(
        &self,
        domain: &DomainName,
        record: Option<&crate::domain::Domain>,
        targets: Vec<Target>,
        now: u64,
    ) -> Result<Vec<(Target, HopPlan)>, String> {
        let plans = self.sts_plans(domain, record, targets, now).await?;
        if !self.cfg.dane {
            return Ok(plans);
        }
        self.dane_plans(domain, plans).await
    }

    /// DANE (RFC 7672) over the other plans: a host with validated TLSA
    /// records gets TLS authenticated by them (DANE takes precedence over
    /// MTA-STS, RFC 8461 §2); a host whose TLSA lookup fails or does not
    /// validate is not used now.
    async fn dane_plans(
        &self,
        domain: &DomainName,
        plans: Vec<(Target, HopPlan)>,
    ) -> Result<Vec<(Target, HopPlan)>, String> {
        use crate::dns::TlsaAnswer;
        let mut out = Vec::with_capacity(plans.len());
        let mut failure = None;
        for (target, mut plan) in plans {
            if target.host.parse::<std::net::IpAddr>().is_ok() {
                out.push((target, plan));
                continue;
            }
            let name = format!("_25._tcp.{}", target.host);
            match self.resolver.tlsa_validated(&name).await {
                TlsaAnswer::NotApplicable => out.push((target, plan)),
                TlsaAnswer::Secure(records) => {
                    tracing::info!(event = "dane_tlsa", domain = %domain, host = %target.host, records = records.len(), "TLS authenticated by TLSA records");
                    plan.tls = crate::domain::TlsPolicy::Verified;
                    plan.source = "dane";
                    plan.testing_fallback = None;
                    plan.dane = Some(dane::DaneVerifier::client_config(records));
                    out.push((target, plan));
                }
                TlsaAnswer::Failed(why) => {
                    tracing::warn!(event = "tls_policy_failed", domain = %domain, host = %target.host, policy = "dane", error = %why);
                    metrics::counter!("backupmx_tls_policy_failures_total", "policy" => "dane")
                        .increment(1);
                    failure = Some(format!("DANE: {why}"));
                }
            }
        }
        match (out.is_empty(), failure) {
            (true, Some(why)) => Err(why),
            _ => Ok(out),
        }
    }

    /// The domain's own policy raised by its MTA-STS policy.
    async fn sts_plans(
        &self,
        domain: &DomainName,
        record: Option<&crate::domain::Domain>,
        targets: Vec<Target>,
        now: u64,
    ) -> Result<Vec<(Target, HopPlan)>, String> {
        use crate::domain::TlsPolicy;
        use crate::mta_sts::Mode;
        let own = record.map_or(TlsPolicy::Opportunistic, |r| r.tls);
        let plain = |t: Target| {
            (
                t,
                HopPlan {
                    tls: own,
                    source: "domain",
                    testing_fallback: None,
                    dane: None,
                },
            )
        };
        // A policy's patterns name hosts: next hops given as addresses
        // (explicit primaries) are never covered, so no lookup is needed.
        let named = targets
            .iter()
            .any(|t| t.host.parse::<std::net::IpAddr>().is_err());
        let policy = match (&self.sts, named) {
            (Some(sts), true) => sts.policy(domain, now).await,
            _ => None,
        };
        let Some(policy) = policy.filter(|p| p.mode != Mode::None) else {
            return Ok(targets.into_iter().map(plain).collect());
        };
        // Explicit next hops (the domain's primaries, a static route) are
        // the operator's choice: the policy raises the TLS of those it
        // names, and leaves the others as they are.
        let explicit = record.is_some_and(|r| !r.primary.is_empty())
            || self.cfg.routes.contains_key(domain.as_str());
        let mut plans = Vec::new();
        for t in targets {
            let listed = policy.allows(&t.host);
            match (policy.mode, listed) {
                (Mode::Enforce, true) => plans.push((
                    t,
                    HopPlan {
                        tls: TlsPolicy::Verified,
                        source: "mta-sts",
                        testing_fallback: None,
                        dane: None,
                    },
                )),
                (Mode::Enforce, false) if explicit => plans.push(plain(t)),
                (Mode::Enforce, false) => {
                    tracing::info!(event = "mta_sts_mx_skipped", domain = %domain, host = %t.host,
                        "not in the domain's MTA-STS policy")
                }
                (_, true) => plans.push((
                    t,
                    HopPlan {
                        tls: TlsPolicy::Verified,
                        source: "mta-sts",
                        testing_fallback: Some(own),
                        dane: None,
                    },
                )),
                (_, false) => {
                    if !explicit {
                        tracing::warn!(event = "mta_sts_testing_failure", domain = %domain, host = %t.host,
                            error = "MX host not in the policy (testing mode: delivered anyway)");
                        metrics::counter!("backupmx_mta_sts_testing_failures_total").increment(1);
                    }
                    plans.push(plain(t));
                }
            }
        }
        if plans.is_empty() {
            metrics::counter!("backupmx_tls_policy_failures_total", "policy" => "mta-sts")
                .increment(1);
            let why = format!(
                "MTA-STS policy of {domain} (enforce) lists none of its MX hosts: mx {}",
                policy.mx.join(", ")
            );
            tracing::warn!(event = "tls_policy_failed", domain = %domain, policy = "mta-sts", error = %why);
            return Err(why);
        }
        Ok(plans)
    }

    /// Tries the targets in order until one holds a transaction, each
    /// with the TLS its plan asks for.
    async fn try_targets(
        &self,
        domain: &DomainName,
        plans: &[(Target, HopPlan)],
        envelopes: &[Envelope],
        bodies: &transport::Bodies<'_>,
    ) -> SessionReport {
        let mut last = None;
        for (target, plan) in plans {
            for addr in &target.addrs {
                let host = &self.cfg.me.hostname;
                let mut report = transport::deliver(
                    *addr,
                    &target.host,
                    host,
                    self.hop_tls(plan),
                    &self.cfg.timeouts,
                    envelopes.to_vec(),
                    bodies,
                )
                .await;
                let mut tls_policy = plan.tls;
                if report.tls_policy_failed {
                    let why = first_transient(&report).to_string();
                    match plan.testing_fallback {
                        Some(fallback) => {
                            // MTA-STS testing: report, and deliver as usual.
                            tracing::warn!(event = "mta_sts_testing_failure", domain = %domain, host = %target.host, addr = %addr, error = %why);
                            metrics::counter!("backupmx_mta_sts_testing_failures_total")
                                .increment(1);
                            tls_policy = fallback;
                            report = transport::deliver(
                                *addr,
                                &target.host,
                                host,
                                self.hop_tls(&HopPlan {
                                    tls: fallback,
                                    source: "domain",
                                    testing_fallback: None,
                                    dane: None,
                                }),
                                &self.cfg.timeouts,
                                envelopes.to_vec(),
                                bodies,
                            )
                            .await;
                        }
                        None => {
                            let label = if plan.source == "domain" {
                                plan.tls.to_string()
                            } else {
                                plan.source.to_string()
                            };
                            tracing::warn!(event = "tls_policy_failed", domain = %domain, host = %target.host, addr = %addr, policy = %label, error = %why);
                            metrics::counter!("backupmx_tls_policy_failures_total", "policy" => label)
                                .increment(1);
                        }
                    }
                }
                if report.tls_failed && !report.tls_policy_failed {
                    // Opportunistic TLS: a broken handshake must not stop delivery.
                    tracing::info!(event = "tls_fallback_plaintext", addr = %addr);
                    report = transport::deliver(
                        *addr,
                        &target.host,
                        host,
                        transport::HopTls::Off,
                        &self.cfg.timeouts,
                        envelopes.to_vec(),
                        bodies,
                    )
                    .await;
                }
                let conclusive = report.transaction_started
                    || report
                        .results
                        .iter()
                        .flatten()
                        .any(|r| !matches!(r, RcptResult::Transient(_)));
                let source = if tls_policy == plan.tls {
                    plan.source
                } else {
                    "domain"
                };
                tracing::debug!(event = "delivery_session", addr = %addr, host = %target.host, conclusive,
                    tls = report.tls, policy = %tls_policy, policy_source = source, messages = envelopes.len());
                if report.transaction_started {
                    let label = if source == "domain" {
                        tls_policy.to_string()
                    } else {
                        source.to_string()
                    };
                    metrics::counter!("backupmx_delivery_sessions_total",
                        "policy" => label,
                        "tls" => if report.tls { "yes" } else { "no" })
                    .increment(1);
                }
                last = Some(report);
                if conclusive {
                    break;
                }
            }
            if last.as_ref().is_some_and(|r| r.transaction_started) {
                break;
            }
        }
        last.unwrap_or_else(|| unreachable_report(envelopes))
    }

    fn hop_tls<'a>(&'a self, plan: &'a HopPlan) -> transport::HopTls<'a> {
        use crate::domain::TlsPolicy;
        if let Some(dane) = &plan.dane {
            return transport::HopTls::Required(dane);
        }
        match (plan.tls, self.tls.as_ref()) {
            (TlsPolicy::Verified, _) => transport::HopTls::Required(&self.verifying),
            (TlsPolicy::Required, _) => transport::HopTls::Required(&self.any_certificate),
            (TlsPolicy::Opportunistic, Some(c)) => transport::HopTls::Opportunistic(c),
            (TlsPolicy::Opportunistic, None) => transport::HopTls::Off,
        }
    }

    async fn bounce_for(
        &self,
        entry: &QueueEntry,
        failed: &[dsn::FailedRecipient],
        bodies: &dyn MessageStore,
        now: SystemTime,
    ) -> Option<AcceptedMessage> {
        // RFC 5321 §6.1 / RFC 3464: never bounce a bounce.
        if failed.is_empty() || entry.sender.is_empty() {
            return None;
        }
        let sender = crate::address::parse_mailbox(&entry.sender).ok()?;
        let domain = sender.domain()?.clone();
        // The start of the message is enough: only its headers go back. A
        // DSN must not be lost to a read error; it then goes without them.
        let head = match bodies
            .read_chunk(&entry.id, 0, self.cfg.bounce_headers_max + 4)
            .await
        {
            Ok(head) => head.unwrap_or_default(),
            Err(e) => {
                tracing::warn!(event = "dsn_headers_unreadable", queue_id = %entry.id, error = %crate::error::Report(&e));
                Vec::new()
            }
        };
        let id = crate::queue::new_id(now);
        let message = dsn::build(
            &self.cfg.me.hostname,
            self.cfg.bounce_headers_max,
            entry,
            failed,
            &head,
            now,
            &id,
        );
        Some(AcceptedMessage {
            id,
            sender: String::new(),
            recipients: vec![AcceptedRecipient {
                address: entry.sender.clone(),
                domain,
            }],
            client_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            helo: self.cfg.me.hostname.clone(),
            received_at: now,
            smtputf8: !entry.sender.is_ascii(),
            eight_bit: false,
            body: message,
            deferred: Vec::new(),
            spooled: None,
        })
    }
}

/// The TLS a connection to one target must have, and where that came from.
#[derive(Debug, Clone)]
struct HopPlan {
    tls: crate::domain::TlsPolicy,
    /// `domain` (its `tls` setting), `mta-sts` or `dane`.
    source: &'static str,
    /// MTA-STS testing mode: the policy to deliver with when the verified
    /// connection fails (after reporting it).
    testing_fallback: Option<crate::domain::TlsPolicy>,
    /// DANE: TLS authenticated by the host's TLSA records.
    dane: Option<Arc<rustls::ClientConfig>>,
}

fn first_transient(report: &SessionReport) -> &str {
    report
        .results
        .iter()
        .flatten()
        .find_map(|r| match r {
            RcptResult::Transient(t) => Some(t.as_str()),
            _ => None,
        })
        .unwrap_or_default()
}

/// Every recipient deferred by a TLS policy that no target can meet.
fn policy_refusal(envelopes: &[Envelope], why: &str) -> SessionReport {
    SessionReport {
        results: envelopes
            .iter()
            .map(|e| vec![RcptResult::Transient(why.to_string()); e.recipients.len()])
            .collect(),
        transaction_started: false,
        tls: false,
        tls_failed: false,
        tls_policy_failed: true,
    }
}

fn unreachable_report(envelopes: &[Envelope]) -> SessionReport {
    SessionReport {
        results: envelopes
            .iter()
            .map(|e| {
                vec![RcptResult::Transient("no address to connect to".into()); e.recipients.len()]
            })
            .collect(),
        transaction_started: false,
        tls: false,
        tls_failed: false,
        tls_policy_failed: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(crate::store::local::LocalStore::open(dir.path()).unwrap());
        let engine = Engine::new(
            EngineConfig {
                me: SelfIdentity {
                    hostname: "mx2.test".into(),
                    listen: vec![],
                    mx_port: 25,
                },
                routes: BTreeMap::new(),
                retry_initial: Duration::from_secs(60),
                retry_max: Duration::from_secs(900),
                queue_lifetime: Duration::from_secs(5 * 86_400),
                timeouts: EngineConfig::from(&crate::config::Config::default()).timeouts,
                opportunistic_tls: false,
                tls_ca_file: None,
                mta_sts: false,
                mta_sts_port: 443,
                dane: false,
                bounce_headers_max: 50 * 1024,
                storm: EngineConfig::from(&crate::config::Config::default()).storm,
            },
            Arc::new(
                crate::dns::HickoryResolver::new(
                    &["127.0.0.1:9".parse().unwrap()],
                    Duration::from_secs(1),
                )
                .unwrap(),
            ),
            store,
        );
        let secs: Vec<u64> = (1..=7).map(|a| engine.backoff(a).as_secs()).collect();
        assert_eq!(secs, [60, 120, 240, 480, 900, 900, 900]);
        assert_eq!(engine.backoff(1000).as_secs(), 900);
    }
}
