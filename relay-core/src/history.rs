//! Each hosted domain's outage history: when its primary was down, what
//! we took and refused for it meanwhile, and how the drain went; and the
//! queue-depth samples drawn beside it.
//!
//! An outage opens when a delivery attempt finds the primary down (no
//! next hop answered) and ends at the first attempt it answers. Its start
//! is the arrival of the oldest message that attempt carried when that
//! was its first try: senders come to a backup MX because the primary
//! failed them, so that arrival is the earliest evidence of the outage.
//! Mail already queued from then on is counted when the outage opens.
//!
//! Counting is by tallies ([`OutageCounts`]) added to the domain's latest
//! outage by one conditional store write each: mail accepted and refused
//! while it is open, and the delivery results of mail that arrived within
//! it until it has drained (every one of its messages delivered, bounced
//! or deleted). The write that sees the drain complete marks it, once
//! across processes, and the `outage_report` alert goes out.

use std::time::Duration;

use serde_json::{json, Value};

use crate::address::DomainName;
use crate::queue::{QueueEntry, RecipientStatus};

/// A moment as RFC 3339 text (UTC, seconds).
pub fn rfc3339(secs: u64) -> String {
    humantime::format_rfc3339_seconds(crate::time::from_unix_seconds(secs)).to_string()
}

/// How long queue-depth samples are kept.
pub const SAMPLE_KEEP: Duration = Duration::from_secs(7 * 86_400);

/// Outages kept per domain, whatever `[history] keep` says: a domain whose
/// primary flaps cannot grow its history without bound.
pub const MAX_OUTAGES_PER_DOMAIN: usize = 500;

/// What an outage counts. The names are the store's column and attribute
/// names and the JSON's keys: a contract, never renamed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Counter {
    AcceptedMessages,
    AcceptedRecipients,
    RefusedGreylist,
    RefusedDnsbl,
    RefusedUnknownUser,
    RefusedAuth,
    RefusedFilter,
    DeliveredMessages,
    DeliveredRecipients,
    BouncedRecipients,
    /// Refusals the bounce-storm guard held back for a second look.
    HeldRecipients,
    /// Messages that left the queue: delivered, bounced or deleted.
    FinishedMessages,
    DeletedMessages,
}

impl Counter {
    pub const ALL: [Counter; 13] = [
        Counter::AcceptedMessages,
        Counter::AcceptedRecipients,
        Counter::RefusedGreylist,
        Counter::RefusedDnsbl,
        Counter::RefusedUnknownUser,
        Counter::RefusedAuth,
        Counter::RefusedFilter,
        Counter::DeliveredMessages,
        Counter::DeliveredRecipients,
        Counter::BouncedRecipients,
        Counter::HeldRecipients,
        Counter::FinishedMessages,
        Counter::DeletedMessages,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Counter::AcceptedMessages => "accepted_messages",
            Counter::AcceptedRecipients => "accepted_recipients",
            Counter::RefusedGreylist => "refused_greylist",
            Counter::RefusedDnsbl => "refused_dnsbl",
            Counter::RefusedUnknownUser => "refused_unknown_user",
            Counter::RefusedAuth => "refused_auth",
            Counter::RefusedFilter => "refused_filter",
            Counter::DeliveredMessages => "delivered_messages",
            Counter::DeliveredRecipients => "delivered_recipients",
            Counter::BouncedRecipients => "bounced_recipients",
            Counter::HeldRecipients => "held_recipients",
            Counter::FinishedMessages => "finished_messages",
            Counter::DeletedMessages => "deleted_messages",
        }
    }

    fn index(self) -> usize {
        Counter::ALL.iter().position(|c| *c == self).unwrap_or(0)
    }
}

/// Why mail for a domain was refused at RCPT or after DATA, as an outage
/// counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Greylist,
    Dnsbl,
    /// No such user: the domain's list, a callout, or the harvest penalty.
    UnknownUser,
    /// DMARC `p=reject` under `auth = "enforce"`.
    Auth,
    /// The content filter.
    Filter,
}

impl Refusal {
    pub const ALL: [Refusal; 5] = [
        Refusal::Greylist,
        Refusal::Dnsbl,
        Refusal::UnknownUser,
        Refusal::Auth,
        Refusal::Filter,
    ];

