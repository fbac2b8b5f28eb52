//! What a plugin call or load comes to when it fails: [`PluginError`] (with its metric
//! label and [`Disposition`], what the pipeline does with the event), [`LoadError`], and
//! the classification of a failed call (out of fuel, out of time, a refused hostcall, a
//! trap with the plugin's last words on stderr).

use std::path::PathBuf;

use wasmtime::Trap;

use super::sandbox::{HOSTCALL_FUEL_EXHAUSTED, STDERR_IN_REASON, plugin_text};

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
    /// The plugin's output is invalid because of a value the event's data gave it (an
    /// over-long order id in a title, a control character in a user id): the event's
    /// problem, not the plugin's; it does not count toward the breaker.
    #[error("the event's data makes the output of plugin {plugin} invalid: {message}")]
    InvalidEventData { plugin: String, message: String },
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
            PluginError::InvalidEvent { .. } | PluginError::InvalidEventData { .. } => {
                "invalid_event"
            }
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
            | PluginError::InvalidEventData { plugin, .. }
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
    pub(super) fn is_malfunction(&self) -> bool {
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

/// The error a failed call comes to: out of fuel, out of time, more data handed to the host
/// than the output limit allows, or a trap (with the tail of the plugin's stderr, where a
/// panic message lands).
pub(super) fn classify_trap(
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
