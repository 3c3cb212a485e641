//! The operator's operations on a store, shared by the command line
//! (`backupmx domain|queue|recipients …`) and the admin API and status page:
//! one code path, one set of JSON shapes, whichever way they are asked.

pub mod history_view;
pub mod page;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};

use crate::address::DomainName;
use crate::alerts::Alerter;
use crate::domain::{Domain, Hold, HoldReason, RecipientVerify};
use crate::queue::{QueueEntry, QueueId, RecipientStatus};
use crate::store::{
    DeliveryQueue, DomainRegistry, HistoryStore, MessageStore, RecipientCache, StoreError,
};
use crate::verify::{CachedRecipient, PrimaryState};

/// Why an operation could not be done.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The domain is not hosted here.
    #[error("no such domain: {0}")]
    NoSuchDomain(String),
    /// No queued message has that id.
    #[error("no such message: {0}")]
    NoSuchMessage(String),
    /// The domain's history holds no such outage.
    #[error("{0}")]
    NoSuchOutage(String),
    /// The request itself is wrong (a bad name, id or setting).
    #[error("{0}")]
    Invalid(String),
    /// The store failed; `what` says what was being done.
    #[error("{what}")]
    Store {
        /// What was being done.
        what: &'static str,
        /// The store's error.
        #[source]
        source: StoreError,
    },
}

impl AdminError {
    fn store(what: &'static str) -> impl FnOnce(StoreError) -> AdminError {
        move |source| AdminError::Store { what, source }
    }
}

/// Parses a domain name as operators type it (Unicode or A-labels).
pub fn parse_domain(name: &str) -> Result<DomainName, AdminError> {
    DomainName::parse(name)
        .map_err(|_| AdminError::Invalid(format!("invalid domain name {name:?}")))
}

/// Parses a queue id as `queue list` prints it.
pub fn parse_id(id: &str) -> Result<QueueId, AdminError> {
    QueueId::parse(id).map_err(|e| AdminError::Invalid(e.to_string()))
}

/// Changes to a domain's settings; what is `None` stays as it is. The
/// admin API takes it as a JSON object with these keys.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DomainChange {
    /// Explicit next hops (replaces the list; an empty list is ignored as on the CLI).
    pub primary: Option<Vec<String>>,
    /// Greylist mail for this domain.
    pub greylist: Option<bool>,
    /// Largest message accepted for this domain.
    pub max_message_size: Option<u64>,
    /// Recipient verification.
    pub recipient_verify: Option<RecipientVerify>,
    /// Answer 451 while the primary is known to be up.
    pub defer_while_primary_up: Option<bool>,
    /// Accept mail for the domain.
    pub enabled: Option<bool>,
    /// `true` holds the domain's queued mail, `false` releases it.
    pub hold: Option<bool>,
    /// How long this domain's mail may stay queued.
    #[serde(default, with = "humantime_serde")]
    pub queue_lifetime: Option<Duration>,
    /// How the hop to the primary must be protected.
    pub tls: Option<crate::domain::TlsPolicy>,
    /// Scan the domain's mail with the content filter.
    pub filter: Option<bool>,
    /// The bounce-storm guard watches the domain's drains.
    #[serde(default)]
    pub bounce_storm_guard: Option<bool>,
    /// Sender authentication of the domain's mail.
    #[serde(default)]
    pub auth: Option<crate::domain::AuthPolicy>,
    /// With a release: drop the refusals the bounce-storm guard held back
    /// (logged and counted) instead of bouncing them.
    #[serde(default)]
    pub discard_refused: bool,
}

/// What [`Admin::set_domain`] did.
#[derive(Debug)]
pub struct SetOutcome {
    /// The record as stored now.
    pub domain: Domain,
    /// Queued messages made due now (a release, a new next hop or lifetime).
    pub released: u64,
    /// Whether the change applied to mail already queued.
    pub flushed: bool,
    /// What a release did with the refusals the bounce-storm guard held
    /// back.
    pub refusals: RefusalsFinalised,
}

/// Held-back refusals made final by an operator.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RefusalsFinalised {
    /// Recipients tried once more at once, where a refusal is final (one
    /// DSN per message) instead of held back again.
    pub bounced: u64,
    /// Recipients dropped without a DSN.
    pub discarded: u64,
    /// Messages deleted because nothing was left to deliver.
    pub messages_deleted: u64,
}

/// What [`Admin::delete_domain_mail`] deleted.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Deleted {
    /// Whole messages.
    pub messages: u64,
    /// Recipients dropped from messages that still have others pending.
    pub recipients: u64,
}

