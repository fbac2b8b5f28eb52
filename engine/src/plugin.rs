//! The routing sandbox: the only module that touches wasmtime.
//!
//! Every call gets a fresh `Store` from a pre-linked `InstancePre`, so no state leaks from
//! one event (or tenant) to the next. Each store is bounded in CPU (fuel, plus an epoch
//! deadline as a wall-clock bound that also stops a guest stuck in a host call) and memory
//! (`StoreLimits`, trapping on a failed grow). WASI is linked with an empty context: no
//! preopened directories, no environment, no arguments, no sockets, stdio discarded.
//!
//! A trap, a timeout, a refusal or invalid output is returned as a [`PluginError`]; the
//! pipeline dead-letters that event and moves on. Nothing a plugin does can crash the engine.
//! A plugin that is not there to ask is not the event's fault: [`PluginError::disposition`]
//! tells the pipeline to wait for it ([`Disposition::Stall`], [`Disposition::Park`]) instead.

mod breaker;
mod output;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use sha2::{Digest, Sha256};
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{Engine, ResourceLimiter, Store, Trap, UpdateDeadline};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::config::{BreakerFailMode, PluginConfig, TenantConfig};
use crate::ingest::envelope::Event;

pub use output::{Delivery, NOTIFICATION_EVENT};

mod bindings {
    wasmtime::component::bindgen!({
        world: "routing",
        path: "../wit/plugin",
        imports: { default: async | trappable },
        exports: { default: async },
    });
}

use bindings::notify::plugin::host::LogLevel;
use bindings::notify::plugin::types as wit;

/// How often the epoch ticker advances; the wall-clock bound is rounded up to this.
const EPOCH_TICK: Duration = Duration::from_millis(5);
/// Log lines a call may write; the rest are counted, not logged, so one call cannot flood
/// the engine's log.
const MAX_CAPTURED_LOGS: usize = 100;
/// Longest log line a plugin may write; longer ones are cut.
const MAX_LOG_LINE: usize = 2048;
/// stderr kept per call (a Rust plugin's panic message lands there); writing more fails the
/// write, which makes `eprintln!` panic: plugins log through the host `log` import instead.
const STDERR_CAPTURE: usize = 64 * 1024;
/// How much of the captured stderr a trap's reason quotes.
const STDERR_IN_REASON: usize = 1024;

#[derive(Debug, Clone, thiserror::Error)]
pub enum PluginError {
    /// The tenant has no plugin of its own and the default plugin is missing or broken.
    #[error("no routing plugin for tenant {tenant}: the default plugin {reason}")]
    NoDefault { tenant: String, reason: String },
    /// The tenant's own plugin is configured but missing, or did not load.
    #[error("routing plugin {plugin} is unavailable: {reason}")]
    Unavailable { plugin: String, reason: String },
    #[error("event is {size} bytes, the plugin input limit is {limit}")]
    InputTooLarge { size: usize, limit: usize },
    #[error("plugin {plugin} trapped: {message}")]
    Trap { plugin: String, message: String },
    #[error("plugin {plugin} ran out of fuel (budget {fuel} instructions)")]
    OutOfFuel { plugin: String, fuel: u64 },
    #[error("plugin {plugin} exceeded its time limit of {limit_ms} ms{}", if *retried { " twice (retried once on a fresh instance)" } else { "" })]
    Timeout {
        plugin: String,
        limit_ms: u64,
        /// The call was already a retry.
        retried: bool,
    },
    #[error("plugin {plugin} refused the event as invalid: {message}")]
    InvalidEvent { plugin: String, message: String },
    #[error("plugin {plugin} failed: {message}")]
    Failed { plugin: String, message: String },
    #[error("plugin {plugin} returned invalid output: {message}")]
    InvalidOutput { plugin: String, message: String },
    /// This version failed `failures` times in a row and is not called until a new one
    /// arrives.
    #[error(
        "plugin {plugin} is quarantined after {failures} consecutive failures; publish a new version"
    )]
    Quarantined { plugin: String, failures: u32 },
}

