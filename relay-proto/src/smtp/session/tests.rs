//! Session transcripts: bytes in, replies out, no sockets.

use super::*;
use crate::address::Host;

const NOW: u64 = 1_795_842_826;

/// Plays the driver: accepts recipients at example.test, stores messages.
struct Transcript {
    session: Session,
    stored: Vec<AcceptedMessage>,
    store_fails: bool,
    closed: bool,
    tls_started: u32,
    /// The answer to every MAIL admission request.
    admission: Result<(), Reply>,
    admissions: Vec<Option<u64>>,
    filter_refuses: bool,
}

impl Transcript {
    fn new() -> Self {
        Self::with(SessionConfig {
            hostname: "mx2.test".into(),
            tls_available: true,
            ..SessionConfig::default()
        })
    }

    fn with(cfg: SessionConfig) -> Self {
        let cfg = SessionConfig {
            hostname: "mx2.test".into(),
            ..cfg
        };
        let mut t = Transcript {
            session: Session::new(Arc::new(cfg), "192.0.2.7".parse().unwrap(), 42),
            stored: Vec::new(),
            store_fails: false,
            closed: false,
            tls_started: 0,
            admission: Ok(()),
            admissions: Vec::new(),
            filter_refuses: false,
        };
        let greeting = t.drain();
        assert_eq!(greeting, "220 mx2.test ESMTP backupmx\r\n");
        t
    }

    fn now() -> SystemTime {
        crate::time::from_unix_seconds(NOW)
    }

    fn verdict(rcpt: &Mailbox) -> RcptVerdict {
        match &rcpt.host {
            Host::Domain(d) if d.as_str() == "example.test" => RcptVerdict::Accept {
                domain: d.clone(),
                max_message_size: None,
            },
            Host::Domain(d) if d.as_str() == "small.test" => RcptVerdict::Accept {
                domain: d.clone(),
                max_message_size: Some(100),
            },
            _ => RcptVerdict::Reject(Reply::new(550, "5.7.1", "Relaying denied")),
        }
    }

    fn drain(&mut self) -> String {
        let mut out = self.session.take_output();
        loop {
            match self.session.poll_action() {
                Action::Read => break,
                Action::Close => {
                    self.closed = true;
                    break;
                }
                Action::CheckRecipient { recipient, .. } => {
                    let v = Self::verdict(&recipient);
                    self.session.recipient_checked(v, Self::now());
                }
                Action::Store(m) if self.filter_refuses => {
                    let _ = m;
                    self.session.message_refused(
                        "filter",
                        Reply::new(550, "5.7.1", "Gtube pattern"),
                        Self::now(),
                    );
                }
                Action::Store(m) => {
                    let result = if self.store_fails {
                        Err(())
                    } else {
                        Ok(m.id.clone())
                    };
                    if !self.store_fails {
                        self.stored.push(*m);
                    }
                    self.session.message_stored(result, Self::now());
                }
                Action::Etrn { node } => {
                    let r = if node == "example.test" {
                        Reply::new(
                            253,
                            "2.0.0",
                            "OK, 3 pending messages for node example.test started",
                        )
                    } else {
                        Reply::new(459, "4.7.1", format!("Node {node} not allowed"))
                    };
                    self.session.etrn_done(r, Self::now());
                }
                Action::AdmitMail { size } => {
                    self.admissions.push(size);
                    self.session
                        .mail_admitted(self.admission.clone(), Self::now());
                }
                Action::StartTls => {
                    self.tls_started += 1;
                    out.extend(self.session.take_output());
                    self.session.tls_established("TLSv1.3".into());
                }
            }
            out.extend(self.session.take_output());
        }
        out.extend(self.session.take_output());
        String::from_utf8(out).unwrap()
    }

    fn send(&mut self, input: impl AsRef<[u8]>) -> String {
        self.session.handle_input(input.as_ref(), Self::now());
        self.drain()
    }

    /// Sends one command and checks the reply's first line starts with `expect`.
    fn cmd(&mut self, line: &str, expect: &str) {
        let out = self.send(format!("{line}\r\n"));
        assert!(
            out.starts_with(expect),
            "{line:?}: expected {expect:?}, got {out:?}"
        );
    }

    fn ehlo(&mut self) -> &mut Self {
        self.cmd("EHLO client.test", "250-mx2.test");
        self
    }

    fn envelope(&mut self) -> &mut Self {
        self.ehlo();
        self.cmd("MAIL FROM:<sender@remote.test>", "250 2.1.0");
        self.cmd("RCPT TO:<user@example.test>", "250 2.1.5");
        self
    }
}

fn codes(out: &str) -> Vec<&str> {
    out.lines()
        .filter(|l| l.as_bytes().get(3) == Some(&b' '))
        .map(|l| &l[..3])
        .collect()
}

