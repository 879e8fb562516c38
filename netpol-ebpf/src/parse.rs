//! Header parsing. Headers are read straight from the packet (direct packet access, bounds
//! checked against `data_end`, see [`read`]), and through `bpf_skb_load_bytes` where they lie
//! beyond its linear part (a non-linear skb), so such skbs parse like linear ones: a header that
//! runs past the end of the packet is an error, never an out-of-bounds read.

use aya_ebpf::programs::TcContext;
use netpol_common::{icmp, nd, proto, DropReason};

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_ARP: u16 = 0x0806;
/// 802.1Q and 802.1ad VLAN tags.
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;

/// 4-byte aligned so loads and copies are word-wise (the fields are bytes).
#[repr(C, align(4))]
#[derive(Clone, Copy)]
pub struct Ipv4Hdr {
    pub vihl: u8,
    pub tos: u8,
    pub tot_len: [u8; 2],
    pub id: [u8; 2],
    pub frag_off: [u8; 2],
    pub ttl: u8,
    pub proto: u8,
    pub check: [u8; 2],
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
}

/// The first 8 bytes of a TCP/UDP/SCTP/ICMP header: enough for ports, ICMP type and identifier.
#[repr(C, align(4))]
#[derive(Clone, Copy)]
pub struct L4Head {
    pub b: [u8; 8],
}

/// An Ethernet/IPv4 ARP message: hardware and protocol types and lengths, operation, sender
/// MAC and IPv4 address, target MAC and IPv4 address.
#[repr(C, align(4))]
#[derive(Clone, Copy)]
pub struct ArpHead {
    pub b: [u8; 28],
}

/// The fixed part of a TCP header.
#[repr(C, align(4))]
#[derive(Clone, Copy)]
pub struct TcpHead {
    pub b: [u8; 20],
}

/// What the L4 header says about the packet, for conntrack and policy.
#[repr(u8)]
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// TCP, UDP, SCTP: ports are meaningful.
    Ports,
    /// ICMP/ICMPv6 echo request (sport = identifier, dport = 0).
    EchoRequest,
    /// ICMP/ICMPv6 echo reply (sport = 0, dport = identifier).
    EchoReply,
    /// An ICMP error carrying part of the packet that caused it.
    IcmpError,
    /// Another ICMP message (policy port = its type).
    IcmpOther,
    /// IPv6 neighbour/router discovery or MLD: passes when netpol-common's `nd::allowed`
    /// says so, and is dropped otherwise (never subject to policy).
    Neighbour,
    /// A non-initial fragment: no L4 header.
    Fragment,
    /// Another protocol: no ports.
    Other,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct L4 {
    pub proto: u8,
    pub kind: Kind,
    pub sport: u16,
    pub dport: u16,
    /// TCP flags (byte 13 of the TCP header), 0 for others.
    pub tcp_flags: u8,
    /// Offset of the L4 header in the packet.
    pub off: usize,
    /// ICMP type (the policy "port" of ICMP).
    pub icmp_type: u8,
    pub icmp_code: u8,
}

/// The last offset read straight from the packet (headers end well before: IPv4 options, IPv6
/// extension headers, an ICMP error's quoted packet); a bound the verifier can see on offsets
/// computed from packet bytes. Later ones go through `bpf_skb_load_bytes`.
const MAX_OFF: usize = 0x3fff;

