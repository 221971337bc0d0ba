//! The node's upload budget to peers (`[mesh] serve-rate`): one pacer shared by every NAR
//! stream this node serves, so peers fetching at once share the rate and a host that builds
//! keeps the rest of its link. A token bucket kept as a virtual clock: each piece moves the
//! clock on by its length over the rate, and a stream waits while the clock is ahead of now by
//! more than the burst allows.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How far ahead of the rate a burst may go.
const BURST: Duration = Duration::from_millis(50);

/// Paces bytes sent to peers to a rate in bytes per second.
#[derive(Debug)]
pub struct Pacer {
    per_sec: u64,
    /// When the bytes taken so far would have gone out at the rate.
    clock: Mutex<Option<Instant>>,
}

impl Pacer {
    pub fn new(per_sec: u64) -> Self {
        Pacer {
            per_sec: per_sec.max(1),
            clock: Mutex::new(None),
        }
    }

    /// Take `n` bytes at `now`: how long to wait before sending them.
    fn take_at(&self, now: Instant, n: u64) -> Duration {
        let mut clock = self.clock.lock().unwrap_or_else(|p| p.into_inner());
        // An idle pacer does not bank more than a burst.
        let from = match *clock {
            Some(c) if c + BURST > now => c,
            _ => now.checked_sub(BURST).unwrap_or(now),
        };
        let next = from + Duration::from_secs_f64(n as f64 / self.per_sec as f64);
        *clock = Some(next);
        next.saturating_duration_since(now)
    }

    /// Wait until `n` more bytes may go out.
    pub async fn take(&self, n: u64) {
        let wait = self.take_at(Instant::now(), n);
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_go_out_at_the_rate_after_one_burst() {
        let p = Pacer::new(1 << 20);
        let t0 = Instant::now();
        // The first 50 ms worth goes at once.
        assert_eq!(p.take_at(t0, 50 << 10), Duration::ZERO);
        // Then every MiB costs a second, whoever takes it.
        let w = p.take_at(t0, 1 << 20);
        assert!((w.as_secs_f64() - 1.0).abs() < 0.01, "{w:?}");
        let w = p.take_at(t0, 1 << 20);
        assert!((w.as_secs_f64() - 2.0).abs() < 0.01, "{w:?}");
        // Time passing pays it back.
        let w = p.take_at(t0 + Duration::from_secs(2), 0);
        assert!(w.is_zero(), "{w:?}");
    }

    #[test]
    fn an_idle_pacer_banks_no_more_than_a_burst() {
        let p = Pacer::new(1 << 20);
        let t0 = Instant::now();
        p.take_at(t0, 1);
        let later = t0 + Duration::from_secs(60);
        // A minute idle: still only a burst's worth free.
        let w = p.take_at(later, 1 << 20);
        let want = 1.0 - BURST.as_secs_f64();
        assert!((w.as_secs_f64() - want).abs() < 0.01, "{w:?}");
    }
}
