//! Real-world trouble, on the real services: what must hold when the environment
//! misbehaves (a long SMTP outage, lock timeouts, a damaged sequence row, a missing plugin,
//! old events, abusive HTTP clients). Each test failed before the fix it pins.

use std::time::Duration;

use notify_engine::config::TenantConfig;
use notify_engine::store::{self, NewDeadLetter, Origin, RequeueFilter};
use serde_json::Value;
use sqlx::{Connection, PgConnection};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::*;

/// The relay is down far longer than the old 8-attempt window: the email waits in the
/// outbox and goes out once, when the relay is back. An operator's requeue brings back
/// failed rows (here, rows an older release had given up on), filtered by tenant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn email_survives_a_long_outage_and_failed_rows_can_be_requeued() {
    let world = World::new().await;
    let mut config = world.config();
    config.smtp.port = 1; // nothing listens: connection refused
    config.email.backoff_base_ms = 10;
    config.email.backoff_max_ms = 50;
    config.email.tenant_rate_per_sec = 0;
    let engine = world.start(config.clone()).await;
    let tenant = unique("shop");
    let other = unique("other");
    let address = format!("{}@example.test", unique("outage"));
    let other_address = format!("{}@example.test", unique("other"));
    world
        .produce(&order_paid("o1", &tenant, "u1", Some(&address), 3.0))
        .await;
    world
        .wait_until(
            "SELECT coalesce(max(attempts), 0)::bigint FROM email_outbox WHERE event_id = 'o1'",
            |n| n >= 20,
            WAIT,
        )
        .await;
    assert_eq!(
        world
            .count("SELECT count(*) FROM email_outbox WHERE status = 'failed'")
            .await,
        0,
        "a transient failure is retried for days, not 8 attempts"
    );
    engine.shutdown().await;

    // Rows an older release gave up on, for two tenants.
    world
        .produce(&order_paid("r1", &tenant, "u2", Some(&address), 4.0))
        .await;
    world
        .produce(&order_paid("r2", &other, "u1", Some(&other_address), 5.0))
        .await;
    let engine = world.start(config.clone()).await;
    world
        .wait_count(
            "SELECT count(*) FROM email_outbox WHERE event_id IN ('r1', 'r2') AND attempts > 0",
            2,
            WAIT,
        )
        .await;
    engine.shutdown().await;
    let pool = world.pool().await;
    sqlx::query(
        "UPDATE email_outbox SET status = 'failed', last_error = 'smtp: 421 too many attempts'
         WHERE event_id IN ('r1', 'r2')",
    )
    .execute(&pool)
    .await
    .unwrap();
    let mut database = config.database.clone();
    database.url = world.db_url.clone();
    let filter = |tenant: &str, error: &str| RequeueFilter {
        tenant: Some(tenant.to_owned()),
        error: Some(error.to_owned()),
        since: Some(chrono::Utc::now() - chrono::Duration::hours(1)),
        until: None,
    };
    let none = notify_engine::tools::requeue_emails(&database, &filter(&tenant, "550"))
        .await
        .unwrap();
    assert_eq!(none, 0, "the error filter matches nothing");
    let requeued = notify_engine::tools::requeue_emails(&database, &filter(&tenant, "421 TOO"))
        .await
        .unwrap();
    assert_eq!(requeued, 1, "only the filtered tenant's failed row");

    // The relay is back: o1 and the requeued r1 go out once each; r2 stays failed.
    config.smtp.port = world.services.smtp_port;
    let engine = world.start(config).await;
    let mails = Mailpit::new(&world.services)
        .wait_for(&address, 2, WAIT)
        .await;
    let mut subjects: Vec<_> = mails.iter().map(|m| m.subject.clone()).collect();
    subjects.sort();
    assert_eq!(
        subjects,
        [
            "Payment received for order A-o1",
            "Payment received for order A-r1"
        ]
    );
    world
        .wait_count(
            "SELECT count(*) FROM email_outbox WHERE status = 'sent'",
            2,
            WAIT,
        )
        .await;
    let (status,): (String,) =
        sqlx::query_as("SELECT status FROM email_outbox WHERE event_id = 'r2'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(status, "failed");
    assert!(
        Mailpit::new(&world.services)
            .messages_to(&other_address)
            .await
            .is_empty()
    );
    engine.shutdown().await;
}

