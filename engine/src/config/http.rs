//! `[http]`, `[sse]` and `[limits]`: the listeners, their connection limits, the stream's
//! pacing and caps, and the public API's request rates and share of the database, each with
//! the rules it must satisfy on its own.

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

/// `[limits]`: how much of the public API one user, one tenant or one address may use.
///
/// Every request to the public API (the inbox, stream tickets, stream openings, and so
/// every shallow replay) takes a token from its user's bucket and its tenant's; requests
/// without valid credentials (a `?ticket=` being redeemed, a bad token) take one from their
/// address's bucket instead, before any database work. A bucket refills at `*_per_second`
/// and holds at most `*_burst`; an empty one answers `429` with `Retry-After`. The limits
/// are per instance.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Requests one (tenant, user) may make per second, sustained.
    pub user_per_second: u32,
    /// Requests one (tenant, user) may make at once after a quiet spell.
    pub user_burst: u32,
    /// Requests all users of one tenant may make per second, sustained.
    pub tenant_per_second: u32,
    pub tenant_burst: u32,
    /// Requests without valid credentials (stream tickets being redeemed, bad tokens) per
    /// client address (IPv6 by /64) and second.
    pub address_per_second: u32,
    pub address_burst: u32,
    /// Percent of `database.api_max_connections` one tenant's requests may hold at once
    /// (rounded up, at least one): one tenant can never take every connection of the API.
    /// Requests without credentials share one such slice.
    pub tenant_pool_percent: u32,
    /// How long a request waits for a slot of its tenant's share before it answers `429`.
    pub tenant_pool_wait_ms: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            user_per_second: 10,
            user_burst: 50,
            tenant_per_second: 500,
            tenant_burst: 1_000,
            address_per_second: 20,
            address_burst: 100,
            tenant_pool_percent: 50,
            tenant_pool_wait_ms: 2_000,
        }
    }
}

impl LimitsConfig {
    /// Rates and bursts of at least 1 (0 would refuse everything), a share between 1 and
    /// 100 percent.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if [
            self.user_per_second,
            self.user_burst,
            self.tenant_per_second,
            self.tenant_burst,
            self.address_per_second,
            self.address_burst,
        ]
        .contains(&0)
        {
            return invalid(
                "limits.user_per_second, user_burst, tenant_per_second, tenant_burst, address_per_second and address_burst must be at least 1",
            );
        }
        if !(1..=100).contains(&self.tenant_pool_percent) {
            return invalid("limits.tenant_pool_percent must be between 1 and 100");
        }
        Ok(())
    }

    /// Connections of an API pool of `pool` one tenant may hold at once.
    pub fn tenant_pool_share(&self, pool: u32) -> usize {
        (pool as usize * self.tenant_pool_percent as usize)
            .div_ceil(100)
            .max(1)
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
