//! The HTTP edge under abuse, on the real services: operator endpoints on their own
//! listener, clients that never finish their headers, one address holding every connection.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::*;

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

/// One tenant's requests hold at most its share of the API's database connections
/// (`limits.tenant_pool_percent`): with every request of a flooding tenant stuck on a lock,
/// another tenant is still answered, not told the engine is busy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_tenant_flooding_the_api_leaves_other_tenants_answered() {
    let world = World::new().await;
    let mut config = world.config();
    // A pool of 4: the flooding tenant's share is 2.
    config.database.api_max_connections = 4;
    // The flood waits for its share rather than being refused, so it keeps pressing.
    config.limits.tenant_pool_wait_ms = 60_000;
    let engine = world.start(config).await;
    let flood = unique("flood");
    let pool = world.pool().await;
    sqlx::query("INSERT INTO user_streams (tenant_id, user_id, last_seq) VALUES ($1, 'u1', 0)")
        .bind(&flood)
        .execute(&pool)
        .await
        .unwrap();
    // Hold the user's stream lock: each of their changes waits for it on a connection.
    let mut lock = pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM user_streams WHERE tenant_id = $1 FOR UPDATE")
        .bind(&flood)
        .execute(&mut *lock)
        .await
        .unwrap();
    let token = world.token(&flood, "u1");
    let flooding: Vec<_> = (0..8)
        .map(|_| {
            let api = Api::new(&engine, &token);
            tokio::spawn(async move { api.post("/api/v1/notifications/1/read", None).await })
        })
        .collect();
    let stuck = "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND application_name = 'notify-engine-api'
                   AND wait_event_type = 'Lock'";
    world.wait_until(stuck, |n| n >= 2, WAIT).await;
    // The rest of the flood has had the time to take more connections, if it could.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let other = Api::new(&engine, &world.token(&unique("shop"), "u1"));
    let (status, body) = other.get("/api/v1/notifications").await;
    assert_eq!(status, 200, "another tenant is answered: {body}");
    assert_eq!(
        world.count(stuck).await,
        2,
        "the flood holds its share only"
    );

    lock.rollback().await.unwrap();
    for request in flooding {
        let (status, body) = request.await.unwrap();
        // No such item: the requests ran once the lock was gone, none refused as busy.
        assert_eq!(status, 404, "{body}");
    }
    engine.shutdown().await;
}
