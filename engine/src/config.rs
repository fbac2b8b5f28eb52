//! Configuration: compiled-in defaults, then an optional TOML file, then the environment.
//!
//! Environment variables are `NOTIFY_<SECTION>__<KEY>` (double underscore between levels),
//! e.g. `NOTIFY_KAFKA__BROKERS`, `NOTIFY_AUTH__JWT_SECRET`. `DATABASE_URL` is accepted too.
//! Secrets (`auth.jwt_secret`, `smtp.password`) come from the environment only: a config
//! file that contains them is rejected, because config files end up in repositories.
//!
//! Everything is validated once, at start-up, in [`Config::validate`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Load(#[from] Box<figment::Error>),
    #[error("configuration: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub http: HttpConfig,
    pub kafka: KafkaConfig,
    pub database: DatabaseConfig,
    pub plugins: PluginConfig,
    /// Per-tenant settings, keyed by tenant id.
    pub tenants: BTreeMap<String, TenantConfig>,
    pub smtp: SmtpConfig,
    pub email: EmailConfig,
    pub auth: AuthConfig,
    pub sse: SseConfig,
    pub retention: RetentionConfig,
    pub presence: PresenceConfig,
    pub log: LogConfig,
    pub dev: DevConfig,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DevConfig {
    /// Development mode (the demo): accepts the well-known demo JWT secret, which anyone can
    /// read in this repository. Never set it where real users connect.
    pub mode: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Address of the public API (SSE).
    pub listen: SocketAddr,
    /// Address of the operator endpoints (`/healthz`, `/readyz`, `/metrics`): a listener of
    /// their own, so probes keep answering while the public side is flooded.
    pub admin_listen: SocketAddr,
    /// A connection that has not sent its request headers within this time is closed
    /// (slowloris).
    pub header_timeout_ms: u64,
    /// A response write that makes no progress for this long closes the connection: a
    /// client that stopped reading its stream is dropped (it catches up by replay).
    pub write_timeout_ms: u64,
    /// Open connections on the public listener; more wait to be accepted.
    pub max_connections: usize,
    /// Open connections from one IP address; more are closed at once.
    pub max_connections_per_ip: usize,
    /// Origins (`https://app.example.com`) whose pages may call the public API from a
    /// browser, cookies included. Empty: no cross-origin access.
    pub cors_origins: Vec<String>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".parse().expect("valid default address"),
            admin_listen: "127.0.0.1:9090".parse().expect("valid default address"),
            header_timeout_ms: 10_000,
            write_timeout_ms: 30_000,
            max_connections: 20_000,
            max_connections_per_ip: 256,
            cors_origins: Vec::new(),
        }
    }
}

#[derive(Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaConfig {
    /// `bootstrap.servers`.
    pub brokers: String,
    /// Consumer group: every instance of one deployment shares it; partitions are the unit
    /// of scale-out.
    pub group_id: String,
    /// Topics to consume.
    pub topics: Vec<String>,
    /// Most events in one of a tenant lane's batches. A transaction takes the batches of
    /// the lanes waiting at that moment, up to four of these in all (group commit).
    pub batch_max: usize,
    /// How long a lane's batch waits for more messages once it has one. 0 (the default):
    /// a lane takes what is queued and goes; the committers' group commit does the batching
    /// across tenants, without the wait.
    pub batch_linger_ms: u64,
    /// Messages larger than this are dead-lettered without being decoded.
    pub max_message_bytes: usize,
    /// Where an event's tenant comes from: `payload` (the envelope; any producer on the
    /// topics may speak for any tenant), `topic` (`tenant_topic_pattern`) or `header`
    /// (`tenant_header`, set by a trusted gateway). See README, "Who may speak for a tenant".
    pub tenant_from: TenantFrom,
    /// With `tenant_from = "topic"`: topic names with one `{tenant}` placeholder.
    pub tenant_topic_pattern: String,
    /// With `tenant_from = "header"`: the Kafka header that names the tenant.
    pub tenant_header: String,
    /// Tenants accepted (empty: any); others are dead-lettered.
    pub allowed_tenants: Vec<String>,
    /// Messages queued per tenant lane. When a slow tenant's lane is full, the partitions
    /// carrying its next messages pause (in Kafka, not in memory) until it catches up.
    pub lane_capacity: usize,
    /// Bytes (payload, key, headers) queued per tenant lane: the other bound of a lane, so
    /// that large messages cannot fill memory where small ones would not.
    pub lane_max_bytes: usize,
    /// How long the group waits for an instance that stopped heartbeating (killed, frozen,
    /// cut off) before its partitions go to the others (librdkafka's `session.timeout.ms`,
    /// whose 45 s default stalled a killed instance's partitions that long, restarted or
    /// not). At least 6 000 (the broker's `group.min.session.timeout.ms` default).
    pub session_timeout_ms: u64,
    /// Passed to librdkafka as-is (`security.protocol`, `sasl.mechanism`, `ssl.ca.location`,
    /// ...). Credentials come from the environment only: `NOTIFY_KAFKA_PROPERTY_SASL_PASSWORD`
    /// sets `sasl.password`.
    pub properties: BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:19092".into(),
            group_id: "notify-engine".into(),
            topics: vec!["order_paid".into(), "order_status_updated".into()],
            batch_max: 256,
            batch_linger_ms: 0,
            max_message_bytes: 256 * 1024,
            lane_capacity: 16_384,
            lane_max_bytes: 16 * 1024 * 1024,
            session_timeout_ms: 10_000,
            tenant_from: TenantFrom::Payload,
            tenant_topic_pattern: String::new(),
            tenant_header: "tenant".into(),
            allowed_tenants: Vec::new(),
            properties: BTreeMap::new(),
        }
    }
}

