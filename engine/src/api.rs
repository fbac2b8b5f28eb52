//! HTTP: the public API (the inbox, stream tickets, the SSE stream, the OpenAPI document)
//! and, on a listener of their own, the operator endpoints (health, readiness, metrics, the
//! admin API).
//!
//! The routers are built by [`router`] and [`admin_router`] from explicit state, so tests
//! drive them in-process or over a real socket alike; [`serve`] is the hardened listener.
//! Authenticated handlers take an [`auth::Identity`]; errors are one [`error::ApiError`].

pub mod auth;
pub mod error;
pub mod inbox;
pub mod limits;
pub mod openapi;
pub mod request;
pub mod serve;
pub mod sse;
pub mod tickets;

use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::config::SseConfig;
use crate::health::Health;
use crate::hub::Hub;
use crate::telemetry::Metrics;
use auth::{Auth, Identity};
use error::ApiError;

#[derive(Clone)]
pub struct AppState {
    /// The public API's own pool (`database.api_max_connections`): whatever arrives on the
    /// public listener can never take the pipeline's connections.
    pub pool: PgPool,
    pub hub: Arc<Hub>,
    pub metrics: Metrics,
    pub auth: Arc<Auth>,
    pub sse: SseConfig,
    /// Kept current by background probes and the pipeline.
    pub health: Arc<Health>,
    /// The plugin host, for the admin listing.
    pub plugins: Arc<crate::plugin::PluginHost>,
    /// The engine's own pool, for the admin listing only (no public route reaches it).
    pub engine_pool: PgPool,
    /// This instance's view of the cluster's presence, for the admin listing.
    pub presence: Arc<crate::cluster::Presence>,
    /// `http.cors_origins`.
    pub cors_origins: Arc<[String]>,
    /// `auth.ticket_ttl_secs`.
    pub ticket_ttl_secs: u64,
    /// The request limits (`[limits]`): buckets per user, tenant and address, and each
    /// tenant's share of `pool`.
    pub limits: Arc<limits::Limits>,
    /// Fired on shutdown: open streams end so the server can drain.
    pub shutdown: CancellationToken,
}

/// Request bodies of the public API are small JSON objects.
const MAX_BODY_BYTES: usize = 16 * 1024;

/// The public API.
pub fn router(state: AppState) -> Router {
    let cors = cors(&state.cors_origins);
    let router = Router::new()
        .route("/api/v1/sse", get(sse::stream))
        .route("/api/v1/sse/tickets", post(tickets::create))
        .route("/api/v1/openapi.json", get(openapi_json))
        .merge(inbox::routes())
        .fallback(no_route)
        // Before any handler, so before any database work.
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            limits::admit,
        ))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state);
    match cors {
        Some(cors) => router.layer(cors),
        None => router,
    }
}

/// Browsers on the configured origins may call the API with credentials (the cookie);
/// nobody else gets CORS headers.
fn cors(origins: &[String]) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let origins: Vec<HeaderValue> = origins
        .iter()
        .filter_map(|o| HeaderValue::from_str(o).ok())
        .collect();
    Some(
        CorsLayer::new()
            .allow_origin(AllowOrigin::list(origins))
            .allow_credentials(true)
            .allow_methods([Method::GET, Method::POST])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                header::HeaderName::from_static("last-event-id"),
            ])
            // A browser client backs off as a 429 says.
            .expose_headers([header::RETRY_AFTER])
            .max_age(std::time::Duration::from_secs(600)),
    )
}

async fn openapi_json() -> impl IntoResponse {
    static DOCUMENT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    (
        [(header::CONTENT_TYPE, "application/json")],
        DOCUMENT.get_or_init(openapi::document).as_str(),
    )
}

/// The span of one request in the access log: method and path only. A query string may hold
/// a stream ticket and headers a token, and credentials stay out of logs.
pub fn request_span<B>(request: &axum::http::Request<B>) -> tracing::Span {
    tracing::debug_span!("request", method = %request.method(), path = %request.uri().path())
}

async fn no_route() -> ApiError {
    ApiError::NotFound("no such route".into())
}

/// The operator endpoints, served on `http.admin_listen`.
pub fn admin_router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .route("/api/v1/admin/plugins", get(admin_plugins))
        .route("/api/v1/admin/presence", get(admin_presence))
        .route("/api/v1/admin/revocations", post(auth::revoke::revoke))
        .with_state(state)
}

