//! The Nix formats, written here (the registry's `nix-compat` is only a placeholder) and checked
//! byte for byte against the real Nix in the main crate's `tests/`: base32, hashes, store paths,
//! NAR, narinfo and signing keys.

pub mod base32;
pub mod hash;
pub mod keys;
pub mod nar;
pub mod nar_layout;
pub mod narinfo;
pub mod store_path;

pub use hash::Sha256;
pub use keys::{PublicKey, SecretKey, Signature, TrustedKeys};
pub use narinfo::NarInfo;
pub use store_path::StorePath;
