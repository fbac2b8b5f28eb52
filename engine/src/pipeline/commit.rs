//! Step 2: the committers, and the transaction that writes a group of lanes' batches.
//!
//! [`Pipeline::commit`] reads as its phases, each a function of its own: replay tokens
//! accepted, events claimed, each event's outcome settled ([`settle`], pure) and recorded
//! (dead letters, duplicates), outbox rows made, notifications written, other instances
//! announced; then COMMIT, and only then acknowledged (`effects`). A handful of statements
//! whatever the batch's size: one claims every event, one numbers and stores every user's
//! new notifications, one fills the outbox, a few NOTIFY the wake-ups (dead letters and
//! replays, rare, are a statement each).

use std::sync::Arc;
use std::time::Instant;

use tokio::task::JoinSet;

use super::dead_letter::{self, DeadLetter};
use super::effects::{Effects, Listeners, Written};
use super::{Commits, Pipeline, Prepared, Stall, Step, group, rows};
use crate::ingest::Incoming;
use crate::ingest::envelope::Rejection;
use crate::model::Event;
use crate::plugin::{Decision, PluginError};
use crate::store::outbox::{self, NewEmail};
use crate::store::{StoreError, claims, notifications, spill, wake};

/// Committers of small batches (see [`group`]). Few, so that the batches of a spread load
/// gather while they are busy: at 1 000 events/s over ten tenants, two gave p50 8.5–10 ms;
/// four or eight gave 12 ms (smaller groups, more transactions).
const SMALL_COMMITTERS: usize = 2;
/// Committers of large batches (a backlog), side by side: a 100 000-event backlog drained at
/// 7 200 events/s through two, 9 900 through four, 13 600 through eight.
const LARGE_COMMITTERS: usize = 6;
/// A batch is large from this fraction of `kafka.batch_max`.
const LARGE_BATCH_DIVISOR: usize = 4;
/// A group's size, in `kafka.batch_max`es: a few full batches per transaction at most.
const GROUP_BATCHES: usize = 4;

/// A routed event and its plugin's decision: what the rows are made of.
type Routed<'a> = (&'a Event, &'a Decision);

/// An event's outcome in the transaction, once its claim is known.
pub(super) enum EventOutcome<'a> {
    /// Refused by ingest: a dead letter.
    Rejected(&'a Incoming, &'a Rejection),
    /// Known as processed before routing.
    Duplicate,
    /// Routed or judged, but already claimed (earlier, or by a copy earlier in the batch).
    ClaimLost(&'a Event),
    /// Its plugin is unavailable: a dead letter, the event not claimed.
    Parked(&'a Incoming, &'a Event, &'a PluginError),
    /// Its plugin judged it: a dead letter, the event claimed.
    Failed(&'a Incoming, &'a Event, &'a PluginError),
    /// Delivered: its notifications and emails are written.
    Routed(&'a Event, &'a Decision),
}

/// Each message's outcome, given whether its claim won (see [`rows::Claims::won`]).
pub(super) fn settle<'a>(prepared: &'a [Prepared], won: &[bool]) -> Vec<EventOutcome<'a>> {
    prepared
        .iter()
        .zip(won)
        .map(|(one, &won)| match &one.step {
            Step::Rejected(rejection) => EventOutcome::Rejected(&one.message, rejection),
            Step::Duplicate => EventOutcome::Duplicate,
            Step::Parked(event, error) => EventOutcome::Parked(&one.message, event, error),
            Step::Routed(event, _) | Step::Failed(event, _) if !won => {
                EventOutcome::ClaimLost(event)
            }
            Step::Failed(event, error) => EventOutcome::Failed(&one.message, event, error),
            Step::Routed(event, decision) => EventOutcome::Routed(event, decision),
        })
        .collect()
}

impl EventOutcome<'_> {
    /// The outcome's line in the log.
    fn log(&self) {
        match self {
            EventOutcome::Rejected(message, rejection) => tracing::warn!(
                topic = %message.topic, partition = message.partition,
                offset = message.offset,
                tenant = rejection.tenant.as_deref().unwrap_or("-"),
                event_id = rejection.event_id.as_deref().unwrap_or("-"),
                kind = rejection.kind.as_str(), reason = %rejection.reason,
                "message dead-lettered"
            ),
            EventOutcome::Duplicate => {}
            EventOutcome::Parked(_, event, error) => tracing::warn!(
                tenant = %event.tenant, event_id = %event.id, error = %error,
                "tenant's routing plugin unavailable; event set aside (not claimed)"
            ),
            EventOutcome::ClaimLost(event) => {
                tracing::debug!(tenant = %event.tenant, event_id = %event.id, "duplicate event skipped")
            }
            EventOutcome::Failed(_, event, error) => tracing::warn!(
                tenant = %event.tenant, event_id = %event.id, kind = error.kind(),
                error = %error, "routing failed; event dead-lettered"
            ),
            EventOutcome::Routed(event, decision) => tracing::info!(
                tenant = %event.tenant, event_id = %event.id, event_type = %event.event_type,
                plugin = %decision.plugin, deliveries = decision.deliveries.len(),
                fuel = decision.cost.fuel, micros = decision.cost.elapsed.as_micros() as u64,
                "event routed"
            ),
        }
    }
}

