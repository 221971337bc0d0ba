//! The S3 mirror against a real S3 server (SeaweedFS) on loopback: builds on host A reach the
//! bucket through mirror node M, in Nix's layout, complete and consistent; an independent Nix
//! substitutes from the bucket over plain HTTP; a killed mirror, an S3 outage and bad settings
//! lose nothing and never disturb builds.

use std::collections::BTreeSet;
use std::time::Duration;

use narmesh::nix::NarInfo;
use narmesh_proto::control::MirrorStatus;

use crate::harness::{Nix, NixHost, http, run_ok, wait_until};
use crate::node_harness::Node;
use crate::s3_harness::{ACCESS_KEY, BUCKET, S3Server, SECRET_KEY, check_cache, credentials_env};
use crate::trust::metric;

const CHAIN: &str = r#"
  let
    a = mk "mirror-a" "echo a > $out";
    b = mk "mirror-b" "mkdir -p $out/bin; echo ${a} > $out/ref; printf '#!/bin/sh\n' > $out/bin/x; chmod +x $out/bin/x";
  in mk "mirror-top" "mkdir $out; ln -s ${b}/bin/x $out/run; echo ${b} > $out/ref; seq 1 200000 > $out/text"
"#;

/// Builder node A (serving host A's hook) and mirror node M, meshed.
pub(crate) struct Setup {
    // Dropped in this order: the nodes (their logs shown if the test failed) before their
    // directory.
    pub(crate) nodes: Vec<Node>,
    pub(crate) a: NixHost,
    pub(crate) _t: tempfile::TempDir,
}

pub(crate) fn setup(s3: &S3Server, mirror_extra: &str, creds: (&str, &str)) -> Setup {
    let t = tempfile::tempdir().unwrap();
    let mut nodes: Vec<Node> = (0..2)
        .map(|i| Node::new(&t.path().join(format!("n{i}")), &t.path().join("unused")))
        .collect();
    let a = NixHost::with_hook(&nodes[0].socket(), &nodes[0].spool());
    crate::node_harness::full_mesh(&mut nodes);
    nodes[0].store_root = a.root.clone();
    nodes[1].store_root = nodes[1].dir.join("store");
    nodes[1].extra_config = s3.mirror_config(mirror_extra);
    nodes[1].env = credentials_env(creds.0, creds.1);
    Setup { _t: t, a, nodes }
}

/// Wait until every one of `paths` has its narinfo in the bucket and mirror `m` has nothing
/// pending.
pub(crate) fn wait_in_bucket(s3: &S3Server, m: &Node, paths: &[String], secs: u64) {
    wait_until(secs, "every path to be mirrored", || {
        let keys: BTreeSet<String> = s3.objects().into_iter().map(|(k, _)| k).collect();
        paths.iter().all(|p| {
            let hash = &p.trim_start_matches("/nix/store/")[..32];
            keys.contains(&format!("{hash}.narinfo"))
        }) && mirror(m).pending_paths == 0
    });
}

pub(crate) fn mirror(node: &Node) -> MirrorStatus {
    node.status().mirror.expect("mirror status")
}

/// Wait until the mirror has nothing pending and has completed at least `paths`.
pub(crate) fn wait_mirrored(node: &Node, paths: u64, secs: u64) {
    wait_until(secs, "the mirror to finish", || {
        let m = mirror(node);
        m.pending_paths == 0 && m.uploaded_paths >= paths
    });
}

/// Read the bucket with an independent client: every narinfo's NAR is there with the right
/// FileHash and FileSize, every reference's narinfo is there, and `expect` are all there.
pub(crate) fn check_bucket(s3: &S3Server, expect: &[String]) -> usize {
    check_bucket_but(s3, expect, &[])
}

/// `check_bucket`, allowing references to the paths `public` (signed upstream) to be absent.
fn check_bucket_but(s3: &S3Server, expect: &[String], public: &[String]) -> usize {
    check_cache(s3, "", "zstd", expect, public)
}

#[test]
fn builds_reach_the_bucket_and_nix_substitutes_from_it() {
    let s3 = S3Server::start();
    let mut st = setup(&s3, "", (ACCESS_KEY, SECRET_KEY));
    for n in st.nodes.iter_mut() {
        n.start();
    }
    let top = st.a.build(CHAIN)[0].clone();
    let paths = st.a.closure(std::slice::from_ref(&top));
    assert_eq!(paths.len(), 3);
    wait_mirrored(&st.nodes[1], 3, 60);
    let m = mirror(&st.nodes[1]);
    assert_eq!(m.bucket, "test-bucket");
    assert!(m.uploaded_bytes > 0 && m.last_error.is_none(), "{m:?}");
    assert_eq!(check_bucket(&s3, &paths), 3);
    // The README's default priorities (lower is asked first): the bucket's 50, after
    // cache.nixos.org's 40; the node's cache 30, before both.
    let info = |body: Vec<u8>| String::from_utf8(body).unwrap();
    let bucket_info = info(s3.get("nix-cache-info").0);
    assert!(bucket_info.contains("\nPriority: 50\n"), "{bucket_info}");
    let (_, _, node_info) = http(&st.nodes[1].http, "GET", "/nix-cache-info", &[]);
    let node_info = info(node_info);
    assert!(node_info.contains("\nPriority: 30\n"), "{node_info}");

    // Independent Nix clients (2.8 and 2.26), substituting only from the bucket over plain HTTP.
    let key = st.nodes[0].public_key();
    for nix in Nix::ALL {
        let c = NixHost::substituter_nix(nix, &s3.cache_url(), &key);
        run_ok(c.cmd("nix-store").args(["-r", &top.full()]));
        run_ok(c.cmd("nix-store").args(["--verify-path", &top.full()]));
        assert_eq!(c.closure(std::slice::from_ref(&top)).len(), 3, "{nix:?}");
    }

    // Metrics tell the same.
    let (_, _, metrics) = http(&st.nodes[1].http, "GET", "/metrics", &[]);
    let metrics = String::from_utf8_lossy(&metrics);
    assert!(
        metrics.contains("narmesh_mirror_uploaded_paths_total 3"),
        "{metrics}"
    );
    assert!(
        metrics.contains("narmesh_mirror_pending_paths 0"),
        "{metrics}"
    );
}

