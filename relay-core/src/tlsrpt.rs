//! SMTP TLS reporting (RFC 8460): how our delivery sessions to a
//! primary's hosts went, counted per policy domain and UTC day, and the
//! aggregate report sent to the `rua` the domain publishes.
//!
//! This module is the pure part: the outcome of one session, the
//! `_smtp._tls` record, the report's JSON and its mail form. The sender
//! (DNS, HTTPS, the queue) is [`send`].

pub mod send;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// Seconds in a UTC day: reports cover whole days (RFC 8460 §4.1).
pub const DAY: u64 = 86_400;

/// The policy a session was held to (RFC 8460 §4.4 `policy-type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum PolicyType {
    /// An MTA-STS policy (RFC 8461).
    #[serde(rename = "sts")]
    Sts,
    /// DANE: DNSSEC-validated TLSA records (RFC 7672).
    #[serde(rename = "tlsa")]
    Tlsa,
    /// Neither: TLS was opportunistic, or the domain's own setting.
    #[serde(rename = "no-policy-found")]
    NoPolicyFound,
}

impl PolicyType {
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyType::Sts => "sts",
            PolicyType::Tlsa => "tlsa",
            PolicyType::NoPolicyFound => "no-policy-found",
        }
    }

    pub fn parse(s: &str) -> Option<PolicyType> {
        [PolicyType::Sts, PolicyType::Tlsa, PolicyType::NoPolicyFound]
            .into_iter()
            .find(|p| p.as_str() == s)
    }
}

/// Why a session failed to get the TLS it needed (RFC 8460 §4.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum FailureType {
    StarttlsNotSupported,
    CertificateHostMismatch,
    CertificateExpired,
    CertificateNotTrusted,
    ValidationFailure,
    TlsaInvalid,
}

impl FailureType {
    const ALL: [FailureType; 6] = [
        FailureType::StarttlsNotSupported,
        FailureType::CertificateHostMismatch,
        FailureType::CertificateExpired,
        FailureType::CertificateNotTrusted,
        FailureType::ValidationFailure,
        FailureType::TlsaInvalid,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FailureType::StarttlsNotSupported => "starttls-not-supported",
            FailureType::CertificateHostMismatch => "certificate-host-mismatch",
            FailureType::CertificateExpired => "certificate-expired",
            FailureType::CertificateNotTrusted => "certificate-not-trusted",
            FailureType::ValidationFailure => "validation-failure",
            FailureType::TlsaInvalid => "tlsa-invalid",
        }
    }

    pub fn parse(s: &str) -> Option<FailureType> {
        FailureType::ALL.into_iter().find(|f| f.as_str() == s)
    }
}

/// How one session to one host went.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct SessionOutcome {
    pub policy: PolicyType,
    /// The MX host's name (or the address a route names).
    pub mx_host: String,
    /// The address connected to.
    pub receiving_ip: String,
    /// `None`: TLS as the policy asked.
    pub failure: Option<FailureType>,
}

impl SessionOutcome {
    /// The stored form of the result: `success` or the failure type.
    pub fn result_name(&self) -> &'static str {
        self.failure.map_or("success", FailureType::as_str)
    }

    /// Parses the stored form back; `None` for a name this build does not
    /// know (skipped, not reported wrong).
    pub fn from_parts(policy: &str, mx_host: &str, ip: &str, result: &str) -> Option<Self> {
        let failure = match result {
            "success" => None,
            other => Some(FailureType::parse(other)?),
        };
        Some(SessionOutcome {
            policy: PolicyType::parse(policy)?,
            mx_host: mx_host.to_string(),
            receiving_ip: ip.to_string(),
            failure,
        })
    }
}

/// What a delivery session tells about TLS: whether it ran under TLS, and
/// why not if it did not (the text the session ended with).
pub fn classify(tls: bool, why: &str) -> Option<FailureType> {
    if tls {
        return None;
    }
    Some(if why.contains("does not offer STARTTLS") {
        FailureType::StarttlsNotSupported
    } else if why.contains("NotValidForName") {
        FailureType::CertificateHostMismatch
    } else if why.contains("Expired") {
        FailureType::CertificateExpired
    } else if why.contains("UnknownIssuer") || why.contains("self-signed") {
        FailureType::CertificateNotTrusted
    } else if why.contains("TLSA") || why.contains("DANE") {
        FailureType::TlsaInvalid
    } else {
        FailureType::ValidationFailure
    })
}

