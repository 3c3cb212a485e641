//! The I/O driver for one SMTP connection: moves bytes between the socket
//! and relay-core's sans-I/O session, and carries out the session's
//! requests (recipient checks, durable storage, the TLS handshake).

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use relay_core::policy::{ClientLookups, Policy};
use relay_core::smtp::{Action, Reply, Session, SessionConfig};
use relay_core::store::Spool;
use std::task::Poll;
use tracing::Instrument;

use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::tls::Tls;

/// The delivery side, present in the embedded mode.
pub(crate) struct Delivery {
    pub engine: Arc<relay_core::delivery::Engine>,
    pub worker: Arc<relay_core::delivery::worker::Worker>,
}

/// What new mail needs: disk space (embedded store) and memory.
pub(crate) struct Resources {
    /// Message data held by all sessions together.
    pub memory: relay_core::budget::MemoryBudget,
    /// The data directory's free space; `None` on the AWS backend.
    pub disk: Option<relay_core::store::space::FreeSpace>,
}

/// Below this much room in the memory budget a MAIL without `SIZE=` is
/// refused: a message of unknown size would very likely not fit.
const MIN_ROOM_FOR_MAIL: u64 = 1024 * 1024;

impl Resources {
    /// The answer to a MAIL: `452 4.3.1` (RFC 3463: mail system full)
    /// when the disk or the memory budget has no room for the message.
    fn admit(&self, size: Option<u64>) -> Result<(), Reply> {
        if let Some(disk) = &self.disk {
            if !disk.room_for(size.unwrap_or(0)) {
                return Err(Reply::new(
                    452,
                    "4.3.1",
                    "Insufficient system storage, try again later",
                ));
            }
        }
        if self.memory.available() < size.unwrap_or(MIN_ROOM_FOR_MAIL).max(1)
            && self.memory.used() > 0
        {
            return Err(Reply::new(
                452,
                "4.3.1",
                "Insufficient system resources, try again later",
            ));
        }
        Ok(())
    }
}

/// Message data held in memory past this is moved to a spool file while
/// it arrives: a session holds about this much of a message, whatever its
/// size.
const SPILL_AT: usize = 512 * 1024;

/// A big message's data on its way to the store, in `spool_dir`.
struct Spill {
    /// `None` only while a write is in progress on a blocking thread.
    file: Option<std::fs::File>,
    path: std::path::PathBuf,
    len: u64,
}

impl Spill {
    async fn create(dir: &std::path::Path, session_id: u64) -> io::Result<Spill> {
        use std::os::unix::fs::OpenOptionsExt;
        static FILES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let n = FILES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = dir.join(format!("{session_id}-{n}.part"));
        let open = path.clone();
        let file = tokio::task::spawn_blocking(move || {
            std::fs::OpenOptions::new()
                .create_new(true)
                .write(true)
                .mode(relay_core::store::space::FILE_MODE)
                .open(open)
        })
        .await
        .map_err(io::Error::other)??;
        Ok(Spill {
            file: Some(file),
            path,
            len: 0,
        })
    }

    /// Writes a piece on a blocking thread. The piece moves there and is
    /// freed after the write: unlike tokio's `File`, no copy of it is kept
    /// in a write buffer, so a session holds one piece at a time.
    async fn write(&mut self, piece: Vec<u8>) -> io::Result<()> {
        use std::io::Write;
        let mut file = self
            .file
            .take()
            .ok_or_else(|| io::Error::other("spool file lost after a failed write"))?;
        let n = piece.len() as u64;
        let (file, written) = tokio::task::spawn_blocking(move || {
            let written = file.write_all(&piece);
            (file, written)
        })
        .await
        .map_err(io::Error::other)?;
        self.file = Some(file);
        written?;
        self.len += n;
        Ok(())
    }

