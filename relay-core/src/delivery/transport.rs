//! The I/O driver for [`ClientSession`]: TCP, opportunistic TLS and the
//! RFC 5321 §4.5.3.2 client timeouts.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::client::{ClientSession, Envelope, Next, RcptResult, ReplyParser};

/// RFC 5321 §4.5.3.2 client timeouts.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect: Duration,
    /// Greeting and every command reply except the last.
    pub command: Duration,
    /// Writing the message.
    pub data_block: Duration,
    /// The reply after the final `.` (10 minutes in the RFC).
    pub data_final: Duration,
}

/// How one connection went.
#[derive(Debug, Clone)]
pub struct SessionReport {
    pub results: Vec<Vec<RcptResult>>,
    /// Per message (in the order given), per recipient.
    /// The server answered MAIL, so results are final for this attempt.
    pub transaction_started: bool,
    pub tls: bool,
    /// STARTTLS was accepted but the handshake failed: worth retrying in
    /// the clear at once.
    pub tls_failed: bool,
    /// TLS was required (a policy) and could not be had: the destination
    /// answers, it is not down.
    pub tls_policy_failed: bool,
    /// The server offered DSN (RFC 3461): the sender's requests went on
    /// with the mail, and success notices are its to send.
    pub dsn_offered: bool,
}

/// Opportunistic TLS (RFC 7435): encrypt with whatever certificate the
/// server has. MX certificates are routinely self-signed or for another
/// name; refusing them would only push mail back to plaintext.
#[derive(Debug)]
struct AcceptAnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        tracing::debug!(event = "tls_certificate_unverified", server = ?server_name);
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// How one connection to a next hop uses TLS.
#[derive(Clone, Copy)]
pub enum HopTls<'a> {
    /// Never STARTTLS.
    Off,
    /// STARTTLS when offered; plaintext otherwise.
    Opportunistic(&'a Arc<rustls::ClientConfig>),
    /// STARTTLS or nothing, with this configuration, which accepts any
    /// certificate (`tls = "required"`).
    Required(&'a Arc<rustls::ClientConfig>),
    /// STARTTLS or nothing, with this configuration, which verifies the
    /// certificate (Web PKI, a private CA or DANE): REQUIRETLS mail may go.
    Verified(&'a Arc<rustls::ClientConfig>),
}

/// The client TLS configuration that verifies the next hop's certificate
/// for its name: the Web PKI roots, and `extra` (a private CA).
pub fn verifying_tls(extra: &[CertificateDer<'static>]) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    for cert in extra {
        if let Err(e) = roots.add(cert.clone()) {
            tracing::warn!(event = "tls_ca_ignored", error = %e);
        }
    }
    Arc::new(
        client_builder(provider)
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// A client configuration with ring and the default TLS versions.
fn client_builder(
    provider: Arc<rustls::crypto::CryptoProvider>,
) -> rustls::ConfigBuilder<rustls::ClientConfig, rustls::WantsVerifier> {
    rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        // ring implements every default protocol version; this cannot fail.
        .expect("ring supports the default TLS versions")
}

/// A client configuration whose certificates `verifier` judges (DANE).
pub(crate) fn with_verifier(
    provider: Arc<rustls::crypto::CryptoProvider>,
    verifier: Arc<dyn ServerCertVerifier>,
) -> Arc<rustls::ClientConfig> {
    Arc::new(
        client_builder(provider)
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth(),
    )
}

/// Reads the certificates of a PEM file (`[delivery] tls_ca_file`).
pub fn load_ca_file(path: &std::path::Path) -> Result<Vec<CertificateDer<'static>>, String> {
    use rustls::pki_types::pem::PemObject;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: not PEM certificates: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate in it", path.display()));
    }
    Ok(certs)
}

/// The client TLS configuration for opportunistic STARTTLS.
pub fn opportunistic_tls() -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    with_verifier(provider.clone(), Arc::new(AcceptAnyCertificate(provider)))
}

enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    Gone,
}

impl Stream {
    async fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf).await,
            Stream::Tls(s) => s.read(buf).await,
            Stream::Gone => Ok(0),
        }
    }
    async fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.write_all(data).await,
            Stream::Tls(s) => {
                s.write_all(data).await?;
                s.flush().await
            }
            Stream::Gone => Err(io::ErrorKind::NotConnected.into()),
        }
    }
}

/// Where the messages of one session are read from, in the order of
/// their envelopes.
pub struct Bodies<'a> {
    pub store: &'a dyn crate::store::MessageStore,
    pub ids: &'a [crate::queue::QueueId],
}

