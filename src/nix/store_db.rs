//! A read-only reader of the Nix store database (`<root>/nix/var/nix/db/db.sqlite`, schema 10):
//! a path's narHash, narSize, references, deriver, signatures and CA, a derivation's outputs,
//! and closures. Works for `/` and for a chroot store root; batches run in one read transaction.

use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};

use super::hash::Sha256;
use super::keys::Signature;
use super::store_path::{STORE_DIR, StorePath};

/// Errors reading the store database.
#[derive(Debug, thiserror::Error)]
pub enum StoreDbError {
    #[error("opening the Nix store database {path}: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("querying the Nix store database: {0}")]
    Query(#[from] rusqlite::Error),
    #[error("the Nix store database holds a bad value for {path}: {why}")]
    Corrupt { path: String, why: String },
}

impl StoreDbError {
    /// True if another process held the database locked past the connection's busy wait (a
    /// writer's exclusive lock, under a rollback journal): asking again later may succeed.
    pub fn is_busy(&self) -> bool {
        let e = match self {
            StoreDbError::Open { source, .. } => source,
            StoreDbError::Query(e) => e,
            StoreDbError::Corrupt { .. } => return false,
        };
        matches!(
            e.sqlite_error_code(),
            Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
        )
    }
}

/// How long a connection waits for another process's lock on the database before a query
/// fails as busy ([`StoreDb::open`]'s).
pub const BUSY_WAIT: Duration = Duration::from_secs(10);

/// What the store database says of one valid path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathInfo {
    pub path: StorePath,
    pub nar_hash: Sha256,
    pub nar_size: u64,
    pub references: BTreeSet<StorePath>,
    pub deriver: Option<StorePath>,
    /// Signatures Nix holds for the path (ones it cannot parse are dropped).
    pub sigs: Vec<Signature>,
    pub ca: Option<String>,
    /// Seconds since the epoch.
    pub registration_time: i64,
}

/// A read-only connection to one store's database.
pub struct StoreDb {
    conn: Connection,
    root: PathBuf,
}

impl std::fmt::Debug for StoreDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StoreDb({})", self.root.display())
    }
}

impl StoreDb {
    /// Open the database of the store rooted at `root` (`/` for the system store); its queries
    /// wait up to [`BUSY_WAIT`] for another process's lock.
    pub fn open(root: &Path) -> Result<Self, StoreDbError> {
        Self::open_waiting(root, BUSY_WAIT)
    }

    /// [`StoreDb::open`], with queries (and the open's own check) waiting up to `busy` for
    /// another process's lock.
    pub fn open_waiting(root: &Path, busy: Duration) -> Result<Self, StoreDbError> {
        let path = db_path(root);
        let open_err = |source| StoreDbError::Open {
            path: path.clone(),
            source,
        };
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(&path, flags).map_err(open_err)?;
        conn.busy_timeout(busy).map_err(open_err)?;
        // Fail now, not at the first query, if this is not a Nix database.
        conn.query_row("SELECT count(*) FROM ValidPaths WHERE id = -1", [], |_| {
            Ok(())
        })
        .map_err(open_err)?;
        Ok(StoreDb {
            conn,
            root: root.to_owned(),
        })
    }

    /// Where a store path's files are on this machine's filesystem.
    pub fn real_path(&self, path: &StorePath) -> PathBuf {
        real_path(&self.root, path)
    }

    /// Metadata of one path; `None` if it is not valid in this store.
    pub fn query_path(&self, path: &StorePath) -> Result<Option<PathInfo>, StoreDbError> {
        Ok(self
            .query_paths(std::slice::from_ref(path))?
            .pop()
            .flatten())
    }

