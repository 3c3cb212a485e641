//! End-to-end abuse and fault battery against the real binary: slow
//! clients, connection floods, garbage, injected storage faults, kill -9
//! mid-DATA, smuggling through to the primary, DNS outages.

use std::io::Write;
use std::time::{Duration, Instant};

use backupmx_tests::sink::Sink;
use backupmx_tests::*;

#[test]
fn a_slow_command_line_is_cut_off() {
    let s = Server::start("idle_timeout = \"2s\"", "");
    let c = s.client();
    let mut writer = c.stream().try_clone().unwrap();
    // Read on another thread while this one trickles bytes in.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut c = c;
        let _ = tx.send(c.read_reply());
    });
    let mut reply = None;
    // One byte every 400 ms never trips the idle timeout by itself; give up
    // after 25 bytes (10 s) if the server never cuts the line off.
    for _ in 0..25 {
        if let Ok(r) = rx.try_recv() {
            reply = Some(r);
            break;
        }
        let _ = writer.write_all(b"N");
        std::thread::sleep(Duration::from_millis(400));
    }
    let reply = reply
        .or_else(|| rx.recv_timeout(Duration::from_secs(1)).ok())
        .expect("the server never cut the slow line off");
    assert!(reply.starts_with("421 4.4.2"), "{reply:?}");
}

#[test]
fn a_slow_data_phase_is_cut_off() {
    let s = Server::start("idle_timeout = \"5s\"\ndata_timeout = \"2s\"", "");
    let mut c = s.client();
    c.expect("EHLO client.test", "250");
    c.expect("MAIL FROM:<a@remote.test>", "250");
    c.expect("RCPT TO:<b@example.test>", "250");
    c.expect("DATA", "354");
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(3) {
        if c.stream().try_clone().unwrap().write_all(b"x").is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let reply = c.read_reply();
    assert!(reply.starts_with("421 4.4.2"), "{reply:?}");
    assert!(s.queue().is_empty(), "a cut-off message is not stored");
}

#[test]
fn a_thousand_connections_from_one_address_hit_the_per_ip_limit() {
    let s = Server::start("max_connections_per_ip = 50", "");
    let mut held = Vec::new();
    let (mut greeted, mut refused) = (0, 0);
    for _ in 0..1000 {
        let mut c = Client::connect_from_raw("127.0.0.9".parse().unwrap(), s.addr);
        let r = c.read_reply();
        if r.starts_with("220 ") {
            greeted += 1;
            held.push(c);
        } else {
            assert!(r.starts_with("421 4.7.0"), "{r}");
            refused += 1;
        }
    }
    assert_eq!((greeted, refused), (50, 950));
    // Everyone else is still served, and so is this address once it lets go.
    let mut other = s.client_from("127.0.0.10");
    other.expect("NOOP", "250");
    drop(held);
    let mut c = eventually(Duration::from_secs(10), "a free slot", || {
        let mut c = Client::connect_from_raw("127.0.0.9".parse().unwrap(), s.addr);
        c.read_reply().starts_with("220 ").then_some(c)
    });
    let r = c.send_message(
        "a@remote.test",
        &["b@example.test"],
        "Subject: after the flood\r\n\r\n",
    );
    assert!(r.starts_with("250"), "{r}");
}

#[test]
fn ten_thousand_malformed_command_lines_then_a_normal_message() {
    let s = Server::start("max_errors = 100", "");
    let mut seed: u64 = 0x1234_5678_9abc_def1;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut sent = 0;
    while sent < 10_000 {
        let mut c = s.client();
        let mut batch = Vec::new();
        // Fewer than the error limit per connection, so each gets answered.
        for _ in 0..90 {
            let len = (next() % 80) as usize;
            let mut line: Vec<u8> = (0..len)
                .map(|_| (next() % 256) as u8)
                .filter(|b| *b != b'\n')
                .collect();
            let prefix: &[u8] = match next() % 4 {
                0 => b"MAIL FROM:",
                1 => b"RCPT TO:<",
                2 => b"EHLO ",
                _ => b"",
            };
            line.splice(0..0, prefix.iter().copied());
            batch.extend_from_slice(&line);
            batch.extend_from_slice(b"\r\n");
            sent += 1;
        }
        c.send(&batch);
        c.send("QUIT\r\n");
        // Every line gets an answer; the last is the 221 (or 421 if closed).
        let mut last = String::new();
        for _ in 0..91 {
            last = c.read_reply();
            if last.is_empty() || last.starts_with("221") || last.starts_with("421") {
                break;
            }
        }
        assert!(
            last.starts_with("221") || last.starts_with("421"),
            "{last:?}"
        );
    }
    let mut c = s.client();
    let r = c.send_message(
        "a@remote.test",
        &["b@example.test"],
        "Subject: still fine\r\n\r\nok\r\n",
    );
    assert!(r.starts_with("250"), "{r}");
}

#[test]
fn injected_storage_faults_give_451_and_store_nothing() {
    let mut s = Server::start("", "");
    s.set_env("FAULT_INJECTION", "spool:3");
    s.restart();
    let mut accepted = Vec::new();
    for i in 1..=6 {
        let mut c = s.client();
        let r = c.send_message(
            "a@remote.test",
            &["b@example.test"],
            &format!("Subject: {i}\r\n\r\nx\r\n"),
        );
        if i % 3 == 0 {
            assert!(r.starts_with("451 4.3.0"), "message {i}: {r}");
            c.expect("NOOP", "250");
        } else {
            accepted.push(queue_id(&r));
        }
    }
    let mut queued: Vec<String> = s
        .queue()
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_string())
        .collect();
    queued.sort();
    accepted.sort();
    assert_eq!(queued, accepted, "exactly the messages that got 250");
}

