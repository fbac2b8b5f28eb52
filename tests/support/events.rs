//! The events tests produce: a native envelope, and an `order_paid` one the default router
//! turns into an in-app item and, with an address, an email.

use serde_json::{Value, json};

/// A native envelope.
pub fn event(id: &str, tenant: &str, event_type: &str, data: Value) -> Value {
    json!({
        "id": id,
        "tenant": tenant,
        "type": event_type,
        // Now: events older than email.max_event_age_secs send no email.
        "time": chrono::Utc::now().to_rfc3339(),
        "source": "tests",
        "data": data,
    })
}

pub fn order_paid(id: &str, tenant: &str, user: &str, email: Option<&str>, amount: f64) -> Value {
    let mut data = json!({
        "user_id": user,
        "order_id": format!("A-{id}"),
        "amount": amount,
        "currency": "EUR",
        "customer_name": "Alice",
    });
    if let Some(e) = email {
        data["email"] = e.into();
    }
    event(id, tenant, "order_paid", data)
}
