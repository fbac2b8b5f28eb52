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
pub mod openapi;
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
    /// `http.cors_origins`.
    pub cors_origins: Arc<[String]>,
    /// `auth.ticket_ttl_secs`.
    pub ticket_ttl_secs: u64,
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

async fn no_route() -> ApiError {
    ApiError::NotFound("no such route".into())
}

/// The operator endpoints, served on `http.admin_listen`.
pub fn admin_router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/v1/admin/plugins", get(admin_plugins))
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
    if !identity.has_role(auth::ADMIN_ROLE) {
        return Err(ApiError::Forbidden(format!(
            "the admin API needs the {:?} role in the token",
            auth::ADMIN_ROLE
        )));
    }
    Ok(axum::Json(
        serde_json::json!({ "plugins": state.plugins.list() }),
    ))
}

/// Liveness: the process serves HTTP.
async fn healthz() -> impl IntoResponse {
    axum::Json(serde_json::json!({ "status": "ok" }))
}

/// Readiness: PostgreSQL and Kafka answered their last probes and the pipeline is not
/// stalled. Read from the background snapshot: answering costs no database connection.
async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let health = state.health.snapshot();
    let status = if health.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let word = |ok: bool| if ok { "ok" } else { "unreachable" };
    (
        status,
        axum::Json(serde_json::json!({
            "status": if health.ready { "ready" } else { "not_ready" },
            "checks": {
                "postgres": word(health.postgres),
                "kafka": word(health.kafka),
                "pipeline": health.stall.as_deref().map_or("ok".to_owned(), |r| format!("stalled: {r}")),
                "plugins": health.plugins,
            },
        })),
    )
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}
