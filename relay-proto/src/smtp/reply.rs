//! SMTP replies (RFC 5321 §4.2) with enhanced status codes (RFC 2034, RFC 3463).
//!
//! Owns the wire formatting of replies only; which reply a situation deserves is
//! decided by the session and the policy code.

use std::fmt;

/// One SMTP reply: a three-digit code, an enhanced status code and text lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The three-digit reply code.
    pub code: u16,
    /// Enhanced status code such as `5.7.1`; empty for replies that carry none
    /// (the greeting, RFC 2034 §3).
    pub status: &'static str,
    /// The text of each line.
    pub lines: Vec<String>,
}

impl Reply {
    /// A one-line reply.
    pub fn new(code: u16, status: &'static str, text: impl Into<String>) -> Self {
        Reply {
            code,
            status,
            lines: vec![text.into()],
        }
    }

    /// A multi-line reply (EHLO's).
    pub fn multiline(code: u16, status: &'static str, lines: Vec<String>) -> Self {
        Reply {
            code,
            status,
            lines,
        }
    }

    /// 2xx and 3xx.
    pub fn is_positive(&self) -> bool {
        self.code < 400
    }

    /// 4xx.
    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }

    /// Appends the wire form (CRLF-terminated lines, `-` continuation) to `out`.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        let last = self.lines.len().saturating_sub(1);
        if self.lines.is_empty() {
            out.extend_from_slice(format!("{}", self.code).as_bytes());
            out.extend_from_slice(b"\r\n");
            return;
        }
        for (i, line) in self.lines.iter().enumerate() {
            let sep = if i == last { ' ' } else { '-' };
            let text: String = line
                .chars()
                .map(|c| if c == '\r' || c == '\n' { ' ' } else { c })
                .collect();
            if self.status.is_empty() {
                out.extend_from_slice(format!("{}{}{}\r\n", self.code, sep, text).as_bytes());
            } else {
                out.extend_from_slice(
                    format!("{}{}{} {}\r\n", self.code, sep, self.status, text).as_bytes(),
                );
            }
        }
    }

    /// The wire form.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write_to(&mut out);
        out
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bytes = self.to_bytes();
        f.write_str(String::from_utf8_lossy(&bytes).trim_end())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_line_reply_carries_enhanced_code() {
        assert_eq!(
            Reply::new(550, "5.7.1", "Relaying denied").to_bytes(),
            b"550 5.7.1 Relaying denied\r\n"
        );
    }

    #[test]
    fn multiline_reply_uses_dash_continuation() {
        let r = Reply::multiline(250, "", vec!["mx".into(), "PIPELINING".into()]);
        assert_eq!(r.to_bytes(), b"250-mx\r\n250 PIPELINING\r\n");
    }

    #[test]
    fn reply_text_cannot_inject_lines() {
        let r = Reply::new(250, "2.0.0", "a\r\n250 evil");
        assert_eq!(r.to_bytes(), b"250 2.0.0 a  250 evil\r\n");
    }
}
