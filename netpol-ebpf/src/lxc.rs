//! The per-container programs: `from_container` (host veth ingress, the container's egress) and
//! `to_container` (host veth egress, the container's ingress). Cilium's `bpf_lxc.c` in small.
//!
//! Order of checks for a packet on a managed veth:
//! 1. ARP from a container must name the endpoint's own IPv4 address (or 0.0.0.0, a probe) as
//!    sender (`Spoofed`; a truncated or non-Ethernet/IPv4 one is `Malformed`); ARP to a
//!    container passes. A frame that is still VLAN-tagged here (802.1Q / 802.1ad: the kernel
//!    took one tag off before TC, so it had two) is dropped on every endpoint, both ways
//!    (`VlanTagged`): its IP header is out of the checks' sight, yet the host's stack strips
//!    VLAN-0 tags and routes what is inside (a forged source would reach any container through
//!    the bridge). Other non-IP ethertypes pass on an unenforced endpoint and are dropped
//!    (`UnsupportedL3`) on an enforced one.
//! 2. Addresses, read from the fixed IPv4/IPv6 header alone (before its options, lengths,
//!    extension headers and L4), on every endpoint, enforced or not:
//!    - `from_container`: a source that is not the endpoint's own address is dropped
//!      (`Spoofed`). IPv6: a link-local or unspecified source is let on only for neighbour
//!      discovery and MLD (step 4); any other packet with one, a malformed one included, is
//!      `Spoofed`.
//!    - `to_container`: a destination that is not the endpoint's own address must be IPv4
//!      multicast or 255.255.255.255, or IPv6 multicast or link-local (netpol-common's `addr`
//!      module; the endpoint's link-local address and subnet broadcast are not known here);
//!      other unicast is dropped (`NotForEndpoint`): a peer that poisoned an ARP/ND cache, or a
//!      flooded frame, reaches nobody it was not addressed to. Then the source is checked
//!      against its ipcache entry: a container's address that came in through neither that
//!      container's veth nor its bridge (`skb->ingress_ifindex`) is dropped (`Spoofed`), and
//!      so is a host address (identity `host`: the host's own addresses and Docker gateways)
//!      that came in neither from the host's own stack (`ingress_ifindex` 0) nor through this
//!      endpoint's own veth (the host's NAT of the container's own connection to a published
//!      port, which `br_netfilter` bridges back to it); from the uplink, a bridge or another
//!      container's veth it is forged (IPv6 has no martian-source check; netpol-common
//!      `RemoteInfo::spoofed`). `Spoofed` wins over everything later: the check is made
//!      before any path acts on the packet (a parse error on an unenforced endpoint, ND,
//!      fragments, ICMP errors, conntrack, policy). The entry is looked up once, when the check
//!      is made (step 7 reuses it), except for a packet of an established flow (step 6): the
//!      source is checked against the remote entry its conntrack entry recorded, without a
//!      lookup, while the ipcache is still in the generation the entry recorded (netpol-common
//!      `ipcache`: the agent moves `IPCACHE_GEN` on after every ipcache write, so that entry is
//!      the ipcache's own); otherwise it is looked up then.
//! 3. The IP header (version, IHL of at least 5, total or payload length within the packet),
//!    extension headers and L4 header are parsed. Bytes past the IP length are padding: they
//!    pass, but no header is read from them (the L4 header must fit inside the IP length). A
//!    truncated or inconsistent header is dropped (`Malformed`) on an endpoint that enforces
//!    either direction and passes on one that enforces none (fail closed where policy applies,
//!    never break an unpoliced container), except where the packet may be neighbour discovery
//!    or MLD, which step 4 drops on every endpoint: an IPv6 packet whose extension headers,
//!    walked through its bytes whatever its lengths claim, lead to ICMPv6 with an ND/MLD type
//!    (`NeighbourDiscovery`), and one with more than four extension headers, whose upper layer
//!    the parser cannot see and the host's stack would take (`ExtHeaders`).
//! 4. IPv6 neighbour/router discovery and MLD (ICMPv6 130–137, 143) pass without policy when
//!    netpol-common's `nd` rules allow them — hop limit 255 (ND) or 1 (MLD); source, destination
//!    and advertised target the protocol allows; at most 1280 bytes, and at least the type's
//!    fixed fields within the IPv6 payload length (`nd::complete`); no router advertisement or
//!    redirect from a container — so networks keep working under deny-all. What fails them is
//!    dropped (`NeighbourDiscovery`) on every endpoint, enforced or not, and never reaches policy;
//!    so is one that fails to parse (step 3).
//! 5. An ICMP error (ICMPv4 3, 11, 12; ICMPv6 1–4; not source quench or redirect) has its
//!    quoted packet parsed (within the IP length). Only an error tied to it by netpol-common's
//!    `icmp` rules can be related to a flow: from a container it goes back to the quoted
//!    packet's source from the quoted destination, to a container it quotes a packet the
//!    container sent, a port/protocol unreachable comes from the quoted destination, and it is at
//!    most 576 (IPv4) / 1280 (IPv6) bytes. Any other error is a new ICMP message for policy
//!    (its type as the port), like source quench and redirect.
//! 6. Conntrack: a packet of an established flow, a reply, or a tied ICMP error about one, passes
//!    without a policy lookup. Entries belong to the endpoint whose address they carry:
//!    `to_container` neither uses nor creates entries for a packet addressed to another address
//!    (multicast, broadcast, link-local: decided by this endpoint's policy alone), and an ICMP
//!    error is related only to a flow of the endpoint it concerns; it does not refresh the flow.
//!    An entry serves only the endpoint (veth and identity) it was made for, and in
//!    `to_container` only packets that come in through the remote container's veth or bridge
//!    (netpol-common `CtEntry::serves`); one that does not is skipped as if absent. A TCP SYN
//!    without ACK never passes on conntrack: it opens a flow, which policy decides (also over
//!    a closing entry). A SYN-ACK and an ICMP echo reply pass on conntrack only as a reply of
//!    their flow, an echo request only in the direction that opened it. An entry that audit mode admitted (`CtEntry::AUDIT`) serves only while
//!    the endpoint audits the direction that opened the flow; after that (audit mode left, for
//!    that direction or the whole host, or only the other direction audited) a packet of the
//!    flow, either way and a reply included, has the flow decided again by the opening
//!    direction's policy (netpol-common `ct::revisit`): allowed, the entry becomes an ordinary
//!    one; denied, the packet is dropped with the policy's cause (`PolicyDeny` with its rule,
//!    `PolicyDenied`) and the entry stays, renewed, so that no later packet of the flow opens it
//!    again as a new flow of the other side. Only entries with the flag take that branch. An ICMP
//!    error is not related to such an entry. The tables and the life of an entry: netpol-common's
//!    `ct` module.
//! 7. The remote identity comes from the ipcache (`to_container`: the source's entry that step 2
//!    checked, looked up if step 6 did not need to). `from_container`: a group or link-local
//!    destination (IPv4 multicast or 255.255.255.255, IPv6 multicast or link-local) names no
//!    one receiver — the bridge delivers it to every container on it and to the host, and the
//!    ipcache would call it `world` — so its remote is `identity::GROUP`, under which the agent
//!    writes every deny of the endpoint's identity: only a rule that allows everyone
//!    (`toEntities: all`, ports without a peer: the wildcard lookup) and that no deny of any
//!    peer covers lets it out.
//! 8. A new flow in an enforced direction is looked up in `POLICY` (see netpol-common's
//!    `policy` module for the order); deny or no match drops it (`PolicyDeny` with the deny
//!    rule, `PolicyDenied` for the default deny), and is counted in `RULE_STATS` by rule, local
//!    identity and direction. In audit mode (`Endpoint::AUDIT_*`) such a flow passes instead, is
//!    reported as `KIND_AUDIT` with the same cause and counted in `AUDITS`; only these two
//!    reasons are audited. An allowed (or audited) flow, or any flow in an unenforced
//!    direction, gets a conntrack entry so its replies pass the other side (an audited one
//!    flagged `CtEntry::AUDIT`). Events (drops, audits, traced flows) go through a per-CPU rate
//!    limit (`EVENT_STATS`); `DROPS` and `AUDITS` count every one.
//! 9. Fragments (netpol-common's `frag` module): a first fragment that passes records its L4
//!    view in `FRAG4` / `FRAG6`; a later fragment takes the ports of its datagram's record and
//!    goes through 6–8 as a packet of that flow. One without a record (its first fragment was
//!    dropped, not seen yet, or never sent) is dropped (`Fragment`) on an enforced direction.

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC},
    helpers::{bpf_ktime_get_coarse_ns, bpf_ktime_get_ns},
    programs::TcContext,
};
use netpol_common::{
    addr,
    ct::{self, CtDir, CtEntry, CtKey4, CtKey6},
    endpoint::Endpoint,
    epdrop::{self, EpDropKey},
    event::FlowEvent,
    frag::{Frag4Key, Frag6Key, FragL4},
    icmp, identity,
    ipcache::{self, RemoteInfo},
    nd,
    policy::{self, Verdict},
    proto,
    stats::{RuleStats, RuleStatsKey},
    Config, Direction, DropReason,
};

