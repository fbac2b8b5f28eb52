//! One test's world: a database, topics and a consumer group of its own, a plugin directory,
//! and the engine configuration pointing at them; engines started on it in-process.
//!
//! The world's other methods sit with their role: producing in `kafka.rs`, reading and
//! waiting on the database in `database.rs`, installing plugins in `plugins.rs`.

use notify_engine::app::{self, Running};
use notify_engine::config::{Config, SmtpTls, TenantConfig};
use rdkafka::ClientConfig;
use rdkafka::producer::FutureProducer;
use sqlx::{Connection, PgConnection};

use super::database::replace_database;
use super::kafka::create_topics;
use super::plugins::plugin_cache_dir;
use super::services::{Services, unique};

/// The JWT secret every test engine is configured with (`auth.jwt_secret`).
pub const SECRET: &str = "integration-test-secret-0123456789abcdef";
/// The key every test engine of a world seals its cluster messages with
/// (`cluster.secret`): a world's instances hear each other.
pub const CLUSTER_SECRET: &str = "integration-test-cluster-secret-0123456789";

/// One test's world: its own database, topics, consumer group and plugin directory.
pub struct World {
    pub services: Services,
    pub db_name: String,
    pub db_url: String,
    pub topic_paid: String,
    pub topic_status: String,
    pub group: String,
    pub plugin_dir: tempfile::TempDir,
    pub producer: FutureProducer,
}

impl World {
    pub async fn new() -> Self {
        let services = Services::get();
        let db_name = unique("test").replace('-', "_");
        let mut admin = PgConnection::connect(&services.database_url)
            .await
            .expect("connecting to the test PostgreSQL (scripts/services.sh up)");
        sqlx::query(&format!("CREATE DATABASE {db_name}"))
            .execute(&mut admin)
            .await
            .expect("creating the test database");
        let db_url = replace_database(&services.database_url, &db_name);

        let suffix = unique("t");
        let topic_paid = format!("order_paid-{suffix}");
        let topic_status = format!("order_status_updated-{suffix}");
        create_topics(&services.brokers, &[&topic_paid, &topic_status]).await;

        let plugin_dir =
            services.plugin_dir(&[("default.wasm", "default.wasm"), ("acme.wasm", "acme.wasm")]);
        let producer = ClientConfig::new()
            .set("bootstrap.servers", &services.brokers)
            .set("message.timeout.ms", "10000")
            .create()
            .expect("creating a Kafka producer");
        Self {
            services,
            db_name,
            db_url,
            topic_paid,
            topic_status,
            group: unique("group"),
            plugin_dir,
            producer,
        }
    }
    /// Engine configuration pointing at this world.
    pub fn config(&self) -> Config {
        let mut c = Config::default();
        c.http.listen = "127.0.0.1:0".parse().unwrap();
        c.http.admin_listen = "127.0.0.1:0".parse().unwrap();
        c.kafka.brokers = self.services.brokers.clone();
        c.kafka.group_id = self.group.clone();
        c.kafka.topics = vec![self.topic_paid.clone(), self.topic_status.clone()];
        c.kafka.batch_linger_ms = 5;
        c.database.url = self.db_url.clone();
        c.database.max_connections = 8;
        c.plugins.dir = self.plugin_dir.path().to_owned();
        c.plugins.cache_dir = plugin_cache_dir();
        c.smtp.host = self.services.smtp_host.clone();
        c.smtp.port = self.services.smtp_port;
        // Mailpit speaks plain SMTP on loopback.
        c.smtp.tls = SmtpTls::None;
        c.email.templates_dir = self.services.templates.clone();
        c.email.poll_interval_ms = 200;
        c.email.backoff_base_ms = 200;
        c.auth.jwt_secret = SECRET.into();
        c.cluster.secret = Some(CLUSTER_SECRET.into());
        c.tenants.insert(
            "acme".into(),
            TenantConfig {
                plugin: None,
                config: [("vip_threshold".to_string(), "500".to_string())].into(),
                ..TenantConfig::default()
            },
        );
        c
    }

    pub async fn start(&self, config: Config) -> Running {
        // Logs go through the test harness's capture: shown for failing tests only.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "info".into()),
            )
            .with_test_writer()
            .try_init();
        app::start(config).await.expect("engine starts")
    }

    /// A second instance on this world's database that consumes nothing (a topic and a
    /// group of its own): its streams hear of rows only through other instances' NOTIFYs.
    pub async fn start_idle(&self, mut config: Config) -> Running {
        let idle_topic = format!("idle-{}", unique("t"));
        create_topics(&self.services.brokers, &[&idle_topic]).await;
        config.kafka.topics = vec![idle_topic];
        config.kafka.group_id = unique("group");
        self.start(config).await
    }

    pub fn token(&self, tenant: &str, user: &str) -> String {
        notify_engine::api::auth::mint(&self.config().auth, tenant, user, 600)
    }
}
