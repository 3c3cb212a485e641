//! A domain's TLS policy for the hop to its primary: `required` and
//! `verified` never fall back to plaintext or to a certificate that does
//! not verify; the mail waits with a clear last error and goes once the
//! primary is fixed. The primaries are real `backupmx ingest` processes,
//! with and without STARTTLS, with certificates from a test CA.

use std::path::Path;
use std::time::Duration;

use backupmx_tests::pki::Pki;
use backupmx_tests::smtp_tls::TlsClient;
use backupmx_tests::*;

const WAIT: Duration = Duration::from_secs(30);

/// A primary: `backupmx ingest` hosting example.test, with `tls` (a
/// `[tls]` section, or empty for no STARTTLS).
fn primary(tls: &str) -> Server {
    Server::start("", tls)
}

/// Gives the primary another `[tls]` section (or none) and restarts it
/// on the same port.
fn reconfigure(p: &mut Server, tls: &str) {
    let text = std::fs::read_to_string(&p.config_path).expect("config");
    let base = match text.find("[tls]") {
        Some(i) => {
            // The section is cert and key lines; everything after them stays.
            let rest: Vec<&str> = text[i..].lines().skip(3).collect();
            format!("{}{}", &text[..i], rest.join("\n"))
        }
        None => text,
    };
    std::fs::write(&p.config_path, format!("{base}\n{tls}")).expect("config");
    p.restart();
}

fn backup(primary: &Server, policy: &str, ca: &Path) -> Server {
    let s = Server::start_run(
        "",
        &format!(
            "tls = \"{policy}\"\n[delivery]\ntls_ca_file = \"{}\"\nretry_initial = \"1h\"\nretry_max = \"2h\"\n",
            ca.display()
        ),
        &format!("[\"{}\"]", primary.addr),
    );
    let shown = succeeded(&s.cli(&["domain", "show", "example.test"]));
    assert!(shown.contains(&format!("tls: {policy}")), "{shown}");
    s
}

fn send(s: &Server) {
    let mut c = s.client();
    let reply = c.send_message(
        "alice@remote.test",
        &["bob@example.test"],
        "Subject: policy\r\n\r\nhello\r\n",
    );
    assert!(reply.starts_with("250"), "{reply}");
}

/// The one queued message's last error, once it has been attempted.
fn last_error(s: &Server) -> String {
    eventually(WAIT, "an attempted message", || {
        let q = s.queue();
        q.first()
            .filter(|e| e["attempts"].as_u64() >= Some(1))
            .and_then(|e| e["last_error"].as_str().map(str::to_string))
    })
}

fn delivered(backup: &Server, primary: &Server) {
    eventually(WAIT, "the message at the primary", || {
        (primary.queue().len() == 1).then_some(())
    });
    eventually(WAIT, "an empty backup queue", || {
        backup.queue().is_empty().then_some(())
    });
}

#[test]
fn required_never_sends_in_the_clear_and_delivers_once_starttls_works() {
    let pki = Pki::new();
    let mut p = primary("");
    let s = backup(&p, "required", &pki.ca_file());
    send(&s);
    let error = last_error(&s);
    assert!(
        error.contains("TLS required by policy, but the server does not offer STARTTLS"),
        "{error}"
    );
    std::thread::sleep(Duration::from_secs(1));
    assert!(p.queue().is_empty(), "mail went in the clear");
    assert!(s.log().contains("tls_policy_failed"), "{}", s.log());
    // Not a down primary: no probe storm, the message waits for its retry.
    assert!(!s.log().contains("destination_down"), "{}", s.log());

    // The primary gets STARTTLS (a self-signed certificate is enough for
    // `required`); a flush sends the mail.
    let self_signed = pki.tls_section("self", &["elsewhere.test"], false);
    reconfigure(&mut p, &self_signed);
    succeeded(&s.cli(&["queue", "flush"]));
    delivered(&s, &p);
    let metrics = s.log();
    assert!(!metrics.contains("tls_fallback_plaintext"), "{metrics}");
}