    /// Its key under `refused` in the JSON (a contract, never renamed).
    pub fn key(self) -> &'static str {
        match self {
            Refusal::Greylist => "greylist",
            Refusal::Dnsbl => "dnsbl",
            Refusal::UnknownUser => "unknown_user",
            Refusal::Auth => "auth",
            Refusal::Filter => "filter",
        }
    }

    /// Its name in the status page's table.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Greylist => "greylist",
            Refusal::Dnsbl => "DNSBL",
            Refusal::UnknownUser => "unknown user",
            Refusal::Auth => "DMARC",
            Refusal::Filter => "filter",
        }
    }

    pub fn counter(self) -> Counter {
        match self {
            Refusal::Greylist => Counter::RefusedGreylist,
            Refusal::Dnsbl => Counter::RefusedDnsbl,
            Refusal::UnknownUser => Counter::RefusedUnknownUser,
            Refusal::Auth => Counter::RefusedAuth,
            Refusal::Filter => Counter::RefusedFilter,
        }
    }
}

/// Counts of one outage, or a tally to add to them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutageCounts([u64; Counter::ALL.len()]);

impl OutageCounts {
    pub fn get(&self, c: Counter) -> u64 {
        self.0[c.index()]
    }

    pub fn set(&mut self, c: Counter, value: u64) {
        self.0[c.index()] = value;
    }

    pub fn add(&mut self, c: Counter, n: u64) -> &mut Self {
        self.0[c.index()] = self.0[c.index()].saturating_add(n);
        self
    }

    pub fn of(c: Counter, n: u64) -> Self {
        let mut counts = OutageCounts::default();
        counts.add(c, n);
        counts
    }

    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|v| *v == 0)
    }

    /// The non-zero counters, for a store write.
    pub fn nonzero(&self) -> impl Iterator<Item = (Counter, u64)> + '_ {
        Counter::ALL
            .iter()
            .map(|c| (*c, self.get(*c)))
            .filter(|(_, v)| *v > 0)
    }

    pub fn refused_total(&self) -> u64 {
        Refusal::ALL.iter().map(|r| self.get(r.counter())).sum()
    }
}

/// One outage of a domain's primary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outage {
    /// 1 for the domain's first outage, counting on (pruning keeps them).
    pub number: u64,
    /// Unix seconds.
    pub start: u64,
    /// When the primary answered again; `None` while it is down.
    pub end: Option<u64>,
    /// When the last message that arrived during it left the queue.
    pub drained: Option<u64>,
    pub counts: OutageCounts,
}

impl Outage {
    /// Whether a tally for mail that arrived at `at` belongs to it.
    pub fn takes(&self, at: u64) -> bool {
        self.drained.is_none() && self.start <= at && self.end.is_none_or(|e| at <= e)
    }

    /// Its messages still queued.
    pub fn still_queued(&self) -> u64 {
        self.counts
            .get(Counter::AcceptedMessages)
            .saturating_sub(self.counts.get(Counter::FinishedMessages))
    }

    /// Ended, and nothing of it left in the queue.
    pub fn drain_complete(&self) -> bool {
        self.end.is_some() && self.drained.is_none() && self.still_queued() == 0
    }

    pub fn duration(&self, now: u64) -> u64 {
        self.end.unwrap_or(now).saturating_sub(self.start)
    }

    /// The JSON shape of `domain history`, the API and the report.
    pub fn to_json(&self, now: u64) -> Value {
        let c = &self.counts;
        let refused: serde_json::Map<String, Value> = Refusal::ALL
            .iter()
            .map(|r| (r.key().to_string(), json!(c.get(r.counter()))))
            .collect();
        json!({
            "number": self.number,
            "start": rfc3339(self.start),
            "end": self.end.map(rfc3339),
            "ongoing": self.end.is_none(),
            "duration_seconds": self.duration(now),
            "accepted": {
                "messages": c.get(Counter::AcceptedMessages),
                "recipients": c.get(Counter::AcceptedRecipients),
            },
            "refused": refused,
            "refused_total": c.refused_total(),
            "delivered": {
                "messages": c.get(Counter::DeliveredMessages),
                "recipients": c.get(Counter::DeliveredRecipients),
            },
            "bounced_recipients": c.get(Counter::BouncedRecipients),
            "held_by_storm_guard": c.get(Counter::HeldRecipients),
            "deleted_messages": c.get(Counter::DeletedMessages),
            "still_queued": self.still_queued(),
            "drained": self.drained.map(rfc3339),
            "drain_seconds": match (self.end, self.drained) {
                (Some(e), Some(d)) => Some(d.saturating_sub(e)),
                _ => None,
            },
        })
    }
}

