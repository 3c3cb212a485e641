//! The delivery queue on AWS: one DynamoDB item per queued message, and SQS
//! messages that are only tickets ("attempt record `id` at `version`").
//!
//! Queue table, partition key `id` (S):
//! - `record` (S): the queue record's JSON (recipients and their state);
//! - `domain` (S), `due` (N, next attempt, Unix seconds — authoritative
//!   over the record's own `next_attempt`), `received` (N);
//! - `version` (N): raised by every write; every write is conditional on
//!   the version its writer read, so no writer overwrites another's;
//! - `lease` (N): an attempt owns the record until then (0: none);
//! - `nudged` (N): when the sweeper last sent the record a ticket;
//! - `q` (S, always `q`): the single partition of the `by_due` index.
//!
//! Indexes: `by_domain` (`domain`, `due`) for a domain's flush and listing,
//! O(that domain); `by_due` (`q`, `due`) for the sweeper's overdue records.
//!
//! Destinations that did not answer live in the same table, shared by every
//! delivery process: id `down#<domain>`, `q` = `down`, `domain`, `due` (the
//! next probe), `since`, `last_error`. They have no `record`, so listings
//! skip them; the `by_due` index lists them under `q = down`.
//!
//! Connection slots per destination, also shared: one item per slot, id
//! `slot#<domain>#<index>` (index below `max_connections_per_destination`),
//! `holder` (S), `until` (N: lease end). A slot is taken by a put
//! conditional on it being absent or expired, renewed and given back only
//! by its holder. No `record`, no `q`: listings and indexes skip it. A
//! crashed holder's slot is free again when its (short) lease ends.
//!
//! Why it cannot lose a message: a ticket is sent only after the write it
//! stands for, and a ticket whose version is not the record's is stale and
//! dropped. Whatever dies between a write and its ticket (a failed send, a
//! crash, a timeout) leaves a record that is overdue and not leased; the
//! sweeper sends such records a new ticket. A record is deleted only once
//! every recipient is delivered or bounced.

use std::collections::HashMap;

use aws_sdk_dynamodb::types::{AttributeValue, ReturnValue, Select};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use super::{backend, get_n, n, s, AwsStore, MAX_SQS_DELAY};
use crate::address::DomainName;
use crate::queue::{QueueEntry, QueueId};
use crate::store::{DeliveryQueue, MessageStore, StoreError};

/// Index of a domain's records by due time.
pub const BY_DOMAIN: &str = "by_domain";
/// Index of every record by due time (one partition, `q`).
pub const BY_DUE: &str = "by_due";

/// Records a release updates at once.
const RELEASE_CONCURRENCY: usize = 32;

/// One SQS message received: its body (a ticket, if it is ours) and the
/// receipt that deletes it.
#[derive(Debug, Clone)]
pub struct Received {
    pub body: String,
    pub receipt: Option<String>,
}

/// An SQS message: attempt this record if it still has this version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ticket {
    pub id: QueueId,
    pub version: u64,
}

impl Ticket {
    pub fn encode(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn decode(body: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(body)
    }
}

/// A queue record with its bookkeeping attributes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueItem {
    pub entry: QueueEntry,
    pub version: u64,
    /// Unix seconds until which an attempt owns the record (0: none).
    pub lease: u64,
    /// Unix seconds of the sweeper's last ticket (0: never).
    pub nudged: u64,
}

impl QueueItem {
    pub fn ticket(&self) -> Ticket {
        Ticket {
            id: self.entry.id.clone(),
            version: self.version,
        }
    }
}

/// What the `by_due` index holds of a record (its projection): enough
/// for the sweeper, a tenth of the record's size to read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DueRecord {
    pub id: QueueId,
    pub domain: DomainName,
    pub due: u64,
    /// Unix seconds: when the message was accepted.
    pub received: u64,
    pub version: u64,
    pub lease: u64,
    pub nudged: u64,
}

impl DueRecord {
    pub fn ticket(&self) -> Ticket {
        Ticket {
            id: self.id.clone(),
            version: self.version,
        }
    }
}

