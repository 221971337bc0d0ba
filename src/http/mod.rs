//! The node's HTTP binary cache for the local Nix: `nix-cache-info`, `<hash>.narinfo`, the NARs
//! the narinfos name (streamed from the blob store, with Range support), and `/metrics`.
//! Requests are matched by hand against the few shapes Nix asks for; everything else is 404,
//! and anything that looks like traversal is 400. Internals never leak to clients.

mod range;

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use crate::blobs::BlobStore;
use crate::db::{Db, PathRecord};
use crate::mesh::MeshHandle;
use crate::metrics::{HttpLabels, Metrics, RouteLabels};

/// What the HTTP handlers share.
#[derive(Clone)]
pub struct HttpState {
    pub db: Db,
    pub blobs: BlobStore,
    pub metrics: Arc<Metrics>,
    /// The rendered `nix-cache-info`.
    pub cache_info: Arc<str>,
    /// Recently served narinfos by hash part: a hit is answered without leaving the async
    /// thread. Records never change once written, so entries never go stale.
    pub narinfos: Arc<quick_cache::sync::Cache<String, Bytes>>,
    /// Where NARs this node does not hold yet come from.
    pub mesh: Option<MeshHandle>,
}

/// narinfos kept in memory (about 1 KiB each).
pub const NARINFO_CACHE_ENTRIES: usize = 65_536;

impl HttpState {
    pub fn new(
        db: Db,
        blobs: BlobStore,
        metrics: Arc<Metrics>,
        priority: u32,
        mesh: Option<MeshHandle>,
    ) -> Self {
        HttpState {
            mesh,
            db,
            blobs,
            metrics,
            cache_info: format!("StoreDir: /nix/store\nWantMassQuery: 1\nPriority: {priority}\n")
                .into(),
            narinfos: Arc::new(quick_cache::sync::Cache::new(NARINFO_CACHE_ENTRIES)),
        }
    }
}

/// Serve on `listener` until cancelled.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: HttpState,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt as _;
    let app = axum::Router::new().fallback(handle).with_state(state);
    // Without TCP_NODELAY a streamed NAR's small writes wait for the client's delayed ACK
    // (40 ms per small NAR on Linux).
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!("TCP_NODELAY: {e}");
        }
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { cancel.cancelled().await })
        .await
}

/// The routes Nix and Prometheus use.
#[derive(Debug, PartialEq, Eq)]
enum Route<'a> {
    CacheInfo,
    NarInfo(&'a str),
    Nar([u8; 32]),
    Metrics,
    NotFound,
    BadRequest,
}

impl Route<'_> {
    fn name(&self) -> &'static str {
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

fn route(path: &str) -> Route<'_> {
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

async fn handle(State(st): State<HttpState>, req: Request) -> Response {
    let started = Instant::now();
    let r = route(req.uri().path());
    let name = r.name();
    let head = req.method() == Method::HEAD;
    let resp = if req.method() != Method::GET && !head {
        (
            StatusCode::METHOD_NOT_ALLOWED,
            [(header::ALLOW, "GET, HEAD")],
        )
            .into_response()
    } else {
        match r {
            Route::CacheInfo => text(st.cache_info.to_string(), "text/x-nix-cache-info"),
            Route::Metrics => text(st.metrics.render(), "text/plain; version=0.0.4"),
            Route::NarInfo(h) => narinfo(&st, h).await,
            Route::Nar(hash) => nar(&st, hash, req.headers(), head).await,
            Route::NotFound => StatusCode::NOT_FOUND.into_response(),
            Route::BadRequest => StatusCode::BAD_REQUEST.into_response(),
        }
    };
    let status = resp.status().as_u16();
    st.metrics
        .http_requests
        .get_or_create(&HttpLabels {
            route: name,
            status,
        })
        .inc();
    st.metrics
        .http_seconds
        .get_or_create(&RouteLabels { route: name })
        .observe(started.elapsed().as_secs_f64());
    if head {
        let (parts, _) = resp.into_parts();
        return Response::from_parts(parts, Body::empty());
    }
    resp
}

