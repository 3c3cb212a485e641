//! The SMTP server session as a sans-I/O state machine (RFC 5321 §4).
//!
//! Bytes and the current time go in through [`Session::handle_input`]; reply
//! bytes come out of [`Session::take_output`] and requests for the driver
//! (check a recipient, store a message, start TLS, close) come out of
//! [`Session::poll_action`]. While a request is outstanding the session
//! processes nothing else, so pipelined commands (RFC 2920) are answered in
//! order. No sockets, no clocks, no storage here.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use super::command::{self, Body, Command, MailParams, RcptParams, SyntaxError};
use super::data::{scan_headers, DataReceiver, HeaderFacts, Progress};
use super::reply::Reply;
use crate::address::{DomainName, Mailbox, ReversePath};
use crate::queue::{AcceptedMessage, AcceptedRecipient, QueueId, RcptDsn, TlsRequest};
use crate::time::rfc5322_date;

/// Limits and identity for every session of a listener.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Our name in the greeting, EHLO reply and Received header.
    pub hostname: String,
    /// Largest message in octets (advertised in EHLO's SIZE).
    pub max_message_size: u64,
    /// Most recipients in one transaction; more get 452 (RFC 5321 §4.5.3.1.8).
    pub max_recipients: usize,
    /// Longest command line including CRLF (RFC 5321 §4.5.3.1.4: 512).
    pub max_command_line: usize,
    /// Errors tolerated before the session is closed with 421.
    pub max_errors: u32,
    /// More `Received:` headers than this is a mail loop (RFC 5321 §6.3).
    pub max_received_headers: usize,
    /// STARTTLS is offered.
    pub tls_available: bool,
    /// ETRN is offered (a delivery worker runs in this process).
    pub etrn_available: bool,
    /// Where `RCPT TO:<postmaster>` (no domain) goes: an address and the
    /// domain it is routed by. `None` refuses it with 550 5.1.1.
    pub postmaster: Option<AcceptedRecipient>,
    /// Ask the driver before each MAIL is accepted ([`Action::AdmitMail`]):
    /// whether there is disk space and memory for a new message.
    pub admit_mail: bool,
    /// Longest wait for input while the client owes nothing (RFC 5321
    /// §4.5.3.2: at least 5 minutes); also the bound on each write.
    pub idle_timeout: Duration,
    /// Longest DATA phase. A command line must be complete within
    /// `idle_timeout` of its first byte, so a client sending a byte now and
    /// then cannot hold a session forever.
    pub data_timeout: Duration,
}

impl SessionConfig {
    /// The defaults, the only ones: relay-core's configuration takes its
    /// `[smtp]` defaults from here.
    pub const DEFAULT: SessionConfig = SessionConfig {
        hostname: String::new(),
        max_message_size: 36_700_160,
        max_recipients: 100,
        max_command_line: 512,
        max_errors: 20,
        max_received_headers: 100,
        tls_available: false,
        etrn_available: false,
        postmaster: None,
        admit_mail: false,
        idle_timeout: Duration::from_secs(300),
        data_timeout: Duration::from_secs(600),
    };
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            hostname: "localhost".into(),
            ..SessionConfig::DEFAULT
        }
    }
}

/// What the driver is asked to do next.
#[derive(Debug)]
pub enum Action {
    /// Nothing pending: read more input.
    Read,
    /// Decide on this recipient and call [`Session::recipient_checked`].
    CheckRecipient {
        /// The recipient asked for.
        recipient: Mailbox,
        /// The transaction's sender.
        sender: ReversePath,
    },
    /// Store durably and call [`Session::message_stored`].
    Store(Box<AcceptedMessage>),
    /// Flush output, run the TLS handshake, call [`Session::tls_established`].
    StartTls,
    /// Decide on an ETRN request and call [`Session::etrn_done`].
    Etrn {
        /// The ETRN node (a domain, or `@domain`, `#queue`).
        node: String,
    },
    /// Is there room for a new message (of `size` bytes, when declared)?
    /// Call [`Session::mail_admitted`].
    AdmitMail {
        /// The size declared with SIZE=, if any.
        size: Option<u64>,
    },
    /// Flush output and close the connection.
    Close,
}

/// One error reply the session sent, for the driver's counters: the
/// session counts, the driver publishes ([`Session::take_rejections`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejection {
    /// Why: `syntax`, `sequence`, `recipient`, `size`, `loop`, `storage`,
    /// `resources`, `too_many_recipients`, `etrn`, …
    pub reason: &'static str,
    /// The reply code sent.
    pub code: u16,
}

/// The verdict on one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RcptVerdict {
    /// Accept, for this hosted domain.
    Accept {
        /// The hosted domain the recipient belongs to.
        domain: DomainName,
        /// The domain's own size limit, if it has one.
        max_message_size: Option<u64>,
    },
    /// Refuse with this reply.
    Reject(Reply),
}