/// A lock timeout is the database's trouble, not the event's: the batch waits, readiness
/// says so, and the event is delivered once the lock is released. Nothing is dead-lettered.
/// The engine's database connections die while idle (a database restart, an operator
/// terminating backends): the next events are handled without a single stalled batch, since
/// a connection idle for over a second is pinged before use and a dead one is replaced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_died_idle_are_replaced_without_a_stall() {
    let world = World::new().await;
    let mut config = world.config();
    // Nothing else takes the dead connections first (and throws them away on its own error).
    config.email.poll_interval_ms = 600_000;
    config.presence.heartbeat_secs = 300;
    config.presence.ttl_secs = 600;
    config.retention.interval_secs = 3_600;
    let engine = world.start(config).await;
    let tenant = unique("idle");
    world
        .produce(&order_paid("i1", &tenant, "u1", None, 1.0))
        .await;
    world
        .wait_count("SELECT count(*) FROM notifications", 1, WAIT)
        .await;

    let pool = world.pool().await;
    let (killed,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM (
             SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE datname = current_database() AND application_name = 'notify-engine'
               AND pid <> pg_backend_pid()) t",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(killed > 0, "the engine holds idle connections");
    // Every dead connection has been idle for longer than the ping threshold when it is
    // next taken.
    tokio::time::sleep(Duration::from_millis(1_200)).await;

    for i in 2..=4 {
        world
            .produce(&order_paid(&format!("i{i}"), &tenant, "u1", None, 1.0))
            .await;
    }
    world
        .wait_count("SELECT count(*) FROM notifications", 4, WAIT)
        .await;
    let stalls: u64 = ["database", "plugin"]
        .iter()
        .map(|cause| {
            engine
                .metrics
                .pipeline_stalls
                .with_label_values(&[cause])
                .get()
        })
        .sum();
    assert_eq!(stalls, 0, "a batch met a dead connection");
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_timeout_stalls_the_batch_instead_of_dead_lettering() {
    let world = World::new().await;
    let mut admin = PgConnection::connect(&world.services.database_url)
        .await
        .unwrap();
    sqlx::query(&format!(
        "ALTER DATABASE {} SET lock_timeout = '200ms'",
        world.db_name
    ))
    .execute(&mut admin)
    .await
    .unwrap();
    let engine = world.start(world.config()).await;
    let tenant = unique("shop");
    world
        .produce(&order_paid("l1", &tenant, "u1", None, 1.0))
        .await;
    world
        .wait_count("SELECT count(*) FROM notifications", 1, WAIT)
        .await;

    // Another session holds u1's sequence row.
    let mut holder = PgConnection::connect(&world.db_url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut holder).await.unwrap();
    sqlx::query("SELECT 1 FROM user_streams WHERE tenant_id = $1 AND user_id = 'u1' FOR UPDATE")
        .bind(&tenant)
        .execute(&mut holder)
        .await
        .unwrap();
    world
        .produce(&order_paid("l2", &tenant, "u1", None, 2.0))
        .await;
    eventually("the pipeline reports the stall", async || {
        engine.health.snapshot().stall.is_some()
    })
    .await;
    let (status, body) = readyz(engine.admin_addr).await;
    assert_eq!(status, 503, "{body}");
    let pipeline = body["checks"]["pipeline"].as_str().unwrap();
    assert!(pipeline.starts_with("stalled: database"), "{body}");
    assert!(pipeline.contains("lock timeout"), "{body}");
    assert_eq!(world.count("SELECT count(*) FROM dead_letters").await, 0);

    sqlx::query("ROLLBACK").execute(&mut holder).await.unwrap();
    world
        .wait_count(
            "SELECT count(*) FROM notifications WHERE event_id = 'l2'",
            1,
            WAIT,
        )
        .await;
    assert_eq!(world.count("SELECT count(*) FROM dead_letters").await, 0);
    eventually("readiness recovers", async || {
        readyz(engine.admin_addr).await.0 == 200
    })
    .await;
    assert!(
        engine
            .metrics
            .pipeline_stalls
            .with_label_values(&["database"])
            .get()
            >= 1
    );
    engine.shutdown().await;
}

/// A user's sequence row lost or set back (a restore, an operator's mistake) heals itself:
/// the next notification continues after the highest stored one instead of colliding.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_sequence_row_loses_nothing() {
    let world = World::new().await;
    let engine = world.start(world.config()).await;
    let tenant = unique("shop");
    for id in ["q1", "q2"] {
        world
            .produce(&order_paid(id, &tenant, "u1", None, 1.0))
            .await;
    }
    world
        .wait_count("SELECT count(*) FROM notifications", 2, WAIT)
        .await;
    let pool = world.pool().await;
    sqlx::query("DELETE FROM user_streams")
        .execute(&pool)
        .await
        .unwrap();
    world
        .produce(&order_paid("q3", &tenant, "u1", None, 1.0))
        .await;
    world
        .wait_count(
            "SELECT seq FROM notifications WHERE event_id = 'q3'",
            3,
            WAIT,
        )
        .await;
    // A row set back (a partial restore) heals the same way.
    sqlx::query("UPDATE user_streams SET last_seq = 1")
        .execute(&pool)
        .await
        .unwrap();
    world
        .produce(&order_paid("q4", &tenant, "u1", None, 1.0))
        .await;
    world
        .wait_count(
            "SELECT seq FROM notifications WHERE event_id = 'q4'",
            4,
            WAIT,
        )
        .await;
    assert_eq!(world.count("SELECT count(*) FROM dead_letters").await, 0);
    engine.shutdown().await;
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
    let (status, body) = readyz(engine.admin_addr).await;
    assert_eq!(status, 503, "{body}");
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
    eventually("readiness recovers", async || {
        readyz(engine.admin_addr).await.0 == 200
    })
    .await;
    engine.shutdown().await;
}

