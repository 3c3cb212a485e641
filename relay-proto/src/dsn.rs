//! Delivery status notifications (RFC 3464, RFC 6522): the bounce we send
//! to the envelope sender when recipients fail for good.

use std::time::SystemTime;

use crate::dsn_params::{decode_xtext, Ret};
use crate::queue::{QueueEntry, QueueId};

/// A decoded value put in a header field: no line breaks.
fn one_line(s: &str) -> String {
    s.replace(['\r', '\n'], " ")
}
use crate::time::{from_unix_seconds, rfc5322_date};

/// What happened to a recipient a notification reports on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Action {
    /// Refused for good, or expired.
    #[default]
    Failed,
    /// Delivered to a next hop that does not offer DSN, for a sender who
    /// asked to hear of success (RFC 3461 §5.2.2): no further notice will
    /// come.
    Relayed,
    /// Still queued after `[delivery] delay_warning`; retried on.
    Delayed,
}

/// One recipient for the report (named for the common case: a failure).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedRecipient {
    /// What happened to it.
    pub action: Action,
    /// The recipient's address.
    pub address: String,
    /// RFC 3463 status, e.g. `5.1.1`.
    pub status: String,
    /// The remote server's reply, or our own reason.
    pub diagnostic: String,
    /// The diagnostic came from a remote SMTP server (`smtp;`) rather than
    /// from us (`x-backupmx;`).
    pub remote: bool,
}

/// The RFC 3463 status for a failure text: the enhanced code in the reply
/// if there is one, else derived from the reply code class.
pub fn status_from_reply(text: &str, fallback: &str) -> String {
    let mut words = text.split_whitespace();
    let code = words.next().unwrap_or("");
    if let Some(enhanced) = words.next() {
        let parts: Vec<&str> = enhanced.split('.').collect();
        if parts.len() == 3
            && parts
                .iter()
                .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
            && matches!(parts[0], "4" | "5")
        {
            return enhanced.to_string();
        }
    }
    match code.as_bytes().first() {
        Some(b'5') => "5.0.0".into(),
        Some(b'4') => "4.0.0".into(),
        _ => fallback.to_string(),
    }
}

/// The header section of `message` (up to the blank line), CRLF-terminated.
pub fn header_section(message: &[u8]) -> &[u8] {
    match message.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(i) => &message[..i + 2],
        None => message,
    }
}

/// The header section of `head` (the start of a message), cut at the last
/// complete line within `max` bytes if it is longer: a forged sender must
/// not be sent megabytes of someone's headers (`[delivery]
/// bounce_headers_max`, 50 KB as Postfix's bounce size limit).
pub fn returned_headers(head: &[u8], max: usize) -> &[u8] {
    let headers = header_section(head);
    if headers.len() <= max {
        return headers;
    }
    let within = &headers[..max];
    match memchr::memrchr(b'\n', within) {
        Some(i) => &within[..=i],
        None => b"",
    }
}

