//! The backscatter figure (docs/BENCHMARKS.md): how many DSNs a backup MX
//! sends for mail to users who do not exist, with and without callouts.
//!
//! `cargo run -p backupmx-tests --bin backscatter -- [MESSAGES] [INVALID_PERCENT]`
//!
//! A recording primary knows 200 users and refuses 60 others with
//! `550 5.1.1`. Each message has one recipient, drawn so that
//! INVALID_PERCENT of them are unknown users. A third is sent while the
//! primary is up, a third while it is down, a third after it is back; then
//! the queue drains. Run once with `recipient_verify = "off"` and once with
//! `"callout"`; printed per mode: messages refused at RCPT, accepted,
//! delivered, and DSNs queued for unknown users. Counts, not speed: the
//! debug build of the tests is fine.

use std::time::Duration;

use backupmx_tests::sink::Sink;
use backupmx_tests::*;

const VALID: usize = 200;
const INVALID: usize = 60;

/// A deterministic recipient sequence (xorshift), the same for both modes.
fn recipients(messages: usize, invalid_percent: u64) -> Vec<String> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    (0..messages)
        .map(|_| {
            if next() % 100 < invalid_percent {
                format!("nobody{}@example.test", next() as usize % INVALID)
            } else {
                format!("user{}@example.test", next() as usize % VALID)
            }
        })
        .collect()
}

struct Figures {
    refused_at_rcpt: usize,
    accepted: usize,
    delivered: usize,
    dsns: usize,
}

fn run(mode: &str, rcpts: &[String]) -> Figures {
    let sink = Sink::start(0);
    sink.set(|b| {
        for i in 0..INVALID {
            b.rcpt_replies.push((
                format!("nobody{i}@example.test"),
                format!(
                    "550 5.1.1 <nobody{i}@example.test>: Recipient address rejected: User unknown"
                ),
            ));
        }
    });
    let primary = TcpProxy::start(sink.addr);
    let s = Server::start_run(
        "",
        &format!(
            "recipient_verify = \"{mode}\"\n[delivery]\nretry_initial = \"1s\"\nretry_max = \"2s\"\nprobe_interval = \"1s\"\nprimary_up_fresh = \"5s\"\nbounce_storm_window = \"2s\"\n[recipient_verify]\ntimeout = \"3s\"\n"
        ),
        &format!("[\"{}\"]", primary.addr),
    );
    let third = rcpts.len() / 3;
    let mut figures = Figures {
        refused_at_rcpt: 0,
        accepted: 0,
        delivered: 0,
        dsns: 0,
    };
    for (i, rcpt) in rcpts.iter().enumerate() {
        if i == third {
            primary.set_down(true);
        } else if i == 2 * third {
            primary.set_down(false);
        }
        let mut c = s.client();
        c.expect("EHLO client.remote.test", "250");
        c.expect("MAIL FROM:<sender@remote.test>", "250");
        let reply = c.cmd(&format!("RCPT TO:<{rcpt}>"));
        if reply.starts_with("550") {
            figures.refused_at_rcpt += 1;
            c.cmd("QUIT");
            continue;
        }
        assert!(reply.starts_with("250"), "{rcpt}: {reply}");
        c.expect("DATA", "354");
        c.send("Subject: backscatter run\r\n\r\nhello\r\n.\r\n");
        let done = c.read_reply();
        assert!(done.starts_with("250"), "{done}");
        figures.accepted += 1;
        c.cmd("QUIT");
    }
    // Drained when only DSNs (null sender, undeliverable here: the sender's
    // domain has no MX) are left.
    eventually(Duration::from_secs(300), "the queue to drain", || {
        s.queue()
            .iter()
            .all(|e| e["sender"].as_str() == Some(""))
            .then_some(())
    });
    figures.delivered = sink.received().len();
    figures.dsns = s.queue().len();
    figures
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let messages: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(1000);
    let invalid_percent: u64 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(30);
    let rcpts = recipients(messages, invalid_percent);
    let unknown = rcpts.iter().filter(|r| r.starts_with("nobody")).count();
    println!(
        "{messages} messages, {unknown} to unknown users; a third each with the primary up, down, up again"
    );
    println!(
        "| recipient_verify | refused at RCPT | accepted | delivered | DSNs for unknown users |"
    );
    println!("|---|---:|---:|---:|---:|");
    for mode in ["off", "callout"] {
        let f = run(mode, &rcpts);
        println!(
            "| {mode} | {} | {} | {} | {} |",
            f.refused_at_rcpt, f.accepted, f.delivered, f.dsns
        );
    }
}
