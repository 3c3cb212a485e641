//! Hosted domains: the records relay control is decided by.

use serde::{Deserialize, Serialize};

use crate::address::{DomainName, Mailbox};

/// One hosted domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Domain {
    /// The domain's name (A-labels).
    pub name: DomainName,
    /// Explicit next hops (`host[:port]`), tried before any MX lookup.
    #[serde(default)]
    pub primary: Vec<String>,
    /// Greylist mail for this domain (when greylisting is on).
    #[serde(default = "yes")]
    pub greylist: bool,
    /// Per-domain message size limit, below the global one.
    #[serde(default)]
    pub max_message_size: Option<u64>,
    /// Accepted recipients (lower-case `local@domain`); `None` accepts any
    /// local part.
    #[serde(default)]
    pub recipients: Option<Vec<String>>,
    /// Accept mail for this domain; a disabled domain is refused like an unknown one.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// How recipients outside the static list are checked.
    #[serde(default)]
    pub recipient_verify: RecipientVerify,
    /// Answer `451 4.7.1` while the primary is known to be up, so senders
    /// deliver to it directly (spam aimed at the backup gives up).
    #[serde(default)]
    pub defer_while_primary_up: bool,
    /// Queued mail is kept and not attempted (and does not expire) while
    /// this is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold: Option<Hold>,
    /// How long mail for this domain may stay queued (seconds), instead of
    /// the global `[delivery] queue_lifetime`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_lifetime: Option<u64>,
    /// How the hop to the primary must be protected.
    #[serde(default)]
    pub tls: TlsPolicy,
    /// Scan this domain's mail with the content filter (when `[filter]`
    /// is set).
    #[serde(default = "yes")]
    pub filter: bool,
    /// The bounce-storm guard watches this domain's drains (when
    /// `[delivery] bounce_storm_min_recipients` is not 0).
    #[serde(default = "yes")]
    pub bounce_storm_guard: bool,
    /// Sender authentication (SPF, DKIM, DMARC, iprev) of this domain's
    /// mail at the edge.
    #[serde(default)]
    pub auth: AuthPolicy,
}

/// What sender authentication does with a domain's mail.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthPolicy {
    /// No checks, no header.
    Off,
    /// Checks, and one `Authentication-Results` header for the primary.
    #[default]
    Annotate,
    /// As `annotate`, and a DMARC `fail` under `p=reject` is refused.
    Enforce,
}

impl std::str::FromStr for AuthPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(AuthPolicy::Off),
            "annotate" => Ok(AuthPolicy::Annotate),
            "enforce" => Ok(AuthPolicy::Enforce),
            _ => Err(format!("{s:?}: expected off, annotate or enforce")),
        }
    }
}

impl std::fmt::Display for AuthPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AuthPolicy::Off => "off",
            AuthPolicy::Annotate => "annotate",
            AuthPolicy::Enforce => "enforce",
        })
    }
}

/// The least protection a delivery to the domain's primary may have.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsPolicy {
    /// STARTTLS when offered, with any certificate; plaintext otherwise
    /// (RFC 7435), unless an MTA-STS policy or DANE asks for more.
    #[default]
    Opportunistic,
    /// STARTTLS must succeed (any certificate); no plaintext ever.
    Required,
    /// STARTTLS with a certificate valid for the next hop's name.
    Verified,
}

impl std::str::FromStr for TlsPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "opportunistic" => Ok(TlsPolicy::Opportunistic),
            "required" => Ok(TlsPolicy::Required),
            "verified" => Ok(TlsPolicy::Verified),
            _ => Err(format!(
                "{s:?}: expected opportunistic, required or verified"
            )),
        }
    }
}

impl std::fmt::Display for TlsPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TlsPolicy::Opportunistic => "opportunistic",
            TlsPolicy::Required => "required",
            TlsPolicy::Verified => "verified",
        })
    }
}

/// Why and since when a domain's mail is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hold {
    /// Who held it.
    pub reason: HoldReason,
    /// Unix seconds.
    pub since: u64,
}

/// Who held a domain's mail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HoldReason {
    /// `domain set --hold` or `hold = true` in the configuration.
    Operator,
    /// The primary refused nearly all of a drain.
    BounceStorm,
}