/// The other compressions and a key prefix: the cache sits under `prefix` in the bucket, its
/// NARs compressed as asked, and Nix (2.8 and 2.26) substitutes from `<bucket>/<prefix>`.
#[test]
fn xz_or_no_compression_under_a_prefix_is_a_cache_nix_substitutes_from() {
    let s3 = S3Server::start();
    for (compression, prefix, tag) in [("xz", "nix/", "xz"), ("none", "plain/cache/", "none")] {
        let mut st = setup(
            &s3,
            &format!("prefix = \"{prefix}\"\ncompression = \"{compression}\""),
            (ACCESS_KEY, SECRET_KEY),
        );
        for n in st.nodes.iter_mut() {
            n.start();
        }
        let top =
            st.a.build(&CHAIN.replace("mirror-", &format!("mirror-{tag}-")))[0].clone();
        let paths = st.a.closure(std::slice::from_ref(&top));
        wait_mirrored(&st.nodes[1], 3, 60);
        assert_eq!(check_cache(&s3, prefix, compression, &paths, &[]), 3);
        let key = st.nodes[0].public_key();
        let url = format!("{}/{}", s3.cache_url(), prefix.trim_end_matches('/'));
        for nix in Nix::ALL {
            let c = NixHost::substituter_nix(nix, &url, &key);
            run_ok(c.cmd("nix-store").args(["-r", &top.full()]));
            run_ok(c.cmd("nix-store").args(["--verify-path", &top.full()]));
            assert_eq!(c.closure(std::slice::from_ref(&top)).len(), 3, "{nix:?}");
        }
    }
}

/// Paths with identical NARs share one NAR in the bucket, put once: the second path waits for
/// the first one's upload, then points its narinfo at that object (one HEAD) without
/// compressing or uploading it again. Both narinfos point at the one NAR object; Nix
/// substitutes both.
/// A third identical path, after the object was deleted from the bucket, puts it again rather
/// than point at nothing.
#[test]
fn paths_with_identical_nars_share_one_nar_in_the_bucket() {
    let s3 = S3Server::start();
    let mut st = setup(
        &s3,
        "multipart-threshold = 5242880\npart-size = 5242880",
        (ACCESS_KEY, SECRET_KEY),
    );
    for n in st.nodes.iter_mut() {
        n.start();
    }
    let outs = st.a.build(
        r#"builtins.genList (i: mk "same-${toString i}" "seq 1 1500000 > $out; head -c 8000000 /dev/zero | tr '\0' x >> $out") 2"#,
    );
    let paths: Vec<String> = outs.iter().map(|p| p.full()).collect();
    wait_mirrored(&st.nodes[1], 2, 90);
    assert_eq!(check_bucket(&s3, &paths), 2);
    let objects = s3.objects();
    let nars: Vec<&(String, u64)> = objects
        .iter()
        .filter(|(k, _)| k.starts_with("nar/"))
        .collect();
    assert_eq!(nars.len(), 1, "one NAR object: {objects:?}");
    assert_eq!(
        metric(&st.nodes[1], "narmesh_mirror_uploaded_bytes_total"),
        nars[0].1 as f64,
        "the NAR went up once"
    );
    assert_eq!(
        metric(&st.nodes[1], "narmesh_mirror_shared_nars_total"),
        1.0
    );
    for p in &outs {
        let (text, _) = s3.get(&format!("{}.narinfo", p.hash_part()));
        let info = NarInfo::parse(std::str::from_utf8(&text).unwrap()).unwrap();
        assert_eq!(info.url, nars[0].0);
    }
    // Someone deletes the NAR object; a third identical path puts it again.
    let (rt, client) = s3.client();
    rt.block_on(
        client
            .delete_object()
            .bucket(crate::s3_harness::BUCKET)
            .key(&nars[0].0)
            .send(),
    )
    .unwrap();
    let again = st.a.build(
        r#"mk "same-again" "seq 1 1500000 > $out; head -c 8000000 /dev/zero | tr '\0' x >> $out""#,
    )[0]
    .full();
    let mut paths = paths.clone();
    paths.push(again);
    wait_mirrored(&st.nodes[1], 3, 90);
    assert_eq!(check_bucket(&s3, &paths), 3);
    assert_eq!(
        metric(&st.nodes[1], "narmesh_mirror_uploaded_bytes_total"),
        2.0 * nars[0].1 as f64,
        "put again"
    );
    let key = st.nodes[0].public_key();
    let c = NixHost::substituter(&s3.cache_url(), &key);
    let mut args = vec!["-r"];
    args.extend(paths.iter().map(|s| s.as_str()));
    run_ok(c.cmd("nix-store").args(&args));
}

