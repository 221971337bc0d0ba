//! What a range worker does after each answer from its provider: the one place that tells a
//! provider's load (`Busy`: asked again shortly, then left for this NAR, never held against
//! it) from its faults (avoided for a while by every transfer).

use std::time::Duration;

use super::super::peer::PeerError;

/// `Busy` answers in a row before a provider is left for this NAR (about 30 s of waiting,
/// [`busy_wait`] apart: as long as the HTTP cache waits for a NAR's first bytes). Being busy
/// is the provider serving all it may, not a fault: it is not avoided.
pub(super) const BUSY_TRIES: u32 = 18;

/// Connection and stream failures in a row before a provider is avoided.
const FAILURES: u32 = 3;

/// How long to wait before asking a provider that answered `Busy` `n` times in a row again.
pub(super) fn busy_wait(n: u32) -> Duration {
    (Duration::from_millis(100) * 2u32.saturating_pow(n.saturating_sub(1)))
        .min(Duration::from_secs(2))
}

/// What the worker does next.
#[derive(Debug, PartialEq)]
pub(super) enum After {
    /// Take the next range.
    Next,
    /// Wait this long, then take the next range.
    Wait(Duration),
    /// Leave the NAR to the other providers.
    Leave,
    /// Leave the NAR to the others: the provider sends only whole NARs (version 1).
    OnlyV1,
    /// Leave the NAR, and avoid the provider for a while: it lied, or kept failing.
    Avoid,
}

/// One worker's answers from its provider so far.
#[derive(Debug, Default)]
pub(super) struct Streak {
    failures: u32,
    busy: u32,
}

impl Streak {
    /// The range just fetched ended with `res`: what now.
    pub(super) fn after(&mut self, res: &Result<(), PeerError>) -> After {
        match res {
            Ok(()) => {
                (self.failures, self.busy) = (0, 0);
                After::Next
            }
            // The provider serves all it may at once (to everyone, or its share to us): the
            // range went back to the plan; ask again shortly, while other providers may take
            // it. A provider busy for long is left, as a timeout would leave it, but not
            // avoided: another transfer finding it free should use it.
            Err(PeerError::Busy) => {
                self.busy += 1;
                if self.busy > BUSY_TRIES {
                    After::Leave
                } else {
                    After::Wait(busy_wait(self.busy))
                }
            }
            Err(PeerError::OnlyV1) => After::OnlyV1,
            // It no longer holds the NAR (Nix GC or an eviction whose withdrawal has not reached
            // us yet): not a failure, and asking again will not change it.
            Err(PeerError::NotFound) => After::Leave,
            Err(e) if e.misbehaved() => After::Avoid,
            Err(_) => {
                self.busy = 0;
                self.failures += 1;
                if self.failures >= FAILURES {
                    After::Avoid
                } else {
                    After::Next
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A provider that stays busy is asked again for about 30 s, then left, never avoided;
    /// busy spells between stream failures do not reset the failure count, nor do failures
    /// make a busy provider's later `Busy` count as one.
    #[test]
    fn busy_is_load_not_a_fault() {
        let mut s = Streak::default();
        let mut waited = Duration::ZERO;
        let left = loop {
            match s.after(&Err(PeerError::Busy)) {
                After::Wait(d) => waited += d,
                other => break other,
            }
        };
        assert_eq!(left, After::Leave);
        assert!(
            (Duration::from_secs(25)..=Duration::from_secs(35)).contains(&waited),
            "{waited:?}"
        );
        // Busy spells with one stream failure after each: a struggling provider, not a lying
        // one, but three failures in a row are still three.
        let mut s = Streak::default();
        let stream = || Err(PeerError::Stream("reset".into()));
        for round in 1..=3 {
            for _ in 0..BUSY_TRIES {
                assert!(matches!(s.after(&Err(PeerError::Busy)), After::Wait(_)));
            }
            let want = if round == 3 {
                After::Avoid
            } else {
                After::Next
            };
            assert_eq!(s.after(&stream()), want, "round {round}");
        }
        // A good range in between starts both counts again.
        let mut s = Streak::default();
        for _ in 0..2 {
            assert_eq!(s.after(&stream()), After::Next);
            assert_eq!(s.after(&Ok(())), After::Next);
        }
        assert_eq!(
            s.after(&Err(PeerError::Protocol("lied".into()))),
            After::Avoid
        );
        assert_eq!(s.after(&Err(PeerError::NotFound)), After::Leave);
        assert_eq!(s.after(&Err(PeerError::OnlyV1)), After::OnlyV1);
    }
}
