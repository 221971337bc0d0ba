//! NAR writing + sha256 + BLAKE3 of a large page-cached path, beside `nix-hash --type sha256`
//! of the same path (one hash where we do two), measured in the same run.

use std::path::Path;
use std::process::Command;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};

const BIG: usize = 256 << 20;

/// A tree with one 256 MiB file (seeded pseudo-random bytes) and a few hundred small files.
fn make_tree(root: &Path) -> u64 {
    std::fs::create_dir_all(root.join("small")).expect("mkdir");
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut big = vec![0u8; BIG];
    for chunk in big.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    std::fs::write(root.join("big"), &big).expect("write big");
    for i in 0..512 {
        std::fs::write(
            root.join(format!("small/f{i}")),
            &big[i * 1000..i * 1000 + 700 + i],
        )
        .expect("write small");
    }
    narmesh::nix::nar::dump(root, std::io::sink()).expect("nar")
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("tree");
    let nar_size = make_tree(&root);
    let mut g = c.benchmark_group("nar_hash_256MiB");
    g.sample_size(10).throughput(Throughput::Bytes(nar_size));
    g.bench_function("narmesh_nar_sha256_blake3", |b| {
        b.iter(|| narmesh::nix::nar::dump_hashed(&root, std::io::sink()).expect("dump"))
    });
    g.bench_function("narmesh_nar_only", |b| {
        b.iter(|| narmesh::nix::nar::dump(&root, std::io::sink()).expect("dump"))
    });
    g.bench_function("baseline_nix_hash_sha256", |b| {
        b.iter(|| {
            let out = Command::new("nix-hash")
                .args(["--type", "sha256"])
                .arg(&root)
                .output()
                .expect("nix-hash is required for this benchmark (apt-get install nix-bin)");
            assert!(out.status.success());
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
