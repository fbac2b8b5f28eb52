//! The dispatcher: reads messages, decodes each once, and hands it to its tenant's lane,
//! starting the lane on its first message and freeing it once idle.
//!
//! A lane's queue is bounded by count (`kafka.lane_capacity`) and by the bytes of the
//! messages in it (`kafka.lane_max_bytes`). A message whose lane is full is *held*, and the
//! partition it came from paused (its next messages wait in Kafka); held messages are offered
//! again every [`HELD_RETRY`], in order, and the partition resumes once nothing of it is
//! held. On a partition that carries other tenants too, a full lane's tenant *spills*
//! instead (`spill`): its messages go to PostgreSQL until its lane has drained them, and the
//! other tenants' messages pass. A partition of one tenant (a backlog) only pauses: spilling
//! would copy the backlog through the database for nobody. At the spill's bound (or for an
//! undecodable message) the partition pauses again.
//!
//! Lanes are freed when idle (nothing queued, in hand or spilled) for `kafka.lane_idle_ms`,
//! and at most `kafka.max_lanes` live at once: a new tenant's message finding every lane
//! busy frees the idle ones at once, or waits, held, for one to become idle. A stream of
//! made-up tenant ids thus costs a bounded number of lanes. A freed lane forgets nothing that
//! matters: its tenant's routing budget counts per second, and a lane idle that long has
//! spent none of the current second.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::{self, error::TrySendError};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::lane::Exit;
use super::spill::{self, Admit, Gate, SpillJob};
use super::{Commits, Pipeline};
use crate::ingest::Incoming;
use crate::ingest::envelope::{self, Rejection};
use crate::ingest::trust::TenantTrust;
use crate::model::Event;
use crate::store::spill::Backlog;

/// How often messages held back for a full lane are offered to it again; also how often, at
/// most, every lane is looked at for idle ones when a new tenant needs one.
const HELD_RETRY: Duration = Duration::from_millis(20);
/// How long a partition counts as shared after it last carried two tenants in a row.
const SHARED_FOR: Duration = Duration::from_secs(10);
/// How often lanes idle for `kafka.lane_idle_ms` are looked for.
const REAP_EVERY: Duration = Duration::from_secs(1);
/// How long the dispatcher waits before asking again which tenants have spilled messages,
/// when the database did not answer.
const LOAD_RETRY: Duration = Duration::from_secs(1);
/// The lane of messages that did not decode (they have no trustworthy tenant).
const REJECTS_LANE: &str = "";

/// A message on its way to a lane, decoded once by the dispatcher.
pub(super) struct Work {
    pub message: Arc<Incoming>,
    pub decoded: Result<Event, Rejection>,
    /// Its bytes' share of its lane's `kafka.lane_max_bytes`, given back when it is dropped
    /// (once handled).
    admitted: Option<OwnedSemaphorePermit>,
    /// Its row in the spill, when its lane drained it from there (its offset is finished
    /// already; the row goes in the transaction that commits its outcome).
    pub spilled: Option<i64>,
}

impl Work {
    /// `message`, decoded once: its envelope, and whether its producer may speak for its
    /// tenant.
    pub fn decode(message: Incoming, trust: &TenantTrust, max_bytes: usize) -> Self {
        // A CloudEvent without `time` takes its record's timestamp: the same on every
        // redelivery, and when drained from the spill (the time it was received, only when
        // the record has none).
        let decoded = envelope::decode_at(
            message.payload.as_deref(),
            &message.headers,
            max_bytes,
            message.timestamp.unwrap_or_else(chrono::Utc::now),
        )
        .and_then(|event| trust.check(&message, event));
        Work {
            message: Arc::new(message),
            decoded,
            admitted: None,
            spilled: None,
        }
    }
}

impl Work {
    fn lane(&self) -> &str {
        match &self.decoded {
            Ok(event) => &event.tenant,
            Err(_) => REJECTS_LANE,
        }
    }
}

/// A tenant lane's queue, bounded by count (`kafka.lane_capacity`) and by the bytes of
/// the messages in it (`kafka.lane_max_bytes`).
struct Lane {
    sender: mpsc::Sender<Work>,
    bytes: Arc<Semaphore>,
    max_bytes: usize,
    /// Its tenant's spill, shared with the lane's task and the spiller.
    gate: Arc<Gate>,
    /// When it was last seen with work (queued, in hand, held or spilled).
    last_busy: Instant,
}

