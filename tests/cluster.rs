//! Several instances of the engine on one database: what a stream on one instance hears of
//! rows committed on another.

use std::time::Duration;

use super::WAIT;
use super::support::*;

/// Two instances: one consumes the topics, the other consumes nothing (another topic, its
/// own group). A stream on the second hears of the notification the first wrote, and of an
/// inbox change made through the first's API, by PostgreSQL NOTIFY.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_on_any_instance_hears_of_rows_committed_on_another() {
    let world = World::new().await;
    let consumer = world.start(world.config()).await;
    let idle_topic = format!("idle-{}", unique("t"));
    create_topics(&world.services.brokers, &[&idle_topic]).await;
    let mut config = world.config();
    config.kafka.topics = vec![idle_topic];
    config.kafka.group_id = unique("group");
    let other = world.start(config).await;

    let tenant = unique("shop");
    let token = world.token(&tenant, "u1");
    let (status, sse, _) = connect_sse(&other, Some(&token), None).await;
    assert_eq!(status, 200);
    let mut sse = sse.unwrap();
    world
        .produce(&order_paid("c1", &tenant, "u1", None, 10.0))
        .await;
    let n = sse
        .next(WAIT)
        .await
        .expect("the notification the other instance consumed");
    assert_eq!(n.event, "notification");
    assert_eq!(n.id.as_deref(), Some("1"));
    assert_eq!(n.data["title"], "Payment received");

    let api = Api::new(&consumer, &token);
    let (status, _) = api.post("/api/v1/notifications/1/read", None).await;
    assert_eq!(status, 200);
    let read = sse
        .next(Duration::from_secs(10))
        .await
        .expect("the read, made through the other instance");
    assert_eq!(read.event, "notification.read");
    assert_eq!(read.data["unread_count"], 0);
    other.shutdown().await;
    consumer.shutdown().await;
}
