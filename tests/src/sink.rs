//! A recording SMTP server to play the primary MX: it accepts mail over
//! real sockets and keeps every envelope and message it was given, with
//! scriptable refusals (per-recipient replies, temporary failures, dropped
//! connections).

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One message as the sink received it.
#[derive(Debug, Clone)]
pub struct Received {
    pub mail_from: String,
    pub rcpts: Vec<String>,
    /// The message after dot-unstuffing, as a real server would store it.
    pub data: Vec<u8>,
    /// The DATA bytes exactly as they came over the wire.
    pub wire: Vec<u8>,
    /// The MAIL and accepted RCPT command lines, parameters included.
    pub envelope_lines: Vec<String>,
    /// It came in BDAT chunks (RFC 3030), not by DATA.
    pub by_bdat: bool,
}

/// How the sink behaves; can be changed while it runs.
#[derive(Debug, Clone, Default)]
pub struct Behaviour {
    /// `(address, reply)`: RCPT TO for the address gets the reply.
    pub rcpt_replies: Vec<(String, String)>,
    /// The next N messages get `451 4.3.0` after their data.
    pub tempfail_next: usize,
    /// The next N DATA phases: the connection is dropped after the first
    /// line of data, with no reply.
    pub drop_next: usize,
    /// How long to wait before answering each message's data (so that
    /// deliveries overlap).
    pub data_reply_delay: Duration,
    /// Reply to MAIL FROM for every message, if set.
    pub mail_reply: Option<String>,
    /// The next N messages: after the whole message is read, hang (no
    /// reply) until `release_stalled`, then drop the connection unrecorded.
    pub stall_next: usize,
    /// How many messages are hanging now.
    pub stalled: usize,
    pub release_stalled: bool,
    /// Offer no extension at all after EHLO (a plain RFC 5321 server, or
    /// what a firewall's SMTP inspection leaves of one).
    pub no_extensions: bool,
    /// If set, only these recipients exist: RCPT TO for any other gets
    /// `550 5.1.1` (after `rcpt_replies`).
    pub only_users: Option<Vec<String>>,
    /// RCPT TO commands seen, callouts included.
    pub rcpts_seen: usize,
    /// Offer DSN (RFC 3461) after EHLO.
    pub offer_dsn: bool,
    /// Offer CHUNKING (RFC 3030) after EHLO and take BDAT.
    pub offer_chunking: bool,
}

/// Connections that have begun a mail transaction (a probe's EHLO/QUIT
/// does not count): how many now, and the most at once.
#[derive(Debug, Default)]
pub struct Concurrency {
    now: AtomicUsize,
    pub most: AtomicUsize,
}

/// Counts one connection in [`Concurrency`] until dropped.
struct Counted<'a>(&'a Concurrency);

impl<'a> Counted<'a> {
    fn new(c: &'a Concurrency) -> Self {
        let n = c.now.fetch_add(1, Ordering::SeqCst) + 1;
        c.most.fetch_max(n, Ordering::SeqCst);
        Counted(c)
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.now.fetch_sub(1, Ordering::SeqCst);
    }
}

