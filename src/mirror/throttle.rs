//! How many uploads the mirror keeps in flight: additive increase, multiplicative decrease. A
//! `SlowDown` (or 503) from the bucket cuts the allowance to 0.7x (as niks3 backs off its
//! request rate); every run of successes as long as the allowance grows it by one again, up
//! to `[mirror.s3] concurrency`. Pure.

/// The allowance of uploads in flight.
#[derive(Debug, Clone)]
pub struct Throttle {
    max: usize,
    allowed: f64,
    successes: usize,
}

impl Throttle {
    pub fn new(max: usize) -> Self {
        Throttle {
            max: max.max(1),
            allowed: max.max(1) as f64,
            successes: 0,
        }
    }

    /// Uploads that may be in flight now.
    pub fn allowed(&self) -> usize {
        (self.allowed.floor() as usize).clamp(1, self.max)
    }

    /// The bucket asked to slow down.
    pub fn slow_down(&mut self) {
        self.allowed = (self.allowed * 0.7).max(1.0);
        self.successes = 0;
    }

    /// An upload went through.
    pub fn success(&mut self) {
        self.successes += 1;
        if self.successes >= self.allowed() {
            self.allowed = (self.allowed + 1.0).min(self.max as f64);
            self.successes = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backs_off_on_slow_down_and_grows_back() {
        let mut t = Throttle::new(8);
        assert_eq!(t.allowed(), 8);
        t.slow_down();
        assert_eq!(t.allowed(), 5);
        t.slow_down();
        t.slow_down();
        t.slow_down();
        t.slow_down();
        t.slow_down();
        t.slow_down();
        assert_eq!(t.allowed(), 1, "never below one");
        for _ in 0..200 {
            t.success();
        }
        assert_eq!(
            t.allowed(),
            8,
            "grows back to the configured concurrency, no further"
        );
    }
}