impl std::fmt::Display for HoldReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HoldReason::Operator => "operator",
            HoldReason::BounceStorm => "bounce_storm",
        })
    }
}

impl std::str::FromStr for HoldReason {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "operator" => Ok(HoldReason::Operator),
            "bounce_storm" => Ok(HoldReason::BounceStorm),
            _ => Err(format!("{s:?}: expected operator or bounce_storm")),
        }
    }
}

/// How a domain's recipients are verified at RCPT.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecipientVerify {
    /// Any local part is accepted (or the static list decides).
    #[default]
    Off,
    /// A recipient outside the static list is checked against the primary
    /// (a null-sender callout) while it is up, and the verdict is cached
    /// for when it is down.
    Callout,
}

impl std::str::FromStr for RecipientVerify {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(RecipientVerify::Off),
            "callout" => Ok(RecipientVerify::Callout),
            _ => Err(format!("{s:?}: expected off or callout")),
        }
    }
}

impl std::fmt::Display for RecipientVerify {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RecipientVerify::Off => "off",
            RecipientVerify::Callout => "callout",
        })
    }
}

fn yes() -> bool {
    true
}

/// Why operator input does not make a valid domain record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DomainError {
    /// Not a domain name.
    #[error("invalid domain name {0:?}")]
    BadName(String),
    /// A name mail cannot be addressed to (a single label, an address literal…), and why.
    #[error("{0:?} cannot be a hosted domain: {1}")]
    NotHostable(String, &'static str),
    /// A primary that is not `HOST` or `HOST:PORT`.
    #[error("invalid primary {0:?}: expected HOST or HOST:PORT")]
    BadPrimary(String),
    /// A recipient that is not `local@` this domain.
    #[error("invalid recipient {0:?}: expected local@{1}")]
    BadRecipient(String, String),
}

/// A hosted domain is a name mail is addressed to on the Internet: at
/// least two labels, and not an IP address written as one.
fn hostable(name: &DomainName) -> Result<(), &'static str> {
    let labels: Vec<&str> = name.as_str().split('.').collect();
    if labels.len() < 2 {
        return Err("a domain needs at least two labels (like example.com)");
    }
    if labels
        .last()
        .is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err("an IP address is not a domain name");
    }
    Ok(())
}

impl Domain {
    /// A record with the defaults: greylisted, enabled, no primary, any recipient.
    pub fn new(name: DomainName) -> Self {
        Domain {
            name,
            primary: Vec::new(),
            greylist: true,
            max_message_size: None,
            recipients: None,
            enabled: true,
            recipient_verify: RecipientVerify::Off,
            defer_while_primary_up: false,
            hold: None,
            queue_lifetime: None,
            tls: TlsPolicy::Opportunistic,
            filter: true,
            bounce_storm_guard: true,
            auth: AuthPolicy::Annotate,
        }
    }

