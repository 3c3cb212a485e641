//! The AWS retry function's work: one SQS ticket → claim the record in
//! DynamoDB, make one delivery attempt with the shared [`Engine`], store
//! the outcome conditionally and send the next ticket; and the sweeper,
//! which gives a new ticket to every record that lost its own.
//!
//! The queue record is authoritative and every write is conditional on the
//! version the writer claimed (see [`relay_core::store::aws::queue`]): a
//! redelivered or duplicated ticket never repeats an attempt, and an
//! attempt never overwrites a record someone else changed.

use std::collections::HashMap;
use std::sync::Arc;

use relay_core::sync::Mutex;
use std::time::{Duration, SystemTime};

use relay_core::delivery::destinations::DestinationWatch;
use relay_core::delivery::{AttemptReport, Engine};
use relay_core::queue::{AcceptedMessage, QueueEntry, QueueId};
use relay_core::store::aws::{AwsStore, Claim, Ticket};
use relay_core::store::{DeliveryQueue, MessageStore, SplitSpool, Spool, StoreError};
use relay_core::time::unix_seconds;

/// Tries of each write after a delivery attempt, and the first pause
/// between them (doubling: 0.2 + 0.4 + … ≈ 6 s in all).
const PERSIST_TRIES: u32 = 5;
const PERSIST_PAUSE: Duration = Duration::from_millis(200);

/// How long a ticket that found every connection slot of its destination
/// taken waits before it asks again (SQS delays are whole seconds).
const SLOT_WAIT_SECS: u64 = 1;

/// How long a ticket waits in this process for one of the process's own
/// slots to a destination before it is sent back to wait in SQS. Waiting
/// here costs no request; the shared slots are asked only by tickets
/// holding a local one, so a poller's 50 tickets for one destination do
/// not all ask DynamoDB every second.
const LOCAL_SLOT_WAIT: Duration = Duration::from_secs(10);

/// Runs a store write, trying again with backoff while it fails.
async fn persist<T, F, Fut>(what: &'static str, mut write: F) -> Result<T, RetryError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    let mut pause = PERSIST_PAUSE;
    let mut tries = 1;
    loop {
        match write().await {
            Ok(v) => return Ok(v),
            Err(source) if tries >= PERSIST_TRIES => {
                return Err(RetryError::Store { what, source })
            }
            Err(e) => {
                metrics::counter!("backupmx_outcome_store_failures_total").increment(1);
                tracing::warn!(event = "outcome_store_retry", what, tries, error = %relay_core::error::Report(&e));
                tokio::time::sleep(pause).await;
                pause *= 2;
                tries += 1;
            }
        }
    }
}

/// What became of one SQS ticket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Processed {
    /// An attempt was made; `finished` if nothing is pending any more.
    Attempted { finished: bool, delivered: usize },
    /// Not due yet: sent back to the queue with the remaining delay.
    Redelayed,
    /// Stale duplicate, attempt under way elsewhere, or the entry is gone.
    Dropped(&'static str),
}

/// Why a ticket (or a sweeper pass) was not done: the SQS message stays
/// in the queue and, after `maxReceiveCount` receipts, moves to the
/// dead-letter queue, from which the sweeper re-drives it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RetryError {
    /// Not a ticket of ours: retrying cannot help; it ends in the
    /// dead-letter queue for the operator.
    #[error("malformed queue message")]
    MalformedTicket(#[source] serde_json::Error),
    /// The store refused or could not be reached.
    #[error("{what}")]
    Store {
        what: &'static str,
        #[source]
        source: StoreError,
    },
    /// SQS refused an operation on the dead-letter queue.
    #[error("dead-letter queue {what}")]
    DeadLetterQueue {
        what: &'static str,
        #[source]
        source: relay_core::error::BoxError,
    },
    /// The attempt ran longer than its lease (another may take it over).
    #[error("attempt did not finish within its lease")]
    LeaseExceeded,
}

impl RetryError {
    /// Whether the same work may succeed later.
    pub fn is_retryable(&self) -> bool {
        match self {
            RetryError::MalformedTicket(_) => false,
            RetryError::Store { source, .. } => source.is_transient(),
            RetryError::DeadLetterQueue { .. } | RetryError::LeaseExceeded => true,
        }
    }
}

/// Wraps an SQS error on the dead-letter queue.
pub(crate) fn dead_letter_err(what: &'static str) -> impl FnOnce(StoreError) -> RetryError {
    move |e| RetryError::DeadLetterQueue {
        what,
        source: Box::new(e),
    }
}

