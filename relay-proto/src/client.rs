//! The SMTP client side (RFC 5321 §3–4, RFC 2920, RFC 3207) as a sans-I/O
//! state machine.
//!
//! Replies go in through [`ClientSession::on_reply`] (parsed by
//! [`ReplyParser`]); what to do next comes out of [`ClientSession::poll_next`].
//! The driver owns the socket, the TLS handshake and the timers; this module
//! decides what to send and what every reply means for each recipient.

use std::collections::VecDeque;
use std::fmt;

use crate::queue::{MessageDsn, RcptDsn, TlsRequest};

/// A reply received from a server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The three-digit reply code.
    pub code: u16,
    /// The text of each line, without code and separator.
    pub lines: Vec<String>,
}

impl Response {
    /// 2xx or 3xx.
    pub fn is_success(&self) -> bool {
        (200..400).contains(&self.code)
    }
    /// 4xx: try again later.
    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }
    /// 5xx: give up.
    pub fn is_permanent(&self) -> bool {
        self.code >= 500
    }

    /// The enhanced status code (RFC 3463) if the server sent one.
    pub fn enhanced_status(&self) -> Option<&str> {
        let first = self.lines.first()?;
        let token = first.split(' ').next()?;
        let mut parts = token.split('.');
        let class = parts.next()?;
        let ok = matches!(class, "2" | "4" | "5")
            && parts.clone().count() == 2
            && parts
                .all(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()));
        ok.then_some(token)
    }
}

impl fmt::Display for Response {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.code, self.lines.join(" "))
    }
}

/// Why a reply stream could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed SMTP reply: {0}")]
pub struct ReplyError(pub String);

/// Longest reply line we accept (RFC 5321 §4.5.3.1.5 says 512; be lenient).
const MAX_REPLY_LINE: usize = 4096;
/// Most lines in one reply (an EHLO reply has a few dozen at most).
const MAX_REPLY_LINES: usize = 256;

/// Incremental multi-line reply parser.
#[derive(Debug, Default)]
pub struct ReplyParser {
    buf: Vec<u8>,
    lines: Vec<String>,
}

impl ReplyParser {
    /// Adds bytes received from the server.
    pub fn feed(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete reply, if one has arrived.
    pub fn next_reply(&mut self) -> Result<Option<Response>, ReplyError> {
        loop {
            let Some(lf) = self.buf.iter().position(|&b| b == b'\n') else {
                if self.buf.len() > MAX_REPLY_LINE {
                    return Err(ReplyError("reply line too long".into()));
                }
                return Ok(None);
            };
            let raw: Vec<u8> = self.buf.drain(..=lf).collect();
            let line = raw
                .strip_suffix(b"\r\n")
                .or_else(|| raw.strip_suffix(b"\n"))
                .unwrap_or(&raw);
            if line.len() < 3
                || !line[..3].iter().all(u8::is_ascii_digit)
                || !(b'2'..=b'5').contains(&line[0])
            {
                return Err(ReplyError(String::from_utf8_lossy(line).into_owned()));
            }
            let code = u16::from(line[0] - b'0') * 100
                + u16::from(line[1] - b'0') * 10
                + u16::from(line[2] - b'0');
            let (last, text) = match line.get(3) {
                None => (true, ""),
                Some(b' ') => (true, std::str::from_utf8(&line[4..]).unwrap_or("")),
                Some(b'-') => (false, std::str::from_utf8(&line[4..]).unwrap_or("")),
                Some(_) => return Err(ReplyError(String::from_utf8_lossy(line).into_owned())),
            };
            self.lines.push(text.to_string());
            if self.lines.len() > MAX_REPLY_LINES {
                return Err(ReplyError("too many reply lines".into()));
            }
            if last {
                return Ok(Some(Response {
                    code,
                    lines: std::mem::take(&mut self.lines),
                }));
            }
        }
    }
}

/// What the message needs from the server.
#[derive(Debug, Clone, Default)]
pub struct Envelope {
    /// Empty for the null sender.
    pub sender: String,
    /// Forward paths, one per recipient, as they go in RCPT TO.
    pub recipients: Vec<String>,
    /// Body size in octets, declared with SIZE= when the server offers it.
    pub size: u64,
    /// The envelope or headers need SMTPUTF8 (RFC 6531).
    pub smtputf8: bool,
    /// The body has 8-bit octets (BODY=8BITMIME, RFC 6152).
    pub eight_bit: bool,
    /// RFC 3461 `RET=`/`ENVID=`, passed on to a server that offers DSN.
    pub dsn: MessageDsn,
    /// RFC 3461 `NOTIFY=`/`ORCPT=` per recipient (empty: none asked).
    pub recipient_dsn: Vec<RcptDsn>,
    /// RFC 8689: REQUIRETLS (sent only over verified TLS, passed on), or
    /// `TLS-Required: No` (for the driver's planning).
    pub tls_request: Option<TlsRequest>,
}

/// The result for one recipient of one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RcptResult {
    /// Accepted by the server after DATA; its final reply.
    Delivered(String),
    /// Try again later (4xx, connection or TLS trouble).
    Transient(String),
    /// Give up and bounce (5xx or a permanent incompatibility).
    Permanent(String),
}

