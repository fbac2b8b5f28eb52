//! A tenant lane's task: it takes what is queued as one batch, prepares it (step 1:
//! replay tokens checked, duplicates skipped, the rest routed within the tenant's budget,
//! outside any transaction) and hands it to a committer, a prefix at a time, stalling while the
//! database or the platform fails. While its tenant is spilling (`spill`), it drains the
//! spill the same way once its queue is empty, oldest first. It ends when the dispatcher
//! frees it (its queue closed), on shutdown, or if the committers are gone.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::dead_letter::Replay;
use super::dispatch::Work;
use super::spill::{Drain, Gate};
use super::{Commits, Pipeline, Prepared, Stall, Step, budget, group};
use crate::ingest::trust::TenantTrust;
use crate::model::Event;
use crate::plugin::Disposition;
use crate::store::claims;

/// Longest wait between two tries of a stalled batch.
const MAX_STALL_DELAY: Duration = Duration::from_secs(30);
/// Routing time after which a lane commits what it has routed so far.
const MAX_ROUTING_PER_COMMIT: Duration = Duration::from_millis(250);
/// How long a lane waits before reading its spill again after the database failed.
const DRAIN_RETRY: Duration = Duration::from_secs(1);

/// What a lane's drain step needs of its task.
#[derive(Clone, Copy)]
struct Lane<'a> {
    tenant: &'a str,
    gate: &'a Gate,
    trust: &'a TenantTrust,
    commits: &'a Commits,
    shutdown: &'a CancellationToken,
}

/// How a lane's task ended.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Exit {
    /// The dispatcher freed it (idle): its queue closed, empty.
    Reaped,
    /// Shutdown, or the committers are gone (a panic: the engine stops).
    Stopped,
}

/// How a lane's batch ended.
#[derive(Debug, PartialEq, Eq)]
enum BatchEnd {
    /// All of it is committed: the lane takes its next batch.
    Committed,
    /// Shutdown interrupted the waiting (what is not committed then is re-read), or the
    /// committers are gone: the lane stops.
    Interrupted,
}

impl Pipeline {
    /// One tenant's lane: takes what is queued (up to `kafka.batch_max`, waiting at most
    /// `kafka.batch_linger_ms` for more) and handles it as one batch, in order; while its
    /// tenant is spilling, drains the spill once the queue is empty.
    pub(super) async fn lane(
        self: Arc<Self>,
        tenant: String,
        mut queue: mpsc::Receiver<Work>,
        gate: Arc<Gate>,
        commits: Commits,
        shutdown: CancellationToken,
    ) -> Exit {
        let linger = Duration::from_millis(self.kafka.batch_linger_ms);
        let mut budget = budget::Budget::new(
            Duration::from_millis(self.plugins.tenant_budget_ms_per_sec()),
            Instant::now(),
        );
        let trust = TenantTrust::new(&self.kafka);
        loop {
            let first = if gate.is_spilling() {
                // What was queued before the spill began is older: it goes first.
                match queue.try_recv() {
                    Ok(work) => work,
                    Err(TryRecvError::Disconnected) => return Exit::Reaped,
                    Err(TryRecvError::Empty) => {
                        let lane = Lane {
                            tenant: &tenant,
                            gate: &gate,
                            trust: &trust,
                            commits: &commits,
                            shutdown: &shutdown,
                        };
                        if self.drain(lane, &mut budget).await == BatchEnd::Interrupted {
                            return Exit::Stopped;
                        }
                        continue;
                    }
                }
            } else {
                tokio::select! {
                    _ = shutdown.cancelled() => return Exit::Stopped,
                    // Rows written or found: the loop drains them.
                    _ = gate.written.notified() => continue,
                    work = queue.recv() => match work {
                        Some(work) => work,
                        None => return Exit::Reaped,
                    },
                }
            };
            let batch = next_batch(first, &mut queue, self.kafka.batch_max, linger).await;
            let end = self
                .handle_batch(&tenant, &batch, &mut budget, &commits, &shutdown)
                .await;
            if end == BatchEnd::Interrupted {
                return Exit::Stopped;
            }
        }
    }

