//! Our `Authentication-Results` into the header section, and forged ones
//! out (RFC 8601 §5): a field that names our authserv-id did not come from
//! us, and the primary trusts that name. Everything else stays byte for
//! byte, so DKIM signatures that verified before us verify after us.

/// `head` (the header section, its empty line included, or the whole
/// message when it has none) with `ours` (one field, CRLF-terminated)
/// first, and every `Authentication-Results` field whose authserv-id is
/// `hostname` removed. Returns the new section and how many were removed.
pub fn annotate(head: &[u8], ours: &[u8], hostname: &str) -> (Vec<u8>, usize) {
    let mut out = Vec::with_capacity(head.len() + ours.len());
    out.extend_from_slice(ours);
    let mut removed = 0;
    let mut rest = head;
    while !rest.is_empty() {
        if matches!(rest, [b'\r', b'\n', ..] | [b'\n', ..]) {
            // The end of the header section: the rest is body.
            out.extend_from_slice(rest);
            break;
        }
        let len = field_len(rest);
        let field = &rest[..len];
        if claims(field, hostname) {
            removed += 1;
        } else {
            out.extend_from_slice(field);
        }
        rest = &rest[len..];
    }
    (out, removed)
}

/// The length of the field (or line) `rest` starts with, its continuation
/// lines included.
fn field_len(rest: &[u8]) -> usize {
    let line_end = |from: usize| {
        rest[from..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(rest.len(), |i| from + i + 1)
    };
    let mut end = line_end(0);
    while end < rest.len() && matches!(rest[end], b' ' | b'\t') {
        end = line_end(end);
    }
    end
}

/// Whether `field` is an `Authentication-Results` field naming `hostname`
/// as its authserv-id.
fn claims(field: &[u8], hostname: &str) -> bool {
    const NAME: &[u8] = b"authentication-results";
    let Some(colon) = field.iter().position(|&b| b == b':') else {
        return false;
    };
    let name = field[..colon].trim_ascii_end();
    if !name.eq_ignore_ascii_case(NAME) {
        return false;
    }
    authserv_id(&field[colon + 1..])
        .is_some_and(|id| id.eq_ignore_ascii_case(hostname.trim_end_matches('.').as_bytes()))
}

/// The authserv-id a field value starts with (RFC 8601 §2.2: a `value`,
/// token or quoted string, after optional comments and folding white
/// space), without a trailing dot.
fn authserv_id(value: &[u8]) -> Option<Vec<u8>> {
    let mut i = 0;
    let mut depth = 0usize;
    // Comments and white space before the id (nested comments allowed).
    while i < value.len() {
        match value[i] {
            b'(' => depth += 1,
            b')' if depth > 0 => depth -= 1,
            b'\\' if depth > 0 => i += 1,
            b' ' | b'\t' | b'\r' | b'\n' => {}
            _ if depth > 0 => {}
            _ => break,
        }
        i += 1;
    }
    let id: Vec<u8> = if value.get(i) == Some(&b'"') {
        let mut id = Vec::new();
        i += 1;
        while i < value.len() && value[i] != b'"' {
            if value[i] == b'\\' {
                i += 1;
            }
            if let Some(&b) = value.get(i) {
                id.push(b);
            }
            i += 1;
        }
        id
    } else {
        value[i..]
            .iter()
            .take_while(|&&b| !matches!(b, b';' | b'(' | b' ' | b'\t' | b'\r' | b'\n'))
            .copied()
            .collect()
    };
    let id = id.strip_suffix(b".").map(<[u8]>::to_vec).unwrap_or(id);
    (!id.is_empty()).then_some(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    const OURS: &[u8] =
        b"Authentication-Results: mx2.example.net;\r\n\tspf=pass smtp.mailfrom=a@b.example\r\n";

    #[test]
    fn ours_goes_first_and_the_rest_stays_byte_for_byte() {
        let head = b"Received: from x\r\n\tby mx2.example.net; Mon, 1 Jan 2026\r\nDKIM-Signature: v=1;\r\n b=abc\r\nFrom: a@b.example\r\n\r\n";
        let (out, removed) = annotate(head, OURS, "mx2.example.net");
        assert_eq!(removed, 0);
        assert_eq!(out, [OURS, &head[..]].concat());
    }

    #[test]
    fn forged_results_naming_us_are_removed_and_others_kept() {
        let head = concat!(
            "Received: from x by mx2.example.net\r\n",
            "Authentication-Results: mx2.example.net; spf=pass\r\n",
            "authentication-results:MX2.Example.Net.;\r\n\tdkim=pass\r\n",
            "Authentication-Results: (a comment (nested)) \"mx2.example.net\" 1; dmarc=pass\r\n",
            "Authentication-Results: mx.primary.example; spf=fail\r\n",
            "Authentication-Results: mx2.example.net.evil.example; spf=pass\r\n",
            "Subject: Authentication-Results: mx2.example.net; spf=pass\r\n",
            "\r\n",
            "Authentication-Results: mx2.example.net; in the body\r\n",
        );
        let (out, removed) = annotate(head.as_bytes(), OURS, "mx2.example.net");
        assert_eq!(removed, 3);
        let kept = concat!(
            "Received: from x by mx2.example.net\r\n",
            "Authentication-Results: mx.primary.example; spf=fail\r\n",
            "Authentication-Results: mx2.example.net.evil.example; spf=pass\r\n",
            "Subject: Authentication-Results: mx2.example.net; spf=pass\r\n",
            "\r\n",
            "Authentication-Results: mx2.example.net; in the body\r\n",
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            format!("{}{kept}", String::from_utf8_lossy(OURS))
        );
    }

    #[test]
    fn bare_line_feeds_and_a_missing_end_of_header_are_handled() {
        let head = b"Authentication-Results: mx2.example.net; x\nX: y\n\tz";
        let (out, removed) = annotate(head, OURS, "mx2.example.net");
        assert_eq!(removed, 1);
        assert_eq!(out, [OURS, b"X: y\n\tz"].concat());
        assert_eq!(annotate(b"", OURS, "h").0, OURS);
    }

    #[test]
    fn authserv_ids_are_read_past_comments_and_quotes() {
        assert_eq!(
            authserv_id(b" mx.example; spf=pass").unwrap(),
            b"mx.example"
        );
        assert_eq!(
            authserv_id(b"(c) mx.example 1; none").unwrap(),
            b"mx.example"
        );
        assert_eq!(
            authserv_id(b" \"mx.ex\\\"ample\";").unwrap(),
            b"mx.ex\"ample"
        );
        assert_eq!(authserv_id(b"\r\n\tmx.example.;").unwrap(), b"mx.example");
        assert_eq!(authserv_id(b" ; none"), None);
        assert_eq!(authserv_id(b"(unclosed"), None);
    }
}