impl Bodies<'_> {
    /// Writes message `n` for the DATA phase, read and dot-stuffed piece by
    /// piece, with its `.` terminator. A body that cannot be read is an
    /// error before the terminator: the caller drops the connection, so the
    /// server never takes a truncated message.
    async fn send(&self, n: usize, stream: &mut Stream, block: Duration) -> Result<(), String> {
        let mut pieces = self.pieces(n)?;
        let mut encoder = crate::smtp::data::DataEncoder::default();
        let mut wire = Vec::with_capacity(crate::store::BODY_CHUNK + crate::store::BODY_CHUNK / 8);
        loop {
            let (piece, last) = pieces.next().await?;
            wire.clear();
            encoder.encode(&piece, &mut wire);
            drop(piece);
            if last {
                encoder.finish(&mut wire);
            }
            write_message_part(stream, &wire, block).await?;
            if last {
                return Ok(());
            }
        }
    }

    /// Writes message `n` as it is stored, one BDAT chunk per piece read
    /// (RFC 3030), the last with `LAST`; returns how many chunks went.
    /// No dot-stuffing and no line-end repair: the next hop gets exactly
    /// the octets we stored.
    async fn send_chunks(
        &self,
        n: usize,
        stream: &mut Stream,
        block: Duration,
    ) -> Result<usize, String> {
        let mut pieces = self.pieces(n)?;
        let mut wire = Vec::with_capacity(crate::store::BODY_CHUNK + 32);
        let mut chunks = 0;
        loop {
            let (piece, last) = pieces.next().await?;
            wire.clear();
            let end = if last { " LAST" } else { "" };
            wire.extend_from_slice(format!("BDAT {}{end}\r\n", piece.len()).as_bytes());
            wire.extend_from_slice(&piece);
            drop(piece);
            write_message_part(stream, &wire, block).await?;
            chunks += 1;
            if last {
                return Ok(chunks);
            }
        }
    }

    fn pieces(&self, n: usize) -> Result<Pieces<'_>, String> {
        let id = self.ids.get(n).ok_or("no such message in the session")?;
        Ok(Pieces {
            store: self.store,
            id,
            offset: 0,
        })
    }
}

/// A stored message read piece by piece.
struct Pieces<'a> {
    store: &'a dyn crate::store::MessageStore,
    id: &'a crate::queue::QueueId,
    offset: u64,
}

impl Pieces<'_> {
    /// The next piece, and whether it is the last. A body that cannot be
    /// read is an error before the end of the message: the caller drops
    /// the connection, so the server never takes a truncated message.
    async fn next(&mut self) -> Result<(Vec<u8>, bool), String> {
        let id = self.id;
        let piece = match self
            .store
            .read_chunk(id, self.offset, crate::store::BODY_CHUNK)
            .await
        {
            Ok(Some(piece)) => piece,
            Ok(None) => return Err(format!("message body of {id} is missing")),
            Err(e) => {
                return Err(format!(
                    "reading the message body: {}",
                    crate::error::Report(&e)
                ))
            }
        };
        // A short piece is the last one: no read just to find the end.
        let last = piece.len() < crate::store::BODY_CHUNK;
        self.offset += piece.len() as u64;
        Ok((piece, last))
    }
}

async fn write_message_part(
    stream: &mut Stream,
    wire: &[u8],
    block: Duration,
) -> Result<(), String> {
    match tokio::time::timeout(block, stream.write_all(wire)).await {
        Ok(Ok(())) => Ok(()),
        _ => Err("connection lost while sending the message".into()),
    }
}

/// The envelope of one entry's pending recipients.
pub(super) fn envelope_of(entry: &crate::queue::QueueEntry, pending: &[usize]) -> Envelope {
    Envelope {
        dsn: entry.dsn.clone(),
        recipient_dsn: pending
            .iter()
            .map(|&r| entry.recipients[r].dsn.clone())
            .collect(),
        sender: entry.sender.clone(),
        recipients: pending
            .iter()
            .map(|&r| entry.recipients[r].address.clone())
            .collect(),
        size: entry.size,
        smtputf8: entry.smtputf8,
        eight_bit: entry.eight_bit,
        tls_request: entry.tls_request,
    }
}