/// Wraps a store error with what was being done.
pub(crate) fn store_err(what: &'static str) -> impl FnOnce(StoreError) -> RetryError {
    move |source| RetryError::Store { what, source }
}

/// Where a debug build's `FAULT_INJECTION=retry:POINT` makes the process
/// die, to show that no crash point loses a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashPoint {
    /// The primary has answered; the outcome is not stored yet.
    AfterDelivery,
    /// The outcome is stored; the next ticket is not sent yet.
    BeforeTicket,
    /// Everything is stored; the SQS message is not deleted yet (poll).
    BeforeSqsDelete,
}

impl CrashPoint {
    pub fn parse_spec(spec: &str) -> Option<Self> {
        match spec.strip_prefix("retry:")? {
            "after_delivery" => Some(CrashPoint::AfterDelivery),
            "before_ticket" => Some(CrashPoint::BeforeTicket),
            "before_sqs_delete" => Some(CrashPoint::BeforeSqsDelete),
            _ => None,
        }
    }
}

/// Timings of the AWS queue (`[aws]` in the configuration).
#[derive(Debug, Clone, Copy)]
pub struct RetrySettings {
    pub attempt_lease: Duration,
    pub orphan_after: Duration,
    pub sweep_interval: Duration,
    /// How often a destination recorded down is probed
    /// (`[delivery] probe_interval`).
    pub probe_interval: Duration,
    /// The sweeper alerts when the oldest queued message is older
    /// (`[alerts] queue_age`; only with a webhook).
    pub queue_age: Duration,
    /// Connections at once to one destination, over every process that
    /// delivers (`[delivery] max_connections_per_destination`).
    pub max_per_destination: usize,
}

pub struct RetryProcessor {
    pub store: Arc<AwsStore>,
    pub engine: Arc<Engine>,
    destinations: DestinationWatch,
    pub(crate) settings: RetrySettings,
    crash: Option<CrashPoint>,
    /// Outcomes this process could not store, by queue id, with the
    /// version they were claimed at: when their ticket (or the sweeper's)
    /// comes back, the outcome is stored instead of the message being
    /// delivered again.
    unstored: Mutex<HashMap<QueueId, (AttemptReport, u64)>>,
    pub(crate) queue_age: relay_core::alerts::QueueAgeWatch,
    /// This process's side of each destination's connection slots.
    slots: crate::slots::SlotTable,
    /// Sends the TLS reports (RFC 8460) from the sweeper, once a day.
    pub tls_reporter: Option<relay_core::tlsrpt::send::TlsReporter>,
    /// Queue-depth samples and history pruning, from the sweeper.
    pub history: Option<relay_core::outages::Upkeep>,
}

impl RetryProcessor {
    pub fn new(store: Arc<AwsStore>, engine: Arc<Engine>, settings: RetrySettings) -> Self {
        RetryProcessor {
            destinations: DestinationWatch::new(engine.clone(), store.clone()),
            store,
            engine,
            settings,
            crash: None,
            unstored: Mutex::new(HashMap::new()),
            queue_age: Default::default(),
            slots: Default::default(),
            tls_reporter: None,
            history: None,
        }
    }

    /// Dies at `point` (fault injection for tests; debug builds only
    /// read it from the environment).
    pub fn with_crash_point(mut self, point: Option<CrashPoint>) -> Self {
        self.crash = point;
        self
    }

    pub fn settings(&self) -> RetrySettings {
        self.settings
    }

    /// Dies here if the fault injection says so.
    pub fn crash_if(&self, point: CrashPoint) {
        if self.crash == Some(point) {
            eprintln!("retry-fn: injected crash at {point:?}");
            std::process::exit(70);
        }
    }