/// A new consumer group on an old topic: old events are recorded (in-app included) but
/// send no email.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_events_are_recorded_but_send_no_email() {
    let world = World::new().await;
    let engine = world.start(world.config()).await;
    let tenant = unique("shop");
    let address = format!("{}@example.test", unique("old"));
    let mut old = order_paid("old1", &tenant, "u1", Some(&address), 1.0);
    old["time"] = (chrono::Utc::now() - chrono::Duration::days(3))
        .to_rfc3339()
        .into();
    world.produce(&old).await;
    world
        .produce(&order_paid("new1", &tenant, "u1", Some(&address), 2.0))
        .await;
    let mails = Mailpit::new(&world.services)
        .wait_for(&address, 1, WAIT)
        .await;
    assert_eq!(mails[0].subject, "Payment received for order A-new1");
    let (status, reason): (String, String) =
        sqlx::query_as("SELECT status, last_error FROM email_outbox WHERE event_id = 'old1'")
            .fetch_one(&world.pool().await)
            .await
            .unwrap();
    assert_eq!(status, "skipped");
    assert!(reason.contains("max_event_age_secs"), "{reason}");
    assert_eq!(
        world
            .count("SELECT count(*) FROM notifications WHERE event_id = 'old1'")
            .await,
        1
    );
    assert_eq!(engine.metrics.emails_skipped.get(), 1);
    engine.shutdown().await;
}

/// A recreated topic starts its offsets again: a new dead letter at a reused offset keeps
/// its payload, while a redelivery of the same message is still stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_keep_payloads_at_reused_offsets() {
    let world = World::new().await;
    let config = world.config();
    let pool = store::connect(&config.database, 2).unwrap();
    store::migrate(&pool).await.unwrap();
    let letter = |payload: &'static [u8]| NewDeadLetter {
        tenant: None,
        event_id: None,
        origin: Origin {
            topic: "orders",
            partition: 0,
            offset: 7,
        },
        key: None,
        payload,
        headers: &[],
        error_kind: "decode",
        reason: "not JSON",
        plugin: None,
    };
    let mut tx = pool.begin().await.unwrap();
    assert!(
        store::insert_dead_letter(&mut tx, &letter(b"first life"))
            .await
            .unwrap()
    );
    assert!(
        !store::insert_dead_letter(&mut tx, &letter(b"first life"))
            .await
            .unwrap(),
        "a redelivery is stored once"
    );
    assert!(
        store::insert_dead_letter(&mut tx, &letter(b"second life"))
            .await
            .unwrap(),
        "another message at a reused offset is kept"
    );
    tx.commit().await.unwrap();
    let payloads: Vec<(Vec<u8>,)> = sqlx::query_as("SELECT payload FROM dead_letters ORDER BY id")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(
        payloads,
        [(b"first life".to_vec(),), (b"second life".to_vec(),)]
    );
}

