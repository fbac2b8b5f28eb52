//! Logs and metrics.
//!
//! Metric names are part of the operator contract (dashboards and alerts depend on them):
//! rename only with a deprecation period. Each metric is registered in a private registry
//! rather than the global one, so several engines in one process (tests) do not collide.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Installs the global `tracing` subscriber. `RUST_LOG` wins over the configured filter.
pub fn init_logging(config: &LogConfig) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(config.filter.clone()));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second call (tests start several engines) keeps the first subscriber.
    let _ = match config.format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// Every metric the engine exports.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Kafka messages taken from the consumer, by topic.
    pub events_consumed: IntCounterVec,
    /// Events skipped because `(tenant, event id)` was already processed.
    pub events_duplicate: IntCounter,
    /// Events (or undecodable messages) written to the dead-letter table, by kind.
    pub events_dead_lettered: IntCounterVec,
    /// In-app notifications and live updates written.
    pub notifications_written: IntCounter,
    /// Email outbox rows written.
    pub emails_enqueued: IntCounter,
    /// Emails accepted by the SMTP server.
    pub emails_sent: IntCounter,
    /// Emails that failed for good.
    pub emails_failed: IntCounter,
    /// Email attempts that failed transiently and will be retried.
    pub emails_retried: IntCounter,
    /// Emails recorded but not sent: their event was older than `email.max_event_age_secs`,
    /// or a field its data gave them is invalid (the recipient is not an address, ...).
    pub emails_skipped: IntCounter,
    /// Claimed emails put back because their tenant's send rate was spent.
    pub emails_rate_limited: IntCounter,
    /// Batches that could not be committed because of the database or the platform
    /// (not the data); the pipeline waits and retries them.
    pub pipeline_stalls: IntCounterVec,
    /// Messages on the engine's NOTIFY channels acted on in no way, by channel and reason
    /// (`malformed`, `signature`, `stale`, `replayed`, `invalid`, `unknown_instance`): another
    /// database role speaking on them, or an instance with another `cluster.secret`.
    pub cluster_messages_refused: IntCounterVec,
    /// Times a tenant's lane paused because it had spent its routing-time budget.
    pub tenant_budget_pauses: IntCounter,
    /// Times a Kafka partition was paused because a tenant lane it feeds was full, and its
    /// tenant's spill too (or spilling is off).
    pub partition_pauses: IntCounter,
    /// Tenant lanes alive (at most `kafka.max_lanes`).
    pub pipeline_lanes: IntGauge,
    /// Lanes freed: idle for `kafka.lane_idle_ms`, or idle when a new tenant needed room.
    pub lanes_reaped: IntCounter,
    /// Messages set aside in the spill because their tenant's lane was full (or its earlier
    /// messages were already spilled).
    pub events_spilled: IntCounter,
    /// Messages waiting in the spill, by tenant (see [`Metrics::tenant_label`]), as this
    /// instance counts them: what it spilled or found at start, less what it drained.
    pub spilled_messages: IntGaugeVec,
    /// Plugin files handled by hot reload, by outcome (`loaded`, `rejected`, `broken`,
    /// `pending`, `removed`).
    pub plugin_reloads: IntCounterVec,
    /// Template directory reloads, by outcome (`loaded`, `rejected`, `failed`, `pending`: held
    /// back while a template file is still open for writing).
    pub template_reloads: IntCounterVec,
    /// Open SSE connections.
    pub sse_connections: IntGauge,
    /// Idle warm plugin instances, set when metrics are scraped.
    pub plugin_warm_instances: IntGauge,
    /// Tenants for whom a plugin version is quarantined by its breaker, by tenant (see
    /// [`Metrics::tenant_label`]) and plugin; set when metrics are scraped.
    pub plugin_quarantined: IntGaugeVec,
    /// SSE connections refused by a connection cap.
    pub sse_rejected: IntCounter,
    /// Public API requests refused (`429`) by a request limit, by limit: `user`, `tenant`
    /// and `address` (the token buckets), `tenant_pool` (the tenant's share of the API's
    /// database connections stayed busy).
    pub api_rate_limited: IntCounterVec,
    /// Rows deleted by retention, by table (`notifications`, `processed_events`,
    /// `email_outbox`, `dead_letters`, `sse_tickets`).
    pub retention_deleted: IntCounterVec,
    /// Plugin calls, by tenant (see [`Metrics::tenant_label`]), world (`routing`,
    /// `templating`) and outcome (`ok` or a `PluginError::kind`: `trap`, `timeout`,
    /// `out_of_fuel`, `invalid_output`, `invalid_event`, `invalid_data`, `refused`,
    /// `unavailable`, `quarantined`, `oversize`).
    pub plugin_calls: IntCounterVec,
    /// Duration of one routing call, instantiation included.
    pub plugin_call_seconds: Histogram,
    /// Duration of one pipeline batch transaction.
    pub batch_seconds: Histogram,
    /// Where an event's time goes between its producer and its user's stream, by stage:
    /// `kafka` (producer to engine), `queue` (waiting in its lane for its batch), `route`
    /// (the batch's duplicate check and routing), `commit` (the batch's transaction), and
    /// `stream_read` (a woken stream reading its new rows from PostgreSQL; rows its own
    /// instance just committed come from memory).
    pub stage_seconds: HistogramVec,
    /// Tenants named in the configuration: the only values the `tenant` label takes, so a
    /// stream of made-up tenant ids cannot grow the series without bound.
    known_tenants: std::sync::Arc<std::collections::BTreeSet<String>>,
}

