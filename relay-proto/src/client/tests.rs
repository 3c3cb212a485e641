//! Client transcripts: scripted server replies, no sockets.

use super::*;
use crate::queue::TlsRequest;

fn reply(text: &str) -> Response {
    let mut p = ReplyParser::default();
    p.feed(text.as_bytes());
    p.next_reply().unwrap().expect("complete reply")
}

fn envelope(rcpts: &[&str]) -> Envelope {
    Envelope {
        dsn: Default::default(),
        recipient_dsn: Vec::new(),
        sender: "a@remote.test".into(),
        recipients: rcpts.iter().map(|s| (*s).to_string()).collect(),
        size: 100,
        smtputf8: false,
        eight_bit: false,
        tls_request: None,
    }
}

/// Drives the client against a list of server replies; returns what it sent.
fn run(client: &mut ClientSession, replies: &[&str]) -> String {
    run_chunked(client, replies, 1)
}

/// [`run`], with each message sent by BDAT in `chunks` chunks.
fn run_chunked(client: &mut ClientSession, replies: &[&str], chunks: usize) -> String {
    let mut sent = String::new();
    let mut replies = replies.iter();
    loop {
        match client.poll_next() {
            Next::Send(b) => sent.push_str(&String::from_utf8(b).unwrap()),
            Next::SendBody(n) => sent.push_str(&format!("<BODY{n}>\r\n")),
            Next::SendChunks(n) => {
                sent.push_str(&format!("<BDAT{n}x{chunks}>\r\n"));
                client.chunks_sent(chunks);
            }
            Next::StartTls => {
                sent.push_str("<TLS>\r\n");
                client.tls_done(true);
            }
            Next::ReadReply => match replies.next() {
                Some(r) => client.on_reply(reply(r)),
                None => {
                    client.connection_lost("eof");
                }
            },
            Next::Done => return sent,
        }
    }
}

const EHLO_FULL: &str =
    "250-mx.test\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250-8BITMIME\r\n250 SMTPUTF8\r\n";

#[test]
fn reply_parser_handles_multiline_and_split_input() {
    let mut p = ReplyParser::default();
    p.feed(b"250-first\r\n250-sec");
    assert_eq!(p.next_reply().unwrap(), None);
    p.feed(b"ond\r\n250 last\r\n220 next\r\n");
    let r = p.next_reply().unwrap().unwrap();
    assert_eq!(r.code, 250);
    assert_eq!(r.lines, ["first", "second", "last"]);
    assert_eq!(p.next_reply().unwrap().unwrap().code, 220);
    let mut bad = ReplyParser::default();
    bad.feed(b"hello\r\n");
    assert!(bad.next_reply().is_err());
    let mut bad = ReplyParser::default();
    bad.feed(b"999 x\r\n");
    assert!(bad.next_reply().is_err());
    let mut long = ReplyParser::default();
    long.feed(&[b'2'; 5000]);
    assert!(long.next_reply().is_err());
}

#[test]
fn enhanced_status_is_extracted() {
    assert_eq!(
        reply("550 5.1.1 no such user\r\n").enhanced_status(),
        Some("5.1.1")
    );
    assert_eq!(reply("550 no such user\r\n").enhanced_status(), None);
}

#[test]
fn pipelined_delivery_with_per_recipient_results() {
    let mut c = ClientSession::new("mx2.test", false, envelope(&["x@d.test", "y@d.test"]));
    let sent = run(
        &mut c,
        &[
            "220 hi\r\n",
            EHLO_FULL,
            "250 ok\r\n",
            "250 ok\r\n",
            "550 5.1.1 unknown\r\n",
            "354 go\r\n",
            "250 queued\r\n",
            "221 bye\r\n",
        ],
    );
    assert_eq!(
        sent,
        "EHLO mx2.test\r\nMAIL FROM:<a@remote.test> SIZE=100\r\nRCPT TO:<x@d.test>\r\nRCPT TO:<y@d.test>\r\nDATA\r\n<BODY0>\r\nQUIT\r\n"
    );
    assert_eq!(
        c.results(),
        [
            RcptResult::Delivered("250 queued".into()),
            RcptResult::Permanent("550 5.1.1 unknown".into())
        ]
    );
}

