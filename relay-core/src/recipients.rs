//! Recipient verification at RCPT time: the callout cache, callouts to the
//! primary, and deferring while the primary is up.
//!
//! A backup MX that accepts any local part turns every message to a
//! non-existent user into a bounce to a (usually forged) sender once the
//! primary refuses it: backscatter. With `recipient_verify = "callout"` a
//! recipient outside the static list is checked against the primary while
//! it answers, and what it said is remembered for when it does not. With
//! `defer_while_primary_up`, mail is not taken at all while the primary is
//! known to answer: real senders retry the primary; spam aimed at the
//! backup gives up.
//!
//! Verification fails open: a store error, a timeout, a primary that
//! refuses to be asked or answers 4xx never rejects a recipient. Only a
//! clear "no such user" from the primary does, now or from the cache.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::Semaphore;

use crate::address::{DomainName, Mailbox};
use crate::delivery::channel::ChannelError;
use crate::delivery::transport::Channel;
use crate::delivery::Engine;
use crate::domain::{Domain, RecipientVerify, TlsPolicy};
use crate::harvest::HarvestGuard;
use crate::observations::{learn, observe_primary};
use crate::smtp::Reply;
use crate::store::RecipientCache;
use crate::sync::Mutex;
use crate::time::unix_seconds;
use crate::verify::{
    classify_rcpt, classify_setup, CalloutOutcome, LearntFrom, PrimaryState, Verdict,
};

/// Recipient verification settings (`[recipient_verify]`, and
/// `[delivery] primary_up_fresh`).
#[derive(Debug, Clone)]
pub struct VerifySettings {
    /// How long "the primary accepted this recipient" counts.
    pub valid_ttl: Duration,
    /// How long "the primary does not know this recipient" counts.
    pub invalid_ttl: Duration,
    /// The longest a callout (or a defer-mode probe) may take, waiting for
    /// a connection slot included; past it the recipient is accepted.
    pub timeout: Duration,
    /// Callout connections to one primary at once: a spam run must not
    /// hammer the primary it is aimed around.
    pub concurrency: usize,
    /// How long an observation of the primary's state counts.
    pub primary_up_fresh: Duration,
}

/// Callout connections are kept this long between uses.
const IDLE_CALLOUT: Duration = Duration::from_secs(30);

/// The longest a callout keeps its connection slot, whether or not the
/// recipient still waits for it: a primary that stalls holds at most
/// `concurrency` of our connections, for at most this long.
const CALLOUT_LIMIT: Duration = Duration::from_secs(60);

/// One open callout connection, after its EHLO (and STARTTLS, as the
/// domain's TLS policy asks).
type CalloutConn = Channel;

/// A kept callout connection: since when, and the TLS policy it was
/// opened under.
type IdleCallout = (CalloutConn, Instant, TlsPolicy);

/// Checks recipients against the primary and the cache; shared by every
/// session of a process.
pub struct RecipientVerifier {
    cache: Arc<dyn RecipientCache>,
    engine: Arc<Engine>,
    settings: VerifySettings,
    slots: Mutex<HashMap<DomainName, Arc<Semaphore>>>,
    /// Kept connections, with the TLS policy they were opened under: a
    /// policy raised since then must not be met by an old connection.
    idle: Mutex<HashMap<DomainName, Vec<IdleCallout>>>,
    /// One defer-mode probe per domain at a time; the others wait for its
    /// answer instead of probing too.
    probes: Mutex<HashMap<DomainName, Arc<tokio::sync::Mutex<()>>>>,
    /// Callout rates per client and per domain.
    harvest: Option<Arc<HarvestGuard>>,
}

impl RecipientVerifier {
    /// A verifier asking `engine`'s routes and keeping what it learns in
    /// `cache`.
    pub fn new(
        cache: Arc<dyn RecipientCache>,
        engine: Arc<Engine>,
        settings: VerifySettings,
    ) -> Self {
        RecipientVerifier {
            cache,
            engine,
            settings,
            slots: Mutex::new(HashMap::new()),
            idle: Mutex::new(HashMap::new()),
            probes: Mutex::new(HashMap::new()),
            harvest: None,
        }
    }

    /// Limits callouts to `harvest`'s rates.
    pub fn with_harvest(mut self, harvest: Arc<HarvestGuard>) -> Self {
        self.harvest = Some(harvest);
        self
    }

