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
