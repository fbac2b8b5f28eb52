//! Hot reload on the real services: plugins and templates change under a running engine,
//! published by write-then-rename; a broken new version never replaces a working one.

use std::time::Duration;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugins_reload_live_and_a_broken_version_never_replaces_a_working_one() {
    let world = World::new().await;
    let engine = world.start(world.config()).await;
    let tenant = unique("live");
    let (_, sse, _) = connect_sse(&engine, Some(&world.token(&tenant, "u1")), None).await;
    let mut sse = sse.unwrap();
    let reloads = |outcome: &str| {
        engine
            .metrics
            .plugin_reloads
            .with_label_values(&[outcome])
            .get()
    };
    let mut next_title = async |id: &str| {
        world
            .produce(&order_paid(id, &tenant, "u1", None, 1.0))
            .await;
        let frame = sse.next(WAIT).await.expect("a notification");
        assert_eq!(frame.data["event_id"], id);
        frame.data["title"].as_str().unwrap().to_owned()
    };

    // No plugin of its own: the default plugin routes the tenant.
    assert_eq!(next_title("d1").await, "Payment received");

    // The tenant's own plugin appears: the next event is routed by it.
    let chaos = std::fs::read(world.services.plugins.join("fixtures/chaos.wasm")).unwrap();
    publish(world.plugin_dir.path(), &format!("{tenant}.wasm"), &chaos);
    eventually("the new plugin is loaded", async || reloads("loaded") >= 1).await;
    assert_eq!(next_title("c1").await, "chaos ok");

    // A broken new version: refused, reported, and the working one keeps serving.
    publish(
        world.plugin_dir.path(),
        &format!("{tenant}.wasm"),
        b"\0asm but not a component",
    );
    eventually("the broken version is rejected", async || {
        reloads("rejected") >= 1
    })
    .await;
    let rejected = engine.health.snapshot().plugins.rejected;
    assert!(
        rejected.iter().any(|r| r.starts_with(&tenant)),
        "{rejected:?}"
    );
    assert_eq!(next_title("c2").await, "chaos ok");

    // Which build decided is recorded per event.
    let pool = world.pool().await;
    let digests: Vec<(String, String)> = sqlx::query_as(
        "SELECT event_id, plugin_digest FROM processed_events WHERE tenant_id = $1 ORDER BY event_id",
    )
    .bind(&tenant)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(digests.len(), 3);
    assert_eq!(
        digests[0].1, digests[1].1,
        "c1 and c2: the same chaos build"
    );
    assert_ne!(digests[0].1, digests[2].1, "d1: the default plugin");

    // The file is deleted: the tenant falls back to the default plugin.
    std::fs::remove_file(world.plugin_dir.path().join(format!("{tenant}.wasm"))).unwrap();
    eventually("the plugin is removed", async || reloads("removed") >= 1).await;
    assert_eq!(next_title("d2").await, "Payment received");
    assert!(engine.health.snapshot().plugins.rejected.is_empty());
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn templates_reload_live_and_a_broken_edit_keeps_the_previous_set() {
    let world = World::new().await;
    let templates = tempfile::tempdir().unwrap();
    copy_dir(&world.services.templates, templates.path());
    let mut config = world.config();
    config.email.templates_dir = templates.path().to_owned();
    let engine = world.start(config).await;
    let reloads = |outcome: &str| {
        engine
            .metrics
            .template_reloads
            .with_label_values(&[outcome])
            .get()
    };
    let tenant = unique("shop");
    let address = format!("{}@example.test", unique("live"));
    let folder = templates.path().join(&tenant).join("order_paid");
    std::fs::create_dir_all(&folder).unwrap();
    eventually("the new tenant folder is seen", async || {
        reloads("loaded") >= 1
    })
    .await;
    let loaded = reloads("loaded");
    publish(&folder, "subject.hbs", b"Live v1 {{order_id}}");
    eventually("the edit is loaded", async || reloads("loaded") > loaded).await;
    world
        .produce(&order_paid("e1", &tenant, "u1", Some(&address), 1.0))
        .await;
    let mails = Mailpit::new(&world.services)
        .wait_for(&address, 1, WAIT)
        .await;
    assert_eq!(mails[0].subject, "Live v1 A-e1");

    // A broken edit: the tenant keeps v1, the problem is counted.
    publish(&folder, "subject.hbs", b"Live v2 {{#if order_id}}");
    eventually("the broken edit is rejected", async || {
        reloads("rejected") >= 1
    })
    .await;
    world
        .produce(&order_paid("e2", &tenant, "u1", Some(&address), 1.0))
        .await;
    let mails = Mailpit::new(&world.services)
        .wait_for(&address, 2, WAIT)
        .await;
    let mut subjects: Vec<_> = mails.iter().map(|m| m.subject.clone()).collect();
    subjects.sort();
    assert_eq!(subjects, ["Live v1 A-e1", "Live v1 A-e2"]);
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

/// Dead letters are replayed once the cause is fixed: an event dead-lettered by a trapping
/// plugin (and claimed) is routed again by the fixed plugin, and replaying it twice still
/// yields one outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_replay_once_the_cause_is_fixed() {
    use notify_engine::store::DeadLetterFilter;
    use notify_engine::tools;

    let world = World::new().await;
    let tenant = unique("fixme");
    world.install_chaos_plugin(&tenant);
    let config = world.config();
    let engine = world.start(config.clone()).await;
    let mut bad = order_paid("r1", &tenant, "u1", None, 5.0);
    bad["data"]["chaos"] = "trap".into();
    world.produce(&bad).await;
    // The same trouble for a CloudEvents binary-mode message: its attributes are headers,
    // which the dead letter keeps so the replay republishes the event whole.
    let time = chrono::Utc::now().to_rfc3339();
    let headers = [
        ("ce_specversion", "1.0"),
        ("ce_id", "r2"),
        ("ce_type", "order_paid"),
        ("ce_source", "/payments"),
        ("ce_time", time.as_str()),
        ("ce_tenant", tenant.as_str()),
    ];
    world
        .produce_with_headers(
            &world.topic_paid,
            None,
            bad["data"].to_string().as_bytes(),
            &headers,
        )
        .await;
    world
        .wait_count(
            "SELECT count(*) FROM dead_letters WHERE event_id IN ('r1', 'r2') AND error_kind = 'plugin_trap'",
            2,
            WAIT,
        )
        .await;

    // The fix: the tenant's plugin is replaced by one that handles the event.
    install_build(&world, &engine, &tenant, "default.wasm").await;

    let filter = DeadLetterFilter {
        tenant: Some(tenant.clone()),
        limit: 100,
        ..Default::default()
    };
    let listed = tools::list_dead_letters(&config.database, &filter)
        .await
        .unwrap();
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0].error_kind, "plugin_trap");
    let mut ids: Vec<_> = listed.iter().filter_map(|l| l.event_id.clone()).collect();
    ids.sort();
    assert_eq!(ids, ["r1", "r2"]);

    // Twice, back to back: one outcome.
    for _ in 0..2 {
        tools::replay_dead_letters(&config.kafka, &config.database, &filter)
            .await
            .unwrap();
    }
    world
        .wait_count(
            "SELECT count(*) FROM notifications WHERE event_id IN ('r1', 'r2')",
            2,
            WAIT,
        )
        .await;
    world
        .wait_count(
            "SELECT count(*) FROM dead_letters WHERE event_id = 'r1' AND replayed_at IS NOT NULL",
            1,
            WAIT,
        )
        .await;
    // Let the second replay message arrive too, then check nothing changed.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        world
            .count("SELECT count(*) FROM notifications WHERE event_id = 'r1'")
            .await,
        1
    );
    let (outcome,): (String,) =
        sqlx::query_as("SELECT outcome FROM processed_events WHERE event_id = 'r1'")
            .fetch_one(&world.pool().await)
            .await
            .unwrap();
    assert_eq!(outcome, "routed");
    let again = tools::replay_dead_letters(&config.kafka, &config.database, &filter)
        .await
        .unwrap();
    assert_eq!(again, 0, "a replayed dead letter is not replayed again");

    // A message that cannot be decoded is dead-lettered again when replayed, as itself, and
    // the original is marked replayed: the next replay does not pick it up again.
    world.produce_raw(&world.topic_paid, b"{not json").await;
    world
        .wait_count(
            "SELECT count(*) FROM dead_letters WHERE error_kind = 'decode'",
            1,
            WAIT,
        )
        .await;
    let decode = DeadLetterFilter {
        kind: Some("decode".into()),
        limit: 100,
        ..Default::default()
    };
    let replayed = tools::replay_dead_letters(&config.kafka, &config.database, &decode)
        .await
        .unwrap();
    assert_eq!(replayed, 1);
    world
        .wait_count(
            "SELECT count(*) FROM dead_letters WHERE error_kind = 'decode' AND replayed_at IS NOT NULL",
            1,
            WAIT,
        )
        .await;
    let again = tools::replay_dead_letters(&config.kafka, &config.database, &decode)
        .await
        .unwrap();
    assert_eq!(
        again, 1,
        "only the new dead letter (the replay itself), not the original"
    );
    engine.shutdown().await;
}

