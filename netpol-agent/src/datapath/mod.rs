//! The kernel half, seen from the agent: typed map entries and the [`Datapath`] trait. The aya
//! implementation is [`kernel::KernelDatapath`]; [`fake::FakeDatapath`] stands in for it in tests.

pub mod fake;
pub mod kernel;
pub mod masq6;
pub mod stats;
pub mod teardown;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use netpol_common::{
    endpoint::Endpoint,
    ipcache::RemoteInfo,
    maps,
    policy::{PolicyKey, PolicyValue},
    stats::{EventStats, RuleStats, RuleStatsKey},
};

/// The object file built from netpol-ebpf.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/netpol"));

/// An address prefix, the key of the ipcache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix_len: u8,
}

impl Cidr {
    pub fn new(addr: IpAddr, prefix_len: u8) -> Result<Self, DatapathError> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix_len > max {
            return Err(DatapathError::InvalidPrefix(format!("{addr}/{prefix_len}")));
        }
        Ok(Self {
            addr: mask(addr, prefix_len),
            prefix_len,
        })
    }

    pub fn host(addr: IpAddr) -> Self {
        let prefix_len = if addr.is_ipv4() { 32 } else { 128 };
        Self { addr, prefix_len }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.addr.is_ipv4() && mask(ip, self.prefix_len) == self.addr
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

impl std::str::FromStr for Cidr {
    type Err = DatapathError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || DatapathError::InvalidPrefix(s.to_owned());
        let (a, l) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = a.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match l {
            Some(l) => l.parse::<u8>().map_err(|_| bad())?,
            None => max,
        };
        Cidr::new(addr, len)
    }
}

fn mask(addr: IpAddr, len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let m = if len == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(len))
            };
            IpAddr::V4(Ipv4Addr::from(u32::from(a) & m))
        }
        IpAddr::V6(a) => {
            let m = if len == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(len))
            };
            IpAddr::V6(Ipv6Addr::from(u128::from(a) & m))
        }
    }
}

/// One `POLICY` trie entry: the key and its prefix length (see `netpol_common::policy`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyEntryKey {
    pub key: PolicyKey,
    pub prefix_len: u32,
}

impl PolicyEntryKey {
    /// The first key of local identity `local`: keys order by local identity first, so the
    /// entries of one local identity are the range from this key to the next identity's.
    pub fn first_of(local: u32) -> Self {
        let mut key = PolicyKey::default();
        key.local = local;
        Self { key, prefix_len: 0 }
    }

    /// The entries of `m` whose local identity is `local`.
    pub fn entries_of<V>(
        m: &BTreeMap<PolicyEntryKey, V>,
        local: u32,
    ) -> std::collections::btree_map::Range<'_, PolicyEntryKey, V> {
        match local.checked_add(1) {
            Some(next) => m.range(Self::first_of(local)..Self::first_of(next)),
            None => m.range(Self::first_of(local)..),
        }
    }
}

/// Everything the agent writes into the maps; both the desired state (from reconcile) and the
/// current state (read back from the kernel) have this shape.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapState {
    pub endpoints: BTreeMap<u32, Endpoint>,
    /// Identity, and for a container's own address the interfaces its packets come through.
    pub ipcache: BTreeMap<Cidr, RemoteInfo>,
    pub policy: BTreeMap<PolicyEntryKey, PolicyValue>,
}

/// Configured map sizes (`max_entries`): one field per map whose capacity is a choice, each set
/// by a `run` flag (see `daemon::RunArgs`). Small by default: every map together, full, takes
/// well under 32 MB of kernel memory (fit for a 2 GB host). Maps of fixed size (`CONFIG`, the
/// per-CPU counters and scratch space, `MASQ6_CONFIG`, `MASQ6_PREFIX`) are not here.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct MapSizes {
    pub endpoints: u32,
    pub ipcache4: u32,
    pub ipcache6: u32,
    pub policy: u32,
    /// Established flows.
    pub ct4: u32,
    pub ct6: u32,
    /// Flows not established yet.
    pub ct4_new: u32,
    pub ct6_new: u32,
    /// Fragmented datagrams in flight.
    pub frag4: u32,
    pub frag6: u32,
    /// The ring buffer of drop and flow events, in bytes (a power of two, at least a page).
    pub events: u32,
    /// The masquerade's flows (two entries per flow).
    pub snat6: u32,
    /// The masquerade's fragmented datagrams in flight.
    pub masq6_frag: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        Self {
            endpoints: 1024,
            ipcache4: 4096,
            ipcache6: 4096,
            policy: 16384,
            ct4: 65536,
            ct6: 16384,
            ct4_new: 16384,
            ct6_new: 4096,
            frag4: 4096,
            frag6: 4096,
            events: 256 * 1024,
            snat6: 16384,
            masq6_frag: 4096,
        }
    }
}

/// The sized maps of the per-container programs.
pub const LXC_SIZED: [&str; 11] = [
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
    maps::EVENTS,
];