#[derive(Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseConfig {
    /// PostgreSQL URL. `DATABASE_URL` overrides it.
    pub url: String,
    /// Connections of the pipeline, the email worker and the readiness probe.
    pub max_connections: u32,
    /// Connections of the public API (inbox, tickets, SSE reads): a pool of its own, so unauthenticated or
    /// abusive traffic can never take the pipeline's connections.
    pub api_max_connections: u32,
    /// Apply the embedded migrations at start-up.
    pub migrate: bool,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: "postgres://notify:notify@127.0.0.1:15432/notify".into(),
            max_connections: 16,
            api_max_connections: 8,
            migrate: true,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PluginConfig {
    /// Holds `<tenant>.wasm` routing plugins and the fallback `<default>.wasm`.
    pub dir: PathBuf,
    /// Precompiled plugins, so a restart skips compilation; empty: no cache. It must be
    /// outside `dir` and writable by the engine alone (what is in it runs as native code).
    pub cache_dir: PathBuf,
    /// File stem of the fallback routing plugin used by tenants without their own.
    pub default_plugin: String,
    /// Instruction budget of one routing call (wasmtime fuel).
    pub fuel: u64,
    /// Wall-clock budget of one routing call.
    pub timeout_ms: u64,
    /// Linear-memory cap of one plugin instance.
    pub memory_bytes: usize,
    /// Largest event (JSON payload plus envelope strings) handed to a plugin.
    pub max_input_bytes: usize,
    /// Largest decision (sum of all strings in the deliveries) accepted from a plugin.
    pub max_output_bytes: usize,
    /// Most deliveries one event may produce.
    pub max_deliveries: usize,
    /// Routing time one tenant may use per second (its lane pauses when it is spent), so a
    /// slow plugin cannot take the cores other tenants need. 0: no limit.
    pub tenant_budget_ms_per_sec: u64,
    /// Consecutive malfunctions (trap, limit, invalid output) after which a plugin version is
    /// quarantined until a new version is published. 0: never.
    pub breaker_failures: u32,
    /// What happens to a quarantined plugin's events: `dead_letter` (set aside in the
    /// dead-letter table, not claimed, so they can be republished) or `default` (routed by
    /// the default plugin).
    pub breaker_fail_mode: BreakerFailMode,
    /// Calls one plugin instance serves (for one tenant) before it is replaced by a fresh
    /// one; 1: a fresh instance for every call. See `plugin::instances` for what reuse keeps
    /// and what it never does.
    pub instance_max_calls: u32,
    /// Idle instances kept warm across all tenants and plugins; past it the least recently
    /// used is dropped. 0: none kept (a fresh instance for every call).
    pub max_idle_instances: usize,
    /// Instruction budget of one templating call.
    pub templating_fuel: u64,
    /// Wall-clock budget of one templating call.
    pub templating_timeout_ms: u64,
    /// Linear-memory cap of one templating instance.
    pub templating_memory_bytes: usize,
    /// Largest rendered email (subject, html and text together), and largest text one
    /// `templates.render` host call may return.
    pub templating_max_output_bytes: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerFailMode {
    DeadLetter,
    Default,
}

impl Default for PluginConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("plugins/dist"),
            cache_dir: PathBuf::new(),
            default_plugin: "default".into(),
            fuel: 20_000_000,
            timeout_ms: 100,
            memory_bytes: 32 * 1024 * 1024,
            max_input_bytes: 256 * 1024,
            max_output_bytes: 64 * 1024,
            max_deliveries: 100,
            tenant_budget_ms_per_sec: 500,
            breaker_failures: 5,
            breaker_fail_mode: BreakerFailMode::DeadLetter,
            instance_max_calls: 10_000,
            max_idle_instances: 64,
            templating_fuel: 200_000_000,
            templating_timeout_ms: 500,
            templating_memory_bytes: 64 * 1024 * 1024,
            templating_max_output_bytes: 1024 * 1024,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TenantConfig {
    /// Routing plugin file stem for this tenant. Set: that file must exist (if it does not,
    /// the tenant's plugin is unavailable: its events are set aside unclaimed in the
    /// dead-letter table, never routed by the default plugin instead). Unset: `<tenant id>.wasm` if present, else the default plugin.
    pub plugin: Option<String>,
    /// Templating plugin file stem (world `templating`) that renders this tenant's emails.
    /// Unset: its Handlebars files render directly. Set but missing or broken: its emails
    /// wait (retried like a relay outage) until the plugin is there.
    pub templating_plugin: Option<String>,
    /// Values the tenant's plugin reads through the `host.config` import.
    pub config: BTreeMap<String, String>,
    /// Domains `{{link}}` may point to in this tenant's emails (and their subdomains);
    /// empty: any `https:` link.
    pub link_domains: Vec<String>,
    /// Domains this tenant may send email to; empty: any. Other recipients fail unsent.
    pub recipient_domains: Vec<String>,
    /// The tenant's identity provider's JWKS file: its keys verify tokens of this tenant
    /// only. Reloaded when it changes.
    pub jwks_file: Option<PathBuf>,
    /// The `iss` of tokens verified by `jwks_file`; unset: `auth.issuer`.
    pub jwt_issuer: Option<String>,
}

/// Where an event's tenant comes from (`kafka.tenant_from`); see `ingest::trust`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TenantFrom {
    /// The envelope's `tenant` field.
    Payload,
    /// The topic name, through `kafka.tenant_topic_pattern`.
    Topic,
    /// A Kafka header set by a trusted gateway (`kafka.tenant_header`).
    Header,
}

