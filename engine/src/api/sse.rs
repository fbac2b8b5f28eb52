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
//! bounded window of its user's rows (`hub`), and a client that stops reading is cut off by
//! the listener's write deadline (`http.write_timeout_ms`) and catches up by replay.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderValue};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use prometheus::IntGauge;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::AppState;
use super::auth::Identity;
use super::error::{ApiError, ErrorBody};
use super::tickets::{self, TICKET_PARAM};
use crate::hub::{CapExceeded, Caps, Subscription};
use crate::model::{ARCHIVED_EVENT, NOTIFICATION_EVENT, READ_EVENT, StoredNotification};
use crate::store::notifications;

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
        (status = 429, description = "A connection cap or the deep-replay limit", body = ErrorBody),
    ),
    security(("bearer" = []), ("cookie" = []), ("ticket" = [])),
)]
pub async fn stream(
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let param = |name: &str| {
        query.as_deref().and_then(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.into_owned())
        })
    };
    // The header, which browsers send on their own reconnects; else the query parameter, for
    // a page that opens a new EventSource (with a new ticket) and cannot set headers.
    let last_event_id = match headers
        .get("last-event-id")
        .map(|v| v.to_str().unwrap_or("?").to_owned())
        .or_else(|| param(LAST_EVENT_ID_PARAM))
    {
        None => None,
        Some(v) => Some(
            v.trim()
                .parse::<i64>()
                .ok()
                .filter(|n| *n >= 0)
                .ok_or_else(|| {
                    ApiError::BadRequest(
                        "Last-Event-ID must be an id this stream sent (a non-negative integer)"
                            .into(),
                    )
                })?,
        ),
    };
    // After the checks of the request itself: redeeming uses the ticket up, so a malformed
    // request keeps it (a refusal by a cap after this point does not: the client asks again).
    let identity = match param(TICKET_PARAM) {
        Some(ticket) => tickets::redeem(&state, &ticket).await?,
        None => state.auth.authenticate(&headers)?,
    };
    // Subscribe before reading the cursor: whatever commits after this point wakes us.
    let subscription = state
        .hub
        .subscribe(
            &identity.tenant,
            &identity.user_id,
            Caps {
                per_user: state.sse.max_connections_per_user,
                per_tenant: state.sse.max_connections_per_tenant,
                global: state.sse.max_connections,
            },
        )
        .map_err(|e| {
            state.metrics.sse_rejected.inc();
            ApiError::TooManyRequests(match e {
                CapExceeded::User => "too many open streams for this user".into(),
                CapExceeded::Tenant => {
                    "too many open streams for this tenant; try again later".into()
                }
                CapExceeded::Global => "too many open streams; try again later".into(),
            })
        })?;
    let latest =
        notifications::latest_seq(&state.pool, &identity.tenant, &identity.user_id).await?;
    // An id beyond the latest (a tab left open across a database reset) would hide every
    // new event until the sequence caught up; start from "now" instead.
    let cursor = last_event_id.map_or(latest, |n| n.min(latest));
    // Replaying a whole history costs the database a lot and a client nothing: a user may
    // start only a few deep replays a minute.
    if latest - cursor > state.sse.page_size || (last_event_id == Some(0) && latest > 0) {
        state
            .hub
            .deep_replay(
                &identity.tenant,
                &identity.user_id,
                state.sse.deep_replays_per_minute,
                std::time::Instant::now(),
            )
            .map_err(|wait| {
                state.metrics.sse_rejected.inc();
                ApiError::RateLimited {
                    message: format!(
                        "too many deep replays for this user (sse.deep_replays_per_minute = {}); retry later",
                        state.sse.deep_replays_per_minute
                    ),
                    retry_after_secs: wait.as_secs().max(1),
                }
            })?;
    }
    tracing::debug!(tenant = %identity.tenant, user = %identity.user_id, cursor, "sse stream opened");

    let gauge = state.metrics.sse_connections.clone();
    gauge.inc();
    let expiry = Expiry::of(&identity);
    subscription.took(cursor);
    let reader = Reader {
        pool: state.pool.clone(),
        tenant: identity.tenant,
        user_id: identity.user_id,
        expiry: Some(expiry),
        cursor,
        page_size: state.sse.page_size,
        page_bytes: state.sse.page_bytes,
        pending: VecDeque::new(),
        subscription,
        _open: OpenStream(gauge),
        hello: Some(Duration::from_millis(state.sse.retry_ms)),
        shutdown: state.shutdown.clone(),
        read_time: state.metrics.stage("stream_read"),
        failed_reads: 0,
        sent_from_memory: None,
    };
    let events = futures::stream::unfold(reader, |mut r| async move {
        let event = r.next().await?;
        Some((Ok::<_, Infallible>(event), r))
    });
    let mut response = sse_response(events, Duration::from_secs(state.sse.keepalive_secs));
    let h = response.headers_mut();
    // nginx and friends must not buffer the stream.
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    h.insert("cache-control", HeaderValue::from_static("no-cache"));
    Ok(response)
}

