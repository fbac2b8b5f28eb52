//! The checks of a plugin's answer ([`super::validate`]): what is refused and whose fault
//! it is, the plugin's or the event's.

use super::*;

/// The checks with an event that explains nothing: every fault is the plugin's.
fn validate(
    deliveries: Vec<types::Delivery>,
    limits: &PluginConfig,
) -> Result<Vec<Delivery>, String> {
    super::validate(deliveries, limits, &EventText::from_strings(Vec::new())).map_err(|r| match r {
        Refusal::Plugin(m) => m,
        Refusal::Event(m) => panic!("blamed on an event that has no strings: {m}"),
    })
}

fn email_to(to: &str, template: &str) -> types::Delivery {
    types::Delivery::Email(types::Email {
        to: to.into(),
        user_id: Some("u1".into()),
        template: template.into(),
        data: "{}".into(),
        locale: None,
        time_zone: None,
    })
}

/// What the event's data makes invalid is the event's problem: an email is kept but not
/// sent, an in-app item or live update refuses the event; neither is the plugin's fault.
#[test]
fn a_fault_the_events_data_explains_is_the_events() {
    let limits = PluginConfig::default();
    let order = "9".repeat(500);
    let strings = vec!["not an address", order.as_str(), "u\u{1}"];
    let event = EventText::from_strings(strings);
    let title = |t: String| {
        types::Delivery::InApp(types::InApp {
            user_id: "u1".into(),
            title: t,
            body: "b".into(),
            category: "c".into(),
            data: "{}".into(),
        })
    };

    let out = super::validate(
        vec![in_app("u1", "{}"), email_to("not an address", "order_paid")],
        &limits,
        &event,
    )
    .unwrap();
    let Delivery::Email { not_sent, .. } = &out[1] else {
        panic!("an email")
    };
    let reason = not_sent.as_deref().expect("not sent");
    assert!(
        reason.starts_with("not sent: email recipient") && reason.contains("event's data"),
        "{reason}"
    );

    for (delivery, word) in [
        (title(format!("Order {order} shipped")), "title"),
        (in_app("u\u{1}", "{}"), "user id"),
    ] {
        match super::validate(vec![in_app("u1", "{}"), delivery], &limits, &event) {
            Err(Refusal::Event(m)) => {
                assert!(m.starts_with("delivery 1: ") && m.contains(word), "{m}")
            }
            other => panic!("{word}: {other:?}"),
        }
    }

    // What the plugin made bad itself stays its fault, next to the event's strings.
    for delivery in [
        email_to("also not an address", "order_paid"),
        email_to("not an address", "../etc"),
        title("t".repeat(501)),
        in_app("u1", "[]"),
    ] {
        assert!(matches!(
            super::validate(vec![delivery], &limits, &event),
            Err(Refusal::Plugin(_))
        ));
    }
}

fn in_app(user: &str, data: &str) -> types::Delivery {
    types::Delivery::InApp(types::InApp {
        user_id: user.into(),
        title: "t".into(),
        body: "b".into(),
        category: "c".into(),
        data: data.into(),
    })
}

#[test]
fn accepts_good_output() {
    let out = validate(vec![in_app("u1", "{}")], &PluginConfig::default()).unwrap();
    assert!(matches!(&out[0], Delivery::InApp { user_id, .. } if user_id == "u1"));
}

