//! Outage history and queue-depth samples ([`crate::history`]) in the
//! greylist table (the table of small state with a TTL):
//! - `h#DOMAIN`: the domain's latest outage as attributes — `n`, `start`,
//!   `end`, `drained` and one number per counter (each tally is one
//!   conditional `ADD`) — with `past` (S: the earlier outages as JSON,
//!   at most [`MAX_OUTAGES_PER_DOMAIN`]) and `version` (raised by every
//!   write, so opening the next outage cannot overwrite a tally);
//! - `hs#DOMAIN#DAY`: that UTC day's samples, `pts` (L of S,
//!   `minute:count:oldest_age`), expiring after eight days.
//!
//! The depth of a domain's queue is read from its `by_domain` index
//! (only the `received` attribute), for domains with mail only: the
//! sampler asks for the domains that had mail or have an undrained
//! outage.

use futures_util::StreamExt;
use serde_json::{json, Value};

use super::queue::is_condition_failed;
use super::*;
use crate::history::{Counter, Depth, DepthSample, Outage, OutageCounts, MAX_OUTAGES_PER_DOMAIN};
use crate::store::HistoryStore;

const DAY: u64 = 86_400;

/// Days a day's samples are kept (a week, and the day being written).
const SAMPLE_DAYS: u64 = 8;

/// How long a read of a domain's history head serves this process's
/// checks before a tally (`recent_outage`): per domain and process, a read
/// every two seconds at most instead of one per message.
pub(super) const RECENT_FOR: std::time::Duration = std::time::Duration::from_secs(2);

/// Tries at opening an outage while tallies race with it.
const OPEN_TRIES: usize = 3;

fn head_key(domain: &DomainName) -> String {
    format!("h#{domain}")
}

fn day_key(domain: &DomainName, day: u64) -> String {
    format!("hs#{domain}#{day}")
}

fn outage_of_item(item: &HashMap<String, AttributeValue>) -> Option<Outage> {
    let mut counts = OutageCounts::default();
    for c in Counter::ALL {
        counts.set(c, get_n(item, c.name()).unwrap_or(0));
    }
    Some(Outage {
        number: get_n(item, "n")?,
        start: get_n(item, "start")?,
        end: get_n(item, "end"),
        drained: get_n(item, "drained"),
        counts,
    })
}

fn outage_json(o: &Outage) -> Value {
    let counts: serde_json::Map<String, Value> = o
        .counts
        .nonzero()
        .map(|(c, v)| (c.name().to_string(), json!(v)))
        .collect();
    json!({ "n": o.number, "start": o.start, "end": o.end, "drained": o.drained, "counts": counts })
}

fn outage_from_json(v: &Value) -> Option<Outage> {
    let mut counts = OutageCounts::default();
    for c in Counter::ALL {
        counts.set(c, v["counts"][c.name()].as_u64().unwrap_or(0));
    }
    Some(Outage {
        number: v["n"].as_u64()?,
        start: v["start"].as_u64()?,
        end: v["end"].as_u64(),
        drained: v["drained"].as_u64(),
        counts,
    })
}

fn past_of(item: &HashMap<String, AttributeValue>) -> Vec<Outage> {
    item.get("past")
        .and_then(|v| v.as_s().ok())
        .and_then(|text| serde_json::from_str::<Vec<Value>>(text).ok())
        .map(|list| list.iter().filter_map(outage_from_json).collect())
        .unwrap_or_default()
}

fn past_text(past: &[Outage]) -> String {
    Value::Array(past.iter().map(outage_json).collect()).to_string()
}

fn sample_text(s: &DepthSample) -> String {
    match s.oldest_age {
        Some(age) => format!("{}:{}:{age}", s.minute, s.count),
        None => format!("{}:{}:", s.minute, s.count),
    }
}

fn sample_of_text(text: &str) -> Option<DepthSample> {
    let mut parts = text.split(':');
    Some(DepthSample {
        minute: parts.next()?.parse().ok()?,
        count: parts.next()?.parse().ok()?,
        oldest_age: parts.next().and_then(|a| a.parse().ok()),
    })
}

