//! Reading a world's database: a pool on it, counts, and polling a count until it is what a
//! test waits for.

use std::time::Duration;

use sqlx::PgPool;

use super::world::World;

impl World {
    pub async fn pool(&self) -> PgPool {
        PgPool::connect(&self.db_url).await.unwrap()
    }

    /// Polls `query` (a single BIGINT) until it equals `want`, or fails after `timeout`.
    pub async fn wait_count(&self, query: &str, want: i64, timeout: Duration) {
        self.wait_until(query, |n| n == want, timeout).await;
    }

    /// Polls `query` (a single BIGINT) until `ok` holds, or fails after `timeout`.
    pub async fn wait_until(&self, query: &str, ok: impl Fn(i64) -> bool, timeout: Duration) {
        let pool = self.pool().await;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let (n,): (i64,) = sqlx::query_as(query)
                .fetch_one(&pool)
                .await
                .unwrap_or((-1,));
            if ok(n) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{query}: still {n} after {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn count(&self, query: &str) -> i64 {
        let pool = self.pool().await;
        let (n,): (i64,) = sqlx::query_as(query).fetch_one(&pool).await.unwrap();
        n
    }
}

/// `url` with its database name replaced by `db`.
pub fn replace_database(url: &str, db: &str) -> String {
    let (base, _) = url
        .rsplit_once('/')
        .expect("DATABASE_URL has a database name");
    format!("{base}/{db}")
}