/// One domain with its primary's state and its queue depth
/// (`domain show`).
#[derive(Debug)]
pub struct DomainView {
    /// The stored record.
    pub domain: Domain,
    /// The primary's last observed state.
    pub primary_state: Option<PrimaryState>,
    /// Messages queued for it.
    pub queued: usize,
}

impl DomainView {
    /// The `domain show --json` object: the record, `primary_state`, `queued`.
    pub fn to_json(&self) -> Value {
        let mut v = serde_json::to_value(&self.domain).unwrap_or_else(|_| json!({}));
        v["primary_state"] = primary_state_json(self.primary_state.as_ref());
        v["queued"] = json!(self.queued);
        v
    }
}

fn primary_state_json(state: Option<&PrimaryState>) -> Value {
    match state {
        None => json!(null),
        Some(s) => json!({
            "up": s.up,
            "since": rfc3339(s.since),
            "observed": rfc3339(s.observed),
        }),
    }
}

/// Counts of the callout cache's live verdicts for a domain.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheCounts {
    /// Recipients the primary accepted.
    pub valid: usize,
    /// Recipients the primary refused as unknown.
    pub invalid: usize,
}

/// What the status page shows of a domain, or of the mail queued for
/// destinations that are not hosted domains (`domain` is `None`: DSNs to
/// senders, mail of removed domains).
#[derive(Debug)]
pub struct DomainStatus {
    /// The hosted domain, if it is one.
    pub domain: Option<Domain>,
    /// The primary's last observed state.
    pub primary_state: Option<PrimaryState>,
    /// Messages queued.
    pub queued: usize,
    /// When the oldest queued message arrived (Unix seconds).
    pub oldest_received: Option<u64>,
    /// The error of the message attempted last (the latest next attempt
    /// among those with an error).
    pub last_error: Option<String>,
    /// The callout cache, when the domain verifies recipients.
    pub cache: Option<CacheCounts>,
}

/// What the status keeps of a queue while scanning it: counts and the
/// two fields it shows, never the entries.
#[derive(Debug, Default)]
struct QueueSummary {
    queued: usize,
    oldest_received: Option<u64>,
    /// The error of the entry with the latest (next attempt, attempts).
    last_error: Option<((u64, u32), String)>,
}

impl QueueSummary {
    fn add(&mut self, e: &QueueEntry) {
        self.note(1, Some(e.received_at));
        if let Some(error) = &e.last_error {
            self.note_error((e.next_attempt, e.attempts), || error.clone());
        }
    }

    fn merge(&mut self, other: QueueSummary) {
        self.note(other.queued, other.oldest_received);
        if let Some((key, error)) = other.last_error {
            self.note_error(key, || error);
        }
    }

    fn note(&mut self, queued: usize, received: Option<u64>) {
        self.queued += queued;
        self.oldest_received = match (self.oldest_received, received) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }

    fn note_error(&mut self, key: (u64, u32), error: impl FnOnce() -> String) {
        if self.last_error.as_ref().is_none_or(|(k, _)| key > *k) {
            self.last_error = Some((key, error()));
        }
    }
}

/// The messages of a domain page: how many match its search, and the
/// oldest [`page::PAGE_ROWS`] of them, oldest first.
#[derive(Debug, Default)]
pub struct QueuePage {
    /// Queued messages matching the search.
    pub matching: usize,
    /// The oldest of them, oldest first.
    pub shown: Vec<QueueEntry>,
}

/// A queue entry ordered by age, for keeping the oldest few of a scan.
struct ByAge(QueueEntry);

impl ByAge {
    fn key(&self) -> (u64, &QueueId) {
        (self.0.received_at, &self.0.id)
    }
}

impl PartialEq for ByAge {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}

impl Eq for ByAge {}

impl PartialOrd for ByAge {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for ByAge {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.key().cmp(&other.key())
    }
}

impl DomainStatus {
    fn summarise(&mut self, summary: QueueSummary) {
        self.queued = summary.queued;
        self.oldest_received = summary.oldest_received;
        self.last_error = summary.last_error.map(|(_, e)| e);
    }