use crate::{
    maps::{
        AUDITS, CONFIG, CT4_NEW_V3, CT4_V3, CT6_NEW_V3, CT6_V3, DROPS_V2, ENDPOINTS, EP_DROPS,
        EVENTS, EVENT_STATS, FRAG4, FRAG6, IPCACHE4_V2, IPCACHE6_V2, IPCACHE_GEN, POLICY,
        RULE_STATS, SCRATCH,
    },
    parse::{
        self, Frag, Kind, ETH_HLEN, ETH_P_8021AD, ETH_P_8021Q, ETH_P_ARP, ETH_P_IP, ETH_P_IPV6,
        FRAG_FIRST, FRAG_LATER, FRAG_NONE, L4,
    },
};

/// "Pass, and let any later program on the hook decide too."
pub const PASS: i32 = TC_ACT_UNSPEC;
const SHOT: i32 = TC_ACT_SHOT as i32;

#[inline(always)]
pub fn run(ctx: &TcContext, dir: Direction) -> i32 {
    // SAFETY: the context pointer is valid for the program's lifetime.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let ep = match ENDPOINTS.get_ptr(ifindex) {
        // SAFETY: a hash map value stays valid while the program runs.
        Some(p) => unsafe { &*p },
        // Not a managed veth (or not configured yet): not ours to police.
        None => return PASS,
    };
    let sc = match SCRATCH.get_ptr_mut(0) {
        // SAFETY: this CPU's slot; TC programs do not nest on one CPU.
        Some(p) => unsafe { &mut *p },
        None => return PASS,
    };
    // Only the event's scalars are set per packet (word stores); its addresses are copied from
    // the parsed packet on the rare paths that emit it (`finish_event`).
    let ev = &mut sc.ev;
    ev.kind = 0;
    ev.reason = 0;
    ev.proto = 0;
    ev.family = 0;
    ev.direction = dir as u8;
    ev.ifindex = ifindex;
    ev.rule = 0;
    ev.sport = 0;
    ev.dport = 0;
    // The local side of every event is the endpoint, even for a packet dropped before its
    // addresses are parsed or looked up (malformed, spoofed).
    let (src, dst) = match dir {
        Direction::Egress => (ep.identity, 0),
        Direction::Ingress => (0, ep.identity),
    };
    ev.src_identity = src;
    ev.dst_identity = dst;
    // Word copies of the fields the parsers need (a whole-struct copy becomes a byte-wise
    // memmove in BPF).
    sc.ep.identity = ep.identity;
    sc.ep.flags = ep.flags;
    sc.ep.ipv4 = ep.ipv4;
    // SAFETY: `Endpoint` is 4-byte aligned and `ipv6` sits at offset 12: four aligned words,
    // written one by one (volatile, so they are not merged back into a byte-wise memcpy).
    unsafe {
        let src = ep.ipv6.as_ptr().cast::<u32>();
        let dst = sc.ep.ipv6.as_mut_ptr().cast::<u32>();
        for i in 0..4 {
            core::ptr::write_volatile(dst.add(i), core::ptr::read(src.add(i)));
        }
    }
    sc.addrs_valid = 0;
    match try_lxc(ctx, ep, dir, sc) {
        Ok(action) => {
            if sc.ev.kind == FlowEvent::KIND_FLOW {
                trace_flow(sc);
            } else if sc.ev.kind == FlowEvent::KIND_AUDIT {
                report_audit(sc);
            }
            action
        }
        Err(reason) => {
            // Not `ExtHeaders`: what more than four extension headers hide may be neighbour
            // discovery, which the host's stack would take (`v6_rest`).
            let parse_error = matches!(reason, DropReason::Malformed | DropReason::UnsupportedL3);
            if parse_error && !ep.enforces_any() {
                return PASS;
            }
            finish_event(sc);
            report_drop(reason, &mut sc.ev);
            SHOT
        }
    }
}

/// Copies the parsed addresses into the event (only for events that are emitted).
#[inline(never)]
fn finish_event(sc: &mut Scratch) -> u32 {
    let ev = &mut sc.ev;
    ev.saddr = [0; 16];
    ev.daddr = [0; 16];
    if sc.addrs_valid == 0 {
        return 0;
    }
    match ev.family {
        4 => {
            ev.saddr[..4].copy_from_slice(&sc.p4.s.0);
            ev.daddr[..4].copy_from_slice(&sc.p4.d.0);
        }
        6 => {
            ev.saddr = sc.p6.s.0;
            ev.daddr = sc.p6.d.0;
        }
        _ => {}
    }
    0
}

#[inline(always)]
fn report_drop(reason: DropReason, ev: &mut FlowEvent) {
    if let Some(c) = DROPS_V2.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU slot, no concurrent writer.
        unsafe { *c += 1 };
    }
    count_endpoint(epdrop::KIND_DROP, reason, ev);
    ev.kind = FlowEvent::KIND_DROP;
    ev.reason = reason as u8;
    emit(ev, CONFIG.get(0).map_or(0, |c| c.event_rate));
}

/// Counts and reports a flow that audit mode let through (`ev.reason`: the drop it would have
/// been).
#[inline(never)]
fn report_audit(sc: &mut Scratch) -> u32 {
    if let Some(c) = AUDITS.get_ptr_mut(sc.ev.reason as u32) {
        // SAFETY: per-CPU slot, no concurrent writer.
        unsafe { *c += 1 };
    }
    let reason = DropReason::from_u8(sc.ev.reason).unwrap_or(DropReason::PolicyDenied);
    count_endpoint(epdrop::KIND_AUDIT, reason, &sc.ev);
    finish_event(sc);
    emit(&sc.ev, CONFIG.get(0).map_or(0, |c| c.event_rate));
    0
}

/// Writes `ev` to `EVENTS` if this CPU's rate limit (`Config::event_rate`) lets it, and counts
/// what it does not let through or what the ring has no room for.
#[inline(always)]
fn emit(ev: &FlowEvent, rate: u32) {
    let Some(st) = EVENT_STATS.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's slot; TC programs do not nest on one CPU.
    let st = unsafe { &mut *st };
    let rate = Config {
        flags: 0,
        event_rate: rate,
    }
    .events_per_sec();
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    if !st.admit(now, rate) {
        st.suppress(ev.kind);
        return;
    }
    if EVENTS.output(*ev, 0).is_err() {
        st.ring_full += 1;
    }
}

/// Counts a drop (`kind`) in `EP_DROPS` under the endpoint, reason and direction of `ev`. Exact:
/// the key's first count creates it with this CPU's slot at 1 and the others at 0 (an insert
/// from a program touches only its own CPU's slot, also when another CPU created the key
/// meanwhile). A full map counts nothing new.
#[inline(never)]
fn count_endpoint(kind: u8, reason: DropReason, ev: &FlowEvent) -> u32 {
    let key = EpDropKey::new(ev.ifindex, reason as u8, ev.direction, kind);
    match EP_DROPS.get_ptr_mut(&key) {
        // SAFETY: this CPU's slot of the value, no concurrent writer.
        Some(c) => unsafe { *c += 1 },
        None => {
            let _ = EP_DROPS.insert(&key, &1u64, 0);
        }
    }
    0
}

/// Emits the `Flow` event of a newly admitted flow when a monitor asked for them.
#[inline(always)]
fn trace_flow(sc: &mut Scratch) {
    if let Some(c) = CONFIG.get(0) {
        if c.flags & Config::TRACE_FLOWS != 0 {
            let rate = c.event_rate;
            finish_event(sc);
            sc.ev.kind = FlowEvent::KIND_FLOW;
            emit(&sc.ev, rate);
        }
    }
}