#[test]
fn verified_refuses_a_certificate_not_valid_for_the_primary_and_delivers_once_it_is() {
    let pki = Pki::new();
    // Signed by the trusted CA, but for another name.
    let wrong_name = pki.tls_section("wrong", &["other.test"], true);
    let mut p = primary(&wrong_name);
    let s = backup(&p, "verified", &pki.ca_file());
    send(&s);
    let error = last_error(&s);
    assert!(
        error.starts_with("TLS required by policy, handshake failed: invalid peer certificate"),
        "{error}"
    );
    std::thread::sleep(Duration::from_secs(1));
    assert!(p.queue().is_empty());

    // Valid for its name (the address the domain names), but self-signed.
    let untrusted = pki.tls_section("untrusted", &["127.0.0.1"], false);
    reconfigure(&mut p, &untrusted);
    succeeded(&s.cli(&["queue", "flush"]));
    eventually(WAIT, "a second failed attempt", || {
        let q = s.queue();
        let e = q.first()?;
        (e["attempts"].as_u64() >= Some(2)).then(|| e["last_error"].clone())
    });
    let error = last_error(&s);
    assert!(error.contains("invalid peer certificate"), "{error}");
    assert!(p.queue().is_empty());

    // Fixed: the CA's certificate for the primary's address.
    let good = pki.tls_section("good", &["127.0.0.1"], true);
    reconfigure(&mut p, &good);
    succeeded(&s.cli(&["queue", "flush"]));
    delivered(&s, &p);
}

#[test]
fn opportunistic_delivers_in_the_clear_and_switching_policy_applies_to_queued_mail() {
    let pki = Pki::new();
    let p = primary("");
    let s = backup(&p, "opportunistic", &pki.ca_file());
    send(&s);
    delivered(&s, &p);

    // The same primary, the domain now `verified`: the next message waits.
    succeeded(&s.cli(&["domain", "set", "example.test", "--tls", "verified"]));
    send(&s);
    let error = last_error(&s);
    assert!(error.contains("does not offer STARTTLS"), "{error}");
    // And back: it goes.
    succeeded(&s.cli(&["domain", "set", "example.test", "--tls", "opportunistic"]));
    succeeded(&s.cli(&["queue", "flush"]));
    eventually(WAIT, "two messages at the primary", || {
        (p.queue().len() == 2).then_some(())
    });
    let bad = s.cli(&["domain", "set", "example.test", "--tls", "sometimes"]);
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("expected opportunistic, required or verified"),
        "{err}"
    );
}

/// Recipient callouts follow the domain's TLS policy as its mail does:
/// under `verified` the primary is asked only over TLS with a certificate
/// that verifies, and no recipient crosses the wire in the clear. A
/// primary that cannot meet the policy is not asked (the recipient is
/// taken, as for any callout that cannot conclude).
#[test]
fn callouts_ask_the_primary_only_under_the_domains_tls_policy() {
    let pki = Pki::new();
    let mut p = primary("recipients = [\"alice@example.test\"]\n");
    // Between the backup and the primary: what an eavesdropper sees.
    let wire = TcpProxy::start(p.addr);
    let s = Server::start_run(
        "",
        &format!(
            "tls = \"opportunistic\"\nrecipient_verify = \"callout\"\n[delivery]\ntls_ca_file = \"{}\"\n[recipient_verify]\ntimeout = \"10s\"\n",
            pki.ca_file().display()
        ),
        &format!("[\"{}\"]", wire.addr),
    );
    let in_the_clear = |what: &str| String::from_utf8_lossy(&wire.client_bytes()).contains(what);

    // Opportunistic, and no STARTTLS at the primary: asked in the clear.
    let r = s.rcpt_reply("ghost0@example.test");
    assert!(r.starts_with("550 5.1.1"), "{r}");
    assert!(in_the_clear("RCPT TO:<ghost0@example.test>"));
    // Raised to `verified`: the connection kept from that callout is not
    // used again, and the primary is not asked.
    succeeded(&s.cli(&["domain", "set", "example.test", "--tls", "verified"]));
    let r = s.rcpt_reply("ghost@example.test");
    assert!(r.starts_with("250"), "{r}");
    let log = s.log();
    assert!(
        log.contains("not asked: the domain's TLS policy cannot be met")
            && log.contains("does not offer STARTTLS"),
        "{log}"
    );

    // A certificate from the trusted CA, for another name: not asked.
    let wrong_name = pki.tls_section("wrong", &["other.test"], true);
    reconfigure(&mut p, &wrong_name);
    let r = s.rcpt_reply("ghost@example.test");
    assert!(r.starts_with("250"), "{r}");
    assert!(s.log().contains("invalid peer certificate"), "{}", s.log());
    assert!(in_the_clear("EHLO mx2.test"), "the proxy saw the callouts");
    assert!(!in_the_clear("ghost@"), "a callout asked in the clear");

    // A certificate that verifies: the primary is asked, over TLS.
    let good = pki.tls_section("good", &["127.0.0.1"], true);
    reconfigure(&mut p, &good);
    let r = s.rcpt_reply("ghost@example.test");
    assert!(r.starts_with("550 5.1.1"), "{r}");
    let r = s.rcpt_reply("alice@example.test");
    assert!(r.starts_with("250"), "{r}");
    assert!(in_the_clear("STARTTLS"));
    assert!(!in_the_clear("ghost@"), "a callout asked in the clear");
    let cache = succeeded(&s.cli(&["recipients", "list", "example.test"]));
    assert!(cache.contains("ghost@example.test"), "{cache}");
}

