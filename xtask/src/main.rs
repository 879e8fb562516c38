//! Build, test and benchmark helpers: `cargo xtask <command>`.

mod bench_agent;
mod bench_datapath;
mod bench_flood;
mod bench_masq6;
mod dist;
mod fuzz_datapath;
mod fuzz_policy;
mod process;
mod stats;

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "netpol build, test and benchmark helpers")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what building and testing need (scripts/setup.sh).
    Setup {
        /// Only the build dependencies.
        #[arg(long)]
        build: bool,
    },
    /// Run every test tier; ends with "N passed, N failed" (scripts/test.sh, the README command).
    Test {
        /// Only tests whose names contain this.
        filter: Option<String>,
    },
    /// Release artifacts: the .deb (cargo-deb, lintian-checked) and the sidecar image archive.
    Dist(dist::Opts),
    /// Fuzzers, run longer than the test suite runs them (datapath needs root).
    Fuzz {
        #[command(subcommand)]
        which: Fuzz,
    },
    /// Benchmarks (need root; not tests).
    Bench {
        #[command(subcommand)]
        which: Bench,
    },
}

#[derive(Subcommand)]
enum Fuzz {
    /// The per-container programs against the reference model (netpol-common's `model`).
    Datapath(fuzz_datapath::Opts),
    /// The policy parser and compiler (mutated YAML from tests/fuzz/corpus/policy).
    Policy(fuzz_policy::Opts),
}

#[derive(Subcommand)]
enum Bench {
    /// Per-container programs vs no filter, an iptables FORWARD chain and an nftables set.
    Datapath(bench_datapath::Opts),
    /// Flood isolation: a SYN and a UDP flood at a deny-all container, the other pair measured.
    Flood(bench_flood::Opts),
    /// IPv6 masquerade: netpol vs ip6tables MASQUERADE vs plain routing.
    Masq6(bench_masq6::Opts),
    /// The agent: reaction time, memory.
    Agent(bench_agent::Opts),
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Setup { build } => script("setup.sh", build.then_some("--build")),
        Cmd::Test { filter } => script("test.sh", filter.as_deref()),
        Cmd::Dist(o) => dist::run_dist(o),
        Cmd::Fuzz { which } => match which {
            Fuzz::Datapath(o) => fuzz_datapath::run(o),
            Fuzz::Policy(o) => fuzz_policy::run(o),
        },
        Cmd::Bench { which } => match which {
            Bench::Datapath(o) => bench_datapath::run(o),
            Bench::Flood(o) => bench_flood::run(o),
            Bench::Masq6(o) => bench_masq6::run(o),
            Bench::Agent(o) => bench_agent::run(o),
        },
    }
}

/// The workspace's root directory.
fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask is inside the workspace")
        .to_path_buf()
}

/// Runs `scripts/NAME [ARG]` and exits with its status when it fails.
fn script(name: &str, arg: Option<&str>) -> Result<()> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../scripts")
        .join(name);
    let status = Command::new(&path)
        .args(arg)
        .status()
        .with_context(|| format!("run {}", path.display()))?;
    if !status.success() {
        std::process::exit(status.code().unwrap_or(1));
    }
    Ok(())
}
