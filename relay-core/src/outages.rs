//! Records outages as deliveries observe them and tallies what becomes
//! of their mail ([`crate::history`] has the model); keeps the history's
//! samples and pruning going.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use crate::address::DomainName;
use crate::alerts::Alerter;
use crate::history::{samples_of, tally_of, Counter, Outage, OutageCounts, Refusal, SAMPLE_KEEP};
use crate::queue::QueueEntry;
use crate::store::{DeliveryQueue, StoreError};
use crate::sync::Mutex;

/// What one delivery attempt told, in a form that outlives it (recorded
/// off the delivery's path, after its outcome is stored).
pub struct AttemptSeen {
    primary_up: Option<bool>,
    /// The outage's earliest evidence, if this attempt opens one.
    start: u64,
    /// What changed per entry, with the entry's arrival.
    tallies: Vec<(OutageCounts, u64)>,
}

impl AttemptSeen {
    pub fn of(
        primary_up: Option<bool>,
        changes: &[(&QueueEntry, &QueueEntry, bool)],
        now: u64,
    ) -> AttemptSeen {
        // First tries only: a message retried after a refusal says nothing
        // about when the primary went away.
        let start = changes
            .iter()
            .filter(|(before, _, _)| before.attempts == 0)
            .map(|(before, _, _)| before.received_at)
            .min()
            .unwrap_or(now)
            .min(now);
        let tallies = changes
            .iter()
            .map(|(before, after, finished)| {
                (tally_of(before, after, *finished), before.received_at)
            })
            .filter(|(counts, _)| !counts.is_empty())
            .collect();
        AttemptSeen {
            primary_up,
            start,
            tallies,
        }
    }
}

/// Records outages as deliveries observe them, and tallies what happens
/// to their mail. Cheap to share; every method only logs a store failure
/// (history never holds up mail). Every observation reads the domain's
/// latest outage first and writes only for a transition: no memory of
/// its own, so processes that deliver side by side (AWS) never act on a
/// stale picture of one another's outages.
pub struct Recorder {
    store: Arc<dyn crate::store::HistoryStore>,
    queue: Arc<dyn DeliveryQueue>,
    alerts: Option<Arc<Alerter>>,
}

impl Recorder {
    pub fn new(
        store: Arc<dyn crate::store::HistoryStore>,
        queue: Arc<dyn DeliveryQueue>,
        alerts: Option<Arc<Alerter>>,
    ) -> Recorder {
        Recorder {
            store,
            queue,
            alerts,
        }
    }

    /// A delivery attempt found the primary down; `start` is the outage's
    /// earliest evidence (see the module's text).
    pub async fn primary_down(&self, domain: &DomainName, start: u64) {
        if let Err(e) = self.open(domain, start).await {
            tracing::warn!(event = "history_not_stored", domain = %domain, error = %crate::error::Report(&e));
        }
    }

    async fn open(&self, domain: &DomainName, start: u64) -> Result<(), StoreError> {
        let latest = self.store.recent_outage(domain).await?;
        if latest.as_ref().is_some_and(|o| o.end.is_none()) {
            return Ok(());
        }
        // Never before the previous outage's end: its mail is its own.
        // (The same second may close one and open the next: times are
        // whole seconds, and a start in the future would lose this one's
        // first mail.)
        let start = latest
            .as_ref()
            .and_then(|o| o.end)
            .map_or(start, |end| start.max(end));
        let mut counts = OutageCounts::default();
        self.queue
            .scan(Some(domain), &mut |e| {
                if e.received_at >= start {
                    counts
                        .add(Counter::AcceptedMessages, 1)
                        .add(Counter::AcceptedRecipients, e.recipients.len() as u64);
                }
            })
            .await?;
        if let Some(o) = self.store.open_outage(domain, start, &counts).await? {
            metrics::counter!("backupmx_outages_total").increment(1);
            tracing::warn!(event = "outage_started", domain = %domain, outage = o.number,
                start = %crate::history::rfc3339(o.start), queued = o.counts.get(Counter::AcceptedMessages));
        }
        Ok(())
    }