fn sse_response<S>(events: S, keepalive: Duration) -> Response
where
    S: Stream<Item = Result<Event, Infallible>> + Send + 'static,
{
    Sse::new(events)
        .keep_alive(KeepAlive::new().interval(keepalive).text("keep-alive"))
        .into_response()
}

/// Counts an open stream for as long as it lives.
struct OpenStream(IntGauge);

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// When a stream's credentials run out.
struct Expiry {
    at: tokio::time::Instant,
    wall: chrono::DateTime<chrono::Utc>,
}

impl Expiry {
    fn of(identity: &Identity) -> Self {
        let wall =
            chrono::DateTime::from_timestamp(identity.expires_at.min(i64::MAX as u64) as i64, 0)
                .unwrap_or(chrono::DateTime::<chrono::Utc>::MAX_UTC);
        let left = (wall - chrono::Utc::now()).to_std().unwrap_or_default();
        // A far-future exp must not overflow the timer.
        let left = left.min(Duration::from_secs(365 * 24 * 3600));
        Self {
            at: tokio::time::Instant::now() + left,
            wall,
        }
    }

    /// The frame that ends the stream: the client gets new credentials and reconnects with
    /// the id it carries (its cursor), so it misses nothing.
    fn event(&self, cursor: i64) -> Event {
        Event::default()
            .id(cursor.to_string())
            .event(AUTH_EXPIRED_EVENT)
            .data(
                serde_json::json!({
                    "expired_at": self.wall.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                    "message": "the token expired: reconnect with a fresh token or ticket and Last-Event-ID",
                })
                .to_string(),
            )
    }
}

struct Reader {
    pool: PgPool,
    tenant: String,
    user_id: String,
    /// `None` once the `auth.expired` frame went out: the stream then ends.
    expiry: Option<Expiry>,
    /// Highest sequence number sent (or skipped, for a stream without Last-Event-ID).
    cursor: i64,
    page_size: i64,
    page_bytes: i64,
    pending: VecDeque<Arc<StoredNotification>>,
    subscription: Subscription,
    _open: OpenStream,
    /// The first frame: a `retry:` hint for the browser.
    hello: Option<Duration>,
    shutdown: CancellationToken,
    /// `notify_stage_seconds{stage="stream_read"}`.
    read_time: prometheus::Histogram,
    /// Reads that failed in a row.
    failed_reads: u32,
    /// The hub's latest when the stream last took rows up to it from memory: until the hub
    /// moves, there is nothing to read.
    sent_from_memory: Option<i64>,
}

/// What a read from PostgreSQL leaves the stream to do.
enum Read {
    /// Send what it read, or read again after a failure.
    Again,
    /// Wait for the hub: nothing new.
    Wait,
    /// End the stream.
    End,
}

/// The first pause after a failed read; doubled after each further failure, up to 16×.
const READ_RETRY: Duration = Duration::from_millis(100);
/// Failed reads in a row (about 15 s of retrying) after which the stream ends.
const MAX_FAILED_READS: u32 = 12;

