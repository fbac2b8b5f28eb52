//! The load harness (`scripts/load.sh` runs it against engines it starts).
//!
//! It holds SSE connections across several loopback source addresses and every engine
//! instance given, produces `order_paid` events to Kafka at a set rate (or as fast as the
//! engines absorb them), stamps each event's id with its produce time, and measures each
//! frame's arrival. Scenarios run one after another in one run:
//!
//! - `idle`: the connections held, the engines' resident memory per connection;
//! - `steady`: the plan's steady load (100 events/s), `burst`: its burst (1 000 events/s);
//! - `max`: a backlog produced as fast as possible, events/s from produce to commit;
//! - `fanout`: one user with many connections, every event to all of them;
//! - `emails`: events with an email each, produce → outbox row and emails sent/s.
//!
//! Writes `report.json`, `report.md` (HDR percentiles, the plan's pass criteria, the stage
//! breakdown from `notify_stage_seconds`) and `latency.png` (latency over time) to `--out`.
//!
//! With `--target centrifugo` the same clients and the same events go to Centrifugo instead
//! (its `uni_sse` transport, fed by its own Kafka consumer from a topic of its own; the
//! channel of each event in the `centrifugo-channels` header), for every scenario but
//! `emails`; `--compare-with` the engine's report then writes the two side by side.

mod report;
mod sse;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use report::{Phase, Recorder};

#[derive(Parser, Debug, Clone)]
#[command(about = "Load harness for notify-engine (see scripts/load.sh)")]
pub struct Args {
    /// What serves the streams.
    #[arg(long, value_enum, default_value_t = Target::Engine)]
    target: Target,
    /// Public API addresses of the engine instances (host:port), comma-separated; with
    /// `--target centrifugo`, Centrifugo's HTTP server.
    #[arg(long, value_delimiter = ',', required = true)]
    engines: Vec<SocketAddr>,
    /// Admin listener addresses of the engines, same order (none for Centrifugo).
    #[arg(long, value_delimiter = ',')]
    admins: Vec<SocketAddr>,
    /// Process ids of the engines, same order (for resident memory).
    #[arg(long, value_delimiter = ',')]
    pids: Vec<u32>,
    #[arg(long)]
    brokers: String,
    #[arg(long)]
    topic: String,
    /// The engines' database (outbox timings); not used for Centrifugo.
    #[arg(long)]
    database_url: Option<String>,
    /// The engines' (or Centrifugo's) HS256 secret, to mint the clients' tokens.
    #[arg(long, env = "NOTIFY_AUTH__JWT_SECRET")]
    secret: String,
    /// SSE connections held for the whole run.
    #[arg(long, default_value_t = 5_000)]
    connections: usize,
    /// Tenants the users are spread across.
    #[arg(long, default_value_t = 10)]
    tenants: usize,
    /// Loopback source addresses the connections are spread across (127.0.0.2, ...): each
    /// has its own ~28 000 ephemeral ports.
    #[arg(long, default_value_t = 4)]
    sources: u8,
    /// Scenarios, in order.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "idle,steady,burst,max,fanout,emails"
    )]
    scenarios: Vec<String>,
    #[arg(long, default_value_t = 30)]
    steady_secs: u64,
    #[arg(long, default_value_t = 100)]
    steady_rate: u64,
    #[arg(long, default_value_t = 20)]
    burst_secs: u64,
    #[arg(long, default_value_t = 1_000)]
    burst_rate: u64,
    /// Events of the `max` scenario's backlog.
    #[arg(long, default_value_t = 100_000)]
    max_events: u64,
    /// Connections of the one `fanout` user (on top of `--connections`).
    #[arg(long, default_value_t = 1_000)]
    fanout_connections: usize,
    #[arg(long, default_value_t = 10)]
    fanout_secs: u64,
    #[arg(long, default_value_t = 100)]
    fanout_rate: u64,
    /// Events with an email in the `emails` scenario.
    #[arg(long, default_value_t = 5_000)]
    emails: u64,
    /// In `steady` and `burst`, one event in this many carries an email (0: none).
    #[arg(long, default_value_t = 10)]
    email_every: u64,
    /// Only open the connections and hold them until SIGTERM (no scenario, no report): a
    /// process's open-file limit caps its connections, so a run past it adds holders.
    #[arg(long)]
    hold_only: bool,
    /// The first user's number (a holder's users follow the measuring harness's).
    #[arg(long, default_value_t = 0)]
    user_offset: usize,
    /// Connections held by other processes (`--hold-only`), counted in the idle memory
    /// per connection.
    #[arg(long, default_value_t = 0)]
    held_elsewhere: usize,
    /// The engines' resident memory (KiB, same order as `--pids`) before any connection,
    /// when holders opened theirs before this process started.
    #[arg(long, value_delimiter = ',')]
    rss_before: Vec<u64>,
    /// Events sent (and not measured) before the first scenario that sends any.
    #[arg(long, default_value_t = 20_000)]
    warm_up: u64,
    /// Where the report goes.
    #[arg(long)]
    out: PathBuf,
    /// A free-form label for the report (machine, instances, ...).
    #[arg(long, default_value = "")]
    label: String,
    /// The directory of an engine run's report: the two are written side by side to
    /// `comparison.md` and `comparison.json` next to `--out`.
    #[arg(long)]
    compare_with: Option<PathBuf>,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Engine,
    Centrifugo,
}

