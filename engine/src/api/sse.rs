//! `GET /api/v1/sse`: a user's notifications as Server-Sent Events.
//!
//! Events: `notification` (an inbox item), `notification.read` and `notification.archived`
//! (the user changed an item, perhaps in another tab), live updates named by the routing
//! plugin (`order.updated`, ...), and `auth.expired` as the last frame when the token runs
//! out. Every event carries `id:` = the user's sequence number; a client reconnecting with
//! `Last-Event-ID: N` first receives everything after N, from PostgreSQL, in order. Without
//! the header the stream starts at "now". `contracts/asyncapi.json` is the contract.
//!
//! The stream takes the rows its instance just committed from the hub's memory, reads
//! anything else from PostgreSQL page by page, and sleeps on the hub in between, so a slow
//! client only slows its own reads: nothing is buffered for it beyond one page and the hub's
//! bounded window of its user's rows (`hub`), and a client that stops reading, or reads too
//! slowly to catch up, is cut off by the listener's write deadline (`http.write_timeout_ms`)
//! and catches up by replay.
//!
//! The handler reads as the story of opening a stream: the request's cursor ([`LastEventId`]),
//! who asks, a subscription within the caps, the deep-replay limit, then the stream itself:
//! a [`reader`] that yields typed [`frame`]s, each encoded in one place.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{FromRequestParts, RawQuery, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;

use super::AppState;
use super::auth::Identity;
use super::error::{ApiError, ErrorBody};
use super::tickets::{self, TICKET_PARAM};
use crate::hub::{CapExceeded, Caps, Subscription};
use crate::store::notifications;

mod frame;
mod reader;

use reader::Reader;

/// The query parameter standing in for the `Last-Event-ID` header.
pub const LAST_EVENT_ID_PARAM: &str = "last_event_id";

/// The last frame of a stream whose token expired.
pub const AUTH_EXPIRED_EVENT: &str = "auth.expired";

/// The user's notifications as they happen, after a replay from `Last-Event-ID`.
#[utoipa::path(
    get, path = "/api/v1/sse", tag = "stream", operation_id = "openStream",
    params(
        ("Last-Event-ID" = Option<String>, Header, description = "The last `id:` received: the stream replays what came after it"),
        ("ticket" = Option<String>, Query, description = "A single-use ticket from `POST /api/v1/sse/tickets`, for `EventSource`"),
        ("last_event_id" = Option<String>, Query, description = "Stands in for `Last-Event-ID` when the header cannot be set (a new `EventSource`); the header wins"),
    ),
    responses(
        (status = 200, description = "`text/event-stream`; the events are specified in contracts/asyncapi.json", content_type = "text/event-stream", body = String),
        (status = 400, description = "A malformed `Last-Event-ID`", body = ErrorBody),
        (status = 401, description = "No valid token or ticket", body = ErrorBody),
        (status = 429, description = "A connection cap, the deep-replay limit or a request limit", body = ErrorBody),
    ),
    security(("bearer" = []), ("cookie" = []), ("ticket" = [])),
)]
pub async fn stream(
    State(state): State<AppState>,
    LastEventId(last_event_id): LastEventId,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    // After the checks of the request itself (the extractors above): redeeming uses the
    // ticket up, so a malformed request keeps it (a refusal by a cap after this point does
    // not: the client asks again).
    let identity = match query_param(query.as_deref(), TICKET_PARAM) {
        // The limits layer charged the ticket to its address; now it is its user's too.
        Some(ticket) => {
            let identity = tickets::redeem(&state, &ticket).await?;
            state.limits.admit_identity(&identity)?;
            identity
        }
        None => state.auth.authenticate(&headers)?,
    };
    // Subscribe before reading the cursor: whatever commits after this point wakes us.
    let subscription = subscribe(&state, &identity)?;
    let latest =
        notifications::latest_seq(&state.pool, &identity.tenant, &identity.user_id).await?;
    // An id beyond the latest (a tab left open across a database reset) would hide every
    // new event until the sequence caught up; start from "now" instead.
    let cursor = last_event_id.map_or(latest, |n| n.min(latest));
    if latest - cursor > state.sse.page_size || (last_event_id == Some(0) && latest > 0) {
        allow_deep_replay(&state, &identity)?;
    }
    tracing::debug!(tenant = %identity.tenant, user = %identity.user_id, cursor, "sse stream opened");
    let reader = Reader::open(&state, identity, cursor, subscription);
    let events = futures::stream::unfold(reader, |mut r| async move {
        let event = r.next().await?.event();
        Some((Ok::<_, Infallible>(event), r))
    });
    let mut response = sse_response(events, Duration::from_secs(state.sse.keepalive_secs));
    let h = response.headers_mut();
    // nginx and friends must not buffer the stream.
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    h.insert("cache-control", HeaderValue::from_static("no-cache"));
    Ok(response)
}

/// Where a reconnecting client resumes: the `Last-Event-ID` header, which browsers send on
/// their own reconnects; else the `last_event_id` query parameter, for a page that opens a
/// new `EventSource` (with a new ticket) and cannot set headers. `None`: from "now".
/// Anything but a non-negative integer answers 400.
#[derive(Debug, PartialEq, Eq)]
pub struct LastEventId(pub Option<i64>);

