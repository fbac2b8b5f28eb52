//! `[auth]` and `[[auth.keys]]`: how tokens are verified (the HS256 secret, keys by `kid`,
//! a JWKS file) and how long a stream ticket lives; the secret never reaches a `Debug` print.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{ConfigError, REDACTED, invalid};

#[derive(Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// HS256 secret. From the environment only (`NOTIFY_AUTH__JWT_SECRET`), ≥ 32 bytes.
    pub jwt_secret: String,
    /// Required `iss` claim.
    pub issuer: String,
    /// Required `aud` claim.
    pub audience: String,
    /// Allowed clock skew for `exp`, `nbf` and `iat`.
    pub leeway_secs: u64,
    /// The longest a token may live: `exp - iat`, or `exp - now` for a token without `iat`
    /// (a token of a year's life, if leaked, would be a year's access). Also bounds how long
    /// a revocation must be remembered.
    pub max_token_lifetime_secs: u64,
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
            max_token_lifetime_secs: 86_400,
            cookie_name: "notify_token".into(),
            keys: Vec::new(),
            jwks_file: PathBuf::new(),
            jwks_reload_ms: 2_000,
            ticket_ttl_secs: 30,
        }
    }
}

/// The highest `auth.max_token_lifetime_secs` accepted: 30 days. Longer-lived credentials
/// belong in a refresh flow at the identity provider, not in a bearer token.
pub const MAX_TOKEN_LIFETIME_LIMIT: u64 = 30 * 86_400;

/// The JWT secret the demo and `docker-compose.yml` use: public, so refused outside
/// development mode.
pub const DEMO_JWT_SECRET: &str = "demo-secret-change-me-0123456789abcdef";

impl std::fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthConfig")
            .field("jwt_secret", &REDACTED)
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("leeway_secs", &self.leeway_secs)
            .field("max_token_lifetime_secs", &self.max_token_lifetime_secs)
            .field("cookie_name", &self.cookie_name)
            .field("keys", &self.keys)
            .field("jwks_file", &self.jwks_file)
            .field("jwks_reload_ms", &self.jwks_reload_ms)
            .field("ticket_ttl_secs", &self.ticket_ttl_secs)
            .finish()
    }
}

impl AuthConfig {
    /// Some key to verify tokens with, a short ticket life, and keys that are complete.
    /// `tenant_keys`: a tenant has a JWKS file of its own, which stands in for the secret.
    pub(super) fn validate(&self, tenant_keys: bool) -> Result<(), ConfigError> {
        let other_keys =
            !self.keys.is_empty() || !self.jwks_file.as_os_str().is_empty() || tenant_keys;
        if (!self.jwt_secret.is_empty() || !other_keys) && self.jwt_secret.len() < 32 {
            return invalid(
                "auth.jwt_secret must be set (NOTIFY_AUTH__JWT_SECRET) and at least 32 bytes long \
                 (or configure auth.keys / auth.jwks_file instead)",
            );
        }
        if self.ticket_ttl_secs == 0 || self.ticket_ttl_secs > 30 {
            return invalid("auth.ticket_ttl_secs must be between 1 and 30");
        }
        if !(60..=MAX_TOKEN_LIFETIME_LIMIT).contains(&self.max_token_lifetime_secs) {
            return invalid(format!(
                "auth.max_token_lifetime_secs must be between 60 and {MAX_TOKEN_LIFETIME_LIMIT} (30 days)"
            ));
        }
        if self.jwks_reload_ms < 100 {
            return invalid("auth.jwks_reload_ms must be at least 100");
        }
        self.keys.iter().try_for_each(JwtKeyConfig::validate)
    }
}

impl JwtKeyConfig {
    /// One algorithm of the three, the material that algorithm needs (and not the other),
    /// and a tenant binding that names a tenant.
    fn validate(&self) -> Result<(), ConfigError> {
        if !["HS256", "RS256", "ES256"].contains(&self.algorithm.as_str()) {
            return invalid(format!(
                "auth.keys {:?}: algorithm {:?} is not one of HS256, RS256, ES256",
                self.kid, self.algorithm
            ));
        }
        let hs = self.algorithm == "HS256";
        if self.kid.is_empty()
            || hs != self.secret_env.is_some()
            || hs == self.public_key_file.is_some()
        {
            return invalid(format!(
                "auth.keys {:?}: needs a kid, and secret_env for HS256 or public_key_file for RS256/ES256 (not both)",
                self.kid
            ));
        }
        if let Some(t) = &self.tenant
            && !crate::model::valid_tenant(t)
        {
            return invalid(format!(
                "auth.keys {:?}: tenant {t:?} is not a tenant id",
                self.kid
            ));
        }
        Ok(())
    }
}
