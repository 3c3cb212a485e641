//! What the real-MTA harnesses ([`crate::postfix`], [`crate::exim`],
//! [`crate::opensmtpd`]) share: their maildirs, the byte-exact comparison
//! with what backupmx stored, and the interop summary lines.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Waits (at most 20 s) until something accepts connections on `addr`; on
/// time-out the panic shows the MTA's log.
pub fn wait_listening(addr: std::net::SocketAddr, mta: &str, log: impl Fn() -> String) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "{mta} did not listen: {}", log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Every message in the maildir `dir` (its `new/`), oldest name first, as
/// stored (LF line ends).
pub fn read_maildir(dir: &Path) -> Vec<Vec<u8>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir.join("new"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    files.sort();
    files.iter().filter_map(|p| std::fs::read(p).ok()).collect()
}

/// Waits until the maildir holds at least `n` messages; on time-out the
/// panic shows the MTA's log.
pub fn wait_for_maildir(
    dir: &Path,
    n: usize,
    within: Duration,
    mta: &str,
    log: impl Fn() -> String,
) -> Vec<Vec<u8>> {
    let deadline = Instant::now() + within;
    loop {
        let got = read_maildir(dir);
        if got.len() >= n {
            return got;
        }
        assert!(
            Instant::now() < deadline,
            "{mta} maildir has {} of {n} messages\n{}",
            got.len(),
            log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Where the message `stored` (as backupmx stores it: CRLF, starting with
/// our Received header) is in `delivered` (a maildir file, LF line ends,
/// the primary's own trace headers first): the rest must match exactly.
pub fn delivered_matches(delivered: &[u8], stored: &[u8]) -> bool {
    let stored_lf: Vec<u8> = String::from_utf8_lossy(stored)
        .replace("\r\n", "\n")
        .into_bytes();
    let first_line = stored_lf.split(|&b| b == b'\n').next().unwrap_or_default();
    delivered
        .windows(first_line.len().max(1))
        .position(|w| w == first_line)
        .is_some_and(|at| delivered[at..] == stored_lf[..])
}

/// One line per MTA pair, appended to `target/interop-summary.txt`, which
/// scripts/test prints after the run (test output itself is captured).
pub fn report(line: &str) {
    use std::io::Write;
    let exe = std::env::current_exe().expect("test executable");
    let target = exe
        .ancestors()
        .find(|p| p.file_name().is_some_and(|n| n == "target"))
        .map(Path::to_path_buf)
        .unwrap_or_else(std::env::temp_dir);
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(target.join("interop-summary.txt"))
    {
        let _ = writeln!(f, "{line}");
    }
}
