//! `netpol-agent teardown [--state]`: stop enforcing. Detaches every program netpol attached (on
//! containers' veths and the uplink's masquerade), removes its pins, and with `--state` its state
//! directory. Afterwards every container is reachable as without netpol.
//!
//! Stopping the agent is not this: its pinned programs keep enforcing without it, by design.
//! Nor may an agent run meanwhile (it would attach everything again): when the control socket
//! answers, teardown refuses, unless `--force`.

use std::{
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
};

use clap::Args;

use crate::{datapath::teardown::teardown, store::Store};

#[derive(Args, Debug, Clone)]
pub struct TeardownArgs {
    /// The pin directory of the agent (`run --pin-dir`).
    #[arg(long, default_value = netpol_common::PIN_DIR)]
    pub pin_dir: PathBuf,
    /// Also remove the state directory (identities, imported policies).
    #[arg(long)]
    pub state: bool,
    /// The state directory (`run --state-dir`), removed with `--state`.
    #[arg(long, default_value = Store::DEFAULT_DIR)]
    pub state_dir: PathBuf,
    /// Go on although an agent answers on the control socket (it will attach again).
    #[arg(long)]
    pub force: bool,
}

/// Whether an agent answers on `socket`.
fn agent_running(socket: &Path) -> bool {
    UnixStream::connect(socket).is_ok()
}

pub fn run(args: TeardownArgs, socket: &Path) -> anyhow::Result<i32> {
    if agent_running(socket) {
        if !args.force {
            eprintln!(
                "error: an agent is running (it answers on {}): it would attach its programs \
                 again. Stop it first (systemctl stop netpol-agent, or docker stop netpol-agent \
                 for the sidecar), then run teardown again; --force goes on anyway.",
                socket.display()
            );
            return Ok(1);
        }
        eprintln!(
            "warning: an agent answers on {}: it will attach its programs again",
            socket.display()
        );
    }
    let t = teardown(&args.pin_dir);
    let mut errors = t.errors;
    if t.found {
        println!(
            "detached {} TCX link(s) and {} clsact filter(s) on {} interface(s); removed the pins \
             under {}",
            t.tcx_links,
            t.tc_filters,
            t.interfaces.len(),
            args.pin_dir.display()
        );
    } else {
        println!(
            "nothing pinned under {}: nothing to detach",
            args.pin_dir.display()
        );
    }
    if args.state {
        match std::fs::remove_dir_all(&args.state_dir) {
            Ok(()) => println!("removed the state directory {}", args.state_dir.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => errors.push(format!("{}: {e}", args.state_dir.display())),
        }
    }
    if errors.is_empty() {
        return Ok(0);
    }
    for e in &errors {
        eprintln!("error: {e}");
    }
    eprintln!(
        "teardown incomplete: {} error(s); what could not be removed may still enforce",
        errors.len()
    );
    Ok(1)
}
