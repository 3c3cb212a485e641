//! The DSN (RFC 3464) for recipients that failed for good: a new message
//! from the null sender to the original sender, with the original headers.

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, SystemTime};

use relay_proto::client::RcptResult;

use crate::queue::{AcceptedMessage, AcceptedRecipient, QueueEntry};
use crate::store::MessageStore;

use super::{dsn, outcome};
use crate::time::unix_seconds;

/// Builds DSNs as `hostname`, returning at most `headers_max` bytes of the
/// original headers.
#[derive(Debug, Clone)]
pub(crate) struct Bouncer {
    pub hostname: String,
    pub headers_max: usize,
}

impl Bouncer {
    /// The DSN for `failed` recipients of `entry`, if one is due: never for
    /// a bounce (RFC 5321 §6.1, RFC 3464), nor with nothing failed. The
    /// original headers are read from `bodies`; a DSN is not lost to a
    /// read error, it then goes without them.
    pub(crate) async fn bounce_for(
        &self,
        entry: &QueueEntry,
        failed: &[dsn::FailedRecipient],
        bodies: &dyn MessageStore,
        now: SystemTime,
    ) -> Option<AcceptedMessage> {
        // RFC 3461 §4.1: recipients that asked for NEVER, or for
        // notifications that do not include FAILURE, get none.
        let asked = |f: &&dsn::FailedRecipient| {
            f.action != dsn::Action::Failed
                || entry
                    .recipients
                    .iter()
                    .find(|r| r.address == f.address)
                    .is_none_or(|r| crate::dsn_params::reports_failure(r.dsn.notify))
        };
        let reported: Vec<dsn::FailedRecipient> = failed.iter().filter(asked).cloned().collect();
        if reported.len() < failed.len() {
            let unreported = failed.len() - reported.len();
            metrics::counter!("backupmx_dsn_not_requested_total").increment(unreported as u64);
            tracing::info!(event = "dsn_not_requested", queue_id = %entry.id, recipients = unreported,
                "no failure DSN: the sender asked for none (NOTIFY)");
        }
        let failed = reported.as_slice();
        if failed.is_empty() || entry.sender.is_empty() {
            return None;
        }
        // The start of the message is enough: only its headers go back.
        let head = match bodies.read_chunk(&entry.id, 0, self.headers_max + 4).await {
            Ok(head) => head.unwrap_or_default(),
            Err(e) => {
                tracing::warn!(event = "dsn_headers_unreadable", queue_id = %entry.id, error = %crate::error::Report(&e));
                Vec::new()
            }
        };
        self.dsn(entry, failed, &head, now)
    }

    /// The DSN message itself, from the original's first bytes `head`
    /// (pure apart from the new id).
    fn dsn(
        &self,
        entry: &QueueEntry,
        failed: &[dsn::FailedRecipient],
        head: &[u8],
        now: SystemTime,
    ) -> Option<AcceptedMessage> {
        let sender = crate::address::parse_mailbox(&entry.sender).ok()?;
        let domain = sender.domain()?.clone();
        let id = crate::queue::new_id(now);
        let message = dsn::build(
            &self.hostname,
            self.headers_max,
            entry,
            failed,
            head,
            now,
            &id,
        );
        Some(AcceptedMessage {
            dsn: Default::default(),
            id,
            sender: String::new(),
            recipients: vec![AcceptedRecipient {
                dsn: Default::default(),
                address: entry.sender.clone(),
                domain,
            }],
            client_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            helo: self.hostname.clone(),
            received_at: now,
            smtputf8: !entry.sender.is_ascii(),
            eight_bit: false,
            body: message,
            deferred: Vec::new(),
            spooled: None,
            // RFC 8689 §5: the notice of a REQUIRETLS message is sent the
            // same way.
            tls_request: entry
                .tls_request
                .filter(|r| *r == crate::queue::TlsRequest::Requiretls),
        })
    }
}

/// The one "delayed" notice of a message still queued `after` its
/// arrival: its pending recipients that asked for DELAY or did not say
/// (RFC 3461 §4.1). Marks the entry so that it is sent once.
pub(crate) fn delay_notices(
    entry: &mut QueueEntry,
    after: Duration,
    now: SystemTime,
) -> Vec<dsn::FailedRecipient> {
    let due = entry.received_at.saturating_add(after.as_secs()) <= unix_seconds(now);
    if entry.delay_warned || !due || entry.pending_recipients().next().is_none() {
        return Vec::new();
    }
    entry.delay_warned = true;
    entry
        .pending_recipients()
        .filter(|r| r.dsn.notify.is_none_or(|n| n.delay))
        .map(|r| {
            let reply = r.last_reply.clone().or_else(|| entry.last_error.clone());
            let status = reply
                .as_deref()
                .map(|t| dsn::status_from_reply(t, "4.0.0"))
                .filter(|s| s.starts_with('4'))
                .unwrap_or_else(|| "4.0.0".into());
            dsn::FailedRecipient {
                action: dsn::Action::Delayed,
                address: r.address.clone(),
                status,
                remote: reply.as_deref().is_some_and(|t| t.starts_with('4')),
                diagnostic: reply.unwrap_or_else(|| "still queued".into()),
            }
        })
        .collect()
}