#[derive(Debug)]
enum Mode {
    Command,
    Data(DataReceiver),
    /// Reading a BDAT chunk (RFC 3030): `remaining` octets are data,
    /// whatever they look like. With `refusal`, the chunk is read and
    /// dropped, and the refusal is its reply.
    Chunk {
        remaining: u64,
        last: bool,
        refusal: Option<(&'static str, Reply)>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Waiting {
    Nothing,
    Recipient,
    Admit,
    Store,
    Tls,
    Etrn,
    Closed,
}

#[derive(Debug)]
struct Transaction {
    sender: ReversePath,
    params: MailParams,
    recipients: Vec<AcceptedRecipient>,
    /// The smallest size limit among the global and accepted domains'.
    size_limit: u64,
    pending_recipient: Option<(Mailbox, RcptDsn)>,
    /// Given at DATA, when our Received header is written.
    id: Option<QueueId>,
    /// The message so far, from the BDAT chunks received (RFC 3030).
    chunks: Option<DataReceiver>,
}

/// One SMTP server session.
#[derive(Debug)]
pub struct Session {
    cfg: Arc<SessionConfig>,
    peer: IpAddr,
    helo: Option<(String, bool)>,
    tls: Option<String>,
    tx: Option<Transaction>,
    mode: Mode,
    inbuf: Vec<u8>,
    out: Vec<u8>,
    action: Option<Action>,
    waiting: Waiting,
    errors: u32,
    discarding_long_line: bool,
    /// A MAIL waiting for [`Session::mail_admitted`].
    pending_mail: Option<(ReversePath, MailParams)>,
    /// The reply for the end of the current DATA, when the driver stopped
    /// it being kept ([`Session::refuse_data`]).
    data_refusal: Option<Reply>,
    /// The header section as read from the first piece of data handed
    /// out by [`Session::take_data_over`] (gone from memory then).
    headers_of_first_piece: Option<HeaderFacts>,
    /// Error replies not yet handed to the driver.
    rejections: Vec<Rejection>,
    /// State of the generator of queue ids' random part (SplitMix64),
    /// seeded by the driver: this crate draws no random numbers.
    id_state: u64,
    /// When the current command line or DATA phase must be complete.
    deadline: Option<Instant>,
}

impl Session {
    /// Starts a session and queues the 220 greeting. `id_seed` seeds the
    /// random part of the queue ids this session gives out; the driver
    /// draws it from a CSPRNG so ids never collide across sessions.
    pub fn new(cfg: Arc<SessionConfig>, peer: IpAddr, id_seed: u64) -> Self {
        let mut s = Session {
            cfg,
            peer,
            helo: None,
            tls: None,
            tx: None,
            mode: Mode::Command,
            inbuf: Vec::new(),
            out: Vec::new(),
            action: None,
            waiting: Waiting::Nothing,
            errors: 0,
            discarding_long_line: false,
            pending_mail: None,
            data_refusal: None,
            headers_of_first_piece: None,
            rejections: Vec::new(),
            id_state: id_seed,
            deadline: None,
        };
        let greeting = Reply::new(220, "", format!("{} ESMTP backupmx", s.cfg.hostname));
        s.reply(&greeting);
        s
    }

    /// The reply for a connection refused before a session starts.
    pub fn refuse(hostname: &str, why: &str) -> Reply {
        Reply::new(421, "4.7.0", format!("{hostname} {why}, try again later"))
    }

    /// The client's address.
    pub fn peer(&self) -> IpAddr {
        self.peer
    }

    /// The name the client gave in HELO/EHLO (empty before it did).
    pub fn helo(&self) -> &str {
        self.helo.as_ref().map_or("", |(name, _)| name.as_str())
    }

    /// Error replies sent since the last call, for the driver's counters.
    pub fn take_rejections(&mut self) -> std::vec::Drain<'_, Rejection> {
        self.rejections.drain(..)
    }

    /// When the driver must call [`Session::handle_timeout`] if no input
    /// comes before: the idle timeout from `now`, or sooner the deadline of
    /// the command line or DATA phase under way.
    pub fn poll_timeout(&mut self, now: Instant) -> Instant {
        if self.is_idle() {
            self.deadline = None;
        } else if self.deadline.is_none() {
            let limit = if self.in_data() {
                self.cfg.data_timeout
            } else {
                self.cfg.idle_timeout
            };
            self.deadline = Some(now + limit);
        }
        let idle = now + self.cfg.idle_timeout;
        self.deadline.map_or(idle, |d| d.min(idle))
    }

    /// The next queue id (RFC 5321 leaves ids to us; ours sort by arrival).
    fn next_queue_id(&mut self, now: SystemTime) -> QueueId {
        // SplitMix64 (Steele, Lea, Flood 2014): every seed gives a full
        // period, and successive outputs are well mixed.
        self.id_state = self.id_state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.id_state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        QueueId::new(now, z ^ (z >> 31))
    }

    /// Reply bytes produced so far.
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }

