//! The rows a user's streams may take from memory: the window of their newest rows
//! committed on this instance, and the watermark that wakes the streams.
//!
//! The window holds a row until every stream of its user here has taken it, within
//! [`RECENT_ROWS`] and [`RECENT_BYTES`] per user; a stream takes from it only a run of rows
//! with no gap from its cursor to the latest, and reads PostgreSQL otherwise. So a slow
//! client costs at most the bounds, and ordering and gaps stay PostgreSQL's to keep.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use tokio::sync::watch;

use crate::model::StoredNotification;

/// Rows kept at most per listening user (not yet taken by all of its streams); a stream
/// further behind reads from PostgreSQL.
const RECENT_ROWS: usize = 256;
/// Bytes (title, body, data) kept at most per listening user.
const RECENT_BYTES: usize = 64 * 1024;
/// Rows larger than this are not kept: their streams read them.
pub const RECENT_ROW_BYTES: usize = 4 * 1024;

/// One listening user on this instance.
pub(super) struct Entry {
    pub(super) latest: watch::Sender<i64>,
    pub(super) connections: usize,
    /// The user's newest rows written on this instance that some stream has not taken yet,
    /// oldest first, with their sizes, so the user's streams take them from memory instead
    /// of reading them back (see [`super::Hub::publish_row`]).
    recent: VecDeque<(Arc<StoredNotification>, usize)>,
    recent_bytes: usize,
    /// Each open stream's newest row taken (from memory or PostgreSQL).
    pub(super) cursors: Vec<Arc<AtomicI64>>,
}

impl Entry {
    /// A user with no stream yet and nothing kept.
    pub(super) fn new() -> Self {
        Entry {
            latest: watch::channel(0).0,
            connections: 0,
            recent: VecDeque::new(),
            recent_bytes: 0,
            cursors: Vec::new(),
        }
    }

    /// Moves the user's watermark to `seq` (never back), waking their streams if it moved.
    pub(super) fn advance(&self, seq: i64) {
        self.latest.send_if_modified(|current| {
            let newer = seq > *current;
            if newer {
                *current = seq;
            }
            newer
        });
    }

    /// Keeps a committed row of `size` bytes for the user's streams, within the bounds.
    pub(super) fn keep(&mut self, row: Arc<StoredNotification>, size: usize) {
        if self
            .recent
            .back()
            .is_some_and(|(last, _)| last.seq >= row.seq)
        {
            // Out of order (cannot happen within a lane): start over from this row.
            self.recent.clear();
            self.recent_bytes = 0;
        }
        self.recent.push_back((row, size));
        self.recent_bytes += size;
        self.trim();
    }

    /// Every kept row after `cursor` up to `latest`, if they are all here without a gap.
    pub(super) fn rows_after(
        &self,
        cursor: i64,
        latest: i64,
    ) -> Option<Vec<Arc<StoredNotification>>> {
        let rows: Vec<_> = self
            .recent
            .iter()
            .filter(|(r, _)| r.seq > cursor)
            .map(|(r, _)| r.clone())
            .collect();
        let contiguous = rows
            .iter()
            .enumerate()
            .all(|(i, r)| r.seq == cursor + 1 + i as i64);
        if !(contiguous && rows.last().is_some_and(|r| r.seq == latest)) {
            return None;
        }
        Some(rows)
    }

