//! Relay control: which recipients we accept mail for (RFC 5321 §3.6).
//!
//! We are an open relay for nobody: a recipient is accepted only for an
//! enabled hosted domain, and only for listed users where the domain has a
//! list. Later filters (greylisting, DNSBL) hook in here in order.

use crate::address::Mailbox;
use crate::smtp::{RcptVerdict, Reply};
use crate::store::DomainRegistry;

/// Decides on one recipient.
pub async fn check_recipient(registry: &dyn DomainRegistry, rcpt: &Mailbox) -> RcptVerdict {
    let deny = || {
        RcptVerdict::Reject(Reply::new(
            550,
            "5.7.1",
            format!("<{rcpt}>: Relay access denied"),
        ))
    };
    let Some(domain) = rcpt.domain() else {
        return deny();
    };
    let record = match registry.get(domain).await {
        Ok(Some(d)) if d.enabled => d,
        Ok(_) => return deny(),
        Err(e) => {
            tracing::warn!(event = "domain_lookup_failed", domain = %domain, error = %e);
            return RcptVerdict::Reject(Reply::new(
                451,
                "4.3.0",
                "Temporary lookup failure, try again later",
            ));
        }
    };
    if rcpt.has_routing_characters() {
        // The primary may trust us and honour `%`/`!`/quoted-`@` routing.
        return RcptVerdict::Reject(Reply::new(
            550,
            "5.7.1",
            format!("<{rcpt}>: Sender-specified routing is not accepted"),
        ));
    }
    if !record.accepts_recipient(rcpt) {
        return RcptVerdict::Reject(Reply::new(
            550,
            "5.1.1",
            format!("<{rcpt}>: Recipient address rejected: User unknown"),
        ));
    }
    RcptVerdict::Accept {
        domain: record.name,
        max_message_size: record.max_message_size,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::address::parse_forward_path;
    use crate::domain::Domain;
    use crate::store::local::LocalStore;

    async fn verdict(reg: &LocalStore, rcpt: &str) -> String {
        match check_recipient(reg, &parse_forward_path(rcpt).unwrap()).await {
            RcptVerdict::Accept { domain, .. } => format!("accept {domain}"),
            RcptVerdict::Reject(r) => format!("{} {}", r.code, r.status),
        }
    }

    #[tokio::test]
    async fn relay_control_table() {
        let dir = tempfile::tempdir().unwrap();
        let reg = LocalStore::open(dir.path()).unwrap();
        reg.put(&Domain::from_parts("open.test", &[], None).unwrap())
            .await
            .unwrap();
        reg.put(
            &Domain::from_parts("listed.test", &[], Some(&["known@listed.test".into()])).unwrap(),
        )
        .await
        .unwrap();
        let mut off = Domain::from_parts("off.test", &[], None).unwrap();
        off.enabled = false;
        reg.put(&off).await.unwrap();
        let cases = [
            ("anyone@open.test", "accept open.test"),
            ("Anyone@OPEN.TEST.", "accept open.test"),
            ("known@listed.test", "accept listed.test"),
            ("KNOWN@listed.test", "accept listed.test"),
            ("stranger@listed.test", "550 5.1.1"),
            ("victim@elsewhere.test", "550 5.7.1"),
            ("user@off.test", "550 5.7.1"),
            ("user@[127.0.0.1]", "550 5.7.1"),
            ("user%elsewhere.test@open.test", "550 5.7.1"),
            ("elsewhere.test!user@open.test", "550 5.7.1"),
            ("\"user@elsewhere.test\"@open.test", "550 5.7.1"),
            ("@open.test:user@elsewhere.test", "550 5.7.1"),
            ("@elsewhere.test:user@open.test", "accept open.test"),
            ("user@open.test.elsewhere.test", "550 5.7.1"),
            ("user@sub.open.test", "550 5.7.1"),
        ];
        for (rcpt, expected) in cases {
            assert_eq!(verdict(&reg, rcpt).await, expected, "{rcpt}");
        }
    }
}
