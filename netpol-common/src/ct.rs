//! Connection tracking: `CT4_NEW_V3` / `CT6_NEW_V3` (flows not yet established) and `CT4_V3` /
//! `CT6_V3` (established flows), LRU hashes with the same key and value.
//!
//! One entry per flow and endpoint, for both directions: the key is the flow's tuple as the
//! endpoint sees it, its own side first — (local address, remote address, local port, remote
//! port, protocol) — so a packet the container sends (`from_container`: local = source) and one
//! delivered to it (`to_container`: local = destination) of the same flow find the same entry
//! with one lookup. The entry says which side opened the flow ([`CtEntry::dir`]:
//! [`CtDir::Egress`] when the container opened it, [`CtDir::Ingress`] when it was delivered to
//! it); a packet going the other way is a reply. ICMP echo uses the identifier as source port of
//! the request and destination port of the reply, so a reply keys onto its request.

use crate::Direction;

/// Which program admitted a flow (the side that opened it).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CtDir {
    Ingress = 0,
    Egress = 1,
}

impl CtDir {
    #[inline(always)]
    pub const fn of(dir: Direction) -> Self {
        match dir {
            Direction::Egress => Self::Egress,
            Direction::Ingress => Self::Ingress,
        }
    }
}

/// 4-byte aligned (same layout): the datapath builds keys with word stores, not byte copies.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtKey4 {
    /// The endpoint's own address.
    pub local: [u8; 4],
    pub remote: [u8; 4],
    lport: [u8; 2],
    rport: [u8; 2],
    pub proto: u8,
    pub _pad: [u8; 3],
}

impl CtKey4 {
    #[inline(always)]
    pub const fn new(local: [u8; 4], remote: [u8; 4], lport: u16, rport: u16, proto: u8) -> Self {
        Self {
            local,
            remote,
            lport: lport.to_be_bytes(),
            rport: rport.to_be_bytes(),
            proto,
            _pad: [0; 3],
        }
    }

    /// The key of a packet `s → d` that the endpoint sends (`Egress`) or receives (`Ingress`).
    #[inline(always)]
    pub const fn of_packet(
        s: [u8; 4],
        d: [u8; 4],
        sport: u16,
        dport: u16,
        proto: u8,
        dir: Direction,
    ) -> Self {
        match dir {
            Direction::Egress => Self::new(s, d, sport, dport, proto),
            Direction::Ingress => Self::new(d, s, dport, sport, proto),
        }
    }

    pub const fn lport(&self) -> u16 {
        u16::from_be_bytes(self.lport)
    }

    pub const fn rport(&self) -> u16 {
        u16::from_be_bytes(self.rport)
    }
}

#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtKey6 {
    /// The endpoint's own address.
    pub local: [u8; 16],
    pub remote: [u8; 16],
    lport: [u8; 2],
    rport: [u8; 2],
    pub proto: u8,
    pub _pad: [u8; 3],
}

impl CtKey6 {
    #[inline(always)]
    pub const fn new(local: [u8; 16], remote: [u8; 16], lport: u16, rport: u16, proto: u8) -> Self {
        Self {
            local,
            remote,
            lport: lport.to_be_bytes(),
            rport: rport.to_be_bytes(),
            proto,
            _pad: [0; 3],
        }
    }

    /// The key of a packet `s → d` that the endpoint sends (`Egress`) or receives (`Ingress`).
    #[inline(always)]
    pub const fn of_packet(
        s: [u8; 16],
        d: [u8; 16],
        sport: u16,
        dport: u16,
        proto: u8,
        dir: Direction,
    ) -> Self {
        match dir {
            Direction::Egress => Self::new(s, d, sport, dport, proto),
            Direction::Ingress => Self::new(d, s, dport, sport, proto),
        }
    }

    pub const fn lport(&self) -> u16 {
        u16::from_be_bytes(self.lport)
    }

    pub const fn rport(&self) -> u16 {
        u16::from_be_bytes(self.rport)
    }
}