#[test]
fn ehlo_advertises_the_extensions() {
    let mut t = Transcript::new();
    let out = t.send("EHLO client.test\r\n");
    for ext in [
        "PIPELINING",
        "SIZE 36700160",
        "8BITMIME",
        "SMTPUTF8",
        "ENHANCEDSTATUSCODES",
        "STARTTLS",
    ] {
        assert!(out.contains(ext), "{ext} missing from {out}");
    }
}

#[test]
fn a_whole_transaction_is_stored_with_a_received_header() {
    let mut t = Transcript::new();
    t.envelope();
    t.cmd("DATA", "354 ");
    let out = t.send("Subject: hi\r\n\r\nbody\r\n.\r\n");
    assert!(out.starts_with("250 2.0.0 Ok: queued as "), "{out}");
    let m = &t.stored[0];
    assert!(out.contains(m.id.as_str()));
    assert_eq!(m.sender, "sender@remote.test");
    assert_eq!(m.recipients[0].address, "user@example.test");
    let body = String::from_utf8(m.body.clone()).unwrap();
    assert!(
        body.starts_with(
            "Received: from client.test ([192.0.2.7])\r\n\tby mx2.test (backupmx) with ESMTP id "
        ),
        "{body}"
    );
    assert!(
        body.contains("\r\n\tfor <user@example.test>;\r\n\tSat, 28 Nov 2026 05:13:46 +0000\r\n"),
        "{body}"
    );
    assert!(body.ends_with("\r\nSubject: hi\r\n\r\nbody\r\n"));
    t.cmd("QUIT", "221 2.0.0");
    assert!(t.closed);
}

#[test]
fn commands_out_of_sequence_get_503() {
    let mut t = Transcript::new();
    t.cmd("MAIL FROM:<a@b.test>", "503 5.5.1");
    t.cmd("RCPT TO:<user@example.test>", "503 5.5.1");
    t.cmd("DATA", "503 5.5.1");
    t.ehlo();
    t.cmd("RCPT TO:<user@example.test>", "503 5.5.1");
    t.cmd("MAIL FROM:<a@b.test>", "250");
    t.cmd("MAIL FROM:<a@b.test>", "503 5.5.1");
    t.cmd("DATA", "554 5.5.1");
}

#[test]
fn relay_is_denied_and_null_sender_accepted() {
    let mut t = Transcript::new();
    t.ehlo();
    t.cmd("MAIL FROM:<>", "250 2.1.0");
    t.cmd("RCPT TO:<victim@elsewhere.test>", "550 5.7.1");
    t.cmd("RCPT TO:<user@EXAMPLE.test.>", "250 2.1.5");
}

#[test]
fn pipelined_commands_are_answered_in_order() {
    let mut t = Transcript::new();
    let out = t.send(
        "EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@example.test>\r\nRCPT TO:<y@other.test>\r\nDATA\r\nhello\r\n.\r\nQUIT\r\n",
    );
    assert_eq!(
        codes(&out),
        ["250", "250", "250", "550", "354", "250", "221"],
        "{out}"
    );
    assert_eq!(t.stored.len(), 1);
    assert!(t.closed);
}

#[test]
fn long_command_lines_get_500_and_the_session_continues() {
    let mut t = Transcript::new();
    t.ehlo();
    let long = format!("NOOP {}\r\n", "x".repeat(600));
    // Send in pieces so the line is longer than the buffer before it ends.
    let (a, b) = long.split_at(550);
    assert_eq!(t.send(a), "");
    assert!(t.send(b).starts_with("500 5.5.2"));
    let exactly_512 = format!("NOOP {}\r\n", "x".repeat(505));
    assert_eq!(exactly_512.len(), 512);
    t.cmd(exactly_512.trim_end(), "250");
    let just_over = format!("NOOP {}", "x".repeat(506));
    t.cmd(&just_over, "500 5.5.2");
    t.cmd("NOOP", "250 2.0.0");
}

#[test]
fn declared_size_over_the_limit_gets_552() {
    let mut t = Transcript::with(SessionConfig {
        max_message_size: 1000,
        ..SessionConfig::default()
    });
    t.ehlo();
    t.cmd("MAIL FROM:<a@b.test> SIZE=1001", "552 5.3.4");
    t.cmd("MAIL FROM:<a@b.test> SIZE=1000", "250");
}

#[test]
fn data_over_the_limit_is_refused_and_nothing_is_stored() {
    let mut t = Transcript::with(SessionConfig {
        max_message_size: 1000,
        ..SessionConfig::default()
    });
    t.envelope();
    t.cmd("DATA", "354");
    let big = format!("{}\r\n.\r\n", "y".repeat(2000));
    assert!(t.send(big).starts_with("552 5.3.4"));
    assert!(t.stored.is_empty());
    // The session is still usable.
    t.cmd("MAIL FROM:<a@b.test>", "250");
}

