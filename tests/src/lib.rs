//! Helpers for end-to-end tests: start the real `backupmx` binary on a
//! loopback port with its own data directory, and talk SMTP to it over real
//! sockets (optionally from another 127.0.0.x source address).

pub mod browser;
pub mod dns;
pub mod exim;
pub mod http;
pub mod https;
pub mod mta;
pub mod opensmtpd;
pub mod pki;
pub mod postfix;
pub mod rspamd;
pub mod sink;
pub mod smtp_tls;
pub mod soak;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The standard output of a command that must have succeeded; its
/// standard error as the failure message otherwise.
pub fn succeeded(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// The `backupmx` binary next to this test executable (`target/<profile>/`).
pub fn backupmx_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // Test executables live in `target/<profile>/deps/`, the tests crate's
    // own binaries (soak, backscatter) beside `backupmx`.
    let beside = exe.parent().expect("target dir");
    let dir = if beside.join("backupmx").exists() {
        beside
    } else {
        beside.parent().expect("target dir")
    };
    let bin = dir.join("backupmx");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build --workspace --bins` first (scripts/test does)",
        bin.display()
    );
    bin
}

/// A port nobody listens on now, for a server a test starts later.
///
/// Taken below Linux's ephemeral range (32768–60999): a port from
/// `bind(:0)` comes from that range, which every outgoing connection of
/// every test draws from too, and one of them could take it before the
/// server binds it (seen as "Address already in use" under the load of
/// the whole suite). Ports are handed out once per test process.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    const LOW: u16 = 20_000;
    const SPAN: u16 = 12_000;
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let start = (std::process::id() % u32::from(SPAN)) as u16;
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = LOW + (start.wrapping_add(n)) % SPAN;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// How a start of the server went.
#[derive(PartialEq)]
enum Start {
    /// It greeted.
    Ready,
    /// It exited because its port was taken.
    PortTaken,
}

/// A running `backupmx run` with its own config and data directory.
pub struct Server {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub log_path: PathBuf,
    mode: &'static str,
    env: Vec<(String, String)>,
    /// A command the binary is started under (`prlimit …`, `sh -c …`).
    wrapper: Vec<String>,
}

impl Server {
    /// `backupmx ingest` (no delivery). `smtp` goes inside `[smtp]`;
    /// `extra` is appended (more sections and `[[domain]]` entries).
    /// `example.test` is always hosted.
    pub fn start(smtp: &str, extra: &str) -> Server {
        Server::start_mode("ingest", smtp, extra, "")
    }

    /// `backupmx run` (ingest and delivery worker). `example_primary` is the
    /// `primary` list of example.test (TOML array), or empty. Without a
    /// `[dns]` section in `extra`, DNS goes to a dead loopback port: tests
    /// never query a real resolver.
    pub fn start_run(smtp: &str, extra: &str, example_primary: &str) -> Server {
        let mut s = Server::prepare_run(smtp, extra, example_primary);
        s.spawn();
        s
    }

    /// `backupmx ingest` on the AWS backend, with fresh uniquely named
    /// resources created by `backupmx aws bootstrap`. `None` when no
    /// emulator is configured (see [`aws_available`]).
    pub fn start_aws(
        smtp: &str,
        extra: &str,
        example_primary: &str,
        break_bucket: bool,
    ) -> Option<Server> {
        Server::start_aws_via(smtp, extra, example_primary, break_bucket, None)
    }

    /// As [`Server::start_aws`], with the ingest reaching the emulator at
    /// `endpoint` (a [`TcpProxy`] that can play an outage).
    pub fn start_aws_via(
        smtp: &str,
        extra: &str,
        example_primary: &str,
        break_bucket: bool,
        endpoint: Option<&str>,
    ) -> Option<Server> {
        Server::start_aws_named(smtp, extra, example_primary, break_bucket, endpoint, false)
    }

    /// As [`Server::start_aws`], with the queue given as `queue_url` (as
    /// the SAM stack's outputs give it) instead of `queue_name`.
    pub fn start_aws_by_queue_url(
        smtp: &str,
        extra: &str,
        example_primary: &str,
    ) -> Option<Server> {
        Server::start_aws_named(smtp, extra, example_primary, false, None, true)
    }

    fn start_aws_named(
        smtp: &str,
        extra: &str,
        example_primary: &str,
        break_bucket: bool,
        endpoint: Option<&str>,
        queue_by_url: bool,
    ) -> Option<Server> {
        if !aws_available() {
            return None;
        }
        let suffix = format!(
            "{:x}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        );
        let queue = if queue_by_url {
            let emulator = std::env::var("AWS_ENDPOINT_URL").unwrap_or_default();
            format!(
                "queue_url = \"{}/000000000000/queue-{suffix}\"\n",
                emulator.trim_end_matches('/')
            )
        } else {
            format!("queue_name = \"queue-{suffix}\"\n")
        };
        let aws = format!(
            "[aws]\ndomains_table = \"domains-{suffix}\"\ngreylist_table = \"greylist-{suffix}\"\nqueue_table = \"records-{suffix}\"\nbucket = \"bucket-{suffix}\"\n{queue}"
        );
        let mut s = Server::prepare(
            "ingest",
            smtp,
            &format!("{extra}\n{aws}"),
            example_primary,
            "backend = \"aws\"\n",
        );
        let out = s.cli(&["aws", "bootstrap"]);
        assert!(
            out.status.success(),
            "bootstrap: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if break_bucket {
            let text = std::fs::read_to_string(&s.config_path).expect("config");
            std::fs::write(
                &s.config_path,
                text.replace(&format!("bucket-{suffix}"), &format!("missing-{suffix}")),
            )
            .expect("config");
        }
        if let Some(url) = endpoint {
            s.set_env("AWS_ENDPOINT_URL", url);
        }
        s.spawn();
        Some(s)
    }

    /// Another `ingest` process on the same configuration (same AWS
    /// resources), on its own port.
    pub fn start_sibling(&self) -> Server {
        let text = std::fs::read_to_string(&self.config_path).expect("config");
        let port = free_port();
        let text = text.replace(
            &format!("127.0.0.1:{}", self.addr.port()),
            &format!("127.0.0.1:{port}"),
        );
        let dir = tempfile::tempdir().expect("tempdir");
        // Its own data directory: one server per data directory.
        let text = text.replace(
            &self.data_dir().display().to_string(),
            &dir.path().join("data").display().to_string(),
        );
        let config_path = dir.path().join("backupmx.toml");
        std::fs::write(&config_path, text).expect("write config");
        let log_path = dir.path().join("backupmx.log");
        let mut s = Server {
            child: None,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            dir,
            config_path,
            log_path,
            mode: self.mode,
            env: self.env.clone(),
            wrapper: self.wrapper.clone(),
        };
        s.spawn();
        s
    }

    /// Sets an environment variable for the next (re)start.
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.env.push((key.to_string(), value.to_string()));
    }

    fn start_mode(mode: &'static str, smtp: &str, extra: &str, example_primary: &str) -> Server {
        let mut s = Server::prepare(mode, smtp, extra, example_primary, "");
        s.spawn();
        s
    }

    fn prepare(
        mode: &'static str,
        smtp: &str,
        extra: &str,
        example_primary: &str,
        storage: &str,
    ) -> Server {
        // Greylisting is on by default; tests about other things turn it off.
        let extra = if extra.contains("[greylist]") {
            extra.to_string()
        } else {
            format!("{extra}\n[greylist]\nenabled = false\n")
        };
        // Without a `[dns]` section every lookup fails at once (sender
        // authentication asks in every mode): tests never query a real
        // resolver, and never wait for a timeout either.
        let extra = if extra.contains("[dns]") {
            extra
        } else {
            format!("{extra}\n{}", dns::DnsServer::failing().toml())
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let config = format!(
            "hostname = \"mx2.test\"\n[smtp]\nlisten = [\"127.0.0.1:{port}\"]\n{smtp}\n[storage]\n{storage}data_dir = \"{}\"\n\n[[domain]]\nname = \"example.test\"\n{}\n{extra}\n",
            dir.path().join("data").display(),
            if example_primary.is_empty() { String::new() } else { format!("primary = {example_primary}\n") }
        );
        let config_path = dir.path().join("backupmx.toml");
        std::fs::write(&config_path, config).expect("write config");
        let log_path = dir.path().join("backupmx.log");
        Server {
            child: None,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            dir,
            config_path,
            log_path,
            mode,
            env: Vec::new(),
            wrapper: Vec::new(),
        }
    }

    /// `backupmx ingest` on the AWS backend, not started yet, with no
    /// `[aws]` section: the resources are given as `BACKUPMX_AWS__*`
    /// variables ([`Server::set_env`]), as the SAM template gives them.
    pub fn prepare_ingest_aws(extra: &str, example_primary: &str) -> Server {
        Server::prepare("ingest", "", extra, example_primary, "backend = \"aws\"\n")
    }

    /// The variables set with [`Server::set_env`].
    pub fn env_vars(&self) -> &[(String, String)] {
        &self.env
    }

    /// As [`Server::start_run`], but not started yet: set a wrapper or
    /// prepare the data directory (`dir/data`), then call [`Server::spawn`].
    pub fn prepare_run(smtp: &str, extra: &str, example_primary: &str) -> Server {
        Server::prepare("run", smtp, extra, example_primary, "")
    }

    /// The data directory of the configuration.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Starts the binary under `command` (its arguments, then ours follow).
    pub fn set_wrapper(&mut self, command: &[&str]) {
        self.wrapper = command.iter().map(|s| s.to_string()).collect();
    }

    /// Starts the server and waits for its greeting.
    ///
    /// The port came from [`free_port`], so another test's socket may take it
    /// before the server binds it. On the first start (nobody knows the
    /// address yet) the server then moves to a fresh port and starts again;
    /// a restart keeps its port, which other servers may have been given.
    pub fn spawn(&mut self) {
        let first_start = self.child.is_none() && self.log().is_empty();
        let mut attempts = 0;
        while self.spawn_once() == Start::PortTaken {
            attempts += 1;
            assert!(
                first_start && attempts < 5,
                "backupmx could not listen on {}: {}",
                self.addr,
                self.log()
            );
            self.move_to_a_free_port();
        }
    }

    fn move_to_a_free_port(&mut self) {
        let port = free_port();
        let text = std::fs::read_to_string(&self.config_path).expect("config");
        let text = text.replace(
            &format!("127.0.0.1:{}", self.addr.port()),
            &format!("127.0.0.1:{port}"),
        );
        std::fs::write(&self.config_path, text).expect("write config");
        std::fs::write(&self.log_path, "").expect("clear log");
        self.addr.set_port(port);
    }

    fn spawn_once(&mut self) -> Start {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("log file");
        let mut command = match self.wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(backupmx_bin());
                c
            }
            None => Command::new(backupmx_bin()),
        };
        let child = command
            .arg(self.mode)
            .arg("--config")
            .arg(&self.config_path)
            .current_dir(self.dir.path())
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn backupmx");
        self.child = Some(child);
        self.wait_ready()
    }

    fn wait_ready(&mut self) -> Start {
        let proxied = std::fs::read_to_string(&self.config_path)
            .unwrap_or_default()
            .contains("proxy_protocol = true");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(mut c) = Client::try_connect(self.addr) {
                if proxied {
                    // A PROXY v2 LOCAL header: the balancer's own health check.
                    c.send(b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00");
                }
                let greeting = c.read_reply();
                assert!(greeting.starts_with("220 "), "greeting: {greeting}");
                c.send("QUIT\r\n");
                return Start::Ready;
            }
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    let log = self.log();
                    if log.contains("cannot listen on") && log.contains("Address already in use") {
                        return Start::PortTaken;
                    }
                    panic!("backupmx exited with {status}: {log}");
                }
            }
            assert!(
                Instant::now() < deadline,
                "backupmx did not start: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The RCPT reply for `rcpt` in a fresh transaction (recipient checks).
    pub fn rcpt_reply(&self, rcpt: &str) -> String {
        let mut c = self.client();
        c.expect("EHLO client.remote.test", "250");
        c.expect("MAIL FROM:<alice@remote.test>", "250");
        let reply = c.cmd(&format!("RCPT TO:<{rcpt}>"));
        c.cmd("QUIT");
        reply
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).expect("running")
    }

    /// SIGKILL: no chance to flush or clean up.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends a signal by name (`TERM`, `HUP`, …) with kill(1).
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{sig} failed");
    }

    /// Waits for the process to exit (after a signal), returning its status.
    pub fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        let child = self.child.as_mut().expect("running");
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                self.child = None;
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "backupmx did not exit: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// Runs `backupmx --config <ours> args…`, with the server's
    /// `BACKUPMX_*` variables (config keys) but not its other ones.
    pub fn cli(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(backupmx_bin());
        cmd.arg("--config")
            .arg(&self.config_path)
            .args(args)
            .current_dir(self.dir.path());
        for (k, v) in self.env.iter().filter(|(k, _)| k.starts_with("BACKUPMX_")) {
            cmd.env(k, v);
        }
        cmd.output().expect("run backupmx")
    }

    pub fn queue(&self) -> Vec<serde_json::Value> {
        let out = self.cli(&["queue", "list", "--json"]);
        assert!(
            out.status.success(),
            "queue list: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<Vec<serde_json::Value>>(&out.stdout).expect("queue list JSON")
    }

    /// The stored message, exactly as it will be relayed.
    pub fn raw(&self, id: &str) -> Vec<u8> {
        let out = self.cli(&["queue", "show", id, "--raw"]);
        assert!(
            out.status.success(),
            "queue show: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    pub fn client(&self) -> Client {
        Client::connect(self.addr)
    }

    pub fn client_from(&self, source: &str) -> Client {
        Client::connect_from(source.parse().expect("ip"), self.addr)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A line-oriented SMTP client over a blocking socket.
pub struct Client {
    reader: BufReader<TcpStream>,
}

impl Client {
    pub fn try_connect(addr: SocketAddr) -> std::io::Result<Client> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        Ok(Client::from_stream(stream))
    }

    pub fn from_stream(stream: TcpStream) -> Client {
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        Client {
            reader: BufReader::new(stream),
        }
    }

    /// Connects and reads the greeting.
    pub fn connect(addr: SocketAddr) -> Client {
        let mut c = Client::try_connect(addr).expect("connect");
        let g = c.read_reply();
        assert!(g.starts_with("220 "), "greeting: {g}");
        c
    }

    /// Connects from a chosen loopback source address (Linux routes all of
    /// 127/8 to lo), without reading the greeting.
    pub fn connect_from_raw(source: IpAddr, addr: SocketAddr) -> Client {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        socket
            .bind(&SocketAddr::new(source, 0).into())
            .expect("bind source");
        socket.connect(&addr.into()).expect("connect");
        Client::from_stream(socket.into())
    }

    pub fn connect_from(source: IpAddr, addr: SocketAddr) -> Client {
        let mut c = Client::connect_from_raw(source, addr);
        let g = c.read_reply();
        assert!(g.starts_with("220 "), "greeting: {g}");
        c
    }

    pub fn stream(&self) -> &TcpStream {
        self.reader.get_ref()
    }

    pub fn into_stream(self) -> TcpStream {
        self.reader.into_inner()
    }

    pub fn send(&mut self, data: impl AsRef<[u8]>) {
        self.reader
            .get_mut()
            .write_all(data.as_ref())
            .expect("write");
    }

    /// Reads one (possibly multi-line) reply; empty string on EOF.
    pub fn read_reply(&mut self) -> String {
        let mut reply = String::new();
        loop {
            let mut line = String::new();
            match self.reader.read_line(&mut line) {
                Ok(0) => return reply,
                Ok(_) => {}
                Err(e) => panic!("reading reply after {reply:?}: {e}"),
            }
            reply.push_str(&line);
            if line.len() < 4 || line.as_bytes()[3] == b' ' {
                return reply;
            }
        }
    }

    /// Sends one command line and returns the reply.
    pub fn cmd(&mut self, line: &str) -> String {
        self.send(format!("{line}\r\n"));
        self.read_reply()
    }

    /// Sends a command and asserts the reply starts with `expect`.
    pub fn expect(&mut self, line: &str, expect: &str) -> String {
        let r = self.cmd(line);
        assert!(
            r.starts_with(expect),
            "{line:?}: expected {expect:?}, got {r:?}"
        );
        r
    }

    /// EHLO, MAIL, RCPT, then `chunks` as BDAT chunks (RFC 3030), all
    /// pipelined, the last with LAST: returns every reply after RCPT's.
    pub fn send_chunked(&mut self, from: &str, to: &[&str], chunks: &[&[u8]]) -> Vec<String> {
        self.expect("EHLO client.test", "250");
        self.expect(&format!("MAIL FROM:<{from}>"), "250");
        for rcpt in to {
            self.expect(&format!("RCPT TO:<{rcpt}>"), "250");
        }
        let mut wire = Vec::new();
        for (i, chunk) in chunks.iter().enumerate() {
            let last = if i + 1 == chunks.len() { " LAST" } else { "" };
            wire.extend_from_slice(format!("BDAT {}{last}\r\n", chunk.len()).as_bytes());
            wire.extend_from_slice(chunk);
        }
        self.send(wire);
        chunks.iter().map(|_| self.read_reply()).collect()
    }

    /// EHLO, MAIL, RCPT, DATA, body, end: returns the final reply.
    pub fn send_message(&mut self, from: &str, to: &[&str], body: &str) -> String {
        self.expect("EHLO client.test", "250");
        self.expect(&format!("MAIL FROM:<{from}>"), "250");
        for rcpt in to {
            self.expect(&format!("RCPT TO:<{rcpt}>"), "250");
        }
        self.expect("DATA", "354");
        self.send(body);
        self.send(".\r\n");
        self.read_reply()
    }

    /// True if the server closed the connection (EOF) within the timeout.
    pub fn is_closed(&mut self) -> bool {
        let mut buf = [0u8; 1];
        match self.reader.read(&mut buf) {
            Ok(0) => true,
            // Closing with unread input makes the kernel send a reset.
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
            Ok(_) => false,
        }
    }
}

/// Extracts the queue id from `250 2.0.0 Ok: queued as ID`.
pub fn queue_id(reply: &str) -> String {
    reply
        .trim_end()
        .rsplit(' ')
        .next()
        .filter(|_| reply.starts_with("250 "))
        .unwrap_or_else(|| panic!("not a queued reply: {reply:?}"))
        .to_string()
}

/// Asserts every CR is followed by LF and every LF preceded by CR.
pub fn assert_no_bare_cr_lf(data: &[u8]) {
    for (i, &b) in data.iter().enumerate() {
        if b == b'\r' {
            assert_eq!(data.get(i + 1), Some(&b'\n'), "bare CR at {i}");
        }
        if b == b'\n' {
            assert!(i > 0 && data[i - 1] == b'\r', "bare LF at {i}");
        }
    }
}

/// Strips our prepended Received header (up to the first line that is not
/// a continuation) and returns the rest.
/// A message of about `size` bytes as a client sends it (dot-stuffed,
/// ending in CRLF, without the final `.`), with lines that start with a
/// dot and bare LFs, and what a server stores of it (dots unstuffed, every
/// line ending CRLF).
pub fn big_message(size: usize) -> (String, Vec<u8>) {
    let mut wire = String::from("From: alice@remote.test\r\nSubject: big\r\n\r\n");
    let mut i = 0;
    while wire.len() < size {
        wire.push_str(&format!("..dotted line {i} of a big message, with some text to make it longer\r\nbare\nlf {i}\r\n"));
        i += 1;
    }
    let stored = wire
        .replace("\r\n..", "\r\n.")
        .replace("bare\nlf", "bare\r\nlf");
    (wire, stored.into_bytes())
}

/// The message after our trace fields: the `Authentication-Results` of
/// sender authentication (when there is one), then our `Received`.
pub fn after_received(message: &[u8]) -> &[u8] {
    let message = skip_field(message, b"Authentication-Results: ");
    assert!(
        message.starts_with(b"Received: "),
        "no Received header first"
    );
    skip_field(message, b"Received: ")
}

/// `message` after its first field if that is a `name` field.
pub fn skip_field<'m>(message: &'m [u8], name: &[u8]) -> &'m [u8] {
    if !message.starts_with(name) {
        return message;
    }
    let mut i = 0;
    loop {
        let lf = message[i..]
            .iter()
            .position(|&b| b == b'\n')
            .expect("header end")
            + i;
        i = lf + 1;
        if !matches!(message.get(i), Some(b' ' | b'\t')) {
            return &message[i..];
        }
    }
}

/// Polls `f` until it returns `Some`, or panics after `within`.
pub fn eventually<T>(within: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Opens `dir` and its `cert.pem` and `key.pem` to every user: real MTAs
/// started by the tests read them as their own users.
pub fn make_keys_readable(dir: &std::path::Path) {
    for (path, mode) in [
        (dir.to_path_buf(), "755"),
        (dir.join("cert.pem"), "644"),
        (dir.join("key.pem"), "644"),
    ] {
        let _ = std::process::Command::new("chmod")
            .arg(mode)
            .arg(path)
            .status();
    }
}

/// Writes a self-signed certificate for `mx2.test` and its key into `dir`
/// and returns the `[tls]` config section using them.
pub fn self_signed_tls(dir: &Path) -> String {
    let key = rcgen::KeyPair::generate().expect("key");
    let params = rcgen::CertificateParams::new(vec!["mx2.test".to_string()]).expect("params");
    let cert = params.self_signed(&key).expect("certificate");
    let cert_path = dir.join("cert.pem");
    let key_path = dir.join("key.pem");
    std::fs::write(&cert_path, cert.pem()).expect("write cert");
    std::fs::write(&key_path, key.serialize_pem()).expect("write key");
    format!(
        "[tls]\ncert = \"{}\"\nkey = \"{}\"\n",
        cert_path.display(),
        key_path.display()
    )
}

/// Whether an AWS emulator is configured (`AWS_ENDPOINT_URL`). With
/// `REQUIRE_AWS_EMULATOR` set (scripts/test sets it), a missing emulator
/// fails the test instead of skipping it.
pub fn aws_available() -> bool {
    if std::env::var_os("AWS_ENDPOINT_URL").is_some() {
        return true;
    }
    assert!(
        std::env::var_os("REQUIRE_AWS_EMULATOR").is_none(),
        "REQUIRE_AWS_EMULATOR is set but AWS_ENDPOINT_URL is not: start the emulator (ci/aws-emulator.sh)"
    );
    eprintln!("skipped: AWS_ENDPOINT_URL is not set");
    false
}

/// The `retry-fn` binary next to this test executable.
pub fn retry_fn_bin() -> PathBuf {
    backupmx_bin().with_file_name("retry-fn")
}

/// A TCP forwarder on loopback that can be switched off to play a network
/// outage between a process and a real server (the AWS emulator), and
/// that keeps what clients sent: the wire as an eavesdropper sees it.
pub struct TcpProxy {
    pub addr: SocketAddr,
    down: std::sync::Arc<std::sync::atomic::AtomicBool>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    wire: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
}

impl TcpProxy {
    pub fn start(upstream: SocketAddr) -> TcpProxy {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        let down = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let wire = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (d, st, w) = (down.clone(), stop.clone(), wire.clone());
        std::thread::spawn(move || {
            while !st.load(Ordering::SeqCst) {
                let Ok((client, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                if d.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let _ = client.set_nonblocking(false);
                let Ok(server) = TcpStream::connect(upstream) else {
                    continue;
                };
                for (direction, (mut from, mut to)) in [
                    (
                        client.try_clone().expect("clone"),
                        server.try_clone().expect("clone"),
                    ),
                    (server, client),
                ]
                .into_iter()
                .enumerate()
                {
                    let d = d.clone();
                    let kept = (direction == 0).then(|| w.clone());
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 16 * 1024];
                        let _ = from.set_read_timeout(Some(Duration::from_millis(100)));
                        loop {
                            if d.load(Ordering::SeqCst) {
                                let _ = to.shutdown(std::net::Shutdown::Both);
                                let _ = from.shutdown(std::net::Shutdown::Both);
                                return;
                            }
                            match from.read(&mut buf) {
                                Ok(0) => {
                                    let _ = to.shutdown(std::net::Shutdown::Write);
                                    return;
                                }
                                Ok(n) => {
                                    if let Some(kept) = &kept {
                                        kept.lock().unwrap().extend_from_slice(&buf[..n]);
                                    }
                                    if to.write_all(&buf[..n]).is_err() {
                                        return;
                                    }
                                }
                                Err(e)
                                    if matches!(
                                        e.kind(),
                                        std::io::ErrorKind::WouldBlock
                                            | std::io::ErrorKind::TimedOut
                                    ) => {}
                                Err(_) => return,
                            }
                        }
                    });
                }
            }
        });
        TcpProxy {
            addr,
            down,
            stop,
            wire,
        }
    }

    /// Every byte clients sent through the proxy so far.
    pub fn client_bytes(&self) -> Vec<u8> {
        self.wire.lock().unwrap().clone()
    }

    pub fn set_down(&self, down: bool) {
        self.down.store(down, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A local HTTP receiver for alert webhooks: records every POSTed JSON
/// body and answers 200.
pub struct HookReceiver {
    pub addr: SocketAddr,
    bodies: std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
}

impl HookReceiver {
    pub fn start() -> HookReceiver {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind hook receiver");
        let addr = listener.local_addr().expect("addr");
        let bodies = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let store = bodies.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
                let mut reader = std::io::BufReader::new(conn);
                let mut length = 0usize;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        break;
                    }
                    let lower = line.to_ascii_lowercase();
                    if let Some(v) = lower.strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap_or(0);
                    }
                    if line == "\r\n" {
                        break;
                    }
                }
                let mut body = vec![0u8; length];
                if reader.read_exact(&mut body).is_ok() {
                    if let Ok(v) = serde_json::from_slice(&body) {
                        store.lock().unwrap().push(v);
                    }
                }
                let mut conn = reader.into_inner();
                let _ = conn.write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                );
            }
        });
        HookReceiver { addr, bodies }
    }

    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    /// Every alert received so far.
    pub fn alerts(&self) -> Vec<serde_json::Value> {
        self.bodies.lock().unwrap().clone()
    }

    /// How many alerts of `event` arrived.
    pub fn count(&self, event: &str) -> usize {
        self.alerts().iter().filter(|a| a["event"] == event).count()
    }
}
