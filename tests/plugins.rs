//! Routing plugins in the engine: the sandbox's limits, failing and missing plugins, the
//! breaker's quarantine, a component of an older WIT version, the precompiled cache, and the
//! developer's `plugin run` / `plugin check`. Reloading under a running engine is in
//! `reload.rs`; the Python and JavaScript guests in `guests.rs`.

use std::path::Path;

use notify_engine::config::{PluginConfig, TenantConfig};
use notify_engine::plugin::PluginHost;
use serde_json::json;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_plugins_dead_letter_while_other_tenants_flow() {
    let world = World::new().await;
    let chaos = unique("chaos");
    world.install_chaos_plugin(&chaos);
    let mut config = world.config();
    // A budget of fuel no loop reaches within the time limit: the wall clock must stop it.
    config.plugins.fuel = u64::MAX / 2;
    config.plugins.timeout_ms = 100;
    let engine = world.start(config).await;
    let tenant = unique("shop");
    let (_, sse, _) = connect_sse(&engine, Some(&world.token(&tenant, "u1")), None).await;
    let mut sse = sse.unwrap();

    let chaos_event = |id: &str, what: &str| {
        let mut data = json!({"user_id": "u1"});
        if what != "none" {
            data["chaos"] = what.into();
        }
        event(id, &chaos, "order_paid", data)
    };
    world.produce(&chaos_event("c-trap", "trap")).await;
    world
        .produce(&order_paid("ok1", &tenant, "u1", None, 1.0))
        .await;
    world.produce(&chaos_event("c-loop", "loop")).await;
    world
        .produce(&order_paid("ok2", &tenant, "u1", None, 1.0))
        .await;
    world.produce(&chaos_event("c-fine", "none")).await;

    for want in ["ok1", "ok2"] {
        let e = sse.next(WAIT).await.expect("other tenant keeps flowing");
        assert_eq!(e.data["event_id"], want);
    }
    world
        .wait_count("SELECT count(*) FROM dead_letters", 2, WAIT)
        .await;
    let pool = world.pool().await;
    let rows: Vec<(String, String, String)> =
        sqlx::query_as("SELECT event_id, error_kind, reason FROM dead_letters ORDER BY event_id")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(rows[0].0, "c-loop");
    assert_eq!(rows[0].1, "plugin_timeout", "{}", rows[0].2);
    assert!(rows[0].2.contains("100 ms"), "{}", rows[0].2);
    // A timeout counts only when a retry on a fresh instance times out too.
    assert!(rows[0].2.contains("twice"), "{}", rows[0].2);
    assert_eq!(rows[1].0, "c-trap");
    assert_eq!(rows[1].1, "plugin_trap", "{}", rows[1].2);
    // The chaos tenant's well-behaved event still went through its plugin.
    world
        .wait_count(
            "SELECT count(*) FROM notifications WHERE event_id = 'c-fine'",
            1,
            WAIT,
        )
        .await;
    let (plugin, outcome): (String, String) =
        sqlx::query_as("SELECT plugin, outcome FROM processed_events WHERE event_id = 'c-loop'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(
        (plugin.as_str(), outcome.as_str()),
        (chaos.as_str(), "dead_lettered")
    );
    engine.shutdown().await;
}

