//! Unit tests of `dead_letter`: what a dead letter's row says, by why it was written.

use super::*;
use crate::pipeline::fixtures::{event, message, rejection, trap};

#[test]
fn a_rejected_message_keeps_its_bytes_origin_and_what_could_be_read() {
    let m = message("orders", 41, b"not json");
    let r = rejection();
    let dead = DeadLetter::rejected(&m, &r);
    let row = dead.row();
    assert_eq!((row.tenant, row.event_id), (Some("acme"), None));
    assert_eq!(
        (row.origin.topic, row.origin.partition, row.origin.offset),
        ("orders", 3, 41)
    );
    assert_eq!(
        (row.key, row.payload),
        (Some(&b"order-1"[..]), &b"not json"[..])
    );
    assert_eq!(row.headers, m.headers.as_slice());
    assert_eq!(
        (row.error_kind, row.reason),
        ("validation", "`type` is missing")
    );
    assert_eq!(row.plugin, None);
}

#[test]
fn a_plugin_dead_letter_names_the_plugin_and_its_error_kind() {
    let m = message("orders", 5, b"{}");
    let (e, error) = (event("acme", "e1"), trap());
    let dead = DeadLetter::plugin(&m, &e, &error);
    let row = dead.row();
    assert_eq!((row.tenant, row.event_id), (Some("acme"), Some("e1")));
    assert_eq!(row.error_kind, "plugin_trap");
    assert_eq!(row.reason, "plugin shop-router trapped: unreachable");
    assert_eq!(row.plugin, Some("shop-router"));
}

#[test]
fn a_refused_message_is_a_store_dead_letter_with_its_event_when_it_decoded() {
    let mut m = message("orders", 9, b"");
    m.payload = None;
    let error = StoreError::from(sqlx::Error::PoolTimedOut);
    let e = event("acme", "e1");

    let decoded = DeadLetter::refused(&m, Some(&e), &error);
    let row = decoded.row();
    assert_eq!((row.tenant, row.event_id), (Some("acme"), Some("e1")));
    assert_eq!(row.error_kind, "store");
    // The reason keeps the database's own words, as operators read them in the row.
    assert_eq!(
        row.reason,
        "the database refused this message's data: database: pool timed out while waiting \
         for an open connection"
    );
    // No payload at all (a tombstone) is stored as empty bytes.
    assert_eq!(row.payload, b"");

    let undecoded = DeadLetter::refused(&m, None, &error);
    let row = undecoded.row();
    assert_eq!((row.tenant, row.event_id, row.plugin), (None, None, None));
}