impl Lane {
    fn new(sender: mpsc::Sender<Work>, max_bytes: usize) -> Self {
        Self {
            sender,
            bytes: Arc::new(Semaphore::new(max_bytes)),
            max_bytes,
            gate: Arc::default(),
            last_busy: Instant::now(),
        }
    }

    /// Has it work: queued, in hand (each message holds bytes until handled), held for it
    /// (held messages hold bytes too, or are refused ones of a full lane), or spilled?
    fn busy(&self) -> bool {
        self.bytes.available_permits() < self.max_bytes
            || self.sender.capacity() < self.sender.max_capacity()
            || self.gate.is_spilling()
    }

    /// Queues `work`; gives it back if the lane is full, by count or by bytes.
    fn offer(&self, mut work: Work, max_bytes: usize) -> Option<Work> {
        if work.admitted.is_none() {
            // A message larger than the whole budget takes all of it: it waits for an empty
            // lane instead of forever. An empty one takes a byte, so that it counts as work.
            let size = work.message.size().clamp(1, max_bytes) as u32;
            match self.bytes.clone().try_acquire_many_owned(size) {
                Ok(permit) => work.admitted = Some(permit),
                Err(_) => return Some(work),
            }
        }
        match self.sender.try_send(work) {
            Ok(()) => None,
            Err(TrySendError::Full(work)) => Some(work),
            // The lane ended (shutdown, or a panic the run loop is about to see).
            Err(TrySendError::Closed(_)) => None,
        }
    }
}

/// Hands messages to tenant lanes, holding back (and pausing the partitions of) messages
/// whose lane is full.
pub(super) struct Dispatcher {
    pipeline: Arc<Pipeline>,
    /// Given to each new lane.
    commits: Commits,
    trust: TenantTrust,
    shutdown: CancellationToken,
    lanes: HashMap<String, Lane>,
    /// The lanes' tasks and the spiller's.
    running: JoinSet<Exit>,
    /// Per paused partition, its messages that could not be queued yet, in order.
    held: HashMap<(String, i32), VecDeque<Work>>,
    /// Messages on their way to the spill.
    spill: mpsc::Sender<SpillJob>,
    /// The consumer's assignments when the spilled tenants were last read (`None`: never).
    loaded_at: Option<u64>,
    /// When every lane was last looked at for idle ones because a new tenant needed one.
    pressed_at: Option<Instant>,
    /// Per partition just assigned, the tenants whose spilled rows there must wait for the
    /// older messages still to be read: each with the offset of its first spilled row.
    holds: HashMap<Partition, Vec<(i64, Arc<Gate>)>>,
    /// Per partition, the lane of its last message and when its messages last changed lane:
    /// a partition that carried several tenants within [`SHARED_FOR`] is *shared*, and a full
    /// lane's tenant there spills, so the others pass it. A partition carrying one tenant only
    /// (a backlog) just pauses: spilling would copy its backlog through the database for
    /// nobody.
    traffic: HashMap<Partition, (String, Option<Instant>)>,
}

/// A Kafka partition: its topic and number.
type Partition = (String, i32);

impl Dispatcher {
    pub fn new(pipeline: Arc<Pipeline>, commits: Commits, shutdown: &CancellationToken) -> Self {
        let mut running = JoinSet::new();
        let (spill, jobs) = mpsc::channel(spill::SPILL_QUEUE);
        running.spawn({
            let (pipeline, shutdown) = (pipeline.clone(), shutdown.clone());
            async move {
                pipeline.spiller(jobs, shutdown).await;
                Exit::Stopped
            }
        });
        Self {
            trust: TenantTrust::new(&pipeline.kafka),
            pipeline,
            commits,
            shutdown: shutdown.clone(),
            lanes: HashMap::new(),
            running,
            held: HashMap::new(),
            spill,
            loaded_at: None,
            pressed_at: None,
            holds: HashMap::new(),
            traffic: HashMap::new(),
        }
    }

