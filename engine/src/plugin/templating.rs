//! The templating world's adapter, a type borrowing the host: a tenant's templating plugin
//! renders its emails. The
//! call runs in the same sandbox as routing, under its own limits
//! (`plugins.templating_*`), with one more host import: the tenant's Handlebars files,
//! rendered by the host under the same rules as an email rendered from files. What comes
//! back is checked before lettre sees it. A trap on a warm instance is retried once on a
//! fresh one before it counts.

use std::sync::Arc;
use std::time::Instant;

use super::instances::Warm;
use super::output::EventText;
use super::registry::Loaded;
use super::sandbox::{CallLimits, TemplateAccess, outer_bound, plugin_text};
use super::wit::types;
use super::{PluginError, PluginHost};
use crate::templates::{RenderedEmail, Templates};

/// Longest subject accepted (an email header line is at most 998 bytes).
const MAX_SUBJECT: usize = 998;

/// One outbox email, as a templating plugin is asked to render it.
#[derive(Debug, Clone)]
pub struct EmailToRender<'a> {
    pub tenant: &'a str,
    pub outbox_id: i64,
    pub event_id: &'a str,
    pub event_type: &'a str,
    /// RFC 3339.
    pub event_time: String,
    pub template: &'a str,
    pub recipient: &'a str,
    pub user_id: Option<&'a str>,
    pub locale: Option<&'a str>,
    pub time_zone: Option<&'a str>,
    pub data: &'a serde_json::Value,
}

/// Renders emails with the host's templating plugins.
pub(super) struct Templating<'a> {
    host: &'a PluginHost,
}

impl<'a> Templating<'a> {
    pub(super) fn new(host: &'a PluginHost) -> Self {
        Templating { host }
    }

    /// Renders `email` with its tenant's templating plugin; `None` when the tenant has
    /// none (its files render directly). `templates` is the set the plugin's
    /// `templates.render` calls see; `link_domains` the tenant's link policy. A call that
    /// traps on a warm instance is retried once on a fresh one before the trap counts, as
    /// for routing: what earlier calls left in the instance may be the cause.
    pub(super) async fn render(
        &self,
        email: &EmailToRender<'_>,
        templates: Arc<Templates>,
        link_domains: &[String],
    ) -> Option<Result<RenderedEmail, PluginError>> {
        let loaded = match self.choose(email.tenant)? {
            Ok(loaded) => loaded,
            Err(e) => return Some(Err(e)),
        };
        let started = Instant::now();
        let call = |reuse| self.render_once(&loaded, email, templates.clone(), link_domains, reuse);
        let result = match call(true).await {
            (Err(PluginError::Trap { plugin, message }), true) => {
                tracing::warn!(tenant = %email.tenant, outbox_id = email.outbox_id, plugin = %plugin, error = %message, "templating call trapped on a warm instance; retrying once on a fresh instance");
                call(false).await.0
            }
            (result, _) => result,
        };
        self.host.record_outcome(&loaded, email.tenant, &result);
        tracing::debug!(tenant = %email.tenant, plugin = %loaded.name, outbox_id = email.outbox_id, elapsed_us = started.elapsed().as_micros() as u64, ok = result.is_ok(), "templating call");
        Some(result)
    }

    /// One call, on a warm instance when `reuse` allows; also says whether it ran on one.
    async fn render_once(
        &self,
        loaded: &Arc<Loaded>,
        email: &EmailToRender<'_>,
        templates: Arc<Templates>,
        link_domains: &[String],
        reuse: bool,
    ) -> (Result<RenderedEmail, PluginError>, bool) {
        let max_output = self.host.limits.templating_max_output_bytes;
        let limits = self.limits();
        let mut warm = self.host.instance_for(email.tenant, loaded, reuse);
        let warmed = warm.is_warm();
        warm.arm(limits, &format!("outbox email {}", email.outbox_id));
        warm.store.data_mut().templates = Some(TemplateAccess {
            templates,
            link_domains: link_domains.into(),
            max_output,
        });
        let request = request(email);
        let call = async {
            let (store, instance) = warm.bindings().await?;
            instance.render(store, &request).await
        };
        let outcome = tokio::time::timeout(outer_bound(limits.timeout), call).await;
        let result = warm
            .answer(outcome, limits, self.host.limits.templating_timeout_ms)
            .and_then(|answer| self.judge(answer, email, warm, max_output));
        (result, warmed)
    }

    /// The tenant's templating plugin, unless it has none (`None`), it is unavailable, or
    /// its breaker has quarantined it for this tenant.
    fn choose(&self, tenant: &str) -> Option<Result<Arc<Loaded>, PluginError>> {
        let loaded = match self.host.registry.select_templating(tenant)? {
            Ok(loaded) => loaded,
            Err(e) => return Some(Err(e)),
        };
        if let Some(failures) = self
            .host
            .breaker
            .quarantined(&loaded.name, &loaded.digest, tenant)
        {
            return Some(Err(PluginError::Quarantined {
                plugin: loaded.name.clone(),
                failures,
            }));
        }
        Some(Ok(loaded))
    }

    fn limits(&self) -> CallLimits {
        let limits = &self.host.limits;
        CallLimits {
            fuel: limits.templating_fuel,
            timeout: limits.templating_timeout(),
            memory_bytes: limits.templating_memory_bytes,
            hostcall_bytes: limits.templating_max_output_bytes.saturating_mul(2),
        }
    }

