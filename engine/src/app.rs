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
use lettre::message::Mailbox;
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

/// Builds every part from `config` and starts it, in the order the parts depend on each
/// other: the store (and the key files), the plugin host, the templates and the sender, the
/// Kafka consumer; then the tasks (pipeline, reloads, email worker, housekeeping) and last
/// the listeners, so the engine answers only once everything behind it runs.
pub async fn start(config: Config) -> Result<Running, StartError> {
    let metrics = metrics_for(&config);
    let (pool, api_pool, auth) = open_store(&config).await?;
    let health = Arc::new(Health::default());
    // `open_store` has just reached PostgreSQL through both pools: ready from the first
    // request, not from the first background probe.
    health.set_postgres(true);
    let hub = Hub::sealed(config.cluster.secret.as_deref());
    if !hub.seal().is_shared() {
        tracing::info!(
            "cluster.secret is not set: this instance seals its NOTIFYs with a key of its own \
             and hears no other instance; set the same secret (NOTIFY_CLUSTER__SECRET) on every \
             instance to run more than one"
        );
    }
    let presence = Presence::new(hub.clone(), config.presence.clone());
    let plugins = load_plugins(&config, &presence, &health).await?;
    let templates = load_templates(&config)?;
    let from = sender(&config)?;
    let ingest = Arc::new(Ingest::connect(&config.kafka)?);
    let engine = Engine {
        config: &config,
        pool,
        metrics,
        health,
        hub,
        presence,
        plugins,
        shutdown: CancellationToken::new(),
        tasks: TaskTracker::new(),
        failed: Arc::new(AtomicBool::new(false)),
    };
    let email_wake = Arc::new(Notify::new());
    engine.start_pipeline(ingest, email_wake.clone(), &from);
    let templates = engine.start_reloads(templates)?;
    engine.start_email(templates, from, email_wake)?;
    engine.start_housekeeping();
    let (http_addr, admin_addr) = engine.start_api(api_pool, auth).await?;
    tracing::info!(http = %http_addr, admin = %admin_addr, topics = ?config.kafka.topics, group = %config.kafka.group_id, "engine started");
    Ok(engine.running(http_addr, admin_addr))
}

/// The metrics, with every tenant the configuration names known from the start (their
/// series exist before their first event).
fn metrics_for(config: &Config) -> Metrics {
    Metrics::new().with_known_tenants(
        config
            .tenants
            .keys()
            .chain(&config.kafka.allowed_tenants)
            .cloned(),
    )
}

/// The engine's pool and the public API's, both answering (and migrated, if configured),
/// and the verification keys.
async fn open_store(config: &Config) -> Result<(PgPool, PgPool, Arc<Auth>), StartError> {
    let pool = store::connect(&config.database, config.database.max_connections)?;
    let api_pool = store::connect_api(&config.database, config.database.api_max_connections)?;
    // Before anything starts: a missing or broken key file is a start-up error.
    let auth = Arc::new(Auth::new(config)?);
    wait_for_database(&pool, config.database.migrate).await?;
    // The API's connections switch to their role as they connect: fail now, clearly, rather
    // than answer every request with 500.
    store::ping_api(&api_pool)
        .await
        .map_err(StartError::ApiRole)?;
    Ok((pool, api_pool, auth))
}

/// The plugin host with every plugin in `plugins.dir` loaded, its health reported.
async fn load_plugins(
    config: &Config,
    presence: &Arc<Presence>,
    health: &Health,
) -> Result<Arc<PluginHost>, StartError> {
    let plugins = Arc::new(
        PluginHost::new(config.plugins.clone(), config.tenants.clone())?
            .with_presence(presence.clone()),
    );
    plugins.load_dir().await?;
    health.set_plugins(plugins.health());
    Ok(plugins)
}

/// The email templates; a template that does not load is logged, not fatal (its emails
/// fail, the others go out).
fn load_templates(config: &Config) -> Result<Templates, StartError> {
    let templates =
        Templates::load(&config.email.templates_dir).map_err(|error| StartError::Templates {
            dir: config.email.templates_dir.display().to_string(),
            error,
        })?;
    for problem in templates.problems() {
        tracing::error!(problem = %problem, "email template not loaded");
    }
    Ok(templates)
}

/// The `From:` of every email (its domain also names the `Message-ID`s).
fn sender(config: &Config) -> Result<lettre::message::Mailbox, StartError> {
    Ok(config
        .smtp
        .from
        .parse()
        .map_err(delivery::DeliveryError::From)?)
}

/// What every part is built from: the handles they share, and where their tasks run.
struct Engine<'a> {
    config: &'a Config,
    pool: PgPool,
    metrics: Metrics,
    health: Arc<Health>,
    hub: Arc<Hub>,
    presence: Arc<Presence>,
    plugins: Arc<PluginHost>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    failed: Arc<AtomicBool>,
}

