//! The allocator's view of the agent's memory (glibc only): what is live, what is freed but
//! kept, and giving the kept part back after a burst.

use tracing::debug;

/// glibc's heap figures, in bytes (`mallinfo2`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HeapStats {
    /// Obtained from the system by brk/sbrk (the main arena and others).
    pub arena: usize,
    /// Held in mmapped chunks (large allocations).
    pub mmapped: usize,
    /// Handed out and not freed: the live set.
    pub in_use: usize,
    /// Freed and kept by the allocator (part of it may no longer be resident).
    pub free: usize,
    /// Free at the top of the main arena: what a plain trim can give back.
    pub top: usize,
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn stats() -> Option<HeapStats> {
    // SAFETY: mallinfo2 reads the allocator's counters under its own locks.
    let m = unsafe { libc::mallinfo2() };
    Some(HeapStats {
        arena: m.arena,
        mmapped: m.hblkhd,
        in_use: m.uordblks + m.hblkhd,
        free: m.fordblks,
        top: m.keepcost,
    })
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn stats() -> Option<HeapStats> {
    None
}

/// Whether [`log`] logs (`NETPOL_LOG=netpol_agent::daemon::heap=debug`): after every trim, the
/// heap as the agent goes idle.
pub fn log_enabled() -> bool {
    tracing::enabled!(tracing::Level::DEBUG)
}

/// Logs [`stats`] at debug level.
pub fn log(context: &str) {
    if !log_enabled() {
        return;
    }
    if let Some(s) = stats() {
        let kib = |b: usize| b / 1024;
        // statm's second field: resident pages.
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(0) as usize;
        let rss_kib = std::fs::read_to_string("/proc/self/statm")
            .ok()
            .and_then(|s| s.split_whitespace().nth(1)?.parse::<usize>().ok())
            .map_or(0, |pages| pages * page / 1024);
        debug!(
            context,
            rss_kib,
            arena_kib = kib(s.arena),
            mmapped_kib = kib(s.mmapped),
            in_use_kib = kib(s.in_use),
            free_kib = kib(s.free),
            top_kib = kib(s.top),
            "heap"
        );
    }
}

/// Bursts of work since the last trim ([`after_burst`]).
static BURST: tokio::sync::Notify = tokio::sync::Notify::const_new();

/// A burst of allocations is over (a Docker snapshot or batch of events, a policy change, a
/// request answered): [`trim_after_bursts`] gives the freed memory back once the agent is quiet.
pub fn after_burst() {
    BURST.notify_one();
}

/// Gives the allocator's free pages back to the system (glibc keeps them: freed memory in the
/// middle of the heap stays resident until `malloc_trim`), once the agent has been quiet for
/// `quiet` after a burst, or `at_most` after it when bursts keep coming (a client polling
/// `status`). Trimming holds the allocator's lock for about a millisecond per MB of heap, so
/// not within every burst; pages that a later burst needs again are faulted in again.
pub async fn trim_after_bursts(quiet: std::time::Duration, at_most: std::time::Duration) {
    trim_after(&BURST, quiet, at_most, || {
        let t0 = std::time::Instant::now();
        trim();
        if log_enabled() {
            debug!(trim_ms = t0.elapsed().as_secs_f64() * 1e3, "trimmed");
            log("after trim");
        }
    })
    .await
}

/// Calls `trim` once `bursts` has been quiet for `quiet` after a notification, or `at_most`
/// after it.
async fn trim_after(
    bursts: &tokio::sync::Notify,
    quiet: std::time::Duration,
    at_most: std::time::Duration,
    mut trim: impl FnMut(),
) {
    loop {
        bursts.notified().await;
        let deadline = tokio::time::Instant::now() + at_most;
        while tokio::time::Instant::now() < deadline
            && tokio::time::timeout(quiet, bursts.notified()).await.is_ok()
        {}
        trim();
    }
}

/// `malloc_trim(0)`: every free page of every arena back to the system.
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory, under the allocator's own locks.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_the_allocators_figures() {
        let s = super::stats().expect("glibc");
        assert!(s.in_use > 0 && s.arena > 0, "{s:?}");
        super::trim();
    }
}
