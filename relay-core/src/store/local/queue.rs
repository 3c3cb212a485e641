//! The delivery queue and the spool (a message and its entries in one
//! transaction).

use super::*;

#[async_trait]
impl DeliveryQueue for LocalStore {
    async fn enqueue(&self, entry: &QueueEntry) -> Result<(), StoreError> {
        self.write(WriteOp::Enqueue(entry.clone()))
            .await
            .map(|_| ())
    }

    async fn get(&self, id: &QueueId) -> Result<Option<QueueEntry>, StoreError> {
        let row: Option<String> =
            self.read_optional("SELECT record FROM queue WHERE id = ?1", [id.as_str()])?;
        row.map(|r| decode_entry(id.as_str(), &r)).transpose()
    }

    async fn list(&self, domain: Option<&DomainName>) -> Result<Vec<QueueEntry>, StoreError> {
        let rows: Vec<(String, String)> = self.read(|c| {
            let mut st = c.prepare_cached("SELECT id, record FROM queue WHERE ?1 IS NULL OR domain = ?1 ORDER BY received_at, id")?;
            let rows = st.query_map([domain.map(DomainName::as_str)], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect()
        })?;
        rows.iter().map(|(id, r)| decode_entry(id, r)).collect()
    }

    async fn scan(
        &self,
        domain: Option<&DomainName>,
        visit: &mut (dyn FnMut(QueueEntry) + Send),
    ) -> Result<(), StoreError> {
        // Pages in key order (the table is clustered on the id), each read
        // under the reader lock on its own, so writers are not held up.
        let mut after = String::new();
        loop {
            let rows: Vec<(String, String)> = self.read(|c| {
                let mut st = c.prepare_cached(
                    "SELECT id, record FROM queue WHERE id > ?1 AND (?2 IS NULL OR domain = ?2) ORDER BY id LIMIT ?3",
                )?;
                let rows = st.query_map(
                    rusqlite::params![after, domain.map(DomainName::as_str), SCAN_PAGE as i64],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )?;
                rows.collect()
            })?;
            let full = rows.len() == SCAN_PAGE;
            for (id, record) in &rows {
                visit(decode_entry(id, record)?);
            }
            match rows.into_iter().next_back() {
                Some((last, _)) if full => after = last,
                _ => return Ok(()),
            }
        }
    }

    async fn remove(&self, id: &QueueId) -> Result<bool, StoreError> {
        self.write(WriteOp::RemoveEntry(id.clone())).await
    }

    async fn depth(&self) -> Result<u64, StoreError> {
        self.read(|c| {
            c.prepare_cached("SELECT COUNT(*) FROM queue")?
                .query_row([], |r| r.get::<_, i64>(0))
        })
        .map(|n| n.max(0) as u64)
    }

    async fn update(&self, entry: &QueueEntry) -> Result<bool, StoreError> {
        self.write(WriteOp::UpdateEntry(entry.clone())).await
    }

    async fn release(&self, domain: Option<&DomainName>, now: u64) -> Result<u64, StoreError> {
        self.write(WriteOp::Release {
            domain: domain.cloned(),
            now,
        })
        .await?;
        self.read(|c| {
            c.prepare_cached("SELECT COUNT(*) FROM queue WHERE ?1 IS NULL OR domain = ?1")?
                .query_row([domain.map(DomainName::as_str)], |r| r.get::<_, i64>(0))
        })
        .map(|n| n.max(0) as u64)
    }
}

#[async_trait]
impl ScheduledQueue for LocalStore {
    async fn reschedule(&self, entry: &QueueEntry) -> Result<bool, StoreError> {
        self.write(WriteOp::Reschedule(entry.clone())).await
    }

    async fn due(&self, now: u64, limit: usize) -> Result<Vec<QueueEntry>, StoreError> {
        let rows: Vec<(String, String)> = self.read(|c| {
            let mut st = c.prepare_cached("SELECT id, record FROM queue WHERE next_attempt <= ?1 ORDER BY next_attempt, received_at, id LIMIT ?2")?;
            let rows = st.query_map(params![now as i64, limit as i64], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect()
        })?;
        rows.iter().map(|(id, r)| decode_entry(id, r)).collect()
    }

    async fn take_releases(&self) -> Result<Vec<Option<DomainName>>, StoreError> {
        let rows: Vec<Option<String>> = self.read(|c| {
            let mut st = c.prepare_cached("SELECT DISTINCT domain FROM queue_releases")?;
            let rows = st.query_map([], |r| r.get(0))?;
            rows.collect()
        })?;
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        self.write(WriteOp::TakeReleases).await?;
        // A name that no longer parses is skipped, never widened to "all".
        Ok(rows
            .into_iter()
            .filter_map(|d| match d {
                None => Some(None),
                Some(d) => DomainName::parse(&d).ok().map(Some),
            })
            .collect())
    }

    async fn mark_delay_warned(&self, id: &QueueId) -> Result<bool, StoreError> {
        self.write(WriteOp::MarkDelayWarned(id.clone())).await
    }

    async fn defer_domain(&self, domain: &DomainName, until: u64) -> Result<u64, StoreError> {
        self.write(WriteOp::Defer {
            domain: domain.clone(),
            until,
        })
        .await
        .map(u64::from)
    }
}

#[async_trait]
impl Spool for LocalStore {
    /// Bodies and entries in one transaction: nothing is half-stored.
    async fn accept(&self, message: AcceptedMessage) -> Result<Vec<QueueId>, StoreError> {
        let entries = message.queue_entries();
        let ids = entries.iter().map(|e| e.id.clone()).collect();
        self.write(WriteOp::Accept {
            entries,
            body: message.body,
            spooled: message.spooled,
        })
        .await?;
        Ok(ids)
    }
}
