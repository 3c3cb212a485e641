//! Recipient verification: what a callout's answer means, what a delivery
//! teaches, and the records the cache and the primary's state keep.
//!
//! A callout asks the primary about one recipient the way a sender would:
//! `EHLO`, `MAIL FROM:<>`, `RCPT TO:<x>`, then `RSET`. Only a clear "no
//! such user" makes a recipient invalid; a temporary failure or a timeout
//! says the primary is down, never that the user does not exist.

use serde::{Deserialize, Serialize};

use crate::client::Response;

/// What the primary said about a recipient, as the cache keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// The primary accepted the recipient (RCPT 250, or a delivery).
    Valid,
    /// The primary refused the recipient as unknown (550/551/553 or 5.1.x).
    Invalid,
}

/// Where a cached verdict came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LearntFrom {
    /// A callout at RCPT time.
    Callout,
    /// The result of delivering a queued message.
    Delivery,
}

/// One cached verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CachedRecipient {
    /// The recipient, `local@domain` in canonical (lower-case domain) form.
    pub address: String,
    /// What the primary said.
    pub verdict: Verdict,
    /// How we learnt it.
    pub learnt: LearntFrom,
    /// Unix seconds when it was learnt.
    pub learnt_at: u64,
    /// Unix seconds after which the verdict no longer counts.
    pub expires: u64,
}

/// What we last observed of a domain's primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrimaryState {
    /// It answered SMTP (a probe, a callout or a delivery got through).
    pub up: bool,
    /// Unix seconds since it has been in this state.
    pub since: u64,
    /// Unix seconds of the last observation.
    pub observed: u64,
}

impl PrimaryState {
    /// The state after observing `up` at `now`.
    pub fn observe(previous: Option<PrimaryState>, up: bool, now: u64) -> PrimaryState {
        let since = match previous {
            Some(p) if p.up == up => p.since,
            _ => now,
        };
        PrimaryState {
            up,
            since,
            observed: now,
        }
    }

    /// Observed up no longer ago than `fresh` seconds.
    pub fn is_up_and_fresh(&self, now: u64, fresh: u64) -> bool {
        self.up && now.saturating_sub(self.observed) <= fresh
    }

    /// Observed down no longer ago than `fresh` seconds.
    pub fn is_down_and_fresh(&self, now: u64, fresh: u64) -> bool {
        !self.up && now.saturating_sub(self.observed) <= fresh
    }
}

/// What one callout found out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CalloutOutcome {
    /// The recipient exists.
    Valid,
    /// The recipient does not exist; the primary's reply.
    Invalid(String),
    /// The primary answered, but not about the recipient (it refuses the
    /// null sender, or a policy refusal): nothing is learnt.
    Inconclusive(String),
    /// No usable answer (4xx, a timeout, no connection): the primary
    /// counts as down, and the recipient as unknown.
    PrimaryDown(String),
}

/// Whether a permanent refusal of a recipient means "no such user":
/// 550/551/553 with a 5.1.x enhanced code, or without one (RFC 5321's
/// codes for a mailbox that does not exist). A 5.7.x (policy) or any other
/// 5.x.x class says nothing about the user.
pub fn is_unknown_user(code: u16, enhanced: Option<&str>) -> bool {
    match enhanced {
        Some(status) => status.starts_with("5.1."),
        None => matches!(code, 550 | 551 | 553),
    }
}

/// Like [`is_unknown_user`], for a reply stored as text (`"550 5.1.1 …"`).
pub fn is_unknown_user_text(reply: &str) -> bool {
    let mut words = reply.split_whitespace();
    let Some(code) = words.next().and_then(|c| c.parse::<u16>().ok()) else {
        return false;
    };
    if !(500..600).contains(&code) {
        return false;
    }
    let enhanced = words.next().filter(|w| {
        let parts: Vec<&str> = w.split('.').collect();
        parts.len() == 3
            && parts
                .iter()
                .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
    });
    is_unknown_user(code, enhanced)
}

/// What the reply to `RCPT TO` in a callout means.
pub fn classify_rcpt(reply: &Response) -> CalloutOutcome {
    if reply.is_success() {
        CalloutOutcome::Valid
    } else if reply.is_transient() {
        CalloutOutcome::PrimaryDown(reply.to_string())
    } else if is_unknown_user(reply.code, reply.enhanced_status()) {
        CalloutOutcome::Invalid(reply.to_string())
    } else {
        CalloutOutcome::Inconclusive(reply.to_string())
    }
}

/// What a reply before `RCPT` (greeting, `EHLO`, `MAIL FROM:<>`) means
/// when it is not a success: a 4xx is the primary being unavailable, a 5xx
/// a refusal to be asked.
pub fn classify_setup(reply: &Response) -> CalloutOutcome {
    if reply.is_transient() {
        CalloutOutcome::PrimaryDown(reply.to_string())
    } else {
        CalloutOutcome::Inconclusive(reply.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(code: u16, text: &str) -> Response {
        Response {
            code,
            lines: vec![text.to_string()],
        }
    }

    #[test]
    fn only_a_clear_unknown_user_makes_a_recipient_invalid() {
        assert_eq!(
            classify_rcpt(&reply(250, "2.1.5 Ok")),
            CalloutOutcome::Valid
        );
        assert!(matches!(
            classify_rcpt(&reply(550, "5.1.1 <x@d.test>: User unknown")),
            CalloutOutcome::Invalid(_)
        ));
        assert!(matches!(
            classify_rcpt(&reply(550, "No such user")),
            CalloutOutcome::Invalid(_)
        ));
        assert!(matches!(
            classify_rcpt(&reply(553, "5.1.3 bad address")),
            CalloutOutcome::Invalid(_)
        ));
        // A policy refusal says nothing about the user.
        assert!(matches!(
            classify_rcpt(&reply(550, "5.7.1 Relaying denied")),
            CalloutOutcome::Inconclusive(_)
        ));
        assert!(matches!(
            classify_rcpt(&reply(552, "Mailbox full")),
            CalloutOutcome::Inconclusive(_)
        ));
        // Temporary trouble is the primary's, never the user's.
        assert!(matches!(
            classify_rcpt(&reply(450, "4.2.0 greylisted")),
            CalloutOutcome::PrimaryDown(_)
        ));
        assert!(matches!(
            classify_setup(&reply(421, "4.3.2 shutting down")),
            CalloutOutcome::PrimaryDown(_)
        ));
        assert!(matches!(
            classify_setup(&reply(550, "5.7.1 no null senders")),
            CalloutOutcome::Inconclusive(_)
        ));
    }

    #[test]
    fn stored_replies_are_read_the_same_way() {
        assert!(is_unknown_user_text(
            "550 5.1.1 <x@d.test>: Recipient address rejected"
        ));
        assert!(is_unknown_user_text("551 User not local"));
        assert!(!is_unknown_user_text("550 5.7.1 Relay access denied"));
        assert!(!is_unknown_user_text("450 4.1.1 try later"));
        assert!(!is_unknown_user_text("connection refused"));
    }

    #[test]
    fn the_primary_state_keeps_since_while_it_does_not_change() {
        let s = PrimaryState::observe(None, true, 100);
        assert_eq!((s.since, s.observed), (100, 100));
        let s = PrimaryState::observe(Some(s), true, 150);
        assert_eq!((s.since, s.observed), (100, 150));
        assert!(s.is_up_and_fresh(400, 300) && !s.is_up_and_fresh(451, 300));
        let s = PrimaryState::observe(Some(s), false, 200);
        assert_eq!((s.up, s.since), (false, 200));
        assert!(s.is_down_and_fresh(250, 300));
    }
}
