//! The embedded delivery worker: takes due entries from the queue, runs
//! [`Engine::attempt`] with bounded concurrency per destination, stores the
//! outcome, and probes destinations that were down so their queue is
//! released the moment they answer again.
//!
//! An outcome that cannot be stored (a full disk, a failing store) is never
//! a reason to deliver again: the worker keeps it in memory, stops starting
//! attempts, and writes it again with backoff until the store takes it.
//! Only then does delivery resume, so a recipient the primary accepted is
//! not sent a second time while its record still says "pending".
//!
//! An attempt that delivered nothing and bounced nothing (a `4xx`, a
//! refused connection) is different: losing its outcome only repeats a
//! harmless attempt. Its new schedule is written without the disk's
//! reserve, and when even that fails it is kept in memory and delivery
//! goes on, because on a full disk delivery is what frees space (before,
//! such outcomes paused delivery, and a disk filled by mail for a
//! deferring primary stayed full for good).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{watch, Notify, Semaphore};

use super::Engine;
use crate::address::DomainName;
use crate::queue::{AcceptedMessage, QueueEntry, QueueId};
use crate::store::{MessageStore, ScheduledQueue, Spool, StoreError};
use crate::time::unix_seconds;

/// Most messages sent over one connection in one go.
const MESSAGES_PER_CONNECTION: usize = 20;

/// How long the worker lets newly queued mail gather before it looks: mail
/// arriving one message at a time then leaves in batches over one
/// connection each, instead of a connection per message.
const GATHER: Duration = Duration::from_millis(10);

/// First wait before unstored outcomes are written again; doubles up to
/// [`STORE_RETRY_MAX`].
const STORE_RETRY_INITIAL: Duration = Duration::from_secs(1);
const STORE_RETRY_MAX: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Connections at once to one destination domain.
    pub max_per_destination: usize,
    /// Delivery attempts at once in all.
    pub max_total: usize,
    /// How often the queue is checked for due entries (changes made by
    /// other processes, such as `queue flush`, are seen this fast).
    pub poll_interval: Duration,
    /// How often a destination that was down is probed.
    pub probe_interval: Duration,
}

pub struct Worker {
    engine: Arc<Engine>,
    destinations: super::destinations::DestinationWatch,
    queue: Arc<dyn ScheduledQueue>,
    messages: Arc<dyn MessageStore>,
    spool: Arc<dyn Spool>,
    cfg: WorkerConfig,
    wake: Notify,
    in_flight: Mutex<HashSet<QueueId>>,
    per_destination: Mutex<HashMap<DomainName, Arc<Semaphore>>>,
    total: Arc<Semaphore>,
    /// Domains whose destination did not answer: probed until it does.
    down: Mutex<HashSet<DomainName>>,
    /// Destinations this process has recorded up in the store (the status
    /// page's "primary up since"): written once per transition, not per
    /// delivery.
    recorded_up: Mutex<HashSet<DomainName>>,
    /// Outcomes the store refused; while any is here, no attempt starts.
    unstored: Mutex<Unstored>,
    /// Entries whose harmless outcome the store refused: their schedule
    /// (next attempt, attempts, last error) as it should be, kept in memory.
    deferred: Mutex<HashMap<QueueId, QueueEntry>>,
    /// When each down destination's waiting mail was last looked at for
    /// "delayed" notices.
    delay_passes: Mutex<HashMap<DomainName, Instant>>,
}

/// Attempt outcomes waiting to be written, by queue id.
struct Unstored {
    reports: HashMap<QueueId, super::AttemptReport>,
    retry_at: Instant,
    backoff: Duration,
}

impl Default for Unstored {
    fn default() -> Self {
        Unstored {
            reports: HashMap::new(),
            retry_at: Instant::now(),
            backoff: STORE_RETRY_INITIAL,
        }
    }
}

impl Worker {
    pub fn new(
        engine: Arc<Engine>,
        queue: Arc<dyn ScheduledQueue>,
        messages: Arc<dyn MessageStore>,
        spool: Arc<dyn Spool>,
        cfg: WorkerConfig,
    ) -> Arc<Self> {
        Arc::new(Worker {
            total: Arc::new(Semaphore::new(cfg.max_total)),
            destinations: super::destinations::DestinationWatch::new(engine.clone(), queue.clone()),
            engine,
            queue,
            messages,
            spool,
            cfg,
            wake: Notify::new(),
            in_flight: Mutex::new(HashSet::new()),
            per_destination: Mutex::new(HashMap::new()),
            down: Mutex::new(HashSet::new()),
            recorded_up: Mutex::new(HashSet::new()),
            unstored: Mutex::new(Unstored::default()),
            deferred: Mutex::new(HashMap::new()),
            delay_passes: Mutex::new(HashMap::new()),
        })
    }

