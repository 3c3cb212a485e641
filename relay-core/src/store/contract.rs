//! Contract tests every backend must pass. The AWS backend runs the same
//! functions against the emulator.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;

use super::local::LocalStore;
use super::*;
use crate::queue::{AcceptedRecipient, RecipientStatus};

pub(crate) fn message(rcpts: &[&str]) -> AcceptedMessage {
    AcceptedMessage {
        dsn: Default::default(),
        id: crate::queue::new_id(SystemTime::now()),
        sender: "sender@remote.test".into(),
        recipients: rcpts
            .iter()
            .map(|a| AcceptedRecipient {
                dsn: Default::default(),
                address: (*a).to_string(),
                domain: DomainName::parse(a.split('@').nth(1).unwrap()).unwrap(),
            })
            .collect(),
        client_ip: "192.0.2.1".parse().unwrap(),
        helo: "client.test".into(),
        received_at: SystemTime::now(),
        smtputf8: false,
        eight_bit: false,
        body: b"Received: x\r\nSubject: s\r\n\r\nbody\x00\xff\r\n".to_vec(),
        deferred: Vec::new(),
        spooled: None,
        tls_request: None,
    }
}

pub(crate) async fn domains_contract(reg: &dyn DomainRegistry) {
    let name = DomainName::parse("example.test").unwrap();
    assert_eq!(reg.get(&name).await.unwrap(), None);
    let mut d = Domain::from_parts(
        "example.test",
        &["127.0.0.1:2626".into()],
        Some(&["u@example.test".into()]),
    )
    .unwrap();
    reg.put(&d).await.unwrap();
    assert_eq!(reg.get(&name).await.unwrap(), Some(d.clone()));
    d.greylist = false;
    d.recipient_verify = crate::domain::RecipientVerify::Callout;
    d.defer_while_primary_up = true;
    d.hold = Some(crate::domain::Hold {
        reason: crate::domain::HoldReason::BounceStorm,
        since: 1_800_000_000,
    });
    d.queue_lifetime = Some(30 * 86_400);
    d.tls = crate::domain::TlsPolicy::Verified;
    d.filter = false;
    d.bounce_storm_guard = false;
    d.auth = crate::domain::AuthPolicy::Enforce;
    reg.put(&d).await.unwrap();
    assert_eq!(reg.get(&name).await.unwrap(), Some(d.clone()));
    d.hold = None;
    reg.put(&d).await.unwrap();
    assert_eq!(reg.list().await.unwrap(), vec![d]);
    assert!(reg.remove(&name).await.unwrap());
    assert!(!reg.remove(&name).await.unwrap());
    assert!(reg.list().await.unwrap().is_empty());
}

pub(crate) async fn spool_contract(
    spool: &dyn Spool,
    messages: &dyn MessageStore,
    queue: &dyn DeliveryQueue,
) {
    let mut m = message(&["a@one.test", "b@two.test", "c@one.test"]);
    // What the sender asked of notifications (RFC 3461) is kept.
    m.dsn.ret = Some(crate::dsn_params::Ret::Hdrs);
    m.dsn.envid = Some("QQ+2B1".into());
    m.recipients[2].dsn.notify = crate::dsn_params::Notify::parse("NEVER");
    m.recipients[2].dsn.orcpt = Some("rfc822;c+40one.test".into());
    // And what it asked of TLS (RFC 8689).
    m.tls_request = Some(crate::queue::TlsRequest::Requiretls);
    let body = m.body.clone();
    let ids = spool.accept(m.clone()).await.unwrap();
    assert_eq!(ids, vec![m.id.clone(), m.id.with_suffix(2)]);
    for id in &ids {
        assert_eq!(
            messages.get(id).await.unwrap().as_deref(),
            Some(&body[..]),
            "body byte-exact"
        );
    }
    let entry = queue.get(&ids[0]).await.unwrap().unwrap();
    assert_eq!(entry.domain.as_str(), "one.test");
    assert_eq!(entry.recipients.len(), 2);
    assert_eq!(entry.dsn, m.dsn);
    assert_eq!(entry.tls_request, m.tls_request);
    assert_eq!(entry.recipients[1].dsn, m.recipients[2].dsn);
    assert!(entry.recipients[0].dsn.is_empty());
    assert!(entry
        .recipients
        .iter()
        .all(|r| r.status == RecipientStatus::Pending));
    assert_eq!(queue.depth().await.unwrap(), 2);
    let two = DomainName::parse("two.test").unwrap();
    let listed = queue.list(Some(&two)).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, ids[1]);
    assert_eq!(queue.list(None).await.unwrap().len(), 2);
    // A scan visits what a listing lists, each once.
    let mut seen = Vec::new();
    queue.scan(None, &mut |e| seen.push(e.id)).await.unwrap();
    seen.sort();
    let mut listed: Vec<QueueId> = queue
        .list(None)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();
    listed.sort();
    assert_eq!(seen, listed);
    let mut seen = Vec::new();
    queue
        .scan(Some(&two), &mut |e| seen.push(e.id))
        .await
        .unwrap();
    assert_eq!(seen, [ids[1].clone()]);
    assert!(queue.remove(&ids[0]).await.unwrap());
    assert!(!queue.remove(&ids[0]).await.unwrap());
    assert_eq!(queue.get(&ids[0]).await.unwrap(), None);
    assert_eq!(queue.depth().await.unwrap(), 1);
}

