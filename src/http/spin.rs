//! A short busy-poll before the HTTP thread sleeps, right after it answered a request.
//!
//! On these hosts most of a one-connection round trip is not work but sleep and wake-up: the
//! thread sleeps in `epoll_wait`, and the client's next request must wake it on its CPU (an
//! inter-processor interrupt, costly in a VM). A Nix client asks narinfos one after another, so
//! the next question usually comes within microseconds. For a window after an answer
//! (`[http] busy-poll-us`, 50 by default, 0: off), the thread about to park first polls its
//! connections without sleeping; a request that arrives then is read at once. Idle, nothing
//! spins: the cost is bounded by the window per answer.
//!
//! It does not spin while a request waits for work on other threads (a store lookup, a NAR
//! answer from the main runtime): their wake-ups go to the runtime's own epoll, which the spin
//! does not see. Nor after a NAR answer, whose body comes from other threads. A watched
//! descriptor that stays readable unread (a pipelined request, a client that half-closed, the
//! listener at the connection cap) ends every spin at once, which only costs the speed-up.
//!
//! Owns a second epoll set (level-triggered, readable only) holding the listeners and the
//! connections; the kernel drops a connection from it when the connection closes.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rustix::event::{Timespec, epoll};

/// The busy-poll of one HTTP thread.
pub struct Spin {
    epoll: Option<OwnedFd>,
    window: Duration,
    base: Instant,
    /// Nanoseconds after `base` of the last answer (0: none yet).
    last: AtomicU64,
    /// Requests now waiting for work on other threads: no spinning meanwhile.
    waiting: AtomicUsize,
}

/// A request waiting for other threads; ends when dropped.
pub struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Spin {
    /// A busy-poll of `window` after each answer; it never spins if the epoll set cannot be
    /// made.
    pub fn new(window: Duration) -> Self {
        let epoll = epoll::create(epoll::CreateFlags::CLOEXEC)
            .inspect_err(|e| tracing::debug!("http busy-poll off: {e}"))
            .ok();
        Spin {
            epoll,
            window,
            base: Instant::now(),
            last: AtomicU64::new(0),
            waiting: AtomicUsize::new(0),
        }
    }

    /// Watch `fd` (a listener or a connection) for readability while spinning.
    pub fn watch(&self, fd: BorrowedFd<'_>) {
        if let Some(ep) = &self.epoll
            && let Err(e) = epoll::add(
                ep,
                fd,
                epoll::EventData::new_u64(0),
                epoll::EventFlags::IN | epoll::EventFlags::RDHUP,
            )
        {
            tracing::debug!("http busy-poll: {e}");
        }
    }

    /// A request is about to wait for other threads: no spinning until the guard goes.
    pub fn waiting(&self) -> Waiting<'_> {
        self.waiting.fetch_add(1, Ordering::Relaxed);
        Waiting(&self.waiting)
    }

    /// A request was just answered.
    pub fn answered(&self) {
        let now = self.base.elapsed().as_nanos() as u64;
        self.last.store(now.max(1), Ordering::Relaxed);
    }

    /// Called just before the thread parks: poll without sleeping until a watched descriptor
    /// is readable or the window has passed since the last answer.
    pub fn before_park(&self) {
        let Some(ep) = &self.epoll else { return };
        let last = self.last.load(Ordering::Relaxed);
        if last == 0 || self.waiting.load(Ordering::Relaxed) > 0 {
            return;
        }
        let until = last + self.window.as_nanos() as u64;
        let zero = Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        let mut events = [epoll::Event {
            flags: epoll::EventFlags::empty(),
            data: epoll::EventData::new_u64(0),
        }];
        while (self.base.elapsed().as_nanos() as u64) < until {
            match epoll::wait(ep.as_fd(), &mut events[..], Some(&zero)) {
                Ok(0) => std::hint::spin_loop(),
                _ => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    #[test]
    fn idle_it_does_not_spin_and_a_ready_socket_ends_the_spin() {
        // A long window, so that a slow or busy machine cannot blur the three cases.
        let window = Duration::from_secs(1);
        let spin = Spin::new(window);
        let t = Instant::now();
        spin.before_park();
        assert!(t.elapsed() < window / 2, "spun with no answer yet");

        let (mut a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        spin.watch(b.as_fd());
        spin.answered();
        let t = Instant::now();
        spin.before_park();
        let quiet = t.elapsed();
        assert!(
            quiet >= window / 2,
            "stopped after {quiet:?} with nothing to read"
        );

        spin.answered();
        let waiting = spin.waiting();
        let t = Instant::now();
        spin.before_park();
        assert!(t.elapsed() < window / 2, "spun while a request waited");
        drop(waiting);

        a.write_all(b"x").unwrap();
        spin.answered();
        let t = Instant::now();
        spin.before_park();
        assert!(
            t.elapsed() < window / 2,
            "kept spinning with a request waiting"
        );
    }
}
