//! SMTP command grammar (RFC 5321 §4.1.1), one line at a time.
//!
//! Pure parsing: turns a command line (without its CRLF) into a [`Command`] or
//! a [`Reply`] explaining the syntax error. Sequencing and policy live in the
//! session.

use super::reply::Reply;
use crate::address::{self, AddressError, Mailbox, ReversePath};
use crate::dsn_params::{self, Notify, Ret};
use crate::queue::{MessageDsn, RcptDsn};

/// BODY= values (RFC 6152).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    /// `BODY=7BIT`.
    SevenBit,
    /// `BODY=8BITMIME`.
    EightBitMime,
}

/// MAIL FROM parameters we advertise and therefore accept.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MailParams {
    /// RFC 1870 declared size.
    pub size: Option<u64>,
    /// RFC 6152 body type.
    pub body: Option<Body>,
    /// RFC 6531.
    pub smtputf8: bool,
    /// RFC 3461 `RET=` and `ENVID=` (kept as the xtext received).
    pub dsn: MessageDsn,
    /// RFC 8689 `REQUIRETLS`.
    pub requiretls: bool,
}

/// RCPT TO parameters: RFC 3461's `NOTIFY=` and `ORCPT=`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RcptParams {
    /// What the sender asked of this recipient.
    pub dsn: RcptDsn,
}

/// One parsed SMTP command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// EHLO with the client's name (RFC 5321 §4.1.1.1).
    Ehlo(String),
    /// HELO with the client's name.
    Helo(String),
    /// MAIL FROM with its parameters.
    Mail(ReversePath, MailParams),
    /// RCPT TO with a mailbox.
    Rcpt(Mailbox, RcptParams),
    /// `RCPT TO:<postmaster>` without a domain, which a server must accept
    /// (RFC 5321 §4.5.1).
    RcptPostmaster(RcptParams),
    /// DATA.
    Data,
    /// RSET.
    Rset,
    /// NOOP.
    Noop,
    /// QUIT.
    Quit,
    /// VRFY, answered 252 without looking (RFC 5321 §3.5.3).
    Vrfy,
    /// HELP.
    Help,
    /// STARTTLS (RFC 3207).
    StartTls,
    /// ETRN (RFC 1985) with its node argument.
    Etrn(String),
    /// BDAT (RFC 3030): `size` octets of message data follow the line.
    Bdat {
        /// The chunk's size in octets.
        size: u64,
        /// `LAST`: the chunk ends the message.
        last: bool,
    },
    /// Recognised but not offered (EXPN, TURN, AUTH, ATRN …): 502.
    NotImplemented(&'static str),
}

/// The line could not be turned into a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntaxError(pub Reply);

fn err(code: u16, status: &'static str, text: &str) -> SyntaxError {
    SyntaxError(Reply::new(code, status, text))
}

