//! The checker's rules, each on a made-up run: a clean run passes, every kind of defect fails.

use super::*;
use crate::clients::Frame;

fn entry(id: &str, tenant: &str, user: &str, email: Option<&str>) -> Entry {
    Entry {
        id: id.into(),
        tenant: tenant.into(),
        user: user.into(),
        email: email.map(Into::into),
        phase: "p".into(),
        attempts: 1,
        acked_ms: 0,
    }
}

fn row(tenant: &str, user: &str, seq: u64, event_id: &str) -> Notification {
    Notification {
        tenant: tenant.into(),
        user: user.into(),
        seq,
        event_id: event_id.into(),
    }
}

fn sent(event_id: &str, to: &str, message_id: &str) -> Outbox {
    Outbox {
        tenant: "t".into(),
        event_id: event_id.into(),
        recipient: to.into(),
        message_id: format!("<{message_id}>"),
        status: "sent".into(),
        attempts: 1,
    }
}

fn mail(message_id: &str, to: &str, created_ms: u64) -> Mail {
    Mail {
        message_id: message_id.into(),
        to: vec![to.into()],
        created_ms,
    }
}

fn crash(at_ms: u64) -> Fault {
    Fault {
        at_ms,
        phase: "p".into(),
        kind: "engine_sigkill".into(),
        detail: serde_json::json!({}),
    }
}

/// A clean run: three events, one with an email, and a client that saw its user's two.
fn clean() -> (Vec<Entry>, Store, Vec<Mail>, Vec<Transcript>) {
    let ledger = vec![
        entry("e1", "t", "u1", Some("u1@t")),
        entry("e2", "t", "u1", None),
        entry("e3", "t", "u2", None),
    ];
    let store = Store {
        notifications: vec![
            row("t", "u1", 1, "e1"),
            row("t", "u1", 2, "e2"),
            row("t", "u2", 1, "e3"),
        ],
        outbox: vec![sent("e1", "u1@t", "m1")],
        dead_letters: Vec::new(),
    };
    let mail = vec![mail("m1", "u1@t", 10_000)];
    let transcript = Transcript {
        tenant: "t".into(),
        user: "u1".into(),
        start: Some(0),
        frames: vec![
            Frame {
                conn: 1,
                id: 1,
                event_id: "e1".into(),
            },
            Frame {
                conn: 2,
                id: 2,
                event_id: "e2".into(),
            },
        ],
        connects: 2,
        caught_up: true,
        ..Default::default()
    };
    (ledger, store, mail, vec![transcript])
}

#[test]
fn a_clean_run_passes() {
    let (ledger, store, mail, transcripts) = clean();
    let v = check(&ledger, &[], &transcripts, &store, &mail);
    assert!(v.passed(), "{v:#?}");
    assert_eq!((v.events, v.notifications, v.stream_frames), (3, 3, 2));
}

#[test]
fn lost_duplicated_misdelivered_and_unknown_rows_are_found() {
    let (ledger, mut store, mail, transcripts) = clean();
    store.notifications.retain(|n| n.event_id != "e3");
    store.notifications.push(row("t", "u1", 3, "e2"));
    store.notifications.push(row("t", "u9", 1, "e1"));
    store.notifications.push(row("t", "u1", 4, "stranger"));
    let v = check(&ledger, &[], &transcripts, &store, &mail);
    assert_eq!(v.lost.count, 1, "{:?}", v.lost);
    assert_eq!(v.duplicated.count, 2, "{:?}", v.duplicated);
    assert_eq!(v.misdelivered.count, 1);
    assert_eq!(v.unknown.count, 1);
    assert!(!v.passed());
}

#[test]
fn a_second_email_is_allowed_only_when_a_crash_fell_by_its_first_copy() {
    let (ledger, store, mut mail, transcripts) = clean();
    mail.push(self::mail("m1", "u1@t", 40_000));
    let near = check(&ledger, &[crash(11_000)], &transcripts, &store, &mail);
    assert_eq!(near.email_duplicates_explained.count, 1);
    assert!(near.passed());
    // A crash long after the first copy did not cut its status write short.
    let far = check(&ledger, &[crash(30_000)], &transcripts, &store, &mail);
    assert_eq!(far.email_duplicates_unexplained.count, 1);
    assert!(!far.passed());
    let none = check(&ledger, &[], &transcripts, &store, &mail);
    assert_eq!(none.email_duplicates_unexplained.count, 1);
    // A third copy needs a crash by the second: one crash explains one extra copy.
    mail.push(self::mail("m1", "u1@t", 70_000));
    let once = check(&ledger, &[crash(11_000)], &transcripts, &store, &mail);
    assert_eq!(
        (
            once.email_duplicates_explained.count,
            once.email_duplicates_unexplained.count
        ),
        (1, 1)
    );
    let twice = check(
        &ledger,
        &[crash(11_000), crash(40_500)],
        &transcripts,
        &store,
        &mail,
    );
    assert_eq!(twice.email_duplicates_explained.count, 2);
    assert!(twice.passed());
}

#[test]
fn emails_lost_unsent_misdelivered_and_unknown_are_found() {
    let (ledger, mut store, mut mail, transcripts) = clean();
    mail.clear();
    let lost = check(&ledger, &[], &transcripts, &store, &mail);
    assert_eq!(lost.emails_lost.count, 1);
    mail.push(self::mail("m1", "someone@else", 10_000));
    mail.push(self::mail("m2", "u1@t", 10_000));
    let wrong = check(&ledger, &[], &transcripts, &store, &mail);
    assert_eq!(
        (wrong.emails_misdelivered.count, wrong.emails_unknown.count),
        (1, 1)
    );
    store.outbox[0].status = "failed".into();
    let unsent = check(&ledger, &[], &transcripts, &store, &[]);
    assert_eq!(unsent.emails_unsent.get("failed"), Some(&1));
    store.outbox.clear();
    let no_row = check(&ledger, &[], &transcripts, &store, &[]);
    assert_eq!(no_row.email_rows_lost.count, 1);
    assert!(!no_row.passed());
}

#[test]
fn stream_repeats_gaps_strangers_and_stragglers_are_found() {
    let (ledger, store, mail, clean) = clean();
    let with = |frames: Vec<(u64, &str)>, caught_up| {
        let mut t = clean[0].clone();
        t.frames = frames
            .into_iter()
            .map(|(id, e)| Frame {
                conn: 1,
                id,
                event_id: e.into(),
            })
            .collect();
        t.caught_up = caught_up;
        check(&ledger, &[], &[t], &store, &mail)
    };
    let repeat = with(vec![(1, "e1"), (1, "e1"), (2, "e2")], true);
    assert_eq!(repeat.stream_duplicated.count, 1);
    let gap = with(vec![(2, "e2")], true);
    assert_eq!(gap.stream_gaps.count, 1, "{:?}", gap.stream_gaps);
    let stranger = with(vec![(1, "e3"), (2, "e2")], true);
    assert_eq!(stranger.stream_misdelivered.count, 1);
    let behind = with(vec![(1, "e1"), (2, "e2")], false);
    assert_eq!(behind.stream_not_caught_up.count, 1);
    assert!(![repeat, gap, stranger, behind].iter().any(Verdict::passed));
}

#[test]
fn the_breaker_damage_leaves_the_quarantined_events_out() {
    let mut v = Verdict::default();
    v.dead_letters.insert("c0: plugin_trap".into(), 10);
    v.dead_letters.insert("c0: plugin_quarantined".into(), 182);
    v.dead_letters.insert("c1: plugin_trap".into(), 3);
    assert_eq!(v.breaker_damage("c0"), 10);
}
