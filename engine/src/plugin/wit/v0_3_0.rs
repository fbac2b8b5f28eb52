//! `notify:plugin@0.3.0`: the routing world gains the `presence` import (is the user
//! watching the app right now, on any instance). Its bindings and host imports; every type
//! is 0.2.0's, so its values are 0.2.0's Rust types (a component's values are checked
//! structurally) and need no conversion.

use wasmtime::Store;
use wasmtime::component::{HasSelf, InstancePre, Linker};

use super::{World, types};
use crate::plugin::sandbox::CallState;

pub(super) const VERSION: &str = "notify:plugin@0.3.0";
/// The worlds of this version.
pub(super) const WORLDS: &[World] = &[World::Routing, World::Templating];

mod routing {
    wasmtime::component::bindgen!({
        world: "routing",
        path: "../wit/v0.3.0",
        imports: { default: async | trappable },
        exports: { default: async },
        with: {
            "notify:plugin/types": crate::plugin::wit::v0_2_0::routing::notify::plugin::types,
        },
    });
}

mod templating {
    wasmtime::component::bindgen!({
        world: "templating",
        path: "../wit/v0.3.0",
        imports: { default: async | trappable },
        exports: { default: async },
        with: {
            "notify:plugin/types": crate::plugin::wit::v0_2_0::routing::notify::plugin::types,
            "notify:plugin/host": super::routing::notify::plugin::host,
        },
    });
}

use routing::notify::plugin::{host, presence};
use templating::notify::plugin::templates;

/// This version's host imports.
pub(super) fn add_to_linker(linker: &mut Linker<CallState>) -> wasmtime::Result<()> {
    host::add_to_linker::<CallState, HasSelf<CallState>>(linker, |s| s)?;
    presence::add_to_linker::<CallState, HasSelf<CallState>>(linker, |s| s)?;
    templates::add_to_linker::<CallState, HasSelf<CallState>>(linker, |s| s)
}

/// A component linked against this version, by world.
pub(in crate::plugin) enum Pre {
    Routing(routing::RoutingPre<CallState>),
    Templating(templating::TemplatingPre<CallState>),
}

impl Pre {
    /// `None` when the component implements neither of this version's worlds.
    pub(super) fn new(pre: &InstancePre<CallState>) -> Option<Self> {
        if let Ok(p) = routing::RoutingPre::new(pre.clone()) {
            return Some(Pre::Routing(p));
        }
        templating::TemplatingPre::new(pre.clone())
            .ok()
            .map(Pre::Templating)
    }

    pub(super) fn world(&self) -> World {
        match self {
            Pre::Routing(_) => World::Routing,
            Pre::Templating(_) => World::Templating,
        }
    }

    pub(super) async fn instantiate(
        &self,
        store: &mut Store<CallState>,
    ) -> wasmtime::Result<Instance> {
        Ok(match self {
            Pre::Routing(pre) => Instance::Routing(pre.instantiate_async(store).await?),
            Pre::Templating(pre) => Instance::Templating(pre.instantiate_async(store).await?),
        })
    }
}

/// An instance's exports, by world.
pub(in crate::plugin) enum Instance {
    Routing(routing::Routing),
    Templating(templating::Templating),
}

impl Instance {
    pub(super) async fn route(
        &self,
        store: &mut Store<CallState>,
        event: &types::Event,
    ) -> wasmtime::Result<Result<Vec<types::Delivery>, types::RouteError>> {
        match self {
            Instance::Routing(b) => b.notify_plugin_router().call_route(store, event).await,
            Instance::Templating(_) => unreachable!("select() returns routing plugins only"),
        }
    }

    pub(super) async fn render(
        &self,
        store: &mut Store<CallState>,
        request: &types::RenderRequest,
    ) -> wasmtime::Result<Result<types::Rendered, types::RenderError>> {
        match self {
            Instance::Templating(b) => {
                b.notify_plugin_templater()
                    .call_render(store, request)
                    .await
            }
            Instance::Routing(_) => {
                unreachable!("select_templating() returns templating plugins only")
            }
        }
    }
}

host_imports!(host);

impl presence::Host for CallState {
    async fn is_online(&mut self, user_id: String) -> wasmtime::Result<bool> {
        Ok(self.presence.is_online(&self.tenant, &user_id))
    }
}

templates_import!(templates);
