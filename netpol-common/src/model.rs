//! A reference model of the per-container programs' verdict, for the differential test
//! (`tests/tests/datapath_diff.rs`, `cargo xtask fuzz datapath`).
//!
//! Plain Rust over byte slices, written from the order of checks that `netpol-ebpf/src/lxc.rs`
//! documents, not from its code: it parses the frame itself, keeps the ipcache, the policy map
//! and conntrack as plain lists, and returns the verdict, the drop event's cause and the
//! conntrack state after the packet. Only the decision functions that the kernel shares with user
//! space and that have host tests of their own ([`crate::policy::lookup`], [`crate::ipcache::resolve`],
//! [`crate::policy::decide`], the key constructors) are the kernel's.
//!
//! Time is the caller's: `now` is `bpf_ktime_get_ns()`'s clock (`CLOCK_MONOTONIC`).

extern crate alloc;

use alloc::vec::Vec;

use crate::{
    addr,
    ct::{self, CtDir, CtEntry, CtKey4, CtKey6},
    endpoint::Endpoint,
    frag::{Frag4Key, Frag6Key, FragL4},
    icmp, identity,
    ipcache::RemoteInfo,
    nd,
    policy::{self, PolicyKey, PolicyValue, Verdict as PolicyVerdict},
    proto, Direction, DropReason,
};

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;

const SEC: u64 = 1_000_000_000;

/// What the programs do with a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// `TC_ACT_UNSPEC`: no drop, and which check let it on (the programs do not say; for
    /// statistics of what a test covered).
    Pass(Why),
    /// `TC_ACT_SHOT`, with the drop event's cause.
    Drop(Drop),
    /// `TC_ACT_UNSPEC` in audit mode (`Endpoint::AUDIT_*`) for a new flow that policy would
    /// have dropped: tracked (`CtEntry::AUDIT`) and reported with the cause the drop would have
    /// had (`FlowEvent::KIND_AUDIT`).
    Audit(Drop),
}

/// Which check passed a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Why {
    /// Not a managed veth.
    Unmanaged,
    Arp,
    /// A parse error on an endpoint that enforces nothing.
    Unpoliced,
    Neighbour,
    /// A later fragment without a record of its datagram, in an unenforced direction (one with
    /// a record passes as a packet of its flow: `Conntrack`, `Unenforced`, `Allowed`).
    Fragment,
    /// A packet of a flow conntrack holds (its own entry or a reply).
    Conntrack,
    /// An ICMP error about a flow conntrack holds.
    Related,
    /// A new flow in an unenforced direction.
    Unenforced,
    /// A new flow that policy allows.
    Allowed,
    /// A new flow that policy would drop, passed by audit mode ([`Verdict::Audit`]).
    Audited,
}

/// The cause a drop event names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Drop {
    pub reason: DropReason,
    pub src_identity: u32,
    pub dst_identity: u32,
    /// The deny rule for [`DropReason::PolicyDeny`], 0 otherwise.
    pub rule: u32,
}

/// A conntrack key of either family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CtKey {
    V4(CtKey4),
    V6(CtKey6),
}

pub use crate::lpm::{lpm, policy_key_bits};

/// Longest match of `key` in a list of `POLICY` entries `(prefix_len, key, value)`.
pub fn policy_lpm(
    entries: &[(u32, PolicyKey, PolicyValue)],
    key: &PolicyKey,
) -> Option<PolicyValue> {
    crate::lpm::policy(entries.iter().map(|(len, k, v)| (*len, k, *v)), key)
}

/// The state the programs read and write, as plain lists.
#[derive(Clone, Debug, Default)]
pub struct World {
    /// `ENDPOINTS`: host veth ifindex → endpoint.
    pub endpoints: Vec<(u32, Endpoint)>,
    /// `IPCACHE4`: (prefix length, address, identity and a container's interfaces).
    pub ipcache4: Vec<(u32, [u8; 4], RemoteInfo)>,
    /// `IPCACHE6`.
    pub ipcache6: Vec<(u32, [u8; 16], RemoteInfo)>,
    /// `POLICY`: (prefix length, key, value).
    pub policy: Vec<(u32, PolicyKey, PolicyValue)>,
    /// `CT4` and `CT6`: established flows.
    pub ct: Vec<(CtKey, CtEntry)>,
    /// `FRAG4` and `FRAG6`: the L4 view of fragmented datagrams (netpol-common's `frag` module).
    pub frag: Vec<(FragKey, FragL4)>,
    /// `CT4_NEW` and `CT6_NEW`: flows not established yet.
    pub ct_new: Vec<(CtKey, CtEntry)>,
    /// `CONFIG`'s `Config::CT_IN_PLACE`: a reopening SYN kills the established entry instead
    /// of deleting it. (The promotion's in-place write gives the entry an insert would.)
    pub ct_in_place: bool,
}

/// A fragment-tracking key of either family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FragKey {
    V4(Frag4Key),
    V6(Frag6Key),
}

/// Where a packet sits in a fragmented datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FragPos {
    /// Not fragmented (IPv6: also an atomic fragment, offset 0 without more fragments).
    None,
    /// Offset 0, more fragments: carries the L4 header.
    First,
    /// Offset ≠ 0: no L4 header.
    Later,
}

/// A packet's place in its datagram and the datagram's identification and protocol (IPv6: the
/// fragment header's next header).
#[derive(Clone, Copy, Debug)]
struct Frag {
    pos: FragPos,
    id: u32,
    proto: u8,
}

const NOT_FRAGMENTED: Frag = Frag {
    pos: FragPos::None,
    id: 0,
    proto: 0,
};

/// An address of either family; IPv4 uses the first 4 bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Addr([u8; 16]);

impl Addr {
    fn v4(b: [u8; 4]) -> Self {
        let mut a = [0u8; 16];
        a[..4].copy_from_slice(&b);
        Self(a)
    }
    fn a4(&self) -> [u8; 4] {
        [self.0[0], self.0[1], self.0[2], self.0[3]]
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fam {
    V4,
    V6,
}

/// What the L4 header says (the classes `lxc.rs` distinguishes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Ports,
    EchoRequest,
    EchoReply,
    IcmpError,
    IcmpOther,
    Neighbour,
    Fragment,
    Other,
}

#[derive(Clone, Copy, Debug)]
struct Inner {
    s: Addr,
    d: Addr,
    proto: u8,
    sport: u16,
    dport: u16,
}

#[derive(Clone, Copy, Debug)]
struct Pkt {
    fam: Fam,
    s: Addr,
    d: Addr,
    proto: u8,
    kind: Kind,
    sport: u16,
    dport: u16,
    tcp_flags: u8,
    icmp_type: u8,
    icmp_code: u8,
    /// IPv6 hop limit (0 for IPv4).
    hop_limit: u8,
    /// Offset of the L4 header and the packet's claimed end.
    l4off: usize,
    end: usize,
    inner: Option<Inner>,
    frag: Frag,
}

fn be16(f: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*f.get(off)?, *f.get(off + 1)?]))
}