pub(crate) async fn schedule_contract(queue: &dyn ScheduledQueue, spool: &dyn Spool) {
    let first = message(&["a@one.test"]);
    let second = message(&["b@two.test"]);
    let third = message(&["c@one.test"]);
    for m in [&first, &second, &third] {
        spool.accept(m.clone()).await.unwrap();
    }
    let now = crate::time::unix_seconds(SystemTime::now());
    let due = queue.due(now, 10).await.unwrap();
    let mut due_ids: Vec<QueueId> = due.iter().map(|e| e.id.clone()).collect();
    due_ids.sort();
    let mut all = vec![first.id.clone(), second.id.clone(), third.id.clone()];
    all.sort();
    assert_eq!(due_ids, all);
    assert_eq!(queue.due(now, 1).await.unwrap().len(), 1);

    // An attempt that delivered one recipient and scheduled a retry.
    let mut e = due.iter().find(|d| d.id == first.id).unwrap().clone();
    e.attempts = 1;
    e.next_attempt = now + 600;
    e.last_error = Some("451 4.3.0 later".into());
    e.recipients[0].status = RecipientStatus::Pending;
    assert!(queue.update(&e).await.unwrap());
    assert_eq!(queue.get(&e.id).await.unwrap().unwrap(), e);
    assert_eq!(queue.due(now, 10).await.unwrap().len(), 2);

    // The destination is down: the rest of its domain waits too.
    let one = DomainName::parse("one.test").unwrap();
    assert_eq!(queue.defer_domain(&one, now + 300).await.unwrap(), 1);
    assert_eq!(
        queue.get(&e.id).await.unwrap().unwrap().next_attempt,
        now + 600,
        "later entries keep their time"
    );
    assert_eq!(
        queue.get(&third.id).await.unwrap().unwrap().next_attempt,
        now + 300
    );
    assert_eq!(queue.due(now, 10).await.unwrap().len(), 1);

    // ETRN / flush / probe: everything for the domain is due now.
    assert_eq!(queue.release(Some(&one), now).await.unwrap(), 2);
    let due = queue.due(now, 10).await.unwrap();
    assert_eq!(due.len(), 3);
    assert!(due.iter().all(|d| d.next_attempt <= now));
    assert_eq!(queue.release(None, now).await.unwrap(), 3);
    // A running worker learns about releases, including other processes'.
    let mut released = queue.take_releases().await.unwrap();
    released.sort();
    assert_eq!(released, vec![None, Some(one.clone())]);
    assert!(queue.take_releases().await.unwrap().is_empty());

    // An update never resurrects a deleted entry.
    assert!(queue.remove(&e.id).await.unwrap());
    assert!(!queue.update(&e).await.unwrap());
    assert_eq!(queue.get(&e.id).await.unwrap(), None);
}

/// Big bodies: in from a spool file, out in pieces, byte-exact.
pub(crate) async fn body_pieces_contract(
    spool: &dyn Spool,
    messages: &dyn MessageStore,
    queue: &dyn DeliveryQueue,
) {
    let dir = tempfile::tempdir().unwrap();
    let content: Vec<u8> = (0..(BODY_CHUNK * 2 + 12_345))
        .map(|i| (i * 7 % 251) as u8)
        .collect();
    let path = dir.path().join("big.part");
    std::fs::write(&path, &content).unwrap();
    let file = SpooledBody {
        path: path.clone(),
        len: content.len() as u64,
    };
    let mut m = message(&["a@one.test", "b@two.test"]);
    m.body = Vec::new();
    m.spooled = Some(file.clone());
    let ids = spool.accept(m).await.unwrap();
    assert_eq!(ids.len(), 2);
    for id in &ids {
        let mut read = Vec::new();
        loop {
            let piece = messages
                .read_chunk(id, read.len() as u64, BODY_CHUNK)
                .await
                .unwrap()
                .expect("stored");
            assert!(piece.len() <= BODY_CHUNK);
            if piece.is_empty() {
                break;
            }
            read.extend_from_slice(&piece);
        }
        assert!(read == content, "body byte-exact through pieces");
        assert_eq!(
            messages.read_chunk(id, 10, 5).await.unwrap().unwrap(),
            content[10..15]
        );
        let past = content.len() as u64 + 100;
        assert_eq!(
            messages.read_chunk(id, past, 5).await.unwrap(),
            Some(Vec::new())
        );
    }
    let other = crate::queue::new_id(SystemTime::now());
    assert_eq!(messages.read_chunk(&other, 0, 5).await.unwrap(), None);
    messages.put_file(&other, &file).await.unwrap();
    assert!(messages.get(&other).await.unwrap().unwrap() == content);
    let entry = queue.get(&ids[0]).await.unwrap().unwrap();
    assert_eq!(entry.size, content.len() as u64);
}