/// The attributes the `by_due` index projects besides its keys.
pub const BY_DUE_ATTRIBUTES: [&str; 7] = [
    "domain",
    "received",
    "version",
    "lease",
    "nudged",
    "since",
    "last_error",
];

fn due_record(item: &HashMap<String, AttributeValue>) -> Option<DueRecord> {
    let text = |k: &str| item.get(k).and_then(|v| v.as_s().ok());
    Some(DueRecord {
        id: QueueId::parse(text("id")?).ok()?,
        domain: DomainName::parse(text("domain")?).ok()?,
        due: get_n(item, "due")?,
        received: get_n(item, "received").unwrap_or(0),
        version: get_n(item, "version").unwrap_or(0),
        lease: get_n(item, "lease").unwrap_or(0),
        nudged: get_n(item, "nudged").unwrap_or(0),
    })
}

/// A destination that did not answer (all delivery processes see it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DownState {
    pub domain: DomainName,
    /// Unix seconds: down since.
    pub since: u64,
    /// Unix seconds: when the next probe may run.
    pub probe_at: u64,
    pub last_error: String,
}

fn slot_key(domain: &DomainName, index: usize) -> String {
    format!("slot#{domain}#{index}")
}

fn down_key(domain: &DomainName) -> String {
    format!("down#{domain}")
}

fn down_state(item: &HashMap<String, AttributeValue>) -> Option<DownState> {
    let domain = item.get("domain")?.as_s().ok()?;
    Some(DownState {
        domain: DomainName::parse(domain).ok()?,
        since: get_n(item, "since").unwrap_or(0),
        probe_at: get_n(item, "due").unwrap_or(0),
        last_error: item
            .get("last_error")
            .and_then(|v| v.as_s().ok())
            .cloned()
            .unwrap_or_default(),
    })
}

/// What [`AwsStore::claim`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The attempt is ours until the lease ends; the item carries the
    /// version every write of the outcome must be conditional on.
    Claimed(Box<QueueItem>),
    /// The record moved on since the ticket was sent (a newer ticket, or
    /// the sweeper, stands for it now).
    Stale,
    /// Another attempt owns the record.
    Leased,
    /// Not due yet: the ticket should come back at `due`.
    NotDue { due: u64 },
}

pub(super) fn is_condition_failed<E>(e: &aws_sdk_dynamodb::error::SdkError<E>) -> bool
where
    E: aws_sdk_dynamodb::error::ProvideErrorMetadata,
{
    e.as_service_error()
        .and_then(|s| s.code())
        .is_some_and(|c| c == "ConditionalCheckFailedException")
}

fn item_of(entry: &QueueEntry, version: u64) -> HashMap<String, AttributeValue> {
    HashMap::from([
        ("id".to_string(), s(entry.id.as_str())),
        ("record".to_string(), s(entry.encode())),
        ("domain".to_string(), s(entry.domain.as_str())),
        ("due".to_string(), n(entry.next_attempt)),
        ("received".to_string(), n(entry.received_at)),
        ("version".to_string(), n(version)),
        ("lease".to_string(), n(0)),
        ("nudged".to_string(), n(0)),
        ("q".to_string(), s("q")),
    ])
}

fn queue_item(item: &HashMap<String, AttributeValue>) -> Result<QueueItem, StoreError> {
    let id = item
        .get("id")
        .and_then(|v| v.as_s().ok())
        .cloned()
        .unwrap_or_default();
    let record = item
        .get("record")
        .and_then(|v| v.as_s().ok())
        .ok_or_else(|| StoreError::Invalid(format!("queue item {id} has no record")))?;
    let mut entry =
        QueueEntry::decode(record.as_bytes()).map_err(|source| StoreError::Corrupt {
            id: id.clone(),
            source,
        })?;
    if let Some(due) = get_n(item, "due") {
        entry.next_attempt = due;
    }
    Ok(QueueItem {
        entry,
        version: get_n(item, "version").unwrap_or(0),
        lease: get_n(item, "lease").unwrap_or(0),
        nudged: get_n(item, "nudged").unwrap_or(0),
    })
}

impl AwsStore {
    fn queue_table(&self) -> &str {
        &self.names.queue_table
    }

