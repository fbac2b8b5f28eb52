//! The default routing plugin: the fallback for tenants without a plugin of their own.
//!
//! It understands the two standard event types (see `plugins/README.md` for their payloads):
//!
//! - `order_paid` → an in-app "Payment received" (category `billing`) and, when `email` is
//!   given, an `order_paid` email whose data is the event data plus `event_id`.
//! - `order_status_updated` → an `order.updated` live update, a status-aware in-app item
//!   (category `shipping`) and, for `shipped` and `cancelled` when `email` is given, an
//!   `order_status_updated` email.
//!
//! Emails carry the payload's `locale` and `time_zone`, when given, for the tenant's
//! templating plugin. Every other event type is acknowledged with no deliveries.
//!
//! Tenant setting (`[tenants.<id>.config]`): `emails = "off"` sends no emails; in-app items
//! and live updates are unchanged.
//!
//! The same rules exist in Python (`plugins/examples/python-router`) and JavaScript
//! (`plugins/examples/js-router`); the conformance table `tests/conformance/routing.json` holds all
//! three to the same decisions.

use notify_plugin_sdk::{
    Data, Delivery, Email, Event, InApp, LiveUpdate, RouteError, Router, config, debug,
    format_amount, json,
};

struct DefaultRouter;

impl Router for DefaultRouter {
    fn route(event: Event) -> Result<Vec<Delivery>, RouteError> {
        route_event(&event)
    }
}

notify_plugin_sdk::export_router!(DefaultRouter);

/// The routing decision, free of host calls other than logging (so it runs in native tests).
pub fn route_event(event: &Event) -> Result<Vec<Delivery>, RouteError> {
    match event.event_type.as_str() {
        "order_paid" => order_paid(event, &Data::parse(event)?),
        "order_status_updated" => order_status_updated(event, &Data::parse(event)?),
        other => {
            debug!("default router: no rule for event type {other:?}");
            Ok(Vec::new())
        }
    }
}

fn order_paid(event: &Event, data: &Data) -> Result<Vec<Delivery>, RouteError> {
    let user_id = data.str("user_id")?;
    let order_id = data.str("order_id")?;
    let amount = data.f64("amount")?;
    let currency = data.str("currency")?;
    let email = data.opt_str("email")?;

    let mut deliveries = vec![
        InApp::new(user_id, "Payment received")
            .body(format!(
                "We received your payment of {} for order {order_id}.",
                format_amount(amount, currency)
            ))
            .category("billing")
            .data(json!({ "order_id": order_id }))
            .into(),
    ];
    if let Some(to) = email
        && emails_enabled()
    {
        deliveries.push(recipient(
            email_to(to, user_id, "order_paid", data, event),
            data,
        )?);
    }
    Ok(deliveries)
}

/// The tenant's `emails` setting: anything but `off` sends them.
fn emails_enabled() -> bool {
    config("emails").as_deref() != Some("off")
}

fn email_to(to: &str, user_id: &str, template: &str, data: &Data, event: &Event) -> Email {
    Email::new(to, template)
        .user(user_id)
        .data(data.email_model(event))
}

/// The recipient's `locale` and `time_zone`, when the event names them, for the tenant's
/// templating plugin.
fn recipient(mut mail: Email, data: &Data) -> Result<Delivery, RouteError> {
    mail.locale = data.opt_str("locale")?.map(str::to_owned);
    mail.time_zone = data.opt_str("time_zone")?.map(str::to_owned);
    Ok(mail.into())
}

