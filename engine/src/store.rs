//! PostgreSQL: the only module that holds SQL.
//!
//! Functions that belong to an event's outcome take a `&mut PgConnection` so the caller (the
//! pipeline) owns the transaction; read paths take the pool.
//!
//! The public API reads and writes through [`connect_api`]'s pool, whose connections act as
//! the database's `notify_api_<oid>` role: row-level security then lets each of its transactions see only
//! the rows of the (tenant, user) that [`scoped`] named (migration `20261128000001`).

pub mod inbox;
pub mod presence;
pub mod retention;
pub mod tickets;

use std::time::Duration;

use serde_json::{Map, Value};
use sqlx::postgres::{PgArguments, PgConnectOptions, PgPoolOptions};
use sqlx::query::Query;
use sqlx::{Executor, FromRow, PgConnection, PgPool, Postgres, Transaction};

use crate::config::DatabaseConfig;
use crate::model::{REPLAY_HEADER, StoredNotification};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Sqlx(#[from] sqlx::Error),
    #[error("database migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

impl StoreError {
    /// Is this error about the data being written, so that the same statement would fail
    /// again on a healthy database? Only such an error may dead-letter a message.
    ///
    /// Class 22 (data exception: an invalid byte sequence, a value out of range, an
    /// untranslatable character) and 54000 (program limit exceeded: a value too large to
    /// index) follow from the values alone. Everything else (connection trouble, lock and
    /// statement timeouts, a read-only transaction during failover, a revoked privilege, a
    /// relation missing mid-migration, a unique conflict on a sequence) is about the
    /// database or the engine, and the batch waits for it instead.
    pub fn is_data_error(&self) -> bool {
        match self {
            StoreError::Sqlx(sqlx::Error::Database(db)) => db
                .code()
                .is_some_and(|code| code.starts_with("22") || code == "54000"),
            // A value the driver could not encode (it never reached the server).
            StoreError::Sqlx(sqlx::Error::Encode(_)) => true,
            StoreError::Sqlx(_) | StoreError::Migrate(_) => false,
        }
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

pub async fn migrate(pool: &PgPool) -> Result<()> {
    sqlx::migrate!("../migrations").run(pool).await?;
    Ok(())
}

pub async fn ping(pool: &PgPool) -> bool {
    sqlx::query("SELECT 1").execute(pool).await.is_ok()
}

/// Where a Kafka message came from.
#[derive(Debug, Clone, Copy)]
pub struct Origin<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
}

/// One text column of a multi-row statement (bound as `text[]`, `None` as NULL).
fn texts<'a, T>(rows: &'a [T], f: impl Fn(&'a T) -> Option<&'a str>) -> Vec<Option<&'a str>> {
    rows.iter().map(f).collect()
}

/// An event to record as processed, with the outcome already decided (routing happens
/// before the transaction).
#[derive(Debug, Clone)]
pub struct Claim<'a> {
    pub tenant: &'a str,
    pub event_id: &'a str,
    pub event_type: &'a str,
    pub origin: Origin<'a>,
    pub dead_lettered: bool,
    /// Which plugin (and build) decided; `None` when the event never reached one.
    pub plugin: Option<&'a str>,
    pub plugin_digest: Option<&'a str>,
}

/// Records events as processed, in one statement; for each claim, `false` means it already
/// was: a duplicate. The claims' (tenant, event id) must be distinct. The rows stay locked
/// until the transaction ends, so a second instance handling one of the same events
/// concurrently waits and then sees the duplicate.
pub async fn claim_events<'a>(tx: &mut PgConnection, claims: &'a [Claim<'a>]) -> Result<Vec<bool>> {
    if claims.is_empty() {
        return Ok(Vec::new());
    }
    let column = |f: fn(&'a Claim<'a>) -> Option<&'a str>| texts(claims, f);
    let claimed: Vec<(String, String)> = sqlx::query_as(
        "INSERT INTO processed_events
             (tenant_id, event_id, event_type, outcome, plugin, plugin_digest,
              kafka_topic, kafka_partition, kafka_offset)
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                              $6::text[], $7::text[], $8::int[], $9::bigint[])
         ON CONFLICT (tenant_id, event_id) DO NOTHING
         RETURNING tenant_id, event_id",
    )
    .bind(column(|c| Some(c.tenant)))
    .bind(column(|c| Some(c.event_id)))
    .bind(column(|c| Some(c.event_type)))
    .bind(column(|c| {
        Some(if c.dead_lettered {
            "dead_lettered"
        } else {
            "routed"
        })
    }))
    .bind(column(|c| c.plugin))
    .bind(column(|c| c.plugin_digest))
    .bind(column(|c| Some(c.origin.topic)))
    .bind(
        claims
            .iter()
            .map(|c| c.origin.partition)
            .collect::<Vec<_>>(),
    )
    .bind(claims.iter().map(|c| c.origin.offset).collect::<Vec<_>>())
    .fetch_all(&mut *tx)
    .await?;
    let claimed: std::collections::HashSet<(String, String)> = claimed.into_iter().collect();
    Ok(claims
        .iter()
        .map(|c| claimed.contains(&(c.tenant.to_owned(), c.event_id.to_owned())))
        .collect())
}

/// The duplicate check's statement. Each key probes the primary key on its own (a LATERAL
/// `LIMIT 1`): the plain join's plan, cached by a connection while the table was small,
/// stayed a hash join over a sequential scan of the whole table as it grew, 11 ms per check
/// at 50 000 rows instead of 0.1 ms. This shape keeps the index whatever the table's size
/// when the plan was made.
pub const ALREADY_PROCESSED_SQL: &str = "SELECT e.tenant_id, e.event_id
     FROM unnest($1::text[], $2::text[]) AS e(tenant_id, event_id)
     CROSS JOIN LATERAL (
         SELECT FROM processed_events p
         WHERE p.tenant_id = e.tenant_id AND p.event_id = e.event_id
         LIMIT 1) p";

