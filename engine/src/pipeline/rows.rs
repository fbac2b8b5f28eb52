//! A batch's decisions turned into the store's rows: the claims of `processed_events`, the
//! notifications (in-app items and live updates) and the outbox rows of emails.
//!
//! Pure: every row borrows from the batch, and nothing here touches the database, so the
//! commit's phases only decide *when* rows are written, and these functions *what* they say.

use std::collections::HashSet;

use super::{Prepared, Step};
use crate::ingest::Incoming;
use crate::model::{Event, NOTIFICATION_EVENT};
use crate::plugin::{Decision, Delivery};
use crate::store::Origin;
use crate::store::claims::{Claim, ClaimKind};
use crate::store::notifications::NewNotification;
use crate::store::outbox::NewEmail;

/// Where a message came from, for the rows that record it.
pub(super) fn origin(message: &Incoming) -> Origin<'_> {
    Origin {
        topic: &message.topic,
        partition: message.partition,
        offset: message.offset,
    }
}

/// The claim of `event`, routed, with no plugin yet.
fn claim<'a>(event: &'a Event, message: &'a Incoming) -> Claim<'a> {
    Claim {
        tenant: &event.tenant,
        event_id: &event.id,
        event_type: &event.event_type,
        origin: origin(message),
        kind: ClaimKind::Routed,
        plugin: None,
        plugin_digest: None,
    }
}

/// The claim of a message that reached a decision (routed, or judged by its plugin);
/// `None` for the others, which are not claimed.
fn claim_of(one: &Prepared) -> Option<Claim<'_>> {
    match &one.step {
        Step::Routed(event, decision) => Some(Claim {
            kind: ClaimKind::Routed,
            plugin: Some(&decision.plugin),
            plugin_digest: Some(&decision.digest),
            ..claim(event, &one.message)
        }),
        Step::Failed(event, error) => Some(Claim {
            kind: ClaimKind::DeadLettered,
            plugin: error.plugin(),
            plugin_digest: None,
            ..claim(event, &one.message)
        }),
        Step::Rejected(_) | Step::Duplicate | Step::Parked(..) => None,
    }
}

/// A batch's claims, once per event: a second copy of an event in the same batch is a
/// duplicate like any other.
pub(super) struct Claims<'a> {
    /// The rows to claim, each (tenant, event id) once.
    pub rows: Vec<Claim<'a>>,
    /// Per message of the batch, the index of its claim in `rows`, if it has one.
    of: Vec<Option<usize>>,
}

impl<'a> Claims<'a> {
    pub fn of(prepared: &'a [Prepared]) -> Self {
        let mut in_batch = HashSet::new();
        let mut rows = Vec::new();
        let mut of = Vec::with_capacity(prepared.len());
        for one in prepared {
            of.push(match claim_of(one) {
                Some(c) if in_batch.insert((c.tenant, c.event_id)) => {
                    rows.push(c);
                    Some(rows.len() - 1)
                }
                _ => None,
            });
        }
        Self { rows, of }
    }

    /// Per message of the batch: did its claim win? `claimed` is what the store said of
    /// each row. A message without a claim of its own did not win.
    pub fn won(&self, claimed: &[bool]) -> Vec<bool> {
        self.of
            .iter()
            .map(|claim| claim.is_some_and(|i| claimed[i]))
            .collect()
    }
}

/// The emails among the routed events' deliveries, in order.
pub(super) fn emails_of<'a>(
    routed: &'a [(&'a Event, &'a Decision)],
) -> impl Iterator<Item = (&'a Event, &'a Delivery)> {
    routed.iter().flat_map(|(event, decision)| {
        decision
            .deliveries
            .iter()
            .filter(|d| matches!(d, Delivery::Email { .. }))
            .map(move |d| (*event, d))
    })
}

/// The notification rows (in-app items and live updates) of the routed events, in order.
pub(super) fn notifications<'a>(
    routed: &'a [(&'a Event, &'a Decision)],
) -> Vec<NewNotification<'a>> {
    routed
        .iter()
        .flat_map(|(event, decision)| {
            decision
                .deliveries
                .iter()
                .filter(|d| !matches!(d, Delivery::Email { .. }))
                .map(|d| notification(event, d))
        })
        .collect()
}

/// The row of an in-app item or a live update.
fn notification<'a>(event: &'a Event, delivery: &'a Delivery) -> NewNotification<'a> {
    match delivery {
        Delivery::InApp {
            user_id,
            title,
            body,
            category,
            data,
        } => NewNotification {
            tenant: &event.tenant,
            user_id,
            event_id: &event.id,
            kind: NOTIFICATION_EVENT,
            title: Some(title),
            body: Some(body),
            category: Some(category),
            data,
        },
        Delivery::Live {
            user_id,
            name,
            data,
        } => NewNotification {
            tenant: &event.tenant,
            user_id,
            event_id: &event.id,
            kind: name,
            title: None,
            body: None,
            category: None,
            data,
        },
        Delivery::Email { .. } => unreachable!("emails go to the outbox"),
    }
}

/// The outbox row of an email.
pub(super) fn new_email<'a>(
    event: &'a Event,
    delivery: &'a Delivery,
    message_id: &'a str,
    skip: Option<&'a str>,
) -> NewEmail<'a> {
    let Delivery::Email {
        to,
        user_id,
        template,
        data,
        locale,
        time_zone,
        not_sent: _,
    } = delivery
    else {
        unreachable!("in-app items and live updates go to the notifications")
    };
    NewEmail {
        tenant: &event.tenant,
        event_id: &event.id,
        user_id: user_id.as_deref(),
        recipient: to,
        template,
        data,
        message_id,
        skip,
        event_type: &event.event_type,
        event_time: event.time,
        locale: locale.as_deref(),
        time_zone: time_zone.as_deref(),
    }
}

/// Why an email delivery is not to be sent, when its plugin's answer said so (a field the
/// event's data gave it is invalid).
pub(super) fn not_sent(delivery: &Delivery) -> Option<&str> {
    match delivery {
        Delivery::Email { not_sent, .. } => not_sent.as_deref(),
        Delivery::InApp { .. } | Delivery::Live { .. } => None,
    }
}

/// `Some(reason)` when the event is older than `max_age_secs` (`email.max_event_age_secs`,
/// zero: no limit) at `now`: a new consumer group reading an old topic must not mail
/// customers about old orders.
pub(super) fn too_old_for_email(
    event: &Event,
    max_age_secs: u64,
    now: chrono::DateTime<chrono::Utc>,
) -> Option<String> {
    let limit = max_age_secs;
    let age = (now - event.time).num_seconds();
    (limit > 0 && age > limit as i64).then(|| {
        format!("not sent: the event is {age} s old, more than email.max_event_age_secs ({limit})")
    })
}

#[cfg(test)]
mod tests;
