//! The HTTP edge in-process (`oneshot`): the paths that answer before any database work
//! (a lazy pool that never connects), so they need no services.

use super::*;
use axum::body::Body;
use axum::http::Request;
use tower::ServiceExt;

use crate::config::Config;

fn state(cors: &[&str]) -> (AppState, Config) {
    let mut config = Config::default();
    config.auth.jwt_secret = "0123456789abcdef0123456789abcdef".into();
    // A pool that never reaches a database (nothing listens on port 1), and gives up at
    // once: these tests cover what is answered before any query.
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(std::time::Duration::from_millis(50))
        .connect_lazy("postgres://nobody:nothing@127.0.0.1:1/none")
        .unwrap();
    let hub = Hub::new();
    let state = AppState {
        engine_pool: pool.clone(),
        presence: crate::cluster::Presence::new(hub.clone(), config.presence.clone()),
        pool,
        hub,
        metrics: Metrics::new(),
        auth: Arc::new(Auth::new(&config).unwrap()),
        sse: config.sse.clone(),
        health: Arc::new(Health::default()),
        plugins: Arc::new(
            crate::plugin::PluginHost::new(config.plugins.clone(), Default::default()).unwrap(),
        ),
        cors_origins: cors.iter().map(|o| (*o).to_owned()).collect(),
        ticket_ttl_secs: 30,
        limits: Arc::new(limits::Limits::new(
            &config.limits,
            1,
            Metrics::new().api_rate_limited,
        )),
        shutdown: CancellationToken::new(),
    };
    (state, config)
}

async fn send(router: &Router, request: Request<Body>) -> (StatusCode, HeaderMapAndBody) {
    let response = router.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap();
    let body = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    (status, HeaderMapAndBody { headers, body })
}

struct HeaderMapAndBody {
    headers: axum::http::HeaderMap,
    body: serde_json::Value,
}

fn request(method: &str, uri: &str, token: Option<&str>) -> axum::http::request::Builder {
    let mut r = Request::builder().method(method).uri(uri);
    if let Some(t) = token {
        r = r.header(header::AUTHORIZATION, format!("Bearer {t}"));
    }
    r
}

