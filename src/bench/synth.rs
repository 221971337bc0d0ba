//! Workloads for `narmesh bench`: a synthetic Nix store made without Nix, or paths taken from a
//! real store.
//!
//! A synthetic store is a chroot store root: files under `<root>/nix/store` and a database in
//! Nix's own schema 10 (`<root>/nix/var/nix/db/db.sqlite`), so the node reads it as it reads any
//! store, and real Nix accepts it too (`nix-store --store ROOT --verify --check-contents`). Each
//! path is a directory holding `data` (seeded pseudo-random bytes, incompressible like most
//! build output) and, when it references other paths, `refs` naming them.

use std::io::Write as _;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use rusqlite::{Connection, params};

use crate::nix::store_db::{self, StoreDb};
use crate::nix::{StorePath, base32, nar};

/// One path of a workload.
#[derive(Debug, Clone)]
pub struct WorkPath {
    pub path: StorePath,
    pub nar_size: u64,
}

/// What a synthetic workload looks like.
#[derive(Debug, Clone)]
pub struct Shape {
    pub paths: usize,
    /// Small paths' file sizes: log-uniform in this inclusive range.
    pub small: (u64, u64),
    /// Size of the large paths' file.
    pub large: u64,
    /// Every `large_every`-th path is large (0: none).
    pub large_every: usize,
    /// Paths form reference chains of this length (each references the one before it).
    pub chain: usize,
    pub seed: u64,
}

/// Nix's schema 10, as Nix 2.x creates it.
const SCHEMA: &str = r#"
create table if not exists ValidPaths (
    id               integer primary key autoincrement not null,
    path             text unique not null,
    hash             text not null,
    registrationTime integer not null,
    deriver          text,
    narSize          integer,
    ultimate         integer,
    sigs             text,
    ca               text
);
create table if not exists Refs (
    referrer  integer not null,
    reference integer not null,
    primary key (referrer, reference),
    foreign key (referrer) references ValidPaths(id) on delete cascade,
    foreign key (reference) references ValidPaths(id) on delete restrict
);
create index if not exists IndexReferrer on Refs(referrer);
create index if not exists IndexReference on Refs(reference);
create trigger if not exists DeleteSelfRefs before delete on ValidPaths
  begin
    delete from Refs where referrer = old.id and reference = old.id;
  end;
create table if not exists DerivationOutputs (
    drv  integer not null,
    id   text not null,
    path text not null,
    primary key (drv, id),
    foreign key (drv) references ValidPaths(id) on delete cascade
);
create index if not exists IndexDerivationOutputs on DerivationOutputs(path);
"#;

/// A small seeded generator (xorshift64*): reproducible workloads without a dependency.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15 | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }

    /// Log-uniform in `lo..=hi` (as many 1-2 KiB paths as 1-2 MiB ones per octave).
    fn log_uniform(&mut self, lo: u64, hi: u64) -> u64 {
        let (lo, hi) = (lo.max(1) as f64, hi.max(lo.max(1)) as f64);
        let u = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        (lo * (hi / lo).powf(u)).round() as u64
    }
}

/// An empty store at `root`: the directories and a database with Nix's schema.
pub fn init_store(root: &Path) -> anyhow::Result<Connection> {
    std::fs::create_dir_all(root.join("nix/store"))?;
    let db_dir = root.join("nix/var/nix/db");
    std::fs::create_dir_all(&db_dir)?;
    std::fs::write(db_dir.join("schema"), "10")?;
    let path = store_db::db_path(root);
    let conn = Connection::open(&path).with_context(|| format!("creating {}", path.display()))?;
    conn.execute_batch("pragma journal_mode = wal;")?;
    conn.execute_batch(SCHEMA)?;
    Ok(conn)
}