#[test]
fn without_pipelining_commands_go_one_at_a_time() {
    let mut c = ClientSession::new("mx2.test", false, envelope(&["x@d.test"]));
    let mut sent = Vec::new();
    let replies = [
        "220 hi\r\n",
        "250 mx.test\r\n",
        "250 ok\r\n",
        "250 ok\r\n",
        "354 go\r\n",
        "250 ok\r\n",
        "221 bye\r\n",
    ];
    let mut it = replies.iter();
    loop {
        match c.poll_next() {
            Next::Send(b) => sent.push(String::from_utf8(b).unwrap()),
            Next::SendBody(_) => sent.push("<BODY>".into()),
            Next::SendChunks(_) => unreachable!("no CHUNKING offered"),
            Next::ReadReply => c.on_reply(reply(it.next().unwrap())),
            Next::StartTls => unreachable!(),
            Next::Done => break,
        }
    }
    assert_eq!(
        sent,
        [
            "EHLO mx2.test\r\n",
            "MAIL FROM:<a@remote.test>\r\n",
            "RCPT TO:<x@d.test>\r\n",
            "DATA\r\n",
            "<BODY>",
            "QUIT\r\n"
        ]
    );
    assert_eq!(c.results(), [RcptResult::Delivered("250 ok".into())]);
}

#[test]
fn ehlo_refused_falls_back_to_helo() {
    let mut c = ClientSession::new("mx2.test", true, envelope(&["x@d.test"]));
    let sent = run(
        &mut c,
        &[
            "220 hi\r\n",
            "502 no ehlo\r\n",
            "250 hello\r\n",
            "250 ok\r\n",
            "250 ok\r\n",
            "354 go\r\n",
            "250 ok\r\n",
            "221 bye\r\n",
        ],
    );
    assert!(
        sent.starts_with("EHLO mx2.test\r\nHELO mx2.test\r\nMAIL FROM:<a@remote.test>\r\n"),
        "{sent}"
    );
    assert!(matches!(c.results()[0], RcptResult::Delivered(_)));
}

#[test]
fn starttls_is_used_when_offered_and_ehlo_repeated() {
    let mut c = ClientSession::new("mx2.test", true, envelope(&["x@d.test"]));
    let sent = run(
        &mut c,
        &[
            "220 hi\r\n",
            "250-mx.test\r\n250 STARTTLS\r\n",
            "220 go ahead\r\n",
            "250-mx.test\r\n250 PIPELINING\r\n",
            "250 ok\r\n",
            "250 ok\r\n",
            "354 go\r\n",
            "250 ok\r\n",
            "221 bye\r\n",
        ],
    );
    assert!(
        sent.starts_with("EHLO mx2.test\r\nSTARTTLS\r\n<TLS>\r\nEHLO mx2.test\r\nMAIL"),
        "{sent}"
    );
    assert!(c.tls_active());
    assert!(matches!(c.results()[0], RcptResult::Delivered(_)));
}

#[test]
fn refused_starttls_continues_in_the_clear() {
    let mut c = ClientSession::new("mx2.test", true, envelope(&["x@d.test"]));
    let sent = run(
        &mut c,
        &[
            "220 hi\r\n",
            "250-mx.test\r\n250 STARTTLS\r\n",
            "454 4.7.0 not now\r\n",
            "250 ok\r\n",
            "250 ok\r\n",
            "354 go\r\n",
            "250 ok\r\n",
            "221 bye\r\n",
        ],
    );
    assert!(!sent.contains("<TLS>"));
    assert!(matches!(c.results()[0], RcptResult::Delivered(_)));
}

