//! A real OpenSMTPD as a test primary. Its package conflicts with Postfix,
//! so scripts/install-test-deps unpacks it into [`OPENSMTPD_ROOT`], creates
//! its users and the paths compiled into it (`/var/lib/opensmtpd/empty`,
//! `/usr/libexec/opensmtpd`). Its queue (`/var/spool/smtpd`) and control
//! socket are compiled in too, so one instance runs at a time: [`OpenSmtpd`]
//! holds a process-wide lock while it lives.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

pub const OPENSMTPD_ROOT: &str = "/opt/backupmx-test/opensmtpd";

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

pub struct OpenSmtpd {
    dir: tempfile::TempDir,
    pub addr: SocketAddr,
    child: Option<Child>,
    _turn: MutexGuard<'static, ()>,
}

impl OpenSmtpd {
    /// An instance that delivers `domains` to a maildir. (No STARTTLS:
    /// Debian 12's OpenSMTPD fails its handshakes under OpenSSL 3.)
    pub fn new(port: u16, domains: &[&str]) -> OpenSmtpd {
        let turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
        let smtpd = PathBuf::from(OPENSMTPD_ROOT).join("usr/sbin/smtpd");
        assert!(
            smtpd.exists(),
            "OpenSMTPD is not unpacked at {OPENSMTPD_ROOT}: scripts/install-test-deps does it"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        let _ = Command::new("chmod").arg("755").arg(root).status();
        let mail = root.join("mail");
        std::fs::create_dir(&mail).expect("mkdir");
        let _ = Command::new("chown")
            .arg("nobody:nogroup")
            .arg(&mail)
            .status();
        let users: String = domains.iter().map(|d| format!("@{d} nobody\n")).collect();
        std::fs::write(root.join("vusers"), users).expect("vusers");
        let config = format!(
            "table vusers file:{root}/vusers\n\
             listen on 127.0.0.1 port {port}\n\
             action \"inbox\" mda \"/usr/libexec/opensmtpd/mail.maildir {root}/mail/inbox\" virtual <vusers>\n\
             match from any for domain {{ {domains} }} action \"inbox\"\n",
            root = root.display(),
            domains = domains
                .iter()
                .map(|d| format!("\"{d}\""))
                .collect::<Vec<_>>()
                .join(", "),
        );
        std::fs::write(root.join("smtpd.conf"), config).expect("smtpd.conf");
        OpenSmtpd {
            dir,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            child: None,
            _turn: turn,
        }
    }

    pub fn start(&mut self) {
        // What an earlier instance left queued is not this test's mail.
        let _ = std::fs::remove_dir_all("/var/spool/smtpd");
        let log = std::fs::File::create(self.dir.path().join("smtpd.log")).expect("log");
        let child = Command::new(PathBuf::from(OPENSMTPD_ROOT).join("usr/sbin/smtpd"))
            .arg("-d")
            .arg("-f")
            .arg(self.dir.path().join("smtpd.conf"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start smtpd");
        self.child = Some(child);
        crate::mta::wait_listening(self.addr, "opensmtpd", || self.log());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("smtpd.log")).unwrap_or_default()
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
            "opensmtpd",
            || self.log(),
        )
    }
}

impl Drop for OpenSmtpd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SIGTERM: the parent tells its privilege-separated children
            // to go, which a SIGKILL would leave holding the port.
            let _ = Command::new("kill").arg(c.id().to_string()).status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
