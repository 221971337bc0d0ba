//! A flaky S3: a fault-injecting proxy in front of the real S3 server answers a share of the
//! mirror's connections with 500s, 503 SlowDown, resets, stalls and truncated answers, in a
//! seeded random mix. An independent client snapshots the bucket over and over while the faults
//! run: every snapshot must show every narinfo's NAR and complete closures; at the end the
//! bucket holds everything. (The long mix is `FLAKY_S3_SECS` long; the test runs a short one.)

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crate::harness::wait_until;
use crate::mirror::{Setup, check_bucket, setup, wait_in_bucket};
use crate::s3_harness::{ACCESS_KEY, BUCKET, S3Server, SECRET_KEY};
use crate::trust::metric;

/// What the proxy did, by kind.
#[derive(Default)]
struct Counts {
    passed: AtomicU64,
    errors_500: AtomicU64,
    slow_down: AtomicU64,
    resets: AtomicU64,
    stalls: AtomicU64,
    truncated: AtomicU64,
    /// Connections that met an outage (counted again in their kind).
    outages: AtomicU64,
}

/// Sets its flag when dropped.
struct SetOnDrop<'a>(&'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// A small xorshift generator: the mix is reproducible from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Read a request head (up to the blank line); returns it, or None if the client went away.
fn read_head(c: &mut TcpStream) -> Option<Vec<u8>> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if c.read(&mut b).ok()? == 0 || head.len() > 64 << 10 {
            return None;
        }
        head.push(b[0]);
    }
    Some(head)
}

/// Read a request head from `c` and send it upstream with `Connection: close` (one request
/// per connection); returns the request line and the upstream connection.
fn relay_head(c: &mut TcpStream, upstream: u16) -> Option<(String, TcpStream)> {
    let head = read_head(c)?;
    relay(&head, upstream)
}

/// Send a request head read already upstream, as [`relay_head`] does.
fn relay(head: &[u8], upstream: u16) -> Option<(String, TcpStream)> {
    let text = String::from_utf8_lossy(head);
    let first = text.lines().next().unwrap_or_default().to_owned();
    let mut head: String = text
        .trim_end_matches("\r\n")
        .split("\r\n")
        .filter(|l| !l.to_ascii_lowercase().starts_with("connection:"))
        .map(|l| format!("{l}\r\n"))
        .collect();
    head.push_str("Connection: close\r\n\r\n");
    let mut up = TcpStream::connect(("127.0.0.1", upstream)).ok()?;
    up.write_all(head.as_bytes()).ok()?;
    Some((first, up))
}

fn pipe(mut from: TcpStream, mut to: TcpStream, limit: Option<u64>) {
    let mut buf = [0u8; 16 << 10];
    let mut sent = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let n = match limit {
            Some(l) if sent + n as u64 > l => (l - sent) as usize,
            _ => n,
        };
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
        sent += n as u64;
        if limit.is_some_and(|l| sent >= l) {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}

fn error_answer(c: &mut TcpStream, status: &str, code: &str) {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code><Message>injected</Message></Error>"
    );
    let _ = write!(
        c,
        "HTTP/1.1 {status}\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = c.shutdown(Shutdown::Both);
}

/// One client connection: a fault (with probability `rate` percent, or for sure during an
/// outage) or a faithful relay.
fn handle(mut c: TcpStream, upstream: u16, roll: u64, rate: u64, outage: bool, counts: &Counts) {
    let kind = if outage {
        // The server is down: every request fails fast, as a 500, a SlowDown or a reset.
        (roll >> 8) % 3
    } else if roll % 100 < rate {
        (roll >> 8) % 5
    } else {
        99
    };
    match kind {
        0 | 1 => {
            if read_head(&mut c).is_some() {
                if kind == 0 {
                    counts.errors_500.fetch_add(1, Ordering::Relaxed);
                    error_answer(&mut c, "500 Internal Server Error", "InternalError");
                } else {
                    counts.slow_down.fetch_add(1, Ordering::Relaxed);
                    error_answer(&mut c, "503 Slow Down", "SlowDown");
                }
            }
        }
        2 => {
            counts.resets.fetch_add(1, Ordering::Relaxed);
            let _ = read_head(&mut c);
            let _ = rustix::net::sockopt::set_socket_linger(&c, Some(Duration::ZERO));
            drop(c);
        }
        _ => {
            // One request per connection (`Connection: close` both ways), so that every
            // request of a client that keeps connections alive meets the dice.
            let Some((_, up)) = relay_head(&mut c, upstream) else {
                return;
            };
            let limit = if kind == 3 {
                counts.stalls.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(1500 + roll % 2000));
                None
            } else if kind == 4 {
                counts.truncated.fetch_add(1, Ordering::Relaxed);
                Some(40 + (roll >> 16) % 400)
            } else {
                counts.passed.fetch_add(1, Ordering::Relaxed);
                None
            };
            let (c2, up2) = (c.try_clone().unwrap(), up.try_clone().unwrap());
            let t = std::thread::spawn(move || pipe(c2, up2, None));
            pipe(up, c, limit);
            let _ = t.join();
        }
    }
}

