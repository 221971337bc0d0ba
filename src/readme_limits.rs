//! The limits the README promises an operator, each tied to the code's constant and to the
//! README's own words: a change to either side alone fails here. (Tests elsewhere exercise each
//! limit through its constant, so they would pass with the constant changed and the README
//! wrong.) Limits private to the mesh are tied in their own modules' tests, through
//! [`says`].

use std::time::Duration;

/// The README with every run of whitespace one space (its lines wrap anywhere).
fn readme() -> String {
    include_str!("../README.md")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// Panics unless the README says `phrase` (whitespace as one space).
pub(crate) fn says(phrase: &str) {
    assert!(
        readme().contains(phrase),
        "the README no longer says {phrase:?}: the code and the README disagree"
    );
}

#[test]
fn the_spools_limits() {
    use crate::spool::*;
    assert_eq!((BATCH_FILES, BATCH_BYTES), (512, 16 << 20));
    says("in batches of at most 512 files and 16 MiB");
    assert_eq!((KEEP_REJECTED, KEEP_REJECTED_BYTES), (1000, 64 << 20));
    says("keeps the newest 1,000 files within 64 MiB of disk");
    assert_eq!(LOG_REJECTED, 10);
    says("most 10 rejected files in the log");
    assert_eq!(STALE_TEMP, Duration::from_secs(60));
    says("killed while spooling are removed after a minute");
}

#[test]
fn the_hooks_deadline() {
    assert_eq!(narmesh_proto::hook::DEFAULT_TIMEOUT_MS, 500);
    says("`NARMESH_HOOK_TIMEOUT_MS` (default 500)");
}

#[test]
fn the_sockets_limits() {
    assert_eq!(crate::ingest::MAX_CONNECTIONS, 256);
    assert_eq!(crate::ingest::IDLE, Duration::from_secs(30));
    says(
        "The socket serves at most 256 connections at once; a frame must arrive, and an answer be read, within 30 s",
    );
    assert_eq!(crate::ingest::SPOOL_POLL, Duration::from_millis(500));
    says("takes the spool in at start and every 500 ms");
    assert_eq!(crate::ingest::SPOOL_BACKOFF_MAX, Duration::from_secs(30));
    says("tried again with backoff up to 30 s");
}

#[test]
fn the_http_caches_limits() {
    assert_eq!(crate::http::MAX_CONNECTIONS, 1024);
    says("at most 1024 connections at once");
    assert_eq!(crate::http::MAX_HEAD, 64 << 10);
    says("be at most 64 KiB (past it: 431");
}

#[test]
fn the_logs_quiet_time() {
    assert_eq!(crate::logging::QUIET_FOR, Duration::from_secs(60));
    says("repeats is written at most once a minute");
}

#[test]
fn an_s3_attempts_deadline() {
    use crate::mirror::s3::attempt_timeout;
    assert_eq!(attempt_timeout(0), Duration::from_secs(60));
    assert_eq!(attempt_timeout(100 << 20), Duration::from_secs(160));
    says("an attempt's deadline grows with its body (a minute plus a second per MiB)");
}

#[test]
fn the_watchdogs_limits() {
    assert_eq!(crate::watchdog::STALLED, Duration::from_secs(30));
    says("One that has run nothing for 30 s");
    says("writes in flight for 30 s with none that held the lock ending");
    assert_eq!(crate::db::WRITE_PART, 1024);
    says("are written 1024 to a commit");
    assert_eq!(crate::watchdog::PROBE_EVERY, Duration::from_secs(1));
    says("every second a thread of its own gives each");
    let units = Some(Duration::from_secs(60));
    assert_eq!(
        (
            crate::watchdog::tell_every(units),
            crate::watchdog::stall_after(units)
        ),
        (Some(Duration::from_secs(15)), Duration::from_secs(30))
    );
    says(
        "`WatchdogSec=60s` the node says `WATCHDOG=1` every 15 s while nothing has stalled (30 s, half the interval; a shorter `WatchdogSec=` shortens it too)",
    );
    assert_eq!(
        crate::watchdog::stall_after(Some(Duration::from_secs(4))),
        Duration::from_secs(2)
    );
}
