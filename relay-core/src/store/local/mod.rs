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
    StoreError, TlsReportStore,
};
use crate::address::DomainName;
use crate::domain::Domain;
use crate::greylist::{ClientState, GreylistStore, TripletState};
use crate::queue::{AcceptedMessage, QueueEntry, QueueId, SpooledBody};
use crate::verify::{CachedRecipient, PrimaryState};

mod bodies;
mod cache;
mod commit;
mod domains;
mod greylist;
mod history;
mod queue;
mod sql;
mod tlsrpt;

pub use commit::commit_pending;
use commit::*;
use sql::*;

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
            .and_then(|()| writer_conn.execute_batch(history::SCHEMA))
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
