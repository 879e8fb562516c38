//! Loads the datapath into a namespace that plays the host, configures it from a plan file, attaches
//! the programs and exits: the programs must keep enforcing without this process (pinned maps and
//! links). Run again on the same pin directory, it adopts what is pinned.
//!
//! `netpol-netns-loader <pin_dir> <host_netns> <plan_file>`; prints `adopted=<true|false>` and
//! the number of entries written.

use std::process::ExitCode;

use anyhow::{bail, Context};
use netpol_agent::datapath::{
    kernel::{AttachMode, KernelDatapath},
    Cidr, Datapath, MapSizes, PolicyEntryKey,
};
use netpol_common::{
    endpoint::Endpoint,
    identity,
    ipcache::RemoteInfo,
    policy::{PolicyKey, PolicyValue},
    Direction,
};
use netpol_tests::netns::{DatapathPlan, Netns, PlanPolicy};

fn key(p: &PlanPolicy) -> PolicyEntryKey {
    let dir = if p.egress {
        Direction::Egress
    } else {
        Direction::Ingress
    };
    PolicyEntryKey {
        key: PolicyKey::new(p.local, p.remote, dir, p.proto, p.port),
        prefix_len: p.prefix_len,
    }
}

fn run() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, pin_dir, netns, plan_file] = &args[..] else {
        bail!("usage: netpol-netns-loader <pin_dir> <host_netns> <plan_file>");
    };
    let text =
        std::fs::read_to_string(plan_file).with_context(|| format!("reading {plan_file}"))?;
    let plan = DatapathPlan::parse(&text).map_err(anyhow::Error::msg)?;
    let _in_host = Netns {
        name: netns.clone(),
    }
    .enter();
    let mut sizes = MapSizes::default();
    sizes.policy = sizes.policy.max(plan.policy.len() as u32 + 64);
    if let Some(n) = plan.ct_entries {
        sizes.ct4 = n;
        sizes.ct6 = n;
        sizes.ct4_new = (n / 4).max(1024);
        sizes.ct6_new = (n / 4).max(1024);
    }
    let mode = match plan.attach_mode.as_deref() {
        None => None,
        Some("tcx") => Some(AttachMode::Tcx),
        Some("netlink") => Some(AttachMode::Netlink),
        Some(other) => bail!("unknown attach mode {other}"),
    };
    let mut dp = KernelDatapath::open_with(pin_dir, sizes, mode).context("opening the datapath")?;
    for e in &plan.endpoints {
        let mut ep = Endpoint::new(e.identity).enforce(e.ingress, e.egress);
        if let Some(a) = e.ipv4 {
            ep = ep.with_ipv4(a.octets());
        }
        if let Some(a) = e.ipv6 {
            ep = ep.with_ipv6(a.octets());
        }
        dp.upsert_endpoint(e.ifindex, ep)?;
    }
    for (addr, len, id) in &plan.ipcache {
        let full = *len == if addr.is_ipv4() { 32 } else { 128 };
        let info = match plan.ifaces.iter().find(|(a, _, _)| a == addr) {
            // A host address, as the agent writes it.
            _ if full && *id == identity::HOST => RemoteInfo::host(),
            Some((_, veth, bridge)) if full => RemoteInfo::container(*id, *veth, *bridge),
            _ => RemoteInfo::new(*id),
        };
        dp.upsert_ipcache(Cidr::new(*addr, *len)?, info)?;
    }
    // Allow entries go in before stale ones go out: an allowed flow never sees a gap.
    let wanted: std::collections::BTreeSet<PolicyEntryKey> = plan.policy.iter().map(key).collect();
    // The entries as the agent writes them: its compiler's FINAL flags, over everything the map
    // will hold (what is there already, unless the plan replaces it), so an allow is flagged
    // only where no wildcard deny of the map overlaps it; entries whose flag changes are written
    // again.
    let current = dp.current()?.policy;
    let mut all = if plan.replace_policy {
        Default::default()
    } else {
        current.clone()
    };
    for p in &plan.policy {
        let v = if p.deny {
            PolicyValue::deny(p.rule)
        } else {
            PolicyValue::allow(p.rule)
        };
        all.insert(key(p), v);
    }
    netpol_agent::policy::compile::mark_final(&mut all);
    for (k, v) in &all {
        if current.get(k) != Some(v) {
            dp.upsert_policy(*k, *v)?;
        }
    }
    let mut removed = 0;
    if plan.replace_policy {
        for k in dp.current()?.policy.keys() {
            if !wanted.contains(k) {
                dp.delete_policy(*k)?;
                removed += 1;
            }
        }
    }
    for i in &plan.attach {
        dp.attach(*i)?;
    }
    for i in &plan.detach {
        dp.detach(*i)?;
    }
    println!(
        "adopted={} mode={:?} endpoints={} ipcache={} policy={} removed={} attached={} ct4_max={} ct6_new_max={}",
        dp.adopted(),
        dp.mode(),
        plan.endpoints.len(),
        plan.ipcache.len(),
        plan.policy.len(),
        removed,
        plan.attach.len(),
        dp.sizes().ct4,
        dp.sizes().ct6_new
    );
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("netpol-netns-loader: {e:#}");
            ExitCode::FAILURE
        }
    }
}