/// Parses one command line. The verb is case-insensitive; arguments are
/// separated from it by exactly the grammar's single space, though extra
/// spaces are tolerated as real MTAs send them.
pub fn parse(line: &[u8]) -> Result<Command, SyntaxError> {
    let Ok(line) = std::str::from_utf8(line) else {
        return Err(err(
            500,
            "5.5.2",
            "Syntax error, command contains invalid UTF-8",
        ));
    };
    if line.bytes().any(|b| b < 32 && b != b'\t') || line.contains('\u{7f}') {
        return Err(err(
            500,
            "5.5.2",
            "Syntax error, command contains control characters",
        ));
    }
    let (verb, args) = match line.find(' ') {
        Some(i) => (&line[..i], line[i + 1..].trim()),
        None => (line, ""),
    };
    let verb = verb.to_ascii_uppercase();
    let no_args = |cmd: Command| {
        if args.is_empty() {
            Ok(cmd)
        } else {
            Err(err(501, "5.5.4", "Syntax error, no parameters allowed"))
        }
    };
    match verb.as_str() {
        "EHLO" => parse_helo_name(args).map(Command::Ehlo),
        "HELO" => parse_helo_name(args).map(Command::Helo),
        "MAIL" => parse_mail(args),
        "RCPT" => parse_rcpt(args),
        "DATA" => no_args(Command::Data),
        "RSET" => no_args(Command::Rset),
        // NOOP and HELP may carry a string argument which is ignored.
        "NOOP" => Ok(Command::Noop),
        "HELP" => Ok(Command::Help),
        "QUIT" => no_args(Command::Quit),
        "VRFY" => {
            if args.is_empty() {
                Err(err(501, "5.5.4", "Syntax: VRFY address"))
            } else {
                Ok(Command::Vrfy)
            }
        }
        "STARTTLS" => no_args(Command::StartTls),
        "EXPN" => Ok(Command::NotImplemented("EXPN")),
        "TURN" => Ok(Command::NotImplemented("TURN")),
        "ATRN" => Ok(Command::NotImplemented("ATRN")),
        "ETRN" => {
            if args.is_empty() || args.contains(' ') {
                Err(err(501, "5.5.4", "Syntax: ETRN domain"))
            } else {
                Ok(Command::Etrn(args.to_string()))
            }
        }
        "AUTH" => Ok(Command::NotImplemented("AUTH")),
        "BDAT" => parse_bdat(args),
        "SEND" | "SOML" | "SAML" => Ok(Command::NotImplemented("SEND")),
        _ => Err(err(500, "5.5.2", "Syntax error, command unrecognized")),
    }
}

/// The line is a BDAT command, valid or not: after a BDAT whose chunk
/// size cannot be read the session can no longer tell data from commands.
pub fn is_bdat(line: &[u8]) -> bool {
    line.len() >= 4
        && line[..4].eq_ignore_ascii_case(b"BDAT")
        && line.get(4).is_none_or(|b| *b == b' ')
}

/// `BDAT chunk-size [LAST]` (RFC 3030 §2): the size is 1*DIGIT.
fn parse_bdat(args: &str) -> Result<Command, SyntaxError> {
    let syntax = || err(501, "5.5.4", "Syntax: BDAT chunk-size [LAST]");
    let mut words = args.split(' ').filter(|w| !w.is_empty());
    let size = words
        .next()
        .filter(|n| n.len() <= 20 && n.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|n| n.parse::<u64>().ok())
        .ok_or_else(syntax)?;
    let last = match words.next() {
        None => false,
        Some(w) if w.eq_ignore_ascii_case("LAST") => true,
        Some(_) => return Err(syntax()),
    };
    if words.next().is_some() {
        return Err(syntax());
    }
    Ok(Command::Bdat { size, last })
}

fn parse_helo_name(args: &str) -> Result<String, SyntaxError> {
    if args.is_empty() {
        return Err(err(501, "5.5.4", "Syntax: EHLO hostname"));
    }
    // Domain or address literal. The name lands in our Received header, so
    // anything that could break its grammar is refused.
    let ok = args.chars().all(|c| {
        c.is_ascii_alphanumeric() || "-._:[]".contains(c) || (!c.is_ascii() && !c.is_control())
    });
    if !ok || args.len() > address::MAX_DOMAIN {
        return Err(err(
            501,
            "5.5.2",
            "Syntax: EHLO hostname (invalid hostname)",
        ));
    }
    Ok(args.to_string())
}

/// Strips `FROM:` / `TO:` (case-insensitive), allowing a space after the colon
/// as many senders emit it.
fn strip_keyword<'a>(args: &'a str, keyword: &str) -> Option<&'a str> {
    let head = args.get(..keyword.len())?;
    if !head.eq_ignore_ascii_case(keyword) {
        return None;
    }
    Some(args[keyword.len()..].trim_start())
}

