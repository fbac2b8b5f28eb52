//! One tenant's effective set: the default folder merged with the tenant's overrides,
//! registered on Handlebars, with every template that cannot be used marked broken and why.
//!
//! Building a set never fails as a whole: a template with a syntax error, a refused
//! construct (see `checks`) or a missing part is remembered as broken with its reason, and
//! a broken partial marks every template of the set broken (any of them may include it),
//! so one bad file costs its own templates and nothing else.

use std::collections::HashMap;

use handlebars::Handlebars;
use serde_json::Value;

use super::RenderError;
use super::checks::{
    dynamic_partial_refusal, inline_partials, partial_cycle, unchecked_link_refusal,
};
use super::files::TenantFiles;
use super::helpers;

/// Sources by name: (file, source).
type Sources = HashMap<String, (String, String)>;
/// Template parts by (template, part): (file, source).
type Parts = HashMap<(String, &'static str), (String, String)>;

/// One tenant's effective set (default merged with its overrides).
#[derive(Clone)]
pub(super) struct TenantSet {
    /// HTML-escaping registry for `html` parts.
    html: Handlebars<'static>,
    /// Non-escaping registry for `subject` and `text` parts.
    plain: Handlebars<'static>,
    /// template → which parts exist, and from which file (for error messages).
    pub(super) templates: HashMap<String, HashMap<&'static str, String>>,
    /// template → why it could not be loaded.
    pub(super) broken: HashMap<String, String>,
}

impl TenantSet {
    /// The set of a tenant whose own files are `own`, over the `defaults`.
    pub(super) fn build(defaults: &TenantFiles, own: &TenantFiles) -> TenantSet {
        let mut set = TenantSet {
            html: registry(),
            plain: registry(),
            templates: HashMap::new(),
            broken: own
                .unreadable
                .iter()
                .chain(defaults.unreadable.iter())
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        };
        set.plain.register_escape_fn(handlebars::no_escape);
        // Partials: the tenant's override the defaults of the same name.
        let mut partials = defaults.partials.clone();
        partials.extend(own.partials.clone());
        let mut parts = defaults.parts.clone();
        parts.extend(own.parts.clone());

        let mut partial_errors: Vec<String> = cycle_error(&partials, &parts).into_iter().collect();
        set.register_partials(&partials, &mut partial_errors);
        set.register_templates(&parts);
        set.mark_incomplete();
        if !partial_errors.is_empty() {
            // A broken partial may be used by any template: mark them all.
            let reason = format!("broken partial: {}", partial_errors.join("; "));
            for template in set.templates.keys() {
                set.broken.entry(template.clone()).or_insert(reason.clone());
            }
        }
        set
    }

    /// Registers the partials on both registries; what is wrong with one goes to `errors`.
    fn register_partials(&mut self, partials: &Sources, errors: &mut Vec<String>) {
        for (name, (file, source)) in partials {
            errors.extend(dynamic_partial_refusal(file, source));
            errors.extend(unchecked_link_refusal(file, source));
            for registry in [&mut self.html, &mut self.plain] {
                if let Err(e) = registry.register_partial(name, source) {
                    errors.push(format!("{file}: {}", describe_template_error(&e)));
                    break;
                }
            }
        }
    }

    /// Registers every template part (`html` escaping, the others not), or marks its
    /// template broken with the reason.
    fn register_templates(&mut self, parts: &Parts) {
        for ((template, part), (file, source)) in parts {
            let refusal = dynamic_partial_refusal(file, source).or_else(|| {
                (*part == "html")
                    .then(|| unchecked_link_refusal(file, source))
                    .flatten()
            });
            if let Some(reason) = refusal {
                self.broken.insert(template.clone(), reason);
                continue;
            }
            let registry = if *part == "html" {
                &mut self.html
            } else {
                &mut self.plain
            };
            match registry.register_template_string(&format!("{template}/{part}"), source) {
                Ok(()) => {
                    self.templates
                        .entry(template.clone())
                        .or_default()
                        .insert(part, file.clone());
                }
                Err(e) => {
                    self.broken.insert(
                        template.clone(),
                        format!("{file}: {}", describe_template_error(&e)),
                    );
                }
            }
        }
    }

    /// Marks broken the templates without a subject, or without a body (html or text).
    fn mark_incomplete(&mut self) {
        for (template, found) in &self.templates {
            if !found.contains_key("subject") {
                self.broken
                    .entry(template.clone())
                    .or_insert_with(|| "subject.hbs is missing".into());
            } else if !found.contains_key("html") && !found.contains_key("text") {
                self.broken
                    .entry(template.clone())
                    .or_insert_with(|| "needs html.hbs or text.hbs".into());
            }
        }
    }

    /// Renders one registered part of `template`; `file` names it in errors.
    pub(super) fn render_part(
        &self,
        template: &str,
        part: &'static str,
        file: &str,
        data: &Value,
    ) -> Result<String, RenderError> {
        // HTML is escaped; subject and text are not HTML.
        let registry = if part == "html" {
            &self.html
        } else {
            &self.plain
        };
        registry
            .render(&format!("{template}/{part}"), data)
            .map_err(|e| RenderError::Render {
                file: file.to_owned(),
                reason: describe_render_error(&e),
            })
    }
}

/// A strict registry with the helpers: a template that names a field the data lacks fails
/// to render rather than sending a hole.
fn registry() -> Handlebars<'static> {
    let mut registry = Handlebars::new();
    registry.set_strict_mode(true);
    helpers::register(&mut registry);
    registry
}

/// The refusal for a cycle among everything `{{> name}}` can include, if there is one.
///
/// Handlebars refuses a partial that includes itself, but not a longer cycle, which would
/// overflow the stack at render time and take the process down. `{{> name}}` finds
/// partials, inline partials and templates alike: all are checked together.
fn cycle_error(partials: &Sources, parts: &Parts) -> Option<String> {
    let mut includable = partials.clone();
    for ((template, part), (file, source)) in parts {
        includable.insert(format!("{template}/{part}"), (file.clone(), source.clone()));
    }
    let inline: Vec<(String, (String, String))> = includable
        .values()
        .flat_map(|(file, source)| {
            inline_partials(source)
                .into_iter()
                .map(move |(name, body)| (name, (file.clone(), body)))
        })
        .collect();
    for (name, definition) in inline {
        includable.entry(name).or_insert(definition);
    }
    let cycle = partial_cycle(&includable)?;
    Some(format!(
        "partials include each other: {}",
        cycle.join(" → ")
    ))
}

fn describe_template_error(e: &handlebars::TemplateError) -> String {
    match e.pos() {
        Some((line, col)) => format!("line {line}, column {col}: {}", e.reason()),
        None => e.reason().to_string(),
    }
}

fn describe_render_error(e: &handlebars::RenderError) -> String {
    match (e.line_no, e.column_no) {
        (Some(line), Some(col)) => format!("line {line}, column {col}: {}", e.reason()),
        _ => e.reason().to_string(),
    }
}