fn local() -> (tempfile::TempDir, Arc<LocalStore>) {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(LocalStore::open(dir.path()).unwrap());
    (dir, store)
}

#[tokio::test]
async fn local_domains_contract() {
    let (_dir, store) = local();
    domains_contract(store.as_ref()).await;
}

/// Outage history: one open outage at a time, tallies land only in the
/// outage their mail belongs to, a drain is marked once, mail stored
/// while an outage is open is counted by the spool, samples come back.
pub(crate) async fn history_contract(
    store: &dyn HistoryStore,
    spool: &dyn Spool,
    queue: &dyn DeliveryQueue,
) {
    use crate::history::{Counter, DepthSample, OutageCounts};
    let d = DomainName::parse("example.test").unwrap();
    let now = crate::time::unix_seconds(SystemTime::now());
    let t0 = now - 10_000;
    assert_eq!(store.latest_outage(&d).await.unwrap(), None);
    assert_eq!(
        store.end_outage(&d, t0).await.unwrap(),
        None,
        "nothing to end"
    );
    let queued = OutageCounts::of(Counter::AcceptedMessages, 2);
    let first = store.open_outage(&d, t0, &queued).await.unwrap().unwrap();
    assert_eq!((first.number, first.start, first.end), (1, t0, None));
    assert_eq!(first.counts.get(Counter::AcceptedMessages), 2);
    assert_eq!(
        store.open_outage(&d, t0 + 5, &queued).await.unwrap(),
        None,
        "one open at a time"
    );
    // Refused while open; nothing for mail from before it began.
    let refused = OutageCounts::of(Counter::RefusedGreylist, 1);
    let o = store.tally(&d, &refused, t0 + 10).await.unwrap().unwrap();
    assert_eq!(o.counts.get(Counter::RefusedGreylist), 1);
    assert_eq!(store.tally(&d, &refused, t0 - 1).await.unwrap(), None);
    // Stored while open: counted by the spool.
    let m = message(&["a@example.test", "b@example.test"]);
    spool.accept(m).await.unwrap();
    let o = store.latest_outage(&d).await.unwrap().unwrap();
    assert_eq!(o.counts.get(Counter::AcceptedMessages), 3);
    assert_eq!(o.counts.get(Counter::AcceptedRecipients), 2);
    let ended = store.end_outage(&d, t0 + 100).await.unwrap().unwrap();
    assert_eq!(ended.end, Some(t0 + 100));
    assert_eq!(
        store.end_outage(&d, t0 + 200).await.unwrap(),
        None,
        "ended once"
    );
    // After the end: mail that arrived later is not its; its own is.
    assert_eq!(store.tally(&d, &refused, t0 + 101).await.unwrap(), None);
    let mut done = OutageCounts::default();
    done.add(Counter::DeliveredMessages, 3)
        .add(Counter::DeliveredRecipients, 4)
        .add(Counter::FinishedMessages, 3);
    let o = store.tally(&d, &done, t0 + 50).await.unwrap().unwrap();
    assert!(o.drain_complete());
    assert!(store.mark_drained(&d, 1, t0 + 160).await.unwrap());
    assert!(
        !store.mark_drained(&d, 1, t0 + 170).await.unwrap(),
        "marked once"
    );
    assert_eq!(
        store.tally(&d, &done, t0 + 50).await.unwrap(),
        None,
        "drained"
    );
    let second = store
        .open_outage(&d, t0 + 1000, &OutageCounts::default())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(second.number, 2);
    let all = store.outages(&d, 0).await.unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!(all[0].drained, Some(t0 + 160));
    assert_eq!(all[0].counts.get(Counter::DeliveredRecipients), 4);
    assert_eq!(all[1].end, None);
    let recent = store.outages(&d, t0 + 500).await.unwrap();
    assert_eq!(recent.iter().map(|o| o.number).collect::<Vec<_>>(), vec![2]);
    // Another domain's history is its own.
    let other = DomainName::parse("other.test").unwrap();
    assert!(store.outages(&other, 0).await.unwrap().is_empty());
    // Queue depth from the queue itself.
    let depths = store
        .queue_depths(&[d.clone(), other.clone()])
        .await
        .unwrap();
    let mine = depths.iter().find(|(n, _)| *n == d).unwrap().1;
    assert_eq!(mine.count, queue.list(Some(&d)).await.unwrap().len() as u64);
    assert!(mine.oldest_received.is_some());
    // Samples and hourly peaks.
    let minute = now - now % 60;
    let samples = vec![
        (
            d.clone(),
            DepthSample {
                minute: minute - 120,
                count: 3,
                oldest_age: Some(30),
            },
        ),
        (
            other.clone(),
            DepthSample {
                minute: minute - 120,
                count: 1,
                oldest_age: None,
            },
        ),
    ];
    store.put_samples(&samples).await.unwrap();
    store
        .put_samples(&[(
            d.clone(),
            DepthSample {
                minute: minute - 60,
                count: 7,
                oldest_age: Some(90),
            },
        )])
        .await
        .unwrap();
    let got = store.samples(&d, minute - 3600).await.unwrap();
    assert_eq!(got.len(), 2);
    assert_eq!((got[0].count, got[0].oldest_age), (3, Some(30)));
    assert_eq!(got[1].count, 7);
    assert!(store.samples(&d, minute).await.unwrap().is_empty());
    let peaks = store
        .hourly_peaks(&[d.clone(), other.clone()], minute - 7200)
        .await
        .unwrap();
    let peak_of = |name: &DomainName| -> u64 {
        peaks
            .iter()
            .find(|(n, _)| n == name)
            .unwrap()
            .1
            .iter()
            .map(|(_, p)| *p)
            .max()
            .unwrap()
    };
    assert_eq!(peak_of(&d), 7);
    assert_eq!(peak_of(&other), 1);
    // Pruning takes ended, drained outages only.
    store.prune(t0 + 500, 0).await.unwrap();
    let left = store.outages(&d, 0).await.unwrap();
    assert_eq!(left.iter().map(|o| o.number).collect::<Vec<_>>(), vec![2]);
}