/// Which of `events` (tenant, event id) were already processed: read before routing, so
/// duplicates cost no plugin call. The claim inside the transaction stays the authority
/// (another instance may claim an event between this read and that transaction).
pub async fn already_processed(
    pool: &PgPool,
    events: &[(&str, &str)],
) -> Result<std::collections::HashSet<(String, String)>> {
    if events.is_empty() {
        return Ok(Default::default());
    }
    let tenants: Vec<&str> = events.iter().map(|e| e.0).collect();
    let ids: Vec<&str> = events.iter().map(|e| e.1).collect();
    let rows: Vec<(String, String)> = sqlx::query_as(ALREADY_PROCESSED_SQL)
        .bind(&tenants)
        .bind(&ids)
        .fetch_all(pool)
        .await?;
    Ok(rows.into_iter().collect())
}

/// A notification to store (an inbox item or a live update).
#[derive(Debug, Clone)]
pub struct NewNotification<'a> {
    pub tenant: &'a str,
    pub user_id: &'a str,
    pub event_id: &'a str,
    pub kind: &'a str,
    pub title: Option<&'a str>,
    pub body: Option<&'a str>,
    pub category: Option<&'a str>,
    pub data: &'a Map<String, Value>,
}

/// What [`insert_notifications`] stored, in the order given.
pub struct Inserted {
    /// Each row's sequence number (one user's rows get consecutive numbers in that order).
    pub seqs: Vec<i64>,
    /// Their `created_at`: the transaction's start, the same for all.
    pub created_at: chrono::DateTime<chrono::Utc>,
    /// Each row's bytes of title, body and data (as serialized for the statement).
    pub sizes: Vec<usize>,
}

/// Stores notifications, each under its user's next sequence number, in one statement
/// whatever their number (numbering and inserting were two round trips; a batch's
/// transaction is mostly round trips).
///
/// The next number is never below one past the highest sequence number stored for the user:
/// a `user_streams` row lost or set back by a restore or an operator's mistake heals itself
/// instead of colliding with the user's existing notifications forever. Users' stream rows
/// are locked in (tenant, user) order, so two writers never wait on each other in a cycle.
pub async fn insert_notifications(
    tx: &mut PgConnection,
    rows: &[NewNotification<'_>],
) -> Result<Inserted> {
    if rows.is_empty() {
        return Ok(Inserted {
            seqs: Vec::new(),
            created_at: chrono::Utc::now(),
            sizes: Vec::new(),
        });
    }
    let data: Vec<String> = rows
        .iter()
        .map(|n| serde_json::to_string(n.data).expect("a JSON map serializes"))
        .collect();
    // Each user's rows are numbered on from the stream's new last number, in the order
    // given (`ord`): last - n + 1, last - n + 2, ...
    let numbered: Vec<(i64, chrono::DateTime<chrono::Utc>)> = sqlx::query_as(
        "WITH x AS (
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                                  $6::text[], $7::text[], $8::text[]) WITH ORDINALITY
                 AS x (t, u, e, k, ti, b, c, d, ord)
         ),
         input AS (
             SELECT t AS tenant_id, u AS user_id, count(*) AS n FROM x GROUP BY t, u
         ),
         streams AS (
             INSERT INTO user_streams AS s (tenant_id, user_id, last_seq)
             SELECT i.tenant_id, i.user_id, i.n + coalesce(
                 (SELECT max(seq) FROM notifications old
                  WHERE old.tenant_id = i.tenant_id AND old.user_id = i.user_id), 0)
             FROM input i
             ORDER BY i.tenant_id, i.user_id
             ON CONFLICT (tenant_id, user_id) DO UPDATE SET last_seq =
                 greatest(s.last_seq, EXCLUDED.last_seq - (SELECT n FROM input
                     WHERE input.tenant_id = EXCLUDED.tenant_id AND input.user_id = EXCLUDED.user_id))
                 + (SELECT n FROM input
                    WHERE input.tenant_id = EXCLUDED.tenant_id AND input.user_id = EXCLUDED.user_id)
             RETURNING tenant_id, user_id, last_seq
         ),
         numbered AS (
             SELECT x.*, s.last_seq - i.n
                         + row_number() OVER (PARTITION BY x.t, x.u ORDER BY x.ord) AS seq
             FROM x
             JOIN streams s ON s.tenant_id = x.t AND s.user_id = x.u
             JOIN input i ON i.tenant_id = x.t AND i.user_id = x.u
         ),
         inserted AS (
             INSERT INTO notifications
                 (tenant_id, user_id, seq, event_id, kind, title, body, category, data)
             SELECT t, u, seq, e, k, ti, b, c, d::jsonb FROM numbered
         )
         SELECT seq, now() FROM numbered ORDER BY ord",
    )
    .bind(rows.iter().map(|n| n.tenant).collect::<Vec<_>>())
    .bind(rows.iter().map(|n| n.user_id).collect::<Vec<_>>())
    .bind(rows.iter().map(|n| n.event_id).collect::<Vec<_>>())
    .bind(rows.iter().map(|n| n.kind).collect::<Vec<_>>())
    .bind(rows.iter().map(|n| n.title).collect::<Vec<_>>())
    .bind(rows.iter().map(|n| n.body).collect::<Vec<_>>())
    .bind(rows.iter().map(|n| n.category).collect::<Vec<_>>())
    .bind(&data)
    .fetch_all(&mut *tx)
    .await?;
    if numbered.len() != rows.len() {
        // Every row has its user's stream row, returned by the upsert; anything else is a
        // bug, not the data's fault.
        return Err(StoreError::Sqlx(sqlx::Error::Protocol(format!(
            "{} notifications numbered for {} rows",
            numbered.len(),
            rows.len()
        ))));
    }
    let created_at = numbered[0].1;
    let sizes = rows
        .iter()
        .zip(&data)
        .map(|(n, d)| n.title.map_or(0, str::len) + n.body.map_or(0, str::len) + d.len())
        .collect();
    Ok(Inserted {
        seqs: numbered.into_iter().map(|(seq, _)| seq).collect(),
        created_at,
        sizes,
    })
}

