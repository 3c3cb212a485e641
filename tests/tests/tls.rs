//! End-to-end: STARTTLS with a generated certificate, and the command
//! injection defence (RFC 3207 §5 / CVE-2011-0411).

use std::io::{BufRead, BufReader, Read, Write};
use std::sync::Arc;
use std::time::Duration;

use backupmx_tests::*;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

struct Pki {
    cert_der: CertificateDer<'static>,
    toml: String,
}

fn pki(dir: &std::path::Path) -> Pki {
    let toml = self_signed_tls(dir);
    let pem = std::fs::read(dir.join("cert.pem")).unwrap();
    let cert_der = CertificateDer::pem_slice_iter(&pem)
        .next()
        .unwrap()
        .unwrap();
    Pki { cert_der, toml }
}

fn client_config(root: &CertificateDer<'static>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

type TlsStream = rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>;

fn read_reply(r: &mut BufReader<TlsStream>) -> String {
    let mut reply = String::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            return reply;
        }
        reply.push_str(&line);
        if line.as_bytes().get(3) == Some(&b' ') {
            return reply;
        }
    }
}

fn cmd(r: &mut BufReader<TlsStream>, line: &str) -> String {
    r.get_mut()
        .write_all(format!("{line}\r\n").as_bytes())
        .unwrap();
    read_reply(r)
}

#[test]
fn starttls_discards_injected_commands_and_resets_the_session() {
    let keys = tempfile::tempdir().unwrap();
    let pki = pki(keys.path());
    let s = Server::start("", &pki.toml);
    let mut c = s.client();
    let ehlo = c.expect("EHLO client.test", "250");
    assert!(ehlo.contains("STARTTLS"), "{ehlo}");
    // The injection: commands after STARTTLS in the same packet.
    c.send("STARTTLS\r\nMAIL FROM:<injected@evil.test>\r\nNOOP\r\n");
    let r = c.read_reply();
    assert!(r.starts_with("220 2.0.0"), "{r}");
    let tcp = c.into_stream();
    let conn = rustls::ClientConnection::new(
        client_config(&pki.cert_der),
        ServerName::try_from("mx2.test").unwrap(),
    )
    .unwrap();
    let mut tls = BufReader::new(rustls::StreamOwned::new(conn, tcp));
    // Nothing is waiting for us: the injected commands produced no replies.
    tls.get_mut()
        .sock
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    tls.get_mut().flush().unwrap();
    let mut probe = [0u8; 1];
    let pending = tls.get_mut().read(&mut probe);
    assert!(
        pending.is_err(),
        "unexpected data after handshake: {pending:?}"
    );
    tls.get_mut()
        .sock
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    // Pre-TLS state is gone: MAIL needs a fresh EHLO, which no longer offers STARTTLS.
    assert!(cmd(&mut tls, "MAIL FROM:<a@remote.test>").starts_with("503 5.5.1"));
    let ehlo = cmd(&mut tls, "EHLO client.test");
    assert!(
        ehlo.starts_with("250") && !ehlo.contains("STARTTLS"),
        "{ehlo}"
    );
    assert!(cmd(&mut tls, "MAIL FROM:<a@remote.test>").starts_with("250"));
    assert!(cmd(&mut tls, "RCPT TO:<user@example.test>").starts_with("250"));
    assert!(cmd(&mut tls, "DATA").starts_with("354"));
    let r = cmd(&mut tls, "Subject: tls\r\n\r\nencrypted\r\n.");
    let id = queue_id(&r);
    let raw = String::from_utf8(s.raw(&id)).unwrap();
    assert!(raw.contains("with ESMTPS id"), "{raw}");
    assert!(raw.contains("version=TLSv1_3"), "{raw}");
    assert_eq!(
        s.queue().len(),
        1,
        "the injected MAIL never started a transaction"
    );
}

