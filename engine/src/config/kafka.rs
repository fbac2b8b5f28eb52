//! `[kafka]`: the brokers, the consumer group, the tenant lanes, and who may speak for a
//! tenant; its `Debug` hides credential properties.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{ConfigError, REDACTED, invalid};

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
    /// (`tenant_header`, set by a trusted gateway). See docs/security.md, "Who may speak for a tenant".
    pub tenant_from: TenantFrom,
    /// With `tenant_from = "topic"`: topic names with one `{tenant}` placeholder.
    pub tenant_topic_pattern: String,
    /// With `tenant_from = "header"`: the Kafka header that names the tenant.
    pub tenant_header: String,
    /// Tenants accepted (empty: any); others are dead-lettered.
    pub allowed_tenants: Vec<String>,
    /// Messages queued per tenant lane. When a slow tenant's lane is full, its partitions
    /// pause; once another tenant's message waits behind it, its messages spill to
    /// PostgreSQL (`spill_max_rows`) and the others' pass it.
    pub lane_capacity: usize,
    /// Bytes (payload, key, headers) queued per tenant lane: the other bound of a lane, so
    /// that large messages cannot fill memory where small ones would not.
    pub lane_max_bytes: usize,
    /// Most tenant lanes alive at once. A message of a new tenant when every lane is busy
    /// waits (its partition paused) until one is idle; idle lanes are then freed at once.
    pub max_lanes: usize,
    /// A lane with nothing queued for this long is freed (its tenant gets a new one on its
    /// next message). At least 1 000: a tenant's routing-time budget counts per second, so
    /// a lane idle that long has nothing left to remember.
    pub lane_idle_ms: u64,
    /// Messages a tenant may have in the spill (`spilled_messages`) before its partitions
    /// pause again behind its full lane. 0 turns spilling off: a full lane pauses its
    /// partitions at once.
    pub spill_max_rows: u64,
    /// Bytes (payload, key, headers) a tenant may have in the spill; the other bound.
    pub spill_max_bytes: u64,
    /// How long the group waits for an instance that stopped heartbeating (killed, frozen,
    /// cut off) before its partitions go to the others (librdkafka's `session.timeout.ms`,
    /// whose 45 s default stalled a killed instance's partitions that long, restarted or
    /// not). At least 6 000 (the broker's `group.min.session.timeout.ms` default).
    pub session_timeout_ms: u64,
    /// How long a dead letter's replay token counts after `notify-engine dead-letters
    /// replay` issued it (1 day). A replay that arrives later is refused with the reason,
    /// its dead letter kept to be replayed again. See docs/security.md, "Replayed dead letters".
    pub replay_token_ttl_secs: u64,
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
            max_lanes: 4_096,
            lane_idle_ms: 60_000,
            spill_max_rows: 1_000_000,
            spill_max_bytes: 1024 * 1024 * 1024,
            session_timeout_ms: 10_000,
            replay_token_ttl_secs: 86_400,
            tenant_from: TenantFrom::Payload,
            tenant_topic_pattern: String::new(),
            tenant_header: "tenant".into(),
            allowed_tenants: Vec::new(),
            properties: BTreeMap::new(),
        }
    }
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

/// The longest `replay_token_ttl_secs`: a token is a bearer credential for one message, so
/// it does not live for ever.
const MAX_REPLAY_TOKEN_TTL_SECS: u64 = 30 * 86_400;

/// Words in a librdkafka property's name that mark it a credential (`sasl.password`,
/// `ssl.key.password`, `ssl.keystore.password`, `sasl.oauthbearer.client.secret`,
/// `sasl.oauthbearer.assertion.private.key.passphrase` and `.pem`, `ssl.key.pem`, ...).
/// A name holding one of them is refused in the config file and redacted in prints: a
/// property that is no secret but matches (the path
/// `sasl.oauthbearer.assertion.private.key.file`) only has to come from the environment.
const SECRET_NAME_PARTS: &[&str] = &["password", "secret", "passphrase", "private", "key.pem"];