/// `n` bytes at `off`, or `Malformed` when the frame ends first (`bpf_skb_load_bytes` fails).
fn bytes(f: &[u8], off: usize, n: usize) -> Result<&[u8], DropReason> {
    f.get(off..off.checked_add(n).ok_or(DropReason::Malformed)?)
        .ok_or(DropReason::Malformed)
}

/// The end of the packet that an IP length of `claimed` bytes from `off` gives: shorter than
/// claimed is `Malformed`, longer is padding (never parsed). A zero length on a packet longer
/// than 64 KiB (BIG TCP / jumbo GSO) takes the whole packet.
fn claimed_end(f: &[u8], off: usize, claimed: usize, zero_len: bool) -> Result<usize, DropReason> {
    let have = f.len().saturating_sub(off);
    if zero_len && have > 0xffff + 40 {
        return Ok(off + have);
    }
    if claimed > have {
        return Err(DropReason::Malformed);
    }
    Ok(off + claimed)
}

/// The addresses of the fixed IPv4 header at `off` (read before anything is checked).
fn ipv4_addrs(f: &[u8], off: usize) -> Result<(Addr, Addr), DropReason> {
    let h = bytes(f, off, 20)?;
    Ok((
        Addr::v4([h[12], h[13], h[14], h[15]]),
        Addr::v4([h[16], h[17], h[18], h[19]]),
    ))
}

/// The outer IPv4 header at `off`, checked: (protocol, payload offset, claimed end, fragment).
fn ipv4_outer(f: &[u8], off: usize) -> Result<(u8, usize, usize, Frag), DropReason> {
    let h = bytes(f, off, 20)?;
    if h[0] >> 4 != 4 {
        return Err(DropReason::Malformed);
    }
    let ihl = (h[0] & 0x0f) as usize * 4;
    let tot_len = u16::from_be_bytes([h[2], h[3]]) as usize;
    if ihl < 20 || (tot_len < ihl && tot_len != 0) {
        return Err(DropReason::Malformed);
    }
    let end = claimed_end(f, off, tot_len, tot_len == 0)?;
    if off + ihl > end {
        return Err(DropReason::Malformed);
    }
    let fo = u16::from_be_bytes([h[6], h[7]]);
    let pos = if fo & 0x1fff != 0 {
        FragPos::Later
    } else if fo & 0x2000 != 0 {
        FragPos::First
    } else {
        FragPos::None
    };
    let frag = Frag {
        pos,
        id: u32::from(u16::from_be_bytes([h[4], h[5]])),
        proto: h[9],
    };
    Ok((h[9], off + ihl, end, frag))
}

/// An IPv4 header quoted in an ICMP error at `off`, within the outer packet's `end` (its total
/// length is the original packet's: only checked against its own header length).
fn ipv4_quoted(f: &[u8], off: usize, end: usize) -> Result<(Addr, Addr, u8, usize), DropReason> {
    let h = bytes(f, off, 20)?;
    if h[0] >> 4 != 4 {
        return Err(DropReason::Malformed);
    }
    let ihl = (h[0] & 0x0f) as usize * 4;
    let tot_len = u16::from_be_bytes([h[2], h[3]]) as usize;
    if ihl < 20 || tot_len < ihl || off + ihl > end {
        return Err(DropReason::Malformed);
    }
    let s = Addr::v4([h[12], h[13], h[14], h[15]]);
    let d = Addr::v4([h[16], h[17], h[18], h[19]]);
    Ok((s, d, h[9], off + ihl))
}

/// The most IPv6 extension headers the programs walk.
pub const MAX_EXT_HEADERS: usize = 4;

fn is_ext(next: u8) -> bool {
    matches!(next, 0 | 43 | 60 | 44 | 51)
}

/// The fixed IPv6 header at `off`: its first 8 bytes and addresses (read before anything is
/// checked).
fn ipv6_fixed(f: &[u8], off: usize) -> Result<([u8; 8], Addr, Addr), DropReason> {
    let mut h = [0u8; 8];
    h.copy_from_slice(bytes(f, off, 8)?);
    let mut s = [0u8; 16];
    s.copy_from_slice(bytes(f, off + 8, 16)?);
    let mut d = [0u8; 16];
    d.copy_from_slice(bytes(f, off + 24, 16)?);
    Ok((h, Addr(s), Addr(d)))
}

/// The extension headers from `at` (the first named by `next`): (upper-layer protocol, its
/// offset, fragment). The walk stops at a later fragment's fragment header (its next header is
/// then the protocol).
fn ipv6_ext(f: &[u8], next: u8, at: usize) -> Result<(u8, usize, Frag), DropReason> {
    let mut next = next;
    let mut at = at;
    let mut frag = NOT_FRAGMENTED;
    for _ in 0..MAX_EXT_HEADERS {
        match next {
            0 | 43 | 60 => {
                let e = bytes(f, at, 2)?;
                next = e[0];
                at += (e[1] as usize + 1) * 8;
            }
            44 => {
                let e = bytes(f, at, 8)?;
                next = e[0];
                at += 8;
                let fo = u16::from_be_bytes([e[2], e[3]]);
                frag = Frag {
                    pos: if fo & 0xfff8 != 0 {
                        FragPos::Later
                    } else if fo & 1 != 0 {
                        FragPos::First
                    } else {
                        FragPos::None
                    },
                    id: u32::from_be_bytes([e[4], e[5], e[6], e[7]]),
                    proto: e[0],
                };
                if frag.pos == FragPos::Later {
                    return Ok((next, at, frag));
                }
            }
            51 => {
                let e = bytes(f, at, 2)?;
                next = e[0];
                at += (e[1] as usize + 2) * 4;
            }
            _ => break,
        }
    }
    if is_ext(next) {
        return Err(DropReason::ExtHeaders);
    }
    Ok((next, at, frag))
}