    /// Delivery is paused because outcomes could not be stored.
    pub fn paused(&self) -> bool {
        !self.lock_unstored().reports.is_empty()
    }

    fn lock_unstored(&self) -> std::sync::MutexGuard<'_, Unstored> {
        self.unstored.lock()
    }

    /// Look at the queue now (a message was accepted or released).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// A message for `domains` was queued: look at it now, unless every
    /// destination is known down (the probe or the next poll handles it,
    /// without a queue scan and a write per message).
    pub fn queued(&self, domains: &[&DomainName]) {
        let down = self.down.lock();
        if domains.iter().any(|d| !down.contains(*d)) {
            drop(down);
            self.wake();
        }
    }

    /// For a message about to be queued: those of `domains` whose
    /// destination is known down, each with the time its entry should first
    /// be due (the probe releases it sooner when the destination answers).
    pub fn deferred_until(
        &self,
        domains: &[DomainName],
        now: SystemTime,
    ) -> Vec<(DomainName, u64)> {
        let down = self.down.lock();
        if down.is_empty() {
            return Vec::new();
        }
        let until = unix_seconds(now) + self.engine.config().retry_initial.as_secs();
        let mut deferred: Vec<(DomainName, u64)> = Vec::new();
        for d in domains {
            if down.contains(d) && !deferred.iter().any(|(x, _)| x == d) {
                deferred.push((d.clone(), until));
            }
        }
        deferred
    }

    /// Makes a domain's (or every) queued entry due now: ETRN, `queue flush`,
    /// a successful probe. Returns how many entries the domain has.
    pub async fn release(&self, domain: Option<&DomainName>) -> Result<u64, StoreError> {
        // Forget the destination is down first, so mail accepted from now on
        // is queued due; only a message already past `deferred_until` and
        // not yet committed can miss the release, and waits `retry_initial`.
        {
            let mut down = self.down.lock();
            match domain {
                Some(d) => {
                    down.remove(d);
                }
                None => down.clear(),
            }
        }
        let n = self
            .queue
            .release(domain, unix_seconds(SystemTime::now()))
            .await?;
        self.wake();
        Ok(n)
    }

    fn destination_permit(&self, domain: &DomainName) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let sem = {
            let mut map = self.per_destination.lock();
            map.entry(domain.clone())
                .or_insert_with(|| Arc::new(Semaphore::new(self.cfg.max_per_destination)))
                .clone()
        };
        sem.try_acquire_owned().ok()
    }

    /// Runs until `shutdown` turns true; attempts in progress are finished.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let probe = tokio::spawn(self.clone().probe_loop(shutdown.clone()));
        let mut tasks = tokio::task::JoinSet::new();
        loop {
            if *shutdown.borrow() {
                break;
            }
            if self.store_unstored().await {
                self.start_due(&mut tasks).await;
            }
            while tasks.try_join_next().is_some() {}
            tokio::select! {
                _ = self.wake.notified() => tokio::time::sleep(GATHER).await,
                _ = tokio::time::sleep(self.cfg.poll_interval) => {}
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                _ = shutdown.changed() => {}
            }
        }
        probe.abort();
        while tasks.join_next().await.is_some() {}
        // Last chance for outcomes the store refused; what is still
        // unstored now is attempted again after a restart.
        self.lock_unstored().retry_at = Instant::now();
        self.store_unstored().await;
    }

    /// Writes outcomes the store refused earlier, when their backoff is
    /// up. Returns whether none is left, i.e. new attempts may start.
    async fn store_unstored(&self) -> bool {
        let reports: Vec<super::AttemptReport> = {
            let unstored = self.lock_unstored();
            if unstored.reports.is_empty() {
                return true;
            }
            if Instant::now() < unstored.retry_at {
                return false;
            }
            unstored.reports.values().cloned().collect()
        };
        for mut report in reports {
            let id = report.entry.id.clone();
            match self.commit_outcome(&mut report).await {
                Ok(()) => {
                    self.lock_unstored().reports.remove(&id);
                }
                Err(e) => {
                    tracing::warn!(event = "queue_update_failed", queue_id = %id, error = %crate::error::Report(&e));
                    let mut unstored = self.lock_unstored();
                    // Keep what was stored (the DSN) from being stored twice.
                    unstored.reports.insert(id, report);
                    unstored.retry_at = Instant::now() + unstored.backoff;
                    unstored.backoff = (unstored.backoff * 2).min(STORE_RETRY_MAX);
                    return false;
                }
            }
        }
        let mut unstored = self.lock_unstored();
        if unstored.reports.is_empty() {
            unstored.backoff = STORE_RETRY_INITIAL;
            metrics::gauge!("backupmx_delivery_paused").set(0.0);
            tracing::warn!(
                event = "delivery_resumed",
                "the store takes writes again; delivery resumes"
            );
            true
        } else {
            false
        }
    }

    /// Keeps an outcome the store refused and pauses delivery.
    fn keep_unstored(&self, report: super::AttemptReport, error: &StoreError) {
        metrics::counter!("backupmx_outcome_store_failures_total").increment(1);
        let mut unstored = self.lock_unstored();
        if unstored.reports.is_empty() {
            metrics::gauge!("backupmx_delivery_paused").set(1.0);
            tracing::error!(
                event = "delivery_paused", error = %crate::error::Report(&error),
                "cannot record delivery outcomes; no new attempts until the store takes writes again (is the disk full?)"
            );
            unstored.backoff = STORE_RETRY_INITIAL;
            unstored.retry_at = Instant::now() + STORE_RETRY_INITIAL;
        }
        unstored.reports.insert(report.entry.id.clone(), report);
    }

    async fn start_due(self: &Arc<Self>, tasks: &mut tokio::task::JoinSet<()>) {
        let now = unix_seconds(SystemTime::now());
        let batch = self.cfg.max_total * 4;
        let due = match self.queue.due(now, batch).await {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(event = "queue_read_failed", error = %crate::error::Report(&e));
                return;
            }
        };
        // Like Postfix's dead-destination cache: while a destination is
        // known down, new mail for it waits for the probe (or its retry
        // time) instead of each message trying to connect. Mail past its
        // lifetime is still attempted, so it expires and bounces.
        if let Ok(released) = self.queue.take_releases().await {
            let mut down = self.down.lock();
            for r in released {
                match r {
                    Some(d) => {
                        down.remove(&d);
                    }
                    None => down.clear(),
                }
            }
        }
        let down: HashSet<DomainName> = self.down.lock().clone();
        // Each down domain's own lifetime (one record read per pass).
        let mut lifetimes = HashMap::new();
        for d in &down {
            lifetimes.insert(d.clone(), self.engine.lifetime_of(d).await.as_secs());
        }
        let mut defer = HashSet::new();
        // Group by destination (oldest first within each), a connection
        // per batch.
        let mut batches: Vec<(DomainName, Vec<QueueEntry>)> = Vec::new();
        for mut entry in due {
            // A schedule the store could not take is the one that counts.
            if let Some(kept) = self.deferred.lock().get(&entry.id) {
                if kept.next_attempt > now {
                    continue;
                }
                entry = kept.clone();
            }
            let lifetime = lifetimes.get(&entry.domain).copied();
            if lifetime.is_some_and(|l| now < entry.received_at.saturating_add(l)) {
                defer.insert(entry.domain.clone());
                continue;
            }
            if self.in_flight.lock().contains(&entry.id)
                || self.lock_unstored().reports.contains_key(&entry.id)
            {
                continue;
            }
            match batches
                .iter_mut()
                .find(|(d, b)| *d == entry.domain && b.len() < MESSAGES_PER_CONNECTION)
            {
                Some((_, b)) => b.push(entry),
                None => batches.push((entry.domain.clone(), vec![entry])),
            }
        }
        for (domain, batch) in batches {
            let Some(dest) = self.destination_permit(&domain) else {
                continue;
            };
            let Ok(total) = self.total.clone().try_acquire_owned() else {
                break;
            };
            let ids: Vec<QueueId> = batch.iter().map(|e| e.id.clone()).collect();
            self.in_flight.lock().extend(ids.iter().cloned());
            let worker = self.clone();
            tasks.spawn(async move {
                worker.deliver_batch(batch).await;
                {
                    let mut in_flight = worker.in_flight.lock();
                    for id in &ids {
                        in_flight.remove(id);
                    }
                }
                drop(dest);
                drop(total);
                worker.wake();
            });
        }
        let until = now + self.engine.config().retry_initial.as_secs();
        for domain in defer {
            if let Err(e) = self.queue.defer_domain(&domain, until).await {
                tracing::warn!(event = "defer_failed", domain = %domain, error = %crate::error::Report(&e));
            }
        }
    }

    /// Entries of one destination domain, over one connection. Bodies are
    /// read from the store piece by piece while they are sent.
    async fn deliver_batch(&self, entries: Vec<QueueEntry>) {
        let now = SystemTime::now();
        let mut items = Vec::with_capacity(entries.len());
        for entry in entries {
            match self.messages.read_chunk(&entry.id, 0, 0).await {
                Ok(Some(_)) => items.push(entry),
                // Finished by another batch since the due list was read:
                // its entry went with its body.
                Ok(None) if matches!(self.queue.get(&entry.id).await, Ok(None)) => {}
                Ok(None) => {
                    tracing::error!(event = "message_body_missing", queue_id = %entry.id);
                    let mut e = entry.clone();
                    e.last_error = Some("message body missing from the store".into());
                    e.next_attempt = unix_seconds(now) + self.engine.config().retry_max.as_secs();
                    let _ = self.queue.update(&e).await;
                }
                Err(e) => {
                    tracing::warn!(event = "message_read_failed", queue_id = %entry.id, error = %crate::error::Report(&e))
                }
            }
        }
        if items.is_empty() {
            return;
        }
        // Stored concurrently: the writer commits them together.
        let reports = self
            .engine
            .attempt_batch(&items, self.messages.as_ref(), now)
            .await;
        futures_util::future::join_all(reports.into_iter().map(|r| self.store_report(r))).await;
    }

    async fn store_report(&self, mut report: super::AttemptReport) {
        super::record_attempt(&report);
        let e = &report.entry;
        let domain = e.domain.clone();
        let next_attempt = e.next_attempt;
        let (destination_down, delivered) = (report.destination_down, report.delivered);
        let error = destination_down.then(|| report.entry.last_error.clone().unwrap_or_default());
        let harmless = delivered == 0 && report.bounce.is_none() && !report.finished;
        if harmless {
            self.reschedule(&report.entry).await;
        } else {
            let committed = self.commit_outcome(&mut report).await;
            self.deferred.lock().remove(&report.entry.id);
            if let Err(err) = committed {
                tracing::error!(event = "queue_update_failed", queue_id = %report.entry.id, error = %crate::error::Report(&err));
                self.keep_unstored(report, &err);
            }
        }
        if destination_down {
            let newly = self.down.lock().insert(domain.clone());
            if newly {
                self.recorded_up.lock().remove(&domain);
                self.destinations
                    .went_down(&domain, unix_now(), error.as_deref().unwrap_or_default())
                    .await;
            }
            if let Err(err) = self.queue.defer_domain(&domain, next_attempt).await {
                tracing::warn!(event = "defer_failed", domain = %domain, error = %crate::error::Report(&err));
            }
        } else if delivered > 0 {
            if self.down.lock().remove(&domain) {
                self.recorded_up.lock().insert(domain.clone());
                self.destinations.came_back(&domain, unix_now()).await;
            } else {
                self.primary_answered(&domain).await;
            }
        }
    }

    /// Writes the schedule of an attempt that delivered and bounced nothing;
    /// one the store refuses is kept in memory instead of pausing delivery.
    async fn reschedule(&self, entry: &QueueEntry) {
        match self.queue.reschedule(entry).await {
            Ok(_) => {
                self.deferred.lock().remove(&entry.id);
            }
            Err(err) => {
                metrics::counter!("backupmx_disk_full_outcome_deferred_total").increment(1);
                let first = {
                    let mut deferred = self.deferred.lock();
                    let first = deferred.is_empty();
                    deferred.insert(entry.id.clone(), entry.clone());
                    first
                };
                if first {
                    tracing::warn!(
                        event = "disk_full_outcome_deferred", queue_id = %entry.id,
                        error = %crate::error::Report(&err),
                        "cannot store the schedule of an attempt that delivered nothing; kept in memory, delivery goes on"
                    );
                } else {
                    tracing::debug!(event = "disk_full_outcome_deferred", queue_id = %entry.id);
                }
            }
        }
    }

    /// While a destination is down its mail waits for the probe with no
    /// attempt: the "delayed" notices (`[delivery] delay_warning`) that
    /// attempts would send go from here, at most every few minutes per
    /// domain. The notice is queued before the mark is stored: a crash in
    /// between repeats a notice, never loses one.
    async fn warn_delayed(&self, domain: &DomainName) {
        let Some(after) = self.engine.config().delay_warning else {
            return;
        };
        let every = (after / 4).min(Duration::from_secs(300));
        {
            let mut passes = self.delay_passes.lock();
            if passes.get(domain).is_some_and(|t| t.elapsed() < every) {
                return;
            }
            passes.insert(domain.clone(), Instant::now());
        }
        let entries = match self.queue.list(Some(domain)).await {
            Ok(entries) => entries,
            Err(e) => {
                tracing::warn!(event = "delay_notice_failed", domain = %domain, error = %crate::error::Report(&e));
                return;
            }
        };
        let now = std::time::SystemTime::now();
        for mut entry in entries {
            if entry.delay_warned || self.in_flight.lock().contains(&entry.id) {
                continue;
            }
            let Some(notice) = self
                .engine
                .delay_notice(&mut entry, self.messages.as_ref(), now)
                .await
            else {
                continue;
            };
            let stored = match &notice {
                Some(n) => self.spool.accept(n.clone()).await.map(|_| ()),
                None => Ok(()),
            };
            let marked = match stored {
                Ok(()) => self.queue.mark_delay_warned(&entry.id).await.map(|_| ()),
                Err(e) => Err(e),
            };
            if let Err(e) = marked {
                tracing::warn!(event = "delay_notice_failed", queue_id = %entry.id, error = %crate::error::Report(&e));
                return;
            }
            if let Some(n) = notice {
                tracing::info!(event = "delay_notice_queued", queue_id = %entry.id, dsn_id = %n.id,
                    to = %entry.sender, "the destination is down; the sender is told the mail waits");
                metrics::counter!("backupmx_bounces_queued_total").increment(1);
            }
        }
    }

    /// Records a destination up in the store once per transition.
    async fn primary_answered(&self, domain: &DomainName) {
        if self.recorded_up.lock().insert(domain.clone()) {
            self.engine.record_primary(domain, true, unix_now()).await;
        }
    }

    /// Stores an attempt's outcome in the embedded store.
    async fn commit_outcome(&self, report: &mut super::AttemptReport) -> Result<(), StoreError> {
        super::commit_outcome(report, self).await
    }

    async fn probe_loop(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.cfg.probe_interval) => {}
                _ = shutdown.changed() => return,
            }
            let domains: Vec<DomainName> = self.down.lock().iter().cloned().collect();
            // At once: a blackholed primary (each try waits for its
            // timeout) must not delay the others' recovery.
            futures_util::future::join_all(domains.iter().map(|d| self.probe_and_release(d))).await;
        }
    }

    async fn probe_and_release(&self, domain: &DomainName) {
        match self.engine.probe(domain).await {
            Ok(()) => {
                metrics::counter!("backupmx_probe_recoveries_total").increment(1);
                self.recorded_up.lock().insert(domain.clone());
                self.destinations.came_back(domain, unix_now()).await;
                if let Err(e) = self.release(Some(domain)).await {
                    tracing::warn!(event = "release_failed", domain = %domain, error = %crate::error::Report(&e));
                }
            }
            Err(why) => {
                tracing::info!(event = "probe_failed", domain = %domain, error = %why);
                self.warn_delayed(domain).await;
            }
        }
    }
}

#[async_trait::async_trait]
impl super::OutcomeWriter for Worker {
    type Error = StoreError;
    async fn queue_bounce(&self, bounce: &AcceptedMessage) -> Result<(), StoreError> {
        self.spool.accept(bounce.clone()).await.map(|_| ())
    }
    async fn remove(&self, entry: &QueueEntry) -> Result<(), StoreError> {
        self.queue.remove(&entry.id).await.map(|_| ())
    }
    async fn update(&self, entry: &QueueEntry) -> Result<(), StoreError> {
        self.queue.update(entry).await.map(|_| ())
    }
}

fn unix_now() -> u64 {
    crate::time::unix_seconds(std::time::SystemTime::now())
}