    /// Metadata of many paths in one read transaction, in the order asked.
    pub fn query_paths(&self, paths: &[StorePath]) -> Result<Vec<Option<PathInfo>>, StoreDbError> {
        let tx = self.conn.unchecked_transaction()?;
        let mut info = tx.prepare_cached(
            "SELECT id, hash, registrationTime, deriver, narSize, sigs, ca FROM ValidPaths WHERE path = ?1",
        )?;
        let mut refs = tx.prepare_cached(
            "SELECT v.path FROM Refs r JOIN ValidPaths v ON r.reference = v.id WHERE r.referrer = ?1",
        )?;
        let mut out = Vec::with_capacity(paths.len());
        for p in paths {
            let full = p.full();
            let row = info
                .query_row(params![full], |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, Option<String>>(3)?,
                        r.get::<_, Option<i64>>(4)?,
                        r.get::<_, Option<String>>(5)?,
                        r.get::<_, Option<String>>(6)?,
                    ))
                })
                .optional()?;
            let Some((id, hash, reg, deriver, nar_size, sigs, ca)) = row else {
                out.push(None);
                continue;
            };
            let corrupt = |why: String| StoreDbError::Corrupt {
                path: full.clone(),
                why,
            };
            let references = refs
                .query_map(params![id], |r| r.get::<_, String>(0))?
                .map(|r| {
                    let s = r?;
                    StorePath::parse(&s).map_err(|e| corrupt(e.to_string()))
                })
                .collect::<Result<BTreeSet<_>, _>>()?;
            out.push(Some(PathInfo {
                path: p.clone(),
                nar_hash: hash
                    .parse()
                    .map_err(|e: super::hash::HashError| corrupt(e.to_string()))?,
                nar_size: nar_size
                    .and_then(|n| u64::try_from(n).ok())
                    .filter(|&n| n > 0)
                    .ok_or_else(|| corrupt("narSize missing".into()))?,
                references,
                deriver: deriver
                    .filter(|d| !d.is_empty())
                    .and_then(|d| StorePath::parse(&d).ok()),
                sigs: sigs
                    .unwrap_or_default()
                    .split_ascii_whitespace()
                    .filter_map(|s| s.parse().ok())
                    .collect(),
                ca: ca.filter(|c| !c.is_empty()),
                registration_time: reg,
            }));
        }
        Ok(out)
    }

    /// Up to `limit` valid paths that are not derivations, with their NAR sizes, in the order
    /// they were registered (references before referrers).
    pub fn valid_paths(&self, limit: usize) -> Result<Vec<(StorePath, u64)>, StoreDbError> {
        let mut st = self.conn.prepare_cached(
            "SELECT path, narSize FROM ValidPaths WHERE path NOT LIKE '%.drv' ORDER BY id LIMIT ?1",
        )?;
        let rows = st.query_map(params![limit as i64], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, Option<i64>>(1)?))
        })?;
        rows.map(|r| {
            let (path, size) = r?;
            let p = StorePath::parse(&path).map_err(|e| StoreDbError::Corrupt {
                path: path.clone(),
                why: e.to_string(),
            })?;
            Ok((p, size.and_then(|s| u64::try_from(s).ok()).unwrap_or(0)))
        })
        .collect()
    }

    /// A number that goes down when, and only when, a path stops being valid: the count of
    /// valid paths less the last id given to one. Nix's `ValidPaths` is `AUTOINCREMENT`: an
    /// id is never given twice, so registering a path raises both by one, and a path deleted
    /// and registered again leaves the number one lower. `None` if the table gives ids some
    /// other way (not Nix's schema): then nothing can be told from it. One read transaction.
    pub fn removals_mark(&self) -> Result<Option<i64>, StoreDbError> {
        let tx = self.conn.unchecked_transaction()?;
        let schema: Option<String> = tx
            .query_row(
                "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'ValidPaths'",
                [],
                |r| r.get(0),
            )
            .optional()?;
        if !schema.is_some_and(|s| s.to_ascii_lowercase().contains("autoincrement")) {
            return Ok(None);
        }
        let count: i64 = tx.query_row("SELECT count(*) FROM ValidPaths", [], |r| r.get(0))?;
        let last: Option<i64> = tx
            .query_row(
                "SELECT seq FROM sqlite_sequence WHERE name = 'ValidPaths'",
                [],
                |r| r.get(0),
            )
            .optional()?;
        Ok(match last {
            Some(last) => Some(count - last),
            // No id given yet.
            None if count == 0 => Some(0),
            None => None,
        })
    }

    /// True if `path` is a valid path in this store.
    pub fn is_valid(&self, path: &StorePath) -> Result<bool, StoreDbError> {
        let mut st = self
            .conn
            .prepare_cached("SELECT 1 FROM ValidPaths WHERE path = ?1")?;
        Ok(st.exists(params![path.full()])?)
    }

    /// The outputs of a derivation as `(output name, path)`, from `DerivationOutputs`.
    pub fn derivation_outputs(
        &self,
        drv: &StorePath,
    ) -> Result<Vec<(String, StorePath)>, StoreDbError> {
        let mut st = self.conn.prepare_cached(
            "SELECT o.id, o.path FROM DerivationOutputs o JOIN ValidPaths v ON o.drv = v.id \
             WHERE v.path = ?1 ORDER BY o.id",
        )?;
        let rows = st.query_map(params![drv.full()], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
        })?;
        rows.map(|r| {
            let (name, path) = r?;
            let p = StorePath::parse(&path).map_err(|e| StoreDbError::Corrupt {
                path: drv.full(),
                why: e.to_string(),
            })?;
            Ok((name, p))
        })
        .collect()
    }

    /// The closure of `roots` (the roots and everything they reference, transitively), as far
    /// as the paths are valid, in one read transaction. Order: breadth first from the roots.
    pub fn closure(&self, roots: &[StorePath]) -> Result<Vec<StorePath>, StoreDbError> {
        let tx = self.conn.unchecked_transaction()?;
        let mut refs = tx.prepare_cached(
            "SELECT v.path FROM ValidPaths p JOIN Refs r ON r.referrer = p.id \
             JOIN ValidPaths v ON r.reference = v.id WHERE p.path = ?1",
        )?;
        let mut valid = tx.prepare_cached("SELECT 1 FROM ValidPaths WHERE path = ?1")?;
        let mut seen: HashSet<StorePath> = HashSet::new();
        let mut order = Vec::new();
        let mut queue: std::collections::VecDeque<StorePath> = roots.iter().cloned().collect();
        while let Some(p) = queue.pop_front() {
            if seen.contains(&p) || !valid.exists(params![p.full()])? {
                continue;
            }
            seen.insert(p.clone());
            for r in refs.query_map(params![p.full()], |r| r.get::<_, String>(0))? {
                let r = r?;
                let rp = StorePath::parse(&r).map_err(|e| StoreDbError::Corrupt {
                    path: p.full(),
                    why: e.to_string(),
                })?;
                if !seen.contains(&rp) {
                    queue.push_back(rp);
                }
            }
            order.push(p);
        }
        Ok(order)
    }
}

/// `<root>/nix/var/nix/db/db.sqlite`.
pub fn db_path(root: &Path) -> PathBuf {
    root.join("nix/var/nix/db/db.sqlite")
}

/// Where a store path's files are for the store rooted at `root`.
pub fn real_path(root: &Path, path: &StorePath) -> PathBuf {
    root.join(STORE_DIR.trim_start_matches('/'))
        .join(path.base_name())
}
