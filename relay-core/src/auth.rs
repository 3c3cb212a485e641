//! Sender authentication at the edge: SPF (RFC 7208), DKIM (RFC 6376),
//! DMARC (RFC 7489) and iprev, checked on the real client address, and told
//! to the primary in one `Authentication-Results` header (RFC 8601).
//!
//! A backup MX is the side door: the primary sees our address, not the
//! sender's, so its own SPF check fails for everything we relay. We check
//! what it no longer can, and its filters trust our header (docs/PRIMARY.md).
//!
//! The checks are Stalwart's `mail-auth`, on the resolver the rest of
//! backupmx uses (one cache). SPF and iprev need only the envelope and start
//! at the first recipient ([`Authenticator::early`]), so their DNS overlaps
//! the DATA phase; DKIM and DMARC need the message ([`Authenticator::check`]).
//! A DNS failure is a `temperror`, never a refusal; only a DMARC `fail`
//! under `p=reject` can be refused, and only where the domain says
//! `enforce` ([`Outcome::dmarc_rejects`]). [`header`] edits the message.

mod cache;
pub mod header;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use mail_auth::dmarc::verify::DmarcParameters;
use mail_auth::dmarc::Policy;
use mail_auth::spf::verify::SpfParameters;
use mail_auth::{
    AuthenticatedMessage, AuthenticationResults, DkimOutput, DkimResult, DmarcOutput, DmarcResult,
    IprevOutput, IprevResult, MessageAuthenticator, Parameters, SpfOutput, SpfResult,
};

use crate::smtp::Reply;

/// The longest the checks of one message may take, each stage on its own:
/// a sender waits for our answer to its data meanwhile.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(15);

/// What the session knew when the transaction began.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The real client (behind a PROXY header, the original one).
    pub client_ip: IpAddr,
    /// The name given in HELO/EHLO.
    pub helo: String,
    /// MAIL FROM; empty for the null sender.
    pub sender: String,
}

impl Identity {
    /// The domain SPF checks and DMARC aligns with: the sender's, or the
    /// HELO name for the null sender (RFC 7208 §2.4).
    fn spf_domain(&self) -> &str {
        match self.sender.rsplit_once('@') {
            Some((_, domain)) if !self.sender.is_empty() => domain,
            _ => &self.helo,
        }
    }
}

/// The checks that need only the envelope.
#[derive(Debug, Clone)]
pub struct Early {
    spf: SpfOutput,
    iprev: IprevOutput,
}

/// The checks of one message.
#[derive(Clone)]
pub struct Authenticator {
    inner: MessageAuthenticator,
    hostname: String,
    timeout: Duration,
    caches: Arc<cache::Caches>,
}

/// `params` with our record caches.
macro_rules! cached {
    ($caches:expr, $params:expr) => {
        Parameters::new($params)
            .with_txt_cache(&$caches.txt)
            .with_mx_cache(&$caches.mx)
            .with_ipv4_cache(&$caches.ipv4)
            .with_ipv6_cache(&$caches.ipv6)
            .with_ptr_cache(&$caches.ptr)
    };
}

