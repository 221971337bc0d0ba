//! The BLAKE3 leaves of every NAR held (own or file): 32 bytes per 16 KiB chunk group, what
//! serving a range verified needs. Kept in parts of [`PART`] bytes, one part to a page of the
//! database: a NAR's leaves as one value took a page of the next power of two (a 32 MiB NAR's
//! 64 KiB and a few bytes, a page of 128 KiB), so every NAR recorded wrote up to twice its
//! leaves. The previous format (`leaves_v1`, one value per NAR, as data dirs written before
//! hold it) is still read, and a NAR's row there goes when the NAR does.

use redb::{ReadableTable, TableDefinition};

use super::DbError;

/// Leaves by (BLAKE3, part number): parts of [`PART`] bytes, the last one shorter.
const LEAVES: TableDefinition<([u8; 32], u32), &[u8]> = TableDefinition::new("leaves_v2");
/// The previous format: all of a NAR's leaves as one value.
const LEAVES_V1: TableDefinition<&[u8], &[u8]> = TableDefinition::new("leaves_v1");

/// Bytes of leaves in one part: 120 leaves, so that a part and its key fill one 4 KiB page.
const PART: usize = 120 * 32;

pub(super) fn create_tables(tx: &redb::WriteTransaction) -> Result<(), DbError> {
    tx.open_table(LEAVES)?;
    tx.open_table(LEAVES_V1)?;
    Ok(())
}

/// The leaves tables of a write transaction.
pub(super) struct Leaves<'t> {
    parts: redb::Table<'t, ([u8; 32], u32), &'static [u8]>,
    v1: redb::Table<'t, &'static [u8], &'static [u8]>,
}

impl<'t> Leaves<'t> {
    pub(super) fn open(tx: &'t redb::WriteTransaction) -> Result<Self, DbError> {
        Ok(Leaves {
            parts: tx.open_table(LEAVES)?,
            v1: tx.open_table(LEAVES_V1)?,
        })
    }

    /// Keep `leaves` for the NAR `blake3` (leaves are the NAR's own: kept ones are not
    /// written again).
    pub(super) fn insert(&mut self, blake3: &[u8; 32], leaves: &[u8]) -> Result<(), DbError> {
        if self.parts.get((*blake3, 0))?.is_some() || self.v1.get(blake3.as_slice())?.is_some() {
            return Ok(());
        }
        for (i, part) in leaves.chunks(PART).enumerate() {
            self.parts.insert((*blake3, i as u32), part)?;
        }
        Ok(())
    }

    /// Drop the leaves of the NAR `blake3`, in either format.
    pub(super) fn remove(&mut self, blake3: &[u8; 32]) -> Result<(), DbError> {
        self.parts
            .retain_in((*blake3, 0)..=(*blake3, u32::MAX), |_, _| false)?;
        self.v1.remove(blake3.as_slice())?;
        Ok(())
    }
}

/// The leaves of the NAR `blake3`, if kept.
pub(super) fn read(
    tx: &redb::ReadTransaction,
    blake3: &[u8; 32],
) -> Result<Option<Vec<u8>>, DbError> {
    let mut out = Vec::new();
    if let Some(parts) = existing(tx.open_table(LEAVES))? {
        for part in parts.range((*blake3, 0)..=(*blake3, u32::MAX))? {
            out.extend_from_slice(part?.1.value());
        }
    }
    if !out.is_empty() {
        return Ok(Some(out));
    }
    // A data dir of the previous format.
    match existing(tx.open_table(LEAVES_V1))? {
        Some(v1) => Ok(v1.get(blake3.as_slice())?.map(|v| v.value().to_vec())),
        None => Ok(None),
    }
}

