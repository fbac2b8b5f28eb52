//! A client of Mailpit's HTTP API: the emails the engine sent, by recipient.

use std::time::Duration;

use serde_json::Value;

use super::services::Services;

/// Mailpit's HTTP API.
pub struct Mailpit {
    base: String,
    http: reqwest::Client,
}

#[derive(Debug, Clone)]
pub struct Mail {
    pub id: String,
    pub subject: String,
    pub to: Vec<String>,
    pub text: String,
    pub html: String,
    pub message_id: String,
}

impl Mailpit {
    pub fn new(services: &Services) -> Self {
        Self {
            base: services.mailpit.trim_end_matches('/').to_owned(),
            http: reqwest::Client::new(),
        }
    }

    /// Every message addressed to `to`.
    pub async fn messages_to(&self, to: &str) -> Vec<Mail> {
        let search: Value = self
            .http
            .get(format!("{}/api/v1/search", self.base))
            .query(&[("query", format!("to:\"{to}\"")), ("limit", "200".into())])
            .send()
            .await
            .expect("Mailpit search")
            .json()
            .await
            .expect("Mailpit search JSON");
        let mut out = Vec::new();
        for summary in search["messages"].as_array().cloned().unwrap_or_default() {
            let id = summary["ID"].as_str().unwrap().to_owned();
            let full: Value = self
                .http
                .get(format!("{}/api/v1/message/{id}", self.base))
                .send()
                .await
                .expect("Mailpit message")
                .json()
                .await
                .expect("Mailpit message JSON");
            out.push(Mail {
                id,
                subject: full["Subject"].as_str().unwrap_or_default().to_owned(),
                to: full["To"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|a| a["Address"].as_str().map(str::to_owned))
                    .collect(),
                text: full["Text"].as_str().unwrap_or_default().to_owned(),
                html: full["HTML"].as_str().unwrap_or_default().to_owned(),
                message_id: full["MessageID"].as_str().unwrap_or_default().to_owned(),
            });
        }
        out
    }

    /// Waits until exactly `count` messages to `to` exist, then returns them.
    pub async fn wait_for(&self, to: &str, count: usize, timeout: Duration) -> Vec<Mail> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let mails = self.messages_to(to).await;
            if mails.len() >= count {
                assert_eq!(
                    mails.len(),
                    count,
                    "more emails to {to} than expected: {mails:#?}"
                );
                return mails;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} emails to {to} after {timeout:?}, expected {count}",
                mails.len()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}
