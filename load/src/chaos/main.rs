//! The chaos suite: produces a ledger of events while it injects real faults into the engines
//! and their services, holds SSE streams that reconnect and stall, then checks the ledger
//! against PostgreSQL, the streams' transcripts and Mailpit. Started by `scripts/chaos.sh`,
//! which brings up a set of services of the suite's own; see `docs/guarantees.md`.
//!
//! Phases, one after the other on one ledger, each followed by a settle (production paused,
//! the group's lag back to 0, every engine consuming again):
//!
//! | phase | fault |
//! | --- | --- |
//! | `kill-one` | one instance, SIGKILLed at random moments and started again |
//! | `kill-several` | three instances, a random one SIGKILLed at random moments |
//! | `kafka` | the broker stopped, and started again |
//! | `postgres` | PostgreSQL stopped with `-m immediate`, and started again |
//! | `mailpit` | SMTP down, with an instance restarted and another SIGKILLed meanwhile |
//! | `rebalance` | instances joining and leaving the group every few seconds |
//! | `bad-plugin` | a plugin that traps on every event published for a tenant, then a fixed one, then the dead letters replayed |
//!
//! Clients reconnect at random and some stop reading, in every phase.

mod check;
mod clients;
mod cluster;
mod journal;
mod ledger;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::json;
use tokio::sync::watch;

use cluster::{Cluster, Lag, Setup};
use journal::Journal;
use ledger::{Flow, Generator};

#[derive(Parser)]
#[command(about = "The chaos suite: a ledger, real faults, and a checker")]
struct Args {
    /// Where the ledger, the faults, the transcripts, the engines' logs and the report go.
    #[arg(long)]
    run_dir: PathBuf,
    /// Seeds every random choice (the events, the fault schedule, the clients); printed in
    /// the report so a failing run can be replayed.
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long, value_enum, default_value = "short")]
    profile: Profile,
    /// Comma-separated phases to run (default: all, in order).
    #[arg(long)]
    phases: Option<String>,
    /// Only check an earlier run in --run-dir (its ledger, faults and transcripts).
    #[arg(long)]
    check_only: bool,
    #[arg(long, env = "NOTIFY_KAFKA__BROKERS")]
    brokers: String,
    /// The run's own database (the engines migrate it).
    #[arg(long)]
    database_url: String,
    #[arg(long, env = "MAILPIT_URL")]
    mailpit_url: String,
    #[arg(long)]
    topic: String,
    #[arg(long)]
    engine_bin: PathBuf,
    /// `scripts/services.sh`, with the suite's own services in its environment.
    #[arg(long)]
    services: PathBuf,
    /// Built plugins: default.wasm and fixtures/chaos.wasm.
    #[arg(long, default_value = "plugins/dist")]
    plugins: PathBuf,
    #[arg(long, default_value = "templates")]
    templates: PathBuf,
    /// Events per second while producing.
    #[arg(long, default_value_t = 200)]
    rate: u32,
    #[arg(long, default_value_t = 8)]
    tenants: usize,
    /// Users per tenant.
    #[arg(long, default_value_t = 40)]
    users: usize,
    /// SSE clients, each for a user of its own.
    #[arg(long, default_value_t = 48)]
    clients: usize,
    /// Share of events that ask for an email.
    #[arg(long, default_value_t = 0.2)]
    email_share: f64,
    /// SIGKILLs per kill phase (default: 5 short, 20 full).
    #[arg(long)]
    kills: Option<u32>,
    /// An engine using more than this much memory at any sample fails the run (its lanes
    /// alone may hold 16 MiB per tenant while PostgreSQL is down).
    #[arg(long, default_value_t = 256)]
    max_rss_mib: u64,
    #[arg(long, default_value_t = 5)]
    breaker_failures: u32,
}

#[derive(Clone, Copy, ValueEnum, Serialize, PartialEq)]
#[serde(rename_all = "lowercase")]
enum Profile {
    Short,
    Full,
}

/// The lengths of things, per profile.
struct Timing {
    kills: u32,
    kafka_down: Duration,
    postgres_down: Duration,
    mailpit_down: Duration,
    rebalance: Duration,
    bad_plugin: Duration,
}

