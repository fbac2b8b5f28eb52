//! The sandbox every plugin call runs in, whatever the world: the linker (exactly the
//! interfaces plugins are granted), the state of one call's `Store` (deny-all WASI with
//! coarse clocks and bounded randomness, what the host imports do, captured logs), the
//! store's limits (memory, fuel, hostcall fuel, resource handles, the epoch deadline), the
//! epoch ticker, and the hygiene of text that comes out of a plugin. Adapters build on it;
//! each WIT version's import traits (`wit/v*.rs`) forward to the behaviour here.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use wasmtime::component::{Linker, ResourceTable};
use wasmtime::{Engine, ResourceLimiter, Store, UpdateDeadline};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{HostMonotonicClock, HostWallClock, WasiCtx, WasiCtxView, WasiView};

use super::Presence;
use super::wit;
use crate::templates::Templates;

/// How often the epoch ticker advances; the wall-clock bound is rounded up to this.
pub(super) const EPOCH_TICK: Duration = Duration::from_millis(5);
/// Log lines a call may write; the rest are counted, not logged, so one call cannot flood
/// the engine's log.
pub(super) const MAX_CAPTURED_LOGS: usize = 100;
/// Longest log line a plugin may write; longer ones are cut.
const MAX_LOG_LINE: usize = 2048;
/// stderr kept per instance (a Rust plugin's panic message lands there; an instance that
/// has used half of it is not reused); writing more fails the write, which makes `eprintln!`
/// panic: plugins log through the host `log` import instead.
pub(super) const STDERR_CAPTURE: usize = 64 * 1024;
/// How much of the captured stderr a trap's reason quotes.
pub(super) const STDERR_IN_REASON: usize = 1024;
/// Least "hostcall fuel" of a call: roughly the bytes a guest may hand the host in one
/// host call or one result (a log line, template data, the decision). wasmtime refuses to
/// copy more into the host, so a guest cannot make the host allocate without bound; the
/// adapters raise it to a few times their output limit, so that what exceeds the output
/// limit is refused with that limit's reason before it is all copied.
pub(super) const MIN_HOSTCALL_BYTES: usize = 256 * 1024;
/// How wasmtime words running out of hostcall fuel (an error, not a `Trap` code).
pub(super) const HOSTCALL_FUEL_EXHAUSTED: &str = "fuel allocated for hostcalls has been exhausted";
/// Random bytes one `get-random-bytes` call may ask for (a hash map seed needs 16).
const MAX_RANDOM_BYTES: u64 = 4096;
/// Live resource handles (streams, pollables) one call may hold.
const MAX_RESOURCES: usize = 1024;
/// Resolution of the clocks a plugin sees: enough to stamp or measure, too coarse to time
/// anything a side channel would need.
const WALL_CLOCK_RESOLUTION: Duration = Duration::from_secs(1);
const MONOTONIC_RESOLUTION: Duration = Duration::from_millis(1);

/// What one call may use.
#[derive(Debug, Clone, Copy)]
pub(super) struct CallLimits {
    pub(super) fuel: u64,
    pub(super) timeout: Duration,
    pub(super) memory_bytes: usize,
    /// Bytes the guest may hand the host in one host call or result.
    pub(super) hostcall_bytes: usize,
}

/// The tenant's Handlebars files, for the templating world's `templates.render` import.
pub(super) struct TemplateAccess {
    pub(super) templates: Arc<Templates>,
    pub(super) link_domains: Arc<[String]>,
    /// Longest text one `render` may return.
    pub(super) max_output: usize,
}

/// State of a plugin instance's `Store`; the per-call parts (subject, logs, templates) are
/// set by each call.
pub(super) struct CallState {
    pub(super) wasi: WasiCtx,
    pub(super) table: ResourceTable,
    pub(super) limits: MemoryCap,
    pub(super) tenant_config: Arc<BTreeMap<String, String>>,
    pub(super) tenant: String,
    pub(super) plugin: String,
    /// What the call is about, for log lines: an event id, or an outbox email.
    pub(super) subject: String,
    pub(super) logs: Vec<(String, String)>,
    pub(super) dropped_logs: usize,
    pub(super) templates: Option<TemplateAccess>,
    /// What `presence.is-online` asks (routing world, WIT 0.3.0).
    pub(super) presence: Arc<dyn Presence>,
}