#[tokio::test]
async fn local_history_contract() {
    let (_dir, store) = local();
    history_contract(store.as_ref(), store.as_ref(), store.as_ref()).await;
}

/// TLS report counters: sessions add up per day, domain and outcome;
/// other days are apart; a report is claimed once.
pub(crate) async fn tls_reports_contract(store: &dyn TlsReportStore) {
    use crate::tlsrpt::{FailureType, PolicyType, SessionOutcome};
    let a = DomainName::parse("a.test").unwrap();
    let b = DomainName::parse("b.test").unwrap();
    let ok = SessionOutcome {
        policy: PolicyType::Sts,
        mx_host: "mx1.a.test".into(),
        receiving_ip: "192.0.2.1".into(),
        failure: None,
    };
    let expired = SessionOutcome {
        failure: Some(FailureType::CertificateExpired),
        ..ok.clone()
    };
    for _ in 0..3 {
        store.count_session(20_000, &a, &ok).await.unwrap();
    }
    store.count_session(20_000, &a, &expired).await.unwrap();
    store.count_session(20_000, &b, &ok).await.unwrap();
    store.count_session(20_001, &a, &ok).await.unwrap();
    let mut day = store.sessions_of_day(20_000).await.unwrap();
    day.sort();
    assert_eq!(
        day,
        vec![
            (a.clone(), ok.clone(), 3),
            (a.clone(), expired, 1),
            (b.clone(), ok.clone(), 1)
        ]
    );
    assert_eq!(
        store.sessions_of_day(20_001).await.unwrap(),
        vec![(a.clone(), ok, 1)]
    );
    assert!(store.sessions_of_day(19_999).await.unwrap().is_empty());
    assert!(store.claim_report(20_000, &a).await.unwrap());
    assert!(!store.claim_report(20_000, &a).await.unwrap());
    assert!(store.claim_report(20_000, &b).await.unwrap());
    assert!(store.claim_report(20_001, &a).await.unwrap());
}

#[tokio::test]
async fn local_tls_reports_contract() {
    let (_dir, store) = local();
    tls_reports_contract(store.as_ref()).await;
}

#[tokio::test]
async fn local_spool_contract() {
    let (_dir, store) = local();
    spool_contract(store.as_ref(), store.as_ref(), store.as_ref()).await;
}

#[tokio::test]
async fn local_body_pieces_contract() {
    let (_dir, store) = local();
    body_pieces_contract(store.as_ref(), store.as_ref(), store.as_ref()).await;
}

