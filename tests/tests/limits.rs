//! End-to-end: every configured limit, and that the session survives it.

use std::time::Duration;

use backupmx_tests::*;

#[test]
fn long_command_line_gets_500_and_the_session_continues() {
    let s = Server::start("", "");
    let mut c = s.client();
    c.expect("EHLO client.test", "250");
    c.expect(&format!("NOOP {}", "x".repeat(600)), "500 5.5.2");
    c.expect(&format!("NOOP {}", "x".repeat(5000)), "500 5.5.2");
    c.expect("NOOP", "250 2.0.0");
    let reply = c.send_message(
        "a@remote.test",
        &["user@example.test"],
        "Subject: after\r\n\r\nok\r\n",
    );
    assert!(reply.starts_with("250 2.0.0"), "{reply}");
}

#[test]
fn size_limits_give_552_and_store_nothing() {
    let s = Server::start(
        "max_message_size = 10000",
        "[[domain]]\nname = \"small.test\"\nmax_message_size = 2000\n",
    );
    let mut c = s.client();
    let ehlo = c.expect("EHLO client.test", "250");
    assert!(ehlo.contains("SIZE 10000"), "{ehlo}");
    c.expect("MAIL FROM:<a@remote.test> SIZE=10001", "552 5.3.4");
    c.expect("MAIL FROM:<a@remote.test> SIZE=3000", "250");
    c.expect("RCPT TO:<u@small.test>", "552 5.3.4");
    c.expect("RCPT TO:<u@example.test>", "250");
    c.expect("DATA", "354");
    c.send(format!(
        "Subject: big\r\n\r\n{}\r\n.\r\n",
        "y".repeat(20_000)
    ));
    let r = c.read_reply();
    assert!(r.starts_with("552 5.3.4"), "{r}");
    // Same connection, still usable.
    let r = c.send_message(
        "a@remote.test",
        &["u@example.test"],
        "Subject: small\r\n\r\nok\r\n",
    );
    assert!(r.starts_with("250"), "{r}");
    assert_eq!(s.queue().len(), 1);
}

#[test]
fn the_101st_recipient_gets_452() {
    let s = Server::start("", "");
    let mut c = s.client();
    c.expect("EHLO client.test", "250");
    c.expect("MAIL FROM:<a@remote.test>", "250");
    let mut batch = String::new();
    for i in 0..101 {
        batch.push_str(&format!("RCPT TO:<u{i}@example.test>\r\n"));
    }
    c.send(batch);
    for i in 0..100 {
        let r = c.read_reply();
        assert!(r.starts_with("250"), "rcpt {i}: {r}");
    }
    assert!(c.read_reply().starts_with("452 4.5.3"));
    c.expect("DATA", "354");
    c.send("Subject: many\r\n\r\n.\r\n");
    queue_id(&c.read_reply());
    assert_eq!(s.queue()[0]["recipients"].as_array().unwrap().len(), 100);
}

#[test]
fn connections_per_ip_are_limited_but_other_clients_get_in() {
    let s = Server::start("max_connections_per_ip = 3", "");
    let held: Vec<Client> = (0..3).map(|_| s.client_from("127.0.0.2")).collect();
    let mut refused = Client::connect_from_raw("127.0.0.2".parse().unwrap(), s.addr);
    let r = refused.read_reply();
    assert!(r.starts_with("421 4.7.0"), "{r}");
    assert!(refused.is_closed());
    let mut other = s.client_from("127.0.0.3");
    other.expect("NOOP", "250");
    drop(held);
    // Slots are released when sessions end.
    let mut again = eventually(Duration::from_secs(10), "a released per-IP slot", || {
        let mut c = Client::connect_from_raw("127.0.0.2".parse().unwrap(), s.addr);
        c.read_reply().starts_with("220 ").then_some(c)
    });
    again.expect("NOOP", "250");
}

#[test]
fn total_connections_are_limited() {
    let s = Server::start("max_connections = 2", "");
    // The readiness probe's session may still hold its slot for a moment.
    let greeted = |ip: &str| {
        eventually(Duration::from_secs(10), "a free connection slot", || {
            let mut c = Client::connect_from_raw(ip.parse().unwrap(), s.addr);
            c.read_reply().starts_with("220 ").then_some(c)
        })
    };
    let _a = greeted("127.0.0.4");
    let _b = greeted("127.0.0.5");
    let mut c = Client::connect_from_raw("127.0.0.6".parse().unwrap(), s.addr);
    assert!(c.read_reply().starts_with("421 4.7.0"));
}

#[test]
fn idle_clients_are_timed_out_with_421() {
    let s = Server::start("idle_timeout = \"1s\"", "");
    let mut c = s.client();
    c.expect("EHLO client.test", "250");
    let r = c.read_reply();
    assert!(r.starts_with("421 4.4.2"), "{r}");
    assert!(c.is_closed());
}

#[test]
fn too_many_errors_close_the_connection() {
    let s = Server::start("max_errors = 5", "");
    let mut c = s.client();
    for _ in 0..4 {
        c.expect("BOGUS", "500 5.5.2");
    }
    let r = c.cmd("BOGUS");
    assert!(r.contains("500 5.5.2"), "{r}");
    let r = if r.contains("421") { r } else { c.read_reply() };
    assert!(r.contains("421 4.7.0"), "{r}");
    assert!(c.is_closed());
}

#[test]
fn random_garbage_never_kills_the_server() {
    let s = Server::start("", "");
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..20 {
        let mut c = s.client();
        let mut junk = Vec::new();
        for _ in 0..2000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            junk.push((seed & 0xff) as u8);
        }
        c.send(&junk);
        c.send("\r\nQUIT\r\n");
        drop(c);
    }
    let mut c = s.client();
    let r = c.send_message(
        "a@remote.test",
        &["user@example.test"],
        "Subject: still alive\r\n\r\n",
    );
    assert!(r.starts_with("250"), "{r}");
}