    /// Deletes the file (the store has its own copy, or the message was refused).
    async fn remove(self) {
        drop(self.file);
        if let Err(e) = tokio::fs::remove_file(&self.path).await {
            tracing::warn!(event = "spool_file_not_removed", path = %self.path.display(), error = %relay_core::error::Report(&e));
        }
    }
}

/// What every connection shares.
pub(crate) struct Shared {
    pub resources: Resources,
    /// Where big messages are spilled while they arrive.
    pub spool_dir: std::path::PathBuf,
    pub session: Arc<SessionConfig>,
    pub policy: Arc<Policy>,
    pub spool: Arc<dyn Spool>,
    pub tls: Option<Tls>,
    pub delivery: Option<Delivery>,
    /// ETRN: in the embedded mode the worker, with the AWS backend the
    /// shared queue (any delivery process picks the released mail up).
    pub etrn: Option<Etrn>,
    /// The content filter (`[filter] rspamd`).
    pub filter: Option<relay_core::filter::Rspamd>,
    /// Sender authentication (domains with `auth` other than `off`).
    pub auth: Option<Arc<relay_core::auth::Authenticator>>,
    /// Where refusals are counted against the domains' open outages.
    pub history: Option<Arc<relay_core::outages::Recorder>>,
}

pub(crate) struct Etrn {
    /// Resolves the domain's primaries (who may ask).
    pub router: Arc<relay_core::delivery::Router>,
    pub release: Arc<dyn relay_core::delivery::etrn::Release>,
    pub networks: Vec<ipnet::IpNet>,
}

enum Conn {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    /// Only while the plain stream is handed to the TLS handshake.
    Closed,
}

/// Largest single read; lives on the stack only while reading so idle
/// connections hold no buffer.
const READ_CHUNK: usize = 32 * 1024;

