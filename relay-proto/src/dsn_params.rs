//! What a sender asks of delivery status notifications (RFC 3461): `RET`
//! and `ENVID` on MAIL, `NOTIFY` and `ORCPT` on RCPT. Parsed and checked
//! at the edge, stored with the message, passed on to a next hop that
//! offers DSN and honoured by our own notifications otherwise.

use serde::{Deserialize, Serialize};

/// `RET=`: what of the message a failure notification returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Ret {
    /// The whole message.
    Full,
    /// Its headers only.
    Hdrs,
}

impl Ret {
    /// Parses the value of `RET=` (case-insensitive).
    pub fn parse(value: &str) -> Option<Ret> {
        match value.to_ascii_uppercase().as_str() {
            "FULL" => Some(Ret::Full),
            "HDRS" => Some(Ret::Hdrs),
            _ => None,
        }
    }

    /// The value as it goes on the wire.
    pub fn keyword(self) -> &'static str {
        match self {
            Ret::Full => "FULL",
            Ret::Hdrs => "HDRS",
        }
    }
}

/// `NOTIFY=`: `NEVER`, or which of success, failure and delay to report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Notify {
    /// Report delivery (`SUCCESS`).
    pub success: bool,
    /// Report failure (`FAILURE`).
    pub failure: bool,
    /// Report delay (`DELAY`).
    pub delay: bool,
}

impl Notify {
    /// `NEVER`: no notification at all.
    pub const NEVER: Notify = Notify {
        success: false,
        failure: false,
        delay: false,
    };

    /// Parses the value of `NOTIFY=` (case-insensitive): `NEVER` alone, or
    /// a comma list of `SUCCESS`, `FAILURE`, `DELAY` without repeats.
    pub fn parse(value: &str) -> Option<Notify> {
        if value.eq_ignore_ascii_case("NEVER") {
            return Some(Notify::NEVER);
        }
        let mut n = Notify::default();
        for word in value.split(',') {
            let slot = match word.to_ascii_uppercase().as_str() {
                "SUCCESS" => &mut n.success,
                "FAILURE" => &mut n.failure,
                "DELAY" => &mut n.delay,
                _ => return None,
            };
            if *slot {
                return None;
            }
            *slot = true;
        }
        Some(n)
    }

    /// `NEVER`: nothing is to be reported.
    pub fn is_never(self) -> bool {
        self == Notify::NEVER
    }
}

impl std::fmt::Display for Notify {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_never() {
            return f.write_str("NEVER");
        }
        let words: Vec<&str> = [
            (self.success, "SUCCESS"),
            (self.failure, "FAILURE"),
            (self.delay, "DELAY"),
        ]
        .iter()
        .filter(|(on, _)| *on)
        .map(|(_, w)| *w)
        .collect();
        f.write_str(&words.join(","))
    }
}

impl TryFrom<String> for Notify {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        Notify::parse(&s).ok_or_else(|| format!("not a NOTIFY value: {s:?}"))
    }
}

impl From<Notify> for String {
    fn from(n: Notify) -> String {
        n.to_string()
    }
}

/// Whether a failure of a recipient that asked `notify` is reported: yes
/// when it did not say (RFC 3461 §4.1: failures by default), else only
/// with `FAILURE`.
pub fn reports_failure(notify: Option<Notify>) -> bool {
    notify.is_none_or(|n| n.failure)
}

/// Checks `xtext` (RFC 3461 §4): printable ASCII but `+` and `=`, and
/// `+XX` with two upper-case hex digits.
pub fn is_xtext(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => {
                let hex = |c: u8| c.is_ascii_digit() || (b'A'..=b'F').contains(&c);
                if i + 2 >= b.len() || !(hex(b[i + 1]) && hex(b[i + 2])) {
                    return false;
                }
                i += 3;
            }
            b'=' => return false,
            33..=126 => i += 1,
            _ => return false,
        }
    }
    true
}

/// Decodes checked xtext; anything that does not decode to UTF-8 comes
/// back as it was.
pub fn decode_xtext(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let digit = |c: u8| (c as char).to_digit(16);
        if b[i] == b'+' && i + 2 < b.len() {
            if let (Some(hi), Some(lo)) = (digit(b[i + 1]), digit(b[i + 2])) {
                out.push((hi * 16 + lo) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8(out).unwrap_or_else(|_| s.to_string())
}

/// Longest `ENVID` value (RFC 3461 §4.4).
pub const MAX_ENVID: usize = 100;
/// Longest `ORCPT` value (RFC 3461 §4.2).
pub const MAX_ORCPT: usize = 500;

/// Checks an `ORCPT=` value: `addr-type ";" xtext`, addr-type an atom.
pub fn is_orcpt(s: &str) -> bool {
    let Some((kind, addr)) = s.split_once(';') else {
        return false;
    };
    s.len() <= MAX_ORCPT
        && !kind.is_empty()
        && kind
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~".contains(&c))
        && !addr.is_empty()
        && is_xtext(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_values() {
        assert_eq!(Notify::parse("never"), Some(Notify::NEVER));
        let n = Notify::parse("Success,DELAY").unwrap();
        assert!(n.success && n.delay && !n.failure);
        assert_eq!(n.to_string(), "SUCCESS,DELAY");
        for bad in [
            "",
            "NEVER,FAILURE",
            "FAILURE,FAILURE",
            "SOMETIMES",
            "SUCCESS,",
        ] {
            assert_eq!(Notify::parse(bad), None, "{bad:?}");
        }
        assert!(reports_failure(None));
        assert!(!reports_failure(Some(Notify::NEVER)));
        assert!(!reports_failure(Notify::parse("SUCCESS")));
        assert!(reports_failure(Notify::parse("FAILURE,DELAY")));
    }

    #[test]
    fn xtext_is_checked_and_decoded() {
        assert!(is_xtext("abc+2Bdef"));
        assert_eq!(decode_xtext("a+2Bb+3Dc"), "a+b=c");
        for bad in ["a=b", "a+2", "a+", "a+2b", "a b", "é"] {
            assert!(!is_xtext(bad), "{bad:?}");
        }
        assert!(is_orcpt("rfc822;bob@example.test"));
        assert!(!is_orcpt("rfc822bob@example.test"));
        assert!(!is_orcpt(";bob@example.test"));
        assert!(!is_orcpt("rfc822;"));
    }
}
