//! A templating plugin, as `cargo component new --lib` lays one out: `src/bindings.rs` is
//! generated from the engine's WIT by `cargo component build`; this file implements the
//! `templater` interface. It adds the recipient's address to the data and has the host
//! render the tenant's Handlebars files (`<template>/subject`, `html`, `text`).

#[allow(warnings)]
mod bindings;

use bindings::exports::notify::plugin::templater::Guest;
use bindings::notify::plugin::templates::{TemplateError, render};
use bindings::notify::plugin::types::{RenderError, RenderRequest, Rendered};

struct Component;

impl Guest for Component {
    fn render(request: RenderRequest) -> Result<Rendered, RenderError> {
        let mut data: serde_json::Value = serde_json::from_str(&request.data)
            .map_err(|e| RenderError::InvalidData(format!("data is not JSON: {e}")))?;
        data["recipient"] = request.recipient.address.clone().into();
        let data = data.to_string();
        let part = |name: &str| match render(&format!("{}/{name}", request.template), &data) {
            Ok(text) => Ok(Some(text)),
            Err(TemplateError::Missing) => Ok(None),
            Err(TemplateError::Failed(why)) => Err(RenderError::Other(why)),
        };
        let subject = part("subject")?
            .ok_or_else(|| RenderError::Other(format!("{}/subject is missing", request.template)))?;
        Ok(Rendered {
            subject,
            html: part("html")?,
            text: part("text")?,
        })
    }
}

bindings::export!(Component with_types_in bindings);
