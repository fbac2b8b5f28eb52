//! JWT authentication. Tenant and user come from the token's claims and nowhere else.
//!
//! The token travels in `Authorization: Bearer …` or in an HttpOnly cookie; a browser's
//! `EventSource`, which can set neither, trades it for a single-use ticket first
//! (`POST /api/v1/sse/tickets`, see [`super::tickets`]). Never a token in a URL: URLs end up
//! in access logs.
//!
//! The key is chosen by the token's `kid` and pins the algorithm (see [`keys`]); `exp`,
//! `nbf`, `iss` and `aud` are checked, and a tenant's key verifies only that tenant's tokens.
//! `iat` may not lie in the future, and no token may live longer than
//! `auth.max_token_lifetime_secs` (`exp - iat`, or `exp - now` without `iat`). Every refusal
//! answers the same 401 body: which check failed is logged, never told, so a caller cannot
//! probe the key set.
//!
//! Credentials can also be withdrawn before they expire: a key removed from the key set, or
//! a user signed out by an operator ([`revoke`]). Requests with them are refused from then
//! on, and open streams are told through [`Auth::changes`] and end (see `sse::reader`).

pub mod keys;
pub mod revoke;

use std::sync::Arc;

use arc_swap::ArcSwap;
use axum::extract::FromRequestParts;
use axum::http::HeaderMap;
use axum::http::header::{AUTHORIZATION, COOKIE};
use axum::http::request::Parts;
use jsonwebtoken::{Algorithm, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use super::AppState;
use super::error::ApiError;
use crate::config::{AuthConfig, Config};
use crate::model::valid_tenant;
use keys::{KeyError, KeySet};

/// Who is asking: always a (tenant, user) pair, with the roles the token grants and when it
/// stops being valid. Handlers take it as an extractor; a request without a valid token
/// never reaches them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub tenant: String,
    pub user_id: String,
    /// The `roles` claim (e.g. `admin` for the admin API); empty when absent.
    pub roles: Vec<String>,
    /// The token's `exp` (seconds since the epoch): a stream ends then.
    pub expires_at: u64,
    /// The token's `iat`, or for a token without one the earliest it can have been issued
    /// (`exp - auth.max_token_lifetime_secs`): a sign-out refuses tokens issued before it.
    pub issued_at: u64,
    /// The stamp of the key that verified the token ([`keys::Key::stamp`]): its streams end
    /// when the key leaves the key set.
    pub key: Arc<str>,
}

/// The role the admin API requires.
pub const ADMIN_ROLE: &str = "admin";

impl Identity {
    pub fn has_role(&self, role: &str) -> bool {
        self.roles.iter().any(|r| r == role)
    }
}

impl FromRequestParts<AppState> for Identity {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        // The public API's limits layer verified the token already (`api::limits`).
        if let Some(identity) = parts.extensions.remove::<Identity>() {
            return Ok(identity);
        }
        state.auth.authenticate_request(parts)
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    /// The user id.
    pub sub: String,
    /// The tenant id.
    pub tenant: String,
    pub iss: String,
    pub aud: String,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub roles: Vec<String>,
}

#[derive(Deserialize)]
struct IdentityClaims {
    sub: String,
    tenant: String,
    exp: u64,
    /// A number when present (a string is malformed, as for `exp` and `nbf`).
    #[serde(default)]
    iat: Option<u64>,
    #[serde(default)]
    roles: Vec<String>,
}

/// The one message of every 401: the same for a missing, malformed, expired, forged or
/// foreign token, and for a used or late ticket.
pub const UNAUTHORIZED: &str = "missing or invalid credentials: send a valid token (Authorization: Bearer, or the cookie) or a fresh ticket";

/// Refuses, logging why (without the token) for the operator.
pub(crate) fn refuse(reason: &str) -> ApiError {
    tracing::debug!(reason, "request refused: unauthorized");
    ApiError::Unauthorized(UNAUTHORIZED.into())
}

pub struct Auth {
    keys: ArcSwap<KeySet>,
    /// The key files as they were when `keys` was read (taken before reading them, so a
    /// change racing with the read is seen by the next check).
    files: std::sync::Mutex<keys::Fingerprint>,
    audience: String,
    leeway_secs: u64,
    max_lifetime_secs: u64,
    cookie_name: String,
    /// Signed-out users: (tenant, user) → the second before which their tokens are refused.
    revoked: ArcSwap<revoke::Revoked>,
    /// Bumped whenever credentials are withdrawn (a key left the set, a user was signed
    /// out): open streams then check theirs again.
    changes: tokio::sync::watch::Sender<u64>,
}

