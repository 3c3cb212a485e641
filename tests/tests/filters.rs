//! End-to-end: greylisting and DNSBL against the real binary, with a real
//! DNS server on loopback and clients on different 127.x source addresses.

use std::time::Duration;

use backupmx_tests::dns::{DnsServer, Rec};
use backupmx_tests::*;

fn blocklist_dns() -> DnsServer {
    DnsServer::start(&[
        // RFC 5782 §5 test entries, so the zones pass their self-test.
        ("2.0.0.127.bl.test", Rec::A("127.0.0.2")),
        ("2.0.0.127.wl.test", Rec::A("127.0.0.2")),
        // 127.0.0.3 is listed; 127.0.0.4 gets Spamhaus' "public resolver" refusal.
        ("3.0.0.127.bl.test", Rec::A("127.0.0.2")),
        ("4.0.0.127.bl.test", Rec::A("127.255.255.254")),
        // 127.0.0.5 is on the allowlist.
        ("5.0.0.127.wl.test", Rec::A("127.0.0.2")),
    ])
}

fn rcpt_reply(s: &Server, from_ip: &str, sender: &str, rcpt: &str) -> String {
    let mut c = s.client_from(from_ip);
    c.expect("EHLO client.test", "250");
    c.expect(&format!("MAIL FROM:<{sender}>"), "250");
    let r = c.cmd(&format!("RCPT TO:<{rcpt}>"));
    c.cmd("QUIT");
    r
}

#[test]
fn dnsbl_rejects_listed_clients_but_not_postmaster_and_ignores_refusals() {
    let dns = blocklist_dns();
    let s = Server::start(
        "",
        &format!(
            "{}\n[dnsbl]\nzones = [{{ zone = \"bl.test\", weight = 1 }}, {{ zone = \"bl.timeout.test\", weight = 1 }}]\nthreshold = 1\n",
            dns.toml()
        ),
    );
    let r = rcpt_reply(&s, "127.0.0.3", "a@remote.test", "user@example.test");
    assert!(r.starts_with("554 5.7.1"), "{r}");
    assert!(r.contains("bl.test") && r.contains("127.0.0.3"), "{r}");
    // postmaster@ of a hosted domain is never blocked.
    let r = rcpt_reply(&s, "127.0.0.3", "a@remote.test", "postmaster@example.test");
    assert!(r.starts_with("250"), "{r}");
    // 127.255.255.254 is an error, not a listing; the timing-out zone fails open.
    let r = rcpt_reply(&s, "127.0.0.4", "a@remote.test", "user@example.test");
    assert!(r.starts_with("250"), "{r}");
    // An unlisted client gets through.
    let r = rcpt_reply(&s, "127.0.0.6", "a@remote.test", "user@example.test");
    assert!(r.starts_with("250"), "{r}");
    let log = s.log();
    assert!(log.contains("dnsbl_error"), "the refusal is logged: {log}");
    assert!(
        log.contains("dnsbl_zone_disabled") && log.contains("bl.timeout.test"),
        "{log}"
    );
}

#[test]
fn a_dns_server_that_never_answers_fails_open() {
    // Nothing listens on the DNS port: every lookup times out.
    let s = Server::start(
        "",
        "[dns]\nservers = [\"127.0.0.1:9\"]\ntimeout = \"1s\"\n[dnsbl]\nzones = [{ zone = \"bl.test\" }]\n[greylist]\nenabled = true\ndelay = \"1s\"\n",
    );
    let r = rcpt_reply(&s, "127.0.0.3", "a@remote.test", "user@example.test");
    // Not rejected by the DNSBL; greylisted as an unknown triplet.
    assert!(r.starts_with("450 4.2.0"), "{r}");
}

#[test]
fn greylisting_defers_first_sight_and_accepts_the_retry() {
    let dns = blocklist_dns();
    let s = Server::start(
        "",
        &format!(
            "{}\n[dnsbl]\nallow_zones = [{{ zone = \"wl.test\" }}]\n[greylist]\nenabled = true\ndelay = \"2s\"\nretry_window = \"1h\"\n",
            dns.toml()
        ),
    );
    let (sender, rcpt) = ("alice@remote.test", "bob@example.test");
    // (127.0.0.2 is the RFC 5782 test address, listed on every zone.)
    let first = rcpt_reply(&s, "127.0.0.7", sender, rcpt);
    assert!(first.starts_with("450 4.2.0"), "{first}");
    assert!(
        !first
            .chars()
            .any(|c| c.is_ascii_digit() && first.contains(" seconds")),
        "{first}"
    );
    let early = rcpt_reply(&s, "127.0.0.7", sender, rcpt);
    assert!(early.starts_with("450 4.2.0"), "too early: {early}");
    std::thread::sleep(Duration::from_millis(2500));
    let retry = rcpt_reply(&s, "127.0.0.7", sender, rcpt);
    assert!(retry.starts_with("250"), "{retry}");
    // A neighbour in the same /24 shares the triplet.
    let neighbour = rcpt_reply(&s, "127.0.0.9", sender, rcpt);
    assert!(neighbour.starts_with("250"), "{neighbour}");
    // Another /24, another sender, another recipient: new triplets.
    assert!(rcpt_reply(&s, "127.0.1.2", sender, rcpt).starts_with("450 4.2.0"));
    assert!(rcpt_reply(&s, "127.0.0.7", "carol@remote.test", rcpt).starts_with("450 4.2.0"));
    assert!(rcpt_reply(&s, "127.0.0.7", sender, "dave@example.test").starts_with("450 4.2.0"));
    // postmaster@ is never greylisted; an allowlisted client skips it.
    assert!(
        rcpt_reply(&s, "127.0.2.2", "x@new.test", "postmaster@example.test").starts_with("250")
    );
    assert!(rcpt_reply(&s, "127.0.0.5", "y@new.test", "erin@example.test").starts_with("250"));
    // A whole message through after the retry.
    let mut c = s.client_from("127.0.0.7");
    let r = c.send_message(sender, &[rcpt], "Subject: after greylisting\r\n\r\nhi\r\n");
    assert!(r.starts_with("250"), "{r}");
}

#[test]
fn greylisting_can_be_switched_off_per_domain() {
    let s = Server::start(
        "",
        "[greylist]\nenabled = true\n[[domain]]\nname = \"nogrey.test\"\ngreylist = false\n",
    );
    assert!(rcpt_reply(&s, "127.0.0.2", "a@remote.test", "u@nogrey.test").starts_with("250"));
    assert!(
        rcpt_reply(&s, "127.0.0.2", "a@remote.test", "u@example.test").starts_with("450 4.2.0")
    );
    // The CLI switch works on the running server too.
    let out = s.cli(&[
        "domain",
        "add",
        "example.test",
        "--no-greylist",
        "--replace",
    ]);
    assert!(out.status.success());
    assert!(rcpt_reply(&s, "127.0.0.2", "b@remote.test", "u@example.test").starts_with("250"));
}

#[test]
fn greylist_state_survives_a_restart() {
    let mut s = Server::start("", "[greylist]\nenabled = true\ndelay = \"1s\"\n");
    assert!(rcpt_reply(&s, "127.0.0.2", "a@remote.test", "u@example.test").starts_with("450"));
    s.restart();
    std::thread::sleep(Duration::from_millis(1200));
    assert!(rcpt_reply(&s, "127.0.0.2", "a@remote.test", "u@example.test").starts_with("250"));
}
