//! narmesh-proto: the wire types narmesh speaks, and nothing else (no I/O runtime, no tokio).
//!
//! Every message is serde + postcard, versioned by [`PROTOCOL_VERSION`] and size-limited;
//! `PROTOCOL.md` beside this crate describes them in prose.
//! - [`frame`]: length-prefixed frames on the node's Unix socket (std-only helpers).
//! - [`hook`]: what `narmesh-hook` reports after a build.
//! - [`control`]: CLI <-> node requests (push, status) and the node's responses.

pub mod control;
pub mod frame;
pub mod hook;

/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u16 = 1;
