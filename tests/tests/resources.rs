//! End-to-end: a full disk, file modes and descriptor limits, on the real
//! binary. The disk-full cases mount a small tmpfs as the data directory
//! (they need root, as CI has).

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use backupmx_tests::sink::Sink;
use backupmx_tests::*;

/// A tmpfs mounted for one test, lazily unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(path: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(path).expect("mount point");
        let status = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(path)
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "cannot mount a tmpfs at {} (the disk-full tests need root)",
            path.display()
        );
        Tmpfs(path.to_path_buf())
    }

    /// Writes a filler file until the filesystem has no space left.
    fn fill(&self) -> PathBuf {
        let path = self.0.join("filler");
        let mut f = std::fs::File::create(&path).expect("filler");
        for chunk in [1 << 20, 64 << 10, 4 << 10, 512] {
            let zeros = vec![0u8; chunk];
            while f.write_all(&zeros).is_ok() {}
        }
        let _ = f.sync_all();
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// As [`eventually`], and a failure shows the end of the server's log.
fn eventually_logged<T>(
    s: &Server,
    within: Duration,
    what: &str,
    mut f: impl FnMut() -> Option<T>,
) -> T {
    let deadline = std::time::Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if std::time::Instant::now() > deadline {
            let log = s.log();
            let tail: Vec<&str> = log
                .lines()
                .filter(|l| !l.contains("message_accepted") && !l.contains("queue_update_failed"))
                .rev()
                .take(80)
                .collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            let queue = s.cli(&["queue", "list", "--json"]);
            panic!(
                "timed out waiting for {what}; queue: {} {}; log ends:\n{}",
                String::from_utf8_lossy(&queue.stdout),
                String::from_utf8_lossy(&queue.stderr),
                tail.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn subject_counts(sink: &Sink) -> std::collections::BTreeMap<String, usize> {
    let mut counts = std::collections::BTreeMap::new();
    for m in sink.received() {
        let text = String::from_utf8_lossy(&m.data).to_string();
        let subject = text
            .lines()
            .find_map(|l| l.strip_prefix("Subject: "))
            .unwrap_or("")
            .to_string();
        *counts.entry(subject).or_insert(0) += 1;
    }
    counts
}

/// A server whose data directory is a fresh tmpfs, delivering example.test
/// to `primary_port` (nothing listens there yet), retrying every second.
fn server_on_tmpfs(reserve: u64, primary_port: u16) -> (Server, Tmpfs) {
    server_on_tmpfs_with(4 << 20, reserve, "24m", primary_port)
}

fn server_on_tmpfs_with(
    min_free: u64,
    reserve: u64,
    size: &str,
    primary_port: u16,
) -> (Server, Tmpfs) {
    let mut s = Server::prepare_run(
        "",
        "[delivery]\nretry_initial = \"1s\"\nretry_max = \"2s\"\nprobe_interval = \"1s\"\npoll_interval = \"200ms\"\n",
        &format!("[\"127.0.0.1:{primary_port}\"]"),
    );
    let text = std::fs::read_to_string(&s.config_path).expect("config");
    let text = text.replacen(
        "[storage]\n",
        &format!("[storage]\nmin_free_space = {min_free}\nreserve_space = {reserve}\n"),
        1,
    );
    std::fs::write(&s.config_path, text).expect("config");
    let fs = Tmpfs::mount(&s.data_dir(), size);
    s.spawn();
    (s, fs)
}

/// Bytes of everything in the server's data directory (database, WAL,
/// spool): the figure docs/BENCHMARKS.md reports, not asserted.
fn data_bytes(s: &Server) -> u64 {
    fn walk(dir: &std::path::Path) -> u64 {
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| match e.metadata() {
                Ok(m) if m.is_dir() => walk(&e.path()),
                Ok(m) => m.len(),
                Err(_) => 0,
            })
            .sum()
    }
    walk(&s.data_dir())
}

fn queue_messages(s: &Server, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let mut c = s.client();
            queue_id(&c.send_message(
                "a@remote.test",
                &["user@example.test"],
                &format!("Subject: m{i}\r\n\r\nbody {i}\r\n"),
            ))
        })
        .collect()
}

#[test]
fn on_a_full_disk_delivered_mail_is_never_sent_again() {
    let port = free_port();
    // No reserve: recording the outcomes fails, which is the case to prove.
    let (s, fs) = server_on_tmpfs(0, port);
    queue_messages(&s, 20);
    // The primary is found down (the rest waits for the probe).
    eventually(
        Duration::from_secs(20),
        "an attempt against the dead primary",
        || s.log().contains("delivery_attempt").then_some(()),
    );
    let filler = fs.fill();
    let sink = Sink::start(port);
    sink.wait_for(1, Duration::from_secs(30));
    // The outcomes cannot be written: delivery pauses instead of sending
    // the same messages again and again. (How many went out before the
    // pause depends on how the worker batched them: all 20 in one
    // connection usually, 19 and 1 once under the whole suite's load.)
    eventually(Duration::from_secs(30), "delivery paused", || {
        s.log().contains("delivery_paused").then_some(())
    });
    std::thread::sleep(Duration::from_secs(4));
    let counts = subject_counts(&sink);
    assert!(!counts.is_empty() && counts.len() <= 20, "{counts:?}");
    assert!(counts.values().all(|&n| n == 1), "sent twice: {counts:?}");
    std::fs::remove_file(filler).expect("free space");
    eventually_logged(&s, Duration::from_secs(40), "queue emptied", || {
        s.queue().is_empty().then_some(())
    });
    assert!(s.log().contains("delivery_resumed"), "{}", s.log());
    let counts = subject_counts(&sink);
    assert!(
        counts.len() == 20 && counts.values().all(|&n| n == 1),
        "{counts:?}"
    );
}

/// Issue 29 (1): mail fills the disk while the primary defers; once the
/// primary takes mail, delivery frees the disk. Before, every deferral's
/// outcome write failed on the full disk and paused delivery for good.
#[test]
fn mail_that_filled_the_disk_drains_when_the_primary_comes_back() {
    let port = free_port();
    let (s, _fs) = server_on_tmpfs_with(1 << 20, 1 << 20, "24m", port);
    let sink = Sink::start(port);
    sink.set(|b| b.tempfail_next = usize::MAX);
    let body = "x".repeat(76) + "\r\n";
    let body = body.repeat(400 * 1024 / 78);
    let mut accepted = Vec::new();
    for i in 0..200 {
        let mut c = s.client();
        c.expect("EHLO client.test", "250");
        if !c.cmd("MAIL FROM:<a@remote.test>").starts_with("250") {
            break;
        }
        if !c.cmd("RCPT TO:<user@example.test>").starts_with("250") {
            break;
        }
        c.expect("DATA", "354");
        c.send(format!("Subject: m{i}\r\n\r\n{body}"));
        c.send(".\r\n");
        let reply = c.read_reply();
        if !reply.starts_with("250") {
            break;
        }
        accepted.push(format!("m{i}"));
    }
    assert!(accepted.len() >= 10, "only {} accepted", accepted.len());
    // Let the deferrals' outcomes meet the full disk.
    std::thread::sleep(Duration::from_secs(4));
    let full = data_bytes(&s);
    let primary_back = std::time::Instant::now();
    sink.set(|b| b.tempfail_next = 0);
    eventually_logged(
        &s,
        Duration::from_secs(60),
        "every accepted message delivered",
        || {
            let counts = subject_counts(&sink);
            accepted
                .iter()
                .all(|m| counts.contains_key(m))
                .then_some(())
        },
    );
    let drained = primary_back.elapsed();
    eventually_logged(&s, Duration::from_secs(20), "queue emptied", || {
        s.queue().is_empty().then_some(())
    });
    eprintln!(
        "figures: {} messages of 400 KiB accepted onto a 24 MiB tmpfs; all delivered {:.1} s after the primary's 250; data dir {} KiB full, {} KiB after the drain",
        accepted.len(),
        drained.as_secs_f64(),
        full / 1024,
        data_bytes(&s) / 1024
    );
    let counts = subject_counts(&sink);
    assert!(counts.values().all(|&n| n == 1), "sent twice: {counts:?}");
}

/// Issue 29 (2): a backlog that filled the disk down to the floor is
/// delivered; its pages stay in the database file as free pages, which
/// new mail reuses, so they count as free space. Before, every new
/// message got `452 4.3.1` after the drain, until someone vacuumed.
#[test]
fn after_a_backlog_drains_new_mail_is_accepted_again() {
    let port = free_port();
    let (s, _fs) = server_on_tmpfs_with(16 << 20, 0, "48m", port);
    let body = ("y".repeat(76) + "\r\n").repeat((1 << 20) / 78);
    let send = |i: usize| -> bool {
        let mut c = s.client();
        c.expect("EHLO client.test", "250");
        if !c.cmd("MAIL FROM:<a@remote.test>").starts_with("250") {
            return false;
        }
        c.expect("RCPT TO:<user@example.test>", "250");
        c.expect("DATA", "354");
        c.send(format!("Subject: b{i}\r\n\r\n{body}"));
        c.send(".\r\n");
        c.read_reply().starts_with("250")
    };
    let mut accepted = 0;
    while accepted < 100 && send(accepted) {
        accepted += 1;
    }
    assert!(
        (10..100).contains(&accepted),
        "{accepted} accepted before the floor"
    );
    let full = data_bytes(&s);
    let primary_back = std::time::Instant::now();
    let sink = Sink::start(port);
    sink.wait_for(accepted, Duration::from_secs(60));
    eventually_logged(&s, Duration::from_secs(30), "queue emptied", || {
        s.queue().is_empty().then_some(())
    });
    let drained = primary_back.elapsed();
    let empty = data_bytes(&s);
    eventually_logged(&s, Duration::from_secs(60), "new mail accepted", || {
        send(1000).then_some(())
    });
    eprintln!(
        "figures: {accepted} messages of 1 MiB accepted before the floor on a 48 MiB tmpfs; drained in {:.1} s; data dir {} KiB full, {} KiB drained (free pages kept, counted as free), {} KiB after the next message; next message accepted {:.1} s after the primary came back",
        drained.as_secs_f64(),
        full / 1024,
        empty / 1024,
        data_bytes(&s) / 1024,
        primary_back.elapsed().as_secs_f64()
    );
}

#[test]
fn on_a_full_disk_a_deferring_primary_is_not_hammered_and_a_restart_serves() {
    let port = free_port();
    let (mut s, fs) = server_on_tmpfs(0, port);
    queue_messages(&s, 10);
    // The primary is found down (the rest waits for the probe).
    eventually(
        Duration::from_secs(20),
        "an attempt against the dead primary",
        || s.log().contains("delivery_attempt").then_some(()),
    );
    let filler = fs.fill();
    let sink = Sink::start(port);
    sink.set(|b| b.tempfail_next = usize::MAX);
    // Retries are due every 1–2 s: over 10 s a healthy worker makes a
    // connection or two per retry (the ten messages share them); one that cannot
    // record outcomes used to make hundreds. The schedules the full disk
    // refuses are kept in memory, and delivery is not paused for them.
    std::thread::sleep(Duration::from_secs(10));
    let connections = sink.connections.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        connections <= 20,
        "{connections} connections in 10 s on a full disk"
    );
    let log = s.log();
    assert!(log.contains("disk_full_outcome_deferred"), "{log}");
    assert!(!log.contains("delivery_paused"), "{log}");
    // A restart on the full disk, with a changed [[domain]] that cannot be
    // stored: logged, and the server serves (spawn waits for the greeting).
    let text = std::fs::read_to_string(&s.config_path).expect("config");
    std::fs::write(
        &s.config_path,
        text.replace(
            "name = \"example.test\"\n",
            "name = \"example.test\"\nmax_message_size = 1000000\n",
        ),
    )
    .expect("config");
    s.restart();
    assert!(s.log().contains("domain_upsert_failed"), "{}", s.log());
    std::fs::remove_file(filler).expect("free space");
    sink.set(|b| b.tempfail_next = 0);
    eventually(Duration::from_secs(40), "queue emptied", || {
        s.queue().is_empty().then_some(())
    });
    let counts = subject_counts(&sink);
    assert!(
        counts.len() == 10 && counts.values().all(|&n| n == 1),
        "{counts:?}"
    );
}

