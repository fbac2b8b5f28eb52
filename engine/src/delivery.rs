//! The email worker: drains the outbox, renders, sends over SMTP, records the result.
//!
//! It never talks to Kafka, and the pipeline never talks SMTP: an SMTP outage only makes
//! the outbox grow, it never stalls a partition. Rows are claimed with
//! `FOR UPDATE SKIP LOCKED`, so any number of instances share the work.
//!
//! Outcomes: `250` → sent. A transient failure (4xx, connection refused, timeout) → retried
//! with exponential backoff and jitter, capped, for as long as the row is younger than
//! `email.max_age_secs` (days, the way an MTA keeps its queue). A permanent failure (5xx,
//! unrenderable template, bad address) → failed at once. Every attempt records its error;
//! `notify-engine email requeue` puts failed rows back.
//!
//! After an outage (`relay`): a failure that is the relay's is recorded as such, and the
//! first success afterwards, a send or a probe of the relay every `email.relay_probe_ms`
//! (also right after a start), makes the emails waiting for the relay due at once, so mail
//! flows within seconds of the relay's return instead of after each row's backoff.
//!
//! Fairness: each claim takes at most `email.per_tenant_batch` rows of one tenant (up to
//! `email.batch` in all, tenants' oldest rows first, round-robin), each tenant has a send
//! rate (`email.tenant_rate_per_sec`), and up to `email.concurrency` sends run at once. The
//! next claim is made once half the sends are free, not after a whole round: one slow send
//! does not keep the other slots empty.

mod rate;
mod relay;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lettre::message::{Mailbox, MultiPart, SinglePart, header};
use lettre::transport::smtp::authentication::Credentials;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use rand::Rng;
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::{EmailConfig, SmtpConfig, SmtpTls, TenantConfig};
use crate::plugin::{Disposition, EmailToRender, PluginError, PluginHost};
use crate::store::outbox::{self, OutboxEmail};
use crate::telemetry::Metrics;
use crate::templates::{RenderedEmail, Templates};

#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error("smtp configuration: {0}")]
    Smtp(#[from] lettre::transport::smtp::Error),
    #[error("smtp.from: {0}")]
    From(#[from] lettre::address::AddressError),
}

/// What one send attempt came to.
enum Attempt {
    Sent,
    Retry(String),
    Failed(String),
}

pub struct EmailWorker {
    pub pool: PgPool,
    pub templates: Arc<arc_swap::ArcSwap<Templates>>,
    pub transport: AsyncSmtpTransport<Tokio1Executor>,
    pub from: Mailbox,
    pub config: EmailConfig,
    /// Per-tenant link and recipient policies.
    pub tenants: std::collections::BTreeMap<String, TenantConfig>,
    pub metrics: Metrics,
    pub wake: Arc<Notify>,
    /// Tenants' templating plugins.
    pub plugins: Arc<PluginHost>,
    /// Where the relay's state is reported (`/status`).
    pub health: Arc<crate::health::Health>,
}

/// The worker and what its send tasks share.
struct Shared {
    worker: EmailWorker,
    relay: relay::RelayWatch,
}

impl std::ops::Deref for Shared {
    type Target = EmailWorker;
    fn deref(&self) -> &EmailWorker {
        &self.worker
    }
}

/// Builds the SMTP transport from configuration (no connection is made yet), keeping up to
/// `concurrency` connections open: lettre's pool closes a connection coming back to a full
/// pool, so a smaller pool than the sends in flight would reconnect for most of them.
pub fn transport(
    smtp: &SmtpConfig,
    concurrency: usize,
) -> Result<AsyncSmtpTransport<Tokio1Executor>, DeliveryError> {
    let builder = match smtp.tls {
        SmtpTls::None => AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&smtp.host),
        SmtpTls::Starttls => AsyncSmtpTransport::<Tokio1Executor>::starttls_relay(&smtp.host)?,
        SmtpTls::Tls => AsyncSmtpTransport::<Tokio1Executor>::relay(&smtp.host)?,
    };
    let mut builder = builder
        .port(smtp.port)
        .timeout(Some(Duration::from_millis(smtp.timeout_ms)))
        .pool_config(
            lettre::transport::smtp::PoolConfig::new()
                .max_size(u32::try_from(concurrency).unwrap_or(u32::MAX)),
        );
    if let Some(user) = &smtp.username {
        builder = builder.credentials(Credentials::new(
            user.clone(),
            smtp.password.clone().unwrap_or_default(),
        ));
    }
    Ok(builder.build())
}

