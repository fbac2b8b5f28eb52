//! The HTTP edge under abuse, on the real services: operator endpoints on their own
//! listener, clients that never finish their headers, one address holding every connection,
//! clients behind a trusted proxy, a reader too slow for its stream, one tenant taking every
//! stream slot.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

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

/// A TCP connection to `to` from the loopback address `from` (any 127.x.y.z is ours on
/// Linux: a "proxy" and its "clients" need no second machine).
async fn connect_from(from: &str, to: SocketAddr, recv_buffer: Option<u32>) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::new(from.parse().unwrap(), 0))
        .unwrap();
    if let Some(size) = recv_buffer {
        socket.set_recv_buffer_size(size).unwrap();
    }
    socket.connect(to).await.unwrap()
}

/// Sends `prefix` (a PROXY header, or nothing) and a stream request with `headers`; the
/// status of the answer, 0 when the connection was closed without one. The connection is
/// returned to be held open.
async fn open_stream(
    mut conn: TcpStream,
    prefix: &[u8],
    token: &str,
    headers: &str,
) -> (u16, TcpStream) {
    let mut request = prefix.to_vec();
    request.extend_from_slice(
        format!(
            "GET /api/v1/sse HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n{headers}\r\n"
        )
        .as_bytes(),
    );
    if conn.write_all(&request).await.is_err() {
        return (0, conn);
    }
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match tokio::time::timeout(Duration::from_secs(10), conn.read(&mut byte)).await {
            Ok(Ok(1)) => head.push(byte[0]),
            Ok(_) => return (0, conn),
            Err(_) => panic!("no answer within 10 s"),
        }
    }
    let status = String::from_utf8_lossy(&head)
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, conn)
}

/// Behind a trusted reverse proxy the per-address cap counts the clients the proxy names
/// (PROXY protocol, or the rightmost untrusted `X-Forwarded-For` hop), not the proxy; IPv6
/// clients count per /64; a peer that is not a trusted proxy cannot name anyone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_address_cap_counts_the_clients_behind_a_trusted_proxy() {
    let world = World::new().await;
    let mut config = world.config();
    config.http.max_connections_per_ip = 2;
    config.http.trusted_proxies = vec!["127.0.0.2".into(), "10.9.0.0/16".into()];
    let engine = world.start(config).await;
    let tenant = unique("shop");
    let mut user = 0;
    let mut token = || {
        user += 1;
        world.token(&tenant, &format!("u{user}"))
    };
    let mut held = Vec::new();
    let proxy = "127.0.0.2";
    // (what the proxy says, the status wanted), in order, every connection held open.
    let cases: [(&[u8], &str, &[u16]); 14] = [
        // Two for one client through the proxy, then that client is full...
        (b"", "X-Forwarded-For: 203.0.113.7\r\n", &[200]),
        (
            b"",
            "X-Forwarded-For: 198.51.100.1, 203.0.113.7\r\n",
            &[200],
        ),
        (b"", "X-Forwarded-For: 203.0.113.7\r\n", &[0, 429]),
        // ...a trusted hop on the right is skipped: still the same client...
        (b"", "X-Forwarded-For: 203.0.113.7, 10.9.1.1\r\n", &[0, 429]),
        // ...and another client through the same proxy is not affected.
        (b"", "X-Forwarded-For: 203.0.113.7, 203.0.113.8\r\n", &[200]),
        (
            b"",
            "X-Forwarded-For: 203.0.113.8\r\nX-Forwarded-For: 203.0.113.9\r\n",
            &[200],
        ),
        // IPv6 clients count per /64.
        (b"", "X-Forwarded-For: 2001:db8:1:2::1\r\n", &[200]),
        (b"", "X-Forwarded-For: 2001:db8:1:2::ffff\r\n", &[200]),
        (b"", "X-Forwarded-For: 2001:db8:1:2:abcd::1\r\n", &[0, 429]),
        (b"", "X-Forwarded-For: 2001:db8:1:3::1\r\n", &[200]),
        // The PROXY protocol (v1, then v2) names the client of the whole connection.
        (b"PROXY TCP4 192.0.2.9 127.0.0.1 5555 8080\r\n", "", &[200]),
        (&proxy_v2([192, 0, 2, 9]), "", &[200]),
        (
            b"PROXY TCP4 192.0.2.9 127.0.0.1 5556 8080\r\n",
            "",
            &[0, 429],
        ),
        // The proxy itself, naming nobody, is a client like any other.
        (b"", "", &[200]),
    ];
    for (prefix, headers, want) in cases {
        let conn = connect_from(proxy, engine.http_addr, None).await;
        let (status, conn) = open_stream(conn, prefix, &token(), headers).await;
        assert!(
            want.contains(&status),
            "{:?} {headers:?}: {status}, wanted {want:?}",
            String::from_utf8_lossy(prefix)
        );
        held.push(conn);
    }
    // A peer that is not a trusted proxy names nobody: its X-Forwarded-For is ignored and
    // its PROXY header is not taken.
    let direct = "127.0.0.3";
    for (i, want) in [&[200][..], &[200], &[0, 429]].into_iter().enumerate() {
        let conn = connect_from(direct, engine.http_addr, None).await;
        let headers = format!("X-Forwarded-For: 192.0.2.{}\r\n", 100 + i);
        let (status, conn) = open_stream(conn, b"", &token(), &headers).await;
        assert!(want.contains(&status), "direct #{i}: {status}");
        held.push(conn);
    }
    let conn = connect_from("127.0.0.4", engine.http_addr, None).await;
    let (status, _) = open_stream(
        conn,
        b"PROXY TCP4 192.0.2.50 127.0.0.1 5555 8080\r\n",
        &token(),
        "",
    )
    .await;
    assert_ne!(
        status, 200,
        "a PROXY header from an untrusted peer is not taken"
    );
    drop(held);
    engine.shutdown().await;
}

