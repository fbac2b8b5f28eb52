//! The orchestrator: one batch of Kafka messages, one PostgreSQL transaction.
//!
//! For every message of a batch, inside one transaction: decode (bad input → dead letter),
//! claim `(tenant, event id)` (already claimed → duplicate, skip), route through the
//! tenant's plugin (failure → dead letter), write notifications and outbox rows. Then
//! COMMIT, and only then store the Kafka offsets and wake the SSE streams and the email
//! worker. A crash anywhere before COMMIT leaves no trace and the messages are re-read; a
//! crash after COMMIT but before the offset commit re-reads them too, and the claim turns
//! them into duplicates. Exactly one outcome per event.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::KafkaConfig;
use crate::hub::Hub;
use crate::ingest::envelope::{self, Event};
use crate::ingest::{Incoming, Ingest};
use crate::plugin::{Delivery, NOTIFICATION_EVENT, PluginHost};
use crate::store::{self, NewDeadLetter, NewEmail, NewNotification, Origin, StoreError};
use crate::telemetry::Metrics;

pub struct Pipeline {
    pub ingest: Arc<Ingest>,
    pub pool: PgPool,
    pub plugins: Arc<PluginHost>,
    pub hub: Arc<Hub>,
    pub metrics: Metrics,
    /// Woken after a commit that wrote outbox rows.
    pub email_wake: Arc<Notify>,
    pub kafka: KafkaConfig,
    /// Right-hand side of generated `Message-ID`s.
    pub message_id_domain: String,
}

