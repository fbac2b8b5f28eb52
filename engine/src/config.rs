//! Configuration: compiled-in defaults, then an optional TOML file, then the environment.
//!
//! Environment variables are `NOTIFY_<SECTION>__<KEY>` (double underscore between levels),
//! e.g. `NOTIFY_KAFKA__BROKERS`, `NOTIFY_AUTH__JWT_SECRET`. `DATABASE_URL` is accepted too.
//! Secrets (`auth.jwt_secret`, `smtp.password`, `cluster.secret`) come from the environment only: a config
//! file that contains them is rejected, because config files end up in repositories.
//!
//! Everything is validated once, at start-up, in [`Config::validate`]: each section checks
//! its own rules (`config/<section>.rs`, beside its struct), and the rules that join two
//! sections stay here.

use std::collections::BTreeMap;
use std::path::Path;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

mod auth;
mod database;
mod email;
mod http;
mod kafka;
mod plugins;

pub use auth::{AuthConfig, DEMO_JWT_SECRET, JwtKeyConfig};
pub use database::{ClusterConfig, DatabaseConfig, PresenceConfig, RetentionConfig};
pub use email::{EmailConfig, SmtpConfig, SmtpTls};
pub use http::{Cidr, HttpConfig, LimitsConfig, SseConfig};
use kafka::is_secret_property;
pub use kafka::{KafkaConfig, TenantFrom};
pub use plugins::{BreakerFailMode, PluginConfig, TenantConfig};

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
    pub limits: LimitsConfig,
    pub retention: RetentionConfig,
    pub presence: PresenceConfig,
    pub cluster: ClusterConfig,
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

/// Secrets never reach a `Debug` print (a `{config:?}` in a log line, a panic message):
/// five sections (`kafka`, `database`, `smtp`, `auth`, `cluster`, each in its file) print their
/// credentials as this.
const REDACTED: &str = "[redacted]";

/// Secrets that must never be read from a file.
const SECRET_KEYS: &[&str] = &["auth.jwt_secret", "smtp.password", "cluster.secret"];
/// Their environment variables, read as raw strings.
const JWT_SECRET_ENV: &str = "NOTIFY_AUTH__JWT_SECRET";
const SMTP_PASSWORD_ENV: &str = "NOTIFY_SMTP__PASSWORD";
const CLUSTER_SECRET_ENV: &str = "NOTIFY_CLUSTER__SECRET";
/// Prefix of environment variables that set librdkafka properties.
const KAFKA_PROPERTY_ENV: &str = "NOTIFY_KAFKA_PROPERTY_";

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
                        && ![JWT_SECRET_ENV, SMTP_PASSWORD_ENV, CLUSTER_SECRET_ENV]
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
        // Empty counts as unset: a compose file's `${VAR:-}` passes an empty string.
        if let Ok(secret) = std::env::var(CLUSTER_SECRET_ENV)
            && !secret.is_empty()
        {
            config.cluster.secret = Some(secret);
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

    /// Every check that can be made before touching the network: each section's own rules,
    /// then the rules that join two sections. The first rule broken is the answer.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let tenant_keys = self.tenants.values().any(|t| t.jwks_file.is_some());
        self.auth.validate(tenant_keys)?;
        self.http.validate()?;
        self.presence.validate()?;
        self.cluster.validate()?;
        self.retention.validate()?;
        self.kafka.validate()?;
        self.plugins.validate()?;
        for (id, tenant) in &self.tenants {
            tenant.validate(id)?;
        }
        self.email.validate()?;
        self.sse.validate()?;
        self.limits.validate()?;
        self.smtp.validate()?;
        self.validate_across_sections()
    }

    /// The rules whose terms live in two sections.
    fn validate_across_sections(&self) -> Result<(), ConfigError> {
        if self.auth.jwt_secret == DEMO_JWT_SECRET && !self.dev.mode {
            return invalid(format!(
                "auth.jwt_secret is the demo secret published in this repository; set your own \
                 ({JWT_SECRET_ENV}), or set dev.mode = true (NOTIFY_DEV__MODE=true) on a \
                 development machine"
            ));
        }
        if self.http.max_connections < 1
            || self.http.max_connections_per_ip < 1
            || self.http.header_timeout_ms == 0
            || self.http.write_timeout_ms == 0
            || self.database.api_max_connections < 1
        {
            return invalid(
                "http.max_connections, http.max_connections_per_ip, http.header_timeout_ms, \
                 http.write_timeout_ms and database.api_max_connections must be positive",
            );
        }
        // A row that fails at the end of its retries (queued email.max_age_secs ago) must
        // outlive that moment, or it is purged before anyone could requeue it.
        let outbox_kept = u64::from(self.retention.email_outbox_days) * 24 * 3600;
        if outbox_kept > 0 && outbox_kept <= self.email.max_age_secs {
            return invalid(format!(
                "retention.email_outbox_days ({} days) must be longer than email.max_age_secs                  ({} s): an email that fails after its last retry would be purged at once",
                self.retention.email_outbox_days, self.email.max_age_secs
            ));
        }
        // A claim must outlive the sends it covers, or a second worker sends the same email.
        if self.email.claim_timeout_ms < 3 * self.smtp.timeout_ms {
            return invalid(format!(
                "email.claim_timeout_ms ({}) must be at least 3 × smtp.timeout_ms ({})",
                self.email.claim_timeout_ms, self.smtp.timeout_ms
            ));
        }
        Ok(())
    }
}

/// The answer of a rule that does not hold.
fn invalid(message: impl Into<String>) -> Result<(), ConfigError> {
    Err(ConfigError::Invalid(message.into()))
}

#[cfg(test)]
mod tests;
