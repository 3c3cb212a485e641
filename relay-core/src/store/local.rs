//! The embedded backend: one SQLite database (WAL, `synchronous=FULL`) holding
//! domains, message bodies and the queue.
//!
//! Writes are committed in groups: one transaction, one fsync, for every
//! request that piled up (group commit), which is how a durable store keeps
//! up with many concurrent senders. A request is answered only after its
//! transaction committed. Reads use their own connection.
//!
//! Who commits: a writer thread takes requests from a channel; and in a
//! server whose async runtime calls [`commit_pending`] before a worker
//! thread goes to sleep ([`LocalStore::commit_on_runtime_threads`]), the
//! runtime's own threads queue their requests and commit them the moment
//! they run out of other work. That saves two thread wake-ups per group
//! (to the writer and back), and a group is everything the sessions of the
//! moment had to say: at 50 sessions a third more mail per second and a
//! quarter less CPU per message (docs/BENCHMARKS.md).

use crate::sync::Mutex;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use tokio::sync::oneshot;

use super::{
    space, DeliveryQueue, DomainRegistry, MessageStore, RecipientCache, ScheduledQueue, Spool,
    StoreError,
};
use crate::address::DomainName;
use crate::domain::Domain;
use crate::greylist::{ClientState, GreylistStore, TripletState};
use crate::queue::{AcceptedMessage, QueueEntry, QueueId, SpooledBody};
use crate::verify::{CachedRecipient, PrimaryState};

/// File name of the database inside the data directory.
pub const DB_FILE: &str = "backupmx.db";

/// Most requests committed in one transaction.
const MAX_BATCH: usize = 512;

/// WAL size (pages) at which the checkpointer is asked to copy it into the
/// database (SQLite's own default threshold).
const CHECKPOINT_PAGES: i32 = 1000;

/// WAL size (pages, 64 MiB) at which the writer checkpoints by itself:
/// under unbroken load the background checkpointer may never catch the WAL
/// fully copied, and it must not grow without bound.
const WAL_LIMIT_PAGES: i32 = 16_384;

thread_local! {
    /// Pages in the WAL after the writer thread's last commit (set by the
    /// WAL hook, which runs on the committing thread).
    static WAL_PAGES: std::cell::Cell<i32> = const { std::cell::Cell::new(0) };
}

