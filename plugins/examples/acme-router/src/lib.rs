//! Tenant `acme`'s routing plugin.
//!
//! Configuration (`[tenants.acme.config]` in the engine's configuration):
//!
//! - `vip_threshold`: decimal amount from which a paid order counts as VIP (default `500`);
//! - `currency`: the only currency acme sells in (default `EUR`); another one is an invalid event;
//! - `skip_email_when_online`: `true` sends no `order_paid` email to a user who has the app
//!   open on any instance of the engine at that moment (they see the in-app item at once;
//!   asked through the host's cluster-wide presence); default `false`.
//!
//! Rules:
//!
//! - `order_paid`: amount must be > 0 and in the configured currency. At or above the VIP
//!   threshold the in-app text announces free express shipping; the `order_paid` email (when
//!   `email` is given, and the user is not online where `skip_email_when_online` is set)
//!   carries `"vip": true|false` in its data.
//! - `order_status_updated`, by status:
//!   `processing` → live update only; `shipped` → in-app ("on its way", with the tracking
//!   link), email and live; `delivered` → in-app and live; `cancelled` → in-app, email and
//!   live; anything else → live only.
//!
//! Decisions are logged at info level.

use notify_plugin_sdk::{
    Data, Delivery, Email, Event, InApp, LiveUpdate, RouteError, Router, config_or, debug,
    format_amount, info, json, presence,
};
struct AcmeRouter;

impl Router for AcmeRouter {
    fn route(event: Event) -> Result<Vec<Delivery>, RouteError> {
        route_event(&event, &Settings::from_host()?)
    }
}

notify_plugin_sdk::export_router!(AcmeRouter);

/// Acme's plugin configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    /// Paid amount from which an order is VIP (inclusive).
    pub vip_threshold: f64,
    /// The expected currency code, upper case.
    pub currency: String,
    /// No `order_paid` email to a user who has the app open.
    pub skip_email_when_online: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            vip_threshold: 500.0,
            currency: "EUR".to_owned(),
            skip_email_when_online: false,
        }
    }
}

impl Settings {
    /// Reads the settings through the host's `config` import.
    fn from_host() -> Result<Self, RouteError> {
        let defaults = Settings::default();
        let vip_threshold: f64 = config_or("vip_threshold", defaults.vip_threshold)?;
        if !vip_threshold.is_finite() || vip_threshold < 0.0 {
            return Err(RouteError::other(format!(
                "plugin config vip_threshold must be a non-negative amount (got {vip_threshold})"
            )));
        }
        let currency: String = config_or("currency", defaults.currency)?;
        Ok(Settings {
            vip_threshold,
            currency: currency.to_ascii_uppercase(),
            skip_email_when_online: config_or(
                "skip_email_when_online",
                defaults.skip_email_when_online,
            )?,
        })
    }
}

/// The routing decision, free of host calls other than logging (so it runs in native tests).
pub fn route_event(event: &Event, settings: &Settings) -> Result<Vec<Delivery>, RouteError> {
    match event.event_type.as_str() {
        "order_paid" => order_paid(event, &Data::parse(event)?, settings),
        "order_status_updated" => order_status_updated(event, &Data::parse(event)?),
        other => {
            debug!("acme: no rule for event type {other:?}");
            Ok(Vec::new())
        }
    }
}

fn order_paid(
    event: &Event,
    data: &Data,
    settings: &Settings,
) -> Result<Vec<Delivery>, RouteError> {
    let user_id = data.str("user_id")?;
    let order_id = data.str("order_id")?;
    let amount = data.f64("amount")?;
    let currency = data.str("currency")?;
    let email = data.opt_str("email")?;

    if amount <= 0.0 {
        return Err(RouteError::invalid_event(format!(
            "data.amount must be greater than 0 (got {amount})"
        )));
    }
    if !currency.eq_ignore_ascii_case(&settings.currency) {
        return Err(RouteError::invalid_event(format!(
            "data.currency must be {} for acme (got {currency})",
            settings.currency
        )));
    }

    let vip = amount >= settings.vip_threshold;
    // Asked only when it matters: every question is a host call.
    let watching =
        email.is_some() && settings.skip_email_when_online && presence::is_online(user_id);
    let total = format_amount(amount, &settings.currency);
    let body = if vip {
        format!("Thank you for your order of {total} — you've unlocked free express shipping")
    } else {
        format!("Thank you for your order of {total}.")
    };
    info!(
        "acme: order {order_id} paid {total}, {} (threshold {}){}",
        if vip { "VIP" } else { "regular" },
        format_amount(settings.vip_threshold, &settings.currency),
        match (email, watching) {
            (Some(_), false) => ", emailing",
            (Some(_), true) => ", no email: the user has the app open",
            (None, _) => ", no email address",
        },
    );

    let mut deliveries = vec![
        InApp::new(user_id, "Payment received")
            .body(body)
            .category("billing")
            .data(json!({ "order_id": order_id, "vip": vip }))
            .into(),
    ];
    if let Some(to) = email
        && !watching
    {
        let mut mail = data.email_model(event);
        mail["vip"] = json!(vip);
        deliveries.push(Email::new(to, "order_paid").user(user_id).data(mail).into());
    }
    Ok(deliveries)
}