/// Outages: the first second of every four, every request fails.
const OUTAGE_EVERY: Duration = Duration::from_secs(4);
const OUTAGE_FOR: Duration = Duration::from_secs(1);

/// The long mix's pace: a round of builds every so often.
const ROUND_EVERY: Duration = Duration::from_secs(5);

/// Start the proxy in front of `upstream`; returns its port.
fn start_proxy(
    upstream: u16,
    seed: u64,
    rate: u64,
    counts: Arc<Counts>,
    stop: Arc<AtomicBool>,
) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut rng = Rng(seed | 1);
        let start = std::time::Instant::now();
        for c in l.incoming() {
            let Ok(c) = c else { continue };
            let stopped = stop.load(Ordering::Relaxed);
            let roll = if stopped { 99 } else { rng.next() };
            let since = start.elapsed().as_millis() % OUTAGE_EVERY.as_millis();
            let outage = !stopped && since < OUTAGE_FOR.as_millis();
            if outage {
                counts.outages.fetch_add(1, Ordering::Relaxed);
            }
            let counts = counts.clone();
            std::thread::spawn(move || handle(c, upstream, roll, rate, outage, &counts));
        }
    });
    port
}

#[test]
fn a_flaky_s3_never_shows_a_broken_closure_and_ends_complete() {
    let secs: u64 = std::env::var("FLAKY_S3_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let s3 = S3Server::start();
    let counts = Arc::new(Counts::default());
    let stop = Arc::new(AtomicBool::new(false));
    let proxy = start_proxy(s3.port(), 0x5eed_f1a4, 40, counts.clone(), stop.clone());
    let Setup { _t, a, mut nodes } = setup(&s3, "", (ACCESS_KEY, SECRET_KEY));
    // The mirror talks to the bucket through the proxy.
    nodes[1].extra_config = format!(
        "[mirror.s3]\nbucket = \"{BUCKET}\"\nendpoint = \"http://127.0.0.1:{proxy}\"\nregion = \"us-east-1\"\nmultipart-threshold = 5242880\npart-size = 5242880\n"
    );
    for n in nodes.iter_mut() {
        n.start();
    }
    wait_until(
        60,
        "the mirror to write nix-cache-info through the flaky S3",
        || s3.objects().iter().any(|(k, _)| k == "nix-cache-info"),
    );
    // Snapshots by an independent client (straight to the S3 server) all along.
    let done = Arc::new(AtomicBool::new(false));
    let (snapshots, npaths) = {
        let done = done.clone();
        let s3 = &s3;
        std::thread::scope(|scope| {
            let h = scope.spawn(|| {
                let mut n = 0;
                while !done.load(Ordering::Relaxed) {
                    check_bucket(s3, &[]);
                    n += 1;
                    std::thread::sleep(Duration::from_millis(200));
                }
                n
            });
            // However this thread ends (a panic too), the snapshots stop, so the scope ends.
            let _stop = SetOnDrop(&done);
            let mut paths: Vec<String> = Vec::new();
            // Three rounds of builds (the CI test), or rounds for `FLAKY_S3_SECS` (the long mix).
            let started = std::time::Instant::now();
            let mut r = 0;
            while r < 3 || started.elapsed() < Duration::from_secs(secs) {
                let top = a.build(&format!(
                    r#"
  let
    big = mk "flaky-{r}-big" "head -c 11000000 /dev/urandom > $out";
    leaves = builtins.genList (i: mk "flaky-{r}-leaf-${{toString i}}" "echo ${{toString i}} > $out") 10;
    mid = mk "flaky-{r}-mid" "mkdir $out; echo ${{big}} ${{toString leaves}} > $out/ref";
  in mk "flaky-{r}-top" "mkdir $out; echo ${{mid}} > $out/ref"
"#
                ))[0]
                    .clone();
                paths.extend(a.closure(std::slice::from_ref(&top)).iter().cloned());
                r += 1;
                // The long mix builds at a steady pace (one round of 11 MB every 5 s), not
                // as fast as Nix can.
                let next = ROUND_EVERY * r;
                if secs > 0 && started.elapsed() < next {
                    std::thread::sleep(next - started.elapsed());
                }
            }
            // Faults keep coming until every path is in; then the bucket must be complete.
            wait_in_bucket(s3, &nodes[1], &paths, 240 + secs);
            done.store(true, Ordering::Relaxed);
            let n = h.join().expect("snapshot thread");
            check_bucket(s3, &paths);
            (n, paths.len())
        })
    };
    stop.store(true, Ordering::Relaxed);
    let c = &counts;
    let faults = [
        c.errors_500.load(Ordering::Relaxed),
        c.slow_down.load(Ordering::Relaxed),
        c.resets.load(Ordering::Relaxed),
        c.stalls.load(Ordering::Relaxed),
        c.truncated.load(Ordering::Relaxed),
    ];
    eprintln!(
        "flaky S3: {} paths; {snapshots} consistent snapshots; connections passed {}, in outages {}, 500 {}, SlowDown {}, reset {}, stalled {}, truncated {}",
        npaths,
        c.passed.load(Ordering::Relaxed),
        c.outages.load(Ordering::Relaxed),
        faults[0],
        faults[1],
        faults[2],
        faults[3],
        faults[4]
    );
    assert!(
        snapshots > 0,
        "the bucket was snapshotted while the faults ran"
    );
    assert!(
        faults.iter().filter(|n| **n > 0).count() >= 4,
        "most kinds of fault were injected: {faults:?}"
    );
    for n in nodes.iter_mut() {
        n.stop();
    }
}

/// A proxy that relays everything faithfully, except that the first `lose` answers to
/// CreateMultipartUpload (`POST ...?uploads`) are lost: the request reaches the bucket, which
/// creates the upload, and the client's connection is reset instead of answered. Returns the
/// proxy's port and the count of answers lost.
fn start_answer_losing_proxy(upstream: u16, lose: u64) -> (u16, Arc<AtomicU64>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let lost = Arc::new(AtomicU64::new(0));
    let counter = lost.clone();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { continue };
            let lost = counter.clone();
            std::thread::spawn(move || {
                let Some((first, mut up)) = relay_head(&mut c, upstream) else {
                    return;
                };
                let create = first.starts_with("POST ") && first.contains("?uploads");
                if create && lost.fetch_add(1, Ordering::Relaxed) < lose {
                    // The bucket creates the upload; its answer never reaches the mirror.
                    let mut answer = Vec::new();
                    let _ = up.read_to_end(&mut answer);
                    let _ = rustix::net::sockopt::set_socket_linger(&c, Some(Duration::ZERO));
                    return;
                }
                if create {
                    lost.fetch_sub(1, Ordering::Relaxed);
                }
                let (c2, up2) = (c.try_clone().unwrap(), up.try_clone().unwrap());
                let t = std::thread::spawn(move || pipe(c2, up2, None));
                pipe(up, c, None);
                let _ = t.join();
            });
        }
    });
    (port, lost)
}

