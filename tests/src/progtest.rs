//! An unpinned, loaded copy of the per-container programs for `BPF_PROG_TEST_RUN` (tier 2):
//! typed access to its maps, runs on a chosen device, and the events and conntrack it leaves.
//!
//! `BPF_PROG_TEST_RUN` gives the program an skb on the device named by the `ifindex` of the
//! `__sk_buff` passed as context, or on `lo` (ifindex 1) without one (net/bpf/test_run.c:
//! `ctx->ifindex > 1` is looked up in the caller's network namespace); [`private_netns_with_veths`]
//! makes devices for tests that need several endpoints.

use std::process::Command;

use aya::{
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, MapData, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{SchedClassifier, TestRun, TestRunOptions},
    Ebpf, EbpfLoader,
};
use netpol_agent::datapath::EBPF_OBJECT;
use netpol_common::{
    ct::{CtEntry, CtKey4, CtKey6},
    endpoint::Endpoint,
    epdrop::EpDropKey,
    event::FlowEvent,
    frag::{Frag4Key, Frag6Key, FragL4},
    ipcache::RemoteInfo,
    maps,
    policy::{PolicyKey, PolicyValue},
    programs,
    stats::{EventStats, RuleStats, RuleStatsKey},
    Config, DropReason,
};

/// `TC_ACT_UNSPEC` (-1) as the kernel reports the return value.
pub const PASS: u32 = u32::MAX;
/// `TC_ACT_SHOT`.
pub const SHOT: u32 = 2;
/// `lo`: the device of a test run without a context.
pub const LO: u32 = 1;

/// Which per-container program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prog {
    /// `from_container`: the container's egress.
    From,
    /// `to_container`: the container's ingress.
    To,
}

/// The current `CLOCK_MONOTONIC` time, `bpf_ktime_get_ns()`'s clock.
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    assert_eq!(r, 0, "clock_gettime");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Map sizes of a test copy.
#[derive(Clone, Copy, Debug)]
pub struct Sizes {
    pub endpoints: u32,
    pub ipcache: u32,
    pub policy: u32,
    pub ct: u32,
}

impl Default for Sizes {
    fn default() -> Self {
        Self {
            endpoints: 16,
            ipcache: 64,
            policy: 256,
            ct: 1024,
        }
    }
}

/// The loaded object with `from_container` and `to_container` verified and loaded.
pub struct Datapath {
    pub bpf: Ebpf,
    /// `CONFIG` flags kept under every [`Datapath::config`]: the agent's start flags on this
    /// architecture (`Config::CT_IN_PLACE` on x86) unless a test changes them
    /// ([`Datapath::set_ct_in_place`]).
    start_flags: u32,
}

impl Datapath {
    pub fn load(sizes: Sizes) -> Self {
        let mut bpf = EbpfLoader::new()
            .map_max_entries(maps::ENDPOINTS, sizes.endpoints)
            .map_max_entries(maps::IPCACHE4, sizes.ipcache)
            .map_max_entries(maps::IPCACHE6, sizes.ipcache)
            .map_max_entries(maps::POLICY, sizes.policy)
            .map_max_entries(maps::CT4, sizes.ct)
            .map_max_entries(maps::CT6, sizes.ct)
            .map_max_entries(maps::CT4_NEW, sizes.ct)
            .map_max_entries(maps::CT6_NEW, sizes.ct)
            .load(EBPF_OBJECT)
            .unwrap_or_else(|e| panic!("loading the object: {e:?}"));
        for name in [programs::FROM_CONTAINER, programs::TO_CONTAINER] {
            let p: &mut SchedClassifier = bpf
                .program_mut(name)
                .unwrap_or_else(|| panic!("program {name} missing"))
                .try_into()
                .unwrap_or_else(|e| panic!("{name} is not a classifier: {e:?}"));
            p.load()
                .unwrap_or_else(|e| panic!("verifier rejected {name}: {e:?}"));
        }
        let mut dp = Self {
            bpf,
            start_flags: netpol_agent::datapath::kernel::start_flags(),
        };
        // No rate limit on events unless a test sets one: tests count every event.
        dp.config(0);
        // The agent's first generation.
        dp.ipcache_write_ends();
        dp
    }