#[test]
fn a_full_disk_refuses_new_mail_but_deletes_restarts_and_recovers() {
    let port = free_port();
    let (mut s, fs) = server_on_tmpfs(4 << 20, port);
    assert!(
        s.data_dir().join("reserve.space").exists(),
        "reserve taken at start"
    );
    let ids = queue_messages(&s, 3);
    // A declared size that does not fit above the floor is refused at MAIL.
    let mut c = s.client();
    c.expect("EHLO client.test", "250");
    c.expect("MAIL FROM:<a@remote.test> SIZE=20000000", "452 4.3.1");
    c.expect("MAIL FROM:<a@remote.test> SIZE=1000", "250");
    c.expect("QUIT", "221");

    let filler = fs.fill();
    std::thread::sleep(Duration::from_millis(300));
    let mut c = s.client();
    c.expect("EHLO client.test", "250");
    c.expect("MAIL FROM:<a@remote.test>", "452 4.3.1");
    c.expect("QUIT", "221");

    // The operator frees queue space with our own tool, on the full disk.
    let out = s.cli(&["queue", "delete", &ids[0]]);
    assert!(
        out.status.success(),
        "queue delete on a full disk: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(s.queue().len(), 2);

    // A restart on the full disk serves (spawn waits for the greeting).
    s.restart();
    let mut c = s.client();
    c.expect("EHLO client.test", "250");
    c.expect("MAIL FROM:<a@remote.test>", "452 4.3.1");
    c.expect("QUIT", "221");

    std::fs::remove_file(filler).expect("free space");
    let reply = eventually(Duration::from_secs(5), "mail accepted again", || {
        let mut c = s.client();
        c.expect("EHLO client.test", "250");
        let r = c.cmd("MAIL FROM:<a@remote.test>");
        r.starts_with("250").then_some(r)
    });
    assert!(reply.starts_with("250 2.1.0"), "{reply}");
    // The reserve given up for the deletion is taken back.
    eventually(Duration::from_secs(20), "reserve taken back", || {
        queue_messages(&s, 1);
        s.data_dir().join("reserve.space").exists().then_some(())
    });
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).expect("stat").permissions().mode() & 0o777
}

