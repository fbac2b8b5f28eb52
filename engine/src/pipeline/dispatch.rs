//! The dispatcher: reads messages, decodes each once, and hands it to its tenant's lane,
//! starting the lane on its first message.
//!
//! A lane's queue is bounded by count (`kafka.lane_capacity`) and by the bytes of the
//! messages in it (`kafka.lane_max_bytes`). A message whose lane is full is *held*, and the
//! partition it came from is paused (its next messages wait in Kafka); held messages are
//! offered again every [`HELD_RETRY`], in order, and the partition resumes once nothing of
//! it is held.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc::{self, error::TrySendError};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::{Commits, Pipeline};
use crate::ingest::Incoming;
use crate::ingest::envelope::{self, Rejection};
use crate::ingest::trust::TenantTrust;
use crate::model::Event;

/// How often messages held back for a full lane are offered to it again.
const HELD_RETRY: Duration = Duration::from_millis(20);
/// The lane of messages that did not decode (they have no trustworthy tenant).
const REJECTS_LANE: &str = "";

/// A message on its way to a lane, decoded once by the dispatcher.
pub(super) struct Work {
    pub message: Arc<Incoming>,
    pub decoded: Result<Event, Rejection>,
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

/// A tenant lane's queue, bounded by count (`kafka.lane_capacity`) and by the bytes of
/// the messages in it (`kafka.lane_max_bytes`).
struct Lane {
    sender: mpsc::Sender<Work>,
    bytes: Arc<Semaphore>,
}

impl Lane {
    fn new(sender: mpsc::Sender<Work>, max_bytes: usize) -> Self {
        Self {
            sender,
            bytes: Arc::new(Semaphore::new(max_bytes)),
        }
    }

    /// Queues `work`; gives it back if the lane is full, by count or by bytes.
    fn offer(&self, mut work: Work, max_bytes: usize) -> Option<Work> {
        if work.admitted.is_none() {
            // A message larger than the whole budget takes all of it: it waits for an empty
            // lane instead of forever.
            let size = work.message.size().min(max_bytes) as u32;
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
    running: JoinSet<()>,
    /// Per paused partition, its messages that could not be queued yet, in order.
    held: HashMap<(String, i32), VecDeque<Work>>,
}

impl Dispatcher {
    pub fn new(pipeline: Arc<Pipeline>, commits: Commits, shutdown: &CancellationToken) -> Self {
        Self {
            trust: TenantTrust::new(&pipeline.kafka),
            pipeline,
            commits,
            shutdown: shutdown.clone(),
            lanes: HashMap::new(),
            running: JoinSet::new(),
            held: HashMap::new(),
        }
    }

    /// Dispatches until shutdown, or until a lane stops on its own (a panic).
    pub async fn run(&mut self) {
        let pipeline = self.pipeline.clone();
        // One timer across iterations: a `sleep` made anew in the loop would be reset by
        // every arriving message, and held messages would starve under steady traffic.
        let mut held_retry = tokio::time::interval(HELD_RETRY);
        held_retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => break,
                Some(ended) = self.running.join_next() => {
                    // Lanes end on their own only on shutdown (handled above) or a panic.
                    if !self.shutdown.is_cancelled() {
                        tracing::error!(panicked = ended.is_err(), "a pipeline lane stopped; stopping the pipeline");
                    }
                    break;
                }
                (topic, partition) = pipeline.ingest.revoked() => self.revoked(&topic, partition),
                // Before `recv`: under steady traffic a message is always ready, and this
                // `biased` select would never get to the held messages.
                _ = held_retry.tick(), if !self.held.is_empty() => self.offer_held(),
                message = pipeline.ingest.recv() => self.dispatch(message),
            }
        }
    }

    /// Waits for every lane to end (each finishes its batch in hand once `shutdown` has
    /// fired), then drops the dispatcher and with it the committers' last sender.
    pub async fn stop(mut self) {
        while self.running.join_next().await.is_some() {}
    }

    fn dispatch(&mut self, message: Incoming) {
        if let Some(delay) = message.kafka_delay {
            self.pipeline
                .metrics
                .stage("kafka")
                .observe(delay.as_secs_f64());
        }
        // A CloudEvent without `time` takes its record's timestamp: the same on every
        // redelivery (the time it was received, only when the record has none).
        let decoded = envelope::decode_at(
            message.payload.as_deref(),
            &message.headers,
            self.pipeline.kafka.max_message_bytes,
            message.timestamp.unwrap_or_else(chrono::Utc::now),
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
    fn offer(&mut self, work: Work) -> Option<Work> {
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
            Lane::new(sender, kafka.lane_max_bytes)
        });
        lane.offer(work, kafka.lane_max_bytes)
    }

    /// Offers held messages to their lanes again, keeping each tenant's order; resumes a
    /// partition once nothing of it is held.
    fn offer_held(&mut self) {
        let partitions: Vec<(String, i32)> = self.held.keys().cloned().collect();
        for partition in partitions {
            let Some(held) = self.held.remove(&partition) else {
                continue;
            };
            let still = requeue(held, Work::lane, |work| self.offer(work));
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
