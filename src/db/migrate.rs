//! Reading a data dir written by `e5a6e05` (records `paths_v2`, log `log_v1`, `blobs_v2`): its
//! records become records with one claim each (unbound: version 1 did not bind BLAKE3 hashes),
//! with the same log sequence numbers, so peers' catch-up cursors and the mirror's stay valid.
//! The NARs its iroh-blobs store held are moved by `crate::storage` (which asks
//! [`Db::legacy_blobs`]), after which [`Db::drop_legacy`] removes the old tables.

use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

use super::records::PathRecordV2;
use super::{
    BLOBS, Claim, Db, DbError, LOG, LOG_INDEX, LOG_NEXT, META, PATHS, PathRecord, Provider,
    durable, get_meta,
};

const PATHS_V2: TableDefinition<&str, &[u8]> = TableDefinition::new("paths_v2");
const LOG_V1: TableDefinition<u64, &str> = TableDefinition::new("log_v1");
const BLOBS_V2: TableDefinition<&[u8], &str> = TableDefinition::new("blobs_v2");
const NAR_BYTES_V2: &str = "nar.bytes";

/// A NAR the old blob store held for a record.
#[derive(Debug, Clone)]
pub struct LegacyBlob {
    pub blake3: [u8; 32],
    pub hash_part: String,
    pub store_path: String,
    pub nar_size: u64,
}

fn table_exists(tx: &redb::ReadTransaction, name: &str) -> Result<bool, DbError> {
    use redb::TableHandle as _;
    Ok(tx.list_tables()?.any(|t| t.name() == name))
}

impl Db {
    /// Convert `paths_v2`/`log_v1`/`blobs_v2` into the current tables, once (the old tables
    /// stay until the storage has moved the old blobs).
    pub(super) fn migrate(&self) -> Result<(), DbError> {
        {
            let db = self.db.get()?;
            let tx = db.begin_read()?;
            if !table_exists(&tx, "paths_v2")? || tx.open_table(PATHS)?.len()? > 0 {
                return Ok(());
            }
            if tx.open_table(PATHS_V2)?.len()? == 0 {
                return Ok(());
            }
        }
        let db = self.db.get()?;
        let tx = durable(&db)?;
        let mut n = 0;
        {
            let old = tx.open_table(PATHS_V2)?;
            let old_log = tx.open_table(LOG_V1)?;
            let mut paths = tx.open_table(PATHS)?;
            let mut log = tx.open_table(LOG)?;
            let mut index = tx.open_table(LOG_INDEX)?;
            let mut blobs = tx.open_multimap_table(BLOBS)?;
            for entry in old.iter()? {
                let (hash, v) = entry?;
                let r: PathRecordV2 = postcard::from_bytes(v.value())?;
                let rec = PathRecord {
                    store_path: r.store_path,
                    recorded_at: r.recorded_at,
                    claims: vec![Claim {
                        narinfo: r.narinfo,
                        blake3: r.blake3,
                        nar_size: r.nar_size,
                        bindings: Vec::new(),
                        upstream_refs: Vec::new(),
                        own: false,
                        providers: r
                            .providers
                            .iter()
                            .map(|id| Provider {
                                id: *id,
                                holds: true,
                                at_ms: 0,
                                sig: Vec::new(),
                            })
                            .collect(),
                        failed: false,
                        withdrawn: false,
                    }],
                };
                paths.insert(hash.value(), postcard::to_allocvec(&rec)?.as_slice())?;
                blobs.insert(r.blake3.as_slice(), hash.value())?;
                n += 1;
            }
            for entry in old_log.iter()? {
                let (seq, hash) = entry?;
                log.insert(seq.value(), hash.value())?;
                index.insert(hash.value(), seq.value())?;
            }
            // LOG_NEXT (the last sequence number) is kept as it was.
            let meta = tx.open_table(META)?;
            let _ = get_meta(&meta, LOG_NEXT)?;
        }
        tx.commit()?;
        tracing::info!("node database: {n} record(s) of the previous format migrated");
        Ok(())
    }

    /// The NARs the old blob store held (records marked local in `paths_v2`), while the old
    /// tables are there.
    pub fn legacy_blobs(&self) -> Result<Vec<LegacyBlob>, DbError> {
        let db = self.db.get()?;
        let tx = db.begin_read()?;
        if !table_exists(&tx, "paths_v2")? {
            return Ok(Vec::new());
        }
        let old = tx.open_table(PATHS_V2)?;
        let mut out = Vec::new();
        for entry in old.iter()? {
            let (hash, v) = entry?;
            let r: PathRecordV2 = postcard::from_bytes(v.value())?;
            if r.local {
                out.push(LegacyBlob {
                    blake3: r.blake3,
                    hash_part: hash.value().to_owned(),
                    store_path: r.store_path,
                    nar_size: r.nar_size,
                });
            }
        }
        Ok(out)
    }

    /// Remove the tables of the previous format (after the storage moved their blobs).
    pub fn drop_legacy(&self) -> Result<(), DbError> {
        let db = self.db.get()?;
        let tx = durable(&db)?;
        tx.delete_table(PATHS_V2)?;
        tx.delete_table(LOG_V1)?;
        tx.delete_table(BLOBS_V2)?;
        tx.open_table(META)?.remove(NAR_BYTES_V2)?;
        tx.commit()?;
        Ok(())
    }
}