impl Pipeline {
    /// Starts the committers: a few for small batches, more for large ones. They stop once
    /// the returned [`Commits`] and every clone of it are gone and their queue is empty.
    pub(super) fn start_committers(self: &Arc<Self>) -> (Commits, JoinSet<()>) {
        let large_from = (self.kafka.batch_max / LARGE_BATCH_DIVISOR).max(2);
        // Each lane has at most one batch waiting: the queues' bound is only a backstop.
        let (commits, small, large) = group::Commits::new(large_from, 1024);
        let (small, large) = (Arc::new(small), Arc::new(large));
        let mut committers = JoinSet::new();
        for _ in 0..SMALL_COMMITTERS {
            committers.spawn(self.clone().committer(small.clone()));
        }
        for _ in 0..LARGE_COMMITTERS {
            committers.spawn(self.clone().committer(large.clone()));
        }
        (commits, committers)
    }

    /// A committer: commits the lanes' batches, a group of them per transaction, until the
    /// lanes are gone.
    async fn committer(self: Arc<Self>, jobs: Arc<group::Queue<Prepared, Arc<Stall>>>) {
        while let Some(group) = jobs.gather(self.kafka.batch_max * GROUP_BATCHES).await {
            self.commit_group(group).await;
        }
    }

    /// Commits a group's batches in one transaction and tells each lane. If the database
    /// refuses data in it, whose it is is not known: each batch is then written on its own
    /// (and its messages one by one if it is the one at fault). Any other failure stalls
    /// every lane of the group, each to try again on its own.
    async fn commit_group(&self, group: Vec<group::Job<Prepared, Arc<Stall>>>) {
        let mut all = Vec::new();
        let mut ends = Vec::with_capacity(group.len());
        for job in group {
            all.extend(job.items);
            ends.push((all.len(), job.done));
        }
        if ends.len() > 1 {
            match self.commit(&all).await {
                Ok(()) => {
                    for (_, done) in ends {
                        let _ = done.send(Ok(()));
                    }
                    return;
                }
                Err(e) if e.is_data_error() => {
                    tracing::debug!(error = %e.with_cause(), batches = ends.len(), "the database refused data in a group; writing its batches one by one");
                }
                Err(e) => {
                    let stall = Arc::new(Stall::from(e));
                    for (_, done) in ends {
                        let _ = done.send(Err(stall.clone()));
                    }
                    return;
                }
            }
        }
        let mut start = 0;
        for (end, done) in ends {
            let _ = done.send(self.write(&all[start..end]).await.map_err(Arc::new));
            start = end;
        }
    }