    /// A delivery attempt found the primary answering.
    pub async fn primary_up(&self, domain: &DomainName, now: u64) {
        match self.store.recent_outage(domain).await {
            Ok(Some(o)) if o.end.is_none() => {}
            Ok(_) => return,
            Err(e) => {
                tracing::warn!(event = "history_not_stored", domain = %domain, error = %crate::error::Report(&e));
                return;
            }
        }
        match self.store.end_outage(domain, now).await {
            Ok(Some(o)) => {
                tracing::info!(event = "outage_ended", domain = %domain, outage = o.number,
                    seconds = o.duration(now), still_queued = o.still_queued());
                self.check_drain(domain, &o, now).await;
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(event = "history_not_stored", domain = %domain, error = %crate::error::Report(&e));
            }
        }
    }

    /// Adds `counts` to the outage mail that arrived at `at` belongs to.
    pub async fn tally(&self, domain: &DomainName, counts: &OutageCounts, at: u64, now: u64) {
        if counts.is_empty() {
            return;
        }
        // A read first: most mail belongs to no outage, and a read costs
        // neither a commit (embedded) nor a write unit (DynamoDB).
        match self.store.recent_outage(domain).await {
            Ok(Some(o)) if o.takes(at) => {}
            Ok(_) => return,
            Err(e) => {
                tracing::warn!(event = "history_not_stored", domain = %domain, error = %crate::error::Report(&e));
                return;
            }
        }
        match self.store.tally(domain, counts, at).await {
            Ok(Some(o)) => self.check_drain(domain, &o, now).await,
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(event = "history_not_stored", domain = %domain, error = %crate::error::Report(&e))
            }
        }
    }

    /// What one delivery attempt to `domain` saw: whether its primary
    /// answered (`None`: nothing to tell, e.g. no route), and each
    /// attempted entry before and after, with whether it left the queue.
    pub async fn attempted(
        &self,
        domain: &DomainName,
        primary_up: Option<bool>,
        changes: &[(&QueueEntry, &QueueEntry, bool)],
        now: u64,
    ) {
        self.record(domain, AttemptSeen::of(primary_up, changes, now), now)
            .await;
    }

    /// Records what an attempt saw: the transition first, then the tallies.
    pub async fn record(&self, domain: &DomainName, seen: AttemptSeen, now: u64) {
        match seen.primary_up {
            Some(false) => self.primary_down(domain, seen.start).await,
            Some(true) => self.primary_up(domain, now).await,
            None => {}
        }
        for (counts, received) in &seen.tallies {
            self.tally(domain, counts, *received, now).await;
        }
    }

    /// Counts a message deleted by an operator.
    pub async fn deleted(&self, entry: &QueueEntry, now: u64) {
        let mut counts = OutageCounts::of(Counter::DeletedMessages, 1);
        counts.add(Counter::FinishedMessages, 1);
        self.tally(&entry.domain, &counts, entry.received_at, now)
            .await;
    }

    /// Counts a refusal of mail for `domain` now.
    pub async fn refused(&self, domain: &DomainName, why: Refusal, now: u64) {
        self.tally(domain, &OutageCounts::of(why.counter(), 1), now, now)
            .await;
    }

    async fn check_drain(&self, domain: &DomainName, outage: &Outage, now: u64) {
        if !outage.drain_complete() {
            return;
        }
        match self.store.mark_drained(domain, outage.number, now).await {
            Ok(true) => {
                let mut done = outage.clone();
                done.drained = Some(now);
                tracing::info!(event = "outage_drained", domain = %domain, outage = done.number,
                    drain_seconds = now.saturating_sub(done.end.unwrap_or(now)));
                if let Some(a) = &self.alerts {
                    a.send(
                        "outage_report",
                        Some(domain.as_str()),
                        json!({ "outage": done.to_json(now) }),
                    );
                }
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(event = "history_not_stored", domain = %domain, error = %crate::error::Report(&e))
            }
        }
    }
}

