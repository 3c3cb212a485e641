//! What an attempt to a hosted domain tells its outage history: whether
//! its primary answered, and what became of each attempted message.

use std::sync::Arc;
use std::time::SystemTime;

use super::{AttemptReport, Engine};
use crate::address::DomainName;
use crate::queue::QueueEntry;
use crate::time::unix_seconds;

/// What the attempt saw of the primary.
pub(super) struct Seen {
    /// The domain is hosted here (others have no history).
    hosted: bool,
    /// No next hop answered at all.
    down: bool,
    /// A mail transaction started.
    answered: bool,
}

impl Seen {
    pub(super) fn new(hosted: bool, down: bool, answered: bool) -> Seen {
        Seen {
            hosted,
            down,
            answered,
        }
    }
}

impl Engine {
    /// Attempts to hosted domains record their primaries' outages and
    /// what becomes of their mail in `recorder`.
    pub fn with_history(mut self, recorder: Option<Arc<crate::outages::Recorder>>) -> Self {
        self.history = recorder;
        self
    }

    /// Hands an attempt's observations to the history recorder, if any.
    pub(super) async fn record_history(
        &self,
        domain: &DomainName,
        seen: Seen,
        before: &[QueueEntry],
        reports: &[AttemptReport],
        now: SystemTime,
    ) {
        let Some(history) = self.history.as_ref().filter(|_| seen.hosted) else {
            return;
        };
        let primary_up = match (seen.down, seen.answered) {
            (true, _) => Some(false),
            (false, true) => Some(true),
            (false, false) => None,
        };
        let changes: Vec<_> = before
            .iter()
            .zip(reports)
            .map(|(b, r)| (b, &r.entry, r.finished))
            .collect();
        history
            .attempted(domain, primary_up, &changes, unix_seconds(now))
            .await;
    }
}
