//! `[database]`, `[retention]`, `[presence]` and `[cluster]`: the PostgreSQL pools, what is
//! purged when it gets old, the heartbeat rows that say which instance holds which stream,
//! and the key that seals what instances tell each other through the database. The
//! database URL's password and the cluster secret never reach a `Debug` print.

use serde::{Deserialize, Serialize};

use super::{ConfigError, REDACTED, invalid};

#[derive(Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseConfig {
    /// PostgreSQL URL. `DATABASE_URL` overrides it.
    pub url: String,
    /// Connections of the pipeline, the email worker and the readiness probe.
    pub max_connections: u32,
    /// Connections of the public API (inbox, tickets, SSE reads): a pool of its own, so unauthenticated or
    /// abusive traffic can never take the pipeline's connections.
    pub api_max_connections: u32,
    /// Apply the embedded migrations at start-up.
    pub migrate: bool,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: "postgres://notify:notify@127.0.0.1:15432/notify".into(),
            max_connections: 16,
            api_max_connections: 8,
            migrate: true,
        }
    }
}

/// Cluster-wide presence (`[presence]`): which users have a stream open on which instance.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PresenceConfig {
    /// How often this instance refreshes its heartbeat row and expires dead instances.
    pub heartbeat_secs: u64,
    /// An instance whose heartbeat is older than this is dead: its users count as offline
    /// from then on. The staleness bound for an instance that died unannounced.
    pub ttl_secs: u64,
}

impl Default for PresenceConfig {
    fn default() -> Self {
        Self {
            heartbeat_secs: 5,
            ttl_secs: 15,
        }
    }
}

/// What the instances of one deployment share (`[cluster]`).
#[derive(Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// The key (at least 32 bytes) that seals every wake-up and presence change instances
    /// tell each other through PostgreSQL's NOTIFY, which any role able to connect could
    /// otherwise read and forge. The same on every instance; from the environment only
    /// (`NOTIFY_CLUSTER__SECRET`). Unset: the instance seals with a key of its own and hears
    /// no other instance (enough for one instance alone).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

/// The shortest `cluster.secret`, in bytes (as for HS256 JWT secrets).
const MIN_CLUSTER_SECRET: usize = 32;

impl ClusterConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if let Some(secret) = &self.secret
            && (secret.len() < MIN_CLUSTER_SECRET || secret.trim() != secret)
        {
            return invalid(format!(
                "cluster.secret (NOTIFY_CLUSTER__SECRET) must be at least {MIN_CLUSTER_SECRET} \
                 bytes, without leading or trailing blanks (e.g. `openssl rand -hex 32`), and \
                 the same on every instance"
            ));
        }
        Ok(())
    }
}

impl std::fmt::Debug for ClusterConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterConfig")
            .field("secret", &self.secret.as_ref().map(|_| REDACTED))
            .finish()
    }
}

/// What is deleted when it gets old (`[retention]`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetentionConfig {
    /// Notifications (inbox items, live updates, read and archive events) older than this
    /// many days are deleted; 0: kept forever.
    pub notifications_days: u32,
    /// Duplicate-filter keys older than this many days are deleted; 0: kept forever. An
    /// event redelivered after that (a consumer group reset past it) is handled again, so
    /// keep it above the topics' retention.
    pub processed_events_days: u32,
    /// Outbox rows (recipients and the data their email was rendered from) that are done
    /// (`sent`, `failed`, `skipped`) and older than this many days are deleted; rows still
    /// `pending` or `sending` never are. 0: kept forever. A failed row purged can no longer
    /// be requeued (`email requeue`), so it must be longer than `email.max_age_secs`.
    pub email_outbox_days: u32,
    /// Dead letters (the raw payloads) older than this many days are deleted; 0: kept
    /// forever. A purged dead letter can no longer be replayed (`dead-letters replay` needs
    /// its payload): replay what matters within this window.
    pub dead_letters_days: u32,
    /// Rows deleted per statement: a purge never holds long locks or a long transaction.
    pub batch: i64,
    /// Pause between purge rounds.
    pub interval_secs: u64,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            notifications_days: 90,
            processed_events_days: 30,
            email_outbox_days: 30,
            dead_letters_days: 30,
            batch: 5_000,
            interval_secs: 60,
        }
    }
}

impl std::fmt::Debug for DatabaseConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatabaseConfig")
            .field("url", &redact_url_password(&self.url))
            .field("max_connections", &self.max_connections)
            .field("api_max_connections", &self.api_max_connections)
            .field("migrate", &self.migrate)
            .finish()
    }
}

/// `scheme://user:password@host/...` with the password replaced.
fn redact_url_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((userinfo, host)) = rest.rsplit_once('@') else {
        return url.to_owned();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:{REDACTED}@{host}"),
        None => url.to_owned(),
    }
}

impl PresenceConfig {
    /// A live instance must never look dead between two of its heartbeats.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.heartbeat_secs == 0 || self.ttl_secs < 2 * self.heartbeat_secs {
            return invalid(
                "presence.heartbeat_secs must be positive and presence.ttl_secs at least twice \
                 as long (a live instance must not expire between two heartbeats)",
            );
        }
        Ok(())
    }
}

impl RetentionConfig {
    /// A purge that deletes nothing per round, or never pauses, is a misconfiguration.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.batch < 1 || self.interval_secs == 0 {
            return invalid("retention.batch and retention.interval_secs must be positive");
        }
        Ok(())
    }
}
