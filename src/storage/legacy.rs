//! Taking over the NARs of a data dir written by `e5a6e05`, which kept every NAR (its own
//! builds' too) in an iroh-blobs store in `<data-dir>/blobs`. Each NAR is read out once: a path
//! that is valid in the local Nix store with the same NarHash becomes an own path (served from
//! the store; the copy is dropped), any other becomes a NAR file of the storage (counted against
//! the cap, evicted like the rest). Then the old store and tables are removed. iroh-blobs stays
//! a dependency for this alone.

use std::path::Path;

use iroh_blobs::Hash;
use iroh_blobs::store::fs::FsStore;
use sha2::Digest as _;

use super::{Storage, StorageError, hex};
use crate::chunks::LeafHasher;
use crate::db::{Claim, LegacyBlob, OwnRecord};
use crate::nix::{NarInfo, StorePath};

pub(super) fn migrate(storage: &Storage, data_dir: &Path) -> Result<(), StorageError> {
    let old_dir = data_dir.join("blobs");
    let blobs = storage.inner.db.legacy_blobs()?;
    if blobs.is_empty() || !old_dir.exists() {
        // Nothing (left) to take over: an earlier start may have stopped after moving the NARs.
        storage.inner.db.drop_legacy()?;
        if old_dir.exists() {
            std::fs::remove_dir_all(&old_dir)?;
        }
        return Ok(());
    }
    tracing::info!(
        "storage: taking over {} NAR(s) from the previous format's blob store",
        blobs.len()
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let export_dir = storage.partial_dir().join("legacy");
    std::fs::create_dir_all(&export_dir)?;
    let (own, files) = rt.block_on(async {
        let store = FsStore::load(&old_dir)
            .await
            .map_err(|e| StorageError::Task(format!("opening the old blob store: {e}")))?;
        let mut own = Vec::new();
        let mut files = Vec::new();
        for b in &blobs {
            let target = export_dir.join(format!("{}.nar", hex(&b.blake3)));
            if let Err(e) = store.export(Hash::from_bytes(b.blake3), &target).await {
                tracing::warn!(
                    "storage: {} not in the old blob store ({e}); skipped",
                    b.store_path
                );
                continue;
            }
            let digests = match digests_of(&target) {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!("storage: {}: {e}; skipped", b.store_path);
                    continue;
                }
            };
            if digests.1.root() != b.blake3 || digests.1.size() != b.nar_size {
                tracing::warn!(
                    "storage: {}: old blob does not match its record; dropped",
                    b.store_path
                );
                continue;
            }
            match classify(storage, b, &digests) {
                Ok(Some(rec)) => {
                    own.push(rec);
                    let _ = std::fs::remove_file(&target);
                }
                Ok(None) => files.push((b.clone(), target, digests.1)),
                Err(e) => tracing::warn!("storage: {}: {e}; skipped", b.store_path),
            }
        }
        let _ = store.shutdown().await;
        Ok::<_, StorageError>((own, files))
    })?;
    let n_own = own.len();
    storage.inner.db.record_own(&[], &own, 0)?;
    let mut n_files = 0;
    for (b, path, leaves) in files {
        let partial = storage.begin(&b.blake3, b.nar_size)?;
        std::fs::rename(&path, partial.path())?;
        partial.finish(&leaves.to_bytes())?;
        n_files += 1;
    }
    storage.inner.db.drop_legacy()?;
    std::fs::remove_dir_all(&old_dir)?;
    let _ = std::fs::remove_dir_all(&export_dir);
    tracing::info!(
        "storage: previous format taken over: {n_own} own path(s) now served from the Nix store, {n_files} NAR file(s) kept"
    );
    Ok(())
}

/// The sha256 and the BLAKE3 leaves of a file, streamed.
fn digests_of(path: &Path) -> Result<([u8; 32], crate::chunks::Leaves), StorageError> {
    use std::io::Read as _;
    let mut f = std::fs::File::open(path)?;
    let mut h = LeafHasher::new();
    let mut sha = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        sha.update(&buf[..n]);
    }
    Ok((sha.finalize().into(), h.finish()))
}

/// An own record for `b` if its path is valid in the local store with the NAR's sha256.
fn classify(
    storage: &Storage,
    b: &LegacyBlob,
    (sha, leaves): &([u8; 32], crate::chunks::Leaves),
) -> Result<Option<OwnRecord>, StorageError> {
    let Ok(path) = StorePath::parse(&b.store_path) else {
        return Ok(None);
    };
    let info = storage
        .inner
        .store
        .with(|db| db.query_path(&path))
        .ok()
        .flatten();
    let Some(info) = info else {
        return Ok(None);
    };
    if *sha != info.nar_hash.0 || info.nar_size != b.nar_size {
        return Ok(None);
    }
    let Some(rec) = storage.inner.db.path(&b.hash_part)? else {
        return Ok(None);
    };
    let Some(claim) = rec.claim(&b.blake3) else {
        return Ok(None);
    };
    let narinfo = NarInfo::parse(&claim.narinfo).map_err(|e| StorageError::Task(e.to_string()))?;
    if narinfo.nar_hash.0 != *sha {
        return Ok(None);
    }
    Ok(Some(OwnRecord {
        store_path: b.store_path.clone(),
        claim: Claim {
            own: true,
            ..claim.clone()
        },
        leaves: leaves.to_bytes(),
    }))
}