    /// The record and its bookkeeping, read strongly consistent.
    pub async fn queue_item(&self, id: &QueueId) -> Result<Option<QueueItem>, StoreError> {
        let out = self
            .dynamodb
            .get_item()
            .table_name(self.queue_table())
            .key("id", s(id.as_str()))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| backend("queue record get", e))?;
        out.item().map(queue_item).transpose()
    }

    /// Sends a ticket, to be received in `delay` seconds (at most 15 min;
    /// a ticket that arrives early is sent back with the rest of the wait).
    pub async fn send_ticket(&self, ticket: &Ticket, delay: u64) -> Result<(), StoreError> {
        self.sqs
            .send_message()
            .queue_url(&self.queue_url)
            .message_body(ticket.encode())
            .delay_seconds(delay.min(MAX_SQS_DELAY) as i32)
            .send()
            .await
            .map_err(|e| backend("SQS send", e))?;
        Ok(())
    }

    /// Up to `max` (at most 10) tickets from the queue, waiting up to
    /// `wait_secs` for the first (SQS long polling).
    pub async fn receive_tickets(
        &self,
        max: usize,
        wait_secs: u32,
    ) -> Result<Vec<Received>, StoreError> {
        self.receive(&self.queue_url, max, wait_secs, "SQS receive")
            .await
    }

    /// Deletes a ticket that was worked on (its receipt from
    /// [`receive_tickets`](Self::receive_tickets)).
    pub async fn delete_ticket(&self, receipt: &str) -> Result<(), StoreError> {
        self.delete_received(&self.queue_url, receipt, "SQS delete")
            .await
    }

    /// Up to 10 messages of the dead-letter queue at `dlq`, without
    /// waiting; each stays invisible for a while unless deleted.
    pub async fn receive_dead_letters(&self, dlq: &str) -> Result<Vec<Received>, StoreError> {
        self.receive(dlq, 10, 0, "SQS dead-letter receive").await
    }

    /// Deletes a dead letter that was re-driven or has no record.
    pub async fn delete_dead_letter(&self, dlq: &str, receipt: &str) -> Result<(), StoreError> {
        self.delete_received(dlq, receipt, "SQS dead-letter delete")
            .await
    }

    async fn receive(
        &self,
        url: &str,
        max: usize,
        wait_secs: u32,
        what: &'static str,
    ) -> Result<Vec<Received>, StoreError> {
        let out = self
            .sqs
            .receive_message()
            .queue_url(url)
            .max_number_of_messages(max.clamp(1, 10) as i32)
            .wait_time_seconds(wait_secs.min(20) as i32)
            .send()
            .await
            .map_err(|e| backend(what, e))?;
        Ok(out
            .messages()
            .iter()
            .map(|m| Received {
                body: m.body().unwrap_or_default().to_string(),
                receipt: m.receipt_handle().map(str::to_string),
            })
            .collect())
    }

    async fn delete_received(
        &self,
        url: &str,
        receipt: &str,
        what: &'static str,
    ) -> Result<(), StoreError> {
        self.sqs
            .delete_message()
            .queue_url(url)
            .receipt_handle(receipt)
            .send()
            .await
            .map_err(|e| backend(what, e))?;
        Ok(())
    }

    /// Takes the record (as just read) for one attempt if `ticket` is
    /// current, it is due and no other attempt owns it: the version is
    /// raised (so the ticket and any duplicate of it are stale from now on)
    /// and a lease of `lease_secs` is set.
    pub async fn claim(
        &self,
        mut item: QueueItem,
        ticket: &Ticket,
        now: u64,
        lease_secs: u64,
    ) -> Result<Claim, StoreError> {
        if item.version != ticket.version {
            return Ok(Claim::Stale);
        }
        if item.lease > now {
            return Ok(Claim::Leased);
        }
        if item.entry.next_attempt > now {
            return Ok(Claim::NotDue {
                due: item.entry.next_attempt,
            });
        }
        let claimed = item.version + 1;
        let lease = now + lease_secs;
        let result = self
            .dynamodb
            .update_item()
            .table_name(self.queue_table())
            .key("id", s(ticket.id.as_str()))
            .update_expression("SET version = :new, lease = :lease")
            .condition_expression("version = :v AND lease <= :now")
            .expression_attribute_values(":new", n(claimed))
            .expression_attribute_values(":lease", n(lease))
            .expression_attribute_values(":v", n(item.version))
            .expression_attribute_values(":now", n(now))
            .send()
            .await;
        match result {
            Ok(_) => {
                item.version = claimed;
                item.lease = lease;
                Ok(Claim::Claimed(Box::new(item)))
            }
            Err(e) if is_condition_failed(&e) => Ok(Claim::Stale),
            Err(e) => Err(backend("queue record claim", e)),
        }
    }

    /// Stores an attempt's outcome for a record still pending, if the
    /// record is still at `claimed` (the attempt's own claim): returns the
    /// new version, or `None` if the record was deleted or taken over
    /// meanwhile (nothing is written then).
    pub async fn store_attempt(
        &self,
        entry: &QueueEntry,
        claimed: u64,
    ) -> Result<Option<u64>, StoreError> {
        let next = claimed + 1;
        let result = self
            .dynamodb
            .update_item()
            .table_name(self.queue_table())
            .key("id", s(entry.id.as_str()))
            .update_expression("SET #r = :record, due = :due, version = :new, lease = :zero")
            .condition_expression("version = :v")
            .expression_attribute_names("#r", "record")
            .expression_attribute_values(":record", s(entry.encode()))
            .expression_attribute_values(":due", n(entry.next_attempt))
            .expression_attribute_values(":new", n(next))
            .expression_attribute_values(":zero", n(0))
            .expression_attribute_values(":v", n(claimed))
            .send()
            .await;
        match result {
            Ok(_) => Ok(Some(next)),
            Err(e) if is_condition_failed(&e) => Ok(None),
            Err(e) => Err(backend("queue record update", e)),
        }
    }

    /// Deletes a finished record if it is still at `claimed`; `false` if
    /// it was deleted or taken over meanwhile.
    pub async fn finish_record(&self, id: &QueueId, claimed: u64) -> Result<bool, StoreError> {
        let result = self
            .dynamodb
            .delete_item()
            .table_name(self.queue_table())
            .key("id", s(id.as_str()))
            .condition_expression("version = :v")
            .expression_attribute_values(":v", n(claimed))
            .send()
            .await;
        match result {
            Ok(_) => Ok(true),
            Err(e) if is_condition_failed(&e) => Ok(false),
            Err(e) => Err(backend("queue record delete", e)),
        }
    }

    /// Gives a record that lost its ticket a new one (the sweeper, and the
    /// re-drive of dead letters): marks it nudged at `now` if it is still
    /// at the version read and not leased, then sends a ticket for that
    /// version. `false` if the record moved on meanwhile.
    pub async fn nudge(&self, ticket: &Ticket, now: u64) -> Result<bool, StoreError> {
        let result = self
            .dynamodb
            .update_item()
            .table_name(self.queue_table())
            .key("id", s(ticket.id.as_str()))
            .update_expression("SET nudged = :now")
            .condition_expression("version = :v AND lease <= :now")
            .expression_attribute_values(":now", n(now))
            .expression_attribute_values(":v", n(ticket.version))
            .send()
            .await;
        match result {
            Ok(_) => {}
            Err(e) if is_condition_failed(&e) => return Ok(false),
            Err(e) => return Err(backend("queue record nudge", e)),
        }
        self.send_ticket(ticket, 0).await?;
        Ok(true)
    }

    /// Records due at or before `before`, oldest due first (from the
    /// index's projection, not the records themselves).
    pub async fn overdue(&self, before: u64) -> Result<Vec<DueRecord>, StoreError> {
        let mut items = Vec::new();
        let mut start = None;
        loop {
            let out = self
                .dynamodb
                .query()
                .table_name(self.queue_table())
                .index_name(BY_DUE)
                .key_condition_expression("q = :q AND due <= :before")
                .expression_attribute_values(":q", s("q"))
                .expression_attribute_values(":before", n(before))
                .set_exclusive_start_key(start)
                .send()
                .await
                .map_err(|e| backend("queue overdue query", e))?;
            items.extend(out.items().iter().filter_map(due_record));
            match out.last_evaluated_key() {
                Some(k) if !k.is_empty() => start = Some(k.clone()),
                _ => return Ok(items),
            }
        }
    }

    /// Makes one record due now (see [`DeliveryQueue::release`]).
    async fn release_one(&self, item: &QueueItem, now: u64) -> Result<(), StoreError> {
        if item.lease > now {
            return Ok(());
        }
        if item.entry.next_attempt <= now {
            // Due already, its ticket may be parked (destination
            // down): a fresh one; a duplicate is stale once claimed.
            return self.send_ticket(&item.ticket(), 0).await;
        }
        let result = self
            .dynamodb
            .update_item()
            .table_name(self.queue_table())
            .key("id", s(item.entry.id.as_str()))
            .update_expression("SET due = :now, version = :new")
            .condition_expression("version = :v AND lease <= :now")
            .expression_attribute_values(":now", n(now))
            .expression_attribute_values(":new", n(item.version + 1))
            .expression_attribute_values(":v", n(item.version))
            .send()
            .await;
        match result {
            Ok(_) => {
                let ticket = Ticket {
                    id: item.entry.id.clone(),
                    version: item.version + 1,
                };
                self.send_ticket(&ticket, 0).await
            }
            // Changed meanwhile: being attempted, or just scheduled.
            Err(e) if is_condition_failed(&e) => Ok(()),
            Err(e) => Err(backend("queue release", e)),
        }
    }

    /// Whether `domain`'s destination is recorded down (strongly
    /// consistent).
    pub async fn destination_state(
        &self,
        domain: &DomainName,
    ) -> Result<Option<DownState>, StoreError> {
        let out = self
            .dynamodb
            .get_item()
            .table_name(self.queue_table())
            .key("id", s(down_key(domain)))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| backend("destination state get", e))?;
        Ok(out.item().and_then(down_state))
    }

    /// Records `domain`'s destination down (keeping the first `since`),
    /// next probe at `probe_at`; returns whether it was up until now.
    pub async fn mark_down(
        &self,
        domain: &DomainName,
        now: u64,
        probe_at: u64,
        error: &str,
    ) -> Result<bool, StoreError> {
        let out = self
            .dynamodb
            .update_item()
            .table_name(self.queue_table())
            .key("id", s(down_key(domain)))
            .update_expression(
                "SET since = if_not_exists(since, :now), due = :probe, q = :down, #d = :domain, last_error = :e",
            )
            .expression_attribute_names("#d", "domain")
            .expression_attribute_values(":now", n(now))
            .expression_attribute_values(":probe", n(probe_at))
            .expression_attribute_values(":down", s("down"))
            .expression_attribute_values(":domain", s(domain.as_str()))
            .expression_attribute_values(":e", s(error))
            .return_values(ReturnValue::UpdatedOld)
            .send()
            .await
            .map_err(|e| backend("destination state update", e))?;
        Ok(out.attributes().is_none_or(|a| !a.contains_key("since")))
    }

    /// Takes the next probe of a down destination: only one process (one
    /// ticket, or the sweeper) tries it per interval. `false` if another
    /// took it, or the destination is no longer recorded down.
    pub async fn claim_probe(
        &self,
        domain: &DomainName,
        now: u64,
        next: u64,
    ) -> Result<bool, StoreError> {
        let result = self
            .dynamodb
            .update_item()
            .table_name(self.queue_table())
            .key("id", s(down_key(domain)))
            .update_expression("SET due = :next")
            .condition_expression("attribute_exists(id) AND due <= :now")
            .expression_attribute_values(":next", n(next))
            .expression_attribute_values(":now", n(now))
            .send()
            .await;
        match result {
            Ok(_) => Ok(true),
            Err(e) if is_condition_failed(&e) => Ok(false),
            Err(e) => Err(backend("probe claim", e)),
        }
    }

    /// Takes connection slot `index` (of `domain`'s destination) for
    /// `holder` until `until` (Unix seconds): `false` when another holder
    /// has it and its lease has not ended. One slot is one item
    /// (`slot#<domain>#<index>`), taken by a put DynamoDB checks
    /// atomically, so every delivering process (pollers, Lambda
    /// invocations) counts against the same slots without contending for
    /// one item; a crashed holder's slot is free again once its lease ends.
    pub async fn take_slot(
        &self,
        domain: &DomainName,
        index: usize,
        holder: &str,
        now: u64,
        until: u64,
    ) -> Result<bool, StoreError> {
        let taken = self
            .dynamodb
            .put_item()
            .table_name(self.queue_table())
            .item("id", s(slot_key(domain, index)))
            .item("holder", s(holder))
            .item("until", n(until))
            .condition_expression("attribute_not_exists(id) OR #until <= :now")
            .expression_attribute_names("#until", "until")
            .expression_attribute_values(":now", n(now))
            .send()
            .await;
        match taken {
            Ok(_) => Ok(true),
            Err(e) if is_condition_failed(&e) => Ok(false),
            Err(e) => Err(backend("destination slot take", e)),
        }
    }

    /// Extends `holder`'s lease on a slot it took: `false` when it no
    /// longer holds it (its lease ended and another took it).
    pub async fn renew_slot(
        &self,
        domain: &DomainName,
        index: usize,
        holder: &str,
        until: u64,
    ) -> Result<bool, StoreError> {
        let renewed = self
            .dynamodb
            .update_item()
            .table_name(self.queue_table())
            .key("id", s(slot_key(domain, index)))
            .update_expression("SET #until = :until")
            .condition_expression("holder = :holder")
            .expression_attribute_names("#until", "until")
            .expression_attribute_values(":until", n(until))
            .expression_attribute_values(":holder", s(holder))
            .send()
            .await;
        match renewed {
            Ok(_) => Ok(true),
            Err(e) if is_condition_failed(&e) => Ok(false),
            Err(e) => Err(backend("destination slot renew", e)),
        }
    }

    /// Gives back a slot [`take_slot`](Self::take_slot) took (nothing if
    /// another holder has it by now).
    pub async fn give_slot(
        &self,
        domain: &DomainName,
        index: usize,
        holder: &str,
    ) -> Result<(), StoreError> {
        let given = self
            .dynamodb
            .delete_item()
            .table_name(self.queue_table())
            .key("id", s(slot_key(domain, index)))
            .condition_expression("holder = :holder")
            .expression_attribute_values(":holder", s(holder))
            .send()
            .await;
        match given {
            Ok(_) => Ok(()),
            Err(e) if is_condition_failed(&e) => Ok(()),
            Err(e) => Err(backend("destination slot give", e)),
        }
    }

    /// Forgets that `domain`'s destination was down; returns whether it
    /// was recorded down.
    pub async fn mark_up(&self, domain: &DomainName) -> Result<bool, StoreError> {
        let out = self
            .dynamodb
            .delete_item()
            .table_name(self.queue_table())
            .key("id", s(down_key(domain)))
            .return_values(ReturnValue::AllOld)
            .send()
            .await
            .map_err(|e| backend("destination state delete", e))?;
        Ok(out.attributes().is_some_and(|a| !a.is_empty()))
    }

    /// Every destination recorded down.
    pub async fn down_destinations(&self) -> Result<Vec<DownState>, StoreError> {
        let out = self
            .dynamodb
            .query()
            .table_name(self.queue_table())
            .index_name(BY_DUE)
            .key_condition_expression("q = :down")
            .expression_attribute_values(":down", s("down"))
            .send()
            .await
            .map_err(|e| backend("down destinations query", e))?;
        Ok(out.items().iter().filter_map(down_state).collect())
    }

    /// A domain's records (index reads: eventually consistent, so each
    /// writer's own condition decides), or every record.
    /// A domain's records with their bookkeeping (the sweeper's "delayed"
    /// notices for a destination that is down).
    pub async fn domain_items(&self, domain: &DomainName) -> Result<Vec<QueueItem>, StoreError> {
        self.queue_items(Some(domain)).await
    }

    /// Stores `entry` (the record of `item`, its "delayed" notice marked
    /// sent) if nobody wrote the record since `item` was read and no
    /// attempt holds it. The version is not raised, so its ticket stays
    /// valid; a writer that read it before overwrites the mark, which at
    /// worst repeats a notice. `false`: left as it is.
    pub async fn mark_delay_warned(
        &self,
        item: &QueueItem,
        entry: &QueueEntry,
        now: u64,
    ) -> Result<bool, StoreError> {
        let result = self
            .dynamodb
            .update_item()
            .table_name(self.queue_table())
            .key("id", s(entry.id.as_str()))
            .update_expression("SET #r = :record")
            .condition_expression("version = :v AND lease <= :now")
            .expression_attribute_names("#r", "record")
            .expression_attribute_values(":record", s(entry.encode()))
            .expression_attribute_values(":v", n(item.version))
            .expression_attribute_values(":now", n(now))
            .send()
            .await;
        match result {
            Ok(_) => Ok(true),
            Err(e) if is_condition_failed(&e) => Ok(false),
            Err(e) => Err(backend("queue record delay mark", e)),
        }
    }

    async fn queue_items(&self, domain: Option<&DomainName>) -> Result<Vec<QueueItem>, StoreError> {
        let mut items = Vec::new();
        self.visit_queue_items(domain, &mut |item| items.push(item))
            .await?;
        Ok(items)
    }

    /// [`AwsStore::queue_items`] a page (one query or scan answer) at a
    /// time.
    async fn visit_queue_items(
        &self,
        domain: Option<&DomainName>,
        visit: &mut (dyn FnMut(QueueItem) + Send),
    ) -> Result<(), StoreError> {
        let mut start = None;
        loop {
            let (page, next) = match domain {
                Some(d) => {
                    let out = self
                        .dynamodb
                        .query()
                        .table_name(self.queue_table())
                        .index_name(BY_DOMAIN)
                        .key_condition_expression("#d = :d")
                        .expression_attribute_names("#d", "domain")
                        .expression_attribute_values(":d", s(d.as_str()))
                        .set_exclusive_start_key(start)
                        .send()
                        .await
                        .map_err(|e| backend("queue domain query", e))?;
                    (out.items().to_vec(), out.last_evaluated_key().cloned())
                }
                None => {
                    let out = self
                        .dynamodb
                        .scan()
                        .table_name(self.queue_table())
                        .set_exclusive_start_key(start)
                        .send()
                        .await
                        .map_err(|e| backend("queue scan", e))?;
                    (out.items().to_vec(), out.last_evaluated_key().cloned())
                }
            };
            for item in page.iter().filter(|i| i.contains_key("record")) {
                visit(queue_item(item)?);
            }
            match next {
                Some(k) if !k.is_empty() => start = Some(k),
                _ => return Ok(()),
            }
        }
    }
}