/// Builds the DSN message for `entry`'s sender. `original` is the start of
/// the message; at most `headers_max` bytes of its headers are returned.
#[allow(clippy::too_many_arguments)]
pub fn build(
    hostname: &str,
    headers_max: usize,
    entry: &QueueEntry,
    failed: &[FailedRecipient],
    original: &[u8],
    now: SystemTime,
    dsn_id: &QueueId,
) -> Vec<u8> {
    let boundary = format!("{dsn_id}/{hostname}");
    let date = rfc5322_date(now);
    let mut m = String::new();
    m.push_str(&format!(
        "From: Mail Delivery System <MAILER-DAEMON@{hostname}>\r\n"
    ));
    m.push_str(&format!("To: <{}>\r\n", entry.sender));
    let any_failed = failed.iter().any(|f| f.action == Action::Failed);
    let any_delayed = failed.iter().any(|f| f.action == Action::Delayed);
    m.push_str(if any_failed {
        "Subject: Undelivered Mail Returned to Sender\r\n"
    } else if any_delayed {
        "Subject: Delayed Mail (still being retried)\r\n"
    } else {
        "Subject: Successful Mail Relay\r\n"
    });
    m.push_str(&format!("Date: {date}\r\n"));
    m.push_str(&format!("Message-ID: <{dsn_id}@{hostname}>\r\n"));
    m.push_str("Auto-Submitted: auto-replied\r\n");
    m.push_str("MIME-Version: 1.0\r\n");
    m.push_str(&format!(
        "Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary=\"{boundary}\"\r\n\r\n"
    ));
    m.push_str("This is a MIME-encapsulated message.\r\n\r\n");
    m.push_str(&format!("--{boundary}\r\nContent-Description: Notification\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"));
    m.push_str(&format!(
        "This is the mail system at host {hostname}.\r\n\r\n{}\r\nIt was received on {} and its headers are attached below.\r\n\r\n",
        if any_failed {
            "Your message could not be delivered to one or more recipients."
        } else if any_delayed {
            "Your message could not be delivered yet; we keep trying.\r\nThis is a warning only: you need not send it again."
        } else {
            "Your message was relayed to a server that does not report delivery status;\r\nno further notice will come about the recipients below."
        },
        rfc5322_date(from_unix_seconds(entry.received_at))
    ));
    for f in failed {
        let what = match f.action {
            Action::Failed => "failed",
            Action::Relayed => "relayed",
            Action::Delayed => "delayed",
        };
        m.push_str(&format!("<{}>: {what}: {}\r\n", f.address, f.diagnostic));
    }
    m.push_str(&format!("\r\n--{boundary}\r\nContent-Description: Delivery report\r\nContent-Type: message/delivery-status\r\n\r\n"));
    m.push_str(&format!("Reporting-MTA: dns; {hostname}\r\n"));
    m.push_str(&format!("X-Backupmx-Queue-ID: {}\r\n", entry.id));
    if let Some(envid) = &entry.dsn.envid {
        // RFC 3464 §2.2.1: the sender's ENVID, decoded from xtext.
        m.push_str(&format!(
            "Original-Envelope-Id: {}\r\n",
            one_line(&decode_xtext(envid))
        ));
    }
    m.push_str(&format!(
        "Arrival-Date: {}\r\n",
        rfc5322_date(from_unix_seconds(entry.received_at))
    ));
    for f in failed {
        m.push_str("\r\n");
        let orcpt = entry
            .recipients
            .iter()
            .find(|r| r.address == f.address)
            .and_then(|r| r.dsn.orcpt.as_deref())
            .and_then(|o| o.split_once(';'));
        if let Some((kind, address)) = orcpt {
            m.push_str(&format!(
                "Original-Recipient: {kind}; {}\r\n",
                one_line(&decode_xtext(address))
            ));
        }
        m.push_str(&format!("Final-Recipient: rfc822; {}\r\n", f.address));
        m.push_str(match f.action {
            Action::Failed => "Action: failed\r\n",
            Action::Relayed => "Action: relayed\r\n",
            Action::Delayed => "Action: delayed\r\n",
        });
        m.push_str(&format!("Status: {}\r\n", f.status));
        let kind = if f.remote { "smtp" } else { "x-backupmx" };
        m.push_str(&format!(
            "Diagnostic-Code: {kind}; {}\r\n",
            f.diagnostic.replace(['\r', '\n'], " ")
        ));
        m.push_str(&format!("Last-Attempt-Date: {date}\r\n"));
    }
    // RET=FULL: the whole message when we have it and it is small (the
    // same limit as the headers); else, and by default, its headers. A
    // REQUIRETLS message's body never goes back (RFC 8689 §5): the notice
    // may travel where the message could not.
    let whole = any_failed
        && entry.dsn.ret == Some(Ret::Full)
        && entry.tls_request != Some(crate::queue::TlsRequest::Requiretls)
        && entry.size <= headers_max as u64
        && original.len() as u64 >= entry.size;
    let mut out;
    if whole {
        m.push_str(&format!("\r\n--{boundary}\r\nContent-Description: Undelivered Message\r\nContent-Type: message/rfc822\r\n\r\n"));
        out = m.into_bytes();
        out.extend_from_slice(&original[..entry.size as usize]);
        if !out.ends_with(b"\r\n") {
            out.extend_from_slice(b"\r\n");
        }
    } else {
        m.push_str(&format!("\r\n--{boundary}\r\nContent-Description: Undelivered Message Headers\r\nContent-Type: text/rfc822-headers\r\n\r\n"));
        out = m.into_bytes();
        out.extend_from_slice(returned_headers(original, headers_max));
    }
    out.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::{RecipientState, RecipientStatus, QUEUE_RECORD_VERSION};

    #[test]
    fn status_codes_come_from_the_reply() {
        assert_eq!(
            status_from_reply("550 5.1.1 unknown user", "5.0.0"),
            "5.1.1"
        );
        assert_eq!(
            status_from_reply("554 transaction failed", "5.0.0"),
            "5.0.0"
        );
        assert_eq!(status_from_reply("expired", "4.4.7"), "4.4.7");
    }

    #[test]
    fn report_has_the_rfc3464_parts() {
        let entry = QueueEntry {
            delay_warned: false,
            tls_request: None,
            dsn: Default::default(),
            version: QUEUE_RECORD_VERSION,
            id: QueueId::new(SystemTime::now(), 1),
            domain: crate::address::DomainName::parse("example.test").unwrap(),
            sender: "alice@remote.test".into(),
            recipients: vec![RecipientState {
                address: "bob@example.test".into(),
                status: RecipientStatus::Failed,
                last_reply: None,
                held_refusal: None,
                dsn: Default::default(),
            }],
            client_ip: "192.0.2.1".parse().unwrap(),
            helo: "c.test".into(),
            received_at: 1_795_842_826,
            attempts: 1,
            next_attempt: 0,
            last_error: None,
            size: 10,
            smtputf8: false,
            eight_bit: false,
        };
        let failed = [FailedRecipient {
            action: Action::Failed,
            address: "bob@example.test".into(),
            status: "5.1.1".into(),
            diagnostic: "550 5.1.1 unknown user".into(),
            remote: true,
        }];
        let original = b"Received: x\r\nSubject: hello\r\n\r\nsecret body\r\n";
        let dsn = String::from_utf8(build(
            "mx2.test",
            50 * 1024,
            &entry,
            &failed,
            original,
            SystemTime::now(),
            &QueueId::new(SystemTime::now(), 1),
        ))
        .unwrap();
        for needle in [
            "From: Mail Delivery System <MAILER-DAEMON@mx2.test>\r\n",
            "Content-Type: multipart/report; report-type=delivery-status;",
            "Reporting-MTA: dns; mx2.test\r\n",
            "Final-Recipient: rfc822; bob@example.test\r\n",
            "Action: failed\r\n",
            "Status: 5.1.1\r\n",
            "Diagnostic-Code: smtp; 550 5.1.1 unknown user\r\n",
            "Content-Type: text/rfc822-headers\r\n\r\nReceived: x\r\nSubject: hello\r\n",
        ] {
            assert!(dsn.contains(needle), "missing {needle:?} in\n{dsn}");
        }
        assert!(!dsn.contains("secret body"), "only headers are returned");
        assert!(!dsn.contains("Original-Envelope-Id"), "{dsn}");

        // ENVID and ORCPT are echoed decoded; RET=FULL returns a small
        // message whole.
        let mut asked = entry.clone();
        asked.dsn.envid = Some("QQ+2B314".into());
        asked.dsn.ret = Some(Ret::Full);
        asked.size = original.len() as u64;
        asked.recipients[0].dsn.orcpt = Some("rfc822;Bob+2Bx@example.test".into());
        let dsn = String::from_utf8(build(
            "mx2.test",
            50 * 1024,
            &asked,
            &failed,
            original,
            SystemTime::now(),
            &QueueId::new(SystemTime::now(), 2),
        ))
        .unwrap();
        for needle in [
            "Original-Envelope-Id: QQ+314\r\n",
            "Original-Recipient: rfc822; Bob+x@example.test\r\nFinal-Recipient: rfc822; bob@example.test\r\n",
            "Content-Type: message/rfc822\r\n\r\nReceived: x\r\nSubject: hello\r\n\r\nsecret body\r\n",
        ] {
            assert!(dsn.contains(needle), "missing {needle:?} in\n{dsn}");
        }
        // RET=HDRS: headers only.
        asked.dsn.ret = Some(Ret::Hdrs);
        let dsn = String::from_utf8(build(
            "mx2.test",
            50 * 1024,
            &asked,
            &failed,
            original,
            SystemTime::now(),
            &QueueId::new(SystemTime::now(), 3),
        ))
        .unwrap();
        assert!(!dsn.contains("secret body"), "{dsn}");
        let mut huge = b"Subject: big\r\n".to_vec();
        let max = 50 * 1024;
        while huge.len() < 5 * max {
            huge.extend_from_slice(b"X-Filler: 0123456789012345678901234567890123456789\r\n");
        }
        huge.extend_from_slice(b"\r\nbody\r\n");
        let returned = returned_headers(&huge, max);
        assert!(returned.len() <= max && returned.len() > max - 100);
        assert!(returned.starts_with(b"Subject: big\r\n") && returned.ends_with(b"\r\n"));
        crate::smtp::data::encode_for_data(dsn.as_bytes());
        for (i, b) in dsn.bytes().enumerate() {
            assert!(b != b'\n' || dsn.as_bytes()[i - 1] == b'\r');
        }
    }
}
