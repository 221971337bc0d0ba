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
//! - [`config`]: the node's TOML configuration.
//! - [`db`]: the node's redb database (queue, path records, log, mirror outbox, counters).
//! - [`queue`]: the group-committing writer of the durable queue.
//! - [`ingest`]: the Unix socket (hook reports, CLI requests) and taking in the spool.
//! - [`spool`]: the hook's spool directory read as untrusted: bounded batches, rejected files.
//! - [`pipeline`]: queued reports -> NARs in the blob store -> signed narinfos -> records.
//! - [`store`]: the local Nix store database, opened lazily.
//! - [`storage`]: what the node holds on disk and its budget: own paths served from the Nix
//!   store (no copy), NAR files fetched from peers within a cap, verified reads of both.
//! - [`forget`]: when the records of paths nobody holds any more are dropped.
//! - [`binding`]: the signature that binds a NAR's BLAKE3 to its signed narinfo.
//! - [`mesh`]: iroh endpoint, gossip announcements, catch-up, verified NAR transfer.
//! - [`mirror`]: the S3 mirror (durable outbox, compressed NARs, narinfos in dependency order).
//! - [`http`]: the binary cache the local Nix substitutes from, and `/metrics`.
//! - [`metrics`]: the Prometheus registry.
//! - [`chunks`]: BLAKE3's tree over 16 KiB chunk groups: leaves that verify any range on its own.
//! - [`units`]: byte sizes with units (`50GiB`), in configs and flags.
//! - [`background`]: low-priority threads for bulk hashing and compression.
//! - [`fsutil`]: atomic, durable file writes (a leaf: depends on nothing of ours).
//! - [`linkage`]: whether an executable (the hook) starts statically linked.
//! - [`node`]: builds and runs the parts; owns the shutdown order.
//! - [`vital`]: the parts that must run as long as the node does; one that ends stops it.
//! - [`watchdog`]: the node's runtimes probed and the database's writes timed; one that
//!   stalls is a problem, and systemd's watchdog is no longer told the node is alive.
//! - [`systemd`]: the service manager's notification socket (`READY=1`, `STOPPING=1`,
//!   `WATCHDOG=1`).
//! - [`bench`]: `narmesh bench`, replication measured on one machine beside its baselines.
//! - [`cli`], [`client`]: the command line and its socket client; `main.rs` only runs it.
//!
//! The hook is a package of its own (`hook/`): std, rustix and `narmesh-proto` only.

pub mod background;
pub mod bench;
pub mod binding;
pub use narmesh_formats::chunks;
pub mod cli;
pub mod client;
pub mod config;
pub mod db;
pub mod doctor;
pub mod forget;
pub mod fsutil;
pub mod http;
pub mod ingest;
pub mod killpoint;
pub mod linkage;
pub mod logging;
pub mod memory;
pub mod mesh;
pub mod metrics;
pub mod mirror;
pub mod nix;
pub mod node;
pub mod pipeline;
pub mod queue;
pub mod spool;
pub mod storage;
pub mod store;
pub mod systemd;
pub mod units;
pub mod vital;
pub mod watchdog;

#[cfg(test)]
mod readme_limits;

/// An error with its causes, `outer: cause: cause`: QUIC and AWS SDK errors print only their
/// outer layer (such as "connection lost" or "dispatch failure").
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cur = c.source();
    }
    out
}
