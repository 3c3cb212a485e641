//! Where mail for a domain goes: its hosted-domain record (or none: mail
//! for another domain, such as a DSN, goes by MX), its next hops, and how
//! long its mail may stay queued. Deliveries, callouts, probes and ETRN's
//! "is this client a primary?" all ask here.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use crate::address::DomainName;
use crate::dns::Resolver;
use crate::domain::Domain;
use crate::store::DomainRegistry;
use crate::sync::Mutex;

use super::route::{self, RouteError, SelfIdentity, Target};

/// Routes and lifetimes from the domain registry and DNS. Cheap to share.
pub struct Router {
    me: SelfIdentity,
    /// Static next hops per destination domain (`[delivery.routes]`).
    routes: BTreeMap<String, String>,
    /// The global queue lifetime (a domain may set its own).
    queue_lifetime: Duration,
    resolver: Arc<dyn Resolver>,
    registry: Arc<dyn DomainRegistry>,
    /// Destinations already logged as not hosted.
    unhosted: Mutex<HashSet<DomainName>>,
}

/// Destinations remembered as "said once" before the memory starts over.
const UNHOSTED_REMEMBERED: usize = 10_000;

impl Router {
    pub fn new(
        me: SelfIdentity,
        routes: BTreeMap<String, String>,
        queue_lifetime: Duration,
        resolver: Arc<dyn Resolver>,
        registry: Arc<dyn DomainRegistry>,
    ) -> Self {
        Router {
            me,
            routes,
            queue_lifetime,
            resolver,
            registry,
            unhosted: Default::default(),
        }
    }

    pub fn me(&self) -> &SelfIdentity {
        &self.me
    }

    pub fn registry(&self) -> &Arc<dyn DomainRegistry> {
        &self.registry
    }

    /// Where mail for `domain` goes now.
    pub async fn targets_for(&self, domain: &DomainName) -> Result<Vec<Target>, RouteError> {
        self.route_for(domain).await.map(|(_, targets)| targets)
    }

    /// Where mail for `domain` goes now, and its hosted-domain record.
    pub async fn route_for(
        &self,
        domain: &DomainName,
    ) -> Result<(Option<Domain>, Vec<Target>), RouteError> {
        let record = self.hosted(domain).await?;
        let targets = self.route(domain, record.as_ref()).await?;
        Ok((record, targets))
    }

    /// The hosted-domain record of `domain` (`None`: not hosted, delivered
    /// by MX). One read serves the hold check, the route, the lifetime and
    /// what the attempt learns.
    pub async fn hosted(&self, domain: &DomainName) -> Result<Option<Domain>, RouteError> {
        match self.registry.get(domain).await {
            Ok(Some(d)) => Ok(Some(d)),
            Ok(None) => {
                // Queued mail of a domain that was removed (or a DSN's
                // destination): said once per domain, then by MX.
                let first = {
                    let mut seen = self.unhosted.lock();
                    if seen.len() >= UNHOSTED_REMEMBERED {
                        seen.clear();
                    }
                    seen.insert(domain.clone())
                };
                if first && !self.routes.contains_key(domain.as_str()) {
                    tracing::info!(event = "delivering_by_mx", domain = %domain,
                        "not a hosted domain (a DSN's destination, or removed with mail queued): delivered to its MX hosts");
                }
                Ok(None)
            }
            Err(e) => Err(RouteError::Transient(format!(
                "domain lookup: {}",
                crate::error::Report(&e)
            ))),
        }
    }

    /// The targets for `domain` with its record's primaries.
    pub async fn route(
        &self,
        domain: &DomainName,
        record: Option<&Domain>,
    ) -> Result<Vec<Target>, RouteError> {
        let primaries = record.map_or(&[][..], |d| d.primary.as_slice());
        route::targets(
            self.resolver.as_ref(),
            &self.me,
            &self.routes,
            domain.as_str(),
            primaries,
        )
        .await
    }

    /// Are `domain`'s next hops the operator's choice (its primaries, a
    /// static route) rather than its MX hosts?
    pub fn explicit(&self, domain: &DomainName, record: Option<&Domain>) -> bool {
        record.is_some_and(|r| !r.primary.is_empty()) || self.routes.contains_key(domain.as_str())
    }

    /// How long mail for `domain` may stay queued now (its own lifetime,
    /// or the global one; the global one if the record cannot be read).
    pub async fn lifetime_of(&self, domain: &DomainName) -> Duration {
        let record = self.registry.get(domain).await.ok().flatten();
        self.lifetime(record.as_ref())
    }

    /// How long mail for a domain with this record may stay queued.
    pub fn lifetime(&self, record: Option<&Domain>) -> Duration {
        record
            .and_then(|d| d.queue_lifetime)
            .map_or(self.queue_lifetime, Duration::from_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::local::LocalStore;

    fn router(dir: &std::path::Path, routes: &[(&str, &str)]) -> (Router, Arc<LocalStore>) {
        let store = Arc::new(LocalStore::open(dir).unwrap());
        let resolver = crate::dns::HickoryResolver::new(
            &["127.0.0.1:9".parse().unwrap()],
            Duration::from_secs(1),
        )
        .unwrap();
        let router = Router::new(
            SelfIdentity {
                hostname: "mx2.test".into(),
                listen: vec![],
                mx_port: 25,
            },
            routes
                .iter()
                .map(|(d, h)| (d.to_string(), h.to_string()))
                .collect(),
            Duration::from_secs(5 * 86_400),
            Arc::new(resolver),
            store.clone(),
        );
        (router, store)
    }

    #[tokio::test]
    async fn a_hosted_domain_routes_to_its_primary_and_keeps_its_own_lifetime() {
        let dir = tempfile::tempdir().unwrap();
        let (router, store) = router(dir.path(), &[]);
        let name = DomainName::parse("example.test").unwrap();
        let mut d = Domain::new(name.clone());
        d.primary = vec!["127.0.0.1:2525".into()];
        d.queue_lifetime = Some(3600);
        DomainRegistry::put(store.as_ref(), &d).await.unwrap();
        let (record, targets) = router.route_for(&name).await.unwrap();
        assert_eq!(record.as_ref().map(|r| &r.name), Some(&name));
        assert_eq!(targets.len(), 1);
        assert_eq!(targets[0].addrs, vec!["127.0.0.1:2525".parse().unwrap()]);
        assert!(router.explicit(&name, record.as_ref()));
        assert_eq!(router.lifetime_of(&name).await, Duration::from_secs(3600));
    }

    #[tokio::test]
    async fn an_unhosted_domain_has_no_record_and_the_global_lifetime() {
        let dir = tempfile::tempdir().unwrap();
        let (router, _) = router(dir.path(), &[("routed.test", "127.0.0.1:2526")]);
        let routed = DomainName::parse("routed.test").unwrap();
        let (record, targets) = router.route_for(&routed).await.unwrap();
        assert!(record.is_none());
        assert_eq!(targets[0].addrs, vec!["127.0.0.1:2526".parse().unwrap()]);
        assert!(router.explicit(&routed, None));
        let other = DomainName::parse("other.test").unwrap();
        assert!(!router.explicit(&other, None));
        assert_eq!(router.lifetime(None), Duration::from_secs(5 * 86_400));
    }
}
