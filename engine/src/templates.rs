//! Email templates: `templates/<tenant>/<template>/{subject,html,text}.hbs`.
//!
//! `templates/default/` is the fallback for every tenant; a tenant folder overrides single
//! parts (just the subject, say) and partials (`<tenant>/partials/*.hbs`). The HTML part is
//! HTML-escaped, subject and text are not (they are not HTML). Strict mode: a template that
//! names a field the data lacks fails to render rather than sending a hole.
//! Errors name the file and, for syntax errors, line and column.
//!
//! Email must not become a phishing relay for whoever controls event data: a link built
//! from data goes through `{{link url}}`, which renders only `https:` URLs without
//! credentials (and, when the tenant lists `link_domains`, only to those domains); an
//! `href`/`src`/`action` attribute that puts data in a URL any other way marks the template
//! broken at load. Partials cannot overflow the stack: cycles among partials, inline
//! partials and templates (which `{{> name}}` also finds) are refused at load, and so are
//! dynamic partials (`{{> (expr)}}`), which cannot be checked. The HTML a templating plugin
//! returns is held to the same link rules after the fact ([`html_link_refusal`]).
//!
//! The module by role: `files` reads a tenant folder, `set` builds a tenant's registries
//! (and marks what cannot be used broken), `checks` holds the load-time refusals read from
//! the sources, `helpers` the `money` and `link` helpers, `html` the link policy on finished
//! HTML (a templating plugin's). This file is the public face:
//! loading, hot reload, lint and rendering.

mod checks;
mod files;
mod helpers;
mod html;
mod set;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use files::read_tenant_dir;
use helpers::with_link_policy;
pub use html::html_link_refusal;
use set::TenantSet;

/// The fallback tenant folder.
pub const DEFAULT_TENANT: &str = "default";
/// Sample data kept beside a template, for `template lint` and `template preview`.
pub const SAMPLE_FILE: &str = "sample.json";
const PARTS: [&str; 3] = ["subject", "html", "text"];

#[derive(Debug, Clone, thiserror::Error)]
pub enum RenderError {
    #[error("no template {template:?} for tenant {tenant} (looked in {tenant}/ and default/)")]
    Missing { tenant: String, template: String },
    #[error("template {template:?} for tenant {tenant} is broken: {reason}")]
    Broken {
        tenant: String,
        template: String,
        reason: String,
    },
    #[error("rendering {file}: {reason}")]
    Render { file: String, reason: String },
    #[error("template {template:?} rendered an empty subject")]
    EmptySubject { template: String },
}

#[derive(Debug, Clone, PartialEq)]
pub struct RenderedEmail {
    pub subject: String,
    pub html: Option<String>,
    pub text: Option<String>,
}

pub struct Templates {
    dir: PathBuf,
    sets: HashMap<String, TenantSet>,
}

