//! The inbox API (`/api/v1/notifications`): list, count, read, archive.
//!
//! Every route is the caller's own inbox: tenant and user come from the token. An id that
//! is not one of the caller's inbox items (another user's, another tenant's, a live update,
//! or no number at all) answers 404, never 403, so the API is no oracle for what exists.
//! Every change is also an SSE event (`notification.read`, `notification.archived`) on the
//! user's other streams.
//!
//! Every route parses its query string and body by one rule ([`Input`]): an unknown query
//! parameter, a body over 16 KiB or a body field the route does not take is a `400`, on the
//! routes that take none too.

use axum::extract::{Path, State};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::AppState;
use super::auth::Identity;
use super::error::{ApiError, ErrorBody};
use super::request::{Input, Nothing};
use crate::model::StoredNotification;
use crate::store::inbox::{self, Archived, ListFilter};

/// Items per page unless `limit` says otherwise, and the most a page may hold.
pub const DEFAULT_LIMIT: i64 = 20;
pub const MAX_LIMIT: i64 = 100;
const MAX_CATEGORY: usize = 64;

pub fn routes() -> Router<AppState> {
    use axum::routing::{get, post};
    Router::new()
        .route("/api/v1/notifications", get(list))
        .route("/api/v1/notifications/unread-count", get(unread_count))
        .route("/api/v1/notifications/read-all", post(read_all))
        .route("/api/v1/notifications/{id}", get(get_one))
        .route("/api/v1/notifications/{id}/read", post(read))
        .route("/api/v1/notifications/{id}/archive", post(archive))
        .route("/api/v1/notifications/{id}/unarchive", post(unarchive))
}

/// An inbox item.
#[derive(Debug, Serialize, ToSchema)]
pub struct Notification {
    /// The item's id: the user's sequence number, the same as its SSE `id:`.
    pub id: i64,
    /// The id of the Kafka event it came from.
    pub event_id: String,
    pub title: Option<String>,
    pub body: Option<String>,
    pub category: Option<String>,
    /// What the routing plugin attached (e.g. an order id and a link).
    #[schema(value_type = Object)]
    pub data: serde_json::Value,
    pub created_at: DateTime<Utc>,
    /// When it was marked read; `null`: unread.
    pub read_at: Option<DateTime<Utc>>,
    /// When it was archived; `null`: in the inbox.
    pub archived_at: Option<DateTime<Utc>>,
}

impl From<StoredNotification> for Notification {
    fn from(n: StoredNotification) -> Self {
        Self {
            id: n.seq,
            event_id: n.event_id,
            title: n.title,
            body: n.body,
            category: n.category,
            data: n.data.0,
            created_at: n.created_at,
            read_at: n.read_at,
            archived_at: n.archived_at,
        }
    }
}

/// One page of the inbox, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct NotificationPage {
    pub items: Vec<Notification>,
    /// Pass as `cursor` for the next (older) page; `null`: this is the last page. Opaque.
    pub next_cursor: Option<String>,
}

/// Which items a list shows by archive state.
#[derive(Debug, Clone, Copy, Default, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ArchivedFilter {
    /// Not archived (the inbox).
    #[default]
    False,
    /// Only archived ones.
    True,
    /// Both.
    Any,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// `next_cursor` of the previous page; absent: the newest items.
    pub cursor: Option<String>,
    /// Items per page, 1 to 100 (default 20).
    pub limit: Option<i64>,
    /// `true`: only unread items.
    pub unread: Option<bool>,
    /// `false` (default): not archived; `true`: archived only; `any`: both.
    pub archived: Option<ArchivedFilter>,
    /// Only items of this category.
    pub category: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct UnreadCount {
    /// Inbox items neither read nor archived.
    pub unread_count: i64,
}