#[test]
fn required_tls_never_sends_in_the_clear() {
    // Not offered: QUIT, every recipient deferred with the reason.
    let mut c =
        ClientSession::new("mx2.test", false, envelope(&["x@d.test", "y@d.test"])).require_tls();
    let sent = run(&mut c, &["220 hi\r\n", EHLO_FULL, "221 bye\r\n"]);
    assert_eq!(sent, "EHLO mx2.test\r\nQUIT\r\n");
    for r in c.results() {
        assert!(
            matches!(&r, RcptResult::Transient(t) if t.contains("does not offer STARTTLS")),
            "{r:?}"
        );
    }
    // Refused: the same, with the server's answer.
    let mut c = ClientSession::new("mx2.test", true, envelope(&["x@d.test"])).require_tls();
    let sent = run(
        &mut c,
        &[
            "220 hi\r\n",
            "250-mx.test\r\n250 STARTTLS\r\n",
            "454 4.7.0 not now\r\n",
            "221 bye\r\n",
        ],
    );
    assert!(!sent.contains("MAIL"), "{sent}");
    assert!(
        matches!(&c.results()[0], RcptResult::Transient(t) if t.contains("STARTTLS refused: 454")),
        "{:?}",
        c.results()
    );
    // A failed handshake (a certificate that does not verify): done, no retry here.
    let mut c = ClientSession::new("mx2.test", true, envelope(&["x@d.test"])).require_tls();
    let mut sent = String::new();
    for r in [
        "220 hi\r\n",
        "250-mx.test\r\n250 STARTTLS\r\n",
        "220 go\r\n",
    ] {
        while let Next::Send(b) = c.poll_next() {
            sent.push_str(&String::from_utf8(b).unwrap());
        }
        c.on_reply(reply(r));
    }
    assert!(matches!(c.poll_next(), Next::StartTls));
    c.tls_failed_because("invalid peer certificate: NotValidForName");
    assert!(matches!(c.poll_next(), Next::Done));
    assert!(c.tls_failed());
    assert!(
        matches!(&c.results()[0], RcptResult::Transient(t)
            if t == "TLS required by policy, handshake failed: invalid peer certificate: NotValidForName"),
        "{:?}",
        c.results()
    );
}

#[test]
fn mail_refused_fails_every_recipient_by_its_class() {
    let mut c = ClientSession::new("mx2.test", false, envelope(&["x@d.test", "y@d.test"]));
    let sent = run(
        &mut c,
        &[
            "220 hi\r\n",
            EHLO_FULL,
            "451 4.3.0 try later\r\n",
            "503 bad seq\r\n",
            "503 bad seq\r\n",
            "503 bad seq\r\n",
            "221 bye\r\n",
        ],
    );
    assert!(sent.ends_with("DATA\r\nQUIT\r\n"), "{sent}");
    assert_eq!(
        c.results(),
        vec![RcptResult::Transient("451 4.3.0 try later".into()); 2]
    );
}

#[test]
fn temporary_and_permanent_final_replies() {
    for (final_reply, transient) in [("452 4.3.1 full\r\n", true), ("554 5.7.1 spam\r\n", false)] {
        let mut c = ClientSession::new("mx2.test", false, envelope(&["x@d.test"]));
        run(
            &mut c,
            &[
                "220 hi\r\n",
                EHLO_FULL,
                "250 ok\r\n",
                "250 ok\r\n",
                "354 go\r\n",
                final_reply,
                "221 bye\r\n",
            ],
        );
        assert_eq!(
            matches!(c.results()[0], RcptResult::Transient(_)),
            transient,
            "{final_reply}"
        );
    }
}

#[test]
fn no_accepted_recipient_ends_without_a_body() {
    let mut c = ClientSession::new("mx2.test", false, envelope(&["x@d.test"]));
    let sent = run(
        &mut c,
        &[
            "220 hi\r\n",
            EHLO_FULL,
            "250 ok\r\n",
            "550 no\r\n",
            "354 go\r\n",
            "554 no rcpts\r\n",
            "221 bye\r\n",
        ],
    );
    assert!(!sent.contains("<BODY0>"), "{sent}");
    assert!(sent.ends_with("DATA\r\n.\r\nQUIT\r\n"), "{sent}");
    assert_eq!(c.results(), [RcptResult::Permanent("550 no".into())]);
}

#[test]
fn smtputf8_is_never_downgraded() {
    let mut env = envelope(&["x@d.test"]);
    env.smtputf8 = true;
    let mut c = ClientSession::new("mx2.test", false, env);
    let sent = run(
        &mut c,
        &[
            "220 hi\r\n",
            "250-mx.test\r\n250 PIPELINING\r\n",
            "221 bye\r\n",
        ],
    );
    assert!(!sent.contains("MAIL"), "{sent}");
    assert!(matches!(&c.results()[0], RcptResult::Permanent(t) if t.contains("5.6.7")));
}

#[test]
fn too_big_for_the_server_is_permanent() {
    let mut env = envelope(&["x@d.test"]);
    env.size = 5000;
    let mut c = ClientSession::new("mx2.test", false, env);
    run(&mut c, &["220 hi\r\n", EHLO_FULL, "221 bye\r\n"]);
    assert!(matches!(&c.results()[0], RcptResult::Permanent(t) if t.contains("5.3.4")));
}

