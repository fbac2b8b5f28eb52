//! Shared plumbing of the integration tests: the real services (Kafka, PostgreSQL, Mailpit)
//! started by `scripts/services.sh`, one fresh database and fresh topics per test, an SSE
//! client, a Kafka producer and a Mailpit client.
//!
//! The tests never skip: without the services they fail, saying how to start them.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::StreamExt;
use notify_engine::app::{self, Running};
use notify_engine::config::{Config, SmtpTls, TenantConfig};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{Value, json};
use sqlx::{Connection, PgConnection, PgPool};

pub const SECRET: &str = "integration-test-secret-0123456789abcdef";

/// Where the services are, from the environment `scripts/test.sh` sets up.
#[derive(Clone, Debug)]
pub struct Services {
    pub brokers: String,
    pub database_url: String,
    pub mailpit: String,
    pub smtp_host: String,
    pub smtp_port: u16,
    pub plugins: PathBuf,
    pub templates: PathBuf,
}

fn required(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: the integration tests need Kafka, PostgreSQL and Mailpit. \
             Run them through `scripts/test.sh`, which starts the services and builds the plugins."
        )
    })
}

impl Services {
    /// A fresh plugin directory holding built plugins: `(built file, name in the directory)`.
    pub fn plugin_dir(&self, files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (from, to) in files {
            std::fs::copy(self.plugins.join(from), dir.path().join(to)).unwrap();
        }
        dir
    }

    pub fn get() -> Self {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let plugins = std::env::var("NOTIFY_TEST_PLUGINS")
            .map(PathBuf::from)
            .unwrap_or_else(|_| root.join("plugins/dist"));
        for file in [
            "default.wasm",
            "acme.wasm",
            "locale-templater.wasm",
            "fixtures/chaos.wasm",
            "fixtures/chaos-templater.wasm",
            "guests/python-router.wasm",
            "guests/js-router.wasm",
            "fixtures/chaos-python.wasm",
            "fixtures/chaos-js.wasm",
            "starters/starter-router.wasm",
            "starters/starter-templater.wasm",
        ] {
            assert!(
                plugins.join(file).exists(),
                "{} is missing: build the plugins with scripts/build-plugins.sh",
                plugins.join(file).display()
            );
        }
        Self {
            brokers: required("NOTIFY_KAFKA__BROKERS"),
            database_url: required("DATABASE_URL"),
            mailpit: required("MAILPIT_URL"),
            smtp_host: required("NOTIFY_SMTP__HOST"),
            smtp_port: required("NOTIFY_SMTP__PORT")
                .parse()
                .expect("NOTIFY_SMTP__PORT is a port"),
            plugins,
            templates: root.join("templates"),
        }
    }
}

/// The precompiled-plugin cache every test engine and host shares (`plugins.cache_dir`): a
/// Python or JavaScript component takes seconds to compile, and this way once per run (or
/// once per machine: the cache lives in the cargo target directory).
pub fn plugin_cache_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("plugin-cache")
}