impl Timing {
    fn of(profile: Profile, kills: Option<u32>) -> Self {
        let s = Duration::from_secs;
        match profile {
            Profile::Short => Self {
                kills: kills.unwrap_or(5),
                kafka_down: s(10),
                postgres_down: s(8),
                mailpit_down: s(20),
                rebalance: s(20),
                bad_plugin: s(8),
            },
            Profile::Full => Self {
                kills: kills.unwrap_or(20),
                kafka_down: s(30),
                postgres_down: s(20),
                mailpit_down: s(150),
                rebalance: s(60),
                bad_plugin: s(20),
            },
        }
    }
}

const PHASES: &[&str] = &[
    "kill-one",
    "kill-several",
    "kafka",
    "postgres",
    "mailpit",
    "rebalance",
    "bad-plugin",
];
const SECRET: &str = "chaos-secret-chaos-secret-chaos-0123456789";
/// Engine slots: up to this many instances at once (the rebalance storm's ceiling).
const SLOTS: usize = 4;
/// Instances while the bad plugin is live: each has a breaker of its own, so the damage is
/// bounded by `breaker_failures` × this.
const BAD_PLUGIN_INSTANCES: usize = 2;

/// What one phase did and how the engines came out of it.
#[derive(Debug, Default, Serialize)]
struct PhaseReport {
    name: String,
    seconds: f64,
    events: u64,
    /// Faults injected: kills, stops, outages, joins and leaves, bad versions (not the
    /// starts and stops that set a phase up).
    faults: u64,
    /// An outage: every running engine said so within this long (PostgreSQL: `/readyz`
    /// 503; Kafka: `/status` not `consuming`, while `/readyz` stays 200).
    not_ready_after_s: Option<f64>,
    /// After the fault ended: every engine said it was well again after this long (the
    /// same endpoint).
    ready_again_after_s: Option<f64>,
    /// Production paused, the group's lag was 0 after this long.
    lag_zero_after_s: f64,
    /// SMTP down: the group's lag a third into the outage (the engines must keep consuming).
    lag_during_outage: Option<i64>,
    /// Kafka down: an engine's `/readyz` failed (it must not: the routes need PostgreSQL).
    readyz_failed_on_kafka: bool,
    max_rss_mib: u64,
    notes: Vec<String>,
}

/// Which endpoint an outage must show on: `/readyz` (can serve) or `/status` (all well).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Probe {
    Readyz,
    Status,
}

impl Probe {
    /// PostgreSQL down: the routes cannot serve, `/readyz` must say so. Anything else
    /// (Kafka): the routes still serve, only `/status` may say so.
    fn for_outage(service: &str) -> Self {
        if service == "postgres" {
            Self::Readyz
        } else {
            Self::Status
        }
    }
}

/// The outage phases the engines did not show (not seen going down or coming back on their
/// probe), and those in which `/readyz` failed though only `/status` should have.
fn outage_verdict(phases: &[PhaseReport]) -> (Vec<&str>, Vec<&str>) {
    let unseen = phases
        .iter()
        .filter(|p| {
            matches!(p.name.as_str(), "kafka" | "postgres")
                && (p.not_ready_after_s.is_none() || p.ready_again_after_s.is_none())
        })
        .map(|p| p.name.as_str())
        .collect();
    let readyz_failed = phases
        .iter()
        .filter(|p| p.readyz_failed_on_kafka)
        .map(|p| p.name.as_str())
        .collect();
    (unseen, readyz_failed)
}