    /// Dispatches until shutdown, or until a lane stops on its own (a panic).
    pub async fn run(&mut self) {
        let pipeline = self.pipeline.clone();
        // One timer across iterations: a `sleep` made anew in the loop would be reset by
        // every arriving message, and held messages would starve under steady traffic.
        let mut held_retry = tokio::time::interval(HELD_RETRY);
        held_retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut reap = tokio::time::interval(REAP_EVERY);
        reap.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => break,
                Some(ended) = self.running.join_next() => {
                    // A freed lane ends; otherwise lanes and the spiller end on their own
                    // only on shutdown (handled above) or a panic.
                    if matches!(ended, Ok(Exit::Reaped)) {
                        continue;
                    }
                    if !self.shutdown.is_cancelled() {
                        tracing::error!(panicked = ended.is_err(), "a pipeline lane stopped; stopping the pipeline");
                    }
                    break;
                }
                (topic, partition) = pipeline.ingest.revoked() => self.revoked(&topic, partition),
                // Before `recv`: under steady traffic a message is always ready, and this
                // `biased` select would never get to the held messages.
                _ = held_retry.tick(), if !self.held.is_empty() => self.offer_held(),
                _ = reap.tick() => self.reap(false),
                message = pipeline.ingest.recv() => self.dispatch(message).await,
            }
        }
    }

    /// Waits for every lane to end (each finishes its batch in hand once `shutdown` has
    /// fired), then drops the dispatcher and with it the committers' last sender.
    pub async fn stop(mut self) {
        while self.running.join_next().await.is_some() {}
    }

    async fn dispatch(&mut self, message: Incoming) {
        if let Some(delay) = message.kafka_delay {
            self.pipeline
                .metrics
                .stage("kafka")
                .observe(delay.as_secs_f64());
        }
        if self.loaded_at != Some(self.pipeline.ingest.assignments()) {
            // A partition that was someone else's: its tenants' spilled messages go first.
            self.load_spilled().await;
        }
        let work = Work::decode(message, &self.trust, self.pipeline.kafka.max_message_bytes);
        let partition = (work.message.topic.clone(), work.message.partition);
        self.note_traffic(&partition, work.lane());
        // A partition with held messages keeps its order: later ones queue behind.
        if let Some(held) = self.held.get_mut(&partition) {
            held.push_back(work);
            return;
        }
        let offset = work.message.offset;
        let Some(work) = self.offer(work) else {
            self.read_up_to(&partition, offset);
            return;
        };
        tracing::debug!(topic = %partition.0, partition = partition.1, lane = work.lane(), "tenant lane full and its spill too (or off); pausing the partition");
        self.pipeline.metrics.partition_pauses.inc();
        self.pipeline.ingest.pause(&partition.0, partition.1);
        self.held.insert(partition, VecDeque::from([work]));
    }

    /// Reads which tenants have spilled messages on this instance's partitions (waiting
    /// while the database or the broker does not answer: a message of theirs must not pass
    /// them), starts their lanes draining, and holds the partitions that will first re-read
    /// older messages of theirs.
    async fn load_spilled(&mut self) {
        loop {
            let assignments = self.pipeline.ingest.assignments();
            match self.spilled_here().await {
                Ok(found) => {
                    self.pipeline.health.set_stall("spill", None);
                    self.found_spilled(found);
                    self.loaded_at = Some(assignments);
                    return;
                }
                Err(error) => {
                    tracing::warn!(%error, "reading the spilled tenants failed; waiting");
                    self.pipeline
                        .health
                        .set_stall("spill", Some(error.to_string()));
                }
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(LOAD_RETRY) => {}
            }
        }
    }

    /// The spilled rows of this instance's partitions, each with whether its partition
    /// will re-read older messages first (its committed offset is not past the first row).
    async fn spilled_here(&self) -> Result<Vec<(Backlog, bool)>, String> {
        let partitions = self.pipeline.ingest.assignment();
        if partitions.is_empty() {
            return Ok(Vec::new());
        }
        let backlogs = crate::store::spill::backlogs(&self.pipeline.pool, &partitions)
            .await
            .map_err(|e| format!("database: {}", e.with_cause()))?;
        if backlogs.is_empty() {
            return Ok(Vec::new());
        }
        let committed = self
            .pipeline
            .ingest
            .committed()
            .map_err(|e| format!("kafka: {e}"))?;
        Ok(backlogs
            .into_iter()
            .map(|b| {
                let at = committed.get(&(b.topic.clone(), b.partition));
                let held = at.is_none_or(|&at| at <= b.first_offset);
                (b, held)
            })
            .collect())
    }

    /// Opens the gates of tenants with spilled rows, and replaces the holds.
    fn found_spilled(&mut self, found: Vec<(Backlog, bool)>) {
        let old = std::mem::take(&mut self.holds);
        let mut totals: HashMap<String, (i64, i64)> = HashMap::new();
        for (b, held) in found {
            let Some(lane) = self.lane(&b.tenant_id, true) else {
                continue;
            };
            let gate = lane.gate.clone();
            if held {
                gate.hold();
                let partition = (b.topic.clone(), b.partition);
                self.holds
                    .entry(partition)
                    .or_default()
                    .push((b.first_offset, gate));
            }
            let total = totals.entry(b.tenant_id).or_default();
            total.0 += b.rows;
            total.1 += b.bytes;
        }
        // The old holds go after the new ones are in place: no drain starts in between.
        for (_, gate) in old.into_values().flatten() {
            gate.release();
        }
        let metrics = &self.pipeline.metrics;
        for (tenant, (rows, bytes)) in totals {
            if let Some(lane) = self.lanes.get(&tenant) {
                lane.gate.found(rows as u64, bytes as u64);
            }
            metrics
                .spilled_messages
                .with_label_values(&[metrics.tenant_label(&tenant)])
                .set(rows);
            tracing::info!(%tenant, rows, "tenant has spilled messages; they go first");
        }
    }

    /// Queues `work` on its lane (starting the lane if needed), or spills it when the lane is
    /// full or its tenant is spilling; gives it back if neither can take it now.
    fn offer(&mut self, work: Work) -> Option<Work> {
        let name = work.lane().to_owned();
        let kafka = &self.pipeline.kafka;
        let (max_bytes, max_rows, max_spill) = (
            kafka.lane_max_bytes,
            kafka.spill_max_rows,
            kafka.spill_max_bytes,
        );
        let spill = self.spill.clone();
        let contended = self.shared(&(work.message.topic.clone(), work.message.partition));
        let Some(lane) = self.lane(&name, false) else {
            // Every lane busy: it waits, held, for one to become idle.
            return Some(work);
        };
        // Undecodable messages have no tenant to spill for: they wait, as before.
        let spillable = work.decoded.is_ok();
        let work = if spillable && lane.gate.is_spilling() {
            work
        } else {
            lane.offer(work, max_bytes)?
        };
        // Undecodable messages wait, as before; so does a full lane's tenant alone on its
        // partition.
        if !spillable || !(contended || lane.gate.is_spilling()) {
            return Some(work);
        }
        let size = work.message.size();
        match lane.gate.admit(true, size, max_rows, max_spill) {
            Admit::Lane | Admit::Full => Some(work),
            Admit::Spill => {
                let job = SpillJob {
                    tenant: name,
                    message: work.message.clone(),
                    gate: lane.gate.clone(),
                };
                match spill.try_send(job) {
                    Ok(()) => None,
                    Err(_) => {
                        lane.gate.unsent(size);
                        Some(work)
                    }
                }
            }
        }
    }

    /// The lane of `name`, started if needed. `None` when `kafka.max_lanes` lanes are busy
    /// (unless `force`: a tenant with spilled messages gets its lane regardless).
    fn lane(&mut self, name: &str, force: bool) -> Option<&mut Lane> {
        if !self.lanes.contains_key(name) {
            if !force && self.lanes.len() >= self.pipeline.kafka.max_lanes {
                self.reap(true);
                if self.lanes.len() >= self.pipeline.kafka.max_lanes {
                    return None;
                }
            }
            let kafka = &self.pipeline.kafka;
            let (sender, queue) = mpsc::channel(kafka.lane_capacity);
            let lane = Lane::new(sender, kafka.lane_max_bytes);
            self.running.spawn(self.pipeline.clone().lane(
                name.to_owned(),
                queue,
                lane.gate.clone(),
                self.commits.clone(),
                self.shutdown.clone(),
            ));
            self.lanes.insert(name.to_owned(), lane);
            self.pipeline
                .metrics
                .pipeline_lanes
                .set(self.lanes.len() as i64);
        }
        let lane = self.lanes.get_mut(name)?;
        lane.last_busy = Instant::now();
        Some(lane)
    }

    /// Frees idle lanes: those idle for `kafka.lane_idle_ms`, or, when `pressed` (a new
    /// tenant needs a lane and there are `kafka.max_lanes`), every idle one (at most once
    /// per [`HELD_RETRY`]: a crowd of new tenants does not scan the lanes for each).
    /// A freed lane's task ends once its queue, empty, is closed.
    fn reap(&mut self, pressed: bool) {
        let now = Instant::now();
        if pressed {
            if self.pressed_at.is_some_and(|at| now - at < HELD_RETRY) {
                return;
            }
            self.pressed_at = Some(now);
        }
        let idle_for = Duration::from_millis(self.pipeline.kafka.lane_idle_ms);
        let before = self.lanes.len();
        self.lanes.retain(|_, lane| {
            if lane.busy() {
                lane.last_busy = now;
                return true;
            }
            !(pressed || now - lane.last_busy >= idle_for)
        });
        let reaped = before - self.lanes.len();
        if reaped > 0 {
            tracing::debug!(
                reaped,
                lanes = self.lanes.len(),
                pressed,
                "idle tenant lanes freed"
            );
            let metrics = &self.pipeline.metrics;
            metrics.lanes_reaped.inc_by(reaped as u64);
            metrics.pipeline_lanes.set(self.lanes.len() as i64);
        }
    }

    /// Offers held messages to their lanes again, keeping each tenant's order; resumes a
    /// partition once nothing of it is held.
    fn offer_held(&mut self) {
        let partitions: Vec<(String, i32)> = self.held.keys().cloned().collect();
        for partition in partitions {
            let Some(held) = self.held.remove(&partition) else {
                continue;
            };
            let last = held.back().map(|w| w.message.offset);
            let still = requeue(held, Work::lane, |work| self.offer(work));
            if still.is_empty() {
                if let Some(offset) = last {
                    self.read_up_to(&partition, offset);
                }
                tracing::debug!(topic = %partition.0, partition = partition.1, "held messages queued; resuming the partition");
                self.pipeline.ingest.resume(&partition.0, partition.1);
            } else {
                self.held.insert(partition, still);
            }
        }
    }

    /// A revoked partition's held messages are its next owner's to read.
    fn revoked(&mut self, topic: &str, partition: i32) {
        let partition = (topic.to_owned(), partition);
        self.held.remove(&partition);
        self.traffic.remove(&partition);
        // Its spilled rows are its next owner's to drain.
        for (_, gate) in self.holds.remove(&partition).unwrap_or_default() {
            gate.release();
        }
    }

    /// Notes the lane of `partition`'s latest message.
    fn note_traffic(&mut self, partition: &Partition, lane: &str) {
        match self.traffic.get_mut(partition) {
            Some((last, _)) if last == lane => {}
            Some((last, changed)) => {
                *last = lane.to_owned();
                *changed = Some(Instant::now());
            }
            None => {
                self.traffic
                    .insert(partition.clone(), (lane.to_owned(), None));
            }
        }
    }

    /// Has `partition` carried several tenants lately?
    fn shared(&self, partition: &Partition) -> bool {
        self.traffic
            .get(partition)
            .and_then(|(_, changed)| *changed)
            .is_some_and(|at| at.elapsed() < SHARED_FOR)
    }

    /// Every message of `partition` up to `offset` has gone to its lane or the spill:
    /// spilled rows there from `offset` on no longer wait for older messages.
    fn read_up_to(&mut self, partition: &Partition, offset: i64) {
        let Some(holds) = self.holds.get_mut(partition) else {
            return;
        };
        holds.retain(|(first, gate)| {
            let read = *first <= offset;
            if read {
                gate.release();
            }
            !read
        });
        if holds.is_empty() {
            self.holds.remove(partition);
        }
    }
}

/// Offers a partition's held items, in order, and returns those still held. Once a lane
/// refuses one, the later items of that lane are not offered (they would overtake it);
/// other lanes' items still are.
fn requeue<T>(
    mut held: VecDeque<T>,
    lane: impl Fn(&T) -> &str,
    mut offer: impl FnMut(T) -> Option<T>,
) -> VecDeque<T> {
    let mut blocked: HashSet<String> = HashSet::new();
    let mut still = VecDeque::new();
    while let Some(work) = held.pop_front() {
        if blocked.contains(lane(&work)) {
            still.push_back(work);
            continue;
        }
        if let Some(work) = offer(work) {
            blocked.insert(lane(&work).to_owned());
            still.push_back(work);
        }
    }
    still
}

#[cfg(test)]
mod tests;
