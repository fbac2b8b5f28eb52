//! The event envelope: decoding and validation of one Kafka message value.
//!
//! Two shapes are accepted, both JSON objects:
//!
//! - the native envelope: `{"id", "tenant", "type", "time", "source"?, "data"}`;
//! - CloudEvents 1.0 structured mode: `{"specversion": "1.0", "id", "source", "type",
//!   "time"?, "data", "tenant"}` (`tenant` or `tenantid` as an extension attribute);
//!
//! and CloudEvents 1.0 binary mode (the Kafka protocol binding): the attributes in `ce_`
//! headers (`ce_specversion`, `ce_id`, `ce_type`, `ce_source`, `ce_time`, `ce_tenant` or
//! `ce_tenantid`), `content-type` for `datacontenttype`, and the data object as the value.
//! A message with a `ce_specversion` header is read in binary mode.
//!
//! CloudEvents 1.0 makes `source` required and `time` optional, and so does the engine for
//! a CloudEvent: one without `source` is refused, one without `time` takes the time the
//! caller passes ([`decode_at`]: the Kafka record's timestamp, which stays the same when
//! the message is redelivered). The native envelope keeps its own rules: `time` required,
//! `source` optional.
//!
//! Identifiers are restricted because they name files (plugins and templates are looked up
//! by tenant) and appear in logs: a tenant id can never be a path.

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::Value;

use crate::model::Event;
use crate::model::{
    MAX_ID_LEN, MAX_TENANT_LEN, MAX_TYPE_LEN, contains_nul, valid_id, valid_tenant, valid_type,
};

/// Why a message was refused. `kind` is stable (metrics, dead-letter rows); `reason` is for
/// people and names the offending field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind}: {reason}")]
pub struct Rejection {
    pub kind: RejectionKind,
    pub reason: String,
    /// Whatever could be read before the message was refused, for the dead-letter row.
    pub tenant: Option<String>,
    pub event_id: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectionKind {
    /// Not JSON, or not an object.
    Decode,
    /// JSON, but not a valid envelope.
    Validation,
    /// Larger than `kafka.max_message_bytes`.
    Oversize,
}

impl RejectionKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RejectionKind::Decode => "decode",
            RejectionKind::Validation => "validation",
            RejectionKind::Oversize => "oversize",
        }
    }
}

impl std::fmt::Display for RejectionKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The union of both accepted shapes; unknown fields are ignored so producers may add
/// their own (CloudEvents has several optional attributes).
#[derive(Deserialize)]
struct Raw {
    id: Option<Value>,
    tenant: Option<Value>,
    tenantid: Option<Value>,
    #[serde(rename = "type")]
    event_type: Option<Value>,
    time: Option<Value>,
    source: Option<Value>,
    specversion: Option<Value>,
    datacontenttype: Option<Value>,
    data: Option<Value>,
}

/// The longest `source`, in bytes.
const MAX_SOURCE_LEN: usize = 512;

/// The header that marks a CloudEvents binary-mode message.
pub const BINARY_MODE_HEADER: &str = "ce_specversion";

/// Decodes and validates one message (see [`decode_at`]); a CloudEvent without `time`
/// takes the present time (the tools, which decode a sample file).
pub fn decode(
    payload: Option<&[u8]>,
    headers: &[(String, Option<Vec<u8>>)],
    max_bytes: usize,
) -> Result<Event, Rejection> {
    decode_at(payload, headers, max_bytes, Utc::now())
}

/// Decodes and validates one message: its value, or in binary mode its headers and value.
/// Two steps: `read` the shape (a refusal there is `decode` or `oversize`), then
/// `validate` the attributes (a refusal there is `validation`, and names what it could).
/// `fallback_time` is the time of a CloudEvent without `time` (ingest passes the Kafka
/// record's timestamp).
pub fn decode_at(
    payload: Option<&[u8]>,
    headers: &[(String, Option<Vec<u8>>)],
    max_bytes: usize,
    fallback_time: DateTime<Utc>,
) -> Result<Event, Rejection> {
    let raw = read(payload, headers, max_bytes)?;
    // From here on, keep what we learned so the dead-letter row can name tenant and event.
    let tenant = raw
        .tenant
        .as_ref()
        .or(raw.tenantid.as_ref())
        .and_then(Value::as_str)
        .map(str::to_owned);
    let event_id = raw.id.as_ref().and_then(Value::as_str).map(str::to_owned);
    validate(raw, fallback_time).map_err(|reason| Rejection {
        kind: RejectionKind::Validation,
        reason,
        tenant: tenant.filter(|t| valid_tenant(t)),
        event_id: event_id.filter(|i| valid_id(i)),
    })
}

/// The message as the union of the accepted shapes: from its headers and value in binary
/// mode, else from its value as a JSON object. Nothing is validated yet.
fn read(
    payload: Option<&[u8]>,
    headers: &[(String, Option<Vec<u8>>)],
    max_bytes: usize,
) -> Result<Raw, Rejection> {
    let reject = |kind, reason: String| Rejection {
        kind,
        reason,
        tenant: None,
        event_id: None,
    };
    let Some(bytes) = payload else {
        return Err(reject(
            RejectionKind::Decode,
            "message has no value (tombstone)".into(),
        ));
    };
    if bytes.len() > max_bytes {
        return Err(reject(
            RejectionKind::Oversize,
            format!("message is {} bytes, the limit is {max_bytes}", bytes.len()),
        ));
    }
    if headers.iter().any(|(name, _)| name == BINARY_MODE_HEADER) {
        binary(bytes, headers).map_err(|reason| reject(RejectionKind::Decode, reason))
    } else {
        serde_json::from_slice(bytes).map_err(|e| {
            reject(
                RejectionKind::Decode,
                format!("not a JSON envelope object: {e}"),
            )
        })
    }
}

