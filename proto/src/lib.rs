//! narmesh-proto: the wire types narmesh speaks, and nothing else (no I/O, no tokio).
//!
//! Every message is serde + postcard, versioned by [`PROTOCOL_VERSION`] and size-limited;
//! `PROTOCOL.md` beside this crate describes them in prose.

/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u16 = 1;
