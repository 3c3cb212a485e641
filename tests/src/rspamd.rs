//! A real rspamd (Debian's package, which scripts/install-test-deps
//! installs) for the content-filter tests: one per test binary, with a
//! configuration, database and log directory of its own and its normal
//! worker on a free loopback port. No Redis (scanning does not need it),
//! no network: its DNS goes to a closed loopback port, fuzzy checks are
//! off and Hyperscan too (it compiles for minutes on a cold cache).
//!
//! rspamd takes 15–40 s to load its rules on these machines, so it is
//! started once, by the first test that asks, and stopped by a watchdog
//! shell when the test process exits.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub struct Rspamd {
    pub url: String,
    /// The watchdog shell (it outlives nothing: it ends with this process).
    _watchdog: std::process::Child,
    /// Keeps the directories for as long as the test process runs.
    _dir: tempfile::TempDir,
}

/// The binary's rspamd; `None` (and one line on stderr) when rspamd is not
/// installed, so that a `cargo test` without the Debian package skips the
/// filter tests instead of failing. The test command installs it, and
/// `REQUIRE_RSPAMD=1` turns the skip into a failure.
pub fn shared() -> Option<&'static Rspamd> {
    static RSPAMD: OnceLock<Option<Rspamd>> = OnceLock::new();
    RSPAMD
        .get_or_init(|| {
            if !Path::new("/usr/bin/rspamd").exists() {
                assert!(
                    std::env::var_os("REQUIRE_RSPAMD").is_none(),
                    "REQUIRE_RSPAMD is set but rspamd is not installed (scripts/install-test-deps installs it)"
                );
                eprintln!("skipped: rspamd is not installed (scripts/install-test-deps installs it)");
                return None;
            }
            Some(Rspamd::start())
        })
        .as_ref()
}

impl Rspamd {
    fn start() -> Rspamd {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        for d in ["run", "db", "log", "local.d"] {
            std::fs::create_dir_all(root.join(d)).expect("mkdir");
        }
        let port = crate::free_port();
        std::fs::write(
            root.join("rspamd.conf"),
            format!(
                r#".include "$CONFDIR/common.conf"
options {{
    pidfile = "$RUNDIR/rspamd.pid";
    .include "$CONFDIR/options.inc"
    .include(try=true; priority=1,duplicate=merge) "$LOCAL_CONFDIR/local.d/options.inc"
}}
logging {{
    type = "file";
    filename = "$LOGDIR/rspamd.log";
    level = "warning";
}}
worker "normal" {{
    bind_socket = "127.0.0.1:{port}";
    .include "$CONFDIR/worker-normal.inc"
    count = 1;
}}
"#
            ),
        )
        .expect("rspamd.conf");
        std::fs::write(
            root.join("local.d/options.inc"),
            "dns {\n  nameserver = [\"127.0.0.1:9\"];\n  timeout = 0.3s;\n  retransmits = 1;\n}\ndisable_hyperscan = true;\n",
        )
        .expect("options.inc");
        std::fs::write(root.join("local.d/fuzzy_check.conf"), "enabled = false;\n")
            .expect("fuzzy_check.conf");
        // The headers an operator usually turns on, for every client (the
        // tests' clients are local, which rspamd skips by default).
        std::fs::write(
            root.join("local.d/milter_headers.conf"),
            "extended_spam_headers = true;\nskip_local = false;\nskip_authenticated = false;\n",
        )
        .expect("milter_headers.conf");
        let var = |k: &str, v: &Path| format!("{k}={}", v.display());
        let rspamd = [
            "/usr/bin/rspamd".to_string(),
            "-f".into(),
            "-u".into(),
            "root".into(),
            "-g".into(),
            "root".into(),
            "-i".into(),
            "-c".into(),
            root.join("rspamd.conf").display().to_string(),
            "--var".into(),
            "CONFDIR=/etc/rspamd".into(),
            "--var".into(),
            var("LOCAL_CONFDIR", root),
            "--var".into(),
            var("RUNDIR", &root.join("run")),
            "--var".into(),
            var("DBDIR", &root.join("db")),
            "--var".into(),
            var("LOGDIR", &root.join("log")),
        ];
        // The watchdog: rspamd lives as long as this test process.
        let script = format!(
            "{} >\"$1/out.log\" 2>&1 & r=$!; while kill -0 {} 2>/dev/null && kill -0 $r 2>/dev/null; do sleep 1; done; kill $r 2>/dev/null; sleep 2; kill -9 $r 2>/dev/null",
            rspamd.join(" "),
            std::process::id()
        );
        let watchdog = Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg("sh")
            .arg(root)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start rspamd");
        let url = format!("http://127.0.0.1:{port}");
        let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            // The port is bound when the worker is ready.
            if std::net::TcpStream::connect(addr).is_ok() {
                let r = crate::http::request(addr, "GET", "/ping", &[], b"");
                if r.status == 200 && r.text().contains("pong") {
                    break;
                }
            }
            assert!(
                Instant::now() < deadline,
                "rspamd did not answer /ping within 180 s; its log:\n{}\n{}",
                std::fs::read_to_string(root.join("out.log")).unwrap_or_default(),
                std::fs::read_to_string(root.join("log/rspamd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        Rspamd {
            url,
            _watchdog: watchdog,
            _dir: dir,
        }
    }
}
