//! `cargo xtask fuzz policy`: the policy parser's mutation fuzzer
//! (`netpol_agent::policy::fuzz`) for longer than the unit tests run it, watching heap use too.
//!
//! Every input must parse (and compile) or fail with ordinary errors, without a panic, within
//! 1 s and with less than `--max-heap-mb` of heap at its peak. A failing input is written to
//! `target/fuzz-policy-failure.yaml`; add it to the corpus once fixed.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    path::PathBuf,
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, Result};
use netpol_agent::policy::fuzz;

#[derive(clap::Args, Debug, Clone)]
pub struct Opts {
    /// Inputs to try.
    #[arg(long, default_value_t = 1_000_000)]
    pub iterations: u64,
    /// Stop after this many seconds, whatever the count.
    #[arg(long, default_value_t = 300)]
    pub seconds: u64,
    /// Seed of the mutations (the same seed gives the same inputs).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Peak heap allowed while one input is parsed and compiled.
    #[arg(long, default_value_t = 50)]
    pub max_heap_mb: usize,
    /// Corpus directory (default: tests/fuzz/corpus/policy).
    #[arg(long)]
    pub corpus: Option<PathBuf>,
}

/// Counts live heap bytes and their peak, so each input's peak can be checked.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract is passed on unchanged.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

pub fn run(o: Opts) -> Result<()> {
    let dir = o.corpus.clone().unwrap_or_else(fuzz::corpus_dir);
    let corpus = fuzz::load_corpus(&dir)?;
    if corpus.is_empty() {
        bail!("no corpus files in {}", dir.display());
    }
    let seed = o.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    println!(
        "fuzz policy: seed {seed}, {} corpus files, up to {} inputs or {} s",
        corpus.len(),
        o.iterations,
        o.seconds
    );
    let start = Instant::now();
    let deadline = start + Duration::from_secs(o.seconds);
    let max_heap = o.max_heap_mb << 20;
    let mut worst_heap = 0usize;
    let mut base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let mut observe = |s: &fuzz::Sample| -> Result<(), String> {
        let peak = PEAK.load(Ordering::Relaxed).saturating_sub(base);
        worst_heap = worst_heap.max(peak);
        base = LIVE.load(Ordering::Relaxed);
        PEAK.store(base, Ordering::Relaxed);
        if peak > max_heap {
            return Err(format!(
                "peak heap {} MB for a {}-byte input",
                peak >> 20,
                s.input.len()
            ));
        }
        Ok(())
    };
    match fuzz::run(&corpus, seed, o.iterations, Some(deadline), &mut observe) {
        Ok(r) => {
            println!(
                "{} inputs in {:.1} s ({} valid), slowest {:?}, longest {} bytes, peak heap per input {:.1} MB: no failure",
                r.iterations,
                start.elapsed().as_secs_f64(),
                r.valid,
                r.slowest,
                r.longest_input,
                worst_heap as f64 / (1 << 20) as f64
            );
            Ok(())
        }
        Err(f) => {
            let out = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../target/fuzz-policy-failure.yaml");
            std::fs::write(&out, &f.input)?;
            bail!(
                "input {} (seed {seed}) failed: {}; written to {}",
                f.iteration,
                f.why,
                out.display()
            )
        }
    }
}
