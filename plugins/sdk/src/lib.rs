//! SDK for the notification engine's routing plugins.
//!
//! A routing plugin is a WebAssembly component (target `wasm32-wasip2`) for the world
//! `notify:plugin/routing@0.1.0` (`wit/plugin/plugin.wit`): the engine hands it one validated
//! event at a time and it answers with the deliveries to make — in-app notifications, live
//! updates and emails — or with a [`RouteError`], which dead-letters the event.
//!
//! This crate wraps the generated bindings: the WIT types under friendly names, the
//! [`export!`] macro, the host imports as [`log`] and [`config`], a [`Data`] reader for the
//! JSON payload that produces field-naming errors, and [`Delivery`] constructors that
//! serialize their JSON data.
//!
//! # A complete plugin
//!
//! `Cargo.toml`:
//!
//! ```toml
//! [package]
//! name = "my-router"
//! version = "0.1.0"
//! edition = "2024"
//!
//! [lib]
//! crate-type = ["cdylib"]
//!
//! [dependencies]
//! notify-plugin-sdk = { path = "../sdk" }
//! serde_json = "1"
//! ```
//!
//! `src/lib.rs`:
//!
//! ```
//! use notify_plugin_sdk::{Data, Delivery, Event, RouteError, Router, log};
//! use serde_json::json;
//!
//! struct MyRouter;
//!
//! impl Router for MyRouter {
//!     fn route(event: Event) -> Result<Vec<Delivery>, RouteError> {
//!         if event.event_type != "order_paid" {
//!             log::debug(&format!("ignoring {}", event.event_type));
//!             return Ok(Vec::new());
//!         }
//!         let data = Data::parse(&event)?;
//!         let user_id = data.str("user_id")?;
//!         let order_id = data.str("order_id")?;
//!         Ok(vec![Delivery::in_app(
//!             user_id,
//!             "Payment received",
//!             &format!("Thanks for paying order {order_id}."),
//!             "billing",
//!             json!({ "order_id": order_id }),
//!         )])
//!     }
//! }
//!
//! notify_plugin_sdk::export!(MyRouter);
//! ```
//!
//! Build it with `cargo build --release --target wasm32-wasip2` and drop
//! `target/wasm32-wasip2/release/my_router.wasm` into the engine's plugin directory as
//! `<tenant>.wasm`.
//!
//! # Testing natively
//!
//! The SDK also compiles for the host target so a plugin's rules can be unit-tested with a
//! plain `cargo test`. There the host imports are stand-ins: [`log`] writes to stderr and
//! [`config`] returns `None`. Keep configuration reads in the `Router` impl and pass the
//! values to the functions you test.

#![warn(missing_docs)]

use serde_json::{Map, Value};

#[doc(hidden)]
pub mod bindings {
    //! The raw `wit-bindgen` output. Use the re-exports at the crate root instead.
    #![allow(missing_docs)]

    wit_bindgen::generate!({
        path: "../../wit/plugin",
        world: "routing",
        pub_export_macro: true,
        default_bindings_module: "notify_plugin_sdk::bindings",
    });
}

/// Exports a [`Router`] implementation as the component's `router` interface:
/// `notify_plugin_sdk::export!(MyRouter);` (once per plugin, at the crate root).
pub use bindings::export;
/// The trait a plugin implements: `fn route(event: Event) -> Result<Vec<Delivery>, RouteError>`.
/// Register the implementing type with [`export!`].
pub use bindings::exports::notify::plugin::router::Guest as Router;
pub use bindings::notify::plugin::host::LogLevel;
pub use bindings::notify::plugin::types::{Delivery, Email, Event, InApp, LiveUpdate, RouteError};

/// Convenience re-export, so plugins can write `notify_plugin_sdk::json!`.
pub use serde_json::json;

/// Logging through the engine's structured log (tagged with tenant, plugin and event there).
///
/// Outside WebAssembly (native unit tests) the lines go to stderr.
pub mod log {
    use super::LogLevel;