#[test]
fn eight_bit_and_smtputf8_parameters_are_sent_when_offered() {
    let mut env = envelope(&["x@d.test"]);
    env.eight_bit = true;
    env.smtputf8 = true;
    let mut c = ClientSession::new("mx2.test", false, env);
    let sent = run(
        &mut c,
        &[
            "220 hi\r\n",
            EHLO_FULL,
            "250 ok\r\n",
            "250 ok\r\n",
            "354 go\r\n",
            "250 ok\r\n",
            "221 bye\r\n",
        ],
    );
    assert!(
        sent.contains("MAIL FROM:<a@remote.test> SIZE=100 BODY=8BITMIME SMTPUTF8\r\n"),
        "{sent}"
    );
}

#[test]
fn connection_loss_makes_open_recipients_transient() {
    let mut c = ClientSession::new("mx2.test", false, envelope(&["x@d.test", "y@d.test"]));
    run(
        &mut c,
        &[
            "220 hi\r\n",
            EHLO_FULL,
            "250 ok\r\n",
            "550 5.1.1 no\r\n",
            "250 ok\r\n",
            "354 go\r\n",
        ],
    );
    let results = c.results();
    assert_eq!(results[0], RcptResult::Permanent("550 5.1.1 no".into()));
    assert_eq!(results[1], RcptResult::Transient("eof".into()));
}

#[test]
fn greeting_refusal_is_transient() {
    let mut c = ClientSession::new("mx2.test", false, envelope(&["x@d.test"]));
    run(&mut c, &["554 go away\r\n", "221 bye\r\n"]);
    assert!(matches!(c.results()[0], RcptResult::Transient(_)));
}

#[test]
fn several_messages_share_one_connection() {
    let mut c = ClientSession::with_messages(
        "mx2.test",
        false,
        vec![
            envelope(&["x@d.test"]),
            envelope(&["y@d.test", "z@d.test"]),
            envelope(&["w@d.test"]),
        ],
    );
    let sent = run(
        &mut c,
        &[
            "220 hi\r\n",
            EHLO_FULL,
            // message 0
            "250 ok\r\n",
            "250 ok\r\n",
            "354 go\r\n",
            "250 queued 0\r\n",
            // message 1: RSET first, one recipient refused
            "250 reset\r\n",
            "250 ok\r\n",
            "550 5.1.1 no y\r\n",
            "250 ok\r\n",
            "354 go\r\n",
            "451 4.3.0 later\r\n",
            // message 2: MAIL refused
            "250 reset\r\n",
            "552 5.3.4 too big\r\n",
            "503 no\r\n",
            "503 no\r\n",
            "221 bye\r\n",
        ],
    );
    assert_eq!(sent.matches("EHLO").count(), 1, "{sent}");
    assert_eq!(sent.matches("RSET").count(), 2, "{sent}");
    assert!(
        sent.contains("<BODY0>") && sent.contains("<BODY1>") && !sent.contains("<BODY2>"),
        "{sent}"
    );
    assert!(sent.ends_with("QUIT\r\n"), "{sent}");
    let all = c.all_results();
    assert_eq!(all[0], [RcptResult::Delivered("250 queued 0".into())]);
    assert_eq!(
        all[1],
        [
            RcptResult::Permanent("550 5.1.1 no y".into()),
            RcptResult::Transient("451 4.3.0 later".into())
        ]
    );
    assert_eq!(all[2], [RcptResult::Permanent("552 5.3.4 too big".into())]);
}

#[test]
fn a_lost_connection_fails_the_messages_not_yet_sent() {
    let mut c = ClientSession::with_messages(
        "mx2.test",
        false,
        vec![envelope(&["x@d.test"]), envelope(&["y@d.test"])],
    );
    run(
        &mut c,
        &[
            "220 hi\r\n",
            EHLO_FULL,
            "250 ok\r\n",
            "250 ok\r\n",
            "354 go\r\n",
            "250 done\r\n",
        ],
    );
    let all = c.all_results();
    assert_eq!(all[0], [RcptResult::Delivered("250 done".into())]);
    assert!(matches!(all[1][0], RcptResult::Transient(_)), "{all:?}");
}

