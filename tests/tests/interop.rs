//! Interoperability with a real MTA (Debian's Postfix) on loopback, both
//! ways: Postfix as the primary that comes back after an outage (with and
//! without PIPELINING, with and without STARTTLS), and Postfix as a sender
//! relaying through backupmx with greylisting on, which must retry, and
//! which must take the DSN backupmx sends back.

use std::time::Duration;

use backupmx_tests::postfix::{delivered_matches, report, Postfix, PostfixOptions};
use backupmx_tests::sink::Sink;
use backupmx_tests::*;

const WAIT: Duration = Duration::from_secs(60);

/// A backlog queued while the Postfix primary is down, then delivered to
/// it: every message once, byte-exact after the primary's own headers.
fn backlog_to_postfix_primary(label: &str, opts: PostfixOptions) {
    let port = free_port();
    let mut primary = Postfix::new(
        port,
        &PostfixOptions {
            domains: vec!["example.test".into()],
            ..opts.clone()
        },
    );
    let s = Server::start_run(
        "",
        "[delivery]\nretry_initial = \"1h\"\nretry_max = \"2h\"\nprobe_interval = \"1h\"\n",
        &format!("[\"127.0.0.1:{port}\"]"),
    );
    let (wire, _) = big_message(700 * 1024);
    let mut ids = Vec::new();
    for i in 0..12 {
        let body = if i == 0 {
            // One big message: several spill and relay pieces.
            wire.replace("Subject: big", "Subject: m0")
        } else {
            format!("Subject: m{i}\r\n\r\n..dot line\r\nbare\nlf\r\n8bit \u{e9}\r\n")
        };
        let mut c = s.client();
        ids.push(queue_id(&c.send_message(
            "alice@remote.test",
            &["bob@example.test"],
            &body,
        )));
    }
    let stored: Vec<Vec<u8>> = ids.iter().map(|id| s.raw(id)).collect();
    eventually(
        WAIT,
        "the first attempt against the stopped primary",
        || s.log().contains("delivery_attempt").then_some(()),
    );
    primary.start();
    let out = s.cli(&["queue", "flush"]);
    assert!(out.status.success());
    let got = primary.wait_for(12, WAIT);
    eventually(WAIT, "an empty queue", || {
        s.queue().is_empty().then_some(())
    });
    std::thread::sleep(Duration::from_millis(500));
    let got_now = primary.maildir();
    assert_eq!(got_now.len(), 12, "each message once: {}", primary.log());
    for (i, raw) in stored.iter().enumerate() {
        let matching = got.iter().filter(|d| delivered_matches(d, raw)).count();
        assert_eq!(matching, 1, "message {i} delivered byte-exact once");
    }
    let log = primary.log();
    if opts.tls.is_some() {
        assert!(
            got.iter()
                .all(|d| String::from_utf8_lossy(d).contains("with ESMTPS")),
            "delivered over TLS"
        );
    }
    if opts.no_pipelining {
        // Postfix says so each time it leaves PIPELINING out of EHLO.
        assert!(
            log.contains("discarding EHLO keywords: PIPELINING"),
            "{log}"
        );
    }
    report(&format!(
        "interop: backupmx -> postfix primary ({label}): 12 queued while down, 12 delivered once, byte-exact"
    ));
}

#[test]
fn postfix_primary_with_pipelining() {
    backlog_to_postfix_primary("pipelining, plain", PostfixOptions::default());
}

#[test]
fn postfix_primary_without_pipelining() {
    backlog_to_postfix_primary(
        "no pipelining, plain",
        PostfixOptions {
            no_pipelining: true,
            ..PostfixOptions::default()
        },
    );
}

#[test]
fn postfix_primary_with_starttls() {
    let keys = tempfile::tempdir().expect("tempdir");
    self_signed_tls(keys.path());
    // Postfix reads the key as its own user.
    for f in ["cert.pem", "key.pem"] {
        let _ = std::process::Command::new("chmod")
            .arg("644")
            .arg(keys.path().join(f))
            .status();
    }
    let _ = std::process::Command::new("chmod")
        .arg("755")
        .arg(keys.path())
        .status();
    backlog_to_postfix_primary(
        "no pipelining, STARTTLS",
        PostfixOptions {
            no_pipelining: true,
            tls: Some((keys.path().join("cert.pem"), keys.path().join("key.pem"))),
            ..PostfixOptions::default()
        },
    );
}

#[test]
fn postfix_sender_retries_through_greylisting_and_takes_our_dsn() {
    let primary = Sink::start(0);
    primary.set(|b| {
        b.rcpt_replies = vec![(
            "nobody@example.test".into(),
            "550 5.1.1 no such user".into(),
        )]
    });
    let sender_port = free_port();
    // backupmx: greylisting on (1 s), DSNs for remote.test go back to the
    // sending Postfix, which hosts that domain.
    let s = Server::start_run(
        "",
        &format!(
            "[greylist]\nenabled = true\ndelay = \"1s\"\n[delivery]\nroutes = {{ \"remote.test\" = \"127.0.0.1:{sender_port}\" }}\n"
        ),
        &format!("[\"{}\"]", primary.addr),
    );
    let mut sender = Postfix::new(
        sender_port,
        &PostfixOptions {
            domains: vec!["remote.test".into()],
            relayhost: Some(s.addr),
            ..PostfixOptions::default()
        },
    );
    sender.start();
    let mut c = Client::connect(sender.addr);
    let reply = c.send_message(
        "alice@remote.test",
        &["bob@example.test", "nobody@example.test"],
        "Subject: through postfix\r\n\r\nhello\r\n",
    );
    assert!(reply.starts_with("250 "), "{reply}");
    // Postfix got 450 4.2.0, retried after the delay, and got through.
    let got = primary.wait_for(1, WAIT);
    assert_eq!(got[0].rcpts, ["bob@example.test"]);
    assert!(
        s.log().contains("greylisted") || s.log().contains("450"),
        "{}",
        s.log()
    );
    assert!(sender.log().contains("450 4.2.0"), "{}", sender.log());
    // The 550 for nobody@ became our DSN, which Postfix accepted and filed.
    let dsns = sender.wait_for(1, WAIT);
    let dsn = String::from_utf8_lossy(&dsns[0]).to_string();
    assert!(dsn.contains("multipart/report"), "{dsn}");
    assert!(dsn.contains("nobody@example.test"), "{dsn}");
    assert!(dsn.contains("Subject: through postfix"), "{dsn}");
    report("interop: postfix sender -> backupmx (greylisting on): 450 then retried, 1 delivered; our DSN accepted by postfix, 1 filed");
}
