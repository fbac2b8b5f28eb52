//! Reading the tenant-owned JSON (an event's payload, an email's data) with errors that
//! name the field.

use serde_json::{Map, Value};

use crate::Event;

/// A field of the JSON is missing or has the wrong shape: `data.user_id is required
/// (string)`. With `?` it becomes [`crate::RouteError::InvalidEvent`] in a router and
/// [`crate::RenderError::InvalidData`] in a templater.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError(pub String);

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for FieldError {}

/// The event's JSON payload (`event.data`, always an object), with accessors whose errors
/// are [`FieldError`]s naming the field, e.g. `data.user_id is required (string)`.
///
/// Optional accessors treat a missing field and `null` alike as absent; [`Data::opt_str`]
/// also treats an empty string as absent.
#[derive(Clone, Debug, PartialEq)]
pub struct Data(Map<String, Value>);

impl Data {
    /// Parses `event.data`; anything but a JSON object is an invalid event.
    pub fn parse(event: &Event) -> Result<Self, FieldError> {
        Self::from_json(&event.data)
    }

    /// Parses a JSON text that must hold an object.
    pub fn from_json(json: &str) -> Result<Self, FieldError> {
        match serde_json::from_str::<Value>(json) {
            Ok(value) => Self::from_value(value),
            Err(err) => Err(FieldError(format!("data is not valid JSON: {err}"))),
        }
    }

    /// Wraps a JSON value that must be an object.
    pub fn from_value(value: Value) -> Result<Self, FieldError> {
        match value {
            Value::Object(map) => Ok(Data(map)),
            other => Err(FieldError(format!(
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
    pub fn str(&self, field: &str) -> Result<&str, FieldError> {
        match self.opt_str(field)? {
            Some(s) => Ok(s),
            None => Err(required(field, "string")),
        }
    }

    /// An optional string field; missing, `null` and `""` are all `None`.
    pub fn opt_str(&self, field: &str) -> Result<Option<&str>, FieldError> {
        match self.get(field) {
            None => Ok(None),
            Some(Value::String(s)) if s.is_empty() => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(wrong_type(field, "string", other)),
        }
    }

    /// A required number field (e.g. an amount such as `129.90`).
    pub fn f64(&self, field: &str) -> Result<f64, FieldError> {
        self.opt_f64(field)?
            .ok_or_else(|| required(field, "number"))
    }

    /// An optional number field.
    pub fn opt_f64(&self, field: &str) -> Result<Option<f64>, FieldError> {
        match self.get(field) {
            None => Ok(None),
            Some(Value::Number(n)) => Ok(n.as_f64()),
            Some(other) => Err(wrong_type(field, "number", other)),
        }
    }

    /// A required boolean field.
    pub fn bool(&self, field: &str) -> Result<bool, FieldError> {
        self.opt_bool(field)?
            .ok_or_else(|| required(field, "boolean"))
    }

    /// An optional boolean field.
    pub fn opt_bool(&self, field: &str) -> Result<Option<bool>, FieldError> {
        match self.get(field) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(wrong_type(field, "boolean", other)),
        }
    }

    /// An optional array field.
    pub fn opt_array(&self, field: &str) -> Result<Option<&Vec<Value>>, FieldError> {
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

fn required(field: &str, ty: &str) -> FieldError {
    FieldError(format!("data.{field} is required ({ty})"))
}

fn wrong_type(field: &str, ty: &str, got: &Value) -> FieldError {
    FieldError(format!(
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
