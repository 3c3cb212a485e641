//! `backupmx doctor DOMAIN`: is the domain set up so that its backup MX
//! works when the primary is down, and does not weaken it while it is up?
//! Each check says ok, warn or fail, what it saw, and the fix in one line.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use serde::Serialize;
use tokio::io::AsyncWriteExt;

use crate::address::DomainName;
use crate::delivery::handshake::{Greeted, HopError, Step};
use crate::delivery::mta_sts::{StsPolicies, StsUnavailable};
use crate::delivery::route::{self, RouteError, SelfIdentity, Target};
use crate::dns::{DnsError, MxRecord, Resolver};
use crate::domain::{Domain, TlsPolicy};
use crate::mta_sts::Mode;

/// A check's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// As it should be.
    Ok,
    /// Works, but weaker or riskier than it could be.
    Warn,
    /// Broken: mail will be refused, lost to bounces, or sent in the clear.
    Fail,
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // pad: the text report aligns columns with `{:<5}`.
        f.pad(match self {
            Verdict::Ok => "ok",
            Verdict::Warn => "warn",
            Verdict::Fail => "fail",
        })
    }
}

/// One check's result.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// Stable name (`mx_preference`, …).
    pub check: &'static str,
    /// The verdict.
    pub status: Verdict,
    /// What was found.
    pub detail: String,
    /// What to change, when something should be.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

fn ok(check: &'static str, detail: impl Into<String>) -> Check {
    Check {
        check,
        status: Verdict::Ok,
        detail: detail.into(),
        fix: None,
    }
}

fn warn(check: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
    Check {
        check,
        status: Verdict::Warn,
        detail: detail.into(),
        fix: Some(fix.into()),
    }
}

fn fail(check: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
    Check {
        check,
        status: Verdict::Fail,
        detail: detail.into(),
        fix: Some(fix.into()),
    }
}

/// What the doctor needs to know about us.
pub struct DoctorSettings {
    /// Our host name, addresses and the MX port.
    pub me: SelfIdentity,
    /// `[delivery] routes`.
    pub routes: BTreeMap<String, String>,
    /// `[smtp] max_message_size`.
    pub max_message_size: u64,
    /// Our certificate chain (`[tls] cert`), if STARTTLS is configured.
    pub certificate: Option<Vec<CertificateDer<'static>>>,
    /// Roots certificates are verified against (Web PKI and `tls_ca_file`).
    pub verifying: Arc<rustls::ClientConfig>,
    /// Roots for checking our own certificate.
    pub roots: Arc<rustls::RootCertStore>,
    /// Where MTA-STS policies are fetched.
    pub mta_sts_port: u16,
    /// Longest wait for one network step.
    pub timeout: Duration,
}

/// Examines domains.
pub struct Doctor {
    resolver: Arc<dyn Resolver>,
    settings: DoctorSettings,
}

/// What the primary said when asked.
#[derive(Debug, Default)]
struct PrimaryProbe {
    size: Option<u64>,
    starttls: bool,
    /// The handshake with a verifying client: `Err` says why it failed.
    verified: Option<Result<(), String>>,
}

impl Doctor {
    /// A doctor asking `resolver`.
    pub fn new(resolver: Arc<dyn Resolver>, settings: DoctorSettings) -> Doctor {
        Doctor { resolver, settings }
    }

    fn host(&self) -> &str {
        self.settings.me.hostname.trim_end_matches('.')
    }

    fn is_us(&self, host: &str) -> bool {
        host.trim_end_matches('.').eq_ignore_ascii_case(self.host())
    }

    /// Every check, in order. `record` is the domain as the store has it.
    pub async fn examine(&self, domain: &DomainName, record: Option<&Domain>) -> Vec<Check> {
        let mut checks = vec![self.hosted(domain, record)];
        let mx = self.resolver.mx(domain.as_str()).await;
        checks.extend(self.mx_checks(domain, &mx));
        let others: Vec<String> = match &mx {
            Ok(records) => records
                .iter()
                .filter(|r| !self.is_us(&r.exchange) && !r.exchange.is_empty())
                .map(|r| r.exchange.clone())
                .collect(),
            Err(_) => Vec::new(),
        };
        let primaries = record.map_or(&[][..], |d| d.primary.as_slice());
        let targets = route::targets(
            self.resolver.as_ref(),
            &self.settings.me,
            &self.settings.routes,
            domain.as_str(),
            primaries,
        )
        .await;
        checks.push(self.route_check(domain, &targets));
        if let Ok(targets) = &targets {
            checks.extend(self.primary_checks(domain, record, targets).await);
        }
        checks.push(self.mta_sts_check(domain).await);
        checks.push(self.dane_check(&others).await);
        checks.push(self.spf_check(domain).await);
        checks.push(self.certificate_check());
        checks
    }

