//! Faults the hook and the spool meet for real: a frozen node whose listen backlog is full, a
//! node that refuses, a store database that is briefly unreadable, garbage and half-written
//! files in the spool. Every hook must exit 0 within its budget, and nothing acknowledged or
//! spooled may be lost.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use narmesh_proto::control::{Request, Response};

use crate::harness::{NixHost, Tmpfs, bin, run_hook, run_ok, spooled, wait_until};
use crate::node_harness::Node;
use crate::trust::metric;

/// Which of `paths` the node has recorded, asked over its socket.
fn recorded(node: &Node, paths: &[String]) -> usize {
    match node.call(Request::Lookup {
        paths: paths.to_vec(),
    }) {
        Ok(Response::Known { recorded }) => recorded.iter().filter(|r| **r).count(),
        _ => 0,
    }
}

/// `n` trivial builds on a plain Nix host (no hook): store paths to report.
fn built_paths(host: &NixHost, n: usize, tag: &str) -> Vec<String> {
    host.build(&format!(
        r#"builtins.genList (i: mk "{tag}-${{toString i}}" "echo {tag} ${{toString i}} > $out") {n}"#
    ))
    .iter()
    .map(|p| p.full())
    .collect()
}

/// The hook's own account of where its time went: milliseconds of one phase ("connect",
/// "send and answer", "spool write"); 0 for a phase it did not reach.
fn measured_ms(stderr: &str, phase: &str) -> f64 {
    let Some(rest) = stderr.split(&format!("{phase} ")).nth(1) else {
        panic!("no timing of {phase} in {stderr:?}");
    };
    rest.split(" ms")
        .next()
        .and_then(|t| t.parse().ok())
        .unwrap_or(0.0)
}

