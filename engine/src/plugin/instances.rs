//! Warm instances: one instance serves several calls of one tenant on one plugin version,
//! so a call costs a function call, not an instantiation (which for a Python or JavaScript
//! component means mapping an interpreter's tens of MB).
//!
//! The rules that keep the sandbox's promises under reuse:
//!
//! - **Per tenant.** An instance is only ever handed back to calls of the tenant it was
//!   created for: state a plugin keeps in a global never reaches another tenant.
//! - **Only after a clean call.** An instance goes back to the idle set only when its call
//!   returned normally (deliveries, or the plugin's own refusal) and its output passed the
//!   checks. A trap, a limit (fuel, time, memory), invalid output or a cancelled call drops
//!   it: whatever it left half-done is never seen by the next call.
//! - **Recycled.** After `plugins.instance_max_calls` calls, when its stderr capture is half
//!   full, when its linear memory has grown to [`NEAR_CAP`] of the memory cap (a plugin
//!   that keeps memory across calls would otherwise trap on some later, innocent event),
//!   and when a new version of its plugin is loaded. `instance_max_calls = 1` is a fresh
//!   instance per call. A call that traps on a warm instance anyway is retried once on a
//!   fresh one before the trap counts (`routing`).
//! - **Bounded.** At most `plugins.max_idle_instances` idle instances in all; past that the
//!   least recently used one is dropped.
//!
//! What a plugin may assume: nothing about state between calls. A global may still hold
//! what the previous call of the same tenant left there, or may be fresh; each call gets its
//! full fuel, time and hostcall budget, and the memory cap applies to the instance.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use wasmtime::Store;
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;

use super::Presence;
use super::error::{PluginError, classify_trap};
use super::registry::Loaded;
use super::sandbox::{self, CallLimits, CallState, STDERR_CAPTURE};
use super::wit;

/// The share of the memory cap (numerator, denominator) at which an instance is recycled
/// after its call rather than kept: with a quarter of the cap left, a call that grows the
/// memory as much as the instance's earlier ones did may not fit.
const NEAR_CAP: (usize, usize) = (3, 4);

/// Whether `total` bytes of linear memory are near `cap` ([`NEAR_CAP`]).
fn near_cap(total: usize, cap: usize) -> bool {
    total.saturating_mul(NEAR_CAP.1) >= cap.saturating_mul(NEAR_CAP.0)
}

/// A store with (once its first call instantiated it) one plugin instance in it.
pub(super) struct Warm {
    pub(super) loaded: Arc<Loaded>,
    pub(super) store: Store<CallState>,
    /// `None` until the first call instantiates the component, inside that call's limits.
    bindings: Option<wit::Instance>,
    stderr: MemoryOutputPipe,
    /// Bytes of stderr written before the current call: a trap quotes only its own call's.
    stderr_mark: usize,
    calls: u32,
    last_used: u64,
}

impl Warm {
    /// A new store for `tenant`'s calls of `loaded`; the instance is created by the first
    /// call ([`Warm::bindings`]).
    pub(super) fn new(
        engine: &wasmtime::Engine,
        loaded: Arc<Loaded>,
        tenant: &str,
        tenant_config: Arc<std::collections::BTreeMap<String, String>>,
        presence: Arc<dyn Presence>,
    ) -> Self {
        let stderr = MemoryOutputPipe::new(STDERR_CAPTURE);
        let state = CallState::new(
            tenant,
            &loaded.name,
            "",
            tenant_config,
            presence,
            stderr.clone(),
        );
        Warm {
            store: sandbox::store(engine, state),
            loaded,
            bindings: None,
            stderr,
            stderr_mark: 0,
            calls: 0,
            last_used: 0,
        }
    }

    /// Sets the store up for one call: its budgets afresh (fuel, hostcall bytes, the epoch
    /// deadline), what it is about, no logs yet.
    pub(super) fn arm(&mut self, limits: CallLimits, subject: &str) {
        sandbox::arm(&mut self.store, limits);
        let state = self.store.data_mut();
        state.subject.clear();
        state.subject.push_str(subject);
        state.logs.clear();
        state.dropped_logs = 0;
        state.templates = None;
        self.calls += 1;
    }

    /// Has this instance served a call before (a trap on it may be an earlier call's
    /// doing)?
    pub(super) fn is_warm(&self) -> bool {
        self.calls > 0
    }

    /// The instance's exports, instantiating the component in this store on first use.
    pub(super) async fn bindings(
        &mut self,
    ) -> wasmtime::Result<(&mut Store<CallState>, &wit::Instance)> {
        if self.bindings.is_none() {
            self.bindings = Some(self.loaded.pre.instantiate(&mut self.store).await?);
        }
        let bindings = self.bindings.as_ref().expect("instantiated above");
        Ok((&mut self.store, bindings))
    }

    /// What a call on this instance came to under its outer bound: the plugin's answer, or
    /// why there is none (out of time, out of fuel, a refused hostcall, a trap quoting
    /// this call's stderr). `timeout_ms` is the limit the error names.
    pub(super) fn answer<T>(
        &self,
        outcome: Result<wasmtime::Result<T>, tokio::time::error::Elapsed>,
        limits: CallLimits,
        timeout_ms: u64,
    ) -> Result<T, PluginError> {
        let plugin = self.loaded.name.clone();
        match outcome {
            Err(_) => Err(PluginError::Timeout {
                plugin,
                limit_ms: timeout_ms,
                retried: false,
            }),
            Ok(Err(e)) => Err(classify_trap(
                plugin,
                e,
                &self.call_stderr(),
                limits.fuel,
                timeout_ms,
            )),
            Ok(Ok(answer)) => Ok(answer),
        }
    }

