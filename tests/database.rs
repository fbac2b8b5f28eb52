//! PostgreSQL's trouble and duties, on the real services: connections that died idle, a lock
//! timeout, a full NOTIFY queue, a damaged sequence row, a non-superuser engine user, the API
//! pool's row-level security, retention, and readiness when PostgreSQL is gone.

use std::time::Duration;

use notify_engine::app::Running;
use sqlx::{Connection, PgConnection};

use crate::support::*;

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

/// A lock timeout is the database's trouble, not the event's: the batch waits, readiness
/// says so, and the event is delivered once the lock is released. Nothing is dead-lettered.
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
    // A stalled lane is on the status report; the routes still serve.
    assert_eq!(readyz(engine.admin_addr).await.0, 200);
    let body = status(engine.admin_addr).await;
    assert_eq!(body["status"], "degraded", "{body}");
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
    eventually("the status report recovers", async || {
        status(engine.admin_addr).await["status"] == "ok"
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

/// PostgreSQL's NOTIFY queue full: COMMIT fails with 54000 ("too many notifications in the
/// NOTIFY queue"), which one listener idle in a transaction brings about in time. That is
/// the database's trouble, not the event's: the batch stalls, readiness says why, and the
/// event is delivered once the queue drains; nothing is dead-lettered.
///
/// The queue holds 8 GB on PostgreSQL 15 (fixed; from 17 `max_notify_queue_pages`, a
/// server-wide setting a test cannot change), far too much to fill in a test on shared
/// services. So the error is raised where PostgreSQL raises it, at COMMIT, with its SQLSTATE
/// and message: a deferred constraint trigger on `notifications`, armed while a row sits in
/// `queue_full`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_notify_queue_stalls_the_batch_instead_of_dead_lettering() {
    let world = World::new().await;
    let engine = world.start(world.config()).await;
    let tenant = unique("shop");
    world
        .produce(&order_paid("q1", &tenant, "u1", None, 1.0))
        .await;
    world
        .wait_count("SELECT count(*) FROM notifications", 1, WAIT)
        .await;

    let pool = world.pool().await;
    for sql in [
        "CREATE TABLE queue_full (since timestamptz NOT NULL DEFAULT now())",
        "CREATE FUNCTION queue_full() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF EXISTS (SELECT 1 FROM queue_full) THEN
                 RAISE EXCEPTION 'too many notifications in the NOTIFY queue'
                     USING ERRCODE = '54000';
             END IF;
             RETURN NULL;
         END $$",
        "CREATE CONSTRAINT TRIGGER queue_full AFTER INSERT ON notifications
         DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION queue_full()",
        "INSERT INTO queue_full DEFAULT VALUES",
    ] {
        sqlx::query(sql).execute(&pool).await.unwrap();
    }
    world
        .produce(&order_paid("q2", &tenant, "u1", None, 2.0))
        .await;
    eventually("the pipeline reports the stall", async || {
        engine.health.snapshot().stall.is_some()
    })
    .await;
    // A stalled lane is on the status report; the routes still serve.
    assert_eq!(readyz(engine.admin_addr).await.0, 200);
    let body = status(engine.admin_addr).await;
    assert_eq!(body["status"], "degraded", "{body}");
    let pipeline = body["checks"]["pipeline"].as_str().unwrap();
    assert!(pipeline.starts_with("stalled: database"), "{body}");
    assert!(pipeline.contains("NOTIFY queue"), "{body}");
    assert_eq!(world.count("SELECT count(*) FROM dead_letters").await, 0);

    // The queue drains: the batch goes through.
    sqlx::query("DELETE FROM queue_full")
        .execute(&pool)
        .await
        .unwrap();
    world
        .wait_count(
            "SELECT count(*) FROM notifications WHERE event_id = 'q2'",
            1,
            WAIT,
        )
        .await;
    assert_eq!(world.count("SELECT count(*) FROM dead_letters").await, 0);
    eventually("the status report recovers", async || {
        status(engine.admin_addr).await["status"] == "ok"
    })
    .await;
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

/// An engine whose own retention loop stays out of the way, and six notifications of one
/// tenant: r1, r3 and r5 for u1, r2, r4 and r6 for u2.
async fn six_notifications_of_two_users() -> (World, Running, String) {
    let world = World::new().await;
    // The engine's own retention loop stays out of the way: the test runs rounds itself.
    let mut config = world.config();
    config.retention.notifications_days = 0;
    config.retention.processed_events_days = 0;
    let engine = world.start(config).await;
    let tenant = unique("shop");
    for i in 1..=6 {
        let user = if i % 2 == 0 { "u2" } else { "u1" };
        world
            .produce(&order_paid(&format!("r{i}"), &tenant, user, None, 1.0))
            .await;
    }
    world
        .wait_count("SELECT count(*) FROM notifications", 6, WAIT)
        .await;
    (world, engine, tenant)
}

/// The API's pool is held to one user by PostgreSQL itself (row-level security), and kept
/// away from the pipeline's tables.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_pool_sees_only_its_user() {
    let (world, engine, tenant) = six_notifications_of_two_users().await;
    // Row-level security: the API's pool reads nothing outside a scoped transaction, and
    // only the named user's rows inside one, whatever the query asks for.
    let config = world.config();
    let api_pool = notify_engine::store::connect_api(&config.database, 2).unwrap();
    let (unscoped,): (i64,) = sqlx::query_as("SELECT count(*) FROM notifications")
        .fetch_one(&api_pool)
        .await
        .unwrap();
    assert_eq!(unscoped, 0, "no scope, no rows");
    let mut tx = notify_engine::store::scoped(&api_pool, &tenant, "u1")
        .await
        .unwrap();
    let (visible,): (i64,) = sqlx::query_as("SELECT count(*) FROM notifications")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(visible, 3, "only u1's rows");
    let denied = sqlx::query("UPDATE notifications SET read_at = now() WHERE user_id = 'u2'")
        .execute(&mut *tx)
        .await
        .unwrap();
    assert_eq!(denied.rows_affected(), 0, "u2's rows cannot be written");
    let smuggled = sqlx::query(
        "INSERT INTO notifications (tenant_id, user_id, seq, event_id, kind) VALUES ($1, 'u2', 99, 'x', 'notification')",
    )
    .bind(&tenant)
    .execute(&mut *tx)
    .await;
    assert!(smuggled.is_err(), "a row for another user is refused");
    drop(tx);
    assert!(
        sqlx::query("SELECT count(*) FROM processed_events")
            .fetch_one(&api_pool)
            .await
            .is_err(),
        "the API role has no business with the pipeline's tables"
    );
    engine.shutdown().await;
}

/// Runs the retention loop with batches of 2 until a round finds less than a full batch:
/// how many rounds that took, and the metrics it counted in.
async fn purge_in_batches_of_two(pool: &sqlx::PgPool) -> (u32, notify_engine::telemetry::Metrics) {
    let metrics = notify_engine::telemetry::Metrics::new();
    let retention = notify_engine::retention::Retention {
        pool: pool.clone(),
        config: notify_engine::config::RetentionConfig {
            batch: 2,
            ..Default::default()
        },
        metrics: metrics.clone(),
    };
    let mut rounds = 1;
    while retention.round().await.unwrap() {
        rounds += 1;
        assert!(
            rounds <= 4,
            "a full batch means more to do, until there is none"
        );
    }
    (rounds, metrics)
}

/// Retention: old rows go in batches, the rest stay, and a user's sequence numbers are not
/// reused once their rows are gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_purges_in_batches_and_never_reuses_a_sequence_number() {
    let (world, engine, tenant) = six_notifications_of_two_users().await;
    let pool = world.pool().await;

    // Retention: rows older than the configured age go, in batches; the rest stay. All of
    // u1's notifications are old.
    sqlx::query("UPDATE notifications SET created_at = now() - interval '100 days' WHERE event_id IN ('r1', 'r2', 'r3', 'r5')")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("UPDATE processed_events SET processed_at = now() - interval '40 days' WHERE event_id IN ('r1', 'r2')")
        .execute(&pool)
        .await
        .unwrap();
    let (rounds, metrics) = purge_in_batches_of_two(&pool).await;
    assert_eq!(
        rounds, 3,
        "4 old rows in batches of 2: two full rounds, one empty"
    );
    assert_eq!(
        world.count("SELECT count(*) FROM notifications").await,
        2,
        "u2's recent r4 and r6 stay"
    );
    assert_eq!(
        world.count("SELECT count(*) FROM processed_events").await,
        4
    );
    assert!(
        metrics
            .render()
            .contains("notify_retention_deleted_total{table=\"notifications\"} 4")
    );
    assert!(
        metrics
            .render()
            .contains("notify_retention_deleted_total{table=\"processed_events\"} 2")
    );
    // Sequence numbers are not reused after a purge, even with none of the user's rows left:
    // u1's next notification is 4, not 1 (a stale Last-Event-ID cannot hide it).
    world
        .produce(&order_paid("r7", &tenant, "u1", None, 1.0))
        .await;
    world
        .wait_count(
            "SELECT max(seq) FROM notifications WHERE user_id = 'u1'",
            4,
            WAIT,
        )
        .await;
    engine.shutdown().await;
}

