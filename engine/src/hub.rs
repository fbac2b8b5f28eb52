//! The fan-out hub: which (tenant, user) has something new, and who is listening.
//!
//! The hub carries "user U of tenant T now has sequence number N". Within an instance, the
//! writer publishes after its commit; across instances, every transaction that writes stream
//! rows also NOTIFYs them (`store::wake::announce`), and `cluster::listen` publishes what other
//! instances committed, so a stream on any instance hears of rows written on any other.
//!
//! A stream that wakes up takes what it has not sent yet from the rows this instance
//! committed for its user ([`Hub::publish_row`]) when nothing is missing before them, and
//! reads it from PostgreSQL otherwise (another instance's rows, an inbox change, a stream
//! further behind). The hub keeps a row until every stream of its user here has taken it,
//! within a bound per user, so a user's thousand tabs share one copy (and its frame's JSON,
//! made once). So a slow client never makes the engine buffer beyond that bound (it simply
//! reads later), ordering and gaps are PostgreSQL's to keep, live delivery and
//! `Last-Event-ID` replay are the same code, and the common case costs no query.
//!
//! The hub also notes each user's first stream opening and last closing, which `cluster`
//! writes as the user's presence.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::model::StoredNotification;

pub type Key = (String, String);

struct Entry {
    latest: watch::Sender<i64>,
    connections: usize,
    /// The user's newest rows written on this instance that some stream has not taken yet,
    /// oldest first, with their sizes, so the user's streams take them from memory instead
    /// of reading them back (see [`Hub::publish_row`]).
    recent: VecDeque<(Arc<StoredNotification>, usize)>,
    recent_bytes: usize,
    /// Each open stream's newest row taken (from memory or PostgreSQL).
    cursors: Vec<Arc<AtomicI64>>,
}

impl Entry {
    /// Moves the user's watermark to `seq` (never back), waking their streams if it moved.
    fn advance(&self, seq: i64) {
        self.latest.send_if_modified(|current| {
            let newer = seq > *current;
            if newer {
                *current = seq;
            }
            newer
        });
    }

    /// Drops the rows every stream has taken, then the oldest while over the bounds.
    fn trim(&mut self) {
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

/// Rows kept at most per listening user (not yet taken by all of its streams); a stream
/// further behind reads from PostgreSQL.
const RECENT_ROWS: usize = 256;
/// Bytes (title, body, data) kept at most per listening user.
const RECENT_BYTES: usize = 64 * 1024;
/// Rows larger than this are not kept: their streams read them.
pub const RECENT_ROW_BYTES: usize = 4 * 1024;

#[derive(Default)]
pub struct Hub {
    /// This instance's id (a UUID per start): its own announcements are not news to it.
    instance: String,
    entries: Mutex<HashMap<Key, Entry>>,
    /// Open streams per tenant (updated under the `entries` lock).
    tenants: Mutex<HashMap<String, usize>>,
    /// When each user started their recent deep replays (see [`Hub::deep_replay`]).
    replays: Mutex<Recent>,
    /// When each user was given their recent stream tickets (see [`Hub::ticket`]).
    tickets: Mutex<Recent>,
    /// Users whose first stream opened (`true`) or last stream closed (`false`) since the
    /// presence writer last took them (updated under the `entries` lock).
    presence_changes: Mutex<HashMap<Key, bool>>,
    presence_changed: tokio::sync::Notify,
}

/// Per user, the times of their recent admissions of one kind.
type Recent = HashMap<Key, VecDeque<Instant>>;

/// A sliding one-minute window per user: admits at `now` if fewer than `per_minute` were
/// admitted in the minute before; `Err` holds how long until the next one is.
fn admit(
    recent: &Mutex<Recent>,
    tenant: &str,
    user_id: &str,
    per_minute: u32,
    now: Instant,
) -> Result<(), Duration> {
    let mut recent = recent.lock().expect("hub lock poisoned");
    let expire = |times: &mut VecDeque<Instant>| {
        while times
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= REPLAY_WINDOW)
        {
            times.pop_front();
        }
    };
    if recent.len() >= MAX_REPLAY_ENTRIES {
        recent.retain(|_, times| {
            expire(times);
            !times.is_empty()
        });
    }
    let times = recent
        .entry((tenant.to_owned(), user_id.to_owned()))
        .or_default();
    expire(times);
    if times.len() >= per_minute as usize {
        let oldest = *times.front().expect("at least per_minute ≥ 1 entries");
        return Err(REPLAY_WINDOW.saturating_sub(now.saturating_duration_since(oldest)));
    }
    times.push_back(now);
    Ok(())
}

/// The window of `sse.deep_replays_per_minute` and `sse.tickets_per_minute`.
const REPLAY_WINDOW: Duration = Duration::from_secs(60);
/// Users tracked (per kind) before stale entries are swept.
const MAX_REPLAY_ENTRIES: usize = 10_000;

/// How many streams may be open on this instance.
#[derive(Debug, Clone, Copy)]
pub struct Caps {
    pub per_user: usize,
    pub per_tenant: usize,
    pub global: usize,
}

/// Why a subscription was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CapExceeded {
    #[error("too many open streams for this user")]
    User,
    #[error("too many open streams for this tenant")]
    Tenant,
    #[error("too many open streams on this instance")]
    Global,
}

