//! narmesh-proto: the wire types narmesh speaks, and nothing else (no I/O runtime, no tokio).
//!
//! Every message is serde + postcard, versioned ([`HOOK_PROTOCOL_VERSION`] on the socket, [`MESH_PROTOCOL_VERSION`] between nodes) and size-limited;
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

/// Version of the node's Unix-socket protocol ([`control`] envelopes, [`hook`] reports). It
/// moves on its own, apart from the mesh's: a node accepts every earlier version of it, so a
/// hook of an older release that is still running keeps being heard during an upgrade.
pub const HOOK_PROTOCOL_VERSION: u16 = 1;

/// Version of the mesh protocol ([`gossip`] announcements, [`sync`] catch-up and NAR transfer).
pub const MESH_PROTOCOL_VERSION: u16 = 1;
