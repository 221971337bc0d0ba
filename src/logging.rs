//! The node's logs: tracing to stderr, filtered by `NARMESH_LOG` (default `info`). Unless that
//! filter asks for `debug` or more anywhere, an event from another crate's callsite (iroh, its
//! mDNS, QUIC) is written at most once per [`QUIET_FOR`]: a dependency that warns on every retry
//! (mDNS on a host without a multicast route warns a few times a second) cannot fill a disk
//! over months. The shipped units set `NARMESH_LOG=info`, and are limited like the default; a
//! filter at `debug` (someone looking into a fault) shows everything.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// How long a foreign callsite stays quiet after it logged.
pub const QUIET_FOR: Duration = Duration::from_secs(60);

/// When each foreign callsite last logged.
#[derive(Debug, Default)]
pub struct Repeats(Mutex<HashMap<tracing::callsite::Identifier, Instant>>);

impl Repeats {
    /// Whether an event of `callsite` at `now` is written.
    pub fn allow(&self, callsite: tracing::callsite::Identifier, now: Instant) -> bool {
        let mut seen = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match seen.get(&callsite) {
            Some(t) if now.duration_since(*t) < QUIET_FOR => false,
            _ => {
                seen.insert(callsite, now);
                true
            }
        }
    }
}

/// Set up logging for the process.
pub fn init() {
    let explicit = std::env::var("NARMESH_LOG").ok();
    let filter = explicit
        .as_deref()
        .and_then(|v| tracing_subscriber::EnvFilter::try_new(v).ok())
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new("info"));
    let repeats = Repeats::default();
    let quiet = limited(&filter);
    // Dynamic: asked for every event (a plain filter_fn is asked once per callsite).
    let limit = tracing_subscriber::filter::dynamic_filter_fn(move |meta, _| {
        !quiet
            || !meta.is_event()
            || meta.target().starts_with("narmesh")
            || repeats.allow(meta.callsite(), Instant::now())
    });
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        // Colours only for a person at a terminal: journald and log files show codes raw.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    use tracing_subscriber::Layer as _;
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt.with_filter(limit))
        .init();
}

/// Whether another crate's repeated events are limited under `filter`: unless it enables
/// `debug` or more for some target.
fn limited(filter: &tracing_subscriber::EnvFilter) -> bool {
    filter
        .max_level_hint()
        .is_none_or(|l| l <= tracing_subscriber::filter::LevelFilter::INFO)
}

/// A log line at most once a second, however often what it reports happens (a peer that
/// repeats it in a loop, or an accept loop out of file descriptors, must not flood the log).
#[derive(Debug, Clone, Default)]
pub struct EverySecond(Arc<Mutex<(Option<Instant>, u64)>>);

impl EverySecond {
    /// `Some(times not logged since the last line)` if a line may be logged now.
    pub fn allow(&self) -> Option<u64> {
        let now = Instant::now();
        let mut logged = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let (at, unlogged) = &mut *logged;
        if at.is_none_or(|at| now.duration_since(at) >= Duration::from_secs(1)) {
            *at = Some(now);
            Some(std::mem::take(unlogged))
        } else {
            *unlogged += 1;
            None
        }
    }

    /// How many were not logged since the last line, now counted as told (by a line saying
    /// the trouble has ended).
    pub fn take_unlogged(&self) -> u64 {
        std::mem::take(&mut self.0.lock().unwrap_or_else(|p| p.into_inner()).1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_a_second_and_what_was_not_logged_is_counted_once() {
        let e = EverySecond::default();
        assert_eq!(e.allow(), Some(0));
        assert_eq!((e.allow(), e.allow()), (None, None));
        assert_eq!(e.take_unlogged(), 2);
        assert_eq!(e.take_unlogged(), 0, "counted once");
    }

    #[test]
    fn repeats_are_limited_unless_the_filter_asks_for_debug() {
        for (f, quiet) in [
            ("info", true),
            ("warn", true),
            ("narmesh=info,iroh=warn", true),
            ("debug", false),
            ("narmesh=debug,iroh=info", false),
            ("info,narmesh=debug", false),
            ("trace", false),
        ] {
            let filter = tracing_subscriber::EnvFilter::try_new(f).unwrap();
            assert_eq!(limited(&filter), quiet, "{f}");
        }
    }

    struct Site;
    static SITE: Site = Site;
    impl tracing::callsite::Callsite for Site {
        fn set_interest(&self, _: tracing::subscriber::Interest) {}
        fn metadata(&self) -> &tracing::Metadata<'_> {
            unimplemented!()
        }
    }

    #[test]
    fn a_callsite_logs_once_a_minute() {
        let r = Repeats::default();
        let id = tracing::callsite::Identifier(&SITE);
        let t0 = Instant::now();
        assert!(r.allow(id.clone(), t0));
        assert!(!r.allow(id.clone(), t0 + Duration::from_secs(1)));
        assert!(!r.allow(id.clone(), t0 + QUIET_FOR - Duration::from_millis(1)));
        assert!(r.allow(id, t0 + QUIET_FOR));
    }
}
