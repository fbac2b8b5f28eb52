//! The frames of a stream as values, and the one place that encodes them: what a client
//! receives is decided here, whether hyper or the lean path (`serve::lean`, which writes the
//! encoded `Sse` body as chunks) carries it. Keep-alive comments are `Sse`'s own.

use std::sync::Arc;
use std::time::Duration;

use axum::response::sse::Event;

use super::AUTH_EXPIRED_EVENT;
use crate::model::{ARCHIVED_EVENT, NOTIFICATION_EVENT, READ_EVENT, StoredNotification};

/// One frame of a stream.
#[derive(Debug, Clone)]
pub(super) enum Frame {
    /// The first frame: a `retry:` hint, with the cursor as its id, so a browser whose
    /// connection drops before the first event reconnects with `Last-Event-ID` and misses
    /// nothing.
    Hello { cursor: i64, retry: Duration },
    /// An inbox item (`notification`).
    Notification(Arc<StoredNotification>),
    /// A change the user made to an item (`notification.read`, `notification.archived`).
    Change(Arc<StoredNotification>),
    /// A live update, named by the routing plugin.
    Live(Arc<StoredNotification>),
    /// The last frame when the credentials run out: the client gets new ones and
    /// reconnects with the id it carries (its cursor), so it misses nothing.
    /// Also when they are withdrawn (`revoked`: their key removed, their user signed out):
    /// the same close, so a client does the same (a signed-out user then gets a 401).
    AuthExpired {
        cursor: i64,
        expired_at: chrono::DateTime<chrono::Utc>,
        revoked: bool,
    },
}

impl Frame {
    /// The frame of a stored row, by its kind.
    pub(super) fn row(n: Arc<StoredNotification>) -> Self {
        if n.kind == READ_EVENT || n.kind == ARCHIVED_EVENT {
            Frame::Change(n)
        } else if n.kind == NOTIFICATION_EVENT {
            Frame::Notification(n)
        } else {
            Frame::Live(n)
        }
    }

    /// The frame as axum encodes it onto the wire.
    pub(super) fn event(&self) -> Event {
        match self {
            Frame::Hello { cursor, retry } => Event::default()
                .id(cursor.to_string())
                .retry(*retry)
                .comment("connected"),
            Frame::Notification(n) | Frame::Change(n) | Frame::Live(n) => Event::default()
                .id(n.seq.to_string())
                .event(n.kind.as_str())
                .data(n.frame_data.get_or_init(|| self.row_data())),
            Frame::AuthExpired {
                cursor,
                expired_at,
                revoked,
            } => Event::default()
                .id(cursor.to_string())
                .event(AUTH_EXPIRED_EVENT)
                .data(
                    serde_json::json!({
                        "expired_at": expired_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                        "message": if *revoked {
                            "the credentials were withdrawn (key removed or user signed out): reconnect with a fresh token or ticket and Last-Event-ID"
                        } else {
                            "the token expired: reconnect with a fresh token or ticket and Last-Event-ID"
                        },
                    })
                    .to_string(),
                ),
        }
    }