/// Counts a policy decision of a new flow in `RULE_STATS` (`outcome`: 0 allowed, 1 denied,
/// 2 audited). A BPF function of its own: its key and value stay off the caller's stack.
#[inline(never)]
fn count_rule(rule: u32, identity: u32, dir: u32, outcome: u32) -> u32 {
    let dir = if dir == Direction::Egress as u32 {
        Direction::Egress
    } else {
        Direction::Ingress
    };
    let k = RuleStatsKey::new(rule, identity, dir);
    if let Some(v) = RULE_STATS.get_ptr_mut(&k) {
        // SAFETY: this CPU's value of a per-CPU map, valid while the program runs.
        let v = unsafe { &mut *v };
        match outcome {
            0 => v.allowed += 1,
            1 => v.denied += 1,
            _ => v.audited += 1,
        }
        return 0;
    }
    let v = RuleStats {
        allowed: (outcome == 0) as u64,
        denied: (outcome == 1) as u64,
        audited: (outcome >= 2) as u64,
    };
    // A new key: this CPU's value; the other CPUs' start at zero.
    let _ = RULE_STATS.insert(&k, &v, 0);
    0
}

#[inline(always)]
fn try_lxc(
    ctx: &TcContext,
    ep: &Endpoint,
    dir: Direction,
    sc: &mut Scratch,
) -> Result<i32, DropReason> {
    // SAFETY: the context pointer is valid for the program's lifetime.
    let iif = unsafe { (*ctx.skb.skb).ingress_ifindex };
    match parse::eth_proto(ctx)? {
        ETH_P_IP => {
            if parsed(v4(ctx, sc))? {
                return Ok(PASS);
            }
            decide::<V4>(ep, dir, &mut sc.p4, &mut sc.ev, iif)
        }
        ETH_P_IPV6 => {
            if parsed(v6(ctx, sc))? {
                // Neighbour discovery or MLD: passes without policy if the protocol allows it,
                // and is dropped otherwise. (Called from here, not from `v6`, to keep the BPF
                // call chain's stack within 512 bytes.) To a container, its source is checked
                // first, as every packet's.
                if dir == Direction::Ingress {
                    check_src(&mut sc.p6, iif, &mut sc.ev)?;
                }
                if nd_ok(ctx, sc) == 0 {
                    return Err(DropReason::NeighbourDiscovery);
                }
                return Ok(PASS);
            }
            decide::<V6>(ep, dir, &mut sc.p6, &mut sc.ev, iif)
        }
        ETH_P_ARP => parsed(arp(ctx, sc)).map(|_| PASS),
        ETH_P_8021Q | ETH_P_8021AD => Err(DropReason::VlanTagged),
        _ => Err(DropReason::UnsupportedL3),
    }
}

/// ARP (Ethernet/IPv4, 28 bytes). From a container, the sender protocol address must be the
/// endpoint's own IPv4 address or 0.0.0.0 (an RFC 5227 probe), or it is `Spoofed`: a container
/// cannot claim another's address in the host's or its neighbours' ARP caches. Shorter, or not
/// Ethernet/IPv4, is `Malformed`. ARP to a container passes (its sender's veth checked it).
#[inline(never)]
fn arp(ctx: &TcContext, sc: &mut Scratch) -> u32 {
    if sc.ev.direction != Direction::Egress as u8 {
        return PARSED_PASS;
    }
    let a: parse::ArpHead = match parse::read(ctx, ETH_HLEN) {
        Ok(a) => a,
        Err(_) => return encode(Err(DropReason::Malformed)),
    };
    let b = &a.b;
    if b[0] != 0 || b[1] != 1 || b[2] != 0x08 || b[3] != 0 || b[4] != 6 || b[5] != 4 {
        return encode(Err(DropReason::Malformed));
    }
    let sender = A4([b[14], b[15], b[16], b[17]]);
    if sender == A4([0; 4]) || V4::is_local(&sc.ep, &sender) {
        return PARSED_PASS;
    }
    encode(Err(DropReason::Spoofed))
}

/// An IPv4 address, 4-byte aligned so that copies and compares are single words.
#[repr(C, align(4))]
#[derive(Clone, Copy)]
pub struct A4(pub [u8; 4]);

/// An IPv6 address, 4-byte aligned: copies and compares are four words, not sixteen bytes.
#[repr(C, align(4))]
#[derive(Clone, Copy)]
pub struct A16(pub [u8; 16]);

impl A4 {
    #[inline(always)]
    fn word(&self) -> u32 {
        // SAFETY: 4 bytes, 4-byte aligned.
        unsafe { core::ptr::read(self.0.as_ptr().cast::<u32>()) }
    }
}

impl PartialEq for A4 {
    #[inline(always)]
    fn eq(&self, o: &Self) -> bool {
        self.word() == o.word()
    }
}

impl A16 {
    #[inline(always)]
    fn words(&self) -> [u32; 4] {
        // SAFETY: 16 bytes, 4-byte aligned.
        unsafe { core::ptr::read(self.0.as_ptr().cast::<[u32; 4]>()) }
    }
}

impl PartialEq for A16 {
    #[inline(always)]
    fn eq(&self, o: &Self) -> bool {
        let (a, b) = (self.words(), o.words());
        (a[0] ^ b[0]) | (a[1] ^ b[1]) | (a[2] ^ b[2]) | (a[3] ^ b[3]) == 0
    }
}

/// The parts of conntrack and the ipcache that differ between IPv4 and IPv6.
pub trait Family {
    type Addr: Copy + PartialEq;
    type Key: Copy;
    type FragKey: Copy;
    /// The conntrack key of a packet `s → d` the endpoint sends (`Egress`) or receives: the
    /// same for both directions of a flow.
    fn key(
        s: Self::Addr,
        d: Self::Addr,
        sport: u16,
        dport: u16,
        proto: u8,
        dir: Direction,
    ) -> Self::Key;
    /// A lookup in the established (`est`) or the new table.
    fn get(k: &Self::Key, est: bool) -> Option<*mut CtEntry>;
    fn put(k: &Self::Key, v: &CtEntry, est: bool);
    fn del(k: &Self::Key, est: bool);
    /// The ipcache entry of `a` (a miss is `world`).
    fn remote(a: Self::Addr) -> RemoteInfo;
    fn frag_key(s: Self::Addr, d: Self::Addr, f: &Frag) -> Self::FragKey;
    fn frag_get(k: &Self::FragKey) -> Option<FragL4>;
    fn frag_put(k: &Self::FragKey, v: &FragL4);
    /// Whether `a` is the endpoint's own address of this family.
    fn is_local(ep: &Endpoint, a: &Self::Addr) -> bool;
    /// Whether `a` is a group or link-local address (`addr::v4_group`, `addr::v6_for_anyone`).
    fn for_anyone(a: &Self::Addr) -> bool;
}

pub struct V4;
pub struct V6;

impl Family for V4 {
    type Addr = A4;
    type Key = CtKey4;
    type FragKey = Frag4Key;
    #[inline(always)]
    fn frag_key(s: A4, d: A4, f: &Frag) -> Frag4Key {
        Frag4Key::new(s.0, d.0, f.id as u16, f.proto)
    }
    #[inline(always)]
    fn frag_get(k: &Frag4Key) -> Option<FragL4> {
        // SAFETY: a map value, copied out at once.
        FRAG4.get_ptr(k).map(|v| unsafe { *v })
    }
    #[inline(always)]
    fn frag_put(k: &Frag4Key, v: &FragL4) {
        let _ = FRAG4.insert(k, v, 0);
    }
    #[inline(always)]
    fn key(s: A4, d: A4, sport: u16, dport: u16, proto: u8, dir: Direction) -> CtKey4 {
        CtKey4::of_packet(s.0, d.0, sport, dport, proto, dir)
    }
    #[inline(always)]
    fn get(k: &CtKey4, est: bool) -> Option<*mut CtEntry> {
        if est {
            CT4_V3.get_ptr_mut(k)
        } else {
            CT4_NEW_V3.get_ptr_mut(k)
        }
    }
    #[inline(always)]
    fn put(k: &CtKey4, v: &CtEntry, est: bool) {
        let _ = if est {
            CT4_V3.insert(k, v, 0)
        } else {
            CT4_NEW_V3.insert(k, v, 0)
        };
    }
    #[inline(always)]
    fn del(k: &CtKey4, est: bool) {
        let _ = if est {
            CT4_V3.remove(k)
        } else {
            CT4_NEW_V3.remove(k)
        };
    }
    #[inline(always)]
    fn remote(a: A4) -> RemoteInfo {
        let key = aya_ebpf::maps::lpm_trie::Key::new(32, a.0);
        ipcache::resolve(IPCACHE4_V2.get(&key).copied())
    }
    #[inline(always)]
    fn is_local(ep: &Endpoint, a: &A4) -> bool {
        ep.flags & Endpoint::HAS_IPV4 != 0 && A4(ep.ipv4) == *a
    }
    #[inline(always)]
    fn for_anyone(a: &A4) -> bool {
        addr::v4_group(&a.0)
    }
}

