//! Unit tests of `effects`: a batch's bookkeeping, and which rows travel to which streams.

use serde_json::Map;

use super::*;
use crate::pipeline::Step;
use crate::pipeline::fixtures::{event_time, prepared};

fn row<'a>(data: &'a Map<String, serde_json::Value>) -> NewNotification<'a> {
    NewNotification {
        tenant: "acme",
        user_id: "u1",
        event_id: "e1",
        kind: "notification",
        title: Some("Paid"),
        body: None,
        category: None,
        data,
    }
}

#[test]
fn a_batch_consumes_every_message_and_did_nothing_else_yet() {
    let batch = [prepared(1, Step::Duplicate), prepared(2, Step::Duplicate)];
    let effects = Effects::consumed(&batch);
    assert_eq!(effects.consumed, ["orders", "orders"]);
    assert_eq!(
        (effects.duplicates, effects.emails, effects.emails_skipped),
        (0, 0, 0)
    );
    assert!(effects.dead_lettered.is_empty() && effects.notifications.is_empty());
}

#[test]
fn the_email_worker_is_woken_only_for_emails_to_send() {
    let with = |emails, emails_skipped| Effects {
        emails,
        emails_skipped,
        ..Effects::default()
    };
    assert!(!with(0, 0).wakes_email_worker());
    assert!(!with(2, 2).wakes_email_worker());
    assert!(with(3, 2).wakes_email_worker());
}

#[test]
fn a_small_row_travels_to_the_side_that_listens() {
    let data = Map::new();
    let n = row(&data);
    let here_only = Written::new(&n, 7, 100, event_time(), || Listeners {
        here: true,
        there: false,
    });
    let (kept, size) = here_only.here.expect("kept for this instance's streams");
    assert_eq!((kept.seq, kept.event_id.as_str(), size), (7, "e1", 100));
    assert_eq!(kept.title.as_deref(), Some("Paid"));
    assert_eq!(kept.created_at, event_time());
    assert!(here_only.there.is_none());
    assert_eq!(
        (
            here_only.tenant.as_str(),
            here_only.user.as_str(),
            here_only.seq
        ),
        ("acme", "u1", 7)
    );

    let both = Written::new(&n, 8, 100, event_time(), || Listeners {
        here: true,
        there: true,
    });
    let (here, _) = both.here.unwrap();
    assert!(Arc::ptr_eq(&here, &both.there.unwrap()), "one row, shared");

    let nobody = Written::new(&n, 9, 100, event_time(), || Listeners::NOBODY);
    assert!(nobody.here.is_none() && nobody.there.is_none());
    assert_eq!(nobody.seq, 9);
}

#[test]
fn a_large_row_travels_by_its_number_only_and_does_not_ask_who_listens() {
    let data = Map::new();
    let n = row(&data);
    let large = Written::new(&n, 7, hub::RECENT_ROW_BYTES + 1, event_time(), || {
        panic!("who listens is asked of small rows only")
    });
    assert!(large.here.is_none() && large.there.is_none());
    assert_eq!(large.seq, 7);
    let at_limit = Written::new(&n, 8, hub::RECENT_ROW_BYTES, event_time(), || Listeners {
        here: false,
        there: true,
    });
    assert!(at_limit.there.is_some());
}