#[test]
fn a_mirror_killed_mid_upload_resumes_and_the_bucket_ends_consistent() {
    let s3 = S3Server::start();
    // Small parts, one at a time, so the big NAR is in flight long enough to be killed.
    let mut st = setup(
        &s3,
        "concurrency = 1\nmultipart-threshold = 5242880\npart-size = 5242880",
        (ACCESS_KEY, SECRET_KEY),
    );
    for n in st.nodes.iter_mut() {
        n.start();
    }
    let top = st.a.build(
        r#"let small = mk "mirror-kill-small" "echo s > $out";
           in mk "mirror-kill-big" "mkdir $out; echo ${small} > $out/ref; head -c 100000000 /dev/urandom > $out/blob""#,
    )[0]
    .clone();
    let paths = st.a.closure(std::slice::from_ref(&top));
    // Someone else's upload under nar/ in the same bucket: never the mirror's to abort.
    let foreign = s3.start_upload("nar/someone-elses.nar.zst");
    // A part is up, so the upload's id is recorded (a kill between CreateMultipartUpload and
    // that record is the crash test's `mirror.upload-created`: found again by key and time).
    wait_until(60, "a multipart upload to be in flight", || {
        s3.open_uploads() > 1 && s3.parts_uploaded_except(&foreign) > 0
    });
    st.nodes[1].kill9();
    // Whatever is in the bucket now, no narinfo points at a missing NAR.
    check_bucket(&s3, &[]);
    st.nodes[1].start();
    wait_mirrored(&st.nodes[1], 1, 120);
    assert_eq!(check_bucket(&s3, &paths), 2);
    assert_eq!(
        s3.open_uploads(),
        1,
        "the killed run's upload was aborted, and only it"
    );
    assert!(
        s3.upload_is_open(&foreign),
        "someone else's upload is left alone"
    );
    assert!(
        st.nodes[1]
            .log()
            .contains("unfinished upload(s) of a previous run"),
        "{}",
        st.nodes[1].log()
    );
}