#[test]
fn kill_9_during_data_stores_nothing_and_loses_nothing_accepted() {
    let mut s = Server::start("", "");
    let mut done = s.client();
    let id = queue_id(&done.send_message(
        "a@remote.test",
        &["b@example.test"],
        "Subject: before\r\n\r\nx\r\n",
    ));
    let mut c = s.client();
    c.expect("EHLO client.test", "250");
    c.expect("MAIL FROM:<a@remote.test>", "250");
    c.expect("RCPT TO:<b@example.test>", "250");
    c.expect("DATA", "354");
    c.send("Subject: half\r\n\r\nhalf a message");
    std::thread::sleep(Duration::from_millis(200));
    s.kill9();
    assert!(
        c.read_reply().is_empty(),
        "no 250 for a message cut by the crash"
    );
    s.restart();
    let ids: Vec<String> = s
        .queue()
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, [id]);
}

#[test]
fn smuggling_never_reaches_the_primary_as_a_second_message() {
    let sink = Sink::start(0);
    let s = Server::start_run(
        "",
        "[delivery]\nretry_initial = \"1s\"\n",
        &format!("[\"{}\"]", sink.addr),
    );
    for smuggle in ["\n.\n", "\n.\r\n", "\r\n.\n", "\r.\r\n"] {
        let mut c = s.client();
        c.expect("EHLO client.test", "250");
        c.expect("MAIL FROM:<a@remote.test>", "250");
        c.expect("RCPT TO:<b@example.test>", "250");
        c.expect("DATA", "354");
        c.send(format!(
            "Subject: s\r\n\r\nx{smuggle}MAIL FROM:<admin@example.test>\r\nRCPT TO:<victim@example.test>\r\nDATA\r\nforged\r\n.\r\n"
        ));
        queue_id(&c.read_reply());
    }
    let got = sink.wait_for(4, Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        sink.received().len(),
        4,
        "one message each, nothing smuggled"
    );
    for m in &got {
        assert_eq!(m.rcpts, ["b@example.test"]);
        assert_no_bare_cr_lf(&m.wire);
        assert!(String::from_utf8_lossy(&m.data).contains("MAIL FROM:<admin@example.test>"));
    }
}

#[test]
fn a_dead_dns_server_means_retry_not_bounce() {
    let s = Server::start_run(
        "",
        "[delivery]\nretry_initial = \"1s\"\n[[domain]]\nname = \"mxonly.test\"\n",
        "",
    );
    let mut c = s.client();
    let id = queue_id(&c.send_message(
        "a@remote.test",
        &["b@mxonly.test"],
        "Subject: dns\r\n\r\nx\r\n",
    ));
    let entry = eventually(Duration::from_secs(30), "two attempts", || {
        s.queue()
            .into_iter()
            .find(|e| e["id"] == id.as_str() && e["attempts"].as_u64() >= Some(2))
    });
    assert!(
        entry["last_error"].as_str().unwrap().contains("MX lookup"),
        "{entry}"
    );
    assert!(!s.log().contains("bounce_queued"));
}
