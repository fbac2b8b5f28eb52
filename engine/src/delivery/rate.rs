//! Per-tenant send rate: a token bucket per tenant, so one tenant's mass mailing cannot use
//! up the SMTP relay's capacity (or its reputation) for everyone.
//!
//! Pure logic with the clock passed in, so it is tested without waiting.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Buckets kept before full (idle) ones are forgotten.
const MAX_TRACKED: usize = 10_000;

pub struct TenantRate {
    per_sec: f64,
    buckets: HashMap<String, Bucket>,
}

struct Bucket {
    tokens: f64,
    updated: Instant,
}

impl TenantRate {
    /// `per_sec` sends per second per tenant, with a burst of as many; 0 means no limit.
    pub fn new(per_sec: u32) -> Self {
        Self {
            per_sec: f64::from(per_sec),
            buckets: HashMap::new(),
        }
    }

    /// Takes one send for `tenant` at `now`: `None` if allowed, else how long until the
    /// next one would be.
    pub fn take(&mut self, tenant: &str, now: Instant) -> Option<Duration> {
        if self.per_sec <= 0.0 {
            return None;
        }
        let per_sec = self.per_sec;
        if self.buckets.len() >= MAX_TRACKED && !self.buckets.contains_key(tenant) {
            self.buckets
                .retain(|_, b| refill(b, per_sec, now) < per_sec);
        }
        let bucket = self
            .buckets
            .entry(tenant.to_owned())
            .or_insert_with(|| Bucket {
                tokens: per_sec,
                updated: now,
            });
        let tokens = refill(bucket, per_sec, now);
        if tokens >= 1.0 {
            bucket.tokens = tokens - 1.0;
            None
        } else {
            Some(Duration::from_secs_f64((1.0 - tokens) / per_sec))
        }
    }
}

/// Brings a bucket up to `now` and returns its tokens (at most one second's worth).
fn refill(bucket: &mut Bucket, per_sec: f64, now: Instant) -> f64 {
    let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
    bucket.tokens = (bucket.tokens + elapsed * per_sec).min(per_sec);
    bucket.updated = now;
    bucket.tokens
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_a_burst_then_the_rate_per_tenant() {
        let mut rate = TenantRate::new(2);
        let t0 = Instant::now();
        assert_eq!(rate.take("a", t0), None);
        assert_eq!(rate.take("a", t0), None);
        let wait = rate.take("a", t0).expect("burst spent");
        assert!(wait > Duration::from_millis(400) && wait <= Duration::from_millis(500));
        // Another tenant is not affected.
        assert_eq!(rate.take("b", t0), None);
        // Half a second later one more send is allowed.
        assert_eq!(rate.take("a", t0 + Duration::from_millis(500)), None);
        assert!(rate.take("a", t0 + Duration::from_millis(500)).is_some());
    }

    #[test]
    fn zero_means_no_limit() {
        let mut rate = TenantRate::new(0);
        let t0 = Instant::now();
        assert!((0..1000).all(|_| rate.take("a", t0).is_none()));
    }
}
