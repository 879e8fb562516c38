//! Build, test and benchmark helpers: `cargo xtask <command>`.

mod bench_agent;
mod bench_datapath;
mod bench_masq6;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "netpol build, test and benchmark helpers")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Benchmarks (need root; not tests).
    Bench {
        #[command(subcommand)]
        which: Bench,
    },
}

#[derive(Subcommand)]
enum Bench {
    /// Per-container programs vs no filter vs an iptables FORWARD chain.
    Datapath(bench_datapath::Opts),
    /// IPv6 masquerade: netpol vs ip6tables MASQUERADE vs plain routing.
    Masq6(bench_masq6::Opts),
    /// The agent: reaction time, memory.
    Agent(bench_agent::Opts),
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Bench { which } => match which {
            Bench::Datapath(o) => bench_datapath::run(o),
            Bench::Masq6(o) => bench_masq6::run(o),
            Bench::Agent(o) => bench_agent::run(o),
        },
    }
}