/// An IPv6 header quoted in an ICMPv6 error at `off` and its extension headers: (source,
/// destination, upper-layer protocol, its offset).
fn ipv6_quoted(f: &[u8], off: usize) -> Result<(Addr, Addr, u8, usize), DropReason> {
    let (h, s, d) = ipv6_fixed(f, off)?;
    if h[0] >> 4 != 6 {
        return Err(DropReason::Malformed);
    }
    let (next, at, _) = ipv6_ext(f, h[6], off + 40)?;
    Ok((s, d, next, at))
}

/// The L4 header at `off` (message types by protocol number, whichever the IP version).
#[allow(clippy::too_many_arguments)]
fn l4(
    f: &[u8],
    fam: Fam,
    s: Addr,
    d: Addr,
    proto: u8,
    off: usize,
    end: usize,
    frag: Frag,
) -> Result<(Pkt, usize), DropReason> {
    let mut p = Pkt {
        fam,
        s,
        d,
        proto,
        kind: Kind::Other,
        sport: 0,
        dport: 0,
        tcp_flags: 0,
        icmp_type: 0,
        icmp_code: 0,
        hop_limit: 0,
        l4off: off,
        end,
        inner: None,
        frag,
    };
    // Nothing is read past the IP length.
    if off > end {
        return Err(DropReason::Malformed);
    }
    if frag.pos == FragPos::Later {
        p.kind = Kind::Fragment;
        return Ok((p, off));
    }
    match proto {
        proto::TCP => {
            let h = bytes(f, off, 20)?;
            let doff = (h[12] >> 4) as usize * 4;
            if doff < 20 || off + doff > end {
                return Err(DropReason::Malformed);
            }
            p.sport = u16::from_be_bytes([h[0], h[1]]);
            p.dport = u16::from_be_bytes([h[2], h[3]]);
            p.tcp_flags = h[13];
            p.kind = Kind::Ports;
        }
        proto::UDP | proto::SCTP => {
            let h = bytes(f, off, 8)?;
            if off + 8 > end {
                return Err(DropReason::Malformed);
            }
            p.sport = u16::from_be_bytes([h[0], h[1]]);
            p.dport = u16::from_be_bytes([h[2], h[3]]);
            p.kind = Kind::Ports;
        }
        proto::ICMP | proto::ICMPV6 => {
            let h = bytes(f, off, 8)?;
            if off + 8 > end {
                return Err(DropReason::Malformed);
            }
            p.icmp_type = h[0];
            p.icmp_code = h[1];
            let id = u16::from_be_bytes([h[4], h[5]]);
            let v6 = proto == proto::ICMPV6;
            p.kind = match (v6, h[0]) {
                (false, 8) | (true, 128) => {
                    p.sport = id;
                    Kind::EchoRequest
                }
                (false, 0) | (true, 129) => {
                    p.dport = id;
                    Kind::EchoReply
                }
                (false, t) if icmp::v4_error(t) => Kind::IcmpError,
                (true, t) if icmp::v6_error(t) => Kind::IcmpError,
                (true, 130..=137 | 143) => Kind::Neighbour,
                _ => Kind::IcmpOther,
            };
        }
        _ => {}
    }
    Ok((p, off))
}

/// The ports of the packet quoted in an ICMP error, as conntrack keys them.
fn inner_ports(f: &[u8], proto: u8, off: usize, end: usize) -> Result<(u16, u16), DropReason> {
    let h = bytes(f, off, 8)?;
    if off + 8 > end {
        return Err(DropReason::Malformed);
    }
    let id = u16::from_be_bytes([h[4], h[5]]);
    Ok(match (proto, h[0]) {
        (proto::TCP | proto::UDP | proto::SCTP, _) => (
            u16::from_be_bytes([h[0], h[1]]),
            u16::from_be_bytes([h[2], h[3]]),
        ),
        (proto::ICMP, 8) | (proto::ICMPV6, 128) => (id, 0),
        (proto::ICMP, 0) | (proto::ICMPV6, 129) => (0, id),
        _ => (0, 0),
    })
}

/// Step 2 of `lxc.rs`: the fixed header's addresses. `Ok(true)`: an IPv6 source that only
/// neighbour discovery may carry (link-local or unspecified, from a container).
fn addresses(
    fam: Fam,
    s: &Addr,
    d: &Addr,
    ep: &Endpoint,
    dir: Direction,
) -> Result<bool, DropReason> {
    match dir {
        Direction::Egress => {
            if is_local(ep, fam, s) {
                return Ok(false);
            }
            if fam == Fam::V6 && (addr::v6_link_local(&s.0) || addr::v6_unspecified(&s.0)) {
                return Ok(true);
            }
            Err(DropReason::Spoofed)
        }
        Direction::Ingress => {
            let others = match fam {
                Fam::V4 => addr::v4_group(&d.a4()),
                Fam::V6 => addr::v6_for_anyone(&d.0),
            };
            if is_local(ep, fam, d) || others {
                Ok(false)
            } else {
                Err(DropReason::NotForEndpoint)
            }
        }
    }
}