/// The sandbox's limits, on the real chaos component (no Kafka needed for this one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_sandbox_enforces_every_limit() {
    use notify_engine::ingest::envelope;
    use notify_engine::plugin::{PluginError, PluginHost};

    let services = Services::get();
    // A generous wall clock, so the fuel budget is what stops the loop even on a busy box.
    let limits = notify_engine::config::PluginConfig {
        timeout_ms: 10_000,
        ..Default::default()
    };
    let host = PluginHost::new(limits.clone(), Default::default()).unwrap();
    host.load_single(&services.plugins.join("fixtures/chaos.wasm"))
        .await
        .unwrap();
    let run = |what: &str| {
        let mut data = json!({"user_id": "u1"});
        if what != "none" {
            data["chaos"] = what.into();
        }
        let raw = event("e1", "t1", "order_paid", data);
        let e = envelope::decode(Some(raw.to_string().as_bytes()), &[], 1 << 20).unwrap();
        let host = &host;
        async move { host.route(&e).await }
    };

    let ok = run("none").await.expect("a well-behaved call");
    assert_eq!(ok.deliveries.len(), 1);
    assert!(ok.cost.fuel > 0 && ok.cost.fuel < limits.fuel);
    assert!(ok.cost.memory_bytes > 0 && ok.cost.memory_bytes <= limits.memory_bytes);

    match run("trap").await {
        // The panic message reaches the reason through the captured stderr.
        Err(PluginError::Trap { message, .. }) => {
            assert!(message.contains("chaos: trap requested"), "{message}")
        }
        other => panic!("expected a trap, got {other:?}"),
    }
    assert!(matches!(
        run("loop").await,
        Err(PluginError::OutOfFuel { .. })
    ));
    match run("oom").await {
        Err(PluginError::Trap { message, .. }) => {
            assert!(message.contains("memory limit"), "{message}")
        }
        other => panic!("expected a memory trap, got {other:?}"),
    }
    // Deep recursion: a Rust guest's shadow stack (linear memory) overflows first, an
    // out-of-bounds trap; a guest without one exhausts wasmtime's call stack.
    match run("recurse").await {
        Err(PluginError::Trap { message, .. }) => assert!(
            message.contains("out of bounds memory access")
                || message.contains("call stack exhausted"),
            "{message}"
        ),
        other => panic!("expected a stack overflow trap, got {other:?}"),
    }
    match run("error").await {
        Err(PluginError::Failed { message, .. }) => assert!(message.contains("chaos"), "{message}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    for bad in ["bad_output", "huge_output"] {
        let result = run(bad).await;
        assert!(
            matches!(result, Err(PluginError::InvalidOutput { .. })),
            "{bad}: {result:?}"
        );
    }
    // The instance of a failed call is gone: the next call starts clean.
    assert!(run("none").await.is_ok());

    // Oversized input never reaches the plugin.
    let big = event(
        "e2",
        "t1",
        "order_paid",
        json!({"user_id": "u1", "pad": "x".repeat(300 * 1024)}),
    );
    let e = envelope::decode(Some(big.to_string().as_bytes()), &[], 1 << 20).unwrap();
    assert!(matches!(
        host.route(&e).await,
        Err(PluginError::InputTooLarge { .. })
    ));
}

/// What the host refuses to load, with the reason instead of loading it: a file that is not
/// a component, a component importing what plugins are not granted (naming the import), and
/// a valid component of another world (naming the world). No Kafka needed for this one either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_host_refuses_what_is_not_a_plugin_component() {
    let host = PluginHost::new(PluginConfig::default(), Default::default()).unwrap();

    // A file that is not a component is rejected with a reason, not loaded.
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.wasm");
    std::fs::write(&junk, b"\0asm not really").unwrap();
    let err = host.load_single(&junk).await.unwrap_err();
    assert!(
        err.message.contains("not a valid WebAssembly component"),
        "{err}"
    );

    // A component importing what plugins are not granted is refused, naming the import.
    for import in [
        "wasi:sockets/tcp@0.2.0",
        "wasi:filesystem/preopens@0.2.0",
        "wasi:http/outgoing-handler@0.2.0",
        "acme:backdoor/shell",
    ] {
        let forbidden = dir.path().join("forbidden.wasm");
        let bytes =
            wat::parse_str(format!("(component (import \"{import}\" (instance)))")).unwrap();
        std::fs::write(&forbidden, bytes).unwrap();
        let err = host.load_single(&forbidden).await.unwrap_err();
        assert!(
            err.message
                .contains(&format!("imports {import}, which plugins are not granted")),
            "{import}: {err}"
        );
    }
    // A valid component of another world: refused, naming the world.
    let other = dir.path().join("other.wasm");
    std::fs::write(&other, wat::parse_str("(component)").unwrap()).unwrap();
    let err = host.load_single(&other).await.unwrap_err();
    assert!(
        err.message
            .contains("implements no plugin world: it must export notify:plugin/router"),
        "{err}"
    );
}

