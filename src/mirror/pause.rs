//! Whether uploads are paused because the bucket failed as a whole (credentials refused, no
//! such bucket, no answer at all), and when to probe it. An upload that fails so pauses every
//! upload; a probe of the bucket comes after a wait that doubles with each failed probe (up to
//! [`MAX_WAIT`]), and one that answers ends the pause. A pause's first wait grows with each
//! pause too, and is [`FIRST_WAIT`] again only once an upload went through: a bucket that
//! answers a probe but refuses uploads (a policy that denies writing) is not tried every
//! second. Pure.

use std::time::{Duration, Instant};

/// The first wait of a pause while uploads go through.
pub const FIRST_WAIT: Duration = Duration::from_secs(1);
/// The longest wait between probes.
pub const MAX_WAIT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct Pause {
    /// Paused: the next probe is due then, and fails into a wait twice this one.
    paused: Option<(Instant, Duration)>,
    /// The first wait of the next pause.
    next_first: Duration,
}

impl Default for Pause {
    fn default() -> Self {
        Pause {
            paused: None,
            next_first: FIRST_WAIT,
        }
    }
}

impl Pause {
    pub fn is_paused(&self) -> bool {
        self.paused.is_some()
    }

    /// When the next probe is due, if paused.
    pub fn probe_at(&self) -> Option<Instant> {
        self.paused.map(|(at, _)| at)
    }

    /// An upload at `now` found the bucket failing as a whole: the wait before the first probe
    /// if this starts a pause (`None` if paused already).
    pub fn bucket_failed(&mut self, now: Instant) -> Option<Duration> {
        if self.paused.is_some() {
            return None;
        }
        let wait = self.next_first;
        self.next_first = (wait * 2).min(MAX_WAIT);
        self.paused = Some((now + wait, wait));
        Some(wait)
    }

    /// An upload went through.
    pub fn uploaded(&mut self) {
        self.next_first = FIRST_WAIT;
    }

    /// A probe at `now` found the bucket failing still: the wait before the next (`None` if
    /// not paused).
    pub fn probe_failed(&mut self, now: Instant) -> Option<Duration> {
        let (_, wait) = self.paused?;
        let wait = (wait * 2).min(MAX_WAIT);
        self.next_first = self.next_first.max(wait);
        self.paused = Some((now + wait, wait));
        Some(wait)
    }

    /// A probe found the bucket answering: true if that ended a pause.
    pub fn probe_answered(&mut self) -> bool {
        self.paused.take().is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_back_off_and_a_pause_starts_where_the_last_left_until_an_upload_goes_through() {
        let t0 = Instant::now();
        let mut p = Pause::default();
        assert!(!p.is_paused() && p.probe_at().is_none());
        assert_eq!(p.bucket_failed(t0), Some(FIRST_WAIT));
        assert_eq!(p.probe_at(), Some(t0 + FIRST_WAIT));
        assert_eq!(p.bucket_failed(t0), None, "paused already");
        // Probes fail: 2, 4, 8, 16, 30, 30 s apart.
        let waits: Vec<u64> = (0..6)
            .map(|_| p.probe_failed(t0).unwrap().as_secs())
            .collect();
        assert_eq!(waits, [2, 4, 8, 16, 30, 30]);
        assert!(p.probe_answered());
        assert!(!p.is_paused() && !p.probe_answered());
        assert_eq!(p.probe_failed(t0), None, "not paused");
        // The bucket answers probes but refuses uploads: the next pause waits as long as the
        // last one's longest.
        assert_eq!(p.bucket_failed(t0), Some(MAX_WAIT));
        assert!(p.probe_answered());
        // Once an upload went through, a pause starts at 1 s again, then 2 s.
        p.uploaded();
        assert_eq!(p.bucket_failed(t0), Some(FIRST_WAIT));
        assert!(p.probe_answered());
        assert_eq!(p.bucket_failed(t0), Some(2 * FIRST_WAIT));
    }
}