impl Engine<'_> {
    /// Spawns a task the engine cannot live without (see [`critical`]).
    fn spawn_critical(&self, name: &'static str, task: impl Future<Output = ()> + Send + 'static) {
        self.tasks.spawn(critical(
            name,
            task,
            self.shutdown.clone(),
            self.failed.clone(),
        ));
    }

    /// Kafka → plugin → PostgreSQL.
    fn start_pipeline(&self, ingest: Arc<Ingest>, email_wake: Arc<Notify>, from: &Mailbox) {
        let config = self.config;
        let pipeline = Pipeline {
            ingest,
            pool: self.pool.clone(),
            plugins: self.plugins.clone(),
            hub: self.hub.clone(),
            presence: self.presence.clone(),
            metrics: self.metrics.clone(),
            health: self.health.clone(),
            email_wake,
            kafka: config.kafka.clone(),
            email: config.email.clone(),
            message_id_domain: from.email.domain().to_owned(),
        };
        self.spawn_critical("pipeline", pipeline.run(self.shutdown.clone()));
    }

    /// The watcher that reloads plugins and templates when their files change; returns the
    /// templates as the email worker reads them (swapped on reload).
    fn start_reloads(&self, templates: Templates) -> Result<Arc<ArcSwap<Templates>>, StartError> {
        let templates = Arc::new(ArcSwap::from_pointee(templates));
        let reload = crate::watch::watch(
            crate::watch::Reloadable {
                plugins: self.plugins.clone(),
                plugin_dir: self.config.plugins.dir.clone(),
                templates: templates.clone(),
                templates_dir: self.config.email.templates_dir.clone(),
                metrics: self.metrics.clone(),
                health: self.health.clone(),
            },
            self.shutdown.clone(),
        )?;
        self.tasks.spawn(reload);
        Ok(templates)
    }

    /// The outbox's email worker.
    fn start_email(
        &self,
        templates: Arc<ArcSwap<Templates>>,
        from: Mailbox,
        wake: Arc<Notify>,
    ) -> Result<(), StartError> {
        let config = self.config;
        let worker = EmailWorker {
            pool: self.pool.clone(),
            templates,
            transport: delivery::transport(&config.smtp, config.email.concurrency)?,
            from,
            config: config.email.clone(),
            tenants: config.tenants.clone(),
            metrics: self.metrics.clone(),
            wake,
            plugins: self.plugins.clone(),
            health: self.health.clone(),
        };
        self.spawn_critical("email worker", worker.run(self.shutdown.clone()));
        Ok(())
    }

    /// The readiness probes, the cluster's notifications and presence, and the purge of
    /// old rows.
    fn start_housekeeping(&self) {
        let (pool, shutdown) = (&self.pool, &self.shutdown);
        self.tasks.spawn(probe(
            Probes {
                pool: pool.clone(),
                kafka: self.config.kafka.clone(),
                plugins: self.plugins.clone(),
                health: self.health.clone(),
            },
            shutdown.clone(),
        ));
        self.tasks.spawn(crate::cluster::listen(
            self.hub.clone(),
            self.presence.clone(),
            pool.clone(),
            self.metrics.clone(),
            shutdown.clone(),
        ));
        self.tasks
            .spawn(self.presence.clone().run(pool.clone(), shutdown.clone()));
        self.tasks.spawn(
            crate::retention::Retention {
                pool: pool.clone(),
                config: self.config.retention.clone(),
                metrics: self.metrics.clone(),
            }
            .run(shutdown.clone()),
        );
    }

    /// The key files' reloads, then the public and the operator listeners; returns their
    /// bound addresses.
    async fn start_api(
        &self,
        api_pool: PgPool,
        auth: Arc<Auth>,
    ) -> Result<(SocketAddr, SocketAddr), StartError> {
        let config = self.config;
        self.tasks.spawn(
            auth.clone()
                .reload_keys(Arc::new(config.clone()), self.shutdown.clone()),
        );
        // Sign-outs written by any instance, read as often as the key files.
        self.tasks.spawn(auth.clone().watch_revocations(
            self.pool.clone(),
            std::time::Duration::from_millis(config.auth.jwks_reload_ms),
            self.shutdown.clone(),
        ));
        let state = AppState {
            pool: api_pool,
            hub: self.hub.clone(),
            metrics: self.metrics.clone(),
            auth,
            sse: config.sse.clone(),
            health: self.health.clone(),
            plugins: self.plugins.clone(),
            engine_pool: self.pool.clone(),
            presence: self.presence.clone(),
            cors_origins: config.http.cors_origins.clone().into(),
            ticket_ttl_secs: config.auth.ticket_ttl_secs,
            limits: Arc::new(api::limits::Limits::new(
                &config.limits,
                config.database.api_max_connections,
                self.metrics.api_rate_limited.clone(),
            )),
            shutdown: self.shutdown.clone(),
        };
        let trace = tower_http::trace::TraceLayer::new_for_http().make_span_with(api::request_span);
        let public = api::router(state.clone()).layer(trace.clone());
        let http_addr = self.spawn_server(config.http.listen, public).await?;
        let admin = api::admin_router(state).layer(trace);
        let admin_addr = self.spawn_server(config.http.admin_listen, admin).await?;
        Ok((http_addr, admin_addr))
    }

    /// [`spawn_server`] on the engine's tasks, limits and shutdown.
    async fn spawn_server(
        &self,
        addr: SocketAddr,
        app: axum::Router,
    ) -> Result<SocketAddr, StartError> {
        spawn_server(
            &self.tasks,
            addr,
            app,
            &self.config.http,
            self.shutdown.clone(),
        )
        .await
    }

    /// The handle [`start`] returns.
    fn running(self, http_addr: SocketAddr, admin_addr: SocketAddr) -> Running {
        Running {
            http_addr,
            admin_addr,
            health: self.health,
            metrics: self.metrics,
            hub: self.hub,
            presence: self.presence,
            pool: self.pool,
            shutdown: self.shutdown,
            tasks: self.tasks,
            failed: self.failed,
        }
    }
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
    let listener = api::serve::bind(addr).map_err(bind_error)?;
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