/// A short random suffix, so parallel tests never share tenants, topics or databases.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    )
}

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

    /// Installs the chaos fixture as `tenant`'s routing plugin.
    pub fn install_chaos_plugin(&self, tenant: &str) {
        self.install_plugin("fixtures/chaos.wasm", &format!("{tenant}.wasm"));
    }

    /// Copies the built plugin `file` into this world's plugin directory as `name`.
    pub fn install_plugin(&self, file: &str, name: &str) {
        std::fs::copy(
            self.services.plugins.join(file),
            self.plugin_dir.path().join(name),
        )
        .unwrap();
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

    /// Produces raw bytes to a topic, unkeyed.
    pub async fn produce_raw(&self, topic: &str, payload: &[u8]) {
        self.produce_keyed(topic, None, payload).await;
    }

    async fn produce_keyed(&self, topic: &str, key: Option<&str>, payload: &[u8]) {
        self.produce_with_headers(topic, key, payload, &[]).await;
    }

    /// Produces raw bytes with Kafka headers (a gateway's tenant header, say).
    pub async fn produce_with_headers(
        &self,
        topic: &str,
        key: Option<&str>,
        payload: &[u8],
        headers: &[(&str, &str)],
    ) {
        let mut owned = rdkafka::message::OwnedHeaders::new();
        for (name, value) in headers {
            owned = owned.insert(rdkafka::message::Header {
                key: name,
                value: Some(*value),
            });
        }
        let mut record = FutureRecord::<str, [u8]>::to(topic)
            .payload(payload)
            .headers(owned);
        if let Some(k) = key {
            record = record.key(k);
        }
        self.producer
            .send(record, Duration::from_secs(10))
            .await
            .map_err(|(e, _)| e)
            .expect("producing to Kafka");
    }

    /// Produces an envelope to one partition of the topic matching its type.
    pub async fn produce_to_partition(&self, event: &Value, partition: i32) {
        let topic = match event["type"].as_str() {
            Some("order_status_updated") => &self.topic_status,
            _ => &self.topic_paid,
        };
        let payload = event.to_string();
        self.producer
            .send(
                FutureRecord::<str, str>::to(topic)
                    .payload(&payload)
                    .partition(partition),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)
            .expect("producing to Kafka");
    }

    /// Produces an envelope to the topic matching its type, keyed by tenant and user as
    /// producers are expected to (one user's events stay in order on one partition).
    pub async fn produce(&self, event: &Value) {
        let topic = match event["type"].as_str() {
            Some("order_status_updated") => &self.topic_status,
            _ => &self.topic_paid,
        };
        let key = format!(
            "{}/{}",
            event["tenant"].as_str().unwrap_or_default(),
            event["data"]["user_id"].as_str().unwrap_or_default()
        );
        self.produce_keyed(topic, Some(&key), event.to_string().as_bytes())
            .await;
    }

    pub async fn pool(&self) -> PgPool {
        PgPool::connect(&self.db_url).await.unwrap()
    }

    /// Polls `query` (a single BIGINT) until it equals `want`, or fails after `timeout`.
    pub async fn wait_count(&self, query: &str, want: i64, timeout: Duration) {
        self.wait_until(query, |n| n == want, timeout).await;
    }

    /// Polls `query` (a single BIGINT) until `ok` holds, or fails after `timeout`.
    pub async fn wait_until(&self, query: &str, ok: impl Fn(i64) -> bool, timeout: Duration) {
        let pool = self.pool().await;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let (n,): (i64,) = sqlx::query_as(query)
                .fetch_one(&pool)
                .await
                .unwrap_or((-1,));
            if ok(n) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{query}: still {n} after {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn count(&self, query: &str) -> i64 {
        let pool = self.pool().await;
        let (n,): (i64,) = sqlx::query_as(query).fetch_one(&pool).await.unwrap();
        n
    }
}

fn replace_database(url: &str, db: &str) -> String {
    let (base, _) = url
        .rsplit_once('/')
        .expect("DATABASE_URL has a database name");
    format!("{base}/{db}")
}

pub async fn create_topics(brokers: &str, topics: &[&str]) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("creating a Kafka admin client");
    let new: Vec<NewTopic> = topics
        .iter()
        .map(|t| NewTopic::new(t, 3, TopicReplication::Fixed(1)))
        .collect();
    let results = admin
        .create_topics(
            &new,
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .expect("creating topics (is Kafka up? scripts/services.sh up)");
    for r in results {
        r.expect("topic created");
    }
}

/// A native envelope.
pub fn event(id: &str, tenant: &str, event_type: &str, data: Value) -> Value {
    json!({
        "id": id,
        "tenant": tenant,
        "type": event_type,
        // Now: events older than email.max_event_age_secs send no email.
        "time": chrono::Utc::now().to_rfc3339(),
        "source": "tests",
        "data": data,
    })
}

pub fn order_paid(id: &str, tenant: &str, user: &str, email: Option<&str>, amount: f64) -> Value {
    let mut data = json!({
        "user_id": user,
        "order_id": format!("A-{id}"),
        "amount": amount,
        "currency": "EUR",
        "customer_name": "Alice",
    });
    if let Some(e) = email {
        data["email"] = e.into();
    }
    event(id, tenant, "order_paid", data)
}

/// One parsed SSE event.
#[derive(Debug, Clone, PartialEq)]
pub struct SseEvent {
    pub id: Option<String>,
    pub event: String,
    pub data: Value,
}

/// A minimal SSE client over a real HTTP connection.
pub struct SseClient {
    stream: std::pin::Pin<Box<dyn futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    buffer: String,
    /// The last `id:` seen in any frame, as a browser's `lastEventId`.
    pub last_id: Option<String>,
}

/// Opens `GET /api/v1/sse`; returns the status and, on 200, the client.
pub async fn connect_sse(
    engine: &Running,
    token: Option<&str>,
    last_event_id: Option<&str>,
) -> (u16, Option<SseClient>, String) {
    let mut request = reqwest::Client::new().get(format!("http://{}/api/v1/sse", engine.http_addr));
    if let Some(t) = token {
        request = request.bearer_auth(t);
    }
    if let Some(id) = last_event_id {
        request = request.header("Last-Event-ID", id);
    }
    open_sse(request).await
}

/// Sends an SSE request: the status and, on 200, the client; otherwise the body.
pub async fn open_sse(request: reqwest::RequestBuilder) -> (u16, Option<SseClient>, String) {
    let response = request.send().await.expect("SSE request");
    let status = response.status().as_u16();
    if status != 200 {
        let body = response.text().await.unwrap_or_default();
        return (status, None, body);
    }
    assert_eq!(
        response.headers()["content-type"],
        "text/event-stream",
        "SSE content type"
    );
    let client = SseClient {
        stream: Box::pin(response.bytes_stream()),
        buffer: String::new(),
        last_id: None,
    };
    (status, Some(client), String::new())
}

/// What [`SseClient::poll`] found.
#[derive(Debug)]
pub enum Polled {
    Event(SseEvent),
    Ended,
    Timeout,
}

impl SseClient {
    /// The next event with data (comments and keep-alives skipped), or `None` on timeout.
    pub async fn next(&mut self, timeout: Duration) -> Option<SseEvent> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(event) = self.parse_one() {
                return Some(event);
            }
            let chunk = tokio::time::timeout_at(deadline, self.stream.next())
                .await
                .ok()??;
            let chunk = chunk.expect("SSE stream read");
            self.buffer.push_str(&String::from_utf8_lossy(&chunk));
        }
    }

    fn parse_one(&mut self) -> Option<SseEvent> {
        loop {
            let end = self.buffer.find("\n\n")?;
            let frame: String = self.buffer.drain(..end + 2).collect();
            let (mut id, mut name, mut data) = (None, "message".to_string(), Vec::new());
            for line in frame.lines() {
                if let Some(v) = line.strip_prefix("id:") {
                    id = Some(v.trim().to_string());
                    self.last_id = id.clone();
                } else if let Some(v) = line.strip_prefix("event:") {
                    name = v.trim().to_string();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push(v.strip_prefix(' ').unwrap_or(v).to_string());
                }
            }
            if data.is_empty() {
                continue;
            }
            let data = serde_json::from_str(&data.join("\n")).expect("SSE data is JSON");
            return Some(SseEvent {
                id,
                event: name,
                data,
            });
        }
    }

    /// The next event with data, or how the wait ended: the server closed the stream (or
    /// the connection broke), or `timeout` passed.
    pub async fn poll(&mut self, timeout: Duration) -> Polled {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(event) = self.parse_one() {
                return Polled::Event(event);
            }
            match tokio::time::timeout_at(deadline, self.stream.next()).await {
                Err(_) => return Polled::Timeout,
                Ok(None | Some(Err(_))) => return Polled::Ended,
                Ok(Some(Ok(chunk))) => self.buffer.push_str(&String::from_utf8_lossy(&chunk)),
            }
        }
    }

    /// Does the server end the stream within `timeout`? (What arrives meanwhile stays
    /// buffered for [`SseClient::next`].)
    pub async fn ends_within(&mut self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.stream.next()).await {
                Err(_) => return false,
                Ok(None | Some(Err(_))) => return true,
                Ok(Some(Ok(chunk))) => self.buffer.push_str(&String::from_utf8_lossy(&chunk)),
            }
        }
    }

    /// Asserts that nothing arrives within `quiet`.
    pub async fn expect_nothing(&mut self, quiet: Duration) {
        if let Some(e) = self.next(quiet).await {
            panic!("expected no event, got {e:?}");
        }
    }
}

