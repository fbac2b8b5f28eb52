//! Kafka ingest: the only module that touches rdkafka.
//!
//! The consumer runs with `enable.auto.offset.store=false`: librdkafka auto-commits only
//! offsets we stored explicitly, and the pipeline stores an offset only after the
//! transaction holding that message's outcome has committed. That is the whole no-loss
//! argument; see `ARCHITECTURE.md`.

pub mod envelope;
mod offsets;
pub mod trust;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::consumer::{CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};

use crate::config::KafkaConfig;
use crate::model::REPLAY_HEADER;

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
}

/// One Kafka message, owned, with where it came from.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    /// Kafka headers, in order (the tenant header of `kafka.tenant_from = "header"`).
    pub headers: Vec<(String, Option<Vec<u8>>)>,
    /// When the engine received it, for the latency of the stages after.
    pub received: std::time::Instant,
    /// How long it took from its producer to the engine, when it has a Kafka timestamp.
    pub kafka_delay: Option<std::time::Duration>,
    /// Its Kafka timestamp (the producer's create time, or the broker's log-append time),
    /// when it has one: the time of a CloudEvent that carries no `time`.
    pub timestamp: Option<chrono::DateTime<chrono::Utc>>,
}

impl Incoming {
    /// Bytes it holds in memory: payload, key and headers.
    pub fn size(&self) -> usize {
        self.payload.as_ref().map_or(0, Vec::len)
            + self.key.as_ref().map_or(0, Vec::len)
            + self
                .headers
                .iter()
                .map(|(n, v)| n.len() + v.as_ref().map_or(0, Vec::len))
                .sum::<usize>()
    }

    /// The replay token, if this message claims to be a replayed dead letter: `None`
    /// without the header, `Err` (why) when it is repeated or not a token.
    pub fn replay_token(&self) -> Option<Result<uuid::Uuid, String>> {
        let mut found = self.headers.iter().filter(|(n, _)| n == REPLAY_HEADER);
        let (_, value) = found.next()?;
        if found.next().is_some() {
            return Some(Err(format!(
                "the {REPLAY_HEADER} header appears more than once"
            )));
        }
        Some(
            value
                .as_deref()
                .and_then(|v| std::str::from_utf8(v).ok())
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| format!("the {REPLAY_HEADER} header is not a replay token")),
        )
    }
}

/// Logs partition assignments and forgets revoked partitions' in-flight offsets (their
/// next owner re-reads them); librdkafka commits stored offsets on revocation itself.
struct IngestContext {
    offsets: Arc<Mutex<offsets::OffsetTracker>>,
    revoked: tokio::sync::mpsc::UnboundedSender<(String, i32)>,
    /// Bumped on every assignment, before any message of it is returned.
    assignments: Arc<AtomicU64>,
}

impl ClientContext for IngestContext {}

impl ConsumerContext for IngestContext {
    fn pre_rebalance(&self, consumer: &rdkafka::consumer::BaseConsumer<Self>, r: &Rebalance) {
        match r {
            Rebalance::Revoke(tpl) => {
                tracing::info!(partitions = %describe(tpl), "partitions revoked");
                // librdkafka keeps a partition's pause flag across revoke and reassign: a
                // partition paused behind a full lane and given back later would never be
                // read again. Its held messages are dropped (below), so resume it now.
                if let Err(e) = consumer.resume(tpl) {
                    tracing::info!(error = %e, "resuming revoked partitions failed");
                }
                self.forget(tpl);
            }
            Rebalance::Assign(tpl) => {
                tracing::info!(partitions = %describe(tpl), "partitions assigned");
                // Whatever is still in flight from an earlier assignment is re-delivered
                // from the committed offset; its old copies no longer hold the offset back.
                self.forget(tpl);
                self.assignments.fetch_add(1, Ordering::SeqCst);
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
        }
    }
}

impl IngestContext {
    /// Drops the partitions' in-flight offsets and tells the dispatcher to drop their held
    /// messages: their next owner (maybe us) reads them again.
    fn forget(&self, tpl: &TopicPartitionList) {
        let mut offsets = self.offsets.lock().expect("offset lock poisoned");
        for e in tpl.elements() {
            offsets.forget(e.topic(), e.partition());
            let _ = self.revoked.send((e.topic().to_owned(), e.partition()));
        }
    }
}

fn describe(tpl: &TopicPartitionList) -> String {
    tpl.elements()
        .iter()
        .map(|e| format!("{}/{}", e.topic(), e.partition()))
        .collect::<Vec<_>>()
        .join(",")
}

pub struct Ingest {
    consumer: StreamConsumer<IngestContext>,
    offsets: Arc<Mutex<offsets::OffsetTracker>>,
    revoked: tokio::sync::Mutex<tokio::sync::mpsc::UnboundedReceiver<(String, i32)>>,
    assignments: Arc<AtomicU64>,
}

impl Ingest {
    /// Creates the consumer and subscribes; does not wait for the broker.
    pub fn connect(config: &KafkaConfig) -> Result<Self, IngestError> {
        let mut client = base_client_config(config);
        client
            .set("group.id", &config.group_id)
            .set("enable.auto.commit", "true")
            .set("enable.auto.offset.store", "false")
            .set("auto.commit.interval.ms", "1000")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false")
            // A killed instance's partitions wait this long for it (see the config key),
            // with three heartbeats in the window.
            .set("session.timeout.ms", config.session_timeout_ms.to_string())
            .set(
                "heartbeat.interval.ms",
                (config.session_timeout_ms / 3).min(3_000).to_string(),
            )
            // A partition resumed after a full lane paused it is fetched again only once
            // the fetch in flight returns: at most this long, not librdkafka's 500 ms.
            .set("fetch.wait.max.ms", "50");
        let offsets = Arc::new(Mutex::new(offsets::OffsetTracker::default()));
        let (revoked_tx, revoked) = tokio::sync::mpsc::unbounded_channel();
        let assignments = Arc::new(AtomicU64::new(0));
        let consumer: StreamConsumer<IngestContext> =
            client.create_with_context(IngestContext {
                offsets: offsets.clone(),
                revoked: revoked_tx,
                assignments: assignments.clone(),
            })?;
        let topics: Vec<&str> = config.topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics)?;
        Ok(Self {
            consumer,
            offsets,
            revoked: tokio::sync::Mutex::new(revoked),
            assignments,
        })
    }

