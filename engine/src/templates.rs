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
//! dynamic partials (`{{> (expr)}}`), which cannot be checked.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use handlebars::{
    Context, Handlebars, Helper, HelperDef, RenderContext, RenderErrorReason, ScopedJson,
};
use serde_json::Value;

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

/// One tenant's effective set (default merged with its overrides).
#[derive(Clone)]
struct TenantSet {
    /// HTML-escaping registry for `html` parts.
    html: Handlebars<'static>,
    /// Non-escaping registry for `subject` and `text` parts.
    plain: Handlebars<'static>,
    /// template → which parts exist, and from which file (for error messages).
    templates: HashMap<String, HashMap<&'static str, String>>,
    /// template → why it could not be loaded.
    broken: HashMap<String, String>,
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
            build_set(&TenantFiles::default(), &default_files),
        );
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name == DEFAULT_TENANT || !entry.file_type()?.is_dir() {
                continue;
            }
            let files = read_tenant_dir(&entry.path())?;
            sets.insert(name, build_set(&default_files, &files));
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

impl TenantSet {
    fn render_part(
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

/// The data with the tenant's link policy added, under a key the data itself cannot set
/// (it is overwritten here), for the `link` helper.
fn with_link_policy(data: &Value, link_domains: &[String]) -> Value {
    let mut data = data.clone();
    if let Value::Object(map) = &mut data {
        map.insert(LINK_DOMAINS_KEY.into(), link_domains.into());
    }
    data
}

/// Files of one tenant folder: partial name → (file, source); (template, part) → (file, source).
#[derive(Default, Clone)]
struct TenantFiles {
    partials: HashMap<String, (String, String)>,
    parts: HashMap<(String, &'static str), (String, String)>,
    /// Files that could not be read, by template name.
    unreadable: HashMap<String, String>,
}

fn read_tenant_dir(dir: &Path) -> std::io::Result<TenantFiles> {
    let mut files = TenantFiles::default();
    if !dir.is_dir() {
        return Ok(files);
    }
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if !entry.file_type()?.is_dir() {
            continue;
        }
        let folder = entry.file_name().to_string_lossy().into_owned();
        for file in std::fs::read_dir(entry.path())? {
            let path = file?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("hbs") {
                continue;
            }
            let stem = path
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or_default()
                .to_owned();
            let shown = path.display().to_string();
            let source = match std::fs::read_to_string(&path) {
                Ok(s) => s,
                Err(e) => {
                    files
                        .unreadable
                        .insert(folder.clone(), format!("{shown}: {e}"));
                    continue;
                }
            };
            if folder == "partials" {
                files.partials.insert(stem, (shown, source));
            } else if let Some(part) = PARTS.iter().find(|p| **p == stem) {
                files.parts.insert((folder.clone(), part), (shown, source));
            }
        }
    }
    Ok(files)
}

handlebars::handlebars_helper!(money: |amount: f64| format!("{amount:.2}"));

/// Where [`Templates::render`] puts the tenant's link domains for the `link` helper.
const LINK_DOMAINS_KEY: &str = "_notify_link_domains";

/// `{{link url}}`: the URL, if it is safe to put in an email; otherwise rendering fails and
/// the email is not sent.
struct Link;

impl HelperDef for Link {
    fn call_inner<'reg: 'rc, 'rc>(
        &self,
        h: &Helper<'rc>,
        _: &'reg Handlebars<'reg>,
        ctx: &'rc Context,
        _: &mut RenderContext<'reg, 'rc>,
    ) -> Result<ScopedJson<'rc>, handlebars::RenderError> {
        let url = h
            .param(0)
            .and_then(|p| p.value().as_str())
            .ok_or_else(|| RenderErrorReason::Other("link needs a URL string".into()))?;
        let domains: Vec<&str> = ctx
            .data()
            .get(LINK_DOMAINS_KEY)
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        check_link(url, &domains).map_err(RenderErrorReason::Other)?;
        Ok(ScopedJson::Derived(Value::String(url.to_owned())))
    }
}