/// Steps 2–3 and 5 of `lxc.rs` for an IP packet: the parsed packet (neighbour discovery
/// included, for step 4), or the drop reason.
fn parse(f: &[u8], fam: Fam, ep: &Endpoint, dir: Direction) -> Result<Pkt, DropReason> {
    let (mut p, l4off, end, nd_only) = match fam {
        Fam::V4 => {
            let (s, d) = ipv4_addrs(f, ETH_HLEN)?;
            addresses(fam, &s, &d, ep, dir)?;
            let (proto, off, end, frag) = ipv4_outer(f, ETH_HLEN)?;
            let (p, l4off) = l4(f, fam, s, d, proto, off, end, frag)?;
            (p, l4off, end, false)
        }
        Fam::V6 => {
            let (h, s, d) = ipv6_fixed(f, ETH_HLEN)?;
            let nd_only = addresses(fam, &s, &d, ep, dir)?;
            let rest = || -> Result<(Pkt, usize, usize), DropReason> {
                if h[0] >> 4 != 6 {
                    return Err(DropReason::Malformed);
                }
                let plen = u16::from_be_bytes([h[4], h[5]]) as usize;
                let end = claimed_end(f, ETH_HLEN, 40 + plen, plen == 0)?;
                let (proto, off, frag) = ipv6_ext(f, h[6], ETH_HLEN + 40)?;
                let (mut p, l4off) = l4(f, fam, s, d, proto, off, end, frag)?;
                p.hop_limit = h[7];
                Ok((p, l4off, end))
            };
            let (p, l4off, end) = match rest() {
                Ok(r) => r,
                // A link-local or unspecified source with anything but valid ND is spoofed.
                Err(_) if nd_only => return Err(DropReason::Spoofed),
                Err(DropReason::Malformed) => return Err(nd_malformed(f, h[6])),
                Err(e) => return Err(e),
            };
            (p, l4off, end, nd_only)
        }
    };
    if fam == Fam::V6 && p.kind == Kind::Neighbour {
        return Ok(p);
    }
    if nd_only {
        return Err(DropReason::Spoofed);
    }
    if p.kind == Kind::IcmpError {
        let (is, id, iproto, ioff) = match fam {
            Fam::V4 => ipv4_quoted(f, l4off + 8, end)?,
            Fam::V6 => ipv6_quoted(f, l4off + 8)?,
        };
        let (sport, dport) = inner_ports(f, iproto, ioff, end)?;
        let e = icmp::ErrorMsg {
            outbound: dir == Direction::Egress,
            v6: fam == Fam::V6,
            ty: p.icmp_type,
            code: p.icmp_code,
            len: f.len().saturating_sub(ETH_HLEN) as u32,
            local: dir == Direction::Egress || is_local(ep, fam, &p.d),
            src_is_quoted_dst: id == p.s,
            dst_is_quoted_src: is == p.d,
        };
        if icmp::tied(&e) {
            p.inner = Some(Inner {
                s: is,
                d: id,
                proto: iproto,
                sport,
                dport,
            });
        } else {
            // Not an error of one of this endpoint's flows: a new ICMP message for policy.
            p.kind = Kind::IcmpOther;
        }
    }
    Ok(p)
}

/// Step 4 for an IPv6 packet that failed to parse (`Malformed`; `next`: the fixed header's next
/// header): neighbour discovery or MLD all the same if its extension headers, read from the
/// frame's bytes whatever its lengths say, lead to ICMPv6 with an ND/MLD type
/// (`NeighbourDiscovery`, on every endpoint); more than four of them hide what it is
/// (`ExtHeaders`, on every endpoint too); anything else stays `Malformed`.
fn nd_malformed(f: &[u8], next: u8) -> DropReason {
    match ipv6_ext(f, next, ETH_HLEN + 40) {
        Ok((proto::ICMPV6, at, frag)) if frag.pos != FragPos::Later => match f.get(at) {
            Some(t) if nd::is_nd_or_mld(*t) => DropReason::NeighbourDiscovery,
            _ => DropReason::Malformed,
        },
        Ok(_) => DropReason::Malformed,
        Err(e) => e,
    }
}

/// Step 1 for ARP: from a container, an Ethernet/IPv4 ARP message whose sender address is the
/// endpoint's own or 0.0.0.0; to a container, anything.
fn arp(ep: &Endpoint, dir: Direction, f: &[u8]) -> Result<(), DropReason> {
    if dir == Direction::Ingress {
        return Ok(());
    }
    let a = bytes(f, ETH_HLEN, 28)?;
    if a[0..6] != [0, 1, 0x08, 0x00, 6, 4] {
        return Err(DropReason::Malformed);
    }
    let sender = Addr::v4([a[14], a[15], a[16], a[17]]);
    if sender.a4() == [0; 4] || is_local(ep, Fam::V4, &sender) {
        Ok(())
    } else {
        Err(DropReason::Spoofed)
    }
}

fn is_local(ep: &Endpoint, fam: Fam, a: &Addr) -> bool {
    match fam {
        Fam::V4 => ep.flags & Endpoint::HAS_IPV4 != 0 && a.a4() == ep.ipv4,
        Fam::V6 => ep.flags & Endpoint::HAS_IPV6 != 0 && a.0 == ep.ipv6,
    }
}

/// The conntrack key of a packet `s → d` the endpoint sends (`Egress`) or receives: its own
/// address and port first, so both directions of a flow have one key.
fn key(fam: Fam, s: Addr, d: Addr, sport: u16, dport: u16, proto: u8, dir: Direction) -> CtKey {
    let (l, r, lp, rp) = match dir {
        Direction::Egress => (s, d, sport, dport),
        Direction::Ingress => (d, s, dport, sport),
    };
    match fam {
        Fam::V4 => CtKey::V4(CtKey4::new(l.a4(), r.a4(), lp, rp, proto)),
        Fam::V6 => CtKey::V6(CtKey6::new(l.0, r.0, lp, rp, proto)),
    }
}

fn frag_key(p: &Pkt) -> FragKey {
    match p.fam {
        Fam::V4 => FragKey::V4(Frag4Key::new(
            p.s.a4(),
            p.d.a4(),
            p.frag.id as u16,
            p.frag.proto,
        )),
        Fam::V6 => FragKey::V6(Frag6Key::new(p.s.0, p.d.0, p.frag.id, p.frag.proto)),
    }
}

/// Who may use a conntrack entry (see `CtEntry::serves`).
#[derive(Clone, Copy)]
struct Owner {
    ifindex: u32,
    identity: u32,
    /// The endpoint's flags (whether it still audits an entry's opening direction).
    ep_flags: u32,
    from_remote: Option<u32>,
    /// `to_container`: the source's ipcache entry (set once the addresses are read).
    remote: RemoteInfo,
}

impl World {
    fn table(&self, est: bool) -> &Vec<(CtKey, CtEntry)> {
        if est {
            &self.ct
        } else {
            &self.ct_new
        }
    }

    fn table_mut(&mut self, est: bool) -> &mut Vec<(CtKey, CtEntry)> {
        if est {
            &mut self.ct
        } else {
            &mut self.ct_new
        }
    }

    /// The conntrack entry of `k` in the established (`est`) or the new table, if any (live or
    /// not).
    pub fn ct_get(&self, k: &CtKey, est: bool) -> Option<&CtEntry> {
        self.table(est).iter().find(|(x, _)| x == k).map(|(_, e)| e)
    }

    fn ct_get_mut(&mut self, k: &CtKey, est: bool) -> Option<&mut CtEntry> {
        self.table_mut(est)
            .iter_mut()
            .find(|(x, _)| x == k)
            .map(|(_, e)| e)
    }

    /// Inserts or replaces the entry of `k` in one table.
    pub fn ct_put(&mut self, k: CtKey, e: CtEntry, est: bool) {
        match self.ct_get_mut(&k, est) {
            Some(old) => *old = e,
            None => self.table_mut(est).push((k, e)),
        }
    }

