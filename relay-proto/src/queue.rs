//! Queue identifiers, the accepted message, and the queue record format.
//!
//! The record is what every backend stores (a SQLite row here, an SQS message
//! body on AWS), so it is versioned JSON and decoding it is strict.

use std::fmt;
use std::net::IpAddr;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::address::DomainName;
use crate::dsn_params::{Notify, Ret};
use crate::time::unix_seconds;

/// A queue id: 12 hex digits of milliseconds since the epoch and 10 random hex
/// digits, so ids sort by arrival and never collide across ingest instances.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct QueueId(String);

/// A string that is not a queue id (ids are used in file and object names, so they are checked).
#[derive(Debug, thiserror::Error)]
#[error("malformed queue id {0:?}")]
pub struct BadQueueId(String);

impl QueueId {
    /// The id of a message that arrived at `now`; `random` (of which 40
    /// bits are used) is the caller's: this crate draws no random numbers.
    pub fn new(now: SystemTime, random: u64) -> Self {
        let millis = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
            & 0xFFFF_FFFF_FFFF;
        let random = random & 0xFF_FFFF_FFFF;
        QueueId(format!("{millis:012X}{random:010X}"))
    }

    /// The id of the `n`-th extra domain group of the same message.
    pub fn with_suffix(&self, n: usize) -> Self {
        QueueId(format!("{}-{n}", self.0))
    }

    /// Checks a queue id read from outside (CLI, queue record, object key).
    pub fn parse(s: &str) -> Result<Self, BadQueueId> {
        let (base, suffix) = match s.split_once('-') {
            Some((b, n)) => (b, Some(n)),
            None => (s, None),
        };
        let base_ok = base.len() == 22
            && base
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b));
        let suffix_ok = suffix
            .is_none_or(|n| !n.is_empty() && n.len() <= 4 && n.bytes().all(|b| b.is_ascii_digit()));
        if base_ok && suffix_ok {
            Ok(QueueId(s.to_string()))
        } else {
            Err(BadQueueId(s.to_string()))
        }
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Milliseconds since the epoch when the id was made.
    pub fn timestamp_millis(&self) -> u64 {
        u64::from_str_radix(self.0.get(..12).unwrap_or("0"), 16).unwrap_or(0)
    }
}

impl TryFrom<String> for QueueId {
    type Error = BadQueueId;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        QueueId::parse(&s)
    }
}

impl From<QueueId> for String {
    fn from(q: QueueId) -> String {
        q.0
    }
}

impl fmt::Display for QueueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A recipient accepted at RCPT time, with the hosted domain it belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcceptedRecipient {
    /// As it goes to the primary: `local@domain`, source route dropped.
    pub address: String,
    /// The hosted domain the recipient belongs to.
    pub domain: DomainName,
    /// What the sender asked of notifications about it (RFC 3461).
    pub dsn: RcptDsn,
}

/// RFC 3461 parameters of a message (`RET=`, `ENVID=` as received).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MessageDsn {
    /// What a failure notification returns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ret: Option<Ret>,
    /// The sender's envelope id, as xtext.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub envid: Option<String>,
}

impl MessageDsn {
    /// Nothing was asked.
    pub fn is_empty(&self) -> bool {
        self.ret.is_none() && self.envid.is_none()
    }
}

/// RFC 3461 parameters of a recipient (`NOTIFY=`, `ORCPT=` as received).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RcptDsn {
    /// Which notifications the sender wants; `None`: failures only (and
    /// delays, at our discretion).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify: Option<Notify>,
    /// The original recipient, `addr-type;xtext`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub orcpt: Option<String>,
}

impl RcptDsn {
    /// Nothing was asked.
    pub fn is_empty(&self) -> bool {
        self.notify.is_none() && self.orcpt.is_none()
    }
}

/// Everything the session learned about a message it is about to accept.
#[derive(Debug, Clone)]
pub struct AcceptedMessage {
    /// The id given at DATA, also in our Received header.
    pub id: QueueId,
    /// Empty for the null sender.
    pub sender: String,
    /// Recipients accepted at RCPT time.
    pub recipients: Vec<AcceptedRecipient>,
    /// The client's address (the original one behind a PROXY header).
    pub client_ip: IpAddr,
    /// The name the client gave in HELO/EHLO.
    pub helo: String,
    /// When the message was accepted.
    pub received_at: SystemTime,
    /// The client asked for SMTPUTF8.
    pub smtputf8: bool,
    /// The client declared BODY=8BITMIME.
    pub eight_bit: bool,
    /// The message as stored: our Received header, then the client's data
    /// with CRLF line endings and dot-stuffing removed. Empty when the
    /// message is in `spooled` instead.
    pub body: Vec<u8>,
    /// A big message, moved out of memory while it arrived: the whole body
    /// is in this file, and backends copy it from there in pieces.
    pub spooled: Option<SpooledBody>,
    /// RFC 3461 `RET=` and `ENVID=`.
    pub dsn: MessageDsn,
    /// RFC 8689: REQUIRETLS, or `TLS-Required: No`.
    pub tls_request: Option<TlsRequest>,
    /// Hosted domains whose destination is known to be down, with the time
    /// their entry is first due. As with Postfix's dead-destination cache,
    /// such mail is queued deferred instead of due now, so a backlog does
    /// not cost a write per message to push it back.
    pub deferred: Vec<(DomainName, u64)>,
}

