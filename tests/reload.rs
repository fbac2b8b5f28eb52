//! Hot reload on the real services: plugins and templates change under a running engine,
//! published by write-then-rename; a broken new version never replaces a working one, and no
//! event is lost or handled twice meanwhile.

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
    // And named on the status report.
    let report = status(engine.admin_addr).await;
    let rejected = report["checks"]["templates"]["rejected"]
        .as_array()
        .unwrap();
    assert!(
        rejected
            .iter()
            .any(|r| r.as_str().is_some_and(|r| r.contains(&tenant))),
        "{report}"
    );
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

/// A template written in place and caught mid-write (what is there so far is valid
/// Handlebars, just short) does not go live: the engine waits until the writer closes the
/// file, the previous version serving meanwhile, and then takes the whole file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_caught_mid_write_does_not_go_live_until_it_is_written() {
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
    let address = format!("{}@example.test", unique("settle"));
    let folder = templates.path().join(&tenant).join("order_paid");
    std::fs::create_dir_all(&folder).unwrap();
    let loaded = reloads("loaded");
    publish(&folder, "subject.hbs", b"Settled v1 {{order_id}}");
    eventually("v1 is loaded", async || reloads("loaded") > loaded).await;
    eventually("v1 is loaded", async || {
        let current = reloads("loaded");
        tokio::time::sleep(Duration::from_millis(600)).await;
        reloads("loaded") == current
    })
    .await;

    // An editor writes v2 in place: the first part is on disk, the rest not yet.
    let (loaded, pending) = (reloads("loaded"), reloads("pending"));
    let mut file = std::fs::File::create(folder.join("subject.hbs")).unwrap();
    std::io::Write::write_all(&mut file, b"Settled v2").unwrap();
    std::io::Write::flush(&mut file).unwrap();
    eventually("the directory's change is looked at", async || {
        reloads("loaded") > loaded || reloads("pending") > pending
    })
    .await;
    world
        .produce(&order_paid("e1", &tenant, "u1", Some(&address), 1.0))
        .await;
    let mails = Mailpit::new(&world.services)
        .wait_for(&address, 1, WAIT)
        .await;
    assert_eq!(
        mails[0].subject, "Settled v1 A-e1",
        "the half-written template went live"
    );

    // The writer finishes and closes the file: v2, whole, goes live.
    let loaded = reloads("loaded");
    std::io::Write::write_all(&mut file, b" {{order_id}}").unwrap();
    drop(file);
    eventually("v2 is loaded", async || reloads("loaded") > loaded).await;
    world
        .produce(&order_paid("e2", &tenant, "u1", Some(&address), 1.0))
        .await;
    let mails = Mailpit::new(&world.services)
        .wait_for(&address, 2, WAIT)
        .await;
    let mut subjects: Vec<_> = mails.iter().map(|m| m.subject.clone()).collect();
    subjects.sort();
    assert_eq!(subjects, ["Settled v1 A-e1", "Settled v2 A-e2"]);
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
