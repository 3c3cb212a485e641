//! End-to-end on the AWS backend against the emulator (LocalStack):
//! `backupmx ingest` writes to S3 and SQS, `retry-fn` delivers from SQS.

use std::process::Command;
use std::time::Duration;

use aws_lambda_events::event::sqs::SqsEvent;
use backupmx_tests::sink::Sink;
use backupmx_tests::*;
use relay_core::config::Config;

const BODY: &str = "From: alice@remote.test\r\nSubject: via aws\r\n\r\n.dot line\r\nbody\r\n";

fn run_retry_fn(s: &Server, idle: &str) -> std::process::Output {
    Command::new(retry_fn_bin())
        .arg("--config")
        .arg(&s.config_path)
        .args(["poll", "--exit-when-idle", idle])
        .output()
        .expect("run retry-fn")
}

#[test]
fn ingest_stores_in_s3_and_sqs_and_retry_fn_delivers_once() {
    let sink = Sink::start(0);
    let Some(s) = Server::start_aws(
        "",
        "[delivery]\nretry_initial = \"1s\"\n",
        &format!("[\"{}\"]", sink.addr),
        false,
    ) else {
        return;
    };
    let mut c = s.client();
    let id = queue_id(&c.send_message("alice@remote.test", &["bob@example.test"], BODY));
    let queue = s.queue();
    assert_eq!(queue.len(), 1, "{queue:?}");
    assert_eq!(queue[0]["id"], id.as_str());
    assert_eq!(queue[0]["domain"], "example.test");
    let stored = s.raw(&id);
    assert_eq!(
        after_received(&stored),
        BODY.replace(".dot", "dot").as_bytes()
    );
    let out = run_retry_fn(&s, "3s");
    assert!(
        out.status.success(),
        "retry-fn: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = sink.wait_for(1, Duration::from_secs(10));
    assert_eq!(got[0].rcpts, ["bob@example.test"]);
    assert_eq!(got[0].data, stored, "byte-exact from S3");
    assert!(
        s.queue().is_empty(),
        "record and body deleted after delivery"
    );
    // Nothing left in SQS: a second run delivers nothing more.
    let out = run_retry_fn(&s, "2s");
    assert!(out.status.success());
    assert_eq!(sink.received().len(), 1);
}

#[test]
fn a_big_message_goes_through_s3_in_pieces_byte_exact() {
    let sink = Sink::start(0);
    let Some(s) = Server::start_aws(
        "",
        "[delivery]\nretry_initial = \"1s\"\n",
        &format!("[\"{}\"]", sink.addr),
        false,
    ) else {
        return;
    };
    let (wire, stored) = big_message(2 * 1024 * 1024);
    let mut c = s.client();
    let id = queue_id(&c.send_message("alice@remote.test", &["bob@example.test"], &wire));
    let raw = s.raw(&id);
    assert!(
        after_received(&raw) == stored.as_slice(),
        "stored byte-exact in S3"
    );
    let out = run_retry_fn(&s, "3s");
    assert!(
        out.status.success(),
        "retry-fn: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = sink.wait_for(1, Duration::from_secs(20));
    assert!(got[0].data == raw, "relayed byte-exact from S3");
    assert!(s.queue().is_empty());
}

#[test]
fn bootstrap_creates_the_queue_a_configured_queue_url_names() {
    let sink = Sink::start(0);
    let Some(s) = Server::start_aws_by_queue_url(
        "",
        "[delivery]\nretry_initial = \"1s\"\n",
        &format!("[\"{}\"]", sink.addr),
    ) else {
        return;
    };
    // The ingest sends to that URL: a missing queue would be a 451.
    let mut c = s.client();
    let reply = c.send_message("alice@remote.test", &["bob@example.test"], BODY);
    assert!(reply.starts_with("250 "), "{reply}");
    let out = run_retry_fn(&s, "3s");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    sink.wait_for(1, Duration::from_secs(10));
    // A queue_name that contradicts the URL is refused, not ignored.
    let text = std::fs::read_to_string(&s.config_path).unwrap();
    let contradicting = s.dir.path().join("contradicting.toml");
    std::fs::write(
        &contradicting,
        text.replace("[aws]\n", "[aws]\nqueue_name = \"other\"\n"),
    )
    .unwrap();
    let out = Command::new(backupmx_bin())
        .arg("--config")
        .arg(&contradicting)
        .args(["aws", "bootstrap"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("set one of them"));
}

#[test]
fn temporary_failures_are_rescheduled_through_sqs() {
    let sink = Sink::start(0);
    sink.set(|b| b.tempfail_next = 1);
    let Some(s) = Server::start_aws(
        "",
        "[delivery]\nretry_initial = \"1s\"\n",
        &format!("[\"{}\"]", sink.addr),
        false,
    ) else {
        return;
    };
    let mut c = s.client();
    queue_id(&c.send_message("alice@remote.test", &["bob@example.test"], BODY));
    let out = run_retry_fn(&s, "4s");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = sink.wait_for(1, Duration::from_secs(10));
    assert_eq!(got.len(), 1);
    assert!(s.queue().is_empty());
    let log = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(log.contains("451 4.3.0 try again later"), "{log}");
}

#[test]
fn a_storage_failure_gives_451_and_queues_nothing() {
    let Some(s) = Server::start_aws("", "", "", true) else {
        return;
    };
    let mut c = s.client();
    let reply = c.send_message("alice@remote.test", &["bob@example.test"], BODY);
    assert!(reply.starts_with("451 4.3.0"), "{reply}");
    // The session is still usable.
    c.expect("NOOP", "250");
    assert!(s.log().contains("store_failed"), "{}", s.log());
}

#[test]
fn domain_commands_work_on_dynamodb() {
    let Some(s) = Server::start_aws("", "", "", false) else {
        return;
    };
    let out = s.cli(&[
        "domain",
        "add",
        "dyn.test",
        "--primary",
        "127.0.0.1:2626",
        "--recipient",
        "a@dyn.test",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list: serde_json::Value =
        serde_json::from_slice(&s.cli(&["domain", "list", "--json"]).stdout).unwrap();
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["dyn.test", "example.test"]);
    let mut c = s.client();
    c.expect("EHLO client.test", "250");
    c.expect("MAIL FROM:<x@remote.test>", "250");
    c.expect("RCPT TO:<a@dyn.test>", "250");
    c.expect("RCPT TO:<b@dyn.test>", "550 5.1.1");
    assert!(s.cli(&["domain", "remove", "dyn.test"]).status.success());
    c.expect("RCPT TO:<a@dyn.test>", "550 5.7.1");
}

/// The Lambda handler, fed an SQS event fixture whose first record is a
/// real queue message and whose second is garbage: only the garbage is
/// reported as failed, and processing the real one twice delivers once.
#[tokio::test]
async fn lambda_handler_reports_only_failed_records_and_never_repeats_a_delivery() {
    if !aws_available() {
        return;
    }
    let sink = Sink::start(0);
    let suffix = relay_core::queue::new_id(std::time::SystemTime::now())
        .as_str()
        .to_lowercase();
    let config = Config::from_toml(&format!(
        "hostname = \"mx2.test\"\n[aws]\ndomains_table = \"d-{suffix}\"\ngreylist_table = \"g-{suffix}\"\nqueue_table = \"r-{suffix}\"\nbucket = \"b-{suffix}\"\nqueue_name = \"q-{suffix}\"\n[dns]\nservers = [\"127.0.0.1:9\"]\n[[domain]]\nname = \"example.test\"\nprimary = [\"{}\"]\n",
        sink.addr
    ))
    .unwrap();
    let names = relay_core::store::aws::AwsNames {
        domains_table: config.aws.domains_table.clone(),
        greylist_table: config.aws.greylist_table.clone(),
        bucket: config.aws.bucket.clone(),
        queue_url: String::new(),
        queue_name: config.aws.queue_name.clone(),
        queue_table: config.aws.queue_table.clone(),
        dead_letter_queue_url: String::new(),
    };
    let conf = relay_core::store::aws::sdk_config().await;
    let store = std::sync::Arc::new(
        relay_core::store::aws::AwsStore::bootstrap(&conf, names)
            .await
            .unwrap(),
    );
    use relay_core::store::{DomainRegistry, Spool};
    store
        .put(&config.domains[0].to_domain().unwrap())
        .await
        .unwrap();
    let spool = relay_core::store::SplitSpool {
        messages: store.clone(),
        queue: store.clone(),
        history: None,
    };
    let message = relay_core::queue::AcceptedMessage {
        dsn: Default::default(),
        id: relay_core::queue::new_id(std::time::SystemTime::now()),
        sender: "alice@remote.test".into(),
        recipients: vec![relay_core::queue::AcceptedRecipient {
            dsn: Default::default(),
            address: "bob@example.test".into(),
            domain: relay_core::address::DomainName::parse("example.test").unwrap(),
        }],
        client_ip: "192.0.2.1".parse().unwrap(),
        helo: "client.test".into(),
        received_at: std::time::SystemTime::now(),
        smtputf8: false,
        eight_bit: false,
        body: BODY.as_bytes().to_vec(),
        deferred: Vec::new(),
        spooled: None,
        tls_request: None,
    };
    spool.accept(message).await.unwrap();
    let received = store
        .sqs()
        .receive_message()
        .queue_url(store.queue_url())
        .wait_time_seconds(2)
        .send()
        .await
        .unwrap();
    let body = received.messages()[0].body().unwrap().to_string();
    let fixture = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../retry-fn/fixtures/sqs-event.json"
    ))
    .unwrap();
    let event: SqsEvent = serde_json::from_str(
        &fixture.replace("\"__BODY__\"", &serde_json::to_string(&body).unwrap()),
    )
    .unwrap();
    let processor = retry_fn::build(&config).await.unwrap();
    let response = retry_fn::handle(&processor, event.clone(), None).await;
    let failed: Vec<String> = response
        .batch_item_failures
        .iter()
        .map(|f| f.item_identifier.clone())
        .collect();
    assert_eq!(failed, ["m-bad-2"]);
    assert_eq!(sink.received().len(), 1);
    // SQS redelivers the same message: nothing is sent again.
    let response = retry_fn::handle(&processor, event, None).await;
    assert_eq!(response.batch_item_failures.len(), 1);
    assert_eq!(
        sink.received().len(),
        1,
        "a redelivered SQS message never resends"
    );
}

#[test]
fn greylisting_is_shared_by_two_ingest_processes_through_dynamodb() {
    let Some(a) = Server::start_aws(
        "",
        "[greylist]\nenabled = true\ndelay = \"1s\"\n",
        "",
        false,
    ) else {
        return;
    };
    let b = a.start_sibling();
    let mut c = a.client_from("127.0.0.8");
    c.expect("EHLO client.test", "250");
    c.expect("MAIL FROM:<alice@remote.test>", "250");
    c.expect("RCPT TO:<bob@example.test>", "450 4.2.0");
    std::thread::sleep(Duration::from_millis(1500));
    // The retry lands on the other instance, which knows the triplet.
    let mut c = b.client_from("127.0.0.8");
    c.expect("EHLO client.test", "250");
    c.expect("MAIL FROM:<alice@remote.test>", "250");
    c.expect("RCPT TO:<bob@example.test>", "250");
}

#[test]
fn a_550_on_aws_sends_a_dsn_through_the_queue() {
    let primary = Sink::start(0);
    primary.set(|b| {
        b.rcpt_replies
            .push(("bad@example.test".into(), "550 5.1.1 no such user".into()))
    });
    let sender_mx = Sink::start(0);
    let Some(s) = Server::start_aws(
        "",
        &format!(
            "[delivery]\nretry_initial = \"1s\"\nroutes = {{ \"remote.test\" = \"{}\" }}\n",
            sender_mx.addr
        ),
        &format!("[\"{}\"]", primary.addr),
        false,
    ) else {
        return;
    };
    let mut c = s.client();
    queue_id(&c.send_message("alice@remote.test", &["bad@example.test"], BODY));
    let out = run_retry_fn(&s, "3s");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dsn = sender_mx.wait_for(1, Duration::from_secs(10));
    assert_eq!(dsn[0].mail_from, "");
    let text = String::from_utf8_lossy(&dsn[0].data).to_string();
    assert!(text.contains("Status: 5.1.1"), "{text}");
    assert!(s.queue().is_empty());
}

#[test]
fn an_unreachable_aws_backend_gives_451_and_service_resumes() {
    let upstream: std::net::SocketAddr = match std::env::var("AWS_ENDPOINT_URL") {
        Ok(url) => url
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .parse()
            .expect("emulator address"),
        Err(_) => {
            aws_available();
            return;
        }
    };
    let proxy = TcpProxy::start(upstream);
    let sink = Sink::start(0);
    let Some(s) = Server::start_aws_via(
        "",
        "",
        &format!("[\"{}\"]", sink.addr),
        false,
        Some(&proxy.url()),
    ) else {
        return;
    };
    let mut c = s.client();
    let id = queue_id(&c.send_message("alice@remote.test", &["bob@example.test"], BODY));
    proxy.set_down(true);
    // The domain lookup (RCPT) or the store (end of DATA) fails: 451 either way.
    c.expect("MAIL FROM:<alice@remote.test>", "250");
    let rcpt = c.cmd("RCPT TO:<bob@example.test>");
    let reply = if rcpt.starts_with("250") {
        c.expect("DATA", "354");
        c.send(format!("{BODY}.\r\n"));
        c.read_reply()
    } else {
        rcpt
    };
    assert!(reply.starts_with("451 4.3.0"), "{reply}");
    c.expect("RSET", "250");
    proxy.set_down(false);
    let id2 = queue_id(&c.send_message("alice@remote.test", &["bob@example.test"], BODY));
    // Both accepted messages are there; the refused one is not.
    let ids: Vec<String> = s
        .queue()
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_string())
        .collect();
    assert!(ids.contains(&id) && ids.contains(&id2), "{ids:?}");
    assert_eq!(ids.len(), 2);
    let out = run_retry_fn(&s, "3s");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(sink.wait_for(2, Duration::from_secs(10)).len(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_primary_does_not_fail_the_whole_lambda_batch() {
    if !aws_available() {
        return;
    }
    let sink = Sink::start(0);
    // A primary that accepts connections and never greets.
    let hanging = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hanging_addr = hanging.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in hanging.incoming().flatten() {
            held.push(c);
        }
    });
    let suffix = relay_core::queue::new_id(std::time::SystemTime::now())
        .as_str()
        .to_lowercase();
    let config = Config::from_toml(&format!(
        "hostname = \"mx2.test\"\n[aws]\ndomains_table = \"d-{suffix}\"\ngreylist_table = \"g-{suffix}\"\nqueue_table = \"r-{suffix}\"\nbucket = \"b-{suffix}\"\nqueue_name = \"q-{suffix}\"\n[dns]\nservers = [\"127.0.0.1:9\"]\n\
         [[domain]]\nname = \"example.test\"\nprimary = [\"{}\"]\n[[domain]]\nname = \"slow.test\"\nprimary = [\"{hanging_addr}\"]\n",
        sink.addr
    ))
    .unwrap();
    let names = relay_core::store::aws::AwsNames::from(&config.aws);
    let conf = relay_core::store::aws::sdk_config().await;
    let store = std::sync::Arc::new(
        relay_core::store::aws::AwsStore::bootstrap(&conf, names)
            .await
            .unwrap(),
    );
    use relay_core::store::{DomainRegistry, Spool};
    for d in &config.domains {
        store.put(&d.to_domain().unwrap()).await.unwrap();
    }
    let spool = relay_core::store::SplitSpool {
        messages: store.clone(),
        queue: store.clone(),
        history: None,
    };
    let mut slow_id = String::new();
    for rcpt in ["bob@example.test", "carol@slow.test"] {
        let domain = rcpt.split('@').nth(1).unwrap();
        let ids = spool
            .accept(relay_core::queue::AcceptedMessage {
                dsn: Default::default(),
                id: relay_core::queue::new_id(std::time::SystemTime::now()),
                sender: "alice@remote.test".into(),
                recipients: vec![relay_core::queue::AcceptedRecipient {
                    dsn: Default::default(),
                    address: rcpt.into(),
                    domain: relay_core::address::DomainName::parse(domain).unwrap(),
                }],
                client_ip: "192.0.2.1".parse().unwrap(),
                helo: "client.test".into(),
                received_at: std::time::SystemTime::now(),
                smtputf8: false,
                eight_bit: false,
                body: BODY.as_bytes().to_vec(),
                deferred: Vec::new(),
                spooled: None,
                tls_request: None,
            })
            .await
            .unwrap();
        if domain == "slow.test" {
            slow_id = ids[0].to_string();
        }
    }
    let mut records = Vec::new();
    while records.len() < 2 {
        let received = store
            .sqs()
            .receive_message()
            .queue_url(store.queue_url())
            .max_number_of_messages(10)
            .wait_time_seconds(2)
            .send()
            .await
            .unwrap();
        for m in received.messages() {
            let body = m.body().unwrap().to_string();
            let mut record = aws_lambda_events::event::sqs::SqsMessage::default();
            record.message_id = Some(
                // A ticket names the record by id.
                if body.contains(&slow_id) {
                    "slow"
                } else {
                    "fast"
                }
                .into(),
            );
            record.body = Some(body);
            records.push(record);
        }
    }
    let mut event = SqsEvent::default();
    event.records = records;
    let processor = retry_fn::build(&config).await.unwrap();
    // 6 s left, 5 s kept back to report: 1 s for the batch.
    let deadline = std::time::SystemTime::now() + Duration::from_secs(6);
    let response = retry_fn::handle(&processor, event, Some(deadline)).await;
    let failed: Vec<String> = response
        .batch_item_failures
        .iter()
        .map(|f| f.item_identifier.clone())
        .collect();
    assert_eq!(failed, ["slow"], "only the unfinished record is reported");
    assert_eq!(sink.received().len(), 1, "the other was delivered");
}

/// The SMTP promises of issue 34 on the AWS shape: a message sent by BDAT
/// with DSN requests is stored in S3/SQS and goes to a primary that offers
/// CHUNKING and DSN by BDAT, byte-exact, with the requests passed on; a
/// REQUIRETLS message taken over STARTTLS waits (no verified TLS to that
/// primary) with its reason; and the day's TLS report, counted by
/// retry-fn in DynamoDB, is posted by `tlsrpt send --now`.
#[test]
fn chunking_dsn_requiretls_and_tls_reports_on_aws() {
    use backupmx_tests::dns::{DnsServer, Rec};
    use backupmx_tests::https::PostReceiver;
    use backupmx_tests::pki::Pki;
    use backupmx_tests::smtp_tls::TlsClient;
    use std::io::Read;

    let pki = Pki::new();
    let (cert, key) = pki.issue(&["127.0.0.1"], true);
    let receiver = PostReceiver::start(&cert, &key);
    let record = format!(
        "v=TLSRPTv1; rua=https://127.0.0.1:{}/tlsrpt",
        receiver.addr.port()
    );
    let dns = DnsServer::start(&[("_smtp._tls.example.test", Rec::Txt(record))]);
    let primary = Sink::start(0);
    primary.set(|b| {
        b.offer_chunking = true;
        b.offer_dsn = true;
    });
    let Some(s) = Server::start_aws(
        "",
        &format!(
            "[delivery]\nretry_initial = \"1h\"\nretry_max = \"2h\"\ntls_ca_file = \"{}\"\n[dns]\nservers = [\"{}\"]\ntimeout = \"2s\"\n[tlsrpt]\nenabled = true\n{}",
            pki.ca_file().display(),
            dns.addr,
            pki.tls_section("ingest", &["127.0.0.1"], true)
        ),
        &format!("[\"{}\"]", primary.addr),
        false,
    ) else {
        return;
    };
    let mut c = s.client();
    let ehlo = c.cmd("EHLO client.test");
    assert!(ehlo.contains("CHUNKING") && ehlo.contains("DSN"), "{ehlo}");
    c.expect(
        "MAIL FROM:<alice@remote.test> RET=HDRS ENVID=aws+2B1",
        "250",
    );
    c.expect(
        "RCPT TO:<bob@example.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;bob+40example.test",
        "250",
    );
    let body: &[u8] = b"Subject: chunked on aws\r\n\r\n.dot\r\nbare\nlf\r\n";
    let mut wire = format!("BDAT {} LAST\r\n", body.len()).into_bytes();
    wire.extend_from_slice(body);
    c.send(wire);
    let reply = c.read_reply();
    assert!(reply.contains("queued as"), "{reply}");

    let mut t = TlsClient::connect(s.addr, &pki.ca_file());
    let r = t.send_message(
        "alice@remote.test",
        " REQUIRETLS",
        &["carol@example.test"],
        "Subject: for TLS only\r\n\r\nsecret\r\n",
    );
    assert!(r.starts_with("250"), "{r}");

    let out = run_retry_fn(&s, "3s");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = primary.wait_for(1, Duration::from_secs(10));
    assert_eq!(got.len(), 1, "only the chunked message goes: {got:?}");
    assert!(got[0].by_bdat);
    assert!(got[0].data.ends_with(body), "byte-exact");
    let lines = &got[0].envelope_lines;
    assert!(
        lines[0].starts_with("MAIL FROM:<alice@remote.test>")
            && lines[0].ends_with(" RET=HDRS ENVID=aws+2B1"),
        "{lines:?}"
    );
    assert_eq!(
        lines[1],
        "RCPT TO:<bob@example.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;bob+40example.test"
    );
    let queue = s.queue();
    assert_eq!(queue.len(), 1, "{queue:?}");
    assert_eq!(queue[0]["tls_request"], "requiretls");
    assert!(
        queue[0]["last_error"]
            .as_str()
            .is_some_and(|e| e.starts_with("REQUIRETLS")),
        "{queue:?}"
    );

    let sent = s.cli(&["tlsrpt", "send", "--now"]);
    let text = String::from_utf8_lossy(&sent.stdout);
    assert!(
        sent.status.success() && text.contains("posted: 1"),
        "{text}{}",
        String::from_utf8_lossy(&sent.stderr)
    );
    let posts = receiver.posts();
    let mut json = String::new();
    flate2::read::GzDecoder::new(&posts[0].body[..])
        .read_to_string(&mut json)
        .unwrap();
    let report: serde_json::Value = serde_json::from_str(&json).unwrap();
    let policy = &report["policies"][0];
    assert_eq!(
        policy["policy"]["policy-domain"], "example.test",
        "{report}"
    );
    assert_eq!(
        policy["failure-details"][0]["result-type"], "starttls-not-supported",
        "{report}"
    );
}
