//! The opt-in bulk channel's tickets: asked of a provider over the mesh connection, kept while
//! good, and dropped (QUIC with that provider for a while) when its channel fails.

use std::time::{Duration, Instant};

use iroh::EndpointId;

use super::super::peer::{Pool, Source};
use super::{AVOID_FOR, Transfers};

/// A bulk ticket in hand: the provider's TCP address, the token, good until.
pub(super) type HeldTicket = (std::net::SocketAddr, [u8; 32], Instant);

/// How long a bulk ticket is used (the provider keeps it 60 s).
const TICKET_USE: Duration = Duration::from_secs(45);

impl Transfers {
    /// Range `start..end` of `blake3` from `peer`'s bulk channel, if both sides use one and it
    /// answers; else `None` (QUIC, and no bulk with that peer for a while).
    pub(super) async fn bulk_source(
        &self,
        peer: EndpointId,
        blake3: [u8; 32],
        start: u64,
        end: u64,
    ) -> Option<Source> {
        if !self.bulk {
            return None;
        }
        let now = Instant::now();
        {
            let mut no = self.no_bulk.lock().unwrap_or_else(|p| p.into_inner());
            match no.get(&peer) {
                Some(t) if t.elapsed() < AVOID_FOR => return None,
                Some(_) => {
                    no.remove(&peer);
                }
                None => {}
            }
        }
        let key = (peer, blake3);
        let cached = self
            .tickets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .filter(|x| x.2 > now)
            .map(|x| (x.0, x.1));
        let ticket = match cached {
            Some(t) => Ok(t),
            None => {
                // Good for TICKET_USE from now (before the ask), not from each use: the
                // provider keeps it 60 s from when it issued it.
                let t = self.pool.bulk_ticket(peer, blake3).await;
                if let Ok((addr, token)) = t {
                    let mut tickets = self.tickets.lock().unwrap_or_else(|p| p.into_inner());
                    tickets.retain(|_, x| x.2 > now);
                    tickets.insert(key, (addr, token, now + TICKET_USE));
                }
                t
            }
        };
        let res = match ticket {
            Ok((addr, token)) => Pool::bulk_range(addr, token, start, end).await,
            Err(e) => Err(e),
        };
        match res {
            Ok(src) => Some(src),
            Err(e) => {
                self.no_bulk_for(peer, &key, &e.to_string());
                None
            }
        }
    }

    /// The ticket for `key` may be stale: the next range asks for one (a provider that knows
    /// it gives the same again).
    pub(super) fn forget_ticket(&self, key: &(EndpointId, [u8; 32])) {
        self.tickets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
    }

    /// `peer`'s bulk channel failed: QUIC with it for a while.
    pub(super) fn no_bulk_for(&self, peer: EndpointId, key: &(EndpointId, [u8; 32]), why: &str) {
        tracing::debug!("mesh: bulk channel of {peer}: {why}; QUIC for {AVOID_FOR:?}");
        self.tickets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
        self.no_bulk
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(peer, Instant::now());
    }
}
