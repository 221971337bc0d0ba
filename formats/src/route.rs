//! The binary cache's URL routes, as Nix and Prometheus ask for them: an HTTP path (untrusted)
//! to a [`Route`]. Anything that could climb out of the cache (`..`, `//`, escapes, NUL) is a
//! bad request.

/// The routes Nix and Prometheus use.
#[derive(Debug, PartialEq, Eq)]
pub enum Route<'a> {
    CacheInfo,
    NarInfo(&'a str),
    Nar([u8; 32]),
    Metrics,
    NotFound,
    BadRequest,
}

impl Route<'_> {
    pub fn name(&self) -> &'static str {
        match self {
            Route::CacheInfo => "nix-cache-info",
            Route::NarInfo(_) => "narinfo",
            Route::Nar(_) => "nar",
            Route::Metrics => "metrics",
            Route::NotFound => "not-found",
            Route::BadRequest => "bad-request",
        }
    }
}

pub fn route(path: &str) -> Route<'_> {
    if path.contains("..")
        || path.contains('\\')
        || path.contains("//")
        || path.contains('%')
        || path.contains('\0')
    {
        return Route::BadRequest;
    }
    match path {
        "/nix-cache-info" => return Route::CacheInfo,
        "/metrics" => return Route::Metrics,
        _ => {}
    }
    if let Some(h) = path
        .strip_prefix('/')
        .and_then(|p| p.strip_suffix(".narinfo"))
    {
        if h.len() == crate::nix::store_path::HASH_LEN
            && crate::nix::base32::is_valid_chars(h.as_bytes())
        {
            return Route::NarInfo(h);
        }
        return Route::NotFound;
    }
    if let Some(hex) = path
        .strip_prefix("/nar/")
        .and_then(|p| p.strip_suffix(".nar"))
    {
        return parse_hex32(hex).map(Route::Nar).unwrap_or(Route::NotFound);
    }
    Route::NotFound
}

fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(route("/nix-cache-info"), Route::CacheInfo);
        assert_eq!(
            route("/h06bh0s5rcfi480fiz4q44bzrg5l95jg.narinfo"),
            Route::NarInfo("h06bh0s5rcfi480fiz4q44bzrg5l95jg")
        );
        assert_eq!(
            route("/eeeeh0s5rcfi480fiz4q44bzrg5l95jg.narinfo"),
            Route::NotFound
        );
        assert_eq!(
            route(&format!("/nar/{}.nar", "ab".repeat(32))),
            Route::Nar([0xab; 32])
        );
        assert_eq!(route("/nar/zz.nar"), Route::NotFound);
        for bad in [
            "/../etc/passwd",
            "/nar/..%2f..%2fetc",
            "/%2e%2e/x",
            "//etc/passwd",
            "/nar\\x",
        ] {
            assert_eq!(route(bad), Route::BadRequest, "{bad}");
        }
    }

    proptest::proptest! {
        #[test]
        fn any_path_routes_without_panic(p in "\\PC{0,120}") {
            let _ = route(&p);
        }
    }
}