/// A table of a read transaction, none if the database has not got it (yet).
fn existing<T>(t: Result<T, redb::TableError>) -> Result<Option<T>, DbError> {
    match t {
        Ok(t) => Ok(Some(t)),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use redb::{ReadableDatabase as _, ReadableTableMetadata as _};

    fn db(dir: &std::path::Path) -> redb::Database {
        let db = redb::Database::create(dir.join("t.redb")).unwrap();
        let tx = db.begin_write().unwrap();
        create_tables(&tx).unwrap();
        tx.commit().unwrap();
        db
    }

    fn leaves(n: usize, seed: u8) -> Vec<u8> {
        (0..n * 32)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect()
    }

    proptest! {
        /// Whatever their number, leaves come back as kept, and go with their NAR only.
        #[test]
        fn leaves_come_back_as_kept(n in 1usize..700, m in 1usize..300) {
            let t = tempfile::tempdir().unwrap();
            let db = db(t.path());
            let (a, b) = (leaves(n, 1), leaves(m, 2));
            let tx = db.begin_write().unwrap();
            {
                let mut l = Leaves::open(&tx).unwrap();
                l.insert(&[1; 32], &a).unwrap();
                l.insert(&[2; 32], &b).unwrap();
            }
            tx.commit().unwrap();
            let rx = db.begin_read().unwrap();
            prop_assert_eq!(read(&rx, &[1; 32]).unwrap(), Some(a));
            prop_assert_eq!(read(&rx, &[2; 32]).unwrap(), Some(b.clone()));
            prop_assert_eq!(read(&rx, &[3; 32]).unwrap(), None);
            drop(rx);
            let tx = db.begin_write().unwrap();
            Leaves::open(&tx).unwrap().remove(&[1; 32]).unwrap();
            tx.commit().unwrap();
            let rx = db.begin_read().unwrap();
            prop_assert_eq!(read(&rx, &[1; 32]).unwrap(), None);
            prop_assert_eq!(read(&rx, &[2; 32]).unwrap(), Some(b));
        }
    }

    /// A data dir of the previous format: its one-value leaves are read, kept as they are
    /// when the same NAR is recorded again, and removed with the NAR.
    #[test]
    fn leaves_of_the_previous_format_are_read_and_removed() {
        let t = tempfile::tempdir().unwrap();
        let db = redb::Database::create(t.path().join("t.redb")).unwrap();
        let old = leaves(2049, 3);
        let tx = db.begin_write().unwrap();
        tx.open_table(LEAVES_V1)
            .unwrap()
            .insert([7u8; 32].as_slice(), old.as_slice())
            .unwrap();
        tx.commit().unwrap();
        let rx = db.begin_read().unwrap();
        assert!(
            rx.open_table(LEAVES).is_err(),
            "the previous format has no parts"
        );
        assert_eq!(read(&rx, &[7; 32]).unwrap(), Some(old.clone()));
        drop(rx);
        let tx = db.begin_write().unwrap();
        create_tables(&tx).unwrap();
        Leaves::open(&tx).unwrap().insert(&[7; 32], &old).unwrap();
        tx.commit().unwrap();
        let rx = db.begin_read().unwrap();
        assert_eq!(rx.open_table(LEAVES).unwrap().len().unwrap(), 0);
        assert_eq!(read(&rx, &[7; 32]).unwrap(), Some(old));
        drop(rx);
        let tx = db.begin_write().unwrap();
        Leaves::open(&tx).unwrap().remove(&[7; 32]).unwrap();
        tx.commit().unwrap();
        assert_eq!(read(&db.begin_read().unwrap(), &[7; 32]).unwrap(), None);
    }

    /// The point of the parts: a 32 MiB NAR's leaves (2,049 of them) written in one commit take
    /// about their own size in the file, not the next power of two.
    #[test]
    fn a_large_nars_leaves_take_about_their_size() {
        let t = tempfile::tempdir().unwrap();
        let db = db(t.path());
        let before = std::fs::metadata(t.path().join("t.redb")).unwrap().len();
        let tx = db.begin_write().unwrap();
        Leaves::open(&tx)
            .unwrap()
            .insert(&[1; 32], &leaves(2049, 4))
            .unwrap();
        tx.commit().unwrap();
        let grown = std::fs::metadata(t.path().join("t.redb")).unwrap().len() - before;
        assert!(
            grown < 100 << 10,
            "the file grew by {grown} bytes for 65,568 of leaves"
        );
    }
}