impl NewNotification<'_> {
    /// The row as stored under `seq` at `created_at`, as its streams send it.
    pub fn stored(
        &self,
        seq: i64,
        created_at: chrono::DateTime<chrono::Utc>,
    ) -> StoredNotification {
        StoredNotification {
            seq,
            event_id: self.event_id.to_owned(),
            kind: self.kind.to_owned(),
            title: self.title.map(str::to_owned),
            body: self.body.map(str::to_owned),
            category: self.category.map(str::to_owned),
            data: sqlx::types::Json(Value::Object(self.data.clone())),
            created_at,
            read_at: None,
            archived_at: None,
            frame_data: Default::default(),
        }
    }
}

/// An email to put in the outbox.
#[derive(Debug, Clone)]
pub struct NewEmail<'a> {
    pub tenant: &'a str,
    pub event_id: &'a str,
    pub user_id: Option<&'a str>,
    pub recipient: &'a str,
    pub template: &'a str,
    pub data: &'a Map<String, Value>,
    pub message_id: &'a str,
    /// `Some(reason)`: record the email but do not send it (status `skipped`).
    pub skip: Option<&'a str>,
    pub event_type: &'a str,
    pub event_time: chrono::DateTime<chrono::Utc>,
    pub locale: Option<&'a str>,
    pub time_zone: Option<&'a str>,
}

/// Puts emails in the outbox, in one statement whatever their number.
pub async fn enqueue_emails<'a>(tx: &mut PgConnection, emails: &'a [NewEmail<'a>]) -> Result<()> {
    if emails.is_empty() {
        return Ok(());
    }
    let text = |f: fn(&'a NewEmail<'a>) -> Option<&'a str>| texts(emails, f);
    let data: Vec<String> = emails
        .iter()
        .map(|e| serde_json::to_string(e.data).expect("a JSON map serializes"))
        .collect();
    sqlx::query(
        "INSERT INTO email_outbox
             (tenant_id, event_id, user_id, recipient, template, data, message_id,
              status, last_error, event_type, event_time, locale, time_zone)
         SELECT t, e, u, r, tp, d::jsonb, m,
                CASE WHEN sk IS NULL THEN 'pending' ELSE 'skipped' END, sk, et, at, l, tz
         FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                     $7::text[], $8::text[], $9::text[], $10::timestamptz[], $11::text[],
                     $12::text[]) AS x (t, e, u, r, tp, d, m, sk, et, at, l, tz)",
    )
    .bind(text(|e| Some(e.tenant)))
    .bind(text(|e| Some(e.event_id)))
    .bind(text(|e| e.user_id))
    .bind(text(|e| Some(e.recipient)))
    .bind(text(|e| Some(e.template)))
    .bind(&data)
    .bind(text(|e| Some(e.message_id)))
    .bind(text(|e| e.skip))
    .bind(text(|e| Some(e.event_type)))
    .bind(emails.iter().map(|e| e.event_time).collect::<Vec<_>>())
    .bind(text(|e| e.locale))
    .bind(text(|e| e.time_zone))
    .execute(&mut *tx)
    .await?;
    Ok(())
}

#[derive(Debug, Clone)]
pub struct NewDeadLetter<'a> {
    pub tenant: Option<&'a str>,
    pub event_id: Option<&'a str>,
    pub origin: Origin<'a>,
    pub key: Option<&'a [u8]>,
    pub payload: &'a [u8],
    /// The message's Kafka headers, in order.
    pub headers: &'a [(String, Option<Vec<u8>>)],
    pub error_kind: &'a str,
    pub reason: &'a str,
    pub plugin: Option<&'a str>,
}

/// Stores a dead letter; a message redelivered after a crash is stored once (same origin,
/// same bytes), while a different message at a reused offset (a recreated topic) gets a row
/// of its own.
pub async fn insert_dead_letter(tx: &mut PgConnection, d: &NewDeadLetter<'_>) -> Result<bool> {
    let inserted = sqlx::query(
        "INSERT INTO dead_letters
             (tenant_id, event_id, kafka_topic, kafka_partition, kafka_offset, kafka_key,
              payload, error_kind, reason, plugin, kafka_headers)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
         ON CONFLICT ON CONSTRAINT dead_letters_origin DO NOTHING",
    )
    .bind(d.tenant)
    .bind(d.event_id)
    .bind(d.origin.topic)
    .bind(d.origin.partition)
    .bind(d.origin.offset)
    .bind(d.key)
    .bind(d.payload)
    .bind(d.error_kind)
    // Defence in depth: a reason quoting bad input must not make the dead letter itself fail.
    .bind(d.reason.replace('\0', ""))
    .bind(d.plugin)
    .bind(sqlx::types::Json(encode_headers(d.headers)))
    .execute(&mut *tx)
    .await?
    .rows_affected();
    Ok(inserted == 1)
}

/// Headers as stored with a dead letter: `[{"name", "value": base64 | null}]`, without the
/// replay token (a replay gets a fresh one).
fn encode_headers(headers: &[(String, Option<Vec<u8>>)]) -> Value {
    use base64::Engine;
    Value::Array(
        headers
            .iter()
            .filter(|(name, _)| name != REPLAY_HEADER)
            .map(|(name, value)| {
                serde_json::json!({
                    "name": name,
                    "value": value.as_ref().map(|v| base64::engine::general_purpose::STANDARD.encode(v)),
                })
            })
            .collect(),
    )
}

fn decode_headers(stored: Option<Value>) -> Vec<(String, Option<Vec<u8>>)> {
    use base64::Engine;
    let Some(Value::Array(items)) = stored else {
        return Vec::new();
    };
    items
        .iter()
        .filter_map(|h| {
            let name = h.get("name")?.as_str()?.to_owned();
            let value = match h.get("value") {
                Some(Value::String(b64)) => {
                    Some(base64::engine::general_purpose::STANDARD.decode(b64).ok()?)
                }
                _ => None,
            };
            Some((name, value))
        })
        .collect()
}