/// What a status update turns into, besides the live update every status gets.
#[derive(Clone, Copy, Debug, PartialEq)]
struct StatusRule {
    in_app: bool,
    email: bool,
}

fn status_rule(status: &str) -> StatusRule {
    match status {
        "shipped" | "cancelled" => StatusRule {
            in_app: true,
            email: true,
        },
        "delivered" => StatusRule {
            in_app: true,
            email: false,
        },
        // `processing` and anything acme has no wording for: the order list refreshes, no
        // inbox item.
        _ => StatusRule {
            in_app: false,
            email: false,
        },
    }
}

fn order_status_updated(event: &Event, data: &Data) -> Result<Vec<Delivery>, RouteError> {
    let user_id = data.str("user_id")?;
    let order_id = data.str("order_id")?;
    let status = data.str("status")?;
    let previous_status = data.opt_str("previous_status")?;
    let tracking_url = data.opt_str("tracking_url")?;
    let email = data.opt_str("email")?;

    let rule = status_rule(status);
    let send_email = rule.email && email.is_some();
    info!(
        "acme: order {order_id} is {status}: live{}{}",
        if rule.in_app { " + in-app" } else { "" },
        match (rule.email, email.is_some()) {
            (true, true) => " + email",
            (true, false) => " (no email address)",
            _ => "",
        },
    );

    let mut live = json!({ "order_id": order_id, "status": status });
    if let Some(previous) = previous_status {
        live["previous_status"] = json!(previous);
    }
    let mut deliveries = vec![LiveUpdate::new(user_id, "order.updated").data(live).into()];

    if rule.in_app {
        let mut item_data = json!({ "order_id": order_id, "status": status });
        let (title, body) = match status {
            "shipped" => {
                let mut body = format!("Your order {order_id} has left our warehouse.");
                if let Some(url) = tracking_url {
                    body.push_str(&format!(" Track it here: {url}"));
                    item_data["tracking_url"] = json!(url);
                }
                (format!("Order {order_id} is on its way"), body)
            }
            "delivered" => (
                format!("Order {order_id} has been delivered"),
                format!("Your order {order_id} has arrived. Enjoy!"),
            ),
            _ => (
                format!("Order {order_id} has been cancelled"),
                format!(
                    "Your order {order_id} has been cancelled. If you already paid, the refund \
                     is on its way."
                ),
            ),
        };
        deliveries.push(
            InApp::new(user_id, title)
                .body(body)
                .category("shipping")
                .data(item_data)
                .into(),
        );
    }
    if let (true, Some(to)) = (send_email, email) {
        deliveries.push(
            Email::new(to, "order_status_updated")
                .user(user_id)
                .data(data.email_model(event))
                .into(),
        );
    }
    Ok(deliveries)
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify_plugin_sdk::testing;
    use serde_json::Value;

    fn event(event_type: &str, data: Value) -> Event {
        Event {
            id: "evt-9".into(),
            ..testing::event(event_type, data)
        }
    }

    fn paid(amount: f64) -> Value {
        json!({
            "user_id": "u-1", "email": "bob@acme.test", "order_id": "A-1",
            "amount": amount, "currency": "EUR"
        })
    }

    fn route(e: &Event) -> Result<Vec<Delivery>, RouteError> {
        route_event(e, &Settings::default())
    }

    fn in_app(d: &Delivery) -> &InApp {
        d.as_in_app().expect("an in-app delivery")
    }

    fn email(d: &Delivery) -> &Email {
        d.as_email().expect("an email")
    }

    fn kinds(out: &[Delivery]) -> Vec<&'static str> {
        out.iter()
            .map(|d| match d {
                Delivery::InApp(_) => "in-app",
                Delivery::Live(_) => "live",
                Delivery::Email(_) => "email",
            })
            .collect()
    }

    fn invalid(result: Result<Vec<Delivery>, RouteError>) -> String {
        match result {
            Err(RouteError::InvalidEvent(m)) => m,
            other => panic!("expected invalid-event, got {other:?}"),
        }
    }

    fn data_of(v: &Value) -> Value {
        v.clone()
    }

    #[test]
    fn vip_order() {
        let out = route(&event("order_paid", paid(750.0))).unwrap();
        assert_eq!(kinds(&out), ["in-app", "email"]);
        assert_eq!(
            in_app(&out[0]).body,
            "Thank you for your order of 750.00 EUR — you've unlocked free express shipping"
        );
        let mail = email(&out[1]);
        assert_eq!(mail.template, "order_paid");
        let data = data_of(&mail.data);
        assert_eq!(data["vip"], json!(true));
        assert_eq!(data["event_id"], json!("evt-9"));
        assert_eq!(data["order_id"], json!("A-1"));
    }

    #[test]
    fn threshold_is_inclusive_and_configurable() {
        let out = route(&event("order_paid", paid(500.0))).unwrap();
        assert!(in_app(&out[0]).body.contains("free express shipping"));

        let out = route(&event("order_paid", paid(499.99))).unwrap();
        assert_eq!(
            in_app(&out[0]).body,
            "Thank you for your order of 499.99 EUR."
        );
        assert_eq!(data_of(&email(&out[1]).data)["vip"], json!(false));

        let cheap_vip = Settings {
            vip_threshold: 100.0,
            ..Settings::default()
        };
        let out = route_event(&event("order_paid", paid(120.0)), &cheap_vip).unwrap();
        assert!(in_app(&out[0]).body.contains("free express shipping"));
    }

    #[test]
    fn rejects_non_positive_amounts_and_foreign_currencies() {
        assert_eq!(
            invalid(route(&event("order_paid", paid(0.0)))),
            "data.amount must be greater than 0 (got 0)"
        );
        assert!(invalid(route(&event("order_paid", paid(-5.0)))).contains("data.amount"));

        let mut usd = paid(750.0);
        usd["currency"] = json!("USD");
        assert_eq!(
            invalid(route(&event("order_paid", usd.clone()))),
            "data.currency must be EUR for acme (got USD)"
        );
        let dollars = Settings {
            currency: "USD".into(),
            ..Settings::default()
        };
        let out = route_event(&event("order_paid", usd), &dollars).unwrap();
        assert!(in_app(&out[0]).body.contains("750.00 USD"));
    }

    #[test]
    fn no_email_address_no_email() {
        let mut data = paid(750.0);
        data.as_object_mut().unwrap().remove("email");
        assert_eq!(
            kinds(&route(&event("order_paid", data)).unwrap()),
            ["in-app"]
        );
    }

    #[test]
    fn no_email_to_a_user_watching_the_app_where_the_tenant_asks_so() {
        let skip = Settings {
            skip_email_when_online: true,
            ..Settings::default()
        };
        testing::set_online("u-1", true);
        let out = route_event(&event("order_paid", paid(750.0)), &skip).unwrap();
        assert_eq!(kinds(&out), ["in-app"]);
        // Without the setting, presence changes nothing.
        let out = route(&event("order_paid", paid(750.0))).unwrap();
        assert_eq!(kinds(&out), ["in-app", "email"]);
        testing::set_online("u-1", false);
        let out = route_event(&event("order_paid", paid(750.0)), &skip).unwrap();
        assert_eq!(kinds(&out), ["in-app", "email"]);
        testing::reset();
    }

    fn status(status: &str, tracking: Option<&str>) -> Event {
        let mut data = json!({
            "user_id": "u-1", "email": "bob@acme.test", "order_id": "A-1", "status": status
        });
        if let Some(url) = tracking {
            data["tracking_url"] = json!(url);
        }
        event("order_status_updated", data)
    }

    #[test]
    fn status_rules() {
        for (s, expected) in [
            ("processing", vec!["live"]),
            ("shipped", vec!["live", "in-app", "email"]),
            ("delivered", vec!["live", "in-app"]),
            ("cancelled", vec!["live", "in-app", "email"]),
            ("returned", vec!["live"]),
        ] {
            assert_eq!(
                kinds(&route(&status(s, None)).unwrap()),
                expected,
                "status {s}"
            );
        }
    }

    #[test]
    fn shipped_wording_and_tracking() {
        let out = route(&status("shipped", Some("https://track.example/A-1"))).unwrap();
        let item = in_app(&out[1]);
        assert_eq!(item.title, "Order A-1 is on its way");
        assert!(
            item.body
                .ends_with("Track it here: https://track.example/A-1")
        );
        assert_eq!(
            data_of(&item.data)["tracking_url"],
            json!("https://track.example/A-1")
        );
        assert_eq!(email(&out[2]).template, "order_status_updated");

        let out = route(&status("shipped", None)).unwrap();
        assert!(!in_app(&out[1]).body.contains("Track"));
    }

    #[test]
    fn required_fields() {
        let mut e = status("shipped", None);
        e.data = json!({"user_id": "u-1", "order_id": "A-1"}).to_string();
        assert_eq!(invalid(route(&e)), "data.status is required (string)");
        let mut data = paid(10.0);
        data.as_object_mut().unwrap().remove("user_id");
        assert_eq!(
            invalid(route(&event("order_paid", data))),
            "data.user_id is required (string)"
        );
    }

    #[test]
    fn other_events_are_ignored() {
        assert!(
            route(&event("newsletter_opened", json!({})))
                .unwrap()
                .is_empty()
        );
    }
}
