//! A command channel to a domain's next hop, set up under the same TLS
//! rules as its mail: the domain's `tls` policy raised by MTA-STS and
//! DANE. Recipient callouts use it, so a domain whose mail may only go
//! over authenticated TLS never has its recipients asked about in the
//! clear (nor its answers forged by whoever sits on the path).

use crate::address::DomainName;
use crate::time::unix_seconds;

use super::client::Response;
use super::hops::{Hops, Purpose};
use super::storm::Asked;
use super::transport::Channel;
use super::Engine;

/// Why no channel to a domain's next hop could be opened.
#[derive(Debug, PartialEq, Eq)]
pub enum ChannelError {
    /// A next hop answered, but refused to talk (greeting or EHLO).
    Refused(Response),
    /// A next hop answered, but the TLS its policy requires could not be
    /// had (no STARTTLS, a certificate that does not verify, no host the
    /// MTA-STS policy names).
    TlsPolicy(String),
    /// No next hop could be reached (or none is known).
    Unreachable(String),
}

impl Engine {
    /// Asks `domain`'s next hop whether it takes mail for `addresses`
    /// (`MAIL FROM:<>`, one `RCPT TO` each, `QUIT`) without sending any:
    /// the bounce-storm guard's question about known-good recipients.
    pub(crate) async fn ask_recipients(
        &self,
        domain: &DomainName,
        addresses: Vec<String>,
    ) -> Vec<(String, Asked)> {
        let inconclusive = |addresses: Vec<String>| {
            addresses
                .into_iter()
                .map(|a| (a, Asked::Inconclusive))
                .collect()
        };
        let Ok(mut channel) = self.open_channel(domain).await else {
            return inconclusive(addresses);
        };
        match channel.command("MAIL FROM:<>").await {
            Ok(r) if r.is_success() => {}
            _ => {
                let _ = channel.command("QUIT").await;
                return inconclusive(addresses);
            }
        }
        let mut answers = Vec::with_capacity(addresses.len());
        for address in addresses {
            let asked = match channel.command(&format!("RCPT TO:<{address}>")).await {
                Ok(r) if r.is_success() => Asked::Accepted,
                Ok(r) if r.is_permanent() => Asked::Refused,
                Ok(_) => Asked::Inconclusive,
                Err(_) => {
                    answers.push((address, Asked::Inconclusive));
                    break;
                }
            };
            answers.push((address, asked));
        }
        let _ = channel.command("QUIT").await;
        answers
    }

    /// Opens a channel to `domain`'s next hops in delivery order, each
    /// with the TLS its plan asks for. As deliveries do, an opportunistic
    /// handshake that fails is retried in the clear.
    pub async fn open_channel(&self, domain: &DomainName) -> Result<Channel, ChannelError> {
        let (record, targets) = self
            .router
            .route_for(domain)
            .await
            .map_err(|e| ChannelError::Unreachable(format!("no route: {e}")))?;
        let now = unix_seconds(std::time::SystemTime::now());
        let explicit = self.router.explicit(domain, record.as_ref());
        let plans = self
            .hops
            .plans(domain, record.as_ref(), explicit, targets, now, &[])
            .await
            .map_err(ChannelError::TlsPolicy)?;
        let helo = &self.cfg.me.hostname;
        let mut failure = ChannelError::Unreachable("no address to connect to".into());
        for (target, plan) in &plans {
            // MTA-STS testing: the domain's own policy when the verified
            // connection fails (reported, as for its mail).
            let fallback = Hops::fallback_of(plan);
            for addr in &target.addrs {
                let open = |tls| Channel::open(*addr, &target.host, helo, tls, &self.hops.timeouts);
                let (attempt, _) = self
                    .hops
                    .try_address(
                        domain,
                        target,
                        *addr,
                        (plan, fallback.as_ref()),
                        Purpose::Callout,
                        open,
                    )
                    .await;
                match attempt {
                    Ok(channel) => return Ok(channel),
                    Err(f) if f.tls_policy_failed => failure = ChannelError::TlsPolicy(f.why),
                    Err(f) => match f.refusal {
                        Some(r) => return Err(ChannelError::Refused(r)),
                        // A hop that answered without meeting the policy
                        // says more than one that did not answer.
                        None if matches!(failure, ChannelError::TlsPolicy(_)) => {}
                        None => failure = ChannelError::Unreachable(f.why),
                    },
                }
            }
        }
        Err(failure)
    }
}
