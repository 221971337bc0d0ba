use super::*;
use proptest::prelude::*;

/// Written by Nix 2.8 (`nix copy --to file://`), see the formats notes.
const FROM_NIX: &str = "StorePath: /nix/store/h06bh0s5rcfi480fiz4q44bzrg5l95jg-tree
URL: nar/1gazvk9bfp0iw6j86a25iy08wn6958df3dgjg5bj4fngn5k414ha.nar.xz
Compression: xz
FileHash: sha256:1gazvk9bfp0iw6j86a25iy08wn6958df3dgjg5bj4fngn5k414ha
FileSize: 368
NarHash: sha256:12lgsmyvfv6qr2b9r6ssdbnp4i32n835c9xk9708xz3mi8lxdaw3
NarSize: 1752
References: 56wl2m2q4pck0n6hclmqrsm3la18x1l9-dep
Deriver: 6i32dbszgwvza9kgbxr030mqrvj39cma-tree.drv
Sig: cacheA-1:H13059ySnUU8XGFn6DMVOJ6vFC8fLhDjG/50lNYLFj7rSMoOFpNAPumRJZ3Crd2KlbM6cIxQuWv3q/UzBhaZCw==
";

#[test]
fn renders_what_nix_wrote_byte_for_byte() {
    let info = NarInfo::parse(FROM_NIX).unwrap();
    assert_eq!(info.render(), FROM_NIX);
    assert_eq!(info.references.len(), 1);
    assert_eq!(
        info.fingerprint(),
        "1;/nix/store/h06bh0s5rcfi480fiz4q44bzrg5l95jg-tree;\
         sha256:12lgsmyvfv6qr2b9r6ssdbnp4i32n835c9xk9708xz3mi8lxdaw3;1752;\
         /nix/store/56wl2m2q4pck0n6hclmqrsm3la18x1l9-dep"
    );
}

#[test]
fn ignores_unknown_keys_and_defaults_compression() {
    let text = "StorePath: /nix/store/h06bh0s5rcfi480fiz4q44bzrg5l95jg-tree\nURL: nar/x.nar\nSystem: x86_64-linux\n\
                NarHash: sha256:12lgsmyvfv6qr2b9r6ssdbnp4i32n835c9xk9708xz3mi8lxdaw3\nNarSize: 1\nReferences: \n";
    let info = NarInfo::parse(text).unwrap();
    assert_eq!(info.compression, "bzip2");
    assert!(info.references.is_empty());
    assert!(info.render().contains("References: \n"));
}

#[test]
fn rejects_malformed() {
    let cut = |needle: &str| FROM_NIX.replace(needle, "");
    let cases = [
        cut("StorePath: /nix/store/h06bh0s5rcfi480fiz4q44bzrg5l95jg-tree\n"),
        cut("NarSize: 1752\n"),
        cut("URL: nar/1gazvk9bfp0iw6j86a25iy08wn6958df3dgjg5bj4fngn5k414ha.nar.xz\n"),
        cut("NarHash: sha256:12lgsmyvfv6qr2b9r6ssdbnp4i32n835c9xk9708xz3mi8lxdaw3\n"),
        FROM_NIX.replace("NarSize: 1752", "NarSize: 0"),
        FROM_NIX.replace("NarSize: 1752", "NarSize: -1"),
        FROM_NIX.replace("NarSize: 1752", "NarSize: 99999999999999999999999"),
        FROM_NIX.replace("FileSize: 368", "FileSize: 3 68"),
        FROM_NIX.replace("NarHash: sha256:1", "NarHash: md5:1"),
        FROM_NIX.replace("56wl2m2q", "56wl2m2e"),
        FROM_NIX.replace("Sig: cacheA-1:H", "Sig: cacheA-1:!"),
        format!("{FROM_NIX}References: \n"),
        format!("{FROM_NIX}NarSize: 1\n"),
        FROM_NIX.trim_end().to_owned(),
        format!("{FROM_NIX}garbage\n"),
        "x".repeat(MAX_NARINFO_LEN + 1),
    ];
    for (i, c) in cases.iter().enumerate() {
        assert!(NarInfo::parse(c).is_err(), "case {i} accepted: {c}");
    }
}

#[test]
fn signing_keeps_other_signatures_and_replaces_own() {
    let mut info = NarInfo::parse(FROM_NIX).unwrap();
    let key = SecretKey::generate("node-1").unwrap();
    info.sign(&key);
    info.sign(&key);
    assert_eq!(info.sigs.len(), 2);
    assert!(info.is_trusted(&TrustedKeys::new([key.public()])));
    info.references.clear();
    assert!(!info.is_trusted(&TrustedKeys::new([key.public()])));
}

fn arb_path() -> impl Strategy<Value = StorePath> {
    (
        "[0-9a-df-np-sv-z]{32}",
        "[a-zA-Z0-9+_?=-][a-zA-Z0-9+._?=-]{0,40}",
    )
        .prop_map(|(h, n)| StorePath::from_base_name(&format!("{h}-{n}")).unwrap())
}

fn arb_narinfo() -> impl Strategy<Value = NarInfo> {
    (
        arb_path(),
        proptest::collection::btree_set(arb_path(), 0..6),
        proptest::option::of(arb_path()),
        proptest::array::uniform32(any::<u8>()),
        1u64..u64::MAX,
        proptest::option::of((proptest::array::uniform32(any::<u8>()), any::<u64>())),
        proptest::collection::vec(
            (
                "[a-z0-9.-]{1,12}",
                proptest::collection::vec(any::<u8>(), 64),
            ),
            0..3,
        ),
        "(none|xz|zstd)",
    )
        .prop_map(
            |(store_path, references, deriver, nh, nar_size, file, sigs, compression)| {
                let mut sigs: Vec<Signature> = sigs
                    .into_iter()
                    .map(|(name, b)| {
                        use base64::Engine as _;
                        let b64 = base64::engine::general_purpose::STANDARD.encode(b);
                        format!("{name}:{b64}").parse().unwrap()
                    })
                    .collect();
                sigs.sort_by_key(|s| s.to_string());
                sigs.dedup();
                NarInfo {
                    url: format!("nar/{}.nar", store_path.hash_part()),
                    store_path,
                    compression,
                    file_hash: file.map(|f| Sha256(f.0)),
                    file_size: file.map(|f| f.1),
                    nar_hash: Sha256(nh),
                    nar_size,
                    references,
                    deriver,
                    sigs,
                    ca: None,
                }
            },
        )
}

proptest! {
    #[test]
    fn render_parse_round_trip(info in arb_narinfo()) {
        let text = info.render();
        let back = NarInfo::parse(&text).unwrap();
        prop_assert_eq!(&back, &info);
        prop_assert_eq!(back.render(), text);
    }

    #[test]
    fn arbitrary_text_never_panics(s in "\\PC{0,400}") {
        let _ = NarInfo::parse(&s);
    }

    #[test]
    fn mutated_narinfos_never_panic(info in arb_narinfo(), pos in any::<prop::sample::Index>(), byte in any::<u8>()) {
        let mut bytes = info.render().into_bytes();
        let i = pos.index(bytes.len());
        bytes[i] = byte;
        if let Ok(s) = String::from_utf8(bytes) {
            let _ = NarInfo::parse(&s);
        }
    }
}
