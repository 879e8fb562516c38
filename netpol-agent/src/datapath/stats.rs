//! The datapath's counters and fill levels, read from the pinned maps for the metrics
//! (`run --metrics`). Opened from the pins by path, apart from [`super::kernel::KernelDatapath`],
//! so that a scrape never holds the agent: the reads run on a blocking thread while the agent
//! goes on reconciling. Read only: nothing here writes a map.

use std::{
    collections::BTreeMap,
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
};

use aya::maps::{HashMap, Map, MapData, PerCpuArray, PerCpuHashMap};
use netpol_common::{
    ct::{CtEntry, CtKey4, CtKey6},
    epdrop::EpDropKey,
    maps,
    stats::{EventStats, RuleStats, RuleStatsKey},
    DropReason,
};

use super::{CtProbe, CtProbeKey, CtSeen, DatapathError, RuleCounters};

/// Maps whose fill level is reported: everything the agent or the programs add entries to.
pub const FILL_MAPS: &[&str] = &[
    maps::ENDPOINTS,
    maps::IPCACHE4,
    maps::IPCACHE6,
    maps::POLICY,
    maps::CT4,
    maps::CT6,
    maps::CT4_NEW,
    maps::CT6_NEW,
    maps::FRAG4,
    maps::FRAG6,
    maps::SNAT6,
    maps::EP_DROPS,
    maps::RULE_STATS,
];

/// One map's fill level.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fill {
    pub map: &'static str,
    pub entries: u64,
    pub max_entries: u64,
}

/// What one read of the pinned maps found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelStats {
    /// `DROPS`, summed over CPUs, by reason number (every reason, zeros included).
    pub drops: BTreeMap<u8, u64>,
    /// `AUDITS` (audit mode's would-be drops), summed over CPUs, by reason number.
    pub audits: BTreeMap<u8, u64>,
    /// `EP_DROPS`, summed over CPUs.
    pub ep_drops: BTreeMap<EpDropKey, u64>,
    /// `RULE_STATS`, summed over CPUs.
    pub rules: RuleCounters,
    /// `EVENT_STATS`, summed over CPUs (`tat_ns`: the latest).
    pub events: EventStats,
    /// Maps of [`FILL_MAPS`] that are pinned (the masquerade's only exist while it runs).
    pub fill: Vec<Fill>,
}

fn map_err(map: &'static str) -> impl Fn(aya::maps::MapError) -> DatapathError {
    move |source| DatapathError::Map { map, source }
}

/// Reads the pinned maps under one pin directory.
pub struct PinnedStats {
    pin_dir: PathBuf,
}

impl PinnedStats {
    pub fn new(pin_dir: impl AsRef<Path>) -> Self {
        Self {
            pin_dir: pin_dir.as_ref().to_path_buf(),
        }
    }

    fn open(&self, name: &'static str) -> Result<MapData, DatapathError> {
        MapData::from_pin(self.pin_dir.join(name)).map_err(map_err(name))
    }

