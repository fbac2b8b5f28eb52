//! The circuit breaker, per tenant and plugin version: a version that malfunctions (traps,
//! hits a limit, returns invalid output) on `plugins.breaker_failures` of one tenant's events
//! in a row is quarantined *for that tenant*: it is not called for that tenant's events
//! again, and they follow `plugins.breaker_fail_mode`. A shared plugin (the default router,
//! a templating plugin several tenants name) keeps serving every other tenant: what one
//! tenant's events do to it says nothing about another's. A new version (another SHA-256)
//! starts closed. Pure bookkeeping, keyed by (plugin name, tenant).

use std::collections::HashMap;
use std::sync::Mutex;

/// Most (plugin, tenant) pairs followed at once. A tenant with a clean call is forgotten,
/// so only tenants failing now are held; past this bound (a flood of made-up tenant ids,
/// each failing once) the pairs on their way to a quarantine are dropped before any open
/// one, so the map stays bounded and a quarantine is never lifted to make room.
const MAX_FOLLOWED: usize = 10_000;

#[derive(Default)]
pub(super) struct Breakers {
    /// By plugin name, then tenant: looked up without allocating (every call records its
    /// outcome).
    states: Mutex<HashMap<String, HashMap<String, State>>>,
}

struct State {
    digest: String,
    consecutive: u32,
    open: bool,
}

/// One open breaker, for readiness and metrics.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Quarantine {
    pub plugin: String,
    pub tenant: String,
    pub digest: String,
    pub failures: u32,
}

impl std::fmt::Display for Quarantine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({}) for tenant {}: {} consecutive failures",
            self.plugin,
            &self.digest[..self.digest.len().min(12)],
            self.tenant,
            self.failures
        )
    }
}

impl Breakers {
    /// `Some(failures)` if this version of `plugin` is quarantined for `tenant`.
    pub(super) fn quarantined(&self, plugin: &str, digest: &str, tenant: &str) -> Option<u32> {
        let states = self.states.lock().expect("breaker lock poisoned");
        states
            .get(plugin)?
            .get(tenant)
            .filter(|s| s.open && s.digest == digest)
            .map(|s| s.consecutive)
    }

