//! Unit tests of `dispatch`: lanes by tenant, a lane's bounds by count and by bytes, and
//! held messages offered again without overtaking each other.

use std::collections::VecDeque;

use super::*;
use crate::pipeline::fixtures::{event, message, rejection};

fn work(tenant: &str, offset: i64, payload: &[u8]) -> Work {
    Work {
        message: Arc::new(message("orders", offset, payload)),
        decoded: Ok(event(tenant, &format!("e{offset}"))),
        admitted: None,
        spilled: None,
    }
}

/// `message` counts the key and headers too: `order-1`, `trace` and `t1`.
const OVERHEAD: usize = 14;

#[test]
fn a_message_goes_to_its_tenants_lane_and_a_rejected_one_to_the_rejects_lane() {
    assert_eq!(work("acme", 1, b"{}").lane(), "acme");
    let rejected = Work {
        decoded: Err(rejection()),
        ..work("acme", 2, b"x")
    };
    // Its tenant as read is not trusted: all rejects share one lane.
    assert_eq!(rejected.lane(), REJECTS_LANE);
}

#[tokio::test]
async fn a_lane_full_by_bytes_gives_the_message_back_until_bytes_are_handled() {
    let max = 2 * OVERHEAD + 10;
    let (sender, mut queue) = mpsc::channel(16);
    let lane = Lane::new(sender, max);
    assert_eq!(work("acme", 1, &[b'a'; 5]).message.size(), OVERHEAD + 5);

    assert!(lane.offer(work("acme", 1, &[b'a'; 5]), max).is_none());
    assert!(lane.offer(work("acme", 2, &[b'a'; 5]), max).is_none());
    // 2 × 19 bytes are in the lane: the 15 of a third do not fit in 38.
    let back = lane
        .offer(work("acme", 3, b"a"), max)
        .expect("full by bytes");
    assert!(back.admitted.is_none(), "a refused message holds no bytes");

    // The first is handled (dropped): its bytes come back.
    drop(queue.recv().await.unwrap());
    assert!(lane.offer(back, max).is_none());
    let queued: Vec<i64> = [queue.recv().await.unwrap(), queue.recv().await.unwrap()]
        .iter()
        .map(|w| w.message.offset)
        .collect();
    assert_eq!(queued, [2, 3]);
}

#[tokio::test]
async fn a_message_larger_than_the_lane_waits_for_an_empty_lane_not_forever() {
    let max = OVERHEAD + 4;
    let (sender, mut queue) = mpsc::channel(16);
    let lane = Lane::new(sender, max);
    assert!(lane.offer(work("acme", 1, b"a"), max).is_none());
    let large = lane
        .offer(work("acme", 2, &[b'a'; 100]), max)
        .expect("not while the lane holds anything");
    drop(queue.recv().await.unwrap());
    assert!(lane.offer(large, max).is_none(), "it takes the whole lane");
    let in_lane = queue.recv().await.unwrap();
    assert_eq!(in_lane.message.offset, 2);
    assert!(lane.offer(work("acme", 3, b""), max).is_some());
}

#[tokio::test]
async fn a_lane_full_by_count_gives_the_message_back_and_a_gone_lane_drops_it() {
    let (sender, queue) = mpsc::channel(1);
    let lane = Lane::new(sender, 1 << 20);
    assert!(lane.offer(work("acme", 1, b"{}"), 1 << 20).is_none());
    let back = lane
        .offer(work("acme", 2, b"{}"), 1 << 20)
        .expect("full by count");
    assert_eq!(back.message.offset, 2);
    // The lane ended (shutdown): nothing to hold, its partitions are re-read.
    drop(queue);
    assert!(lane.offer(back, 1 << 20).is_none());
}

#[test]
fn held_messages_never_overtake_one_their_lane_refused() {
    let held: VecDeque<(&str, u32)> =
        VecDeque::from([("a", 1), ("b", 2), ("a", 3), ("c", 4), ("b", 5)]);
    let mut offered = Vec::new();
    // Lane `a` is full; `b` and `c` take everything.
    let still = requeue(
        held,
        |(lane, _)| lane,
        |item| {
            offered.push(item.1);
            (item.0 == "a").then_some(item)
        },
    );
    assert_eq!(offered, [1, 2, 4, 5], "3 waits behind 1, unoffered");
    assert_eq!(still, [("a", 1), ("a", 3)]);
}

#[test]
fn held_messages_of_a_lane_that_fills_midway_keep_their_order() {
    let held: VecDeque<(&str, u32)> = VecDeque::from([("a", 1), ("a", 2), ("a", 3)]);
    let mut room = 1;
    let still = requeue(
        held,
        |(lane, _)| lane,
        |item| {
            if room == 0 {
                return Some(item);
            }
            room -= 1;
            None
        },
    );
    assert_eq!(still, [("a", 2), ("a", 3)]);
}
