//! narmesh-proto: the wire types narmesh speaks, and nothing else (no I/O runtime, no tokio).
//!
//! Every message is serde + postcard, versioned by [`PROTOCOL_VERSION`] and size-limited;
//! `PROTOCOL.md` beside this crate describes them in prose.
//! - [`frame`]: length-prefixed frames on the node's Unix socket (std-only helpers).
//! - [`hook`]: what `narmesh-hook` reports after a build.
//! - [`control`]: CLI <-> node requests (push, status) and the node's responses.
//! - [`gossip`]: path announcements on the cluster's gossip topic.
//! - [`sync`]: catch-up (log since cursor) and NAR transfer between peers.

pub mod control;
pub mod frame;
pub mod gossip;
pub mod hook;
pub mod sync;

/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u16 = 1;
