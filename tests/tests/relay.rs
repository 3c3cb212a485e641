//! End-to-end: relay control, framing and pipelining against the real binary.

use backupmx_tests::*;

#[test]
fn accepts_hosted_domains_and_denies_relaying() {
    let s = Server::start(
        "",
        "[[domain]]\nname = \"listed.test\"\nrecipients = [\"known@listed.test\"]\n",
    );
    let mut c = s.client();
    c.expect("EHLO client.test", "250-mx2.test");
    c.expect("MAIL FROM:<>", "250 2.1.0");
    c.expect("RCPT TO:<victim@elsewhere.test>", "550 5.7.1");
    c.expect("RCPT TO:<user%elsewhere.test@example.test>", "550 5.7.1");
    c.expect("RCPT TO:<elsewhere.test!user@example.test>", "550 5.7.1");
    c.expect(
        "RCPT TO:<\"user@elsewhere.test\"@example.test>",
        "550 5.7.1",
    );
    c.expect("RCPT TO:<@example.test:user@elsewhere.test>", "550 5.7.1");
    c.expect("RCPT TO:<user@[127.0.0.1]>", "550 5.7.1");
    c.expect("RCPT TO:<user@example.test.elsewhere.test>", "550 5.7.1");
    c.expect("RCPT TO:<stranger@listed.test>", "550 5.1.1");
    c.expect("RCPT TO:<user@EXAMPLE.TEST.>", "250 2.1.5");
    c.expect("RCPT TO:<Known@Listed.Test>", "250 2.1.5");
    c.expect("DATA", "354");
    c.send("Subject: hello\r\n\r\nhi\r\n.\r\n");
    let id = queue_id(&c.read_reply());
    c.expect("QUIT", "221");
    let queue = s.queue();
    assert_eq!(queue.len(), 2, "one entry per hosted domain: {queue:?}");
    let ids: Vec<&str> = queue.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert!(ids.contains(&id.as_str()));
    let domains: Vec<&str> = queue
        .iter()
        .map(|e| e["domain"].as_str().unwrap())
        .collect();
    assert!(domains.contains(&"example.test") && domains.contains(&"listed.test"));
    for e in &queue {
        assert_eq!(e["sender"], "");
        assert_eq!(e["recipients"].as_array().unwrap().len(), 1);
    }
}

#[test]
fn smuggled_end_of_data_sequences_stay_inside_the_message() {
    let s = Server::start("", "");
    for smuggle in ["\n.\n", "\n.\r\n", "\r\n.\n", "\r.\r\n", "\r\n.\r"] {
        let mut c = s.client();
        c.expect("EHLO client.test", "250");
        c.expect("MAIL FROM:<sender@remote.test>", "250");
        c.expect("RCPT TO:<user@example.test>", "250");
        c.expect("DATA", "354");
        // Everything in one write, as an attacker would send it.
        c.send(format!(
            "Subject: smuggle\r\n\r\nfirst{smuggle}MAIL FROM:<admin@example.test>\r\nRCPT TO:<victim@example.test>\r\nDATA\r\nsmuggled\r\n.\r\n"
        ));
        let reply = c.read_reply();
        let id = queue_id(&reply);
        // Exactly one reply: the smuggled commands were never executed.
        c.expect("NOOP", "250 2.0.0");
        let raw = s.raw(&id);
        assert_no_bare_cr_lf(&raw);
        let text = String::from_utf8_lossy(&raw);
        assert!(
            text.contains("MAIL FROM:<admin@example.test>\r\n"),
            "{smuggle:?}: {text}"
        );
        assert!(text.contains("smuggled\r\n"));
    }
    assert_eq!(s.queue().len(), 5);
}