    /// The plugin's answer judged: its refusal (its instance serves on), or the email,
    /// checked; only a clean call (an email, or the plugin's own refusal) gives the
    /// instance back. A subject made invalid by the email's data (a line break or 900
    /// bytes in a name the event gave) is the data's problem, like the plugin's own
    /// refusal of it ([`PluginError::InvalidData`]), not a malfunction.
    fn judge(
        &self,
        answer: Result<types::Rendered, types::RenderError>,
        email: &EmailToRender<'_>,
        warm: Warm,
        max_output: usize,
    ) -> Result<RenderedEmail, PluginError> {
        let tenant = email.tenant;
        let plugin = warm.loaded.name.clone();
        let result = match answer {
            Err(types::RenderError::InvalidData(message)) => Err(PluginError::InvalidData {
                plugin,
                message: plugin_text(&message),
            }),
            Err(types::RenderError::Other(message)) => Err(PluginError::Failed {
                plugin,
                message: plugin_text(&message),
            }),
            Ok(rendered) => {
                let fault = subject_fault(&rendered.subject);
                let from_data = fault.is_some()
                    && EventText::with_data(vec![email.recipient], [email.data])
                        .explains(&rendered.subject, |s| subject_fault(s).is_none());
                check(rendered, max_output).map_err(|message| {
                    if from_data && fault.as_ref() == Some(&message) {
                        PluginError::InvalidData {
                            plugin,
                            message: format!("{message} (a value from the email's data)"),
                        }
                    } else {
                        PluginError::InvalidOutput { plugin, message }
                    }
                })
            }
        };
        if !matches!(result, Err(PluginError::InvalidOutput { .. })) {
            self.host.instances.give_back(tenant, warm);
        }
        result
    }
}

/// The email as the plugin's `render` is asked it.
fn request(email: &EmailToRender<'_>) -> types::RenderRequest {
    types::RenderRequest {
        template: email.template.to_owned(),
        event: types::EventRef {
            id: email.event_id.to_owned(),
            event_type: email.event_type.to_owned(),
            time: email.event_time.clone(),
        },
        recipient: types::Recipient {
            address: email.recipient.to_owned(),
            user_id: email.user_id.map(str::to_owned),
            locale: email.locale.map(str::to_owned),
            time_zone: email.time_zone.map(str::to_owned),
        },
        data: email.data.to_string(),
    }
}

/// A templating plugin's answer, made fit for lettre: a subject of one line (no CR, LF or
/// NUL; not blank; at most [`MAX_SUBJECT`] bytes), bodies without NUL, at least one body,
/// and all of it within `max_output` bytes. (WIT strings are UTF-8 by construction.)
fn check(rendered: types::Rendered, max_output: usize) -> Result<RenderedEmail, String> {
    let types::Rendered {
        subject,
        html,
        text,
    } = rendered;
    let size =
        subject.len() + html.as_ref().map_or(0, String::len) + text.as_ref().map_or(0, String::len);
    if size > max_output {
        return Err(format!(
            "the email is {size} bytes, the limit is {max_output} (plugins.templating_max_output_bytes)"
        ));
    }
    if let Some(fault) = subject_fault(&subject) {
        return Err(fault);
    }
    for (part, body) in [("html", &html), ("text", &text)] {
        if body.as_ref().is_some_and(|b| b.contains('\0')) {
            return Err(format!("the {part} part contains a NUL character"));
        }
    }
    if html.as_deref().is_none_or(str::is_empty) && text.as_deref().is_none_or(str::is_empty) {
        return Err("neither an html nor a text part".into());
    }
    Ok(RenderedEmail {
        subject: subject.trim().to_owned(),
        html: html.filter(|h| !h.is_empty()),
        text: text.filter(|t| !t.is_empty()),
    })
}

/// What is wrong with a subject, if anything: one line without NUL, not blank, at most
/// [`MAX_SUBJECT`] bytes.
fn subject_fault(subject: &str) -> Option<String> {
    if let Some(c) = subject.chars().find(|c| matches!(c, '\r' | '\n' | '\0')) {
        return Some(format!(
            "the subject contains {c:?}; it must be one line without NUL"
        ));
    }
    if subject.trim().is_empty() {
        return Some("the subject is blank".into());
    }
    if subject.len() > MAX_SUBJECT {
        return Some(format!(
            "the subject is {} bytes, the limit is {MAX_SUBJECT}",
            subject.len()
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rendered(subject: &str, html: Option<&str>, text: Option<&str>) -> types::Rendered {
        types::Rendered {
            subject: subject.into(),
            html: html.map(Into::into),
            text: text.map(Into::into),
        }
    }

    #[test]
    fn accepts_a_well_formed_email() {
        let ok = check(rendered(" Zahlung erhalten ", Some("<p>x</p>"), None), 1024).unwrap();
        assert_eq!(ok.subject, "Zahlung erhalten");
        assert_eq!(ok.html.as_deref(), Some("<p>x</p>"));
        assert_eq!(ok.text, None);
    }

    #[test]
    fn refuses_what_lettre_must_not_see() {
        for (r, expect) in [
            (
                rendered("a\r\nBcc: x@evil.example", None, Some("t")),
                "one line",
            ),
            (rendered("a\nb", None, Some("t")), "one line"),
            (rendered("a\0", None, Some("t")), "one line"),
            (rendered("  ", None, Some("t")), "blank"),
            (
                rendered(&"s".repeat(999), None, Some("t")),
                "subject is 999 bytes",
            ),
            (
                rendered("s", Some("a\0b"), None),
                "html part contains a NUL",
            ),
            (rendered("s", None, Some("")), "neither"),
            (rendered("s", None, None), "neither"),
            (
                rendered("s", Some(&"h".repeat(2000)), None),
                "limit is 1024",
            ),
        ] {
            let e = check(r, 1024).unwrap_err();
            assert!(e.contains(expect), "{e} should say {expect}");
        }
    }
}