mod mta_sts {
    //! MTA-STS (RFC 8461) for MX-routed delivery: the policy is fetched
    //! over HTTPS from a server with a test-CA certificate, found through
    //! a real DNS server (MX, A, the `_mta-sts` TXT record).

    use super::*;
    use backupmx_tests::dns::{DnsServer, Rec};
    use backupmx_tests::https::PolicyServer;

    struct Setup {
        pki: Pki,
        primary: Server,
        policy: PolicyServer,
        _dns: DnsServer,
        backup: Server,
    }

    fn policy_text(mode: &str, mx: &str, max_age: u64) -> String {
        format!("version: STSv1\nmode: {mode}\nmx: {mx}\nmax_age: {max_age}\n")
    }

    /// example.test's MX is mx.example.test (the primary); its policy is
    /// `policy`; the primary has `primary_tls`.
    fn setup(policy: &str, primary_tls: impl FnOnce(&Pki) -> String) -> Setup {
        let pki = Pki::new();
        let primary = Server::start("", &primary_tls(&pki));
        let (cert, key) = pki.issue(&["mta-sts.example.test"], true);
        let policy = PolicyServer::start(&cert, &key, policy);
        let dns = DnsServer::start(&[
            ("example.test", Rec::Mx(10, "mx.example.test")),
            ("mx.example.test", Rec::A("127.0.0.1")),
            ("mta-sts.example.test", Rec::A("127.0.0.1")),
            (
                "_mta-sts.example.test",
                Rec::Txt("v=STSv1; id=2026113001;".into()),
            ),
        ]);
        let backup = Server::start_run(
            "",
            &format!(
                "[delivery]\nmx_port = {}\nmta_sts_port = {}\ntls_ca_file = \"{}\"\nretry_initial = \"1h\"\nretry_max = \"2h\"\n{}",
                primary.addr.port(),
                policy.addr.port(),
                pki.ca_file().display(),
                dns.toml()
            ),
            "",
        );
        Setup {
            pki,
            primary,
            policy,
            _dns: dns,
            backup,
        }
    }

