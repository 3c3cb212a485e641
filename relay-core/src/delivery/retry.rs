//! The AWS retry function's work for one SQS message: load the record from
//! S3, make one delivery attempt with the shared [`Engine`], then store the
//! outcome and schedule the next attempt (or finish).
//!
//! The S3 record is authoritative: it is updated before the next SQS
//! message is sent, so a redelivered message can never resend to a
//! recipient already delivered. An SQS message whose `attempts` differs
//! from the record's is stale and dropped, unless the record is long
//! overdue (its next message was lost), in which case it is rescued.

use std::sync::Arc;
use std::time::SystemTime;

use super::Engine;
use crate::queue::QueueEntry;
use crate::store::aws::AwsStore;
use crate::store::{DeliveryQueue, MessageStore, SplitSpool, Spool};
use crate::time::unix_seconds;

/// A record this far past its next attempt with no attempt made is
/// assumed orphaned (SQS visibility timeout plus the longest delay).
const ORPHAN_GRACE_SECS: u64 = 5400 + 900;

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
}

impl RetryProcessor {
    pub async fn process(&self, body: &str, now: SystemTime) -> Result<Processed, RetryError> {
        let message = QueueEntry::decode(body.as_bytes())
            .map_err(|e| RetryError(format!("malformed queue message: {e}")))?;
        let store = &self.store;
        let Some(record) = DeliveryQueue::get(store.as_ref(), &message.id)
            .await
            .map_err(|e| RetryError(e.to_string()))?
        else {
            return Ok(Processed::Dropped("no record (delivered or deleted)"));
        };
        let now_secs = unix_seconds(now);
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
        // From here on the primary may have taken recipients: a failed
        // write must not end the invocation at once, or the redelivered
        // SQS message would send them again. Each write is retried while
        // the store recovers from a short outage.
        if let Some(bounce) = report.bounce.clone() {
            let spool = SplitSpool {
                messages: store.clone(),
                queue: store.clone(),
            };
            persist("queueing the DSN", || spool.accept(bounce.clone())).await?;
        }
        let e = &report.entry;
        tracing::info!(
            event = "delivery_attempt", queue_id = %e.id, domain = %e.domain, attempt = e.attempts,
            delivered = report.delivered, finished = report.finished, error = e.last_error.as_deref().unwrap_or("")
        );
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
        Ok(Processed::Attempted {
            finished: report.finished,
            delivered: report.delivered,
        })
    }
}
