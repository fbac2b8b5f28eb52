//! Email templates and the templating world: a tenant's templating plugin renders its emails
//! end to end, a templating plugin that misbehaves is contained while other tenants' emails
//! flow, and the shipped templates lint clean. Templates reloading live are in `reload.rs`.

use std::sync::Arc;
use std::time::Duration;

use notify_engine::config::{PluginConfig, TenantConfig};
use notify_engine::plugin::{EmailToRender, PluginError, PluginHost};
use notify_engine::templates::Templates;
use serde_json::json;

use crate::support::*;

const WAIT: Duration = Duration::from_secs(30);

/// `templates/globex` (the example tenant of the locale templater) under `tenant`.
fn templates_for(tenant: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&Services::get().templates, dir.path());
    copy_dir(
        &Services::get().templates.join("globex"),
        &dir.path().join(tenant),
    );
    dir
}

fn paid_at(id: &str, tenant: &str, email: &str, locale: &str, zone: &str) -> serde_json::Value {
    let mut event = order_paid(id, tenant, "u1", Some(email), 1234.5);
    event["time"] = json!("2026-11-27T13:05:00Z");
    event["data"]["locale"] = json!(locale);
    event["data"]["time_zone"] = json!(zone);
    event
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_templating_plugin_renders_each_recipient_in_their_locale() {
    let world = World::new().await;
    let tenant = unique("globex");
    world.install_plugin("locale-templater.wasm", "locale-templater.wasm");
    let templates = templates_for(&tenant);
    let mut config = world.config();
    config.email.templates_dir = templates.path().to_owned();
    // The events carry a fixed time, so the expected text is exact.
    config.email.max_event_age_secs = 0;
    config.tenants.insert(
        tenant.clone(),
        TenantConfig {
            templating_plugin: Some("locale-templater".into()),
            ..TenantConfig::default()
        },
    );
    let engine = world.start(config).await;
    let berlin = format!("{}@example.test", unique("de"));
    let new_york = format!("{}@example.test", unique("us"));
    world
        .produce(&paid_at("de1", &tenant, &berlin, "de-DE", "Europe/Berlin"))
        .await;
    world
        .produce(&paid_at(
            "us1",
            &tenant,
            &new_york,
            "en-US",
            "America/New_York",
        ))
        .await;
    let mailpit = Mailpit::new(&world.services);

    let de = &mailpit.wait_for(&berlin, 1, WAIT).await[0];
    assert_eq!(
        de.subject,
        "Zahlung über 1.234,50\u{a0}€ für Bestellung A-de1 erhalten"
    );
    assert_eq!(
        de.text.replace("\r\n", "\n").trim_end(),
        "Hallo Alice,\n\nwir haben Ihre Zahlung über 1.234,50\u{a0}€ für die Bestellung A-de1 am 27. November 2026, 14:05 CET erhalten.\n\n--\nGlobex GmbH · Bestellnummer A-de1"
    );
    assert!(de.html.contains("<html lang=\"de\">"), "{}", de.html);
    assert!(
        de.html.contains(
            "<p>wir haben Ihre Zahlung über <strong>1.234,50\u{a0}€</strong> für die Bestellung <strong>A-de1</strong> am 27. November 2026, 14:05 CET erhalten.</p>"
        ),
        "{}",
        de.html
    );

    let us = &mailpit.wait_for(&new_york, 1, WAIT).await[0];
    assert_eq!(us.subject, "Payment of €1,234.50 received for order A-us1");
    assert_eq!(
        us.text.replace("\r\n", "\n").trim_end(),
        "Hello Alice,\n\nwe received your payment of €1,234.50 for order A-us1 on November 27, 2026, 8:05 AM EST.\n\n--\nGlobex Inc. · Order reference A-us1"
    );
    assert!(us.html.contains("<html lang=\"en\">"), "{}", us.html);
    assert!(
        us.html
            .contains("<strong>€1,234.50</strong> for order <strong>A-us1</strong> on November 27, 2026, 8:05 AM EST."),
        "{}",
        us.html
    );
    assert_eq!(
        engine
            .metrics
            .plugin_calls
            .with_label_values(&[tenant.as_str(), "templating", "ok"])
            .get(),
        2,
        "a configured tenant is labelled by name"
    );

    // The admin listing: on the admin listener, for a token with the admin role.
    let http = reqwest::Client::new();
    let admin_url = format!("http://{}/api/v1/admin/plugins", engine.admin_addr);
    let auth = &world.config().auth;
    let admin = notify_engine::api::auth::mint_with_roles(auth, "ops", "root", &["admin"], 60);
    let listing: serde_json::Value = http
        .get(&admin_url)
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let plugins = listing["plugins"].as_array().unwrap();
    let templater = plugins
        .iter()
        .find(|p| p["plugin"] == "locale-templater")
        .unwrap_or_else(|| panic!("{listing:#}"));
    assert_eq!(templater["state"], "serving");
    assert_eq!(templater["world"], "templating");
    assert_eq!(templater["wit_version"], "notify:plugin@0.3.0");
    assert_eq!(templater["tenants"], json!([tenant]));
    assert_eq!(templater["calls"], 2);
    assert_eq!(templater["failures"], 0);
    assert_eq!(templater["sha256"].as_str().unwrap().len(), 64);
    let default = plugins.iter().find(|p| p["plugin"] == "default").unwrap();
    assert_eq!(default["world"], "routing");
    assert!(default["tenants"].as_array().unwrap().contains(&json!("*")));
    // A user's token is not enough; no token is unauthorized; the public listener has no
    // admin API at all.
    let user = world.token(&tenant, "u1");
    let status = |r: reqwest::Response| r.status().as_u16();
    assert_eq!(
        status(
            http.get(&admin_url)
                .bearer_auth(&user)
                .send()
                .await
                .unwrap()
        ),
        403
    );
    assert_eq!(status(http.get(&admin_url).send().await.unwrap()), 401);
    let public = format!("http://{}/api/v1/admin/plugins", engine.http_addr);
    assert_eq!(
        status(http.get(&public).bearer_auth(&admin).send().await.unwrap()),
        404
    );
    engine.shutdown().await;
}

/// Every misbehaviour of a templating plugin ends as an error for that one email, with
/// the reason, while another tenant's emails render meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_misbehaving_templating_plugin_is_contained() {
    let services = Services::get();
    let dir = services.plugin_dir(&[
        ("fixtures/chaos-templater.wasm", "chaos-templater.wasm"),
        ("locale-templater.wasm", "locale-templater.wasm"),
        ("default.wasm", "default.wasm"),
    ]);
    let limits = PluginConfig {
        dir: dir.path().to_owned(),
        breaker_failures: 0,
        ..PluginConfig::default()
    };
    let tenants = [
        (
            "chaos".to_string(),
            TenantConfig {
                templating_plugin: Some("chaos-templater".into()),
                ..TenantConfig::default()
            },
        ),
        (
            "globex".to_string(),
            TenantConfig {
                templating_plugin: Some("locale-templater".into()),
                ..TenantConfig::default()
            },
        ),
    ]
    .into();
    let host = Arc::new(PluginHost::new(limits, tenants).unwrap());
    host.load_dir().await.unwrap();
    let templates = Arc::new(Templates::load(&services.templates).unwrap());
    let render = |host: Arc<PluginHost>, tenant: &'static str, data: serde_json::Value| {
        let templates = templates.clone();
        async move {
            let email = EmailToRender {
                tenant,
                outbox_id: 1,
                event_id: "e1",
                event_type: "order_paid",
                event_time: "2026-11-27T13:05:00Z".into(),
                template: "order_paid",
                recipient: "a@example.test",
                user_id: Some("u1"),
                locale: Some("de-DE"),
                time_zone: Some("Europe/Berlin"),
                data: &data,
            };
            host.render_email(&email, templates, &[]).await
        }
    };
    let paid =
        json!({"order_id": "G-1", "customer_name": "Bob", "amount": 10.0, "currency": "EUR"});
    let chaos = |mode: &str| {
        let mut d = paid.clone();
        d["chaos"] = json!(mode);
        d
    };
    let ok = render(host.clone(), "chaos", paid.clone())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ok.subject, "chaos ok order_paid");
    assert!(ok.text.unwrap().contains("G-1"));

    // An endless loop, with another tenant rendering while it spins.
    let looping = tokio::spawn(render(host.clone(), "chaos", chaos("loop")));
    let started = std::time::Instant::now();
    let other = render(host.clone(), "globex", paid.clone())
        .await
        .unwrap()
        .unwrap();
    assert!(
        other.subject.starts_with("Zahlung über 10,00"),
        "{}",
        other.subject
    );
    assert!(
        started.elapsed() < Duration::from_millis(400),
        "the other tenant waited {:?} for the looping plugin",
        started.elapsed()
    );
    match looping.await.unwrap().unwrap() {
        Err(PluginError::OutOfFuel { .. } | PluginError::Timeout { .. }) => {}
        other => panic!("loop: {other:?}"),
    }

    // Deep recursion overflows a Rust guest's shadow stack (in linear memory) first, which
    // traps as an out-of-bounds access; a guest without one exhausts wasmtime's call stack.
    for (mode, expect) in [
        ("trap", &["chaos: trap requested"][..]),
        (
            "recurse",
            &["out of bounds memory access", "call stack exhausted"][..],
        ),
        ("oom", &["memory limit"][..]),
    ] {
        match render(host.clone(), "chaos", chaos(mode)).await.unwrap() {
            Err(PluginError::Trap { message, .. }) => {
                assert!(
                    expect.iter().any(|e| message.contains(e)),
                    "{mode}: {message}"
                )
            }
            other => panic!("{mode}: {other:?}"),
        }
    }
    for (mode, expect) in [("bad_subject", "one line"), ("huge", "output limit")] {
        match render(host.clone(), "chaos", chaos(mode)).await.unwrap() {
            Err(PluginError::InvalidOutput { message, .. }) => {
                assert!(message.contains(expect), "{mode}: {message}")
            }
            other => panic!("{mode}: {other:?}"),
        }
    }
    assert!(matches!(
        render(host.clone(), "chaos", chaos("error")).await.unwrap(),
        Err(PluginError::Failed { .. })
    ));
    // A tenant without a templating plugin renders from its files (`None`).
    assert!(render(host.clone(), "acme", paid.clone()).await.is_none());
    // The instance of a failed call is gone: the next call starts clean.
    assert!(render(host.clone(), "chaos", paid).await.unwrap().is_ok());
}