#[test]
fn per_domain_size_limit_applies() {
    let mut t = Transcript::new();
    t.ehlo();
    t.cmd("MAIL FROM:<a@b.test> SIZE=500", "250");
    t.cmd("RCPT TO:<u@small.test>", "552 5.3.4");
    t.cmd("RSET", "250");
    t.cmd("MAIL FROM:<a@b.test>", "250");
    t.cmd("RCPT TO:<u@small.test>", "250");
    t.cmd("DATA", "354");
    assert!(t
        .send(format!("{}\r\n.\r\n", "z".repeat(200)))
        .starts_with("552 5.3.4"));
}

#[test]
fn the_101st_recipient_gets_452() {
    let mut t = Transcript::new();
    t.ehlo();
    t.cmd("MAIL FROM:<a@b.test>", "250");
    for i in 0..100 {
        t.cmd(&format!("RCPT TO:<u{i}@example.test>"), "250");
    }
    t.cmd("RCPT TO:<u100@example.test>", "452 4.5.3");
    t.cmd("DATA", "354");
    t.send("x\r\n.\r\n");
    assert_eq!(t.stored[0].recipients.len(), 100);
}

#[test]
fn too_many_errors_close_the_session() {
    let mut t = Transcript::with(SessionConfig {
        max_errors: 3,
        ..SessionConfig::default()
    });
    t.cmd("BOGUS", "500 5.5.2");
    t.cmd("BOGUS", "500 5.5.2");
    let out = t.send("BOGUS\r\n");
    assert!(
        out.contains("500 5.5.2") && out.contains("421 4.7.0"),
        "{out}"
    );
    assert!(t.closed);
    assert_eq!(t.send("NOOP\r\n"), "");
}

#[test]
fn smuggled_end_of_data_does_not_end_the_message() {
    for smuggle in ["\n.\n", "\n.\r\n", "\r\n.\n", "\r.\r\n"] {
        let mut t = Transcript::new();
        t.envelope();
        t.cmd("DATA", "354");
        let payload = format!(
            "Subject: x\r\n\r\nbefore{smuggle}MAIL FROM:<evil@b.test>\r\nRCPT TO:<victim@example.test>\r\nDATA\r\nsmuggled\r\n.\r\n"
        );
        let out = t.send(payload);
        assert_eq!(codes(&out), ["250"], "{smuggle:?}: {out}");
        assert_eq!(t.stored.len(), 1, "{smuggle:?}");
        let body = &t.stored[0].body;
        assert!(body.windows(10).any(|w| w == b"MAIL FROM:"), "content kept");
        for (i, &b) in body.iter().enumerate() {
            assert!(
                b != b'\n' || body[i - 1] == b'\r',
                "{smuggle:?}: bare LF stored"
            );
            assert!(
                b != b'\r' || body.get(i + 1) == Some(&b'\n'),
                "{smuggle:?}: bare CR stored"
            );
        }
    }
}

#[test]
fn starttls_discards_pipelined_commands() {
    let mut t = Transcript::new();
    t.ehlo();
    let out = t.send("STARTTLS\r\nNOOP\r\nMAIL FROM:<injected@b.test>\r\n");
    assert_eq!(out, "220 2.0.0 Ready to start TLS\r\n");
    assert_eq!(t.tls_started, 1);
    // The session was reset: MAIL needs a new EHLO.
    t.cmd("MAIL FROM:<a@b.test>", "503 5.5.1");
    let out = t.send("EHLO client.test\r\n");
    assert!(!out.contains("STARTTLS"), "{out}");
    t.cmd("STARTTLS", "503 5.5.1");
    t.cmd("MAIL FROM:<a@b.test>", "250");
    t.cmd("RCPT TO:<u@example.test>", "250");
    t.cmd("DATA", "354");
    t.send("x\r\n.\r\n");
    assert!(String::from_utf8_lossy(&t.stored[0].body).contains("with ESMTPS id"));
}

#[test]
fn starttls_without_certificate_is_not_implemented() {
    let mut t = Transcript::with(SessionConfig::default());
    let out = t.send("EHLO c.test\r\n");
    assert!(!out.contains("STARTTLS"));
    t.cmd("STARTTLS", "502 5.5.1");
}

#[test]
fn a_filter_refusal_is_the_reply_to_data_and_the_session_goes_on() {
    let mut t = Transcript::new();
    t.filter_refuses = true;
    t.envelope();
    t.cmd("DATA", "354");
    assert_eq!(t.send("x\r\n.\r\n"), "550 5.7.1 Gtube pattern\r\n");
    assert!(t.stored.is_empty());
    let refusals: Vec<(&str, u16)> = t
        .session
        .take_rejections()
        .map(|r| (r.reason, r.code))
        .collect();
    assert_eq!(refusals, vec![("filter", 550)]);
    t.cmd("MAIL FROM:<a@b.test>", "250");
}

