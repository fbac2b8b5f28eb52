//! Tests of the templates as the email worker and the CLI use them: load a folder, render,
//! reload, lint. They go through [`Templates`] on purpose: the checks, the helpers and the
//! merging of a tenant's overrides are promises about what renders and what is refused.

use super::helpers::LINK_DOMAINS_KEY;
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
