//! The published contracts against the real thing: Kafka messages (the native envelope,
//! CloudEvents in both modes) and SSE frames held to the AsyncAPI document's schemas.

use std::path::Path;

use serde_json::{Value, json};

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_messages_and_sse_frames_match_the_asyncapi_contract() {
    let world = World::new().await;
    let engine = world.start(world.config()).await;
    let contracts = Contracts::load();
    let tenant = unique("shop");
    let (_, stream, _) = connect_sse(&engine, Some(&world.token(&tenant, "u1")), None).await;
    let mut stream = stream.unwrap();

    // The native envelope.
    let envelope = order_paid("c1", &tenant, "u1", None, 12.5);
    contracts.check("event-envelope", &envelope);
    world.produce(&envelope).await;
    // CloudEvents, structured mode.
    let structured = json!({
        "specversion": "1.0", "id": "c2", "source": "/payments", "type": "order_paid",
        "time": chrono::Utc::now().to_rfc3339(), "tenant": tenant,
        "datacontenttype": "application/json",
        "data": { "order_id": "A-c2", "user_id": "u1", "amount": 3.0, "currency": "EUR" },
    });
    contracts.check("cloudevent-structured", &structured);
    world
        .produce_raw(&world.topic_paid, structured.to_string().as_bytes())
        .await;
    // CloudEvents, binary mode: attributes in ce_ headers, the data as the value.
    let time = chrono::Utc::now().to_rfc3339();
    let headers = [
        ("ce_specversion", "1.0"),
        ("ce_id", "c3"),
        ("ce_type", "order_status_updated"),
        ("ce_source", "/orders"),
        ("ce_time", time.as_str()),
        ("ce_tenant", tenant.as_str()),
        ("content-type", "application/json"),
    ];
    let header_object: serde_json::Map<String, Value> = headers
        .iter()
        .map(|(k, v)| ((*k).to_owned(), json!(v)))
        .collect();
    contracts.check("cloudevent-binary-headers", &Value::Object(header_object));
    let data = json!({ "order_id": "A-c3", "user_id": "u1", "status": "shipped", "previous_status": "processing" });
    contracts.check("event-data", &data);
    world
        .produce_with_headers(
            &world.topic_status,
            None,
            data.to_string().as_bytes(),
            &headers,
        )
        .await;

    // Every frame that arrives holds to its schema: a notification of each, and the live
    // update of the binary-mode one (partitions interleave, so compared sorted).
    let mut frames = Vec::new();
    for _ in 0..4 {
        let e = stream.next(WAIT).await.expect("a frame");
        contracts.check_sse(&e);
        frames.push((e.event, e.data["event_id"].as_str().unwrap().to_owned()));
    }
    frames.sort_by(|a, b| (&a.1, &a.0).cmp(&(&b.1, &b.0)));
    assert_eq!(
        frames,
        [
            ("notification".into(), "c1".into()),
            ("notification".into(), "c2".into()),
            ("notification".into(), "c3".into()),
            ("order.updated".into(), "c3".into()),
        ]
    );
    // A binary-mode message without its tenant is dead-lettered with the reason.
    world
        .produce_with_headers(
            &world.topic_status,
            None,
            data.to_string().as_bytes(),
            &headers[..5],
        )
        .await;
    world
        .wait_count(
            "SELECT count(*) FROM dead_letters WHERE reason LIKE '%tenant is required%'",
            1,
            WAIT,
        )
        .await;
    engine.shutdown().await;
}

/// The AsyncAPI document names every schema it relies on, and each exists (no services
/// needed for this one).
#[test]
fn the_asyncapi_document_names_every_schema_it_relies_on() {
    // The document names every schema it relies on, and each exists.
    let asyncapi: Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../contracts/asyncapi.json"),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(asyncapi["asyncapi"], "3.0.0");
    let text = asyncapi.to_string();
    for schema in [
        "event-envelope",
        "cloudevent-structured",
        "cloudevent-binary-headers",
        "sse-notification",
        "sse-notification-read",
        "sse-notification-archived",
        "sse-auth-expired",
        "sse-live-update",
    ] {
        assert!(
            text.contains(&format!("schemas/{schema}.schema.json")),
            "{schema} not in asyncapi.json"
        );
    }
}
