//! The local Nix store as the node sees it: the store database, opened on first use (a fresh
//! store may not have one yet when the node starts) and shared behind a lock by the ingest
//! and pipeline tasks. Callers run it off async threads.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::nix::StorePath;
use crate::nix::store_db::{StoreDb, StoreDbError, real_path};

/// One store database connection, opened lazily and reopened after a failure.
#[derive(Debug)]
pub struct LocalStore {
    root: PathBuf,
    conn: Mutex<Option<StoreDb>>,
}

impl LocalStore {
    pub fn new(root: &Path) -> Self {
        LocalStore {
            root: root.to_owned(),
            conn: Mutex::new(None),
        }
    }

    /// The store's root (`/` for the system store).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where a store path's files are on disk.
    pub fn real_path(&self, p: &StorePath) -> PathBuf {
        real_path(&self.root, p)
    }

    /// Run `f` on the database (blocking), opening it first if needed.
    pub fn with<T>(
        &self,
        f: impl FnOnce(&StoreDb) -> Result<T, StoreDbError>,
    ) -> Result<T, StoreDbError> {
        let mut guard = self
            .conn
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if guard.is_none() {
            *guard = Some(StoreDb::open(&self.root)?);
        }
        let db = guard.as_ref().ok_or_else(|| StoreDbError::Corrupt {
            path: self.root.display().to_string(),
            why: "store database not open".into(),
        })?;
        let res = f(db);
        if matches!(res, Err(StoreDbError::Query(_))) {
            // Reopen next time: the database may have been replaced or recovered.
            *guard = None;
        }
        res
    }
}