impl AwsStore {
    async fn history_head(
        &self,
        domain: &DomainName,
    ) -> Result<Option<HashMap<String, AttributeValue>>, StoreError> {
        let out = self
            .dynamodb
            .get_item()
            .table_name(&self.names.greylist_table)
            .key("pk", s(head_key(domain)))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| backend("DynamoDB get outage history", e))?;
        Ok(out.item)
    }

    /// An update of the head item with `expression` under `condition`;
    /// the outage after it, `None` when the condition failed.
    async fn update_head(
        &self,
        domain: &DomainName,
        expression: String,
        condition: &str,
        values: HashMap<String, AttributeValue>,
        what: &str,
    ) -> Result<Option<Outage>, StoreError> {
        let result = self
            .dynamodb
            .update_item()
            .table_name(&self.names.greylist_table)
            .key("pk", s(head_key(domain)))
            .update_expression(expression)
            .condition_expression(condition)
            .expression_attribute_names("#end", "end")
            .expression_attribute_names("#start", "start")
            .set_expression_attribute_values(Some(values))
            .return_values(aws_sdk_dynamodb::types::ReturnValue::AllNew)
            .send()
            .await;
        match result {
            Ok(out) => {
                let outage = out.attributes.as_ref().and_then(outage_of_item);
                self.history_cache.put(domain, outage.clone());
                Ok(outage)
            }
            Err(e) if is_condition_failed(&e) => {
                // What this process believed was stale: see it again.
                let latest = self
                    .history_head(domain)
                    .await?
                    .as_ref()
                    .and_then(outage_of_item);
                self.history_cache.put(domain, latest);
                Ok(None)
            }
            Err(e) => Err(backend(what, e)),
        }
    }

    async fn day_samples(
        &self,
        domain: &DomainName,
        day: u64,
    ) -> Result<Vec<DepthSample>, StoreError> {
        let out = self
            .dynamodb
            .get_item()
            .table_name(&self.names.greylist_table)
            .key("pk", s(day_key(domain, day)))
            .send()
            .await
            .map_err(|e| backend("DynamoDB get queue samples", e))?;
        Ok(out
            .item
            .as_ref()
            .and_then(|i| i.get("pts"))
            .and_then(|v| v.as_l().ok())
            .map(|l| {
                l.iter()
                    .filter_map(|v| v.as_s().ok())
                    .filter_map(|t| sample_of_text(t))
                    .collect()
            })
            .unwrap_or_default())
    }

    async fn domain_samples(
        &self,
        domain: &DomainName,
        since: u64,
    ) -> Result<Vec<DepthSample>, StoreError> {
        let today = crate::time::unix_seconds(std::time::SystemTime::now()) / DAY;
        let first = (since / DAY).max(today.saturating_sub(SAMPLE_DAYS));
        let mut out = Vec::new();
        for day in first..=today {
            out.extend(
                self.day_samples(domain, day)
                    .await?
                    .into_iter()
                    .filter(|s| s.minute >= since),
            );
        }
        out.sort_by_key(|s| s.minute);
        Ok(out)
    }

    /// The count and oldest arrival of a domain's queued records.
    async fn domain_depth(&self, domain: &DomainName) -> Result<Depth, StoreError> {
        let mut depth = Depth {
            count: 0,
            oldest_received: None,
        };
        let mut start = None;
        loop {
            let out = self
                .dynamodb
                .query()
                .table_name(&self.names.queue_table)
                .index_name(queue::BY_DOMAIN)
                .key_condition_expression("#d = :d")
                .filter_expression("attribute_exists(#r)")
                .projection_expression("#r")
                .expression_attribute_names("#d", "domain")
                .expression_attribute_names("#r", "received")
                .expression_attribute_values(":d", s(domain.as_str()))
                .set_exclusive_start_key(start)
                .send()
                .await
                .map_err(|e| backend("queue domain depth", e))?;
            for item in out.items() {
                depth.count += 1;
                if let Some(r) = get_n(item, "received") {
                    depth.oldest_received = Some(depth.oldest_received.map_or(r, |o| o.min(r)));
                }
            }
            match out.last_evaluated_key() {
                Some(k) if !k.is_empty() => start = Some(k.clone()),
                _ => return Ok(depth),
            }
        }
    }
}

#[async_trait]
impl HistoryStore for AwsStore {
    async fn latest_outage(&self, domain: &DomainName) -> Result<Option<Outage>, StoreError> {
        let latest = self
            .history_head(domain)
            .await?
            .as_ref()
            .and_then(outage_of_item);
        self.history_cache.put(domain, latest.clone());
        Ok(latest)
    }

    async fn recent_outage(&self, domain: &DomainName) -> Result<Option<Outage>, StoreError> {
        match self.history_cache.get(domain) {
            Some(latest) => Ok(latest),
            None => self.latest_outage(domain).await,
        }
    }

