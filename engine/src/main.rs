//! The `notify-engine` binary: run the engine, or one of its tools.

use std::collections::BTreeMap;
use std::path::PathBuf;

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
    /// Republish dead letters to their topics; the engine routes each again, once.
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
    fn filter(self, include_replayed: bool) -> notify_engine::store::DeadLetterFilter {
        notify_engine::store::DeadLetterFilter {
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
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => {
            let config = Config::load(cli.config.as_deref())?;
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
        }
        Command::Token { tenant, user, ttl } => {
            let config = Config::load(cli.config.as_deref())?;
            println!("{}", tools::token(&config.auth, &tenant, &user, ttl)?);
        }
        Command::Template { command } => {
            let config = load_without_secret(cli.config.as_deref())?;
            let dir = &config.email.templates_dir;
            match command {
                TemplateCommand::Preview {
                    tenant,
                    template,
                    data,
                    html,
                } => {
                    let data = data.unwrap_or_else(|| {
                        let own = dir.join(&tenant).join(&template).join("sample.json");
                        if own.exists() {
                            own
                        } else {
                            dir.join("default").join(&template).join("sample.json")
                        }
                    });
                    let link_domains = config
                        .tenants
                        .get(&tenant)
                        .map(|t| t.link_domains.clone())
                        .unwrap_or_default();
                    let email =
                        tools::preview_template(dir, &tenant, &template, &data, &link_domains)?;
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
        }
        Command::DeadLetters { command } => {
            let config = load_without_secret(cli.config.as_deref())?;
            match command {
                DeadLetterCommand::List { filter, all } => {
                    let rows =
                        tools::list_dead_letters(&config.database, &filter.filter(all)).await?;
                    for row in rows {
                        println!("{}", serde_json::to_string(&row)?);
                    }
                }
                DeadLetterCommand::Replay { filter } => {
                    telemetry::init_logging(&config.log);
                    let replayed = tools::replay_dead_letters(
                        &config.kafka,
                        &config.database,
                        &filter.filter(false),
                    )
                    .await?;
                    println!("republished {replayed} dead letters");
                }
            }
        }
        Command::Email {
            command:
                EmailCommand::Requeue {
                    tenant,
                    since,
                    until,
                    error,
                },
        } => {
            let config = load_without_secret(cli.config.as_deref())?;
            let filter = notify_engine::store::RequeueFilter {
                tenant,
                since,
                until,
                error,
            };
            let requeued = tools::requeue_emails(&config.database, &filter).await?;
            println!("requeued {requeued} failed emails");
        }
        Command::Publish {
            file,
            topic,
            interval_ms,
            stamp_now,
        } => {
            let config = load_without_secret(cli.config.as_deref())?;
            telemetry::init_logging(&config.log);
            let sent = tools::publish(
                &config.kafka,
                &file,
                topic.as_deref(),
                std::time::Duration::from_millis(interval_ms),
                stamp_now,
            )
            .await?;
            eprintln!("published {sent} events");
        }
        Command::Plugin {
            command: PluginCommand::Check { plugin },
        } => {
            let config = load_without_secret(cli.config.as_deref())?;
            let report = tools::check_plugin(config.plugins, &plugin).await?;
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
        Command::Plugin {
            command: PluginCommand::Run { plugin, event, set },
        } => {
            let config = load_without_secret(cli.config.as_deref())?;
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

/// Tools that never serve or mint tokens do not need the JWT secret.
fn load_without_secret(file: Option<&std::path::Path>) -> anyhow::Result<Config> {
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
