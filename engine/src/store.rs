//! PostgreSQL: the only module that holds SQL.
//!
//! This file keeps the pool (connecting, pinging, migrating), the [`scoped`] transaction and
//! the error; each table family has a file of its own: [`claims`] (`processed_events`),
//! [`notifications`] (`notifications`, `user_streams`), [`outbox`] (`email_outbox`),
//! [`dead_letters`] (and their replays), [`wake`] (LISTEN/NOTIFY between instances),
//! [`inbox`], [`presence`], [`retention`], [`revocations`] (signed-out users), [`spill`] (a
//! slow tenant's messages set aside) and [`tickets`].
//!
//! Functions that belong to an event's outcome take a `&mut PgConnection` so the caller (the
//! pipeline) owns the transaction; read paths take the pool.
//!
//! The public API reads and writes through [`connect_api`]'s pool, whose connections act as
//! the database's `notify_api_<oid>` role: row-level security then lets each of its transactions see only
//! the rows of the (tenant, user) that [`scoped`] named (migration `20261128000001`).

// The one module allowed to build statements: `engine/clippy.toml` disallows sqlx's query
// functions everywhere else, so "only `store` holds SQL" cannot silently break.
#![allow(clippy::disallowed_methods)]

pub mod claims;
pub mod dead_letters;
pub mod inbox;
pub mod notifications;
pub mod outbox;
pub mod presence;
pub mod retention;
pub mod revocations;
pub mod spill;
pub mod tickets;
pub mod wake;

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Executor, PgPool, Postgres, Transaction};

use crate::config::DatabaseConfig;

/// What went wrong talking to PostgreSQL. The message says which side failed; the cause
/// (sqlx's error) is the `source`, so a printer of the whole chain shows it once.
/// [`StoreError::with_cause`] is the one line a log or a stored reason wants.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A connection, the pool or a statement failed.
    #[error("database")]
    Sqlx(#[from] sqlx::Error),
    /// COMMIT itself failed. Nothing the statements wrote was refused (they ran): what
    /// fails here is the database's state, e.g. PostgreSQL's NOTIFY queue full (54000,
    /// "too many notifications in the NOTIFY queue", raised at COMMIT while a listener
    /// idles in a transaction), a serialization failure, a lost connection. Never a data
    /// error, whatever its SQLSTATE.
    #[error("database commit")]
    Commit(#[source] sqlx::Error),
    #[error("database migration")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

impl StoreError {
    /// Is this error about the data being written, so that the same statement would fail
    /// again on a healthy database? Only such an error may dead-letter a message.
    ///
    /// Class 22 (data exception: an invalid byte sequence, a value out of range, an
    /// untranslatable character) and 54000 (program limit exceeded: a value too large to
    /// index) raised by a statement follow from the values alone. Everything else
    /// (connection trouble, lock and statement timeouts, a read-only transaction during
    /// failover, a revoked privilege, a relation missing mid-migration, a unique conflict
    /// on a sequence, and whatever fails at COMMIT, [`StoreError::Commit`], such as a full
    /// NOTIFY queue's 54000) is about the database or the engine, and the batch waits for
    /// it instead.
    pub fn is_data_error(&self) -> bool {
        match self {
            StoreError::Sqlx(sqlx::Error::Database(db)) => db
                .code()
                .is_some_and(|code| code.starts_with("22") || code == "54000"),
            // A value the driver could not encode (it never reached the server).
            StoreError::Sqlx(sqlx::Error::Encode(_)) => true,
            StoreError::Sqlx(_) | StoreError::Commit(_) | StoreError::Migrate(_) => false,
        }
    }

    /// Was every connection of the pool busy until the acquire timed out? Nothing is wrong
    /// with the database: the caller may ask again in a moment (the API answers 503).
    pub fn is_pool_busy(&self) -> bool {
        matches!(self, StoreError::Sqlx(sqlx::Error::PoolTimedOut))
    }

    /// This error and its immediate cause on one line, `database: <what sqlx said>`, for a
    /// log line or a stored reason (the message alone names only the side that failed).
    pub fn with_cause(&self) -> impl std::fmt::Display + '_ {
        struct WithCause<'a>(&'a StoreError);
        impl std::fmt::Display for WithCause<'_> {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                match self.0 {
                    StoreError::Sqlx(cause) | StoreError::Commit(cause) => {
                        write!(f, "{}: {cause}", self.0)
                    }
                    StoreError::Migrate(cause) => write!(f, "{}: {cause}", self.0),
                }
            }
        }
        WithCause(self)
    }
}

