//! Developer and operator tools behind the binary's subcommands: minting a token, publishing
//! sample events, previewing and linting email templates, checking a plugin and running it
//! locally on one event, listing and replaying dead letters, requeueing failed emails, and
//! the container's health probe.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::config::{AuthConfig, Config, DatabaseConfig, KafkaConfig, PluginConfig, TenantConfig};
use crate::ingest::{Publisher, envelope};
use crate::plugin::PluginHost;

/// A signed token for (tenant, user).
pub fn token(auth: &AuthConfig, tenant: &str, user: &str, ttl_secs: u64) -> anyhow::Result<String> {
    if !crate::model::valid_tenant(tenant) {
        bail!("{tenant:?} is not a valid tenant id ([A-Za-z0-9_-], at most 64)");
    }
    if ttl_secs > auth.max_token_lifetime_secs {
        bail!(
            "--ttl {ttl_secs} is longer than auth.max_token_lifetime_secs ({}): the engine would refuse the token",
            auth.max_token_lifetime_secs
        );
    }
    Ok(crate::api::auth::mint(auth, tenant, user, ttl_secs))
}

/// Puts failed emails matching `filter` back in the outbox queue (due now, with a fresh
/// `email.max_age_secs` window); returns how many. The engine's email worker sends them.
pub async fn requeue_emails(
    database: &DatabaseConfig,
    filter: &crate::store::outbox::RequeueFilter,
) -> anyhow::Result<u64> {
    let pool = crate::store::connect(database, 1)?;
    let requeued = crate::store::outbox::requeue_failed_emails(&pool, filter)
        .await
        .context("requeueing failed emails")?;
    pool.close().await;
    Ok(requeued)
}

/// Republishes the selected dead letters (not yet replayed) to their topics, each with a
/// one-time replay token: the engine routes each again once, even if its id was claimed
/// when it was dead-lettered, if it arrives within `kafka.replay_token_ttl_secs` (the
/// token counts for that message only; see `store::dead_letters`). Returns how many were republished.
pub async fn replay_dead_letters(
    kafka: &KafkaConfig,
    database: &DatabaseConfig,
    filter: &crate::store::dead_letters::DeadLetterFilter,
) -> anyhow::Result<usize> {
    let pool = crate::store::connect(database, 1)?;
    let replays = crate::store::dead_letters::prepare_replays(&pool, filter)
        .await
        .context("selecting dead letters")?;
    pool.close().await;
    let publisher = Publisher::connect(kafka)?;
    for replay in &replays {
        let token = replay.replay_token.to_string();
        // The message's own headers (a binary-mode CloudEvent's attributes among them), then
        // the one-time token.
        let mut headers: Vec<(&str, Option<&[u8]>)> = replay
            .headers
            .iter()
            .map(|(name, value)| (name.as_str(), value.as_deref()))
            .collect();
        headers.push((crate::model::REPLAY_HEADER, Some(token.as_bytes())));
        // With the tenant bound to a gateway's header, the operator's tool speaks for the
        // tenant the dead letter was recorded under, as the gateway did (unless the header
        // was kept with the message).
        if kafka.tenant_from == crate::config::TenantFrom::Header
            && let Some(tenant) = &replay.tenant_id
            && !replay
                .headers
                .iter()
                .any(|(n, _)| n.eq_ignore_ascii_case(&kafka.tenant_header))
        {
            headers.push((kafka.tenant_header.as_str(), Some(tenant.as_bytes())));
        }
        publisher
            .send_raw(
                &replay.kafka_topic,
                replay.kafka_key.as_deref(),
                &replay.payload,
                &headers,
            )
            .await
            .with_context(|| format!("republishing dead letter {}", replay.id))?;
    }
    Ok(replays.len())
}

/// The selected dead letters, oldest first.
pub async fn list_dead_letters(
    database: &DatabaseConfig,
    filter: &crate::store::dead_letters::DeadLetterFilter,
) -> anyhow::Result<Vec<crate::store::dead_letters::DeadLetterRow>> {
    let pool = crate::store::connect(database, 1)?;
    let rows = crate::store::dead_letters::list_dead_letters(&pool, filter)
        .await
        .context("listing dead letters")?;
    pool.close().await;
    Ok(rows)
}