    /// The `/api/status` object of one domain.
    pub fn to_json(&self, now: u64) -> Value {
        json!({
            "name": self.domain.as_ref().map(|d| d.name.as_str()),
            "enabled": self.domain.as_ref().map(|d| d.enabled),
            "hold": self.domain.as_ref().and_then(|d| d.hold).map(|h| json!({
                "reason": h.reason.to_string(),
                "since": rfc3339(h.since),
            })),
            "primary_state": primary_state_json(self.primary_state.as_ref()),
            "queued": self.queued,
            "oldest_received": self.oldest_received.map(rfc3339),
            "oldest_age_seconds": self.oldest_received.map(|t| now.saturating_sub(t)),
            "last_error": self.last_error,
            "recipient_cache": self.cache.map(|c| json!({"valid": c.valid, "invalid": c.invalid})),
        })
    }
}

/// The whole store at a glance: every hosted domain, and what is queued
/// for other destinations.
#[derive(Debug)]
pub struct Status {
    /// Hosted domains in name order.
    pub domains: Vec<DomainStatus>,
    /// Mail queued for destinations that are not hosted domains.
    pub other: DomainStatus,
    /// When it was read (Unix seconds).
    pub at: u64,
}

impl Status {
    /// The `/api/status` object.
    pub fn to_json(&self) -> Value {
        json!({
            "at": rfc3339(self.at),
            "queued": self.domains.iter().map(|d| d.queued).sum::<usize>() + self.other.queued,
            "domains": self.domains.iter().map(|d| d.to_json(self.at)).collect::<Vec<_>>(),
            "other": self.other.to_json(self.at),
        })
    }
}

/// The operations, over the store's traits.
#[derive(Clone)]
pub struct Admin {
    registry: Arc<dyn DomainRegistry>,
    queue: Arc<dyn DeliveryQueue>,
    messages: Arc<dyn MessageStore>,
    recipients: Arc<dyn RecipientCache>,
    alerter: Option<Arc<Alerter>>,
    /// The server's `smtp.max_message_size`: no domain may take more.
    message_limit: u64,
    /// The outage history, and its recorder (deleted mail counts).
    history: Option<(Arc<dyn HistoryStore>, Arc<crate::outages::Recorder>)>,
}

/// Why a domain's `max_message_size` cannot be `size` under the server's
/// `limit` (0 would refuse every message of the domain without a word).
pub fn message_size_error(size: u64, limit: u64) -> Option<String> {
    (size == 0 || size > limit).then(|| {
        format!("max_message_size must be between 1 and the server's smtp.max_message_size ({limit}); {size} is not")
    })
}

impl Admin {
    /// Operations on these backends; holds and releases are announced
    /// through `alerter` when there is one.
    pub fn new(
        registry: Arc<dyn DomainRegistry>,
        queue: Arc<dyn DeliveryQueue>,
        messages: Arc<dyn MessageStore>,
        recipients: Arc<dyn RecipientCache>,
        alerter: Option<Arc<Alerter>>,
    ) -> Admin {
        Admin {
            registry,
            queue,
            messages,
            recipients,
            alerter,
            message_limit: u64::MAX,
            history: None,
        }
    }

    /// The domains' outage history, read from `store`.
    pub fn with_history(mut self, store: Arc<dyn HistoryStore>) -> Self {
        let recorder = Arc::new(crate::outages::Recorder::new(
            store.clone(),
            self.queue.clone(),
            self.alerter.clone(),
        ));
        self.history = Some((store, recorder));
        self
    }

    fn history_store(&self) -> Result<&Arc<dyn HistoryStore>, AdminError> {
        self.history
            .as_ref()
            .map(|(s, _)| s)
            .ok_or_else(|| AdminError::Invalid("this server keeps no outage history".into()))
    }

    /// A hosted domain's outages and queue-depth samples from `since`.
    pub async fn domain_history(
        &self,
        name: &DomainName,
        since: u64,
    ) -> Result<crate::history::History, AdminError> {
        self.domain(name).await?;
        let store = self.history_store()?;
        let outages = store
            .outages(name, since)
            .await
            .map_err(AdminError::store("cannot read the outage history"))?;
        let samples = store
            .samples(name, since)
            .await
            .map_err(AdminError::store("cannot read the queue-depth samples"))?;
        Ok(crate::history::History {
            domain: name.clone(),
            since,
            outages,
            samples,
        })
    }

    /// One outage of a hosted domain: number `number`, or the latest.
    pub async fn outage(
        &self,
        name: &DomainName,
        number: Option<u64>,
    ) -> Result<crate::history::Outage, AdminError> {
        self.domain(name).await?;
        let all = self
            .history_store()?
            .outages(name, 0)
            .await
            .map_err(AdminError::store("cannot read the outage history"))?;
        let found = match number {
            Some(n) => all.into_iter().find(|o| o.number == n),
            None => all.into_iter().last(),
        };
        found.ok_or_else(|| {
            AdminError::NoSuchOutage(match number {
                Some(n) => format!("{name} has no outage {n} in its history"),
                None => format!("{name} has had no outage"),
            })
        })
    }

