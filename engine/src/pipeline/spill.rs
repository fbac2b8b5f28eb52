//! The spill: a slow tenant's backlog set aside in PostgreSQL, so that the other tenants on
//! its partitions pass it.
//!
//! A full lane used to pause the partitions carrying its next messages: every tenant on them
//! then waited for the slowest. Now a message whose lane is full is *spilled*: the spiller
//! writes it, as Kafka gave it, to `spilled_messages`, and only once that row has committed
//! is its offset marked finished (the spilled row is its outcome as far as Kafka is
//! concerned; no loss). While a tenant has spilled messages, all its newer messages are
//! spilled too, so its order holds; its lane, once its queue is empty, drains the spill
//! oldest first and deletes each row in the transaction that commits the message's outcome
//! (`commit`), so a crash re-drains and the claim turns the re-drain into a duplicate.
//!
//! A tenant's [`Gate`] is where the dispatcher, the spiller and the lane meet: the dispatcher
//! opens it (spilling) and counts what it sent to the spiller; the spiller counts what it
//! wrote; the lane closes it only when its drain finds the spill empty *and* nothing was
//! written or sent since it looked, so no message can pass one spilled before it.
//!
//! Restarts and several instances: a spilled row is drained by the owner of its partition,
//! one instance at a time per tenant, holding the tenant's lease (`spill_leases`, renewed at
//! every batch, released when the spill is empty, run out after a crash). An instance given
//! partitions first reads which tenants have spilled rows there (`Dispatcher::load_spilled`),
//! before it handles any message of them, so it spills their fresh messages behind the rows
//! instead of passing them. Rows drain in offset order, and a partition whose committed
//! offset is not past its first spilled row is *held*: older messages of the tenant (in its
//! lane when the last owner stopped) are re-read and spilled in their place before the lane
//! drains any row of it.
//!
//! The spill is bounded per tenant (`kafka.spill_max_rows`, `kafka.spill_max_bytes`, as this
//! instance counts them): at the bound, the tenant's messages wait in Kafka again, their
//! partitions paused, as a full lane did before. So does a message the spiller has no room
//! for (it writes [`SPILL_QUEUE`] messages at most ahead).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use super::Pipeline;
use super::dispatch::Work;
use crate::ingest::Incoming;
use crate::store::spill::{self, NewSpill, Spilled};

/// Messages waiting for the spiller, at most: beyond, the partition pauses.
pub(super) const SPILL_QUEUE: usize = 4_096;
/// Most rows the spiller writes in one statement.
const SPILL_BATCH: usize = 512;
/// How long a drainer's lease on a tenant's spill lasts; renewed at every batch.
const LEASE: Duration = Duration::from_secs(30);
/// How long a lane waits before asking again for a lease another instance holds.
const LEASE_RETRY: Duration = Duration::from_secs(1);
/// Longest wait between two tries of a failed spill write.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(5);

/// A tenant's spill as this instance knows it: shared by the dispatcher, the spiller and the
/// tenant's lane.
#[derive(Default)]
pub(super) struct Gate {
    state: Mutex<GateState>,
    /// Woken when rows were written or found: the lane has something to drain.
    pub written: Notify,
}

#[derive(Default, Debug)]
struct GateState {
    /// The tenant's messages go to the spill, not to its lane.
    spilling: bool,
    /// Sent to the spiller and not yet written.
    unwritten: u64,
    /// Bumped at every write: a drain that found nothing knows whether it looked too early.
    writes: u64,
    /// Rows and bytes in the spill, as this instance counts them (the bound).
    rows: u64,
    bytes: u64,
    /// Partitions just assigned whose spilled rows may have older messages of the tenant
    /// still to be re-read from Kafka (and spilled in their place): no drain before.
    holds: u32,
    /// Messages sent to the spiller before the last hold was released, not yet written.
    behind: u64,
}

/// What the dispatcher may do with a tenant's message.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Admit {
    /// To the lane: nothing of the tenant is spilled.
    Lane,
    /// To the spill (counted as sent).
    Spill,
    /// Neither: the tenant's spill is at its bound.
    Full,
}

