//! `notifications` and `user_streams`: the rows a batch stores for users (numbered per user
//! in one statement) and the reads of a user's stream after a sequence number. The inbox's
//! own reads and writes are in [`super::inbox`].

use serde_json::{Map, Value};
use sqlx::{PgConnection, PgPool};

use super::{Result, StoreError, scoped};
use crate::model::StoredNotification;

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

/// What [`insert_notifications`] stored, in the order given.
pub struct Inserted {
    /// Each row's sequence number (one user's rows get consecutive numbers in that order).
    pub seqs: Vec<i64>,
    /// Their `created_at`: the transaction's start, the same for all.
    pub created_at: chrono::DateTime<chrono::Utc>,
    /// Each row's bytes of title, body and data (as serialized for the statement).
    pub sizes: Vec<usize>,
}

/// Stores notifications, each under its user's next sequence number, in one statement
/// whatever their number (numbering and inserting were two round trips; a batch's
/// transaction is mostly round trips).
///
/// The next number is never below one past the highest sequence number stored for the user:
/// a `user_streams` row lost or set back by a restore or an operator's mistake heals itself
/// instead of colliding with the user's existing notifications forever. Users' stream rows
/// are locked in (tenant, user) order, so two writers never wait on each other in a cycle.
pub async fn insert_notifications(
    tx: &mut PgConnection,
    rows: &[NewNotification<'_>],
) -> Result<Inserted> {
    if rows.is_empty() {
        return Ok(Inserted {
            seqs: Vec::new(),
            created_at: chrono::Utc::now(),
            sizes: Vec::new(),
        });
    }
    let data: Vec<String> = rows
        .iter()
        .map(|n| serde_json::to_string(n.data).expect("a JSON map serializes"))
        .collect();
    let numbered = number_and_insert(tx, rows, &data).await?;
    if numbered.len() != rows.len() {
        // Every row has its user's stream row, returned by the upsert; anything else is a
        // bug, not the data's fault.
        return Err(StoreError::Sqlx(sqlx::Error::Protocol(format!(
            "{} notifications numbered for {} rows",
            numbered.len(),
            rows.len()
        ))));
    }
    Ok(Inserted {
        created_at: numbered[0].1,
        sizes: sizes(rows, &data),
        seqs: numbered.into_iter().map(|(seq, _)| seq).collect(),
    })
}

/// [`insert_notifications`]' statement. Each user's rows are numbered on from the stream's
/// new last number, in the order given (`ord`): last - n + 1, last - n + 2, ...
const INSERT_NOTIFICATIONS_SQL: &str = "WITH x AS (
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                              $6::text[], $7::text[], $8::text[]) WITH ORDINALITY
             AS x (t, u, e, k, ti, b, c, d, ord)
     ),
     input AS (
         SELECT t AS tenant_id, u AS user_id, count(*) AS n FROM x GROUP BY t, u
     ),
     streams AS (
         INSERT INTO user_streams AS s (tenant_id, user_id, last_seq)
         SELECT i.tenant_id, i.user_id, i.n + coalesce(
             (SELECT max(seq) FROM notifications old
              WHERE old.tenant_id = i.tenant_id AND old.user_id = i.user_id), 0)
         FROM input i
         ORDER BY i.tenant_id, i.user_id
         ON CONFLICT (tenant_id, user_id) DO UPDATE SET last_seq =
             greatest(s.last_seq, EXCLUDED.last_seq - (SELECT n FROM input
                 WHERE input.tenant_id = EXCLUDED.tenant_id AND input.user_id = EXCLUDED.user_id))
             + (SELECT n FROM input
                WHERE input.tenant_id = EXCLUDED.tenant_id AND input.user_id = EXCLUDED.user_id)
         RETURNING tenant_id, user_id, last_seq
     ),
     numbered AS (
         SELECT x.*, s.last_seq - i.n
                     + row_number() OVER (PARTITION BY x.t, x.u ORDER BY x.ord) AS seq
         FROM x
         JOIN streams s ON s.tenant_id = x.t AND s.user_id = x.u
         JOIN input i ON i.tenant_id = x.t AND i.user_id = x.u
     ),
     inserted AS (
         INSERT INTO notifications
             (tenant_id, user_id, seq, event_id, kind, title, body, category, data)
         SELECT t, u, seq, e, k, ti, b, c, d::jsonb FROM numbered
     )
     SELECT seq, now() FROM numbered ORDER BY ord";