    /// Reads every counter and fill level. Blocking (one system call per map entry for the fill
    /// levels): run it off the async threads.
    pub fn read(&self) -> Result<KernelStats, DatapathError> {
        let mut out = KernelStats::default();
        let drops = Map::from_map_data(self.open(maps::DROPS)?).map_err(map_err(maps::DROPS))?;
        let drops: PerCpuArray<_, u64> =
            PerCpuArray::try_from(drops).map_err(map_err(maps::DROPS))?;
        for r in DropReason::ALL {
            let v = drops.get(&(r as u32), 0).map_err(map_err(maps::DROPS))?;
            out.drops.insert(r as u8, v.iter().sum());
        }
        let audits = Map::from_map_data(self.open(maps::AUDITS)?).map_err(map_err(maps::AUDITS))?;
        let audits: PerCpuArray<_, u64> =
            PerCpuArray::try_from(audits).map_err(map_err(maps::AUDITS))?;
        for r in [DropReason::PolicyDenied, DropReason::PolicyDeny] {
            let v = audits.get(&(r as u32), 0).map_err(map_err(maps::AUDITS))?;
            out.audits.insert(r as u8, v.iter().sum());
        }
        let rules =
            Map::from_map_data(self.open(maps::RULE_STATS)?).map_err(map_err(maps::RULE_STATS))?;
        let rules: PerCpuHashMap<_, RuleStatsKey, RuleStats> =
            PerCpuHashMap::try_from(rules).map_err(map_err(maps::RULE_STATS))?;
        for item in rules.iter() {
            match item {
                Ok((k, per_cpu)) => {
                    let sum = out.rules.entry(k).or_default();
                    for v in per_cpu.iter() {
                        sum.allowed += v.allowed;
                        sum.denied += v.denied;
                        sum.audited += v.audited;
                    }
                }
                // Evicted (LRU) between listing and reading it.
                Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(maps::RULE_STATS)(e)),
            }
        }
        let events = Map::from_map_data(self.open(maps::EVENT_STATS)?)
            .map_err(map_err(maps::EVENT_STATS))?;
        let events: PerCpuArray<_, EventStats> =
            PerCpuArray::try_from(events).map_err(map_err(maps::EVENT_STATS))?;
        for v in events
            .get(&0, 0)
            .map_err(map_err(maps::EVENT_STATS))?
            .iter()
        {
            let e = &mut out.events;
            e.tat_ns = e.tat_ns.max(v.tat_ns);
            e.suppressed_drops += v.suppressed_drops;
            e.suppressed_flows += v.suppressed_flows;
            e.suppressed_audits += v.suppressed_audits;
            e.ring_full += v.ring_full;
        }
        let ep = Map::from_map_data(self.open(maps::EP_DROPS)?).map_err(map_err(maps::EP_DROPS))?;
        let ep: PerCpuHashMap<_, EpDropKey, u64> =
            PerCpuHashMap::try_from(ep).map_err(map_err(maps::EP_DROPS))?;
        for item in ep.iter() {
            match item {
                Ok((k, v)) => {
                    out.ep_drops.insert(k, v.iter().sum());
                }
                // A key removed between listing and reading it: its endpoint went.
                Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(maps::EP_DROPS)(e)),
            }
        }
        for name in FILL_MAPS {
            let path = self.pin_dir.join(name);
            if !path.exists() {
                continue;
            }
            let map = MapData::from_pin(&path).map_err(map_err(name))?;
            let info = map.info().map_err(map_err(name))?;
            let max_entries = u64::from(info.max_entries());
            let entries = count_keys(map.fd().as_fd(), info.key_size() as usize, max_entries)
                .map_err(DatapathError::Io)?;
            out.fill.push(Fill {
                map: name,
                entries,
                max_entries,
            });
        }
        Ok(out)
    }
}

/// `bpf_attr` for `BPF_MAP_GET_NEXT_KEY`.
#[repr(C)]
struct NextKeyAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    next_key: u64,
    flags: u64,
}

const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;

/// Counts a map's keys with `BPF_MAP_GET_NEXT_KEY`, whatever their type (hash, LRU, LPM trie),
/// at most `max` (a key deleted under the walk restarts it from the first key, so a map that
/// changes meanwhile gives an approximate count, never more than its size).
fn count_keys(fd: std::os::fd::BorrowedFd<'_>, key_size: usize, max: u64) -> std::io::Result<u64> {
    let mut cur = vec![0u8; key_size.max(1)];
    let mut next = vec![0u8; key_size.max(1)];
    let mut n: u64 = 0;
    let mut first = true;
    while n < max {
        let attr = NextKeyAttr {
            map_fd: fd.as_raw_fd() as u32,
            _pad: 0,
            key: if first { 0 } else { cur.as_ptr() as u64 },
            next_key: next.as_mut_ptr() as u64,
            flags: 0,
        };
        // SAFETY: `attr` is a valid bpf_attr prefix for this command; both key buffers are
        // `key_size` bytes and live across the call.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_GET_NEXT_KEY,
                &attr as *const NextKeyAttr,
                size_of::<NextKeyAttr>() as libc::c_uint,
            )
        };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENOENT) {
                return Ok(n);
            }
            return Err(e);
        }
        n += 1;
        first = false;
        std::mem::swap(&mut cur, &mut next);
    }
    Ok(n)
}
/// Looks up single conntrack entries in the pinned `CT*` maps (for `policy suggest`: whether a
/// reported flow was answered), apart from [`super::kernel::KernelDatapath`] like
/// [`PinnedStats`], so that the checks never hold the agent. Read only.
pub struct PinnedCt {
    pin_dir: PathBuf,
}

