//! Benchmarks on the real services (run through `scripts/bench.sh`, which starts them):
//!
//! 1. `render`: one email of the example tenant `globex` rendered by its templating plugin
//!    (`locale-templater`, which renders the tenant's files through the host) against the
//!    same files rendered directly.
//! 2. `pipeline`: events/s from Kafka to committed notifications, with a backlog of N events.
//! 3. `latency`: produce → SSE frame received, one event at a time.
//! 4. `reload`: a plugin published by rename → the new version serving (hot reload).
//!
//! A routing call's cost, per guest language, is `benches/plugins.rs`. Prints one line per
//! figure; `docs/benchmarks.md` records them with machine and date.
//! `BENCH_EVENTS` sets the backlog (default 20 000), `BENCH_TENANTS` how many tenants share
//! it (default 1; each tenant is a lane of its own).

// The benchmarks set up and read rows directly, with SQL of their own: `engine/clippy.toml`
// keeps statements inside `store` for the engine, not for what checks it from outside.
#![allow(clippy::disallowed_methods)]

use std::time::{Duration, Instant};

use futures::StreamExt;
use notify_engine::config::Config;
use notify_engine::plugin::PluginHost;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use serde_json::json;
use sqlx::{Connection, PgConnection};

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} unset: run scripts/bench.sh"))
}

