//! End-to-end delivery: the real `backupmx run`, a real DNS server
//! (hickory-server on loopback) and recording SMTP servers as primaries.

use std::time::Duration;

use backupmx_tests::dns::{DnsServer, Rec};
use backupmx_tests::sink::Sink;
use backupmx_tests::*;

const WAIT: Duration = Duration::from_secs(30);

fn queue_len(s: &Server) -> usize {
    s.queue().len()
}

fn wait_attempted(s: &Server, id: &str) -> serde_json::Value {
    eventually(WAIT, "a failed delivery attempt", || {
        s.queue()
            .into_iter()
            .find(|e| e["id"] == id && e["attempts"].as_u64() >= Some(1))
    })
}

fn wait_empty(s: &Server) {
    eventually(WAIT, "an empty queue", || (queue_len(s) == 0).then_some(()));
}

/// A message with dot lines, 8-bit bytes, long and bare-LF lines.
const BODY: &str = "From: alice@remote.test\r\nSubject: relay me\r\n\r\n.leading dot\r\n..two dots\r\n\u{e9}\u{e8} 8bit\r\nbare\nlf\r\n";

#[test]
fn primary_down_then_back_is_delivered_once_byte_exact_by_the_probe() {
    let port = free_port();
    let s = Server::start_run(
        "",
        "[delivery]\nretry_initial = \"1h\"\nretry_max = \"2h\"\nprobe_interval = \"1s\"\n",
        &format!("[\"127.0.0.1:{port}\"]"),
    );
    let mut c = s.client();
    let id = queue_id(&c.send_message(
        "alice@remote.test",
        &["bob@example.test", "carol@example.test"],
        BODY,
    ));
    let stored = s.raw(&id);
    let entry = wait_attempted(&s, &id);
    assert!(
        entry["last_error"].as_str().unwrap().contains("connect"),
        "{entry}"
    );
    // Mail arriving while the destination is known down is queued
    // deferred, without an attempt of its own.
    let mut c = s.client();
    let later = queue_id(&c.send_message("dave@remote.test", &["bob@example.test"], BODY));
    let later_entry = s.queue().into_iter().find(|e| e["id"] == later).unwrap();
    assert_eq!(later_entry["attempts"], 0, "{later_entry}");
    assert!(
        later_entry["next_attempt"].as_str() > later_entry["received_at"].as_str(),
        "{later_entry}"
    );
    // The next backoff step is an hour away; only the probe can bring it.
    let sink = Sink::start(port);
    let got = sink.wait_for(2, WAIT);
    wait_empty(&s);
    std::thread::sleep(Duration::from_millis(500));
    let got_after = sink.received();
    assert_eq!(got_after.len(), 2, "each delivered exactly once");
    let got: Vec<_> = got
        .into_iter()
        .filter(|m| m.mail_from == "alice@remote.test")
        .collect();
    assert_eq!(got[0].mail_from, "alice@remote.test");
    assert_eq!(got[0].rcpts, ["bob@example.test", "carol@example.test"]);
    assert_eq!(got[0].data, stored, "byte-exact as stored");
    assert_no_bare_cr_lf(&got[0].wire);
    assert!(s.log().contains("destination_back"), "{}", s.log());
}

#[test]
fn temporary_failure_is_retried_with_backoff() {
    let sink = Sink::start(0);
    sink.set(|b| b.tempfail_next = 1);
    let s = Server::start_run(
        "",
        "[delivery]\nretry_initial = \"1s\"\nretry_max = \"2s\"\n",
        &format!("[\"{}\"]", sink.addr),
    );
    let mut c = s.client();
    let id = queue_id(&c.send_message("alice@remote.test", &["bob@example.test"], BODY));
    let got = sink.wait_for(1, WAIT);
    assert_eq!(got.len(), 1);
    wait_empty(&s);
    assert!(
        s.log().contains("451 4.3.0 try again later"),
        "first attempt was refused: {}",
        s.log()
    );
    assert!(s.log().contains(&id));
}

