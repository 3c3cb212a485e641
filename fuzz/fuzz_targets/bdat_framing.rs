#![no_main]
//! BDAT framing (RFC 3030): a transaction of chunks with arbitrary bytes,
//! sent in arbitrary reads. Invariants: every chunk is answered, the
//! stored message is exactly the chunks' bytes, the command after the last
//! chunk is read as a command, and the message, relayed by DATA, cannot
//! end early at the next hop (no smuggled end of data).
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use libfuzzer_sys::fuzz_target;
use relay_proto::smtp::data::{encode_for_data, DataReceiver, Progress};
use relay_proto::smtp::{Action, RcptVerdict, Session, SessionConfig};

fuzz_target!(|data: &[u8]| {
    let Some((&split, mut rest)) = data.split_first() else {
        return;
    };
    let mut wire = b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<u@mx.test>\r\n".to_vec();
    let mut message = Vec::new();
    let mut chunks = 0;
    // Each chunk: a length byte, then that many bytes of content.
    while let Some((&len, tail)) = rest.split_first() {
        let len = usize::from(len).min(tail.len());
        let (chunk, tail) = tail.split_at(len);
        rest = tail;
        let last = rest.is_empty();
        let header = if last { format!("BDAT {len} LAST\r\n") } else { format!("BDAT {len}\r\n") };
        wire.extend_from_slice(header.as_bytes());
        wire.extend_from_slice(chunk);
        message.extend_from_slice(chunk);
        chunks += 1;
    }
    if chunks == 0 {
        return;
    }
    wire.extend_from_slice(b"NOOP\r\n");
    let cfg = SessionConfig { hostname: "mx2.test".into(), ..SessionConfig::default() };
    let mut s = Session::new(Arc::new(cfg), "192.0.2.1".parse().unwrap(), 1);
    let now = UNIX_EPOCH + Duration::from_secs(1_795_842_826);
    let mut out = Vec::new();
    let mut stored = None;
    let read = usize::from(split % 64) + 1;
    for piece in wire.chunks(read) {
        s.handle_input(piece, now);
        loop {
            out.extend(s.take_output());
            match s.poll_action() {
                Action::Read | Action::Close => break,
                Action::CheckRecipient { recipient, .. } => {
                    let domain = recipient.domain().unwrap().clone();
                    s.recipient_checked(RcptVerdict::Accept { domain, max_message_size: None }, now);
                }
                Action::Store(m) => {
                    stored = Some(m.body.clone());
                    s.message_stored(Ok(m.id.clone()), now);
                }
                other => panic!("unexpected action {other:?}"),
            }
        }
    }
    out.extend(s.take_output());
    let replies: Vec<&[u8]> = out.split(|&b| b == b'\n').filter(|l| l.get(3) == Some(&b' ')).collect();
    // Greeting, EHLO, MAIL, RCPT, one per chunk, NOOP.
    assert_eq!(replies.len(), 4 + chunks + 1, "{}", String::from_utf8_lossy(&out));
    assert!(replies.iter().skip(1).all(|r| r.starts_with(b"250")), "{}", String::from_utf8_lossy(&out));
    let body = stored.expect("the message was stored");
    assert!(body.ends_with(&message), "stored bytes differ from the chunks");
    // Relayed by DATA: the next hop finds the end of data exactly at the end.
    let encoded = encode_for_data(&body);
    let mut next_hop = DataReceiver::new(usize::MAX);
    assert_eq!(next_hop.feed(&encoded), Progress::Done(encoded.len()), "end of data found early");
});