/// Platform failures are not the event's outcome. Without a default plugin the batch waits
/// (not ready, nothing claimed) and flows once the plugin is in place; a tenant whose
/// configured plugin is missing is neither routed by the default plugin nor claimed: its
/// event is set aside, so republishing it later works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_plugins_stall_or_park_and_never_claim() {
    let world = World::new().await;
    std::fs::remove_file(world.plugin_dir.path().join("default.wasm")).unwrap();
    let ghost = unique("ghost");
    let mut config = world.config();
    config.tenants.insert(
        ghost.clone(),
        TenantConfig {
            plugin: Some("ghost-router".into()),
            config: Default::default(),
            ..TenantConfig::default()
        },
    );
    let engine = world.start(config).await;

    world
        .produce(&order_paid("g1", &ghost, "u1", None, 1.0))
        .await;
    world
        .wait_count(
            "SELECT count(*) FROM dead_letters WHERE event_id = 'g1' AND error_kind = 'plugin_unavailable'",
            1,
            WAIT,
        )
        .await;
    let pool = world.pool().await;
    let (reason,): (String,) =
        sqlx::query_as("SELECT reason FROM dead_letters WHERE event_id = 'g1'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(reason.contains("ghost-router.wasm"), "{reason}");
    assert_eq!(
        world
            .count("SELECT count(*) FROM processed_events WHERE event_id = 'g1'")
            .await,
        0,
        "a parked event is not claimed"
    );

    let tenant = unique("shop");
    world
        .produce(&order_paid("p1", &tenant, "u1", None, 1.0))
        .await;
    eventually(
        "the pipeline stalls on the missing default plugin",
        async || engine.health.snapshot().stall.is_some(),
    )
    .await;
    // A stalled lane is on the status report; the routes still serve.
    assert_eq!(readyz(engine.admin_addr).await.0, 200);
    let body = status(engine.admin_addr).await;
    assert_eq!(body["status"], "degraded", "{body}");
    assert_eq!(body["checks"]["plugins"]["default"], "missing", "{body}");
    assert!(
        body["checks"]["pipeline"]
            .as_str()
            .unwrap()
            .starts_with("stalled: plugin"),
        "{body}"
    );
    assert_eq!(
        world
            .count("SELECT count(*) FROM processed_events WHERE event_id = 'p1'")
            .await,
        0
    );
    assert_eq!(world.count("SELECT count(*) FROM dead_letters").await, 1);

    // The operator puts the default plugin in place: the waiting event is routed.
    world.install_plugin("default.wasm", "default.wasm");
    world
        .wait_count(
            "SELECT count(*) FROM notifications WHERE event_id = 'p1'",
            1,
            WAIT,
        )
        .await;
    assert_eq!(world.count("SELECT count(*) FROM dead_letters").await, 1);
    eventually("the status report recovers", async || {
        status(engine.admin_addr).await["status"] == "ok"
    })
    .await;
    engine.shutdown().await;
}

/// A bad build is quarantined by its breaker after consecutive failures: the tenant's next
/// events are set aside unclaimed (fail mode `dead_letter`) instead of each going through
/// the broken plugin, and publishing a new version closes the breaker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_plugin_is_quarantined_until_a_new_version_arrives() {
    let world = World::new().await;
    let tenant = unique("bad");
    world.install_chaos_plugin(&tenant);
    let mut config = world.config();
    config.plugins.breaker_failures = 3;
    let engine = world.start(config).await;
    let chaos = |id: &str, what: Option<&str>| {
        let mut data = serde_json::json!({"user_id": "u1"});
        if let Some(what) = what {
            data["chaos"] = what.into();
        }
        event(id, &tenant, "order_paid", data)
    };
    for i in 0..3 {
        world.produce(&chaos(&format!("t{i}"), Some("trap"))).await;
    }
    world
        .wait_count(
            "SELECT count(*) FROM dead_letters WHERE error_kind = 'plugin_trap'",
            3,
            WAIT,
        )
        .await;
    // Open: even a well-behaved event is not handed to this build any more.
    world.produce(&chaos("q1", None)).await;
    world
        .wait_count(
            "SELECT count(*) FROM dead_letters WHERE event_id = 'q1' AND error_kind = 'plugin_quarantined'",
            1,
            WAIT,
        )
        .await;
    assert_eq!(
        world
            .count("SELECT count(*) FROM processed_events WHERE event_id = 'q1'")
            .await,
        0,
        "set aside, not claimed"
    );
    // Readiness shows it (refreshed by the background probe).
    eventually("readiness lists the quarantined plugin", async || {
        let quarantined = engine.health.snapshot().plugins.quarantined;
        quarantined.iter().any(|q| q.starts_with(&tenant))
    })
    .await;

    // A new version (here: the default router's build) closes the breaker.
    install_build(&world, &engine, &tenant, "default.wasm").await;
    world
        .produce(&order_paid("q2", &tenant, "u1", None, 1.0))
        .await;
    world
        .wait_count(
            "SELECT count(*) FROM notifications WHERE event_id = 'q2'",
            1,
            WAIT,
        )
        .await;
    engine.shutdown().await;
}