    /// Each hosted domain's hourly queue peaks from `since` (the
    /// overview's sparklines); empty without a history.
    pub async fn queue_peaks(
        &self,
        domains: &[DomainName],
        since: u64,
    ) -> Result<Vec<(DomainName, Vec<(u64, u64)>)>, AdminError> {
        match &self.history {
            None => Ok(Vec::new()),
            Some((store, _)) => store
                .hourly_peaks(domains, since)
                .await
                .map_err(AdminError::store("cannot read the queue-depth samples")),
        }
    }

    async fn count_deleted(&self, entry: &QueueEntry, now: u64) {
        if let Some((_, recorder)) = &self.history {
            recorder.deleted(entry, now).await;
        }
    }

    /// The server's `smtp.max_message_size`, which no domain may exceed.
    pub fn with_message_limit(mut self, limit: u64) -> Self {
        self.message_limit = limit;
        self
    }

    /// The alerter, for a caller that must wait for its alerts to go out.
    pub fn alerter(&self) -> Option<&Arc<Alerter>> {
        self.alerter.as_ref()
    }

    /// Every hosted domain.
    pub async fn domains(&self) -> Result<Vec<Domain>, AdminError> {
        self.registry
            .list()
            .await
            .map_err(AdminError::store("cannot list domains"))
    }

    async fn domain(&self, name: &DomainName) -> Result<Domain, AdminError> {
        self.registry
            .get(name)
            .await
            .map_err(AdminError::store("cannot read the domain"))?
            .ok_or_else(|| AdminError::NoSuchDomain(name.to_string()))
    }

    /// One domain, its primary's state and its queue depth.
    pub async fn domain_view(&self, name: &DomainName) -> Result<DomainView, AdminError> {
        let domain = self.domain(name).await?;
        let primary_state = self
            .recipients
            .primary_state(name)
            .await
            .map_err(AdminError::store("cannot read the primary's state"))?;
        let mut queued = 0;
        self.queue
            .scan(Some(name), &mut |_| queued += 1)
            .await
            .map_err(AdminError::store("cannot list the domain's queued mail"))?;
        Ok(DomainView {
            domain,
            primary_state,
            queued,
        })
    }

    /// Applies `change` to a domain. A release, a new next hop or a new
    /// lifetime applies to mail already queued: it is made due now (as
    /// `queue flush`), unless the domain is held.
    pub async fn set_domain(
        &self,
        name: &DomainName,
        change: DomainChange,
        now: u64,
    ) -> Result<SetOutcome, AdminError> {
        if let Some(why) = change
            .max_message_size
            .and_then(|m| message_size_error(m, self.message_limit))
        {
            return Err(AdminError::Invalid(why));
        }
        if let Some(l) = change.queue_lifetime {
            if l.is_zero() || l > crate::queue::MAX_QUEUE_LIFETIME {
                return Err(AdminError::Invalid(
                    "the queue lifetime must be positive and at most 60d".into(),
                ));
            }
        }
        let before = self.domain(name).await?;
        let mut d = before.clone();
        let mut flush = false;
        if let Some(primary) = change.primary.filter(|p| !p.is_empty()) {
            for p in &primary {
                crate::domain::validate_primary(p)
                    .map_err(|e| AdminError::Invalid(e.to_string()))?;
            }
            flush |= d.primary != primary;
            d.primary = primary;
        }
        match change.hold {
            Some(true) if d.hold.is_none() => {
                d.hold = Some(Hold {
                    reason: HoldReason::Operator,
                    since: now,
                })
            }
            Some(false) if d.hold.is_some() => {
                d.hold = None;
                flush = true;
            }
            _ => {}
        }
        if let Some(l) = change.queue_lifetime {
            flush |= d.queue_lifetime != Some(l.as_secs());
            d.queue_lifetime = Some(l.as_secs());
        }
        if let Some(g) = change.greylist {
            d.greylist = g;
        }
        if let Some(m) = change.max_message_size {
            d.max_message_size = Some(m);
        }
        if let Some(v) = change.recipient_verify {
            d.recipient_verify = v;
        }
        if let Some(v) = change.defer_while_primary_up {
            d.defer_while_primary_up = v;
        }
        if let Some(e) = change.enabled {
            d.enabled = e;
        }
        if let Some(t) = change.tls {
            d.tls = t;
        }
        if let Some(f) = change.filter {
            d.filter = f;
        }
        if let Some(g) = change.bounce_storm_guard {
            d.bounce_storm_guard = g;
        }
        if let Some(a) = change.auth {
            d.auth = a;
        }
        self.registry
            .put(&d)
            .await
            .map_err(AdminError::store("cannot store the domain"))?;
        if let Some(a) = &self.alerter {
            match (&before.hold, &d.hold) {
                (None, Some(h)) => a.send(
                    "domain_held",
                    Some(name.as_str()),
                    json!({ "reason": h.reason.to_string() }),
                ),
                (Some(h), None) => a.send(
                    "domain_released",
                    Some(name.as_str()),
                    json!({ "held_for": h.reason.to_string() }),
                ),
                _ => {}
            }
        }
        // A release makes the held-back refusals final (a DSN each, or
        // dropped) instead of re-running the drain that found them.
        let refusals = if before.hold.is_some() && d.hold.is_none() {
            self.finalise_refusals(name, change.discard_refused).await?
        } else {
            RefusalsFinalised::default()
        };
        let released = if flush && d.hold.is_none() {
            self.queue
                .release(Some(name), now)
                .await
                .map_err(AdminError::store("cannot release the domain's queued mail"))?
        } else {
            0
        };
        Ok(SetOutcome {
            domain: d,
            released,
            flushed: flush,
            refusals,
        })
    }

