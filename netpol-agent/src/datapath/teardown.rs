//! Undoing everything the datapath put into the kernel: the programs on containers' veths and on
//! the uplink (TCX links, clsact filters) and every pin under the pin directory. What is left is a
//! host as without netpol (a clsact qdisc, when the netlink fallback made one, stays: it is
//! empty and harmless).
//!
//! TCX links are pinned and held by nothing else once the agent is gone, so removing a pin
//! destroys its link; that is checked afterwards by link id, so a link some process still holds
//! (an agent that is still running) is reported instead of passing for detached. Every failure
//! is collected; nothing stops at the first (netavark's teardown).
//!
//! Acts in the network namespace of the calling thread.

use std::{
    collections::BTreeSet,
    fs,
    path::Path,
    time::{Duration, Instant},
};

use aya::programs::links::{FdLink, PinnedLink};

use super::{kernel::KernelDatapath, masq6};

/// What [`teardown`] did, and what it could not do.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Teardown {
    /// Pinned TCX links removed (containers' veths and the uplink).
    pub tcx_links: usize,
    /// clsact filters deleted.
    pub tc_filters: usize,
    /// Interfaces (by index) that had programs of netpol.
    pub interfaces: BTreeSet<u32>,
    /// Whether there was anything under the pin directory.
    pub found: bool,
    pub errors: Vec<String>,
}

/// One record of an attachment under the pin directory.
struct Record {
    ifindex: u32,
    clsact: bool,
    path: std::path::PathBuf,
}

/// `links/<ifindex>_{from,to}[_tc]` and `masq6_{out,in}_<ifindex>[_tc]`.
fn records(pin_dir: &Path) -> Vec<Record> {
    let mut out = Vec::new();
    let mut scan = |dir: &Path, parse: &dyn Fn(&str) -> Option<u32>| {
        let Ok(rd) = fs::read_dir(dir) else { return };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let (base, clsact) = match name.strip_suffix("_tc") {
                Some(b) => (b.to_owned(), true),
                None => (name.clone(), false),
            };
            if let Some(ifindex) = parse(&base) {
                out.push(Record {
                    ifindex,
                    clsact,
                    path: e.path(),
                });
            }
        }
    };
    scan(&pin_dir.join("links"), &|b| {
        let (idx, side) = b.split_once('_')?;
        matches!(side, "from" | "to").then_some(())?;
        idx.parse().ok()
    });
    scan(pin_dir, &|b| {
        [
            netpol_common::programs::MASQ6_OUT,
            netpol_common::programs::MASQ6_IN,
        ]
        .iter()
        .find_map(|p| b.strip_prefix(p)?.strip_prefix('_')?.parse().ok())
    });
    out
}

fn link_id(path: &Path) -> Result<u32, String> {
    let pinned = PinnedLink::from_pin(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let fd = FdLink::from(pinned);
    fd.info()
        .map(|i| i.id())
        .map_err(|e| format!("{}: {e}", path.display()))
}

fn live_links() -> BTreeSet<u32> {
    aya::programs::loaded_links()
        .filter_map(Result::ok)
        .map(|i| i.id())
        .collect()
}

/// Detaches every program recorded under `pin_dir` and removes every pin there (the masquerade's
/// first: the datapath's removal takes whatever is left in the directory).
pub fn teardown(pin_dir: &Path) -> Teardown {
    let mut t = Teardown {
        found: pin_dir.exists(),
        ..Teardown::default()
    };
    if !t.found {
        return t;
    }
    let records = records(pin_dir);
    let mut ids = Vec::new();
    for r in &records {
        t.interfaces.insert(r.ifindex);
        if r.clsact {
            t.tc_filters += 1;
        } else {
            t.tcx_links += 1;
            match link_id(&r.path) {
                Ok(id) => ids.push((id, r.ifindex)),
                Err(e) => t.errors.push(format!("reading link {e}")),
            }
        }
    }
    if let Err(e) = masq6::remove_pins(pin_dir) {
        t.errors.push(format!("masquerade: {e}"));
    }
    if let Err(e) = KernelDatapath::remove_pins(pin_dir) {
        t.errors.push(e.to_string());
    }
    // A link is freed when its last reference goes; another holder keeps it (and its program)
    // attached. The kernel frees it right after the unlink, but not necessarily before we look.
    let deadline = Instant::now() + Duration::from_secs(2);
    let held = loop {
        let live = live_links();
        let held: Vec<(u32, u32)> = ids
            .iter()
            .copied()
            .filter(|(id, _)| live.contains(id))
            .collect();
        if held.is_empty() || Instant::now() >= deadline {
            break held;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    for (id, ifindex) in held {
        t.errors.push(format!(
            "TCX link {id} on ifindex {ifindex} is still attached: a process holds it (an agent \
             that is still running?)"
        ));
    }
    t
}