struct Suite {
    args: Args,
    timing: Timing,
    rng: StdRng,
    cluster: Cluster,
    journal: Journal,
    generator: Arc<Generator>,
    flow: watch::Sender<Flow>,
    lag: Lag,
    /// Highest resident memory of any engine since the phase began, KiB.
    rss: Arc<std::sync::atomic::AtomicU64>,
    phases: Vec<PhaseReport>,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    std::fs::create_dir_all(&args.run_dir)?;
    if args.check_only {
        let verdict = verdict(&args).await?;
        return finish(&args, &verdict, None);
    }
    let seed = args.seed.unwrap_or_else(journal::now_ms);
    eprintln!("[chaos] seed {seed}, run dir {}", args.run_dir.display());
    let journal = Journal::create(&args.run_dir.join("faults.jsonl"))?;
    let plugins_dir = args.run_dir.join("plugins");
    std::fs::create_dir_all(&plugins_dir)?;
    std::fs::copy(
        args.plugins.join("default.wasm"),
        plugins_dir.join("default.wasm"),
    )
    .context("the plugins are not built (scripts/build-plugins.sh)")?;
    let group = format!("chaos-{seed}");
    let setup = Setup {
        engine_bin: absolute(&args.engine_bin)?,
        services: absolute(&args.services)?,
        run_dir: absolute(&args.run_dir)?,
        brokers: args.brokers.clone(),
        database_url: args.database_url.clone(),
        topic: args.topic.clone(),
        group: group.clone(),
        templates: absolute(&args.templates)?,
        plugins_dir: absolute(&plugins_dir)?,
        secret: SECRET.into(),
        breaker_failures: args.breaker_failures,
    };
    let cluster = Cluster::new(setup, SLOTS, journal.clone())?;
    let mix = ledger::Mix {
        tenants: args.tenants,
        users: args.users,
        email_share: args.email_share,
        rate: args.rate,
    };
    let generator = Arc::new(Generator::new(
        &args.brokers,
        &args.topic,
        seed,
        mix,
        &args.run_dir.join("ledger.jsonl"),
        journal.clone(),
    )?);
    let (flow, flow_rx) = watch::channel(Flow::Pause);
    let mut suite = Suite {
        timing: Timing::of(args.profile, args.kills),
        rng: StdRng::seed_from_u64(seed ^ 0x5eed),
        lag: Lag::new(&args.brokers, &group, &args.topic)?,
        args,
        cluster,
        journal,
        generator: generator.clone(),
        flow,
        rss: Arc::default(),
        phases: Vec::new(),
    };
    let producing = tokio::spawn(generator.run(flow_rx));
    suite.watch_memory();
    suite.cluster.start(0).await?;

    let (targets_tx, targets_rx) = watch::channel(None);
    let clients = suite.start_clients(seed, targets_rx);
    let outcome = suite.run_phases().await;
    if let Err(e) = &outcome {
        suite
            .journal
            .fault("suite_error", json!({ "error": format!("{e:#}") }));
        // A phase that failed may have left a service down: start them all (a running one
        // is left as it is), so the run can still be drained and checked.
        for service in ["kafka", "postgres", "mailpit"] {
            suite.cluster.service_start(service).await?;
        }
    }
    // Whatever happened, the run ends checked: production stops, the engines finish what is
    // in the topic and the outbox, the clients catch up, and the checker reads it all.
    let _ = suite.flow.send(Flow::Stop);
    let _ = producing.await;
    suite.generator.drain().await?;
    suite.journal.set_phase("final");
    for slot in 0..2 {
        if !suite.cluster.is_up(slot) {
            suite.cluster.start(slot).await?;
        }
    }
    suite.lag.wait_zero(Duration::from_secs(300)).await?;
    let pool = sqlx::PgPool::connect(&suite.args.database_url).await?;
    settle_outbox(&pool, Duration::from_secs(300)).await?;
    targets_tx.send(Some(Arc::new(latest_seqs(&pool).await?)))?;
    let mut transcripts = Vec::new();
    for c in clients {
        transcripts.push(c.await?);
    }
    write_jsonl(&suite.args.run_dir.join("transcripts.jsonl"), &transcripts)?;
    suite.cluster.stop_all().await?;
    let verdict = verdict(&suite.args).await?;
    let phases = std::mem::take(&mut suite.phases);
    finish(&suite.args, &verdict, Some((seed, &phases, outcome.err())))
}

impl Suite {
    async fn run_phases(&mut self) -> Result<()> {
        let chosen: Vec<String> = match &self.args.phases {
            Some(list) => list.split(',').map(|s| s.trim().to_owned()).collect(),
            None => PHASES.iter().map(|s| s.to_string()).collect(),
        };
        for name in &chosen {
            anyhow::ensure!(PHASES.contains(&name.as_str()), "unknown phase {name:?}");
        }
        for name in chosen {
            self.phase(&name).await?;
        }
        Ok(())
    }