    /// Makes `domain`'s held-back refusals final: tried once more at
    /// once, where a refusal bounces and is never held back again (the
    /// operator may have fixed the primary: its real mail then goes out),
    /// or (`discard`) dropped now.
    async fn finalise_refusals(
        &self,
        domain: &DomainName,
        discard: bool,
    ) -> Result<RefusalsFinalised, AdminError> {
        let mut done = RefusalsFinalised::default();
        let entries = self.queue_list(Some(domain)).await?;
        for mut e in entries {
            let held = held_refusals(&e);
            if held.is_empty() {
                continue;
            }
            if discard {
                let dropped =
                    drop_recipients(&mut e, &held, "discarded by the operator on release");
                done.discarded += dropped;
                if self.store_or_remove(e).await? {
                    done.messages_deleted += 1;
                }
            } else {
                for &r in &held {
                    e.recipients[r].held_refusal = Some(crate::queue::HeldRefusal::Final);
                }
                done.bounced += held.len() as u64;
                self.queue
                    .update(&e)
                    .await
                    .map_err(AdminError::store("cannot update a queued message"))?;
            }
        }
        if done != RefusalsFinalised::default() {
            metrics::counter!("backupmx_held_refusals_finalised_total", "action" => "bounced")
                .increment(done.bounced);
            metrics::counter!("backupmx_held_refusals_finalised_total", "action" => "discarded")
                .increment(done.discarded);
            tracing::warn!(event = "held_refusals_finalised", domain = %domain,
                bounced = done.bounced, discarded = done.discarded, messages_deleted = done.messages_deleted,
                "released: the refusals the bounce-storm guard held back are final");
        }
        Ok(done)
    }

    /// Stores `e`, or removes it (with its body) when nothing is left to
    /// deliver; `true` if removed.
    async fn store_or_remove(&self, e: QueueEntry) -> Result<bool, AdminError> {
        if e.pending_recipients().next().is_none() {
            self.queue
                .remove(&e.id)
                .await
                .map_err(AdminError::store("cannot delete a queued message"))?;
            Ok(true)
        } else {
            self.queue
                .update(&e)
                .await
                .map_err(AdminError::store("cannot update a queued message"))?;
            Ok(false)
        }
    }

