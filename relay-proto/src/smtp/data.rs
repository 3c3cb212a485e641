//! The DATA receiver: finds the end of data and rebuilds the message.
//!
//! Only `<CR><LF>.<CR><LF>` ends data (RFC 5321 §4.1.1.4); the variants that
//! other servers accept (`\n.\n`, `\n.\r\n`, `\r\n.\n`, `\r.\r\n`) are content
//! here, which is what stops SMTP smuggling. Every bare CR or bare LF is
//! rewritten to CRLF so that no later reader can find a different boundary,
//! and dot-stuffing (§4.5.2) is undone. Output past the size limit is dropped
//! but the stream is still read to its end so the session stays usable.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// After a real CRLF (or at the start of data): a dot here is special.
    LineStart,
    /// Saw `CRLF .`
    Dot,
    /// Saw `CRLF . CR`
    DotCr,
    /// Inside a line.
    Text,
    /// Saw CR inside a line.
    Cr,
}

/// Incremental receiver for one message body.
#[derive(Debug)]
pub struct DataReceiver {
    state: State,
    body: Vec<u8>,
    /// Bytes at the start of `body` that are not the client's (our trace
    /// header, written first so the body is never copied to prepend it).
    prefix_len: usize,
    limit: usize,
    /// Bytes of the message after normalisation, kept or not.
    size: u64,
    /// Bytes handed out by [`DataReceiver::take_kept`] so far.
    taken: u64,
}

/// Result of feeding bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum Progress {
    /// All input consumed; end of data not seen yet.
    NeedMore,
    /// End of data found after consuming this many input bytes.
    Done(usize),
}

impl DataReceiver {
    /// `limit`: the largest message (after normalisation) that is kept.
    pub fn new(limit: usize) -> Self {
        Self::with_prefix(limit, &[])
    }

    /// Like [`DataReceiver::new`], with `prefix` (not counted against the
    /// limit) in front of the client's data.
    pub fn with_prefix(limit: usize, prefix: &[u8]) -> Self {
        let mut body = Vec::with_capacity(prefix.len() + limit.min(64 * 1024));
        body.extend_from_slice(prefix);
        DataReceiver {
            state: State::LineStart,
            body,
            prefix_len: prefix.len(),
            limit,
            size: 0,
            taken: 0,
        }
    }

    /// The client's data received so far (without the prefix).
    pub fn data(&self) -> &[u8] {
        &self.body[self.prefix_len..]
    }

    /// Octets of message data received so far (prefix not counted).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// More data came than the limit allows.
    pub fn exceeded(&self) -> bool {
        self.size > self.limit as u64
    }

    /// The stored message: prefix and data, CRLF line endings, unstuffed.
    pub fn into_body(self) -> Vec<u8> {
        self.body
    }

    /// Hands out what was kept so far (the prefix first), so a driver can
    /// move a big message out of memory while it arrives; later calls and
    /// [`DataReceiver::into_body`] return what came after.
    pub fn take_kept(&mut self, room: usize) -> Vec<u8> {
        self.taken += (self.body.len() - self.prefix_len) as u64;
        self.prefix_len = 0;
        std::mem::replace(&mut self.body, Vec::with_capacity(room))
    }

    /// Bytes handed out by [`DataReceiver::take_kept`] so far (without the prefix).
    pub fn taken(&self) -> u64 {
        self.taken
    }

    /// Bytes kept in memory now.
    pub fn kept(&self) -> usize {
        self.body.len()
    }

    /// Bytes of memory the message holds (its buffer's capacity).
    pub fn held(&self) -> usize {
        self.body.capacity()
    }

    /// Keeps nothing more and frees what was kept; the end of data is
    /// still found.
    pub fn discard(&mut self) {
        self.body = Vec::new();
        self.prefix_len = 0;
        self.limit = 0;
    }

    fn emit(&mut self, bytes: &[u8]) {
        self.size += bytes.len() as u64;
        if self.size <= self.limit as u64 {
            self.body.extend_from_slice(bytes);
        }
    }