    fn lock_unstored(&self) -> std::sync::MutexGuard<'_, HashMap<QueueId, (AttemptReport, u64)>> {
        self.unstored.lock()
    }

    pub async fn process(&self, body: &str, now: SystemTime) -> Result<Processed, RetryError> {
        let ticket = match Ticket::decode(body) {
            Ok(t) => t,
            Err(e) => {
                // Not ours: it goes to the dead-letter queue, where the
                // sweeper leaves it for the operator to look at.
                return Err(RetryError::MalformedTicket(e));
            }
        };
        let now_secs = unix_seconds(now);
        let earlier = self.lock_unstored().remove(&ticket.id);
        if let Some((report, claimed)) = earlier {
            tracing::info!(event = "unstored_outcome_retried", queue_id = %ticket.id);
            return self.commit(report, claimed, now_secs).await;
        }
        let store = &self.store;
        let lease = self.settings.attempt_lease.as_secs().max(1);
        let Some(item) = store
            .queue_item(&ticket.id)
            .await
            .map_err(store_err("reading the record"))?
        else {
            return Ok(Processed::Dropped("no record (delivered or deleted)"));
        };
        // A destination recorded down is not attempted by every ticket:
        // one probe per interval (this ticket, if it wins it), the rest
        // wait parked until the probe or the sweeper releases the domain.
        let domain = item.entry.domain.clone();
        let mut probing = false;
        if item.version == ticket.version && item.entry.next_attempt <= now_secs {
            let down = store
                .destination_state(&domain)
                .await
                .map_err(store_err("reading the destination state"))?;
            // Past its lifetime it is attempted anyway, so that it bounces.
            let down = match down {
                Some(d) if !self.expired(&item.entry, now_secs).await => Some(d),
                _ => None,
            };
            if let Some(down) = down {
                let next_probe = self.next_probe(now_secs);
                if down.probe_at > now_secs
                    || !store
                        .claim_probe(&domain, now_secs, next_probe)
                        .await
                        .map_err(store_err("claiming the probe"))?
                {
                    let park = self
                        .engine
                        .config()
                        .retry_max
                        .as_secs()
                        .max(down.probe_at.saturating_sub(now_secs));
                    store
                        .send_ticket(&ticket, park)
                        .await
                        .map_err(store_err("parking the ticket"))?;
                    return Ok(Processed::Redelayed);
                }
                probing = true;
            }
        }
        // A ticket the claim turns away (stale, leased, not due) needs no
        // slot: it never connects.
        let attemptable = item.version == ticket.version
            && item.lease <= now_secs
            && item.entry.next_attempt <= now_secs;
        if !attemptable {
            return self
                .claim_and_attempt(item, &ticket, now, lease, probing)
                .await;
        }
        // One of the destination's connection slots, shared by every
        // delivering process: without one the ticket waits, unattempted.
        let limit = self.settings.max_per_destination.max(1);
        let local = self.slots.for_domain(&domain, limit);
        // Waiting here counts against the attempt's own time limit.
        let wait = LOCAL_SLOT_WAIT.min(self.settings.attempt_lease / 4);
        let permit = tokio::time::timeout(wait, local.permits.clone().acquire_owned()).await;
        let taken = match permit {
            Ok(Ok(permit)) => self
                .slot_for_attempt(&local, &domain, &ticket)
                .await?
                .map(|slot| (permit, slot)),
            _ => None,
        };
        let Some((_permit, slot)) = taken else {
            metrics::counter!("backupmx_destination_slot_waits_total").increment(1);
            tracing::debug!(event = "destination_slot_wait", queue_id = %ticket.id, domain = %domain, limit);
            store
                .send_ticket(&ticket, SLOT_WAIT_SECS)
                .await
                .map_err(store_err("re-delaying the ticket for a slot"))?;
            return Ok(Processed::Redelayed);
        };
        // Cut short (the caller's time limit, a Lambda deadline), the
        // attempt still gives its slot back.
        let guard = SlotGuard {
            store: self.store.clone(),
            local: local.clone(),
            domain: domain.clone(),
            slot: Some(slot.clone()),
        };
        // The attempt's lease starts now, not before the slot was found.
        let now = SystemTime::now();
        let until = std::sync::atomic::AtomicU64::new(slot.until);
        let attempt = self.claim_and_attempt(item, &ticket, now, lease, probing);
        tokio::pin!(attempt);
        let renewing = self.keep_slot(&domain, &slot, &until);
        let (result, kept) = tokio::select! {
            result = &mut attempt => (result, true),
            () = renewing => (attempt.await, false),
        };
        guard.disarm();
        if kept {
            let slot = crate::slots::HeldSlot {
                until: until.load(std::sync::atomic::Ordering::Relaxed),
                ..slot
            };
            self.park_slot(local, domain, slot);
        } else {
            local.release([slot.index]);
        }
        result
    }

    /// A slot for an attempt to `domain` (the caller holds one of this
    /// process's permits): an idle one this process holds (no request, or
    /// one renewal), else a newly taken one; `None` when the few indices
    /// asked for were all taken by other processes.
    async fn slot_for_attempt(
        &self,
        local: &crate::slots::LocalSlots,
        domain: &relay_core::address::DomainName,
        ticket: &Ticket,
    ) -> Result<Option<crate::slots::HeldSlot>, RetryError> {
        use crate::slots::{SLOT_LEASE_SECS, SLOT_RENEWAL};
        while let Some(slot) = local.take_idle() {
            let now_secs = unix_seconds(SystemTime::now());
            if slot.until > now_secs + SLOT_RENEWAL.as_secs() {
                return Ok(Some(slot));
            }
            let until = now_secs + SLOT_LEASE_SECS;
            let renewed = self
                .store
                .renew_slot(domain, slot.index, &slot.holder, until)
                .await;
            match renewed {
                Ok(true) => return Ok(Some(crate::slots::HeldSlot { until, ..slot })),
                Ok(false) => local.release([slot.index]),
                Err(e) => {
                    local.release([slot.index]);
                    return Err(store_err("renewing a destination slot")(e));
                }
            }
        }
        self.take_shared_slot(local, domain, ticket).await
    }

    /// Parks a slot after its attempt and gives it back to the store if no
    /// ticket takes it within [`IDLE_GIVE_BACK`](crate::slots::IDLE_GIVE_BACK).
    fn park_slot(
        &self,
        local: Arc<crate::slots::LocalSlots>,
        domain: relay_core::address::DomainName,
        slot: crate::slots::HeldSlot,
    ) {
        let parking = local.park(slot);
        let store = self.store.clone();
        tokio::spawn(async move {
            tokio::time::sleep(crate::slots::IDLE_GIVE_BACK).await;
            if let Some(slot) = local.reclaim_idle(parking) {
                give_back(&store, &local, &domain, slot).await;
            }
        });
    }

    /// Gives back every idle slot now. A Lambda invocation calls this
    /// before it returns (a frozen instance would hold them until their
    /// lease ends), a poller before it exits.
    pub async fn give_back_idle_slots(&self) {
        for (domain, local) in self.slots.all() {
            for slot in local.drain_idle() {
                give_back(&self.store, &local, &domain, slot).await;
            }
        }
    }

    /// Takes one of the destination's shared slots for `ticket` (the
    /// caller holds one of this process's permits): the slot's index, its
    /// holder name and the time it was taken, or `None` when the few
    /// indices asked for were all taken.
    async fn take_shared_slot(
        &self,
        local: &crate::slots::LocalSlots,
        domain: &relay_core::address::DomainName,
        ticket: &Ticket,
    ) -> Result<Option<crate::slots::HeldSlot>, RetryError> {
        // The permit's wait may have been long: the time is read again.
        let now = SystemTime::now();
        let now_secs = unix_seconds(now);
        let slot_lease = crate::slots::SLOT_LEASE_SECS;
        let holder = format!(
            "{}#{}#{}",
            ticket.id,
            ticket.version,
            relay_core::queue::new_id(now)
        );
        let start = rand::random::<u32>() as usize;
        let mut tried = Vec::with_capacity(crate::slots::TAKE_TRIES);
        while tried.len() < crate::slots::TAKE_TRIES {
            let Some(index) = local.reserve_next(start, &tried) else {
                break;
            };
            let took = self
                .store
                .take_slot(domain, index, &holder, now_secs, now_secs + slot_lease)
                .await;
            match took {
                Ok(true) => {
                    return Ok(Some(crate::slots::HeldSlot {
                        index,
                        holder,
                        until: now_secs + slot_lease,
                    }))
                }
                Ok(false) => {
                    local.release([index]);
                    tried.push(index);
                }
                Err(e) => {
                    local.release([index]);
                    return Err(store_err("taking a destination slot")(e));
                }
            }
        }
        Ok(None)
    }

    /// Renews a held slot's lease while the attempt runs (recording the
    /// new end in `until`); returns only if the slot is lost (its lease
    /// ended and another holder took it) or the store fails, after which
    /// the attempt goes on without it.
    async fn keep_slot(
        &self,
        domain: &relay_core::address::DomainName,
        slot: &crate::slots::HeldSlot,
        until: &std::sync::atomic::AtomicU64,
    ) {
        loop {
            tokio::time::sleep(crate::slots::SLOT_RENEWAL).await;
            let next = unix_seconds(SystemTime::now()) + crate::slots::SLOT_LEASE_SECS;
            match self
                .store
                .renew_slot(domain, slot.index, &slot.holder, next)
                .await
            {
                Ok(true) => until.store(next, std::sync::atomic::Ordering::Relaxed),
                Ok(false) => {
                    tracing::warn!(event = "destination_slot_lost", domain = %domain, index = slot.index);
                    return;
                }
                Err(e) => {
                    tracing::warn!(event = "destination_slot_not_renewed", domain = %domain, index = slot.index, error = %relay_core::error::Report(&e));
                    return;
                }
            }
        }
    }

    /// Claims the record and makes the attempt (the caller holds one of the
    /// destination's slots).
    async fn claim_and_attempt(
        &self,
        item: relay_core::store::aws::QueueItem,
        ticket: &Ticket,
        now: SystemTime,
        lease: u64,
        probing: bool,
    ) -> Result<Processed, RetryError> {
        let store = &self.store;
        let now_secs = unix_seconds(now);
        let domain = item.entry.domain.clone();
        let item = match store
            .claim(item, ticket, now_secs, lease)
            .await
            .map_err(store_err("claiming the record"))?
        {
            Claim::Claimed(item) => item,
            Claim::Stale => return Ok(Processed::Dropped("stale ticket")),
            Claim::Leased => return Ok(Processed::Dropped("attempt under way")),
            Claim::NotDue { due } => {
                store
                    .send_ticket(ticket, due - now_secs)
                    .await
                    .map_err(store_err("re-delaying the ticket"))?;
                return Ok(Processed::Redelayed);
            }
        };
        let record = &item.entry;
        // The body is read in pieces while it is sent; a missing one is
        // found before the attempt, not in the middle. The first piece,
        // read to find out, is the one the attempt sends first (one S3
        // request per delivery less).
        let first =
            MessageStore::read_chunk(store.as_ref(), &record.id, 0, relay_core::store::BODY_CHUNK)
                .await
                .map_err(store_err("reading the body"))?;
        let report = if let Some(first) = first {
            let bodies = Prefetched {
                inner: store.as_ref(),
                id: &record.id,
                first,
            };
            self.engine.attempt(record, &bodies, now).await
        } else {
            tracing::error!(event = "message_body_missing", queue_id = %record.id);
            self.engine
                .attempt_failed(
                    record,
                    "the message body is missing from the store",
                    store.as_ref(),
                    now,
                )
                .await
        };
        relay_core::delivery::record_attempt(&report);
        self.crash_if(CrashPoint::AfterDelivery);
        let down = report
            .destination_down
            .then(|| report.entry.last_error.clone().unwrap_or_default());
        let processed = self.commit(report, item.version, now_secs).await?;
        match down {
            Some(error) => self.destination_down(&domain, now_secs, &error).await,
            None if probing => self.destination_back(&domain, now_secs).await,
            None => {}
        }
        Ok(processed)
    }

    /// When the next probe of a destination found down at `now` may run.
    pub(crate) fn next_probe(&self, now: u64) -> u64 {
        now + self.settings.probe_interval.as_secs().max(1)
    }

    /// Past its queue lifetime: attempted whatever the destination's
    /// state, so that it bounces instead of waiting forever.
    /// (The domain's own lifetime: read only for a domain recorded down.)
    async fn expired(&self, entry: &relay_core::queue::QueueEntry, now: u64) -> bool {
        self.expired_at(&entry.domain, entry.received_at, now).await
    }

    pub(crate) async fn expired_at(
        &self,
        domain: &relay_core::address::DomainName,
        received: u64,
        now: u64,
    ) -> bool {
        now >= received.saturating_add(self.engine.lifetime_of(domain).await.as_secs())
    }

    /// Records the destination down for every delivery process; its mail
    /// waits for the probe from now on.
    pub(crate) async fn destination_down(
        &self,
        domain: &relay_core::address::DomainName,
        now: u64,
        error: &str,
    ) {
        let probe_at = self.next_probe(now);
        match self.store.mark_down(domain, now, probe_at, error).await {
            Ok(true) => self.destinations.went_down(domain, now, error).await,
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(event = "destination_state_failed", domain = %domain, error = %relay_core::error::Report(&e))
            }
        }
    }

    /// The destination answers again: forget it was down and release its
    /// whole queue at once.
    pub(crate) async fn destination_back(
        &self,
        domain: &relay_core::address::DomainName,
        now: u64,
    ) {
        match self.store.mark_up(domain).await {
            Ok(true) => {
                metrics::counter!("backupmx_probe_recoveries_total").increment(1);
                self.destinations.came_back(domain, now).await;
                match DeliveryQueue::release(self.store.as_ref(), Some(domain), now).await {
                    Ok(n) => {
                        tracing::info!(event = "destination_released", domain = %domain, released = n)
                    }
                    Err(e) => {
                        tracing::warn!(event = "release_failed", domain = %domain, error = %relay_core::error::Report(&e))
                    }
                }
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(event = "destination_state_failed", domain = %domain, error = %relay_core::error::Report(&e))
            }
        }
    }

    /// Stores an attempt's outcome. From here on the primary may have taken
    /// recipients: a failed write must not simply end the invocation, or
    /// the record would be attempted again once the lease ends. Each write
    /// is retried while the store recovers from a short outage; an outcome
    /// still unstored is kept for when a ticket for the record comes back.
    async fn commit(
        &self,
        mut report: AttemptReport,
        claimed: u64,
        now_secs: u64,
    ) -> Result<Processed, RetryError> {
        match self.write_outcome(&mut report, claimed, now_secs).await {
            Ok(()) => Ok(Processed::Attempted {
                finished: report.finished,
                delivered: report.delivered,
            }),
            Err(e) => {
                tracing::error!(event = "queue_update_failed", queue_id = %report.entry.id, error = %relay_core::error::Report(&e));
                self.lock_unstored()
                    .insert(report.entry.id.clone(), (report, claimed));
                Err(e)
            }
        }
    }

    async fn write_outcome(
        &self,
        report: &mut AttemptReport,
        claimed: u64,
        now_secs: u64,
    ) -> Result<(), RetryError> {
        let writer = AwsOutcome {
            processor: self,
            claimed,
            now_secs,
        };
        relay_core::delivery::commit_outcome(report, &writer).await
    }
}

