//! Nix signing keys and narinfo signatures.
//!
//! Key files are `name:base64` as `nix-store --generate-binary-cache-key` writes them: the secret
//! key is 64 bytes (32-byte Ed25519 seed, then the public key, libsodium's layout), the public
//! key 32 bytes. A signature line is `name:base64(64-byte signature)` over a path's fingerprint,
//! and verifies only against a trusted key of the same name.

use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};

/// Why a key or signature string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("{what}: expected 'name:base64'")]
    Format { what: &'static str },
    #[error("{what}: invalid key name {name:?}")]
    Name { what: &'static str, name: String },
    #[error("{what} {name:?}: invalid base64")]
    Base64 { what: &'static str, name: String },
    #[error("{what} {name:?}: expected {expected} bytes, got {got}")]
    Length {
        what: &'static str,
        name: String,
        expected: usize,
        got: usize,
    },
    #[error("secret key {0:?}: its public half does not match its seed")]
    Mismatch(String),
    #[error("public key {0:?}: not a valid Ed25519 point")]
    Point(String),
    #[error("generating a key: no randomness from the OS: {0}")]
    Random(String),
}

/// Split `name:base64` and decode the payload to exactly `N` bytes.
fn split_decode<const N: usize>(
    s: &str,
    what: &'static str,
) -> Result<(String, [u8; N]), KeyError> {
    let s = s.trim_end_matches(['\n', '\r']);
    let (name, b64) = s.split_once(':').ok_or(KeyError::Format { what })?;
    if !valid_name(name) {
        return Err(KeyError::Name {
            what,
            name: name.to_owned(),
        });
    }
    let bytes = BASE64.decode(b64).map_err(|_| KeyError::Base64 {
        what,
        name: name.to_owned(),
    })?;
    let got = bytes.len();
    let arr = bytes.try_into().map_err(|_| KeyError::Length {
        what,
        name: name.to_owned(),
        expected: N,
        got,
    })?;
    Ok((name.to_owned(), arr))
}

/// Key names: non-empty, printable, no ':' and no white space.
fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 256 && name.bytes().all(|c| c.is_ascii_graphic() && c != b':')
}

/// A Nix binary cache secret key.
#[derive(Clone)]
pub struct SecretKey {
    name: String,
    key: SigningKey,
}

impl SecretKey {
    /// A fresh key named `name` (the usual form is `host-1`).
    pub fn generate(name: &str) -> Result<Self, KeyError> {
        if !valid_name(name) {
            return Err(KeyError::Name {
                what: "secret key",
                name: name.to_owned(),
            });
        }
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| KeyError::Random(e.to_string()))?;
        Ok(SecretKey {
            name: name.to_owned(),
            key: SigningKey::from_bytes(&seed),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The matching public key.
    pub fn public(&self) -> PublicKey {
        PublicKey {
            name: self.name.clone(),
            key: self.key.verifying_key(),
        }
    }

    /// Sign a fingerprint (see [`crate::nix::narinfo::NarInfo::fingerprint`]).
    pub fn sign(&self, fingerprint: &str) -> Signature {
        Signature {
            key_name: self.name.clone(),
            bytes: self.key.sign(fingerprint.as_bytes()).to_bytes(),
        }
    }

    /// `name:base64(seed || public)`, the secret key file's contents.
    pub fn to_nix_string(&self) -> String {
        format!(
            "{}:{}",
            self.name,
            BASE64.encode(self.key.to_keypair_bytes())
        )
    }
}

impl FromStr for SecretKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        let (name, bytes) = split_decode::<64>(s, "secret key")?;
        let key =
            SigningKey::from_keypair_bytes(&bytes).map_err(|_| KeyError::Mismatch(name.clone()))?;
        Ok(SecretKey { name, key })
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey({}:<redacted>)", self.name)
    }
}

/// A Nix binary cache public key.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    name: String,
    key: VerifyingKey,
}

impl PublicKey {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// True if `sig` is by this key (same name) over `fingerprint`.
    pub fn verify(&self, fingerprint: &str, sig: &Signature) -> bool {
        sig.key_name == self.name
            && self
                .key
                .verify_strict(
                    fingerprint.as_bytes(),
                    &ed25519_dalek::Signature::from_bytes(&sig.bytes),
                )
                .is_ok()
    }
}