#[tokio::test]
async fn every_documented_route_exists_and_wants_a_token() {
    let (state, _) = state(&[]);
    let router = router(state);
    let doc: serde_json::Value = serde_json::from_str(&openapi::document()).unwrap();
    let paths = doc["paths"].as_object().unwrap();
    assert_eq!(paths.len(), 9, "{:?}", paths.keys());
    for (path, item) in paths {
        for method in item.as_object().unwrap().keys() {
            let uri = path.replace("{id}", "1");
            let (status, r) = send(
                &router,
                request(&method.to_uppercase(), &uri, None)
                    .body(Body::empty())
                    .unwrap(),
            )
            .await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{method} {path}");
            assert_eq!(r.body["error"]["message"], auth::UNAUTHORIZED);
        }
    }
    let (status, r) = send(
        &router,
        request("GET", "/api/v1/nothing", None)
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(r.body["error"]["code"], "not_found");
    let (status, r) = send(
        &router,
        request("GET", "/api/v1/openapi.json", None)
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(r.body, doc);
}

#[tokio::test]
async fn malformed_requests_get_a_400_with_the_uniform_body() {
    let (state, config) = state(&[]);
    let router = router(state);
    let token = auth::mint(&config.auth, "acme", "u1", 60);
    for uri in [
        "/api/v1/notifications?limit=0",
        "/api/v1/notifications?limit=many",
        "/api/v1/notifications?cursor=-5",
        "/api/v1/notifications?archived=maybe",
        "/api/v1/notifications?category=",
        "/api/v1/notifications?unknown=1",
    ] {
        let (status, r) = send(
            &router,
            request("GET", uri, Some(&token))
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{uri}");
        assert_eq!(r.body["error"]["code"], "bad_request", "{uri}");
    }
    for body in [
        "",
        "{",
        "[]",
        r#"{"up_to": "3"}"#,
        r#"{"up_to": -1}"#,
        &format!(r#"{{"up_to": 1, "pad": "{}"}}"#, "x".repeat(20_000)),
    ] {
        let (status, r) = send(
            &router,
            request("POST", "/api/v1/notifications/read-all", Some(&token))
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(body.to_owned()))
                .unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body:.40}");
        assert_eq!(r.body["error"]["code"], "bad_request");
    }
    let (status, _) = send(
        &router,
        request("GET", "/api/v1/sse", Some(&token))
            .header("last-event-id", "abc")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[test]
fn the_access_log_has_the_path_but_no_ticket_or_token() {
    #[derive(Clone, Default)]
    struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);
    impl std::io::Write for Captured {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    tracing::subscriber::with_default(subscriber, || {
        let request = Request::builder()
            .uri("/api/v1/sse?ticket=SECRET-TICKET&last_event_id=4")
            .header(header::AUTHORIZATION, "Bearer SECRET-TOKEN")
            .body(())
            .unwrap();
        let span = request_span(&request);
        let _in = span.enter();
        tracing::info!("handled");
    });
    let log = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(log.contains("path=/api/v1/sse"), "{log}");
    assert!(!log.contains("SECRET"), "{log}");
}

#[tokio::test]
async fn a_cookie_alone_cannot_change_state_without_json() {
    let (state, config) = state(&[]);
    let router = router(state);
    let token = auth::mint(&config.auth, "acme", "u1", 60);
    let cookie = format!("notify_token={token}");
    // What a cross-site form can send: refused before anything happens.
    for (uri, content_type) in [
        ("/api/v1/notifications/1/read", None),
        (
            "/api/v1/notifications/read-all",
            Some("application/x-www-form-urlencoded"),
        ),
        ("/api/v1/sse/tickets", Some("text/plain")),
    ] {
        let mut r = Request::builder()
            .method("POST")
            .uri(uri)
            .header(header::COOKIE, &cookie);
        if let Some(ct) = content_type {
            r = r.header(header::CONTENT_TYPE, ct);
        }
        let (status, body) = send(&router, r.body(Body::from("up_to=1")).unwrap()).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{uri}");
        assert!(
            body.body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("application/json")
        );
    }
    // JSON with the cookie gets past authentication (here to a body check), and so does a
    // form-typed request with a bearer token, which a forged form cannot carry.
    let (status, _) = send(
        &router,
        Request::builder()
            .method("POST")
            .uri("/api/v1/notifications/read-all")
            .header(header::COOKIE, &cookie)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from("{}"))
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = send(
        &router,
        request("POST", "/api/v1/notifications/read-all", Some(&token))
            .header(header::CONTENT_TYPE, "text/plain")
            .body(Body::from("{}"))
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn tickets_are_rate_limited_per_user() {
    let (mut state, config) = state(&[]);
    state.sse.tickets_per_minute = 1;
    let router = router(state);
    let token = auth::mint(&config.auth, "acme", "u1", 60);
    let ticket = || {
        request("POST", "/api/v1/sse/tickets", Some(&token))
            .body(Body::empty())
            .unwrap()
    };
    // The first is admitted (and then fails on the lazy pool, which never connects here).
    let (first, _) = send(&router, ticket()).await;
    assert_ne!(first, StatusCode::TOO_MANY_REQUESTS);
    let (status, r) = send(&router, ticket()).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert!(r.headers.contains_key(header::RETRY_AFTER));
    // Another user is not affected.
    let other = auth::mint(&config.auth, "acme", "u2", 60);
    let (status, _) = send(
        &router,
        request("POST", "/api/v1/sse/tickets", Some(&other))
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_ne!(status, StatusCode::TOO_MANY_REQUESTS);
}

#[tokio::test]
async fn a_tenant_at_its_stream_cap_gets_429() {
    let (mut state, config) = state(&[]);
    state.sse.max_connections_per_tenant = 0;
    let router = router(state);
    let token = auth::mint(&config.auth, "acme", "u1", 60);
    let (status, r) = send(
        &router,
        request("GET", "/api/v1/sse", Some(&token))
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("tenant")
    );
}

#[tokio::test]
async fn cors_answers_only_the_configured_origins_with_credentials() {
    let (state, _) = state(&["https://app.example.com"]);
    let router = router(state);
    let preflight = |origin: &str| {
        Request::builder()
            .method("OPTIONS")
            .uri("/api/v1/notifications")
            .header(header::ORIGIN, origin)
            .header(header::ACCESS_CONTROL_REQUEST_METHOD, "GET")
            .header(header::ACCESS_CONTROL_REQUEST_HEADERS, "authorization")
            .body(Body::empty())
            .unwrap()
    };
    let (status, r) = send(&router, preflight("https://app.example.com")).await;
    assert!(status.is_success());
    assert_eq!(
        r.headers[header::ACCESS_CONTROL_ALLOW_ORIGIN],
        "https://app.example.com"
    );
    assert_eq!(r.headers[header::ACCESS_CONTROL_ALLOW_CREDENTIALS], "true");
    // An actual request: Retry-After is readable by the page.
    let (_, r) = send(
        &router,
        Request::builder()
            .uri("/api/v1/notifications")
            .header(header::ORIGIN, "https://app.example.com")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(
        r.headers[header::ACCESS_CONTROL_EXPOSE_HEADERS],
        "retry-after"
    );
    let (_, r) = send(&router, preflight("https://evil.example")).await;
    assert!(r.headers.get(header::ACCESS_CONTROL_ALLOW_ORIGIN).is_none());
    // Without configured origins, no CORS headers at all.
    let (state, _) = super::tests::state(&[]);
    let (_, r) = send(&super::router(state), preflight("https://app.example.com")).await;
    assert!(r.headers.get(header::ACCESS_CONTROL_ALLOW_ORIGIN).is_none());
}

/// `/readyz` asks only what the routes need (PostgreSQL); Kafka and the lanes show on
/// `/status`, which always answers 200.
#[tokio::test]
async fn readiness_follows_postgres_and_the_status_report_every_component() {
    let (state, _) = state(&[]);
    let health = state.health.clone();
    let admin = admin_router(state);
    let get = |uri: &str| request("GET", uri, None).body(Body::empty()).unwrap();
    health.set_postgres(true);
    health.set_kafka(false);
    health.set_stall("t1", Some("database: lock timeout".into()));
    let (status, r) = send(&admin, get("/readyz")).await;
    assert_eq!(status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["status"], "ready");
    let (status, r) = send(&admin, get("/status")).await;
    assert_eq!(status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["status"], "degraded");
    assert_eq!(r.body["ready"], true);
    assert_eq!(r.body["checks"]["kafka"], "unreachable");
    assert_eq!(r.body["checks"]["stalls"]["t1"], "database: lock timeout");
    assert_eq!(r.body["checks"]["smtp"], "unknown");
    assert_eq!(r.body["consuming"], false);

    health.set_postgres(false);
    let (status, r) = send(&admin, get("/readyz")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.body);
    assert_eq!(r.body["checks"]["postgres"], "unreachable");
    assert_eq!(
        r.body["reasons"],
        serde_json::json!(["postgres unreachable"])
    );

    health.set_postgres(true);
    health.set_kafka(true);
    health.set_stall("t1", None);
    let (status, r) = send(&admin, get("/status")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(r.body["status"], "ok", "{}", r.body);
    assert_eq!(r.body["consuming"], true);

    // SMTP down: emails wait in the outbox; degraded, still consuming and ready.
    health.set_smtp(false);
    let (_, r) = send(&admin, get("/status")).await;
    assert_eq!(r.body["status"], "degraded", "{}", r.body);
    assert_eq!(r.body["checks"]["smtp"], "unreachable");
    assert_eq!(r.body["consuming"], true);
    assert_eq!(send(&admin, get("/readyz")).await.0, StatusCode::OK);
}