/// Fail mode `default`: a quarantined tenant's events are routed by the default plugin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quarantined_plugin_can_fall_back_to_the_default_plugin() {
    use notify_engine::config::{BreakerFailMode, PluginConfig};
    use notify_engine::ingest::envelope;
    use notify_engine::plugin::{PluginError, PluginHost};

    let services = Services::get();
    let dir = services.plugin_dir(&[
        ("default.wasm", "default.wasm"),
        ("fixtures/chaos.wasm", "t1.wasm"),
    ]);
    let limits = PluginConfig {
        dir: dir.path().to_owned(),
        breaker_failures: 2,
        breaker_fail_mode: BreakerFailMode::Default,
        ..Default::default()
    };
    let host = PluginHost::new(limits, Default::default()).unwrap();
    host.load_dir().await.unwrap();
    let run = |chaos: Option<&str>| {
        let mut data = serde_json::json!({"user_id": "u1", "order_id": "A-1", "amount": 1.0, "currency": "EUR"});
        if let Some(c) = chaos {
            data["chaos"] = c.into();
        }
        let raw = event("e1", "t1", "order_paid", data);
        envelope::decode(Some(raw.to_string().as_bytes()), &[], 1 << 20).unwrap()
    };
    for _ in 0..2 {
        assert!(matches!(
            host.route(&run(Some("bad_output"))).await,
            Err(PluginError::InvalidOutput { .. })
        ));
    }
    let decision = host.route(&run(None)).await.unwrap();
    assert_eq!(decision.plugin, "default", "routed by the default plugin");
    assert_eq!(host.health().quarantined.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_0_1_0_routing_component_still_loads_and_routes() {
    let fixture =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/default-router-0.1.0.wasm");
    let limits = PluginConfig::default();
    let check = notify_engine::tools::check_plugin(limits.clone(), &fixture)
        .await
        .unwrap();
    assert_eq!(check.world, "notify:plugin/routing");
    assert_eq!(check.wit_version, "notify:plugin@0.1.0");
    let host = PluginHost::new(limits, Default::default()).unwrap();
    host.load_single(&fixture).await.unwrap();
    let bytes = serde_json::to_vec(&order_paid(
        "old1",
        "shop",
        "u1",
        Some("a@example.test"),
        12.0,
    ))
    .unwrap();
    let event = notify_engine::ingest::envelope::decode(Some(&bytes), &[], 1 << 20).unwrap();
    let decision = host.route(&event).await.unwrap();
    let kinds: Vec<_> = decision
        .deliveries
        .iter()
        .map(|d| serde_json::to_value(d).unwrap()["kind"].clone())
        .collect();
    assert_eq!(kinds, [json!("in_app"), json!("email")]);
    match &decision.deliveries[1] {
        notify_engine::plugin::Delivery::Email {
            template, locale, ..
        } => {
            assert_eq!(template, "order_paid");
            // 0.1.0 knew no locale.
            assert_eq!(locale, &None);
        }
        other => panic!("{other:?}"),
    }
}

/// The precompiled cache: the first load writes it, a restart (a new engine) loads from it,
/// and a cache file it cannot use (another wasmtime's, or damaged) is compiled over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn precompiled_plugins_are_cached_outside_the_plugin_directory() {
    use notify_engine::config::PluginConfig;
    use notify_engine::ingest::envelope;
    use notify_engine::plugin::PluginHost;

    let services = Services::get();
    let dir = services.plugin_dir(&[("default.wasm", "default.wasm")]);
    let cache = tempfile::tempdir().unwrap();
    let limits = PluginConfig {
        dir: dir.path().to_owned(),
        cache_dir: cache.path().to_owned(),
        ..Default::default()
    };
    let raw = order_paid("c1", "t1", "u1", None, 1.0);
    let event = envelope::decode(Some(raw.to_string().as_bytes()), &[], 1 << 20).unwrap();
    let cached = || -> Vec<std::path::PathBuf> {
        std::fs::read_dir(cache.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "cwasm"))
            .collect()
    };

    let first = PluginHost::new(limits.clone(), Default::default()).unwrap();
    first.load_dir().await.unwrap();
    assert!(first.route(&event).await.is_ok());
    let files = cached();
    assert_eq!(files.len(), 1, "one precompiled plugin: {files:?}");
    let written = std::fs::metadata(&files[0]).unwrap().modified().unwrap();

    // A restart: loaded from the cache (the file is not rewritten), and it routes.
    let second = PluginHost::new(limits.clone(), Default::default()).unwrap();
    second.load_dir().await.unwrap();
    assert!(second.route(&event).await.is_ok());
    assert_eq!(
        std::fs::metadata(&files[0]).unwrap().modified().unwrap(),
        written
    );

    // A damaged cache file is not trusted: compiled again, and the cache repaired.
    std::fs::write(&files[0], b"not a precompiled component").unwrap();
    let third = PluginHost::new(limits, Default::default()).unwrap();
    third.load_dir().await.unwrap();
    assert!(third.route(&event).await.is_ok());
    assert!(std::fs::read(&files[0]).unwrap().len() > 1000, "rewritten");
}