/// A `T` (plain bytes) read from the packet at `off`; `Malformed` when the packet ends first.
///
/// Straight from the packet (direct packet access: a bounds check against `data_end` and a load)
/// when the bytes lie in its linear part, which holds the headers of almost every packet; through
/// `bpf_skb_load_bytes` otherwise (a header beyond the linear part of a non-linear skb, or far
/// into the packet), which reads any part of the packet and fails only past its end. So both give
/// the same answer; the helper call is the exception. (Not `bpf_skb_pull_data`: it would copy
/// payload into the linear part of large GSO packets and make every packet pointer stale.)
///
/// The load uses `T`'s alignment: header structs are 4-byte aligned for word loads, and a packet
/// header may sit at any address. BPF on the hosts netpol runs on (x86-64, arm64: efficient
/// unaligned access, no strict-alignment verifier flag) loads words from any packet address.
#[inline(always)]
pub fn read<T: Copy>(ctx: &TcContext, off: usize) -> Result<T, DropReason> {
    if off <= MAX_OFF {
        let p = ctx.data() + off;
        if p + core::mem::size_of::<T>() <= ctx.data_end() {
            // SAFETY: `size_of::<T>()` bytes of the linear part, bounds-checked against
            // `data_end` (see above for the alignment); `T` is plain bytes.
            return Ok(unsafe { core::ptr::read(p as *const T) });
        }
    }
    ctx.load(off).map_err(|_| DropReason::Malformed)
}

#[inline(always)]
pub fn be16(b: [u8; 2]) -> u16 {
    u16::from_be_bytes(b)
}

#[inline(always)]
pub fn eth_proto(ctx: &TcContext) -> Result<u16, DropReason> {
    // `skb->protocol` (set from the Ethernet header when the frame was received): a context
    // read instead of a `bpf_skb_load_bytes` call per packet.
    // SAFETY: the context pointer is valid for the program's lifetime.
    let p = unsafe { (*ctx.skb.skb).protocol };
    Ok(u16::from_be(p as u16))
}

/// The fixed IPv4 header at `off`, unchecked: anti-spoofing reads its addresses before anything
/// else ([`ipv4_check`] then validates it).
#[inline(always)]
pub fn ipv4_load(ctx: &TcContext, off: usize) -> Result<Ipv4Hdr, DropReason> {
    read(ctx, off)
}

/// Bytes of the packet from `off` to its end (`skb->len`).
#[inline(always)]
fn avail(ctx: &TcContext, off: usize) -> usize {
    (ctx.len() as usize).saturating_sub(off)
}

/// The length an IP header claims (IPv4 total length, or IPv6 40 + payload length) checked
/// against the packet: shorter than claimed is `Malformed`; longer is trailing padding, which
/// passes but is never parsed (the end of the packet is `off + claimed`). A claimed length of 0
/// on a packet longer than 64 KiB is a BIG TCP / jumbo GSO packet: the whole packet counts.
#[inline(always)]
fn claimed_end(
    ctx: &TcContext,
    off: usize,
    claimed: usize,
    zero_len: bool,
) -> Result<usize, DropReason> {
    let have = avail(ctx, off);
    if zero_len && have > 0xffff + 40 {
        return Ok(off + have);
    }
    if claimed > have {
        return Err(DropReason::Malformed);
    }
    Ok(off + claimed)
}

/// Validates an outer IPv4 header at `off`: version 4, IHL at least 5, the header (options
/// included) within the total length, the total length within the packet. Returns the offset of
/// the payload, the end of the packet as the header claims it, and whether this is a non-initial
/// fragment.
#[inline(always)]
pub fn ipv4_check(
    ctx: &TcContext,
    ip: &Ipv4Hdr,
    off: usize,
) -> Result<(usize, usize, bool), DropReason> {
    if ip.vihl >> 4 != 4 {
        return Err(DropReason::Malformed);
    }
    let ihl = ((ip.vihl & 0x0f) as usize) * 4;
    let tot = be16(ip.tot_len) as usize;
    // The whole header, options included, must be in the packet: a protocol without an L4
    // parse (GRE, ESP, …) would otherwise pass with its header cut short.
    if ihl < 20 || (tot < ihl && tot != 0) {
        return Err(DropReason::Malformed);
    }
    let end = claimed_end(ctx, off, tot, tot == 0)?;
    if off + ihl > end {
        return Err(DropReason::Malformed);
    }
    let non_first_fragment = be16(ip.frag_off) & 0x1fff != 0;
    Ok((off + ihl, end, non_first_fragment))
}