impl Auth {
    /// Reads every key the configuration names.
    pub fn new(config: &Config) -> Result<Self, KeyError> {
        let files = KeySet::fingerprint(config);
        let (keys, _) = KeySet::load(config, None)?;
        Ok(Self {
            keys: ArcSwap::from_pointee(keys),
            files: std::sync::Mutex::new(files),
            audience: config.auth.audience.clone(),
            leeway_secs: config.auth.leeway_secs,
            max_lifetime_secs: config.auth.max_token_lifetime_secs,
            cookie_name: config.auth.cookie_name.clone(),
            revoked: ArcSwap::default(),
            changes: tokio::sync::watch::channel(0).0,
        })
    }

    /// Changes whenever credentials may have been withdrawn: a stream that sees a change
    /// asks [`Auth::still_valid`].
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Is `identity` still good: its key in force and its user not signed out since its
    /// token was issued? `Err` says why not.
    pub fn still_valid(&self, identity: &Identity) -> Result<(), &'static str> {
        if !self.keys.load().has_stamp(&identity.key) {
            return Err("the key that verified the token was removed");
        }
        if self.is_revoked(&identity.tenant, &identity.user_id, identity.issued_at) {
            return Err("the user was signed out");
        }
        Ok(())
    }

    /// Tells open streams to check their credentials again.
    fn announce_change(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Re-reads the key files whenever they change, until `shutdown`. A set that fails to
    /// load leaves the previous one in force.
    pub async fn reload_keys(
        self: Arc<Self>,
        config: Arc<Config>,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        let every = std::time::Duration::from_millis(config.auth.jwks_reload_ms);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            let now = KeySet::fingerprint(&config);
            {
                let mut seen = self.files.lock().expect("auth lock poisoned");
                if *seen == now {
                    continue;
                }
                *seen = now;
            }
            match KeySet::load(&config, Some(&self.keys.load())) {
                Ok((set, kept)) => {
                    for e in kept {
                        tracing::error!(error = %e, "key file not reloaded; its previous keys stay in force");
                    }
                    tracing::info!(keys = set.len(), "verification keys reloaded");
                    let withdrawn = !self.keys.load().stamps().is_subset(&set.stamps());
                    self.keys.store(Arc::new(set));
                    if withdrawn {
                        tracing::info!(
                            "a verification key was removed or replaced: its streams end"
                        );
                        self.announce_change();
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "verification keys not reloaded; the previous keys stay in force")
                }
            }
        }
    }

    /// The identity of a request's token. A browser sends the cookie on any request to us,
    /// a forged cross-site form's too; so a request that changes something and carries only
    /// the cookie must be `Content-Type: application/json`, which no form can send and which
    /// makes a cross-site page ask first (CORS preflight, answered only for
    /// `http.cors_origins`).
    pub fn authenticate_request(&self, parts: &Parts) -> Result<Identity, ApiError> {
        if bearer(&parts.headers).is_none()
            && cookie(&parts.headers, &self.cookie_name).is_some()
            && !parts.method.is_safe()
            && !is_json(&parts.headers)
        {
            return Err(ApiError::Forbidden(
                "a request authenticated by the cookie that changes state must be sent with \
                 Content-Type: application/json (cross-site request forgery protection)"
                    .into(),
            ));
        }
        self.authenticate(&parts.headers)
    }

    /// The identity of the token in `headers`.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Identity, ApiError> {
        let token = bearer(headers)
            .or_else(|| cookie(headers, &self.cookie_name))
            .ok_or_else(|| refuse("no token"))?;
        self.verify(token)
    }

    /// The claims `token` carries if `key` signed it for its tenant; else why not.
    fn check(&self, token: &str, key: &keys::Key) -> Result<IdentityClaims, &'static str> {
        let mut validation = Validation::new(key.algorithm);
        validation.set_issuer(&[&key.issuer]);
        validation.set_audience(&[&self.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.validate_nbf = true;
        validation.leeway = self.leeway_secs;
        // Only the identity is deserialised: `exp`, `nbf`, `iss` and `aud` are checked by the
        // validation on the raw claims (so `aud` may be a string or a list, per RFC 7519).
        let claims = jsonwebtoken::decode::<IdentityClaims>(token, &key.key, &validation)
            .map_err(|e| describe(&e))?
            .claims;
        if !valid_tenant(&claims.tenant) {
            return Err("tenant claim is not a tenant id");
        }
        if key.tenant.as_deref().is_some_and(|t| t != claims.tenant) {
            return Err("a tenant's key signed another tenant's token");
        }
        self.check_lifetime(&claims)?;
        Ok(claims)
    }

    /// `iat` not in the future (beyond the leeway), and a lifetime within
    /// `auth.max_token_lifetime_secs`: `exp - iat`, or `exp - now` without `iat` (such a
    /// token is judged by what it has left).
    fn check_lifetime(&self, claims: &IdentityClaims) -> Result<(), &'static str> {
        let now = jsonwebtoken::get_current_timestamp();
        if claims.iat.is_some_and(|iat| iat > now + self.leeway_secs) {
            return Err("issued in the future (iat)");
        }
        let from = claims.iat.unwrap_or(now);
        if claims.exp.saturating_sub(from) > self.max_lifetime_secs + self.leeway_secs {
            return Err("lives longer than auth.max_token_lifetime_secs");
        }
        Ok(())
    }

    /// The identity a token proves.
    pub fn verify(&self, token: &str) -> Result<Identity, ApiError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| refuse("malformed header"))?;
        let keys = self.keys.load();
        let candidates = keys.select(header.kid.as_deref());
        if candidates.is_empty() {
            return Err(refuse("unknown kid"));
        }
        // Usually one key; several when sources share a kid (one identity provider serving
        // two tenants): the first that verifies the token for its own tenant decides.
        let mut reason = "algorithm not the key's";
        let mut verified = None;
        for key in candidates.iter().filter(|k| k.algorithm == header.alg) {
            match self.check(token, key) {
                Ok(claims) => {
                    verified = Some((key, claims));
                    break;
                }
                Err(why) => reason = why,
            }
        }
        let (key, claims) = verified.ok_or_else(|| refuse(reason))?;
        if claims.sub.is_empty() || claims.sub.len() > 200 {
            return Err(refuse("sub claim is not a user id"));
        }
        if claims.roles.len() > 32 || claims.roles.iter().any(|r| r.len() > 64) {
            return Err(refuse("roles claim too large"));
        }
        // Roles are the operator's to grant: a tenant's own identity provider (a key bound
        // to a tenant) speaks for its users, never for the engine's administrators.
        let roles = if key.tenant.is_some() {
            Vec::new()
        } else {
            claims.roles
        };
        let issued_at = claims
            .iat
            .unwrap_or(claims.exp.saturating_sub(self.max_lifetime_secs));
        if self.is_revoked(&claims.tenant, &claims.sub, issued_at) {
            return Err(refuse("the user was signed out after the token was issued"));
        }
        Ok(Identity {
            tenant: claims.tenant,
            user_id: claims.sub,
            roles,
            expires_at: claims.exp,
            issued_at,
            key: key.stamp.clone(),
        })
    }
}

