//! Tier 2: the differential test of issue 8. A fixed set of random cases (endpoints, ipcache,
//! policy, conntrack left from before, and packet sequences with replies, ICMP errors, broken
//! headers, forged sources, extension headers and fragments) runs through the real programs
//! (`BPF_PROG_TEST_RUN`) and through the reference model in `netpol_common::model`; every
//! verdict, drop cause and the conntrack maps must agree. `cargo xtask fuzz datapath` runs more.

use std::time::Instant;

use netpol_tests::{
    diff::{Features, Runner, Stats},
    require_root,
};

/// The fixed seed set: seeds `0..CASES`.
const CASES: u64 = 600;

#[test]
fn datapath_agrees_with_the_model() {
    if !require_root("datapath_agrees_with_the_model") {
        return;
    }
    let t = Instant::now();
    let mut runner = Runner::new(Features::ALL);
    let mut stats = Stats::default();
    let mut failures = Vec::new();
    for seed in 0..CASES {
        if let Err(d) = runner.run_seed(seed, &mut stats) {
            failures.push(d.to_string());
        }
    }
    eprintln!(
        "{} cases, {} in {:.1} s; {} disagreements",
        stats.cases,
        stats.summary(),
        t.elapsed().as_secs_f64(),
        failures.len()
    );
    for f in failures.iter().take(3) {
        eprintln!("{f}");
    }
    assert!(failures.is_empty(), "{} cases disagree", failures.len());
}