fn order_status_updated(event: &Event, data: &Data) -> Result<Vec<Delivery>, RouteError> {
    let user_id = data.str("user_id")?;
    let order_id = data.str("order_id")?;
    let status = data.str("status")?;
    let previous_status = data.opt_str("previous_status")?;
    let tracking_url = data.opt_str("tracking_url")?;
    let email = data.opt_str("email")?;

    let mut live = json!({ "order_id": order_id, "status": status });
    if let Some(previous) = previous_status {
        live["previous_status"] = json!(previous);
    }

    let (title, mut body) = match status {
        "processing" => (
            format!("Order {order_id} is being processed"),
            format!("We are preparing your order {order_id}."),
        ),
        "shipped" => (
            format!("Order {order_id} shipped"),
            format!("Your order {order_id} is on its way."),
        ),
        "delivered" => (
            format!("Order {order_id} delivered"),
            format!("Your order {order_id} has been delivered."),
        ),
        "cancelled" => (
            format!("Order {order_id} cancelled"),
            format!("Your order {order_id} has been cancelled."),
        ),
        other => (
            format!("Order {order_id} updated"),
            format!("Your order {order_id} is now {}.", other.replace('_', " ")),
        ),
    };
    let mut in_app_data = json!({ "order_id": order_id, "status": status });
    if let Some(url) = tracking_url {
        body.push_str(&format!(" Track it at {url}"));
        in_app_data["tracking_url"] = json!(url);
    }

    let mut deliveries = vec![
        LiveUpdate::new(user_id, "order.updated").data(live).into(),
        InApp::new(user_id, title)
            .body(body)
            .category("shipping")
            .data(in_app_data)
            .into(),
    ];
    if let (Some(to), "shipped" | "cancelled") = (email, status)
        && emails_enabled()
    {
        let mail = email_to(to, user_id, "order_status_updated", data, event);
        deliveries.push(recipient(mail, data)?);
    }
    Ok(deliveries)
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify_plugin_sdk::testing::event;
    use serde_json::Value;

    fn json_of(v: &Value) -> Value {
        v.clone()
    }

    fn in_app(d: &Delivery) -> &InApp {
        d.as_in_app().expect("an in-app delivery")
    }

    fn live(d: &Delivery) -> &LiveUpdate {
        d.as_live().expect("a live update")
    }

    fn email(d: &Delivery) -> &Email {
        d.as_email().expect("an email")
    }

    fn invalid(result: Result<Vec<Delivery>, RouteError>) -> String {
        match result {
            Err(RouteError::InvalidEvent(m)) => m,
            other => panic!("expected invalid-event, got {other:?}"),
        }
    }

    fn paid() -> Value {
        json!({
            "user_id": "u-1", "email": "alice@example.com", "customer_name": "Alice",
            "order_id": "A-1001", "amount": 129.90, "currency": "EUR",
            "items": [{"name": "Kettle", "quantity": 1, "price": 129.90}]
        })
    }

    #[test]
    fn order_paid_with_email() {
        let out = route_event(&event("order_paid", paid())).unwrap();
        assert_eq!(out.len(), 2);
        let item = in_app(&out[0]);
        assert_eq!(item.user_id, "u-1");
        assert_eq!(item.title, "Payment received");
        assert_eq!(
            item.body,
            "We received your payment of 129.90 EUR for order A-1001."
        );
        assert_eq!(item.category, "billing");
        assert_eq!(json_of(&item.data), json!({"order_id": "A-1001"}));
        let mail = email(&out[1]);
        assert_eq!(mail.to, "alice@example.com");
        assert_eq!(mail.user_id.as_deref(), Some("u-1"));
        assert_eq!(mail.template, "order_paid");
        let mut expected = paid();
        expected["event_id"] = json!("evt-1");
        assert_eq!(json_of(&mail.data), expected);
        assert_eq!(
            (mail.locale.as_deref(), mail.time_zone.as_deref()),
            (None, None)
        );
    }

    #[test]
    fn a_tenant_can_turn_emails_off() {
        notify_plugin_sdk::testing::set_config("emails", "off");
        let paid_out = route_event(&event("order_paid", paid()));
        let shipped_out = route_event(&event("order_status_updated", status("shipped")));
        notify_plugin_sdk::testing::reset();
        let paid_out = paid_out.unwrap();
        assert_eq!(paid_out.len(), 1);
        assert!(paid_out[0].as_in_app().is_some());
        let shipped_out = shipped_out.unwrap();
        assert_eq!(shipped_out.len(), 2);
        assert!(shipped_out.iter().all(|d| d.as_email().is_none()));
    }

    #[test]
    fn the_recipients_locale_and_time_zone_reach_the_email() {
        let mut data = paid();
        data["locale"] = json!("de-DE");
        data["time_zone"] = json!("Europe/Berlin");
        let out = route_event(&event("order_paid", data)).unwrap();
        let mail = email(&out[1]);
        assert_eq!(mail.locale.as_deref(), Some("de-DE"));
        assert_eq!(mail.time_zone.as_deref(), Some("Europe/Berlin"));
    }

    #[test]
    fn order_paid_without_email() {
        let mut data = paid();
        data.as_object_mut().unwrap().remove("email");
        let out = route_event(&event("order_paid", data)).unwrap();
        assert_eq!(out.len(), 1);
        in_app(&out[0]);
    }

    #[test]
    fn order_paid_required_fields() {
        for (field, message) in [
            ("user_id", "data.user_id is required (string)"),
            ("order_id", "data.order_id is required (string)"),
            ("amount", "data.amount is required (number)"),
            ("currency", "data.currency is required (string)"),
        ] {
            let mut data = paid();
            data.as_object_mut().unwrap().remove(field);
            assert_eq!(invalid(route_event(&event("order_paid", data))), message);
        }
        let mut data = paid();
        data["amount"] = json!("129.90");
        assert_eq!(
            invalid(route_event(&event("order_paid", data))),
            "data.amount must be a number (got string)"
        );
        let mut bad = event("order_paid", json!({}));
        bad.data = "[]".into();
        assert_eq!(
            invalid(route_event(&bad)),
            "data must be a JSON object (got array)"
        );
    }

    fn status(status: &str) -> Value {
        json!({
            "user_id": "u-1", "email": "alice@example.com", "order_id": "A-1001",
            "status": status, "previous_status": "processing",
            "tracking_url": "https://track.example/1"
        })
    }

    #[test]
    fn shipped_gets_live_in_app_and_email() {
        let out = route_event(&event("order_status_updated", status("shipped"))).unwrap();
        assert_eq!(out.len(), 3);
        let update = live(&out[0]);
        assert_eq!(update.user_id, "u-1");
        assert_eq!(update.name, "order.updated");
        assert_eq!(
            json_of(&update.data),
            json!({"order_id": "A-1001", "status": "shipped", "previous_status": "processing"})
        );
        let item = in_app(&out[1]);
        assert_eq!(item.title, "Order A-1001 shipped");
        assert_eq!(item.category, "shipping");
        assert!(item.body.contains("https://track.example/1"));
        let mail = email(&out[2]);
        assert_eq!(mail.template, "order_status_updated");
        assert_eq!(json_of(&mail.data)["event_id"], json!("evt-1"));
    }

    #[test]
    fn email_only_for_shipped_and_cancelled() {
        for (s, emails) in [
            ("processing", false),
            ("shipped", true),
            ("delivered", false),
            ("cancelled", true),
            ("on_hold", false),
        ] {
            let out = route_event(&event("order_status_updated", status(s))).unwrap();
            let has_email = out.iter().any(|d| matches!(d, Delivery::Email(_)));
            assert_eq!(has_email, emails, "status {s}");
            assert_eq!(out.len(), if emails { 3 } else { 2 }, "status {s}");
        }
        let out = route_event(&event("order_status_updated", status("on_hold"))).unwrap();
        assert_eq!(in_app(&out[1]).title, "Order A-1001 updated");
        assert!(in_app(&out[1]).body.contains("is now on hold."));
    }

    #[test]
    fn no_email_address_no_email() {
        let mut data = status("cancelled");
        data.as_object_mut().unwrap().remove("email");
        data.as_object_mut().unwrap().remove("previous_status");
        let out = route_event(&event("order_status_updated", data)).unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(
            json_of(&live(&out[0]).data),
            json!({"order_id": "A-1001", "status": "cancelled"})
        );
        assert_eq!(in_app(&out[1]).title, "Order A-1001 cancelled");
    }

    #[test]
    fn status_update_required_fields() {
        let mut data = status("shipped");
        data.as_object_mut().unwrap().remove("status");
        assert_eq!(
            invalid(route_event(&event("order_status_updated", data))),
            "data.status is required (string)"
        );
    }

    #[test]
    fn unknown_event_types_are_ignored() {
        // Even with a payload the known types would reject.
        let mut e = event("user_signed_up", json!({}));
        e.data = "not json".into();
        assert!(route_event(&e).unwrap().is_empty());
    }
}
