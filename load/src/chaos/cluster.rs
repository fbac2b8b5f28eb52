//! What the faults act on: the engine processes (started, killed with SIGKILL, stopped with
//! SIGTERM, each slot on fixed ports so clients find it again), the services (through
//! `scripts/services.sh stop|start`), and what is watched meanwhile: each engine's `/readyz`
//! (can it serve: PostgreSQL) and `/status` (is every part well: Kafka, the lanes), its
//! resident memory, and the consumer group's lag.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::json;
use tokio::process::{Child, Command};

use crate::journal::Journal;

/// The `cluster.secret` every instance of the run shares: they seal what they tell each
/// other through PostgreSQL with it (docs/security.md).
const CLUSTER_SECRET: &str = "chaos-cluster-secret-chaos-cluster-secret-01";

/// Where an engine slot listens: fixed for the run, so a restarted instance comes back on the
/// same ports and clients reconnect to it.
#[derive(Debug, Clone)]
pub struct Slot {
    pub http: u16,
    pub admin: u16,
    pub config: PathBuf,
}

pub struct Setup {
    pub engine_bin: PathBuf,
    pub services: PathBuf,
    pub run_dir: PathBuf,
    pub brokers: String,
    pub database_url: String,
    pub topic: String,
    pub group: String,
    pub templates: PathBuf,
    pub plugins_dir: PathBuf,
    pub secret: String,
    pub breaker_failures: u32,
}

/// The engines of the run, by slot; `None` for a slot that is down.
pub struct Cluster {
    pub setup: Setup,
    pub slots: Vec<Slot>,
    running: Vec<Option<Child>>,
    /// Starts per slot, for the log file names.
    generation: Vec<u32>,
    pub journal: Journal,
    /// Shared with the watcher: the pid of each running slot.
    pub pids: Arc<Mutex<BTreeMap<usize, u32>>>,
}

impl Cluster {
    pub fn new(setup: Setup, slots: usize, journal: Journal) -> Result<Self> {
        let mut all = Vec::with_capacity(slots);
        let mut ports = listen_ports(2 * slots)?.into_iter();
        for i in 0..slots {
            let (http, admin) = (
                ports.next().expect("two per slot"),
                ports.next().expect("two per slot"),
            );
            let config = setup.run_dir.join(format!("engine{i}.toml"));
            std::fs::write(&config, engine_config(&setup, http, admin))?;
            all.push(Slot {
                http,
                admin,
                config,
            });
        }
        Ok(Self {
            setup,
            running: (0..slots).map(|_| None).collect(),
            generation: vec![0; slots],
            slots: all,
            journal,
            pids: Arc::default(),
        })
    }

    pub fn is_up(&self, slot: usize) -> bool {
        self.running[slot].is_some()
    }

    pub fn up(&self) -> Vec<usize> {
        (0..self.slots.len()).filter(|&i| self.is_up(i)).collect()
    }

