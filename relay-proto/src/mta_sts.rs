//! MTA-STS (RFC 8461): the `_mta-sts` TXT record, the policy file, and
//! which MX hosts a policy allows. Pure parsing; the fetch is the driver's.

use serde::{Deserialize, Serialize};

/// Longest `max_age` a policy may ask for (RFC 8461 §3.2: one year).
pub const MAX_AGE_LIMIT: u64 = 31_557_600;

/// Largest policy file read (RFC 8461 §3.3 suggests 64 KiB).
pub const MAX_POLICY_SIZE: usize = 64 * 1024;

/// Why a record or a policy file is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StsError {
    /// More than one `v=STSv1` TXT record (RFC 8461 §3.1: no policy).
    #[error("more than one v=STSv1 TXT record")]
    SeveralRecords,
    /// The TXT record has no valid `id`.
    #[error("TXT record without a valid id: {0:?}")]
    BadRecord(String),
    /// The policy file is not a valid STSv1 policy.
    #[error("invalid policy: {0}")]
    BadPolicy(String),
}

/// What the `_mta-sts.DOMAIN` TXT record says: a policy exists, with this id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StsRecord {
    /// Changes whenever the policy does (1–32 letters and digits).
    pub id: String,
}

/// Finds the STS record among a name's TXT strings (each already the
/// concatenation of its character-strings). `Ok(None)`: no policy.
pub fn parse_record(txts: &[String]) -> Result<Option<StsRecord>, StsError> {
    let ours: Vec<&String> = txts
        .iter()
        .filter(|t| {
            let t = t.trim_start();
            t.starts_with("v=STSv1;") || t == "v=STSv1"
        })
        .collect();
    let record = match ours.as_slice() {
        [] => return Ok(None),
        [one] => one,
        _ => return Err(StsError::SeveralRecords),
    };
    let id = record
        .split(';')
        .skip(1)
        .filter_map(|field| field.trim().split_once('='))
        .find(|(k, _)| k.trim() == "id")
        .map(|(_, v)| v.trim().to_string())
        .filter(|id| (1..=32).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric()))
        .ok_or_else(|| StsError::BadRecord(record.to_string()))?;
    Ok(Some(StsRecord { id }))
}

/// A policy's mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Deliver only to matching MX hosts over verified TLS.
    Enforce,
    /// Deliver as usual; report what would have failed.
    Testing,
    /// The domain withdrew its policy.
    None,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Enforce => "enforce",
            Mode::Testing => "testing",
            Mode::None => "none",
        })
    }
}

/// An STSv1 policy file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// What to do.
    pub mode: Mode,
    /// MX host patterns (`mx.example.com`, `*.example.com`), lower case.
    pub mx: Vec<String>,
    /// Seconds the policy may be cached.
    pub max_age: u64,
}

/// Parses a policy file (RFC 8461 §3.2): `key: value` lines, CRLF or LF.
pub fn parse_policy(text: &str) -> Result<Policy, StsError> {
    let bad = |s: &str| Err(StsError::BadPolicy(s.to_string()));
    let mut version = None;
    let mut mode = None;
    let mut max_age = None;
    let mut mx = Vec::new();
    for line in text.lines() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            continue;
        }
        let Some((key, value)) = line.split_once(':') else {
            return bad("a line without \"key: value\"");
        };
        let value = value.trim();
        match key.trim() {
            "version" => version = Some(value.to_string()),
            "mode" => {
                mode = Some(match value {
                    "enforce" => Mode::Enforce,
                    "testing" => Mode::Testing,
                    "none" => Mode::None,
                    _ => return bad("mode must be enforce, testing or none"),
                })
            }
            "max_age" => {
                let n: u64 = match value.parse() {
                    Ok(n) if value.len() <= 10 => n,
                    _ => return bad("max_age is not a number of seconds"),
                };
                max_age = Some(n.min(MAX_AGE_LIMIT));
            }
            "mx" => mx.push(value.trim_end_matches('.').to_ascii_lowercase()),
            // Unknown keys are ignored (RFC 8461 §3.2).
            _ => {}
        }
    }
    if version.as_deref() != Some("STSv1") {
        return bad("version must be STSv1");
    }
    let (Some(mode), Some(max_age)) = (mode, max_age) else {
        return bad("mode and max_age are required");
    };
    if mode != Mode::None && mx.is_empty() {
        return bad("no mx pattern");
    }
    Ok(Policy { mode, mx, max_age })
}

/// The policy text of an HTTP response to the policy fetch (RFC 8461
/// §3.3): status 200 only (no redirects), `text/plain`, at most
/// [`MAX_POLICY_SIZE`] octets, plain or chunked.
pub fn policy_from_response(raw: &[u8]) -> Result<String, StsError> {
    let bad = |s: String| Err(StsError::BadPolicy(s));
    let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return bad("no complete HTTP response".into());
    };
    let head = String::from_utf8_lossy(&raw[..end]);
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap_or_default();
    let code = status.split(' ').nth(1).unwrap_or_default();
    if !status.starts_with("HTTP/1.") || code != "200" {
        return bad(format!("HTTP answer {status:?} (only 200 is accepted)"));
    }
    let header = |name: &str| {
        head.split("\r\n").skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_ascii_lowercase())
        })
    };
    let content_type = header("content-type").unwrap_or_default();
    if !content_type.starts_with("text/plain") {
        return bad(format!("content type {content_type:?} is not text/plain"));
    }
    let mut body = raw[end + 4..].to_vec();
    if header("transfer-encoding").is_some_and(|t| t.contains("chunked")) {
        body = dechunk(&body).ok_or_else(|| StsError::BadPolicy("bad chunked body".into()))?;
    } else if let Some(n) = header("content-length").and_then(|n| n.parse::<usize>().ok()) {
        if body.len() < n {
            return bad("body shorter than its Content-Length".into());
        }
        body.truncate(n);
    }
    if body.len() > MAX_POLICY_SIZE {
        return bad(format!("policy larger than {MAX_POLICY_SIZE} octets"));
    }
    String::from_utf8(body).map_err(|_| StsError::BadPolicy("policy is not UTF-8".into()))
}

fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = data.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&data[..eol]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        if size == 0 {
            return Some(out);
        }
        let chunk = data.get(eol + 2..eol + 2 + size)?;
        out.extend_from_slice(chunk);
        if out.len() > MAX_POLICY_SIZE {
            return Some(out);
        }
        data = data.get(eol + 4 + size..)?;
    }
}

impl Policy {
    /// Whether the MX host `host` matches one of the policy's patterns
    /// (RFC 8461 §4.1: a `*.` pattern stands for exactly one leftmost label).
    pub fn allows(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.mx
            .iter()
            .any(|pattern| match pattern.strip_prefix("*.") {
                Some(suffix) => host
                    .split_once('.')
                    .is_some_and(|(label, rest)| !label.is_empty() && rest == suffix),
                None => *pattern == host,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_txt_record_names_a_policy_id() {
        assert_eq!(
            parse_record(&strings(&["v=STSv1; id=20160831085700Z;"])).unwrap(),
            Some(StsRecord {
                id: "20160831085700Z".into()
            })
        );
        assert_eq!(
            parse_record(&strings(&["v=spf1 -all", "other"])).unwrap(),
            None
        );
        assert_eq!(
            parse_record(&strings(&["v=STSv1; id=a", "v=STSv1; id=b"])),
            Err(StsError::SeveralRecords)
        );
        assert!(parse_record(&strings(&["v=STSv1; id=not-alnum!"])).is_err());
        assert!(parse_record(&strings(&["v=STSv1;"])).is_err());
        assert!(parse_record(&strings(&["v=STSv1; id="])).is_err());
    }

    #[test]
    fn a_policy_file_parses_with_crlf_or_lf() {
        let p = parse_policy(
            "version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\nmx: *.example.net\r\nmax_age: 604800\r\n",
        )
        .unwrap();
        assert_eq!(p.mode, Mode::Enforce);
        assert_eq!(p.mx, ["mail.example.com", "*.example.net"]);
        assert_eq!(p.max_age, 604_800);
        let p = parse_policy(
            "version: STSv1\nmode: testing\nmx: MX.Example.com.\nmax_age: 99999999999\nfuture: x\n",
        );
        assert!(p.is_err(), "an 11-digit max_age is refused");
        let p = parse_policy(
            "version: STSv1\nmode: testing\nmx: MX.Example.com.\nmax_age: 9999999999\nfuture: x\n",
        )
        .unwrap();
        assert_eq!(p.mx, ["mx.example.com"]);
        assert_eq!(p.max_age, MAX_AGE_LIMIT);
        assert_eq!(
            parse_policy("version: STSv1\nmode: none\nmax_age: 1\n")
                .unwrap()
                .mode,
            Mode::None
        );
    }

    #[test]
    fn invalid_policies_are_refused() {
        for text in [
            "",
            "mode: enforce\nmx: a.example\nmax_age: 1\n",
            "version: STSv2\nmode: enforce\nmx: a.example\nmax_age: 1\n",
            "version: STSv1\nmode: sometimes\nmx: a.example\nmax_age: 1\n",
            "version: STSv1\nmode: enforce\nmax_age: 1\n",
            "version: STSv1\nmode: enforce\nmx: a.example\n",
            "version: STSv1\nmode: enforce\nmx: a.example\nmax_age: -1\n",
            "<html>not a policy</html>",
        ] {
            assert!(parse_policy(text).is_err(), "{text:?}");
        }
    }

    #[test]
    fn only_a_200_text_plain_answer_is_a_policy() {
        let ok = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 5\r\n\r\nhelloXX";
        assert_eq!(policy_from_response(ok).unwrap(), "hello");
        let chunked = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        assert_eq!(policy_from_response(chunked).unwrap(), "abcde");
        let until_close = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nversion: STSv1\n";
        assert_eq!(
            policy_from_response(until_close).unwrap(),
            "version: STSv1\n"
        );
        for refused in [
            &b"HTTP/1.1 301 Moved\r\nLocation: https://x/\r\nContent-Type: text/plain\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n\r\n<html>",
            b"HTTP/1.1 200 OK\r\n\r\nno type",
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 10\r\n\r\nshort",
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain",
        ] {
            assert!(
                policy_from_response(refused).is_err(),
                "{:?}",
                String::from_utf8_lossy(refused)
            );
        }
        let mut big = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n".to_vec();
        big.extend(std::iter::repeat_n(b'x', MAX_POLICY_SIZE + 1));
        assert!(policy_from_response(&big).is_err());
    }

    #[test]
    fn wildcards_match_one_label_only() {
        let p = Policy {
            mode: Mode::Enforce,
            mx: vec!["mail.example.com".into(), "*.example.net".into()],
            max_age: 1,
        };
        assert!(p.allows("mail.example.com"));
        assert!(p.allows("MAIL.example.com."));
        assert!(p.allows("mx1.example.net"));
        assert!(!p.allows("example.net"));
        assert!(!p.allows("a.b.example.net"));
        assert!(!p.allows("other.example.com"));
    }
}
