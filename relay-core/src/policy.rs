//! Recipient policy, in the order the SPEC gives: DNSBL on the client
//! address, then relay control, then greylisting.
//!
//! We are an open relay for nobody: a recipient is accepted only for an
//! enabled hosted domain, and only for listed users where the domain has a
//! list. `postmaster@` and `abuse@` are never blocked by DNSBL or
//! greylisting (RFC 2142), so a listed sender can still reach a human.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use crate::address::{DomainName, Mailbox, ReversePath};
use crate::dnsbl::{Dnsbl, Verdict};
use crate::domain::{Domain, RecipientVerify};
use crate::greylist::{Decision, Greylist, GreylistStore, PassReason};
use crate::harvest::{Counted, HarvestGuard};
use crate::history::Refusal;
use crate::recipients::RecipientVerifier;
use crate::smtp::{RcptVerdict, Reply};
use crate::store::DomainRegistry;
use crate::time::unix_seconds;

/// Relay control alone: the hosted domain record, or the rejection.
pub async fn relay_check(registry: &dyn DomainRegistry, rcpt: &Mailbox) -> Result<Domain, Reply> {
    let deny = || Reply::new(550, "5.7.1", format!("<{rcpt}>: Relay access denied"));
    let Some(domain) = rcpt.domain() else {
        return Err(deny());
    };
    let record = match registry.get(domain).await {
        Ok(Some(d)) if d.enabled => d,
        Ok(_) => return Err(deny()),
        Err(e) => {
            tracing::warn!(event = "domain_lookup_failed", domain = %domain, error = %crate::error::Report(&e));
            return Err(Reply::new(
                451,
                "4.3.0",
                "Temporary lookup failure, try again later",
            ));
        }
    };
    if rcpt.has_routing_characters() {
        // The primary may trust us and honour `%`/`!`/quoted-`@` routing.
        return Err(Reply::new(
            550,
            "5.7.1",
            format!("<{rcpt}>: Sender-specified routing is not accepted"),
        ));
    }
    // With callouts, a recipient outside the static list is the verifier's
    // to decide (Policy::check).
    if record.recipient_verify != RecipientVerify::Callout && !record.accepts_recipient(rcpt) {
        return Err(Reply::new(
            550,
            "5.1.1",
            format!("<{rcpt}>: Recipient address rejected: User unknown"),
        ));
    }
    Ok(record)
}

/// Relay control as a verdict (no DNSBL, no greylisting).
pub async fn check_recipient(registry: &dyn DomainRegistry, rcpt: &Mailbox) -> RcptVerdict {
    match relay_check(registry, rcpt).await {
        Ok(d) => RcptVerdict::Accept {
            domain: d.name,
            max_message_size: d.max_message_size,
        },
        Err(r) => RcptVerdict::Reject(r),
    }
}

fn is_role_account(rcpt: &Mailbox) -> bool {
    rcpt.local.eq_ignore_ascii_case("postmaster") || rcpt.local.eq_ignore_ascii_case("abuse")
}

/// The DNSBL lookups of one connection: started when the client connects,
/// awaited at the first RCPT that needs them.
pub struct ClientLookups {
    pending: Option<tokio::task::JoinHandle<Verdict>>,
    verdict: Option<Verdict>,
}

impl ClientLookups {
    pub fn start(dnsbl: Option<&Arc<Dnsbl>>, ip: IpAddr) -> Self {
        let pending = dnsbl.filter(|d| !d.is_empty()).map(|d| {
            let d = d.clone();
            tokio::spawn(async move { d.check(ip).await })
        });
        ClientLookups {
            pending,
            verdict: None,
        }
    }

    /// A session whose address changed (PROXY protocol) starts over.
    pub fn none() -> Self {
        ClientLookups {
            pending: None,
            verdict: Some(Verdict::default()),
        }
    }

    pub async fn verdict(&mut self) -> &Verdict {
        if self.verdict.is_none() {
            let v = match self.pending.take() {
                Some(h) => h.await.unwrap_or_else(|e| {
                    // Fails open like any DNSBL error, but is not silent.
                    metrics::counter!("backupmx_dnsbl_task_failures_total").increment(1);
                    tracing::error!(event = "dnsbl_task_failed", error = %crate::error::Report(&e));
                    Verdict::default()
                }),
                None => Verdict::default(),
            };
            self.verdict = Some(v);
        }
        self.verdict.get_or_insert_with(Verdict::default)
    }
}

/// Everything that decides on a recipient.
pub struct Policy {
    pub registry: Arc<dyn DomainRegistry>,
    /// `None` when greylisting is off globally.
    pub greylist: Option<Greylist<dyn GreylistStore>>,
    pub dnsbl: Option<Arc<Dnsbl>>,
    /// Callouts and defer-while-primary-up; `None` where no delivery route
    /// can be computed (then a static list decides as without callouts).
    pub verifier: Option<Arc<RecipientVerifier>>,
    /// Unknown-recipient penalties per client (shared with the verifier,
    /// which also takes its callout rates from it).
    pub harvest: Arc<HarvestGuard>,
}

/// The verdict on a recipient, and what its domain wants done with its
/// mail: scanned by the content filter (the domain's `filter` switch), and
/// its sender authenticated (`auth`).
#[derive(Debug)]
pub struct Checked {
    pub verdict: RcptVerdict,
    pub filter: bool,
    pub auth: crate::domain::AuthPolicy,
    /// A refusal of mail for a domain we may host, and why: what its
    /// outage history counts (relay refusals name no domain of ours).
    pub refusal: Option<(DomainName, Refusal)>,
}

