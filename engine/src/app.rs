//! Wiring and the shutdown story.
//!
//! [`start`] builds every part from one [`Config`] and spawns the long-running tasks onto
//! one `TaskTracker`, all watching one `CancellationToken`:
//!
//! - the pipeline (Kafka → plugin → PostgreSQL), which finishes its batch in hand, stores
//!   the offsets of everything committed, and commits them synchronously;
//! - the email worker, which finishes the email in hand;
//! - the HTTP server, which stops accepting, ends open SSE streams and drains;
//! - the Kafka readiness probe.
//!
//! [`Running::shutdown`] fires the token and waits for all of them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use futures::FutureExt;
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api::{self, AppState, auth::Auth};
use crate::config::Config;
use crate::delivery::{self, EmailWorker, render::Templates};
use crate::hub::Hub;
use crate::ingest::{self, Ingest};
use crate::pipeline::Pipeline;
use crate::plugin::PluginHost;
use crate::store;
use crate::telemetry::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error("PostgreSQL not reachable after {0:?}: {1}")]
    DatabaseUnreachable(Duration, store::StoreError),
    #[error(transparent)]
    Plugin(#[from] crate::plugin::LoadError),
    #[error("templates in {dir}: {error}")]
    Templates { dir: String, error: std::io::Error },
    #[error(transparent)]
    Ingest(#[from] ingest::IngestError),
    #[error(transparent)]
    Delivery(#[from] delivery::DeliveryError),
    #[error("binding {addr}: {error}")]
    Bind {
        addr: SocketAddr,
        error: std::io::Error,
    },
}

/// A started engine.
pub struct Running {
    pub http_addr: SocketAddr,
    pub metrics: Metrics,
    pub hub: Arc<Hub>,
    pub pool: PgPool,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    failed: Arc<AtomicBool>,
}

/// How long shutdown waits for in-flight work (a batch, an email, HTTP connections) before
/// giving up on draining. A client that stops reading its SSE stream would otherwise hold
/// the server open forever.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

impl Running {
    /// Graceful shutdown: stop consuming, finish and acknowledge in-flight work, drain HTTP.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        self.wait().await;
        self.pool.close().await;
    }

    /// The token that stops everything (for signal handlers).
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Waits until every task has stopped after the token fired, at most [`DRAIN_TIMEOUT`]
    /// after it fired.
    pub async fn wait(&self) {
        self.tasks.close();
        let deadline = async {
            self.shutdown.cancelled().await;
            tokio::time::sleep(DRAIN_TIMEOUT).await;
        };
        tokio::select! {
            _ = self.tasks.wait() => {}
            _ = deadline => tracing::warn!(timeout = ?DRAIN_TIMEOUT, "drain timed out; stopping anyway"),
        }
    }

    /// Did a part of the engine stop on its own (a bug)? The process should exit non-zero.
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::Relaxed)
    }
}

/// How long start-up waits for PostgreSQL before giving up.
const DATABASE_WAIT: Duration = Duration::from_secs(60);