/// librdkafka properties that carry secrets although their names do not say so
/// (CONFIGURATION.md of librdkafka 2.12): `sasl.oauthbearer.config` holds the unsecured
/// JWT's claims or a client's credentials; `ssl_key` and `ssl_engine_callback_data` are
/// set through librdkafka's API, never as text, and are refused like the others.
const SECRET_PROPERTIES: &[&str] = &[
    "sasl.oauthbearer.config",
    "ssl_key",
    "ssl_engine_callback_data",
];

/// A Kafka property that holds a credential (see [`SECRET_NAME_PARTS`] and
/// [`SECRET_PROPERTIES`]); librdkafka's names are lowercase, compared here whatever the case.
pub(super) fn is_secret_property(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    SECRET_NAME_PARTS.iter().any(|part| name.contains(part))
        || SECRET_PROPERTIES.contains(&name.as_str())
}

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
            .field("max_lanes", &self.max_lanes)
            .field("lane_idle_ms", &self.lane_idle_ms)
            .field("spill_max_rows", &self.spill_max_rows)
            .field("spill_max_bytes", &self.spill_max_bytes)
            .field("session_timeout_ms", &self.session_timeout_ms)
            .field("replay_token_ttl_secs", &self.replay_token_ttl_secs)
            .field("tenant_from", &self.tenant_from)
            .field("tenant_topic_pattern", &self.tenant_topic_pattern)
            .field("tenant_header", &self.tenant_header)
            .field("allowed_tenants", &self.allowed_tenants)
            .field("properties", &properties)
            .finish()
    }
}

impl KafkaConfig {
    /// Limits the broker and the lanes can live with, a tenant source that is fully
    /// configured, and no property the engine sets itself.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.topics.is_empty() {
            return invalid("kafka.topics must name at least one topic");
        }
        if self.brokers.trim().is_empty() {
            return invalid("kafka.brokers must be set");
        }
        if self.lane_max_bytes == 0 || self.lane_max_bytes > u32::MAX as usize {
            return invalid("kafka.lane_max_bytes must be between 1 and 4294967295");
        }
        if !(6_000..=1_800_000).contains(&self.session_timeout_ms) {
            return invalid(
                "kafka.session_timeout_ms must be between 6000 and 1800000 (the broker's bounds)",
            );
        }
        if !(1..=MAX_REPLAY_TOKEN_TTL_SECS).contains(&self.replay_token_ttl_secs) {
            return invalid(format!(
                "kafka.replay_token_ttl_secs must be between 1 and {MAX_REPLAY_TOKEN_TTL_SECS} (30 days)"
            ));
        }
        if self.batch_max == 0 || self.lane_capacity == 0 || self.max_lanes == 0 {
            return invalid(
                "kafka.batch_max, kafka.lane_capacity and kafka.max_lanes must be at least 1",
            );
        }
        if self.lane_idle_ms < 1_000 {
            return invalid("kafka.lane_idle_ms must be at least 1000 (a routing budget's window)");
        }
        self.validate_tenant_source()?;
        for key in ["group.id", "bootstrap.servers", "enable.auto.offset.store"] {
            if self.properties.contains_key(key) {
                return invalid(format!(
                    "kafka.properties.{key} is managed by the engine; use the typed setting"
                ));
            }
        }
        Ok(())
    }

    /// `tenant_from` has what it needs, and `allowed_tenants` holds tenant ids.
    fn validate_tenant_source(&self) -> Result<(), ConfigError> {
        if self.tenant_from == TenantFrom::Topic
            && self
                .tenant_topic_pattern
                .matches(crate::model::TENANT_PLACEHOLDER)
                .count()
                != 1
        {
            return invalid(
                "kafka.tenant_from = \"topic\" needs kafka.tenant_topic_pattern with exactly one {tenant}, e.g. \"orders.{tenant}\"",
            );
        }
        if self.tenant_from == TenantFrom::Header && self.tenant_header.is_empty() {
            return invalid("kafka.tenant_from = \"header\" needs kafka.tenant_header");
        }
        if let Some(bad) = self
            .allowed_tenants
            .iter()
            .find(|t| !crate::model::valid_tenant(t))
        {
            return invalid(format!("kafka.allowed_tenants: {bad:?} is not a tenant id"));
        }
        Ok(())
    }
}