/// The HTTP edge under abuse: operator endpoints live on their own listener, a client that
/// never finishes its headers is cut off, and one address cannot hold every connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_edge_holds_under_abuse() {
    let world = World::new().await;
    let mut config = world.config();
    config.http.header_timeout_ms = 300;
    config.http.max_connections_per_ip = 3;
    let engine = world.start(config).await;
    let http = reqwest::Client::new();

    // Operator endpoints are not on the public listener.
    let public = http
        .get(format!("http://{}/healthz", engine.http_addr))
        .send()
        .await
        .unwrap();
    assert_eq!(public.status(), 404);
    let admin = http
        .get(format!("http://{}/healthz", engine.admin_addr))
        .send()
        .await
        .unwrap();
    assert_eq!(admin.status(), 200);

    // Slowloris: headers never finished → closed after the header timeout.
    let started = tokio::time::Instant::now();
    let mut slow = tokio::net::TcpStream::connect(engine.http_addr)
        .await
        .unwrap();
    slow.write_all(b"GET /api/v1/sse HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut rest))
        .await
        .expect("the server closes a connection whose headers never end")
        .ok();
    assert!(started.elapsed() >= Duration::from_millis(250));
    // An idle connection that never sends anything is closed the same way.
    let mut idle = tokio::net::TcpStream::connect(engine.http_addr)
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), idle.read_to_end(&mut rest))
        .await
        .expect("the server closes an idle connection")
        .ok();

    // Per-address cap: three idle connections are the most one address may hold.
    let mut idle = Vec::new();
    for _ in 0..3 {
        idle.push(
            tokio::net::TcpStream::connect(engine.http_addr)
                .await
                .unwrap(),
        );
    }
    // Give the server time to accept them.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut fourth = tokio::net::TcpStream::connect(engine.http_addr)
        .await
        .unwrap();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_millis(250), fourth.read(&mut buf))
        .await
        .expect("the fourth connection is closed at once, well before the header timeout");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    drop(idle);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (status, _, body) = connect_sse(&engine, None, None).await;
    assert_eq!(status, 401, "{body}");
    engine.shutdown().await;
}

/// Noisy neighbours: a tenant whose plugin spends ~90 ms per event, with a backlog, beside a
/// normal tenant. Tenants have lanes of their own and the slow one a routing-time budget:
/// the normal tenant's produce → SSE p99 stays under a second, and the slow tenant still
/// gets through its backlog.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_tenant_does_not_slow_the_others() {
    let world = World::new().await;
    let slow = unique("slow");
    world.install_chaos_plugin(&slow);
    let mut config = world.config();
    // Generous per-call limits: the slow plugin is slow, not broken.
    config.plugins.timeout_ms = 2_000;
    config.plugins.fuel = 2_000_000_000;
    let engine = world.start(config).await;
    let tenant = unique("shop");
    let (_, sse, _) = connect_sse(&engine, Some(&world.token(&tenant, "u1")), None).await;
    let mut sse = sse.unwrap();

    let backlog = 60;
    for i in 0..backlog {
        let data =
            serde_json::json!({"user_id": format!("u{}", i % 6), "chaos": "slow", "spin_ms": 90});
        world
            .produce(&event(&format!("slow{i}"), &slow, "order_paid", data))
            .await;
    }
    let mut latencies = Vec::new();
    for i in 0..40 {
        let id = format!("n{i}");
        let started = tokio::time::Instant::now();
        world
            .produce(&order_paid(&id, &tenant, "u1", None, 1.0))
            .await;
        let frame = sse.next(WAIT).await.expect("the normal tenant's event");
        assert_eq!(frame.data["event_id"], id.as_str());
        latencies.push(started.elapsed());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    latencies.sort();
    let p99 = latencies[latencies.len() * 99 / 100];
    let slow_done = world
        .count("SELECT count(*) FROM notifications WHERE title = 'chaos slow'")
        .await;
    assert!(
        p99 < Duration::from_secs(1),
        "normal tenant p99 {p99:?} with a slow neighbour ({slow_done} of {backlog} slow events done meanwhile); all: {latencies:?}"
    );
    assert!(
        0 < slow_done && slow_done < backlog,
        "the slow tenant's backlog was being worked through, a few events per commit, while the normal tenant flowed ({slow_done} of {backlog})"
    );
    world
        .wait_count(
            "SELECT count(*) FROM notifications WHERE title = 'chaos slow'",
            backlog,
            WAIT,
        )
        .await;
    assert!(engine.metrics.tenant_budget_pauses.get() >= 1);
    engine.shutdown().await;
}

