//! The WIT versions this host loads, and the one place that dispatches on them (the shape
//! of Zed's `extension_host::wasm_host::wit`): each version is one file (`wit/v0_1_0.rs`,
//! ...) holding its `bindgen!` output, its host imports and the conversions of its values
//! to the newest types; here, an enum over versions with one arm per version in each
//! method. Adding a WIT version is one new file, one variant and one arm per method. The
//! host imports behave the same in every version, so their bodies are written once here
//! (`host_imports!`, `templates_import!`) and each version file names its generated trait.
//!
//! The rest of the host works in the newest types ([`types`]) and never names a version.

/// The `host` import (logging, tenant config) for one version's generated trait: every
/// version has its own trait and one behaviour.
macro_rules! host_imports {
    ($($interface:ident)::+) => {
        impl $($interface)::+::Host for crate::plugin::sandbox::CallState {
            async fn log(
                &mut self,
                level: $($interface)::+::LogLevel,
                message: String,
            ) -> wasmtime::Result<()> {
                use $($interface)::+::LogLevel;
                let level = match level {
                    LogLevel::Trace => "trace",
                    LogLevel::Debug => "debug",
                    LogLevel::Info => "info",
                    LogLevel::Warn => "warn",
                    LogLevel::Error => "error",
                };
                crate::plugin::sandbox::CallState::log(self, level, message);
                Ok(())
            }

            async fn config(&mut self, key: String) -> wasmtime::Result<Option<String>> {
                Ok(self.tenant_config.get(&key).cloned())
            }
        }
    };
}

/// The templating world's `templates` import for one version's generated trait.
macro_rules! templates_import {
    ($($interface:ident)::+) => {
        impl $($interface)::+::Host for crate::plugin::sandbox::CallState {
            async fn render(
                &mut self,
                name: String,
                data: String,
            ) -> wasmtime::Result<Result<String, $($interface)::+::TemplateError>> {
                use $($interface)::+::TemplateError;
                use crate::plugin::sandbox::TemplateFailure;
                Ok(self.render_template(&name, &data).map_err(|e| match e {
                    TemplateFailure::Missing => TemplateError::Missing,
                    TemplateFailure::Failed(m) => TemplateError::Failed(m),
                }))
            }
        }
    };
}

mod v0_1_0;
mod v0_2_0;
mod v0_3_0;

use wasmtime::Store;
use wasmtime::component::{InstancePre, Linker};

use super::sandbox::CallState;

/// The types of the newest version (unchanged since 0.2.0): what the host works in.
pub(super) use v0_2_0::routing::notify::plugin::types;

/// WIT versions this host loads, newest first.
pub const WIT_VERSIONS: &[&str] = &[v0_3_0::VERSION, v0_2_0::VERSION, v0_1_0::VERSION];

/// Every version's worlds, in the order of [`WIT_VERSIONS`].
const WORLDS: &[&[World]] = &[v0_3_0::WORLDS, v0_2_0::WORLDS, v0_1_0::WORLDS];

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

    /// The versions (`0.3.0`, ...) that have this world, newest first.
    pub(super) fn versions(self) -> Vec<&'static str> {
        WIT_VERSIONS
            .iter()
            .zip(WORLDS)
            .filter(|(_, worlds)| worlds.contains(&self))
            .map(|(v, _)| v.trim_start_matches("notify:plugin@"))
            .collect()
    }
}

/// The host imports of every version.
pub(super) fn add_to_linker(linker: &mut Linker<CallState>) -> wasmtime::Result<()> {
    v0_1_0::add_to_linker(linker)?;
    v0_2_0::add_to_linker(linker)?;
    v0_3_0::add_to_linker(linker)
}

/// A linked component, by the WIT version (and, inside it, the world) it implements.
pub(super) enum Pre {
    V0_3_0(v0_3_0::Pre),
    V0_2_0(v0_2_0::Pre),
    V0_1_0(v0_1_0::Pre),
}

impl Pre {
    /// The newest version whose world the component implements; `None` if none. A
    /// component exports exactly one world's interface.
    pub(super) fn new(pre: &InstancePre<CallState>) -> Option<Self> {
        v0_3_0::Pre::new(pre)
            .map(Pre::V0_3_0)
            .or_else(|| v0_2_0::Pre::new(pre).map(Pre::V0_2_0))
            .or_else(|| v0_1_0::Pre::new(pre).map(Pre::V0_1_0))
    }

    pub(super) fn world(&self) -> World {
        match self {
            Pre::V0_3_0(p) => p.world(),
            Pre::V0_2_0(p) => p.world(),
            Pre::V0_1_0(p) => p.world(),
        }
    }

    pub(super) fn wit_version(&self) -> &'static str {
        match self {
            Pre::V0_3_0(_) => v0_3_0::VERSION,
            Pre::V0_2_0(_) => v0_2_0::VERSION,
            Pre::V0_1_0(_) => v0_1_0::VERSION,
        }
    }

    /// Instantiates the component in `store` (inside the limits the store is armed with).
    pub(super) async fn instantiate(
        &self,
        store: &mut Store<CallState>,
    ) -> wasmtime::Result<Instance> {
        Ok(match self {
            Pre::V0_3_0(p) => Instance::V0_3_0(p.instantiate(store).await?),
            Pre::V0_2_0(p) => Instance::V0_2_0(p.instantiate(store).await?),
            Pre::V0_1_0(p) => Instance::V0_1_0(p.instantiate(store).await?),
        })
    }
}

/// An instance's exports, by WIT version.
pub(super) enum Instance {
    V0_3_0(v0_3_0::Instance),
    V0_2_0(v0_2_0::Instance),
    V0_1_0(v0_1_0::Instance),
}

impl Instance {
    /// Calls a routing plugin's `route`.
    pub(super) async fn route(
        &self,
        store: &mut Store<CallState>,
        event: &types::Event,
    ) -> wasmtime::Result<Result<Vec<types::Delivery>, types::RouteError>> {
        match self {
            Instance::V0_3_0(i) => i.route(store, event).await,
            Instance::V0_2_0(i) => i.route(store, event).await,
            Instance::V0_1_0(i) => i.route(store, event).await,
        }
    }

    /// Calls a templating plugin's `render`.
    pub(super) async fn render(
        &self,
        store: &mut Store<CallState>,
        request: &types::RenderRequest,
    ) -> wasmtime::Result<Result<types::Rendered, types::RenderError>> {
        match self {
            Instance::V0_3_0(i) => i.render(store, request).await,
            Instance::V0_2_0(i) => i.render(store, request).await,
            Instance::V0_1_0(_) => {
                unreachable!("select_templating() returns templating plugins only")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_listed_newest_first_with_their_worlds() {
        assert_eq!(
            WIT_VERSIONS,
            [
                "notify:plugin@0.3.0",
                "notify:plugin@0.2.0",
                "notify:plugin@0.1.0"
            ]
        );
        assert_eq!(World::Routing.versions(), ["0.3.0", "0.2.0", "0.1.0"]);
        assert_eq!(World::Templating.versions(), ["0.3.0", "0.2.0"]);
    }
}
