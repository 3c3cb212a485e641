//! The parsed DNS records the checks reuse between messages (`mail-auth`'s
//! cache hooks): an SPF or DMARC record parsed once serves every message
//! of its domain until its TTL ends, without a resolver lookup or a parse.
//! Each map is bounded: when full it is emptied, so a flood of distinct
//! sender domains costs lookups, never memory.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Instant;

use mail_auth::{ResolverCache, Txt, MX};

use crate::sync::Mutex;

/// Entries per record type.
const CAPACITY: usize = 8192;

/// One record type's entries with the instant each stops being valid.
pub(crate) struct TtlCache<K, V> {
    entries: Mutex<HashMap<K, (V, Instant)>>,
}

impl<K, V> Default for TtlCache<K, V> {
    fn default() -> Self {
        TtlCache {
            entries: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: Hash + Eq, V: Clone> ResolverCache<K, V> for TtlCache<K, V> {
    fn get<Q>(&self, name: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let entries = self.entries.lock();
        entries
            .get(name)
            .filter(|(_, valid_until)| *valid_until > Instant::now())
            .map(|(value, _)| value.clone())
    }

    fn remove<Q>(&self, name: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.entries.lock().remove(name).map(|(value, _)| value)
    }

    fn insert(&self, key: K, value: V, valid_until: Instant) {
        let mut entries = self.entries.lock();
        if entries.len() >= CAPACITY {
            entries.clear();
        }
        entries.insert(key, (value, valid_until));
    }
}

/// The caches of every record type the checks look up.
#[derive(Default)]
pub(crate) struct Caches {
    pub(crate) txt: TtlCache<Box<str>, Txt>,
    pub(crate) mx: TtlCache<Box<str>, mail_auth::RecordSet<MX>>,
    pub(crate) ipv4: TtlCache<Box<str>, mail_auth::RecordSet<Ipv4Addr>>,
    pub(crate) ipv6: TtlCache<Box<str>, mail_auth::RecordSet<Ipv6Addr>>,
    pub(crate) ptr: TtlCache<IpAddr, mail_auth::RecordSet<Box<str>>>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn entries_last_their_ttl_and_a_full_map_starts_over() {
        let cache: TtlCache<Box<str>, u32> = TtlCache::default();
        let later = Instant::now() + Duration::from_secs(60);
        cache.insert("a.example".into(), 1, later);
        cache.insert("gone.example".into(), 2, Instant::now());
        assert_eq!(cache.get("a.example"), Some(1));
        assert_eq!(cache.get("gone.example"), None);
        for i in 0..CAPACITY {
            cache.insert(format!("{i}.example").into(), 3, later);
        }
        assert!(cache.entries.lock().len() <= CAPACITY);
        assert_eq!(cache.remove("a.example"), None, "emptied when full");
    }
}
