//! The orchestrator: one batch of Kafka messages, routed, then one short transaction.
//!
//! A batch goes through two steps, the way mini-redis's handlers read:
//!
//! 1. [`Pipeline::prepare`], outside any transaction: decode every message (bad input → a
//!    dead letter), skip events already processed, and route the rest through their
//!    tenants' plugins. Plugin time never holds a database lock.
//! 2. [`Pipeline::commit`], one transaction: claim `(tenant, event id)` (already claimed →
//!    duplicate), write notifications, outbox rows and dead letters. COMMIT, and only then
//!    store the Kafka offsets and wake the SSE streams and the email worker.
//!
//! What the database or the platform does wrong is never blamed on a message: such a batch
//! *stalls* (waits, reports not ready, tries again) until it commits. Only an error about a
//! message's own data ([`StoreError::is_data_error`]) dead-letters that message, alone. A
//! crash anywhere before COMMIT leaves no trace and the messages are re-read; after COMMIT
//! but before the offset commit they are re-read too, and the claim turns them into
//! duplicates. Exactly one outcome per event.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::{EmailConfig, KafkaConfig};
use crate::health::Health;
use crate::hub::Hub;
use crate::ingest::envelope::{self, Event, Rejection};
use crate::ingest::{Incoming, Ingest};
use crate::plugin::{Decision, Delivery, Disposition, NOTIFICATION_EVENT, PluginError, PluginHost};
use crate::store::{self, NewDeadLetter, NewEmail, NewNotification, Origin, StoreError};
use crate::telemetry::Metrics;

pub struct Pipeline {
    pub ingest: Arc<Ingest>,
    pub pool: PgPool,
    pub plugins: Arc<PluginHost>,
    pub hub: Arc<Hub>,
    pub metrics: Metrics,
    pub health: Arc<Health>,
    /// Woken after a commit that wrote outbox rows.
    pub email_wake: Arc<Notify>,
    pub kafka: KafkaConfig,
    pub email: EmailConfig,
    /// Right-hand side of generated `Message-ID`s.
    pub message_id_domain: String,
}

/// Longest wait between two tries of a stalled batch.
const MAX_STALL_DELAY: Duration = Duration::from_secs(30);

/// One message of a batch, ready to be written.
struct Prepared<'a> {
    message: &'a Incoming,
    step: Step,
}

enum Step {
    /// Undecodable or invalid: a dead letter.
    Rejected(Rejection),
    /// Already processed (seen before routing).
    Duplicate,
    Routed(Event, Decision),
    /// The plugin judged the event: a dead letter, and the event is claimed.
    Failed(Event, PluginError),
    /// The tenant's plugin is unavailable: a dead letter, the event not claimed.
    Parked(Event, PluginError),
}

/// Why a batch cannot be committed now. Nothing about its messages: it waits.
#[derive(Debug, thiserror::Error)]
enum Stall {
    #[error("{0}")]
    Database(#[from] StoreError),
    #[error("{0}")]
    Plugin(PluginError),
}

impl Stall {
    fn cause(&self) -> &'static str {
        match self {
            Stall::Database(_) => "database",
            Stall::Plugin(_) => "plugin",
        }
    }
}

/// What a committed batch did, applied to metrics and the hub after COMMIT.
#[derive(Default)]
struct Outcome {
    consumed: Vec<String>,
    duplicates: u64,
    dead_lettered: Vec<String>,
    notifications: Vec<(String, String, i64)>,
    emails: u64,
    emails_skipped: u64,
}

impl Pipeline {
    /// Consumes until `shutdown` fires, finishing the batch in hand first.
    pub async fn run(self, shutdown: CancellationToken) {
        let linger = Duration::from_millis(self.kafka.batch_linger_ms);
        loop {
            let batch = tokio::select! {
                _ = shutdown.cancelled() => break,
                batch = self.ingest.next_batch(self.kafka.batch_max, linger) => batch,
            };
            if !self.handle_batch(&batch, &shutdown).await {
                break;
            }
            if shutdown.is_cancelled() {
                break;
            }
        }
        // Offsets of every committed batch are stored; make them durable before leaving so
        // the partitions' next owner does not re-read finished work.
        self.ingest.commit_stored();
        tracing::info!("pipeline stopped");
    }