/// An item after a change, and the unread count after it.
#[derive(Debug, Serialize, ToSchema)]
pub struct NotificationChanged {
    pub notification: Notification,
    pub unread_count: i64,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReadAllRequest {
    /// The newest id the user has seen: items up to and including it are marked read,
    /// newer ones stay unread.
    pub up_to: i64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ReadAllResponse {
    /// Items that changed from unread to read.
    pub marked: u64,
    pub unread_count: i64,
}

/// List the caller's inbox, newest first.
#[utoipa::path(
    get, path = "/api/v1/notifications", tag = "inbox", operation_id = "listNotifications",
    params(ListQuery),
    responses(
        (status = 200, description = "A page of inbox items", body = NotificationPage),
        (status = 400, description = "A malformed or unknown parameter, or a body", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 429, description = "A request limit; see `Retry-After`", body = ErrorBody),
    ),
    security(("bearer" = []), ("cookie" = [])),
)]
pub async fn list(
    State(state): State<AppState>,
    identity: Identity,
    Input { query, .. }: Input<ListQuery>,
) -> Result<Json<NotificationPage>, ApiError> {
    let limit = query.limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(ApiError::BadRequest(format!(
            "limit must be between 1 and {MAX_LIMIT}"
        )));
    }
    let before =
        match &query.cursor {
            None => None,
            Some(c) => Some(c.parse::<i64>().ok().filter(|n| *n > 0).ok_or_else(|| {
                ApiError::BadRequest("cursor is not one this API returned".into())
            })?),
        };
    if query
        .category
        .as_ref()
        .is_some_and(|c| c.is_empty() || c.len() > MAX_CATEGORY)
    {
        return Err(ApiError::BadRequest(format!(
            "category must be 1..={MAX_CATEGORY} bytes"
        )));
    }
    let filter = ListFilter {
        before,
        // One more than asked tells whether there is a next page.
        limit: limit + 1,
        unread_only: query.unread.unwrap_or(false),
        archived: match query.archived.unwrap_or_default() {
            ArchivedFilter::False => Archived::Exclude,
            ArchivedFilter::True => Archived::Only,
            ArchivedFilter::Any => Archived::Include,
        },
        category: query.category,
    };
    let mut rows = inbox::list(&state.pool, &identity.tenant, &identity.user_id, &filter).await?;
    let more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    let next_cursor = more
        .then(|| rows.last().map(|n| n.seq.to_string()))
        .flatten();
    Ok(Json(NotificationPage {
        items: rows.into_iter().map(Notification::from).collect(),
        next_cursor,
    }))
}

/// How many inbox items are unread (for the bell).
#[utoipa::path(
    get, path = "/api/v1/notifications/unread-count", tag = "inbox", operation_id = "getUnreadCount",
    responses(
        (status = 200, body = UnreadCount),
        (status = 400, description = "An unknown query parameter, or a body that is not `{}` or is over 16 KiB", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 429, description = "A request limit; see `Retry-After`", body = ErrorBody),
    ),
    security(("bearer" = []), ("cookie" = [])),
)]
pub async fn unread_count(
    State(state): State<AppState>,
    identity: Identity,
    _: Input,
) -> Result<Json<UnreadCount>, ApiError> {
    let unread_count =
        inbox::unread_count(&state.pool, &identity.tenant, &identity.user_id).await?;
    Ok(Json(UnreadCount { unread_count }))
}

/// One inbox item.
#[utoipa::path(
    get, path = "/api/v1/notifications/{id}", tag = "inbox", operation_id = "getNotification",
    params(("id" = i64, Path, description = "The item's id")),
    responses(
        (status = 200, body = Notification),
        (status = 400, description = "An unknown query parameter, or a body that is not `{}` or is over 16 KiB", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 429, description = "A request limit; see `Retry-After`", body = ErrorBody),
        (status = 404, description = "Not one of the caller's inbox items", body = ErrorBody),
    ),
    security(("bearer" = []), ("cookie" = [])),
)]
pub async fn get_one(
    State(state): State<AppState>,
    identity: Identity,
    Path(id): Path<String>,
    _: Input,
) -> Result<Json<Notification>, ApiError> {
    let id = parse_id(&id)?;
    inbox::get(&state.pool, &identity.tenant, &identity.user_id, id)
        .await?
        .map(|n| Json(n.into()))
        .ok_or_else(not_found)
}

/// Mark one item read (idempotent).
#[utoipa::path(
    post, path = "/api/v1/notifications/{id}/read", tag = "inbox", operation_id = "markNotificationRead",
    params(("id" = i64, Path, description = "The item's id")),
    responses(
        (status = 200, body = NotificationChanged),
        (status = 400, description = "An unknown query parameter, or a body that is not `{}` or is over 16 KiB", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 429, description = "A request limit; see `Retry-After`", body = ErrorBody),
        (status = 404, description = "Not one of the caller's inbox items", body = ErrorBody),
    ),
    security(("bearer" = []), ("cookie" = [])),
)]
pub async fn read(
    State(state): State<AppState>,
    identity: Identity,
    Path(id): Path<String>,
    _: Input,
) -> Result<Json<NotificationChanged>, ApiError> {
    let id = parse_id(&id)?;
    let change = inbox::mark_read(
        &state.pool,
        state.hub.seal(),
        &identity.tenant,
        &identity.user_id,
        id,
    )
    .await?;
    item_changed(&state, &identity, change)
}