/// Publishes every line of a JSON-lines file. Each line is an envelope; its topic is
/// `topic` if given, else the envelope's `type`. Lines are sent as they are (so a file can
/// hold deliberately broken samples too); the key is `data.order_id`, else the event id,
/// so one order's events stay in order on one partition.
/// `interval` spaces the events out, so a person watching the demo sees them arrive.
/// `stamp_now` sets each parseable envelope's `time` to now (sample files carry fixed times,
/// and events older than `email.max_event_age_secs` send no email).
pub async fn publish(
    kafka: &KafkaConfig,
    file: &Path,
    topic: Option<&str>,
    interval: std::time::Duration,
    stamp_now: bool,
) -> anyhow::Result<usize> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let publisher = Publisher::connect(kafka)?;
    let mut sent = 0;
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with("//") {
            continue;
        }
        let parsed: Option<Value> = serde_json::from_str(line).ok();
        let target = topic
            .map(str::to_owned)
            .or_else(|| parsed.as_ref()?.get("type")?.as_str().map(str::to_owned))
            .with_context(|| {
                format!(
                    "{}:{}: no topic (give --topic or a \"type\")",
                    file.display(),
                    n + 1
                )
            })?;
        let key = parsed.as_ref().and_then(|v| {
            v.pointer("/data/order_id")
                .or_else(|| v.get("id"))
                .and_then(Value::as_str)
                .map(str::to_owned)
        });
        let stamped = match parsed {
            Some(Value::Object(mut envelope)) if stamp_now && envelope.contains_key("time") => {
                envelope.insert("time".into(), chrono::Utc::now().to_rfc3339().into());
                Some(Value::Object(envelope).to_string())
            }
            _ => None,
        };
        let payload = stamped.as_deref().unwrap_or(line);
        let (partition, offset) = publisher
            .send(&target, key.as_deref(), payload.as_bytes())
            .await?;
        tracing::info!(topic = %target, partition, offset, "published");
        sent += 1;
        if !interval.is_zero() {
            tokio::time::sleep(interval).await;
        }
    }
    Ok(sent)
}

/// `template preview`: renders `template` for `tenant` with the JSON in `data` (default: the
/// tenant's own `sample.json` for that template, else the default one's), under the tenant's
/// link domains, as the email worker would.
pub fn preview(
    config: &Config,
    tenant: &str,
    template: &str,
    data: Option<&Path>,
) -> anyhow::Result<crate::templates::RenderedEmail> {
    let dir = &config.email.templates_dir;
    let data = data.map_or_else(|| sample_data(dir, tenant, template), Path::to_path_buf);
    let link_domains = config
        .tenants
        .get(tenant)
        .map(|t| t.link_domains.clone())
        .unwrap_or_default();
    preview_template(dir, tenant, template, &data, &link_domains)
}

/// The `sample.json` beside a template: the tenant's own, else the default template's.
fn sample_data(dir: &Path, tenant: &str, template: &str) -> PathBuf {
    let own = dir.join(tenant).join(template).join("sample.json");
    if own.exists() {
        own
    } else {
        dir.join("default").join(template).join("sample.json")
    }
}

/// Renders one template for a tenant with the data in `data_file`: returns subject, text
/// and html (the CLI prints the first two and writes the html to a file).
pub fn preview_template(
    templates_dir: &Path,
    tenant: &str,
    template: &str,
    data_file: &Path,
    link_domains: &[String],
) -> anyhow::Result<crate::templates::RenderedEmail> {
    let templates = crate::templates::Templates::load(templates_dir)
        .with_context(|| format!("loading {}", templates_dir.display()))?;
    let data: Value = serde_json::from_str(
        &std::fs::read_to_string(data_file)
            .with_context(|| format!("reading {}", data_file.display()))?,
    )
    .with_context(|| format!("{} is not JSON", data_file.display()))?;
    Ok(templates.render(tenant, template, &data, link_domains)?)
}

/// Every problem `template lint` finds (empty: clean).
pub fn lint_templates(templates_dir: &Path) -> anyhow::Result<Vec<String>> {
    let templates = crate::templates::Templates::load(templates_dir)
        .with_context(|| format!("loading {}", templates_dir.display()))?;
    Ok(templates.lint())
}

