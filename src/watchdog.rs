//! The node's watch over its runtimes: hung work that [`crate::vital`] cannot see, as it never
//! ends. A thread of its own gives each runtime ([`crate::metrics::RUNTIMES`]: the front, which
//! acknowledges hooks; the HTTP cache; the main one, for the pipeline, the mesh and the mirror)
//! a task that does nothing but answer, every second. How long each waited to run is
//! `narmesh_runtime_lag_seconds{runtime}`. One that has run nothing for [`STALLED`] (or half the
//! watchdog's interval, if shorter) has stalled: every thread it has is blocked (a blocking call
//! in a task on the front's or the cache's thread, a disk that does not answer the front's
//! fsync, every worker of the main one stuck). That is a problem (`narmesh_problem{part=
//! "runtime"}`, `narmesh status`), and the log names it. The database's writes are watched
//! beside them ([`crate::db::writes`]): writes in flight for as long with none that held the
//! lock ending have stalled the database (`part="database"`), as every other write waits
//! behind a hung one while the runtimes still answer. What it does not see: one blocked worker
//! of the main runtime while another runs, threads outside the runtimes (but for the
//! database's writes), and tasks that wait on each other (their runtime stays idle, and
//! answers).
//!
//! Under systemd with `WatchdogSec=` (see `deploy/systemd/narmesh.service`), the node says
//! `WATCHDOG=1` every quarter of the interval while nothing has stalled, and says nothing once
//! something has: systemd then kills the node and starts it again. Everything acknowledged is
//! durable, and a restart picks up the work where it stopped.

use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tokio::runtime::Handle;
use tokio::sync::oneshot;

use crate::metrics::Metrics;

/// A runtime that has not run its probe for this long has stalled, as has the database when
/// its writes in flight have ended none for as long.
pub const STALLED: Duration = Duration::from_secs(30);
/// How often each runtime is given a probe.
pub const PROBE_EVERY: Duration = Duration::from_secs(1);

/// How long a probe (or the database's writes) may wait before a stall, under systemd's
/// watchdog `interval` if there is one: [`STALLED`], or half the interval if that is shorter.
pub fn stall_after(interval: Option<Duration>) -> Duration {
    interval.map_or(STALLED, |i| STALLED.min(i / 2))
}

/// How often systemd's watchdog is told the node is alive: every quarter of its interval.
pub fn tell_every(interval: Option<Duration>) -> Option<Duration> {
    interval.map(|i| i / 4)
}

/// One runtime watched: its probe in flight, if any.
struct Watched {
    name: &'static str,
    handle: Handle,
    /// Sent at, and the time it ran at once it has.
    probe: Option<(Instant, oneshot::Receiver<Instant>)>,
    /// Its runtime has shut down (the node is stopping): no longer watched.
    gone: bool,
    stalled: bool,
}

/// What a round found of one runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    /// Its last probe ran after waiting this long.
    Ran(Duration),
    /// Its probe has waited this long and not run yet.
    Waiting(Duration),
    Gone,
}

impl Watched {
    fn new(name: &'static str, handle: Handle) -> Self {
        Watched {
            name,
            handle,
            probe: None,
            gone: false,
            stalled: false,
        }
    }

    /// This thread was held up: a probe in flight of a runtime that had not stalled waits from
    /// now (the runtime gets its full time to run it once all threads run again).
    fn late(&mut self, now: Instant) {
        if let (Some((sent, _)), false) = (self.probe.as_mut(), self.stalled) {
            *sent = now;
        }
    }

    /// Look at the probe in flight, and send another once it has run.
    fn round(&mut self, now: Instant) -> Seen {
        if self.gone {
            return Seen::Gone;
        }
        let seen = match self.probe.as_mut() {
            None => Seen::Ran(Duration::ZERO),
            Some((sent, rx)) => match rx.try_recv() {
                Ok(ran) => Seen::Ran(ran.saturating_duration_since(*sent)),
                Err(oneshot::error::TryRecvError::Empty) => Seen::Waiting(now - *sent),
                Err(oneshot::error::TryRecvError::Closed) => Seen::Gone,
            },
        };
        match seen {
            Seen::Waiting(_) => {}
            Seen::Gone => {
                self.gone = true;
                self.probe = None;
            }
            Seen::Ran(_) => {
                let (tx, rx) = oneshot::channel();
                self.handle.spawn(async move {
                    let _ = tx.send(Instant::now());
                });
                self.probe = Some((now, rx));
            }
        }
        seen
    }
}

/// Whether a runtime (or the database) has stalled, by what this round `seen` of it, whether
/// it had stalled before, and whether this round came `late` (this thread itself was held up,
/// so the runtimes and writes have not had their turn: no new verdict).
fn stalled_now(seen: Seen, was: bool, late: bool, stall: Duration) -> bool {
    match seen {
        Seen::Waiting(d) if late => was && d >= stall,
        Seen::Waiting(d) => d >= stall,
        Seen::Ran(_) | Seen::Gone => false,
    }
}