    /// Handles a batch until it is committed. Returns false if shutdown interrupted the
    /// waiting (the batch is then not acknowledged and will be re-read).
    async fn handle_batch(&self, batch: &[Incoming], shutdown: &CancellationToken) -> bool {
        let mut delay = Duration::from_millis(100);
        loop {
            let stall = match self.prepare(batch).await {
                Ok(prepared) => match self.write(&prepared).await {
                    Ok(()) => {
                        self.health.set_stall(None);
                        return true;
                    }
                    Err(stall) => stall,
                },
                Err(stall) => stall,
            };
            self.metrics
                .pipeline_stalls
                .with_label_values(&[stall.cause()])
                .inc();
            tracing::warn!(
                cause = stall.cause(), error = %stall, size = batch.len(),
                retry_in_ms = delay.as_millis() as u64,
                "batch stalled: the database or the platform failed, not the data; waiting"
            );
            self.health
                .set_stall(Some(format!("{}: {stall}", stall.cause())));
            tokio::select! {
                _ = shutdown.cancelled() => return false,
                _ = tokio::time::sleep(delay) => {}
            }
            if let Stall::Plugin(_) = stall {
                // An operator may have put the missing plugin in place meanwhile.
                if let Err(e) = self.plugins.load_dir().await {
                    tracing::warn!(error = %e, "reloading the plugin directory failed");
                }
            }
            delay = (delay * 2).min(MAX_STALL_DELAY);
        }
    }

