//! Types shared by the netpol eBPF programs and the agent.
//!
//! Every map key and value is `#[repr(C)]`, `Copy`, with explicit padding, so the kernel and user
//! space agree on the layout and `bpftool map dump` prints typed JSON (the maps carry BTF).
//! Fields that hold network-order data are private behind typed constructors and getters.
#![no_std]

pub mod addr;
pub mod ct;
pub mod endpoint;
pub mod epdrop;
pub mod event;
pub mod frag;
pub mod icmp;
pub mod identity;
pub mod ipcache;
pub mod lpm;
#[cfg(any(test, feature = "model"))]
pub mod model;
pub mod nat;
pub mod nd;
pub mod policy;
pub mod stats;

/// Directory under bpffs holding every pinned netpol map, program and link.
pub const PIN_DIR: &str = "/sys/fs/bpf/netpol";

/// Map names, as the object file and `/sys/fs/bpf/netpol/` know them. A layout change gets a new
/// name (`_V2`, …) so that a pinned map of an older layout is never read with the new one.
pub mod maps {
    pub const ENDPOINTS: &str = "ENDPOINTS";
    /// `RemoteInfo` with the container's interfaces (v2).
    pub const IPCACHE4: &str = "IPCACHE4_V2";
    pub const IPCACHE6: &str = "IPCACHE6_V2";
    /// Array of one `u32`: the ipcache's generation, which the agent moves on around every
    /// ipcache write, odd while it writes (see the `ipcache` module).
    pub const IPCACHE_GEN: &str = "IPCACHE_GEN";
    pub const POLICY: &str = "POLICY";
    /// Established flows (v3: one entry per flow for both directions, keyed from the
    /// endpoint's side, the opening side in the entry).
    pub const CT4: &str = "CT4_V3";
    pub const CT6: &str = "CT6_V3";
    /// Flows not established yet (same layout as `CT4` / `CT6`).
    pub const CT4_NEW: &str = "CT4_NEW_V3";
    pub const CT6_NEW: &str = "CT6_NEW_V3";
    pub const EVENTS: &str = "EVENTS";
    /// Per-CPU drop counters, [`crate::DropReason::COUNT`] slots (`_V2`: 64 slots instead of
    /// one per reason, so that adding a reason needs no new layout).
    pub const DROPS: &str = "DROPS_V2";
    /// Per-CPU drop counters by endpoint, reason and direction (see the `epdrop` module).
    pub const EP_DROPS: &str = "EP_DROPS";
    pub const CONFIG: &str = "CONFIG";
    pub const SNAT6: &str = "SNAT6";
    pub const MASQ6_CONFIG: &str = "MASQ6_CONFIG";
    pub const MASQ6_PREFIXES: &str = "MASQ6_PREFIX";
    /// Ports of fragmented datagrams (see the `frag` module).
    pub const FRAG4: &str = "FRAG4";
    pub const FRAG6: &str = "FRAG6";
    /// Per-CPU counters of connections that audit mode let through, [`crate::DropReason::COUNT`]
    /// slots by the reason a drop would have had (`policy-denied`, `policy-deny-rule`).
    pub const AUDITS: &str = "AUDITS";
    /// Per-CPU LRU hash: [`crate::stats::RuleStatsKey`] (rule, local identity, direction) →
    /// [`crate::stats::RuleStats`] (new flows allowed, denied, audited). Rule 0 is the default
    /// deny (denied, audited) or the implicit allow of an opted-out direction (allowed).
    pub const RULE_STATS: &str = "RULE_STATS";
    /// Per-CPU [`crate::stats::EventStats`]: the `EVENTS` rate limit's state and what it
    /// suppressed.
    pub const EVENT_STATS: &str = "EVENT_STATS";

    /// Every map of the object, for pinning and for the test that the object holds each one.
    pub const ALL: &[&str] = &[
        ENDPOINTS,
        IPCACHE4,
        IPCACHE6,
        IPCACHE_GEN,
        POLICY,
        CT4,
        CT6,
        CT4_NEW,
        CT6_NEW,
        EVENTS,
        DROPS,
        EP_DROPS,
        CONFIG,
        SNAT6,
        MASQ6_CONFIG,
        MASQ6_PREFIXES,
        FRAG4,
        FRAG6,
        AUDITS,
        RULE_STATS,
        EVENT_STATS,
    ];