/// The `tenant` label of every tenant not named in the configuration.
pub const OTHER_TENANTS: &str = "_other";

/// Registers each metric in the engine's registry as it is made (a duplicate name is a
/// programming error, found by the first test that builds [`Metrics`]).
struct Register<'a>(&'a Registry);

impl Register<'_> {
    fn add<M: prometheus::core::Collector + Clone + 'static>(&self, metric: M) -> M {
        self.0
            .register(Box::new(metric.clone()))
            .expect("unique metric");
        metric
    }

    fn counter(&self, name: &str, help: &str) -> IntCounter {
        self.add(IntCounter::new(name, help).expect("static metric definition"))
    }

    fn counter_vec(&self, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
        self.add(IntCounterVec::new(Opts::new(name, help), labels).expect("static metric"))
    }

    fn gauge(&self, name: &str, help: &str) -> IntGauge {
        self.add(IntGauge::new(name, help).expect("static metric"))
    }

    fn gauge_vec(&self, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
        self.add(IntGaugeVec::new(Opts::new(name, help), labels).expect("static metric"))
    }

    fn histogram(&self, name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
        self.add(
            Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
                .expect("static metric"),
        )
    }

    fn histogram_vec(
        &self,
        name: &str,
        help: &str,
        labels: &[&str],
        buckets: Vec<f64>,
    ) -> HistogramVec {
        self.add(
            HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
                .expect("static metric"),
        )
    }
}

