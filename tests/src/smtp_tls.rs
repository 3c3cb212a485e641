//! An SMTP client that protects its session with STARTTLS (rustls), for
//! tests that need what only a TLS session may do (REQUIRETLS).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// A client session that has done STARTTLS.
pub struct TlsClient {
    stream: Tls,
    pending: Vec<u8>,
    /// The server's EHLO reply under TLS.
    pub ehlo: String,
}

impl TlsClient {
    /// Connects to `addr`, says EHLO, runs STARTTLS trusting the CA in
    /// `ca` (PEM) for the name `127.0.0.1`, and says EHLO again.
    pub fn connect(addr: SocketAddr, ca: &Path) -> TlsClient {
        let mut tcp = TcpStream::connect(addr).expect("connect");
        tcp.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let mut pending = Vec::new();
        let greeting = read_reply(&mut tcp, &mut pending);
        assert!(greeting.starts_with("220"), "{greeting}");
        tcp.write_all(b"EHLO client.test\r\n").expect("write");
        let ehlo = read_reply(&mut tcp, &mut pending);
        assert!(ehlo.contains("STARTTLS"), "no STARTTLS offered: {ehlo}");
        tcp.write_all(b"STARTTLS\r\n").expect("write");
        let ready = read_reply(&mut tcp, &mut pending);
        assert!(ready.starts_with("220"), "{ready}");
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca).expect("CA file") {
            roots.add(cert.expect("CA PEM")).expect("CA certificate");
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        let name = ServerName::try_from("127.0.0.1").expect("name");
        let conn = rustls::ClientConnection::new(Arc::new(config), name).expect("TLS client");
        let mut client = TlsClient {
            stream: rustls::StreamOwned::new(conn, tcp),
            pending: Vec::new(),
            ehlo: String::new(),
        };
        client.ehlo = client.cmd("EHLO client.test");
        assert!(client.ehlo.starts_with("250"), "{}", client.ehlo);
        client
    }

    /// Sends one command line and returns the reply.
    pub fn cmd(&mut self, line: &str) -> String {
        self.send(format!("{line}\r\n"));
        self.read_reply()
    }

    pub fn send(&mut self, data: impl AsRef<[u8]>) {
        self.stream.write_all(data.as_ref()).expect("write");
        self.stream.flush().expect("flush");
    }

    pub fn read_reply(&mut self) -> String {
        read_reply(&mut self.stream, &mut self.pending)
    }

    /// MAIL (with `mail_params`), RCPT, DATA and the message: the reply
    /// to its end.
    pub fn send_message(
        &mut self,
        from: &str,
        mail_params: &str,
        to: &[&str],
        body: &str,
    ) -> String {
        let r = self.cmd(&format!("MAIL FROM:<{from}>{mail_params}"));
        assert!(r.starts_with("250"), "{r}");
        for rcpt in to {
            let r = self.cmd(&format!("RCPT TO:<{rcpt}>"));
            assert!(r.starts_with("250"), "{r}");
        }
        let r = self.cmd("DATA");
        assert!(r.starts_with("354"), "{r}");
        self.send(format!("{body}.\r\n"));
        self.read_reply()
    }
}

/// One complete (possibly multi-line) reply; bytes after it stay in
/// `pending`.
fn read_reply(stream: &mut impl Read, pending: &mut Vec<u8>) -> String {
    let mut reply = String::new();
    loop {
        while let Some(lf) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=lf).collect();
            let line = String::from_utf8_lossy(&line).to_string();
            let last = line.len() < 4 || line.as_bytes()[3] == b' ';
            reply.push_str(&line);
            if last {
                return reply;
            }
        }
        let mut buf = [0u8; 4096];
        match stream.read(&mut buf) {
            Ok(0) => return reply,
            Ok(n) => pending.extend_from_slice(&buf[..n]),
            Err(e) => panic!("reading a reply after {reply:?}: {e}"),
        }
    }
}
