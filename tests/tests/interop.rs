//! Interoperability with real MTAs (Debian's Postfix and Exim) on
//! loopback, both ways: each as the primary that comes back after an outage
//! (with and without PIPELINING, with and without STARTTLS), and each as a
//! sender relaying through backupmx with greylisting on, which must retry,
//! and which must take the DSN backupmx sends back.

use std::time::Duration;

use backupmx_tests::exim::{Exim, EximOptions};
use backupmx_tests::mta::{delivered_matches, report};
use backupmx_tests::opensmtpd::OpenSmtpd;
use backupmx_tests::postfix::{Postfix, PostfixOptions};
use backupmx_tests::sink::Sink;
use backupmx_tests::*;

const WAIT: Duration = Duration::from_secs(60);

/// What the tests need of a real MTA.
trait Mta {
    const NAME: &'static str;
    /// Marks its own Received header with when the message came over TLS.
    const TLS_MARK: &'static str;
    fn start(&mut self);
    fn maildir(&self) -> Vec<Vec<u8>>;
    fn wait_for(&self, n: usize, within: Duration) -> Vec<Vec<u8>>;
    fn log(&self) -> String;
    /// Whether the MTA shows it left PIPELINING out (where it says so).
    fn shows_no_pipelining(&self) -> bool {
        true
    }
    /// How the messages came in, `bdat` or `data`, where the MTA logs it.
    fn body_commands(&self) -> Option<&'static str> {
        None
    }
}

impl Mta for Postfix {
    const NAME: &'static str = "postfix";
    const TLS_MARK: &'static str = "with ESMTPS";
    fn start(&mut self) {
        Postfix::start(self)
    }
    fn maildir(&self) -> Vec<Vec<u8>> {
        Postfix::maildir(self)
    }
    fn wait_for(&self, n: usize, within: Duration) -> Vec<Vec<u8>> {
        Postfix::wait_for(self, n, within)
    }
    fn log(&self) -> String {
        Postfix::log(self)
    }
    fn shows_no_pipelining(&self) -> bool {
        self.log().contains("discarding EHLO keywords: PIPELINING")
    }
    fn body_commands(&self) -> Option<&'static str> {
        postfix_body_commands(&self.log())
    }
}

impl Mta for Exim {
    const NAME: &'static str = "exim";
    const TLS_MARK: &'static str = "with esmtps";
    fn start(&mut self) {
        Exim::start(self)
    }
    fn maildir(&self) -> Vec<Vec<u8>> {
        Exim::maildir(self)
    }
    fn wait_for(&self, n: usize, within: Duration) -> Vec<Vec<u8>> {
        Exim::wait_for(self, n, within)
    }
    fn log(&self) -> String {
        Exim::log(self)
    }
}

impl Mta for OpenSmtpd {
    const NAME: &'static str = "opensmtpd";
    const TLS_MARK: &'static str = "with ESMTPS";
    fn start(&mut self) {
        OpenSmtpd::start(self)
    }
    fn maildir(&self) -> Vec<Vec<u8>> {
        OpenSmtpd::maildir(self)
    }
    fn wait_for(&self, n: usize, within: Duration) -> Vec<Vec<u8>> {
        OpenSmtpd::wait_for(self, n, within)
    }
    fn log(&self) -> String {
        OpenSmtpd::log(self)
    }
}

/// Postfix's `disconnect from … mail=1 rcpt=1 bdat=1 quit=1` lines: `bdat`
/// or `data` if every message of the sessions that sent any came one way.
fn postfix_body_commands(log: &str) -> Option<&'static str> {
    let sessions: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("disconnect from") && l.contains(" mail="))
        .collect();
    let all = |word: &str| !sessions.is_empty() && sessions.iter().all(|l| l.contains(word));
    if all(" bdat=") {
        Some("bdat")
    } else if all(" data=") {
        Some("data")
    } else {
        None
    }
}

/// Settings shared by the MTAs' primaries.
#[derive(Clone, Default)]
struct PrimarySetup {
    no_pipelining: bool,
    tls: bool,
}

fn postfix_primary(port: u16, setup: &PrimarySetup, keys: &std::path::Path) -> Postfix {
    Postfix::new(
        port,
        &PostfixOptions {
            domains: vec!["example.test".into()],
            no_pipelining: setup.no_pipelining,
            tls: setup
                .tls
                .then(|| (keys.join("cert.pem"), keys.join("key.pem"))),
            relayhost: None,
        },
    )
}

