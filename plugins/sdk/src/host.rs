//! The host imports: logging, the tenant's configuration, (routing world) who is online,
//! and (templating world) the tenant's Handlebars files. Outside WebAssembly (native unit tests) they are stand-ins
//! that [`crate::testing`] controls: logs go to stderr, configuration and templates are
//! what the test set.

/// Log levels of the engine's structured log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogLevel {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

/// Logging through the engine's structured log (tagged with tenant, plugin and event
/// there). The macros [`crate::info!`] and friends format and call [`log::log`].
pub mod log {
    use super::LogLevel;

    /// Logs `message` at `level`.
    pub fn log(level: LogLevel, message: &str) {
        #[cfg(target_arch = "wasm32")]
        crate::host::imports::log(level, message);
        #[cfg(not(target_arch = "wasm32"))]
        eprintln!("[{level:?}] {message}");
    }

    /// Logs at trace level.
    pub fn trace(message: &str) {
        log(LogLevel::Trace, message)
    }

    /// Logs at debug level.
    pub fn debug(message: &str) {
        log(LogLevel::Debug, message)
    }

    /// Logs at info level.
    pub fn info(message: &str) {
        log(LogLevel::Info, message)
    }

    /// Logs at warn level.
    pub fn warn(message: &str) {
        log(LogLevel::Warn, message)
    }

    /// Logs at error level.
    pub fn error(message: &str) {
        log(LogLevel::Error, message)
    }
}

/// The tenant's plugin configuration value for `key` (`[tenants.<id>.config]` in the
/// engine's configuration), if set. In native tests: what [`crate::testing::set_config`]
/// set.
pub fn config(key: &str) -> Option<String> {
    #[cfg(target_arch = "wasm32")]
    return imports::config(key);
    #[cfg(not(target_arch = "wasm32"))]
    return crate::testing::config(key);
}

/// Reads and parses the configuration value `key`, or returns `default` when it is unset.
///
/// A value that does not parse is an error naming the key: a misconfigured tenant should
/// fail loudly rather than run with a silently substituted default.
pub fn config_or<T: std::str::FromStr>(key: &str, default: T) -> Result<T, ConfigError> {
    parse_config(key, config(key).as_deref(), default)
}

/// The parsing half of [`config_or`]: `value` is what [`config`] returned.
pub fn parse_config<T: std::str::FromStr>(
    key: &str,
    value: Option<&str>,
    default: T,
) -> Result<T, ConfigError> {
    match value.map(str::trim) {
        None | Some("") => Ok(default),
        Some(raw) => raw
            .parse()
            .map_err(|_| ConfigError(format!("plugin config {key} has an invalid value: {raw:?}"))),
    }
}

/// A configuration value that does not parse. With `?` it becomes
/// [`crate::RouteError::Other`] or [`crate::RenderError::Other`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<ConfigError> for crate::RouteError {
    fn from(e: ConfigError) -> Self {
        crate::RouteError::Other(e.0)
    }
}

impl From<ConfigError> for crate::RenderError {
    fn from(e: ConfigError) -> Self {
        crate::RenderError::Other(e.0)
    }
}

/// Who is watching: cluster-wide presence (routing world only).
#[cfg(feature = "routing")]
pub mod presence {
    /// Does `user_id` (of the event's tenant) have a stream open (the app open) on any
    /// instance of the engine? As the host last heard: a stream opened or closed elsewhere is
    /// seen within about 100 ms, and an instance that died unannounced counts until its
    /// heartbeat expires (`presence.ttl_secs`). Outside a running engine (`plugin run`),
    /// nobody is online. In native tests: what [`crate::testing::set_online`] set.
    pub fn is_online(user_id: &str) -> bool {
        #[cfg(target_arch = "wasm32")]
        return crate::routing::bindings::notify::plugin::presence::is_online(user_id);
        #[cfg(not(target_arch = "wasm32"))]
        return crate::testing::is_online(user_id);
    }
}

/// The tenant's Handlebars files, rendered by the host (templating world only).
#[cfg(feature = "templating")]
pub mod templates {
    use crate::TemplateError;
    use serde_json::Value;

    /// Renders `<template>/<part>` (part `subject`, `html` or `text`, e.g.
    /// `order_paid/html`) with `data` (a JSON object), under the host's rules: strict
    /// fields, HTML escaping in `html`, `{{link}}` checked. In native tests: what
    /// [`crate::testing::set_templates`] installed.
    pub fn render(name: &str, data: &Value) -> Result<String, TemplateError> {
        #[cfg(target_arch = "wasm32")]
        return crate::templating::render_import(name, &data.to_string());
        #[cfg(not(target_arch = "wasm32"))]
        return crate::testing::render(name, data);
    }

    /// [`render`], or `Ok(None)` when the part does not exist: for optional parts and
    /// fallbacks (`order_paid.de/subject`, else `order_paid/subject`).
    pub fn render_optional(name: &str, data: &Value) -> Result<Option<String>, TemplateError> {
        match render(name, data) {
            Ok(text) => Ok(Some(text)),
            Err(TemplateError::Missing) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// The imports through whichever world's bindings this build has (the interface is the
/// same in both).
#[cfg(target_arch = "wasm32")]
mod imports {
    use super::LogLevel;

    #[cfg(feature = "routing")]
    use crate::routing::bindings::notify::plugin::host;
    #[cfg(all(feature = "templating", not(feature = "routing")))]
    use crate::templating::bindings::notify::plugin::host;

    pub(super) fn log(level: LogLevel, message: &str) {
        let level = match level {
            LogLevel::Trace => host::LogLevel::Trace,
            LogLevel::Debug => host::LogLevel::Debug,
            LogLevel::Info => host::LogLevel::Info,
            LogLevel::Warn => host::LogLevel::Warn,
            LogLevel::Error => host::LogLevel::Error,
        };
        host::log(level, message);
    }

    pub(super) fn config(key: &str) -> Option<String> {
        host::config(key)
    }
}
