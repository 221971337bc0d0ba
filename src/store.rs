//! The local Nix store as the node sees it: the store database, opened on first use (a fresh
//! store may not have one yet when the node starts) and shared behind a lock by the ingest
//! and pipeline tasks. Callers run it off async threads.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use crate::nix::StorePath;
use crate::nix::store_db::{StoreDb, StoreDbError, real_path};

/// One store database connection, opened lazily and reopened after a failure.
#[derive(Debug)]
pub struct LocalStore {
    root: PathBuf,
    conn: Mutex<Option<StoreDb>>,
    /// How long a query waits for another process's lock on the database.
    busy: Duration,
}

impl LocalStore {
    pub fn new(root: &Path) -> Self {
        Self::waiting(root, crate::nix::store_db::BUSY_WAIT)
    }

    /// A store whose queries give up after `busy` while another process holds the database
    /// locked ([`StoreDbError::is_busy`]), for a caller with something better to do meanwhile.
    pub fn waiting(root: &Path, busy: Duration) -> Self {
        LocalStore {
            root: root.to_owned(),
            conn: Mutex::new(None),
            busy,
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
            *guard = Some(StoreDb::open_waiting(&self.root, self.busy)?);
        }
        let db = guard.as_ref().ok_or_else(|| StoreDbError::Corrupt {
            path: self.root.display().to_string(),
            why: "store database not open".into(),
        })?;
        let res = f(db);
        if matches!(&res, Err(e @ StoreDbError::Query(_)) if !e.is_busy()) {
            // Reopen next time: the database may have been replaced or recovered (a lock held
            // by another process says nothing of the kind).
            *guard = None;
        }
        res
    }
}
