//! A tenant's routing-time budget: at most so much plugin time per second of wall clock.
//!
//! Lanes run side by side, but cores are few: a tenant whose plugin spends 90 ms per event
//! would keep a core busy for as long as its backlog lasts. Over its budget, a lane pauses
//! until the current one-second window ends, and the other tenants' lanes get the CPU.
//! Pure logic with the clock passed in.

use std::time::{Duration, Instant};

const WINDOW: Duration = Duration::from_secs(1);

pub struct Budget {
    per_window: Duration,
    window_start: Instant,
    spent: Duration,
}

impl Budget {
    /// `per_sec`: plugin time allowed per second; zero means no limit.
    pub fn new(per_sec: Duration, now: Instant) -> Self {
        Self {
            per_window: per_sec,
            window_start: now,
            spent: Duration::ZERO,
        }
    }

    /// Records `used` plugin time at `now`; returns how long to pause when the budget of
    /// the current window is spent.
    pub fn spend(&mut self, used: Duration, now: Instant) -> Option<Duration> {
        if self.per_window.is_zero() {
            return None;
        }
        if now.saturating_duration_since(self.window_start) >= WINDOW {
            self.window_start = now;
            self.spent = Duration::ZERO;
        }
        self.spent += used;
        if self.spent < self.per_window {
            return None;
        }
        // Pause to the end of this window; what was overspent carries into the next.
        let pause = (self.window_start + WINDOW).saturating_duration_since(now);
        self.spent -= self.per_window;
        self.window_start += WINDOW;
        Some(pause)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_a_tenant_over_its_budget_until_the_window_ends() {
        let t0 = Instant::now();
        let mut b = Budget::new(Duration::from_millis(500), t0);
        let ms = Duration::from_millis;
        for i in 0..5 {
            assert_eq!(b.spend(ms(90), t0 + ms(90 * i)), None);
        }
        // The sixth call crosses 500 ms of plugin time at 540 ms: pause until 1 s.
        assert_eq!(b.spend(ms(90), t0 + ms(540)), Some(ms(460)));
        // The 40 ms overspent count in the next window.
        assert_eq!(b.spend(ms(450), t0 + ms(1000)), None);
        assert_eq!(b.spend(ms(20), t0 + ms(1450)), Some(ms(550)));
    }

    #[test]
    fn a_fast_tenant_never_pauses_and_zero_means_no_limit() {
        let t0 = Instant::now();
        let mut b = Budget::new(Duration::from_millis(500), t0);
        for i in 0..10_000u64 {
            assert_eq!(
                b.spend(Duration::from_micros(50), t0 + Duration::from_millis(i)),
                None
            );
        }
        let mut unlimited = Budget::new(Duration::ZERO, t0);
        assert_eq!(unlimited.spend(Duration::from_secs(5), t0), None);
    }
}
