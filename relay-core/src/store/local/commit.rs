//! Group commit: the writer's batches, the runtime threads' own commits,
//! the checkpointer, and which writes may use the disk reserve.

use super::*;

pub(super) enum WriteOp {
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
    MarkDelayWarned(QueueId),
    CountTlsSession {
        day: u64,
        domain: DomainName,
        outcome: crate::tlsrpt::SessionOutcome,
    },
    ClaimTlsReport {
        day: u64,
        domain: DomainName,
    },
    TakeReleases,
    RemoveDomain(DomainName),
    History(history::HistoryOp),
}

pub(super) struct WriteJob {
    pub(super) op: WriteOp,
    pub(super) done: oneshot::Sender<Result<bool, StoreError>>,
}

/// The writer's connection and what each commit maintains.
pub(super) struct Committer {
    pub(super) conn: Connection,
    pub(super) reserve: space::Reserve,
    pub(super) checkpoint: mpsc::SyncSender<()>,
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
pub(super) struct Queued {
    pub(super) jobs: Vec<WriteJob>,
    /// When the oldest of them was queued.
    pub(super) since: Option<Instant>,
}

/// What every committing thread shares: the one connection that writes,
/// and the requests runtime threads queued for whoever commits next.
pub(super) struct WriterSide {
    pub(super) committer: std::sync::Mutex<Committer>,
    pub(super) queued: std::sync::Mutex<Queued>,
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
pub(super) const QUEUED_MAX_WAIT: Duration = Duration::from_millis(20);

pub(super) fn writer_loop(side: &WriterSide, rx: &mpsc::Receiver<WriteJob>) {
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
pub(super) const INLINE_BODY_MAX: usize = 32 * 1024;

/// The store whose writes the runtime's threads commit (one per process).
pub(super) static ON_RUNTIME_THREADS: std::sync::OnceLock<Arc<WriterSide>> =
    std::sync::OnceLock::new();

thread_local! {
    /// Set on a thread once it has called [`commit_pending`]: its runtime
    /// runs the hook, so its requests can wait for it.
    pub(super) static CALLS_HOOK: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
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
pub(super) fn restart_wal(conn: &Connection) {
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
pub(super) fn checkpoint_loop(conn: &Connection, nudged: &mpsc::Receiver<()>) {
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
pub(super) fn commit_batch(
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
pub(super) fn commit_one(
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

pub(super) fn is_disk_full(e: &rusqlite::Error) -> bool {
    e.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull)
}

/// Writes that only move a schedule: losing one repeats a harmless attempt
/// early ([`ScheduledQueue::reschedule`], a deferred domain).
pub(super) fn schedule_only(op: &WriteOp) -> bool {
    matches!(op, WriteOp::Reschedule(_) | WriteOp::Defer { .. })
}

/// Requests that keep the queue true to what happened (an outcome, a
/// deletion, a release) rather than bring new data in: these may use the
/// reserve, new mail may not. Nor may a schedule change that losing only
/// makes a harmless attempt come early (a reschedule, a deferred domain):
/// the reserve is kept for delivered recipients' records and deletions.
pub(super) fn frees_or_tracks(op: &WriteOp) -> bool {
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
                | WriteOp::CountTlsSession { .. }
                | WriteOp::History(_)
        )
}