impl PluginError {
    /// Stable label for metrics and dead-letter rows.
    pub fn kind(&self) -> &'static str {
        match self {
            PluginError::NoDefault { .. } | PluginError::Unavailable { .. } => "unavailable",
            PluginError::InputTooLarge { .. } => "oversize",
            PluginError::Trap { .. } => "trap",
            PluginError::OutOfFuel { .. } => "out_of_fuel",
            PluginError::Timeout { .. } => "timeout",
            PluginError::InvalidEvent { .. } => "invalid_event",
            PluginError::Failed { .. } => "refused",
            PluginError::InvalidOutput { .. } => "invalid_output",
            PluginError::Quarantined { .. } => "quarantined",
        }
    }

    /// The plugin involved, if any.
    pub fn plugin(&self) -> Option<&str> {
        match self {
            PluginError::NoDefault { .. } | PluginError::InputTooLarge { .. } => None,
            PluginError::Unavailable { plugin, .. }
            | PluginError::Trap { plugin, .. }
            | PluginError::OutOfFuel { plugin, .. }
            | PluginError::Timeout { plugin, .. }
            | PluginError::InvalidEvent { plugin, .. }
            | PluginError::Failed { plugin, .. }
            | PluginError::InvalidOutput { plugin, .. }
            | PluginError::Quarantined { plugin, .. } => Some(plugin),
        }
    }
}

/// What the pipeline does with an event whose routing failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// The plugin judged the event (a trap, a refusal, invalid output, a limit hit twice):
    /// the event's final outcome is a dead letter.
    Final,
    /// The tenant's own plugin is unavailable: the event is set aside in the dead-letter
    /// table without claiming its id, so replaying or republishing it works once the
    /// plugin is fixed; other tenants keep flowing.
    Park,
    /// The platform is broken for every tenant (no default plugin): the batch waits and the
    /// engine reports not ready.
    Stall,
}

impl PluginError {
    pub fn disposition(&self) -> Disposition {
        match self {
            PluginError::NoDefault { .. } => Disposition::Stall,
            PluginError::Unavailable { .. } | PluginError::Quarantined { .. } => Disposition::Park,
            _ => Disposition::Final,
        }
    }

    /// Did the plugin malfunction (trap, limit, invalid output), as opposed to judging the
    /// event (a refusal) or not being there? Only malfunctions count toward the breaker.
    fn is_malfunction(&self) -> bool {
        matches!(
            self,
            PluginError::Trap { .. }
                | PluginError::OutOfFuel { .. }
                | PluginError::Timeout { .. }
                | PluginError::InvalidOutput { .. }
        )
    }
}

#[derive(Debug, thiserror::Error)]
#[error("loading plugin {path}: {message}")]
pub struct LoadError {
    pub path: PathBuf,
    pub message: String,
}

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

/// A compiled, linked plugin, ready to instantiate.
struct Loaded {
    name: String,
    digest: String,
    pre: bindings::RoutingPre<CallState>,
}

/// What a reload did with one plugin file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reloaded {
    pub name: String,
    pub outcome: ReloadOutcome,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// New or changed, compiled and swapped in.
    Loaded,
    /// Same bytes as the version serving.
    Unchanged,
    /// Changed but failed: the previous version keeps serving.
    Rejected(String),
    /// New and failed: nothing serves under this name.
    Broken(String),
    /// The file is still being written: left for the next reload.
    Pending(String),
    /// The file is gone, and so is the plugin.
    Removed,
}

impl ReloadOutcome {
    /// Stable label for the `notify_plugin_reloads_total{outcome}` metric.
    pub fn label(&self) -> &'static str {
        match self {
            ReloadOutcome::Loaded => "loaded",
            ReloadOutcome::Unchanged => "unchanged",
            ReloadOutcome::Rejected(_) => "rejected",
            ReloadOutcome::Broken(_) => "broken",
            ReloadOutcome::Pending(_) => "pending",
            ReloadOutcome::Removed => "removed",
        }
    }
}

/// What reading and compiling one file came to, before the slot is decided.
enum Change {
    Unchanged,
    Loaded(Arc<Loaded>),
    Failed(String),
    Pending(String),
}

/// Interface packages a plugin may import. The host links more of WASI than this (the
/// linker is shared), but a component that imports sockets, the filesystem, HTTP or anything
/// unknown is refused at load, naming the import, instead of failing later.
const GRANTED_IMPORTS: &[&str] = &[
    "notify:plugin/",
    "wasi:io/",
    "wasi:cli/",
    "wasi:clocks/",
    "wasi:random/",
];