    #[test]
    fn enforce_sends_only_over_verified_tls_and_delivers_once_the_primary_has_it() {
        let mut t = setup(&policy_text("enforce", "mx.example.test", 86_400), |_| {
            String::new()
        });
        send(&t.backup);
        let error = last_error(&t.backup);
        assert!(
            error.contains("TLS required by policy, but the server does not offer STARTTLS"),
            "{error}"
        );
        std::thread::sleep(Duration::from_secs(1));
        assert!(t.primary.queue().is_empty(), "mail went in the clear");
        let log = t.backup.log();
        assert!(log.contains("mta_sts_policy"), "{log}");
        assert!(
            log.contains("policy=mta-sts") || log.contains("policy=\"mta-sts\""),
            "{log}"
        );

        // A self-signed certificate is not enough under enforce…
        let self_signed = t.pki.tls_section("self", &["mx.example.test"], false);
        reconfigure(&mut t.primary, &self_signed);
        succeeded(&t.backup.cli(&["queue", "flush"]));
        eventually(WAIT, "a second failed attempt", || {
            let q = t.backup.queue();
            (q.first()?["attempts"].as_u64() >= Some(2)).then_some(())
        });
        assert!(last_error(&t.backup).contains("invalid peer certificate"));
        assert!(t.primary.queue().is_empty());
        // …one from the trusted CA for the MX host's name is.
        let good = t.pki.tls_section("good", &["mx.example.test"], true);
        reconfigure(&mut t.primary, &good);
        succeeded(&t.backup.cli(&["queue", "flush"]));
        delivered(&t.backup, &t.primary);
        // Fetched once: the TXT id did not change, the policy is cached.
        assert_eq!(t.policy.fetches(), 1);
    }

    #[test]
    fn enforce_with_no_listed_mx_waits_and_a_corrected_policy_releases_it() {
        let t = setup(&policy_text("enforce", "other.example.test", 1), |pki| {
            pki.tls_section("good", &["mx.example.test"], true)
        });
        send(&t.backup);
        let error = last_error(&t.backup);
        assert!(
            error.contains("MTA-STS policy of example.test (enforce) lists none of its MX hosts"),
            "{error}"
        );
        std::thread::sleep(Duration::from_secs(1));
        assert!(t.primary.queue().is_empty());
        // The domain fixes its policy (max_age 1 s: the cache lets go).
        t.policy
            .set_policy(&policy_text("enforce", "*.example.test", 86_400));
        std::thread::sleep(Duration::from_secs(2));
        succeeded(&t.backup.cli(&["queue", "flush"]));
        delivered(&t.backup, &t.primary);
        assert!(t.policy.fetches() >= 2);
    }

    #[test]
    fn testing_mode_delivers_in_the_clear_and_reports_it() {
        let t = setup(&policy_text("testing", "mx.example.test", 86_400), |_| {
            String::new()
        });
        send(&t.backup);
        delivered(&t.backup, &t.primary);
        let log = t.backup.log();
        assert!(log.contains("mta_sts_testing_failure"), "{log}");
    }
}

mod dane {
    //! DANE (RFC 7672): TLSA records in a DNSSEC-signed zone served by a
    //! real DNS server, validated by backupmx from the zone's key as its
    //! trust anchor.

    use super::*;
    use backupmx_tests::dns::{DnsServer, Rec, Signing, ZoneKey};
    use rustls::pki_types::pem::PemObject;

    /// What the TLSA record at the primary's MX host says.
    enum Tlsa {
        /// DANE-EE, SHA-256 of the primary's public key.
        Matching,
        /// DANE-EE, a digest of some other key.
        Mismatching,
        /// Matching, but the zone is changed after signing (bogus).
        Bogus,
        /// No TLSA record (a signed denial).
        None,
        /// DANE-TA: SHA-256 of the CA certificate the primary sends in its
        /// chain, with a leaf for `name`.
        TrustAnchor(&'static str),
    }

    struct Setup {
        _dns: DnsServer,
        primary: Server,
        backup: Server,
    }