#[tokio::test]
async fn local_schedule_contract() {
    let (_dir, store) = local();
    schedule_contract(store.as_ref(), store.as_ref()).await;
}

#[tokio::test]
async fn split_spool_over_local_contract() {
    let (_dir, store) = local();
    let spool = SplitSpool {
        messages: store.clone(),
        queue: store.clone(),
        history: None,
    };
    spool_contract(&spool, store.as_ref(), store.as_ref()).await;
}

#[tokio::test]
async fn local_store_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let m = message(&["a@one.test"]);
    {
        let store = LocalStore::open(dir.path()).unwrap();
        store.accept(m.clone()).await.unwrap();
    }
    let store = LocalStore::open(dir.path()).unwrap();
    let entry = DeliveryQueue::get(&store, &m.id).await.unwrap().unwrap();
    assert_eq!(entry.sender, "sender@remote.test");
    assert_eq!(
        MessageStore::get(&store, &m.id).await.unwrap().unwrap(),
        m.body
    );
}

#[tokio::test]
async fn concurrent_accepts_are_all_committed() {
    let (_dir, store) = local();
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            store.accept(message(&["a@one.test"])).await
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(store.depth().await.unwrap(), 200);
}

#[tokio::test]
async fn a_duplicate_id_fails_alone_without_half_storing() {
    let (_dir, store) = local();
    let m = message(&["a@one.test"]);
    store.accept(m.clone()).await.unwrap();
    let mut dup = message(&["b@one.test"]);
    dup.id = m.id.clone();
    assert!(store.accept(dup).await.is_err());
    // The original is intact and nothing of the duplicate was written.
    let entry = DeliveryQueue::get(store.as_ref(), &m.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(entry.recipients[0].address, "a@one.test");
    assert_eq!(store.depth().await.unwrap(), 1);
}

#[tokio::test]
async fn failing_jobs_in_a_group_commit_leave_the_others_committed() {
    let (_dir, store) = local();
    let first = message(&["a@one.test"]);
    store.accept(first.clone()).await.unwrap();
    // Duplicates interleaved with good messages, all sent at once so the
    // writer takes them in shared transactions.
    let mut tasks = Vec::new();
    for i in 0..100 {
        let store = store.clone();
        let mut m = message(&["b@one.test"]);
        if i % 10 == 0 {
            m.id = first.id.clone();
        }
        tasks.push(tokio::spawn(async move { store.accept(m).await.is_ok() }));
    }
    let mut ok = 0;
    for t in tasks {
        ok += u64::from(t.await.unwrap());
    }
    assert_eq!(ok, 90);
    assert_eq!(store.depth().await.unwrap(), 91);
    let entry = DeliveryQueue::get(store.as_ref(), &first.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(entry.recipients[0].address, "a@one.test");
}

#[tokio::test]
async fn the_wal_stays_bounded_under_unbroken_writes() {
    let (dir, store) = local();
    // 160 MiB written back to back, 8 writers at a time: the background
    // checkpointer alone would let the WAL grow with it.
    let body = vec![b'x'; 1 << 20];
    for _ in 0..20 {
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let store = store.clone();
            let mut m = message(&["a@one.test"]);
            m.body = body.clone();
            tasks.push(tokio::spawn(async move { store.accept(m).await }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
    }
    let wal = std::fs::metadata(dir.path().join(format!("{}-wal", super::local::DB_FILE)))
        .unwrap()
        .len();
    assert!(wal < 100 << 20, "WAL is {wal} bytes");
    assert_eq!(store.depth().await.unwrap(), 160);
}

#[tokio::test]
async fn domain_changes_by_another_process_are_seen_at_once() {
    // A server's cached lookups and the CLI's changes, as two stores on one
    // data directory.
    let (dir, server) = local();
    let server: &dyn DomainRegistry = server.as_ref();
    let cli = LocalStore::open(dir.path()).unwrap();
    let cli: &dyn DomainRegistry = &cli;
    let name = DomainName::parse("example.test").unwrap();
    assert_eq!(server.get(&name).await.unwrap(), None);
    let mut d = Domain::from_parts("example.test", &["127.0.0.1:2626".into()], None).unwrap();
    cli.put(&d).await.unwrap();
    assert_eq!(server.get(&name).await.unwrap(), Some(d.clone()));
    assert_eq!(server.get(&name).await.unwrap(), Some(d.clone()));
    d.greylist = false;
    cli.put(&d).await.unwrap();
    assert_eq!(server.get(&name).await.unwrap(), Some(d.clone()));
    assert!(cli.remove(&name).await.unwrap());
    assert_eq!(server.get(&name).await.unwrap(), None);
}

#[tokio::test]
async fn corrupt_records_are_reported_not_panicked_on() {
    let (dir, store) = local();
    let m = message(&["a@one.test"]);
    store.accept(m.clone()).await.unwrap();
    let conn = rusqlite::Connection::open(dir.path().join(local::DB_FILE)).unwrap();
    conn.execute(
        "UPDATE queue SET record = '{\"version\":1' WHERE id = ?1",
        [m.id.as_str()],
    )
    .unwrap();
    let err = DeliveryQueue::get(store.as_ref(), &m.id).await.unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains(m.id.as_str()));
}

/// Wraps a store and fails the queue write when armed.
struct FailingQueue {
    inner: Arc<LocalStore>,
    fail: AtomicBool,
}

#[async_trait]
impl DeliveryQueue for FailingQueue {
    async fn enqueue(&self, entry: &QueueEntry) -> Result<(), StoreError> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(StoreError::io("enqueue", std::io::Error::other("injected")));
        }
        self.inner.enqueue(entry).await
    }
    async fn get(&self, id: &QueueId) -> Result<Option<QueueEntry>, StoreError> {
        DeliveryQueue::get(self.inner.as_ref(), id).await
    }
    async fn list(&self, domain: Option<&DomainName>) -> Result<Vec<QueueEntry>, StoreError> {
        DeliveryQueue::list(self.inner.as_ref(), domain).await
    }
    async fn remove(&self, id: &QueueId) -> Result<bool, StoreError> {
        DeliveryQueue::remove(self.inner.as_ref(), id).await
    }
    async fn depth(&self) -> Result<u64, StoreError> {
        self.inner.depth().await
    }
    async fn update(&self, entry: &QueueEntry) -> Result<bool, StoreError> {
        self.inner.update(entry).await
    }
    async fn release(&self, domain: Option<&DomainName>, now: u64) -> Result<u64, StoreError> {
        self.inner.release(domain, now).await
    }
}

#[tokio::test]
async fn split_spool_failure_leaves_nothing_behind() {
    let (_dir, store) = local();
    let queue = Arc::new(FailingQueue {
        inner: store.clone(),
        fail: AtomicBool::new(true),
    });
    let spool = SplitSpool {
        messages: store.clone(),
        queue: queue.clone(),
        history: None,
    };
    let m = message(&["a@one.test"]);
    assert!(spool.accept(m.clone()).await.is_err());
    assert_eq!(
        MessageStore::get(store.as_ref(), &m.id).await.unwrap(),
        None
    );
    assert_eq!(store.depth().await.unwrap(), 0);
    queue.fail.store(false, Ordering::SeqCst);
    spool.accept(m).await.unwrap();
    assert_eq!(store.depth().await.unwrap(), 1);
}

pub(crate) async fn greylist_contract(store: &dyn crate::greylist::GreylistStore) {
    use crate::greylist::{ClientState, TripletState};
    let t = TripletState {
        first_seen: 100,
        passed_until: None,
        expires: 200,
    };
    assert_eq!(store.triplet("k").await.unwrap(), None);
    assert!(
        store.insert_triplet("k", &t).await.unwrap(),
        "first insert wins"
    );
    let other = TripletState {
        first_seen: 150,
        ..t
    };
    assert!(
        !store.insert_triplet("k", &other).await.unwrap(),
        "second insert loses"
    );
    assert_eq!(store.triplet("k").await.unwrap(), Some(t));
    let passed = TripletState {
        passed_until: Some(1000),
        expires: 1000,
        ..t
    };
    assert!(store.replace_triplet("k", &t, &passed).await.unwrap());
    assert_eq!(store.triplet("k").await.unwrap(), Some(passed));
    assert!(
        !store.replace_triplet("k", &t, &other).await.unwrap(),
        "stale replace loses"
    );
    assert_eq!(store.triplet("k").await.unwrap(), Some(passed));
    let c = ClientState {
        passes: 3,
        last_counted: 100,
        expires: 300,
    };
    assert!(store.put_client("192.0.2.0/24", None, &c).await.unwrap());
    assert!(
        !store.put_client("192.0.2.0/24", None, &c).await.unwrap(),
        "already there"
    );
    let c2 = ClientState { passes: 4, ..c };
    assert!(store
        .put_client("192.0.2.0/24", Some(&c), &c2)
        .await
        .unwrap());
    assert!(
        !store
            .put_client("192.0.2.0/24", Some(&c), &c2)
            .await
            .unwrap(),
        "stale update loses"
    );
    let c = c2;
    assert_eq!(store.client("192.0.2.0/24").await.unwrap(), Some(c));
    store.insert_triplet("old", &t).await.unwrap();
    store.sweep(350).await.unwrap();
    // Swept, or (DynamoDB TTL deletes lazily) still there but visibly expired:
    // the greylist code checks expiry itself.
    let old = store.triplet("old").await.unwrap();
    assert!(old.is_none_or(|t| t.expires < 350), "{old:?}");
    let client = store.client("192.0.2.0/24").await.unwrap();
    assert!(client.is_none_or(|c| c.expires < 350), "{client:?}");
    assert_eq!(store.triplet("k").await.unwrap(), Some(passed));
}

pub(crate) async fn recipient_cache_contract(store: &dyn RecipientCache) {
    use crate::verify::{CachedRecipient, LearntFrom, PrimaryState, Verdict};
    let one = DomainName::parse("one.test").unwrap();
    let two = DomainName::parse("two.test").unwrap();
    let entry = |address: &str, verdict, expires| CachedRecipient {
        address: address.to_string(),
        verdict,
        learnt: LearntFrom::Callout,
        learnt_at: 1000,
        expires,
    };
    assert_eq!(store.recipient("a@one.test", 1000).await.unwrap(), None);
    let valid = entry("a@one.test", Verdict::Valid, 5000);
    store.put_recipient(&one, &valid).await.unwrap();
    store
        .put_recipient(&one, &entry("b@one.test", Verdict::Invalid, 2000))
        .await
        .unwrap();
    store
        .put_recipient(&two, &entry("c@two.test", Verdict::Valid, 5000))
        .await
        .unwrap();
    assert_eq!(
        store.recipient("a@one.test", 1000).await.unwrap(),
        Some(valid.clone())
    );
    // Expired verdicts are gone for readers, whatever the backend's cleanup.
    assert_eq!(store.recipient("b@one.test", 2000).await.unwrap(), None);
    let listed: Vec<String> = store
        .recipients(&one, 1000)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.address)
        .collect();
    assert_eq!(listed, ["a@one.test", "b@one.test"]);
    assert_eq!(store.recipients(&one, 3000).await.unwrap(), vec![valid]);
    // Counted as listed: per domain, expired ones left out.
    assert_eq!(store.verdict_counts(&one, 1000).await.unwrap(), (1, 1));
    assert_eq!(store.verdict_counts(&one, 3000).await.unwrap(), (1, 0));
    assert_eq!(store.verdict_counts(&two, 1000).await.unwrap(), (1, 0));
    // A newer verdict replaces the old one.
    let learnt = CachedRecipient {
        learnt: LearntFrom::Delivery,
        ..entry("a@one.test", Verdict::Invalid, 9000)
    };
    store.put_recipient(&one, &learnt).await.unwrap();
    assert_eq!(
        store.recipient("a@one.test", 1000).await.unwrap(),
        Some(learnt)
    );

    assert_eq!(store.primary_state(&one).await.unwrap(), None);
    let up = PrimaryState::observe(None, true, 1000);
    store.put_primary_state(&one, &up).await.unwrap();
    assert_eq!(store.primary_state(&one).await.unwrap(), Some(up));
    let down = PrimaryState::observe(Some(up), false, 1100);
    store.put_primary_state(&one, &down).await.unwrap();
    assert_eq!(store.primary_state(&one).await.unwrap(), Some(down));
    assert_eq!(store.primary_state(&two).await.unwrap(), None);
}

