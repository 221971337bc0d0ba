//! SHA-256 hashes as Nix writes them: `sha256:<nix-base32>` (52 digits), and as Nix accepts them
//! when parsing: base16 (`sha256:<64 hex>`), SRI (`sha256-<base64>`) and `sha256:<base64>`.

use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;

use super::base32;

/// Why a hash string could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HashError {
    #[error("hash {0:?}: only sha256 is supported")]
    Algorithm(String),
    #[error("hash {0:?}: not base16, nix base32 or base64 of 32 bytes")]
    Encoding(String),
}

/// A SHA-256 digest (a NAR hash or a file hash).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Sha256(pub [u8; 32]);

impl Sha256 {
    /// `sha256:<nix-base32>`, the form Nix writes in narinfos and fingerprints.
    pub fn to_nix32(&self) -> String {
        format!("sha256:{}", base32::encode(&self.0))
    }

    /// Only the 52 base32 digits (used in NAR file names).
    pub fn nix32_digits(&self) -> String {
        base32::encode(&self.0)
    }

    /// `sha256:<hex>`, the form the Nix store database keeps.
    pub fn to_base16(&self) -> String {
        let mut s = String::with_capacity(7 + 64);
        s.push_str("sha256:");
        for b in self.0 {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }

    /// `sha256-<base64>`, the SRI form `nix path-info --json` prints.
    pub fn to_sri(&self) -> String {
        format!("sha256-{}", BASE64.encode(self.0))
    }

    /// Parse the digest part alone, in any of Nix's encodings (by length).
    pub fn parse_digest(digits: &str, whole: &str) -> Result<Self, HashError> {
        let bad = || HashError::Encoding(whole.to_owned());
        let bytes = match digits.len() {
            64 => decode_hex(digits).ok_or_else(bad)?,
            52 => base32::decode::<32>(digits).map_err(|_| bad())?,
            44 => {
                let v = BASE64.decode(digits).map_err(|_| bad())?;
                v.try_into().map_err(|_| bad())?
            }
            _ => return Err(bad()),
        };
        Ok(Sha256(bytes))
    }
}

fn decode_hex(s: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    let b = s.as_bytes();
    for (i, o) in out.iter_mut().enumerate() {
        let hi = (b[2 * i] as char).to_digit(16)?;
        let lo = (b[2 * i + 1] as char).to_digit(16)?;
        *o = (hi * 16 + lo) as u8;
    }
    Some(out)
}

impl FromStr for Sha256 {
    type Err = HashError;
    fn from_str(s: &str) -> Result<Self, HashError> {
        if let Some(rest) = s.strip_prefix("sha256:") {
            Sha256::parse_digest(rest, s)
        } else if let Some(rest) = s.strip_prefix("sha256-") {
            if rest.len() != 44 {
                return Err(HashError::Encoding(s.to_owned()));
            }
            Sha256::parse_digest(rest, s)
        } else {
            let algo = s.split([':', '-']).next().unwrap_or_default();
            Err(HashError::Algorithm(algo.to_owned()))
        }
    }
}

impl fmt::Display for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_nix32())
    }
}

impl fmt::Debug for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sha256({})", self.to_nix32())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_every_form_nix_writes() {
        let h = Sha256([7u8; 32]);
        for s in [h.to_nix32(), h.to_base16(), h.to_sri()] {
            assert_eq!(s.parse::<Sha256>().unwrap(), h, "{s}");
        }
        let b64 = format!("sha256:{}", BASE64.encode(h.0));
        assert_eq!(b64.parse::<Sha256>().unwrap(), h);
    }

    #[test]
    fn rejects_other_algorithms_and_garbage() {
        assert!(matches!(
            "md5:abc".parse::<Sha256>(),
            Err(HashError::Algorithm(_))
        ));
        assert!(matches!(
            "sha256:xyz".parse::<Sha256>(),
            Err(HashError::Encoding(_))
        ));
        assert!("sha256:".parse::<Sha256>().is_err());
        let not_hex = format!("sha256:{}", "g".repeat(64));
        assert!(not_hex.parse::<Sha256>().is_err());
    }

    proptest! {
        #[test]
        fn round_trips(bytes in proptest::array::uniform32(any::<u8>())) {
            let h = Sha256(bytes);
            prop_assert_eq!(h.to_nix32().parse::<Sha256>().unwrap(), h);
            prop_assert_eq!(h.to_base16().parse::<Sha256>().unwrap(), h);
            prop_assert_eq!(h.to_sri().parse::<Sha256>().unwrap(), h);
        }

        #[test]
        fn never_panics(s in "\\PC{0,80}") {
            let _ = s.parse::<Sha256>();
        }
    }
}
