//! The node's HTTP binary cache for the local Nix: `nix-cache-info`, `<hash>.narinfo`, the NARs
//! the narinfos name (read verified from the storage, with Range support, or fetched from peers
//! while Nix downloads), and `/metrics`. A narinfo is answered only when its NAR can be had.
//! Requests are matched by hand against the few shapes Nix asks for; everything else is 404,
//! and anything that looks like traversal is 400. Internals never leak to clients. This file
//! owns the state, routing and narinfo answers; [`nar`] the NAR answers.

mod capped;
pub use capped::MAX_CONNECTIONS;
mod nar;
mod server;
pub use server::MAX_HEAD;
pub mod spin;
use narmesh_formats::route::{Route, route};

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use crate::db::Db;
use crate::mesh::MeshHandle;
use crate::metrics::{HttpLabels, Metrics, RouteLabels};
use crate::storage::Storage;

/// What the HTTP handlers share.
#[derive(Clone)]
pub struct HttpState {
    pub db: Db,
    pub storage: Storage,
    pub metrics: Arc<Metrics>,
    /// The rendered `nix-cache-info`.
    pub cache_info: Arc<str>,
    /// Recent narinfo answers by hash part (`None`: 404), bounded by bytes: answered without
    /// leaving the async thread. An entry is dropped whenever its record changes.
    pub narinfos: Arc<quick_cache::sync::Cache<String, Option<Bytes>, AnswerWeight>>,
    /// Bumped for every record change seen, so a lookup that raced a change is not cached.
    pub generation: Arc<std::sync::atomic::AtomicU64>,
    /// Where NARs this node does not hold come from.
    pub mesh: Option<MeshHandle>,
    /// The node's main runtime: NAR answers (reads, verification, fetches from peers) run
    /// there, below normal priority, while the HTTP thread only parses, routes and writes.
    pub main: tokio::runtime::Handle,
    /// The HTTP thread's busy-poll after an answer (its runtime calls `before_park`).
    pub spin: Arc<spin::Spin>,
    /// How long a connection may go without a byte read or written (`[http] idle-secs`).
    pub idle: std::time::Duration,
}

/// Bytes of narinfo answers kept in memory.
pub const NARINFO_CACHE_BYTES: u64 = 8 << 20;

/// The weight of a cached answer: its bytes and its key.
#[derive(Debug, Clone)]
pub struct AnswerWeight;

impl quick_cache::Weighter<String, Option<Bytes>> for AnswerWeight {
    fn weight(&self, k: &String, v: &Option<Bytes>) -> u64 {
        (k.len() + v.as_ref().map_or(0, |b| b.len()) + 48) as u64
    }
}

impl HttpState {
    /// The shared state (call inside the runtime; run [`Self::follow_changes`] beside it).
    pub fn new(
        db: Db,
        storage: Storage,
        metrics: Arc<Metrics>,
        priority: u32,
        busy_poll: std::time::Duration,
        idle: std::time::Duration,
        mesh: Option<MeshHandle>,
    ) -> Self {
        HttpState {
            mesh,
            idle,
            main: tokio::runtime::Handle::current(),
            spin: Arc::new(spin::Spin::new(busy_poll)),
            db,
            storage,
            metrics,
            cache_info: crate::nix::narinfo::cache_info(priority).into(),
            narinfos: Arc::new(quick_cache::sync::Cache::with_weighter(
                100_000,
                NARINFO_CACHE_BYTES,
                AnswerWeight,
            )),
            generation: Arc::new(std::sync::atomic::AtomicU64::new(0)),
        }
    }