impl Family for V6 {
    type Addr = A16;
    type Key = CtKey6;
    type FragKey = Frag6Key;
    #[inline(always)]
    fn frag_key(s: A16, d: A16, f: &Frag) -> Frag6Key {
        Frag6Key::new(s.0, d.0, f.id, f.proto)
    }
    #[inline(always)]
    fn frag_get(k: &Frag6Key) -> Option<FragL4> {
        // SAFETY: a map value, copied out at once.
        FRAG6.get_ptr(k).map(|v| unsafe { *v })
    }
    #[inline(always)]
    fn frag_put(k: &Frag6Key, v: &FragL4) {
        let _ = FRAG6.insert(k, v, 0);
    }
    #[inline(always)]
    fn key(s: A16, d: A16, sport: u16, dport: u16, proto: u8, dir: Direction) -> CtKey6 {
        CtKey6::of_packet(s.0, d.0, sport, dport, proto, dir)
    }
    #[inline(always)]
    fn get(k: &CtKey6, est: bool) -> Option<*mut CtEntry> {
        if est {
            CT6_V3.get_ptr_mut(k)
        } else {
            CT6_NEW_V3.get_ptr_mut(k)
        }
    }
    #[inline(always)]
    fn put(k: &CtKey6, v: &CtEntry, est: bool) {
        let _ = if est {
            CT6_V3.insert(k, v, 0)
        } else {
            CT6_NEW_V3.insert(k, v, 0)
        };
    }
    #[inline(always)]
    fn del(k: &CtKey6, est: bool) {
        let _ = if est {
            CT6_V3.remove(k)
        } else {
            CT6_NEW_V3.remove(k)
        };
    }
    #[inline(always)]
    fn remote(a: A16) -> RemoteInfo {
        let key = aya_ebpf::maps::lpm_trie::Key::new(128, a.0);
        ipcache::resolve(IPCACHE6_V2.get(&key).copied())
    }
    #[inline(always)]
    fn is_local(ep: &Endpoint, a: &A16) -> bool {
        // SAFETY: `Endpoint` is 4-byte aligned and `ipv6` sits at offset 12.
        let mine = unsafe { core::ptr::read(ep.ipv6.as_ptr().cast::<A16>()) };
        ep.flags & Endpoint::HAS_IPV6 != 0 && mine == *a
    }
    #[inline(always)]
    fn for_anyone(a: &A16) -> bool {
        addr::v6_for_anyone(&a.0)
    }
}

/// Who may use an entry: the endpoint's veth and identity, and for a packet from the remote side
/// (`to_container`) the interface it came in through and its source's ipcache entry (the one
/// the entry recorded, while the ipcache's generation is the one it recorded, else looked up:
/// [`remote_for`]).
#[derive(Clone, Copy)]
struct Owner<'a> {
    ifindex: u32,
    identity: u32,
    /// The endpoint's `Endpoint::flags` (whether it still audits: `CtEntry::audit_lapsed`).
    ep_flags: u32,
    from_remote: Option<(u32, &'a RemoteInfo)>,
}

/// A packet of a flow that audit mode admitted and policy denies now (`ct::Revisit::Deny`):
/// dropped with this reason and rule; `remote`: the remote identity the entry recorded.
#[derive(Clone, Copy)]
struct Revoked {
    reason: DropReason,
    rule: u32,
    remote: u32,
}

/// Decides a lapsed audit entry again (`ct::revisit`; `port`: `ct::flow_port`). Allowed: the
/// entry becomes an ordinary one, returns 0. Denied: the reason (bits 32–39) and the rule
/// (bits 0–31); the entry is left as it is. A BPF function of its own: only packets of entries
/// flagged `CtEntry::AUDIT` call it, and its policy lookups stay off the hot path's code.
#[inline(never)]
fn revisit_audit(e: &mut CtEntry, ep_flags: u32, proto: u32, port: u32) -> u64 {
    match ct::revisit(e, ep_flags, proto as u8, port as u16, policy_get) {
        ct::Revisit::Allow(rule) => {
            e.flags &= !CtEntry::AUDIT;
            e.rule = rule;
            0
        }
        ct::Revisit::Deny(reason, rule) => ((reason as u64) << 32) | rule as u64,
    }
}

/// `found`, the entry of `k` in one table (`est`: the established one) if any: when it is live and
/// serves `o`, applies the packet to it (`ct::update`: flags, lifetime, promotion to the
/// established table). The packet is a reply when `dir` is not the entry's opening side; a
/// SYN-ACK and an echo reply pass only as a reply, an echo request only in the opening
/// direction. An entry whose audit mode lapsed is decided again first
/// ([`revisit_audit`]): `Err` when policy denies the flow now. `slot`: for an entry of the new
/// table, the established table's entry of the same key, if the lookup found one; a promotion
/// writes itself into it when it is expired or dead ([`promote_into`]) instead of inserting.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn ct_hit<F: Family>(
    k: &F::Key,
    found: Option<*mut CtEntry>,
    now: u64,
    l: &L4,
    dir: Direction,
    est: bool,
    o: Owner<'_>,
    slot: Option<*mut CtEntry>,
) -> Result<bool, Revoked> {
    let Some(e) = found else {
        return Ok(false);
    };
    // SAFETY: pointer from a map lookup, valid while the program runs.
    let e = unsafe { &mut *e };
    if e.expires_ns < now || !e.serves(o.ifindex, o.identity, o.from_remote) {
        return Ok(false);
    }
    let reply = e.is_reply(dir);
    // Only entries flagged AUDIT take this branch (the flags are read for `ct::update` anyway).
    if e.audit_lapsed(o.ep_flags) {
        let port = ct::flow_port(l.proto, l.sport, l.dport, reply);
        let code = revisit_audit(e, o.ep_flags, l.proto as u32, port as u32);
        if code != 0 {
            e.expires_ns = ct::revoked_expiry(now, l.proto, e.flags, est);
            return Err(Revoked {
                reason: DropReason::from_u8((code >> 32) as u8).unwrap_or(DropReason::PolicyDenied),
                rule: code as u32,
                remote: e.remote_identity,
            });
        }
    }
    let (request, answer) = (l.kind == Kind::EchoRequest, l.kind == Kind::EchoReply);
    if !ct::passes_this_way(l.proto, l.tcp_flags, request, answer, reply) {
        return Ok(false);
    }
    let u = ct::update(e, now, l.proto, l.tcp_flags, reply, est);
    if u.promote {
        // Written in place and copied from the map value (no 40-byte copy on the stack).
        e.flags = u.flags;
        e.expires_ns = u.expires_ns;
        match slot {
            // SAFETY: pointer from a map lookup, valid while the program runs.
            Some(old) if unsafe { (*old).expires_ns } < now && ct_in_place() => {
                promote_into(unsafe { &mut *old }, e)
            }
            _ => F::put(k, e, true),
        }
        // Deleted, not left expired: cheaper in prog_cost, but with real traffic the new
        // table then stays full and every insert pays LRU eviction.
        F::del(k, false);
        return Ok(true);
    }
    if u.flags != e.flags {
        e.flags = u.flags;
    }
    // Only write when it moves back, or forward by more than a second: fewer dirty cache lines
    // per packet.
    if u.expires_ns < e.expires_ns || u.expires_ns > e.expires_ns + 1_000_000_000 {
        e.expires_ns = u.expires_ns;
    }
    Ok(true)
}

/// Whether the packet `s → d` belongs to a flow already admitted on this endpoint (`Err`: to one
/// that audit mode admitted and policy denies now). The caller has ruled out a bare SYN (it
/// opens a flow).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn established<F: Family>(
    s: F::Addr,
    d: F::Addr,
    sport: u16,
    dport: u16,
    l: &L4,
    dir: Direction,
    now: u64,
    o: Owner<'_>,
    mut src: Option<&mut Pkt<F>>,
    iif: u32,
) -> Result<bool, Revoked> {
    // One key for both directions; established flows first: their packets, replies included,
    // cost one lookup. A SYN-ACK finds its flow in the new table (`ct::new_table_first`).
    let k = F::key(s, d, sport, dport, l.proto, dir);
    if ct::new_table_first(l.proto, l.tcp_flags) {
        // A SYN-ACK, which is never promoted.
        let new = F::get(&k, false);
        let r = remote_for::<F>(new, &mut src, iif, o.ifindex, now)?;
        if ct_hit::<F>(&k, new, now, l, dir, false, o.with(&r), None)? {
            return Ok(true);
        }
        let est = F::get(&k, true);
        let r = remote_for::<F>(est, &mut src, iif, o.ifindex, now)?;
        return ct_hit::<F>(&k, est, now, l, dir, true, o.with(&r), None);
    }
    let est = F::get(&k, true);
    let r = remote_for::<F>(est, &mut src, iif, o.ifindex, now)?;
    if ct_hit::<F>(&k, est, now, l, dir, true, o.with(&r), None)? {
        return Ok(true);
    }
    // The established entry this lookup found, if the flow's promotion can reuse it.
    let new = F::get(&k, false);
    let r = remote_for::<F>(new, &mut src, iif, o.ifindex, now)?;
    ct_hit::<F>(&k, new, now, l, dir, false, o.with(&r), est)
}