    /// Replies are waiting to be written.
    pub fn has_output(&self) -> bool {
        !self.out.is_empty()
    }

    /// The next request for the driver.
    pub fn poll_action(&mut self) -> Action {
        if let Some(a) = self.action.take() {
            return a;
        }
        if self.waiting == Waiting::Closed {
            Action::Close
        } else {
            Action::Read
        }
    }

    /// Between commands, with nothing outstanding: safe to close on shutdown.
    pub fn is_idle(&self) -> bool {
        matches!(self.mode, Mode::Command)
            && self.waiting == Waiting::Nothing
            && self.inbuf.is_empty()
            && !self.in_chunked_message()
    }

    /// Receiving message data: after 354, or from the first BDAT chunk
    /// until the last.
    pub fn in_data(&self) -> bool {
        !matches!(self.mode, Mode::Command) || self.in_chunked_message()
    }

    fn in_chunked_message(&self) -> bool {
        self.tx.as_ref().is_some_and(|tx| tx.chunks.is_some())
    }

    /// The receiver of the message under way (DATA or BDAT), if any.
    fn receiver(&mut self) -> Option<&mut DataReceiver> {
        match &mut self.mode {
            Mode::Data(recv) => Some(recv),
            _ => self.tx.as_mut().and_then(|tx| tx.chunks.as_mut()),
        }
    }

    /// A message waits for [`Action::Store`] to be answered.
    pub fn is_storing(&self) -> bool {
        self.waiting == Waiting::Store
    }

    /// Bytes of memory the message being received holds now.
    pub fn data_held(&self) -> usize {
        match &self.mode {
            Mode::Data(recv) => recv.held(),
            _ => self
                .tx
                .as_ref()
                .and_then(|tx| tx.chunks.as_ref())
                .map_or(0, DataReceiver::held),
        }
    }

    /// Message data held in memory once it reaches `threshold` bytes, for
    /// the driver to move to its spool file; the first piece starts with
    /// our Received header. `None` below the threshold. The message then
    /// comes out of [`Action::Store`] with only what arrived after the last
    /// piece, which the driver appends to its file.
    pub fn take_data_over(&mut self, threshold: usize) -> Option<Vec<u8>> {
        if self.data_refusal.is_some() {
            return None;
        }
        let recv = self.receiver()?;
        if recv.kept() < threshold {
            return None;
        }
        let first = (recv.taken() == 0).then(|| scan_headers(recv.data()));
        // Room for one more read (twice over: bare LFs become CRLF).
        let piece = recv.take_kept(threshold + 64 * 1024);
        if first.is_some() {
            self.headers_of_first_piece = first;
        }
        Some(piece)
    }

    /// Stops keeping the message being received (its memory is freed at
    /// once); the rest of the data is read and `reply` answers its end.
    pub fn refuse_data(&mut self, reply: Reply) {
        if let Some(recv) = self.receiver() {
            recv.discard();
            self.data_refusal = Some(reply);
        }
    }

    /// The session has ended (QUIT, an error limit, a timeout, shutdown).
    pub fn is_closed(&self) -> bool {
        self.waiting == Waiting::Closed
    }

    /// Feeds bytes read from the client.
    pub fn handle_input(&mut self, bytes: &[u8], now: SystemTime) {
        if self.waiting == Waiting::Closed {
            return;
        }
        // DATA fast path: hand the bytes straight to the receiver.
        if self.inbuf.is_empty() && self.waiting == Waiting::Nothing {
            if matches!(self.mode, Mode::Chunk { .. }) {
                let n = self.feed_chunk(bytes);
                self.inbuf.extend_from_slice(&bytes[n..]);
                self.process(now);
                return;
            }
            if let Mode::Data(recv) = &mut self.mode {
                match recv.feed(bytes) {
                    Progress::NeedMore => return,
                    Progress::Done(n) => {
                        self.inbuf.extend_from_slice(&bytes[n..]);
                        self.finish_data(now);
                        self.process(now);
                        return;
                    }
                }
            }
        }
        self.inbuf.extend_from_slice(bytes);
        self.process(now);
    }

    /// The client was idle too long (RFC 5321 §4.5.3.2).
    pub fn handle_timeout(&mut self) {
        let r = Reply::new(
            421,
            "4.4.2",
            format!("{} Error: timeout exceeded", self.cfg.hostname),
        );
        self.close_with(&r);
    }