fn is_granted(import: &str) -> bool {
    GRANTED_IMPORTS.iter().any(|p| import.starts_with(p))
}

/// `<name>.wasm`, not hidden (`.acme.wasm.tmp`-style files of a write-then-rename are not
/// plugins yet).
fn plugin_name(path: &Path) -> Option<String> {
    if path.extension().and_then(|e| e.to_str()) != Some("wasm") {
        return None;
    }
    let name = path.file_stem()?.to_str()?;
    (!name.starts_with('.') && !name.is_empty()).then(|| name.to_owned())
}

/// The file's bytes, if its size did not change while it was read (a file written in
/// place and still growing is read again at the next reload).
async fn read_settled(path: &Path) -> Result<Vec<u8>, String> {
    let bytes = tokio::fs::read(path)
        .await
        .map_err(|e| format!("cannot read: {e}"))?;
    let size = tokio::fs::metadata(path)
        .await
        .map_err(|e| format!("cannot stat: {e}"))?
        .len();
    if size != bytes.len() as u64 {
        return Err(format!(
            "the file changed while it was read ({} then {size} bytes)",
            bytes.len()
        ));
    }
    Ok(bytes)
}

/// The outcome of loading one plugin file: ready, or broken with the reason. A broken
/// tenant plugin is remembered (not silently replaced by the default plugin): that tenant's
/// events are dead-lettered with the reason until the file is fixed.
#[derive(Clone)]
enum Slot {
    Ready(Arc<Loaded>),
    Broken(String),
}

/// State of one call's `Store`.
struct CallState {
    wasi: WasiCtx,
    table: ResourceTable,
    limits: MemoryCap,
    tenant_config: Arc<BTreeMap<String, String>>,
    tenant: String,
    plugin: String,
    event_id: String,
    logs: Vec<(String, String)>,
    dropped_logs: usize,
}

impl WasiView for CallState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl wit::Host for CallState {}

impl bindings::notify::plugin::host::Host for CallState {
    async fn log(&mut self, level: LogLevel, message: String) -> wasmtime::Result<()> {
        if self.logs.len() >= MAX_CAPTURED_LOGS {
            self.dropped_logs += 1;
            return Ok(());
        }
        let message = plugin_text(&message);
        let (tenant, plugin, event_id) = (&self.tenant, &self.plugin, &self.event_id);
        match level {
            LogLevel::Trace => tracing::trace!(tenant, plugin, event_id, "plugin: {message}"),
            LogLevel::Debug => tracing::debug!(tenant, plugin, event_id, "plugin: {message}"),
            LogLevel::Info => tracing::info!(tenant, plugin, event_id, "plugin: {message}"),
            LogLevel::Warn => tracing::warn!(tenant, plugin, event_id, "plugin: {message}"),
            LogLevel::Error => tracing::error!(tenant, plugin, event_id, "plugin: {message}"),
        }
        let level = format!("{level:?}").to_lowercase();
        self.logs.push((level, message));
        Ok(())
    }

    async fn config(&mut self, key: String) -> wasmtime::Result<Option<String>> {
        Ok(self.tenant_config.get(&key).cloned())
    }
}

/// Caps the *total* linear memory of a call's store (across every memory of every core
/// instance, so a component cannot multiply the cap by having many memories), traps on a
/// failed grow like `StoreLimits::trap_on_grow_failure`, and records the peak, which the
/// local runner reports as the call's memory cost.
struct MemoryCap {
    limit: usize,
    total: usize,
    peak: usize,
}

/// Most table elements one table may have (function tables of Rust components are small).
const MAX_TABLE_ELEMENTS: usize = 100_000;
/// Core instances, memories and tables per store. A Rust `wasm32-wasip2` component has a
/// handful of each (main module plus adapter shims); these bounds keep a hostile component
/// from multiplying its allowance.
const MAX_INSTANCES: usize = 64;
const MAX_MEMORIES: usize = 8;
const MAX_TABLES: usize = 64;

