//! The inbox: a user's inbox items (notifications of kind `notification`), listed newest
//! first, counted, marked read and archived.
//!
//! Every function runs in a [`scoped`] transaction for one (tenant, user) and names both in
//! its `WHERE` clause as well: the clause is the first wall, row-level security the second.
//! Ids are the user's sequence numbers (the SSE ids), so an id from another user or tenant
//! simply matches nothing.
//!
//! A change (read, archived) is written to the same log as a `notification.read` or
//! `notification.archived` event in the same transaction, so the user's other streams see
//! it, in order, live or on replay. Only a real change writes one (a repeat of the same
//! state writes nothing), and a change of an item's archive state deletes the item's earlier
//! archive event: the log holds at most one per item, so archiving and unarchiving in a loop
//! cannot grow it, and a stream that had not seen the earlier one still learns the item's
//! latest state from the new one. (Reads need no such care: an item is marked read once.)

use serde_json::{Map, Value, json};
use sqlx::{PgConnection, PgPool, Postgres, Transaction};

use super::notifications::{NewNotification, insert_notifications};
use super::wake::{Lead, Seal, announce};
use super::{Result, scoped};
use crate::model::{ARCHIVED_EVENT, READ_EVENT, StoredNotification};

/// Which archive state a list shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Archived {
    /// Only items not archived (the inbox).
    Exclude,
    /// Only archived items (the archive).
    Only,
    /// Both.
    Include,
}

#[derive(Debug, Clone)]
pub struct ListFilter {
    /// Items older than this id (the cursor); `None`: from the newest.
    pub before: Option<i64>,
    pub limit: i64,
    pub unread_only: bool,
    pub archived: Archived,
    pub category: Option<String>,
}

/// A change and what the user's other streams are told.
#[derive(Debug, Clone)]
pub struct Change<T> {
    pub result: T,
    pub unread_count: i64,
    /// The sequence number of the change event, to publish to the hub after commit;
    /// `None` when nothing changed (no event was written).
    pub event_seq: Option<i64>,
}

/// The columns of a [`StoredNotification`] (an inbox item's kind is always `notification`).
const COLUMNS: &str =
    "seq, event_id, kind, title, body, category, data, created_at, read_at, archived_at";

