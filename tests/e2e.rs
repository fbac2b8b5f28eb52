//! End-to-end tests on the real services: Kafka in, PostgreSQL, SSE and SMTP (Mailpit) out,
//! routing by real WebAssembly components.
//!
//! Run through `scripts/test.sh`, which starts the services and builds the plugins.

// These tests read and set up rows directly, with SQL of their own: `engine/clippy.toml`
// keeps statements inside `store` for the engine, not for what checks it from outside.
#![allow(clippy::disallowed_methods)]

mod cluster;
mod guests;
mod inbox;
mod live;
mod support;
mod templating;
mod trouble;

use std::time::Duration;

use serde_json::json;
use support::*;

/// Generous: a cold broker creates its consumer-offsets topic on the first group join.
const WAIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_paid_reaches_sse_and_email() {
    let world = World::new().await;
    let engine = world.start(world.config()).await;
    let tenant = unique("shop");
    let address = format!("{}@example.test", unique("alice"));
    let (status, sse, _) = connect_sse(&engine, Some(&world.token(&tenant, "u1")), None).await;
    assert_eq!(status, 200);
    let mut sse = sse.unwrap();

    world
        .produce(&order_paid("p1", &tenant, "u1", Some(&address), 129.9))
        .await;

    let n = sse.next(WAIT).await.expect("a notification over SSE");
    assert_eq!(n.event, "notification");
    assert_eq!(n.id.as_deref(), Some("1"));
    assert_eq!(n.data["title"], "Payment received");
    assert_eq!(
        n.data["body"],
        "We received your payment of 129.90 EUR for order A-p1."
    );
    assert_eq!(n.data["event_id"], "p1");

    let mails = Mailpit::new(&world.services)
        .wait_for(&address, 1, WAIT)
        .await;
    let mail = &mails[0];
    assert_eq!(mail.to, vec![address.clone()]);
    assert_eq!(mail.subject, "Payment received for order A-p1");
    assert!(
        mail.text
            .contains("we received your payment of 129.90 EUR for order A-p1"),
        "{}",
        mail.text
    );
    assert!(
        mail.html.contains("<strong>129.90 EUR</strong>"),
        "{}",
        mail.html
    );

    // A status update becomes a live `order.updated` event for the order list, and an inbox item.
    world
        .produce(&event(
            "s1",
            &tenant,
            "order_status_updated",
            json!({"user_id": "u1", "order_id": "A-p1", "status": "delivered", "previous_status": "shipped"}),
        ))
        .await;
    let mut names = Vec::new();
    for _ in 0..2 {
        let e = sse.next(WAIT).await.expect("status events over SSE");
        if e.event == "order.updated" {
            assert_eq!(e.data["order_id"], "A-p1");
            assert_eq!(e.data["status"], "delivered");
        }
        names.push(e.event);
    }
    names.sort();
    assert_eq!(names, ["notification", "order.updated"]);

    let row = sqlx::query_as::<_, (String, i32, String)>(
        "SELECT status, attempts, message_id FROM email_outbox WHERE event_id = 'p1'",
    )
    .fetch_one(&world.pool().await)
    .await
    .unwrap();
    assert_eq!(row.0, "sent");
    assert_eq!(row.1, 1);
    assert_eq!(
        format!("<{}>", mail.message_id),
        row.2,
        "Message-ID is the outbox row's"
    );
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_and_restarts_yield_one_outcome() {
    let world = World::new().await;
    let tenant = unique("shop");
    let address = format!("{}@example.test", unique("dup"));
    let total = 100;
    let messages = total + 1;
    // The same event twice up front (a producer retry), then a stream of distinct events.
    let first = order_paid("d0", &tenant, "u1", Some(&address), 10.0);
    world.produce(&first).await;
    world.produce(&first).await;
    for i in 1..total {
        world
            .produce(&order_paid(
                &format!("d{i}"),
                &tenant,
                "u1",
                None,
                10.0 + i as f64,
            ))
            .await;
    }
    let consumed = |m: &notify_engine::telemetry::Metrics| {
        m.events_consumed
            .with_label_values(&[&world.topic_paid])
            .get() as i64
    };

    // One event per transaction, and stop as soon as the first ones are committed: the
    // engine is shut down mid-stream.
    let mut config = world.config();
    config.kafka.batch_max = 1;
    let engine = world.start(config).await;
    let first_run = engine.metrics.clone();
    world
        .wait_until("SELECT count(*) FROM notifications", |n| n >= 1, WAIT)
        .await;
    engine.shutdown().await;
    let done_before_restart = world.count("SELECT count(*) FROM processed_events").await;
    assert!(
        done_before_restart < total,
        "the first run was meant to stop mid-stream, it finished all {total}"
    );

    // Restart in the same group: it resumes after the committed offsets and finishes,
    // re-reading nothing and skipping nothing.
    let engine = world.start(world.config()).await;
    let second_run = engine.metrics.clone();
    world
        .wait_count("SELECT count(*) FROM processed_events", total, WAIT)
        .await;
    engine.shutdown().await;
    assert_eq!(
        consumed(&first_run) + consumed(&second_run),
        messages,
        "every message consumed exactly once across the restart"
    );

    // A new consumer group re-reads everything from the beginning (an offset reset).
    let mut config = world.config();
    config.kafka.group_id = unique("group");
    let engine = world.start(config).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while engine.metrics.events_duplicate.get() < messages as u64 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "redelivery not consumed: {} duplicates",
            engine.metrics.events_duplicate.get()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(engine.metrics.notifications_written.get(), 0);
    engine.shutdown().await;

    assert_eq!(
        world.count("SELECT count(*) FROM notifications").await,
        total
    );
    assert_eq!(
        world
            .count("SELECT count(DISTINCT event_id) FROM notifications")
            .await,
        total
    );
    assert_eq!(world.count("SELECT count(*) FROM email_outbox").await, 1);
    // Notification sequence numbers are gapless: no half-written batch ever committed.
    assert_eq!(
        world
            .count("SELECT max(seq) FROM notifications WHERE user_id = 'u1'")
            .await,
        total
    );
    Mailpit::new(&world.services)
        .wait_for(&address, 1, WAIT)
        .await;
}

/// A batch is written in a handful of statements: the same event twice in one batch is
/// stored once, a user's several notifications get consecutive numbers, and a user's stream
/// row set back (a restore) heals to one past their highest stored number.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_numbers_each_users_notifications_once_and_in_order() {
    let world = World::new().await;
    let tenant = unique("shop");
    let engine = world.start(world.config()).await;
    world
        .produce(&order_paid("h1", &tenant, "u2", None, 1.0))
        .await;
    world
        .wait_count("SELECT count(*) FROM notifications", 1, WAIT)
        .await;
    engine.shutdown().await;
    let pool = world.pool().await;
    sqlx::query("UPDATE user_streams SET last_seq = 0 WHERE user_id = 'u2'")
        .execute(&pool)
        .await
        .unwrap();

    let twice = order_paid("d0", &tenant, "u1", None, 10.0);
    world.produce(&twice).await;
    world.produce(&twice).await;
    for i in 1..=5 {
        world
            .produce(&order_paid(&format!("d{i}"), &tenant, "u1", None, 10.0))
            .await;
    }
    let shipped = json!({"user_id": "u2", "order_id": "A-s1", "status": "shipped"});
    world
        .produce(&event("s1", &tenant, "order_status_updated", shipped))
        .await;
    world
        .produce(&order_paid("h2", &tenant, "u2", None, 2.0))
        .await;

    // Everything waiting in Kafka, and a long linger: one batch (or very few).
    let mut config = world.config();
    config.kafka.batch_linger_ms = 1_000;
    let engine = world.start(config).await;
    world
        .wait_count("SELECT count(*) FROM processed_events", 9, WAIT)
        .await;
    assert_eq!(engine.metrics.events_duplicate.get(), 1);
    let seqs = |user: &'static str| {
        let pool = pool.clone();
        async move {
            sqlx::query_as::<_, (i64, String)>(
                "SELECT seq, event_id FROM notifications WHERE user_id = $1 ORDER BY seq",
            )
            .bind(user)
            .fetch_all(&pool)
            .await
            .unwrap()
        }
    };
    let u1 = seqs("u1").await;
    assert_eq!(
        u1,
        (0..=5)
            .map(|i| (i as i64 + 1, format!("d{i}")))
            .collect::<Vec<_>>(),
        "in production order, once each"
    );
    let u2 = seqs("u2").await;
    assert_eq!(
        u2.iter().map(|(seq, _)| *seq).collect::<Vec<_>>(),
        [1, 2, 3, 4],
        "{u2:?}: numbered on from the highest stored, not from the set-back row"
    );
    assert_eq!(u2.iter().filter(|(_, e)| e == "s1").count(), 2);
    let (last,): (i64,) = sqlx::query_as("SELECT last_seq FROM user_streams WHERE user_id = 'u2'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(last, 4);
    engine.shutdown().await;
}

