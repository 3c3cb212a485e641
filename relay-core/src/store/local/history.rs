//! Outage history and queue-depth samples ([`crate::history`]).
//!
//! `outages` has a row per outage, its counters as columns (each tally is
//! one `UPDATE … SET c = c + ?`); `queue_samples` a row per domain and
//! minute with mail queued; `queue_peaks` the highest sample per domain
//! and hour, so the overview reads 24 rows a domain, not 1 440.

use super::*;
use crate::history::{Counter, Depth, DepthSample, Outage, OutageCounts, MAX_OUTAGES_PER_DOMAIN};
use crate::store::HistoryStore;

pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS outages (
    domain TEXT NOT NULL, number INTEGER NOT NULL, start INTEGER NOT NULL,
    ended INTEGER, drained INTEGER,
    accepted_messages INTEGER NOT NULL DEFAULT 0, accepted_recipients INTEGER NOT NULL DEFAULT 0,
    refused_greylist INTEGER NOT NULL DEFAULT 0, refused_dnsbl INTEGER NOT NULL DEFAULT 0,
    refused_unknown_user INTEGER NOT NULL DEFAULT 0, refused_auth INTEGER NOT NULL DEFAULT 0,
    refused_filter INTEGER NOT NULL DEFAULT 0,
    delivered_messages INTEGER NOT NULL DEFAULT 0, delivered_recipients INTEGER NOT NULL DEFAULT 0,
    bounced_recipients INTEGER NOT NULL DEFAULT 0, held_recipients INTEGER NOT NULL DEFAULT 0,
    finished_messages INTEGER NOT NULL DEFAULT 0, deleted_messages INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (domain, number)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS queue_samples (
    domain TEXT NOT NULL, minute INTEGER NOT NULL, count INTEGER NOT NULL, oldest_age INTEGER,
    PRIMARY KEY (domain, minute)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS queue_peaks (
    hour INTEGER NOT NULL, domain TEXT NOT NULL, peak INTEGER NOT NULL,
    PRIMARY KEY (hour, domain)
) WITHOUT ROWID;
";

/// The domain's latest outage, as a `WHERE` clause over `?1` (the domain).
const LATEST: &str = "domain = ?1 AND number = (SELECT max(number) FROM outages WHERE domain = ?1)";

/// A history change, committed with the store's other writes.
pub(super) enum HistoryOp {
    Open {
        domain: DomainName,
        start: u64,
        counts: OutageCounts,
    },
    End {
        domain: DomainName,
        end: u64,
    },
    Tally {
        domain: DomainName,
        counts: OutageCounts,
        at: u64,
    },
    MarkDrained {
        domain: DomainName,
        number: u64,
        at: u64,
    },
    PutSamples(Vec<(DomainName, DepthSample)>),
    Prune {
        outages_before: u64,
        samples_before: u64,
    },
}

/// Counts a stored queue entry against its domain's open outage, in the
/// accepting transaction (no write of its own: nothing is written when no
/// outage is open).
pub(super) fn count_accepted(conn: &Connection, entry: &QueueEntry) -> rusqlite::Result<()> {
    exec(
        conn,
        &format!(
            "UPDATE outages SET accepted_messages = accepted_messages + 1,
             accepted_recipients = accepted_recipients + ?2
             WHERE {LATEST} AND ended IS NULL AND start <= ?3"
        ),
        params![
            entry.domain.as_str(),
            entry.recipients.len() as i64,
            entry.received_at as i64
        ],
    )?;
    Ok(())
}

pub(super) fn apply(conn: &Connection, op: &HistoryOp) -> rusqlite::Result<bool> {
    match op {
        HistoryOp::Open {
            domain,
            start,
            counts,
        } => {
            let latest: Option<(i64, Option<i64>)> = conn
                .prepare_cached(&format!("SELECT number, ended FROM outages WHERE {LATEST}"))?
                .query_row([domain.as_str()], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            if matches!(latest, Some((_, None))) {
                return Ok(false);
            }
            let number = latest.map_or(1, |(n, _)| n + 1);
            let columns: Vec<&str> = Counter::ALL.iter().map(|c| c.name()).collect();
            let placeholders: Vec<String> =
                (0..columns.len()).map(|i| format!("?{}", i + 4)).collect();
            let mut values: Vec<rusqlite::types::Value> = vec![
                domain.as_str().to_string().into(),
                number.into(),
                (*start as i64).into(),
            ];
            values.extend(Counter::ALL.iter().map(|c| (counts.get(*c) as i64).into()));
            conn.prepare_cached(&format!(
                "INSERT INTO outages (domain, number, start, {}) VALUES (?1, ?2, ?3, {})",
                columns.join(", "),
                placeholders.join(", ")
            ))?
            .execute(rusqlite::params_from_iter(values))?;
            exec(
                conn,
                "DELETE FROM outages WHERE domain = ?1 AND number <= ?2",
                params![domain.as_str(), number - MAX_OUTAGES_PER_DOMAIN as i64],
            )?;
            Ok(true)
        }
        HistoryOp::End { domain, end } => Ok(exec(
            conn,
            &format!("UPDATE outages SET ended = ?2 WHERE {LATEST} AND ended IS NULL"),
            params![domain.as_str(), *end as i64],
        )? > 0),
        HistoryOp::Tally { domain, counts, at } => {
            let sets: Vec<String> = counts
                .nonzero()
                .map(|(c, v)| format!("{0} = {0} + {1}", c.name(), v))
                .collect();
            if sets.is_empty() {
                return Ok(false);
            }
            Ok(exec(
                conn,
                &format!(
                    "UPDATE outages SET {} WHERE {LATEST} AND drained IS NULL AND start <= ?2
                     AND (ended IS NULL OR ended >= ?2)",
                    sets.join(", ")
                ),
                params![domain.as_str(), *at as i64],
            )? > 0)
        }
        HistoryOp::MarkDrained { domain, number, at } => Ok(exec(
            conn,
            "UPDATE outages SET drained = ?3 WHERE domain = ?1 AND number = ?2
             AND drained IS NULL AND ended IS NOT NULL",
            params![domain.as_str(), *number as i64, *at as i64],
        )? > 0),
        HistoryOp::PutSamples(samples) => {
            for (domain, s) in samples {
                exec(
                    conn,
                    // Sampled more often than each minute: the minute keeps
                    // its peak.
                    "INSERT INTO queue_samples (domain, minute, count, oldest_age)
                     VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT DO UPDATE SET count = max(count, excluded.count),
                     oldest_age = max(coalesce(oldest_age, 0), coalesce(excluded.oldest_age, 0))",
                    params![
                        domain.as_str(),
                        s.minute as i64,
                        s.count as i64,
                        s.oldest_age.map(|a| a as i64)
                    ],
                )?;
                exec(
                    conn,
                    "INSERT INTO queue_peaks (hour, domain, peak) VALUES (?1, ?2, ?3)
                     ON CONFLICT DO UPDATE SET peak = max(peak, excluded.peak)",
                    params![
                        (s.minute - s.minute % 3600) as i64,
                        domain.as_str(),
                        s.count as i64
                    ],
                )?;
            }
            Ok(!samples.is_empty())
        }
        HistoryOp::Prune {
            outages_before,
            samples_before,
        } => {
            let a = exec(
                conn,
                "DELETE FROM outages WHERE ended < ?1 AND drained IS NOT NULL",
                [*outages_before as i64],
            )?;
            let b = exec(
                conn,
                "DELETE FROM queue_samples WHERE minute < ?1",
                [*samples_before as i64],
            )?;
            let c = exec(
                conn,
                "DELETE FROM queue_peaks WHERE hour < ?1",
                [*samples_before as i64],
            )?;
            Ok(a + b + c > 0)
        }
    }
}

fn outage_of(r: &rusqlite::Row) -> rusqlite::Result<Outage> {
    let mut counts = OutageCounts::default();
    for (i, c) in Counter::ALL.iter().enumerate() {
        counts.set(*c, r.get::<_, i64>(4 + i)?.max(0) as u64);
    }
    Ok(Outage {
        number: r.get::<_, i64>(0)? as u64,
        start: r.get::<_, i64>(1)? as u64,
        end: r.get::<_, Option<i64>>(2)?.map(|v| v as u64),
        drained: r.get::<_, Option<i64>>(3)?.map(|v| v as u64),
        counts,
    })
}

fn outage_columns() -> String {
    let counters: Vec<&str> = Counter::ALL.iter().map(|c| c.name()).collect();
    format!("number, start, ended, drained, {}", counters.join(", "))
}

impl LocalStore {
    async fn history_write(&self, op: HistoryOp) -> Result<bool, StoreError> {
        self.write(WriteOp::History(op)).await
    }

    /// Commits `op`; the domain's latest outage after it, if it changed
    /// anything.
    async fn history_change(
        &self,
        domain: &DomainName,
        op: HistoryOp,
    ) -> Result<Option<Outage>, StoreError> {
        if !self.history_write(op).await? {
            return Ok(None);
        }
        self.latest_outage(domain).await
    }
}

#[async_trait]
impl HistoryStore for LocalStore {
    async fn latest_outage(&self, domain: &DomainName) -> Result<Option<Outage>, StoreError> {
        self.read(|c| {
            c.prepare_cached(&format!(
                "SELECT {} FROM outages WHERE {LATEST}",
                outage_columns()
            ))?
            .query_row([domain.as_str()], outage_of)
            .optional()
        })
    }

    async fn open_outage(
        &self,
        domain: &DomainName,
        start: u64,
        counts: &OutageCounts,
    ) -> Result<Option<Outage>, StoreError> {
        let op = HistoryOp::Open {
            domain: domain.clone(),
            start,
            counts: *counts,
        };
        self.history_change(domain, op).await
    }

    async fn end_outage(
        &self,
        domain: &DomainName,
        end: u64,
    ) -> Result<Option<Outage>, StoreError> {
        let op = HistoryOp::End {
            domain: domain.clone(),
            end,
        };
        self.history_change(domain, op).await
    }

    async fn tally(
        &self,
        domain: &DomainName,
        counts: &OutageCounts,
        at: u64,
    ) -> Result<Option<Outage>, StoreError> {
        let op = HistoryOp::Tally {
            domain: domain.clone(),
            counts: *counts,
            at,
        };
        self.history_change(domain, op).await
    }

    async fn mark_drained(
        &self,
        domain: &DomainName,
        number: u64,
        at: u64,
    ) -> Result<bool, StoreError> {
        self.history_write(HistoryOp::MarkDrained {
            domain: domain.clone(),
            number,
            at,
        })
        .await
    }

    async fn outages(&self, domain: &DomainName, since: u64) -> Result<Vec<Outage>, StoreError> {
        self.read(|c| {
            let mut st = c.prepare_cached(&format!(
                "SELECT {} FROM outages WHERE domain = ?1 AND (ended IS NULL OR ended >= ?2)
                 ORDER BY number",
                outage_columns()
            ))?;
            let rows = st.query_map(params![domain.as_str(), since as i64], outage_of)?;
            rows.collect()
        })
    }

    /// One pass over the queue (it has no per-domain index; a minute's
    /// sample of 100 000 entries reads them once).
    async fn queue_depths(
        &self,
        domains: &[DomainName],
    ) -> Result<Vec<(DomainName, Depth)>, StoreError> {
        let rows: Vec<(String, i64, i64)> = self.read(|c| {
            let mut st = c.prepare_cached(
                "SELECT domain, count(*), min(received_at) FROM queue GROUP BY domain",
            )?;
            let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
            rows.collect()
        })?;
        Ok(rows
            .into_iter()
            .filter_map(|(name, count, oldest)| {
                let name = DomainName::parse(&name).ok()?;
                domains.contains(&name).then_some((
                    name,
                    Depth {
                        count: count.max(0) as u64,
                        oldest_received: Some(oldest.max(0) as u64),
                    },
                ))
            })
            .collect())
    }

    async fn put_samples(&self, samples: &[(DomainName, DepthSample)]) -> Result<(), StoreError> {
        if samples.is_empty() {
            return Ok(());
        }
        self.history_write(HistoryOp::PutSamples(samples.to_vec()))
            .await
            .map(|_| ())
    }

    async fn samples(
        &self,
        domain: &DomainName,
        since: u64,
    ) -> Result<Vec<DepthSample>, StoreError> {
        self.read(|c| {
            let mut st = c.prepare_cached(
                "SELECT minute, count, oldest_age FROM queue_samples
                 WHERE domain = ?1 AND minute >= ?2 ORDER BY minute",
            )?;
            let rows = st.query_map(params![domain.as_str(), since as i64], |r| {
                Ok(DepthSample {
                    minute: r.get::<_, i64>(0)? as u64,
                    count: r.get::<_, i64>(1)?.max(0) as u64,
                    oldest_age: r.get::<_, Option<i64>>(2)?.map(|v| v.max(0) as u64),
                })
            })?;
            rows.collect()
        })
    }

    async fn hourly_peaks(
        &self,
        domains: &[DomainName],
        since: u64,
    ) -> Result<Vec<(DomainName, Vec<(u64, u64)>)>, StoreError> {
        let rows: Vec<(i64, String, i64)> = self.read(|c| {
            let mut st = c.prepare_cached(
                "SELECT hour, domain, peak FROM queue_peaks WHERE hour >= ?1 ORDER BY hour",
            )?;
            let rows = st.query_map([since as i64], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
            rows.collect()
        })?;
        let mut points: std::collections::HashMap<String, Vec<(u64, u64)>> =
            std::collections::HashMap::new();
        for (hour, name, peak) in rows {
            points
                .entry(name)
                .or_default()
                .push((hour.max(0) as u64, peak.max(0) as u64));
        }
        Ok(domains
            .iter()
            .map(|d| (d.clone(), points.remove(d.as_str()).unwrap_or_default()))
            .collect())
    }

    async fn prune(&self, outages_before: u64, samples_before: u64) -> Result<u64, StoreError> {
        self.history_write(HistoryOp::Prune {
            outages_before,
            samples_before,
        })
        .await
        .map(u64::from)
    }
}