/// Who may speak for a tenant, with `kafka.tenant_from = "header"`: a producer that names
/// another tenant than its gateway header is refused and claims nothing (the victim's real
/// event then goes through: no "duplicate"), as are a message without the header and a
/// tenant outside the allow-list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_gateway_header_speaks_for_a_tenant() {
    let world = World::new().await;
    let victim = unique("victim");
    let attacker = unique("attacker");
    let stranger = unique("stranger");
    let mut config = world.config();
    config.kafka.tenant_from = notify_engine::config::TenantFrom::Header;
    config.kafka.tenant_header = "x-tenant".into();
    config.kafka.allowed_tenants = vec![victim.clone(), attacker.clone()];
    let engine = world.start(config).await;
    let (_, sse, _) = connect_sse(&engine, Some(&world.token(&victim, "u1")), None).await;
    let mut sse = sse.unwrap();

    let payload = |id: &str, tenant: &str| order_paid(id, tenant, "u1", None, 1.0).to_string();
    let topic = world.topic_paid.clone();
    // The attacker's producer writes the victim's tenant and event id first.
    world
        .produce_with_headers(
            &topic,
            None,
            payload("v1", &victim).as_bytes(),
            &[("x-tenant", &attacker)],
        )
        .await;
    world
        .produce_with_headers(&topic, None, payload("v0", &victim).as_bytes(), &[])
        .await;
    world
        .produce_with_headers(
            &topic,
            None,
            payload("s1", &stranger).as_bytes(),
            &[("x-tenant", &stranger)],
        )
        .await;
    world
        .wait_count(
            "SELECT count(*) FROM dead_letters WHERE error_kind = 'validation'",
            3,
            WAIT,
        )
        .await;
    let pool = world.pool().await;
    let reasons: Vec<(String, String)> =
        sqlx::query_as("SELECT event_id, reason FROM dead_letters ORDER BY event_id")
            .fetch_all(&pool)
            .await
            .unwrap();
    // By event id: s1 (stranger), v0 (no header), v1 (the attacker's).
    assert!(reasons[0].1.contains("allowed_tenants"), "{reasons:?}");
    assert!(reasons[1].1.contains("header"), "{reasons:?}");
    assert!(reasons[2].1.contains("may only speak for"), "{reasons:?}");
    assert_eq!(
        world.count("SELECT count(*) FROM processed_events").await,
        0
    );

    // The victim's real event, through the gateway: delivered, not dropped as a duplicate.
    world
        .produce_with_headers(
            &topic,
            None,
            payload("v1", &victim).as_bytes(),
            &[("x-tenant", &victim)],
        )
        .await;
    let frame = sse.next(WAIT).await.expect("the victim's real event");
    assert_eq!(frame.data["event_id"], "v1");
    engine.shutdown().await;
}