pub async fn start(config: Config) -> Result<Running, StartError> {
    let metrics = Metrics::new();
    let pool = store::connect(&config.database)?;
    wait_for_database(&pool, config.database.migrate).await?;

    let plugins = Arc::new(PluginHost::new(
        config.plugins.clone(),
        config.tenants.clone(),
    )?);
    for line in plugins.load_dir().await? {
        tracing::debug!("plugin {line}");
    }
    let templates =
        Templates::load(&config.email.templates_dir).map_err(|error| StartError::Templates {
            dir: config.email.templates_dir.display().to_string(),
            error,
        })?;
    for problem in templates.problems() {
        tracing::error!(problem = %problem, "email template not loaded");
    }
    let from: lettre::message::Mailbox = config
        .smtp
        .from
        .parse()
        .map_err(delivery::DeliveryError::From)?;
    let message_id_domain = from.email.domain().to_owned();

    let ingest = Arc::new(Ingest::connect(&config.kafka)?);
    let hub = Hub::new();
    let email_wake = Arc::new(Notify::new());
    let shutdown = CancellationToken::new();
    let tasks = TaskTracker::new();

    let pipeline = Pipeline {
        ingest,
        pool: pool.clone(),
        plugins,
        hub: hub.clone(),
        metrics: metrics.clone(),
        email_wake: email_wake.clone(),
        kafka: config.kafka.clone(),
        message_id_domain,
    };
    let failed = Arc::new(AtomicBool::new(false));
    tasks.spawn(critical(
        "pipeline",
        pipeline.run(shutdown.clone()),
        shutdown.clone(),
        failed.clone(),
    ));

    let worker = EmailWorker {
        pool: pool.clone(),
        templates: Arc::new(ArcSwap::from_pointee(templates)),
        transport: delivery::transport(&config.smtp)?,
        from,
        config: config.email.clone(),
        metrics: metrics.clone(),
        wake: email_wake,
    };
    tasks.spawn(critical(
        "email worker",
        worker.run(shutdown.clone()),
        shutdown.clone(),
        failed.clone(),
    ));

    let kafka_ready = Arc::new(AtomicBool::new(false));
    tasks.spawn(probe_kafka(
        config.kafka.clone(),
        kafka_ready.clone(),
        shutdown.clone(),
    ));

    let state = AppState {
        pool: pool.clone(),
        hub: hub.clone(),
        metrics: metrics.clone(),
        auth: Arc::new(Auth::new(&config.auth)),
        sse: config.sse.clone(),
        kafka_ready,
        shutdown: shutdown.clone(),
    };
    let listener = tokio::net::TcpListener::bind(config.http.listen)
        .await
        .map_err(|error| StartError::Bind {
            addr: config.http.listen,
            error,
        })?;
    let http_addr = listener.local_addr().map_err(|error| StartError::Bind {
        addr: config.http.listen,
        error,
    })?;
    let app = api::router(state).layer(tower_http::trace::TraceLayer::new_for_http());
    let stop = shutdown.clone();
    tasks.spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "http server failed");
        }
        tracing::info!("http server stopped");
    });
    tracing::info!(http = %http_addr, topics = ?config.kafka.topics, group = %config.kafka.group_id, "engine started");

    Ok(Running {
        http_addr,
        metrics,
        hub,
        pool,
        shutdown,
        tasks,
        failed,
    })
}

/// Runs a task that must live as long as the engine. If it ends before shutdown (a panic,
/// a bug), the whole engine stops and reports failure, rather than staying "ready" while
/// nothing is consumed or sent: the orchestrator restarts it, and nothing is lost.
async fn critical(
    name: &'static str,
    task: impl std::future::Future<Output = ()>,
    shutdown: CancellationToken,
    failed: Arc<AtomicBool>,
) {
    let outcome = std::panic::AssertUnwindSafe(task).catch_unwind().await;
    if shutdown.is_cancelled() && outcome.is_ok() {
        return;
    }
    tracing::error!(
        task = name,
        panicked = outcome.is_err(),
        "task stopped unexpectedly; shutting down"
    );
    failed.store(true, Ordering::Relaxed);
    shutdown.cancel();
}

/// Waits until PostgreSQL answers (it may start after us, e.g. under docker compose), then
/// applies the migrations if configured to.
async fn wait_for_database(pool: &PgPool, migrate: bool) -> Result<(), StartError> {
    let deadline = tokio::time::Instant::now() + DATABASE_WAIT;
    while let Err(e) = sqlx::query("SELECT 1").execute(pool).await {
        if tokio::time::Instant::now() >= deadline {
            return Err(StartError::DatabaseUnreachable(DATABASE_WAIT, e.into()));
        }
        tracing::warn!(error = %e, "waiting for PostgreSQL");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    if migrate {
        store::migrate(pool).await?;
    }
    Ok(())
}

async fn probe_kafka(
    config: crate::config::KafkaConfig,
    ready: Arc<AtomicBool>,
    shutdown: CancellationToken,
) {
    loop {
        let ok = ingest::probe(&config).await;
        if ready.swap(ok, Ordering::Relaxed) != ok {
            tracing::info!(reachable = ok, "kafka readiness changed");
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(if ok { 10 } else { 2 })) => {}
        }
    }
}