/// Lanes' batches share transactions (group commit): thirty tenants' events waiting in
/// Kafka are committed in fewer transactions than there are tenants. When the database
/// refuses one message's data in a shared transaction, that message alone is dead-lettered
/// and the other tenants' batches of its group are stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_share_transactions_and_refused_data_stays_with_its_message() {
    let world = World::new().await;
    let tenants: Vec<String> = (0..30).map(|i| unique(&format!("g{i}"))).collect();
    for (i, tenant) in tenants.iter().enumerate() {
        world
            .produce(&order_paid(&format!("a{i}"), tenant, "u1", None, 1.0))
            .await;
    }
    let engine = world.start(world.config()).await;
    world
        .wait_count("SELECT count(*) FROM notifications", 30, WAIT)
        .await;
    let transactions = engine.metrics.batch_seconds.get_sample_count();
    assert!(
        transactions < 30,
        "{transactions} transactions for 30 tenants' batches: they were not grouped"
    );
    engine.shutdown().await;

    // No event can make PostgreSQL refuse its data today (the envelope and the plugin output
    // are checked first), so a trigger stands in for the day one does: class 22, about the
    // data, like an invalid byte sequence.
    let pool = world.pool().await;
    sqlx::raw_sql(
        "CREATE FUNCTION refuse_user() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF NEW.user_id = 'refused' THEN
                 RAISE EXCEPTION 'refused for the test' USING ERRCODE = '22023';
             END IF;
             RETURN NEW;
         END $$;
         CREATE TRIGGER refuse_user BEFORE INSERT ON notifications
             FOR EACH ROW EXECUTE FUNCTION refuse_user();",
    )
    .execute(&pool)
    .await
    .unwrap();
    for (i, tenant) in tenants.iter().enumerate() {
        world
            .produce(&order_paid(&format!("b{i}"), tenant, "u1", None, 1.0))
            .await;
        if i == 7 {
            world
                .produce(&order_paid("bad", tenant, "refused", None, 1.0))
                .await;
            world
                .produce(&order_paid("c7", tenant, "u1", None, 1.0))
                .await;
        }
    }
    let engine = world.start(world.config()).await;
    world
        .wait_count("SELECT count(*) FROM dead_letters", 1, WAIT)
        .await;
    world
        .wait_count("SELECT count(*) FROM notifications", 61, WAIT)
        .await;
    let dead: Vec<(String, String, String)> =
        sqlx::query_as("SELECT tenant_id, event_id, error_kind FROM dead_letters")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(dead, [(tenants[7].clone(), "bad".into(), "store".into())]);
    let (claimed,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM processed_events WHERE event_id = 'bad'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(
        claimed, 0,
        "a refused event is not claimed: fixed, it can come again"
    );
    engine.shutdown().await;
}

