//! The sweeper: probes of the destinations recorded down, a new ticket
//! for every record that lost its own (a crash, a timeout, a failed send),
//! and the dead-letter queue re-driven. It deletes no record: expiry is
//! an attempt's business.

use std::time::SystemTime;

use relay_core::store::aws::Ticket;
use relay_core::time::unix_seconds;

use crate::processor::{dead_letter_err, store_err, RetryError, RetryProcessor};

/// What one sweeper pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Overdue records, not being attempted, given a new ticket.
    pub orphans: usize,
    /// Dead-letter messages taken off the dead-letter queue.
    pub dead_letters: usize,
    /// Dead letters whose record got a new ticket.
    pub redriven: usize,
    /// Dead letters that are no ticket of ours, left in place.
    pub malformed: usize,
    /// Destinations still down after this pass's probes.
    pub down: usize,
    /// Seconds since the oldest overdue record was accepted (0: none):
    /// the queue-age alarm's metric.
    pub oldest_overdue: u64,
}

impl RetryProcessor {
    /// Probes every destination recorded down whose probe is due (one
    /// process per destination and interval), releasing those that answer;
    /// returns those still down.
    pub async fn probe_down(
        &self,
        now: SystemTime,
    ) -> Result<Vec<relay_core::address::DomainName>, RetryError> {
        let now_secs = unix_seconds(now);
        let down = self
            .store
            .down_destinations()
            .await
            .map_err(store_err("listing down destinations"))?;
        let next = self.next_probe(now_secs);
        let probes = down.iter().map(|d| async move {
            if d.probe_at > now_secs {
                return true;
            }
            match self.store.claim_probe(&d.domain, now_secs, next).await {
                Ok(true) => {}
                Ok(false) => return true,
                Err(e) => {
                    tracing::warn!(event = "probe_claim_failed", domain = %d.domain, error = %relay_core::error::Report(&e));
                    return true;
                }
            }
            match self.engine.probe(&d.domain).await {
                Ok(()) => {
                    self.destination_back(&d.domain, now_secs).await;
                    false
                }
                Err(why) => {
                    tracing::info!(event = "probe_failed", domain = %d.domain, error = %why);
                    true
                }
            }
        });
        // At once: a blackholed primary must not delay the others.
        let still = futures_util::future::join_all(probes).await;
        Ok(down
            .into_iter()
            .zip(still)
            .filter(|(_, down)| *down)
            .map(|(d, _)| d.domain)
            .collect())
    }

    /// One sweeper pass: probes of the destinations recorded down; every
    /// record overdue by `orphan_after` with no
    /// attempt under way and no ticket sent in that time gets a new ticket
    /// (its own was lost to a crash, a timeout or a failed send); every
    /// dead letter is taken off the dead-letter queue and its record, if
    /// any, given a ticket. Expiry needs nothing more: a record that is
    /// attempted past its lifetime bounces. Deletes no record.
    pub async fn sweep(&self, now: SystemTime) -> Result<SweepReport, RetryError> {
        let now_secs = unix_seconds(now);
        let orphan_after = self.settings.orphan_after.as_secs();
        let store = &self.store;
        let down = self.probe_down(now).await?;
        if let Some(a) = self.engine.alerts() {
            // Reads the whole queue table's domain index: only with alerts.
            self.queue_age
                .check(self.store.as_ref(), a, self.settings.queue_age, now_secs)
                .await;
        }
        let mut report = SweepReport {
            down: down.len(),
            ..SweepReport::default()
        };
        let overdue = store
            .overdue(now_secs.saturating_sub(orphan_after))
            .await
            .map_err(store_err("listing overdue records"))?;
        for record in overdue {
            report.oldest_overdue = report
                .oldest_overdue
                .max(now_secs.saturating_sub(record.received));
            if record.lease > now_secs || record.nudged.saturating_add(orphan_after) > now_secs {
                continue;
            }
            // Mail for a destination that is down has its ticket parked
            // and is released by the probe; unless it is expiring.
            if down.contains(&record.domain)
                && !self
                    .expired_at(&record.domain, record.received, now_secs)
                    .await
            {
                continue;
            }
            match store.nudge(&record.ticket(), now_secs).await {
                Ok(true) => {
                    report.orphans += 1;
                    metrics::counter!("backupmx_sweeper_orphans_total").increment(1);
                    tracing::warn!(event = "orphan_requeued", queue_id = %record.id, due = record.due);
                }
                Ok(false) => {}
                Err(e) => return Err(store_err("nudging an orphan")(e)),
            }
        }
        let Some(dlq) = store
            .dead_letter_queue_url()
            .await
            .map_err(store_err("finding the dead-letter queue"))?
        else {
            return Ok(report);
        };
        loop {
            let received = store
                .receive_dead_letters(&dlq)
                .await
                .map_err(dead_letter_err("receive"))?;
            // Messages left in place stay invisible for a while: an empty
            // receive means every dead letter was seen once.
            if received.is_empty() {
                return Ok(report);
            }
            for m in received {
                report.dead_letters += 1;
                match Ticket::decode(&m.body) {
                    Ok(ticket) => {
                        let item = store
                            .queue_item(&ticket.id)
                            .await
                            .map_err(store_err("reading a dead letter's record"))?;
                        if let Some(item) = item {
                            if item.lease <= now_secs
                                && store
                                    .nudge(&item.ticket(), now_secs)
                                    .await
                                    .map_err(store_err("re-driving a dead letter"))?
                            {
                                report.redriven += 1;
                                metrics::counter!("backupmx_sweeper_redriven_total").increment(1);
                                tracing::warn!(event = "dead_letter_redriven", queue_id = %ticket.id);
                            }
                        }
                    }
                    Err(e) => {
                        // Kept in the dead-letter queue (its alarm tells
                        // the operator); no record stands behind it.
                        report.malformed += 1;
                        tracing::error!(event = "malformed_dead_letter", error = %relay_core::error::Report(&e));
                        continue;
                    }
                }
                if let Some(receipt) = &m.receipt {
                    store
                        .delete_dead_letter(&dlq, receipt)
                        .await
                        .map_err(dead_letter_err("delete"))?;
                }
            }
        }
    }
}
