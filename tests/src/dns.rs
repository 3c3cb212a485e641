//! A real DNS server for tests: hickory-server on a loopback UDP+TCP port,
//! serving one zone `test.` from a record list. Names under
//! `timeout.test.` are never answered and names under `servfail.test.`
//! get SERVFAIL, to play broken DNS.

use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use hickory_server::net::runtime::Time;
use hickory_server::proto::op::{Header, ResponseCode};
use hickory_server::proto::rr::rdata::{A, AAAA, MX, SOA, TLSA, TXT};
use hickory_server::proto::rr::{Name, RData, Record};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::store::in_memory::InMemoryZoneHandler;
use hickory_server::zone_handler::{AxfrPolicy, Catalog, ZoneType};
use hickory_server::Server;

/// A record to serve.
#[derive(Debug, Clone)]
pub enum Rec {
    Mx(u16, &'static str),
    /// RFC 7505: `MX 0 .`
    NullMx,
    A(&'static str),
    Aaaa(&'static str),
    /// One TXT string.
    Txt(String),
    /// TLSA usage, selector, matching type and data.
    Tlsa(u8, u8, u8, Vec<u8>),
}

pub struct DnsServer {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct Handler {
    catalog: Catalog,
    /// Every query gets SERVFAIL at once.
    fail_all: bool,
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response: R,
    ) -> ResponseInfo {
        let name = request
            .queries
            .queries()
            .first()
            .map(|q| q.name().to_string())
            .unwrap_or_default()
            .to_lowercase();
        if name.ends_with("timeout.test.") {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
        if self.fail_all || name.ends_with("servfail.test.") {
            let builder =
                hickory_server::zone_handler::MessageResponseBuilder::from_message_request(request);
            let msg = builder.error_msg(&request.metadata, ResponseCode::ServFail);
            return match response.send_response(msg).await {
                Ok(info) => info,
                Err(_) => {
                    let mut metadata = hickory_server::proto::op::Metadata::response_from_request(
                        &request.metadata,
                    );
                    metadata.response_code = ResponseCode::ServFail;
                    Header {
                        metadata,
                        counts: Default::default(),
                    }
                    .into()
                }
            };
        }
        self.catalog.handle_request::<R, T>(request, response).await
    }
}

fn rdata_of(rec: &Rec) -> RData {
    match rec {
        Rec::Mx(p, host) => RData::MX(MX::new(*p, name(host))),
        Rec::NullMx => RData::MX(MX::new(0, Name::root())),
        Rec::A(ip) => RData::A(A(ip.parse().expect("ipv4"))),
        Rec::Aaaa(ip) => RData::AAAA(AAAA(ip.parse().expect("ipv6"))),
        Rec::Txt(text) => RData::TXT(TXT::new(vec![text.clone()])),
        Rec::Tlsa(usage, selector, matching, data) => RData::TLSA(TLSA::new(
            (*usage).into(),
            (*selector).into(),
            (*matching).into(),
            data.clone(),
        )),
    }
}

fn name(s: &str) -> Name {
    let fqdn = if s.ends_with('.') {
        s.to_string()
    } else {
        format!("{s}.")
    };
    Name::from_str(&fqdn).expect("valid test name")
}

/// A DNSSEC key for the `test.` zone (ECDSA P-256, algorithm 13).
pub struct ZoneKey {
    pkcs8: Vec<u8>,
}

impl Default for ZoneKey {
    fn default() -> Self {
        ZoneKey::new()
    }
}

impl ZoneKey {
    pub fn new() -> ZoneKey {
        use hickory_server::proto::dnssec::crypto::EcdsaSigningKey;
        use hickory_server::proto::dnssec::Algorithm;
        let pkcs8 = EcdsaSigningKey::generate_pkcs8(Algorithm::ECDSAP256SHA256).expect("key");
        ZoneKey {
            pkcs8: pkcs8.secret_pkcs8_der().to_vec(),
        }
    }

    fn signing_key(&self) -> hickory_server::proto::dnssec::crypto::EcdsaSigningKey {
        use hickory_server::proto::dnssec::crypto::EcdsaSigningKey;
        use hickory_server::proto::dnssec::Algorithm;
        let der = rustls_pki_types::PrivatePkcs8KeyDer::from(self.pkcs8.clone());
        EcdsaSigningKey::from_pkcs8(&der, Algorithm::ECDSAP256SHA256).expect("key")
    }

    /// The `test.` zone's DNSKEY a resolver trusts (`[dns] dnssec_trust_anchors`).
    pub fn anchor(&self) -> String {
        use base64::Engine as _;
        use hickory_server::proto::dnssec::{PublicKey, SigningKey};
        let public = self.signing_key().to_public_key().expect("public key");
        format!(
            "test. 257 3 13 {}",
            base64::engine::general_purpose::STANDARD.encode(public.public_bytes())
        )
    }
}

/// How a signed zone is served.
pub struct Signing<'a> {
    pub key: &'a ZoneKey,
    /// Records added after signing, without signatures of their own: their
    /// RRset no longer matches its RRSIG, so a validator calls it bogus.
    pub tampered: Vec<(&'a str, Rec)>,
}

impl DnsServer {
    /// Serves `records` (names under `.test`) with a short TTL.
    pub fn start(records: &[(&str, Rec)]) -> DnsServer {
        DnsServer::start_with(records, None)
    }

    /// The server of tests that publish nothing: every query gets SERVFAIL
    /// at once, so every lookup fails as transiently as with no DNS at
    /// all, without waiting for a timeout. One for the whole test run.
    pub fn failing() -> &'static DnsServer {
        static FAILING: std::sync::OnceLock<DnsServer> = std::sync::OnceLock::new();
        FAILING.get_or_init(|| DnsServer::start_serving(&[], None, true))
    }

    /// Serves `records` in a zone signed with `signing.key` (NSEC denials).
    pub fn start_signed(records: &[(&str, Rec)], signing: Signing<'_>) -> DnsServer {
        DnsServer::start_with(records, Some(signing))
    }

    fn start_with(records: &[(&str, Rec)], signing: Option<Signing<'_>>) -> DnsServer {
        DnsServer::start_serving(records, signing, false)
    }

    fn start_serving(
        records: &[(&str, Rec)],
        signing: Option<Signing<'_>>,
        fail_all: bool,
    ) -> DnsServer {
        let origin = name("test.");
        let mut authority =
            InMemoryZoneHandler::<hickory_server::net::runtime::TokioRuntimeProvider>::empty(
                origin.clone(),
                ZoneType::Primary,
                AxfrPolicy::Deny,
                signing
                    .as_ref()
                    .map(|_| hickory_server::dnssec::NxProofKind::Nsec),
            );
        let soa = SOA::new(
            name("ns.test."),
            name("hostmaster.test."),
            1,
            3600,
            600,
            86_400,
            5,
        );
        authority.upsert_mut(Record::from_rdata(origin.clone(), 5, RData::SOA(soa)), 1);
        for (owner, rec) in records {
            let rdata = rdata_of(rec);
            authority.upsert_mut(Record::from_rdata(name(owner), 5, rdata), 1);
        }
        if let Some(signing) = signing {
            use hickory_server::proto::dnssec::rdata::DNSKEY;
            use hickory_server::proto::dnssec::{DnssecSigner, SigningKey};
            let key = signing.key.signing_key();
            let dnskey = DNSKEY::from_key(&key.to_public_key().expect("public key"));
            let signer = DnssecSigner::new(
                dnskey,
                Box::new(key),
                origin.clone(),
                Duration::from_secs(86_400),
            );
            authority
                .add_zone_signing_key_mut(signer)
                .expect("zone signing key");
            authority.secure_zone_mut().expect("sign the zone");
            for (owner, rec) in signing.tampered {
                authority.upsert_mut(Record::from_rdata(name(owner), 5, rdata_of(&rec)), 2);
            }
        }
        let mut catalog = Catalog::new();
        catalog.upsert(origin.into(), vec![Arc::new(authority)]);
        let handler = Handler { catalog, fail_all };
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let (udp, tcp) = loop {
                    let udp = tokio::net::UdpSocket::bind("127.0.0.1:0")
                        .await
                        .expect("udp");
                    let addr = udp.local_addr().expect("addr");
                    if let Ok(tcp) = tokio::net::TcpListener::bind(addr).await {
                        break (udp, tcp);
                    }
                };
                let addr = udp.local_addr().expect("addr");
                let mut server = Server::new(handler);
                server.register_socket(udp);
                server.register_listener(tcp, Duration::from_secs(5), 65_535);
                addr_tx.send(addr).expect("send addr");
                tokio::select! {
                    _ = server.block_until_done() => {}
                    _ = stop_rx => {}
                }
            });
        });
        let addr = addr_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("dns server started");
        DnsServer {
            addr,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    /// The `[dns]` config section pointing at this server.
    pub fn toml(&self) -> String {
        format!("[dns]\nservers = [\"{}\"]\ntimeout = \"1s\"\n", self.addr)
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