    /// The server is shutting down; only call while [`Session::is_idle`].
    pub fn handle_shutdown(&mut self) {
        let r = Reply::new(
            421,
            "4.3.2",
            format!(
                "{} Service shutting down, closing connection",
                self.cfg.hostname
            ),
        );
        self.close_with(&r);
    }

    /// The answer to [`Action::CheckRecipient`].
    pub fn recipient_checked(&mut self, verdict: RcptVerdict, now: SystemTime) {
        if self.waiting != Waiting::Recipient {
            return;
        }
        self.waiting = Waiting::Nothing;
        let Some(tx) = self.tx.as_mut() else { return };
        let Some((mailbox, dsn)) = tx.pending_recipient.take() else {
            return;
        };
        match verdict {
            RcptVerdict::Accept {
                domain,
                max_message_size,
            } => {
                if let (Some(limit), Some(declared)) = (max_message_size, tx.params.size) {
                    if declared > limit {
                        self.reject(
                            "size",
                            Reply::new(
                                552,
                                "5.3.4",
                                "Message size exceeds the recipient domain's limit",
                            ),
                        );
                        self.process(now);
                        return;
                    }
                }
                if let Some(limit) = max_message_size {
                    tx.size_limit = tx.size_limit.min(limit);
                }
                // The same recipient twice in one transaction is delivered
                // once (RFC 5321 §3.3 lets a server drop duplicates, as
                // Postfix does). It is still checked: the answer may differ.
                let address = mailbox.to_string();
                if tx.recipients.iter().any(|r| r.address == address) {
                    self.reply(&Reply::new(250, "2.1.5", "Ok (duplicate recipient)"));
                } else {
                    tx.recipients.push(AcceptedRecipient {
                        address,
                        domain,
                        dsn,
                    });
                    self.reply(&Reply::new(250, "2.1.5", "Ok"));
                }
            }
            RcptVerdict::Reject(reply) => self.reject("recipient", reply),
        }
        self.process(now);
    }

    /// The answer to [`Action::Store`]: the queue id on success.
    pub fn message_stored(&mut self, result: Result<QueueId, ()>, now: SystemTime) {
        if self.waiting != Waiting::Store {
            return;
        }
        self.waiting = Waiting::Nothing;
        match result {
            Ok(id) => self.reply(&Reply::new(250, "2.0.0", format!("Ok: queued as {id}"))),
            Err(()) => {
                self.rejections.push(Rejection {
                    reason: "storage",
                    code: 451,
                });
                self.reply(&Reply::new(
                    451,
                    "4.3.0",
                    "Error: could not store the message, try again later",
                ));
            }
        }
        self.process(now);
    }

    /// The answer to [`Action::Store`] when the message was refused before
    /// it was stored (a content filter's verdict): `reason` is counted
    /// like the session's other refusals.
    pub fn message_refused(&mut self, reason: &'static str, reply: Reply, now: SystemTime) {
        if self.waiting != Waiting::Store {
            return;
        }
        self.waiting = Waiting::Nothing;
        self.rejections.push(Rejection {
            reason,
            code: reply.code,
        });
        self.reply(&reply);
        self.process(now);
    }

    /// The answer to [`Action::AdmitMail`]: `Err` carries the refusal.
    pub fn mail_admitted(&mut self, result: Result<(), Reply>, now: SystemTime) {
        if self.waiting != Waiting::Admit {
            return;
        }
        self.waiting = Waiting::Nothing;
        let Some((sender, params)) = self.pending_mail.take() else {
            return;
        };
        match result {
            Ok(()) => self.open_transaction(sender, params),
            Err(reply) => self.reject("resources", reply),
        }
        self.process(now);
    }

    /// The answer to [`Action::Etrn`].
    pub fn etrn_done(&mut self, reply: Reply, now: SystemTime) {
        if self.waiting != Waiting::Etrn {
            return;
        }
        self.waiting = Waiting::Nothing;
        if reply.is_positive() {
            self.reply(&reply);
        } else {
            self.reject("etrn", reply);
        }
        self.process(now);
    }

    /// The TLS handshake finished; `description` goes into Received.
    /// RFC 3207 §4.2: all state from before TLS is forgotten.
    pub fn tls_established(&mut self, description: String) {
        if self.waiting != Waiting::Tls {
            return;
        }
        self.waiting = Waiting::Nothing;
        self.tls = Some(description);
        self.helo = None;
        self.tx = None;
        self.inbuf.clear();
    }

    fn reply(&mut self, r: &Reply) {
        r.write_to(&mut self.out);
    }

    fn close_with(&mut self, r: &Reply) {
        self.reply(r);
        self.waiting = Waiting::Closed;
        self.action = None;
        self.inbuf.clear();
    }