#[test]
fn storage_failure_gives_451() {
    let mut t = Transcript::new();
    t.store_fails = true;
    t.envelope();
    t.cmd("DATA", "354");
    assert!(t.send("x\r\n.\r\n").starts_with("451 4.3.0"));
    t.cmd("MAIL FROM:<a@b.test>", "250");
}

#[test]
fn too_many_received_headers_is_a_loop() {
    let mut t = Transcript::new();
    t.envelope();
    t.cmd("DATA", "354");
    let hops = "Received: from x by y; Thu, 1 Jan 2026 00:00:00 +0000\r\n".repeat(101);
    assert!(t
        .send(format!("{hops}\r\nbody\r\n.\r\n"))
        .starts_with("554 5.4.6"));
    t.envelope_again();
    let hops = "Received: from x by y; Thu, 1 Jan 2026 00:00:00 +0000\r\n".repeat(100);
    assert!(t
        .send(format!("{hops}\r\nbody\r\n.\r\n"))
        .starts_with("250"));
}

impl Transcript {
    fn envelope_again(&mut self) {
        self.cmd("MAIL FROM:<sender@remote.test>", "250 2.1.0");
        self.cmd("RCPT TO:<user@example.test>", "250 2.1.5");
        self.cmd("DATA", "354");
    }
}

#[test]
fn non_ascii_addresses_need_smtputf8() {
    let mut t = Transcript::new();
    t.ehlo();
    t.cmd("MAIL FROM:<jöran@b.test>", "553 5.6.7");
    t.cmd("MAIL FROM:<jöran@b.test> SMTPUTF8", "250");
    t.cmd("RCPT TO:<ünicode@example.test>", "250");
    t.cmd("DATA", "354");
    t.send("x\r\n.\r\n");
    assert!(String::from_utf8_lossy(&t.stored[0].body).contains("with UTF8SMTP id"));
}

#[test]
fn timeout_and_shutdown_send_421() {
    let mut t = Transcript::new();
    assert!(t.session.is_idle());
    t.session.handle_timeout();
    assert!(t.drain().starts_with("421 4.4.2"));
    assert!(t.closed);
    let mut t = Transcript::new();
    t.session.handle_shutdown();
    assert!(t.drain().starts_with("421 4.3.2"));
}

#[test]
fn misc_commands() {
    let mut t = Transcript::new();
    t.cmd("HELO client.test", "250 mx2.test");
    t.cmd("VRFY user", "252 2.0.0");
    t.cmd("HELP", "214 2.0.0");
    t.cmd("EXPN staff", "502 5.5.1");
    t.cmd("NOOP", "250 2.0.0");
    t.cmd("RSET", "250 2.0.0");
    t.cmd("MAIL FROM:<a@b.test>", "250");
    t.cmd("RCPT TO:<u@example.test>", "250");
    t.cmd("DATA", "354");
    t.send("x\r\n.\r\n");
    assert!(String::from_utf8_lossy(&t.stored[0].body).contains("with SMTP id"));
}

#[test]
fn byte_at_a_time_input_works() {
    let mut t = Transcript::new();
    let input = b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@example.test>\r\nDATA\r\nline\r\n..dot\r\n.\r\nQUIT\r\n";
    let mut out = String::new();
    for b in input {
        out += &t.send([*b]);
    }
    assert_eq!(
        codes(&out),
        ["250", "250", "250", "354", "250", "221"],
        "{out}"
    );
    assert!(t.stored[0].body.ends_with(b"\r\nline\r\n.dot\r\n"));
}

#[test]
fn etrn_is_offered_and_answered_by_the_driver() {
    let mut t = Transcript::with(SessionConfig {
        etrn_available: true,
        ..SessionConfig::default()
    });
    t.cmd("ETRN example.test", "503 5.5.1");
    let out = t.send("EHLO c.test\r\n");
    assert!(
        out.contains("250-ETRN") || out.contains("250 ETRN"),
        "{out}"
    );
    t.cmd("ETRN example.test", "253 2.0.0");
    t.cmd("ETRN other.test", "459 4.7.1");
    t.cmd("MAIL FROM:<a@b.test>", "250");
    t.cmd("ETRN example.test", "503 5.5.1");
}

#[test]
fn etrn_without_a_worker_is_not_implemented() {
    let mut t = Transcript::new();
    let out = t.send("EHLO c.test\r\n");
    assert!(!out.contains("ETRN"));
    t.cmd("ETRN example.test", "502 5.5.1");
}