#[test]
fn pipelined_transaction_in_one_write() {
    let s = Server::start("", "");
    let mut c = s.client();
    c.send(
        "EHLO client.test\r\nMAIL FROM:<a@remote.test>\r\nRCPT TO:<x@example.test>\r\nRCPT TO:<y@elsewhere.test>\r\nRCPT TO:<z@example.test>\r\nDATA\r\n",
    );
    let replies: Vec<String> = (0..6).map(|_| c.read_reply()).collect();
    let codes: Vec<&str> = replies.iter().map(|r| &r[..3]).collect();
    assert_eq!(
        codes,
        ["250", "250", "250", "550", "250", "354"],
        "{replies:?}"
    );
    c.send("Subject: p\r\n\r\n..leading dot\r\n.\r\nQUIT\r\n");
    let id = queue_id(&c.read_reply());
    assert!(c.read_reply().starts_with("221"));
    let raw = s.raw(&id);
    assert_eq!(after_received(&raw), b"Subject: p\r\n\r\n.leading dot\r\n");
    let entry = &s.queue()[0];
    assert_eq!(
        entry["recipients"],
        serde_json::json!(["x@example.test", "z@example.test"])
    );
}

#[test]
fn received_header_is_prepended_and_body_kept_byte_exact() {
    let s = Server::start("", "");
    let mut c = s.client();
    let body =
        "From: a@remote.test\r\nSubject: bytes\r\n\r\n\u{e9}t\u{e9} 8bit\r\n\ttabbed\r\n \r\n";
    let id = queue_id(&c.send_message("a@remote.test", &["user@example.test"], body));
    let raw = s.raw(&id);
    assert_eq!(after_received(&raw), body.as_bytes());
    let trace = backupmx_tests::skip_field(&raw, b"Authentication-Results: ");
    let header = String::from_utf8_lossy(&trace[..trace.len() - body.len()]).to_string();
    assert!(
        header.starts_with(
            "Received: from client.test ([127.0.0.1])\r\n\tby mx2.test (backupmx) with ESMTP id "
        ),
        "{header}"
    );
    assert!(header.contains(&format!("id {id}")), "{header}");
    assert!(header.contains("for <user@example.test>;"), "{header}");
}

#[test]
fn too_many_received_headers_is_refused_as_a_loop() {
    let s = Server::start("", "");
    let mut c = s.client();
    let hops = "Received: from a by b; Sat, 28 Nov 2026 00:00:00 +0000\r\n".repeat(101);
    let reply = c.send_message(
        "a@remote.test",
        &["user@example.test"],
        &format!("{hops}\r\nbody\r\n"),
    );
    assert!(reply.starts_with("554 5.4.6"), "{reply}");
    assert!(s.queue().is_empty());
}

#[test]
fn swaks_session_is_queued() {
    let s = Server::start("", "");
    let out = std::process::Command::new("swaks")
        .args([
            "--server",
            &s.addr.to_string(),
            "--from",
            "sender@remote.test",
            "--to",
            "user@example.test",
        ])
        .args([
            "--header",
            "Subject: swaks test",
            "--body",
            "hello from swaks",
        ])
        .output()
        .expect("swaks is installed (scripts/test installs it)");
    let transcript = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{transcript}");
    assert!(
        transcript.contains("<-  250 2.0.0 Ok: queued as "),
        "{transcript}"
    );
    let queue = s.queue();
    assert_eq!(queue.len(), 1);
    let raw = s.raw(queue[0]["id"].as_str().unwrap());
    assert!(String::from_utf8_lossy(&raw).contains("hello from swaks"));
}

#[test]
fn an_idn_domain_is_hosted_in_either_form() {
    let s = Server::start("", "[[domain]]\nname = \"xn--bcher-kva.test\"\n");
    let mut c = s.client();
    c.expect("EHLO client.test", "250");
    c.expect("MAIL FROM:<a@remote.test> SMTPUTF8", "250");
    c.expect("RCPT TO:<u@bücher.test>", "250 2.1.5");
    c.expect("RCPT TO:<v@XN--BCHER-KVA.test>", "250 2.1.5");
    c.expect("DATA", "354");
    c.send("Subject: idn\r\n\r\nhi\r\n.\r\n");
    queue_id(&c.read_reply());
    let queue = s.queue();
    assert_eq!(queue.len(), 1, "one hosted domain: {queue:?}");
    assert_eq!(queue[0]["domain"], "xn--bcher-kva.test");
    // The CLI takes the Unicode form too, and stores the A-labels.
    let out = s.cli(&["domain", "add", "Straße.test"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = s.cli(&["domain", "list"]);
    let listed = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(listed.contains("xn--strae-oqa.test"), "{listed}");
    let out = s.cli(&["domain", "add", "xn--zz.test"]);
    assert!(!out.status.success(), "invalid punycode refused");
}
