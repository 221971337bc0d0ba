//! NAR output byte-identical to `nix-store --dump` for real store paths built by a real Nix, its
//! sha256 equal to the store database's narHash; the store database reader against real Nix.

use std::os::unix::fs::{PermissionsExt, symlink};

use narmesh::nix::nar;
use narmesh::nix::store_db::StoreDb;

use crate::harness::{Nix, NixHost, bin, run_ok};

/// A closure with every kind of NAR node, names with `+-._?=`, a reference, and a >100 MB file.
const TREE: &str = r#"
  let
    dep = mk "dep" "echo dep > $out";
  in mk "tree+-._?=" ''
    mkdir -p $out/bin $out/empty $out/a/b/c/d/e/f/g/h/i/j $out/names
    printf '#!/bin/sh\necho hi\n' > $out/bin/run
    chmod +x $out/bin/run
    ln -s ../bin/run $out/a/rel
    ln -s ${dep} $out/abs
    ln -s dangling $out/a/dangling
    echo ${dep} > $out/refs
    for n in '+-._?=' Z a 0 _ B.b ; do echo "$n" > "$out/names/$n"; done
    : > $out/emptyfile
    printf 1234567 > $out/a/b/c/d/e/f/g/h/i/j/odd
    head -c 104857601 /dev/urandom > $out/big
  ''
"#;

#[test]
fn nar_matches_nix_store_dump_for_real_store_paths() {
    let host = NixHost::new("");
    let outs = host.build(TREE);
    assert_eq!(outs.len(), 1);
    let db = StoreDb::open(&host.root).expect("open store db");
    let closure = db.closure(&outs).expect("closure");
    assert_eq!(closure.len(), 2, "tree and its dependency: {closure:?}");
    for p in &closure {
        let real = host.real_path(p);
        let expected = host.dump(p);
        let mut ours = Vec::new();
        let d = nar::dump_hashed(&real, &mut ours).expect("dump");
        assert!(ours == expected, "NAR of {p} differs from nix-store --dump");
        let info = db.query_path(p).expect("query").expect("valid");
        assert_eq!(d.nar_size, expected.len() as u64);
        assert_eq!(d.nar_size, info.nar_size);
        assert_eq!(
            d.sha256, info.nar_hash,
            "sha256 of our NAR vs the database's narHash"
        );
        assert_eq!(d.blake3, *blake3::hash(&expected).as_bytes());
        let plain = nar::dump(&real, std::io::sink()).expect("plain dump");
        assert_eq!(plain, d.nar_size);
    }
    // The CLI writes the same bytes to stdout.
    let tree = &outs[0];
    let cli = run_ok(
        std::process::Command::new(bin("narmesh"))
            .arg("nar")
            .arg(host.real_path(tree)),
    );
    assert!(
        cli == host.dump(tree),
        "`narmesh nar` differs from nix-store --dump"
    );
}

#[test]
fn store_db_reads_what_nix_recorded() {
    let host = NixHost::new("");
    let outs =
        host.build(r#"let dep = mk "dep2" "echo dep > $out"; in mk "top" "echo ${dep} > $out""#);
    let db = StoreDb::open(&host.root).expect("open");
    let top = &outs[0];
    let info = db.query_path(top).unwrap().unwrap();
    assert_eq!(info.references.len(), 1);
    let dep = info.references.iter().next().unwrap().clone();
    assert_eq!(dep.name(), "dep2");
    let drv = info.deriver.clone().expect("deriver recorded");
    assert!(drv.is_derivation());
    let outputs = db.derivation_outputs(&drv).unwrap();
    assert_eq!(outputs, vec![("out".to_owned(), top.clone())]);
    // nix-store agrees on hash and size.
    let q = String::from_utf8(run_ok(host.cmd("nix-store").args([
        "-q",
        "--hash",
        &top.full(),
    ])))
    .unwrap();
    assert_eq!(q.trim(), info.nar_hash.to_nix32());
    // Batches keep order and report unknown paths as None.
    let unknown =
        narmesh::nix::StorePath::parse("/nix/store/00000000000000000000000000000000-nope").unwrap();
    let batch = db
        .query_paths(&[dep.clone(), unknown.clone(), top.clone()])
        .unwrap();
    assert_eq!(batch[0].as_ref().unwrap().path, dep);
    assert!(batch[1].is_none());
    assert_eq!(batch[2].as_ref().unwrap().path, *top);
    assert!(!db.is_valid(&unknown).unwrap());
    assert!(StoreDb::open(&host.dir.path().join("nowhere")).is_err());
}

/// The removals mark (what lets the storage skip a full own-path check) stays while paths are
/// only added, and goes down when one is deleted, even if it is registered again (a build,
/// then the same build after its deletion): with the store database of each Nix in the tests.
#[test]
fn removals_mark_follows_each_nix() {
    for nix in Nix::ALL {
        removals_mark_follows(nix);
    }
}

fn removals_mark_follows(nix: Nix) {
    nix.require();
    let host = NixHost::with_nix(nix, "");
    host.build(r#"mk "first" "echo first > $out""#);
    let db = StoreDb::open(&host.root).expect("open");
    let mark = db
        .removals_mark()
        .unwrap()
        .expect("Nix's ValidPaths gives ids in sequence");
    let more = host.build(r#"mk "more" "echo more > $out""#);
    assert_eq!(db.removals_mark().unwrap(), Some(mark), "only added");
    run_ok(host.cmd("nix-store").args(["--delete", &more[0].full()]));
    let after = db.removals_mark().unwrap().unwrap();
    assert!(after < mark, "{after} after a deletion, {mark} before");
    assert_eq!(host.build(r#"mk "more" "echo more > $out""#), more);
    assert!(db.is_valid(&more[0]).unwrap());
    assert_eq!(db.removals_mark().unwrap(), Some(after), "registered again");
}

#[test]
fn nar_matches_nix_for_synthetic_trees() {
    let host = NixHost::new("");
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("tree");
    std::fs::create_dir_all(root.join("d/e/e/p")).unwrap();
    std::fs::create_dir(root.join("empty")).unwrap();
    std::fs::write(root.join("d/e/e/p/f"), b"x").unwrap();
    // Exactly one chunk, one chunk plus one, and just under: the chunk edges.
    for (name, len) in [
        ("c0", nar::CHUNK),
        ("c1", nar::CHUNK + 1),
        ("c2", nar::CHUNK - 7),
        ("c3", 3 * nar::CHUNK + 5),
    ] {
        let data: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
        std::fs::write(root.join(name), data).unwrap();
    }
    std::fs::write(root.join("exe"), b"#!/bin/sh\n").unwrap();
    std::fs::set_permissions(root.join("exe"), std::fs::Permissions::from_mode(0o755)).unwrap();
    symlink("/etc/passwd", root.join("abs")).unwrap();
    symlink("d/e", root.join("rel")).unwrap();
    for target in [
        root.clone(),
        root.join("c1"),
        root.join("abs"),
        root.join("empty"),
    ] {
        let expected = run_ok(host.cmd("nix-store").arg("--dump").arg(&target));
        let mut ours = Vec::new();
        let d = nar::dump_hashed(&target, &mut ours).unwrap();
        assert!(ours == expected, "NAR of {} differs", target.display());
        let hash = String::from_utf8(run_ok(
            host.cmd("nix-hash")
                .args(["--type", "sha256", "--base32"])
                .arg(&target),
        ))
        .unwrap();
        assert_eq!(hash.trim(), d.sha256.nix32_digits());
    }
    assert!(matches!(
        nar::dump(&t.path().join("missing"), std::io::sink()),
        Err(nar::NarError::Read { .. })
    ));
}
