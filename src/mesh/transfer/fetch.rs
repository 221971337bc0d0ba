//! Fetching one NAR's bytes: every provider works through the plan's ranges at once, each group
//! checked against the NAR's leaves before it is written ([`super::super::ranges`] is the plan);
//! providers that speak only version 1 send the whole NAR from an offset instead. Every range
//! (and version 1 fetch) holds room of the node's `[mesh] fetch-memory` while it runs.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use iroh::EndpointId;

use super::super::peer::{PeerError, Source, next_piece};
use super::super::ranges::{Next, Ranges};
use super::super::ready::{Ready, flush};
use super::streak::{After, Streak};
use super::{Transfer, Transfers};
use crate::chunks::{GROUP, Leaves};
use crate::storage::PartialNar;

/// Providers a transfer uses at once.
const PROVIDERS_AT_ONCE: usize = 4;
/// Ranges each provider sends at once for a large NAR: while one range starts (a request, a
/// provider opening the NAR at an offset) or is written, the other's bytes still flow.
const RANGES_PER_PROVIDER: usize = 2;
/// How long a provider may take to send one chunk group of a range (16 KiB: at least 800
/// bytes a second); one slower fails the range, which the plan gives to others meanwhile.
const GROUP_STALL: Duration = Duration::from_secs(20);
/// NARs from this size on have several ranges of each provider in flight; a smaller one is
/// over before that pays, and would take more of its providers' serving slots.
const OVERLAP_FROM: u64 = 32 << 20;
impl Transfers {
    /// Fetch every range, from every provider at once.
    pub(super) async fn ranges(
        self: &Arc<Self>,
        t: &Arc<Transfer>,
        leaves: Arc<Leaves>,
        partial: &Arc<PartialNar>,
        providers: &[EndpointId],
    ) -> Result<Arc<Leaves>, String> {
        let per_provider = if t.size >= OVERLAP_FROM {
            RANGES_PER_PROVIDER
        } else {
            1
        };
        let plan = Arc::new(Mutex::new(Ranges::new(
            t.size,
            providers.len() * per_provider,
        )));
        let returned = Arc::new(tokio::sync::Notify::new());
        let mut workers = tokio::task::JoinSet::new();
        // Providers avoided lately only if there is nobody else.
        let fresh: Vec<EndpointId> = providers
            .iter()
            .filter(|p| !self.avoided(p))
            .copied()
            .collect();
        let chosen = if fresh.is_empty() {
            providers.to_vec()
        } else {
            fresh
        };
        let workers_of = chosen
            .into_iter()
            .take(PROVIDERS_AT_ONCE)
            .flat_map(|p| std::iter::repeat_n(p, per_provider));
        for p in workers_of {
            let (this, t, leaves, partial, plan, returned) = (
                self.clone(),
                t.clone(),
                leaves.clone(),
                partial.clone(),
                plan.clone(),
                returned.clone(),
            );
            workers.spawn(async move {
                this.worker(p, &t, &leaves, &partial, &plan, &returned)
                    .await;
                // A worker leaving may leave the others waiting for a range that will not come.
                returned.notify_waiters();
            });
        }
        // Once every byte is in, a worker still inside a range that others took over (from a
        // provider too slow to be waited for) is not waited for: dropped, it stops.
        loop {
            tokio::select! {
                joined = workers.join_next() => {
                    if joined.is_none() {
                        break;
                    }
                }
                _ = returned.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            if plan.lock().unwrap_or_else(|p| p.into_inner()).complete() {
                break;
            }
        }
        drop(workers);
        let done = plan.lock().unwrap_or_else(|p| p.into_inner()).complete();
        if done {
            Ok(leaves)
        } else {
            Err("no provider could send the whole NAR".into())
        }
    }

    /// Room for one range's buffers in `[mesh] fetch-memory`, counted in `narmesh_mesh_ranges`
    /// while held (`None`: the node is stopping).
    async fn room(&self) -> Option<(tokio::sync::SemaphorePermit<'_>, crate::metrics::Counted)> {
        let permit = self.memory.range().await?;
        Some((
            permit,
            crate::metrics::Counted::new(&self.metrics.mesh_ranges),
        ))
    }

    /// One provider works through the ranges until none is left or it fails.
    async fn worker(
        &self,
        peer: EndpointId,
        t: &Transfer,
        leaves: &Leaves,
        partial: &PartialNar,
        plan: &Mutex<Ranges>,
        returned: &tokio::sync::Notify,
    ) {
        let mut streak = Streak::default();
        loop {
            // A range is taken from the plan only with room for its buffers ([mesh]
            // fetch-memory), so none sits claimed while it waits.
            let Some(room) = self.room().await else {
                return;
            };
            let next = plan
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .next(Instant::now());
            let (id, start, end) = match next {
                Next::Range { id, start, end } => (id, start, end),
                Next::Done => return,
                Next::Wait => {
                    drop(room);
                    // Another provider's range may come back if it fails: stay to take it.
                    tokio::select! {
                        _ = returned.notified() => {}
                        _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                    }
                    continue;
                }
            };
            let (mut got, mut bulk) = (start, false);
            let res = self
                .pull_range(
                    peer,
                    t,
                    leaves,
                    partial,
                    (id, start, end),
                    plan,
                    (&mut got, &mut bulk),
                )
                .await;
            drop(room);
            self.fetched_from(peer, got - start);
            if bulk {
                self.metrics.mesh_bulk_bytes.inc_by(got - start);
            }
            {
                let mut p = plan.lock().unwrap_or_else(|p| p.into_inner());
                p.finished(id, start, got);
                t.advance(p.prefix());
            }
            returned.notify_waiters();
            if let Err(e) = &res {
                tracing::debug!("mesh: range from {peer}: {e}");
            }
            if matches!(res, Err(PeerError::NotFound)) {
                self.lacks(peer, t.blake3).await;
            }
            match streak.after(&res) {
                After::Next => {}
                After::Wait(d) => tokio::time::sleep(d).await,
                After::Leave => return,
                After::OnlyV1 => {
                    // Cannot serve ranges: the others will, or it sends the whole NAR later.
                    self.only_v1
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(t.blake3);
                    return;
                }
                After::Avoid => {
                    let e = res.err().map(|e| e.to_string()).unwrap_or_default();
                    let hash = crate::storage::hex(&t.blake3);
                    self.avoid(peer, &format!("fetching {hash}: {e}"));
                    return;
                }
            }
        }
    }

    /// Fetch range `id` (`start..end`) from `peer`, writing each verified group; `got` tracks
    /// how far (and whether it came over the bulk channel). Stops early, with what it has,
    /// where the plan says another provider took the rest.
    #[allow(clippy::too_many_arguments)]
    async fn pull_range(
        &self,
        peer: EndpointId,
        t: &Transfer,
        leaves: &Leaves,
        partial: &PartialNar,
        (id, start, end): (u64, u64, u64),
        plan: &Mutex<Ranges>,
        (got, used_bulk): (&mut u64, &mut bool),
    ) -> Result<(), PeerError> {
        let mut recv = match self.bulk_source(peer, t.blake3, start, end).await {
            Some(src) => src,
            None => Source::Quic(self.pool.range(peer, t.blake3, start, end).await?),
        };
        let mut bulk = matches!(recv, Source::Tcp(..));
        *used_bulk = bulk;
        let mut group = BytesMut::with_capacity(GROUP as usize);
        let mut ready = Ready::default();
        let mut pos = start;
        // When the last group was complete: each read has its own deadline, but a provider
        // that sends a byte now and then must still finish a group in time.
        let mut grouped = Instant::now();
        while pos < end {
            if grouped.elapsed() > GROUP_STALL {
                flush(partial, &mut ready, got).await?;
                return Err(PeerError::Timeout("a chunk group took too long"));
            }
            let piece = match recv.piece(1 << 20).await {
                Ok(Some(p)) => p,
                // A bulk connection closed before its first byte: the provider had no serving
                // place (it sends nothing then), or no longer knows the ticket. Ask QUIC for
                // the range now, which answers `Busy` in words.
                Ok(None) | Err(_) if bulk && pos == start && group.is_empty() => {
                    self.forget_ticket(&(peer, t.blake3));
                    recv = Source::Quic(self.pool.range(peer, t.blake3, start, end).await?);
                    (bulk, *used_bulk) = (false, false);
                    continue;
                }
                // A bulk channel that ends early or breaks (a ticket the provider no longer
                // knows, a restart) is not a lie: QUIC with that provider from here.
                Ok(None) | Err(_) if bulk => {
                    flush(partial, &mut ready, got).await?;
                    self.no_bulk_for(peer, &(peer, t.blake3), "the bulk range broke off");
                    return Err(PeerError::Stream("bulk range broke off".into()));
                }
                Ok(None) => return Err(PeerError::Protocol("range ended early".into())),
                Err(e) => return Err(e),
            };
            if pos + group.len() as u64 + piece.len() as u64 > end {
                return Err(PeerError::Protocol("sent more than asked".into()));
            }
            let mut off = 0;
            while off < piece.len() {
                let g = pos / GROUP;
                let want = crate::chunks::group_range(t.size, g);
                let len = (want.end - want.start) as usize;
                // A group wholly in this piece is checked where it lies and written from there;
                // one across pieces is gathered first.
                let gathered;
                let span = if group.is_empty() && piece.len() - off >= len {
                    off += len;
                    gathered = None;
                    off - len..off
                } else {
                    let n = (len - group.len()).min(piece.len() - off);
                    group.extend_from_slice(&piece[off..off + n]);
                    off += n;
                    if group.len() < len {
                        continue;
                    }
                    gathered = Some(group.split().freeze());
                    0..len
                };
                let bytes = gathered.as_ref().unwrap_or(&piece);
                if !leaves.check(g, &bytes[span.clone()]) {
                    flush(partial, &mut ready, got).await?;
                    return Err(PeerError::Protocol(format!(
                        "chunk group {g} does not match the NAR's BLAKE3"
                    )));
                }
                let mine = plan.lock().unwrap_or_else(|p| p.into_inner()).progress(
                    id,
                    want.end,
                    Instant::now(),
                );
                if !mine {
                    return flush(partial, &mut ready, got).await;
                }
                ready.push(bytes, span);
                pos = want.end;
                grouped = Instant::now();
                if ready.len >= 1 << 20 {
                    flush(partial, &mut ready, got).await?;
                    // Readers (and the sha256) may go on up to here.
                    let prefix = {
                        let mut p = plan.lock().unwrap_or_else(|p| p.into_inner());
                        p.written(id, start, *got);
                        p.prefix()
                    };
                    t.advance(prefix);
                }
            }
        }
        flush(partial, &mut ready, got).await
    }

    /// Version 1 providers: the whole NAR, in order, from one provider after another (resuming
    /// where the last stopped); checked when complete.
    pub(super) async fn whole_v1(
        &self,
        t: &Arc<Transfer>,
        partial: &Arc<PartialNar>,
        providers: &[EndpointId],
    ) -> Result<Arc<Leaves>, String> {
        let mut got = 0u64;
        for p in providers {
            for _ in 0..3 {
                let before = got;
                let Some(_room) = self.room().await else {
                    return Err("the node is stopping".into());
                };
                let res = async {
                    let mut recv = self.pool.v1_from(*p, t.blake3, got, t.size).await?;
                    let mut ready = Ready::default();
                    while got + (ready.len as u64) < t.size {
                        let Some(piece) = next_piece(&mut recv, 1 << 20).await? else {
                            break;
                        };
                        if got + (ready.len + piece.len()) as u64 > t.size {
                            return Err(PeerError::Protocol("sent more than the NAR".into()));
                        }
                        let n = piece.len();
                        ready.push(&piece, 0..n);
                        if ready.len >= 1 << 20 {
                            flush(partial, &mut ready, &mut got).await?;
                            t.advance(got);
                        }
                    }
                    flush(partial, &mut ready, &mut got).await?;
                    t.advance(got);
                    Ok::<_, PeerError>(())
                }
                .await;
                // Checked only once whole (version 1), but a bad NAR fails the transfer.
                self.fetched_from(*p, got - before);
                if got == t.size {
                    break;
                }
                if let Err(e) = res {
                    tracing::debug!("mesh: version 1 fetch from {p}: {e}");
                }
                if got == before {
                    break;
                }
            }
            if got == t.size {
                break;
            }
        }
        if got != t.size {
            return Err("no provider sent the whole NAR".into());
        }
        let file = partial.file();
        let size = t.size;
        let leaves = tokio::task::spawn_blocking(move || super::check::leaves_of(&file, size))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        if leaves.root() != t.blake3 {
            for p in providers {
                self.avoid(*p, "sent a NAR that does not match its BLAKE3");
            }
            return Err("the NAR from version 1 providers does not match its BLAKE3".into());
        }
        Ok(Arc::new(leaves))
    }
}
