//! A real Exim as a test peer, beside Postfix. Debian's Exim packages
//! conflict with Postfix's, so scripts/install-test-deps unpacks them into
//! a directory of their own ([`EXIM_ROOT`]) and creates the `Debian-exim`
//! user the binary is built for; each test runs an instance with its own
//! configuration, spool and maildir in a temporary directory.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Where scripts/install-test-deps unpacks Exim (`EXIM_ROOT` overrides).
pub const EXIM_ROOT: &str = "/opt/backupmx-test/exim";

fn exim_root() -> PathBuf {
    std::env::var_os("EXIM_ROOT").map_or_else(|| PathBuf::from(EXIM_ROOT), PathBuf::from)
}

/// How an instance is set up.
#[derive(Debug, Clone, Default)]
pub struct EximOptions {
    /// Domains delivered to the instance's maildir.
    pub domains: Vec<String>,
    pub no_pipelining: bool,
    /// Offer STARTTLS with this certificate and key (PEM files).
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Send everything else to this host (a sender relaying through it).
    pub relayhost: Option<SocketAddr>,
}

pub struct Exim {
    dir: tempfile::TempDir,
    pub addr: SocketAddr,
    child: Option<Child>,
}

fn chown(path: &Path, owner: &str) {
    let status = Command::new("chown")
        .arg("-R")
        .arg(owner)
        .arg(path)
        .status()
        .expect("chown");
    assert!(status.success(), "chown {owner} {}", path.display());
}

impl Exim {
    pub fn new(port: u16, opts: &EximOptions) -> Exim {
        let exim = exim_root().join("usr/sbin/exim4");
        assert!(
            exim.exists(),
            "Exim is not unpacked at {}: scripts/install-test-deps does it",
            exim.display()
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        // Exim reads its configuration again as its own user.
        let _ = Command::new("chmod").arg("755").arg(root).status();
        for d in ["spool", "log", "mail"] {
            std::fs::create_dir(root.join(d)).expect("mkdir");
            chown(&root.join(d), "Debian-exim:Debian-exim");
        }
        let tls = match &opts.tls {
            Some((cert, key)) => format!(
                "tls_advertise_hosts = *\ntls_certificate = {}\ntls_privatekey = {}\n",
                cert.display(),
                key.display()
            ),
            None => "tls_advertise_hosts =\n".into(),
        };
        let smarthost = match opts.relayhost {
            Some(relay) => format!(
                "smarthost:\n  driver = manualroute\n  domains = ! +local_domains\n  transport = remote_smtp\n  route_list = * {}::{}\n  self = send\n  no_more\n",
                relay.ip(),
                relay.port()
            ),
            None => String::new(),
        };
        let config = format!(
            "primary_hostname = exim-{port}.test\n\
             domainlist local_domains = {domains}\n\
             spool_directory = {root}/spool\n\
             log_file_path = {root}/log/%slog\n\
             daemon_smtp_ports = {port}\n\
             local_interfaces = 127.0.0.1\n\
             exim_path = {exim}\n\
             keep_environment = LD_LIBRARY_PATH\n\
             never_users =\n\
             host_lookup =\n\
             rfc1413_hosts =\n\
             acl_smtp_rcpt = acl_check_rcpt\n\
             pipelining_advertise_hosts = {pipelining}\n\
             message_size_limit = 50M\n\
             {tls}\
             \n\
             begin acl\n\
             acl_check_rcpt:\n\
             \x20 accept domains = +local_domains\n\
             \x20 accept hosts = 127.0.0.0/8\n\
             \x20 deny message = relay not permitted\n\
             \n\
             begin routers\n\
             {smarthost}\
             inbox:\n\
             \x20 driver = accept\n\
             \x20 domains = +local_domains\n\
             \x20 transport = maildir\n\
             \n\
             begin transports\n\
             remote_smtp:\n\
             \x20 driver = smtp\n\
             \x20 hosts_avoid_tls = *\n\
             maildir:\n\
             \x20 driver = appendfile\n\
             \x20 directory = {root}/mail/inbox\n\
             \x20 maildir_format\n\
             \x20 user = Debian-exim\n\
             \x20 group = Debian-exim\n\
             \x20 delivery_date_add = false\n\
             \x20 envelope_to_add = false\n\
             \x20 return_path_add = true\n\
             \x20 create_directory\n\
             \n\
             begin retry\n\
             * * F,5m,1s\n",
            root = root.display(),
            exim = exim.display(),
            domains = opts.domains.join(" : "),
            pipelining = if opts.no_pipelining { "" } else { "*" },
        );
        std::fs::write(root.join("exim.conf"), config).expect("exim.conf");
        Exim {
            dir,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            child: None,
        }
    }

    /// Starts the daemon (queue runs every second) and waits for it.
    pub fn start(&mut self) {
        let root = exim_root();
        let child = Command::new(root.join("usr/sbin/exim4"))
            .env("LD_LIBRARY_PATH", root.join("usr/lib/x86_64-linux-gnu"))
            .arg("-C")
            .arg(self.dir.path().join("exim.conf"))
            .args(["-bdf", "-q1s"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start exim");
        self.child = Some(child);
        crate::mta::wait_listening(self.addr, "exim", || self.log());
    }

    pub fn log(&self) -> String {
        let log = self.dir.path().join("log");
        ["mainlog", "rejectlog", "paniclog"]
            .iter()
            .map(|f| std::fs::read_to_string(log.join(f)).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
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
            "exim",
            || self.log(),
        )
    }
}

impl Drop for Exim {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