#[test]
fn mail_waits_for_admission_and_a_refusal_is_452() {
    let mut t = Transcript::with(SessionConfig {
        admit_mail: true,
        ..SessionConfig::default()
    });
    t.ehlo();
    t.admission = Err(Reply::new(452, "4.3.1", "Insufficient system storage"));
    // Pipelined: MAIL refused, so RCPT and DATA are out of sequence.
    let out =
        t.send("MAIL FROM:<a@remote.test> SIZE=5000\r\nRCPT TO:<user@example.test>\r\nDATA\r\n");
    assert_eq!(codes(&out), ["452", "503", "503"], "{out}");
    assert!(out.starts_with("452 4.3.1 "), "{out}");
    assert_eq!(t.admissions, [Some(5000)]);
    t.admission = Ok(());
    t.cmd("MAIL FROM:<a@remote.test>", "250 2.1.0");
    assert_eq!(t.admissions, [Some(5000), None]);
    t.cmd("RCPT TO:<user@example.test>", "250 2.1.5");
    t.cmd("DATA", "354");
    t.cmd("Subject: x\r\n\r\nbody\r\n.", "250 2.0.0");
    assert_eq!(t.stored.len(), 1);
}

#[test]
fn refused_data_is_read_to_its_end_and_answered_452() {
    let mut t = Transcript::new();
    t.envelope();
    t.cmd("DATA", "354");
    t.send("Subject: big\r\n\r\n".to_string() + &"x".repeat(10_000) + "\r\n");
    assert!(t.session.data_held() >= 10_000);
    t.session
        .refuse_data(Reply::new(452, "4.3.1", "Insufficient system resources"));
    assert_eq!(t.session.data_held(), 0, "the kept data is freed at once");
    let out = t.send("more data\r\n.\r\n");
    assert!(out.starts_with("452 4.3.1 "), "{out}");
    assert!(t.stored.is_empty());
    // The session goes on: the next message is stored.
    t.cmd("MAIL FROM:<a@remote.test>", "250 2.1.0");
    t.cmd("RCPT TO:<user@example.test>", "250 2.1.5");
    t.cmd("DATA", "354");
    t.cmd("Subject: y\r\n\r\nsmall\r\n.", "250 2.0.0");
    assert_eq!(t.stored.len(), 1);
}

#[test]
fn a_big_message_can_leave_memory_while_it_arrives() {
    let mut wire = b"Received: from a\r\nReceived: from b\r\nSubject: big\r\n\r\n".to_vec();
    for i in 0..40_000 {
        wire.extend_from_slice(format!(".line {i} with a leading dot\r\nbare\nlf\r\n").as_bytes());
    }
    let mut whole = Transcript::new();
    whole.envelope();
    whole.cmd("DATA", "354");
    let mut spilled = Transcript::new();
    spilled.envelope();
    spilled.cmd("DATA", "354");
    let mut pieces = Vec::new();
    for chunk in wire.chunks(32 * 1024) {
        whole.send(chunk);
        spilled.send(chunk);
        if let Some(piece) = spilled.session.take_data_over(100_000) {
            assert!(piece.len() >= 100_000);
            pieces.push(piece);
        }
        assert!(spilled.session.data_held() < 300_000, "held stays bounded");
    }
    assert!(whole.send(".\r\n").starts_with("250 "));
    assert!(spilled.send(".\r\n").starts_with("250 "));
    assert!(pieces.len() > 5);
    let mut joined: Vec<u8> = pieces.concat();
    joined.extend_from_slice(&spilled.stored[0].body);
    let expected = &whole.stored[0].body;
    // The Received headers differ only in the queue id.
    let strip = |b: &[u8]| b[b.windows(4).position(|w| w == b";\r\n\t").unwrap()..].to_vec();
    assert_eq!(strip(&joined), strip(expected));
}

#[test]
fn loop_detection_counts_the_headers_of_a_spilled_message() {
    let mut t = Transcript::with(SessionConfig {
        max_received_headers: 3,
        ..SessionConfig::default()
    });
    t.envelope();
    t.cmd("DATA", "354");
    t.send(
        "Received: 1\r\nReceived: 2\r\nReceived: 3\r\nReceived: 4\r\n\r\n".to_string()
            + &"x".repeat(5000)
            + "\r\n",
    );
    assert!(t.session.take_data_over(1000).is_some());
    let out = t.send(".\r\n");
    assert!(out.starts_with("554 5.4.6"), "{out}");
}