impl RcptResult {
    /// The one classifier: reply severity decides.
    pub fn from_response(r: &Response) -> Self {
        let text = r.to_string();
        if r.is_success() {
            RcptResult::Delivered(text)
        } else if r.is_transient() {
            RcptResult::Transient(text)
        } else {
            RcptResult::Permanent(text)
        }
    }
}

/// What the driver should do next.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Write these bytes, then ask again.
    Send(Vec<u8>),
    /// Wait for and feed the next reply.
    ReadReply,
    /// Run the TLS handshake, then call [`ClientSession::tls_done`].
    StartTls,
    /// Write the dot-stuffed message number `n` (in the order given to
    /// [`ClientSession::with_messages`]) and its `.` terminator.
    SendBody(usize),
    /// Write message number `n` as it is stored, in BDAT chunks (RFC 3030),
    /// the last one with `LAST`; then call [`ClientSession::chunks_sent`].
    SendChunks(usize),
    /// The session is over; results are in [`ClientSession::results`].
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Greeting,
    Ehlo,
    Helo,
    StartTls,
    Mail,
    Rcpt(usize),
    Data,
    /// The reply to a BDAT chunk before the last.
    Chunk,
    Body,
    /// The reply to the `.` that ends an aborted, empty message.
    Aborted,
    Rset,
    Quit,
}

#[derive(Debug, Default, Clone)]
struct Extensions {
    pipelining: bool,
    dsn: bool,
    starttls: bool,
    size: Option<u64>,
    eight_bit: bool,
    smtputf8: bool,
    chunking: bool,
    requiretls: bool,
}

/// One SMTP client session delivering one message.
#[derive(Debug)]
pub struct ClientSession {
    helo_name: String,
    try_tls: bool,
    /// A policy forbids plaintext: no STARTTLS, a refusal or a failed
    /// handshake ends the session with a temporary failure.
    tls_required: bool,
    /// The session ended because the TLS requirement could not be met.
    tls_policy_failed: bool,
    /// The TLS this session requires verifies the server (MTA-STS, DANE,
    /// `tls = "verified"`): REQUIRETLS messages may go.
    tls_verified: bool,
    envelope: Envelope,
    /// Index of `envelope` among all messages of the session.
    current: usize,
    /// Messages still to send after the current one.
    more: VecDeque<Envelope>,
    /// Results of the messages already done.
    finished: Vec<Vec<RcptResult>>,
    /// Why the connection ended early, for messages never started.
    abandoned: Option<RcptResult>,
    ext: Extensions,
    tls_active: bool,
    expect: VecDeque<Expect>,
    out: Vec<u8>,
    results: Vec<Option<RcptResult>>,
    /// The transaction failed as a whole (MAIL or DATA refused).
    transaction_failed: Option<RcptResult>,
    body_pending: bool,
    /// The current transaction sends its message by BDAT (the server
    /// offers CHUNKING and PIPELINING).
    chunked: bool,
    /// RCPT replies still to come in a chunked transaction: the body goes
    /// once all are in and one was accepted.
    rcpt_replies_due: usize,
    tls_pending: bool,
    quit_sent: bool,
    transaction_started: bool,
    tls_failed: bool,
    /// Commands not yet sent because the server does not pipeline.
    queued: VecDeque<(Vec<u8>, Expect)>,
    done: bool,
    /// Stop once the connection is set up (greeting, EHLO, STARTTLS as
    /// asked): the driver takes it over for commands of its own.
    setup_only: bool,
    /// The connection is set up and handed over (`setup_only`).
    ready: bool,
    /// The reply that ended the session before a transaction (a refused
    /// greeting, EHLO, HELO or STARTTLS).
    refusal: Option<Response>,
}