/// A precompiled cache others can write into is never read: what is in it would run as
/// native code. At start-up the host refuses it with the reason; a cache that turns
/// writable later is ignored (the plugin compiled from its file), even when a planted file
/// sits under the name the real plugin's compilation would have.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_cache_others_can_write_is_never_read() {
    use std::os::unix::fs::PermissionsExt;

    use notify_engine::ingest::envelope;
    use sha2::{Digest, Sha256};

    let services = Services::get();
    let chmod = |path: &Path, mode: u32| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap()
    };
    let hex = |bytes: &[u8]| -> String {
        Sha256::digest(bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    };
    let root = tempfile::tempdir().unwrap();
    let cache = root.path().join("cache");
    let limits = |dir: &Path| PluginConfig {
        dir: dir.to_owned(),
        cache_dir: cache.clone(),
        ..Default::default()
    };

    // Start-up: a cache directory anyone may write is refused, naming it and why.
    std::fs::create_dir(&cache).unwrap();
    chmod(&cache, 0o777);
    let real = services.plugin_dir(&[("default.wasm", "default.wasm")]);
    let refused = PluginHost::new(limits(real.path()), Default::default())
        .err()
        .expect("a world-writable plugin cache is refused at start-up")
        .to_string();
    assert!(
        refused.contains("plugins.cache_dir") && refused.contains("writable by others"),
        "{refused}"
    );
    chmod(&cache, 0o700);

    // Native code to plant: the chaos fixture, compiled into the cache by a host of its own.
    let chaos = services.plugin_dir(&[("fixtures/chaos.wasm", "default.wasm")]);
    let host = PluginHost::new(limits(chaos.path()), Default::default()).unwrap();
    host.load_dir().await.unwrap();
    let chaos_hash = hex(&std::fs::read(chaos.path().join("default.wasm")).unwrap());
    let compiled = std::fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(&chaos_hash)
        })
        .expect("the chaos fixture's precompiled file");

    // A host started on a trusted cache; then the directory turns writable by others, and
    // the chaos code appears under the real default plugin's cache name.
    let host = PluginHost::new(limits(real.path()), Default::default()).unwrap();
    chmod(&cache, 0o777);
    let real_hash = hex(&std::fs::read(real.path().join("default.wasm")).unwrap());
    let planted = cache.join(
        compiled
            .file_name()
            .unwrap()
            .to_string_lossy()
            .replace(&chaos_hash, &real_hash),
    );
    std::fs::copy(&compiled, &planted).unwrap();
    chmod(&planted, 0o666);
    host.load_dir().await.unwrap();
    // The chaos code would trap on this event; the real default plugin routes it.
    let mut raw = order_paid("p1", "t1", "u1", None, 1.0);
    raw["data"]["chaos"] = "trap".into();
    let event = envelope::decode(Some(raw.to_string().as_bytes()), &[], 1 << 20).unwrap();
    let decision = host.route(&event).await;
    assert!(
        decision.is_ok(),
        "the planted native code ran: {:?}",
        decision.err()
    );
    chmod(&cache, 0o700);
}

