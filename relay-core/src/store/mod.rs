//! Storage traits and their backends.
//!
//! The traits speak our types only, so the ingest and delivery code never
//! knows whether it runs on the embedded store or on AWS. Every backend is
//! run through the same contract tests (`store::contract`).

use std::sync::Arc;

use async_trait::async_trait;

use crate::address::DomainName;
use crate::domain::Domain;
use crate::error::BoxError;
use crate::history::{Depth, DepthSample, Outage, OutageCounts};
use crate::queue::{AcceptedMessage, QueueEntry, QueueId, RecordError, SpooledBody};
use crate::verify::{CachedRecipient, PrimaryState};

#[cfg(feature = "aws")]
pub mod aws;
pub mod fault;
pub mod local;
pub mod space;

#[cfg(test)]
pub(crate) mod contract;

/// A storage failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The backend could not be reached or refused the operation; trying
    /// again later may succeed.
    #[error("{what}")]
    Backend {
        /// What was being done, e.g. `queue record put`.
        what: String,
        /// The backend's error (SQLite, the file system, an AWS SDK call).
        #[source]
        source: BoxError,
    },
    /// The backend's answer or a setting makes no sense to us (a missing
    /// attribute, an unreadable redrive policy, a bad URI): trying again
    /// will not help.
    #[error("{0}")]
    Invalid(String),
    /// A stored record could not be decoded.
    #[error("stored record {id} is corrupt")]
    Corrupt {
        /// The record's key.
        id: String,
        /// Why it could not be decoded.
        #[source]
        source: RecordError,
    },
    /// A stored domain record could not be decoded.
    #[error("stored domain record {0} is corrupt")]
    CorruptDomain(String),
    /// The store's writer has stopped (the process is shutting down).
    #[error("storage writer has stopped")]
    Closed,
}

impl StoreError {
    /// A backend failure while doing `what`.
    pub fn backend(what: impl Into<String>, source: impl Into<BoxError>) -> Self {
        StoreError::Backend {
            what: what.into(),
            source: source.into(),
        }
    }

    /// A file-system failure while doing `what`.
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        StoreError::backend(what, source)
    }

    /// Whether trying again later may succeed (the hickory shape: callers
    /// decide on the kind, never on the text).
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Backend { .. } | StoreError::Closed)
    }
}

/// What recipient verification remembers, shared by every ingest and
/// delivery process of one store: the callout cache and each primary's
/// last observed state. Reads are strongly consistent.
#[async_trait]
pub trait RecipientCache: Send + Sync {
    /// The cached verdict on `address`, if one has not expired at `now`.
    async fn recipient(
        &self,
        address: &str,
        now: u64,
    ) -> Result<Option<CachedRecipient>, StoreError>;
    /// Stores a verdict (replacing any older one).
    async fn put_recipient(
        &self,
        domain: &DomainName,
        entry: &CachedRecipient,
    ) -> Result<(), StoreError>;
    /// The domain's unexpired verdicts (an operator's view; may scan).
    async fn recipients(
        &self,
        domain: &DomainName,
        now: u64,
    ) -> Result<Vec<CachedRecipient>, StoreError>;
    /// How many of the domain's unexpired verdicts say valid and invalid
    /// (the status page's figures). Both backends count as they read,
    /// holding no list; this default, over [`recipients`], is for test
    /// doubles.
    ///
    /// [`recipients`]: RecipientCache::recipients
    async fn verdict_counts(
        &self,
        domain: &DomainName,
        now: u64,
    ) -> Result<(usize, usize), StoreError> {
        let cached = self.recipients(domain, now).await?;
        let valid = cached
            .iter()
            .filter(|c| c.verdict == crate::verify::Verdict::Valid)
            .count();
        Ok((valid, cached.len() - valid))
    }
    /// The primary's last observed state.
    async fn primary_state(&self, domain: &DomainName) -> Result<Option<PrimaryState>, StoreError>;
    /// Stores the primary's state.
    async fn put_primary_state(
        &self,
        domain: &DomainName,
        state: &PrimaryState,
    ) -> Result<(), StoreError>;
}