/// `https:`, a host, no credentials (`https://bank.example@evil.example/` shows one host
/// and goes to another), and among `domains` if any are given.
fn check_link(raw: &str, domains: &[&str]) -> Result<(), String> {
    let url = url::Url::parse(raw).map_err(|e| format!("link {raw:?} is not a URL: {e}"))?;
    if url.scheme() != "https" {
        return Err(format!("link {raw:?} is not https:"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(format!("link {raw:?} carries credentials"));
    }
    let host = url
        .host_str()
        .ok_or_else(|| format!("link {raw:?} has no host"))?
        .to_ascii_lowercase();
    let allowed = domains.is_empty()
        || domains.iter().any(|d| {
            let d = d.to_ascii_lowercase();
            host == d || host.ends_with(&format!(".{d}"))
        });
    if !allowed {
        return Err(format!(
            "link {raw:?} goes to {host}, which is not among the tenant's link_domains"
        ));
    }
    Ok(())
}

/// Attributes whose value a mail client may load or follow as a URL. `style` is among them
/// (`url(...)`), and so is `content` (`<meta http-equiv=refresh content="0;url=...">`).
const URL_ATTRIBUTES: &[&str] = &[
    "href",
    "src",
    "srcset",
    "action",
    "formaction",
    "background",
    "poster",
    "cite",
    "data",
    "xlink:href",
    "ping",
    "manifest",
    "style",
    "content",
];

/// The first URL attribute (see [`URL_ATTRIBUTES`]) whose value puts data in it without the
/// `link` helper, as written. Attribute names are matched case-insensitively, with any
/// whitespace around `=`.
fn unchecked_link(source: &str) -> Option<String> {
    for (eq, _) in source.match_indices('=') {
        let before = source[..eq].trim_end();
        let name_start = before
            .rfind(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, ':' | '-' | '_')))
            .map_or(0, |i| i + 1);
        let name = &before[name_start..];
        // An attribute name follows whitespace inside a tag, never `{{`-syntax or text.
        let preceded_by_space = before[..name_start].ends_with(char::is_whitespace);
        if !preceded_by_space || !URL_ATTRIBUTES.iter().any(|a| a.eq_ignore_ascii_case(name)) {
            continue;
        }
        let rest = source[eq + 1..].trim_start();
        let (quote, body) = match rest.chars().next() {
            Some(q @ ('"' | '\'')) => (Some(q), &rest[1..]),
            _ => (None, rest),
        };
        let end = match quote {
            Some(q) => body.find(q).unwrap_or(body.len()),
            None => body
                .find(|c: char| c.is_whitespace() || c == '>')
                .unwrap_or(body.len()),
        };
        let value = &body[..end];
        let unchecked = value.match_indices("{{").any(|(i, _)| {
            let tag = value[i + 2..].trim_start_matches(['{', '~']).trim_start();
            !(tag.starts_with("link ") || tag.starts_with('!'))
        });
        if unchecked {
            return Some(format!("{name}=\"{value}\""));
        }
    }
    None
}

/// Does `source` include a partial chosen at render time (`{{> (expr)}}`)?
fn has_dynamic_partial(source: &str) -> bool {
    source.match_indices("{{").any(|(i, _)| {
        let tag = source[i + 2..].trim_start_matches(['~', '#']).trim_start();
        tag.strip_prefix('>')
            .is_some_and(|after| after.trim_start().starts_with('('))
    })
}

/// Inline partials defined in `source`: `{{#*inline "name"}}body{{/inline}}`.
fn inline_partials(source: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = source;
    while let Some(start) = rest.find("{{#*inline") {
        rest = &rest[start + "{{#*inline".len()..];
        let Some(close) = rest.find("}}") else { break };
        let name = rest[..close]
            .trim()
            .trim_matches(['"', '\'', '~'])
            .to_owned();
        rest = &rest[close + 2..];
        let end = rest.find("{{/inline}}").unwrap_or(rest.len());
        out.push((name, rest[..end].to_owned()));
        rest = &rest[end..];
    }
    out
}