#[test]
fn a_550_recipient_bounces_to_the_senders_mx_while_the_other_is_delivered() {
    let primary = Sink::start(0);
    primary.set(|b| {
        b.rcpt_replies.push((
            "bad@example.test".into(),
            "550 5.1.1 <bad@example.test>: no such user".into(),
        ))
    });
    // The sender's MX listens on the port we deliver to MX hosts on.
    let sender_mx = Sink::start_on("127.0.0.3:0".parse().unwrap());
    let dns = DnsServer::start(&[
        ("remote.test", Rec::Mx(10, "mx.remote.test")),
        ("mx.remote.test", Rec::A("127.0.0.3")),
    ]);
    let s = Server::start_run(
        "",
        &format!(
            "[delivery]\nretry_initial = \"1s\"\nmx_port = {}\n{}",
            sender_mx.addr.port(),
            dns.toml()
        ),
        &format!("[\"{}\"]", primary.addr),
    );
    let mut c = s.client();
    let id = queue_id(&c.send_message(
        "alice@remote.test",
        &["good@example.test", "bad@example.test"],
        BODY,
    ));
    let delivered = primary.wait_for(1, WAIT);
    assert_eq!(delivered[0].rcpts, ["good@example.test"]);
    let bounces = sender_mx.wait_for(1, WAIT);
    let dsn = String::from_utf8_lossy(&bounces[0].data).to_string();
    assert_eq!(bounces[0].mail_from, "", "DSNs use the null sender");
    assert_eq!(bounces[0].rcpts, ["alice@remote.test"]);
    for needle in [
        "report-type=delivery-status",
        "Reporting-MTA: dns; mx2.test",
        "Final-Recipient: rfc822; bad@example.test",
        "Action: failed",
        "Status: 5.1.1",
        "Diagnostic-Code: smtp; 550 5.1.1 <bad@example.test>: no such user",
        "Subject: relay me",
        &format!("X-Backupmx-Queue-ID: {id}"),
    ] {
        assert!(dsn.contains(needle), "missing {needle:?} in DSN:\n{dsn}");
    }
    assert!(
        !dsn.contains("good@example.test"),
        "the delivered recipient is not reported"
    );
    wait_empty(&s);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        primary.received().len(),
        1,
        "the delivered recipient is never sent again"
    );
}

#[test]
fn null_sender_messages_are_never_bounced() {
    let primary = Sink::start(0);
    primary.set(|b| {
        b.rcpt_replies
            .push(("bad@example.test".into(), "550 5.1.1 no such user".into()))
    });
    let s = Server::start_run(
        "",
        "[delivery]\nretry_initial = \"1s\"\n",
        &format!("[\"{}\"]", primary.addr),
    );
    let mut c = s.client();
    queue_id(&c.send_message("", &["bad@example.test"], "Subject: a bounce\r\n\r\nx\r\n"));
    wait_empty(&s);
    assert!(s.log().contains("delivery_attempt"));
    assert!(!s.log().contains("bounce_queued"), "{}", s.log());
}

#[test]
fn queue_lifetime_expiry_sends_a_dsn() {
    let dead = free_port();
    let sender_mx = Sink::start_on("127.0.0.3:0".parse().unwrap());
    let dns = DnsServer::start(&[
        ("remote.test", Rec::Mx(10, "mx.remote.test")),
        ("mx.remote.test", Rec::A("127.0.0.3")),
    ]);
    let s = Server::start_run(
        "",
        &format!(
            "[delivery]\nretry_initial = \"1s\"\nretry_max = \"1s\"\nqueue_lifetime = \"3s\"\nmx_port = {}\n{}",
            sender_mx.addr.port(),
            dns.toml()
        ),
        &format!("[\"127.0.0.1:{dead}\"]"),
    );
    let mut c = s.client();
    queue_id(&c.send_message("alice@remote.test", &["bob@example.test"], BODY));
    let bounces = sender_mx.wait_for(1, WAIT);
    let dsn = String::from_utf8_lossy(&bounces[0].data).to_string();
    assert!(dsn.contains("Status: 4.4.7"), "{dsn}");
    assert!(dsn.contains("expired"), "{dsn}");
    assert!(
        dsn.contains("Final-Recipient: rfc822; bob@example.test"),
        "{dsn}"
    );
    wait_empty(&s);
}