    /// Starts `slot` and waits until its `/status` says it is `consuming` (PostgreSQL and
    /// Kafka answer, no lane stalled; its `/readyz` alone only says it can serve its routes,
    /// and SMTP may be down on purpose).
    pub async fn start(&mut self, slot: usize) -> Result<()> {
        anyhow::ensure!(!self.is_up(slot), "engine {slot} is already running");
        self.generation[slot] += 1;
        let log = self
            .setup
            .run_dir
            .join(format!("engine{slot}-{}.log", self.generation[slot]));
        let out = std::fs::File::create(&log)?;
        let child = Command::new(&self.setup.engine_bin)
            .arg("run")
            .env("NOTIFY_CONFIG", &self.slots[slot].config)
            .env("DATABASE_URL", &self.setup.database_url)
            .env("NOTIFY_AUTH__JWT_SECRET", &self.setup.secret)
            // Every instance under one key, or they refuse each other's wake-ups.
            .env("NOTIFY_CLUSTER__SECRET", CLUSTER_SECRET)
            // One file description for both, so their lines do not overwrite each other.
            .stdout(Stdio::from(out.try_clone()?))
            .stderr(Stdio::from(out))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", self.setup.engine_bin.display()))?;
        let pid = child.id().unwrap_or_default();
        self.running[slot] = Some(child);
        self.pids.lock().unwrap().insert(slot, pid);
        self.journal
            .fault("engine_start", json!({ "slot": slot, "pid": pid }));
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            if self.consuming(slot).await {
                return Ok(());
            }
            if let Some(child) = &mut self.running[slot]
                && let Some(status) = child.try_wait()?
            {
                self.running[slot] = None;
                self.pids.lock().unwrap().remove(&slot);
                bail!(
                    "engine {slot} exited with {status} while starting: see {}",
                    log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        bail!(
            "engine {slot} was not ready after 120 s: see {}",
            log.display()
        )
    }

    /// SIGKILL: no shutdown path runs, whatever the engine was doing.
    pub async fn kill(&mut self, slot: usize) -> Result<()> {
        let Some(mut child) = self.running[slot].take() else {
            bail!("engine {slot} is not running");
        };
        self.pids.lock().unwrap().remove(&slot);
        self.journal
            .fault("engine_sigkill", json!({ "slot": slot, "pid": child.id() }));
        child.start_kill()?;
        child.wait().await?;
        Ok(())
    }

    /// SIGTERM, then waits for the graceful exit (SIGKILL after 60 s, recorded).
    pub async fn stop(&mut self, slot: usize) -> Result<()> {
        let Some(mut child) = self.running[slot].take() else {
            bail!("engine {slot} is not running");
        };
        self.pids.lock().unwrap().remove(&slot);
        let pid = child.id().unwrap_or_default();
        self.journal
            .fault("engine_sigterm", json!({ "slot": slot, "pid": pid }));
        // The `kill` command: this crate has no libc binding to send a signal with.
        Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await?;
        match tokio::time::timeout(Duration::from_secs(60), child.wait()).await {
            Ok(status) => {
                status?;
            }
            Err(_) => {
                self.journal
                    .fault("engine_stop_timeout", json!({ "slot": slot, "pid": pid }));
                child.start_kill()?;
                child.wait().await?;
            }
        }
        Ok(())
    }

    /// Stops every running engine gracefully.
    pub async fn stop_all(&mut self) -> Result<()> {
        for slot in self.up() {
            self.stop(slot).await?;
        }
        Ok(())
    }

    /// `/readyz` answers 200: the engine can serve its routes (PostgreSQL answers).
    pub async fn ready(&self, slot: usize) -> bool {
        readyz(self.slots[slot].admin).await
    }

    /// `/status` says `consuming`: PostgreSQL and Kafka answer, no lane is stalled.
    pub async fn consuming(&self, slot: usize) -> bool {
        consuming(self.slots[slot].admin).await
    }

    /// `scripts/services.sh stop <service> [--immediate]`.
    pub async fn service_stop(&self, service: &str, immediate: bool) -> Result<()> {
        let kind = if immediate {
            format!("{service}_stop_immediate")
        } else {
            format!("{service}_stop")
        };
        self.journal.fault(&kind, json!({}));
        let mut cmd = Command::new(&self.setup.services);
        cmd.args(["stop", service]);
        if immediate {
            cmd.arg("--immediate");
        }
        run(cmd, &kind).await
    }

    /// `scripts/services.sh start <service>` (waits until it answers).
    pub async fn service_start(&self, service: &str) -> Result<()> {
        let mut cmd = Command::new(&self.setup.services);
        cmd.args(["start", service]);
        run(cmd, &format!("{service}_start")).await?;
        self.journal.fault(&format!("{service}_started"), json!({}));
        Ok(())
    }

    /// Writes `<tenant>.wasm` the way docs/plugins.md tells publishers to: a temporary name in
    /// the same directory, then a rename.
    pub fn publish_plugin(&self, tenant: &str, wasm: &Path) -> Result<()> {
        let tmp = self.setup.plugins_dir.join(format!(".{tenant}.wasm.tmp"));
        std::fs::copy(wasm, &tmp).with_context(|| format!("copying {}", wasm.display()))?;
        std::fs::rename(&tmp, self.setup.plugins_dir.join(format!("{tenant}.wasm")))?;
        self.journal.fault(
            "plugin_published",
            json!({ "tenant": tenant, "from": wasm.display().to_string() }),
        );
        Ok(())
    }

    /// `notify-engine dead-letters replay --tenant <tenant>` with slot 0's configuration;
    /// returns its output (one line per replayed dead letter).
    pub async fn replay_dead_letters(&self, tenant: &str) -> Result<String> {
        let out = Command::new(&self.setup.engine_bin)
            .args(["dead-letters", "replay", "--tenant", tenant])
            .env("NOTIFY_CONFIG", &self.slots[0].config)
            .env("DATABASE_URL", &self.setup.database_url)
            .env("NOTIFY_AUTH__JWT_SECRET", &self.setup.secret)
            .output()
            .await?;
        if !out.status.success() {
            bail!(
                "dead-letters replay failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        self.journal
            .fault("dead_letters_replayed", json!({ "tenant": tenant }));
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

async fn run(mut cmd: Command, what: &str) -> Result<()> {
    let out = cmd
        .output()
        .await
        .with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

pub async fn readyz(admin: u16) -> bool {
    let url = format!("http://127.0.0.1:{admin}/readyz");
    matches!(admin_client().get(url).send().await, Ok(r) if r.status().is_success())
}

/// The engine's status report says it is `consuming` (it always answers 200; the body
/// says).
pub async fn consuming(admin: u16) -> bool {
    let url = format!("http://127.0.0.1:{admin}/status");
    let Ok(response) = admin_client().get(url).send().await else {
        return false;
    };
    let Ok(body) = response.text().await else {
        return false;
    };
    serde_json::from_str::<serde_json::Value>(&body).is_ok_and(|b| b["consuming"] == true)
}

fn admin_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .expect("a plain client builds")
}

/// The streams the engines ended because their client stopped reading (the write deadline),
/// counted in the engines' logs of the run.
pub fn write_deadline_cuts(run_dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(run_dir) else {
        return 0;
    };
    entries
        .flatten()
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.starts_with("engine") && name.ends_with(".log")
        })
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .map(|log| log.matches("write deadline passed").count() as u64)
        .sum()
}

pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// `n` free ports just below the kernel's ephemeral range. A port the kernel handed out
/// (bind to port 0) may be taken by any outgoing connection while its engine is down, and the
/// restart then fails to bind it: this happened in a rebalance storm.
fn listen_ports(n: usize) -> Result<Vec<u16>> {
    let low: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768);
    let ports: Vec<u16> = (low.saturating_sub(3000)..low)
        .filter(|&p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok())
        .take(n)
        .collect();
    anyhow::ensure!(
        ports.len() == n,
        "no {n} free ports below the ephemeral range ({low})"
    );
    Ok(ports)
}

/// The engines' configuration: the defaults except where a chaos run needs otherwise, each
/// said why.
fn engine_config(s: &Setup, http: u16, admin: u16) -> String {
    format!(
        r#"[http]
listen = "127.0.0.1:{http}"
admin_listen = "127.0.0.1:{admin}"
# Stalled clients are cut off within the run, so they reconnect and replay.
write_timeout_ms = 3000
[kafka]
brokers = "{brokers}"
topics = ["{topic}"]
group_id = "{group}"
[database]
url = "{db}"
# Up to five instances share the chaos cluster's 200 connections.
max_connections = 8
api_max_connections = 8
[plugins]
dir = "{plugins}"
cache_dir = "{cache}"
breaker_failures = {breaker}
breaker_fail_mode = "dead_letter"
[email]
templates_dir = "{templates}"
# A claim whose worker was killed is taken over after 15 s (default 60 s; at least 3 × the
# SMTP timeout), and retries back off to at most 5 s (default 5 min), so the run settles
# in minutes after an outage.
claim_timeout_ms = 15000
backoff_max_ms = 5000
tenant_rate_per_sec = 200
concurrency = 8
[smtp]
tls = "none"
timeout_ms = 5000
[log]
# serve=debug names each stream cut off for not reading (the write deadline), which the
# report counts.
filter = "info,notify_engine::api::serve=debug"
"#,
        brokers = s.brokers,
        topic = s.topic,
        group = s.group,
        db = s.database_url,
        plugins = s.plugins_dir.display(),
        cache = s.run_dir.join("plugin-cache").display(),
        templates = s.templates.display(),
        breaker = s.breaker_failures,
    )
}

/// The consumer group's lag: the events on the topic that the group has not committed.
pub struct Lag {
    consumer: BaseConsumer,
    topic: String,
}

impl Lag {
    pub fn new(brokers: &str, group: &str, topic: &str) -> Result<Self> {
        // Never subscribes: it only reads the group's committed offsets.
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .create()?;
        Ok(Self {
            consumer,
            topic: topic.to_owned(),
        })
    }

    /// Σ (high watermark − committed offset) over the topic's partitions.
    pub fn get(&self) -> Result<i64> {
        let timeout = Duration::from_secs(5);
        let meta = self.consumer.fetch_metadata(Some(&self.topic), timeout)?;
        let partitions: Vec<i32> = meta
            .topics()
            .iter()
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect();
        let mut tpl = TopicPartitionList::new();
        for &p in &partitions {
            tpl.add_partition(&self.topic, p);
        }
        let committed = self.consumer.committed_offsets(tpl, timeout)?;
        let mut lag = 0;
        for p in partitions {
            let (low, high) = self.consumer.fetch_watermarks(&self.topic, p, timeout)?;
            let at = match committed.find_partition(&self.topic, p).map(|e| e.offset()) {
                Some(Offset::Offset(o)) => o,
                _ => low,
            };
            lag += (high - at).max(0);
        }
        Ok(lag)
    }

    /// Waits until the lag is 0; returns how long that took.
    pub async fn wait_zero(&self, limit: Duration) -> Result<Duration> {
        let t0 = Instant::now();
        loop {
            match self.get() {
                Ok(0) => return Ok(t0.elapsed()),
                Ok(n) if t0.elapsed() > limit => {
                    bail!("consumer lag still {n} after {} s", limit.as_secs())
                }
                Err(e) if t0.elapsed() > limit => bail!("consumer lag unknown: {e}"),
                _ => tokio::time::sleep(Duration::from_millis(250)).await,
            }
        }
    }
}
