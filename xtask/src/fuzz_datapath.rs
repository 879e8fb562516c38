//! `cargo xtask fuzz datapath`: the differential test of the per-container programs against the
//! reference model (`netpol_tests::diff`) on random seeds for a while. Every disagreement is
//! printed as a reproducible case; `--seed S --seconds 0` runs exactly case S again.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::Args;
use netpol_tests::diff::{Checks, Features, Runner, Stats};

#[derive(Args)]
pub struct Opts {
    /// How long to run (at least one case runs).
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// The first case's seed (decimal or 0x-hex); the following cases take the next seeds.
    /// Default: from the clock (printed).
    #[arg(long, value_parser = parse_seed)]
    seed: Option<u64>,
    /// Stop after this many disagreements.
    #[arg(long, default_value_t = 5)]
    max_disagreements: usize,
    /// Also check the properties of holes whose fixes have not landed yet (netpol_tests::diff::
    /// Checks::ALL instead of Checks::NOW).
    #[arg(long)]
    all_checks: bool,
}

fn parse_seed(s: &str) -> Result<u64, String> {
    match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16),
        None => s.parse(),
    }
    .map_err(|e| format!("{s}: {e}"))
}

pub fn run(o: Opts) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("fuzz datapath loads BPF programs and makes a network namespace: run it as root");
    }
    let first = o.seed.unwrap_or_else(|| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        // Far from the fixed set (0..) of tests/tests/datapath_diff.rs.
        (t.as_nanos() as u64) ^ (u64::from(std::process::id()) << 40)
    });
    eprintln!("fuzz datapath: first seed {first:#x}, {} s", o.seconds);
    let mut runner = Runner::new(Features::ALL);
    if o.all_checks {
        runner.checks = Checks::ALL;
    }
    let mut stats = Stats::default();
    let deadline = Instant::now() + Duration::from_secs(o.seconds);
    let mut found = 0;
    let mut seed = first;
    loop {
        if let Err(d) = runner.run_seed(seed, &mut stats) {
            println!("{d}");
            if o.all_checks {
                println!("  (found with --all-checks: add it to reproduce)\n");
            }
            found += 1;
            if found >= o.max_disagreements {
                break;
            }
        }
        seed = seed.wrapping_add(1);
        if Instant::now() >= deadline {
            break;
        }
    }
    println!(
        "fuzz datapath: {} cases (seeds {first:#x}..={:#x}), {}; {found} disagreements",
        stats.cases,
        seed.wrapping_sub(1).max(first),
        stats.summary(),
    );
    if found > 0 {
        bail!("{found} disagreements between the datapath and its model");
    }
    Ok(())
}
