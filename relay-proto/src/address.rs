//! Envelope addresses and domain names (RFC 5321 §4.1.2, RFC 6531 for UTF-8).
//!
//! Parses the `<path>` of MAIL FROM / RCPT TO strictly: source routes are parsed
//! and dropped (RFC 5321 §4.1.1.3 lets a server ignore them), the mailbox is
//! split at its one syntactic `@`, and the domain is what mail is routed by —
//! never anything inside the local part. Does no lookups.

use std::fmt;

/// RFC 5321 §4.5.3.1.1–3 size limits.
pub const MAX_LOCAL_PART: usize = 64;
/// Longest domain name in octets (RFC 5321 §4.5.3.1.2).
pub const MAX_DOMAIN: usize = 255;
/// Longest forward or reverse path in octets, brackets included (RFC 5321 §4.5.3.1.3).
pub const MAX_PATH: usize = 256;

/// Why an address was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AddressError {
    /// Not of the form `<...>`.
    #[error("address must be enclosed in <>")]
    MissingBrackets,
    /// Not a mailbox by RFC 5321 §4.1.2's grammar.
    #[error("malformed address")]
    Syntax,
    /// Longer than RFC 5321 §4.5.3.1 allows.
    #[error("address too long")]
    TooLong,
    /// The domain is not a valid (IDNA-convertible) domain name.
    #[error("malformed domain name")]
    BadDomain,
}

/// A domain name normalised for comparison: ASCII lower-case, no trailing
/// dot, internationalised names as A-labels (IDNA, UTS 46).
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct DomainName(String);

impl DomainName {
    /// Validates a host name (LDH labels, UTF-8 labels allowed for SMTPUTF8),
    /// tolerating one trailing dot, and normalises it.
    pub fn parse(input: &str) -> Result<Self, AddressError> {
        let trimmed = input.strip_suffix('.').unwrap_or(input);
        if trimmed.is_empty() || trimmed.len() > MAX_DOMAIN {
            return Err(AddressError::BadDomain);
        }
        for label in trimmed.split('.') {
            if !is_valid_label(label) {
                return Err(AddressError::BadDomain);
            }
        }
        // One form for comparison: a Unicode domain (SMTPUTF8 mail to
        // `bücher.test`) is the same domain as its A-labels
        // (`xn--bcher-kva.test`, how operators host it). UTS 46 maps and
        // checks it, and rejects A-labels that are not valid punycode.
        let is_idn = !trimmed.is_ascii()
            || trimmed
                .split('.')
                .any(|l| l.len() >= 4 && l[..4].eq_ignore_ascii_case("xn--"));
        if is_idn {
            let ascii = idna::domain_to_ascii(trimmed).map_err(|_| AddressError::BadDomain)?;
            if ascii.is_empty() || ascii.len() > MAX_DOMAIN {
                return Err(AddressError::BadDomain);
            }
            return Ok(DomainName(ascii));
        }
        Ok(DomainName(trimmed.to_ascii_lowercase()))
    }

    /// The name in A-labels, lower case, without a trailing dot.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn is_valid_label(label: &str) -> bool {
    if label.is_empty() || label.len() > 63 {
        return false;
    }
    let bytes = label.as_bytes();
    if bytes[0] == b'-' || bytes[bytes.len() - 1] == b'-' {
        return false;
    }
    // Underscores are not LDH, but real MTAs see them in HELO names and some
    // hosts; for envelope domains they are harmless to accept.
    label
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || !c.is_ascii())
}

impl TryFrom<String> for DomainName {
    type Error = AddressError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        DomainName::parse(&s)
    }
}

impl From<DomainName> for String {
    fn from(d: DomainName) -> String {
        d.0
    }
}

