//! Tests of the envelope decoder: the three accepted shapes, and a refusal for each way a
//! message can be wrong, with the field it names.

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

/// CloudEvents 1.0: `time` is optional (the caller's time stands in), `source` required;
/// the native envelope keeps its own rules (`time` required, `source` optional).
#[test]
fn cloudevents_time_is_optional_and_source_required() {
    let fallback = DateTime::parse_from_rfc3339("2026-12-01T08:00:00Z")
        .unwrap()
        .with_timezone(&Utc);
    let at = |json: &str| decode_at(Some(json.as_bytes()), &[], 1 << 20, fallback);
    for timeless in [
        r#"{"specversion":"1.0","id":"e3","source":"/payments","type":"order_paid","tenant":"acme","data":{}}"#,
        r#"{"specversion":"1.0","id":"e3","source":"/payments","type":"order_paid","time":null,"tenant":"acme","data":{}}"#,
    ] {
        assert_eq!(at(timeless).unwrap().time, fallback, "{timeless}");
    }
    // A time that is given is still checked.
    let r = at(
        r#"{"specversion":"1.0","id":"e3","source":"/p","type":"t","time":"soon","tenant":"acme","data":{}}"#,
    )
    .unwrap_err();
    assert!(r.reason.contains("RFC 3339"), "{r}");
    for sourceless in [
        r#"{"specversion":"1.0","id":"e4","type":"order_paid","time":"2026-11-26T10:00:00Z","tenant":"acme","data":{}}"#,
        r#"{"specversion":"1.0","id":"e4","source":null,"type":"order_paid","tenant":"acme","data":{}}"#,
    ] {
        let r = at(sourceless).unwrap_err();
        assert_eq!(r.kind, RejectionKind::Validation);
        assert!(r.reason.contains("source is required"), "{r}");
        assert_eq!(
            (r.tenant.as_deref(), r.event_id.as_deref()),
            (Some("acme"), Some("e4"))
        );
    }
    let r =
        at(r#"{"specversion":"1.0","id":"e4","source":"","type":"t","tenant":"acme","data":{}}"#)
            .unwrap_err();
    assert!(r.reason.contains("source must not be empty"), "{r}");
    // The native envelope: no source is fine, no time is not.
    assert!(
        at(r#"{"id":"n1","tenant":"acme","type":"t","time":"2026-11-26T10:00:00Z","data":{}}"#)
            .is_ok()
    );
    let r = at(r#"{"id":"n1","tenant":"acme","type":"t","data":{}}"#).unwrap_err();
    assert!(r.reason.contains("time is required"), "{r}");
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
    let r =
        err(r#"{"id":"e","tenant":"../etc","type":"t","time":"2026-11-26T10:00:00Z","data":{}}"#);
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
    let r = err(r#"{"id":"e","tenant":"a","type":"t","time":"2026-11-26T10:00:00Z","data":"x"}"#);
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
    let r = without("ce_source");
    assert!(r.reason.contains("source is required"), "{r}");
    assert_eq!(r.tenant.as_deref(), Some("acme"));
    // `time` is optional in CloudEvents 1.0: the caller's time stands in.
    let h: Vec<_> = base
        .iter()
        .copied()
        .filter(|(k, _)| *k != "ce_time")
        .collect();
    let fallback = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
    let e = decode_at(Some(b"{}"), &headers(&h), 1 << 20, fallback).unwrap();
    assert_eq!(e.time, fallback);
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
