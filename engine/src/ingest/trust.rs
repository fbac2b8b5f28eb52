//! Who may speak for a tenant: the trust model of the input topics.
//!
//! An event's tenant decides whose plugin routes it, whose users it reaches and whose event
//! ids it claims. Where that tenant comes from is the operator's explicit choice
//! (`kafka.tenant_from`), each mode going with its Kafka ACLs (docs/security.md, "Who may
//! speak for a tenant"):
//!
//! - `payload`: the envelope's `tenant` field. Every producer allowed to write the topics
//!   can speak for every tenant: only for topics written by trusted services alone.
//! - `topic`: the topic names the tenant, through `kafka.tenant_topic_pattern` (a topic
//!   name with one `{tenant}` placeholder, e.g. `orders.{tenant}`). Each tenant's producer
//!   is granted Write on its own topics only.
//! - `header`: a Kafka header (`kafka.tenant_header`) set by a trusted gateway, the only
//!   principal with Write on the topics.
//!
//! In `topic` and `header` modes the envelope's own `tenant`, which the producer wrote,
//! must agree with the bound tenant; a message that claims another tenant is refused (and
//! claims no event id: a producer cannot make a victim's real event a "duplicate").
//! `kafka.allowed_tenants`, when not empty, admits those tenants only, in every mode.

use super::Incoming;
use super::envelope::{Rejection, RejectionKind};
use crate::config::{KafkaConfig, TenantFrom};
use crate::model::{Event, TENANT_PLACEHOLDER, valid_tenant};

/// The checks of one consumer, from configuration.
#[derive(Debug, Clone)]
pub struct TenantTrust {
    from: TenantFrom,
    /// `(prefix, suffix)` around `{tenant}` in the topic pattern.
    topic_pattern: (String, String),
    header: String,
    allowed: Vec<String>,
}

impl TenantTrust {
    pub fn new(config: &KafkaConfig) -> Self {
        let topic_pattern = config
            .tenant_topic_pattern
            .split_once(TENANT_PLACEHOLDER)
            .map(|(p, s)| (p.to_owned(), s.to_owned()))
            .unwrap_or_default();
        Self {
            from: config.tenant_from,
            topic_pattern,
            header: config.tenant_header.clone(),
            allowed: config.allowed_tenants.clone(),
        }
    }

    /// Checks a decoded event against where it came from. A refusal is a validation
    /// rejection naming the reason (dead-lettered with the message).
    pub fn check(&self, message: &Incoming, event: Event) -> Result<Event, Rejection> {
        let refuse = |reason: String| Rejection {
            kind: RejectionKind::Validation,
            reason,
            // Not the claimed tenant: that is exactly what is in doubt.
            tenant: None,
            event_id: Some(event.id.clone()),
        };
        let bound = match self.from {
            TenantFrom::Payload => None,
            TenantFrom::Topic => Some(self.tenant_of_topic(&message.topic).ok_or_else(|| {
                refuse(format!(
                    "topic {:?} does not match kafka.tenant_topic_pattern {:?}",
                    message.topic,
                    format!("{}{TENANT_PLACEHOLDER}{}", self.topic_pattern.0, self.topic_pattern.1)
                ))
            })?),
            TenantFrom::Header => Some(self.tenant_of_header(message).ok_or_else(|| {
                refuse(format!(
                    "the {:?} header naming the tenant is missing, repeated or not a tenant id (kafka.tenant_from = \"header\")",
                    self.header
                ))
            })?),
        };
        if let Some(bound) = bound
            && bound != event.tenant
        {
            return Err(refuse(format!(
                "the envelope names tenant {:?}, but this message may only speak for {bound:?} (kafka.tenant_from = {:?})",
                event.tenant,
                self.from.as_str()
            )));
        }
        if !self.allowed.is_empty() && !self.allowed.contains(&event.tenant) {
            return Err(refuse(format!(
                "tenant {:?} is not in kafka.allowed_tenants",
                event.tenant
            )));
        }
        Ok(event)
    }