#[async_trait::async_trait]
impl DeliveryQueue for AwsStore {
    /// The record first, then its first ticket; if the ticket cannot be
    /// sent the record is removed again and the client gets a 451.
    async fn enqueue(&self, entry: &QueueEntry) -> Result<(), StoreError> {
        self.dynamodb
            .put_item()
            .table_name(self.queue_table())
            .set_item(Some(item_of(entry, 0)))
            .condition_expression("attribute_not_exists(id)")
            .send()
            .await
            .map_err(|e| backend("queue record put", e))?;
        let ticket = Ticket {
            id: entry.id.clone(),
            version: 0,
        };
        if let Err(e) = self.send_ticket(&ticket, 0).await {
            let _ = self
                .dynamodb
                .delete_item()
                .table_name(self.queue_table())
                .key("id", s(entry.id.as_str()))
                .send()
                .await;
            return Err(e);
        }
        Ok(())
    }

    async fn get(&self, id: &QueueId) -> Result<Option<QueueEntry>, StoreError> {
        Ok(self.queue_item(id).await?.map(|i| i.entry))
    }

    async fn list(&self, domain: Option<&DomainName>) -> Result<Vec<QueueEntry>, StoreError> {
        let mut entries: Vec<QueueEntry> = self
            .queue_items(domain)
            .await?
            .into_iter()
            .map(|i| i.entry)
            .collect();
        entries.sort_by(|a, b| (a.received_at, &a.id).cmp(&(b.received_at, &b.id)));
        Ok(entries)
    }

