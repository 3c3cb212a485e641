//! Sender authentication at the edge (issue 32): SPF, DKIM, DMARC and
//! iprev against a real DNS server (hickory on loopback) publishing the
//! records, with DKIM keys made here; `backupmx run` relays to a
//! recording primary, which sees exactly one Authentication-Results of
//! ours.

use std::time::Duration;

use backupmx_tests::dns::{DnsServer, Rec};
use backupmx_tests::sink::Sink;
use backupmx_tests::{free_port, Server};
use mail_auth::common::crypto::Ed25519Key;
use mail_auth::common::headers::HeaderWriter;
use mail_auth::dkim::DkimSigner;

/// A DKIM key for `signed.test` (selector `sel`), and its DNS record.
struct DkimKey {
    pkcs8: Vec<u8>,
}

impl DkimKey {
    fn new() -> DkimKey {
        DkimKey {
            pkcs8: Ed25519Key::generate_pkcs8().expect("key"),
        }
    }

    fn record(&self) -> String {
        use base64::Engine as _;
        let key = Ed25519Key::from_pkcs8_der(&self.pkcs8).expect("key");
        format!(
            "v=DKIM1; k=ed25519; p={}",
            base64::engine::general_purpose::STANDARD.encode(key.public_key())
        )
    }

    /// `message` with a DKIM-Signature of `signed.test` first.
    fn sign(&self, message: &str) -> String {
        let key = Ed25519Key::from_pkcs8_der(&self.pkcs8).expect("key");
        let signature = DkimSigner::from_key(key)
            .domain("signed.test")
            .selector("sel")
            .headers(["From", "To", "Subject", "Date", "Message-ID"])
            .sign(message.as_bytes())
            .expect("sign");
        format!("{}{message}", signature.to_header())
    }
}

/// The zone: `good.test` lets 127.0.0.0/8 send, `forged.test` does not,
/// `signed.test` does not either but signs; all three publish DMARC
/// `p=reject`, `lax.test` publishes `p=quarantine`.
fn zone(dkim: &DkimKey) -> DnsServer {
    DnsServer::start(&[
        ("good.test", Rec::Txt("v=spf1 ip4:127.0.0.0/8 -all".into())),
        ("_dmarc.good.test", Rec::Txt("v=DMARC1; p=reject".into())),
        (
            "forged.test",
            Rec::Txt("v=spf1 ip4:192.0.2.0/24 -all".into()),
        ),
        ("_dmarc.forged.test", Rec::Txt("v=DMARC1; p=reject".into())),
        (
            "signed.test",
            Rec::Txt("v=spf1 ip4:192.0.2.0/24 -all".into()),
        ),
        ("_dmarc.signed.test", Rec::Txt("v=DMARC1; p=reject".into())),
        ("sel._domainkey.signed.test", Rec::Txt(dkim.record())),
        ("lax.test", Rec::Txt("v=spf1 ip4:192.0.2.0/24 -all".into())),
        ("_dmarc.lax.test", Rec::Txt("v=DMARC1; p=quarantine".into())),
    ])
}

/// `backupmx run`: example.test annotates (the default), enforce.test
/// enforces, off.test does not check; all relay to `sink`.
fn server(dns: &DnsServer, sink: &Sink) -> (Server, u16) {
    let metrics = free_port();
    let s = Server::start_run(
        "",
        &format!(
            "{dns}[metrics]\nlisten = \"127.0.0.1:{metrics}\"\n[delivery]\nretry_initial = \"1s\"\n\
             [[domain]]\nname = \"enforce.test\"\nprimary = [\"{sink}\"]\nauth = \"enforce\"\n\
             [[domain]]\nname = \"off.test\"\nprimary = [\"{sink}\"]\nauth = \"off\"\n",
            dns = dns.toml(),
            sink = sink.addr
        ),
        &format!("[\"{}\"]", sink.addr),
    );
    (s, metrics)
}