/// A PROXY protocol v2 header: a proxied TCP over IPv4 connection from `client`.
fn proxy_v2(client: [u8; 4]) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[0x21, 0x11, 0, 12]);
    h.extend_from_slice(&client);
    h.extend_from_slice(&[127, 0, 0, 1]);
    h.extend_from_slice(&5555u16.to_be_bytes());
    h.extend_from_slice(&8080u16.to_be_bytes());
    h
}

/// A reader that takes its stream in small bites, each a little progress but far too slow
/// to take a replay page within the write deadline, is cut off once the deadline passes:
/// the deadline bounds the whole write, not each partial write, and the connection's
/// kernel buffer is bounded, so such a reader pins neither a connection nor a page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_is_cut_off_at_the_write_deadline() {
    let world = World::new().await;
    let mut config = world.config();
    config.http.write_timeout_ms = 2_000;
    let engine = world.start(config).await;
    let tenant = unique("shop");
    // 200 items of 2 KB: a replay of about 440 KB.
    let seed = format!(
        "INSERT INTO notifications (tenant_id, user_id, seq, event_id, kind, title, body, data)
         SELECT '{tenant}', 'u1', g, 'e' || g, 'notification', 't', repeat('x', 2000), '{{}}'
         FROM generate_series(1, 200) g;
         INSERT INTO user_streams VALUES ('{tenant}', 'u1', 200);"
    );
    sqlx::raw_sql(&seed)
        .execute(&world.pool().await)
        .await
        .unwrap();
    let conn = connect_from("127.0.0.1", engine.http_addr, Some(4096)).await;
    let token = world.token(&tenant, "u1");
    let (status, mut conn) = open_stream(conn, b"", &token, "Last-Event-ID: 0\r\n").await;
    assert_eq!(status, 200);
    // 16 KB every 200 ms: the server's writes go on a little at a time, and the whole
    // replay would take more than twice the deadline.
    let started = tokio::time::Instant::now();
    let mut read = 0;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "the stream of a reader this slow is still open after 4 s ({read} bytes read)"
        );
        match tokio::time::timeout(Duration::from_millis(500), conn.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => panic!("the client saw the end before the server's count did"),
            Ok(Ok(n)) => read += n,
            Err(_) => {} // nothing more for now
        }
        if metric(&engine, "notify_sse_connections").await == Some(0.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        read < 200 * 2_000,
        "the whole replay was read ({read} bytes)"
    );
    engine.shutdown().await;
}

/// One tenant cannot take every stream slot of an instance: it holds at most its share of
/// what the others leave free, so a second and a third tenant still get streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_tenant_cannot_fill_the_instance_with_streams() {
    let world = World::new().await;
    let mut config = world.config();
    config.sse.max_connections = 10;
    let engine = world.start(config).await;
    let mut held = Vec::new();
    let a = open_streams(&world, &engine, &unique("a"), &mut held).await;
    let b = open_streams(&world, &engine, &unique("b"), &mut held).await;
    let c = open_streams(&world, &engine, &unique("c"), &mut held).await;
    assert_eq!(
        (a, b, c),
        (5, 2, 1),
        "streams per tenant, in order of arrival, on an instance of 10"
    );
    drop(held);
    engine.shutdown().await;
}

/// Opens streams for `tenant`, one per user, until one is refused with 429: how many opened.
async fn open_streams(
    world: &World,
    engine: &notify_engine::app::Running,
    tenant: &str,
    held: &mut Vec<SseClient>,
) -> usize {
    for user in 0..20 {
        let token = world.token(tenant, &format!("u{user}"));
        let (status, stream, body) = connect_sse(engine, Some(&token), None).await;
        match status {
            200 => held.push(stream.unwrap()),
            429 => return user,
            other => panic!("{other}: {body}"),
        }
    }
    panic!("20 streams for one tenant on an instance of 10")
}