    /// An error reply that counts towards the error limit.
    fn reject(&mut self, reason: &'static str, r: Reply) {
        self.rejections.push(Rejection {
            reason,
            code: r.code,
        });
        self.reply(&r);
        self.errors += 1;
        if self.errors >= self.cfg.max_errors {
            let bye = Reply::new(
                421,
                "4.7.0",
                format!("{} Error: too many errors", self.cfg.hostname),
            );
            self.close_with(&bye);
        }
    }

    fn process(&mut self, now: SystemTime) {
        while self.waiting == Waiting::Nothing {
            if let Mode::Chunk { remaining, .. } = self.mode {
                if remaining > 0 {
                    if self.inbuf.is_empty() {
                        return;
                    }
                    let input = std::mem::take(&mut self.inbuf);
                    let n = self.feed_chunk(&input);
                    self.inbuf = input;
                    self.inbuf.drain(..n);
                    continue;
                }
                self.chunk_done(now);
                continue;
            }
            if let Mode::Data(recv) = &mut self.mode {
                match recv.feed(&self.inbuf) {
                    Progress::NeedMore => {
                        self.inbuf.clear();
                        return;
                    }
                    Progress::Done(n) => {
                        self.inbuf.drain(..n);
                        self.finish_data(now);
                        continue;
                    }
                }
            }
            let Some(lf) = memchr::memchr(b'\n', &self.inbuf) else {
                if self.inbuf.len() > self.cfg.max_command_line {
                    // Drop what we have; the reply comes when the line ends.
                    self.discarding_long_line = true;
                    self.inbuf.clear();
                }
                return;
            };
            let line: Vec<u8> = self.inbuf.drain(..=lf).collect();
            let content = line
                .strip_suffix(b"\r\n")
                .or_else(|| line.strip_suffix(b"\n"))
                .unwrap_or(&line);
            if std::mem::take(&mut self.discarding_long_line)
                || content.len() + 2 > self.cfg.max_command_line
            {
                self.reject("syntax", Reply::new(500, "5.5.2", "Error: line too long"));
                continue;
            }
            let content = content.to_vec();
            self.handle_command(&content, now);
        }
    }

    fn handle_command(&mut self, line: &[u8], now: SystemTime) {
        let cmd = match command::parse(line) {
            Ok(c) => c,
            Err(SyntaxError(r)) if command::is_bdat(line) => {
                // Where the chunk ends is unknown: its data would be read
                // as commands. Postfix ends the session too.
                self.rejections.push(Rejection {
                    reason: "syntax",
                    code: r.code,
                });
                return self.close_with(&r);
            }
            Err(SyntaxError(r)) => return self.reject("syntax", r),
        };
        match cmd {
            Command::Ehlo(name) => {
                self.tx = None;
                let mut lines = vec![
                    self.cfg.hostname.clone(),
                    "PIPELINING".into(),
                    format!("SIZE {}", self.cfg.max_message_size),
                    "8BITMIME".into(),
                    "SMTPUTF8".into(),
                    "ENHANCEDSTATUSCODES".into(),
                    "DSN".into(),
                    "CHUNKING".into(),
                ];
                if self.cfg.tls_available && self.tls.is_none() {
                    lines.push("STARTTLS".into());
                }
                if self.tls.is_some() {
                    // RFC 8689 §4: only where the sender's session is
                    // protected.
                    lines.push("REQUIRETLS".into());
                }
                if self.cfg.etrn_available {
                    lines.push("ETRN".into());
                }
                self.helo = Some((name, true));
                self.reply(&Reply::multiline(250, "", lines));
            }
            Command::Helo(name) => {
                self.tx = None;
                self.helo = Some((name, false));
                let r = Reply::new(250, "", self.cfg.hostname.clone());
                self.reply(&r);
            }
            Command::Mail(sender, params) => self.mail(sender, params),
            Command::Rcpt(mailbox, params) => self.rcpt(mailbox, params),
            Command::RcptPostmaster(params) => self.rcpt_postmaster(params),
            Command::Data => self.data(now),
            Command::Bdat { size, last } => self.bdat(size, last, now),
            Command::Rset => {
                self.tx = None;
                self.reply(&Reply::new(250, "2.0.0", "Ok"));
            }
            Command::Noop => self.reply(&Reply::new(250, "2.0.0", "Ok")),
            Command::Quit => {
                let r = Reply::new(221, "2.0.0", "Bye");
                self.close_with(&r);
            }
            Command::Vrfy => self.reply(&Reply::new(
                252,
                "2.0.0",
                "Cannot VRFY user, but will accept message and attempt delivery",
            )),
            Command::Help => self.reply(&Reply::new(
                214,
                "2.0.0",
                "Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP STARTTLS ETRN",
            )),
            Command::StartTls => self.starttls(),
            Command::Etrn(node) => self.etrn(node),
            Command::NotImplemented(_) => {
                self.reject(
                    "syntax",
                    Reply::new(502, "5.5.1", "Error: command not implemented"),
                );
            }
        }
    }