impl Templates {
    /// Loads every tenant folder under `dir`. Broken files are remembered with their error
    /// (file:line:column) and reported by [`Templates::problems`]; the rest still load.
    pub fn load(dir: &Path) -> std::io::Result<Self> {
        let default_files = read_tenant_dir(&dir.join(DEFAULT_TENANT))?;
        let mut sets = HashMap::new();
        sets.insert(
            DEFAULT_TENANT.to_owned(),
            TenantSet::build(&Default::default(), &default_files),
        );
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name == DEFAULT_TENANT || !entry.file_type()?.is_dir() {
                continue;
            }
            let files = read_tenant_dir(&entry.path())?;
            sets.insert(name, TenantSet::build(&default_files, &files));
        }
        Ok(Self {
            dir: dir.to_owned(),
            sets,
        })
    }

    /// Loads the directory again for a hot reload. A tenant whose new set breaks a template
    /// that worked keeps its previous set whole (the email goes out as before the edit);
    /// the returned lines say which, with the new problems (file:line).
    pub fn reload(&self) -> std::io::Result<(Templates, Vec<String>)> {
        let mut fresh = Templates::load(&self.dir)?;
        let mut kept = Vec::new();
        for (tenant, set) in fresh.sets.iter_mut() {
            // A tenant folder that is new was served by the default set until now.
            let Some(old) = self
                .sets
                .get(tenant)
                .or_else(|| self.sets.get(DEFAULT_TENANT))
            else {
                continue;
            };
            let mut newly_broken: Vec<String> = set
                .broken
                .iter()
                .filter(|(name, _)| {
                    !old.broken.contains_key(*name) && old.templates.contains_key(*name)
                })
                .map(|(name, reason)| format!("{name}: {reason}"))
                .collect();
            if newly_broken.is_empty() {
                continue;
            }
            newly_broken.sort();
            kept.push(format!(
                "{tenant}: kept the previous templates; the edit broke {}",
                newly_broken.join("; ")
            ));
            *set = old.clone();
        }
        Ok((fresh, kept))
    }

    /// Renders every template of every tenant folder against the sample data kept beside it
    /// (`<tenant>/<template>/sample.json`, else `default/<template>/sample.json`), and
    /// returns every problem: templates that did not load, missing or unreadable samples,
    /// render errors (file:line). Empty means clean.
    pub fn lint(&self) -> Vec<String> {
        let mut problems = self.problems();
        let mut tenants: Vec<&String> = self.sets.keys().collect();
        tenants.sort();
        for tenant in tenants {
            let set = &self.sets[tenant];
            let mut names: Vec<&String> = set.templates.keys().collect();
            names.sort();
            for name in names.into_iter().filter(|n| !set.broken.contains_key(*n)) {
                let sample = [tenant.as_str(), DEFAULT_TENANT]
                    .iter()
                    .map(|t| self.dir.join(t).join(name).join(SAMPLE_FILE))
                    .find(|p| p.exists());
                let Some(sample) = sample else {
                    problems.push(format!(
                        "{tenant}/{name}: no {SAMPLE_FILE} beside it or in default/{name}/"
                    ));
                    continue;
                };
                let data = match std::fs::read_to_string(&sample)
                    .map_err(|e| e.to_string())
                    .and_then(|t| serde_json::from_str::<Value>(&t).map_err(|e| e.to_string()))
                {
                    Ok(data) => data,
                    Err(e) => {
                        problems.push(format!("{}: {e}", sample.display()));
                        continue;
                    }
                };
                if let Err(e) = self.render(tenant, name, &data, &[]) {
                    problems.push(format!("{tenant}/{name} with {}: {e}", sample.display()));
                }
            }
        }
        problems
    }

    /// Every template that failed to load, as `tenant/template: reason`.
    pub fn problems(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .sets
            .iter()
            .flat_map(|(t, set)| set.broken.iter().map(move |(n, r)| format!("{t}/{n}: {r}")))
            .collect();
        out.sort();
        out
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Renders `template` for `tenant` with `data`; `{{link}}` accepts only hosts among
    /// `link_domains` (and their subdomains) when it is not empty.
    pub fn render(
        &self,
        tenant: &str,
        template: &str,
        data: &Value,
        link_domains: &[String],
    ) -> Result<RenderedEmail, RenderError> {
        let (set, parts) = self.lookup(tenant, template)?;
        let data = &with_link_policy(data, link_domains);
        let render = |part: &'static str| {
            parts
                .get(part)
                .map(|file| set.render_part(template, part, file, data))
                .transpose()
        };
        let subject = render("subject")?.unwrap_or_default();
        // Header injection is impossible (lettre encodes headers), but a multi-line subject
        // is still a template mistake: fold it to one line.
        // (ASCII blanks only: a no-break space inside a price is meant.)
        let subject = subject
            .split(|c: char| c.is_ascii_whitespace())
            .filter(|w| !w.is_empty())
            .collect::<Vec<_>>()
            .join(" ");
        if subject.is_empty() {
            return Err(RenderError::EmptySubject {
                template: template.into(),
            });
        }
        Ok(RenderedEmail {
            subject,
            html: render("html")?,
            text: render("text")?,
        })
    }

    /// Renders one part (`subject`, `html` or `text`) of `template` for `tenant`, under the
    /// rules of [`Templates::render`]: what a templating plugin's `templates.render` import
    /// does. A part the template does not have is [`RenderError::Missing`].
    pub fn render_part(
        &self,
        tenant: &str,
        template: &str,
        part: &str,
        data: &Value,
        link_domains: &[String],
    ) -> Result<String, RenderError> {
        let missing = || RenderError::Missing {
            tenant: tenant.into(),
            template: format!("{template}/{part}"),
        };
        let part = PARTS.iter().find(|p| **p == part).ok_or_else(missing)?;
        let (set, parts) = self.lookup(tenant, template)?;
        let file = parts.get(part).ok_or_else(missing)?;
        set.render_part(template, part, file, &with_link_policy(data, link_domains))
    }

    /// The tenant's set and the parts of `template` in it, if it is there and not broken.
    fn lookup(
        &self,
        tenant: &str,
        template: &str,
    ) -> Result<(&TenantSet, &HashMap<&'static str, String>), RenderError> {
        let missing = || RenderError::Missing {
            tenant: tenant.into(),
            template: template.into(),
        };
        let set = self
            .sets
            .get(tenant)
            .or_else(|| self.sets.get(DEFAULT_TENANT))
            .ok_or_else(missing)?;
        if let Some(reason) = set.broken.get(template) {
            return Err(RenderError::Broken {
                tenant: tenant.into(),
                template: template.into(),
                reason: reason.clone(),
            });
        }
        let parts = set.templates.get(template).ok_or_else(missing)?;
        Ok((set, parts))
    }
}
