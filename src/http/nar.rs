//! NAR answers of the HTTP cache: a NAR this node holds, read verified from the storage (a
//! file, or its own build serialized from the Nix store) with Range support; a NAR it does not
//! hold, streamed to the client while the mesh fetches it from peers (only verified bytes are
//! handed on). Both run on the node's main runtime, below normal priority.

use axum::body::Body;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use narmesh_formats::range;

use super::{HttpState, internal};
use crate::mesh::{Progress, Want};
use crate::metrics::SourceLabels;
use crate::storage::Held;

pub(super) async fn nar(
    st: &HttpState,
    hash: [u8; 32],
    range_header: Option<HeaderValue>,
    head: bool,
) -> Response {
    let held = match st.storage.held(&hash).await {
        Ok(h) => h,
        Err(e) => return internal(e),
    };
    let Some(held) = held else {
        return from_peers(st, hash, head).await;
    };
    // Only NARs a record names are served (a record dropped as no longer trusted leaves its
    // NAR file to eviction, not to clients).
    let Some(len) = nar_size(st, hash).await else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let source = match held {
        Held::File { .. } => "file",
        Held::Store { .. } => "store",
    };
    let range_header = range_header.as_ref().and_then(|v| v.to_str().ok());
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
        match st.storage.read(&hash, start, start + count).await {
            Ok(rx) => counted(st, source, rx),
            Err(crate::storage::StorageError::NotHeld) => {
                return from_peers(st, hash, head).await;
            }
            Err(e) => return internal(e),
        }
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

/// A body from a stream of verified pieces, counting the bytes served from `source`.
fn counted<E: std::fmt::Display + Send + 'static>(
    st: &HttpState,
    source: &'static str,
    mut rx: tokio::sync::mpsc::Receiver<Result<Bytes, E>>,
) -> Body {
    let counter = st
        .metrics
        .served_bytes
        .get_or_create(&SourceLabels { source })
        .clone();
    Body::from_stream(futures::stream::poll_fn(move |cx| {
        rx.poll_recv(cx).map(|item| {
            item.map(|r| {
                r.inspect(|b| {
                    counter.inc_by(b.len() as u64);
                })
                .map_err(|e| std::io::Error::other(e.to_string()))
            })
        })
    }))
}

/// The NAR size a record gives for these bytes.
async fn nar_size(st: &HttpState, hash: [u8; 32]) -> Option<u64> {
    let db = st.db.clone();
    tokio::task::spawn_blocking(move || {
        db.by_blake3(&hash)
            .ok()?
            .iter()
            .find_map(|r| r.claim(&hash).map(|c| c.nar_size))
    })
    .await
    .ok()?
}

/// How long an on-demand fetch may take to produce its first verified bytes before the client
/// is told 502 (no header has been sent until then).
const FIRST_BYTES: std::time::Duration = std::time::Duration::from_secs(30);

/// Stream a NAR to Nix while it is fetched from peers: only verified bytes are handed on, and
/// nothing is answered (no header sent) until the first bytes verified or the fetch failed:
/// 404 if no peer holds it, 502 if none could send it. Ranges are not offered for these: the
/// whole NAR comes back (200), as RFC 9110 allows.
async fn from_peers(st: &HttpState, hash: [u8; 32], head: bool) -> Response {
    let Some(mesh) = st.mesh.clone() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let db = st.db.clone();
    let want = tokio::task::spawn_blocking(move || {
        let recs = db.by_blake3(&hash).ok()?;
        let claim = recs
            .iter()
            .find_map(|r| r.claim(&hash).filter(|c| !c.failed))?
            .clone();
        Some(Want {
            claim,
            paths: recs.iter().map(|r| r.hash_part().to_owned()).collect(),
        })
    })
    .await
    .ok()
    .flatten();
    let Some(want) = want else {
        return StatusCode::NOT_FOUND.into_response();
    };
    if mesh.providers(&want.claim) == 0 {
        return StatusCode::NOT_FOUND.into_response();
    }
    let len = want.claim.nar_size;
    let headers = |body| {
        let mut resp = Response::new(body);
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-nix-nar"),
        );
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        resp
    };
    if head {
        return headers(Body::empty());
    }
    let guard = st.storage.hold(&hash);
    let t = mesh.fetch(want);
    let mut progress = t.progress();
    let first = tokio::time::timeout(FIRST_BYTES, async {
        loop {
            let p = progress.borrow_and_update().clone();
            if p.verified > 0 || p.done.is_some() {
                return p;
            }
            if progress.changed().await.is_err() {
                return Progress {
                    verified: 0,
                    done: Some(Err("the fetch ended".into())),
                };
            }
        }
    })
    .await;
    match first {
        Err(_) => return StatusCode::BAD_GATEWAY.into_response(),
        Ok(Progress {
            verified: 0,
            done: Some(Err(e)),
        }) => {
            tracing::warn!("http: on-demand fetch: {e}");
            return StatusCode::BAD_GATEWAY.into_response();
        }
        Ok(_) => {}
    }
    headers(counted(
        st,
        "peer",
        t.follow(st.storage.read_budget(), guard, false),
    ))
}
