//! The public API's request limits (`[limits]`): token buckets per user, per tenant and per
//! client address, and each tenant's share of the API's database pool.
//!
//! [`admit`] is a layer on every public route, so it runs before any handler and so before
//! any database work: an unauthenticated `?ticket=` guess is refused by its address's bucket
//! before it can reach the ticket's `DELETE`, and a flood from one token is refused by its
//! user's bucket before it can queue for a connection. Stream openings count like any
//! request, so a client reconnecting in a loop with `Last-Event-ID` (a shallow replay each
//! time) is held to the same rate; a stream opened with a ticket is charged to the ticket's
//! user once it is redeemed ([`Limits::admit_identity`]).
//!
//! Buckets alone do not make the pool fair: many users of one tenant, each within their
//! rate, can still hold every connection (the pool has 8; a tenant's requests waiting on a
//! lock hold them all, and every other tenant gets `503`). So each tenant's requests, and
//! each of its streams' reads, also take a slot of the tenant's share of the pool
//! (`limits.tenant_pool_percent`, half by default): the rest is always there for the
//! others. Requests without credentials share one slice of their own.
//!
//! Refusals are `429` (`too_many_requests`) with `Retry-After`, counted by
//! `notify_api_rate_limited_total{limit}`.

mod buckets;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus::IntCounterVec;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::AppState;
use super::auth::Identity;
use super::error::ApiError;
use super::serve::client;
use super::tickets::TICKET_PARAM;
use crate::config::LimitsConfig;
use buckets::{Buckets, Rate};

/// The address a request came from, put in its extensions by the listener (`serve`).
/// Without it (a router driven in-process) every request counts as one unknown address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub IpAddr);

/// The limits of one instance's public API.
pub struct Limits {
    config: LimitsConfig,
    users: Buckets<(String, String)>,
    tenants: Buckets<String>,
    addresses: Buckets<Option<IpAddr>>,
    /// Per tenant (`None`: requests without credentials), the semaphore of its share.
    shares: Mutex<HashMap<Option<String>, Arc<Semaphore>>>,
    share: usize,
    refused: IntCounterVec,
}

/// Tenants' shares kept before idle ones are swept.
const SWEEP_SHARES_AT: usize = 10_000;

impl Limits {
    /// The limits of `config` for an API pool of `pool_size` connections; refusals are
    /// counted in `refused` (`notify_api_rate_limited_total`).
    pub fn new(config: &LimitsConfig, pool_size: u32, refused: IntCounterVec) -> Self {
        let rate = |per_second, burst| Rate { per_second, burst };
        Self {
            users: Buckets::new(rate(config.user_per_second, config.user_burst)),
            tenants: Buckets::new(rate(config.tenant_per_second, config.tenant_burst)),
            addresses: Buckets::new(rate(config.address_per_second, config.address_burst)),
            shares: Mutex::new(HashMap::new()),
            share: config.tenant_pool_share(pool_size),
            config: config.clone(),
            refused,
        }
    }

    /// Takes a token of the user's bucket and of the tenant's.
    pub fn admit_identity(&self, identity: &Identity) -> Result<(), ApiError> {
        let now = Instant::now();
        let user = (identity.tenant.clone(), identity.user_id.clone());
        self.users
            .take(&user, now)
            .map_err(|wait| self.refuse("user", "from this user", wait))?;
        self.tenants.take(&identity.tenant, now).map_err(|wait| {
            // Not spent: the request was not made.
            self.users.give_back(&user);
            self.refuse("tenant", "from this tenant", wait)
        })
    }

    /// Takes a token of the address's bucket (a request without valid credentials).
    fn admit_address(&self, addr: Option<ClientAddr>) -> Result<(), ApiError> {
        let key = addr.map(|a| client::key(a.0));
        self.addresses.take(&key, Instant::now()).map_err(|wait| {
            self.refuse(
                "address",
                "without valid credentials from this address",
                wait,
            )
        })
    }

    /// The semaphore of `tenant`'s share of the pool (`None`: requests without
    /// credentials). A stream keeps it and takes a slot for each read.
    pub fn share_of(&self, tenant: Option<&str>) -> Arc<Semaphore> {
        let mut shares = self.shares.lock().expect("shares lock poisoned");
        let key = tenant.map(str::to_owned);
        if shares.len() >= SWEEP_SHARES_AT && !shares.contains_key(&key) {
            // Nobody holds or waits on a share whose only reference is the map's.
            shares.retain(|_, s| Arc::strong_count(s) > 1);
        }
        shares
            .entry(key)
            .or_insert_with(|| Arc::new(Semaphore::new(self.share)))
            .clone()
    }

    /// A slot of `tenant`'s share, waiting at most `limits.tenant_pool_wait_ms`.
    async fn slot(&self, tenant: Option<&str>) -> Result<OwnedSemaphorePermit, ApiError> {
        let share = self.share_of(tenant);
        let wait = Duration::from_millis(self.config.tenant_pool_wait_ms);
        match tokio::time::timeout(wait, share.acquire_owned()).await {
            Ok(permit) => Ok(permit.expect("a share's semaphore is never closed")),
            Err(_) => {
                self.refused.with_label_values(&["tenant_pool"]).inc();
                Err(ApiError::RateLimited {
                    message: format!(
                        "this tenant's share of the API's database connections (limits.tenant_pool_percent = {}) stayed busy; retry in a moment",
                        self.config.tenant_pool_percent
                    ),
                    retry_after_secs: 1,
                })
            }
        }
    }