/// The linker every plugin is linked with: WASI's I/O streams, stdio (stdout discarded,
/// stderr captured), exit, an empty environment, coarse clocks and random, and the host
/// imports of every supported WIT version (`wit::add_to_linker`). No filesystem, sockets or name lookup: a
/// component importing them fails to link, and the registry names the import.
pub(super) fn linker(engine: &Engine) -> wasmtime::Result<Linker<CallState>> {
    use wasmtime_wasi::cli::{WasiCli, WasiCliView};
    use wasmtime_wasi::clocks::{WasiClocks, WasiClocksView};
    use wasmtime_wasi::p2::bindings::{cli, clocks, random};
    use wasmtime_wasi::random::{WasiRandom, WasiRandomView};

    let mut linker = Linker::<CallState>::new(engine);
    let l = &mut linker;
    wasmtime_wasi_io::add_to_linker_async(l)?;
    clocks::wall_clock::add_to_linker::<CallState, WasiClocks>(l, CallState::clocks)?;
    clocks::monotonic_clock::add_to_linker::<CallState, WasiClocks>(l, CallState::clocks)?;
    random::random::add_to_linker::<CallState, WasiRandom>(l, CallState::random)?;
    random::insecure::add_to_linker::<CallState, WasiRandom>(l, CallState::random)?;
    random::insecure_seed::add_to_linker::<CallState, WasiRandom>(l, CallState::random)?;
    cli::exit::add_to_linker::<CallState, WasiCli>(l, CallState::cli)?;
    cli::environment::add_to_linker::<CallState, WasiCli>(l, CallState::cli)?;
    cli::stdin::add_to_linker::<CallState, WasiCli>(l, CallState::cli)?;
    cli::stdout::add_to_linker::<CallState, WasiCli>(l, CallState::cli)?;
    cli::stderr::add_to_linker::<CallState, WasiCli>(l, CallState::cli)?;
    cli::terminal_input::add_to_linker::<CallState, WasiCli>(l, CallState::cli)?;
    cli::terminal_output::add_to_linker::<CallState, WasiCli>(l, CallState::cli)?;
    cli::terminal_stdin::add_to_linker::<CallState, WasiCli>(l, CallState::cli)?;
    cli::terminal_stdout::add_to_linker::<CallState, WasiCli>(l, CallState::cli)?;
    cli::terminal_stderr::add_to_linker::<CallState, WasiCli>(l, CallState::cli)?;
    wit::add_to_linker(l)?;
    Ok(linker)
}

/// Deny-all WASI for one instance: no preopens, environment, arguments or sockets; stdout
/// discarded; stderr captured; coarse clocks; bounded random.
pub(super) fn wasi(stderr: MemoryOutputPipe) -> WasiCtx {
    WasiCtx::builder()
        .stderr(stderr)
        .wall_clock(CoarseWallClock)
        .monotonic_clock(CoarseMonotonicClock::default())
        .max_random_size(MAX_RANDOM_BYTES)
        .build()
}

/// A store for a plugin instance, with the limits that hold for its whole life: the memory
/// limiter (on the instance's total linear memory) and the resource handle cap. Each call
/// then sets its own budgets with [`arm`].
pub(super) fn store(engine: &Engine, mut state: CallState) -> Store<CallState> {
    state.table.set_max_capacity(MAX_RESOURCES);
    let mut store = Store::new(engine, state);
    store.limiter(|s| &mut s.limits);
    store
}

/// The outer bound of a call: the epoch deadline stops guest code; this also covers time
/// spent in host functions (a guest waiting on a WASI pollable burns neither fuel nor epoch
/// ticks), with a grace period of a few ticks.
pub(super) fn outer_bound(timeout: Duration) -> Duration {
    timeout + EPOCH_TICK * 4
}

/// Gives a store one call's budgets afresh: memory (the limiter's cap), instructions (fuel),
/// bytes handed to the host per host call, and the epoch deadline, at which the guest
/// yields its worker every tick (so a plugin spinning for its whole budget shares its thread
/// with everything else) and traps once `limits.timeout` has passed.
pub(super) fn arm(store: &mut Store<CallState>, limits: CallLimits) {
    let cap = &mut store.data_mut().limits;
    cap.limit = limits.memory_bytes;
    cap.peak = cap.total;
    store
        .set_fuel(limits.fuel)
        .expect("fuel is enabled on this engine");
    store.set_hostcall_fuel(limits.hostcall_bytes.max(MIN_HOSTCALL_BYTES));
    let ticks = limits
        .timeout
        .as_millis()
        .div_ceil(EPOCH_TICK.as_millis())
        .max(1) as u64;
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
}

