//! An HTTPS server for MTA-STS policy files (`/.well-known/mta-sts.txt`)
//! on a loopback port, with a certificate from the test CA.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The TLS configuration for this certificate and key (PEM), and a
/// non-blocking listener on a free loopback port.
fn listen(cert_pem: &str, key_pem: &str) -> (Arc<rustls::ServerConfig>, TcpListener, SocketAddr) {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .expect("certificate PEM");
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).expect("key PEM");
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .expect("server certificate");
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let addr = listener.local_addr().expect("addr");
    (Arc::new(config), listener, addr)
}

/// Serves one policy (changeable) to every request for the policy path.
pub struct PolicyServer {
    pub addr: SocketAddr,
    policy: Arc<Mutex<String>>,
    fetches: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl PolicyServer {
    /// Listens on a free loopback port with this certificate and key (PEM).
    pub fn start(cert_pem: &str, key_pem: &str, policy: &str) -> PolicyServer {
        let (config, listener, addr) = listen(cert_pem, key_pem);
        let policy = Arc::new(Mutex::new(policy.to_string()));
        let fetches = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, f, st) = (policy.clone(), fetches.clone(), stop.clone());
        std::thread::spawn(move || {
            while !st.load(Ordering::SeqCst) {
                let Ok((tcp, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                let _ = tcp.set_nonblocking(false);
                let _ = tcp.set_read_timeout(Some(Duration::from_secs(5)));
                let Ok(conn) = rustls::ServerConnection::new(config.clone()) else {
                    continue;
                };
                let mut tls = rustls::StreamOwned::new(conn, tcp);
                let mut request = Vec::new();
                let mut buf = [0u8; 4096];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let text = String::from_utf8_lossy(&request);
                let response = if text.starts_with("GET /.well-known/mta-sts.txt ") {
                    f.fetch_add(1, Ordering::SeqCst);
                    let body = p.lock().expect("policy").clone();
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    )
                } else {
                    "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                        .to_string()
                };
                let _ = tls.write_all(response.as_bytes());
                tls.conn.send_close_notify();
                let _ = tls.flush();
            }
        });
        PolicyServer {
            addr,
            policy,
            fetches,
            stop,
        }
    }

    /// Serves another policy from now on.
    pub fn set_policy(&self, policy: &str) {
        *self.policy.lock().expect("policy") = policy.to_string();
    }

    /// How many times the policy was fetched.
    pub fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

impl Drop for PolicyServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// One POST a [`PostReceiver`] took.
#[derive(Debug, Clone)]
pub struct Posted {
    pub path: String,
    pub content_type: String,
    pub body: Vec<u8>,
}

/// An HTTPS server that records every POST (TLS reports) and answers 200.
pub struct PostReceiver {
    pub addr: SocketAddr,
    posts: Arc<Mutex<Vec<Posted>>>,
    stop: Arc<AtomicBool>,
}

impl PostReceiver {
    /// Listens on a free loopback port with this certificate and key (PEM).
    pub fn start(cert_pem: &str, key_pem: &str) -> PostReceiver {
        let (config, listener, addr) = listen(cert_pem, key_pem);
        let posts = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, st) = (posts.clone(), stop.clone());
        std::thread::spawn(move || {
            while !st.load(Ordering::SeqCst) {
                let Ok((tcp, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                let _ = tcp.set_nonblocking(false);
                let _ = tcp.set_read_timeout(Some(Duration::from_secs(5)));
                let Ok(conn) = rustls::ServerConnection::new(config.clone()) else {
                    continue;
                };
                let mut tls = rustls::StreamOwned::new(conn, tcp);
                let mut request = Vec::new();
                let mut buf = [0u8; 4096];
                let mut head_end = None;
                let mut length = 0usize;
                loop {
                    if let Some(end) = head_end {
                        if request.len() >= end + length {
                            break;
                        }
                    } else if let Some(i) = request.windows(4).position(|w| w == b"\r\n\r\n") {
                        head_end = Some(i + 4);
                        let head = String::from_utf8_lossy(&request[..i]).to_ascii_lowercase();
                        length = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse().ok())
                            .unwrap_or(0);
                        continue;
                    }
                    match tls.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let Some(end) = head_end else { continue };
                let head = String::from_utf8_lossy(&request[..end]).to_string();
                let mut words = head.split_whitespace();
                let response = if words.next() == Some("POST") {
                    let content_type = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-type:")
                                .map(|v| v.trim().to_string())
                        })
                        .unwrap_or_default();
                    p.lock().expect("posts").push(Posted {
                        path: words.next().unwrap_or_default().to_string(),
                        content_type,
                        body: request[end..].to_vec(),
                    });
                    "HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                } else {
                    "HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                };
                let _ = tls.write_all(response.as_bytes());
                tls.conn.send_close_notify();
                let _ = tls.flush();
            }
        });
        PostReceiver { addr, posts, stop }
    }

    /// What was posted so far.
    pub fn posts(&self) -> Vec<Posted> {
        self.posts.lock().expect("posts").clone()
    }
}

impl Drop for PostReceiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}