impl<'a> Owner<'a> {
    /// This owner, for a packet from the remote side whose source is `r` (`None`: the endpoint
    /// sent it).
    #[inline(always)]
    fn with<'b>(self, r: &'b Option<(u32, RemoteInfo)>) -> Owner<'b>
    where
        'a: 'b,
    {
        Owner {
            from_remote: r.as_ref().map(|(iif, info)| (*iif, info)),
            ..self
        }
    }
}

/// The remote side that conntrack entry `found` (if any) is checked against, for a packet
/// `to_container` delivers (`src`; `None` for one the endpoint sent): the remote's entry as
/// `found` recorded it while the ipcache is still in the generation it recorded
/// (`CtEntry::gen_current`: the same entry the ipcache holds, without a lookup), else the
/// source's ipcache entry (looked up once per packet), after which `found` records this
/// generation if it is live at `now` and holds an entry that checks alike
/// (`RemoteInfo::checks_as`). Either is checked for spoofing first: `Err` with `Spoofed`.
///
/// Only a live entry records it: an expired or killed one may be turned into another flow's
/// entry in place at any moment (`promote_into`, on another CPU), and a generation stamped
/// after that, checked against the old flow's fields, would vouch for the new flow's. The
/// expiry is read first; `promote_into` writes it last.
#[inline(always)]
fn remote_for<F: Family>(
    found: Option<*mut CtEntry>,
    src: &mut Option<&mut Pkt<F>>,
    iif: u32,
    own: u32,
    now: u64,
) -> Result<Option<(u32, RemoteInfo)>, Revoked> {
    let Some(p) = src else {
        return Ok(None);
    };
    let Some(e) = found else {
        // Nothing to check against: the source is checked when it is needed.
        return Ok(Some((iif, RemoteInfo::new(identity::ANY))));
    };
    // SAFETY: pointer from a map lookup, valid while the program runs.
    let e = unsafe { &mut *e };
    if p.remote_known == 0 && e.gen_current(p.gen) {
        let r = e.recorded_remote();
        if r.spoofed(iif, own) {
            return Err(spoofed(r.identity));
        }
        return Ok(Some((iif, r)));
    }
    let r = src_remote::<F>(p, iif, own).map_err(|_| spoofed(p.remote.identity))?;
    // SAFETY: a volatile read of the map value's expiry, before its other fields.
    let live = unsafe { core::ptr::read_volatile(&e.expires_ns) } >= now;
    if live && !e.gen_current(p.gen) && e.recorded_remote().checks_as(&r) {
        e.set_gen(p.gen);
    }
    Ok(Some((iif, r)))
}

/// A `Spoofed` drop found by conntrack's check of the source ([`remote_for`]).
#[inline(always)]
fn spoofed(identity: u32) -> Revoked {
    Revoked {
        reason: DropReason::Spoofed,
        rule: 0,
        remote: identity,
    }
}

/// `to_container`: the ipcache entry of `p`'s source, looked up now unless this packet already
/// did; `Err(Spoofed)` when the packet came in through an interface that entry does not allow
/// (`RemoteInfo::spoofed`; `own`: the endpoint's veth).
#[inline(always)]
fn src_remote<F: Family>(p: &mut Pkt<F>, iif: u32, own: u32) -> Result<RemoteInfo, DropReason> {
    if p.remote_known == 0 {
        p.remote = F::remote(p.s);
        p.remote_known = 1;
    }
    if p.remote.spoofed(iif, own) {
        return Err(DropReason::Spoofed);
    }
    Ok(p.remote)
}

/// [`src_remote`] where the packet's drop event is written: a spoofed one reports what it does
/// when the parser drops it (the source's identity, the fixed header's protocol, no ports).
#[inline(always)]
fn check_src<F: Family>(p: &mut Pkt<F>, iif: u32, ev: &mut FlowEvent) -> Result<(), DropReason> {
    match src_remote::<F>(p, iif, ev.ifindex) {
        Ok(_) => Ok(()),
        Err(e) => {
            spoof_event(ev, p.remote.identity, p.proto0);
            Err(e)
        }
    }
}

/// The event of a `Spoofed` drop: as the fixed header's check reports it.
#[inline(always)]
fn spoof_event(ev: &mut FlowEvent, identity: u32, proto0: u8) {
    ev.src_identity = identity;
    ev.proto = proto0;
    ev.sport = 0;
    ev.dport = 0;
}

/// Whether conntrack may give an entry to another flow in place (`Config::CT_IN_PLACE`: the
/// agent sets it on x86 alone). Read only where a SYN reopens a tuple and where a flow is
/// promoted over an expired or killed entry, never per packet of a flow.
#[inline(always)]
fn ct_in_place() -> bool {
    CONFIG
        .get(0)
        .is_some_and(|c| c.flags & Config::CT_IN_PLACE != 0)
}

/// Promotes new-table entry `e` into `old`, the established table's entry of the same key, which
/// has expired or is dead (a SYN reopened its tuple: `CtEntry::kill`): the same result as
/// inserting `e` over it, without the LRU's allocation of a new element and free of the old one
/// (with the SYN's `kill` instead of a delete, a reopened tuple costs no LRU work at all). Only
/// with `Config::CT_IN_PLACE` ([`ct_in_place`]).
///
/// A concurrent reader treats `old` as absent until its expiry is written, which comes last,
/// after a compiler fence (volatile stores, in this order; on x86 stores become visible in
/// program order, and loads are not reordered with other loads). A weakly ordered CPU (arm64)
/// gives neither: a reader there could see the new expiry with the previous flow's flags
/// (`AUDIT` lost, closing bits), rule or identities, so the agent leaves the flag off there and
/// the promotion inserts (the map update publishes a whole element).
#[inline(always)]
fn promote_into(old: &mut CtEntry, e: &CtEntry) {
    // SAFETY: both are 8-byte aligned 40-byte `CtEntry`s: the expiry (words 0-1), then eight
    // 4-byte words of fields.
    unsafe {
        let src = (e as *const CtEntry).cast::<u32>();
        let dst = (old as *mut CtEntry).cast::<u32>();
        for i in 2..10 {
            core::ptr::write_volatile(dst.add(i), core::ptr::read(src.add(i)));
        }
        core::sync::atomic::compiler_fence(core::sync::atomic::Ordering::Release);
        core::ptr::write_volatile(&mut old.expires_ns, e.expires_ns);
    }
}

/// Whether an entry for `k` exists in either table, has not expired, belongs to this endpoint and
/// is not a lapsed audit entry, without touching it.
#[inline(always)]
fn ct_live<F: Family>(k: &F::Key, now: u64, o: Owner<'_>) -> bool {
    for est in [true, false] {
        if let Some(e) = F::get(k, est) {
            // SAFETY: pointer from a map lookup, valid while the program runs.
            let e = unsafe { &*e };
            if e.expires_ns >= now
                && e.serves(o.ifindex, o.identity, None)
                && !e.audit_lapsed(o.ep_flags)
            {
                return true;
            }
        }
    }
    false
}

/// Whether the packet `s → d` would belong to a flow admitted on this endpoint. Used for the
/// packet embedded in an ICMP error: the error is related to that flow, but it is not a packet
/// of it, so it neither refreshes the entry nor marks it answered. (The error comes from a router
/// or the peer: the flow's remote interfaces are not checked; the error's own source was, in
/// step 2.)
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn related<F: Family>(
    s: F::Addr,
    d: F::Addr,
    sport: u16,
    dport: u16,
    proto: u8,
    dir: Direction,
    now: u64,
    o: Owner<'_>,
) -> bool {
    ct_live::<F>(&F::key(s, d, sport, dport, proto, dir), now, o)
}

/// Per-CPU working memory: the event being built and the parsed packet. Kept out of the 512-byte
/// BPF stack, which an IPv6 tuple, its conntrack keys and an event would overflow.
#[repr(C)]
pub struct Scratch {
    /// A copy of the endpoint, so the parsers take two arguments.
    ep: Endpoint,
    /// The parsed packet's addresses are valid (for events).
    addrs_valid: u32,
    ev: FlowEvent,
    p4: Pkt<V4>,
    p6: Pkt<V6>,
}