/// Email cannot be turned into a phishing relay: a link from event data must be https:
/// (and, for a tenant with link_domains, go to its domains), and a tenant with
/// recipient_domains can mail only those. Refused emails fail unsent, with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn email_links_and_recipients_follow_the_tenant_policy() {
    let world = World::new().await;
    let tenant = unique("shop");
    let mut config = world.config();
    config.tenants.insert(
        tenant.clone(),
        TenantConfig {
            link_domains: vec!["track.example".into()],
            recipient_domains: vec!["shop.example".into()],
            ..TenantConfig::default()
        },
    );
    let engine = world.start(config).await;
    let customer = format!("{}@shop.example", unique("c"));
    let outsider = format!("{}@bank.example", unique("victim"));
    let shipped = |id: &str, to: &str, url: &str| {
        event(
            id,
            &tenant,
            "order_status_updated",
            serde_json::json!({"user_id": "u1", "order_id": format!("A-{id}"), "status": "shipped",
                    "email": to, "tracking_url": url}),
        )
    };
    world
        .produce(&shipped("good", &customer, "https://eu.track.example/p/1"))
        .await;
    world
        .produce(&shipped(
            "phish",
            &customer,
            "http://track.example.evil.example/login",
        ))
        .await;
    world
        .produce(&shipped(
            "elsewhere",
            &customer,
            "https://evil.example/login",
        ))
        .await;
    world
        .produce(&shipped(
            "outsider",
            &outsider,
            "https://eu.track.example/p/2",
        ))
        .await;
    let mails = Mailpit::new(&world.services)
        .wait_for(&customer, 1, WAIT)
        .await;
    assert!(
        mails[0].html.contains("https://eu.track.example/p/1"),
        "{}",
        mails[0].html
    );
    world
        .wait_count(
            "SELECT count(*) FROM email_outbox WHERE status = 'failed'",
            3,
            WAIT,
        )
        .await;
    let failed: Vec<(String, String)> = sqlx::query_as(
        "SELECT event_id, last_error FROM email_outbox WHERE status = 'failed' ORDER BY event_id",
    )
    .fetch_all(&world.pool().await)
    .await
    .unwrap();
    // elsewhere, outsider, phish
    assert!(failed[0].1.contains("link_domains"), "{failed:?}");
    assert!(failed[1].1.contains("recipient_domains"), "{failed:?}");
    assert!(failed[2].1.contains("is not https"), "{failed:?}");
    assert!(
        Mailpit::new(&world.services)
            .messages_to(&outsider)
            .await
            .is_empty()
    );
    engine.shutdown().await;
}

/// A stream holds a bounded number of bytes: a replay page stops at `sse.page_bytes` (past
/// its first row), and the whole history still arrives, in order. Deep replays are limited
/// per user and minute (429 with Retry-After).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_are_bounded_in_bytes_and_rate() {
    let world = World::new().await;
    let mut config = world.config();
    config.sse.page_bytes = 150_000;
    config.sse.deep_replays_per_minute = 2;
    let engine = world.start(config.clone()).await;
    let tenant = unique("shop");
    // Ten notifications of ~60 KB each, written as the pipeline would.
    let pool = world.pool().await;
    for seq in 1..=10i64 {
        sqlx::query(
            "INSERT INTO notifications (tenant_id, user_id, seq, event_id, kind, title, body, data)
             VALUES ($1, 'u1', $2, $3, 'notification', 't', $4, '{}')",
        )
        .bind(&tenant)
        .bind(seq)
        .bind(format!("big{seq}"))
        .bind("x".repeat(60_000))
        .execute(&pool)
        .await
        .unwrap();
    }
    sqlx::query("INSERT INTO user_streams VALUES ($1, 'u1', 10)")
        .bind(&tenant)
        .execute(&pool)
        .await
        .unwrap();
    let api = notify_engine::store::connect(&config.database, 1).unwrap();
    let page = notify_engine::store::notifications_after(&api, &tenant, "u1", 0, 200, 150_000)
        .await
        .unwrap();
    assert_eq!(
        page.len(),
        2,
        "two rows of ~60 KB fit in 150 KB, a third does not"
    );
    let page = notify_engine::store::notifications_after(&api, &tenant, "u1", 0, 200, 1_000)
        .await
        .unwrap();
    assert_eq!(page.len(), 1, "a page always holds its first row");

    let token = world.token(&tenant, "u1");
    for _ in 0..2 {
        let (status, sse, body) = connect_sse(&engine, Some(&token), Some("0")).await;
        assert_eq!(status, 200, "{body}");
        let mut sse = sse.unwrap();
        for seq in 1..=10 {
            let e = sse
                .next(WAIT)
                .await
                .expect("the whole history, page by page");
            assert_eq!(e.id.as_deref(), Some(seq.to_string().as_str()));
        }
    }
    let response = reqwest::Client::new()
        .get(format!("http://{}/api/v1/sse", engine.http_addr))
        .bearer_auth(&token)
        .header("Last-Event-ID", "0")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 429);
    let retry_after: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "too_many_requests");
    // A stream that starts at "now" is not a deep replay.
    let (status, _, body) = connect_sse(&engine, Some(&token), None).await;
    assert_eq!(status, 200, "{body}");
    engine.shutdown().await;
}

