//! The integration tests, in one binary: everything runs against real parts (the real Nix
//! client, real `narmesh` processes, SIGKILL).

mod bench_cli;
mod crash;
mod deploy;
mod doctor;
mod durable;
mod faults;
mod flaky;
mod guide;
mod harness;
mod hostile;
mod keys_interop;
mod liveness;
mod logs;
mod mesh;
mod mirror;
mod nar_vs_nix;
mod node;
mod node_harness;
mod s3_harness;
mod storage;
mod transfer;
mod trust;