    fn ct_del(&mut self, k: &CtKey, est: bool) {
        self.table_mut(est).retain(|(x, _)| x != k);
    }

    fn endpoint(&self, ifindex: u32) -> Option<Endpoint> {
        self.endpoints
            .iter()
            .find(|(i, _)| *i == ifindex)
            .map(|(_, e)| *e)
    }

    /// The ipcache entry of `a`: `world` on a miss.
    fn remote(&self, fam: Fam, a: &Addr) -> RemoteInfo {
        let hit = match fam {
            Fam::V4 => lpm(
                self.ipcache4.iter().map(|(l, b, v)| (*l, &b[..], *v)),
                &a.0[..4],
            ),
            Fam::V6 => lpm(self.ipcache6.iter().map(|(l, b, v)| (*l, &b[..], *v)), &a.0),
        };
        crate::ipcache::resolve(hit)
    }

    /// A live entry for `k` in one table that serves `o` is hit by a packet of its flow (a
    /// reply when it goes against the entry's opening side; a SYN-ACK only as a reply):
    /// `ct::update` applies (flags, lifetime, promotion to the established table). An entry
    /// that audit mode admitted, on an opening direction the endpoint no longer audits, has its
    /// flow decided again by that direction's policy first (`ct::revisit`): allowed, it becomes
    /// an ordinary entry; denied, the packet is dropped (`Err`, the cause's reason, rule and the
    /// remote identity the entry recorded) and the entry stays, only its lifetime renewed.
    fn ct_hit(
        &mut self,
        k: &CtKey,
        p: &Pkt,
        dir: Direction,
        est: bool,
        o: Owner,
        now: u64,
    ) -> Result<bool, (DropReason, u32, u32)> {
        let Some(found) = self.ct_get(k, est).copied() else {
            return Ok(false);
        };
        if found.expires_ns < now
            || !found.serves(o.ifindex, o.identity, o.from_remote.map(|i| (i, &o.remote)))
        {
            return Ok(false);
        }
        let reply = found.is_reply(dir);
        if found.audit_lapsed(o.ep_flags) {
            let port = ct::flow_port(p.proto, p.sport, p.dport, reply);
            let again = ct::revisit(&found, o.ep_flags, p.proto, port, |key| {
                policy_lpm(&self.policy, key)
            });
            let Some(e) = self.ct_get_mut(k, est) else {
                return Ok(false);
            };
            match again {
                ct::Revisit::Allow(rule) => {
                    e.flags &= !CtEntry::AUDIT;
                    e.rule = rule;
                }
                ct::Revisit::Deny(reason, rule) => {
                    e.expires_ns = ct::revoked_expiry(now, p.proto, e.flags, est);
                    return Err((reason, rule, e.remote_identity));
                }
            }
        }
        let Some(e) = self.ct_get_mut(k, est) else {
            return Ok(false);
        };
        let (request, answer) = (p.kind == Kind::EchoRequest, p.kind == Kind::EchoReply);
        if !ct::passes_this_way(p.proto, p.tcp_flags, request, answer, reply) {
            return Ok(false);
        }
        let u = ct::update(e, now, p.proto, p.tcp_flags, reply, est);
        if u.promote {
            let mut n = *e;
            n.flags = u.flags;
            n.expires_ns = u.expires_ns;
            self.ct_put(*k, n, true);
            self.ct_del(k, false);
            return Ok(true);
        }
        e.flags = u.flags;
        // The datapath writes the expiry only when it moves back, or forward by more than a
        // second.
        if u.expires_ns < e.expires_ns || u.expires_ns > e.expires_ns + SEC {
            e.expires_ns = u.expires_ns;
        }
        Ok(true)
    }

    /// A live entry of this endpoint for `k` in either table (the remote's interfaces are not
    /// checked: an ICMP error comes from a router or the peer), not a lapsed audit entry.
    fn ct_live(&self, k: &CtKey, o: Owner, now: u64) -> bool {
        [true, false].iter().any(|est| {
            self.ct_get(k, *est).is_some_and(|e| {
                e.expires_ns >= now
                    && e.serves(o.ifindex, o.identity, None)
                    && !e.audit_lapsed(o.ep_flags)
            })
        })
    }

    /// Step 5 for a packet of a flow (not a bare SYN): the flow's entry (one for both
    /// directions), established table first, a SYN-ACK new table first
    /// (`ct::new_table_first`). `Err`: a flow that audit mode admitted and policy denies now.
    fn established(
        &mut self,
        p: &Pkt,
        dir: Direction,
        o: Owner,
        now: u64,
    ) -> Result<bool, (DropReason, u32, u32)> {
        let k = key(p.fam, p.s, p.d, p.sport, p.dport, p.proto, dir);
        let first = !ct::new_table_first(p.proto, p.tcp_flags);
        if self.ct_hit(&k, p, dir, first, o, now)? {
            return Ok(true);
        }
        self.ct_hit(&k, p, dir, !first, o, now)
    }

    /// Runs `frame` through `from_container` (`Direction::Egress`) or `to_container`
    /// (`Direction::Ingress`) on the veth `ifindex`, updating conntrack.
    pub fn run(&mut self, ifindex: u32, dir: Direction, frame: &[u8], now: u64) -> Verdict {
        self.run_via(ifindex, 0, dir, frame, now)
    }

    /// [`World::run`] for a packet that entered the host on `ingress_ifindex`
    /// (`skb->ingress_ifindex`).
    pub fn run_via(
        &mut self,
        ifindex: u32,
        ingress_ifindex: u32,
        dir: Direction,
        frame: &[u8],
        now: u64,
    ) -> Verdict {
        let Some(ep) = self.endpoint(ifindex) else {
            return Verdict::Pass(Why::Unmanaged);
        };
        let (src, dst) = match dir {
            Direction::Egress => (ep.identity, 0),
            Direction::Ingress => (0, ep.identity),
        };
        let mut cause = Drop {
            reason: DropReason::Malformed,
            src_identity: src,
            dst_identity: dst,
            rule: 0,
        };
        let owner = Owner {
            ifindex,
            identity: ep.identity,
            ep_flags: ep.flags,
            from_remote: match dir {
                Direction::Egress => None,
                Direction::Ingress => Some(ingress_ifindex),
            },
            remote: RemoteInfo::new(0),
        };
        match self.decide(&ep, dir, frame, now, owner, &mut cause) {
            // `verdict` wrote the would-be drop's reason into the cause.
            Ok(Why::Audited) => Verdict::Audit(cause),
            Ok(why) => Verdict::Pass(why),
            Err(reason) => {
                // `ExtHeaders` never passes: what they hide may be neighbour discovery.
                let parse_error =
                    matches!(reason, DropReason::Malformed | DropReason::UnsupportedL3);
                if parse_error && !ep.enforces_any() {
                    return Verdict::Pass(Why::Unpoliced);
                }
                cause.reason = reason;
                Verdict::Drop(cause)
            }
        }
    }