    /// Takes a BDAT chunk's octets as they are (RFC 3030 §2: no dot
    /// handling, no line-end repair); the size limit still applies.
    pub fn feed_raw(&mut self, chunk: &[u8]) {
        self.emit(chunk);
    }

    /// Consumes as much of `input` as belongs to the message.
    pub fn feed(&mut self, input: &[u8]) -> Progress {
        let mut i = 0;
        while i < input.len() {
            match self.state {
                State::Text => {
                    // Fast path: copy the run up to the next CR or LF at once.
                    let run = memchr::memchr2(b'\r', b'\n', &input[i..]).unwrap_or(input.len() - i);
                    if run > 0 {
                        self.emit(&input[i..i + run]);
                        i += run;
                        continue;
                    }
                    if input[i] == b'\r' {
                        self.state = State::Cr;
                    } else {
                        // Bare LF: normalised, but not a line start for dot handling.
                        self.emit(b"\r\n");
                    }
                    i += 1;
                }
                State::Cr => {
                    match input[i] {
                        b'\n' => {
                            self.emit(b"\r\n");
                            self.state = State::LineStart;
                            i += 1;
                        }
                        b'\r' => {
                            // The previous CR was bare.
                            self.emit(b"\r\n");
                            i += 1;
                        }
                        _ => {
                            self.emit(b"\r\n");
                            self.state = State::Text;
                        }
                    }
                }
                State::LineStart => {
                    if input[i] == b'.' {
                        self.state = State::Dot;
                        i += 1;
                    } else {
                        self.state = State::Text;
                    }
                }
                State::Dot => match input[i] {
                    b'\r' => {
                        self.state = State::DotCr;
                        i += 1;
                    }
                    b'\n' => {
                        // `CRLF . LF` is a line holding a dot, never the end.
                        self.emit(b".\r\n");
                        self.state = State::Text;
                        i += 1;
                    }
                    _ => {
                        // Stuffed line: the leading dot is removed.
                        self.state = State::Text;
                    }
                },
                State::DotCr => {
                    if input[i] == b'\n' {
                        return Progress::Done(i + 1);
                    }
                    // `CRLF . CR x`: a dot line ended by a bare CR; `x` is
                    // looked at again as ordinary text.
                    self.emit(b".\r\n");
                    self.state = State::Text;
                }
            }
        }
        Progress::NeedMore
    }
}

/// Encodes a stored message for the DATA phase of relaying: every line
/// ending becomes CRLF (so the next hop cannot see a different boundary
/// than we did), lines starting with `.` get another `.` (RFC 5321 §4.5.2),
/// and the `.` terminator follows.
pub fn encode_for_data(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + message.len() / 64 + 8);
    let mut encoder = DataEncoder::default();
    encoder.encode(message, &mut out);
    encoder.finish(&mut out);
    out
}

/// [`encode_for_data`] for a message read in pieces: the pieces may split
/// a line ending or a line anywhere, and the output is the same as for the
/// whole message at once.
#[derive(Debug, Clone)]
pub struct DataEncoder {
    at_line_start: bool,
    /// The last piece ended with a CR: a line ending, CRLF if the next
    /// piece starts with LF (which then belongs to it).
    pending_cr: bool,
}

impl Default for DataEncoder {
    fn default() -> Self {
        DataEncoder {
            at_line_start: true,
            pending_cr: false,
        }
    }
}

impl DataEncoder {
    /// Appends the encoding of the next piece to `out`.
    pub fn encode(&mut self, piece: &[u8], out: &mut Vec<u8>) {
        let mut i = 0;
        if self.pending_cr && !piece.is_empty() {
            self.pending_cr = false;
            if piece[0] == b'\n' {
                i = 1;
            }
        }
        while i < piece.len() {
            if self.at_line_start && piece[i] == b'.' {
                out.push(b'.');
            }
            let run = memchr::memchr2(b'\r', b'\n', &piece[i..]).unwrap_or(piece.len() - i);
            out.extend_from_slice(&piece[i..i + run]);
            if run > 0 {
                self.at_line_start = false;
            }
            i += run;
            if i >= piece.len() {
                break;
            }
            // CRLF, bare CR or bare LF: one line ending, written as CRLF.
            out.extend_from_slice(b"\r\n");
            self.at_line_start = true;
            if piece[i] == b'\r' {
                match piece.get(i + 1) {
                    Some(b'\n') => i += 2,
                    Some(_) => i += 1,
                    None => {
                        self.pending_cr = true;
                        i += 1;
                    }
                }
            } else {
                i += 1;
            }
        }
    }

