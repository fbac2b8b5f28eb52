//! The routing world: the [`Router`] trait and [`crate::export_router!`], in front of the
//! generated bindings of `notify:plugin/routing@0.3.0`.

use crate::types::{self, Delivery, Event, RouteError, json_object};

#[doc(hidden)]
pub mod bindings {
    //! The raw `wit-bindgen` output; plugins use the SDK's own types instead.
    #![allow(missing_docs)]

    wit_bindgen::generate!({
        path: "../../wit/v0.3.0",
        world: "routing",
        pub_export_macro: true,
        export_macro_name: "__export_routing_world",
        default_bindings_module: "notify_plugin_sdk::routing::bindings",
    });
}

use bindings::notify::plugin::types as wit;

/// A routing plugin: given one event, the deliveries to make (none is a valid answer), or
/// a [`RouteError`], which dead-letters the event. Export it with
/// `notify_plugin_sdk::export_router!(MyRouter);`.
pub trait Router {
    fn route(event: Event) -> Result<Vec<Delivery>, RouteError>;
}

/// Exports a [`Router`] as the component's `notify:plugin/router` (once per plugin, at the
/// crate root).
#[macro_export]
macro_rules! export_router {
    ($router:ty) => {
        #[doc(hidden)]
        pub struct __NotifyRouterExport;

        impl $crate::routing::bindings::exports::notify::plugin::router::Guest
            for __NotifyRouterExport
        {
            fn route(
                event: $crate::routing::bindings::notify::plugin::types::Event,
            ) -> ::core::result::Result<
                ::std::vec::Vec<$crate::routing::bindings::notify::plugin::types::Delivery>,
                $crate::routing::bindings::notify::plugin::types::RouteError,
            > {
                $crate::routing::__route::<$router>(event)
            }
        }

        $crate::routing::bindings::__export_routing_world!(
            __NotifyRouterExport with_types_in $crate::routing::bindings
        );
    };
}

#[doc(hidden)]
pub fn __route<R: Router>(event: wit::Event) -> Result<Vec<wit::Delivery>, wit::RouteError> {
    let event = Event {
        id: event.id,
        tenant: event.tenant,
        event_type: event.event_type,
        time: event.time,
        source: event.source,
        data: event.data,
    };
    match R::route(event) {
        Ok(deliveries) => Ok(deliveries.into_iter().map(to_wit).collect()),
        Err(RouteError::InvalidEvent(m)) => Err(wit::RouteError::InvalidEvent(m)),
        Err(RouteError::Other(m)) => Err(wit::RouteError::Other(m)),
    }
}

fn to_wit(delivery: Delivery) -> wit::Delivery {
    match delivery {
        Delivery::InApp(types::InApp {
            user_id,
            title,
            body,
            category,
            data,
        }) => wit::Delivery::InApp(wit::InApp {
            user_id,
            title,
            body,
            category,
            data: json_object(&data),
        }),
        Delivery::Live(types::LiveUpdate {
            user_id,
            name,
            data,
        }) => wit::Delivery::Live(wit::LiveUpdate {
            user_id,
            name,
            data: json_object(&data),
        }),
        Delivery::Email(types::Email {
            to,
            template,
            user_id,
            data,
            locale,
            time_zone,
        }) => wit::Delivery::Email(wit::Email {
            to,
            user_id,
            template,
            data: json_object(&data),
            locale,
            time_zone,
        }),
    }
}