/// Newest first, at most `limit` items older than the cursor. New items get higher ids, so
/// paging with `before` is stable while notifications arrive.
pub async fn list(
    pool: &PgPool,
    tenant: &str,
    user_id: &str,
    filter: &ListFilter,
) -> Result<Vec<StoredNotification>> {
    let mut tx = scoped(pool, tenant, user_id).await?;
    let archived = match filter.archived {
        Archived::Exclude => "AND archived_at IS NULL",
        Archived::Only => "AND archived_at IS NOT NULL",
        Archived::Include => "",
    };
    let sql = format!(
        "SELECT {COLUMNS} FROM notifications
         WHERE tenant_id = $1 AND user_id = $2 AND kind = 'notification'
           AND ($3::bigint IS NULL OR seq < $3)
           AND (NOT $4 OR read_at IS NULL)
           AND ($5::text IS NULL OR category = $5)
           {archived}
         ORDER BY seq DESC
         LIMIT $6"
    );
    let rows = sqlx::query_as(&sql)
        .bind(tenant)
        .bind(user_id)
        .bind(filter.before)
        .bind(filter.unread_only)
        .bind(filter.category.as_deref())
        .bind(filter.limit)
        .fetch_all(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(rows)
}

pub async fn get(
    pool: &PgPool,
    tenant: &str,
    user_id: &str,
    seq: i64,
) -> Result<Option<StoredNotification>> {
    let mut tx = scoped(pool, tenant, user_id).await?;
    let item = fetch(&mut tx, tenant, user_id, seq).await?;
    tx.commit().await?;
    Ok(item)
}

/// Inbox items neither read nor archived.
pub async fn unread_count(pool: &PgPool, tenant: &str, user_id: &str) -> Result<i64> {
    let mut tx = scoped(pool, tenant, user_id).await?;
    let n = count_unread(&mut tx, tenant, user_id).await?;
    tx.commit().await?;
    Ok(n)
}

/// Marks one item read. `None`: no such item for this user.
pub async fn mark_read(
    pool: &PgPool,
    seal: &Seal,
    tenant: &str,
    user_id: &str,
    seq: i64,
) -> Result<Option<Change<StoredNotification>>> {
    let mut tx = scoped(pool, tenant, user_id).await?;
    lock_stream(&mut tx, tenant, user_id).await?;
    let changed = sqlx::query(
        "UPDATE notifications SET read_at = now()
         WHERE tenant_id = $1 AND user_id = $2 AND kind = 'notification' AND seq = $3 AND read_at IS NULL",
    )
    .bind(tenant)
    .bind(user_id)
    .bind(seq)
    .execute(&mut *tx)
    .await?
    .rows_affected()
        == 1;
    let change = changed.then_some((READ_EVENT, json!({ "ids": [seq], "up_to": null })));
    finish_item_change(tx, seal, tenant, user_id, seq, change).await
}

/// Marks every item up to and including `up_to` read (what the user has seen; newer items
/// stay unread). The result is how many changed.
pub async fn mark_all_read(
    pool: &PgPool,
    seal: &Seal,
    tenant: &str,
    user_id: &str,
    up_to: i64,
) -> Result<Change<u64>> {
    let mut tx = scoped(pool, tenant, user_id).await?;
    lock_stream(&mut tx, tenant, user_id).await?;
    let marked = sqlx::query(
        "UPDATE notifications SET read_at = now()
         WHERE tenant_id = $1 AND user_id = $2 AND kind = 'notification' AND seq <= $3 AND read_at IS NULL",
    )
    .bind(tenant)
    .bind(user_id)
    .bind(up_to)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    let unread_count = count_unread(&mut tx, tenant, user_id).await?;
    let event_seq = if marked > 0 {
        let data = json!({ "ids": [], "up_to": up_to, "unread_count": unread_count });
        Some(log_change(&mut tx, seal, tenant, user_id, READ_EVENT, data).await?)
    } else {
        None
    };
    tx.commit().await?;
    Ok(Change {
        result: marked,
        unread_count,
        event_seq,
    })
}

/// Archives (or unarchives) one item. `None`: no such item for this user.
pub async fn set_archived(
    pool: &PgPool,
    seal: &Seal,
    tenant: &str,
    user_id: &str,
    seq: i64,
    archived: bool,
) -> Result<Option<Change<StoredNotification>>> {
    let mut tx = scoped(pool, tenant, user_id).await?;
    lock_stream(&mut tx, tenant, user_id).await?;
    let changed = sqlx::query(
        "UPDATE notifications
         SET archived_at = CASE WHEN $4 THEN now() ELSE NULL END
         WHERE tenant_id = $1 AND user_id = $2 AND kind = 'notification' AND seq = $3
           AND (archived_at IS NULL) = $4",
    )
    .bind(tenant)
    .bind(user_id)
    .bind(seq)
    .bind(archived)
    .execute(&mut *tx)
    .await?
    .rows_affected()
        == 1;
    if changed {
        supersede_archive_events(&mut tx, tenant, user_id, seq).await?;
    }
    let change = changed.then_some((ARCHIVED_EVENT, json!({ "id": seq, "archived": archived })));
    finish_item_change(tx, seal, tenant, user_id, seq, change).await
}

/// Deletes the item's earlier archive event, which the one about to be written supersedes
/// (the index `notifications_archive_events` finds it; the kind is written out so that a
/// generic plan can use that partial index).
async fn supersede_archive_events(
    conn: &mut PgConnection,
    tenant: &str,
    user_id: &str,
    seq: i64,
) -> Result<()> {
    sqlx::query(SUPERSEDE_ARCHIVE_EVENTS_SQL)
        .bind(tenant)
        .bind(user_id)
        .bind(seq)
        .execute(conn)
        .await?;
    Ok(())
}

const SUPERSEDE_ARCHIVE_EVENTS_SQL: &str = "DELETE FROM notifications
     WHERE tenant_id = $1 AND user_id = $2 AND kind = 'notification.archived'
       AND (data->>'id')::bigint = $3";

/// After one item's UPDATE: the item as it is now and the unread count, and, when it changed,
/// the change event (`data` plus that count) in the user's log; then COMMIT. `None`: no such
/// item for this user.
async fn finish_item_change(
    mut tx: Transaction<'static, Postgres>,
    seal: &Seal,
    tenant: &str,
    user_id: &str,
    seq: i64,
    change: Option<(&str, Value)>,
) -> Result<Option<Change<StoredNotification>>> {
    let Some(item) = fetch(&mut tx, tenant, user_id, seq).await? else {
        return Ok(None);
    };
    let unread_count = count_unread(&mut tx, tenant, user_id).await?;
    let event_seq = match change {
        Some((kind, mut data)) => {
            data["unread_count"] = unread_count.into();
            Some(log_change(&mut tx, seal, tenant, user_id, kind, data).await?)
        }
        None => None,
    };
    tx.commit().await?;
    Ok(Some(Change {
        result: item,
        unread_count,
        event_seq,
    }))
}

/// Takes the user's stream row lock, which every writer of the user's log takes too (the
/// pipeline's inserts, other changes): the unread count read after it, and carried by the
/// change event, is then the count as of this change, in the log's order.
async fn lock_stream(conn: &mut PgConnection, tenant: &str, user_id: &str) -> Result<()> {
    sqlx::query("SELECT 1 FROM user_streams WHERE tenant_id = $1 AND user_id = $2 FOR UPDATE")
        .bind(tenant)
        .bind(user_id)
        .execute(conn)
        .await?;
    Ok(())
}

async fn fetch(
    conn: &mut PgConnection,
    tenant: &str,
    user_id: &str,
    seq: i64,
) -> Result<Option<StoredNotification>> {
    let sql = format!(
        "SELECT {COLUMNS} FROM notifications
         WHERE tenant_id = $1 AND user_id = $2 AND kind = 'notification' AND seq = $3"
    );
    Ok(sqlx::query_as(&sql)
        .bind(tenant)
        .bind(user_id)
        .bind(seq)
        .fetch_optional(conn)
        .await?)
}

async fn count_unread(conn: &mut PgConnection, tenant: &str, user_id: &str) -> Result<i64> {
    let (n,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM notifications
         WHERE tenant_id = $1 AND user_id = $2 AND kind = 'notification'
           AND read_at IS NULL AND archived_at IS NULL",
    )
    .bind(tenant)
    .bind(user_id)
    .fetch_one(conn)
    .await?;
    Ok(n)
}

/// Writes a change event to the user's log; returns its sequence number.
async fn log_change(
    conn: &mut PgConnection,
    seal: &Seal,
    tenant: &str,
    user_id: &str,
    kind: &str,
    data: Value,
) -> Result<i64> {
    let data: Map<String, Value> = match data {
        Value::Object(m) => m,
        _ => unreachable!("change events are objects"),
    };
    let inserted = insert_notifications(
        conn,
        &[NewNotification {
            tenant,
            user_id,
            event_id: "",
            kind,
            title: None,
            body: None,
            category: None,
            data: &data,
        }],
    )
    .await?;
    let [seq] = inserted.seqs[..] else {
        unreachable!("one number per notification")
    };
    // The user's streams on other instances hear of it when it commits (this instance's
    // echo too, as ever: it wakes nobody the API did not already wake).
    announce(conn, seal, Lead::By, [(tenant, user_id, seq, None)]).await?;
    Ok(seq)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_superseding_delete_names_the_archive_event_kind() {
        assert!(SUPERSEDE_ARCHIVE_EVENTS_SQL.contains(&format!("kind = '{ARCHIVED_EVENT}'")));
    }
}