    /// Step 4: an ND or MLD message passes if netpol-common's `nd` rules allow it.
    fn neighbour_discovery(
        &self,
        ep: &Endpoint,
        dir: Direction,
        f: &[u8],
        p: &Pkt,
    ) -> Result<(), DropReason> {
        if !nd::complete(p.icmp_type, p.end.saturating_sub(p.l4off) as u32) {
            return Err(DropReason::NeighbourDiscovery);
        }
        let from_container = dir == Direction::Egress;
        let d = &p.d.0;
        let on_host = from_container
            && !addr::v6_multicast(d)
            && !addr::v6_link_local(d)
            && identity::on_host(self.remote(Fam::V6, &p.d).identity);
        let mut target = 0;
        if from_container && p.icmp_type == nd::ty::NEIGHBOUR_ADVERTISEMENT {
            let off = p.l4off + 8;
            let t = match bytes(f, off, 16) {
                Ok(t) if off + 16 <= p.end => t,
                _ => return Err(DropReason::NeighbourDiscovery),
            };
            let mut a = [0u8; 16];
            a.copy_from_slice(t);
            target = nd::classify(&a, is_local(ep, Fam::V6, &Addr(a)), false);
        }
        let m = nd::Msg {
            from_container,
            ty: p.icmp_type,
            code: p.icmp_code,
            hop_limit: p.hop_limit,
            len: f.len().saturating_sub(ETH_HLEN) as u32,
            src: nd::classify(&p.s.0, is_local(ep, Fam::V6, &p.s), false),
            dst: nd::classify(d, is_local(ep, Fam::V6, &p.d), on_host),
            target,
        };
        if nd::allowed(&m) {
            Ok(())
        } else {
            Err(DropReason::NeighbourDiscovery)
        }
    }

    fn remote_identity(
        &self,
        ep: &Endpoint,
        dir: Direction,
        p: &Pkt,
        cause: &mut Drop,
    ) -> RemoteInfo {
        match dir {
            Direction::Egress => {
                // A group or link-local destination reaches every container on the bridge and
                // the host: `GROUP` (every peer's denies, the wildcard's allows), not the
                // ipcache's `world`.
                let anyone = match p.fam {
                    Fam::V4 => addr::v4_group(&p.d.a4()),
                    Fam::V6 => addr::v6_for_anyone(&p.d.0),
                };
                let r = if anyone {
                    RemoteInfo::new(identity::GROUP)
                } else {
                    self.remote(p.fam, &p.d)
                };
                cause.src_identity = ep.identity;
                cause.dst_identity = r.identity;
                r
            }
            Direction::Ingress => {
                let r = self.remote(p.fam, &p.s);
                cause.src_identity = r.identity;
                cause.dst_identity = ep.identity;
                r
            }
        }
    }

    fn decide(
        &mut self,
        ep: &Endpoint,
        dir: Direction,
        f: &[u8],
        now: u64,
        mut owner: Owner,
        cause: &mut Drop,
    ) -> Result<Why, DropReason> {
        // 1. L3.
        let fam = match be16(f, 12) {
            Some(ETH_P_IP) => Fam::V4,
            Some(ETH_P_IPV6) => Fam::V6,
            Some(ETH_P_ARP) => return arp(ep, dir, f).map(|()| Why::Arp),
            // Still tagged: the IP header inside is out of the checks' sight.
            Some(ETH_P_8021Q | ETH_P_8021AD) => return Err(DropReason::VlanTagged),
            _ => return Err(DropReason::UnsupportedL3),
        };
        // 2. Addresses; to a container, a container's address that came in through neither its
        // veth nor its bridge, or a host address that neither the host's stack sent nor its NAT
        // brought back through this veth, is spoofed, before the rest is parsed (then 3).
        if let Some(iif) = owner.from_remote {
            let (s, d) = match fam {
                Fam::V4 => ipv4_addrs(f, ETH_HLEN),
                Fam::V6 => ipv6_fixed(f, ETH_HLEN).map(|(_, s, d)| (s, d)),
            }?;
            addresses(fam, &s, &d, ep, dir)?;
            let info = self.remote(fam, &s);
            if info.spoofed(iif, owner.ifindex) {
                cause.src_identity = info.identity;
                return Err(DropReason::Spoofed);
            }
            owner.remote = info;
        }
        let p = parse(f, fam, ep, dir)?;
        // 4. Neighbour discovery.
        if fam == Fam::V6 && p.kind == Kind::Neighbour {
            return self
                .neighbour_discovery(ep, dir, f, &p)
                .map(|()| Why::Neighbour);
        }
        // 7. A later fragment is a packet of its datagram's flow, with the ports its first
        // fragment recorded; without a record it is dropped where the direction is enforced.
        let mut p = p;
        if p.frag.pos == FragPos::Later {
            let Some(r) = self.frag_get(&frag_key(&p)) else {
                if ep.enforces(dir) {
                    self.remote_identity(ep, dir, &p, cause);
                    return Err(DropReason::Fragment);
                }
                return Ok(Why::Fragment);
            };
            p.kind = match r.kind {
                FragL4::PORTS => Kind::Ports,
                FragL4::ECHO_REQUEST => Kind::EchoRequest,
                FragL4::ECHO_REPLY => Kind::EchoReply,
                FragL4::ICMP_OTHER => Kind::IcmpOther,
                _ => Kind::Other,
            };
            p.sport = r.sport();
            p.dport = r.dport();
            p.icmp_type = r.icmp_type;
            p.tcp_flags = 0;
        }
        let why = self.verdict(ep, dir, &p, now, owner, cause)?;
        // A first fragment that passed records its L4 view for the later ones.
        if p.frag.pos == FragPos::First {
            let kind = match p.kind {
                Kind::Ports => Some(FragL4::PORTS),
                Kind::EchoRequest => Some(FragL4::ECHO_REQUEST),
                Kind::EchoReply => Some(FragL4::ECHO_REPLY),
                Kind::IcmpOther => Some(FragL4::ICMP_OTHER),
                Kind::Other => Some(FragL4::OTHER),
                Kind::IcmpError | Kind::Neighbour | Kind::Fragment => None,
            };
            if let Some(kind) = kind {
                let r = FragL4::new(kind, p.sport, p.dport, p.icmp_type);
                self.frag_put(frag_key(&p), r);
            }
        }
        Ok(why)
    }