impl TenantFrom {
    /// As written in configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            TenantFrom::Payload => "payload",
            TenantFrom::Topic => "topic",
            TenantFrom::Header => "header",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SmtpTls {
    /// Plain SMTP (local relays, test sinks).
    None,
    /// STARTTLS upgrade, required.
    Starttls,
    /// Implicit TLS (SMTPS, usually port 465).
    Tls,
}

#[derive(Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SmtpConfig {
    pub host: String,
    pub port: u16,
    pub tls: SmtpTls,
    pub username: Option<String>,
    /// From the environment only (`NOTIFY_SMTP__PASSWORD`).
    pub password: Option<String>,
    /// `From:` header of every email.
    pub from: String,
    pub timeout_ms: u64,
}

impl Default for SmtpConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 11025,
            tls: SmtpTls::Starttls,
            username: None,
            password: None,
            from: "Notifications <notifications@example.com>".into(),
            timeout_ms: 10_000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EmailConfig {
    /// Holds `<tenant>/<template>/{subject,html,text}.hbs`, with `default/` as the fallback.
    pub templates_dir: PathBuf,
    /// How long a transiently failing email (4xx, connection trouble, timeouts) keeps being
    /// retried, counted from when it was queued, the way an MTA keeps its queue. Then it
    /// fails; `notify-engine email requeue` puts failed rows back.
    pub max_age_secs: u64,
    /// First retry delay; doubles per attempt, with jitter, up to `backoff_max_ms`.
    pub backoff_base_ms: u64,
    pub backoff_max_ms: u64,
    /// How often the worker looks for due rows when nobody wakes it.
    pub poll_interval_ms: u64,
    /// Rows claimed at a time (the next claim is made once half the sends are free).
    pub batch: i64,
    /// Rows of one tenant claimed at a time: tenants take turns, so one tenant's backlog
    /// cannot delay another's email.
    pub per_tenant_batch: i64,
    /// Emails sent at the same time.
    pub concurrency: usize,
    /// Emails per second one tenant may send from this instance (0: no limit).
    pub tenant_rate_per_sec: u32,
    /// Events older than this (by their `time`) are recorded, but their emails are not
    /// sent (status `skipped`): a new consumer group reading an old topic must not mail
    /// customers about last month's orders. 0 disables the check.
    pub max_event_age_secs: u64,
    /// How long a claim holds before another worker may take the row over.
    pub claim_timeout_ms: u64,
}

impl Default for EmailConfig {
    fn default() -> Self {
        Self {
            templates_dir: PathBuf::from("templates"),
            max_age_secs: 2 * 24 * 3600,
            backoff_base_ms: 1_000,
            backoff_max_ms: 300_000,
            poll_interval_ms: 1_000,
            batch: 16,
            per_tenant_batch: 4,
            concurrency: 4,
            tenant_rate_per_sec: 20,
            max_event_age_secs: 24 * 3600,
            claim_timeout_ms: 60_000,
        }
    }
}

impl EmailConfig {
    /// The whole of one send (connect, TLS, SMTP dialogue), bounded well inside the claim
    /// so a slow server can never outlive the claim and cause a second send.
    pub fn send_timeout(&self) -> Duration {
        Duration::from_millis(self.claim_timeout_ms / 2)
    }
}

