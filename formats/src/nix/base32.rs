//! Nix's base32: the alphabet `0123456789abcdfghijklmnpqrsvwxyz` (no e, o, t, u) and Nix's own
//! bit order, which is *not* RFC 4648. Used for store path hash parts and `sha256:` hashes.

/// The 32 characters of Nix's base32 alphabet, in digit order.
pub const ALPHABET: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

/// Why a string is not valid Nix base32 for the expected length.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Base32Error {
    #[error("nix base32: expected {expected} characters, got {got}")]
    Length { expected: usize, got: usize },
    #[error("nix base32: invalid character {0:?}")]
    Char(char),
    #[error("nix base32: non-zero padding bits")]
    Padding,
}

/// Length of the base32 encoding of `len` bytes.
pub const fn encoded_len(len: usize) -> usize {
    if len == 0 { 0 } else { (len * 8 - 1) / 5 + 1 }
}

/// Value of one base32 character, if it is in the alphabet.
fn digit(c: u8) -> Option<u8> {
    const TABLE: [u8; 256] = {
        let mut t = [0xffu8; 256];
        let mut i = 0;
        while i < 32 {
            t[ALPHABET[i] as usize] = i as u8;
            i += 1;
        }
        t
    };
    match TABLE[c as usize] {
        0xff => None,
        d => Some(d),
    }
}

/// Encode bytes in Nix's base32 (most significant digit first, as Nix prints it).
pub fn encode(bytes: &[u8]) -> String {
    let len = encoded_len(bytes.len());
    let mut out = String::with_capacity(len);
    for n in (0..len).rev() {
        let b = n * 5;
        let i = b / 8;
        let j = b % 8;
        let lo = bytes[i] >> j;
        let hi = if i + 1 < bytes.len() {
            ((bytes[i + 1] as u16) << (8 - j)) as u8
        } else {
            0
        };
        out.push(ALPHABET[((lo | hi) & 0x1f) as usize] as char);
    }
    out
}

/// Decode Nix base32 into exactly `N` bytes.
pub fn decode<const N: usize>(s: &str) -> Result<[u8; N], Base32Error> {
    let mut out = [0u8; N];
    decode_into(s.as_bytes(), &mut out)?;
    Ok(out)
}

/// Decode Nix base32 into `out`, whose length fixes the expected string length.
pub fn decode_into(s: &[u8], out: &mut [u8]) -> Result<(), Base32Error> {
    let expected = encoded_len(out.len());
    if s.len() != expected {
        return Err(Base32Error::Length {
            expected,
            got: s.len(),
        });
    }
    out.fill(0);
    for (n, &c) in s.iter().rev().enumerate() {
        let d = digit(c).ok_or(Base32Error::Char(c as char))?;
        let b = n * 5;
        let i = b / 8;
        let j = b % 8;
        out[i] |= ((d as u16) << j) as u8;
        let carry = ((d as u16) >> (8 - j)) as u8;
        if i + 1 < out.len() {
            out[i + 1] |= carry;
        } else if carry != 0 {
            return Err(Base32Error::Padding);
        }
    }
    Ok(())
}

/// True if every byte of `s` is a Nix base32 character.
pub fn is_valid_chars(s: &[u8]) -> bool {
    s.iter().all(|&c| digit(c).is_some())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_sha256_of_empty_string() {
        // `nix-hash --type sha256 --flat --base32 /dev/null`
        let h: [u8; 32] = sha2_empty();
        assert_eq!(
            encode(&h),
            "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73"
        );
    }

    fn sha2_empty() -> [u8; 32] {
        use sha2::Digest;
        sha2::Sha256::digest(b"").into()
    }

    #[test]
    fn rejects_bad_input() {
        assert!(matches!(decode::<20>("e"), Err(Base32Error::Length { .. })));
        let bad = "e".repeat(32);
        assert_eq!(decode::<20>(&bad), Err(Base32Error::Char('e')));
        // 52 chars for 32 bytes leaves 4 spare bits in the top digit.
        let overflow = format!("z{}", "0".repeat(51));
        assert_eq!(decode::<32>(&overflow), Err(Base32Error::Padding));
    }

    proptest! {
        #[test]
        fn round_trip_20(bytes in proptest::array::uniform20(any::<u8>())) {
            let s = encode(&bytes);
            prop_assert_eq!(s.len(), 32);
            prop_assert_eq!(decode::<20>(&s).unwrap(), bytes);
        }

        #[test]
        fn round_trip_32(bytes in proptest::array::uniform32(any::<u8>())) {
            let s = encode(&bytes);
            prop_assert_eq!(s.len(), 52);
            prop_assert_eq!(decode::<32>(&s).unwrap(), bytes);
        }

        #[test]
        fn arbitrary_strings_never_panic(s in ".{0,60}") {
            let _ = decode::<32>(&s);
            let _ = decode::<20>(&s);
        }
    }
}
