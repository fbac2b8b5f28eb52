//! The plugin registry: which compiled version serves under which name, and the single
//! hot-swap point (`ArcSwap`) that reloads go through. Loading diffs the directory by
//! SHA-256, checks what a component imports and which world it implements, and never lets a
//! broken new version replace a working one.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use wasmtime::component::Component;

use super::bindings::{v0_1, v0_2, v0_3};
use super::{CallState, LoadError, PluginError, PluginHost};

/// A compiled, linked plugin, ready to instantiate.
pub(super) struct Loaded {
    pub(super) name: String,
    pub(super) digest: String,
    pub(super) pre: Pre,
    pub(super) loaded_at: chrono::DateTime<chrono::Utc>,
}

/// A linked component, by the world and WIT version it implements.
pub(super) enum Pre {
    Routing03(v0_3::routing::RoutingPre<CallState>),
    Templating03(v0_3::templating::TemplatingPre<CallState>),
    Routing02(v0_2::routing::RoutingPre<CallState>),
    Routing01(v0_1::RoutingPre<CallState>),
    Templating02(v0_2::templating::TemplatingPre<CallState>),
}

/// The plugin worlds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum World {
    Routing,
    Templating,
}

impl World {
    pub fn as_str(self) -> &'static str {
        match self {
            World::Routing => "routing",
            World::Templating => "templating",
        }
    }
}

impl Pre {
    pub(super) fn world(&self) -> World {
        match self {
            Pre::Routing03(_) | Pre::Routing02(_) | Pre::Routing01(_) => World::Routing,
            Pre::Templating03(_) | Pre::Templating02(_) => World::Templating,
        }
    }

    pub(super) fn wit_version(&self) -> &'static str {
        match self {
            Pre::Routing03(_) | Pre::Templating03(_) => "notify:plugin@0.3.0",
            Pre::Routing02(_) | Pre::Templating02(_) => "notify:plugin@0.2.0",
            Pre::Routing01(_) => "notify:plugin@0.1.0",
        }
    }
}

/// One plugin as the admin listing shows it (`GET /api/v1/admin/plugins`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct PluginInfo {
    /// File stem in the plugin directory.
    pub plugin: String,
    /// `serving`, `quarantined` or `broken` (a new file that never loaded).
    pub state: &'static str,
    /// `None` when the plugin is broken (its world is unknown).
    pub world: Option<World>,
    pub wit_version: Option<&'static str>,
    pub sha256: Option<String>,
    pub loaded_at: Option<chrono::DateTime<chrono::Utc>>,
    /// The newest file, refused while the version above keeps serving, and why; or why a
    /// broken plugin did not load.
    pub error: Option<String>,
    /// Calls and malfunctions (trap, limit, invalid output) of the serving version since it
    /// was loaded.
    pub calls: u64,
    pub failures: u64,
    /// Tenants this plugin serves in its world (configured, by file name, or as the default
    /// routing plugin: `*`).
    pub tenants: Vec<String>,
}

/// Calls and malfunctions per plugin version: by name, then SHA-256 (looked up without
/// allocating, as every call records its outcome).
#[derive(Default)]
pub(super) struct Stats(std::sync::Mutex<HashMap<String, VersionStats>>);

/// Calls and malfunctions of each version (by SHA-256) of one plugin.
type VersionStats = HashMap<String, (u64, u64)>;

impl Stats {
    pub(super) fn record(&self, name: &str, digest: &str, failed: bool) {
        let mut stats = self.0.lock().expect("stats lock poisoned");
        let entry = match stats.get_mut(name).and_then(|v| v.get_mut(digest)) {
            Some(entry) => entry,
            None => stats
                .entry(name.to_owned())
                .or_default()
                .entry(digest.to_owned())
                .or_default(),
        };
        entry.0 += 1;
        entry.1 += u64::from(failed);
    }

    fn get(&self, name: &str, digest: &str) -> (u64, u64) {
        let stats = self.0.lock().expect("stats lock poisoned");
        stats
            .get(name)
            .and_then(|v| v.get(digest))
            .copied()
            .unwrap_or_default()
    }

