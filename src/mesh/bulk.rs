//! The opt-in bulk channel (`[mesh] bulk-listen`): NAR ranges over plain TCP, where QUIC's
//! per-packet work (1,200-byte datagrams, each encrypted and acknowledged) costs more CPU than
//! the link is worth. A peer asks for a ticket over its authenticated mesh connection
//! (`narmesh/bulk/1`), then connects over TCP with the ticket's token and a range, and gets
//! exactly the range's bytes; the fetcher checks every chunk group against the bound BLAKE3 as
//! it does on QUIC. The bytes cross the link unencrypted. Tickets are random, one per peer and
//! NAR, redeemable only from the IP address the asking connection came from, good for
//! [`TICKET_FOR`], at most [`MAX_TICKETS`] out ([`TICKETS_PER_PEER`] to one peer); the
//! streams served count as the peer's on the QUIC side do; a connection must send its header
//! within [`HEADER_WITHIN`], at most [`CONNECTIONS`] at once and [`HEADERLESS_PER_HOST`] from
//! one host before their header is in; anything wrong closes it, and
//! what is the client's doing (a bad header, an unknown token, too many connections) is
//! counted and logged at most once a second. A ticket connection with no ask for
//! [`IDLE`](super::endpoint::IDLE) is let go.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use iroh::EndpointId;
use iroh::endpoint::Connection;
use iroh::protocol::{AcceptError, ProtocolHandler};
use narmesh_proto::sync::{BulkAsk, BulkHeader, BulkReply};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_util::sync::CancellationToken;

use super::endpoint::{PeerSlot, PeerSlots, next_stream};
use super::nar::NarServer;
use super::wire;
use crate::chunks::GROUP;

/// How long a ticket is good for.
pub const TICKET_FOR: Duration = Duration::from_secs(60);
/// Tickets out at once; more get `Busy`.
pub const MAX_TICKETS: usize = 4096;
/// Tickets out to one peer at once: one per NAR it fetches over the bulk channel (asked
/// again for a NAR, the peer gets the same ticket, good for longer).
pub const TICKETS_PER_PEER: usize = MAX_TICKETS / 8;
/// A bulk connection's header must arrive within this.
pub const HEADER_WITHIN: Duration = Duration::from_secs(10);
/// Bulk connections at once; more are closed at once.
pub const CONNECTIONS: usize = 64;
/// Bulk connections from one host (an IPv4 address, an IPv6 /64) that have not sent their
/// header yet: more are closed at once, so a host that connects and says nothing holds a
/// quarter of [`CONNECTIONS`] at most (a peer's own connections send their header at once).
pub const HEADERLESS_PER_HOST: usize = CONNECTIONS / 4;
/// A request for a ticket must arrive within this.
const REQUEST: Duration = Duration::from_secs(10);
/// A peer that takes no data for this long is dropped.
const WRITE_STALL: Duration = Duration::from_secs(20);

#[derive(Debug)]
struct Ticket {
    blake3: [u8; 32],
    until: Instant,
    /// The address the mesh connection that asked came from, when known: only it may redeem.
    from: Option<IpAddr>,
    /// The peer that asked.
    peer: EndpointId,
}

/// The tickets out: token -> the NAR it is good for, until when.
#[derive(Debug, Default)]
struct Tickets(Mutex<HashMap<[u8; 32], Ticket>>);