/// Every plugin per world: what serves (SHA-256, WIT version, loaded at), what is
/// quarantined or broken, the last refused candidate with its error, calls and failures,
/// and the tenants each serves. Only on the admin listener, and only for a token with the
/// `admin` role.
async fn admin_plugins(
    State(state): State<AppState>,
    identity: Identity,
) -> Result<impl IntoResponse, ApiError> {
    require_admin(&identity)?;
    Ok(axum::Json(
        serde_json::json!({ "plugins": state.plugins.list() }),
    ))
}

/// Presence across the cluster: this instance's id and counts (streams and users here,
/// users anywhere as this instance last heard), and every live instance with its
/// heartbeat and users. Admin listener, `admin` role.
async fn admin_presence(
    State(state): State<AppState>,
    identity: Identity,
) -> Result<impl IntoResponse, ApiError> {
    require_admin(&identity)?;
    let instances = crate::store::presence::instances(&state.engine_pool)
        .await
        .map_err(ApiError::from)?;
    Ok(axum::Json(serde_json::json!({
        "instance": state.presence.instance(),
        "counts": state.presence.counts(),
        "instances": instances,
    })))
}

pub(crate) fn require_admin(identity: &Identity) -> Result<(), ApiError> {
    if identity.has_role(auth::ADMIN_ROLE) {
        Ok(())
    } else {
        Err(ApiError::Forbidden(format!(
            "the admin API needs the {:?} role in the token",
            auth::ADMIN_ROLE
        )))
    }
}

/// Liveness: the process serves HTTP.
async fn healthz() -> impl IntoResponse {
    axum::Json(serde_json::json!({ "status": "ok" }))
}

/// Readiness: this instance can serve its HTTP routes, i.e. PostgreSQL answered its last
/// probe (the inbox and the streams need nothing else). Kafka, a stalled lane or SMTP do not
/// count: behind a load balancer a 503 takes the instance out of rotation, and a broker
/// outage would take every replica, and every browser's stream, with it. `/status` reports
/// those. Read from the background snapshot: answering costs no database connection.
async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let health = state.health.snapshot();
    let (status, word) = if health.serving {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not_ready")
    };
    let reasons: Vec<&str> = if health.postgres {
        vec![]
    } else {
        vec!["postgres unreachable"]
    };
    (
        status,
        axum::Json(serde_json::json!({
            "status": word,
            "checks": { "postgres": reachable(health.postgres) },
            "reasons": reasons,
        })),
    )
}

/// Stalled lanes `/status` lists one by one; lanes are tenants, and made-up tenant ids could
/// otherwise make the body as long as the pipeline's bookkeeping.
const MAX_LISTED_STALLS: usize = 20;

/// The status report: every component with its state, and `status` `ok` only when all are
/// well (`degraded` otherwise); `ready` is what `/readyz` answers, `consuming` whether the
/// pipeline moves (PostgreSQL, Kafka, no stalled lane; an SMTP outage leaves it, as emails
/// wait in the outbox). Always 200: it is a report, not a probe.
async fn status(State(state): State<AppState>) -> impl IntoResponse {
    let health = state.health.snapshot();
    let mut stalls: serde_json::Map<String, serde_json::Value> = health
        .stalls
        .iter()
        .take(MAX_LISTED_STALLS)
        .map(|(lane, reason)| (lane.clone(), reason.clone().into()))
        .collect();
    let more = health.stalls.len().saturating_sub(MAX_LISTED_STALLS);
    if more > 0 {
        stalls.insert("_more".to_owned(), more.into());
    }
    axum::Json(serde_json::json!({
        "status": if health.healthy { "ok" } else { "degraded" },
        "ready": health.serving,
        "consuming": health.consuming,
        "checks": {
            "postgres": reachable(health.postgres),
            "kafka": reachable(health.kafka),
            "smtp": health.smtp.map_or("unknown", reachable),
            "pipeline": health.stall.as_deref().map_or("ok".to_owned(), |r| format!("stalled: {r}")),
            "stalls": stalls,
            "plugins": health.plugins,
            "templates": { "rejected": health.templates_rejected },
        },
    }))
}

fn reachable(ok: bool) -> &'static str {
    if ok { "ok" } else { "unreachable" }
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    state
        .metrics
        .plugin_warm_instances
        .set(state.plugins.warm_instances() as i64);
    let quarantined = &state.metrics.plugin_quarantined;
    quarantined.reset();
    for q in state.plugins.quarantines() {
        quarantined
            .with_label_values(&[state.metrics.tenant_label(&q.tenant), &q.plugin])
            .inc();
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}

/// The HTTP edge in-process (`oneshot`): the paths that answer before any database work
/// (a lazy pool that never connects), so they need no services.
#[cfg(test)]
mod tests {
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
}