/// The duplicate check's plan, made while `processed_events` is empty (a new deployment)
/// and cached by the connection, still probes the primary key once the table has grown.
/// The plain join it replaced stayed a sequential scan of the whole table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_duplicate_check_keeps_to_the_index_as_the_table_grows() {
    let world = World::new().await;
    world.start(world.config()).await.shutdown().await;
    let pool = world.pool().await;
    let mut conn = pool.acquire().await.unwrap();
    sqlx::raw_sql(&format!(
        "SET plan_cache_mode = force_generic_plan;
         PREPARE duplicate_check(text[], text[]) AS {};
         EXPLAIN EXECUTE duplicate_check('{{t}}', '{{e}}');",
        notify_engine::store::ALREADY_PROCESSED_SQL
    ))
    .execute(&mut *conn)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO processed_events
             (tenant_id, event_id, event_type, outcome, kafka_topic, kafka_partition, kafka_offset)
         SELECT 't', 'e' || i, 'order_paid', 'routed', 'orders', 0, i
         FROM generate_series(1, 20000) i",
    )
    .execute(&mut *conn)
    .await
    .unwrap();
    let plan: Vec<(String,)> = sqlx::query_as("EXPLAIN EXECUTE duplicate_check('{t}', '{e7}')")
        .fetch_all(&mut *conn)
        .await
        .unwrap();
    let plan: Vec<String> = plan.into_iter().map(|(line,)| line).collect();
    let plan = plan.join("\n");
    assert!(plan.contains("processed_events_pkey"), "{plan}");
    assert!(!plan.contains("Seq Scan"), "{plan}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_message_is_dead_lettered_between_good_ones() {
    let world = World::new().await;
    let engine = world.start(world.config()).await;
    let tenant = unique("shop");
    world
        .produce(&order_paid("g1", &tenant, "u1", None, 1.0))
        .await;
    world
        .produce_raw(&world.topic_paid, b"{\"id\": \"broken\", this is not json")
        .await;
    world
        .produce(&order_paid("g2", &tenant, "u1", None, 2.0))
        .await;
    // Valid JSON, invalid envelope: names the field.
    world
        .produce_raw(
            &world.topic_paid,
            br#"{"id":"x","tenant":"t","type":"order_paid","data":{}}"#,
        )
        .await;

    world
        .wait_count(
            "SELECT count(*) FROM notifications WHERE event_id IN ('g1','g2')",
            2,
            WAIT,
        )
        .await;
    world
        .wait_count("SELECT count(*) FROM dead_letters", 2, WAIT)
        .await;
    let pool = world.pool().await;
    let rows: Vec<(String, String, Vec<u8>, String, i64)> = sqlx::query_as(
        "SELECT error_kind, reason, payload, kafka_topic, kafka_offset FROM dead_letters ORDER BY id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let decode = rows
        .iter()
        .find(|r| r.0 == "decode")
        .expect("a decode dead letter");
    assert!(decode.1.contains("not a JSON envelope"), "{}", decode.1);
    assert_eq!(decode.2, b"{\"id\": \"broken\", this is not json");
    assert_eq!(decode.3, world.topic_paid);
    let invalid = rows
        .iter()
        .find(|r| r.0 == "validation")
        .expect("a validation dead letter");
    assert!(invalid.1.contains("time is required"), "{}", invalid.1);
    assert_eq!(
        engine
            .metrics
            .events_dead_lettered
            .with_label_values(&["decode"])
            .get(),
        1
    );
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_are_isolated() {
    let world = World::new().await;
    let engine = world.start(world.config()).await;
    let tenant = unique("shop");
    let other_tenant = unique("shop");

    let (_, mine, _) = connect_sse(&engine, Some(&world.token(&tenant, "u1")), None).await;
    let (_, other_user, _) = connect_sse(&engine, Some(&world.token(&tenant, "u2")), None).await;
    let (_, other_tenant_same_user, _) =
        connect_sse(&engine, Some(&world.token(&other_tenant, "u1")), None).await;
    let (mut mine, mut other_user, mut other_tenant_same_user) = (
        mine.unwrap(),
        other_user.unwrap(),
        other_tenant_same_user.unwrap(),
    );
    world
        .produce(&order_paid("i1", &tenant, "u1", None, 5.0))
        .await;
    let got = mine.next(WAIT).await.expect("own notification");
    assert_eq!(got.data["event_id"], "i1");
    other_user.expect_nothing(Duration::from_secs(2)).await;
    other_tenant_same_user
        .expect_nothing(Duration::from_millis(200))
        .await;
    // Replay cannot cross the wall either.
    let (_, replay, _) =
        connect_sse(&engine, Some(&world.token(&other_tenant, "u1")), Some("0")).await;
    replay.unwrap().expect_nothing(Duration::from_secs(1)).await;

    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_event_id_replays_exactly_the_missed_notifications() {
    let world = World::new().await;
    let engine = world.start(world.config()).await;
    let tenant = unique("shop");
    let token = world.token(&tenant, "u1");
    let (_, sse, _) = connect_sse(&engine, Some(&token), None).await;
    let mut sse = sse.unwrap();
    for i in 1..=2 {
        world
            .produce(&order_paid(&format!("r{i}"), &tenant, "u1", None, 1.0))
            .await;
        let e = sse.next(WAIT).await.expect("live notification");
        assert_eq!(e.id.as_deref(), Some(i.to_string().as_str()));
    }
    drop(sse);
    // Missed while disconnected.
    for i in 3..=5 {
        world
            .produce(&order_paid(&format!("r{i}"), &tenant, "u1", None, 1.0))
            .await;
    }
    world
        .wait_count("SELECT count(*) FROM notifications", 5, WAIT)
        .await;

    let (status, sse, _) = connect_sse(&engine, Some(&token), Some("2")).await;
    assert_eq!(status, 200);
    let mut sse = sse.unwrap();
    for i in 3..=5 {
        let e = sse.next(WAIT).await.expect("replayed notification");
        assert_eq!(e.id.as_deref(), Some(i.to_string().as_str()));
        assert_eq!(e.data["event_id"], format!("r{i}"));
    }
    sse.expect_nothing(Duration::from_millis(500)).await;
    // And the stream goes on live after the replay.
    world
        .produce(&order_paid("r6", &tenant, "u1", None, 1.0))
        .await;
    assert_eq!(sse.next(WAIT).await.unwrap().id.as_deref(), Some("6"));

    // A fresh stream's first frame carries the cursor as its id, so a browser that loses
    // the connection before any event still reconnects with Last-Event-ID.
    let (_, fresh, _) = connect_sse(&engine, Some(&token), None).await;
    let mut fresh = fresh.unwrap();
    fresh.expect_nothing(Duration::from_millis(300)).await;
    assert_eq!(fresh.last_id.as_deref(), Some("6"));
    // An id from the future (a database reset) starts at "now" instead of hiding events.
    let (_, future, _) = connect_sse(&engine, Some(&token), Some("999")).await;
    let mut future = future.unwrap();
    world
        .produce(&order_paid("r7", &tenant, "u1", None, 1.0))
        .await;
    assert_eq!(future.next(WAIT).await.unwrap().id.as_deref(), Some("7"));

    let (status, _, body) = connect_sse(&engine, Some(&token), Some("yesterday")).await;
    assert_eq!(status, 400, "{body}");
    engine.shutdown().await;
}

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

/// An SMTP outage delays email without stalling anything else; a broken template fails its
/// email for good with the file and line; both are recorded on the outbox row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn email_outage_is_retried_and_broken_templates_fail_cleanly() {
    let world = World::new().await;
    let templates = tempfile::tempdir().unwrap();
    copy_dir(&world.services.templates, templates.path());
    let broken_tenant = unique("broken");
    let subject = templates
        .path()
        .join(&broken_tenant)
        .join("order_paid/subject.hbs");
    std::fs::create_dir_all(subject.parent().unwrap()).unwrap();
    std::fs::write(&subject, "Paid {{#if order_id}}unclosed").unwrap();

    let mut config = world.config();
    config.email.templates_dir = templates.path().to_owned();
    // Nothing listens on port 1 (privileged, outside the ephemeral range other tests'
    // listeners use): every attempt fails with "connection refused".
    config.smtp.port = 1;
    let engine = world.start(config.clone()).await;

    let tenant = unique("shop");
    let address = format!("{}@example.test", unique("outage"));
    let (_, sse, _) = connect_sse(&engine, Some(&world.token(&tenant, "u1")), None).await;
    let mut sse = sse.unwrap();
    world
        .produce(&order_paid("o1", &tenant, "u1", Some(&address), 3.0))
        .await;
    world
        .produce(&order_paid("b1", &broken_tenant, "u1", Some(&address), 4.0))
        .await;
    // In-app delivery does not wait for SMTP.
    assert_eq!(sse.next(WAIT).await.unwrap().data["event_id"], "o1");
    world
        .wait_until(
            "SELECT coalesce(max(attempts), 0)::bigint FROM email_outbox WHERE event_id = 'o1' AND status = 'pending'",
            |n| n >= 2,
            WAIT,
        )
        .await;
    let pool = world.pool().await;
    let (last_error,): (String,) =
        sqlx::query_as("SELECT last_error FROM email_outbox WHERE event_id = 'o1'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(last_error.contains("smtp"), "{last_error}");
    world
        .wait_count(
            "SELECT count(*) FROM email_outbox WHERE event_id = 'b1' AND status = 'failed'",
            1,
            WAIT,
        )
        .await;
    let (attempts, reason): (i32, String) =
        sqlx::query_as("SELECT attempts, last_error FROM email_outbox WHERE event_id = 'b1'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(attempts, 1, "a broken template is not retried");
    assert!(
        reason.contains("subject.hbs: line 1"),
        "the reason names file and line: {reason}"
    );
    assert!(engine.metrics.emails_retried.get() >= 1);
    engine.shutdown().await;

    // SMTP is back: the pending email goes out, exactly once.
    config.smtp.port = world.services.smtp_port;
    let engine = world.start(config).await;
    let mails = Mailpit::new(&world.services)
        .wait_for(&address, 1, WAIT)
        .await;
    assert_eq!(mails[0].subject, "Payment received for order A-o1");
    world
        .wait_count(
            "SELECT count(*) FROM email_outbox WHERE event_id = 'o1' AND status = 'sent'",
            1,
            WAIT,
        )
        .await;
    engine.shutdown().await;
}

/// Health, readiness and metrics, as an operator's probes see them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_and_metrics() {
    let world = World::new().await;
    let engine = world.start(world.config()).await;
    let http = reqwest::Client::new();
    let base = format!("http://{}", engine.admin_addr);
    let health = http.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    // Readiness turns green once the Kafka probe has answered.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let ready = http.get(format!("{base}/readyz")).send().await.unwrap();
        let status = ready.status();
        let body: serde_json::Value = ready.json().await.unwrap();
        if status == 200 {
            assert_eq!(body["checks"]["postgres"], "ok");
            assert_eq!(body["checks"]["kafka"], "ok");
            assert_eq!(body["checks"]["pipeline"], "ok");
            assert_eq!(body["checks"]["plugins"]["default"], "ok");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never ready: {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let tenant = unique("shop");
    world
        .produce(&order_paid("m1", &tenant, "u1", None, 1.0))
        .await;
    world
        .wait_count("SELECT count(*) FROM notifications", 1, WAIT)
        .await;
    let (_, _sse, _) = connect_sse(&engine, Some(&world.token(&tenant, "u1")), None).await;
    let metrics = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        format!(
            "notify_events_consumed_total{{topic=\"{}\"}} 1",
            world.topic_paid
        ),
        "notify_notifications_written_total 1".to_string(),
        "notify_sse_connections 1".to_string(),
        "notify_plugin_calls_total{outcome=\"ok\",tenant=\"_other\",world=\"routing\"} 1"
            .to_string(),
        "notify_emails_skipped_total 0".to_string(),
        "notify_emails_rate_limited_total 0".to_string(),
        "notify_tenant_budget_pauses_total 0".to_string(),
        "notify_partition_pauses_total 0".to_string(),
        // The one event went through every stage of the pipeline once.
        "notify_stage_seconds_count{stage=\"kafka\"} 1".to_string(),
        "notify_stage_seconds_count{stage=\"queue\"} 1".to_string(),
        "notify_stage_seconds_count{stage=\"route\"} 1".to_string(),
        "notify_stage_seconds_count{stage=\"commit\"} 1".to_string(),
        "notify_stage_seconds_count{stage=\"stream_read\"}".to_string(),
    ] {
        assert!(metrics.contains(&line), "missing {line:?} in\n{metrics}");
    }
    engine.shutdown().await;
    // Shut down: nothing listens any more.
    assert!(http.get(format!("{base}/healthz")).send().await.is_err());
}

/// A listening stream takes the rows its instance commits from memory: after the opening
/// read, live events cost it no read of PostgreSQL (`stream_read` counts every read). It
/// used to read once more after each event, to find nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listening_stream_takes_live_rows_without_reading_postgres() {
    let world = World::new().await;
    let engine = world.start(world.config()).await;
    let tenant = unique("shop");
    let (status, sse, _) = connect_sse(&engine, Some(&world.token(&tenant, "u1")), None).await;
    assert_eq!(status, 200);
    let mut sse = sse.unwrap();
    let reads = || async {
        metric(
            &engine,
            r#"notify_stage_seconds_count{stage="stream_read"}"#,
        )
        .await
        .unwrap_or(0.0)
    };
    // The first event: by its frame, the stream's opening read is done.
    world
        .produce(&order_paid("r1", &tenant, "u1", None, 1.0))
        .await;
    assert_eq!(
        sse.next(WAIT).await.expect("frame 1").id.as_deref(),
        Some("1")
    );
    let opened = reads().await;
    assert!(opened >= 1.0, "the opening read is counted: {opened}");
    for n in 2..=6 {
        world
            .produce(&order_paid(&format!("r{n}"), &tenant, "u1", None, 1.0))
            .await;
        let frame = sse.next(WAIT).await.expect("a live frame");
        assert_eq!(frame.id, Some(n.to_string()));
    }
    // Let a stray read (the old behaviour: one after each frame) be counted before looking.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        reads().await,
        opened,
        "live rows came from memory, with no read"
    );
    engine.shutdown().await;
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            std::fs::create_dir_all(&target).unwrap();
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
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
