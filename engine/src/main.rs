//! The `notify-engine` binary: run the engine, or one of its tools. A thin CLI: it parses
//! the command line, loads the configuration, calls `app` or `tools`, and prints; what a
//! command does lives in the library, where tests reach it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Parser, Subcommand};
use notify_engine::config::Config;
use notify_engine::{app, telemetry, tools};

#[derive(Parser)]
#[command(version, about = "WebAssembly-pluggable notification engine")]
struct Cli {
    /// TOML config file (defaults → file → NOTIFY_* environment).
    #[arg(long, short, global = true, env = "NOTIFY_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the engine (the default).
    Run,
    /// Print a signed JWT for a tenant's user (needs NOTIFY_AUTH__JWT_SECRET).
    Token {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        user: String,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
    },
    /// Publish the envelopes of a JSON-lines file to Kafka (topic = each envelope's type).
    Publish {
        file: PathBuf,
        #[arg(long)]
        topic: Option<String>,
        /// Pause between events, in milliseconds.
        #[arg(long, default_value_t = 0)]
        interval_ms: u64,
        /// Set each envelope's `time` to now (sample files carry fixed times).
        #[arg(long)]
        stamp_now: bool,
    },
    /// Email template tools for template authors.
    Template {
        #[command(subcommand)]
        command: TemplateCommand,
    },
    /// Dead letters: list them, or replay them once the cause is fixed.
    DeadLetters {
        #[command(subcommand)]
        command: DeadLetterCommand,
    },
    /// Email outbox tools for operators.
    Email {
        #[command(subcommand)]
        command: EmailCommand,
    },
    /// Plugin developer tools.
    Plugin {
        #[command(subcommand)]
        command: PluginCommand,
    },
    /// The container's health probe: `GET /readyz` on the admin listener (http.admin_listen
    /// from the config); exit 0 on 200, else 1 with the reason. Needs no secret and no curl.
    Healthcheck {
        /// Ask this address (`host:port`) instead of the configured admin listener.
        #[arg(long)]
        addr: Option<String>,
        /// Give up after this many milliseconds.
        #[arg(long, default_value_t = 3000)]
        timeout_ms: u64,
    },
}

#[derive(Subcommand)]
enum TemplateCommand {
    /// Render a template for a tenant with sample data: prints subject and text, writes the
    /// html to a file.
    Preview {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        template: String,
        /// JSON data (default: the template's sample.json).
        #[arg(long)]
        data: Option<PathBuf>,
        /// Where the html goes.
        #[arg(long, default_value = "preview.html")]
        html: PathBuf,
    },
    /// Render every template against the sample.json beside it; non-zero exit on any error.
    Lint,
}

#[derive(Subcommand)]
enum DeadLetterCommand {
    /// Print dead letters as JSON lines, oldest first (replayed ones only with --all).
    List {
        #[command(flatten)]
        filter: DeadLetterArgs,
        /// Include dead letters already replayed.
        #[arg(long)]
        all: bool,
    },
    /// Republish dead letters to their topics; the engine routes each again, once, if it
    /// arrives within kafka.replay_token_ttl_secs (else it is set aside again, with why).
    Replay {
        #[command(flatten)]
        filter: DeadLetterArgs,
    },
}

#[derive(clap::Args)]
struct DeadLetterArgs {
    /// Only this tenant's dead letters.
    #[arg(long)]
    tenant: Option<String>,
    /// Only this kind (e.g. plugin_trap, plugin_unavailable, plugin_quarantined).
    #[arg(long)]
    kind: Option<String>,
    /// Only dead letters created at or after this time (RFC 3339).
    #[arg(long)]
    since: Option<chrono::DateTime<chrono::Utc>>,
    /// Only dead letters created before this time (RFC 3339).
    #[arg(long)]
    until: Option<chrono::DateTime<chrono::Utc>>,
    /// At most this many.
    #[arg(long, default_value_t = 1000)]
    limit: i64,
}