/// How delivery sessions went, per UTC day and policy domain, for TLS
/// reports (RFC 8460): every delivering process adds to the same counters,
/// and one process sends each domain's report of a day.
#[async_trait]
pub trait TlsReportStore: Send + Sync {
    /// Counts one session of `day` (days since the epoch) to `domain`.
    async fn count_session(
        &self,
        day: u64,
        domain: &DomainName,
        outcome: &crate::tlsrpt::SessionOutcome,
    ) -> Result<(), StoreError>;
    /// Every counter of `day`.
    async fn sessions_of_day(
        &self,
        day: u64,
    ) -> Result<Vec<(DomainName, crate::tlsrpt::SessionOutcome, u64)>, StoreError>;
    /// Takes the sending of `domain`'s report for `day`: true for the one
    /// caller that may send it.
    async fn claim_report(&self, day: u64, domain: &DomainName) -> Result<bool, StoreError>;
}

/// Each hosted domain's outage history and queue-depth samples
/// ([`crate::history`]). Every change is one conditional write, safe
/// between processes: an outage is opened and ended once, a tally lands
/// only in the outage it belongs to, and one caller marks a drain.
#[async_trait]
pub trait HistoryStore: Send + Sync {
    /// The domain's latest outage.
    async fn latest_outage(&self, domain: &DomainName) -> Result<Option<Outage>, StoreError>;
    /// As [`latest_outage`], possibly as this process saw it a moment ago
    /// (a backend whose reads are billed requests keeps them a second or
    /// two): for the check before a tally or a transition, never for what
    /// an operator is shown.
    ///
    /// [`latest_outage`]: HistoryStore::latest_outage
    async fn recent_outage(&self, domain: &DomainName) -> Result<Option<Outage>, StoreError> {
        self.latest_outage(domain).await
    }
    /// Opens the domain's next outage at `start` with `counts` (the mail
    /// already queued), unless its latest is still open; the new outage
    /// when this call opened it.
    async fn open_outage(
        &self,
        domain: &DomainName,
        start: u64,
        counts: &OutageCounts,
    ) -> Result<Option<Outage>, StoreError>;
    /// Ends the open outage at `end`; the outage when this call ended it.
    async fn end_outage(&self, domain: &DomainName, end: u64)
        -> Result<Option<Outage>, StoreError>;
    /// Adds `counts` to the latest outage if it takes mail that arrived at
    /// `at` ([`Outage::takes`]); the outage after the addition if it did.
    async fn tally(
        &self,
        domain: &DomainName,
        counts: &OutageCounts,
        at: u64,
    ) -> Result<Option<Outage>, StoreError>;
    /// Marks outage `number` drained at `at`: true for the one caller that
    /// did.
    async fn mark_drained(
        &self,
        domain: &DomainName,
        number: u64,
        at: u64,
    ) -> Result<bool, StoreError>;
    /// The domain's outages still open or ended at or after `since`,
    /// oldest first.
    async fn outages(&self, domain: &DomainName, since: u64) -> Result<Vec<Outage>, StoreError>;
    /// The queue depth of each of `domains` now (without a sample for a
    /// domain with nothing queued, if the backend knows that cheaply).
    async fn queue_depths(
        &self,
        domains: &[DomainName],
    ) -> Result<Vec<(DomainName, Depth)>, StoreError>;
    /// Stores one sampling pass.
    async fn put_samples(&self, samples: &[(DomainName, DepthSample)]) -> Result<(), StoreError>;
    /// A domain's samples from `since`, oldest first.
    async fn samples(
        &self,
        domain: &DomainName,
        since: u64,
    ) -> Result<Vec<DepthSample>, StoreError>;
    /// The highest sample of each hour from `since`, per domain of
    /// `domains`: the overview's sparklines.
    async fn hourly_peaks(
        &self,
        domains: &[DomainName],
        since: u64,
    ) -> Result<Vec<(DomainName, Vec<(u64, u64)>)>, StoreError>;
    /// Removes outages that ended before `outages_before` (and are
    /// drained) and samples before `samples_before`; how many went.
    async fn prune(&self, outages_before: u64, samples_before: u64) -> Result<u64, StoreError>;
}