#[derive(Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// HS256 secret. From the environment only (`NOTIFY_AUTH__JWT_SECRET`), ≥ 32 bytes.
    pub jwt_secret: String,
    /// Required `iss` claim.
    pub issuer: String,
    /// Required `aud` claim.
    pub audience: String,
    /// Allowed clock skew for `exp` / `nbf`.
    pub leeway_secs: u64,
    /// Name of the HttpOnly cookie that may carry the token instead of `Authorization`.
    pub cookie_name: String,
    /// Keys selected by the token's `kid`, each pinned to one algorithm and optionally to one
    /// tenant and issuer. `jwt_secret` stays the key of tokens without a `kid`.
    pub keys: Vec<JwtKeyConfig>,
    /// A JWKS file (RFC 7517) of RS256 / ES256 public keys, reloaded when it changes ("":
    /// none). A key may carry the non-standard members `tenant` and `iss` to bind it.
    pub jwks_file: PathBuf,
    /// How often key files are checked for changes.
    pub jwks_reload_ms: u64,
    /// Lifetime of a stream ticket (`POST /api/v1/sse/tickets`), at most 30 seconds.
    pub ticket_ttl_secs: u64,
}

/// One verification key (`[[auth.keys]]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtKeyConfig {
    /// The `kid` header that selects this key.
    pub kid: String,
    /// The only algorithm this key verifies: "HS256", "RS256" or "ES256".
    pub algorithm: String,
    /// HS256: the environment variable holding the secret (secrets never sit in files).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_env: Option<String>,
    /// RS256 / ES256: a PEM file with the public key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key_file: Option<PathBuf>,
    /// Tokens this key verifies must name this tenant; unset: any tenant (an operator key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// The `iss` these tokens must carry; unset: `auth.issuer`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            jwt_secret: String::new(),
            issuer: "notify-engine".into(),
            audience: "notify-api".into(),
            leeway_secs: 5,
            cookie_name: "notify_token".into(),
            keys: Vec::new(),
            jwks_file: PathBuf::new(),
            jwks_reload_ms: 2_000,
            ticket_ttl_secs: 30,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SseConfig {
    /// Interval of keep-alive comments (proxies drop idle connections).
    pub keepalive_secs: u64,
    /// `retry:` hint sent to browsers, in milliseconds.
    pub retry_ms: u64,
    /// Rows read from PostgreSQL per replay page.
    pub page_size: i64,
    /// Bytes (titles, bodies, data) per page, past its first row: what one stream may hold.
    pub page_bytes: i64,
    /// Deep replays (`Last-Event-ID: 0`, or more than a page behind) one user may start per
    /// minute; more answer 429. Each reads the user's history from PostgreSQL.
    pub deep_replays_per_minute: u32,
    /// Stream tickets one user may get per minute; more answer 429.
    pub tickets_per_minute: u32,
    /// Open streams allowed per (tenant, user); more answer 429.
    pub max_connections_per_user: usize,
    /// Open streams allowed per tenant on this instance; more answer 429.
    pub max_connections_per_tenant: usize,
    /// Open streams allowed in total on this instance; more answer 429.
    pub max_connections: usize,
}

impl Default for SseConfig {
    fn default() -> Self {
        Self {
            keepalive_secs: 15,
            retry_ms: 3_000,
            page_size: 200,
            page_bytes: 256 * 1024,
            deep_replays_per_minute: 6,
            tickets_per_minute: 60,
            max_connections_per_user: 8,
            max_connections_per_tenant: 5_000,
            max_connections: 10_000,
        }
    }
}

/// Cluster-wide presence (`[presence]`): which users have a stream open on which instance.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PresenceConfig {
    /// How often this instance refreshes its heartbeat row and expires dead instances.
    pub heartbeat_secs: u64,
    /// An instance whose heartbeat is older than this is dead: its users count as offline
    /// from then on. The staleness bound for an instance that died unannounced.
    pub ttl_secs: u64,
}

impl Default for PresenceConfig {
    fn default() -> Self {
        Self {
            heartbeat_secs: 5,
            ttl_secs: 15,
        }
    }
}

/// What is deleted when it gets old (`[retention]`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetentionConfig {
    /// Notifications (inbox items, live updates, read and archive events) older than this
    /// many days are deleted; 0: kept forever.
    pub notifications_days: u32,
    /// Duplicate-filter keys older than this many days are deleted; 0: kept forever. An
    /// event redelivered after that (a consumer group reset past it) is handled again, so
    /// keep it above the topics' retention.
    pub processed_events_days: u32,
    /// Rows deleted per statement: a purge never holds long locks or a long transaction.
    pub batch: i64,
    /// Pause between purge rounds.
    pub interval_secs: u64,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            notifications_days: 90,
            processed_events_days: 30,
            batch: 5_000,
            interval_secs: 60,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    pub format: LogFormat,
    /// `tracing` filter directive; `RUST_LOG` overrides it.
    pub filter: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            filter: "info,notify_engine=info".into(),
        }
    }
}