impl Reader {
    /// The next event, or `None` to end the stream (the client reconnects and replays).
    async fn next(&mut self) -> Option<Event> {
        if let Some(retry) = self.hello.take() {
            // The hello carries the cursor as its id: a browser whose connection drops before
            // the first event then reconnects with Last-Event-ID and misses nothing.
            return Some(
                Event::default()
                    .id(self.cursor.to_string())
                    .retry(retry)
                    .comment("connected"),
            );
        }
        let expires = self.expiry.as_ref()?.at;
        loop {
            if tokio::time::Instant::now() >= expires {
                return Some(self.expiry.take()?.event(self.cursor));
            }
            if let Some(n) = self.pending.pop_front() {
                self.cursor = n.seq;
                return Some(to_event(&n));
            }
            // Mark the current hub value seen *before* reading, so a commit racing with
            // this read still wakes us afterwards.
            let changed = self.subscription.updates.has_changed().unwrap_or(true);
            let latest = *self.subscription.updates.borrow_and_update();
            // What this instance just committed comes from memory, when the hub holds every
            // row up to the latest; anything else (another instance's rows, an inbox change,
            // a gap) is read from PostgreSQL.
            if latest > self.cursor
                && let Some(rows) = self.subscription.recent_after(self.cursor, latest)
            {
                self.pending.extend(rows);
                self.sent_from_memory = Some(latest);
                continue;
            }
            // Everything up to the hub's latest came from memory and nothing happened since:
            // there is nothing to read (a wake-up of every stream, `Hub::wake_all`, counts as
            // something and reads).
            let idle = !changed && self.sent_from_memory == Some(latest) && self.cursor >= latest;
            self.sent_from_memory = None;
            if !idle {
                match self.read().await {
                    Read::Again => continue,
                    Read::Wait => {}
                    Read::End => return None,
                }
            }
            tokio::select! {
                // Clients reconnect (to another instance) and replay from their last id.
                _ = self.shutdown.cancelled() => return None,
                _ = tokio::time::sleep_until(expires) => {}
                changed = self.subscription.updates.changed() => changed.ok()?,
            }
        }
    }

    /// Reads the next page after the cursor from PostgreSQL into `pending`.
    async fn read(&mut self) -> Read {
        let reading = std::time::Instant::now();
        // Boxed: the query's state lives on the heap while it runs, not in every idle
        // stream's future for the stream's whole life.
        let read = Box::pin(notifications::notifications_after(
            &self.pool,
            &self.tenant,
            &self.user_id,
            self.cursor,
            self.page_size,
            self.page_bytes,
        ))
        .await;
        self.read_time.observe(reading.elapsed().as_secs_f64());
        match read {
            Ok(rows) if !rows.is_empty() => {
                self.failed_reads = 0;
                if let Some(last) = rows.last() {
                    self.subscription.took(last.seq);
                }
                self.pending.extend(rows.into_iter().map(Arc::new));
                Read::Again
            }
            Ok(_) => {
                self.failed_reads = 0;
                Read::Wait
            }
            // A busy or briefly unreachable database: the stream waits and reads again
            // (its client keeps its connection); only a database that stays away ends it
            // (the client then reconnects and replays, maybe to another instance).
            Err(e) if self.failed_reads < MAX_FAILED_READS => {
                let wait = READ_RETRY * 2u32.pow(self.failed_reads.min(4));
                self.failed_reads += 1;
                tracing::debug!(error = %e, retry_in_ms = wait.as_millis() as u64, "sse read failed; retrying");
                tokio::select! {
                    _ = self.shutdown.cancelled() => Read::End,
                    _ = tokio::time::sleep(wait) => Read::Again,
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "sse reads keep failing; closing the stream");
                Read::End
            }
        }
    }
}

fn to_event(n: &StoredNotification) -> Event {
    Event::default()
        .id(n.seq.to_string())
        .event(n.kind.as_str())
        .data(n.frame_data.get_or_init(|| frame_data(n)))
}

/// The JSON of a row's frame.
fn frame_data(n: &StoredNotification) -> String {
    let data = if n.kind == READ_EVENT || n.kind == ARCHIVED_EVENT {
        // The inbox API's change events carry their own data.
        n.data.0.clone()
    } else if n.kind == NOTIFICATION_EVENT {
        serde_json::json!({
            "id": n.seq,
            "event_id": n.event_id,
            "title": n.title,
            "body": n.body,
            "category": n.category,
            "data": n.data.0,
            "created_at": n.created_at,
            "read": n.read_at.is_some(),
            "archived": n.archived_at.is_some(),
        })
    } else {
        // Live updates carry the plugin's object as-is, plus where it came from.
        let mut object = match &n.data.0 {
            serde_json::Value::Object(m) => m.clone(),
            _ => serde_json::Map::new(),
        };
        object.insert("event_id".into(), n.event_id.clone().into());
        serde_json::Value::Object(object)
    };
    data.to_string()
}