/// What the sender asked of the TLS of the hops after us (RFC 8689).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TlsRequest {
    /// `MAIL FROM:<…> REQUIRETLS`: only over TLS verified by MTA-STS, DANE
    /// or `tls = "verified"`, to a next hop that offers REQUIRETLS.
    Requiretls,
    /// `TLS-Required: No` (§4.2.1): the domain's TLS policy, MTA-STS and
    /// DANE are ignored; TLS is still used when offered.
    NotRequired,
}

impl TlsRequest {
    /// The name in records, logs and the admin API.
    pub fn as_str(self) -> &'static str {
        match self {
            TlsRequest::Requiretls => "requiretls",
            TlsRequest::NotRequired => "not_required",
        }
    }
}

/// A message body in a file of the ingest's spool directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpooledBody {
    /// The spool file.
    pub path: std::path::PathBuf,
    /// The body's length in octets.
    pub len: u64,
}

impl AcceptedMessage {
    /// Size of the body, wherever it is.
    pub fn size(&self) -> u64 {
        self.spooled
            .as_ref()
            .map_or(self.body.len() as u64, |s| s.len)
    }
}

/// Per-recipient delivery state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecipientStatus {
    /// Not yet delivered or refused for good.
    Pending,
    /// Accepted by the primary.
    Delivered,
    /// Refused for good (a DSN was or will be sent).
    Failed,
}

/// One recipient of a queue entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecipientState {
    /// The forward path, `local@domain`.
    pub address: String,
    /// Where its delivery stands.
    pub status: RecipientStatus,
    /// The last reply about this recipient (the DSN's diagnostic).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_reply: Option<String>,
    /// A refusal the bounce-storm guard held back (the recipient stays
    /// pending), and whether an operator has since made it final.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_refusal: Option<HeldRefusal>,
    /// RFC 3461 `NOTIFY=` and `ORCPT=`.
    #[serde(default, skip_serializing_if = "RcptDsn::is_empty")]
    pub dsn: RcptDsn,
}

/// A refusal kept from being final by the bounce-storm guard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HeldRefusal {
    /// Held back: the recipient is tried again.
    Held,
    /// Released by an operator: tried again, and a refusal then is final
    /// (a DSN), never held back again.
    Final,
}

/// Current version of [`QueueEntry`]'s serialised form.
pub const QUEUE_RECORD_VERSION: u32 = 1;

/// One queued message for one hosted domain (a message for several hosted
/// domains becomes several entries, as each goes to a different primary).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueEntry {
    /// Record format version: [`QUEUE_RECORD_VERSION`].
    pub version: u32,
    /// The entry's id (a message's id, with `-N` for its further domains).
    pub id: QueueId,
    /// The hosted domain all recipients belong to.
    pub domain: DomainName,
    /// Empty for the null sender.
    pub sender: String,
    /// One state per recipient.
    pub recipients: Vec<RecipientState>,
    /// The client's address.
    pub client_ip: IpAddr,
    /// The name the client gave in HELO/EHLO.
    pub helo: String,
    /// Unix seconds.
    pub received_at: u64,
    /// Delivery attempts so far.
    pub attempts: u32,
    /// Unix seconds.
    pub next_attempt: u64,
    /// The last attempt's error, for `queue list` and DSNs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Body size in octets.
    pub size: u64,
    /// The message needs SMTPUTF8.
    pub smtputf8: bool,
    /// The body has 8-bit octets.
    pub eight_bit: bool,
    /// RFC 3461 `RET=` and `ENVID=`.
    #[serde(default, skip_serializing_if = "MessageDsn::is_empty")]
    pub dsn: MessageDsn,
    /// The one "delayed" notice for this message was sent.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub delay_warned: bool,
    /// RFC 8689: REQUIRETLS, or `TLS-Required: No`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_request: Option<TlsRequest>,
}

/// Why stored bytes are not a queue record this build reads.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RecordError {
    /// Not JSON of this record's shape.
    #[error("queue record is not valid JSON for this version")]
    Malformed(#[from] serde_json::Error),
    /// A record version this build does not know.
    #[error("queue record version {0} is not supported (this build reads {QUEUE_RECORD_VERSION})")]
    UnsupportedVersion(u32),
}