    /// Follow record changes: a changed path's narinfo answer is no longer cached. Runs until
    /// the database is gone.
    pub fn follow_changes(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let (cache, generation) = (self.narinfos.clone(), self.generation.clone());
        let mut changes = self.db.subscribe_changed_paths();
        async move {
            use std::sync::atomic::Ordering;
            loop {
                match changes.recv().await {
                    Ok(hash) => {
                        generation.fetch_add(1, Ordering::SeqCst);
                        cache.remove(&hash);
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        generation.fetch_add(1, Ordering::SeqCst);
                        cache.clear();
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        }
    }
}

/// What a listener answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Serves {
    /// The binary cache and `/metrics` (`[http] listen`).
    Cache,
    /// `/metrics` only, 404 for the rest (`[http] metrics-listen`): for a scraper on another
    /// host, without opening the cache to it.
    MetricsOnly,
}

/// Serve on `listener` until cancelled and every connection has closed (errors are the
/// clients': accepting waits them out, and a connection's own is logged at debug).
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: HttpState,
    serves: Serves,
    cancel: CancellationToken,
) {
    let (spin, idle) = (state.spin.clone(), state.idle);
    let app = match serves {
        Serves::Cache => axum::Router::new().fallback(handle),
        Serves::MetricsOnly => axum::Router::new().fallback(metrics_only),
    }
    .with_state(state);
    // Capped, and every connection with TCP_NODELAY: without it a streamed NAR's small writes
    // wait for the client's delayed ACK (40 ms per small NAR on Linux).
    spin.watch(std::os::fd::AsFd::as_fd(&listener));
    let listener = capped::Capped::new(listener, capped::MAX_CONNECTIONS, idle, spin);
    server::run(listener, app, idle, cancel).await
}

async fn metrics_only(st: State<HttpState>, req: Request) -> Response {
    if matches!(route(req.uri().path()), Route::Metrics) {
        handle(st, req).await
    } else {
        StatusCode::NOT_FOUND.into_response()
    }
}

async fn handle(State(st): State<HttpState>, req: Request) -> Response {
    let started = Instant::now();
    let r = route(req.uri().path());
    let name = r.name();
    // A NAR's body comes from other threads: no busy-poll after it.
    let quick = !matches!(r, Route::Nar(_));
    let head = req.method() == Method::HEAD;
    let resp = if req.method() != Method::GET && !head {
        (
            StatusCode::METHOD_NOT_ALLOWED,
            [(header::ALLOW, "GET, HEAD")],
        )
            .into_response()
    } else {
        match r {
            Route::CacheInfo => {
                if crate::killpoint::fault("http.hangs") {
                    crate::killpoint::hang();
                }
                text(st.cache_info.to_string(), "text/x-nix-cache-info")
            }
            Route::Metrics => text(st.metrics.render(), "text/plain; version=0.0.4"),
            Route::NarInfo(h) => narinfo(&st, h).await,
            Route::Nar(hash) => {
                let range = req.headers().get(header::RANGE).cloned();
                let st2 = st.clone();
                // Aborted if the client goes away first: an on-demand fetch's wait for its
                // first bytes holds a storage guard and the transfer.
                let task = st
                    .main
                    .spawn(async move { nar::nar(&st2, hash, range, head).await });
                let _waiting = st.spin.waiting();
                match tokio_util::task::AbortOnDropHandle::new(task).await {
                    Ok(r) => r,
                    Err(e) => internal(e),
                }
            }
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
    if quick {
        st.spin.answered();
    }
    if head {
        let (parts, _) = resp.into_parts();
        return Response::from_parts(parts, Body::empty());
    }
    resp
}

fn text(body: String, mime: &'static str) -> Response {
    ([(header::CONTENT_TYPE, mime)], body).into_response()
}

pub(super) fn internal(e: impl std::fmt::Display) -> Response {
    tracing::error!("http: {e}");
    StatusCode::INTERNAL_SERVER_ERROR.into_response()
}

async fn narinfo(st: &HttpState, hash: &str) -> Response {
    use std::sync::atomic::Ordering;
    let answer = |body: Option<Bytes>| match body {
        Some(b) => ([(header::CONTENT_TYPE, "text/x-nix-narinfo")], b).into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    };
    if let Some(body) = st.narinfos.get(hash) {
        return answer(body);
    }
    let generation = st.generation.load(Ordering::SeqCst);
    let (db, storage, mesh) = (st.db.clone(), st.storage.clone(), st.mesh.clone());
    let key = hash.to_owned();
    let _waiting = st.spin.waiting();
    let found = tokio::task::spawn_blocking(move || -> Result<Option<Bytes>, String> {
        let Some(rec) = db.path(&key).map_err(|e| e.to_string())? else {
            return Ok(None);
        };
        // Served only if its NAR can be had: held here, else a peer holds it (the claim the
        // node speaks of, `PathRecord::served`).
        let servable = rec.obtainable(
            |c| storage.holds_blocking(&c.blake3),
            |c| mesh.as_ref().is_some_and(|m| m.providers(c) > 0),
        );
        Ok(servable.map(|c| Bytes::from(c.narinfo.clone())))
    })
    .await;
    match found {
        Ok(Ok(body)) => {
            // Not cached if a record changed meanwhile (the answer may be stale already).
            if st.generation.load(Ordering::SeqCst) == generation {
                st.narinfos.insert(hash.to_owned(), body.clone());
            }
            answer(body)
        }
        Ok(Err(e)) => internal(e),
        Err(e) => internal(e),
    }
}