impl ClientSession {
    /// `try_tls`: the driver can do STARTTLS if offered (opportunistic).
    pub fn new(helo_name: &str, try_tls: bool, envelope: Envelope) -> Self {
        Self::with_messages(helo_name, try_tls, vec![envelope])
    }

    /// Several messages over one connection, one transaction each
    /// (`RSET` between them).
    pub fn with_messages(helo_name: &str, try_tls: bool, envelopes: Vec<Envelope>) -> Self {
        let mut more: VecDeque<Envelope> = envelopes.into();
        let envelope = more.pop_front().unwrap_or_default();
        let n = envelope.recipients.len();
        ClientSession {
            helo_name: helo_name.to_string(),
            try_tls,
            tls_required: false,
            tls_policy_failed: false,
            tls_verified: false,
            envelope,
            current: 0,
            more,
            finished: Vec::new(),
            abandoned: None,
            ext: Extensions::default(),
            tls_active: false,
            expect: VecDeque::from([Expect::Greeting]),
            out: Vec::new(),
            results: vec![None; n],
            transaction_failed: None,
            body_pending: false,
            chunked: false,
            rcpt_replies_due: 0,
            tls_pending: false,
            quit_sent: false,
            transaction_started: false,
            tls_failed: false,
            queued: VecDeque::new(),
            done: false,
            setup_only: false,
            ready: false,
            refusal: None,
        }
    }

    /// A session that only sets the connection up: greeting, EHLO (HELO
    /// if refused), and STARTTLS as `try_tls` and [`require_tls`] ask,
    /// then [`Next::Done`] with [`ready`] true. The driver then owns the
    /// connection for commands of its own (recipient callouts), under the
    /// same TLS rules as deliveries.
    ///
    /// [`require_tls`]: ClientSession::require_tls
    /// [`ready`]: ClientSession::ready
    pub fn setup_only(helo_name: &str, try_tls: bool) -> Self {
        let mut session = Self::with_messages(helo_name, try_tls, Vec::new());
        session.setup_only = true;
        session
    }

    /// A [`setup_only`](ClientSession::setup_only) session reached the
    /// point where a transaction would begin: the connection is the
    /// driver's.
    pub fn ready(&self) -> bool {
        self.ready
    }

    /// The server's reply that ended the session before any transaction
    /// (greeting, EHLO, HELO, or STARTTLS under a TLS requirement).
    pub fn refusal(&self) -> Option<&Response> {
        self.refusal.as_ref()
    }

    /// Why the connection ended before its messages were done (the
    /// temporary failure every open recipient got), if it did.
    pub fn why_ended(&self) -> Option<String> {
        self.abandoned.as_ref().map(|r| match r {
            RcptResult::Delivered(t) | RcptResult::Transient(t) | RcptResult::Permanent(t) => {
                t.clone()
            }
        })
    }

    /// No message may go in plaintext (a domain's TLS policy, MTA-STS
    /// enforce, DANE): without STARTTLS, or when it is refused or fails,
    /// every recipient gets a temporary failure that says so.
    pub fn require_tls(mut self) -> Self {
        self.try_tls = true;
        self.tls_required = true;
        self
    }

    /// [`require_tls`](ClientSession::require_tls) with a certificate
    /// that is verified (by the driver's TLS configuration): messages sent
    /// with REQUIRETLS (RFC 8689) may go on this session.
    pub fn require_verified_tls(mut self) -> Self {
        self = self.require_tls();
        self.tls_verified = true;
        self
    }