    /// The refusal or deferral for `rcpt` of hosted `domain`, or `None` to
    /// accept it (the caller still greylists). Role accounts are the
    /// caller's to exempt.
    pub async fn check(
        self: &Arc<Self>,
        domain: &Domain,
        rcpt: &Mailbox,
        client: IpAddr,
        now: SystemTime,
    ) -> Option<Reply> {
        let now = unix_seconds(now);
        if domain.defer_while_primary_up && self.primary_is_up(&domain.name, now).await {
            metrics::counter!("backupmx_deferrals_total", "reason" => "primary_up").increment(1);
            return Some(Reply::new(
                451,
                "4.7.1",
                format!(
                    "<{rcpt}>: the primary MX of {} is reachable, deliver there; try again later",
                    domain.name
                ),
            ));
        }
        if domain.recipient_verify != RecipientVerify::Callout || domain.lists_recipient(rcpt) {
            return None;
        }
        let address = rcpt.canonical();
        match self.cache.recipient(&address, now).await {
            Ok(Some(hit)) => {
                let verdict = match hit.verdict {
                    Verdict::Valid => "valid",
                    Verdict::Invalid => "invalid",
                };
                metrics::counter!("backupmx_recipient_cache_hits_total", "verdict" => verdict)
                    .increment(1);
                return (hit.verdict == Verdict::Invalid).then(|| unknown_user(rcpt, "cache"));
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(event = "recipient_cache_unreadable", rcpt = %address, error = %crate::error::Report(&e));
                return None;
            }
        }
        // Unknown: ask the primary, unless it was just found down (then
        // every RCPT would wait for a timeout to learn nothing).
        let fresh = self.settings.primary_up_fresh.as_secs();
        if let Ok(Some(state)) = self.cache.primary_state(&domain.name).await {
            if state.is_down_and_fresh(now, fresh) {
                metrics::counter!("backupmx_callouts_total", "result" => "skipped_primary_down")
                    .increment(1);
                return None;
            }
        }
        if let Some(harvest) = &self.harvest {
            if let Err((why, log)) = harvest.take_callout(client, &domain.name, Instant::now()) {
                metrics::counter!("backupmx_callouts_total", "result" => why.label()).increment(1);
                if log {
                    tracing::warn!(event = "callouts_throttled", domain = %domain.name, client = %client, scope = why.label(),
                        "callouts over their rate: recipients get 451 4.7.1 until it recovers");
                }
                return Some(Reply::new(
                    451,
                    "4.7.1",
                    format!("<{rcpt}>: too many recipient checks, try again later"),
                ));
            }
        }
        let outcome = match tokio::time::timeout(
            self.settings.timeout,
            self.callout(domain, &rcpt.to_string()),
        )
        .await
        {
            Ok(outcome) => outcome,
            Err(_) => CalloutOutcome::PrimaryDown("callout timed out".into()),
        };
        let (result, up) = match &outcome {
            CalloutOutcome::Valid => ("valid", true),
            CalloutOutcome::Invalid(_) => ("invalid", true),
            CalloutOutcome::Inconclusive(_) => ("inconclusive", true),
            CalloutOutcome::PrimaryDown(_) => ("primary_down", false),
        };
        metrics::counter!("backupmx_callouts_total", "result" => result).increment(1);
        tracing::info!(event = "callout", domain = %domain.name, rcpt = %address, result,
        reply = match &outcome {
            CalloutOutcome::Invalid(r) | CalloutOutcome::Inconclusive(r) | CalloutOutcome::PrimaryDown(r) => r.as_str(),
            CalloutOutcome::Valid => "",
        });
        observe_primary(self.cache.as_ref(), &domain.name, up, now).await;
        let s = &self.settings;
        match outcome {
            CalloutOutcome::Valid => {
                let (c, n) = (self.cache.as_ref(), &domain.name);
                learn(
                    c,
                    n,
                    &address,
                    Verdict::Valid,
                    LearntFrom::Callout,
                    s.valid_ttl,
                    now,
                )
                .await;
                None
            }
            CalloutOutcome::Invalid(_) => {
                let (c, n) = (self.cache.as_ref(), &domain.name);
                learn(
                    c,
                    n,
                    &address,
                    Verdict::Invalid,
                    LearntFrom::Callout,
                    s.invalid_ttl,
                    now,
                )
                .await;
                Some(unknown_user(rcpt, "callout"))
            }
            CalloutOutcome::Inconclusive(_) | CalloutOutcome::PrimaryDown(_) => None,
        }
    }

    /// Whether the primary is up, from a fresh observation or, when there
    /// is none, from a probe made now.
    async fn primary_is_up(&self, domain: &DomainName, now: u64) -> bool {
        let fresh = self.settings.primary_up_fresh.as_secs();
        let is_fresh = |s: &PrimaryState| now.saturating_sub(s.observed) <= fresh;
        if let Ok(Some(state)) = self.cache.primary_state(domain).await {
            if is_fresh(&state) {
                return state.up;
            }
        }
        let gate = self
            .probes
            .lock()
            .entry(domain.clone())
            .or_default()
            .clone();
        let _probing = gate.lock().await;
        // Another session may have probed while this one waited.
        if let Ok(Some(state)) = self.cache.primary_state(domain).await {
            if is_fresh(&state) {
                return state.up;
            }
        }
        let up = matches!(
            tokio::time::timeout(self.settings.timeout, self.engine.probe(domain)).await,
            Ok(Ok(()))
        );
        let probed = unix_seconds(SystemTime::now());
        observe_primary(self.cache.as_ref(), domain, up, probed).await;
        up
    }