    /// Drops the rows every stream has taken, then the oldest while over the bounds.
    pub(super) fn trim(&mut self) {
        let taken = self
            .cursors
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .min()
            .unwrap_or(i64::MAX);
        while let Some((row, size)) = self.recent.front() {
            let over = self.recent.len() > RECENT_ROWS || self.recent_bytes > RECENT_BYTES;
            if row.seq > taken && !over {
                break;
            }
            self.recent_bytes -= *size;
            self.recent.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::{Caps, Hub, Subscription};

    fn row(seq: i64) -> Arc<StoredNotification> {
        Arc::new(StoredNotification {
            seq,
            event_id: format!("e{seq}"),
            kind: "notification".into(),
            title: Some("t".into()),
            body: None,
            category: None,
            data: sqlx::types::Json(serde_json::json!({})),
            created_at: chrono::Utc::now(),
            read_at: None,
            archived_at: None,
            frame_data: Default::default(),
        })
    }

    #[tokio::test]
    async fn streams_take_committed_rows_from_memory_only_without_a_gap() {
        let hub = Hub::new();
        let caps = Caps {
            per_user: 2,
            per_tenant: 10,
            global: 10,
            tenant_share: 1.0,
        };
        let seqs = |rows: Option<Vec<Arc<StoredNotification>>>| {
            rows.map(|r| r.iter().map(|r| r.seq).collect::<Vec<_>>())
        };
        let mut s = hub.subscribe("t", "u", caps).unwrap();
        let other = hub.subscribe("t", "v", caps).unwrap();
        s.took(0);
        hub.publish_row("t", "u", row(1), 100);
        hub.publish_row("t", "u", row(2), 100);
        s.updates.changed().await.unwrap();
        let latest = *s.updates.borrow_and_update();
        assert_eq!(latest, 2);
        assert_eq!(
            seqs(other.recent_after(0, latest)),
            None,
            "another user's rows"
        );
        assert_eq!(seqs(s.recent_after(0, latest)), Some(vec![1, 2]));
        // The user's only stream took them: the hub let go of them.
        assert_eq!(seqs(s.recent_after(1, latest)), None);
        // A row only announced (another instance's, an inbox change) is read from the
        // database, and so is everything after it.
        hub.publish("t", "u", 3);
        assert_eq!(seqs(s.recent_after(2, 3)), None);
        s.took(3);
        hub.publish_row("t", "u", row(4), 100);
        assert_eq!(seqs(s.recent_after(2, 4)), None, "3 is not in memory");
        assert_eq!(seqs(s.recent_after(3, 4)), Some(vec![4]));

        // Two streams: a row stays until both have taken it.
        let second = hub.subscribe("t", "u", caps).unwrap();
        second.took(4);
        hub.publish_row("t", "u", row(5), 100);
        hub.publish_row("t", "u", row(6), 100);
        assert_eq!(seqs(s.recent_after(4, 6)), Some(vec![5, 6]));
        assert_eq!(seqs(second.recent_after(4, 6)), Some(vec![5, 6]));
        hub.publish_row("t", "u", row(7), 100);
        assert_eq!(seqs(s.recent_after(4, 7)), None, "both took 5 and 6");
        assert_eq!(seqs(s.recent_after(6, 7)), Some(vec![7]));
        // A stream that stops taking holds back at most RECENT_ROWS rows (`second` is at 6):
        // past them, it reads from the database.
        let last = 7 + RECENT_ROWS as i64;
        for seq in 8..=last {
            hub.publish_row("t", "u", row(seq), 100);
        }
        assert_eq!(seqs(second.recent_after(6, last)), None);
        assert_eq!(
            seqs(second.recent_after(last - 2, last)),
            Some(vec![last - 1, last])
        );
        // ... and at most RECENT_BYTES bytes.
        let big = RECENT_ROW_BYTES as i64;
        for seq in last + 1..=last + 16 {
            hub.publish_row("t", "u", row(seq), big as usize);
        }
        let kept = (RECENT_BYTES / RECENT_ROW_BYTES) as i64;
        assert_eq!(
            seqs(second.recent_after(last + 16 - kept - 1, last + 16)),
            None
        );
        assert_eq!(
            seqs(second.recent_after(last + 16 - kept, last + 16)).map(|v| v.len()),
            Some(kept as usize)
        );
        // Nobody listening: nothing is kept.
        drop((s, second, other));
        hub.publish_row("t", "w", row(1), 100);
        assert!(!hub.is_connected("t", "w"));
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        #[derive(Debug, Clone)]
        enum Op {
            /// The pipeline commits the user's next row and hands it over (of this size).
            Row(usize),
            /// The next row is only announced (another instance's, an inbox change).
            Announce,
            /// A stream catches up: from memory if the hub can, else from PostgreSQL.
            Read(usize),
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                6 => (1..=RECENT_ROW_BYTES).prop_map(Op::Row),
                1 => Just(Op::Announce),
                4 => any::<usize>().prop_map(Op::Read),
            ]
        }

        proptest! {
            /// A user's streams (one to three) and the rows committed for them, in any
            /// interleaving: what a stream takes from memory is exactly the rows after its
            /// cursor up to the latest, never a gap, a repeat or a row beyond; the hub keeps
            /// within its bounds; and while every row after a stream's cursor was handed over
            /// and fits the bounds, the stream gets them from memory.
            #[test]
            fn streams_take_exactly_their_next_rows(
                streams in 1usize..=3,
                ops in prop::collection::vec(op(), 1..400),
            ) {
                let hub = Hub::new();
                let caps = Caps { per_user: 3, per_tenant: 3, global: 3, tenant_share: 1.0 };
                let subs: Vec<Subscription> =
                    (0..streams).map(|_| hub.subscribe("t", "u", caps).unwrap()).collect();
                for s in &subs {
                    s.took(0);
                }
                let mut cursors = vec![0i64; streams];
                let mut latest = 0i64;
                // Each seq's size when it was handed over, None when only announced.
                let mut handed: Vec<Option<usize>> = vec![None];
                for op in ops {
                    match op {
                        Op::Row(size) => {
                            latest += 1;
                            handed.push(Some(size));
                            hub.publish_row("t", "u", row(latest), size);
                        }
                        Op::Announce => {
                            latest += 1;
                            handed.push(None);
                            hub.publish("t", "u", latest);
                        }
                        Op::Read(i) => {
                            let i = i % streams;
                            let cursor = cursors[i];
                            if cursor == latest {
                                continue;
                            }
                            let wanted: Vec<i64> = (cursor + 1..=latest).collect();
                            // Everything after the cursor handed over, within the bounds: the
                            // hub must still hold it for this stream.
                            let sizes: Option<Vec<usize>> =
                                wanted.iter().map(|&seq| handed[seq as usize]).collect();
                            let must = sizes.is_some_and(|sizes| {
                                sizes.len() <= RECENT_ROWS
                                    && sizes.iter().sum::<usize>() <= RECENT_BYTES
                            });
                            match subs[i].recent_after(cursor, latest) {
                                Some(rows) => {
                                    let got: Vec<i64> = rows.iter().map(|r| r.seq).collect();
                                    prop_assert_eq!(got, wanted);
                                }
                                None => {
                                    prop_assert!(!must, "stream {} at {} lost rows up to {}", i, cursor, latest);
                                    // It reads them from PostgreSQL.
                                    subs[i].took(latest);
                                }
                            }
                            cursors[i] = latest;
                        }
                    }
                    let entries = hub.entries.lock().unwrap();
                    let entry = &entries[&("t".to_owned(), "u".to_owned())];
                    prop_assert!(entry.recent.len() <= RECENT_ROWS);
                    prop_assert!(entry.recent_bytes <= RECENT_BYTES);
                    prop_assert_eq!(
                        entry.recent_bytes,
                        entry.recent.iter().map(|(_, size)| size).sum::<usize>()
                    );
                }
            }
        }
    }
}
