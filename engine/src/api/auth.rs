//! JWT authentication. Tenant and user come from the token's claims and nowhere else.
//!
//! The token travels in `Authorization: Bearer …` or in an HttpOnly cookie; a browser's
//! `EventSource`, which can set neither, trades it for a single-use ticket first
//! (`POST /api/v1/sse/tickets`, see [`super::tickets`]). Never a token in a URL: URLs end up
//! in access logs.
//!
//! The key is chosen by the token's `kid` and pins the algorithm (see [`keys`]); `exp`,
//! `nbf`, `iss` and `aud` are checked, and a tenant's key verifies only that tenant's tokens.
//! Every refusal answers the same 401 body: which check failed is logged, never told, so a
//! caller cannot probe the key set.

pub mod keys;

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
    cookie_name: String,
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
            cookie_name: config.auth.cookie_name.clone(),
        })
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
                    self.keys.store(Arc::new(set));
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
        Ok(claims)
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
        Ok(Identity {
            tenant: claims.tenant,
            user_id: claims.sub,
            roles,
            expires_at: claims.exp,
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
        _ => "malformed",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;
    use std::path::Path;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn fixtures() -> &'static Path {
        Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/keys"
        ))
    }

    /// The shared secret, and acme's identity provider's keys bound to acme.
    fn config() -> Config {
        let mut c = Config::default();
        c.auth.jwt_secret = SECRET.into();
        c.tenants.insert(
            "acme".into(),
            crate::config::TenantConfig {
                jwks_file: Some(fixtures().join("acme.jwks.json")),
                jwt_issuer: Some("https://login.acme.example".into()),
                ..Default::default()
            },
        );
        c
    }

    fn headers(name: axum::http::HeaderName, value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(name, HeaderValue::from_str(value).unwrap());
        h
    }

    fn signed(alg: Algorithm, kid: &str, file: &str, tenant: &str, iss: &str) -> String {
        let pem = std::fs::read(fixtures().join(file)).unwrap();
        let key = match alg {
            Algorithm::RS256 => EncodingKey::from_rsa_pem(&pem).unwrap(),
            _ => EncodingKey::from_ec_pem(&pem).unwrap(),
        };
        let mut header = Header::new(alg);
        header.kid = Some(kid.into());
        let now = jsonwebtoken::get_current_timestamp();
        let claims = serde_json::json!({
            "sub": "u1", "tenant": tenant, "iss": iss, "aud": "notify-api", "exp": now + 60,
        });
        jsonwebtoken::encode(&header, &claims, &key).unwrap()
    }

    #[test]
    fn accepts_bearer_and_cookie() {
        let c = config();
        let auth = Auth::new(&c).unwrap();
        let token = mint(&c.auth, "acme", "u1", 60);
        let id = auth
            .authenticate(&headers(AUTHORIZATION, &format!("Bearer {token}")))
            .unwrap();
        assert_eq!((id.tenant.as_str(), id.user_id.as_str()), ("acme", "u1"));
        assert!(id.roles.is_empty());
        assert!(id.expires_at > jsonwebtoken::get_current_timestamp());
        let admin = mint_with_roles(&c.auth, "ops", "root", &[ADMIN_ROLE], 60);
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
    fn a_tenants_keys_verify_its_tokens_by_kid_and_algorithm() {
        let auth = Auth::new(&config()).unwrap();
        let iss = "https://login.acme.example";
        for token in [
            signed(Algorithm::RS256, "acme-rsa", "acme-rsa.key", "acme", iss),
            signed(Algorithm::ES256, "acme-ec", "acme-ec.key", "acme", iss),
        ] {
            assert_eq!(auth.verify(&token).unwrap().tenant, "acme");
        }
        // A tenant's identity provider cannot grant the engine's roles.
        let pem = std::fs::read(fixtures().join("acme-rsa.key")).unwrap();
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some("acme-rsa".into());
        let claims = serde_json::json!({
            "sub": "u1", "tenant": "acme", "iss": iss, "aud": "notify-api",
            "exp": jsonwebtoken::get_current_timestamp() + 60, "roles": [ADMIN_ROLE],
        });
        let admin =
            jsonwebtoken::encode(&header, &claims, &EncodingKey::from_rsa_pem(&pem).unwrap())
                .unwrap();
        assert!(!auth.verify(&admin).unwrap().has_role(ADMIN_ROLE));
        // The same keys cannot speak for another tenant, nor with another issuer.
        assert!(
            auth.verify(&signed(
                Algorithm::RS256,
                "acme-rsa",
                "acme-rsa.key",
                "globex",
                iss
            ))
            .is_err()
        );
        assert!(
            auth.verify(&signed(
                Algorithm::ES256,
                "acme-ec",
                "acme-ec.key",
                "acme",
                "notify-engine"
            ))
            .is_err()
        );
        // A key signing under another key's kid, and an unknown kid.
        assert!(
            auth.verify(&signed(
                Algorithm::ES256,
                "acme-ec",
                "globex-ec.key",
                "acme",
                iss
            ))
            .is_err()
        );
        assert!(
            auth.verify(&signed(
                Algorithm::ES256,
                "nobody",
                "acme-ec.key",
                "acme",
                iss
            ))
            .is_err()
        );
    }

    #[test]
    fn every_refusal_has_the_same_message() {
        let c = config();
        let auth = Auth::new(&c).unwrap();
        let mut other = c.auth.clone();
        other.jwt_secret = "another-secret-another-secret-!!".into();
        let mut aud = c.auth.clone();
        aud.audience = "elsewhere".into();
        let cases = [
            headers(
                AUTHORIZATION,
                &format!("Bearer {}", mint(&other, "acme", "u1", 60)),
            ),
            headers(
                AUTHORIZATION,
                &format!("Bearer {}", mint(&aud, "acme", "u1", 60)),
            ),
            headers(AUTHORIZATION, "Bearer not.a.jwt"),
            headers(AUTHORIZATION, "Basic dXNlcjpwYXNz"),
            HeaderMap::new(),
        ];
        for h in cases {
            let e = auth.authenticate(&h).unwrap_err();
            assert!(
                matches!(&e, ApiError::Unauthorized(m) if m == UNAUTHORIZED),
                "{e}"
            );
        }
    }

    #[test]
    fn a_broken_key_file_is_a_clear_start_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.json");
        std::fs::write(
            &path,
            r#"{"keys":[{"kty":"EC","kid":"k","crv":"P-256","x":"AA","y":"AA"}]}"#,
        )
        .unwrap();
        let mut c = config();
        c.auth.jwks_file = path.clone();
        let e = Auth::new(&c).err().unwrap().to_string();
        assert!(e.contains("no alg"), "{e}");
        std::fs::write(&path, "[]").unwrap();
        let e = Auth::new(&c).err().unwrap().to_string();
        assert!(e.contains("JWKS"), "{e}");
        // The same kid twice in one file.
        let acme: serde_json::Value =
            serde_json::from_slice(&std::fs::read(fixtures().join("acme.jwks.json")).unwrap())
                .unwrap();
        let twice = serde_json::json!({ "keys": [acme["keys"][0], acme["keys"][0]] });
        std::fs::write(&path, twice.to_string()).unwrap();
        let e = Auth::new(&c).err().unwrap().to_string();
        assert!(e.contains("defined twice"), "{e}");
        // The same kids in two files (the operator's and acme's): a token is checked against
        // both, and the acme-bound copy still verifies only acme's tokens.
        std::fs::copy(fixtures().join("acme.jwks.json"), &path).unwrap();
        let auth = Auth::new(&c).unwrap();
        let iss = "https://login.acme.example";
        assert!(
            auth.verify(&signed(
                Algorithm::ES256,
                "acme-ec",
                "acme-ec.key",
                "acme",
                iss
            ))
            .is_ok()
        );
        assert!(
            auth.verify(&signed(
                Algorithm::ES256,
                "acme-ec",
                "acme-ec.key",
                "globex",
                "notify-engine"
            ))
            .is_ok(),
            "the operator's unbound copy speaks for anyone"
        );
    }

    #[tokio::test]
    async fn a_changed_jwks_file_is_reloaded_and_a_broken_one_keeps_the_old_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.json");
        let acme: serde_json::Value =
            serde_json::from_slice(&std::fs::read(fixtures().join("acme.jwks.json")).unwrap())
                .unwrap();
        let globex: serde_json::Value =
            serde_json::from_slice(&std::fs::read(fixtures().join("globex.jwks.json")).unwrap())
                .unwrap();
        std::fs::write(&path, acme.to_string()).unwrap();
        let mut c = Config::default();
        c.auth.jwks_file = path.clone();
        c.auth.jwks_reload_ms = 50;
        let auth = Arc::new(Auth::new(&c).unwrap());
        let shutdown = tokio_util::sync::CancellationToken::new();
        let reloader = tokio::spawn(auth.clone().reload_keys(Arc::new(c), shutdown.clone()));
        let globex_token = signed(
            Algorithm::ES256,
            "globex-ec",
            "globex-ec.key",
            "globex",
            "notify-engine",
        );
        let acme_token = signed(
            Algorithm::ES256,
            "acme-ec",
            "acme-ec.key",
            "acme",
            "notify-engine",
        );
        assert!(auth.verify(&globex_token).is_err());
        assert!(auth.verify(&acme_token).is_ok());

        // Rotation: globex's keys replace acme's (a new length, so the change is seen even
        // within the file system's timestamp granularity).
        std::fs::write(&path, format!("{globex}\n\n")).unwrap();
        let eventually = async |token: &str, ok: bool| {
            for _ in 0..100 {
                if auth.verify(token).is_ok() == ok {
                    return;
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            panic!("the key set did not change");
        };
        eventually(&globex_token, true).await;
        assert!(auth.verify(&acme_token).is_err(), "the old keys are gone");
        // A broken file leaves the keys in force.
        std::fs::write(&path, "{ not json").unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        assert!(auth.verify(&globex_token).is_ok());
        shutdown.cancel();
        reloader.await.unwrap();
    }
}