/// An outcome written to the AWS queue: every write conditional on the
/// version the attempt claimed, and retried while the store recovers.
struct AwsOutcome<'a> {
    processor: &'a RetryProcessor,
    claimed: u64,
    now_secs: u64,
}

#[async_trait::async_trait]
impl relay_core::delivery::OutcomeWriter for AwsOutcome<'_> {
    type Error = RetryError;

    async fn queue_bounce(&self, bounce: &AcceptedMessage) -> Result<(), RetryError> {
        let store = &self.processor.store;
        let spool = SplitSpool {
            messages: store.clone(),
            queue: store.clone(),
            history: None,
        };
        persist("queueing the DSN", || spool.accept(bounce.clone())).await?;
        Ok(())
    }

    async fn remove(&self, e: &QueueEntry) -> Result<(), RetryError> {
        let store = &self.processor.store;
        let ours = persist("removing the record", || {
            store.finish_record(&e.id, self.claimed)
        })
        .await?;
        if ours {
            if let Err(err) = MessageStore::delete(store.as_ref(), &e.id).await {
                // The bucket's lifecycle removes it in the end.
                tracing::warn!(event = "body_delete_failed", queue_id = %e.id, error = %relay_core::error::Report(&err));
            }
        } else {
            lost_race(e);
        }
        Ok(())
    }

    async fn update(&self, e: &QueueEntry) -> Result<(), RetryError> {
        let store = &self.processor.store;
        let Some(version) = persist("updating the record", || {
            store.store_attempt(e, self.claimed)
        })
        .await?
        else {
            lost_race(e);
            return Ok(());
        };
        self.processor.crash_if(CrashPoint::BeforeTicket);
        let ticket = Ticket {
            id: e.id.clone(),
            version,
        };
        let delay = e.next_attempt.saturating_sub(self.now_secs);
        if let Err(err) = persist("scheduling the next attempt", || {
            store.send_ticket(&ticket, delay)
        })
        .await
        {
            // The record is stored and due at its time: the sweeper gives
            // it a ticket then. Nothing to redo here.
            tracing::warn!(event = "ticket_send_failed", queue_id = %e.id, error = %relay_core::error::Report(&err));
        }
        Ok(())
    }
}

