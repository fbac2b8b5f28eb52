//! The sandbox every plugin call runs in: the state of one call's `Store` (deny-all WASI,
//! the host imports, captured logs), the memory cap, the epoch ticker, and the hygiene of
//! text that comes out of a plugin. World-agnostic: adapters build on it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use wasmtime::component::ResourceTable;
use wasmtime::{Engine, ResourceLimiter};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::bindings;
use super::bindings::notify::plugin::host::LogLevel;
use super::wit;

/// How often the epoch ticker advances; the wall-clock bound is rounded up to this.
pub(super) const EPOCH_TICK: Duration = Duration::from_millis(5);
/// Log lines a call may write; the rest are counted, not logged, so one call cannot flood
/// the engine's log.
pub(super) const MAX_CAPTURED_LOGS: usize = 100;
/// Longest log line a plugin may write; longer ones are cut.
const MAX_LOG_LINE: usize = 2048;
/// stderr kept per call (a Rust plugin's panic message lands there); writing more fails the
/// write, which makes `eprintln!` panic: plugins log through the host `log` import instead.
pub(super) const STDERR_CAPTURE: usize = 64 * 1024;
/// How much of the captured stderr a trap's reason quotes.
pub(super) const STDERR_IN_REASON: usize = 1024;
/// State of one call's `Store`.
pub(super) struct CallState {
    pub(super) wasi: WasiCtx,
    pub(super) table: ResourceTable,
    pub(super) limits: MemoryCap,
    pub(super) tenant_config: Arc<BTreeMap<String, String>>,
    pub(super) tenant: String,
    pub(super) plugin: String,
    pub(super) event_id: String,
    pub(super) logs: Vec<(String, String)>,
    pub(super) dropped_logs: usize,
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
pub(super) struct MemoryCap {
    pub(super) limit: usize,
    pub(super) total: usize,
    pub(super) peak: usize,
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
pub(super) struct EpochTicker {
    stop: Arc<AtomicBool>,
}

impl EpochTicker {
    pub(super) fn start(engine: Engine) -> Self {
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
/// Text that came from a plugin, made fit for logs and the database: control characters
/// escaped (a plugin cannot forge log lines with a newline, or rewrite a terminal with ANSI
/// escapes), so no NUL either (PostgreSQL text cannot hold it), and at most
/// [`MAX_LOG_LINE`] bytes.
pub(super) fn plugin_text(text: &str) -> String {
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