    fn mail(&mut self, sender: ReversePath, params: MailParams) {
        if self.helo.is_none() {
            return self.reject(
                "sequence",
                Reply::new(503, "5.5.1", "Error: send HELO/EHLO first"),
            );
        }
        if self.tx.is_some() {
            return self.reject(
                "sequence",
                Reply::new(503, "5.5.1", "Error: nested MAIL command"),
            );
        }
        if let Some(size) = params.size {
            if size > self.cfg.max_message_size {
                return self.reject(
                    "size",
                    Reply::new(
                        552,
                        "5.3.4",
                        "Message size exceeds fixed maximum message size",
                    ),
                );
            }
        }
        if params.requiretls && self.tls.is_none() {
            return self.reject(
                "sequence",
                Reply::new(
                    530,
                    "5.7.10",
                    "REQUIRETLS needs a TLS session: STARTTLS first",
                ),
            );
        }
        if let ReversePath::Mailbox(m) = &sender {
            if !m.is_ascii() && !params.smtputf8 {
                return self.reject(
                    "syntax",
                    Reply::new(553, "5.6.7", "Non-ASCII sender address requires SMTPUTF8"),
                );
            }
        }
        if self.cfg.admit_mail {
            let size = params.size;
            self.pending_mail = Some((sender, params));
            self.waiting = Waiting::Admit;
            self.action = Some(Action::AdmitMail { size });
            return;
        }
        self.open_transaction(sender, params);
    }

    fn open_transaction(&mut self, sender: ReversePath, params: MailParams) {
        self.tx = Some(Transaction {
            sender,
            params,
            recipients: Vec::new(),
            size_limit: self.cfg.max_message_size,
            pending_recipient: None,
            id: None,
            chunks: None,
        });
        self.reply(&Reply::new(250, "2.1.0", "Ok"));
    }

    fn rcpt(&mut self, mailbox: Mailbox, params: RcptParams) {
        let max = self.cfg.max_recipients;
        let Some(tx) = self.tx.as_mut() else {
            return self.reject(
                "sequence",
                Reply::new(503, "5.5.1", "Error: need MAIL command"),
            );
        };
        if tx.recipients.len() >= max {
            // RFC 5321 §4.5.3.1.10: 452 and the client sends the rest later.
            self.rejections.push(Rejection {
                reason: "too_many_recipients",
                code: 452,
            });
            return self.reply(&Reply::new(452, "4.5.3", "Error: too many recipients"));
        }
        if !mailbox.is_ascii() && !tx.params.smtputf8 {
            return self.reject(
                "syntax",
                Reply::new(
                    553,
                    "5.6.7",
                    "Non-ASCII recipient address requires SMTPUTF8",
                ),
            );
        }
        tx.pending_recipient = Some((mailbox.clone(), params.dsn));
        self.waiting = Waiting::Recipient;
        self.action = Some(Action::CheckRecipient {
            recipient: mailbox,
            sender: tx.sender.clone(),
        });
    }

    /// RFC 5321 §4.5.1: the bare `postmaster` is always accepted, and goes
    /// to the configured postmaster address without relay control, DNSBL
    /// or greylisting (a listed sender must still reach a human).
    fn rcpt_postmaster(&mut self, params: RcptParams) {
        let max = self.cfg.max_recipients;
        let Some(mut target) = self.cfg.postmaster.clone() else {
            return self.reject(
                "recipient",
                Reply::new(
                    550,
                    "5.1.1",
                    "<postmaster>: no postmaster address is configured",
                ),
            );
        };
        let Some(tx) = self.tx.as_mut() else {
            return self.reject(
                "sequence",
                Reply::new(503, "5.5.1", "Error: need MAIL command"),
            );
        };
        if !tx.recipients.iter().any(|r| r.address == target.address) {
            if tx.recipients.len() >= max {
                return self.reply(&Reply::new(452, "4.5.3", "Error: too many recipients"));
            }
            target.dsn = params.dsn;
            tx.recipients.push(target);
        }
        self.reply(&Reply::new(250, "2.1.5", "Ok"));
    }

    fn data(&mut self, now: SystemTime) {
        let Some(tx) = self.tx.as_mut() else {
            return self.reject(
                "sequence",
                Reply::new(503, "5.5.1", "Error: need RCPT command"),
            );
        };
        if tx.recipients.is_empty() {
            return self.reject(
                "sequence",
                Reply::new(554, "5.5.1", "Error: no valid recipients"),
            );
        }
        if tx.chunks.is_some() {
            // RFC 3030 §2: DATA and BDAT are not mixed in one transaction.
            return self.reject(
                "sequence",
                Reply::new(503, "5.5.1", "Error: DATA after BDAT in one transaction"),
            );
        }
        let Some(recv) = self.start_message(now) else {
            return;
        };
        self.mode = Mode::Data(recv);
        self.reply(&Reply::new(354, "", "End data with <CR><LF>.<CR><LF>"));
    }