/// The engine's database user need not be a superuser: with CREATEROLE (and owning its
/// database) it migrates, creates the API role of its database, and its API connections take
/// that role on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_superuser_engine_user_migrates_and_takes_on_the_api_role() {
    use sqlx::{Connection, PgConnection};
    let services = Services::get();
    let user = unique("notify_test_user").replace('-', "_");
    let db = unique("test_nosuper").replace('-', "_");
    let mut admin = PgConnection::connect(&services.database_url).await.unwrap();
    for sql in [
        format!("CREATE ROLE {user} LOGIN PASSWORD 'pw' CREATEROLE"),
        format!("CREATE DATABASE {db} OWNER {user}"),
    ] {
        sqlx::query(&sql).execute(&mut admin).await.unwrap();
    }
    let (base, _) = services.database_url.rsplit_once('/').unwrap();
    let (scheme, rest) = base.split_once("://").unwrap();
    let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    let mut config = notify_engine::config::Config::default();
    config.database.url = format!("{scheme}://{user}:pw@{host}/{db}");
    let pool = notify_engine::store::connect(&config.database, 2).unwrap();
    notify_engine::store::migrate(&pool)
        .await
        .expect("migrations run as a CREATEROLE user");
    let api = notify_engine::store::connect_api(&config.database, 1).unwrap();
    notify_engine::store::ping_api(&api)
        .await
        .expect("the API connection takes on its role");
    let (role,): (String,) = sqlx::query_as("SELECT current_user::text")
        .fetch_one(&api)
        .await
        .unwrap();
    assert!(role.starts_with("notify_api_"), "{role}");
    api.close().await;
    pool.close().await;
    sqlx::query(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .execute(&mut admin)
        .await
        .unwrap();
    sqlx::query(&format!("DROP ROLE {role}"))
        .execute(&mut admin)
        .await
        .unwrap();
    sqlx::query(&format!("DROP ROLE {user}"))
        .execute(&mut admin)
        .await
        .unwrap();
}

