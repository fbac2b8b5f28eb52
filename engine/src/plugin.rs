//! The plugin host: the only module that touches wasmtime.
//!
//! - `sandbox`: what every call runs in, whatever the world: a fresh `Store`
//!   per call, deny-all WASI, the memory cap, the epoch ticker, captured logs, text hygiene.
//! - `registry`: which compiled version serves under which name, loading
//!   and the diffing hot reload, import and world checks, the single `ArcSwap` swap point.
//! - this file: the routing world's adapter: plugin selection, the call with its limits
//!   (fuel; an epoch deadline at which the guest yields every tick and traps when it passes;
//!   an outer tokio bound that also covers host calls), trap classification.
//! - `breaker`: the per-version circuit breaker; `output`: validation of routing decisions.
//!
//! A trap, a timeout, a refusal or invalid output is returned as a [`PluginError`]; the
//! pipeline dead-letters that event and moves on. Nothing a plugin does can crash the engine.
//! A plugin that is not there to ask is not the event's fault: [`PluginError::disposition`]
//! tells the pipeline to wait for it ([`Disposition::Stall`], [`Disposition::Park`]) instead.

mod breaker;
mod output;
mod registry;
mod sandbox;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use wasmtime::component::{HasSelf, Linker, ResourceTable};
use wasmtime::{Engine, Store, Trap, UpdateDeadline};
use wasmtime_wasi::WasiCtx;
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;

use crate::config::{BreakerFailMode, PluginConfig, TenantConfig};
use crate::ingest::envelope::Event;

pub use output::{Delivery, NOTIFICATION_EVENT};
pub use registry::{CheckReport, ReloadOutcome, Reloaded, WIT_VERSION};
use registry::{Loaded, Slot};
use sandbox::{
    CallState, EPOCH_TICK, EpochTicker, MAX_CAPTURED_LOGS, MemoryCap, STDERR_CAPTURE,
    STDERR_IN_REASON, plugin_text,
};

mod bindings {
    wasmtime::component::bindgen!({
        world: "routing",
        path: "../wit/plugin",
        imports: { default: async | trappable },
        exports: { default: async },
    });
}

use bindings::notify::plugin::types as wit;

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

    /// Routing time one tenant may use per second (`plugins.tenant_budget_ms_per_sec`).
    pub fn tenant_budget_ms_per_sec(&self) -> u64 {
        self.limits.tenant_budget_ms_per_sec
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
                // Nothing to fall back to (the default plugin is missing, or quarantined
                // itself): the event is set aside like in fail mode `dead_letter`.
                BreakerFailMode::Default
                    if let Some(default) = self.select_default()
                        && self
                            .breaker
                            .quarantined(&default.name, &default.digest)
                            .is_none() =>
                {
                    loaded = default;
                }
                BreakerFailMode::Default | BreakerFailMode::DeadLetter => {
                    return Err(PluginError::Quarantined {
                        plugin: loaded.name.clone(),
                        failures,
                    });
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