impl Hub {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            instance: uuid::Uuid::new_v4().to_string(),
            ..Self::default()
        })
    }

    /// This instance's id (a UUID per start).
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// Tells the user's open streams that `seq` exists. Call after the transaction that
    /// wrote it has committed, never before: a stream must not look for a row it cannot see.
    pub fn publish(&self, tenant: &str, user_id: &str, seq: i64) {
        let entries = self.entries.lock().expect("hub lock poisoned");
        if let Some(entry) = entries.get(&(tenant.to_owned(), user_id.to_owned())) {
            entry.advance(seq);
        }
    }

    /// Hands a committed row of `size` bytes to the user's streams on this instance (and
    /// tells them, like [`Hub::publish`]): they take it from memory when it is the next one
    /// they need, and read from PostgreSQL otherwise. Call after the commit, in sequence
    /// order, with rows of at most [`RECENT_ROW_BYTES`] (a larger one is [`Hub::publish`]ed:
    /// its streams read it).
    pub fn publish_row(
        &self,
        tenant: &str,
        user_id: &str,
        row: Arc<StoredNotification>,
        size: usize,
    ) {
        let mut entries = self.entries.lock().expect("hub lock poisoned");
        let Some(entry) = entries.get_mut(&(tenant.to_owned(), user_id.to_owned())) else {
            return;
        };
        let seq = row.seq;
        if entry.recent.back().is_some_and(|(last, _)| last.seq >= seq) {
            // Out of order (cannot happen within a lane): start over from this row.
            entry.recent.clear();
            entry.recent_bytes = 0;
        }
        entry.recent.push_back((row, size));
        entry.recent_bytes += size;
        entry.trim();
        entry.advance(seq);
    }

    /// Wakes every open stream of this instance: each reads what it has not sent yet (and
    /// finds nothing when nothing is new). For when wake-ups may have been missed.
    pub fn wake_all(&self) {
        let entries = self.entries.lock().expect("hub lock poisoned");
        for entry in entries.values() {
            entry.latest.send_modify(|_| {});
        }
    }

    /// Opens a stream for (tenant, user) within the connection caps.
    pub fn subscribe(
        self: &Arc<Self>,
        tenant: &str,
        user_id: &str,
        caps: Caps,
    ) -> Result<Subscription, CapExceeded> {
        let mut entries = self.entries.lock().expect("hub lock poisoned");
        let mut tenants = self.tenants.lock().expect("hub lock poisoned");
        let total: usize = tenants.values().sum();
        if total >= caps.global {
            return Err(CapExceeded::Global);
        }
        if tenants.get(tenant).copied().unwrap_or(0) >= caps.per_tenant {
            return Err(CapExceeded::Tenant);
        }
        let key = (tenant.to_owned(), user_id.to_owned());
        let entry = entries.entry(key.clone()).or_insert_with(|| Entry {
            latest: watch::channel(0).0,
            connections: 0,
            recent: VecDeque::new(),
            recent_bytes: 0,
            cursors: Vec::new(),
        });
        if entry.connections >= caps.per_user {
            return Err(CapExceeded::User);
        }
        entry.connections += 1;
        if entry.connections == 1 {
            self.presence_change(key.clone(), true);
        }
        *tenants.entry(tenant.to_owned()).or_default() += 1;
        // Nothing taken yet holds no row back: until the stream knows its cursor (see
        // [`Subscription::took`]), what it needs it reads from PostgreSQL.
        let taken = Arc::new(AtomicI64::new(i64::MAX));
        entry.cursors.push(taken.clone());
        Ok(Subscription {
            updates: entry.latest.subscribe(),
            hub: self.clone(),
            key,
            taken,
        })
    }

    /// Admits a deep replay (a stream starting far behind, which reads the user's history
    /// from PostgreSQL) for (tenant, user) at `now`, at most `per_minute` in any minute.
    /// `Err` holds how long until the next one is admitted.
    pub fn deep_replay(
        &self,
        tenant: &str,
        user_id: &str,
        per_minute: u32,
        now: Instant,
    ) -> Result<(), Duration> {
        admit(&self.replays, tenant, user_id, per_minute, now)
    }

    /// Admits a stream ticket for (tenant, user) at `now`, at most `per_minute` in any
    /// minute (each is a database row until it is used or expires).
    pub fn ticket(
        &self,
        tenant: &str,
        user_id: &str,
        per_minute: u32,
        now: Instant,
    ) -> Result<(), Duration> {
        admit(&self.tickets, tenant, user_id, per_minute, now)
    }

    /// Notes a user's first stream opening or last closing, for the presence writer.
    fn presence_change(&self, key: Key, online: bool) {
        self.presence_changes
            .lock()
            .expect("hub lock poisoned")
            .insert(key, online);
        self.presence_changed.notify_one();
    }

    /// The users whose first stream opened (`true`) or last stream closed (`false`) since
    /// the last call, each with where it ended up.
    pub fn take_presence_changes(&self) -> HashMap<Key, bool> {
        std::mem::take(&mut *self.presence_changes.lock().expect("hub lock poisoned"))
    }

    /// Resolves when [`Hub::take_presence_changes`] has something (or had, since the last
    /// call).
    pub async fn presence_changed(&self) {
        self.presence_changed.notified().await
    }

    /// Every user with a stream open on this instance.
    pub fn connected_users(&self) -> Vec<Key> {
        let entries = self.entries.lock().expect("hub lock poisoned");
        entries.keys().cloned().collect()
    }

    /// Streams open on this instance, and the distinct users they belong to.
    pub fn counts(&self) -> (usize, usize) {
        let entries = self.entries.lock().expect("hub lock poisoned");
        let streams = entries.values().map(|e| e.connections).sum();
        (streams, entries.len())
    }

    /// Is anyone of (tenant, user) connected to this instance right now?
    pub fn is_connected(&self, tenant: &str, user_id: &str) -> bool {
        self.entries
            .lock()
            .expect("hub lock poisoned")
            .contains_key(&(tenant.to_owned(), user_id.to_owned()))
    }
}

