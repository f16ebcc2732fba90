//! The agent's budget of Event writes to the API server: a token bucket (refilled at `rate`
//! per second, holding at most `burst`), shared by every key, so that no traffic — a port scan,
//! spoofed SYNs — makes the agent write faster than the budget.

use std::{sync::Arc, time::Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Writes (Event creations and updates) per second an agent may send, by default.
pub const DEFAULT_RATE: u32 = 10;
/// Writes an agent may send at once after a quiet while, by default.
pub const DEFAULT_BURST: u32 = 50;

#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    /// A full bucket; `rate` 0 means no write is ever admitted after the burst.
    pub fn new(rate: u32, burst: u32, now: Instant) -> Self {
        Self {
            rate: f64::from(rate),
            burst: f64::from(burst.max(1)),
            tokens: f64::from(burst.max(1)),
            at: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        // A clock that went back (it cannot with Instant, but a caller may pass an older one)
        // adds nothing.
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.at = self.at.max(now);
    }

    /// Is a token there? Does not take it.
    pub fn ready(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= 1.0
    }

    /// Takes a token when there is one.
    pub fn take(&mut self, now: Instant) -> bool {
        let ok = self.ready(now);
        if ok {
            self.tokens -= 1.0;
        }
        ok
    }
}

/// Why a write waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// The token bucket is empty.
    Rate,
    /// `in_flight` requests are open.
    InFlight,
}

impl Wait {
    pub fn label(self) -> &'static str {
        match self {
            Self::Rate => "rate",
            Self::InFlight => "in_flight",
        }
    }
}

/// The token bucket and the bound on requests open at once.
pub struct Budget {
    bucket: TokenBucket,
    in_flight: Arc<Semaphore>,
    max_in_flight: usize,
}

impl Budget {
    pub fn new(rate: u32, burst: u32, in_flight: usize, now: Instant) -> Self {
        let max_in_flight = in_flight.max(1);
        Self {
            bucket: TokenBucket::new(rate, burst, now),
            in_flight: Arc::new(Semaphore::new(max_in_flight)),
            max_in_flight,
        }
    }

    /// A write may go: the permit is held until its request is answered. No token is taken
    /// when no request slot is free.
    pub fn admit(&mut self, now: Instant) -> Result<OwnedSemaphorePermit, Wait> {
        let permit = self
            .in_flight
            .clone()
            .try_acquire_owned()
            .map_err(|_| Wait::InFlight)?;
        match self.bucket.take(now) {
            true => Ok(permit),
            false => Err(Wait::Rate),
        }
    }

    /// Requests open now.
    pub fn in_flight(&self) -> usize {
        self.max_in_flight - self.in_flight.available_permits()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn taken(b: &mut TokenBucket, now: Instant, tries: usize) -> usize {
        (0..tries).filter(|_| b.take(now)).count()
    }

    #[test]
    fn the_burst_is_admitted_at_once_then_the_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10, 50, t0);
        assert_eq!(taken(&mut b, t0, 1000), 50, "the burst");
        assert!(!b.ready(t0));
        assert_eq!(taken(&mut b, t0 + Duration::from_millis(99), 10), 0);
        assert_eq!(taken(&mut b, t0 + Duration::from_millis(100), 10), 1);
        assert_eq!(taken(&mut b, t0 + Duration::from_millis(1100), 100), 10);
        // Over a long run the rate holds: 10 a second, whatever is asked.
        let mut admitted = 0;
        for ms in (1200..=61_100).step_by(10) {
            admitted += taken(&mut b, t0 + Duration::from_millis(ms), 5);
        }
        // 59.9 s at 10/s (floating point may round one token down).
        assert!((598..=599).contains(&admitted), "{admitted}");
    }

    #[test]
    fn a_quiet_while_refills_up_to_the_burst_not_beyond() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10, 50, t0);
        assert_eq!(taken(&mut b, t0, 50), 50);
        let later = t0 + Duration::from_secs(3600);
        assert_eq!(taken(&mut b, later, 1000), 50);
        // An older instant than the last one seen adds nothing.
        assert_eq!(taken(&mut b, t0, 10), 0);
        let mut none = TokenBucket::new(0, 1, t0);
        assert!(none.take(t0));
        assert!(!none.take(t0 + Duration::from_secs(3600)));
    }

    #[test]
    fn the_budget_bounds_requests_open_at_once_without_spending_tokens_on_them() {
        let t0 = Instant::now();
        let mut b = Budget::new(10, 3, 2, t0);
        let first = b.admit(t0).unwrap();
        let _second = b.admit(t0).unwrap();
        assert_eq!(b.in_flight(), 2);
        assert_eq!(b.admit(t0).unwrap_err(), Wait::InFlight);
        drop(first);
        assert_eq!(b.in_flight(), 1);
        // The refused request took no token: the third of the burst is still there.
        let third = b.admit(t0).unwrap();
        drop(third);
        assert_eq!(b.admit(t0).unwrap_err(), Wait::Rate);
        assert_eq!(b.in_flight(), 1, "a refused write holds no slot");
    }
}
