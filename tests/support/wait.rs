//! How long the tests wait, and polling a condition until it holds.

use std::time::Duration;

/// Generous: a cold broker creates its consumer-offsets topic on the first group join.
pub const WAIT: Duration = Duration::from_secs(60);

/// Polls `check` until it holds, or fails with `what` after [`WAIT`].
pub async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not after {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