    /// The server answered MAIL: results now come from a real transaction,
    /// so trying another host for these recipients would be wrong.
    pub fn transaction_started(&self) -> bool {
        self.transaction_started
    }

    /// The session ended because TLS was required and could not be had
    /// (not offered, refused, or the handshake failed).
    pub fn tls_policy_failed(&self) -> bool {
        self.tls_policy_failed
    }

    /// The STARTTLS handshake failed (the driver reported it).
    pub fn tls_failed(&self) -> bool {
        self.tls_failed
    }

    /// The server's EHLO offered DSN (RFC 3461): the sender's requests
    /// were passed on, and notifications are its to send.
    pub fn offers_dsn(&self) -> bool {
        self.ext.dsn
    }

    /// The connection runs TLS now.
    pub fn tls_active(&self) -> bool {
        self.tls_active
    }

    /// Whether the server's last-sent reply is the final one after DATA.
    pub fn awaiting_final_reply(&self) -> bool {
        self.expect.front() == Some(&Expect::Body)
    }

    /// What the driver does next: send bytes, read, run TLS, send the body, or stop.
    pub fn poll_next(&mut self) -> Next {
        if !self.out.is_empty() {
            return Next::Send(std::mem::take(&mut self.out));
        }
        if self.body_pending {
            self.body_pending = false;
            if self.chunked {
                return Next::SendChunks(self.current);
            }
            return Next::SendBody(self.current);
        }
        if self.done {
            return Next::Done;
        }
        if self.tls_pending {
            return Next::StartTls;
        }
        if self.expect.is_empty() {
            self.done = true;
            return Next::Done;
        }
        Next::ReadReply
    }

    fn send(&mut self, line: String, expect: Expect) {
        self.out.extend_from_slice(line.as_bytes());
        self.out.extend_from_slice(b"\r\n");
        self.expect.push_back(expect);
    }