#[test]
fn queued_mail_is_private_under_any_umask() {
    for umask in ["000", "022"] {
        let mut s = Server::prepare_run("", "", "");
        s.set_wrapper(&["sh", "-c", &format!("umask {umask}; exec \"$0\" \"$@\"")]);
        s.spawn();
        queue_messages(&s, 1);
        let data = s.data_dir();
        assert_eq!(mode(&data), 0o700, "umask {umask}: data directory");
        let mut seen = Vec::new();
        for entry in std::fs::read_dir(&data).expect("data dir") {
            let path = entry.expect("entry").path();
            let want = if path.is_dir() { 0o700 } else { 0o600 };
            assert_eq!(mode(&path), want, "umask {umask}: {}", path.display());
            seen.push(path.file_name().unwrap().to_string_lossy().to_string());
        }
        for f in [
            "backupmx.db",
            "backupmx.db-wal",
            "backupmx.db-shm",
            "incoming",
        ] {
            assert!(seen.iter().any(|s| s == f), "{f} missing: {seen:?}");
        }
    }
}

#[test]
fn wide_modes_found_at_start_are_narrowed_with_a_warning() {
    let mut s = Server::start_run("", "", "");
    queue_messages(&s, 1);
    s.kill9();
    let data = s.data_dir();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    let db = data.join("backupmx.db");
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).unwrap();
    s.spawn();
    assert_eq!(mode(&data), 0o700);
    assert_eq!(mode(&db), 0o600);
    assert!(s.log().contains("permissions_repaired"), "{}", s.log());
}