    async fn open_outage(
        &self,
        domain: &DomainName,
        start: u64,
        counts: &OutageCounts,
    ) -> Result<Option<Outage>, StoreError> {
        for _ in 0..OPEN_TRIES {
            let head = self.history_head(domain).await?;
            let latest = head.as_ref().and_then(outage_of_item);
            if latest.as_ref().is_some_and(|o| o.end.is_none()) {
                return Ok(None);
            }
            let mut past = head.as_ref().map(past_of).unwrap_or_default();
            past.extend(latest.clone());
            let excess = past.len().saturating_sub(MAX_OUTAGES_PER_DOMAIN - 1);
            past.drain(..excess);
            let outage = Outage {
                number: latest.as_ref().map_or(1, |o| o.number + 1),
                start,
                end: None,
                drained: None,
                counts: *counts,
            };
            let version = head.as_ref().and_then(|h| get_n(h, "version"));
            let mut item = HashMap::from([
                ("pk".to_string(), s(head_key(domain))),
                ("n".to_string(), n(outage.number)),
                ("start".to_string(), n(start)),
                ("past".to_string(), s(past_text(&past))),
                ("version".to_string(), n(version.unwrap_or(0) + 1)),
            ]);
            for c in Counter::ALL {
                item.insert(c.name().to_string(), n(counts.get(c)));
            }
            let mut req = self
                .dynamodb
                .put_item()
                .table_name(&self.names.greylist_table)
                .set_item(Some(item));
            req = match version {
                Some(v) => req
                    .condition_expression("version = :v")
                    .expression_attribute_values(":v", n(v)),
                None => req.condition_expression("attribute_not_exists(pk)"),
            };
            match req.send().await {
                Ok(_) => {
                    self.history_cache.put(domain, Some(outage.clone()));
                    return Ok(Some(outage));
                }
                Err(e) if is_condition_failed(&e) => continue,
                Err(e) => return Err(backend("DynamoDB open outage", e)),
            }
        }
        Ok(None)
    }

    async fn end_outage(
        &self,
        domain: &DomainName,
        end: u64,
    ) -> Result<Option<Outage>, StoreError> {
        self.update_head(
            domain,
            "SET #end = :end ADD version :one".into(),
            "attribute_exists(n) AND attribute_not_exists(#end) AND #start <= :end",
            HashMap::from([(":end".into(), n(end)), (":one".into(), n(1))]),
            "DynamoDB end outage",
        )
        .await
    }

    async fn tally(
        &self,
        domain: &DomainName,
        counts: &OutageCounts,
        at: u64,
    ) -> Result<Option<Outage>, StoreError> {
        let mut adds = vec!["version :one".to_string()];
        let mut values = HashMap::from([(":one".to_string(), n(1)), (":at".to_string(), n(at))]);
        for (i, (c, v)) in counts.nonzero().enumerate() {
            adds.push(format!("{} :c{i}", c.name()));
            values.insert(format!(":c{i}"), n(v));
        }
        if adds.len() == 1 {
            return Ok(None);
        }
        self.update_head(
            domain,
            format!("ADD {}", adds.join(", ")),
            "attribute_exists(n) AND attribute_not_exists(drained) AND #start <= :at \
             AND (attribute_not_exists(#end) OR #end >= :at)",
            values,
            "DynamoDB count outage",
        )
        .await
    }

    async fn mark_drained(
        &self,
        domain: &DomainName,
        number: u64,
        at: u64,
    ) -> Result<bool, StoreError> {
        Ok(self
            .update_head(
                domain,
                "SET drained = :at ADD version :one".into(),
                "n = :n AND attribute_not_exists(drained) AND attribute_exists(#end) \
                 AND #start <= :at",
                HashMap::from([
                    (":at".into(), n(at)),
                    (":n".into(), n(number)),
                    (":one".into(), n(1)),
                ]),
                "DynamoDB mark outage drained",
            )
            .await?
            .is_some())
    }

    async fn outages(&self, domain: &DomainName, since: u64) -> Result<Vec<Outage>, StoreError> {
        let Some(head) = self.history_head(domain).await? else {
            return Ok(Vec::new());
        };
        let mut all = past_of(&head);
        all.extend(outage_of_item(&head));
        all.retain(|o| o.end.is_none_or(|e| e >= since));
        all.sort_by_key(|o| o.number);
        Ok(all)
    }