#[test]
fn rejects_bad_output_naming_the_delivery() {
    let limits = PluginConfig::default();
    let e = validate(vec![in_app("u1", "{}"), in_app("", "{}")], &limits).unwrap_err();
    assert!(e.starts_with("delivery 1: user id"), "{e}");
    let e = validate(vec![in_app("u1", "not json")], &limits).unwrap_err();
    assert!(e.contains("not valid JSON"), "{e}");
    let e = validate(vec![in_app("u1", "[]")], &limits).unwrap_err();
    assert!(e.contains("JSON object"), "{e}");
    let live = types::Delivery::Live(types::LiveUpdate {
        user_id: "u".into(),
        name: "notification".into(),
        data: "{}".into(),
    });
    assert!(validate(vec![live], &limits).is_err());
    for reserved in [
        "message",
        "error",
        "open",
        "notification.read",
        "auth.expired",
    ] {
        let live = types::Delivery::Live(types::LiveUpdate {
            user_id: "u".into(),
            name: reserved.into(),
            data: "{}".into(),
        });
        let e = validate(vec![live], &limits).unwrap_err();
        assert!(e.contains("none of"), "{reserved}: {e}");
    }
    let email = types::Delivery::Email(types::Email {
        to: "not an address".into(),
        user_id: None,
        template: "order_paid".into(),
        data: "{}".into(),
        locale: None,
        time_zone: None,
    });
    assert!(
        validate(vec![email], &limits)
            .unwrap_err()
            .contains("recipient")
    );
    let email = types::Delivery::Email(types::Email {
        to: "a@example.com".into(),
        user_id: None,
        template: "../../etc/passwd".into(),
        data: "{}".into(),
        locale: None,
        time_zone: None,
    });
    assert!(
        validate(vec![email], &limits)
            .unwrap_err()
            .contains("template")
    );
    let email = |locale: &str, zone: &str| {
        types::Delivery::Email(types::Email {
            to: "a@example.com".into(),
            user_id: None,
            template: "order_paid".into(),
            data: "{}".into(),
            locale: Some(locale.into()),
            time_zone: Some(zone.into()),
        })
    };
    assert!(validate(vec![email("de-DE", "Europe/Berlin")], &limits).is_ok());
    assert!(
        validate(
            vec![email("zh-Hant-TW", "America/Argentina/Buenos_Aires")],
            &limits
        )
        .is_ok()
    );
    assert!(validate(vec![email("en-US", "Etc/GMT+5")], &limits).is_ok());
    for (locale, zone, word) in [
        ("de_DE\n", "UTC", "locale"),
        ("", "UTC", "locale"),
        ("de-DE", "../../etc/localtime", "time zone"),
        ("de-DE", "Europe/Berlin\r\nBcc: x", "time zone"),
    ] {
        let e = validate(vec![email(locale, zone)], &limits).unwrap_err();
        assert!(e.contains(word), "{locale} {zone}: {e}");
    }
}

