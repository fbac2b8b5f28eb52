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
