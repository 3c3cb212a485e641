//! The soak run: many concurrent sessions of mixed valid and hostile
//! traffic against `backupmx run` delivering to a recording primary, with
//! RSS and open descriptors sampled after warm-up and at the end, and every
//! accepted message accounted for (delivered, or still queued).

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::sink::Sink;
use crate::{queue_id, Client, Server};

#[derive(Debug, Clone)]
pub struct SoakReport {
    pub sessions: usize,
    pub seconds: u64,
    pub accepted: usize,
    pub rejected_or_aborted: usize,
    pub delivered: usize,
    pub still_queued: usize,
    pub lost: Vec<String>,
    pub rss_warm_kib: u64,
    pub rss_end_kib: u64,
    pub fds_warm: usize,
    pub fds_end: usize,
}

impl SoakReport {
    /// Flat memory after warm-up (some slack for allocator noise), no
    /// descriptor leak, nothing lost.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if !self.lost.is_empty() {
            p.push(format!(
                "{} accepted messages neither delivered nor queued: {:?}",
                self.lost.len(),
                self.lost
            ));
        }
        if self.rss_end_kib > self.rss_warm_kib + self.rss_warm_kib / 2 + 20 * 1024 {
            p.push(format!(
                "RSS grew from {} KiB to {} KiB",
                self.rss_warm_kib, self.rss_end_kib
            ));
        }
        if self.fds_end > self.fds_warm + 16 {
            p.push(format!(
                "open descriptors grew from {} to {}",
                self.fds_warm, self.fds_end
            ));
        }
        if self.accepted == 0 {
            p.push("no message was accepted".into());
        }
        p
    }
}

fn proc_status(pid: i32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

fn open_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// One client's mixed traffic until `until`.
fn client_loop(
    server: std::net::SocketAddr,
    n: usize,
    until: Instant,
    accepted: &Mutex<Vec<String>>,
    other: &Mutex<usize>,
) {
    let source: std::net::IpAddr = format!("127.0.{}.{}", 1 + n / 250, 1 + n % 250)
        .parse()
        .expect("ip");
    let mut round = n;
    while Instant::now() < until {
        round += 1;
        let Ok(mut c) = std::panic::catch_unwind(|| Client::connect_from(source, server)) else {
            *other.lock().expect("lock") += 1;
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        match round % 5 {
            // Valid mail, sometimes two messages on one connection.
            0 | 1 => {
                let r = c.send_message(
                    "soak@remote.test",
                    &["user@example.test"],
                    &format!("Subject: soak {n} {round}\r\n\r\nline\r\n..dot\r\n"),
                );
                if r.starts_with("250 ") {
                    accepted.lock().expect("lock").push(queue_id(&r));
                } else {
                    *other.lock().expect("lock") += 1;
                }
            }
            // Relay attempts and bad syntax.
            2 => {
                c.cmd("EHLO soak.test");
                c.cmd("MAIL FROM:<x@remote.test>");
                c.cmd("RCPT TO:<victim@elsewhere.test>");
                c.cmd("RCPT TO:<bad address>");
                c.cmd("DATA");
                *other.lock().expect("lock") += 1;
            }
            // Hang up in the middle of DATA.
            3 => {
                c.cmd("EHLO soak.test");
                c.cmd("MAIL FROM:<x@remote.test>");
                c.cmd("RCPT TO:<user@example.test>");
                c.cmd("DATA");
                c.send("Subject: cut\r\n\r\nhalf");
                *other.lock().expect("lock") += 1;
                continue;
            }
            // Garbage and smuggling attempts, pipelined.
            _ => {
                c.send("EHLO x\r\n\x00\x01\x02garbage\r\nMAIL FROM:<a@b>\r\nRCPT TO:<u@example.test>\r\nDATA\r\nx\n.\nMAIL FROM:<y@z>\r\n.\r\nQUIT\r\n");
                for _ in 0..7 {
                    let r = c.read_reply();
                    if let Some(id) = r.strip_prefix("250 2.0.0 Ok: queued as ") {
                        accepted.lock().expect("lock").push(id.trim().to_string());
                    }
                    if r.is_empty() || r.starts_with("221") {
                        break;
                    }
                }
                continue;
            }
        }
        c.cmd("QUIT");
    }
}

/// Runs the soak; the caller decides what to do with the report.
pub fn soak(sessions: usize, duration: Duration) -> SoakReport {
    let sink = Sink::start(0);
    let server = Server::start_run(
        &format!(
            "max_connections_per_ip = 50\nmax_connections = {}",
            sessions * 2 + 100
        ),
        "[delivery]\nretry_initial = \"1s\"\n",
        &format!("[\"{}\"]", sink.addr),
    );
    let pid = server.pid();
    let accepted = Arc::new(Mutex::new(Vec::new()));
    let other = Arc::new(Mutex::new(0usize));
    let start = Instant::now();
    let until = start + duration;
    let threads: Vec<_> = (0..sessions)
        .map(|n| {
            let (accepted, other) = (accepted.clone(), other.clone());
            let addr = server.addr;
            std::thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(move || client_loop(addr, n, until, &accepted, &other))
                .expect("spawn client")
        })
        .collect();
    // Warm-up is the first third of the run.
    std::thread::sleep(duration / 3);
    let rss_warm_kib = proc_status(pid, "VmRSS:");
    let fds_warm = open_fds(pid);
    for t in threads {
        let _ = t.join();
    }
    // Let the worker drain what was accepted.
    let accepted: Vec<String> = accepted.lock().expect("lock").clone();
    let deadline = Instant::now() + Duration::from_secs(15);
    let delivered_ids = |sink: &Sink| -> BTreeSet<String> {
        sink.received()
            .iter()
            .filter_map(|m| {
                let text = String::from_utf8_lossy(&m.data).to_string();
                let at = text.find(" id ")?;
                Some(
                    text[at + 4..]
                        .split(|c: char| c.is_whitespace() || c == ';')
                        .next()?
                        .to_string(),
                )
            })
            .collect()
    };
    while Instant::now() < deadline && delivered_ids(&sink).len() < accepted.len() {
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(1));
    let rss_end_kib = proc_status(pid, "VmRSS:");
    let fds_end = open_fds(pid);
    // Queue first: an entry leaves the queue only after the primary's 250,
    // so whatever is missing from this listing is in the sink afterwards.
    let queued: BTreeSet<String> = server
        .queue()
        .iter()
        .filter_map(|e| e["id"].as_str().map(String::from))
        .collect();
    let delivered = delivered_ids(&sink);
    let lost = accepted
        .iter()
        .filter(|id| !delivered.contains(*id) && !queued.contains(*id))
        .cloned()
        .collect();
    let rejected_or_aborted = *other.lock().expect("lock");
    SoakReport {
        sessions,
        seconds: duration.as_secs(),
        accepted: accepted.len(),
        rejected_or_aborted,
        delivered: delivered.len(),
        still_queued: queued.len(),
        lost,
        rss_warm_kib,
        rss_end_kib,
        fds_warm,
        fds_end,
    }
}
