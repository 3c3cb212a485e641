//! An attempt's outcome: what the primary's answers make of a queue entry
//! (`apply`, pure), how it is logged, and how it is stored in the same
//! order by both schedulers ([`commit_outcome`]).

use std::time::{Duration, SystemTime};

use relay_proto::client::RcptResult;

use crate::queue::{AcceptedMessage, QueueEntry, RecipientStatus};
use crate::time::unix_seconds;

use super::dsn;

/// The outcome of one attempt.
#[derive(Debug, Clone)]
pub struct AttemptReport {
    /// The entry with its new state; store it (or remove it if finished).
    pub entry: QueueEntry,
    /// No recipient is pending any more: remove the entry.
    pub finished: bool,
    /// A DSN for the sender, to be queued before the entry is updated.
    pub bounce: Option<AcceptedMessage>,
    /// No server could be reached at all (connection refused, timeout,
    /// 421 at greeting): the whole domain should wait.
    pub destination_down: bool,
    /// Recipients delivered in this attempt.
    pub delivered: usize,
}

impl AttemptReport {
    /// An entry left as it is (nothing attempted).
    pub fn unchanged(entry: QueueEntry, finished: bool) -> Self {
        AttemptReport {
            entry,
            finished,
            bounce: None,
            destination_down: false,
            delivered: 0,
        }
    }
}

/// Where an attempt's outcome is written. The embedded store and the AWS
/// queue differ only here; [`commit_outcome`] keeps the order both must.
#[async_trait::async_trait]
pub trait OutcomeWriter: Sync {
    type Error: std::error::Error + Send;
    /// Queues a DSN (a new message to the sender).
    async fn queue_bounce(&self, bounce: &AcceptedMessage) -> Result<(), Self::Error>;
    /// Removes the entry of a message with nothing left pending.
    async fn remove(&self, entry: &QueueEntry) -> Result<(), Self::Error>;
    /// Stores the entry's new state (recipients, attempts, next attempt).
    async fn update(&self, entry: &QueueEntry) -> Result<(), Self::Error>;
}

/// Logs and counts one attempt: the same event and counters whichever
/// process made it (the embedded worker or retry-fn).
pub fn record_attempt(report: &AttemptReport) {
    let e = &report.entry;
    tracing::info!(
        event = "delivery_attempt", queue_id = %e.id, domain = %e.domain, attempt = e.attempts,
        delivered = report.delivered, finished = report.finished, error = e.last_error.as_deref().unwrap_or("")
    );
    metrics::counter!("backupmx_delivered_total").increment(report.delivered as u64);
}

/// Stores an attempt's outcome, for both backends: the DSN first (so a
/// crash in between repeats the attempt rather than losing the bounce),
/// then the entry removed or updated. A DSN once stored is taken out of
/// the report, so a retry after a failed entry write does not queue it
/// twice.
pub async fn commit_outcome<W: OutcomeWriter + ?Sized>(
    report: &mut AttemptReport,
    writer: &W,
) -> Result<(), W::Error> {
    if let Some(bounce) = &report.bounce {
        writer.queue_bounce(bounce).await?;
        tracing::info!(event = "bounce_queued", queue_id = %report.entry.id, dsn_id = %bounce.id,
            to = %report.entry.sender);
        metrics::counter!("backupmx_bounces_queued_total").increment(1);
        report.bounce = None;
    }
    if report.finished {
        writer.remove(&report.entry).await
    } else {
        writer.update(&report.entry).await
    }
}

/// Exponential backoff between attempts: `initial` doubling up to `max`.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Backoff {
    /// The wait after the `attempts`-th attempt.
    pub fn after(&self, attempts: u32) -> Duration {
        let factor = 1u32
            .checked_shl(attempts.saturating_sub(1).min(31))
            .unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }
}

