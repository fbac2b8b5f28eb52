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