#[test]
fn several_messages_without_pipelining_wait_for_each_reply() {
    let mut c = ClientSession::with_messages(
        "mx2.test",
        false,
        vec![
            envelope(&["x@d.test"]),
            envelope(&["y@d.test", "z@d.test"]),
            envelope(&["w@d.test"]),
            envelope(&["v@d.test"]),
        ],
    );
    // A plain RFC 5321 server: no extension at all.
    let sent = run(
        &mut c,
        &[
            "220 hi\r\n",
            "250 mx.test\r\n",
            // message 0
            "250 ok\r\n",
            "250 ok\r\n",
            "354 go\r\n",
            "250 queued 0\r\n",
            // message 1: one recipient refused
            "250 reset\r\n",
            "250 ok\r\n",
            "550 5.1.1 no y\r\n",
            "250 ok\r\n",
            "354 go\r\n",
            "250 queued 1\r\n",
            // message 2: its only recipient refused, so no DATA
            "250 reset\r\n",
            "250 ok\r\n",
            "550 5.1.1 no w\r\n",
            // message 3
            "250 reset\r\n",
            "250 ok\r\n",
            "250 ok\r\n",
            "354 go\r\n",
            "250 queued 3\r\n",
            "221 bye\r\n",
        ],
    );
    assert_eq!(
        sent,
        "EHLO mx2.test\r\nMAIL FROM:<a@remote.test>\r\nRCPT TO:<x@d.test>\r\nDATA\r\n<BODY0>\r\n\
         RSET\r\nMAIL FROM:<a@remote.test>\r\nRCPT TO:<y@d.test>\r\nRCPT TO:<z@d.test>\r\nDATA\r\n<BODY1>\r\n\
         RSET\r\nMAIL FROM:<a@remote.test>\r\nRCPT TO:<w@d.test>\r\n\
         RSET\r\nMAIL FROM:<a@remote.test>\r\nRCPT TO:<v@d.test>\r\nDATA\r\n<BODY3>\r\nQUIT\r\n"
    );
    let all = c.all_results();
    assert_eq!(all[0], [RcptResult::Delivered("250 queued 0".into())]);
    assert_eq!(
        all[1],
        [
            RcptResult::Permanent("550 5.1.1 no y".into()),
            RcptResult::Delivered("250 queued 1".into())
        ]
    );
    assert_eq!(all[2], [RcptResult::Permanent("550 5.1.1 no w".into())]);
    assert_eq!(all[3], [RcptResult::Delivered("250 queued 3".into())]);
}

#[test]
fn rset_answered_421_fails_the_rest_transiently() {
    let mut c = ClientSession::with_messages(
        "mx2.test",
        false,
        vec![envelope(&["x@d.test"]), envelope(&["y@d.test"])],
    );
    run(
        &mut c,
        &[
            "220 hi\r\n",
            "250 mx.test\r\n",
            "250 ok\r\n",
            "250 ok\r\n",
            "354 go\r\n",
            "250 queued 0\r\n",
            "421 4.3.2 closing\r\n",
        ],
    );
    let all = c.all_results();
    assert_eq!(all[0], [RcptResult::Delivered("250 queued 0".into())]);
    assert!(
        matches!(&all[1][0], RcptResult::Transient(t) if t.contains("421")),
        "{all:?}"
    );
}

#[test]
fn a_server_with_no_extensions_gets_plain_rfc_5321() {
    // No SIZE, no 8BITMIME, no ENHANCEDSTATUSCODES, no PIPELINING: the
    // 8-bit message still goes (as every MTA does), with no parameters.
    let mut env = envelope(&["x@d.test", "y@d.test"]);
    env.eight_bit = true;
    let mut c = ClientSession::new("mx2.test", true, env);
    let sent = run(
        &mut c,
        &[
            "220 plain server\r\n",
            "250 plain.test\r\n",
            "250 sender ok\r\n",
            "550 no such user\r\n",
            "250 recipient ok\r\n",
            "354 go ahead\r\n",
            "250 ok\r\n",
            "221 bye\r\n",
        ],
    );
    assert_eq!(
        sent,
        "EHLO mx2.test\r\nMAIL FROM:<a@remote.test>\r\nRCPT TO:<x@d.test>\r\nRCPT TO:<y@d.test>\r\nDATA\r\n<BODY0>\r\nQUIT\r\n"
    );
    assert_eq!(
        c.results(),
        [
            RcptResult::Permanent("550 no such user".into()),
            RcptResult::Delivered("250 ok".into())
        ]
    );
}

