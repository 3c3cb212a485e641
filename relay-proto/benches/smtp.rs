//! Micro-benchmarks for the hot paths of the ingest: the command parser
//! and the DATA path (end-of-data scan, CRLF normalisation, dot-unstuffing),
//! plus the relay encoding. `cargo bench -p relay-proto`.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use relay_proto::smtp::command::parse;
use relay_proto::smtp::data::{encode_for_data, DataReceiver, Progress};
use relay_proto::smtp::{Action, RcptVerdict, Session, SessionConfig};

const LINES: &[&[u8]] = &[
    b"EHLO mail.remote.example",
    b"MAIL FROM:<alice.sender+tag@remote.example> SIZE=102400 BODY=8BITMIME",
    b"RCPT TO:<bob@example.test>",
    b"RCPT TO:<\"quoted local\"@example.test>",
    b"DATA",
    b"NOOP",
    b"QUIT",
];

/// A realistic 1 MiB message: 76-column lines, some starting with a dot.
fn message(size: usize) -> Vec<u8> {
    let mut m = Vec::with_capacity(size + 100);
    let mut i = 0;
    while m.len() < size {
        if i % 40 == 0 {
            m.extend_from_slice(b"..a line that starts with a dot after stuffing\r\n");
        } else {
            m.extend_from_slice(
                b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod te\r\n",
            );
        }
        i += 1;
    }
    m
}

fn commands(c: &mut Criterion) {
    let mut g = c.benchmark_group("command_parser");
    g.throughput(Throughput::Elements(LINES.len() as u64));
    g.bench_function("typical transaction lines", |b| {
        b.iter(|| {
            for line in LINES {
                let _ = black_box(parse(black_box(line)));
            }
        })
    });
    g.finish();
}

fn data_path(c: &mut Criterion) {
    let wire = {
        let mut w = message(1 << 20);
        w.extend_from_slice(b".\r\n");
        w
    };
    let mut g = c.benchmark_group("data_path");
    g.throughput(Throughput::Bytes(wire.len() as u64));
    g.bench_function("receiver 1 MiB in 32 KiB reads", |b| {
        b.iter(|| {
            let mut r = DataReceiver::new(64 << 20);
            for chunk in wire.chunks(32 * 1024) {
                if let Progress::Done(_) = r.feed(black_box(chunk)) {
                    break;
                }
            }
            black_box(r.into_body())
        })
    });
    let stored = message(1 << 20);
    g.bench_function("encode for relay 1 MiB", |b| {
        b.iter(|| black_box(encode_for_data(black_box(&stored))))
    });
    g.bench_function("session: whole transaction with 1 MiB DATA", |b| {
        let cfg = Arc::new(SessionConfig {
            hostname: "mx2.test".into(),
            max_message_size: 64 << 20,
            ..SessionConfig::default()
        });
        let now = UNIX_EPOCH + Duration::from_secs(1_795_842_826);
        b.iter(|| {
            let mut s = Session::new(cfg.clone(), "192.0.2.1".parse().unwrap(), 1);
            s.handle_input(
                b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<u@example.test>\r\nDATA\r\n",
                now,
            );
            while let Action::CheckRecipient { recipient, .. } = s.poll_action() {
                let domain = recipient.domain().cloned().unwrap();
                s.recipient_checked(
                    RcptVerdict::Accept {
                        domain,
                        max_message_size: None,
                    },
                    now,
                );
            }
            for chunk in wire.chunks(32 * 1024) {
                s.handle_input(chunk, now);
            }
            match s.poll_action() {
                Action::Store(m) => black_box(m.body.len()),
                other => panic!("{other:?}"),
            }
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = commands, data_path
}
criterion_main!(benches);