/// A process's recent view of domains' latest outages, for backends
/// where each read is a billed request (DynamoDB): mail outside any outage
/// then costs no request at all within `ttl`. Filled by reads and by the
/// answers of this process's own writes; bounded.
pub struct LatestCache {
    ttl: std::time::Duration,
    seen: crate::sync::Mutex<
        std::collections::HashMap<DomainName, (Option<Outage>, std::time::Instant)>,
    >,
}

/// Domains a [`LatestCache`] remembers at most (refused mail can name any
/// domain): past it, it starts again empty.
const LATEST_CACHE_MAX: usize = 10_000;

impl LatestCache {
    pub fn new(ttl: std::time::Duration) -> LatestCache {
        LatestCache {
            ttl,
            seen: Default::default(),
        }
    }

    /// The domain's latest outage as seen within `ttl`; `None`: not known.
    pub fn get(&self, domain: &DomainName) -> Option<Option<Outage>> {
        self.seen
            .lock()
            .get(domain)
            .filter(|(_, at)| at.elapsed() < self.ttl)
            .map(|(o, _)| o.clone())
    }

    pub fn put(&self, domain: &DomainName, latest: Option<Outage>) {
        let mut seen = self.seen.lock();
        if seen.len() >= LATEST_CACHE_MAX && !seen.contains_key(domain) {
            seen.clear();
        }
        seen.insert(domain.clone(), (latest, std::time::Instant::now()));
    }
}

/// One minute's queue depth of a domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DepthSample {
    /// Unix seconds at the minute's start.
    pub minute: u64,
    pub count: u64,
    /// Age in seconds of the oldest queued message, when known.
    pub oldest_age: Option<u64>,
}

/// The queue depth of one domain now: messages and the arrival of the
/// oldest (the sampler's input).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Depth {
    pub count: u64,
    pub oldest_received: Option<u64>,
}

/// What `domain history` shows: outages and samples since a moment.
pub struct History {
    pub domain: DomainName,
    pub since: u64,
    pub outages: Vec<Outage>,
    pub samples: Vec<DepthSample>,
}

impl History {
    pub fn to_json(&self, now: u64) -> Value {
        json!({
            "domain": self.domain.as_str(),
            "since": rfc3339(self.since),
            "outages": self.outages.iter().map(|o| o.to_json(now)).collect::<Vec<_>>(),
            "queue_depth": self.samples.iter().map(|s| json!({
                "at": rfc3339(s.minute),
                "queued": s.count,
                "oldest_age_seconds": s.oldest_age,
            })).collect::<Vec<_>>(),
        })
    }
}

/// The JSON of one outage as a report to send to a domain owner (the
/// `outage_report` alert carries it too).
pub fn report_json(domain: &DomainName, outage: &Outage, now: u64) -> Value {
    json!({ "domain": domain.as_str(), "outage": outage.to_json(now) })
}

/// The samples of one sampling pass, minute `minute`: a point for every
/// domain with mail queued, and a zero for one that had some at the last
/// pass (so a line drops to zero instead of stopping). Zero runs are not
/// stored: a domain with an empty queue costs nothing.
pub fn samples_of(
    minute: u64,
    depths: &[(DomainName, Depth)],
    had_mail: &std::collections::HashSet<DomainName>,
) -> Vec<(DomainName, DepthSample)> {
    let mut out: Vec<(DomainName, DepthSample)> = depths
        .iter()
        .filter(|(_, d)| d.count > 0)
        .map(|(name, d)| {
            (
                name.clone(),
                DepthSample {
                    minute,
                    count: d.count,
                    oldest_age: d.oldest_received.map(|r| minute.saturating_sub(r)),
                },
            )
        })
        .collect();
    for name in had_mail {
        if !out.iter().any(|(n, _)| n == name) {
            out.push((
                name.clone(),
                DepthSample {
                    minute,
                    count: 0,
                    oldest_age: None,
                },
            ));
        }
    }
    out
}