    /// `BDAT size [LAST]`: the next `size` octets are read whatever the
    /// transaction's state, so a refused chunk never turns into commands.
    fn bdat(&mut self, size: u64, last: bool, now: SystemTime) {
        let refusal = match &self.tx {
            None => Some((
                "sequence",
                Reply::new(503, "5.5.1", "Error: need MAIL command"),
            )),
            Some(tx) if tx.recipients.is_empty() => Some((
                "sequence",
                Reply::new(554, "5.5.1", "Error: no valid recipients"),
            )),
            Some(tx) if tx.chunks.is_none() => match self.start_message(now) {
                Some(recv) => {
                    if let Some(tx) = self.tx.as_mut() {
                        tx.chunks = Some(recv);
                    }
                    None
                }
                None => return,
            },
            Some(_) => None,
        };
        self.mode = Mode::Chunk {
            remaining: size,
            last,
            refusal,
        };
    }

    /// Takes up to the rest of the current chunk from `input`; returns
    /// the octets taken.
    fn feed_chunk(&mut self, input: &[u8]) -> usize {
        let Mode::Chunk {
            remaining, refusal, ..
        } = &mut self.mode
        else {
            return 0;
        };
        let n = usize::try_from(*remaining).map_or(input.len(), |r| r.min(input.len()));
        *remaining -= n as u64;
        if refusal.is_none() {
            if let Some(recv) = self.tx.as_mut().and_then(|tx| tx.chunks.as_mut()) {
                recv.feed_raw(&input[..n]);
            }
        }
        n
    }

    /// A chunk has been read: answer it, and store the message after the
    /// last one. A refused chunk ends the transaction (RFC 3030 §2: the
    /// client must not go on with it).
    fn chunk_done(&mut self, now: SystemTime) {
        let Mode::Chunk { last, refusal, .. } = std::mem::replace(&mut self.mode, Mode::Command)
        else {
            return;
        };
        if let Some((reason, reply)) = refusal {
            return self.reject(reason, reply);
        }
        let Some(mut tx) = self.tx.take() else { return };
        let Some(recv) = tx.chunks.take() else { return };
        if last {
            return self.finish_message(tx, recv, now);
        }
        if let Some((reason, reply)) = self.message_fault(&recv) {
            return self.reject(reason, reply);
        }
        let received = recv.size();
        tx.chunks = Some(recv);
        self.tx = Some(tx);
        self.reply(&Reply::new(
            250,
            "2.0.0",
            format!("Ok: {received} octets received"),
        ));
    }

    /// A receiver for a new message, our trace header written first. The
    /// header is written now, as Postfix does at DATA, so the client's
    /// data lands right behind it and is never copied again.
    fn start_message(&mut self, now: SystemTime) -> Option<DataReceiver> {
        let id = self.next_queue_id(now);
        let tx = self.tx.as_mut()?;
        let limit = usize::try_from(tx.size_limit).unwrap_or(usize::MAX);
        let (helo, esmtp) = self.helo.clone().unwrap_or_default();
        let header = received_header(&ReceivedFields {
            helo: &helo,
            peer: self.peer,
            hostname: &self.cfg.hostname,
            protocol: protocol_name(esmtp, tx.params.smtputf8, self.tls.is_some()),
            tls: self.tls.as_deref(),
            id: &id,
            single_recipient: (tx.recipients.len() == 1).then(|| tx.recipients[0].address.as_str()),
            date: now,
        });
        tx.id = Some(id);
        self.headers_of_first_piece = None;
        self.data_refusal = None;
        Some(DataReceiver::with_prefix(limit, header.as_bytes()))
    }

    fn etrn(&mut self, node: String) {
        if !self.cfg.etrn_available {
            return self.reject(
                "syntax",
                Reply::new(502, "5.5.1", "Error: command not implemented"),
            );
        }
        if self.helo.is_none() {
            return self.reject(
                "sequence",
                Reply::new(503, "5.5.1", "Error: send HELO/EHLO first"),
            );
        }
        if self.tx.is_some() {
            return self.reject(
                "sequence",
                Reply::new(
                    503,
                    "5.5.1",
                    "Error: ETRN not allowed in a mail transaction",
                ),
            );
        }
        self.waiting = Waiting::Etrn;
        self.action = Some(Action::Etrn { node });
    }