fn event(id: usize, tenant: &str, user: usize) -> serde_json::Value {
    json!({
        "id": format!("e{id}"), "tenant": tenant, "type": "order_paid",
        "time": chrono::Utc::now().to_rfc3339(),
        "data": {"user_id": format!("u{user}"), "order_id": format!("A-{id}"),
                 "amount": 12.5, "currency": "EUR"}
    })
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main]
async fn main() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let plugins = root.join("plugins/dist");

    // 1. Rendering one email: templating plugin vs files directly.
    {
        use notify_engine::config::{PluginConfig, TenantConfig};
        use notify_engine::plugin::EmailToRender;
        use notify_engine::templates::Templates;
        use std::sync::Arc;
        let limits = PluginConfig {
            dir: plugins.clone(),
            ..PluginConfig::default()
        };
        let tenants = [(
            "globex".to_string(),
            TenantConfig {
                templating_plugin: Some("locale-templater".into()),
                ..TenantConfig::default()
            },
        )]
        .into();
        let host = PluginHost::new(limits, tenants).unwrap();
        host.load_dir().await.unwrap();
        let templates = Arc::new(Templates::load(&root.join("templates")).unwrap());
        let data = json!({"event_id": "e1", "order_id": "G-1", "customer_name": "Bob",
                          "amount": 1234.5, "currency": "EUR"});
        let email = EmailToRender {
            tenant: "globex",
            outbox_id: 1,
            event_id: "e1",
            event_type: "order_paid",
            event_time: "2026-11-27T13:05:00Z".into(),
            template: "order_paid",
            recipient: "bob@example.test",
            user_id: Some("bob"),
            locale: Some("de-DE"),
            time_zone: Some("Europe/Berlin"),
            data: &data,
        };
        let n = 2_000;
        let mut plugin = Vec::with_capacity(n);
        for i in 0..n + 100 {
            let t = Instant::now();
            host.render_email(&email, templates.clone(), &[])
                .await
                .unwrap()
                .unwrap();
            if i >= 100 {
                plugin.push(t.elapsed());
            }
        }
        // The same files, with the fields the plugin would add, rendered directly.
        let mut model = data.clone();
        model["amount_display"] = json!("1.234,50 €");
        model["event_time_display"] = json!("27. November 2026, 14:05 CET");
        model["lang"] = json!("de");
        model["locale"] = json!("de-DE");
        model["time_zone"] = json!("Europe/Berlin");
        let mut files = Vec::with_capacity(n);
        for i in 0..n + 100 {
            let t = Instant::now();
            templates
                .render("globex", "order_paid.de", &model, &[])
                .unwrap();
            if i >= 100 {
                files.push(t.elapsed());
            }
        }
        plugin.sort();
        files.sort();
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        println!(
            "render: {n} emails: templating plugin p50 {:.1} µs p99 {:.1} µs; files directly p50 {:.1} µs p99 {:.1} µs",
            us(percentile(&plugin, 0.5)),
            us(percentile(&plugin, 0.99)),
            us(percentile(&files, 0.5)),
            us(percentile(&files, 0.99)),
        );
    }

    // 2 and 3 need the services.
    let brokers = env("NOTIFY_KAFKA__BROKERS");
    let admin_url = env("DATABASE_URL");
    let suffix = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
    let db = format!("bench_{suffix}");
    let mut admin = PgConnection::connect(&admin_url).await.unwrap();
    sqlx::query(&format!("CREATE DATABASE {db}"))
        .execute(&mut admin)
        .await
        .unwrap();
    let topic = format!("bench-{suffix}");
    let kafka_admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .unwrap();
    kafka_admin
        .create_topics(
            &[NewTopic::new(&topic, 3, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        )
        .await
        .unwrap();
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("linger.ms", "5")
        .create()
        .unwrap();

    let events: usize = std::env::var("BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let tenants: usize = std::env::var("BENCH_TENANTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
        .max(1);
    let users = 500;
    let mut sends = Vec::with_capacity(events);
    let (producer_ref, topic_ref) = (&producer, &topic);
    for i in 0..events {
        let tenant = if tenants == 1 {
            "bench".to_string()
        } else {
            format!("bench{}", i % tenants)
        };
        let payload = event(i, &tenant, i % users).to_string();
        let key = format!("u{}", i % users);
        sends.push(async move {
            producer_ref
                .send(
                    FutureRecord::to(topic_ref).key(&key).payload(&payload),
                    Duration::from_secs(30),
                )
                .await
                .map_err(|(e, _)| e)
        });
    }
    futures::future::join_all(sends)
        .await
        .into_iter()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    producer.flush(Duration::from_secs(10)).unwrap();

    let mut config = Config::default();
    config.http.listen = "127.0.0.1:0".parse().unwrap();
    config.http.admin_listen = "127.0.0.1:0".parse().unwrap();
    config.smtp.tls = notify_engine::config::SmtpTls::None;
    config.kafka.brokers = brokers.clone();
    config.kafka.topics = vec![topic.clone()];
    config.kafka.group_id = format!("bench-{suffix}");
    config.database.url = format!("{}/{db}", admin_url.rsplit_once('/').unwrap().0);
    // A plugin directory of its own: the reload figure publishes into it.
    let plugin_dir = tempfile::tempdir().unwrap();
    for file in ["default.wasm", "acme.wasm"] {
        std::fs::copy(plugins.join(file), plugin_dir.path().join(file)).unwrap();
    }
    config.plugins.dir = plugin_dir.path().to_owned();
    config.email.templates_dir = root.join("templates");
    config.auth.jwt_secret = "bench-secret-bench-secret-bench-secret".into();
    let started = Instant::now();
    let engine = notify_engine::app::start(config.clone()).await.unwrap();
    let consumed = || engine.metrics.notifications_written.get();
    // The clock starts at the first committed notification, so consumer-group join time
    // (seconds, a one-off) does not count as throughput.
    while consumed() == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let first = Instant::now();
    let join = first - started;
    while consumed() < events as u64 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = first.elapsed();
    println!(
        "pipeline: {events} events ({tenants} tenants, {users} users, 3 partitions, batch_max {}) in {:.2} s: {:.0} events/s (group join + start {:.1} s not counted)",
        config.kafka.batch_max,
        elapsed.as_secs_f64(),
        events as f64 / elapsed.as_secs_f64(),
        join.as_secs_f64()
    );

    // 3. Latency: produce one event, wait for its SSE frame.
    let token = notify_engine::api::auth::mint(&config.auth, "bench", "latency-user", 600);
    let response = reqwest::Client::new()
        .get(format!("http://{}/api/v1/sse", engine.http_addr))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    let mut stream = response.bytes_stream();
    let _hello = stream.next().await;
    let rounds = 200;
    let mut samples = Vec::with_capacity(rounds);
    for i in 0..rounds {
        let mut e = event(events + i, "bench", 0);
        e["data"]["user_id"] = "latency-user".into();
        let payload = e.to_string();
        let t = Instant::now();
        producer
            .send(
                FutureRecord::to(&topic).key("latency").payload(&payload),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)
            .unwrap();
        loop {
            let chunk = stream.next().await.unwrap().unwrap();
            if String::from_utf8_lossy(&chunk).contains("event: notification") {
                break;
            }
        }
        samples.push(t.elapsed());
    }
    samples.sort();
    println!(
        "latency: produce → SSE frame, {rounds} events one at a time: p50 {:.1} ms, p99 {:.1} ms",
        percentile(&samples, 0.5).as_secs_f64() * 1e3,
        percentile(&samples, 0.99).as_secs_f64() * 1e3,
    );
    // 4. Reload: rename a new build into place, wait until it serves.
    let builds = [
        std::fs::read(plugins.join("fixtures/chaos.wasm")).unwrap(),
        std::fs::read(plugins.join("default.wasm")).unwrap(),
    ];
    let loaded = || {
        engine
            .metrics
            .plugin_reloads
            .with_label_values(&["loaded"])
            .get()
    };
    let rounds = 20;
    let mut samples = Vec::with_capacity(rounds);
    for i in 0..rounds {
        let before = loaded();
        let temporary = plugin_dir.path().join(".reload.wasm.tmp");
        std::fs::write(&temporary, &builds[i % 2]).unwrap();
        let t = Instant::now();
        std::fs::rename(&temporary, plugin_dir.path().join("reloaded.wasm")).unwrap();
        while loaded() == before {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        samples.push(t.elapsed());
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    samples.sort();
    println!(
        "reload: rename → new version serving, {rounds} reloads of a ~110 KB component: p50 {:.0} ms, max {:.0} ms (250 ms of it is the debounce)",
        percentile(&samples, 0.5).as_secs_f64() * 1e3,
        samples.last().unwrap().as_secs_f64() * 1e3,
    );
    engine.shutdown().await;
    drop(kafka_admin);
    sqlx::query(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .execute(&mut admin)
        .await
        .unwrap();
}
