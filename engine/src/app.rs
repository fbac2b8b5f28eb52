//! Wiring and the shutdown story.
//!
//! [`start`] builds every part from one [`Config`] and spawns the long-running tasks onto
//! one `TaskTracker`, all watching one `CancellationToken`:
//!
//! - the pipeline (Kafka → plugin → PostgreSQL), which finishes its batch in hand, stores
//!   the offsets of everything committed, and commits them synchronously;
//! - the email worker, which finishes the email in hand;
//! - the public HTTP server (SSE), which stops accepting, ends open streams and drains, and
//!   the operator listener (health, readiness, metrics);
//! - the readiness probes (PostgreSQL, Kafka, the plugin set).
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
use crate::cluster::Presence;
use crate::config::Config;
use crate::delivery::{self, EmailWorker};
use crate::health::Health;
use crate::hub::Hub;
use crate::ingest::{self, Ingest};
use crate::pipeline::Pipeline;
use crate::plugin::PluginHost;
use crate::store;
use crate::telemetry::Metrics;
use crate::templates::Templates;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error("PostgreSQL not reachable after {0:?}")]
    DatabaseUnreachable(Duration, #[source] store::StoreError),
    #[error(transparent)]
    Plugin(#[from] crate::plugin::LoadError),
    #[error("templates in {dir}: {error}")]
    Templates { dir: String, error: std::io::Error },
    #[error(transparent)]
    Ingest(#[from] ingest::IngestError),
    #[error(transparent)]
    Delivery(#[from] delivery::DeliveryError),
    #[error(transparent)]
    Watch(#[from] crate::watch::WatchError),
    #[error(
        "the public API cannot act as its database role notify_api_<database oid> (created by \
         the migrations; the engine's database user needs CREATEROLE once, or a DBA creates \
         the role and grants it to that user)"
    )]
    ApiRole(#[source] store::StoreError),
    #[error("verification keys: {0}")]
    Keys(#[from] crate::api::auth::keys::KeyError),
    #[error("binding {addr}: {error}")]
    Bind {
        addr: SocketAddr,
        error: std::io::Error,
    },
}

/// A started engine.
pub struct Running {
    /// The public API (SSE).
    pub http_addr: SocketAddr,
    /// Health, readiness, metrics.
    pub admin_addr: SocketAddr,
    pub health: Arc<Health>,
    pub metrics: Metrics,
    pub hub: Arc<Hub>,
    /// This instance's identity and view of the cluster's presence.
    pub presence: Arc<Presence>,
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
    let metrics = Metrics::new().with_known_tenants(
        config
            .tenants
            .keys()
            .chain(&config.kafka.allowed_tenants)
            .cloned(),
    );
    let pool = store::connect(&config.database, config.database.max_connections)?;
    let api_pool = store::connect_api(&config.database, config.database.api_max_connections)?;
    // Before anything starts: a missing or broken key file is a start-up error.
    let auth = Arc::new(Auth::new(&config)?);
    wait_for_database(&pool, config.database.migrate).await?;
    // The API's connections switch to their role as they connect: fail now, clearly, rather
    // than answer every request with 500.
    store::ping_api(&api_pool)
        .await
        .map_err(StartError::ApiRole)?;
    let health = Arc::new(Health::default());

    let hub = Hub::new();
    let presence = Presence::new(hub.clone(), config.presence.clone());
    let plugins = Arc::new(
        PluginHost::new(config.plugins.clone(), config.tenants.clone())?
            .with_presence(presence.clone()),
    );
    plugins.load_dir().await?;
    health.set_plugins(plugins.health());
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
    let email_wake = Arc::new(Notify::new());
    let shutdown = CancellationToken::new();
    let tasks = TaskTracker::new();

    let pipeline = Pipeline {
        ingest,
        pool: pool.clone(),
        plugins: plugins.clone(),
        hub: hub.clone(),
        presence: presence.clone(),
        metrics: metrics.clone(),
        health: health.clone(),
        email_wake: email_wake.clone(),
        kafka: config.kafka.clone(),
        email: config.email.clone(),
        message_id_domain,
    };
    let failed = Arc::new(AtomicBool::new(false));
    tasks.spawn(critical(
        "pipeline",
        pipeline.run(shutdown.clone()),
        shutdown.clone(),
        failed.clone(),
    ));

    let templates = Arc::new(ArcSwap::from_pointee(templates));
    let reload = crate::watch::watch(
        crate::watch::Reloadable {
            plugins: plugins.clone(),
            plugin_dir: config.plugins.dir.clone(),
            templates: templates.clone(),
            templates_dir: config.email.templates_dir.clone(),
            metrics: metrics.clone(),
            health: health.clone(),
        },
        shutdown.clone(),
    )?;
    tasks.spawn(reload);

    let worker = EmailWorker {
        pool: pool.clone(),
        templates,
        transport: delivery::transport(&config.smtp, config.email.concurrency)?,
        from,
        config: config.email.clone(),
        tenants: config.tenants.clone(),
        metrics: metrics.clone(),
        wake: email_wake,
        plugins: plugins.clone(),
    };
    tasks.spawn(critical(
        "email worker",
        worker.run(shutdown.clone()),
        shutdown.clone(),
        failed.clone(),
    ));

    tasks.spawn(probe(
        Probes {
            pool: pool.clone(),
            kafka: config.kafka.clone(),
            plugins: plugins.clone(),
            health: health.clone(),
        },
        shutdown.clone(),
    ));

    tasks.spawn(crate::cluster::listen(
        hub.clone(),
        presence.clone(),
        pool.clone(),
        shutdown.clone(),
    ));
    tasks.spawn(presence.clone().run(pool.clone(), shutdown.clone()));

    tasks.spawn(
        crate::retention::Retention {
            pool: pool.clone(),
            config: config.retention.clone(),
            metrics: metrics.clone(),
        }
        .run(shutdown.clone()),
    );

    tasks.spawn(
        auth.clone()
            .reload_keys(Arc::new(config.clone()), shutdown.clone()),
    );
    let state = AppState {
        pool: api_pool,
        hub: hub.clone(),
        metrics: metrics.clone(),
        auth,
        sse: config.sse.clone(),
        health: health.clone(),
        plugins: plugins.clone(),
        engine_pool: pool.clone(),
        presence: presence.clone(),
        cors_origins: config.http.cors_origins.clone().into(),
        ticket_ttl_secs: config.auth.ticket_ttl_secs,
        shutdown: shutdown.clone(),
    };
    let trace = tower_http::trace::TraceLayer::new_for_http().make_span_with(api::request_span);
    let http_addr = spawn_server(
        &tasks,
        config.http.listen,
        api::router(state.clone()).layer(trace.clone()),
        &config.http,
        shutdown.clone(),
    )
    .await?;
    let admin_addr = spawn_server(
        &tasks,
        config.http.admin_listen,
        api::admin_router(state).layer(trace),
        &config.http,
        shutdown.clone(),
    )
    .await?;
    tracing::info!(http = %http_addr, admin = %admin_addr, topics = ?config.kafka.topics, group = %config.kafka.group_id, "engine started");

    Ok(Running {
        http_addr,
        admin_addr,
        health,
        metrics,
        hub,
        presence,
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
    while let Err(e) = store::reachable(pool).await {
        if tokio::time::Instant::now() >= deadline {
            return Err(StartError::DatabaseUnreachable(DATABASE_WAIT, e));
        }
        tracing::warn!(error = %e.with_cause(), "waiting for PostgreSQL");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    if migrate {
        store::migrate(pool).await?;
    }
    Ok(())
}

/// Binds `addr` and serves `app` there until shutdown; returns the bound address.
async fn spawn_server(
    tasks: &TaskTracker,
    addr: SocketAddr,
    app: axum::Router,
    limits: &crate::config::HttpConfig,
    shutdown: CancellationToken,
) -> Result<SocketAddr, StartError> {
    let bind_error = |error| StartError::Bind { addr, error };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(bind_error)?;
    let bound = listener.local_addr().map_err(bind_error)?;
    let limits = limits.clone();
    tasks.spawn(async move {
        api::serve::serve(listener, app, &limits, shutdown).await;
        tracing::info!(addr = %bound, "http server stopped");
    });
    Ok(bound)
}

/// What the background readiness probe looks at.
struct Probes {
    pool: PgPool,
    kafka: crate::config::KafkaConfig,
    plugins: Arc<PluginHost>,
    health: Arc<Health>,
}

/// Keeps [`Health`] current: PostgreSQL every 2 s, Kafka every 10 s while reachable (2 s
/// while not), the plugin set each round.
async fn probe(probes: Probes, shutdown: CancellationToken) {
    let mut kafka_due = tokio::time::Instant::now();
    loop {
        let postgres = store::ping(&probes.pool).await;
        if probes.health.set_postgres(postgres) {
            tracing::info!(reachable = postgres, "postgres readiness changed");
        }
        if tokio::time::Instant::now() >= kafka_due {
            let ok = ingest::probe(&probes.kafka).await;
            if probes.health.set_kafka(ok) {
                tracing::info!(reachable = ok, "kafka readiness changed");
            }
            kafka_due = tokio::time::Instant::now() + Duration::from_secs(if ok { 10 } else { 2 });
        }
        probes.health.set_plugins(probes.plugins.health());
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
}
