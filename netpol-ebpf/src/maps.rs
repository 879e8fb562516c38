//! Every map of the object. Sizes here are the defaults; the agent overrides them at load time.

use aya_ebpf::{
    btf_maps::{
        Array, HashMap, LpmTrie, LruHashMap, LruPerCpuHashMap, PerCpuArray, PerCpuHashMap, RingBuf,
    },
    macros::btf_map,
};
use netpol_common::{
    ct::{CtEntry, CtKey4, CtKey6},
    endpoint::Endpoint,
    frag::{Frag4Key, Frag6Key, FragL4, Masq6Frag},
    ipcache::RemoteInfo,
    policy::{PolicyKey, PolicyValue},
    stats::{EventStats, RuleStats, RuleStatsKey},
    Config,
};

#[btf_map]
pub static ENDPOINTS: HashMap<u32, Endpoint, 1024> = HashMap::new();

#[btf_map]
pub static IPCACHE4_V2: LpmTrie<[u8; 4], RemoteInfo, 4096> = LpmTrie::new();

#[btf_map]
pub static IPCACHE6_V2: LpmTrie<[u8; 16], RemoteInfo, 4096> = LpmTrie::new();

/// The ipcache's generation (netpol-common's `ipcache`): moved on by the agent after every
/// ipcache write.
#[btf_map]
pub static IPCACHE_GEN: Array<u32, 1> = Array::new();

#[btf_map]
pub static POLICY: LpmTrie<PolicyKey, PolicyValue, 16384> = LpmTrie::new();

/// Conntrack, two tables per family (see netpol-common's `ct` module): flows enter `CT*_NEW_V3`
/// and move to `CT*_V3` once established, so a spray of new flows evicts only flows that are not
/// established yet. One LRU list per map (no `BPF_F_NO_COMMON_LRU`, which splits `max_entries`
/// over every possible CPU: 128 possible CPUs would leave 512 entries each).
#[btf_map]
pub static CT4_V3: LruHashMap<CtKey4, CtEntry, 65536> = LruHashMap::new();

#[btf_map]
pub static CT6_V3: LruHashMap<CtKey6, CtEntry, 16384> = LruHashMap::new();

#[btf_map]
pub static CT4_NEW_V3: LruHashMap<CtKey4, CtEntry, 16384> = LruHashMap::new();

#[btf_map]
pub static CT6_NEW_V3: LruHashMap<CtKey6, CtEntry, 4096> = LruHashMap::new();

/// The L4 view of fragmented datagrams, recorded from their first fragment for the later ones
/// (netpol-common's `frag` module). One LRU list shared by all CPUs.
#[btf_map]
pub static FRAG4: LruHashMap<Frag4Key, FragL4, 4096> = LruHashMap::new();

#[btf_map]
pub static FRAG6: LruHashMap<Frag6Key, FragL4, 4096> = LruHashMap::new();

/// Drop and flow events, read by `netpol-agent monitor`.
#[btf_map]
pub static EVENTS: RingBuf<netpol_common::event::FlowEvent, { 256 * 1024 }> = RingBuf::new();

/// Per-CPU drop counters, indexed by `DropReason` (`maps::DROPS`).
#[btf_map]
pub static DROPS_V2: PerCpuArray<u64, { netpol_common::DropReason::COUNT as usize }> =
    PerCpuArray::new();

/// Per-CPU drop counters by endpoint, reason and direction (`maps::EP_DROPS`); sized by the
/// agent to `epdrop::PER_ENDPOINT` keys per endpoint.
#[btf_map]
pub static EP_DROPS: PerCpuHashMap<netpol_common::epdrop::EpDropKey, u64, 8192> =
    PerCpuHashMap::new();

/// Per-CPU audit counters, indexed by the `DropReason` a drop would have had (`maps::AUDITS`).
#[btf_map]
pub static AUDITS: PerCpuArray<u64, { netpol_common::DropReason::COUNT as usize }> =
    PerCpuArray::new();

/// New flows by the rule that decided them (`maps::RULE_STATS`). LRU: a rule table larger than
/// the map loses the counts of its least used rules, never a verdict.
#[btf_map]
pub static RULE_STATS: LruPerCpuHashMap<RuleStatsKey, RuleStats, 4096> = LruPerCpuHashMap::new();

/// The `EVENTS` rate limit of each CPU and what it suppressed (`maps::EVENT_STATS`).
#[btf_map]
pub static EVENT_STATS: PerCpuArray<EventStats, 1> = PerCpuArray::new();

#[btf_map]
pub static CONFIG: Array<Config, 1> = Array::new();

/// Per-CPU working memory of the per-container programs (not part of the agent's interface).
#[btf_map]
pub static SCRATCH: PerCpuArray<crate::lxc::Scratch, 1> = PerCpuArray::new();

/// IPv6 masquerade on the uplink (see `masq6.rs` and netpol-common's `nat` module): the translated
/// flows, two entries each.
#[btf_map]
pub static SNAT6: LruHashMap<netpol_common::nat::Snat6Key, netpol_common::nat::Snat6Entry, 16384> =
    LruHashMap::new();

/// The address the masquerade wrote into the first fragment of a datagram, for its later ones.
#[btf_map]
pub static MASQ6_FRAG: LruHashMap<Frag6Key, Masq6Frag, 4096> = LruHashMap::new();

#[btf_map]
pub static MASQ6_CONFIG: Array<netpol_common::nat::Masq6Config, 1> = Array::new();

/// Masqueraded source prefixes and never-translated destination prefixes.
#[btf_map]
pub static MASQ6_PREFIX: LpmTrie<[u8; 16], netpol_common::nat::Masq6Prefix, 256> = LpmTrie::new();

#[btf_map]
pub static MASQ6_STATS: PerCpuArray<u64, { netpol_common::nat::Masq6Counter::COUNT as usize }> =
    PerCpuArray::new();

#[btf_map]
pub static MASQ6_SCRATCH: PerCpuArray<crate::masq6::Scratch, 1> = PerCpuArray::new();