#[test]
fn tells_an_escaped_nul_from_a_literal_backslash() {
    let limits = PluginConfig::default();
    // A literal backslash followed by u0000 (a Windows path, a regex) is fine.
    let ok = validate(vec![in_app("u1", r#"{"path":"C:\\u0000"}"#)], &limits).unwrap();
    let Delivery::InApp { data, .. } = &ok[0] else {
        panic!("an in-app delivery")
    };
    assert_eq!(data["path"], "C:\\u0000");
    // An escaped NUL is refused, in values and in keys.
    for bad in [
        r#"{"x":"a\u0000b"}"#,
        r#"{"a\u0000":1}"#,
        r#"{"x":["\u0000"]}"#,
    ] {
        let e = validate(vec![in_app("u1", bad)], &limits).unwrap_err();
        assert!(e.contains("NUL"), "{bad}: {e}");
    }
}

#[test]
fn enforces_size_and_count() {
    let mut limits = PluginConfig {
        max_output_bytes: 100,
        ..PluginConfig::default()
    };
    let big = in_app("u1", &format!("{{\"x\":\"{}\"}}", "a".repeat(200)));
    assert!(validate(vec![big], &limits).unwrap_err().contains("bytes"));
    limits.max_deliveries = 1;
    let e = validate(vec![in_app("u", "{}"), in_app("u", "{}")], &limits).unwrap_err();
    assert!(e.contains("deliveries"), "{e}");
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    /// Text that is sometimes what a field wants and sometimes hostile: controls, NULs,
    /// path climbing, reserved names.
    fn text(plausible: &'static str) -> BoxedStrategy<String> {
        prop_oneof![
            4 => plausible.prop_map(String::from),
            1 => "\\PC{0,12}".prop_map(String::from),
            1 => "(\\PC|\u{0}|\n|/|\\.\\.){0,12}".prop_map(String::from),
            1 => prop::sample::select(vec![
                "notification", "message", "error", "open", "auth.expired",
                "notification.read", "../x", "a..b", "",
            ])
            .prop_map(String::from),
        ]
        .boxed()
    }

    /// A name (live update, template): mostly well formed, sometimes with a slash, a
    /// reserved name or anything.
    fn name() -> BoxedStrategy<String> {
        prop_oneof![
            3 => "[a-z][a-z0-9._-]{0,20}".prop_map(String::from),
            1 => "[a-z][a-z0-9/._-]{0,6}".prop_map(String::from),
            1 => prop::sample::select(vec![
                "notification", "message", "error", "open", "auth.expired",
                "notification.read",
            ])
            .prop_map(String::from),
            1 => text("\\PC{0,12}"),
        ]
        .boxed()
    }

    fn data() -> BoxedStrategy<String> {
        prop_oneof![
            4 => "\\{(\"[a-z]{1,5}\": \"\\PC{0,8}\", ){0,3}\"k\": 1\\}".prop_map(String::from),
            1 => Just(r#"{"a": "\u0000"}"#.to_owned()),
            1 => Just(r#"{"a": "\\u0000"}"#.to_owned()),
            1 => "\\PC{0,16}".prop_map(String::from),
        ]
        .boxed()
    }

    fn delivery() -> impl Strategy<Value = types::Delivery> {
        let user = || text("[a-z0-9]{1,12}");
        prop_oneof![
            (
                user(),
                text("\\PC{1,30}"),
                text("\\PC{0,30}"),
                text("[a-z]{0,10}"),
                data()
            )
                .prop_map(|(user_id, title, body, category, data)| {
                    types::Delivery::InApp(types::InApp {
                        user_id,
                        title,
                        body,
                        category,
                        data,
                    })
                }),
            (user(), name(), data()).prop_map(|(user_id, name, data)| {
                types::Delivery::Live(types::LiveUpdate {
                    user_id,
                    name,
                    data,
                })
            }),
            (
                text("[a-z]{1,8}@example\\.com"),
                prop::option::of(user()),
                name(),
                data(),
                prop::option::of(text("[a-z]{2}-[A-Z]{2}")),
                prop::option::of(text("[A-Z][a-z]{2,8}/[A-Z][a-z]{2,8}")),
            )
                .prop_map(|(to, user_id, template, data, locale, time_zone)| {
                    types::Delivery::Email(types::Email {
                        to,
                        user_id,
                        template,
                        data,
                        locale,
                        time_zone,
                    })
                }),
        ]
    }

    fn printable_user(u: &str) -> bool {
        (1..=200).contains(&u.len()) && !u.chars().any(|c| c.is_control())
    }

    /// An SSE event or template folder name: the rules written out again.
    fn path_safe_name(n: &str) -> bool {
        (1..=64).contains(&n.len())
            && n.as_bytes()[0].is_ascii_lowercase()
            && n.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
            && !n.contains("..")
    }

    fn no_nul(m: &Map<String, Value>) -> bool {
        fn clean(v: &Value) -> bool {
            match v {
                Value::String(s) => !s.contains('\0'),
                Value::Array(items) => items.iter().all(clean),
                Value::Object(m) => m.iter().all(|(k, v)| !k.contains('\0') && clean(v)),
                _ => true,
            }
        }
        clean(&Value::Object(m.clone()))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        /// Whatever a plugin answers: a decision, never a panic; what is accepted is
        /// within the limits, carries no NUL, and names nothing a browser or the
        /// template folders would misread.
        #[test]
        fn plugin_output_is_accepted_only_when_safe(
            deliveries in prop::collection::vec(delivery(), 1..4),
            max_deliveries in 1usize..6,
        ) {
            let limits = PluginConfig { max_deliveries, ..PluginConfig::default() };
            let given = deliveries.len();
            let Ok(accepted) = validate(deliveries, &limits) else {
                return Ok(());
            };
            prop_assert_eq!(accepted.len(), given);
            prop_assert!(accepted.len() <= max_deliveries);
            for d in &accepted {
                match d {
                    Delivery::InApp { user_id, title, body, category, data } => {
                        prop_assert!(printable_user(user_id), "{user_id:?}");
                        prop_assert!(!title.trim().is_empty());
                        prop_assert!(![title, body, category].iter().any(|t| t.contains('\0')));
                        prop_assert!(no_nul(data));
                    }
                    Delivery::Live { user_id, name, data } => {
                        prop_assert!(printable_user(user_id), "{user_id:?}");
                        prop_assert!(path_safe_name(name), "{name:?}");
                        prop_assert!(
                            !["notification", "message", "error", "open"].contains(&name.as_str())
                                && !name.starts_with("notification.")
                                && !name.starts_with("auth."),
                            "{name:?}"
                        );
                        prop_assert!(no_nul(data));
                    }
                    Delivery::Email { to, user_id, template, data, locale, time_zone, .. } => {
                        prop_assert!(to.contains('@') && !to.contains('\0'), "{to:?}");
                        prop_assert!(user_id.as_deref().is_none_or(printable_user));
                        prop_assert!(path_safe_name(template), "{template:?}");
                        for tag in [locale, time_zone].into_iter().flatten() {
                            prop_assert!(!tag.contains("..") && !tag.contains('\0'), "{tag:?}");
                        }
                        prop_assert!(no_nul(data));
                    }
                }
            }
        }
    }
}