/// Parses an IPv4 header quoted in an ICMP error at `off`, which must lie within the outer
/// packet's `end` (its total length is the original packet's, longer than the quote: not
/// checked). The header and the offset of its payload.
#[inline(always)]
pub fn ipv4_quoted(
    ctx: &TcContext,
    off: usize,
    end: usize,
) -> Result<(Ipv4Hdr, usize), DropReason> {
    let ip: Ipv4Hdr = read(ctx, off)?;
    if ip.vihl >> 4 != 4 {
        return Err(DropReason::Malformed);
    }
    let ihl = ((ip.vihl & 0x0f) as usize) * 4;
    if ihl < 20 || (be16(ip.tot_len) as usize) < ihl || off + ihl > end {
        return Err(DropReason::Malformed);
    }
    Ok((ip, off + ihl))
}

/// Not a fragment (or an IPv6 atomic fragment: offset 0, no more fragments).
pub const FRAG_NONE: u8 = 0;
/// Offset 0, more fragments follow: carries the L4 header.
pub const FRAG_FIRST: u8 = 1;
/// Offset ≠ 0: no L4 header.
pub const FRAG_LATER: u8 = 2;

/// Where a packet sits in a fragmented datagram, and what identifies the datagram.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Frag {
    /// `FRAG_NONE`, `FRAG_FIRST` or `FRAG_LATER`.
    pub pos: u8,
    /// The protocol of the reassembly key: IPv4's protocol, the IPv6 fragment header's next
    /// header (the same in every fragment of a datagram).
    pub proto: u8,
    /// IPv4: the 16-bit identification; IPv6: the fragment header's 32-bit one.
    pub id: u32,
}

/// The fragment position and identification of an IPv4 header.
#[inline(always)]
pub fn ipv4_frag(ip: &Ipv4Hdr) -> Frag {
    let f = be16(ip.frag_off);
    let pos = if f & 0x1fff != 0 {
        FRAG_LATER
    } else if f & 0x2000 != 0 {
        FRAG_FIRST
    } else {
        FRAG_NONE
    };
    Frag {
        pos,
        proto: ip.proto,
        id: u32::from(be16(ip.id)),
    }
}

/// The fragment position and identification in the 8 bytes of an IPv6 fragment header.
#[inline(always)]
pub fn ipv6_frag(h: &[u8; 8]) -> Frag {
    let fo = be16([h[2], h[3]]);
    let pos = if fo & 0xfff8 != 0 {
        FRAG_LATER
    } else if fo & 1 != 0 {
        FRAG_FIRST
    } else {
        FRAG_NONE
    };
    Frag {
        pos,
        proto: h[0],
        id: u32::from_be_bytes([h[4], h[5], h[6], h[7]]),
    }
}

/// Copies 16 bytes at `off` straight into `dst` (which may be map memory), four words, without a
/// stack temporary; outside the linear part (see [`read`]) through `bpf_skb_load_bytes`.
#[inline(always)]
pub fn load16(ctx: &TcContext, off: usize, dst: &mut [u8; 16]) -> Result<(), DropReason> {
    if off <= MAX_OFF {
        let p = ctx.data() + off;
        if p + 16 <= ctx.data_end() {
            let src = p as *const u32;
            let d = dst.as_mut_ptr().cast::<u32>();
            // SAFETY: 16 bytes of the linear part, bounds-checked against `data_end` (word loads
            // from any packet address: see [`read`]); `dst` is 16 writable bytes, written
            // unaligned (it may be a byte array).
            unsafe {
                for i in 0..4 {
                    core::ptr::write_unaligned(d.add(i), core::ptr::read(src.add(i)));
                }
            }
            return Ok(());
        }
    }
    // SAFETY: `dst` is 16 writable bytes; the helper checks the packet bounds. (Not
    // `TcContext::load_bytes`: it clamps its length, which the verifier rejects as maybe zero.)
    let ret = unsafe {
        aya_ebpf::helpers::bpf_skb_load_bytes(
            ctx.skb.skb as *const _,
            off as u32,
            dst.as_mut_ptr().cast(),
            16,
        )
    };
    if ret < 0 {
        return Err(DropReason::Malformed);
    }
    Ok(())
}