    /// Names of earlier layouts. An agent that finds them pinned moves what it can into the
    /// current maps, switches the links to its programs, then removes these pins.
    pub mod legacy {
        /// `RemoteInfo` v1: `{ identity: u32, _pad: u32 }`.
        pub const IPCACHE4: &str = "IPCACHE4";
        pub const IPCACHE6: &str = "IPCACHE6";
        /// `CtEntry` v1: `{ expires_ns: u64, flags: u32, rule: u32 }`.
        pub const CT4: &str = "CT4";
        pub const CT6: &str = "CT6";
        /// Conntrack v2: keyed by the opening packet's tuple and the side that admitted it
        /// (`{ saddr, daddr, sport, dport, proto, dir, _pad: [u8; 2] }`), `CtEntry` without
        /// its `dir`; established (`CT4_V2`) and new (`CT4_NEW`) tables.
        pub const CT4_V2: &str = "CT4_V2";
        pub const CT6_V2: &str = "CT6_V2";
        pub const CT4_NEW_V2: &str = "CT4_NEW";
        pub const CT6_NEW_V2: &str = "CT6_NEW";
        pub const ALL: &[&str] = &[
            IPCACHE4, IPCACHE6, CT4, CT6, CT4_V2, CT6_V2, CT4_NEW_V2, CT6_NEW_V2,
        ];
    }
}

/// Program names (the function names in netpol-ebpf).
pub mod programs {
    pub const FROM_CONTAINER: &str = "from_container";
    pub const TO_CONTAINER: &str = "to_container";
    pub const MASQ6_OUT: &str = "masq6_out";
    pub const MASQ6_IN: &str = "masq6_in";
}

/// IP protocol numbers the datapath understands.
pub mod proto {
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const ICMPV6: u8 = 58;
    pub const SCTP: u8 = 132;
}

/// Traffic direction, from the point of view of the local (policed) endpoint.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    /// Traffic delivered to the container (`to_container`).
    Ingress = 0,
    /// Traffic sent by the container (`from_container`).
    Egress = 1,
}

impl Direction {
    pub const fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::Ingress),
            1 => Some(Self::Egress),
            _ => None,
        }
    }
}

/// Stable drop reasons. Numbers are never reused: a retired reason keeps its number.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// No rule allows the flow and the direction is enforced (default deny).
    PolicyDenied = 1,
    /// An explicit deny rule (`ingressDeny` / `egressDeny`) matched.
    PolicyDeny = 2,
    /// The container sent a packet whose source address is not its own.
    Spoofed = 3,
    /// A header was truncated or inconsistent (bad IHL, short L4 header, …).
    Malformed = 4,
    /// Not IPv4, IPv6, ARP (nor VLAN-tagged: [`DropReason::VlanTagged`]): the enforced endpoint
    /// drops unknown L3 protocols.
    UnsupportedL3 = 5,
    /// A later (non-initial) IP fragment on an enforced direction whose datagram has no record in
    /// `FRAG4` / `FRAG6` (its first fragment was dropped or not seen yet): no ports to decide by.
    Fragment = 6,
    /// Too many IPv6 extension headers to walk.
    ExtHeaders = 7,
    /// An IPv6 neighbour/router discovery or MLD message that the protocol does not allow here:
    /// wrong hop limit, source, destination, target or size, or a router advertisement or
    /// redirect sent by a container (see `lxc.rs`, `nd_allowed`). Anti-spoofing, not policy:
    /// dropped on every managed endpoint.
    NeighbourDiscovery = 8,
    /// `to_container`: a unicast packet addressed to an address that is not the endpoint's (a
    /// peer that poisoned an ARP/ND cache, or a flooded frame). Dropped on every managed endpoint.
    NotForEndpoint = 9,
    /// A frame that still carries an 802.1Q / 802.1ad tag when the program sees it (the kernel
    /// takes one tag off before TC: this one had two, e.g. a priority tag, VLAN 0, in front of
    /// another). Its IP header is hidden from anti-spoofing and policy, yet a host stack strips
    /// VLAN-0 tags and routes what is inside. Dropped on every managed endpoint, both ways.
    VlanTagged = 10,
}

impl DropReason {
    /// Slots of the `DROPS` counter array: more than the reasons so far, so that a new reason
    /// fits the pinned map of an older agent.
    pub const COUNT: u32 = 64;

