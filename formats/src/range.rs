//! HTTP `Range: bytes=...` for NAR downloads (Nix resumes interrupted downloads with it).
//! One range is served; several ranges, or a header we cannot read, get the whole body, as
//! RFC 9110 allows.

/// What to send for a body of `len` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeAnswer {
    /// 200 with the whole body.
    Full,
    /// 206 with bytes `start..=end`.
    Partial { start: u64, end: u64 },
    /// 416: the range starts past the end.
    Unsatisfiable,
}

/// Interpret a `Range` header value against a body of `len` bytes.
pub fn parse(header: Option<&str>, len: u64) -> RangeAnswer {
    let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else {
        return RangeAnswer::Full;
    };
    if spec.contains(',') {
        return RangeAnswer::Full;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return RangeAnswer::Full;
    };
    let num = |s: &str| -> Option<u64> {
        (!s.is_empty() && s.bytes().all(|c| c.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    match (a.trim(), b.trim()) {
        ("", suffix) => match num(suffix) {
            Some(0) => RangeAnswer::Unsatisfiable,
            Some(n) if len > 0 => RangeAnswer::Partial {
                start: len.saturating_sub(n),
                end: len - 1,
            },
            Some(_) => RangeAnswer::Unsatisfiable,
            None => RangeAnswer::Full,
        },
        (start, "") => match num(start) {
            Some(s) if s < len => RangeAnswer::Partial {
                start: s,
                end: len - 1,
            },
            Some(_) => RangeAnswer::Unsatisfiable,
            None => RangeAnswer::Full,
        },
        (start, end) => match (num(start), num(end)) {
            (Some(s), Some(e)) if s <= e && s < len => RangeAnswer::Partial {
                start: s,
                end: e.min(len - 1),
            },
            (Some(s), Some(e)) if s <= e => RangeAnswer::Unsatisfiable,
            _ => RangeAnswer::Full,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn forms() {
        assert_eq!(parse(None, 10), RangeAnswer::Full);
        assert_eq!(
            parse(Some("bytes=2-4"), 10),
            RangeAnswer::Partial { start: 2, end: 4 }
        );
        assert_eq!(
            parse(Some("bytes=2-"), 10),
            RangeAnswer::Partial { start: 2, end: 9 }
        );
        assert_eq!(
            parse(Some("bytes=-3"), 10),
            RangeAnswer::Partial { start: 7, end: 9 }
        );
        assert_eq!(
            parse(Some("bytes=-30"), 10),
            RangeAnswer::Partial { start: 0, end: 9 }
        );
        assert_eq!(
            parse(Some("bytes=5-100"), 10),
            RangeAnswer::Partial { start: 5, end: 9 }
        );
        assert_eq!(parse(Some("bytes=10-"), 10), RangeAnswer::Unsatisfiable);
        assert_eq!(parse(Some("bytes=4-2"), 10), RangeAnswer::Full);
        assert_eq!(parse(Some("bytes=1-2,4-5"), 10), RangeAnswer::Full);
        assert_eq!(parse(Some("items=1-2"), 10), RangeAnswer::Full);
        assert_eq!(parse(Some("bytes=x-2"), 10), RangeAnswer::Full);
    }

    proptest! {
        #[test]
        fn partial_ranges_stay_inside_the_body(h in "\\PC{0,30}", len in 0u64..1000) {
            if let RangeAnswer::Partial { start, end } = parse(Some(&h), len) {
                prop_assert!(start <= end && end < len);
            }
        }

        #[test]
        fn numeric_ranges(a in 0u64..2000, b in 0u64..2000, len in 1u64..1000) {
            let _ = parse(Some(&format!("bytes={a}-{b}")), len);
            let _ = parse(Some(&format!("bytes=-{a}")), len);
        }
    }
}