/// The periodic upkeep of the history: a queue-depth sample of every
/// hosted domain each minute, and the pruning of old outages and samples.
pub struct Upkeep {
    /// `[history] keep`.
    pub keep: Duration,
    /// The domains with mail at the last sample (their line is closed by
    /// a zero when it is gone).
    had_mail: Mutex<std::collections::HashSet<DomainName>>,
}

impl Upkeep {
    pub fn new(keep: Duration) -> Upkeep {
        Upkeep {
            keep,
            had_mail: Mutex::new(Default::default()),
        }
    }

    /// One sampling pass over every hosted domain at `now`; how many
    /// samples were stored.
    pub async fn sample(
        &self,
        store: &dyn crate::store::HistoryStore,
        registry: &dyn crate::store::DomainRegistry,
        now: u64,
    ) -> Result<usize, StoreError> {
        let domains: Vec<DomainName> = registry.list().await?.into_iter().map(|d| d.name).collect();
        let minute = now - now % 60;
        let depths = store.queue_depths(&domains).await?;
        let had = self.had_mail.lock().clone();
        let samples = samples_of(minute, &depths, &had);
        store.put_samples(&samples).await?;
        *self.had_mail.lock() = samples
            .iter()
            .filter(|(_, s)| s.count > 0)
            .map(|(n, _)| n.clone())
            .collect();
        Ok(samples.len())
    }

    /// Removes what is older than it is kept; how much went.
    pub async fn prune(
        &self,
        store: &dyn crate::store::HistoryStore,
        now: u64,
    ) -> Result<u64, StoreError> {
        store
            .prune(
                now.saturating_sub(self.keep.as_secs()),
                now.saturating_sub(SAMPLE_KEEP.as_secs()),
            )
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::RecipientStatus;
    use crate::store::contract::message;
    use crate::store::local::LocalStore;
    use crate::store::{HistoryStore, Spool};

    #[tokio::test]
    async fn an_outage_opens_with_its_queue_ends_when_answered_and_drains_with_its_mail() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(LocalStore::open(dir.path()).unwrap());
        let d = DomainName::parse("example.test").unwrap();
        store
            .accept(message(&["a@example.test", "b@example.test"]))
            .await
            .unwrap();
        let entry = store.list(Some(&d)).await.unwrap().remove(0);
        let rec = Recorder::new(store.clone(), store.clone(), None);
        let now = entry.received_at + 1;
        // Down: opened at the message's arrival, the message counted.
        rec.attempted(&d, Some(false), &[(&entry, &entry, false)], now)
            .await;
        let o = store.latest_outage(&d).await.unwrap().unwrap();
        assert_eq!((o.number, o.start, o.end), (1, entry.received_at, None));
        assert_eq!(o.counts.get(Counter::AcceptedRecipients), 2);
        // Down again: nothing new.
        rec.attempted(&d, Some(false), &[], now + 5).await;
        assert_eq!(store.latest_outage(&d).await.unwrap().unwrap().number, 1);
        // Answered, and both recipients delivered: ended and drained.
        let mut after = entry.clone();
        for r in &mut after.recipients {
            r.status = RecipientStatus::Delivered;
        }
        rec.attempted(&d, Some(true), &[(&entry, &after, true)], now + 10)
            .await;
        let o = store.latest_outage(&d).await.unwrap().unwrap();
        assert_eq!((o.end, o.drained), (Some(now + 10), Some(now + 10)));
        assert_eq!(o.counts.get(Counter::DeliveredMessages), 1);
        assert_eq!(o.counts.get(Counter::DeliveredRecipients), 2);
        // Mail outside any outage costs nothing and counts nowhere.
        rec.refused(&d, Refusal::Greylist, now + 20).await;
        let o = store.latest_outage(&d).await.unwrap().unwrap();
        assert_eq!(o.counts.refused_total(), 0);
        // The next failure opens outage 2.
        rec.attempted(&d, Some(false), &[], now + 30).await;
        let o = store.latest_outage(&d).await.unwrap().unwrap();
        assert_eq!((o.number, o.start), (2, now + 30));
    }
}
