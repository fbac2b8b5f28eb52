//! `token_revocations`: users signed out by an operator, each with the moment before which
//! their tokens are refused. Small by construction: a row outlives its use only until the
//! next revocation is written, which deletes the rows no live token can predate.

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use super::Result;

/// Signs (tenant, user) out as of `not_before` (a later revocation of the same user wins,
/// an earlier one changes nothing), and deletes the revocations older than `forget_before`
/// (every token issued before them has expired).
pub async fn revoke(
    pool: &PgPool,
    tenant: &str,
    user_id: &str,
    not_before: DateTime<Utc>,
    forget_before: DateTime<Utc>,
) -> Result<()> {
    let mut tx = pool.begin().await?;
    sqlx::query("DELETE FROM token_revocations WHERE not_before < $1")
        .bind(forget_before)
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "INSERT INTO token_revocations (tenant_id, user_id, not_before) VALUES ($1, $2, $3)
         ON CONFLICT (tenant_id, user_id)
         DO UPDATE SET not_before = GREATEST(token_revocations.not_before, EXCLUDED.not_before)",
    )
    .bind(tenant)
    .bind(user_id)
    .bind(not_before)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Every revocation at or after `since`: (tenant, user, not_before).
pub async fn since(
    pool: &PgPool,
    since: DateTime<Utc>,
) -> Result<Vec<(String, String, DateTime<Utc>)>> {
    Ok(sqlx::query_as(
        "SELECT tenant_id, user_id, not_before FROM token_revocations WHERE not_before >= $1",
    )
    .bind(since)
    .fetch_all(pool)
    .await?)
}