fn parse_mail(args: &str) -> Result<Command, SyntaxError> {
    let syntax = || err(501, "5.5.4", "Syntax: MAIL FROM:<address>");
    let rest = strip_keyword(args, "FROM:").ok_or_else(syntax)?;
    let (path, params) = address::split_path(rest).map_err(|_| syntax())?;
    let reverse =
        address::parse_reverse_path(path).map_err(|e| address_error(e, "5.1.7", "sender"))?;
    let mut out = MailParams::default();
    for (key, value) in esmtp_params(params)? {
        match (key.to_ascii_uppercase().as_str(), value) {
            ("SIZE", Some(v)) if out.size.is_none() => {
                let size = v
                    .parse::<u64>()
                    .ok()
                    .filter(|_| v.len() <= 20 && v.bytes().all(|b| b.is_ascii_digit()))
                    .ok_or_else(|| err(501, "5.5.4", "Syntax error in SIZE parameter"))?;
                out.size = Some(size);
            }
            ("BODY", Some(v)) if out.body.is_none() => {
                out.body = Some(match v.to_ascii_uppercase().as_str() {
                    "7BIT" => Body::SevenBit,
                    "8BITMIME" => Body::EightBitMime,
                    _ => return Err(err(501, "5.5.4", "Unsupported BODY type")),
                });
            }
            ("SMTPUTF8", None) if !out.smtputf8 => out.smtputf8 = true,
            ("REQUIRETLS", None) if !out.requiretls => out.requiretls = true,
            ("RET", Some(v)) if out.dsn.ret.is_none() => {
                out.dsn.ret = Some(
                    Ret::parse(v).ok_or_else(|| err(501, "5.5.4", "RET must be FULL or HDRS"))?,
                );
            }
            ("ENVID", Some(v)) if out.dsn.envid.is_none() => {
                if v.len() > dsn_params::MAX_ENVID || !dsn_params::is_xtext(v) {
                    return Err(err(501, "5.5.4", "Syntax error in ENVID parameter"));
                }
                out.dsn.envid = Some(v.to_string());
            }
            ("SIZE" | "BODY" | "SMTPUTF8" | "RET" | "ENVID" | "REQUIRETLS", _) => {
                return Err(err(501, "5.5.4", "Invalid or repeated parameter"));
            }
            _ => return Err(err(555, "5.5.4", "Unsupported MAIL parameter")),
        }
    }
    Ok(Command::Mail(reverse, out))
}

fn parse_rcpt(args: &str) -> Result<Command, SyntaxError> {
    let syntax = || err(501, "5.5.4", "Syntax: RCPT TO:<address>");
    let rest = strip_keyword(args, "TO:").ok_or_else(syntax)?;
    let (path, params) = address::split_path(rest).map_err(|_| syntax())?;
    let mut out = RcptParams::default();
    for (key, value) in esmtp_params(params)? {
        match (key.to_ascii_uppercase().as_str(), value) {
            ("NOTIFY", Some(v)) if out.dsn.notify.is_none() => {
                out.dsn.notify = Some(Notify::parse(v).ok_or_else(|| {
                    err(
                        501,
                        "5.5.4",
                        "NOTIFY must be NEVER or SUCCESS, FAILURE, DELAY",
                    )
                })?);
            }
            ("ORCPT", Some(v)) if out.dsn.orcpt.is_none() => {
                if !dsn_params::is_orcpt(v) {
                    return Err(err(501, "5.5.4", "Syntax error in ORCPT parameter"));
                }
                out.dsn.orcpt = Some(v.to_string());
            }
            ("NOTIFY" | "ORCPT", _) => {
                return Err(err(501, "5.5.4", "Invalid or repeated parameter"));
            }
            _ => return Err(err(555, "5.5.4", "Unsupported RCPT parameter")),
        }
    }
    if path.eq_ignore_ascii_case("postmaster") {
        return Ok(Command::RcptPostmaster(out));
    }
    let mailbox =
        address::parse_forward_path(path).map_err(|e| address_error(e, "5.1.3", "recipient"))?;
    Ok(Command::Rcpt(mailbox, out))
}

fn address_error(e: AddressError, status: &'static str, what: &str) -> SyntaxError {
    match e {
        AddressError::TooLong => SyntaxError(Reply::new(
            501,
            status,
            format!("Bad {what} address: too long"),
        )),
        _ => SyntaxError(Reply::new(
            501,
            status,
            format!("Bad {what} address syntax"),
        )),
    }
}