    /// One callout: a slot for the domain, a connection (reused when one
    /// is idle), `MAIL FROM:<>`, `RCPT TO:<address>`, `RSET`.
    ///
    /// The connection work runs in its own task that keeps the slot until
    /// it ends: a caller that stops waiting (its timeout) does not free the
    /// slot while a connection may still be open, so a burst of callouts
    /// that time out never opens more than `concurrency` connections.
    async fn callout(self: &Arc<Self>, record: &Domain, address: &str) -> CalloutOutcome {
        let slot = self
            .slots
            .lock()
            .entry(record.name.clone())
            .or_insert_with(|| Arc::new(Semaphore::new(self.settings.concurrency.max(1))))
            .clone();
        let Ok(permit) = slot.acquire_owned().await else {
            return CalloutOutcome::PrimaryDown("no callout slot".into());
        };
        let (me, domain, policy, address) = (
            self.clone(),
            record.name.clone(),
            record.tls,
            address.to_string(),
        );
        let work = tokio::spawn(async move {
            let _slot = permit;
            tokio::time::timeout(CALLOUT_LIMIT, me.callout_on_slot(&domain, policy, &address))
                .await
                .unwrap_or_else(|_| CalloutOutcome::PrimaryDown("callout timed out".into()))
        });
        work.await
            .unwrap_or_else(|_| CalloutOutcome::PrimaryDown("callout task failed".into()))
    }

    async fn callout_on_slot(
        &self,
        domain: &DomainName,
        policy: TlsPolicy,
        address: &str,
    ) -> CalloutOutcome {
        if let Some(conn) = self.take_idle(domain, policy) {
            // A kept connection the primary may have closed meanwhile: on
            // any failure, one more try on a new connection.
            if let Some(outcome) = self.ask(conn, domain, policy, address).await {
                return outcome;
            }
        }
        let conn = match self.connect(domain).await {
            Ok(c) => c,
            Err(outcome) => return outcome,
        };
        self.ask(conn, domain, policy, address)
            .await
            .unwrap_or_else(|| CalloutOutcome::PrimaryDown("connection lost".into()))
    }

    /// Asks about one recipient on `conn`; `None` when the connection
    /// failed before an answer.
    async fn ask(
        &self,
        mut conn: CalloutConn,
        domain: &DomainName,
        policy: TlsPolicy,
        address: &str,
    ) -> Option<CalloutOutcome> {
        let mail = conn.command("MAIL FROM:<>").await.ok()?;
        if !mail.is_success() {
            let _ = conn.command("QUIT").await;
            return Some(classify_setup(&mail));
        }
        let rcpt = conn.command(&format!("RCPT TO:<{address}>")).await.ok()?;
        let outcome = classify_rcpt(&rcpt);
        match conn.command("RSET").await {
            Ok(r) if r.is_success() => self.keep_idle(domain, policy, conn),
            _ => {}
        }
        Some(outcome)
    }

    /// A new connection to the primary, under the domain's TLS policy: a
    /// primary that cannot meet it is not asked (the recipient is taken,
    /// as for any callout that cannot conclude).
    async fn connect(&self, domain: &DomainName) -> Result<CalloutConn, CalloutOutcome> {
        self.engine.open_channel(domain).await.map_err(|e| match e {
            ChannelError::Refused(reply) => classify_setup(&reply),
            ChannelError::TlsPolicy(why) => CalloutOutcome::Inconclusive(format!(
                "not asked: the domain's TLS policy cannot be met: {why}"
            )),
            ChannelError::Unreachable(why) => CalloutOutcome::PrimaryDown(why),
        })
    }

    fn take_idle(&self, domain: &DomainName, policy: TlsPolicy) -> Option<CalloutConn> {
        let mut idle = self.idle.lock();
        let list = idle.get_mut(domain)?;
        while let Some((conn, since, opened_under)) = list.pop() {
            if since.elapsed() < IDLE_CALLOUT && opened_under == policy {
                return Some(conn);
            }
        }
        None
    }

    fn keep_idle(&self, domain: &DomainName, policy: TlsPolicy, conn: CalloutConn) {
        let mut idle = self.idle.lock();
        let list = idle.entry(domain.clone()).or_default();
        list.retain(|(_, since, _)| since.elapsed() < IDLE_CALLOUT);
        if list.len() < self.settings.concurrency.max(1) {
            list.push((conn, Instant::now(), policy));
        }
    }
}

fn unknown_user(rcpt: &Mailbox, how: &'static str) -> Reply {
    metrics::counter!("backupmx_rcpt_verify_rejections_total", "reason" => how).increment(1);
    Reply::new(
        550,
        "5.1.1",
        format!(
            "<{rcpt}>: Recipient address rejected: User unknown in the primary MX's mailbox table"
        ),
    )
}