impl ResourceLimiter for MemoryCap {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let total = self.total - current.min(self.total) + desired;
        if total > self.limit {
            // Trapping (rather than returning false, which makes `memory.grow` return -1)
            // stops a runaway allocation at once with a clear reason.
            wasmtime::bail!(
                "memory limit exceeded: linear memory would grow to {total} bytes, the limit is {}",
                self.limit
            );
        }
        self.total = total;
        self.peak = self.peak.max(total);
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > MAX_TABLE_ELEMENTS {
            wasmtime::bail!("table limit exceeded: {desired} elements");
        }
        Ok(true)
    }

    fn instances(&self) -> usize {
        MAX_INSTANCES
    }

    fn memories(&self) -> usize {
        MAX_MEMORIES
    }

    fn tables(&self) -> usize {
        MAX_TABLES
    }
}

/// Advances the engine's epoch until dropped.
struct EpochTicker {
    stop: Arc<AtomicBool>,
}

impl EpochTicker {
    fn start(engine: Engine) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        std::thread::Builder::new()
            .name("wasm-epoch".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    engine.increment_epoch();
                }
            })
            .expect("spawning the epoch thread");
        Self { stop }
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Loads routing plugins and runs them.
pub struct PluginHost {
    engine: Engine,
    linker: Linker<CallState>,
    limits: PluginConfig,
    tenants: BTreeMap<String, TenantConfig>,
    empty_config: Arc<BTreeMap<String, String>>,
    tenant_configs: HashMap<String, Arc<BTreeMap<String, String>>>,
    plugins: ArcSwap<HashMap<String, Slot>>,
    /// When stalled lanes last reloaded the directory: one reload at a time, at most one per
    /// [`STALL_RELOAD_INTERVAL`], however many lanes wait.
    stall_reload: tokio::sync::Mutex<Option<Instant>>,
    /// One directory reload at a time (the watcher and stalled lanes both reload).
    reloading: tokio::sync::Mutex<()>,
    /// Plugins whose newest file was refused while an older version keeps serving.
    rejected: std::sync::Mutex<BTreeMap<String, String>>,
    breaker: breaker::Breakers,
    _ticker: EpochTicker,
}

