//! The HTTP side of the filter: one `POST /checkv2` per message over
//! HTTP/1.1 (hyper's client connection; loopback or a sidecar, so a fresh
//! connection per message costs little and never carries one session's
//! state to another). A big message is streamed from its spool file in
//! pieces; an in-memory one is shared with the request, not copied.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::Frame;
use tokio::io::AsyncReadExt;
use tokio::sync::Semaphore;

use super::{parse_reply, request_headers, Envelope, FilterError, FilterSettings, ScanReply};

/// The largest answer read from rspamd (its JSON is a few KiB).
const MAX_REPLY: usize = 1 << 20;

/// Pieces a spooled message is sent in.
const PIECE: usize = 64 * 1024;

/// The message to scan.
pub enum Body {
    /// Held in memory (shared with the request, not copied).
    Memory(Bytes),
    /// In a spool file of this length.
    File { path: PathBuf, len: u64 },
}

/// An rspamd to scan messages with.
pub struct Rspamd {
    settings: FilterSettings,
    permits: Arc<Semaphore>,
}

impl Rspamd {
    pub fn new(settings: FilterSettings) -> Rspamd {
        let permits = Arc::new(Semaphore::new(settings.max_concurrent.max(1)));
        Rspamd { settings, permits }
    }

    pub fn settings(&self) -> &FilterSettings {
        &self.settings
    }

    /// Scans one message: rspamd's answer, or why there is none, within
    /// the timeout (a wait for a free slot included), and how long it took.
    pub async fn scan(
        &self,
        envelope: &Envelope,
        body: Body,
    ) -> (Result<ScanReply, FilterError>, std::time::Duration) {
        let started = Instant::now();
        let result = tokio::time::timeout(self.settings.timeout, async {
            let _permit = self
                .permits
                .acquire()
                .await
                .map_err(|_| FilterError::Busy)?;
            self.exchange(envelope, body).await
        })
        .await
        .unwrap_or(Err(FilterError::Timeout));
        (result, started.elapsed())
    }

    async fn exchange(&self, envelope: &Envelope, body: Body) -> Result<ScanReply, FilterError> {
        let tcp = tokio::net::TcpStream::connect(&self.settings.authority)
            .await
            .map_err(FilterError::Connect)?;
        let _ = tcp.set_nodelay(true);
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                .await
                .map_err(|e| FilterError::Http(e.to_string()))?;
        // Drives the connection until the exchange is over (or dropped with
        // this future on a timeout).
        let driver = tokio::spawn(async move {
            let _ = connection.await;
        });
        let _abort = AbortOnDrop(driver);
        let (len, body) = match body {
            Body::Memory(bytes) => (
                bytes.len() as u64,
                Full::new(bytes)
                    .map_err(|never| match never {})
                    .boxed_unsync(),
            ),
            Body::File { path, len } => {
                let file = tokio::fs::File::open(&path)
                    .await
                    .map_err(FilterError::Body)?;
                let pieces = futures_util::stream::unfold(file, |mut file| async move {
                    let mut piece = vec![0u8; PIECE];
                    match file.read(&mut piece).await {
                        Ok(0) => None,
                        Ok(n) => {
                            piece.truncate(n);
                            Some((Ok(Frame::data(Bytes::from(piece))), file))
                        }
                        Err(e) => Some((Err(e), file)),
                    }
                });
                (len, StreamBody::new(pieces).boxed_unsync())
            }
        };
        let mut request = hyper::Request::post(format!("{}/checkv2", self.settings.base_path))
            .header("Host", &self.settings.authority)
            .header("Content-Length", len.to_string())
            .header("User-Agent", "backupmx");
        for (name, value) in request_headers(envelope, &self.settings.mta_name) {
            request = request.header(name, value);
        }
        let request = request
            .body(body)
            .map_err(|e| FilterError::Http(e.to_string()))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| FilterError::Http(e.to_string()))?;
        let status = response.status();
        if !status.is_success() {
            return Err(FilterError::Status(status.as_u16()));
        }
        let reply = Limited::new(response.into_body(), MAX_REPLY)
            .collect()
            .await
            .map_err(|e| FilterError::Http(e.to_string()))?
            .to_bytes();
        parse_reply(&reply).map_err(FilterError::BadReply)
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
