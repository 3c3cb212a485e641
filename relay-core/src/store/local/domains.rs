//! Hosted domains, read through a cache a stamp file keeps current.

use super::*;

#[async_trait]
impl DomainRegistry for LocalStore {
    async fn get(&self, name: &DomainName) -> Result<Option<Domain>, StoreError> {
        // Stamp first: a change committed after this point bumps it again.
        let stamp = self.domains_stamp();
        {
            let mut cache = self.domains.lock();
            if cache.stamp != Some(stamp) {
                *cache = DomainCache {
                    stamp: Some(stamp),
                    ..DomainCache::default()
                };
            } else if let Some(hit) = cache.entries.get(name) {
                return Ok(hit.clone());
            }
        }
        let row: Option<String> = self.read_optional(
            "SELECT record FROM domains WHERE name = ?1",
            [name.as_str()],
        )?;
        let domain = row.map(|r| decode_domain(name.as_str(), &r)).transpose()?;
        let mut cache = self.domains.lock();
        if cache.stamp == Some(stamp) {
            if cache.entries.len() >= DOMAIN_CACHE_MAX {
                cache.entries.clear();
            }
            cache.entries.insert(name.clone(), domain.clone());
        }
        Ok(domain)
    }

    async fn list(&self) -> Result<Vec<Domain>, StoreError> {
        let rows: Vec<(String, String)> = self.read(|c| {
            let mut st = c.prepare_cached("SELECT name, record FROM domains ORDER BY name")?;
            let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect()
        })?;
        rows.iter().map(|(n, r)| decode_domain(n, r)).collect()
    }

    async fn put(&self, domain: &Domain) -> Result<(), StoreError> {
        self.write(WriteOp::PutDomain(domain.clone())).await?;
        self.bump_domains_stamp();
        Ok(())
    }

    async fn remove(&self, name: &DomainName) -> Result<bool, StoreError> {
        let removed = self.write(WriteOp::RemoveDomain(name.clone())).await?;
        self.bump_domains_stamp();
        Ok(removed)
    }
}
