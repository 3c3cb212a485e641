//! Content filtering with rspamd, at the edge: after a message's data is in
//! and before anything is stored, so a refusal never leaves a queued copy.
//!
//! The message goes to rspamd's `/checkv2` (rspamd's HTTP protocol, the one
//! its milter proxy and Haraka's plugin speak) with the envelope in request
//! headers. rspamd answers with an action, which [`decide`] turns into our
//! answer at the end of DATA:
//! - `reject` → `550 5.7.1`, with rspamd's `messages.smtp_message` if any;
//! - `soft reject`, `greylist` → `451 4.7.1`;
//! - anything else → accepted, with the header changes rspamd's `milter`
//!   block asks for ([`headers`]) and, for `rewrite subject`, its subject.
//!
//! A filter that cannot answer (unreachable, an HTTP error, slower than the
//! timeout, or busy with as many messages as it may have at once) is never
//! a reason to lose mail: `on_error = "accept"` takes the message unscanned,
//! `"tempfail"` asks the client to come back (`451 4.7.1`).
//!
//! The I/O is [`client`]; what is sent ([`request_headers`]) and what the
//! answer means ([`parse_reply`], [`decide`]) are pure and tested here.

pub mod client;
pub mod headers;

use std::net::IpAddr;
use std::time::Duration;

use serde_json::Value;

use crate::smtp::Reply;

pub use client::{Body, Rspamd};
pub use headers::HeaderEdits;

/// What to do with a message when the filter cannot answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    /// Accept it unscanned (counted and logged).
    #[default]
    Accept,
    /// Answer `451 4.7.1`: the client tries again later.
    Tempfail,
}

/// How the filter is reached and how long it may take.
#[derive(Debug, Clone)]
pub struct FilterSettings {
    /// `host:port` of rspamd's normal worker (or proxy).
    pub authority: String,
    /// Path prefix before `/checkv2` (empty for rspamd itself).
    pub base_path: String,
    /// Longest a scan may take, waiting for a free slot included.
    pub timeout: Duration,
    pub on_error: OnError,
    /// Messages at once with the filter (a slow rspamd cannot pile up
    /// every session's body).
    pub max_concurrent: usize,
    /// Our name, sent as `MTA-Name`.
    pub mta_name: String,
}

/// Splits an `http://host:port[/path]` URL into authority and path.
pub fn parse_url(url: &str) -> Result<(String, String), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url:?}: expected http://host:port (rspamd's normal worker)"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
        None => (rest, ""),
    };
    if authority.is_empty() {
        return Err(format!("{url:?}: no host"));
    }
    let authority = if authority
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        && !authority.ends_with(']')
    {
        authority.to_string()
    } else {
        format!("{authority}:11333")
    };
    Ok((authority, path.to_string()))
}

/// The envelope of one message, as rspamd wants it.
#[derive(Debug, Clone)]
pub struct Envelope {
    /// The real client (behind a PROXY header, the original one).
    pub client_ip: IpAddr,
    pub helo: String,
    /// The client's verified reverse name, if known.
    pub hostname: Option<String>,
    /// Empty for the null sender.
    pub sender: String,
    pub recipients: Vec<String>,
    pub queue_id: String,
}

/// The request headers carrying `envelope` (rspamd's protocol: one `Rcpt`
/// per recipient).
pub fn request_headers(envelope: &Envelope, mta_name: &str) -> Vec<(&'static str, String)> {
    let mut h = vec![("IP", envelope.client_ip.to_string())];
    if !envelope.helo.is_empty() {
        h.push(("Helo", envelope.helo.clone()));
    }
    if let Some(name) = &envelope.hostname {
        h.push(("Hostname", name.clone()));
    }
    // rspamd reads a missing From as the null sender.
    if !envelope.sender.is_empty() {
        h.push(("From", envelope.sender.clone()));
    }
    for r in &envelope.recipients {
        h.push(("Rcpt", r.clone()));
    }
    h.push(("Queue-Id", envelope.queue_id.clone()));
    h.push(("MTA-Name", mta_name.to_string()));
    h.into_iter()
        .map(|(k, v)| (k, v.replace(['\r', '\n'], "")))
        .collect()
}

/// rspamd's action for a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Reject,
    SoftReject,
    Greylist,
    AddHeader,
    RewriteSubject,
    NoAction,
    /// An action this version does not know: treated as `no action`.
    Other(String),
}

impl Action {
    fn parse(s: &str) -> Action {
        match s {
            "reject" => Action::Reject,
            "soft reject" => Action::SoftReject,
            "greylist" => Action::Greylist,
            "add header" => Action::AddHeader,
            "rewrite subject" => Action::RewriteSubject,
            "no action" => Action::NoAction,
            other => Action::Other(other.to_string()),
        }
    }