impl Tickets {
    /// A new ticket for `blake3` at `now`, for `peer` at `from`, or `None` if too many are out
    /// (to all peers, or to this one).
    fn issue(
        &self,
        blake3: [u8; 32],
        from: Option<IpAddr>,
        peer: EndpointId,
        now: Instant,
    ) -> Option<[u8; 32]> {
        let from = from.map(|ip| ip.to_canonical());
        let mut t = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((token, ticket)) = t
            .iter_mut()
            .find(|(_, x)| x.peer == peer && x.blake3 == blake3 && x.from == from && x.until > now)
        {
            ticket.until = now + TICKET_FOR;
            return Some(*token);
        }
        let mut token = [0u8; 32];
        getrandom::fill(&mut token).ok()?;
        let full = |t: &HashMap<[u8; 32], Ticket>| {
            t.len() >= MAX_TICKETS
                || t.values().filter(|x| x.peer == peer).count() >= TICKETS_PER_PEER
        };
        if full(&t) {
            t.retain(|_, x| x.until > now);
            if full(&t) {
                return None;
            }
        }
        t.insert(
            token,
            Ticket {
                blake3,
                until: now + TICKET_FOR,
                from,
                peer,
            },
        );
        Some(token)
    }

    /// The NAR a token is good for at `now`, to a connection from `by`, and the peer it was
    /// issued to.
    fn redeem(&self, token: &[u8; 32], by: IpAddr, now: Instant) -> Option<([u8; 32], EndpointId)> {
        let t = self.0.lock().unwrap_or_else(|p| p.into_inner());
        t.get(token)
            .filter(|x| x.until > now && x.from.is_none_or(|ip| ip == by.to_canonical()))
            .map(|x| (x.blake3, x.peer))
    }
}

/// Hands out tickets (an iroh protocol) and serves the TCP side.
#[derive(Debug, Clone)]
pub struct BulkServer {
    /// The TCP port tickets name.
    pub port: u16,
    /// What serves the bytes: the same storage, slots, pacer and metrics as the QUIC side.
    pub nar: NarServer,
    tickets: Arc<Tickets>,
}

impl BulkServer {
    pub fn new(port: u16, nar: NarServer) -> Self {
        BulkServer {
            port,
            nar,
            tickets: Default::default(),
        }
    }

