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
    pub(super) fn record_history(
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
        let now = unix_seconds(now);
        let seen = crate::outages::AttemptSeen::of(primary_up, &changes, now);
        // Off the delivery's path: the attempt's outcome is stored without
        // waiting for the history's reads and writes (the longer the time
        // between the primary's reply and that store, the more a crash
        // there repeats).
        let (history, domain) = (history.clone(), domain.clone());
        tokio::spawn(async move { history.record(&domain, seen, now).await });
    }
}