impl fmt::Display for DomainName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The part after `@`: a domain name or an address literal (`[192.0.2.1]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    /// A domain name, in A-labels.
    Domain(DomainName),
    /// Kept verbatim including the brackets; never a hosted domain.
    Literal(String),
}

/// A mailbox `local@host`. The local part is kept exactly as sent (quoted
/// form included) so that it reaches the primary unchanged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mailbox {
    /// The local part, exactly as sent (quoted form included).
    pub local: String,
    /// What follows the `@`.
    pub host: Host,
    /// The domain was written in Unicode (it is kept as A-labels): the
    /// address still needs SMTPUTF8 (RFC 6531 §3.4).
    pub unicode_domain: bool,
}

impl Mailbox {
    /// The domain mail for this mailbox is routed by, if it is a name.
    pub fn domain(&self) -> Option<&DomainName> {
        match &self.host {
            Host::Domain(d) => Some(d),
            Host::Literal(_) => None,
        }
    }

    /// Whether the local part is quoted (`"a b"@x`).
    pub fn is_quoted(&self) -> bool {
        self.local.starts_with('"')
    }

    /// The local part carries characters that some MTAs interpret as routing
    /// (`%` hack, `!` bang paths, an `@` inside quotes). A backup MX's primary
    /// usually trusts it, so such addresses are refused rather than passed on.
    pub fn has_routing_characters(&self) -> bool {
        self.local.contains(['%', '!', '@'])
    }

    /// Whether the whole mailbox is ASCII (else it needs SMTPUTF8).
    pub fn is_ascii(&self) -> bool {
        self.local.is_ascii()
            && !self.unicode_domain
            && match &self.host {
                Host::Domain(d) => d.as_str().is_ascii(),
                Host::Literal(l) => l.is_ascii(),
            }
    }

    /// Lower-cased `local@domain` for comparisons against recipient lists.
    pub fn canonical(&self) -> String {
        self.to_string().to_lowercase()
    }
}

impl fmt::Display for Mailbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            Host::Domain(d) => write!(f, "{}@{}", self.local, d),
            Host::Literal(l) => write!(f, "{}@{}", self.local, l),
        }
    }
}

/// A reverse-path: the null sender `<>` or a mailbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReversePath {
    /// The null sender `<>` (bounces, DSNs, callouts).
    Null,
    /// A sender's mailbox.
    Mailbox(Mailbox),
}

impl ReversePath {
    /// Whether this is the null sender.
    pub fn is_null(&self) -> bool {
        matches!(self, ReversePath::Null)
    }
}

impl fmt::Display for ReversePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReversePath::Null => Ok(()),
            ReversePath::Mailbox(m) => m.fmt(f),
        }
    }
}

/// Parses `<…>` at the start of `input`; returns the path's content and
/// the rest of the input after `>`.
///
/// Quoted strings may contain `>`, so the closing bracket is found by a small
/// scanner rather than a plain search.
pub fn split_path(input: &str) -> Result<(&str, &str), AddressError> {
    let Some(rest) = input.strip_prefix('<') else {
        return Err(AddressError::MissingBrackets);
    };
    let bytes = rest.as_bytes();
    let mut i = 0;
    let mut in_quotes = false;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' if in_quotes => i += 1,
            b'"' => in_quotes = !in_quotes,
            b'>' if !in_quotes => return Ok((&rest[..i], &rest[i + 1..])),
            _ => {}
        }
        i += 1;
    }
    Err(AddressError::MissingBrackets)
}

/// Parses the inside of a reverse-path (may be empty: the null sender).
pub fn parse_reverse_path(path: &str) -> Result<ReversePath, AddressError> {
    if path.is_empty() {
        return Ok(ReversePath::Null);
    }
    parse_forward_path(path).map(ReversePath::Mailbox)
}

/// Parses the inside of a forward-path: `[@route,@route:]local@host`.
pub fn parse_forward_path(path: &str) -> Result<Mailbox, AddressError> {
    if path.len() > MAX_PATH {
        return Err(AddressError::TooLong);
    }
    let mailbox = strip_source_route(path)?;
    parse_mailbox(mailbox)
}

fn strip_source_route(path: &str) -> Result<&str, AddressError> {
    if !path.starts_with('@') {
        return Ok(path);
    }
    // A-d-l = At-domain *( "," At-domain ) ":" — validate each hop, then drop.
    let (route, mailbox) = path.split_once(':').ok_or(AddressError::Syntax)?;
    for hop in route.split(',') {
        let domain = hop.strip_prefix('@').ok_or(AddressError::Syntax)?;
        DomainName::parse(domain)?;
    }
    Ok(mailbox)
}

/// Parses `local@host` with a dot-string or quoted-string local part.
pub fn parse_mailbox(input: &str) -> Result<Mailbox, AddressError> {
    let (local, rest) = if input.starts_with('"') {
        let end = quoted_string_end(input)?;
        (&input[..end], &input[end..])
    } else {
        let at = input.find('@').ok_or(AddressError::Syntax)?;
        let local = &input[..at];
        if !is_dot_string(local) {
            return Err(AddressError::Syntax);
        }
        (local, &input[at..])
    };
    let host = rest.strip_prefix('@').ok_or(AddressError::Syntax)?;
    let host_text = host;
    if local.len() > MAX_LOCAL_PART {
        return Err(AddressError::TooLong);
    }
    let host = if host.starts_with('[') {
        if !is_address_literal(host) {
            return Err(AddressError::BadDomain);
        }
        Host::Literal(host.to_string())
    } else {
        Host::Domain(DomainName::parse(host)?)
    };
    Ok(Mailbox {
        local: local.to_string(),
        host,
        unicode_domain: !host_text.is_ascii(),
    })
}

/// Returns the index just past the closing quote.
fn quoted_string_end(input: &str) -> Result<usize, AddressError> {
    let bytes = input.as_bytes();
    let mut i = 1;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => return Ok(i + 1),
            // quoted-pairSMTP = %d92 %d32-126
            b'\\' => {
                match bytes.get(i + 1) {
                    Some(c) if (32..=126).contains(c) => {}
                    _ => return Err(AddressError::Syntax),
                }
                i += 2;
                continue;
            }
            // qtextSMTP = %d32-33 / %d35-91 / %d93-126, plus UTF-8 (RFC 6531)
            c if c == 32 || c == 33 || (35..=91).contains(&c) || (93..=126).contains(&c) => {}
            c if c >= 0x80 => {}
            _ => return Err(AddressError::Syntax),
        }
        i += 1;
    }
    Err(AddressError::Syntax)
}

fn is_atext(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c) || !c.is_ascii()
}

fn is_dot_string(s: &str) -> bool {
    !s.is_empty()
        && s.split('.')
            .all(|atom| !atom.is_empty() && atom.chars().all(is_atext))
}

fn is_address_literal(s: &str) -> bool {
    let Some(inner) = s.strip_prefix('[').and_then(|r| r.strip_suffix(']')) else {
        return false;
    };
    if let Some(v6) = inner.strip_prefix("IPv6:") {
        return v6.parse::<std::net::Ipv6Addr>().is_ok();
    }
    inner.parse::<std::net::Ipv4Addr>().is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rcpt(s: &str) -> Result<Mailbox, AddressError> {
        parse_forward_path(s)
    }

    #[test]
    fn domain_names_are_normalised() {
        assert_eq!(
            DomainName::parse("Example.TEST.").unwrap().as_str(),
            "example.test"
        );
        for bad in ["", ".", "a..b", "-a.b", "a-.b", "a b", "a;b", "x.", ".x"] {
            if bad == "x." {
                assert!(DomainName::parse(bad).is_ok());
                continue;
            }
            assert!(DomainName::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert!(DomainName::parse(&"a".repeat(64)).is_err());
    }

    #[test]
    fn mailbox_table() {
        let cases: &[(&str, Option<(&str, &str)>)] = &[
            ("user@example.test", Some(("user", "example.test"))),
            (
                "User.Name+tag@Example.Test.",
                Some(("User.Name+tag", "example.test")),
            ),
            (
                "\"john doe\"@example.test",
                Some(("\"john doe\"", "example.test")),
            ),
            (
                "\"a@evil.test\"@example.test",
                Some(("\"a@evil.test\"", "example.test")),
            ),
            (
                "user%evil.test@example.test",
                Some(("user%evil.test", "example.test")),
            ),
            (
                "evil.test!user@example.test",
                Some(("evil.test!user", "example.test")),
            ),
            (
                "@relay.test:user@example.test",
                Some(("user", "example.test")),
            ),
            (
                "@a.test,@b.test:user@example.test",
                Some(("user", "example.test")),
            ),
            ("user@[192.0.2.1]", Some(("user", "[192.0.2.1]"))),
            (
                "user@[IPv6:2001:db8::1]",
                Some(("user", "[IPv6:2001:db8::1]")),
            ),
            // Internationalised domains are kept as A-labels (UTS 46).
            ("üser@exämple.test", Some(("üser", "xn--exmple-cua.test"))),
            ("user@example.test@evil.test", None),
            ("user", None),
            ("@example.test", None),
            ("user@", None),
            ("a..b@example.test", None),
            (".a@example.test", None),
            ("a b@example.test", None),
            ("\"unterminated@example.test", None),
            ("user@[300.1.1.1]", None),
            ("@evil.test:", None),
            ("@:user@example.test", None),
        ];
        for (input, expected) in cases {
            let got = rcpt(input);
            match expected {
                Some((local, host)) => {
                    let m = got.unwrap_or_else(|e| panic!("{input:?}: {e}"));
                    assert_eq!(m.local, *local, "{input:?}");
                    let h = match &m.host {
                        Host::Domain(d) => d.to_string(),
                        Host::Literal(l) => l.clone(),
                    };
                    assert_eq!(h, *host, "{input:?}");
                }
                None => assert!(got.is_err(), "{input:?} accepted as {got:?}"),
            }
        }
    }

    #[test]
    fn source_route_never_decides_the_destination() {
        let m = rcpt("@example.test:user@evil.test").unwrap();
        assert_eq!(m.domain().unwrap().as_str(), "evil.test");
    }

    #[test]
    fn routing_characters_are_detected() {
        for s in [
            "user%evil.test@example.test",
            "evil.test!user@example.test",
            "\"user@evil.test\"@example.test",
        ] {
            assert!(rcpt(s).unwrap().has_routing_characters(), "{s}");
        }
        assert!(!rcpt("first.last+tag@example.test")
            .unwrap()
            .has_routing_characters());
    }

    #[test]
    fn length_limits_follow_rfc5321() {
        let long_local = format!("{}@example.test", "a".repeat(65));
        assert_eq!(rcpt(&long_local), Err(AddressError::TooLong));
        let long_path = format!("a@{}.test", "b.".repeat(130));
        assert_eq!(rcpt(&long_path), Err(AddressError::TooLong));
    }

    #[test]
    fn split_path_respects_quotes() {
        assert_eq!(
            split_path("<\"a>b\"@x.test> SIZE=1").unwrap(),
            ("\"a>b\"@x.test", " SIZE=1")
        );
        assert_eq!(split_path("<>").unwrap(), ("", ""));
        assert!(split_path("user@x.test").is_err());
        assert!(split_path("<user@x.test").is_err());
    }

    #[test]
    fn internationalised_domains_compare_as_a_labels() {
        let u = DomainName::parse("Bücher.TEST.").unwrap();
        assert_eq!(u.as_str(), "xn--bcher-kva.test");
        assert_eq!(u, DomainName::parse("XN--BCHER-KVA.test").unwrap());
        assert!(
            DomainName::parse("xn--zz.test").is_err(),
            "invalid punycode"
        );
        let m = parse_mailbox("u@bücher.test").unwrap();
        assert_eq!(m.domain().unwrap().as_str(), "xn--bcher-kva.test");
        assert!(!m.is_ascii(), "still needs SMTPUTF8");
        assert!(parse_mailbox("u@xn--bcher-kva.test").unwrap().is_ascii());
    }
}
