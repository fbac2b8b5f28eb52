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
}

pub async fn issue(
    pool: &PgPool,
    ticket_sha256: &[u8],
    tenant: &str,
    user_id: &str,
    token_expires_at: DateTime<Utc>,
    expires_at: DateTime<Utc>,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO sse_tickets (ticket_sha256, tenant_id, user_id, token_expires_at, expires_at)
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(ticket_sha256)
    .bind(tenant)
    .bind(user_id)
    .bind(token_expires_at)
    .bind(expires_at)
    .execute(pool)
    .await?;
    Ok(())
}

/// Consumes a ticket. `None`: unknown, already used, or expired. Freshness is judged on the
/// engine's clock, the one that set `expires_at` when the ticket was issued (not on
/// PostgreSQL's `now()`, which is the start of a transaction and another machine's clock).
pub async fn redeem(pool: &PgPool, ticket_sha256: &[u8]) -> Result<Option<Redeemed>> {
    let row: Option<(String, String, DateTime<Utc>, DateTime<Utc>)> = sqlx::query_as(
        "DELETE FROM sse_tickets WHERE ticket_sha256 = $1
         RETURNING tenant_id, user_id, token_expires_at, expires_at",
    )
    .bind(ticket_sha256)
    .fetch_optional(pool)
    .await?;
    let now = Utc::now();
    Ok(row.filter(|(_, _, _, expires_at)| *expires_at > now).map(
        |(tenant, user_id, token_expires_at, _)| Redeemed {
            tenant,
            user_id,
            token_expires_at,
        },
    ))
}