/// A templating plugin several tenants share is quarantined only for the tenant whose emails
/// keep breaking it; and a subject made invalid by the email's own data is that data's
/// problem (invalid data), which never counts toward the breaker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_templating_plugin_is_quarantined_only_for_the_tenant_that_breaks_it() {
    let services = Services::get();
    let dir = services.plugin_dir(&[
        ("fixtures/chaos-templater.wasm", "shared-templater.wasm"),
        ("default.wasm", "default.wasm"),
    ]);
    let limits = PluginConfig {
        dir: dir.path().to_owned(),
        breaker_failures: 2,
        cache_dir: plugin_cache_dir(),
        ..PluginConfig::default()
    };
    let shared = || TenantConfig {
        templating_plugin: Some("shared-templater".into()),
        ..TenantConfig::default()
    };
    let tenants = [
        ("noisy".to_string(), shared()),
        ("careless".to_string(), shared()),
        ("quiet".to_string(), shared()),
    ]
    .into();
    let host = Arc::new(PluginHost::new(limits, tenants).unwrap());
    host.load_dir().await.unwrap();
    let templates = Arc::new(Templates::load(&services.templates).unwrap());
    let render = async |tenant: &str, data: serde_json::Value| {
        let email = EmailToRender {
            tenant,
            outbox_id: 1,
            event_id: "e1",
            event_type: "order_paid",
            event_time: "2026-11-27T13:05:00Z".into(),
            template: "order_paid",
            recipient: "a@example.test",
            user_id: Some("u1"),
            locale: None,
            time_zone: None,
            data: &data,
        };
        host.render_email(&email, templates.clone(), &[])
            .await
            .expect("the tenant has a templating plugin")
    };
    let paid =
        json!({"order_id": "G-1", "customer_name": "Bob", "amount": 10.0, "currency": "EUR"});
    let with = |fields: serde_json::Value| {
        let mut d = paid.clone();
        d.as_object_mut()
            .unwrap()
            .extend(fields.as_object().unwrap().clone());
        d
    };

    // The email's data carries a line break into the subject: its problem, every time.
    for _ in 0..3 {
        match render(
            "careless",
            with(json!({"chaos": "data_subject", "subject": "Hi\r\nBcc: x@example.com"})),
        )
        .await
        {
            Err(PluginError::InvalidData { message, .. }) => {
                assert!(
                    message.contains("one line") && message.contains("email's data"),
                    "{message}"
                )
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(
        render("careless", paid.clone()).await.is_ok(),
        "not quarantined"
    );

    // Real malfunctions: the plugin is quarantined for that tenant alone.
    for _ in 0..2 {
        assert!(matches!(
            render("noisy", with(json!({"chaos": "trap"}))).await,
            Err(PluginError::Trap { .. })
        ));
    }
    assert!(matches!(
        render("noisy", paid.clone()).await,
        Err(PluginError::Quarantined { failures: 2, .. })
    ));
    let quiet = render("quiet", paid.clone()).await.unwrap();
    assert_eq!(quiet.subject, "chaos ok order_paid");
    let quarantined = host.health().quarantined;
    assert_eq!(quarantined.len(), 1, "{quarantined:?}");
    assert!(
        quarantined[0].starts_with("shared-templater (")
            && quarantined[0].contains("for tenant noisy"),
        "{quarantined:?}"
    );
}

/// A templating call that traps on a warm instance (here: memory its earlier calls kept,
/// grown past the cap) is retried once on a fresh instance before the trap counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_templating_call_that_traps_a_warm_instance_is_retried_fresh() {
    let services = Services::get();
    let dir = services.plugin_dir(&[
        ("fixtures/chaos-templater.wasm", "chaos-templater.wasm"),
        ("default.wasm", "default.wasm"),
    ]);
    let limits = PluginConfig {
        dir: dir.path().to_owned(),
        templating_memory_bytes: 32 << 20,
        cache_dir: plugin_cache_dir(),
        ..PluginConfig::default()
    };
    let tenant = TenantConfig {
        templating_plugin: Some("chaos-templater".into()),
        ..TenantConfig::default()
    };
    let host = PluginHost::new(limits, [("t1".to_string(), tenant)].into()).unwrap();
    host.load_dir().await.unwrap();
    let templates = Arc::new(Templates::load(&services.templates).unwrap());
    let grow = async |mib: u32| {
        let data = json!({"order_id": "G-1", "customer_name": "Bob", "amount": 10.0,
            "currency": "EUR", "chaos": "grow", "grow_mib": mib});
        let email = EmailToRender {
            tenant: "t1",
            outbox_id: 1,
            event_id: "e1",
            event_type: "order_paid",
            event_time: "2026-11-27T13:05:00Z".into(),
            template: "order_paid",
            recipient: "a@example.test",
            user_id: Some("u1"),
            locale: None,
            time_zone: None,
            data: &data,
        };
        match host.render_email(&email, templates.clone(), &[]).await {
            Some(Ok(rendered)) => rendered.subject,
            other => panic!("{mib} MiB: {other:?}"),
        }
    };
    assert_eq!(grow(4).await, "chaos grew 1");
    // 4 + 28 MiB do not fit in the warm instance; 28 do in a fresh one.
    assert_eq!(grow(28).await, "chaos grew 1");
}

/// The repository's own templates render against the sample data kept beside them (what
/// `notify-engine template lint` checks), and `template preview`'s renderer agrees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_templates_lint_clean() {
    let services = Services::get();
    let problems = notify_engine::tools::lint_templates(&services.templates).unwrap();
    assert!(problems.is_empty(), "{problems:#?}");
    let preview = notify_engine::tools::preview_template(
        &services.templates,
        "acme",
        "order_paid",
        &services.templates.join("default/order_paid/sample.json"),
        &[],
    )
    .unwrap();
    assert_eq!(preview.subject, "Thanks for your ACME order A-1001");
    assert!(preview.html.unwrap().contains("129.90 EUR"));
}
