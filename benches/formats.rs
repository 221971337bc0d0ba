//! Criterion benches of the Nix formats on the hot paths: narinfo render, parse, sign and
//! signature check (every recorded path is signed once and checked by every peer), and the
//! node's HTTP narinfo serving (one keep-alive connection, a request at a time, against a real
//! `narmesh serve` process holding synthetic paths).
//!
//! Run: `cargo bench --bench formats`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use narmesh::bench::{cluster, synth};
use narmesh::nix::{NarInfo, SecretKey, TrustedKeys};
use narmesh_proto::control::{Request, Response};

/// A narinfo as Nix writes it, with 8 references and a signature.
fn sample() -> (NarInfo, SecretKey) {
    let refs: Vec<String> = (0..8)
        .map(|i| format!("{}-dep-{i}", narmesh::nix::base32::encode(&[i as u8; 20])))
        .collect();
    let text = format!(
        "StorePath: /nix/store/h06bh0s5rcfi480fiz4q44bzrg5l95jg-tree\n\
         URL: nar/1gazvk9bfp0iw6j86a25iy08wn6958df3dgjg5bj4fngn5k414ha.nar.zst\n\
         Compression: zstd\n\
         FileHash: sha256:1gazvk9bfp0iw6j86a25iy08wn6958df3dgjg5bj4fngn5k414ha\n\
         FileSize: 368\n\
         NarHash: sha256:12lgsmyvfv6qr2b9r6ssdbnp4i32n835c9xk9708xz3mi8lxdaw3\n\
         NarSize: 1752\n\
         References: {}\n\
         Deriver: 6i32dbszgwvza9kgbxr030mqrvj39cma-tree.drv\n",
        refs.join(" ")
    );
    let key = SecretKey::generate("bench-1").expect("key");
    let mut info = NarInfo::parse(&text).expect("parse");
    info.sign(&key);
    (info, key)
}

fn narinfo(c: &mut Criterion) {
    let (info, key) = sample();
    let text = info.render();
    let trusted = TrustedKeys::new([key.public()]);
    let mut g = c.benchmark_group("narinfo");
    g.bench_function("render", |b| {
        b.iter(|| std::hint::black_box(&info).render())
    });
    g.bench_function("parse", |b| {
        b.iter(|| NarInfo::parse(std::hint::black_box(&text)).expect("parse"))
    });
    g.bench_function("sign", |b| {
        b.iter(|| {
            let mut i = info.clone();
            i.sigs.clear();
            i.sign(&key);
            i
        })
    });
    g.bench_function("verify", |b| {
        b.iter(|| assert!(std::hint::black_box(&info).is_trusted(&trusted)))
    });
    g.finish();
}

/// One GET over a keep-alive connection; returns the body length.
fn get(conn: &mut BufReader<TcpStream>, target: &str) -> usize {
    write!(
        conn.get_mut(),
        "GET {target} HTTP/1.1\r\nHost: bench\r\n\r\n"
    )
    .expect("send");
    let mut len = 0;
    let mut line = String::new();
    loop {
        line.clear();
        conn.read_line(&mut line).expect("header");
        if line == "\r\n" {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().expect("length");
        }
    }
    let mut body = vec![0; len];
    conn.read_exact(&mut body).expect("body");
    len
}

fn http_narinfo(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("store");
    let shape = synth::Shape {
        paths: 64,
        small: (100, 10_000),
        large: 0,
        large_every: 0,
        chain: 4,
        seed: 3,
    };
    let work = synth::generate(&root, &shape).expect("workload");
    let mut nodes = vec![cluster::Node::new("n0", &dir.path().join("n0"), &root).expect("node")];
    let spec = cluster::Spec {
        replicate: "on-demand".into(),
        bulk: false,
        mirror: None,
        cluster: format!("bench-formats-{}", std::process::id()),
    };
    cluster::start_all(
        std::path::Path::new(env!("CARGO_BIN_EXE_narmesh")),
        &mut nodes,
        &spec,
        None,
    )
    .expect("start the node");
    let paths: Vec<String> = work.iter().map(|p| p.path.full()).collect();
    let mut client = narmesh::client::Client::connect(&nodes[0].socket()).expect("socket");
    client
        .call(Request::Push {
            paths: paths.clone(),
        })
        .expect("push");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let Response::Known { recorded } = client
            .call(Request::Lookup {
                paths: paths.clone(),
            })
            .expect("lookup")
        else {
            panic!("unexpected answer");
        };
        if recorded.iter().all(|r| *r) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "paths not recorded");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut conn = BufReader::new(TcpStream::connect(&nodes[0].http).expect("connect"));
    conn.get_ref().set_nodelay(true).expect("nodelay");
    let targets: Vec<String> = work
        .iter()
        .map(|p| format!("/{}.narinfo", p.path.hash_part()))
        .collect();
    let mut i = 0;
    c.bench_function("http_narinfo_get_keepalive", |b| {
        b.iter(|| {
            i = (i + 1) % targets.len();
            assert!(get(&mut conn, &targets[i]) > 0);
        })
    });
}

criterion_group!(benches, narinfo, http_narinfo);
criterion_main!(benches);
