//! The ground floor: the nouns every stage shares, and the rules that come with them.
//!
//! An event, once decoded, travels ingest → pipeline → plugin; a stored notification
//! travels store → hub → SSE stream; the names of SSE events and Kafka headers are agreed
//! between the stage that writes them and the one that reads them. They live here, so no
//! stage imports another stage's nouns sideways. This module imports no other engine
//! module: everything else may stand on it.

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

/// A validated event, ready for routing.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub id: String,
    pub tenant: String,
    pub event_type: String,
    pub time: DateTime<Utc>,
    pub source: Option<String>,
    /// The tenant-owned payload; always a JSON object.
    pub data: Map<String, Value>,
}

/// The longest event id, in bytes.
pub const MAX_ID_LEN: usize = 200;
/// The longest tenant id, in bytes.
pub const MAX_TENANT_LEN: usize = 64;
/// The longest event type, in bytes.
pub const MAX_TYPE_LEN: usize = 128;

/// Event ids appear in logs and rows: printable, and bounded.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_ID_LEN && !id.chars().any(char::is_control)
}

/// Tenant ids name plugin files and template folders, so they are kept path-safe.
pub fn valid_tenant(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= MAX_TENANT_LEN
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Event types are dotted names (`order.paid`, `order_status_updated`).
pub fn valid_type(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= MAX_TYPE_LEN
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// Does any string (value or key) of `object` hold a NUL character, which PostgreSQL text
/// cannot store? Walks the parsed values: a literal backslash followed by `u0000` in the
/// text is not a NUL and passes.
pub fn contains_nul(object: &Map<String, Value>) -> bool {
    fn value_has_nul(v: &Value) -> bool {
        match v {
            Value::String(s) => s.contains('\0'),
            Value::Array(items) => items.iter().any(value_has_nul),
            Value::Object(map) => contains_nul(map),
            Value::Null | Value::Bool(_) | Value::Number(_) => false,
        }
    }
    object
        .iter()
        .any(|(k, v)| k.contains('\0') || value_has_nul(v))
}

/// A stored notification as streamed to its user (and carried to other instances).
#[derive(Debug, Clone, PartialEq, sqlx::FromRow, serde::Serialize, serde::Deserialize)]
pub struct StoredNotification {
    pub seq: i64,
    pub event_id: String,
    pub kind: String,
    pub title: Option<String>,
    pub body: Option<String>,
    pub category: Option<String>,
    pub data: sqlx::types::Json<Value>,
    pub created_at: DateTime<Utc>,
    pub read_at: Option<DateTime<Utc>>,
    pub archived_at: Option<DateTime<Utc>>,
    /// The stream frame's data, serialized by the first stream that sends the row: a row
    /// the hub shares among a user's streams is serialized once, not once per stream.
    #[sqlx(skip)]
    #[serde(skip)]
    pub frame_data: std::sync::OnceLock<String>,
}

impl StoredNotification {
    /// About the bytes its title, body, category and data take (what the hub bounds).
    pub fn approximate_size(&self) -> usize {
        let text = |s: &Option<String>| s.as_ref().map_or(0, String::len);
        text(&self.title) + text(&self.body) + text(&self.category) + self.data.0.to_string().len()
    }
}

/// The SSE event name of inbox items; live updates must use another.
pub const NOTIFICATION_EVENT: &str = "notification";
/// SSE event of a change to read state.
pub const READ_EVENT: &str = "notification.read";
/// SSE event of a change to archive state.
pub const ARCHIVED_EVENT: &str = "notification.archived";

/// SSE event names a live update may not take: inbox items' name, and the names browsers
/// give meaning to (`message` is what a frame without `event:` is dispatched as; `error`
/// and `open` are `EventSource`'s own connection events).
pub const RESERVED_EVENT_NAMES: &[&str] = &[NOTIFICATION_EVENT, "message", "error", "open"];

/// Prefixes of the engine's own SSE events (`notification.read`, `auth.expired`, ...),
/// which a live update may not take either.
pub const RESERVED_EVENT_PREFIXES: &[&str] = &["notification.", "auth."];

/// The Kafka header carrying a dead letter's one-time replay token: written by the replay
/// tool, read by ingest, and never stored with a dead letter's headers.
pub const REPLAY_HEADER: &str = "notify-replay";

/// The placeholder in `kafka.tenant_topic_pattern`.
pub const TENANT_PLACEHOLDER: &str = "{tenant}";