/// A pool of at most `max_connections`, connecting lazily: the engine starts (and reports
/// not ready) while PostgreSQL is down.
///
/// A connection is pinged before use only when it has been idle for more than
/// [`PING_IF_IDLE_FOR`]. Pinging at every acquire (sqlx's default) put a round trip on every
/// batch's critical path (the `route` stage at 100 events/s went 3.4 → 0.9 ms without it);
/// not pinging at all made a connection that died idle (a database restart, a terminated
/// backend) fail its next statement and stall a batch. sqlx also pings a connection when it
/// is released, so one that broke in use leaves the pool then.
pub fn connect(config: &DatabaseConfig, max_connections: u32) -> Result<PgPool> {
    let options: PgConnectOptions = config.url.parse()?;
    Ok(PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for > PING_IF_IDLE_FOR {
                    // An error discards the connection; the pool hands out another.
                    sqlx::Connection::ping(conn).await?;
                }
                Ok(true)
            })
        })
        .connect_lazy_with(options.application_name("notify-engine")))
}

/// Idle time after which a pooled connection is pinged before use (see [`connect`]).
const PING_IF_IDLE_FOR: Duration = Duration::from_secs(1);

/// Makes a connection act as this database's API role, `notify_api_<database oid>`
/// (migration `20261128000001`).
const API_ROLE_SQL: &str = "SELECT set_config('role', 'notify_api_' || oid, false) \
     FROM pg_database WHERE datname = current_database()";

/// The public API's pool: like [`connect`], but every connection acts as the database's API
/// role, so it reads and writes only inside a [`scoped`] transaction, and only that user's
/// rows.
pub fn connect_api(config: &DatabaseConfig, max_connections: u32) -> Result<PgPool> {
    let options: PgConnectOptions = config.url.parse()?;
    Ok(PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .after_connect(|conn, _| {
            Box::pin(async move {
                conn.execute(API_ROLE_SQL).await?;
                Ok(())
            })
        })
        .connect_lazy_with(options.application_name("notify-engine-api")))
}

/// Opens a connection of the API's pool (which takes on its role).
pub async fn ping_api(pool: &PgPool) -> Result<()> {
    sqlx::query("SELECT 1").execute(pool).await?;
    Ok(())
}

/// A transaction that row-level security confines to one (tenant, user).
pub async fn scoped(
    pool: &PgPool,
    tenant: &str,
    user_id: &str,
) -> Result<Transaction<'static, Postgres>> {
    let mut tx = pool.begin().await?;
    sqlx::query(
        "SELECT set_config('notify.tenant', $1, true), set_config('notify.user', $2, true)",
    )
    .bind(tenant)
    .bind(user_id)
    .execute(&mut *tx)
    .await?;
    Ok(tx)
}

/// Applies the migrations in `migrations/` not yet applied.
pub async fn migrate(pool: &PgPool) -> Result<()> {
    sqlx::migrate!("../migrations").run(pool).await?;
    Ok(())
}

/// Does PostgreSQL answer a statement on one of `pool`'s connections? The error says why
/// not (the engine waits on it at start, when PostgreSQL may come up after it).
pub async fn reachable(pool: &PgPool) -> Result<()> {
    sqlx::query("SELECT 1").execute(pool).await?;
    Ok(())
}

/// [`reachable`], as the readiness probe reads it.
pub async fn ping(pool: &PgPool) -> bool {
    reachable(pool).await.is_ok()
}

/// Where a Kafka message came from (a claim's and a dead letter's origin).
#[derive(Debug, Clone, Copy)]
pub struct Origin<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
}

/// One text column of a multi-row statement (bound as `text[]`, `None` as NULL), for the
/// batch statements of [`claims`] and [`outbox`].
fn texts<'a, T>(rows: &'a [T], f: impl Fn(&'a T) -> Option<&'a str>) -> Vec<Option<&'a str>> {
    rows.iter().map(f).collect()
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use super::*;

    #[test]
    fn an_error_names_its_side_keeps_its_cause_as_source_and_prints_it_once() {
        let busy = StoreError::Sqlx(sqlx::Error::PoolTimedOut);
        let cause = sqlx::Error::PoolTimedOut.to_string();
        assert_eq!(busy.to_string(), "database");
        assert_eq!(busy.source().map(ToString::to_string), Some(cause.clone()));
        assert_eq!(busy.with_cause().to_string(), format!("database: {cause}"));
        assert!(busy.is_pool_busy());

        let missing = StoreError::Sqlx(sqlx::Error::RowNotFound);
        assert!(!missing.is_pool_busy());
        assert!(!missing.is_data_error());
        // Whatever fails at COMMIT is the database's (a full NOTIFY queue's 54000).
        let commit = StoreError::Commit(sqlx::Error::PoolTimedOut);
        assert!(!commit.is_data_error());
        assert_eq!(
            commit.with_cause().to_string(),
            format!("database commit: {cause}")
        );
        assert_eq!(
            missing.with_cause().to_string(),
            format!("database: {}", sqlx::Error::RowNotFound)
        );
    }
}