    /// Ends the message: a final line ending if missing, and the `.`.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if !self.at_line_start {
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b".\r\n");
        *self = DataEncoder::default();
    }
}

/// What the session needs to know of a message's header section.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HeaderFacts {
    /// `Received:` fields (a mail loop shows as too many).
    pub received: usize,
    /// A `TLS-Required: No` field (RFC 8689 §4.2.1).
    pub tls_not_required: bool,
}

/// Counts `Received:` header fields in the header section of `message`.
pub fn count_received_headers(message: &[u8]) -> usize {
    scan_headers(message).received
}

/// Reads the header section of `message` (up to the first empty line).
pub fn scan_headers(message: &[u8]) -> HeaderFacts {
    let mut facts = HeaderFacts::default();
    let mut start = 0;
    // memchr: a message without a blank line is all header, scanned whole.
    let ends = memchr::memchr_iter(b'\n', message).chain(std::iter::once(message.len()));
    for end in ends {
        let line = &message[start..end];
        start = end + 1;
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            break;
        }
        if line.len() >= 9 && line[..9].eq_ignore_ascii_case(b"received:") {
            facts.received += 1;
        }
        if line.len() >= 13 && line[..13].eq_ignore_ascii_case(b"tls-required:") {
            let value = line[13..].trim_ascii();
            facts.tls_not_required = value.eq_ignore_ascii_case(b"no");
        }
    }
    facts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receive(input: &[u8]) -> (Option<usize>, Vec<u8>) {
        let mut r = DataReceiver::new(1 << 20);
        match r.feed(input) {
            Progress::Done(n) => (Some(n), r.into_body()),
            Progress::NeedMore => (None, r.into_body()),
        }
    }

    #[test]
    fn only_crlf_dot_crlf_ends_data() {
        let ends: &[&[u8]] = &[b".\r\n", b"a\r\n.\r\n", b"a\r\n.\r\nMAIL FROM:<>\r\n"];
        for input in ends {
            assert!(receive(input).0.is_some(), "{input:?}");
        }
        let smuggling: &[&[u8]] = &[
            b"a\n.\nMAIL FROM:<x@y>\r\n",
            b"a\n.\r\nMAIL FROM:<x@y>\r\n",
            b"a\r\n.\nMAIL FROM:<x@y>\r\n",
            b"a\r.\r\nMAIL FROM:<x@y>\r\n",
            b"a\r\n.\rMAIL FROM:<x@y>\r\n",
            b"a\r\n\x00.\r\n",
        ];
        for input in smuggling {
            assert_eq!(receive(input).0, None, "{input:?} ended data");
        }
    }

    #[test]
    fn bare_cr_and_lf_are_normalised() {
        let (_, body) = receive(b"a\nb\rc\r\r\nd\r\n.\r\n");
        assert_eq!(body, b"a\r\nb\r\nc\r\n\r\nd\r\n");
        let (_, body) = receive(b"x\n.\nMAIL\r\n.\r\n");
        assert_eq!(body, b"x\r\n.\r\nMAIL\r\n");
        let (_, body) = receive(b"x\r\n.\ny\r\n.\r\n");
        assert_eq!(body, b"x\r\n.\r\ny\r\n");
        let (_, body) = receive(b"x\r\n.\rY\r\n.\r\n");
        assert_eq!(body, b"x\r\n.\r\nY\r\n");
    }

    #[test]
    fn stored_body_never_contains_bare_cr_or_lf() {
        let (_, body) = receive(b"\r\r\n\n\r.\n.\r.\r\r\n..\n\r\n.\r\n");
        for (i, &b) in body.iter().enumerate() {
            if b == b'\r' {
                assert_eq!(body.get(i + 1), Some(&b'\n'), "bare CR at {i} in {body:?}");
            }
            if b == b'\n' {
                assert_eq!(body[i - 1], b'\r', "bare LF at {i} in {body:?}");
            }
        }
    }

    #[test]
    fn dot_stuffing_is_removed() {
        let (_, body) = receive(b"..hidden\r\n.x\r\nend\r\n.\r\n");
        assert_eq!(body, b".hidden\r\nx\r\nend\r\n");
    }

    #[test]
    fn end_of_data_is_found_across_chunk_boundaries() {
        let input = b"hello\r\n..world\r\n.\r\nQUIT\r\n";
        for split in 0..input.len() {
            let mut r = DataReceiver::new(1 << 20);
            let first = r.feed(&input[..split]);
            let done = match first {
                Progress::Done(n) => n,
                Progress::NeedMore => match r.feed(&input[split..]) {
                    Progress::Done(n) => split + n,
                    Progress::NeedMore => panic!("no end at split {split}"),
                },
            };
            assert_eq!(done, input.len() - 6, "split {split}");
            assert_eq!(r.into_body(), b"hello\r\n.world\r\n", "split {split}");
        }
    }

    #[test]
    fn oversize_data_is_counted_but_not_kept() {
        let mut r = DataReceiver::new(10);
        assert_eq!(r.feed(b"0123456789abcdef\r\n.\r\n"), Progress::Done(21));
        assert!(r.exceeded());
        assert!(r.into_body().len() <= 10);
    }

    #[test]
    fn encoding_for_relay_stuffs_dots_and_normalises_line_ends() {
        assert_eq!(encode_for_data(b"a\r\n.b\r\n"), b"a\r\n..b\r\n.\r\n");
        assert_eq!(encode_for_data(b".\r\n"), b"..\r\n.\r\n");
        assert_eq!(encode_for_data(b"no newline"), b"no newline\r\n.\r\n");
        assert_eq!(encode_for_data(b""), b".\r\n");
        assert_eq!(
            encode_for_data(b"a\n.\nb\r.\r\n"),
            b"a\r\n..\r\nb\r\n..\r\n.\r\n"
        );
    }

    #[test]
    fn encoding_in_pieces_matches_encoding_at_once() {
        let messages: [&[u8]; 4] = [
            b"a\r\n.b\r\n..c\r\n",
            b"a\n.\nb\r.\r\n\r\r\n.",
            b".\r\n\r\n.x",
            b"no newline at all",
        ];
        for m in messages {
            let whole = encode_for_data(m);
            for split in 0..=m.len() {
                for second in split..=m.len() {
                    let mut e = DataEncoder::default();
                    let mut out = Vec::new();
                    e.encode(&m[..split], &mut out);
                    e.encode(&m[split..second], &mut out);
                    e.encode(&m[second..], &mut out);
                    e.finish(&mut out);
                    assert_eq!(out, whole, "{m:?} split at {split} and {second}");
                }
            }
        }
    }

    #[test]
    fn kept_data_can_be_taken_while_it_arrives() {
        let mut r = DataReceiver::with_prefix(1 << 20, b"Received: x\r\n");
        assert_eq!(
            r.feed(b"Subject: a\r\n\r\nline one\r\n"),
            Progress::NeedMore
        );
        let first = r.take_kept(64);
        assert_eq!(first, b"Received: x\r\nSubject: a\r\n\r\nline one\r\n");
        assert_eq!(r.feed(b"..two\r\n.\r\n"), Progress::Done(10));
        assert_eq!(r.taken(), 24);
        assert_eq!(r.size(), 30);
        assert_eq!(r.into_body(), b".two\r\n");
    }

    #[test]
    fn receive_then_encode_round_trips() {
        let wire = b"Subject: x\r\n\r\n..one\r\ntwo\r\n...\r\n.\r\n";
        let (_, body) = receive(wire);
        assert_eq!(encode_for_data(&body), wire);
    }

    #[test]
    fn received_headers_are_counted_in_the_header_section_only() {
        let msg = b"Received: a\r\nRECEIVED: b\r\nSubject: x\r\n\r\nReceived: body\r\n";
        assert_eq!(count_received_headers(msg), 2);
    }
}