/// Least time between two reloads of the plugin directory by stalled lanes.
const STALL_RELOAD_INTERVAL: Duration = Duration::from_secs(5);

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
        let mut linker = Linker::<CallState>::new(&engine);
        let link_err = |e: wasmtime::Error| LoadError {
            path: PathBuf::new(),
            message: format!("linking host functions: {e:#}"),
        };
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(link_err)?;
        bindings::Routing::add_to_linker::<CallState, HasSelf<CallState>>(&mut linker, |s| s)
            .map_err(link_err)?;
        let tenant_configs = tenants
            .iter()
            .map(|(id, t)| (id.clone(), Arc::new(t.config.clone())))
            .collect();
        Ok(Self {
            _ticker: EpochTicker::start(engine.clone()),
            engine,
            linker,
            limits,
            tenants,
            empty_config: Arc::new(BTreeMap::new()),
            tenant_configs,
            plugins: ArcSwap::from_pointee(HashMap::new()),
            stall_reload: tokio::sync::Mutex::new(None),
            reloading: tokio::sync::Mutex::new(()),
            rejected: std::sync::Mutex::new(BTreeMap::new()),
            breaker: breaker::Breakers::default(),
        })
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
        let _one_at_a_time = self.reloading.lock().await;
        let dir = &self.limits.dir;
        let entries = std::fs::read_dir(dir).map_err(|e| LoadError {
            path: dir.clone(),
            message: format!("cannot read the plugin directory: {e}"),
        })?;
        let current = self.plugins.load_full();
        let mut slots = HashMap::new();
        let mut report = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            let Some(name) = plugin_name(&path) else {
                continue;
            };
            let previous = match current.get(&name) {
                Some(Slot::Ready(loaded)) => Some(loaded.clone()),
                _ => None,
            };
            let change = match read_settled(&path).await {
                Err(e) => Change::Pending(e),
                Ok(bytes) => {
                    let digest = hex(&Sha256::digest(&bytes));
                    match &previous {
                        Some(old) if old.digest == digest => Change::Unchanged,
                        _ => match self.compile(&path, &name, bytes, digest).await {
                            Ok(loaded) => Change::Loaded(Arc::new(loaded)),
                            Err(e) => Change::Failed(e.message),
                        },
                    }
                }
            };
            let outcome = match change {
                Change::Unchanged => {
                    if let Some(old) = previous {
                        slots.insert(name.clone(), Slot::Ready(old));
                    }
                    ReloadOutcome::Unchanged
                }
                Change::Loaded(loaded) => {
                    tracing::info!(plugin = %name, digest = %&loaded.digest[..12], replaced = previous.is_some(), "routing plugin loaded");
                    slots.insert(name.clone(), Slot::Ready(loaded));
                    ReloadOutcome::Loaded
                }
                Change::Failed(reason) => match previous {
                    Some(old) => {
                        tracing::error!(plugin = %name, error = %reason, serving = %&old.digest[..12], "new version of routing plugin rejected; the previous version keeps serving");
                        slots.insert(name.clone(), Slot::Ready(old));
                        ReloadOutcome::Rejected(reason)
                    }
                    None => {
                        tracing::error!(plugin = %name, error = %reason, "routing plugin rejected");
                        slots.insert(name.clone(), Slot::Broken(reason.clone()));
                        ReloadOutcome::Broken(reason)
                    }
                },
                Change::Pending(reason) => {
                    tracing::info!(plugin = %name, reason = %reason, "routing plugin file not settled; left for the next reload");
                    if let Some(slot) = current.get(&name) {
                        slots.insert(name.clone(), slot.clone());
                    }
                    ReloadOutcome::Pending(reason)
                }
            };
            report.push(Reloaded { name, outcome });
        }
        for name in current.keys().filter(|n| !slots.contains_key(*n)) {
            tracing::info!(plugin = %name, "routing plugin removed");
            report.push(Reloaded {
                name: name.clone(),
                outcome: ReloadOutcome::Removed,
            });
        }
        if !slots.contains_key(&self.limits.default_plugin) {
            tracing::warn!(
                dir = %dir.display(),
                default = %self.limits.default_plugin,
                "no default routing plugin: tenants without their own plugin wait until it is in place"
            );
        }
        let mut rejected = self.rejected.lock().expect("rejected lock poisoned");
        for r in &report {
            match &r.outcome {
                ReloadOutcome::Rejected(reason) => {
                    rejected.insert(r.name.clone(), reason.clone());
                }
                ReloadOutcome::Loaded | ReloadOutcome::Removed | ReloadOutcome::Broken(_) => {
                    rejected.remove(&r.name);
                }
                ReloadOutcome::Unchanged | ReloadOutcome::Pending(_) => {}
            }
        }
        self.plugins.store(Arc::new(slots));
        Ok(report)
    }

    /// Compiles one component off the async threads and checks it implements the world.
    async fn compile(
        &self,
        path: &Path,
        name: &str,
        bytes: Vec<u8>,
        digest: String,
    ) -> Result<Loaded, LoadError> {
        let err = |message: String| LoadError {
            path: path.to_owned(),
            message,
        };
        let engine = self.engine.clone();
        let component = tokio::task::spawn_blocking(move || Component::new(&engine, &bytes))
            .await
            .map_err(|e| err(format!("compiler task failed: {e}")))?
            .map_err(|e| err(format!("not a valid WebAssembly component: {e:#}")))?;
        if let Some(import) = component
            .component_type()
            .imports(&self.engine)
            .map(|(name, _)| name)
            .find(|name| !is_granted(name))
        {
            return Err(err(format!(
                "imports {import}, which plugins are not granted (allowed: {})",
                GRANTED_IMPORTS.join(", ")
            )));
        }
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(|e| err(format!("imports something the host does not offer: {e:#}")))?;
        let pre = bindings::RoutingPre::new(pre).map_err(|e| {
            err(format!(
                "does not implement the notify:plugin/routing world: {e:#}"
            ))
        })?;
        Ok(Loaded {
            name: name.to_owned(),
            digest,
            pre,
        })
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

    /// Loads a single file as the only plugin, under the default name (the local runner).
    pub async fn load_single(&self, path: &Path) -> Result<(), LoadError> {
        let bytes = tokio::fs::read(path).await.map_err(|e| LoadError {
            path: path.to_owned(),
            message: format!("cannot read: {e}"),
        })?;
        let digest = hex(&Sha256::digest(&bytes));
        let loaded = self
            .compile(path, &self.limits.default_plugin, bytes, digest)
            .await?;
        let mut slots = HashMap::new();
        slots.insert(
            self.limits.default_plugin.clone(),
            Slot::Ready(Arc::new(loaded)),
        );
        self.plugins.store(Arc::new(slots));
        Ok(())
    }

    /// Routing time one tenant may use per second (`plugins.tenant_budget_ms_per_sec`).
    pub fn tenant_budget_ms_per_sec(&self) -> u64 {
        self.limits.tenant_budget_ms_per_sec
    }

    /// The plugin set as loaded, for readiness.
    pub fn health(&self) -> crate::health::PluginsHealth {
        let plugins = self.plugins.load();
        let default = match plugins.get(&self.limits.default_plugin) {
            Some(Slot::Ready(_)) => "ok",
            Some(Slot::Broken(_)) => "broken",
            None => "missing",
        };
        let mut broken: Vec<String> = plugins
            .iter()
            .filter_map(|(name, slot)| match slot {
                Slot::Broken(reason) => Some(format!("{name}: {reason}")),
                Slot::Ready(_) => None,
            })
            .collect();
        broken.sort();
        let rejected = self
            .rejected
            .lock()
            .expect("rejected lock poisoned")
            .iter()
            .map(|(name, reason)| format!("{name}: {reason}"))
            .collect();
        crate::health::PluginsHealth {
            default: default.into(),
            broken,
            rejected,
            quarantined: self.breaker.quarantined_list(),
        }
    }

    /// Routes one event through its tenant's plugin (or the default plugin). A call that
    /// runs out of wall-clock time is tried once more on a fresh instance before the
    /// timeout counts: on a busy host the first may have lost its time to other work. A
    /// plugin version quarantined by its breaker is not called: the tenant's events follow
    /// `plugins.breaker_fail_mode`.
    pub async fn route(&self, event: &Event) -> Result<Decision, PluginError> {
        // One plugin for the whole call: a reload swapping the set meanwhile does not
        // affect this call, which finishes on the version it started with.
        let mut loaded = self.select(&event.tenant)?;
        if let Some(failures) = self.breaker.quarantined(&loaded.name, &loaded.digest) {
            match self.limits.breaker_fail_mode {
                BreakerFailMode::DeadLetter => {
                    return Err(PluginError::Quarantined {
                        plugin: loaded.name.clone(),
                        failures,
                    });
                }
                BreakerFailMode::Default => {
                    loaded = self.select_default(&event.tenant)?;
                }
            }
        }
        let result = match self.route_once(&loaded, event).await {
            Err(PluginError::Timeout { plugin, .. }) => {
                tracing::warn!(tenant = %event.tenant, event_id = %event.id, plugin = %plugin, "routing call timed out; retrying once on a fresh instance");
                self.route_once(&loaded, event).await.map_err(|e| match e {
                    PluginError::Timeout {
                        plugin, limit_ms, ..
                    } => PluginError::Timeout {
                        plugin,
                        limit_ms,
                        retried: true,
                    },
                    other => other,
                })
            }
            other => other,
        };
        let malfunction = result
            .as_ref()
            .err()
            .is_some_and(PluginError::is_malfunction);
        if let Some(failures) = self.breaker.record(
            &loaded.name,
            &loaded.digest,
            malfunction,
            self.limits.breaker_failures,
        ) {
            tracing::error!(tenant = %event.tenant, plugin = %loaded.name, digest = %&loaded.digest[..12], failures, fail_mode = ?self.limits.breaker_fail_mode, "routing plugin quarantined after consecutive failures; a new version clears it");
        }
        result
    }

    /// The default plugin, for a tenant whose own plugin is quarantined.
    fn select_default(&self, tenant: &str) -> Result<Arc<Loaded>, PluginError> {
        match self.plugins.load().get(&self.limits.default_plugin) {
            Some(Slot::Ready(loaded)) => Ok(loaded.clone()),
            _ => Err(PluginError::NoDefault {
                tenant: tenant.to_owned(),
                reason: "is not loaded (needed because the tenant's plugin is quarantined)".into(),
            }),
        }
    }

    /// Which plugin routes `tenant`'s events. A plugin named in the tenant's configuration
    /// must be there: if it is not, the tenant's events wait rather than be routed by the
    /// default plugin, whose rules may be quite different.
    fn select(&self, tenant: &str) -> Result<Arc<Loaded>, PluginError> {
        let plugins = self.plugins.load();
        let configured = self.tenants.get(tenant).and_then(|t| t.plugin.as_deref());
        let (name, slot) = match configured {
            Some(name) => match plugins.get(name) {
                Some(slot) => (name, slot),
                None => {
                    return Err(PluginError::Unavailable {
                        plugin: name.to_owned(),
                        reason: format!(
                            "tenants.{tenant}.plugin names {name}.wasm, which is not in {}",
                            self.limits.dir.display()
                        ),
                    });
                }
            },
            None => match plugins.get(tenant) {
                Some(slot) => (tenant, slot),
                None => match plugins.get(&self.limits.default_plugin) {
                    Some(slot) => (self.limits.default_plugin.as_str(), slot),
                    None => {
                        return Err(PluginError::NoDefault {
                            tenant: tenant.to_owned(),
                            reason: format!(
                                "{}.wasm is not in {}",
                                self.limits.default_plugin,
                                self.limits.dir.display()
                            ),
                        });
                    }
                },
            },
        };
        match slot {
            Slot::Ready(loaded) => Ok(loaded.clone()),
            Slot::Broken(reason) if name == self.limits.default_plugin && configured.is_none() => {
                Err(PluginError::NoDefault {
                    tenant: tenant.to_owned(),
                    reason: format!("is broken: {reason}"),
                })
            }
            Slot::Broken(reason) => Err(PluginError::Unavailable {
                plugin: name.to_owned(),
                reason: format!("it failed to load: {reason}"),
            }),
        }
    }

    async fn route_once(&self, loaded: &Loaded, event: &Event) -> Result<Decision, PluginError> {
        let input = wit::Event {
            id: event.id.clone(),
            tenant: event.tenant.clone(),
            event_type: event.event_type.clone(),
            time: event.time.to_rfc3339(),
            source: event.source.clone(),
            data: serde_json::Value::Object(event.data.clone()).to_string(),
        };
        let size = input.id.len()
            + input.tenant.len()
            + input.event_type.len()
            + input.time.len()
            + input.source.as_ref().map_or(0, String::len)
            + input.data.len();
        if size > self.limits.max_input_bytes {
            return Err(PluginError::InputTooLarge {
                size,
                limit: self.limits.max_input_bytes,
            });
        }

        let tenant_config = self
            .tenant_configs
            .get(&event.tenant)
            .cloned()
            .unwrap_or_else(|| self.empty_config.clone());
        let stderr = MemoryOutputPipe::new(STDERR_CAPTURE);
        let state = CallState {
            // Deny-all: no preopens, env, args or sockets; stdout discarded; stderr kept.
            wasi: WasiCtx::builder().stderr(stderr.clone()).build(),
            table: ResourceTable::new(),
            limits: MemoryCap {
                limit: self.limits.memory_bytes,
                total: 0,
                peak: 0,
            },
            tenant_config,
            tenant: event.tenant.clone(),
            plugin: loaded.name.clone(),
            event_id: event.id.clone(),
            logs: Vec::new(),
            dropped_logs: 0,
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limits);
        store
            .set_fuel(self.limits.fuel)
            .expect("fuel is enabled on this engine");
        let ticks = self
            .limits
            .timeout()
            .as_millis()
            .div_ceil(EPOCH_TICK.as_millis())
            .max(1) as u64;
        // Every epoch tick the guest yields to tokio, so a plugin spinning for its whole
        // budget shares its worker thread with everything else (the HTTP side, other
        // tenants' lanes) instead of holding it; once `ticks` have passed, it traps.
        let mut remaining = ticks;
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(move |_| {
            remaining = remaining.saturating_sub(1);
            Ok(if remaining == 0 {
                UpdateDeadline::Interrupt
            } else {
                UpdateDeadline::YieldCustom(1, Box::pin(tokio::task::yield_now()))
            })
        });

        let started = Instant::now();
        let plugin = loaded.name.clone();
        let call = async {
            let instance = loaded.pre.instantiate_async(&mut store).await?;
            instance
                .notify_plugin_router()
                .call_route(&mut store, &input)
                .await
        };
        // The epoch deadline stops guest code; this outer bound also covers time spent in
        // host functions (a guest waiting on a WASI pollable burns neither fuel nor epoch
        // ticks), with a grace period of a few ticks.
        let outer = self.limits.timeout() + EPOCH_TICK * 4;
        let result = tokio::time::timeout(outer, call).await;
        let elapsed = started.elapsed();
        let fuel = self
            .limits
            .fuel
            .saturating_sub(store.get_fuel().unwrap_or(0));
        let cost = Cost {
            fuel,
            elapsed,
            memory_bytes: store.data().limits.peak,
        };
        let answer = match result {
            Err(_) => {
                return Err(PluginError::Timeout {
                    plugin,
                    limit_ms: self.limits.timeout_ms,
                    retried: false,
                });
            }
            Ok(Err(e)) => return Err(self.classify_trap(plugin, e, &stderr.contents())),
            Ok(Ok(answer)) => answer,
        };
        let deliveries = match answer {
            Ok(d) => d,
            Err(wit::RouteError::InvalidEvent(message)) => {
                return Err(PluginError::InvalidEvent {
                    plugin,
                    message: plugin_text(&message),
                });
            }
            Err(wit::RouteError::Other(message)) => {
                return Err(PluginError::Failed {
                    plugin,
                    message: plugin_text(&message),
                });
            }
        };
        let deliveries = output::validate(deliveries, &self.limits).map_err(|message| {
            PluginError::InvalidOutput {
                plugin: plugin.clone(),
                message,
            }
        })?;
        let state = store.data_mut();
        let mut logs = std::mem::take(&mut state.logs);
        if state.dropped_logs > 0 {
            logs.push((
                "warn".into(),
                format!(
                    "{} more log lines dropped (limit {MAX_CAPTURED_LOGS} per call)",
                    state.dropped_logs
                ),
            ));
        }
        Ok(Decision {
            plugin,
            digest: loaded.digest.clone(),
            deliveries,
            cost,
            logs,
        })
    }

    fn classify_trap(&self, plugin: String, e: wasmtime::Error, stderr: &[u8]) -> PluginError {
        match e.downcast_ref::<Trap>() {
            Some(Trap::OutOfFuel) => PluginError::OutOfFuel {
                plugin,
                fuel: self.limits.fuel,
            },
            Some(Trap::Interrupt) => PluginError::Timeout {
                plugin,
                limit_ms: self.limits.timeout_ms,
                retried: false,
            },
            _ => {
                let mut message = format!("{e:#}");
                let stderr = String::from_utf8_lossy(stderr);
                let stderr = stderr.trim();
                if !stderr.is_empty() {
                    // The tail: a panic message is the last thing a plugin writes.
                    let mut start = stderr.len().saturating_sub(STDERR_IN_REASON);
                    while !stderr.is_char_boundary(start) {
                        start += 1;
                    }
                    message.push_str("; stderr: ");
                    message.push_str(&stderr[start..]);
                }
                PluginError::Trap {
                    plugin,
                    message: plugin_text(&message),
                }
            }
        }
    }
}