    /// Deletes a hosted domain's queued mail (it will not be delivered):
    /// all of it, or (`refused_only`) only the recipients whose refusal
    /// the bounce-storm guard held back. Logged and counted.
    pub async fn delete_domain_mail(
        &self,
        domain: &DomainName,
        refused_only: bool,
    ) -> Result<Deleted, AdminError> {
        let mut deleted = Deleted::default();
        let entries = self.queue_list(Some(domain)).await?;
        let now = crate::time::unix_seconds(std::time::SystemTime::now());
        for mut e in entries {
            if !refused_only {
                if self
                    .queue
                    .remove(&e.id)
                    .await
                    .map_err(AdminError::store("cannot delete a queued message"))?
                {
                    self.count_deleted(&e, now).await;
                }
                deleted.messages += 1;
                continue;
            }
            let held = held_refusals(&e);
            if held.is_empty() {
                continue;
            }
            let dropped = drop_recipients(&mut e, &held, "deleted by the operator");
            let before = e.clone();
            if self.store_or_remove(e).await? {
                self.count_deleted(&before, now).await;
                deleted.messages += 1;
            } else {
                deleted.recipients += dropped;
            }
        }
        metrics::counter!("backupmx_operator_deletions_total", "what" => "messages")
            .increment(deleted.messages);
        metrics::counter!("backupmx_operator_deletions_total", "what" => "recipients")
            .increment(deleted.recipients);
        tracing::warn!(event = "queue_deleted", domain = %domain, refused_only,
            messages = deleted.messages, recipients = deleted.recipients,
            "queued mail deleted by the operator: it will not be delivered");
        Ok(deleted)
    }

    /// The callout cache of a hosted domain.
    pub async fn recipients(
        &self,
        name: &DomainName,
        now: u64,
    ) -> Result<Vec<CachedRecipient>, AdminError> {
        self.domain(name).await?;
        self.recipients
            .recipients(name, now)
            .await
            .map_err(AdminError::store("cannot read the recipient cache"))
    }

    /// Queued messages, oldest first; only `domain`'s when given.
    pub async fn queue_list(
        &self,
        domain: Option<&DomainName>,
    ) -> Result<Vec<QueueEntry>, AdminError> {
        self.queue
            .list(domain)
            .await
            .map_err(AdminError::store("cannot list the queue"))
    }

    /// One queued message.
    pub async fn queue_entry(&self, id: &QueueId) -> Result<QueueEntry, AdminError> {
        self.queue
            .get(id)
            .await
            .map_err(AdminError::store("cannot read the queue"))?
            .ok_or_else(|| AdminError::NoSuchMessage(id.to_string()))
    }

    /// A piece of a queued message's body (`None`: no such message).
    pub async fn body_chunk(
        &self,
        id: &QueueId,
        offset: u64,
        len: usize,
    ) -> Result<Vec<u8>, AdminError> {
        self.messages
            .read_chunk(id, offset, len)
            .await
            .map_err(AdminError::store("cannot read the message"))?
            .ok_or_else(|| AdminError::NoSuchMessage(id.to_string()))
    }

    /// Makes queued messages due now; returns how many.
    pub async fn flush(&self, domain: Option<&DomainName>, now: u64) -> Result<u64, AdminError> {
        self.queue
            .release(domain, now)
            .await
            .map_err(AdminError::store("cannot flush the queue"))
    }

    /// Deletes a queued message (it will not be delivered).
    pub async fn delete(&self, id: &QueueId) -> Result<(), AdminError> {
        let entry = self
            .queue
            .get(id)
            .await
            .map_err(AdminError::store("cannot read the queue"))?;
        if self
            .queue
            .remove(id)
            .await
            .map_err(AdminError::store("cannot delete the message"))?
        {
            if let Some(e) = entry {
                self.count_deleted(&e, crate::time::unix_seconds(std::time::SystemTime::now()))
                    .await;
            }
            Ok(())
        } else {
            Err(AdminError::NoSuchMessage(id.to_string()))
        }
    }

    async fn status_of(
        &self,
        d: Domain,
        summary: QueueSummary,
        now: u64,
    ) -> Result<DomainStatus, AdminError> {
        let primary_state = self
            .recipients
            .primary_state(&d.name)
            .await
            .map_err(AdminError::store("cannot read the primary's state"))?;
        let cache = if d.recipient_verify == RecipientVerify::Callout {
            let (valid, invalid) = self
                .recipients
                .verdict_counts(&d.name, now)
                .await
                .map_err(AdminError::store("cannot read the recipient cache"))?;
            Some(CacheCounts { valid, invalid })
        } else {
            None
        };
        let mut s = DomainStatus {
            domain: Some(d),
            primary_state,
            queued: 0,
            oldest_received: None,
            last_error: None,
            cache,
        };
        s.summarise(summary);
        Ok(s)
    }

