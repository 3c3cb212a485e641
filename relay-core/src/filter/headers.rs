//! The header changes rspamd asks an MTA for (its reply's `milter` block:
//! `add_headers`, `remove_headers`; and the subject of `rewrite subject`),
//! applied to a message's header block. Pure: bytes in, bytes out.
//!
//! Added fields go below our own `Received:` (the message's first field),
//! so our trace field stays on top and the Authentication-Results we may
//! prepend later lands above both. Nothing else of the message changes, so
//! DKIM signatures over it stay valid (unless rspamd removes a signed
//! field, which is its operator's choice).

use serde_json::Value;

/// Changes to a message's header.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HeaderEdits {
    /// Field name and which occurrence: 0 every one, n > 0 the n-th from
    /// the top, n < 0 the n-th from the bottom.
    pub remove: Vec<(String, i64)>,
    /// Fields to add, in order.
    pub add: Vec<(String, String)>,
    /// The new Subject (`rewrite subject`).
    pub subject: Option<String>,
}

impl HeaderEdits {
    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.add.is_empty() && self.subject.is_none()
    }

    /// Reads rspamd's `milter` block. Values may be a string, an object
    /// with `value` (and `order`), or an array of either.
    pub fn from_milter(milter: &Value) -> HeaderEdits {
        let mut edits = HeaderEdits::default();
        if let Some(remove) = milter.get("remove_headers").and_then(Value::as_object) {
            for (name, which) in remove {
                if valid_name(name) {
                    edits
                        .remove
                        .push((name.clone(), which.as_i64().unwrap_or(0)));
                }
            }
        }
        if let Some(add) = milter.get("add_headers").and_then(Value::as_object) {
            for (name, v) in add {
                if !valid_name(name) {
                    continue;
                }
                let values: Vec<&Value> = match v {
                    Value::Array(items) => items.iter().collect(),
                    other => vec![other],
                };
                for v in values {
                    let text = match v {
                        Value::String(s) => Some(s.as_str()),
                        Value::Object(o) => o.get("value").and_then(Value::as_str),
                        _ => None,
                    };
                    if let Some(t) = text {
                        edits.add.push((name.clone(), t.to_string()));
                    }
                }
            }
        }
        edits
    }
}

/// A field name (RFC 5322 §3.6.8: printable ASCII but `:`).
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 100
        && name.bytes().all(|b| (33..=126).contains(&b) && b != b':')
}

/// A field value made safe to write: line breaks followed by white space
/// stay as folds (CRLF), any other line break becomes a fold.
fn fold_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let mut chars = value.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\r' | '\n' => {
                if c == '\r' && chars.peek() == Some(&'\n') {
                    chars.next();
                }
                while matches!(chars.peek(), Some('\r' | '\n')) {
                    chars.next();
                }
                match chars.peek() {
                    None => {}
                    Some(' ' | '\t') => out.push_str("\r\n"),
                    Some(_) => out.push_str("\r\n "),
                }
            }
            c => out.push(c),
        }
    }
    out
}

/// The header section of a message (up to its empty line, CRLF-terminated;
/// the whole text when there is none): what [`apply`] edits.
pub use relay_proto::dsn::header_section;

/// One field: its bytes (folded lines and final CRLF included).
fn fields(head: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < head.len() {
        let Some(nl) = memchr::memchr(b'\n', &head[i..]) else {
            break;
        };
        i += nl + 1;
        let continues = matches!(head.get(i), Some(b' ' | b'\t'));
        if !continues {
            out.push(&head[start..i]);
            start = i;
        }
    }
    if start < head.len() {
        out.push(&head[start..]);
    }
    out
}

fn field_name(field: &[u8]) -> &[u8] {
    let end = memchr::memchr(b':', field).unwrap_or(field.len());
    let name = &field[..end];
    let trimmed = name.len()
        - name
            .iter()
            .rev()
            .take_while(|b| b.is_ascii_whitespace())
            .count();
    &name[..trimmed]
}