/// Hosted domains (relay control).
#[async_trait]
pub trait DomainRegistry: Send + Sync {
    async fn get(&self, name: &DomainName) -> Result<Option<Domain>, StoreError>;
    async fn list(&self) -> Result<Vec<Domain>, StoreError>;
    /// Inserts or replaces.
    async fn put(&self, domain: &Domain) -> Result<(), StoreError>;
    /// Returns whether the domain existed.
    async fn remove(&self, name: &DomainName) -> Result<bool, StoreError>;
}

/// Message bodies, one per queue entry.
///
/// Big bodies never need to be in memory whole: they go in from a file
/// ([`MessageStore::put_file`]) and come out in pieces
/// ([`MessageStore::read_chunk`]); `get` is for small bodies and tests.
#[async_trait]
pub trait MessageStore: Send + Sync {
    async fn put(&self, id: &QueueId, body: &[u8]) -> Result<(), StoreError>;
    /// Stores the body held in `body`'s file, copying it in pieces.
    async fn put_file(&self, id: &QueueId, body: &SpooledBody) -> Result<(), StoreError>;
    async fn get(&self, id: &QueueId) -> Result<Option<Vec<u8>>, StoreError>;
    /// Up to `max` bytes of a body, from `offset`: `None` if there is no
    /// such body, empty from its end on.
    async fn read_chunk(
        &self,
        id: &QueueId,
        offset: u64,
        max: usize,
    ) -> Result<Option<Vec<u8>>, StoreError>;
    async fn delete(&self, id: &QueueId) -> Result<(), StoreError>;
}

/// The AWS queue's name when `[aws] queue_name` is not set (the SAM
/// template's too).
pub const DEFAULT_QUEUE_NAME: &str = "backupmx-queue";

/// Pieces in which bodies are read for relaying and copied from spool
/// files: what one delivery connection holds of a message at a time.
pub const BODY_CHUNK: usize = 256 * 1024;

/// Queue entries waiting for delivery.
#[async_trait]
pub trait DeliveryQueue: Send + Sync {
    async fn enqueue(&self, entry: &QueueEntry) -> Result<(), StoreError>;
    async fn get(&self, id: &QueueId) -> Result<Option<QueueEntry>, StoreError>;
    /// Oldest first, optionally for one domain.
    async fn list(&self, domain: Option<&DomainName>) -> Result<Vec<QueueEntry>, StoreError>;
    /// Calls `visit` with every entry (of one domain, or all), in no set
    /// order. Both backends read the queue a page at a time, so counts,
    /// summaries and searches over a queue of a million messages hold a
    /// page in memory, not the queue (this default, over [`list`], does
    /// not: it is for test doubles).
    ///
    /// [`list`]: DeliveryQueue::list
    async fn scan(
        &self,
        domain: Option<&DomainName>,
        visit: &mut (dyn FnMut(QueueEntry) + Send),
    ) -> Result<(), StoreError> {
        for entry in self.list(domain).await? {
            visit(entry);
        }
        Ok(())
    }
    /// Returns whether the entry existed.
    async fn remove(&self, id: &QueueId) -> Result<bool, StoreError>;
    async fn depth(&self) -> Result<u64, StoreError>;
    /// Replaces an entry after an attempt; `false` if it was deleted
    /// meanwhile (it is not brought back).
    async fn update(&self, entry: &QueueEntry) -> Result<bool, StoreError>;
    /// Makes every entry (of one domain, or all) due at `now`; returns how
    /// many entries the domain has queued.
    async fn release(&self, domain: Option<&DomainName>, now: u64) -> Result<u64, StoreError>;
}