    fn refuse(&self, limit: &str, whose: &str, wait: Duration) -> ApiError {
        self.refused.with_label_values(&[limit]).inc();
        ApiError::RateLimited {
            message: format!(
                "too many requests {whose} (limits.{limit}_per_second, limits.{limit}_burst); retry later"
            ),
            retry_after_secs: wait.as_secs_f64().ceil().max(1.0) as u64,
        }
    }
}

/// The layer of every public route: the caller's buckets, then a slot of its tenant's
/// share of the pool, held while the handler runs. A verified identity is handed to the
/// handler's [`Identity`] extractor, so the token is checked once.
pub async fn admit(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let (mut parts, body) = request.into_parts();
    let identity = identify(&state, &parts);
    let admitted = match &identity {
        Some(identity) => state.limits.admit_identity(identity),
        None => state
            .limits
            .admit_address(parts.extensions.get::<ClientAddr>().copied()),
    };
    if let Err(refused) = admitted {
        return refused.into_response();
    }
    let tenant = identity.as_ref().map(|i| i.tenant.clone());
    let slot = match state.limits.slot(tenant.as_deref()).await {
        Ok(slot) => slot,
        Err(refused) => return refused.into_response(),
    };
    if let Some(identity) = identity {
        parts.extensions.insert(identity);
    }
    let response = next.run(Request::from_parts(parts, body)).await;
    drop(slot);
    response
}

/// Who a request speaks for, as its handler will see it: `None` for a stream ticket (its
/// user is known only once it is redeemed, which is database work) and for anything
/// without valid credentials.
fn identify(state: &AppState, parts: &Parts) -> Option<Identity> {
    let ticket = parts.uri.path() == SSE_PATH
        && parts.uri.query().is_some_and(|q| {
            url::form_urlencoded::parse(q.as_bytes()).any(|(k, _)| k == TICKET_PARAM)
        });
    if ticket {
        return None;
    }
    state.auth.authenticate_request(parts).ok()
}

const SSE_PATH: &str = "/api/v1/sse";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_clients_count_by_their_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(client::key(a), client::key(b));
        assert_ne!(client::key(a), client::key(c));
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(client::key(mapped), "192.0.2.7".parse::<IpAddr>().unwrap());
    }

    fn limits(user_burst: u32, tenant_burst: u32) -> Limits {
        let config = LimitsConfig {
            user_per_second: 1,
            user_burst,
            tenant_per_second: 1,
            tenant_burst,
            ..LimitsConfig::default()
        };
        let refused = IntCounterVec::new(prometheus::Opts::new("x", "x"), &["limit"]).unwrap();
        Limits::new(&config, 8, refused)
    }

    fn identity(tenant: &str, user: &str) -> Identity {
        Identity {
            tenant: tenant.into(),
            user_id: user.into(),
            roles: Vec::new(),
            expires_at: 0,
            issued_at: 0,
            key: "k".into(),
        }
    }

    #[test]
    fn a_user_and_their_tenant_each_have_a_bucket() {
        let l = limits(2, 3);
        assert!(l.admit_identity(&identity("t", "u")).is_ok());
        assert!(l.admit_identity(&identity("t", "u")).is_ok());
        // The user's bucket is empty; the tenant has one token left for another user.
        let refused = l.admit_identity(&identity("t", "u")).unwrap_err();
        assert!(refused.to_string().contains("this user"), "{refused}");
        assert!(l.admit_identity(&identity("t", "v")).is_ok());
        let refused = l.admit_identity(&identity("t", "w")).unwrap_err();
        assert!(refused.to_string().contains("this tenant"), "{refused}");
        // w's token was given back when the tenant refused: w still has a full bucket.
        assert!(
            l.users
                .take(&("t".into(), "w".into()), Instant::now())
                .is_ok()
        );
        assert!(
            l.users
                .take(&("t".into(), "w".into()), Instant::now())
                .is_ok()
        );
        // Another tenant is not affected.
        assert!(l.admit_identity(&identity("t2", "u")).is_ok());
        assert_eq!(l.refused.with_label_values(&["user"]).get(), 1);
        assert_eq!(l.refused.with_label_values(&["tenant"]).get(), 1);
    }

    #[tokio::test]
    async fn a_tenant_holds_at_most_its_share_and_others_are_not_kept_waiting() {
        let mut l = limits(10, 10);
        l.config.tenant_pool_wait_ms = 20;
        l.share = LimitsConfig::default().tenant_pool_share(8);
        assert_eq!(l.share, 4);
        let mut held = Vec::new();
        for _ in 0..4 {
            held.push(l.slot(Some("flood")).await.unwrap());
        }
        let refused = l.slot(Some("flood")).await.unwrap_err();
        assert!(matches!(
            refused,
            ApiError::RateLimited {
                retry_after_secs: 1,
                ..
            }
        ));
        assert!(l.slot(Some("quiet")).await.is_ok());
        assert!(l.slot(None).await.is_ok());
        drop(held.pop());
        assert!(l.slot(Some("flood")).await.is_ok());
    }

    #[test]
    fn shares_round_up_and_are_never_empty() {
        let c = LimitsConfig::default();
        assert_eq!(c.tenant_pool_share(8), 4);
        assert_eq!(c.tenant_pool_share(7), 4);
        assert_eq!(c.tenant_pool_share(1), 1);
        let c = LimitsConfig {
            tenant_pool_percent: 1,
            ..c
        };
        assert_eq!(c.tenant_pool_share(8), 1);
    }
}
