//! `POST /api/v1/sse/tickets`: trades a token for a single-use stream ticket.
//!
//! A browser's `EventSource` cannot send an `Authorization` header, and a cookie is not
//! always possible (another site, a third-party cookie policy). The page asks for a ticket
//! with its token (a `fetch` can send the header) and opens
//! `/api/v1/sse?ticket=<ticket>` within `auth.ticket_ttl_secs` (≤ 30 s). The ticket opens one
//! stream; the stream ends when the token would have expired. A ticket is the only
//! credential ever allowed in a URL, and access logs record paths without query strings.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::IntoResponse;
use base64::Engine;
use chrono::{DateTime, TimeDelta, Utc};
use rand::RngCore;
use serde::Serialize;
use sha2::{Digest, Sha256};
use utoipa::ToSchema;

use super::AppState;
use super::auth::{Identity, refuse};
use super::error::{ApiError, ErrorBody};
use super::request::Input;
use crate::store::tickets::{self, Redeemed};

/// The query parameter of `GET /api/v1/sse` that carries a ticket.
pub const TICKET_PARAM: &str = "ticket";
/// A ticket is 32 random bytes, base64url without padding.
const TICKET_LEN: usize = 43;

#[derive(Debug, Serialize, ToSchema)]
pub struct Ticket {
    /// Single use; pass as the `ticket` query parameter of `GET /api/v1/sse`.
    pub ticket: String,
    /// Seconds until it is worthless.
    pub expires_in: u64,
    /// The stream URL with the ticket, relative to the API's origin.
    pub url: String,
}

/// Get a single-use ticket for `GET /api/v1/sse?ticket=…` (for `EventSource`).
#[utoipa::path(
    post, path = "/api/v1/sse/tickets", tag = "stream", operation_id = "createStreamTicket",
    responses(
        (status = 201, description = "A ticket valid for `expires_in` seconds", body = Ticket),
        (status = 400, description = "An unknown query parameter, or a body that is not `{}` or is over 16 KiB", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 429, description = "More than `sse.tickets_per_minute` for this user, or a request limit; see `Retry-After`", body = ErrorBody),
    ),
    security(("bearer" = []), ("cookie" = [])),
)]
pub async fn create(
    State(state): State<AppState>,
    identity: Identity,
    _: Input,
) -> Result<impl IntoResponse, ApiError> {
    let token_expires_at = DateTime::<Utc>::from_timestamp(identity.expires_at as i64, 0)
        .ok_or_else(|| refuse("exp out of range"))?;
    let now = Utc::now();
    let ttl = TimeDelta::seconds(state.ticket_ttl_secs as i64).min(token_expires_at - now);
    if ttl <= TimeDelta::zero() {
        return Err(refuse("token expires now"));
    }
    // Each ticket is a row until it is used or expires: a user gets a bounded number.
    state
        .hub
        .ticket(
            &identity.tenant,
            &identity.user_id,
            state.sse.tickets_per_minute,
            std::time::Instant::now(),
        )
        .map_err(|wait| ApiError::RateLimited {
            message: format!(
                "too many stream tickets for this user (sse.tickets_per_minute = {}); retry later",
                state.sse.tickets_per_minute
            ),
            retry_after_secs: wait.as_secs().max(1),
        })?;
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let ticket = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let who = Redeemed {
        tenant: identity.tenant,
        user_id: identity.user_id,
        token_expires_at,
        token_issued_at: DateTime::<Utc>::from_timestamp(identity.issued_at as i64, 0),
        key_stamp: Some(identity.key.to_string()),
    };
    tickets::issue(
        &state.pool,
        &Sha256::digest(ticket.as_bytes()),
        &who,
        now + ttl,
    )
    .await?;
    let url = format!("/api/v1/sse?{TICKET_PARAM}={ticket}");
    let body = Ticket {
        ticket,
        expires_in: ttl.num_seconds().max(1) as u64,
        url,
    };
    Ok((
        StatusCode::CREATED,
        [(header::CACHE_CONTROL, HeaderValue::from_static("no-store"))],
        Json(body),
    ))
}

/// The identity a ticket stands for, consuming it. Unknown, used and late tickets are
/// refused alike.
pub async fn redeem(state: &AppState, ticket: &str) -> Result<Identity, ApiError> {
    if ticket.len() != TICKET_LEN {
        return Err(refuse("malformed ticket"));
    }
    let Redeemed {
        tenant,
        user_id,
        token_expires_at,
        token_issued_at,
        key_stamp,
    } = tickets::redeem(&state.pool, &Sha256::digest(ticket.as_bytes()))
        .await?
        .ok_or_else(|| refuse("unknown, used or expired ticket"))?;
    let identity = Identity {
        tenant,
        user_id,
        roles: Vec::new(),
        expires_at: token_expires_at.timestamp().max(0) as u64,
        // A ticket from before these were recorded (at most `auth.ticket_ttl_secs` old at the
        // upgrade) names no key in force: refused below, and its client buys a new one.
        issued_at: token_issued_at.map_or(0, |t| t.timestamp().max(0) as u64),
        key: key_stamp.unwrap_or_default().into(),
    };
    // The token's key removed, or its user signed out, since the ticket was bought.
    state.auth.still_valid(&identity).map_err(refuse)?;
    Ok(identity)
}
