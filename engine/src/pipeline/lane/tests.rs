//! Unit tests of `lane`: what a lane takes as one batch.

use super::*;

#[tokio::test(start_paused = true)]
async fn a_batch_takes_what_is_queued_up_to_its_size() {
    let (sender, mut queue) = mpsc::channel(16);
    for i in 2..=5 {
        sender.send(i).await.unwrap();
    }
    let batch = next_batch(1, &mut queue, 3, Duration::from_millis(50)).await;
    assert_eq!(batch, [1, 2, 3]);
    // The rest is the next batch's.
    let first = queue.recv().await.unwrap();
    let batch = next_batch(first, &mut queue, 3, Duration::from_millis(50)).await;
    assert_eq!(batch, [4, 5]);
}

#[tokio::test(start_paused = true)]
async fn a_batch_waits_for_more_only_as_long_as_it_lingers() {
    let (sender, mut queue) = mpsc::channel(16);
    let late = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(30)).await;
        sender.send(2).await.unwrap();
        tokio::time::sleep(Duration::from_millis(40)).await;
        sender.send(3).await.unwrap();
        sender
    });
    let started = tokio::time::Instant::now();
    let batch = next_batch(1, &mut queue, 10, Duration::from_millis(50)).await;
    assert_eq!(batch, [1, 2], "3 came after the linger");
    assert_eq!(started.elapsed(), Duration::from_millis(50));
    let _sender = late.await.unwrap();
    assert_eq!(queue.recv().await, Some(3));
}

#[tokio::test(start_paused = true)]
async fn a_batch_ends_when_the_queue_closes() {
    let (sender, mut queue) = mpsc::channel(16);
    sender.send(2).await.unwrap();
    drop(sender);
    let batch = next_batch(1, &mut queue, 10, Duration::from_secs(60)).await;
    assert_eq!(batch, [1, 2]);
}

#[test]
fn a_stall_names_its_cause() {
    let database = Stall::from(crate::store::StoreError::from(sqlx::Error::PoolTimedOut));
    assert_eq!(database.cause(), "database");
    let plugin = Stall::Plugin(crate::plugin::PluginError::NoDefault {
        tenant: "acme".to_owned(),
        reason: "is missing".to_owned(),
    });
    assert_eq!(plugin.cause(), "plugin");
}