impl FromStr for PublicKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        let (name, bytes) = split_decode::<32>(s, "public key")?;
        let key = VerifyingKey::from_bytes(&bytes).map_err(|_| KeyError::Point(name.clone()))?;
        Ok(PublicKey { name, key })
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, BASE64.encode(self.key.to_bytes()))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

/// A detached signature as it appears on a narinfo `Sig:` line.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Signature {
    key_name: String,
    bytes: [u8; 64],
}

impl Signature {
    pub fn key_name(&self) -> &str {
        &self.key_name
    }
}

impl FromStr for Signature {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        let (key_name, bytes) = split_decode::<64>(s, "signature")?;
        Ok(Signature { key_name, bytes })
    }
}

impl fmt::Display for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.key_name, BASE64.encode(self.bytes))
    }
}

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature({self})")
    }
}

/// The set of keys whose signatures a node accepts (`trusted-public-keys`).
#[derive(Clone, Debug, Default)]
pub struct TrustedKeys {
    keys: Vec<PublicKey>,
}

impl TrustedKeys {
    pub fn new(keys: impl IntoIterator<Item = PublicKey>) -> Self {
        TrustedKeys {
            keys: keys.into_iter().collect(),
        }
    }

    pub fn keys(&self) -> &[PublicKey] {
        &self.keys
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// True if any of `sigs` is a valid signature of `fingerprint` by a trusted key.
    pub fn verifies<'a>(
        &self,
        fingerprint: &str,
        sigs: impl IntoIterator<Item = &'a Signature>,
    ) -> bool {
        sigs.into_iter()
            .any(|sig| self.keys.iter().any(|k| k.verify(fingerprint, sig)))
    }

    /// True if any of `sigs` is by a key of this set (by name), whether or not it checks out.
    pub fn names_any<'a>(&self, sigs: impl IntoIterator<Item = &'a Signature>) -> bool {
        sigs.into_iter()
            .any(|sig| self.keys.iter().any(|k| k.name == sig.key_name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn generate_sign_verify_and_round_trip() {
        let sk = SecretKey::generate("host-1").unwrap();
        let sk2: SecretKey = sk.to_nix_string().parse().unwrap();
        assert_eq!(sk2.public(), sk.public());
        let pk: PublicKey = sk.public().to_string().parse().unwrap();
        let sig = sk.sign("1;/nix/store/x;sha256:y;1;");
        let sig2: Signature = sig.to_string().parse().unwrap();
        assert!(pk.verify("1;/nix/store/x;sha256:y;1;", &sig2));
        assert!(!pk.verify("1;/nix/store/x;sha256:y;2;", &sig2));
        let other = SecretKey::generate("host-1").unwrap().public();
        assert!(!other.verify("1;/nix/store/x;sha256:y;1;", &sig2));
        let trusted = TrustedKeys::new([other, pk]);
        assert!(trusted.verifies("1;/nix/store/x;sha256:y;1;", [&sig2]));
    }

    #[test]
    fn accepts_a_trailing_newline_and_rejects_junk() {
        let sk = SecretKey::generate("k").unwrap();
        assert!(
            format!("{}\n", sk.to_nix_string())
                .parse::<SecretKey>()
                .is_ok()
        );
        for bad in ["", "nocolon", ":AAAA", "k:!!!", "k:AAAA", "a b:AAAA"] {
            assert!(bad.parse::<SecretKey>().is_err(), "{bad}");
            assert!(bad.parse::<PublicKey>().is_err(), "{bad}");
            assert!(bad.parse::<Signature>().is_err(), "{bad}");
        }
        // A secret whose public half was swapped is refused.
        let mut bytes = sk.key.to_keypair_bytes();
        bytes[40] ^= 1;
        let s = format!("k:{}", BASE64.encode(bytes));
        assert!(s.parse::<SecretKey>().is_err());
    }

    proptest! {
        #[test]
        fn key_parsers_never_panic(s in "\\PC{0,120}") {
            let _ = s.parse::<SecretKey>();
            let _ = s.parse::<PublicKey>();
            let _ = s.parse::<Signature>();
        }

        #[test]
        fn signatures_round_trip(name in "[a-z0-9.-]{1,20}", bytes in proptest::collection::vec(any::<u8>(), 64)) {
            let sig = Signature { key_name: name, bytes: bytes.try_into().unwrap() };
            prop_assert_eq!(sig.to_string().parse::<Signature>().unwrap(), sig);
        }
    }
}