fn lost_race(e: &relay_core::queue::QueueEntry) {
    // Deleted by an operator, or the lease ran out and another attempt
    // took the record: its writer's state stands.
    metrics::counter!("backupmx_queue_lost_races_total").increment(1);
    tracing::warn!(event = "outcome_not_stored_record_changed", queue_id = %e.id);
}

/// A body store with the first piece of one body already read: reads it
/// covers are served from memory, the rest from the store.
struct Prefetched<'a> {
    inner: &'a dyn MessageStore,
    id: &'a QueueId,
    /// From offset 0: `BODY_CHUNK` bytes, or the whole body if shorter.
    first: Vec<u8>,
}

#[async_trait::async_trait]
impl MessageStore for Prefetched<'_> {
    async fn put(&self, id: &QueueId, body: &[u8]) -> Result<(), relay_core::store::StoreError> {
        self.inner.put(id, body).await
    }

    async fn put_file(
        &self,
        id: &QueueId,
        body: &relay_core::queue::SpooledBody,
    ) -> Result<(), relay_core::store::StoreError> {
        self.inner.put_file(id, body).await
    }

    async fn get(&self, id: &QueueId) -> Result<Option<Vec<u8>>, relay_core::store::StoreError> {
        self.inner.get(id).await
    }

    async fn read_chunk(
        &self,
        id: &QueueId,
        offset: u64,
        max: usize,
    ) -> Result<Option<Vec<u8>>, relay_core::store::StoreError> {
        let held = self.first.len() as u64;
        let whole = self.first.len() < relay_core::store::BODY_CHUNK;
        if id == self.id && (whole || offset.saturating_add(max as u64) <= held) {
            let start = offset.min(held) as usize;
            let end = offset.saturating_add(max as u64).min(held) as usize;
            return Ok(Some(self.first[start..end].to_vec()));
        }
        self.inner.read_chunk(id, offset, max).await
    }

    async fn delete(&self, id: &QueueId) -> Result<(), relay_core::store::StoreError> {
        self.inner.delete(id).await
    }
}

