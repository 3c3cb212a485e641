//! End-to-end: what got a 250 survives kill -9; shutdown is graceful.

use std::time::Duration;

use backupmx_tests::*;

#[test]
fn a_message_survives_kill_9_right_after_250() {
    let mut s = Server::start("", "");
    let body = "From: a@remote.test\r\nSubject: durable\r\n\r\nline one\r\n..dotted\r\n";
    let mut c = s.client();
    let id = queue_id(&c.send_message("a@remote.test", &["user@example.test"], body));
    s.kill9();
    s.restart();
    let queue = s.queue();
    assert_eq!(queue.len(), 1);
    assert_eq!(queue[0]["id"], id.as_str());
    for key in [
        "sender",
        "recipients",
        "domain",
        "attempts",
        "next_attempt",
        "received_at",
        "size",
    ] {
        assert!(
            queue[0].get(key).is_some(),
            "{key} missing from {}",
            queue[0]
        );
    }
    let raw = s.raw(&id);
    assert_eq!(
        after_received(&raw),
        body.replace("..dotted", ".dotted").as_bytes()
    );
    assert_eq!(queue[0]["size"], raw.len());
}

#[test]
fn many_concurrent_messages_all_survive_kill_9() {
    let mut s = Server::start("", "");
    let addr = s.addr;
    let handles: Vec<_> = (0..8)
        .map(|t| {
            std::thread::spawn(move || {
                let mut ids = Vec::new();
                for i in 0..10 {
                    let mut c = Client::connect(addr);
                    let r = c.send_message(
                        "a@remote.test",
                        &["user@example.test"],
                        &format!("Subject: {t}-{i}\r\n\r\nx\r\n"),
                    );
                    ids.push(queue_id(&r));
                }
                ids
            })
        })
        .collect();
    let mut ids: Vec<String> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    s.kill9();
    s.restart();
    let mut queued: Vec<String> = s
        .queue()
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    queued.sort();
    assert_eq!(ids, queued);
}

#[test]
fn sigterm_closes_idle_sessions_with_421_and_exits() {
    let mut s = Server::start("", "");
    let mut idle = s.client();
    idle.expect("EHLO client.test", "250");
    s.signal("TERM");
    let r = idle.read_reply();
    assert!(r.starts_with("421 4.3.2"), "{r}");
    let status = s.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "{status}");
}

#[test]
fn sigterm_lets_a_message_in_progress_finish() {
    let mut s = Server::start("", "");
    let mut c = s.client();
    c.expect("EHLO client.test", "250");
    c.expect("MAIL FROM:<a@remote.test>", "250");
    c.expect("RCPT TO:<user@example.test>", "250");
    c.expect("DATA", "354");
    c.send("Subject: in flight\r\n\r\nfirst half\r\n");
    s.signal("TERM");
    std::thread::sleep(Duration::from_millis(300));
    c.send("second half\r\n.\r\n");
    let id = queue_id(&c.read_reply());
    // Now idle: the server says goodbye.
    assert!(c.read_reply().starts_with("421 4.3.2"));
    assert!(s.wait_exit(Duration::from_secs(10)).success());
    let out = s.cli(&["queue", "show", &id, "--raw"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("second half"));
}