/// The local runner a plugin developer uses: deliveries, logs and cost against the limits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_plugin_runner_reports_decision_and_cost() {
    let services = Services::get();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let limits = notify_engine::config::PluginConfig::default();
    let (ok, report) = notify_engine::tools::run_plugin(
        limits.clone(),
        &services.plugins.join("acme.wasm"),
        &root.join("samples/order_paid.json"),
        [("vip_threshold".to_string(), "500".to_string())].into(),
    )
    .await
    .unwrap();
    assert!(ok, "{report:#}");
    let deliveries = report["deliveries"].as_array().unwrap();
    let email = deliveries
        .iter()
        .find(|d| d["kind"] == "email")
        .expect("an email delivery");
    assert_eq!(email["template"], "order_paid");
    assert_eq!(email["data"]["vip"], true, "980 EUR is over the threshold");
    assert!(report["cost"]["fuel"].as_u64().unwrap() > 0);
    assert!(report["cost"]["memory_bytes"].as_u64().unwrap() > 0);
    assert_eq!(report["limits"]["fuel"], limits.fuel);
    assert!(
        !report["logs"].as_array().unwrap().is_empty(),
        "acme logs its decision"
    );

    // A refusal is reported, not thrown: the developer sees the plugin's reason.
    let (ok, report) = notify_engine::tools::run_plugin(
        limits,
        &services.plugins.join("acme.wasm"),
        &root.join("samples/order_paid.json"),
        [("currency".to_string(), "USD".to_string())].into(),
    )
    .await
    .unwrap();
    assert!(!ok);
    assert_eq!(report["error"]["kind"], "invalid_event", "{report:#}");
}

/// `plugin check`, the other half of the developer's tools: what the engine sees in a file
/// (its world, WIT version, exports, imports, digest and size), or why it would refuse it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_check_reports_what_the_engine_sees_or_why_it_refuses() {
    let services = Services::get();
    // `plugin check`: what the engine sees in a file, or why it would refuse it.
    let limits = notify_engine::config::PluginConfig::default();
    let check =
        notify_engine::tools::check_plugin(limits.clone(), &services.plugins.join("acme.wasm"))
            .await
            .unwrap();
    assert_eq!(check.world, "notify:plugin/routing");
    assert_eq!(check.wit_version, notify_engine::plugin::WIT_VERSIONS[0]);
    assert!(
        check
            .exports
            .iter()
            .any(|e| e == "notify:plugin/router@0.3.0"),
        "{check:?}"
    );
    assert!(
        check
            .imports
            .iter()
            .any(|i| i == "notify:plugin/host@0.3.0"),
        "{check:?}"
    );
    assert!(
        check
            .imports
            .iter()
            .any(|i| i == "notify:plugin/presence@0.3.0"),
        "{check:?}"
    );
    assert!(
        check.imports.iter().all(|i| !i.starts_with("wasi:sockets")),
        "{check:?}"
    );
    assert_eq!(check.sha256.len(), 64);
    assert!(check.size_bytes > 10_000);
    let dir = tempfile::tempdir().unwrap();
    let forbidden = dir.path().join("net.wasm");
    std::fs::write(
        &forbidden,
        wat::parse_str("(component (import \"wasi:sockets/tcp@0.2.0\" (instance)))").unwrap(),
    )
    .unwrap();
    let refusal = notify_engine::tools::check_plugin(limits, &forbidden)
        .await
        .unwrap_err()
        .to_string();
    assert!(refusal.contains("wasi:sockets/tcp@0.2.0"), "{refusal}");
}

