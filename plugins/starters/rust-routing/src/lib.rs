//! A routing plugin, as `cargo component new --lib` lays one out: `src/bindings.rs` is
//! generated from the engine's WIT by `cargo component build`; this file implements the
//! `router` interface. A payment becomes an in-app notification; every other event is
//! acknowledged with no deliveries.

#[allow(warnings)]
mod bindings;

use bindings::exports::notify::plugin::router::Guest;
use bindings::notify::plugin::host::{LogLevel, log};
use bindings::notify::plugin::types::{Delivery, Event, InApp, RouteError};

struct Component;

impl Guest for Component {
    fn route(event: Event) -> Result<Vec<Delivery>, RouteError> {
        if event.event_type != "order_paid" {
            log(LogLevel::Debug, &format!("no rule for {}", event.event_type));
            return Ok(Vec::new());
        }
        let data: serde_json::Value = serde_json::from_str(&event.data)
            .map_err(|e| RouteError::InvalidEvent(format!("data is not JSON: {e}")))?;
        let field = |name: &str| {
            data.get(name)
                .and_then(|v| v.as_str())
                .map(str::to_owned)
                .ok_or_else(|| RouteError::InvalidEvent(format!("data.{name} is required (string)")))
        };
        let (user_id, order_id) = (field("user_id")?, field("order_id")?);
        Ok(vec![Delivery::InApp(InApp {
            user_id,
            title: "Payment received".into(),
            body: format!("Thank you: order {order_id} is paid."),
            category: "billing".into(),
            data: serde_json::json!({ "order_id": order_id }).to_string(),
        })])
    }
}

bindings::export!(Component with_types_in bindings);
