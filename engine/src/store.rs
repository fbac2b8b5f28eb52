//! PostgreSQL: the only module that holds SQL.
//!
//! Functions that belong to an event's outcome take a `&mut PgConnection` so the caller (the
//! pipeline) owns the transaction; read paths take the pool.

use std::time::Duration;

use serde_json::{Map, Value};
use sqlx::postgres::{PgArguments, PgConnectOptions, PgPoolOptions};
use sqlx::query::Query;
use sqlx::{FromRow, PgConnection, PgPool, Postgres};

use crate::config::DatabaseConfig;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Sqlx(#[from] sqlx::Error),
    #[error("database migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Connects lazily: the engine starts (and reports not-ready) while PostgreSQL is down.
pub fn connect(config: &DatabaseConfig) -> Result<PgPool> {
    let options: PgConnectOptions = config.url.parse()?;
    Ok(PgPoolOptions::new()
        .max_connections(config.max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy_with(options.application_name("notify-engine")))
}

pub async fn migrate(pool: &PgPool) -> Result<()> {
    sqlx::migrate!("../migrations").run(pool).await?;
    Ok(())
}

pub async fn ping(pool: &PgPool) -> bool {
    sqlx::query("SELECT 1").execute(pool).await.is_ok()
}

/// Where a Kafka message came from.
#[derive(Debug, Clone, Copy)]
pub struct Origin<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
}

/// Records `(tenant, event)` as processed. `false` means it already was: a duplicate.
/// The row stays locked until the transaction ends, so a second instance handling the same
/// event concurrently waits and then sees the duplicate.
pub async fn claim_event(
    tx: &mut PgConnection,
    tenant: &str,
    event_id: &str,
    event_type: &str,
    origin: Origin<'_>,
) -> Result<bool> {
    let inserted = sqlx::query(
        "INSERT INTO processed_events
             (tenant_id, event_id, event_type, outcome, kafka_topic, kafka_partition, kafka_offset)
         VALUES ($1, $2, $3, 'routed', $4, $5, $6)
         ON CONFLICT (tenant_id, event_id) DO NOTHING",
    )
    .bind(tenant)
    .bind(event_id)
    .bind(event_type)
    .bind(origin.topic)
    .bind(origin.partition)
    .bind(origin.offset)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    Ok(inserted == 1)
}

/// Records the outcome of a claimed event and which plugin build decided it.
pub async fn set_outcome(
    tx: &mut PgConnection,
    tenant: &str,
    event_id: &str,
    dead_lettered: bool,
    plugin: Option<&str>,
    plugin_digest: Option<&str>,
) -> Result<()> {
    sqlx::query(
        "UPDATE processed_events SET outcome = $3, plugin = $4, plugin_digest = $5
         WHERE tenant_id = $1 AND event_id = $2",
    )
    .bind(tenant)
    .bind(event_id)
    .bind(if dead_lettered {
        "dead_lettered"
    } else {
        "routed"
    })
    .bind(plugin)
    .bind(plugin_digest)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// A notification to store (an inbox item or a live update).
#[derive(Debug, Clone)]
pub struct NewNotification<'a> {
    pub tenant: &'a str,
    pub user_id: &'a str,
    pub event_id: &'a str,
    pub kind: &'a str,
    pub title: Option<&'a str>,
    pub body: Option<&'a str>,
    pub category: Option<&'a str>,
    pub data: &'a Map<String, Value>,
}

/// Stores a notification under the user's next sequence number and returns that number.
pub async fn insert_notification(tx: &mut PgConnection, n: &NewNotification<'_>) -> Result<i64> {
    let (seq,): (i64,) = sqlx::query_as(
        "INSERT INTO user_streams (tenant_id, user_id, last_seq) VALUES ($1, $2, 1)
         ON CONFLICT (tenant_id, user_id) DO UPDATE SET last_seq = user_streams.last_seq + 1
         RETURNING last_seq",
    )
    .bind(n.tenant)
    .bind(n.user_id)
    .fetch_one(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO notifications
             (tenant_id, user_id, seq, event_id, kind, title, body, category, data)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(n.tenant)
    .bind(n.user_id)
    .bind(seq)
    .bind(n.event_id)
    .bind(n.kind)
    .bind(n.title)
    .bind(n.body)
    .bind(n.category)
    .bind(sqlx::types::Json(n.data))
    .execute(&mut *tx)
    .await?;
    Ok(seq)
}

/// An email to put in the outbox.
#[derive(Debug, Clone)]
pub struct NewEmail<'a> {
    pub tenant: &'a str,
    pub event_id: &'a str,
    pub user_id: Option<&'a str>,
    pub recipient: &'a str,
    pub template: &'a str,
    pub data: &'a Map<String, Value>,
    pub message_id: &'a str,
}

pub async fn enqueue_email(tx: &mut PgConnection, e: &NewEmail<'_>) -> Result<()> {
    sqlx::query(
        "INSERT INTO email_outbox
             (tenant_id, event_id, user_id, recipient, template, data, message_id)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(e.tenant)
    .bind(e.event_id)
    .bind(e.user_id)
    .bind(e.recipient)
    .bind(e.template)
    .bind(sqlx::types::Json(e.data))
    .bind(e.message_id)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

#[derive(Debug, Clone)]
pub struct NewDeadLetter<'a> {
    pub tenant: Option<&'a str>,
    pub event_id: Option<&'a str>,
    pub origin: Origin<'a>,
    pub key: Option<&'a [u8]>,
    pub payload: &'a [u8],
    pub error_kind: &'a str,
    pub reason: &'a str,
    pub plugin: Option<&'a str>,
}

/// Stores a dead letter; a message redelivered after a crash is stored once.
pub async fn insert_dead_letter(tx: &mut PgConnection, d: &NewDeadLetter<'_>) -> Result<bool> {
    let inserted = sqlx::query(
        "INSERT INTO dead_letters
             (tenant_id, event_id, kafka_topic, kafka_partition, kafka_offset, kafka_key,
              payload, error_kind, reason, plugin)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
         ON CONFLICT (kafka_topic, kafka_partition, kafka_offset) DO NOTHING",
    )
    .bind(d.tenant)
    .bind(d.event_id)
    .bind(d.origin.topic)
    .bind(d.origin.partition)
    .bind(d.origin.offset)
    .bind(d.key)
    .bind(d.payload)
    .bind(d.error_kind)
    // Defence in depth: a reason quoting bad input must not make the dead letter itself fail.
    .bind(d.reason.replace('\0', ""))
    .bind(d.plugin)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    Ok(inserted == 1)
}

/// A stored notification as streamed to its user.
#[derive(Debug, Clone, FromRow, serde::Serialize)]
pub struct StoredNotification {
    pub seq: i64,
    pub event_id: String,
    pub kind: String,
    pub title: Option<String>,
    pub body: Option<String>,
    pub category: Option<String>,
    pub data: sqlx::types::Json<Value>,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub read_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// The user's notifications after `after_seq`, oldest first. Every read is scoped by
/// tenant *and* user: there is no query that takes only one of them.
pub async fn notifications_after(
    pool: &PgPool,
    tenant: &str,
    user_id: &str,
    after_seq: i64,
    limit: i64,
) -> Result<Vec<StoredNotification>> {
    Ok(sqlx::query_as(
        "SELECT seq, event_id, kind, title, body, category, data, created_at, read_at
         FROM notifications
         WHERE tenant_id = $1 AND user_id = $2 AND seq > $3
         ORDER BY seq
         LIMIT $4",
    )
    .bind(tenant)
    .bind(user_id)
    .bind(after_seq)
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

/// The user's latest sequence number (0 when they have none).
pub async fn latest_seq(pool: &PgPool, tenant: &str, user_id: &str) -> Result<i64> {
    let row: Option<(i64,)> =
        sqlx::query_as("SELECT last_seq FROM user_streams WHERE tenant_id = $1 AND user_id = $2")
            .bind(tenant)
            .bind(user_id)
            .fetch_optional(pool)
            .await?;
    Ok(row.map_or(0, |r| r.0))
}

/// An outbox row claimed for sending.
#[derive(Debug, Clone, FromRow)]
pub struct OutboxEmail {
    pub id: i64,
    pub tenant_id: String,
    pub event_id: String,
    pub recipient: String,
    pub template: String,
    pub data: sqlx::types::Json<Value>,
    pub message_id: String,
    /// Including this one.
    pub attempts: i32,
}

/// Claims due outbox rows. `SKIP LOCKED` lets several workers (instances) share the
/// outbox; the claim expires after `claim_timeout`, so a worker that died mid-send does not
/// strand its rows (that is the "at most one extra send" case). An expired claim on a row
/// that already had its last attempt is failed rather than tried again.
pub async fn claim_emails(
    pool: &PgPool,
    batch: i64,
    claim_timeout: Duration,
    max_attempts: i32,
) -> Result<Vec<OutboxEmail>> {
    sqlx::query(
        "UPDATE email_outbox
         SET status = 'failed', locked_until = NULL,
             last_error = coalesce(last_error || '; ', '')
                          || 'claim expired after the last attempt (worker stopped mid-send)'
         WHERE status = 'sending' AND locked_until < now() AND attempts >= $1",
    )
    .bind(max_attempts)
    .execute(pool)
    .await?;
    Ok(sqlx::query_as(
        "UPDATE email_outbox o
         SET status = 'sending', attempts = o.attempts + 1,
             locked_until = now() + make_interval(secs => $2)
         WHERE o.id IN (
             SELECT id FROM email_outbox
             WHERE (status = 'pending' AND next_attempt_at <= now())
                OR (status = 'sending' AND locked_until < now())
             ORDER BY next_attempt_at, id
             LIMIT $1
             FOR UPDATE SKIP LOCKED)
         RETURNING o.id, o.tenant_id, o.event_id, o.recipient, o.template, o.data,
                   o.message_id, o.attempts",
    )
    .bind(batch)
    .bind(claim_timeout.as_secs_f64())
    .fetch_all(pool)
    .await?)
}

/// Every write to a claimed row is fenced by (status, attempts): a worker whose claim
/// expired and was taken over can no longer change the row.
macro_rules! fenced_update {
    ($set:literal) => {
        concat!(
            "UPDATE email_outbox SET ",
            $set,
            " WHERE id = $1 AND status = 'sending' AND attempts = $2"
        )
    };
}

fn fenced<'q>(sql: &'q str, email: &OutboxEmail) -> Query<'q, Postgres, PgArguments> {
    sqlx::query(sql).bind(email.id).bind(email.attempts)
}

/// Runs a fenced update; `false` means the claim was lost.
async fn apply(pool: &PgPool, query: Query<'_, Postgres, PgArguments>) -> Result<bool> {
    Ok(query.execute(pool).await?.rows_affected() == 1)
}

/// Extends a claim just before sending, so the claim covers the send even when earlier rows
/// of the batch were slow. `false` means another worker took the row over: do not send.
pub async fn renew_email_claim(
    pool: &PgPool,
    email: &OutboxEmail,
    claim_timeout: Duration,
) -> Result<bool> {
    let sql = fenced_update!("locked_until = now() + make_interval(secs => $3)");
    apply(pool, fenced(sql, email).bind(claim_timeout.as_secs_f64())).await
}

pub async fn mark_email_sent(pool: &PgPool, email: &OutboxEmail) -> Result<bool> {
    let sql =
        fenced_update!("status = 'sent', sent_at = now(), locked_until = NULL, last_error = NULL");
    apply(pool, fenced(sql, email)).await
}

pub async fn mark_email_retry(
    pool: &PgPool,
    email: &OutboxEmail,
    error: &str,
    delay: Duration,
) -> Result<bool> {
    let sql = fenced_update!(
        "status = 'pending', last_error = $3, locked_until = NULL,
         next_attempt_at = now() + make_interval(secs => $4)"
    );
    apply(
        pool,
        fenced(sql, email).bind(error).bind(delay.as_secs_f64()),
    )
    .await
}

pub async fn mark_email_failed(pool: &PgPool, email: &OutboxEmail, error: &str) -> Result<bool> {
    let sql = fenced_update!("status = 'failed', last_error = $3, locked_until = NULL");
    apply(pool, fenced(sql, email).bind(error)).await
}

/// Gives a claimed but unsent row back (shutdown): pending again, the attempt not counted.
pub async fn release_email(pool: &PgPool, email: &OutboxEmail) -> Result<bool> {
    let sql = fenced_update!("status = 'pending', attempts = attempts - 1, locked_until = NULL");
    apply(pool, fenced(sql, email)).await
}
