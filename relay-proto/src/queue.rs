//! Queue identifiers, the accepted message, and the queue record format.
//!
//! The record is what every backend stores (a SQLite row here, an SQS message
//! body on AWS), so it is versioned JSON and decoding it is strict.

use std::fmt;
use std::net::IpAddr;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::address::DomainName;
use crate::time::unix_seconds;

/// A queue id: 12 hex digits of milliseconds since the epoch and 10 random hex
/// digits, so ids sort by arrival and never collide across ingest instances.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct QueueId(String);

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
    pub domain: DomainName,
}

/// Everything the session learned about a message it is about to accept.
#[derive(Debug, Clone)]
pub struct AcceptedMessage {
    pub id: QueueId,
    /// Empty for the null sender.
    pub sender: String,
    pub recipients: Vec<AcceptedRecipient>,
    pub client_ip: IpAddr,
    pub helo: String,
    pub received_at: SystemTime,
    pub smtputf8: bool,
    pub eight_bit: bool,
    /// The message as stored: our Received header, then the client's data
    /// with CRLF line endings and dot-stuffing removed. Empty when the
    /// message is in `spooled` instead.
    pub body: Vec<u8>,
    /// A big message, moved out of memory while it arrived: the whole body
    /// is in this file, and backends copy it from there in pieces.
    pub spooled: Option<SpooledBody>,
    /// Hosted domains whose destination is known to be down, with the time
    /// their entry is first due. As with Postfix's dead-destination cache,
    /// such mail is queued deferred instead of due now, so a backlog does
    /// not cost a write per message to push it back.
    pub deferred: Vec<(DomainName, u64)>,
}

/// A message body in a file of the ingest's spool directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpooledBody {
    pub path: std::path::PathBuf,
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
    Pending,
    Delivered,
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecipientState {
    pub address: String,
    pub status: RecipientStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_reply: Option<String>,
}

/// Current version of [`QueueEntry`]'s serialised form.
pub const QUEUE_RECORD_VERSION: u32 = 1;

/// One queued message for one hosted domain (a message for several hosted
/// domains becomes several entries, as each goes to a different primary).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueEntry {
    pub version: u32,
    pub id: QueueId,
    pub domain: DomainName,
    /// Empty for the null sender.
    pub sender: String,
    pub recipients: Vec<RecipientState>,
    pub client_ip: IpAddr,
    pub helo: String,
    /// Unix seconds.
    pub received_at: u64,
    pub attempts: u32,
    /// Unix seconds.
    pub next_attempt: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    pub size: u64,
    pub smtputf8: bool,
    pub eight_bit: bool,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RecordError {
    #[error("queue record is not valid JSON for this version")]
    Malformed(#[from] serde_json::Error),
    #[error("queue record version {0} is not supported (this build reads {QUEUE_RECORD_VERSION})")]
    UnsupportedVersion(u32),
}

impl QueueEntry {
    pub fn encode(&self) -> String {
        // Serialising plain structs with string keys cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, RecordError> {
        let entry: QueueEntry = serde_json::from_slice(bytes)?;
        if entry.version != QUEUE_RECORD_VERSION {
            return Err(RecordError::UnsupportedVersion(entry.version));
        }
        Ok(entry)
    }

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
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(rcpts: &[(&str, &str)]) -> AcceptedMessage {
        AcceptedMessage {
            id: QueueId::new(SystemTime::now(), 7),
            sender: "a@b.test".into(),
            recipients: rcpts
                .iter()
                .map(|(a, d)| AcceptedRecipient {
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