/// The channel on which every instance of a deployment (one database) hears of committed
/// stream rows: the hub's cluster-wide wake-ups (`cluster::listen`).
pub const WAKE_CHANNEL: &str = "notify_engine_wake";
/// PostgreSQL takes NOTIFY payloads below 8000 bytes; what is announced is split to stay
/// under it.
const NOTIFY_PAYLOAD_BYTES: usize = 7_000;

/// `items` as JSON arrays of at most [`NOTIFY_PAYLOAD_BYTES`] each (one item too large for
/// that is an array of its own), in order.
fn json_arrays<T: serde::Serialize>(items: impl IntoIterator<Item = T>) -> Vec<String> {
    let mut arrays = Vec::new();
    let mut array = String::new();
    for item in items {
        let item = serde_json::to_string(&item).expect("strings and numbers serialize");
        if !array.is_empty() && array.len() + item.len() + 2 > NOTIFY_PAYLOAD_BYTES {
            array.push(']');
            arrays.push(std::mem::take(&mut array));
        }
        array.push(if array.is_empty() { '[' } else { ',' });
        array.push_str(&item);
    }
    if !array.is_empty() {
        array.push(']');
        arrays.push(array);
    }
    arrays
}

/// A row carried in a wake-up at most this long as JSON; a longer one is only announced (its
/// streams read it), so a NOTIFY never passes PostgreSQL's limit.
const ROW_IN_NOTIFY_BYTES: usize = 6_000;

/// One user's wake-up as announced: `[tenant, user, seq]`, or with the row itself.
#[derive(serde::Serialize)]
#[serde(untagged)]
enum WakeOut<'a> {
    Bare(&'a str, &'a str, i64),
    Row(&'a str, &'a str, i64, Box<serde_json::value::RawValue>),
}

/// Tells every instance, when `tx` commits, that these users' streams have rows up to these
/// sequence numbers: `{"from": instance, "wakes": [[tenant, user, seq], …]}` on
/// [`WAKE_CHANNEL`] (just the array without `from`), in as few NOTIFYs as fit. A wake-up
/// with a row (`[tenant, user, seq, row]`) carries it to instances where the user listens, so
/// their streams need not read it back. NOTIFY is transactional: delivered at commit and
/// only then, so no listener looks for a row it cannot see yet, and a rolled-back batch wakes
/// nobody.
pub async fn announce<'a>(
    tx: &mut PgConnection,
    from: Option<&str>,
    wakes: impl IntoIterator<Item = (&'a str, &'a str, i64, Option<&'a StoredNotification>)>,
) -> Result<()> {
    for payload in wake_payloads(from, wakes) {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(WAKE_CHANNEL)
            .bind(payload)
            .execute(&mut *tx)
            .await?;
    }
    Ok(())
}

/// What the cluster listener heard.
pub enum Heard {
    /// Users' streams with rows up to these sequence numbers, committed by another
    /// instance, or by any for an inbox change (its own batches' echo is not news).
    Wakes(Vec<Wake>),
    /// Users that came online or went offline on another instance, or instances gone.
    Presence(presence::News),
    /// The connection was lost and made again: what was sent meanwhile is gone.
    Reconnected,
}

/// A wake-up heard: (tenant, user) has rows up to `seq`, and maybe the row itself.
#[derive(Debug, PartialEq)]
pub struct Wake {
    pub tenant: String,
    pub user: String,
    pub seq: i64,
    pub row: Option<StoredNotification>,
}

/// A connection of its own listening on [`WAKE_CHANNEL`] and
/// [`presence::PRESENCE_CHANNEL`], for the instance `own`.
pub struct ClusterListener {
    listener: sqlx::postgres::PgListener,
    /// How this instance's own wake-ups start: the echo of its batches, skipped unread.
    own: String,
}

impl ClusterListener {
    pub async fn connect(pool: &PgPool, own: &str) -> Result<Self> {
        let mut listener = sqlx::postgres::PgListener::connect_with(pool).await?;
        listener
            .listen_all([WAKE_CHANNEL, presence::PRESENCE_CHANNEL])
            .await?;
        Ok(Self {
            listener,
            own: own_prefix(own),
        })
    }

    /// The next news. A payload that is not ours (another program notifying on the
    /// channel) is skipped with a warning.
    pub async fn next(&mut self) -> Result<Heard> {
        loop {
            let Some(notification) = self.listener.try_recv().await? else {
                return Ok(Heard::Reconnected);
            };
            let payload = notification.payload();
            let heard = if notification.channel() == WAKE_CHANNEL {
                // This instance's streams took those rows from memory after the commit; the
                // echo (often first) would have sent them to PostgreSQL for them.
                if payload.starts_with(&self.own) {
                    continue;
                }
                parse_wakes(payload).map(Heard::Wakes)
            } else {
                serde_json::from_str(payload).map(Heard::Presence)
            };
            match heard {
                Ok(heard) => return Ok(heard),
                Err(e) => {
                    tracing::warn!(error = %e, channel = notification.channel(), "a NOTIFY that is not the engine's; ignored")
                }
            }
        }
    }
}

