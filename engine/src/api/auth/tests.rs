//! `Auth`'s unit tests: tokens by header and cookie, a tenant's keys chosen by `kid` and
//! pinned to their algorithm, one message for every refusal, broken key files at start-up,
//! and JWKS files reloaded when they change.

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
        jsonwebtoken::encode(&header, &claims, &EncodingKey::from_rsa_pem(&pem).unwrap()).unwrap();
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
        serde_json::from_slice(&std::fs::read(fixtures().join("acme.jwks.json")).unwrap()).unwrap();
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
        serde_json::from_slice(&std::fs::read(fixtures().join("acme.jwks.json")).unwrap()).unwrap();
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

/// A token of the shared secret from exactly these claims.
fn with_claims(claims: serde_json::Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

#[test]
fn iat_and_the_lifetime_are_checked() {
    let mut c = config();
    c.auth.max_token_lifetime_secs = 3_600;
    let auth = Auth::new(&c).unwrap();
    let now = jsonwebtoken::get_current_timestamp();
    let base = |extra: serde_json::Value| {
        let mut claims = serde_json::json!({
            "sub": "u1", "tenant": "acme", "iss": "notify-engine", "aud": "notify-api",
        });
        for (k, v) in extra.as_object().unwrap() {
            claims[k] = v.clone();
        }
        with_claims(claims)
    };
    // Within the bound, with and without iat; iat within the leeway.
    for ok in [
        serde_json::json!({"exp": now + 3_600, "iat": now}),
        serde_json::json!({"exp": now + 600, "iat": now - 3_000}),
        serde_json::json!({"exp": now + 3_600}),
        serde_json::json!({"exp": now + 600, "iat": now + 3}),
    ] {
        assert!(auth.verify(&base(ok.clone())).is_ok(), "{ok}");
    }
    for (why, bad) in [
        (
            "a year 3000 exp",
            serde_json::json!({"exp": 32_503_680_000u64}),
        ),
        (
            "too long by iat",
            serde_json::json!({"exp": now + 600, "iat": now - 3_600}),
        ),
        (
            "too long without iat",
            serde_json::json!({"exp": now + 7_200}),
        ),
        (
            "iat in the future",
            serde_json::json!({"exp": now + 600, "iat": now + 60}),
        ),
        (
            "iat not a number",
            serde_json::json!({"exp": now + 600, "iat": "yesterday"}),
        ),
        // GHSA-h395-gr6q-cpjc: a non-numeric nbf once skipped the not-before check.
        (
            "nbf a string",
            serde_json::json!({"exp": now + 600, "nbf": (now + 300).to_string()}),
        ),
        (
            "nbf an object",
            serde_json::json!({"exp": now + 600, "nbf": {"at": now + 300}}),
        ),
    ] {
        assert!(auth.verify(&base(bad)).is_err(), "{why}");
    }
    // The identity knows when its token was issued: iat, or exp - the bound.
    let id = auth
        .verify(&base(serde_json::json!({"exp": now + 60, "iat": now - 5})))
        .unwrap();
    assert_eq!(id.issued_at, now - 5);
    let id = auth
        .verify(&base(serde_json::json!({"exp": now + 60})))
        .unwrap();
    assert_eq!(id.issued_at, now + 60 - 3_600);
}

#[tokio::test]
async fn a_sign_out_refuses_the_users_earlier_tokens_and_tells_the_streams() {
    let c = config();
    let auth = Auth::new(&c).unwrap();
    let mut changes = auth.changes();
    let now = jsonwebtoken::get_current_timestamp();
    let issued = |iat: u64| {
        with_claims(serde_json::json!({
            "sub": "u1", "tenant": "acme", "iss": "notify-engine", "aud": "notify-api",
            "exp": now + 600, "iat": iat,
        }))
    };
    let old = auth.verify(&issued(now - 10)).unwrap();
    let other = auth.verify(&mint(&c.auth, "acme", "u2", 60)).unwrap();
    auth.revoke_here("acme", "u1", now - 5);
    assert!(changes.has_changed().unwrap(), "streams are told");
    changes.borrow_and_update();
    assert!(auth.verify(&issued(now - 10)).is_err());
    assert!(
        auth.verify(&issued(now - 5)).is_err(),
        "the second of the sign-out too"
    );
    assert!(auth.verify(&issued(now - 4)).is_ok(), "signed in again");
    assert_eq!(auth.still_valid(&old), Err("the user was signed out"));
    assert_eq!(auth.still_valid(&other), Ok(()), "another user");
    // An earlier sign-out of the same user changes nothing.
    auth.revoke_here("acme", "u1", now - 100);
    assert!(auth.verify(&issued(now - 10)).is_err());
}

#[tokio::test]
async fn a_removed_key_ends_what_it_verified_and_only_that() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.json");
    let mut jwks: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixtures().join("acme.jwks.json")).unwrap()).unwrap();
    std::fs::write(&path, jwks.to_string()).unwrap();
    let mut c = Config::default();
    c.auth.jwt_secret = SECRET.into();
    c.auth.jwks_file = path.clone();
    c.auth.jwks_reload_ms = 50;
    let auth = Arc::new(Auth::new(&c).unwrap());
    let mut changes = auth.changes();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let reloader = tokio::spawn(
        auth.clone()
            .reload_keys(Arc::new(c.clone()), shutdown.clone()),
    );
    let rsa = signed(
        Algorithm::RS256,
        "acme-rsa",
        "acme-rsa.key",
        "acme",
        "notify-engine",
    );
    let ec = signed(
        Algorithm::ES256,
        "acme-ec",
        "acme-ec.key",
        "acme",
        "notify-engine",
    );
    let by_rsa = auth.verify(&rsa).unwrap();
    let by_ec = auth.verify(&ec).unwrap();
    let by_secret = auth.verify(&mint(&c.auth, "acme", "u1", 60)).unwrap();
    // Rotation: the RSA key leaves the file.
    jwks["keys"]
        .as_array_mut()
        .unwrap()
        .retain(|k| k["kid"] != "acme-rsa");
    std::fs::write(&path, jwks.to_string()).unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(5), changes.changed())
        .await
        .expect("streams are told")
        .unwrap();
    assert!(auth.still_valid(&by_rsa).is_err());
    assert_eq!(auth.still_valid(&by_ec), Ok(()));
    assert_eq!(auth.still_valid(&by_secret), Ok(()));
    assert!(auth.verify(&rsa).is_err());
    shutdown.cancel();
    reloader.await.unwrap();
}

