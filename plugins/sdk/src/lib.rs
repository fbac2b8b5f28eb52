//! SDK for the notification engine's WebAssembly plugins.
//!
//! A plugin is a WebAssembly component (target `wasm32-wasip2`) for one world of the WIT
//! package `notify:plugin@0.3.0` (`wit/v0.3.0/plugin.wit`):
//!
//! - **routing** (feature `routing`): the engine hands it one validated event at a time and
//!   it answers with the deliveries to make (in-app notifications, live updates, emails),
//!   or with a [`RouteError`], which dead-letters the event. Implement [`Router`], export
//!   with [`export_router!`]. It may ask whether a user has the app open on any instance
//!   ([`presence::is_online`]).
//! - **templating** (feature `templating`): the engine hands it one outbox email (template,
//!   event, recipient with locale and time zone, data) and it answers with subject, html and
//!   text, usually by shaping the data and rendering the tenant's Handlebars files through
//!   [`templates::render`]. Implement [`Templater`], export with [`export_templater!`].
//!
//! Enable exactly one of the two features per plugin. The SDK's own types stand in front of
//! the generated bindings: a new WIT version changes the conversions in here, not your
//! code, and deliveries are built with builders ([`InApp::new`], [`Email::new`], ...).
//!
//! # A complete routing plugin
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
//! notify-plugin-sdk = { path = "../../sdk", features = ["routing"] }
//! ```
//!
//! `src/lib.rs`:
//!
//! ```
//! use notify_plugin_sdk::{Data, Delivery, Event, InApp, RouteError, Router, debug, json};
//!
//! struct MyRouter;
//!
//! impl Router for MyRouter {
//!     fn route(event: Event) -> Result<Vec<Delivery>, RouteError> {
//!         if event.event_type != "order_paid" {
//!             debug!("ignoring {}", event.event_type);
//!             return Ok(Vec::new());
//!         }
//!         let data = Data::parse(&event)?;
//!         let order_id = data.str("order_id")?;
//!         Ok(vec![
//!             InApp::new(data.str("user_id")?, "Payment received")
//!                 .body(format!("Thanks for paying order {order_id}."))
//!                 .category("billing")
//!                 .data(json!({ "order_id": order_id }))
//!                 .into(),
//!         ])
//!     }
//! }
//!
//! notify_plugin_sdk::export_router!(MyRouter);
//! ```
//!
//! Build it with `cargo build --release --target wasm32-wasip2` and publish
//! `target/wasm32-wasip2/release/my_router.wasm` into the engine's plugin directory as
//! `<tenant>.wasm` (write it beside, then rename into place).
//!
//! # Testing natively
//!
//! The SDK also compiles for the host target, so a plugin's rules run under a plain
//! `cargo test`. There the host imports are stand-ins that [`testing`] controls: logs go to
//! stderr, [`config`] returns what [`testing::set_config`] set, [`presence::is_online`]
//! what [`testing::set_online`] set, and [`templates::render`]
//! does what [`testing::set_templates`] installed; [`testing::event`] and
//! [`testing::render_request`] build inputs.

mod data;
mod host;
pub mod testing;
mod types;

#[cfg(feature = "routing")]
pub mod routing;
#[cfg(feature = "templating")]
pub mod templating;

pub use data::{Data, FieldError};
#[cfg(feature = "routing")]
pub use host::presence;
#[cfg(feature = "templating")]
pub use host::templates;
pub use host::{ConfigError, LogLevel, config, config_or, log, parse_config};
#[cfg(feature = "routing")]
pub use routing::Router;
#[cfg(feature = "templating")]
pub use templating::Templater;
pub use types::{
    Delivery, Email, Event, EventRef, InApp, LiveUpdate, Recipient, RenderError, RenderRequest,
    Rendered, RouteError, TemplateError,
};

/// Convenience re-exports, so plugins can write `notify_plugin_sdk::json!`.
pub use serde_json::{Value, json};

/// Logs a formatted line at trace level: `trace!("routing {}", event.id)`.
#[macro_export]
macro_rules! trace {
    ($($arg:tt)+) => { $crate::log::log($crate::LogLevel::Trace, &::std::format!($($arg)+)) };
}

/// Logs a formatted line at debug level.
#[macro_export]
macro_rules! debug {
    ($($arg:tt)+) => { $crate::log::log($crate::LogLevel::Debug, &::std::format!($($arg)+)) };
}

/// Logs a formatted line at info level.
#[macro_export]
macro_rules! info {
    ($($arg:tt)+) => { $crate::log::log($crate::LogLevel::Info, &::std::format!($($arg)+)) };
}

/// Logs a formatted line at warn level.
#[macro_export]
macro_rules! warn {
    ($($arg:tt)+) => { $crate::log::log($crate::LogLevel::Warn, &::std::format!($($arg)+)) };
}

/// Logs a formatted line at error level.
#[macro_export]
macro_rules! error {
    ($($arg:tt)+) => { $crate::log::log($crate::LogLevel::Error, &::std::format!($($arg)+)) };
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

    fn message(err: FieldError) -> String {
        err.0
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
    fn builders_fill_what_they_are_given() {
        let d: Delivery = InApp::new("u-1", "t").body("b").category("c").into();
        let item = d.as_in_app().unwrap();
        assert_eq!((item.body.as_str(), item.category.as_str()), ("b", "c"));
        assert_eq!(item.data, Value::Null);
        assert_eq!(types::json_object(&item.data), "{}");
        let d: Delivery = Email::new("a@example.com", "order_paid")
            .user("u-1")
            .data(json!({"a": 1}))
            .locale("de-DE")
            .time_zone("Europe/Berlin")
            .into();
        let mail = d.as_email().unwrap();
        assert_eq!(types::json_object(&mail.data), r#"{"a":1}"#);
        assert_eq!(mail.user_id.as_deref(), Some("u-1"));
        assert_eq!(mail.locale.as_deref(), Some("de-DE"));
        assert!(d.as_live().is_none());
    }

    #[test]
    fn field_errors_become_the_worlds_errors() {
        let e = data("{}").str("order_id").unwrap_err();
        assert_eq!(
            RouteError::from(e.clone()),
            RouteError::InvalidEvent("data.order_id is required (string)".into())
        );
        assert_eq!(
            RenderError::from(e),
            RenderError::InvalidData("data.order_id is required (string)".into())
        );
    }

    #[test]
    fn testing_controls_the_host_stand_ins() {
        assert_eq!(config("k"), None);
        testing::set_config("k", "v");
        assert_eq!(config("k").as_deref(), Some("v"));
        testing::reset();
        assert_eq!(config("k"), None);
    }

    #[cfg(feature = "routing")]
    #[test]
    fn testing_controls_who_is_online() {
        assert!(!presence::is_online("u-1"));
        testing::set_online("u-1", true);
        assert!(presence::is_online("u-1"));
        assert!(!presence::is_online("u-2"));
        testing::set_online("u-1", false);
        assert!(!presence::is_online("u-1"));
        testing::set_online("u-2", true);
        testing::reset();
        assert!(!presence::is_online("u-2"));
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
        let e = parse_config("vip_threshold", Some("lots"), 500.0).unwrap_err();
        assert!(e.0.contains("vip_threshold"), "{e}");
        assert!(matches!(RouteError::from(e), RouteError::Other(_)));
    }
}