#[test]
fn mx_resolution_skips_ourselves_and_worse_preferences() {
    let primary = Sink::start_on("127.0.0.4:0".parse().unwrap());
    // Every MX host listens on the same port number on its own address.
    let port = primary.addr.port();
    let worse = Sink::start_on(format!("127.0.0.5:{port}").parse().unwrap());
    let sender_mx = Sink::start_on(format!("127.0.0.6:{port}").parse().unwrap());
    let dns = DnsServer::start(&[
        ("hosted.test", Rec::Mx(5, "primary.hosted.test")),
        ("hosted.test", Rec::Mx(10, "mx2.test")),
        ("hosted.test", Rec::Mx(20, "worse.hosted.test")),
        ("primary.hosted.test", Rec::A("127.0.0.4")),
        ("worse.hosted.test", Rec::A("127.0.0.5")),
        ("mx2.test", Rec::A("127.0.0.1")),
        ("loop.test", Rec::Mx(10, "mx2.test")),
        ("loop.test", Rec::Mx(20, "worse.hosted.test")),
        ("remote.test", Rec::Mx(10, "mx.remote.test")),
        ("mx.remote.test", Rec::A("127.0.0.6")),
    ]);
    let s = Server::start_run(
        "",
        &format!(
            "[delivery]\nretry_initial = \"1s\"\nmx_port = {port}\n{}\n[[domain]]\nname = \"hosted.test\"\n[[domain]]\nname = \"loop.test\"\n",
            dns.toml()
        ),
        "",
    );
    let mut c = s.client();
    queue_id(&c.send_message("alice@remote.test", &["user@hosted.test"], BODY));
    let got = primary.wait_for(1, WAIT);
    assert_eq!(got[0].rcpts, ["user@hosted.test"]);
    // Only we (and worse) are MX for loop.test: a DSN, never a delivery.
    let mut c = s.client();
    queue_id(&c.send_message("alice@remote.test", &["user@loop.test"], BODY));
    let bounces = sender_mx.wait_for(1, WAIT);
    let dsn = String::from_utf8_lossy(&bounces[0].data).to_string();
    assert!(dsn.contains("Status: 5.4.6"), "{dsn}");
    assert!(dsn.contains("loops back to myself"), "{dsn}");
    wait_empty(&s);
    assert!(
        worse.received().is_empty(),
        "a worse-preference MX was used"
    );
}

#[test]
fn etrn_from_the_primary_releases_its_queue() {
    let port = free_port();
    let s = Server::start_run(
        "",
        "[delivery]\nretry_initial = \"1h\"\nretry_max = \"2h\"\nprobe_interval = \"1h\"\n",
        &format!("[\"127.0.0.1:{port}\"]"),
    );
    let mut c = s.client();
    let id = queue_id(&c.send_message("alice@remote.test", &["bob@example.test"], BODY));
    wait_attempted(&s, &id);
    let sink = Sink::start(port);
    // A stranger may not.
    let mut stranger = s.client_from("127.0.0.5");
    let ehlo = stranger.expect("EHLO stranger.test", "250");
    assert!(ehlo.contains("ETRN"), "{ehlo}");
    stranger.expect("ETRN example.test", "459 4.7.1");
    stranger.expect("ETRN unknown.test", "458");
    // The primary (127.0.0.1) may.
    let mut primary = s.client_from("127.0.0.1");
    primary.expect("EHLO primary.test", "250");
    primary.expect("ETRN example.test", "253 2.0.0");
    sink.wait_for(1, WAIT);
    wait_empty(&s);
    primary.expect("ETRN example.test", "251 2.0.0");
}