impl LastEventId {
    fn from_request(headers: &HeaderMap, query: Option<&str>) -> Result<Self, ApiError> {
        let raw = headers
            .get("last-event-id")
            .map(|v| v.to_str().unwrap_or("?").to_owned())
            .or_else(|| query_param(query, LAST_EVENT_ID_PARAM));
        let Some(raw) = raw else {
            return Ok(Self(None));
        };
        let id = raw.trim().parse::<i64>().ok().filter(|n| *n >= 0);
        id.map(|n| Self(Some(n))).ok_or_else(|| {
            ApiError::BadRequest(
                "Last-Event-ID must be an id this stream sent (a non-negative integer)".into(),
            )
        })
    }
}

impl<S: Send + Sync> FromRequestParts<S> for LastEventId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        Self::from_request(&parts.headers, parts.uri.query())
    }
}

/// The first value of `name` in a query string.
fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    url::form_urlencoded::parse(query?.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// A subscription to the user's rows, within the per-user, per-tenant and global caps (a
/// tenant's cap is its share of what the others leave: [`crate::hub::tenant_room`]).
fn subscribe(state: &AppState, identity: &Identity) -> Result<Subscription, ApiError> {
    let caps = Caps {
        per_user: state.sse.max_connections_per_user,
        per_tenant: state.sse.max_connections_per_tenant,
        global: state.sse.max_connections,
        tenant_share: state.sse.tenant_share,
    };
    state
        .hub
        .subscribe(&identity.tenant, &identity.user_id, caps)
        .map_err(|e| {
            state.metrics.sse_rejected.inc();
            ApiError::TooManyRequests(match e {
                CapExceeded::User => "too many open streams for this user".into(),
                CapExceeded::Tenant => {
                    "too many open streams for this tenant; try again later".into()
                }
                CapExceeded::Global => "too many open streams; try again later".into(),
            })
        })
}

/// Replaying a whole history costs the database a lot and a client nothing: a user may
/// start only a few deep replays a minute.
fn allow_deep_replay(state: &AppState, identity: &Identity) -> Result<(), ApiError> {
    let per_minute = state.sse.deep_replays_per_minute;
    state
        .hub
        .deep_replay(
            &identity.tenant,
            &identity.user_id,
            per_minute,
            std::time::Instant::now(),
        )
        .map_err(|wait| {
            state.metrics.sse_rejected.inc();
            ApiError::RateLimited {
                message: format!(
                    "too many deep replays for this user (sse.deep_replays_per_minute = {per_minute}); retry later"
                ),
                retry_after_secs: wait.as_secs().max(1),
            }
        })
}

fn sse_response<S>(events: S, keepalive: Duration) -> Response
where
    S: Stream<Item = Result<Event, Infallible>> + Send + 'static,
{
    Sse::new(events)
        .keep_alive(KeepAlive::new().interval(keepalive).text("keep-alive"))
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn last_event_id(header: Option<&str>, query: Option<&str>) -> Result<Option<i64>, String> {
        let mut headers = HeaderMap::new();
        if let Some(h) = header {
            headers.insert("last-event-id", HeaderValue::from_str(h).unwrap());
        }
        LastEventId::from_request(&headers, query)
            .map(|LastEventId(id)| id)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn last_event_id_comes_from_the_header_else_the_query() {
        assert_eq!(last_event_id(None, None), Ok(None));
        assert_eq!(last_event_id(None, Some("ticket=abc")), Ok(None));
        assert_eq!(last_event_id(Some("42"), None), Ok(Some(42)));
        assert_eq!(last_event_id(Some(" 7 "), None), Ok(Some(7)));
        assert_eq!(last_event_id(Some("0"), None), Ok(Some(0)));
        assert_eq!(
            last_event_id(None, Some("ticket=abc&last_event_id=9")),
            Ok(Some(9))
        );
        // The header wins over the parameter.
        assert_eq!(
            last_event_id(Some("3"), Some("last_event_id=9")),
            Ok(Some(3))
        );
        // The first of two parameters counts.
        assert_eq!(
            last_event_id(None, Some("last_event_id=5&last_event_id=6")),
            Ok(Some(5))
        );
    }

    #[test]
    fn a_malformed_last_event_id_answers_400() {
        for (header, query) in [
            (Some("-1"), None),
            (Some("abc"), None),
            (Some(""), None),
            (Some("1.5"), None),
            (None, Some("last_event_id=x")),
            (None, Some("last_event_id=")),
            // A bad header is not rescued by a good parameter.
            (Some("nope"), Some("last_event_id=4")),
        ] {
            let err = last_event_id(header, query).unwrap_err();
            assert!(
                err.contains("non-negative integer"),
                "{header:?} {query:?}: {err}"
            );
        }
        let mut headers = HeaderMap::new();
        headers.insert(
            "last-event-id",
            HeaderValue::from_bytes("4\u{e9}".as_bytes()).unwrap(),
        );
        let response = LastEventId::from_request(&headers, None)
            .unwrap_err()
            .into_response();
        assert_eq!(response.status(), axum::http::StatusCode::BAD_REQUEST);
    }

    #[tokio::test]
    async fn the_extractor_reads_the_request() {
        let request = axum::http::Request::get("/api/v1/sse?last_event_id=12")
            .body(())
            .unwrap();
        let (mut parts, ()) = request.into_parts();
        let id = LastEventId::from_request_parts(&mut parts, &())
            .await
            .unwrap();
        assert_eq!(id, LastEventId(Some(12)));
    }
}
