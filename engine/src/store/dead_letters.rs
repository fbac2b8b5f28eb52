//! `dead_letters`: messages the engine could not handle, kept with their bytes and headers
//! so an operator can list and replay them. A replay carries a one-time token; accepting it
//! inside the replayed event's transaction releases the event's dead-lettered claim in
//! `processed_events`, so the event is routed again.
//!
//! A token is worth something only for the message it was issued for: the dead letter's
//! exact payload (its SHA-256), its topic, and its tenant and event id when it had them; and
//! only until `kafka.replay_token_ttl_secs` after it was issued. It is checked before the
//! message is routed ([`check_replay`]) and again, atomically, where it is accepted.

use std::time::Duration;

use serde_json::Value;
use sha2::{Digest, Sha256};
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
/// token, from a replay whose message never arrived, stops counting), issued now.
pub async fn prepare_replays(pool: &PgPool, filter: &DeadLetterFilter) -> Result<Vec<Replay>> {
    let sql = format!(
        "UPDATE dead_letters SET replay_token = gen_random_uuid(), replay_token_at = now()
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

/// A message that carries a replay token, as far as the token's binding goes.
#[derive(Debug, Clone, Copy)]
pub struct ReplayClaim<'a> {
    pub token: uuid::Uuid,
    pub topic: &'a str,
    /// The tenant and event id it decoded to (`None`: it did not decode).
    pub tenant: Option<&'a str>,
    pub event_id: Option<&'a str>,
    pub payload: &'a [u8],
}

impl ReplayClaim<'_> {
    fn payload_sha256(&self) -> Vec<u8> {
        Sha256::digest(self.payload).to_vec()
    }
}

/// What a replay token is worth for the message that carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplayCheck {
    /// Issued for this message, unused and not expired: it is routed again, once.
    Valid,
    /// Issued for this message and already accepted: a redelivery of the replay, which the
    /// event's claim decides as any other.
    Used,
    /// Not a token the engine knows: never issued, or replaced by a later replay of its dead
    /// letter (the operator ran the command again before the first replay arrived). It
    /// grants nothing: the message is handled as any other, a duplicate if its event was
    /// claimed (and its dead letter, kept, waits for the later replay).
    Unknown,
    /// Not a token for this message: why, for the dead letter the message becomes.
    Refused(String),
}

/// The dead letter a token was issued for, as [`judge_replay`] needs it.
#[derive(Debug, Clone, FromRow)]
pub struct TokenRow {
    pub id: i64,
    pub kafka_topic: String,
    pub tenant_id: Option<String>,
    pub event_id: Option<String>,
    pub same_payload: bool,
    pub used: bool,
    pub fresh: bool,
}

/// The verdict on `claim`, given the dead letter its token names (if any).
pub fn judge_replay(row: Option<TokenRow>, claim: &ReplayClaim<'_>, ttl: Duration) -> ReplayCheck {
    let Some(row) = row else {
        return ReplayCheck::Unknown;
    };
    let id = row.id;
    let bound_to = |what: &str| {
        ReplayCheck::Refused(format!(
            "the replay token of dead letter {id} was issued for another {what}; a token replays only the message it was issued for"
        ))
    };
    if !row.same_payload {
        return bound_to("payload");
    }
    if row.kafka_topic != claim.topic {
        return bound_to("topic");
    }
    if row.tenant_id.is_some() && row.tenant_id.as_deref() != claim.tenant {
        return bound_to("tenant");
    }
    if row.event_id.is_some() && row.event_id.as_deref() != claim.event_id {
        return bound_to("event id");
    }
    if row.used {
        return ReplayCheck::Used;
    }
    if !row.fresh {
        return ReplayCheck::Refused(format!(
            "the replay token of dead letter {id} expired (kafka.replay_token_ttl_secs = {}); the dead letter is kept: replay it again",
            ttl.as_secs()
        ));
    }
    ReplayCheck::Valid
}

/// Checks a replay token before its message is routed (see [`judge_replay`]).
pub async fn check_replay(
    pool: &PgPool,
    claim: &ReplayClaim<'_>,
    ttl: Duration,
) -> Result<ReplayCheck> {
    let row: Option<TokenRow> = sqlx::query_as(
        "SELECT id, kafka_topic, tenant_id, event_id,
                sha256(payload) = $2 AS same_payload,
                replayed_at IS NOT NULL AS used,
                coalesce(replay_token_at > now() - make_interval(secs => $3), false) AS fresh
         FROM dead_letters WHERE replay_token = $1",
    )
    .bind(claim.token)
    .bind(claim.payload_sha256())
    .bind(ttl.as_secs_f64())
    .fetch_optional(pool)
    .await?;
    Ok(judge_replay(row, claim, ttl))
}

