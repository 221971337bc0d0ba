//! The process's allocator settings: glibc's malloc, held to what the node uses.
//!
//! glibc gives each thread that allocates under contention an arena of its own (up to eight per
//! core), and keeps what is freed in the arena it came from, for reuse. A node whose tokio
//! workers and blocking threads take turns at catch-up batches, redb commits and HTTP answers
//! kept about three times its live heap that way: 219 MiB peak RSS with 100,000 records known,
//! for a heap that never passed 44 MiB (heaptrack). Two arenas, and handing free pages back to
//! the system once more than [`KEEP_FREE`] of it is resident and free, keep it near the heap (`cargo bench --bench
//! scale`; BENCHMARKS.md).
//!
//! Not every second whatever is free: a node moving NARs allocates and frees its 1 MiB pieces
//! all the time, and pages handed back are faulted in and zeroed again at the next piece. On a
//! VM, where touching a page the guest gave up is slow, zeroing fresh pages took 3-17% of each
//! node's CPU in `narmesh bench --s3-local` (BENCHMARKS.md).

/// Cap glibc's malloc arenas at two (`MALLOC_ARENA_MAX`, if set, still wins). Call before any
/// other thread starts.
pub fn limit_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets a malloc parameter; no other thread exists yet.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}

/// Resident free bytes the arenas may keep for reuse before they are handed back.
pub const KEEP_FREE: usize = 16 << 20;

/// Every second, hand free pages back to the system if more than [`KEEP_FREE`] of the
/// process's resident anonymous memory is free in malloc's arenas, on a thread of its own (a
/// few milliseconds each time, in the arenas' free lists only).
pub fn start_trimming() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let _ = std::thread::Builder::new()
            .name("malloc-trim".into())
            .spawn(|| {
                loop {
                    std::thread::sleep(std::time::Duration::from_secs(1));
                    if resident_free().is_none_or(|free| free > KEEP_FREE) {
                        // SAFETY: malloc_trim is thread-safe; it takes each arena's lock in turn.
                        unsafe {
                            libc::malloc_trim(0);
                        }
                    }
                }
            });
    }
}

/// Resident anonymous memory not in use by malloc's callers: `RssAnon` less what malloc has
/// handed out (`uordblks`, `hblkhd`). Free chunks whose pages were already handed back are not
/// resident, so they do not count (malloc's own free total, `fordblks`, would count them, and
/// a fragmented heap would be trimmed every second for nothing). Thread stacks and other
/// anonymous mappings count too: a few MiB. `None` if `/proc` cannot tell.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn resident_free() -> Option<usize> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let anon_kib: usize = status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    // SAFETY: mallinfo2 is thread-safe; it takes each arena's lock in turn.
    let mi = unsafe { libc::mallinfo2() };
    Some((anon_kib << 10).saturating_sub(mi.uordblks + mi.hblkhd))
}