#[test]
fn a_setup_only_session_hands_over_the_connection_after_tls_and_the_second_ehlo() {
    let mut c = ClientSession::setup_only("mx2.test", true).require_tls();
    let sent = run(
        &mut c,
        &[
            "220 mx.test\r\n",
            "250-mx.test\r\n250 STARTTLS\r\n",
            "220 go ahead\r\n",
            "250-mx.test\r\n250 PIPELINING\r\n",
        ],
    );
    assert_eq!(
        sent, "EHLO mx2.test\r\nSTARTTLS\r\n<TLS>\r\nEHLO mx2.test\r\n",
        "no MAIL, no QUIT: the connection is the driver's"
    );
    assert!(c.ready() && c.tls_active());
    assert_eq!(c.refusal(), None);
    assert_eq!(c.why_ended(), None);
}

#[test]
fn a_setup_only_session_in_the_clear_when_tls_is_only_opportunistic() {
    let mut c = ClientSession::setup_only("mx2.test", true);
    let sent = run(&mut c, &["220 mx.test\r\n", "250 mx.test\r\n"]);
    assert_eq!(sent, "EHLO mx2.test\r\n");
    assert!(c.ready() && !c.tls_active());
    // STARTTLS offered but refused: still the driver's, in the clear.
    let mut c = ClientSession::setup_only("mx2.test", true);
    run(
        &mut c,
        &[
            "220 mx.test\r\n",
            "250-mx.test\r\n250 STARTTLS\r\n",
            "454 4.7.0 TLS not available\r\n",
        ],
    );
    assert!(c.ready() && !c.tls_active());
}

#[test]
fn a_setup_only_session_is_not_handed_over_when_tls_is_required_and_missing() {
    let mut c = ClientSession::setup_only("mx2.test", true).require_tls();
    let sent = run(
        &mut c,
        &["220 mx.test\r\n", "250 mx.test\r\n", "221 bye\r\n"],
    );
    assert_eq!(sent, "EHLO mx2.test\r\nQUIT\r\n");
    assert!(!c.ready() && c.tls_policy_failed());
    assert!(c
        .why_ended()
        .is_some_and(|w| w.contains("does not offer STARTTLS")));

    let mut c = ClientSession::setup_only("mx2.test", true).require_tls();
    run(
        &mut c,
        &[
            "220 mx.test\r\n",
            "250-mx.test\r\n250 STARTTLS\r\n",
            "454 4.7.0 TLS not available\r\n",
            "221 bye\r\n",
        ],
    );
    assert!(!c.ready() && c.tls_policy_failed());
    assert_eq!(c.refusal().map(|r| r.code), Some(454));

    // A handshake that fails (a certificate that does not verify).
    let mut c = ClientSession::setup_only("mx2.test", true).require_tls();
    for r in [
        "220 mx.test\r\n",
        "250-mx.test\r\n250 STARTTLS\r\n",
        "220 go\r\n",
    ] {
        while let Next::Send(_) = c.poll_next() {}
        c.on_reply(reply(r));
    }
    assert_eq!(c.poll_next(), Next::StartTls);
    c.tls_failed_because("invalid peer certificate");
    assert_eq!(c.poll_next(), Next::Done);
    assert!(!c.ready() && c.tls_policy_failed());
    assert!(c
        .why_ended()
        .is_some_and(|w| w.contains("invalid peer certificate")));
}

#[test]
fn a_setup_only_session_keeps_the_refusal_that_ended_it() {
    let mut c = ClientSession::setup_only("mx2.test", false);
    run(
        &mut c,
        &["554 5.7.1 no callouts from you\r\n", "221 bye\r\n"],
    );
    assert!(!c.ready());
    assert_eq!(c.refusal().map(|r| r.code), Some(554));
    let mut c = ClientSession::setup_only("mx2.test", false);
    run(&mut c, &["220 mx.test\r\n", "421 4.3.2 busy\r\n"]);
    assert_eq!(c.refusal().map(|r| r.code), Some(421));
    // EHLO refused for good: HELO, and then the driver's.
    let mut c = ClientSession::setup_only("mx2.test", false);
    let sent = run(
        &mut c,
        &[
            "220 mx.test\r\n",
            "502 5.5.1 no EHLO\r\n",
            "250 mx.test\r\n",
        ],
    );
    assert_eq!(sent, "EHLO mx2.test\r\nHELO mx2.test\r\n");
    assert!(c.ready());
}

