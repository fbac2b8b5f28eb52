//! Checks a plugin's answer before anything of it reaches the database or a user.
//!
//! Plugin output is untrusted input: every string is bounded, every JSON string must parse
//! to an object, addresses must parse, names must be safe. One bad delivery rejects the
//! whole decision, so an event is never half-delivered, with one exception below.
//!
//! Whose fault an invalid field is: a plugin passing on what the event said (an address
//! that does not parse, a 500-byte order id making a title too long, a control character
//! in a user id) did its job; the event is what is wrong. `provenance` tells the two apart:
//! a field is the event's doing when it is one of the event's strings, or when putting a
//! neutral stand-in where the event's string is in it makes it valid. Such a refusal
//! ([`Refusal::Event`]) is the event's outcome and never counts against the plugin. An
//! email whose faults are all the event's is not refused with its event: it is recorded
//! but not sent (`not_sent`, an outbox row of status `skipped` with the reason), and the
//! event's other deliveries go out.

mod provenance;

pub(super) use provenance::EventText;

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
        /// `Some(reason)`: a field the event's data gave it is invalid (the recipient is not
        /// an address, ...); the email is recorded but not sent.
        #[serde(skip_serializing_if = "Option::is_none")]
        not_sent: Option<String>,
    },
}

/// Why a decision was refused, and whose fault that is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Refusal {
    /// The plugin's: it counts toward the breaker.
    Plugin(String),
    /// The event's: a value of its data makes a delivery invalid.
    Event(String),
}

const MAX_USER_ID: usize = 200;
const MAX_TITLE: usize = 500;
const MAX_CATEGORY: usize = 64;
const MAX_NAME: usize = 64;

