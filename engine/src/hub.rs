//! The fan-out hub: which (tenant, user) has something new, and who is listening.
//!
//! The hub carries no notification content, only "user U of tenant T now has sequence
//! number N". A stream that wakes up reads what it has not sent yet from PostgreSQL. So a
//! slow client never makes the engine buffer (it simply reads later), ordering and gaps
//! are PostgreSQL's to keep, and live delivery and `Last-Event-ID` replay are the same code.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

type Key = (String, String);

struct Entry {
    latest: watch::Sender<i64>,
    connections: usize,
}

#[derive(Default)]
pub struct Hub {
    entries: Mutex<HashMap<Key, Entry>>,
}

/// Why a subscription was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CapExceeded {
    #[error("too many open streams for this user")]
    User,
    #[error("too many open streams on this instance")]
    Global,
}

impl Hub {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Tells the user's open streams that `seq` exists. Call after the transaction that
    /// wrote it has committed, never before: a stream must not look for a row it cannot see.
    pub fn publish(&self, tenant: &str, user_id: &str, seq: i64) {
        let entries = self.entries.lock().expect("hub lock poisoned");
        if let Some(entry) = entries.get(&(tenant.to_owned(), user_id.to_owned())) {
            entry.latest.send_if_modified(|current| {
                let newer = seq > *current;
                if newer {
                    *current = seq;
                }
                newer
            });
        }
    }

    /// Opens a stream for (tenant, user) within the connection caps.
    pub fn subscribe(
        self: &Arc<Self>,
        tenant: &str,
        user_id: &str,
        per_user: usize,
        global: usize,
    ) -> Result<Subscription, CapExceeded> {
        let mut entries = self.entries.lock().expect("hub lock poisoned");
        let total: usize = entries.values().map(|e| e.connections).sum();
        if total >= global {
            return Err(CapExceeded::Global);
        }
        let key = (tenant.to_owned(), user_id.to_owned());
        let entry = entries.entry(key.clone()).or_insert_with(|| Entry {
            latest: watch::channel(0).0,
            connections: 0,
        });
        if entry.connections >= per_user {
            return Err(CapExceeded::User);
        }
        entry.connections += 1;
        Ok(Subscription {
            updates: entry.latest.subscribe(),
            hub: self.clone(),
            key,
        })
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
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut entries = self.hub.entries.lock().expect("hub lock poisoned");
        if let Some(entry) = entries.get_mut(&self.key) {
            entry.connections -= 1;
            if entry.connections == 0 {
                entries.remove(&self.key);
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
        let mut a = hub.subscribe("t1", "u1", 2, 10).unwrap();
        let b = hub.subscribe("t2", "u1", 2, 10).unwrap();
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
        let s1 = hub.subscribe("t", "u", 1, 2).unwrap();
        assert_eq!(hub.subscribe("t", "u", 1, 2).err(), Some(CapExceeded::User));
        let _s2 = hub.subscribe("t", "v", 1, 2).unwrap();
        assert_eq!(
            hub.subscribe("t", "w", 1, 2).err(),
            Some(CapExceeded::Global)
        );
        drop(s1);
        assert!(!hub.is_connected("t", "u"));
        assert!(hub.subscribe("t", "u", 1, 2).is_ok());
    }
}