    /// One phase: production on, the fault, then the settle.
    async fn phase(&mut self, name: &str) -> Result<()> {
        self.journal.set_phase(name);
        let t0 = Instant::now();
        let acked0 = self.generator.acked.load(Ordering::Relaxed);
        self.rss.store(0, Ordering::Relaxed);
        let mut report = PhaseReport {
            name: name.into(),
            ..Default::default()
        };
        self.flow.send(Flow::Run)?;
        // A few seconds of traffic before the fault, so it falls on a busy engine.
        tokio::time::sleep(Duration::from_secs(3)).await;
        match name {
            "kill-one" => self.kills(1, &mut report).await?,
            "kill-several" => self.kills(3, &mut report).await?,
            "kafka" => {
                let down = self.timing.kafka_down;
                self.outage("kafka", false, down, &mut report).await?
            }
            "postgres" => {
                let down = self.timing.postgres_down;
                self.outage("postgres", true, down, &mut report).await?
            }
            "mailpit" => self.mailpit(&mut report).await?,
            "rebalance" => self.rebalance(&mut report).await?,
            "bad-plugin" => self.bad_plugin(&mut report).await?,
            other => bail!("unknown phase {other}"),
        }
        // The settle: production paused, every acknowledged event consumed and committed.
        self.flow.send(Flow::Pause)?;
        self.generator.drain().await?;
        let settle = Instant::now();
        if self.cluster.up().is_empty() {
            self.cluster.start(0).await?;
        }
        self.lag.wait_zero(Duration::from_secs(300)).await?;
        report.lag_zero_after_s = settle.elapsed().as_secs_f64();
        report.seconds = t0.elapsed().as_secs_f64();
        report.events = self.generator.acked.load(Ordering::Relaxed) - acked0;
        report.max_rss_mib = self.rss.load(Ordering::Relaxed) / 1024;
        eprintln!("[chaos] {}", serde_json::to_string(&report)?);
        self.phases.push(report);
        Ok(())
    }

    /// Exactly `n` instances, then `kills` SIGKILLs of a random one at random moments, each
    /// started again after a random moment.
    async fn kills(&mut self, n: usize, report: &mut PhaseReport) -> Result<()> {
        self.scale_to(n).await?;
        for _ in 0..self.timing.kills {
            let wait = self.rng.random_range(1_000..5_000);
            tokio::time::sleep(Duration::from_millis(wait)).await;
            let up = self.cluster.up();
            let slot = up[self.rng.random_range(0..up.len())];
            self.cluster.kill(slot).await?;
            report.faults += 1;
            let down = self.rng.random_range(0..1_500);
            tokio::time::sleep(Duration::from_millis(down)).await;
            self.cluster.start(slot).await?;
        }
        report.notes.push(format!(
            "{} SIGKILLs across {n} instance(s)",
            self.timing.kills
        ));
        Ok(())
    }

    async fn scale_to(&mut self, n: usize) -> Result<()> {
        for slot in 0..SLOTS {
            match (slot < n, self.cluster.is_up(slot)) {
                (true, false) => self.cluster.start(slot).await?,
                (false, true) => self.cluster.stop(slot).await?,
                _ => {}
            }
        }
        Ok(())
    }

    /// A service down for `down`, under load: the engines must say so, then recover on
    /// their own once it is back. PostgreSQL down fails `/readyz` (the routes cannot
    /// serve); Kafka down shows on `/status` only, and must not fail `/readyz` (a load
    /// balancer would drop every browser's stream for it).
    async fn outage(
        &mut self,
        service: &str,
        immediate: bool,
        down: Duration,
        report: &mut PhaseReport,
    ) -> Result<()> {
        self.scale_to(2).await?;
        let t0 = Instant::now();
        let probe = Probe::for_outage(service);
        self.cluster.service_stop(service, immediate).await?;
        report.faults += 1;
        // The engines probe Kafka every 10 s while it answers: the outage lasts until they
        // all said so, or 30 s.
        report.not_ready_after_s = self
            .until_all(probe, false, down.max(Duration::from_secs(30)))
            .await;
        // The rest of the outage: `/readyz` must stay 200 throughout one that only
        // `/status` may show (checked every 500 ms).
        let mut readyz_failed = probe == Probe::Status && !self.all_ready().await;
        while t0.elapsed() < down {
            let step = Duration::from_millis(500).min(down.saturating_sub(t0.elapsed()));
            tokio::time::sleep(step).await;
            readyz_failed |= probe == Probe::Status && !self.all_ready().await;
        }
        if readyz_failed {
            report.notes.push(format!(
                "{service} down: an engine's /readyz failed (it must stay 200)"
            ));
            report.readyz_failed_on_kafka = true;
        }
        self.cluster.service_start(service).await?;
        report.notes.push(format!(
            "{service} down {:.0} s{}",
            t0.elapsed().as_secs_f64(),
            if immediate {
                " (immediate shutdown)"
            } else {
                ""
            }
        ));
        report.ready_again_after_s = self.until_all(probe, true, Duration::from_secs(120)).await;
        Ok(())
    }