impl Checked {
    fn refused(reply: Reply) -> Checked {
        Checked {
            verdict: RcptVerdict::Reject(reply),
            filter: false,
            auth: crate::domain::AuthPolicy::Off,
            refusal: None,
        }
    }

    /// A refusal counted for `rcpt`'s domain as `why`.
    fn refused_as(reply: Reply, rcpt: &Mailbox, why: Refusal) -> Checked {
        Checked {
            refusal: rcpt.domain().map(|d| (d.clone(), why)),
            ..Checked::refused(reply)
        }
    }

    /// A refusal from relay control or recipient verification: counted
    /// when it says "no such user".
    fn refused_unless_relay(reply: Reply, rcpt: &Mailbox) -> Checked {
        if reply.status == "5.1.1" {
            Checked::refused_as(reply, rcpt, Refusal::UnknownUser)
        } else {
            Checked::refused(reply)
        }
    }
}

fn unknown_user(rcpt: &Mailbox) -> Reply {
    Reply::new(
        550,
        "5.1.1",
        format!("<{rcpt}>: Recipient address rejected: User unknown"),
    )
}

fn harvest_refusal(rcpt: &Mailbox) -> Reply {
    Reply::new(
        451,
        "4.7.1",
        format!("<{rcpt}>: too many unknown recipients from your address, try again later"),
    )
}

impl Policy {
    /// Passes `reply` through, counting it against `client` when it says
    /// "no such user" (`5.1.1`): the unknown-recipient penalty.
    fn counted(&self, client: IpAddr, reply: Reply) -> Reply {
        if reply.status != "5.1.1" {
            return reply;
        }
        let s = self.harvest.settings();
        if self.harvest.unknown_recipient(client, Instant::now()) == Counted::PenaltyStarts {
            metrics::counter!("backupmx_harvest_penalties_total").increment(1);
            tracing::warn!(event = "harvest_penalty", client = %client,
                unknown = s.unknown_recipient_limit, window = ?s.unknown_recipient_window, penalty = ?s.penalty,
                "too many unknown recipients from one client: its new sessions get 421, its recipients 451");
        }
        reply
    }

    pub async fn check(
        &self,
        client: IpAddr,
        lookups: &mut ClientLookups,
        sender: &ReversePath,
        rcpt: &Mailbox,
        now: SystemTime,
    ) -> Checked {
        let role = is_role_account(rcpt);
        let mut allowlisted = false;
        if let Some(dnsbl) = &self.dnsbl {
            let verdict = lookups.verdict().await;
            allowlisted = verdict.allowlisted;
            if !role && verdict.rejects(dnsbl.threshold) {
                let zones: Vec<&str> = verdict.listed.iter().map(|(z, _)| z.as_str()).collect();
                tracing::info!(event = "dnsbl_reject", client = %client, zones = ?zones, score = verdict.score);
                return Checked::refused_as(
                    Reply::new(
                        554,
                        "5.7.1",
                        format!(
                            "Service unavailable; client [{client}] blocked using {}",
                            zones.join(", ")
                        ),
                    ),
                    rcpt,
                    Refusal::Dnsbl,
                );
            }
        }
        if !role && self.harvest.penalised(client, Instant::now()) {
            metrics::counter!("backupmx_harvest_refusals_total").increment(1);
            return Checked::refused_as(harvest_refusal(rcpt), rcpt, Refusal::UnknownUser);
        }
        let domain = match relay_check(self.registry.as_ref(), rcpt).await {
            Ok(d) => d,
            Err(r) => return Checked::refused_unless_relay(self.counted(client, r), rcpt),
        };
        if !role {
            match &self.verifier {
                Some(v) => {
                    if let Some(r) = v.check(&domain, rcpt, client, now).await {
                        return Checked::refused_unless_relay(self.counted(client, r), rcpt);
                    }
                }
                None if !domain.accepts_recipient(rcpt) => {
                    return Checked::refused_as(
                        self.counted(client, unknown_user(rcpt)),
                        rcpt,
                        Refusal::UnknownUser,
                    );
                }
                None => {}
            }
        } else if !domain.accepts_recipient(rcpt) && self.verifier.is_none() {
            return Checked::refused_as(unknown_user(rcpt), rcpt, Refusal::UnknownUser);
        }
        if let Some(grey) = &self.greylist {
            if domain.greylist && !allowlisted {
                let decision = grey.check(client, sender, rcpt, unix_seconds(now)).await;
                let label = match decision {
                    Decision::Defer => "defer",
                    Decision::Pass(PassReason::StoreError) => "error",
                    Decision::Pass(_) => "pass",
                };
                metrics::counter!("backupmx_greylist_total", "result" => label).increment(1);
                if decision == Decision::Defer {
                    // RFC 6647 §2.2: a 4xx; no hint of the seconds left.
                    return Checked::refused_as(
                        Reply::new(
                            450,
                            "4.2.0",
                            format!("<{rcpt}>: Recipient address rejected: Greylisted, please try again later"),
                        ),
                        rcpt,
                        Refusal::Greylist,
                    );
                }
            } else if allowlisted {
                metrics::counter!("backupmx_greylist_total", "result" => "allowlisted")
                    .increment(1);
            }
        }
        Checked {
            filter: domain.filter,
            auth: domain.auth,
            refusal: None,
            verdict: RcptVerdict::Accept {
                domain: domain.name,
                max_message_size: domain.max_message_size,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::address::parse_forward_path;
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