/// The sized maps of the masquerade.
pub const MASQ6_SIZED: [&str; 2] = [maps::SNAT6, netpol_common::nat::maps::MASQ6_FRAG];

/// A pinned map whose size is not the configured one (see [`MapSizes::adopt_pinned`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SizeMismatch {
    pub map: &'static str,
    pub configured: u32,
    pub pinned: u32,
}

impl MapSizes {
    /// Map name → size field: the one table every loader, check and message goes through.
    fn fields_mut(&mut self) -> [(&'static str, &mut u32); 13] {
        [
            (maps::ENDPOINTS, &mut self.endpoints),
            (maps::IPCACHE4, &mut self.ipcache4),
            (maps::IPCACHE6, &mut self.ipcache6),
            (maps::POLICY, &mut self.policy),
            (maps::CT4, &mut self.ct4),
            (maps::CT6, &mut self.ct6),
            (maps::CT4_NEW, &mut self.ct4_new),
            (maps::CT6_NEW, &mut self.ct6_new),
            (maps::FRAG4, &mut self.frag4),
            (maps::FRAG6, &mut self.frag6),
            (maps::EVENTS, &mut self.events),
            (maps::SNAT6, &mut self.snat6),
            (netpol_common::nat::maps::MASQ6_FRAG, &mut self.masq6_frag),
        ]
    }

    /// The configured `max_entries` of map `name` (`None`: not a sized map).
    pub fn get(&self, name: &str) -> Option<u32> {
        let mut s = *self;
        let found = s
            .fields_mut()
            .into_iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| *v);
        found
    }