/// Text that came from a plugin, made fit for logs and the database: control characters
/// escaped (a plugin cannot forge log lines with a newline, or rewrite a terminal with ANSI
/// escapes), so no NUL either (PostgreSQL text cannot hold it), and at most
/// [`MAX_LOG_LINE`] bytes.
fn plugin_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(MAX_LOG_LINE + 8));
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
        if out.len() > MAX_LOG_LINE {
            break;
        }
    }
    if out.len() > MAX_LOG_LINE {
        let mut cut = MAX_LOG_LINE;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
        out.push('…');
    }
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn plugin_text_escapes_control_characters_and_is_bounded() {
        let forged = "ok\n2026-11-27T00:00:00Z  INFO forged line\u{1b}[2J\0end";
        let clean = super::plugin_text(forged);
        assert!(!clean.chars().any(char::is_control), "{clean:?}");
        assert!(clean.contains("ok\\n2026"), "{clean:?}");
        assert!(clean.contains("\\u{1b}[2J"), "{clean:?}");
        assert!(clean.contains("\\u{0}end"), "{clean:?}");
        let long = super::plugin_text(&"é".repeat(5000));
        assert!(
            long.len() <= super::MAX_LOG_LINE + '…'.len_utf8(),
            "{}",
            long.len()
        );
        assert!(long.ends_with('…'));
    }
}