    fn setup(tlsa: Tlsa, primary_tls: bool) -> Setup {
        let pki = Pki::new();
        // DANE-EE: self-signed, for another name: the key itself is
        // authenticated, not names or issuers. DANE-TA: the CA's leaf and
        // the CA certificate in the chain.
        let (cert_pem, key_pem, chain_pem) = match tlsa {
            Tlsa::TrustAnchor(name) => {
                let (leaf, key) = pki.issue(&[name], true);
                let ca = std::fs::read_to_string(pki.ca_file()).expect("CA");
                let chain = format!("{leaf}{ca}");
                (leaf, key, chain)
            }
            _ => {
                let (leaf, key) = pki.issue(&["somewhere-else.test"], false);
                (leaf.clone(), key, leaf)
            }
        };
        let cert = rustls::pki_types::CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .expect("certificate");
        let spki = relay_core::dane::subject_public_key_info(&cert).expect("SPKI");
        let digest = ring::digest::digest(&ring::digest::SHA256, spki)
            .as_ref()
            .to_vec();
        let tls = if primary_tls {
            let dir = tempfile::tempdir().expect("dir").keep();
            std::fs::write(dir.join("c.pem"), &chain_pem).expect("cert");
            std::fs::write(dir.join("k.pem"), &key_pem).expect("key");
            format!(
                "[tls]\ncert = \"{}\"\nkey = \"{}\"\n",
                dir.join("c.pem").display(),
                dir.join("k.pem").display()
            )
        } else {
            String::new()
        };
        let primary = primary(&tls);
        let key = ZoneKey::new();
        let mut records = vec![
            ("example.test", Rec::Mx(10, "mx.example.test")),
            ("mx.example.test", Rec::A("127.0.0.1")),
            // hickory-server proves a name absent with the NSEC of its
            // parent as the wildcard proof, so the parent of the TLSA name
            // must exist for "no TLSA" to validate (a real signer sends
            // the closest encloser's).
            (
                "_tcp.mx.example.test",
                Rec::Txt("parent of the TLSA name".into()),
            ),
        ];
        let mut tampered = Vec::new();
        match tlsa {
            Tlsa::Matching => {
                records.push(("_25._tcp.mx.example.test", Rec::Tlsa(3, 1, 1, digest)))
            }
            Tlsa::Mismatching => records.push((
                "_25._tcp.mx.example.test",
                Rec::Tlsa(3, 1, 1, vec![0x5a; 32]),
            )),
            Tlsa::Bogus => {
                records.push((
                    "_25._tcp.mx.example.test",
                    Rec::Tlsa(3, 1, 1, digest.clone()),
                ));
                tampered.push((
                    "_25._tcp.mx.example.test",
                    Rec::Tlsa(3, 1, 1, vec![0x11; 32]),
                ));
            }
            Tlsa::None => {}
            Tlsa::TrustAnchor(_) => {
                let ca_pem = std::fs::read_to_string(pki.ca_file()).expect("CA");
                let ca = rustls::pki_types::CertificateDer::from_pem_slice(ca_pem.as_bytes())
                    .expect("CA certificate");
                let ca_digest = ring::digest::digest(&ring::digest::SHA256, &ca)
                    .as_ref()
                    .to_vec();
                records.push(("_25._tcp.mx.example.test", Rec::Tlsa(2, 0, 1, ca_digest)));
            }
        }
        let dns = DnsServer::start_signed(
            &records,
            Signing {
                key: &key,
                tampered,
            },
        );
        let backup = Server::start_run(
            "",
            &format!(
                "[delivery]\ndane = true\nmta_sts = false\nmx_port = {}\nretry_initial = \"1h\"\nretry_max = \"2h\"\n[dns]\nservers = [\"{}\"]\ntimeout = \"2s\"\ndnssec_trust_anchors = [\"{}\"]\n",
                primary.addr.port(),
                dns.addr,
                key.anchor()
            ),
            "",
        );
        Setup {
            _dns: dns,
            primary,
            backup,
        }
    }

    #[test]
    fn a_matching_tlsa_record_authenticates_the_primary() {
        let t = setup(Tlsa::Matching, true);
        send(&t.backup);
        delivered(&t.backup, &t.primary);
        let log = t.backup.log();
        assert!(log.contains("dane_tlsa"), "{log}");
    }

    #[test]
    fn a_trust_anchor_record_authenticates_a_chain_for_the_primary_s_name() {
        let t = setup(Tlsa::TrustAnchor("mx.example.test"), true);
        send(&t.backup);
        delivered(&t.backup, &t.primary);
        // The same anchor, a leaf for another name: refused.
        let t = setup(Tlsa::TrustAnchor("other.example.test"), true);
        send(&t.backup);
        let error = last_error(&t.backup);
        assert!(
            error.contains("no TLSA record matches the certificate (DANE)"),
            "{error}"
        );
    }

    #[test]
    fn a_mismatching_tlsa_record_keeps_the_mail() {
        let t = setup(Tlsa::Mismatching, true);
        send(&t.backup);
        let error = last_error(&t.backup);
        assert!(
            error.contains("no TLSA record matches the certificate (DANE)"),
            "{error}"
        );
        std::thread::sleep(Duration::from_secs(1));
        assert!(t.primary.queue().is_empty());
        assert!(
            t.backup.log().contains("policy=dane") || t.backup.log().contains("policy=\"dane\"")
        );
    }