    /// The JSON of a row's frame (serialized once per row, see `frame_data`).
    fn row_data(&self) -> String {
        let data = match self {
            // The inbox API's change events carry their own data.
            Frame::Change(n) => n.data.0.clone(),
            Frame::Notification(n) => serde_json::json!({
                "id": n.seq,
                "event_id": n.event_id,
                "title": n.title,
                "body": n.body,
                "category": n.category,
                "data": n.data.0,
                "created_at": n.created_at,
                "read": n.read_at.is_some(),
                "archived": n.archived_at.is_some(),
            }),
            // Live updates carry the plugin's object as-is, plus where it came from.
            Frame::Live(n) => {
                let mut object = match &n.data.0 {
                    serde_json::Value::Object(m) => m.clone(),
                    _ => serde_json::Map::new(),
                };
                object.insert("event_id".into(), n.event_id.clone().into());
                serde_json::Value::Object(object)
            }
            Frame::Hello { .. } | Frame::AuthExpired { .. } => serde_json::Value::Null,
        };
        data.to_string()
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use axum::response::IntoResponse;
    use axum::response::sse::Sse;
    use chrono::{TimeZone, Utc};
    use serde_json::{Value, json};

    use super::*;

    /// The bytes a client receives for `frame`: what hyper sends, and what the lean path
    /// writes as one chunk.
    async fn wire(frame: &Frame) -> String {
        let events = futures::stream::iter([Ok::<_, Infallible>(frame.event())]);
        let body = Sse::new(events).into_response().into_body();
        let bytes = axum::body::to_bytes(body, usize::MAX).await.unwrap();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    fn lines(wire: &str) -> Vec<&str> {
        assert!(
            wire.ends_with("\n\n"),
            "a frame ends with a blank line: {wire:?}"
        );
        wire.lines().filter(|l| !l.is_empty()).collect()
    }

    fn data(wire: &str) -> Value {
        let data = lines(wire)
            .into_iter()
            .find_map(|l| l.strip_prefix("data: "))
            .unwrap_or_else(|| panic!("no data in {wire:?}"));
        serde_json::from_str(data).unwrap()
    }

    fn row(seq: i64, kind: &str, data: Value) -> Arc<StoredNotification> {
        Arc::new(StoredNotification {
            seq,
            event_id: "evt-1".into(),
            kind: kind.into(),
            title: Some("Paid".into()),
            body: Some("Order 7 is paid".into()),
            category: None,
            data: sqlx::types::Json(data),
            created_at: Utc.with_ymd_and_hms(2030, 1, 2, 3, 4, 5).unwrap(),
            read_at: None,
            archived_at: Some(Utc.with_ymd_and_hms(2030, 1, 3, 0, 0, 0).unwrap()),
            frame_data: Default::default(),
        })
    }

    #[tokio::test]
    async fn the_hello_carries_the_cursor_and_the_retry_hint() {
        let hello = Frame::Hello {
            cursor: 41,
            retry: Duration::from_millis(3_000),
        };
        let wire = wire(&hello).await;
        let mut got = lines(&wire);
        got.sort();
        assert_eq!(got, [": connected", "id: 41", "retry: 3000"]);
    }

    #[tokio::test]
    async fn an_inbox_item_is_a_notification_frame() {
        let frame = Frame::row(row(9, NOTIFICATION_EVENT, json!({"order_id": "7"})));
        assert!(matches!(frame, Frame::Notification(_)));
        let wire = wire(&frame).await;
        let got = lines(&wire);
        assert!(
            got.contains(&"id: 9") && got.contains(&"event: notification"),
            "{wire}"
        );
        assert_eq!(
            data(&wire),
            json!({
                "id": 9,
                "event_id": "evt-1",
                "title": "Paid",
                "body": "Order 7 is paid",
                "category": null,
                "data": {"order_id": "7"},
                "created_at": "2030-01-02T03:04:05Z",
                "read": false,
                "archived": true,
            })
        );
    }

    #[tokio::test]
    async fn a_change_carries_its_own_data() {
        for kind in [READ_EVENT, ARCHIVED_EVENT] {
            let change = json!({"id": 3, "read": true});
            let frame = Frame::row(row(12, kind, change.clone()));
            assert!(matches!(frame, Frame::Change(_)));
            let wire = wire(&frame).await;
            assert!(
                lines(&wire).contains(&format!("event: {kind}").as_str()),
                "{wire}"
            );
            assert_eq!(data(&wire), change);
        }
    }

    #[tokio::test]
    async fn a_live_update_is_the_plugins_object_and_where_it_came_from() {
        let frame = Frame::row(row(4, "order.updated", json!({"status": "shipped"})));
        assert!(matches!(frame, Frame::Live(_)));
        let wire = wire(&frame).await;
        assert!(lines(&wire).contains(&"event: order.updated"), "{wire}");
        assert_eq!(
            data(&wire),
            json!({"status": "shipped", "event_id": "evt-1"})
        );
        // Data that is not an object keeps only the origin.
        let frame = Frame::row(row(5, "order.updated", json!([1, 2])));
        assert_eq!(
            data(&self::wire(&frame).await),
            json!({"event_id": "evt-1"})
        );
    }

    #[tokio::test]
    async fn a_rows_data_is_serialized_once_and_shared() {
        let n = row(6, NOTIFICATION_EVENT, json!({}));
        let first = wire(&Frame::row(n.clone())).await;
        let cached = n
            .frame_data
            .get()
            .cloned()
            .expect("the first frame caches its data");
        assert_eq!(
            data(&first),
            serde_json::from_str::<Value>(&cached).unwrap()
        );
        assert_eq!(wire(&Frame::row(n)).await, first);
    }

    #[tokio::test]
    async fn the_last_frame_says_the_token_expired_and_carries_the_cursor() {
        let frame = Frame::AuthExpired {
            cursor: 17,
            expired_at: Utc.with_ymd_and_hms(2030, 5, 6, 7, 8, 9).unwrap(),
            revoked: false,
        };
        let wire = wire(&frame).await;
        let got = lines(&wire);
        assert!(
            got.contains(&"id: 17") && got.contains(&"event: auth.expired"),
            "{wire}"
        );
        let data = data(&wire);
        assert_eq!(data["expired_at"], "2030-05-06T07:08:09Z");
        assert!(
            data["message"].as_str().unwrap().contains("Last-Event-ID"),
            "{data}"
        );
    }
}