impl PinnedCt {
    pub fn new(pin_dir: impl AsRef<Path>) -> Self {
        Self {
            pin_dir: pin_dir.as_ref().to_path_buf(),
        }
    }

    /// Opens the maps once for a batch of lookups. Blocking: run it off the async threads.
    pub fn lookup_all(&self, probes: &[CtProbe]) -> Result<Vec<CtSeen>, DatapathError> {
        let open = |name: &'static str| -> Result<Map, DatapathError> {
            let data = MapData::from_pin(self.pin_dir.join(name)).map_err(map_err(name))?;
            Map::from_map_data(data).map_err(map_err(name))
        };
        let v4 = |name: &'static str| -> Result<HashMap<MapData, CtKey4, CtEntry>, DatapathError> {
            HashMap::try_from(open(name)?).map_err(map_err(name))
        };
        let v6 = |name: &'static str| -> Result<HashMap<MapData, CtKey6, CtEntry>, DatapathError> {
            HashMap::try_from(open(name)?).map_err(map_err(name))
        };
        let any4 = probes.iter().any(|p| matches!(p.key, CtProbeKey::V4(_)));
        let any6 = probes.iter().any(|p| matches!(p.key, CtProbeKey::V6(_)));
        let t4 = if any4 {
            Some((v4(maps::CT4_NEW)?, v4(maps::CT4)?))
        } else {
            None
        };
        let t6 = if any6 {
            Some((v6(maps::CT6_NEW)?, v6(maps::CT6)?))
        } else {
            None
        };
        let found = |r: Result<CtEntry, aya::maps::MapError>, name: &'static str| match r {
            Ok(e) => Ok(Some(e)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(name)(e)),
        };
        // An entry the datapath no longer uses is absent here too: expired, or killed in place
        // by a SYN that reopened its tuple (`CtEntry::kill`: expiry 0; it stays in the
        // established table until the new flow's promotion writes itself over it). Read as
        // present, an old flow's entry would answer for a new flow nobody answered. (The
        // datapath's clock is CLOCK_MONOTONIC_COARSE, up to a tick behind this one: an entry
        // may look expired here up to a tick early, never late.)
        let now = super::masq6::monotonic_ns();
        let mut out = Vec::with_capacity(probes.len());
        for p in probes {
            // The new table first: a promotion writes the established entry before it deletes
            // the new one, so a flow being promoted is never missed between the two lookups.
            let (new, est) = match (&p.key, &t4, &t6) {
                (CtProbeKey::V4(k), Some((n, e)), _) => (
                    found(n.get(k, 0), maps::CT4_NEW)?,
                    found(e.get(k, 0), maps::CT4)?,
                ),
                (CtProbeKey::V6(k), _, Some((n, e))) => (
                    found(n.get(k, 0), maps::CT6_NEW)?,
                    found(e.get(k, 0), maps::CT6)?,
                ),
                _ => (None, None),
            };
            let mine = |e: &CtEntry| e.ifindex == p.ifindex && e.expires_ns >= now;
            out.push(match (new.filter(mine), est.filter(mine)) {
                (_, Some(e)) => CtSeen::Established(e),
                (Some(e), None) => CtSeen::New(e),
                (None, None) => CtSeen::Missing,
            });
        }
        Ok(out)
    }
}