#[test]
fn queue_flush_releases_the_queue() {
    let port = free_port();
    let s = Server::start_run(
        "",
        "[delivery]\nretry_initial = \"1h\"\nretry_max = \"2h\"\nprobe_interval = \"1h\"\n",
        &format!("[\"127.0.0.1:{port}\"]"),
    );
    let mut c = s.client();
    let id = queue_id(&c.send_message("alice@remote.test", &["bob@example.test"], BODY));
    let entry = wait_attempted(&s, &id);
    assert!(entry["next_attempt"].as_str().unwrap() > entry["received_at"].as_str().unwrap());
    let sink = Sink::start(port);
    let out = s.cli(&["queue", "flush", "--domain", "example.test"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 message(s)"));
    sink.wait_for(1, WAIT);
    wait_empty(&s);
}

#[test]
fn primary_dropping_mid_data_is_retried_and_delivered_once() {
    let sink = Sink::start(0);
    sink.set(|b| b.drop_next = 1);
    let s = Server::start_run(
        "",
        "[delivery]\nretry_initial = \"1s\"\n",
        &format!("[\"{}\"]", sink.addr),
    );
    let mut c = s.client();
    queue_id(&c.send_message("alice@remote.test", &["bob@example.test"], BODY));
    sink.wait_for(1, WAIT);
    wait_empty(&s);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(sink.received().len(), 1);
}

#[test]
fn kill_9_during_delivery_loses_nothing() {
    let sink = Sink::start(0);
    sink.set(|b| b.stall_next = 1);
    let mut s = Server::start_run(
        "",
        "[delivery]\nretry_initial = \"1s\"\n",
        &format!("[\"{}\"]", sink.addr),
    );
    let mut c = s.client();
    let id = queue_id(&c.send_message("alice@remote.test", &["bob@example.test"], BODY));
    eventually(WAIT, "the delivery to hang in DATA", || {
        (sink.behaviour.lock().unwrap().stalled == 1).then_some(())
    });
    s.kill9();
    sink.set(|b| b.release_stalled = true);
    s.restart();
    let got = sink.wait_for(1, WAIT);
    assert_eq!(got[0].rcpts, ["bob@example.test"]);
    wait_empty(&s);
    assert!(s.log().contains(&id));
}

#[test]
fn delivery_follows_mx_records_from_dns() {
    let sink = Sink::start_on("127.0.0.7:0".parse().unwrap());
    let dns = DnsServer::start(&[
        ("dnsonly.test", Rec::Mx(10, "mx.dnsonly.test")),
        ("mx.dnsonly.test", Rec::A("127.0.0.7")),
    ]);
    let s = Server::start_run(
        "",
        &format!(
            "[delivery]\nmx_port = {}\n{}\n[[domain]]\nname = \"dnsonly.test\"\n",
            sink.addr.port(),
            dns.toml()
        ),
        "",
    );
    let mut c = s.client();
    queue_id(&c.send_message("alice@remote.test", &["x@dnsonly.test"], BODY));
    let got = sink.wait_for(1, WAIT);
    assert_eq!(got[0].rcpts, ["x@dnsonly.test"]);
    wait_empty(&s);
}

#[test]
fn delivery_uses_starttls_with_a_self_signed_primary() {
    // The primary is another backupmx (ingest only) with a certificate
    // nobody trusts: opportunistic TLS still encrypts and delivers.
    let keys = tempfile::tempdir().unwrap();
    let primary = Server::start("", &self_signed_tls(keys.path()));
    let s = Server::start_run(
        "",
        "[delivery]\nretry_initial = \"1s\"\n",
        &format!("[\"{}\"]", primary.addr),
    );
    let mut c = s.client();
    queue_id(&c.send_message("alice@remote.test", &["bob@example.test"], BODY));
    wait_empty(&s);
    let queue = primary.queue();
    assert_eq!(queue.len(), 1);
    let raw = String::from_utf8_lossy(&primary.raw(queue[0]["id"].as_str().unwrap())).to_string();
    // Two Received headers: the primary's (over TLS, from us) above ours.
    // (Below the primary's own Authentication-Results.)
    let trace = String::from_utf8_lossy(backupmx_tests::skip_field(
        raw.as_bytes(),
        b"Authentication-Results: ",
    ))
    .to_string();
    let first = trace.lines().next().unwrap_or_default();
    assert!(
        trace.starts_with("Received: from mx2.test ([127.0.0.1])"),
        "{first}"
    );
    assert!(raw.contains("with ESMTPS id"), "{raw}");
    assert_eq!(raw.matches("Received: ").count(), 2);
    assert!(raw.contains("Subject: relay me"));
}

#[test]
fn a_backlog_goes_out_over_few_connections() {
    let port = free_port();
    let s = Server::start_run(
        "",
        "[delivery]\nretry_initial = \"1h\"\nretry_max = \"2h\"\nprobe_interval = \"1s\"\n",
        &format!("[\"127.0.0.1:{port}\"]"),
    );
    let mut ids = Vec::new();
    for i in 0..30 {
        let mut c = s.client();
        ids.push(queue_id(&c.send_message(
            "alice@remote.test",
            &["bob@example.test"],
            &format!("Subject: {i}\r\n\r\nx\r\n"),
        )));
    }
    wait_attempted(&s, &ids[0]);
    let sink = Sink::start(port);
    sink.wait_for(30, WAIT);
    wait_empty(&s);
    let connections = sink.connections.load(std::sync::atomic::Ordering::SeqCst);
    // Batches of up to 20 messages per connection, plus the probe's own.
    assert!(
        connections <= 6,
        "{connections} connections for 30 messages"
    );
    assert_eq!(sink.received().len(), 30);
}

#[test]
fn a_backlog_drains_in_one_go_to_a_primary_without_pipelining() {
    let port = free_port();
    let s = Server::start_run(
        "",
        "[delivery]\nretry_initial = \"1h\"\nretry_max = \"2h\"\nprobe_interval = \"1h\"\n",
        &format!("[\"127.0.0.1:{port}\"]"),
    );
    let mut ids = Vec::new();
    for i in 0..12 {
        let mut c = s.client();
        ids.push(queue_id(&c.send_message(
            "alice@remote.test",
            &["bob@example.test"],
            &format!("Subject: {i}\r\n\r\nx\r\n"),
        )));
    }
    wait_attempted(&s, &ids[0]);
    let sink = Sink::start(port);
    sink.set(|b| b.no_extensions = true);
    let out = s.cli(&["queue", "flush"]);
    assert!(out.status.success());
    // One flush, one connection: every message of the batch goes out, not
    // just the first (the retry interval is an hour, so a message left
    // behind would still be queued).
    sink.wait_for(12, WAIT);
    wait_empty(&s);
    let mut subjects: Vec<String> = sink
        .received()
        .iter()
        .map(|m| {
            String::from_utf8_lossy(&m.data)
                .lines()
                .find(|l| l.starts_with("Subject:"))
                .unwrap_or("")
                .to_string()
        })
        .collect();
    subjects.sort();
    subjects.dedup();
    assert_eq!(subjects.len(), 12, "{subjects:?}");
    assert_eq!(sink.received().len(), 12);
}

#[test]
fn a_big_message_is_relayed_byte_exact_in_pieces() {
    let port = free_port();
    let s = Server::start_run(
        "",
        "[delivery]\nretry_initial = \"1h\"\nretry_max = \"2h\"\nprobe_interval = \"1h\"\n",
        &format!("[\"127.0.0.1:{port}\"]"),
    );
    // Several times the spill threshold and the relay piece size.
    let (wire, stored) = big_message(3 * 1024 * 1024);
    let mut c = s.client();
    let id = queue_id(&c.send_message("alice@remote.test", &["bob@example.test"], &wire));
    let raw = s.raw(&id);
    assert!(
        after_received(&raw) == stored.as_slice(),
        "stored byte-exact"
    );
    assert_eq!(s.queue()[0]["size"], raw.len());
    let incoming = s.data_dir().join("incoming");
    assert_eq!(
        std::fs::read_dir(&incoming).unwrap().count(),
        0,
        "spool file removed"
    );
    let sink = Sink::start(port);
    let out = s.cli(&["queue", "flush"]);
    assert!(out.status.success());
    let got = sink.wait_for(1, WAIT);
    assert!(got[0].data == raw, "relayed byte-exact");
    wait_empty(&s);
}

#[test]
fn a_big_message_over_the_size_limit_leaves_nothing_behind() {
    let s = Server::start_run("max_message_size = 1048576", "", "");
    let (wire, _) = big_message(3 * 1024 * 1024);
    let mut c = s.client();
    let reply = c.send_message("alice@remote.test", &["bob@example.test"], &wire);
    assert!(reply.starts_with("552 5.3.4"), "{reply}");
    let incoming = s.data_dir().join("incoming");
    assert_eq!(std::fs::read_dir(&incoming).unwrap().count(), 0);
    assert!(s.queue().is_empty());
    // The session is still usable.
    let reply = c.send_message(
        "alice@remote.test",
        &["bob@example.test"],
        "Subject: small\r\n\r\nx\r\n",
    );
    assert!(reply.starts_with("250 "), "{reply}");
}

#[test]
fn mail_to_the_bare_postmaster_is_delivered_to_the_configured_address() {
    let ops = Sink::start(0);
    let mut s = Server::prepare_run(
        "",
        &format!(
            "[delivery]\nroutes = {{ \"ops.test\" = \"{}\" }}\n",
            ops.addr
        ),
        "",
    );
    let text = std::fs::read_to_string(&s.config_path).unwrap();
    std::fs::write(
        &s.config_path,
        format!("postmaster = \"admin@ops.test\"\n{text}"),
    )
    .unwrap();
    s.spawn();
    let mut c = s.client();
    let reply = c.send_message(
        "alice@remote.test",
        &["postmaster"],
        "Subject: hi\r\n\r\nx\r\n",
    );
    assert!(reply.starts_with("250 "), "{reply}");
    let got = ops.wait_for(1, WAIT);
    assert_eq!(got[0].rcpts, ["admin@ops.test"]);
}

#[test]
fn a_dsn_returns_at_most_the_configured_size_of_headers() {
    let primary = Sink::start(0);
    primary.set(|b| {
        b.rcpt_replies = vec![("bob@example.test".into(), "550 5.1.1 no such user".into())]
    });
    let senders_mx = Sink::start(0);
    let s = Server::start_run(
        "",
        &format!(
            "[delivery]\nbounce_headers_max = 20000\nroutes = {{ \"remote.test\" = \"{}\" }}\n",
            senders_mx.addr
        ),
        &format!("[\"{}\"]", primary.addr),
    );
    let mut headers = String::from("Subject: huge headers\r\n");
    for i in 0..5000 {
        headers.push_str(&format!(
            "X-Filler-{i}: 0123456789012345678901234567890123456789\r\n"
        ));
    }
    let body = format!("{headers}\r\nsecret body\r\n");
    let mut c = s.client();
    let reply = c.send_message("alice@remote.test", &["bob@example.test"], &body);
    assert!(reply.starts_with("250 "), "{reply}");
    let dsn = senders_mx.wait_for(1, WAIT);
    assert_eq!(dsn[0].rcpts, ["alice@remote.test"]);
    let text = String::from_utf8_lossy(&dsn[0].data).to_string();
    assert!(
        text.contains("Subject: huge headers\r\n"),
        "{}",
        &text[..2000.min(text.len())]
    );
    assert!(!text.contains("secret body"));
    assert!(
        body.len() > 250_000 && dsn[0].data.len() < 25_000,
        "DSN of {} bytes",
        dsn[0].data.len()
    );
    wait_empty(&s);
}

/// RFC 3461 end to end, with a primary that does not offer DSN: a
/// recipient that asked for NEVER gets no notice, one that asked for
/// FAILURE (with ORCPT) is reported failed, one that asked for SUCCESS is
/// reported relayed; the notice echoes ENVID and, with RET=HDRS, returns
/// headers only.
#[test]
fn dsn_requests_are_honoured_for_a_primary_without_dsn() {
    let sink = Sink::start(0);
    sink.set(|b| {
        for user in ["ghost", "never"] {
            b.rcpt_replies.push((
                format!("{user}@example.test"),
                format!("550 5.1.1 <{user}@example.test>: User unknown"),
            ));
        }
    });
    let s = Server::start_run("", "", &format!("[\"{}\"]", sink.addr));
    let mut c = s.client();
    let ehlo = c.cmd("EHLO client.remote.test");
    assert!(
        ehlo.contains("250-DSN") || ehlo.contains("250 DSN"),
        "{ehlo}"
    );
    c.expect(
        "MAIL FROM:<alice@remote.test> RET=HDRS ENVID=QQ+2B123",
        "250",
    );
    c.expect(
        "RCPT TO:<ghost@example.test> NOTIFY=FAILURE ORCPT=rfc822;Ghost+40example.test",
        "250",
    );
    c.expect("RCPT TO:<never@example.test> NOTIFY=NEVER", "250");
    c.expect("RCPT TO:<ok@example.test> NOTIFY=SUCCESS", "250");
    let bad = c.cmd("RCPT TO:<x@example.test> NOTIFY=NEVER,SUCCESS");
    assert!(bad.starts_with("501 5.5.4"), "{bad}");
    c.expect("DATA", "354");
    c.send("Subject: asked\r\n\r\nsecret body\r\n.\r\n");
    let r = c.read_reply();
    assert!(r.starts_with("250"), "{r}");
    let got = sink.wait_for(1, WAIT);
    assert_eq!(got[0].rcpts, ["ok@example.test"]);
    // One notice, to the sender, about ghost (failed) and ok (relayed).
    let notice = eventually(WAIT, "the notice queued", || {
        s.queue().into_iter().find(|e| e["sender"] == "")
    });
    assert_eq!(notice["recipients"][0], "alice@remote.test");
    let text = String::from_utf8_lossy(&s.raw(notice["id"].as_str().unwrap())).to_string();
    for needle in [
        "Original-Envelope-Id: QQ+123\r\n",
        "Original-Recipient: rfc822; Ghost@example.test\r\nFinal-Recipient: rfc822; ghost@example.test\r\nAction: failed\r\n",
        "Final-Recipient: rfc822; ok@example.test\r\nAction: relayed\r\nStatus: 2.0.0\r\n",
        "Content-Type: text/rfc822-headers",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in\n{text}");
    }
    assert!(!text.contains("never@example.test"), "{text}");
    assert!(!text.contains("secret body"), "{text}");
    assert_eq!(s.log().matches("bounce_queued").count(), 1, "{}", s.log());
}

/// To a primary that offers DSN the sender's requests go on with the mail,
/// and the success notice is the primary's to send, not ours.
#[test]
fn dsn_requests_go_on_to_a_primary_that_offers_dsn() {
    let sink = Sink::start(0);
    sink.set(|b| b.offer_dsn = true);
    let s = Server::start_run("", "", &format!("[\"{}\"]", sink.addr));
    let mut c = s.client();
    c.expect("EHLO client.remote.test", "250");
    c.expect(
        "MAIL FROM:<alice@remote.test> RET=FULL ENVID=QQ+2B123",
        "250",
    );
    c.expect(
        "RCPT TO:<ok@example.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;ok+40example.test",
        "250",
    );
    c.expect("RCPT TO:<plain@example.test>", "250");
    c.expect("DATA", "354");
    c.send("Subject: asked\r\n\r\nbody\r\n.\r\n");
    assert!(c.read_reply().starts_with("250"));
    let got = sink.wait_for(1, WAIT);
    let lines = &got[0].envelope_lines;
    assert!(lines[0].ends_with("RET=FULL ENVID=QQ+2B123"), "{lines:?}");
    assert_eq!(
        lines[1..],
        [
            "RCPT TO:<ok@example.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;ok+40example.test",
            "RCPT TO:<plain@example.test>",
        ]
    );
    std::thread::sleep(Duration::from_secs(1));
    assert!(!s.log().contains("bounce_queued"), "{}", s.log());
}

/// `[delivery] delay_warning`: a message still queued after it gets one
/// "delayed" notice at its next attempt, and only one, to recipients that
/// want it.
#[test]
fn a_delayed_message_gets_one_delay_notice() {
    // A primary that answers, but not yet for these recipients.
    let sink = Sink::start(0);
    sink.set(|b| {
        for user in ["bob", "quiet"] {
            b.rcpt_replies.push((
                format!("{user}@example.test"),
                "451 4.2.0 mailbox busy, try later".into(),
            ));
        }
    });
    let s = Server::start_run(
        "",
        "[delivery]\nretry_initial = \"1s\"\nretry_max = \"1s\"\ndelay_warning = \"2s\"\n",
        &format!("[\"{}\"]", sink.addr),
    );
    let mut c = s.client();
    c.expect("EHLO client.remote.test", "250");
    c.expect("MAIL FROM:<alice@remote.test>", "250");
    c.expect("RCPT TO:<bob@example.test>", "250");
    c.expect("RCPT TO:<quiet@example.test> NOTIFY=FAILURE", "250");
    c.expect("DATA", "354");
    c.send("Subject: slow\r\n\r\nbody\r\n.\r\n");
    assert!(c.read_reply().starts_with("250"));
    let notice = eventually(WAIT, "the delay notice", || {
        s.queue().into_iter().find(|e| e["sender"] == "")
    });
    let text = String::from_utf8_lossy(&s.raw(notice["id"].as_str().unwrap())).to_string();
    assert!(
        text.contains("Subject: Delayed Mail (still being retried)"),
        "{text}"
    );
    assert!(
        text.contains("Final-Recipient: rfc822; bob@example.test\r\nAction: delayed\r\nStatus: 4."),
        "{text}"
    );
    assert!(!text.contains("quiet@example.test"), "{text}");
    // More attempts, no more notices.
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(s.log().matches("bounce_queued").count(), 1, "{}", s.log());
}

/// Lines that start with a dot, a lone dot line, bare CR and bare LF: what
/// DATA would rewrite, BDAT carries as it is.
const CHUNKED_TRICKY: &[u8] =
    b"Subject: chunked\r\n\r\n.leading dot\r\n.\r\nbare\nlf and bare\rcr\r\n..two\r\nend";

/// RFC 3030 end to end: a message sent in BDAT chunks is stored as sent;
/// a primary that offers CHUNKING gets it byte-exact by BDAT; one that
/// does not gets it by DATA, dot-stuffed and with every line end CRLF, so
/// no bare LF can end its data early.
#[test]
fn a_chunked_message_is_relayed_byte_exact_by_bdat_and_safely_by_data() {
    let sink = Sink::start(0);
    sink.set(|b| b.offer_chunking = true);
    let s = Server::start_run("", "", &format!("[\"{}\"]", sink.addr));
    let mut c = s.client();
    let ehlo = c.cmd("EHLO client.remote.test");
    assert!(ehlo.contains("250-CHUNKING\r\n"), "{ehlo}");
    let (a, b) = CHUNKED_TRICKY.split_at(25);
    let replies = c.send_chunked("alice@remote.test", &["bob@example.test"], &[a, b]);
    assert!(replies[0].starts_with("250 2.0.0"), "{replies:?}");
    queue_id(&replies[1]);
    let got = sink.wait_for(1, WAIT);
    assert!(got[0].by_bdat);
    assert_eq!(after_received(&got[0].data), CHUNKED_TRICKY);

    sink.set(|b| b.offer_chunking = false);
    let replies = c.send_chunked(
        "alice@remote.test",
        &["bob@example.test"],
        &[CHUNKED_TRICKY],
    );
    assert!(replies[0].contains("queued as"), "{replies:?}");
    let got = sink.wait_for(2, WAIT);
    assert!(!got[1].by_bdat);
    assert_eq!(
        after_received(&got[1].data),
        b"Subject: chunked\r\n\r\n.leading dot\r\n.\r\nbare\r\nlf and bare\r\ncr\r\n..two\r\nend\r\n"
    );
    let wire = &got[1].wire;
    assert_no_bare_cr_lf(wire);
    let text = String::from_utf8_lossy(wire);
    assert!(text.contains("\r\n..leading dot\r\n..\r\n"), "{text}");
    assert!(text.ends_with("\r\nend\r\n.\r\n"), "{text}");
    wait_empty(&s);
}

/// A big message in BDAT chunks leaves memory while it arrives, is stored
/// byte-exact, and goes on in several BDAT chunks; past the size limit a
/// chunk gets 552 and nothing is left behind.
#[test]
fn a_big_chunked_message_is_spooled_relayed_in_chunks_and_bounded_by_size() {
    let sink = Sink::start(0);
    sink.set(|b| b.offer_chunking = true);
    let s = Server::start_run(
        "max_message_size = 4194304",
        "",
        &format!("[\"{}\"]", sink.addr),
    );
    let (wire, _) = big_message(3 * 1024 * 1024);
    let wire = wire.into_bytes();
    let chunks: Vec<&[u8]> = wire.chunks(1024 * 1024).collect();
    let mut c = s.client();
    let replies = c.send_chunked("alice@remote.test", &["bob@example.test"], &chunks);
    assert!(replies.last().unwrap().contains("queued as"), "{replies:?}");
    let got = sink.wait_for(1, WAIT);
    assert!(got[0].by_bdat);
    assert!(
        after_received(&got[0].data) == wire.as_slice(),
        "relayed byte-exact"
    );
    let bdat_lines = String::from_utf8_lossy(&got[0].wire)
        .matches("BDAT ")
        .count();
    assert!(bdat_lines >= 3, "sent in {bdat_lines} chunks");
    wait_empty(&s);

    let (wire, _) = big_message(5 * 1024 * 1024);
    let wire = wire.into_bytes();
    let chunks: Vec<&[u8]> = wire.chunks(1024 * 1024).collect();
    let mut c = s.client();
    let replies = c.send_chunked("alice@remote.test", &["bob@example.test"], &chunks);
    assert!(replies[0].starts_with("250 2.0.0"), "{replies:?}");
    assert!(
        replies.iter().any(|r| r.starts_with("552 5.3.4")),
        "{replies:?}"
    );
    assert!(
        !replies.iter().any(|r| r.contains("queued as")),
        "{replies:?}"
    );
    let incoming = s.data_dir().join("incoming");
    assert_eq!(std::fs::read_dir(&incoming).unwrap().count(), 0);
    assert!(s.queue().is_empty());
    let reply = c.send_message(
        "alice@remote.test",
        &["bob@example.test"],
        "Subject: small\r\n\r\nx\r\n",
    );
    assert!(reply.starts_with("250 "), "{reply}");
}

/// `[delivery] delay_warning` while the primary is down: its mail waits
/// for the probe with no attempt, and the sender still gets one "delayed"
/// notice per message once the message is that old; when the primary is
/// back the message goes, and no further notice follows.
#[test]
fn a_delay_notice_goes_while_the_primary_is_down() {
    let port = free_port();
    let s = Server::start_run(
        "",
        "[delivery]\nretry_initial = \"1s\"\nretry_max = \"1s\"\nprobe_interval = \"1s\"\ndelay_warning = \"3s\"\n",
        &format!("[\"127.0.0.1:{port}\"]"),
    );
    let mut c = s.client();
    let id = queue_id(&c.send_message(
        "alice@remote.test",
        &["bob@example.test"],
        "Subject: waiting\r\n\r\nbody\r\n",
    ));
    eventually(WAIT, "the primary taken for down", || {
        s.log().contains("probe_failed").then_some(())
    });
    let notice = eventually(WAIT, "the delay notice", || {
        s.queue().into_iter().find(|e| e["sender"] == "")
    });
    let text = String::from_utf8_lossy(&s.raw(notice["id"].as_str().unwrap())).to_string();
    assert!(
        text.contains("Final-Recipient: rfc822; bob@example.test\r\nAction: delayed\r\nStatus: 4."),
        "{text}"
    );
    assert!(s.log().contains("delay_notice_queued"), "{}", s.log());
    let original = s.queue().into_iter().find(|e| e["id"] == id.as_str());
    assert!(original.is_some(), "the message still waits");
    // Still down a while: no second notice.
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(
        s.log().matches("delay_notice_queued").count(),
        1,
        "{}",
        s.log()
    );
    // Back: delivered, and no more notices.
    let sink = Sink::start(port);
    let got = sink.wait_for(1, WAIT);
    assert!(got.iter().any(|m| m.rcpts == ["bob@example.test"]));
    assert_eq!(s.log().matches("delay_notice_queued").count(), 1);
    assert_eq!(s.log().matches("bounce_queued").count(), 0, "{}", s.log());
}
