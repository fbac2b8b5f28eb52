//! The plugin host: the only module that touches wasmtime. [`PluginHost`] owns the engine,
//! the linker and the registry, and is the public entry point for everything else: load
//! and reload, route an event, render an email, list and check plugins.
//!
//! - `wit`: the WIT versions, one file each (`wit/v0_1_0.rs`, ...: bindings, host imports,
//!   conversions to the newest types), and the one dispatch over them.
//! - `sandbox`: what every call runs in, whatever the world: the linker (only the
//!   interfaces plugins are granted), a `Store` with every limit set (memory for the
//!   instance; fuel, hostcall fuel and an epoch deadline, at which the guest yields every tick
//!   and traps when it passes, afresh for each call; resource handles), deny-all WASI with
//!   coarse clocks, captured logs, text hygiene.
//! - `instances`: warm instances, one tenant's and one plugin version's each, reused only
//!   after a clean call, recycled, bounded.
//! - `registry`: which compiled version serves under which name and world, whom it serves,
//!   loading and the diffing hot reload, import and world checks, the single `ArcSwap` swap
//!   point.
//! - one adapter per world, a type borrowing the host: `routing::Routing` (an event in,
//!   deliveries out) and `templating::Templating` (an outbox email in, subject/html/text
//!   out), each with its call, its limits and its output checks (`output` checks routing
//!   decisions).
//! - `breaker`: the circuit breaker per (tenant, plugin version); `error`: what a failed
//!   call or load comes to.
//!
//! A trap, a timeout, a refusal or invalid output is returned as a [`PluginError`]; the
//! caller dead-letters that event (or fails that email) and moves on. Nothing a plugin does
//! can crash the engine. A plugin that is not there to ask is not the event's fault:
//! [`PluginError::disposition`] tells the pipeline to wait for it ([`Disposition::Stall`],
//! [`Disposition::Park`]) instead.

mod breaker;
mod error;
mod instances;
mod output;
mod registry;
mod routing;
mod sandbox;
mod templating;
mod wit;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::Engine;
use wasmtime::component::Linker;

use crate::config::{PluginConfig, TenantConfig};
use crate::model::Event;
use crate::templates::{RenderedEmail, Templates};

pub use breaker::Quarantine;
pub use error::{Disposition, LoadError, PluginError};
pub use output::Delivery;
pub use registry::{CheckReport, PluginInfo, ReloadOutcome, Reloaded};
pub use templating::EmailToRender;
pub use wit::{WIT_VERSIONS, World};

use instances::Warm;
use registry::{Compiler, Loaded, Registry, Slot};
use routing::Routing;
use sandbox::{CallState, EpochTicker};
use templating::Templating;

/// Least time between two reloads of the plugin directory by stalled lanes.
const STALL_RELOAD_INTERVAL: Duration = Duration::from_secs(5);