impl QueueEntry {
    /// The record as JSON, as every backend stores it.
    pub fn encode(&self) -> String {
        // Serialising plain structs with string keys cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Reads a stored record; strict, so a corrupt record is an error, never a guess.
    pub fn decode(bytes: &[u8]) -> Result<Self, RecordError> {
        let entry: QueueEntry = serde_json::from_slice(bytes)?;
        if entry.version != QUEUE_RECORD_VERSION {
            return Err(RecordError::UnsupportedVersion(entry.version));
        }
        Ok(entry)
    }

    /// Recipients neither delivered nor failed.
    pub fn pending_recipients(&self) -> impl Iterator<Item = &RecipientState> {
        self.recipients
            .iter()
            .filter(|r| r.status == RecipientStatus::Pending)
    }
}

impl AcceptedMessage {
    /// Splits the message into one queue entry per hosted domain. The first
    /// entry keeps the message id, later ones get `-2`, `-3`, …
    pub fn queue_entries(&self) -> Vec<QueueEntry> {
        let mut domains: Vec<&DomainName> = Vec::new();
        for r in &self.recipients {
            if !domains.contains(&&r.domain) {
                domains.push(&r.domain);
            }
        }
        let received = unix_seconds(self.received_at);
        domains
            .iter()
            .enumerate()
            .map(|(i, domain)| QueueEntry {
                version: QUEUE_RECORD_VERSION,
                id: if i == 0 {
                    self.id.clone()
                } else {
                    self.id.with_suffix(i + 1)
                },
                domain: (*domain).clone(),
                sender: self.sender.clone(),
                recipients: self
                    .recipients
                    .iter()
                    .filter(|r| &r.domain == *domain)
                    .map(|r| RecipientState {
                        address: r.address.clone(),
                        status: RecipientStatus::Pending,
                        last_reply: None,
                        held_refusal: None,
                        dsn: r.dsn.clone(),
                    })
                    .collect(),
                client_ip: self.client_ip,
                helo: self.helo.clone(),
                received_at: received,
                attempts: 0,
                next_attempt: self
                    .deferred
                    .iter()
                    .find(|(d, _)| d == *domain)
                    .map_or(received, |(_, until)| *until),
                last_error: None,
                size: self.size(),
                smtputf8: self.smtputf8,
                eight_bit: self.eight_bit,
                dsn: self.dsn.clone(),
                delay_warned: false,
                tls_request: self.tls_request,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(rcpts: &[(&str, &str)]) -> AcceptedMessage {
        AcceptedMessage {
            dsn: Default::default(),
            id: QueueId::new(SystemTime::now(), 7),
            sender: "a@b.test".into(),
            recipients: rcpts
                .iter()
                .map(|(a, d)| AcceptedRecipient {
                    dsn: Default::default(),
                    address: (*a).into(),
                    domain: DomainName::parse(d).unwrap(),
                })
                .collect(),
            client_ip: "127.0.0.1".parse().unwrap(),
            helo: "client.test".into(),
            received_at: SystemTime::now(),
            smtputf8: false,
            eight_bit: false,
            body: b"Subject: x\r\n\r\nhi\r\n".to_vec(),
            deferred: Vec::new(),
            spooled: None,
            tls_request: None,
        }
    }

    #[test]
    fn queue_ids_are_unique_sortable_and_parse_back() {
        let a = QueueId::new(crate::time::from_unix_seconds(1000), 0xFFFF_FFFF_FFFF);
        let b = QueueId::new(crate::time::from_unix_seconds(2000), 0);
        assert!(a < b);
        assert_eq!(QueueId::parse(a.as_str()).unwrap(), a);
        assert_eq!(
            QueueId::parse(a.with_suffix(2).as_str()).unwrap(),
            a.with_suffix(2)
        );
        for bad in [
            "",
            "../etc/passwd",
            "0123",
            "0123456789ABCDEF01234g",
            "0123456789ABCDEF012345-",
        ] {
            assert!(QueueId::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn one_entry_per_hosted_domain() {
        let m = message(&[
            ("x@one.test", "one.test"),
            ("y@two.test", "two.test"),
            ("z@one.test", "one.test"),
        ]);
        let entries = m.queue_entries();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].id, m.id);
        assert_eq!(entries[0].recipients.len(), 2);
        assert_eq!(entries[1].id, m.id.with_suffix(2));
        assert_eq!(entries[1].domain.as_str(), "two.test");
    }

    #[test]
    fn entries_for_a_destination_known_down_are_queued_deferred() {
        let mut m = message(&[("x@one.test", "one.test"), ("y@two.test", "two.test")]);
        let received = unix_seconds(m.received_at);
        m.deferred = vec![(DomainName::parse("two.test").unwrap(), received + 60)];
        let entries = m.queue_entries();
        assert_eq!(entries[0].next_attempt, received);
        assert_eq!(entries[1].next_attempt, received + 60);
        assert_eq!(entries[1].attempts, 0);
    }

    #[test]
    fn records_round_trip_and_reject_other_versions() {
        let entry = message(&[("x@one.test", "one.test")])
            .queue_entries()
            .remove(0);
        let decoded = QueueEntry::decode(entry.encode().as_bytes()).unwrap();
        assert_eq!(decoded, entry);
        let future = entry.encode().replace("\"version\":1", "\"version\":9");
        assert!(matches!(
            QueueEntry::decode(future.as_bytes()),
            Err(RecordError::UnsupportedVersion(9))
        ));
        assert!(QueueEntry::decode(b"{}").is_err());
        assert!(QueueEntry::decode(b"\xff").is_err());
    }
}
