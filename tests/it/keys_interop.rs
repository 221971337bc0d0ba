//! Keys interoperate with the real Nix: narinfos we sign with a `nix-store`-generated key and
//! with a `narmesh keygen` key are accepted by Nix substituting from a plain HTTP directory with
//! `require-sigs = true`; a wrong key, tampered References and no signature are refused.

use std::path::Path;
use std::process::Command;

use narmesh::nix::store_db::StoreDb;
use narmesh::nix::{NarInfo, SecretKey, StorePath, nar};

use crate::harness::{NixHost, StaticServer, bin, run_ok};

/// Write a binary cache directory for `paths` of `host`, each narinfo passed through `edit`.
fn write_cache(host: &NixHost, paths: &[StorePath], dir: &Path, edit: &dyn Fn(&mut NarInfo)) {
    std::fs::create_dir_all(dir.join("nar")).unwrap();
    std::fs::write(
        dir.join("nix-cache-info"),
        "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 30\n",
    )
    .unwrap();
    let db = StoreDb::open(&host.root).unwrap();
    for p in paths {
        let info = db.query_path(p).unwrap().unwrap();
        let tmp = dir.join("nar/tmp");
        let d = nar::dump_hashed(&host.real_path(p), std::fs::File::create(&tmp).unwrap()).unwrap();
        let url = format!("nar/{}.nar", d.sha256.nix32_digits());
        std::fs::rename(&tmp, dir.join(&url)).unwrap();
        let mut ni = NarInfo {
            store_path: p.clone(),
            url,
            compression: "none".into(),
            file_hash: Some(d.sha256),
            file_size: Some(d.nar_size),
            nar_hash: d.sha256,
            nar_size: d.nar_size,
            references: info.references.clone(),
            deriver: info.deriver.clone(),
            sigs: vec![],
            ca: None,
        };
        edit(&mut ni);
        std::fs::write(dir.join(format!("{}.narinfo", p.hash_part())), ni.render()).unwrap();
    }
}

/// A fresh host B substituting `top` from `cache_url`, trusting `trusted`; true if it worked.
fn substitutes(cache_url: &str, trusted: &str, top: &StorePath) -> bool {
    let b = NixHost::new(&format!(
        "substituters = {cache_url}\ntrusted-public-keys = {trusted}\nnarinfo-cache-negative-ttl = 0\n\
         narinfo-cache-positive-ttl = 0\nconnect-timeout = 5\n"
    ));
    let out = b.output("nix-store", &["-r", &top.full()]);
    if !out.status.success() {
        eprintln!(
            "substitution refused: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return false;
    }
    run_ok(b.cmd("nix-store").args(["--verify-path", &top.full()]));
    assert!(b.real_path(top).exists());
    true
}

fn read_key(path: &Path) -> String {
    String::from_utf8(std::fs::read(path).unwrap()).unwrap()
}

#[test]
fn nix_accepts_our_signatures_and_refuses_bad_ones() {
    let a = NixHost::new("");
    let top = a.build(
        r#"let dep = mk "signed-dep" "echo dep > $out"; in mk "signed-top" "echo ${dep} > $out""#,
    )[0]
    .clone();
    let closure = StoreDb::open(&a.root)
        .unwrap()
        .closure(std::slice::from_ref(&top))
        .unwrap();
    let keys = a.dir.path().join("keys");
    std::fs::create_dir_all(&keys).unwrap();

    // A key made by Nix, and one made by `narmesh keygen`.
    run_ok(
        a.cmd("nix-store")
            .arg("--generate-binary-cache-key")
            .arg("nixmade-1")
            .arg(keys.join("nix.sec"))
            .arg(keys.join("nix.pub")),
    );
    run_ok(
        Command::new(bin("narmesh"))
            .arg("keygen")
            .arg("ours-1")
            .arg(keys.join("ours.sec"))
            .arg(keys.join("ours.pub")),
    );
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(keys.join("ours.sec"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "secret key file mode");
    let nix_sec: SecretKey = read_key(&keys.join("nix.sec"))
        .parse()
        .expect("parse nix-made secret key");
    let ours_sec: SecretKey = read_key(&keys.join("ours.sec")).parse().unwrap();
    assert_eq!(
        nix_sec.public().to_string(),
        read_key(&keys.join("nix.pub")).trim_end()
    );
    let impostor = SecretKey::generate("ours-1").unwrap();

    type Edit<'a> = Box<dyn Fn(&mut NarInfo) + 'a>;
    let cases: Vec<(&str, Edit, bool)> = vec![
        (
            "nix-made key",
            Box::new(|ni: &mut NarInfo| ni.sign(&nix_sec)),
            true,
        ),
        (
            "narmesh key",
            Box::new(|ni: &mut NarInfo| ni.sign(&ours_sec)),
            true,
        ),
        (
            "wrong key",
            Box::new(|ni: &mut NarInfo| ni.sign(&impostor)),
            false,
        ),
        (
            "tampered references",
            Box::new(|ni: &mut NarInfo| {
                ni.sign(&ours_sec);
                ni.references.clear();
            }),
            false,
        ),
        ("unsigned", Box::new(|_: &mut NarInfo| {}), false),
    ];
    let trusted = format!(
        "{} {}",
        read_key(&keys.join("nix.pub")).trim(),
        read_key(&keys.join("ours.pub")).trim()
    );
    for (name, edit, accept) in cases {
        let dir = a
            .dir
            .path()
            .join(format!("cache-{}", name.replace(' ', "-")));
        // The dependency is always signed correctly; the case applies to the top path.
        write_cache(&a, &closure[1..], &dir, &|ni| ni.sign(&ours_sec));
        write_cache(&a, &closure[..1], &dir, edit.as_ref());
        let server = StaticServer::start(&dir);
        assert_eq!(
            substitutes(&server.url(), &trusted, &top),
            accept,
            "case: {name}"
        );
    }
}