/// A parsed packet: addresses, L4, and for an ICMP error the embedded packet.
#[repr(C, align(8))]
pub struct Pkt<F: Family> {
    s: F::Addr,
    d: F::Addr,
    l: L4,
    /// The end of the packet as its IP length claims it (IPv6; for the ND checks).
    end: u32,
    /// IPv6 hop limit (for the ND checks).
    hop_limit: u8,
    /// Where the packet sits in a fragmented datagram.
    frag: Frag,
    /// `to_container`: the source's ipcache entry, valid when `remote_known` is 1; looked up
    /// only when something needs it ([`src_remote`]): not for a packet of an established flow
    /// whose conntrack entry recorded it in the ipcache's current generation ([`remote_for`]).
    remote: RemoteInfo,
    remote_known: u32,
    /// `IPCACHE_GEN` as the parser read it, before any ipcache lookup of this packet.
    gen: u32,
    /// The fixed header's protocol (IPv6: next header), for a `Spoofed` drop's event.
    proto0: u8,
    /// Valid when `l.kind == Kind::IcmpError`; zeroed otherwise (never an uninitialised
    /// `Option` payload: the verifier rejects copies of undefined stack bytes).
    inner: Inner<F>,
}

#[repr(C, align(4))]
pub struct Inner<F: Family> {
    s: F::Addr,
    d: F::Addr,
    proto: u8,
    sport: u16,
    dport: u16,
}

/// The L4 view a first fragment records for the later ones; `None` for what is never recorded.
#[inline(always)]
fn frag_record(l: &L4) -> Option<FragL4> {
    let kind = match l.kind {
        Kind::Ports => FragL4::PORTS,
        Kind::EchoRequest => FragL4::ECHO_REQUEST,
        Kind::EchoReply => FragL4::ECHO_REPLY,
        Kind::IcmpOther => FragL4::ICMP_OTHER,
        Kind::Other => FragL4::OTHER,
        Kind::IcmpError | Kind::Neighbour | Kind::Fragment => return None,
    };
    Some(FragL4::new(kind, l.sport, l.dport, l.icmp_type))
}

/// Fragments around [`verdict`]: a later fragment takes its datagram's recorded L4 view (or is
/// dropped on an enforced direction without one); a first fragment that passes records its own.
#[inline(always)]
fn decide<F: Family>(
    ep: &Endpoint,
    dir: Direction,
    p: &mut Pkt<F>,
    ev: &mut FlowEvent,
    iif: u32,
) -> Result<i32, DropReason> {
    if dir == Direction::Ingress && p.frag.pos != FRAG_NONE {
        // A fragment's source is checked before its datagram's record is looked at.
        check_src(p, iif, ev)?;
    }
    let mut l = p.l;
    if p.frag.pos == FRAG_LATER {
        let Some(r) = F::frag_get(&F::frag_key(p.s, p.d, &p.frag)) else {
            if ep.enforces(dir) {
                remote_identity::<F>(ep, dir, p, ev, iif)?;
                return Err(DropReason::Fragment);
            }
            return Ok(PASS);
        };
        l.kind = match r.kind {
            FragL4::PORTS => Kind::Ports,
            FragL4::ECHO_REQUEST => Kind::EchoRequest,
            FragL4::ECHO_REPLY => Kind::EchoReply,
            FragL4::ICMP_OTHER => Kind::IcmpOther,
            _ => Kind::Other,
        };
        l.sport = r.sport();
        l.dport = r.dport();
        l.icmp_type = r.icmp_type;
        l.tcp_flags = 0;
        event_ports(ev, &l);
    }
    let action = verdict::<F>(ep, dir, p, &l, ev, iif)?;
    if p.frag.pos == FRAG_FIRST {
        if let Some(r) = frag_record(&l) {
            F::frag_put(&F::frag_key(p.s, p.d, &p.frag), &r);
        }
    }
    Ok(action)
}

/// Policy and conntrack for one parsed packet of either family, with L4 view `l`.
#[inline(always)]
fn verdict<F: Family>(
    ep: &Endpoint,
    dir: Direction,
    p: &mut Pkt<F>,
    l: &L4,
    ev: &mut FlowEvent,
    iif: u32,
) -> Result<i32, DropReason> {
    let (s, d) = (p.s, p.d);
    let enforced = ep.enforces(dir);
    // Conntrack has no endpoint in its keys: an entry is the endpoint's because its local
    // address is. `from_container` has checked the source already; `to_container` must not
    // create or use entries for a packet addressed to someone else (a bridge floods frames for
    // an unlearnt MAC to every port, and a peer can address another container's IP to this
    // container's MAC), or one container's traffic would open another's ingress.
    let local = match dir {
        Direction::Egress => true,
        Direction::Ingress => F::is_local(ep, &d),
    };
    // Conntrack's clock: CLOCK_MONOTONIC_COARSE (the last tick's time, up to one tick behind
    // `bpf_ktime_get_ns`, same time base). Lifetimes are seconds, so a tick's granularity
    // changes nothing they decide, and it costs no clocksource read: `bpf_ktime_get_ns` reads
    // the TSC, ~9% of both programs' time in a connection-rate run on these VMs (perf).
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let owner = Owner {
        ifindex: ev.ifindex,
        identity: ep.identity,
        ep_flags: ep.flags,
        // Per entry in `established` (`remote_for`); `related` checks no remote.
        from_remote: None,
    };
    let opens = ct::opens_flow(l.proto, l.tcp_flags);
    let may_be_established =
        local && !opens && l.kind != Kind::IcmpError && l.kind != Kind::IcmpOther;
    if dir == Direction::Ingress && !may_be_established {
        // What no conntrack entry can vouch for has its source checked before anything else.
        check_src(p, iif, ev)?;
    }
    if may_be_established {
        let src = match dir {
            Direction::Egress => None,
            Direction::Ingress => Some(&mut *p),
        };
        match established::<F>(s, d, l.sport, l.dport, l, dir, now, owner, src, iif) {
            Ok(true) => return Ok(PASS),
            Ok(false) => {}
            Err(r) => {
                // A flow that audit mode admitted and policy now denies, or a spoofed source.
                let (src, dst) = match dir {
                    Direction::Egress => (ep.identity, r.remote),
                    Direction::Ingress => (r.remote, ep.identity),
                };
                ev.src_identity = src;
                ev.dst_identity = dst;
                ev.rule = r.rule;
                if r.reason == DropReason::Spoofed {
                    spoof_event(ev, r.remote, p.proto0);
                }
                return Err(r.reason);
            }
        }
    }
    if local && l.kind == Kind::IcmpError {
        // An error about the embedded packet, which travelled the other way between the same
        // two hosts: related when the reversed packet belongs to a flow of this endpoint.
        let i = &p.inner;
        let ours = match dir {
            Direction::Egress => i.d == s,
            Direction::Ingress => i.s == d,
        };
        if ours && related::<F>(i.d, i.s, i.dport, i.sport, i.proto, dir, now, owner) {
            return Ok(PASS);
        }
    }

    let info = remote_identity::<F>(ep, dir, p, ev, iif)?;
    let remote = info.identity;

    let port = match l.kind {
        Kind::Ports => l.dport,
        Kind::Other => 0,
        _ => l.icmp_type as u16,
    };
    let mut rule = 0;
    // The drop that audit mode turned into a report (0: none).
    let mut audited = 0u8;
    if enforced {
        let (r, drop) = match policy::lookup(ep.identity, remote, dir, l.proto, port, policy_get) {
            Verdict::Allow(r) => (r, None),
            Verdict::Deny(r) => (r, Some(DropReason::PolicyDeny)),
            Verdict::NoMatch => (0, Some(DropReason::PolicyDenied)),
        };
        rule = r;
        match drop {
            None => {
                count_rule(r, ep.identity, dir as u32, 0);
            }
            Some(reason) => {
                if !ep.audits(dir) {
                    count_rule(r, ep.identity, dir as u32, 1);
                    ev.rule = r;
                    return Err(reason);
                }
                count_rule(r, ep.identity, dir as u32, 2);
                audited = reason as u8;
            }
        }
    }
    ev.rule = rule;

    // Track what can have replies, so they pass the other direction's enforcement.
    let track = local && matches!(l.kind, Kind::Ports | Kind::EchoRequest | Kind::Other);
    if track {
        let k = F::key(s, d, l.sport, l.dport, l.proto, dir);
        // A new flow starts in the new table; a SYN that reopens a tuple ends the established
        // entry it may have left: where `Config::CT_IN_PLACE` allows it, killed in place
        // (`CtEntry::kill`: expired for every reader), not deleted, so that the flow's promotion
        // reuses it (`promote_into`) and a tuple reopened costs no LRU free and allocation;
        // otherwise deleted (the promotion then inserts).
        if opens {
            if let Some(old) = F::get(&k, true) {
                if ct_in_place() {
                    // SAFETY: pointer from a map lookup, valid while the program runs.
                    unsafe { (*old).kill() };
                } else {
                    F::del(&k, true);
                }
            }
        }
        let mut e = CtEntry::new(
            now,
            l.proto,
            rule,
            ev.ifindex,
            ep.identity,
            &info,
            CtDir::of(dir),
        );
        if audited != 0 {
            e.flags = CtEntry::AUDIT;
        }
        // `info` was looked up by this packet, after it read the generation.
        e.set_gen(p.gen);
        F::put(&k, &e, false);
    }
    if audited != 0 {
        // `run` counts and reports it, whether or not flows are traced.
        ev.kind = FlowEvent::KIND_AUDIT;
        ev.reason = audited;
        return Ok(PASS);
    }
    // A new flow was admitted: `run` emits its event if flows are traced.
    ev.kind = FlowEvent::KIND_FLOW;
    Ok(PASS)
}