/// `esmtp-param *(SP esmtp-param)`; keyword `(ALPHA / DIGIT) *(ALPHA / DIGIT / "-")`,
/// value `1*(%d33-60 / %d62-126)` (UTF-8 allowed per RFC 6531).
fn esmtp_params(s: &str) -> Result<Vec<(&str, Option<&str>)>, SyntaxError> {
    let mut out = Vec::new();
    if s.is_empty() {
        return Ok(out);
    }
    if !s.starts_with(' ') {
        return Err(err(501, "5.5.4", "Syntax error after address"));
    }
    for param in s.split(' ').filter(|p| !p.is_empty()) {
        let (key, value) = match param.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (param, None),
        };
        let key_ok = key
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric())
            && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
        let value_ok = value.is_none_or(|v| {
            !v.is_empty()
                && v.chars()
                    .all(|c| (c > ' ' && c != '=' && c != '\u{7f}') || !c.is_ascii())
        });
        if !key_ok || !value_ok {
            return Err(err(501, "5.5.4", "Syntax error in parameters"));
        }
        out.push((key, value));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::address::Host;

    fn code(line: &str) -> u16 {
        match parse(line.as_bytes()) {
            Ok(_) => 0,
            Err(SyntaxError(r)) => r.code,
        }
    }

    #[test]
    fn verbs_are_case_insensitive() {
        assert_eq!(
            parse(b"ehlo client.test").unwrap(),
            Command::Ehlo("client.test".into())
        );
        assert_eq!(parse(b"QuIt").unwrap(), Command::Quit);
        assert_eq!(parse(b"noop anything").unwrap(), Command::Noop);
    }

    #[test]
    fn dsn_parameters_are_kept_as_received() {
        let Command::Mail(_, p) = parse(b"MAIL FROM:<a@b.test> ret=hdrs ENVID=QQ+2B1").unwrap()
        else {
            panic!()
        };
        assert_eq!(p.dsn.ret, Some(Ret::Hdrs));
        assert_eq!(p.dsn.envid.as_deref(), Some("QQ+2B1"));
        let Command::Rcpt(_, p) =
            parse(b"RCPT TO:<u@example.test> notify=failure,delay ORCPT=rfc822;U+40x").unwrap()
        else {
            panic!()
        };
        assert_eq!(p.dsn.notify, Notify::parse("FAILURE,DELAY"));
        assert_eq!(p.dsn.orcpt.as_deref(), Some("rfc822;U+40x"));
        let Command::RcptPostmaster(p) = parse(b"RCPT TO:<Postmaster> NOTIFY=NEVER").unwrap()
        else {
            panic!()
        };
        assert_eq!(p.dsn.notify, Some(Notify::NEVER));
    }

    #[test]
    fn command_table() {
        let cases: &[(&str, u16)] = &[
            ("EHLO", 501),
            ("EHLO client.test", 0),
            ("EHLO [192.0.2.1]", 0),
            ("HELO a;b", 501),
            ("MAIL FROM:<a@b.test>", 0),
            ("MAIL FROM: <a@b.test>", 0),
            ("mail from:<>", 0),
            ("MAIL FROM:a@b.test", 501),
            ("MAIL TO:<a@b.test>", 501),
            ("MAIL FROM:<a@b.test> SIZE=1000", 0),
            ("MAIL FROM:<a@b.test> SIZE=1000 BODY=8BITMIME SMTPUTF8", 0),
            ("MAIL FROM:<a@b.test> SIZE=abc", 501),
            ("MAIL FROM:<a@b.test> SIZE=1 SIZE=2", 501),
            ("MAIL FROM:<a@b.test> BODY=BINARYMIME", 501),
            ("MAIL FROM:<a@b.test> AUTH=<>", 555),
            ("MAIL FROM:<a@b.test>SIZE=1", 501),
            ("MAIL FROM:<a@@b.test>", 501),
            ("RCPT TO:<u@example.test>", 0),
            ("RCPT TO:<u@example.test> NOTIFY=NEVER", 0),
            (
                "RCPT TO:<u@example.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;u@example.test",
                0,
            ),
            ("RCPT TO:<u@example.test> NOTIFY=NEVER,FAILURE", 501),
            ("RCPT TO:<u@example.test> NOTIFY=SOMETIMES", 501),
            ("RCPT TO:<u@example.test> NOTIFY=NEVER NOTIFY=NEVER", 501),
            ("RCPT TO:<u@example.test> ORCPT=u@example.test", 501),
            ("RCPT TO:<u@example.test> ORCPT=rfc822;a+2", 501),
            ("RCPT TO:<u@example.test> XFOO=1", 555),
            ("MAIL FROM:<a@b.test> RET=HDRS ENVID=abc+2Bdef", 0),
            ("MAIL FROM:<a@b.test> RET=PARTIAL", 501),
            ("MAIL FROM:<a@b.test> RET=FULL RET=HDRS", 501),
            ("MAIL FROM:<a@b.test> ENVID=a=b", 501),
            ("RCPT TO:<>", 501),
            ("RCPT TO:u@example.test", 501),
            ("DATA", 0),
            ("DATA x", 501),
            ("RSET", 0),
            ("VRFY", 501),
            ("VRFY user", 0),
            ("STARTTLS", 0),
            ("STARTTLS now", 501),
            ("FOO", 500),
            ("", 500),
            ("MAIL FROM:<a@b.test>\0", 500),
        ];
        for (line, expected) in cases {
            assert_eq!(code(line), *expected, "{line:?}");
        }
    }

    #[test]
    fn mail_parameters_are_parsed() {
        let Command::Mail(from, p) =
            parse(b"MAIL FROM:<a@b.test> size=42 body=8bitmime SMTPUTF8").unwrap()
        else {
            panic!("not MAIL")
        };
        assert_eq!(from.to_string(), "a@b.test");
        assert_eq!(
            p,
            MailParams {
                dsn: Default::default(),
                size: Some(42),
                body: Some(Body::EightBitMime),
                smtputf8: true,
                requiretls: false,
            }
        );
    }

    #[test]
    fn rcpt_keeps_local_part_and_routes_by_domain() {
        let Command::Rcpt(m, _) = parse(b"RCPT TO:<@evil.test:\"x y\"@Example.TEST.>").unwrap()
        else {
            panic!("not RCPT")
        };
        assert_eq!(m.local, "\"x y\"");
        assert_eq!(
            m.host,
            Host::Domain(crate::address::DomainName::parse("example.test").unwrap())
        );
    }

    #[test]
    fn unimplemented_commands_are_recognised() {
        assert_eq!(
            parse(b"EXPN list").unwrap(),
            Command::NotImplemented("EXPN")
        );
    }

    #[test]
    fn bdat_takes_a_size_and_an_optional_last() {
        assert_eq!(
            parse(b"BDAT 10 LAST").unwrap(),
            Command::Bdat {
                size: 10,
                last: true
            }
        );
        assert_eq!(
            parse(b"bdat 0 last").unwrap(),
            Command::Bdat {
                size: 0,
                last: true
            }
        );
        assert_eq!(
            parse(b"BDAT 4096").unwrap(),
            Command::Bdat {
                size: 4096,
                last: false
            }
        );
        for bad in [
            &b"BDAT"[..],
            b"BDAT -1",
            b"BDAT 1x",
            b"BDAT 10 FIRST",
            b"BDAT 10 LAST x",
            b"BDAT 123456789012345678901",
            b"BDAT +5",
        ] {
            let Err(SyntaxError(r)) = parse(bad) else {
                panic!("{bad:?} parsed")
            };
            assert_eq!(r.code, 501, "{bad:?}");
            assert!(is_bdat(bad), "{bad:?}");
        }
        assert!(!is_bdat(b"BDATX 1"));
        assert!(!is_bdat(b"DATA"));
    }
}