    /// The metric label.
    pub fn label(&self) -> &str {
        match self {
            Action::Reject => "reject",
            Action::SoftReject => "soft_reject",
            Action::Greylist => "greylist",
            Action::AddHeader => "add_header",
            Action::RewriteSubject => "rewrite_subject",
            Action::NoAction => "no_action",
            Action::Other(_) => "other",
        }
    }
}

/// What rspamd answered about one message.
#[derive(Debug, Clone, PartialEq)]
pub struct ScanReply {
    pub action: Action,
    pub score: f64,
    pub required_score: f64,
    /// `messages.smtp_message`: what the client should be told.
    pub smtp_message: Option<String>,
    /// The header changes of the `milter` block, and the new subject.
    pub edits: HeaderEdits,
    /// rspamd's own time for the scan (`time_real`), seconds.
    pub time_real: Option<f64>,
}

/// Reads `/checkv2`'s JSON answer.
pub fn parse_reply(body: &[u8]) -> Result<ScanReply, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    let action = v
        .get("action")
        .and_then(Value::as_str)
        .ok_or("no action in the reply")?;
    let action = Action::parse(action);
    let smtp_message = v
        .pointer("/messages/smtp_message")
        .and_then(Value::as_str)
        .map(str::to_string);
    let mut edits = v
        .get("milter")
        .map(HeaderEdits::from_milter)
        .unwrap_or_default();
    if action == Action::RewriteSubject {
        edits.subject = v.get("subject").and_then(Value::as_str).map(str::to_string);
    }
    Ok(ScanReply {
        action,
        score: v.get("score").and_then(Value::as_f64).unwrap_or(0.0),
        required_score: v
            .get("required_score")
            .and_then(Value::as_f64)
            .unwrap_or(0.0),
        smtp_message,
        edits,
        time_real: v.get("time_real").and_then(Value::as_f64),
    })
}

/// Our answer to a scanned message.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Refused at the end of DATA.
    Refuse(Reply),
    /// Accepted, with these changes to its header.
    Accept(HeaderEdits),
}

/// What a scan means for the message. `never_refuse` (mail to
/// `postmaster@`, RFC 5321 §4.5.1) keeps the headers and drops the refusal.
pub fn decide(reply: &ScanReply, never_refuse: bool) -> Decision {
    let text = |default: &str| {
        let t = reply
            .smtp_message
            .as_deref()
            .map(|m| m.replace(['\r', '\n'], " "))
            .filter(|m| !m.trim().is_empty())
            .unwrap_or_else(|| default.to_string());
        t.chars().take(400).collect::<String>()
    };
    match reply.action {
        Action::Reject if !never_refuse => {
            Decision::Refuse(Reply::new(550, "5.7.1", text("Message rejected as spam")))
        }
        Action::SoftReject | Action::Greylist if !never_refuse => {
            Decision::Refuse(Reply::new(451, "4.7.1", text("Try again later")))
        }
        _ => Decision::Accept(reply.edits.clone()),
    }
}

/// Our answer when the filter could not answer.
pub fn decide_on_error(on_error: OnError) -> Decision {
    match on_error {
        OnError::Accept => Decision::Accept(HeaderEdits::default()),
        OnError::Tempfail => Decision::Refuse(Reply::new(
            451,
            "4.7.1",
            "Content filter unavailable, try again later",
        )),
    }
}

/// Why a scan failed (the metric's `reason`).
#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    #[error("the filter is busy with as many messages as it may have at once")]
    Busy,
    #[error("no answer within the timeout")]
    Timeout,
    #[error("cannot connect to the filter: {0}")]
    Connect(std::io::Error),
    #[error("cannot read the message body: {0}")]
    Body(std::io::Error),
    #[error("HTTP exchange with the filter failed: {0}")]
    Http(String),
    #[error("the filter answered HTTP {0}")]
    Status(u16),
    #[error("the filter's answer is not understood: {0}")]
    BadReply(String),
}

