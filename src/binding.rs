//! The narmesh binding: a signature, by a Nix signing key, over a path's NarHash, NarSize and the
//! BLAKE3 of its NAR. Nix's own narinfo signature covers the sha256 but not the BLAKE3 that
//! transfers and storage key NARs by; the binding is what makes a BLAKE3 (and so the
//! verification of every chunk group against it) trustworthy. A node binds what it computed
//! from the bytes itself: its own builds, and NARs it fetched and checked against the signed
//! NarHash. Receivers accept a claim only with a binding by one of their
//! `trusted-public-keys`. Bindings are written like narinfo signatures: `name:base64`.

use crate::nix::{SecretKey, Sha256, Signature, StorePath, TrustedKeys};

/// The bytes a binding signs.
pub fn fingerprint(
    path: &StorePath,
    nar_hash: &Sha256,
    nar_size: u64,
    blake3: &[u8; 32],
) -> String {
    let hex: String = blake3.iter().map(|b| format!("{b:02x}")).collect();
    format!("narmesh-blake3;1;{path};{nar_hash};{nar_size};{hex}")
}

/// Bind `blake3` to the path's NarHash and NarSize with `key`.
pub fn sign(
    key: &SecretKey,
    path: &StorePath,
    nar_hash: &Sha256,
    nar_size: u64,
    blake3: &[u8; 32],
) -> String {
    key.sign(&fingerprint(path, nar_hash, nar_size, blake3))
        .to_string()
}

/// True if one of `bindings` is by a trusted key over these values.
pub fn verified(
    trusted: &TrustedKeys,
    bindings: &[String],
    path: &StorePath,
    nar_hash: &Sha256,
    nar_size: u64,
    blake3: &[u8; 32],
) -> bool {
    let fp = fingerprint(path, nar_hash, nar_size, blake3);
    let sigs: Vec<Signature> = bindings.iter().filter_map(|b| b.parse().ok()).collect();
    trusted.verifies(&fp, &sigs)
}

/// True if one of `bindings` is by `key`'s name (whether or not it checks out).
pub fn has_binding_by(bindings: &[String], key: &SecretKey) -> bool {
    bindings
        .iter()
        .any(|b| b.split_once(':').is_some_and(|(n, _)| n == key.name()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_binding_covers_every_value() {
        let key = SecretKey::generate("a-1").unwrap();
        let other = SecretKey::generate("b-1").unwrap();
        let trusted = TrustedKeys::new([key.public()]);
        let p: StorePath =
            StorePath::parse("/nix/store/h06bh0s5rcfi480fiz4q44bzrg5l95jg-x").unwrap();
        let h = Sha256([1; 32]);
        let b = sign(&key, &p, &h, 10, &[2; 32]);
        assert!(verified(
            &trusted,
            std::slice::from_ref(&b),
            &p,
            &h,
            10,
            &[2; 32]
        ));
        assert!(!verified(
            &trusted,
            std::slice::from_ref(&b),
            &p,
            &h,
            10,
            &[3; 32]
        ));
        assert!(!verified(
            &trusted,
            std::slice::from_ref(&b),
            &p,
            &h,
            11,
            &[2; 32]
        ));
        assert!(!verified(
            &trusted,
            std::slice::from_ref(&b),
            &p,
            &Sha256([9; 32]),
            10,
            &[2; 32]
        ));
        let forged = sign(&other, &p, &h, 10, &[3; 32]);
        assert!(!verified(
            &trusted,
            &[forged, "junk".into()],
            &p,
            &h,
            10,
            &[3; 32]
        ));
        assert!(has_binding_by(&[b], &key));
    }
}
