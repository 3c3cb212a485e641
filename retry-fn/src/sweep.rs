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
    /// "Delayed" notices queued for mail waiting on a down destination.
    pub delay_notices: usize,
}

impl RetryProcessor {
    /// While a destination is down its mail waits for the probe with no
    /// attempt: the "delayed" notices (`[delivery] delay_warning`) that
    /// attempts would send go from the sweeper, one pass per domain every
    /// few minutes across all processes. Each notice is queued before its
    /// mark is stored: a failure in between repeats a notice, never loses
    /// one.
    async fn warn_delayed(
        &self,
        domain: &relay_core::address::DomainName,
        now: SystemTime,
    ) -> Result<usize, RetryError> {
        let Some(after) = self.engine.config().delay_warning else {
            return Ok(0);
        };
        let now_secs = unix_seconds(now);
        let every = (after.as_secs() / 4).clamp(1, 300);
        let turn = format!("delay#{domain}#{}", now_secs / every);
        let store = &self.store;
        if !store
            .take_turn(&turn, now_secs + every)
            .await
            .map_err(store_err("taking the delay-notice turn"))?
        {
            return Ok(0);
        }
        let items = store
            .domain_items(domain)
            .await
            .map_err(store_err("listing a down destination's records"))?;
        let spool = relay_core::store::SplitSpool {
            messages: store.clone(),
            queue: store.clone(),
            history: None,
        };
        let mut queued = 0;
        for item in items {
            if item.entry.delay_warned || item.lease > now_secs {
                continue;
            }
            let mut entry = item.entry.clone();
            let Some(notice) = self
                .engine
                .delay_notice(&mut entry, store.as_ref(), now)
                .await
            else {
                continue;
            };
            if let Some(n) = &notice {
                relay_core::store::Spool::accept(&spool, n.clone())
                    .await
                    .map_err(store_err("queueing a delay notice"))?;
            }
            if store
                .mark_delay_warned(&item, &entry, now_secs)
                .await
                .map_err(store_err("marking a delay notice sent"))?
            {
                if let Some(n) = notice {
                    queued += 1;
                    metrics::counter!("backupmx_bounces_queued_total").increment(1);
                    tracing::info!(event = "delay_notice_queued", queue_id = %entry.id, dsn_id = %n.id, to = %entry.sender);
                }
            }
        }
        Ok(queued)
    }

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
        for domain in &down {
            report.delay_notices += self.warn_delayed(domain, now).await?;
        }
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
