//! The verification keys: which key checks a token, for which algorithm, tenant and issuer.
//!
//! A token's `kid` header selects a key; a token without `kid` is checked by
//! `auth.jwt_secret`. Every key is pinned to one algorithm, so a token cannot choose how it
//! is verified (an HS256 token "signed" with an RSA public key names that key's `kid` and is
//! refused for its algorithm). A key bound to a tenant verifies that tenant's tokens only.
//!
//! Keys come from `auth.jwt_secret`, `auth.keys`, `auth.jwks_file` and each tenant's
//! `jwks_file`. The files are re-read when their content changes ([`KeySet::fingerprint`]:
//! a SHA-256 of each, since a file rewritten with the same length and modification time, by
//! a tool that keeps timestamps or on a file system with coarse ones, is a change too). At
//! start-up every file must load; on a reload, a JWKS file that no longer loads keeps its
//! previous keys while the other files' changes (a revoked key, say) take effect. Several sources may
//! publish the same `kid` (two tenants on one identity provider): a token is checked against
//! each key of its `kid` until one verifies it for its own tenant.
//!
//! Each key has a [`Key::stamp`], a digest of what it is (its `kid`, algorithm and
//! material), which the identities it verified carry: a stream keeps going only while its
//! key's stamp is in force, so removing a key (or replacing its material under the same
//! `kid`) ends the streams it opened.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use jsonwebtoken::jwk::{Jwk, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey};
use sha2::{Digest, Sha256};

use crate::config::{Config, JwtKeyConfig};
use crate::model::valid_tenant;

/// One key and what it may verify.
pub struct Key {
    pub algorithm: Algorithm,
    pub key: DecodingKey,
    /// `Some`: tokens it verifies must name this tenant.
    pub tenant: Option<String>,
    /// The `iss` its tokens must carry.
    pub issuer: String,
    /// A digest of the key's `kid`, algorithm and material: the same on every instance and
    /// across reloads while the key is unchanged.
    pub stamp: Arc<str>,
}

/// A JSON value written with its object members sorted, so the same key has the same stamp
/// on every instance however its file orders them. serde_json sorts them today, but a
/// dependency enabling its `preserve_order` feature would quietly change that; a ticket
/// bought on one instance and redeemed on another must not depend on it.
fn canonical(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::Object(members) => {
            let mut names: Vec<&String> = members.keys().collect();
            names.sort();
            let body: Vec<String> = names
                .into_iter()
                .map(|n| {
                    format!(
                        "{}:{}",
                        serde_json::Value::from(n.as_str()),
                        canonical(&members[n])
                    )
                })
                .collect();
            format!("{{{}}}", body.join(","))
        }
        serde_json::Value::Array(items) => {
            let body: Vec<String> = items.iter().map(canonical).collect();
            format!("[{}]", body.join(","))
        }
        other => other.to_string(),
    }
}

/// The stamp of a key: the first 16 bytes of SHA-256 over its parts, hex.
fn stamp(parts: &[&[u8]]) -> Arc<str> {
    use sha2::{Digest, Sha256};
    let mut hash = Sha256::new();
    for part in parts {
        // Length-prefixed, so the parts cannot slide into each other.
        hash.update((part.len() as u64).to_be_bytes());
        hash.update(part);
    }
    hash.finalize()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>()
        .into()
}

/// Every key in force.
#[derive(Default)]
pub struct KeySet {
    by_kid: HashMap<String, Vec<Arc<Key>>>,
    /// The key of tokens without a `kid` (`auth.jwt_secret`).
    default: Option<Arc<Key>>,
    /// Each JWKS file's keys, kept for a reload in which that file fails to load.
    jwks: HashMap<PathBuf, Vec<(String, Arc<Key>)>>,
}

#[derive(Debug, thiserror::Error)]
#[error("{source_name}: {reason}")]
pub struct KeyError {
    source_name: String,
    reason: String,
}

fn key_error(source_name: impl Into<String>, reason: impl std::fmt::Display) -> KeyError {
    KeyError {
        source_name: source_name.into(),
        reason: reason.to_string(),
    }
}

/// The SHA-256 of each key file's content (`None`: unreadable).
pub type Fingerprint = Vec<(PathBuf, Option<[u8; 32]>)>;

/// A JWKS file and what its keys are bound to.
struct JwksSource {
    path: PathBuf,
    tenant: Option<String>,
    issuer: Option<String>,
}

impl KeySet {
    /// The keys for a token's `kid` (or the `kid`-less key); empty: none.
    pub fn select(&self, kid: Option<&str>) -> &[Arc<Key>] {
        match kid {
            Some(kid) => self.by_kid.get(kid).map_or(&[], Vec::as_slice),
            None => self.default.as_slice(),
        }
    }

