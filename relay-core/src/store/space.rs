//! The data directory's file modes and disk space.
//!
//! Queued mail is other people's mail: the directory is `0700` and every
//! file in it `0600`, whatever the umask, and wider modes found at start
//! are narrowed with a warning.
//!
//! Disk space is watched from two sides, as Postfix does with
//! `queue_minfree`: new mail is refused (`452 4.3.1` at MAIL) while free
//! space is below a floor, and a reserve file of preallocated space is kept
//! beside the database. When the disk fills up anyway (another process
//! filled it), the writer gives the reserve up so that bookkeeping (a
//! delivered message removed, an entry updated, `queue delete`) still
//! commits; it is taken again once space is back.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Mode of the data directory.
pub const DIR_MODE: u32 = 0o700;
/// Mode of every file in it.
pub const FILE_MODE: u32 = 0o600;

/// Name of the reserve file inside the data directory.
pub const RESERVE_FILE: &str = "reserve.space";

/// Creates the data directory (`0700`) if needed and narrows the modes of
/// the directory and the files in it to `0700`/`0600`, logging each repair.
pub fn prepare_data_dir(dir: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)?;
    narrow_mode(dir, DIR_MODE)?;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            narrow_mode(&entry.path(), FILE_MODE)?;
        }
    }
    Ok(())
}

fn narrow_mode(path: &Path, wanted: u32) -> io::Result<()> {
    let mode = fs::metadata(path)?.permissions().mode() & 0o7777;
    if mode & !wanted != 0 {
        fs::set_permissions(path, fs::Permissions::from_mode(wanted))?;
        tracing::warn!(
            event = "permissions_repaired", path = %path.display(),
            was = format!("{mode:o}"), now = format!("{wanted:o}"),
            "queued mail must not be readable by other users"
        );
    }
    Ok(())
}

/// Opens (creating with mode `0600`) a file in the data directory.
pub fn open_private(path: &Path, append: bool) -> io::Result<fs::File> {
    fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(append)
        .mode(FILE_MODE)
        .open(path)
}

/// Bytes available to an unprivileged writer on the filesystem of `path`.
pub fn free_bytes(path: &Path) -> io::Result<u64> {
    let st = rustix::fs::statvfs(path)?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Reports the bytes the store adds to the filesystem's free space (its
/// free pages; negative for room it has promised, such as a WAL not yet
/// copied into the database). It must ask the store's own connection:
/// opening and closing the database file elsewhere in the process would
/// drop SQLite's POSIX locks on it.
pub type StoreFreeBytes = Box<dyn Fn() -> i64 + Send + Sync>;

/// Within this much (plus twice the floor) of the floor, [`FreeSpace`]
/// reads on every call.
const NEAR_FLOOR: u64 = 16 << 20;

/// How often [`FreeSpace`] asks the filesystem: a `statvfs` per MAIL would
/// be cheap, but one every 250 ms is enough to see a disk fill.
const FREE_SPACE_REFRESH: Duration = Duration::from_millis(250);

/// Free space of the data directory's filesystem, read at most every
/// 250 ms however many sessions ask. Pages a drained backlog left free
/// inside the store's database count as free: SQLite reuses them for new
/// mail before it grows the file, and without them a backlog once drained
/// would hold the floor down for good (its pages stay in the file).
pub struct FreeSpace {
    dir: PathBuf,
    /// Free bytes inside the store (its database's free pages), if any.
    store_free: Option<StoreFreeBytes>,
    /// The reserve's size: while it is given up, that much of the free
    /// space is bookkeeping's, not new mail's.
    reserve: u64,
    /// The floor below which new mail is refused.
    pub min_free: u64,
    started: Instant,
    /// Milliseconds since `started` of the last read, and its result.
    read_at: AtomicU64,
    bytes: AtomicU64,
}

impl std::fmt::Debug for FreeSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FreeSpace")
            .field("dir", &self.dir)
            .field("min_free", &self.min_free)
            .finish_non_exhaustive()
    }
}

impl FreeSpace {
    pub fn new(dir: &Path, min_free: u64) -> Self {
        FreeSpace {
            dir: dir.to_path_buf(),
            store_free: None,
            reserve: 0,
            min_free,
            started: Instant::now(),
            read_at: AtomicU64::new(u64::MAX),
            bytes: AtomicU64::new(u64::MAX),
        }
    }

    /// Keeps a given-up reserve of `size` bytes out of new mail's reach.
    pub fn with_reserve(mut self, size: u64) -> Self {
        self.reserve = size;
        self
    }