#[tokio::test]
async fn local_recipient_cache_contract() {
    let (_dir, store) = local();
    recipient_cache_contract(store.as_ref()).await;
}

#[tokio::test]
async fn local_greylist_contract() {
    let (_dir, store) = local();
    greylist_contract(store.as_ref()).await;
}

#[tokio::test]
async fn concurrent_first_sightings_agree() {
    let (_dir, store) = local();
    let state = crate::greylist::TripletState {
        first_seen: 1,
        passed_until: None,
        expires: 10,
    };
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            crate::greylist::GreylistStore::insert_triplet(store.as_ref(), "same", &state)
                .await
                .unwrap()
        }));
    }
    let mut winners = 0;
    for t in tasks {
        winners += usize::from(t.await.unwrap());
    }
    assert_eq!(winners, 1);
}

/// The same contracts against the AWS backend on an emulator
/// (`AWS_ENDPOINT_URL`). Skipped without one, unless
/// `REQUIRE_AWS_EMULATOR` is set (as `scripts/test` does).
#[cfg(feature = "aws")]
mod aws {
    use super::*;
    use crate::store::aws::{AwsNames, AwsStore};

    pub(crate) async fn store() -> Option<Arc<AwsStore>> {
        if std::env::var_os("AWS_ENDPOINT_URL").is_none() {
            assert!(
                std::env::var_os("REQUIRE_AWS_EMULATOR").is_none(),
                "REQUIRE_AWS_EMULATOR is set but AWS_ENDPOINT_URL is not: start the emulator (ci/aws-emulator.sh)"
            );
            eprintln!("skipped: AWS_ENDPOINT_URL is not set");
            return None;
        }
        let suffix = crate::queue::new_id(SystemTime::now())
            .as_str()
            .to_lowercase();
        let names = AwsNames {
            domains_table: format!("domains-{suffix}"),
            greylist_table: format!("greylist-{suffix}"),
            bucket: format!("messages-{suffix}"),
            queue_url: String::new(),
            queue_name: format!("queue-{suffix}"),
            queue_table: format!("queue-{suffix}"),
            dead_letter_queue_url: String::new(),
        };
        let conf = crate::store::aws::sdk_config().await;
        Some(Arc::new(
            AwsStore::bootstrap(&conf, names)
                .await
                .expect("bootstrap on the emulator"),
        ))
    }

