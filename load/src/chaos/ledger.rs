//! The generator and its ledger: `order_paid` events at a set rate across tenants and users,
//! each written to `ledger.jsonl` once Kafka acknowledged it. A produce that fails (the broker
//! is down) is tried again with the same event id until it is acknowledged, as a real
//! producer would: the topic may then hold an event twice, which the engine must drop.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::watch;

use crate::journal::{Journal, now_ms};

/// One acknowledged event, as the checker reads it back.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Entry {
    pub id: String,
    pub tenant: String,
    pub user: String,
    /// The address its email goes to, when it asks for one.
    pub email: Option<String>,
    pub phase: String,
    /// Produce attempts until Kafka acknowledged it (more than 1: it may be on the topic twice).
    pub attempts: u32,
    pub acked_ms: u64,
}

/// Tenant `c<i>`, user `u<j>`: the run's population.
pub fn tenant(i: usize) -> String {
    format!("c{i}")
}

pub fn user(j: usize) -> String {
    format!("u{j}")
}

/// The tenant whose every event asks the chaos plugin to trap (`data.chaos = "trap"`); the
/// default plugin ignores the field, so only a published chaos plugin fails on them.
pub const BAD_TENANT: &str = "c0";

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Flow {
    Run,
    Pause,
    Stop,
}

/// Who the events are for.
pub struct Mix {
    pub tenants: usize,
    /// Users per tenant.
    pub users: usize,
    /// Share of events that ask for an email.
    pub email_share: f64,
    /// Events per second while producing.
    pub rate: u32,
}

pub struct Generator {
    producer: FutureProducer,
    topic: String,
    seed: u64,
    mix: Mix,
    journal: Journal,
    ledger: Arc<Mutex<std::io::BufWriter<std::fs::File>>>,
    /// Produced and acknowledged.
    pub acked: Arc<AtomicU64>,
    /// Handed to the producer, not yet acknowledged.
    pub in_flight: Arc<AtomicU64>,
}

impl Generator {
    pub fn new(
        brokers: &str,
        topic: &str,
        seed: u64,
        mix: Mix,
        ledger: &std::path::Path,
        journal: Journal,
    ) -> Result<Self> {
        let producer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("linger.ms", "2")
            .set("acks", "all")
            // A broker down for a while fails the attempt after 10 s; the event is tried again.
            .set("message.timeout.ms", "10000")
            .create()
            .context("creating the Kafka producer")?;
        Ok(Self {
            producer,
            topic: topic.to_owned(),
            seed,
            mix,
            journal,
            ledger: Arc::new(Mutex::new(std::io::BufWriter::new(std::fs::File::create(
                ledger,
            )?))),
            acked: Arc::default(),
            in_flight: Arc::default(),
        })
    }

    /// Produces until `flow` says stop, idling while it says pause. Events are spread over
    /// ticks of 10 ms so that the rate is even.
    pub async fn run(self: Arc<Self>, mut flow: watch::Receiver<Flow>) {
        let mut rng = StdRng::seed_from_u64(self.seed);
        let mut n: u64 = 0;
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let per_tick = f64::from(self.mix.rate) / 100.0;
        let mut owed = 0.0;
        loop {
            let now = *flow.borrow();
            match now {
                Flow::Stop => return,
                Flow::Pause => {
                    drop(flow.changed().await);
                    continue;
                }
                Flow::Run => {}
            }
            tick.tick().await;
            owed += per_tick;
            while owed >= 1.0 {
                owed -= 1.0;
                n += 1;
                let mix = &self.mix;
                let t = tenant(rng.random_range(0..mix.tenants));
                let u = user(rng.random_range(0..mix.users));
                let email = rng
                    .random_bool(mix.email_share)
                    .then(|| format!("{u}@{t}.chaos.test"));
                let entry = Entry {
                    id: format!("{}-{n}", self.seed),
                    tenant: t,
                    user: u,
                    email,
                    phase: self.journal.phase(),
                    attempts: 0,
                    acked_ms: 0,
                };
                self.in_flight.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(self.clone().produce(entry));
            }
        }
    }

    async fn produce(self: Arc<Self>, mut entry: Entry) {
        let mut data = json!({
            "user_id": entry.user,
            "order_id": format!("C-{}", entry.id),
            "amount": 10.5,
            "currency": "EUR",
        });
        if let Some(email) = &entry.email {
            data["email"] = json!(email);
        }
        if entry.tenant == BAD_TENANT {
            data["chaos"] = json!("trap");
        }
        let payload = json!({
            "id": entry.id,
            "tenant": entry.tenant,
            "type": "order_paid",
            "time": chrono::Utc::now().to_rfc3339(),
            "data": data,
        })
        .to_string();
        // Keyed by user: one user's events keep their order on one partition.
        let key = format!("{}/{}", entry.tenant, entry.user);
        loop {
            entry.attempts += 1;
            let record = FutureRecord::to(&self.topic).key(&key).payload(&payload);
            match self.producer.send(record, Duration::from_secs(30)).await {
                Ok(_) => break,
                Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        }
        entry.acked_ms = now_ms();
        let line = serde_json::to_string(&entry).expect("an entry serializes");
        {
            let mut ledger = self.ledger.lock().unwrap();
            let _ = writeln!(ledger, "{line}");
        }
        self.acked.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    /// Waits until every event handed to the producer is acknowledged, then flushes the
    /// ledger.
    pub async fn drain(&self) -> Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
        while self.in_flight.load(Ordering::Relaxed) > 0 {
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "{} events still unacknowledged after 300 s",
                self.in_flight.load(Ordering::Relaxed)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.ledger.lock().unwrap().flush()?;
        Ok(())
    }
}

pub fn read(path: &std::path::Path) -> Result<Vec<Entry>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    text.lines()
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_str(l).with_context(|| format!("ledger line {l:?}")))
        .collect()
}
