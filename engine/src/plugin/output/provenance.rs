//! Whose fault an invalid field is: the event's strings, and whether they explain a field
//! that breaks its rules.
//!
//! A field is the event's doing when it *is* one of the event's strings (the plugin passed
//! it on: an `email` that is not an address, a user id with a control character), or when
//! putting a neutral stand-in where one of the event's strings is in it makes it valid (a
//! title over its limit because of a 500-byte order id). A field no string of the event
//! explains is the plugin's: the stand-in test does not excuse a plugin that writes a bad
//! value of its own around the event's, since the value must come out valid.
//!
//! Only a refused decision asks (the healthy path never builds this); the cost is bounded
//! by the event's size (`plugins.max_input_bytes`) times the field's.

use crate::model::Event;

/// What stands in for the event's string in a field, to see whether the rest is valid.
const STAND_IN: &str = "x";

/// The strings of one event a plugin could have put in its output: its id, its source, and
/// every string value of its data, at any depth.
pub(in crate::plugin) struct EventText<'a> {
    strings: Vec<&'a str>,
}

impl<'a> EventText<'a> {
    pub(in crate::plugin) fn of(event: &'a Event) -> Self {
        let mut strings = vec![event.id.as_str()];
        strings.extend(event.source.as_deref());
        Self::with_data(strings, event.data.values())
    }

    /// `strings` and every string value of `data`, at any depth (an email's data, for a
    /// templating plugin's answer).
    pub(in crate::plugin) fn with_data(
        mut strings: Vec<&'a str>,
        data: impl IntoIterator<Item = &'a serde_json::Value>,
    ) -> Self {
        let mut stack: Vec<&serde_json::Value> = data.into_iter().collect();
        while let Some(v) = stack.pop() {
            match v {
                serde_json::Value::String(s) => strings.push(s),
                serde_json::Value::Array(items) => stack.extend(items),
                serde_json::Value::Object(m) => stack.extend(m.values()),
                _ => {}
            }
        }
        strings.retain(|s| !s.is_empty());
        strings.sort_unstable();
        strings.dedup();
        EventText { strings }
    }

    /// Strings without an event, for the unit tests.
    #[cfg(test)]
    pub(in crate::plugin) fn from_strings(strings: Vec<&'a str>) -> Self {
        EventText { strings }
    }

    /// Does the event explain `value`, which breaks its rules? It does when `value` is one
    /// of its strings, or when replacing one of its strings in `value` with a stand-in
    /// makes `valid` hold.
    pub(in crate::plugin) fn explains(&self, value: &str, valid: impl Fn(&str) -> bool) -> bool {
        self.strings
            .iter()
            .any(|s| value == *s || (value.contains(s) && valid(&value.replace(s, STAND_IN))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn short(v: &str) -> bool {
        !v.is_empty() && v.len() <= 20 && !v.chars().any(char::is_control)
    }

    #[test]
    fn a_value_passed_on_or_carrying_the_events_string_is_the_events() {
        let long = "9".repeat(50);
        let text = EventText::from_strings(vec!["not an address", &long, "u\u{1}"]);
        assert!(text.explains("not an address", |_| false));
        assert!(text.explains("u\u{1}", short));
        assert!(text.explains(&format!("Order {long} shipped"), short));
    }

    #[test]
    fn a_bad_value_of_the_plugins_own_is_not() {
        let text = EventText::from_strings(vec!["A-1", "9"]);
        // Too long with or without the event's string.
        assert!(!text.explains(&format!("A-1 {}", "y".repeat(40)), short));
        // A control character the plugin wrote itself.
        assert!(!text.explains("A-1\u{7}", short));
        // Nothing of the event in it.
        assert!(!text.explains("", short));
        assert!(!EventText::from_strings(vec![]).explains("anything", short));
    }

    #[test]
    fn collects_strings_at_any_depth() {
        let serde_json::Value::Object(data) =
            serde_json::json!({"a": "one", "b": [1, "two", {"c": "three"}], "d": ""})
        else {
            unreachable!()
        };
        let event = Event {
            id: "e-1".into(),
            tenant: "t".into(),
            event_type: "order_paid".into(),
            time: chrono::Utc::now(),
            source: Some("shop".into()),
            data,
        };
        let text = EventText::of(&event);
        for s in ["e-1", "shop", "one", "two", "three"] {
            assert!(text.strings.contains(&s), "{s}: {:?}", text.strings);
        }
        assert!(!text.strings.contains(&""));
    }
}