    /// Adds what `inside` reports (the store's free pages, less its WAL).
    pub fn with_store_free(mut self, inside: StoreFreeBytes) -> Self {
        self.store_free = Some(inside);
        self
    }

    /// Free bytes now (an unreadable filesystem counts as having room:
    /// the store's own write errors then decide), including the store's
    /// free pages.
    pub fn available(&self) -> u64 {
        let now = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let last = self.read_at.load(Ordering::Relaxed);
        let refresh = FREE_SPACE_REFRESH.as_millis() as u64;
        // Near the floor every caller reads afresh: a quarter second of
        // fast mail could otherwise run past a small floor and leave no
        // room to copy the WAL into the database.
        let near_floor = self.bytes.load(Ordering::Relaxed)
            < self.min_free.saturating_mul(2).saturating_add(NEAR_FLOOR);
        if last == u64::MAX || near_floor || now.saturating_sub(last) >= refresh {
            let disk = free_bytes(&self.dir).unwrap_or(u64::MAX);
            let inside = self.store_free.as_ref().map_or(0, |f| f());
            metrics::gauge!("backupmx_disk_free_bytes").set(disk as f64);
            let given_up =
                if self.reserve > 0 && !Reserve::new(&self.dir, self.reserve, 0).is_held() {
                    self.reserve
                } else {
                    0
                };
            let bytes = if disk == u64::MAX {
                disk
            } else {
                u64::try_from(i128::from(disk) + i128::from(inside) - i128::from(given_up))
                    .unwrap_or(0)
            };
            self.bytes.store(bytes, Ordering::Relaxed);
            self.read_at.store(now, Ordering::Relaxed);
        }
        self.bytes.load(Ordering::Relaxed)
    }

    /// Whether a message of `size` bytes (0 when unknown) fits above the floor.
    pub fn room_for(&self, size: u64) -> bool {
        self.available() >= self.min_free.saturating_add(size)
    }
}

/// Preallocated space the store can give up when the disk is full.
#[derive(Debug)]
pub struct Reserve {
    path: PathBuf,
    size: u64,
    /// Free space needed, besides the reserve itself, before it is taken
    /// again (so it is not taken back from mail about to be accepted).
    min_free: u64,
    last_check: Option<Instant>,
}

/// How often the writer checks whether a released reserve can be taken back.
const RESERVE_RECHECK: Duration = Duration::from_secs(5);

impl Reserve {
    /// The reserve of `dir`; `size` 0 turns it off.
    pub fn new(dir: &Path, size: u64, min_free: u64) -> Self {
        Reserve {
            path: dir.join(RESERVE_FILE),
            size,
            min_free,
            last_check: None,
        }
    }

    /// Whether the filesystem's free space is below the floor
    /// (`min_free_space`); an unreadable filesystem is not.
    pub fn below_floor(&self) -> bool {
        free_bytes(self.path.parent().unwrap_or(Path::new(".")))
            .is_ok_and(|free| free < self.min_free)
    }

    /// Whether the reserve file exists with its full size.
    pub fn is_held(&self) -> bool {
        self.size > 0
            && fs::metadata(&self.path).is_ok_and(|m| {
                use std::os::unix::fs::MetadataExt;
                m.blocks() * 512 >= self.size
            })
    }

    /// Creates the reserve file if it is missing and there is room.
    pub fn take(&mut self) -> io::Result<()> {
        self.last_check = Some(Instant::now());
        if self.size == 0 || self.is_held() {
            return Ok(());
        }
        let free = free_bytes(self.path.parent().unwrap_or(Path::new(".")))?;
        if free < self.size.saturating_add(self.min_free) {
            return Err(io::Error::new(
                io::ErrorKind::StorageFull,
                format!(
                    "{free} bytes free, the reserve needs {} more than the floor",
                    self.size
                ),
            ));
        }
        let file = open_private(&self.path, false)?;
        let allocated =
            rustix::fs::fallocate(&file, rustix::fs::FallocateFlags::empty(), 0, self.size);
        if let Err(e) = allocated {
            if e != rustix::io::Errno::OPNOTSUPP {
                let _ = fs::remove_file(&self.path);
                return Err(e.into());
            }
            // No fallocate (some filesystems): write the zeros.
            use std::io::Write;
            let mut file = file;
            let zeros = vec![0u8; 1 << 20];
            let mut left = self.size;
            while left > 0 {
                let n = left.min(zeros.len() as u64) as usize;
                if let Err(e) = file.write_all(&zeros[..n]) {
                    let _ = fs::remove_file(&self.path);
                    return Err(e);
                }
                left -= n as u64;
            }
            file.sync_all()?;
        }
        tracing::debug!(event = "storage_reserve_held", path = %self.path.display(), bytes = self.size);
        Ok(())
    }