/// The longest `POLICY` match of a full-prefix key.
#[inline(always)]
fn policy_get(k: &policy::PolicyKey) -> Option<policy::PolicyValue> {
    POLICY
        .get(&aya_ebpf::maps::lpm_trie::Key::new(policy::FULL_PREFIX, *k))
        .copied()
}

/// The remote side of `p` (`from_container`: its destination, looked up in the ipcache;
/// `to_container`: its source, looked up unless this packet already did, and checked for
/// spoofing: [`check_src`]) with both identities written into the event.
#[inline(always)]
fn remote_identity<F: Family>(
    ep: &Endpoint,
    dir: Direction,
    p: &mut Pkt<F>,
    ev: &mut FlowEvent,
    iif: u32,
) -> Result<RemoteInfo, DropReason> {
    match dir {
        Direction::Egress => {
            // A group or link-local destination is no one receiver the ipcache can name: the
            // bridge delivers it to every container on it and the host. Only what policy allows
            // towards everyone (remote `ANY`) and denies towards no one may be sent there
            // (`identity::GROUP`).
            let remote = if F::for_anyone(&p.d) {
                RemoteInfo::new(identity::GROUP)
            } else {
                F::remote(p.d)
            };
            ev.src_identity = ep.identity;
            ev.dst_identity = remote.identity;
            Ok(remote)
        }
        Direction::Ingress => {
            check_src(p, iif, ev)?;
            let remote = p.remote;
            ev.src_identity = remote.identity;
            ev.dst_identity = ep.identity;
            Ok(remote)
        }
    }
}

/// The parsers are separate BPF functions (their own stack frames) and return a plain integer:
/// BPF calls take at most five register arguments and cannot return aggregates.
const PARSED_CONTINUE: u32 = 0;
const PARSED_PASS: u32 = 1;
const PARSED_DROP: u32 = 0x100;

#[inline(always)]
fn encode(r: Result<bool, DropReason>) -> u32 {
    match r {
        Ok(false) => PARSED_CONTINUE,
        Ok(true) => PARSED_PASS,
        Err(reason) => PARSED_DROP | reason as u32,
    }
}

/// `Ok(true)`: the packet passes without policy (IPv6: if it is valid neighbour discovery);
/// `Ok(false)`: go on to conntrack and policy.
#[inline(always)]
fn parsed(code: u32) -> Result<bool, DropReason> {
    match code {
        PARSED_CONTINUE => Ok(false),
        PARSED_PASS => Ok(true),
        c => Err(DropReason::from_u8((c & 0xff) as u8).unwrap_or(DropReason::Malformed)),
    }
}

#[inline(never)]
fn v4(ctx: &TcContext, sc: &mut Scratch) -> u32 {
    let dir = if sc.ev.direction == Direction::Egress as u8 {
        Direction::Egress
    } else {
        Direction::Ingress
    };
    encode(parse_v4(
        ctx,
        &sc.ep,
        dir,
        &mut sc.ev,
        &mut sc.p4,
        &mut sc.addrs_valid,
    ))
}

#[inline(never)]
fn v6(ctx: &TcContext, sc: &mut Scratch) -> u32 {
    let dir = if sc.ev.direction == Direction::Egress as u8 {
        Direction::Egress
    } else {
        Direction::Ingress
    };
    encode(parse_v6(
        ctx,
        &sc.ep,
        dir,
        &mut sc.ev,
        &mut sc.p6,
        &mut sc.addrs_valid,
    ))
}

/// Bytes of the packet after the Ethernet header (trailing padding included).
#[inline(always)]
fn l3_len(ctx: &TcContext) -> u32 {
    ctx.len().saturating_sub(ETH_HLEN as u32)
}

/// Sets the event's ports from the L4 header. Echo: the identifier goes in sport whichever way
/// the echo goes; ICMP: dport is the type.
#[inline(always)]
fn event_ports(ev: &mut FlowEvent, l: &L4) {
    ev.sport = if l.kind == Kind::EchoReply {
        l.dport
    } else {
        l.sport
    };
    ev.dport = if l.kind == Kind::Ports {
        l.dport
    } else {
        l.icmp_type as u16
    };
}

/// `IPCACHE_GEN`: the ipcache's generation (0 if unreadable: no conntrack entry matches it). A
/// plain load, ordered before the packet's ipcache lookups by x86 alone (netpol-common's
/// `ipcache` says what a weakly ordered CPU can get).
#[inline(always)]
fn ipcache_gen() -> u32 {
    IPCACHE_GEN.get(0).copied().unwrap_or(0)
}

/// Parses an IPv4 packet into `p`. `Ok(true)`: passes without policy (never, for IPv4).
///
/// Order: the fixed header's addresses (anti-spoofing from a container; a unicast destination
/// that is not the endpoint's to it), then the header's own consistency and lengths, then L4,
/// then for an ICMP error the quoted packet and whether the error is tied to it.
#[inline(always)]
fn parse_v4(
    ctx: &TcContext,
    ep: &Endpoint,
    dir: Direction,
    ev: &mut FlowEvent,
    p: &mut Pkt<V4>,
    valid: &mut u32,
) -> Result<bool, DropReason> {
    // Before any ipcache lookup of the packet (netpol-common's `ipcache`).
    p.gen = ipcache_gen();
    p.remote_known = 0;
    let ip = parse::ipv4_load(ctx, ETH_HLEN)?;
    p.s = A4(ip.saddr);
    p.d = A4(ip.daddr);
    p.proto0 = ip.proto;
    ev.family = 4;
    ev.proto = ip.proto;
    *valid = 1;
    match dir {
        Direction::Egress => {
            if !V4::is_local(ep, &p.s) {
                return Err(DropReason::Spoofed);
            }
        }
        Direction::Ingress => {
            if !V4::is_local(ep, &p.d) && !addr::v4_group(&p.d.0) {
                return Err(DropReason::NotForEndpoint);
            }
        }
    }
    let r = v4_rest(ctx, ep, dir, ev, p, &ip);
    if r.is_err() && dir == Direction::Ingress {
        // A spoofed source is `Spoofed`, whatever else is wrong with the packet.
        // SAFETY: the context pointer is valid for the program's lifetime.
        let iif = unsafe { (*ctx.skb.skb).ingress_ifindex };
        check_src(p, iif, ev)?;
    }
    r
}

/// [`parse_v4`] after the fixed header's addresses.
#[inline(always)]
fn v4_rest(
    ctx: &TcContext,
    ep: &Endpoint,
    dir: Direction,
    ev: &mut FlowEvent,
    p: &mut Pkt<V4>,
    ip: &parse::Ipv4Hdr,
) -> Result<bool, DropReason> {
    let (l4off, end, frag) = parse::ipv4_check(ctx, ip, ETH_HLEN)?;
    p.frag = parse::ipv4_frag(ip);
    p.l = parse::l4(ctx, ip.proto, l4off, end, frag)?;
    event_ports(ev, &p.l);
    if p.l.kind == Kind::IcmpError {
        let (iip, ioff) = parse::ipv4_quoted(ctx, p.l.off + 8, end)?;
        let (sp, dp) = parse::inner_ports(ctx, iip.proto, ioff, end)?;
        p.inner = Inner {
            s: A4(iip.saddr),
            d: A4(iip.daddr),
            proto: iip.proto,
            sport: sp,
            dport: dp,
        };
        let e = icmp::ErrorMsg {
            outbound: dir == Direction::Egress,
            v6: false,
            ty: p.l.icmp_type,
            code: p.l.icmp_code,
            len: l3_len(ctx),
            local: dir == Direction::Egress || V4::is_local(ep, &p.d),
            src_is_quoted_dst: p.inner.d == p.s,
            dst_is_quoted_src: p.inner.s == p.d,
        };
        if !icmp::tied(&e) {
            // Not an error of one of this endpoint's flows: a new ICMP message for policy.
            p.l.kind = Kind::IcmpOther;
        }
    }
    Ok(false)
}

