//! The orchestrator: Kafka messages in, one outcome per event out, tenant by tenant.
//!
//! [`Pipeline::run`] is the dispatcher: it reads messages, decodes each once, and hands it
//! to its tenant's *lane* (undecodable messages share one). Lanes run side by side, each
//! handling its own messages in order, so a tenant whose plugin is slow delays only itself;
//! the offset tracker (`ingest::offsets`) stores each partition's lowest unfinished offset,
//! whatever order lanes finish in. A lane that is full pauses the partitions carrying its
//! next messages (they wait in Kafka) until it catches up, and each tenant has a routing
//! time budget (`budget`), so one tenant cannot take the cores the others need.
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

mod budget;
mod group;

use std::borrow::Cow;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::PgPool;
use tokio::sync::mpsc::{self, error::TrySendError};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::cluster::Presence;
use crate::config::{EmailConfig, KafkaConfig};
use crate::health::Health;
use crate::hub::{self, Hub};
use crate::ingest::envelope::{self, Rejection};
use crate::ingest::trust::TenantTrust;
use crate::ingest::{Incoming, Ingest};
use crate::model::{Event, NOTIFICATION_EVENT, StoredNotification};
use crate::plugin::{Decision, Delivery, Disposition, PluginError, PluginHost};
use crate::store::{self, Claim, NewDeadLetter, NewEmail, NewNotification, Origin, StoreError};
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

/// Longest wait between two tries of a stalled batch.
const MAX_STALL_DELAY: Duration = Duration::from_secs(30);
/// Routing time after which a lane commits what it has routed so far.
const MAX_ROUTING_PER_COMMIT: Duration = Duration::from_millis(250);
/// How often messages held back for a full lane are offered to it again.
const HELD_RETRY: Duration = Duration::from_millis(20);
/// The lane of messages that did not decode (they have no trustworthy tenant).
const REJECTS_LANE: &str = "";
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

/// Where lanes send their routed batches, and how each hears its batch's fate.
type Commits = group::Commits<Prepared, Arc<Stall>>;

/// A message on its way to a lane, decoded once by the dispatcher.
struct Work {
    message: Arc<Incoming>,
    decoded: Result<Event, Rejection>,
    /// Its bytes' share of its lane's `kafka.lane_max_bytes`, given back when it is dropped
    /// (once handled).
    admitted: Option<OwnedSemaphorePermit>,
}

impl Work {
    fn lane(&self) -> &str {
        match &self.decoded {
            Ok(event) => &event.tenant,
            Err(_) => REJECTS_LANE,
        }
    }
}

