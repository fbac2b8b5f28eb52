//! `[http]`, `[sse]` and `[limits]`: the listeners, their connection limits, the stream's
//! pacing and caps, and the public API's request rates and share of the database, each with
//! the rules it must satisfy on its own.

use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

use super::{ConfigError, invalid};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Address of the public API (SSE).
    pub listen: SocketAddr,
    /// Address of the operator endpoints (`/healthz`, `/readyz`, `/status`, `/metrics`): a
    /// listener of their own, so probes keep answering while the public side is flooded.
    pub admin_listen: SocketAddr,
    /// A connection that has not sent its request headers within this time is closed
    /// (slowloris).
    pub header_timeout_ms: u64,
    /// A client that falls behind what is written to it (a write finds its socket full) and
    /// has not caught up (a write taken whole at once) within this time is disconnected:
    /// one that stopped reading its stream, or reads a trickle of it, catches up by replay.
    pub write_timeout_ms: u64,
    /// Open connections on the public listener; more wait to be accepted.
    pub max_connections: usize,
    /// Open connections from one client address (IPv6: one /64); more are closed at once.
    pub max_connections_per_ip: usize,
    /// Reverse proxies (addresses or CIDR blocks: `10.0.0.0/8`, `2001:db8::/32`) whose word
    /// on the client's address is taken: a PROXY protocol header (v1 or v2) at the start of
    /// the connection, else the rightmost address of `X-Forwarded-For` that is not itself a
    /// trusted proxy. Empty: trust nobody, and every address is the connection's peer.
    pub trusted_proxies: Vec<String>,
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
            trusted_proxies: Vec::new(),
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
    /// The most of the stream slots the other tenants leave free that one tenant may hold
    /// (0 < share ≤ 1): with 0.5, one tenant alone holds half of `max_connections`, a second
    /// half of the rest, and a newcomer always finds room until the instance is all but
    /// full. 1: a tenant may fill the instance.
    pub tenant_share: f64,
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
            tenant_share: 0.5,
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
        for proxy in &self.trusted_proxies {
            if let Err(e) = Cidr::parse(proxy) {
                return invalid(format!("http.trusted_proxies: {proxy:?}: {e}"));
            }
        }
        Ok(())
    }

    /// `trusted_proxies`, parsed (validated at load: a bad entry never gets here).
    pub fn trusted_proxies(&self) -> Vec<Cidr> {
        self.trusted_proxies
            .iter()
            .filter_map(|p| Cidr::parse(p).ok())
            .collect()
    }
}

/// An address block: `10.0.0.0/8`, `2001:db8::/32`, or one address (`10.0.0.1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Result<Self, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (s, None),
        };
        let net: IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| "not an IP address or CIDR block".to_owned())?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("the prefix length must be 0..={max}"))?,
        };
        Ok(Self { net, prefix })
    }

    /// Is `ip` inside the block? An IPv4-mapped IPv6 address counts as its IPv4 address.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.net, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
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
        if !(self.tenant_share > 0.0 && self.tenant_share <= 1.0) {
            return invalid("sse.tenant_share must be more than 0 and at most 1");
        }
        if self.keepalive_secs == 0 || self.keepalive_secs > 15 {
            return invalid("sse.keepalive_secs must be between 1 and 15");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::Cidr;

    #[test]
    fn cidr_blocks_hold_their_addresses() {
        let block = Cidr::parse("10.1.0.0/16").unwrap();
        assert!(block.contains("10.1.200.3".parse().unwrap()));
        assert!(block.contains("::ffff:10.1.0.9".parse().unwrap()));
        assert!(!block.contains("10.2.0.1".parse().unwrap()));
        assert!(!block.contains("::1".parse().unwrap()));
        let one = Cidr::parse("127.0.0.2").unwrap();
        assert!(one.contains("127.0.0.2".parse().unwrap()));
        assert!(!one.contains("127.0.0.1".parse().unwrap()));
        let v6 = Cidr::parse("2001:db8::/32").unwrap();
        assert!(v6.contains("2001:db8:ffff::1".parse().unwrap()));
        assert!(!v6.contains("2001:db9::1".parse().unwrap()));
        assert!(
            Cidr::parse("0.0.0.0/0")
                .unwrap()
                .contains("8.8.8.8".parse().unwrap())
        );
        for bad in [
            "",
            "10.0.0.0/",
            "10.0.0.0/33",
            "::/129",
            "example.com",
            "10.0.0.0/x",
        ] {
            assert!(Cidr::parse(bad).is_err(), "{bad}");
        }
    }
}