    fn hosted(&self, domain: &DomainName, record: Option<&Domain>) -> Check {
        match record {
            None => fail(
                "hosted",
                format!("{domain} is not a hosted domain in this store: its mail is refused here"),
                format!("backupmx domain add {domain} --primary PRIMARY_HOST"),
            ),
            Some(d) if !d.enabled => warn(
                "hosted",
                format!("{domain} is hosted but disabled: its mail is refused"),
                format!("backupmx domain set {domain} --enabled true"),
            ),
            Some(d) => ok(
                "hosted",
                format!(
                    "{domain} is hosted (primary: {})",
                    if d.primary.is_empty() {
                        "its MX hosts".to_string()
                    } else {
                        d.primary.join(", ")
                    }
                ),
            ),
        }
    }

    fn mx_checks(&self, domain: &DomainName, mx: &Result<Vec<MxRecord>, DnsError>) -> Vec<Check> {
        let host = self.host();
        let records = match mx {
            Ok(r) => r,
            Err(DnsError::NoRecords | DnsError::NxDomain) => {
                return vec![fail(
                    "mx",
                    format!("{domain} has no MX records: senders never try a backup"),
                    format!("publish {domain}. MX 10 PRIMARY. and {domain}. MX 20 {host}."),
                )]
            }
            Err(e) => {
                return vec![warn(
                    "mx",
                    format!("the MX lookup for {domain} failed: {e}"),
                    "check the domain's DNS servers, then run doctor again",
                )]
            }
        };
        if records.iter().any(|r| r.exchange.is_empty()) {
            return vec![fail(
                "mx",
                format!("{domain} publishes a null MX (RFC 7505): it accepts no mail"),
                format!(
                    "replace the null MX with {domain}. MX 10 PRIMARY. and {domain}. MX 20 {host}."
                ),
            )];
        }
        let list = records
            .iter()
            .map(|r| format!("{} {}", r.preference, r.exchange))
            .collect::<Vec<_>>()
            .join(", ");
        let mut checks = vec![ok("mx", format!("MX records: {list}"))];
        let ours = records
            .iter()
            .filter(|r| self.is_us(&r.exchange))
            .map(|r| r.preference)
            .min();
        let best_other = records
            .iter()
            .filter(|r| !self.is_us(&r.exchange))
            .min_by_key(|r| r.preference);
        let Some(ours) = ours else {
            let pref = best_other.map_or(20, |r| r.preference.saturating_add(10));
            checks.push(fail(
                "mx_lists_backup",
                format!("the MX records do not list {host}: senders never try the backup"),
                format!("add {domain}. MX {pref} {host}."),
            ));
            return checks;
        };
        checks.push(ok(
            "mx_lists_backup",
            format!("{host} is listed at preference {ours}"),
        ));
        checks.push(match best_other {
            None => fail(
                "mx_preference",
                format!("{host} is the only MX: there is no primary for senders (or for us) to use"),
                format!("add the primary: {domain}. MX {} PRIMARY.", ours.saturating_sub(10)),
            ),
            Some(p) if ours > p.preference => ok(
                "mx_preference",
                format!(
                    "{host} ({ours}) comes after the primary {} ({})",
                    p.exchange, p.preference
                ),
            ),
            Some(p) if ours == p.preference => warn(
                "mx_preference",
                format!(
                    "{host} and {} share preference {ours}: senders pick either, so the backup gets mail while the primary is up",
                    p.exchange
                ),
                format!("give {host} a higher number than {}: MX {} {host}.", p.exchange, p.preference.saturating_add(10)),
            ),
            Some(p) => fail(
                "mx_preference",
                format!(
                    "{host} ({ours}) is preferred over the primary {} ({}): senders deliver to the backup first",
                    p.exchange, p.preference
                ),
                format!("give {host} a higher number than {}: MX {} {host}.", p.exchange, p.preference.saturating_add(10)),
            ),
        });
        checks
    }