    /// Commits the batch in one transaction. If the database refuses something about the
    /// data, the messages go one by one, so only the message at fault is dead-lettered;
    /// any other error stalls the batch.
    async fn write(&self, prepared: &[Prepared]) -> Result<(), Stall> {
        let error = match self.commit(prepared).await {
            Ok(()) => return Ok(()),
            Err(e) if e.is_data_error() => e,
            Err(e) => return Err(e.into()),
        };
        tracing::warn!(error = %error.with_cause(), size = prepared.len(), "the database refused data in this batch; handling its messages one by one");
        for one in prepared {
            match self.commit(std::slice::from_ref(one)).await {
                Ok(()) => {}
                Err(e) if e.is_data_error() => self.dead_letter_alone(one, &e).await?,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Runs one transaction over `prepared` and acknowledges it, phase by phase.
    async fn commit(&self, prepared: &[Prepared]) -> Result<(), StoreError> {
        let started = Instant::now();
        let mut tx = self.pool.begin().await?;
        let mut effects = Effects::consumed(prepared);
        accept_replays(&mut tx, prepared, self.replay_ttl()).await?;
        let won = claim(&mut tx, prepared).await?;
        let outcomes = settle(prepared, &won);
        let routed = self.record(&mut tx, outcomes, &mut effects).await?;
        // An email's message id and skip reason are made first: the outbox rows borrow them.
        let extras = self.email_extras(&routed);
        let emails = email_rows(&routed, &extras, &mut effects);
        self.write_notifications(&mut tx, &routed, &mut effects)
            .await?;
        outbox::enqueue_emails(&mut tx, &emails).await?;
        effects.emails = emails.len() as u64;
        self.announce(&mut tx, &effects).await?;
        self.unspill(&mut tx, prepared).await?;
        // What fails at COMMIT is the database's trouble, never the data's (a full NOTIFY
        // queue raises 54000 here): see `StoreError::Commit`.
        tx.commit().await.map_err(StoreError::Commit)?;
        self.metrics
            .batch_seconds
            .observe(started.elapsed().as_secs_f64());
        self.acknowledge(prepared, effects);
        Ok(())
    }

    /// Records each event's outcome: its log line, its dead letter or its duplicate count.
    /// Returns the routed events, whose rows are written next.
    async fn record<'a>(
        &self,
        tx: &mut sqlx::PgConnection,
        outcomes: Vec<EventOutcome<'a>>,
        effects: &mut Effects,
    ) -> Result<Vec<Routed<'a>>, StoreError> {
        let mut routed = Vec::new();
        for outcome in outcomes {
            outcome.log();
            match outcome {
                EventOutcome::Rejected(message, rejection) => {
                    let dead = DeadLetter::rejected(message, rejection);
                    self.dead_letter(tx, dead, effects).await?;
                }
                EventOutcome::Duplicate | EventOutcome::ClaimLost(_) => effects.duplicates += 1,
                EventOutcome::Parked(message, event, error)
                | EventOutcome::Failed(message, event, error) => {
                    let dead = DeadLetter::plugin(message, event, error);
                    self.dead_letter(tx, dead, effects).await?;
                }
                EventOutcome::Routed(event, decision) => routed.push((event, decision)),
            }
        }
        Ok(routed)
    }

    /// Each email's `Message-ID` and, when it is not to be sent, why: a field the event's
    /// data gave it is invalid (the recipient is not an address, ...; see
    /// [`crate::plugin::Delivery`]), or the event is too old to mail about.
    fn email_extras(&self, routed: &[Routed<'_>]) -> Vec<(String, Option<String>)> {
        rows::emails_of(routed)
            .map(|(event, delivery)| {
                let message_id = format!("<{}@{}>", uuid::Uuid::new_v4(), self.message_id_domain);
                let skip = rows::not_sent(delivery).map(str::to_owned).or_else(|| {
                    rows::too_old_for_email(
                        event,
                        self.email.max_event_age_secs,
                        chrono::Utc::now(),
                    )
                });
                (message_id, skip)
            })
            .collect()
    }

    /// Stores the routed events' notifications; each, with its row when it is small enough
    /// to keep, goes to the user's streams on this instance and in the wake-up for those on
    /// others.
    async fn write_notifications(
        &self,
        tx: &mut sqlx::PgConnection,
        routed: &[Routed<'_>],
        effects: &mut Effects,
    ) -> Result<(), StoreError> {
        let notifications = rows::notifications(routed);
        let inserted = notifications::insert_notifications(tx, &notifications).await?;
        for ((n, seq), size) in notifications.iter().zip(inserted.seqs).zip(inserted.sizes) {
            let listeners = || Listeners {
                here: self.hub.is_connected(n.tenant, n.user_id),
                there: self.presence.is_online_elsewhere(n.tenant, n.user_id),
            };
            let written = Written::new(n, seq, size, inserted.created_at, listeners);
            effects.notifications.push(written);
        }
        Ok(())
    }

    /// Drained messages leave the spill with their outcome (see `spill`).
    pub(super) async fn unspill(
        &self,
        tx: &mut sqlx::PgConnection,
        prepared: &[Prepared],
    ) -> Result<(), StoreError> {
        let ids: Vec<i64> = prepared.iter().filter_map(|p| p.spilled).collect();
        spill::drained(tx, &ids, self.hub.instance()).await?;
        Ok(())
    }

    /// Streams on other instances hear of the rows when they commit.
    async fn announce(
        &self,
        tx: &mut sqlx::PgConnection,
        effects: &Effects,
    ) -> Result<(), StoreError> {
        let wakes = effects.notifications.iter().map(|w| {
            (
                w.tenant.as_str(),
                w.user.as_str(),
                w.seq,
                w.there.as_deref(),
            )
        });
        // This instance's streams took the rows from its hub: its own echo is skipped.
        wake::announce(tx, self.hub.seal(), wake::Lead::From, wakes).await
    }
}

/// Replayed dead letters in the batch: whether each token still counts.
async fn accept_replays(
    tx: &mut sqlx::PgConnection,
    prepared: &[Prepared],
    ttl: std::time::Duration,
) -> Result<(), StoreError> {
    for one in prepared {
        if let Some(token) = one.replay {
            dead_letter::replay(tx, one, token, ttl).await?;
        }
    }
    Ok(())
}

/// Claims every event that reached a decision, once per batch. Returns, per message,
/// whether its claim won.
async fn claim(
    tx: &mut sqlx::PgConnection,
    prepared: &[Prepared],
) -> Result<Vec<bool>, StoreError> {
    let claims = rows::Claims::of(prepared);
    let claimed = claims::claim_events(tx, &claims.rows).await?;
    Ok(claims.won(&claimed))
}

/// The outbox rows of the routed events' emails, with their `extras` (see
/// [`Pipeline::email_extras`]); counts those recorded but not sent.
fn email_rows<'a>(
    routed: &'a [Routed<'a>],
    extras: &'a [(String, Option<String>)],
    effects: &mut Effects,
) -> Vec<NewEmail<'a>> {
    rows::emails_of(routed)
        .zip(extras)
        .map(|((event, delivery), (message_id, skip))| {
            if let Some(reason) = skip {
                tracing::info!(tenant = %event.tenant, event_id = %event.id, event_time = %event.time, reason = %reason, "email recorded but not sent");
                effects.emails_skipped += 1;
            }
            rows::new_email(event, delivery, message_id, skip.as_deref())
        })
        .collect()
}

#[cfg(test)]
mod tests;
