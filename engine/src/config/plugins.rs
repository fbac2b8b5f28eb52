//! `[plugins]` and `[tenants.<id>]`: the sandbox's budgets, the breaker, instance reuse,
//! and each tenant's plugins and settings.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ConfigError, invalid};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PluginConfig {
    /// Holds `<tenant>.wasm` routing plugins and the fallback `<default>.wasm`.
    pub dir: PathBuf,
    /// Precompiled plugins, so a restart skips compilation; empty: no cache. It must be
    /// outside `dir` and writable by the engine's user alone (what is in it runs as native
    /// code): the engine refuses to start otherwise, and never reads it once it is not.
    pub cache_dir: PathBuf,
    /// File stem of the fallback routing plugin used by tenants without their own.
    pub default_plugin: String,
    /// Instruction budget of one routing call (wasmtime fuel).
    pub fuel: u64,
    /// Wall-clock budget of one routing call.
    pub timeout_ms: u64,
    /// Linear-memory cap of one plugin instance.
    pub memory_bytes: usize,
    /// Largest event (JSON payload plus envelope strings) handed to a plugin.
    pub max_input_bytes: usize,
    /// Largest decision (sum of all strings in the deliveries) accepted from a plugin.
    pub max_output_bytes: usize,
    /// Most deliveries one event may produce.
    pub max_deliveries: usize,
    /// Routing time one tenant may use per second (its lane pauses when it is spent), so a
    /// slow plugin cannot take the cores other tenants need. 0: no limit.
    pub tenant_budget_ms_per_sec: u64,
    /// Consecutive malfunctions (trap, limit, invalid output) on one tenant's events after
    /// which a plugin version is quarantined for that tenant until a new version is
    /// published. 0: never.
    pub breaker_failures: u32,
    /// What happens to a quarantined plugin's events: `dead_letter` (set aside in the
    /// dead-letter table, not claimed, so they can be republished) or `default` (routed by
    /// the default plugin).
    pub breaker_fail_mode: BreakerFailMode,
    /// Calls one plugin instance serves (for one tenant) before it is replaced by a fresh
    /// one; 1: a fresh instance for every call. See `plugin::instances` for what reuse keeps
    /// and what it never does.
    pub instance_max_calls: u32,
    /// Idle instances kept warm across all tenants and plugins; past it the least recently
    /// used is dropped. 0: none kept (a fresh instance for every call).
    pub max_idle_instances: usize,
    /// Instruction budget of one templating call.
    pub templating_fuel: u64,
    /// Wall-clock budget of one templating call.
    pub templating_timeout_ms: u64,
    /// Linear-memory cap of one templating instance.
    pub templating_memory_bytes: usize,
    /// Largest rendered email (subject, html and text together), and largest text one
    /// `templates.render` host call may return.
    pub templating_max_output_bytes: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerFailMode {
    DeadLetter,
    Default,
}

impl Default for PluginConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("plugins/dist"),
            cache_dir: PathBuf::new(),
            default_plugin: "default".into(),
            fuel: 20_000_000,
            timeout_ms: 100,
            memory_bytes: 32 * 1024 * 1024,
            max_input_bytes: 256 * 1024,
            max_output_bytes: 64 * 1024,
            max_deliveries: 100,
            tenant_budget_ms_per_sec: 500,
            breaker_failures: 5,
            breaker_fail_mode: BreakerFailMode::DeadLetter,
            instance_max_calls: 10_000,
            max_idle_instances: 64,
            templating_fuel: 200_000_000,
            templating_timeout_ms: 500,
            templating_memory_bytes: 64 * 1024 * 1024,
            templating_max_output_bytes: 1024 * 1024,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TenantConfig {
    /// Routing plugin file stem for this tenant. Set: that file must exist (if it does not,
    /// the tenant's plugin is unavailable: its events are set aside unclaimed in the
    /// dead-letter table, never routed by the default plugin instead). Unset: `<tenant id>.wasm` if present, else the default plugin.
    pub plugin: Option<String>,
    /// Templating plugin file stem (world `templating`) that renders this tenant's emails.
    /// Unset: its Handlebars files render directly. Set but missing or broken: its emails
    /// wait (retried like a relay outage) until the plugin is there.
    pub templating_plugin: Option<String>,
    /// Values the tenant's plugin reads through the `host.config` import.
    pub config: BTreeMap<String, String>,
    /// Domains `{{link}}` may point to in this tenant's emails (and their subdomains);
    /// empty: any `https:` link.
    pub link_domains: Vec<String>,
    /// Domains this tenant may send email to; empty: any. Other recipients fail unsent.
    pub recipient_domains: Vec<String>,
    /// The tenant's identity provider's JWKS file: its keys verify tokens of this tenant
    /// only. Reloaded when it changes.
    pub jwks_file: Option<PathBuf>,
    /// The `iss` of tokens verified by `jwks_file`; unset: `auth.issuer`.
    pub jwt_issuer: Option<String>,
}

impl PluginConfig {
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    pub fn templating_timeout(&self) -> Duration {
        Duration::from_millis(self.templating_timeout_ms)
    }
}

impl PluginConfig {
    /// Budgets a call can run within, and a compile cache the plugin watcher never sees.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.fuel == 0 || self.timeout_ms == 0 {
            return invalid("plugins.fuel and plugins.timeout_ms must be positive");
        }
        if !self.cache_dir.as_os_str().is_empty() && self.cache_dir.starts_with(&self.dir) {
            return invalid(
                "plugins.cache_dir must be outside plugins.dir (the watched directory)",
            );
        }
        if self.memory_bytes < 1024 * 1024 || self.templating_memory_bytes < 1024 * 1024 {
            return invalid(
                "plugins.memory_bytes and plugins.templating_memory_bytes must be at least 1 MiB",
            );
        }
        if self.templating_fuel == 0
            || self.templating_timeout_ms == 0
            || self.templating_max_output_bytes == 0
        {
            return invalid(
                "plugins.templating_fuel, templating_timeout_ms and templating_max_output_bytes must be positive",
            );
        }
        Ok(())
    }
}

impl TenantConfig {
    /// `tenants.<id>`: one component implements one world, so one file cannot both route
    /// and render.
    pub(super) fn validate(&self, id: &str) -> Result<(), ConfigError> {
        if self.templating_plugin.is_some() && self.templating_plugin == self.plugin {
            return invalid(format!(
                "tenants.{id}: plugin and templating_plugin name the same file; a component implements one world"
            ));
        }
        Ok(())
    }
}