    fn starttls(&mut self) {
        if self.tls.is_some() {
            return self.reject(
                "sequence",
                Reply::new(503, "5.5.1", "Error: TLS already active"),
            );
        }
        if !self.cfg.tls_available {
            return self.reject(
                "syntax",
                Reply::new(502, "5.5.1", "Error: command not implemented"),
            );
        }
        self.reply(&Reply::new(220, "2.0.0", "Ready to start TLS"));
        // Anything pipelined after STARTTLS was sent in the clear and could
        // have been injected by a man in the middle (CVE-2011-0411).
        self.inbuf.clear();
        self.waiting = Waiting::Tls;
        self.action = Some(Action::StartTls);
    }

    fn finish_data(&mut self, now: SystemTime) {
        let Mode::Data(recv) = std::mem::replace(&mut self.mode, Mode::Command) else {
            return;
        };
        let Some(tx) = self.tx.take() else { return };
        self.finish_message(tx, recv, now);
    }

    /// Why the message under way cannot be kept, if it cannot: the
    /// driver refused it (memory, spool), or it grew past the size limit.
    fn message_fault(&mut self, recv: &DataReceiver) -> Option<(&'static str, Reply)> {
        if let Some(reply) = self.data_refusal.take() {
            return Some(("resources", reply));
        }
        recv.exceeded().then(|| {
            (
                "size",
                Reply::new(
                    552,
                    "5.3.4",
                    "Message size exceeds fixed maximum message size",
                ),
            )
        })
    }

    /// The whole message is in: checks it and asks for it to be stored.
    fn finish_message(&mut self, tx: Transaction, recv: DataReceiver, now: SystemTime) {
        if let Some((reason, reply)) = self.message_fault(&recv) {
            return self.reject(reason, reply);
        }
        let headers = self
            .headers_of_first_piece
            .take()
            .unwrap_or_else(|| scan_headers(recv.data()));
        if headers.received > self.cfg.max_received_headers {
            return self.reject(
                "loop",
                Reply::new(554, "5.4.6", "Too many hops (Received headers), mail loop?"),
            );
        }
        let id = match tx.id {
            Some(id) => id,
            None => self.next_queue_id(now),
        };
        let helo = self.helo.clone().unwrap_or_default().0;
        let smtputf8 = tx.params.smtputf8;
        let body = recv.into_body();
        let message = AcceptedMessage {
            id,
            sender: tx.sender.to_string(),
            recipients: tx.recipients,
            client_ip: self.peer,
            helo,
            received_at: now,
            smtputf8,
            eight_bit: tx.params.body == Some(Body::EightBitMime),
            body,
            deferred: Vec::new(),
            spooled: None,
            dsn: tx.params.dsn,
            // RFC 8689 §4.2.1: with REQUIRETLS the header field is ignored.
            tls_request: if tx.params.requiretls {
                Some(TlsRequest::Requiretls)
            } else if headers.tls_not_required {
                Some(TlsRequest::NotRequired)
            } else {
                None
            },
        };
        self.waiting = Waiting::Store;
        self.action = Some(Action::Store(Box::new(message)));
    }
}

/// RFC 3848 / RFC 6531 `with` protocol names.
fn protocol_name(esmtp: bool, utf8: bool, tls: bool) -> &'static str {
    match (esmtp, utf8, tls) {
        (_, true, true) => "UTF8SMTPS",
        (_, true, false) => "UTF8SMTP",
        (true, false, true) => "ESMTPS",
        (true, false, false) => "ESMTP",
        (false, false, true) => "SMTPS",
        (false, false, false) => "SMTP",
    }
}

struct ReceivedFields<'a> {
    helo: &'a str,
    peer: IpAddr,
    hostname: &'a str,
    protocol: &'a str,
    tls: Option<&'a str>,
    id: &'a QueueId,
    single_recipient: Option<&'a str>,
    date: SystemTime,
}

/// The trace header (RFC 5321 §4.4). `for` is only given for a single
/// recipient, so other recipients' addresses are not disclosed.
fn received_header(f: &ReceivedFields<'_>) -> String {
    let peer = match f.peer {
        IpAddr::V4(v4) => format!("[{v4}]"),
        IpAddr::V6(v6) => format!("[IPv6:{v6}]"),
    };
    let tls = f.tls.map(|t| format!("\r\n\t({t})")).unwrap_or_default();
    let for_clause = f
        .single_recipient
        .map(|r| format!("\r\n\tfor <{r}>"))
        .unwrap_or_default();
    format!(
        "Received: from {} ({peer}){tls}\r\n\tby {} (backupmx) with {} id {}{for_clause};\r\n\t{}\r\n",
        f.helo,
        f.hostname,
        f.protocol,
        f.id,
        rfc5322_date(f.date)
    )
}

#[cfg(test)]
mod tests;