/// The database's writes in flight, if any: how long with none ending, and which.
pub type WritesStalled = fn() -> Option<crate::db::writes::Stalled>;

/// The database's writes, watched.
struct Writes {
    source: WritesStalled,
    /// The last round that came late while the database had not stalled: its writes have
    /// waited since then at most.
    forgiven: Option<Instant>,
    stalled: bool,
}

impl Writes {
    /// This thread was held up: unless the database had stalled before, its writes wait from
    /// now (as [`Watched::late`]).
    fn late(&mut self, now: Instant) {
        if !self.stalled {
            self.forgiven = Some(now);
        }
    }

    /// The writes in flight and how long they have waited with none ending, as of `now`.
    fn round(&self, now: Instant) -> Option<crate::db::writes::Stalled> {
        let mut seen = (self.source)()?;
        if let Some(f) = self.forgiven {
            seen.waited = seen.waited.min(now.saturating_duration_since(f));
        }
        Some(seen)
    }
}

/// The watch; dropping it (or [`Watchdog::stop`]) ends its thread.
pub struct Watchdog {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watchdog {
    /// Watch `runtimes`, and the database's writes (`writes`: how long they have been in
    /// flight with none ending); with `interval` (systemd's `WatchdogSec=`), tell systemd the
    /// node is alive while nothing has stalled.
    pub fn start(
        runtimes: Vec<(&'static str, Handle)>,
        writes: WritesStalled,
        metrics: Arc<Metrics>,
        interval: Option<Duration>,
    ) -> std::io::Result<Self> {
        let (stop, stopped) = mpsc::channel();
        let mut watched: Vec<Watched> = runtimes
            .into_iter()
            .map(|(name, h)| Watched::new(name, h))
            .collect();
        debug_assert!(
            (watched.iter()).all(|w| crate::metrics::RUNTIMES.contains(&w.name)),
            "a runtime not in RUNTIMES"
        );
        let stall = stall_after(interval);
        let tell_every = tell_every(interval);
        let probe_every = tell_every
            .map_or(PROBE_EVERY, |t| PROBE_EVERY.min(t))
            .max(Duration::from_millis(10));
        if let (Some(i), Some(t)) = (interval, tell_every) {
            tracing::info!(
                "watchdog: telling systemd every {t:?} while nothing stalls for {stall:?} \
                 (WatchdogSec={i:?})"
            );
        }
        let thread = std::thread::Builder::new()
            .name("narmesh-watchdog".into())
            .spawn(move || {
                let mut told: Option<Instant> = None;
                let mut last_round: Option<Instant> = None;
                let mut writes = Writes {
                    source: writes,
                    forgiven: None,
                    stalled: false,
                };
                loop {
                    let now = Instant::now();
                    // This thread itself ran late (the process was frozen, SIGSTOP or a
                    // paused machine): the runtimes have not had their turn yet, so no verdict
                    // this round.
                    let late = last_round.is_some_and(|l| now.duration_since(l) > probe_every * 3);
                    last_round = Some(now);
                    if late {
                        watched.iter_mut().for_each(|w| w.late(now));
                        writes.late(now);
                    }
                    let mut stalled = Vec::new();
                    for w in &mut watched {
                        let seen = w.round(now);
                        let lag = match seen {
                            Seen::Ran(d) | Seen::Waiting(d) => d,
                            Seen::Gone => continue,
                        };
                        metrics
                            .runtime_lag
                            .get_or_create(&crate::metrics::RuntimeLabels { runtime: w.name })
                            .set(lag.as_secs_f64());
                        let now_stalled = stalled_now(seen, w.stalled, late, stall);
                        if now_stalled {
                            stalled.push(format!(
                                "the {} runtime has run nothing for {} s",
                                w.name,
                                lag.as_secs()
                            ));
                        }
                        if now_stalled != w.stalled {
                            w.stalled = now_stalled;
                            if now_stalled {
                                tracing::error!(
                                    "watchdog: the {} runtime has run nothing for {lag:?} (all \
                                     its threads are blocked){}",
                                    w.name,
                                    if interval.is_some() {
                                        "; systemd is no longer told the node is alive, and \
                                         will restart it"
                                    } else {
                                        ""
                                    }
                                );
                            } else {
                                tracing::info!("watchdog: the {} runtime runs again", w.name);
                            }
                        }
                    }
                    metrics.problem("runtime", (!stalled.is_empty()).then(|| stalled.join("; ")));
                    let write = writes.round(now);
                    let waited = write.map_or(Duration::ZERO, |w| w.waited);
                    metrics.database_stall.set(waited.as_secs_f64());
                    let seen = write.map_or(Seen::Ran(Duration::ZERO), |w| Seen::Waiting(w.waited));
                    let now_stalled = stalled_now(seen, writes.stalled, late, stall);
                    let what = || {
                        let which = match write {
                            Some(w) if w.holds => {
                                format!("the one holding the lock began at {}", w.at)
                            }
                            Some(w) => format!("none holds the lock; the oldest began at {}", w.at),
                            None => String::new(),
                        };
                        format!(
                            "its writes have been in flight for {} s with none ending ({which})",
                            waited.as_secs()
                        )
                    };
                    metrics.problem("database", now_stalled.then(what));
                    if now_stalled != writes.stalled {
                        writes.stalled = now_stalled;
                        if now_stalled {
                            tracing::error!(
                                "watchdog: the database has stalled: {} (every other write \
                                 waits behind it){}",
                                what(),
                                if interval.is_some() {
                                    "; systemd is no longer told the node is alive, and \
                                     will restart it"
                                } else {
                                    ""
                                }
                            );
                        } else {
                            tracing::info!("watchdog: the database's writes end again");
                        }
                    }
                    if let Some(every) = tell_every
                        && stalled.is_empty()
                        && !writes.stalled
                        && told.is_none_or(|t| now.duration_since(t) >= every)
                    {
                        crate::systemd::notify("WATCHDOG=1");
                        told = Some(now);
                    }
                    match stopped.recv_timeout(probe_every) {
                        Err(mpsc::RecvTimeoutError::Timeout) => {}
                        _ => return,
                    }
                }
            })?;
        Ok(Watchdog {
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// End the watch (the node is stopping: runtimes that end are not stalls).
    pub fn stop(mut self) {
        self.end();
    }

    fn end(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.end();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A probe that waited as long as the stall limit is a stall, unless the round itself came
    /// late (the process was frozen) and the runtime had not stalled before; one that ran, or
    /// whose runtime is gone, is none.
    #[test]
    fn a_late_round_declares_no_new_stall() {
        let (stall, s) = (Duration::from_secs(30), Duration::from_secs);
        assert!(stalled_now(Seen::Waiting(s(30)), false, false, stall));
        assert!(!stalled_now(Seen::Waiting(s(29)), false, false, stall));
        assert!(!stalled_now(Seen::Waiting(s(300)), false, true, stall));
        assert!(stalled_now(Seen::Waiting(s(300)), true, true, stall));
        assert!(!stalled_now(Seen::Ran(s(300)), true, false, stall));
        assert!(!stalled_now(Seen::Gone, true, false, stall));
    }

    /// Writes wait from their start, or from the last late round if that came later, unless
    /// the database had stalled before it (then it stays stalled); none in flight is none.
    #[test]
    fn writes_wait_from_the_last_late_round_unless_stalled_before() {
        fn a_minute() -> Option<crate::db::writes::Stalled> {
            Some(crate::db::writes::Stalled {
                waited: Duration::from_secs(60),
                at: std::panic::Location::caller(),
                holds: true,
            })
        }
        fn none() -> Option<crate::db::writes::Stalled> {
            None
        }
        let (now, s) = (Instant::now(), Duration::from_secs);
        let mut w = Writes {
            source: a_minute,
            forgiven: None,
            stalled: false,
        };
        assert_eq!(w.round(now).unwrap().waited, s(60));
        w.late(now);
        assert_eq!(w.round(now + s(2)).unwrap().waited, s(2));
        assert!(!stalled_now(Seen::Waiting(s(2)), false, true, s(30)));
        // Stalled (a minute without one ending, counted before the round that came late):
        // a late round does not clear it.
        let mut w = Writes {
            source: a_minute,
            forgiven: None,
            stalled: true,
        };
        w.late(now);
        let waited = w.round(now).unwrap().waited;
        assert_eq!(waited, s(60));
        assert!(stalled_now(Seen::Waiting(waited), true, true, s(30)));
        w.source = none;
        assert_eq!(w.round(now), None);
    }

    /// A runtime whose thread is blocked is seen waiting (its lag grows), one that runs is seen
    /// running, and one that has shut down is gone, not stalled.
    #[test]
    fn a_blocked_runtime_is_seen_waiting_and_a_shut_down_one_gone() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let mut w = Watched::new("test", rt.handle().clone());
        let t0 = Instant::now();
        assert_eq!(w.round(t0), Seen::Ran(Duration::ZERO), "no probe yet");
        // Nothing drives the runtime: the probe waits.
        let later = t0 + Duration::from_secs(5);
        assert_eq!(w.round(later), Seen::Waiting(Duration::from_secs(5)));
        // A round that came late restarts its clock (unless it had stalled before).
        let much_later = t0 + Duration::from_secs(100);
        w.late(much_later);
        assert_eq!(w.round(much_later), Seen::Waiting(Duration::ZERO));
        w.stalled = true;
        w.late(much_later + Duration::from_secs(100));
        assert_eq!(
            w.round(much_later + Duration::from_secs(100)),
            Seen::Waiting(Duration::from_secs(100))
        );
        // Driven, it runs, and the next one is sent.
        rt.block_on(tokio::task::yield_now());
        assert!(matches!(w.round(Instant::now()), Seen::Ran(_)));
        assert!(matches!(w.round(Instant::now()), Seen::Waiting(_)));
        drop(rt);
        assert_eq!(w.round(Instant::now()), Seen::Gone);
        assert_eq!(w.round(Instant::now()), Seen::Gone, "and stays so");
    }
}