#[test]
fn a_repeated_recipient_is_accepted_once() {
    let mut t = Transcript::new();
    t.envelope();
    t.cmd("RCPT TO:<user@EXAMPLE.test>", "250 2.1.5 Ok (duplicate");
    t.cmd("RCPT TO:<other@example.test>", "250 2.1.5 Ok\r");
    t.cmd("DATA", "354");
    t.cmd("x\r\n.", "250 2.0.0");
    let rcpts: Vec<&str> = t.stored[0]
        .recipients
        .iter()
        .map(|r| r.address.as_str())
        .collect();
    assert_eq!(rcpts, ["user@example.test", "other@example.test"]);
}

#[test]
fn a_unicode_domain_is_the_same_as_its_a_labels_and_still_needs_smtputf8() {
    let mut t = Transcript::new();
    t.ehlo();
    t.cmd("MAIL FROM:<a@remote.test>", "250");
    t.cmd("RCPT TO:<u@bücher.example.test>", "553 5.6.7");
    t.cmd("RSET", "250");
    t.cmd("MAIL FROM:<a@remote.test> SMTPUTF8", "250");
    t.cmd("RCPT TO:<u@bücher.example.test>", "550 5.7.1");
    assert_eq!(
        crate::address::DomainName::parse("Bücher.Example.TEST")
            .unwrap()
            .as_str(),
        "xn--bcher-kva.example.test"
    );
}

#[test]
fn bare_postmaster_is_accepted_and_goes_to_the_configured_address() {
    let ops = crate::address::DomainName::parse("ops.test").unwrap();
    let mut t = Transcript::with(SessionConfig {
        postmaster: Some(AcceptedRecipient {
            dsn: Default::default(),
            address: "admin@ops.test".into(),
            domain: ops.clone(),
        }),
        ..SessionConfig::default()
    });
    t.ehlo();
    t.cmd("MAIL FROM:<a@remote.test>", "250");
    t.cmd("RCPT TO:<Postmaster>", "250 2.1.5");
    t.cmd("RCPT TO:<POSTMASTER>", "250 2.1.5");
    t.cmd("DATA", "354");
    t.cmd("x\r\n.", "250 2.0.0");
    assert_eq!(t.stored[0].recipients.len(), 1);
    assert_eq!(t.stored[0].recipients[0].address, "admin@ops.test");
    assert_eq!(t.stored[0].recipients[0].domain, ops);

    let mut none = Transcript::new();
    none.ehlo();
    none.cmd("MAIL FROM:<a@remote.test>", "250");
    none.cmd("RCPT TO:<postmaster>", "550 5.1.1");
}

#[test]
fn error_replies_are_handed_to_the_driver_to_count() {
    let mut t = Transcript::new();
    t.cmd("RCPT TO:<a@example.test>", "503 5.5.1");
    t.ehlo();
    t.cmd("MAIL FROM:<s@remote.test>", "250");
    t.cmd("RCPT TO:<a@elsewhere.test>", "550 5.7.1");
    let counted: Vec<_> = t.session.take_rejections().collect();
    assert_eq!(
        counted,
        [
            Rejection {
                reason: "sequence",
                code: 503
            },
            Rejection {
                reason: "recipient",
                code: 550
            }
        ]
    );
    assert_eq!(t.session.take_rejections().count(), 0, "handed out once");
}

#[test]
fn deadlines_come_out_of_the_session() {
    let cfg = SessionConfig {
        idle_timeout: Duration::from_secs(300),
        data_timeout: Duration::from_secs(600),
        ..SessionConfig::default()
    };
    let mut t = Transcript::with(cfg);
    let start = Instant::now();
    // Between commands: the idle timeout, from whenever the driver asks.
    assert_eq!(
        t.session.poll_timeout(start),
        start + Duration::from_secs(300)
    );
    let later = start + Duration::from_secs(100);
    assert_eq!(
        t.session.poll_timeout(later),
        later + Duration::from_secs(300)
    );
    // A command line under way must be complete within the idle timeout of
    // its first byte, however slowly it trickles in.
    t.send("NO");
    assert_eq!(
        t.session.poll_timeout(start),
        start + Duration::from_secs(300)
    );
    assert_eq!(
        t.session.poll_timeout(later),
        start + Duration::from_secs(300)
    );
    t.send("OP\r\n");
    // The driver asks before every read: between commands the deadline goes.
    let between = start + Duration::from_secs(900);
    assert_eq!(
        t.session.poll_timeout(between),
        between + Duration::from_secs(300)
    );
    t.envelope();
    t.cmd("DATA", "354");
    // The DATA phase has its own, longer bound; each wait is at most the
    // idle timeout.
    let data_start = start + Duration::from_secs(1000);
    assert_eq!(
        t.session.poll_timeout(data_start),
        data_start + Duration::from_secs(300)
    );
    let late = data_start + Duration::from_secs(500);
    assert_eq!(
        t.session.poll_timeout(late),
        data_start + Duration::from_secs(600)
    );
}