/// One recipient's result in an attempt; `route_status` is the enhanced
/// status of a refusal we made ourselves (no route), empty for the
/// primary's own answers.
pub(crate) type RecipientResult = (RcptResult, &'static str);

/// What [`apply`] made of an entry.
#[derive(Debug)]
pub(crate) struct Applied {
    /// The report, without its DSN.
    pub report: AttemptReport,
    /// The recipients that failed for good (the DSN's).
    pub failed: Vec<dsn::FailedRecipient>,
    /// The entry ran out of its lifetime in this attempt: after how many
    /// days (for the alert).
    pub expired_after_days: Option<u64>,
}

/// Applies one attempt's per-recipient results to an entry whose pending
/// recipients are `pending` (pure): delivered, refused for good, or left
/// pending with the next attempt after the backoff; pending recipients of
/// an entry past its `lifetime` fail with `4.4.7`.
pub(crate) fn apply(
    mut entry: QueueEntry,
    pending: &[usize],
    results: Vec<RecipientResult>,
    destination_down: bool,
    lifetime: Duration,
    backoff: Backoff,
    now: SystemTime,
) -> Applied {
    let mut failed = Vec::new();
    let mut delivered = 0;
    let mut errors = Vec::new();
    for (&i, (result, route_status)) in pending.iter().zip(results) {
        let rcpt = &mut entry.recipients[i];
        match result {
            RcptResult::Delivered(text) => {
                rcpt.status = RecipientStatus::Delivered;
                rcpt.last_reply = Some(text);
                delivered += 1;
            }
            RcptResult::Transient(text) => {
                errors.push(text.clone());
                rcpt.last_reply = Some(text);
            }
            RcptResult::Permanent(text) => {
                rcpt.status = RecipientStatus::Failed;
                let (status, remote) = if route_status.is_empty() {
                    (dsn::status_from_reply(&text, "5.0.0"), true)
                } else {
                    (route_status.to_string(), false)
                };
                if status.starts_with("5.1.") {
                    // The backscatter a backup MX still causes: a
                    // recipient we took that the primary does not know.
                    metrics::counter!("backupmx_unknown_user_bounces_total").increment(1);
                }
                failed.push(dsn::FailedRecipient {
                    action: dsn::Action::Failed,
                    address: rcpt.address.clone(),
                    status,
                    diagnostic: text.clone(),
                    remote,
                });
                errors.push(text.clone());
                rcpt.last_reply = Some(text);
            }
        }
    }
    entry.last_error = errors.into_iter().next();
    let now_secs = unix_seconds(now);
    let still_pending = entry
        .recipients
        .iter()
        .any(|r| r.status == RecipientStatus::Pending);
    let mut expired_after_days = None;
    if still_pending && now_secs >= entry.received_at.saturating_add(lifetime.as_secs()) {
        let days = lifetime.as_secs() / 86_400;
        expired_after_days = Some(days);
        for rcpt in entry
            .recipients
            .iter_mut()
            .filter(|r| r.status == RecipientStatus::Pending)
        {
            rcpt.status = RecipientStatus::Failed;
            let last = rcpt.last_reply.clone().unwrap_or_default();
            failed.push(dsn::FailedRecipient {
                action: dsn::Action::Failed,
                address: rcpt.address.clone(),
                status: "4.4.7".into(),
                diagnostic: format!(
                    "message expired after {days} days in the queue; last error: {last}"
                ),
                remote: false,
            });
        }
    }
    let finished = !entry
        .recipients
        .iter()
        .any(|r| r.status == RecipientStatus::Pending);
    if !finished {
        entry.next_attempt = now_secs + backoff.after(entry.attempts).as_secs();
    }
    Applied {
        report: AttemptReport {
            entry,
            finished,
            bounce: None,
            destination_down,
            delivered,
        },
        failed,
        expired_after_days,
    }
}

/// The indices of an entry's recipients still pending.
pub(super) fn pending_of(entry: &QueueEntry) -> Vec<usize> {
    (0..entry.recipients.len())
        .filter(|&i| entry.recipients[i].status == RecipientStatus::Pending)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::address::DomainName;
    use crate::queue::{QueueId, RecipientState, QUEUE_RECORD_VERSION};

    const BACKOFF: Backoff = Backoff {
        initial: Duration::from_secs(60),
        max: Duration::from_secs(900),
    };

    fn entry(received_at: u64, recipients: &[&str]) -> QueueEntry {
        QueueEntry {
            delay_warned: false,
            tls_request: None,
            dsn: Default::default(),
            version: QUEUE_RECORD_VERSION,
            id: QueueId::new(SystemTime::UNIX_EPOCH + Duration::from_secs(received_at), 1),
            domain: DomainName::parse("example.test").unwrap(),
            sender: "s@sender.test".into(),
            recipients: recipients
                .iter()
                .map(|a| RecipientState {
                    address: a.to_string(),
                    status: RecipientStatus::Pending,
                    last_reply: None,
                    held_refusal: None,
                    dsn: Default::default(),
                })
                .collect(),
            client_ip: "192.0.2.1".parse().unwrap(),
            helo: "client.test".into(),
            received_at,
            attempts: 1,
            next_attempt: received_at,
            last_error: None,
            size: 100,
            smtputf8: false,
            eight_bit: false,
        }
    }

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let secs: Vec<u64> = (1..=7).map(|a| BACKOFF.after(a).as_secs()).collect();
        assert_eq!(secs, [60, 120, 240, 480, 900, 900, 900]);
        assert_eq!(BACKOFF.after(1000).as_secs(), 900);
        assert_eq!(BACKOFF.after(0).as_secs(), 60);
    }

    #[test]
    fn each_recipient_gets_its_own_result_and_the_rest_waits_for_the_backoff() {
        let e = entry(
            1000,
            &["a@example.test", "b@example.test", "c@example.test"],
        );
        let applied = apply(
            e,
            &[0, 1, 2],
            vec![
                (RcptResult::Delivered("250 ok".into()), ""),
                (RcptResult::Permanent("550 5.1.1 no such user".into()), ""),
                (RcptResult::Transient("451 4.3.0 later".into()), ""),
            ],
            false,
            Duration::from_secs(86_400),
            BACKOFF,
            at(1010),
        );
        let r = &applied.report;
        assert_eq!(r.delivered, 1);
        assert!(!r.finished);
        let statuses: Vec<_> = r
            .entry
            .recipients
            .iter()
            .map(|x| x.status.clone())
            .collect();
        assert_eq!(
            statuses,
            [
                RecipientStatus::Delivered,
                RecipientStatus::Failed,
                RecipientStatus::Pending
            ]
        );
        assert_eq!(r.entry.next_attempt, 1010 + 60);
        assert_eq!(
            r.entry.last_error.as_deref(),
            Some("550 5.1.1 no such user")
        );
        assert_eq!(applied.failed.len(), 1);
        assert_eq!(applied.failed[0].status, "5.1.1");
        assert!(applied.failed[0].remote);
        assert_eq!(applied.expired_after_days, None);
    }

    #[test]
    fn a_refusal_of_our_own_carries_its_status_and_is_not_remote() {
        let applied = apply(
            entry(1000, &["a@example.test"]),
            &[0],
            vec![(RcptResult::Permanent("no route".into()), "5.4.4")],
            false,
            Duration::from_secs(86_400),
            BACKOFF,
            at(1010),
        );
        assert!(applied.report.finished);
        assert_eq!(applied.failed[0].status, "5.4.4");
        assert!(!applied.failed[0].remote);
    }

    #[test]
    fn past_its_lifetime_a_pending_recipient_fails_with_4_4_7() {
        let applied = apply(
            entry(0, &["a@example.test"]),
            &[0],
            vec![(RcptResult::Transient("421 busy".into()), "")],
            true,
            Duration::from_secs(2 * 86_400),
            BACKOFF,
            at(2 * 86_400),
        );
        assert!(applied.report.finished);
        assert!(applied.report.destination_down);
        assert_eq!(applied.expired_after_days, Some(2));
        assert_eq!(applied.failed[0].status, "4.4.7");
        assert!(applied.failed[0]
            .diagnostic
            .contains("last error: 421 busy"));
    }
}
