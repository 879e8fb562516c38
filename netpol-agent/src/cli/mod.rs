//! The command line: `netpol-agent run` (the daemon) and the client subcommands, one file each.

pub mod config;
pub mod endpoint;
pub mod export;
pub mod identity;
pub mod matrix;
pub mod monitor;
pub mod policy;
pub mod status;
pub mod suggest;
pub mod table;
pub mod teardown;
pub mod trace;

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use crate::daemon::{self, api::DEFAULT_SOCKET};

#[derive(Parser, Debug)]
#[command(
    name = "netpol-agent",
    version,
    about = "Per-container network policy for Docker hosts, in eBPF"
)]
pub struct Cli {
    /// The agent's control socket.
    #[arg(long, global = true, default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// The agent's settings file, read by `run` and `teardown` (see `packaging/agent.conf`).
    #[arg(long, global = true, env = "NETPOL_CONFIG", default_value = config::DEFAULT_CONFIG)]
    pub config: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Output {
    #[default]
    Table,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the agent (the daemon).
    Run(Box<daemon::RunArgs>),
    /// Import, show, delete and validate policies.
    #[command(subcommand)]
    Policy(policy::PolicyCmd),
    /// Containers and their enforcement.
    #[command(subcommand)]
    Endpoint(endpoint::EndpointCmd),
    /// Security identities.
    #[command(subcommand)]
    Identity(identity::IdentityCmd),
    /// Live drops and flows, labelled with container names.
    Monitor(monitor::MonitorArgs),
    /// Agent, Docker, datapath and masquerade status.
    Status {
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Stop enforcing: detach every program netpol attached and remove its pins.
    Teardown(teardown::TeardownArgs),
}

/// Runs a parsed command line; returns the process exit code.
pub fn main(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Run(args) => daemon::run(*args, cli.socket).map(|()| 0),
        Command::Policy(cmd) => policy::run(cmd, &cli.socket),
        Command::Endpoint(cmd) => endpoint::run(cmd, &cli.socket),
        Command::Identity(cmd) => identity::run(cmd, &cli.socket),
        Command::Monitor(args) => monitor::run(args, &cli.socket),
        Command::Status { output } => status::run(output, &cli.socket),
        Command::Teardown(args) => teardown::run(args, &cli.socket),
    }
}

/// Prints JSON data as pretty JSON on stdout.
pub fn print_json(v: &serde_json::Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}