    #[tokio::test]
    async fn aws_tls_reports_contract() {
        let Some(s) = store().await else { return };
        tls_reports_contract(s.as_ref()).await;
    }

    #[tokio::test]
    async fn aws_history_contract() {
        let Some(s) = store().await else { return };
        let spool = SplitSpool {
            messages: s.clone(),
            queue: s.clone(),
            history: Some(s.clone()),
        };
        history_contract(s.as_ref(), &spool, s.as_ref()).await;
    }

    #[tokio::test]
    async fn aws_domains_contract() {
        let Some(s) = store().await else { return };
        domains_contract(s.as_ref()).await;
    }

    #[tokio::test]
    async fn aws_spool_contract() {
        let Some(s) = store().await else { return };
        let spool = SplitSpool {
            messages: s.clone(),
            queue: s.clone(),
            history: None,
        };
        spool_contract(&spool, s.as_ref(), s.as_ref()).await;
    }

    #[tokio::test]
    async fn aws_body_pieces_contract() {
        let Some(s) = store().await else { return };
        let spool = SplitSpool {
            messages: s.clone(),
            queue: s.clone(),
            history: None,
        };
        body_pieces_contract(&spool, s.as_ref(), s.as_ref()).await;
    }

    #[tokio::test]
    async fn aws_recipient_cache_contract() {
        let Some(s) = store().await else { return };
        recipient_cache_contract(s.as_ref()).await;
    }