    async fn scan(
        &self,
        domain: Option<&DomainName>,
        visit: &mut (dyn FnMut(QueueEntry) + Send),
    ) -> Result<(), StoreError> {
        self.visit_queue_items(domain, &mut |item| visit(item.entry))
            .await
    }

    /// Deletes the record, then the body; a ticket still in flight finds
    /// no record and is dropped, and an attempt under way cannot write
    /// its outcome back (its condition fails).
    async fn remove(&self, id: &QueueId) -> Result<bool, StoreError> {
        let out = self
            .dynamodb
            .delete_item()
            .table_name(self.queue_table())
            .key("id", s(id.as_str()))
            .return_values(ReturnValue::AllOld)
            .send()
            .await
            .map_err(|e| backend("queue record delete", e))?;
        MessageStore::delete(self, id).await?;
        Ok(out.attributes().is_some_and(|a| !a.is_empty()))
    }

    async fn depth(&self) -> Result<u64, StoreError> {
        let mut count = 0;
        let mut start = None;
        loop {
            let out = self
                .dynamodb
                .scan()
                .table_name(self.queue_table())
                .select(Select::Count)
                .filter_expression("attribute_exists(#r)")
                .expression_attribute_names("#r", "record")
                .set_exclusive_start_key(start)
                .send()
                .await
                .map_err(|e| backend("queue count", e))?;
            count += out.count().max(0) as u64;
            match out.last_evaluated_key() {
                Some(k) if !k.is_empty() => start = Some(k.clone()),
                _ => return Ok(count),
            }
        }
    }