    /// One hosted domain's state, and its queued messages that match
    /// `query` ([`matches_search`]): how many, and the oldest
    /// [`page::PAGE_ROWS`]. One scan, holding no more than those.
    pub async fn domain_status(
        &self,
        name: &DomainName,
        query: &str,
        now: u64,
    ) -> Result<(DomainStatus, QueuePage), AdminError> {
        let d = self.domain(name).await?;
        let mut summary = QueueSummary::default();
        let mut matching = 0;
        let mut oldest = std::collections::BinaryHeap::with_capacity(page::PAGE_ROWS + 1);
        self.queue
            .scan(Some(name), &mut |e| {
                summary.add(&e);
                if !matches_search(&e, query) {
                    return;
                }
                matching += 1;
                // A max-heap of the oldest seen: the youngest of them is
                // on top, and goes when an older one comes.
                oldest.push(ByAge(e));
                if oldest.len() > page::PAGE_ROWS {
                    oldest.pop();
                }
            })
            .await
            .map_err(AdminError::store("cannot list the queue"))?;
        let status = self.status_of(d, summary, now).await?;
        let shown = oldest.into_sorted_vec().into_iter().map(|e| e.0).collect();
        Ok((status, QueuePage { matching, shown }))
    }

    /// Every hosted domain's state and queue, and the rest of the queue.
    pub async fn status(&self, now: u64) -> Result<Status, AdminError> {
        let mut domains = self.domains().await?;
        domains.sort_by(|a, b| a.name.as_str().cmp(b.name.as_str()));
        let mut by_domain: HashMap<DomainName, QueueSummary> = HashMap::new();
        self.queue
            .scan(None, &mut |e| match by_domain.get_mut(&e.domain) {
                Some(summary) => summary.add(&e),
                None => by_domain.entry(e.domain.clone()).or_default().add(&e),
            })
            .await
            .map_err(AdminError::store("cannot list the queue"))?;
        let mut out = Vec::with_capacity(domains.len());
        for d in domains {
            let mine = by_domain.remove(&d.name).unwrap_or_default();
            out.push(self.status_of(d, mine, now).await?);
        }
        // Everything else (DSNs to senders, mail of removed domains) in one.
        let mut rest = QueueSummary::default();
        for s in by_domain.into_values() {
            rest.merge(s);
        }
        let mut other = DomainStatus {
            domain: None,
            primary_state: None,
            queued: 0,
            oldest_received: None,
            last_error: None,
            cache: None,
        };
        other.summarise(rest);
        Ok(Status {
            domains: out,
            other,
            at: now,
        })
    }
}

/// A Unix time as RFC 3339 (UTC, seconds), as every JSON shape prints times.
pub fn rfc3339(secs: u64) -> String {
    crate::history::rfc3339(secs)
}

fn status_name(s: &RecipientStatus) -> &'static str {
    match s {
        RecipientStatus::Pending => "pending",
        RecipientStatus::Delivered => "delivered",
        RecipientStatus::Failed => "failed",
    }
}

/// Writes `entries` as the JSON array of `queue list --json` and
/// `GET /api/queue`, one [`entry_json`] object per line: built one entry
/// at a time, so a long queue is never in memory twice as a JSON tree.
pub fn write_entries_json<'a>(
    entries: impl IntoIterator<Item = &'a QueueEntry>,
    out: &mut impl std::io::Write,
) -> std::io::Result<()> {
    out.write_all(b"[")?;
    let mut any = false;
    for e in entries {
        out.write_all(if any { b",\n" } else { b"\n" })?;
        serde_json::to_writer(&mut *out, &entry_json(e))?;
        any = true;
    }
    // An empty queue is `[]`, as it always was.
    out.write_all(if any { b"\n]\n" } else { b"]\n" })
}

/// The `queue list --json` / `queue show` object of a queued message.
pub fn entry_json(e: &QueueEntry) -> Value {
    json!({
        "id": e.id,
        "sender": e.sender,
        "recipients": e.recipients.iter().map(|r| r.address.clone()).collect::<Vec<_>>(),
        "recipient_status": e.recipients.iter().map(|r| json!({
            "address": r.address, "status": status_name(&r.status), "last_reply": r.last_reply,
            "held_refusal": r.held_refusal,
            "notify": r.dsn.notify.map(|n| n.to_string()), "orcpt": r.dsn.orcpt,
        })).collect::<Vec<_>>(),
        "domain": e.domain,
        "attempts": e.attempts,
        "next_attempt": rfc3339(e.next_attempt),
        "received_at": rfc3339(e.received_at),
        "size": e.size,
        "last_error": e.last_error,
        "client_ip": e.client_ip,
        "helo": e.helo,
        "dsn_ret": e.dsn.ret.map(|r| r.keyword()),
        "dsn_envid": e.dsn.envid,
        "tls_request": e.tls_request.map(|r| r.as_str()),
    })
}