impl Target {
    pub fn name(self) -> &'static str {
        match self {
            Target::Engine => "notify-engine",
            Target::Centrifugo => "centrifugo",
        }
    }
}

/// Microseconds since the Unix epoch: what an event's id carries and a frame is compared to.
pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_micros() as u64
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    match args.target {
        _ if args.hold_only => {}
        Target::Engine if args.engines.len() != args.admins.len() => {
            bail!("--engines and --admins must name the same instances")
        }
        Target::Engine if args.database_url.is_none() => bail!("--database-url is required"),
        _ => {}
    }
    std::fs::create_dir_all(&args.out)?;
    let (samples, received) = mpsc::unbounded_channel();
    let (stop, stopped) = tokio::sync::oneshot::channel();
    let recorder = tokio::spawn(Recorder::collect(received, stopped));
    let mut run = Run::new(args.clone(), samples)?;
    let mut phases = Vec::new();
    let rss_before = if args.rss_before.is_empty() {
        run.rss()
    } else {
        args.rss_before.clone()
    };
    let connected = run.connect_users().await?;
    if args.hold_only {
        eprintln!(
            "[load] holding {} connections ({} failed)",
            connected.held, connected.failed
        );
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        return Ok(());
    }
    // Connections that failed are in `connected`; from here on `failed` counts per scenario.
    run.failed.store(0, Ordering::Relaxed);
    let mut warm = false;
    for scenario in &args.scenarios {
        // After `idle`, which measures connections that never carried an event.
        if scenario != "idle" && !std::mem::replace(&mut warm, true) {
            run.warm_up().await?;
        }
        let phase = match scenario.as_str() {
            "idle" => run.idle(&rss_before, &connected).await?,
            "steady" => {
                run.at_rate("steady", args.steady_rate, args.steady_secs)
                    .await?
            }
            "burst" => {
                run.at_rate("burst", args.burst_rate, args.burst_secs)
                    .await?
            }
            "max" => run.max().await?,
            "fanout" => run.fanout().await?,
            "emails" if args.target == Target::Centrifugo => {
                eprintln!("[load] emails: not a Centrifugo scenario, skipped");
                continue;
            }
            "emails" => run.emails().await?,
            other => bail!("unknown scenario {other:?}"),
        };
        let mut phase = phase;
        phase.reconnects = run.reconnects.swap(0, Ordering::Relaxed);
        phase.failed = run.failed.swap(0, Ordering::Relaxed);
        eprintln!("[load] {}", phase.summary());
        phases.push(phase);
    }
    drop(run);
    let _ = stop.send(());
    let recorded = recorder.await?;
    report::write(&args, &phases, recorded, connected)?;
    eprintln!("[load] report in {}", args.out.display());
    if let Some(engine) = &args.compare_with {
        let at = args.out.parent().unwrap_or(&args.out);
        report::compare(engine, &args.out, at)?;
        eprintln!(
            "[load] comparison in {}",
            at.join("comparison.md").display()
        );
    }
    Ok(())
}