#[test]
fn swaks_delivers_over_starttls() {
    let keys = tempfile::tempdir().unwrap();
    let pki = pki(keys.path());
    let s = Server::start("", &pki.toml);
    let out = std::process::Command::new("swaks")
        .args([
            "--server",
            &s.addr.to_string(),
            "--tls",
            "--from",
            "a@remote.test",
            "--to",
            "user@example.test",
        ])
        .output()
        .expect("swaks is installed (scripts/test installs it)");
    let transcript = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{transcript}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        transcript.contains("250 2.0.0 Ok: queued as"),
        "{transcript}"
    );
}

#[test]
fn starttls_is_not_offered_without_a_certificate() {
    let s = Server::start("", "");
    let mut c = s.client();
    let ehlo = c.expect("EHLO client.test", "250");
    assert!(!ehlo.contains("STARTTLS"));
    c.expect("STARTTLS", "502 5.5.1");
}

/// STARTTLS up to a finished handshake that trusts only `root`; whether
/// it succeeded.
fn handshake_trusting(s: &Server, root: &CertificateDer<'static>) -> bool {
    let mut c = s.client();
    c.expect("EHLO client.test", "250");
    c.expect("STARTTLS", "220");
    let tcp = c.into_stream();
    let conn = rustls::ClientConnection::new(
        client_config(root),
        ServerName::try_from("mx2.test").unwrap(),
    )
    .unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let mut tls = BufReader::new(&mut tls);
    tls.get_mut()
        .write_all(b"NOOP\r\n")
        .and_then(|_| tls.get_mut().flush())
        .is_ok()
        && {
            let mut line = String::new();
            tls.read_line(&mut line).is_ok() && line.starts_with("250")
        }
}

/// The AWS shape: certificate and key are S3 objects (kept out of the
/// image), fetched at start and again every `tls.reload_interval`, so a
/// renewed certificate is served without a restart.
#[tokio::test(flavor = "multi_thread")]
async fn a_certificate_from_s3_is_served_and_reloaded() {
    if !aws_available() {
        return;
    }
    let conf = relay_core::store::aws::sdk_config().await;
    let s3 = aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(&conf)
            .force_path_style(true)
            .build(),
    );
    let bucket = format!(
        "certs-{}",
        relay_core::queue::new_id(std::time::SystemTime::now())
            .as_str()
            .to_lowercase()
    );
    s3.create_bucket().bucket(&bucket).send().await.unwrap();
    let upload = |dir: std::path::PathBuf| {
        let s3 = s3.clone();
        let bucket = bucket.clone();
        async move {
            for name in ["cert.pem", "key.pem"] {
                s3.put_object()
                    .bucket(&bucket)
                    .key(format!("mx/{name}"))
                    .body(std::fs::read(dir.join(name)).unwrap().into())
                    .send()
                    .await
                    .unwrap();
            }
        }
    };
    let first_dir = tempfile::tempdir().unwrap();
    let first = pki(first_dir.path());
    upload(first_dir.path().to_path_buf()).await;
    let tls = format!(
        "[tls]\ncert = \"s3://{bucket}/mx/cert.pem\"\nkey = \"s3://{bucket}/mx/key.pem\"\nreload_interval = \"1s\"\n"
    );
    let s = tokio::task::spawn_blocking(move || Server::start_aws("", &tls, "", false))
        .await
        .unwrap();
    let Some(s) = s else { return };
    let s = std::sync::Arc::new(s);
    let check = |root: CertificateDer<'static>| {
        let s = s.clone();
        tokio::task::spawn_blocking(move || handshake_trusting(&s, &root))
    };
    assert!(
        check(first.cert_der.clone()).await.unwrap(),
        "served from S3"
    );
    // Renewed: a new certificate in the bucket is served within the interval.
    let second_dir = tempfile::tempdir().unwrap();
    let second = pki(second_dir.path());
    upload(second_dir.path().to_path_buf()).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        if check(second.cert_der.clone()).await.unwrap() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the renewed certificate was never served"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(
        !check(first.cert_der.clone()).await.unwrap(),
        "the old one is gone"
    );
    assert!(s.log().contains("tls_reloaded"));
}
