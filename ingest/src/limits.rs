//! Process limits: open files.
//!
//! Distributions start services with a soft `RLIMIT_NOFILE` of 1 024 and a
//! far higher hard limit. A mail server with 10 000 allowed connections must
//! raise the soft limit itself, and must not promise more connections than
//! it has descriptors for: past that, `accept` fails and clients wait with
//! no greeting at all.

use relay_core::config::{Backend, Config};
use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};

/// Descriptors kept for everything that is not an SMTP session: the
/// database and its WAL, listeners, DNS and metrics sockets, the CLI.
const OTHER_FILES: u64 = 64;

/// Raises the soft open-files limit to the hard one (logging both) and
/// returns how many SMTP sessions fit: `smtp.max_connections`, lowered
/// when the limit cannot hold them besides outgoing delivery connections.
pub(crate) fn raise_open_files(config: &Config) -> usize {
    let before = getrlimit(Resource::Nofile);
    let mut soft = before.current;
    if before.current < before.maximum {
        match setrlimit(
            Resource::Nofile,
            Rlimit {
                current: before.maximum,
                maximum: before.maximum,
            },
        ) {
            Ok(()) => soft = before.maximum,
            Err(e) => {
                tracing::warn!(event = "open_files_limit_not_raised", error = %relay_core::error::Report(&e))
            }
        }
    }
    let show = |v: Option<u64>| v.map_or_else(|| "unlimited".to_string(), |n| n.to_string());
    tracing::info!(
        event = "open_files_limit",
        soft_before = %show(before.current),
        soft = %show(soft),
        hard = %show(before.maximum)
    );
    let configured = config.smtp.max_connections;
    let Some(soft) = soft else {
        return configured;
    };
    let delivery = if config.storage.backend == Backend::Local {
        config.delivery.max_connections as u64
    } else {
        0
    };
    let fit = usize::try_from(soft.saturating_sub(OTHER_FILES + delivery))
        .unwrap_or(usize::MAX)
        .max(1);
    if fit < configured {
        tracing::warn!(
            event = "max_connections_lowered",
            configured,
            now = fit,
            open_files_limit = soft,
            "smtp.max_connections does not fit the open-files limit; raise the hard limit (LimitNOFILE=) to allow more"
        );
        return fit;
    }
    configured
}
