//! The SDK's own types, in front of the generated bindings: a new WIT version changes the
//! conversions inside the SDK, not the code of plugins. Deliveries are built with
//! builders, so a field added later is one more optional method, not a source break.

use serde_json::Value;

use crate::data::FieldError;

/// The event a routing plugin decides about: the validated Kafka envelope.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    /// Producer-chosen id, unique per tenant.
    pub id: String,
    /// The tenant that owns the event.
    pub tenant: String,
    /// E.g. `order_paid`.
    pub event_type: String,
    /// RFC 3339 timestamp given by the producer.
    pub time: String,
    /// The producing service, when the envelope names one.
    pub source: Option<String>,
    /// The tenant-owned payload: a JSON object as text (read it with [`crate::Data`]).
    pub data: String,
}

/// What a routing plugin decides: one of [`InApp`], [`LiveUpdate`], [`Email`] (each
/// converts `into()` a delivery).
#[derive(Clone, Debug, PartialEq)]
pub enum Delivery {
    InApp(InApp),
    Live(LiveUpdate),
    Email(Email),
}

impl Delivery {
    /// The inbox item, if this is one.
    pub fn as_in_app(&self) -> Option<&InApp> {
        match self {
            Delivery::InApp(x) => Some(x),
            _ => None,
        }
    }

    /// The live update, if this is one.
    pub fn as_live(&self) -> Option<&LiveUpdate> {
        match self {
            Delivery::Live(x) => Some(x),
            _ => None,
        }
    }

    /// The email, if this is one.
    pub fn as_email(&self) -> Option<&Email> {
        match self {
            Delivery::Email(x) => Some(x),
            _ => None,
        }
    }
}

/// An inbox item, stored and pushed to the user's browsers as an SSE `notification`.
///
/// `InApp::new("u-1", "Payment received").body("…").category("billing").data(json!({…}))`
#[derive(Clone, Debug, PartialEq)]
pub struct InApp {
    pub user_id: String,
    pub title: String,
    pub body: String,
    /// Free-form grouping for the UI, e.g. `billing`.
    pub category: String,
    /// A JSON object for the UI (`Value::Null` is sent as `{}`).
    pub data: Value,
}

impl InApp {
    pub fn new(user_id: impl Into<String>, title: impl Into<String>) -> Self {
        InApp {
            user_id: user_id.into(),
            title: title.into(),
            body: String::new(),
            category: String::new(),
            data: Value::Null,
        }
    }

    pub fn body(mut self, body: impl Into<String>) -> Self {
        self.body = body.into();
        self
    }

    pub fn category(mut self, category: impl Into<String>) -> Self {
        self.category = category.into();
        self
    }

    pub fn data(mut self, data: Value) -> Self {
        self.data = data;
        self
    }
}

/// A live update (not an inbox item), pushed as the SSE event `name`, e.g. `order.updated`.
///
/// `LiveUpdate::new("u-1", "order.updated").data(json!({…}))`
#[derive(Clone, Debug, PartialEq)]
pub struct LiveUpdate {
    pub user_id: String,
    /// Lowercase letters, digits, `.`, `_`, `-`; not `notification`, `message`, `error`, `open`,
    /// nor starting with `notification.` or `auth.` (the engine's own events).
    pub name: String,
    pub data: Value,
}

impl LiveUpdate {
    pub fn new(user_id: impl Into<String>, name: impl Into<String>) -> Self {
        LiveUpdate {
            user_id: user_id.into(),
            name: name.into(),
            data: Value::Null,
        }
    }

    pub fn data(mut self, data: Value) -> Self {
        self.data = data;
        self
    }
}

/// An email, rendered from the tenant's `template` (by its templating plugin if it has
/// one) and sent through the outbox.
///
/// `Email::new("alice@example.com", "order_paid").user("u-1").data(model).locale("de-DE")`
#[derive(Clone, Debug, PartialEq)]
pub struct Email {
    pub to: String,
    pub template: String,
    pub user_id: Option<String>,
    pub data: Value,
    /// The recipient's BCP 47 language tag, e.g. `de-DE`.
    pub locale: Option<String>,
    /// The recipient's IANA time zone, e.g. `Europe/Berlin`.
    pub time_zone: Option<String>,
}

impl Email {
    pub fn new(to: impl Into<String>, template: impl Into<String>) -> Self {
        Email {
            to: to.into(),
            template: template.into(),
            user_id: None,
            data: Value::Null,
            locale: None,
            time_zone: None,
        }
    }