impl Gate {
    fn state(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state.lock().expect("spill gate lock poisoned")
    }

    pub fn is_spilling(&self) -> bool {
        self.state().spilling
    }

    /// Where a message of `size` bytes goes: `lane_full` says whether its lane refused it.
    /// `Spill` counts it as sent; the caller must then hand it to the spiller (or call
    /// [`Gate::unsent`]).
    pub fn admit(&self, lane_full: bool, size: usize, max_rows: u64, max_bytes: u64) -> Admit {
        let mut s = self.state();
        if !s.spilling && !lane_full {
            return Admit::Lane;
        }
        if s.rows >= max_rows || s.bytes + size as u64 > max_bytes && s.rows > 0 {
            return Admit::Full;
        }
        s.spilling = true;
        s.unwritten += 1;
        s.rows += 1;
        s.bytes += size as u64;
        Admit::Spill
    }

    /// A message [`Gate::admit`] counted could not be handed to the spiller after all.
    pub fn unsent(&self, size: usize) {
        let mut s = self.state();
        s.unwritten -= 1;
        s.rows = s.rows.saturating_sub(1);
        s.bytes = s.bytes.saturating_sub(size as u64);
    }

    /// The spiller wrote `n` of this tenant's messages.
    fn wrote(&self, n: u64) {
        let mut s = self.state();
        s.unwritten -= n;
        s.behind = s.behind.saturating_sub(n);
        s.writes += 1;
        drop(s);
        self.written.notify_one();
    }

    /// Rows found in the database at an assignment (another instance's, or an earlier run's).
    pub fn found(&self, rows: u64, bytes: u64) {
        let mut s = self.state();
        s.spilling = true;
        s.rows = s.rows.max(rows);
        s.bytes = s.bytes.max(bytes);
        drop(s);
        self.written.notify_one();
    }

    /// A partition was assigned whose spilled rows of this tenant may have older messages
    /// still to come from Kafka.
    pub fn hold(&self) {
        let mut s = self.state();
        s.spilling = true;
        s.holds += 1;
    }

    /// Every older message of a held partition has been read (and sent to the spiller), or
    /// the partition is no longer ours.
    pub fn release(&self) {
        let mut s = self.state();
        s.holds = s.holds.saturating_sub(1);
        if s.holds == 0 {
            s.behind = s.unwritten;
        }
        drop(s);
        self.written.notify_one();
    }

    /// May the lane drain? Not while older messages of a held partition are still to be
    /// read or written: they go before the rows spilled after them.
    fn drainable(&self) -> bool {
        let s = self.state();
        s.holds == 0 && s.behind == 0
    }

    /// The lane drained `rows` rows of `bytes`.
    fn drained(&self, rows: u64, bytes: u64) {
        let mut s = self.state();
        s.rows = s.rows.saturating_sub(rows);
        s.bytes = s.bytes.saturating_sub(bytes);
    }

    /// The writes counted so far: taken before a drain looks at the spill.
    fn writes(&self) -> u64 {
        self.state().writes
    }

    /// The drain found the spill empty after [`Gate::writes`] said `writes`: closes the gate
    /// unless something was sent or written since. Returns whether it closed.
    fn close_if_empty(&self, writes: u64) -> bool {
        let mut s = self.state();
        if s.unwritten == 0 && s.writes == writes {
            s.spilling = false;
            s.rows = 0;
            s.bytes = 0;
            true
        } else {
            false
        }
    }
}

/// A message on its way to the spill, with its tenant's gate.
pub(super) struct SpillJob {
    pub tenant: String,
    pub message: Arc<Incoming>,
    pub gate: Arc<Gate>,
}

/// How a lane's drain step ended.
pub(super) enum Drain {
    /// Rows to handle, oldest first.
    Rows(Vec<Work>),
    /// The spill is empty and the gate closed: the lane takes its queue again.
    Closed,
    /// Nothing to do now (rows still being written, or another instance drains): wait.
    Wait(Duration),
}