    /// Logs `message` at `level`.
    pub fn log(level: LogLevel, message: &str) {
        #[cfg(target_arch = "wasm32")]
        crate::bindings::notify::plugin::host::log(level, message);
        #[cfg(not(target_arch = "wasm32"))]
        eprintln!("[{level:?}] {message}");
    }

    /// Logs at trace level.
    pub fn trace(message: &str) {
        log(LogLevel::Trace, message)
    }

    /// Logs at debug level.
    pub fn debug(message: &str) {
        log(LogLevel::Debug, message)
    }

    /// Logs at info level.
    pub fn info(message: &str) {
        log(LogLevel::Info, message)
    }

    /// Logs at warn level.
    pub fn warn(message: &str) {
        log(LogLevel::Warn, message)
    }

    /// Logs at error level.
    pub fn error(message: &str) {
        log(LogLevel::Error, message)
    }
}

/// The tenant's plugin configuration value for `key` (`[tenants.<id>.config]` in the
/// engine's configuration), if set.
///
/// Outside WebAssembly (native unit tests) this always returns `None`.
pub fn config(key: &str) -> Option<String> {
    #[cfg(target_arch = "wasm32")]
    return bindings::notify::plugin::host::config(key);
    #[cfg(not(target_arch = "wasm32"))]
    {
        let _ = key;
        None
    }
}

/// Reads and parses the configuration value `key`, or returns `default` when it is unset.
///
/// A value that does not parse is an [`RouteError::Other`] naming the key: a misconfigured
/// tenant should fail loudly rather than route with a silently substituted default.
pub fn config_or<T: std::str::FromStr>(key: &str, default: T) -> Result<T, RouteError> {
    parse_config(key, config(key).as_deref(), default)
}

/// The parsing half of [`config_or`], for tests: `value` is what [`config`] returned.
pub fn parse_config<T: std::str::FromStr>(
    key: &str,
    value: Option<&str>,
    default: T,
) -> Result<T, RouteError> {
    match value.map(str::trim) {
        None | Some("") => Ok(default),
        Some(raw) => raw.parse().map_err(|_| {
            RouteError::Other(format!("plugin config {key} has an invalid value: {raw:?}"))
        }),
    }
}

impl RouteError {
    /// `route-error::invalid-event`: the payload lacks something or has the wrong shape.
    pub fn invalid_event(message: impl Into<String>) -> Self {
        RouteError::InvalidEvent(message.into())
    }

    /// `route-error::other`: any other reason to refuse the event.
    pub fn other(message: impl Into<String>) -> Self {
        RouteError::Other(message.into())
    }
}

/// The event's JSON payload (`event.data`, always an object), with accessors whose errors
/// are [`RouteError::InvalidEvent`]s naming the field, e.g. `data.user_id is required (string)`.
///
/// Optional accessors treat a missing field and `null` alike as absent; [`Data::opt_str`]
/// also treats an empty string as absent.
#[derive(Clone, Debug, PartialEq)]
pub struct Data(Map<String, Value>);

impl Data {
    /// Parses `event.data`; anything but a JSON object is an invalid event.
    pub fn parse(event: &Event) -> Result<Self, RouteError> {
        Self::from_json(&event.data)
    }

    /// Parses a JSON text that must hold an object.
    pub fn from_json(json: &str) -> Result<Self, RouteError> {
        match serde_json::from_str::<Value>(json) {
            Ok(value) => Self::from_value(value),
            Err(err) => Err(RouteError::invalid_event(format!(
                "data is not valid JSON: {err}"
            ))),
        }
    }

    /// Wraps a JSON value that must be an object.
    pub fn from_value(value: Value) -> Result<Self, RouteError> {
        match value {
            Value::Object(map) => Ok(Data(map)),
            other => Err(RouteError::invalid_event(format!(
                "data must be a JSON object (got {})",
                type_name(&other)
            ))),
        }
    }

    /// The raw field, `None` when missing or `null`.
    pub fn get(&self, field: &str) -> Option<&Value> {
        self.0.get(field).filter(|v| !v.is_null())
    }