    /// Feeds one reply.
    pub fn on_reply(&mut self, r: Response) {
        let Some(what) = self.expect.pop_front() else {
            return;
        };
        match what {
            Expect::Greeting => {
                if r.is_success() {
                    self.send(format!("EHLO {}", self.helo_name), Expect::Ehlo);
                } else {
                    self.refusal = Some(r.clone());
                    self.abandon(RcptResult::Transient(format!("greeting: {r}")));
                }
            }
            Expect::Ehlo => {
                if r.is_success() {
                    self.ext = parse_extensions(&r);
                    self.after_hello();
                } else if r.code == 421 || r.is_transient() {
                    self.refusal = Some(r.clone());
                    self.abandon(RcptResult::Transient(format!("EHLO: {r}")));
                } else {
                    // RFC 5321 §3.2: fall back to HELO.
                    self.send(format!("HELO {}", self.helo_name), Expect::Helo);
                }
            }
            Expect::Helo => {
                if r.is_success() {
                    self.ext = Extensions::default();
                    self.after_hello();
                } else {
                    self.refusal = Some(r.clone());
                    self.abandon(RcptResult::Transient(format!("HELO: {r}")));
                }
            }
            Expect::StartTls => {
                if r.code == 220 {
                    self.tls_pending = true;
                } else if self.tls_required {
                    self.tls_policy_failed = true;
                    self.refusal = Some(r.clone());
                    self.abandon(RcptResult::Transient(format!(
                        "TLS required by policy, STARTTLS refused: {r}"
                    )));
                } else {
                    // Refused: carry on in the clear (opportunistic TLS).
                    self.begin_transaction();
                }
            }
            Expect::Mail => {
                self.transaction_started = true;
                if !r.is_success() {
                    self.transaction_failed = Some(RcptResult::from_response(&r));
                    if !self.ext.pipelining {
                        // Nothing else was sent: the transaction ends here.
                        self.queued.clear();
                        self.finish_failed_transaction();
                    }
                } else {
                    self.flush_queued();
                }
            }
            Expect::Rcpt(i) => {
                if self.transaction_failed.is_none() && !r.is_success() {
                    self.results[i] = Some(RcptResult::from_response(&r));
                }
                if self.chunked {
                    self.rcpt_replies_due = self.rcpt_replies_due.saturating_sub(1);
                    if self.rcpt_replies_due == 0 {
                        self.recipients_answered();
                    }
                } else if self.transaction_failed.is_none() {
                    let only_data_left = self.queued.len() == 1;
                    let none_accepted = self.results.iter().all(Option::is_some);
                    if !self.ext.pipelining && only_data_left && none_accepted {
                        // RFC 5321 §3.3: no DATA without an accepted recipient.
                        self.queued.clear();
                        self.end_transaction();
                    } else {
                        self.flush_queued();
                    }
                }
            }
            Expect::Data => {
                let any_accepted = self.results.iter().any(Option::is_none);
                if self.transaction_failed.is_some() {
                    if r.code == 354 {
                        // RFC 2920 §3.1: a pipelined DATA may still be accepted.
                        self.out.extend_from_slice(b".\r\n");
                        self.expect.push_back(Expect::Aborted);
                    }
                    self.finish_failed_transaction();
                } else if r.code == 354 && any_accepted {
                    self.body_pending = true;
                    self.expect.push_back(Expect::Body);
                } else if r.code == 354 {
                    // No recipient was accepted: end the empty message at once.
                    self.out.extend_from_slice(b".\r\n");
                    self.expect.push_back(Expect::Aborted);
                    self.end_transaction();
                } else {
                    let result = RcptResult::from_response(&r);
                    self.fill_pending(&result);
                    self.end_transaction();
                }
            }
            Expect::Chunk => {
                // RFC 3030 §2: a refused chunk fails the transaction; the
                // replies to the chunks already sent behind it say no more.
                if !r.is_success() && self.transaction_failed.is_none() {
                    let result = RcptResult::from_response(&r);
                    self.fill_pending(&result);
                    self.transaction_failed = Some(result);
                }
            }
            Expect::Body if self.transaction_failed.is_some() => {
                self.finish_failed_transaction();
            }
            Expect::Body => {
                let result = RcptResult::from_response(&r);
                self.fill_pending(&result);
                if r.code == 421 {
                    // The server is closing: nothing more on this connection.
                    self.abandoned = Some(RcptResult::Transient(format!("after DATA: {r}")));
                    self.quit();
                } else {
                    self.end_transaction();
                }
            }
            Expect::Rset => {
                if r.code == 421 {
                    self.abandon(RcptResult::Transient(format!("RSET: {r}")));
                } else {
                    // Without PIPELINING the next transaction's MAIL waited
                    // for this reply.
                    self.flush_queued();
                }
            }
            Expect::Aborted | Expect::Quit => {}
        }
    }

    /// [`Next::SendChunks`] was written as `chunks` BDAT commands: one
    /// reply is due for each, the last one the message's.
    pub fn chunks_sent(&mut self, chunks: usize) {
        for _ in 1..chunks {
            self.expect.push_back(Expect::Chunk);
        }
        self.expect.push_back(Expect::Body);
    }

    /// The TLS handshake finished: `true` if it succeeded.
    pub fn tls_done(&mut self, ok: bool) {
        if ok {
            self.tls_pending = false;
            self.tls_active = true;
            // RFC 3207 §4.2: forget everything learnt before TLS.
            self.ext = Extensions::default();
            self.send(format!("EHLO {}", self.helo_name), Expect::Ehlo);
        } else {
            self.tls_failed_because("");
        }
    }

    /// The TLS handshake failed, for this reason (a certificate that does
    /// not verify, no common version…): the connection is unusable.
    pub fn tls_failed_because(&mut self, why: &str) {
        self.tls_pending = false;
        self.tls_failed = true;
        self.tls_policy_failed = self.tls_required;
        let text = match (self.tls_required, why.is_empty()) {
            (true, true) => "TLS required by policy, handshake failed".to_string(),
            (true, false) => format!("TLS required by policy, handshake failed: {why}"),
            (false, true) => "TLS handshake failed".to_string(),
            (false, false) => format!("TLS handshake failed: {why}"),
        };
        self.abandoned = Some(RcptResult::Transient(text.clone()));
        self.fail_all(RcptResult::Transient(text));
        self.expect.clear();
        self.done = true;
    }

