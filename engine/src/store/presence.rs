//! Cluster-wide presence (migration `20261129000001`): the instances alive, and which users
//! have a stream open on which of them. Every change is NOTIFYed on [`PRESENCE_CHANNEL`] in
//! the transaction that makes it, sealed like the wake-ups ([`super::wake::Seal`]), so the
//! in-memory views of the other instances follow at commit (`cluster::Presence`). The
//! tables are the truth (only the engine's role may write them); the NOTIFYs, which any
//! role could send, count only when their seal verifies ([`parse_news`]).

use std::collections::HashSet;

use sqlx::{PgConnection, PgPool};

use super::Result;
use super::wake::{Lead, Opened, Refusal, Seal, check_user, json_arrays};

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

/// Is `instance` registered, with a heartbeat younger than `ttl_secs`? (Presence news of
/// an instance not alive is not believed.)
pub async fn alive(pool: &PgPool, instance: &str, ttl_secs: u64) -> Result<bool> {
    Ok(sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM engine_instances
                        WHERE id = $1 AND heartbeat_at >= now() - make_interval(secs => $2))",
    )
    .bind(instance)
    .bind(ttl_secs as f64)
    .fetch_one(pool)
    .await?)
}

/// Deletes the instances whose heartbeat is older than `ttl_secs` (with their presence
/// rows) and announces them gone, sealed by `seal`. Returns their ids.
pub async fn expire(pool: &PgPool, seal: &Seal, ttl_secs: u64) -> Result<Vec<String>> {
    let mut tx = pool.begin().await?;
    let gone: Vec<String> = sqlx::query_scalar(
        "DELETE FROM engine_instances
         WHERE heartbeat_at < now() - make_interval(secs => $1)
         RETURNING id",
    )
    .bind(ttl_secs as f64)
    .fetch_all(&mut *tx)
    .await?;
    announce_gone(&mut tx, seal, &gone).await?;
    tx.commit().await?;
    Ok(gone)
}

/// Removes `instance` and its presence rows (a graceful stop), and announces it gone.
pub async fn unregister(pool: &PgPool, seal: &Seal, instance: &str) -> Result<()> {
    let mut tx = pool.begin().await?;
    sqlx::query("DELETE FROM engine_instances WHERE id = $1")
        .bind(instance)
        .execute(&mut *tx)
        .await?;
    announce_gone(&mut tx, seal, &[instance.to_owned()]).await?;
    tx.commit().await?;
    Ok(())
}

async fn announce_gone(tx: &mut PgConnection, seal: &Seal, gone: &[String]) -> Result<()> {
    if gone.is_empty() {
        return Ok(());
    }
    let news = News {
        gone: gone.to_vec(),
        ..News::default()
    };
    let json = serde_json::to_string(&news).expect("strings serialize");
    notify(tx, seal, members(&json)).await
}

/// The members of a JSON object, without its braces (what [`Seal::seal`] wraps).
fn members(object: &str) -> &str {
    &object[1..object.len() - 1]
}

/// Writes `instance`'s users that came online and went offline, in one transaction with
/// their NOTIFYs (split to fit PostgreSQL's payload limit), sealed by `seal`.
pub async fn write(
    pool: &PgPool,
    seal: &Seal,
    instance: &str,
    online: &[User],
    offline: &[User],
) -> Result<()> {
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
            let fields = format!(r#""instance":{},{list}"#, serde_json::json!(instance));
            notify(&mut tx, seal, &fields).await?;
        }
    }
    tx.commit().await?;
    Ok(())
}

/// NOTIFYs the members `fields` of a [`News`], sealed (every instance hears it, the sender
/// too: [`Lead::By`]).
async fn notify(tx: &mut PgConnection, seal: &Seal, fields: &str) -> Result<()> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(PRESENCE_CHANNEL)
        .bind(seal.seal(PRESENCE_CHANNEL, Lead::By, fields))
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// The [`News`] of a verified [`PRESENCE_CHANNEL`] payload. An instance speaks only for
/// itself: users online or offline name their signer as `instance`; every user is a valid
/// (tenant, user), every instance id printable and short.
pub fn parse_news(opened: &Opened<'_>) -> std::result::Result<News, Refusal> {
    let news: News = serde_json::from_str(opened.json).map_err(|_| Refusal::Malformed)?;
    let has_users = !news.online.is_empty() || !news.offline.is_empty();
    if (has_users || !news.instance.is_empty()) && news.instance != opened.signer {
        return Err(Refusal::Invalid("instance"));
    }
    for (tenant, user) in news.online.iter().chain(&news.offline) {
        check_user(tenant, user)?;
    }
    if news
        .gone
        .iter()
        .any(|id| id.is_empty() || id.len() > 64 || id.chars().any(char::is_control))
    {
        return Err(Refusal::Invalid("instance gone"));
    }
    Ok(news)
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
