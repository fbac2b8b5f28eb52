//! The plugin registry: which compiled version serves under which name, whom it serves, and
//! the single hot-swap point (`ArcSwap`) that reloads go through.
//!
//! - here: the slots, the selection rules (which plugin routes a tenant's events, when the
//!   default plugin stands in, which one renders its emails), the admin listing, readiness
//!   and the per-version call statistics;
//! - `load`: the diffing reload of the directory and its pure decisions (what a new,
//!   changed, failed, half-written or deleted file does to its slot: a broken new version
//!   never replaces a working one);
//! - `compile`: compiling (through the precompiled cache), the import and world checks, and
//!   `notify-engine plugin check`;
//! - `cache`: whether the precompiled cache may be read at all (who can write into it).
//!
//! The selection and reload rules are generic over what a ready slot holds ([`Serving`]),
//! so their unit tests run without compiling a component.

mod cache;
mod compile;
mod load;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use super::PluginError;
use super::breaker::Breakers;
use super::wit::{self, World};
use crate::config::{PluginConfig, TenantConfig};

pub(super) use cache::prepare as prepare_cache;
pub use compile::CheckReport;
use compile::hex;
pub(super) use compile::{Compiler, read_plugin};
pub use load::{ReloadOutcome, Reloaded};

/// A compiled, linked plugin, ready to instantiate.
pub(super) struct Loaded {
    pub(super) name: String,
    pub(super) digest: String,
    pub(super) pre: wit::Pre,
    pub(super) loaded_at: chrono::DateTime<chrono::Utc>,
}

/// What a ready slot holds, as far as the selection and reload rules care: a loaded plugin,
/// or in the unit tests a stand-in.
pub(super) trait Serving: Clone {
    fn world(&self) -> World;
}

impl Serving for Arc<Loaded> {
    fn world(&self) -> World {
        self.pre.world()
    }
}

/// The outcome of loading one plugin file: ready, or broken with the reason. A broken
/// tenant plugin is remembered (not silently replaced by the default plugin): that tenant's
/// events are dead-lettered with the reason until the file is fixed.
#[derive(Clone)]
pub(super) enum Slot<T = Arc<Loaded>> {
    Ready(T),
    Broken(String),
}

/// The loaded set, by plugin name (file stem).
pub(super) type Slots<T = Arc<Loaded>> = HashMap<String, Slot<T>>;

/// One plugin as the admin listing shows it (`GET /api/v1/admin/plugins`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct PluginInfo {
    /// File stem in the plugin directory.
    pub plugin: String,
    /// `serving`, `quarantined` (for every tenant it serves) or `broken` (a new file that
    /// never loaded).
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
    /// Tenants for whom the breaker has quarantined this version (after consecutive
    /// failures of their own events); it keeps serving the others.
    pub quarantined_for: Vec<String>,
}

/// Which plugins are loaded, whom they serve, and how they have done.
pub(super) struct Registry {
    /// The single swap point: calls load a snapshot and finish on it.
    slots: ArcSwap<Slots>,
    tenants: BTreeMap<String, TenantConfig>,
    dir: PathBuf,
    default_plugin: String,
    /// Plugins whose newest file was refused while an older version keeps serving.
    rejected: Mutex<BTreeMap<String, String>>,
    /// Calls and malfunctions per plugin version, for the admin listing.
    stats: Stats,
    /// One directory reload at a time (the watcher and stalled lanes both reload).
    reloading: tokio::sync::Mutex<()>,
}

impl Registry {
    pub(super) fn new(limits: &PluginConfig, tenants: BTreeMap<String, TenantConfig>) -> Self {
        Registry {
            slots: ArcSwap::from_pointee(HashMap::new()),
            tenants,
            dir: limits.dir.clone(),
            default_plugin: limits.default_plugin.clone(),
            rejected: Mutex::new(BTreeMap::new()),
            stats: Stats::default(),
            reloading: tokio::sync::Mutex::new(()),
        }
    }

