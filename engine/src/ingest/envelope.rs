//! The event envelope: decoding and validation of one Kafka message value.
//!
//! Two shapes are accepted, both JSON objects:
//!
//! - the native envelope: `{"id", "tenant", "type", "time", "source"?, "data"}`;
//! - CloudEvents 1.0 structured mode: `{"specversion": "1.0", "id", "source", "type",
//!   "time", "data", "tenant"}` (`tenant` or `tenantid` as an extension attribute);
//!
//! and CloudEvents 1.0 binary mode (the Kafka protocol binding): the attributes in `ce_`
//! headers (`ce_specversion`, `ce_id`, `ce_type`, `ce_source`, `ce_time`, `ce_tenant` or
//! `ce_tenantid`), `content-type` for `datacontenttype`, and the data object as the value.
//! A message with a `ce_specversion` header is read in binary mode.
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

/// The header that marks a CloudEvents binary-mode message.
pub const BINARY_MODE_HEADER: &str = "ce_specversion";

/// Decodes and validates one message: its value, or in binary mode its headers and value.
pub fn decode(
    payload: Option<&[u8]>,
    headers: &[(String, Option<Vec<u8>>)],
    max_bytes: usize,
) -> Result<Event, Rejection> {
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
    let raw = if headers.iter().any(|(name, _)| name == BINARY_MODE_HEADER) {
        binary(bytes, headers).map_err(|reason| reject(RejectionKind::Decode, reason))?
    } else {
        serde_json::from_slice(bytes).map_err(|e| {
            reject(
                RejectionKind::Decode,
                format!("not a JSON envelope object: {e}"),
            )
        })?
    };
    // From here on, keep what we learned so the dead-letter row can name tenant and event.
    let tenant = raw
        .tenant
        .as_ref()
        .or(raw.tenantid.as_ref())
        .and_then(Value::as_str)
        .map(str::to_owned);
    let event_id = raw.id.as_ref().and_then(Value::as_str).map(str::to_owned);
    let invalid = |reason: String| Rejection {
        kind: RejectionKind::Validation,
        reason,
        tenant: tenant.clone().filter(|t| valid_tenant(t)),
        event_id: event_id.clone().filter(|i| valid_id(i)),
    };

    if let Some(v) = &raw.specversion
        && v.as_str() != Some("1.0")
    {
        return Err(invalid(format!(
            "specversion {v} is not supported (only CloudEvents 1.0)"
        )));
    }
    if let Some(ct) = &raw.datacontenttype {
        let ct = ct.as_str().unwrap_or_default();
        if !(ct.starts_with("application/json") || ct.ends_with("+json")) {
            return Err(invalid(format!(
                "datacontenttype {ct:?} is not JSON; only JSON data is supported"
            )));
        }
    }

    let id = required_str(&raw.id, "id").map_err(&invalid)?;
    if !valid_id(&id) {
        return Err(invalid(format!(
            "id must be 1..={MAX_ID_LEN} printable characters"
        )));
    }
    let tenant_value = raw.tenant.as_ref().or(raw.tenantid.as_ref()).cloned();
    let tenant_id = required_str(&tenant_value, "tenant").map_err(&invalid)?;
    if !valid_tenant(&tenant_id) {
        return Err(invalid(format!(
            "tenant must be 1..={MAX_TENANT_LEN} characters of [A-Za-z0-9_-]"
        )));
    }
    let event_type = required_str(&raw.event_type, "type").map_err(&invalid)?;
    if !valid_type(&event_type) {
        return Err(invalid(format!(
            "type must be 1..={MAX_TYPE_LEN} characters of [A-Za-z0-9_.-]"
        )));
    }
    let time_text = required_str(&raw.time, "time").map_err(&invalid)?;
    let time = DateTime::parse_from_rfc3339(&time_text)
        .map_err(|e| invalid(format!("time {time_text:?} is not RFC 3339: {e}")))?
        .with_timezone(&Utc);
    let source = match &raw.source {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.len() <= 512 => Some(s.clone()),
        Some(_) => {
            return Err(invalid(
                "source must be a string of at most 512 bytes".into(),
            ));
        }
    };
    let data = match raw.data {
        Some(Value::Object(map)) => map,
        Some(other) => {
            return Err(invalid(format!(
                "data must be a JSON object, got {}",
                json_kind(&other)
            )));
        }
        None => return Err(invalid("data is required (a JSON object)".into())),
    };
    // PostgreSQL text cannot hold NUL; refuse it here with a clear reason rather than
    // have the database refuse the outcome later.
    if contains_nul(&data) {
        return Err(invalid("data contains a NUL character (\\u0000)".into()));
    }
    Ok(Event {
        id,
        tenant: tenant_id,
        event_type,
        time,
        source,
        data,
    })
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
mod tests {
    use super::*;

    fn ok(json: &str) -> Event {
        decode(Some(json.as_bytes()), &[], 1 << 20).unwrap()
    }

    fn err(json: &str) -> Rejection {
        decode(Some(json.as_bytes()), &[], 1 << 20).unwrap_err()
    }

    #[test]
    fn native_envelope() {
        let e = ok(
            r#"{"id":"e1","tenant":"acme","type":"order_paid","time":"2026-11-26T10:00:00+01:00","data":{"user_id":"u1"}}"#,
        );
        assert_eq!(e.id, "e1");
        assert_eq!(e.tenant, "acme");
        assert_eq!(e.event_type, "order_paid");
        assert_eq!(e.time.to_rfc3339(), "2026-11-26T09:00:00+00:00");
        assert_eq!(e.data["user_id"], "u1");
    }

    #[test]
    fn a_literal_backslash_u0000_is_not_a_nul() {
        let e = ok(
            r#"{"id":"e1","tenant":"acme","type":"order_paid","time":"2026-11-26T10:00:00Z","data":{"path":"C:\\u0000"}}"#,
        );
        assert_eq!(e.data["path"], "C:\\u0000");
        let r = err(
            r#"{"id":"e1","tenant":"acme","type":"order_paid","time":"2026-11-26T10:00:00Z","data":{"x":{"y":["a\u0000"]}}}"#,
        );
        assert!(r.reason.contains("NUL"), "{r}");
    }

    #[test]
    fn cloudevents_structured() {
        let e = ok(
            r#"{"specversion":"1.0","id":"e2","source":"/payments","type":"order_paid","time":"2026-11-26T10:00:00Z","datacontenttype":"application/json","tenantid":"acme","data":{}}"#,
        );
        assert_eq!(e.tenant, "acme");
        assert_eq!(e.source.as_deref(), Some("/payments"));
    }

    #[test]
    fn rejects_with_field_names() {
        assert_eq!(err("not json").kind, RejectionKind::Decode);
        assert_eq!(err("[1,2]").kind, RejectionKind::Decode);
        let r = err(r#"{"id":"e","tenant":"a","type":"t","time":"2026-11-26T10:00:00Z"}"#);
        assert_eq!(r.kind, RejectionKind::Validation);
        assert!(r.reason.contains("data"), "{}", r.reason);
        assert_eq!(r.tenant.as_deref(), Some("a"));
        assert_eq!(r.event_id.as_deref(), Some("e"));
        let r = err(
            r#"{"id":"e","tenant":"../etc","type":"t","time":"2026-11-26T10:00:00Z","data":{}}"#,
        );
        assert!(r.reason.contains("tenant"), "{}", r.reason);
        assert_eq!(r.tenant, None, "an unsafe tenant id is not carried along");
        let r = err(r#"{"id":"e","tenant":"a","type":"t","time":"yesterday","data":{}}"#);
        assert!(r.reason.contains("RFC 3339"), "{}", r.reason);
        let r = err(r#"{"id":7,"tenant":"a","type":"t","time":"2026-11-26T10:00:00Z","data":{}}"#);
        assert!(r.reason.contains("id must be a string"), "{}", r.reason);
        let r = err(
            r#"{"specversion":"0.3","id":"e","tenant":"a","type":"t","time":"2026-11-26T10:00:00Z","data":{}}"#,
        );
        assert!(r.reason.contains("specversion"), "{}", r.reason);
        let r =
            err(r#"{"id":"e","tenant":"a","type":"t","time":"2026-11-26T10:00:00Z","data":"x"}"#);
        assert!(
            r.reason.contains("data must be a JSON object"),
            "{}",
            r.reason
        );
    }

    #[test]
    fn oversize_and_tombstone() {
        let r = decode(Some(&[b' '; 100]), &[], 10).unwrap_err();
        assert_eq!(r.kind, RejectionKind::Oversize);
        assert_eq!(
            decode(None, &[], 10).unwrap_err().kind,
            RejectionKind::Decode
        );
    }

    fn headers(pairs: &[(&str, &str)]) -> Vec<(String, Option<Vec<u8>>)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), Some(v.as_bytes().to_vec())))
            .collect()
    }

    #[test]
    fn decodes_cloudevents_binary_mode() {
        let base = [
            ("ce_specversion", "1.0"),
            ("ce_id", "b1"),
            ("ce_type", "order_paid"),
            ("ce_source", "/payments"),
            ("ce_time", "2026-11-27T10:00:00Z"),
            ("ce_tenant", "acme"),
            ("content-type", "application/json"),
        ];
        let e = decode(Some(br#"{"order_id":"A-1"}"#), &headers(&base), 1 << 20).unwrap();
        assert_eq!((e.id.as_str(), e.tenant.as_str()), ("b1", "acme"));
        assert_eq!(e.event_type, "order_paid");
        assert_eq!(e.source.as_deref(), Some("/payments"));
        assert_eq!(e.data["order_id"], "A-1");

        // Each missing attribute is named, and tenant/id survive for the dead letter.
        let without = |name: &str| {
            let h: Vec<_> = base.iter().copied().filter(|(k, _)| *k != name).collect();
            decode(Some(b"{}"), &headers(&h), 1 << 20).unwrap_err()
        };
        assert!(without("ce_id").reason.contains("id is required"));
        assert!(without("ce_tenant").reason.contains("tenant is required"));
        let r = without("ce_time");
        assert!(r.reason.contains("time is required"));
        assert_eq!(r.tenant.as_deref(), Some("acme"));
        // The value must be a JSON object; the content type JSON; headers single and UTF-8.
        let r = decode(Some(b"not json"), &headers(&base), 1 << 20).unwrap_err();
        assert_eq!(r.kind, RejectionKind::Decode);
        let r = decode(Some(b"[1]"), &headers(&base), 1 << 20).unwrap_err();
        assert!(
            r.reason.contains("data must be a JSON object"),
            "{}",
            r.reason
        );
        let mut xml = base.to_vec();
        xml.retain(|(k, _)| *k != "content-type");
        xml.push(("content-type", "application/xml"));
        assert!(
            decode(Some(b"{}"), &headers(&xml), 1 << 20)
                .unwrap_err()
                .reason
                .contains("not JSON")
        );
        let mut twice = base.to_vec();
        twice.push(("ce_tenant", "globex"));
        assert!(
            decode(Some(b"{}"), &headers(&twice), 1 << 20)
                .unwrap_err()
                .reason
                .contains("more than once")
        );
        let mut bad = headers(&base);
        bad[1].1 = Some(vec![0xff, 0xfe]);
        assert!(
            decode(Some(b"{}"), &bad, 1 << 20)
                .unwrap_err()
                .reason
                .contains("UTF-8")
        );
        // Oversize is checked before anything is parsed.
        let r = decode(Some(&[b' '; 100]), &headers(&base), 10).unwrap_err();
        assert_eq!(r.kind, RejectionKind::Oversize);
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;
        use serde_json::json;

        /// Object keys, now and then with a NUL.
        fn key() -> impl Strategy<Value = String> {
            prop_oneof![8 => "\\PC{0,8}", 1 => "(\\PC|\u{0}){0,8}"]
        }

        /// JSON values of a few levels, with the strings that trip checks (NULs, controls).
        fn json_value() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                1 => Just(Value::Null),
                1 => any::<bool>().prop_map(Value::from),
                1 => any::<i64>().prop_map(Value::from),
                1 => any::<f64>().prop_map(Value::from),
                8 => "\\PC{0,12}".prop_map(Value::from),
                1 => "(\\PC|\u{0}|\n){0,12}".prop_map(Value::from),
            ];
            leaf.prop_recursive(3, 24, 6, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
                    prop::collection::btree_map(key(), inner, 0..6)
                        .prop_map(|m| Value::Object(m.into_iter().collect())),
                ]
            })
        }

        /// Envelope-shaped objects: each field mostly present and mostly of its kind (so a
        /// fair share are accepted), sometimes absent or of any JSON type.
        fn envelope() -> impl Strategy<Value = Value> {
            let text = |pattern: &'static str| prop_oneof![3 => pattern.prop_map(Value::from), 1 => json_value()];
            let field = |name: &'static str, value: BoxedStrategy<Value>| {
                prop::option::weighted(0.85, value).prop_map(move |v| (name, v))
            };
            let data = prop_oneof![
                3 => prop::collection::btree_map(key(), json_value(), 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
                1 => json_value(),
            ];
            (
                field("id", text("\\PC{1,20}|\n").boxed()),
                field(
                    "tenant",
                    text("[A-Za-z0-9_-]{1,20}|[A-Za-z0-9_./-]{0,70}").boxed(),
                ),
                field(
                    "type",
                    text("[A-Za-z0-9_.-]{1,40}|[A-Za-z0-9_./-]{0,130}").boxed(),
                ),
                field(
                    "time",
                    prop_oneof![
                        6 => Just(Value::from("2026-11-26T10:00:00Z")),
                        1 => Just(Value::from("2026-13-01")),
                        1 => json_value(),
                    ]
                    .boxed(),
                ),
                field("source", text("\\PC{0,20}").boxed()),
                field("data", data.boxed()),
            )
                .prop_map(|(a, b, c, d, e, f)| {
                    let mut object = serde_json::Map::new();
                    for (name, value) in [a, b, c, d, e, f] {
                        if let Some(value) = value {
                            object.insert(name.into(), value);
                        }
                    }
                    Value::Object(object)
                })
        }

        /// The envelope's rules, written out again here rather than calling the checks they
        /// test.
        fn check(event: &Event) -> Result<(), TestCaseError> {
            let id = &event.id;
            prop_assert!(
                (1..=200).contains(&id.len()) && !id.chars().any(|c| c.is_control()),
                "id {id:?}"
            );
            let tenant = &event.tenant;
            prop_assert!(
                (1..=64).contains(&tenant.len())
                    && tenant
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"_-".contains(&b)),
                "tenant {tenant:?}"
            );
            let kind = &event.event_type;
            prop_assert!(
                (1..=128).contains(&kind.len())
                    && kind
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b)),
                "type {kind:?}"
            );
            fn nul(v: &Value) -> bool {
                match v {
                    Value::String(s) => s.contains('\0'),
                    Value::Array(items) => items.iter().any(nul),
                    Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || nul(v)),
                    _ => false,
                }
            }
            prop_assert!(
                !nul(&Value::Object(event.data.clone())),
                "a NUL in {:?}",
                event.data
            );
            Ok(())
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(1024))]

            /// Any bytes, with or without binary-mode headers, within the size limit or not:
            /// a decision, never a panic, and an accepted event keeps every rule.
            #[test]
            fn any_bytes_are_decoded_or_refused(
                payload in prop::option::of(prop::collection::vec(any::<u8>(), 0..600)),
                binary in any::<bool>(),
            ) {
                let headers = if binary {
                    vec![(BINARY_MODE_HEADER.to_owned(), Some(b"1.0".to_vec()))]
                } else {
                    Vec::new()
                };
                match decode(payload.as_deref(), &headers, 512) {
                    Ok(event) => check(&event)?,
                    Err(rejection) => prop_assert!(!rejection.reason.is_empty()),
                }
            }

            /// Envelope-shaped JSON with fields of any type: accepted only when it keeps
            /// every rule; a refusal says why, as a validation (or decode) error.
            #[test]
            fn envelope_shaped_json_is_decoded_or_refused(value in envelope()) {
                match decode(Some(value.to_string().as_bytes()), &[], 1 << 20) {
                    Ok(event) => check(&event)?,
                    Err(rejection) => {
                        prop_assert!(!rejection.reason.is_empty());
                        prop_assert_ne!(rejection.kind, RejectionKind::Oversize);
                    }
                }
            }

            /// A valid envelope decodes to exactly what was sent.
            #[test]
            fn a_valid_envelope_decodes_to_what_was_sent(
                id in "[!-~]{1,200}",
                tenant in "[A-Za-z0-9_-]{1,64}",
                event_type in "[A-Za-z0-9_.-]{1,128}",
                secs in 0i64..4_000_000_000,
                key in "\\PC{1,10}",
                text in "\\PC{0,40}",
            ) {
                let time = DateTime::from_timestamp(secs, 0).unwrap();
                let sent = json!({
                    "id": id, "tenant": tenant, "type": event_type,
                    "time": time.to_rfc3339(), "data": {key.clone(): text.clone()},
                });
                let event = decode(Some(sent.to_string().as_bytes()), &[], 1 << 20)
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(event.id, id);
                prop_assert_eq!(event.tenant, tenant);
                prop_assert_eq!(event.event_type, event_type);
                prop_assert_eq!(event.time, time);
                prop_assert_eq!(&event.data[&key], &Value::from(text));
            }
        }
    }
}
