//! `dead_letters`: messages the engine could not handle, kept with their bytes and headers
//! so an operator can list and replay them. A replay carries a one-time token; accepting it
//! inside the replayed event's transaction releases the event's dead-lettered claim in
//! `processed_events`, so the event is routed again.

use serde_json::Value;
use sqlx::{FromRow, PgConnection, PgPool};

use super::{Origin, Result};
use crate::model::REPLAY_HEADER;

/// A message to keep as a dead letter, with why it could not be handled.
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

/// The headers [`encode_headers`] stored; none for a row stored before they were kept.
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
