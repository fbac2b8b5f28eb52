//! The per-plugin circuit breaker: a version that malfunctions (traps, hits a limit, returns
//! invalid output) on `plugins.breaker_failures` events in a row is quarantined: it is not
//! called again, and its tenants' events follow `plugins.breaker_fail_mode`. A new version
//! (another SHA-256) starts closed. Pure bookkeeping, keyed by plugin name.

use std::collections::HashMap;
use std::sync::Mutex;

#[derive(Default)]
pub(super) struct Breakers {
    states: Mutex<HashMap<String, State>>,
}

struct State {
    digest: String,
    consecutive: u32,
    open: bool,
}

impl Breakers {
    /// `Some(failures)` if this version of `plugin` is quarantined.
    pub(super) fn quarantined(&self, plugin: &str, digest: &str) -> Option<u32> {
        let states = self.states.lock().expect("breaker lock poisoned");
        states
            .get(plugin)
            .filter(|s| s.open && s.digest == digest)
            .map(|s| s.consecutive)
    }

    /// Records a call's outcome; returns `Some(failures)` when this call opened the breaker.
    /// `threshold` 0 disables the breaker.
    pub(super) fn record(
        &self,
        plugin: &str,
        digest: &str,
        malfunction: bool,
        threshold: u32,
    ) -> Option<u32> {
        if threshold == 0 {
            return None;
        }
        let mut states = self.states.lock().expect("breaker lock poisoned");
        // A healthy call of a known version, the common case, allocates nothing.
        if !malfunction
            && let Some(state) = states.get_mut(plugin)
            && state.digest == digest
        {
            state.consecutive = 0;
            return None;
        }
        let state = states.entry(plugin.to_owned()).or_insert_with(|| State {
            digest: digest.to_owned(),
            consecutive: 0,
            open: false,
        });
        if state.digest != digest {
            // A new version: whatever the old one did does not count against it.
            *state = State {
                digest: digest.to_owned(),
                consecutive: 0,
                open: false,
            };
        }
        if !malfunction {
            state.consecutive = 0;
            return None;
        }
        state.consecutive += 1;
        if !state.open && state.consecutive >= threshold {
            state.open = true;
            return Some(state.consecutive);
        }
        None
    }

    /// Quarantined versions, as `plugin (digest prefix): N consecutive failures`.
    /// Forgets the state of versions no longer loaded (`serving(name, digest)` is false), so
    /// a replaced or deleted version is not reported as quarantined after it is gone.
    pub(super) fn retain(&self, serving: impl Fn(&str, &str) -> bool) {
        let mut states = self.states.lock().expect("breaker lock poisoned");
        states.retain(|name, s| serving(name, &s.digest));
    }

    pub(super) fn quarantined_list(&self) -> Vec<String> {
        let states = self.states.lock().expect("breaker lock poisoned");
        let mut out: Vec<String> = states
            .iter()
            .filter(|(_, s)| s.open)
            .map(|(name, s)| {
                format!(
                    "{name} ({}): {} consecutive failures",
                    &s.digest[..s.digest.len().min(12)],
                    s.consecutive
                )
            })
            .collect();
        out.sort();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_no_longer_loaded_are_forgotten() {
        let b = Breakers::default();
        for _ in 0..3 {
            b.record("p", "v1", true, 3);
        }
        assert_eq!(b.quarantined_list().len(), 1);
        b.retain(|name, digest| name == "p" && digest == "v1");
        assert_eq!(b.quarantined_list().len(), 1);
        b.retain(|_, digest| digest == "v2");
        assert!(b.quarantined_list().is_empty());
        assert_eq!(b.quarantined("p", "v1"), None);
    }

    #[test]
    fn opens_after_consecutive_malfunctions_and_a_new_version_closes_it() {
        let b = Breakers::default();
        assert_eq!(b.record("p", "v1", true, 3), None);
        // A success in between resets the count.
        assert_eq!(b.record("p", "v1", false, 3), None);
        assert_eq!(b.record("p", "v1", true, 3), None);
        assert_eq!(b.record("p", "v1", true, 3), None);
        assert_eq!(b.quarantined("p", "v1"), None);
        assert_eq!(b.record("p", "v1", true, 3), Some(3));
        assert_eq!(b.quarantined("p", "v1"), Some(3));
        assert_eq!(b.quarantined_list(), ["p (v1): 3 consecutive failures"]);
        // Another plugin is unaffected; a new version of this one starts closed.
        assert_eq!(b.quarantined("q", "v1"), None);
        assert_eq!(b.quarantined("p", "v2"), None);
        assert_eq!(b.record("p", "v2", false, 3), None);
        assert_eq!(b.quarantined("p", "v1"), None);
        assert!(b.quarantined_list().is_empty());
    }

    #[test]
    fn zero_disables_it() {
        let b = Breakers::default();
        for _ in 0..100 {
            assert_eq!(b.record("p", "v1", true, 0), None);
        }
        assert_eq!(b.quarantined("p", "v1"), None);
    }
}