/// The NOTIFY payloads of [`announce`].
fn wake_payloads<'a>(
    from: Option<&str>,
    wakes: impl IntoIterator<Item = (&'a str, &'a str, i64, Option<&'a StoredNotification>)>,
) -> Vec<String> {
    let wakes = wakes.into_iter().map(|(tenant, user, seq, row)| {
        row.and_then(|row| serde_json::value::to_raw_value(row).ok())
            .filter(|raw| raw.get().len() <= ROW_IN_NOTIFY_BYTES)
            .map_or(WakeOut::Bare(tenant, user, seq), |raw| {
                WakeOut::Row(tenant, user, seq, raw)
            })
    });
    json_arrays(wakes)
        .into_iter()
        .map(|array| match from {
            // Under PostgreSQL's 8000 bytes: the array is at most NOTIFY_PAYLOAD_BYTES.
            Some(from) => format!(r#"{},"wakes":{array}}}"#, own_prefix(from)),
            None => array,
        })
        .collect()
}

/// How the wake-ups of instance `id` start ([`announce`] writes `from` first).
fn own_prefix(id: &str) -> String {
    format!(r#"{{"from":{}"#, serde_json::Value::from(id))
}

/// A [`WAKE_CHANNEL`] payload: `{"from", "wakes"}`, or just the array; each wake-up is
/// `[tenant, user, seq]` or `[tenant, user, seq, row]`.
fn parse_wakes(payload: &str) -> serde_json::Result<Vec<Wake>> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum WakeIn {
        Bare(String, String, i64),
        Row(String, String, i64, Box<StoredNotification>),
    }
    // `from` is not read: the listener skipped its own instance's before parsing.
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum Payload {
        Bare(Vec<WakeIn>),
        Object { wakes: Vec<WakeIn> },
    }
    let (Payload::Bare(wakes) | Payload::Object { wakes }) = serde_json::from_str(payload)?;
    Ok(wakes
        .into_iter()
        .map(|w| match w {
            WakeIn::Bare(tenant, user, seq) => Wake {
                tenant,
                user,
                seq,
                row: None,
            },
            WakeIn::Row(tenant, user, seq, row) => Wake {
                tenant,
                user,
                seq,
                // A row that is not the one announced is not trusted: its streams read.
                row: (row.seq == seq).then_some(*row),
            },
        })
        .collect())
}

/// The user's notifications after `after_seq`, oldest first: at most `limit` rows and, past
/// the first row, at most `max_bytes` of title, body and data, so a stream never holds more
/// than one such page (or one row) in memory. Every read is scoped by tenant *and* user:
/// there is no query that takes only one of them.
pub async fn notifications_after(
    pool: &PgPool,
    tenant: &str,
    user_id: &str,
    after_seq: i64,
    limit: i64,
    max_bytes: i64,
) -> Result<Vec<StoredNotification>> {
    let mut tx = scoped(pool, tenant, user_id).await?;
    let rows = sqlx::query_as(
        "SELECT seq, event_id, kind, title, body, category, data, created_at, read_at, archived_at
         FROM (
             SELECT page.*, sum(size) OVER (ORDER BY seq) AS running
             FROM (
                 SELECT seq, event_id, kind, title, body, category, data, created_at, read_at,
                        archived_at,
                        octet_length(coalesce(title, '')) + octet_length(coalesce(body, ''))
                            + octet_length(data::text) AS size
                 FROM notifications
                 WHERE tenant_id = $1 AND user_id = $2 AND seq > $3
                 ORDER BY seq
                 LIMIT $4
             ) page
         ) sized
         WHERE running <= $5 OR running = size
         ORDER BY seq",
    )
    .bind(tenant)
    .bind(user_id)
    .bind(after_seq)
    .bind(limit)
    .bind(max_bytes)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(rows)
}

/// The user's latest sequence number (0 when they have none).
pub async fn latest_seq(pool: &PgPool, tenant: &str, user_id: &str) -> Result<i64> {
    let mut tx = scoped(pool, tenant, user_id).await?;
    let row: Option<(i64,)> =
        sqlx::query_as("SELECT last_seq FROM user_streams WHERE tenant_id = $1 AND user_id = $2")
            .bind(tenant)
            .bind(user_id)
            .fetch_optional(&mut *tx)
            .await?;
    tx.commit().await?;
    Ok(row.map_or(0, |r| r.0))
}

/// An outbox row claimed for sending.
#[derive(Debug, Clone, FromRow)]
pub struct OutboxEmail {
    pub id: i64,
    pub tenant_id: String,
    pub event_id: String,
    pub recipient: String,
    pub template: String,
    pub data: sqlx::types::Json<Value>,
    pub message_id: String,
    /// Including this one.
    pub attempts: i32,
    /// When the row entered the queue (or was last requeued by an operator): transient
    /// failures are retried until it is `email.max_age_secs` old.
    pub queued_at: chrono::DateTime<chrono::Utc>,
    pub user_id: Option<String>,
    /// The event's type and time (NULL on rows written before they were recorded).
    pub event_type: Option<String>,
    pub event_time: Option<chrono::DateTime<chrono::Utc>>,
    pub locale: Option<String>,
    pub time_zone: Option<String>,
}

/// Returns rows whose claim expired (their worker died mid-send) to the queue, or fails
/// them if they are past `max_age`. Index-backed (`email_outbox_claims`). The attempt that
/// was under way stays counted; the row's stable `Message-ID` makes a resend recognisable:
/// that is the "at most one extra send" case.
pub async fn sweep_expired_claims(pool: &PgPool, max_age: Duration) -> Result<u64> {
    Ok(sqlx::query(
        "UPDATE email_outbox
         SET locked_until = NULL, next_attempt_at = now(),
             status = CASE WHEN queued_at < now() - make_interval(secs => $1)
                           THEN 'failed' ELSE 'pending' END,
             last_error = coalesce(last_error || '; ', '')
                          || 'claim expired (worker stopped mid-send)'
         WHERE status = 'sending' AND locked_until < now()",
    )
    .bind(max_age.as_secs_f64())
    .execute(pool)
    .await?
    .rows_affected())
}

/// Claims up to `batch` due rows, at most `per_tenant` of any one tenant, oldest first
/// within a tenant. A skip scan over `email_outbox_pending` walks the tenants with pending
/// rows and a range probe per tenant finds its due ones, so a backlog of thousands of one
/// tenant's emails costs another tenant one round, not hours, and a queue full of rows in
/// backoff costs one probe per tenant. `SKIP LOCKED` lets several workers (instances) share the outbox.
///
/// Planned at every call (not a statement the connection keeps): the plan a connection made
/// while the outbox was small stayed a sequential scan of the whole outbox for the update and a
/// walk over every due row for the lock, whatever its size later (until autovacuum happened to
/// analyze the table). Planning it costs a fraction of a millisecond, once per claim.
pub async fn claim_emails(
    pool: &PgPool,
    batch: i64,
    per_tenant: i64,
    claim_timeout: Duration,
) -> Result<Vec<OutboxEmail>> {
    Ok(sqlx::query_as(
        "WITH RECURSIVE tenants(tenant_id) AS (
             -- Distinct tenants with pending rows: one index probe each (a skip scan over
             -- email_outbox_pending), and none at all when nothing is due yet.
             (SELECT tenant_id FROM email_outbox
              WHERE status = 'pending'
                AND EXISTS (SELECT 1 FROM email_outbox
                            WHERE status = 'pending' AND next_attempt_at <= now())
              ORDER BY tenant_id LIMIT 1)
             UNION ALL
             SELECT (SELECT e.tenant_id FROM email_outbox e
                     WHERE e.status = 'pending' AND e.tenant_id > t.tenant_id
                     ORDER BY e.tenant_id LIMIT 1)
             FROM tenants t WHERE t.tenant_id IS NOT NULL
         ),
         candidates AS (
             SELECT c.id, c.next_attempt_at, c.rank
             FROM tenants t
             CROSS JOIN LATERAL (
                 SELECT e.id, e.next_attempt_at,
                        row_number() OVER (ORDER BY e.next_attempt_at, e.id) AS rank
                 FROM email_outbox e
                 WHERE e.status = 'pending' AND e.tenant_id = t.tenant_id
                   AND e.next_attempt_at <= now()
                 ORDER BY e.next_attempt_at, e.id
                 LIMIT $2) c
             WHERE t.tenant_id IS NOT NULL
             ORDER BY c.rank, c.next_attempt_at, c.id
             LIMIT $1
         )
         UPDATE email_outbox o
         SET status = 'sending', attempts = o.attempts + 1,
             locked_until = now() + make_interval(secs => $3)
         WHERE o.id IN (
             SELECT e.id FROM email_outbox e
             WHERE e.id IN (SELECT id FROM candidates) AND e.status = 'pending'
             FOR UPDATE SKIP LOCKED)
         RETURNING o.id, o.tenant_id, o.event_id, o.recipient, o.template, o.data,
                   o.message_id, o.attempts, o.queued_at, o.user_id, o.event_type,
                   o.event_time, o.locale, o.time_zone",
    )
    .persistent(false)
    .bind(batch)
    .bind(per_tenant)
    .bind(claim_timeout.as_secs_f64())
    .fetch_all(pool)
    .await?)
}

