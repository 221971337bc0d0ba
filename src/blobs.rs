//! The content-addressed NAR store: iroh-blobs' filesystem store, keyed by BLAKE3, behind our
//! own interface (no iroh-blobs type leaves this module). NARs are streamed in as they are
//! serialized, never held whole.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use iroh_blobs::Hash;
use iroh_blobs::store::fs::FsStore;
use iroh_blobs::store::fs::options::PathOptions;
use tokio::sync::mpsc;

use crate::nix::nar::{self, NarDigests};

/// Errors of the blob store.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("blob store: {0}")]
    Store(String),
    #[error("serializing {path}: {source}")]
    Nar {
        path: PathBuf,
        source: nar::NarError,
    },
    #[error("blob store computed BLAKE3 {store} but the NAR writer {ours}")]
    HashMismatch { store: String, ours: String },
}

fn store_err(e: impl std::fmt::Display) -> BlobError {
    BlobError::Store(e.to_string())
}

/// A handle to the blob store; cheap to clone.
#[derive(Clone, Debug)]
pub struct BlobStore {
    store: FsStore,
    /// Where the store keeps the data files of complete blobs (its documented layout).
    paths: Arc<PathOptions>,
}

/// The tag that keeps a NAR's blob alive.
fn tag(hash: &[u8; 32]) -> String {
    format!("nar/{}", Hash::from_bytes(*hash).to_hex())
}

/// A `std::io::Write` that hands each write to an async stream.
struct ChannelWriter(mpsc::Sender<io::Result<Bytes>>);