fn record_wal_pages(_: &rusqlite::hooks::Wal, pages: std::ffi::c_int) -> rusqlite::Result<()> {
    WAL_PAGES.with(|p| p.set(pages));
    Ok(())
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS domains (name TEXT PRIMARY KEY, record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS messages (id TEXT PRIMARY KEY, body BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS queue (
    id TEXT PRIMARY KEY,
    domain TEXT NOT NULL,
    next_attempt INTEGER NOT NULL,
    received_at INTEGER NOT NULL,
    record TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS queue_due ON queue(next_attempt);
-- Every b-tree an accepted message touches costs WAL pages in its commit:
-- the queue is keyed by id alone (no rowid) and has no per-domain index
-- (listing or releasing one domain scans the queue; both are rare).
DROP INDEX IF EXISTS queue_domain;
-- Releases (flush, ETRN, a probe that found a destination back) for a
-- running worker to see; domain NULL means every domain. It replaces
-- `releases`, which wrote '' for that.
DROP TABLE IF EXISTS releases;
CREATE TABLE IF NOT EXISTS queue_releases (domain TEXT);
-- Recipient verification: the callout cache and each primary's state.
CREATE TABLE IF NOT EXISTS recipient_cache (address TEXT PRIMARY KEY, domain TEXT NOT NULL, record TEXT NOT NULL, expires INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS primary_state (domain TEXT PRIMARY KEY, record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS greylist (key TEXT PRIMARY KEY, state TEXT NOT NULL, expires INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS greylist_clients (network TEXT PRIMARY KEY, state TEXT NOT NULL, expires INTEGER NOT NULL);
";

enum WriteOp {
    Accept {
        entries: Vec<QueueEntry>,
        body: Vec<u8>,
        spooled: Option<SpooledBody>,
    },
    PutBody {
        id: QueueId,
        body: Vec<u8>,
    },
    PutFile {
        id: QueueId,
        body: SpooledBody,
    },
    DeleteBody(QueueId),
    Enqueue(QueueEntry),
    RemoveEntry(QueueId),
    UpdateEntry(QueueEntry),
    /// An update that may not use the reserve ([`ScheduledQueue::reschedule`]).
    Reschedule(QueueEntry),
    Release {
        domain: Option<DomainName>,
        now: u64,
    },
    Defer {
        domain: DomainName,
        until: u64,
    },
    PutDomain(Domain),
    InsertTriplet {
        key: String,
        state: TripletState,
    },
    ReplaceTriplet {
        key: String,
        previous: TripletState,
        state: TripletState,
    },
    PutClient {
        network: String,
        previous: Option<ClientState>,
        state: ClientState,
    },
    PutRecipient {
        domain: DomainName,
        entry: CachedRecipient,
    },
    PutPrimaryState {
        domain: DomainName,
        state: PrimaryState,
    },
    SweepGreylist(u64),
    TakeReleases,
    RemoveDomain(DomainName),
}

struct WriteJob {
    op: WriteOp,
    done: oneshot::Sender<Result<bool, StoreError>>,
}

/// Disk-space settings of the embedded store (see [`super::space`]).
#[derive(Debug, Clone, Copy)]
pub struct StoreOptions {
    /// Preallocated space given up for bookkeeping when the disk fills; 0 = none.
    pub reserve_space: u64,
    /// Free space below which new mail is refused; the reserve is taken
    /// back only above it.
    pub min_free_space: u64,
}

impl Default for StoreOptions {
    /// The defaults of `[storage]`: refuse below 100 MiB free, keep 16 MiB
    /// in reserve.
    fn default() -> Self {
        StoreOptions {
            reserve_space: 16 * 1024 * 1024,
            min_free_space: 100 * 1024 * 1024,
        }
    }
}

/// The embedded store. Cheap to share behind an `Arc`.
/// The database's size, the part of it that is free pages, and the WAL's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreSpace {
    pub file_bytes: u64,
    pub free_bytes: u64,
    pub wal_bytes: u64,
}

impl StoreSpace {
    /// What the store adds to the filesystem's free space: its free pages,
    /// less the WAL, whose pages the database may have to grow by when
    /// they are copied in (a checkpoint on a disk without that room fails,
    /// and then so does every commit after it, the delivered messages'
    /// removals too). Negative when the WAL outweighs the free pages.
    pub fn free_adjustment(&self) -> i64 {
        self.free_bytes as i64 - self.wal_bytes as i64
    }
}

pub struct LocalStore {
    writer: std::sync::Mutex<mpsc::Sender<WriteJob>>,
    writer_side: Arc<WriterSide>,
    reader: std::sync::Mutex<Connection>,
    path: PathBuf,
    domains: Mutex<DomainCache>,
}

/// File beside the database that grows by a byte whenever a domain is
/// added, changed or removed (by this process or the CLI): one `stat` tells
/// a server its cached domains are still current, where an SQLite read per
/// RCPT cost a lock round trip and page reads.
const DOMAINS_STAMP_FILE: &str = "domains.stamp";

/// Entries kept before the cache starts over (lookups of random domains
/// must not grow it without bound).
const DOMAIN_CACHE_MAX: usize = 10_000;

#[derive(Default)]
struct DomainCache {
    /// (inode, size) of the stamp file the entries were read under.
    stamp: Option<(u64, u64)>,
    entries: std::collections::HashMap<DomainName, Option<Domain>>,
}

fn backend(e: rusqlite::Error) -> StoreError {
    StoreError::backend("SQLite", e)
}

fn open_connection(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open(path).map_err(backend)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))
        .map_err(backend)?;
    // WAL + FULL: a commit is on disk when it returns, readers never block
    // the writer, and the CLI can work on the same file as a running server.
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(backend)?;
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(backend)?;
    Ok(conn)
}

impl LocalStore {
    /// Opens (creating if needed) the database in `data_dir`, with the
    /// default disk-space settings.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        Self::open_with(data_dir, StoreOptions::default())
    }

    /// Opens (creating if needed) the database in `data_dir`.
    pub fn open_with(data_dir: &Path, options: StoreOptions) -> Result<Self, StoreError> {
        space::prepare_data_dir(data_dir).map_err(|e| {
            StoreError::io(
                format!("cannot prepare data directory {}", data_dir.display()),
                e,
            )
        })?;
        let path = data_dir.join(DB_FILE);
        if !path.exists() {
            // Created here with mode 0600: SQLite gives its -wal and -shm
            // files the database's mode, whatever the umask.
            space::open_private(&path, false)
                .map_err(|e| StoreError::io(format!("cannot create {}", path.display()), e))?;
        }
        let mut reserve =
            space::Reserve::new(data_dir, options.reserve_space, options.min_free_space);
        if let Err(e) = reserve.take() {
            tracing::warn!(event = "storage_reserve_unavailable", dir = %data_dir.display(), error = %crate::error::Report(&e));
        }
        let writer_conn = open_connection(&path)
            .map_err(|e| StoreError::backend(format!("cannot open {}", path.display()), e))?;
        writer_conn
            .execute_batch(SCHEMA)
            .map_err(|e| StoreError::backend(format!("cannot initialise {}", path.display()), e))?;
        let reader = open_connection(&path)?;
        // Checkpoints (copying the WAL into the database, with an fsync of
        // its own) run on their own thread and connection instead of inside
        // a commit, where every session in the group would wait for them.
        // Registering the hook replaces SQLite's automatic checkpoints.
        writer_conn.wal_hook(Some(record_wal_pages));
        let checkpointer_conn = open_connection(&path)?;
        let (nudge, nudged) = mpsc::sync_channel::<()>(1);
        thread::Builder::new()
            .name("store-checkpoint".into())
            .spawn(move || checkpoint_loop(&checkpointer_conn, &nudged))
            .map_err(|e| StoreError::io("cannot start checkpoint thread", e))?;
        let (tx, rx) = mpsc::channel::<WriteJob>();
        let writer_side = Arc::new(WriterSide {
            committer: std::sync::Mutex::new(Committer {
                conn: writer_conn,
                reserve,
                checkpoint: nudge,
            }),
            queued: std::sync::Mutex::new(Queued {
                jobs: Vec::new(),
                since: None,
            }),
        });
        let for_thread = writer_side.clone();
        thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer_loop(&for_thread, &rx))
            .map_err(|e| StoreError::io("cannot start writer thread", e))?;
        Ok(LocalStore {
            writer: std::sync::Mutex::new(tx),
            writer_side,
            reader: std::sync::Mutex::new(reader),
            path,
            domains: Mutex::new(DomainCache::default()),
        })
    }

    fn stamp_path(&self) -> PathBuf {
        self.path.with_file_name(DOMAINS_STAMP_FILE)
    }

    fn domains_stamp(&self) -> (u64, u64) {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(self.stamp_path()).map_or((0, 0), |m| (m.ino(), m.len()))
    }

    /// Called after a domain change committed, so a reader that sees the
    /// new stamp also sees the change.
    fn bump_domains_stamp(&self) {
        use std::io::Write;
        let bumped =
            space::open_private(&self.stamp_path(), true).and_then(|mut f| f.write_all(b"."));
        if let Err(e) = bumped {
            tracing::warn!(event = "domains_stamp_failed", path = %self.stamp_path().display(), error = %crate::error::Report(&e));
        }
        let mut cache = self.domains.lock();
        *cache = DomainCache::default();
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Lets the threads of an async runtime that calls [`commit_pending`]
    /// before parking commit their own requests to this store (see the
    /// module's documentation). One store per process can be set so; later
    /// calls change nothing. Other threads keep using the writer thread.
    pub fn commit_on_runtime_threads(&self) {
        let _ = ON_RUNTIME_THREADS.set(self.writer_side.clone());
    }

    async fn write(&self, op: WriteOp) -> Result<bool, StoreError> {
        // Bigger messages take their copying to the writer thread, so the
        // runtime's threads go on reading other sessions meanwhile (at
        // 100 KiB that is 7 % faster than committing them inline).
        let small = match &op {
            WriteOp::Accept {
                body,
                spooled: None,
                ..
            }
            | WriteOp::PutBody { body, .. } => body.len() <= INLINE_BODY_MAX,
            WriteOp::Accept { .. } | WriteOp::PutFile { .. } => false,
            _ => true,
        };
        let (done, wait) = oneshot::channel();
        let mut job = Some(WriteJob { op, done });
        if let Some(side) = ON_RUNTIME_THREADS.get() {
            if small
                && Arc::ptr_eq(side, &self.writer_side)
                && CALLS_HOOK.with(std::cell::Cell::get)
            {
                if let Ok(mut q) = side.queued.lock() {
                    // A full queue goes through the writer thread, which
                    // takes the queued requests along.
                    if q.jobs.len() < MAX_BATCH {
                        q.since.get_or_insert_with(Instant::now);
                        q.jobs.extend(job.take());
                    }
                }
            }
        }
        if let Some(job) = job {
            let sender = self.writer.lock().map_err(|_| StoreError::Closed)?;
            sender.send(job).map_err(|_| StoreError::Closed)?;
        }
        wait.await.map_err(|_| StoreError::Closed)?
    }

    fn read<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T, StoreError> {
        let conn = self.reader.lock().map_err(|_| StoreError::Closed)?;
        f(&conn).map_err(backend)
    }

    /// Bytes on the database's free list: pages a drained backlog left,
    /// which SQLite reuses before it grows the file (and which the floor
    /// of `min_free_space` counts as free), and the file's size. Read with
    /// the store's own connection (a second descriptor on the file would
    /// drop SQLite's locks when closed).
    pub fn space_inside(&self) -> Result<StoreSpace, StoreError> {
        // The WAL's size from its metadata: no descriptor opened.
        let mut wal = self.path.clone().into_os_string();
        wal.push("-wal");
        let wal_bytes = std::fs::metadata(&wal).map_or(0, |m| m.len());
        self.read(|c| {
            let page_size: i64 = c.query_row("PRAGMA page_size", [], |r| r.get(0))?;
            let free_pages: i64 = c.query_row("PRAGMA freelist_count", [], |r| r.get(0))?;
            let pages: i64 = c.query_row("PRAGMA page_count", [], |r| r.get(0))?;
            let page_size = page_size.max(0) as u64;
            Ok(StoreSpace {
                file_bytes: pages.max(0) as u64 * page_size,
                free_bytes: free_pages.max(0) as u64 * page_size,
                wal_bytes,
            })
        })
    }

    /// The first column of the row `sql` selects, if there is one.
    fn read_optional<T: rusqlite::types::FromSql>(
        &self,
        sql: &str,
        params: impl rusqlite::Params,
    ) -> Result<Option<T>, StoreError> {
        self.read(|c| {
            c.prepare_cached(sql)?
                .query_row(params, |r| r.get(0))
                .optional()
        })
    }
}

/// Queue entries read at a time by [`DeliveryQueue::scan`] (~0.5 MB).
const SCAN_PAGE: usize = 512;

/// The writer's connection and what each commit maintains.
struct Committer {
    conn: Connection,
    reserve: space::Reserve,
    checkpoint: mpsc::SyncSender<()>,
}

impl Committer {
    /// Commits `batch` in one transaction and answers every job.
    fn commit(&mut self, batch: Vec<WriteJob>) {
        // Below the floor, schedule-only writes are turned away before they
        // take the last free space: that space is the checkpoint's and the
        // delivered messages' removals' (the worker keeps such schedules in
        // memory). One statvfs, and only when the batch has one.
        let batch = if batch.iter().any(|j| schedule_only(&j.op)) && self.reserve.below_floor() {
            let (batch, refused): (Vec<WriteJob>, Vec<WriteJob>) =
                batch.into_iter().partition(|j| !schedule_only(&j.op));
            for job in refused {
                let _ = job.done.send(Err(StoreError::io(
                    "schedule not stored",
                    std::io::Error::new(
                        std::io::ErrorKind::StorageFull,
                        "free space is below min_free_space",
                    ),
                )));
            }
            batch
        } else {
            batch
        };
        if batch.is_empty() {
            return;
        }
        let results = commit_batch(&mut self.conn, &batch, &mut self.reserve);
        self.reserve.maintain();
        for (job, result) in batch.into_iter().zip(results) {
            // The waiting session may have gone away; nothing to tell then.
            let _ = job.done.send(result);
        }
        let wal_pages = WAL_PAGES.with(std::cell::Cell::take);
        if wal_pages >= WAL_LIMIT_PAGES {
            restart_wal(&self.conn);
        } else if wal_pages >= CHECKPOINT_PAGES {
            // Full means a nudge is already pending.
            let _ = self.checkpoint.try_send(());
        }
    }
}

/// Requests queued by runtime threads, waiting for a commit.
struct Queued {
    jobs: Vec<WriteJob>,
    /// When the oldest of them was queued.
    since: Option<Instant>,
}

/// What every committing thread shares: the one connection that writes,
/// and the requests runtime threads queued for whoever commits next.
struct WriterSide {
    committer: std::sync::Mutex<Committer>,
    queued: std::sync::Mutex<Queued>,
}

impl WriterSide {
    fn take_queued(&self) -> Vec<WriteJob> {
        self.queued.lock().map_or_else(
            |_| Vec::new(),
            |mut q| {
                q.since = None;
                std::mem::take(&mut q.jobs)
            },
        )
    }

    fn nothing_queued(&self) -> bool {
        self.queued.lock().map_or(true, |q| q.jobs.is_empty())
    }

    /// Commits `batch` and then whatever was queued, until nothing is. With
    /// `wait` false it gives up at once if another thread is committing:
    /// that thread looks at the queue before it stops (and once more after
    /// it let go of the connection), so no queued request is left behind.
    fn commit(&self, mut batch: Vec<WriteJob>, mut wait: bool) {
        loop {
            let guard = if wait {
                self.committer.lock().ok()
            } else {
                self.committer.try_lock().ok()
            };
            let Some(mut committer) = guard else { return };
            loop {
                batch.extend(self.take_queued());
                if batch.is_empty() {
                    break;
                }
                committer.commit(std::mem::take(&mut batch));
            }
            drop(committer);
            if self.nothing_queued() {
                return;
            }
            wait = false;
        }
    }
}

/// How long a queued request may wait for a runtime thread to run out of
/// work before the writer thread commits it (a runtime that stays busy).
const QUEUED_MAX_WAIT: Duration = Duration::from_millis(20);

fn writer_loop(side: &WriterSide, rx: &mpsc::Receiver<WriteJob>) {
    loop {
        let first = match rx.recv_timeout(QUEUED_MAX_WAIT) {
            Ok(job) => job,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let overdue = side
                    .queued
                    .lock()
                    .is_ok_and(|q| q.since.is_some_and(|t| t.elapsed() >= QUEUED_MAX_WAIT));
                if overdue {
                    side.commit(Vec::new(), true);
                }
                continue;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        side.commit(batch, true);
    }
}

/// Largest message body a runtime thread commits itself.
const INLINE_BODY_MAX: usize = 32 * 1024;

/// The store whose writes the runtime's threads commit (one per process).
static ON_RUNTIME_THREADS: std::sync::OnceLock<Arc<WriterSide>> = std::sync::OnceLock::new();

thread_local! {
    /// Set on a thread once it has called [`commit_pending`]: its runtime
    /// runs the hook, so its requests can wait for it.
    static CALLS_HOOK: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Commits the requests the runtime's threads queued, on this thread, in
/// one transaction. For the runtime's `on_thread_park` hook: a worker
/// thread that ran out of work commits what its sessions wait for before it
/// sleeps, and the sessions it wakes run on it at once. Returns at once if
/// another thread is committing (that one takes these requests too).
pub fn commit_pending() {
    CALLS_HOOK.with(|c| c.set(true));
    if let Some(side) = ON_RUNTIME_THREADS.get() {
        if !side.nothing_queued() {
            side.commit(Vec::new(), false);
        }
    }
}

/// Copies the whole WAL into the database and starts it over, on the
/// writer's thread (no commit runs meanwhile). SQLite answers "busy"
/// without waiting while the background checkpointer is copying, and the
/// WAL would grow by another batch each time; so this waits for it,
/// within a bound.
fn restart_wal(conn: &Connection) {
    const PAUSE: std::time::Duration = std::time::Duration::from_millis(5);
    for _ in 0..400 {
        match conn.query_row("PRAGMA wal_checkpoint(RESTART)", [], |row| {
            row.get::<_, i64>(0)
        }) {
            Ok(0) => return,
            Ok(_) => thread::sleep(PAUSE),
            Err(e) => {
                tracing::warn!(event = "checkpoint_failed", error = %crate::error::Report(&e));
                return;
            }
        }
    }
    tracing::warn!(
        event = "checkpoint_busy",
        "the WAL could not be restarted within 2 s"
    );
}

/// Copies the WAL into the database whenever the writer says it has grown.
/// Ends when the writer (the only sender) is gone.
fn checkpoint_loop(conn: &Connection, nudged: &mpsc::Receiver<()>) {
    while nudged.recv().is_ok() {
        if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            tracing::warn!(event = "checkpoint_failed", error = %crate::error::Report(&e));
        }
    }
}

/// Commits the whole batch in one transaction (one fsync). Jobs rarely
/// fail (a duplicate key, a full disk); when one does, the batch is rolled
/// back and every job is applied again in its own transaction so the
/// failure stays with its own request. This is cheaper than a savepoint per
/// job on the common path.
fn commit_batch(
    conn: &mut Connection,
    batch: &[WriteJob],
    reserve: &mut space::Reserve,
) -> Vec<Result<bool, StoreError>> {
    let together = (|| {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let results = batch
            .iter()
            .map(|job| apply(&tx, &job.op))
            .collect::<rusqlite::Result<Vec<bool>>>()?;
        tx.commit()?;
        Ok::<_, rusqlite::Error>(results)
    })();
    match together {
        Ok(results) => results.into_iter().map(Ok).collect(),
        Err(e) if batch.len() == 1 && !(is_disk_full(&e) && frees_or_tracks(&batch[0].op)) => {
            vec![Err(backend(e))]
        }
        Err(_) => batch
            .iter()
            .map(|job| commit_one(conn, &job.op, reserve))
            .collect(),
    }
}

/// Commits one request. Bookkeeping that fails on a full disk is tried
/// once more after the reserve is given up.
fn commit_one(
    conn: &mut Connection,
    op: &WriteOp,
    reserve: &mut space::Reserve,
) -> Result<bool, StoreError> {
    let once = |conn: &mut Connection| {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let result = apply(&tx, op)?;
        tx.commit()?;
        Ok::<_, rusqlite::Error>(result)
    };
    match once(conn) {
        Err(e) if is_disk_full(&e) && frees_or_tracks(op) && reserve.release() => {
            // The reserve's room goes first to copying the WAL into the
            // database and truncating it: that returns the WAL's own space
            // too, where this write (and the ones after it) can then go.
            if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(())) {
                tracing::warn!(event = "checkpoint_failed", error = %crate::error::Report(&e));
            }
            once(conn).map_err(backend)
        }
        other => other.map_err(backend),
    }
}

fn is_disk_full(e: &rusqlite::Error) -> bool {
    e.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull)
}

/// Writes that only move a schedule: losing one repeats a harmless attempt
/// early ([`ScheduledQueue::reschedule`], a deferred domain).
fn schedule_only(op: &WriteOp) -> bool {
    matches!(op, WriteOp::Reschedule(_) | WriteOp::Defer { .. })
}

/// Requests that keep the queue true to what happened (an outcome, a
/// deletion, a release) rather than bring new data in: these may use the
/// reserve, new mail may not. Nor may a schedule change that losing only
/// makes a harmless attempt come early (a reschedule, a deferred domain):
/// the reserve is kept for delivered recipients' records and deletions.
fn frees_or_tracks(op: &WriteOp) -> bool {
    !schedule_only(op)
        && !matches!(
            op,
            WriteOp::Accept { .. }
                | WriteOp::PutBody { .. }
                | WriteOp::PutFile { .. }
                | WriteOp::Enqueue(_)
                | WriteOp::InsertTriplet { .. }
                | WriteOp::ReplaceTriplet { .. }
                | WriteOp::PutClient { .. }
                | WriteOp::PutRecipient { .. }
                | WriteOp::PutPrimaryState { .. }
        )
}

/// Runs one statement through the connection's statement cache: the writer
/// runs the same few statements thousands of times a second.
fn exec(conn: &Connection, sql: &str, params: impl rusqlite::Params) -> rusqlite::Result<usize> {
    conn.prepare_cached(sql)?.execute(params)
}

fn insert_entry(conn: &Connection, entry: &QueueEntry) -> rusqlite::Result<()> {
    exec(conn,
        "INSERT INTO queue (id, domain, next_attempt, received_at, record) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![
            entry.id.as_str(),
            entry.domain.as_str(),
            entry.next_attempt as i64,
            entry.received_at as i64,
            entry.encode()
        ],
    )?;
    Ok(())
}

/// Inserts a body from a spool file without holding it in memory: a blob
/// of the right size first, then the file copied into it in pieces.
fn insert_body_from_file(
    conn: &Connection,
    id: &QueueId,
    file: &SpooledBody,
    replace: bool,
) -> rusqlite::Result<()> {
    use std::io::Read;
    let io = |e: std::io::Error| rusqlite::Error::ToSqlConversionFailure(Box::new(e));
    let len = i64::try_from(file.len)
        .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
    let sql = if replace {
        "INSERT OR REPLACE INTO messages (id, body) VALUES (?1, zeroblob(?2))"
    } else {
        "INSERT INTO messages (id, body) VALUES (?1, zeroblob(?2))"
    };
    exec(conn, sql, params![id.as_str(), len])?;
    let rowid = conn.last_insert_rowid();
    let mut blob = conn.blob_open(rusqlite::MAIN_DB, "messages", "body", rowid, false)?;
    let mut source = std::fs::File::open(&file.path).map_err(io)?;
    let mut buf = vec![0u8; super::BODY_CHUNK];
    let mut at = 0usize;
    loop {
        let n = source.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        if (at + n) as u64 > file.len {
            return Err(io(std::io::Error::other("spool file longer than recorded")));
        }
        blob.write_all_at(&buf[..n], at)?;
        at += n;
    }
    if at as u64 != file.len {
        return Err(io(std::io::Error::other(
            "spool file shorter than recorded",
        )));
    }
    Ok(())
}

fn apply(conn: &Connection, op: &WriteOp) -> rusqlite::Result<bool> {
    match op {
        WriteOp::Accept { entries, body, spooled } => {
            for entry in entries {
                match spooled {
                    None => {
                        exec(conn,
                            "INSERT INTO messages (id, body) VALUES (?1, ?2)",
                            params![entry.id.as_str(), body],
                        )?;
                    }
                    Some(file) => insert_body_from_file(conn, &entry.id, file, false)?,
                }
                insert_entry(conn, entry)?;
            }
            Ok(true)
        }
        WriteOp::PutFile { id, body } => {
            insert_body_from_file(conn, id, body, true)?;
            Ok(true)
        }
        WriteOp::PutBody { id, body } => {
            exec(conn,
                "INSERT OR REPLACE INTO messages (id, body) VALUES (?1, ?2)",
                params![id.as_str(), body],
            )?;
            Ok(true)
        }
        WriteOp::DeleteBody(id) => {
            Ok(exec(conn, "DELETE FROM messages WHERE id = ?1", [id.as_str()])? > 0)
        }
        WriteOp::Enqueue(entry) => {
            insert_entry(conn, entry)?;
            Ok(true)
        }
        WriteOp::RemoveEntry(id) => {
            let n = exec(conn, "DELETE FROM queue WHERE id = ?1", [id.as_str()])?;
            exec(conn, "DELETE FROM messages WHERE id = ?1", [id.as_str()])?;
            Ok(n > 0)
        }
        WriteOp::UpdateEntry(entry) | WriteOp::Reschedule(entry) => {
            let n = exec(conn,
                "UPDATE queue SET next_attempt = ?2, record = ?3 WHERE id = ?1",
                params![entry.id.as_str(), entry.next_attempt as i64, entry.encode()],
            )?;
            Ok(n > 0)
        }
        WriteOp::Release { domain, now } => {
            // Tells a running worker (maybe another process) that a
            // destination it believed down was released.
            exec(conn,
                "INSERT INTO queue_releases (domain) VALUES (?1)",
                [domain.as_ref().map(DomainName::as_str)],
            )?;
            exec(conn,
                "UPDATE queue SET next_attempt = ?2, record = json_set(record, '$.next_attempt', ?2)
                 WHERE (?1 IS NULL OR domain = ?1) AND next_attempt > ?2",
                params![domain.as_ref().map(DomainName::as_str), *now as i64],
            )?;
            Ok(true)
        }
        WriteOp::Defer { domain, until } => {
            let n = exec(conn,
                "UPDATE queue SET next_attempt = ?2, record = json_set(record, '$.next_attempt', ?2)
                 WHERE +domain = ?1 AND next_attempt < ?2",
                params![domain.as_str(), *until as i64],
            )?;
            Ok(n > 0)
        }
        WriteOp::PutDomain(d) => {
            // Serialising a plain struct cannot fail.
            let record = serde_json::to_string(d).unwrap_or_default();
            exec(conn,
                "INSERT OR REPLACE INTO domains (name, record) VALUES (?1, ?2)",
                params![d.name.as_str(), record],
            )?;
            Ok(true)
        }
        WriteOp::InsertTriplet { key, state } => Ok(exec(conn,
            "INSERT OR IGNORE INTO greylist (key, state, expires) VALUES (?1, ?2, ?3)",
            params![key, json(state), state.expires as i64],
        )? > 0),
        WriteOp::ReplaceTriplet { key, previous, state } => Ok(exec(conn,
            "UPDATE greylist SET state = ?2, expires = ?3 WHERE key = ?1 AND state = ?4",
            params![key, json(state), state.expires as i64, json(previous)],
        )? > 0),
        WriteOp::PutRecipient { domain, entry } => {
            // Expired verdicts go as new ones are learnt: a cache that only
            // grows with every address a spammer tried would not do.
            exec(conn,
                "DELETE FROM recipient_cache WHERE expires < ?1",
                [entry.learnt_at as i64],
            )?;
            Ok(exec(conn,
                "INSERT OR REPLACE INTO recipient_cache (address, domain, record, expires) VALUES (?1, ?2, ?3, ?4)",
                params![entry.address, domain.as_str(), json(entry), entry.expires as i64],
            )? > 0)
        }
        WriteOp::PutPrimaryState { domain, state } => Ok(exec(conn,
            "INSERT OR REPLACE INTO primary_state (domain, record) VALUES (?1, ?2)",
            params![domain.as_str(), json(state)],
        )? > 0),
        WriteOp::PutClient { network, previous, state } => Ok(match previous {
            None => exec(conn,
                "INSERT OR IGNORE INTO greylist_clients (network, state, expires) VALUES (?1, ?2, ?3)",
                params![network, json(state), state.expires as i64],
            )?,
            Some(prev) => exec(conn,
                "UPDATE greylist_clients SET state = ?2, expires = ?3 WHERE network = ?1 AND state = ?4",
                params![network, json(state), state.expires as i64, json(prev)],
            )?,
        } > 0),
        WriteOp::TakeReleases => Ok(exec(conn, "DELETE FROM queue_releases", [])? > 0),
        WriteOp::SweepGreylist(now) => {
            let a = exec(conn, "DELETE FROM greylist WHERE expires < ?1", [*now as i64])?;
            let b = exec(conn,
                "DELETE FROM greylist_clients WHERE expires < ?1",
                [*now as i64],
            )?;
            Ok(a + b > 0)
        }
        WriteOp::RemoveDomain(name) => {
            Ok(exec(conn, "DELETE FROM domains WHERE name = ?1", [name.as_str()])? > 0)
        }
    }
}

fn json<T: serde::Serialize>(value: &T) -> String {
    // Plain structs with string keys always serialise.
    serde_json::to_string(value).unwrap_or_default()
}

fn decode_domain(name: &str, record: &str) -> Result<Domain, StoreError> {
    serde_json::from_str(record).map_err(|_| StoreError::CorruptDomain(name.to_string()))
}

fn decode_entry(id: &str, record: &str) -> Result<QueueEntry, StoreError> {
    QueueEntry::decode(record.as_bytes()).map_err(|source| StoreError::Corrupt {
        id: id.to_string(),
        source,
    })
}

#[async_trait]
impl DomainRegistry for LocalStore {
    async fn get(&self, name: &DomainName) -> Result<Option<Domain>, StoreError> {
        // Stamp first: a change committed after this point bumps it again.
        let stamp = self.domains_stamp();
        {
            let mut cache = self.domains.lock();
            if cache.stamp != Some(stamp) {
                *cache = DomainCache {
                    stamp: Some(stamp),
                    ..DomainCache::default()
                };
            } else if let Some(hit) = cache.entries.get(name) {
                return Ok(hit.clone());
            }
        }
        let row: Option<String> = self.read_optional(
            "SELECT record FROM domains WHERE name = ?1",
            [name.as_str()],
        )?;
        let domain = row.map(|r| decode_domain(name.as_str(), &r)).transpose()?;
        let mut cache = self.domains.lock();
        if cache.stamp == Some(stamp) {
            if cache.entries.len() >= DOMAIN_CACHE_MAX {
                cache.entries.clear();
            }
            cache.entries.insert(name.clone(), domain.clone());
        }
        Ok(domain)
    }

    async fn list(&self) -> Result<Vec<Domain>, StoreError> {
        let rows: Vec<(String, String)> = self.read(|c| {
            let mut st = c.prepare_cached("SELECT name, record FROM domains ORDER BY name")?;
            let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect()
        })?;
        rows.iter().map(|(n, r)| decode_domain(n, r)).collect()
    }

    async fn put(&self, domain: &Domain) -> Result<(), StoreError> {
        self.write(WriteOp::PutDomain(domain.clone())).await?;
        self.bump_domains_stamp();
        Ok(())
    }

    async fn remove(&self, name: &DomainName) -> Result<bool, StoreError> {
        let removed = self.write(WriteOp::RemoveDomain(name.clone())).await?;
        self.bump_domains_stamp();
        Ok(removed)
    }
}

#[async_trait]
impl MessageStore for LocalStore {
    async fn put(&self, id: &QueueId, body: &[u8]) -> Result<(), StoreError> {
        self.write(WriteOp::PutBody {
            id: id.clone(),
            body: body.to_vec(),
        })
        .await
        .map(|_| ())
    }

    async fn put_file(&self, id: &QueueId, body: &SpooledBody) -> Result<(), StoreError> {
        self.write(WriteOp::PutFile {
            id: id.clone(),
            body: body.clone(),
        })
        .await
        .map(|_| ())
    }

    async fn get(&self, id: &QueueId) -> Result<Option<Vec<u8>>, StoreError> {
        self.read_optional("SELECT body FROM messages WHERE id = ?1", [id.as_str()])
    }

    async fn read_chunk(
        &self,
        id: &QueueId,
        offset: u64,
        max: usize,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        self.read(|c| {
            let Some(rowid) = c
                .prepare_cached("SELECT rowid FROM messages WHERE id = ?1")?
                .query_row([id.as_str()], |r| r.get::<_, i64>(0))
                .optional()?
            else {
                return Ok(None);
            };
            // Only the pages of the piece are read, not the whole blob.
            let blob = c.blob_open(rusqlite::MAIN_DB, "messages", "body", rowid, true)?;
            let len = blob.len() as u64;
            let start = offset.min(len);
            let n = usize::try_from(len - start).unwrap_or(usize::MAX).min(max);
            let mut buf = vec![0u8; n];
            blob.read_at_exact(&mut buf, start as usize)?;
            Ok(Some(buf))
        })
    }

    async fn delete(&self, id: &QueueId) -> Result<(), StoreError> {
        self.write(WriteOp::DeleteBody(id.clone()))
            .await
            .map(|_| ())
    }
}

#[async_trait]
impl DeliveryQueue for LocalStore {
    async fn enqueue(&self, entry: &QueueEntry) -> Result<(), StoreError> {
        self.write(WriteOp::Enqueue(entry.clone()))
            .await
            .map(|_| ())
    }

    async fn get(&self, id: &QueueId) -> Result<Option<QueueEntry>, StoreError> {
        let row: Option<String> =
            self.read_optional("SELECT record FROM queue WHERE id = ?1", [id.as_str()])?;
        row.map(|r| decode_entry(id.as_str(), &r)).transpose()
    }

    async fn list(&self, domain: Option<&DomainName>) -> Result<Vec<QueueEntry>, StoreError> {
        let rows: Vec<(String, String)> = self.read(|c| {
            let mut st = c.prepare_cached("SELECT id, record FROM queue WHERE ?1 IS NULL OR domain = ?1 ORDER BY received_at, id")?;
            let rows = st.query_map([domain.map(DomainName::as_str)], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect()
        })?;
        rows.iter().map(|(id, r)| decode_entry(id, r)).collect()
    }

    async fn scan(
        &self,
        domain: Option<&DomainName>,
        visit: &mut (dyn FnMut(QueueEntry) + Send),
    ) -> Result<(), StoreError> {
        // Pages in key order (the table is clustered on the id), each read
        // under the reader lock on its own, so writers are not held up.
        let mut after = String::new();
        loop {
            let rows: Vec<(String, String)> = self.read(|c| {
                let mut st = c.prepare_cached(
                    "SELECT id, record FROM queue WHERE id > ?1 AND (?2 IS NULL OR domain = ?2) ORDER BY id LIMIT ?3",
                )?;
                let rows = st.query_map(
                    rusqlite::params![after, domain.map(DomainName::as_str), SCAN_PAGE as i64],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )?;
                rows.collect()
            })?;
            let full = rows.len() == SCAN_PAGE;
            for (id, record) in &rows {
                visit(decode_entry(id, record)?);
            }
            match rows.into_iter().next_back() {
                Some((last, _)) if full => after = last,
                _ => return Ok(()),
            }
        }
    }

    async fn remove(&self, id: &QueueId) -> Result<bool, StoreError> {
        self.write(WriteOp::RemoveEntry(id.clone())).await
    }

    async fn depth(&self) -> Result<u64, StoreError> {
        self.read(|c| {
            c.prepare_cached("SELECT COUNT(*) FROM queue")?
                .query_row([], |r| r.get::<_, i64>(0))
        })
        .map(|n| n.max(0) as u64)
    }

    async fn update(&self, entry: &QueueEntry) -> Result<bool, StoreError> {
        self.write(WriteOp::UpdateEntry(entry.clone())).await
    }

    async fn release(&self, domain: Option<&DomainName>, now: u64) -> Result<u64, StoreError> {
        self.write(WriteOp::Release {
            domain: domain.cloned(),
            now,
        })
        .await?;
        self.read(|c| {
            c.prepare_cached("SELECT COUNT(*) FROM queue WHERE ?1 IS NULL OR domain = ?1")?
                .query_row([domain.map(DomainName::as_str)], |r| r.get::<_, i64>(0))
        })
        .map(|n| n.max(0) as u64)
    }
}

#[async_trait]
impl ScheduledQueue for LocalStore {
    async fn reschedule(&self, entry: &QueueEntry) -> Result<bool, StoreError> {
        self.write(WriteOp::Reschedule(entry.clone())).await
    }

    async fn due(&self, now: u64, limit: usize) -> Result<Vec<QueueEntry>, StoreError> {
        let rows: Vec<(String, String)> = self.read(|c| {
            let mut st = c.prepare_cached("SELECT id, record FROM queue WHERE next_attempt <= ?1 ORDER BY received_at, id LIMIT ?2")?;
            let rows = st.query_map(params![now as i64, limit as i64], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect()
        })?;
        rows.iter().map(|(id, r)| decode_entry(id, r)).collect()
    }

    async fn take_releases(&self) -> Result<Vec<Option<DomainName>>, StoreError> {
        let rows: Vec<Option<String>> = self.read(|c| {
            let mut st = c.prepare_cached("SELECT DISTINCT domain FROM queue_releases")?;
            let rows = st.query_map([], |r| r.get(0))?;
            rows.collect()
        })?;
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        self.write(WriteOp::TakeReleases).await?;
        // A name that no longer parses is skipped, never widened to "all".
        Ok(rows
            .into_iter()
            .filter_map(|d| match d {
                None => Some(None),
                Some(d) => DomainName::parse(&d).ok().map(Some),
            })
            .collect())
    }

    async fn defer_domain(&self, domain: &DomainName, until: u64) -> Result<u64, StoreError> {
        self.write(WriteOp::Defer {
            domain: domain.clone(),
            until,
        })
        .await
        .map(u64::from)
    }
}

#[async_trait]
impl Spool for LocalStore {
    /// Bodies and entries in one transaction: nothing is half-stored.
    async fn accept(&self, message: AcceptedMessage) -> Result<Vec<QueueId>, StoreError> {
        let entries = message.queue_entries();
        let ids = entries.iter().map(|e| e.id.clone()).collect();
        self.write(WriteOp::Accept {
            entries,
            body: message.body,
            spooled: message.spooled,
        })
        .await?;
        Ok(ids)
    }
}

#[async_trait]
impl RecipientCache for LocalStore {
    async fn recipient(
        &self,
        address: &str,
        now: u64,
    ) -> Result<Option<CachedRecipient>, StoreError> {
        let row: Option<String> = self.read_optional(
            "SELECT record FROM recipient_cache WHERE address = ?1",
            [address],
        )?;
        let entry: Option<CachedRecipient> = row
            .map(|r| {
                serde_json::from_str(&r).map_err(|_| {
                    StoreError::Invalid(format!("corrupt recipient cache record {address}"))
                })
            })
            .transpose()?;
        Ok(entry.filter(|e| e.expires > now))
    }

    async fn put_recipient(
        &self,
        domain: &DomainName,
        entry: &CachedRecipient,
    ) -> Result<(), StoreError> {
        self.write(WriteOp::PutRecipient {
            domain: domain.clone(),
            entry: entry.clone(),
        })
        .await
        .map(|_| ())
    }

    async fn recipients(
        &self,
        domain: &DomainName,
        now: u64,
    ) -> Result<Vec<CachedRecipient>, StoreError> {
        let rows: Vec<String> = self.read(|c| {
            let mut st = c.prepare_cached(
                "SELECT record FROM recipient_cache WHERE domain = ?1 AND expires > ?2 ORDER BY address",
            )?;
            let rows = st.query_map(params![domain.as_str(), now as i64], |r| r.get(0))?;
            rows.collect()
        })?;
        rows.iter()
            .map(|r| {
                serde_json::from_str(r).map_err(|_| {
                    StoreError::Invalid(format!("corrupt recipient cache record in {domain}"))
                })
            })
            .collect()
    }

    async fn verdict_counts(
        &self,
        domain: &DomainName,
        now: u64,
    ) -> Result<(usize, usize), StoreError> {
        let mut counts = (0, 0);
        let mut corrupt = false;
        self.read(|c| {
            let mut st = c.prepare_cached(
                "SELECT record FROM recipient_cache WHERE domain = ?1 AND expires > ?2",
            )?;
            let mut rows = st.query(params![domain.as_str(), now as i64])?;
            while let Some(row) = rows.next()? {
                let record: String = row.get(0)?;
                match serde_json::from_str::<CachedRecipient>(&record).map(|r| r.verdict) {
                    Ok(crate::verify::Verdict::Valid) => counts.0 += 1,
                    Ok(crate::verify::Verdict::Invalid) => counts.1 += 1,
                    Err(_) => corrupt = true,
                }
            }
            Ok(())
        })?;
        if corrupt {
            return Err(StoreError::Invalid(format!(
                "corrupt recipient cache record in {domain}"
            )));
        }
        Ok(counts)
    }

    async fn primary_state(&self, domain: &DomainName) -> Result<Option<PrimaryState>, StoreError> {
        let row: Option<String> = self.read_optional(
            "SELECT record FROM primary_state WHERE domain = ?1",
            [domain.as_str()],
        )?;
        row.map(|r| {
            serde_json::from_str(&r)
                .map_err(|_| StoreError::Invalid(format!("corrupt primary state of {domain}")))
        })
        .transpose()
    }

    async fn put_primary_state(
        &self,
        domain: &DomainName,
        state: &PrimaryState,
    ) -> Result<(), StoreError> {
        self.write(WriteOp::PutPrimaryState {
            domain: domain.clone(),
            state: *state,
        })
        .await
        .map(|_| ())
    }
}

#[async_trait]
impl GreylistStore for LocalStore {
    async fn triplet(&self, key: &str) -> Result<Option<TripletState>, StoreError> {
        let row: Option<String> =
            self.read_optional("SELECT state FROM greylist WHERE key = ?1", [key])?;
        row.map(|r| {
            serde_json::from_str(&r)
                .map_err(|_| StoreError::Invalid(format!("corrupt greylist record {key}")))
        })
        .transpose()
    }

    async fn insert_triplet(&self, key: &str, state: &TripletState) -> Result<bool, StoreError> {
        self.write(WriteOp::InsertTriplet {
            key: key.to_string(),
            state: *state,
        })
        .await
    }

    async fn replace_triplet(
        &self,
        key: &str,
        previous: &TripletState,
        state: &TripletState,
    ) -> Result<bool, StoreError> {
        self.write(WriteOp::ReplaceTriplet {
            key: key.to_string(),
            previous: *previous,
            state: *state,
        })
        .await
    }

    async fn client(&self, network: &str) -> Result<Option<ClientState>, StoreError> {
        let row: Option<String> = self.read_optional(
            "SELECT state FROM greylist_clients WHERE network = ?1",
            [network],
        )?;
        row.map(|r| {
            serde_json::from_str(&r).map_err(|_| {
                StoreError::Invalid(format!("corrupt greylist client record {network}"))
            })
        })
        .transpose()
    }

    async fn put_client(
        &self,
        network: &str,
        previous: Option<&ClientState>,
        state: &ClientState,
    ) -> Result<bool, StoreError> {
        self.write(WriteOp::PutClient {
            network: network.to_string(),
            previous: previous.copied(),
            state: *state,
        })
        .await
    }

    async fn sweep(&self, now: u64) -> Result<(), StoreError> {
        self.write(WriteOp::SweepGreylist(now)).await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::contract::message;

    /// A delivered backlog's pages stay in the file as free pages, and the
    /// store reports them (the floor counts them as free space).
    #[tokio::test]
    async fn a_drained_backlog_is_reported_as_free_space_inside() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).unwrap();
        let mut ids = Vec::new();
        for _ in 0..20 {
            let mut m = message(&["a@one.test"]);
            m.body = vec![b'x'; 20_000];
            ids.push(m.id.clone());
            store.accept(m).await.unwrap();
        }
        let before = store.space_inside().unwrap();
        for id in &ids {
            DeliveryQueue::remove(&store, id).await.unwrap();
        }
        // A checkpoint writes the freed pages' state into the file.
        store
            .read(|c| c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(())))
            .unwrap();
        let after = store.space_inside().unwrap();
        assert!(after.free_bytes >= 300_000, "{before:?} -> {after:?}");
        assert!(after.file_bytes >= after.free_bytes);
    }

    /// A scan crosses page boundaries without losing or repeating an
    /// entry, with and without a domain filter.
    #[tokio::test]
    async fn a_scan_reads_every_entry_once_page_by_page() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).unwrap();
        let n = SCAN_PAGE * 2 + 7;
        let mut other = 0;
        for i in 0..n {
            let rcpt = if i % 3 == 0 {
                "a@two.test"
            } else {
                "a@one.test"
            };
            other += usize::from(i % 3 == 0);
            store.accept(message(&[rcpt])).await.unwrap();
        }
        let mut seen = std::collections::HashSet::new();
        let mut visits = 0;
        store
            .scan(None, &mut |e| {
                visits += 1;
                seen.insert(e.id);
            })
            .await
            .unwrap();
        assert_eq!((visits, seen.len()), (n, n));
        let two = DomainName::parse("two.test").unwrap();
        let mut only_two = 0;
        store
            .scan(Some(&two), &mut |e| {
                assert_eq!(e.domain, two);
                only_two += 1;
            })
            .await
            .unwrap();
        assert_eq!(only_two, other);
    }

    /// The runtime-thread commit path (one store per process can use it, so
    /// one test covers it): concurrent sessions on runtime threads, a thread
    /// outside the runtime, and a runtime that stays busy so that the
    /// writer thread has to commit what was queued.
    #[test]
    fn runtime_threads_commit_their_own_writes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(LocalStore::open(dir.path()).unwrap());
        store.commit_on_runtime_threads();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .on_thread_park(commit_pending)
            .build()
            .unwrap();

        // 200 sessions at once, each accepting one message.
        let accepted = runtime.block_on(async {
            let sessions: Vec<_> = (0..200)
                .map(|_| {
                    let store = store.clone();
                    tokio::spawn(async move {
                        let m = message(&["a@one.test"]);
                        store.accept(m.clone()).await.unwrap();
                        m.id
                    })
                })
                .collect();
            let mut ids = Vec::new();
            for s in sessions {
                ids.push(s.await.unwrap());
            }
            ids
        });
        assert_eq!(accepted.len(), 200);
        assert!(
            !CALLS_HOOK.with(std::cell::Cell::get),
            "the test's own thread is not a runtime worker"
        );
        // Every one committed, seen by a connection of its own.
        let check = Connection::open(dir.path().join(DB_FILE)).unwrap();
        let count: i64 = check
            .query_row("SELECT count(*) FROM queue", [], |r| r.get(0))
            .unwrap();
        assert_eq!(count, 200);

        // A thread that is not the runtime's goes through the writer thread.
        let m = message(&["b@one.test"]);
        let outside = runtime.block_on(store.accept(m));
        assert!(outside.is_ok());

        // A worker that never parks: after one write is queued, the only
        // worker blocks; the writer thread commits the write by itself.
        let path = dir.path().join(DB_FILE);
        let m = message(&["c@one.test"]);
        let id = m.id.clone();
        let seen_while_busy = std::thread::scope(|scope| {
            let h = scope.spawn(|| {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .on_thread_park(commit_pending)
                    .build()
                    .unwrap();
                rt.block_on(async {
                    // Parks once (a timer), so this thread counts as one
                    // that runs the hook.
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    let store = store.clone();
                    let write = tokio::spawn(async move { store.accept(m).await });
                    // Let the write queue itself, then never park again
                    // until the database shows it.
                    tokio::task::yield_now().await;
                    let check = Connection::open(&path).unwrap();
                    let deadline = Instant::now() + Duration::from_secs(10);
                    let mut seen = false;
                    while Instant::now() < deadline && !seen {
                        seen = check
                            .query_row(
                                "SELECT count(*) FROM queue WHERE id = ?1",
                                [id.as_str()],
                                |r| r.get::<_, i64>(0),
                            )
                            .unwrap()
                            == 1;
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    write.await.unwrap().unwrap();
                    seen
                })
            });
            h.join().unwrap()
        });
        assert!(seen_while_busy, "a queued write waited for a busy runtime");
    }
}