/// Every write to a claimed row is fenced by (status, attempts): a worker whose claim
/// expired and was taken over can no longer change the row.
macro_rules! fenced_update {
    ($set:literal) => {
        concat!(
            "UPDATE email_outbox SET ",
            $set,
            " WHERE id = $1 AND status = 'sending' AND attempts = $2"
        )
    };
}

fn fenced<'q>(sql: &'q str, email: &OutboxEmail) -> Query<'q, Postgres, PgArguments> {
    sqlx::query(sql).bind(email.id).bind(email.attempts)
}

/// Runs a fenced update; `false` means the claim was lost.
async fn apply(pool: &PgPool, query: Query<'_, Postgres, PgArguments>) -> Result<bool> {
    Ok(query.execute(pool).await?.rows_affected() == 1)
}

/// Extends a claim just before sending, so the claim covers the send even when earlier rows
/// of the batch were slow. `false` means another worker took the row over: do not send.
pub async fn renew_email_claim(
    pool: &PgPool,
    email: &OutboxEmail,
    claim_timeout: Duration,
) -> Result<bool> {
    let sql = fenced_update!("locked_until = now() + make_interval(secs => $3)");
    apply(pool, fenced(sql, email).bind(claim_timeout.as_secs_f64())).await
}

pub async fn mark_email_sent(pool: &PgPool, email: &OutboxEmail) -> Result<bool> {
    let sql =
        fenced_update!("status = 'sent', sent_at = now(), locked_until = NULL, last_error = NULL");
    apply(pool, fenced(sql, email)).await
}

pub async fn mark_email_retry(
    pool: &PgPool,
    email: &OutboxEmail,
    error: &str,
    delay: Duration,
) -> Result<bool> {
    let sql = fenced_update!(
        "status = 'pending', last_error = $3, locked_until = NULL,
         next_attempt_at = now() + make_interval(secs => $4)"
    );
    apply(
        pool,
        fenced(sql, email).bind(error).bind(delay.as_secs_f64()),
    )
    .await
}

pub async fn mark_email_failed(pool: &PgPool, email: &OutboxEmail, error: &str) -> Result<bool> {
    let sql = fenced_update!("status = 'failed', last_error = $3, locked_until = NULL");
    apply(pool, fenced(sql, email).bind(error)).await
}

/// Gives a claimed but unsent row back (shutdown, or its tenant's send rate is spent):
/// pending again after `delay`, the attempt not counted.
pub async fn release_email(pool: &PgPool, email: &OutboxEmail, delay: Duration) -> Result<bool> {
    let sql = fenced_update!(
        "status = 'pending', attempts = attempts - 1, locked_until = NULL,
         next_attempt_at = now() + make_interval(secs => $3)"
    );
    apply(pool, fenced(sql, email).bind(delay.as_secs_f64())).await
}

/// Which failed rows an operator puts back in the queue. Every filter is optional; `None`
/// everywhere requeues every failed row.
#[derive(Debug, Clone, Default)]
pub struct RequeueFilter {
    pub tenant: Option<String>,
    /// Rows created at or after this time.
    pub since: Option<chrono::DateTime<chrono::Utc>>,
    /// Rows created before this time.
    pub until: Option<chrono::DateTime<chrono::Utc>>,
    /// Rows whose last error contains this text (case-insensitive).
    pub error: Option<String>,
}

/// Puts failed rows back in the queue, due now, with a fresh `email.max_age_secs` window.
/// Attempts and the last error stay as a record. Returns how many rows were requeued.
pub async fn requeue_failed_emails(pool: &PgPool, filter: &RequeueFilter) -> Result<u64> {
    Ok(sqlx::query(
        "UPDATE email_outbox
         SET status = 'pending', next_attempt_at = now(), queued_at = now(), locked_until = NULL
         WHERE status = 'failed'
           AND ($1::text IS NULL OR tenant_id = $1)
           AND ($2::timestamptz IS NULL OR created_at >= $2)
           AND ($3::timestamptz IS NULL OR created_at < $3)
           AND ($4::text IS NULL OR strpos(lower(coalesce(last_error, '')), lower($4)) > 0)",
    )
    .bind(filter.tenant.as_deref())
    .bind(filter.since)
    .bind(filter.until)
    .bind(filter.error.as_deref())
    .execute(pool)
    .await?
    .rows_affected())
}

