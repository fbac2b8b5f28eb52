//! In-app for frontends, on the real services: the inbox API, stream tickets, JWT keys by
//! kid, token expiry on open streams, tenant and user isolation, the AsyncAPI contract,
//! retention and the row-level security of the API's pool.

use std::path::Path;
use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rand::{Rng, SeedableRng};
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
async fn inbox_api_pages_counts_reads_and_archives_and_tells_other_tabs() {
    let world = World::new().await;
    let engine = world.start(world.config()).await;
    let contracts = Contracts::load();
    let tenant = unique("shop");
    let api = Api::new(&engine, &world.token(&tenant, "u1"));
    for i in 1..=5 {
        world
            .produce(&order_paid(&format!("p{i}"), &tenant, "u1", None, 10.0))
            .await;
    }
    world
        .wait_count(
            &format!("SELECT count(*) FROM notifications WHERE tenant_id = '{tenant}'"),
            5,
            WAIT,
        )
        .await;
    // Two tabs of the same user.
    let token = api.token.clone();
    let (_, tab_a, _) = connect_sse(&engine, Some(&token), None).await;
    let (_, tab_b, _) = connect_sse(&engine, Some(&token), None).await;
    let (mut tab_a, mut tab_b) = (tab_a.unwrap(), tab_b.unwrap());

    // Pages, newest first; an insert between pages does not shift them.
    let (status, first) = api.get("/api/v1/notifications?limit=2").await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(ids(&first), [5, 4]);
    assert_eq!(first["items"][0]["title"], "Payment received");
    assert_eq!(first["items"][0]["category"], "billing");
    assert_eq!(first["items"][0]["read_at"], Value::Null);
    let cursor = first["next_cursor"].as_str().unwrap().to_owned();
    world
        .produce(&order_paid("p6", &tenant, "u1", None, 10.0))
        .await;
    let n = tab_a.next(WAIT).await.expect("the new notification");
    contracts.check_sse(&n);
    assert_eq!(n.id.as_deref(), Some("6"));
    assert_eq!(tab_b.next(WAIT).await.unwrap().id.as_deref(), Some("6"));
    let (_, second) = api
        .get(&format!("/api/v1/notifications?limit=2&cursor={cursor}"))
        .await;
    assert_eq!(ids(&second), [3, 2]);
    let cursor = second["next_cursor"].as_str().unwrap();
    let (_, last) = api
        .get(&format!("/api/v1/notifications?limit=2&cursor={cursor}"))
        .await;
    assert_eq!(ids(&last), [1]);
    assert_eq!(last["next_cursor"], Value::Null);
    assert_eq!(
        api.get("/api/v1/notifications/unread-count").await.1["unread_count"],
        6
    );

    // Marking read in one tab reaches the other, with the count the API agrees on.
    let (status, changed) = api.post("/api/v1/notifications/5/read", None).await;
    assert_eq!(status, 200, "{changed}");
    assert_eq!(changed["unread_count"], 5);
    assert!(changed["notification"]["read_at"].is_string());
    for tab in [&mut tab_a, &mut tab_b] {
        let e = tab
            .next(WAIT)
            .await
            .expect("notification.read on every tab");
        contracts.check_sse(&e);
        assert_eq!(e.event, "notification.read");
        assert_eq!(
            e.data,
            json!({ "ids": [5], "up_to": null, "unread_count": 5 })
        );
    }
    let (_, unread) = api.get("/api/v1/notifications?unread=true&limit=100").await;
    assert_eq!(ids(&unread), [6, 4, 3, 2, 1]);
    // Idempotent: a second click changes nothing and tells nobody.
    let (status, again) = api.post("/api/v1/notifications/5/read", None).await;
    assert_eq!((status, again["unread_count"].as_i64()), (200, Some(5)));

    // Read all up to what the user saw (3): 6 and 4 stay unread.
    let (status, all) = api
        .post(
            "/api/v1/notifications/read-all",
            Some(json!({ "up_to": 3 })),
        )
        .await;
    assert_eq!(status, 200, "{all}");
    assert_eq!(
        (all["marked"].as_i64(), all["unread_count"].as_i64()),
        (Some(3), Some(2))
    );
    let e = tab_b.next(WAIT).await.unwrap();
    assert_eq!(
        e.event, "notification.read",
        "the repeated click sent nothing"
    );
    assert_eq!(e.data, json!({ "ids": [], "up_to": 3, "unread_count": 2 }));
    contracts.check_sse(&e);
    let (_, unread) = api.get("/api/v1/notifications?unread=true").await;
    assert_eq!(ids(&unread), [6, 4]);

    // Archive leaves the inbox and the count; unarchive brings it back.
    let (status, archived) = api.post("/api/v1/notifications/4/archive", None).await;
    assert_eq!((status, archived["unread_count"].as_i64()), (200, Some(1)));
    let e = tab_b.next(WAIT).await.unwrap();
    contracts.check_sse(&e);
    assert_eq!(e.event, "notification.archived");
    assert_eq!(
        e.data,
        json!({ "id": 4, "archived": true, "unread_count": 1 })
    );
    assert_eq!(
        ids(&api.get("/api/v1/notifications").await.1),
        [6, 5, 3, 2, 1]
    );
    assert_eq!(
        ids(&api.get("/api/v1/notifications?archived=true").await.1),
        [4]
    );
    assert_eq!(
        ids(&api
            .get("/api/v1/notifications?archived=any&limit=3")
            .await
            .1),
        [6, 5, 4]
    );
    assert_eq!(
        ids(&api.get("/api/v1/notifications?category=shipping").await.1),
        Vec::<i64>::new()
    );
    let (status, back) = api.post("/api/v1/notifications/4/unarchive", None).await;
    assert_eq!((status, back["unread_count"].as_i64()), (200, Some(2)));
    assert_eq!(back["notification"]["archived_at"], Value::Null);
    // Tab A also saw every change, in order: read-all, archived, unarchived.
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(tab_a.next(WAIT).await.unwrap());
    }
    assert_eq!(seen[0].data["up_to"], 3);
    assert_eq!(seen[1].data["archived"], true);
    assert_eq!(
        seen[2].data,
        json!({ "id": 4, "archived": false, "unread_count": 2 })
    );

    // A replay from before the changes shows every item as it is now, and the change
    // events in order.
    let (_, replay, _) = connect_sse(&engine, Some(&token), Some("0")).await;
    let mut replay = replay.unwrap();
    let mut names = Vec::new();
    for _ in 0..10 {
        let e = replay.next(WAIT).await.unwrap();
        contracts.check_sse(&e);
        if e.data["event_id"] == "p5" {
            assert_eq!(e.data["read"], true);
        }
        names.push(e.event);
    }
    assert_eq!(
        names,
        [
            "notification",
            "notification",
            "notification",
            "notification",
            "notification",
            "notification",
            "notification.read",
            "notification.read",
            "notification.archived",
            "notification.archived",
        ]
    );

    // Bad parameters are 400 with the uniform body; ids not the caller's are 404.
    for bad in [
        "/api/v1/notifications?limit=0",
        "/api/v1/notifications?limit=101",
        "/api/v1/notifications?cursor=abc",
        "/api/v1/notifications?archived=maybe",
        "/api/v1/notifications?unread=yes",
        "/api/v1/notifications?colour=red",
    ] {
        let (status, body) = api.get(bad).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (400, Some("bad_request")),
            "{bad}: {body}"
        );
    }
    let (status, body) = api
        .post("/api/v1/notifications/read-all", Some(json!({ "upto": 3 })))
        .await;
    assert_eq!(status, 400, "{body}");
    let other_user = Api::new(&engine, &world.token(&tenant, "u2"));
    let other_tenant = Api::new(&engine, &world.token(&unique("shop"), "u1"));
    for client in [&other_user, &other_tenant, &api] {
        for path in [
            "/api/v1/notifications/5",
            "/api/v1/notifications/999",
            "/api/v1/notifications/x",
            "/api/v1/notifications/-1",
        ] {
            if std::ptr::eq(client, &api) && path.ends_with("/5") {
                continue;
            }
            let (status, body) = client.get(path).await;
            assert_eq!(status, 404, "{path}: {body}");
            assert_eq!(
                body,
                json!({"error": {"code": "not_found", "message": "no such notification"}})
            );
            let (status, _) = client.post(&format!("{path}/read"), None).await;
            assert_eq!(status, 404, "{path}/read");
            let (status, _) = client.post(&format!("{path}/archive"), None).await;
            assert_eq!(status, 404, "{path}/archive");
        }
    }
    // The other user's mark-all cannot touch u1's items.
    let (_, none) = other_user
        .post(
            "/api/v1/notifications/read-all",
            Some(json!({ "up_to": 100 })),
        )
        .await;
    assert_eq!(none["marked"], 0);
    assert_eq!(
        api.get("/api/v1/notifications/unread-count").await.1["unread_count"],
        2
    );
    engine.shutdown().await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_forged_or_foreign_token_gets_the_same_401_on_every_route() {
    let world = World::new().await;
    let mut config = world.config();
    config.auth.leeway_secs = 0;
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
    let secret = EncodingKey::from_secret(SECRET.as_bytes());
    let acme_rsa = EncodingKey::from_rsa_pem(&pem("acme-rsa.key")).unwrap();
    let acme_ec = EncodingKey::from_ec_pem(&pem("acme-ec.key")).unwrap();
    let acme_claims = |extra: Value| {
        let mut c = claims("acme", "u1");
        c["iss"] = json!(ACME_ISSUER);
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        c
    };

    // The controls: the shared secret, and acme's own RS256 and ES256 keys.
    let valid = [
        token(
            Header::new(Algorithm::HS256),
            &claims("acme", "u1"),
            &secret,
        ),
        token(
            kid(Algorithm::RS256, "acme-rsa"),
            &acme_claims(json!({})),
            &acme_rsa,
        ),
        token(
            kid(Algorithm::ES256, "acme-ec"),
            &acme_claims(json!({})),
            &acme_ec,
        ),
    ];

    let good = &valid[1];
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
    let forged: Vec<(&str, String)> = vec![
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
                &secret,
            ),
        ),
        (
            "wrong iss",
            token(
                kid(Algorithm::RS256, "acme-rsa"),
                &acme_claims(json!({"iss": "notify-engine"})),
                &acme_rsa,
            ),
        ),
        (
            "expired",
            token(
                Header::new(Algorithm::HS256),
                &json!({"sub": "u1", "tenant": "acme", "iss": "notify-engine", "aud": "notify-api", "exp": now() - 5}),
                &secret,
            ),
        ),
        (
            "future nbf",
            token(
                kid(Algorithm::ES256, "acme-ec"),
                &acme_claims(json!({"nbf": now() + 300})),
                &acme_ec,
            ),
        ),
        (
            "missing tenant claim",
            token(Header::new(Algorithm::HS256), &no_tenant, &secret),
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
                &acme_rsa,
            ),
        ),
        (
            "acme's key signing a globex token",
            token(
                kid(Algorithm::RS256, "acme-rsa"),
                &acme_claims(json!({"tenant": "globex"})),
                &acme_rsa,
            ),
        ),
        (
            "globex's kid, acme's key",
            token(
                kid(Algorithm::ES256, "globex-ec"),
                &acme_claims(json!({"tenant": "globex"})),
                &acme_ec,
            ),
        ),
        ("not a JWT", "not-a-jwt".into()),
        ("empty", String::new()),
    ];
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
                .json(&json!({ "up_to": 1 }));
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