/// The fixed IPv6 header at `off`: its first 8 bytes (version, payload length, next header, hop
/// limit), its addresses copied into `saddr` / `daddr`. Unchecked: anti-spoofing reads the
/// addresses before anything else ([`ipv6_check`] then validates it).
#[inline(always)]
pub fn ipv6_load(
    ctx: &TcContext,
    off: usize,
    saddr: &mut [u8; 16],
    daddr: &mut [u8; 16],
) -> Result<[u8; 8], DropReason> {
    let head: [u8; 8] = read(ctx, off)?;
    load16(ctx, off + 8, saddr)?;
    load16(ctx, off + 24, daddr)?;
    Ok(head)
}

/// Validates an outer IPv6 header at `off` (first 8 bytes `head`): version 6 and the payload
/// length within the packet. Returns the end of the packet as the header claims it.
#[inline(always)]
pub fn ipv6_check(ctx: &TcContext, head: &[u8; 8], off: usize) -> Result<usize, DropReason> {
    if head[0] >> 4 != 6 {
        return Err(DropReason::Malformed);
    }
    let plen = be16([head[4], head[5]]) as usize;
    claimed_end(ctx, off, 40 + plen, plen == 0)
}

/// Parses an IPv6 header at `off` (a packet quoted in an ICMPv6 error), copying its addresses
/// into `saddr` / `daddr`, and walks its extension headers: the upper-layer protocol and its
/// offset. Its payload length is the original packet's: not checked.
#[inline(always)]
pub fn ipv6_quoted(
    ctx: &TcContext,
    off: usize,
    saddr: &mut [u8; 16],
    daddr: &mut [u8; 16],
) -> Result<(u8, usize), DropReason> {
    let head = ipv6_load(ctx, off, saddr, daddr)?;
    if head[0] >> 4 != 6 {
        return Err(DropReason::Malformed);
    }
    let (next, off, _) = ipv6_ext(ctx, head[6], off + 40)?;
    Ok((next, off))
}

/// Walks the extension headers from `off` (the first one named by `next`): the upper-layer
/// protocol, its offset and where the packet sits in a fragmented datagram. The walk stops at
/// the fragment header of a later fragment (what follows is the middle of the datagram, not a
/// header): the protocol is then the fragment header's next header.
#[inline(always)]
pub fn ipv6_ext(ctx: &TcContext, next: u8, off: usize) -> Result<(u8, usize, Frag), DropReason> {
    let mut next = next;
    let mut off = off;
    let mut frag = Frag {
        pos: FRAG_NONE,
        proto: 0,
        id: 0,
    };
    // A bounded walk: more than 4 extension headers is refused (DropReason::ExtHeaders).
    for _ in 0..4 {
        match next {
            0 | 43 | 60 => {
                let h: [u8; 2] = read(ctx, off)?;
                next = h[0];
                off += (h[1] as usize + 1) * 8;
            }
            44 => {
                let h: [u8; 8] = read(ctx, off)?;
                next = h[0];
                off += 8;
                frag = ipv6_frag(&h);
                if frag.pos == FRAG_LATER {
                    return Ok((next, off, frag));
                }
            }
            51 => {
                let h: [u8; 2] = read(ctx, off)?;
                next = h[0];
                off += (h[1] as usize + 2) * 4;
            }
            _ => return Ok((next, off, frag)),
        }
    }
    match next {
        0 | 43 | 60 | 44 | 51 => Err(DropReason::ExtHeaders),
        _ => Ok((next, off, frag)),
    }
}