impl FilterError {
    pub fn reason(&self) -> &'static str {
        match self {
            FilterError::Busy => "busy",
            FilterError::Timeout => "timeout",
            FilterError::Connect(_) => "connect",
            FilterError::Body(_) => "body",
            FilterError::Http(_) => "http",
            FilterError::Status(_) => "status",
            FilterError::BadReply(_) => "bad_reply",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GTUBE_REPLY: &str = r#"{"is_skipped":true,"score":15.0,"required_score":15.0,"action":"reject","symbols":{"GTUBE":{"name":"GTUBE","score":0.0}},"messages":{"smtp_message":"Gtube pattern"},"message-id":"undef","time_real":0.215158}"#;
    const HAM_REPLY: &str = r#"{"is_skipped":false,"score":-0.1,"required_score":15.0,"action":"no action","symbols":{},"messages":{},"time_real":0.0065,"milter":{"remove_headers":{"X-Spam":0}}}"#;

    #[test]
    fn urls_name_the_worker() {
        assert_eq!(
            parse_url("http://127.0.0.1:11333").unwrap(),
            ("127.0.0.1:11333".into(), "".into())
        );
        assert_eq!(
            parse_url("http://rspamd/").unwrap(),
            ("rspamd:11333".into(), "".into())
        );
        assert_eq!(
            parse_url("http://[::1]:9/scan/").unwrap(),
            ("[::1]:9".into(), "/scan".into())
        );
        assert!(parse_url("https://x").is_err());
        assert!(parse_url("http://").is_err());
    }

    #[test]
    fn the_envelope_goes_in_headers_one_rcpt_each() {
        let env = Envelope {
            client_ip: "192.0.2.7".parse().unwrap(),
            helo: "mx.remote.test".into(),
            hostname: None,
            sender: "a@remote.test".into(),
            recipients: vec!["u@example.test".into(), "v@example.test".into()],
            queue_id: "01ABC".into(),
        };
        let h = request_headers(&env, "backup.example.net");
        assert_eq!(
            h,
            vec![
                ("IP", "192.0.2.7".to_string()),
                ("Helo", "mx.remote.test".into()),
                ("From", "a@remote.test".into()),
                ("Rcpt", "u@example.test".into()),
                ("Rcpt", "v@example.test".into()),
                ("Queue-Id", "01ABC".into()),
                ("MTA-Name", "backup.example.net".into()),
            ]
        );
        // The null sender: no From; a HELO with a line break cannot split
        // the request.
        let null = Envelope {
            sender: String::new(),
            helo: "evil\r\nX: y".into(),
            ..env
        };
        let h = request_headers(&null, "b");
        assert!(h.iter().all(|(k, _)| *k != "From"));
        assert!(h.contains(&("Helo", "evilX: y".to_string())));
    }

    #[test]
    fn gtube_is_refused_with_rspamds_message() {
        let r = parse_reply(GTUBE_REPLY.as_bytes()).unwrap();
        assert_eq!(r.action, Action::Reject);
        assert_eq!(r.smtp_message.as_deref(), Some("Gtube pattern"));
        assert_eq!(
            decide(&r, false),
            Decision::Refuse(Reply::new(550, "5.7.1", "Gtube pattern"))
        );
        // Mail to postmaster is never refused.
        assert!(matches!(decide(&r, true), Decision::Accept(_)));
    }

    #[test]
    fn soft_reject_and_greylist_are_temporary() {
        for action in ["soft reject", "greylist"] {
            let r =
                parse_reply(format!(r#"{{"action":"{action}","score":5}}"#).as_bytes()).unwrap();
            match decide(&r, false) {
                Decision::Refuse(reply) => {
                    assert_eq!(reply.code, 451);
                    assert_eq!(
                        (reply.status, reply.lines[0].as_str()),
                        ("4.7.1", "Try again later")
                    );
                }
                other => panic!("{action}: {other:?}"),
            }
        }
    }

    #[test]
    fn other_actions_are_accepted_with_the_milter_edits() {
        let r = parse_reply(HAM_REPLY.as_bytes()).unwrap();
        assert_eq!(r.action, Action::NoAction);
        assert_eq!(r.time_real, Some(0.0065));
        match decide(&r, false) {
            Decision::Accept(edits) => assert_eq!(edits.remove, vec![("X-Spam".into(), 0)]),
            other => panic!("{other:?}"),
        }
        let unknown = parse_reply(br#"{"action":"discard"}"#).unwrap();
        assert_eq!(unknown.action, Action::Other("discard".into()));
        assert!(matches!(decide(&unknown, false), Decision::Accept(_)));
    }

    #[test]
    fn the_subject_is_rewritten_only_when_the_action_says_so() {
        let rewrite =
            parse_reply(br#"{"action":"rewrite subject","subject":"***SPAM*** hi","score":7}"#)
                .unwrap();
        assert_eq!(rewrite.edits.subject.as_deref(), Some("***SPAM*** hi"));
        let add = parse_reply(br#"{"action":"add header","subject":"***SPAM*** hi"}"#).unwrap();
        assert_eq!(add.edits.subject, None);
    }

    #[test]
    fn a_reply_without_an_action_is_an_error() {
        assert!(parse_reply(b"{}").is_err());
        assert!(parse_reply(b"<html>").is_err());
    }

    #[test]
    fn on_error_accepts_or_asks_to_come_back() {
        assert_eq!(
            decide_on_error(OnError::Accept),
            Decision::Accept(HeaderEdits::default())
        );
        match decide_on_error(OnError::Tempfail) {
            Decision::Refuse(r) => assert_eq!(r.code, 451),
            other => panic!("{other:?}"),
        }
    }
}