/// Generate `shape` into a new store at `root`; the paths in the order a build would make
/// them (references first).
pub fn generate(root: &Path, shape: &Shape) -> anyhow::Result<Vec<WorkPath>> {
    let mut conn = init_store(root)?;
    let mut rng = Rng::new(shape.seed);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let tx = conn.transaction()?;
    let mut out: Vec<WorkPath> = Vec::with_capacity(shape.paths);
    let mut ids: Vec<i64> = Vec::with_capacity(shape.paths);
    let mut buf = vec![0u8; 1 << 20];
    for i in 0..shape.paths {
        let large = shape.large_every > 0 && (i + 1) % shape.large_every == 0;
        let size = if large {
            shape.large
        } else {
            rng.log_uniform(shape.small.0, shape.small.1)
        };
        let mut digest = [0u8; 20];
        rng.fill(&mut digest);
        let path = StorePath::from_base_name(&format!("{}-bench-{i}", base32::encode(&digest)))
            .map_err(|e| anyhow::anyhow!("synthetic path: {e}"))?;
        let reference = (shape.chain > 1 && i % shape.chain != 0).then(|| i - 1);
        let dir = store_db::real_path(root, &path);
        std::fs::create_dir_all(&dir)?;
        let mut f = std::io::BufWriter::new(std::fs::File::create(dir.join("data"))?);
        let mut left = size;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            rng.fill(&mut buf[..n]);
            f.write_all(&buf[..n])?;
            left -= n as u64;
        }
        f.flush()?;
        if let Some(r) = reference {
            std::fs::write(dir.join("refs"), format!("{}\n", out[r].path.full()))?;
        }
        let digests = nar::dump_hashed(&dir, std::io::sink())?;
        tx.execute(
            "INSERT INTO ValidPaths (path, hash, registrationTime, narSize, ultimate) \
             VALUES (?1, ?2, ?3, ?4, 1)",
            params![
                path.full(),
                digests.sha256.to_base16(),
                now,
                digests.nar_size as i64
            ],
        )?;
        let id = tx.last_insert_rowid();
        if let Some(r) = reference {
            tx.execute(
                "INSERT INTO Refs (referrer, reference) VALUES (?1, ?2)",
                params![id, ids[r]],
            )?;
        }
        ids.push(id);
        out.push(WorkPath {
            path,
            nar_size: digests.nar_size,
        });
    }
    tx.commit()?;
    Ok(out)
}

/// Up to `n` valid paths of the real store at `root` (derivations left out), oldest first, so
/// references come before their referrers.
pub fn from_store(root: &Path, n: usize) -> anyhow::Result<Vec<WorkPath>> {
    let db = StoreDb::open(root)?;
    let paths = db.valid_paths(n)?;
    anyhow::ensure!(
        !paths.is_empty(),
        "the store at {} holds no paths to benchmark with",
        root.display()
    );
    Ok(paths
        .into_iter()
        .map(|(path, nar_size)| WorkPath { path, nar_size })
        .collect())
}

pub use crate::units::parse_size;

/// Parse a size range `LO..HI` (or a single size).
pub fn parse_size_range(s: &str) -> Result<(u64, u64), String> {
    let (lo, hi) = match s.split_once("..") {
        Some((a, b)) => (parse_size(a)?, parse_size(b)?),
        None => {
            let v = parse_size(s)?;
            (v, v)
        }
    };
    if lo > hi {
        return Err(format!(
            "size range {s:?}: the low end is above the high end"
        ));
    }
    Ok((lo, hi))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64KiB"), Ok(64 << 10));
        assert_eq!(parse_size("1.5MiB"), Ok(3 << 19));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size_range("1KiB..64KiB"), Ok((1024, 64 << 10)));
        assert!(parse_size("12XB").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size_range("2MiB..1MiB").is_err());
    }

    proptest! {
        #[test]
        fn size_parser_never_panics(s in "\\PC{0,24}") {
            let _ = parse_size(&s);
            let _ = parse_size_range(&s);
        }

        #[test]
        fn sizes_round_trip(v in 0u64..(1 << 40), unit in 0usize..4) {
            let (name, m) = [("", 1u64), ("KiB", 1 << 10), ("MiB", 1 << 20), ("GiB", 1 << 30)][unit];
            let n = v / m;
            prop_assert_eq!(parse_size(&format!("{n}{name}")), Ok(n * m));
        }
    }

    #[test]
    fn a_generated_store_reads_back_with_its_references_and_hashes() {
        let dir = tempfile::tempdir().unwrap();
        let shape = Shape {
            paths: 7,
            small: (10, 5000),
            large: 300_000,
            large_every: 3,
            chain: 3,
            seed: 7,
        };
        let paths = generate(dir.path(), &shape).unwrap();
        assert_eq!(paths.len(), 7);
        let db = StoreDb::open(dir.path()).unwrap();
        for (i, p) in paths.iter().enumerate() {
            let info = db.query_path(&p.path).unwrap().expect("valid");
            assert_eq!(info.nar_size, p.nar_size);
            let d = nar::dump_hashed(&store_db::real_path(dir.path(), &p.path), std::io::sink())
                .unwrap();
            assert_eq!(info.nar_hash, d.sha256);
            let want: Vec<_> = if i % 3 != 0 {
                vec![paths[i - 1].path.clone()]
            } else {
                vec![]
            };
            assert_eq!(info.references.into_iter().collect::<Vec<_>>(), want);
        }
        assert!(paths[2].nar_size > 300_000 && paths[5].nar_size > 300_000);
        let again = from_store(dir.path(), 100).unwrap();
        assert_eq!(
            again.iter().map(|p| p.path.clone()).collect::<Vec<_>>(),
            paths.iter().map(|p| p.path.clone()).collect::<Vec<_>>()
        );
    }
}