impl EmailWorker {
    /// Claims and sends until shutdown. Sends run as tasks of their own, up to
    /// `email.concurrency` at once; the next fair batch is claimed as soon as half of them
    /// are free, so a round's slowest send does not hold the others' slots empty.
    pub async fn run(self, shutdown: CancellationToken) {
        let worker = Arc::new(Shared {
            worker: self,
            relay: relay::RelayWatch::new(),
        });
        tokio::join!(
            worker.clone().send(shutdown.clone()),
            worker.watch_relay(&shutdown)
        );
        tracing::info!("email worker stopped");
    }
}

impl Shared {
    /// The claiming and sending loop.
    async fn send(self: Arc<Self>, shutdown: CancellationToken) {
        let worker = self;
        let poll = Duration::from_millis(worker.config.poll_interval_ms);
        let max_age = Duration::from_secs(worker.config.max_age_secs);
        let slots = worker.config.concurrency.max(1);
        let rate = Arc::new(std::sync::Mutex::new(rate::TenantRate::new(
            worker.config.tenant_rate_per_sec,
        )));
        // Claimed rows waiting for a slot, with when they were claimed.
        let mut queue: VecDeque<(OutboxEmail, Instant)> = VecDeque::new();
        let mut sending = JoinSet::new();
        // The last claim found nothing due: wait for a wake-up or the poll before the next.
        let mut idle = false;
        // When to look again without a wake-up (due retries): one timer, which sends
        // finishing meanwhile do not push back.
        let mut poll_at = tokio::time::Instant::now();
        loop {
            while sending.len() < slots
                && let Some((email, claimed)) = queue.pop_front()
            {
                let (worker, rate, shutdown) = (worker.clone(), rate.clone(), shutdown.clone());
                sending.spawn(async move { worker.handle(email, claimed, &rate, &shutdown).await });
            }
            if shutdown.is_cancelled() && queue.is_empty() {
                // Queued rows were handed back by `handle`; sends in flight finish.
                while sending.join_next().await.is_some() {}
                break;
            }
            if queue.is_empty() && !idle && sending.len() <= slots / 2 && !shutdown.is_cancelled() {
                if let Err(e) = outbox::sweep_expired_claims(&worker.pool, max_age).await {
                    tracing::warn!(error = %e.with_cause(), "sweeping expired outbox claims failed");
                }
                let claimed = match outbox::claim_emails(
                    &worker.pool,
                    worker.config.batch,
                    worker.config.per_tenant_batch,
                    worker.claim_timeout(),
                )
                .await
                {
                    Ok(rows) => rows,
                    Err(e) => {
                        tracing::warn!(error = %e.with_cause(), "claiming outbox rows failed");
                        Vec::new()
                    }
                };
                // Work found: look again as soon as there are slots (more may be due, of
                // other tenants too).
                idle = claimed.is_empty();
                poll_at = tokio::time::Instant::now() + poll;
                let now = Instant::now();
                queue.extend(claimed.into_iter().map(|email| (email, now)));
                continue;
            }
            tokio::select! {
                _ = shutdown.cancelled(), if !shutdown.is_cancelled() => {}
                Some(ended) = sending.join_next(), if !sending.is_empty() => {
                    if let Err(e) = ended {
                        tracing::error!(error = %e, "an email send task failed");
                    }
                }
                _ = worker.wake.notified() => idle = false,
                _ = tokio::time::sleep_until(poll_at), if idle => idle = false,
            }
        }
    }

    fn claim_timeout(&self) -> Duration {
        Duration::from_millis(self.config.claim_timeout_ms)
    }

