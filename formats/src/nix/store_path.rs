//! Store paths: `/nix/store/<32-digit base32 hash>-<name>`, validated the way Nix 2.8 does.
//! The store directory is fixed to `/nix/store` (chroot stores keep the logical path).

use std::fmt;
use std::str::FromStr;

use super::base32;

/// The logical store directory every narmesh host shares.
pub const STORE_DIR: &str = "/nix/store";
/// Length of the hash part of a store path's base name.
pub const HASH_LEN: usize = 32;
/// Longest name Nix accepts after the hash part.
pub const MAX_NAME_LEN: usize = 211;

/// Why a string is not a valid store path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StorePathError {
    #[error("{0:?} is not in the store directory {STORE_DIR}")]
    NotInStore(String),
    #[error("store path {0:?}: hash part must be 32 nix-base32 characters")]
    HashPart(String),
    #[error("store path {0:?}: missing '-' after the hash part")]
    Dash(String),
    #[error("store path {path:?}: invalid name ({why})")]
    Name { path: String, why: &'static str },
}

/// A validated store path, kept as its base name `<hash>-<name>`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StorePath {
    base: String,
}

impl StorePath {
    /// Parse a full path `/nix/store/<hash>-<name>`.
    pub fn parse(full: &str) -> Result<Self, StorePathError> {
        let base = full
            .strip_prefix(STORE_DIR)
            .and_then(|r| r.strip_prefix('/'))
            .ok_or_else(|| StorePathError::NotInStore(full.to_owned()))?;
        Self::from_base_name(base).map_err(|e| e.with_path(full))
    }

    /// Parse a base name `<hash>-<name>` (as in narinfo `References`).
    pub fn from_base_name(base: &str) -> Result<Self, StorePathError> {
        let b = base.as_bytes();
        if b.len() < HASH_LEN || !base32::is_valid_chars(&b[..HASH_LEN]) {
            return Err(StorePathError::HashPart(base.to_owned()));
        }
        if b.get(HASH_LEN) != Some(&b'-') {
            return Err(StorePathError::Dash(base.to_owned()));
        }
        check_name(&base[HASH_LEN + 1..]).map_err(|why| StorePathError::Name {
            path: base.to_owned(),
            why,
        })?;
        Ok(StorePath {
            base: base.to_owned(),
        })
    }

    /// The 32-character hash part (the narinfo's file name stem).
    pub fn hash_part(&self) -> &str {
        &self.base[..HASH_LEN]
    }

    /// The name after the hash part.
    pub fn name(&self) -> &str {
        &self.base[HASH_LEN + 1..]
    }

    /// `<hash>-<name>`.
    pub fn base_name(&self) -> &str {
        &self.base
    }

    /// `/nix/store/<hash>-<name>`.
    pub fn full(&self) -> String {
        format!("{STORE_DIR}/{}", self.base)
    }

    /// True for derivation files.
    pub fn is_derivation(&self) -> bool {
        self.base.ends_with(".drv")
    }
}

impl StorePathError {
    fn with_path(self, full: &str) -> Self {
        match self {
            StorePathError::HashPart(_) => StorePathError::HashPart(full.to_owned()),
            StorePathError::Dash(_) => StorePathError::Dash(full.to_owned()),
            StorePathError::Name { why, .. } => StorePathError::Name {
                path: full.to_owned(),
                why,
            },
            other => other,
        }
    }
}

/// Check a store path name as Nix 2.8's `checkName` does.
pub fn check_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("empty");
    }
    if name.len() > MAX_NAME_LEN {
        return Err("longer than 211 characters");
    }
    if name.starts_with('.') {
        return Err("starts with '.'");
    }
    let ok = name
        .bytes()
        .all(|c| c.is_ascii_alphanumeric() || b"+-._?=".contains(&c));
    if ok {
        Ok(())
    } else {
        Err("characters other than letters, digits and +-._?=")
    }
}

impl FromStr for StorePath {
    type Err = StorePathError;
    fn from_str(s: &str) -> Result<Self, StorePathError> {
        StorePath::parse(s)
    }
}

impl fmt::Display for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{STORE_DIR}/{}", self.base)
    }
}

impl fmt::Debug for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StorePath({})", self.base)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const GOOD: &str = "/nix/store/h06bh0s5rcfi480fiz4q44bzrg5l95jg-tree+-._?=";

    #[test]
    fn parses_and_splits() {
        let p = StorePath::parse(GOOD).unwrap();
        assert_eq!(p.hash_part(), "h06bh0s5rcfi480fiz4q44bzrg5l95jg");
        assert_eq!(p.name(), "tree+-._?=");
        assert_eq!(p.full(), GOOD);
        assert_eq!(StorePath::from_base_name(p.base_name()).unwrap(), p);
    }

    #[test]
    fn rejects_bad_paths() {
        let h = "h06bh0s5rcfi480fiz4q44bzrg5l95jg";
        for bad in [
            "/tmp/x".to_owned(),
            format!("/nix/store/{h}"),
            format!("/nix/store/{h}-"),
            format!("/nix/store/{h}-.hidden"),
            format!("/nix/store/{h}-a/b"),
            format!("/nix/store/{h}-sp ace"),
            format!("/nix/store/{}-x", h.replace('h', "e")),
            format!("/nix/store/{h}-{}", "a".repeat(212)),
            format!("/nix/store/{h}-../../etc"),
        ] {
            assert!(StorePath::parse(&bad).is_err(), "{bad} accepted");
        }
        assert!(StorePath::parse(&format!("/nix/store/{h}-{}", "a".repeat(211))).is_ok());
    }

    proptest! {
        #[test]
        fn round_trip(hash in "[0-9a-df-np-sv-z]{32}", name in "[a-zA-Z0-9+_?=-][a-zA-Z0-9+._?=-]{0,210}") {
            let full = format!("/nix/store/{hash}-{name}");
            let p = StorePath::parse(&full).unwrap();
            prop_assert_eq!(p.to_string(), full);
            prop_assert_eq!(p.hash_part(), hash.as_str());
        }

        #[test]
        fn never_panics(s in "\\PC{0,120}") {
            let _ = StorePath::parse(&s);
            let _ = StorePath::from_base_name(&s);
        }
    }
}
