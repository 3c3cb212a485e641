//! The content filter at the edge (issue 33): a real rspamd (Debian's
//! package, started once for this binary on a free port) scans each
//! message after its data and before anything is stored.

use std::net::TcpListener;
use std::time::{Duration, Instant};

use backupmx_tests::sink::Sink;
use backupmx_tests::{free_port, rspamd, Server};

const GTUBE: &str = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X";

fn message(subject: &str, text: &str) -> String {
    format!(
        "From: alice@remote.test\r\nTo: user@example.test\r\nSubject: {subject}\r\nMessage-ID: <{subject}@remote.test>\r\nDate: Mon, 07 Dec 2026 12:00:00 +0000\r\n\r\n{text}\r\n"
    )
}

/// Sends one message; the reply to its data.
fn send(s: &Server, rcpt: &str, body: &str) -> String {
    let mut c = s.client();
    c.expect("EHLO client.test", "250");
    c.expect("MAIL FROM:<alice@remote.test>", "250");
    c.expect(&format!("RCPT TO:<{rcpt}>"), "250");
    c.expect("DATA", "354");
    c.send(body);
    c.send(".\r\n");
    c.read_reply()
}

/// `backupmx run` with the filter and a primary that takes mail.
fn server_with_filter(filter: &str, extra: &str) -> (Server, Sink) {
    let sink = Sink::start(0);
    let s = Server::start_run(
        "",
        &format!(
            "[delivery]\nretry_initial = \"1s\"\n[filter]\n{filter}\n{extra}\n[[domain]]\nname = \"nofilter.test\"\nprimary = [\"{}\"]\nfilter = false\n",
            sink.addr
        ),
        &format!("[\"{}\"]", sink.addr),
    );
    (s, sink)
}

fn with_rspamd() -> Option<String> {
    rspamd::shared().map(|r| format!("rspamd = \"{}\"", r.url))
}

#[test]
fn gtube_is_refused_at_data_and_nothing_is_stored_or_delivered() {
    let Some(filter) = with_rspamd() else { return };
    let (s, sink) = server_with_filter(&filter, "");
    let reply = send(&s, "user@example.test", &message("spam", GTUBE));
    assert!(reply.starts_with("550 5.7.1"), "{reply}");
    assert!(reply.contains("Gtube pattern"), "{reply}");
    assert!(s.queue().is_empty(), "{:?}", s.queue());
    // A plain message after it on the same server goes through (and shows
    // the refused one never reached the primary).
    let reply = send(&s, "user@example.test", &message("plain", "Just a note."));
    assert!(reply.starts_with("250"), "{reply}");
    let got = sink.wait_for(1, Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(sink.received().len(), 1, "{:?}", got);
    let log = s.log();
    assert!(log.contains("message_refused_by_filter"), "{log}");
}

#[test]
fn a_plain_message_is_delivered_with_rspamds_headers_below_our_received() {
    let Some(filter) = with_rspamd() else { return };
    let (s, sink) = server_with_filter(&filter, "");
    let reply = send(&s, "user@example.test", &message("hello", "Just a note."));
    assert!(reply.starts_with("250"), "{reply}");
    let got = sink.wait_for(1, Duration::from_secs(30));
    let text = String::from_utf8_lossy(&got[0].data).to_string();
    assert!(
        backupmx_tests::skip_field(text.as_bytes(), b"Authentication-Results: ")
            .starts_with(b"Received: "),
        "{text}"
    );
    // The harness's rspamd adds its extended headers (milter_headers).
    let spamd = text
        .find("X-Spamd-Result:")
        .unwrap_or_else(|| panic!("{text}"));
    let from = text
        .find("From: alice@remote.test")
        .unwrap_or_else(|| panic!("{text}"));
    assert!(spamd < from, "rspamd's headers above the client's: {text}");
    assert!(text.contains("Subject: hello\r\n"), "{text}");
    assert!(text.ends_with("Just a note.\r\n"), "{text}");
    assert!(s.log().contains("event=\"filter_result\""), "{}", s.log());
}

#[test]
fn postmaster_is_scanned_but_never_refused_and_a_domain_can_opt_out() {
    let Some(filter) = with_rspamd() else { return };
    let (s, sink) = server_with_filter(&filter, "");
    let reply = send(&s, "postmaster@example.test", &message("pm", GTUBE));
    assert!(reply.starts_with("250"), "postmaster: {reply}");
    let reply = send(&s, "user@nofilter.test", &message("optout", GTUBE));
    assert!(reply.starts_with("250"), "filter = false: {reply}");
    let got = sink.wait_for(2, Duration::from_secs(30));
    assert!(got
        .iter()
        .any(|m| String::from_utf8_lossy(&m.data).contains("Subject: pm")));
    // Scanned: rspamd said reject (GTUBE skips its header rules).
    let log = s.log();
    assert!(
        log.lines()
            .any(|l| l.contains("filter_result") && l.contains("action=\"reject\"")),
        "{log}"
    );
    let unscanned = got
        .iter()
        .map(|m| String::from_utf8_lossy(&m.data).to_string())
        .find(|t| t.contains("Subject: optout"))
        .expect("nofilter.test's copy");
    assert!(!unscanned.contains("X-Spamd-Result:"), "{unscanned}");
}

#[test]
fn an_unreachable_filter_accepts_or_tempfails_as_configured() {
    // Nothing listens there: rspamd stopped.
    let dead = format!("rspamd = \"http://127.0.0.1:{}\"", free_port());
    let (s, sink) = server_with_filter(&format!("{dead}\ntimeout = \"3s\""), "");
    let reply = send(&s, "user@example.test", &message("a", GTUBE));
    assert!(reply.starts_with("250"), "on_error = accept: {reply}");
    sink.wait_for(1, Duration::from_secs(30));
    let log = s.log();
    assert!(
        log.contains("filter_failed") && log.contains("reason=\"connect\""),
        "{log}"
    );
    let (s, _sink) = server_with_filter(&format!("{dead}\non_error = \"tempfail\""), "");
    let reply = send(&s, "user@example.test", &message("t", "hello"));
    assert!(
        reply.starts_with("451 4.7.1"),
        "on_error = tempfail: {reply}"
    );
    assert!(s.queue().is_empty());
}

#[test]
fn a_filter_that_never_answers_is_given_up_on_at_the_timeout() {
    // Accepts connections and reads nothing: a tarpit.
    let tarpit = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = tarpit.local_addr().expect("addr");
    let _held = std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in tarpit.incoming() {
            held.push(c);
        }
    });
    let (s, _sink) = server_with_filter(
        &format!("rspamd = \"http://{addr}\"\ntimeout = \"3s\"\non_error = \"tempfail\""),
        "",
    );
    let started = Instant::now();
    let reply = send(&s, "user@example.test", &message("slow", "hello"));
    let took = started.elapsed();
    assert!(reply.starts_with("451 4.7.1"), "{reply}");
    eprintln!("tarpit answered after {took:?} (timeout 3 s)");
    // A liveness bound: the timeout plus the second, plus slack
    // for the session's own round trips on a loaded machine.
    assert!(took < Duration::from_secs(6), "{took:?}");
    assert!(s.log().contains("reason=\"timeout\""), "{}", s.log());
}