/// Gives a slot back if the attempt holding it is dropped before it ends.
struct SlotGuard {
    store: Arc<AwsStore>,
    local: Arc<crate::slots::LocalSlots>,
    domain: relay_core::address::DomainName,
    slot: Option<crate::slots::HeldSlot>,
}

impl SlotGuard {
    fn disarm(mut self) {
        self.slot = None;
    }
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        let Some(slot) = self.slot.take() else {
            return;
        };
        let (store, local, domain) = (self.store.clone(), self.local.clone(), self.domain.clone());
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move { give_back(&store, &local, &domain, slot).await });
            }
            // No runtime left: the lease frees it in the store.
            Err(_) => local.release([slot.index]),
        }
    }
}

/// Gives a held slot back to the store and forgets it.
async fn give_back(
    store: &AwsStore,
    local: &crate::slots::LocalSlots,
    domain: &relay_core::address::DomainName,
    slot: crate::slots::HeldSlot,
) {
    if let Err(e) = store.give_slot(domain, slot.index, &slot.holder).await {
        // Its lease ends it anyway.
        tracing::warn!(event = "destination_slot_not_given_back", domain = %domain, error = %relay_core::error::Report(&e));
    }
    local.release([slot.index]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use relay_core::store::local::LocalStore;

    #[tokio::test]
    async fn prefetched_reads_match_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).unwrap();
        let id = relay_core::queue::new_id(SystemTime::now());
        for size in [
            0,
            10,
            relay_core::store::BODY_CHUNK,
            relay_core::store::BODY_CHUNK * 2 + 7,
        ] {
            let body: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
            store.put(&id, &body).await.unwrap();
            let first = store
                .read_chunk(&id, 0, relay_core::store::BODY_CHUNK)
                .await
                .unwrap()
                .unwrap();
            let p = Prefetched {
                inner: &store,
                id: &id,
                first,
            };
            for (offset, max) in [
                (0, 1),
                (0, relay_core::store::BODY_CHUNK),
                (5, 3),
                (
                    relay_core::store::BODY_CHUNK as u64,
                    relay_core::store::BODY_CHUNK,
                ),
                (size as u64, 10),
                (size as u64 + 5, 10),
            ] {
                assert_eq!(
                    p.read_chunk(&id, offset, max).await.unwrap(),
                    store.read_chunk(&id, offset, max).await.unwrap(),
                    "size {size}, offset {offset}, max {max}"
                );
            }
            store.delete(&id).await.unwrap();
        }
    }
}