/// The value of every conntrack map.
///
/// Besides lifetime and flags, an entry records who it was made for: the endpoint's host veth
/// (`ifindex`) and identity, and the remote side's identity and, when the remote is a container,
/// the interfaces its packets arrive through (`remote_ifindex`, `remote_bridge`; see
/// [`crate::ipcache::RemoteInfo`]). An entry serves a packet only when these still hold
/// ([`CtEntry::serves`]): a container that gets a departed container's address does not inherit
/// its flows, and a packet that claims a container's address without coming from it does not
/// pass as a reply of that container's flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtEntry {
    /// The time after which the entry is stale: CLOCK_MONOTONIC nanoseconds, as the datapath
    /// reads them (`bpf_ktime_get_coarse_ns()`: the last tick's time, so an entry may serve
    /// up to one tick, at most 10 ms, past this).
    pub expires_ns: u64,
    /// Bit set of `CtEntry::*` flags.
    pub flags: u32,
    /// The policy rule that admitted the flow (0 when the direction was not enforced).
    pub rule: u32,
    /// The host veth (the `ENDPOINTS` key) of the endpoint that admitted the flow.
    pub ifindex: u32,
    /// That endpoint's identity when the flow was admitted.
    pub identity: u32,
    /// The remote side's identity when the flow was admitted.
    pub remote_identity: u32,
    /// For a container remote: its host veth; its packets reach this endpoint with this
    /// `ingress_ifindex` (bridged) or `remote_bridge` (routed by the host). 0: not a container,
    /// no check.
    pub remote_ifindex: u32,
    pub remote_bridge: u32,
    /// The side that opened the flow ([`CtDir`] as a byte): a packet the other way is a reply.
    pub dir: u8,
    /// The ipcache generation (`IPCACHE_GEN`, its low three bytes, little end first) in which
    /// the remote's fields were looked up or found unchanged; 0: none (see netpol-common's
    /// `ipcache`). Formerly padding, so entries of an older datapath hold 0.
    pub ipcache_gen: [u8; 3],
}

impl CtEntry {
    /// A packet in the reply direction was seen.
    pub const SEEN_REPLY: u32 = 1 << 0;
    /// The flow is closing (TCP: a FIN each way, or an RST): its lifetime no longer moves.
    pub const CLOSING: u32 = 1 << 1;
    /// TCP: a FIN from the side that opened the flow.
    pub const FIN_ORIG: u32 = 1 << 2;
    /// TCP: a FIN from the other side.
    pub const FIN_REPLY: u32 = 1 << 3;
    /// Admitted by audit mode: policy would have dropped the flow. It serves packets only
    /// while the endpoint audits the direction that opened the flow ([`CtEntry::audit_lapsed`]);
    /// after that the datapath decides the flow again by that direction's policy, for every
    /// packet of it either way, so a flow that policy denies does not outlive audit mode.
    pub const AUDIT: u32 = 1 << 4;

    /// A new entry for a flow opened from side `dir` and admitted on endpoint `ifindex` /
    /// `identity` with `remote`.
    #[inline(always)]
    pub const fn new(
        now: u64,
        proto: u8,
        rule: u32,
        ifindex: u32,
        identity: u32,
        remote: &crate::ipcache::RemoteInfo,
        dir: CtDir,
    ) -> Self {
        Self {
            expires_ns: now + lifetime(proto, 0, false) * NS,
            flags: 0,
            rule,
            ifindex,
            identity,
            remote_identity: remote.identity,
            remote_ifindex: remote.ifindex,
            remote_bridge: remote.bridge_ifindex,
            dir: dir as u8,
            ipcache_gen: [0; 3],
        }
    }

    /// The generation recorded in [`CtEntry::ipcache_gen`].
    #[inline(always)]
    pub const fn gen(&self) -> u32 {
        self.ipcache_gen[0] as u32
            | (self.ipcache_gen[1] as u32) << 8
            | (self.ipcache_gen[2] as u32) << 16
    }

    /// Records generation `g` (its low three bytes).
    #[inline(always)]
    pub fn set_gen(&mut self, g: u32) {
        self.ipcache_gen = [g as u8, (g >> 8) as u8, (g >> 16) as u8];
    }