impl DeadLetterArgs {
    fn filter(
        self,
        include_replayed: bool,
    ) -> notify_engine::store::dead_letters::DeadLetterFilter {
        notify_engine::store::dead_letters::DeadLetterFilter {
            tenant: self.tenant,
            kind: self.kind,
            since: self.since,
            until: self.until,
            include_replayed,
            limit: self.limit,
        }
    }
}

#[derive(Subcommand)]
enum EmailCommand {
    /// Put failed emails back in the queue (after a long relay outage, say). Filters combine;
    /// none requeues every failed email.
    Requeue {
        /// Only this tenant's emails.
        #[arg(long)]
        tenant: Option<String>,
        /// Only emails created at or after this time (RFC 3339).
        #[arg(long)]
        since: Option<chrono::DateTime<chrono::Utc>>,
        /// Only emails created before this time (RFC 3339).
        #[arg(long)]
        until: Option<chrono::DateTime<chrono::Utc>>,
        /// Only emails whose last error contains this text (case-insensitive).
        #[arg(long)]
        error: Option<String>,
    },
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Check a plugin file as the engine would load it: world, WIT version, imports, exports,
    /// size, SHA-256, compile time. Exits non-zero with the reason if the engine would
    /// refuse it.
    Check { plugin: PathBuf },
    /// Run a routing plugin on one event with production limits; print what it decided and
    /// what it cost.
    Run {
        #[arg(long)]
        plugin: PathBuf,
        #[arg(long)]
        event: PathBuf,
        /// Tenant config values the plugin can read, as key=value (repeatable).
        #[arg(long = "set", value_parser = parse_key_value)]
        set: Vec<(String, String)>,
    },
}

fn parse_key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?} is not key=value"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let file = cli.config.as_deref();
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => run(file).await,
        Command::Token { tenant, user, ttl } => token(file, &tenant, &user, ttl),
        Command::Template { command } => template(file, command),
        Command::DeadLetters { command } => dead_letters(file, command).await,
        Command::Email { command } => email(file, command).await,
        Command::Publish {
            file: events,
            topic,
            interval_ms,
            stamp_now,
        } => publish(file, &events, topic.as_deref(), interval_ms, stamp_now).await,
        Command::Plugin { command } => plugin(file, command).await,
        Command::Healthcheck { addr, timeout_ms } => healthcheck(file, addr, timeout_ms).await,
    }
}

/// `run`: the engine, until SIGINT/SIGTERM; an error if one of its tasks failed.
async fn run(file: Option<&Path>) -> anyhow::Result<()> {
    let config = Config::load(file)?;
    telemetry::init_logging(&config.log);
    let engine = app::start(config).await.context("starting the engine")?;
    let token = engine.shutdown_token();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown requested; draining");
        token.cancel();
    });
    engine.wait().await;
    if engine.failed() {
        anyhow::bail!("the engine stopped because one of its tasks failed (see the log)");
    }
    tracing::info!("stopped");
    Ok(())
}

/// `token`: prints a signed JWT.
fn token(file: Option<&Path>, tenant: &str, user: &str, ttl: u64) -> anyhow::Result<()> {
    let config = Config::load(file)?;
    println!("{}", tools::token(&config.auth, tenant, user, ttl)?);
    Ok(())
}

/// `template preview` and `template lint`.
fn template(file: Option<&Path>, command: TemplateCommand) -> anyhow::Result<()> {
    let config = load_without_secret(file)?;
    match command {
        TemplateCommand::Preview {
            tenant,
            template,
            data,
            html,
        } => {
            let email = tools::preview(&config, &tenant, &template, data.as_deref())?;
            println!("Subject: {}\n", email.subject);
            if let Some(text) = &email.text {
                println!("{text}");
            }
            if let Some(body) = &email.html {
                std::fs::write(&html, body)
                    .with_context(|| format!("writing {}", html.display()))?;
                eprintln!("html written to {}", html.display());
            }
        }
        TemplateCommand::Lint => {
            let dir = &config.email.templates_dir;
            let problems = tools::lint_templates(dir)?;
            for problem in &problems {
                eprintln!("{problem}");
            }
            if !problems.is_empty() {
                anyhow::bail!("{} template problems", problems.len());
            }
            eprintln!("templates in {} render cleanly", dir.display());
        }
    }
    Ok(())
}

