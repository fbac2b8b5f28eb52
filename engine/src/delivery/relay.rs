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
//! pull them forward again and again. And a relay that answers probes but still fails
//! sends is probed less and less often (doubling up to `email.backoff_max_ms`), so its
//! emails are not tried every few seconds for the length of the trouble.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use lettre::transport::smtp::Error as SmtpError;
use tokio_util::sync::CancellationToken;

use super::Shared;
use crate::store::outbox;

pub(super) use crate::store::outbox::RELAY_UNAVAILABLE;

/// Whether emails may be waiting for the relay.
pub(super) struct RelayWatch {
    waiting: AtomicBool,
    /// An email was sent since the last time a probe pulled emails forward.
    sent: AtomicBool,
}

impl RelayWatch {
    /// Starts out waiting: rows may be left in backoff by an earlier run (a restart), and
    /// the first success or probe finds out.
    pub(super) fn new() -> Self {
        Self {
            waiting: AtomicBool::new(true),
            sent: AtomicBool::new(false),
        }
    }

    /// An email was sent.
    pub(super) fn sent(&self) {
        self.sent.store(true, Ordering::SeqCst);
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

impl Shared {
    /// While emails may be waiting for the relay, probes it every `email.relay_probe_ms`
    /// (the first time at once: a restart), and pulls them forward when it answers.
    pub(super) async fn watch_relay(&self, shutdown: &CancellationToken) {
        let base = Duration::from_millis(self.config.relay_probe_ms);
        let cap = Duration::from_millis(self.config.backoff_max_ms).max(base);
        let mut every = base;
        // The last probe pulled emails forward.
        let mut pulled = false;
        let mut next = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep_until(next) => {}
            }
            if self.relay.waiting() {
                if pulled {
                    let sent = self.relay.sent.swap(false, Ordering::SeqCst);
                    every = probe_interval(every, base, cap, sent);
                }
                let probe = tokio::time::timeout(
                    self.config.send_timeout(),
                    self.transport.test_connection(),
                )
                .await;
                self.relay_state(matches!(probe, Ok(Ok(true))));
                pulled = match probe {
                    Ok(Ok(true)) => self.relay_back("a probe of the relay succeeded").await,
                    Ok(Ok(false)) => {
                        tracing::debug!("relay probe: the connection did not answer NOOP");
                        false
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "relay probe failed");
                        false
                    }
                    Err(_) => {
                        tracing::debug!("relay probe: no answer in time");
                        false
                    }
                };
                if pulled {
                    self.relay.sent.store(false, Ordering::SeqCst);
                }
            }
            next = tokio::time::Instant::now() + every;
        }
    }

    /// Reports the relay's state on `/status`, and logs a change.
    pub(super) fn relay_state(&self, up: bool) {
        if self.health.set_smtp(up) {
            tracing::info!(reachable = up, "smtp relay state changed");
        }
    }

    /// The relay answered: the emails waiting for it are due now, and the worker looks.
    /// `true` if there were some.
    pub(super) async fn relay_back(&self, why: &str) -> bool {
        if !self.relay.take() {
            return false;
        }
        match outbox::pull_forward_relay_waits(&self.pool).await {
            Ok(0) => false,
            Ok(n) => {
                tracing::info!(
                    emails = n,
                    why,
                    "SMTP relay available again: the emails waiting for it are due now"
                );
                self.wake.notify_one();
                true
            }
            Err(e) => {
                self.relay.failed();
                tracing::warn!(error = %e.with_cause(), "pulling emails waiting for the relay forward failed; trying again at the next success");
                false
            }
        }
    }
}

/// The next probe interval when emails wait for the relay again after a probe pulled them
/// forward: back to `base` if a send succeeded since (the relay works), else doubled up to
/// `cap` (it answers probes but fails sends: trying its emails every `base` would hammer it).
fn probe_interval(every: Duration, base: Duration, cap: Duration, sent: bool) -> Duration {
    if sent { base } else { (every * 2).min(cap) }
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
    fn a_relay_that_answers_probes_but_fails_sends_is_probed_less_often() {
        let (base, cap) = (Duration::from_secs(5), Duration::from_secs(300));
        let mut every = base;
        let mut seen = Vec::new();
        for _ in 0..8 {
            every = probe_interval(every, base, cap, false);
            seen.push(every.as_secs());
        }
        assert_eq!(seen, [10, 20, 40, 80, 160, 300, 300, 300]);
        assert_eq!(
            probe_interval(every, base, cap, true),
            base,
            "a send worked"
        );
    }

    #[test]
    fn the_relay_error_is_what_the_outbox_pulls_forward() {
        let e = relay_error("Connection refused");
        assert!(e.starts_with(RELAY_UNAVAILABLE), "{e}");
        assert!(e.contains("smtp"), "operators filter requeues by it: {e}");
    }
}