    /// Counts one call of `loaded` for the admin listing.
    pub(super) fn record(&self, loaded: &Loaded, malfunction: bool) {
        self.stats.record(&loaded.name, &loaded.digest, malfunction);
    }

    /// Which plugin routes `tenant`'s events ([`Registry::choose_routing`] on what is
    /// loaded now).
    pub(super) fn select(&self, tenant: &str) -> Result<Arc<Loaded>, PluginError> {
        self.choose_routing(&self.slots.load(), tenant)
    }

    /// The default plugin, for a tenant whose own plugin is quarantined, if it is loaded.
    pub(super) fn select_default(&self) -> Option<Arc<Loaded>> {
        self.choose_default(&self.slots.load())
    }

    /// The templating plugin that renders `tenant`'s emails
    /// ([`Registry::choose_templating`] on what is loaded now).
    pub(super) fn select_templating(
        &self,
        tenant: &str,
    ) -> Option<Result<Arc<Loaded>, PluginError>> {
        self.choose_templating(&self.slots.load(), tenant)
    }

    /// Which plugin routes `tenant`'s events. A plugin named in the tenant's configuration
    /// must be there: if it is not, the tenant's events are set aside rather than routed by
    /// the default plugin, whose rules may be quite different. Unconfigured: `<tenant>.wasm`
    /// if present, else the default plugin.
    fn choose_routing<T: Serving>(&self, slots: &Slots<T>, tenant: &str) -> Result<T, PluginError> {
        let configured = self.tenants.get(tenant).and_then(|t| t.plugin.as_deref());
        let (name, slot) = match configured {
            Some(name) => match slots.get(name) {
                Some(slot) => (name, slot),
                None => {
                    return Err(PluginError::Unavailable {
                        plugin: name.to_owned(),
                        reason: format!(
                            "tenants.{tenant}.plugin names {name}.wasm, which is not in {}",
                            self.dir.display()
                        ),
                    });
                }
            },
            None => match slots.get(tenant) {
                Some(slot) => (tenant, slot),
                None => match slots.get(&self.default_plugin) {
                    Some(slot) => (self.default_plugin.as_str(), slot),
                    None => {
                        return Err(PluginError::NoDefault {
                            tenant: tenant.to_owned(),
                            reason: format!(
                                "{}.wasm is not in {}",
                                self.default_plugin,
                                self.dir.display()
                            ),
                        });
                    }
                },
            },
        };
        match slot {
            Slot::Ready(loaded) if loaded.world() == World::Routing => Ok(loaded.clone()),
            Slot::Ready(_) => Err(PluginError::Unavailable {
                plugin: name.to_owned(),
                reason: format!("{name}.wasm is a templating plugin, not a routing plugin"),
            }),
            Slot::Broken(reason) if name == self.default_plugin && configured.is_none() => {
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

    /// The default plugin, if it is loaded and routes.
    fn choose_default<T: Serving>(&self, slots: &Slots<T>) -> Option<T> {
        match slots.get(&self.default_plugin) {
            Some(Slot::Ready(loaded)) if loaded.world() == World::Routing => Some(loaded.clone()),
            _ => None,
        }
    }

    /// The templating plugin that renders `tenant`'s emails: `None` when the tenant has
    /// none configured (`tenants.<id>.templating_plugin`), so its files render directly.
    /// A configured one that is missing, broken or of the wrong world is unavailable: the
    /// email waits for it rather than going out in a shape the tenant did not choose.
    fn choose_templating<T: Serving>(
        &self,
        slots: &Slots<T>,
        tenant: &str,
    ) -> Option<Result<T, PluginError>> {
        let name = self.tenants.get(tenant)?.templating_plugin.as_deref()?;
        let unavailable = |reason: String| PluginError::Unavailable {
            plugin: name.to_owned(),
            reason,
        };
        Some(match slots.get(name) {
            Some(Slot::Ready(loaded)) if loaded.world() == World::Templating => Ok(loaded.clone()),
            Some(Slot::Ready(_)) => Err(unavailable(format!(
                "tenants.{tenant}.templating_plugin names {name}.wasm, which is a routing plugin"
            ))),
            Some(Slot::Broken(reason)) => Err(unavailable(format!("it failed to load: {reason}"))),
            None => Err(unavailable(format!(
                "tenants.{tenant}.templating_plugin names {name}.wasm, which is not in {}",
                self.dir.display()
            ))),
        })
    }

    /// The plugin set as loaded, for readiness.
    pub(super) fn health(&self, breaker: &Breakers) -> crate::health::PluginsHealth {
        let slots = self.slots.load();
        let default = match slots.get(&self.default_plugin) {
            Some(Slot::Ready(_)) => "ok",
            Some(Slot::Broken(_)) => "broken",
            None => "missing",
        };
        let mut broken: Vec<String> = slots
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
            quarantined: listed(breaker.quarantines()),
        }
    }

    /// Every plugin, for the admin listing: what serves, what is quarantined or broken,
    /// the last refused candidate, and which tenants each serves.
    pub(super) fn list(&self, breaker: &Breakers) -> Vec<PluginInfo> {
        let slots = self.slots.load();
        let rejected = self
            .rejected
            .lock()
            .expect("rejected lock poisoned")
            .clone();
        let mut out: Vec<PluginInfo> = slots
            .iter()
            .map(|(name, slot)| match slot {
                Slot::Ready(loaded) => {
                    let world = loaded.pre.world();
                    let (calls, failures) = self.stats.get(name, &loaded.digest);
                    let tenants = self.tenants_of(name, world);
                    let quarantined_for = breaker.quarantined_tenants(name, &loaded.digest);
                    // Quarantined as a whole only when it is for every tenant it serves (a
                    // shared default plugin, `*`, never is).
                    let quarantined = !quarantined_for.is_empty()
                        && tenants.iter().all(|t| quarantined_for.contains(t));
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
                        tenants,
                        quarantined_for,
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
                    quarantined_for: Vec::new(),
                },
            })
            .collect();
        out.sort_by(|a, b| a.plugin.cmp(&b.plugin));
        out
    }

    /// The tenants `name` serves in `world`, as [`Registry::choose_routing`] and
    /// [`Registry::choose_templating`] would choose; `*` for every tenant the default
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
                if name == self.default_plugin {
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
}

/// Most quarantines `/status` lists one by one: made-up tenant ids in `payload` mode could
/// otherwise make the body as long as the breaker's bookkeeping (the metric and the admin
/// listing still count them all).
const MAX_LISTED: usize = 20;

/// The quarantines as `/status` lists them, at most [`MAX_LISTED`] and a count of the rest.
fn listed(quarantines: Vec<super::Quarantine>) -> Vec<String> {
    let more = quarantines.len().saturating_sub(MAX_LISTED);
    let mut out: Vec<String> = quarantines
        .iter()
        .take(MAX_LISTED)
        .map(ToString::to_string)
        .collect();
    if more > 0 {
        out.push(format!("and {more} more"));
    }
    out
}

/// Calls and malfunctions per plugin version: by name, then SHA-256 (looked up without
/// allocating, as every call records its outcome).
#[derive(Default)]
struct Stats(Mutex<HashMap<String, VersionStats>>);

/// Calls and malfunctions of each version (by SHA-256) of one plugin.
type VersionStats = HashMap<String, (u64, u64)>;

impl Stats {
    fn record(&self, name: &str, digest: &str, failed: bool) {
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

    /// Forgets versions no longer serving, so the map does not grow with every reload.
    fn retain(&self, serving: impl Fn(&str, &str) -> bool) {
        let mut stats = self.0.lock().expect("stats lock poisoned");
        stats.retain(|name, versions| {
            versions.retain(|digest, _| serving(name, digest));
            !versions.is_empty()
        });
    }
}