impl Authenticator {
    /// `inner` wraps the shared resolver ([`crate::dns::HickoryResolver::authenticator`]);
    /// `hostname` is our authserv-id.
    pub fn new(inner: MessageAuthenticator, hostname: impl Into<String>) -> Self {
        Authenticator {
            inner,
            hostname: hostname.into(),
            timeout: DEFAULT_TIMEOUT,
            caches: Arc::default(),
        }
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Our authserv-id: the `hostname` the header names.
    pub fn hostname(&self) -> &str {
        &self.hostname
    }

    /// SPF on MAIL FROM (on HELO for the null sender) and iprev, together.
    pub async fn early(&self, id: &Identity) -> Early {
        let spf = async {
            let params = if id.sender.is_empty() {
                SpfParameters::verify_ehlo(id.client_ip, &id.helo, &self.hostname)
            } else {
                SpfParameters::verify_mail_from(id.client_ip, &id.helo, &self.hostname, &id.sender)
            };
            tokio::time::timeout(
                self.timeout,
                self.inner.verify_spf(cached!(self.caches, params)),
            )
            .await
            .unwrap_or_else(|_| {
                SpfOutput::new(id.spf_domain().to_string()).with_result(SpfResult::TempError)
            })
        };
        let iprev = async {
            tokio::time::timeout(
                self.timeout,
                self.inner.verify_iprev(cached!(self.caches, id.client_ip)),
            )
            .await
            .unwrap_or_else(|_| IprevOutput {
                result: IprevResult::TempError(timed_out()),
                ptr: None,
            })
        };
        let (spf, iprev) = tokio::join!(spf, iprev);
        Early { spf, iprev }
    }

    /// DKIM and DMARC on `message` (as received, our Received header
    /// first), with the envelope's `early` results. `message` is `None`
    /// when it was too big to hold for the check: DKIM is then not
    /// verified and DMARC not evaluated, and nothing is refused.
    pub async fn check(&self, id: &Identity, early: Early, message: Option<&[u8]>) -> Outcome {
        let parsed = message.and_then(AuthenticatedMessage::parse);
        let mut results = AuthenticationResults::new(&self.hostname);
        results = if id.sender.is_empty() {
            results.with_spf_ehlo_result(&early.spf, id.client_ip, &id.helo)
        } else {
            results.with_spf_mailfrom_result(&early.spf, id.client_ip, &id.sender, &id.helo)
        };
        let mut outcome = Outcome {
            header: String::new(),
            spf: spf_label(early.spf.result()),
            dkim: Vec::new(),
            dmarc: None,
            iprev: iprev_label(&early.iprev.result),
        };
        let mut extra = String::new();
        match (&parsed, message) {
            (Some(parsed), _) => {
                let dkim = tokio::time::timeout(
                    self.timeout,
                    self.inner.verify_dkim(cached!(self.caches, parsed)),
                )
                .await
                .unwrap_or_default();
                let from = parsed.from();
                if dkim.is_empty() {
                    extra.push_str(";\r\n\tdkim=none");
                } else {
                    results = results.with_dkim_results(&dkim, from);
                }
                outcome.dkim = dkim.iter().map(DkimSummary::of).collect();
                let dmarc = tokio::time::timeout(
                    self.timeout,
                    self.inner.verify_dmarc(cached!(
                        self.caches,
                        DmarcParameters {
                            message: parsed,
                            dkim_output: &dkim,
                            dkim2_output: None,
                            rfc5321_mail_from_domain: id.spf_domain(),
                            spf_output: &early.spf,
                        }
                    )),
                )
                .await
                .unwrap_or_else(|_| {
                    DmarcOutput::new(from_domain(from).to_string())
                        .with_spf_result(DmarcResult::TempError(timed_out()))
                        .with_dkim_result(DmarcResult::TempError(timed_out()))
                });
                // A message without one From domain has no DMARC to report.
                if !dmarc.domain().is_empty() {
                    let summary = DmarcSummary::of(&dmarc);
                    extra.push_str(&summary.entry());
                    outcome.dmarc = Some(summary);
                }
            }
            (None, Some(_)) => {
                extra.push_str(";\r\n\tdkim=permerror (no header section to verify)")
            }
            (None, None) => {
                extra.push_str(";\r\n\tdkim=neutral (not verified here: message too big)");
            }
        }
        results = results.with_iprev_result(&early.iprev, id.client_ip);
        // The builder writes "hostname;…" with the results in order; the
        // entries it has no builder for go before iprev's.
        let built = results.to_string();
        let body = &built[self.hostname.len()..];
        let (before_iprev, iprev) = body.rsplit_once(";\r\n\tiprev=").unwrap_or((body, ""));
        outcome.header = format!(
            "Authentication-Results: {}{before_iprev}{extra};\r\n\tiprev={iprev}\r\n",
            self.hostname
        );
        outcome
    }
}

fn timed_out() -> mail_auth::Error {
    mail_auth::Error::Dns(mail_auth::DnsError::Resolver("timed out".into()))
}

fn from_domain(from: &str) -> &str {
    from.rsplit_once('@').map_or("", |(_, d)| d)
}

/// What the checks found, for the header, the log and the metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The field to prepend, CRLF-terminated.
    pub header: String,
    pub spf: &'static str,
    pub dkim: Vec<DkimSummary>,
    /// `None` when DMARC was not evaluated (no message, no From).
    pub dmarc: Option<DmarcSummary>,
    pub iprev: &'static str,
}