    /// Gives the reserve up; returns whether there was one to give.
    pub fn release(&mut self) -> bool {
        if self.size == 0 || fs::remove_file(&self.path).is_err() {
            return false;
        }
        self.last_check = Some(Instant::now());
        metrics::counter!("backupmx_storage_reserve_released_total").increment(1);
        tracing::error!(
            event = "storage_reserve_released", path = %self.path.display(), bytes = self.size,
            "the disk is full: using the reserve for queue bookkeeping; free space on it"
        );
        true
    }

    /// After a commit: takes a released reserve back when space returned
    /// (checked at most every few seconds).
    pub fn maintain(&mut self) {
        if self.size == 0
            || self
                .last_check
                .is_some_and(|t| t.elapsed() < RESERVE_RECHECK)
        {
            return;
        }
        self.last_check = Some(Instant::now());
        if !self.is_held() {
            let _ = self.take();
        }
    }
}

/// Name of the lock file a server holds in the data directory.
pub const LOCK_FILE: &str = "server.lock";

/// An exclusive lock on a data directory, held by a running server for as
/// long as this value lives: two servers on one data directory would
/// deliver the same queue twice and remove each other's spool files.
/// Admin commands do not take it (they work alongside a server).
#[derive(Debug)]
pub struct DataDirLock {
    _file: fs::File,
}

impl DataDirLock {
    /// Takes the lock or says who holds it.
    pub fn take(dir: &Path) -> io::Result<DataDirLock> {
        use std::io::{Read, Seek, Write};
        let path = dir.join(LOCK_FILE);
        let mut file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .mode(FILE_MODE)
            .open(&path)?;
        if let Err(e) =
            rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive)
        {
            if e == rustix::io::Errno::WOULDBLOCK {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                let who = if holder.is_empty() {
                    "another process".to_string()
                } else {
                    format!("another backupmx (pid {holder})")
                };
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!(
                        "{who} is already serving the data directory {} (lock {}); give each server its own storage.data_dir",
                        dir.display(),
                        path.display()
                    ),
                ));
            }
            return Err(e.into());
        }
        file.set_len(0)?;
        file.seek(io::SeekFrom::Start(0))?;
        write!(file, "{}", std::process::id())?;
        Ok(DataDirLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_dir_and_files_are_made_private() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).unwrap();
        let file = dir.join("backupmx.db");
        fs::write(&file, b"x").unwrap();
        fs::set_permissions(&file, fs::Permissions::from_mode(0o644)).unwrap();
        prepare_data_dir(&dir).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&file), 0o600);
        let created = tmp.path().join("new/deeper");
        prepare_data_dir(&created).unwrap();
        assert_eq!(mode(&created), 0o700);
    }

    #[test]
    fn reserve_is_taken_released_and_taken_again() {
        let tmp = tempfile::tempdir().unwrap();
        let mut reserve = Reserve::new(tmp.path(), 1 << 20, 0);
        reserve.take().unwrap();
        assert!(reserve.is_held());
        let mode = fs::metadata(tmp.path().join(RESERVE_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(reserve.release());
        assert!(!reserve.is_held());
        assert!(!reserve.release(), "nothing left to release");
        reserve.last_check = None;
        reserve.maintain();
        assert!(reserve.is_held());
        assert!(!Reserve::new(tmp.path(), 0, 0).release(), "size 0 is off");
    }

    #[test]
    fn a_data_directory_has_one_server_at_a_time() {
        let tmp = tempfile::tempdir().unwrap();
        let first = DataDirLock::take(tmp.path()).unwrap();
        let err = DataDirLock::take(tmp.path()).unwrap_err();
        assert!(
            err.to_string()
                .contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        drop(first);
        DataDirLock::take(tmp.path()).unwrap();
    }

    #[test]
    fn free_space_floor() {
        let tmp = tempfile::tempdir().unwrap();
        assert!(FreeSpace::new(tmp.path(), 0).room_for(1));
        assert!(!FreeSpace::new(tmp.path(), u64::MAX / 2).room_for(0));
    }
}