    pub const fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::PolicyDenied,
            2 => Self::PolicyDeny,
            3 => Self::Spoofed,
            4 => Self::Malformed,
            5 => Self::UnsupportedL3,
            6 => Self::Fragment,
            7 => Self::ExtHeaders,
            8 => Self::NeighbourDiscovery,
            9 => Self::NotForEndpoint,
            10 => Self::VlanTagged,
            _ => return None,
        })
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::PolicyDenied => "policy-denied",
            Self::PolicyDeny => "policy-deny-rule",
            Self::Spoofed => "spoofed-source",
            Self::Malformed => "malformed",
            Self::UnsupportedL3 => "unsupported-l3",
            Self::Fragment => "fragment",
            Self::ExtHeaders => "ipv6-ext-headers",
            Self::NeighbourDiscovery => "bad-neighbour-discovery",
            Self::NotForEndpoint => "not-for-endpoint",
            Self::VlanTagged => "vlan-tagged",
        }
    }

    pub const ALL: [DropReason; 10] = [
        Self::PolicyDenied,
        Self::PolicyDeny,
        Self::Spoofed,
        Self::Malformed,
        Self::UnsupportedL3,
        Self::Fragment,
        Self::ExtHeaders,
        Self::NeighbourDiscovery,
        Self::NotForEndpoint,
        Self::VlanTagged,
    ];
}

/// Runtime switches of the datapath, in the single-entry `CONFIG` array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Bit set of `Config::*` flags.
    pub flags: u32,
    /// Events per second and CPU that `EVENTS` gets at most (a burst of as many, then that
    /// rate); 0 means [`Config::EVENT_RATE_DEFAULT`]. The rest are counted in `EVENT_STATS`.
    pub event_rate: u32,
}

impl Config {
    /// Emit a `Flow` event for every new allowed flow (set while a monitor is connected).
    pub const TRACE_FLOWS: u32 = 1;
    /// Conntrack may end an entry and give it to another flow in place: a TCP SYN that reopens
    /// a tuple kills its established entry (`ct::CtEntry::kill`, expiry 0) instead of deleting
    /// it, and the reopened flow's promotion writes itself into an expired or killed established
    /// entry of its key (field by field, the expiry last) instead of inserting. That saves the
    /// LRU's free and allocation, and is safe only where another CPU sees the stores in program
    /// order (x86): on a weakly ordered CPU (arm64) a concurrent reader could see the new expiry
    /// with the previous flow's fields (its flags, identity, remote). The agent sets it on x86
    /// alone, as it moves the ipcache generation there alone; without it the datapath deletes
    /// and inserts (the map update publishes a whole new element).
    pub const CT_IN_PLACE: u32 = 2;
    /// Events per second and CPU when `event_rate` is 0.
    pub const EVENT_RATE_DEFAULT: u32 = 1000;

    /// The rate in force.
    #[inline(always)]
    pub const fn events_per_sec(&self) -> u32 {
        if self.event_rate == 0 {
            Self::EVENT_RATE_DEFAULT
        } else {
            self.event_rate
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are #[repr(C)], Copy, without implicit padding.
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::endpoint::Endpoint {}
    unsafe impl aya::Pod for super::ipcache::RemoteInfo {}
    unsafe impl aya::Pod for super::policy::PolicyKey {}
    unsafe impl aya::Pod for super::policy::PolicyValue {}
    unsafe impl aya::Pod for super::ct::CtKey4 {}
    unsafe impl aya::Pod for super::ct::CtKey6 {}
    unsafe impl aya::Pod for super::ct::CtEntry {}
    unsafe impl aya::Pod for super::event::FlowEvent {}
    unsafe impl aya::Pod for super::epdrop::EpDropKey {}
    unsafe impl aya::Pod for super::nat::Snat6Key {}
    unsafe impl aya::Pod for super::nat::Snat6Entry {}
    unsafe impl aya::Pod for super::nat::Masq6Config {}
    unsafe impl aya::Pod for super::nat::Masq6Prefix {}
    unsafe impl aya::Pod for super::frag::Frag4Key {}
    unsafe impl aya::Pod for super::frag::Frag6Key {}
    unsafe impl aya::Pod for super::frag::FragL4 {}
    unsafe impl aya::Pod for super::frag::Masq6Frag {}
    unsafe impl aya::Pod for super::stats::RuleStatsKey {}
    unsafe impl aya::Pod for super::stats::RuleStats {}
    unsafe impl aya::Pod for super::stats::EventStats {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_names_fit_the_kernel() {
        for name in maps::ALL {
            assert!(
                name.len() <= 15,
                "{name} is longer than BPF_OBJ_NAME_LEN - 1"
            );
        }
    }

    #[test]
    fn drop_reasons_round_trip_and_fit_the_counter_array() {
        for r in DropReason::ALL {
            assert_eq!(DropReason::from_u8(r as u8), Some(r));
            assert!((r as u32) < DropReason::COUNT);
        }
        assert_eq!(DropReason::from_u8(0), None);
    }
}
