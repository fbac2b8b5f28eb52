//! Who may act for whom, on the real services: JWTs (the shared secret, a tenant's keys by
//! kid) and the same 401 for every forged, foreign or too long-lived token, single-use stream
//! tickets, a token expiring on an open stream, a removed key and a signed-out user ending
//! their streams, and on the Kafka side the gateway header that alone speaks for a tenant.

use std::path::Path;
use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

use crate::support::*;

const ACME_ISSUER: &str = "https://login.acme.example";

fn keys_dir() -> &'static Path {
    Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/keys"
    ))
}

/// A token from exactly these claims and header, signed with `key`.
fn token(header: Header, claims: &Value, key: &EncodingKey) -> String {
    jsonwebtoken::encode(&header, claims, key).unwrap()
}

fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

/// Claims the test engine accepts for (tenant, user) with the shared secret.
fn claims(tenant: &str, user: &str) -> Value {
    json!({
        "sub": user, "tenant": tenant, "iss": "notify-engine", "aud": "notify-api",
        "exp": now() + 600, "nbf": now() - 1,
    })
}

fn pem(file: &str) -> Vec<u8> {
    std::fs::read(keys_dir().join(file)).unwrap()
}

fn kid(alg: Algorithm, kid: &str) -> Header {
    let mut h = Header::new(alg);
    h.kid = Some(kid.into());
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_tickets_are_single_use_and_short_lived() {
    let world = World::new().await;
    let mut config = world.config();
    config.auth.ticket_ttl_secs = 2;
    let engine = world.start(config).await;
    let tenant = unique("shop");
    let api = Api::new(&engine, &world.token(&tenant, "u1"));

    let (status, ticket) = api.post("/api/v1/sse/tickets", None).await;
    assert_eq!(status, 201, "{ticket}");
    assert_eq!(ticket["expires_in"], 2);
    let t = ticket["ticket"].as_str().unwrap().to_owned();
    assert_eq!(ticket["url"], format!("/api/v1/sse?ticket={t}"));
    let (status, stream, _) = connect_sse_query(&engine, &format!("ticket={t}")).await;
    assert_eq!(status, 200);
    let mut stream = stream.unwrap();
    world
        .produce(&order_paid("t1", &tenant, "u1", None, 1.0))
        .await;
    assert_eq!(stream.next(WAIT).await.unwrap().data["event_id"], "t1");

    // Used once: refused the second time, with the body every refusal has.
    let (status, _, body) = connect_sse_query(&engine, &format!("ticket={t}")).await;
    assert_eq!(status, 401);
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"]["code"], "unauthorized");
    assert_eq!(
        body["error"]["message"],
        notify_engine::api::auth::UNAUTHORIZED
    );

    // A ticket with the id to resume from (a new EventSource cannot set the header).
    let (_, fresh) = api.post("/api/v1/sse/tickets", None).await;
    world
        .produce(&order_paid("t2", &tenant, "u1", None, 1.0))
        .await;
    assert_eq!(stream.next(WAIT).await.unwrap().data["event_id"], "t2");
    let (status, resumed, _) = connect_sse_query(
        &engine,
        &format!(
            "ticket={}&last_event_id=1",
            fresh["ticket"].as_str().unwrap()
        ),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        resumed.unwrap().next(WAIT).await.unwrap().data["event_id"],
        "t2"
    );

    // Late: worthless after its lifetime even though never used.
    let (_, late) = api.post("/api/v1/sse/tickets", None).await;
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let (status, _, _) = connect_sse_query(
        &engine,
        &format!("ticket={}", late["ticket"].as_str().unwrap()),
    )
    .await;
    assert_eq!(status, 401, "a late ticket");
    // Made-up and malformed tickets.
    for forged in [
        "ticket=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "ticket=",
        "ticket=%00",
    ] {
        let (status, _, _) = connect_sse_query(&engine, forged).await;
        assert_eq!(status, 401, "{forged}");
    }
    // Only the SHA-256 is stored; used and late tickets are gone once retention runs.
    let pool = world.pool().await;
    let (stored,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM sse_tickets WHERE ticket_sha256 = sha256(convert_to($1, 'UTF8'))",
    )
    .bind(&t)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(stored, 0, "a used ticket is deleted");
    engine.shutdown().await;
}

/// The keys the forged-token test signs with: the shared secret, acme's RSA and EC keys.
struct Keys {
    secret: EncodingKey,
    acme_rsa: EncodingKey,
    acme_ec: EncodingKey,
}

/// Claims from acme's own issuer for u1, with `extra` laid over them.
fn acme_claims(extra: Value) -> Value {
    let mut c = claims("acme", "u1");
    c["iss"] = json!(ACME_ISSUER);
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    c
}

/// The controls: the shared secret, and acme's own RS256 and ES256 keys.
fn valid_tokens(keys: &Keys) -> [String; 3] {
    let Keys {
        secret,
        acme_rsa,
        acme_ec,
    } = keys;
    [
        token(Header::new(Algorithm::HS256), &claims("acme", "u1"), secret),
        token(
            kid(Algorithm::RS256, "acme-rsa"),
            &acme_claims(json!({})),
            acme_rsa,
        ),
        token(
            kid(Algorithm::ES256, "acme-ec"),
            &acme_claims(json!({})),
            acme_ec,
        ),
    ]
}

/// Every forged or foreign token the API must refuse, each with why: a table, one entry per
/// attack (declarative, hence its length). `good` is a valid acme RS256 token to tamper with.
fn forged_tokens(good: &str, keys: &Keys) -> Vec<(&'static str, String)> {
    let Keys {
        secret,
        acme_rsa,
        acme_ec,
    } = keys;
    let (head, rest) = good.split_once('.').unwrap();
    let (payload, signature) = rest.split_once('.').unwrap();
    let b64 = |v: &Value| {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let mut tampered_sig = signature.to_owned();
    tampered_sig.replace_range(
        0..2,
        if signature.starts_with("AA") {
            "BB"
        } else {
            "AA"
        },
    );
    let rsa_public_as_secret = EncodingKey::from_secret(&pem("acme-rsa.pub.pem"));
    let mut no_tenant = claims("acme", "u1");
    no_tenant.as_object_mut().unwrap().remove("tenant");
    vec![
        (
            "alg none",
            format!(
                "{}.{}.",
                b64(&json!({"alg": "none", "typ": "JWT"})),
                b64(&claims("acme", "u1"))
            ),
        ),
        (
            "alg none with kid",
            format!(
                "{}.{}.",
                b64(&json!({"alg": "none", "kid": "acme-rsa"})),
                payload
            ),
        ),
        (
            "HS256 signed with the RSA public key",
            token(
                kid(Algorithm::HS256, "acme-rsa"),
                &acme_claims(json!({})),
                &rsa_public_as_secret,
            ),
        ),
        (
            "wrong aud",
            token(
                Header::new(Algorithm::HS256),
                &json!({"sub": "u1", "tenant": "acme", "iss": "notify-engine", "aud": "elsewhere", "exp": now() + 600}),
                secret,
            ),
        ),
        (
            "wrong iss",
            token(
                kid(Algorithm::RS256, "acme-rsa"),
                &acme_claims(json!({"iss": "notify-engine"})),
                acme_rsa,
            ),
        ),
        (
            "expired",
            token(
                Header::new(Algorithm::HS256),
                &json!({"sub": "u1", "tenant": "acme", "iss": "notify-engine", "aud": "notify-api", "exp": now() - 5}),
                secret,
            ),
        ),
        (
            "future nbf",
            token(
                kid(Algorithm::ES256, "acme-ec"),
                &acme_claims(json!({"nbf": now() + 300})),
                acme_ec,
            ),
        ),
        (
            "missing tenant claim",
            token(Header::new(Algorithm::HS256), &no_tenant, secret),
        ),
        (
            "tampered signature",
            format!("{head}.{payload}.{tampered_sig}"),
        ),
        (
            "tampered payload",
            format!(
                "{head}.{}.{signature}",
                b64(&acme_claims(json!({"sub": "admin"})))
            ),
        ),
        (
            "unknown kid",
            token(
                kid(Algorithm::RS256, "acme-2019"),
                &acme_claims(json!({})),
                acme_rsa,
            ),
        ),
        (
            "acme's key signing a globex token",
            token(
                kid(Algorithm::RS256, "acme-rsa"),
                &acme_claims(json!({"tenant": "globex"})),
                acme_rsa,
            ),
        ),
        (
            "globex's kid, acme's key",
            token(
                kid(Algorithm::ES256, "globex-ec"),
                &acme_claims(json!({"tenant": "globex"})),
                acme_ec,
            ),
        ),
        (
            // GHSA-h395-gr6q-cpjc: jsonwebtoken before 10.3 skipped a non-numeric nbf.
            "non-numeric nbf",
            token(
                kid(Algorithm::ES256, "acme-ec"),
                &acme_claims(json!({"nbf": (now() + 300).to_string()})),
                acme_ec,
            ),
        ),
        (
            "exp in the year 3000",
            token(
                Header::new(Algorithm::HS256),
                &json!({"sub": "u1", "tenant": "acme", "iss": "notify-engine", "aud": "notify-api", "exp": 32_503_680_000u64}),
                secret,
            ),
        ),
        (
            "a lifetime over auth.max_token_lifetime_secs",
            token(
                kid(Algorithm::RS256, "acme-rsa"),
                &acme_claims(json!({"iat": now() - 10, "exp": now() + 86_400})),
                acme_rsa,
            ),
        ),
        (
            "iat in the future",
            token(
                Header::new(Algorithm::HS256),
                &json!({"sub": "u1", "tenant": "acme", "iss": "notify-engine", "aud": "notify-api", "exp": now() + 600, "iat": now() + 120}),
                secret,
            ),
        ),
        ("not a JWT", "not-a-jwt".into()),
        ("empty", String::new()),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_forged_or_foreign_token_gets_the_same_401_on_every_route() {
    let world = World::new().await;
    let mut config = world.config();
    config.auth.leeway_secs = 0;
    // Every forged token on every route, from one address: past the address's request
    // bucket they would be 429, not the 401 this test is about (the buckets: inbox.rs).
    config.limits.address_burst = 10_000;
    config.tenants.insert(
        "acme".into(),
        notify_engine::config::TenantConfig {
            jwks_file: Some(keys_dir().join("acme.jwks.json")),
            jwt_issuer: Some(ACME_ISSUER.into()),
            ..Default::default()
        },
    );
    config.tenants.insert(
        "globex".into(),
        notify_engine::config::TenantConfig {
            jwks_file: Some(keys_dir().join("globex.jwks.json")),
            ..Default::default()
        },
    );
    let engine = world.start(config).await;
    let keys = Keys {
        secret: EncodingKey::from_secret(SECRET.as_bytes()),
        acme_rsa: EncodingKey::from_rsa_pem(&pem("acme-rsa.key")).unwrap(),
        acme_ec: EncodingKey::from_ec_pem(&pem("acme-ec.key")).unwrap(),
    };
    let valid = valid_tokens(&keys);
    let forged = forged_tokens(&valid[1], &keys);
    let routes = [
        ("GET", "/api/v1/sse"),
        ("POST", "/api/v1/sse/tickets"),
        ("GET", "/api/v1/notifications"),
        ("GET", "/api/v1/notifications/unread-count"),
        ("POST", "/api/v1/notifications/1/read"),
        ("POST", "/api/v1/notifications/read-all"),
    ];
    let expected = json!({"error": {"code": "unauthorized", "message": notify_engine::api::auth::UNAUTHORIZED}});
    let client = reqwest::Client::new();
    for (method, path) in routes {
        let url = format!("http://{}{path}", engine.http_addr);
        let send = |token: Option<&str>| {
            let mut r = client
                .request(
                    reqwest::Method::from_bytes(method.as_bytes()).unwrap(),
                    &url,
                )
                // What each route takes: a body with fields where it takes one, else `{}`.
                .json(&if path.ends_with("/read-all") {
                    json!({ "up_to": 1 })
                } else {
                    json!({})
                });
            if let Some(t) = token {
                r = r.bearer_auth(t);
            }
            r.send()
        };
        for token in &valid {
            let response = send(Some(token)).await.unwrap();
            let status = response.status().as_u16();
            assert!(
                matches!(status, 200 | 201 | 404),
                "{method} {path} with a valid token: {status}"
            );
        }
        let mut cases: Vec<(&str, Option<&str>)> = forged
            .iter()
            .map(|(why, t)| (*why, Some(t.as_str())))
            .collect();
        cases.push(("no token", None));
        for (why, token) in cases {
            let response = send(token).await.unwrap();
            assert_eq!(response.status().as_u16(), 401, "{method} {path}: {why}");
            assert_eq!(response.headers()["www-authenticate"], "Bearer");
            let body: Value = response.json().await.unwrap();
            assert_eq!(body, expected, "{method} {path}: {why}");
        }
    }
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_expiring_mid_stream_ends_it_with_auth_expired() {
    let world = World::new().await;
    let engine = world.start(world.config()).await;
    let contracts = Contracts::load();
    let tenant = unique("shop");
    let mut short = claims(&tenant, "u1");
    short["exp"] = json!(now() + 3);
    let short = token(
        Header::new(Algorithm::HS256),
        &short,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    );
    let (status, stream, _) = connect_sse(&engine, Some(&short), None).await;
    assert_eq!(status, 200);
    let mut stream = stream.unwrap();
    world
        .produce(&order_paid("x1", &tenant, "u1", None, 1.0))
        .await;
    assert_eq!(stream.next(WAIT).await.unwrap().id.as_deref(), Some("1"));
    assert!(
        stream.ends_within(Duration::from_secs(10)).await,
        "the stream ends at exp"
    );
    let last = stream
        .next(Duration::from_millis(100))
        .await
        .expect("auth.expired first");
    assert_eq!(last.event, "auth.expired");
    // Its id is the cursor: reconnecting with it misses nothing and repeats nothing.
    assert_eq!(last.id.as_deref(), Some("1"));
    contracts.check_sse(&last);
    // A ticket lives no longer than the token that bought it, and its stream ends with
    // that token.
    let api = Api::new(&engine, &world.token(&tenant, "u1"));
    let (_, ticket) = api.post("/api/v1/sse/tickets", None).await;
    assert_eq!(
        ticket["expires_in"], 30,
        "a long-lived token gets the full ticket lifetime"
    );
    let mut brief = claims(&tenant, "u1");
    brief["exp"] = json!(now() + 4);
    let brief = token(
        Header::new(Algorithm::HS256),
        &brief,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    );
    let (_, ticket) = Api::new(&engine, &brief)
        .post("/api/v1/sse/tickets", None)
        .await;
    assert!(ticket["expires_in"].as_u64().unwrap() <= 4, "{ticket}");
    let (status, stream, _) = connect_sse_query(
        &engine,
        &format!("ticket={}", ticket["ticket"].as_str().unwrap()),
    )
    .await;
    assert_eq!(status, 200);
    let mut stream = stream.unwrap();
    assert!(
        stream.ends_within(Duration::from_secs(10)).await,
        "the ticket's stream ends at the token's exp"
    );
    assert_eq!(
        stream.next(Duration::from_millis(100)).await.unwrap().event,
        "auth.expired"
    );
    engine.shutdown().await;
}

/// Who may speak for a tenant, with `kafka.tenant_from = "header"`: a producer that names
/// another tenant than its gateway header is refused and claims nothing (the victim's real
/// event then goes through: no "duplicate"), as are a message without the header and a
/// tenant outside the allow-list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_gateway_header_speaks_for_a_tenant() {
    let world = World::new().await;
    let victim = unique("victim");
    let attacker = unique("attacker");
    let stranger = unique("stranger");
    let mut config = world.config();
    config.kafka.tenant_from = notify_engine::config::TenantFrom::Header;
    config.kafka.tenant_header = "x-tenant".into();
    config.kafka.allowed_tenants = vec![victim.clone(), attacker.clone()];
    let engine = world.start(config).await;
    let (_, sse, _) = connect_sse(&engine, Some(&world.token(&victim, "u1")), None).await;
    let mut sse = sse.unwrap();

    let payload = |id: &str, tenant: &str| order_paid(id, tenant, "u1", None, 1.0).to_string();
    let topic = world.topic_paid.clone();
    // The attacker's producer writes the victim's tenant and event id first.
    world
        .produce_with_headers(
            &topic,
            None,
            payload("v1", &victim).as_bytes(),
            &[("x-tenant", &attacker)],
        )
        .await;
    world
        .produce_with_headers(&topic, None, payload("v0", &victim).as_bytes(), &[])
        .await;
    world
        .produce_with_headers(
            &topic,
            None,
            payload("s1", &stranger).as_bytes(),
            &[("x-tenant", &stranger)],
        )
        .await;
    world
        .wait_count(
            "SELECT count(*) FROM dead_letters WHERE error_kind = 'validation'",
            3,
            WAIT,
        )
        .await;
    let pool = world.pool().await;
    let reasons: Vec<(String, String)> =
        sqlx::query_as("SELECT event_id, reason FROM dead_letters ORDER BY event_id")
            .fetch_all(&pool)
            .await
            .unwrap();
    // By event id: s1 (stranger), v0 (no header), v1 (the attacker's).
    assert!(reasons[0].1.contains("allowed_tenants"), "{reasons:?}");
    assert!(reasons[1].1.contains("header"), "{reasons:?}");
    assert!(reasons[2].1.contains("may only speak for"), "{reasons:?}");
    assert_eq!(
        world.count("SELECT count(*) FROM processed_events").await,
        0
    );

    // The victim's real event, through the gateway: delivered, not dropped as a duplicate.
    world
        .produce_with_headers(
            &topic,
            None,
            payload("v1", &victim).as_bytes(),
            &[("x-tenant", &victim)],
        )
        .await;
    let frame = sse.next(WAIT).await.expect("the victim's real event");
    assert_eq!(frame.data["event_id"], "v1");
    engine.shutdown().await;
}

/// Guessing stream tickets is held to the address's request rate before any database work:
/// past the burst, a guess is refused with `429` and `Retry-After` and never reaches the
/// ticket's `DELETE` (counted here by a statement trigger, which fires even when the
/// statement deletes nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ticket_guesses_are_refused_by_their_address_before_the_delete() {
    let world = World::new().await;
    let mut config = world.config();
    config.limits.address_per_second = 1;
    config.limits.address_burst = 5;
    let engine = world.start(config).await;
    let pool = world.pool().await;
    // Statements the API role runs against sse_tickets (retention's, as the engine's own
    // role, are not counted).
    for sql in [
        "CREATE TABLE ticket_deletes (who TEXT NOT NULL)",
        "GRANT INSERT ON ticket_deletes TO PUBLIC",
        "CREATE FUNCTION count_ticket_delete() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN INSERT INTO ticket_deletes VALUES (current_user); RETURN NULL; END $$",
        "CREATE TRIGGER count_ticket_deletes BEFORE DELETE ON sse_tickets
         FOR EACH STATEMENT EXECUTE FUNCTION count_ticket_delete()",
    ] {
        sqlx::query(sql).execute(&pool).await.unwrap();
    }
    let mut answered = Vec::new();
    let mut refused = None;
    for i in 0..20 {
        let guess = format!("ticket={:A>43}", i);
        let response = reqwest::Client::new()
            .get(format!("http://{}/api/v1/sse?{guess}", engine.http_addr))
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        if status == 429 && refused.is_none() {
            let after = retry_after(response.headers());
            let body: Value = response.json().await.unwrap();
            refused = Some((after, body));
        }
        answered.push(status);
    }
    let (after, body) = refused.unwrap_or_else(|| panic!("no guess refused: {answered:?}"));
    assert!((1..=2).contains(&after), "{after}");
    assert_eq!(body["error"]["code"], "too_many_requests", "{body}");
    let unauthorized = answered.iter().filter(|s| **s == 401).count();
    // The burst, and perhaps a token that came back while the guesses were sent.
    assert!((5..=7).contains(&unauthorized), "{answered:?}");
    assert_eq!(
        unauthorized + answered.iter().filter(|s| **s == 429).count(),
        20
    );
    let deletes = world
        .count("SELECT count(*) FROM ticket_deletes WHERE who LIKE 'notify_api_%'")
        .await;
    assert_eq!(
        deletes as usize, unauthorized,
        "only the admitted guesses reached the DELETE"
    );
    assert_eq!(
        metric(&engine, "notify_api_rate_limited_total{limit=\"address\"}").await,
        Some((20 - unauthorized) as f64)
    );
    // Another address has a bucket of its own, on a stream's path and on the inbox's.
    let elsewhere = reqwest::Client::builder()
        .local_address("127.0.0.2".parse::<std::net::IpAddr>().unwrap())
        .build()
        .unwrap();
    for path in ["/api/v1/sse?ticket=elsewhere", "/api/v1/notifications"] {
        let response = elsewhere
            .get(format!("http://{}{path}", engine.http_addr))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 401, "{path} from another address");
    }
    engine.shutdown().await;
}

/// The last frame of a stream whose credentials were withdrawn: `auth.expired`, as the
/// contract has it, carrying the cursor.
async fn ends_withdrawn(stream: &mut SseClient, contracts: &Contracts, why: &str) {
    assert!(
        stream.ends_within(Duration::from_secs(10)).await,
        "{why}: the stream ends"
    );
    let last = stream
        .next(Duration::from_millis(100))
        .await
        .unwrap_or_else(|| panic!("{why}: auth.expired first"));
    assert_eq!(last.event, "auth.expired", "{why}");
    assert!(
        last.data["message"].as_str().unwrap().contains("withdrawn"),
        "{why}: {last:?}"
    );
    contracts.check_sse(&last);
}

/// A key removed from the key set (a rotation) ends the streams its tokens opened and no
/// other; an operator signing a user out ends that user's streams, bought tickets included,
/// on every instance, and refuses the tokens issued before, while a token issued after is
/// good again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_key_or_a_signed_out_user_ends_their_streams() {
    let world = World::new().await;
    let contracts = Contracts::load();
    let tenant = unique("shop");
    let dir = tempfile::tempdir().unwrap();
    let jwks_path = dir.path().join("keys.json");
    let mut jwks: Value =
        serde_json::from_slice(&std::fs::read(keys_dir().join("acme.jwks.json")).unwrap()).unwrap();
    // Unbound here: the keys may speak for this test's tenant.
    for key in jwks["keys"].as_array_mut().unwrap() {
        key.as_object_mut().unwrap().remove("tenant");
    }
    std::fs::write(&jwks_path, jwks.to_string()).unwrap();
    let mut config = world.config();
    config.auth.jwks_file = jwks_path.clone();
    config.auth.jwks_reload_ms = 100;
    let engine = world.start(config.clone()).await;
    let other = world.start_idle(config.clone()).await;
    let signed = |alg: Algorithm, key_id: &str, file: &str, user: &str| {
        let key = match alg {
            Algorithm::RS256 => EncodingKey::from_rsa_pem(&pem(file)).unwrap(),
            _ => EncodingKey::from_ec_pem(&pem(file)).unwrap(),
        };
        token(kid(alg, key_id), &claims(&tenant, user), &key)
    };

    // Rotation: acme-rsa leaves the key set; acme-ec and the secret stay.
    let rsa = signed(Algorithm::RS256, "acme-rsa", "acme-rsa.key", "u1");
    let ec = signed(Algorithm::ES256, "acme-ec", "acme-ec.key", "u1");
    let (status, by_rsa, body) = connect_sse(&engine, Some(&rsa), None).await;
    assert_eq!(status, 200, "{body}");
    let mut by_rsa = by_rsa.unwrap();
    let mut by_ec = connect_sse(&engine, Some(&ec), None).await.1.unwrap();
    jwks["keys"]
        .as_array_mut()
        .unwrap()
        .retain(|k| k["kid"] != "acme-rsa");
    std::fs::write(&jwks_path, jwks.to_string()).unwrap();
    ends_withdrawn(&mut by_rsa, &contracts, "the removed key's stream").await;
    assert_eq!(
        Api::new(&engine, &rsa).get("/api/v1/notifications").await.0,
        401
    );
    world
        .produce(&order_paid("k1", &tenant, "u1", None, 1.0))
        .await;
    assert_eq!(
        by_ec.next(WAIT).await.unwrap().data["event_id"],
        "k1",
        "another key's stream goes on"
    );

    // Sign-out of u2: a stream by token and one by ticket here, one on the other instance.
    let old = world.token(&tenant, "u2");
    let mut direct = connect_sse(&engine, Some(&old), None).await.1.unwrap();
    let (status, ticket) = Api::new(&engine, &old)
        .post("/api/v1/sse/tickets", None)
        .await;
    assert_eq!(status, 201, "{ticket}");
    let (status, by_ticket, _) = connect_sse_query(
        &engine,
        &format!("ticket={}", ticket["ticket"].as_str().unwrap()),
    )
    .await;
    assert_eq!(status, 200);
    let mut by_ticket = by_ticket.unwrap();
    let mut elsewhere = connect_sse(&other, Some(&old), None).await.1.unwrap();
    let (_, unused) = Api::new(&engine, &old)
        .post("/api/v1/sse/tickets", None)
        .await;
    let mut bystander = connect_sse(&engine, Some(&world.token(&tenant, "u3")), None)
        .await
        .1
        .unwrap();

    let client = reqwest::Client::new();
    let revoke = |addr: std::net::SocketAddr, token: String| {
        client
            .post(format!("http://{addr}/api/v1/admin/revocations"))
            .bearer_auth(token)
            .json(&json!({"tenant": tenant, "user": "u2"}))
            .send()
    };
    let admin = notify_engine::api::auth::mint_with_roles(
        &config.auth,
        "ops",
        "root",
        &[notify_engine::api::auth::ADMIN_ROLE],
        600,
    );
    // Only an operator, only on the admin listener.
    let refused = revoke(engine.admin_addr, world.token(&tenant, "u3"))
        .await
        .unwrap();
    assert_eq!(refused.status().as_u16(), 403);
    let public = revoke(engine.http_addr, admin.clone()).await.unwrap();
    assert_eq!(public.status().as_u16(), 404);
    for bad in [
        json!({"tenant": "no such tenant!", "user": "u2"}),
        json!({"tenant": tenant, "user": ""}),
        json!({"tenant": tenant, "user": "u2", "until": 1}),
        json!({"tenant": tenant, "user": "u2", "not_before": now() + 2 * 86_400}),
    ] {
        let response = client
            .post(format!(
                "http://{}/api/v1/admin/revocations",
                engine.admin_addr
            ))
            .bearer_auth(&admin)
            .json(&bad)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 400, "{bad}");
    }
    let response = revoke(engine.admin_addr, admin.clone()).await.unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["user"], "u2");
    let not_before = answer["not_before"].as_u64().unwrap();
    assert!(not_before + 5 >= now(), "{answer}");

    ends_withdrawn(&mut direct, &contracts, "the signed-out user's stream").await;
    ends_withdrawn(
        &mut by_ticket,
        &contracts,
        "the signed-out user's ticket stream",
    )
    .await;
    ends_withdrawn(&mut elsewhere, &contracts, "the stream on another instance").await;
    for api in [Api::new(&engine, &old), Api::new(&other, &old)] {
        assert_eq!(api.get("/api/v1/notifications").await.0, 401);
        assert_eq!(api.post("/api/v1/sse/tickets", None).await.0, 401);
    }
    let (status, _, _) = connect_sse_query(
        &engine,
        &format!("ticket={}", unused["ticket"].as_str().unwrap()),
    )
    .await;
    assert_eq!(status, 401, "a ticket bought before the sign-out");
    world
        .produce(&order_paid("k2", &tenant, "u3", None, 1.0))
        .await;
    assert_eq!(
        bystander.next(WAIT).await.unwrap().data["event_id"],
        "k2",
        "another user's stream goes on"
    );

    // Signed in again: a token issued after the sign-out's second is good, everywhere.
    while now() <= not_before {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let fresh = world.token(&tenant, "u2");
    assert_eq!(
        Api::new(&engine, &fresh)
            .get("/api/v1/notifications")
            .await
            .0,
        200
    );
    assert_eq!(
        Api::new(&other, &fresh)
            .get("/api/v1/notifications")
            .await
            .0,
        200
    );
    let (status, _, _) = connect_sse(&engine, Some(&fresh), None).await;
    assert_eq!(status, 200);
    other.shutdown().await;
    engine.shutdown().await;
}