/// Parses an IPv6 packet into `p`. `Ok(true)`: neighbour discovery or MLD, which [`nd_ok`]
/// decides without policy.
///
/// Order: the fixed header's addresses (from a container: its own source, or a link-local or
/// unspecified one that only valid ND/MLD may carry — anything else with it, a parse error
/// included, is `Spoofed`; to a container: its own, a multicast or a link-local destination),
/// then the payload length, extension headers and L4, then for an ICMPv6 error the quoted
/// packet and whether the error is tied to it.
#[inline(always)]
fn parse_v6(
    ctx: &TcContext,
    ep: &Endpoint,
    dir: Direction,
    ev: &mut FlowEvent,
    p: &mut Pkt<V6>,
    valid: &mut u32,
) -> Result<bool, DropReason> {
    ev.family = 6;
    // Before any ipcache lookup of the packet (netpol-common's `ipcache`).
    p.gen = ipcache_gen();
    p.remote_known = 0;
    let head = parse::ipv6_load(ctx, ETH_HLEN, &mut p.s.0, &mut p.d.0)?;
    *valid = 1;
    ev.proto = head[6];
    p.proto0 = head[6];
    p.hop_limit = head[7];
    let mut nd_only = false;
    match dir {
        Direction::Egress => {
            if !V6::is_local(ep, &p.s) {
                if !addr::v6_link_local(&p.s.0) && !addr::v6_unspecified(&p.s.0) {
                    return Err(DropReason::Spoofed);
                }
                nd_only = true;
            }
        }
        Direction::Ingress => {
            if !V6::is_local(ep, &p.d) && !addr::v6_for_anyone(&p.d.0) {
                return Err(DropReason::NotForEndpoint);
            }
        }
    }
    let r = v6_rest(ctx, ep, dir, ev, p, &head, nd_only);
    if r.is_err() && dir == Direction::Ingress {
        // A spoofed source is `Spoofed`, whatever else is wrong with the packet.
        // SAFETY: the context pointer is valid for the program's lifetime.
        let iif = unsafe { (*ctx.skb.skb).ingress_ifindex };
        check_src(p, iif, ev)?;
    }
    r
}

/// [`parse_v6`] after the fixed header's addresses.
#[inline(always)]
fn v6_rest(
    ctx: &TcContext,
    ep: &Endpoint,
    dir: Direction,
    ev: &mut FlowEvent,
    p: &mut Pkt<V6>,
    head: &[u8; 8],
    nd_only: bool,
) -> Result<bool, DropReason> {
    let end = match v6_l4(ctx, head, p) {
        Ok(end) => end,
        Err(_) if nd_only => return Err(DropReason::Spoofed),
        Err(DropReason::Malformed) => return Err(parsed_reason(nd_malformed(ctx, head[6]))),
        Err(e) => return Err(e),
    };
    p.end = end as u32;
    ev.proto = p.l.proto;
    if p.l.kind == Kind::Neighbour {
        // Shorter than its type's fixed fields: truncated, dropped on every endpoint as `nd_ok`
        // drops what fails the other rules (checked here: `nd_ok`'s stack has no room left).
        if !nd::complete(p.l.icmp_type, (end - p.l.off) as u32) {
            return Err(DropReason::NeighbourDiscovery);
        }
        return Ok(true);
    }
    if nd_only {
        return Err(DropReason::Spoofed);
    }
    event_ports(ev, &p.l);
    if p.l.kind == Kind::IcmpError {
        let i = &mut p.inner;
        let (iproto, ioff) = parse::ipv6_quoted(ctx, p.l.off + 8, &mut i.s.0, &mut i.d.0)?;
        let (sp, dp) = parse::inner_ports(ctx, iproto, ioff, end)?;
        i.proto = iproto;
        i.sport = sp;
        i.dport = dp;
        let e = icmp::ErrorMsg {
            outbound: dir == Direction::Egress,
            v6: true,
            ty: p.l.icmp_type,
            code: p.l.icmp_code,
            len: l3_len(ctx),
            local: dir == Direction::Egress || V6::is_local(ep, &p.d),
            src_is_quoted_dst: p.inner.d == p.s,
            dst_is_quoted_src: p.inner.s == p.d,
        };
        if !icmp::tied(&e) {
            // Not an error of one of this endpoint's flows: a new ICMP message for policy.
            p.l.kind = Kind::IcmpOther;
        }
    }
    Ok(false)
}

/// The payload length, extension headers and L4 header of an IPv6 packet: the packet's claimed
/// end.
#[inline(always)]
fn v6_l4(ctx: &TcContext, head: &[u8; 8], p: &mut Pkt<V6>) -> Result<usize, DropReason> {
    let end = parse::ipv6_check(ctx, head, ETH_HLEN)?;
    let (nexthdr, l4off, frag) = parse::ipv6_ext(ctx, head[6], ETH_HLEN + 40)?;
    p.frag = frag;
    p.l = parse::l4(ctx, nexthdr, l4off, end, frag.pos == FRAG_LATER)?;
    Ok(end)
}

/// The drop reason of an IPv6 packet whose headers failed to parse (`Malformed`; `next`: the
/// fixed header's next header) on every endpoint, enforced or not, if it may be neighbour
/// discovery or MLD all the same: `NeighbourDiscovery` when its extension headers, walked
/// through the packet's bytes whatever its lengths claim, lead to ICMPv6 with an ND/MLD type
/// (`nd::is_nd_or_mld`), `ExtHeaders` when there are more than four; `Malformed` otherwise (which
/// passes on an unenforced endpoint: no ND message can be behind it). Only the error path calls
/// it.
#[inline(never)]
fn nd_malformed(ctx: &TcContext, next: u8) -> u32 {
    let r = match parse::ipv6_ext(ctx, next, ETH_HLEN + 40) {
        // The type byte through `bpf_skb_load_bytes` (a rare path; a 1-byte direct read's
        // bounds check is one the verifier does not follow once compiled).
        Ok((proto::ICMPV6, off, f)) if f.pos != FRAG_LATER => match ctx.load::<u8>(off) {
            Ok(t) if nd::is_nd_or_mld(t) => DropReason::NeighbourDiscovery,
            _ => DropReason::Malformed,
        },
        Ok(_) => DropReason::Malformed,
        Err(e) => e,
    };
    r as u32
}

/// A drop reason returned as an integer by a BPF function.
#[inline(always)]
fn parsed_reason(code: u32) -> DropReason {
    DropReason::from_u8(code as u8).unwrap_or(DropReason::Malformed)
}

/// Whether the neighbour discovery or MLD message in `sc.p6` passes (netpol-common's `nd`
/// module has the rules): 1 if it does, 0 if not.
#[inline(never)]
fn nd_ok(ctx: &TcContext, sc: &Scratch) -> u32 {
    let p = &sc.p6;
    let ep = &sc.ep;
    let from_container = sc.ev.direction == Direction::Egress as u8;
    let d = &p.d.0;
    // The ipcache only for a container's ND to a unicast, non-link-local address.
    let on_host = from_container
        && !addr::v6_multicast(d)
        && !addr::v6_link_local(d)
        && identity::on_host(V6::remote(p.d).identity);
    let mut target = 0;
    if from_container && p.l.icmp_type == nd::ty::NEIGHBOUR_ADVERTISEMENT {
        // Type, code, checksum, flags, then the target address.
        let off = p.l.off + 8;
        if off + 16 > p.end as usize {
            return 0;
        }
        let mut t = A16([0; 16]);
        if parse::load16(ctx, off, &mut t.0).is_err() {
            return 0;
        }
        target = nd::classify(&t.0, V6::is_local(ep, &t), false);
    }
    let m = nd::Msg {
        from_container,
        ty: p.l.icmp_type,
        code: p.l.icmp_code,
        hop_limit: p.hop_limit,
        len: l3_len(ctx),
        src: nd::classify(&p.s.0, V6::is_local(ep, &p.s), false),
        dst: nd::classify(d, V6::is_local(ep, &p.d), on_host),
        target,
    };
    nd::allowed(&m) as u32
}