/// The event, if every attribute is valid; else why not, naming the field. The checks run
/// in a fixed order (CloudEvents version and content type, id, tenant, type, time, source,
/// data), so a message with several faults is always refused for the same one.
fn validate(raw: Raw, fallback_time: DateTime<Utc>) -> Result<Event, String> {
    check_cloudevents(&raw)?;
    // A CloudEvent is one by its `specversion` (checked above to be 1.0).
    let cloudevent = raw.specversion.is_some();
    let id = required_str(&raw.id, "id")?;
    if !valid_id(&id) {
        return Err(format!("id must be 1..={MAX_ID_LEN} printable characters"));
    }
    let tenant_value = raw.tenant.as_ref().or(raw.tenantid.as_ref()).cloned();
    let tenant = required_str(&tenant_value, "tenant")?;
    if !valid_tenant(&tenant) {
        return Err(format!(
            "tenant must be 1..={MAX_TENANT_LEN} characters of [A-Za-z0-9_-]"
        ));
    }
    let event_type = required_str(&raw.event_type, "type")?;
    if !valid_type(&event_type) {
        return Err(format!(
            "type must be 1..={MAX_TYPE_LEN} characters of [A-Za-z0-9_.-]"
        ));
    }
    let time = match &raw.time {
        // CloudEvents 1.0: `time` is optional (a null member counts as absent, as for
        // `source`).
        None | Some(Value::Null) if cloudevent => fallback_time,
        time => {
            let time_text = required_str(time, "time")?;
            DateTime::parse_from_rfc3339(&time_text)
                .map_err(|e| format!("time {time_text:?} is not RFC 3339: {e}"))?
                .with_timezone(&Utc)
        }
    };
    let source = match &raw.source {
        // CloudEvents 1.0: `source` is required, a non-empty URI-reference.
        None | Some(Value::Null) if cloudevent => {
            return Err("source is required in a CloudEvent (CloudEvents 1.0)".into());
        }
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.is_empty() && cloudevent => {
            return Err("source must not be empty in a CloudEvent".into());
        }
        Some(Value::String(s)) if s.len() <= MAX_SOURCE_LEN => Some(s.clone()),
        Some(_) => {
            return Err(format!(
                "source must be a string of at most {MAX_SOURCE_LEN} bytes"
            ));
        }
    };
    let data = data_object(raw.data)?;
    Ok(Event {
        id,
        tenant,
        event_type,
        time,
        source,
        data,
    })
}

/// The CloudEvents attributes, when present: version 1.0, and JSON data.
fn check_cloudevents(raw: &Raw) -> Result<(), String> {
    if let Some(v) = &raw.specversion
        && v.as_str() != Some("1.0")
    {
        return Err(format!(
            "specversion {v} is not supported (only CloudEvents 1.0)"
        ));
    }
    if let Some(ct) = &raw.datacontenttype {
        let ct = ct.as_str().unwrap_or_default();
        if !(ct.starts_with("application/json") || ct.ends_with("+json")) {
            return Err(format!(
                "datacontenttype {ct:?} is not JSON; only JSON data is supported"
            ));
        }
    }
    Ok(())
}

/// The event's data: a JSON object without NUL.
fn data_object(data: Option<Value>) -> Result<serde_json::Map<String, Value>, String> {
    let data = match data {
        Some(Value::Object(map)) => map,
        Some(other) => {
            return Err(format!(
                "data must be a JSON object, got {}",
                json_kind(&other)
            ));
        }
        None => return Err("data is required (a JSON object)".into()),
    };
    // PostgreSQL text cannot hold NUL; refuse it here with a clear reason rather than
    // have the database refuse the outcome later.
    if contains_nul(&data) {
        return Err("data contains a NUL character (\\u0000)".into());
    }
    Ok(data)
}

/// The attributes of a binary-mode message, from its headers, with its value as `data`.
/// Validation proper happens on the result, exactly as for the structured forms.
fn binary(value: &[u8], headers: &[(String, Option<Vec<u8>>)]) -> Result<Raw, String> {
    let header = |name: &str| -> Result<Option<Value>, String> {
        let mut found = headers.iter().filter(|(n, _)| n == name);
        let Some((_, bytes)) = found.next() else {
            return Ok(None);
        };
        if found.next().is_some() {
            return Err(format!("header {name} appears more than once"));
        }
        let text = std::str::from_utf8(bytes.as_deref().unwrap_or_default())
            .map_err(|_| format!("header {name} is not UTF-8"))?;
        Ok(Some(Value::String(text.to_owned())))
    };
    let data: Value = serde_json::from_slice(value)
        .map_err(|e| format!("binary-mode CloudEvent: the value is not JSON data: {e}"))?;
    Ok(Raw {
        id: header("ce_id")?,
        tenant: header("ce_tenant")?,
        tenantid: header("ce_tenantid")?,
        event_type: header("ce_type")?,
        time: header("ce_time")?,
        source: header("ce_source")?,
        specversion: header(BINARY_MODE_HEADER)?,
        datacontenttype: header("content-type")?,
        data: Some(data),
    })
}

fn required_str(value: &Option<Value>, field: &str) -> Result<String, String> {
    match value {
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        Some(Value::String(_)) => Err(format!("{field} must not be empty")),
        Some(other) => Err(format!(
            "{field} must be a string, got {}",
            json_kind(other)
        )),
        None => Err(format!("{field} is required")),
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests;