    /// The record of a fragmented datagram.
    pub fn frag_get(&self, k: &FragKey) -> Option<FragL4> {
        self.frag.iter().find(|(x, _)| x == k).map(|(_, v)| *v)
    }

    fn frag_put(&mut self, k: FragKey, v: FragL4) {
        match self.frag.iter_mut().find(|(x, _)| *x == k) {
            Some((_, old)) => *old = v,
            None => self.frag.push((k, v)),
        }
    }

    /// Steps 5–6 for a parsed packet (a later fragment with its datagram's L4 view).
    fn verdict(
        &mut self,
        ep: &Endpoint,
        dir: Direction,
        p: &Pkt,
        now: u64,
        owner: Owner,
        cause: &mut Drop,
    ) -> Result<Why, DropReason> {
        let fam = p.fam;
        let enforced = ep.enforces(dir);
        // 5. Conntrack, only for packets of this endpoint's own addresses.
        let local = match dir {
            Direction::Egress => true,
            Direction::Ingress => is_local(ep, fam, &p.d),
        };
        // A bare TCP SYN opens a flow: policy decides it, whatever conntrack holds.
        let opens = ct::opens_flow(p.proto, p.tcp_flags);
        if local && !opens && !matches!(p.kind, Kind::IcmpError | Kind::IcmpOther) {
            match self.established(p, dir, owner, now) {
                Ok(true) => return Ok(Why::Conntrack),
                Ok(false) => {}
                Err((reason, rule, remote)) => {
                    (cause.src_identity, cause.dst_identity) = match dir {
                        Direction::Egress => (ep.identity, remote),
                        Direction::Ingress => (remote, ep.identity),
                    };
                    cause.rule = rule;
                    return Err(reason);
                }
            }
        }
        if local {
            if let Some(i) = p.inner {
                let ours = match dir {
                    Direction::Egress => i.d == p.s,
                    Direction::Ingress => i.s == p.d,
                };
                // The quoted packet travelled the other way: its reverse is a packet of the flow
                // in this direction.
                let k = key(fam, i.d, i.s, i.dport, i.sport, i.proto, dir);
                if ours && self.ct_live(&k, owner, now) {
                    return Ok(Why::Related);
                }
            }
        }
        // 6. The remote (to a container, its interfaces were checked in step 2).
        let info = self.remote_identity(ep, dir, p, cause);
        let remote = info.identity;
        // 7. Policy.
        let port = match p.kind {
            Kind::Ports => p.dport,
            Kind::Other => 0,
            _ => p.icmp_type as u16,
        };
        let mut rule = 0;
        // Audit mode turns a policy drop (only those) into a pass that is tracked and reported.
        let mut audited = false;
        if enforced {
            let (r, drop) = match policy::lookup(ep.identity, remote, dir, p.proto, port, |k| {
                policy_lpm(&self.policy, k)
            }) {
                PolicyVerdict::Allow(r) => (r, None),
                PolicyVerdict::Deny(r) => (r, Some(DropReason::PolicyDeny)),
                PolicyVerdict::NoMatch => (0, Some(DropReason::PolicyDenied)),
            };
            rule = r;
            if let Some(reason) = drop {
                cause.rule = r;
                if !ep.audits(dir) {
                    return Err(reason);
                }
                cause.reason = reason;
                audited = true;
            }
        }
        if local && matches!(p.kind, Kind::Ports | Kind::EchoRequest | Kind::Other) {
            let k = key(fam, p.s, p.d, p.sport, p.dport, p.proto, dir);
            // A SYN that reopens a tuple ends the established entry it may have left, in place
            // (`CtEntry::kill`) with `Config::CT_IN_PLACE`, and the flow's promotion writes
            // itself over it; without, it is deleted (and the promotion inserts: the same
            // entry).
            if opens {
                if self.ct_in_place {
                    if let Some(old) = self.ct_get_mut(&k, true) {
                        old.kill();
                    }
                } else {
                    self.ct_del(&k, true);
                }
            }
            let mut e = CtEntry::new(
                now,
                p.proto,
                rule,
                owner.ifindex,
                ep.identity,
                &info,
                CtDir::of(dir),
            );
            if audited {
                e.flags = CtEntry::AUDIT;
            }
            self.ct_put(k, e, false);
        }
        if audited {
            return Ok(Why::Audited);
        }
        Ok(if enforced {
            Why::Allowed
        } else {
            Why::Unenforced
        })
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec;

    use super::*;
    use crate::ct::{TCP_ACK, TCP_SYN};

    const DB: [u8; 4] = [10, 0, 0, 2];
    const APP: [u8; 4] = [10, 0, 0, 3];
    const NOW: u64 = 1000 * SEC;

    /// An Ethernet + IPv4 + TCP frame (no options).
    fn tcp4(s: [u8; 4], d: [u8; 4], sport: u16, dport: u16, flags: u8) -> vec::Vec<u8> {
        let mut f = vec![0u8; 14 + 20 + 20];
        f[12..14].copy_from_slice(&ETH_P_IP.to_be_bytes());
        f[14] = 0x45;
        f[16..18].copy_from_slice(&40u16.to_be_bytes());
        f[23] = proto::TCP;
        f[26..30].copy_from_slice(&s);
        f[30..34].copy_from_slice(&d);
        f[34..36].copy_from_slice(&sport.to_be_bytes());
        f[36..38].copy_from_slice(&dport.to_be_bytes());
        f[46] = 5 << 4;
        f[47] = flags;
        f
    }

    fn world(ingress: bool, egress: bool) -> World {
        let mut w = World::default();
        w.endpoints
            .push((1, Endpoint::new(300).with_ipv4(DB).enforce(ingress, egress)));
        w.ipcache4.push((32, DB, RemoteInfo::container(300, 1, 9)));
        w.ipcache4.push((32, APP, RemoteInfo::container(301, 2, 9)));
        w
    }

    fn denied(reason: DropReason, src: u32, dst: u32, rule: u32) -> Verdict {
        Verdict::Drop(Drop {
            reason,
            src_identity: src,
            dst_identity: dst,
            rule,
        })
    }

    #[test]
    fn allowed_syn_opens_the_flow_for_its_replies() {
        let mut w = world(true, true);
        w.policy.push((
            policy::FULL_PREFIX,
            PolicyKey::new(300, 301, Direction::Ingress, proto::TCP, 5432),
            PolicyValue::allow(7),
        ));
        let syn = tcp4(APP, DB, 40000, 5432, TCP_SYN);
        // From app's veth (2): allowed. The same address from elsewhere is forged.
        assert_eq!(
            w.run_via(1, 3, Direction::Ingress, &syn, NOW),
            denied(DropReason::Spoofed, 301, 300, 0)
        );
        assert_eq!(
            w.run_via(1, 2, Direction::Ingress, &syn, NOW),
            Verdict::Pass(Why::Allowed)
        );
        let k = CtKey::V4(CtKey4::new(DB, APP, 5432, 40000, proto::TCP));
        let e = *w.ct_get(&k, false).expect("entry");
        assert_eq!(
            (e.flags, e.rule, e.ifindex, e.remote_ifindex, e.dir),
            (0, 7, 1, 2, CtDir::Ingress as u8)
        );
        assert_eq!(e.expires_ns, NOW + ct::LIFETIME_TCP_SYN * SEC);
        // The reply passes egress enforcement and marks the entry answered.
        let synack = tcp4(DB, APP, 5432, 40000, TCP_SYN | TCP_ACK);
        assert_eq!(
            w.run(1, Direction::Egress, &synack, NOW + 2 * SEC),
            Verdict::Pass(Why::Conntrack)
        );
        let e = *w.ct_get(&k, false).expect("entry");
        assert_eq!(e.flags, CtEntry::SEEN_REPLY);
        assert_eq!(e.expires_ns, NOW + 2 * SEC + ct::LIFETIME_TCP_SYN * SEC);
        // The handshake's last ACK establishes it; through the bridge (routed) is fine too.
        let ack = tcp4(APP, DB, 40000, 5432, TCP_ACK);
        assert_eq!(
            w.run_via(1, 9, Direction::Ingress, &ack, NOW + 3 * SEC),
            Verdict::Pass(Why::Conntrack)
        );
        assert!(w.ct_get(&k, false).is_none());
        let e = *w.ct_get(&k, true).expect("established");
        assert_eq!(e.expires_ns, NOW + 3 * SEC + ct::LIFETIME_TCP * SEC);
        // Another endpoint that gets db's address does not inherit the flow.
        w.endpoints
            .push((4, Endpoint::new(305).with_ipv4(DB).enforce(true, true)));
        assert_eq!(
            w.run(
                4,
                Direction::Egress,
                &tcp4(DB, APP, 5432, 40000, TCP_ACK),
                NOW
            ),
            denied(DropReason::PolicyDenied, 305, 301, 0)
        );
        // Another port is denied by default, naming both identities.
        let other = tcp4(APP, DB, 40001, 22, TCP_SYN);
        assert_eq!(
            w.run_via(1, 2, Direction::Ingress, &other, NOW),
            denied(DropReason::PolicyDenied, 301, 300, 0)
        );
        // An expired entry no longer admits replies.
        assert_eq!(
            w.run(1, Direction::Egress, &synack, NOW + 30_000 * SEC),
            denied(DropReason::PolicyDenied, 300, 301, 0)
        );
    }

    #[test]
    fn deny_rule_names_itself_and_spoofing_is_checked_first() {
        let mut w = world(false, true);
        w.policy.push((
            policy::PREFIX_ANY_PROTO,
            PolicyKey::new(300, identity::ANY, Direction::Egress, 0, 0),
            PolicyValue::deny(9),
        ));
        let out = tcp4(DB, APP, 40000, 80, TCP_SYN);
        assert_eq!(
            w.run(1, Direction::Egress, &out, NOW),
            denied(DropReason::PolicyDeny, 300, 301, 9)
        );
        let spoofed = tcp4(APP, DB, 40000, 80, TCP_SYN);
        assert_eq!(
            w.run(1, Direction::Egress, &spoofed, NOW),
            denied(DropReason::Spoofed, 300, 0, 0)
        );
        assert!(w.ct.is_empty() && w.ct_new.is_empty());
    }

    #[test]
    fn parse_errors_pass_only_where_nothing_is_enforced() {
        let mut bad = tcp4(APP, DB, 1, 2, TCP_SYN);
        bad[14] = 0x44; // IHL 16 bytes
                        // From app's veth (2).
        let mut w = world(false, false);
        assert_eq!(
            w.run_via(1, 2, Direction::Ingress, &bad, NOW),
            Verdict::Pass(Why::Unpoliced)
        );
        // From elsewhere, app's address is spoofed before the rest is parsed.
        assert_eq!(
            w.run_via(1, 5, Direction::Ingress, &bad, NOW),
            denied(DropReason::Spoofed, 301, 300, 0)
        );
        let mut w = world(true, false);
        assert_eq!(
            w.run_via(1, 2, Direction::Ingress, &bad, NOW),
            denied(DropReason::Malformed, 0, 300, 0)
        );
        // Not our ifindex: not ours to police.
        assert_eq!(
            w.run(2, Direction::Ingress, &bad, NOW),
            Verdict::Pass(Why::Unmanaged)
        );
    }

    #[test]
    fn lpm_prefers_the_longest_match() {
        let e: [(u32, [u8; 4], u32); 3] = [
            (8, [10, 0, 0, 0], 3),
            (24, [10, 0, 0, 0], 4),
            (32, [10, 0, 0, 5], 5),
        ];
        let m = |a: [u8; 4]| lpm(e.iter().map(|(l, b, v)| (*l, &b[..], *v)), &a);
        assert_eq!(m([10, 0, 0, 5]), Some(5));
        assert_eq!(m([10, 0, 0, 6]), Some(4));
        assert_eq!(m([10, 9, 0, 6]), Some(3));
        assert_eq!(m([11, 0, 0, 5]), None);
        let odd: [(u32, [u8; 4], u32); 1] = [(9, [10, 128, 0, 0], 1)];
        let m = |a: [u8; 4]| lpm(odd.iter().map(|(l, b, v)| (*l, &b[..], *v)), &a);
        assert_eq!(m([10, 255, 0, 0]), Some(1));
        assert_eq!(m([10, 127, 0, 0]), None);
    }
}
