//! Checks a plugin's answer before anything of it reaches the database or a user.
//!
//! Plugin output is untrusted input: every string is bounded, every JSON string must parse
//! to an object, addresses must parse, names must be safe. One bad delivery rejects the
//! whole decision, so an event is never half-delivered.

use serde_json::{Map, Value};

use super::wit::types;
use crate::config::PluginConfig;
use crate::model::{RESERVED_EVENT_NAMES, RESERVED_EVENT_PREFIXES};

/// A checked delivery, in the host's own types.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Delivery {
    InApp {
        user_id: String,
        title: String,
        body: String,
        category: String,
        data: Map<String, Value>,
    },
    Live {
        user_id: String,
        /// SSE event name, e.g. `order.updated`.
        name: String,
        data: Map<String, Value>,
    },
    Email {
        to: String,
        user_id: Option<String>,
        template: String,
        data: Map<String, Value>,
        /// BCP 47 language tag of the recipient, for a templating plugin.
        #[serde(skip_serializing_if = "Option::is_none")]
        locale: Option<String>,
        /// IANA time zone of the recipient, for a templating plugin.
        #[serde(skip_serializing_if = "Option::is_none")]
        time_zone: Option<String>,
    },
}

const MAX_USER_ID: usize = 200;
const MAX_TITLE: usize = 500;
const MAX_CATEGORY: usize = 64;
const MAX_NAME: usize = 64;

pub(super) fn validate(
    deliveries: Vec<types::Delivery>,
    limits: &PluginConfig,
) -> Result<Vec<Delivery>, String> {
    if deliveries.len() > limits.max_deliveries {
        return Err(format!(
            "{} deliveries, the limit is {}",
            deliveries.len(),
            limits.max_deliveries
        ));
    }
    let size: usize = deliveries.iter().map(output_size).sum();
    if size > limits.max_output_bytes {
        return Err(format!(
            "output is {size} bytes, the limit is {}",
            limits.max_output_bytes
        ));
    }
    if deliveries.iter().any(has_nul) {
        return Err("output contains a NUL character".into());
    }
    deliveries
        .into_iter()
        .enumerate()
        .map(|(i, d)| {
            check(d).map_err(|e| format!("delivery {i}: {}", super::sandbox::plugin_text(&e)))
        })
        .collect()
}

fn output_size(d: &types::Delivery) -> usize {
    match d {
        types::Delivery::InApp(n) => {
            n.user_id.len() + n.title.len() + n.body.len() + n.category.len() + n.data.len()
        }
        types::Delivery::Live(l) => l.user_id.len() + l.name.len() + l.data.len(),
        types::Delivery::Email(e) => {
            e.to.len()
                + e.user_id.as_ref().map_or(0, String::len)
                + e.template.len()
                + e.data.len()
                + e.locale.as_ref().map_or(0, String::len)
                + e.time_zone.as_ref().map_or(0, String::len)
        }
    }
}

/// PostgreSQL text cannot hold NUL, so it is refused here, with a clear reason. (The JSON
/// `data` fields are checked once parsed, in [`object`]: only there is an escaped `\u0000`
/// told apart from a literal backslash followed by `u0000`.)
fn has_nul(d: &types::Delivery) -> bool {
    let fields: Vec<&str> = match d {
        types::Delivery::InApp(n) => vec![&n.user_id, &n.title, &n.body, &n.category],
        types::Delivery::Live(l) => vec![&l.user_id, &l.name],
        types::Delivery::Email(e) => {
            let mut f = vec![e.to.as_str(), &e.template];
            f.extend(e.user_id.as_deref());
            f.extend(e.locale.as_deref());
            f.extend(e.time_zone.as_deref());
            f
        }
    };
    fields.iter().any(|f| f.contains('\0'))
}

