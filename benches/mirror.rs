//! The S3 mirror's speed goals, each beside its baseline measured in the same run, against a
//! real S3 server (SeaweedFS) on loopback:
//! - upload throughput of large NARs (compress + upload + narinfo), beside plain aws-sdk-s3
//!   PUTs of the same compressed bytes to the same server;
//! - a closure of 1,000 small paths mirrored, beside the seed approach: one `nix copy` per path
//!   into the same server over its plain HTTP interface (anonymous write on for this run).
//!
//! The mirror is timed alone: a node first records the paths without a mirror, then restarts
//! with `[mirror.s3]`; the clock runs from the node's first answer until its status shows
//! everything in the bucket.
//!
//! Run: `cargo bench --bench mirror` (needs nix-bin and SeaweedFS; scripts/install-test-deps.sh).

#[path = "../tests/it/harness.rs"]
mod harness;
#[path = "../tests/it/node_harness.rs"]
mod node_harness;
#[path = "../tests/it/s3_harness.rs"]
mod s3_harness;

use std::time::{Duration, Instant};

use harness::{NixHost, require, run_ok, wait_until};
use narmesh_proto::control::Request;
use node_harness::Node;
use s3_harness::{ACCESS_KEY, BUCKET, S3Server, SECRET_KEY, credentials_env};

/// Large NARs: this many, of this size each.
const LARGE: usize = 4;
const LARGE_SIZE: usize = 64 << 20;
const SMALL: usize = 1000;

/// Record `paths` on a node for `host`'s store, then restart it as a mirror of `s3` and time
/// how long it takes until every path is in the bucket. Returns (time, compressed bytes).
fn time_mirror(
    dir: &std::path::Path,
    host: &NixHost,
    paths: &[String],
    s3: &S3Server,
    extra: &str,
) -> (Duration, u64) {
    let mut node = Node::new(dir, &host.root);
    node.start();
    node.call(Request::Push {
        paths: paths.to_vec(),
    })
    .expect("push");
    wait_until(600, "the node to record every path", || {
        node.status().paths_recorded >= paths.len() as u64
    });
    node.stop();
    node.extra_config = s3.mirror_config(extra);
    node.env = credentials_env(ACCESS_KEY, SECRET_KEY);
    node.start();
    // The clock starts when the node answers (its start-up is not the mirror's work).
    let started = Instant::now();
    let mut bytes = 0;
    wait_until(900, "the mirror to upload every path", || {
        let m = node.status().mirror.expect("mirror");
        bytes = m.uploaded_bytes;
        m.pending_paths == 0 && m.uploaded_paths >= paths.len() as u64
    });
    let took = started.elapsed();
    if std::env::var_os("NARMESH_BENCH_LOGS").is_some() {
        println!("--- mirror log ---\n{}", node.log());
    }
    node.stop();
    (took, bytes)
}

