//! Signing a user out before their tokens expire: `POST /api/v1/admin/revocations` on the
//! admin listener (the `admin` role), with `{"tenant", "user"}` and optionally
//! `"not_before"` (seconds since the epoch; default: now).
//!
//! Tokens of that user issued before `not_before` (by `iat`; a token without `iat` counts as
//! issued `auth.max_token_lifetime_secs` before its `exp`, the earliest it can have been) are
//! refused from then on, and their open streams end with `auth.expired`, on every instance:
//! this one at once, the others within `auth.jwks_reload_ms`, when they next read
//! `token_revocations`. A token issued in the same second as a sign-out is refused too, so
//! tokens issued from the next second on are accepted again (the user signed in anew).

use std::collections::HashMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::{Auth, Identity};
use crate::api::AppState;
use crate::api::error::ApiError;
use crate::api::request::{Input, Nothing};
use crate::model::valid_tenant;
use crate::store::revocations;

/// (tenant, user) → the second before which (and in which) their tokens were issued in vain.
pub type Revoked = HashMap<(String, String), u64>;

/// A sign-out, as asked and as answered.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Revocation {
    pub tenant: String,
    pub user: String,
    /// Tokens issued before this second (and in it) are refused. Default: now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<u64>,
}

impl Auth {
    /// Is a token of (tenant, user) issued at `issued_at` refused by a sign-out?
    pub(super) fn is_revoked(&self, tenant: &str, user_id: &str, issued_at: u64) -> bool {
        let revoked = self.revoked.load();
        if revoked.is_empty() {
            return false;
        }
        revoked
            .get(&(tenant.to_owned(), user_id.to_owned()))
            .is_some_and(|&not_before| issued_at <= not_before)
    }

    /// Takes in a sign-out at once (this instance's requests and streams), without waiting
    /// for the next read of the table.
    pub(super) fn revoke_here(&self, tenant: &str, user_id: &str, not_before: u64) {
        self.revoked.rcu(|current| {
            let mut next = Revoked::clone(current);
            let at = next
                .entry((tenant.to_owned(), user_id.to_owned()))
                .or_default();
            *at = (*at).max(not_before);
            next
        });
        self.announce_change();
    }

    /// Reads the sign-outs every instance wrote, every `every`, until `shutdown`; a new one
    /// tells the open streams. A failed read keeps what was known (and is read again next
    /// time).
    pub async fn watch_revocations(
        self: Arc<Self>,
        pool: PgPool,
        every: std::time::Duration,
        shutdown: CancellationToken,
    ) {
        loop {
            match revocations::since(&pool, self.horizon()).await {
                Ok(rows) => {
                    let now: Revoked = rows
                        .into_iter()
                        .map(|(tenant, user, at)| ((tenant, user), at.timestamp().max(0) as u64))
                        .collect();
                    let previous = self.revoked.load();
                    let news = now.iter().any(|(k, v)| previous.get(k) < Some(v));
                    // What this instance took in itself stays until the table has it too.
                    let mut merged = now;
                    for (k, v) in previous.iter() {
                        let at = merged.entry(k.clone()).or_default();
                        *at = (*at).max(*v);
                    }
                    let horizon = self.horizon().timestamp().max(0) as u64;
                    merged.retain(|_, at| *at >= horizon);
                    self.revoked.store(Arc::new(merged));
                    if news {
                        self.announce_change();
                    }
                }
                // Debug only: a database away is readiness's to report, not every 2 s here.
                Err(e) => {
                    tracing::debug!(error = %e.with_cause(), "sign-outs not read; retrying")
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
        }
    }

    /// The oldest sign-out that still matters: any token issued before it has expired.
    fn horizon(&self) -> DateTime<Utc> {
        Utc::now() - chrono::TimeDelta::seconds((self.max_lifetime_secs + self.leeway_secs) as i64)
    }
}

/// Signs a user out: their tokens issued so far are refused and their streams end, on every
/// instance. Admin listener, `admin` role.
pub async fn revoke(
    State(state): State<AppState>,
    identity: Identity,
    Input { body: request, .. }: Input<Nothing, Revocation>,
) -> Result<Json<Revocation>, ApiError> {
    crate::api::require_admin(&identity)?;
    if !valid_tenant(&request.tenant) || request.user.is_empty() || request.user.len() > 200 {
        return Err(ApiError::BadRequest(
            "tenant must be a tenant id and user a user id (1 to 200 bytes)".into(),
        ));
    }
    let not_before = request
        .not_before
        .unwrap_or_else(jsonwebtoken::get_current_timestamp);
    let at = DateTime::<Utc>::from_timestamp(not_before.min(i64::MAX as u64) as i64, 0)
        .filter(|at| *at <= Utc::now() + chrono::TimeDelta::days(1))
        .ok_or_else(|| {
            ApiError::BadRequest("not_before must be a time no later than a day from now".into())
        })?;
    let auth = &state.auth;
    revocations::revoke(
        &state.engine_pool,
        &request.tenant,
        &request.user,
        at,
        auth.horizon(),
    )
    .await?;
    auth.revoke_here(&request.tenant, &request.user, not_before);
    tracing::info!(tenant = %request.tenant, user = %request.user, not_before, "user signed out");
    Ok(Json(Revocation {
        not_before: Some(not_before),
        ..request
    }))
}