pub struct Sink {
    pub addr: SocketAddr,
    /// Connections in a mail transaction, now and at most.
    pub delivering: Arc<Concurrency>,
    pub behaviour: Arc<Mutex<Behaviour>>,
    received: Arc<Mutex<Vec<Received>>>,
    pub connections: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sink {
    /// Listens on 127.0.0.1:`port` (0 for any free port).
    pub fn start(port: u16) -> Sink {
        Sink::start_on(SocketAddr::from(([127, 0, 0, 1], port)))
    }

    pub fn start_on(addr: SocketAddr) -> Sink {
        let listener = TcpListener::bind(addr).expect("bind sink");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        let behaviour = Arc::new(Mutex::new(Behaviour::default()));
        let received = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(AtomicUsize::new(0));
        let delivering = Arc::new(Concurrency::default());
        let thread = {
            let (behaviour, received, stop, connections, delivering) = (
                behaviour.clone(),
                received.clone(),
                stop.clone(),
                connections.clone(),
                delivering.clone(),
            );
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            connections.fetch_add(1, Ordering::SeqCst);
                            let (behaviour, received, stop, delivering) = (
                                behaviour.clone(),
                                received.clone(),
                                stop.clone(),
                                delivering.clone(),
                            );
                            std::thread::spawn(move || {
                                let _ = serve(stream, &behaviour, &received, &stop, &delivering);
                            });
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
            })
        };
        Sink {
            addr,
            delivering,
            behaviour,
            received,
            connections,
            stop,
            thread: Some(thread),
        }
    }

    pub fn received(&self) -> Vec<Received> {
        self.received.lock().expect("lock").clone()
    }

    /// Waits until at least `n` messages arrived.
    pub fn wait_for(&self, n: usize, within: Duration) -> Vec<Received> {
        let deadline = Instant::now() + within;
        loop {
            let got = self.received();
            if got.len() >= n {
                return got;
            }
            assert!(
                Instant::now() < deadline,
                "sink got {} of {n} messages: {got:?}",
                got.len()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn set(&self, f: impl FnOnce(&mut Behaviour)) {
        f(&mut self.behaviour.lock().expect("lock"));
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(
    stream: TcpStream,
    behaviour: &Mutex<Behaviour>,
    received: &Mutex<Vec<Received>>,
    stop: &AtomicBool,
    delivering: &Concurrency,
) -> std::io::Result<()> {
    let mut counted = None;
    stream.set_read_timeout(Some(Duration::from_millis(200)))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    writer.write_all(b"220 primary.test ESMTP sink\r\n")?;
    let mut mail_from = String::new();
    let mut rcpts: Vec<String> = Vec::new();
    let mut envelope_lines: Vec<String> = Vec::new();
    let (mut bdat_data, mut bdat_wire) = (Vec::new(), Vec::new());
    let mut line = Vec::new();
    let read_line =
        |reader: &mut BufReader<TcpStream>, line: &mut Vec<u8>| -> std::io::Result<bool> {
            line.clear();
            loop {
                match reader.read_until(b'\n', line) {
                    Ok(0) => return Ok(false),
                    Ok(_) if line.ends_with(b"\n") => return Ok(true),
                    Ok(_) => {}
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) =>
                    {
                        if stop.load(Ordering::SeqCst) {
                            return Ok(false);
                        }
                    }
                    Err(e) => return Err(e),
                }
            }
        };
    while read_line(&mut reader, &mut line)? {
        let text = String::from_utf8_lossy(&line).trim_end().to_string();
        let upper = text.to_ascii_uppercase();
        if upper.starts_with("EHLO") {
            let (plain, dsn, chunking) = {
                let b = behaviour.lock().expect("lock");
                (b.no_extensions, b.offer_dsn, b.offer_chunking)
            };
            if plain {
                writer.write_all(b"250 primary.test\r\n")?;
            } else {
                let mut lines = vec!["primary.test", "PIPELINING", "SIZE 100000000"];
                if dsn {
                    lines.push("DSN");
                }
                if chunking {
                    lines.push("CHUNKING");
                }
                lines.extend(["8BITMIME", "SMTPUTF8"]);
                let last = lines.len() - 1;
                for (i, l) in lines.iter().enumerate() {
                    let sep = if i == last { ' ' } else { '-' };
                    writer.write_all(format!("250{sep}{l}\r\n").as_bytes())?;
                }
            }
        } else if upper.starts_with("HELO") {
            writer.write_all(b"250 primary.test\r\n")?;
        } else if upper.starts_with("MAIL FROM:") {
            if counted.is_none() {
                counted = Some(Counted::new(delivering));
            }
            let reply = behaviour.lock().expect("lock").mail_reply.clone();
            match reply {
                Some(r) => writer.write_all(format!("{r}\r\n").as_bytes())?,
                None => {
                    mail_from = path(&text);
                    rcpts.clear();
                    bdat_data.clear();
                    bdat_wire.clear();
                    envelope_lines = vec![text.clone()];
                    writer.write_all(b"250 2.1.0 Ok\r\n")?;
                }
            }
        } else if upper.starts_with("RCPT TO:") {
            let rcpt = path(&text);
            let reply = {
                let mut b = behaviour.lock().expect("lock");
                b.rcpts_seen += 1;
                b.rcpt_replies
                    .iter()
                    .find(|(a, _)| *a == rcpt)
                    .map(|(_, r)| r.clone())
                    .or_else(|| {
                        b.only_users
                            .as_ref()
                            .filter(|users| !users.iter().any(|u| u.eq_ignore_ascii_case(&rcpt)))
                            .map(|_| {
                                format!(
                                    "550 5.1.1 <{rcpt}>: Recipient address rejected: User unknown"
                                )
                            })
                    })
            };
            match reply {
                Some(r) => writer.write_all(format!("{r}\r\n").as_bytes())?,
                None => {
                    rcpts.push(rcpt);
                    envelope_lines.push(text.clone());
                    writer.write_all(b"250 2.1.5 Ok\r\n")?;
                }
            }
        } else if upper == "DATA" {
            if rcpts.is_empty() {
                writer.write_all(b"554 5.5.1 no valid recipients\r\n")?;
                continue;
            }
            writer.write_all(b"354 go ahead\r\n")?;
            let drop_now = {
                let mut b = behaviour.lock().expect("lock");
                let d = b.drop_next > 0;
                if d {
                    b.drop_next -= 1;
                }
                d
            };
            let mut wire = Vec::new();
            let mut data = Vec::new();
            loop {
                if !read_line(&mut reader, &mut line)? {
                    return Ok(());
                }
                wire.extend_from_slice(&line);
                if drop_now {
                    // Vanish mid-DATA without a reply.
                    return Ok(());
                }
                if line == b".\r\n" {
                    break;
                }
                let content = if line.starts_with(b".") {
                    &line[1..]
                } else {
                    &line[..]
                };
                data.extend_from_slice(content);
            }
            let stall = {
                let mut b = behaviour.lock().expect("lock");
                let s = b.stall_next > 0;
                if s {
                    b.stall_next -= 1;
                    b.stalled += 1;
                }
                s
            };
            if stall {
                while !stop.load(Ordering::SeqCst)
                    && !behaviour.lock().expect("lock").release_stalled
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                behaviour.lock().expect("lock").stalled -= 1;
                return Ok(());
            }
            let delay = behaviour.lock().expect("lock").data_reply_delay;
            std::thread::sleep(delay);
            let tempfail = {
                let mut b = behaviour.lock().expect("lock");
                let t = b.tempfail_next > 0;
                if t {
                    b.tempfail_next -= 1;
                }
                t
            };
            if tempfail {
                writer.write_all(b"451 4.3.0 try again later\r\n")?;
            } else {
                received.lock().expect("lock").push(Received {
                    mail_from: mail_from.clone(),
                    rcpts: std::mem::take(&mut rcpts),
                    data,
                    wire,
                    envelope_lines: std::mem::take(&mut envelope_lines),
                    by_bdat: false,
                });
                writer.write_all(b"250 2.0.0 Ok: queued\r\n")?;
            }
            rcpts.clear();
        } else if upper.starts_with("BDAT ") {
            // RFC 3030: the chunk's octets follow whatever the answer.
            let mut words = upper.split_whitespace().skip(1);
            let size: usize = words.next().and_then(|n| n.parse().ok()).unwrap_or(0);
            let last = words.next() == Some("LAST");
            let mut chunk = vec![0u8; size];
            if !read_exact_patiently(&mut reader, &mut chunk, stop)? {
                return Ok(());
            }
            bdat_wire.extend_from_slice(&line);
            bdat_wire.extend_from_slice(&chunk);
            bdat_data.extend_from_slice(&chunk);
            if rcpts.is_empty() {
                writer.write_all(b"554 5.5.1 no valid recipients\r\n")?;
            } else if !last {
                writer.write_all(format!("250 2.0.0 {size} octets\r\n").as_bytes())?;
            } else {
                received.lock().expect("lock").push(Received {
                    mail_from: mail_from.clone(),
                    rcpts: std::mem::take(&mut rcpts),
                    data: std::mem::take(&mut bdat_data),
                    wire: std::mem::take(&mut bdat_wire),
                    envelope_lines: std::mem::take(&mut envelope_lines),
                    by_bdat: true,
                });
                writer.write_all(b"250 2.0.0 Ok: queued\r\n")?;
            }
        } else if upper == "RSET" {
            bdat_data.clear();
            bdat_wire.clear();
            rcpts.clear();
            writer.write_all(b"250 2.0.0 Ok\r\n")?;
        } else if upper == "QUIT" {
            writer.write_all(b"221 2.0.0 Bye\r\n")?;
            return Ok(());
        } else if upper == "NOOP" {
            writer.write_all(b"250 2.0.0 Ok\r\n")?;
        } else {
            writer.write_all(b"502 5.5.1 not implemented\r\n")?;
        }
    }
    Ok(())
}

/// Fills `buf` from `reader` across read timeouts; `false` at end of
/// stream or when the sink stops.
fn read_exact_patiently(
    reader: &mut BufReader<TcpStream>,
    buf: &mut [u8],
    stop: &AtomicBool,
) -> std::io::Result<bool> {
    use std::io::Read;
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => return Ok(false),
            Ok(n) => filled += n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if stop.load(Ordering::SeqCst) {
                    return Ok(false);
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

fn path(line: &str) -> String {
    match (line.find('<'), line.rfind('>')) {
        (Some(a), Some(b)) if b > a => line[a + 1..b].to_string(),
        _ => String::new(),
    }
}
