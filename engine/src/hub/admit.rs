//! The per-user sliding windows that admit deep replays and stream tickets.
//!
//! Both are things one user can ask for in a loop that cost the database (a replay reads
//! the user's history, a ticket is a row), so each kind is admitted at most
//! `per_minute` times in any minute per (tenant, user). The window is kept apart from the
//! streams' bookkeeping: it shares no lock with it and no state.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::Key;

/// Per user, the times of their recent admissions of one kind.
pub(super) type Recent = HashMap<Key, VecDeque<Instant>>;

/// A sliding one-minute window per user: admits at `now` if fewer than `per_minute` were
/// admitted in the minute before; `Err` holds how long until the next one is.
pub(super) fn admit(
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

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use crate::hub::Hub;

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
}