/// `dead-letters list` (JSON lines) and `dead-letters replay`.
async fn dead_letters(file: Option<&Path>, command: DeadLetterCommand) -> anyhow::Result<()> {
    let config = load_without_secret(file)?;
    match command {
        DeadLetterCommand::List { filter, all } => {
            let rows = tools::list_dead_letters(&config.database, &filter.filter(all)).await?;
            for row in rows {
                println!("{}", serde_json::to_string(&row)?);
            }
        }
        DeadLetterCommand::Replay { filter } => {
            telemetry::init_logging(&config.log);
            let replayed =
                tools::replay_dead_letters(&config.kafka, &config.database, &filter.filter(false))
                    .await?;
            println!("republished {replayed} dead letters");
        }
    }
    Ok(())
}

/// `email requeue`.
async fn email(file: Option<&Path>, command: EmailCommand) -> anyhow::Result<()> {
    let EmailCommand::Requeue {
        tenant,
        since,
        until,
        error,
    } = command;
    let config = load_without_secret(file)?;
    let filter = notify_engine::store::outbox::RequeueFilter {
        tenant,
        since,
        until,
        error,
    };
    let requeued = tools::requeue_emails(&config.database, &filter).await?;
    println!("requeued {requeued} failed emails");
    Ok(())
}

/// `publish`: a JSON-lines file of envelopes to Kafka.
async fn publish(
    file: Option<&Path>,
    events: &Path,
    topic: Option<&str>,
    interval_ms: u64,
    stamp_now: bool,
) -> anyhow::Result<()> {
    let config = load_without_secret(file)?;
    telemetry::init_logging(&config.log);
    let interval = std::time::Duration::from_millis(interval_ms);
    let sent = tools::publish(&config.kafka, events, topic, interval, stamp_now).await?;
    eprintln!("published {sent} events");
    Ok(())
}

/// `plugin check` and `plugin run` (which exits 1 when the plugin failed).
async fn plugin(file: Option<&Path>, command: PluginCommand) -> anyhow::Result<()> {
    let config = load_without_secret(file)?;
    match command {
        PluginCommand::Check { plugin } => {
            let report = tools::check_plugin(config.plugins, &plugin).await?;
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
        PluginCommand::Run { plugin, event, set } => {
            let tenant_config: BTreeMap<_, _> = set.into_iter().collect();
            let (ok, report) =
                tools::run_plugin(config.plugins, &plugin, &event, tenant_config).await?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            if !ok {
                std::process::exit(1);
            }
        }
    }
    Ok(())
}

/// `healthcheck`: exit 0 when `/readyz` answers 200, else 1 with the reason on stderr.
async fn healthcheck(
    file: Option<&Path>,
    addr: Option<String>,
    timeout_ms: u64,
) -> anyhow::Result<()> {
    let addr = match addr {
        Some(addr) => addr,
        None => {
            let config = load_without_secret(file)?;
            tools::readyz_address(config.http.admin_listen).to_string()
        }
    };
    let timeout = std::time::Duration::from_millis(timeout_ms);
    if let Err(reason) = tools::healthcheck(&addr, "/readyz", timeout).await {
        eprintln!("not ready: {reason}");
        std::process::exit(1);
    }
    Ok(())
}

/// Tools that never serve or mint tokens do not need the JWT secret.
fn load_without_secret(file: Option<&Path>) -> anyhow::Result<Config> {
    Ok(Config::extract(file)?)
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing the SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
