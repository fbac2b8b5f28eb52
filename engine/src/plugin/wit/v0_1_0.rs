//! `notify:plugin@0.1.0`: the routing world as first published. Its bindings, its host
//! imports, and the conversions between its values and the newest types, which the rest of
//! the host works in. A component built against 0.1.0 keeps loading and routing after
//! 0.2.0 and 0.3.0 arrived.

use wasmtime::Store;
use wasmtime::component::{HasSelf, InstancePre, Linker};

use super::{World, types};
use crate::plugin::sandbox::CallState;

pub(super) const VERSION: &str = "notify:plugin@0.1.0";
/// The worlds of this version.
pub(super) const WORLDS: &[World] = &[World::Routing];

mod bindings {
    wasmtime::component::bindgen!({
        world: "routing",
        path: "../wit/v0.1.0",
        imports: { default: async | trappable },
        exports: { default: async },
    });
}

use bindings::notify::plugin::{host, types as old};

/// This version's host imports.
pub(super) fn add_to_linker(linker: &mut Linker<CallState>) -> wasmtime::Result<()> {
    host::add_to_linker::<CallState, HasSelf<CallState>>(linker, |s| s)
}

/// A component linked against this version (routing is its only world).
pub(in crate::plugin) struct Pre(bindings::RoutingPre<CallState>);

impl Pre {
    /// `None` when the component does not implement this version's routing world.
    pub(super) fn new(pre: &InstancePre<CallState>) -> Option<Self> {
        bindings::RoutingPre::new(pre.clone()).ok().map(Pre)
    }

    pub(super) fn world(&self) -> World {
        World::Routing
    }

    pub(super) async fn instantiate(
        &self,
        store: &mut Store<CallState>,
    ) -> wasmtime::Result<Instance> {
        Ok(Instance(self.0.instantiate_async(store).await?))
    }
}

/// An instance's exports.
pub(in crate::plugin) struct Instance(bindings::Routing);

impl Instance {
    /// Routes the newest version's event, answering in the newest version's types.
    pub(super) async fn route(
        &self,
        store: &mut Store<CallState>,
        event: &types::Event,
    ) -> wasmtime::Result<Result<Vec<types::Delivery>, types::RouteError>> {
        let answer = self
            .0
            .notify_plugin_router()
            .call_route(store, &event.into())
            .await?;
        Ok(answer
            .map(|deliveries| deliveries.into_iter().map(Into::into).collect())
            .map_err(Into::into))
    }
}

host_imports!(host);

impl old::Host for CallState {}

impl From<&types::Event> for old::Event {
    fn from(e: &types::Event) -> Self {
        old::Event {
            id: e.id.clone(),
            tenant: e.tenant.clone(),
            event_type: e.event_type.clone(),
            time: e.time.clone(),
            source: e.source.clone(),
            data: e.data.clone(),
        }
    }
}

impl From<old::Delivery> for types::Delivery {
    fn from(d: old::Delivery) -> Self {
        match d {
            old::Delivery::InApp(n) => types::Delivery::InApp(types::InApp {
                user_id: n.user_id,
                title: n.title,
                body: n.body,
                category: n.category,
                data: n.data,
            }),
            old::Delivery::Live(l) => types::Delivery::Live(types::LiveUpdate {
                user_id: l.user_id,
                name: l.name,
                data: l.data,
            }),
            // 0.1.0 knew nothing of the recipient's locale and time zone.
            old::Delivery::Email(e) => types::Delivery::Email(types::Email {
                to: e.to,
                user_id: e.user_id,
                template: e.template,
                data: e.data,
                locale: None,
                time_zone: None,
            }),
        }
    }
}

impl From<old::RouteError> for types::RouteError {
    fn from(e: old::RouteError) -> Self {
        match e {
            old::RouteError::InvalidEvent(m) => types::RouteError::InvalidEvent(m),
            old::RouteError::Other(m) => types::RouteError::Other(m),
        }
    }
}