/// Mints a token signed with `auth.jwt_secret`, without `kid` (the demo and tests;
/// production tokens come from an identity provider).
pub fn mint(config: &AuthConfig, tenant: &str, user_id: &str, ttl_secs: u64) -> String {
    mint_with_roles(config, tenant, user_id, &[], ttl_secs)
}

/// [`mint`] with a `roles` claim (e.g. [`ADMIN_ROLE`]).
pub fn mint_with_roles(
    config: &AuthConfig,
    tenant: &str,
    user_id: &str,
    roles: &[&str],
    ttl_secs: u64,
) -> String {
    let now = jsonwebtoken::get_current_timestamp();
    let claims = Claims {
        sub: user_id.into(),
        tenant: tenant.into(),
        iss: config.issuer.clone(),
        aud: config.audience.clone(),
        exp: now + ttl_secs,
        nbf: Some(now.saturating_sub(1)),
        iat: Some(now),
        roles: roles.iter().map(|r| (*r).to_owned()).collect(),
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(config.jwt_secret.as_bytes()),
    )
    .expect("HS256 encoding of plain claims cannot fail")
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"))
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// Which check failed, for the log.
fn describe(e: &jsonwebtoken::errors::Error) -> &'static str {
    use jsonwebtoken::errors::ErrorKind::*;
    match e.kind() {
        ExpiredSignature => "expired",
        ImmatureSignature => "not valid yet (nbf)",
        InvalidAudience => "wrong audience",
        InvalidIssuer => "wrong issuer",
        InvalidSignature => "bad signature",
        InvalidAlgorithm => "algorithm not allowed",
        MissingRequiredClaim(_) => "a required claim is missing (exp, iss, aud, sub)",
        InvalidClaimFormat(_) => "a claim is not of its type (a non-numeric exp or nbf)",
        _ => "malformed",
    }
}

#[cfg(test)]
mod tests;