/// What a plugin decided about one event, and what it cost.
#[derive(Debug, Clone)]
pub struct Decision {
    pub plugin: String,
    /// SHA-256 of the component binary: which build decided.
    pub digest: String,
    pub deliveries: Vec<Delivery>,
    pub cost: Cost,
    pub logs: Vec<(String, String)>,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct Cost {
    pub fuel: u64,
    pub elapsed: Duration,
    /// Peak linear memory of the call's instance.
    pub memory_bytes: usize,
}

/// Who is watching: what routing plugins ask through `presence.is-online` (WIT 0.3.0).
pub trait Presence: Send + Sync {
    /// Does (tenant, user) have a stream open on any instance, as last heard?
    fn is_online(&self, tenant: &str, user_id: &str) -> bool;
}

/// Nobody is online: the presence of a host outside a running engine (`plugin run`, the
/// benchmarks), until [`PluginHost::with_presence`] gives it the engine's.
pub struct NobodyOnline;

impl Presence for NobodyOnline {
    fn is_online(&self, _tenant: &str, _user_id: &str) -> bool {
        false
    }
}

/// Loads plugins of every world and runs them.
pub struct PluginHost {
    engine: Engine,
    linker: Linker<CallState>,
    limits: PluginConfig,
    registry: Registry,
    empty_config: Arc<BTreeMap<String, String>>,
    tenant_configs: std::collections::HashMap<String, Arc<BTreeMap<String, String>>>,
    /// When stalled lanes last reloaded the directory: one reload at a time, at most one per
    /// [`STALL_RELOAD_INTERVAL`], however many lanes wait.
    stall_reload: tokio::sync::Mutex<Option<Instant>>,
    breaker: breaker::Breakers,
    /// Idle instances kept for their tenant's next call.
    instances: instances::Instances,
    /// What `presence.is-online` answers from.
    presence: Arc<dyn Presence>,
    _ticker: EpochTicker,
}

impl PluginHost {
    pub fn new(
        limits: PluginConfig,
        tenants: BTreeMap<String, TenantConfig>,
    ) -> Result<Self, LoadError> {
        let mut config = wasmtime::Config::new();
        config
            .consume_fuel(true)
            .epoch_interruption(true)
            .wasm_component_model(true);
        let engine = Engine::new(&config).map_err(|e| LoadError {
            path: PathBuf::new(),
            message: format!("creating the wasmtime engine: {e:#}"),
        })?;
        let linker = sandbox::linker(&engine).map_err(|e| LoadError {
            path: PathBuf::new(),
            message: format!("linking host functions: {e:#}"),
        })?;
        // A precompiled cache others could write into would run their native code: refused
        // at start-up, with the reason.
        if !limits.cache_dir.as_os_str().is_empty() {
            registry::prepare_cache(&limits.cache_dir).map_err(|why| LoadError {
                path: limits.cache_dir.clone(),
                message: format!("plugins.cache_dir cannot be trusted: {why}"),
            })?;
        }
        let tenant_configs = tenants
            .iter()
            .map(|(id, t)| (id.clone(), Arc::new(t.config.clone())))
            .collect();
        Ok(Self {
            _ticker: EpochTicker::start(engine.clone()),
            engine,
            linker,
            registry: Registry::new(&limits, tenants),
            empty_config: Arc::new(BTreeMap::new()),
            tenant_configs,
            stall_reload: tokio::sync::Mutex::new(None),
            breaker: breaker::Breakers::default(),
            instances: instances::Instances::new(
                limits.max_idle_instances,
                limits.instance_max_calls,
            ),
            presence: Arc::new(NobodyOnline),
            limits,
        })
    }

    /// Answers routing plugins' `presence.is-online` from `presence` (the engine's
    /// cluster-wide view) instead of [`NobodyOnline`].
    pub fn with_presence(mut self, presence: Arc<dyn Presence>) -> Self {
        self.presence = presence;
        self
    }

    /// Idle instances kept warm for their tenant's next call (`notify_plugin_warm_instances`).
    pub fn warm_instances(&self) -> usize {
        self.instances.idle_count()
    }

    /// Routing time one tenant may use per second (`plugins.tenant_budget_ms_per_sec`).
    pub fn tenant_budget_ms_per_sec(&self) -> u64 {
        self.limits.tenant_budget_ms_per_sec
    }

    /// Routes one event through its tenant's plugin (or the default plugin); see
    /// [`Routing::route`] for the retry and the breaker's fail mode.
    pub async fn route(&self, event: &Event) -> Result<Decision, PluginError> {
        Routing::new(self).route(event).await
    }

    /// Renders `email` with its tenant's templating plugin; `None` when the tenant has
    /// none (its files render directly). `templates` is the set the plugin's
    /// `templates.render` calls see; `link_domains` the tenant's link policy.
    pub async fn render_email(
        &self,
        email: &EmailToRender<'_>,
        templates: Arc<Templates>,
        link_domains: &[String],
    ) -> Option<Result<RenderedEmail, PluginError>> {
        Templating::new(self)
            .render(email, templates, link_domains)
            .await
    }

    /// Brings the loaded set in line with the plugin directory: every `*.wasm` file (not
    /// hidden) is a plugin named by its stem. Unchanged files (same SHA-256) keep their
    /// compiled version; new and changed ones are compiled, checked against the world and
    /// swapped in atomically (calls in flight finish on the version they started with). A
    /// changed file that fails keeps the previous version serving and is reported as
    /// rejected; a new file that fails is remembered as broken; a file still being written
    /// (its size changed while it was read) is left for the next reload; a deleted file's
    /// plugin is dropped. One reload runs at a time.
    pub async fn load_dir(&self) -> Result<Vec<Reloaded>, LoadError> {
        self.registry
            .load_dir(&self.compiler(), |slots| {
                self.breaker.retain(|name, digest| {
                    matches!(slots.get(name), Some(Slot::Ready(l)) if l.digest == digest)
                });
                self.instances.retain(|l| {
                    matches!(slots.get(&l.name), Some(Slot::Ready(serving)) if Arc::ptr_eq(serving, l))
                });
            })
            .await
    }

