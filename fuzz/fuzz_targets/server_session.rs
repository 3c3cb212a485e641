#![no_main]
//! Arbitrary byte streams, in arbitrary chunks, through the server session
//! (DATA and BDAT included). Invariants: no panic, every message stored
//! from DATA is free of bare CR and LF (BDAT chunks are taken as they
//! are: `bdat_framing` checks those), every reply line is well formed.
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use libfuzzer_sys::fuzz_target;
use relay_proto::smtp::{Action, RcptVerdict, Reply, Session, SessionConfig};

fn check_output(out: &[u8]) {
    for line in out.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        assert!(line.ends_with(b"\r"), "reply line without CRLF");
        assert!(line.len() >= 4 && line[..3].iter().all(u8::is_ascii_digit), "bad reply line");
    }
}

fuzz_target!(|data: &[u8]| {
    let cfg = SessionConfig {
        hostname: "mx2.test".into(),
        max_message_size: 4096,
        max_recipients: 5,
        max_errors: 50,
        tls_available: true,
        etrn_available: true,
        admit_mail: true,
        ..SessionConfig::default()
    };
    let chunked = data.windows(4).any(|w| w.eq_ignore_ascii_case(b"BDAT"));
    let mut s = Session::new(Arc::new(cfg), "192.0.2.1".parse().unwrap(), 1);
    let now = UNIX_EPOCH + Duration::from_secs(1_795_842_826);
    // The first byte picks the chunk size, so splits vary too.
    let chunk = usize::from(data.first().copied().unwrap_or(7) % 64) + 1;
    for piece in data.chunks(chunk) {
        s.handle_input(piece, now);
        loop {
            check_output(&s.take_output());
            match s.poll_action() {
                Action::Read | Action::Close => break,
                Action::CheckRecipient { recipient, .. } => {
                    let verdict = match recipient.domain() {
                        Some(d) if d.as_str().len() % 2 == 0 => RcptVerdict::Accept { domain: d.clone(), max_message_size: None },
                        _ => RcptVerdict::Reject(Reply::new(550, "5.7.1", "no")),
                    };
                    s.recipient_checked(verdict, now);
                }
                Action::Store(m) => {
                    for (i, &b) in m.body.iter().enumerate().filter(|_| !chunked) {
                        if b == b'\r' {
                            assert_eq!(m.body.get(i + 1), Some(&b'\n'), "bare CR stored");
                        }
                        if b == b'\n' {
                            assert!(i > 0 && m.body[i - 1] == b'\r', "bare LF stored");
                        }
                    }
                    let ok = m.body.len() % 3 != 0;
                    s.message_stored(if ok { Ok(m.id.clone()) } else { Err(()) }, now);
                }
                Action::StartTls => s.tls_established("TLSv1.3".into()),
                Action::Etrn { .. } => s.etrn_done(Reply::new(251, "2.0.0", "OK"), now),
                Action::AdmitMail { size } => {
                    // Refuse some admissions; refuse some data mid-way too.
                    let admitted = size.is_none_or(|n| n % 5 != 0);
                    let verdict = if admitted { Ok(()) } else { Err(Reply::new(452, "4.3.1", "full")) };
                    s.mail_admitted(verdict, now);
                }
            }
            if s.data_held() > 3000 {
                s.refuse_data(Reply::new(452, "4.3.1", "budget"));
            }
        }
        if s.is_closed() {
            break;
        }
    }
});