    /// Records the outcome of a call of `tenant`'s; returns `Some(failures)` when this call
    /// opened the breaker for that tenant. `threshold` 0 disables the breaker.
    pub(super) fn record(
        &self,
        plugin: &str,
        digest: &str,
        tenant: &str,
        malfunction: bool,
        threshold: u32,
    ) -> Option<u32> {
        if threshold == 0 {
            return None;
        }
        let mut states = self.states.lock().expect("breaker lock poisoned");
        if !malfunction {
            // A clean call forgets a run of failures (an open breaker of this version is
            // not called, so it is not closed here; one of an older version is).
            if let Some(tenants) = states.get_mut(plugin)
                && tenants
                    .get(tenant)
                    .is_some_and(|s| s.digest != digest || !s.open)
            {
                tenants.remove(tenant);
                if tenants.is_empty() {
                    states.remove(plugin);
                }
            }
            return None;
        }
        let followed: usize = states.values().map(HashMap::len).sum();
        let known = states.get(plugin).is_some_and(|t| t.contains_key(tenant));
        if !known && followed >= MAX_FOLLOWED {
            for tenants in states.values_mut() {
                tenants.retain(|_, s| s.open);
            }
            states.retain(|_, tenants| !tenants.is_empty());
            if states.values().map(HashMap::len).sum::<usize>() >= MAX_FOLLOWED {
                return None;
            }
        }
        let state = states
            .entry(plugin.to_owned())
            .or_default()
            .entry(tenant.to_owned())
            .or_insert_with(|| State {
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
        state.consecutive += 1;
        if !state.open && state.consecutive >= threshold {
            state.open = true;
            return Some(state.consecutive);
        }
        None
    }

    /// Forgets the state of versions no longer loaded (`serving(name, digest)` is false), so
    /// a replaced or deleted version is not reported as quarantined after it is gone.
    pub(super) fn retain(&self, serving: impl Fn(&str, &str) -> bool) {
        let mut states = self.states.lock().expect("breaker lock poisoned");
        for (name, tenants) in states.iter_mut() {
            tenants.retain(|_, s| serving(name, &s.digest));
        }
        states.retain(|_, tenants| !tenants.is_empty());
    }

    /// Every open breaker, sorted by plugin, then tenant.
    pub(super) fn quarantines(&self) -> Vec<Quarantine> {
        let states = self.states.lock().expect("breaker lock poisoned");
        let mut out: Vec<Quarantine> = states
            .iter()
            .flat_map(|(plugin, tenants)| {
                tenants
                    .iter()
                    .filter(|(_, s)| s.open)
                    .map(move |(tenant, s)| Quarantine {
                        plugin: plugin.clone(),
                        tenant: tenant.clone(),
                        digest: s.digest.clone(),
                        failures: s.consecutive,
                    })
            })
            .collect();
        out.sort();
        out
    }

    /// The tenants for whom this version of `plugin` is quarantined, sorted.
    pub(super) fn quarantined_tenants(&self, plugin: &str, digest: &str) -> Vec<String> {
        let states = self.states.lock().expect("breaker lock poisoned");
        let mut tenants: Vec<String> = states
            .get(plugin)
            .into_iter()
            .flatten()
            .filter(|(_, s)| s.open && s.digest == digest)
            .map(|(t, _)| t.clone())
            .collect();
        tenants.sort();
        tenants
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listed(b: &Breakers) -> Vec<String> {
        b.quarantines().iter().map(ToString::to_string).collect()
    }

    #[test]
    fn versions_no_longer_loaded_are_forgotten() {
        let b = Breakers::default();
        for _ in 0..3 {
            b.record("p", "v1", "t", true, 3);
        }
        assert_eq!(b.quarantines().len(), 1);
        b.retain(|name, digest| name == "p" && digest == "v1");
        assert_eq!(b.quarantines().len(), 1);
        b.retain(|_, digest| digest == "v2");
        assert!(b.quarantines().is_empty());
        assert_eq!(b.quarantined("p", "v1", "t"), None);
    }

    #[test]
    fn opens_after_consecutive_malfunctions_and_a_new_version_closes_it() {
        let b = Breakers::default();
        assert_eq!(b.record("p", "v1", "t", true, 3), None);
        // A success in between resets the count.
        assert_eq!(b.record("p", "v1", "t", false, 3), None);
        assert_eq!(b.record("p", "v1", "t", true, 3), None);
        assert_eq!(b.record("p", "v1", "t", true, 3), None);
        assert_eq!(b.quarantined("p", "v1", "t"), None);
        assert_eq!(b.record("p", "v1", "t", true, 3), Some(3));
        assert_eq!(b.quarantined("p", "v1", "t"), Some(3));
        assert_eq!(listed(&b), ["p (v1) for tenant t: 3 consecutive failures"]);
        assert_eq!(b.quarantined_tenants("p", "v1"), ["t"]);
        // Another plugin is unaffected; a new version of this one starts closed.
        assert_eq!(b.quarantined("q", "v1", "t"), None);
        assert_eq!(b.quarantined("p", "v2", "t"), None);
        assert_eq!(b.record("p", "v2", "t", false, 3), None);
        assert_eq!(b.quarantined("p", "v1", "t"), None);
        assert!(b.quarantines().is_empty());
    }

    #[test]
    fn one_tenants_failures_never_quarantine_a_shared_plugin_for_another() {
        let b = Breakers::default();
        for _ in 0..10 {
            b.record("default", "v1", "noisy", true, 3);
            // The other tenant's calls keep succeeding, in between and after.
            assert_eq!(b.record("default", "v1", "quiet", false, 3), None);
        }
        assert_eq!(b.quarantined("default", "v1", "noisy"), Some(10));
        assert_eq!(b.quarantined("default", "v1", "quiet"), None);
        // Nor do failures of several tenants add up: each has its own count.
        for tenant in ["a", "b"] {
            for _ in 0..2 {
                assert_eq!(b.record("shared", "v1", tenant, true, 3), None);
            }
        }
        assert_eq!(b.quarantined("shared", "v1", "a"), None);
        assert_eq!(b.quarantined_tenants("default", "v1"), ["noisy"]);
    }

    #[test]
    fn the_followed_pairs_are_bounded_and_open_ones_kept() {
        let b = Breakers::default();
        for _ in 0..2 {
            b.record("p", "v1", "bad", true, 2);
        }
        for i in 0..MAX_FOLLOWED + 10 {
            b.record("p", "v1", &format!("made-up-{i}"), true, 2);
        }
        let len: usize = b.states.lock().unwrap().values().map(HashMap::len).sum();
        assert!(len <= MAX_FOLLOWED, "{len}");
        assert_eq!(b.quarantined("p", "v1", "bad"), Some(2));
    }

    #[test]
    fn zero_disables_it() {
        let b = Breakers::default();
        for _ in 0..100 {
            assert_eq!(b.record("p", "v1", "t", true, 0), None);
        }
        assert_eq!(b.quarantined("p", "v1", "t"), None);
    }
}