impl PluginConfig {
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    pub fn templating_timeout(&self) -> Duration {
        Duration::from_millis(self.templating_timeout_ms)
    }
}

/// The JWT secret the demo and `docker-compose.yml` use: public, so refused outside
/// development mode.
pub const DEMO_JWT_SECRET: &str = "demo-secret-change-me-0123456789abcdef";

/// `localhost` or a loopback address: traffic that never leaves the machine.
fn is_loopback_host(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .trim_matches(|c| c == '[' || c == ']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

// Secrets never reach a `Debug` print (a `{config:?}` in a log line, a panic message):
// these four sections print their credentials as "[redacted]".

const REDACTED: &str = "[redacted]";

impl std::fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let properties: BTreeMap<&str, &str> = self
            .properties
            .iter()
            .map(|(k, v)| {
                let shown = if is_secret_property(k) { REDACTED } else { v };
                (k.as_str(), shown)
            })
            .collect();
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("group_id", &self.group_id)
            .field("topics", &self.topics)
            .field("batch_max", &self.batch_max)
            .field("batch_linger_ms", &self.batch_linger_ms)
            .field("max_message_bytes", &self.max_message_bytes)
            .field("lane_capacity", &self.lane_capacity)
            .field("lane_max_bytes", &self.lane_max_bytes)
            .field("session_timeout_ms", &self.session_timeout_ms)
            .field("tenant_from", &self.tenant_from)
            .field("tenant_topic_pattern", &self.tenant_topic_pattern)
            .field("tenant_header", &self.tenant_header)
            .field("allowed_tenants", &self.allowed_tenants)
            .field("properties", &properties)
            .finish()
    }
}

impl std::fmt::Debug for DatabaseConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatabaseConfig")
            .field("url", &redact_url_password(&self.url))
            .field("max_connections", &self.max_connections)
            .field("api_max_connections", &self.api_max_connections)
            .field("migrate", &self.migrate)
            .finish()
    }
}

impl std::fmt::Debug for SmtpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmtpConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| REDACTED))
            .field("from", &self.from)
            .field("timeout_ms", &self.timeout_ms)
            .finish()
    }
}

impl std::fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthConfig")
            .field("jwt_secret", &REDACTED)
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("leeway_secs", &self.leeway_secs)
            .field("cookie_name", &self.cookie_name)
            .field("keys", &self.keys)
            .field("jwks_file", &self.jwks_file)
            .field("jwks_reload_ms", &self.jwks_reload_ms)
            .field("ticket_ttl_secs", &self.ticket_ttl_secs)
            .finish()
    }
}

/// `scheme://user:password@host/...` with the password replaced.
fn redact_url_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((userinfo, host)) = rest.rsplit_once('@') else {
        return url.to_owned();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:{REDACTED}@{host}"),
        None => url.to_owned(),
    }
}

/// Secrets that must never be read from a file.
const SECRET_KEYS: &[&str] = &["auth.jwt_secret", "smtp.password"];
/// Their environment variables, read as raw strings.
const JWT_SECRET_ENV: &str = "NOTIFY_AUTH__JWT_SECRET";
const SMTP_PASSWORD_ENV: &str = "NOTIFY_SMTP__PASSWORD";
/// Prefix of environment variables that set librdkafka properties.
const KAFKA_PROPERTY_ENV: &str = "NOTIFY_KAFKA_PROPERTY_";

/// A Kafka property that holds a credential (`sasl.password`, `ssl.key.password`, ...).
fn is_secret_property(name: &str) -> bool {
    name.contains("password") || name.contains("secret")
}