#[test]
fn dsn_requests_are_passed_on_only_to_a_server_that_offers_dsn() {
    let asked = || {
        let mut env = envelope(&["x@d.test", "y@d.test"]);
        env.dsn.ret = Some(crate::dsn_params::Ret::Hdrs);
        env.dsn.envid = Some("QQ+2B1".into());
        env.recipient_dsn = vec![
            RcptDsn {
                notify: crate::dsn_params::Notify::parse("SUCCESS,FAILURE"),
                orcpt: Some("rfc822;x@d.test".into()),
            },
            RcptDsn::default(),
        ];
        env
    };
    let replies = |ehlo: &'static str| {
        [
            "220 hi\r\n",
            ehlo,
            "250 ok\r\n",
            "250 ok\r\n",
            "250 ok\r\n",
            "354 go\r\n",
            "250 queued\r\n",
            "221 bye\r\n",
        ]
    };
    let mut c = ClientSession::new("mx2.test", false, asked());
    let sent = run(
        &mut c,
        &replies("250-mx.test\r\n250-PIPELINING\r\n250 DSN\r\n"),
    );
    assert!(c.offers_dsn());
    assert!(
        sent.contains("MAIL FROM:<a@remote.test> RET=HDRS ENVID=QQ+2B1\r\nRCPT TO:<x@d.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;x@d.test\r\nRCPT TO:<y@d.test>\r\n"),
        "{sent}"
    );
    let mut c = ClientSession::new("mx2.test", false, asked());
    let sent = run(&mut c, &replies("250-mx.test\r\n250 PIPELINING\r\n"));
    assert!(!c.offers_dsn());
    assert!(!sent.contains("NOTIFY") && !sent.contains("RET="), "{sent}");
}

const EHLO_CHUNKING: &str = "250-mx.test\r\n250-PIPELINING\r\n250-CHUNKING\r\n250 8BITMIME\r\n";

#[test]
fn a_server_with_chunking_gets_bdat_after_the_recipients_are_answered() {
    let mut c = ClientSession::with_messages(
        "mx2.test",
        false,
        vec![envelope(&["x@d.test", "y@d.test"]), envelope(&["z@d.test"])],
    );
    let sent = run_chunked(
        &mut c,
        &[
            "220 hi\r\n",
            EHLO_CHUNKING,
            "250 ok\r\n",
            "250 ok\r\n",
            "550 5.1.1 unknown\r\n",
            "250 2.0.0 chunk\r\n",
            "250 2.0.0 queued\r\n",
            "250 reset\r\n",
            "250 ok\r\n",
            "250 ok\r\n",
            "250 2.0.0 chunk\r\n",
            "452 4.3.1 full\r\n",
            "250 2.0.0 queued after all?\r\n",
            "221 bye\r\n",
        ],
        2,
    );
    assert_eq!(
        sent,
        "EHLO mx2.test\r\nMAIL FROM:<a@remote.test>\r\nRCPT TO:<x@d.test>\r\nRCPT TO:<y@d.test>\r\n<BDAT0x2>\r\n\
         RSET\r\nMAIL FROM:<a@remote.test>\r\nRCPT TO:<z@d.test>\r\n<BDAT1x2>\r\nQUIT\r\n"
    );
    assert_eq!(
        c.all_results(),
        [
            vec![
                RcptResult::Delivered("250 2.0.0 queued".into()),
                RcptResult::Permanent("550 5.1.1 unknown".into())
            ],
            // A refused chunk decides: the reply to the last is not believed.
            vec![RcptResult::Transient("452 4.3.1 full".into())],
        ]
    );
}