    /// Replaces a record (whatever its version) and sends it a ticket;
    /// `false` if it was deleted meanwhile.
    async fn update(&self, entry: &QueueEntry) -> Result<bool, StoreError> {
        let result = self
            .dynamodb
            .update_item()
            .table_name(self.queue_table())
            .key("id", s(entry.id.as_str()))
            .update_expression("SET #r = :record, due = :due, version = version + :one")
            .condition_expression("attribute_exists(id)")
            .expression_attribute_names("#r", "record")
            .expression_attribute_values(":record", s(entry.encode()))
            .expression_attribute_values(":due", n(entry.next_attempt))
            .expression_attribute_values(":one", n(1))
            .return_values(ReturnValue::UpdatedNew)
            .send()
            .await;
        let out = match result {
            Ok(out) => out,
            Err(e) if is_condition_failed(&e) => return Ok(false),
            Err(e) => return Err(backend("queue record update", e)),
        };
        let version = out
            .attributes()
            .and_then(|a| get_n(a, "version"))
            .unwrap_or(0);
        let ticket = Ticket {
            id: entry.id.clone(),
            version,
        };
        let now = crate::time::unix_seconds(std::time::SystemTime::now());
        self.send_ticket(&ticket, entry.next_attempt.saturating_sub(now))
            .await?;
        Ok(true)
    }

    /// Makes a domain's records due now, O(that domain), and forgets that
    /// its destination was down: each record that
    /// is waiting and not being attempted gets `due = now` and a new
    /// version (its delayed ticket is stale from then on) and an
    /// immediate ticket. A record another writer changed meanwhile is
    /// left to that writer: it is being attempted, or was just scheduled.
    async fn release(&self, domain: Option<&DomainName>, now: u64) -> Result<u64, StoreError> {
        // Forget the destination is down first (as the embedded worker
        // does), or the fresh tickets would only be parked again.
        match domain {
            Some(d) => {
                self.mark_up(d).await?;
            }
            None => {
                for down in self.down_destinations().await? {
                    self.mark_up(&down.domain).await?;
                }
            }
        }
        let items = self.queue_items(domain).await?;
        // Many at once: a domain back from an outage may have thousands.
        let count = items.len() as u64;
        let results: Vec<Result<(), StoreError>> = futures_util::stream::iter(items)
            .map(|item| {
                let store = self.clone();
                async move { store.release_one(&item, now).await }
            })
            .buffer_unordered(RELEASE_CONCURRENCY)
            .collect()
            .await;
        results.into_iter().collect::<Result<(), StoreError>>()?;
        Ok(count)
    }
}
