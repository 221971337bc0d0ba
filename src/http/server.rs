//! The HTTP/1.1 connection loop: accepts from the capped listener and serves each connection
//! with hyper under the limits a hostile client meets. `axum::serve` has no way to set them:
//! - a request head must arrive whole within `idle` of the connection's start or its last
//!   answer, not just a byte every `idle` (a client dripping its head would hold a slot, and
//!   with it the local Nix's substitution, for good);
//! - a request head is at most [`MAX_HEAD`] bytes (hyper's default buffer is about 400 KiB, so
//!   a full house of clients sending huge heads would cost the node 400 MiB): past it the
//!   answer is 431 and the connection closes.
//!
//! Stopping (`cancel`): no new connections; those open finish their answer in flight and
//! close, and `run` returns once all have.

use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio_util::sync::CancellationToken;

use super::capped::Capped;

/// The largest request head read (hyper's floor is 8 KiB). Nix's requests are under 1 KiB.
pub const MAX_HEAD: usize = 64 * 1024;

/// Serve `app` on `listener` until cancelled and every connection has closed.
pub async fn run(
    mut listener: Capped,
    app: axum::Router,
    head_deadline: Duration,
    cancel: CancellationToken,
) {
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1
        .timer(TokioTimer::new())
        .header_read_timeout(head_deadline)
        .max_header_size(MAX_HEAD)
        // What one connection reads ahead (hyper refills its write buffer only below this too;
        // NAR answers come in pieces of up to 1 MiB, each written whole).
        .max_buf_size(MAX_HEAD)
        .keep_alive(true);
    let conns = tokio_util::task::TaskTracker::new();
    loop {
        let io = tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            (io, _) = listener.accept() => io,
        };
        let (conn, cancel) = (
            http1.serve_connection(TokioIo::new(io), TowerToHyperService::new(app.clone())),
            cancel.clone(),
        );
        conns.spawn(async move {
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => return closed(r),
                _ = cancel.cancelled() => {}
            }
            conn.as_mut().graceful_shutdown();
            closed(conn.await);
        });
    }
    // No new connections while those open finish: refused, not left hanging in the backlog.
    drop(listener);
    conns.close();
    conns.wait().await;
}

/// A connection's end: errors are the client's (gone, too slow, too large), logged at debug.
fn closed(r: Result<(), hyper::Error>) {
    if let Err(e) = r {
        tracing::debug!("http connection: {e}");
    }
}