/// A CreateMultipartUpload whose answer is lost leaves an intent and an upload open in the
/// bucket. The mirror settles it before its next attempt at that key (while it runs, not only
/// at its next start): nothing stays open and no intent piles up on a flaky link.
#[test]
fn uploads_created_without_an_answer_are_aborted_while_the_mirror_runs() {
    let s3 = S3Server::start();
    let (proxy, lost) = start_answer_losing_proxy(s3.port(), 2);
    let Setup { _t, a, mut nodes } = setup(&s3, "", (ACCESS_KEY, SECRET_KEY));
    nodes[1].extra_config = format!(
        "[mirror.s3]\nbucket = \"{BUCKET}\"\nendpoint = \"http://127.0.0.1:{proxy}\"\nregion = \"us-east-1\"\nmultipart-threshold = 5242880\npart-size = 5242880\n"
    );
    for n in nodes.iter_mut() {
        n.start();
    }
    let top = a.build(r#"mk "lost-create-big" "head -c 11000000 /dev/urandom > $out""#)[0].clone();
    let paths = vec![top.full()];
    wait_in_bucket(&s3, &nodes[1], &paths, 180);
    check_bucket(&s3, &paths);
    assert!(
        lost.load(Ordering::Relaxed) >= 2,
        "the proxy lost {} CreateMultipartUpload answers",
        lost.load(Ordering::Relaxed)
    );
    assert_eq!(
        s3.open_uploads(),
        0,
        "the uploads created without an answer were aborted while the mirror ran"
    );
    for n in nodes.iter_mut() {
        n.stop();
    }
    // And no intent was left behind in the mirror's database.
    let db = narmesh::db::Db::open(&nodes[1].dir.join("data/narmesh.redb")).unwrap();
    assert_eq!(db.open_uploads().unwrap().len(), 0, "intents left recorded");
}

/// A proxy in front of `upstream` that answers every PUT but `nix-cache-info`'s with 503
/// SlowDown while `slow` is set, and relays everything else; returns its port.
fn start_slowing_proxy(upstream: u16, slow: Arc<AtomicBool>) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { continue };
            let slow = slow.clone();
            std::thread::spawn(move || {
                let Some(head) = read_head(&mut c) else {
                    return;
                };
                let line = String::from_utf8_lossy(&head)
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .to_owned();
                if slow.load(Ordering::Relaxed)
                    && line.starts_with("PUT ")
                    && !line.contains("nix-cache-info")
                {
                    error_answer(&mut c, "503 Slow Down", "SlowDown");
                    return;
                }
                let Some((_, up)) = relay(&head, upstream) else {
                    return;
                };
                let (c2, up2) = (c.try_clone().unwrap(), up.try_clone().unwrap());
                let t = std::thread::spawn(move || pipe(c2, up2, None));
                pipe(up, c, None);
                let _ = t.join();
            });
        }
    });
    port
}

