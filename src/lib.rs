//! narmesh: every Nix build host shares what it builds, at once, without slowing the build.
//!
//! # Architecture
//! Data flows one way: the post-build hook hands built paths to the local node over a Unix
//! socket; the node queues them durably, serializes each to a NAR, hashes it (sha256 for Nix,
//! BLAKE3 for content addressing), signs a narinfo and stores the NAR by BLAKE3; peers learn of
//! it by gossip and fetch NARs from each other; every node serves an HTTP binary cache to its
//! local Nix, and one node mirrors everything into S3.
//!
//! Modules, each the one owner of its concern:
//! - [`nix`]: the Nix formats (base32, store paths, hashes, NAR, narinfo, keys, store database).
//! - [`cli`]: the command line; `main.rs` only runs it.

pub mod cli;
pub mod nix;
