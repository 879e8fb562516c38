//! Loads netpol's IPv6 masquerade into a namespace playing the host, for the benchmark
//! (`cargo xtask bench masq6`): enters `<host_netns>`, loads the programs with their maps pinned
//! under `<pin_dir>`, attaches them to `<uplink>` (pinned TCX links), sets `<addr>` as the
//! translated source and masquerades `<prefix>`; then exits, leaving the pinned programs working.
//!
//! `netpol-masq6-loader <pin_dir> <host_netns> <uplink> <addr> <prefix>`

use std::{net::Ipv6Addr, os::fd::AsRawFd, path::PathBuf};

use anyhow::{bail, Context, Result};
use netpol_agent::datapath::{
    masq6::{self, Masq6, Masq6Options, Masq6Settings, PrefixKind},
    Cidr,
};

fn main() {
    if let Err(e) = run() {
        eprintln!("netpol-masq6-loader: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [pin_dir, netns, uplink, addr, prefix] = args.as_slice() else {
        bail!("usage: netpol-masq6-loader <pin_dir> <host_netns> <uplink> <addr> <prefix>");
    };
    let ns = std::fs::File::open(format!("/run/netns/{netns}"))
        .with_context(|| format!("opening netns {netns}"))?;
    // SAFETY: a valid namespace fd; this process is single-threaded here.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns {netns}: {}", std::io::Error::last_os_error());
    }
    let addr: Ipv6Addr = addr.parse().context("uplink address")?;
    let prefix: Cidr = prefix.parse().context("prefix")?;
    let opts = Masq6Options {
        pin_dir: PathBuf::from(pin_dir),
        ..Masq6Options::default()
    };
    let mut m = Masq6::load(&opts)?;
    let mode = m.attach(uplink)?;
    let l2_len = masq6::l2_len(uplink)?;
    let uplink = masq6::Uplink {
        name: uplink.clone(),
        ifindex: masq6::ifindex(uplink)?,
        addr: Some(addr),
        l2_len,
    };
    m.configure(&Masq6Settings::new(&uplink, addr))?;
    m.add_prefix(prefix, PrefixKind::Masquerade)?;
    println!("attached={mode:?}");
    Ok(())
}