    /// Accept bulk connections on `listener` until cancelled.
    pub async fn serve_tcp(self, listener: tokio::net::TcpListener, cancel: CancellationToken) {
        let conns = Arc::new(tokio::sync::Semaphore::new(CONNECTIONS));
        let headerless = PeerSlots::<IpAddr>::new(HEADERLESS_PER_HOST);
        loop {
            let accepted = tokio::select! {
                _ = cancel.cancelled() => return,
                a = listener.accept() => a,
            };
            let (stream, from) = match accepted {
                Ok(x) => x,
                Err(e) => {
                    tracing::debug!("mesh bulk: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Some(unheard) = headerless.take(host_of(from.ip())) else {
                self.nar.per_peer.too_many_bulk(
                    from,
                    HEADERLESS_PER_HOST,
                    "without a header from that host",
                );
                continue;
            };
            let Ok(permit) = conns.clone().try_acquire_owned() else {
                self.nar.per_peer.too_many_bulk(from, CONNECTIONS, "open");
                continue;
            };
            let this = self.clone();
            tokio::spawn(async move {
                match this.serve_conn(stream, unheard).await {
                    Ok(()) => {}
                    Err(Ended::Bad(reason, why)) => {
                        this.nar.per_peer.bad_bulk_header(from, reason, &why)
                    }
                    Err(Ended::Other(e)) => tracing::debug!("mesh bulk: {from}: {e}"),
                }
                drop(permit);
            });
        }
    }

    /// Serve one connection; `unheard` is its place among its host's connections without
    /// a header, given back once the header is in.
    async fn serve_conn(
        &self,
        mut stream: tokio::net::TcpStream,
        unheard: PeerSlot<IpAddr>,
    ) -> Result<(), Ended> {
        let bad = |why: String| Ended::Bad("bad-request", why);
        let mut head = [0u8; BulkHeader::LEN];
        let mut got = 0;
        let read = async {
            while got < head.len() {
                match stream.read(&mut head[got..]).await? {
                    0 => break,
                    n => got += n,
                }
            }
            Ok::<_, std::io::Error>(got)
        };
        match tokio::time::timeout(HEADER_WITHIN, read).await {
            Err(_) => return Err(bad("no header in time".into())),
            Ok(Err(e)) => return Err(format!("reading the header: {e}").into()),
            // A fetch given up before it asked (as on QUIC, a stream that breaks off).
            Ok(Ok(0)) => return Err("closed before its header".into()),
            Ok(Ok(n)) if n < BulkHeader::LEN => return Err(bad("a header cut short".into())),
            Ok(Ok(_)) => {}
        }
        drop(unheard);
        let h = BulkHeader::decode(&head).ok_or_else(|| bad("not a bulk header".into()))?;
        let by = stream.peer_addr().map_err(|e| e.to_string())?.ip();
        let (blake3, peer) = self
            .tickets
            .redeem(&h.token, by, Instant::now())
            .ok_or_else(|| {
                Ended::Bad(
                    "unknown-ticket",
                    "a token this node does not know from that address".into(),
                )
            })?;
        let (held, size) = self
            .nar
            .held(&blake3)
            .await
            .ok()
            .flatten()
            .ok_or("not held here")?;
        let end = h.end.min(size);
        let aligned = h.start % GROUP == 0 && (end % GROUP == 0 || end == size);
        if h.start >= end || !aligned {
            return Err(bad(format!(
                "bad range {}..{} of {size} bytes",
                h.start, h.end
            )));
        }
        let Some(_slot) = self.nar.slot(peer) else {
            return Err("busy".into());
        };
        let _ = stream.set_nodelay(true);
        let mut data = self
            .nar
            .storage
            .read(&blake3, h.start, end)
            .await
            .map_err(|e| e.to_string())?;
        let counter = self.nar.counter(&held);
        while let Some(piece) = data.recv().await {
            let piece = piece.map_err(|e| e.to_string())?;
            if let Some(p) = &self.nar.pacer {
                p.take(piece.len() as u64).await;
            }
            counter.inc_by(piece.len() as u64);
            tokio::time::timeout(WRITE_STALL, stream.write_all(&piece))
                .await
                .map_err(|_| "the peer stopped taking data".to_owned())?
                .map_err(|e| e.to_string())?;
        }
        let _ = stream.shutdown().await;
        Ok(())
    }
}

/// The host an address belongs to, for [`HEADERLESS_PER_HOST`]: an IPv4 address, or an IPv6
/// address's /64 (a host usually has the whole /64 to pick addresses from).
fn host_of(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(std::net::Ipv6Addr::from(prefix))
        }
        v4 => v4,
    }
}