    /// Whether the remote's fields are still what the ipcache says, in generation `now` (the
    /// `IPCACHE_GEN` the packet read before any lookup): recorded in that generation, which is
    /// not 0 and not odd (an ipcache write in progress, or one its agent never finished).
    #[inline(always)]
    pub const fn gen_current(&self, now: u32) -> bool {
        let g = now & crate::ipcache::GEN_MASK;
        g != 0 && g & 1 == 0 && self.gen() == g
    }

    /// The remote's ipcache entry as the entry recorded it.
    #[inline(always)]
    pub const fn recorded_remote(&self) -> crate::ipcache::RemoteInfo {
        crate::ipcache::RemoteInfo {
            identity: self.remote_identity,
            ifindex: self.remote_ifindex,
            bridge_ifindex: self.remote_bridge,
            _pad: 0,
        }
    }

    /// Whether a packet seen in `dir` goes against the flow's opening direction.
    #[inline(always)]
    pub const fn is_reply(&self, dir: Direction) -> bool {
        self.dir != CtDir::of(dir) as u8
    }

    /// Whether this entry may serve a packet seen on endpoint `ifindex` with `identity`.
    /// `from_remote` is, for a packet from the remote side (`to_container`), its
    /// `ingress_ifindex` and the ipcache's entry for its source as it is now; `None` when the
    /// endpoint sent it (`from_container`). Expiry is checked separately.
    ///
    /// When a container is the remote side, at admission or now, the packet must come from that
    /// same container: the same identity and veth as recorded, arriving through that veth
    /// (bridged) or its bridge (routed by the host). A container that got a departed one's
    /// address therefore never rides its flows, not even through the bridge, which every
    /// container on it can reach by the gateway's MAC. Between non-container peers (world, host,
    /// CIDRs) nothing is compared, so an established connection survives a CIDR identity change.
    #[inline(always)]
    pub const fn serves(
        &self,
        ifindex: u32,
        identity: u32,
        from_remote: Option<(u32, &crate::ipcache::RemoteInfo)>,
    ) -> bool {
        if self.ifindex != ifindex || self.identity != identity {
            return false;
        }
        match from_remote {
            None => true,
            Some((iif, now)) => {
                if self.remote_ifindex == 0 && now.ifindex == 0 {
                    return true;
                }
                self.remote_identity == now.identity
                    && self.remote_ifindex == now.ifindex
                    && (iif == self.remote_ifindex || iif == self.remote_bridge)
            }
        }
    }

    /// The direction whose policy decides the flow: the side that opened it.
    #[inline(always)]
    pub const fn opened(&self) -> Direction {
        if self.dir == CtDir::Egress as u8 {
            Direction::Egress
        } else {
            Direction::Ingress
        }
    }

    /// Whether audit mode admitted this flow ([`CtEntry::AUDIT`]) and the endpoint, whose
    /// `Endpoint::flags` are `ep_flags`, no longer audits the direction that opened it (audit
    /// mode left, or only the other direction audited now). Such an entry passes nothing on its
    /// own: the flow is decided again by the opening direction's policy ([`revisit`]).
    #[inline(always)]
    pub const fn audit_lapsed(&self, ep_flags: u32) -> bool {
        if self.flags & Self::AUDIT == 0 {
            return false;
        }
        let bit = if self.dir == CtDir::Egress as u8 {
            crate::endpoint::Endpoint::AUDIT_EGRESS
        } else {
            crate::endpoint::Endpoint::AUDIT_INGRESS
        };
        ep_flags & bit == 0
    }

    /// Ends the entry in place: a TCP SYN reopened its tuple (Cilium's `CT_REOPENED`). Its
    /// expiry becomes 0, in the past for every reader, so it is absent to every lookup as an
    /// expired entry is; it stays in its table until the reopened flow's promotion writes
    /// itself into it or the LRU evicts it. (Not a delete: that frees the LRU element, and the
    /// promotion would allocate another one.) Only with `Config::CT_IN_PLACE` (x86); without it
    /// the datapath deletes the entry.
    #[inline(always)]
    pub fn kill(&mut self) {
        self.expires_ns = 0;
    }

