//! Recipient verification: callouts with a cache that decides while the
//! primary is down, and deferring while the primary is up. A recording
//! primary behind a proxy that can play an outage; real `backupmx`
//! processes, embedded and on the AWS emulator.

use std::net::TcpListener;
use std::time::{Duration, Instant};

use backupmx_tests::sink::Sink;
use backupmx_tests::*;

const WAIT: Duration = Duration::from_secs(30);

/// `recipients list example.test --json` as (address, verdict, learnt from).
fn cached(s: &Server) -> Vec<(String, String, String)> {
    let out = s.cli(&["recipients", "list", "example.test", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    rows.iter()
        .map(|r| {
            (
                r["address"].as_str().unwrap().to_string(),
                r["verdict"].as_str().unwrap().to_string(),
                r["learnt_from"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn refusing_primary() -> Sink {
    let sink = Sink::start(0);
    sink.set(|b| {
        for user in ["ghost", "newbie"] {
            b.rcpt_replies.push((
                format!("{user}@example.test"),
                format!(
                    "550 5.1.1 <{user}@example.test>: Recipient address rejected: User unknown"
                ),
            ));
        }
    });
    sink
}

#[test]
fn callouts_refuse_unknown_users_and_the_cache_decides_while_the_primary_is_down() {
    let sink = refusing_primary();
    let primary = TcpProxy::start(sink.addr);
    let s = Server::start_run(
        "",
        // A short drain: the bounce-storm guard holds refusals back until
        // its end (tests/tests/steer.rs); here they are final soon after.
        "recipient_verify = \"callout\"\n[delivery]\nretry_initial = \"1h\"\nretry_max = \"2h\"\nprobe_interval = \"1s\"\nprimary_up_fresh = \"2s\"\nbounce_storm_window = \"2s\"\n[recipient_verify]\ntimeout = \"3s\"\n",
        &format!("[\"{}\"]", primary.addr),
    );
    // (1) Primary up: the unknown user is refused at RCPT, the real one
    // accepted, and both verdicts are cached.
    let r = s.rcpt_reply("ghost@example.test");
    assert!(r.starts_with("550 5.1.1"), "{r}");
    let r = s.rcpt_reply("alice@example.test");
    assert!(r.starts_with("250"), "{r}");
    // The callout's questions never reach the primary as mail.
    assert!(sink.received().is_empty());
    let mut listed = cached(&s);
    listed.sort();
    assert_eq!(
        listed,
        [
            (
                "alice@example.test".into(),
                "valid".into(),
                "callout".into()
            ),
            (
                "ghost@example.test".into(),
                "invalid".into(),
                "callout".into()
            ),
        ]
    );
    let shown = s.cli(&["domain", "show", "example.test", "--json"]);
    let shown: serde_json::Value = serde_json::from_slice(&shown.stdout).unwrap();
    assert_eq!(shown["recipient_verify"], "callout");
    assert_eq!(shown["primary_state"]["up"], true, "{shown}");

    // (2) Primary down: the cache decides. The refused user stays refused,
    // the known one and a never-seen one are accepted; no DSN.
    primary.set_down(true);
    let r = s.rcpt_reply("ghost@example.test");
    assert!(r.starts_with("550 5.1.1"), "{r}");
    let mut c = s.client();
    let reply = c.send_message(
        "carol@remote.test",
        &["alice@example.test", "newbie@example.test"],
        "Subject: while down\r\n\r\nhello\r\n",
    );
    assert!(reply.starts_with("250"), "{reply}");
    eventually(WAIT, "an attempt that finds the primary down", || {
        s.queue()
            .first()
            .filter(|e| e["attempts"].as_u64() > Some(0))
            .cloned()
    });
    assert!(!s.log().contains("bounce_queued"), "{}", s.log());

    // (3) The primary comes back; the drain teaches the cache that newbie
    // does not exist (one DSN: we took the message while we could not ask).
    // Down again, newbie is refused at RCPT from what the drain learnt.
    primary.set_down(false);
    let got = sink.wait_for(1, WAIT);
    assert_eq!(got[0].rcpts, ["alice@example.test"]);
    eventually(WAIT, "the drain's verdict on newbie", || {
        cached(&s)
            .into_iter()
            .find(|(a, v, l)| a == "newbie@example.test" && v == "invalid" && l == "delivery")
    });
    primary.set_down(true);
    let r = s.rcpt_reply("newbie@example.test");
    assert!(r.starts_with("550 5.1.1"), "{r}");
    let r = s.rcpt_reply("alice@example.test");
    assert!(r.starts_with("250"), "{r}");
}

#[test]
fn defer_mode_defers_while_the_primary_is_up_and_accepts_once_it_is_down() {
    let sink = Sink::start(0);
    let primary = TcpProxy::start(sink.addr);
    let s = Server::start_run(
        "",
        "defer_while_primary_up = true\n[delivery]\nretry_initial = \"1h\"\nretry_max = \"2h\"\nprimary_up_fresh = \"2s\"\n[recipient_verify]\ntimeout = \"3s\"\n",
        &format!("[\"{}\"]", primary.addr),
    );
    let r = s.rcpt_reply("bob@example.test");
    assert!(r.starts_with("451 4.7.1"), "{r}");
    assert!(r.contains("primary MX"), "{r}");
    // Role accounts are never deferred.
    let r = s.rcpt_reply("postmaster@example.test");
    assert!(r.starts_with("250"), "{r}");
    primary.set_down(true);
    // Once the "up" observation is stale, a probe finds the primary down.
    eventually(WAIT, "acceptance once the primary is down", || {
        let r = s.rcpt_reply("bob@example.test");
        r.starts_with("250").then_some(())
    });
    let shown = s.cli(&["domain", "show", "example.test"]);
    let shown = String::from_utf8_lossy(&shown.stdout).to_string();
    assert!(shown.contains("primary_state: down since"), "{shown}");
    assert!(shown.contains("defer_while_primary_up: true"), "{shown}");
}

#[test]
fn a_tarpitting_primary_does_not_hold_rcpt_past_the_callout_timeout() {
    // Accepts connections and never says a word.
    let tarpit = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = tarpit.local_addr().unwrap();
    let held = std::thread::spawn(move || {
        let mut conns = Vec::new();
        for c in tarpit.incoming().take(4).flatten() {
            conns.push(c);
        }
        std::thread::sleep(Duration::from_secs(30));
    });
    let s = Server::start_run(
        "",
        "recipient_verify = \"callout\"\n[delivery]\nretry_initial = \"1h\"\nretry_max = \"2h\"\n[recipient_verify]\ntimeout = \"2s\"\n",
        &format!("[\"{addr}\"]"),
    );
    let started = Instant::now();
    let mut c = s.client();
    let reply = c.send_message(
        "alice@remote.test",
        &["someone@example.test"],
        "Subject: x\r\n\r\nx\r\n",
    );
    assert!(reply.starts_with("250"), "{reply}");
    // A liveness bound, far above the 2 s timeout: RCPT must not wait for
    // the primary's silence to end.
    assert!(started.elapsed() < Duration::from_secs(15));
    assert!(s.log().contains("callout timed out"), "{}", s.log());
    drop(held);
}

#[test]
fn two_aws_ingest_tasks_share_the_callout_cache() {
    let sink = refusing_primary();
    let primary = TcpProxy::start(sink.addr);
    let Some(a) = Server::start_aws(
        "",
        "recipient_verify = \"callout\"\n[recipient_verify]\ntimeout = \"3s\"\n[delivery]\nprimary_up_fresh = \"2s\"\n",
        &format!("[\"{}\"]", primary.addr),
        false,
    ) else {
        return;
    };
    let r = a.rcpt_reply("ghost@example.test");
    assert!(r.starts_with("550 5.1.1"), "{r}");
    let r = a.rcpt_reply("alice@example.test");
    assert!(r.starts_with("250"), "{r}");
    primary.set_down(true);
    // Another task, which never asked the primary, knows both answers.
    let b = a.start_sibling();
    let r = b.rcpt_reply("ghost@example.test");
    assert!(r.starts_with("550 5.1.1"), "{r}");
    let r = b.rcpt_reply("alice@example.test");
    assert!(r.starts_with("250"), "{r}");
    let r = b.rcpt_reply("stranger@example.test");
    assert!(r.starts_with("250"), "{r}");
    let mut listed = cached(&b);
    listed.sort();
    assert_eq!(
        listed,
        [
            (
                "alice@example.test".into(),
                "valid".into(),
                "callout".into()
            ),
            (
                "ghost@example.test".into(),
                "invalid".into(),
                "callout".into()
            ),
        ]
    );
}

/// RCPT for each address from `source`, reconnecting when the session is
/// closed (the error limit); stops at a `421` greeting, recorded as the
/// last reply.
fn harvest(s: &Server, source: &str, addresses: &[String]) -> Vec<String> {
    let mut replies = Vec::new();
    let mut session: Option<Client> = None;
    for a in addresses {
        if session.is_none() {
            let mut c = Client::connect_from_raw(source.parse().unwrap(), s.addr);
            let greeting = c.read_reply();
            if !greeting.starts_with("220") {
                replies.push(greeting);
                return replies;
            }
            c.expect("EHLO harvester.remote.test", "250");
            c.expect("MAIL FROM:<>", "250");
            session = Some(c);
        }
        let c = session.as_mut().unwrap();
        let r = c.cmd(&format!("RCPT TO:<{a}>"));
        if r.contains("unknown recipients from your address") {
            replies.push(r);
            return replies;
        }
        // A harvester's pace, not a flood: a few hundred a second.
        std::thread::sleep(Duration::from_millis(3));
        if r.starts_with("421") || r.is_empty() {
            // Closed: the error limit (its 421 is not a recipient's reply).
            session = None;
            continue;
        }
        replies.push(r);
    }
    replies
}

#[test]
fn a_directory_harvest_is_throttled_and_penalised_while_real_senders_pass() {
    let sink = Sink::start(0);
    sink.set(|b| b.only_users = Some(vec!["alice@example.test".into(), "bob@example.test".into()]));
    let s = Server::start_run(
        "",
        "recipient_verify = \"callout\"\n[recipient_verify]\ntimeout = \"3s\"\ncallouts_per_second_per_domain = 10\n",
        &format!("[\"{}\"]", sink.addr),
    );
    // Until the penalty: 20 unknown users at 10 callouts a second take
    // about a second, far fewer guesses than these.
    let guesses: Vec<String> = (0..3000)
        .map(|i| format!("guess{i}@example.test"))
        .collect();
    let started = Instant::now();
    let replies = harvest(&s, "127.0.0.2", &guesses);
    let took = started.elapsed();
    let count = |f: &dyn Fn(&String) -> bool| replies.iter().filter(|r| f(r)).count();
    let unknown = count(&|r| r.starts_with("550 5.1.1"));
    let throttled = count(&|r| r.starts_with("451 4.7.1") && r.contains("recipient checks"));
    // The penalty shows at RCPT (451), or, when the error limit had just
    // closed the session, in the greeting of the next one (421): which
    // comes first depends on timing.
    let penalised = count(&|r| {
        (r.starts_with("451 4.7.1") || r.starts_with("421 4.7.0"))
            && r.contains("unknown recipients")
    });
    // 20 verdicts, then the penalty: nothing more is learnt.
    assert_eq!(unknown, 20, "{replies:#?}");
    assert!(
        throttled > 0,
        "the domain's rate held callouts back: {replies:#?}"
    );
    assert_eq!(penalised, 1, "{replies:#?}");
    assert!(
        replies.iter().all(|r| r.starts_with("550 5.1.1")
            || r.starts_with("451 4.7.1")
            || r.starts_with("421 4.7.0")),
        "{replies:#?}"
    );
    // Every callout reached the primary as one RCPT, and no more than the
    // rate allows (10 at once, then 10 a second).
    let asked = sink.behaviour.lock().unwrap().rcpts_seen;
    assert_eq!(asked, 20);
    assert!(
        asked as f64 <= 10.0 + 10.0 * took.as_secs_f64() + 1.0,
        "{asked} callouts in {took:?}"
    );
    // A new session from the harvester is refused at once.
    let mut again = Client::connect_from_raw("127.0.0.2".parse().unwrap(), s.addr);
    let greeting = again.read_reply();
    assert!(greeting.starts_with("421 4.7.0"), "{greeting}");
    // A real sender elsewhere is not affected (once the domain's rate has
    // refilled: a second).
    std::thread::sleep(Duration::from_millis(1100));
    let mut real = s.client_from("127.0.0.3");
    let reply = real.send_message(
        "carol@remote.test",
        &["alice@example.test", "bob@example.test"],
        "Subject: real\r\n\r\nhello\r\n",
    );
    assert!(reply.starts_with("250"), "{reply}");
    let got = sink.wait_for(1, WAIT);
    assert_eq!(got[0].rcpts, ["alice@example.test", "bob@example.test"]);
    let log = s.log();
    assert_eq!(log.matches("\"harvest_penalty\"").count(), 1, "{log}");
    assert!(log.contains("callouts_throttled"), "{log}");
}

#[test]
fn callouts_that_time_out_stay_under_the_connection_cap() {
    // Accepts connections, never says a word, counts them.
    let tarpit = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = tarpit.local_addr().unwrap();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    {
        let accepted = accepted.clone();
        std::thread::spawn(move || {
            let mut conns = Vec::new();
            for c in tarpit.incoming().flatten() {
                accepted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                conns.push(c);
            }
        });
    }
    let s = Server::start_run(
        "",
        "recipient_verify = \"callout\"\n[delivery]\nretry_initial = \"1h\"\nretry_max = \"2h\"\n[recipient_verify]\ntimeout = \"1s\"\nconcurrency = 2\n",
        &format!("[\"{addr}\"]"),
    );
    // Staggered: each callout that gives up would free its slot for the
    // next while its connection is still open at the primary.
    let threads: Vec<_> = (0..4)
        .map(|i| {
            std::thread::sleep(Duration::from_millis(300));
            let mut c = s.client();
            std::thread::spawn(move || {
                c.expect("EHLO client.remote.test", "250");
                c.expect("MAIL FROM:<alice@remote.test>", "250");
                c.cmd(&format!("RCPT TO:<user{i}@example.test>"))
            })
        })
        .collect();
    for t in threads {
        let r = t.join().unwrap();
        assert!(r.starts_with("250"), "fails open: {r}");
    }
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        accepted.load(std::sync::atomic::Ordering::SeqCst) <= 2,
        "{} connections",
        accepted.load(std::sync::atomic::Ordering::SeqCst)
    );
}
