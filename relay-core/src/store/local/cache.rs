//! The callout cache and the primaries' shared states.

use super::*;

#[async_trait]
impl RecipientCache for LocalStore {
    async fn recipient(
        &self,
        address: &str,
        now: u64,
    ) -> Result<Option<CachedRecipient>, StoreError> {
        let row: Option<String> = self.read_optional(
            "SELECT record FROM recipient_cache WHERE address = ?1",
            [address],
        )?;
        let entry: Option<CachedRecipient> = row
            .map(|r| {
                serde_json::from_str(&r).map_err(|_| {
                    StoreError::Invalid(format!("corrupt recipient cache record {address}"))
                })
            })
            .transpose()?;
        Ok(entry.filter(|e| e.expires > now))
    }

    async fn put_recipient(
        &self,
        domain: &DomainName,
        entry: &CachedRecipient,
    ) -> Result<(), StoreError> {
        self.write(WriteOp::PutRecipient {
            domain: domain.clone(),
            entry: entry.clone(),
        })
        .await
        .map(|_| ())
    }

    async fn recipients(
        &self,
        domain: &DomainName,
        now: u64,
    ) -> Result<Vec<CachedRecipient>, StoreError> {
        let rows: Vec<String> = self.read(|c| {
            let mut st = c.prepare_cached(
                "SELECT record FROM recipient_cache WHERE domain = ?1 AND expires > ?2 ORDER BY address",
            )?;
            let rows = st.query_map(params![domain.as_str(), now as i64], |r| r.get(0))?;
            rows.collect()
        })?;
        rows.iter()
            .map(|r| {
                serde_json::from_str(r).map_err(|_| {
                    StoreError::Invalid(format!("corrupt recipient cache record in {domain}"))
                })
            })
            .collect()
    }

    async fn verdict_counts(
        &self,
        domain: &DomainName,
        now: u64,
    ) -> Result<(usize, usize), StoreError> {
        let mut counts = (0, 0);
        let mut corrupt = false;
        self.read(|c| {
            let mut st = c.prepare_cached(
                "SELECT record FROM recipient_cache WHERE domain = ?1 AND expires > ?2",
            )?;
            let mut rows = st.query(params![domain.as_str(), now as i64])?;
            while let Some(row) = rows.next()? {
                let record: String = row.get(0)?;
                match serde_json::from_str::<CachedRecipient>(&record).map(|r| r.verdict) {
                    Ok(crate::verify::Verdict::Valid) => counts.0 += 1,
                    Ok(crate::verify::Verdict::Invalid) => counts.1 += 1,
                    Err(_) => corrupt = true,
                }
            }
            Ok(())
        })?;
        if corrupt {
            return Err(StoreError::Invalid(format!(
                "corrupt recipient cache record in {domain}"
            )));
        }
        Ok(counts)
    }

    async fn primary_state(&self, domain: &DomainName) -> Result<Option<PrimaryState>, StoreError> {
        let row: Option<String> = self.read_optional(
            "SELECT record FROM primary_state WHERE domain = ?1",
            [domain.as_str()],
        )?;
        row.map(|r| {
            serde_json::from_str(&r)
                .map_err(|_| StoreError::Invalid(format!("corrupt primary state of {domain}")))
        })
        .transpose()
    }

    async fn put_primary_state(
        &self,
        domain: &DomainName,
        state: &PrimaryState,
    ) -> Result<(), StoreError> {
        self.write(WriteOp::PutPrimaryState {
            domain: domain.clone(),
            state: *state,
        })
        .await
        .map(|_| ())
    }
}