/// The binding of [`judge_replay`] in SQL, for the statements that use a token up: the same
/// token, unused, fresh, for the same payload and topic, and (when the dead letter has
/// them) the same tenant and event id. `$1` token, `$2` tenant, `$3` event id, `$4` payload
/// SHA-256, `$5` topic, `$6` time to live in seconds.
const TOKEN_BINDS: &str = "replay_token = $1 AND replayed_at IS NULL
    AND replay_token_at > now() - make_interval(secs => $6)
    AND sha256(payload) = $4 AND kafka_topic = $5
    AND (tenant_id IS NULL OR tenant_id = $2)
    AND (event_id IS NULL OR event_id = $3)";

/// Accepts a replay token once, inside the transaction that handles the replayed event:
/// marks the dead letter replayed and releases the event's dead-lettered claim, so the
/// event is routed again. `false` (used meanwhile, expired since it was checked): the
/// message is an ordinary redelivery, and the claim decides as usual.
pub async fn accept_replay(
    tx: &mut PgConnection,
    claim: &ReplayClaim<'_>,
    ttl: Duration,
) -> Result<bool> {
    let (Some(tenant), Some(event_id)) = (claim.tenant, claim.event_id) else {
        return Ok(false);
    };
    let accepted: Option<(String, i32, i64)> = sqlx::query_as(&format!(
        "UPDATE dead_letters SET replayed_at = now()
         WHERE {TOKEN_BINDS}
         RETURNING kafka_topic, kafka_partition, kafka_offset"
    ))
    .bind(claim.token)
    .bind(tenant)
    .bind(event_id)
    .bind(claim.payload_sha256())
    .bind(claim.topic)
    .bind(ttl.as_secs_f64())
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
pub async fn mark_replayed(
    tx: &mut PgConnection,
    claim: &ReplayClaim<'_>,
    ttl: Duration,
) -> Result<()> {
    sqlx::query(&format!(
        "UPDATE dead_letters SET replayed_at = now() WHERE {TOKEN_BINDS}"
    ))
    .bind(claim.token)
    .bind(claim.tenant)
    .bind(claim.event_id)
    .bind(claim.payload_sha256())
    .bind(claim.topic)
    .bind(ttl.as_secs_f64())
    .execute(&mut *tx)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row() -> TokenRow {
        TokenRow {
            id: 7,
            kafka_topic: "orders".into(),
            tenant_id: Some("acme".into()),
            event_id: Some("e1".into()),
            same_payload: true,
            used: false,
            fresh: true,
        }
    }

    fn claim() -> ReplayClaim<'static> {
        ReplayClaim {
            token: uuid::Uuid::nil(),
            topic: "orders",
            tenant: Some("acme"),
            event_id: Some("e1"),
            payload: b"{}",
        }
    }

    fn refused(check: ReplayCheck) -> String {
        match check {
            ReplayCheck::Refused(why) => why,
            other => panic!("not refused: {other:?}"),
        }
    }

    #[test]
    fn a_token_counts_only_for_its_own_message_and_while_fresh() {
        let ttl = Duration::from_secs(60);
        assert_eq!(judge_replay(Some(row()), &claim(), ttl), ReplayCheck::Valid);
        assert_eq!(judge_replay(None, &claim(), ttl), ReplayCheck::Unknown);
        let moved = TokenRow {
            same_payload: false,
            ..row()
        };
        assert!(refused(judge_replay(Some(moved), &claim(), ttl)).contains("another payload"));
        let elsewhere = ReplayClaim {
            topic: "other",
            ..claim()
        };
        assert!(refused(judge_replay(Some(row()), &elsewhere, ttl)).contains("another topic"));
        let other_event = ReplayClaim {
            event_id: Some("e2"),
            ..claim()
        };
        assert!(refused(judge_replay(Some(row()), &other_event, ttl)).contains("another event id"));
        let other_tenant = ReplayClaim {
            tenant: Some("globex"),
            ..claim()
        };
        assert!(refused(judge_replay(Some(row()), &other_tenant, ttl)).contains("another tenant"));
        let stale = TokenRow {
            fresh: false,
            ..row()
        };
        assert!(refused(judge_replay(Some(stale), &claim(), ttl)).contains("expired"));
        // A redelivered replay: used, not refused (its claim makes it a duplicate) ...
        let used = TokenRow {
            used: true,
            fresh: false,
            ..row()
        };
        assert_eq!(judge_replay(Some(used), &claim(), ttl), ReplayCheck::Used);
        // ... unless it is not the message the token was issued for.
        let used_moved = TokenRow {
            used: true,
            same_payload: false,
            ..row()
        };
        assert!(refused(judge_replay(Some(used_moved), &claim(), ttl)).contains("another payload"));
        // A dead letter that never decoded binds by payload and topic alone.
        let undecoded = TokenRow {
            tenant_id: None,
            event_id: None,
            ..row()
        };
        let as_undecoded = ReplayClaim {
            tenant: None,
            event_id: None,
            ..claim()
        };
        assert_eq!(
            judge_replay(Some(undecoded), &as_undecoded, ttl),
            ReplayCheck::Valid
        );
    }
}
