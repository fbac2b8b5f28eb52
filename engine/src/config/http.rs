//! `[http]` and `[sse]`: the listeners, their connection limits, and the stream's pacing and
//! caps, each with the rules it must satisfy on its own.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::{ConfigError, invalid};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Address of the public API (SSE).
    pub listen: SocketAddr,
    /// Address of the operator endpoints (`/healthz`, `/readyz`, `/metrics`): a listener of
    /// their own, so probes keep answering while the public side is flooded.
    pub admin_listen: SocketAddr,
    /// A connection that has not sent its request headers within this time is closed
    /// (slowloris).
    pub header_timeout_ms: u64,
    /// A response write that makes no progress for this long closes the connection: a
    /// client that stopped reading its stream is dropped (it catches up by replay).
    pub write_timeout_ms: u64,
    /// Open connections on the public listener; more wait to be accepted.
    pub max_connections: usize,
    /// Open connections from one IP address; more are closed at once.
    pub max_connections_per_ip: usize,
    /// Origins (`https://app.example.com`) whose pages may call the public API from a
    /// browser, cookies included. Empty: no cross-origin access.
    pub cors_origins: Vec<String>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".parse().expect("valid default address"),
            admin_listen: "127.0.0.1:9090".parse().expect("valid default address"),
            header_timeout_ms: 10_000,
            write_timeout_ms: 30_000,
            max_connections: 20_000,
            max_connections_per_ip: 256,
            cors_origins: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SseConfig {
    /// Interval of keep-alive comments (proxies drop idle connections).
    pub keepalive_secs: u64,
    /// `retry:` hint sent to browsers, in milliseconds.
    pub retry_ms: u64,
    /// Rows read from PostgreSQL per replay page.
    pub page_size: i64,
    /// Bytes (titles, bodies, data) per page, past its first row: what one stream may hold.
    pub page_bytes: i64,
    /// Deep replays (`Last-Event-ID: 0`, or more than a page behind) one user may start per
    /// minute; more answer 429. Each reads the user's history from PostgreSQL.
    pub deep_replays_per_minute: u32,
    /// Stream tickets one user may get per minute; more answer 429.
    pub tickets_per_minute: u32,
    /// Open streams allowed per (tenant, user); more answer 429.
    pub max_connections_per_user: usize,
    /// Open streams allowed per tenant on this instance; more answer 429.
    pub max_connections_per_tenant: usize,
    /// Open streams allowed in total on this instance; more answer 429.
    pub max_connections: usize,
}

impl Default for SseConfig {
    fn default() -> Self {
        Self {
            keepalive_secs: 15,
            retry_ms: 3_000,
            page_size: 200,
            page_bytes: 256 * 1024,
            deep_replays_per_minute: 6,
            tickets_per_minute: 60,
            max_connections_per_user: 8,
            max_connections_per_tenant: 5_000,
            max_connections: 10_000,
        }
    }
}

impl HttpConfig {
    /// The listener rules that need no other section: origins that are origins, two
    /// distinct addresses (port 0 lets the OS pick two distinct ones).
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        for origin in &self.cors_origins {
            let ok = url::Url::parse(origin).is_ok_and(|u| {
                matches!(u.scheme(), "http" | "https")
                    && u.path() == "/"
                    && !origin.ends_with('/')
                    && u.query().is_none()
            });
            if !ok || origin == "*" {
                return invalid(format!(
                    "http.cors_origins: {origin:?} must be an origin like \"https://app.example.com\" (no path, no wildcard)"
                ));
            }
        }
        if self.listen == self.admin_listen && self.listen.port() != 0 {
            return invalid("http.listen and http.admin_listen must differ");
        }
        Ok(())
    }
}

impl SseConfig {
    /// Every cap at least 1 (0 would refuse every stream), and a keep-alive short enough
    /// for the proxies that drop idle connections.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.page_size < 1
            || self.page_bytes < 1
            || self.deep_replays_per_minute < 1
            || self.tickets_per_minute < 1
            || self.max_connections_per_user < 1
            || self.max_connections_per_tenant < 1
            || self.max_connections < 1
        {
            return invalid(
                "sse.page_size, sse.page_bytes, sse.deep_replays_per_minute, sse.tickets_per_minute, sse.max_connections_per_user, sse.max_connections_per_tenant and sse.max_connections must be at least 1",
            );
        }
        if self.keepalive_secs == 0 || self.keepalive_secs > 15 {
            return invalid("sse.keepalive_secs must be between 1 and 15");
        }
        Ok(())
    }
}