/// Run a hook that must exit by itself within `limit` (it is killed and the test fails if not),
/// with a deadline of `timeout_ms` (`None`: the hook's default).
fn hook_within(
    limit: Duration,
    socket: &Path,
    spool: &Path,
    out: &str,
    timeout_ms: Option<u64>,
) -> String {
    let started = Instant::now();
    let mut cmd = Command::new(bin("narmesh-hook"));
    match timeout_ms {
        Some(ms) => cmd.env("NARMESH_HOOK_TIMEOUT_MS", ms.to_string()),
        None => cmd.env_remove("NARMESH_HOOK_TIMEOUT_MS"),
    };
    let mut child = cmd
        .env("DRV_PATH", "")
        .env("OUT_PATHS", out)
        .env("NARMESH_SOCKET", socket)
        .env("NARMESH_SPOOL", spool)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn hook");
    loop {
        if let Some(status) = child.try_wait().expect("wait hook") {
            assert!(status.success(), "hook exit status {status}");
            let mut err = String::new();
            use std::io::Read as _;
            child
                .stderr
                .take()
                .expect("stderr")
                .read_to_string(&mut err)
                .expect("read stderr");
            return err;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            panic!("a hook was still running after {limit:?}: it stalled the build");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Unset, the hook's deadline is the README's 500 ms: against a socket that takes the
/// connection and never answers, the hook waits that long for the node (its own measure) and
/// no longer, then spools and exits 0.
#[test]
fn the_hooks_default_deadline_is_half_a_second() {
    let t = tempfile::tempdir().unwrap();
    let socket = t.path().join("silent.sock");
    let spool = t.path().join("spool");
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let held = std::thread::spawn(move || {
        // Takes the hook's connection and holds it, unanswered, until the hook let go.
        let (mut c, _) = listener.accept().unwrap();
        let mut sink = Vec::new();
        use std::io::Read as _;
        let _ = c.read_to_end(&mut sink);
    });
    let out = "/nix/store/00000000000000000000000000000000-default-deadline";
    let err = hook_within(Duration::from_secs(10), &socket, &spool, out, None);
    assert!(err.contains("spooled to"), "{err}");
    let waited = measured_ms(&err, "connect") + measured_ms(&err, "send and answer");
    // The deadline counts from the hook's start: a little of it went before connecting.
    assert!(
        (300.0..1000.0).contains(&waited),
        "the hook waited {waited} ms for the node, not its default 500: {err}"
    );
    assert_eq!(spooled(&spool).len(), 1);
    held.join().unwrap();
}

/// The node frozen (SIGSTOP) in a network namespace whose `net.core.somaxconn` is 16, so its
/// socket's listen backlog holds 16 connections; 40 hooks then arrive at once. The first ones
/// connect into the backlog and wait for an answer that never comes, the others block in
/// `connect(2)` itself: every one must give up at its deadline, spool, and exit 0. After SIGCONT
/// every report is taken in.
#[test]
fn a_frozen_node_with_a_full_backlog_never_stalls_a_hook() {
    crate::harness::require("unshare");
    let t = tempfile::tempdir().unwrap();
    let host = NixHost::new("");
    let paths = built_paths(&host, 40, "frozen");
    let mut node = Node::new(&t.path().join("node"), &host.root);
    node.wrap = vec![
        "unshare".into(),
        "-n".into(),
        "sh".into(),
        "-c".into(),
        "ip link set lo up && sysctl -qw net.core.somaxconn=16 && exec \"$0\" \"$@\"".into(),
    ];
    node.start();
    node.signal("STOP");
    let (socket, spool) = (node.socket(), node.spool());
    const TIMEOUT_MS: u64 = 300;
    let hooks: Vec<_> = paths
        .iter()
        .map(|p| {
            let (socket, spool, p) = (socket.clone(), spool.clone(), p.clone());
            std::thread::spawn(move || {
                hook_within(
                    Duration::from_secs(10),
                    &socket,
                    &spool,
                    &p,
                    Some(TIMEOUT_MS),
                )
            })
        })
        .collect();
    let mut blocked_in_connect = 0;
    let mut sample = String::new();
    for h in hooks {
        let err = h.join().expect("hook thread");
        sample = err.clone();
        assert!(err.contains("spooled to"), "{err}");
        if err.contains("no connection within the deadline") {
            blocked_in_connect += 1;
        }
        // The hook's own measure: connecting, sending and waiting share its deadline (a
        // scheduling delay of the busy test machine is allowed for); the spool write follows.
        let node = measured_ms(&err, "connect") + measured_ms(&err, "send and answer");
        assert!(
            node < (TIMEOUT_MS + 1500) as f64,
            "the hook spent {node} ms on the node, past its deadline of {TIMEOUT_MS} ms: {err}"
        );
    }
    assert!(
        blocked_in_connect > 0,
        "with 40 hooks and a backlog of 16, some must have blocked in connect; the last hook said: {sample}"
    );
    assert_eq!(spooled(&spool).len(), 40, "every report spooled");
    // The backlog still holds the connections of hooks that gave up: `narmesh status` cannot
    // connect either, and says so within its own deadline (10 s) instead of hanging.
    let mut status = Command::new(bin("narmesh"))
        .args(["status", "--socket"])
        .arg(&socket)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let exited = loop {
        if let Some(code) = status.try_wait().unwrap() {
            break code;
        }
        if started.elapsed() > Duration::from_secs(30) {
            let _ = status.kill();
            panic!("`narmesh status` still waits on the frozen node after 30 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut status.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!exited.success(), "{err}");
    assert!(err.contains("did not accept a connection"), "{err}");
    node.signal("CONT");
    wait_until(60, "every report to be taken in after SIGCONT", || {
        recorded(&node, &paths) == paths.len()
    });
    wait_until(30, "the spool to be emptied", || spooled(&spool).is_empty());
    node.stop();
}

/// A node that answers `Error` (for instance one of another release during a rolling upgrade)
/// gets the report spooled, not dropped.
#[test]
fn a_refusing_node_makes_the_hook_spool() {
    let t = tempfile::tempdir().unwrap();
    let socket = t.path().join("refusing.sock");
    let spool = t.path().join("spool");
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let server = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let _: narmesh_proto::control::Envelope =
            narmesh_proto::frame::read_frame(&mut conn).unwrap();
        narmesh_proto::frame::write_frame(
            &mut conn,
            &Response::Error {
                message: "unsupported protocol version 2 (this node speaks 1..=1)".into(),
            },
        )
        .unwrap();
    });
    let run = run_hook(
        &socket,
        &spool,
        "",
        "/nix/store/00000000000000000000000000000000-x",
        500,
    );
    server.join().unwrap();
    assert!(run.stderr.contains("refused"), "{}", run.stderr);
    assert_eq!(spooled(&spool).len(), 1, "the refused report is spooled");
}

/// Run the hook for each of `paths` while `node` is down: each report is spooled.
fn spool_all(node: &Node, paths: &[String]) {
    for p in paths {
        let run = run_hook(&node.socket(), &node.spool(), "", p, 200);
        assert!(run.stderr.contains("spooled"), "{}", run.stderr);
    }
}

/// A node on a plain Nix host (`conf` in its `nix.conf`) that has recorded the first of two
/// paths built there and acknowledged the report of the second (naming only its derivation,
/// as Nix 2.8 does, with `by_drv`). Its batches are planned 3 s after their report: the test
/// has that long to fault what planning and ingest meet.
fn second_report_acknowledged(
    conf: &str,
    tag: &str,
    by_drv: bool,
) -> (tempfile::TempDir, NixHost, Vec<String>, Node) {
    let t = tempfile::tempdir().unwrap();
    let host = NixHost::new(conf);
    let paths = built_paths(&host, 2, tag);
    let mut node = Node::new(&t.path().join("node"), &host.root);
    node.env
        .push(("NARMESH_TEST_FAULT".into(), "pipeline.plan-late:2".into()));
    node.start();
    let (socket, spool) = (node.socket(), node.spool());
    // A first report opens the node's connection to the database.
    run_hook(&socket, &spool, "", &paths[0], 5000);
    wait_until(30, "the first path to be recorded", || {
        recorded(&node, &paths[..1]) == 1
    });
    let run = if by_drv {
        let drv = String::from_utf8(run_ok(host.cmd("nix-store").args([
            "--query",
            "--deriver",
            &paths[1],
        ])))
        .unwrap();
        run_hook(&socket, &spool, drv.trim(), "", 5000)
    } else {
        run_hook(&socket, &spool, "", &paths[1], 5000)
    };
    assert!(spooled(&spool).is_empty(), "acknowledged: {}", run.stderr);
    (t, host, paths, node)
}

/// A report acknowledged while another process holds the Nix store database locked past the
/// node's 10 s busy wait (a `nix` command in a long transaction, say) is not dropped: Nix 2.8
/// names only the derivation, whose outputs the database cannot tell now, so the batch is
/// planned again once it answers, and the path is recorded.
#[test]
fn a_locked_store_database_delays_a_report_and_loses_nothing() {
    // A rollback journal, not WAL: there a writer's exclusive lock keeps readers out (with WAL
    // nobody may take one while the node has the database open).
    let (_t, host, paths, mut node) =
        second_report_acknowledged("use-sqlite-wal = false", "locked-db", true);
    // Held 13 s from within the 3 s before the batch is planned: the node's first try gives up
    // after its 10 s busy wait.
    let mut lock = lock_store_db(&host, 13);
    assert_eq!(recorded(&node, &paths[1..]), 0, "planned before the lock");
    wait_until(
        60,
        "the path to be recorded once the database answers",
        || recorded(&node, &paths[1..]) == 1,
    );
    assert!(lock.wait().unwrap().success());
    assert!(
        node.log().contains("database is locked"),
        "the node met the lock; its log:\n{}",
        node.log()
    );
    assert_eq!(metric(&node, "narmesh_ingest_failures_total "), 0.0);
    node.stop();
}

/// Hold the Nix store database of `host` (one with `use-sqlite-wal = false`) locked
/// exclusively for `secs` seconds from another process, as a writer does; returns once it is
/// held. Under a rollback journal a writer's exclusive lock keeps readers out (with WAL nobody
/// may take one while the node has the database open).
fn lock_store_db(host: &NixHost, secs: u32) -> std::process::Child {
    use std::io::BufRead;
    let db = narmesh::nix::store_db::db_path(&host.root);
    let mut lock = Command::new("python3")
        .args([
            "-c",
            "import sqlite3, sys, time\n\
             c = sqlite3.connect(sys.argv[1], isolation_level=None)\n\
             c.execute('PRAGMA locking_mode=EXCLUSIVE')\n\
             c.execute('BEGIN EXCLUSIVE')\n\
             c.execute('COMMIT')\n\
             print('locked', flush=True)\n\
             time.sleep(int(sys.argv[2]))\n",
        ])
        .arg(&db)
        .arg(secs.to_string())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let mut line = String::new();
    std::io::BufReader::new(lock.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "locked");
    lock
}

/// Hooks called while another process holds the Nix store database locked are acknowledged
/// all the same, not held for the node's 10 s wait on the lock (each would wait out its
/// deadline and spool, and the hooks behind it wait too): the node queues their reports
/// checked for form only, and its pipeline checks the paths once the database answers. Nix
/// 2.8's report naming only the derivation, a report naming an output, and one naming a path
/// the store never held: the first two are recorded, the third fails there and is counted.
#[test]
fn hooks_are_acknowledged_while_the_store_database_is_locked() {
    let t = tempfile::tempdir().unwrap();
    let host = NixHost::new("use-sqlite-wal = false");
    let paths = built_paths(&host, 3, "locked-front");
    let drv = String::from_utf8(run_ok(host.cmd("nix-store").args([
        "--query",
        "--deriver",
        &paths[1],
    ])))
    .unwrap();
    let mut node = Node::new(&t.path().join("node"), &host.root);
    node.start();
    let (socket, spool) = (node.socket(), node.spool());
    // A first report opens the front's connection to the database.
    run_hook(&socket, &spool, "", &paths[0], 5000);
    wait_until(30, "the first path to be recorded", || {
        recorded(&node, &paths[..1]) == 1
    });
    let mut lock = lock_store_db(&host, 8);
    let never = "/nix/store/00000000000000000000000000000000-never-built";
    let runs = [
        run_hook(&socket, &spool, drv.trim(), "", 3000),
        run_hook(&socket, &spool, "", &paths[2], 3000),
        run_hook(&socket, &spool, "", never, 3000),
    ];
    assert!(
        spooled(&spool).is_empty(),
        "every report acknowledged: {:?}",
        runs.map(|r| r.stderr)
    );
    assert!(
        lock.try_wait().unwrap().is_none(),
        "the lock was held through the hooks"
    );
    assert_eq!(metric(&node, "narmesh_hook_unchecked_total "), 3.0);
    // The pipeline is held up on the lock: what alerts read shows the queue as it is.
    assert_eq!(metric(&node, "narmesh_queue_depth "), 3.0);
    wait_until(
        60,
        "both paths to be recorded once the database answers",
        || recorded(&node, &paths[1..]) == 2,
    );
    assert!(lock.wait().unwrap().success());
    wait_until(30, "the path never built to fail", || {
        metric(&node, "narmesh_ingest_failures_total ") == 1.0
    });
    assert_eq!(recorded(&node, &[never.to_owned()]), 0);
    wait_until(10, "the queue depth to come down", || {
        metric(&node, "narmesh_queue_depth ") == 0.0
    });
    node.stop();
}

/// A path the node cannot read for want of file descriptors (its limit lowered with `prlimit`
/// below what it has open, between the report's acknowledgement and its ingest) is not a failure
/// of the path: the batch is tried again, and once descriptors are to be had the path is
/// recorded. Meanwhile a client waiting to be accepted on the socket and on the HTTP port
/// (every accept fails) is logged about once a second, not twenty times.
#[test]
fn a_node_out_of_file_descriptors_retries_and_loses_nothing() {
    let (_t, _host, paths, mut node) = second_report_acknowledged("", "no-fds", false);
    let pid = node.pid().to_string();
    let limit = |soft: usize| {
        run_ok(Command::new("prlimit").args([format!("--pid={pid}"), format!("--nofile={soft}:")]));
    };
    // Its descriptors stay open, and no new one can be had (0-2 are taken).
    limit(3);
    crate::harness::wait_until_or_show(
        30,
        "the node to run out of file descriptors",
        || node.log().contains("the batch is tried again"),
        || node.log(),
    );
    let waiting = (
        std::os::unix::net::UnixStream::connect(node.socket()).unwrap(),
        std::net::TcpStream::connect(&node.http).unwrap(),
    );
    std::thread::sleep(Duration::from_secs(3));
    for what in ["socket accept failed", "http accept failed"] {
        let n = node.log().matches(what).count();
        assert!((1..=5).contains(&n), "{n} lines of {what:?} in 3 s");
    }
    drop(waiting);
    limit(4096);
    wait_until(
        30,
        "the path to be recorded once descriptors are back",
        || recorded(&node, &paths[1..]) == 1,
    );
    assert!(node.log().contains("Too many open files"), "{}", node.log());
    assert_eq!(metric(&node, "narmesh_ingest_failures_total "), 0.0);
    node.stop();
}

/// Reports spooled while the node was down, and a node that starts while the store database
/// is briefly unreadable: the reports wait (never rejected) and are taken in once the database
/// is back. Garbage is rejected for good and counted, and so is the report of a path Nix's
/// garbage collector deleted meanwhile (spooled first: were it taken for a passing failure, it
/// would hold back every report after it); a hook's stale temporary file is removed.
#[test]
fn transient_spool_failures_wait_and_permanent_ones_are_counted() {
    let t = tempfile::tempdir().unwrap();
    let host = NixHost::new("");
    let mut paths = built_paths(&host, 6, "spooled");
    let mut node = Node::new(&t.path().join("node"), &host.root);
    let spool = node.spool();
    spool_all(&node, &paths);
    let gone = paths.remove(0);
    run_ok(host.cmd("nix-store").args(["--delete", &gone]));
    std::fs::write(spool.join("00-garbage.frame"), b"\x05\x00\x00\x00junk!").unwrap();
    let stale = spool.join(".000000000000000000000001-1.tmp");
    std::fs::write(&stale, b"half").unwrap();
    let old = std::time::SystemTime::now() - Duration::from_secs(3600);
    std::fs::File::options()
        .write(true)
        .open(&stale)
        .unwrap()
        .set_modified(old)
        .unwrap();
    // The store database goes away for a while.
    let db = narmesh::nix::store_db::db_path(&host.root);
    let away = db.with_extension("away");
    std::fs::rename(&db, &away).unwrap();
    node.start();
    wait_until(20, "the node to try the spool", || {
        node.log().contains("the rest wait")
    });
    let st = node.status();
    assert_eq!(st.spool_waiting, 6, "{st:?}");
    assert_eq!(st.spool_rejected, 1, "the garbage is rejected: {st:?}");
    assert_eq!(recorded(&node, &paths), 0);
    // What an alert reads.
    let metrics = |node: &Node| {
        [
            "problem{part=\"spool\"} ",
            "spool_waiting ",
            "spool_rejected ",
            "spool_refused_total ",
        ]
        .map(|m| metric(node, &format!("narmesh_{m}")))
    };
    assert_eq!(metrics(&node), [1.0, 6.0, 1.0, 1.0]);
    // Tried again with backoff: a second, then twice as long each time (up to 30 s).
    let retries = |node: &Node| -> Vec<String> {
        node.log()
            .lines()
            .filter(|l| l.contains("spool "))
            .filter_map(|l| Some(l.split("; trying again in ").nth(1)?.trim().to_owned()))
            .collect()
    };
    wait_until(20, "the spool to be tried again 3 times", || {
        retries(&node).len() >= 3
    });
    assert_eq!(retries(&node)[..3], ["1s", "2s", "4s"]);
    std::fs::rename(&away, &db).unwrap();
    wait_until(60, "the spooled reports to be taken in", || {
        recorded(&node, &paths) == paths.len()
    });
    // The spool round ends (files set aside, gauges set) after the last report is recorded.
    wait_until(10, "the spool round to end", || {
        metrics(&node) == [0.0, 0.0, 2.0, 2.0]
    });
    let st = node.status();
    assert_eq!((st.spool_waiting, st.spool_rejected), (0, 2), "{st:?}");
    assert_eq!(recorded(&node, std::slice::from_ref(&gone)), 0);
    assert!(
        node.log()
            .contains(&format!("{gone} is not a valid path in the Nix store")),
        "the deleted path's report is rejected as such"
    );
    assert_eq!(
        std::fs::read_dir(spool.join("rejected")).unwrap().count(),
        2
    );
    assert!(!stale.exists(), "the stale temporary file is removed");
    node.stop();
}

/// A spooled report the node cannot read for a while (strace makes every `read` of that one
/// file fail with EIO) is not garbage: it stays in the spool, never set aside, while the
/// reports beside it are taken in and the spool is named a problem; once it reads again (the
/// node restarted without the fault), it is taken in too.
#[test]
fn a_spool_file_that_cannot_be_read_stays_until_it_can() {
    crate::harness::require("strace");
    let t = tempfile::tempdir().unwrap();
    let host = NixHost::new("");
    let paths = built_paths(&host, 3, "unread");
    let mut node = Node::new(&t.path().join("node"), &host.root);
    let spool = node.spool();
    spool_all(&node, &paths);
    let mut files = spooled(&spool);
    files.sort();
    let failing = files[1].canonicalize().unwrap();
    node.wrap = [
        "strace",
        "-f",
        "-qq",
        "-o",
        "/dev/null",
        "-P",
        &failing.display().to_string(),
        "-e",
        "trace=read",
        "-e",
        "inject=read:error=EIO",
    ]
    .map(str::to_owned)
    .to_vec();
    node.start();
    wait_until(30, "the readable reports to be taken in", || {
        recorded(&node, &paths) == 2
    });
    wait_until(20, "the round to say why one waits", || {
        node.log().contains("could not be read: they stay")
    });
    assert!(failing.exists(), "the unreadable report stays in the spool");
    assert_eq!(spooled(&spool).len(), 1);
    let st = node.status();
    assert_eq!((st.spool_waiting, st.spool_rejected), (1, 0), "{st:?}");
    wait_until(10, "the spool named a problem", || {
        metric(&node, "narmesh_problem{part=\"spool\"} ") == 1.0
    });
    // SIGTERM to the node itself (strace, the harness's child, waits for it).
    let ok = Command::new("pkill")
        .args(["-TERM", "-P", &node.pid().to_string()])
        .status()
        .unwrap();
    assert!(ok.success(), "signalling the traced node");
    node.stop();
    node.wrap.clear();
    node.start();
    wait_until(30, "the report to be taken in once it reads", || {
        recorded(&node, &paths) == 3
    });
    wait_until(10, "the spool to be emptied", || spooled(&spool).is_empty());
    assert_eq!(node.status().spool_rejected, 0);
    node.stop();
}

/// The spool is writable by the socket group, so what lies in it is untrusted. Files that are
/// not a regular file of one frame (a FIFO that would block a reader forever, a link to
/// `/dev/zero`, a directory, a sparse file of 1 GiB) are set aside unread, and the reports
/// behind them are still taken in, with the node's memory unmoved; one that cannot even be
/// removed (a mount point) is passed over, not retried every round. Rejected files stay within
/// their bound (the newest 1,000 kept; a data dir of an older release may hold more), and
/// `rejected/` replaced by a link to another directory is replaced again, never followed.
#[test]
fn hostile_spool_files_are_refused_unread_and_rejected_files_stay_bounded() {
    let t = tempfile::tempdir().unwrap();
    let host = NixHost::new("");
    let paths = built_paths(&host, 3, "hostile-spool");
    let mut node = Node::new(&t.path().join("node"), &host.root);
    let spool = node.spool();
    spool_all(&node, &paths);
    // Named to be read before the hook's files.
    run_ok(Command::new("mkfifo").arg(spool.join("0-fifo.frame")));
    std::os::unix::fs::symlink("/dev/zero", spool.join("0-zero.frame")).unwrap();
    std::fs::create_dir(spool.join("0-dir.frame")).unwrap();
    // A mount point: not even root can remove it or move it aside.
    let _mount = Tmpfs::mount(&spool.join("0-mount.frame"), "1m");
    std::fs::File::create(spool.join("0-sparse.frame"))
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
    let rejected = spool.join("rejected");
    std::fs::create_dir(&rejected).unwrap();
    for i in 0..1003 {
        std::fs::write(rejected.join(format!("0-old-{i:04}.frame")), b"junk").unwrap();
    }
    node.start();
    wait_until(30, "the spooled reports behind the hostile files", || {
        recorded(&node, &paths) == paths.len()
    });
    let peak = crate::trust::budget(node.pid()).0 >> 20;
    assert!(peak < 256, "the node's peak memory is {peak} MiB");
    // The round sets aside and prunes after the last report is recorded.
    wait_until(10, "the spool round to end", || {
        let st = node.status();
        (st.spool_waiting, st.spool_rejected) == (0, 1000)
    });
    let kept = |name: &str| rejected.join(name).exists();
    assert!(kept("0-sparse.frame"), "a regular file is kept to inspect");
    assert!(!kept("0-old-0000.frame") && kept("0-old-1002.frame"));
    let mut left: Vec<_> = std::fs::read_dir(&spool)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    left.sort();
    assert_eq!(
        left,
        ["0-mount.frame", "rejected"],
        "the FIFO, the link and the directory are gone"
    );
    let log = node.log();
    for why in [
        "symbolic link",
        "not a regular file",
        "over the limit of one frame",
    ] {
        assert!(log.contains(why), "{why}: {log}");
    }

    // While it runs, `rejected/` becomes a link to another directory.
    let elsewhere = t.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    std::fs::write(elsewhere.join("precious"), b"x").unwrap();
    std::fs::rename(&rejected, t.path().join("old-rejected")).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &rejected).unwrap();
    std::fs::write(spool.join("1-garbage.frame"), b"\x05\x00\x00\x00junk!").unwrap();
    wait_until(20, "the garbage to be set aside", || {
        !spool.join("1-garbage.frame").exists()
    });
    assert!(
        !rejected.is_symlink(),
        "the link is replaced by a directory"
    );
    assert!(rejected.join("1-garbage.frame").is_file());
    let there: Vec<_> = std::fs::read_dir(&elsewhere).unwrap().collect();
    assert_eq!(there.len(), 1, "nothing went where the link pointed");
    // A flood of bad files: a few are named in the log, the rest counted.
    for i in 0..700 {
        std::fs::write(spool.join(format!("2-junk-{i:03}.frame")), b"junk").unwrap();
    }
    wait_until(20, "the junk to be set aside", || {
        !spooled(&spool)
            .iter()
            .any(|p| p.to_string_lossy().contains("2-junk-"))
    });
    assert_eq!(node.status().spool_rejected, 701);
    // Counted as they happen: the five odd entries ahead of the reports, the garbage and the
    // junk (the files kept are bounded, this count is not).
    assert_eq!(metric(&node, "narmesh_spool_refused_total "), 706.0);
    let log = node.log();
    // At most 10 a round: 700 files take at least two rounds (512 a batch), a few more if a
    // round starts while they are still being written.
    let named = log.matches("2-junk-").count();
    assert!(named < 60, "{named} rejected files named in the log");
    assert!(log.contains("more file(s) rejected this round, not named here"));
    assert!(log.contains("is not a directory: replaced by one"));
    let stuck = "can be neither taken in nor set aside";
    assert_eq!(
        log.matches(stuck).count(),
        1,
        "the mount point is passed over: {log}"
    );
    node.stop();
}

/// The hook run as user 65534 in group `gid` (and no other) for `path` of `node`: it exits 0;
/// its stderr.
fn hook_as(node: &Node, gid: u32, path: &str) -> String {
    let out = Command::new("setpriv")
        .args([
            "--reuid",
            "65534",
            "--regid",
            &gid.to_string(),
            "--clear-groups",
        ])
        .arg(bin("narmesh-hook"))
        .env("OUT_PATHS", path)
        .env("NARMESH_SOCKET", node.socket())
        .env("NARMESH_SPOOL", node.spool())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// With `socket-group` and the spool where the default puts it (inside the data dir), the data
/// dir lets the group through (0711, not listed) to the spool: a member of the group whose
/// build finishes while the node is down spools its report, and the node takes it in at its
/// next start.
#[test]
fn a_group_member_spools_into_the_data_dir_while_the_node_is_down() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    crate::harness::require("setpriv");
    let t = tempfile::tempdir().unwrap();
    std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let host = NixHost::new("");
    let paths = built_paths(&host, 1, "group-spool");
    let mut node = Node::new(&t.path().join("node"), &host.root);
    std::fs::set_permissions(&node.dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    node.spool_in_data = true;
    node.extra_config = "socket-group = \"4242\"\n".into();
    node.start();
    let data = std::fs::metadata(node.dir.join("data")).unwrap();
    assert_eq!(data.mode() & 0o777, 0o711);
    node.stop();
    let err = hook_as(&node, 4242, &paths[0]);
    assert!(err.contains("spooled"), "{err}");
    node.start();
    wait_until(30, "the spooled report to be taken in", || {
        recorded(&node, &paths) == 1
    });
    node.stop();
}

/// Who may report builds (have paths signed with the host key, gossiped, mirrored): by default
/// only the node's user and root; with `socket-group`, that group too. A hook of another user
/// is refused at the socket and cannot spool either, and still exits 0.
#[test]
fn the_socket_and_the_spool_admit_only_the_node_and_its_group() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    crate::harness::require("setpriv");
    let t = tempfile::tempdir().unwrap();
    std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let host = NixHost::new("");
    let paths = built_paths(&host, 2, "access");
    let mut node = Node::new(&t.path().join("node"), &host.root);
    std::fs::set_permissions(&node.dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    node.extra_config = "socket-group = \"4242\"\n".into();
    node.start();
    let sock = std::fs::metadata(node.socket()).unwrap();
    assert_eq!((sock.mode() & 0o777, sock.gid()), (0o660, 4242));
    let spool = std::fs::metadata(node.spool()).unwrap();
    assert_eq!((spool.mode() & 0o7777, spool.gid()), (0o2770, 4242));
    let hook_as = |gid: u32, path: &str| hook_as(&node, gid, path);
    // A member of the group: heard.
    let err = hook_as(4242, &paths[0]);
    assert!(err.is_empty(), "{err}");
    wait_until(30, "the group member's report", || {
        recorded(&node, &paths[..1]) == 1
    });
    // Anyone else: neither the socket nor the spool.
    let err = hook_as(65534, &paths[1]);
    assert!(
        err.contains("Permission denied") && err.contains("not shared"),
        "{err}"
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(recorded(&node, &paths[1..]), 0);
    node.stop();
    // Without a socket group: the node's user only.
    node.extra_config = String::new();
    node.start();
    let sock = std::fs::metadata(node.socket()).unwrap();
    assert_eq!(sock.mode() & 0o777, 0o600);
    node.stop();
}

/// Fill the file system of `dir` with one file; returns it.
fn fill(dir: &Path) -> std::path::PathBuf {
    use std::io::Write as _;
    let p = dir.join("filler");
    let mut f = std::fs::File::create(&p).unwrap();
    // Down to the last byte, so that no page is left half used.
    let block = vec![0xabu8; 64 << 10];
    for size in [64 << 10, 4096, 1] {
        while f.write_all(&block[..size]).is_ok() {}
    }
    let _ = f.sync_all();
    p
}

/// The data dir's disk fills up while builds go on: every hook still exits 0 within its
/// deadline (spooling what the node cannot record), status says why, nothing acknowledged is
/// lost, and once space is freed everything is taken in and served.
#[test]
fn a_full_disk_loses_nothing_and_everything_arrives_once_space_is_freed() {
    let t = tempfile::tempdir().unwrap();
    let host = NixHost::new("");
    let before = built_paths(&host, 3, "full-before");
    let during = built_paths(&host, 4, "full-during");
    let mut node = Node::new(&t.path().join("node"), &host.root);
    let data = Tmpfs::mount(&node.dir.join("data"), "16m");
    // A floor below the 16 MiB disk: once space is freed, no problem is left.
    node.extra_config = "[store]\nmin-free = \"1MiB\"\n".into();
    node.start();
    for p in &before {
        let run = run_hook(&node.socket(), &node.spool(), "", p, 2000);
        assert!(!run.stderr.contains("spooled"), "{}", run.stderr);
    }
    wait_until(30, "the first builds to be served", || node.serves(&before));
    let filler = fill(&data.0);
    // Each report is either acknowledged (the queue's last page had room) or spooled; the
    // hook exits 0 within its deadline either way.
    for p in &during {
        let run = run_hook(&node.socket(), &node.spool(), "", p, 2000);
        assert!(
            run.took < Duration::from_secs(10),
            "hook took {:?}",
            run.took
        );
    }
    wait_until(30, "the problem to show in status", || {
        node.status()
            .problems
            .iter()
            .any(|p| p.contains("No space left"))
    });
    assert!(
        node.serves(&before),
        "what was acknowledged is still served"
    );
    std::fs::remove_file(filler).unwrap();
    wait_until(90, "everything to arrive once space is freed", || {
        node.serves(&during) && node.serves(&before)
    });
    wait_until(30, "the problems to clear", || {
        node.status().problems.is_empty()
    });
    node.stop();
    drop(data);
}

/// A node whose pipeline panics (an injected fault; no real part panics on demand) does not
/// go on acknowledging hooks it never ingests: it stops with a failure, naming what ended, so
/// that its service manager starts it again, and the restarted node records the report the
/// first one acknowledged. A part that is off (forgetting, with `forget-after-secs = 0`) has
/// not ended: that node runs on and stops cleanly.
#[test]
fn a_node_whose_pipeline_panics_stops_and_its_restart_loses_nothing() {
    let t = tempfile::tempdir().unwrap();
    let host = NixHost::new("");
    let paths = built_paths(&host, 1, "vital");
    let mut node = Node::new(&t.path().join("node"), &host.root);
    node.env
        .push(("NARMESH_TEST_FAULT".into(), "pipeline.panics:1".into()));
    node.start();
    let (socket, spool) = (node.socket(), node.spool());
    let run = run_hook(&socket, &spool, "", &paths[0], 5000);
    assert!(spooled(&spool).is_empty(), "acknowledged: {}", run.stderr);
    let status = node
        .wait_exit_status(30)
        .unwrap_or_else(|| panic!("the node runs on without its pipeline:\n{}", node.log()));
    assert!(!status.success(), "{status}");
    assert!(
        node.log()
            .contains("pipeline panicked while the node was running"),
        "{}",
        node.log()
    );
    node.env.clear();
    node.extra_config = "[store]\nmin-free = \"64MiB\"\nforget-after-secs = 0\n".into();
    node.start();
    wait_until(30, "the restarted node to record the report", || {
        recorded(&node, &paths) == 1
    });
    std::thread::sleep(Duration::from_secs(1));
    node.stop();
}
