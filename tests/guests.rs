//! Plugins in Rust, Python and JavaScript, through the engine's real plugin host: the
//! conformance table (`tests/conformance/routing.json`) against the default rules in each
//! language, isolation between tenants and after a trap on warm instances, the sandbox's
//! hostile cases in the Python and JavaScript guests, the `cargo component` starters, and
//! events routed by Python and JavaScript plugins reaching SSE and Mailpit.

use std::collections::BTreeMap;
use std::path::PathBuf;

use notify_engine::config::{PluginConfig, TenantConfig};
use notify_engine::ingest::envelope;
use notify_engine::model::Event;
use notify_engine::plugin::{PluginError, PluginHost};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::OnceCell;

use crate::support::*;

/// The default rules in each language: (guest, built file, plugin name).
const ROUTERS: [(&str, &str, &str); 3] = [
    ("rust", "default.wasm", "default"),
    ("python", "guests/python-router.wasm", "python-router"),
    ("javascript", "guests/js-router.wasm", "js-router"),
];

/// The chaos fixtures in each language.
const CHAOS: [(&str, &str, &str); 3] = [
    ("rust", "fixtures/chaos.wasm", "chaos-rust"),
    ("python", "fixtures/chaos-python.wasm", "chaos-python"),
    ("javascript", "fixtures/chaos-js.wasm", "chaos-javascript"),
];

#[derive(Deserialize)]
struct Table {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    event: Value,
    #[serde(default)]
    config: BTreeMap<String, String>,
    expect: Value,
}