/// Delivers `envelopes` over one connection to `addr`, one transaction
/// each, with the TLS `hop_tls` asks for.
pub async fn deliver(
    addr: SocketAddr,
    server_name: &str,
    helo_name: &str,
    hop_tls: HopTls<'_>,
    timeouts: &Timeouts,
    envelopes: Vec<Envelope>,
    bodies: &Bodies<'_>,
) -> SessionReport {
    let (mut client, tls) = session_for(hop_tls, |try_tls| {
        ClientSession::with_messages(helo_name, try_tls, envelopes)
    });
    let mut link = match Link::connect(addr, server_name, tls, timeouts).await {
        Ok(link) => link,
        Err(why) => {
            client.connection_lost(&why);
            return report(&client);
        }
    };
    link.drive(&mut client, Some(bodies)).await;
    report(&client)
}

/// The session `make` builds for `hop_tls` (`make` gets whether STARTTLS
/// may be tried), required TLS applied, and the TLS configuration its
/// handshake uses.
fn session_for<'a>(
    hop_tls: HopTls<'a>,
    make: impl FnOnce(bool) -> ClientSession,
) -> (ClientSession, Option<&'a Arc<rustls::ClientConfig>>) {
    match hop_tls {
        HopTls::Off => (make(false), None),
        HopTls::Opportunistic(c) => (make(true), Some(c)),
        HopTls::Required(c) => (make(true).require_tls(), Some(c)),
        HopTls::Verified(c) => (make(true).require_verified_tls(), Some(c)),
    }
}

/// A connection to a next hop, driven by a [`ClientSession`].
struct Link<'a> {
    addr: SocketAddr,
    server_name: &'a str,
    tls: Option<&'a Arc<rustls::ClientConfig>>,
    timeouts: &'a Timeouts,
    stream: Stream,
    parser: ReplyParser,
    buf: Vec<u8>,
}

impl<'a> Link<'a> {
    async fn connect(
        addr: SocketAddr,
        server_name: &'a str,
        tls: Option<&'a Arc<rustls::ClientConfig>>,
        timeouts: &'a Timeouts,
    ) -> Result<Link<'a>, String> {
        let tcp = match tokio::time::timeout(timeouts.connect, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(format!("connect to {addr}: {e}")),
            Err(_) => return Err(format!("connect to {addr}: timed out")),
        };
        let _ = tcp.set_nodelay(true);
        Ok(Link {
            addr,
            server_name,
            tls,
            timeouts,
            stream: Stream::Plain(tcp),
            parser: ReplyParser::default(),
            buf: vec![0u8; 16 * 1024],
        })
    }

    /// Runs `client` until it is done. A session that sends bodies needs
    /// `bodies`.
    async fn drive(&mut self, client: &mut ClientSession, bodies: Option<&Bodies<'_>>) {
        let (addr, timeouts) = (self.addr, self.timeouts);
        loop {
            match client.poll_next() {
                Next::Send(bytes) => {
                    if !matches!(
                        tokio::time::timeout(timeouts.command, self.stream.write_all(&bytes)).await,
                        Ok(Ok(()))
                    ) {
                        client.connection_lost(&format!(
                            "{addr}: connection lost while sending a command"
                        ));
                    }
                }
                Next::SendBody(n) => {
                    let sent = match bodies {
                        Some(bodies) => bodies.send(n, &mut self.stream, timeouts.data_block).await,
                        None => Err("no message to send in this session".to_string()),
                    };
                    if let Err(why) = sent {
                        client.connection_lost(&format!("{addr}: {why}"));
                    }
                }
                Next::SendChunks(n) => {
                    let sent = match bodies {
                        Some(bodies) => {
                            bodies
                                .send_chunks(n, &mut self.stream, timeouts.data_block)
                                .await
                        }
                        None => Err("no message to send in this session".to_string()),
                    };
                    match sent {
                        Ok(chunks) => client.chunks_sent(chunks),
                        Err(why) => client.connection_lost(&format!("{addr}: {why}")),
                    }
                }
                Next::ReadReply => {
                    let wait = if client.awaiting_final_reply() {
                        timeouts.data_final
                    } else {
                        timeouts.command
                    };
                    match read_reply(&mut self.stream, &mut self.parser, &mut self.buf, wait).await
                    {
                        Ok(r) => client.on_reply(r),
                        Err(why) => client.connection_lost(&format!("{addr}: {why}")),
                    }
                }
                Next::StartTls => self.start_tls(client).await,
                Next::Done => break,
            }
        }
    }

    async fn start_tls(&mut self, client: &mut ClientSession) {
        let Some(config) = self.tls else {
            client.tls_done(false);
            return;
        };
        let tcp = match std::mem::replace(&mut self.stream, Stream::Gone) {
            Stream::Plain(tcp) => tcp,
            other => {
                self.stream = other;
                client.tls_done(false);
                return;
            }
        };
        let addr = self.addr;
        let name = ServerName::try_from(self.server_name.to_string())
            .unwrap_or_else(|_| ServerName::IpAddress(addr.ip().into()));
        let connector = tokio_rustls::TlsConnector::from(config.clone());
        match tokio::time::timeout(self.timeouts.command, connector.connect(name, tcp)).await {
            Ok(Ok(s)) => {
                self.stream = Stream::Tls(Box::new(s));
                client.tls_done(true);
            }
            Ok(Err(e)) => {
                tracing::info!(event = "tls_handshake_failed", addr = %addr, error = %crate::error::Report(&e));
                client.tls_failed_because(&e.to_string());
            }
            Err(_) => client.tls_failed_because("timed out"),
        }
    }
}

