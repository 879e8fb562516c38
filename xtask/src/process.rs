//! A running process's resource use, read from `/proc`: shared by the benchmarks that watch the
//! agent (`bench agent`, `bench flood`).

use anyhow::{ensure, Context, Result};

/// The process's resident set (`VmRSS`), in KiB.
pub fn rss_kib(pid: u32) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    s.lines()
        .find_map(|l| {
            l.strip_prefix("VmRSS:")
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .context("no VmRSS")
}

/// The process's CPU time so far (user + system), in clock ticks.
pub fn cpu_ticks(pid: u32) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = s.rsplit_once(')').context("stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Ok(f[11].parse::<u64>()? + f[12].parse::<u64>()?)
}

/// Clock ticks per second, the unit of [`cpu_ticks`].
pub fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) as f64 }
}

/// Where a process's resident set is, in KiB: from `/proc/PID/smaps`, one pass over its mappings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RssBreakdown {
    /// `Rss` of every mapping (equals `VmRSS` up to the kernel's lazy counters).
    pub total: u64,
    /// Anonymous memory outside the thread stacks: the heap (brk and mmapped chunks).
    pub heap: u64,
    /// Anonymous memory of the threads' stacks (the main `[stack]` and each thread's mapping
    /// that holds its stack pointer, as `/proc/PID/task/*/stat` reports it).
    pub stacks: u64,
    /// File-backed pages: the binary's text and data, shared libraries.
    pub file: u64,
}

/// Reads [`RssBreakdown`] of a running process.
pub fn rss_breakdown(pid: u32) -> Result<RssBreakdown> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    // Each thread's stack pointer, from `/proc/PID/task/TID/syscall` (a blocked thread's
    // syscall, its arguments, then its stack and instruction pointers; readable by root): a
    // mapping that holds one is that thread's stack. An idle agent's threads all wait in a
    // syscall; one that runs (`running`) is counted as heap.
    let mut sps = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let sc = std::fs::read_to_string(t?.path().join("syscall")).unwrap_or_default();
        if let Some(sp) = sc.split_whitespace().nth(7) {
            if let Ok(sp) = u64::from_str_radix(sp.trim_start_matches("0x"), 16) {
                sps.push(sp);
            }
        }
    }
    let mut out = RssBreakdown::default();
    let (mut is_file, mut is_stack) = (false, false);
    for line in smaps.lines() {
        let mut f = line.split_whitespace();
        let first = f.next().unwrap_or_default();
        if let Some((lo, hi)) = first.split_once('-').filter(|_| !first.ends_with(':')) {
            let range = (
                u64::from_str_radix(lo, 16).unwrap_or(0),
                u64::from_str_radix(hi, 16).unwrap_or(0),
            );
            let inode = f.nth(3).unwrap_or("0");
            let name = f.next().unwrap_or("");
            is_file = inode != "0";
            is_stack = name == "[stack]" || sps.iter().any(|&sp| sp >= range.0 && sp < range.1);
        } else if first == "Rss:" {
            let kib: u64 = f.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            out.total += kib;
            if is_file {
                out.file += kib;
            } else if is_stack {
                out.stacks += kib;
            } else {
                out.heap += kib;
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_breakdown_finds_the_stacks_and_adds_up() {
        // A thread parked in a syscall, its stack touched: its mapping is a stack.
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            let buf = std::hint::black_box([1u8; 256 * 1024]);
            let _ = rx.recv();
            buf[0]
        });
        // Until the thread waits in its syscall (while it runs, its stack pointer is unknown).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let b = loop {
            let b = super::rss_breakdown(std::process::id()).unwrap();
            if b.stacks >= 256 || std::time::Instant::now() > deadline {
                break b;
            }
            std::thread::yield_now();
        };
        drop(tx);
        t.join().unwrap();
        assert!(b.stacks >= 256, "{b:?}");
        assert!(b.file > 0 && b.heap > 0, "{b:?}");
        assert_eq!(b.total, b.heap + b.stacks + b.file);
    }
}

/// Each CPU's time from `/proc/stat`, in ticks: user (+ nice), system, irq + softirq,
/// idle (+ iowait), steal.
pub(crate) fn cpu_times() -> Result<Vec<[u64; 5]>> {
    parse_cpu_times(&std::fs::read_to_string("/proc/stat")?)
}

pub(crate) fn parse_cpu_times(s: &str) -> Result<Vec<[u64; 5]>> {
    let mut cpus = Vec::new();
    for l in s.lines() {
        let Some(rest) = l.strip_prefix("cpu") else {
            continue;
        };
        if !rest.starts_with(|c: char| c.is_ascii_digit()) {
            continue;
        }
        let f: Vec<u64> = rest
            .split_whitespace()
            .skip(1)
            .map(|v| v.parse().unwrap_or(0))
            .collect();
        ensure!(f.len() >= 8, "short /proc/stat line {l}");
        cpus.push([f[0] + f[1], f[2], f[5] + f[6], f[3] + f[4], f[7]]);
    }
    Ok(cpus)
}
