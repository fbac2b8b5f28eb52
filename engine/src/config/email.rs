//! `[email]` and `[smtp]`: the outbox worker's pacing and retries, and the relay it sends
//! through; the SMTP password never reaches a `Debug` print.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ConfigError, REDACTED, invalid};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SmtpTls {
    /// Plain SMTP (local relays, test sinks).
    None,
    /// STARTTLS upgrade, required.
    Starttls,
    /// Implicit TLS (SMTPS, usually port 465).
    Tls,
}

#[derive(Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SmtpConfig {
    pub host: String,
    pub port: u16,
    pub tls: SmtpTls,
    pub username: Option<String>,
    /// From the environment only (`NOTIFY_SMTP__PASSWORD`).
    pub password: Option<String>,
    /// `From:` header of every email.
    pub from: String,
    pub timeout_ms: u64,
}

impl Default for SmtpConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 11025,
            tls: SmtpTls::Starttls,
            username: None,
            password: None,
            from: "Notifications <notifications@example.com>".into(),
            timeout_ms: 10_000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EmailConfig {
    /// Holds `<tenant>/<template>/{subject,html,text}.hbs`, with `default/` as the fallback.
    pub templates_dir: PathBuf,
    /// How long a transiently failing email (4xx, connection trouble, timeouts) keeps being
    /// retried, counted from when it was queued, the way an MTA keeps its queue. Then it
    /// fails; `notify-engine email requeue` puts failed rows back.
    pub max_age_secs: u64,
    /// First retry delay; doubles per attempt, with jitter, up to `backoff_max_ms`.
    pub backoff_base_ms: u64,
    pub backoff_max_ms: u64,
    /// How often the worker looks for due rows when nobody wakes it.
    pub poll_interval_ms: u64,
    /// Rows claimed at a time (the next claim is made once half the sends are free).
    pub batch: i64,
    /// Rows of one tenant claimed at a time: tenants take turns, so one tenant's backlog
    /// cannot delay another's email.
    pub per_tenant_batch: i64,
    /// Emails sent at the same time.
    pub concurrency: usize,
    /// Emails per second one tenant may send from this instance (0: no limit).
    pub tenant_rate_per_sec: u32,
    /// Events older than this (by their `time`) are recorded, but their emails are not
    /// sent (status `skipped`): a new consumer group reading an old topic must not mail
    /// customers about last month's orders. 0 disables the check.
    pub max_event_age_secs: u64,
    /// How long a claim holds before another worker may take the row over.
    pub claim_timeout_ms: u64,
    /// While emails wait in backoff because the relay was unavailable, how often the worker
    /// probes the relay (connect, greeting, `NOOP`); once a probe or a send succeeds, the
    /// waiting emails are due at once instead of at the end of their backoff. A relay that
    /// answers probes but fails sends is probed less often (doubling up to `backoff_max_ms`).
    pub relay_probe_ms: u64,
}

impl Default for EmailConfig {
    fn default() -> Self {
        Self {
            templates_dir: PathBuf::from("templates"),
            max_age_secs: 2 * 24 * 3600,
            backoff_base_ms: 1_000,
            backoff_max_ms: 300_000,
            poll_interval_ms: 1_000,
            batch: 16,
            per_tenant_batch: 4,
            concurrency: 4,
            tenant_rate_per_sec: 20,
            max_event_age_secs: 24 * 3600,
            claim_timeout_ms: 60_000,
            relay_probe_ms: 5_000,
        }
    }
}

impl EmailConfig {
    /// The whole of one send (connect, TLS, SMTP dialogue), bounded well inside the claim
    /// so a slow server can never outlive the claim and cause a second send.
    pub fn send_timeout(&self) -> Duration {
        Duration::from_millis(self.claim_timeout_ms / 2)
    }
}

/// `localhost` or a loopback address: traffic that never leaves the machine.
fn is_loopback_host(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .trim_matches(|c| c == '[' || c == ']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl std::fmt::Debug for SmtpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmtpConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| REDACTED))
            .field("from", &self.from)
            .field("timeout_ms", &self.timeout_ms)
            .finish()
    }
}

impl EmailConfig {
    /// A worker that claims at least one row, and a retry window long enough to outlast a
    /// short relay outage.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.batch < 1 || self.per_tenant_batch < 1 || self.concurrency < 1 {
            return invalid(
                "email.batch, email.per_tenant_batch and email.concurrency must be at least 1",
            );
        }
        if self.max_age_secs < 60 {
            return invalid("email.max_age_secs must be at least 60");
        }
        if self.relay_probe_ms < 100 {
            return invalid("email.relay_probe_ms must be at least 100");
        }
        Ok(())
    }
}

impl SmtpConfig {
    /// No password in clear text across a network, and a `From:` that is a mailbox.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.username.is_some() && self.tls == SmtpTls::None && !is_loopback_host(&self.host) {
            return invalid(format!(
                "smtp.username is set but smtp.tls is \"none\": the password would cross the \
                 network in clear text to {}; use \"starttls\" or \"tls\"",
                self.host
            ));
        }
        if self.from.parse::<lettre::message::Mailbox>().is_err() {
            return invalid(format!("smtp.from {:?} is not a valid mailbox", self.from));
        }
        Ok(())
    }
}
