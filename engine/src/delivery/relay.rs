//! The relay's return. During an SMTP outage each email backs off on its own, up to
//! `email.backoff_max_ms` (5 min); without more, mail would go on waiting out those
//! backoffs after the relay is back, and a restart would not change that (the delays are in
//! the rows). So a failure that is the relay's, not one message's, is recorded as such
//! ([`RELAY_UNAVAILABLE`]) and remembered here; the next success, a send or a probe of the
//! relay, makes every email waiting for the relay due at once.
//!
//! Which failures are the relay's: no connection, a connection cut, a timeout, TLS trouble,
//! and `421` (service not available). Other `4xx` answers are about one message or
//! recipient (a full mailbox, greylisting): those keep their backoff, or a busy relay would
//! pull them forward again and again.

use std::sync::atomic::{AtomicBool, Ordering};

use lettre::transport::smtp::Error as SmtpError;

pub(super) use crate::store::outbox::RELAY_UNAVAILABLE;

/// Whether emails may be waiting for the relay.
pub(super) struct RelayWatch {
    waiting: AtomicBool,
}

impl RelayWatch {
    /// Starts out waiting: rows may be left in backoff by an earlier run (a restart), and
    /// the first success or probe finds out.
    pub(super) fn new() -> Self {
        Self {
            waiting: AtomicBool::new(true),
        }
    }

    /// An email was put back to wait for the relay.
    pub(super) fn failed(&self) {
        self.waiting.store(true, Ordering::SeqCst);
    }

    pub(super) fn waiting(&self) -> bool {
        self.waiting.load(Ordering::SeqCst)
    }

    /// `true` once per run of failures: the caller pulls the waiting rows forward (and
    /// calls [`RelayWatch::failed`] again if that fails).
    pub(super) fn take(&self) -> bool {
        self.waiting.swap(false, Ordering::SeqCst)
    }
}

/// Is this failure the relay's (unreachable, gone, too slow, `421`) rather than about one
/// message? Permanent (`5xx`) answers are judged before this is asked.
pub(super) fn relay_unavailable(e: &SmtpError) -> bool {
    !e.is_transient() || e.status().is_some_and(|code| code.to_string() == "421")
}

/// The error recorded on a row waiting for the relay.
pub(super) fn relay_error(detail: impl std::fmt::Display) -> String {
    format!("{RELAY_UNAVAILABLE}: {detail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watch_hands_out_one_pull_per_run_of_failures() {
        let watch = RelayWatch::new();
        assert!(watch.take(), "a restart looks once");
        assert!(!watch.take());
        watch.failed();
        watch.failed();
        assert!(watch.waiting());
        assert!(watch.take());
        assert!(!watch.waiting());
    }

    #[test]
    fn the_relay_error_is_what_the_outbox_pulls_forward() {
        let e = relay_error("Connection refused");
        assert!(e.starts_with(RELAY_UNAVAILABLE), "{e}");
        assert!(e.contains("smtp"), "operators filter requeues by it: {e}");
    }
}