    /// One claimed row: give it back (shutdown, tenant rate spent), or send it, renewing
    /// its claim first if it waited long for a slot.
    async fn handle(
        &self,
        email: OutboxEmail,
        claimed: Instant,
        rate: &std::sync::Mutex<rate::TenantRate>,
        shutdown: &CancellationToken,
    ) {
        let wait = if shutdown.is_cancelled() {
            // Give it back at once rather than let its claim time out.
            Some(Duration::ZERO)
        } else {
            let wait = rate
                .lock()
                .expect("rate lock poisoned")
                .take(&email.tenant_id, std::time::Instant::now());
            if wait.is_some() {
                self.metrics.emails_rate_limited.inc();
            }
            wait
        };
        if let Some(wait) = wait {
            if let Err(e) = outbox::release_email(&self.pool, &email, wait).await {
                tracing::warn!(outbox_id = email.id, error = %e.with_cause(), "releasing a claim failed");
            }
            return;
        }
        // A claim younger than a quarter of its timeout has three quarters left, more than
        // the send's bound (half the timeout) and the rendering: no one can take the row
        // over meanwhile, and the renewal would be a statement per email for nothing.
        let claim_timeout = self.claim_timeout();
        if claimed.elapsed() < claim_timeout / 4 {
            self.deliver(email).await;
            return;
        }
        match outbox::renew_email_claim(&self.pool, &email, claim_timeout).await {
            Ok(true) => self.deliver(email).await,
            Ok(false) => {
                tracing::info!(
                    outbox_id = email.id,
                    "claim taken over by another worker; not sending"
                )
            }
            Err(e) => {
                tracing::warn!(outbox_id = email.id, error = %e.with_cause(), "renewing a claim failed")
            }
        }
    }

    async fn deliver(&self, email: OutboxEmail) {
        let limit = self.config.send_timeout();
        let attempt = tokio::time::timeout(limit, self.attempt(&email))
            .await
            .unwrap_or_else(|_| {
                Attempt::Retry(relay::relay_error(format_args!(
                    "no answer within {} s",
                    limit.as_secs()
                )))
            });
        let age = (chrono::Utc::now() - email.queued_at)
            .to_std()
            .unwrap_or_default();
        let result = match &attempt {
            Attempt::Sent => {
                self.metrics.emails_sent.inc();
                tracing::info!(tenant = %email.tenant_id, event_id = %email.event_id, outbox_id = email.id, template = %email.template, attempts = email.attempts, "email sent");
                let marked = outbox::mark_email_sent(&self.pool, &email).await;
                self.relay.sent();
                self.relay_state(true);
                if self.relay.waiting() {
                    self.relay_back("an email was sent").await;
                }
                marked
            }
            Attempt::Retry(error) if age < Duration::from_secs(self.config.max_age_secs) => {
                self.metrics.emails_retried.inc();
                let delay = backoff(
                    self.config.backoff_base_ms,
                    self.config.backoff_max_ms,
                    email.attempts,
                    rand::rng().random_range(0.5..=1.0),
                );
                tracing::warn!(tenant = %email.tenant_id, event_id = %email.event_id, outbox_id = email.id, attempts = email.attempts, retry_in_ms = delay.as_millis() as u64, error = %error, "email failed transiently; will retry");
                let marked = outbox::mark_email_retry(&self.pool, &email, error, delay).await;
                // After the row is marked, so the pull that the next success makes sees it.
                if error.starts_with(relay::RELAY_UNAVAILABLE) {
                    self.relay.failed();
                    self.relay_state(false);
                }
                marked
            }
            Attempt::Retry(error) => {
                self.metrics.emails_failed.inc();
                let error = format!(
                    "gave up after {} attempts over {} s (email.max_age_secs): {error}",
                    email.attempts,
                    age.as_secs()
                );
                tracing::error!(tenant = %email.tenant_id, event_id = %email.event_id, outbox_id = email.id, error = %error, "email failed");
                outbox::mark_email_failed(&self.pool, &email, &error).await
            }
            Attempt::Failed(error) => {
                self.metrics.emails_failed.inc();
                tracing::error!(tenant = %email.tenant_id, event_id = %email.event_id, outbox_id = email.id, attempts = email.attempts, error = %error, "email failed");
                outbox::mark_email_failed(&self.pool, &email, error).await
            }
        };
        match result {
            Ok(true) => {}
            Ok(false) => tracing::warn!(
                outbox_id = email.id,
                "claim lost before the outcome was recorded; the row's new owner decides"
            ),
            // The claim expires and the row is tried again: at most one extra send.
            Err(e) => {
                tracing::warn!(outbox_id = email.id, error = %e.with_cause(), "recording the email outcome failed")
            }
        }
    }