    /// Step 1, outside any transaction: decode, skip known duplicates, route.
    async fn prepare<'a>(&self, batch: &'a [Incoming]) -> Result<Vec<Prepared<'a>>, Stall> {
        let decoded: Vec<Result<Event, Rejection>> = batch
            .iter()
            .map(|m| envelope::decode(m.payload.as_deref(), self.kafka.max_message_bytes))
            .collect();
        let keys: Vec<(&str, &str)> = decoded
            .iter()
            .filter_map(|d| d.as_ref().ok())
            .map(|e| (e.tenant.as_str(), e.id.as_str()))
            .collect();
        let seen = store::already_processed(&self.pool, &keys).await?;
        let mut prepared = Vec::with_capacity(batch.len());
        for (message, decoded) in batch.iter().zip(decoded) {
            let step = match decoded {
                Err(rejection) => Step::Rejected(rejection),
                Ok(event) if seen.contains(&(event.tenant.clone(), event.id.clone())) => {
                    Step::Duplicate
                }
                Ok(event) => self.route(event).await?,
            };
            prepared.push(Prepared { message, step });
        }
        Ok(prepared)
    }

    async fn route(&self, event: Event) -> Result<Step, Stall> {
        match self.plugins.route(&event).await {
            Ok(decision) => {
                self.metrics.plugin_calls.with_label_values(&["ok"]).inc();
                self.metrics
                    .plugin_call_seconds
                    .observe(decision.cost.elapsed.as_secs_f64());
                Ok(Step::Routed(event, decision))
            }
            Err(error) => {
                self.metrics
                    .plugin_calls
                    .with_label_values(&[error.kind()])
                    .inc();
                match error.disposition() {
                    Disposition::Final => Ok(Step::Failed(event, error)),
                    Disposition::Park => Ok(Step::Parked(event, error)),
                    Disposition::Stall => Err(Stall::Plugin(error)),
                }
            }
        }
    }

    /// Step 2: commits the batch in one transaction. If the database refuses something
    /// about the data, the messages go one by one, so only the message at fault is
    /// dead-lettered; any other error stalls the batch.
    async fn write(&self, prepared: &[Prepared<'_>]) -> Result<(), Stall> {
        let error = match self.commit(prepared).await {
            Ok(()) => return Ok(()),
            Err(e) if e.is_data_error() => e,
            Err(e) => return Err(e.into()),
        };
        tracing::warn!(error = %error, size = prepared.len(), "the database refused data in this batch; handling its messages one by one");
        for one in prepared {
            match self.commit(std::slice::from_ref(one)).await {
                Ok(()) => {}
                Err(e) if e.is_data_error() => self.dead_letter_alone(one, &e).await?,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Runs one transaction over `prepared` and acknowledges it.
    async fn commit(&self, prepared: &[Prepared<'_>]) -> Result<(), StoreError> {
        let started = Instant::now();
        let mut tx = self.pool.begin().await?;
        let mut outcome = Outcome::default();
        for one in prepared {
            self.write_one(&mut tx, one, &mut outcome).await?;
        }
        tx.commit().await?;
        self.metrics
            .batch_seconds
            .observe(started.elapsed().as_secs_f64());
        self.acknowledge(prepared, outcome);
        Ok(())
    }

    /// After COMMIT: offsets, metrics, wake-ups.
    fn acknowledge(&self, prepared: &[Prepared<'_>], outcome: Outcome) {
        let messages: Vec<&Incoming> = prepared.iter().map(|p| p.message).collect();
        if let Err(e) = self.ingest.store_offsets(&messages) {
            // The outcome is committed; a later batch's offsets cover this one, and at
            // worst the messages are re-read and dropped as duplicates.
            tracing::warn!(error = %e, "storing offsets failed");
        }
        for topic in &outcome.consumed {
            self.metrics
                .events_consumed
                .with_label_values(&[topic])
                .inc();
        }
        self.metrics.events_duplicate.inc_by(outcome.duplicates);
        for kind in &outcome.dead_lettered {
            self.metrics
                .events_dead_lettered
                .with_label_values(&[kind])
                .inc();
        }
        self.metrics
            .notifications_written
            .inc_by(outcome.notifications.len() as u64);
        self.metrics.emails_enqueued.inc_by(outcome.emails);
        self.metrics.emails_skipped.inc_by(outcome.emails_skipped);
        for (tenant, user, seq) in &outcome.notifications {
            self.hub.publish(tenant, user, *seq);
        }
        if outcome.emails > outcome.emails_skipped {
            self.email_wake.notify_one();
        }
    }

    async fn write_one(
        &self,
        tx: &mut sqlx::PgConnection,
        one: &Prepared<'_>,
        outcome: &mut Outcome,
    ) -> Result<(), StoreError> {
        let message = one.message;
        outcome.consumed.push(message.topic.clone());
        let origin = origin(message);
        match &one.step {
            Step::Rejected(rejection) => {
                tracing::warn!(
                    topic = %message.topic, partition = message.partition, offset = message.offset,
                    tenant = rejection.tenant.as_deref().unwrap_or("-"),
                    event_id = rejection.event_id.as_deref().unwrap_or("-"),
                    kind = rejection.kind.as_str(), reason = %rejection.reason,
                    "message dead-lettered"
                );
                self.dead_letter(
                    tx,
                    DeadLetter {
                        message,
                        tenant: rejection.tenant.as_deref(),
                        event_id: rejection.event_id.as_deref(),
                        kind: rejection.kind.as_str().into(),
                        reason: rejection.reason.as_str().into(),
                        plugin: None,
                    },
                    outcome,
                )
                .await
            }
            Step::Duplicate => {
                outcome.duplicates += 1;
                Ok(())
            }
            Step::Parked(event, error) => {
                tracing::warn!(
                    tenant = %event.tenant, event_id = %event.id, error = %error,
                    "tenant's routing plugin unavailable; event set aside (not claimed)"
                );
                self.dead_letter(tx, DeadLetter::plugin(message, event, error), outcome)
                    .await
            }
            Step::Routed(event, decision) => {
                if claim(tx, event, origin, outcome).await? {
                    self.write_decision(tx, event, decision, outcome).await?;
                }
                Ok(())
            }
            Step::Failed(event, error) => {
                if claim(tx, event, origin, outcome).await? {
                    tracing::warn!(
                        tenant = %event.tenant, event_id = %event.id, kind = error.kind(),
                        error = %error, "routing failed; event dead-lettered"
                    );
                    self.dead_letter(tx, DeadLetter::plugin(message, event, error), outcome)
                        .await?;
                    store::set_outcome(tx, &event.tenant, &event.id, true, error.plugin(), None)
                        .await?;
                }
                Ok(())
            }
        }
    }

    async fn write_decision(
        &self,
        tx: &mut sqlx::PgConnection,
        event: &Event,
        decision: &Decision,
        outcome: &mut Outcome,
    ) -> Result<(), StoreError> {
        tracing::info!(
            tenant = %event.tenant, event_id = %event.id, event_type = %event.event_type,
            plugin = %decision.plugin, deliveries = decision.deliveries.len(),
            fuel = decision.cost.fuel, micros = decision.cost.elapsed.as_micros() as u64,
            "event routed"
        );
        for delivery in &decision.deliveries {
            self.write_delivery(tx, event, delivery, outcome).await?;
        }
        store::set_outcome(
            tx,
            &event.tenant,
            &event.id,
            false,
            Some(&decision.plugin),
            Some(&decision.digest),
        )
        .await
    }

    async fn write_delivery(
        &self,
        tx: &mut sqlx::PgConnection,
        event: &Event,
        delivery: &Delivery,
        outcome: &mut Outcome,
    ) -> Result<(), StoreError> {
        let notification = match delivery {
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
            Delivery::Email {
                to,
                user_id,
                template,
                data,
            } => {
                let message_id = format!("<{}@{}>", uuid::Uuid::new_v4(), self.message_id_domain);
                let skip = self.too_old_for_email(event);
                store::enqueue_email(
                    tx,
                    &NewEmail {
                        tenant: &event.tenant,
                        event_id: &event.id,
                        user_id: user_id.as_deref(),
                        recipient: to,
                        template,
                        data,
                        message_id: &message_id,
                        skip: skip.as_deref(),
                    },
                )
                .await?;
                outcome.emails += 1;
                if skip.is_some() {
                    tracing::info!(tenant = %event.tenant, event_id = %event.id, event_time = %event.time, "email recorded but not sent: the event is too old");
                    outcome.emails_skipped += 1;
                }
                return Ok(());
            }
        };
        let seq = store::insert_notification(tx, &notification).await?;
        outcome
            .notifications
            .push((event.tenant.clone(), notification.user_id.to_owned(), seq));
        Ok(())
    }

    /// `Some(reason)` when the event is older than `email.max_event_age_secs`: a new
    /// consumer group reading an old topic must not mail customers about old orders.
    fn too_old_for_email(&self, event: &Event) -> Option<String> {
        let limit = self.email.max_event_age_secs;
        let age = (chrono::Utc::now() - event.time).num_seconds();
        (limit > 0 && age > limit as i64).then(|| {
            format!(
                "not sent: the event is {age} s old, more than email.max_event_age_secs ({limit})"
            )
        })
    }

    async fn dead_letter(
        &self,
        tx: &mut sqlx::PgConnection,
        d: DeadLetter<'_>,
        outcome: &mut Outcome,
    ) -> Result<(), StoreError> {
        let stored = store::insert_dead_letter(
            tx,
            &NewDeadLetter {
                tenant: d.tenant,
                event_id: d.event_id,
                origin: origin(d.message),
                key: d.message.key.as_deref(),
                payload: d.message.payload.as_deref().unwrap_or_default(),
                error_kind: &d.kind,
                reason: &d.reason,
                plugin: d.plugin,
            },
        )
        .await?;
        if stored {
            outcome.dead_lettered.push(d.kind.into_owned());
        }
        Ok(())
    }

    /// Dead-letters a single message whose data the database refused, in a transaction of
    /// its own, with its tenant and event id when it decoded. The event is not claimed: a
    /// corrected event republished under the same id is handled.
    async fn dead_letter_alone(
        &self,
        one: &Prepared<'_>,
        error: &StoreError,
    ) -> Result<(), StoreError> {
        let event = match &one.step {
            Step::Routed(e, _) | Step::Failed(e, _) | Step::Parked(e, _) => Some(e),
            Step::Rejected(_) | Step::Duplicate => None,
        };
        tracing::warn!(
            tenant = event.map_or("-", |e| e.tenant.as_str()),
            event_id = event.map_or("-", |e| e.id.as_str()),
            error = %error, "the database refused this message's data; dead-lettered"
        );
        let reason = format!("the database refused this message's data: {error}");
        let mut tx = self.pool.begin().await?;
        let mut outcome = Outcome::default();
        outcome.consumed.push(one.message.topic.clone());
        self.dead_letter(
            &mut tx,
            DeadLetter {
                message: one.message,
                tenant: event.map(|e| e.tenant.as_str()),
                event_id: event.map(|e| e.id.as_str()),
                kind: "store".into(),
                reason: reason.into(),
                plugin: None,
            },
            &mut outcome,
        )
        .await?;
        tx.commit().await?;
        self.acknowledge(std::slice::from_ref(one), outcome);
        Ok(())
    }
}

/// A dead letter about to be written.
struct DeadLetter<'a> {
    message: &'a Incoming,
    tenant: Option<&'a str>,
    event_id: Option<&'a str>,
    kind: Cow<'a, str>,
    reason: Cow<'a, str>,
    plugin: Option<&'a str>,
}

impl<'a> DeadLetter<'a> {
    fn plugin(message: &'a Incoming, event: &'a Event, error: &'a PluginError) -> Self {
        Self {
            message,
            tenant: Some(&event.tenant),
            event_id: Some(&event.id),
            kind: format!("plugin_{}", error.kind()).into(),
            reason: error.to_string().into(),
            plugin: error.plugin(),
        }
    }
}

/// Claims the event for this transaction; `false` (and counted) when it is a duplicate.
async fn claim(
    tx: &mut sqlx::PgConnection,
    event: &Event,
    origin: Origin<'_>,
    outcome: &mut Outcome,
) -> Result<bool, StoreError> {
    let claimed =
        store::claim_event(tx, &event.tenant, &event.id, &event.event_type, origin).await?;
    if !claimed {
        tracing::debug!(tenant = %event.tenant, event_id = %event.id, "duplicate event skipped");
        outcome.duplicates += 1;
    }
    Ok(claimed)
}

fn origin(message: &Incoming) -> Origin<'_> {
    Origin {
        topic: &message.topic,
        partition: message.partition,
        offset: message.offset,
    }
}