    /// How many assignments this consumer has had: a message read after this number
    /// changed may come from a partition that was someone else's (whose tenants may have
    /// spilled messages waiting). Bumped before any message of the new assignment is read.
    pub fn assignments(&self) -> u64 {
        self.assignments.load(Ordering::SeqCst)
    }

    /// The next message, recorded as in flight. Transient consumer errors are logged and
    /// waited out: the engine never stops consuming because the broker hiccuped.
    pub async fn recv(&self) -> Incoming {
        loop {
            match self.consumer.recv().await {
                Ok(m) => {
                    let incoming = owned(&m);
                    self.offsets
                        .lock()
                        .expect("offset lock poisoned")
                        .dispatched(&incoming.topic, incoming.partition, incoming.offset);
                    return incoming;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "kafka consumer error");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    /// The partitions this consumer owns now.
    pub fn assignment(&self) -> Vec<(String, i32)> {
        match self.consumer.assignment() {
            Ok(tpl) => tpl
                .elements()
                .iter()
                .map(|e| (e.topic().to_owned(), e.partition()))
                .collect(),
            Err(e) => {
                tracing::warn!(error = %e, "reading the assignment failed");
                Vec::new()
            }
        }
    }

    /// The group's committed offset of each partition this consumer owns that has one: where
    /// it reads from. Asks the broker (blocking, up to a few seconds): call it rarely.
    pub fn committed(&self) -> Result<std::collections::HashMap<(String, i32), i64>, IngestError> {
        let tpl = self.consumer.committed(Duration::from_secs(5))?;
        Ok(tpl
            .elements()
            .iter()
            .filter_map(|e| match e.offset() {
                Offset::Offset(o) => Some(((e.topic().to_owned(), e.partition()), o)),
                _ => None,
            })
            .collect())
    }

    /// A partition taken away by a rebalance (its in-flight offsets are already forgotten).
    pub async fn revoked(&self) -> (String, i32) {
        let mut revoked = self.revoked.lock().await;
        match revoked.recv().await {
            Some(partition) => partition,
            // The consumer (which holds the sender) lives as long as `self`.
            None => std::future::pending().await,
        }
    }

    /// Stops fetching a partition (its messages wait in Kafka) until [`Ingest::resume`].
    pub fn pause(&self, topic: &str, partition: i32) {
        self.flow(topic, partition, true);
    }

    pub fn resume(&self, topic: &str, partition: i32) {
        self.flow(topic, partition, false);
    }

    fn flow(&self, topic: &str, partition: i32, pause: bool) {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(topic, partition);
        let result = if pause {
            self.consumer.pause(&tpl)
        } else {
            self.consumer.resume(&tpl)
        };
        match result {
            Ok(()) => tracing::debug!(topic, partition, pause, "partition flow changed"),
            // Revoked meanwhile: nothing to pause or resume.
            Err(e) => {
                tracing::info!(topic, partition, pause, error = %e, "partition flow unchanged")
            }
        }
    }

    /// Marks messages whose outcomes are committed as finished, and stores each affected
    /// partition's safe offset (its lowest unfinished message). Only call after COMMIT.
    pub fn finished(&self, handled: &[&Incoming]) -> Result<(), IngestError> {
        let mut safe: BTreeMap<(&str, i32), i64> = BTreeMap::new();
        {
            let mut offsets = self.offsets.lock().expect("offset lock poisoned");
            for m in handled {
                if let Some(offset) = offsets.finished(&m.topic, m.partition, m.offset) {
                    safe.insert((&m.topic, m.partition), offset);
                }
            }
        }
        self.store(safe)
    }

    fn store(&self, safe: BTreeMap<(&str, i32), i64>) -> Result<(), IngestError> {
        if safe.is_empty() {
            return Ok(());
        }
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), offset) in safe {
            tpl.add_partition_offset(topic, partition, Offset::Offset(offset))?;
        }
        match self.consumer.store_offsets(&tpl) {
            Ok(()) => Ok(()),
            // The partition was revoked meanwhile; its new owner re-reads these messages
            // and the duplicate filter drops them.
            Err(KafkaError::StoreOffset(code)) => {
                tracing::info!(error = %code, "offset not stored (partition no longer assigned)");
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Commits stored offsets synchronously; used on shutdown so nothing finished is
    /// re-read by the next owner.
    pub fn commit_stored(&self) {
        match self.consumer.commit_consumer_state(CommitMode::Sync) {
            Ok(()) => tracing::info!("final offsets committed"),
            // Nothing stored yet is not an error worth a warning.
            Err(KafkaError::ConsumerCommit(rdkafka::types::RDKafkaErrorCode::NoOffset)) => {}
            Err(e) => tracing::warn!(error = %e, "final offset commit failed"),
        }
    }
}

/// Is the broker reachable? A metadata request with a short timeout, off the async runtime
/// (librdkafka blocks).
pub async fn probe(config: &KafkaConfig) -> bool {
    let client = base_client_config(config);
    tokio::task::spawn_blocking(move || {
        let Ok(consumer) = client.create::<rdkafka::consumer::BaseConsumer>() else {
            return false;
        };
        consumer
            .fetch_metadata(None, Duration::from_secs(2))
            .is_ok()
    })
    .await
    .unwrap_or(false)
}

/// Settings shared by every client: brokers plus the operator's pass-through properties
/// (security protocol, SASL, TLS).
fn base_client_config(config: &KafkaConfig) -> ClientConfig {
    let mut client = ClientConfig::new();
    client.set("bootstrap.servers", &config.brokers);
    for (k, v) in &config.properties {
        client.set(k, v);
    }
    client
}

/// How long a message took from its producer to the engine: now minus its Kafka timestamp
/// (the producer's create time, or the broker's log-append time), when it has one.
fn kafka_delay(m: &rdkafka::message::BorrowedMessage<'_>) -> Option<std::time::Duration> {
    let at = m.timestamp().to_millis()?;
    let now = chrono::Utc::now().timestamp_millis();
    Some(std::time::Duration::from_millis((now - at).max(0) as u64))
}

fn owned(m: &rdkafka::message::BorrowedMessage<'_>) -> Incoming {
    Incoming {
        received: std::time::Instant::now(),
        kafka_delay: kafka_delay(m),
        timestamp: m
            .timestamp()
            .to_millis()
            .and_then(chrono::DateTime::from_timestamp_millis),
        topic: m.topic().to_owned(),
        partition: m.partition(),
        offset: m.offset(),
        key: m.key().map(<[u8]>::to_vec),
        payload: m.payload().map(<[u8]>::to_vec),
        headers: m
            .headers()
            .map(|headers| {
                headers
                    .iter()
                    .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
                    .collect()
            })
            .unwrap_or_default(),
    }
}

/// A small producer for the tools (sample traffic, tests' helpers): lives here because
/// only `ingest` touches rdkafka.
pub struct Publisher {
    producer: FutureProducer,
}

impl Publisher {
    pub fn connect(config: &KafkaConfig) -> Result<Self, IngestError> {
        let mut client = base_client_config(config);
        client
            .set("enable.idempotence", "true")
            .set("message.timeout.ms", "10000");
        Ok(Self {
            producer: client.create()?,
        })
    }

    pub async fn send(
        &self,
        topic: &str,
        key: Option<&str>,
        payload: &[u8],
    ) -> Result<(i32, i64), IngestError> {
        self.send_raw(topic, key.map(str::as_bytes), payload, &[])
            .await
    }

    /// Sends raw key bytes and headers (a replayed dead letter, its replay token).
    pub async fn send_raw(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        payload: &[u8],
        headers: &[(&str, Option<&[u8]>)],
    ) -> Result<(i32, i64), IngestError> {
        let mut owned = rdkafka::message::OwnedHeaders::new();
        for (name, value) in headers {
            owned = owned.insert(rdkafka::message::Header {
                key: name,
                value: *value,
            });
        }
        let mut record = FutureRecord::<[u8], [u8]>::to(topic)
            .payload(payload)
            .headers(owned);
        if let Some(k) = key {
            record = record.key(k);
        }
        let delivery = self
            .producer
            .send(record, Duration::from_secs(10))
            .await
            .map_err(|(e, _)| e)?;
        Ok((delivery.partition, delivery.offset))
    }
}