/// Fair claiming: a tenant's backlog of emails does not hold back another tenant's email,
/// which goes out within the first rounds, not after the backlog.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_tenants_email_backlog_does_not_delay_another() {
    let world = World::new().await;
    let config = world.config();
    // Migrate and fill the outbox before the worker starts: the backlog is older.
    let pool = notify_engine::store::connect(&config.database, 2).unwrap();
    notify_engine::store::migrate(&pool).await.unwrap();
    let bulk = unique("bulk");
    let small = unique("small");
    let insert = |tenant: String, n: i64, age_secs: i64| {
        let pool = pool.clone();
        async move {
            sqlx::query(
                "INSERT INTO email_outbox
                     (tenant_id, event_id, recipient, template, data, message_id, next_attempt_at)
                 SELECT $1, $1 || '-' || i, $1 || '@example.test', 'order_paid',
                        jsonb_build_object('order_id', 'A-' || i, 'amount', 1, 'currency', 'EUR',
                                           'customer_name', 'C', 'event_id', 'e' || i),
                        '<' || $1 || '-' || i || '@example.test>',
                        now() - make_interval(secs => $3)
                 FROM generate_series(1, $2) AS i",
            )
            .bind(tenant)
            .bind(n)
            .bind(age_secs as f64)
            .execute(&pool)
            .await
            .unwrap();
        }
    };
    insert(bulk.clone(), 120, 60).await;
    insert(small.clone(), 1, 0).await;
    let engine = world.start(config).await;
    world
        .wait_count(
            "SELECT count(*) FROM email_outbox WHERE status = 'sent'",
            121,
            WAIT,
        )
        .await;
    let (rank,): (i64,) = sqlx::query_as(
        "SELECT rank FROM (
             SELECT tenant_id, rank() OVER (ORDER BY sent_at) AS rank FROM email_outbox
         ) r WHERE tenant_id = $1",
    )
    .bind(&small)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(
        rank <= 8,
        "the small tenant's email went out as number {rank} of 121, behind the other tenant's backlog"
    );
    engine.shutdown().await;
}

/// A full lane pauses its partition instead of buffering: with room for 2 messages per lane,
/// a slow tenant's 30 events and a normal tenant's 10, all on one partition, are each
/// delivered once and in order, and the partition is resumed (the normal tenant's events
/// arrive while the slow tenant still works).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_lane_pauses_and_resumes_its_partition_in_order() {
    full_lane_pauses(|kafka| kafka.lane_capacity = 2).await;
}

/// The same, with a lane bounded by bytes (about two of these messages) rather than count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lane_full_of_bytes_pauses_and_resumes_its_partition_in_order() {
    full_lane_pauses(|kafka| kafka.lane_max_bytes = 400).await;
}