    /// Whether every running engine's `/readyz` answers 200.
    async fn all_ready(&self) -> bool {
        for slot in self.cluster.up() {
            if !self.cluster.ready(slot).await {
                return false;
            }
        }
        true
    }

    /// Polls every running engine's `probe` until all of them answer `well` (or all do
    /// not); the time that took, or `None` if they did not within `limit`.
    async fn until_all(&self, probe: Probe, well: bool, limit: Duration) -> Option<f64> {
        let t0 = Instant::now();
        while t0.elapsed() < limit {
            let mut all = true;
            for slot in self.cluster.up() {
                let answer = match probe {
                    Probe::Readyz => self.cluster.ready(slot).await,
                    Probe::Status => self.cluster.consuming(slot).await,
                };
                all &= answer == well;
            }
            if all {
                return Some(t0.elapsed().as_secs_f64());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        None
    }

    /// SMTP down for minutes while events arrive; meanwhile an instance is restarted
    /// gracefully and another is SIGKILLed (its claimed emails are taken over).
    async fn mailpit(&mut self, report: &mut PhaseReport) -> Result<()> {
        self.scale_to(2).await?;
        let down = self.timing.mailpit_down;
        let t0 = Instant::now();
        self.cluster.service_stop("mailpit", false).await?;
        tokio::time::sleep(down / 3).await;
        report.lag_during_outage = self.lag.get().ok();
        self.cluster.stop(0).await?;
        self.cluster.start(0).await?;
        tokio::time::sleep(down / 3).await;
        self.cluster.kill(1).await?;
        self.cluster.start(1).await?;
        report.faults += 3;
        tokio::time::sleep(down.saturating_sub(t0.elapsed())).await;
        self.cluster.service_start("mailpit").await?;
        report.notes.push(format!(
            "Mailpit down {:.0} s; an instance restarted, another SIGKILLed",
            t0.elapsed().as_secs_f64()
        ));
        Ok(())
    }

    /// Instances join and leave the group every few seconds (at least one stays).
    async fn rebalance(&mut self, report: &mut PhaseReport) -> Result<()> {
        self.scale_to(2).await?;
        let t0 = Instant::now();
        let mut changes: u64 = 0;
        while t0.elapsed() < self.timing.rebalance {
            let wait = self.rng.random_range(1_500..4_000);
            tokio::time::sleep(Duration::from_millis(wait)).await;
            let up = self.cluster.up();
            let down: Vec<usize> = (0..SLOTS).filter(|s| !up.contains(s)).collect();
            if up.len() > 1 && (down.is_empty() || self.rng.random_bool(0.5)) {
                let slot = up[self.rng.random_range(0..up.len())];
                self.cluster.stop(slot).await?;
            } else {
                let slot = down[self.rng.random_range(0..down.len())];
                self.cluster.start(slot).await?;
            }
            changes += 1;
        }
        report.faults += changes;
        report
            .notes
            .push(format!("{changes} instances joined or left the group"));
        Ok(())
    }

    /// A plugin that traps on every event published for the bad tenant; the breaker must
    /// quarantine it within its bound per instance; a fixed version is published; the dead
    /// letters are replayed, so nothing is lost in the end.
    async fn bad_plugin(&mut self, report: &mut PhaseReport) -> Result<()> {
        self.scale_to(BAD_PLUGIN_INSTANCES).await?;
        let chaos = self.args.plugins.join("fixtures/chaos.wasm");
        self.cluster.publish_plugin(ledger::BAD_TENANT, &chaos)?;
        report.faults += 1;
        tokio::time::sleep(self.timing.bad_plugin).await;
        let default = self.args.plugins.join("default.wasm");
        self.cluster.publish_plugin(ledger::BAD_TENANT, &default)?;
        // Until the fixed version is live on every instance, events may still be set aside:
        // the replay comes after the settle.
        tokio::time::sleep(Duration::from_secs(3)).await;
        self.flow.send(Flow::Pause)?;
        self.generator.drain().await?;
        self.lag.wait_zero(Duration::from_secs(120)).await?;
        let replayed = self.cluster.replay_dead_letters(ledger::BAD_TENANT).await?;
        report.notes.push(format!(
            "chaos plugin live {} s for tenant {}, on {} instances; after the fix: {}",
            self.timing.bad_plugin.as_secs(),
            ledger::BAD_TENANT,
            self.cluster.up().len(),
            replayed.trim()
        ));
        Ok(())
    }

    fn watch_memory(&self) {
        let (pids, rss) = (self.cluster.pids.clone(), self.rss.clone());
        let max = self.args.max_rss_mib * 1024;
        let journal = self.journal.clone();
        tokio::spawn(async move {
            let mut over = false;
            loop {
                let now: Vec<u32> = pids.lock().unwrap().values().copied().collect();
                for pid in now {
                    if let Some(kib) = cluster::rss_kib(pid) {
                        rss.fetch_max(kib, Ordering::Relaxed);
                        if kib > max && !over {
                            over = true;
                            journal.fault("memory_over_bound", json!({ "pid": pid, "kib": kib }));
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
    }

    fn start_clients(
        &self,
        seed: u64,
        targets: watch::Receiver<clients::Targets>,
    ) -> Vec<tokio::task::JoinHandle<clients::Transcript>> {
        let ports = Arc::new(
            self.cluster
                .slots
                .iter()
                .map(|s| s.http)
                .collect::<Vec<_>>(),
        );
        let auth = notify_engine::config::AuthConfig {
            jwt_secret: SECRET.into(),
            ..Default::default()
        };
        let population = self.args.tenants * self.args.users;
        (0..self.args.clients.min(population))
            .map(|i| {
                let (tenant, user) = client_user(&self.args, i);
                let client = clients::Client {
                    token: notify_engine::api::auth::mint(&auth, &tenant, &user, 24 * 3600),
                    tenant,
                    user,
                    ports: ports.clone(),
                    seed: seed ^ (i as u64 + 1),
                    staller: is_staller(i),
                    reconnect_every: Duration::from_secs(8),
                };
                tokio::spawn(client.run(targets.clone()))
            })
            .collect()
    }
}

/// Client `i`'s user: spread over tenants first (user i / tenants of tenant i % tenants).
fn client_user(args: &Args, i: usize) -> (String, String) {
    (
        ledger::tenant(i % args.tenants),
        ledger::user(i / args.tenants),
    )
}

/// One client in four stops reading now and then.
fn is_staller(i: usize) -> bool {
    i % 4 == 3
}

/// Waits until no email is pending or being sent.
async fn settle_outbox(pool: &sqlx::PgPool, limit: Duration) -> Result<()> {
    let t0 = Instant::now();
    loop {
        let open: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM email_outbox WHERE status IN ('pending', 'sending')",
        )
        .fetch_one(pool)
        .await?;
        if open == 0 {
            return Ok(());
        }
        if t0.elapsed() > limit {
            eprintln!(
                "[chaos] {open} emails still pending after {} s",
                limit.as_secs()
            );
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn latest_seqs(pool: &sqlx::PgPool) -> Result<HashMap<(String, String), u64>> {
    let rows: Vec<(String, String, i64)> =
        sqlx::query_as("SELECT tenant_id, user_id, max(seq) FROM notifications GROUP BY 1, 2")
            .fetch_all(pool)
            .await?;
    Ok(rows
        .into_iter()
        .map(|(t, u, s)| ((t, u), s as u64))
        .collect())
}

async fn verdict(args: &Args) -> Result<check::Verdict> {
    let ledger = ledger::read(&args.run_dir.join("ledger.jsonl"))?;
    let faults: Vec<journal::Fault> = read_jsonl(&args.run_dir.join("faults.jsonl"))?;
    let transcripts: Vec<clients::Transcript> =
        read_jsonl(&args.run_dir.join("transcripts.jsonl"))?;
    let pool = sqlx::PgPool::connect(&args.database_url).await?;
    let store = check::Store::load(&pool).await?;
    let mail = check::load_mail(&args.mailpit_url).await?;
    Ok(check::check(&ledger, &faults, &transcripts, &store, &mail))
}

/// Writes report.json and report.md (recheck.json and recheck.md for --check-only, which
/// leaves the run's own report alone); fails when a promise was broken or the suite could not
/// run to the end.
fn finish(
    args: &Args,
    verdict: &check::Verdict,
    run: Option<(u64, &[PhaseReport], Option<anyhow::Error>)>,
) -> Result<()> {
    let name = if args.check_only { "recheck" } else { "report" };
    let (seed, phases, error) = match run {
        Some((seed, phases, error)) => (Some(seed), phases, error),
        None => (None, &[][..], None),
    };
    let over_memory = phases.iter().any(|p| p.max_rss_mib > args.max_rss_mib);
    // Kafka trouble must not fail readiness (it would take every browser's stream down).
    let (outage_unseen, readyz_failed_on_kafka) = outage_verdict(phases);
    // "An SMTP outage never stalls Kafka": a third into it, the lag is at most 5 s of events.
    let smtp_stalled = phases.iter().any(|p| {
        p.lag_during_outage
            .is_none_or(|lag| lag > 5 * i64::from(args.rate))
            && p.name == "mailpit"
    });
    let cuts = cluster::write_deadline_cuts(&args.run_dir);
    let breaker_bound = u64::from(args.breaker_failures) * BAD_PLUGIN_INSTANCES as u64;
    let breaker_damage = verdict.breaker_damage(ledger::BAD_TENANT);
    let passed = verdict.passed()
        && error.is_none()
        && !over_memory
        && outage_unseen.is_empty()
        && readyz_failed_on_kafka.is_empty()
        && !smtp_stalled
        && breaker_damage <= breaker_bound;
    let report = json!({
        "passed": passed,
        "seed": seed,
        "profile": args.profile,
        "error": error.as_ref().map(|e| format!("{e:#}")),
        "phases": phases,
        "verdict": verdict,
        "outages_unseen": outage_unseen,
        "readyz_failed_on_kafka": readyz_failed_on_kafka,
        "breaker": { "damage": breaker_damage, "bound": breaker_bound },
        "smtp_outage_stalled_kafka": smtp_stalled,
        "write_deadline_cuts": cuts,
    });
    std::fs::write(
        args.run_dir.join(format!("{name}.json")),
        serde_json::to_string_pretty(&report)?,
    )?;
    let mut md = report_md(args, seed, phases, verdict, passed);
    md.push_str(&format!(
        "\nStreams the engines cut off for not reading (write deadline): {cuts}.\n"
    ));
    md.push_str(&format!(
        "\nBreaker: {breaker_damage} events failed in the bad plugin before it was quarantined \
         (bound: {} failures × {BAD_PLUGIN_INSTANCES} instances = {breaker_bound}).\n\
         Memory: at most {} MiB per engine (bound {} MiB). Outages unseen (PostgreSQL on \
         /readyz, Kafka on /status): {}. Lag a third into the SMTP outage: {} (bound: 5 s of events).\n",
        args.breaker_failures,
        phases.iter().map(|p| p.max_rss_mib).max().unwrap_or(0),
        args.max_rss_mib,
        if outage_unseen.is_empty() {
            "none".into()
        } else {
            outage_unseen.join(", ")
        },
        phases
            .iter()
            .find(|p| p.name == "mailpit")
            .and_then(|p| p.lag_during_outage)
            .map_or("-".into(), |lag| lag.to_string()),
    ));
    std::fs::write(args.run_dir.join(format!("{name}.md")), &md)?;
    println!("{md}");
    if let Some(e) = error {
        return Err(e.context("the suite did not run to the end"));
    }
    if !passed {
        bail!(
            "a promise was broken: see {} (replay with --seed {})",
            args.run_dir.join(format!("{name}.md")).display(),
            seed.map_or("<see report>".into(), |s| s.to_string())
        );
    }
    Ok(())
}

fn report_md(
    args: &Args,
    seed: Option<u64>,
    phases: &[PhaseReport],
    v: &check::Verdict,
    passed: bool,
) -> String {
    use std::fmt::Write;
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# Chaos run: {}\n\nseed {}, profile {}, {} events/s, {} tenants × {} users, {} clients\n",
        if passed { "PASSED" } else { "FAILED" },
        seed.map_or("-".into(), |s| s.to_string()),
        if args.profile == Profile::Full {
            "full"
        } else {
            "short"
        },
        args.rate,
        args.tenants,
        args.users,
        args.clients
    );
    let _ = writeln!(
        md,
        "| phase | s | events | faults | not ready after s | ready again after s | lag 0 after s | max RSS MiB | notes |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    );
    let opt = |x: Option<f64>| x.map_or("-".into(), |x| format!("{x:.1}"));
    for p in phases {
        let _ = writeln!(
            md,
            "| {} | {:.0} | {} | {} | {} | {} | {:.1} | {} | {} |",
            p.name,
            p.seconds,
            p.events,
            p.faults,
            opt(p.not_ready_after_s),
            opt(p.ready_again_after_s),
            p.lag_zero_after_s,
            p.max_rss_mib,
            p.notes.join("; ")
        );
    }
    let f = |x: &check::Finding| {
        if x.examples.is_empty() {
            x.count.to_string()
        } else {
            format!("{} (e.g. {})", x.count, x.examples.join(", "))
        }
    };
    let _ = writeln!(
        md,
        "\n| check | result |\n| --- | --- |\n\
         | events (produced more than once) | {} ({}) |\n\
         | notifications stored | {} |\n\
         | emails expected / received | {} / {} |\n\
         | emails not sent at the end (by status) | {:?} |\n\
         | duplicate emails, each after a copy a crash cut short (within 2 s) | {} |\n\
         | streams (frames, reconnects, stalls, stalled ones the server ended) | {} ({}, {}, {}, {}) |\n\
         | dead letters (by tenant and kind), not replayed | {:?}, {} |\n\
         | crashes injected | {} |",
        v.events,
        v.events_resent,
        v.notifications,
        v.emails_expected,
        v.emails_received,
        v.emails_unsent,
        f(&v.email_duplicates_explained),
        v.streams,
        v.stream_frames,
        v.stream_reconnects,
        v.stream_stalls,
        v.stream_cut_off,
        v.dead_letters,
        v.dead_letters_not_replayed,
        v.crashes,
    );
    for (label, finding) in v.must_be_zero() {
        let _ = writeln!(md, "| {label} | {} |", f(finding));
    }
    md
}

fn absolute(p: &Path) -> Result<PathBuf> {
    std::path::absolute(p).with_context(|| p.display().to_string())
}

fn write_jsonl<T: Serialize>(path: &Path, items: &[T]) -> Result<()> {
    let mut out = String::new();
    for item in items {
        out.push_str(&serde_json::to_string(item)?);
        out.push('\n');
    }
    Ok(std::fs::write(path, out)?)
}

fn read_jsonl<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    text.lines()
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_str(l).with_context(|| format!("{}: {l}", path.display())))
        .collect()
}

/// The outage checks: which probe each outage must show on, and what fails the run.
#[cfg(test)]
mod outage_tests {
    use super::*;

    fn phase(name: &str, seen: bool, readyz_failed_on_kafka: bool) -> PhaseReport {
        PhaseReport {
            name: name.into(),
            not_ready_after_s: seen.then_some(7.7),
            ready_again_after_s: seen.then_some(3.0),
            readyz_failed_on_kafka,
            ..Default::default()
        }
    }

    #[test]
    fn postgres_shows_on_readyz_and_kafka_on_status_only() {
        assert_eq!(Probe::for_outage("postgres"), Probe::Readyz);
        assert_eq!(Probe::for_outage("kafka"), Probe::Status);
        let seen = [phase("kafka", true, false), phase("postgres", true, false)];
        assert_eq!(outage_verdict(&seen), (vec![], vec![]));
        let unseen = [
            phase("kafka", false, false),
            phase("postgres", false, false),
        ];
        assert_eq!(outage_verdict(&unseen).0, vec!["kafka", "postgres"]);
        // A Kafka outage that failed /readyz fails the run, even though it was seen.
        let failed = [phase("kafka", true, true)];
        assert_eq!(outage_verdict(&failed), (vec![], vec!["kafka"]));
        // Other phases are no outages.
        assert_eq!(
            outage_verdict(&[phase("kill-one", false, false)]).0,
            Vec::<&str>::new()
        );
    }
}