impl Outcome {
    /// DMARC failed (neither SPF nor DKIM passed aligned, one of them
    /// failed) and the From domain's policy is `reject`. A DNS error is
    /// never a failure.
    pub fn dmarc_rejects(&self) -> bool {
        self.dmarc
            .as_ref()
            .is_some_and(|d| d.result == "fail" && d.policy == "reject")
    }

    /// The DKIM results as one log field (`pass:d=example.org s=sel`, …).
    pub fn dkim_text(&self) -> String {
        if self.dkim.is_empty() {
            return "none".into();
        }
        self.dkim
            .iter()
            .map(|d| format!("{}:d={} s={}", d.result, d.domain, d.selector))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// One DKIM signature's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DkimSummary {
    pub result: &'static str,
    pub domain: String,
    pub selector: String,
}

impl DkimSummary {
    fn of(output: &DkimOutput<'_>) -> DkimSummary {
        DkimSummary {
            result: dkim_label(output.result()),
            domain: output.signature().map(|s| s.d.clone()).unwrap_or_default(),
            selector: output.signature().map(|s| s.s.clone()).unwrap_or_default(),
        }
    }
}

/// DMARC's result for the From domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DmarcSummary {
    /// `pass`, `fail`, `temperror`, `permerror` or `none`.
    pub result: &'static str,
    /// The published policy: `none`, `quarantine` or `reject`.
    pub policy: &'static str,
    /// The RFC 5322 From domain.
    pub from_domain: String,
}

impl DmarcSummary {
    /// RFC 7489 §4.2: a pass of SPF or DKIM, aligned, is a pass; a lookup
    /// error is an error; otherwise, with a policy record, a fail. (The
    /// crate leaves both results empty when neither SPF nor DKIM passed, so
    /// its own header entry would say `none` for what is a failure.)
    fn of(output: &DmarcOutput) -> DmarcSummary {
        let results = [output.spf_result(), output.dkim_result()];
        let any = |f: fn(&DmarcResult) -> bool| results.iter().any(|r| f(r));
        let has_record = output.dmarc_record().is_some();
        let result = if any(|r| *r == DmarcResult::Pass) {
            "pass"
        } else if any(|r| matches!(r, DmarcResult::TempError(_))) {
            "temperror"
        } else if any(|r| matches!(r, DmarcResult::PermError(_))) {
            "permerror"
        } else if has_record {
            "fail"
        } else {
            "none"
        };
        DmarcSummary {
            result,
            policy: match output.policy() {
                Policy::Reject => "reject",
                Policy::Quarantine => "quarantine",
                Policy::None | Policy::Unspecified => "none",
            },
            from_domain: domain_text(output.domain()),
        }
    }

    /// The header entry (RFC 8601 §2.7.4, with RFC 7489's `policy.dmarc`).
    fn entry(&self) -> String {
        format!(
            ";\r\n\tdmarc={} header.from={} policy.dmarc={}",
            self.result, self.from_domain, self.policy
        )
    }
}

/// A domain from the message, safe in a header field and an SMTP reply:
/// a From domain is the sender's to choose.
fn domain_text(domain: &str) -> String {
    let clean: String = domain
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
        .take(253)
        .collect();
    if clean.is_empty() {
        "unknown".into()
    } else {
        clean
    }
}

/// The refusal of a message whose From domain asks for it: `550 5.7.1`
/// after DATA, naming DMARC and the domain.
pub fn refusal(dmarc: &DmarcSummary) -> Reply {
    Reply::new(
        550,
        "5.7.1",
        format!(
            "Message rejected: it fails DMARC and {} publishes p=reject (neither SPF nor DKIM passes aligned with its From)",
            dmarc.from_domain
        ),
    )
}

fn spf_label(r: SpfResult) -> &'static str {
    match r {
        SpfResult::Pass => "pass",
        SpfResult::Fail => "fail",
        SpfResult::SoftFail => "softfail",
        SpfResult::Neutral => "neutral",
        SpfResult::TempError => "temperror",
        SpfResult::PermError => "permerror",
        SpfResult::None => "none",
    }
}

