//! `spilled_messages` and `spill_leases`: a slow tenant's messages set aside durably, so that
//! the other tenants on its partitions pass it (`pipeline::spill` says when and why).
//!
//! A spilled row is the message as Kafka gave it (key, payload, headers, where it came from,
//! when it arrived). Rows are written in batches; a tenant's rows are drained in each
//! partition's offset order by the one instance holding the tenant's lease (of the
//! partitions it owns), and deleted in the transaction that commits their outcome
//! ([`drained`]).

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{FromRow, PgConnection, PgPool};

use super::Result;

/// A message to spill.
pub struct NewSpill<'a> {
    pub tenant: &'a str,
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<&'a [u8]>,
    pub payload: Option<&'a [u8]>,
    pub headers: &'a [(String, Option<Vec<u8>>)],
    pub size: usize,
    /// How long ago the engine received it (its latency keeps counting from then).
    pub age: Duration,
    /// Its Kafka timestamp, kept for what takes it (a CloudEvent without `time`).
    pub timestamp: Option<DateTime<Utc>>,
}

/// Writes `rows` in one statement. A message already spilled (re-read from Kafka after a
/// crash) is not spilled twice.
pub async fn spill(pool: &PgPool, rows: &[NewSpill<'_>]) -> Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    let headers: Vec<String> = rows
        .iter()
        .map(|r| encode_headers(r.headers).to_string())
        .collect();
    sqlx::query(
        "INSERT INTO spilled_messages
             (tenant_id, topic, partition, kafka_offset, msg_key, payload, headers, size,
              received_at, kafka_timestamp)
         SELECT t, tp, p, o, k, pl, h::jsonb, s, now() - make_interval(secs => a), ts
         FROM UNNEST($1::text[], $2::text[], $3::int[], $4::bigint[], $5::bytea[],
                     $6::bytea[], $7::text[], $8::int[], $9::float8[], $10::timestamptz[])
              WITH ORDINALITY AS x (t, tp, p, o, k, pl, h, s, a, ts, n)
         ORDER BY n
         ON CONFLICT (topic, partition, kafka_offset) DO NOTHING",
    )
    .bind(rows.iter().map(|r| r.tenant).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.topic).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.partition).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.offset).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.key).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.payload).collect::<Vec<_>>())
    .bind(&headers)
    .bind(rows.iter().map(|r| r.size as i32).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.age.as_secs_f64()).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.timestamp).collect::<Vec<_>>())
    .execute(pool)
    .await?;
    Ok(())
}

/// A tenant's spill on one partition, in rows and bytes, and its oldest offset.
#[derive(Debug, Clone, PartialEq, Eq, FromRow)]
pub struct Backlog {
    pub tenant_id: String,
    pub topic: String,
    pub partition: i32,
    pub rows: i64,
    pub bytes: i64,
    pub first_offset: i64,
}

/// The spilled rows of `partitions`, by tenant and partition: a new owner of partitions must
/// know them before it hands any of their tenants' fresh messages to a lane directly.
pub async fn backlogs(pool: &PgPool, partitions: &[(String, i32)]) -> Result<Vec<Backlog>> {
    let (topics, numbers) = split(partitions);
    Ok(sqlx::query_as(
        "SELECT tenant_id, topic, partition, count(*) AS rows, sum(size)::bigint AS bytes,
                min(kafka_offset) AS first_offset
         FROM spilled_messages
         WHERE (topic, partition) IN (SELECT * FROM UNNEST($1::text[], $2::int[]))
         GROUP BY tenant_id, topic, partition",
    )
    .bind(topics)
    .bind(numbers)
    .fetch_all(pool)
    .await?)
}

fn split(partitions: &[(String, i32)]) -> (Vec<&str>, Vec<i32>) {
    partitions.iter().map(|(t, p)| (t.as_str(), *p)).unzip()
}

/// Takes or renews `tenant`'s lease for `holder` (an instance id) for `lease`; `false` if
/// another instance holds it and its lease has not run out.
pub async fn lease(pool: &PgPool, tenant: &str, holder: &str, lease: Duration) -> Result<bool> {
    let row: Option<(String,)> = sqlx::query_as(
        "INSERT INTO spill_leases (tenant_id, holder, expires_at)
         VALUES ($1, $2, now() + make_interval(secs => $3))
         ON CONFLICT (tenant_id) DO UPDATE
             SET holder = EXCLUDED.holder, expires_at = EXCLUDED.expires_at
             WHERE spill_leases.holder = EXCLUDED.holder OR spill_leases.expires_at < now()
         RETURNING holder",
    )
    .bind(tenant)
    .bind(holder)
    .bind(lease.as_secs_f64())
    .fetch_optional(pool)
    .await?;
    Ok(row.is_some())
}