    /// Whether the entry is closing or closed: a TCP SYN over it opens a new flow.
    #[inline(always)]
    pub const fn is_closing(&self) -> bool {
        self.flags & (Self::CLOSING | Self::FIN_ORIG | Self::FIN_REPLY) != 0
    }
}

const NS: u64 = 1_000_000_000;

/// The port a flow is decided on in `POLICY` (`policy::lookup`'s `port`), from one of its
/// packets (`reply`: it goes against the flow's opening direction): the opening packet's
/// destination port (TCP, UDP, SCTP), the echo request's type (ICMP, ICMPv6: only echo is
/// tracked), 0 for other protocols.
#[inline(always)]
pub const fn flow_port(proto: u8, sport: u16, dport: u16, reply: bool) -> u16 {
    match proto {
        crate::proto::ICMP => 8,
        crate::proto::ICMPV6 => 128,
        crate::proto::TCP | crate::proto::UDP | crate::proto::SCTP => {
            if reply {
                sport
            } else {
                dport
            }
        }
        _ => 0,
    }
}

/// What deciding a lapsed audit entry again ([`CtEntry::audit_lapsed`]) does to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Revisit {
    /// Policy allows the flow now (or its opening direction is no longer enforced): the entry
    /// becomes an ordinary one (no `AUDIT`, this rule) and the packet goes on as a packet of
    /// the flow.
    Allow(u32),
    /// Policy denies it: the packet is dropped with this reason and rule. The entry stays, with
    /// its lifetime renewed ([`revoked_expiry`]) but nothing else changed, so that every later
    /// packet of the flow, either way, is dropped too: gone, it would let a packet of the other
    /// side through an unenforced direction as a new flow, whose replies would then pass.
    Deny(crate::DropReason, u32),
}

/// Decides a lapsed audit entry `e` again, on an endpoint with `Endpoint::flags` `ep_flags`:
/// the policy of the direction that opened the flow, for the identities the entry recorded,
/// its protocol and [`flow_port`]. `get` reads `POLICY` (as for `policy::lookup`).
#[inline(always)]
pub fn revisit(
    e: &CtEntry,
    ep_flags: u32,
    proto: u8,
    port: u16,
    get: impl FnMut(&crate::policy::PolicyKey) -> Option<crate::policy::PolicyValue>,
) -> Revisit {
    let dir = e.opened();
    let bit = match dir {
        Direction::Egress => crate::endpoint::Endpoint::ENFORCE_EGRESS,
        Direction::Ingress => crate::endpoint::Endpoint::ENFORCE_INGRESS,
    };
    if ep_flags & bit == 0 {
        return Revisit::Allow(0);
    }
    match crate::policy::lookup(e.identity, e.remote_identity, dir, proto, port, get) {
        crate::policy::Verdict::Allow(r) => Revisit::Allow(r),
        crate::policy::Verdict::Deny(r) => Revisit::Deny(crate::DropReason::PolicyDeny, r),
        crate::policy::Verdict::NoMatch => Revisit::Deny(crate::DropReason::PolicyDenied, 0),
    }
}

/// The expiry of a revoked entry ([`Revisit::Deny`]) after a packet of its flow was dropped at
/// `now`: the lifetime the flow would get in its table, renewed by every dropped packet, so it
/// outlives the flow's retransmissions. (Its flags no longer move: a forged RST or FIN does not
/// shorten it.)
#[inline(always)]
pub const fn revoked_expiry(now: u64, proto: u8, flags: u32, established: bool) -> u64 {
    now + lifetime(proto, flags, established) * NS
}

/// Lifetimes (seconds), as Cilium's defaults.
pub const LIFETIME_TCP_SYN: u64 = 60;
pub const LIFETIME_TCP: u64 = 21_600;
pub const LIFETIME_TCP_CLOSING: u64 = 10;
pub const LIFETIME_NON_TCP: u64 = 60;

