//! The AWS retry function's work for one SQS message: load the record from
//! S3, make one delivery attempt with the shared [`Engine`], then store the
//! outcome and schedule the next attempt (or finish).
//!
//! The S3 record is authoritative: it is updated before the next SQS
//! message is sent, so a redelivered message can never resend to a
//! recipient already delivered. An SQS message whose `attempts` differs
//! from the record's is stale and dropped, unless the record is long
//! overdue (its next message was lost), in which case it is rescued.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use super::{AttemptReport, Engine};
use crate::queue::{QueueEntry, QueueId};
use crate::store::aws::AwsStore;
use crate::store::{DeliveryQueue, MessageStore, SplitSpool, Spool};
use crate::time::unix_seconds;

/// A record this far past its next attempt with no attempt made is
/// assumed orphaned (SQS visibility timeout plus the longest delay).
const ORPHAN_GRACE_SECS: u64 =
    crate::store::aws::QUEUE_VISIBILITY_TIMEOUT_SECS + crate::store::aws::MAX_SQS_DELAY;

/// Tries of each write after a delivery attempt, and the first pause
/// between them (doubling: 0.2 + 0.4 + … ≈ 6 s in all).
const PERSIST_TRIES: u32 = 5;
const PERSIST_PAUSE: std::time::Duration = std::time::Duration::from_millis(200);

/// Runs a store write, trying again with backoff while it fails.
async fn persist<T, F, Fut>(what: &str, mut write: F) -> Result<T, RetryError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, crate::store::StoreError>>,
{
    let mut pause = PERSIST_PAUSE;
    let mut tries = 1;
    loop {
        match write().await {
            Ok(v) => return Ok(v),
            Err(e) if tries >= PERSIST_TRIES => return Err(RetryError(format!("{what}: {e}"))),
            Err(e) => {
                metrics::counter!("backupmx_outcome_store_failures_total").increment(1);
                tracing::warn!(event = "outcome_store_retry", what, tries, error = %e);
                tokio::time::sleep(pause).await;
                pause *= 2;
                tries += 1;
            }
        }
    }
}

/// What became of one SQS message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Processed {
    /// An attempt was made; `finished` if nothing is pending any more.
    Attempted { finished: bool, delivered: usize },
    /// Not due yet: sent back to the queue with the remaining delay.
    Redelayed,
    /// Stale duplicate or the entry is gone: dropped.
    Dropped(&'static str),
}

/// Failures worth retrying the SQS message for (it stays in the queue and,
/// after `maxReceiveCount` receipts, moves to the dead-letter queue).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct RetryError(pub String);

pub struct RetryProcessor {
    pub store: Arc<AwsStore>,
    pub engine: Arc<Engine>,
    /// Outcomes this process could not store, by queue id: when their SQS
    /// message comes back, the outcome is stored instead of the message
    /// being delivered again (as the embedded worker does).
    unstored: Mutex<HashMap<QueueId, AttemptReport>>,
}

impl RetryProcessor {
    pub fn new(store: Arc<AwsStore>, engine: Arc<Engine>) -> Self {
        RetryProcessor {
            store,
            engine,
            unstored: Mutex::new(HashMap::new()),
        }
    }

    fn lock_unstored(&self) -> std::sync::MutexGuard<'_, HashMap<QueueId, AttemptReport>> {
        self.unstored.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub async fn process(&self, body: &str, now: SystemTime) -> Result<Processed, RetryError> {
        let message = QueueEntry::decode(body.as_bytes())
            .map_err(|e| RetryError(format!("malformed queue message: {e}")))?;
        let now_secs = unix_seconds(now);
        let earlier = self.lock_unstored().remove(&message.id);
        if let Some(report) = earlier {
            tracing::info!(event = "unstored_outcome_retried", queue_id = %message.id);
            return self.commit(report, now_secs).await;
        }
        let store = &self.store;
        let Some(record) = DeliveryQueue::get(store.as_ref(), &message.id)
            .await
            .map_err(|e| RetryError(e.to_string()))?
        else {
            return Ok(Processed::Dropped("no record (delivered or deleted)"));
        };
        if record.attempts != message.attempts
            && now_secs < record.next_attempt.saturating_add(ORPHAN_GRACE_SECS)
        {
            return Ok(Processed::Dropped("stale message"));
        }
        if record.next_attempt > now_secs {
            store
                .schedule(&record, record.next_attempt - now_secs)
                .await
                .map_err(|e| RetryError(e.to_string()))?;
            return Ok(Processed::Redelayed);
        }
        // The body is read in pieces while it is sent; a missing one is
        // found before the attempt (a one-byte read), not in the middle.
        if MessageStore::read_chunk(store.as_ref(), &record.id, 0, 1)
            .await
            .map_err(|e| RetryError(e.to_string()))?
            .is_none()
        {
            tracing::error!(event = "message_body_missing", queue_id = %record.id);
            return Err(RetryError(format!(
                "message body of {} is missing",
                record.id
            )));
        }
        let report = self.engine.attempt(&record, store.as_ref(), now).await;
        let e = &report.entry;
        tracing::info!(
            event = "delivery_attempt", queue_id = %e.id, domain = %e.domain, attempt = e.attempts,
            delivered = report.delivered, finished = report.finished, error = e.last_error.as_deref().unwrap_or("")
        );
        self.commit(report, now_secs).await
    }

    /// Stores an attempt's outcome. From here on the primary may have taken
    /// recipients: a failed write must not simply end the invocation, or
    /// the redelivered SQS message would send them again. Each write is
    /// retried while the store recovers from a short outage; an outcome
    /// still unstored is kept for when its SQS message comes back.
    async fn commit(
        &self,
        mut report: AttemptReport,
        now_secs: u64,
    ) -> Result<Processed, RetryError> {
        match self.write_outcome(&mut report, now_secs).await {
            Ok(()) => Ok(Processed::Attempted {
                finished: report.finished,
                delivered: report.delivered,
            }),
            Err(e) => {
                tracing::error!(event = "queue_update_failed", queue_id = %report.entry.id, error = %e);
                self.lock_unstored().insert(report.entry.id.clone(), report);
                Err(e)
            }
        }
    }

    async fn write_outcome(
        &self,
        report: &mut AttemptReport,
        now_secs: u64,
    ) -> Result<(), RetryError> {
        let store = &self.store;
        if let Some(bounce) = report.bounce.clone() {
            let spool = SplitSpool {
                messages: store.clone(),
                queue: store.clone(),
            };
            persist("queueing the DSN", || spool.accept(bounce.clone())).await?;
            // Stored: a retry of the rest must not queue it twice.
            report.bounce = None;
        }
        let e = &report.entry;
        if report.finished {
            persist("removing the record", || {
                DeliveryQueue::remove(store.as_ref(), &e.id)
            })
            .await?;
        } else {
            persist("updating the record", || store.put_record(e)).await?;
            persist("scheduling the next attempt", || {
                store.schedule(e, e.next_attempt.saturating_sub(now_secs))
            })
            .await?;
        }
        Ok(())
    }
}
