//! `email_outbox`: the emails a batch queues in its transaction, and the delivery workers'
//! claims on them. A worker claims due rows, renews a claim just before sending, and records
//! the outcome; every write to a claimed row is fenced by (status, attempts), so a worker
//! whose claim expired can no longer change it. Operators requeue failed rows.

use std::time::Duration;

use serde_json::{Map, Value};
use sqlx::postgres::PgArguments;
use sqlx::query::Query;
use sqlx::{FromRow, PgConnection, PgPool, Postgres};

use super::{Result, texts};

/// How the error of a row waiting for the relay (not for one message's trouble) begins:
/// what [`pull_forward_relay_waits`] looks for.
pub const RELAY_UNAVAILABLE: &str = "smtp relay unavailable";

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
    /// `Some(reason)`: record the email but do not send it (status `skipped`).
    pub skip: Option<&'a str>,
    pub event_type: &'a str,
    pub event_time: chrono::DateTime<chrono::Utc>,
    pub locale: Option<&'a str>,
    pub time_zone: Option<&'a str>,
}

/// Puts emails in the outbox, in one statement whatever their number.
pub async fn enqueue_emails<'a>(tx: &mut PgConnection, emails: &'a [NewEmail<'a>]) -> Result<()> {
    if emails.is_empty() {
        return Ok(());
    }
    let text = |f: fn(&'a NewEmail<'a>) -> Option<&'a str>| texts(emails, f);
    let data: Vec<String> = emails
        .iter()
        .map(|e| serde_json::to_string(e.data).expect("a JSON map serializes"))
        .collect();
    sqlx::query(
        "INSERT INTO email_outbox
             (tenant_id, event_id, user_id, recipient, template, data, message_id,
              status, last_error, event_type, event_time, locale, time_zone)
         SELECT t, e, u, r, tp, d::jsonb, m,
                CASE WHEN sk IS NULL THEN 'pending' ELSE 'skipped' END, sk, et, at, l, tz
         FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                     $7::text[], $8::text[], $9::text[], $10::timestamptz[], $11::text[],
                     $12::text[]) AS x (t, e, u, r, tp, d, m, sk, et, at, l, tz)",
    )
    .bind(text(|e| Some(e.tenant)))
    .bind(text(|e| Some(e.event_id)))
    .bind(text(|e| e.user_id))
    .bind(text(|e| Some(e.recipient)))
    .bind(text(|e| Some(e.template)))
    .bind(&data)
    .bind(text(|e| Some(e.message_id)))
    .bind(text(|e| e.skip))
    .bind(text(|e| Some(e.event_type)))
    .bind(emails.iter().map(|e| e.event_time).collect::<Vec<_>>())
    .bind(text(|e| e.locale))
    .bind(text(|e| e.time_zone))
    .execute(&mut *tx)
    .await?;
    Ok(())
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
    /// When the row entered the queue (or was last requeued by an operator): transient
    /// failures are retried until it is `email.max_age_secs` old.
    pub queued_at: chrono::DateTime<chrono::Utc>,
    pub user_id: Option<String>,
    /// The event's type and time (NULL on rows written before they were recorded).
    pub event_type: Option<String>,
    pub event_time: Option<chrono::DateTime<chrono::Utc>>,
    pub locale: Option<String>,
    pub time_zone: Option<String>,
}

/// Returns rows whose claim expired (their worker died mid-send) to the queue, or fails
/// them if they are past `max_age`. Index-backed (`email_outbox_claims`). The attempt that
/// was under way stays counted; the row's stable `Message-ID` makes a resend recognisable:
/// that is the "at most one extra send" case.
pub async fn sweep_expired_claims(pool: &PgPool, max_age: Duration) -> Result<u64> {
    Ok(sqlx::query(
        "UPDATE email_outbox
         SET locked_until = NULL, next_attempt_at = now(),
             status = CASE WHEN queued_at < now() - make_interval(secs => $1)
                           THEN 'failed' ELSE 'pending' END,
             last_error = coalesce(last_error || '; ', '')
                          || 'claim expired (worker stopped mid-send)'
         WHERE status = 'sending' AND locked_until < now()",
    )
    .bind(max_age.as_secs_f64())
    .execute(pool)
    .await?
    .rows_affected())
}

