//! Native unit tests of plugins: events and render requests to feed them, and the host
//! imports' stand-ins (configuration, who is online, the tenant's templates), per test
//! thread.
//!
//! ```
//! use notify_plugin_sdk::testing;
//! use notify_plugin_sdk::json;
//!
//! testing::set_config("vip_threshold", "250");
//! let event = testing::event("order_paid", json!({"user_id": "u-1"}));
//! assert_eq!(event.tenant, testing::TENANT);
//! assert_eq!(notify_plugin_sdk::config("vip_threshold").as_deref(), Some("250"));
//! testing::reset();
//! ```

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use crate::types::{Event, EventRef, Recipient, RenderRequest, TemplateError};

/// The tenant of the events and requests made here.
pub const TENANT: &str = "test";
/// Their event id.
pub const EVENT_ID: &str = "evt-1";
/// Their time.
pub const TIME: &str = "2026-11-27T13:05:00Z";

type Renderer = Box<dyn Fn(&str, &Value) -> Result<String, TemplateError>>;

thread_local! {
    static CONFIG: RefCell<BTreeMap<String, String>> = const { RefCell::new(BTreeMap::new()) };
    static TEMPLATES: RefCell<Option<Renderer>> = const { RefCell::new(None) };
    static ONLINE: RefCell<BTreeSet<String>> = const { RefCell::new(BTreeSet::new()) };
}

/// An event of `event_type` with `data` (a JSON object) for [`TENANT`].
pub fn event(event_type: &str, data: Value) -> Event {
    Event {
        id: EVENT_ID.into(),
        tenant: TENANT.into(),
        event_type: event_type.into(),
        time: TIME.into(),
        source: None,
        data: data.to_string(),
    }
}

/// A render request for `template` with `data`, to `alice@example.com` (user `u-1`),
/// about an `order_paid` event at [`TIME`]; set `recipient.locale` and friends as needed.
pub fn render_request(template: &str, data: Value) -> RenderRequest {
    RenderRequest {
        template: template.into(),
        event: EventRef {
            id: EVENT_ID.into(),
            event_type: "order_paid".into(),
            time: TIME.into(),
        },
        recipient: Recipient {
            address: "alice@example.com".into(),
            user_id: Some("u-1".into()),
            locale: None,
            time_zone: None,
        },
        data: data.to_string(),
    }
}

/// Sets a configuration value [`crate::config`] returns on this thread.
pub fn set_config(key: &str, value: &str) {
    CONFIG.with(|c| c.borrow_mut().insert(key.into(), value.into()));
}

/// Makes [`crate::presence::is_online`] answer `online` for `user_id` on this thread
/// (everyone is offline until set).
pub fn set_online(user_id: &str, online: bool) {
    ONLINE.with(|o| {
        let mut o = o.borrow_mut();
        if online {
            o.insert(user_id.into());
        } else {
            o.remove(user_id);
        }
    });
}

/// Installs what `templates::render` does on this thread (templating plugins' tests):
/// e.g. a closure that renders from a map of test templates.
pub fn set_templates(render: impl Fn(&str, &Value) -> Result<String, TemplateError> + 'static) {
    TEMPLATES.with(|t| *t.borrow_mut() = Some(Box::new(render)));
}

/// Forgets the configuration, who is online and the templates set on this thread.
pub fn reset() {
    CONFIG.with(|c| c.borrow_mut().clear());
    ONLINE.with(|o| o.borrow_mut().clear());
    TEMPLATES.with(|t| *t.borrow_mut() = None);
}

#[cfg_attr(target_arch = "wasm32", allow(dead_code))] // the host answers there
pub(crate) fn config(key: &str) -> Option<String> {
    CONFIG.with(|c| c.borrow().get(key).cloned())
}

#[allow(dead_code)] // the routing world's stand-in, natively
pub(crate) fn is_online(user_id: &str) -> bool {
    ONLINE.with(|o| o.borrow().contains(user_id))
}

#[allow(dead_code)] // the templating world's stand-in, natively
pub(crate) fn render(name: &str, data: &Value) -> Result<String, TemplateError> {
    TEMPLATES.with(|t| match &*t.borrow() {
        Some(render) => render(name, data),
        None => Err(TemplateError::Failed(format!(
            "no templates in this test (testing::set_templates) to render {name}"
        ))),
    })
}