/// Gives `tenant`'s lease up (its spill is empty), if `holder` has it.
pub async fn release(pool: &PgPool, tenant: &str, holder: &str) -> Result<()> {
    sqlx::query("DELETE FROM spill_leases WHERE tenant_id = $1 AND holder = $2")
        .bind(tenant)
        .bind(holder)
        .execute(pool)
        .await?;
    Ok(())
}

/// A spilled message, as it came from Kafka.
#[derive(Debug, Clone, FromRow)]
pub struct Spilled {
    pub id: i64,
    pub topic: String,
    pub partition: i32,
    pub kafka_offset: i64,
    pub msg_key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: sqlx::types::Json<Value>,
    pub size: i32,
    /// Seconds since the engine received it.
    pub age_secs: f64,
    pub kafka_timestamp: Option<DateTime<Utc>>,
}

impl Spilled {
    /// Its Kafka headers, in order.
    pub fn headers(&self) -> Vec<(String, Option<Vec<u8>>)> {
        decode_headers(&self.headers.0)
    }
}

/// `tenant`'s oldest spilled messages of `partitions`, at most `limit`, each partition's in
/// offset order (a message re-read after a crash and spilled again keeps its place).
pub async fn oldest(
    pool: &PgPool,
    tenant: &str,
    partitions: &[(String, i32)],
    limit: usize,
) -> Result<Vec<Spilled>> {
    let (topics, numbers) = split(partitions);
    Ok(sqlx::query_as(
        "SELECT id, topic, partition, kafka_offset, msg_key, payload, headers, size,
                extract(epoch FROM now() - received_at)::float8 AS age_secs, kafka_timestamp
         FROM spilled_messages
         WHERE tenant_id = $1
           AND (topic, partition) IN (SELECT * FROM UNNEST($2::text[], $3::int[]))
         ORDER BY topic, partition, kafka_offset LIMIT $4",
    )
    .bind(tenant)
    .bind(topics)
    .bind(numbers)
    .bind(limit as i64)
    .fetch_all(pool)
    .await?)
}

/// In the transaction that commits their outcome: the drained rows `ids` go, unless another
/// instance took their tenant's lease meanwhile (its drain then finds them, and their claims
/// make them duplicates). Returns how many went.
pub async fn drained(tx: &mut PgConnection, ids: &[i64], holder: &str) -> Result<u64> {
    if ids.is_empty() {
        return Ok(0);
    }
    let done = sqlx::query(
        "DELETE FROM spilled_messages s USING spill_leases l
         WHERE s.id = ANY($1) AND l.tenant_id = s.tenant_id AND l.holder = $2",
    )
    .bind(ids)
    .bind(holder)
    .execute(&mut *tx)
    .await?;
    Ok(done.rows_affected())
}

/// Headers as stored: `[{"name", "value": base64 | null}]`, every one kept (a replay token
/// too: a spilled replay is still a replay).
fn encode_headers(headers: &[(String, Option<Vec<u8>>)]) -> Value {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    Value::Array(
        headers
            .iter()
            .map(|(name, value)| {
                serde_json::json!({"name": name, "value": value.as_ref().map(|v| b64.encode(v))})
            })
            .collect(),
    )
}

fn decode_headers(stored: &Value) -> Vec<(String, Option<Vec<u8>>)> {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let Value::Array(items) = stored else {
        return Vec::new();
    };
    items
        .iter()
        .filter_map(|h| {
            let name = h.get("name")?.as_str()?.to_owned();
            let value = match h.get("value") {
                Some(Value::String(s)) => Some(b64.decode(s).ok()?),
                _ => None,
            };
            Some((name, value))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_survive_the_spill_in_order_with_empty_values() {
        let headers = vec![
            ("tenant".to_owned(), Some(b"acme".to_vec())),
            ("empty".to_owned(), None),
            ("bin".to_owned(), Some(vec![0, 255, 10])),
        ];
        assert_eq!(decode_headers(&encode_headers(&headers)), headers);
    }
}