/// Mailpit's HTTP API.
pub struct Mailpit {
    base: String,
    http: reqwest::Client,
}

#[derive(Debug, Clone)]
pub struct Mail {
    pub id: String,
    pub subject: String,
    pub to: Vec<String>,
    pub text: String,
    pub html: String,
    pub message_id: String,
}

impl Mailpit {
    pub fn new(services: &Services) -> Self {
        Self {
            base: services.mailpit.trim_end_matches('/').to_owned(),
            http: reqwest::Client::new(),
        }
    }

    /// Every message addressed to `to`.
    pub async fn messages_to(&self, to: &str) -> Vec<Mail> {
        let search: Value = self
            .http
            .get(format!("{}/api/v1/search", self.base))
            .query(&[("query", format!("to:\"{to}\"")), ("limit", "200".into())])
            .send()
            .await
            .expect("Mailpit search")
            .json()
            .await
            .expect("Mailpit search JSON");
        let mut out = Vec::new();
        for summary in search["messages"].as_array().cloned().unwrap_or_default() {
            let id = summary["ID"].as_str().unwrap().to_owned();
            let full: Value = self
                .http
                .get(format!("{}/api/v1/message/{id}", self.base))
                .send()
                .await
                .expect("Mailpit message")
                .json()
                .await
                .expect("Mailpit message JSON");
            out.push(Mail {
                id,
                subject: full["Subject"].as_str().unwrap_or_default().to_owned(),
                to: full["To"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|a| a["Address"].as_str().map(str::to_owned))
                    .collect(),
                text: full["Text"].as_str().unwrap_or_default().to_owned(),
                html: full["HTML"].as_str().unwrap_or_default().to_owned(),
                message_id: full["MessageID"].as_str().unwrap_or_default().to_owned(),
            });
        }
        out
    }

