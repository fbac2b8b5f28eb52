//! Retention: deletes notifications, duplicate-filter keys, finished outbox rows and dead
//! letters older than their configured age, and stream tickets that expired unused, in
//! bounded batches. The outbox and the dead letters hold personal data (recipients, the
//! data an email was rendered from, raw event payloads), so they do not stay forever; an
//! outbox row still waiting to be sent is never purged.
//!
//! One round deletes at most `retention.batch` rows per table and repeats at once while a
//! table had a full batch to delete, so a backlog drains quickly without one long
//! transaction; then it sleeps `retention.interval_secs`. Several instances may purge at
//! once: each deletes what is there, and a row is deleted once.

use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::config::RetentionConfig;
use crate::store::{self, retention};
use crate::telemetry::Metrics;

const DAY: Duration = Duration::from_secs(24 * 60 * 60);

pub struct Retention {
    pub pool: PgPool,
    pub config: RetentionConfig,
    pub metrics: Metrics,
}

impl Retention {
    pub async fn run(self, shutdown: CancellationToken) {
        loop {
            let pause = match self.round().await {
                Ok(true) => Duration::ZERO,
                Ok(false) => Duration::from_secs(self.config.interval_secs),
                Err(e) => {
                    tracing::warn!(error = %e.with_cause(), "retention round failed; trying again later");
                    Duration::from_secs(self.config.interval_secs)
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }

    /// One batch per table; `true` when a table had a full batch (there may be more).
    pub async fn round(&self) -> Result<bool, store::StoreError> {
        let batch = self.config.batch;
        let mut full = false;
        let mut count = |table: &str, n: u64| {
            self.metrics
                .retention_deleted
                .with_label_values(&[table])
                .inc_by(n);
            full |= n as i64 >= batch;
        };
        if self.config.notifications_days > 0 {
            let age = DAY * self.config.notifications_days;
            count(
                "notifications",
                retention::purge_notifications(&self.pool, age, batch).await?,
            );
        }
        if self.config.processed_events_days > 0 {
            let age = DAY * self.config.processed_events_days;
            count(
                "processed_events",
                retention::purge_processed_events(&self.pool, age, batch).await?,
            );
        }
        if self.config.email_outbox_days > 0 {
            let age = DAY * self.config.email_outbox_days;
            count(
                "email_outbox",
                retention::purge_email_outbox(&self.pool, age, batch).await?,
            );
        }
        if self.config.dead_letters_days > 0 {
            let age = DAY * self.config.dead_letters_days;
            count(
                "dead_letters",
                retention::purge_dead_letters(&self.pool, age, batch).await?,
            );
        }
        count(
            "sse_tickets",
            retention::purge_tickets(&self.pool, batch).await?,
        );
        Ok(full)
    }
}