    /// The user the email concerns (for the audit trail).
    pub fn user(mut self, user_id: impl Into<String>) -> Self {
        self.user_id = Some(user_id.into());
        self
    }

    pub fn data(mut self, data: Value) -> Self {
        self.data = data;
        self
    }

    pub fn locale(mut self, locale: impl Into<String>) -> Self {
        self.locale = Some(locale.into());
        self
    }

    pub fn time_zone(mut self, zone: impl Into<String>) -> Self {
        self.time_zone = Some(zone.into());
        self
    }
}

impl From<InApp> for Delivery {
    fn from(x: InApp) -> Self {
        Delivery::InApp(x)
    }
}

impl From<LiveUpdate> for Delivery {
    fn from(x: LiveUpdate) -> Self {
        Delivery::Live(x)
    }
}

impl From<Email> for Delivery {
    fn from(x: Email) -> Self {
        Delivery::Email(x)
    }
}

/// Why a routing plugin refused an event; the host dead-letters it with this reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RouteError {
    /// The payload lacks something, or has it in the wrong shape.
    InvalidEvent(String),
    Other(String),
}

impl RouteError {
    pub fn invalid_event(message: impl Into<String>) -> Self {
        RouteError::InvalidEvent(message.into())
    }

    pub fn other(message: impl Into<String>) -> Self {
        RouteError::Other(message.into())
    }
}

impl From<FieldError> for RouteError {
    fn from(e: FieldError) -> Self {
        RouteError::InvalidEvent(e.0)
    }
}

/// The event an email is about.
#[derive(Clone, Debug, PartialEq)]
pub struct EventRef {
    pub id: String,
    pub event_type: String,
    /// RFC 3339.
    pub time: String,
}

/// Whom an email goes to, as the routing plugin described them.
#[derive(Clone, Debug, PartialEq)]
pub struct Recipient {
    pub address: String,
    pub user_id: Option<String>,
    pub locale: Option<String>,
    pub time_zone: Option<String>,
}

/// One email for a templating plugin to render.
#[derive(Clone, Debug, PartialEq)]
pub struct RenderRequest {
    /// The template the routing plugin chose, e.g. `order_paid`.
    pub template: String,
    pub event: EventRef,
    pub recipient: Recipient,
    /// The JSON object the routing plugin chose (read it with [`crate::Data::from_json`]).
    pub data: String,
}

/// A rendered email: a one-line subject and at least one of html and text.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Rendered {
    pub subject: String,
    pub html: Option<String>,
    pub text: Option<String>,
}

impl Rendered {
    pub fn new(subject: impl Into<String>) -> Self {
        Rendered {
            subject: subject.into(),
            ..Rendered::default()
        }
    }

    pub fn html(mut self, html: impl Into<String>) -> Self {
        self.html = Some(html.into());
        self
    }

    pub fn text(mut self, text: impl Into<String>) -> Self {
        self.text = Some(text.into());
        self
    }
}

/// Why a templating plugin could not render; the email fails with this reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RenderError {
    /// The data lacks something the template needs, or has it in the wrong shape.
    InvalidData(String),
    Other(String),
}

impl RenderError {
    pub fn invalid_data(message: impl Into<String>) -> Self {
        RenderError::InvalidData(message.into())
    }

    pub fn other(message: impl Into<String>) -> Self {
        RenderError::Other(message.into())
    }
}

impl From<FieldError> for RenderError {
    fn from(e: FieldError) -> Self {
        RenderError::InvalidData(e.0)
    }
}

/// Why the host could not render one of the tenant's files ([`crate::templates::render`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TemplateError {
    /// No such template part for the tenant (nor in `templates/default/`).
    Missing,
    /// Broken file or failed rendering; the reason names file and line.
    Failed(String),
}

impl std::fmt::Display for TemplateError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TemplateError::Missing => f.write_str("no such template"),
            TemplateError::Failed(m) => f.write_str(m),
        }
    }
}

impl From<TemplateError> for RenderError {
    fn from(e: TemplateError) -> Self {
        RenderError::Other(format!("template: {e}"))
    }
}

/// Serializes delivery data for the WIT (a JSON object as text); `null` becomes `{}`.
#[cfg_attr(not(feature = "routing"), allow(dead_code))] // routing's conversions use it
pub(crate) fn json_object(data: &Value) -> String {
    match data {
        Value::Null => "{}".to_owned(),
        other => other.to_string(),
    }
}