/// Claims up to `batch` due rows, at most `per_tenant` of any one tenant, oldest first
/// within a tenant. A skip scan over `email_outbox_pending` walks the tenants with pending
/// rows and a range probe per tenant finds its due ones, so a backlog of thousands of one
/// tenant's emails costs another tenant one round, not hours, and a queue full of rows in
/// backoff costs one probe per tenant. `SKIP LOCKED` lets several workers (instances) share the outbox.
///
/// Planned at every call (not a statement the connection keeps): the plan a connection made
/// while the outbox was small stayed a sequential scan of the whole outbox for the update and a
/// walk over every due row for the lock, whatever its size later (until autovacuum happened to
/// analyze the table). Planning it costs a fraction of a millisecond, once per claim.
pub async fn claim_emails(
    pool: &PgPool,
    batch: i64,
    per_tenant: i64,
    claim_timeout: Duration,
) -> Result<Vec<OutboxEmail>> {
    Ok(sqlx::query_as(
        "WITH RECURSIVE tenants(tenant_id) AS (
             -- Distinct tenants with pending rows: one index probe each (a skip scan over
             -- email_outbox_pending), and none at all when nothing is due yet.
             (SELECT tenant_id FROM email_outbox
              WHERE status = 'pending'
                AND EXISTS (SELECT 1 FROM email_outbox
                            WHERE status = 'pending' AND next_attempt_at <= now())
              ORDER BY tenant_id LIMIT 1)
             UNION ALL
             SELECT (SELECT e.tenant_id FROM email_outbox e
                     WHERE e.status = 'pending' AND e.tenant_id > t.tenant_id
                     ORDER BY e.tenant_id LIMIT 1)
             FROM tenants t WHERE t.tenant_id IS NOT NULL
         ),
         candidates AS (
             SELECT c.id, c.next_attempt_at, c.rank
             FROM tenants t
             CROSS JOIN LATERAL (
                 SELECT e.id, e.next_attempt_at,
                        row_number() OVER (ORDER BY e.next_attempt_at, e.id) AS rank
                 FROM email_outbox e
                 WHERE e.status = 'pending' AND e.tenant_id = t.tenant_id
                   AND e.next_attempt_at <= now()
                 ORDER BY e.next_attempt_at, e.id
                 LIMIT $2) c
             WHERE t.tenant_id IS NOT NULL
             ORDER BY c.rank, c.next_attempt_at, c.id
             LIMIT $1
         )
         UPDATE email_outbox o
         SET status = 'sending', attempts = o.attempts + 1,
             locked_until = now() + make_interval(secs => $3)
         WHERE o.id IN (
             SELECT e.id FROM email_outbox e
             WHERE e.id IN (SELECT id FROM candidates) AND e.status = 'pending'
             FOR UPDATE SKIP LOCKED)
         RETURNING o.id, o.tenant_id, o.event_id, o.recipient, o.template, o.data,
                   o.message_id, o.attempts, o.queued_at, o.user_id, o.event_type,
                   o.event_time, o.locale, o.time_zone",
    )
    .persistent(false)
    .bind(batch)
    .bind(per_tenant)
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

/// Gives a claimed but unsent row back (shutdown, or its tenant's send rate is spent):
/// pending again after `delay`, the attempt not counted.
pub async fn release_email(pool: &PgPool, email: &OutboxEmail, delay: Duration) -> Result<bool> {
    let sql = fenced_update!(
        "status = 'pending', attempts = attempts - 1, locked_until = NULL,
         next_attempt_at = now() + make_interval(secs => $3)"
    );
    apply(pool, fenced(sql, email).bind(delay.as_secs_f64())).await
}

/// The relay is back: rows in backoff because the relay was unavailable (their error begins
/// with [`RELAY_UNAVAILABLE`]) are due now. Other waiting rows (one message's `4xx`, a
/// tenant's send rate) keep their time. Through `email_outbox_due`. Returns how many.
pub async fn pull_forward_relay_waits(pool: &PgPool) -> Result<u64> {
    Ok(sqlx::query(
        "UPDATE email_outbox SET next_attempt_at = now()
         WHERE status = 'pending' AND next_attempt_at > now()
           AND starts_with(coalesce(last_error, ''), $1)",
    )
    .bind(RELAY_UNAVAILABLE)
    .execute(pool)
    .await?
    .rows_affected())
}

/// Which failed rows an operator puts back in the queue. Every filter is optional; `None`
/// everywhere requeues every failed row.
#[derive(Debug, Clone, Default)]
pub struct RequeueFilter {
    pub tenant: Option<String>,
    /// Rows created at or after this time.
    pub since: Option<chrono::DateTime<chrono::Utc>>,
    /// Rows created before this time.
    pub until: Option<chrono::DateTime<chrono::Utc>>,
    /// Rows whose last error contains this text (case-insensitive).
    pub error: Option<String>,
}

/// Puts failed rows back in the queue, due now, with a fresh `email.max_age_secs` window.
/// Attempts and the last error stay as a record. Returns how many rows were requeued.
pub async fn requeue_failed_emails(pool: &PgPool, filter: &RequeueFilter) -> Result<u64> {
    Ok(sqlx::query(
        "UPDATE email_outbox
         SET status = 'pending', next_attempt_at = now(), queued_at = now(), locked_until = NULL
         WHERE status = 'failed'
           AND ($1::text IS NULL OR tenant_id = $1)
           AND ($2::timestamptz IS NULL OR created_at >= $2)
           AND ($3::timestamptz IS NULL OR created_at < $3)
           AND ($4::text IS NULL OR strpos(lower(coalesce(last_error, '')), lower($4)) > 0)",
    )
    .bind(filter.tenant.as_deref())
    .bind(filter.since)
    .bind(filter.until)
    .bind(filter.error.as_deref())
    .execute(pool)
    .await?
    .rows_affected())
}