fn check(d: types::Delivery) -> Result<Delivery, String> {
    match d {
        types::Delivery::InApp(n) => {
            user_id(&n.user_id)?;
            if n.title.trim().is_empty() || n.title.len() > MAX_TITLE {
                return Err(format!(
                    "in-app title must be 1..={MAX_TITLE} bytes and not blank"
                ));
            }
            if n.category.len() > MAX_CATEGORY {
                return Err(format!("in-app category is over {MAX_CATEGORY} bytes"));
            }
            Ok(Delivery::InApp {
                user_id: n.user_id,
                title: n.title,
                body: n.body,
                category: n.category,
                data: object(&n.data, "in-app data")?,
            })
        }
        types::Delivery::Live(l) => {
            user_id(&l.user_id)?;
            if !safe_name(&l.name)
                || RESERVED_EVENT_NAMES.contains(&l.name.as_str())
                || RESERVED_EVENT_PREFIXES
                    .iter()
                    .any(|p| l.name.starts_with(p))
            {
                return Err(format!(
                    "live update name {:?} must be 1..={MAX_NAME} of [a-z0-9._-], starting with a letter, none of {RESERVED_EVENT_NAMES:?} and not starting with {RESERVED_EVENT_PREFIXES:?}",
                    l.name
                ));
            }
            Ok(Delivery::Live {
                user_id: l.user_id,
                name: l.name,
                data: object(&l.data, "live update data")?,
            })
        }
        types::Delivery::Email(e) => {
            e.to.parse::<lettre::Address>()
                .map_err(|err| format!("email recipient {:?} is not an address: {err}", e.to))?;
            if let Some(u) = &e.user_id {
                user_id(u)?;
            }
            if !safe_name(&e.template) {
                return Err(format!(
                    "email template name {:?} must be 1..={MAX_NAME} of [a-z0-9._-], starting with a letter",
                    e.template
                ));
            }
            if let Some(locale) = &e.locale
                && !is_locale(locale)
            {
                return Err(format!(
                    "email locale {locale:?} must be a BCP 47 tag such as de-DE (letters, digits and -, at most {MAX_LOCALE} bytes)"
                ));
            }
            if let Some(zone) = &e.time_zone
                && !is_time_zone(zone)
            {
                return Err(format!(
                    "email time zone {zone:?} must be an IANA name such as Europe/Berlin (at most {MAX_NAME} bytes)"
                ));
            }
            Ok(Delivery::Email {
                to: e.to,
                user_id: e.user_id,
                template: e.template,
                data: object(&e.data, "email data")?,
                locale: e.locale,
                time_zone: e.time_zone,
            })
        }
    }
}

const MAX_LOCALE: usize = 35;

/// A BCP 47 language tag's shape: alphanumeric subtags of 1..=8 joined by `-`, the first
/// alphabetic. (Whether the locale is known is the templating plugin's business.)
fn is_locale(tag: &str) -> bool {
    tag.len() <= MAX_LOCALE
        && tag.starts_with(|c: char| c.is_ascii_alphabetic())
        && tag
            .split('-')
            .all(|s| (1..=8).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric()))
}

/// An IANA time zone name's shape, e.g. `Europe/Berlin`, `America/Argentina/Buenos_Aires`,
/// `Etc/GMT+5`, `UTC`.
fn is_time_zone(zone: &str) -> bool {
    zone.len() <= MAX_NAME
        && zone.starts_with(|c: char| c.is_ascii_alphabetic())
        && !zone.contains("..")
        && zone
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'_' | b'-' | b'+'))
}

fn user_id(u: &str) -> Result<(), String> {
    if u.is_empty() || u.len() > MAX_USER_ID || u.chars().any(char::is_control) {
        return Err(format!(
            "user id {u:?} must be 1..={MAX_USER_ID} printable characters"
        ));
    }
    Ok(())
}

/// Names that become SSE event names or template folder names.
fn safe_name(n: &str) -> bool {
    n.len() <= MAX_NAME
        && n.starts_with(|c: char| c.is_ascii_lowercase())
        && n.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
        })
        && !n.contains("..")
}

fn object(json: &str, what: &str) -> Result<Map<String, Value>, String> {
    match serde_json::from_str::<Value>(json) {
        Ok(Value::Object(m)) if crate::model::contains_nul(&m) => {
            Err(format!("{what} contains a NUL character (\\u0000)"))
        }
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(format!("{what} must be a JSON object")),
        Err(e) => Err(format!("{what} is not valid JSON: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
                    .prop_map(
                        |(to, user_id, template, data, locale, time_zone)| {
                            types::Delivery::Email(types::Email {
                                to,
                                user_id,
                                template,
                                data,
                                locale,
                                time_zone,
                            })
                        }
                    ),
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
                        Delivery::Email { to, user_id, template, data, locale, time_zone } => {
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
}