/// The Prometheus text of the server's `[metrics]` listener.
fn metrics(port: u16) -> String {
    use std::io::{Read, Write};
    let mut http = std::net::TcpStream::connect(("127.0.0.1", port)).expect("metrics");
    http.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("request");
    let mut text = String::new();
    http.read_to_string(&mut text).expect("response");
    text
}

fn message(from: &str, subject: &str) -> String {
    format!(
        "From: <{from}>\r\nTo: <user@example.test>\r\nSubject: {subject}\r\nDate: Mon, 07 Dec 2026 12:00:00 +0000\r\nMessage-ID: <{subject}@remote.test>\r\n\r\nHello.\r\n"
    )
}

/// Sends `body` from `sender` to `rcpt`; the reply to the data.
fn send(s: &Server, sender: &str, rcpt: &str, body: &str) -> String {
    let mut c = s.client();
    c.expect("EHLO client.test", "250");
    c.expect(&format!("MAIL FROM:<{sender}>"), "250");
    c.expect(&format!("RCPT TO:<{rcpt}>"), "250");
    c.expect("DATA", "354");
    c.send(body);
    c.send(".\r\n");
    c.read_reply()
}

/// The one Authentication-Results of ours in `data` (unfolded), after
/// checking it is the first field and the only one naming us.
fn our_results(data: &[u8]) -> String {
    let text = String::from_utf8_lossy(data).to_string();
    assert!(
        text.starts_with("Authentication-Results: mx2.test;"),
        "{text}"
    );
    assert_eq!(
        text.matches("Authentication-Results: mx2.test").count(),
        1,
        "{text}"
    );
    let field = backupmx_tests::skip_field(data, b"Authentication-Results: ");
    let ours = &data[..data.len() - field.len()];
    String::from_utf8_lossy(ours)
        .replace("\r\n\t", " ")
        .trim_end()
        .to_string()
}

#[test]
fn spf_and_dmarc_pass_are_told_in_one_header_and_forged_results_are_removed() {
    let dkim = DkimKey::new();
    let dns = zone(&dkim);
    let sink = Sink::start(0);
    let (s, _) = server(&dns, &sink);
    let body = format!(
        "Authentication-Results: mx2.test; spf=pass smtp.mailfrom=forged\r\n\
         Authentication-Results: mx.elsewhere.test; spf=fail smtp.mailfrom=x@y.test\r\n{}",
        message("alice@good.test", "pass")
    );
    let reply = send(&s, "alice@good.test", "user@example.test", &body);
    assert!(reply.starts_with("250"), "{reply}");
    let got = sink.wait_for(1, Duration::from_secs(30));
    let ours = our_results(&got[0].data);
    assert!(ours.contains("spf=pass"), "{ours}");
    assert!(ours.contains("smtp.mailfrom=alice@good.test"), "{ours}");
    assert!(ours.contains("dkim=none"), "{ours}");
    assert!(ours.contains("dmarc=pass header.from=good.test"), "{ours}");
    assert!(ours.contains("iprev="), "{ours}");
    assert!(ours.contains("policy.iprev=127.0.0.1"), "{ours}");
    let text = String::from_utf8_lossy(&got[0].data);
    assert!(!text.contains("smtp.mailfrom=forged"), "{text}");
    assert!(
        text.contains("Authentication-Results: mx.elsewhere.test; spf=fail"),
        "a third party's results stay: {text}"
    );
    let log = s.log();
    assert!(log.contains("event=\"auth_result\""), "{log}");
    assert!(log.contains("auth_results_removed"), "{log}");
}