#[test]
fn queue_ids_differ_within_a_session_and_across_seeds() {
    let mut ids = std::collections::HashSet::new();
    for seed in [1, 2] {
        let mut s = Session::new(
            Arc::new(SessionConfig::default()),
            "192.0.2.7".parse().unwrap(),
            seed,
        );
        for _ in 0..100 {
            let id = s.next_queue_id(Transcript::now());
            assert!(QueueId::parse(id.as_str()).is_ok());
            assert!(ids.insert(id), "ids repeat");
        }
    }
}

/// The body a test message was stored with, after our Received header.
fn client_data(m: &AcceptedMessage) -> &[u8] {
    let end = m.body.windows(4).position(|w| w == b";\r\n\t").unwrap() + 4;
    let line_end = m.body[end..].windows(2).position(|w| w == b"\r\n").unwrap();
    &m.body[end + line_end + 2..]
}

#[test]
fn chunking_is_advertised() {
    let mut t = Transcript::new();
    let out = t.send("EHLO client.test\r\n");
    assert!(out.contains("250-CHUNKING\r\n"), "{out}");
    assert!(!out.contains("BINARYMIME"), "{out}");
}

#[test]
fn bdat_chunks_are_taken_byte_exact_and_pipelined() {
    let tricky: &[u8] =
        b"Subject: dots\r\n\r\n.leading dot\r\n.\r\nbare\nlf and bare\rcr\r\n..two\r\n";
    let (a, b) = tricky.split_at(20);
    let mut t = Transcript::new();
    t.ehlo();
    let mut wire = b"MAIL FROM:<s@remote.test>\r\nRCPT TO:<user@example.test>\r\n".to_vec();
    wire.extend_from_slice(format!("BDAT {}\r\n", a.len()).as_bytes());
    wire.extend_from_slice(a);
    wire.extend_from_slice(format!("BDAT {} LAST\r\n", b.len()).as_bytes());
    wire.extend_from_slice(b);
    wire.extend_from_slice(b"NOOP\r\n");
    let out = t.send(&wire);
    assert_eq!(codes(&out), ["250", "250", "250", "250", "250"], "{out}");
    assert!(
        out.contains("250 2.0.0 Ok: 20 octets received\r\n"),
        "{out}"
    );
    assert!(out.contains("Ok: queued as"), "{out}");
    assert_eq!(t.stored.len(), 1);
    assert_eq!(client_data(&t.stored[0]), tricky);
}

#[test]
fn bdat_split_across_reads_and_empty_last_chunk() {
    let mut t = Transcript::new();
    t.envelope();
    let body = b"Subject: x\r\n\r\nBDAT 5 LAST\r\nQUIT\r\n";
    let mut wire = format!("BDAT {}\r\n", body.len()).into_bytes();
    wire.extend_from_slice(body);
    wire.extend_from_slice(b"BDAT 0 LAST\r\n");
    let mut out = String::new();
    for byte in &wire {
        out.push_str(&t.send([*byte]));
    }
    assert_eq!(codes(&out), ["250", "250"], "{out}");
    assert!(!t.closed, "commands inside a chunk are data");
    assert_eq!(client_data(&t.stored[0]), body);
}

#[test]
fn bdat_over_the_size_limit_is_refused_and_nothing_is_stored() {
    let mut t = Transcript::with(SessionConfig {
        max_message_size: 100,
        ..SessionConfig::default()
    });
    t.envelope();
    let mut wire = b"BDAT 60\r\n".to_vec();
    wire.extend_from_slice(&[b'a'; 60]);
    wire.extend_from_slice(b"BDAT 60\r\n");
    wire.extend_from_slice(&[b'b'; 60]);
    wire.extend_from_slice(b"BDAT 10 LAST\r\n");
    wire.extend_from_slice(&[b'c'; 10]);
    let out = t.send(&wire);
    assert_eq!(codes(&out), ["250", "552", "503"], "{out}");
    assert!(out.contains("552 5.3.4"), "{out}");
    assert!(t.stored.is_empty());
    // The session is in step: the next transaction goes through.
    t.cmd("MAIL FROM:<a@remote.test>", "250 2.1.0");
    t.cmd("RCPT TO:<user@example.test>", "250 2.1.5");
    t.cmd("BDAT 5 LAST\r\nhello", "250 2.0.0 Ok: queued");
    assert_eq!(client_data(&t.stored[0]), b"hello");
}

#[test]
fn a_refused_bdat_chunk_is_still_read_and_never_runs_as_commands() {
    let mut t = Transcript::new();
    t.ehlo();
    let out = t.send("BDAT 18\r\nRSET\r\nQUIT\r\nNOOP\r\nNOOP\r\n");
    assert!(out.starts_with("503 5.5.1"), "{out}");
    assert_eq!(codes(&out), ["503", "250"], "{out}");
    assert!(!t.closed);
    t.cmd("MAIL FROM:<a@remote.test>", "250");
    t.cmd("RCPT TO:<x@nowhere.test>", "550");
    let out = t.send("BDAT 6 LAST\r\nQUIT\r\n");
    assert!(out.starts_with("554 5.5.1"), "{out}");
    assert!(!t.closed);
}