async fn full_lane_pauses(limit: impl FnOnce(&mut notify_engine::config::KafkaConfig)) {
    let world = World::new().await;
    let slow = unique("slow");
    world.install_chaos_plugin(&slow);
    let mut config = world.config();
    limit(&mut config.kafka);
    config.kafka.batch_max = 2;
    config.plugins.timeout_ms = 2_000;
    config.plugins.fuel = 2_000_000_000;
    let engine = world.start(config).await;
    let tenant = unique("shop");
    let topic = world.topic_paid.clone();
    for i in 0..30 {
        let data = serde_json::json!({"user_id": "u1", "chaos": "slow", "spin_ms": 30});
        let e = event(&format!("s{i:02}"), &slow, "order_paid", data);
        world
            .produce_with_headers(&topic, Some("one-partition"), e.to_string().as_bytes(), &[])
            .await;
    }
    for i in 0..10 {
        let e = order_paid(&format!("n{i:02}"), &tenant, "u1", None, 1.0);
        world
            .produce_with_headers(&topic, Some("one-partition"), e.to_string().as_bytes(), &[])
            .await;
    }
    world
        .wait_count(
            &format!("SELECT count(*) FROM notifications WHERE tenant_id = '{tenant}'"),
            10,
            WAIT,
        )
        .await;
    world
        .wait_count(
            &format!("SELECT count(*) FROM notifications WHERE tenant_id = '{slow}'"),
            30,
            WAIT,
        )
        .await;
    let pool = world.pool().await;
    for (t, prefix, n) in [(&slow, "s", 30), (&tenant, "n", 10)] {
        let ids: Vec<(String,)> =
            sqlx::query_as("SELECT event_id FROM notifications WHERE tenant_id = $1 ORDER BY seq")
                .bind(t)
                .fetch_all(&pool)
                .await
                .unwrap();
        let want: Vec<String> = (0..n).map(|i| format!("{prefix}{i:02}")).collect();
        let got: Vec<String> = ids.into_iter().map(|r| r.0).collect();
        assert_eq!(got, want, "each once, in order");
    }
    assert_eq!(world.count("SELECT count(*) FROM dead_letters").await, 0);
    assert!(
        engine.metrics.partition_pauses.get() >= 1,
        "the lane filled up"
    );
    engine.shutdown().await;
}

/// A stream whose reads fail for a while waits and reads again instead of ending: its
/// instance (which consumes nothing) hears of a row committed on another, and the API's
/// database role cannot read notifications for a second; the same open stream then gets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_outlives_a_spell_of_failing_reads() {
    let world = World::new().await;
    let consumer = world.start(world.config()).await;
    let streams = world.start_idle(world.config()).await;

    let tenant = unique("shop");
    let token = world.token(&tenant, "u1");
    let (status, sse, _) = connect_sse(&streams, Some(&token), None).await;
    assert_eq!(status, 200);
    let mut sse = sse.unwrap();
    world
        .produce(&order_paid("before", &tenant, "u1", None, 1.0))
        .await;
    let first = sse.next(WAIT).await.expect("the first notification");
    assert_eq!(first.id.as_deref(), Some("1"));

    let pool = world.pool().await;
    let (role,): (String,) = sqlx::query_as(
        "SELECT 'notify_api_' || oid FROM pg_database WHERE datname = current_database()",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    sqlx::query(&format!("REVOKE SELECT ON notifications FROM {role}"))
        .execute(&pool)
        .await
        .unwrap();
    // A row too large to travel in the wake-up (over `hub::RECENT_ROW_BYTES`): the stream
    // on the other instance has to read it.
    let mut after = order_paid("after", &tenant, "u1", None, 1.0);
    after["data"]["order_id"] = format!("A-{}", "x".repeat(3_000)).into();
    world.produce(&after).await;
    world
        .wait_count("SELECT count(*) FROM notifications", 2, WAIT)
        .await;
    // The stream has been woken and failed to read at least once by now.
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    sqlx::query(&format!("GRANT SELECT ON notifications TO {role}"))
        .execute(&pool)
        .await
        .unwrap();
    match sse.poll(WAIT).await {
        Polled::Event(e) => {
            assert_eq!(
                (e.id.as_deref(), e.event.as_str()),
                (Some("2"), "notification")
            )
        }
        other => panic!("the stream ended instead of retrying: {other:?}"),
    }
    streams.shutdown().await;
    consumer.shutdown().await;
}