/// Which dead letters an operator lists or replays. Every filter is optional.
#[derive(Debug, Clone, Default)]
pub struct DeadLetterFilter {
    pub tenant: Option<String>,
    /// `error_kind`, e.g. `plugin_trap`, `plugin_unavailable`.
    pub kind: Option<String>,
    pub since: Option<chrono::DateTime<chrono::Utc>>,
    pub until: Option<chrono::DateTime<chrono::Utc>>,
    /// Include rows already replayed (listing only; replay never repeats one).
    pub include_replayed: bool,
    pub limit: i64,
}

/// A dead letter as an operator sees it.
#[derive(Debug, Clone, FromRow, serde::Serialize)]
pub struct DeadLetterRow {
    pub id: i64,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub tenant_id: Option<String>,
    pub event_id: Option<String>,
    pub error_kind: String,
    pub reason: String,
    pub kafka_topic: String,
    pub kafka_partition: i32,
    pub kafka_offset: i64,
    pub replayed_at: Option<chrono::DateTime<chrono::Utc>>,
}

const DEAD_LETTER_FILTER: &str = "($1::text IS NULL OR tenant_id = $1)
    AND ($2::text IS NULL OR error_kind = $2)
    AND ($3::timestamptz IS NULL OR created_at >= $3)
    AND ($4::timestamptz IS NULL OR created_at < $4)";

pub async fn list_dead_letters(
    pool: &PgPool,
    filter: &DeadLetterFilter,
) -> Result<Vec<DeadLetterRow>> {
    let sql = format!(
        "SELECT id, created_at, tenant_id, event_id, error_kind, reason, kafka_topic,
                kafka_partition, kafka_offset, replayed_at
         FROM dead_letters
         WHERE {DEAD_LETTER_FILTER} AND ($5 OR replayed_at IS NULL)
         ORDER BY id LIMIT $6"
    );
    Ok(sqlx::query_as(&sql)
        .bind(filter.tenant.as_deref())
        .bind(filter.kind.as_deref())
        .bind(filter.since)
        .bind(filter.until)
        .bind(filter.include_replayed)
        .bind(filter.limit)
        .fetch_all(pool)
        .await?)
}

/// A dead letter to republish, with the one-time token its replay must carry.
#[derive(Debug, Clone)]
pub struct Replay {
    pub id: i64,
    pub tenant_id: Option<String>,
    pub kafka_topic: String,
    pub kafka_key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    /// The original message's headers (none for rows stored before they were kept).
    pub headers: Vec<(String, Option<Vec<u8>>)>,
    pub replay_token: uuid::Uuid,
}

/// Gives the selected, not yet replayed dead letters a fresh replay token each (an older
/// token, from a replay whose message never arrived, stops counting).
pub async fn prepare_replays(pool: &PgPool, filter: &DeadLetterFilter) -> Result<Vec<Replay>> {
    let sql = format!(
        "UPDATE dead_letters SET replay_token = gen_random_uuid()
         WHERE id IN (SELECT id FROM dead_letters
                      WHERE {DEAD_LETTER_FILTER} AND replayed_at IS NULL
                      ORDER BY id LIMIT $5)
         RETURNING id, tenant_id, kafka_topic, kafka_key, payload, kafka_headers, replay_token"
    );
    type Row = (
        i64,
        Option<String>,
        String,
        Option<Vec<u8>>,
        Vec<u8>,
        Option<Value>,
        uuid::Uuid,
    );
    let rows: Vec<Row> = sqlx::query_as(&sql)
        .bind(filter.tenant.as_deref())
        .bind(filter.kind.as_deref())
        .bind(filter.since)
        .bind(filter.until)
        .bind(filter.limit)
        .fetch_all(pool)
        .await?;
    let mut replays: Vec<Replay> = rows
        .into_iter()
        .map(
            |(id, tenant_id, kafka_topic, kafka_key, payload, headers, replay_token)| Replay {
                id,
                tenant_id,
                kafka_topic,
                kafka_key,
                payload,
                headers: decode_headers(headers),
                replay_token,
            },
        )
        .collect();
    replays.sort_by_key(|r| r.id);
    Ok(replays)
}

/// Accepts a replay token once, inside the transaction that handles the replayed event:
/// marks the dead letter replayed and releases the event's dead-lettered claim, so the
/// event is routed again. `false` (a token used before, or forged): the message is an
/// ordinary redelivery, and the claim decides as usual.
pub async fn accept_replay(
    tx: &mut PgConnection,
    tenant: &str,
    event_id: &str,
    token: uuid::Uuid,
) -> Result<bool> {
    let accepted: Option<(String, i32, i64)> = sqlx::query_as(
        "UPDATE dead_letters SET replayed_at = now()
         WHERE replay_token = $3 AND replayed_at IS NULL
           AND (tenant_id IS NULL OR tenant_id = $1)
           AND (event_id IS NULL OR event_id = $2)
         RETURNING kafka_topic, kafka_partition, kafka_offset",
    )
    .bind(tenant)
    .bind(event_id)
    .bind(token)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((topic, partition, offset)) = accepted else {
        return Ok(false);
    };
    // Only the claim this dead letter made (same message): a later outcome of the event,
    // such as another replay's, is not undone.
    sqlx::query(
        "DELETE FROM processed_events
         WHERE tenant_id = $1 AND event_id = $2 AND outcome = 'dead_lettered'
           AND kafka_topic = $3 AND kafka_partition = $4 AND kafka_offset = $5",
    )
    .bind(tenant)
    .bind(event_id)
    .bind(topic)
    .bind(partition)
    .bind(offset)
    .execute(&mut *tx)
    .await?;
    Ok(true)
}