impl io::Write for ChannelWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0
            .blocking_send(Ok(Bytes::copy_from_slice(buf)))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "blob store stopped reading"))?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl BlobStore {
    /// Open (or create) the store in `dir`.
    pub async fn open(dir: &Path) -> Result<Self, BlobError> {
        let store = FsStore::load(dir).await.map_err(store_err)?;
        Ok(BlobStore {
            store,
            paths: Arc::new(PathOptions::new(dir)),
        })
    }

    /// Serialize `path` to a NAR straight into the store; returns its size and hashes.
    pub async fn import_nar(&self, path: PathBuf) -> Result<NarDigests, BlobError> {
        let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(4);
        let src = path.clone();
        let writer = tokio::task::spawn_blocking(move || {
            let res = nar::dump_hashed(&src, ChannelWriter(tx.clone()));
            if let Err(e) = &res {
                // Abort the import rather than store a truncated NAR.
                let _ = tx.blocking_send(Err(io::Error::other(e.to_string())));
            }
            res
        });
        let stream = tokio_stream_from(rx);
        let added = self.store.add_stream(stream).await.temp_tag().await;
        let digests = writer
            .await
            .map_err(store_err)?
            .map_err(|source| BlobError::Nar { path, source })?;
        let temp = added.map_err(store_err)?;
        let hash = temp.hash();
        if hash.as_bytes() != &digests.blake3 {
            return Err(BlobError::HashMismatch {
                store: hash.to_hex(),
                ours: Hash::from_bytes(digests.blake3).to_hex(),
            });
        }
        Ok(digests)
    }

    /// Import a byte stream (a NAR arriving from a peer); returns the BLAKE3 hash of what
    /// arrived. An `Err` item aborts the import.
    pub async fn import_stream(
        &self,
        rx: mpsc::Receiver<io::Result<Bytes>>,
    ) -> Result<[u8; 32], BlobError> {
        let temp = self
            .store
            .add_stream(tokio_stream_from(rx))
            .await
            .temp_tag()
            .await
            .map_err(store_err)?;
        Ok(*temp.hash().as_bytes())
    }

    /// Keep the blob `hash` (pin it with a named tag), after its NAR was checked.
    pub async fn keep(&self, hash: &[u8; 32]) -> Result<(), BlobError> {
        self.store
            .tags()
            .set(tag(hash), Hash::from_bytes(*hash))
            .await
            .map_err(store_err)
    }

    /// Make every change so far durable (before recording it elsewhere).
    pub async fn sync(&self) -> Result<(), BlobError> {
        self.store.sync_db().await.map_err(store_err)
    }

    /// True if the whole blob is present.
    pub async fn has(&self, hash: &[u8; 32]) -> Result<bool, BlobError> {
        self.store
            .has(Hash::from_bytes(*hash))
            .await
            .map_err(store_err)
    }

    /// The bytes `start..end` of a present blob, as a stream of large chunks. A complete blob
    /// is read straight from its data file (several times faster than the store's export,
    /// which hands out 16 KiB leaves through its actor); small (inlined) or partial blobs go
    /// through the export.
    pub fn range(
        &self,
        hash: &[u8; 32],
        start: u64,
        end: u64,
    ) -> impl futures::Stream<Item = io::Result<Bytes>> + Send + 'static {
        use futures::StreamExt as _;
        let this = self.clone();
        let hash = *hash;
        futures::stream::once(async move {
            match this.data_file(&hash, end).await {
                Some(file) => read_file_range(file, start, end).left_stream(),
                None => this.export(&hash, start, end).right_stream(),
            }
        })
        .flatten()
    }

    /// The open data file of a complete blob at least `end` bytes long, if it has one.
    async fn data_file(&self, hash: &[u8; 32], end: u64) -> Option<std::fs::File> {
        // Blobs up to 16 KiB live inside the store's database, not in a file.
        if end <= INLINE_MAX || !self.has(hash).await.ok()? {
            return None;
        }
        let path = self.paths.data_path(&Hash::from_bytes(*hash));
        let file = std::fs::File::open(path).ok()?;
        (file.metadata().ok()?.len() >= end).then_some(file)
    }

    /// The bytes `start..end` through the store's streaming export.
    fn export(
        &self,
        hash: &[u8; 32],
        start: u64,
        end: u64,
    ) -> impl futures::Stream<Item = io::Result<Bytes>> + Send + 'static + use<> {
        use futures::StreamExt as _;
        use iroh_blobs::api::proto::ExportRangesItem;
        self.store
            .export_ranges(Hash::from_bytes(*hash), start..end)
            .stream()
            .filter_map(|item| async move {
                match item {
                    ExportRangesItem::Size(_) => None,
                    ExportRangesItem::Data(leaf) => Some(Ok(leaf.data)),
                    ExportRangesItem::Error(e) => Some(Err(io::Error::other(e.to_string()))),
                }
            })
            // The store hands out 16 KiB leaves; pass on whatever is ready as one chunk, so
            // consumers (QUIC streams, HTTP bodies) see few large writes instead of many small.
            .ready_chunks(64)
            .map(|pieces| {
                if pieces.len() == 1 {
                    return pieces
                        .into_iter()
                        .next()
                        .unwrap_or_else(|| Ok(Bytes::new()));
                }
                let mut out = bytes::BytesMut::with_capacity(
                    pieces
                        .iter()
                        .map(|p| p.as_ref().map_or(0, |b| b.len()))
                        .sum(),
                );
                for p in pieces {
                    out.extend_from_slice(&p?);
                }
                Ok(out.freeze())
            })
    }

    /// Flush and stop the store.
    pub async fn shutdown(&self) -> Result<(), BlobError> {
        self.store.shutdown().await.map_err(store_err)
    }
}

/// The largest blob the store keeps inline (iroh-blobs' default `max_data_inlined`).
const INLINE_MAX: u64 = 16 * 1024;

/// Size of the chunks read from a data file.
const READ_CHUNK: u64 = 1 << 20;

/// `start..end` of `file`, read on a blocking thread a chunk ahead of the consumer.
fn read_file_range(
    file: std::fs::File,
    start: u64,
    end: u64,
) -> impl futures::Stream<Item = io::Result<Bytes>> + Send + 'static {
    use std::os::unix::fs::FileExt as _;
    let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(2);
    tokio::task::spawn_blocking(move || {
        let mut pos = start;
        while pos < end {
            let len = READ_CHUNK.min(end - pos) as usize;
            let mut buf = bytes::BytesMut::zeroed(len);
            let item = file.read_exact_at(&mut buf, pos).map(|()| buf.freeze());
            let failed = item.is_err();
            if tx.blocking_send(item).is_err() || failed {
                return;
            }
            pos += len as u64;
        }
    });
    tokio_stream_from(rx)
}

/// An mpsc receiver as a `Stream` (without pulling in tokio-stream).
fn tokio_stream_from(
    mut rx: mpsc::Receiver<io::Result<Bytes>>,
) -> impl futures::Stream<Item = io::Result<Bytes>> + Send + Sync + 'static {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