    fn hash<K: aya::Pod, V: aya::Pod>(&mut self, name: &str) -> HashMap<&mut MapData, K, V> {
        HashMap::try_from(
            self.bpf
                .map_mut(name)
                .unwrap_or_else(|| panic!("no map {name}")),
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    fn trie<K: aya::Pod, V: aya::Pod>(&mut self, name: &str) -> LpmTrie<&mut MapData, K, V> {
        LpmTrie::try_from(
            self.bpf
                .map_mut(name)
                .unwrap_or_else(|| panic!("no map {name}")),
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    pub fn endpoint(&mut self, ifindex: u32, ep: Endpoint) {
        self.hash::<u32, Endpoint>(maps::ENDPOINTS)
            .insert(ifindex, ep, 0)
            .expect("ENDPOINTS insert");
    }

    /// Writes an ipcache entry as the agent does: an odd `IPCACHE_GEN`, the trie, then the next
    /// even one (netpol-common's `ipcache`).
    pub fn ipcache4(&mut self, prefix: u32, addr: [u8; 4], info: RemoteInfo) {
        self.ipcache4_unfinished(prefix, addr, info);
        self.ipcache_write_ends();
    }

    pub fn ipcache6(&mut self, prefix: u32, addr: [u8; 16], info: RemoteInfo) {
        self.ipcache6_unfinished(prefix, addr, info);
        self.ipcache_write_ends();
    }

    /// What an agent leaves of an ipcache write when it dies (or its generation write fails)
    /// right after the trie write: the trie holds `info`, `IPCACHE_GEN` is the odd generation
    /// the write began.
    pub fn ipcache4_unfinished(&mut self, prefix: u32, addr: [u8; 4], info: RemoteInfo) {
        self.ipcache_write_begins();
        self.trie::<[u8; 4], RemoteInfo>(maps::IPCACHE4)
            .insert(&Key::new(prefix, addr), info, 0)
            .expect("IPCACHE4 insert");
    }

    pub fn ipcache6_unfinished(&mut self, prefix: u32, addr: [u8; 16], info: RemoteInfo) {
        self.ipcache_write_begins();
        self.trie::<[u8; 16], RemoteInfo>(maps::IPCACHE6)
            .insert(&Key::new(prefix, addr), info, 0)
            .expect("IPCACHE6 insert");
    }

    /// Removes an ipcache entry as the agent does: an odd `IPCACHE_GEN`, the trie, then the
    /// next even one.
    pub fn ipcache4_remove(&mut self, prefix: u32, addr: [u8; 4]) {
        self.ipcache_write_begins();
        let _ = self
            .trie::<[u8; 4], RemoteInfo>(maps::IPCACHE4)
            .remove(&Key::new(prefix, addr));
        self.ipcache_write_ends();
    }

    pub fn ipcache6_remove(&mut self, prefix: u32, addr: [u8; 16]) {
        self.ipcache_write_begins();
        let _ = self
            .trie::<[u8; 16], RemoteInfo>(maps::IPCACHE6)
            .remove(&Key::new(prefix, addr));
        self.ipcache_write_ends();
    }

    /// The ipcache's generation (`IPCACHE_GEN`).
    pub fn ipcache_gen(&self) -> u32 {
        let m: Array<_, u32> =
            Array::try_from(self.bpf.map(maps::IPCACHE_GEN).expect("IPCACHE_GEN")).unwrap();
        m.get(&0, 0).expect("IPCACHE_GEN")
    }

    /// Moves `IPCACHE_GEN` to the odd generation of a write, as the agent does before each
    /// ipcache write.
    pub fn ipcache_write_begins(&mut self) {
        self.set_ipcache_gen(netpol_common::ipcache::write_begins(self.ipcache_gen()));
    }

    /// Moves `IPCACHE_GEN` to the next even generation, as the agent does after each ipcache
    /// write and when it starts.
    pub fn ipcache_write_ends(&mut self) {
        self.set_ipcache_gen(netpol_common::ipcache::write_ends(self.ipcache_gen()));
    }

    fn set_ipcache_gen(&mut self, next: u32) {
        let mut m: Array<_, u32> =
            Array::try_from(self.bpf.map_mut(maps::IPCACHE_GEN).expect("IPCACHE_GEN")).unwrap();
        m.set(0, next, 0).expect("IPCACHE_GEN set");
    }

    pub fn policy(&mut self, prefix: u32, key: PolicyKey, value: PolicyValue) {
        self.trie::<PolicyKey, PolicyValue>(maps::POLICY)
            .insert(&Key::new(prefix, key), value, 0)
            .expect("POLICY insert");
    }

    /// The conntrack map of a family: the established table (`est`) or the new one.
    fn ct_name(v6: bool, est: bool) -> &'static str {
        match (v6, est) {
            (false, true) => maps::CT4,
            (false, false) => maps::CT4_NEW,
            (true, true) => maps::CT6,
            (true, false) => maps::CT6_NEW,
        }
    }

    /// Writes `e` into the established (`est`) or the new table.
    pub fn set_ct4(&mut self, k: CtKey4, e: CtEntry, est: bool) {
        self.hash::<CtKey4, CtEntry>(Self::ct_name(false, est))
            .insert(k, e, 0)
            .expect("CT4 insert");
    }

    pub fn set_ct6(&mut self, k: CtKey6, e: CtEntry, est: bool) {
        self.hash::<CtKey6, CtEntry>(Self::ct_name(true, est))
            .insert(k, e, 0)
            .expect("CT6 insert");
    }

    pub fn ct4(&self, k: &CtKey4, est: bool) -> Option<CtEntry> {
        let name = Self::ct_name(false, est);
        let m: HashMap<_, CtKey4, CtEntry> =
            HashMap::try_from(self.bpf.map(name).expect(name)).unwrap();
        m.get(k, 0).ok()
    }

    pub fn ct6(&self, k: &CtKey6, est: bool) -> Option<CtEntry> {
        let name = Self::ct_name(true, est);
        let m: HashMap<_, CtKey6, CtEntry> =
            HashMap::try_from(self.bpf.map(name).expect(name)).unwrap();
        m.get(k, 0).ok()
    }

    /// Every entry of the hash map `name`.
    pub fn dump<K: aya::Pod, V: aya::Pod>(&self, name: &str) -> Vec<(K, V)> {
        let m: HashMap<_, K, V> = HashMap::try_from(
            self.bpf
                .map(name)
                .unwrap_or_else(|| panic!("no map {name}")),
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        m.iter()
            .map(|r| r.unwrap_or_else(|e| panic!("{name} iter: {e}")))
            .collect()
    }

    /// Every entry of the established (`est`) or the new IPv4 table.
    pub fn ct4_all(&self, est: bool) -> Vec<(CtKey4, CtEntry)> {
        self.dump(Self::ct_name(false, est))
    }

    /// Every entry of the established (`est`) or the new IPv6 table.
    pub fn ct6_all(&self, est: bool) -> Vec<(CtKey6, CtEntry)> {
        self.dump(Self::ct_name(true, est))
    }

    /// The `FRAG4` record of a datagram.
    pub fn frag4(&self, k: &Frag4Key) -> Option<FragL4> {
        let m: HashMap<_, Frag4Key, FragL4> =
            HashMap::try_from(self.bpf.map(maps::FRAG4).expect("FRAG4")).unwrap();
        m.get(k, 0).ok()
    }

    /// The `FRAG6` record of a datagram.
    pub fn frag6(&self, k: &Frag6Key) -> Option<FragL4> {
        let m: HashMap<_, Frag6Key, FragL4> =
            HashMap::try_from(self.bpf.map(maps::FRAG6).expect("FRAG6")).unwrap();
        m.get(k, 0).ok()
    }

    /// Empties the endpoint, ipcache, policy, conntrack and fragment maps and drains `EVENTS`, so one
    /// loaded copy serves many independent cases.
    pub fn clear(&mut self) {
        fn drain<K: aya::Pod, V: aya::Pod>(mut m: HashMap<&mut MapData, K, V>) {
            let keys: Vec<K> = m.keys().map(|k| k.expect("keys")).collect();
            for k in keys {
                m.remove(&k).expect("remove");
            }
        }
        fn drain_trie<K: aya::Pod, V: aya::Pod>(mut m: LpmTrie<&mut MapData, K, V>) {
            let keys: Vec<Key<K>> = m.keys().map(|k| k.expect("keys")).collect();
            for k in keys {
                m.remove(&k).expect("remove");
            }
        }
        drain(self.hash::<u32, Endpoint>(maps::ENDPOINTS));
        for est in [true, false] {
            drain(self.hash::<CtKey4, CtEntry>(Self::ct_name(false, est)));
            drain(self.hash::<CtKey6, CtEntry>(Self::ct_name(true, est)));
        }
        drain(self.hash::<Frag4Key, FragL4>(maps::FRAG4));
        drain(self.hash::<Frag6Key, FragL4>(maps::FRAG6));
        drain_trie(self.trie::<[u8; 4], RemoteInfo>(maps::IPCACHE4));
        drain_trie(self.trie::<[u8; 16], RemoteInfo>(maps::IPCACHE6));
        drain_trie(self.trie::<PolicyKey, PolicyValue>(maps::POLICY));
        self.events();
    }

    pub fn prog(&self, p: Prog) -> &SchedClassifier {
        let name = match p {
            Prog::From => programs::FROM_CONTAINER,
            Prog::To => programs::TO_CONTAINER,
        };
        self.bpf.program(name).unwrap().try_into().unwrap()
    }

    /// Runs `p` on `frame` on the device `ifindex` (of the calling thread's network namespace;
    /// `LO` runs without a context). Panics if the program rewrote the packet.
    pub fn run_on(&self, p: Prog, ifindex: u32, frame: &[u8]) -> u32 {
        self.run_via(p, ifindex, 0, frame)
    }

    /// [`Datapath::run_on`] with the skb's `ingress_ifindex` (the device the packet entered the
    /// host through; 0: none).
    pub fn run_via(&self, p: Prog, ifindex: u32, ingress_ifindex: u32, frame: &[u8]) -> u32 {
        // struct __sk_buff up to and including `ifindex` (offset 40), `ingress_ifindex` at 36;
        // the kernel zero-fills the rest and only accepts mark, priority, ingress_ifindex,
        // ifindex, cb, tstamp, wire_len, gso_* set.
        let mut ctx = [0u8; 44];
        ctx[36..40].copy_from_slice(&ingress_ifindex.to_ne_bytes());
        ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
        let mut out = vec![0u8; frame.len() + 256];
        let plain = ifindex == LO && ingress_ifindex == 0;
        let opts = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: if plain { None } else { Some(&ctx) },
            ..TestRunOptions::default()
        };
        let r = self
            .prog(p)
            .test_run(opts)
            .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN of {p:?}: {e:?}"));
        assert_eq!(
            &out[..r.data_size_out as usize],
            frame,
            "{p:?} must not rewrite the packet"
        );
        r.return_value
    }

    /// Sets `CONFIG`'s flags (besides the start flags), with no rate limit on events (tests
    /// count every event).
    pub fn config(&mut self, flags: u32) {
        self.config_with_rate(flags, u32::MAX);
    }

    /// `CONFIG` with `flags` and the start flags, and an event rate limit
    /// (`Config::event_rate`, events per second and CPU; 0: the default).
    pub fn config_with_rate(&mut self, flags: u32, event_rate: u32) {
        let flags = flags | self.start_flags;
        let mut m: Array<_, Config> =
            Array::try_from(self.bpf.map_mut(maps::CONFIG).expect("CONFIG")).unwrap();
        m.set(0, Config { flags, event_rate }, 0)
            .expect("CONFIG set");
    }

    /// Turns conntrack's in-place reuse of entries (`Config::CT_IN_PLACE`) on or off, now and
    /// under later [`Datapath::config`] calls.
    pub fn set_ct_in_place(&mut self, on: bool) {
        let mut m: Array<_, Config> =
            Array::try_from(self.bpf.map_mut(maps::CONFIG).expect("CONFIG")).unwrap();
        let mut c = m.get(&0, 0).expect("CONFIG get");
        if on {
            c.flags |= Config::CT_IN_PLACE;
            self.start_flags |= Config::CT_IN_PLACE;
        } else {
            c.flags &= !Config::CT_IN_PLACE;
            self.start_flags &= !Config::CT_IN_PLACE;
        }
        m.set(0, c, 0).expect("CONFIG set");
    }

    /// `EVENT_STATS` summed over CPUs.
    pub fn event_stats(&self) -> EventStats {
        let m: PerCpuArray<_, EventStats> =
            PerCpuArray::try_from(self.bpf.map(maps::EVENT_STATS).expect("EVENT_STATS")).unwrap();
        let mut out = EventStats::default();
        for v in m.get(&0, 0).expect("EVENT_STATS get").iter() {
            out.suppressed_drops += v.suppressed_drops;
            out.suppressed_flows += v.suppressed_flows;
            out.suppressed_audits += v.suppressed_audits;
            out.ring_full += v.ring_full;
        }
        out
    }

    /// The `AUDITS` counter of `reason`, summed over CPUs.
    pub fn audits(&self, reason: DropReason) -> u64 {
        let m: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.bpf.map(maps::AUDITS).expect("AUDITS")).unwrap();
        m.get(&(reason as u32), 0).expect("AUDITS get").iter().sum()
    }

    /// `RULE_STATS` summed over CPUs.
    pub fn rule_stats(&self) -> std::collections::BTreeMap<RuleStatsKey, RuleStats> {
        let m: aya::maps::PerCpuHashMap<_, RuleStatsKey, RuleStats> =
            aya::maps::PerCpuHashMap::try_from(self.bpf.map(maps::RULE_STATS).expect("RULE_STATS"))
                .unwrap();
        let mut out = std::collections::BTreeMap::new();
        for item in m.iter() {
            let (k, vs) = item.expect("RULE_STATS iter");
            let s: &mut RuleStats = out.entry(k).or_default();
            for v in vs.iter() {
                s.allowed += v.allowed;
                s.denied += v.denied;
                s.audited += v.audited;
            }
        }
        out
    }

    /// The `DROPS` counter of `reason`, summed over CPUs.
    pub fn drops(&self, reason: DropReason) -> u64 {
        self.all_drops()[reason as usize]
    }

    /// Every counter of `DROPS` summed over CPUs, indexed by reason.
    pub fn all_drops(&self) -> Vec<u64> {
        let m: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.bpf.map(maps::DROPS).expect("DROPS")).unwrap();
        (0..DropReason::COUNT)
            .map(|i| m.get(&i, 0).expect("DROPS get").iter().sum())
            .collect()
    }

    /// Every `EP_DROPS` counter (by endpoint, reason, direction), summed over CPUs.
    pub fn ep_drops(&self) -> std::collections::BTreeMap<EpDropKey, u64> {
        let m: PerCpuHashMap<_, EpDropKey, u64> =
            PerCpuHashMap::try_from(self.bpf.map(maps::EP_DROPS).expect("EP_DROPS")).unwrap();
        m.iter()
            .map(|r| {
                let (k, v) = r.expect("EP_DROPS entry");
                (k, v.iter().sum())
            })
            .collect()
    }

    /// Drains `EVENTS`.
    pub fn events(&mut self) -> Vec<FlowEvent> {
        let mut rb = RingBuf::try_from(self.bpf.map_mut(maps::EVENTS).expect("EVENTS")).unwrap();
        let mut v = Vec::new();
        while let Some(item) = rb.next() {
            assert_eq!(item.len(), size_of::<FlowEvent>(), "event size");
            // SAFETY: FlowEvent is plain old data of that size.
            v.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<FlowEvent>()) });
        }
        v
    }
}

/// Moves the calling thread into a new network namespace holding a veth pair per name (the
/// name is the host side, as Docker's), and returns the ifindexes of the named sides: the
/// devices `BPF_PROG_TEST_RUN` runs on when given their ifindex. The namespace goes with the
/// thread.
pub fn private_netns_with_veths(names: &[&str]) -> Vec<u32> {
    // SAFETY: affects only the calling thread (libtest runs each test on its own thread).
    let r = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    assert_eq!(
        r,
        0,
        "unshare(CLONE_NEWNET): {}",
        std::io::Error::last_os_error()
    );
    names
        .iter()
        .map(|name| {
            // A child process forked from this thread starts in its network namespace.
            let peer = format!("{name}p");
            let st = Command::new("ip")
                .args(["link", "add", name, "type", "veth", "peer", "name", &peer])
                .status()
                .unwrap_or_else(|e| panic!("running ip: {e}"));
            assert!(st.success(), "ip link add {name} type veth: {st}");
            let c = std::ffi::CString::new(*name).unwrap();
            // SAFETY: c is a valid C string.
            let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
            assert_ne!(idx, 0, "{name} has no ifindex");
            idx
        })
        .collect()
}