/// Mark every item up to `up_to` read: what the user has seen, not what arrived since.
#[utoipa::path(
    post, path = "/api/v1/notifications/read-all", tag = "inbox", operation_id = "markAllNotificationsRead",
    request_body = ReadAllRequest,
    responses(
        (status = 200, body = ReadAllResponse),
        (status = 400, description = "A malformed body, one over 16 KiB, or a query parameter", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 429, description = "A request limit; see `Retry-After`", body = ErrorBody),
    ),
    security(("bearer" = []), ("cookie" = [])),
)]
pub async fn read_all(
    State(state): State<AppState>,
    identity: Identity,
    Input { body, .. }: Input<Nothing, ReadAllRequest>,
) -> Result<Json<ReadAllResponse>, ApiError> {
    if body.up_to < 0 {
        return Err(ApiError::BadRequest("up_to must be an id (≥ 0)".into()));
    }
    let change = inbox::mark_all_read(
        &state.pool,
        state.hub.seal(),
        &identity.tenant,
        &identity.user_id,
        body.up_to,
    )
    .await?;
    publish(&state, &identity, change.event_seq);
    Ok(Json(ReadAllResponse {
        marked: change.result,
        unread_count: change.unread_count,
    }))
}

/// Archive one item (idempotent): it leaves the default list and the unread count.
#[utoipa::path(
    post, path = "/api/v1/notifications/{id}/archive", tag = "inbox", operation_id = "archiveNotification",
    params(("id" = i64, Path, description = "The item's id")),
    responses(
        (status = 200, body = NotificationChanged),
        (status = 400, description = "An unknown query parameter, or a body that is not `{}` or is over 16 KiB", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 429, description = "A request limit; see `Retry-After`", body = ErrorBody),
        (status = 404, description = "Not one of the caller's inbox items", body = ErrorBody),
    ),
    security(("bearer" = []), ("cookie" = [])),
)]
pub async fn archive(
    state: State<AppState>,
    identity: Identity,
    id: Path<String>,
    _: Input,
) -> Result<Json<NotificationChanged>, ApiError> {
    set_archived(state, identity, id, true).await
}

/// Put an archived item back in the inbox (idempotent).
#[utoipa::path(
    post, path = "/api/v1/notifications/{id}/unarchive", tag = "inbox", operation_id = "unarchiveNotification",
    params(("id" = i64, Path, description = "The item's id")),
    responses(
        (status = 200, body = NotificationChanged),
        (status = 400, description = "An unknown query parameter, or a body that is not `{}` or is over 16 KiB", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 429, description = "A request limit; see `Retry-After`", body = ErrorBody),
        (status = 404, description = "Not one of the caller's inbox items", body = ErrorBody),
    ),
    security(("bearer" = []), ("cookie" = [])),
)]
pub async fn unarchive(
    state: State<AppState>,
    identity: Identity,
    id: Path<String>,
    _: Input,
) -> Result<Json<NotificationChanged>, ApiError> {
    set_archived(state, identity, id, false).await
}

async fn set_archived(
    State(state): State<AppState>,
    identity: Identity,
    Path(id): Path<String>,
    archived: bool,
) -> Result<Json<NotificationChanged>, ApiError> {
    let id = parse_id(&id)?;
    let change = inbox::set_archived(
        &state.pool,
        state.hub.seal(),
        &identity.tenant,
        &identity.user_id,
        id,
        archived,
    )
    .await?;
    item_changed(&state, &identity, change)
}

/// The answer to a change of one item (404 when it is not the caller's), after waking the
/// user's streams for its change event.
fn item_changed(
    state: &AppState,
    identity: &Identity,
    change: Option<inbox::Change<StoredNotification>>,
) -> Result<Json<NotificationChanged>, ApiError> {
    let change = change.ok_or_else(not_found)?;
    publish(state, identity, change.event_seq);
    Ok(Json(NotificationChanged {
        notification: change.result.into(),
        unread_count: change.unread_count,
    }))
}

/// Wakes the user's streams for a committed change event.
fn publish(state: &AppState, identity: &Identity, event_seq: Option<i64>) {
    if let Some(seq) = event_seq {
        state.hub.publish(&identity.tenant, &identity.user_id, seq);
    }
}

/// Anything but a positive number is not an id of the caller's: 404 like a foreign id.
fn parse_id(id: &str) -> Result<i64, ApiError> {
    id.parse::<i64>()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(not_found)
}

fn not_found() -> ApiError {
    ApiError::NotFound("no such notification".into())
}
