//! Unit tests of `commit`'s pure phases: each event's outcome once its claim is known, and
//! the outbox rows with their message ids and skip reasons.

use super::*;
use crate::pipeline::fixtures::{
    decision, email, event, in_app, prepared, rejection, trap, unavailable,
};

fn kind(outcome: &EventOutcome<'_>) -> &'static str {
    match outcome {
        EventOutcome::Rejected(..) => "rejected",
        EventOutcome::Duplicate => "duplicate",
        EventOutcome::ClaimLost(_) => "claim lost",
        EventOutcome::Parked(..) => "parked",
        EventOutcome::Failed(..) => "failed",
        EventOutcome::Routed(..) => "routed",
    }
}

#[test]
fn an_event_whose_claim_lost_is_a_duplicate_whatever_its_plugin_said() {
    let batch = [
        prepared(1, Step::Routed(event("acme", "a"), decision(vec![]))),
        prepared(2, Step::Routed(event("acme", "b"), decision(vec![]))),
        prepared(3, Step::Failed(event("acme", "c"), trap())),
        prepared(4, Step::Failed(event("acme", "d"), trap())),
        prepared(5, Step::Parked(event("acme", "e"), unavailable())),
        prepared(6, Step::Rejected(rejection())),
        prepared(7, Step::Duplicate),
    ];
    let won = [true, false, true, false, false, false, false];
    let outcomes = settle(&batch, &won);
    let kinds: Vec<&str> = outcomes.iter().map(kind).collect();
    assert_eq!(
        kinds,
        [
            "routed",
            "claim lost",
            "failed",
            "claim lost",
            "parked",
            "rejected",
            "duplicate"
        ]
    );
    // Each outcome keeps its own message and event.
    match (&outcomes[2], &outcomes[4]) {
        (EventOutcome::Failed(m, e, _), EventOutcome::Parked(p, f, _)) => {
            assert_eq!((m.offset, e.id.as_str()), (3, "c"));
            assert_eq!((p.offset, f.id.as_str()), (5, "e"));
        }
        _ => unreachable!(),
    }
    let EventOutcome::ClaimLost(lost) = &outcomes[1] else {
        unreachable!()
    };
    assert_eq!(lost.id, "b");
}

#[test]
fn outbox_rows_take_their_extras_in_order_and_count_the_skipped() {
    let (e1, e2) = (event("acme", "e1"), event("acme", "e2"));
    let d1 = decision(vec![email("a@x.org"), in_app("u1")]);
    let d2 = decision(vec![email("b@x.org"), email("c@x.org")]);
    let routed = [(&e1, &d1), (&e2, &d2)];
    let extras = [
        ("<1@x.org>".to_owned(), None),
        ("<2@x.org>".to_owned(), Some("too old".to_owned())),
        ("<3@x.org>".to_owned(), None),
    ];
    let mut effects = Effects::default();
    let rows = email_rows(&routed, &extras, &mut effects);
    let seen: Vec<(&str, &str, &str, Option<&str>)> = rows
        .iter()
        .map(|r| (r.event_id, r.recipient, r.message_id, r.skip))
        .collect();
    assert_eq!(
        seen,
        [
            ("e1", "a@x.org", "<1@x.org>", None),
            ("e2", "b@x.org", "<2@x.org>", Some("too old")),
            ("e2", "c@x.org", "<3@x.org>", None),
        ]
    );
    assert_eq!(effects.emails_skipped, 1);
}