    async fn queue_depths(
        &self,
        domains: &[DomainName],
    ) -> Result<Vec<(DomainName, Depth)>, StoreError> {
        let depths: Vec<Result<(DomainName, Depth), StoreError>> =
            futures_util::stream::iter(domains.iter().cloned())
                .map(|d| async move { self.domain_depth(&d).await.map(|depth| (d, depth)) })
                .buffer_unordered(16)
                .collect()
                .await;
        depths.into_iter().collect()
    }

    async fn put_samples(&self, samples: &[(DomainName, DepthSample)]) -> Result<(), StoreError> {
        for (domain, sample) in samples {
            let day = sample.minute / DAY;
            self.dynamodb
                .update_item()
                .table_name(&self.names.greylist_table)
                .key("pk", s(day_key(domain, day)))
                .update_expression(
                    "SET pts = list_append(if_not_exists(pts, :none), :p), expires = :exp",
                )
                .expression_attribute_values(":none", AttributeValue::L(Vec::new()))
                .expression_attribute_values(":p", AttributeValue::L(vec![s(sample_text(sample))]))
                .expression_attribute_values(":exp", n((day + SAMPLE_DAYS) * DAY))
                .send()
                .await
                .map_err(|e| backend("DynamoDB put queue sample", e))?;
        }
        Ok(())
    }

    async fn samples(
        &self,
        domain: &DomainName,
        since: u64,
    ) -> Result<Vec<DepthSample>, StoreError> {
        self.domain_samples(domain, since).await
    }

    async fn hourly_peaks(
        &self,
        domains: &[DomainName],
        since: u64,
    ) -> Result<Vec<(DomainName, Vec<(u64, u64)>)>, StoreError> {
        let peaks: Vec<Result<(DomainName, Vec<(u64, u64)>), StoreError>> =
            futures_util::stream::iter(domains.iter().cloned())
                .map(|d| async move {
                    let samples = self.domain_samples(&d, since).await?;
                    let mut hours: Vec<(u64, u64)> = Vec::new();
                    for s in samples {
                        let hour = s.minute - s.minute % 3600;
                        match hours.last_mut() {
                            Some((h, peak)) if *h == hour => *peak = (*peak).max(s.count),
                            _ => hours.push((hour, s.count)),
                        }
                    }
                    Ok((d, hours))
                })
                .buffered(16)
                .collect()
                .await;
        peaks.into_iter().collect()
    }

    /// Samples go by the table's TTL; ended, drained outages older than
    /// `outages_before` leave each head's `past` (one scan of the heads:
    /// the sweeper's daily pass).
    async fn prune(&self, outages_before: u64, _samples_before: u64) -> Result<u64, StoreError> {
        let mut removed = 0;
        let mut start: Option<HashMap<String, AttributeValue>> = None;
        loop {
            let out = self
                .dynamodb
                .scan()
                .table_name(&self.names.greylist_table)
                .filter_expression("begins_with(pk, :h) AND attribute_exists(past)")
                .expression_attribute_values(":h", s("h#"))
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| backend("DynamoDB scan outage histories", e))?;
            for head in out.items() {
                let past = past_of(head);
                let kept: Vec<Outage> = past
                    .iter()
                    .filter(|o| !(o.drained.is_some() && o.end.is_some_and(|e| e < outages_before)))
                    .cloned()
                    .collect();
                let (Some(version), Some(pk)) = (get_n(head, "version"), head.get("pk")) else {
                    continue;
                };
                if kept.len() == past.len() {
                    continue;
                }
                let result = self
                    .dynamodb
                    .update_item()
                    .table_name(&self.names.greylist_table)
                    .key("pk", pk.clone())
                    .update_expression("SET past = :p ADD version :one")
                    .condition_expression("version = :v")
                    .expression_attribute_values(":p", s(past_text(&kept)))
                    .expression_attribute_values(":one", n(1))
                    .expression_attribute_values(":v", n(version))
                    .send()
                    .await;
                match result {
                    Ok(_) => removed += (past.len() - kept.len()) as u64,
                    // Written meanwhile: pruned at the next pass.
                    Err(e) if is_condition_failed(&e) => {}
                    Err(e) => return Err(backend("DynamoDB prune outage history", e)),
                }
            }
            match out.last_evaluated_key() {
                Some(k) if !k.is_empty() => start = Some(k.clone()),
                _ => return Ok(removed),
            }
        }
    }
}
