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
//! writes as the user's presence, and holds the instance's id and its seal
//! (`store::wake::Seal`), with which everything it tells other instances is signed.
//!
//! By role: `recent` keeps each user's newest rows and watermark, `admit` the per-user
//! windows for deep replays and tickets; this file holds the streams, their caps and
//! presence.

mod admit;
mod recent;

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::model::StoredNotification;
use crate::store::wake::Seal;
use admit::{Recent, admit};
use recent::Entry;
pub use recent::RECENT_ROW_BYTES;

pub type Key = (String, String);

pub struct Hub {
    /// This instance's id (a UUID per start): its own announcements are not news to it.
    instance: String,
    /// The seal on what this instance tells the others (and how it checks what they say).
    seal: Arc<Seal>,
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

/// How many streams may be open on this instance.
#[derive(Debug, Clone, Copy)]
pub struct Caps {
    pub per_user: usize,
    pub per_tenant: usize,
    pub global: usize,
    /// The most of the slots the other tenants leave free that one tenant may hold
    /// (`sse.tenant_share`): see [`tenant_room`].
    pub tenant_share: f64,
}

/// How many streams a tenant holding `held` of the `total` open may hold: its share of the
/// slots the other tenants leave free, within `per_tenant`. A fixed cap per tenant (it was
/// half the instance's) lets a few tenants fill an instance; a share of what is left always
/// leaves room for the next tenant, until one slot is left, and a tenant over its share
/// (because others came after it) opens nothing more until it is back under.
pub fn tenant_room(held: usize, total: usize, caps: &Caps) -> usize {
    let free_to_it = caps.global.saturating_sub(total - held);
    let share = (free_to_it as f64 * caps.tenant_share).floor() as usize;
    share.min(caps.per_tenant)
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
    /// A hub whose seal has a key of its own: it hears no other instance (tests, tools).
    pub fn new() -> Arc<Self> {
        Self::sealed(None)
    }

    /// A hub whose cluster messages are sealed with `secret` (`cluster.secret`), or, without
    /// one, with a key of this instance's own.
    pub fn sealed(secret: Option<&str>) -> Arc<Self> {
        let instance = uuid::Uuid::new_v4().to_string();
        Arc::new(Self {
            seal: Arc::new(Seal::new(&instance, secret)),
            instance,
            entries: Default::default(),
            tenants: Default::default(),
            replays: Default::default(),
            tickets: Default::default(),
            presence_changes: Default::default(),
            presence_changed: Default::default(),
        })
    }

    /// This instance's id (a UUID per start).
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// The seal of this instance's cluster messages.
    pub fn seal(&self) -> &Arc<Seal> {
        &self.seal
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
        entry.keep(row, size);
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
        let held = tenants.get(tenant).copied().unwrap_or(0);
        if held >= tenant_room(held, total, &caps) {
            return Err(CapExceeded::Tenant);
        }
        let key = (tenant.to_owned(), user_id.to_owned());
        let entry = entries.entry(key.clone()).or_insert_with(Entry::new);
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
        let rows = entry.rows_after(cursor, latest)?;
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
            tenant_share: 1.0,
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

    #[test]
    fn enforces_caps_and_releases_slots() {
        let hub = Hub::new();
        let caps = Caps {
            per_user: 1,
            per_tenant: 2,
            global: 3,
            tenant_share: 1.0,
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

    #[test]
    fn a_tenant_holds_its_share_of_what_the_others_leave() {
        let caps = Caps {
            per_user: 100,
            per_tenant: 5_000,
            global: 10_000,
            tenant_share: 0.5,
        };
        // Alone: half the instance; the next tenant half of the rest, and so on.
        assert_eq!(tenant_room(0, 0, &caps), 5_000);
        assert_eq!(tenant_room(0, 5_000, &caps), 2_500);
        assert_eq!(tenant_room(0, 7_500, &caps), 1_250);
        // A tenant over its share (others came since) opens nothing until it is under.
        assert_eq!(tenant_room(5_000, 9_000, &caps), 3_000);
        // One slot left: nobody takes it (room 0); two: a newcomer may.
        assert_eq!(tenant_room(0, 9_999, &caps), 0);
        assert_eq!(tenant_room(0, 9_998, &caps), 1);
        // The fixed cap still holds, and a share of 1 lets one tenant fill the instance.
        let whole = Caps {
            tenant_share: 1.0,
            ..caps
        };
        assert_eq!(tenant_room(0, 0, &whole), 5_000);
        let whole = Caps {
            per_tenant: 10_000,
            ..whole
        };
        assert_eq!(tenant_room(9_000, 9_000, &whole), 10_000);
        // Through the hub: two tenants cannot fill an instance of 10.
        let hub = Hub::new();
        let caps = Caps { global: 10, ..caps };
        let mut held = Vec::new();
        for (tenant, want) in [("a", 5), ("b", 2), ("c", 1), ("d", 1), ("e", 0)] {
            let mut opened = 0;
            while let Ok(s) = hub.subscribe(tenant, &format!("u{opened}"), caps) {
                held.push(s);
                opened += 1;
            }
            assert_eq!(opened, want, "{tenant}");
        }
    }
}