/// Why a bulk TCP connection ended before all its bytes were sent.
#[derive(Debug)]
enum Ended {
    /// Refused for what the client sent: counted under the reason, logged at most once a
    /// second.
    Bad(&'static str, String),
    /// Not held, busy, given up before a byte, or the link broke: logged at debug level.
    Other(String),
}

impl From<String> for Ended {
    fn from(e: String) -> Self {
        Ended::Other(e)
    }
}

impl From<&str> for Ended {
    fn from(e: &str) -> Self {
        Ended::Other(e.to_owned())
    }
}

fn user(e: impl std::fmt::Display) -> AcceptError {
    AcceptError::from_err(std::io::Error::other(e.to_string()))
}

impl ProtocolHandler for BulkServer {
    async fn accept(&self, conn: Connection) -> Result<(), AcceptError> {
        let Some(_slot) = self.nar.per_peer.take(&conn) else {
            return Ok(());
        };
        loop {
            let Some((mut send, mut recv)) = next_stream(&conn).await else {
                break;
            };
            let ask: BulkAsk =
                match tokio::time::timeout(REQUEST, wire::read_request(&mut recv)).await {
                    Ok(Ok(a)) => a,
                    Ok(Err(e)) if wire::broke_off(&e) => continue,
                    _ => {
                        self.nar.per_peer.bad_request(&conn, "bulk");
                        return Ok(());
                    }
                };
            let held = self.nar.held(&ask.blake3).await;
            let reply = if matches!(held, Ok(None)) {
                BulkReply::NotFound
            } else if held.is_err() {
                // Its own failure, not the NAR's absence: the QUIC ranges say which.
                BulkReply::Busy
            } else {
                let from = super::endpoint::remote_ip(&conn);
                match self
                    .tickets
                    .issue(ask.blake3, from, conn.remote_id(), Instant::now())
                {
                    Some(token) => BulkReply::Ticket {
                        port: self.port,
                        token,
                        valid_ms: TICKET_FOR.as_millis() as u64,
                    },
                    None => BulkReply::Busy,
                }
            };
            tokio::time::timeout(REQUEST, wire::write(&mut send, &reply))
                .await
                .map_err(user)?
                .map_err(user)?;
            send.finish().map_err(user)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_is_an_ipv4_address_or_an_ipv6_slash_64() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(host_of(ip("10.0.0.2")), ip("10.0.0.2"));
        assert_eq!(host_of(ip("::ffff:10.0.0.2")), ip("10.0.0.2"));
        assert_eq!(host_of(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        assert_eq!(
            host_of(ip("2001:db8:1:2:ffff:ffff:ffff:ffff")),
            host_of(ip("2001:db8:1:2::7"))
        );
        assert_ne!(
            host_of(ip("2001:db8:1:3::7")),
            host_of(ip("2001:db8:1:2::7"))
        );
    }

    #[test]
    fn tickets_are_capped_and_expire() {
        let s = Tickets::default();
        let now = Instant::now();
        let peer: IpAddr = "10.0.0.2".parse().unwrap();
        let id = |n: u8| iroh::SecretKey::from_bytes(&[n; 32]).public();
        let t = s.issue([7; 32], Some(peer), id(1), now).unwrap();
        assert_eq!(s.redeem(&t, peer, now), Some(([7; 32], id(1))));
        let mapped: IpAddr = "::ffff:10.0.0.2".parse().unwrap();
        assert_eq!(
            s.redeem(&t, mapped, now),
            Some(([7; 32], id(1))),
            "the same address"
        );
        let other: IpAddr = "10.0.0.3".parse().unwrap();
        assert_eq!(
            s.redeem(&t, other, now),
            None,
            "only from where it was asked"
        );
        assert_eq!(
            s.redeem(&[0; 32], peer, now),
            None,
            "a guessed token is nothing"
        );
        // Asked again for the same NAR, a peer gets the same ticket, good for longer.
        let a_bit_later = now + TICKET_FOR / 2;
        assert_eq!(s.issue([7; 32], Some(peer), id(1), a_bit_later), Some(t));
        assert_eq!(
            s.redeem(&t, peer, now + TICKET_FOR),
            Some(([7; 32], id(1))),
            "good for longer"
        );
        // One peer gets its share, one ticket per NAR; the others theirs, up to the cap of all.
        let nar = |i: usize| {
            let mut b = [0u8; 32];
            b[..8].copy_from_slice(&(i as u64).to_le_bytes());
            b
        };
        for i in 1..TICKETS_PER_PEER {
            s.issue(nar(i), None, id(1), now).unwrap();
        }
        assert!(
            s.issue(nar(0), None, id(1), now).is_none(),
            "capped per peer"
        );
        let mut n = TICKETS_PER_PEER;
        for p in 2.. {
            if n == MAX_TICKETS {
                break;
            }
            for i in 0..TICKETS_PER_PEER {
                s.issue(nar(i), None, id(p), now).unwrap();
                n += 1;
            }
        }
        assert!(s.issue(nar(0), None, id(99), now).is_none(), "capped");
        // Expired tickets redeem nothing and make room.
        let later = now + TICKET_FOR * 2;
        assert_eq!(s.redeem(&t, peer, later), None);
        assert!(s.issue(nar(0), None, id(1), later).is_some());
    }
}
