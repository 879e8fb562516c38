//! The kernel half, seen from the agent: typed map entries and the [`Datapath`] trait. The aya
//! implementation is [`kernel::KernelDatapath`]; [`fake::FakeDatapath`] stands in for it in tests.

pub mod fake;
pub mod kernel;
pub mod masq6;
pub mod teardown;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use netpol_common::{
    endpoint::Endpoint,
    ipcache::RemoteInfo,
    policy::{PolicyKey, PolicyValue},
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

/// Everything the agent writes into the maps; both the desired state (from reconcile) and the
/// current state (read back from the kernel) have this shape.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapState {
    pub endpoints: BTreeMap<u32, Endpoint>,
    /// Identity, and for a container's own address the interfaces its packets come through.
    pub ipcache: BTreeMap<Cidr, RemoteInfo>,
    pub policy: BTreeMap<PolicyEntryKey, PolicyValue>,
}

/// Configured map sizes (`max_entries`). Small by default: fit for a 2 GB host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct MapSizes {
    pub endpoints: u32,
    pub ipcache4: u32,
    pub ipcache6: u32,
    pub policy: u32,
    pub ct4: u32,
    pub ct6: u32,
    pub snat6: u32,
    /// Each of FRAG4 and FRAG6 (fragmented datagrams in flight).
    pub frag: u32,
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
            snat6: 16384,
            frag: 4096,
        }
    }
}

impl MapSizes {
    /// `max_entries` of `CT4_NEW`, the flows not established yet: a quarter of `CT4`.
    pub fn ct4_new(&self) -> u32 {
        (self.ct4 / 4).max(1024)
    }

    /// `max_entries` of `CT6_NEW`: a quarter of `CT6`.
    pub fn ct6_new(&self) -> u32 {
        (self.ct6 / 4).max(1024)
    }
}

/// Drop counters summed over CPUs, by reason number.
pub type DropCounters = BTreeMap<u8, u64>;

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
}