/// Plain aws-sdk-s3 PUTs of `files` (one after another, or all at once), under new keys.
fn time_plain_puts(s3: &S3Server, files: &[std::path::PathBuf], at_once: bool) -> Duration {
    let (rt, c) = s3.client();
    rt.block_on(async {
        let put = |i: usize, f: std::path::PathBuf| {
            let c = c.clone();
            async move {
                let body = aws_sdk_s3::primitives::ByteStream::from_path(&f)
                    .await
                    .expect("body");
                c.put_object()
                    .bucket(BUCKET)
                    .key(format!("baseline/{at_once}/{i}.nar.zst"))
                    .body(body)
                    .send()
                    .await
                    .expect("plain put");
            }
        };
        let started = Instant::now();
        if at_once {
            futures::future::join_all(files.iter().cloned().enumerate().map(|(i, f)| put(i, f)))
                .await;
        } else {
            for (i, f) in files.iter().cloned().enumerate() {
                put(i, f).await;
            }
        }
        started.elapsed()
    })
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    require("nix-build");
    let t = tempfile::tempdir().expect("tempdir");
    let a = NixHost::new("");

    // Large NARs.
    println!(
        "building {LARGE} paths of {} MiB with Nix...",
        LARGE_SIZE >> 20
    );
    let large: Vec<String> = a
        .build(&format!(
            r#"builtins.genList (i: mk "mirror-large-${{toString i}}" "head -c {LARGE_SIZE} /dev/urandom > $out") {LARGE}"#
        ))
        .iter()
        .map(|p| p.full())
        .collect();
    let s3 = S3Server::start();
    // Warm the fresh server up (it allocates volumes on its first writes), so neither side
    // of the comparison pays for that.
    let warm: Vec<std::path::PathBuf> = (0..LARGE)
        .map(|i| {
            let f = t.path().join(format!("warm{i}"));
            let mut data = vec![0u8; LARGE_SIZE];
            getrandom::fill(&mut data).expect("randomness");
            std::fs::write(&f, data).expect("write");
            f
        })
        .collect();
    time_plain_puts(&s3, &warm, true);
    time_plain_puts(&s3, &warm, false);
    let (mirror_large, bytes) = time_mirror(&t.path().join("large"), &a, &large, &s3, "");
    // The same compressed bytes, from files, with plain PUTs.
    let mut files = Vec::new();
    for (i, (key, _)) in s3
        .objects()
        .into_iter()
        .filter(|(k, _)| k.starts_with("nar/"))
        .enumerate()
    {
        let (compressed, _) = s3.get(&key);
        let file = t.path().join(format!("large{i}.nar.zst"));
        std::fs::write(&file, &compressed).expect("write");
        files.push(file);
    }
    assert_eq!(files.len(), LARGE);
    let plain_seq = time_plain_puts(&s3, &files, false);
    let plain_par = time_plain_puts(&s3, &files, true);
    let plain = plain_seq.min(plain_par);
    drop(s3);

    // 1,000 small paths.
    println!("building {SMALL} small paths with Nix...");
    let small: Vec<String> = a
        .build(&format!(
            r#"builtins.genList (i: mk "mirror-small-${{toString i}}" "echo ${{toString i}} > $out") {SMALL}"#
        ))
        .iter()
        .map(|p| p.full())
        .collect();
    let s3 = S3Server::start();
    let (mirror_small, _) = time_mirror(&t.path().join("small"), &a, &small, &s3, "");
    drop(s3);
    // The seed: `nix copy` per path (as a post-build hook would run it) into the same server.
    let s3 = S3Server::start_with(true);
    let url = format!("{}?compression=zstd", s3.cache_url());
    let started = Instant::now();
    for p in &small {
        run_ok(a.cmd("nix").args(["copy", "--to", &url, p]));
    }
    let seed_small = started.elapsed();
    let seeded = s3
        .objects()
        .iter()
        .filter(|(k, _)| k.ends_with(".narinfo"))
        .count();
    assert_eq!(seeded, SMALL, "the seed uploaded every path");

    let mib = |b: u64, d: Duration| b as f64 / (1 << 20) as f64 / d.as_secs_f64();
    println!("\n| measure | narmesh | baseline (same run) | ratio |");
    println!("|---|---|---|---|");
    println!(
        "| mirror upload of {LARGE} NARs of {} MiB ({} compressed bytes in all), compress + upload + narinfo | {:.0} MiB/s ({:.2} s) | plain aws-sdk-s3 PUTs of the same compressed bytes, the faster of one after another ({:.2} s) and all at once ({:.2} s): {:.0} MiB/s | {:.2}x |",
        LARGE_SIZE >> 20,
        bytes,
        mib(bytes, mirror_large),
        mirror_large.as_secs_f64(),
        plain_seq.as_secs_f64(),
        plain_par.as_secs_f64(),
        mib(bytes, plain),
        plain.as_secs_f64() / mirror_large.as_secs_f64()
    );
    println!(
        "| {SMALL} small paths mirrored | {:.2} s ({:.0} paths/s) | seed: `nix copy` per path over HTTP: {:.2} s ({:.0} paths/s) | {:.1}x faster |",
        mirror_small.as_secs_f64(),
        SMALL as f64 / mirror_small.as_secs_f64(),
        seed_small.as_secs_f64(),
        SMALL as f64 / seed_small.as_secs_f64(),
        seed_small.as_secs_f64() / mirror_small.as_secs_f64()
    );
}