#[test]
fn a_big_message_is_scanned_from_its_spool_file_and_keeps_its_headers() {
    let Some(filter) = with_rspamd() else { return };
    let (s, sink) = server_with_filter(&filter, "");
    // Over the 512 KiB a session keeps in memory: spilled to a file.
    let line = "y".repeat(76) + "\r\n";
    let body = line.repeat(2 * 1024 * 1024 / 78);
    let reply = send(&s, "user@example.test", &message("big", &body));
    assert!(reply.starts_with("250"), "{reply}");
    let got = sink.wait_for(1, Duration::from_secs(60));
    let text = String::from_utf8_lossy(&got[0].data).to_string();
    assert!(
        text.contains("X-Spamd-Result:"),
        "{}",
        &text[..2000.min(text.len())]
    );
    assert!(text.ends_with(&format!("{body}\r\n")), "body changed");
    let log = s.log();
    assert!(log.contains("event=\"filter_result\""), "{log}");
}

#[test]
fn the_aws_ingest_refuses_gtube_before_storing() {
    let Some(filter) = with_rspamd() else { return };
    let Some(s) = Server::start_aws("", &format!("[filter]\n{filter}\n"), "", false) else {
        return;
    };
    let reply = send(&s, "user@example.test", &message("awsspam", GTUBE));
    assert!(reply.starts_with("550 5.7.1"), "{reply}");
    assert!(s.queue().is_empty(), "{:?}", s.queue());
    let reply = send(&s, "user@example.test", &message("awsham", "hello"));
    assert!(reply.starts_with("250"), "{reply}");
    assert_eq!(s.queue().len(), 1);
}

#[test]
fn domain_set_filter_turns_scanning_off_and_on_for_a_running_server() {
    let Some(filter) = with_rspamd() else { return };
    let (s, _sink) = server_with_filter(&filter, "");
    let out = s.cli(&["domain", "set", "example.test", "--filter", "false"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let show = s.cli(&["domain", "show", "example.test"]);
    let text = String::from_utf8_lossy(&show.stdout).to_string();
    assert!(text.contains("filter: false"), "{text}");
    let reply = send(&s, "user@example.test", &message("off", GTUBE));
    assert!(reply.starts_with("250"), "filter off: {reply}");
    let out = s.cli(&["domain", "set", "example.test", "--filter", "true"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let show = s.cli(&["domain", "show", "example.test", "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&show.stdout).expect("JSON");
    assert_eq!(json["filter"], true, "{json}");
    let reply = send(&s, "user@example.test", &message("on", GTUBE));
    assert!(reply.starts_with("550 5.7.1"), "filter on: {reply}");
}