    /// `(name, max_entries)` of each of `names` that is a sized map.
    pub fn of(&self, names: &[&'static str]) -> Vec<(&'static str, u32)> {
        names
            .iter()
            .filter_map(|n| self.get(n).map(|v| (*n, v)))
            .collect()
    }

    /// The sizes in force once maps already pinned are adopted: a pinned map keeps its size
    /// (`pinned(name)`), because it holds the entries that enforce right now and the kernel
    /// cannot resize a map; replacing it would need a copy that a full new map could not take
    /// and a moment in which programs and maps disagree. A new size takes effect when the map is
    /// created next (after a reboot, or once its pin is gone). Returns the sizes in force and
    /// the maps whose pinned size differs from the configured one.
    pub fn adopt_pinned(
        &self,
        names: &[&'static str],
        pinned: impl Fn(&str) -> Option<u32>,
    ) -> (MapSizes, Vec<SizeMismatch>) {
        let mut out = *self;
        let mut mismatches = Vec::new();
        for (name, size) in out.fields_mut() {
            if !names.contains(&name) {
                continue;
            }
            if let Some(p) = pinned(name) {
                if p != *size {
                    mismatches.push(SizeMismatch {
                        map: name,
                        configured: *size,
                        pinned: p,
                    });
                    *size = p;
                }
            }
        }
        (out, mismatches)
    }
}

/// One endpoint's conntrack entry of a flow, to look up: the endpoint's host veth and the key
/// as the datapath made it (`netpol_common::ct`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CtProbe {
    pub ifindex: u32,
    pub key: CtProbeKey,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CtProbeKey {
    V4(netpol_common::ct::CtKey4),
    V6(netpol_common::ct::CtKey6),
}

/// What conntrack holds for a [`CtProbe`]: nothing (never tracked, evicted, expired, or another
/// endpoint's entry), a live entry of the new table, or one of the established table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CtSeen {
    Missing,
    New(netpol_common::ct::CtEntry),
    Established(netpol_common::ct::CtEntry),
}

/// Drop counters summed over CPUs, by reason number.
pub type DropCounters = BTreeMap<u8, u64>;

/// `RULE_STATS` summed over CPUs: (rule, local identity, direction) → new flows allowed,
/// denied, audited.
pub type RuleCounters = BTreeMap<RuleStatsKey, RuleStats>;

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("invalid prefix {0}")]
    InvalidPrefix(String),
    #[error("map {map} is full ({max} entries): the change was not applied")]
    MapFull { map: &'static str, max: u32 },
    #[error("interface {0} not found")]
    NoSuchInterface(u32),
    #[error("bpffs: {0}")]
    Bpffs(String),
    #[error("loading the eBPF object: {0}")]
    Load(String),
    #[error("map {map}: {source}")]
    Map {
        map: &'static str,
        source: aya::maps::MapError,
    },
    #[error("attaching to ifindex {ifindex}: {message}")]
    Attach { ifindex: u32, message: String },
    #[error("pin {path}: {message}")]
    Pin { path: String, message: String },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// What the rest of the agent needs from the kernel half. Every method is a single map or link
/// operation; whole-or-nothing application is the caller's (reconcile's) job, which checks
/// [`Datapath::sizes`] before it starts writing.
pub trait Datapath: Send {
    fn sizes(&self) -> MapSizes;

    fn upsert_endpoint(&mut self, ifindex: u32, ep: Endpoint) -> Result<(), DatapathError>;
    fn delete_endpoint(&mut self, ifindex: u32) -> Result<(), DatapathError>;

    fn upsert_ipcache(&mut self, cidr: Cidr, info: RemoteInfo) -> Result<(), DatapathError>;
    fn delete_ipcache(&mut self, cidr: Cidr) -> Result<(), DatapathError>;

    fn upsert_policy(
        &mut self,
        key: PolicyEntryKey,
        value: PolicyValue,
    ) -> Result<(), DatapathError>;
    fn delete_policy(&mut self, key: PolicyEntryKey) -> Result<(), DatapathError>;

    /// Attaches both programs to the host-side veth `ifindex` (idempotent: an interface that is
    /// already attached keeps its links).
    fn attach(&mut self, ifindex: u32) -> Result<(), DatapathError>;
    /// Detaches both programs from `ifindex` and removes its pinned links. A vanished interface is
    /// not an error (its links went with it).
    fn detach(&mut self, ifindex: u32) -> Result<(), DatapathError>;
    /// Interfaces with pinned links.
    fn attached(&self) -> Result<Vec<u32>, DatapathError>;

    /// Removes every conntrack entry (both tables, both families) with one of `addrs` as source
    /// or destination: the flows of endpoints that went or changed identity, so that whoever gets
    /// their address next starts from policy. Returns the number of entries removed.
    fn flush_ct(&mut self, addrs: &BTreeSet<IpAddr>) -> Result<usize, DatapathError>;

    /// Reads back what the maps hold.
    fn current(&self) -> Result<MapState, DatapathError>;

    /// Per-reason drop counters, summed over CPUs.
    fn drop_counters(&self) -> Result<DropCounters, DatapathError>;

    /// Turns `Flow` events for new allowed flows on or off (the monitor).
    fn set_trace_flows(&mut self, on: bool) -> Result<(), DatapathError>;

    /// Sets the events per second and CPU that `EVENTS` gets at most (`Config::event_rate`).
    fn set_event_rate(&mut self, rate: u32) -> Result<(), DatapathError>;

    /// Per-reason audit counters (`AUDITS`: flows audit mode let through, by the reason a drop
    /// would have had), summed over CPUs.
    fn audit_counters(&self) -> Result<DropCounters, DatapathError> {
        Ok(DropCounters::new())
    }

    /// Per-rule new-flow counters (`RULE_STATS`), summed over CPUs.
    fn rule_counters(&self) -> Result<RuleCounters, DatapathError> {
        Ok(RuleCounters::new())
    }

    /// Removes the `RULE_STATS` entries of every rule `keep` says no to (rule 0, the default
    /// deny and implicit allow, is always kept): the counters of rules that are gone, so that
    /// their numbers count nothing else. Returns the number of entries removed.
    fn prune_rule_counters(&mut self, _keep: &dyn Fn(u32) -> bool) -> Result<usize, DatapathError> {
        Ok(0)
    }

    /// The `EVENTS` rate limit's counters (`EVENT_STATS`), summed over CPUs (`tat_ns`: the
    /// latest of them).
    fn event_stats(&self) -> Result<EventStats, DatapathError> {
        Ok(EventStats::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_sized_map_has_a_size_and_the_table_names_real_maps() {
        let d = MapSizes::default();
        for name in LXC_SIZED.iter().chain(MASQ6_SIZED.iter()) {
            assert!(d.get(name).is_some_and(|n| n > 0), "{name} has no size");
        }
        for name in LXC_SIZED {
            assert!(
                maps::ALL.contains(&name),
                "{name} is not a map of the object"
            );
        }
        assert_eq!(
            d.get(maps::CONFIG),
            None,
            "fixed-size maps are not configurable"
        );
        assert_eq!(
            d.of(&[maps::POLICY, maps::DROPS]),
            vec![(maps::POLICY, d.policy)]
        );
    }

    #[test]
    fn a_pinned_map_keeps_its_size_and_the_difference_is_reported() {
        let want = MapSizes {
            policy: 100,
            ct4: 2048,
            ..MapSizes::default()
        };
        let pinned = |name: &str| match name {
            n if n == maps::POLICY => Some(16384),
            n if n == maps::CT4 => Some(2048),
            // SNAT6 is not among the names asked about: left as configured.
            n if n == maps::SNAT6 => Some(7),
            _ => None,
        };
        let (got, mismatches) = want.adopt_pinned(&LXC_SIZED, pinned);
        assert_eq!(got.policy, 16384, "the pinned POLICY keeps its size");
        assert_eq!(got.ct4, 2048);
        assert_eq!(got.snat6, want.snat6);
        assert_eq!(got.endpoints, want.endpoints, "not pinned: as configured");
        assert_eq!(
            mismatches,
            vec![SizeMismatch {
                map: maps::POLICY,
                configured: 100,
                pinned: 16384
            }]
        );
    }
}