/// What a committed batch did, applied to metrics and the hub after COMMIT.
#[derive(Default)]
struct Outcome {
    consumed: Vec<String>,
    duplicates: u64,
    dead_lettered: Vec<String>,
    notifications: Vec<(String, String, i64)>,
    emails: u64,
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
    /// retries (the batch is then not acknowledged and will be re-read).
    async fn handle_batch(&self, batch: &[Incoming], shutdown: &CancellationToken) -> bool {
        let mut delay = Duration::from_millis(100);
        loop {
            match self.commit(batch).await {
                Ok(()) => return true,
                Err(e) if is_transient(&e) => {
                    tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "batch failed; retrying");
                }
                Err(e) => {
                    // Something in the batch is unacceptable to the database. Take the
                    // messages one by one, so one poisoned message cannot stall the rest.
                    tracing::warn!(error = %e, size = batch.len(), "batch rejected; handling its messages one by one");
                    for message in batch {
                        if !self.handle_single(message, shutdown).await {
                            return false;
                        }
                    }
                    return true;
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return false,
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }

    async fn handle_single(&self, message: &Incoming, shutdown: &CancellationToken) -> bool {
        let mut delay = Duration::from_millis(100);
        loop {
            let error = match self.commit(std::slice::from_ref(message)).await {
                Ok(()) => return true,
                Err(e) => e,
            };
            if !is_transient(&error) {
                match self.dead_letter_alone(message, &error).await {
                    Ok(()) => return true,
                    Err(e) => {
                        tracing::warn!(error = %e, "could not dead-letter a rejected message")
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return false,
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }

    /// Runs one transaction over `batch` and acknowledges it.
    async fn commit(&self, batch: &[Incoming]) -> Result<(), StoreError> {
        let started = Instant::now();
        let mut tx = self.pool.begin().await?;
        let mut outcome = Outcome::default();
        for message in batch {
            self.handle_message(&mut tx, message, &mut outcome).await?;
        }
        tx.commit().await?;
        self.metrics
            .batch_seconds
            .observe(started.elapsed().as_secs_f64());
        self.acknowledge(batch, outcome);
        Ok(())
    }

    /// After COMMIT: offsets, metrics, wake-ups.
    fn acknowledge(&self, batch: &[Incoming], outcome: Outcome) {
        if let Err(e) = self.ingest.store_offsets(batch) {
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
        for (tenant, user, seq) in &outcome.notifications {
            self.hub.publish(tenant, user, *seq);
        }
        if outcome.emails > 0 {
            self.email_wake.notify_one();
        }
    }

    async fn handle_message(
        &self,
        tx: &mut sqlx::PgConnection,
        message: &Incoming,
        outcome: &mut Outcome,
    ) -> Result<(), StoreError> {
        outcome.consumed.push(message.topic.clone());
        let origin = Origin {
            topic: &message.topic,
            partition: message.partition,
            offset: message.offset,
        };
        let event = match envelope::decode(message.payload.as_deref(), self.kafka.max_message_bytes)
        {
            Ok(event) => event,
            Err(rejection) => {
                tracing::warn!(
                    topic = %message.topic, partition = message.partition, offset = message.offset,
                    tenant = rejection.tenant.as_deref().unwrap_or("-"),
                    event_id = rejection.event_id.as_deref().unwrap_or("-"),
                    kind = rejection.kind.as_str(), reason = %rejection.reason,
                    "message dead-lettered"
                );
                let stored = store::insert_dead_letter(
                    tx,
                    &NewDeadLetter {
                        tenant: rejection.tenant.as_deref(),
                        event_id: rejection.event_id.as_deref(),
                        origin,
                        key: message.key.as_deref(),
                        payload: message.payload.as_deref().unwrap_or_default(),
                        error_kind: rejection.kind.as_str(),
                        reason: &rejection.reason,
                        plugin: None,
                    },
                )
                .await?;
                if stored {
                    outcome.dead_lettered.push(rejection.kind.as_str().into());
                }
                return Ok(());
            }
        };
        if !store::claim_event(tx, &event.tenant, &event.id, &event.event_type, origin).await? {
            tracing::debug!(tenant = %event.tenant, event_id = %event.id, "duplicate event skipped");
            outcome.duplicates += 1;
            return Ok(());
        }
        match self.plugins.route(&event).await {
            Ok(decision) => {
                self.metrics.plugin_calls.with_label_values(&["ok"]).inc();
                self.metrics
                    .plugin_call_seconds
                    .observe(decision.cost.elapsed.as_secs_f64());
                tracing::info!(
                    tenant = %event.tenant, event_id = %event.id, event_type = %event.event_type,
                    plugin = %decision.plugin, deliveries = decision.deliveries.len(),
                    fuel = decision.cost.fuel, micros = decision.cost.elapsed.as_micros() as u64,
                    "event routed"
                );
                for delivery in &decision.deliveries {
                    self.write_delivery(tx, &event, delivery, outcome).await?;
                }
                store::set_outcome(
                    tx,
                    &event.tenant,
                    &event.id,
                    false,
                    Some(&decision.plugin),
                    Some(&decision.digest),
                )
                .await?;
            }
            Err(error) => {
                let kind = error.kind();
                self.metrics.plugin_calls.with_label_values(&[kind]).inc();
                tracing::warn!(
                    tenant = %event.tenant, event_id = %event.id, kind, error = %error,
                    "routing failed; event dead-lettered"
                );
                let reason = error.to_string();
                let error_kind = format!("plugin_{kind}");
                let stored = store::insert_dead_letter(
                    tx,
                    &NewDeadLetter {
                        tenant: Some(&event.tenant),
                        event_id: Some(&event.id),
                        origin,
                        key: message.key.as_deref(),
                        payload: message.payload.as_deref().unwrap_or_default(),
                        error_kind: &error_kind,
                        reason: &reason,
                        plugin: error.plugin(),
                    },
                )
                .await?;
                if stored {
                    outcome.dead_lettered.push(error_kind);
                }
                store::set_outcome(tx, &event.tenant, &event.id, true, error.plugin(), None)
                    .await?;
            }
        }
        Ok(())
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
                    },
                )
                .await?;
                outcome.emails += 1;
                return Ok(());
            }
        };
        let seq = store::insert_notification(tx, &notification).await?;
        outcome
            .notifications
            .push((event.tenant.clone(), notification.user_id.to_owned(), seq));
        Ok(())
    }

    /// Dead-letters a single message the database refused, in a transaction of its own.
    async fn dead_letter_alone(
        &self,
        message: &Incoming,
        error: &StoreError,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        let reason = format!("the database rejected this message's outcome: {error}");
        let stored = store::insert_dead_letter(
            &mut tx,
            &NewDeadLetter {
                tenant: None,
                event_id: None,
                origin: Origin {
                    topic: &message.topic,
                    partition: message.partition,
                    offset: message.offset,
                },
                key: message.key.as_deref(),
                payload: message.payload.as_deref().unwrap_or_default(),
                error_kind: "store",
                reason: &reason,
                plugin: None,
            },
        )
        .await?;
        tx.commit().await?;
        let outcome = Outcome {
            consumed: vec![message.topic.clone()],
            dead_lettered: if stored { vec!["store".into()] } else { vec![] },
            ..Outcome::default()
        };
        self.acknowledge(std::slice::from_ref(message), outcome);
        Ok(())
    }
}

/// Connection trouble is worth waiting out; anything else is about the data.
fn is_transient(e: &StoreError) -> bool {
    match e {
        StoreError::Sqlx(sqlx::Error::Database(db)) => {
            // Class 40 (serialization failure, deadlock), 53 (insufficient resources),
            // 57 (operator intervention, e.g. admin shutdown), 08 (connection exception).
            db.code()
                .is_some_and(|c| ["40", "53", "57", "08"].iter().any(|p| c.starts_with(p)))
        }
        StoreError::Sqlx(
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed,
        ) => true,
        StoreError::Sqlx(_) | StoreError::Migrate(_) => false,
    }
}