fn table() -> Table {
    let file = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/conformance/routing.json");
    serde_json::from_str(&std::fs::read_to_string(&file).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", file.display()))
}

/// The tenant a conformance case runs as, for one guest: each has the case's configuration.
fn case_tenant(guest: &str, case: usize) -> String {
    format!("{guest}-case-{case}")
}

/// A plugin directory (kept for the whole run) holding every router, chaos fixture and
/// starter under its plugin name.
fn plugin_dir() -> PathBuf {
    let services = Services::get();
    let dir = tempfile::Builder::new()
        .prefix("guests-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap()
        .keep();
    for (_, file, name) in ROUTERS.iter().chain(&CHAOS) {
        std::fs::copy(
            services.plugins.join(file),
            dir.join(format!("{name}.wasm")),
        )
        .unwrap();
    }
    for starter in ["starter-router", "starter-templater"] {
        std::fs::copy(
            services.plugins.join(format!("starters/{starter}.wasm")),
            dir.join(format!("{starter}.wasm")),
        )
        .unwrap();
    }
    dir
}

/// One host for the whole run, with every guest loaded (compiling a Python or JavaScript
/// component takes seconds; this fills the shared cache the other hosts and engines read).
/// Tenants: one per guest and conformance case, and `<guest>-a` / `<guest>-b` on each chaos
/// fixture.
async fn host() -> &'static PluginHost {
    static HOST: OnceCell<PluginHost> = OnceCell::const_new();
    HOST.get_or_init(|| async {
        let mut tenants = BTreeMap::new();
        for (guest, _, name) in ROUTERS {
            for (i, case) in table().cases.iter().enumerate() {
                tenants.insert(
                    case_tenant(guest, i),
                    TenantConfig {
                        plugin: Some(name.into()),
                        config: case.config.clone(),
                        ..TenantConfig::default()
                    },
                );
            }
        }
        for (guest, _, name) in CHAOS {
            for side in ["a", "b"] {
                tenants.insert(
                    format!("{guest}-{side}"),
                    TenantConfig {
                        plugin: Some(name.into()),
                        ..TenantConfig::default()
                    },
                );
            }
        }
        let config = PluginConfig {
            dir: plugin_dir(),
            cache_dir: plugin_cache_dir(),
            // A busy CI box: the wall clock is not what these tests are about.
            timeout_ms: 5_000,
            // Room for every tenant's instance: the isolation test counts on reuse, and the
            // conformance test, running beside it, warms ~70 tenants.
            max_idle_instances: 1_000,
            ..PluginConfig::default()
        };
        let host = PluginHost::new(config, tenants).unwrap();
        for loaded in host.load_dir().await.unwrap() {
            assert_eq!(
                loaded.outcome.label(),
                "loaded",
                "{}: {:?}",
                loaded.name,
                loaded.outcome
            );
        }
        host
    })
    .await
}

fn envelope_of(mut event: Value, tenant: &str) -> Event {
    event["tenant"] = tenant.into();
    envelope::decode(Some(event.to_string().as_bytes()), &[], 1 << 20).unwrap()
}

/// The decision as the table writes it: `{"deliveries": [...]}` or `{"error": {kind, message}}`.
fn as_table_row(result: Result<notify_engine::plugin::Decision, PluginError>) -> Value {
    match result {
        Ok(decision) => json!({ "deliveries": decision.deliveries }),
        Err(e) => {
            let message = match &e {
                PluginError::InvalidEvent { message, .. } | PluginError::Failed { message, .. } => {
                    message.clone()
                }
                other => other.to_string(),
            };
            json!({ "error": { "kind": e.kind(), "message": message } })
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_rules_decide_alike_in_rust_python_and_javascript() {
    let host = host().await;
    let table = table();
    assert!(table.cases.len() >= 20, "a table worth the name");
    let mut failures = Vec::new();
    for (guest, _, plugin) in ROUTERS {
        for (i, case) in table.cases.iter().enumerate() {
            let result = host
                .route(&envelope_of(case.event.clone(), &case_tenant(guest, i)))
                .await;
            if let Ok(decision) = &result {
                assert_eq!(decision.plugin, plugin, "routed by the guest's own plugin");
            }
            let got = as_table_row(result);
            if got != case.expect {
                failures.push(format!(
                    "{guest}: {}\n  expected {}\n  got      {}",
                    case.name, case.expect, got
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} decisions differ from the table:\n{}",
        failures.len(),
        table.cases.len() * ROUTERS.len(),
        failures.join("\n")
    );
}

fn chaos_event(id: &str, mode: Option<&str>) -> Value {
    let mut data = json!({ "user_id": "u1" });
    if let Some(mode) = mode {
        data["chaos"] = mode.into();
    }
    event(id, "placeholder", "anything", data)
}

/// The body of the single in-app item a chaos call returned.
fn remembered(result: Result<notify_engine::plugin::Decision, PluginError>) -> String {
    let decision = result.expect("a remember call succeeds");
    let row = json!({ "deliveries": decision.deliveries });
    row["deliveries"][0]["body"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_instances_keep_no_state_across_tenants_or_after_a_trap() {
    let host = host().await;
    for (guest, _, _) in CHAOS {
        let (a, b) = (format!("{guest}-a"), format!("{guest}-b"));
        let call = |tenant: &str, id: &str, mode: &str| {
            let event = envelope_of(chaos_event(id, Some(mode)), tenant);
            async move { host.route(&event).await }
        };
        // The first call of tenant a finds nothing; its next call runs on the same warm
        // instance, which still holds what the first left in its global.
        assert_eq!(
            remembered(call(&a, "a1", "remember").await),
            "nothing",
            "{guest}"
        );
        assert_eq!(
            remembered(call(&a, "a2", "remember").await),
            format!("{a}/a1"),
            "{guest}: instances are reused within a tenant"
        );
        // Tenant b, on the same plugin version, never sees tenant a's global.
        assert_eq!(
            remembered(call(&b, "b1", "remember").await),
            "nothing",
            "{guest}: tenant a's state leaked to tenant b"
        );
        assert_eq!(
            remembered(call(&b, "b2", "remember").await),
            format!("{b}/b1"),
            "{guest}"
        );
        // A call that writes the global and then traps: its instance is gone, and with it
        // both what it wrote and what earlier calls left.
        let trapped = call(&a, "a3", "remember_then_trap").await;
        assert!(
            matches!(trapped, Err(PluginError::Trap { .. })),
            "{guest}: {trapped:?}"
        );
        assert_eq!(
            remembered(call(&a, "a4", "remember").await),
            "nothing",
            "{guest}: state survived a trap"
        );
        // A refusal is the plugin's answer, not a malfunction: the instance serves on.
        assert!(
            matches!(
                call(&a, "a5", "error").await,
                Err(PluginError::Failed { .. })
            ),
            "{guest}"
        );
        assert_eq!(
            remembered(call(&a, "a6", "remember").await),
            format!("{a}/a4"),
            "{guest}"
        );
        // Tenant b's instance was never touched by any of it.
        assert_eq!(
            remembered(call(&b, "b3", "remember").await),
            format!("{b}/b2"),
            "{guest}"
        );
    }
}

/// Loop, memory growth and stack overflow in the Python and JavaScript guests (the Rust
/// guest's are in `plugin_sandbox_enforces_every_limit`): each stopped with its reason, and
/// the next call of the same tenant works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sandbox_holds_python_and_javascript_guests_too() {
    // The shared host compiled the fixtures into the cache these hosts load from.
    host().await;
    let services = Services::get();
    for (guest, file, _) in &CHAOS[1..] {
        let load = |limits: PluginConfig| {
            let services = services.clone();
            async move {
                let host = PluginHost::new(
                    PluginConfig {
                        cache_dir: plugin_cache_dir(),
                        ..limits
                    },
                    Default::default(),
                )
                .unwrap();
                host.load_single(&services.plugins.join(file))
                    .await
                    .unwrap();
                host
            }
        };
        let run = |host: &'static PluginHost, mode: Option<&'static str>| async move {
            host.route(&envelope_of(chaos_event("h1", mode), "hostile"))
                .await
        };
        // Production limits: an endless loop runs out of fuel.
        let production: &'static PluginHost = Box::leak(Box::new(
            load(PluginConfig {
                timeout_ms: 10_000,
                ..PluginConfig::default()
            })
            .await,
        ));
        assert!(run(production, None).await.is_ok(), "{guest}");
        let looped = run(production, Some("loop")).await;
        assert!(
            matches!(looped, Err(PluginError::OutOfFuel { .. })),
            "{guest}: {looped:?}"
        );
        assert!(
            run(production, None).await.is_ok(),
            "{guest}: after the loop"
        );

        // With fuel to spare, the memory cap and the stack are what stop them, and the wall
        // clock stops a loop.
        let generous: &'static PluginHost = Box::leak(Box::new(
            load(PluginConfig {
                fuel: 20_000_000_000,
                timeout_ms: 1_000,
                ..PluginConfig::default()
            })
            .await,
        ));
        match run(generous, Some("oom")).await {
            Err(PluginError::Trap { message, .. }) => {
                assert!(
                    message.starts_with("memory limit exceeded"),
                    "{guest}: {message}"
                )
            }
            other => panic!("{guest}: expected the memory limit, got {other:?}"),
        }
        assert!(
            run(generous, None).await.is_ok(),
            "{guest}: after running out of memory"
        );
        // Endless recursion: the interpreter's frames fill the memory cap, or its own
        // recursion guard throws; either way a trap, never the host's stack.
        let recursed = run(generous, Some("recurse")).await;
        assert!(
            matches!(recursed, Err(PluginError::Trap { .. })),
            "{guest}: {recursed:?}"
        );
        assert!(
            run(generous, None).await.is_ok(),
            "{guest}: after the recursion"
        );
        let looped = run(generous, Some("loop")).await;
        assert!(
            matches!(looped, Err(PluginError::Timeout { retried: true, .. })),
            "{guest}: {looped:?}"
        );
        assert!(
            run(generous, None).await.is_ok(),
            "{guest}: after the timeout"
        );
        // An exception the plugin does not catch traps the call; the reason leads with the cause.
        match run(generous, Some("trap")).await {
            Err(PluginError::Trap { message, .. }) => {
                assert!(message.starts_with("wasm trap"), "{guest}: {message}")
            }
            other => panic!("{guest}: expected a trap, got {other:?}"),
        }
    }
}

/// The `cargo component` starters load in the worlds they name and do what they say.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cargo_component_starters_load_and_run() {
    let host = host().await;
    let infos = host.list();
    for (starter, world) in [
        ("starter-router", "routing"),
        ("starter-templater", "templating"),
    ] {
        let info = infos
            .iter()
            .find(|i| i.plugin == starter)
            .unwrap_or_else(|| panic!("{starter} not loaded"));
        assert_eq!(info.state, "serving", "{starter}");
        assert_eq!(info.world.map(|w| w.as_str()), Some(world), "{starter}");
        assert_eq!(info.wit_version, Some("notify:plugin@0.2.0"), "{starter}");
    }
    let routed = PluginHost::new(
        PluginConfig {
            cache_dir: plugin_cache_dir(),
            ..PluginConfig::default()
        },
        Default::default(),
    )
    .unwrap();
    routed
        .load_single(&Services::get().plugins.join("starters/starter-router.wasm"))
        .await
        .unwrap();
    let paid = order_paid("s1", "starter", "u-9", None, 10.0);
    let decision = routed
        .route(&envelope::decode(Some(paid.to_string().as_bytes()), &[], 1 << 20).unwrap())
        .await
        .unwrap();
    assert_eq!(
        json!(decision.deliveries),
        json!([{"kind": "in_app", "user_id": "u-9", "title": "Payment received",
                "body": "Thank you: order A-s1 is paid.", "category": "billing",
                "data": {"order_id": "A-s1"}}])
    );
}

/// Through the whole engine: an event of a tenant routed by the Python plugin and one of a
/// tenant routed by the JavaScript plugin reach their users' SSE streams and Mailpit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_and_javascript_plugins_route_to_sse_and_email() {
    host().await;
    let world = World::new().await;
    let python = unique("py");
    let javascript = unique("js");
    world.install_plugin("guests/python-router.wasm", &format!("{python}.wasm"));
    world.install_plugin("guests/js-router.wasm", &format!("{javascript}.wasm"));
    let engine = world.start(world.config()).await;
    let mailpit = Mailpit::new(&world.services);
    for (tenant, amount, shown) in [(&python, 42.0, "42.00 EUR"), (&javascript, 7.5, "7.50 EUR")] {
        let address = format!("{}@example.test", unique("buyer"));
        let (status, sse, _) = connect_sse(&engine, Some(&world.token(tenant, "u1")), None).await;
        assert_eq!(status, 200);
        let mut sse = sse.unwrap();
        world
            .produce(&order_paid("g1", tenant, "u1", Some(&address), amount))
            .await;
        let n = sse.next(WAIT).await.expect("a notification over SSE");
        assert_eq!(n.event, "notification");
        assert_eq!(n.data["title"], "Payment received");
        assert_eq!(
            n.data["body"],
            format!("We received your payment of {shown} for order A-g1.")
        );
        let mails = mailpit.wait_for(&address, 1, WAIT).await;
        assert!(
            mails[0].text.contains("A-g1"),
            "{tenant}: {:?}",
            mails[0].text
        );
        let plugin: String = sqlx::query_scalar(
            "SELECT plugin FROM processed_events WHERE tenant_id = $1 AND event_id = 'g1'",
        )
        .bind(tenant)
        .fetch_one(&world.pool().await)
        .await
        .unwrap();
        assert_eq!(&plugin, tenant, "routed by the tenant's own plugin file");
    }
    // Each tenant's instance stays warm for its next event.
    let warm = metric(&engine, "notify_plugin_warm_instances")
        .await
        .expect("the warm-instance gauge");
    assert!(warm >= 2.0, "{warm} warm instances");
    engine.shutdown().await;
}

/// The idle set's bounds: `plugins.max_idle_instances` (least recently used dropped first)
/// and `plugins.instance_max_calls` (an instance that served that many calls is replaced),
/// and a reload that drops the idle instances of a version no longer serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_instances_are_bounded_and_recycled() {
    let services = Services::get();
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        services.plugins.join("fixtures/chaos.wasm"),
        dir.path().join("default.wasm"),
    )
    .unwrap();
    let host = PluginHost::new(
        PluginConfig {
            dir: dir.path().to_owned(),
            max_idle_instances: 2,
            instance_max_calls: 3,
            ..PluginConfig::default()
        },
        Default::default(),
    )
    .unwrap();
    host.load_dir().await.unwrap();
    let call = |tenant: &str, id: &str| {
        let event = envelope_of(chaos_event(id, Some("remember")), tenant);
        let host = &host;
        async move { remembered(host.route(&event).await) }
    };
    // Three tenants, room for two: the least recently used (t1) is dropped.
    assert_eq!(call("t1", "1").await, "nothing");
    assert_eq!(call("t2", "2").await, "nothing");
    assert_eq!(call("t3", "3").await, "nothing");
    assert_eq!(host.warm_instances(), 2);
    assert_eq!(
        call("t1", "4").await,
        "nothing",
        "t1's instance was evicted"
    );
    assert_eq!(call("t3", "5").await, "t3/3", "t3's instance is warm");
    // t3's instance has served 2 calls; its third is its last, then a fresh one.
    assert_eq!(call("t3", "6").await, "t3/5");
    assert_eq!(call("t3", "7").await, "nothing", "recycled after 3 calls");
    // A new version replaces every idle instance of the old one.
    std::fs::copy(
        services.plugins.join("fixtures/chaos.wasm"),
        dir.path().join("default.wasm.tmp"),
    )
    .unwrap();
    let mut bytes = std::fs::read(dir.path().join("default.wasm.tmp")).unwrap();
    // A custom section appended: the same code, another SHA-256, hence another version.
    bytes.extend_from_slice(&[0x00, 0x04, 0x01, b'x', 0x00, 0x00]);
    std::fs::write(dir.path().join("default.wasm"), bytes).unwrap();
    std::fs::remove_file(dir.path().join("default.wasm.tmp")).unwrap();
    let reloaded = host.load_dir().await.unwrap();
    assert_eq!(reloaded[0].outcome.label(), "loaded", "{reloaded:?}");
    assert_eq!(host.warm_instances(), 0);
    assert_eq!(call("t3", "8").await, "nothing");
}
