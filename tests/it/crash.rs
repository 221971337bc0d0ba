//! Kill -9 at every step of ingest and mirroring: the node dies at each named kill point
//! (`narmesh::killpoint::POINTS`, armed with `NARMESH_TEST_KILL_AT`) while a chain of builds
//! (one NAR large enough to go up in parts) flows from builder A through mirror M into a real
//! S3 server. Right after the crash the bucket is consistent; after a restart nothing that was
//! acknowledged or spooled is missing, and the bucket is complete, closures and all.

use crate::harness::wait_until;
use crate::mirror::{Setup, check_bucket, setup, wait_in_bucket};
use crate::s3_harness::{ACCESS_KEY, S3Server, SECRET_KEY};

/// The points reached on the builder; the others are reached on the mirror.
const ON_BUILDER: &[&str] = &["queue.appended", "pipeline.hashed", "pipeline.recorded"];

fn chain(tag: &str) -> String {
    format!(
        r#"
  let
    big = mk "{tag}-big" "head -c 12000000 /dev/urandom > $out";
    mid = mk "{tag}-mid" "mkdir $out; echo ${{big}} > $out/ref";
  in mk "{tag}-top" "mkdir $out; echo ${{mid}} > $out/ref; seq 1 1000 > $out/text"
"#
    )
}

fn crash_at(point: &str) {
    let s3 = S3Server::start();
    // Parts of 5 MiB, so that the 12 MB NAR goes up in three.
    let Setup { _t, a, mut nodes } = setup(
        &s3,
        "multipart-threshold = 5242880\npart-size = 5242880",
        (ACCESS_KEY, SECRET_KEY),
    );
    let victim = usize::from(!ON_BUILDER.contains(&point));
    nodes[victim]
        .env
        .push(("NARMESH_TEST_KILL_AT".into(), point.into()));
    for n in nodes.iter_mut() {
        n.start();
    }
    // The bucket is checked right after the crash: a builder killed at its first commit could
    // otherwise die before the mirror has prepared the bucket (`nix-cache-info`), which the
    // check requires; seen once in a full run.
    wait_until(60, "the mirror to prepare the bucket", || {
        s3.objects().iter().any(|(k, _)| k == "nix-cache-info")
    });
    let tag = point.replace('.', "-");
    // First paths that nothing references (a report lost with them would not come back as
    // part of a later report's closure), then the chain.
    let mut paths: Vec<String> = a
        .build(&format!(
            r#"builtins.genList (i: mk "{tag}-solo-${{toString i}}" "echo ${{toString i}} > $out") 2"#
        ))
        .iter()
        .map(|p| p.full())
        .collect();
    let top = a.build(&chain(&tag))[0].clone();
    paths.extend(a.closure(std::slice::from_ref(&top)).iter().cloned());
    assert!(
        nodes[victim].wait_exit(60),
        "{point}: the node never reached the kill point"
    );
    assert!(
        nodes[victim].log().contains(&format!("killed at {point}")),
        "{point}: the node died elsewhere:\n{}",
        nodes[victim].log()
    );
    // Whatever the moment, the bucket shows no narinfo without its NAR or its closure.
    check_bucket(&s3, &[]);
    nodes[victim]
        .env
        .retain(|(k, _)| k != "NARMESH_TEST_KILL_AT");
    nodes[victim].start();
    wait_until(60, "every built path to be served by the builder", || {
        nodes[0].serves(&paths)
    });
    wait_in_bucket(&s3, &nodes[1], &paths, 120);
    check_bucket(&s3, &paths);
    assert_eq!(
        s3.open_uploads(),
        0,
        "{point}: a multipart upload left open"
    );
    for n in nodes.iter_mut() {
        n.stop();
    }
}

#[test]
fn a_crash_at_any_kill_point_loses_nothing_and_never_breaks_the_bucket() {
    for point in narmesh::killpoint::POINTS {
        eprintln!("kill point {point}");
        crash_at(point);
    }
}