    /// Reloads the directory for lanes stalled on a missing plugin: one lane does it, the
    /// others wait for it, and not more than once per [`STALL_RELOAD_INTERVAL`].
    pub async fn reload_after_stall(&self) {
        let mut last = self.stall_reload.lock().await;
        if last.is_some_and(|t| t.elapsed() < STALL_RELOAD_INTERVAL) {
            return;
        }
        if let Err(e) = self.load_dir().await {
            tracing::warn!(error = %e, "reloading the plugin directory failed");
        }
        *last = Some(Instant::now());
    }

    /// What `notify-engine plugin check` reports: the checks a reload makes, without loading
    /// anything. `Err` carries the reason the host would refuse the file.
    pub async fn check(&self, path: &Path) -> Result<CheckReport, LoadError> {
        self.compiler().check(path).await
    }

    /// Loads a single file as the only plugin, under the default name (the local runner).
    pub async fn load_single(&self, path: &Path) -> Result<(), LoadError> {
        let (bytes, digest) = registry::read_plugin(path).await?;
        let loaded = self
            .compiler()
            .compile(path, &self.limits.default_plugin, bytes, digest)
            .await?;
        self.instances.retain(|_| false);
        self.registry.serve_only(loaded);
        Ok(())
    }

    /// The plugin set as loaded, for readiness.
    pub fn health(&self) -> crate::health::PluginsHealth {
        self.registry.health(&self.breaker)
    }

    /// The (tenant, plugin version) pairs quarantined by the breaker
    /// (`notify_plugin_quarantined`).
    pub fn quarantines(&self) -> Vec<Quarantine> {
        self.breaker.quarantines()
    }

    /// Every plugin, for the admin listing: what serves, what is quarantined or broken,
    /// the last refused candidate, and which tenants each serves.
    pub fn list(&self) -> Vec<PluginInfo> {
        self.registry.list(&self.breaker)
    }

    /// What compiles and links plugins for this host.
    fn compiler(&self) -> Compiler<'_> {
        Compiler {
            engine: &self.engine,
            linker: &self.linker,
            cache_dir: &self.limits.cache_dir,
        }
    }

    fn tenant_config(&self, tenant: &str) -> Arc<BTreeMap<String, String>> {
        self.tenant_configs
            .get(tenant)
            .cloned()
            .unwrap_or_else(|| self.empty_config.clone())
    }

    /// An instance for one call of `tenant` on `loaded`: an idle one of theirs when `reuse`
    /// allows and there is one, else a new store (instantiated by the call itself).
    fn instance_for(&self, tenant: &str, loaded: &Arc<Loaded>, reuse: bool) -> Warm {
        reuse
            .then(|| self.instances.take(tenant, loaded))
            .flatten()
            .unwrap_or_else(|| {
                Warm::new(
                    &self.engine,
                    loaded.clone(),
                    tenant,
                    self.tenant_config(tenant),
                    self.presence.clone(),
                )
            })
    }

    /// Records a call's outcome with the breaker (for this tenant: one tenant's failures
    /// never quarantine a shared plugin for another) and the statistics; logs when the
    /// version is quarantined for the tenant.
    fn record_outcome<T>(&self, loaded: &Loaded, tenant: &str, result: &Result<T, PluginError>) {
        let malfunction = result
            .as_ref()
            .err()
            .is_some_and(PluginError::is_malfunction);
        self.registry.record(loaded, malfunction);
        if let Some(failures) = self.breaker.record(
            &loaded.name,
            &loaded.digest,
            tenant,
            malfunction,
            self.limits.breaker_failures,
        ) {
            tracing::error!(tenant = %tenant, plugin = %loaded.name, world = loaded.pre.world().as_str(), digest = %&loaded.digest[..12], failures, fail_mode = ?self.limits.breaker_fail_mode, "plugin quarantined for this tenant after consecutive failures of its events; other tenants keep it; a new version clears it");
        }
    }
}