/// `head` (a header block without its closing empty line) with `edits`
/// applied. The first field, if it is a `Received:` (ours), is never
/// removed and added fields go right below it.
pub fn apply(head: &[u8], edits: &HeaderEdits) -> Vec<u8> {
    let all = fields(head);
    let ours = usize::from(
        all.first()
            .is_some_and(|f| field_name(f).eq_ignore_ascii_case(b"Received")),
    );
    let mut keep = vec![true; all.len()];
    for (name, which) in &edits.remove {
        let hits: Vec<usize> = (ours..all.len())
            .filter(|&i| field_name(all[i]).eq_ignore_ascii_case(name.as_bytes()))
            .collect();
        let chosen = match *which {
            0 => hits,
            n if n > 0 => hits.get(n as usize - 1).copied().into_iter().collect(),
            n => hits
                .len()
                .checked_sub(n.unsigned_abs() as usize)
                .and_then(|i| hits.get(i).copied())
                .into_iter()
                .collect(),
        };
        for i in chosen {
            keep[i] = false;
        }
    }
    let mut subject_done = edits.subject.is_none();
    let mut out = Vec::with_capacity(head.len() + 256);
    for f in &all[..ours] {
        out.extend_from_slice(f);
    }
    for (name, value) in &edits.add {
        out.extend_from_slice(format!("{name}: {}\r\n", fold_value(value)).as_bytes());
    }
    for (i, f) in all.iter().enumerate().skip(ours) {
        if !keep[i] {
            continue;
        }
        if !subject_done && field_name(f).eq_ignore_ascii_case(b"Subject") {
            let subject = edits.subject.as_deref().unwrap_or_default();
            out.extend_from_slice(format!("Subject: {}\r\n", fold_value(subject)).as_bytes());
            subject_done = true;
            continue;
        }
        out.extend_from_slice(f);
    }
    if !subject_done {
        let subject = edits.subject.as_deref().unwrap_or_default();
        out.extend_from_slice(format!("Subject: {}\r\n", fold_value(subject)).as_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEAD: &[u8] = b"Received: from c (c [192.0.2.1])\r\n\tby backup; Mon, 7 Dec 2026\r\nX-Spam: yes\r\nSubject: hi\r\nX-Spam: again\r\nFrom: a@remote.test\r\n";

    fn edits(remove: &[(&str, i64)], add: &[(&str, &str)]) -> HeaderEdits {
        HeaderEdits {
            remove: remove.iter().map(|(n, w)| (n.to_string(), *w)).collect(),
            add: add
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
            subject: None,
        }
    }

    #[test]
    fn added_fields_go_below_our_received_and_removals_spare_it() {
        let e = edits(
            &[("x-spam", 0), ("Received", 0)],
            &[("X-Spamd-Result", "default: False [0.1 / 15.0]")],
        );
        let out = apply(HEAD, &e);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "Received: from c (c [192.0.2.1])\r\n\tby backup; Mon, 7 Dec 2026\r\nX-Spamd-Result: default: False [0.1 / 15.0]\r\nSubject: hi\r\nFrom: a@remote.test\r\n"
        );
    }

    #[test]
    fn removal_picks_the_nth_occurrence_from_either_end() {
        let first = String::from_utf8(apply(HEAD, &edits(&[("X-Spam", 1)], &[]))).unwrap();
        assert!(!first.contains("X-Spam: yes") && first.contains("X-Spam: again"));
        let last = String::from_utf8(apply(HEAD, &edits(&[("X-Spam", -1)], &[]))).unwrap();
        assert!(last.contains("X-Spam: yes") && !last.contains("X-Spam: again"));
        let none = apply(HEAD, &edits(&[("X-Spam", 5)], &[]));
        assert_eq!(none, HEAD);
    }

    #[test]
    fn no_edits_change_nothing() {
        assert_eq!(apply(HEAD, &HeaderEdits::default()), HEAD);
    }

    #[test]
    fn the_subject_is_replaced_or_added() {
        let mut e = HeaderEdits {
            subject: Some("***SPAM*** hi".into()),
            ..Default::default()
        };
        let out = String::from_utf8(apply(HEAD, &e)).unwrap();
        assert!(out.contains("\r\nSubject: ***SPAM*** hi\r\n") && !out.contains("Subject: hi\r\n"));
        e.subject = Some("new".into());
        let out = String::from_utf8(apply(b"From: a@b\r\n", &e)).unwrap();
        assert_eq!(out, "From: a@b\r\nSubject: new\r\n");
    }

    #[test]
    fn values_cannot_start_new_fields() {
        let e = edits(
            &[],
            &[("X-A", "one\nBcc: victim@x"), ("X-B", "long\r\n\tfolded")],
        );
        let out = String::from_utf8(apply(b"From: a@b\r\n", &e)).unwrap();
        assert_eq!(
            out,
            "X-A: one\r\n Bcc: victim@x\r\nX-B: long\r\n\tfolded\r\nFrom: a@b\r\n"
        );
    }

    #[test]
    fn the_milter_block_is_read_in_every_shape() {
        let v: Value = serde_json::from_str(
            r#"{"add_headers":{"X-One":"1","X-Two":{"value":"2","order":0},"X-Three":[{"value":"3a"},"3b"],"Bad Name":"x"},"remove_headers":{"X-Spam":0,"X-Old":-1}}"#,
        )
        .unwrap();
        let mut e = HeaderEdits::from_milter(&v);
        e.add.sort();
        e.remove.sort();
        assert_eq!(
            e.add,
            vec![
                ("X-One".into(), "1".into()),
                ("X-Three".into(), "3a".into()),
                ("X-Three".into(), "3b".into()),
                ("X-Two".into(), "2".into()),
            ]
        );
        assert_eq!(e.remove, vec![("X-Old".into(), -1), ("X-Spam".into(), 0)]);
    }
}