impl Config {
    /// Defaults → `file` (if given) → environment, then [`Config::validate`].
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let config = Self::extract(file)?;
        config.validate()?;
        Ok(config)
    }

    /// Defaults → `file` → environment, without [`Config::validate`] (for tools that need
    /// only part of the configuration).
    pub fn extract(file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            if !path.exists() {
                return Err(ConfigError::Invalid(format!(
                    "config file {} does not exist",
                    path.display()
                )));
            }
            let from_file = Figment::from(Toml::file_exact(path));
            for key in SECRET_KEYS {
                if from_file.find_value(key).is_ok() {
                    return Err(ConfigError::Invalid(format!(
                        "{key} must come from the environment, not from {}",
                        path.display()
                    )));
                }
            }
            if let Ok(figment::value::Value::Dict(_, properties)) =
                from_file.find_value("kafka.properties")
                && let Some(name) = properties.keys().find(|k| is_secret_property(k))
            {
                return Err(ConfigError::Invalid(format!(
                    "kafka.properties.{name} is a credential: set {KAFKA_PROPERTY_ENV}{} in the environment instead of {}",
                    name.to_ascii_uppercase().replace('.', "_"),
                    path.display()
                )));
            }
            figment = figment.merge(from_file);
        }
        // Only NOTIFY_<SECTION>__<KEY>: other NOTIFY_* variables (NOTIFY_CONFIG, the service
        // scripts' NOTIFY_KAFKA_PORT, ...) are not configuration keys. Secrets are read raw
        // below: figment would parse an all-digit password as a number.
        figment = figment.merge(
            Env::prefixed("NOTIFY_")
                .filter(|k| {
                    let k = k.as_str();
                    k.contains("__")
                        && ![JWT_SECRET_ENV, SMTP_PASSWORD_ENV]
                            .iter()
                            .any(|var| var["NOTIFY_".len()..].eq_ignore_ascii_case(k))
                })
                .split("__"),
        );
        if let Ok(url) = std::env::var("DATABASE_URL") {
            figment = figment.merge(Serialized::default("database.url", url));
        }
        let mut config: Config = figment.extract().map_err(Box::new)?;
        if let Ok(secret) = std::env::var(JWT_SECRET_ENV) {
            config.auth.jwt_secret = secret;
        }
        if let Ok(password) = std::env::var(SMTP_PASSWORD_ENV) {
            config.smtp.password = Some(password);
        }
        // librdkafka property names contain dots, which cannot appear in variable names:
        // NOTIFY_KAFKA_PROPERTY_SASL_PASSWORD sets `sasl.password`.
        for (var, value) in std::env::vars() {
            if let Some(name) = var.strip_prefix(KAFKA_PROPERTY_ENV) {
                let key = name.to_ascii_lowercase().replace('_', ".");
                config.kafka.properties.insert(key, value);
            }
        }
        Ok(config)
    }

    /// Every check that can be made before touching the network.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        let other_keys = !self.auth.keys.is_empty()
            || !self.auth.jwks_file.as_os_str().is_empty()
            || self.tenants.values().any(|t| t.jwks_file.is_some());
        if (!self.auth.jwt_secret.is_empty() || !other_keys) && self.auth.jwt_secret.len() < 32 {
            return invalid(
                "auth.jwt_secret must be set (NOTIFY_AUTH__JWT_SECRET) and at least 32 bytes long \
                 (or configure auth.keys / auth.jwks_file instead)"
                    .into(),
            );
        }
        if self.auth.ticket_ttl_secs == 0 || self.auth.ticket_ttl_secs > 30 {
            return invalid("auth.ticket_ttl_secs must be between 1 and 30".into());
        }
        if self.auth.jwks_reload_ms < 100 {
            return invalid("auth.jwks_reload_ms must be at least 100".into());
        }
        for key in &self.auth.keys {
            if !["HS256", "RS256", "ES256"].contains(&key.algorithm.as_str()) {
                return invalid(format!(
                    "auth.keys {:?}: algorithm {:?} is not one of HS256, RS256, ES256",
                    key.kid, key.algorithm
                ));
            }
            let hs = key.algorithm == "HS256";
            if key.kid.is_empty()
                || hs != key.secret_env.is_some()
                || hs == key.public_key_file.is_some()
            {
                return invalid(format!(
                    "auth.keys {:?}: needs a kid, and secret_env for HS256 or public_key_file for RS256/ES256 (not both)",
                    key.kid
                ));
            }
            if let Some(t) = &key.tenant
                && !crate::model::valid_tenant(t)
            {
                return invalid(format!(
                    "auth.keys {:?}: tenant {t:?} is not a tenant id",
                    key.kid
                ));
            }
        }
        for origin in &self.http.cors_origins {
            let ok = url::Url::parse(origin).is_ok_and(|u| {
                matches!(u.scheme(), "http" | "https")
                    && u.path() == "/"
                    && !origin.ends_with('/')
                    && u.query().is_none()
            });
            if !ok || origin == "*" {
                return invalid(format!(
                    "http.cors_origins: {origin:?} must be an origin like \"https://app.example.com\" (no path, no wildcard)"
                ));
            }
        }
        if self.presence.heartbeat_secs == 0
            || self.presence.ttl_secs < 2 * self.presence.heartbeat_secs
        {
            return invalid(
                "presence.heartbeat_secs must be positive and presence.ttl_secs at least twice \
                 as long (a live instance must not expire between two heartbeats)"
                    .into(),
            );
        }
        if self.retention.batch < 1 || self.retention.interval_secs == 0 {
            return invalid("retention.batch and retention.interval_secs must be positive".into());
        }
        if self.kafka.topics.is_empty() {
            return invalid("kafka.topics must name at least one topic".into());
        }
        if self.kafka.brokers.trim().is_empty() {
            return invalid("kafka.brokers must be set".into());
        }
        if self.kafka.lane_max_bytes == 0 || self.kafka.lane_max_bytes > u32::MAX as usize {
            return invalid("kafka.lane_max_bytes must be between 1 and 4294967295".into());
        }
        if !(6_000..=1_800_000).contains(&self.kafka.session_timeout_ms) {
            return invalid(
                "kafka.session_timeout_ms must be between 6000 and 1800000 (the broker's bounds)"
                    .into(),
            );
        }
        if self.kafka.batch_max == 0 || self.kafka.lane_capacity == 0 {
            return invalid("kafka.batch_max and kafka.lane_capacity must be at least 1".into());
        }
        if self.kafka.tenant_from == TenantFrom::Topic
            && self
                .kafka
                .tenant_topic_pattern
                .matches(crate::model::TENANT_PLACEHOLDER)
                .count()
                != 1
        {
            return invalid(
                "kafka.tenant_from = \"topic\" needs kafka.tenant_topic_pattern with exactly one {tenant}, e.g. \"orders.{tenant}\""
                    .into(),
            );
        }
        if self.kafka.tenant_from == TenantFrom::Header && self.kafka.tenant_header.is_empty() {
            return invalid("kafka.tenant_from = \"header\" needs kafka.tenant_header".into());
        }
        if let Some(bad) = self
            .kafka
            .allowed_tenants
            .iter()
            .find(|t| !crate::model::valid_tenant(t))
        {
            return invalid(format!("kafka.allowed_tenants: {bad:?} is not a tenant id"));
        }
        for key in ["group.id", "bootstrap.servers", "enable.auto.offset.store"] {
            if self.kafka.properties.contains_key(key) {
                return invalid(format!(
                    "kafka.properties.{key} is managed by the engine; use the typed setting"
                ));
            }
        }
        if self.plugins.fuel == 0 || self.plugins.timeout_ms == 0 {
            return invalid("plugins.fuel and plugins.timeout_ms must be positive".into());
        }
        if !self.plugins.cache_dir.as_os_str().is_empty()
            && self.plugins.cache_dir.starts_with(&self.plugins.dir)
        {
            return invalid(
                "plugins.cache_dir must be outside plugins.dir (the watched directory)".into(),
            );
        }
        if self.plugins.memory_bytes < 1024 * 1024
            || self.plugins.templating_memory_bytes < 1024 * 1024
        {
            return invalid(
                "plugins.memory_bytes and plugins.templating_memory_bytes must be at least 1 MiB"
                    .into(),
            );
        }
        if self.plugins.templating_fuel == 0
            || self.plugins.templating_timeout_ms == 0
            || self.plugins.templating_max_output_bytes == 0
        {
            return invalid(
                "plugins.templating_fuel, templating_timeout_ms and templating_max_output_bytes must be positive"
                    .into(),
            );
        }
        if let Some((id, _)) = self
            .tenants
            .iter()
            .find(|(_, t)| t.templating_plugin.is_some() && t.templating_plugin == t.plugin)
        {
            return invalid(format!(
                "tenants.{id}: plugin and templating_plugin name the same file; a component implements one world"
            ));
        }
        if self.email.batch < 1 || self.email.per_tenant_batch < 1 || self.email.concurrency < 1 {
            return invalid(
                "email.batch, email.per_tenant_batch and email.concurrency must be at least 1"
                    .into(),
            );
        }
        if self.email.max_age_secs < 60 {
            return invalid("email.max_age_secs must be at least 60".into());
        }
        if self.auth.jwt_secret == DEMO_JWT_SECRET && !self.dev.mode {
            return invalid(format!(
                "auth.jwt_secret is the demo secret published in this repository; set your own \
                 ({JWT_SECRET_ENV}), or set dev.mode = true (NOTIFY_DEV__MODE=true) on a \
                 development machine"
            ));
        }
        if self.smtp.username.is_some()
            && self.smtp.tls == SmtpTls::None
            && !is_loopback_host(&self.smtp.host)
        {
            return invalid(format!(
                "smtp.username is set but smtp.tls is \"none\": the password would cross the \
                 network in clear text to {}; use \"starttls\" or \"tls\"",
                self.smtp.host
            ));
        }
        if self.http.listen == self.http.admin_listen && self.http.listen.port() != 0 {
            return invalid("http.listen and http.admin_listen must differ".into());
        }
        if self.http.max_connections < 1
            || self.http.max_connections_per_ip < 1
            || self.http.header_timeout_ms == 0
            || self.http.write_timeout_ms == 0
            || self.database.api_max_connections < 1
        {
            return invalid(
                "http.max_connections, http.max_connections_per_ip, http.header_timeout_ms, \
                 http.write_timeout_ms and database.api_max_connections must be positive"
                    .into(),
            );
        }
        // A claim must outlive the sends it covers, or a second worker sends the same email.
        if self.email.claim_timeout_ms < 3 * self.smtp.timeout_ms {
            return invalid(format!(
                "email.claim_timeout_ms ({}) must be at least 3 × smtp.timeout_ms ({})",
                self.email.claim_timeout_ms, self.smtp.timeout_ms
            ));
        }
        if self.sse.page_size < 1
            || self.sse.page_bytes < 1
            || self.sse.deep_replays_per_minute < 1
            || self.sse.tickets_per_minute < 1
            || self.sse.max_connections_per_user < 1
            || self.sse.max_connections_per_tenant < 1
            || self.sse.max_connections < 1
        {
            return invalid(
                "sse.page_size, sse.page_bytes, sse.deep_replays_per_minute, sse.tickets_per_minute, sse.max_connections_per_user, sse.max_connections_per_tenant and sse.max_connections must be at least 1"
                    .into(),
            );
        }
        if self.sse.keepalive_secs == 0 || self.sse.keepalive_secs > 15 {
            return invalid("sse.keepalive_secs must be between 1 and 15".into());
        }
        if self.smtp.from.parse::<lettre::message::Mailbox>().is_err() {
            return invalid(format!(
                "smtp.from {:?} is not a valid mailbox",
                self.smtp.from
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> Config {
        let mut c = Config::default();
        c.auth.jwt_secret = "x".repeat(32);
        c
    }

    #[test]
    fn defaults_need_only_a_secret() {
        assert!(Config::default().validate().is_err());
        valid().validate().unwrap();
    }

    #[test]
    fn rejects_engine_managed_kafka_properties() {
        let mut c = valid();
        c.kafka.properties.insert("group.id".into(), "x".into());
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("group.id"), "{err}");
    }

    /// The error `Config::load` gives for a file with `toml` in it.
    fn load_error(toml: &str) -> String {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("engine.toml");
        std::fs::write(&path, toml).unwrap();
        Config::load(Some(&path)).unwrap_err().to_string()
    }

    #[test]
    fn rejects_secret_in_file() {
        let err = load_error("[auth]\njwt_secret = \"0123456789abcdef0123456789abcdef\"\n");
        assert!(err.contains("environment"), "{err}");
    }

    #[test]
    fn example_file_lists_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/engine.example.toml");
        let from_file: Config = Figment::from(Toml::file_exact(&path)).extract().unwrap();
        assert_eq!(
            serde_json::to_value(from_file).unwrap(),
            serde_json::to_value(Config::default()).unwrap(),
            "config/engine.example.toml differs from Config::default()"
        );
    }

    #[test]
    fn rejects_kafka_credentials_in_file() {
        let err = load_error("[kafka.properties]\n\"sasl.password\" = \"hunter2\"\n");
        assert!(err.contains("NOTIFY_KAFKA_PROPERTY_SASL_PASSWORD"), "{err}");
    }

    #[test]
    fn debug_prints_no_secret() {
        let mut c = valid();
        c.auth.jwt_secret = "jwt-secret-value-0123456789abcdefgh".into();
        c.smtp.password = Some("smtp-password-value".into());
        c.database.url = "postgres://notify:db-password-value@db.internal:5432/notify".into();
        c.kafka
            .properties
            .insert("sasl.password".into(), "kafka-password-value".into());
        c.kafka
            .properties
            .insert("sasl.username".into(), "notify-engine".into());
        let printed = format!("{c:?}");
        for secret in [
            "jwt-secret-value",
            "smtp-password-value",
            "db-password-value",
            "kafka-password-value",
        ] {
            assert!(!printed.contains(secret), "{secret} in {printed}");
        }
        assert!(printed.contains("notify-engine"), "{printed}");
        assert!(printed.contains("db.internal:5432"), "{printed}");
    }

    #[test]
    fn refuses_the_demo_secret_outside_dev_mode() {
        let mut c = valid();
        c.auth.jwt_secret = DEMO_JWT_SECRET.into();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("demo secret"), "{err}");
        c.dev.mode = true;
        c.validate().unwrap();
    }

    #[test]
    fn refuses_smtp_credentials_in_clear_text_off_loopback() {
        let mut c = valid();
        c.smtp.username = Some("notify".into());
        c.smtp.tls = SmtpTls::None;
        c.smtp.host = "smtp.example.com".into();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("clear text"), "{err}");
        for host in ["127.0.0.1", "localhost", "::1"] {
            c.smtp.host = host.into();
            c.validate().unwrap();
        }
        c.smtp.host = "smtp.example.com".into();
        c.smtp.tls = SmtpTls::Starttls;
        c.validate().unwrap();
        assert_eq!(Config::default().smtp.tls, SmtpTls::Starttls);
    }

    #[test]
    fn rejects_unknown_keys() {
        let err = load_error("[kafka]\nbrokerz = \"x\"\n");
        assert!(err.contains("brokerz"), "{err}");
    }
}
