//! Rate-limited logging: one line per interval for events that can come in floods (probes that
//! cannot run because the host is out of descriptors, client disconnects, refused connections).
//! Used here and by the Pingora adapter, so an attacker can make neither fill the log.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Lets one event per interval through and counts the ones it held back in between.
#[derive(Debug)]
pub struct LogLimiter {
    origin: Instant,
    interval_ms: u64,
    /// Milliseconds since `origin` before which nothing is let through (0: the first event is).
    next_ms: AtomicU64,
    held_back: AtomicU64,
}

impl LogLimiter {
    /// At most one event per `interval`.
    pub fn new(interval: Duration) -> Self {
        Self {
            origin: Instant::now(),
            interval_ms: u64::try_from(interval.as_millis()).unwrap_or(u64::MAX),
            next_ms: AtomicU64::new(0),
            held_back: AtomicU64::new(0),
        }
    }

    /// `Some(n)` if this event should be logged now, `n` being the events held back since the
    /// previous one; `None` if it is held back (and counted).
    pub fn admit(&self) -> Option<u64> {
        let now = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX);
        let next = self.next_ms.load(Ordering::Relaxed);
        if now >= next
            && self
                .next_ms
                .compare_exchange(
                    next,
                    now.saturating_add(self.interval_ms),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            return Some(self.held_back.swap(0, Ordering::Relaxed));
        }
        self.held_back.fetch_add(1, Ordering::Relaxed);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_event_passes_then_the_rest_of_the_interval_is_counted() {
        let limiter = LogLimiter::new(Duration::from_secs(3600));
        assert_eq!(limiter.admit(), Some(0));
        for _ in 0..5 {
            assert_eq!(limiter.admit(), None);
        }
        assert_eq!(limiter.held_back.load(Ordering::Relaxed), 5);
    }

    #[test]
    fn a_zero_interval_lets_everything_through() {
        let limiter = LogLimiter::new(Duration::ZERO);
        assert_eq!(limiter.admit(), Some(0));
        assert_eq!(limiter.admit(), Some(0));
    }
}