    /// What this call wrote to stderr (a Rust plugin's panic message lands there).
    pub(super) fn call_stderr(&self) -> Vec<u8> {
        let all = self.stderr.contents();
        all.get(self.stderr_mark..).unwrap_or_default().to_vec()
    }

    /// Peak linear memory of the instance so far.
    pub(super) fn memory_bytes(&self) -> usize {
        self.store.data().limits.peak
    }

    /// Fuel the current call has left.
    pub(super) fn fuel_left(&self) -> u64 {
        self.store.get_fuel().unwrap_or(0)
    }
}

/// The idle warm instances of every tenant.
pub(super) struct Instances {
    idle: Mutex<Idle>,
    max_idle: usize,
    max_calls: u32,
    clock: AtomicU64,
}

/// Idle instances by tenant, and how many there are in all (kept, not counted per call).
#[derive(Default)]
struct Idle {
    by_tenant: HashMap<String, Vec<Warm>>,
    count: usize,
}

impl Idle {
    /// Removes the instance at `at` of `tenant`'s list.
    fn remove(&mut self, tenant: &str, at: usize) -> Warm {
        let list = self
            .by_tenant
            .get_mut(tenant)
            .expect("a tenant with idle instances");
        let warm = list.swap_remove(at);
        if list.is_empty() {
            self.by_tenant.remove(tenant);
        }
        self.count -= 1;
        warm
    }
}

impl Instances {
    pub(super) fn new(max_idle: usize, max_calls: u32) -> Self {
        Instances {
            idle: Mutex::new(Idle::default()),
            max_idle,
            max_calls: max_calls.max(1),
            clock: AtomicU64::new(0),
        }
    }

    /// An idle instance of `loaded` made for `tenant`, if there is one.
    pub(super) fn take(&self, tenant: &str, loaded: &Arc<Loaded>) -> Option<Warm> {
        let mut idle = self.idle.lock().expect("instances lock poisoned");
        let at = idle
            .by_tenant
            .get(tenant)?
            .iter()
            .rposition(|w| Arc::ptr_eq(&w.loaded, loaded))?;
        Some(idle.remove(tenant, at))
    }

    /// Keeps `warm` for `tenant`'s next call, unless it is due for recycling. Call only
    /// after a clean call (see the module's rules).
    pub(super) fn give_back(&self, tenant: &str, mut warm: Warm) {
        if warm.calls >= self.max_calls || self.max_idle == 0 {
            return;
        }
        let written = warm.stderr.contents().len();
        if written > STDERR_CAPTURE / 2 {
            return;
        }
        let memory = &warm.store.data().limits;
        if near_cap(memory.total, memory.limit) {
            tracing::debug!(plugin = %warm.loaded.name, tenant = %tenant, memory_bytes = memory.total, limit = memory.limit, "plugin instance recycled: its memory has grown near the cap");
            return;
        }
        warm.stderr_mark = written;
        // Nothing of the call stays behind in the host's part of the store either.
        warm.store.data_mut().logs.clear();
        warm.store.data_mut().templates = None;
        if !warm.store.data().table.is_empty() {
            // Handles the guest did not drop: start over rather than carry them along.
            return;
        }
        warm.last_used = self.clock.fetch_add(1, Ordering::Relaxed);
        let mut idle = self.idle.lock().expect("instances lock poisoned");
        if idle.count >= self.max_idle
            && let Some((oldest_tenant, at)) = idle
                .by_tenant
                .iter()
                .flat_map(|(t, ws)| ws.iter().enumerate().map(move |(i, w)| (t, i, w.last_used)))
                .min_by_key(|(_, _, used)| *used)
                .map(|(t, i, _)| (t.clone(), i))
        {
            idle.remove(&oldest_tenant, at);
        }
        idle.by_tenant
            .entry(tenant.to_owned())
            .or_default()
            .push(warm);
        idle.count += 1;
    }

    /// Drops the idle instances of versions no longer serving.
    pub(super) fn retain(&self, serving: impl Fn(&Arc<Loaded>) -> bool) {
        let mut idle = self.idle.lock().expect("instances lock poisoned");
        for list in idle.by_tenant.values_mut() {
            list.retain(|w| serving(&w.loaded));
        }
        idle.by_tenant.retain(|_, list| !list.is_empty());
        idle.count = idle.by_tenant.values().map(Vec::len).sum();
    }

    /// Idle instances now held.
    pub(super) fn idle_count(&self) -> usize {
        self.idle.lock().expect("instances lock poisoned").count
    }
}

#[cfg(test)]
mod tests {
    use super::near_cap;

    #[test]
    fn an_instance_near_its_memory_cap_is_recycled() {
        let mib = 1 << 20;
        assert!(!near_cap(2 * mib, 32 * mib));
        assert!(!near_cap(24 * mib - 1, 32 * mib));
        assert!(near_cap(24 * mib, 32 * mib));
        assert!(near_cap(32 * mib, 32 * mib));
        // No overflow with absurd figures.
        assert!(near_cap(usize::MAX, usize::MAX));
    }
}