/// The plugin's deliveries checked, for `event` (whose strings may explain a bad field).
pub(super) fn validate(
    deliveries: Vec<types::Delivery>,
    limits: &PluginConfig,
    event: &EventText<'_>,
) -> Result<Vec<Delivery>, Refusal> {
    if deliveries.len() > limits.max_deliveries {
        return Err(Refusal::Plugin(format!(
            "{} deliveries, the limit is {}",
            deliveries.len(),
            limits.max_deliveries
        )));
    }
    let size: usize = deliveries.iter().map(output_size).sum();
    if size > limits.max_output_bytes {
        return Err(Refusal::Plugin(format!(
            "output is {size} bytes, the limit is {}",
            limits.max_output_bytes
        )));
    }
    if deliveries.iter().any(has_nul) {
        return Err(Refusal::Plugin("output contains a NUL character".into()));
    }
    deliveries
        .into_iter()
        .enumerate()
        .map(|(i, d)| {
            let name = |e: &str| format!("delivery {i}: {}", super::sandbox::plugin_text(e));
            check(d, event).map_err(|r| match r {
                Refusal::Plugin(e) => Refusal::Plugin(name(&e)),
                Refusal::Event(e) => Refusal::Event(name(&e)),
            })
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
/// told apart from a literal backslash followed by `u0000`.) An event cannot carry NUL (it
/// is refused when decoded), so a NUL is always the plugin's.
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

/// A field of a delivery whose value has rules of its own.
#[derive(Debug, Clone, Copy)]
enum Field {
    UserId,
    Title,
    Category,
    LiveName,
    Template,
    Recipient,
    Locale,
    TimeZone,
}

/// The rules of one field.
fn field(field: Field, v: &str) -> Result<(), String> {
    let ok = match field {
        Field::UserId => return user_id(v),
        Field::Title => !v.trim().is_empty() && v.len() <= MAX_TITLE,
        Field::Category => v.len() <= MAX_CATEGORY,
        Field::LiveName => {
            safe_name(v)
                && !RESERVED_EVENT_NAMES.contains(&v)
                && !RESERVED_EVENT_PREFIXES.iter().any(|p| v.starts_with(p))
        }
        Field::Template => safe_name(v),
        Field::Recipient => {
            return v
                .parse::<lettre::Address>()
                .map(drop)
                .map_err(|err| format!("email recipient {v:?} is not an address: {err}"));
        }
        Field::Locale => is_locale(v),
        Field::TimeZone => is_time_zone(v),
    };
    if ok {
        return Ok(());
    }
    Err(match field {
        Field::Title => format!("in-app title must be 1..={MAX_TITLE} bytes and not blank"),
        Field::Category => format!("in-app category is over {MAX_CATEGORY} bytes"),
        Field::LiveName => format!(
            "live update name {v:?} must be 1..={MAX_NAME} of [a-z0-9._-], starting with a letter, none of {RESERVED_EVENT_NAMES:?} and not starting with {RESERVED_EVENT_PREFIXES:?}"
        ),
        Field::Template => format!(
            "email template name {v:?} must be 1..={MAX_NAME} of [a-z0-9._-], starting with a letter"
        ),
        Field::Locale => format!(
            "email locale {v:?} must be a BCP 47 tag such as de-DE (letters, digits and -, at most {MAX_LOCALE} bytes)"
        ),
        Field::TimeZone => format!(
            "email time zone {v:?} must be an IANA name such as Europe/Berlin (at most {MAX_NAME} bytes)"
        ),
        Field::UserId | Field::Recipient => unreachable!("returned above"),
    })
}

/// The faults among `fields`, each blamed on the event when its strings explain it.
fn faults(fields: &[(Field, Option<&str>)], event: &EventText<'_>) -> Vec<Refusal> {
    fields
        .iter()
        .filter_map(|(f, v)| {
            let v = (*v)?;
            let message = field(*f, v).err()?;
            Some(if event.explains(v, |fixed| field(*f, fixed).is_ok()) {
                Refusal::Event(format!("{message} (a value from the event's data)"))
            } else {
                Refusal::Plugin(message)
            })
        })
        .collect()
}

/// The first fault of an in-app item or live update: its event's (the event is refused)
/// or the plugin's.
fn first(fields: &[(Field, Option<&str>)], event: &EventText<'_>) -> Result<(), Refusal> {
    faults(fields, event).into_iter().next().map_or(Ok(()), Err)
}

fn check(d: types::Delivery, event: &EventText<'_>) -> Result<Delivery, Refusal> {
    match d {
        types::Delivery::InApp(n) => {
            first(
                &[
                    (Field::UserId, Some(&n.user_id)),
                    (Field::Title, Some(&n.title)),
                    (Field::Category, Some(&n.category)),
                ],
                event,
            )?;
            Ok(Delivery::InApp {
                data: object(&n.data, "in-app data").map_err(Refusal::Plugin)?,
                user_id: n.user_id,
                title: n.title,
                body: n.body,
                category: n.category,
            })
        }
        types::Delivery::Live(l) => {
            first(
                &[
                    (Field::UserId, Some(&l.user_id)),
                    (Field::LiveName, Some(&l.name)),
                ],
                event,
            )?;
            Ok(Delivery::Live {
                data: object(&l.data, "live update data").map_err(Refusal::Plugin)?,
                user_id: l.user_id,
                name: l.name,
            })
        }
        types::Delivery::Email(e) => {
            let data = object(&e.data, "email data").map_err(Refusal::Plugin)?;
            let faults = faults(
                &[
                    (Field::Recipient, Some(&e.to)),
                    (Field::UserId, e.user_id.as_deref()),
                    (Field::Template, Some(&e.template)),
                    (Field::Locale, e.locale.as_deref()),
                    (Field::TimeZone, e.time_zone.as_deref()),
                ],
                event,
            );
            if let Some(plugins) = faults.iter().find(|f| matches!(f, Refusal::Plugin(_))) {
                return Err(plugins.clone());
            }
            // Every fault, if any, is the event's: the email is kept, with why it is not
            // sent, and the event's other deliveries go out.
            let not_sent = (!faults.is_empty()).then(|| {
                let reasons: Vec<String> = faults
                    .into_iter()
                    .filter_map(|f| match f {
                        Refusal::Event(m) => Some(super::sandbox::plugin_text(&m)),
                        Refusal::Plugin(_) => None,
                    })
                    .collect();
                format!("not sent: {}", reasons.join("; "))
            });
            Ok(Delivery::Email {
                to: e.to,
                user_id: e.user_id,
                template: e.template,
                data,
                locale: e.locale,
                time_zone: e.time_zone,
                not_sent,
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
mod tests;
