//! The generated bindings, one module per WIT version (`wit/v<version>/`, the shape of
//! Zed's one module per extension API version), and the conversions that bring an older
//! version's values to the newest, which the rest of the host works in. A component built
//! against `notify:plugin@0.1.0` keeps loading and routing after 0.2.0 and 0.3.0 arrived.

/// `notify:plugin@0.1.0`: the routing world as first published.
pub(super) mod v0_1 {
    wasmtime::component::bindgen!({
        world: "routing",
        path: "../wit/v0.1.0",
        imports: { default: async | trappable },
        exports: { default: async },
    });
}

/// `notify:plugin@0.2.0`: routing (emails with locale and time zone) and templating.
pub(super) mod v0_2 {
    pub(in crate::plugin) mod routing {
        wasmtime::component::bindgen!({
            world: "routing",
            path: "../wit/v0.2.0",
            imports: { default: async | trappable },
            exports: { default: async },
        });
    }

    pub(in crate::plugin) mod templating {
        wasmtime::component::bindgen!({
            world: "templating",
            path: "../wit/v0.2.0",
            imports: { default: async | trappable },
            exports: { default: async },
            // One Rust type per WIT type: the shared interfaces come from the routing world.
            with: {
                "notify:plugin/types": super::routing::notify::plugin::types,
                "notify:plugin/host": super::routing::notify::plugin::host,
            },
        });
    }
}

/// `notify:plugin@0.3.0`: routing gains the `presence` import; every type is 0.2.0's, so
/// its values are 0.2.0's Rust types (a component's values are checked structurally).
pub(super) mod v0_3 {
    pub(in crate::plugin) mod routing {
        wasmtime::component::bindgen!({
            world: "routing",
            path: "../wit/v0.3.0",
            imports: { default: async | trappable },
            exports: { default: async },
            with: {
                "notify:plugin/types": crate::plugin::bindings::v0_2::routing::notify::plugin::types,
            },
        });
    }

    pub(in crate::plugin) mod templating {
        wasmtime::component::bindgen!({
            world: "templating",
            path: "../wit/v0.3.0",
            imports: { default: async | trappable },
            exports: { default: async },
            with: {
                "notify:plugin/types": crate::plugin::bindings::v0_2::routing::notify::plugin::types,
                "notify:plugin/host": super::routing::notify::plugin::host,
            },
        });
    }
}

/// The types of the newest version (unchanged since 0.2.0): what the host works in.
pub(super) use v0_2::routing::notify::plugin::types as wit;

/// WIT versions this host loads, newest first.
pub const WIT_VERSIONS: &[&str] = &[
    "notify:plugin@0.3.0",
    "notify:plugin@0.2.0",
    "notify:plugin@0.1.0",
];

mod from_v0_1 {
    use super::v0_1::notify::plugin::types as old;
    use super::wit;

    impl From<&wit::Event> for old::Event {
        fn from(e: &wit::Event) -> Self {
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

    impl From<old::Delivery> for wit::Delivery {
        fn from(d: old::Delivery) -> Self {
            match d {
                old::Delivery::InApp(n) => wit::Delivery::InApp(wit::InApp {
                    user_id: n.user_id,
                    title: n.title,
                    body: n.body,
                    category: n.category,
                    data: n.data,
                }),
                old::Delivery::Live(l) => wit::Delivery::Live(wit::LiveUpdate {
                    user_id: l.user_id,
                    name: l.name,
                    data: l.data,
                }),
                // 0.1.0 knew nothing of the recipient's locale and time zone.
                old::Delivery::Email(e) => wit::Delivery::Email(wit::Email {
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

    impl From<old::RouteError> for wit::RouteError {
        fn from(e: old::RouteError) -> Self {
            match e {
                old::RouteError::InvalidEvent(m) => wit::RouteError::InvalidEvent(m),
                old::RouteError::Other(m) => wit::RouteError::Other(m),
            }
        }
    }
}