#[test]
fn no_chunk_is_sent_when_no_recipient_was_accepted() {
    let mut c = ClientSession::new("mx2.test", false, envelope(&["x@d.test"]));
    let sent = run_chunked(
        &mut c,
        &[
            "220 hi\r\n",
            EHLO_CHUNKING,
            "250 ok\r\n",
            "550 5.1.1 unknown\r\n",
            "221 bye\r\n",
        ],
        1,
    );
    assert_eq!(
        sent,
        "EHLO mx2.test\r\nMAIL FROM:<a@remote.test>\r\nRCPT TO:<x@d.test>\r\nQUIT\r\n"
    );
    assert_eq!(
        c.results(),
        [RcptResult::Permanent("550 5.1.1 unknown".into())]
    );
    // A refused MAIL: the RCPT replies are read, nothing is sent.
    let mut c = ClientSession::new("mx2.test", false, envelope(&["x@d.test"]));
    let sent = run_chunked(
        &mut c,
        &[
            "220 hi\r\n",
            EHLO_CHUNKING,
            "451 4.3.0 later\r\n",
            "503 5.5.1 need MAIL\r\n",
            "221 bye\r\n",
        ],
        1,
    );
    assert!(sent.ends_with("RCPT TO:<x@d.test>\r\nQUIT\r\n"), "{sent}");
    assert_eq!(
        c.results(),
        [RcptResult::Transient("451 4.3.0 later".into())]
    );
}

#[test]
fn chunking_without_pipelining_uses_data() {
    let mut c = ClientSession::new("mx2.test", false, envelope(&["x@d.test"]));
    let sent = run(
        &mut c,
        &[
            "220 hi\r\n",
            "250-mx.test\r\n250 CHUNKING\r\n",
            "250 ok\r\n",
            "250 ok\r\n",
            "354 go\r\n",
            "250 queued\r\n",
            "221 bye\r\n",
        ],
    );
    assert!(sent.contains("DATA\r\n<BODY0>"), "{sent}");
}

fn requiretls_envelope() -> Envelope {
    Envelope {
        tls_request: Some(TlsRequest::Requiretls),
        ..envelope(&["x@d.test"])
    }
}

const EHLO_TLS_REQUIRETLS: &str =
    "250-mx.test\r\n250-PIPELINING\r\n250-STARTTLS\r\n250 REQUIRETLS\r\n";

#[test]
fn requiretls_mail_goes_only_over_verified_tls_to_a_server_that_offers_it() {
    // Opportunistic TLS: never, whatever the server offers.
    let mut c = ClientSession::new("mx2.test", true, requiretls_envelope());
    let sent = run(
        &mut c,
        &[
            "220 hi\r\n",
            EHLO_TLS_REQUIRETLS,
            "220 go\r\n",
            EHLO_TLS_REQUIRETLS,
            "221 bye\r\n",
        ],
    );
    assert!(!sent.contains("MAIL"), "{sent}");
    assert!(matches!(&c.results()[0], RcptResult::Transient(t) if t.starts_with("REQUIRETLS")));
    // Required but unverified TLS: the same.
    let mut c = ClientSession::new("mx2.test", true, requiretls_envelope()).require_tls();
    run(
        &mut c,
        &[
            "220 hi\r\n",
            EHLO_TLS_REQUIRETLS,
            "220 go\r\n",
            EHLO_TLS_REQUIRETLS,
            "221 bye\r\n",
        ],
    );
    assert!(matches!(&c.results()[0], RcptResult::Transient(_)));
    // Verified, and offered: the parameter goes on.
    let mut c = ClientSession::new("mx2.test", true, requiretls_envelope()).require_verified_tls();
    let sent = run(
        &mut c,
        &[
            "220 hi\r\n",
            EHLO_TLS_REQUIRETLS,
            "220 go\r\n",
            EHLO_TLS_REQUIRETLS,
            "250 ok\r\n",
            "250 ok\r\n",
            "354 go\r\n",
            "250 queued\r\n",
            "221 bye\r\n",
        ],
    );
    assert!(
        sent.contains("MAIL FROM:<a@remote.test> REQUIRETLS\r\n"),
        "{sent}"
    );
    assert_eq!(c.results(), [RcptResult::Delivered("250 queued".into())]);
    // Verified, not offered: returned with 5.7.10, nothing sent.
    let mut c = ClientSession::new("mx2.test", true, requiretls_envelope()).require_verified_tls();
    let plain = "250-mx.test\r\n250-PIPELINING\r\n250 STARTTLS\r\n";
    let sent = run(
        &mut c,
        &[
            "220 hi\r\n",
            plain,
            "220 go\r\n",
            "250-mx.test\r\n250 PIPELINING\r\n",
            "221 bye\r\n",
        ],
    );
    assert!(!sent.contains("MAIL"), "{sent}");
    assert!(matches!(&c.results()[0], RcptResult::Permanent(t) if t.contains("5.7.10")));
}