/// Many tenants and users connecting, reconnecting with their own, foreign and forged
/// `Last-Event-ID`s, and reading each other's ids over REST: no stream and no read ever
/// shows another user's notification. Seeded, so a failure reproduces.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_and_users_never_see_each_other() {
    let seed: u64 = std::env::var("ISOLATION_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    eprintln!("isolation seed {seed} (ISOLATION_SEED={seed} reproduces)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let world = World::new().await;
    let engine = world.start(world.config()).await;
    let tenants: Vec<String> = (0..3).map(|_| unique("iso")).collect();
    let users = ["u1", "u2", "u3"];
    // The same user ids in every tenant: only the pair identifies a user.
    let mut pairs = Vec::new();
    for t in &tenants {
        for u in users {
            pairs.push((t.clone(), u.to_owned()));
        }
    }
    let mut produced = 0;
    for round in 0..4 {
        // Events for random users; their ids name the owner.
        for _ in 0..12 {
            let (t, u) = &pairs[rng.random_range(0..pairs.len())];
            produced += 1;
            world
                .produce(&order_paid(
                    &format!("{t}.{u}.{round}.{produced}"),
                    t,
                    u,
                    None,
                    1.0,
                ))
                .await;
        }
        world
            .wait_count("SELECT count(*) FROM notifications", produced, WAIT)
            .await;
        // Random users connect with a random Last-Event-ID: none, 0, their own, a huge
        // one, garbage or negative (refused), or one of another user's.
        for _ in 0..6 {
            let (t, u) = &pairs[rng.random_range(0..pairs.len())];
            let last_id = match rng.random_range(0..6) {
                0 => None,
                1 => Some("0".to_owned()),
                2 => Some(rng.random_range(1..20).to_string()),
                3 => Some(i64::MAX.to_string()),
                4 => Some(["-1", "abc", "1e3", " "][rng.random_range(0..4)].to_owned()),
                _ => Some(rng.random_range(1..produced).to_string()),
            };
            let (status, stream, _) =
                connect_sse(&engine, Some(&world.token(t, u)), last_id.as_deref()).await;
            let Some(mut stream) = stream else {
                assert!(matches!(status, 400 | 429), "{status} for {last_id:?}");
                continue;
            };
            while let Some(e) = stream.next(Duration::from_millis(300)).await {
                let event_id = e.data["event_id"].as_str().unwrap_or_default();
                assert!(
                    event_id.starts_with(&format!("{t}.{u}.")),
                    "{t}/{u} (Last-Event-ID {last_id:?}) received {event_id}"
                );
            }
        }
        // REST: every id a user does not own answers 404; every list is their own.
        for _ in 0..4 {
            let (t, u) = &pairs[rng.random_range(0..pairs.len())];
            let api = Api::new(&engine, &world.token(t, u));
            let (_, page) = api.get("/api/v1/notifications?limit=100").await;
            for item in page["items"].as_array().unwrap() {
                assert!(
                    item["event_id"]
                        .as_str()
                        .unwrap()
                        .starts_with(&format!("{t}.{u}."))
                );
            }
            let own: Vec<i64> = ids(&page);
            for id in 1..=20 {
                let (status, body) = api.get(&format!("/api/v1/notifications/{id}")).await;
                if own.contains(&id) {
                    assert_eq!(status, 200);
                    assert!(
                        body["event_id"]
                            .as_str()
                            .unwrap()
                            .starts_with(&format!("{t}.{u}."))
                    );
                } else {
                    assert_eq!(status, 404, "{t}/{u} read id {id}: {body}");
                }
            }
        }
    }
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_messages_and_sse_frames_match_the_asyncapi_contract() {
    let world = World::new().await;
    let engine = world.start(world.config()).await;
    let contracts = Contracts::load();
    let tenant = unique("shop");
    let (_, stream, _) = connect_sse(&engine, Some(&world.token(&tenant, "u1")), None).await;
    let mut stream = stream.unwrap();

    // The native envelope.
    let envelope = order_paid("c1", &tenant, "u1", None, 12.5);
    contracts.check("event-envelope", &envelope);
    world.produce(&envelope).await;
    // CloudEvents, structured mode.
    let structured = json!({
        "specversion": "1.0", "id": "c2", "source": "/payments", "type": "order_paid",
        "time": chrono::Utc::now().to_rfc3339(), "tenant": tenant,
        "datacontenttype": "application/json",
        "data": { "order_id": "A-c2", "user_id": "u1", "amount": 3.0, "currency": "EUR" },
    });
    contracts.check("cloudevent-structured", &structured);
    world
        .produce_raw(&world.topic_paid, structured.to_string().as_bytes())
        .await;
    // CloudEvents, binary mode: attributes in ce_ headers, the data as the value.
    let time = chrono::Utc::now().to_rfc3339();
    let headers = [
        ("ce_specversion", "1.0"),
        ("ce_id", "c3"),
        ("ce_type", "order_status_updated"),
        ("ce_source", "/orders"),
        ("ce_time", time.as_str()),
        ("ce_tenant", tenant.as_str()),
        ("content-type", "application/json"),
    ];
    let header_object: serde_json::Map<String, Value> = headers
        .iter()
        .map(|(k, v)| ((*k).to_owned(), json!(v)))
        .collect();
    contracts.check("cloudevent-binary-headers", &Value::Object(header_object));
    let data = json!({ "order_id": "A-c3", "user_id": "u1", "status": "shipped", "previous_status": "processing" });
    contracts.check("event-data", &data);
    world
        .produce_with_headers(
            &world.topic_status,
            None,
            data.to_string().as_bytes(),
            &headers,
        )
        .await;

    // Every frame that arrives holds to its schema: a notification of each, and the live
    // update of the binary-mode one (partitions interleave, so compared sorted).
    let mut frames = Vec::new();
    for _ in 0..4 {
        let e = stream.next(WAIT).await.expect("a frame");
        contracts.check_sse(&e);
        frames.push((e.event, e.data["event_id"].as_str().unwrap().to_owned()));
    }
    frames.sort_by(|a, b| (&a.1, &a.0).cmp(&(&b.1, &b.0)));
    assert_eq!(
        frames,
        [
            ("notification".into(), "c1".into()),
            ("notification".into(), "c2".into()),
            ("notification".into(), "c3".into()),
            ("order.updated".into(), "c3".into()),
        ]
    );
    // A binary-mode message without its tenant is dead-lettered with the reason.
    world
        .produce_with_headers(
            &world.topic_status,
            None,
            data.to_string().as_bytes(),
            &headers[..5],
        )
        .await;
    world
        .wait_count(
            "SELECT count(*) FROM dead_letters WHERE reason LIKE '%tenant is required%'",
            1,
            WAIT,
        )
        .await;
    // The document names every schema it relies on, and each exists.
    let asyncapi: Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../contracts/asyncapi.json"),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(asyncapi["asyncapi"], "3.0.0");
    let text = asyncapi.to_string();
    for schema in [
        "event-envelope",
        "cloudevent-structured",
        "cloudevent-binary-headers",
        "sse-notification",
        "sse-notification-read",
        "sse-notification-archived",
        "sse-auth-expired",
        "sse-live-update",
    ] {
        assert!(
            text.contains(&format!("schemas/{schema}.schema.json")),
            "{schema} not in asyncapi.json"
        );
    }
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_purges_in_batches_and_the_api_pool_sees_only_its_user() {
    let world = World::new().await;
    // The engine's own retention loop stays out of the way: the test runs rounds itself.
    let mut config = world.config();
    config.retention.notifications_days = 0;
    config.retention.processed_events_days = 0;
    let engine = world.start(config).await;
    let tenant = unique("shop");
    for i in 1..=6 {
        let user = if i % 2 == 0 { "u2" } else { "u1" };
        world
            .produce(&order_paid(&format!("r{i}"), &tenant, user, None, 1.0))
            .await;
    }
    world
        .wait_count("SELECT count(*) FROM notifications", 6, WAIT)
        .await;
    let pool = world.pool().await;

    // Row-level security: the API's pool reads nothing outside a scoped transaction, and
    // only the named user's rows inside one, whatever the query asks for.
    let config = world.config();
    let api_pool = notify_engine::store::connect_api(&config.database, 2).unwrap();
    let (unscoped,): (i64,) = sqlx::query_as("SELECT count(*) FROM notifications")
        .fetch_one(&api_pool)
        .await
        .unwrap();
    assert_eq!(unscoped, 0, "no scope, no rows");
    let mut tx = notify_engine::store::scoped(&api_pool, &tenant, "u1")
        .await
        .unwrap();
    let (visible,): (i64,) = sqlx::query_as("SELECT count(*) FROM notifications")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(visible, 3, "only u1's rows");
    let denied = sqlx::query("UPDATE notifications SET read_at = now() WHERE user_id = 'u2'")
        .execute(&mut *tx)
        .await
        .unwrap();
    assert_eq!(denied.rows_affected(), 0, "u2's rows cannot be written");
    let smuggled = sqlx::query(
        "INSERT INTO notifications (tenant_id, user_id, seq, event_id, kind) VALUES ($1, 'u2', 99, 'x', 'notification')",
    )
    .bind(&tenant)
    .execute(&mut *tx)
    .await;
    assert!(smuggled.is_err(), "a row for another user is refused");
    drop(tx);
    assert!(
        sqlx::query("SELECT count(*) FROM processed_events")
            .fetch_one(&api_pool)
            .await
            .is_err(),
        "the API role has no business with the pipeline's tables"
    );

    // Retention: rows older than the configured age go, in batches; the rest stay. All of
    // u1's notifications are old.
    sqlx::query("UPDATE notifications SET created_at = now() - interval '100 days' WHERE event_id IN ('r1', 'r2', 'r3', 'r5')")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("UPDATE processed_events SET processed_at = now() - interval '40 days' WHERE event_id IN ('r1', 'r2')")
        .execute(&pool)
        .await
        .unwrap();
    let metrics = notify_engine::telemetry::Metrics::new();
    let retention = notify_engine::retention::Retention {
        pool: pool.clone(),
        config: notify_engine::config::RetentionConfig {
            batch: 2,
            ..Default::default()
        },
        metrics: metrics.clone(),
    };
    let mut rounds = 1;
    while retention.round().await.unwrap() {
        rounds += 1;
        assert!(
            rounds <= 4,
            "a full batch means more to do, until there is none"
        );
    }
    assert_eq!(
        rounds, 3,
        "4 old rows in batches of 2: two full rounds, one empty"
    );
    assert_eq!(
        world.count("SELECT count(*) FROM notifications").await,
        2,
        "u2's recent r4 and r6 stay"
    );
    assert_eq!(
        world.count("SELECT count(*) FROM processed_events").await,
        4
    );
    assert!(
        metrics
            .render()
            .contains("notify_retention_deleted_total{table=\"notifications\"} 4")
    );
    assert!(
        metrics
            .render()
            .contains("notify_retention_deleted_total{table=\"processed_events\"} 2")
    );
    // Sequence numbers are not reused after a purge, even with none of the user's rows left:
    // u1's next notification is 4, not 1 (a stale Last-Event-ID cannot hide it).
    world
        .produce(&order_paid("r7", &tenant, "u1", None, 1.0))
        .await;
    world
        .wait_count(
            "SELECT max(seq) FROM notifications WHERE user_id = 'u1'",
            4,
            WAIT,
        )
        .await;
    engine.shutdown().await;
}

/// The engine's database user need not be a superuser: with CREATEROLE (and owning its
/// database) it migrates, creates the API role of its database, and its API connections take
/// that role on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_superuser_engine_user_migrates_and_takes_on_the_api_role() {
    use sqlx::{Connection, PgConnection};
    let services = Services::get();
    let user = unique("notify_test_user").replace('-', "_");
    let db = unique("test_nosuper").replace('-', "_");
    let mut admin = PgConnection::connect(&services.database_url).await.unwrap();
    for sql in [
        format!("CREATE ROLE {user} LOGIN PASSWORD 'pw' CREATEROLE"),
        format!("CREATE DATABASE {db} OWNER {user}"),
    ] {
        sqlx::query(&sql).execute(&mut admin).await.unwrap();
    }
    let (base, _) = services.database_url.rsplit_once('/').unwrap();
    let (scheme, rest) = base.split_once("://").unwrap();
    let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    let mut config = notify_engine::config::Config::default();
    config.database.url = format!("{scheme}://{user}:pw@{host}/{db}");
    let pool = notify_engine::store::connect(&config.database, 2).unwrap();
    notify_engine::store::migrate(&pool)
        .await
        .expect("migrations run as a CREATEROLE user");
    let api = notify_engine::store::connect_api(&config.database, 1).unwrap();
    notify_engine::store::ping_api(&api)
        .await
        .expect("the API connection takes on its role");
    let (role,): (String,) = sqlx::query_as("SELECT current_user::text")
        .fetch_one(&api)
        .await
        .unwrap();
    assert!(role.starts_with("notify_api_"), "{role}");
    api.close().await;
    pool.close().await;
    sqlx::query(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .execute(&mut admin)
        .await
        .unwrap();
    sqlx::query(&format!("DROP ROLE {role}"))
        .execute(&mut admin)
        .await
        .unwrap();
    sqlx::query(&format!("DROP ROLE {user}"))
        .execute(&mut admin)
        .await
        .unwrap();
}