    /// The connection broke or timed out: every open recipient is retried.
    pub fn connection_lost(&mut self, why: &str) {
        self.abandoned = Some(RcptResult::Transient(why.to_string()));
        self.fail_all(RcptResult::Transient(why.to_string()));
        self.expect.clear();
        self.out.clear();
        self.body_pending = false;
        self.done = true;
    }

    /// Per recipient, in envelope order.
    pub fn results(&self) -> Vec<RcptResult> {
        self.all_results().into_iter().next().unwrap_or_default()
    }

    /// Per message (in the order given), per recipient.
    pub fn all_results(&self) -> Vec<Vec<RcptResult>> {
        let unknown = || RcptResult::Transient("no result".into());
        let mut all = self.finished.clone();
        all.push(
            self.results
                .iter()
                .map(|r| r.clone().unwrap_or_else(unknown))
                .collect(),
        );
        let rest = self.abandoned.clone().unwrap_or_else(unknown);
        for env in &self.more {
            all.push(vec![rest.clone(); env.recipients.len()]);
        }
        all
    }

    fn after_hello(&mut self) {
        if self.try_tls && self.ext.starttls && !self.tls_active {
            self.send("STARTTLS".into(), Expect::StartTls);
        } else if self.tls_required && !self.tls_active {
            self.tls_policy_failed = true;
            self.abandon(RcptResult::Transient(
                "TLS required by policy, but the server does not offer STARTTLS".into(),
            ));
        } else {
            self.begin_transaction();
        }
    }

    fn begin_transaction(&mut self) {
        if self.setup_only {
            self.ready = true;
            self.done = true;
            return;
        }
        let env = &self.envelope;
        if env.smtputf8 && !self.ext.smtputf8 {
            // RFC 6531 §3.2: never downgrade silently.
            self.fail_all(RcptResult::Permanent(
                "550 5.6.7 the message needs SMTPUTF8 and the server does not offer it".into(),
            ));
            return self.end_transaction();
        }
        if env.tls_request == Some(TlsRequest::Requiretls) {
            if !(self.tls_active && self.tls_verified) {
                // RFC 8689 §5: never in the clear or unverified; it waits
                // for a verified path (MTA-STS, DANE, tls = "verified").
                self.fail_all(RcptResult::Transient(
                    "REQUIRETLS: no TLS verified by MTA-STS, DANE or tls = \"verified\" to this host"
                        .into(),
                ));
                return self.end_transaction();
            }
            if !self.ext.requiretls {
                self.fail_all(RcptResult::Permanent(
                    "550 5.7.10 REQUIRETLS: the next hop does not offer REQUIRETLS".into(),
                ));
                return self.end_transaction();
            }
        }
        if let Some(limit) = self.ext.size.filter(|&l| l > 0) {
            if env.size > limit {
                self.fail_all(RcptResult::Permanent(format!(
                    "552 5.3.4 message size {} exceeds the server's limit {limit}",
                    env.size
                )));
                return self.end_transaction();
            }
        }
        let mut mail = format!("MAIL FROM:<{}>", env.sender);
        if self.ext.size.is_some() {
            mail.push_str(&format!(" SIZE={}", env.size));
        }
        if env.eight_bit && self.ext.eight_bit {
            mail.push_str(" BODY=8BITMIME");
        }
        if env.smtputf8 {
            mail.push_str(" SMTPUTF8");
        }
        if env.tls_request == Some(TlsRequest::Requiretls) {
            mail.push_str(" REQUIRETLS");
        }
        if self.ext.dsn {
            if let Some(ret) = env.dsn.ret {
                mail.push_str(&format!(" RET={}", ret.keyword()));
            }
            if let Some(envid) = &env.dsn.envid {
                mail.push_str(&format!(" ENVID={envid}"));
            }
        }
        let mut commands = Vec::new();
        // BDAT needs the replies to RCPT first: pipelined behind them, a
        // whole message would go to a server that took no recipient.
        self.chunked = self.ext.chunking && self.ext.pipelining && !env.recipients.is_empty();
        self.rcpt_replies_due = 0;
        if self.current > 0 {
            // A clean slate after whatever the previous transaction left.
            commands.push(("RSET".to_string(), Expect::Rset));
        }
        commands.push((mail, Expect::Mail));
        for (i, rcpt) in env.recipients.iter().enumerate() {
            if self.results[i].is_none() {
                let mut line = format!("RCPT TO:<{rcpt}>");
                if let (true, Some(asked)) = (self.ext.dsn, env.recipient_dsn.get(i)) {
                    if let Some(notify) = asked.notify {
                        line.push_str(&format!(" NOTIFY={notify}"));
                    }
                    if let Some(orcpt) = &asked.orcpt {
                        line.push_str(&format!(" ORCPT={orcpt}"));
                    }
                }
                commands.push((line, Expect::Rcpt(i)));
                self.rcpt_replies_due += 1;
            }
        }
        if !self.chunked {
            commands.push(("DATA".into(), Expect::Data));
        }
        if self.ext.pipelining {
            for (line, expect) in commands {
                self.send(line, expect);
            }
        } else {
            let mut iter = commands.into_iter();
            if let Some((line, expect)) = iter.next() {
                self.send(line, expect);
            }
            for (line, expect) in iter {
                let mut bytes = line.into_bytes();
                bytes.extend_from_slice(b"\r\n");
                self.queued.push_back((bytes, expect));
            }
        }
    }