/// One message of a batch, ready to be written.
struct Prepared {
    /// Shared with its lane's batch, which keeps it for a retry until it is committed.
    message: Arc<Incoming>,
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

/// A notification the batch wrote, for its user's streams.
struct Written {
    tenant: String,
    user: String,
    seq: i64,
    /// The row and its size, when the user listens on this instance and it is small enough
    /// for the hub to keep.
    here: Option<(Arc<StoredNotification>, usize)>,
    /// The row, when the user listens on another instance and it is small enough to travel
    /// in the wake-up.
    there: Option<Arc<StoredNotification>>,
}

/// What a committed batch did, applied to metrics and the hub after COMMIT.
#[derive(Default)]
struct Outcome {
    consumed: Vec<String>,
    duplicates: u64,
    dead_lettered: Vec<String>,
    notifications: Vec<Written>,
    emails: u64,
    emails_skipped: u64,
}

impl Pipeline {
    /// Dispatches messages to tenant lanes until `shutdown` fires; each lane finishes the
    /// batch in hand. Returns early only if a lane died (a bug): the engine then stops.
    pub async fn run(self, shutdown: CancellationToken) {
        let pipeline = Arc::new(self);
        let large_from = (pipeline.kafka.batch_max / LARGE_BATCH_DIVISOR).max(2);
        // Each lane has at most one batch waiting: the queues' bound is only a backstop.
        let (commits, small, large) = group::Commits::new(large_from, 1024);
        let (small, large) = (Arc::new(small), Arc::new(large));
        let mut committers = JoinSet::new();
        for _ in 0..SMALL_COMMITTERS {
            committers.spawn(pipeline.clone().committer(small.clone()));
        }
        for _ in 0..LARGE_COMMITTERS {
            committers.spawn(pipeline.clone().committer(large.clone()));
        }
        let mut dispatcher = Dispatcher {
            trust: TenantTrust::new(&pipeline.kafka),
            pipeline: pipeline.clone(),
            commits,
            shutdown: shutdown.clone(),
            lanes: HashMap::new(),
            running: JoinSet::new(),
            held: HashMap::new(),
        };
        // One timer across iterations: a `sleep` made anew in the loop would be reset by
        // every arriving message, and held messages would starve under steady traffic.
        let mut held_retry = tokio::time::interval(HELD_RETRY);
        held_retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                Some(ended) = dispatcher.running.join_next() => {
                    // Lanes end on their own only on shutdown (handled above) or a panic.
                    if !shutdown.is_cancelled() {
                        tracing::error!(panicked = ended.is_err(), "a pipeline lane stopped; stopping the pipeline");
                    }
                    break;
                }
                (topic, partition) = pipeline.ingest.revoked() => dispatcher.revoked(&topic, partition),
                // Before `recv`: under steady traffic a message is always ready, and this
                // `biased` select would never get to the held messages.
                _ = held_retry.tick(), if !dispatcher.held.is_empty() => dispatcher.offer_held(),
                message = pipeline.ingest.recv() => dispatcher.dispatch(message),
            }
        }
        // Lanes watch the same token: each finishes its batch in hand, the rest of its
        // queue is re-read by whoever owns the partitions next.
        shutdown.cancel();
        while dispatcher.running.join_next().await.is_some() {}
        // The lanes are gone; with the dispatcher's sender dropped, the committers finish
        // what is queued and stop.
        drop(dispatcher);
        while committers.join_next().await.is_some() {}
        // Offsets of every committed batch are stored; make them durable before leaving so
        // the partitions' next owner does not re-read finished work.
        pipeline.ingest.commit_stored();
        tracing::info!("pipeline stopped");
    }

    /// One tenant's lane: takes what is queued (up to `kafka.batch_max`, waiting at most
    /// `kafka.batch_linger_ms` for more) and handles it as one batch, in order.
    async fn lane(
        self: Arc<Self>,
        tenant: String,
        mut queue: mpsc::Receiver<Work>,
        commits: Commits,
        shutdown: CancellationToken,
    ) {
        let linger = Duration::from_millis(self.kafka.batch_linger_ms);
        let mut budget = budget::Budget::new(
            Duration::from_millis(self.plugins.tenant_budget_ms_per_sec()),
            Instant::now(),
        );
        loop {
            let first = tokio::select! {
                _ = shutdown.cancelled() => return,
                work = queue.recv() => match work {
                    Some(work) => work,
                    None => return,
                },
            };
            let mut batch = vec![first];
            let deadline = tokio::time::Instant::now() + linger;
            while batch.len() < self.kafka.batch_max {
                match tokio::time::timeout_at(deadline, queue.recv()).await {
                    Ok(Some(work)) => batch.push(work),
                    _ => break,
                }
            }
            if !self
                .handle_batch(&tenant, &batch, &mut budget, &commits, &shutdown)
                .await
            {
                return;
            }
        }
    }

    /// Handles a lane's batch until all of it is committed, in order: a prefix per
    /// transaction (see [`MAX_ROUTING_PER_COMMIT`]). Returns false if shutdown interrupted
    /// the waiting (what is not committed then is re-read).
    async fn handle_batch(
        &self,
        lane: &str,
        batch: &[Work],
        budget: &mut budget::Budget,
        commits: &Commits,
        shutdown: &CancellationToken,
    ) -> bool {
        let mut rest = batch;
        while !rest.is_empty() {
            if shutdown.is_cancelled() {
                // The prefix in hand is committed; the rest is re-read after the restart.
                return false;
            }
            match self
                .commit_prefix(lane, rest, budget, commits, shutdown)
                .await
            {
                Some(done) => rest = &rest[done..],
                None => return false,
            }
        }
        true
    }

    /// Commits a prefix of `batch` (through a committer), stalling (waiting and trying
    /// again) while the database or the platform fails. Returns how many messages it
    /// committed, or `None` on shutdown (or if the committers are gone, which only a panic
    /// does: the lane then stops, and the engine with it).
    async fn commit_prefix(
        &self,
        lane: &str,
        batch: &[Work],
        budget: &mut budget::Budget,
        commits: &Commits,
        shutdown: &CancellationToken,
    ) -> Option<usize> {
        let mut delay = Duration::from_millis(100);
        loop {
            let preparing = Instant::now();
            let stall = match self.prepare(batch, budget, shutdown).await {
                Ok(prepared) => {
                    let (writing, routed) = (Instant::now(), prepared.len());
                    let (done, fate) = oneshot::channel();
                    let job = group::Job {
                        items: prepared,
                        done,
                    };
                    commits.send(job).await.ok()?;
                    match fate.await.ok()? {
                        Ok(()) => {
                            self.health.set_stall(lane, None);
                            self.observe_stages(&batch[..routed], preparing, writing);
                            return Some(routed);
                        }
                        Err(stall) => stall,
                    }
                }
                Err(stall) => Arc::new(stall),
            };
            if shutdown.is_cancelled() {
                return None;
            }
            self.metrics
                .pipeline_stalls
                .with_label_values(&[stall.cause()])
                .inc();
            tracing::warn!(
                lane, cause = stall.cause(), error = %stall, size = batch.len(),
                retry_in_ms = delay.as_millis() as u64,
                "batch stalled: the database or the platform failed, not the data; waiting"
            );
            self.health
                .set_stall(lane, Some(format!("{}: {stall}", stall.cause())));
            tokio::select! {
                _ = shutdown.cancelled() => return None,
                _ = tokio::time::sleep(delay) => {}
            }
            if let Stall::Plugin(_) = *stall {
                // An operator may have put the missing plugin in place meanwhile.
                self.plugins.reload_after_stall().await;
            }
            delay = (delay * 2).min(MAX_STALL_DELAY);
        }
    }

    /// `notify_stage_seconds` of a committed prefix: how long each event waited in its lane,
    /// and its batch's routing and commit (the wait for a committer, and the transaction).
    fn observe_stages(&self, committed: &[Work], preparing: Instant, writing: Instant) {
        let (queue, route, commit) = (
            self.metrics.stage("queue"),
            self.metrics.stage("route"),
            self.metrics.stage("commit"),
        );
        let (routing, committing) = (writing - preparing, writing.elapsed());
        for one in committed {
            queue.observe(
                preparing
                    .saturating_duration_since(one.message.received)
                    .as_secs_f64(),
            );
            route.observe(routing.as_secs_f64());
            commit.observe(committing.as_secs_f64());
        }
    }

    /// Step 1, outside any transaction: skip known duplicates, route the rest, within the
    /// tenant's routing-time budget. Stops early, returning a prefix, once routing has taken
    /// [`MAX_ROUTING_PER_COMMIT`]: a slow tenant's events are committed (and reach their
    /// users) a few at a time instead of all at the end of a long batch.
    async fn prepare(
        &self,
        batch: &[Work],
        budget: &mut budget::Budget,
        shutdown: &CancellationToken,
    ) -> Result<Vec<Prepared>, Stall> {
        let keys: Vec<(&str, &str)> = batch
            .iter()
            .filter_map(|w| w.decoded.as_ref().ok())
            .map(|e| (e.tenant.as_str(), e.id.as_str()))
            .collect();
        let seen = store::already_processed(&self.pool, &keys).await?;
        let mut prepared = Vec::with_capacity(batch.len());
        let routing_since = Instant::now();
        for work in batch {
            if routing_since.elapsed() >= MAX_ROUTING_PER_COMMIT {
                break;
            }
            let step = match &work.decoded {
                Err(rejection) => Step::Rejected(rejection.clone()),
                // A replayed dead letter was claimed when it was dead-lettered: the
                // transaction decides whether its replay token still counts.
                Ok(event)
                    if work.message.replay_token().is_none()
                        && seen.contains(&(event.tenant.clone(), event.id.clone())) =>
                {
                    Step::Duplicate
                }
                Ok(event) => {
                    let started = Instant::now();
                    let step = self.route(event.clone()).await?;
                    if let Some(pause) = budget.spend(started.elapsed(), Instant::now()) {
                        tracing::debug!(tenant = %event.tenant, pause_ms = pause.as_millis() as u64, "tenant over its routing budget; pausing its lane");
                        self.metrics.tenant_budget_pauses.inc();
                        tokio::select! {
                            _ = shutdown.cancelled() => {}
                            _ = tokio::time::sleep(pause) => {}
                        }
                    }
                    step
                }
            };
            prepared.push(Prepared {
                message: work.message.clone(),
                step,
            });
        }
        Ok(prepared)
    }

    async fn route(&self, event: Event) -> Result<Step, Stall> {
        match self.plugins.route(&event).await {
            Ok(decision) => {
                self.metrics.plugin_call(&event.tenant, "routing", "ok");
                self.metrics
                    .plugin_call_seconds
                    .observe(decision.cost.elapsed.as_secs_f64());
                Ok(Step::Routed(event, decision))
            }
            Err(error) => {
                self.metrics
                    .plugin_call(&event.tenant, "routing", error.kind());
                match error.disposition() {
                    Disposition::Final => Ok(Step::Failed(event, error)),
                    Disposition::Park => Ok(Step::Parked(event, error)),
                    Disposition::Stall => Err(Stall::Plugin(error)),
                }
            }
        }
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
                    tracing::debug!(error = %e, batches = ends.len(), "the database refused data in a group; writing its batches one by one");
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

    /// Step 2: commits the batch in one transaction. If the database refuses something
    /// about the data, the messages go one by one, so only the message at fault is
    /// dead-lettered; any other error stalls the batch.
    async fn write(&self, prepared: &[Prepared]) -> Result<(), Stall> {
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

    /// Runs one transaction over `prepared` and acknowledges it. A handful of statements
    /// whatever the batch's size: one claims every event, one numbers and stores every
    /// user's new notifications, one fills the outbox, a few NOTIFY the wake-ups
    /// (dead letters and replays, rare, are a statement each).
    async fn commit(&self, prepared: &[Prepared]) -> Result<(), StoreError> {
        let started = Instant::now();
        let mut tx = self.pool.begin().await?;
        let mut outcome = Outcome::default();
        for one in prepared {
            outcome.consumed.push(one.message.topic.clone());
            if let Some(token) = one.message.replay_token() {
                replay(&mut tx, one, token).await?;
            }
        }

        // Every event that reached a decision is claimed, once per batch: a second copy of
        // an event in the same batch is a duplicate like any other.
        let mut in_batch = HashSet::new();
        let mut claims = Vec::new();
        let mut claim_of = Vec::with_capacity(prepared.len());
        for one in prepared {
            let claim = match &one.step {
                Step::Routed(event, decision) => Some(Claim {
                    kind: store::ClaimKind::Routed,
                    plugin: Some(&decision.plugin),
                    plugin_digest: Some(&decision.digest),
                    ..claim(event, &one.message)
                }),
                Step::Failed(event, error) => Some(Claim {
                    kind: store::ClaimKind::DeadLettered,
                    plugin: error.plugin(),
                    plugin_digest: None,
                    ..claim(event, &one.message)
                }),
                Step::Rejected(_) | Step::Duplicate | Step::Parked(..) => None,
            };
            claim_of.push(match claim {
                Some(c) if in_batch.insert((c.tenant, c.event_id)) => {
                    claims.push(c);
                    Some(claims.len() - 1)
                }
                _ => None,
            });
        }
        let claimed = store::claim_events(&mut tx, &claims).await?;

        let mut routed = Vec::new();
        for (one, claim) in prepared.iter().zip(&claim_of) {
            let won = claim.is_some_and(|i| claimed[i]);
            match &one.step {
                Step::Rejected(rejection) => {
                    tracing::warn!(
                        topic = %one.message.topic, partition = one.message.partition,
                        offset = one.message.offset,
                        tenant = rejection.tenant.as_deref().unwrap_or("-"),
                        event_id = rejection.event_id.as_deref().unwrap_or("-"),
                        kind = rejection.kind.as_str(), reason = %rejection.reason,
                        "message dead-lettered"
                    );
                    let dead = DeadLetter {
                        message: &one.message,
                        tenant: rejection.tenant.as_deref(),
                        event_id: rejection.event_id.as_deref(),
                        kind: rejection.kind.as_str().into(),
                        reason: rejection.reason.as_str().into(),
                        plugin: None,
                    };
                    self.dead_letter(&mut tx, dead, &mut outcome).await?;
                }
                Step::Duplicate => outcome.duplicates += 1,
                Step::Parked(event, error) => {
                    tracing::warn!(
                        tenant = %event.tenant, event_id = %event.id, error = %error,
                        "tenant's routing plugin unavailable; event set aside (not claimed)"
                    );
                    let dead = DeadLetter::plugin(&one.message, event, error);
                    self.dead_letter(&mut tx, dead, &mut outcome).await?;
                }
                Step::Routed(event, _) | Step::Failed(event, _) if !won => {
                    tracing::debug!(tenant = %event.tenant, event_id = %event.id, "duplicate event skipped");
                    outcome.duplicates += 1;
                }
                Step::Failed(event, error) => {
                    tracing::warn!(
                        tenant = %event.tenant, event_id = %event.id, kind = error.kind(),
                        error = %error, "routing failed; event dead-lettered"
                    );
                    let dead = DeadLetter::plugin(&one.message, event, error);
                    self.dead_letter(&mut tx, dead, &mut outcome).await?;
                }
                Step::Routed(event, decision) => {
                    tracing::info!(
                        tenant = %event.tenant, event_id = %event.id, event_type = %event.event_type,
                        plugin = %decision.plugin, deliveries = decision.deliveries.len(),
                        fuel = decision.cost.fuel, micros = decision.cost.elapsed.as_micros() as u64,
                        "event routed"
                    );
                    routed.push((event, decision));
                }
            }
        }
        // An email's message id and skip reason are made first: the outbox rows borrow them.
        let emails_of = || {
            routed
                .iter()
                .flat_map(|(event, decision): &(&Event, &Decision)| {
                    decision
                        .deliveries
                        .iter()
                        .filter(|d| matches!(d, Delivery::Email { .. }))
                        .map(move |d| (*event, d))
                })
        };
        let extras: Vec<(String, Option<String>)> = emails_of()
            .map(|(event, _)| {
                let message_id = format!("<{}@{}>", uuid::Uuid::new_v4(), self.message_id_domain);
                (message_id, self.too_old_for_email(event))
            })
            .collect();
        let emails: Vec<NewEmail<'_>> = emails_of()
            .zip(&extras)
            .map(|((event, delivery), (message_id, skip))| {
                if skip.is_some() {
                    tracing::info!(tenant = %event.tenant, event_id = %event.id, event_time = %event.time, "email recorded but not sent: the event is too old");
                    outcome.emails_skipped += 1;
                }
                new_email(event, delivery, message_id, skip.as_deref())
            })
            .collect();
        let notifications: Vec<NewNotification<'_>> = routed
            .iter()
            .flat_map(|(event, decision)| {
                decision
                    .deliveries
                    .iter()
                    .filter(|d| !matches!(d, Delivery::Email { .. }))
                    .map(|d| notification(event, d))
            })
            .collect();
        let inserted = store::insert_notifications(&mut tx, &notifications).await?;
        // The row itself, when it is small enough to keep: for the user's streams on this
        // instance, and in the wake-up for those on others.
        for ((n, seq), size) in notifications.iter().zip(inserted.seqs).zip(inserted.sizes) {
            let small = size <= hub::RECENT_ROW_BYTES;
            let here = small && self.hub.is_connected(n.tenant, n.user_id);
            let there = small && self.presence.is_online_elsewhere(n.tenant, n.user_id);
            let row = (here || there).then(|| Arc::new(n.stored(seq, inserted.created_at)));
            outcome.notifications.push(Written {
                tenant: n.tenant.to_owned(),
                user: n.user_id.to_owned(),
                seq,
                there: row.clone().filter(|_| there),
                here: row.filter(|_| here).map(|row| (row, size)),
            });
        }
        store::enqueue_emails(&mut tx, &emails).await?;
        outcome.emails = emails.len() as u64;
        // Streams on other instances hear of the rows when they commit.
        store::announce(
            &mut tx,
            Some(self.hub.instance()),
            outcome.notifications.iter().map(|w| {
                (
                    w.tenant.as_str(),
                    w.user.as_str(),
                    w.seq,
                    w.there.as_deref(),
                )
            }),
        )
        .await?;
        tx.commit().await?;
        self.metrics
            .batch_seconds
            .observe(started.elapsed().as_secs_f64());
        self.acknowledge(prepared, outcome);
        Ok(())
    }

    /// After COMMIT: offsets, metrics, wake-ups.
    fn acknowledge(&self, prepared: &[Prepared], outcome: Outcome) {
        let messages: Vec<&Incoming> = prepared.iter().map(|p| &*p.message).collect();
        if let Err(e) = self.ingest.finished(&messages) {
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
        for w in outcome.notifications {
            match w.here {
                Some((row, size)) => self.hub.publish_row(&w.tenant, &w.user, row, size),
                None => self.hub.publish(&w.tenant, &w.user, w.seq),
            }
        }
        if outcome.emails > outcome.emails_skipped {
            self.email_wake.notify_one();
        }
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
                headers: &d.message.headers,
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
        one: &Prepared,
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
                message: &one.message,
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

/// The claim of `event`, routed, with no plugin yet.
fn claim<'a>(event: &'a Event, message: &'a Incoming) -> Claim<'a> {
    Claim {
        tenant: &event.tenant,
        event_id: &event.id,
        event_type: &event.event_type,
        origin: origin(message),
        kind: store::ClaimKind::Routed,
        plugin: None,
        plugin_digest: None,
    }
}

/// A replayed dead letter: the transaction decides whether its token still counts (then
/// the event's dead-lettered claim is released, so it is routed again).
async fn replay(
    tx: &mut sqlx::PgConnection,
    one: &Prepared,
    token: uuid::Uuid,
) -> Result<(), StoreError> {
    match &one.step {
        Step::Routed(event, _) | Step::Failed(event, _) | Step::Parked(event, _) => {
            if store::accept_replay(tx, &event.tenant, &event.id, token).await? {
                tracing::info!(tenant = %event.tenant, event_id = %event.id, "dead letter replayed");
            }
        }
        Step::Rejected(_) => store::mark_replayed(tx, token).await?,
        Step::Duplicate => {}
    }
    Ok(())
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
fn new_email<'a>(
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

fn origin(message: &Incoming) -> Origin<'_> {
    Origin {
        topic: &message.topic,
        partition: message.partition,
        offset: message.offset,
    }
}

/// A tenant lane's queue, bounded by count (`kafka.lane_capacity`) and by the bytes of
/// the messages in it (`kafka.lane_max_bytes`).
struct Lane {
    sender: mpsc::Sender<Work>,
    bytes: Arc<Semaphore>,
}

/// Hands messages to tenant lanes, holding back (and pausing the partitions of) messages
/// whose lane is full.
struct Dispatcher {
    pipeline: Arc<Pipeline>,
    /// Given to each new lane.
    commits: Commits,
    trust: TenantTrust,
    shutdown: CancellationToken,
    lanes: HashMap<String, Lane>,
    running: JoinSet<()>,
    /// Per paused partition, its messages that could not be queued yet, in order.
    held: HashMap<(String, i32), VecDeque<Work>>,
}

impl Dispatcher {
    fn dispatch(&mut self, message: Incoming) {
        if let Some(delay) = message.kafka_delay {
            self.pipeline
                .metrics
                .stage("kafka")
                .observe(delay.as_secs_f64());
        }
        let decoded = envelope::decode(
            message.payload.as_deref(),
            &message.headers,
            self.pipeline.kafka.max_message_bytes,
        )
        .and_then(|event| self.trust.check(&message, event));
        let work = Work {
            message: Arc::new(message),
            decoded,
            admitted: None,
        };
        let partition = (work.message.topic.clone(), work.message.partition);
        // A partition with held messages keeps its order: later ones queue behind.
        if let Some(held) = self.held.get_mut(&partition) {
            held.push_back(work);
            return;
        }
        if let Some(work) = self.offer(work) {
            tracing::debug!(topic = %partition.0, partition = partition.1, lane = work.lane(), "tenant lane full; pausing the partition");
            self.pipeline.metrics.partition_pauses.inc();
            self.pipeline.ingest.pause(&partition.0, partition.1);
            self.held.insert(partition, VecDeque::from([work]));
        }
    }

    /// Queues `work` on its lane (starting the lane if needed); gives it back if full, by
    /// count or by bytes.
    fn offer(&mut self, mut work: Work) -> Option<Work> {
        let name = work.lane().to_owned();
        let kafka = &self.pipeline.kafka;
        let lane = self.lanes.entry(name.clone()).or_insert_with(|| {
            let (sender, queue) = mpsc::channel(kafka.lane_capacity);
            self.running.spawn(self.pipeline.clone().lane(
                name,
                queue,
                self.commits.clone(),
                self.shutdown.clone(),
            ));
            Lane {
                sender,
                bytes: Arc::new(Semaphore::new(kafka.lane_max_bytes)),
            }
        });
        if work.admitted.is_none() {
            // A message larger than the whole budget takes all of it: it waits for an empty
            // lane instead of forever.
            let size = work.message.size().min(kafka.lane_max_bytes) as u32;
            match lane.bytes.clone().try_acquire_many_owned(size) {
                Ok(permit) => work.admitted = Some(permit),
                Err(_) => return Some(work),
            }
        }
        match lane.sender.try_send(work) {
            Ok(()) => None,
            Err(TrySendError::Full(work)) => Some(work),
            // The lane ended (shutdown, or a panic the run loop is about to see).
            Err(TrySendError::Closed(_)) => None,
        }
    }

    /// Offers held messages to their lanes again, keeping each tenant's order; resumes a
    /// partition once nothing of it is held.
    fn offer_held(&mut self) {
        let partitions: Vec<(String, i32)> = self.held.keys().cloned().collect();
        for partition in partitions {
            let Some(mut held) = self.held.remove(&partition) else {
                continue;
            };
            let mut blocked: HashSet<String> = HashSet::new();
            let mut still = VecDeque::new();
            while let Some(work) = held.pop_front() {
                if blocked.contains(work.lane()) {
                    still.push_back(work);
                    continue;
                }
                if let Some(work) = self.offer(work) {
                    blocked.insert(work.lane().to_owned());
                    still.push_back(work);
                }
            }
            if still.is_empty() {
                tracing::debug!(topic = %partition.0, partition = partition.1, "held messages queued; resuming the partition");
                self.pipeline.ingest.resume(&partition.0, partition.1);
            } else {
                self.held.insert(partition, still);
            }
        }
    }

    /// A revoked partition's held messages are its next owner's to read.
    fn revoked(&mut self, topic: &str, partition: i32) {
        self.held.remove(&(topic.to_owned(), partition));
    }
}