/// Hot reload under load: while events flow, three versions of a tenant's plugin are
/// published by rename, then a broken fourth, then a fifth written in place in two halves.
/// No event is lost or handled twice, each records exactly one of the published builds, the
/// broken and the half-written files never serve.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugins_reload_under_load_without_losing_or_repeating_an_event() {
    use sha2::{Digest, Sha256};

    let world = World::new().await;
    let engine = world.start(world.config()).await;
    let tenant = unique("busy");
    let dir = world.plugin_dir.path().to_owned();
    let name = format!("{tenant}.wasm");
    let read = |file: &str| std::fs::read(world.services.plugins.join(file)).unwrap();
    let versions = [
        read("default.wasm"),
        read("fixtures/chaos.wasm"),
        read("acme.wasm"),
    ];
    let digest = |bytes: &[u8]| -> String {
        Sha256::digest(bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    };
    let loaded = || {
        engine
            .metrics
            .plugin_reloads
            .with_label_values(&["loaded"])
            .get()
    };
    let total = 240;
    let producer = async {
        for i in 0..total {
            world
                .produce(&order_paid(
                    &format!("e{i:03}"),
                    &tenant,
                    &format!("u{}", i % 4),
                    None,
                    12.0,
                ))
                .await;
            tokio::time::sleep(Duration::from_millis(8)).await;
        }
    };
    let publisher = async {
        for (n, bytes) in versions.iter().enumerate() {
            publish(&dir, &name, bytes);
            eventually("a version is loaded", async || loaded() > n as u64).await;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        // A broken fourth version: rejected, the third keeps serving.
        publish(&dir, &name, b"\0asm broken v4");
        eventually("v4 is rejected", async || {
            engine
                .metrics
                .plugin_reloads
                .with_label_values(&["rejected"])
                .get()
                >= 1
        })
        .await;
    };
    tokio::join!(producer, publisher);
    world
        .wait_count("SELECT count(*) FROM processed_events", total, WAIT)
        .await;
    let pool = world.pool().await;
    let per_event: Vec<(String, i64)> = sqlx::query_as(
        "SELECT event_id, count(*) FROM notifications GROUP BY event_id ORDER BY event_id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        per_event.len(),
        total as usize,
        "every event has its notification"
    );
    assert!(per_event.iter().all(|(_, n)| *n == 1), "none twice");
    assert_eq!(world.count("SELECT count(*) FROM dead_letters").await, 0);
    let digests: Vec<(String,)> =
        sqlx::query_as("SELECT DISTINCT plugin_digest FROM processed_events")
            .fetch_all(&pool)
            .await
            .unwrap();
    let published: Vec<String> = versions.iter().map(|v| digest(v)).collect();
    for (d,) in &digests {
        assert!(published.contains(d), "{d} is not a published build");
    }
    assert!(
        digests.len() >= 2,
        "the reloads happened while events flowed: {digests:?}"
    );

    // A fifth version written in place, half now and half later: the half file is never
    // loaded (the third version keeps serving), the whole one is.
    let v5 = read("default.wasm");
    let (first, second) = v5.split_at(v5.len() / 2);
    {
        use std::io::Write;
        let mut file = std::fs::File::create(dir.join(&name)).unwrap();
        file.write_all(first).unwrap();
        file.flush().unwrap();
        tokio::time::sleep(Duration::from_millis(800)).await;
        world
            .produce(&order_paid("half", &tenant, "u9", None, 12.0))
            .await;
        world
            .wait_count(
                "SELECT count(*) FROM notifications WHERE event_id = 'half'",
                1,
                WAIT,
            )
            .await;
        file.write_all(second).unwrap();
    }
    let (half,): (String,) =
        sqlx::query_as("SELECT plugin_digest FROM processed_events WHERE event_id = 'half'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(half, published[2], "the half-written file never served");
    eventually("the whole fifth version is loaded", async || loaded() >= 4).await;
    world
        .produce(&order_paid("whole", &tenant, "u9", None, 12.0))
        .await;
    world
        .wait_count(
            "SELECT count(*) FROM notifications WHERE event_id = 'whole'",
            1,
            WAIT,
        )
        .await;
    let (whole,): (String,) =
        sqlx::query_as("SELECT plugin_digest FROM processed_events WHERE event_id = 'whole'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(whole, digest(&v5));
    engine.shutdown().await;
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
