//! Producing to Kafka as the tests' producers do (keyed envelopes, raw bytes, headers, one
//! partition), and creating the topics a world consumes.

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::FutureRecord;
use serde_json::Value;

use super::world::World;

impl World {
    /// Produces raw bytes to a topic, unkeyed.
    pub async fn produce_raw(&self, topic: &str, payload: &[u8]) {
        self.produce_keyed(topic, None, payload).await;
    }

    async fn produce_keyed(&self, topic: &str, key: Option<&str>, payload: &[u8]) {
        self.produce_with_headers(topic, key, payload, &[]).await;
    }

    /// Produces raw bytes with Kafka headers (a gateway's tenant header, say).
    pub async fn produce_with_headers(
        &self,
        topic: &str,
        key: Option<&str>,
        payload: &[u8],
        headers: &[(&str, &str)],
    ) {
        let mut owned = rdkafka::message::OwnedHeaders::new();
        for (name, value) in headers {
            owned = owned.insert(rdkafka::message::Header {
                key: name,
                value: Some(*value),
            });
        }
        let mut record = FutureRecord::<str, [u8]>::to(topic)
            .payload(payload)
            .headers(owned);
        if let Some(k) = key {
            record = record.key(k);
        }
        self.producer
            .send(record, Duration::from_secs(10))
            .await
            .map_err(|(e, _)| e)
            .expect("producing to Kafka");
    }

    /// Produces an envelope to one partition of the topic matching its type.
    pub async fn produce_to_partition(&self, event: &Value, partition: i32) {
        let topic = match event["type"].as_str() {
            Some("order_status_updated") => &self.topic_status,
            _ => &self.topic_paid,
        };
        let payload = event.to_string();
        self.producer
            .send(
                FutureRecord::<str, str>::to(topic)
                    .payload(&payload)
                    .partition(partition),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)
            .expect("producing to Kafka");
    }

    /// Produces an envelope to the topic matching its type, keyed by tenant and user as
    /// producers are expected to (one user's events stay in order on one partition).
    pub async fn produce(&self, event: &Value) {
        let topic = match event["type"].as_str() {
            Some("order_status_updated") => &self.topic_status,
            _ => &self.topic_paid,
        };
        let key = format!(
            "{}/{}",
            event["tenant"].as_str().unwrap_or_default(),
            event["data"]["user_id"].as_str().unwrap_or_default()
        );
        self.produce_keyed(topic, Some(&key), event.to_string().as_bytes())
            .await;
    }
}

pub async fn create_topics(brokers: &str, topics: &[&str]) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("creating a Kafka admin client");
    let new: Vec<NewTopic> = topics
        .iter()
        .map(|t| NewTopic::new(t, 3, TopicReplication::Fixed(1)))
        .collect();
    let results = admin
        .create_topics(
            &new,
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .expect("creating topics (is Kafka up? scripts/services.sh up)");
    for r in results {
        r.expect("topic created");
    }
}