    async fn attempt(&self, email: &OutboxEmail) -> Attempt {
        let policy = self.tenants.get(&email.tenant_id);
        if let Some(refusal) = policy.and_then(|t| recipient_refusal(&email.recipient, t)) {
            return Attempt::Failed(refusal);
        }
        let link_domains = policy.map_or(&[][..], |t| &t.link_domains[..]);
        let rendered = match self.render(email, link_domains).await {
            Ok(r) => r,
            Err(attempt) => return attempt,
        };
        let message = match self.message(email, rendered) {
            Ok(m) => m,
            Err(e) => return Attempt::Failed(e),
        };
        match self.transport.send(message).await {
            Ok(_) => Attempt::Sent,
            Err(e) if e.is_permanent() => Attempt::Failed(format!("smtp: {e}")),
            // Connection trouble, timeouts, TLS hiccups, 421: the relay's, and worth
            // another try as soon as it is back.
            Err(e) if relay::relay_unavailable(&e) => Attempt::Retry(relay::relay_error(e)),
            // Another 4xx: this message's, worth another try after its backoff.
            Err(e) => Attempt::Retry(format!("smtp: {e}")),
        }
    }

    /// Renders the email: through the tenant's templating plugin if it has one, else from
    /// its files. A plugin that is not there yet (missing, broken, quarantined) or ran out
    /// of time is a reason to try again later, like a relay outage; a plugin that judged
    /// the email (refused its data, trapped, answered something unsendable) fails it with
    /// the reason, which `email requeue` undoes once the plugin is fixed.
    async fn render(
        &self,
        email: &OutboxEmail,
        link_domains: &[String],
    ) -> Result<RenderedEmail, Attempt> {
        let templates = self.templates.load_full();
        let request = EmailToRender {
            tenant: &email.tenant_id,
            outbox_id: email.id,
            event_id: &email.event_id,
            event_type: email.event_type.as_deref().unwrap_or_default(),
            event_time: email
                .event_time
                .unwrap_or(email.queued_at)
                .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
            template: &email.template,
            recipient: &email.recipient,
            user_id: email.user_id.as_deref(),
            locale: email.locale.as_deref(),
            time_zone: email.time_zone.as_deref(),
            data: &email.data.0,
        };
        match self
            .plugins
            .render_email(&request, templates.clone(), link_domains)
            .await
        {
            None => templates
                .render(
                    &email.tenant_id,
                    &email.template,
                    &email.data.0,
                    link_domains,
                )
                .map_err(|e| Attempt::Failed(e.to_string())),
            Some(Ok(rendered)) => {
                self.metrics
                    .plugin_call(&email.tenant_id, "templating", "ok");
                // The plugin built its HTML as it liked: the link policy `{{link}}` applies
                // to files applies to it too, and a violation fails the email as there.
                match rendered
                    .html
                    .as_deref()
                    .and_then(|html| crate::templates::html_link_refusal(html, link_domains))
                {
                    Some(refusal) => Err(Attempt::Failed(format!(
                        "templating: the html part {refusal}; not sent"
                    ))),
                    None => Ok(rendered),
                }
            }
            Some(Err(e)) => {
                self.metrics
                    .plugin_call(&email.tenant_id, "templating", e.kind());
                let wait = e.disposition() != Disposition::Final
                    || matches!(e, PluginError::Timeout { .. });
                Err(if wait {
                    Attempt::Retry(format!("templating: {e}"))
                } else {
                    Attempt::Failed(format!("templating: {e}"))
                })
            }
        }
    }

