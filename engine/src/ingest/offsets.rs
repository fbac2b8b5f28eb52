//! Which offset of each partition is safe to store, when messages finish out of order.
//!
//! Messages of one partition are handled by several tenant lanes at once, so they finish
//! out of order. Kafka keeps one offset per partition: "everything before this is done".
//! The tracker counts the messages dispatched and not yet finished; a partition's safe
//! offset is its lowest unfinished offset (or one past the highest dispatched, when nothing
//! is unfinished). A crash re-reads from there: finished messages after it are re-read and
//! dropped as duplicates, unfinished ones are handled. Pure logic, tested without Kafka.

use std::collections::{BTreeMap, HashMap};

type Partition = (String, i32);

#[derive(Default)]
pub struct OffsetTracker {
    partitions: HashMap<Partition, PartitionState>,
}

#[derive(Default)]
struct PartitionState {
    /// Unfinished offsets, with how many times each is in flight (a partition taken away
    /// and given back can deliver an offset again while the first copy is still handled).
    in_flight: BTreeMap<i64, u32>,
    /// One past the highest offset dispatched.
    next: i64,
}

impl OffsetTracker {
    /// A message was handed to a lane.
    pub fn dispatched(&mut self, topic: &str, partition: i32, offset: i64) {
        let state = self
            .partitions
            .entry((topic.to_owned(), partition))
            .or_default();
        *state.in_flight.entry(offset).or_insert(0) += 1;
        state.next = state.next.max(offset + 1);
    }

    /// A message's outcome is committed. Returns the partition's safe offset if it moved.
    pub fn finished(&mut self, topic: &str, partition: i32, offset: i64) -> Option<i64> {
        let state = self.partitions.get_mut(&(topic.to_owned(), partition))?;
        let before = state.safe();
        match state.in_flight.get_mut(&offset) {
            Some(n) if *n > 1 => *n -= 1,
            Some(_) => {
                state.in_flight.remove(&offset);
            }
            // A message of a partition that was revoked (and maybe reassigned) meanwhile.
            None => return None,
        }
        let after = state.safe();
        (after > before).then_some(after)
    }

    /// The partition was revoked: whatever is still in flight for it is no longer ours to
    /// acknowledge (its next owner re-reads it).
    pub fn forget(&mut self, topic: &str, partition: i32) {
        self.partitions.remove(&(topic.to_owned(), partition));
    }
}

impl PartitionState {
    fn safe(&self) -> i64 {
        self.in_flight.keys().next().copied().unwrap_or(self.next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_safe_offset_is_the_lowest_unfinished_one() {
        let mut t = OffsetTracker::default();
        for offset in 10..15 {
            t.dispatched("a", 0, offset);
        }
        // 12 and 13 finish first (another tenant's lane): nothing before 10 is done yet.
        assert_eq!(t.finished("a", 0, 12), None);
        assert_eq!(t.finished("a", 0, 13), None);
        assert_eq!(t.finished("a", 0, 10), Some(11));
        assert_eq!(t.finished("a", 0, 11), Some(14));
        assert_eq!(t.finished("a", 0, 14), Some(15));
        // Partitions are independent.
        t.dispatched("a", 1, 3);
        t.dispatched("b", 0, 7);
        assert_eq!(t.finished("b", 0, 7), Some(8));
        assert_eq!(t.finished("a", 1, 3), Some(4));
    }

    #[test]
    fn a_revoked_partition_is_forgotten() {
        let mut t = OffsetTracker::default();
        t.dispatched("a", 0, 5);
        t.forget("a", 0);
        assert_eq!(t.finished("a", 0, 5), None);
        // Reassigned: it starts again from what the new assignment delivers.
        t.dispatched("a", 0, 5);
        t.dispatched("a", 0, 5);
        assert_eq!(t.finished("a", 0, 5), None, "one copy is still in flight");
        assert_eq!(t.finished("a", 0, 5), Some(6));
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        #[derive(Debug, Clone)]
        enum Op {
            /// The partition's next message.
            Deliver,
            /// An earlier message again (the partition taken away and given back).
            Redeliver(usize),
            /// A copy in flight finishes (lanes finish in any order).
            Finish(usize),
            /// The partition is revoked.
            Forget,
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                4 => Just(Op::Deliver),
                1 => any::<usize>().prop_map(Op::Redeliver),
                4 => any::<usize>().prop_map(Op::Finish),
                1 => Just(Op::Forget),
            ]
        }

        proptest! {
            /// Against a model: whatever order lanes finish in and however the partition
            /// comes and goes, the offset reported is exactly the lowest one in flight (or one
            /// past the highest dispatched), reported when and only when it moves: never
            /// past a message still in flight (no loss), never backwards.
            #[test]
            fn the_safe_offset_is_the_lowest_in_flight(ops in prop::collection::vec(op(), 1..300)) {
                let mut tracker = OffsetTracker::default();
                let mut next = 0i64;
                // The model, since the last assignment: copies in flight, highest dispatched.
                let mut in_flight: Vec<i64> = Vec::new();
                let mut highest: Option<i64> = None;
                let safe = |in_flight: &[i64], highest: Option<i64>| {
                    in_flight.iter().min().copied().or(highest.map(|h| h + 1))
                };
                for op in ops {
                    match op {
                        Op::Deliver => {
                            tracker.dispatched("t", 0, next);
                            in_flight.push(next);
                            highest = highest.max(Some(next));
                            next += 1;
                        }
                        Op::Redeliver(i) if next > 0 => {
                            let offset = (i % next as usize) as i64;
                            tracker.dispatched("t", 0, offset);
                            in_flight.push(offset);
                            highest = highest.max(Some(offset));
                        }
                        Op::Redeliver(_) => {}
                        Op::Finish(i) if !in_flight.is_empty() => {
                            let before = safe(&in_flight, highest);
                            let offset = in_flight.swap_remove(i % in_flight.len());
                            let after = safe(&in_flight, highest);
                            let reported = tracker.finished("t", 0, offset);
                            prop_assert_eq!(reported, after.filter(|a| Some(*a) > before));
                            if let Some(stored) = reported {
                                prop_assert!(in_flight.iter().all(|&o| o >= stored));
                            }
                        }
                        Op::Finish(_) => {}
                        Op::Forget => {
                            tracker.forget("t", 0);
                            // What was in flight is the next owner's; finishing it reports nothing.
                            for offset in in_flight.drain(..) {
                                prop_assert_eq!(tracker.finished("t", 0, offset), None);
                            }
                            highest = None;
                        }
                    }
                }
            }
        }
    }
}