/// Opens `n` connections at once and reads the first reply of each.
fn greet_many(addr: std::net::SocketAddr, n: usize) -> (usize, usize, Vec<String>) {
    let mut streams = Vec::with_capacity(n);
    for _ in 0..n {
        let stream = std::net::TcpStream::connect(addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(15)))
            .expect("timeout");
        streams.push(stream);
    }
    let (mut greeted, mut refused, mut other) = (0, 0, Vec::new());
    for stream in &streams {
        let mut c = Client::from_stream(stream.try_clone().expect("clone"));
        let reply = c.read_reply();
        if reply.starts_with("220 ") {
            greeted += 1;
        } else if reply.starts_with("421 4.") {
            refused += 1;
        } else {
            other.push(reply);
        }
    }
    (greeted, refused, other)
}

#[test]
fn the_open_files_soft_limit_is_raised_to_the_hard_limit() {
    let mut s = Server::prepare_run("max_connections_per_ip = 5000", "", "");
    s.set_wrapper(&["prlimit", "--nofile=1024:4096", "--"]);
    s.spawn();
    let (greeted, refused, other) = greet_many(s.addr, 3000);
    assert_eq!(
        (greeted, refused, other.len()),
        (3000, 0, 0),
        "hanging or odd: {other:?}"
    );
    assert!(
        s.log().contains("soft_before=1024") && s.log().contains("soft=4096"),
        "{}",
        s.log()
    );
}