impl CallState {
    pub(super) fn new(
        tenant: &str,
        plugin: &str,
        subject: &str,
        tenant_config: Arc<BTreeMap<String, String>>,
        presence: Arc<dyn Presence>,
        stderr: MemoryOutputPipe,
    ) -> Self {
        CallState {
            wasi: wasi(stderr),
            table: ResourceTable::new(),
            limits: MemoryCap {
                limit: 0,
                total: 0,
                peak: 0,
            },
            tenant_config,
            tenant: tenant.to_owned(),
            plugin: plugin.to_owned(),
            subject: subject.to_owned(),
            logs: Vec::new(),
            dropped_logs: 0,
            templates: None,
            presence,
        }
    }

    /// The captured log lines, with a note when some were dropped.
    pub(super) fn take_logs(&mut self) -> Vec<(String, String)> {
        let mut logs = std::mem::take(&mut self.logs);
        if self.dropped_logs > 0 {
            logs.push((
                "warn".into(),
                format!(
                    "{} more log lines dropped (limit {MAX_CAPTURED_LOGS} per call)",
                    self.dropped_logs
                ),
            ));
        }
        logs
    }

    /// Logs one line of the plugin's (the `host.log` import of every version).
    pub(super) fn log(&mut self, level: &'static str, message: String) {
        if self.logs.len() >= MAX_CAPTURED_LOGS {
            self.dropped_logs += 1;
            return;
        }
        let message = plugin_text(&message);
        let (tenant, plugin, about) = (&self.tenant, &self.plugin, &self.subject);
        match level {
            "trace" => tracing::trace!(tenant, plugin, about, "plugin: {message}"),
            "debug" => tracing::debug!(tenant, plugin, about, "plugin: {message}"),
            "info" => tracing::info!(tenant, plugin, about, "plugin: {message}"),
            "warn" => tracing::warn!(tenant, plugin, about, "plugin: {message}"),
            _ => tracing::error!(tenant, plugin, about, "plugin: {message}"),
        }
        self.logs.push((level.to_owned(), message));
    }
}

impl WasiView for CallState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl wasmtime_wasi_io::IoView for CallState {
    fn table(&mut self) -> &mut ResourceTable {
        &mut self.table
    }
}

/// Why `templates.render` failed, in every version's terms.
pub(super) enum TemplateFailure {
    Missing,
    Failed(String),
}

impl CallState {
    /// What `templates.render` does (the templating world's import, every version): one
    /// part of one of the tenant's templates, under the call's link policy and output limit.
    pub(super) fn render_template(
        &self,
        name: &str,
        data: &str,
    ) -> Result<String, TemplateFailure> {
        use TemplateFailure::Failed;
        let Some(access) = &self.templates else {
            return Err(Failed("templates are not available to this call".into()));
        };
        let Some((template, part)) = name.rsplit_once('/') else {
            return Err(Failed(format!(
                "template name {:?} must be <template>/<part> (part: subject, html or text)",
                plugin_text(name)
            )));
        };
        let data: serde_json::Value = match serde_json::from_str(data) {
            Ok(v @ serde_json::Value::Object(_)) => v,
            Ok(_) => return Err(Failed("data must be a JSON object".into())),
            Err(e) => return Err(Failed(format!("data is not valid JSON: {e}"))),
        };
        use crate::templates::RenderError;
        match access.templates.render_part(
            &self.tenant,
            template,
            part,
            &data,
            &access.link_domains,
        ) {
            Ok(text) if text.len() > access.max_output => Err(Failed(format!(
                "{name} rendered {} bytes, the limit is {}",
                text.len(),
                access.max_output
            ))),
            Ok(text) => Ok(text),
            Err(RenderError::Missing { .. }) => Err(TemplateFailure::Missing),
            Err(e) => Err(Failed(e.to_string())),
        }
    }
}

/// Wall-clock time rounded down to [`WALL_CLOCK_RESOLUTION`].
struct CoarseWallClock;

impl HostWallClock for CoarseWallClock {
    fn resolution(&self) -> Duration {
        WALL_CLOCK_RESOLUTION
    }

    fn now(&self) -> Duration {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        Duration::from_secs(now.as_secs())
    }
}

/// Nanoseconds since the instance's store was made, rounded down to
/// [`MONOTONIC_RESOLUTION`].
struct CoarseMonotonicClock(std::time::Instant);

impl Default for CoarseMonotonicClock {
    fn default() -> Self {
        Self(std::time::Instant::now())
    }
}

impl HostMonotonicClock for CoarseMonotonicClock {
    fn resolution(&self) -> u64 {
        MONOTONIC_RESOLUTION.as_nanos() as u64
    }

    fn now(&self) -> u64 {
        let step = MONOTONIC_RESOLUTION.as_nanos();
        (self.0.elapsed().as_nanos() / step * step) as u64
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
