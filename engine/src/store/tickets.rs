//! Stream tickets: single-use, short-lived stand-ins for a token in an `EventSource` URL.
//!
//! Only the ticket's SHA-256 is stored. Redeeming deletes the row whether or not it is
//! still fresh, so a ticket opens at most one stream, on whichever instance sees it first.

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use super::Result;

/// Who a redeemed ticket speaks for, and until when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redeemed {
    pub tenant: String,
    pub user_id: String,
    /// When the token that bought the ticket expires: the stream ends then.
    pub token_expires_at: DateTime<Utc>,
    /// When that token was issued (`None`: a ticket from before this was recorded).
    pub token_issued_at: Option<DateTime<Utc>>,
    /// The stamp of the key that verified that token (`None`: as above).
    pub key_stamp: Option<String>,
}

/// A new ticket for `who` (whose `tenant`, `user_id` and token times are recorded; its
/// `key_stamp` too), worthless after `expires_at`.
pub async fn issue(
    pool: &PgPool,
    ticket_sha256: &[u8],
    who: &Redeemed,
    expires_at: DateTime<Utc>,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO sse_tickets
           (ticket_sha256, tenant_id, user_id, token_expires_at, expires_at, token_issued_at, key_stamp)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(ticket_sha256)
    .bind(&who.tenant)
    .bind(&who.user_id)
    .bind(who.token_expires_at)
    .bind(expires_at)
    .bind(who.token_issued_at)
    .bind(&who.key_stamp)
    .execute(pool)
    .await?;
    Ok(())
}

/// Consumes a ticket. `None`: unknown, already used, or expired. Freshness is judged on the
/// engine's clock, the one that set `expires_at` when the ticket was issued (not on
/// PostgreSQL's `now()`, which is the start of a transaction and another machine's clock).
pub async fn redeem(pool: &PgPool, ticket_sha256: &[u8]) -> Result<Option<Redeemed>> {
    type Row = (
        String,
        String,
        DateTime<Utc>,
        DateTime<Utc>,
        Option<DateTime<Utc>>,
        Option<String>,
    );
    let row: Option<Row> = sqlx::query_as(
        "DELETE FROM sse_tickets WHERE ticket_sha256 = $1
         RETURNING tenant_id, user_id, token_expires_at, expires_at, token_issued_at, key_stamp",
    )
    .bind(ticket_sha256)
    .fetch_optional(pool)
    .await?;
    let now = Utc::now();
    Ok(row.filter(|row| row.3 > now).map(
        |(tenant, user_id, token_expires_at, _, token_issued_at, key_stamp)| Redeemed {
            tenant,
            user_id,
            token_expires_at,
            token_issued_at,
            key_stamp,
        },
    ))
}