    fn tenant_of_topic<'t>(&self, topic: &'t str) -> Option<&'t str> {
        let (prefix, suffix) = &self.topic_pattern;
        let tenant = topic
            .strip_prefix(prefix.as_str())?
            .strip_suffix(suffix.as_str())?;
        valid_tenant(tenant).then_some(tenant)
    }

    /// The tenant header's value, if there is exactly one: headers are a list, and a
    /// gateway that appends its header to a client's own must not let the client's win.
    fn tenant_of_header<'m>(&self, message: &'m Incoming) -> Option<&'m str> {
        let mut found = message
            .headers
            .iter()
            .filter(|(name, _)| name.eq_ignore_ascii_case(&self.header));
        let (_, value) = found.next()?;
        if found.next().is_some() {
            return None;
        }
        let tenant = std::str::from_utf8(value.as_deref()?).ok()?;
        valid_tenant(tenant).then_some(tenant)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(topic: &str, headers: &[(&str, &str)]) -> Incoming {
        Incoming {
            received: std::time::Instant::now(),
            kafka_delay: None,
            timestamp: None,
            topic: topic.into(),
            partition: 0,
            offset: 0,
            key: None,
            payload: None,
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), Some(v.as_bytes().to_vec())))
                .collect(),
        }
    }

    fn event(tenant: &str) -> Event {
        super::super::envelope::decode(
            Some(
                format!(r#"{{"id":"e1","tenant":"{tenant}","type":"t","time":"2026-11-26T10:00:00Z","data":{{}}}}"#)
                    .as_bytes(),
            ),
            &[],
            1 << 20,
        )
        .unwrap()
    }

    fn trust(from: TenantFrom, allowed: &[&str]) -> TenantTrust {
        TenantTrust::new(&KafkaConfig {
            tenant_from: from,
            tenant_topic_pattern: "orders.{tenant}.v1".into(),
            tenant_header: "x-tenant".into(),
            allowed_tenants: allowed.iter().map(|s| s.to_string()).collect(),
            ..KafkaConfig::default()
        })
    }

    #[test]
    fn payload_mode_trusts_the_envelope_within_the_allow_list() {
        let t = trust(TenantFrom::Payload, &[]);
        assert!(t.check(&message("orders", &[]), event("acme")).is_ok());
        let t = trust(TenantFrom::Payload, &["acme"]);
        assert!(t.check(&message("orders", &[]), event("acme")).is_ok());
        let r = t.check(&message("orders", &[]), event("evil")).unwrap_err();
        assert!(r.reason.contains("allowed_tenants"), "{r}");
        assert_eq!(r.event_id.as_deref(), Some("e1"));
        assert_eq!(r.tenant, None);
    }

    #[test]
    fn topic_mode_binds_the_tenant_to_the_topic() {
        let t = trust(TenantFrom::Topic, &[]);
        assert!(
            t.check(&message("orders.acme.v1", &[]), event("acme"))
                .is_ok()
        );
        let r = t
            .check(&message("orders.evil.v1", &[]), event("acme"))
            .unwrap_err();
        assert!(r.reason.contains("may only speak for \"evil\""), "{r}");
        let r = t.check(&message("orders", &[]), event("acme")).unwrap_err();
        assert!(r.reason.contains("does not match"), "{r}");
        let r = t
            .check(&message("orders.a/b.v1", &[]), event("acme"))
            .unwrap_err();
        assert!(r.reason.contains("does not match"), "{r}");
    }

    #[test]
    fn header_mode_binds_the_tenant_to_the_gateway_header() {
        let t = trust(TenantFrom::Header, &[]);
        assert!(
            t.check(&message("orders", &[("X-Tenant", "acme")]), event("acme"))
                .is_ok()
        );
        let r = t
            .check(&message("orders", &[("x-tenant", "evil")]), event("acme"))
            .unwrap_err();
        assert!(r.reason.contains("may only speak for"), "{r}");
        let r = t.check(&message("orders", &[]), event("acme")).unwrap_err();
        assert!(r.reason.contains("header"), "{r}");
        // A client's own header before the gateway's: refused, not first-wins.
        let r = t
            .check(
                &message("orders", &[("x-tenant", "acme"), ("x-tenant", "evil")]),
                event("acme"),
            )
            .unwrap_err();
        assert!(r.reason.contains("header"), "{r}");
    }
}