/// Checks a plugin file the way the engine would load it: world, WIT version, imports,
/// exports, size, digest, compile time; `Err` with the reason the engine would refuse it.
pub async fn check_plugin(
    limits: PluginConfig,
    plugin: &Path,
) -> anyhow::Result<crate::plugin::CheckReport> {
    let host = PluginHost::new(limits, BTreeMap::new())?;
    Ok(host.check(plugin).await?)
}

/// Runs `plugin` on the event in `event_file` with the production sandbox and limits, and
/// returns a report: the deliveries (or the error), the plugin's logs, and the cost against
/// each limit.
pub async fn run_plugin(
    limits: PluginConfig,
    plugin: &Path,
    event_file: &Path,
    tenant_config: BTreeMap<String, String>,
) -> anyhow::Result<(bool, Value)> {
    let raw =
        std::fs::read(event_file).with_context(|| format!("reading {}", event_file.display()))?;
    let event = envelope::decode(Some(&raw), &[], limits.max_input_bytes)
        .map_err(|r| anyhow::anyhow!("{}: {r}", event_file.display()))?;
    let mut tenants = BTreeMap::new();
    tenants.insert(
        event.tenant.clone(),
        TenantConfig {
            plugin: Some(limits.default_plugin.clone()),
            config: tenant_config,
            ..TenantConfig::default()
        },
    );
    let host = PluginHost::new(limits.clone(), tenants)?;
    host.load_single(plugin).await?;
    let limits_json = json!({
        "fuel": limits.fuel,
        "time_ms": limits.timeout_ms,
        "memory_bytes": limits.memory_bytes,
        "input_bytes": limits.max_input_bytes,
        "output_bytes": limits.max_output_bytes,
    });
    Ok(match host.route(&event).await {
        Ok(d) => (
            true,
            json!({
                "ok": true,
                "plugin": plugin.display().to_string(),
                "digest": d.digest,
                "deliveries": d.deliveries,
                "logs": d.logs.iter().map(|(l, m)| json!({"level": l, "message": m})).collect::<Vec<_>>(),
                "cost": {
                    "fuel": d.cost.fuel,
                    "time_us": d.cost.elapsed.as_micros() as u64,
                    "memory_bytes": d.cost.memory_bytes,
                },
                "limits": limits_json,
            }),
        ),
        Err(e) => (
            false,
            json!({
                "ok": false,
                "plugin": plugin.display().to_string(),
                "error": { "kind": e.kind(), "message": e.to_string() },
                "limits": limits_json,
            }),
        ),
    })
}

/// Where `healthcheck` asks by default: `/readyz` on the admin listener, a wildcard address
/// (`0.0.0.0`, `::`) asked on the loopback of its family.
pub fn readyz_address(admin_listen: std::net::SocketAddr) -> std::net::SocketAddr {
    let mut addr = admin_listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr.ip() {
            std::net::IpAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::IpAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    addr
}

/// The container's health probe: `GET path` on `addr` (plain HTTP/1.0, no client library
/// and no curl in the image), within `timeout`. `Ok` on a 200; else the reason, in a line.
pub async fn healthcheck(
    addr: &str,
    path: &str,
    timeout: std::time::Duration,
) -> Result<(), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ask = async {
        let mut stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
        let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("writing to {addr}: {e}"))?;
        // The status line and a short body are all that is read (the body says why).
        let mut head = Vec::with_capacity(1024);
        (&mut stream)
            .take(4096)
            .read_to_end(&mut head)
            .await
            .map_err(|e| format!("reading from {addr}: {e}"))?;
        let text = String::from_utf8_lossy(&head);
        let status = text.lines().next().unwrap_or_default();
        let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b.trim());
        match status.split_whitespace().nth(1) {
            Some("200") => Ok(()),
            Some(code) => Err(format!("http://{addr}{path} answered {code}: {body}")),
            None => Err(format!("http://{addr}{path} answered no HTTP status line")),
        }
    };
    tokio::time::timeout(timeout, ask)
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "http://{addr}{path} did not answer within {timeout:?}"
            ))
        })
}
