//! The formats narmesh reads from untrusted bytes, in a crate of their own so that fuzzing
//! builds only them (not iroh nor the AWS SDK): the Nix formats ([`nix`]), BLAKE3 chunk-group
//! leaves ([`chunks`]), the binary cache's URL routes ([`route`]) and HTTP ranges ([`range`]).
//! The wire types of the hook and the mesh are in `narmesh-proto`.

pub mod chunks;
pub mod nix;
pub mod range;
pub mod route;