/// TCP flag bits (byte 13 of the TCP header).
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// The lifetime (seconds) of an entry with `flags` that is not closing; `established` for one in
/// the established table.
#[inline(always)]
pub const fn lifetime(proto: u8, flags: u32, established: bool) -> u64 {
    if proto == crate::proto::TCP {
        if established && flags & CtEntry::SEEN_REPLY != 0 {
            LIFETIME_TCP
        } else {
            LIFETIME_TCP_SYN
        }
    } else {
        LIFETIME_NON_TCP
    }
}

/// Whether a TCP packet with these flags opens a flow: policy decides it whatever conntrack holds
/// (a retransmitted SYN too, and a SYN over a closing or closed entry: Cilium's `CT_REOPENED`).
#[inline(always)]
pub const fn opens_flow(proto: u8, tcp_flags: u8) -> bool {
    proto == crate::proto::TCP && tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
}

/// Whether a packet of a flow looks in the new table before the established one: a TCP SYN-ACK,
/// which answers a SYN and so finds its flow there (the established table only for a SYN-ACK
/// retransmitted after the handshake's last ACK). Every other packet looks in the established
/// table first. Saves a SYN-ACK the established table's miss, one cold lookup per side of
/// every connection.
#[inline(always)]
pub const fn new_table_first(proto: u8, tcp_flags: u8) -> bool {
    proto == crate::proto::TCP && tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK
}

/// Whether a packet that found its flow's entry may pass on it in this direction (`reply`: not
/// the side that opened the flow). A TCP SYN-ACK and an ICMP echo reply (`echo_reply`) answer a
/// flow: only as a reply. An echo request (`echo_request`) opens one: only in the opening
/// direction (an echo request with identifier 0 keys onto the peer's echo request with
/// identifier 0, as its reply would). Anything else either way.
#[inline(always)]
pub const fn passes_this_way(
    proto: u8,
    tcp_flags: u8,
    echo_request: bool,
    echo_reply: bool,
    reply: bool,
) -> bool {
    if echo_request {
        !reply
    } else if echo_reply || new_table_first(proto, tcp_flags) {
        reply
    } else {
        true
    }
}

/// What a packet of a flow does to its entry ([`update`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Update {
    pub flags: u32,
    pub expires_ns: u64,
    /// The entry should move from the new table to the established one.
    pub promote: bool,
}