    #[test]
    fn tlsa_makes_tls_mandatory() {
        let t = setup(Tlsa::Matching, false);
        send(&t.backup);
        let error = last_error(&t.backup);
        assert!(error.contains("does not offer STARTTLS"), "{error}");
        std::thread::sleep(Duration::from_secs(1));
        assert!(t.primary.queue().is_empty());
    }

    #[test]
    fn a_bogus_answer_keeps_the_mail() {
        let t = setup(Tlsa::Bogus, true);
        send(&t.backup);
        let error = last_error(&t.backup);
        assert!(
            error.starts_with("DANE: TLSA records at _25._tcp.mx.example.test do not validate"),
            "{error}"
        );
        std::thread::sleep(Duration::from_secs(1));
        assert!(t.primary.queue().is_empty());
    }

    #[test]
    fn without_tlsa_records_delivery_is_as_usual() {
        let t = setup(Tlsa::None, false);
        send(&t.backup);
        delivered(&t.backup, &t.primary);
    }
}

/// The backup for REQUIRETLS tests: `policy` towards `primary`, and a
/// certificate of its own so that senders can protect their sessions.
fn requiretls_backup(primary: std::net::SocketAddr, policy: &str, pki: &Pki) -> Server {
    Server::start_run(
        "",
        &format!(
            "tls = \"{policy}\"\n[delivery]\ntls_ca_file = \"{}\"\nretry_initial = \"1h\"\nretry_max = \"2h\"\n{}",
            pki.ca_file().display(),
            pki.tls_section("backup", &["127.0.0.1"], true)
        ),
        &format!("[\"{primary}\"]"),
    )
}

/// Sends a REQUIRETLS message over a protected session.
fn send_requiretls(s: &Server, pki: &Pki) {
    let mut t = TlsClient::connect(s.addr, &pki.ca_file());
    assert!(t.ehlo.contains("REQUIRETLS"), "{}", t.ehlo);
    let r = t.send_message(
        "alice@remote.test",
        " REQUIRETLS",
        &["bob@example.test"],
        "Subject: secret\r\n\r\nfor TLS only\r\n",
    );
    assert!(r.starts_with("250"), "{r}");
}

/// RFC 8689: REQUIRETLS is offered only under TLS; such a message never
/// goes over a hop whose TLS is not verified (it waits, with the reason,
/// and the primary is not taken for down), and goes with the parameter
/// once the domain's TLS is `verified`.
#[test]
fn requiretls_mail_waits_for_verified_tls_and_goes_with_the_parameter() {
    let pki = Pki::new();
    let p = primary(&pki.tls_section("good", &["127.0.0.1"], true));
    let s = requiretls_backup(p.addr, "opportunistic", &pki);
    let mut c = s.client();
    let ehlo = c.cmd("EHLO client.test");
    assert!(
        ehlo.contains("STARTTLS") && !ehlo.contains("REQUIRETLS"),
        "{ehlo}"
    );
    c.expect("MAIL FROM:<alice@remote.test> REQUIRETLS", "530 5.7.10");

    send_requiretls(&s, &pki);
    let error = last_error(&s);
    assert!(error.starts_with("REQUIRETLS: no TLS verified"), "{error}");
    assert_eq!(s.queue()[0]["tls_request"], "requiretls");
    std::thread::sleep(Duration::from_secs(1));
    assert!(p.queue().is_empty(), "sent without verified TLS");
    assert!(!s.log().contains("destination_down"), "{}", s.log());

    succeeded(&s.cli(&["domain", "set", "example.test", "--tls", "verified"]));
    succeeded(&s.cli(&["queue", "flush"]));
    delivered(&s, &p);
    // The primary (a backupmx too) got MAIL FROM with REQUIRETLS.
    assert_eq!(p.queue()[0]["tls_request"], "requiretls");
}

/// RFC 8689 §5: to a primary with a verified certificate that does not
/// offer REQUIRETLS (Debian's Postfix 3.7), the message is not sent: it
/// comes back with 5.7.10, the notice without the body.
#[test]
fn requiretls_mail_to_a_primary_without_requiretls_comes_back_with_5_7_10() {
    use backupmx_tests::postfix::{Postfix, PostfixOptions};
    let pki = Pki::new();
    let keys = tempfile::tempdir().expect("tempdir");
    let (cert, key) = pki.issue(&["127.0.0.1"], true);
    std::fs::write(keys.path().join("cert.pem"), cert).expect("cert");
    std::fs::write(keys.path().join("key.pem"), key).expect("key");
    make_keys_readable(keys.path());
    let port = free_port();
    let mut postfix = Postfix::new(
        port,
        &PostfixOptions {
            domains: vec!["example.test".into()],
            tls: Some((keys.path().join("cert.pem"), keys.path().join("key.pem"))),
            ..PostfixOptions::default()
        },
    );
    postfix.start();
    let s = requiretls_backup(
        std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        "verified",
        &pki,
    );
    send_requiretls(&s, &pki);
    let notice = eventually(WAIT, "the notice queued", || {
        s.queue().into_iter().find(|e| e["sender"] == "")
    });
    assert_eq!(notice["tls_request"], "requiretls", "{notice}");
    let text = String::from_utf8_lossy(&s.raw(notice["id"].as_str().unwrap())).to_string();
    assert!(text.contains("Status: 5.7.10"), "{text}");
    assert!(text.contains("Subject: secret"), "{text}");
    assert!(!text.contains("for TLS only"), "{text}");
    assert!(postfix.maildir().is_empty());
    // It got as far as a TLS session and Postfix's EHLO, and no MAIL.
    let log = postfix.log();
    let sessions: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("disconnect from") && l.contains(" ehlo="))
        .collect();
    assert!(
        !sessions.is_empty()
            && sessions
                .iter()
                .all(|l| l.contains(" starttls=1") && !l.contains(" mail=")),
        "{log}"
    );
}

