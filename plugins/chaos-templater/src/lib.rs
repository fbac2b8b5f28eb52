//! TEST FIXTURE — never deploy for a real tenant.
//!
//! A templating plugin that misbehaves on request, to test that the sandbox contains a bad
//! templating plugin as it does a bad router. The behaviour is chosen by the string
//! `data.chaos` of the email:
//!
//! | `chaos`       | behaviour                                                        |
//! |---------------|------------------------------------------------------------------|
//! | (absent)      | subject `chaos ok <template>`, text from the tenant's `<template>/text` |
//! | `trap`        | panics: the component traps                                      |
//! | `loop`        | busy-loops forever (fuel or the epoch deadline stops it)         |
//! | `oom`         | allocates 1 MiB chunks until allocation fails (gigabytes asked)  |
//! | `recurse`     | recurses without end: the guest stack overflows                  |
//! | `bad_subject` | a subject with CR LF and a header after it                      |
//! | `huge`        | a 4 MiB html part (over the 1 MiB output limit)                  |
//! | `error`       | returns `Err(other("chaos: refused"))`                           |

#[path = "../../chaos-router/src/misbehave.rs"]
mod misbehave;

use notify_plugin_sdk::{Data, RenderError, RenderRequest, Rendered, Templater, templates, warn};

struct ChaosTemplater;

impl Templater for ChaosTemplater {
    fn render(request: RenderRequest) -> Result<Rendered, RenderError> {
        render_email(&request)
    }
}

notify_plugin_sdk::export_templater!(ChaosTemplater);

pub fn render_email(request: &RenderRequest) -> Result<Rendered, RenderError> {
    let data = Data::from_json(&request.data)?;
    let mode = data.opt_str("chaos")?;
    if let Some(mode) = mode {
        warn!("chaos: {mode}");
    }
    let ok = |subject: String| -> Result<Rendered, RenderError> {
        let text = templates::render(&format!("{}/text", request.template), &data.to_value())?;
        Ok(Rendered::new(subject).text(text))
    };
    match mode {
        None => ok(format!("chaos ok {}", request.template)),
        Some("trap") => panic!("chaos: trap requested for {}", request.event.id),
        Some("loop") => misbehave::spin_forever(),
        Some("oom") => Err(RenderError::other(format!(
            "chaos: allocation failed after {} MiB",
            misbehave::exhaust_memory()
        ))),
        Some("recurse") => ok(format!("chaos recursed {}", misbehave::recurse(0))),
        Some("bad_subject") => Ok(Rendered::new("hello\r\nBcc: victim@example.com").text("x")),
        Some("huge") => Ok(Rendered::new("huge").html("x".repeat(4 << 20))),
        Some("error") => Err(RenderError::other("chaos: refused")),
        Some(other) => Err(RenderError::invalid_data(format!(
            "data.chaos must be one of trap, loop, oom, recurse, bad_subject, huge, error (got {other:?})"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify_plugin_sdk::{json, testing};

    #[test]
    fn ok_renders_the_tenants_text() {
        testing::set_templates(|name, _| Ok(format!("text of {name}")));
        let out = render_email(&testing::render_request("order_paid", json!({}))).unwrap();
        assert_eq!(out.subject, "chaos ok order_paid");
        assert_eq!(out.text.as_deref(), Some("text of order_paid/text"));
        testing::reset();
    }

    #[test]
    fn bad_subject_carries_a_header() {
        let out = render_email(&testing::render_request(
            "t",
            json!({"chaos": "bad_subject"}),
        ))
        .unwrap();
        assert!(out.subject.contains("\r\nBcc:"));
    }

    #[test]
    fn unknown_mode_is_invalid_data() {
        assert!(matches!(
            render_email(&testing::render_request("t", json!({"chaos": "nap"}))),
            Err(RenderError::InvalidData(m)) if m.contains("data.chaos")
        ));
    }
}
