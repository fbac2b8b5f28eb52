//! Unit tests of `rows`: what each row says, and a batch's claims taken once per event.

use super::*;
use crate::pipeline::fixtures::{
    decision, email, event, event_time, in_app, live, prepared, rejection, trap, unavailable,
};

#[test]
fn in_app_items_are_inbox_rows_and_live_updates_keep_their_name_and_emails_stay_out() {
    let (e1, e2) = (event("acme", "e1"), event("acme", "e2"));
    let d1 = decision(vec![
        in_app("u1"),
        email("a@example.com"),
        live("u2", "order.updated"),
    ]);
    let d2 = decision(vec![in_app("u3")]);
    let routed = [(&e1, &d1), (&e2, &d2)];

    let rows = notifications(&routed);
    let seen: Vec<(&str, &str, &str)> = rows
        .iter()
        .map(|n| (n.event_id, n.user_id, n.kind))
        .collect();
    assert_eq!(
        seen,
        [
            ("e1", "u1", NOTIFICATION_EVENT),
            ("e1", "u2", "order.updated"),
            ("e2", "u3", NOTIFICATION_EVENT),
        ]
    );
    let inbox = &rows[0];
    assert_eq!(inbox.tenant, "acme");
    assert_eq!(
        (inbox.title, inbox.body, inbox.category),
        (Some("Paid"), Some("Order 1 is paid"), Some("orders"))
    );
    assert_eq!(inbox.data["order"], 1);
    let update = &rows[1];
    assert_eq!(
        (update.title, update.body, update.category),
        (None, None, None)
    );
    assert_eq!(update.data["status"], "paid");
}

#[test]
fn an_outbox_row_carries_its_event_recipient_message_id_and_skip_reason() {
    let e = event("acme", "e1");
    let delivery = email("a@example.com");
    let row = new_email(&e, &delivery, "<m1@example.com>", Some("too old"));
    assert_eq!((row.tenant, row.event_id), ("acme", "e1"));
    assert_eq!((row.recipient, row.user_id), ("a@example.com", Some("u1")));
    assert_eq!(row.template, "order_paid");
    assert_eq!(row.data["total"], 12);
    assert_eq!(row.message_id, "<m1@example.com>");
    assert_eq!(row.skip, Some("too old"));
    assert_eq!(
        (row.event_type, row.event_time),
        ("order_paid", event_time())
    );
    assert_eq!((row.locale, row.time_zone), (Some("de-CH"), None));
}

#[test]
fn emails_are_taken_in_order_across_events() {
    let (e1, e2) = (event("acme", "e1"), event("acme", "e2"));
    let d1 = decision(vec![email("a@x.org"), in_app("u1"), email("b@x.org")]);
    let d2 = decision(vec![live("u1", "order.updated"), email("c@x.org")]);
    let routed = [(&e1, &d1), (&e2, &d2)];
    let to: Vec<(&str, &str)> = emails_of(&routed)
        .map(|(event, d)| match d {
            Delivery::Email { to, .. } => (event.id.as_str(), to.as_str()),
            other => panic!("not an email: {other:?}"),
        })
        .collect();
    assert_eq!(
        to,
        [("e1", "a@x.org"), ("e1", "b@x.org"), ("e2", "c@x.org")]
    );
}

#[test]
fn a_batch_claims_each_decided_event_once_and_nothing_else() {
    let batch = [
        prepared(1, Step::Routed(event("acme", "a"), decision(vec![]))),
        // A second copy of `a` in the same batch: no claim of its own.
        prepared(2, Step::Routed(event("acme", "a"), decision(vec![]))),
        prepared(3, Step::Failed(event("acme", "b"), trap())),
        prepared(4, Step::Parked(event("acme", "c"), unavailable())),
        prepared(5, Step::Rejected(rejection())),
        prepared(6, Step::Duplicate),
        // The same id under another tenant is another event.
        prepared(7, Step::Routed(event("globex", "a"), decision(vec![]))),
    ];
    let claims = Claims::of(&batch);
    let keys: Vec<(&str, &str, ClaimKind)> = claims
        .rows
        .iter()
        .map(|c| (c.tenant, c.event_id, c.kind))
        .collect();
    assert_eq!(
        keys,
        [
            ("acme", "a", ClaimKind::Routed),
            ("acme", "b", ClaimKind::DeadLettered),
            ("globex", "a", ClaimKind::Routed)
        ]
    );
    let routed = &claims.rows[0];
    assert_eq!(
        (routed.plugin, routed.plugin_digest),
        (Some("shop-router"), Some("sha256:abc"))
    );
    assert_eq!(routed.event_type, "order_paid");
    assert_eq!(
        (
            routed.origin.topic,
            routed.origin.partition,
            routed.origin.offset
        ),
        ("orders", 3, 1)
    );
    let failed = &claims.rows[1];
    assert_eq!(
        (failed.plugin, failed.plugin_digest),
        (Some("shop-router"), None)
    );
    assert_eq!(failed.origin.offset, 3);

    // The store says `acme/b` was claimed before: only the others won.
    assert_eq!(
        claims.won(&[true, false, true]),
        [true, false, false, false, false, false, true]
    );
}

#[test]
fn an_email_is_too_old_only_past_a_set_limit() {
    let e = event("acme", "e1");
    let at = |secs| event_time() + chrono::Duration::seconds(secs);
    assert_eq!(too_old_for_email(&e, 3600, at(3600)), None);
    assert_eq!(
        too_old_for_email(&e, 3600, at(7200)).as_deref(),
        Some("not sent: the event is 7200 s old, more than email.max_event_age_secs (3600)")
    );
    // Zero: no limit.
    assert_eq!(too_old_for_email(&e, 0, at(10_000_000)), None);
}
