//! The schema and the statements every write runs.

use super::*;

pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS domains (name TEXT PRIMARY KEY, record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS messages (id TEXT PRIMARY KEY, body BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS queue (
    id TEXT PRIMARY KEY,
    domain TEXT NOT NULL,
    next_attempt INTEGER NOT NULL,
    received_at INTEGER NOT NULL,
    record TEXT NOT NULL
) WITHOUT ROWID;
-- Due entries in the order the worker takes them (earliest due, then
-- oldest): `due` reads its batch off the index and stops, where an order
-- the index does not give sorted every due entry on each call (after a
-- flush of 100 000, quadratic; docs/BENCHMARKS.md). It replaces
-- `queue_due`, on `next_attempt` alone.
CREATE INDEX IF NOT EXISTS queue_due_received ON queue(next_attempt, received_at);
DROP INDEX IF EXISTS queue_due;
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
-- TLS reports (RFC 8460): session counts per UTC day, and the reports sent.
CREATE TABLE IF NOT EXISTS tlsrpt_sessions (
    day INTEGER NOT NULL, domain TEXT NOT NULL, policy TEXT NOT NULL, mx TEXT NOT NULL,
    ip TEXT NOT NULL, result TEXT NOT NULL, count INTEGER NOT NULL,
    PRIMARY KEY (day, domain, policy, mx, ip, result)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tlsrpt_sent (day INTEGER NOT NULL, domain TEXT NOT NULL, PRIMARY KEY (day, domain)) WITHOUT ROWID;
";

/// Days of TLS report counters kept (reports go out the next day).
const TLSRPT_KEEP_DAYS: u64 = 8;

/// Runs one statement through the connection's statement cache: the writer
/// runs the same few statements thousands of times a second.
pub(super) fn exec(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
) -> rusqlite::Result<usize> {
    conn.prepare_cached(sql)?.execute(params)
}

pub(super) fn insert_entry(conn: &Connection, entry: &QueueEntry) -> rusqlite::Result<()> {
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
pub(super) fn insert_body_from_file(
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
    let mut buf = vec![0u8; crate::store::BODY_CHUNK];
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

pub(super) fn apply(conn: &Connection, op: &WriteOp) -> rusqlite::Result<bool> {
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
                history::count_accepted(conn, entry)?;
            }
            Ok(true)
        }
        WriteOp::History(op) => history::apply(conn, op),
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
        WriteOp::MarkDelayWarned(id) => Ok(exec(conn,
            "UPDATE queue SET record = json_set(record, '$.delay_warned', json('true')) WHERE id = ?1",
            [id.as_str()],
        )? > 0),
        WriteOp::CountTlsSession { day, domain, outcome } => Ok(exec(conn,
            "INSERT INTO tlsrpt_sessions (day, domain, policy, mx, ip, result, count) VALUES (?1, ?2, ?3, ?4, ?5, ?6, 1)
             ON CONFLICT DO UPDATE SET count = count + 1",
            params![*day as i64, domain.as_str(), outcome.policy.as_str(), outcome.mx_host,
                outcome.receiving_ip, outcome.result_name()],
        )? > 0),
        WriteOp::ClaimTlsReport { day, domain } => {
            let old = day.saturating_sub(TLSRPT_KEEP_DAYS) as i64;
            exec(conn, "DELETE FROM tlsrpt_sessions WHERE day < ?1", [old])?;
            exec(conn, "DELETE FROM tlsrpt_sent WHERE day < ?1", [old])?;
            Ok(exec(conn,
                "INSERT OR IGNORE INTO tlsrpt_sent (day, domain) VALUES (?1, ?2)",
                params![*day as i64, domain.as_str()],
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

pub(super) fn json<T: serde::Serialize>(value: &T) -> String {
    // Plain structs with string keys always serialise.
    serde_json::to_string(value).unwrap_or_default()
}

pub(super) fn decode_domain(name: &str, record: &str) -> Result<Domain, StoreError> {
    serde_json::from_str(record).map_err(|_| StoreError::CorruptDomain(name.to_string()))
}

pub(super) fn decode_entry(id: &str, record: &str) -> Result<QueueEntry, StoreError> {
    QueueEntry::decode(record.as_bytes()).map_err(|source| StoreError::Corrupt {
        id: id.to_string(),
        source,
    })
}