    #[tokio::test]
    async fn aws_greylist_contract() {
        let Some(s) = store().await else { return };
        greylist_contract(s.as_ref()).await;
    }

    #[tokio::test]
    async fn aws_bootstrap_is_idempotent() {
        let Some(s) = store().await else { return };
        let again = AwsStore::bootstrap(&crate::store::aws::sdk_config().await, s.names().clone())
            .await
            .unwrap();
        assert_eq!(again.queue_url(), s.queue_url());
    }

    #[tokio::test]
    async fn aws_split_spool_failure_leaves_nothing_behind() {
        let Some(s) = store().await else { return };
        // A queue that fails: the body written to S3 must be removed again.
        let queue = Arc::new(FailingAwsQueue(s.clone()));
        let spool = SplitSpool {
            messages: s.clone(),
            queue,
            history: None,
        };
        let m = message(&["a@one.test"]);
        assert!(spool.accept(m.clone()).await.is_err());
        assert_eq!(MessageStore::get(s.as_ref(), &m.id).await.unwrap(), None);
        assert_eq!(DeliveryQueue::depth(s.as_ref()).await.unwrap(), 0);
    }

    struct FailingAwsQueue(Arc<AwsStore>);

    #[async_trait]
    impl DeliveryQueue for FailingAwsQueue {
        async fn enqueue(&self, _: &QueueEntry) -> Result<(), StoreError> {
            Err(StoreError::io(
                "enqueue",
                std::io::Error::other("injected SQS failure"),
            ))
        }
        async fn get(&self, id: &QueueId) -> Result<Option<QueueEntry>, StoreError> {
            DeliveryQueue::get(self.0.as_ref(), id).await
        }
        async fn list(&self, d: Option<&DomainName>) -> Result<Vec<QueueEntry>, StoreError> {
            DeliveryQueue::list(self.0.as_ref(), d).await
        }
        async fn remove(&self, id: &QueueId) -> Result<bool, StoreError> {
            DeliveryQueue::remove(self.0.as_ref(), id).await
        }
        async fn depth(&self) -> Result<u64, StoreError> {
            self.0.depth().await
        }
        async fn update(&self, e: &QueueEntry) -> Result<bool, StoreError> {
            self.0.update(e).await
        }
        async fn release(&self, d: Option<&DomainName>, now: u64) -> Result<u64, StoreError> {
            self.0.release(d, now).await
        }
    }
}
