//! JWT authentication. Tenant and user come from the token's claims and nowhere else.
//!
//! The token travels in `Authorization: Bearer …` or in an HttpOnly cookie (browsers'
//! `EventSource` cannot set headers). Never in the URL: URLs end up in access logs.
//! The algorithm is pinned (HS256), and `exp`, `nbf`, `iss` and `aud` are checked.

use axum::http::HeaderMap;
use axum::http::header::{AUTHORIZATION, COOKIE};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use super::error::ApiError;
use crate::config::AuthConfig;
use crate::ingest::envelope::valid_tenant;

/// Who is asking: always a (tenant, user) pair, with the roles the token grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub tenant: String,
    pub user_id: String,
    /// The `roles` claim (e.g. `admin` for the admin API); empty when absent.
    pub roles: Vec<String>,
}

/// The role the admin API requires.
pub const ADMIN_ROLE: &str = "admin";

impl Identity {
    pub fn has_role(&self, role: &str) -> bool {
        self.roles.iter().any(|r| r == role)
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
    #[serde(default)]
    roles: Vec<String>,
}

pub struct Auth {
    key: DecodingKey,
    validation: Validation,
    cookie_name: String,
}

impl Auth {
    pub fn new(config: &AuthConfig) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_issuer(&[&config.issuer]);
        validation.set_audience(&[&config.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.validate_nbf = true;
        validation.leeway = config.leeway_secs;
        Self {
            key: DecodingKey::from_secret(config.jwt_secret.as_bytes()),
            validation,
            cookie_name: config.cookie_name.clone(),
        }
    }

    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Identity, ApiError> {
        let token = bearer(headers)
            .or_else(|| cookie(headers, &self.cookie_name))
            .ok_or_else(|| {
                ApiError::Unauthorized(format!(
                    "missing token: send Authorization: Bearer <jwt> or the {} cookie",
                    self.cookie_name
                ))
            })?;
        // Only the identity is deserialised: `exp`, `nbf`, `iss` and `aud` are checked by the
        // validation on the raw claims (so `aud` may be a string or a list, per RFC 7519).
        let data = jsonwebtoken::decode::<IdentityClaims>(token, &self.key, &self.validation)
            .map_err(|e| ApiError::Unauthorized(format!("invalid token: {}", describe(&e))))?;
        let claims = data.claims;
        if !valid_tenant(&claims.tenant) {
            return Err(ApiError::Unauthorized(
                "invalid token: tenant claim is not a valid tenant id".into(),
            ));
        }
        if claims.sub.is_empty() || claims.sub.len() > 200 {
            return Err(ApiError::Unauthorized(
                "invalid token: sub claim must be a user id".into(),
            ));
        }
        if claims.roles.len() > 32 || claims.roles.iter().any(|r| r.len() > 64) {
            return Err(ApiError::Unauthorized(
                "invalid token: roles claim is too large".into(),
            ));
        }
        Ok(Identity {
            tenant: claims.tenant,
            user_id: claims.sub,
            roles: claims.roles,
        })
    }
}

/// Mints a token (the demo and tests; production tokens come from the tenant's identity
/// provider, signed with the shared secret).
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

/// Says which check failed without echoing the token.
fn describe(e: &jsonwebtoken::errors::Error) -> &'static str {
    use jsonwebtoken::errors::ErrorKind::*;
    match e.kind() {
        ExpiredSignature => "expired",
        ImmatureSignature => "not valid yet (nbf)",
        InvalidAudience => "wrong audience",
        InvalidIssuer => "wrong issuer",
        InvalidSignature => "bad signature",
        InvalidAlgorithm => "algorithm not allowed (only HS256)",
        MissingRequiredClaim(_) => "a required claim is missing (exp, iss, aud, sub)",
        _ => "malformed",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn config() -> AuthConfig {
        AuthConfig {
            jwt_secret: "0123456789abcdef0123456789abcdef".into(),
            ..AuthConfig::default()
        }
    }

    fn headers(name: axum::http::HeaderName, value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(name, HeaderValue::from_str(value).unwrap());
        h
    }

    #[test]
    fn accepts_bearer_and_cookie() {
        let c = config();
        let auth = Auth::new(&c);
        let token = mint(&c, "acme", "u1", 60);
        let id = auth
            .authenticate(&headers(AUTHORIZATION, &format!("Bearer {token}")))
            .unwrap();
        assert_eq!(
            id,
            Identity {
                tenant: "acme".into(),
                user_id: "u1".into(),
                roles: Vec::new(),
            }
        );
        let admin = mint_with_roles(&c, "ops", "root", &[ADMIN_ROLE], 60);
        let id = auth
            .authenticate(&headers(AUTHORIZATION, &format!("Bearer {admin}")))
            .unwrap();
        assert!(id.has_role(ADMIN_ROLE));
        let id = auth
            .authenticate(&headers(COOKIE, &format!("a=b; notify_token={token}")))
            .unwrap();
        assert_eq!(id.user_id, "u1");
    }

    #[test]
    fn rejects_wrong_secret_audience_and_missing() {
        let c = config();
        let auth = Auth::new(&c);
        let mut other = config();
        other.jwt_secret = "another-secret-another-secret-!!".into();
        let forged = mint(&other, "acme", "u1", 60);
        let e = auth
            .authenticate(&headers(AUTHORIZATION, &format!("Bearer {forged}")))
            .unwrap_err();
        assert!(e.to_string().contains("bad signature"), "{e}");
        let mut aud = config();
        aud.audience = "elsewhere".into();
        let wrong = mint(&aud, "acme", "u1", 60);
        let e = auth
            .authenticate(&headers(AUTHORIZATION, &format!("Bearer {wrong}")))
            .unwrap_err();
        assert!(e.to_string().contains("audience"), "{e}");
        assert!(auth.authenticate(&HeaderMap::new()).is_err());
        let e = auth
            .authenticate(&headers(AUTHORIZATION, "Bearer not.a.jwt"))
            .unwrap_err();
        assert!(e.to_string().contains("malformed"), "{e}");
    }
}
