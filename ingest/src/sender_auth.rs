//! Sender authentication's place in a session (relay_core::auth has the
//! checks): SPF and iprev start at the first recipient whose domain wants
//! them, so their DNS runs while the client sends its data; DKIM and DMARC
//! run when the data is in, before the content filter and the store. One
//! log line and the metrics per message; the message goes on with our
//! header, or the client gets the DMARC refusal as the reply to its data.

use std::sync::Arc;

use relay_core::address::DomainName;
use relay_core::auth::{Authenticator, Early, Identity};
use relay_core::budget::MemoryBudget;
use relay_core::domain::AuthPolicy;
use relay_core::queue::AcceptedMessage;
use relay_core::smtp::Reply;

/// A spooled message bigger than this is not read back for DKIM (it is
/// annotated as not verified, and never refused).
const MAX_VERIFIED_SIZE: u64 = 32 * 1024 * 1024;

/// One transaction's checks: the policy of each accepted recipient's
/// domain, and the envelope checks under way.
#[derive(Default)]
pub(crate) struct Transaction {
    policies: Vec<(DomainName, AuthPolicy)>,
    early: Option<(Identity, tokio::task::JoinHandle<Early>)>,
}

impl Transaction {
    /// A recipient of `domain` was accepted: its checks start with the
    /// first recipient that wants them.
    pub(crate) fn recipient_accepted(
        &mut self,
        auth: &Arc<Authenticator>,
        domain: &DomainName,
        policy: AuthPolicy,
        identity: Identity,
    ) {
        if policy == AuthPolicy::Off {
            return;
        }
        if !self.policies.iter().any(|(d, _)| d == domain) {
            self.policies.push((domain.clone(), policy));
        }
        if self.early.as_ref().is_some_and(|(id, _)| *id == identity) {
            return;
        }
        if let Some((_, task)) = self.early.take() {
            task.abort();
        }
        let auth = auth.clone();
        let id = identity.clone();
        let task = tokio::spawn(async move { auth.early(&id).await });
        self.early = Some((identity, task));
    }
}

impl Drop for Transaction {
    fn drop(&mut self) {
        if let Some((_, task)) = self.early.take() {
            task.abort();
        }
    }
}

/// Checks `message` for the domains of `transaction` that want it; `Err`
/// is the refusal to send, `Ok` the header to add ([`annotate`]), if any.
pub(crate) async fn check(
    auth: &Authenticator,
    mut transaction: Transaction,
    message: &AcceptedMessage,
    memory: &MemoryBudget,
) -> Result<Option<String>, Reply> {
    let policies: Vec<AuthPolicy> = message
        .recipients
        .iter()
        .filter_map(|r| {
            transaction
                .policies
                .iter()
                .find(|(d, _)| *d == r.domain)
                .map(|(_, p)| *p)
        })
        .collect();
    if policies.is_empty() {
        return Ok(None);
    }
    let identity = Identity {
        client_ip: message.client_ip,
        helo: message.helo.clone(),
        sender: message.sender.clone(),
    };
    let early = match transaction.early.take() {
        Some((id, task)) if id == identity => match task.await {
            Ok(early) => early,
            Err(_) => auth.early(&identity).await,
        },
        _ => auth.early(&identity).await,
    };
    let outcome = match &message.spooled {
        None => auth.check(&identity, early, Some(&message.body)).await,
        Some(spooled) if spooled.len <= MAX_VERIFIED_SIZE && memory.try_reserve(spooled.len) => {
            let read = tokio::fs::read(&spooled.path).await;
            let outcome = auth.check(&identity, early, read.as_deref().ok()).await;
            drop(read);
            memory.release(spooled.len);
            outcome
        }
        Some(_) => auth.check(&identity, early, None).await,
    };
    record(message, &outcome);
    // The whole message is refused only if every recipient's domain
    // enforces, and never mail to postmaster@ or abuse@ (RFC 5321 §4.5.1,
    // RFC 2142).
    let enforced = policies.iter().all(|p| *p == AuthPolicy::Enforce)
        && !message.recipients.iter().any(|r| {
            r.address.rsplit_once('@').is_some_and(|(local, _)| {
                local.eq_ignore_ascii_case("postmaster") || local.eq_ignore_ascii_case("abuse")
            })
        });
    if let (true, Some(dmarc)) = (enforced && outcome.dmarc_rejects(), &outcome.dmarc) {
        metrics::counter!("backupmx_dmarc_rejections_total").increment(1);
        return Err(relay_core::auth::refusal(dmarc));
    }
    Ok(Some(outcome.header))
}

/// Adds `header` (ours) first in the message, and removes the
/// `Authentication-Results` fields that claim our name.
pub(crate) async fn annotate(auth: &Authenticator, message: &mut AcceptedMessage, header: String) {
    let ours = header.into_bytes();
    let hostname = auth.hostname().to_string();
    let queue_id = message.id.clone();
    let edited = crate::filtering::edit_header_section(message, move |head| {
        let (edited, removed) = relay_core::auth::header::annotate(head, &ours, &hostname);
        if removed > 0 {
            tracing::info!(event = "auth_results_removed", queue_id = %queue_id, removed,
                "removed Authentication-Results fields that claimed our hostname");
        }
        edited
    })
    .await;
    if let Err(e) = edited {
        // The header is a courtesy: the message is kept as it came.
        tracing::warn!(event = "auth_header_not_added", queue_id = %message.id, error = %e);
    }
}

fn record(message: &AcceptedMessage, outcome: &relay_core::auth::Outcome) {
    let count = |method: &'static str, result: &'static str| {
        metrics::counter!("backupmx_auth_results_total", "method" => method, "result" => result)
            .increment(1);
    };
    count("spf", outcome.spf);
    if outcome.dkim.is_empty() {
        count("dkim", "none");
    }
    for d in &outcome.dkim {
        count("dkim", d.result);
    }
    if let Some(d) = &outcome.dmarc {
        count("dmarc", d.result);
    }
    count("iprev", outcome.iprev);
    let (dmarc, policy, from_domain) = outcome
        .dmarc
        .as_ref()
        .map_or(("not_evaluated", "", ""), |d| {
            (d.result, d.policy, d.from_domain.as_str())
        });
    tracing::info!(event = "auth_result", queue_id = %message.id, client_ip = %message.client_ip,
        from = %message.sender, spf = outcome.spf, dkim = %outcome.dkim_text(), dmarc,
        dmarc_policy = policy, header_from = from_domain, iprev = outcome.iprev);
}