/// One open stream. Dropping it releases its slot.
pub struct Subscription {
    pub updates: watch::Receiver<i64>,
    hub: Arc<Hub>,
    key: Key,
    /// The newest row this stream has taken; the hub keeps no row older than every
    /// stream's.
    taken: Arc<AtomicI64>,
}

impl Subscription {
    /// Every row after `cursor` up to `latest`, from memory, when the hub holds all of them
    /// without a gap (and this stream has then taken them); `None` means: read them from
    /// PostgreSQL.
    pub fn recent_after(&self, cursor: i64, latest: i64) -> Option<Vec<Arc<StoredNotification>>> {
        let mut entries = self.hub.entries.lock().expect("hub lock poisoned");
        let entry = entries.get_mut(&self.key)?;
        let rows: Vec<_> = entry
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
        self.took(latest);
        // The only stream lets go of what it took at once; a user's many streams let go at
        // the next row (a scan of every cursor on each take would cost too much).
        if entry.connections == 1 {
            entry.trim();
        }
        Some(rows)
    }

    /// Notes that the stream has taken every row up to `seq` (from wherever): the hub need
    /// not keep them for it.
    pub fn took(&self, seq: i64) {
        self.taken.store(seq, Ordering::Relaxed);
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut entries = self.hub.entries.lock().expect("hub lock poisoned");
        let mut tenants = self.hub.tenants.lock().expect("hub lock poisoned");
        if let Some(entry) = entries.get_mut(&self.key) {
            entry.cursors.retain(|c| !Arc::ptr_eq(c, &self.taken));
            entry.connections -= 1;
            if entry.connections == 0 {
                entries.remove(&self.key);
                self.hub.presence_change(self.key.clone(), false);
            }
        }
        if let Some(n) = tenants.get_mut(&self.key.0) {
            *n -= 1;
            if *n == 0 {
                tenants.remove(&self.key.0);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn publishes_only_to_the_right_user() {
        let hub = Hub::new();
        let caps = Caps {
            per_user: 2,
            per_tenant: 10,
            global: 10,
        };
        let mut a = hub.subscribe("t1", "u1", caps).unwrap();
        let b = hub.subscribe("t2", "u1", caps).unwrap();
        hub.publish("t1", "u1", 3);
        a.updates.changed().await.unwrap();
        assert_eq!(*a.updates.borrow_and_update(), 3);
        assert!(!b.updates.has_changed().unwrap());
        // An older sequence number never moves the watermark back.
        hub.publish("t1", "u1", 2);
        assert!(!a.updates.has_changed().unwrap());
    }

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

    #[test]
    fn limits_deep_replays_per_user_and_minute() {
        let hub = Hub::new();
        let t0 = Instant::now();
        assert!(hub.deep_replay("t", "u", 2, t0).is_ok());
        assert!(
            hub.deep_replay("t", "u", 2, t0 + Duration::from_secs(10))
                .is_ok()
        );
        let wait = hub
            .deep_replay("t", "u", 2, t0 + Duration::from_secs(20))
            .unwrap_err();
        assert_eq!(wait, Duration::from_secs(40));
        // Another user, or the same tenant's other user, is not affected.
        assert!(
            hub.deep_replay("t", "v", 2, t0 + Duration::from_secs(20))
                .is_ok()
        );
        assert!(
            hub.deep_replay("t2", "u", 2, t0 + Duration::from_secs(20))
                .is_ok()
        );
        // A minute after the first, one more is admitted.
        assert!(
            hub.deep_replay("t", "u", 2, t0 + Duration::from_secs(60))
                .is_ok()
        );
    }

    #[test]
    fn limits_tickets_per_user_apart_from_replays() {
        let hub = Hub::new();
        let t0 = Instant::now();
        assert!(hub.ticket("t", "u", 1, t0).is_ok());
        assert_eq!(
            hub.ticket("t", "u", 1, t0 + Duration::from_secs(15)),
            Err(Duration::from_secs(45))
        );
        // Deep replays have a window of their own.
        assert!(hub.deep_replay("t", "u", 1, t0).is_ok());
        assert!(
            hub.ticket("t", "u", 1, t0 + Duration::from_secs(60))
                .is_ok()
        );
    }

    #[test]
    fn enforces_caps_and_releases_slots() {
        let hub = Hub::new();
        let caps = Caps {
            per_user: 1,
            per_tenant: 2,
            global: 3,
        };
        let s1 = hub.subscribe("t", "u", caps).unwrap();
        assert_eq!(hub.subscribe("t", "u", caps).err(), Some(CapExceeded::User));
        let _s2 = hub.subscribe("t", "v", caps).unwrap();
        assert_eq!(
            hub.subscribe("t", "w", caps).err(),
            Some(CapExceeded::Tenant)
        );
        let _s3 = hub.subscribe("t2", "w", caps).unwrap();
        assert_eq!(
            hub.subscribe("t3", "w", caps).err(),
            Some(CapExceeded::Global)
        );
        drop(s1);
        assert!(!hub.is_connected("t", "u"));
        assert!(hub.subscribe("t", "u", caps).is_ok());
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
                let caps = Caps { per_user: 3, per_tenant: 3, global: 3 };
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
