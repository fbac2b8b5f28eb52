//! Token buckets by key: how the public API's request rates are kept.
//!
//! A bucket holds up to `burst` tokens and gains `per_second` of them a second; a request
//! takes one, and an empty bucket says how long until the next token. A client that keeps
//! to the rate is never refused, one that bursts is refused only once its burst is spent,
//! and the answer (`Retry-After`) is exact, unlike a fixed window's.
//!
//! The map is swept of full buckets (keys quiet for at least `burst / per_second`, which
//! behave exactly like absent ones) once it holds [`SWEEP_AT`] keys, so made-up keys (user
//! ids, addresses) cost memory only while they keep sending.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One bucket's rate and size.
#[derive(Debug, Clone, Copy)]
pub struct Rate {
    pub per_second: u32,
    pub burst: u32,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    /// The tokens at `now`, refilled since `at` and capped at the burst.
    fn refill(&mut self, rate: Rate, now: Instant) {
        let gained = now.saturating_duration_since(self.at).as_secs_f64() * rate.per_second as f64;
        self.tokens = (self.tokens + gained).min(rate.burst as f64);
        self.at = now;
    }
}

/// Keys with their buckets.
pub struct Buckets<K> {
    rate: Rate,
    buckets: Mutex<HashMap<K, Bucket>>,
}

/// Keys held before full buckets are swept.
const SWEEP_AT: usize = 10_000;

impl<K: Hash + Eq + Clone> Buckets<K> {
    pub fn new(rate: Rate) -> Self {
        Self {
            rate,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes a token of `key`'s bucket at `now`; `Err` holds how long until one is there.
    pub fn take(&self, key: &K, now: Instant) -> Result<(), Duration> {
        let rate = self.rate;
        let mut buckets = self.buckets.lock().expect("bucket lock poisoned");
        if buckets.len() >= SWEEP_AT && !buckets.contains_key(key) {
            buckets.retain(|_, b| {
                b.refill(rate, now);
                b.tokens < rate.burst as f64
            });
        }
        let bucket = buckets.entry(key.clone()).or_insert(Bucket {
            tokens: rate.burst as f64,
            at: now,
        });
        bucket.refill(rate, now);
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                (1.0 - bucket.tokens) / rate.per_second as f64,
            ))
        }
    }

    /// Gives back a token taken at the same moment (a request the next limit refused).
    pub fn give_back(&self, key: &K) {
        let mut buckets = self.buckets.lock().expect("bucket lock poisoned");
        if let Some(bucket) = buckets.get_mut(key) {
            bucket.tokens = (bucket.tokens + 1.0).min(self.rate.burst as f64);
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.buckets.lock().unwrap().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_rate() {
        let b = Buckets::new(Rate {
            per_second: 2,
            burst: 3,
        });
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(b.take(&"u", t0).is_ok());
        }
        assert_eq!(b.take(&"u", t0), Err(Duration::from_millis(500)));
        // Another key has its own bucket.
        assert!(b.take(&"v", t0).is_ok());
        // Half a second later one token is back, and only one.
        let t1 = t0 + Duration::from_millis(500);
        assert!(b.take(&"u", t1).is_ok());
        assert!(b.take(&"u", t1).is_err());
        // A long pause refills up to the burst, no more.
        let t2 = t1 + Duration::from_secs(60);
        for _ in 0..3 {
            assert!(b.take(&"u", t2).is_ok());
        }
        assert!(b.take(&"u", t2).is_err());
        b.give_back(&"u");
        assert!(b.take(&"u", t2).is_ok());
    }

    #[test]
    fn quiet_keys_are_swept_and_busy_ones_kept() {
        let b = Buckets::new(Rate {
            per_second: 1,
            burst: 2,
        });
        let t0 = Instant::now();
        for k in 0..SWEEP_AT {
            b.take(&k, t0).unwrap();
        }
        // Two seconds on, every bucket is full again but one that keeps sending.
        let t1 = t0 + Duration::from_secs(2);
        b.take(&0, t1).unwrap();
        b.take(&0, t1).unwrap();
        b.take(&SWEEP_AT, t1).unwrap();
        assert_eq!(b.len(), 2);
        assert!(b.take(&0, t1).is_err(), "the busy key kept its state");
    }
}