#[test]
fn with_few_descriptors_every_client_gets_a_reply() {
    let mut s = Server::prepare_run("max_connections_per_ip = 5000", "", "");
    s.set_wrapper(&["prlimit", "--nofile=1024:1024", "--"]);
    s.spawn();
    let (greeted, refused, other) = greet_many(s.addr, 3000);
    assert!(other.is_empty(), "no reply or odd reply: {other:?}");
    assert_eq!(greeted + refused, 3000);
    assert!(greeted > 500, "greeted {greeted}");
    assert!(s.log().contains("max_connections_lowered"), "{}", s.log());
}

#[test]
fn past_the_memory_budget_a_declared_size_gets_452_until_memory_is_free() {
    let s = Server::start_run(
        "max_message_size = 1048576\nmemory_budget = 1048576",
        "",
        "",
    );
    // One session holds half a megabyte of a message it is still sending.
    let mut a = s.client();
    a.expect("EHLO a.test", "250");
    a.expect("MAIL FROM:<a@remote.test>", "250");
    a.expect("RCPT TO:<user@example.test>", "250");
    a.expect("DATA", "354");
    let line = "x".repeat(998) + "\r\n";
    a.send(format!("Subject: held\r\n\r\n{}", line.repeat(500)));
    let mut b = s.client();
    b.expect("EHLO b.test", "250");
    let refused = eventually(Duration::from_secs(5), "the budget in use", || {
        let r = b.cmd("MAIL FROM:<b@remote.test> SIZE=800000");
        if r.starts_with("250") {
            b.expect("RSET", "250");
            None
        } else {
            Some(r)
        }
    });
    assert!(refused.starts_with("452 4.3.1"), "{refused}");
    a.send(".\r\n");
    assert!(a.read_reply().starts_with("250 "));
    let reply = eventually(Duration::from_secs(5), "the budget free again", || {
        let r = b.cmd("MAIL FROM:<b@remote.test> SIZE=800000");
        r.starts_with("250").then_some(r)
    });
    assert!(reply.starts_with("250 2.1.0"), "{reply}");
}
