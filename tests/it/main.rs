//! The integration tests, in one binary: everything runs against real parts (the real Nix
//! client, real processes).

mod harness;
mod keys_interop;
mod nar_vs_nix;