    /// Every RCPT of a chunked transaction is answered: send the message
    /// if a recipient was accepted.
    fn recipients_answered(&mut self) {
        if self.transaction_failed.is_some() {
            self.finish_failed_transaction();
        } else if self.results.iter().any(Option::is_none) {
            self.body_pending = true;
        } else {
            self.end_transaction();
        }
    }

    fn flush_queued(&mut self) {
        if let Some((bytes, expect)) = self.queued.pop_front() {
            self.out.extend_from_slice(&bytes);
            self.expect.push_back(expect);
        }
    }

    fn finish_failed_transaction(&mut self) {
        if let Some(result) = self.transaction_failed.clone() {
            self.fill_pending(&result);
        }
        self.end_transaction();
    }

    /// The current message is done: start the next one, or say goodbye.
    fn end_transaction(&mut self) {
        let Some(next) = self.more.pop_front() else {
            return self.quit();
        };
        let unknown = || RcptResult::Transient("no result".into());
        let done: Vec<RcptResult> = self
            .results
            .iter()
            .map(|r| r.clone().unwrap_or_else(unknown))
            .collect();
        self.finished.push(done);
        self.current += 1;
        self.results = vec![None; next.recipients.len()];
        self.envelope = next;
        self.transaction_failed = None;
        self.queued.clear();
        self.begin_transaction();
    }

    /// A connection-level failure: every message still open fails alike.
    fn abandon(&mut self, why: RcptResult) {
        self.fail_all(why.clone());
        self.abandoned = Some(why);
        self.quit();
    }

    fn fill_pending(&mut self, result: &RcptResult) {
        for r in self.results.iter_mut().filter(|r| r.is_none()) {
            *r = Some(result.clone());
        }
    }

    fn fail_all(&mut self, result: RcptResult) {
        self.fill_pending(&result);
    }

    fn quit(&mut self) {
        if !self.quit_sent {
            self.quit_sent = true;
            self.send("QUIT".into(), Expect::Quit);
        }
    }
}

fn parse_extensions(r: &Response) -> Extensions {
    let mut ext = Extensions::default();
    for line in r.lines.iter().skip(1) {
        let mut words = line.split_whitespace();
        let keyword = words.next().unwrap_or("").to_ascii_uppercase();
        match keyword.as_str() {
            "PIPELINING" => ext.pipelining = true,
            "DSN" => ext.dsn = true,
            "STARTTLS" => ext.starttls = true,
            "8BITMIME" => ext.eight_bit = true,
            "SMTPUTF8" => ext.smtputf8 = true,
            "CHUNKING" => ext.chunking = true,
            "REQUIRETLS" => ext.requiretls = true,
            "SIZE" => ext.size = Some(words.next().and_then(|n| n.parse().ok()).unwrap_or(0)),
            _ => {}
        }
    }
    ext
}

#[cfg(test)]
mod tests;