/// The indices of `e`'s pending recipients whose refusal the bounce-storm
/// guard held back.
fn held_refusals(e: &QueueEntry) -> Vec<usize> {
    (0..e.recipients.len())
        .filter(|&r| {
            let s = &e.recipients[r];
            s.status == crate::queue::RecipientStatus::Pending && s.held_refusal.is_some()
        })
        .collect()
}

/// Marks `recipients` of `e` failed without a DSN, with `why`; how many.
fn drop_recipients(e: &mut QueueEntry, recipients: &[usize], why: &str) -> u64 {
    for &r in recipients {
        let s = &mut e.recipients[r];
        s.status = crate::queue::RecipientStatus::Failed;
        s.held_refusal = None;
        let last = s.last_reply.take().unwrap_or_default();
        s.last_reply = Some(format!("{last} ({why})"));
    }
    recipients.len() as u64
}

/// The `recipients list --json` object of a cached verdict.
pub fn recipient_json(c: &CachedRecipient) -> Value {
    json!({
        "address": c.address,
        "verdict": c.verdict,
        "learnt_from": c.learnt,
        "learnt_at": rfc3339(c.learnt_at),
        "expires": rfc3339(c.expires),
    })
}

/// Whether a queued message matches a search: a substring (any case) of its
/// id, sender, a recipient or its last error.
pub fn matches_search(e: &QueueEntry, query: &str) -> bool {
    let q = query.trim().to_ascii_lowercase();
    if q.is_empty() {
        return true;
    }
    let has = |s: &str| s.to_ascii_lowercase().contains(&q);
    has(&e.id.to_string())
        || has(&e.sender)
        || e.recipients.iter().any(|r| has(&r.address))
        || e.last_error.as_deref().is_some_and(has)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::contract::message;
    use crate::store::local::LocalStore;
    use crate::store::Spool;

    /// The status and a domain page come from one scan of the queue: the
    /// counts, the oldest arrival and the latest error are those of the
    /// whole queue, and a page keeps the oldest `PAGE_ROWS` matches in
    /// order, whatever order the store visits them in.
    #[tokio::test]
    async fn status_and_domain_pages_summarise_a_queue_longer_than_a_page() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(LocalStore::open(dir.path()).unwrap());
        let one = DomainName::parse("one.test").unwrap();
        let hosted = Domain::from_parts("one.test", &[], None).unwrap();
        DomainRegistry::put(store.as_ref(), &hosted).await.unwrap();
        let admin = Admin::new(
            store.clone(),
            store.clone(),
            store.clone(),
            store.clone(),
            None,
        );
        let n = page::PAGE_ROWS + 50;
        for i in 0..n {
            let ids = store.accept(message(&["a@one.test"])).await.unwrap();
            let mut e = DeliveryQueue::get(store.as_ref(), &ids[0])
                .await
                .unwrap()
                .unwrap();
            // Arrival times in an order unlike the ids'.
            e.received_at = 1_000 + (i as u64 * 97) % n as u64;
            if i % 25 == 0 {
                e.attempts = 1;
                e.next_attempt = 5_000 + i as u64;
                e.last_error = Some(format!("451 needle {i}"));
            }
            assert!(store.update(&e).await.unwrap());
        }
        for _ in 0..3 {
            store.accept(message(&["x@elsewhere.test"])).await.unwrap();
        }

        let status = admin.status(9_000).await.unwrap();
        assert_eq!(status.domains.len(), 1);
        let d = &status.domains[0];
        assert_eq!((d.queued, d.oldest_received), (n, Some(1_000)));
        let latest = (0..n).step_by(25).next_back().unwrap();
        assert_eq!(d.last_error, Some(format!("451 needle {latest}")));
        assert_eq!(status.other.queued, 3);

        let (s, page) = admin.domain_status(&one, "", 9_000).await.unwrap();
        assert_eq!((s.queued, page.matching), (n, n));
        let ages: Vec<u64> = page.shown.iter().map(|e| e.received_at).collect();
        let oldest: Vec<u64> = (1_000..1_000 + page::PAGE_ROWS as u64).collect();
        assert_eq!(ages, oldest, "the oldest, oldest first");

        let (_, page) = admin.domain_status(&one, "NEEDLE", 9_000).await.unwrap();
        assert_eq!(page.matching, n.div_ceil(25));
        assert_eq!(page.shown.len(), page.matching);
        assert!(page
            .shown
            .windows(2)
            .all(|w| w[0].received_at < w[1].received_at));
    }
}