impl Metrics {
    /// The metrics table: one entry per metric with its name, help text and labels, in the
    /// order of the fields. Declarative, and long because the table is (the names and
    /// texts are the operator contract, pinned by tests and docs).
    pub fn new() -> Self {
        let registry = Registry::new_custom(Some("notify".into()), None)
            .expect("static registry prefix is valid");
        let r = Register(&registry);
        let fast = vec![
            0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1,
            0.25, 0.5, 1.0,
        ];
        Self {
            events_consumed: r.counter_vec(
                "events_consumed_total",
                "Kafka messages consumed",
                &["topic"],
            ),
            events_duplicate: r.counter("events_duplicate_total", "Events skipped as duplicates"),
            events_dead_lettered: r.counter_vec(
                "events_dead_lettered_total",
                "Messages written to the dead-letter table",
                &["kind"],
            ),
            notifications_written: r.counter(
                "notifications_written_total",
                "In-app notifications and live updates written",
            ),
            emails_enqueued: r.counter("emails_enqueued_total", "Email outbox rows written"),
            emails_sent: r.counter("emails_sent_total", "Emails accepted by the SMTP server"),
            emails_failed: r.counter("emails_failed_total", "Emails that failed for good"),
            emails_retried: r.counter(
                "emails_retried_total",
                "Email attempts that failed transiently",
            ),
            emails_skipped: r.counter(
                "emails_skipped_total",
                "Emails recorded but not sent: their event was too old, or a field its data gave them is invalid",
            ),
            emails_rate_limited: r.counter(
                "emails_rate_limited_total",
                "Claimed emails put back because their tenant's send rate was spent",
            ),
            pipeline_stalls: r.counter_vec(
                "pipeline_stalls_total",
                "Batch attempts that failed for a reason outside the data, by cause",
                &["cause"],
            ),
            cluster_messages_refused: r.counter_vec(
                "cluster_messages_refused_total",
                "Messages on the engine's NOTIFY channels refused (unsealed, forged, replayed, invalid), by channel and reason",
                &["channel", "reason"],
            ),
            tenant_budget_pauses: r.counter(
                "tenant_budget_pauses_total",
                "Pauses of a tenant's lane that had spent its routing-time budget",
            ),
            partition_pauses: r.counter(
                "partition_pauses_total",
                "Kafka partitions paused because a tenant lane they feed was full (and its spill)",
            ),
            pipeline_lanes: r.gauge("pipeline_lanes", "Tenant lanes alive"),
            lanes_reaped: r.counter(
                "lanes_reaped_total",
                "Tenant lanes freed because they were idle",
            ),
            events_spilled: r.counter(
                "events_spilled_total",
                "Messages set aside in the spill because their tenant's lane was full",
            ),
            spilled_messages: r.gauge_vec(
                "spilled_messages",
                "Messages waiting in the spill, by tenant",
                &["tenant"],
            ),
            plugin_reloads: r.counter_vec(
                "plugin_reloads_total",
                "Plugin files handled by hot reload, by outcome",
                &["outcome"],
            ),
            template_reloads: r.counter_vec(
                "template_reloads_total",
                "Template directory reloads, by outcome",
                &["outcome"],
            ),
            sse_connections: r.gauge("sse_connections", "Open SSE connections"),
            plugin_warm_instances: r.gauge(
                "plugin_warm_instances",
                "Idle plugin instances kept warm for their tenant's next call",
            ),
            plugin_quarantined: r.gauge_vec(
                "plugin_quarantined",
                "Tenants for whom a plugin version is quarantined by its breaker, by tenant and plugin",
                &["tenant", "plugin"],
            ),
            sse_rejected: r.counter(
                "sse_rejected_total",
                "SSE connections refused by a connection cap or the deep-replay rate",
            ),
            api_rate_limited: {
                let limited = r.counter_vec(
                    "api_rate_limited_total",
                    "Public API requests refused by a request limit, by limit",
                    &["limit"],
                );
                // Every series from the start, so an alert on its rate sees zero first.
                for limit in ["user", "tenant", "address", "tenant_pool"] {
                    limited.with_label_values(&[limit]);
                }
                limited
            },
            retention_deleted: r.counter_vec(
                "retention_deleted_total",
                "Rows deleted by retention, by table",
                &["table"],
            ),
            plugin_calls: r.counter_vec(
                "plugin_calls_total",
                "Plugin calls by tenant, world and outcome",
                &["tenant", "world", "outcome"],
            ),
            plugin_call_seconds: r.histogram(
                "plugin_call_seconds",
                "Duration of one routing plugin call",
                fast.clone(),
            ),
            batch_seconds: r.histogram(
                "pipeline_batch_seconds",
                "Duration of one pipeline transaction (the batches of one or more tenant lanes)",
                fast.clone(),
            ),
            stage_seconds: r.histogram_vec(
                "stage_seconds",
                "Time an event spends in each stage from its producer to its user's stream",
                &["stage"],
                fast,
            ),
            known_tenants: Default::default(),
            registry,
        }
    }

    /// The same metrics, labelling these tenants by name (the configuration's tenants);
    /// every other tenant is [`OTHER_TENANTS`].
    pub fn with_known_tenants(mut self, tenants: impl IntoIterator<Item = String>) -> Self {
        self.known_tenants = std::sync::Arc::new(tenants.into_iter().collect());
        self
    }

    /// The value of the `tenant` label for `tenant`.
    pub fn tenant_label<'a>(&self, tenant: &'a str) -> &'a str {
        if self.known_tenants.contains(tenant) {
            tenant
        } else {
            OTHER_TENANTS
        }
    }

    /// Counts one plugin call.
    pub fn plugin_call(&self, tenant: &str, world: &str, outcome: &str) {
        self.plugin_calls
            .with_label_values(&[self.tenant_label(tenant), world, outcome])
            .inc();
    }

    /// The histogram of one stage of `notify_stage_seconds`.
    pub fn stage(&self, stage: &'static str) -> Histogram {
        self.stage_seconds.with_label_values(&[stage])
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("encoding metrics into a Vec cannot fail");
        String::from_utf8(out).expect("Prometheus text format is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