/// Where a domain wants its reports (`rua=` of `v=TLSRPTv1`, RFC 8460 §3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rua {
    Mailto(String),
    Https(String),
}

/// Parses one `_smtp._tls` TXT record; `None` if it is not a TLSRPTv1
/// record or names no usable `rua`.
pub fn parse_record(txt: &str) -> Option<Vec<Rua>> {
    let mut fields = txt.split(';').map(str::trim);
    if fields.next()? != "v=TLSRPTv1" {
        return None;
    }
    let rua = fields.find_map(|f| f.strip_prefix("rua="))?;
    let out: Vec<Rua> = rua
        .split(',')
        .map(str::trim)
        .filter_map(|uri| {
            if let Some(addr) = uri.strip_prefix("mailto:") {
                let addr = addr.split('?').next().unwrap_or_default();
                (addr.contains('@') && !addr.contains(['<', '>', ' ']))
                    .then(|| Rua::Mailto(addr.to_string()))
            } else if uri.starts_with("https://") && !uri.contains(char::is_whitespace) {
                Some(Rua::Https(uri.to_string()))
            } else {
                None
            }
        })
        .collect();
    (!out.is_empty()).then_some(out)
}

/// Who sends the reports.
#[derive(Debug, Clone)]
pub struct Submitter {
    /// `organization-name`.
    pub organization: String,
    /// `contact-info`.
    pub contact: String,
    /// Our hostname (report ids, `TLS-Report-Submitter`).
    pub hostname: String,
}

/// The report of one policy domain for the UTC day `day` (days since the
/// epoch) from its session counts (RFC 8460 §4.4); `until` ends the date
/// range (the day's end, or now for a report closed early).
pub fn report_json(
    submitter: &Submitter,
    domain: &str,
    day: u64,
    until: u64,
    counts: &[(SessionOutcome, u64)],
) -> Value {
    /// One policy's part of the report.
    #[derive(Default)]
    struct Part<'a> {
        mx: Vec<&'a str>,
        ok: u64,
        failed: u64,
        details: Vec<Value>,
    }
    let mut policies: BTreeMap<PolicyType, Part<'_>> = BTreeMap::new();
    for (outcome, n) in counts {
        let p = policies.entry(outcome.policy).or_default();
        if !p.mx.contains(&outcome.mx_host.as_str()) {
            p.mx.push(&outcome.mx_host);
        }
        match outcome.failure {
            None => p.ok += n,
            Some(failure) => {
                p.failed += n;
                p.details.push(json!({
                    "result-type": failure.as_str(),
                    "receiving-mx-hostname": outcome.mx_host,
                    "receiving-ip": outcome.receiving_ip,
                    "failed-session-count": n,
                }));
            }
        }
    }
    let policies: Vec<Value> = policies
        .into_iter()
        .map(
            |(
                policy,
                Part {
                    mx,
                    ok,
                    failed,
                    details,
                },
            )| {
                let mut p = json!({
                    "policy": {
                        "policy-type": policy.as_str(),
                        "policy-domain": domain,
                    },
                    "summary": {
                        "total-successful-session-count": ok,
                        "total-failure-session-count": failed,
                    },
                });
                if policy != PolicyType::NoPolicyFound {
                    p["policy"]["mx-host"] = json!(mx);
                }
                if !details.is_empty() {
                    p["failure-details"] = Value::Array(details);
                }
                p
            },
        )
        .collect();
    let start = day * DAY;
    let end = until.clamp(start, start + DAY - 1);
    json!({
        "organization-name": submitter.organization,
        "date-range": {
            "start-datetime": crate::admin::rfc3339(start),
            "end-datetime": crate::admin::rfc3339(end),
        },
        "contact-info": submitter.contact,
        "report-id": report_id(submitter, domain, day),
        "policies": policies,
    })
}

/// One id per domain, day and submitter: a receiver sees a repeat as one.
pub fn report_id(submitter: &Submitter, domain: &str, day: u64) -> String {
    format!(
        "{}.{domain}@{}",
        crate::admin::rfc3339(day * DAY)
            .get(..10)
            .unwrap_or_default(),
        submitter.hostname
    )
}