    pub fn len(&self) -> usize {
        self.by_kid.values().map(Vec::len).sum::<usize>() + usize::from(self.default.is_some())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Is a key with this stamp in the set?
    pub fn has_stamp(&self, stamp: &str) -> bool {
        self.default.iter().any(|k| &*k.stamp == stamp)
            || self.by_kid.values().flatten().any(|k| &*k.stamp == stamp)
    }

    /// Every stamp in the set, to tell whether a reload removed or replaced a key.
    pub fn stamps(&self) -> std::collections::BTreeSet<Arc<str>> {
        self.default
            .iter()
            .chain(self.by_kid.values().flatten())
            .map(|k| k.stamp.clone())
            .collect()
    }

    /// Builds the set from the configuration, reading every key file. With `previous` (a
    /// reload), a JWKS file that fails keeps the keys it had there, and its error is returned
    /// beside the set; without (start-up), any failure fails.
    pub fn load(
        config: &Config,
        previous: Option<&KeySet>,
    ) -> Result<(Self, Vec<KeyError>), KeyError> {
        let auth = &config.auth;
        let mut set = KeySet::default();
        let mut kept = Vec::new();
        if !auth.jwt_secret.is_empty() {
            set.default = Some(Arc::new(Key {
                algorithm: Algorithm::HS256,
                key: DecodingKey::from_secret(auth.jwt_secret.as_bytes()),
                tenant: None,
                issuer: auth.issuer.clone(),
                stamp: stamp(&[b"jwt_secret", auth.jwt_secret.as_bytes()]),
            }));
        }
        for k in &auth.keys {
            let name = format!("auth.keys {:?}", k.kid);
            let key = Arc::new(configured_key(k, &name, &auth.issuer)?);
            if set.by_kid.insert(k.kid.clone(), vec![key]).is_some() {
                return Err(key_error(&name, "kid defined twice in auth.keys"));
            }
        }
        for source in jwks_sources(config) {
            let keys = match (read_jwks(&source, &auth.issuer), previous) {
                (Ok(keys), _) => keys,
                (Err(e), None) => return Err(e),
                (Err(e), Some(previous)) => {
                    kept.push(e);
                    previous.jwks.get(&source.path).cloned().unwrap_or_default()
                }
            };
            for (kid, key) in &keys {
                set.by_kid.entry(kid.clone()).or_default().push(key.clone());
            }
            set.jwks.insert(source.path, keys);
        }
        Ok((set, kept))
    }

    /// What every key file holds, as a digest: any change of content is noticed, whatever
    /// the file's length and modification time say (key files are small; reading them at
    /// each check costs microseconds).
    pub fn fingerprint(config: &Config) -> Fingerprint {
        jwks_sources(config)
            .into_iter()
            .map(|s| s.path)
            .chain(
                config
                    .auth
                    .keys
                    .iter()
                    .filter_map(|k| k.public_key_file.clone()),
            )
            .map(|path| {
                let digest = std::fs::read(&path)
                    .ok()
                    .map(|bytes| Sha256::digest(&bytes).into());
                (path, digest)
            })
            .collect()
    }
}

/// One `[[auth.keys]]` entry's key, read from its environment variable or PEM file;
/// `name` names it in errors.
fn configured_key(k: &JwtKeyConfig, name: &str, issuer: &str) -> Result<Key, KeyError> {
    let algorithm = parse_algorithm(&k.algorithm).map_err(|e| key_error(name, e))?;
    let (key, material) = match (algorithm, &k.secret_env, &k.public_key_file) {
        (Algorithm::HS256, Some(var), None) => {
            let secret = std::env::var(var)
                .map_err(|_| key_error(name, format!("environment variable {var} is not set")))?;
            if secret.len() < 32 {
                return Err(key_error(
                    name,
                    format!("the secret in {var} is shorter than 32 bytes"),
                ));
            }
            (
                DecodingKey::from_secret(secret.as_bytes()),
                secret.into_bytes(),
            )
        }
        (Algorithm::RS256 | Algorithm::ES256, None, Some(path)) => {
            public_key(name, algorithm, path)?
        }
        _ => {
            return Err(key_error(
                name,
                "HS256 needs secret_env, RS256/ES256 need public_key_file",
            ));
        }
    };
    Ok(Key {
        algorithm,
        key,
        stamp: stamp(&[k.kid.as_bytes(), k.algorithm.as_bytes(), &material]),
        tenant: k.tenant.clone(),
        issuer: k.issuer.clone().unwrap_or_else(|| issuer.to_owned()),
    })
}

/// The RS256 or ES256 public key in the PEM file at `path`, with the file's bytes.
fn public_key(
    name: &str,
    algorithm: Algorithm,
    path: &Path,
) -> Result<(DecodingKey, Vec<u8>), KeyError> {
    let pem =
        std::fs::read(path).map_err(|e| key_error(name, format!("{}: {e}", path.display())))?;
    let key = if algorithm == Algorithm::RS256 {
        DecodingKey::from_rsa_pem(&pem)
    } else {
        DecodingKey::from_ec_pem(&pem)
    };
    let key = key.map_err(|e| {
        key_error(
            name,
            format!(
                "{} is not a {:?} public key: {e}",
                path.display(),
                algorithm
            ),
        )
    })?;
    Ok((key, pem))
}

/// A JWKS file's keys, bound as its source says; `issuer` is `auth.issuer`.
fn read_jwks(source: &JwksSource, issuer: &str) -> Result<Vec<(String, Arc<Key>)>, KeyError> {
    std::fs::read_to_string(&source.path)
        .map_err(|e| e.to_string())
        .and_then(|text| {
            parse_jwks(
                &text,
                source.tenant.as_deref(),
                source.issuer.as_deref(),
                issuer,
            )
        })
        .map_err(|e| key_error(source.path.display().to_string(), e))
}

fn jwks_sources(config: &Config) -> Vec<JwksSource> {
    let mut sources = Vec::new();
    if !config.auth.jwks_file.as_os_str().is_empty() {
        sources.push(JwksSource {
            path: config.auth.jwks_file.clone(),
            tenant: None,
            issuer: None,
        });
    }
    for (tenant, t) in &config.tenants {
        if let Some(path) = &t.jwks_file {
            sources.push(JwksSource {
                path: path.clone(),
                tenant: Some(tenant.clone()),
                issuer: t.jwt_issuer.clone(),
            });
        }
    }
    sources
}

fn parse_algorithm(name: &str) -> Result<Algorithm, String> {
    match name {
        "HS256" => Ok(Algorithm::HS256),
        "RS256" => Ok(Algorithm::RS256),
        "ES256" => Ok(Algorithm::ES256),
        other => Err(format!(
            "algorithm {other:?} is not one of HS256, RS256, ES256"
        )),
    }
}

/// The keys of a JWKS document. `bound_tenant` (a tenant's own file) binds every key to that
/// tenant; otherwise a key's `tenant` member may. Every key needs a `kid` unique in the file
/// and an `alg`.
pub(super) fn parse_jwks(
    text: &str,
    bound_tenant: Option<&str>,
    bound_issuer: Option<&str>,
    default_issuer: &str,
) -> Result<Vec<(String, Arc<Key>)>, String> {
    let doc: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let keys = doc
        .get("keys")
        .and_then(|k| k.as_array())
        .ok_or("not a JWKS document (no \"keys\" array)")?;
    let mut out = Vec::new();
    for (i, raw) in keys.iter().enumerate() {
        let jwk: Jwk =
            serde_json::from_value(raw.clone()).map_err(|e| format!("key {i}: not a JWK: {e}"))?;
        let kid = jwk
            .common
            .key_id
            .clone()
            .filter(|k| !k.is_empty())
            .ok_or_else(|| format!("key {i}: no kid"))?;
        let algorithm = match jwk.common.key_algorithm {
            Some(KeyAlgorithm::RS256) => Algorithm::RS256,
            Some(KeyAlgorithm::ES256) => Algorithm::ES256,
            Some(other) => return Err(format!("key {kid:?}: alg {other:?} is not RS256 or ES256")),
            None => return Err(format!("key {kid:?}: no alg (every key is pinned to one)")),
        };
        let key = DecodingKey::from_jwk(&jwk).map_err(|e| format!("key {kid:?}: {e}"))?;
        let member = |name: &str| raw.get(name).and_then(|v| v.as_str()).map(str::to_owned);
        let tenant = match (bound_tenant, member("tenant")) {
            (Some(bound), Some(own)) if own != bound => {
                return Err(format!(
                    "key {kid:?}: tenant {own:?} in the file of tenant {bound:?}"
                ));
            }
            (Some(bound), _) => Some(bound.to_owned()),
            (None, own) => own,
        };
        if let Some(t) = &tenant
            && !valid_tenant(t)
        {
            return Err(format!("key {kid:?}: tenant {t:?} is not a tenant id"));
        }
        let issuer = member("iss")
            .or_else(|| bound_issuer.map(str::to_owned))
            .unwrap_or_else(|| default_issuer.to_owned());
        if out.iter().any(|(k, _): &(String, Arc<Key>)| *k == kid) {
            return Err(format!("kid {kid:?} is defined twice"));
        }
        // The file's tenant too: a kid shared by two tenants' files is two keys, and removing
        // it from one file ends only that tenant's streams.
        let stamp = stamp(&[
            kid.as_bytes(),
            bound_tenant.unwrap_or_default().as_bytes(),
            canonical(raw).as_bytes(),
        ]);
        out.push((
            kid,
            Arc::new(Key {
                algorithm,
                key,
                stamp,
                tenant,
                issuer,
            }),
        ));
    }
    Ok(out)
}
