//! What a committed batch did, and how it is applied after COMMIT: offsets stored, metrics
//! counted, the hub told of the new rows, the email worker woken.
//!
//! Gathered while the transaction runs and applied only once it has committed: a batch
//! that rolls back leaves no count, no stream frame and no offset behind.

use std::sync::Arc;

use super::{Pipeline, Prepared};
use crate::hub;
use crate::ingest::Incoming;
use crate::model::StoredNotification;
use crate::store::notifications::NewNotification;

/// What a committed batch did: its events' outcomes, counted, and the rows it wrote.
#[derive(Default)]
pub(super) struct Effects {
    /// The topic of each message handled.
    pub consumed: Vec<String>,
    pub duplicates: u64,
    /// The kind of each dead letter stored.
    pub dead_lettered: Vec<String>,
    pub notifications: Vec<Written>,
    pub emails: u64,
    /// Of `emails`, those recorded but not to be sent.
    pub emails_skipped: u64,
}

impl Effects {
    /// A batch of `prepared`, every message consumed, nothing else done yet.
    pub fn consumed(prepared: &[Prepared]) -> Self {
        Self {
            consumed: prepared.iter().map(|p| p.message.topic.clone()).collect(),
            ..Self::default()
        }
    }

    /// Are there emails to send? Then the email worker is woken.
    fn wakes_email_worker(&self) -> bool {
        self.emails > self.emails_skipped
    }
}

/// Where a notification's user listens, as the hub and the presence know it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Listeners {
    /// A stream on this instance.
    pub here: bool,
    /// A stream on another instance.
    pub there: bool,
}

impl Listeners {
    const NOBODY: Self = Self {
        here: false,
        there: false,
    };
}

/// A notification the batch wrote, for its user's streams.
pub(super) struct Written {
    pub tenant: String,
    pub user: String,
    pub seq: i64,
    /// The row and its size, when the user listens on this instance and it is small enough
    /// for the hub to keep.
    here: Option<(Arc<StoredNotification>, usize)>,
    /// The row, when the user listens on another instance and it is small enough to travel
    /// in the wake-up.
    pub there: Option<Arc<StoredNotification>>,
}

impl Written {
    /// The row `n`, stored as `seq` of `size` bytes: carried along only when it is small
    /// enough to keep, and only for the side that listens (asked only of a small row).
    pub fn new(
        n: &NewNotification<'_>,
        seq: i64,
        size: usize,
        created_at: chrono::DateTime<chrono::Utc>,
        listeners: impl FnOnce() -> Listeners,
    ) -> Self {
        let small = size <= hub::RECENT_ROW_BYTES;
        let Listeners { here, there } = if small {
            listeners()
        } else {
            Listeners::NOBODY
        };
        let row = (here || there).then(|| Arc::new(n.stored(seq, created_at)));
        Written {
            tenant: n.tenant.to_owned(),
            user: n.user_id.to_owned(),
            seq,
            there: row.clone().filter(|_| there),
            here: row.filter(|_| here).map(|row| (row, size)),
        }
    }
}

impl Pipeline {
    /// After COMMIT: offsets, metrics, wake-ups.
    pub(super) fn acknowledge(&self, prepared: &[Prepared], effects: Effects) {
        // A drained message's offset was finished when it was spilled; marking it again
        // could count off a copy of it re-read from Kafka meanwhile.
        let messages: Vec<&Incoming> = prepared
            .iter()
            .filter(|p| p.spilled.is_none())
            .map(|p| &*p.message)
            .collect();
        if let Err(e) = self.ingest.finished(&messages) {
            // The outcome is committed; a later batch's offsets cover this one, and at
            // worst the messages are re-read and dropped as duplicates.
            tracing::warn!(error = %e, "storing offsets failed");
        }
        self.count(&effects);
        let wake_email_worker = effects.wakes_email_worker();
        for w in effects.notifications {
            match w.here {
                Some((row, size)) => self.hub.publish_row(&w.tenant, &w.user, row, size),
                None => self.hub.publish(&w.tenant, &w.user, w.seq),
            }
        }
        if wake_email_worker {
            self.email_wake.notify_one();
        }
    }

    /// The batch's metrics.
    fn count(&self, effects: &Effects) {
        for topic in &effects.consumed {
            self.metrics
                .events_consumed
                .with_label_values(&[topic])
                .inc();
        }
        self.metrics.events_duplicate.inc_by(effects.duplicates);
        for kind in &effects.dead_lettered {
            self.metrics
                .events_dead_lettered
                .with_label_values(&[kind])
                .inc();
        }
        self.metrics
            .notifications_written
            .inc_by(effects.notifications.len() as u64);
        self.metrics.emails_enqueued.inc_by(effects.emails);
        self.metrics.emails_skipped.inc_by(effects.emails_skipped);
    }
}

#[cfg(test)]
mod tests;
