//! Deleting what is old, in bounded batches: each statement deletes at most `batch` rows
//! found through an index, so a purge never holds long locks or a long transaction.

use std::time::Duration;

use sqlx::PgPool;

use super::Result;

/// Deletes up to `batch` notifications created more than `age` ago; returns how many.
/// Sequence numbers are never reused (`user_streams` keeps the last one), so a purge never
/// makes an old `Last-Event-ID` point at a new notification.
pub async fn purge_notifications(pool: &PgPool, age: Duration, batch: i64) -> Result<u64> {
    Ok(sqlx::query(
        "DELETE FROM notifications WHERE id IN (
             SELECT id FROM notifications
             WHERE created_at < now() - make_interval(secs => $1)
             LIMIT $2)",
    )
    .bind(age.as_secs_f64())
    .bind(batch)
    .execute(pool)
    .await?
    .rows_affected())
}

/// Deletes up to `batch` duplicate-filter keys recorded more than `age` ago.
pub async fn purge_processed_events(pool: &PgPool, age: Duration, batch: i64) -> Result<u64> {
    Ok(sqlx::query(
        "DELETE FROM processed_events WHERE (tenant_id, event_id) IN (
             SELECT tenant_id, event_id FROM processed_events
             WHERE processed_at < now() - make_interval(secs => $1)
             LIMIT $2)",
    )
    .bind(age.as_secs_f64())
    .bind(batch)
    .execute(pool)
    .await?
    .rows_affected())
}

/// Deletes up to `batch` outbox rows that are done (`sent`, `failed`, `skipped`) and were
/// queued (and, if sent, sent) more than `age` ago; returns how many. Rows still `pending`
/// or `sending` are never touched, however old: they are mail not yet delivered. Through
/// the partial index `email_outbox_done`.
pub async fn purge_email_outbox(pool: &PgPool, age: Duration, batch: i64) -> Result<u64> {
    Ok(sqlx::query(
        "DELETE FROM email_outbox WHERE id IN (
             SELECT id FROM email_outbox
             WHERE status IN ('sent', 'failed', 'skipped')
               AND queued_at < now() - make_interval(secs => $1)
               AND (sent_at IS NULL OR sent_at < now() - make_interval(secs => $1))
             LIMIT $2)
           AND status IN ('sent', 'failed', 'skipped')",
    )
    .bind(age.as_secs_f64())
    .bind(batch)
    .execute(pool)
    .await?
    .rows_affected())
}

/// Deletes up to `batch` dead letters created more than `age` ago, replayed or not; returns
/// how many. Their payloads go with them, so they can no longer be replayed.
pub async fn purge_dead_letters(pool: &PgPool, age: Duration, batch: i64) -> Result<u64> {
    Ok(sqlx::query(
        "DELETE FROM dead_letters WHERE id IN (
             SELECT id FROM dead_letters
             WHERE created_at < now() - make_interval(secs => $1)
             LIMIT $2)",
    )
    .bind(age.as_secs_f64())
    .bind(batch)
    .execute(pool)
    .await?
    .rows_affected())
}

/// Deletes up to `batch` stream tickets that expired unused.
pub async fn purge_tickets(pool: &PgPool, batch: i64) -> Result<u64> {
    Ok(sqlx::query(
        "DELETE FROM sse_tickets WHERE ticket_sha256 IN (
             SELECT ticket_sha256 FROM sse_tickets WHERE expires_at < now() LIMIT $1)",
    )
    .bind(batch)
    .execute(pool)
    .await?
    .rows_affected())
}
