//! The email worker: drains the outbox, renders, sends over SMTP, records the result.
//!
//! It never talks to Kafka, and the pipeline never talks SMTP: an SMTP outage only makes
//! the outbox grow, it never stalls a partition. Rows are claimed with
//! `FOR UPDATE SKIP LOCKED`, so any number of instances share the work.
//!
//! Outcomes: `250` → sent. A transient failure (4xx, connection refused, timeout) → retried
//! with exponential backoff and jitter, up to `email.max_attempts`. A permanent failure (5xx,
//! unrenderable template, bad address) → failed at once. Every attempt records its error.

pub mod render;

use std::sync::Arc;
use std::time::Duration;

use lettre::message::{Mailbox, MultiPart, SinglePart, header};
use lettre::transport::smtp::authentication::Credentials;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use rand::Rng;
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::{EmailConfig, SmtpConfig, SmtpTls};
use crate::store::{self, OutboxEmail};
use crate::telemetry::Metrics;
use render::{RenderedEmail, Templates};

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
    pub metrics: Metrics,
    pub wake: Arc<Notify>,
}

/// Builds the SMTP transport from configuration (no connection is made yet).
pub fn transport(smtp: &SmtpConfig) -> Result<AsyncSmtpTransport<Tokio1Executor>, DeliveryError> {
    let builder = match smtp.tls {
        SmtpTls::None => AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&smtp.host),
        SmtpTls::Starttls => AsyncSmtpTransport::<Tokio1Executor>::starttls_relay(&smtp.host)?,
        SmtpTls::Tls => AsyncSmtpTransport::<Tokio1Executor>::relay(&smtp.host)?,
    };
    let mut builder = builder
        .port(smtp.port)
        .timeout(Some(Duration::from_millis(smtp.timeout_ms)));
    if let Some(user) = &smtp.username {
        builder = builder.credentials(Credentials::new(
            user.clone(),
            smtp.password.clone().unwrap_or_default(),
        ));
    }
    Ok(builder.build())
}

impl EmailWorker {
    pub async fn run(self, shutdown: CancellationToken) {
        let poll = Duration::from_millis(self.config.poll_interval_ms);
        let claim_timeout = Duration::from_millis(self.config.claim_timeout_ms);
        while !shutdown.is_cancelled() {
            let claimed = match store::claim_emails(
                &self.pool,
                self.config.batch,
                claim_timeout,
                self.config.max_attempts,
            )
            .await
            {
                Ok(rows) => rows,
                Err(e) => {
                    tracing::warn!(error = %e, "claiming outbox rows failed");
                    Vec::new()
                }
            };
            let full = claimed.len() as i64 >= self.config.batch;
            for email in claimed {
                if shutdown.is_cancelled() {
                    // Give the rest back at once rather than let their claims time out.
                    if let Err(e) = store::release_email(&self.pool, &email).await {
                        tracing::warn!(outbox_id = email.id, error = %e, "releasing a claim failed");
                    }
                    continue;
                }
                match store::renew_email_claim(&self.pool, &email, claim_timeout).await {
                    Ok(true) => self.deliver(email).await,
                    Ok(false) => {
                        tracing::info!(
                            outbox_id = email.id,
                            "claim taken over by another worker; not sending"
                        )
                    }
                    Err(e) => {
                        tracing::warn!(outbox_id = email.id, error = %e, "renewing a claim failed")
                    }
                }
            }
            if full {
                continue;
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(poll) => {}
            }
        }
        tracing::info!("email worker stopped");
    }

    async fn deliver(&self, email: OutboxEmail) {
        let attempt = self.attempt(&email).await;
        let result = match &attempt {
            Attempt::Sent => {
                self.metrics.emails_sent.inc();
                tracing::info!(tenant = %email.tenant_id, event_id = %email.event_id, outbox_id = email.id, template = %email.template, "email sent");
                store::mark_email_sent(&self.pool, &email).await
            }
            Attempt::Retry(error) if email.attempts < self.config.max_attempts => {
                self.metrics.emails_retried.inc();
                let delay = self.backoff(email.attempts);
                tracing::warn!(tenant = %email.tenant_id, event_id = %email.event_id, outbox_id = email.id, attempts = email.attempts, retry_in_ms = delay.as_millis() as u64, error = %error, "email failed transiently; will retry");
                store::mark_email_retry(&self.pool, &email, error, delay).await
            }
            Attempt::Retry(error) | Attempt::Failed(error) => {
                self.metrics.emails_failed.inc();
                tracing::error!(tenant = %email.tenant_id, event_id = %email.event_id, outbox_id = email.id, attempts = email.attempts, error = %error, "email failed");
                store::mark_email_failed(&self.pool, &email, error).await
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
                tracing::warn!(outbox_id = email.id, error = %e, "recording the email outcome failed")
            }
        }
    }

    async fn attempt(&self, email: &OutboxEmail) -> Attempt {
        let rendered = {
            let templates = self.templates.load();
            templates.render(&email.tenant_id, &email.template, &email.data.0)
        };
        let rendered = match rendered {
            Ok(r) => r,
            Err(e) => return Attempt::Failed(e.to_string()),
        };
        let message = match self.message(email, rendered) {
            Ok(m) => m,
            Err(e) => return Attempt::Failed(e),
        };
        match self.transport.send(message).await {
            Ok(_) => Attempt::Sent,
            Err(e) if e.is_permanent() => Attempt::Failed(format!("smtp: {e}")),
            // 4xx, connection trouble, timeouts, TLS hiccups: all worth another try.
            Err(e) => Attempt::Retry(format!("smtp: {e}")),
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

    /// `base · 2^(attempt-1)`, capped, then scaled by a random factor in [0.5, 1.0] so
    /// retries of one outage do not all land at the same moment.
    fn backoff(&self, attempts: i32) -> Duration {
        let exp = attempts.saturating_sub(1).clamp(0, 30) as u32;
        let base = self
            .config
            .backoff_base_ms
            .saturating_mul(1u64 << exp)
            .min(self.config.backoff_max_ms);
        let factor: f64 = rand::rng().random_range(0.5..=1.0);
        Duration::from_millis((base as f64 * factor) as u64)
    }
}