/// What changed in one entry in one attempt.
pub fn tally_of(before: &QueueEntry, after: &QueueEntry, finished: bool) -> OutageCounts {
    let mut counts = OutageCounts::default();
    for (b, a) in before.recipients.iter().zip(&after.recipients) {
        if b.status == RecipientStatus::Pending {
            match a.status {
                RecipientStatus::Delivered => {
                    counts.add(Counter::DeliveredRecipients, 1);
                }
                RecipientStatus::Failed => {
                    counts.add(Counter::BouncedRecipients, 1);
                }
                RecipientStatus::Pending => {}
            }
        }
        if b.held_refusal.is_none() && a.held_refusal.is_some() {
            counts.add(Counter::HeldRecipients, 1);
        }
    }
    if finished {
        counts.add(Counter::FinishedMessages, 1);
        if after
            .recipients
            .iter()
            .any(|r| r.status == RecipientStatus::Delivered)
        {
            counts.add(Counter::DeliveredMessages, 1);
        }
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outage(start: u64, end: Option<u64>) -> Outage {
        Outage {
            number: 1,
            start,
            end,
            drained: None,
            counts: OutageCounts::default(),
        }
    }

    #[test]
    fn an_outage_takes_mail_that_arrived_within_it_until_drained() {
        let open = outage(100, None);
        assert!(!open.takes(99));
        assert!(open.takes(100) && open.takes(10_000));
        let mut ended = outage(100, Some(200));
        assert!(ended.takes(200) && !ended.takes(201));
        ended.drained = Some(300);
        assert!(!ended.takes(150));
    }

    #[test]
    fn the_drain_completes_when_every_message_left_after_the_end() {
        let mut o = outage(100, None);
        o.counts.add(Counter::AcceptedMessages, 2);
        o.counts.add(Counter::FinishedMessages, 2);
        assert!(!o.drain_complete(), "still open");
        o.end = Some(200);
        assert!(o.drain_complete());
        o.counts.add(Counter::AcceptedMessages, 1);
        assert!(!o.drain_complete());
        assert_eq!(o.still_queued(), 1);
    }

    #[test]
    fn the_json_has_every_figure() {
        let mut o = outage(1_800_000_000, Some(1_800_000_600));
        o.drained = Some(1_800_000_660);
        o.counts
            .add(Counter::AcceptedMessages, 3)
            .add(Counter::AcceptedRecipients, 4)
            .add(Counter::RefusedGreylist, 2)
            .add(Counter::RefusedDnsbl, 1)
            .add(Counter::DeliveredMessages, 3)
            .add(Counter::DeliveredRecipients, 4)
            .add(Counter::FinishedMessages, 3);
        let j = o.to_json(1_800_001_000);
        assert_eq!(j["duration_seconds"], 600);
        assert_eq!(j["drain_seconds"], 60);
        assert_eq!(j["accepted"]["recipients"], 4);
        assert_eq!(j["refused"]["greylist"], 2);
        assert_eq!(j["refused_total"], 3);
        assert_eq!(j["still_queued"], 0);
        assert_eq!(j["ongoing"], false);
    }

    #[test]
    fn samples_skip_empty_queues_but_close_a_line_with_a_zero() {
        let a = DomainName::parse("a.test").unwrap();
        let b = DomainName::parse("b.test").unwrap();
        let c = DomainName::parse("c.test").unwrap();
        let depths = vec![
            (
                a.clone(),
                Depth {
                    count: 5,
                    oldest_received: Some(1000),
                },
            ),
            (
                c.clone(),
                Depth {
                    count: 0,
                    oldest_received: None,
                },
            ),
        ];
        let had = std::collections::HashSet::from([b.clone()]);
        let s = samples_of(1200, &depths, &had);
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].1.count, 5);
        assert_eq!(s[0].1.oldest_age, Some(200));
        assert_eq!((s[1].0.clone(), s[1].1.count), (b, 0));
    }
}