    fn route_check(&self, domain: &DomainName, targets: &Result<Vec<Target>, RouteError>) -> Check {
        match targets {
            Ok(t) => ok(
                "route",
                format!(
                    "mail for {domain} is delivered to {}",
                    t.iter()
                        .map(|t| t.host.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ),
            Err(RouteError::Permanent { text, .. }) if text.contains("loops back") => fail(
                "route",
                format!("{text}: every MX host at a better preference than ours is missing"),
                format!(
                    "list the primary with a lower MX number than {}, or set it: backupmx domain set {domain} --primary HOST",
                    self.host()
                ),
            ),
            Err(RouteError::Permanent { text, .. }) => fail(
                "route",
                text.clone(),
                format!("set the primary explicitly: backupmx domain set {domain} --primary HOST"),
            ),
            Err(RouteError::Transient(text)) => warn(
                "route",
                format!("no route now: {text}"),
                "check the DNS of the primary's host name",
            ),
        }
    }

    async fn primary_checks(
        &self,
        domain: &DomainName,
        record: Option<&Domain>,
        targets: &[Target],
    ) -> Vec<Check> {
        let Some((target, addr)) = targets
            .iter()
            .find_map(|t| t.addrs.first().map(|a| (t, *a)))
        else {
            return Vec::new();
        };
        let probe = match tokio::time::timeout(
            self.settings.timeout * 3,
            self.probe(addr, &target.host),
        )
        .await
        {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => {
                return vec![fail(
                    "primary_smtp",
                    format!("{} ({addr}) does not answer SMTP: {e}", target.host),
                    format!(
                        "make the primary reachable from {} on port {} (firewall, service), unless it is down on purpose",
                        self.host(),
                        addr.port()
                    ),
                )]
            }
            Err(_) => {
                return vec![fail(
                    "primary_smtp",
                    format!("{} ({addr}) did not answer in time", target.host),
                    format!(
                        "make the primary reachable from {} on port {} (firewall, service), unless it is down on purpose",
                        self.host(),
                        addr.port()
                    ),
                )]
            }
        };
        let mut checks = vec![ok(
            "primary_smtp",
            format!("{} ({addr}) answers SMTP", target.host),
        )];
        let ours = record
            .and_then(|d| d.max_message_size)
            .map_or(self.settings.max_message_size, |m| {
                m.min(self.settings.max_message_size)
            });
        checks.push(match probe.size {
            Some(n) if n > 0 && n < ours => fail(
                "primary_size",
                format!(
                    "the primary takes at most {n} bytes, the backup accepts {ours}: bigger messages would bounce after the outage"
                ),
                format!("backupmx domain set {domain} --max-size {n}"),
            ),
            Some(n) if n > 0 => ok(
                "primary_size",
                format!("the primary takes up to {n} bytes (the backup: {ours})"),
            ),
            _ => ok("primary_size", "the primary announces no size limit"),
        });
        let policy = record.map_or(TlsPolicy::Opportunistic, |d| d.tls);
        checks.push(match (&probe.verified, policy) {
            (None, TlsPolicy::Opportunistic) => warn(
                "primary_tls",
                "the primary offers no STARTTLS: mail from the backup reaches it in the clear",
                "enable STARTTLS on the primary",
            ),
            (None, p) => fail(
                "primary_tls",
                format!("tls = {p} but the primary offers no STARTTLS: the backup's queue would never drain"),
                format!("enable STARTTLS on the primary, or: backupmx domain set {domain} --tls opportunistic"),
            ),
            (Some(Ok(())), p) => ok(
                "primary_tls",
                format!("STARTTLS with a certificate valid for {} (tls = {p})", target.host),
            ),
            (Some(Err(e)), TlsPolicy::Verified) => fail(
                "primary_tls",
                format!("tls = verified but the primary's certificate does not verify: {e}"),
                format!(
                    "give the primary a certificate for {} from a public CA, or: backupmx domain set {domain} --tls required",
                    target.host
                ),
            ),
            (Some(Err(e)), p) => warn(
                "primary_tls",
                format!("STARTTLS works (tls = {p}), but the certificate does not verify: {e}"),
                format!("give the primary a certificate for {} from a public CA", target.host),
            ),
        });
        checks
    }

    /// Greeting, EHLO, and (when offered) STARTTLS with a verifying client.
    async fn probe(&self, addr: SocketAddr, host: &str) -> Result<PrimaryProbe, String> {
        let t = self.settings.timeout;
        let mut hop = Greeted::connect(addr, b"", t).await.map_err(brief)?;
        let ehlo = hop.ehlo(self.host()).await.map_err(brief)?;
        let mut probe = PrimaryProbe::default();
        for line in ehlo.lines.iter().skip(1) {
            let upper = line.to_ascii_uppercase();
            let mut words = upper.split_whitespace();
            match words.next() {
                Some("SIZE") => probe.size = words.next().and_then(|n| n.parse().ok()),
                Some("STARTTLS") => probe.starttls = true,
                _ => {}
            }
        }
        if !probe.starttls {
            hop.quit().await;
            return Ok(probe);
        }
        let go = hop.command("STARTTLS", Step::Reply).await.map_err(brief)?;
        if go.code != 220 {
            probe.verified = Some(Err(format!("STARTTLS answered {}", go.code)));
            return Ok(probe);
        }
        let name = ServerName::try_from(host.to_string())
            .unwrap_or_else(|_| ServerName::IpAddress(addr.ip().into()));
        let handshake = tokio_rustls::TlsConnector::from(self.settings.verifying.clone())
            .connect(name, hop.into_stream());
        probe.verified = Some(match tokio::time::timeout(t, handshake).await {
            Ok(Ok(mut tls)) => {
                let _ = tls.write_all(b"QUIT\r\n").await;
                Ok(())
            }
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("TLS handshake timed out".into()),
        });
        Ok(probe)
    }

    async fn mta_sts_check(&self, domain: &DomainName) -> Check {
        let host = self.host();
        let sts = StsPolicies::new(
            self.resolver.clone(),
            self.settings.verifying.clone(),
            self.settings.mta_sts_port,
            self.settings.timeout,
        );
        match sts.fetch_now(domain).await {
            Ok(None) => ok("mta_sts", format!("{domain} publishes no MTA-STS policy")),
            Ok(Some(p)) if p.mode == Mode::None => ok("mta_sts", "the MTA-STS policy is mode none"),
            Ok(Some(p)) if p.allows(host) => ok(
                "mta_sts",
                format!("the MTA-STS policy ({}) lists {host} (mx {})", p.mode, p.mx.join(", ")),
            ),
            Ok(Some(p)) => {
                let detail = format!(
                    "the MTA-STS policy ({}) does not list {host} (mx {}): senders that enforce it refuse the backup",
                    p.mode,
                    p.mx.join(", ")
                );
                let fix = format!(
                    "add \"mx: {host}\" to https://mta-sts.{domain}/.well-known/mta-sts.txt and change the id in the _mta-sts.{domain} TXT record"
                );
                if p.mode == Mode::Enforce {
                    fail("mta_sts", detail, fix)
                } else {
                    warn("mta_sts", detail, fix)
                }
            }
            Err(StsUnavailable::Lookup(e)) => warn(
                "mta_sts",
                format!("the MTA-STS record could not be looked up: {e}"),
                "check the domain's DNS servers, then run doctor again",
            ),
            Err(StsUnavailable::Fetch(e)) => warn(
                "mta_sts",
                format!("{domain} announces an MTA-STS policy that cannot be fetched: {e}"),
                format!(
                    "serve https://mta-sts.{domain}/.well-known/mta-sts.txt with a valid certificate, or remove the _mta-sts.{domain} TXT record"
                ),
            ),
        }
    }

    async fn dane_check(&self, primaries: &[String]) -> Check {
        let host = self.host();
        let mut with_tlsa = Vec::new();
        for p in primaries {
            if self
                .resolver
                .tlsa(&format!("_25._tcp.{p}"))
                .await
                .is_ok_and(|r| !r.is_empty())
            {
                with_tlsa.push(p.as_str());
            }
        }
        if with_tlsa.is_empty() {
            return ok("dane", "the primary's MX hosts publish no TLSA records");
        }
        let ours = self.resolver.tlsa(&format!("_25._tcp.{host}")).await;
        match ours {
            Ok(r) if !r.is_empty() => ok(
                "dane",
                format!(
                    "{} and {host} publish TLSA records",
                    with_tlsa.join(", ")
                ),
            ),
            _ => warn(
                "dane",
                format!(
                    "{} publishes TLSA records but {host} does not: DANE senders reach the backup without authentication",
                    with_tlsa.join(", ")
                ),
                format!("publish TLSA records for {host} at _25._tcp.{host} (DNSSEC-signed)"),
            ),
        }
    }

    async fn spf_check(&self, domain: &DomainName) -> Check {
        let spf = match self.resolver.txt(domain.as_str()).await {
            Ok(txts) => txts
                .into_iter()
                .find(|t| t.to_ascii_lowercase().starts_with("v=spf1")),
            Err(_) => None,
        };
        match spf {
            Some(record) if record.trim_end().ends_with("-all") => warn(
                "spf",
                format!("{domain} has a strict SPF record ({record}): a primary that checks SPF sees {}'s address for the mail the backup relays", self.host()),
                format!("exempt the backup's address from SPF checks on the primary (trusted relay) and trust its Authentication-Results (docs/PRIMARY.md), or include it in {domain}'s SPF record"),
            ),
            Some(record) => ok("spf", format!("SPF: {record}")),
            None => ok("spf", format!("{domain} has no SPF record")),
        }
    }

    fn certificate_check(&self) -> Check {
        let host = self.host();
        let Some(chain) = &self.settings.certificate else {
            return warn(
                "certificate",
                "no [tls] certificate: senders cannot use STARTTLS to the backup, and MTA-STS senders in enforce mode will not deliver to it",
                format!("set [tls] cert and key to a certificate for {host}"),
            );
        };
        let Some((leaf, intermediates)) = chain.split_first() else {
            return fail(
                "certificate",
                "[tls] cert holds no certificate",
                "point [tls] cert at the PEM certificate chain",
            );
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = match rustls::client::WebPkiServerVerifier::builder_with_provider(
            self.settings.roots.clone(),
            provider,
        )
        .build()
        {
            Ok(v) => v,
            Err(e) => return warn("certificate", format!("cannot check: {e}"), "report this"),
        };
        let name = match ServerName::try_from(host.to_string()) {
            Ok(n) => n,
            Err(e) => {
                return fail(
                    "certificate",
                    format!("hostname {host:?} is not a valid name: {e}"),
                    "set hostname to the backup's DNS name",
                )
            }
        };
        use rustls::client::danger::ServerCertVerifier;
        match verifier.verify_server_cert(leaf, intermediates, &name, &[], UnixTime::now()) {
            Ok(_) => ok(
                "certificate",
                format!("the [tls] certificate is valid for {host}"),
            ),
            Err(rustls::Error::InvalidCertificate(e)) => {
                use rustls::CertificateError as C;
                match e {
                    C::NotValidForName | C::NotValidForNameContext { .. } => fail(
                        "certificate",
                        format!("the [tls] certificate is not valid for {host}: MTA-STS and DANE-TA senders refuse it"),
                        format!("get a certificate for {host} (e.g. from an ACME CA) and set [tls] cert"),
                    ),
                    C::Expired | C::ExpiredContext { .. } => fail(
                        "certificate",
                        "the [tls] certificate has expired",
                        "renew it; the server reloads it on SIGHUP",
                    ),
                    C::UnknownIssuer => warn(
                        "certificate",
                        format!("the [tls] certificate for {host} is not from a trusted CA (self-signed?): opportunistic senders accept it, MTA-STS senders do not"),
                        format!("use a certificate for {host} from a public CA (e.g. ACME)"),
                    ),
                    other => fail(
                        "certificate",
                        format!("the [tls] certificate does not verify: {other:?}"),
                        format!("use a valid certificate for {host}"),
                    ),
                }
            }
            Err(e) => fail(
                "certificate",
                format!("the [tls] certificate does not verify: {e}"),
                format!("use a valid certificate for {host}"),
            ),
        }
    }
}

/// A hop error as doctor words it: the step and the answer, without the
/// address (the check names it).
fn brief(e: HopError) -> String {
    match e {
        HopError::Connect { source, .. } => format!("connect: {source}"),
        HopError::Timeout { step, .. } => format!("timed out waiting for the {step}"),
        HopError::Lost { step, why, .. } => format!("no {step}: {why}"),
        HopError::Refused { step, reply, .. } => format!("{step} answered {}", reply.code),
    }
}

/// Whether a report lets `doctor` exit 0.
pub fn passed(checks: &[Check]) -> bool {
    !checks.iter().any(|c| c.status == Verdict::Fail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_passes_unless_a_check_fails() {
        let w = warn("spf", "strict", "exempt us");
        assert!(passed(&[ok("mx", "fine"), w.clone()]));
        assert!(!passed(&[w, fail("route", "loops", "list the primary")]));
        let json = serde_json::to_value(fail("route", "loops", "list the primary")).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"check": "route", "status": "fail", "detail": "loops", "fix": "list the primary"})
        );
        let json = serde_json::to_value(ok("mx", "fine")).unwrap();
        assert!(json.get("fix").is_none());
    }
}