/// A JWKS file rewritten with the same length and the same modification time (a tool that
/// keeps timestamps, a file system with coarse ones) still takes effect: the engine notices
/// a key file's change by its content, not by its length and mtime alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_file_rewritten_with_the_same_length_and_mtime_is_reloaded() {
    let world = World::new().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.json");
    // One EC key under one kid; the two files differ only in the key's coordinates, which
    // have the same length for every P-256 key.
    let file_with = |jwks: &str| {
        let doc: Value =
            serde_json::from_slice(&std::fs::read(keys_dir().join(jwks)).unwrap()).unwrap();
        let ec = doc["keys"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["kty"] == "EC")
            .unwrap()
            .clone();
        json!({"keys": [{"kty": "EC", "kid": "rotating", "alg": "ES256", "use": "sig",
                         "crv": "P-256", "x": ec["x"], "y": ec["y"]}]})
        .to_string()
    };
    let (old, new) = (file_with("acme.jwks.json"), file_with("globex.jwks.json"));
    assert_eq!(old.len(), new.len());
    std::fs::write(&path, &old).unwrap();
    let mut config = world.config();
    config.auth.jwks_file = path.clone();
    config.auth.jwks_reload_ms = 100;
    let engine = world.start(config).await;
    let signed = |key_file: &str| {
        token(
            kid(Algorithm::ES256, "rotating"),
            &claims("acme", "u1"),
            &EncodingKey::from_ec_pem(&pem(key_file)).unwrap(),
        )
    };
    let (old_token, new_token) = (signed("acme-ec.key"), signed("globex-ec.key"));
    let status = async |token: &str| {
        Api::new(&engine, token)
            .get("/api/v1/notifications/unread-count")
            .await
            .0
    };
    assert_eq!(status(&old_token).await, 200);
    assert_eq!(status(&new_token).await, 401);

    // The rotation: same length, and the old modification time put back.
    let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    std::io::Write::write_all(&mut &file, new.as_bytes()).unwrap();
    file.set_modified(mtime).unwrap();
    drop(file);
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(
        (meta.len(), meta.modified().unwrap()),
        (old.len() as u64, mtime)
    );

    // Many reload intervals (100 ms) later, not minutes.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while status(&new_token).await != 200 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the rewritten key file was not reloaded: the new key is still refused"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status(&old_token).await, 401, "the old key is gone");
    engine.shutdown().await;
}