#[test]
fn a_keys_stamp_does_not_depend_on_how_its_file_orders_the_members() {
    let jwks: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixtures().join("acme.jwks.json")).unwrap()).unwrap();
    // Written by hand: serde_json may sort members itself.
    let reversed = |key: &serde_json::Value| {
        let members: Vec<String> = key
            .as_object()
            .unwrap()
            .iter()
            .rev()
            .map(|(k, v)| format!("{}:{v}", serde_json::Value::from(k.as_str())))
            .collect();
        format!("{{{}}}", members.join(","))
    };
    let keys: Vec<String> = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(reversed)
        .collect();
    let reordered = format!("{{\"keys\":[{}]}}", keys.join(","));
    let stamps = |doc: &str| {
        keys::parse_jwks(doc, Some("acme"), None, "notify-engine")
            .unwrap()
            .into_iter()
            .map(|(kid, key)| (kid, key.stamp.clone()))
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    assert_ne!(jwks.to_string(), reordered);
    assert_eq!(stamps(&jwks.to_string()), stamps(&reordered));
    // Bound to another tenant, the same key is another key.
    let other = keys::parse_jwks(&jwks.to_string(), Some("globex"), None, "notify-engine").unwrap();
    assert_ne!(stamps(&jwks.to_string())["acme-rsa"], other[0].1.stamp);
}