/// Parses the L4 header at `off`, which must lie within the packet's claimed `end` (trailing
/// bytes past the IP length are never read as a header).
#[inline(always)]
pub fn l4(
    ctx: &TcContext,
    proto: u8,
    off: usize,
    end: usize,
    non_first_fragment: bool,
) -> Result<L4, DropReason> {
    let mut l = L4 {
        proto,
        kind: Kind::Other,
        sport: 0,
        dport: 0,
        tcp_flags: 0,
        off,
        icmp_type: 0,
        icmp_code: 0,
    };
    if off > end {
        return Err(DropReason::Malformed);
    }
    if non_first_fragment {
        l.kind = Kind::Fragment;
        return Ok(l);
    }
    match proto {
        proto::TCP => {
            // The fixed 20-byte header must be there (one load) and its data offset sane, all
            // within the IP length.
            let t: TcpHead = read(ctx, off)?;
            let h = &t.b;
            let doff = (h[12] >> 4) as usize * 4;
            if doff < 20 || off + doff > end {
                return Err(DropReason::Malformed);
            }
            l.sport = be16([h[0], h[1]]);
            l.dport = be16([h[2], h[3]]);
            l.tcp_flags = h[13];
            l.kind = Kind::Ports;
        }
        proto::UDP | proto::SCTP => {
            let h: L4Head = read(ctx, off)?;
            if off + 8 > end {
                return Err(DropReason::Malformed);
            }
            l.sport = be16([h.b[0], h.b[1]]);
            l.dport = be16([h.b[2], h.b[3]]);
            l.kind = Kind::Ports;
        }
        proto::ICMP => {
            let h: L4Head = read(ctx, off)?;
            if off + 8 > end {
                return Err(DropReason::Malformed);
            }
            l.icmp_type = h.b[0];
            l.icmp_code = h.b[1];
            let id = be16([h.b[4], h.b[5]]);
            match h.b[0] {
                8 => {
                    l.kind = Kind::EchoRequest;
                    l.sport = id;
                }
                0 => {
                    l.kind = Kind::EchoReply;
                    l.dport = id;
                }
                // Source quench (4) and redirect (5) are not errors of a flow: `IcmpOther`.
                t if icmp::v4_error(t) => l.kind = Kind::IcmpError,
                _ => l.kind = Kind::IcmpOther,
            }
        }
        proto::ICMPV6 => {
            let h: L4Head = read(ctx, off)?;
            if off + 8 > end {
                return Err(DropReason::Malformed);
            }
            l.icmp_type = h.b[0];
            l.icmp_code = h.b[1];
            let id = be16([h.b[4], h.b[5]]);
            match h.b[0] {
                128 => {
                    l.kind = Kind::EchoRequest;
                    l.sport = id;
                }
                129 => {
                    l.kind = Kind::EchoReply;
                    l.dport = id;
                }
                t if icmp::v6_error(t) => l.kind = Kind::IcmpError,
                t if nd::is_nd_or_mld(t) => l.kind = Kind::Neighbour,
                _ => l.kind = Kind::IcmpOther,
            }
        }
        _ => {}
    }
    Ok(l)
}

/// The ports of the packet embedded in an ICMP error, as conntrack sees them
/// (echo: identifier in sport for a request, in dport for a reply).
#[inline(always)]
pub fn inner_ports(
    ctx: &TcContext,
    proto: u8,
    off: usize,
    end: usize,
) -> Result<(u16, u16), DropReason> {
    let h: L4Head = read(ctx, off)?;
    // The quoted ports must lie within the outer packet's IP length.
    if off + 8 > end {
        return Err(DropReason::Malformed);
    }
    let id = be16([h.b[4], h.b[5]]);
    Ok(match proto {
        proto::TCP | proto::UDP | proto::SCTP => (be16([h.b[0], h.b[1]]), be16([h.b[2], h.b[3]])),
        proto::ICMP => match h.b[0] {
            8 => (id, 0),
            0 => (0, id),
            _ => (0, 0),
        },
        proto::ICMPV6 => match h.b[0] {
            128 => (id, 0),
            129 => (0, id),
            _ => (0, 0),
        },
        _ => (0, 0),
    })
}