fn build_set(defaults: &TenantFiles, own: &TenantFiles) -> TenantSet {
    let mut html = Handlebars::new();
    let mut plain = Handlebars::new();
    for registry in [&mut html, &mut plain] {
        registry.set_strict_mode(true);
        // `{{money amount}}`: 129.9 → "129.90".
        registry.register_helper("money", Box::new(money));
        // `{{link url}}`: only safe links (see `check_link`).
        registry.register_helper("link", Box::new(Link));
    }
    plain.register_escape_fn(handlebars::no_escape);
    let mut broken: HashMap<String, String> = own
        .unreadable
        .iter()
        .chain(defaults.unreadable.iter())
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();

    // Partials: the tenant's override the defaults of the same name.
    let mut partials = defaults.partials.clone();
    partials.extend(own.partials.clone());
    let mut partial_errors = Vec::new();
    let mut parts = defaults.parts.clone();
    parts.extend(own.parts.clone());
    // Handlebars refuses a partial that includes itself, but not a longer cycle, which
    // would overflow the stack at render time and take the process down. `{{> name}}`
    // finds partials, inline partials and templates alike: all are checked together.
    let mut includable = partials.clone();
    for ((template, part), (file, source)) in &parts {
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
    let cycle = partial_cycle(&includable);
    if let Some(cycle) = &cycle {
        partial_errors.push(format!(
            "partials include each other: {}",
            cycle.join(" → ")
        ));
    }
    for (name, (file, source)) in &partials {
        if has_dynamic_partial(source) {
            partial_errors.push(format!(
                "{file}: a dynamic partial ({{{{> (…)}}}}) cannot be checked for cycles; name the partial"
            ));
        }
        if let Some(attribute) = unchecked_link(source) {
            partial_errors.push(format!(
                "{file}: {attribute}: a URL built from data must go through {{{{link …}}}}"
            ));
        }
        for registry in [&mut html, &mut plain] {
            if let Err(e) = registry.register_partial(name, source) {
                partial_errors.push(format!("{file}: {}", describe_template_error(&e)));
                break;
            }
        }
    }

    let mut templates: HashMap<String, HashMap<&'static str, String>> = HashMap::new();
    for ((template, part), (file, source)) in &parts {
        let refusal = if has_dynamic_partial(source) {
            Some(format!(
                "{file}: a dynamic partial ({{{{> (…)}}}}) cannot be checked for cycles; name the partial"
            ))
        } else if *part == "html" {
            unchecked_link(source).map(|attribute| {
                format!("{file}: {attribute}: a URL built from data must go through {{{{link …}}}}")
            })
        } else {
            None
        };
        if let Some(reason) = refusal {
            broken.insert(template.clone(), reason);
            continue;
        }
        let registry = if *part == "html" {
            &mut html
        } else {
            &mut plain
        };
        match registry.register_template_string(&format!("{template}/{part}"), source) {
            Ok(()) => {
                templates
                    .entry(template.clone())
                    .or_default()
                    .insert(part, file.clone());
            }
            Err(e) => {
                broken.insert(
                    template.clone(),
                    format!("{file}: {}", describe_template_error(&e)),
                );
            }
        }
    }
    for (template, found) in &templates {
        if !found.contains_key("subject") {
            broken
                .entry(template.clone())
                .or_insert_with(|| "subject.hbs is missing".into());
        } else if !found.contains_key("html") && !found.contains_key("text") {
            broken
                .entry(template.clone())
                .or_insert_with(|| "needs html.hbs or text.hbs".into());
        }
    }
    if !partial_errors.is_empty() {
        // A broken partial may be used by any template: mark them all.
        let reason = format!("broken partial: {}", partial_errors.join("; "));
        for template in templates.keys() {
            broken.entry(template.clone()).or_insert(reason.clone());
        }
    }
    TenantSet {
        html,
        plain,
        templates,
        broken,
    }
}

/// Names of the partials a template source includes (`{{> name}}`, `{{#> name}}`).
fn partial_references(source: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = source;
    while let Some(start) = rest.find("{{") {
        rest = &rest[start + 2..];
        let tag = rest.trim_start_matches(['~', '#']).trim_start();
        if let Some(after) = tag.strip_prefix('>') {
            let name: String = after
                .trim_start()
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '/'))
                .collect();
            if !name.is_empty() {
                out.push(name);
            }
        }
    }
    out
}

