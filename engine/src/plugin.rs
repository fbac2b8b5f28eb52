//! The plugin host: the only module that touches wasmtime.
//!
//! - `sandbox`: what every call runs in, whatever the world: the linker (only the
//!   interfaces plugins are granted), a `Store` with every limit set (memory for the
//!   instance; fuel, hostcall fuel and an epoch deadline, at which the guest yields every tick
//!   and traps when it passes, afresh for each call; resource handles), deny-all WASI with
//!   coarse clocks, captured logs, text hygiene.
//! - `instances`: warm instances, one tenant's and one plugin version's each, reused only
//!   after a clean call, recycled, bounded.
//! - `bindings`: the generated bindings, one module per WIT version, and the conversions of
//!   older versions' values to the newest.
//! - `registry`: which compiled version serves under which name and world, loading and the
//!   diffing hot reload, import and world checks, the single `ArcSwap` swap point.
//! - one adapter per world: `routing` (an event in, deliveries out) and `templating` (an
//!   outbox email in, subject/html/text out), each with its call, its limits and its
//!   output checks (`output` checks routing decisions).
//! - `breaker`: the per-version circuit breaker.
//!
//! A trap, a timeout, a refusal or invalid output is returned as a [`PluginError`]; the
//! caller dead-letters that event (or fails that email) and moves on. Nothing a plugin does
//! can crash the engine. A plugin that is not there to ask is not the event's fault:
//! [`PluginError::disposition`] tells the pipeline to wait for it ([`Disposition::Stall`],
//! [`Disposition::Park`]) instead.

mod bindings;
mod breaker;
mod instances;
mod output;
mod registry;
mod routing;
mod sandbox;
mod templating;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use wasmtime::component::Linker;
use wasmtime::{Engine, Trap};

use crate::config::{PluginConfig, TenantConfig};

pub use bindings::WIT_VERSIONS;
pub use output::Delivery;
pub use registry::{CheckReport, PluginInfo, ReloadOutcome, Reloaded, World};
use registry::{Loaded, Slot};
use sandbox::{
    CallState, EPOCH_TICK, EpochTicker, HOSTCALL_FUEL_EXHAUSTED, STDERR_IN_REASON, plugin_text,
};
pub use templating::EmailToRender;

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
    /// A templating plugin found the email's data unusable.
    #[error("plugin {plugin} refused the email's data: {message}")]
    InvalidData { plugin: String, message: String },
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
            PluginError::InvalidData { .. } => "invalid_data",
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
            | PluginError::InvalidData { plugin, .. }
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
    tenants: BTreeMap<String, TenantConfig>,
    empty_config: Arc<BTreeMap<String, String>>,
    tenant_configs: HashMap<String, Arc<BTreeMap<String, String>>>,
    plugins: ArcSwap<HashMap<String, Slot>>,
    /// When stalled lanes last reloaded the directory: one reload at a time, at most one per
    /// `registry::STALL_RELOAD_INTERVAL`, however many lanes wait.
    stall_reload: tokio::sync::Mutex<Option<Instant>>,
    /// One directory reload at a time (the watcher and stalled lanes both reload).
    reloading: tokio::sync::Mutex<()>,
    /// Plugins whose newest file was refused while an older version keeps serving.
    rejected: std::sync::Mutex<BTreeMap<String, String>>,
    breaker: breaker::Breakers,
    /// Calls and malfunctions per plugin version, for the admin listing.
    stats: registry::Stats,
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
        let tenant_configs = tenants
            .iter()
            .map(|(id, t)| (id.clone(), Arc::new(t.config.clone())))
            .collect();
        Ok(Self {
            _ticker: EpochTicker::start(engine.clone()),
            engine,
            linker,
            tenants,
            empty_config: Arc::new(BTreeMap::new()),
            tenant_configs,
            plugins: ArcSwap::from_pointee(HashMap::new()),
            stall_reload: tokio::sync::Mutex::new(None),
            reloading: tokio::sync::Mutex::new(()),
            rejected: std::sync::Mutex::new(BTreeMap::new()),
            breaker: breaker::Breakers::default(),
            stats: registry::Stats::default(),
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

    fn tenant_config(&self, tenant: &str) -> Arc<BTreeMap<String, String>> {
        self.tenant_configs
            .get(tenant)
            .cloned()
            .unwrap_or_else(|| self.empty_config.clone())
    }

    /// Records a call's outcome with the breaker and the statistics; logs when the version
    /// is quarantined by it.
    fn record_outcome<T>(&self, loaded: &Loaded, tenant: &str, result: &Result<T, PluginError>) {
        let malfunction = result
            .as_ref()
            .err()
            .is_some_and(PluginError::is_malfunction);
        self.stats.record(&loaded.name, &loaded.digest, malfunction);
        if let Some(failures) = self.breaker.record(
            &loaded.name,
            &loaded.digest,
            malfunction,
            self.limits.breaker_failures,
        ) {
            tracing::error!(tenant = %tenant, plugin = %loaded.name, world = loaded.pre.world().as_str(), digest = %&loaded.digest[..12], failures, fail_mode = ?self.limits.breaker_fail_mode, "plugin quarantined after consecutive failures; a new version clears it");
        }
    }
}

/// The outer bound of a call: the epoch deadline stops guest code; this also covers time
/// spent in host functions (a guest waiting on a WASI pollable burns neither fuel nor epoch
/// ticks), with a grace period of a few ticks.
fn outer_bound(timeout: Duration) -> Duration {
    timeout + EPOCH_TICK * 4
}

/// The error a failed call comes to: out of fuel, out of time, more data handed to the host
/// than the output limit allows, or a trap (with the tail of the plugin's stderr, where a
/// panic message lands).
fn classify_trap(
    plugin: String,
    e: wasmtime::Error,
    stderr: &[u8],
    fuel: u64,
    timeout_ms: u64,
) -> PluginError {
    match e.downcast_ref::<Trap>() {
        Some(Trap::OutOfFuel) => return PluginError::OutOfFuel { plugin, fuel },
        Some(Trap::Interrupt) => {
            return PluginError::Timeout {
                plugin,
                limit_ms: timeout_ms,
                retried: false,
            };
        }
        _ => {}
    }
    if format!("{e:#}").contains(HOSTCALL_FUEL_EXHAUSTED) {
        // Refused before it was all copied into the host.
        return PluginError::InvalidOutput {
            plugin,
            message: "the plugin handed the host more data than its output limit allows (refused before copying)".into(),
        };
    }
    // The cause first (`memory limit exceeded …`, `wasm trap: …`), then the guest's last
    // words on stderr, then where it happened: an interpreter's backtrace (Python,
    // JavaScript) is long, and the reason is cut to a log line's length.
    let mut message = e.root_cause().to_string();
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
    if let Some(backtrace) = e.downcast_ref::<wasmtime::WasmBacktrace>() {
        message.push_str("; at ");
        message.push_str(backtrace.to_string().trim());
    }
    PluginError::Trap {
        plugin,
        message: plugin_text(&message),
    }
}
