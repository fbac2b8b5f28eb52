//! # notify-engine
//!
//! Turns business events from Kafka into notifications: in-app over Server-Sent Events and
//! email over SMTP, routed per tenant by sandboxed WebAssembly plugins.
//!
//! The module tree follows one event's way through the engine:
//!
//! ```text
//! ingest ──► pipeline ──► store (PostgreSQL: processed_events, notifications, email_outbox, dead_letters)
//!  (Kafka)      │  └── plugin (wasmtime: the tenant's routing component)
//!               └──► hub ──► api::sse (browsers)          delivery (outbox ──► templates ──► SMTP)
//! ```
//!
//! - [`model`]: the ground floor: the nouns every stage shares (the event, the stored
//!   notification, SSE event names, identifier rules); it imports no other engine module.
//! - [`config`]: typed configuration, defaults → file → environment, validated once, per section.
//! - [`ingest`]: the only module that touches rdkafka; decodes and validates envelopes.
//! - [`pipeline`]: the orchestrator: tenant lanes route outside any transaction, committers
//!   commit groups of batches, offsets are stored after COMMIT.
//! - [`plugin`]: the only module that touches wasmtime; the routing and templating sandbox,
//!   one file per WIT version.
//! - [`store`]: the only module that holds SQL (clippy enforces it), a file per table family.
//! - [`hub`]: which (tenant, user) has something new; wakes their SSE streams.
//! - [`cluster`]: what the instances tell each other through PostgreSQL: wake-ups for
//!   every instance's streams, and presence (who has a stream open where).
//! - [`delivery`]: the email worker (outbox → templates → lettre).
//! - [`templates`]: the tenants' Handlebars files, their checks and hot reload; used by the
//!   email worker (and the templating plugins' `templates.render`), so neither depends on the other.
//! - [`api`]: HTTP: the inbox API, stream tickets and SSE on the public listener; health,
//!   readiness, metrics and the admin API on the operator listener; JWT auth by key.
//! - [`retention`]: deletes old notifications, duplicate-filter keys and stale tickets.
//! - [`health`]: what readiness reports, kept current in the background.
//! - [`telemetry`]: logs and Prometheus metrics.
//! - [`watch`]: hot reload of plugins and templates (the only module using notify).
//! - [`tools`]: the operator subcommands the CLI dispatches to.
//! - [`app`]: wires everything together and owns the shutdown story.
//!
//! See `ARCHITECTURE.md` at the repository root for the invariants these modules keep.

pub mod api;
pub mod app;
pub mod cluster;
pub mod config;
pub mod delivery;
pub mod health;
pub mod hub;
pub mod ingest;
pub mod model;
pub mod pipeline;
pub mod plugin;
pub mod retention;
pub mod store;
pub mod telemetry;
pub mod templates;
pub mod tools;
pub mod watch;