/// A cycle among the partials, as the chain of names, if there is one.
fn partial_cycle(partials: &HashMap<String, (String, String)>) -> Option<Vec<String>> {
    fn visit(
        name: &str,
        partials: &HashMap<String, (String, String)>,
        path: &mut Vec<String>,
        done: &mut std::collections::HashSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(pos) = path.iter().position(|p| p == name) {
            let mut cycle = path[pos..].to_vec();
            cycle.push(name.to_owned());
            return Some(cycle);
        }
        if done.contains(name) {
            return None;
        }
        let (_, source) = partials.get(name)?;
        path.push(name.to_owned());
        for next in partial_references(source) {
            if let Some(cycle) = visit(&next, partials, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(name.to_owned());
        None
    }
    let mut done = std::collections::HashSet::new();
    let mut names: Vec<&String> = partials.keys().collect();
    names.sort();
    names
        .into_iter()
        .find_map(|name| visit(name, partials, &mut Vec::new(), &mut done))
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn write(root: &Path, rel: &str, content: &str) {
        let path = root.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, content).unwrap();
    }

    fn fixture() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        write(root, "default/partials/footer.hbs", "-- {{shop}}");
        write(
            root,
            "default/paid/subject.hbs",
            "Order {{order_id}}\n paid",
        );
        write(root, "default/paid/text.hbs", "Hi {{name}}\n{{> footer}}");
        write(root, "default/paid/html.hbs", "<p>Hi {{name}}</p>");
        write(root, "acme/paid/subject.hbs", "ACME: {{order_id}}");
        write(root, "acme/partials/footer.hbs", "-- ACME");
        write(root, "default/broken/subject.hbs", "{{#if x}}unclosed");
        dir
    }

    #[test]
    fn default_and_tenant_overrides() {
        let dir = fixture();
        let t = Templates::load(dir.path()).unwrap();
        let data = json!({"order_id": "A-1", "name": "<Bob>", "shop": "Shop"});
        let r = t.render("other", "paid", &data, &[]).unwrap();
        assert_eq!(r.subject, "Order A-1 paid");
        assert_eq!(r.text.as_deref(), Some("Hi <Bob>\n-- Shop"));
        assert_eq!(r.html.as_deref(), Some("<p>Hi &lt;Bob&gt;</p>"));
        let r = t.render("acme", "paid", &data, &[]).unwrap();
        assert_eq!(r.subject, "ACME: A-1");
        assert_eq!(r.text.as_deref(), Some("Hi <Bob>\n-- ACME"));
    }

    #[test]
    fn partial_cycles_mark_templates_broken_instead_of_overflowing() {
        let dir = fixture();
        write(dir.path(), "cyc/partials/a.hbs", "a {{> b}}");
        write(dir.path(), "cyc/partials/b.hbs", "b {{#> a}}x{{/a}}");
        write(dir.path(), "cyc/paid/text.hbs", "{{> a}}");
        let t = Templates::load(dir.path()).unwrap();
        let e = t
            .render("cyc", "paid", &json!({"order_id": "1"}), &[])
            .unwrap_err();
        assert!(e.to_string().contains("partials include each other"), "{e}");
        // Other tenants are unaffected.
        assert!(
            t.render(
                "acme",
                "paid",
                &json!({"order_id": "1", "name": "n", "shop": "s"}),
                &[]
            )
            .is_ok()
        );
    }

    #[test]
    fn inline_dynamic_and_template_recursion_cannot_overflow_the_stack() {
        let dir = fixture();
        // An inline partial that includes itself.
        write(
            dir.path(),
            "inl/paid/text.hbs",
            "{{#*inline \"x\"}}x {{> x}}{{/inline}}{{> x}}",
        );
        // A template that includes itself by name (`{{> name}}` finds templates too).
        write(dir.path(), "tpl/paid/text.hbs", "again {{> paid/text}}");
        // A partial chosen at render time.
        write(
            dir.path(),
            "dyn/paid/text.hbs",
            "{{> (lookup this \"which\")}}",
        );
        let t = Templates::load(dir.path()).unwrap();
        let data = json!({"order_id": "1", "name": "n", "shop": "s", "which": "footer"});
        for (tenant, want) in [
            ("inl", "include each other"),
            ("tpl", "include each other"),
            ("dyn", "dynamic partial"),
        ] {
            let e = t.render(tenant, "paid", &data, &[]).unwrap_err();
            assert!(e.to_string().contains(want), "{tenant}: {e}");
        }
        assert!(t.render("acme", "paid", &data, &[]).is_ok());
    }

    #[test]
    fn links_must_be_https_and_go_through_the_helper() {
        let dir = fixture();
        write(
            dir.path(),
            "lnk/paid/html.hbs",
            "<a href=\"{{link url}}\">track</a>",
        );
        write(
            dir.path(),
            "raw/paid/html.hbs",
            "<a href=\"{{url}}\">track</a>",
        );
        write(
            dir.path(),
            "raw2/paid/html.hbs",
            "<img src='https://cdn.example/{{path}}'>",
        );
        write(
            dir.path(),
            "raw3/paid/html.hbs",
            "<a HREF = \"{{url}}\">x</a>",
        );
        write(
            dir.path(),
            "raw4/paid/html.hbs",
            "<meta http-equiv=refresh content=\"0;url={{url}}\"><p>{{name}}</p>",
        );
        write(
            dir.path(),
            "raw5/paid/html.hbs",
            "<td style=\"background: url({{url}})\">x</td>",
        );
        // Data in other attributes, and `=` in text, are fine.
        write(
            dir.path(),
            "fine/paid/html.hbs",
            "<img alt=\"{{name}}\" src=\"https://cdn.example/logo.png\"><p>a = {{name}}</p>",
        );
        let t = Templates::load(dir.path()).unwrap();
        let with =
            |url: &str| json!({"order_id": "1", "url": url, "path": "x", "name": "n", "shop": "s"});
        let ok = t
            .render(
                "lnk",
                "paid",
                &with("https://track.example/p/1?a=1&b=2"),
                &[],
            )
            .unwrap();
        assert_eq!(
            ok.html.as_deref(),
            Some("<a href=\"https://track.example/p/1?a&#x3D;1&amp;b&#x3D;2\">track</a>")
        );
        for bad in [
            "javascript:alert(1)",
            "http://track.example/",
            "https://bank.example@evil.example/",
            "data:text/html,hi",
        ] {
            let e = t.render("lnk", "paid", &with(bad), &[]).unwrap_err();
            assert!(matches!(e, RenderError::Render { .. }), "{bad}: {e}");
        }
        let domains = ["track.example".to_string()];
        assert!(
            t.render("lnk", "paid", &with("https://eu.track.example/1"), &domains)
                .is_ok()
        );
        let e = t
            .render("lnk", "paid", &with("https://evil.example/1"), &domains)
            .unwrap_err();
        assert!(e.to_string().contains("link_domains"), "{e}");
        // The data cannot widen the policy by setting the key itself.
        let mut sneaky = with("https://evil.example/1");
        sneaky[LINK_DOMAINS_KEY] = json!(["evil.example"]);
        assert!(t.render("lnk", "paid", &sneaky, &domains).is_err());
        // Data in a URL attribute without the helper: refused at load.
        for tenant in ["raw", "raw2", "raw3", "raw4", "raw5"] {
            let e = t.render(tenant, "paid", &with("x"), &[]).unwrap_err();
            assert!(e.to_string().contains("link"), "{tenant}: {e}");
        }
        assert!(t.render("fine", "paid", &with("x"), &[]).is_ok());
    }

    #[test]
    fn a_reload_picks_up_edits_and_keeps_a_tenant_set_an_edit_broke() {
        let dir = fixture();
        let t = Templates::load(dir.path()).unwrap();
        let data = json!({"order_id": "A-1", "name": "n", "shop": "s"});
        write(dir.path(), "acme/paid/subject.hbs", "ACME v2: {{order_id}}");
        write(dir.path(), "default/paid/subject.hbs", "Paid: {{order_id}}");
        let (t, kept) = t.reload().unwrap();
        assert!(kept.is_empty(), "{kept:?}");
        assert_eq!(
            t.render("acme", "paid", &data, &[]).unwrap().subject,
            "ACME v2: A-1"
        );
        assert_eq!(
            t.render("other", "paid", &data, &[]).unwrap().subject,
            "Paid: A-1"
        );
        // A broken edit of acme's subject: acme keeps v2, and the problem names file:line.
        write(
            dir.path(),
            "acme/paid/subject.hbs",
            "ACME v3: {{#if order_id}}",
        );
        let (t, kept) = t.reload().unwrap();
        assert_eq!(
            t.render("acme", "paid", &data, &[]).unwrap().subject,
            "ACME v2: A-1"
        );
        assert_eq!(kept.len(), 1, "{kept:?}");
        assert!(
            kept[0].starts_with("acme: kept the previous templates"),
            "{kept:?}"
        );
        assert!(kept[0].contains("subject.hbs: line 1"), "{kept:?}");
        // Other tenants take their edits regardless.
        assert_eq!(
            t.render("other", "paid", &data, &[]).unwrap().subject,
            "Paid: A-1"
        );
        // Fixed: the next reload takes it.
        write(dir.path(), "acme/paid/subject.hbs", "ACME v4: {{order_id}}");
        let (t, kept) = t.reload().unwrap();
        assert!(kept.is_empty(), "{kept:?}");
        assert_eq!(
            t.render("acme", "paid", &data, &[]).unwrap().subject,
            "ACME v4: A-1"
        );
    }

    #[test]
    fn lint_renders_every_template_with_its_sample() {
        let dir = fixture();
        std::fs::remove_dir_all(dir.path().join("default/broken")).unwrap();
        let t = Templates::load(dir.path()).unwrap();
        let problems = t.lint();
        assert!(
            problems.iter().any(|p| p.contains("no sample.json")),
            "{problems:?}"
        );
        write(
            dir.path(),
            "default/paid/sample.json",
            r#"{"order_id": "A-1", "name": "n", "shop": "s"}"#,
        );
        let t = Templates::load(dir.path()).unwrap();
        assert_eq!(t.lint(), Vec::<String>::new());
        // A sample missing a field the tenant's override needs: named with file and line.
        write(
            dir.path(),
            "acme/paid/subject.hbs",
            "ACME {{order_id}} {{vip_level}}",
        );
        let t = Templates::load(dir.path()).unwrap();
        let problems = t.lint();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].starts_with("acme/paid"), "{problems:?}");
        assert!(problems[0].contains("subject.hbs"), "{problems:?}");
    }

    #[test]
    fn errors_name_file_and_line() {
        let dir = fixture();
        let t = Templates::load(dir.path()).unwrap();
        let problems = t.problems().join("\n");
        assert!(
            problems.contains("broken/subject.hbs: line 1"),
            "{problems}"
        );
        let e = t.render("default", "broken", &json!({}), &[]).unwrap_err();
        assert!(matches!(e, RenderError::Broken { .. }), "{e}");
        let e = t.render("acme", "nope", &json!({}), &[]).unwrap_err();
        assert!(matches!(e, RenderError::Missing { .. }), "{e}");
        // Strict mode: a missing field is an error naming the file, not an empty hole.
        let e = t
            .render("default", "paid", &json!({"order_id": "A"}), &[])
            .unwrap_err();
        assert!(
            e.to_string().contains("text.hbs") || e.to_string().contains("html.hbs"),
            "{e}"
        );
    }
}