/// The report as sent: JSON, gzip-compressed (`application/tlsrpt+gzip`).
pub fn gzip(report: &Value) -> Vec<u8> {
    use std::io::Write;
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    // Writing to a Vec cannot fail.
    let _ = enc.write_all(report.to_string().as_bytes());
    enc.finish().unwrap_or_default()
}

/// The report as a mail to a `mailto:` rua (RFC 8460 §5.3): a
/// `multipart/report; report-type="tlsrpt"` with the gzip attached and the
/// `TLS-Report-Domain`/`TLS-Report-Submitter` header fields.
pub fn report_mail(
    submitter: &Submitter,
    domain: &str,
    day: u64,
    to: &str,
    gz: &[u8],
    date: std::time::SystemTime,
) -> Vec<u8> {
    use base64::Engine as _;
    let id = report_id(submitter, domain, day);
    let day_text = crate::admin::rfc3339(day * DAY)
        .get(..10)
        .unwrap_or_default()
        .to_string();
    let boundary = format!("tlsrpt-{}", day);
    let encoded = base64::engine::general_purpose::STANDARD.encode(gz);
    let mut lines = String::new();
    for chunk in encoded.as_bytes().chunks(76) {
        lines.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        lines.push_str("\r\n");
    }
    let host = &submitter.hostname;
    format!(
        "From: TLS reporting <{contact}>\r\n\
         To: <{to}>\r\n\
         Subject: Report Domain: {domain} Submitter: {host} Report-ID: <{id}>\r\n\
         Date: {date}\r\n\
         Message-ID: <{id}>\r\n\
         TLS-Report-Domain: {domain}\r\n\
         TLS-Report-Submitter: {host}\r\n\
         Auto-Submitted: auto-generated\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: multipart/report; report-type=\"tlsrpt\"; boundary=\"{boundary}\"\r\n\
         \r\n\
         --{boundary}\r\n\
         Content-Type: text/plain; charset=us-ascii\r\n\
         \r\n\
         The TLS report of {host} for {domain} on {day_text} (RFC 8460) is attached.\r\n\
         \r\n\
         --{boundary}\r\n\
         Content-Type: application/tlsrpt+gzip\r\n\
         Content-Transfer-Encoding: base64\r\n\
         Content-Disposition: attachment; filename=\"{host}!{domain}!{start}!{end}.json.gz\"\r\n\
         \r\n\
         {lines}\
         --{boundary}--\r\n",
        contact = submitter.contact,
        date = relay_proto::time::rfc5322_date(date),
        start = day * DAY,
        end = day * DAY + DAY - 1,
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn submitter() -> Submitter {
        Submitter {
            organization: "Backup Inc".into(),
            contact: "postmaster@mx2.test".into(),
            hostname: "mx2.test".into(),
        }
    }

    fn outcome(policy: PolicyType, mx: &str, failure: Option<FailureType>) -> SessionOutcome {
        SessionOutcome {
            policy,
            mx_host: mx.into(),
            receiving_ip: "192.0.2.1".into(),
            failure,
        }
    }

    #[test]
    fn records_name_mailto_and_https_reporting_addresses() {
        assert_eq!(
            parse_record("v=TLSRPTv1; rua=mailto:tls@a.test,https://r.a.test/v1"),
            Some(vec![
                Rua::Mailto("tls@a.test".into()),
                Rua::Https("https://r.a.test/v1".into())
            ])
        );
        assert_eq!(
            parse_record("v=TLSRPTv1;rua=mailto:x@y.test?subject=x"),
            Some(vec![Rua::Mailto("x@y.test".into())])
        );
        assert_eq!(parse_record("v=spf1 -all"), None);
        assert_eq!(parse_record("v=TLSRPTv1; rua=http://insecure.test/"), None);
        assert_eq!(parse_record("v=TLSRPTv1;"), None);
    }

    #[test]
    fn sessions_are_classified_by_why_they_had_no_tls() {
        assert_eq!(classify(true, ""), None);
        for (why, expected) in [
            ("TLS required by policy, but the server does not offer STARTTLS", FailureType::StarttlsNotSupported),
            ("TLS required by policy, handshake failed: invalid peer certificate: NotValidForName", FailureType::CertificateHostMismatch),
            ("handshake failed: invalid peer certificate: Expired", FailureType::CertificateExpired),
            ("handshake failed: invalid peer certificate: UnknownIssuer", FailureType::CertificateNotTrusted),
            ("DANE: no TLSA record matches", FailureType::TlsaInvalid),
            ("handshake failed: peer sent no certificates", FailureType::ValidationFailure),
        ] {
            assert_eq!(classify(false, why), Some(expected), "{why}");
        }
    }

    #[test]
    fn the_report_has_rfc_8460_fields_and_sums() {
        let counts = vec![
            (outcome(PolicyType::Sts, "mx1.a.test", None), 7),
            (
                outcome(
                    PolicyType::Sts,
                    "mx2.a.test",
                    Some(FailureType::CertificateExpired),
                ),
                2,
            ),
            (
                outcome(
                    PolicyType::NoPolicyFound,
                    "mx1.a.test",
                    Some(FailureType::StarttlsNotSupported),
                ),
                1,
            ),
        ];
        let day = 20_429;
        let r = report_json(&submitter(), "a.test", day, u64::MAX, &counts);
        assert_eq!(r["organization-name"], "Backup Inc");
        assert_eq!(r["contact-info"], "postmaster@mx2.test");
        assert_eq!(r["date-range"]["start-datetime"], "2025-12-07T00:00:00Z");
        assert_eq!(r["date-range"]["end-datetime"], "2025-12-07T23:59:59Z");
        assert_eq!(r["report-id"], "2025-12-07.a.test@mx2.test");
        let sts = &r["policies"][0];
        assert_eq!(sts["policy"]["policy-type"], "sts");
        assert_eq!(sts["policy"]["policy-domain"], "a.test");
        assert_eq!(
            sts["policy"]["mx-host"],
            json!(["mx1.a.test", "mx2.a.test"])
        );
        assert_eq!(sts["summary"]["total-successful-session-count"], 7);
        assert_eq!(sts["summary"]["total-failure-session-count"], 2);
        assert_eq!(
            sts["failure-details"][0]["result-type"],
            "certificate-expired"
        );
        assert_eq!(
            sts["failure-details"][0]["receiving-mx-hostname"],
            "mx2.a.test"
        );
        assert_eq!(sts["failure-details"][0]["failed-session-count"], 2);
        let none = &r["policies"][1];
        assert_eq!(none["policy"]["policy-type"], "no-policy-found");
        assert_eq!(none["summary"]["total-failure-session-count"], 1);
        // gzip round trip.
        use std::io::Read;
        let mut text = String::new();
        flate2::read::GzDecoder::new(&gzip(&r)[..])
            .read_to_string(&mut text)
            .unwrap();
        assert_eq!(serde_json::from_str::<Value>(&text).unwrap(), r);
    }

    #[test]
    fn the_mail_form_has_the_headers_and_the_attachment() {
        let gz = gzip(&json!({"x": 1}));
        let mail = report_mail(
            &submitter(),
            "a.test",
            20_429,
            "tls@a.test",
            &gz,
            std::time::UNIX_EPOCH,
        );
        let text = String::from_utf8(mail).unwrap();
        for needle in [
            "TLS-Report-Domain: a.test\r\n",
            "TLS-Report-Submitter: mx2.test\r\n",
            "Subject: Report Domain: a.test Submitter: mx2.test Report-ID: <2025-12-07.a.test@mx2.test>\r\n",
            "Content-Type: multipart/report; report-type=\"tlsrpt\"",
            "Content-Type: application/tlsrpt+gzip\r\n",
        ] {
            assert!(text.contains(needle), "{needle} in {text}");
        }
        assert!(text.lines().all(|l| l.len() <= 998));
    }

    #[test]
    fn stored_outcomes_read_back() {
        let o = outcome(
            PolicyType::Tlsa,
            "mx.a.test",
            Some(FailureType::TlsaInvalid),
        );
        assert_eq!(
            SessionOutcome::from_parts("tlsa", "mx.a.test", "192.0.2.1", o.result_name()),
            Some(o)
        );
        assert_eq!(SessionOutcome::from_parts("sts", "m", "i", "bogus"), None);
    }
}
