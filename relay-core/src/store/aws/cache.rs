//! The callout cache and the primaries' shared states (greylist table).

use super::*;

/// How long a primary's state item outlives its last observation (TTL).
pub(super) const PRIMARY_STATE_KEEP_SECS: u64 = 30 * 86_400;

/// Recipient verification lives in the greylist table, the store of
/// short-lived verdicts with a TTL: `r#ADDRESS` items (one per cached
/// recipient, with its domain, for `recipients list`) and `p#DOMAIN` items
/// (a primary's state).
#[async_trait]
impl RecipientCache for AwsStore {
    async fn recipient(
        &self,
        address: &str,
        now: u64,
    ) -> Result<Option<CachedRecipient>, StoreError> {
        let Some(item) = self.get_greylist_item(format!("r#{address}")).await? else {
            return Ok(None);
        };
        let entry: CachedRecipient = item
            .get("record")
            .and_then(|v| v.as_s().ok())
            .and_then(|r| serde_json::from_str(r).ok())
            .ok_or_else(|| {
                StoreError::Invalid(format!("corrupt recipient cache item {address}"))
            })?;
        // TTL deletion is lazy: an expired item may still be read.
        Ok((entry.expires > now).then_some(entry))
    }

    async fn put_recipient(
        &self,
        domain: &DomainName,
        entry: &CachedRecipient,
    ) -> Result<(), StoreError> {
        let item = HashMap::from([
            ("pk".to_string(), s(format!("r#{}", entry.address))),
            ("domain".to_string(), s(domain.as_str().to_string())),
            (
                "record".to_string(),
                s(serde_json::to_string(entry).unwrap_or_default()),
            ),
            ("expires".to_string(), n(entry.expires)),
        ]);
        self.put_greylist(item, "DynamoDB put recipient").await
    }

    /// A filtered scan of the greylist table: an operator's command, not
    /// the mail path.
    async fn recipients(
        &self,
        domain: &DomainName,
        now: u64,
    ) -> Result<Vec<CachedRecipient>, StoreError> {
        let mut found = Vec::new();
        self.visit_recipients(domain, now, &mut |entry| found.push(entry))
            .await?;
        found.sort_by(|a, b| a.address.cmp(&b.address));
        Ok(found)
    }

    async fn verdict_counts(
        &self,
        domain: &DomainName,
        now: u64,
    ) -> Result<(usize, usize), StoreError> {
        let mut counts = (0, 0);
        self.visit_recipients(domain, now, &mut |entry| match entry.verdict {
            crate::verify::Verdict::Valid => counts.0 += 1,
            crate::verify::Verdict::Invalid => counts.1 += 1,
        })
        .await?;
        Ok(counts)
    }

    async fn primary_state(&self, domain: &DomainName) -> Result<Option<PrimaryState>, StoreError> {
        let item = self.get_greylist_item(format!("p#{domain}")).await?;
        Ok(item.and_then(|i| {
            Some(PrimaryState {
                up: i.get("up")?.as_bool().ok().copied()?,
                since: get_n(&i, "since")?,
                observed: get_n(&i, "observed")?,
            })
        }))
    }

    async fn put_primary_state(
        &self,
        domain: &DomainName,
        state: &PrimaryState,
    ) -> Result<(), StoreError> {
        let item = HashMap::from([
            ("pk".to_string(), s(format!("p#{domain}"))),
            ("up".to_string(), AttributeValue::Bool(state.up)),
            ("since".to_string(), n(state.since)),
            ("observed".to_string(), n(state.observed)),
            (
                "expires".to_string(),
                n(state.observed + PRIMARY_STATE_KEEP_SECS),
            ),
        ]);
        self.put_greylist(item, "DynamoDB put primary state").await
    }
}