    /// One step of draining the tenant's spill: a batch of its oldest rows handled like
    /// queued messages (their rows deleted as they commit), or a wait while the rows are
    /// being written or another instance drains them.
    async fn drain(&self, lane: Lane<'_>, budget: &mut budget::Budget) -> BatchEnd {
        let max_bytes = self.kafka.max_message_bytes;
        let decode = |message| Work::decode(message, lane.trust, max_bytes);
        let step = self.drain_step(lane.tenant, lane.gate, decode).await;
        if step.is_ok() {
            self.health.set_stall(lane.tenant, None);
        }
        let wait = match step {
            Ok(Drain::Rows(batch)) => {
                let end = self
                    .handle_batch(lane.tenant, &batch, budget, lane.commits, lane.shutdown)
                    .await;
                if end == BatchEnd::Committed {
                    self.drained(lane.tenant, lane.gate, &batch);
                }
                return end;
            }
            Ok(Drain::Closed) => return BatchEnd::Committed,
            Ok(Drain::Wait(wait)) => wait,
            Err(e) => {
                let stall = Stall::Database(e);
                self.report_stall(lane.tenant, &stall, 0, MAX_STALL_DELAY.min(DRAIN_RETRY));
                DRAIN_RETRY
            }
        };
        tokio::select! {
            _ = lane.shutdown.cancelled() => BatchEnd::Interrupted,
            _ = lane.gate.written.notified() => BatchEnd::Committed,
            _ = tokio::time::sleep(wait) => BatchEnd::Committed,
        }
    }

    /// Handles a lane's batch until all of it is committed, in order: a prefix per
    /// transaction (see [`MAX_ROUTING_PER_COMMIT`]).
    async fn handle_batch(
        &self,
        lane: &str,
        batch: &[Work],
        budget: &mut budget::Budget,
        commits: &Commits,
        shutdown: &CancellationToken,
    ) -> BatchEnd {
        let mut rest = batch;
        while !rest.is_empty() {
            if shutdown.is_cancelled() {
                // The prefix in hand is committed; the rest is re-read after the restart.
                return BatchEnd::Interrupted;
            }
            match self
                .commit_prefix(lane, rest, budget, commits, shutdown)
                .await
            {
                Some(done) => rest = &rest[done..],
                None => return BatchEnd::Interrupted,
            }
        }
        BatchEnd::Committed
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
            self.report_stall(lane, &stall, batch.len(), delay);
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

    /// A stalled batch, in the metrics, the log and readiness.
    fn report_stall(&self, lane: &str, stall: &Stall, size: usize, delay: Duration) {
        self.metrics
            .pipeline_stalls
            .with_label_values(&[stall.cause()])
            .inc();
        tracing::warn!(
            lane, cause = stall.cause(), error = %stall, size,
            retry_in_ms = delay.as_millis() as u64,
            "batch stalled: the database or the platform failed, not the data; waiting"
        );
        self.health
            .set_stall(lane, Some(format!("{}: {stall}", stall.cause())));
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
        let seen = claims::already_processed(&self.pool, &keys).await?;
        let mut prepared = Vec::with_capacity(batch.len());
        let routing_since = Instant::now();
        for work in batch {
            if routing_since.elapsed() >= MAX_ROUTING_PER_COMMIT {
                break;
            }
            // A replay token is checked before anything is routed: a refused one makes the
            // message a dead letter saying why; a valid one lets the event past its claim.
            let replay = match self.check_replay(work).await? {
                Replay::Refused(rejection) => {
                    prepared.push(Prepared {
                        message: work.message.clone(),
                        step: Step::Rejected(rejection),
                        replay: None,
                        spilled: work.spilled,
                    });
                    continue;
                }
                Replay::Valid(token) => Some(token),
                Replay::None => None,
            };
            let step = match &work.decoded {
                Err(rejection) => Step::Rejected(rejection.clone()),
                // A replayed dead letter was claimed when it was dead-lettered: the
                // transaction releases that claim when it accepts the token.
                Ok(event)
                    if replay.is_none()
                        && seen.contains(&(event.tenant.clone(), event.id.clone())) =>
                {
                    Step::Duplicate
                }
                Ok(event) => self.route_within_budget(event, budget, shutdown).await?,
            };
            prepared.push(Prepared {
                message: work.message.clone(),
                step,
                replay,
                spilled: work.spilled,
            });
        }
        Ok(prepared)
    }

    /// Routes `event`, then pauses the lane if that spent the tenant's routing budget.
    async fn route_within_budget(
        &self,
        event: &Event,
        budget: &mut budget::Budget,
        shutdown: &CancellationToken,
    ) -> Result<Step, Stall> {
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
        Ok(step)
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
}

/// A batch: `first`, then what else is queued, up to `max` messages, waiting at most
/// `linger` for more.
async fn next_batch<T>(
    first: T,
    queue: &mut mpsc::Receiver<T>,
    max: usize,
    linger: Duration,
) -> Vec<T> {
    let mut batch = vec![first];
    let deadline = tokio::time::Instant::now() + linger;
    while batch.len() < max {
        match tokio::time::timeout_at(deadline, queue.recv()).await {
            Ok(Some(work)) => batch.push(work),
            _ => break,
        }
    }
    batch
}

#[cfg(test)]
mod tests;
