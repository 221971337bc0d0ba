//! The Nix formats (in the `narmesh-formats` crate, re-exported here) and a read-only reader of
//! the store database.

pub use narmesh_formats::nix::{base32, hash, keys, nar, nar_layout, narinfo, store_path};
pub mod store_db;

pub use hash::Sha256;
pub use keys::{PublicKey, SecretKey, Signature, TrustedKeys};
pub use narinfo::NarInfo;
pub use store_path::StorePath;