/// The effect of a packet (`reply`: it goes against the flow's opening direction) on entry `e`
/// at `now`; `established`: `e` is in the established table.
///
/// - TCP: an RST, or a FIN each way, makes the entry closing; its lifetime becomes at most
///   [`LIFETIME_TCP_CLOSING`] from that packet and no later packet extends it. One FIN alone
///   (a half-closed connection) keeps the normal lifetime, so a half-closed transfer works.
/// - A reply marks the entry answered (`SEEN_REPLY`).
/// - Otherwise the lifetime is renewed ([`lifetime`], for the table the entry ends up in).
/// - An entry of the new table is promoted once the flow is established: it has been answered
///   and the opening side sends again (TCP: its first packet without SYN, the handshake's last
///   ACK; ICMP echo is never promoted). A spray of packets that are not answered, or SYNs that
///   are only answered by a SYN-ACK, never reaches the established table. The entry is copied
///   into the established table (over the key's entry there, if any: an expired one, or one a
///   SYN killed when it reopened the tuple, [`CtEntry::kill`], is written over in place where
///   `Config::CT_IN_PLACE` allows it) and deleted from the new one.
#[inline(always)]
pub const fn update(
    e: &CtEntry,
    now: u64,
    proto: u8,
    tcp_flags: u8,
    reply: bool,
    established: bool,
) -> Update {
    let mut flags = e.flags;
    if proto == crate::proto::TCP {
        if tcp_flags & TCP_RST != 0 {
            flags |= CtEntry::CLOSING;
        }
        if tcp_flags & TCP_FIN != 0 {
            flags |= if reply {
                CtEntry::FIN_REPLY
            } else {
                CtEntry::FIN_ORIG
            };
        }
        if flags & (CtEntry::FIN_ORIG | CtEntry::FIN_REPLY)
            == CtEntry::FIN_ORIG | CtEntry::FIN_REPLY
        {
            flags |= CtEntry::CLOSING;
        }
    }
    if reply {
        flags |= CtEntry::SEEN_REPLY;
    }
    let promote = !established
        && !reply
        && e.flags & CtEntry::SEEN_REPLY != 0
        && flags & CtEntry::CLOSING == 0
        && if proto == crate::proto::TCP {
            tcp_flags & TCP_SYN == 0
        } else {
            proto != crate::proto::ICMP && proto != crate::proto::ICMPV6
        };
    let expires_ns = if e.flags & CtEntry::CLOSING != 0 {
        e.expires_ns
    } else if flags & CtEntry::CLOSING != 0 {
        let closing = now + LIFETIME_TCP_CLOSING * NS;
        if closing < e.expires_ns {
            closing
        } else {
            e.expires_ns
        }
    } else {
        now + lifetime(proto, flags, established || promote) * NS
    };
    Update {
        flags,
        expires_ns,
        promote,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ipcache::RemoteInfo, proto, Direction};

    const T: u64 = 1_000 * NS;

    fn entry(p: u8) -> CtEntry {
        CtEntry::new(
            T,
            p,
            7,
            10,
            300,
            &RemoteInfo::container(301, 11, 2),
            CtDir::Ingress,
        )
    }

    #[test]
    fn an_entry_serves_only_its_endpoint_and_its_remote_interfaces() {
        let e = entry(proto::TCP);
        let app = RemoteInfo::container(301, 11, 2);
        assert!(e.serves(10, 300, None));
        assert!(
            e.serves(10, 300, Some((11, &app))),
            "bridged from the remote's veth"
        );
        assert!(
            e.serves(10, 300, Some((2, &app))),
            "routed from the remote's bridge"
        );
        assert!(!e.serves(10, 300, Some((12, &app))), "another interface");
        assert!(
            !e.serves(12, 300, None),
            "another endpoint with the address"
        );
        assert!(!e.serves(10, 301, None), "the endpoint changed identity");
        let reused = RemoteInfo::container(310, 13, 2);
        for iif in [13, 2, 11] {
            assert!(
                !e.serves(10, 300, Some((iif, &reused))),
                "another container with the remote's address, via {iif}"
            );
        }
        assert!(
            !e.serves(10, 300, Some((2, &RemoteInfo::new(2)))),
            "the address is no longer a container's"
        );
        let world = RemoteInfo::new(2);
        let w = CtEntry::new(T, proto::TCP, 7, 10, 300, &world, CtDir::Ingress);
        assert!(
            w.serves(10, 300, Some((99, &world))),
            "not a container: no check"
        );
        assert!(
            w.serves(10, 300, Some((99, &RemoteInfo::new(1000)))),
            "a CIDR identity change keeps a world flow"
        );
        assert!(
            !w.serves(10, 300, Some((2, &app))),
            "the address became a container's since"
        );
    }

    #[test]
    fn both_directions_of_a_flow_share_one_key() {
        let (e, p) = ([10, 0, 0, 2], [10, 0, 0, 3]);
        let out = CtKey4::of_packet(e, p, 40000, 80, proto::TCP, Direction::Egress);
        let back = CtKey4::of_packet(p, e, 80, 40000, proto::TCP, Direction::Ingress);
        assert_eq!(out, back);
        assert_eq!((out.local, out.lport(), out.rport()), (e, 40000, 80));
        let (e6, p6) = ([1; 16], [2; 16]);
        assert_eq!(
            CtKey6::of_packet(e6, p6, 1, 2, proto::UDP, Direction::Egress),
            CtKey6::of_packet(p6, e6, 2, 1, proto::UDP, Direction::Ingress)
        );
        let opened_out = CtEntry::new(T, proto::TCP, 0, 1, 2, &RemoteInfo::new(2), CtDir::Egress);
        assert!(!opened_out.is_reply(Direction::Egress));
        assert!(opened_out.is_reply(Direction::Ingress));
    }

    #[test]
    fn an_audit_entry_lapses_when_its_opening_direction_is_no_longer_audited() {
        use crate::endpoint::Endpoint;
        let ep = |i: bool, o: bool| Endpoint::new(300).enforce(true, true).audit(i, o).flags;
        let mut e = entry(proto::TCP);
        assert!(
            !e.audit_lapsed(ep(false, false)),
            "not admitted by audit mode"
        );
        e.flags = CtEntry::AUDIT | CtEntry::SEEN_REPLY;
        assert_eq!(e.opened(), Direction::Ingress);
        assert!(!e.audit_lapsed(ep(true, false)));
        assert!(!e.audit_lapsed(ep(true, true)));
        assert!(e.audit_lapsed(ep(false, false)), "audit mode left");
        assert!(
            e.audit_lapsed(ep(false, true)),
            "only the other direction audited"
        );
        e.dir = CtDir::Egress as u8;
        assert!(e.audit_lapsed(ep(true, false)));
        assert!(!e.audit_lapsed(ep(false, true)));
    }

    #[test]
    fn a_lapsed_flow_is_decided_by_its_opening_direction_on_its_server_port() {
        use crate::{
            endpoint::Endpoint,
            policy::{PolicyKey, PolicyValue},
        };
        assert_eq!(flow_port(proto::TCP, 40000, 5432, false), 5432);
        assert_eq!(flow_port(proto::UDP, 53, 40000, true), 53, "a reply");
        assert_eq!(flow_port(proto::ICMP, 7, 0, false), 8, "echo request");
        assert_eq!(flow_port(proto::ICMPV6, 0, 7, true), 128, "echo reply");
        assert_eq!(flow_port(47, 0, 0, false), 0);
        let mut e = entry(proto::TCP);
        e.flags = CtEntry::AUDIT;
        let (allow, deny) = (
            PolicyKey::new(300, 301, Direction::Ingress, proto::TCP, 5432),
            PolicyKey::new(300, 301, Direction::Ingress, proto::TCP, 22),
        );
        let get = |k: &PolicyKey| {
            if *k == allow {
                Some(PolicyValue::allow(4))
            } else if *k == deny {
                Some(PolicyValue::deny(9))
            } else {
                None
            }
        };
        let ingress = Endpoint::new(300).enforce(true, false).flags;
        assert_eq!(
            revisit(&e, ingress, proto::TCP, 5432, get),
            Revisit::Allow(4)
        );
        assert_eq!(
            revisit(&e, ingress, proto::TCP, 22, get),
            Revisit::Deny(crate::DropReason::PolicyDeny, 9)
        );
        assert_eq!(
            revisit(&e, ingress, proto::TCP, 80, get),
            Revisit::Deny(crate::DropReason::PolicyDenied, 0)
        );
        // The opening direction is what counts, not the packet's.
        let egress = Endpoint::new(300).enforce(false, true).flags;
        assert_eq!(revisit(&e, egress, proto::TCP, 80, get), Revisit::Allow(0));
        e.dir = CtDir::Egress as u8;
        assert_eq!(
            revisit(&e, egress, proto::TCP, 5432, get),
            Revisit::Deny(crate::DropReason::PolicyDenied, 0),
            "an egress flow is looked up as egress"
        );
        // A revoked entry lives on while its flow keeps trying.
        assert_eq!(
            revoked_expiry(T, proto::TCP, CtEntry::AUDIT | CtEntry::SEEN_REPLY, true),
            T + LIFETIME_TCP * NS
        );
        assert_eq!(
            revoked_expiry(T, proto::UDP, CtEntry::AUDIT, false),
            T + LIFETIME_NON_TCP * NS
        );
    }

    #[test]
    fn only_a_bare_syn_opens_a_flow() {
        assert!(opens_flow(proto::TCP, TCP_SYN));
        assert!(!opens_flow(proto::TCP, TCP_SYN | TCP_ACK));
        assert!(!opens_flow(proto::TCP, TCP_ACK));
        assert!(!opens_flow(proto::UDP, TCP_SYN));
    }

    #[test]
    fn only_a_syn_ack_looks_in_the_new_table_first() {
        assert!(new_table_first(proto::TCP, TCP_SYN | TCP_ACK));
        assert!(new_table_first(proto::TCP, TCP_SYN | TCP_ACK | TCP_FIN));
        for f in [TCP_SYN, TCP_ACK, TCP_ACK | TCP_FIN, TCP_RST, 0] {
            assert!(!new_table_first(proto::TCP, f), "{f:#x}");
        }
        assert!(!new_table_first(proto::UDP, TCP_SYN | TCP_ACK));
    }

    #[test]
    fn tcp_handshake_promotes_on_the_last_ack_only() {
        let mut e = entry(proto::TCP);
        let syn_ack = update(&e, T, proto::TCP, TCP_SYN | TCP_ACK, true, false);
        assert!(!syn_ack.promote, "a SYN-ACK alone does not establish");
        assert_eq!(syn_ack.flags, CtEntry::SEEN_REPLY);
        assert_eq!(syn_ack.expires_ns, T + LIFETIME_TCP_SYN * NS);
        e.flags = syn_ack.flags;
        let retrans = update(&e, T, proto::TCP, TCP_SYN, false, false);
        assert!(!retrans.promote);
        let ack = update(&e, T, proto::TCP, TCP_ACK, false, false);
        assert!(ack.promote);
        assert_eq!(
            ack.expires_ns,
            T + LIFETIME_TCP * NS,
            "promoted with the long lifetime"
        );
        // In the established table an answered TCP flow has the long lifetime.
        let est = update(&e, T, proto::TCP, TCP_ACK, true, true);
        assert_eq!(est.expires_ns, T + LIFETIME_TCP * NS);
        assert!(!est.promote);
    }

    #[test]
    fn udp_promotes_when_the_opener_sends_after_a_reply_echo_never() {
        let mut e = entry(proto::UDP);
        assert!(!update(&e, T, proto::UDP, 0, false, false).promote);
        e.flags = update(&e, T, proto::UDP, 0, true, false).flags;
        assert!(update(&e, T, proto::UDP, 0, false, false).promote);
        let mut p = entry(proto::ICMP);
        p.flags = CtEntry::SEEN_REPLY;
        assert!(!update(&p, T, proto::ICMP, 0, false, false).promote);
    }

    #[test]
    fn closing_lifetime_counts_from_the_closing_packet_and_is_never_extended() {
        let mut e = entry(proto::TCP);
        e.flags = CtEntry::SEEN_REPLY;
        e.expires_ns = T + LIFETIME_TCP * NS;
        // One FIN: half-closed, still the normal lifetime.
        let fin = update(&e, T, proto::TCP, TCP_FIN | TCP_ACK, false, true);
        assert_eq!(fin.flags & CtEntry::CLOSING, 0);
        assert_eq!(fin.expires_ns, T + LIFETIME_TCP * NS);
        e.flags = fin.flags;
        // The other side's FIN: closing, 10 s from now.
        let fin2 = update(&e, T, proto::TCP, TCP_FIN | TCP_ACK, true, true);
        assert_ne!(fin2.flags & CtEntry::CLOSING, 0);
        assert_eq!(fin2.expires_ns, T + LIFETIME_TCP_CLOSING * NS);
        e.flags = fin2.flags;
        e.expires_ns = fin2.expires_ns;
        // Later packets, FINs and RSTs included, do not move it.
        for f in [TCP_ACK, TCP_FIN | TCP_ACK, TCP_RST] {
            let later = update(&e, T + 5 * NS, proto::TCP, f, false, true);
            assert_eq!(
                later.expires_ns,
                T + LIFETIME_TCP_CLOSING * NS,
                "flags {f:#x}"
            );
            assert!(!later.promote);
        }
        // An RST closes at once; a closing lifetime never lengthens a shorter one.
        let mut n = entry(proto::TCP);
        n.expires_ns = T + 3 * NS;
        let rst = update(&n, T, proto::TCP, TCP_RST, true, false);
        assert_ne!(rst.flags & CtEntry::CLOSING, 0);
        assert_eq!(rst.expires_ns, T + 3 * NS);
        assert!(CtEntry {
            flags: rst.flags,
            ..n
        }
        .is_closing());
    }
}
