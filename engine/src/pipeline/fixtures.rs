//! Sample messages, events, decisions and prepared batches for the pipeline's unit tests:
//! the nouns are plain data, so the pure parts are tested without Kafka, PostgreSQL or a
//! plugin.

use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, TimeZone, Utc};
use serde_json::{Map, Value, json};

use super::{Prepared, Step};
use crate::ingest::Incoming;
use crate::ingest::envelope::{Rejection, RejectionKind};
use crate::model::Event;
use crate::plugin::{Cost, Decision, Delivery, PluginError};

/// When every sample event happened.
pub fn event_time() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2024, 5, 1, 12, 0, 0).unwrap()
}

/// A message of `payload` read at `offset` of partition 3 of `topic`.
pub fn message(topic: &str, offset: i64, payload: &[u8]) -> Incoming {
    Incoming {
        topic: topic.to_owned(),
        partition: 3,
        offset,
        key: Some(b"order-1".to_vec()),
        payload: Some(payload.to_vec()),
        headers: vec![("trace".to_owned(), Some(b"t1".to_vec()))],
        received: Instant::now(),
        kafka_delay: None,
        timestamp: None,
    }
}

pub fn event(tenant: &str, id: &str) -> Event {
    Event {
        id: id.to_owned(),
        tenant: tenant.to_owned(),
        event_type: "order_paid".to_owned(),
        time: event_time(),
        source: None,
        data: Map::new(),
    }
}

pub fn data(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        other => panic!("not an object: {other}"),
    }
}

pub fn in_app(user: &str) -> Delivery {
    Delivery::InApp {
        user_id: user.to_owned(),
        title: "Paid".to_owned(),
        body: "Order 1 is paid".to_owned(),
        category: "orders".to_owned(),
        data: data(json!({"order": 1})),
    }
}

pub fn live(user: &str, name: &str) -> Delivery {
    Delivery::Live {
        user_id: user.to_owned(),
        name: name.to_owned(),
        data: data(json!({"status": "paid"})),
    }
}

pub fn email(to: &str) -> Delivery {
    Delivery::Email {
        to: to.to_owned(),
        user_id: Some("u1".to_owned()),
        template: "order_paid".to_owned(),
        data: data(json!({"total": 12})),
        locale: Some("de-CH".to_owned()),
        time_zone: None,
        not_sent: None,
    }
}

pub fn decision(deliveries: Vec<Delivery>) -> Decision {
    Decision {
        plugin: "shop-router".to_owned(),
        digest: "sha256:abc".to_owned(),
        deliveries,
        cost: Cost::default(),
        logs: Vec::new(),
    }
}

/// A plugin that judged the event (a final dead letter).
pub fn trap() -> PluginError {
    PluginError::Trap {
        plugin: "shop-router".to_owned(),
        message: "unreachable".to_owned(),
    }
}

/// A tenant's plugin that is not there (the event is set aside).
pub fn unavailable() -> PluginError {
    PluginError::Unavailable {
        plugin: "shop-router".to_owned(),
        reason: "missing".to_owned(),
    }
}

pub fn rejection() -> Rejection {
    Rejection {
        kind: RejectionKind::Validation,
        reason: "`type` is missing".to_owned(),
        tenant: Some("acme".to_owned()),
        event_id: None,
    }
}

/// A message of the batch at `offset`, prepared as `step`.
pub fn prepared(offset: i64, step: Step) -> Prepared {
    Prepared {
        spilled: None,
        message: Arc::new(message("orders", offset, b"{}")),
        step,
        replay: None,
    }
}
