//! What deliveries and callouts observe of a primary, written where every
//! process sees it: whether the primary answered (its shared state) and
//! which recipients it took or refused (the callout cache).
//!
//! A leaf under delivery and recipient verification alike (Postfix's
//! verify(8) idea): a delivery attempt hands its observations here, and
//! the recipient verifier reads them back, so neither imports the other.

use std::time::Duration;

use crate::address::DomainName;
use crate::domain::{Domain, RecipientVerify};
use crate::store::RecipientCache;
use crate::verify::{is_unknown_user_text, CachedRecipient, LearntFrom, PrimaryState, Verdict};
use relay_proto::client::RcptResult;

/// A primary's state is written again only when it changed or when the
/// stored observation is this old: an observation per callout or per
/// delivery would cost a write each.
const OBSERVATION_REFRESH_SECS: u64 = 10;

/// Records what was seen of `domain`'s primary at `now`, unless the stored
/// state already says so and is recent.
pub async fn observe_primary(
    cache: &dyn RecipientCache,
    domain: &DomainName,
    up: bool,
    now: u64,
) -> Option<PrimaryState> {
    let previous = match cache.primary_state(domain).await {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(event = "primary_state_unreadable", domain = %domain, error = %crate::error::Report(&e));
            return None;
        }
    };
    if let Some(p) = previous {
        if p.up == up && now.saturating_sub(p.observed) < OBSERVATION_REFRESH_SECS {
            return Some(p);
        }
    }
    let state = PrimaryState::observe(previous, up, now);
    if previous.is_none_or(|p| p.up != up) {
        tracing::info!(event = "primary_state", domain = %domain, up);
    }
    if let Err(e) = cache.put_primary_state(domain, &state).await {
        tracing::warn!(event = "primary_state_not_stored", domain = %domain, error = %crate::error::Report(&e));
    }
    Some(state)
}

/// Learns a verdict (from a callout or a delivery).
pub async fn learn(
    cache: &dyn RecipientCache,
    domain: &DomainName,
    address: &str,
    verdict: Verdict,
    learnt: LearntFrom,
    ttl: Duration,
    now: u64,
) {
    let entry = CachedRecipient {
        address: address.to_lowercase(),
        verdict,
        learnt,
        learnt_at: now,
        expires: now + ttl.as_secs(),
    };
    if let Err(e) = cache.put_recipient(domain, &entry).await {
        tracing::warn!(event = "recipient_cache_not_stored", rcpt = %address, error = %crate::error::Report(&e));
    }
}

/// What delivery results teach: a recipient the primary took is valid,
/// one it refused as unknown invalid, and whether the primary answered.
#[derive(Clone)]
pub struct Learning {
    pub cache: std::sync::Arc<dyn RecipientCache>,
    pub valid_ttl: Duration,
    pub invalid_ttl: Duration,
}

/// What one delivery result teaches about its recipient, with how long it
/// counts; `None`: nothing (a temporary failure, or a refusal for another
/// reason than an unknown user).
pub fn verdict_of(learning: &Learning, result: &RcptResult) -> Option<(Verdict, Duration)> {
    match result {
        RcptResult::Delivered(_) => Some((Verdict::Valid, learning.valid_ttl)),
        RcptResult::Permanent(text) if is_unknown_user_text(text) => {
            Some((Verdict::Invalid, learning.invalid_ttl))
        }
        _ => None,
    }
}

impl Learning {
    /// What one attempt to a hosted domain taught: per recipient address,
    /// its result; `answered` whether the primary took part at all. Only
    /// domains that verify recipients or defer while the primary is up
    /// keep any of it.
    pub async fn teach(
        &self,
        record: &Domain,
        results: &[(&str, &RcptResult)],
        answered: bool,
        now: u64,
    ) {
        let verifies = record.recipient_verify == RecipientVerify::Callout;
        if !verifies && !record.defer_while_primary_up {
            return;
        }
        observe_primary(self.cache.as_ref(), &record.name, answered, now).await;
        if !verifies {
            return;
        }
        for (address, result) in results {
            if let Some((verdict, ttl)) = verdict_of(self, result) {
                learn(
                    self.cache.as_ref(),
                    &record.name,
                    address,
                    verdict,
                    LearntFrom::Delivery,
                    ttl,
                    now,
                )
                .await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::local::LocalStore;

    fn learning(dir: &std::path::Path) -> Learning {
        Learning {
            cache: std::sync::Arc::new(LocalStore::open(dir).unwrap()),
            valid_ttl: Duration::from_secs(100),
            invalid_ttl: Duration::from_secs(10),
        }
    }

    #[test]
    fn a_delivery_teaches_valid_an_unknown_user_invalid_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let l = learning(dir.path());
        let delivered = RcptResult::Delivered("250 ok".into());
        let unknown = RcptResult::Permanent("550 5.1.1 <a@x>: user unknown".into());
        let policy = RcptResult::Permanent("550 5.7.1 spam".into());
        let later = RcptResult::Transient("451 4.3.0 try later".into());
        assert_eq!(
            verdict_of(&l, &delivered),
            Some((Verdict::Valid, l.valid_ttl))
        );
        assert_eq!(
            verdict_of(&l, &unknown),
            Some((Verdict::Invalid, l.invalid_ttl))
        );
        assert_eq!(verdict_of(&l, &policy), None);
        assert_eq!(verdict_of(&l, &later), None);
    }

    #[tokio::test]
    async fn only_verifying_domains_keep_recipients_and_a_state_is_written_once() {
        let dir = tempfile::tempdir().unwrap();
        let l = learning(dir.path());
        let name = DomainName::parse("example.test").unwrap();
        let mut record = Domain::new(name.clone());
        let ok = RcptResult::Delivered("250 ok".into());
        l.teach(&record, &[("a@example.test", &ok)], true, 1000)
            .await;
        assert_eq!(l.cache.primary_state(&name).await.unwrap(), None);
        record.recipient_verify = RecipientVerify::Callout;
        l.teach(&record, &[("A@example.test", &ok)], true, 1000)
            .await;
        let state = l.cache.primary_state(&name).await.unwrap().unwrap();
        assert!(state.up);
        let cached = l.cache.recipient("a@example.test", 1001).await.unwrap();
        assert_eq!(cached.map(|c| c.verdict), Some(Verdict::Valid));
        // Seen up again a moment later: not written again.
        let again = observe_primary(l.cache.as_ref(), &name, true, 1005)
            .await
            .unwrap();
        assert_eq!(again.observed, state.observed);
    }
}