/// Marks a replayed dead letter done when the replay could not even be decoded (it is
/// dead-lettered again, as itself): the operator's next replay does not select it again.
pub async fn mark_replayed(tx: &mut PgConnection, token: uuid::Uuid) -> Result<()> {
    sqlx::query(
        "UPDATE dead_letters SET replayed_at = now()
         WHERE replay_token = $1 AND replayed_at IS NULL",
    )
    .bind(token)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stored row of seq `seq` whose body is `body`.
    fn row(seq: i64, body: &str) -> StoredNotification {
        StoredNotification {
            seq,
            event_id: format!("e{seq}"),
            kind: "notification".into(),
            title: Some("Paid".into()),
            body: Some(body.into()),
            category: None,
            data: sqlx::types::Json(serde_json::json!({"order_id": "A-1"})),
            created_at: chrono::Utc::now(),
            read_at: None,
            archived_at: None,
            frame_data: Default::default(),
        }
    }

    #[test]
    fn wake_payloads_name_their_instance_and_carry_small_rows() {
        let (small, big) = (row(7, "thanks"), row(8, &"x".repeat(ROW_IN_NOTIFY_BYTES)));
        let payloads = wake_payloads(
            Some("i-1"),
            [
                ("t", "u", 7, Some(&small)),
                ("t", "u", 8, Some(&big)),
                ("t", "v", 3, None),
            ],
        );
        assert!(payloads.iter().all(|p| p.starts_with(&own_prefix("i-1"))));
        assert!(!payloads[0].starts_with(&own_prefix("i-2")));
        assert!(
            payloads.iter().all(|p| p.len() < 8_000),
            "under NOTIFY's limit"
        );
        let heard: Vec<Wake> = payloads
            .iter()
            .flat_map(|p| parse_wakes(p).unwrap())
            .collect();
        let expect = |tenant: &str, user: &str, seq, row: Option<&StoredNotification>| Wake {
            tenant: tenant.into(),
            user: user.into(),
            seq,
            row: row.cloned(),
        };
        assert_eq!(
            heard,
            [
                expect("t", "u", 7, Some(&small)),
                expect("t", "u", 8, None), // too large to carry: its streams read it
                expect("t", "v", 3, None),
            ]
        );
        // An inbox change's bare array, and an older instance's.
        assert_eq!(
            parse_wakes(r#"[["t","u",7]]"#).unwrap(),
            [expect("t", "u", 7, None)]
        );
        assert!(parse_wakes(r#"[["t","u","7"]]"#).is_err());
        // A carried row that is not the announced one is dropped.
        let mismatched = wake_payloads(None, [("t", "u", 9, Some(&small))]);
        assert_eq!(
            parse_wakes(&mismatched[0]).unwrap(),
            [expect("t", "u", 9, None)]
        );
    }

    #[test]
    fn json_arrays_split_under_the_notify_limit_and_keep_every_item_in_order() {
        assert!(json_arrays(Vec::<i64>::new()).is_empty());
        let users: Vec<(String, String, i64)> = (0..2_000)
            .map(|i| ("tenant".to_owned(), format!("user-{i}"), i))
            .collect();
        let arrays = json_arrays(&users);
        assert!(arrays.len() > 1);
        let mut back = Vec::new();
        for array in &arrays {
            assert!(array.len() <= NOTIFY_PAYLOAD_BYTES, "{}", array.len());
            let items: Vec<(String, String, i64)> = serde_json::from_str(array).unwrap();
            back.extend(items);
        }
        assert_eq!(back, users);
        // An item too large for the limit goes alone (PostgreSQL then refuses it, loudly).
        let huge = "x".repeat(NOTIFY_PAYLOAD_BYTES);
        assert_eq!(json_arrays(["a", huge.as_str(), "b"]).len(), 3);
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// A wake-up to announce: tenant, user (any printable text, quotes and all), seq,
        /// and maybe its row, small or too large to carry.
        fn wake() -> impl Strategy<Value = (String, String, i64, Option<StoredNotification>)> {
            (
                "[A-Za-z0-9_-]{1,64}",
                prop_oneof![3 => "[a-z0-9]{1,12}", 1 => "[^\\p{Cc}]{1,200}"],
                1i64..i64::MAX,
                prop::option::of(prop_oneof![
                    3 => "\\PC{0,60}",
                    1 => (5_500usize..6_200).prop_map(|n| "\"".repeat(n / 2)),
                ]),
            )
                .prop_map(|(tenant, user, seq, body)| {
                    let row = body.map(|body| row(seq, &body));
                    (tenant, user, seq, row)
                })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(200))]

            /// Whatever the users and rows, the wake-ups fit PostgreSQL's NOTIFY (under
            /// 8 000 bytes each), name their instance, and are heard exactly as announced, in
            /// order: each with its row when the row is small enough to carry, else without.
            #[test]
            fn wake_ups_fit_a_notify_and_are_heard_as_announced(
                wakes in prop::collection::vec(wake(), 1..40),
                from in prop::option::of("[a-z0-9-]{1,40}"),
            ) {
                let payloads = wake_payloads(
                    from.as_deref(),
                    wakes.iter().map(|(t, u, seq, row)| (t.as_str(), u.as_str(), *seq, row.as_ref())),
                );
                for payload in &payloads {
                    prop_assert!(payload.len() < 8_000, "{} bytes", payload.len());
                    if let Some(from) = &from {
                        prop_assert!(payload.starts_with(&own_prefix(from)));
                    }
                }
                let heard: Vec<Wake> = payloads
                    .iter()
                    .map(|p| parse_wakes(p))
                    .collect::<serde_json::Result<Vec<_>>>()
                    .map_err(|e| TestCaseError::fail(e.to_string()))?
                    .into_iter()
                    .flatten()
                    .collect();
                let expected: Vec<Wake> = wakes
                    .into_iter()
                    .map(|(tenant, user, seq, row)| Wake {
                        tenant,
                        user,
                        seq,
                        row: row.filter(|r| {
                            serde_json::to_string(r).unwrap().len() <= ROW_IN_NOTIFY_BYTES
                        }),
                    })
                    .collect();
                prop_assert_eq!(heard, expected);
            }
        }
    }
}
