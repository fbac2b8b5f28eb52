//! HTTP: the SSE stream, health, readiness and metrics.
//!
//! The router is built by [`router`] from explicit state, so tests drive it in-process or
//! over a real socket alike.

pub mod auth;
pub mod error;
pub mod sse;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::config::SseConfig;
use crate::hub::Hub;
use crate::telemetry::Metrics;
use auth::Auth;

#[derive(Clone)]
pub struct AppState {
    pub pool: PgPool,
    pub hub: Arc<Hub>,
    pub metrics: Metrics,
    pub auth: Arc<Auth>,
    pub sse: SseConfig,
    /// Kept current by a background probe owned by `app`.
    pub kafka_ready: Arc<AtomicBool>,
    /// Fired on shutdown: open streams end so the server can drain.
    pub shutdown: CancellationToken,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/api/v1/sse", get(sse::stream))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// Liveness: the process serves HTTP.
async fn healthz() -> impl IntoResponse {
    axum::Json(serde_json::json!({ "status": "ok" }))
}

/// Readiness: PostgreSQL answers and the Kafka broker was reachable at the last probe.
async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let postgres = crate::store::ping(&state.pool).await;
    let kafka = state.kafka_ready.load(Ordering::Relaxed);
    let status = if postgres && kafka {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let word = |ok: bool| if ok { "ok" } else { "unreachable" };
    (
        status,
        axum::Json(serde_json::json!({
            "status": if status == StatusCode::OK { "ready" } else { "not_ready" },
            "checks": { "postgres": word(postgres), "kafka": word(kafka) },
        })),
    )
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}