    fn message(&self, email: &OutboxEmail, rendered: RenderedEmail) -> Result<Message, String> {
        let to: Mailbox = email
            .recipient
            .parse()
            .map_err(|e| format!("recipient {:?}: {e}", email.recipient))?;
        let builder = Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(rendered.subject)
            .message_id(Some(email.message_id.clone()));
        let text_part = |t: String| {
            SinglePart::builder()
                .header(header::ContentType::TEXT_PLAIN)
                .body(t)
        };
        let html_part = |h: String| {
            SinglePart::builder()
                .header(header::ContentType::TEXT_HTML)
                .body(h)
        };
        let built = match (rendered.text, rendered.html) {
            (Some(t), Some(h)) => builder.multipart(MultiPart::alternative_plain_html(t, h)),
            (Some(t), None) => builder.singlepart(text_part(t)),
            (None, Some(h)) => builder.singlepart(html_part(h)),
            (None, None) => return Err("template rendered neither text nor html".into()),
        };
        built.map_err(|e| format!("building the message: {e}"))
    }
}

/// Why `recipient` may not receive this tenant's email (`tenants.<id>.recipient_domains`),
/// or `None` if it may. Checked at every send, so a requeued row is checked again.
fn recipient_refusal(recipient: &str, tenant: &TenantConfig) -> Option<String> {
    if tenant.recipient_domains.is_empty() {
        return None;
    }
    let domain = recipient
        .rsplit_once('@')
        .map(|(_, d)| d.trim_end_matches('>').to_ascii_lowercase())
        .unwrap_or_default();
    let allowed = tenant
        .recipient_domains
        .iter()
        .any(|d| d.eq_ignore_ascii_case(&domain));
    (!allowed).then(|| {
        format!("recipient domain {domain:?} is not among the tenant's recipient_domains; not sent")
    })
}

/// The delay before retry number `attempts`: `base · 2^(attempts-1)`, capped at `max`, then
/// scaled by `jitter` (drawn from [0.5, 1.0]) so the retries of one outage do not all land
/// at the same moment.
fn backoff(base_ms: u64, max_ms: u64, attempts: i32, jitter: f64) -> Duration {
    let exp = attempts.saturating_sub(1).clamp(0, 30) as u32;
    let capped = base_ms.saturating_mul(1u64 << exp).min(max_ms);
    Duration::from_millis((capped as f64 * jitter) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recipients_are_checked_against_the_tenants_domains() {
        let open = TenantConfig::default();
        assert_eq!(recipient_refusal("anyone@anywhere.example", &open), None);
        let strict = TenantConfig {
            recipient_domains: vec!["acme.example".into()],
            ..TenantConfig::default()
        };
        assert_eq!(recipient_refusal("Bob@ACME.example", &strict), None);
        let refusal = recipient_refusal("victim@bank.example", &strict).unwrap();
        assert!(refusal.contains("bank.example"), "{refusal}");
        // A subdomain is another domain: listed explicitly or refused.
        assert!(recipient_refusal("x@mail.acme.example", &strict).is_some());
    }

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let ms = |attempts| backoff(1_000, 300_000, attempts, 1.0).as_millis();
        assert_eq!(ms(1), 1_000);
        assert_eq!(ms(2), 2_000);
        assert_eq!(ms(8), 128_000);
        assert_eq!(ms(9), 256_000);
        // Past the cap it stays there, however many attempts a long outage piles up.
        assert_eq!(ms(10), 300_000);
        assert_eq!(ms(500), 300_000);
        assert_eq!(backoff(1_000, 300_000, 10, 0.5).as_millis(), 150_000);
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// The retry delay never shrinks from one attempt to the next, never exceeds the
            /// cap, and never falls below the base (less its jitter), whatever the attempt
            /// count a row carries (even one no worker would write).
            #[test]
            fn the_retry_delay_grows_to_its_cap(
                base in 1u64..100_000,
                above in 0u64..10_000_000,
                attempts in any::<i32>(),
                jitter in 0.5f64..=1.0,
            ) {
                let max = base + above;
                let now = backoff(base, max, attempts, jitter);
                let next = backoff(base, max, attempts.saturating_add(1), jitter);
                prop_assert!(next >= now, "{next:?} after {now:?}");
                prop_assert!(now <= Duration::from_millis(max));
                prop_assert!(now.as_millis() as f64 >= (base as f64 * jitter).floor());
            }
        }
    }
}