impl Pipeline {
    /// The spiller: writes spilled messages in batches, then marks their offsets finished
    /// and tells their lanes. A failed write is retried (the messages stay in flight, so
    /// their offsets hold) until it succeeds or the engine stops.
    pub(super) async fn spiller(
        self: Arc<Self>,
        mut jobs: mpsc::Receiver<SpillJob>,
        shutdown: CancellationToken,
    ) {
        loop {
            let first = tokio::select! {
                _ = shutdown.cancelled() => return,
                job = jobs.recv() => match job { Some(job) => job, None => return },
            };
            let mut batch = vec![first];
            while batch.len() < SPILL_BATCH {
                match jobs.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            if !self.write_spill(&batch, &shutdown).await {
                return;
            }
            let messages: Vec<&Incoming> = batch.iter().map(|j| &*j.message).collect();
            if let Err(e) = self.ingest.finished(&messages) {
                tracing::warn!(error = %e, "storing offsets failed");
            }
            self.metrics.events_spilled.inc_by(batch.len() as u64);
            for job in &batch {
                self.metrics
                    .spilled_messages
                    .with_label_values(&[self.metrics.tenant_label(&job.tenant)])
                    .inc();
                job.gate.wrote(1);
            }
        }
    }

    /// Writes a batch of spilled messages, retrying while the database fails; `false` on
    /// shutdown (the messages are re-read by whoever reads the partitions next).
    async fn write_spill(&self, batch: &[SpillJob], shutdown: &CancellationToken) -> bool {
        let rows: Vec<NewSpill<'_>> = batch
            .iter()
            .map(|j| NewSpill {
                tenant: &j.tenant,
                topic: &j.message.topic,
                partition: j.message.partition,
                offset: j.message.offset,
                key: j.message.key.as_deref(),
                payload: j.message.payload.as_deref(),
                headers: &j.message.headers,
                size: j.message.size(),
                age: j.message.received.elapsed(),
                timestamp: j.message.timestamp,
            })
            .collect();
        let mut delay = Duration::from_millis(100);
        loop {
            match spill::spill(&self.pool, &rows).await {
                Ok(()) => {
                    self.health.set_stall("spill", None);
                    return true;
                }
                Err(e) => {
                    self.metrics
                        .pipeline_stalls
                        .with_label_values(&["database"])
                        .inc();
                    tracing::warn!(error = %e.with_cause(), size = rows.len(), "spilling failed; waiting");
                    self.health
                        .set_stall("spill", Some(format!("database: {}", e.with_cause())));
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return false,
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(MAX_RETRY_DELAY);
        }
    }

    /// One step of a lane's drain: the tenant's oldest spilled messages under its lease,
    /// or the gate closed when there are none left.
    pub(super) async fn drain_step(
        &self,
        tenant: &str,
        gate: &Gate,
        decode: impl Fn(Incoming) -> Work,
    ) -> Result<Drain, crate::store::StoreError> {
        if !gate.drainable() {
            return Ok(Drain::Wait(LEASE_RETRY));
        }
        let holder = self.hub.instance();
        if !spill::lease(&self.pool, tenant, holder, LEASE).await? {
            return Ok(Drain::Wait(LEASE_RETRY));
        }
        let writes = gate.writes();
        // Only the partitions this instance owns: another's are its owner's to drain, once
        // it has re-read what came before them.
        let partitions = self.ingest.assignment();
        let rows = spill::oldest(&self.pool, tenant, &partitions, self.kafka.batch_max).await?;
        if rows.is_empty() {
            if gate.close_if_empty(writes) {
                spill::release(&self.pool, tenant, holder).await?;
                self.metrics
                    .spilled_messages
                    .with_label_values(&[self.metrics.tenant_label(tenant)])
                    .set(0);
                tracing::debug!(tenant, "spill drained; the lane takes its messages again");
                return Ok(Drain::Closed);
            }
            // Written since, or still being written: look again when the spiller says so.
            return Ok(Drain::Wait(LEASE_RETRY));
        }
        Ok(Drain::Rows(
            rows.into_iter()
                .map(|row| spilled_work(row, &decode))
                .collect(),
        ))
    }

    /// After a drained batch committed: the counts go down.
    pub(super) fn drained(&self, tenant: &str, gate: &Gate, batch: &[Work]) {
        let bytes: usize = batch.iter().map(|w| w.message.size()).sum();
        gate.drained(batch.len() as u64, bytes as u64);
        let gauge = self
            .metrics
            .spilled_messages
            .with_label_values(&[self.metrics.tenant_label(tenant)]);
        gauge.sub((batch.len() as i64).min(gauge.get().max(0)));
    }
}

/// A spilled row as the message it was, marked with its row.
fn spilled_work(row: Spilled, decode: &impl Fn(Incoming) -> Work) -> Work {
    let age = Duration::from_secs_f64(row.age_secs.max(0.0));
    let message = Incoming {
        headers: row.headers(),
        topic: row.topic,
        partition: row.partition,
        offset: row.kafka_offset,
        key: row.msg_key,
        payload: row.payload,
        received: Instant::now().checked_sub(age).unwrap_or_else(Instant::now),
        kafka_delay: None,
        timestamp: row.kafka_timestamp,
    };
    let mut work = decode(message);
    work.spilled = Some(row.id);
    work
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tenant_spills_once_its_lane_is_full_and_keeps_spilling_until_drained() {
        let gate = Gate::default();
        assert_eq!(gate.admit(false, 10, 100, 1_000), Admit::Lane);
        assert_eq!(gate.admit(true, 10, 100, 1_000), Admit::Spill);
        // The lane has room again, but an earlier message is spilled: this one follows it.
        assert_eq!(gate.admit(false, 10, 100, 1_000), Admit::Spill);
        let looked = gate.writes();
        // Nothing written yet: an empty spill does not close the gate.
        assert!(!gate.close_if_empty(looked));
        gate.wrote(2);
        // Written after the drain looked: it looks again.
        assert!(!gate.close_if_empty(looked));
        let looked = gate.writes();
        gate.drained(2, 20);
        assert!(gate.close_if_empty(looked));
        assert_eq!(gate.admit(false, 10, 100, 1_000), Admit::Lane);
    }

    #[test]
    fn a_held_partition_is_drained_only_once_its_older_messages_are_written() {
        let gate = Gate::default();
        gate.found(10, 100);
        gate.hold();
        assert!(gate.is_spilling() && !gate.drainable());
        // An older message re-read from Kafka goes to the spill, in its place.
        assert_eq!(gate.admit(false, 10, 100, 1_000), Admit::Spill);
        gate.release();
        assert!(!gate.drainable(), "the older message is not written yet");
        gate.wrote(1);
        assert!(gate.drainable());
    }

    #[test]
    fn the_spill_is_bounded_by_rows_and_bytes() {
        let gate = Gate::default();
        assert_eq!(gate.admit(true, 10, 2, 1_000), Admit::Spill);
        assert_eq!(gate.admit(true, 10, 2, 1_000), Admit::Spill);
        assert_eq!(gate.admit(true, 10, 2, 1_000), Admit::Full);
        gate.unsent(10);
        assert_eq!(gate.admit(true, 10, 2, 1_000), Admit::Spill);

        let gate = Gate::default();
        assert_eq!(gate.admit(true, 600, 100, 1_000), Admit::Spill);
        assert_eq!(gate.admit(true, 600, 100, 1_000), Admit::Full);
        // A message larger than the whole bound still goes, alone, rather than never.
        let gate = Gate::default();
        assert_eq!(gate.admit(true, 5_000, 100, 1_000), Admit::Spill);
        // Spilling off (no rows allowed): a full lane pauses, as before.
        assert_eq!(Gate::default().admit(true, 1, 0, 1_000), Admit::Full);
    }
}