/// S3 goes away: builds go on untouched, the mirror reports the outage and, having found the
/// bucket unreachable, starts no upload until a probe finds it back (a probe 1, 2, 4, 8 s
/// apart, rather than every pending path tried, compressed and failed on its own backoff);
/// once S3 is back, everything goes up.
#[test]
fn an_s3_outage_loses_nothing_and_never_touches_builds() {
    let mut s3 = S3Server::start();
    let mut st = setup(&s3, "", (ACCESS_KEY, SECRET_KEY));
    for n in st.nodes.iter_mut() {
        n.start();
    }
    let first = st.a.build(r#"mk "mirror-before" "echo before > $out""#);
    wait_mirrored(&st.nodes[1], 1, 60);
    s3.stop();
    // Builds go on, the hook answers at once, node A serves them; the mirror waits.
    let top = st.a.build(CHAIN)[0].clone();
    let more = st.a.build(
        r#"builtins.genList (i: mk "mirror-outage-${toString i}" "echo ${toString i} > $out") 6"#,
    );
    let mut paths = st.a.closure(std::slice::from_ref(&top));
    paths.extend(more.iter().map(|p| p.full()));
    wait_until(30, "node A to serve the new paths", || {
        st.nodes[0].serves(&paths)
    });
    wait_until(60, "the mirror to report the outage", || {
        let m = mirror(&st.nodes[1]);
        m.last_error.is_some() && m.pending_paths >= 9
    });
    // Paused (the uploads in flight when it was found have failed by the first probe): in
    // 12 s, two or three probes fail, not 9 paths each tried again 2-3 times.
    wait_until(30, "the mirror to pause and probe the bucket", || {
        st.nodes[1].log().contains("uploads stay paused")
    });
    let failures = || metric(&st.nodes[1], "narmesh_mirror_failures_total");
    let before = failures();
    std::thread::sleep(std::time::Duration::from_secs(12));
    let during = failures() - before;
    assert!(
        during <= 4.0,
        "{during} failures in 12 s of the outage:\n{}",
        st.nodes[1].log()
    );
    // What an alert reads.
    let problem = |n: &Node| metric(n, "narmesh_problem{part=\"mirror\"} ");
    assert_eq!(problem(&st.nodes[1]), 1.0);
    assert!(
        st.nodes[1]
            .status()
            .problems
            .iter()
            .any(|p| p.starts_with("mirror: "))
    );
    assert_eq!(problem(&st.nodes[0]), 0.0, "A mirrors nothing");
    s3.run();
    wait_mirrored(&st.nodes[1], 10, 120);
    let mut all = paths.clone();
    all.push(first[0].full());
    assert_eq!(check_bucket(&s3, &all), 10);
    assert!(mirror(&st.nodes[1]).last_error.is_none());
    assert_eq!(problem(&st.nodes[1]), 0.0);
}

/// A listener on `port` that takes connections and never answers (an S3 endpoint hanging),
/// until dropped: then every connection it took is closed.
struct Unanswering {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    taken: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Unanswering {
    fn on(port: u16) -> Self {
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
        listener.set_nonblocking(true).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let taken = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (s, n) = (stop.clone(), taken.clone());
        let thread = std::thread::spawn(move || {
            let mut held = Vec::new();
            while !s.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((c, _)) => {
                        held.push(c);
                        n.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
                }
            }
        });
        Unanswering {
            stop,
            taken,
            thread: Some(thread),
        }
    }

    fn taken(&self) -> usize {
        self.taken.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for Unanswering {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The mirror node keeps every NAR it has not uploaded yet, whatever its cap, also before its
/// mirror has taken the paths in: S3 hangs from the start (the mirror waits on its first
/// request, so it takes in nothing), and an eager mirror node capped at 30 MiB holds two
/// 12 MiB NARs and refuses to fetch a third rather than evict them; it stops at once though
/// its mirror waits on the bucket; once S3 is back they are uploaded and may go, and the third
/// is fetched and uploaded too.
#[test]
fn the_mirror_node_never_evicts_a_nar_not_yet_in_the_bucket() {
    let mut s3 = S3Server::start();
    let mut st = setup(&s3, "", (ACCESS_KEY, SECRET_KEY));
    st.nodes[1].replicate = "eager";
    st.nodes[1]
        .extra_config
        .push_str("[store]\nmax-size = \"30MiB\"\nmin-free = \"1MiB\"\n");
    s3.stop();
    let hanging = Unanswering::on(s3.port());
    for n in st.nodes.iter_mut() {
        n.start();
    }
    wait_until(30, "the mirror to wait on the bucket", || {
        hanging.taken() > 0
    });
    let big = |tag: &str, n: usize| {
        st.a.build(&format!(
            r#"builtins.genList (i: mk "{tag}-${{toString i}}" "head -c 12582912 /dev/urandom > $out") {n}"#
        ))
    };
    let mut all: Vec<String> = big("unmirrored", 2).iter().map(|p| p.full()).collect();
    wait_until(60, "the mirror node to hold both NARs", || {
        st.nodes[1].status().storage.files == 2
    });
    all.extend(big("third", 1).iter().map(|p| p.full()));
    wait_until(
        60,
        "the mirror node to refuse the third fetch (or evict)",
        || {
            st.nodes[1]
                .log()
                .contains("the NAR files that may go would not make up the rest")
                || st.nodes[1].status().storage.evictions > 0
        },
    );
    let storage = st.nodes[1].status().storage;
    assert_eq!(
        (storage.files, storage.evictions),
        (2, 0),
        "a NAR not yet in the bucket was evicted"
    );
    // The mirror waits on the hanging bucket: a stop does not wait for it (an attempt may
    // take a minute, three of them).
    let stopping = std::time::Instant::now();
    st.nodes[1].stop();
    assert!(
        stopping.elapsed() < std::time::Duration::from_secs(20),
        "the stop waited {:?} for the hanging bucket",
        stopping.elapsed()
    );
    st.nodes[1].start();
    drop(hanging);
    s3.run();
    wait_in_bucket(&s3, &st.nodes[1], &all, 120);
    assert_eq!(check_bucket(&s3, &all), 3);
    assert!(st.nodes[1].status().storage.file_bytes <= 30 << 20);
}

#[test]
fn wrong_credentials_or_a_missing_bucket_are_reported_and_the_node_keeps_running() {
    let s3 = S3Server::start();
    for (extra, creds, expect) in [
        ("", (ACCESS_KEY, "wrong-secret"), "refused the credentials"),
        ("", ("nobody", SECRET_KEY), "refused the credentials"),
    ] {
        let mut st = setup(&s3, extra, creds);
        for n in st.nodes.iter_mut() {
            n.start();
        }
        wait_until(30, "the mirror to report the error", || {
            mirror(&st.nodes[1])
                .last_error
                .is_some_and(|e| e.contains(expect))
        });
        // The node itself is unaffected: it ingests, serves and answers.
        let top = st.a.build(r#"mk "mirror-creds" "echo c > $out""#)[0].clone();
        wait_until(30, "both nodes to serve the path", || {
            st.nodes.iter().all(|n| n.serves(&[top.full()]))
        });
        assert!(st.nodes[1].log().contains(expect));
        assert_eq!(mirror(&st.nodes[1]).uploaded_paths, 0);
    }
    // A bucket that does not exist.
    let t = tempfile::tempdir().unwrap();
    let mut m = Node::new(&t.path().join("m"), &t.path().join("store"));
    m.extra_config = s3
        .mirror_config("")
        .replace("bucket = \"test-bucket\"", "bucket = \"no-such-bucket\"");
    m.env = credentials_env(ACCESS_KEY, SECRET_KEY);
    m.start();
    wait_until(30, "the mirror to report the missing bucket", || {
        mirror(&m)
            .last_error
            .is_some_and(|e| e.contains("no-such-bucket does not exist"))
    });
    let (code, _, _) = http(&m.http, "GET", "/nix-cache-info", &[]);
    assert_eq!(code, 200);
}

/// The mirror's work directory cannot be made at start (a file stands in its place, as a full
/// disk or a wrong permission would also stop it): the mirror says why and tries again, and
/// once the way is clear it mirrors what was built meanwhile, without a restart.
#[test]
fn a_mirror_that_cannot_make_its_work_directory_tries_again() {
    let s3 = S3Server::start();
    let mut st = setup(&s3, "", (ACCESS_KEY, SECRET_KEY));
    let blocker = st.nodes[1].dir.join("data/mirror-tmp");
    std::fs::create_dir_all(blocker.parent().unwrap()).unwrap();
    std::fs::write(&blocker, b"in the way").unwrap();
    for n in st.nodes.iter_mut() {
        n.start();
    }
    wait_until(30, "the mirror to report the error", || {
        mirror(&st.nodes[1])
            .last_error
            .is_some_and(|e| e.contains("mirror-tmp"))
    });
    let top = st.a.build(r#"mk "mirror-tmpdir" "echo t > $out""#)[0].full();
    std::fs::remove_file(&blocker).unwrap();
    wait_in_bucket(&s3, &st.nodes[1], std::slice::from_ref(&top), 60);
    assert_eq!(mirror(&st.nodes[1]).last_error, None);
    assert_eq!(check_bucket(&s3, std::slice::from_ref(&top)), 1);
}

#[test]
fn paths_signed_upstream_are_not_mirrored_and_do_not_hold_back_their_referrers() {
    let s3 = S3Server::start();
    let t = tempfile::tempdir().unwrap();
    let a = NixHost::new("");
    let top = a.build(
        r#"let up = mk "mirror-upstream-dep" "echo up > $out"; in mk "mirror-uses-upstream" "echo ${up} > $out""#,
    )[0]
    .clone();
    let paths = a.closure(std::slice::from_ref(&top));
    let up = paths.iter().find(|p| **p != top.full()).unwrap().clone();
    // Sign the dependency with an "upstream" key, as cache.nixos.org paths are.
    let narmesh = crate::harness::bin("narmesh");
    let (sec, public) = (t.path().join("up.sec"), t.path().join("up.pub"));
    run_ok(
        std::process::Command::new(&narmesh)
            .args(["keygen", "upstream-1"])
            .arg(&sec)
            .arg(&public),
    );
    run_ok(
        a.cmd("nix")
            .args(["store", "sign", "--key-file"])
            .arg(&sec)
            .arg(&up),
    );
    // One node that both builds and mirrors.
    let mut m = Node::new(&t.path().join("m"), &a.root);
    m.upstream_keys = vec![std::fs::read_to_string(&public).unwrap().trim().to_owned()];
    m.extra_config = s3.mirror_config("");
    m.env = credentials_env(ACCESS_KEY, SECRET_KEY);
    m.start();
    m.call(narmesh_proto::control::Request::Push {
        paths: vec![top.full()],
    })
    .unwrap();
    wait_mirrored(&m, 1, 60);
    assert_eq!(
        check_bucket_but(&s3, &[top.full()], std::slice::from_ref(&up)),
        1
    );
    let up_hash = &up["/nix/store/".len()..][..32];
    assert!(
        !s3.objects()
            .iter()
            .any(|(k, _)| k == &format!("{up_hash}.narinfo")),
        "the upstream path is not mirrored"
    );
}

/// A NAR still arriving from a peer is compressed and uploaded as it comes, not after: A serves
/// its peers at 4 MiB/s, so M's eager fetch of a 12 MB path takes about 3 s, and M's mirror
/// reads it from the transfer (its streamed counter moves; with the mirror blind to arriving
/// NARs it stays 0). It is over the 5 MiB multipart threshold, so its parts go
/// up while it is compressed, under the key its NarHash names (the only key known before the
/// end; a NAR put once complete is named by its file hash). The bucket ends consistent and Nix
/// substitutes from it.
#[test]
fn a_nar_still_arriving_from_a_peer_is_mirrored_as_it_comes() {
    let s3 = S3Server::start();
    let mut st = setup(
        &s3,
        "multipart-threshold = 5242880\npart-size = 5242880",
        (ACCESS_KEY, SECRET_KEY),
    );
    st.nodes[0].mesh_extra.push_str("serve-rate = \"4MiB\"\n");
    for n in st.nodes.iter_mut() {
        n.start();
    }
    let out =
        st.a.build(r#"mk "mirror-arriving" "head -c 12000000 /dev/urandom > $out""#)[0].clone();
    wait_mirrored(&st.nodes[1], 1, 120);
    assert_eq!(check_bucket(&s3, &[out.full()]), 1);
    let (text, _) = s3.get(&format!("{}.narinfo", out.hash_part()));
    let info = NarInfo::parse(std::str::from_utf8(&text).unwrap()).unwrap();
    let narhash = narmesh::nix::base32::encode(&info.nar_hash.0);
    assert_eq!(info.url, format!("nar/{narhash}.nar.zst"));
    let (_, _, metrics) = http(&st.nodes[1].http, "GET", "/metrics", &[]);
    let metrics = String::from_utf8_lossy(&metrics);
    assert!(
        metrics.contains("narmesh_mirror_streamed_nars_total 1"),
        "{metrics}"
    );
    let key = st.nodes[0].public_key();
    let c = NixHost::substituter_nix(Nix::V2_8, &s3.cache_url(), &key);
    run_ok(c.cmd("nix-store").args(["-r", &out.full()]));
    run_ok(c.cmd("nix-store").args(["--verify-path", &out.full()]));
}

/// Faults no real part produces on demand, injected (`NARMESH_TEST_FAULT`): the first two NAR
/// upload tasks and the first two narinfo tasks panic, and the first six commits of finished
/// uploads fail (every step of the three paths is in one of them). The mirror tries each of those paths again (a panicked task's path is not left
/// busy; a failed commit's uploads are done again, not taken as recorded) and completes the
/// bucket. Restarted without faults, it has nothing left to do: everything it counted as done
/// was recorded.
#[test]
fn panicked_upload_tasks_and_failed_commits_are_retried_until_recorded() {
    let s3 = S3Server::start();
    let mut st = setup(&s3, "", (ACCESS_KEY, SECRET_KEY));
    st.nodes[1].env.push((
        "NARMESH_TEST_FAULT".into(),
        "mirror.nar-task-panics:2,mirror.narinfo-task-panics:2,mirror.commit-fails:6".into(),
    ));
    for n in st.nodes.iter_mut() {
        n.start();
    }
    let top = st.a.build(CHAIN)[0].clone();
    let paths = st.a.closure(std::slice::from_ref(&top));
    wait_in_bucket(&s3, &st.nodes[1], &paths, 120);
    assert_eq!(check_bucket(&s3, &paths), 3);
    let log = st.nodes[1].log();
    for (needle, n) in [
        ("fault injected at mirror.nar-task-panics", 2),
        ("fault injected at mirror.narinfo-task-panics", 2),
        ("fault injected at mirror.commit-fails", 6),
        ("mirror: an upload task failed", 4),
        (
            "mirror: recording progress: node database: a step failed",
            6,
        ),
    ] {
        assert_eq!(log.matches(needle).count(), n, "{needle}:\n{log}");
    }
    assert!(
        mirror(&st.nodes[1]).failures >= 4,
        "{:?}",
        mirror(&st.nodes[1])
    );

    st.nodes[1].stop();
    st.nodes[1].env.retain(|(k, _)| k != "NARMESH_TEST_FAULT");
    st.nodes[1].start();
    std::thread::sleep(std::time::Duration::from_secs(5));
    let m = mirror(&st.nodes[1]);
    assert_eq!(
        (m.pending_paths, m.uploaded_paths),
        (0, 0),
        "after a restart, nothing left to upload: {m:?}"
    );
}

/// The bucket's narinfo keys, and whether every narinfo of `paths` is there, naming a NAR of
/// its FileSize, with `nix-cache-info` beside them (read without panicking, to wait on).
fn bucket_whole(s3: &S3Server, paths: &[String]) -> bool {
    let objects: std::collections::BTreeMap<String, u64> = s3.objects().into_iter().collect();
    objects.contains_key("nix-cache-info")
        && paths.iter().all(|p| {
            let key = format!("{}.narinfo", &p.trim_start_matches("/nix/store/")[..32]);
            objects.contains_key(&key)
                && std::str::from_utf8(&s3.get(&key).0)
                    .ok()
                    .and_then(|t| NarInfo::parse(t).ok())
                    .is_some_and(|i| objects.get(&i.url).copied() == i.file_size)
        })
}

/// What the bucket loses of completed paths, the audit (`audit-secs`) puts back: a narinfo, a
/// NAR, a NAR cut short, `nix-cache-info`; Nix then substitutes the closure from the bucket.
/// Audits of a whole bucket put nothing up again. A narinfo whose NAR the bucket lost and
/// nobody holds any more (Nix GC) is deleted: Nix would fail on it rather than build.
#[test]
fn an_audit_puts_back_what_the_bucket_lost() {
    let s3 = S3Server::start();
    let t = tempfile::tempdir().unwrap();
    let mut m = Node::new(&t.path().join("m"), &t.path().join("unused"));
    let host = NixHost::with_hook(&m.socket(), &m.spool());
    m.store_root = host.root.clone();
    m.extra_config = s3.mirror_config("audit-secs = 1") + "[store]\ngc-check-secs = 1\n";
    m.env = credentials_env(ACCESS_KEY, SECRET_KEY);
    m.start();
    let top = host.build(CHAIN)[0].clone();
    let gone = host.build(r#"mk "mirror-gone" "echo gone > $out""#)[0].clone();
    let paths = host.closure(std::slice::from_ref(&top));
    wait_mirrored(&m, 4, 60);
    // Audits that began after every path was done (2 s before a listing counts as during it).
    std::thread::sleep(std::time::Duration::from_secs(3));
    let audits = metric(&m, "narmesh_mirror_audits_total");
    wait_until(30, "two audits", || {
        metric(&m, "narmesh_mirror_audits_total") >= audits + 2.0
    });
    assert_eq!(metric(&m, "narmesh_mirror_audit_lost_total"), 0.0);
    assert_eq!(mirror(&m).uploaded_paths, 4, "an audit put a path up again");

    // The bucket loses the top's narinfo, a NAR, another NAR's tail, and nix-cache-info.
    let narinfo = |p: &str| format!("{}.narinfo", &p.trim_start_matches("/nix/store/")[..32]);
    let url = |p: &str| {
        NarInfo::parse(std::str::from_utf8(&s3.get(&narinfo(p)).0).unwrap())
            .unwrap()
            .url
    };
    let others: Vec<&String> = paths.iter().filter(|p| **p != top.full()).collect();
    let (lost_nar, cut_nar) = (url(others[0]), url(others[1]));
    let (rt, c) = s3.client();
    let delete = |key: &str| {
        rt.block_on(c.delete_object().bucket(BUCKET).key(key).send())
            .unwrap_or_else(|e| panic!("DELETE {key}: {e:?}"));
    };
    delete(&narinfo(&top.full()));
    delete(&lost_nar);
    delete("nix-cache-info");
    rt.block_on(
        c.put_object()
            .bucket(BUCKET)
            .key(&cut_nar)
            .body(b"cut short".to_vec().into())
            .send(),
    )
    .unwrap();
    assert!(!bucket_whole(&s3, &paths));
    wait_until(60, "the audit to put back what the bucket lost", || {
        bucket_whole(&s3, &paths)
    });
    assert_eq!(check_bucket(&s3, &paths), 4);
    // The audit's report (its count and log line) may come just after the uploads it started.
    wait_until(10, "the audit to report", || {
        m.log().contains("nix-cache-info put back")
    });
    assert_eq!(metric(&m, "narmesh_mirror_audit_lost_total"), 3.0);
    let log = m.log();
    assert!(log.contains("nix-cache-info put back"), "{log}");
    assert!(
        log.lines()
            .any(|l| l.contains("going up again") && l.contains(&top.full())),
        "the log names the lost paths: {log}"
    );
    let c2 = NixHost::substituter_nix(Nix::ALL[0], &s3.cache_url(), &m.public_key());
    run_ok(c2.cmd("nix-store").args(["-r", &top.full()]));
    assert_eq!(c2.closure(std::slice::from_ref(&top)).len(), 3);

    // Another writer points a path's narinfo at a NAR of its own, and the mirror's NAR goes:
    // the narinfo names a whole NAR, so it stays, and nothing is put up again.
    let theirs = "nar/another-writer.nar.zst";
    let (ours, key) = (url(others[0]), narinfo(others[0]));
    let put = |key: &str, body: Vec<u8>| {
        rt.block_on(
            c.put_object()
                .bucket(BUCKET)
                .key(key)
                .body(body.into())
                .send(),
        )
        .unwrap_or_else(|e| panic!("PUT {key}: {e:?}"));
    };
    put(theirs, s3.get(&ours).0);
    let text = String::from_utf8(s3.get(&key).0).unwrap();
    put(
        &key,
        text.replace(&format!("URL: {ours}"), &format!("URL: {theirs}"))
            .into_bytes(),
    );
    delete(&ours);
    let (audits, lost) = (
        metric(&m, "narmesh_mirror_audits_total"),
        metric(&m, "narmesh_mirror_audit_lost_total"),
    );
    wait_until(30, "three more audits", || {
        metric(&m, "narmesh_mirror_audits_total") >= audits + 3.0
    });
    assert_eq!(
        url(others[0]),
        theirs,
        "the other writer's narinfo was replaced"
    );
    assert_eq!(metric(&m, "narmesh_mirror_audit_lost_total"), lost);

    // Nobody holds `gone` any more. The bucket loses its narinfo: it comes back from the NAR
    // still in the bucket. Then the bucket loses the NAR: the narinfo goes, and the path
    // waits (not pending) until a node holds it again: built again, it goes up again.
    run_ok(host.cmd("nix-store").args(["--delete", &gone.full()]));
    wait_until(30, "the node to see the path gone", || {
        metric(&m, "narmesh_storage_gc_lost_total") >= 1.0
    });
    let in_bucket = |key: &str| s3.objects().iter().any(|(k, _)| k == key);
    let (gone_narinfo, gone_nar) = (narinfo(&gone.full()), url(&gone.full()));
    delete(&gone_narinfo);
    wait_until(
        30,
        "the narinfo to come back with nobody holding the NAR",
        || in_bucket(&gone_narinfo),
    );
    // The audit logs its report after its last change to the bucket.
    wait_until(10, "the audit to report the narinfo put back", || {
        m.log()
            .lines()
            .any(|l| l.contains("1 of them only their narinfo") && l.contains(&gone.full()))
    });
    delete(&gone_nar);
    wait_until(30, "the dangling narinfo to be deleted", || {
        !in_bucket(&gone_narinfo)
    });
    wait_until(
        10,
        "the audit to report the dangling narinfo deleted",
        || {
            m.log().lines().any(|l| {
                l.contains("1 held by nobody")
                    && l.contains("1 narinfo(s) naming a lost NAR deleted first")
                    && l.contains(&gone.full())
            })
        },
    );
    assert_eq!(
        mirror(&m).pending_paths,
        0,
        "a path nobody holds is not pending"
    );
    let again = host.build(r#"mk "mirror-gone" "echo gone > $out""#)[0].clone();
    assert_eq!(again, gone);
    wait_until(60, "the path built again to go up again", || {
        in_bucket(&gone_narinfo) && mirror(&m).pending_paths == 0
    });
    assert!(bucket_whole(&s3, &[gone.full()]));
}

/// A path whose NAR is in the bucket needs it no more, though its narinfo waits for a
/// reference (here one too large for the mirror node's cap; in a farm, one every holder
/// collected before the mirror had it): the mirror node, capped at 3 MiB, evicts that 2 MiB
/// NAR to fetch the next 2 MiB one, which is mirrored.
#[test]
fn a_nar_in_the_bucket_is_not_kept_while_its_narinfo_waits() {
    let s3 = S3Server::start();
    let mut st = setup(&s3, "", (ACCESS_KEY, SECRET_KEY));
    st.nodes[1]
        .extra_config
        .push_str("[store]\nmax-size = \"3MiB\"\nmin-free = \"1MiB\"\n");
    for n in st.nodes.iter_mut() {
        n.start();
    }
    let top = st.a.build(
        r#"let dep = mk "too-large" "head -c 4194304 /dev/urandom > $out"; in
           mk "waits" "echo ${dep} > $out; head -c 2097152 /dev/urandom >> $out""#,
    )[0]
    .clone();
    let nars = || {
        s3.objects()
            .iter()
            .filter(|(k, _)| k.starts_with("nar/"))
            .count()
    };
    wait_until(60, "the NAR of the waiting path to go up", || nars() == 1);
    let next =
        st.a.build(r#"mk "next" "head -c 2097152 /dev/urandom > $out""#);
    let keys = || -> BTreeSet<String> { s3.objects().into_iter().map(|(k, _)| k).collect() };
    wait_until(60, "the next path to be mirrored", || {
        keys().contains(&format!("{}.narinfo", next[0].hash_part()))
    });
    assert!(!keys().contains(&format!("{}.narinfo", top.hash_part())));
    let storage = st.nodes[1].status().storage;
    assert!(storage.evictions >= 1, "{storage:?}");
}

/// A path whose only holder deleted it before the mirror had its NAR (the mirror node was
/// frozen meanwhile) is orphaned: the mirror says so (`narmesh_mirror_orphaned_paths`, a
/// warning naming it), keeps it pending, and mirrors it once a node holds it again (A builds
/// it again, the same bytes).
#[test]
fn a_path_no_node_holds_any_more_is_shown_orphaned_until_one_does() {
    let s3 = S3Server::start();
    let mut st = setup(&s3, "", (ACCESS_KEY, SECRET_KEY));
    st.nodes[0]
        .extra_config
        .push_str("[store]\ngc-check-secs = 1\n");
    for n in st.nodes.iter_mut() {
        n.start();
    }
    let kept = st.a.build(r#"mk "orphan-kept" "echo kept > $out""#)[0].full();
    wait_mirrored(&st.nodes[1], 1, 60);
    let (a, m) = (&st.nodes[0], &st.nodes[1]);

    m.signal("STOP");
    // Built again, the same bytes.
    let expr = r#"mk "orphan-gone" "seq 1 30000 > $out""#;
    let gone = st.a.build(expr)[0].clone();
    wait_until(30, "A to serve the new path", || a.serves(&[gone.full()]));
    run_ok(st.a.cmd("nix-store").args(["--delete", &gone.full()]));
    let narinfo = format!("/{}.narinfo", gone.hash_part());
    wait_until(30, "A to stop serving the deleted path", || {
        http(&a.http, "GET", &narinfo, &[]).0 == 404
    });
    m.signal("CONT");
    wait_until(60, "the mirror to see the path orphaned", || {
        metric(m, "narmesh_mirror_orphaned_paths ") == 1.0
    });
    assert_eq!(mirror(m).pending_paths, 1);
    // M's wish for the NAR waits for a holder: no fetch is started from nobody (a few of its
    // backoffs' worth).
    std::thread::sleep(Duration::from_secs(4));
    let log = m.log();
    assert!(
        log.contains("wait for a NAR that no node holds any more") && log.contains(&gone.full()),
        "M's log:\n{log}"
    );
    assert!(!log.contains("no provider holds it"), "M's log:\n{log}");

    // Built again, A holds it: mirrored, orphaned no more.
    assert_eq!(st.a.build(expr)[0], gone);
    let all = [kept, gone.full()];
    wait_in_bucket(&s3, m, &all, 60);
    assert_eq!(check_bucket(&s3, &all), 2);
    assert_eq!(metric(m, "narmesh_mirror_orphaned_paths "), 0.0);
}

/// A path built again with other bytes after every node lost its first build's NAR (the
/// build is not reproducible): the mirror node wishes for, fetches and mirrors the second
/// build, the one a node holds, not the first that nobody does; and the claim whose NAR went to
/// the bucket is the one its narinfo names, even when the mirror node is killed right after the
/// narinfo went up and puts it again after its restart (its record still lists the first build
/// first).
#[test]
fn a_path_built_again_with_other_bytes_is_mirrored_as_the_build_a_node_holds() {
    let s3 = S3Server::start();
    let mut st = setup(&s3, "", (ACCESS_KEY, SECRET_KEY));
    st.nodes[0]
        .extra_config
        .push_str("[store]\ngc-check-secs = 1\n");
    // The second narinfo it puts (the first is `kept`'s) kills the mirror node.
    st.nodes[1]
        .env
        .push(("NARMESH_TEST_KILL_AT".into(), "mirror.narinfo-put:2".into()));
    for n in st.nodes.iter_mut() {
        n.start();
    }
    let kept = st.a.build(r#"mk "rebuilt-kept" "echo kept > $out""#)[0].full();
    wait_mirrored(&st.nodes[1], 1, 60);

    st.nodes[1].signal("STOP");
    let expr = r#"mk "rebuilt" "head -c 100000 /dev/urandom > $out""#;
    let path = st.a.build(expr)[0].clone();
    let a = &st.nodes[0];
    wait_until(30, "A to serve the new path", || a.serves(&[path.full()]));
    run_ok(st.a.cmd("nix-store").args(["--delete", &path.full()]));
    let narinfo = format!("/{}.narinfo", path.hash_part());
    wait_until(30, "A to stop serving the deleted path", || {
        http(&a.http, "GET", &narinfo, &[]).0 == 404
    });
    st.nodes[1].signal("CONT");
    let m = &st.nodes[1];
    wait_until(60, "the mirror to see the path orphaned", || {
        metric(m, "narmesh_mirror_orphaned_paths ") == 1.0
    });

    // Built again: other bytes, the same store path.
    assert_eq!(st.a.build(expr)[0], path);
    let hash = run_ok(st.a.cmd("nix-store").args(["-q", "--hash", &path.full()]));
    let second = String::from_utf8(hash).unwrap().trim().to_owned();
    let m = &mut st.nodes[1];
    assert!(m.wait_exit(60), "the mirror node never put the narinfo");
    assert!(
        m.log().contains("taking the build a node holds"),
        "{}",
        m.log()
    );
    m.env.retain(|(k, _)| k != "NARMESH_TEST_KILL_AT");
    m.start();
    let all = [kept, path.full()];
    wait_in_bucket(&s3, m, &all, 60);
    assert_eq!(check_bucket(&s3, &all), 2);
    let (text, _) = s3.get(&format!("{}.narinfo", path.hash_part()));
    let info = NarInfo::parse(std::str::from_utf8(&text).unwrap()).unwrap();
    let named = format!("sha256:{}", narmesh::nix::base32::encode(&info.nar_hash.0));
    assert_eq!(named, second, "the second build's narinfo");
    assert_eq!(metric(m, "narmesh_mirror_orphaned_paths "), 0.0);
}
