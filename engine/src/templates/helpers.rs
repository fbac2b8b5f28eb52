//! The helpers registered on every template registry: `{{money amount}}` and `{{link url}}`.
//!
//! `link` is the one way data may become a URL in an email (the load-time checks in
//! `checks` refuse every other way), so its rules live here with it: `https:` only, no
//! credentials, and the tenant's `link_domains` when it lists some. The tenant's domains
//! reach the helper inside the render data, under a key the data cannot set.

use handlebars::{
    Context, Handlebars, Helper, HelperDef, RenderContext, RenderErrorReason, ScopedJson,
};
use serde_json::Value;

/// Registers the helpers on a registry (each tenant set has two: HTML and plain).
pub(super) fn register(registry: &mut Handlebars<'static>) {
    // `{{money amount}}`: 129.9 → "129.90".
    registry.register_helper("money", Box::new(money));
    // `{{link url}}`: only safe links (see `check_link`).
    registry.register_helper("link", Box::new(Link));
}

handlebars::handlebars_helper!(money: |amount: f64| format!("{amount:.2}"));

/// Where [`super::Templates::render`] puts the tenant's link domains for the `link` helper.
pub(super) const LINK_DOMAINS_KEY: &str = "_notify_link_domains";

/// The data with the tenant's link policy added, under a key the data itself cannot set
/// (it is overwritten here), for the `link` helper.
pub(super) fn with_link_policy(data: &Value, link_domains: &[String]) -> Value {
    let mut data = data.clone();
    if let Value::Object(map) = &mut data {
        map.insert(LINK_DOMAINS_KEY.into(), link_domains.into());
    }
    data
}

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
pub(super) fn check_link(raw: &str, domains: &[&str]) -> Result<(), String> {
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