/// Runs [`INSERT_NOTIFICATIONS_SQL`] on `rows` (their `data` serialized as given): each
/// row's sequence number and the transaction's start, in the order given.
async fn number_and_insert(
    tx: &mut PgConnection,
    rows: &[NewNotification<'_>],
    data: &[String],
) -> Result<Vec<(i64, chrono::DateTime<chrono::Utc>)>> {
    Ok(sqlx::query_as(INSERT_NOTIFICATIONS_SQL)
        .bind(rows.iter().map(|n| n.tenant).collect::<Vec<_>>())
        .bind(rows.iter().map(|n| n.user_id).collect::<Vec<_>>())
        .bind(rows.iter().map(|n| n.event_id).collect::<Vec<_>>())
        .bind(rows.iter().map(|n| n.kind).collect::<Vec<_>>())
        .bind(rows.iter().map(|n| n.title).collect::<Vec<_>>())
        .bind(rows.iter().map(|n| n.body).collect::<Vec<_>>())
        .bind(rows.iter().map(|n| n.category).collect::<Vec<_>>())
        .bind(data)
        .fetch_all(&mut *tx)
        .await?)
}

/// Each row's bytes of title, body and `data` (as serialized for the statement).
fn sizes(rows: &[NewNotification<'_>], data: &[String]) -> Vec<usize> {
    rows.iter()
        .zip(data)
        .map(|(n, d)| n.title.map_or(0, str::len) + n.body.map_or(0, str::len) + d.len())
        .collect()
}

impl NewNotification<'_> {
    /// The row as stored under `seq` at `created_at`, as its streams send it.
    pub fn stored(
        &self,
        seq: i64,
        created_at: chrono::DateTime<chrono::Utc>,
    ) -> StoredNotification {
        StoredNotification {
            seq,
            event_id: self.event_id.to_owned(),
            kind: self.kind.to_owned(),
            title: self.title.map(str::to_owned),
            body: self.body.map(str::to_owned),
            category: self.category.map(str::to_owned),
            data: sqlx::types::Json(Value::Object(self.data.clone())),
            created_at,
            read_at: None,
            archived_at: None,
            frame_data: Default::default(),
        }
    }
}

/// The user's notifications after `after_seq`, oldest first: at most `limit` rows and, past
/// the first row, at most `max_bytes` of title, body and data, so a stream never holds more
/// than one such page (or one row) in memory. Every read is scoped by tenant *and* user:
/// there is no query that takes only one of them.
pub async fn notifications_after(
    pool: &PgPool,
    tenant: &str,
    user_id: &str,
    after_seq: i64,
    limit: i64,
    max_bytes: i64,
) -> Result<Vec<StoredNotification>> {
    let mut tx = scoped(pool, tenant, user_id).await?;
    let rows = sqlx::query_as(
        "SELECT seq, event_id, kind, title, body, category, data, created_at, read_at, archived_at
         FROM (
             SELECT page.*, sum(size) OVER (ORDER BY seq) AS running
             FROM (
                 SELECT seq, event_id, kind, title, body, category, data, created_at, read_at,
                        archived_at,
                        octet_length(coalesce(title, '')) + octet_length(coalesce(body, ''))
                            + octet_length(data::text) AS size
                 FROM notifications
                 WHERE tenant_id = $1 AND user_id = $2 AND seq > $3
                 ORDER BY seq
                 LIMIT $4
             ) page
         ) sized
         WHERE running <= $5 OR running = size
         ORDER BY seq",
    )
    .bind(tenant)
    .bind(user_id)
    .bind(after_seq)
    .bind(limit)
    .bind(max_bytes)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(rows)
}

/// The user's latest sequence number (0 when they have none).
pub async fn latest_seq(pool: &PgPool, tenant: &str, user_id: &str) -> Result<i64> {
    let mut tx = scoped(pool, tenant, user_id).await?;
    let row: Option<(i64,)> =
        sqlx::query_as("SELECT last_seq FROM user_streams WHERE tenant_id = $1 AND user_id = $2")
            .bind(tenant)
            .bind(user_id)
            .fetch_optional(&mut *tx)
            .await?;
    tx.commit().await?;
    Ok(row.map_or(0, |r| r.0))
}
