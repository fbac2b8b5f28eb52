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

#[cfg(test)]
mod tests;