/// A queue that can be asked what is due: the embedded worker's view.
/// (On AWS, SQS delays do the scheduling instead.)
#[async_trait]
pub trait ScheduledQueue: DeliveryQueue {
    /// Entries whose next attempt is at or before `now` (Unix seconds),
    /// earliest due first, then oldest.
    async fn due(&self, now: u64, limit: usize) -> Result<Vec<QueueEntry>, StoreError>;
    /// Postpones every entry of a domain that is due before `until`, when
    /// its destination is down; returns how many were postponed.
    async fn defer_domain(&self, domain: &DomainName, until: u64) -> Result<u64, StoreError>;
    /// Stores an entry's new schedule after an attempt that changed nothing
    /// else (nothing delivered, nothing bounced). Unlike
    /// [`DeliveryQueue::update`] it never uses the space kept back for
    /// bookkeeping on a full disk: losing it only repeats a harmless
    /// attempt, while a delivered recipient's record must find room.
    async fn reschedule(&self, entry: &QueueEntry) -> Result<bool, StoreError>;
    /// Releases made since the last call (by `queue flush` in another
    /// process too): `None` stands for every domain.
    async fn take_releases(&self) -> Result<Vec<Option<DomainName>>, StoreError>;
    /// Marks an entry's "delayed" notice sent, changing nothing else in
    /// its record (an attempt may be writing the rest); false if it is
    /// gone.
    async fn mark_delay_warned(&self, id: &QueueId) -> Result<bool, StoreError>;
}

/// Where the ingest puts an accepted message: body and queue entries, all
/// or nothing. Only after this returns `Ok` may the client get its 250.
#[async_trait]
pub trait Spool: Send + Sync {
    async fn accept(&self, message: AcceptedMessage) -> Result<Vec<QueueId>, StoreError>;
}

/// A [`Spool`] over separate body and queue stores (the AWS shape: S3 and
/// SQS). Bodies are written first, so a queue entry never points at a
/// missing body; on failure what was written is removed again.
pub struct SplitSpool {
    pub messages: Arc<dyn MessageStore>,
    pub queue: Arc<dyn DeliveryQueue>,
    /// Where accepted mail is counted against an open outage (a read per
    /// queue entry and, during an outage, a write, after it is stored; a
    /// failure only loses the count). The embedded store counts in its
    /// accepting transaction.
    pub history: Option<Arc<dyn HistoryStore>>,
}

#[async_trait]
impl Spool for SplitSpool {
    async fn accept(&self, message: AcceptedMessage) -> Result<Vec<QueueId>, StoreError> {
        let entries = message.queue_entries();
        let mut bodies = Vec::new();
        let mut queued = Vec::new();
        let mut result = Ok(());
        for entry in &entries {
            let put = match &message.spooled {
                Some(file) => self.messages.put_file(&entry.id, file).await,
                None => self.messages.put(&entry.id, &message.body).await,
            };
            if let Err(e) = put {
                result = Err(e);
                break;
            }
            bodies.push(entry.id.clone());
            if let Err(e) = self.queue.enqueue(entry).await {
                result = Err(e);
                break;
            }
            queued.push(entry.id.clone());
        }
        match result {
            Ok(()) => {
                if let Some(history) = &self.history {
                    for entry in &entries {
                        // Read first: outside an outage nothing is written.
                        match history.recent_outage(&entry.domain).await {
                            Ok(Some(o)) if o.end.is_none() && o.takes(entry.received_at) => {}
                            _ => continue,
                        }
                        let mut counts = OutageCounts::default();
                        counts
                            .add(crate::history::Counter::AcceptedMessages, 1)
                            .add(
                                crate::history::Counter::AcceptedRecipients,
                                entry.recipients.len() as u64,
                            );
                        if let Err(e) = history
                            .tally(&entry.domain, &counts, entry.received_at)
                            .await
                        {
                            tracing::warn!(event = "history_not_stored", domain = %entry.domain, error = %crate::error::Report(&e));
                        }
                    }
                }
                Ok(queued)
            }
            Err(e) => {
                // Best effort: the client gets 451 and will send again, so a
                // leftover entry would at worst mean one duplicate delivery.
                for id in &queued {
                    let _ = self.queue.remove(id).await;
                }
                for id in &bodies {
                    let _ = self.messages.delete(id).await;
                }
                Err(e)
            }
        }
    }
}