/// Reads once and feeds what came to the session. The buffer exists only
/// during each poll (a connection waiting for input holds none), and
/// `poll_read` lets tokio know when the socket was drained, which saves the
/// read that would otherwise end in `WouldBlock` after every command.
async fn read_once<S: AsyncRead + Unpin>(s: &mut S, session: &mut Session) -> io::Result<usize> {
    std::future::poll_fn(|cx| {
        let mut storage = [std::mem::MaybeUninit::<u8>::uninit(); READ_CHUNK];
        let mut buf = ReadBuf::uninit(&mut storage);
        match std::pin::Pin::new(&mut *s).poll_read(cx, &mut buf) {
            Poll::Ready(Ok(())) => {
                let n = buf.filled().len();
                if n > 0 {
                    session.handle_input(buf.filled(), SystemTime::now());
                }
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}

impl Conn {
    /// Reads what is available and feeds it to the session. Ok(0) is EOF.
    async fn read_into(&mut self, session: &mut Session) -> io::Result<usize> {
        match self {
            Conn::Plain(s) => read_once(s, session).await,
            Conn::Tls(s) => read_once(s.as_mut(), session).await,
            Conn::Closed => Ok(0),
        }
    }

    async fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        match self {
            Conn::Plain(s) => s.write_all(data).await,
            Conn::Tls(s) => {
                s.write_all(data).await?;
                s.flush().await
            }
            Conn::Closed => Err(io::ErrorKind::NotConnected.into()),
        }
    }

    async fn shutdown(&mut self) {
        let _ = match self {
            Conn::Plain(s) => s.shutdown().await,
            Conn::Tls(s) => s.shutdown().await,
            Conn::Closed => Ok(()),
        };
    }
}

/// Appends the message's last data to its spool file and points the
/// message at the file.
async fn finish_spill(
    spill: &mut Spill,
    message: &mut relay_core::queue::AcceptedMessage,
) -> io::Result<()> {
    let tail = std::mem::take(&mut message.body);
    spill.write(tail).await?;
    message.spooled = Some(relay_core::queue::SpooledBody {
        path: spill.path.clone(),
        len: spill.len,
    });
    Ok(())
}

/// Runs one session to its end, inside a span that carries the session's
/// id and peer, so every event of the connection names them once.
pub(crate) async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    early: Vec<u8>,
    session_id: u64,
    shared: Arc<Shared>,
    shutdown: watch::Receiver<bool>,
) {
    let span = tracing::info_span!("session", session_id, peer = %peer);
    // `run` borrows the handler: an async fn that takes its argument by
    // value keeps two copies of it in its future (rust-lang/rust#62958),
    // and every idle connection would carry the second one.
    let mut handler = Handler::new(stream, peer, session_id, shared);
    handler.run(early, shutdown).instrument(span).await;
}

/// One connection's driver (mini-redis's `Handler`): its state in one
/// place, one method per request of the session.
struct Handler {
    conn: Conn,
    session: Session,
    peer: SocketAddr,
    session_id: u64,
    shared: Arc<Shared>,
    /// DNSBL lookups for the client, started with the session.
    lookups: ClientLookups,
    /// Bytes of the memory budget this session's message data holds.
    reserved: u64,
    /// The message being received, once it is too big to hold in memory.
    spill: Option<Spill>,
    /// Accepted recipients' domains that want their mail scanned.
    filtered_domains: Vec<relay_core::address::DomainName>,
    /// The transaction's sender authentication.
    auth: crate::sender_auth::Transaction,
}

/// Whether the connection goes on after a step.
enum Step {
    Continue,
    Close,
}

impl Handler {
    fn new(stream: TcpStream, peer: SocketAddr, session_id: u64, shared: Arc<Shared>) -> Self {
        let _ = stream.set_nodelay(true);
        // DNSBL lookups run while the greeting goes out.
        let lookups = ClientLookups::start(shared.policy.dnsbl.as_ref(), peer.ip());
        let session = Session::new(shared.session.clone(), peer.ip(), rand::random());
        Handler {
            conn: Conn::Plain(stream),
            session,
            peer,
            session_id,
            shared,
            lookups,
            reserved: 0,
            spill: None,
            filtered_domains: Vec::new(),
            auth: Default::default(),
        }
    }

    async fn run(&mut self, early: Vec<u8>, mut shutdown: watch::Receiver<bool>) {
        tracing::debug!(event = "session_start");
        if !early.is_empty() {
            // Bytes that came in with the PROXY header.
            self.session.handle_input(&early, SystemTime::now());
        }
        loop {
            self.count_rejections();
            let out = self.session.take_output();
            if !out.is_empty()
                && !matches!(
                    tokio::time::timeout(self.idle_timeout(), self.conn.write_all(&out)).await,
                    Ok(Ok(()))
                )
            {
                break;
            }
            let step = match self.session.poll_action() {
                Action::Read => self.read(&mut shutdown).await,
                Action::AdmitMail { size } => self.admit_mail(size),
                // These futures are big (policy, callouts, the store, a
                // TLS handshake) and boxed, so that every connection does
                // not carry their size while it waits for input.
                Action::CheckRecipient { recipient, sender } => {
                    Box::pin(self.check_recipient(recipient, sender)).await
                }
                Action::Store(message) => Box::pin(self.store(message)).await,
                Action::StartTls => Box::pin(self.start_tls()).await,
                Action::Etrn { node } => Box::pin(self.etrn(node)).await,
                Action::Close => Step::Close,
            };
            if let Step::Close = step {
                break;
            }
        }
        self.count_rejections();
        self.shared.resources.memory.release(self.reserved);
        if let Some(s) = self.spill.take() {
            s.remove().await;
        }
        self.conn.shutdown().await;
        tracing::debug!(event = "session_end");
    }

    fn idle_timeout(&self) -> Duration {
        self.shared.session.idle_timeout
    }

    /// The session counts its error replies; they are published here.
    fn count_rejections(&mut self) {
        for r in self.session.take_rejections() {
            metrics::counter!("backupmx_rejections_total", "reason" => r.reason, "code" => r.code.to_string())
                .increment(1);
        }
    }

    /// Waits for input (or the session's deadline, or shutdown while idle)
    /// and keeps the message data within the spill threshold and budget.
    async fn read(&mut self, shutdown: &mut watch::Receiver<bool>) -> Step {
        let memory = &self.shared.resources.memory;
        if !self.session.in_data() && self.reserved > 0 {
            // The message was stored or refused: its memory is free.
            memory.release(self.reserved);
            self.reserved = 0;
        }
        let idle = self.session.is_idle();
        if idle && *shutdown.borrow() {
            self.session.handle_shutdown();
            return Step::Continue;
        }
        // Slow clients (a byte now and then) never trip the idle timeout;
        // the session's deadline per command line and DATA phase bounds them.
        let deadline =
            tokio::time::Instant::from_std(self.session.poll_timeout(std::time::Instant::now()));
        let read = tokio::select! {
            r = tokio::time::timeout_at(deadline, self.conn.read_into(&mut self.session)) => r,
            _ = shutdown.changed(), if idle => return Step::Continue,
        };
        match read {
            Err(_) => {
                tracing::info!(event = "session_timeout");
                self.session.handle_timeout();
            }
            Ok(Ok(0)) | Ok(Err(_)) => return Step::Close,
            Ok(Ok(_)) => {}
        }
        if !self.session.in_data() && !self.session.is_storing() {
            if let Some(s) = self.spill.take() {
                // Refused at the end of DATA (size, loop, budget): removed
                // before the reply goes out.
                s.remove().await;
            }
        }
        if let Some(piece) = self.session.take_data_over(SPILL_AT) {
            let written = match self.spill.as_mut() {
                Some(s) => s.write(piece).await,
                None => match Spill::create(&self.shared.spool_dir, self.session_id).await {
                    Ok(mut s) => {
                        let w = s.write(piece).await;
                        self.spill = Some(s);
                        w
                    }
                    Err(e) => Err(e),
                },
            };
            if let Err(e) = written {
                tracing::error!(event = "spool_write_failed", error = %relay_core::error::Report(&e));
                self.session.refuse_data(Reply::new(
                    452,
                    "4.3.1",
                    "Insufficient system storage, try again later",
                ));
            }
        }
        let held = self.session.data_held() as u64;
        if held > self.reserved {
            if memory.try_reserve(held - self.reserved) {
                self.reserved = held;
            } else {
                metrics::counter!("backupmx_memory_budget_refusals_total").increment(1);
                tracing::warn!(
                    event = "memory_budget_exhausted",
                    held,
                    "message data refused: the memory budget (smtp.memory_budget) is in use"
                );
                self.session.refuse_data(Reply::new(
                    452,
                    "4.3.1",
                    "Insufficient system resources, try again later",
                ));
                memory.release(self.reserved);
                self.reserved = 0;
            }
        }
        Step::Continue
    }

    fn admit_mail(&mut self, size: Option<u64>) -> Step {
        // A new transaction: the last one's checks are over.
        self.auth = Default::default();
        let verdict = self.shared.resources.admit(size);
        if let Err(r) = &verdict {
            tracing::warn!(event = "mail_refused_resources", size, reply = %r);
        }
        self.session.mail_admitted(verdict, SystemTime::now());
        Step::Continue
    }

    async fn check_recipient(
        &mut self,
        recipient: relay_core::address::Mailbox,
        sender: relay_core::address::ReversePath,
    ) -> Step {
        let relay_core::policy::Checked {
            verdict,
            filter,
            auth,
            refusal,
        } = self
            .shared
            .policy
            .check(
                self.peer.ip(),
                &mut self.lookups,
                &sender,
                &recipient,
                SystemTime::now(),
            )
            .await;
        if let (true, relay_core::smtp::RcptVerdict::Accept { domain, .. }) = (filter, &verdict) {
            if !self.filtered_domains.contains(domain) {
                self.filtered_domains.push(domain.clone());
            }
        }
        if let (Some(checker), relay_core::smtp::RcptVerdict::Accept { domain, .. }) =
            (&self.shared.auth, &verdict)
        {
            let identity = relay_core::auth::Identity {
                client_ip: self.peer.ip(),
                helo: self.session.helo().to_string(),
                sender: sender.to_string(),
            };
            self.auth
                .recipient_accepted(checker, domain, auth, identity);
        }
        if let relay_core::smtp::RcptVerdict::Reject(r) = &verdict {
            tracing::info!(event = "recipient_rejected", rcpt = %recipient, reply = %r);
        }
        if let Some((domain, why)) = refusal {
            self.count_refusal(vec![domain], why);
        }
        self.session.recipient_checked(verdict, SystemTime::now());
        Step::Continue
    }

    async fn store(&mut self, mut message: Box<relay_core::queue::AcceptedMessage>) -> Step {
        let shared = self.shared.clone();
        let id = message.id.clone();
        let sender = message.sender.clone();
        let nrcpt = message.recipients.len();
        let domains: Vec<relay_core::address::DomainName> = message
            .recipients
            .iter()
            .map(|r| r.domain.clone())
            .collect();
        if let Some(d) = &shared.delivery {
            message.deferred = d.worker.deferred_until(&domains, SystemTime::now());
        }
        let mut spilled = self.spill.take();
        // The rest of a big message joins its first pieces in the file,
        // and the filter and the store read it from there.
        let finished = match spilled.as_mut() {
            Some(s) => finish_spill(s, &mut message)
                .await
                .map_err(|e| relay_core::store::StoreError::io("cannot write the spool file", e)),
            None => Ok(()),
        };
        // Sender authentication first (its refusal spares the filter), its
        // header last: first in the message, above our Received and the
        // filter's fields below it.
        let mut auth_header = None;
        if let (Ok(()), Some(checker)) = (&finished, &shared.auth) {
            let transaction = std::mem::take(&mut self.auth);
            let memory = &shared.resources.memory;
            match crate::sender_auth::check(checker, transaction, &message, memory).await {
                Ok(header) => auth_header = header,
                Err(reply) => {
                    tracing::info!(event = "message_refused_by_dmarc", queue_id = %id, from = %sender, nrcpt, reply = %reply);
                    self.count_refusal(domains, relay_core::history::Refusal::Auth);
                    return self.refuse_data(spilled, "dmarc", reply).await;
                }
            }
        }
        if let (Ok(()), Some(rspamd)) = (&finished, &shared.filter) {
            let wanted = message
                .recipients
                .iter()
                .any(|r| self.filtered_domains.contains(&r.domain));
            if wanted {
                if let Err(reply) = crate::filtering::scan(rspamd, &mut message).await {
                    tracing::info!(event = "message_refused_by_filter", queue_id = %id, from = %sender, nrcpt, reply = %reply);
                    self.count_refusal(domains, relay_core::history::Refusal::Filter);
                    return self.refuse_data(spilled, "filter", reply).await;
                }
            }
        }
        if let (Some(header), Some(checker)) = (auth_header, &shared.auth) {
            crate::sender_auth::annotate(checker, &mut message, header).await;
        }
        let size = message
            .spooled
            .as_ref()
            .map_or(message.body.len() as u64, |s| s.len);
        let result = match finished {
            Ok(()) => shared.spool.accept(*message).await,
            Err(e) => Err(e),
        };
        if let Some(s) = spilled {
            s.remove().await;
        }
        match &result {
            Ok(ids) => {
                metrics::counter!("backupmx_messages_accepted_total").increment(1);
                metrics::counter!("backupmx_bytes_accepted_total").increment(size);
                tracing::info!(event = "message_accepted", queue_id = %id, from = %sender, nrcpt,
                    size, entries = ids.len());
                if let Some(d) = &shared.delivery {
                    d.worker.queued(&domains.iter().collect::<Vec<_>>());
                }
            }
            Err(e) => {
                tracing::error!(event = "store_failed", queue_id = %id, error = %relay_core::error::Report(&e));
            }
        }
        self.session
            .message_stored(result.map(|_| id).map_err(|_| ()), SystemTime::now());
        Step::Continue
    }

    /// Counts a refusal against each domain's open outage, off the reply's
    /// path (a store write the client need not wait for).
    fn count_refusal(
        &self,
        mut domains: Vec<relay_core::address::DomainName>,
        why: relay_core::history::Refusal,
    ) {
        let Some(history) = self.shared.history.clone() else {
            return;
        };
        domains.sort();
        domains.dedup();
        tokio::spawn(async move {
            let now = relay_core::time::unix_seconds(SystemTime::now());
            for d in domains {
                history.refused(&d, why, now).await;
            }
        });
    }

    /// A message refused once its data was in (`reason` for the
    /// rejection counter): its spool file goes, the client gets `reply`.
    async fn refuse_data(
        &mut self,
        spilled: Option<Spill>,
        reason: &'static str,
        reply: Reply,
    ) -> Step {
        if let Some(s) = spilled {
            s.remove().await;
        }
        self.session
            .message_refused(reason, reply, SystemTime::now());
        Step::Continue
    }

    async fn start_tls(&mut self) -> Step {
        let Some(tls) = self.shared.tls.clone() else {
            return Step::Close;
        };
        // The session never asks twice; a TLS stream here is a bug, not a
        // peer's doing. The placeholder is never used: the connection either
        // becomes the TLS stream or is closed.
        let tcp = match std::mem::replace(&mut self.conn, Conn::Closed) {
            Conn::Plain(tcp) => tcp,
            Conn::Tls(_) | Conn::Closed => return Step::Close,
        };
        match tokio::time::timeout(self.idle_timeout(), tls.acceptor().accept(tcp)).await {
            Ok(Ok(stream)) => {
                let (_, state) = stream.get_ref();
                let description = format!(
                    "version={} cipher={}",
                    state
                        .protocol_version()
                        .map(|v| format!("{v:?}"))
                        .unwrap_or_default(),
                    state
                        .negotiated_cipher_suite()
                        .map(|c| format!("{:?}", c.suite()))
                        .unwrap_or_default()
                );
                self.conn = Conn::Tls(Box::new(stream));
                self.session.tls_established(description);
                Step::Continue
            }
            Ok(Err(e)) => {
                tracing::info!(event = "tls_failed", error = %relay_core::error::Report(&e));
                Step::Close
            }
            Err(_) => Step::Close,
        }
    }

    async fn etrn(&mut self, node: String) -> Step {
        let shared = self.shared.clone();
        let reply = match &shared.etrn {
            Some(e) => {
                relay_core::delivery::etrn::handle(
                    &node,
                    self.peer.ip(),
                    &e.networks,
                    shared.policy.registry.as_ref(),
                    &e.router,
                    e.release.as_ref(),
                )
                .await
            }
            None => Reply::new(502, "5.5.1", "Error: command not implemented"),
        };
        tracing::info!(event = "etrn", node = %node, reply = %reply);
        self.session.etrn_done(reply, SystemTime::now());
        Step::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn future_size<A, B, C, D, E, G, F: std::future::Future>(
        _: fn(A, B, C, D, E, G) -> F,
    ) -> usize {
        std::mem::size_of::<F>()
    }

    /// Every connection's task holds this future while it waits for input:
    /// 10 000 idle sessions must stay well under 100 MiB. A big future
    /// awaited inline (the store, callouts, a TLS handshake) or a handler
    /// moved into an async fn (kept twice) made it 6 KiB before.
    #[test]
    fn an_idle_session_holds_a_small_future() {
        let size = future_size(serve);
        assert!(size <= 2560, "the session future is {size} bytes");
    }
}