    /// Waits until exactly `count` messages to `to` exist, then returns them.
    pub async fn wait_for(&self, to: &str, count: usize, timeout: Duration) -> Vec<Mail> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let mails = self.messages_to(to).await;
            if mails.len() >= count {
                assert_eq!(
                    mails.len(),
                    count,
                    "more emails to {to} than expected: {mails:#?}"
                );
                return mails;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} emails to {to} after {timeout:?}, expected {count}",
                mails.len()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// The JSON Schemas of `contracts/schemas/`, to hold real messages and frames against.
pub struct Contracts {
    schemas: std::collections::HashMap<String, jsonschema::Validator>,
}

impl Contracts {
    pub fn load() -> Self {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../contracts/schemas");
        let mut schemas = std::collections::HashMap::new();
        for entry in std::fs::read_dir(&dir).expect("contracts/schemas") {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_str().unwrap();
            let Some(name) = name.strip_suffix(".schema.json") else {
                continue;
            };
            let schema: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let validator = jsonschema::draft202012::options()
                .should_validate_formats(true)
                .build(&schema)
                .unwrap_or_else(|e| panic!("{}: not a valid schema: {e}", path.display()));
            schemas.insert(name.to_owned(), validator);
        }
        Self { schemas }
    }

    /// Panics, naming every violation, unless `value` is valid against `schema`.
    pub fn check(&self, schema: &str, value: &Value) {
        let validator = self
            .schemas
            .get(schema)
            .unwrap_or_else(|| panic!("no contracts/schemas/{schema}.schema.json"));
        let errors: Vec<String> = validator
            .iter_errors(value)
            .map(|e| format!("{} at {}", e, e.instance_path()))
            .collect();
        assert!(
            errors.is_empty(),
            "{schema}: {value} violates the contract: {errors:?}"
        );
    }

    /// Holds an SSE frame against the schema of its event name.
    pub fn check_sse(&self, event: &SseEvent) {
        let schema = match event.event.as_str() {
            "notification" => "sse-notification",
            "notification.read" => "sse-notification-read",
            "notification.archived" => "sse-notification-archived",
            "auth.expired" => "sse-auth-expired",
            _ => "sse-live-update",
        };
        assert!(
            event
                .id
                .as_deref()
                .is_some_and(|id| id.parse::<i64>().is_ok()),
            "every frame carries a numeric id: {event:?}"
        );
        self.check(schema, &event.data);
    }
}

/// A client of the public REST API acting with one token.
pub struct Api {
    base: String,
    client: reqwest::Client,
    pub token: String,
}

impl Api {
    pub fn new(engine: &Running, token: &str) -> Self {
        Self {
            base: format!("http://{}", engine.http_addr),
            client: reqwest::Client::new(),
            token: token.to_owned(),
        }
    }

    /// `method path` with the token and an optional JSON body: the status and JSON body.
    pub async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut request = self
            .client
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("API request");
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, body)
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.call("GET", path, None).await
    }

    pub async fn post(&self, path: &str, body: Option<Value>) -> (u16, Value) {
        self.call("POST", path, body).await
    }
}

/// Opens `GET /api/v1/sse?<query>` without a token (a ticket in the query).
pub async fn connect_sse_query(engine: &Running, query: &str) -> (u16, Option<SseClient>, String) {
    open_sse(reqwest::Client::new().get(format!("http://{}/api/v1/sse?{query}", engine.http_addr)))
        .await
}

/// The value of one series on the engine's `/metrics` (`name` with its labels, as printed),
/// if it is there.
pub async fn metric(engine: &Running, series: &str) -> Option<f64> {
    let metrics = reqwest::get(format!("http://{}/metrics", engine.admin_addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.trim().parse().unwrap())
}