#[test]
fn a_dmarc_failure_under_p_reject_is_refused_only_where_the_domain_enforces() {
    let dkim = DkimKey::new();
    let dns = zone(&dkim);
    let sink = Sink::start(0);
    let (s, port) = server(&dns, &sink);
    let forged = message("ceo@forged.test", "wire-money");
    let reply = send(&s, "ceo@forged.test", "user@enforce.test", &forged);
    assert!(reply.starts_with("550 5.7.1"), "{reply}\n{}", s.log());
    assert!(
        reply.contains("DMARC") && reply.contains("forged.test"),
        "{reply}"
    );
    assert!(s.queue().is_empty(), "{:?}", s.queue());
    // Annotated, not refused, where the domain only annotates.
    let reply = send(&s, "ceo@forged.test", "user@example.test", &forged);
    assert!(reply.starts_with("250"), "{reply}");
    // postmaster@ is never refused by it.
    let reply = send(&s, "ceo@forged.test", "postmaster@enforce.test", &forged);
    assert!(reply.starts_with("250"), "{reply}");
    // p=quarantine is accepted under enforce, and annotated.
    let lax = message("x@lax.test", "quarantine");
    let reply = send(&s, "x@lax.test", "user@enforce.test", &lax);
    assert!(reply.starts_with("250"), "{reply}");
    // off.test: no checks, no header.
    let reply = send(&s, "ceo@forged.test", "user@off.test", &forged);
    assert!(reply.starts_with("250"), "{reply}");
    let got = sink.wait_for(4, Duration::from_secs(30));
    let by_rcpt = |rcpt: &str| {
        got.iter()
            .find(|r| r.rcpts.iter().any(|x| x == rcpt))
            .unwrap_or_else(|| panic!("nothing for {rcpt}"))
    };
    let annotated = our_results(&by_rcpt("user@example.test").data);
    assert!(annotated.contains("spf=fail"), "{annotated}");
    assert!(
        annotated.contains("dmarc=fail") && annotated.contains("policy.dmarc=reject"),
        "{annotated}"
    );
    let quarantined = our_results(&by_rcpt("user@enforce.test").data);
    assert!(
        quarantined.contains("dmarc=fail") && quarantined.contains("policy.dmarc=quarantine"),
        "{quarantined}"
    );
    let off = String::from_utf8_lossy(&by_rcpt("user@off.test").data).to_string();
    assert!(!off.contains("Authentication-Results"), "{off}");
    assert!(off.starts_with("Received: "), "{off}");
    let metrics = metrics(port);
    assert!(
        metrics.contains("backupmx_dmarc_rejections_total 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("backupmx_auth_results_total{method=\"spf\",result=\"fail\"} 4"),
        "{metrics}"
    );
}

#[test]
fn a_dkim_signature_passes_dmarc_despite_spf_and_still_verifies_at_the_primary() {
    let dkim = DkimKey::new();
    let dns = zone(&dkim);
    let sink = Sink::start(0);
    let (s, _) = server(&dns, &sink);
    let signed = dkim.sign(&message("news@signed.test", "signed"));
    let reply = send(&s, "news@signed.test", "user@enforce.test", &signed);
    assert!(reply.starts_with("250"), "{reply}");
    let got = sink.wait_for(1, Duration::from_secs(30));
    let ours = our_results(&got[0].data);
    assert!(ours.contains("spf=fail"), "{ours}");
    assert!(ours.contains("dkim=pass"), "{ours}");
    assert!(ours.contains("header.d=signed.test"), "{ours}");
    assert!(ours.contains("header.s=sel"), "{ours}");
    assert!(
        ours.contains("dmarc=pass header.from=signed.test"),
        "{ours}"
    );
    // The primary verifies the same signature on what it got from us.
    let primary_dns =
        relay_core::dns::HickoryResolver::new(&[dns.addr], Duration::from_secs(2)).expect("dns");
    let verifier = primary_dns.authenticator();
    let data = got[0].data.clone();
    let results = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(async move {
            let message = mail_auth::AuthenticatedMessage::parse(&data).expect("message");
            verifier
                .verify_dkim(&message)
                .await
                .iter()
                .map(|o| o.result().clone())
                .collect::<Vec<_>>()
        });
    assert_eq!(results, vec![mail_auth::DkimResult::Pass]);
}

#[test]
fn a_big_signed_message_is_verified_from_its_spool_file_and_relayed_intact() {
    let dkim = DkimKey::new();
    let dns = zone(&dkim);
    let sink = Sink::start(0);
    let (s, _) = server(&dns, &sink);
    // 2 MiB of body: spilled to a spool file while it arrives (512 KiB).
    let line = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789\r\n";
    let body = line.repeat(2 * 1024 * 1024 / line.len());
    let plain = message("news@signed.test", "big").replace("Hello.\r\n", &body);
    let signed = dkim.sign(&plain);
    let reply = send(&s, "news@signed.test", "user@enforce.test", &signed);
    assert!(reply.starts_with("250"), "{reply}");
    let got = sink.wait_for(1, Duration::from_secs(60));
    let ours = our_results(&got[0].data);
    assert!(ours.contains("dkim=pass"), "{ours}");
    assert!(ours.contains("dmarc=pass"), "{ours}");
    // Below our two trace fields, the message is the one that was sent.
    assert_eq!(
        backupmx_tests::after_received(&got[0].data),
        signed.as_bytes(),
        "relayed byte for byte"
    );
}

#[test]
fn dns_that_does_not_answer_is_a_temperror_and_never_a_refusal() {
    let dkim = DkimKey::new();
    let dns = zone(&dkim);
    let sink = Sink::start(0);
    let (s, _) = server(&dns, &sink);
    let reply = send(
        &s,
        "x@timeout.test",
        "user@enforce.test",
        &message("x@timeout.test", "slow-dns"),
    );
    assert!(reply.starts_with("250"), "{reply}");
    let got = sink.wait_for(1, Duration::from_secs(60));
    let ours = our_results(&got[0].data);
    assert!(ours.contains("spf=temperror"), "{ours}");
    assert!(ours.contains("dmarc=temperror"), "{ours}");
}

#[test]
fn the_aws_ingest_annotates_and_enforces_and_domain_set_switches_it() {
    let dkim = DkimKey::new();
    let dns = zone(&dkim);
    let Some(s) = Server::start_aws(
        "",
        &format!(
            "{}[[domain]]\nname = \"enforce.test\"\nauth = \"enforce\"\n",
            dns.toml()
        ),
        "",
        false,
    ) else {
        return;
    };
    let forged = message("ceo@forged.test", "aws-forged");
    let reply = send(&s, "ceo@forged.test", "user@enforce.test", &forged);
    assert!(reply.starts_with("550 5.7.1"), "{reply}");
    assert!(s.queue().is_empty(), "{:?}", s.queue());
    let reply = send(
        &s,
        "alice@good.test",
        "user@example.test",
        &message("alice@good.test", "aws-good"),
    );
    assert!(reply.starts_with("250"), "{reply}");
    let id = backupmx_tests::queue_id(&reply);
    let ours = our_results(&s.raw(&id));
    assert!(ours.contains("spf=pass"), "{ours}");
    assert!(ours.contains("dmarc=pass header.from=good.test"), "{ours}");
    // The domain record in DynamoDB carries the switch.
    let out = s.cli(&["domain", "set", "example.test", "--auth", "enforce"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let show = s.cli(&["domain", "show", "example.test", "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&show.stdout).expect("JSON");
    assert_eq!(json["auth"], "enforce", "{json}");
    let reply =
        backupmx_tests::eventually(Duration::from_secs(30), "the new policy applied", || {
            let reply = send(&s, "ceo@forged.test", "user@example.test", &forged);
            (!reply.starts_with("250")).then_some(reply)
        });
    assert!(reply.starts_with("550 5.7.1"), "{reply}");
    let out = s.cli(&["domain", "set", "example.test", "--auth", "off"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let show = s.cli(&["domain", "show", "example.test"]);
    assert!(String::from_utf8_lossy(&show.stdout).contains("auth: off"));
}