/// A connection to a next hop that is set up (greeting, EHLO, STARTTLS as
/// the hop's TLS asks) and left to its owner for commands of its own:
/// recipient callouts ask the primary under the same TLS rules as the
/// mail that follows them.
pub struct Channel {
    stream: Stream,
    parser: ReplyParser,
    buf: Vec<u8>,
    wait: Duration,
    tls: bool,
}

/// Why a [`Channel`] could not be set up.
#[derive(Debug)]
pub struct SetupFailure {
    /// For the log: the last thing that went wrong.
    pub why: String,
    /// The server's reply that ended it (a refused greeting or EHLO).
    pub refusal: Option<super::client::Response>,
    /// TLS was required and could not be had: the server answers.
    pub tls_policy_failed: bool,
    /// An opportunistic STARTTLS handshake failed: a new connection in
    /// the clear may work.
    pub tls_failed: bool,
}

impl Channel {
    /// Connects to `addr` and sets the connection up as `hop_tls` asks.
    pub async fn open(
        addr: SocketAddr,
        server_name: &str,
        helo_name: &str,
        hop_tls: HopTls<'_>,
        timeouts: &Timeouts,
    ) -> Result<Channel, SetupFailure> {
        let (mut client, tls) = session_for(hop_tls, |try_tls| {
            ClientSession::setup_only(helo_name, try_tls)
        });
        let mut link = Link::connect(addr, server_name, tls, timeouts)
            .await
            .map_err(|why| SetupFailure {
                why,
                refusal: None,
                tls_policy_failed: false,
                tls_failed: false,
            })?;
        link.drive(&mut client, None).await;
        if !client.ready() {
            return Err(SetupFailure {
                why: client
                    .why_ended()
                    .unwrap_or_else(|| format!("{addr}: the session ended")),
                refusal: client.refusal().cloned(),
                tls_policy_failed: client.tls_policy_failed(),
                tls_failed: client.tls_failed(),
            });
        }
        Ok(Channel {
            stream: link.stream,
            parser: link.parser,
            buf: vec![0u8; 2048],
            wait: timeouts.command,
            tls: client.tls_active(),
        })
    }

    /// Whether the connection runs TLS.
    pub fn tls(&self) -> bool {
        self.tls
    }

    /// Sends one command line and reads its reply.
    pub async fn command(&mut self, line: &str) -> Result<super::client::Response, String> {
        let mut bytes = Vec::with_capacity(line.len() + 2);
        bytes.extend_from_slice(line.as_bytes());
        bytes.extend_from_slice(b"\r\n");
        if !matches!(
            tokio::time::timeout(self.wait, self.stream.write_all(&bytes)).await,
            Ok(Ok(()))
        ) {
            return Err("connection lost while sending a command".into());
        }
        read_reply(&mut self.stream, &mut self.parser, &mut self.buf, self.wait).await
    }
}

fn report(client: &ClientSession) -> SessionReport {
    SessionReport {
        results: client.all_results(),
        transaction_started: client.transaction_started(),
        tls: client.tls_active(),
        tls_failed: client.tls_failed(),
        tls_policy_failed: client.tls_policy_failed(),
        dsn_offered: client.offers_dsn(),
    }
}

async fn read_reply(
    stream: &mut Stream,
    parser: &mut ReplyParser,
    buf: &mut [u8],
    wait: Duration,
) -> Result<super::client::Response, String> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match parser.next_reply() {
            Ok(Some(r)) => return Ok(r),
            Ok(None) => {}
            Err(e) => return Err(e.to_string()),
        }
        match tokio::time::timeout_at(deadline, stream.read(buf)).await {
            Ok(Ok(0)) => return Err("connection closed by the server".into()),
            Ok(Ok(n)) => parser.feed(&buf[..n]),
            Ok(Err(e)) => return Err(format!("read error: {e}")),
            Err(_) => return Err("timed out waiting for a reply".into()),
        }
    }
}