/// What opening the connections achieved.
#[derive(Debug, Clone, Copy)]
pub struct Connected {
    pub held: usize,
    pub failed: usize,
    pub seconds: f64,
}

struct Run {
    args: Args,
    producer: FutureProducer,
    /// The engines' database, for the outbox's timings (none for Centrifugo).
    pool: Option<sqlx::PgPool>,
    samples: mpsc::UnboundedSender<sse::Sample>,
    http: reqwest::Client,
    /// (tenant, user) of every held connection's user.
    users: Vec<(String, String)>,
    /// Frames received on all connections (counted by the clients).
    frames: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    /// Streams the engines ended and the clients opened again with `Last-Event-ID`.
    reconnects: Arc<AtomicU64>,
    next_id: u64,
}

impl Run {
    fn new(args: Args, samples: mpsc::UnboundedSender<sse::Sample>) -> Result<Self> {
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &args.brokers)
            .set("linger.ms", "1")
            .set("queue.buffering.max.messages", "1000000")
            .set("message.timeout.ms", "60000")
            .create()
            .context("creating the Kafka producer")?;
        let users = (args.user_offset..args.user_offset + args.connections)
            .map(|i| {
                (
                    format!("load{}", i % args.tenants),
                    format!("u{}", i / args.tenants),
                )
            })
            .collect();
        Ok(Self {
            pool: match &args.database_url {
                Some(url) => Some(
                    sqlx::PgPool::connect_lazy(url).context("the --database-url does not parse")?,
                ),
                None => None,
            },
            http: reqwest::Client::new(),
            args,
            producer,
            samples,
            users,
            frames: Arc::default(),
            failed: Arc::default(),
            reconnects: Arc::default(),
            next_id: 0,
        })
    }

    fn auth(&self) -> notify_engine::config::AuthConfig {
        notify_engine::config::AuthConfig {
            jwt_secret: self.args.secret.clone(),
            ..Default::default()
        }
    }

    /// Connection `i` of `user`, to server `server % servers`.
    fn spec(&self, server: usize, i: usize, tenant: &str, user: &str) -> sse::Spec {
        let server = self.args.engines[server % self.args.engines.len()];
        let source = self.source(i);
        match self.args.target {
            Target::Engine => sse::Spec {
                server,
                source,
                target: "/api/v1/sse".into(),
                bearer: Some(notify_engine::api::auth::mint(
                    &self.auth(),
                    tenant,
                    user,
                    24 * 3600,
                )),
            },
            Target::Centrifugo => {
                // A connection token whose `channels` claim subscribes the connection to
                // its user's channel on the server side: what uni_sse clients do.
                let claims = json!({
                    "sub": format!("{tenant}/{user}"),
                    "exp": now_us() / 1_000_000 + 24 * 3600,
                    "channels": [channel(tenant, user)],
                });
                let token = jsonwebtoken::encode(
                    &jsonwebtoken::Header::default(),
                    &claims,
                    &jsonwebtoken::EncodingKey::from_secret(self.args.secret.as_bytes()),
                )
                .expect("HS256 signs any claims");
                let connect = json!({ "token": token }).to_string();
                sse::Spec {
                    server,
                    source,
                    target: format!(
                        "/connection/uni_sse?cf_connect={}",
                        percent_encode(&connect)
                    ),
                    bearer: None,
                }
            }
        }
    }

    fn source(&self, i: usize) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(
            127,
            0,
            0,
            2 + (i % self.args.sources as usize) as u8,
        ))
    }

    /// Opens a stream per user, round-robin over the engines and source addresses, at most
    /// a few hundred at a time; returns once every stream has its hello (or failed).
    async fn connect_users(&mut self) -> Result<Connected> {
        let started = Instant::now();
        let specs: Vec<sse::Spec> = self
            .users
            .iter()
            .enumerate()
            .map(|(i, (tenant, user))| self.spec(i, i, tenant, user))
            .collect();
        let (held, failed) = self.open(specs).await;
        Ok(Connected {
            held,
            failed,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// Opens streams that report to this run's counters and recorder: (held, failed).
    async fn open(&self, specs: Vec<sse::Spec>) -> (usize, usize) {
        sse::open_all(
            specs,
            self.samples.clone(),
            self.frames.clone(),
            self.failed.clone(),
            self.reconnects.clone(),
        )
        .await
    }

    /// Resident memory of each engine, in KiB.
    fn rss(&self) -> Vec<u64> {
        self.args.pids.iter().map(|pid| rss_kib(*pid)).collect()
    }

    /// `--warm-up` events to the held streams before the first scenario that sends any: a
    /// broker (JVM) started moments ago delivers the first thousands of messages late, and
    /// whichever server ran first would pay for it.
    async fn warm_up(&mut self) -> Result<()> {
        let started = Instant::now();
        for n in 0..self.args.warm_up {
            let (tenant, user) = self.users[(n as usize * 7919) % self.users.len()].clone();
            let (key, event) = self.event("warmup", &tenant, &user, false);
            self.send(&key, &event).await?;
            if n % 1_000 == 999 {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        self.producer.flush(Duration::from_secs(60))?;
        self.settle().await;
        eprintln!(
            "[load] warm-up: {} events in {:.1} s",
            self.args.warm_up,
            started.elapsed().as_secs_f64()
        );
        Ok(())
    }

    async fn idle(&mut self, before: &[u64], connected: &Connected) -> Result<Phase> {
        let mut phase = Phase::new("idle");
        tokio::time::sleep(Duration::from_secs(5)).await;
        let after = self.rss();
        let per_instance = (connected.held + self.args.held_elsewhere) as f64
            / self.args.engines.len().max(1) as f64;
        let per_connection: Vec<f64> = before
            .iter()
            .zip(&after)
            .map(|(b, a)| (a.saturating_sub(*b) as f64 * 1024.0) / per_instance.max(1.0))
            .collect();
        phase.extra = json!({
            "connections": connected.held,
            "held_by_other_processes": self.args.held_elsewhere,
            "failed": connected.failed,
            "connect_seconds": connected.seconds,
            "rss_kib_before": before,
            "rss_kib_after": after,
            "bytes_per_connection": per_connection,
        });
        phase.end = report::unix_now();
        Ok(phase)
    }

    /// Produces one event for `user`, its id stamped with the phase and the produce time.
    fn event(&mut self, phase: &str, tenant: &str, user: &str, email: bool) -> (String, Value) {
        self.next_id += 1;
        let id = format!("L{phase}-{}-{}", self.next_id, now_us());
        let mut data = json!({
            "user_id": user,
            "order_id": format!("A-{}", self.next_id),
            "amount": 12.5,
            "currency": "EUR",
        });
        if email {
            data["email"] = json!(format!("{user}@{tenant}.load.test"));
        }
        let event = json!({
            "id": id,
            "tenant": tenant,
            "type": "order_paid",
            "time": chrono::Utc::now().to_rfc3339(),
            "data": data,
        });
        (format!("{tenant}/{user}"), event)
    }

    async fn send(&self, key: &str, event: &Value) -> Result<()> {
        let payload = event.to_string();
        // Centrifugo publishes the payload as it is to the channels this header names.
        let headers = (self.args.target == Target::Centrifugo).then(|| {
            let (tenant, user) = key.split_once('/').unwrap_or((key, ""));
            rdkafka::message::OwnedHeaders::new().insert(rdkafka::message::Header {
                key: "centrifugo-channels",
                value: Some(&channel(tenant, user)),
            })
        });
        loop {
            let mut record = FutureRecord::to(&self.args.topic)
                .key(key)
                .payload(&payload);
            if let Some(headers) = &headers {
                record = record.headers(headers.clone());
            }
            match self.producer.send_result(record) {
                Ok(delivery) => {
                    // Delivery is confirmed in the background; a failure is counted there.
                    let failed = self.failed.clone();
                    tokio::spawn(async move {
                        if !matches!(delivery.await, Ok(Ok(_))) {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    });
                    return Ok(());
                }
                Err((e, _)) => {
                    if matches!(
                        e.rdkafka_error_code(),
                        Some(rdkafka::types::RDKafkaErrorCode::QueueFull)
                    ) {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        continue;
                    }
                    bail!("producing: {e}");
                }
            }
        }
    }

    /// `rate` events/s for `secs`, to users with a held stream, one in `email_every` with an
    /// email; waits for the stragglers, then reads the outbox's timings.
    async fn at_rate(&mut self, name: &str, rate: u64, secs: u64) -> Result<Phase> {
        let mut phase = Phase::new(name);
        let before = self.scrape().await;
        let total = rate * secs;
        let tick = Duration::from_millis(10);
        let per_tick = rate as f64 * tick.as_secs_f64();
        let mut interval = tokio::time::interval(tick);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let (mut sent, mut owed) = (0u64, 0f64);
        let mut emails = 0u64;
        while sent < total {
            interval.tick().await;
            owed += per_tick;
            while owed >= 1.0 && sent < total {
                owed -= 1.0;
                let (tenant, user) = self.users[(sent as usize * 7919) % self.users.len()].clone();
                let email = self.args.email_every > 0 && sent % self.args.email_every == 0;
                emails += email as u64;
                let (key, event) = self.event(name, &tenant, &user, email);
                self.send(&key, &event).await?;
                sent += 1;
            }
        }
        self.producer.flush(Duration::from_secs(30))?;
        self.settle().await;
        phase.end = report::unix_now();
        phase.produced = total;
        phase.stages = stage_delta(&before, &self.scrape().await);
        phase.extra = json!({
            "rate": rate,
            "seconds": secs,
            "emails": emails,
            "email_enqueue_ms": self.enqueue_latencies(name).await?,
        });
        Ok(phase)
    }

    /// Waits until frames stop arriving (2 s without one), at most a minute.
    async fn settle(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut last = self.frames.load(Ordering::Relaxed);
        let mut quiet = 0;
        while Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let now = self.frames.load(Ordering::Relaxed);
            if now == last {
                quiet += 1;
                if quiet >= 8 {
                    return;
                }
            } else {
                quiet = 0;
            }
            last = now;
        }
    }

    /// A backlog produced as fast as the producer takes it: events/s from the first produce
    /// to the last commit (the engines' `notify_notifications_written_total`) and to the
    /// last frame received (every event's user has a stream open).
    async fn max(&mut self) -> Result<Phase> {
        let mut phase = Phase::new("max");
        let before = self.scrape().await;
        let written_before = metric_sum(&before, "notify_notifications_written_total");
        let frames_before = self.frames.load(Ordering::Relaxed);
        let total = self.args.max_events;
        let started = Instant::now();
        for n in 0..total {
            let (tenant, user) = self.users[(n as usize * 7919) % self.users.len()].clone();
            let (key, event) = self.event("max", &tenant, &user, false);
            self.send(&key, &event).await?;
        }
        self.producer.flush(Duration::from_secs(60))?;
        let produced_in = started.elapsed();
        let deadline = Instant::now() + Duration::from_secs(300);
        let mut committed_in = None;
        let mut after = before.clone();
        // Centrifugo commits nothing: only the frames tell when it is done. A server that
        // drops some is done when none has come for 5 s; the rate counts what arrived.
        let commits = self.args.target == Target::Engine;
        let (mut received, mut last_frame) = (frames_before, Duration::ZERO);
        while Instant::now() < deadline {
            if commits && committed_in.is_none() {
                after = self.scrape().await;
                let written =
                    metric_sum(&after, "notify_notifications_written_total") - written_before;
                if written >= total as f64 {
                    committed_in = Some(started.elapsed());
                }
            }
            let now = self.frames.load(Ordering::Relaxed);
            if now != received {
                (received, last_frame) = (now, started.elapsed());
            }
            let delivered = received - frames_before >= total
                || started.elapsed() > produced_in.max(last_frame) + Duration::from_secs(5);
            if delivered && (committed_in.is_some() || !commits) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.settle().await;
        let delivered = received - frames_before;
        let rate = |n: u64, d: Duration| n as f64 / d.as_secs_f64().max(1e-3);
        phase.end = report::unix_now();
        phase.produced = total;
        phase.stages = stage_delta(&before, &after);
        phase.extra = json!({
            "events": total,
            "produce_seconds": produced_in.as_secs_f64(),
            "commit_seconds": committed_in.map(|d| d.as_secs_f64()),
            "events_per_second": committed_in.map(|d| rate(total, d)),
            "frames_received": delivered,
            "deliver_seconds": last_frame.as_secs_f64(),
            "delivered_per_second": rate(delivered, last_frame),
        });
        Ok(phase)
    }

    /// One user with `--fanout-connections` streams; every event goes to all of them.
    async fn fanout(&mut self) -> Result<Phase> {
        let mut phase = Phase::new("fanout");
        // The per-user stream cap would refuse most of them: this user is the exception the
        // load configuration allows (sse.max_connections_per_user).
        let specs = (0..self.args.fanout_connections)
            .map(|i| self.spec(i, i + 1, "fanout", "everyone"))
            .collect();
        let (held, failed) = self.open(specs).await;
        let before = self.scrape().await;
        let total = self.args.fanout_rate * self.args.fanout_secs;
        let mut interval =
            tokio::time::interval(Duration::from_secs_f64(1.0 / self.args.fanout_rate as f64));
        for _ in 0..total {
            interval.tick().await;
            let (key, event) = self.event("fanout", "fanout", "everyone", false);
            self.send(&key, &event).await?;
        }
        self.producer.flush(Duration::from_secs(30))?;
        self.settle().await;
        phase.end = report::unix_now();
        phase.produced = total;
        phase.stages = stage_delta(&before, &self.scrape().await);
        phase.extra = json!({
            "connections": held,
            "failed": failed,
            "rate": self.args.fanout_rate,
            "frames_expected": total * held as u64,
        });
        Ok(phase)
    }

    /// `--emails` events with an email each, as fast as possible: produce → outbox row, and
    /// the email worker's sending rate to the SMTP sink.
    async fn emails(&mut self) -> Result<Phase> {
        let mut phase = Phase::new("emails");
        let before = self.scrape().await;
        let sent_before = metric_sum(&before, "notify_emails_sent_total");
        let total = self.args.emails;
        for n in 0..total {
            let (tenant, user) = self.users[(n as usize * 7919) % self.users.len()].clone();
            let (key, event) = self.event("emails", &tenant, &user, true);
            self.send(&key, &event).await?;
        }
        self.producer.flush(Duration::from_secs(60))?;
        let deadline = Instant::now() + Duration::from_secs(300);
        let mut after;
        loop {
            after = self.scrape().await;
            if metric_sum(&after, "notify_emails_sent_total") - sent_before >= total as f64
                || Instant::now() > deadline
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (first, last, sent): (Option<f64>, Option<f64>, i64) = sqlx::query_as(
            "SELECT extract(epoch FROM min(sent_at))::float8, extract(epoch FROM max(sent_at))::float8,
                    count(sent_at)
             FROM email_outbox WHERE event_id LIKE 'Lemails-%'",
        )
        .fetch_one(self.pool.as_ref().context("the emails scenario needs --database-url")?)
        .await?;
        let span = last.zip(first).map_or(0.0, |(l, f)| l - f);
        phase.end = report::unix_now();
        phase.produced = total;
        phase.stages = stage_delta(&before, &after);
        phase.extra = json!({
            "emails": total,
            "sent": sent,
            "send_seconds": span,
            "emails_per_second": if span > 0.0 { sent as f64 / span } else { 0.0 },
            "email_enqueue_ms": self.enqueue_latencies("emails").await?,
        });
        Ok(phase)
    }

    /// Produce → outbox row (the row's `created_at`, its transaction's start) of a phase's
    /// emails, in ms: p50, p95, p99, max.
    async fn enqueue_latencies(&self, phase: &str) -> Result<Value> {
        let Some(pool) = &self.pool else {
            return Ok(Value::Null);
        };
        let rows: Vec<(String, f64)> = sqlx::query_as(
            "SELECT event_id, extract(epoch FROM created_at)::float8 FROM email_outbox
             WHERE event_id LIKE $1",
        )
        .bind(format!("L{phase}-%"))
        .fetch_all(pool)
        .await?;
        let mut h = hdrhistogram::Histogram::<u64>::new(3)?;
        for (id, created) in rows {
            let Some(sent_us) = id.rsplit('-').next().and_then(|s| s.parse::<u64>().ok()) else {
                continue;
            };
            let created_us = (created * 1e6) as u64;
            h.record(created_us.saturating_sub(sent_us).max(1))?;
        }
        Ok(report::percentiles_ms(&h))
    }

    /// Every engine's `/metrics`, parsed into (name with labels → value).
    async fn scrape(&self) -> Vec<BTreeMap<String, f64>> {
        let mut all = Vec::new();
        for admin in &self.args.admins {
            let text = match self
                .http
                .get(format!("http://{admin}/metrics"))
                .send()
                .await
            {
                Ok(r) => r.text().await.unwrap_or_default(),
                Err(_) => String::new(),
            };
            all.push(
                text.lines()
                    .filter(|l| !l.starts_with('#'))
                    .filter_map(|l| {
                        let (name, value) = l.rsplit_once(' ')?;
                        Some((name.to_owned(), value.parse().ok()?))
                    })
                    .collect(),
            );
        }
        all
    }
}

/// The Centrifugo channel of a user's events.
fn channel(tenant: &str, user: &str) -> String {
    format!("{tenant}.{user}")
}

/// `s` with everything but RFC 3986's unreserved characters percent-encoded (a query value).
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 2);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A metric summed over the engines.
fn metric_sum(scrapes: &[BTreeMap<String, f64>], name: &str) -> f64 {
    scrapes.iter().filter_map(|m| m.get(name)).sum()
}

/// Mean time per event in each stage of `notify_stage_seconds` between two scrapes, in ms.
fn stage_delta(before: &[BTreeMap<String, f64>], after: &[BTreeMap<String, f64>]) -> Value {
    let mut stages = serde_json::Map::new();
    for stage in ["kafka", "queue", "route", "commit", "stream_read"] {
        let sum = format!("notify_stage_seconds_sum{{stage=\"{stage}\"}}");
        let count = format!("notify_stage_seconds_count{{stage=\"{stage}\"}}");
        let d = |name: &str| metric_sum(after, name) - metric_sum(before, name);
        let n = d(&count);
        if n > 0.0 {
            stages.insert(stage.into(), json!(d(&sum) / n * 1e3));
        }
    }
    Value::Object(stages)
}

/// Resident memory of a process, in KiB (0 when it cannot be read).
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}
