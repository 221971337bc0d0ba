//! Replays every fuzz corpus (`fuzz/corpus/<target>/`: seeds from real Nix output and real
//! node traffic, plus what fuzzing found worth keeping) through its target's checks.

use std::path::Path;

#[test]
fn every_corpus_replays_cleanly() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    for (name, check) in narmesh_fuzz_checks::TARGETS {
        let dir = root.join(name);
        let entries: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        assert!(!entries.is_empty(), "corpus {name} has no seeds");
        for path in entries {
            let data = std::fs::read(&path).unwrap();
            check(&data);
        }
    }
}
