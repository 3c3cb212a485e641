//! A real Postfix (Debian's package, which scripts/install-test-deps
//! installs) as a test peer: an instance of its own with its config, queue
//! and maildir in a temporary directory, listening on a loopback port. As a
//! primary it delivers hosted domains to a maildir; as a sender it relays
//! everything to a relay host (backupmx) and retries quickly.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// How an instance is set up.
#[derive(Debug, Clone, Default)]
pub struct PostfixOptions {
    /// Domains delivered to the instance's maildir.
    pub domains: Vec<String>,
    /// Offer PIPELINING (Postfix always does unless told to discard it).
    pub no_pipelining: bool,
    /// Offer STARTTLS with this certificate and key (PEM files).
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Relay everything not hosted here to this host (a sender).
    pub relayhost: Option<SocketAddr>,
}

pub struct Postfix {
    dir: tempfile::TempDir,
    pub addr: SocketAddr,
    running: bool,
}

/// Fails (not skips) when Postfix is missing: the interop suite is part of
/// the test command, which installs it.
pub fn postfix_bin() -> &'static str {
    assert!(
        Path::new("/usr/sbin/postfix").exists(),
        "Postfix is not installed: scripts/install-test-deps installs it"
    );
    "/usr/sbin/postfix"
}

fn chown(path: &Path, owner: &str) {
    let status = Command::new("chown")
        .arg(owner)
        .arg(path)
        .status()
        .expect("chown");
    assert!(status.success(), "chown {owner} {}", path.display());
}

impl Postfix {
    /// Writes the instance's configuration; [`Postfix::start`] runs it.
    pub fn new(port: u16, opts: &PostfixOptions) -> Postfix {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        for d in ["queue", "data", "mail"] {
            std::fs::create_dir(root.join(d)).expect("mkdir");
        }
        chown(&root.join("data"), "postfix");
        chown(&root.join("mail"), "nobody:nogroup");
        let mut main = format!(
            "compatibility_level = 3.6\n\
             queue_directory = {root}/queue\n\
             data_directory = {root}/data\n\
             mail_owner = postfix\n\
             setgid_group = postdrop\n\
             inet_interfaces = 127.0.0.1\n\
             inet_protocols = ipv4\n\
             myhostname = postfix-{port}.test\n\
             mydestination =\n\
             mynetworks = 127.0.0.0/8\n\
             smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination\n\
             virtual_mailbox_domains = {domains}\n\
             virtual_mailbox_base = {root}/mail\n\
             virtual_mailbox_maps = static:inbox/\n\
             virtual_uid_maps = static:65534\n\
             virtual_gid_maps = static:65534\n\
             virtual_minimum_uid = 1\n\
             maillog_file = {root}/postfix.log\n\
             maillog_file_prefixes = {root}\n\
             message_size_limit = 52428800\n\
             virtual_mailbox_limit = 0\n\
             alias_maps =\n\
             local_header_rewrite_clients =\n\
             alias_database =\n\
             queue_run_delay = 1s\n\
             minimal_backoff_time = 1s\n\
             maximal_backoff_time = 2s\n\
             smtp_tls_security_level = may\n",
            root = root.display(),
            domains = opts.domains.join(", "),
        );
        if opts.no_pipelining {
            main.push_str("smtpd_discard_ehlo_keywords = pipelining\n");
        }
        if let Some((cert, key)) = &opts.tls {
            main.push_str(&format!(
                "smtpd_tls_cert_file = {}\nsmtpd_tls_key_file = {}\nsmtpd_tls_security_level = may\n",
                cert.display(),
                key.display()
            ));
        }
        if let Some(relay) = opts.relayhost {
            main.push_str(&format!("relayhost = [{}]:{}\n", relay.ip(), relay.port()));
        }
        std::fs::write(root.join("main.cf"), main).expect("main.cf");
        let master = format!("127.0.0.1:{port} inet n - n - - smtpd\n{}", MASTER_SERVICES);
        std::fs::write(root.join("master.cf"), master).expect("master.cf");
        Postfix {
            dir,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            running: false,
        }
    }

    pub fn config_dir(&self) -> &Path {
        self.dir.path()
    }

    fn postfix(&self, verb: &str) -> std::process::Output {
        Command::new(postfix_bin())
            .arg("-c")
            .arg(self.dir.path())
            .arg(verb)
            .output()
            .expect("run postfix")
    }

    /// Starts the instance and waits for its greeting.
    pub fn start(&mut self) {
        let out = self.postfix("start");
        assert!(
            out.status.success(),
            "postfix start: {}{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        self.running = true;
        crate::mta::wait_listening(self.addr, "postfix", || self.log());
    }

    /// Stops the instance (the primary goes down).
    pub fn stop(&mut self) {
        if self.running {
            let _ = self.postfix("stop");
            self.running = false;
            let deadline = Instant::now() + Duration::from_secs(20);
            while std::net::TcpStream::connect(self.addr).is_ok() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("postfix.log")).unwrap_or_default()
    }

    /// Every message delivered to the maildir, as stored (LF line ends).
    pub fn maildir(&self) -> Vec<Vec<u8>> {
        crate::mta::read_maildir(&self.dir.path().join("mail/inbox"))
    }

    /// Waits until the maildir holds at least `n` messages.
    pub fn wait_for(&self, n: usize, within: Duration) -> Vec<Vec<u8>> {
        crate::mta::wait_for_maildir(
            &self.dir.path().join("mail/inbox"),
            n,
            within,
            "postfix",
            || self.log(),
        )
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        if self.running {
            let _ = self.postfix("abort");
        }
    }
}

/// The services of a minimal master.cf, none chrooted.
const MASTER_SERVICES: &str = "\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
";