/// RFC 8689 §4.2.1: a message whose header says `TLS-Required: No` waives
/// the domain's TLS policy (and MTA-STS and DANE): it goes to a primary
/// without STARTTLS that the policy would refuse, while other mail waits.
#[test]
fn tls_required_no_waives_the_domains_tls_policy() {
    let pki = Pki::new();
    let p = primary("");
    let s = backup(&p, "verified", &pki.ca_file());
    let mut c = s.client();
    let reply = c.send_message(
        "alice@remote.test",
        &["bob@example.test"],
        "Subject: newsletter\r\nTLS-Required: No\r\n\r\nnot secret\r\n",
    );
    assert!(reply.starts_with("250"), "{reply}");
    delivered(&s, &p);
    send(&s);
    let error = last_error(&s);
    assert!(error.contains("does not offer STARTTLS"), "{error}");
    assert_eq!(p.queue().len(), 1);
}

/// RFC 8460: with `[tlsrpt] enabled`, our sessions to a primary are
/// counted per day (one with STARTTLS, one where the primary no longer
/// offers it), and `tlsrpt send --now` sends the domain's report to both
/// the `https:` and the `mailto:` rua its `_smtp._tls` record names, once.
#[test]
fn tls_reports_go_to_the_https_and_mailto_rua_of_the_primary_domain() {
    use backupmx_tests::dns::{DnsServer, Rec};
    use backupmx_tests::https::PostReceiver;
    use backupmx_tests::sink::Sink;
    use std::io::Read;

    let pki = Pki::new();
    let (cert, key) = pki.issue(&["127.0.0.1"], true);
    let receiver = PostReceiver::start(&cert, &key);
    let reports_mx = Sink::start(0);
    let record = format!(
        "v=TLSRPTv1; rua=https://127.0.0.1:{}/v1/tlsrpt,mailto:tls@reports.test",
        receiver.addr.port()
    );
    let dns = DnsServer::start(&[("_smtp._tls.example.test", Rec::Txt(record))]);
    let mut p = primary(&pki.tls_section("good", &["127.0.0.1"], true));
    let s = Server::start_run(
        "",
        &format!(
            "tls = \"opportunistic\"\n[delivery]\ntls_ca_file = \"{}\"\nroutes = {{ \"reports.test\" = \"{}\" }}\n[dns]\nservers = [\"{}\"]\ntimeout = \"2s\"\n[tlsrpt]\nenabled = true\norganization = \"Backup Test\"\n",
            pki.ca_file().display(),
            reports_mx.addr,
            dns.addr
        ),
        &format!("[\"{}\"]", p.addr),
    );
    send(&s);
    delivered(&s, &p);
    // The primary loses its certificate: in the clear, and counted so.
    reconfigure(&mut p, "");
    send(&s);
    eventually(WAIT, "the second message at the primary", || {
        (p.queue().len() == 2).then_some(())
    });

    let out = succeeded(&s.cli(&["tlsrpt", "send", "--now"]));
    assert!(
        out.contains("reports: 1, posted: 1, mailed: 1, failed: 0"),
        "{out}"
    );
    let posts = receiver.posts();
    assert_eq!(posts.len(), 1);
    assert_eq!(posts[0].path, "/v1/tlsrpt");
    assert_eq!(posts[0].content_type, "application/tlsrpt+gzip");
    let mut json = String::new();
    flate2::read::GzDecoder::new(&posts[0].body[..])
        .read_to_string(&mut json)
        .expect("gzip");
    let report: serde_json::Value = serde_json::from_str(&json).expect("JSON");
    // RFC 8460 §4.4's fields.
    assert_eq!(report["organization-name"], "Backup Test");
    assert!(report["contact-info"]
        .as_str()
        .unwrap()
        .starts_with("postmaster@"));
    assert!(report["report-id"]
        .as_str()
        .unwrap()
        .contains(".example.test@"));
    for key in ["start-datetime", "end-datetime"] {
        let t = report["date-range"][key].as_str().unwrap();
        assert!(t.ends_with('Z') && t.len() == 20, "{t}");
    }
    let policies = report["policies"].as_array().unwrap();
    assert_eq!(policies.len(), 1, "{report}");
    let policy = &policies[0];
    assert_eq!(policy["policy"]["policy-type"], "no-policy-found");
    assert_eq!(policy["policy"]["policy-domain"], "example.test");
    assert_eq!(
        policy["summary"]["total-successful-session-count"], 1,
        "{report}"
    );
    assert_eq!(
        policy["summary"]["total-failure-session-count"], 1,
        "{report}"
    );
    let failure = &policy["failure-details"][0];
    assert_eq!(failure["result-type"], "starttls-not-supported");
    assert_eq!(failure["receiving-ip"], "127.0.0.1");
    assert_eq!(failure["failed-session-count"], 1);

    // The same report by mail, through our own queue, to the rua's MX.
    let mail = reports_mx.wait_for(1, WAIT);
    assert_eq!(mail[0].rcpts, ["tls@reports.test"]);
    assert_eq!(mail[0].mail_from, "");
    let text = String::from_utf8_lossy(&mail[0].data).to_string();
    for needle in [
        "TLS-Report-Domain: example.test\r\n",
        "Content-Type: multipart/report; report-type=\"tlsrpt\"",
        "Content-Type: application/tlsrpt+gzip\r\n",
    ] {
        assert!(text.contains(needle), "{needle} in {text}");
    }
    let attachment: String = text
        .split("Content-Transfer-Encoding: base64\r\n")
        .nth(1)
        .and_then(|rest| rest.split("\r\n\r\n").nth(1))
        .and_then(|b64| b64.split("--").next())
        .unwrap()
        .split_whitespace()
        .collect();
    use base64::Engine as _;
    let gz = base64::engine::general_purpose::STANDARD
        .decode(attachment)
        .unwrap();
    let mut mailed = String::new();
    flate2::read::GzDecoder::new(&gz[..])
        .read_to_string(&mut mailed)
        .unwrap();
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&mailed).unwrap(),
        report
    );

    // Sent once: the day's report is taken.
    let again = succeeded(&s.cli(&["tlsrpt", "send", "--now"]));
    assert!(again.contains("reports: 0"), "{again}");
    assert_eq!(receiver.posts().len(), 1);
}
