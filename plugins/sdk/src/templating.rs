//! The templating world: the [`Templater`] trait and [`crate::export_templater!`], in
//! front of the generated bindings of `notify:plugin/templating@0.3.0`.

use crate::types::{EventRef, Recipient, RenderError, RenderRequest, Rendered};

#[doc(hidden)]
pub mod bindings {
    //! The raw `wit-bindgen` output; plugins use the SDK's own types instead.
    #![allow(missing_docs)]

    wit_bindgen::generate!({
        path: "../../wit/v0.3.0",
        world: "templating",
        pub_export_macro: true,
        export_macro_name: "__export_templating_world",
        default_bindings_module: "notify_plugin_sdk::templating::bindings",
    });
}

use bindings::notify::plugin::types as wit;

/// A templating plugin: renders one outbox email into subject, html and text, typically by
/// shaping the data (locale, time zone, …) and rendering the tenant's files with
/// [`crate::templates::render`]. Export it with
/// `notify_plugin_sdk::export_templater!(MyTemplater);`.
pub trait Templater {
    fn render(request: RenderRequest) -> Result<Rendered, RenderError>;
}

/// Exports a [`Templater`] as the component's `notify:plugin/templater` (once per plugin,
/// at the crate root).
#[macro_export]
macro_rules! export_templater {
    ($templater:ty) => {
        #[doc(hidden)]
        pub struct __NotifyTemplaterExport;

        impl $crate::templating::bindings::exports::notify::plugin::templater::Guest
            for __NotifyTemplaterExport
        {
            fn render(
                request: $crate::templating::bindings::notify::plugin::types::RenderRequest,
            ) -> ::core::result::Result<
                $crate::templating::bindings::notify::plugin::types::Rendered,
                $crate::templating::bindings::notify::plugin::types::RenderError,
            > {
                $crate::templating::__render::<$templater>(request)
            }
        }

        $crate::templating::bindings::__export_templating_world!(
            __NotifyTemplaterExport with_types_in $crate::templating::bindings
        );
    };
}

#[doc(hidden)]
pub fn __render<T: Templater>(
    request: wit::RenderRequest,
) -> Result<wit::Rendered, wit::RenderError> {
    let request = RenderRequest {
        template: request.template,
        event: EventRef {
            id: request.event.id,
            event_type: request.event.event_type,
            time: request.event.time,
        },
        recipient: Recipient {
            address: request.recipient.address,
            user_id: request.recipient.user_id,
            locale: request.recipient.locale,
            time_zone: request.recipient.time_zone,
        },
        data: request.data,
    };
    match T::render(request) {
        Ok(Rendered {
            subject,
            html,
            text,
        }) => Ok(wit::Rendered {
            subject,
            html,
            text,
        }),
        Err(RenderError::InvalidData(m)) => Err(wit::RenderError::InvalidData(m)),
        Err(RenderError::Other(m)) => Err(wit::RenderError::Other(m)),
    }
}

#[cfg(target_arch = "wasm32")]
pub(crate) fn render_import(name: &str, data: &str) -> Result<String, crate::TemplateError> {
    use bindings::notify::plugin::templates;
    templates::render(name, data).map_err(|e| match e {
        templates::TemplateError::Missing => crate::TemplateError::Missing,
        templates::TemplateError::Failed(m) => crate::TemplateError::Failed(m),
    })
}