fn text(body: String, mime: &'static str) -> Response {
    ([(header::CONTENT_TYPE, mime)], body).into_response()
}

fn internal(e: impl std::fmt::Display) -> Response {
    tracing::error!("http: {e}");
    StatusCode::INTERNAL_SERVER_ERROR.into_response()
}

async fn narinfo(st: &HttpState, hash: &str) -> Response {
    if let Some(body) = st.narinfos.get(hash) {
        return ([(header::CONTENT_TYPE, "text/x-nix-narinfo")], body).into_response();
    }
    let db = st.db.clone();
    let key = hash.to_owned();
    match tokio::task::spawn_blocking(move || db.path(&key)).await {
        Ok(Ok(Some(rec))) => {
            let body = Bytes::from(rec.narinfo);
            st.narinfos.insert(hash.to_owned(), body.clone());
            ([(header::CONTENT_TYPE, "text/x-nix-narinfo")], body).into_response()
        }
        Ok(Ok(None)) => StatusCode::NOT_FOUND.into_response(),
        Ok(Err(e)) => internal(e),
        Err(e) => internal(e),
    }
}

async fn nar(st: &HttpState, hash: [u8; 32], headers: &HeaderMap, head: bool) -> Response {
    let len = match nar_len(st, &hash).await {
        Ok(Local::Yes(len)) => len,
        Ok(Local::No(rec)) => return from_peers(st, *rec, head).await,
        Ok(Local::Unknown) => return StatusCode::NOT_FOUND.into_response(),
        Err(e) => return internal(e),
    };
    let range_header = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
    let (status, start, count) = match range::parse(range_header, len) {
        range::RangeAnswer::Full => (StatusCode::OK, 0, len),
        range::RangeAnswer::Partial { start, end } => {
            (StatusCode::PARTIAL_CONTENT, start, end - start + 1)
        }
        range::RangeAnswer::Unsatisfiable => {
            return (
                StatusCode::RANGE_NOT_SATISFIABLE,
                [(header::CONTENT_RANGE, format!("bytes */{len}"))],
            )
                .into_response();
        }
    };
    let body = if head {
        Body::empty()
    } else {
        Body::from_stream(st.blobs.range(&hash, start, start + count))
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-nix-nar"),
    );
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(count));
    if status == StatusCode::PARTIAL_CONTENT
        && let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{}/{len}", start + count - 1))
    {
        h.insert(header::CONTENT_RANGE, v);
    }
    resp
}

enum Local {
    /// Held here, this many bytes.
    Yes(u64),
    /// Recorded (from a peer) but not held here yet.
    No(Box<PathRecord>),
    Unknown,
}

/// Whether we hold the NAR with this hash.
async fn nar_len(st: &HttpState, hash: &[u8; 32]) -> Result<Local, String> {
    let db = st.db.clone();
    let h = *hash;
    let rec = tokio::task::spawn_blocking(move || db.by_blake3(&h))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    match rec {
        None => Ok(Local::Unknown),
        Some(r) if r.local && st.blobs.has(hash).await.map_err(|e| e.to_string())? => {
            Ok(Local::Yes(r.nar_size))
        }
        Some(r) => Ok(Local::No(Box::new(r))),
    }
}

/// Stream a NAR to Nix while fetching it from peers (verified and kept once complete).
/// Ranges are not offered for these: the whole NAR comes back (200), as RFC 9110 allows.
async fn from_peers(st: &HttpState, rec: PathRecord, head: bool) -> Response {
    let Some(mesh) = st.mesh.clone() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let len = rec.nar_size;
    let body = if head {
        Body::empty()
    } else {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(16);
        tokio::spawn(async move {
            if let Err(e) = mesh.fetch(&rec, Some(tx)).await {
                tracing::warn!("http: on-demand fetch: {e}");
            }
        });
        Body::from_stream(futures::stream::poll_fn(move |cx| rx.poll_recv(cx)))
    };
    let mut resp = Response::new(body);
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-nix-nar"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    resp
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
