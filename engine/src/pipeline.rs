//! The orchestrator: Kafka messages in, one outcome per event out, tenant by tenant.
//!
//! [`Pipeline::run`] starts the committers and the dispatcher. The dispatcher reads
//! messages, decodes each once, and hands it to its tenant's *lane* (undecodable messages
//! share one). Lanes run side by side, each handling its own messages in order, so a tenant
//! whose plugin is slow delays only itself; the offset tracker (`ingest::offsets`) stores
//! each partition's lowest unfinished offset, whatever order lanes finish in. A lane that
//! is full *spills* its tenant's next messages to PostgreSQL (`spill`) and drains them in
//! order later, so the other tenants on its partitions pass it; only at the spill's bound
//! do its partitions pause (their messages wait in Kafka). Each tenant has a routing time
//! budget (`budget`), so one tenant cannot take the cores the others need, and idle lanes
//! are freed (at most `kafka.max_lanes` live), so made-up tenant ids cost no memory.
//!
//! A lane's batch goes through two steps, the way mini-redis's handlers read:
//!
//! 1. `Pipeline::prepare`, outside any transaction: skip events already processed and
//!    route the rest through the tenant's plugin. Plugin time never holds a database lock.
//! 2. `Pipeline::commit`, one short transaction, run by a committer for the batches of
//!    every lane waiting at that moment (`group`): claim `(tenant, event id)` (already
//!    claimed → duplicate), write notifications, outbox rows and dead letters. COMMIT, and
//!    only then mark the messages finished (offsets), wake SSE streams and the email worker.
//!
//! What the database or the platform does wrong is never blamed on a message: such a batch
//! *stalls* (waits, reports not ready, tries again) until it commits. Only an error about a
//! message's own data ([`StoreError::is_data_error`]) dead-letters that message, alone. A
//! crash anywhere before COMMIT leaves no trace and the messages are re-read; after COMMIT
//! but before the offset commit they are re-read too, and the claim turns them into
//! duplicates. Exactly one outcome per event.
//!
//! The files, in the order a message meets them:
//!
//! - `dispatch`: the dispatcher, the lanes' queues (started, and freed when idle) and the
//!   messages held for a full lane whose spill is full too;
//! - `lane`: a lane's task, step 1 (`prepare`, routing within `budget`), stalls and retries;
//! - `spill`: a full lane's backlog, written to PostgreSQL by the spiller and drained by the
//!   lane (a drained row goes in the transaction that commits its outcome);
//! - `group`: the group-commit queue between lanes and committers;
//! - `commit`: the committers and step 2, the transaction cut into named phases;
//! - `rows`: a batch's decisions turned into the store's rows (claims, notifications,
//!   outbox rows);
//! - `dead_letter`: dead letters written, and replayed dead letters' tokens checked before
//!   routing and accepted in the transaction;
//! - `effects`: what a committed batch did, applied after COMMIT (offsets, metrics, hub,
//!   email worker).
//!
//! This file holds the [`Pipeline`] itself and the nouns lanes hand to committers.

mod budget;
mod commit;
mod dead_letter;
mod dispatch;
mod effects;
#[cfg(test)]
mod fixtures;
mod group;
mod lane;
mod rows;
mod spill;

use std::sync::Arc;

use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::cluster::Presence;
use crate::config::{EmailConfig, KafkaConfig};
use crate::health::Health;
use crate::hub::Hub;
use crate::ingest::envelope::Rejection;
use crate::ingest::{Incoming, Ingest};
use crate::model::Event;
use crate::plugin::{Decision, PluginError, PluginHost};
use crate::store::StoreError;
use crate::telemetry::Metrics;

pub struct Pipeline {
    pub ingest: Arc<Ingest>,
    pub pool: PgPool,
    pub plugins: Arc<PluginHost>,
    pub hub: Arc<Hub>,
    /// Who listens on other instances: their rows travel in the wake-up.
    pub presence: Arc<Presence>,
    pub metrics: Metrics,
    pub health: Arc<Health>,
    /// Woken after a commit that wrote outbox rows.
    pub email_wake: Arc<Notify>,
    pub kafka: KafkaConfig,
    pub email: EmailConfig,
    /// Right-hand side of generated `Message-ID`s.
    pub message_id_domain: String,
}

/// Where lanes send their routed batches, and how each hears its batch's fate.
type Commits = group::Commits<Prepared, Arc<Stall>>;

/// One message of a batch, ready to be written: what a lane hands to a committer.
struct Prepared {
    /// Shared with its lane's batch, which keeps it for a retry until it is committed.
    message: Arc<Incoming>,
    step: Step,
    /// The replay token found valid before routing (see `dead_letter::check_replays`): the
    /// transaction accepts it, once.
    replay: Option<uuid::Uuid>,
    /// Its row in the spill, when it was drained from there: the row goes in the
    /// transaction, and its offset, finished when it was spilled, is not touched again.
    spilled: Option<i64>,
}

/// What step 1 made of a message. The claim, in step 2, may still turn `Routed` and
/// `Failed` into duplicates.
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

impl Step {
    /// The event, when the message decoded into one and it was not skipped before routing.
    fn event(&self) -> Option<&Event> {
        match self {
            Step::Routed(e, _) | Step::Failed(e, _) | Step::Parked(e, _) => Some(e),
            Step::Rejected(_) | Step::Duplicate => None,
        }
    }
}

/// Why a batch cannot be committed now. Nothing about its messages: it waits.
#[derive(Debug, thiserror::Error)]
enum Stall {
    #[error("{}", .0.with_cause())]
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

impl Pipeline {
    /// Dispatches messages to tenant lanes until `shutdown` fires; each lane finishes the
    /// batch in hand. Returns early only if a lane died (a bug): the engine then stops.
    pub async fn run(self, shutdown: CancellationToken) {
        let pipeline = Arc::new(self);
        let (commits, mut committers) = pipeline.start_committers();
        let mut dispatcher = dispatch::Dispatcher::new(pipeline.clone(), commits, &shutdown);
        dispatcher.run().await;
        // Lanes watch the same token: each finishes its batch in hand, the rest of its
        // queue is re-read by whoever owns the partitions next.
        shutdown.cancel();
        // The lanes gone and the dispatcher's sender dropped, the committers finish what is
        // queued and stop.
        dispatcher.stop().await;
        while committers.join_next().await.is_some() {}
        // Offsets of every committed batch are stored; make them durable before leaving so
        // the partitions' next owner does not re-read finished work.
        pipeline.ingest.commit_stored();
        tracing::info!("pipeline stopped");
    }
}
