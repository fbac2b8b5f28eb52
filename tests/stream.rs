//! The SSE stream, on the real services: replay from `Last-Event-ID`, live rows taken from
//! memory, replays bounded in bytes and rate, and a stream that outlives failing reads.

use std::time::Duration;

use serde_json::Value;

use crate::support::*;

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
    let page = notify_engine::store::notifications::notifications_after(
        &api, &tenant, "u1", 0, 200, 150_000,
    )
    .await
    .unwrap();
    assert_eq!(
        page.len(),
        2,
        "two rows of ~60 KB fit in 150 KB, a third does not"
    );
    let page = notify_engine::store::notifications::notifications_after(
        &api, &tenant, "u1", 0, 200, 1_000,
    )
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

/// Reconnecting in a loop with `Last-Event-ID` (a shallow replay each time, which no
/// deep-replay limit sees) is held to the user's request rate: past the burst, `429` with
/// `Retry-After`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shallow_replays_in_a_loop_are_held_to_the_request_rate() {
    let world = World::new().await;
    let mut config = world.config();
    config.limits.user_per_second = 1;
    config.limits.user_burst = 4;
    let engine = world.start(config).await;
    let tenant = unique("shop");
    world
        .produce(&order_paid("r1", &tenant, "u1", None, 1.0))
        .await;
    world
        .wait_count("SELECT count(*) FROM notifications", 1, WAIT)
        .await;
    let token = world.token(&tenant, "u1");
    let mut opened = 0;
    let refusal = loop {
        let response = reqwest::Client::new()
            .get(format!("http://{}/api/v1/sse", engine.http_addr))
            .bearer_auth(&token)
            .header("Last-Event-ID", "1")
            .send()
            .await
            .unwrap();
        if response.status() != 200 {
            break response;
        }
        opened += 1;
        assert!(opened <= 10, "10 replays in a row and none refused");
        // The client leaves at once, as one reconnecting in a loop does.
        drop(response);
    };
    assert_eq!(refusal.status(), 429);
    // The burst, and perhaps a token that came back meanwhile.
    assert!((4..=6).contains(&opened), "{opened}");
    assert!((1..=2).contains(&retry_after(refusal.headers())));
    let body: Value = refusal.json().await.unwrap();
    assert_eq!(body["error"]["code"], "too_many_requests");
    engine.shutdown().await;
}