    /// A required, non-empty string field.
    pub fn str(&self, field: &str) -> Result<&str, RouteError> {
        match self.opt_str(field)? {
            Some(s) => Ok(s),
            None => Err(required(field, "string")),
        }
    }

    /// An optional string field; missing, `null` and `""` are all `None`.
    pub fn opt_str(&self, field: &str) -> Result<Option<&str>, RouteError> {
        match self.get(field) {
            None => Ok(None),
            Some(Value::String(s)) if s.is_empty() => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(wrong_type(field, "string", other)),
        }
    }

    /// A required number field (e.g. an amount such as `129.90`).
    pub fn f64(&self, field: &str) -> Result<f64, RouteError> {
        self.opt_f64(field)?
            .ok_or_else(|| required(field, "number"))
    }

    /// An optional number field.
    pub fn opt_f64(&self, field: &str) -> Result<Option<f64>, RouteError> {
        match self.get(field) {
            None => Ok(None),
            Some(Value::Number(n)) => Ok(n.as_f64()),
            Some(other) => Err(wrong_type(field, "number", other)),
        }
    }

    /// A required boolean field.
    pub fn bool(&self, field: &str) -> Result<bool, RouteError> {
        self.opt_bool(field)?
            .ok_or_else(|| required(field, "boolean"))
    }

    /// An optional boolean field.
    pub fn opt_bool(&self, field: &str) -> Result<Option<bool>, RouteError> {
        match self.get(field) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(wrong_type(field, "boolean", other)),
        }
    }

    /// An optional array field.
    pub fn opt_array(&self, field: &str) -> Result<Option<&Vec<Value>>, RouteError> {
        match self.get(field) {
            None => Ok(None),
            Some(Value::Array(items)) => Ok(Some(items)),
            Some(other) => Err(wrong_type(field, "array", other)),
        }
    }

    /// The whole payload as a map.
    pub fn as_map(&self) -> &Map<String, Value> {
        &self.0
    }

    /// The payload as a JSON object value (see [`Data::email_model`] for email templates).
    pub fn to_value(&self) -> Value {
        Value::Object(self.0.clone())
    }

    /// The data as template data for an email: every field plus `event_id`, so templates
    /// can reference the event that caused the email.
    pub fn email_model(&self, event: &Event) -> Value {
        let mut value = self.to_value();
        value["event_id"] = Value::String(event.id.clone());
        value
    }
}

fn required(field: &str, ty: &str) -> RouteError {
    RouteError::invalid_event(format!("data.{field} is required ({ty})"))
}