    /// Forgets versions no longer loaded, so the map does not grow with every reload.
    fn retain(&self, loaded: &HashMap<String, Slot>) {
        let mut stats = self.0.lock().expect("stats lock poisoned");
        stats.retain(|name, versions| {
            versions.retain(
                |digest, _| matches!(loaded.get(name), Some(Slot::Ready(l)) if &l.digest == digest),
            );
            !versions.is_empty()
        });
    }
}

/// A plugin file as the host sees it (`notify-engine plugin check`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct CheckReport {
    pub world: String,
    pub wit_version: String,
    pub imports: Vec<String>,
    pub exports: Vec<String>,
    pub size_bytes: usize,
    pub sha256: String,
    pub compile_ms: u64,
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

/// Writes a compiled component to the cache (write then rename, so a reader never sees half
/// a file). A failure only costs the next start a compilation.
fn store_in_cache(component: &Component, file: &Path) {
    let write = || -> Result<(), String> {
        let bytes = component.serialize().map_err(|e| e.to_string())?;
        if let Some(dir) = file.parent() {
            std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        }
        let temporary = file.with_extension(format!("tmp.{}", std::process::id()));
        std::fs::write(&temporary, bytes).map_err(|e| e.to_string())?;
        std::fs::rename(&temporary, file).map_err(|e| e.to_string())
    };
    if let Err(e) = write() {
        tracing::warn!(file = %file.display(), error = %e, "could not write the precompiled plugin cache");
    }
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

/// A plugin file's bytes and their SHA-256 (the tools, which read one file once).
async fn read_plugin(path: &Path) -> Result<(Vec<u8>, String), LoadError> {
    let bytes = tokio::fs::read(path).await.map_err(|e| LoadError {
        path: path.to_owned(),
        message: format!("cannot read: {e}"),
    })?;
    let digest = hex(&Sha256::digest(&bytes));
    Ok((bytes, digest))
}

/// Why a plugin file was not read.
enum Unsettled {
    /// Its size changed while it was read: still being written; tried at the next reload.
    Growing(String),
    /// It cannot be read at all (permissions, say): a failure, reported as such.
    Unreadable(String),
}

/// The file's bytes, if its size did not change while it was read (a file written in
/// place and still growing is read again at the next reload).
async fn read_settled(path: &Path) -> Result<Vec<u8>, Unsettled> {
    let bytes = tokio::fs::read(path)
        .await
        .map_err(|e| Unsettled::Unreadable(format!("cannot read: {e}")))?;
    let size = tokio::fs::metadata(path)
        .await
        .map_err(|e| Unsettled::Unreadable(format!("cannot stat: {e}")))?
        .len();
    if size != bytes.len() as u64 {
        return Err(Unsettled::Growing(format!(
            "the file changed while it was read ({} then {size} bytes)",
            bytes.len()
        )));
    }
    Ok(bytes)
}

/// The outcome of loading one plugin file: ready, or broken with the reason. A broken
/// tenant plugin is remembered (not silently replaced by the default plugin): that tenant's
/// events are dead-lettered with the reason until the file is fixed.
#[derive(Clone)]
pub(super) enum Slot {
    Ready(Arc<Loaded>),
    Broken(String),
}
/// Least time between two reloads of the plugin directory by stalled lanes.
pub(super) const STALL_RELOAD_INTERVAL: Duration = Duration::from_secs(5);
impl PluginHost {
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
                Err(Unsettled::Growing(e)) => Change::Pending(e),
                Err(Unsettled::Unreadable(e)) => Change::Failed(e),
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
                    tracing::info!(plugin = %name, world = loaded.pre.world().as_str(), wit = loaded.pre.wit_version(), digest = %&loaded.digest[..12], replaced = previous.is_some(), "plugin loaded");
                    slots.insert(name.clone(), Slot::Ready(loaded));
                    ReloadOutcome::Loaded
                }
                Change::Failed(reason) => match previous {
                    Some(old) => {
                        tracing::error!(plugin = %name, error = %reason, serving = %&old.digest[..12], "new version of plugin rejected; the previous version keeps serving");
                        slots.insert(name.clone(), Slot::Ready(old));
                        ReloadOutcome::Rejected(reason)
                    }
                    None => {
                        tracing::error!(plugin = %name, error = %reason, "plugin rejected");
                        slots.insert(name.clone(), Slot::Broken(reason.clone()));
                        ReloadOutcome::Broken(reason)
                    }
                },
                Change::Pending(reason) => {
                    tracing::info!(plugin = %name, reason = %reason, "plugin file not settled; left for the next reload");
                    if let Some(slot) = current.get(&name) {
                        slots.insert(name.clone(), slot.clone());
                    }
                    ReloadOutcome::Pending(reason)
                }
            };
            report.push(Reloaded { name, outcome });
        }
        for name in current.keys().filter(|n| !slots.contains_key(*n)) {
            tracing::info!(plugin = %name, "plugin removed");
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
                // Unchanged too: a reverted file serves what it always did.
                ReloadOutcome::Loaded
                | ReloadOutcome::Unchanged
                | ReloadOutcome::Removed
                | ReloadOutcome::Broken(_) => {
                    rejected.remove(&r.name);
                }
                ReloadOutcome::Pending(_) => {}
            }
        }
        self.stats.retain(&slots);
        self.breaker.retain(
            |name, digest| matches!(slots.get(name), Some(Slot::Ready(l)) if l.digest == digest),
        );
        self.instances.retain(
            |l| matches!(slots.get(&l.name), Some(Slot::Ready(serving)) if Arc::ptr_eq(serving, l)),
        );
        self.plugins.store(Arc::new(slots));
        Ok(report)
    }

    /// Compiles a component off the async threads (the blocking pool), or takes it from the
    /// precompiled cache (`plugins.cache_dir`) when this engine compiled the same bytes
    /// before, so a restart skips compilation.
    async fn compile_component(&self, path: &Path, bytes: Vec<u8>) -> Result<Component, LoadError> {
        let err = |message: String| LoadError {
            path: path.to_owned(),
            message,
        };
        let cached = self.cache_file(&bytes);
        let engine = self.engine.clone();
        tokio::task::spawn_blocking(move || {
            if let Some(file) = &cached
                && file.exists()
            {
                // SAFETY: deserializing runs native code compiled earlier. The cache holds
                // only what this engine serialized under its compatibility hash (part of the
                // file name, and checked again by wasmtime), and `plugins.cache_dir` must be
                // writable by the engine alone (documented with the setting).
                // Read into memory rather than mapped: a cache file truncated under a mapping
                // would kill the process with SIGBUS.
                let precompiled = std::fs::read(file).map_err(wasmtime::Error::from);
                match precompiled.and_then(|b| unsafe { Component::deserialize(&engine, &b) }) {
                    Ok(component) => return Ok(component),
                    Err(e) => tracing::warn!(file = %file.display(), error = %e, "precompiled plugin unusable; compiling again"),
                }
            }
            let component = Component::new(&engine, &bytes)?;
            if let Some(file) = &cached {
                store_in_cache(&component, file);
            }
            Ok(component)
        })
        .await
        .map_err(|e| err(format!("compiler task failed: {e}")))?
        .map_err(|e: wasmtime::Error| err(format!("not a valid WebAssembly component: {e:#}")))
    }

    /// `<cache_dir>/<sha256 of the bytes>-<engine compatibility hash>.cwasm`, if a cache is
    /// configured: a cache written by another wasmtime version or configuration has another
    /// name and is never read.
    fn cache_file(&self, bytes: &[u8]) -> Option<std::path::PathBuf> {
        if self.limits.cache_dir.as_os_str().is_empty() {
            return None;
        }
        use std::hash::{Hash, Hasher};
        let mut compat = std::collections::hash_map::DefaultHasher::new();
        self.engine
            .precompile_compatibility_hash()
            .hash(&mut compat);
        Some(self.limits.cache_dir.join(format!(
            "{}-{:016x}.cwasm",
            hex(&Sha256::digest(bytes)),
            compat.finish()
        )))
    }

    /// Compiles one component off the async threads and checks what it imports and that it
    /// implements the world.
    async fn compile(
        &self,
        path: &Path,
        name: &str,
        bytes: Vec<u8>,
        digest: String,
    ) -> Result<Loaded, LoadError> {
        let component = self.compile_component(path, bytes).await?;
        self.link(path, name, &component, digest)
    }

    /// Checks what a compiled component imports and that it implements the world, and links
    /// it, ready to instantiate.
    fn link(
        &self,
        path: &Path,
        name: &str,
        component: &Component,
        digest: String,
    ) -> Result<Loaded, LoadError> {
        let err = |message: String| LoadError {
            path: path.to_owned(),
            message,
        };
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
            .instantiate_pre(component)
            .map_err(|e| err(format!("imports something the host does not offer: {e:#}")))?;
        // The newest version first; a component exports exactly one world's interface.
        let pre = if let Ok(p) = v0_3::routing::RoutingPre::new(pre.clone()) {
            Pre::Routing03(p)
        } else if let Ok(p) = v0_3::templating::TemplatingPre::new(pre.clone()) {
            Pre::Templating03(p)
        } else if let Ok(p) = v0_2::routing::RoutingPre::new(pre.clone()) {
            Pre::Routing02(p)
        } else if let Ok(p) = v0_2::templating::TemplatingPre::new(pre.clone()) {
            Pre::Templating02(p)
        } else {
            match v0_1::RoutingPre::new(pre) {
                Ok(p) => Pre::Routing01(p),
                Err(_) => {
                    let mut exports: Vec<String> = component
                        .component_type()
                        .exports(&self.engine)
                        .map(|(name, _)| name.to_owned())
                        .collect();
                    exports.sort();
                    return Err(err(format!(
                        "implements no plugin world: it must export notify:plugin/router (routing, WIT {}) or notify:plugin/templater (templating, WIT 0.3.0 or 0.2.0) with the signatures of the WIT; it exports [{}]",
                        super::WIT_VERSIONS.join(" or "),
                        exports.join(", ")
                    )));
                }
            }
        };
        Ok(Loaded {
            name: name.to_owned(),
            digest,
            pre,
            loaded_at: chrono::Utc::now(),
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

    /// What `notify-engine plugin check` reports: the checks a reload makes, without loading
    /// anything. `Err` carries the reason the host would refuse the file.
    pub async fn check(&self, path: &Path) -> Result<CheckReport, LoadError> {
        let (bytes, sha256) = read_plugin(path).await?;
        let size_bytes = bytes.len();
        let started = Instant::now();
        let component = self.compile_component(path, bytes).await?;
        let compile_ms = started.elapsed().as_millis() as u64;
        let names = |items: Vec<String>| {
            let mut items = items;
            items.sort();
            items
        };
        let imports = names(
            component
                .component_type()
                .imports(&self.engine)
                .map(|(name, _)| name.to_owned())
                .collect(),
        );
        let exports = names(
            component
                .component_type()
                .exports(&self.engine)
                .map(|(name, _)| name.to_owned())
                .collect(),
        );
        let linked = self.link(path, "check", &component, sha256.clone())?;
        Ok(CheckReport {
            world: format!("notify:plugin/{}", linked.pre.world().as_str()),
            wit_version: linked.pre.wit_version().into(),
            imports,
            exports,
            size_bytes,
            sha256,
            compile_ms,
        })
    }

    /// Loads a single file as the only plugin, under the default name (the local runner).
    pub async fn load_single(&self, path: &Path) -> Result<(), LoadError> {
        let (bytes, digest) = read_plugin(path).await?;
        let loaded = self
            .compile(path, &self.limits.default_plugin, bytes, digest)
            .await?;
        let mut slots = HashMap::new();
        slots.insert(
            self.limits.default_plugin.clone(),
            Slot::Ready(Arc::new(loaded)),
        );
        self.instances.retain(|_| false);
        self.plugins.store(Arc::new(slots));
        Ok(())
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

    /// The default plugin, for a tenant whose own plugin is quarantined, if it is loaded.
    pub(super) fn select_default(&self) -> Option<Arc<Loaded>> {
        match self.plugins.load().get(&self.limits.default_plugin) {
            Some(Slot::Ready(loaded)) if loaded.pre.world() == World::Routing => {
                Some(loaded.clone())
            }
            _ => None,
        }
    }

    /// The templating plugin that renders `tenant`'s emails: `None` when the tenant has
    /// none configured (`tenants.<id>.templating_plugin`), so its files render directly.
    /// A configured one that is missing, broken or of the wrong world is unavailable: the
    /// email waits for it rather than going out in a shape the tenant did not choose.
    pub(super) fn select_templating(
        &self,
        tenant: &str,
    ) -> Option<Result<Arc<Loaded>, PluginError>> {
        let name = self.tenants.get(tenant)?.templating_plugin.as_deref()?;
        let unavailable = |reason: String| PluginError::Unavailable {
            plugin: name.to_owned(),
            reason,
        };
        Some(match self.plugins.load().get(name) {
            Some(Slot::Ready(loaded)) if loaded.pre.world() == World::Templating => {
                Ok(loaded.clone())
            }
            Some(Slot::Ready(_)) => Err(unavailable(format!(
                "tenants.{tenant}.templating_plugin names {name}.wasm, which is a routing plugin"
            ))),
            Some(Slot::Broken(reason)) => Err(unavailable(format!("it failed to load: {reason}"))),
            None => Err(unavailable(format!(
                "tenants.{tenant}.templating_plugin names {name}.wasm, which is not in {}",
                self.limits.dir.display()
            ))),
        })
    }

    /// Every plugin, for the admin listing: what serves, what is quarantined or broken,
    /// the last refused candidate, and which tenants each serves.
    pub fn list(&self) -> Vec<PluginInfo> {
        let plugins = self.plugins.load();
        let rejected = self
            .rejected
            .lock()
            .expect("rejected lock poisoned")
            .clone();
        let mut out: Vec<PluginInfo> = plugins
            .iter()
            .map(|(name, slot)| match slot {
                Slot::Ready(loaded) => {
                    let world = loaded.pre.world();
                    let (calls, failures) = self.stats.get(name, &loaded.digest);
                    let quarantined = self.breaker.quarantined(name, &loaded.digest).is_some();
                    PluginInfo {
                        plugin: name.clone(),
                        state: if quarantined {
                            "quarantined"
                        } else {
                            "serving"
                        },
                        world: Some(world),
                        wit_version: Some(loaded.pre.wit_version()),
                        sha256: Some(loaded.digest.clone()),
                        loaded_at: Some(loaded.loaded_at),
                        error: rejected.get(name).cloned(),
                        calls,
                        failures,
                        tenants: self.tenants_of(name, world),
                    }
                }
                Slot::Broken(reason) => PluginInfo {
                    plugin: name.clone(),
                    state: "broken",
                    world: None,
                    wit_version: None,
                    sha256: None,
                    loaded_at: None,
                    error: Some(reason.clone()),
                    calls: 0,
                    failures: 0,
                    tenants: Vec::new(),
                },
            })
            .collect();
        out.sort_by(|a, b| a.plugin.cmp(&b.plugin));
        out
    }

    /// The tenants `name` serves in `world`, as [`PluginHost::select`] and
    /// [`PluginHost::select_templating`] would choose; `*` for every tenant the default
    /// routing plugin serves.
    fn tenants_of(&self, name: &str, world: World) -> Vec<String> {
        let mut tenants: Vec<String> = match world {
            World::Templating => self
                .tenants
                .iter()
                .filter(|(_, t)| t.templating_plugin.as_deref() == Some(name))
                .map(|(id, _)| id.clone())
                .collect(),
            World::Routing => {
                let mut v: Vec<String> = self
                    .tenants
                    .iter()
                    .filter(|(id, t)| match t.plugin.as_deref() {
                        Some(p) => p == name,
                        None => id.as_str() == name,
                    })
                    .map(|(id, _)| id.clone())
                    .collect();
                if name == self.limits.default_plugin {
                    v.push("*".into());
                } else if !self.tenants.contains_key(name)
                    && !self
                        .tenants
                        .values()
                        .any(|t| t.plugin.as_deref() == Some(name))
                {
                    // `<tenant>.wasm` for a tenant not in the configuration.
                    v.push(name.to_owned());
                }
                v
            }
        };
        tenants.sort();
        tenants.dedup();
        tenants
    }

    /// Which plugin routes `tenant`'s events. A plugin named in the tenant's configuration
    /// must be there: if it is not, the tenant's events are set aside rather than routed by the
    /// default plugin, whose rules may be quite different.
    pub(super) fn select(&self, tenant: &str) -> Result<Arc<Loaded>, PluginError> {
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
            Slot::Ready(loaded) if loaded.pre.world() == World::Routing => Ok(loaded.clone()),
            Slot::Ready(_) => Err(PluginError::Unavailable {
                plugin: name.to_owned(),
                reason: format!("{name}.wasm is a templating plugin, not a routing plugin"),
            }),
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
}

pub(super) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
