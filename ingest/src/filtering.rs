//! The content filter's place in a session: after the data is in, before
//! the store (relay_core::filter has the protocol). Whatever rspamd says
//! or fails to say, one log line and one metric, and either the message
//! goes on to the store (with rspamd's header changes) or the client gets
//! the refusal as the reply to its data.

use std::time::Duration;

use relay_core::filter::{decide, decide_on_error, Body, Decision, Envelope, HeaderEdits, Rspamd};
use relay_core::queue::AcceptedMessage;
use relay_core::smtp::Reply;

/// How often a filter failure is logged at most (each is counted).
const ERROR_LOG_EVERY: Duration = Duration::from_secs(60);

/// Scans `message`; `Err` is the refusal to send. On acceptance the
/// message carries rspamd's header changes.
pub(crate) async fn scan(rspamd: &Rspamd, message: &mut AcceptedMessage) -> Result<(), Reply> {
    let envelope = Envelope {
        client_ip: message.client_ip,
        helo: message.helo.clone(),
        hostname: None,
        sender: message.sender.clone(),
        recipients: message
            .recipients
            .iter()
            .map(|r| r.address.clone())
            .collect(),
        queue_id: message.id.to_string(),
    };
    // RFC 5321 §4.5.1: mail to postmaster is never refused.
    let never_refuse = message.recipients.iter().any(|r| {
        r.address
            .rsplit_once('@')
            .is_some_and(|(local, _)| local.eq_ignore_ascii_case("postmaster"))
    });
    // An in-memory body is shared with the request, then taken back.
    let memory = bytes::Bytes::from(std::mem::take(&mut message.body));
    let body = match &message.spooled {
        Some(s) => Body::File {
            path: s.path.clone(),
            len: s.len,
        },
        None => Body::Memory(memory.clone()),
    };
    let (result, took) = rspamd.scan(&envelope, body).await;
    message.body = Vec::from(memory);
    metrics::histogram!("backupmx_filter_seconds").record(took.as_secs_f64());
    let decision = match result {
        Ok(reply) => {
            metrics::counter!("backupmx_filter_results_total", "action" => reply.action.label().to_string())
                .increment(1);
            tracing::info!(event = "filter_result", queue_id = %message.id, action = reply.action.label(),
                score = reply.score, required = reply.required_score, seconds = took.as_secs_f64(),
                rspamd_seconds = reply.time_real.unwrap_or_default());
            decide(&reply, never_refuse)
        }
        Err(e) => {
            metrics::counter!("backupmx_filter_errors_total", "reason" => e.reason()).increment(1);
            if log_error_now() {
                tracing::warn!(event = "filter_failed", queue_id = %message.id, reason = e.reason(),
                    on_error = ?rspamd.settings().on_error, error = %relay_core::error::Report(&e),
                    "content filter failed (logged at most once a minute; backupmx_filter_errors_total counts each)");
            }
            decide_on_error(rspamd.settings().on_error)
        }
    };
    match decision {
        Decision::Refuse(reply) => Err(reply),
        Decision::Accept(edits) if edits.is_empty() => Ok(()),
        Decision::Accept(edits) => {
            if let Err(e) = apply(message, &edits).await {
                // The headers are a courtesy: the message is kept as it came.
                tracing::warn!(event = "filter_headers_not_applied", queue_id = %message.id, error = %e);
            }
            Ok(())
        }
    }
}

/// Whether a failure is logged now (once per [`ERROR_LOG_EVERY`]).
fn log_error_now() -> bool {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = relay_core::time::unix_seconds(std::time::SystemTime::now());
    let last = LAST.load(Ordering::Relaxed);
    now >= last + ERROR_LOG_EVERY.as_secs()
        && LAST
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
}

/// Applies header changes to the message in memory, or to its spool file.
async fn apply(message: &mut AcceptedMessage, edits: &HeaderEdits) -> std::io::Result<()> {
    let edits = edits.clone();
    edit_header_section(message, move |head| {
        relay_core::filter::headers::apply(head, &edits)
    })
    .await
}

/// Replaces the message's header section (its empty line included) with
/// what `edit` makes of it, in memory or in its spool file (rewritten
/// beside it and renamed over it). The body is never touched.
pub(crate) async fn edit_header_section(
    message: &mut AcceptedMessage,
    edit: impl FnOnce(&[u8]) -> Vec<u8> + Send + 'static,
) -> std::io::Result<()> {
    use relay_core::filter::headers;
    match &mut message.spooled {
        None => {
            // Without an empty line the whole message is header.
            let split = headers::header_section(&message.body).len();
            let mut edited = edit(&message.body[..split]);
            edited.extend_from_slice(&message.body[split..]);
            message.body = edited;
            Ok(())
        }
        Some(spooled) => {
            let path = spooled.path.clone();
            let len = tokio::task::spawn_blocking(move || rewrite_file(&path, edit))
                .await
                .map_err(std::io::Error::other)??;
            spooled.len = len;
            Ok(())
        }
    }
}

/// The header of a big message is in its first 256 KiB or not edited.
const HEAD_LIMIT: usize = 256 * 1024;

fn rewrite_file(
    path: &std::path::Path,
    edit: impl FnOnce(&[u8]) -> Vec<u8>,
) -> std::io::Result<u64> {
    use std::io::{Read, Seek, Write};
    let mut file = std::fs::File::open(path)?;
    let mut start = vec![0u8; HEAD_LIMIT];
    let mut filled = 0;
    while filled < start.len() {
        let n = file.read(&mut start[filled..])?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    start.truncate(filled);
    let head_len = relay_core::filter::headers::header_section(&start).len();
    if head_len == start.len() {
        return Err(std::io::Error::other(
            "no end of header in the first 256 KiB of the message",
        ));
    }
    let edited = edit(&start[..head_len]);
    let part = path.with_extension("filtered");
    let mut out = std::fs::File::create(&part)?;
    out.write_all(&edited)?;
    file.seek(std::io::SeekFrom::Start(head_len as u64))?;
    std::io::copy(&mut file, &mut out)?;
    out.sync_data()?;
    let len = out.metadata()?.len();
    std::fs::rename(&part, path)?;
    Ok(len)
}