/// The series of `notify_plugin_quarantined` for (tenant, plugin), if it is there.
async fn quarantined_series(engine: &notify_engine::app::Running, tenant: &str) -> Option<f64> {
    let text = reqwest::get(format!("http://{}/metrics", engine.admin_addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| l.starts_with("notify_plugin_quarantined{"))
        .find(|l| l.contains(&format!("tenant=\"{tenant}\"")) && l.contains("plugin=\"default\""))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// The breaker counts per (tenant, build): a tenant whose events keep breaking the shared
/// default plugin quarantines it for itself only; another tenant routed by the same build
/// keeps flowing. Readiness (still 200) and `notify_plugin_quarantined` show whose it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_tenant_quarantines_a_shared_plugin_for_itself_only() {
    let world = World::new().await;
    // The chaos fixture is the default plugin: both tenants are routed by this one build.
    world.install_plugin("fixtures/chaos.wasm", "default.wasm");
    let (noisy, quiet) = (unique("noisy"), unique("quiet"));
    let mut config = world.config();
    config.plugins.breaker_failures = 3;
    config
        .tenants
        .insert(noisy.clone(), TenantConfig::default());
    let engine = world.start(config).await;
    let chaos = |id: &str, tenant: &str, what: Option<&str>| {
        let mut data = json!({"user_id": "u1"});
        if let Some(what) = what {
            data["chaos"] = what.into();
        }
        event(id, tenant, "order_paid", data)
    };
    for i in 0..3 {
        world
            .produce(&chaos(&format!("trap{i}"), &noisy, Some("trap")))
            .await;
    }
    world
        .wait_count(
            "SELECT count(*) FROM dead_letters WHERE error_kind = 'plugin_trap'",
            3,
            WAIT,
        )
        .await;
    world.produce(&chaos("noisy-ok", &noisy, None)).await;
    world.produce(&chaos("quiet-ok", &quiet, None)).await;
    world
        .wait_count(
            "SELECT count(*) FROM dead_letters WHERE event_id = 'noisy-ok' AND error_kind = 'plugin_quarantined'",
            1,
            WAIT,
        )
        .await;
    world
        .wait_count(
            "SELECT count(*) FROM notifications WHERE event_id = 'quiet-ok'",
            1,
            WAIT,
        )
        .await;
    assert_eq!(
        world
            .count(&format!(
                "SELECT count(*) FROM dead_letters WHERE tenant_id <> '{noisy}'"
            ))
            .await,
        0,
        "nothing of the quiet tenant is set aside"
    );

    eventually(
        "the status report names the tenant's quarantine",
        async || {
            let body = status(engine.admin_addr).await;
            let listed = body["checks"]["plugins"]["quarantined"].clone();
            // One tenant's quarantine leaves the engine well.
            body["status"] == "ok"
                && listed.as_array().is_some_and(|l| {
                    l.len() == 1
                        && l[0].as_str().is_some_and(|q| {
                            q.starts_with("default (")
                                && q.contains(&format!("for tenant {noisy}: 3 consecutive"))
                        })
                })
        },
    )
    .await;
    assert_eq!(quarantined_series(&engine, &noisy).await, Some(1.0));
    assert_eq!(quarantined_series(&engine, &quiet).await, None);
    assert_eq!(
        quarantined_series(&engine, notify_engine::telemetry::OTHER_TENANTS).await,
        None
    );
    // The series is documented where operators look.
    let operating =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/operating.md"))
            .unwrap();
    assert!(operating.contains("`notify_plugin_quarantined{tenant,plugin}`"));
    engine.shutdown().await;
}

/// Output that is invalid because of what the event's data said (a recipient that is not
/// an address, a 500-byte order id in a title, a control character in a user id) is that
/// event's problem, never the plugin's: the email is recorded but not sent and the rest
/// delivered, or the event is set aside as an invalid event; none of it counts toward the
/// breaker, so the shared default plugin keeps serving every tenant, this one included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_with_bad_data_never_quarantine_the_default_plugin() {
    let world = World::new().await;
    let (careless, other) = (unique("careless"), unique("other"));
    let mut config = world.config();
    config.plugins.breaker_failures = 3;
    let engine = world.start(config).await;
    for i in 0..4 {
        world
            .produce(&order_paid(
                &format!("bad-address-{i}"),
                &careless,
                "u1",
                Some("not an address"),
                1.0,
            ))
            .await;
    }
    let long_id = "9".repeat(500);
    world
        .produce(&event(
            "long-id",
            &careless,
            "order_status_updated",
            json!({"user_id": "u1", "order_id": long_id, "status": "shipped"}),
        ))
        .await;
    world
        .produce(&order_paid("control", &careless, "u\u{1}", None, 1.0))
        .await;
    world
        .produce(&order_paid("careless-ok", &careless, "u1", None, 1.0))
        .await;
    world
        .produce(&order_paid("other-ok", &other, "u1", None, 1.0))
        .await;

    for id in ["careless-ok", "other-ok"] {
        world
            .wait_count(
                &format!("SELECT count(*) FROM notifications WHERE event_id = '{id}'"),
                1,
                WAIT,
            )
            .await;
    }
    // The bad address: the in-app item delivered, the email recorded with why not sent.
    world
        .wait_count(
            "SELECT count(*) FROM notifications WHERE event_id LIKE 'bad-address-%'",
            4,
            WAIT,
        )
        .await;
    let pool = world.pool().await;
    let emails: Vec<(String, String)> = sqlx::query_as(
        "SELECT status, last_error FROM email_outbox WHERE event_id LIKE 'bad-address-%'",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(emails.len(), 4);
    for (status, reason) in &emails {
        assert_eq!(status, "skipped");
        assert!(
            reason.starts_with("not sent: email recipient \"not an address\" is not an address")
                && reason.contains("from the event's data"),
            "{reason}"
        );
    }
    // The over-long order id and the control character: the event is invalid.
    world
        .wait_count(
            "SELECT count(*) FROM dead_letters WHERE event_id IN ('long-id', 'control')",
            2,
            WAIT,
        )
        .await;
    let rows: Vec<(String, String, String)> =
        sqlx::query_as("SELECT event_id, error_kind, reason FROM dead_letters ORDER BY event_id")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(rows.len(), 2, "{rows:?}");
    for (id, kind, reason) in &rows {
        assert_eq!(kind, "plugin_invalid_event", "{id}: {reason}");
        assert!(reason.contains("event's data"), "{id}: {reason}");
    }
    // In event id order: `control`, then `long-id`.
    assert!(rows[0].2.contains("user id"), "{}", rows[0].2);
    assert!(rows[1].2.contains("title"), "{}", rows[1].2);
    let body = status(engine.admin_addr).await;
    assert_eq!(body["status"], "ok", "{body}");
    assert_eq!(body["checks"]["plugins"]["quarantined"], json!([]));
    engine.shutdown().await;
}

/// A trap on a warm instance is retried once on a fresh one before it counts: memory the
/// instance's earlier calls left behind, not this event, may be what ran out. An instance
/// whose memory has grown near the cap is recycled after its call instead of reused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_instance_that_traps_is_retried_fresh_and_one_near_its_memory_cap_recycled() {
    use notify_engine::ingest::envelope;
    use notify_engine::plugin::Delivery;

    let services = Services::get();
    let dir = services.plugin_dir(&[("fixtures/chaos.wasm", "default.wasm")]);
    const MIB: usize = 1 << 20;
    let limits = PluginConfig {
        dir: dir.path().to_owned(),
        memory_bytes: 32 * MIB,
        cache_dir: plugin_cache_dir(),
        ..Default::default()
    };
    let host = PluginHost::new(limits, Default::default()).unwrap();
    host.load_dir().await.unwrap();
    // Routes one `grow` event; the body says how many chunks the instance now holds.
    let grow = async |tenant: &str, id: &str, mib: u32| {
        let raw = event(
            id,
            tenant,
            "order_paid",
            json!({"user_id": "u1", "chaos": "grow", "grow_mib": mib}),
        );
        let event = envelope::decode(Some(raw.to_string().as_bytes()), &[], 1 << 20).unwrap();
        let decision = host.route(&event).await;
        match decision.as_ref().map(|d| &d.deliveries[..]) {
            Ok([Delivery::InApp { body, .. }]) => body.clone(),
            other => panic!("{id}: {other:?}"),
        }
    };

    // 4 MiB held, then 28 more: the warm instance traps at the 32 MiB cap; a fresh one
    // has room for the 28.
    assert_eq!(grow("t1", "small", 4).await, "1");
    assert_eq!(
        grow("t1", "big", 28).await,
        "1",
        "retried on a fresh instance"
    );

    // 5 MiB per call: after the fifth the instance is over 3/4 of the cap, so the sixth
    // call starts on a fresh instance rather than on one a single step from its limit.
    for calls in 1..=5 {
        assert_eq!(grow("t2", &format!("g{calls}"), 5).await, calls.to_string());
    }
    assert_eq!(grow("t2", "g6", 5).await, "1", "recycled near the cap");
}