/// A bucket that asks to slow down (every upload answered 503 SlowDown for a while): each
/// upload failed so cuts the uploads the mirror runs at once to 0.7x, down to one
/// (`narmesh_mirror_upload_slots`, and the log says so); once the bucket takes uploads again,
/// everything goes up and the allowance grows back.
#[test]
fn a_bucket_that_asks_to_slow_down_gets_fewer_uploads_at_once() {
    let s3 = S3Server::start();
    let slow = Arc::new(AtomicBool::new(true));
    let proxy = start_slowing_proxy(s3.port(), slow.clone());
    let Setup { _t, a, mut nodes } = setup(&s3, "", (ACCESS_KEY, SECRET_KEY));
    nodes[1].extra_config = format!(
        "[mirror.s3]\nbucket = \"{BUCKET}\"\nendpoint = \"http://127.0.0.1:{proxy}\"\nregion = \"us-east-1\"\nconcurrency = 8\n"
    );
    for n in nodes.iter_mut() {
        n.start();
    }
    let slots = |n: &crate::node_harness::Node| metric(n, "narmesh_mirror_upload_slots ");
    wait_until(60, "the mirror to start with 8 uploads at once", || {
        slots(&nodes[1]) == 8.0
    });
    let outs = a.build(
        r#"builtins.genList (i: mk "slow-down-${toString i}" "echo ${toString i} > $out") 10"#,
    );
    let paths: Vec<String> = outs.iter().map(|p| p.full()).collect();
    wait_until(90, "the mirror to cut its uploads at once to one", || {
        slots(&nodes[1]) == 1.0
    });
    assert!(
        nodes[1].log().contains("the bucket asked to slow down"),
        "{}",
        nodes[1].log()
    );
    slow.store(false, Ordering::Relaxed);
    wait_in_bucket(&s3, &nodes[1], &paths, 120);
    check_bucket(&s3, &paths);
    wait_until(30, "the allowance to grow back", || slots(&nodes[1]) > 1.0);
}