/// Retention of the outbox and the dead letters, which hold personal data (recipients, the
/// data an email was rendered from, raw payloads): finished outbox rows older than
/// `retention.email_outbox_days` and dead letters older than `retention.dead_letters_days`
/// go, in batches; an outbox row still waiting to be sent stays however old, and so does
/// everything younger than its window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_purges_finished_email_and_old_dead_letters_but_never_pending_email() {
    let world = World::new().await;
    // Started once for its migrations, then stopped: the test runs the rounds itself.
    world.start(world.config()).await.shutdown().await;
    let pool = world.pool().await;
    // (event id, status, days since queued, days since sent)
    let outbox = [
        ("sent-old", "sent", 40, Some(40)),
        ("failed-old", "failed", 40, None),
        ("skipped-old", "skipped", 40, None),
        // Requeued by an operator 40 days after it was first queued, sent just now.
        ("sent-recently", "sent", 40, Some(0)),
        ("sent-new", "sent", 2, Some(2)),
        ("failed-new", "failed", 2, None),
        // Waiting for the relay for 40 days (a long outage, a requeue): mail not delivered.
        ("pending-old", "pending", 40, None),
        ("sending-old", "sending", 40, None),
    ];
    for (id, status, queued, sent) in outbox {
        sqlx::query(
            "INSERT INTO email_outbox (tenant_id, event_id, recipient, template, data,
                 message_id, status, created_at, queued_at, sent_at, locked_until)
             VALUES ('shop', $1, 'a@example.test', 'order_paid', '{}', $1 || '@test', $2,
                 now() - make_interval(days => $3), now() - make_interval(days => $3),
                 now() - make_interval(days => $4),
                 CASE WHEN $2 = 'sending' THEN now() + interval '1 hour' END)",
        )
        .bind(id)
        .bind(status)
        .bind(queued)
        .bind(sent)
        .execute(&pool)
        .await
        .unwrap();
    }
    // (offset, days old, replayed)
    for (offset, days, replayed) in [(1i64, 40, true), (2, 40, false), (3, 2, false)] {
        sqlx::query(
            "INSERT INTO dead_letters (kafka_topic, kafka_partition, kafka_offset, payload,
                 error_kind, reason, created_at, replayed_at)
             VALUES ('t', 0, $1, '\\x7b7d', 'decode', 'test',
                 now() - make_interval(days => $2),
                 CASE WHEN $3 THEN now() END)",
        )
        .bind(offset)
        .bind(days)
        .bind(replayed)
        .execute(&pool)
        .await
        .unwrap();
    }

    let (rounds, metrics) = purge_in_batches_of_two(&pool).await;
    let left: Vec<(String,)> =
        sqlx::query_as("SELECT event_id FROM email_outbox ORDER BY event_id")
            .fetch_all(&pool)
            .await
            .unwrap();
    let left: Vec<&str> = left.iter().map(|(id,)| id.as_str()).collect();
    assert_eq!(
        left,
        [
            "failed-new",
            "pending-old",
            "sending-old",
            "sent-new",
            "sent-recently"
        ],
        "finished rows past the window go; pending and sending rows never do"
    );
    let offsets: Vec<(i64,)> =
        sqlx::query_as("SELECT kafka_offset FROM dead_letters ORDER BY kafka_offset")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(offsets, [(3,)], "old dead letters go, replayed or not");
    let rendered = metrics.render();
    assert!(
        rendered.contains("notify_retention_deleted_total{table=\"email_outbox\"} 3"),
        "{rendered}"
    );
    assert!(
        rendered.contains("notify_retention_deleted_total{table=\"dead_letters\"} 2"),
        "{rendered}"
    );
    assert_eq!(
        rounds, 2,
        "3 old outbox rows and 2 old dead letters in batches of 2: one full round, one not"
    );
}

