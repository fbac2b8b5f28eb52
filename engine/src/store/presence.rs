//! Cluster-wide presence (migration `20261129000001`): the instances alive, and which users
//! have a stream open on which of them. Every change is NOTIFYed on [`PRESENCE_CHANNEL`] in
//! the transaction that makes it, so the in-memory views of the other instances follow at
//! commit (`cluster::Presence`).

use std::collections::HashSet;

use sqlx::{PgConnection, PgPool};

use super::Result;
use super::wake::json_arrays;

/// The channel on which instances announce presence changes: [`News`] as JSON.
pub const PRESENCE_CHANNEL: &str = "notify_engine_presence";

/// A (tenant, user) pair.
pub type User = (String, String);

/// What one NOTIFY on [`PRESENCE_CHANNEL`] says.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct News {
    /// The instance the users came online or went offline on.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub instance: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub online: Vec<User>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub offline: Vec<User>,
    /// Instances that stopped, or whose heartbeat expired: all their users are offline.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gone: Vec<String>,
}

/// Registers `instance` as alive (again: after an expiry, it re-registers under its id).
pub async fn register(pool: &PgPool, instance: &str) -> Result<()> {
    sqlx::query(
        "INSERT INTO engine_instances (id) VALUES ($1)
         ON CONFLICT (id) DO UPDATE SET heartbeat_at = now()",
    )
    .bind(instance)
    .execute(pool)
    .await?;
    Ok(())
}

/// Refreshes `instance`'s heartbeat; `false` when its row is gone (it was expired while it
/// could not reach the database, and its presence rows with it).
pub async fn heartbeat(pool: &PgPool, instance: &str) -> Result<bool> {
    let updated = sqlx::query("UPDATE engine_instances SET heartbeat_at = now() WHERE id = $1")
        .bind(instance)
        .execute(pool)
        .await?
        .rows_affected();
    Ok(updated == 1)
}

/// Deletes the instances whose heartbeat is older than `ttl_secs` (with their presence
/// rows) and announces them gone. Returns their ids.
pub async fn expire(pool: &PgPool, ttl_secs: u64) -> Result<Vec<String>> {
    let mut tx = pool.begin().await?;
    let gone: Vec<String> = sqlx::query_scalar(
        "DELETE FROM engine_instances
         WHERE heartbeat_at < now() - make_interval(secs => $1)
         RETURNING id",
    )
    .bind(ttl_secs as f64)
    .fetch_all(&mut *tx)
    .await?;
    announce_gone(&mut tx, &gone).await?;
    tx.commit().await?;
    Ok(gone)
}

/// Removes `instance` and its presence rows (a graceful stop), and announces it gone.
pub async fn unregister(pool: &PgPool, instance: &str) -> Result<()> {
    let mut tx = pool.begin().await?;
    sqlx::query("DELETE FROM engine_instances WHERE id = $1")
        .bind(instance)
        .execute(&mut *tx)
        .await?;
    announce_gone(&mut tx, &[instance.to_owned()]).await?;
    tx.commit().await?;
    Ok(())
}

async fn announce_gone(tx: &mut PgConnection, gone: &[String]) -> Result<()> {
    if gone.is_empty() {
        return Ok(());
    }
    let news = News {
        gone: gone.to_vec(),
        ..News::default()
    };
    notify(
        tx,
        &serde_json::to_string(&news).expect("strings serialize"),
    )
    .await
}

/// Writes `instance`'s users that came online and went offline, in one transaction with
/// their NOTIFYs (split to fit PostgreSQL's payload limit).
pub async fn write(pool: &PgPool, instance: &str, online: &[User], offline: &[User]) -> Result<()> {
    let mut tx = pool.begin().await?;
    let columns = |users: &[User]| -> (Vec<String>, Vec<String>) { users.iter().cloned().unzip() };
    if !online.is_empty() {
        let (tenants, users) = columns(online);
        sqlx::query(
            "INSERT INTO presence (instance_id, tenant_id, user_id)
             SELECT $1, * FROM UNNEST($2::text[], $3::text[])
             ON CONFLICT DO NOTHING",
        )
        .bind(instance)
        .bind(tenants)
        .bind(users)
        .execute(&mut *tx)
        .await?;
    }
    if !offline.is_empty() {
        let (tenants, users) = columns(offline);
        sqlx::query(
            "DELETE FROM presence p
             USING UNNEST($2::text[], $3::text[]) AS gone (tenant_id, user_id)
             WHERE p.instance_id = $1 AND p.tenant_id = gone.tenant_id
               AND p.user_id = gone.user_id",
        )
        .bind(instance)
        .bind(tenants)
        .bind(users)
        .execute(&mut *tx)
        .await?;
    }
    for (users, is_online) in [(online, true), (offline, false)] {
        for list in json_arrays(users) {
            let list = format!(
                r#""{}":{list}"#,
                if is_online { "online" } else { "offline" }
            );
            let payload = format!(r#"{{"instance":{},{list}}}"#, serde_json::json!(instance));
            notify(&mut tx, &payload).await?;
        }
    }
    tx.commit().await?;
    Ok(())
}

async fn notify(tx: &mut PgConnection, payload: &str) -> Result<()> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(PRESENCE_CHANNEL)
        .bind(payload)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// Everyone present on a live instance other than `except`: the view an instance starts
/// from (after it listens, so that no change falls between the two).
pub async fn everyone(pool: &PgPool, except: &str) -> Result<Vec<(String, HashSet<User>)>> {
    let rows: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT instance_id, tenant_id, user_id FROM presence WHERE instance_id <> $1
         ORDER BY instance_id",
    )
    .bind(except)
    .fetch_all(pool)
    .await?;
    let mut by_instance: Vec<(String, HashSet<User>)> = Vec::new();
    for (instance, tenant, user) in rows {
        match by_instance.last_mut() {
            Some((last, users)) if *last == instance => {
                users.insert((tenant, user));
            }
            _ => by_instance.push((instance, HashSet::from([(tenant, user)]))),
        }
    }
    Ok(by_instance)
}

/// Every live instance with its heartbeat age and its users, for the admin listing.
#[derive(Debug, Clone, serde::Serialize, sqlx::FromRow)]
pub struct InstanceRow {
    pub id: String,
    pub started_at: chrono::DateTime<chrono::Utc>,
    pub heartbeat_at: chrono::DateTime<chrono::Utc>,
    pub users_online: i64,
}

pub async fn instances(pool: &PgPool) -> Result<Vec<InstanceRow>> {
    Ok(sqlx::query_as(
        "SELECT i.id, i.started_at, i.heartbeat_at, count(p.user_id) AS users_online
         FROM engine_instances i LEFT JOIN presence p ON p.instance_id = i.id
         GROUP BY i.id ORDER BY i.started_at, i.id",
    )
    .fetch_all(pool)
    .await?)
}