#[test]
fn data_and_bdat_do_not_mix() {
    let mut t = Transcript::new();
    t.envelope();
    t.cmd("BDAT 3\r\nabc", "250 2.0.0");
    t.cmd("DATA", "503 5.5.1");
    t.cmd("BDAT 3 LAST\r\ndef", "250 2.0.0 Ok: queued");
    assert_eq!(client_data(&t.stored[0]), b"abcdef");
    // RSET drops a half-sent message.
    t.cmd("MAIL FROM:<a@remote.test>", "250");
    t.cmd("RCPT TO:<user@example.test>", "250");
    t.cmd("BDAT 3\r\nabc", "250 2.0.0");
    assert!(t.session.in_data() && !t.session.is_idle());
    t.cmd("RSET", "250");
    assert!(!t.session.in_data());
    t.cmd("BDAT 1 LAST\r\nx", "503");
    assert_eq!(t.stored.len(), 1);
}

#[test]
fn a_bdat_line_without_a_size_ends_the_session() {
    let mut t = Transcript::new();
    t.envelope();
    let out = t.send("BDAT ten\r\nMAIL FROM:<x@y.test>\r\n");
    assert!(out.starts_with("501 5.5.4"), "{out}");
    assert_eq!(codes(&out), ["501"], "{out}");
    assert!(t.closed);
}

#[test]
fn a_chunked_message_can_leave_memory_while_it_arrives() {
    let mut t = Transcript::new();
    t.envelope();
    let mut sent = Vec::new();
    let mut pieces = Vec::new();
    for i in 0..30 {
        let chunk = format!("line {i}\r\n{}\n", "y".repeat(10_000)).into_bytes();
        let mut wire = format!("BDAT {}\r\n", chunk.len()).into_bytes();
        wire.extend_from_slice(&chunk);
        sent.extend_from_slice(&chunk);
        assert!(t.send(&wire).starts_with("250 2.0.0"));
        assert!(t.session.in_data());
        if let Some(piece) = t.session.take_data_over(50_000) {
            pieces.push(piece);
        }
    }
    assert!(t.send("BDAT 0 LAST\r\n").contains("queued as"));
    assert!(pieces.len() >= 4);
    let mut joined = pieces.concat();
    joined.extend_from_slice(&t.stored[0].body);
    let start = joined.windows(4).position(|w| w == b";\r\n\t").unwrap() + 4;
    let start = start
        + joined[start..]
            .windows(2)
            .position(|w| w == b"\r\n")
            .unwrap()
        + 2;
    assert_eq!(&joined[start..], &sent[..]);
}

#[test]
fn requiretls_is_offered_and_taken_only_under_tls() {
    let mut t = Transcript::new();
    let out = t.send("EHLO client.test\r\n");
    assert!(!out.contains("REQUIRETLS"), "{out}");
    t.cmd("MAIL FROM:<a@remote.test> REQUIRETLS", "530 5.7.10");
    t.cmd("STARTTLS", "220");
    let out = t.send("EHLO client.test\r\n");
    assert!(out.contains("250 REQUIRETLS\r\n"), "{out}");
    t.cmd("MAIL FROM:<a@remote.test> REQUIRETLS", "250");
    t.cmd("RCPT TO:<user@example.test>", "250");
    t.cmd("DATA", "354");
    // With REQUIRETLS the header field is ignored (RFC 8689 §4.2.1).
    t.cmd("TLS-Required: No\r\n\r\nsecret\r\n.", "250");
    assert_eq!(t.stored[0].tls_request, Some(TlsRequest::Requiretls));
    t.cmd("MAIL FROM:<a@remote.test> REQUIRETLS REQUIRETLS", "501");
}

#[test]
fn tls_required_no_in_the_header_is_kept_with_the_message() {
    let mut t = Transcript::new();
    t.envelope();
    t.cmd("DATA", "354");
    t.cmd("Subject: x\r\ntls-required:  NO \r\n\r\nbody\r\n.", "250");
    t.cmd("MAIL FROM:<a@remote.test>", "250");
    t.cmd("RCPT TO:<user@example.test>", "250");
    t.cmd("DATA", "354");
    // Only in the header section.
    t.cmd("Subject: x\r\n\r\nTLS-Required: No\r\n.", "250");
    assert_eq!(t.stored[0].tls_request, Some(TlsRequest::NotRequired));
    assert_eq!(t.stored[1].tls_request, None);
}
