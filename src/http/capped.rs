//! A listener that serves at most a fixed number of connections at once: past that, new
//! connections wait in the kernel's backlog instead of costing the node memory and tasks (as
//! mini-redis caps its accept loop). Each accepted connection holds a permit until it closes,
//! and is closed once it has gone `idle` without a byte read or written (an idle keep-alive, a
//! client that stopped reading, also an answer still waiting for its NAR's bytes from peers:
//! hyper keeps reading for the client's close meanwhile), so idle clients cannot hold every
//! slot.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use std::future::Future as _;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// HTTP connections served at once.
pub const MAX_CONNECTIONS: usize = 1024;

/// The first wait after a failed accept.
const ACCEPT_WAIT: Duration = Duration::from_millis(50);

/// A TCP listener with a connection cap.
pub struct Capped {
    listener: TcpListener,
    slots: Arc<Semaphore>,
    idle: Duration,
    /// Every connection is watched by the thread's busy-poll.
    spin: Arc<super::spin::Spin>,
    /// A failing accept (out of file descriptors, say) is logged once a second, and waited
    /// out longer each time (up to 1 s).
    failing: (crate::logging::EverySecond, Duration),
}

impl Capped {
    pub fn new(
        listener: TcpListener,
        max: usize,
        idle: Duration,
        spin: Arc<super::spin::Spin>,
    ) -> Self {
        Capped {
            listener,
            spin,
            idle,
            slots: Arc::new(Semaphore::new(max)),
            failing: (Default::default(), ACCEPT_WAIT),
        }
    }
}

/// An accepted connection, the permit it holds, and its idle deadline.
pub struct CappedStream {
    stream: TcpStream,
    _permit: OwnedSemaphorePermit,
    idle: Duration,
    /// The last byte read or written.
    last: Instant,
    /// Armed while a read or a write waits; moved on lazily (activity only notes `last`).
    deadline: Pin<Box<tokio::time::Sleep>>,
}

impl CappedStream {
    /// A read or a write cannot go on now: an error once the connection has been idle too
    /// long, else pending (woken by the stream or by the deadline).
    fn idle_check(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        loop {
            if self.deadline.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let due = self.last + self.idle;
            if Instant::now() >= due {
                return Poll::Ready(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the connection was idle too long",
                ));
            }
            self.deadline.as_mut().reset(due.into());
        }
    }

    /// A write's outcome: bytes written note activity; a write that cannot go on now waits
    /// under the idle deadline.
    fn wrote(
        &mut self,
        r: Poll<io::Result<usize>>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<usize>> {
        match r {
            Poll::Ready(r) => {
                if matches!(r, Ok(n) if n > 0) {
                    self.last = Instant::now();
                }
                Poll::Ready(r)
            }
            Poll::Pending => self.idle_check(cx).map(Err),
        }
    }
}

impl Capped {
    /// The next connection, once a slot is free (errors accepting are logged and waited out).
    pub async fn accept(&mut self) -> (CappedStream, std::net::SocketAddr) {
        loop {
            let Ok(permit) = self.slots.clone().acquire_owned().await else {
                // The semaphore is never closed; wait forever rather than spin.
                std::future::pending::<()>().await;
                continue;
            };
            match self.listener.accept().await {
                Ok((stream, addr)) => {
                    self.failing.1 = ACCEPT_WAIT;
                    if let Err(e) = stream.set_nodelay(true) {
                        tracing::debug!("TCP_NODELAY: {e}");
                    }
                    self.spin.watch(std::os::fd::AsFd::as_fd(&stream));
                    let last = Instant::now();
                    return (
                        CappedStream {
                            stream,
                            _permit: permit,
                            idle: self.idle,
                            last,
                            deadline: Box::pin(tokio::time::sleep_until((last + self.idle).into())),
                        },
                        addr,
                    );
                }
                Err(e) => {
                    if let Some(n) = self.failing.0.allow() {
                        tracing::warn!("http accept failed: {e} ({n} more meanwhile)");
                    }
                    tokio::time::sleep(self.failing.1).await;
                    self.failing.1 = (self.failing.1 * 2).min(Duration::from_secs(1));
                }
            }
        }
    }
}

impl AsyncRead for CappedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.stream).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    self.last = Instant::now();
                }
                Poll::Ready(r)
            }
            Poll::Pending => self.idle_check(cx).map(Err),
        }
    }
}

impl AsyncWrite for CappedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.wrote(r, cx)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.wrote(r, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}