fn dkim_label(r: &DkimResult) -> &'static str {
    match r {
        DkimResult::Pass => "pass",
        DkimResult::Neutral(_) => "neutral",
        DkimResult::Fail(_) => "fail",
        DkimResult::PermError(_) => "permerror",
        DkimResult::TempError(_) => "temperror",
        DkimResult::None => "none",
    }
}

fn iprev_label(r: &IprevResult) -> &'static str {
    match r {
        IprevResult::Pass => "pass",
        IprevResult::Fail(_) => "fail",
        IprevResult::TempError(_) => "temperror",
        IprevResult::PermError(_) => "permerror",
        IprevResult::None => "none",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(result: &'static str, policy: &'static str) -> Outcome {
        Outcome {
            header: String::new(),
            spf: "fail",
            dkim: Vec::new(),
            dmarc: Some(DmarcSummary {
                result,
                policy,
                from_domain: "example.org".into(),
            }),
            iprev: "pass",
        }
    }

    #[test]
    fn only_a_dmarc_fail_under_reject_is_refused() {
        assert!(summary("fail", "reject").dmarc_rejects());
        for (result, policy) in [
            ("fail", "quarantine"),
            ("fail", "none"),
            ("temperror", "reject"),
            ("permerror", "reject"),
            ("pass", "reject"),
            ("none", "reject"),
        ] {
            assert!(
                !summary(result, policy).dmarc_rejects(),
                "{result} {policy}"
            );
        }
        let mut unchecked = summary("fail", "reject");
        unchecked.dmarc = None;
        assert!(!unchecked.dmarc_rejects());
    }

    #[test]
    fn the_refusal_names_dmarc_and_the_from_domain() {
        let reply = refusal(summary("fail", "reject").dmarc.as_ref().unwrap());
        let text = reply.to_string();
        assert!(text.starts_with("550 5.7.1 "), "{text}");
        assert!(
            text.contains("DMARC") && text.contains("example.org"),
            "{text}"
        );
    }

    #[test]
    fn a_pass_of_either_passes_and_a_dns_error_is_not_a_failure() {
        let out = |spf: DmarcResult, dkim: DmarcResult| {
            DmarcOutput::new("example.org".into())
                .with_spf_result(spf)
                .with_dkim_result(dkim)
        };
        let nothing = || out(DmarcResult::None, DmarcResult::None);
        // No policy record: DMARC does not apply. (A failure under a
        // published policy needs its DNS: tests/tests/sender_auth.rs.)
        assert_eq!(DmarcSummary::of(&nothing()).result, "none");
        let not_aligned = || DmarcResult::Fail(mail_auth::Error::NotAligned);
        assert_eq!(
            DmarcSummary::of(&out(not_aligned(), DmarcResult::Pass)).result,
            "pass"
        );
        assert_eq!(
            DmarcSummary::of(&out(DmarcResult::TempError(timed_out()), not_aligned())).result,
            "temperror"
        );
    }

    #[test]
    fn from_domains_cannot_inject_into_the_header_or_the_reply() {
        assert_eq!(
            domain_text("evil.example\r\nX-Injected: 1"),
            "evil.exampleX-Injected1"
        );
        assert_eq!(domain_text("a b;c=d"), "abcd");
        assert_eq!(domain_text("\r\n"), "unknown");
        let dmarc = DmarcSummary {
            result: "fail",
            policy: "reject",
            from_domain: domain_text("x.example\r\n250 ok"),
        };
        assert!(!dmarc.entry().contains("\r\n2"));
        assert!(!refusal(&dmarc).to_string().contains("\r\n2"));
    }

    #[test]
    fn the_null_sender_is_checked_on_its_helo_name() {
        let id = Identity {
            client_ip: "192.0.2.1".parse().unwrap(),
            helo: "mail.example.net".into(),
            sender: String::new(),
        };
        assert_eq!(id.spf_domain(), "mail.example.net");
        let id = Identity {
            sender: "a@example.org".into(),
            ..id
        };
        assert_eq!(id.spf_domain(), "example.org");
    }
}