    /// Builds a validated record from operator input (CLI or config).
    pub fn from_parts(
        name: &str,
        primary: &[String],
        recipients: Option<&[String]>,
    ) -> Result<Self, DomainError> {
        let parsed = DomainName::parse(name).map_err(|_| DomainError::BadName(name.to_string()))?;
        hostable(&parsed).map_err(|why| DomainError::NotHostable(name.to_string(), why))?;
        let name = parsed;
        for p in primary {
            validate_primary(p)?;
        }
        let recipients = match recipients {
            None => None,
            Some(list) => Some(
                list.iter()
                    .map(|r| {
                        let m = crate::address::parse_mailbox(r)
                            .map_err(|_| DomainError::BadRecipient(r.clone(), name.to_string()))?;
                        if m.domain() != Some(&name) {
                            return Err(DomainError::BadRecipient(r.clone(), name.to_string()));
                        }
                        Ok(m.canonical())
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            ),
        };
        Ok(Domain {
            primary: primary.to_vec(),
            recipients,
            ..Domain::new(name)
        })
    }

    /// Whether `rcpt` is in the static list (a domain without one lists
    /// nobody).
    pub fn lists_recipient(&self, rcpt: &Mailbox) -> bool {
        self.recipients
            .as_ref()
            .is_some_and(|list| list.contains(&rcpt.canonical()))
    }

    /// Whether `rcpt` is a known user of this domain.
    pub fn accepts_recipient(&self, rcpt: &Mailbox) -> bool {
        match &self.recipients {
            None => true,
            Some(list) => {
                let wanted = rcpt.canonical();
                list.contains(&wanted)
            }
        }
    }
}

/// A next hop as an operator writes it (a domain's primary, a static
/// route): `host`, `host:port`, `[v6]` or `[v6]:port`. Parsed once, by the
/// same rules for validation and for delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NextHop {
    /// A domain name or an IP address (an IPv6 one without its brackets).
    pub host: String,
    /// The port, when one is given.
    pub port: Option<u16>,
}

impl NextHop {
    /// Parses `host[:port]` or `[v6][:port]`; the port must be 1–65535 and
    /// the host an IP address or a domain name.
    pub fn parse(p: &str) -> Result<Self, DomainError> {
        let bad = || DomainError::BadPrimary(p.to_string());
        let (host, port) = if let Some(rest) = p.strip_prefix('[') {
            let (h, after) = rest.split_once(']').ok_or_else(bad)?;
            h.parse::<std::net::Ipv6Addr>().map_err(|_| bad())?;
            let port = match after {
                "" => None,
                _ => Some(after.strip_prefix(':').ok_or_else(bad)?),
            };
            (h, port)
        } else {
            let (h, port) = match p.rsplit_once(':') {
                Some((h, port)) => (h, Some(port)),
                None => (p, None),
            };
            if h.parse::<std::net::IpAddr>().is_err() && DomainName::parse(h).is_err() {
                return Err(bad());
            }
            (h, port)
        };
        let port = match port {
            None => None,
            Some(port) => Some(
                port.parse::<u16>()
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or_else(bad)?,
            ),
        };
        Ok(NextHop {
            host: host.to_string(),
            port,
        })
    }

    /// The port, or `default` when none was given.
    pub fn port_or(&self, default: u16) -> u16 {
        self.port.unwrap_or(default)
    }
}

/// Checks a next hop (see [`NextHop::parse`]).
pub fn validate_primary(p: &str) -> Result<(), DomainError> {
    NextHop::parse(p).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_internet_domain_names_can_be_hosted() {
        for bad in ["1.2.3.4", "localhost", "xn--zz.test", "a..b"] {
            assert!(Domain::from_parts(bad, &[], None).is_err(), "{bad}");
        }
        for good in ["example.test", "b\u{fc}cher.example", "a-b.co.uk"] {
            assert!(Domain::from_parts(good, &[], None).is_ok(), "{good}");
        }
    }

    #[test]
    fn primaries_are_validated() {
        for ok in [
            "mx.example.test",
            "mx.example.test:2525",
            "127.0.0.1:25",
            "[::1]:2626",
        ] {
            assert!(validate_primary(ok).is_ok(), "{ok}");
        }
        for bad in [
            "", "mx:0", "mx:99999", "a b:25", "[::1", "[zz]:25", "[::1]x", "mx:port", "::1",
        ] {
            assert!(validate_primary(bad).is_err(), "{bad}");
        }
        let hop = |s| NextHop::parse(s).unwrap();
        assert_eq!(
            (hop("mx.test").host, hop("mx.test").port_or(25)),
            ("mx.test".into(), 25)
        );
        assert_eq!(hop("mx.test:2525").port, Some(2525));
        assert_eq!(
            (hop("[::1]:26").host, hop("[::1]:26").port),
            ("::1".into(), Some(26))
        );
        assert_eq!(hop("[::1]").port_or(25), 25);
    }

    #[test]
    fn recipient_lists_match_case_insensitively() {
        let d =
            Domain::from_parts("Example.test", &[], Some(&["User@Example.TEST".into()])).unwrap();
        let ok = crate::address::parse_mailbox("user@example.test").unwrap();
        let other = crate::address::parse_mailbox("other@example.test").unwrap();
        assert!(d.accepts_recipient(&ok));
        assert!(!d.accepts_recipient(&other));
        assert!(
            Domain::from_parts("example.test", &[], Some(&["u@elsewhere.test".into()])).is_err()
        );
    }
}
