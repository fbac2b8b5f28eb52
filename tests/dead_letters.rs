//! Dead letters, on the real services: what cannot be handled is set aside with its payload
//! and reason between good messages (a CloudEvent without `source` among it, while one
//! without `time` is handled), kept at a reused offset, and replayed once its cause is fixed
//! (`notify-engine dead-letters list|replay`), with tokens that count only for their own
//! message and only while fresh.

use std::time::Duration;

use notify_engine::store::dead_letters::{self, NewDeadLetter};
use notify_engine::store::{self, Origin};

use crate::support::*;

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
        dead_letters::insert_dead_letter(&mut tx, &letter(b"first life"))
            .await
            .unwrap()
    );
    assert!(
        !dead_letters::insert_dead_letter(&mut tx, &letter(b"first life"))
            .await
            .unwrap(),
        "a redelivery is stored once"
    );
    assert!(
        dead_letters::insert_dead_letter(&mut tx, &letter(b"second life"))
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

/// Dead letters are replayed once the cause is fixed: an event dead-lettered by a trapping
/// plugin (and claimed) is routed again by the fixed plugin, and replaying it twice still
/// yields one outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_replay_once_the_cause_is_fixed() {
    use notify_engine::store::dead_letters::DeadLetterFilter;
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

    engine.shutdown().await;
}

/// A message that cannot be decoded is dead-lettered again when replayed, as itself, and the
/// original is marked replayed: the next replay does not pick it up again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_dead_letter_replays_as_itself_once() {
    use notify_engine::store::dead_letters::DeadLetterFilter;
    use notify_engine::tools;

    let world = World::new().await;
    let config = world.config();
    let engine = world.start(config.clone()).await;
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