fn exim_primary(port: u16, setup: &PrimarySetup, keys: &std::path::Path) -> Exim {
    Exim::new(
        port,
        &EximOptions {
            domains: vec!["example.test".into()],
            no_pipelining: setup.no_pipelining,
            tls: setup
                .tls
                .then(|| (keys.join("cert.pem"), keys.join("key.pem"))),
            relayhost: None,
        },
    )
}

/// A certificate and key the MTAs' own users can read.
fn readable_keys() -> tempfile::TempDir {
    let keys = tempfile::tempdir().expect("tempdir");
    self_signed_tls(keys.path());
    make_keys_readable(keys.path());
    keys
}

/// A backlog queued while the primary is down, then delivered to it when
/// it is back: every message once, byte-exact after the primary's own
/// trace headers.
fn backlog_to_primary<M: Mta>(
    setup: PrimarySetup,
    make: fn(u16, &PrimarySetup, &std::path::Path) -> M,
) {
    let keys = readable_keys();
    let port = free_port();
    let mut primary = make(port, &setup, keys.path());
    let s = Server::start_run(
        "",
        "[delivery]\nretry_initial = \"1h\"\nretry_max = \"2h\"\nprobe_interval = \"1h\"\n",
        &format!("[\"127.0.0.1:{port}\"]"),
    );
    let (wire, _) = big_message(700 * 1024);
    let mut ids = Vec::new();
    for i in 0..12 {
        // Date and Message-ID, as real senders write them: MTAs that add
        // missing ones (OpenSMTPD does) then keep the message as it is.
        let headers = format!(
            "Subject: m{i}\r\nDate: Mon, 30 Nov 2026 12:00:00 +0000\r\nMessage-ID: <m{i}@remote.test>"
        );
        let body = if i == 0 {
            // One big message: several spill and relay pieces.
            wire.replace("Subject: big", &headers)
        } else {
            format!("{headers}\r\n\r\n..dot line\r\nbare\nlf\r\n8bit \u{e9}\r\n")
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
    assert_eq!(
        primary.maildir().len(),
        12,
        "each message once: {}",
        primary.log()
    );
    for (i, raw) in stored.iter().enumerate() {
        let matching = got.iter().filter(|d| delivered_matches(d, raw)).count();

        assert_eq!(matching, 1, "message {i} delivered byte-exact once");
    }
    if setup.no_pipelining {
        assert!(primary.shows_no_pipelining(), "{}", primary.log());
    }
    if M::NAME == "postfix" {
        // RFC 3030: BDAT to a primary that offers CHUNKING (with
        // PIPELINING, which we need for it), DATA otherwise.
        let expected = if setup.no_pipelining { "data" } else { "bdat" };
        assert_eq!(primary.body_commands(), Some(expected), "{}", primary.log());
    }
    if setup.tls {
        assert!(
            got.iter()
                .all(|d| String::from_utf8_lossy(d).contains(M::TLS_MARK)),
            "delivered over TLS: {}",
            String::from_utf8_lossy(&got[0][..got[0].len().min(600)])
        );
    }
    let label = match (setup.no_pipelining, setup.tls) {
        (false, false) => "pipelining, plain",
        (true, false) => "no pipelining, plain",
        (false, true) => "pipelining, STARTTLS",
        (true, true) => "no pipelining, STARTTLS",
    };
    report(&format!(
        "interop: backupmx -> {} primary ({label}): 12 queued while down, 12 delivered once, byte-exact",
        M::NAME
    ));
}

#[test]
fn postfix_primary_with_pipelining() {
    backlog_to_primary(PrimarySetup::default(), postfix_primary);
}

#[test]
fn postfix_primary_without_pipelining() {
    let setup = PrimarySetup {
        no_pipelining: true,
        ..PrimarySetup::default()
    };
    backlog_to_primary(setup, postfix_primary);
}

#[test]
fn postfix_primary_with_starttls() {
    let setup = PrimarySetup {
        no_pipelining: true,
        tls: true,
    };
    backlog_to_primary(setup, postfix_primary);
}

// OpenSMTPD (6.8) offers no PIPELINING at all. Its STARTTLS fails here
// (OpenSSL 3: "EVP lib" at the handshake, with RSA and ECDSA keys alike),
// so there is no TLS case for it; backupmx then falls back to plain text.
#[test]
fn opensmtpd_primary() {
    let setup = PrimarySetup {
        no_pipelining: true,
        tls: false,
    };
    backlog_to_primary(setup, |port, _, _| OpenSmtpd::new(port, &["example.test"]));
}

#[test]
fn exim_primary_with_pipelining() {
    backlog_to_primary(PrimarySetup::default(), exim_primary);
}

#[test]
fn exim_primary_without_pipelining() {
    let setup = PrimarySetup {
        no_pipelining: true,
        ..PrimarySetup::default()
    };
    backlog_to_primary(setup, exim_primary);
}

#[test]
fn exim_primary_with_starttls() {
    let setup = PrimarySetup {
        no_pipelining: false,
        tls: true,
    };
    backlog_to_primary(setup, exim_primary);
}

/// A real MTA sends through backupmx with greylisting on: it must retry
/// after the 450 and get through, and it must take the DSN backupmx sends
/// back for a recipient the primary refuses.
fn sender_through_greylisting<M: Mta>(make: fn(u16, std::net::SocketAddr) -> M) {
    let primary = Sink::start(0);
    primary.set(|b| {
        b.rcpt_replies = vec![(
            "nobody@example.test".into(),
            "550 5.1.1 no such user".into(),
        )]
    });
    let sender_port = free_port();
    // backupmx: greylisting on (1 s), DSNs for remote.test go back to the
    // sending MTA, which hosts that domain.
    let s = Server::start_run(
        "",
        &format!(
            "[greylist]\nenabled = true\ndelay = \"1s\"\n[delivery]\nroutes = {{ \"remote.test\" = \"127.0.0.1:{sender_port}\" }}\n"
        ),
        &format!("[\"{}\"]", primary.addr),
    );
    let mut sender = make(sender_port, s.addr);
    sender.start();
    let mut c = Client::connect(std::net::SocketAddr::from(([127, 0, 0, 1], sender_port)));
    let reply = c.send_message(
        "alice@remote.test",
        &["bob@example.test", "nobody@example.test"],
        "Subject: through a real MTA\r\n\r\nhello\r\n",
    );
    assert!(reply.starts_with("250 "), "{reply}");
    // The sender got 450 4.2.0, retried after the delay, and got through.
    let got = primary.wait_for(1, WAIT);
    assert_eq!(got[0].rcpts, ["bob@example.test"]);
    assert!(sender.log().contains("450 4.2.0"), "{}", sender.log());
    // The 550 for nobody@ became our DSN, which the sender took and filed.
    let dsns = sender.wait_for(1, WAIT);
    let dsn = String::from_utf8_lossy(&dsns[0]).to_string();
    assert!(dsn.contains("multipart/report"), "{dsn}");
    assert!(dsn.contains("nobody@example.test"), "{dsn}");
    assert!(dsn.contains("Subject: through a real MTA"), "{dsn}");
    if M::NAME == "postfix" {
        // Postfix offers CHUNKING: our DSN went to it by BDAT (the test
        // client's own session to it used DATA).
        let log = sender.log();
        assert!(
            log.lines()
                .any(|l| l.contains("disconnect from") && l.contains(" bdat=1")),
            "{log}"
        );
    }
    report(&format!(
        "interop: {} sender -> backupmx (greylisting on): 450, retried, 1 delivered; our DSN taken and filed: 1",
        M::NAME
    ));
}

#[test]
fn postfix_sender_retries_through_greylisting_and_takes_our_dsn() {
    sender_through_greylisting(|port, relay| {
        Postfix::new(
            port,
            &PostfixOptions {
                domains: vec!["remote.test".into()],
                relayhost: Some(relay),
                ..PostfixOptions::default()
            },
        )
    });
}

#[test]
fn exim_sender_retries_through_greylisting_and_takes_our_dsn() {
    sender_through_greylisting(|port, relay| {
        Exim::new(
            port,
            &EximOptions {
                domains: vec!["remote.test".into()],
                relayhost: Some(relay),
                ..EximOptions::default()
            },
        )
    });
}
