//! Byte sizes as people write them in configs and on the command line (`4096`, `64KiB`,
//! `1.5MiB`, `50GiB`, `2TiB`; `K`, `KB`, ... are powers of 1024 too). A leaf module.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Parse a size such as `4096`, `64KiB`, `1.5MiB`, `2GiB`, `1TiB`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        other => {
            return Err(format!(
                "size {s:?}: unknown unit {other:?} (use KiB, MiB, GiB, TiB)"
            ));
        }
    };
    let v: f64 = num
        .parse()
        .map_err(|_| format!("size {s:?}: expected a number such as 64KiB"))?;
    let bytes = v * mult as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes > (1u64 << 60) as f64 {
        return Err(format!("size {s:?}: out of range"));
    }
    Ok(bytes.round() as u64)
}

/// A size in bytes, written as a number or a string with a unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct ByteSize(pub u64);

impl std::fmt::Display for ByteSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let units = [("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)];
        for (name, shift) in units {
            if self.0 >= 1 << shift && self.0.is_multiple_of(1 << shift) {
                return write!(f, "{}{name}", self.0 >> shift);
            }
        }
        write!(f, "{}", self.0)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(ByteSize(n)),
            Raw::Text(s) => parse_size(&s)
                .map(ByteSize)
                .map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sizes_parse_and_print() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64KiB"), Ok(64 << 10));
        assert_eq!(parse_size("1.5MiB"), Ok(3 << 19));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("50GiB"), Ok(50 << 30));
        assert!(parse_size("12XB").is_err());
        assert!(parse_size("").is_err());
        assert_eq!(ByteSize(50 << 30).to_string(), "50GiB");
        assert_eq!(ByteSize(1000).to_string(), "1000");
    }

    proptest! {
        #[test]
        fn never_panics(s in "\\PC{0,20}") {
            let _ = parse_size(&s);
        }

        #[test]
        fn printed_sizes_parse_back(n in 0u64..(1 << 50)) {
            prop_assert_eq!(parse_size(&ByteSize(n).to_string()), Ok(n));
        }
    }
}