/// A replay token is checked before its message is routed, and counts only for the message
/// it was issued for, while fresh: moved onto another payload it is refused, expired it is
/// refused, each refusal is a dead letter saying why (the message kept), and the original
/// dead letter stays, to be replayed with a valid token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_tokens_are_bound_to_their_payload_and_expire() {
    use notify_engine::model::REPLAY_HEADER;
    use notify_engine::store::dead_letters::DeadLetterFilter;
    use notify_engine::tools;

    let world = World::new().await;
    let tenant = unique("bound");
    world.install_chaos_plugin(&tenant);
    let config = world.config();
    let engine = world.start(config.clone()).await;
    let mut bad = order_paid("t1", &tenant, "u1", None, 5.0);
    bad["data"]["chaos"] = "trap".into();
    world.produce(&bad).await;
    world
        .wait_count(
            "SELECT count(*) FROM dead_letters WHERE event_id = 't1' AND error_kind = 'plugin_trap'",
            1,
            WAIT,
        )
        .await;
    install_build(&world, &engine, &tenant, "default.wasm").await;
    let pool = world.pool().await;
    let original = DeadLetterFilter {
        tenant: Some(tenant.clone()),
        kind: Some("plugin_trap".into()),
        limit: 100,
        ..Default::default()
    };
    // A token as the replay tool issues it, but the message it travels with is chosen here.
    let issued = dead_letters::prepare_replays(&pool, &original)
        .await
        .unwrap();
    assert_eq!(issued.len(), 1);
    let token = issued[0].replay_token.to_string();
    let refused = |reason: &'static str| {
        format!(
            "SELECT count(*) FROM dead_letters WHERE error_kind = 'validation' \
             AND event_id = 't1' AND reason LIKE 'replay refused: %{reason}%'"
        )
    };

    // Moved onto another payload (the same event id, other data): refused before routing.
    let mut forged = order_paid("t1", &tenant, "mallory", None, 999.0);
    forged["data"]["note"] = "not what was dead-lettered".into();
    let forged_bytes = forged.to_string();
    world
        .produce_with_headers(
            &world.topic_paid,
            None,
            forged_bytes.as_bytes(),
            &[(REPLAY_HEADER, token.as_str())],
        )
        .await;
    world
        .wait_count(&refused("issued for another payload"), 1, WAIT)
        .await;
    let (kept,): (Vec<u8>,) = sqlx::query_as(
        "SELECT payload FROM dead_letters WHERE reason LIKE 'replay refused: %another payload%'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(kept, forged_bytes.as_bytes(), "the refused message is kept");

    // The right payload, but the token is older than kafka.replay_token_ttl_secs: refused.
    sqlx::query("UPDATE dead_letters SET replay_token_at = now() - interval '2 days' WHERE replay_token = $1::uuid")
        .bind(&token)
        .execute(&pool)
        .await
        .unwrap();
    world
        .produce_with_headers(
            &world.topic_paid,
            None,
            &issued[0].payload,
            &[(REPLAY_HEADER, token.as_str())],
        )
        .await;
    world.wait_count(&refused("expired"), 1, WAIT).await;
    // A header that is no token at all: refused too.
    world
        .produce_with_headers(
            &world.topic_paid,
            None,
            &issued[0].payload,
            &[(REPLAY_HEADER, "let-me-in")],
        )
        .await;
    world
        .wait_count(&refused("not a replay token"), 1, WAIT)
        .await;
    // A well-formed token the engine never issued grants nothing and costs nothing: a new
    // event carrying one is handled as any other.
    let made_up = uuid::Uuid::new_v4().to_string();
    world
        .produce_with_headers(
            &world.topic_paid,
            None,
            order_paid("t2", &tenant, "u2", None, 1.0)
                .to_string()
                .as_bytes(),
            &[(REPLAY_HEADER, made_up.as_str())],
        )
        .await;
    world
        .wait_count(
            "SELECT count(*) FROM notifications WHERE event_id = 't2'",
            1,
            WAIT,
        )
        .await;
    assert_eq!(
        world
            .count("SELECT count(*) FROM notifications WHERE event_id = 't1'")
            .await,
        0,
        "no refused replay was routed"
    );
    assert_eq!(
        world
            .count("SELECT count(*) FROM dead_letters WHERE event_id = 't1' AND error_kind = 'plugin_trap' AND replayed_at IS NULL")
            .await,
        1,
        "the original dead letter is untouched"
    );

    // A valid replay, by the tool: the original payload, routed once.
    let replayed = tools::replay_dead_letters(&config.kafka, &config.database, &original)
        .await
        .unwrap();
    assert_eq!(replayed, 1);
    world
        .wait_count(
            "SELECT count(*) FROM notifications WHERE event_id = 't1'",
            1,
            WAIT,
        )
        .await;
    let (user,): (String,) =
        sqlx::query_as("SELECT user_id FROM notifications WHERE event_id = 't1'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(user, "u1", "the dead-lettered event, not the forged one");
    world
        .wait_count(
            "SELECT count(*) FROM dead_letters WHERE event_id = 't1' AND error_kind = 'plugin_trap' AND replayed_at IS NOT NULL",
            1,
            WAIT,
        )
        .await;
    engine.shutdown().await;
}

/// CloudEvents 1.0 through Kafka: `time` is optional (the record's Kafka timestamp stands
/// in, so the email is not mistaken for an old event's), `source` is required (a CloudEvent
/// without it is set aside with the reason).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloudevents_need_a_source_but_not_a_time() {
    let world = World::new().await;
    let engine = world.start(world.config()).await;
    let tenant = unique("ce");
    let data = order_paid("x", &tenant, "u1", Some("u1@example.com"), 3.0)["data"].clone();
    let structured = |id: &str, source: Option<&str>| {
        let mut ce = serde_json::json!({
            "specversion": "1.0", "id": id, "type": "order_paid",
            "tenant": tenant, "datacontenttype": "application/json", "data": data,
        });
        if let Some(source) = source {
            ce["source"] = source.into();
        }
        ce.to_string()
    };
    // Structured and binary mode, neither with a time.
    world
        .produce_raw(
            &world.topic_paid,
            structured("ce1", Some("/payments")).as_bytes(),
        )
        .await;
    world
        .produce_with_headers(
            &world.topic_paid,
            None,
            data.to_string().as_bytes(),
            &[
                ("ce_specversion", "1.0"),
                ("ce_id", "ce2"),
                ("ce_type", "order_paid"),
                ("ce_source", "/payments"),
                ("ce_tenant", tenant.as_str()),
            ],
        )
        .await;
    // Without a source.
    world
        .produce_raw(&world.topic_paid, structured("ce3", None).as_bytes())
        .await;
    world
        .wait_count(
            "SELECT count(*) FROM notifications WHERE event_id IN ('ce1', 'ce2')",
            2,
            WAIT,
        )
        .await;
    world
        .wait_count(
            "SELECT count(*) FROM dead_letters WHERE event_id = 'ce3' AND error_kind = 'validation' \
             AND reason LIKE '%source is required%'",
            1,
            WAIT,
        )
        .await;
    assert_eq!(
        world
            .count("SELECT count(*) FROM email_outbox WHERE event_id IN ('ce1', 'ce2') AND status <> 'skipped'")
            .await,
        2,
        "a timeless event is as new as its Kafka record: its email is sent, not skipped as old"
    );
    assert_eq!(
        world
            .count("SELECT count(*) FROM notifications WHERE event_id = 'ce3'")
            .await,
        0
    );
    engine.shutdown().await;
}