fn wrong_type(field: &str, ty: &str, got: &Value) -> RouteError {
    RouteError::invalid_event(format!(
        "data.{field} must be a {ty} (got {})",
        type_name(got)
    ))
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Serializes delivery data; `null` becomes `{}` (the WIT asks for a JSON object).
fn json_object(data: Value) -> String {
    match data {
        Value::Null => "{}".to_owned(),
        other => other.to_string(),
    }
}

impl Delivery {
    /// An inbox item for `user_id`. `data` is a JSON object for the UI (`Value::Null` = `{}`).
    pub fn in_app(user_id: &str, title: &str, body: &str, category: &str, data: Value) -> Self {
        Delivery::InApp(InApp {
            user_id: user_id.to_owned(),
            title: title.to_owned(),
            body: body.to_owned(),
            category: category.to_owned(),
            data: json_object(data),
        })
    }

    /// A live update: an SSE event `name` (e.g. `order.updated`) carrying `data` to `user_id`.
    pub fn live(user_id: &str, name: &str, data: Value) -> Self {
        Delivery::Live(LiveUpdate {
            user_id: user_id.to_owned(),
            name: name.to_owned(),
            data: json_object(data),
        })
    }

    /// An email to `to`, rendered from the tenant's `template` with `data` as its data.
    pub fn email(to: &str, user_id: Option<&str>, template: &str, data: Value) -> Self {
        Delivery::Email(Email {
            to: to.to_owned(),
            user_id: user_id.map(str::to_owned),
            template: template.to_owned(),
            data: json_object(data),
        })
    }
}

/// Formats a decimal amount with the currency's minor units, e.g. `129.90 EUR`, `1500 JPY`.
pub fn format_amount(amount: f64, currency: &str) -> String {
    let decimals = match currency {
        // ISO 4217 currencies without minor units (the common ones).
        "JPY" | "KRW" | "ISK" | "CLP" | "VND" | "UGX" | "PYG" | "XAF" | "XOF" => 0,
        // And the three-decimal ones.
        "BHD" | "IQD" | "JOD" | "KWD" | "LYD" | "OMR" | "TND" => 3,
        _ => 2,
    };
    format!("{amount:.decimals$} {currency}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(json: &str) -> Data {
        Data::from_json(json).unwrap()
    }

    fn message(err: RouteError) -> String {
        match err {
            RouteError::InvalidEvent(m) => m,
            RouteError::Other(m) => panic!("expected invalid-event, got other({m})"),
        }
    }

    #[test]
    fn required_fields_name_the_field() {
        let d = data(r#"{"user_id": 7, "empty": "", "nothing": null, "amount": "12"}"#);
        assert_eq!(
            message(d.str("order_id").unwrap_err()),
            "data.order_id is required (string)"
        );
        assert_eq!(
            message(d.str("nothing").unwrap_err()),
            "data.nothing is required (string)"
        );
        assert_eq!(
            message(d.str("empty").unwrap_err()),
            "data.empty is required (string)"
        );
        assert_eq!(
            message(d.str("user_id").unwrap_err()),
            "data.user_id must be a string (got number)"
        );
        assert_eq!(
            message(d.f64("amount").unwrap_err()),
            "data.amount must be a number (got string)"
        );
        assert_eq!(
            message(d.f64("total").unwrap_err()),
            "data.total is required (number)"
        );
    }

    #[test]
    fn optional_fields() {
        let d = data(r#"{"email": "", "name": "Alice", "n": null, "flag": true}"#);
        assert_eq!(d.opt_str("email").unwrap(), None);
        assert_eq!(d.opt_str("missing").unwrap(), None);
        assert_eq!(d.opt_str("n").unwrap(), None);
        assert_eq!(d.opt_str("name").unwrap(), Some("Alice"));
        assert!(d.opt_str("flag").is_err());
        assert_eq!(d.opt_bool("flag").unwrap(), Some(true));
    }

    #[test]
    fn data_must_be_an_object() {
        assert_eq!(
            message(Data::from_json("[1]").unwrap_err()),
            "data must be a JSON object (got array)"
        );
        assert!(message(Data::from_json("{").unwrap_err()).starts_with("data is not valid JSON"));
    }

    #[test]
    fn deliveries_serialize_their_data() {
        match Delivery::in_app("u-1", "t", "b", "c", Value::Null) {
            Delivery::InApp(item) => assert_eq!(item.data, "{}"),
            other => panic!("{other:?}"),
        }
        match Delivery::email("a@example.com", Some("u-1"), "order_paid", json!({"a": 1})) {
            Delivery::Email(mail) => {
                assert_eq!(mail.data, r#"{"a":1}"#);
                assert_eq!(mail.user_id.as_deref(), Some("u-1"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn amounts_use_minor_units() {
        assert_eq!(format_amount(129.9, "EUR"), "129.90 EUR");
        assert_eq!(format_amount(1500.0, "JPY"), "1500 JPY");
        assert_eq!(format_amount(1.5, "KWD"), "1.500 KWD");
    }

    #[test]
    fn config_parsing() {
        assert_eq!(parse_config("vip_threshold", None, 500.0).unwrap(), 500.0);
        assert_eq!(
            parse_config("vip_threshold", Some(" 250.5 "), 500.0).unwrap(),
            250.5
        );
        assert!(matches!(
            parse_config("vip_threshold", Some("lots"), 500.0),
            Err(RouteError::Other(m)) if m.contains("vip_threshold")
        ));
    }
}