/// The recipients of `entry` (at `pending`) just delivered to a primary
/// that does not offer DSN whose sender asked to hear of success: RFC 3461
/// §5.2.2 makes us send a `relayed` notice for them.
pub(crate) fn relayed_notices(
    entry: &QueueEntry,
    pending: &[usize],
    results: &[outcome::RecipientResult],
) -> Vec<dsn::FailedRecipient> {
    pending
        .iter()
        .zip(results)
        .filter_map(|(&r, (result, _))| {
            let RcptResult::Delivered(reply) = result else {
                return None;
            };
            let state = &entry.recipients[r];
            state.dsn.notify.filter(|n| n.success)?;
            Some(dsn::FailedRecipient {
                action: dsn::Action::Relayed,
                address: state.address.clone(),
                status: "2.0.0".into(),
                diagnostic: reply.clone(),
                remote: true,
            })
        })
        .collect()
}

impl super::Engine {
    /// The "delayed" notice of a message that waits without attempts (its
    /// destination is down and the probe holds its mail), once it is
    /// `[delivery] delay_warning` old. `None`: not due, or already sent.
    /// `Some(notice)`: `entry` is now marked warned, and `notice` (if any
    /// recipient wants one) is to be queued before the mark is stored.
    pub async fn delay_notice(
        &self,
        entry: &mut QueueEntry,
        bodies: &dyn MessageStore,
        now: SystemTime,
    ) -> Option<Option<AcceptedMessage>> {
        let after = self.cfg.delay_warning?;
        let was_warned = entry.delay_warned;
        let notices = delay_notices(entry, after, now);
        if was_warned || !entry.delay_warned {
            return None;
        }
        Some(self.bouncer.bounce_for(entry, &notices, bodies, now).await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::{QueueId, RecipientState, RecipientStatus, QUEUE_RECORD_VERSION};
    use std::time::Duration;

    fn entry(sender: &str) -> QueueEntry {
        QueueEntry {
            delay_warned: false,
            tls_request: None,
            dsn: Default::default(),
            version: QUEUE_RECORD_VERSION,
            id: QueueId::new(SystemTime::UNIX_EPOCH + Duration::from_secs(1000), 7),
            domain: crate::address::DomainName::parse("example.test").unwrap(),
            sender: sender.into(),
            recipients: vec![RecipientState {
                address: "a@example.test".into(),
                status: RecipientStatus::Failed,
                last_reply: Some("550 5.1.1 unknown".into()),
                held_refusal: None,
                dsn: Default::default(),
            }],
            client_ip: "192.0.2.1".parse().unwrap(),
            helo: "client.test".into(),
            received_at: 1000,
            attempts: 2,
            next_attempt: 0,
            last_error: None,
            size: 10,
            smtputf8: false,
            eight_bit: false,
        }
    }

    fn failed() -> Vec<dsn::FailedRecipient> {
        vec![dsn::FailedRecipient {
            action: dsn::Action::Failed,
            address: "a@example.test".into(),
            status: "5.1.1".into(),
            diagnostic: "550 5.1.1 unknown".into(),
            remote: true,
        }]
    }

    const BOUNCER: fn() -> Bouncer = || Bouncer {
        hostname: "mx2.test".into(),
        headers_max: 1024,
    };

    #[test]
    fn a_dsn_goes_from_the_null_sender_to_the_sender_with_the_original_headers() {
        let head = b"Subject: hello\r\nMessage-ID: <m1@sender.test>\r\n\r\nbody";
        let dsn = BOUNCER()
            .dsn(&entry("s@sender.test"), &failed(), head, SystemTime::now())
            .unwrap();
        assert_eq!(dsn.sender, "");
        assert_eq!(dsn.recipients[0].address, "s@sender.test");
        assert_eq!(dsn.recipients[0].domain.as_str(), "sender.test");
        let text = String::from_utf8_lossy(&dsn.body);
        assert!(text.contains("a@example.test"), "{text}");
        assert!(text.contains("Message-ID: <m1@sender.test>"), "{text}");
    }

    #[tokio::test]
    async fn a_bounce_is_never_bounced_and_nothing_failed_sends_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::local::LocalStore::open(dir.path()).unwrap();
        let b = BOUNCER();
        let now = SystemTime::now();
        assert!(b
            .bounce_for(&entry(""), &failed(), &store, now)
            .await
            .is_none());
        assert!(b
            .bounce_for(&entry("s@sender.test"), &[], &store, now)
            .await
            .is_none());
        // The body is gone: the DSN still goes, without the headers.
        let dsn = b
            .bounce_for(&entry("s@sender.test"), &failed(), &store, now)
            .await;
        assert!(dsn.is_some());
    }

    #[tokio::test]
    async fn a_recipient_that_asked_for_no_failure_notice_gets_none() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::local::LocalStore::open(dir.path()).unwrap();
        let now = SystemTime::now();
        for (notify, dsn_due) in [
            (None, true),
            (Some("NEVER"), false),
            (Some("SUCCESS"), false),
            (Some("SUCCESS,DELAY"), false),
            (Some("FAILURE"), true),
        ] {
            let mut e = entry("s@sender.test");
            e.recipients[0].dsn.notify =
                notify.map(|n| crate::dsn_params::Notify::parse(n).unwrap());
            let dsn = BOUNCER().bounce_for(&e, &failed(), &store, now).await;
            assert_eq!(dsn.is_some(), dsn_due, "{notify:?}");
        }
    }
}