/// PostgreSQL unreachable (a TCP proxy in front of it taken down): the engine cannot serve
/// its routes, and `/readyz` says so (503, with the reason), as the status report does;
/// back up, both recover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_unreachable_fails_readiness_until_it_is_back() {
    let world = World::new().await;
    let mut url = reqwest::Url::parse(&world.db_url).unwrap();
    let target: std::net::SocketAddr = format!(
        "{}:{}",
        url.host_str().unwrap().replace("localhost", "127.0.0.1"),
        url.port().unwrap_or(5432)
    )
    .parse()
    .unwrap();
    let proxy = Relay::start(target, true).await;
    url.set_host(Some("127.0.0.1")).unwrap();
    url.set_port(Some(proxy.port)).unwrap();
    let mut config = world.config();
    config.database.url = url.to_string();
    let engine = world.start(config).await;
    eventually("ready with PostgreSQL up", async || {
        readyz(engine.admin_addr).await.0 == 200
    })
    .await;

    proxy.set_up(false);
    eventually("readiness fails with PostgreSQL down", async || {
        readyz(engine.admin_addr).await.0 == 503
    })
    .await;
    let (_, body) = readyz(engine.admin_addr).await;
    assert_eq!(body["status"], "not_ready", "{body}");
    assert_eq!(body["checks"]["postgres"], "unreachable", "{body}");
    assert_eq!(body["reasons"], serde_json::json!(["postgres unreachable"]));
    let report = status(engine.admin_addr).await;
    assert_eq!(report["ready"], false, "{report}");
    assert_eq!(report["status"], "degraded", "{report}");

    proxy.set_up(true);
    eventually("readiness recovers", async || {
        readyz(engine.admin_addr).await.0 == 200
    })
    .await;
    engine.shutdown().await;
}
