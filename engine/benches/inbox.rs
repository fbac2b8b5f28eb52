//! The inbox API under a realistic table (run through `scripts/bench.sh`): list and
//! unread-count latency over HTTP with `BENCH_INBOX_ROWS` notifications (default 1 000 000)
//! across `BENCH_INBOX_USERS` users (default 10 000) of one tenant, plus the SSE replay log
//! rows that share the table.
//!
//! The rows are generated inside PostgreSQL (`generate_series`), a third read and a
//! twentieth archived; then the public router serves on a loopback socket with its own
//! API pool (its own role, row-level security on), and random users' requests run one at a time.
//! Prints p50 / p99 per request kind; `docs/benchmarks.md` records them.

// The benchmarks set up and read rows directly, with SQL of their own: `engine/clippy.toml`
// keeps statements inside `store` for the engine, not for what checks it from outside.
#![allow(clippy::disallowed_methods)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use notify_engine::api::{self, AppState, auth::Auth};
use notify_engine::config::Config;
use notify_engine::{health::Health, hub::Hub, plugin::PluginHost, store, telemetry::Metrics};
use rand::{Rng, SeedableRng};
use sqlx::{Connection, PgConnection};

fn env_or(name: &str, default: i64) -> i64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main]
async fn main() {
    let rows = env_or("BENCH_INBOX_ROWS", 1_000_000);
    let users = env_or("BENCH_INBOX_USERS", 10_000);
    let requests = env_or("BENCH_INBOX_REQUESTS", 2_000) as usize;
    let url = std::env::var("DATABASE_URL").expect("DATABASE_URL unset: run scripts/bench.sh");
    let db = format!("bench_inbox_{}", std::process::id());
    let mut admin = PgConnection::connect(&url).await.unwrap();
    sqlx::query(&format!("CREATE DATABASE {db}"))
        .execute(&mut admin)
        .await
        .unwrap();
    let mut config = Config::default();
    config.database.url = format!("{}/{db}", url.rsplit_once('/').unwrap().0);
    config.auth.jwt_secret = "bench-secret-0123456789abcdef0123456789".into();
    let pool = store::connect(&config.database, 4).unwrap();
    store::migrate(&pool).await.unwrap();

    let started = Instant::now();
    // Per user: seq 1..=per_user; every 50th row a live update (the log is shared).
    sqlx::query(
        "INSERT INTO notifications
             (tenant_id, user_id, seq, event_id, kind, title, body, category, data, created_at,
              read_at, archived_at)
         SELECT 'bench', 'u' || (i % $2), i / $2 + 1, 'e' || i,
                CASE WHEN i % 50 = 0 THEN 'order.updated' ELSE 'notification' END,
                'Payment received', 'We received your payment of 12.50 EUR for order A-' || i,
                CASE WHEN i % 3 = 0 THEN 'shipping' ELSE 'billing' END,
                jsonb_build_object('order_id', 'A-' || i, 'amount', 12.5),
                now() - make_interval(secs => ($1 - i) / 10.0),
                CASE WHEN i % 3 = 0 THEN now() END,
                CASE WHEN i % 20 = 0 THEN now() END
         FROM generate_series(0, $1 - 1) AS i",
    )
    .bind(rows)
    .bind(users)
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO user_streams (tenant_id, user_id, last_seq)
         SELECT tenant_id, user_id, max(seq) FROM notifications GROUP BY 1, 2",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query("ANALYZE notifications")
        .execute(&pool)
        .await
        .unwrap();
    println!(
        "inbox: {rows} notifications across {users} users inserted in {:.1?}",
        started.elapsed()
    );

    let hub = Hub::new();
    let state = AppState {
        pool: store::connect_api(&config.database, 4).unwrap(),
        engine_pool: store::connect(&config.database, 1).unwrap(),
        presence: notify_engine::cluster::Presence::new(hub.clone(), config.presence.clone()),
        hub,
        metrics: Metrics::new(),
        auth: Arc::new(Auth::new(&config).unwrap()),
        sse: config.sse.clone(),
        health: Arc::new(Health::default()),
        plugins: Arc::new(PluginHost::new(config.plugins.clone(), Default::default()).unwrap()),
        cors_origins: Arc::new([]),
        ticket_ttl_secs: 30,
        // One tenant measured at full speed: the limits are no part of what is measured.
        limits: Arc::new(api::limits::Limits::new(
            &notify_engine::config::LimitsConfig {
                user_per_second: u32::MAX,
                user_burst: u32::MAX,
                tenant_per_second: u32::MAX,
                tenant_burst: u32::MAX,
                tenant_pool_percent: 100,
                ..Default::default()
            },
            4,
            Metrics::new().api_rate_limited,
        )),
        shutdown: tokio_util::sync::CancellationToken::new(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, api::router(state)).await });
    let client = reqwest::Client::new();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let tokens: Vec<String> = (0..users.min(1_000))
        .map(|u| {
            api::auth::mint(
                &config.auth,
                "bench",
                &format!("u{}", u * (users / users.min(1_000))),
                3_600,
            )
        })
        .collect();

    let kinds = [
        ("list (first page, 20)", "/api/v1/notifications"),
        ("list (unread only)", "/api/v1/notifications?unread=true"),
        (
            "list (older page, cursor)",
            "/api/v1/notifications?cursor=60",
        ),
        ("unread count", "/api/v1/notifications/unread-count"),
    ];
    for (name, path) in kinds {
        // Warm-up, then the measured run.
        let mut times = Vec::with_capacity(requests);
        for i in 0..requests + 200 {
            let token = &tokens[rng.random_range(0..tokens.len())];
            let url = format!("{base}{path}");
            let t0 = Instant::now();
            let response = client.get(&url).bearer_auth(token).send().await.unwrap();
            assert!(
                response.status().is_success(),
                "{url}: {}",
                response.status()
            );
            response.bytes().await.unwrap();
            if i >= 200 {
                times.push(t0.elapsed());
            }
        }
        times.sort();
        println!(
            "inbox {name}: p50 {:.2?} p99 {:.2?} ({requests} requests, one at a time)",
            percentile(&times, 0.5),
            percentile(&times, 0.99)
        );
    }
    pool.close().await;
    sqlx::query(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .execute(&mut admin)
        .await
        .unwrap();
}
