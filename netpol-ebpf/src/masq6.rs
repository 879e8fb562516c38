//! IPv6 masquerade on the uplink: `masq6_out` (uplink egress) and `masq6_in` (uplink ingress).
//! Cilium's `lib/nat.h` in small, for one address family and one external address.
//!
//! `masq6_out`, for a packet leaving the uplink:
//! 1. Source in a `MASQUERADE` prefix of `MASQ6_PREFIX`, destination in no prefix of it (neither a
//!    container network nor a `LOCAL` one): a container flow to the outside. Anything else passes
//!    untouched, except the host's own flows (source = the uplink address), whose tuples are
//!    reserved in `SNAT6` so no container flow is handed the same one. A host flow whose tuple
//!    a live container flow holds takes it from that flow (`HostConflict`): the host's replies
//!    are never translated to a container, and the container flow loses its mapping (its next
//!    packet gets a new one).
//! 2. TCP, UDP and ICMPv6 echo requests: the *out* entry of the flow gives the translated port; a
//!    new flow first tries its own port, then [`PROBES`]` - 1` ports of the configured range from a
//!    random start, claiming the *in* key (remote, uplink, remote port, port) with `BPF_NOEXIST`
//!    so two CPUs never hand out the same tuple. No free port: the packet is dropped and counted
//!    (`NoPort`), as Linux drops when it finds no unique tuple. A flow's refresh (at most once
//!    a second) checks its *in* entry: one the LRU evicted is written again; one another flow
//!    claimed since (the key was free) makes the packet take a new mapping, so its replies do
//!    not go on to that other flow's container.
//! 3. ICMPv6 errors the container sends about a packet it received from the outside (e.g. port
//!    unreachable): outer source, embedded destination address and port, and the embedded and
//!    outer checksums are translated — only for an error tied to a live flow (netpol-common's
//!    `icmp` rules: sent back to the quoted packet's source, at most 1280 bytes).
//!
//! `masq6_in`, for a packet arriving for the uplink address: replies found in `SNAT6` (*in*
//! entries) get the container's address and port as destination; ICMPv6 errors about a
//! translated packet of a live flow get the outer destination and the embedded source
//! translated back, if tied to it (at most 1280 bytes; a port unreachable only from the quoted
//! destination, other errors from any router on the path). Anything
//! not found passes untouched: it is the host's.
//!
//! Checksums: the address is in the TCP/UDP/ICMPv6 pseudo-header, so its change goes through
//! `bpf_l4_csum_replace` with `BPF_F_PSEUDO_HDR` (which also handles `CHECKSUM_PARTIAL` packets);
//! ports and identifiers through plain 2-byte replacements. Inside an ICMPv6 error the embedded
//! packet's checksum is recomputed incrementally here (RFC 1624), and the outer ICMPv6 checksum
//! absorbs the difference of every embedded byte changed.
//!
//! Fragments: the first fragment of a datagram carries the L4 header and is translated as above
//! (its L4 checksum covers the whole datagram, so the incremental update for the address and
//! port is the same). The later ones carry neither port nor checksum: only the address changes.
//! When a first fragment is translated, `MASQ6_FRAG` records (source, destination, fragment
//! identification, next header) → the address written, and later fragments with that key get
//! the same address (source on the way out, destination on the way in). A later fragment
//! without a record (out of order, or its first fragment was not translated) passes untouched;
//! on the way out it is counted (`Unparsed`). An ICMPv6 error quoting a later fragment is not
//! translated.
//!
//! Failure policy: a packet that cannot be parsed (truncated, more than four extension headers)
//! passes untouched and is counted (`Unparsed`): masquerade is not a security boundary, and
//! dropping would break the host's own traffic on the uplink.

use aya_ebpf::{
    bindings::{
        BPF_ANY, BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_F_RECOMPUTE_CSUM, BPF_NOEXIST,
        TC_ACT_SHOT, TC_ACT_UNSPEC,
    },
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns, bpf_skb_load_bytes, bpf_skb_store_bytes},
    maps::lpm_trie::Key,
    programs::TcContext,
};
use netpol_common::{
    frag::{Frag6Key, Masq6Frag},
    icmp,
    nat::{
        lifetime, probe_port, Masq6Config, Masq6Counter, Masq6Prefix, Snat6Entry, Snat6Key, PROBES,
        SNAT6_IN, SNAT6_OUT,
    },
    proto,
};

use crate::{
    maps::{MASQ6_CONFIG, MASQ6_FRAG, MASQ6_PREFIX, MASQ6_SCRATCH, MASQ6_STATS, SNAT6},
    parse::{ipv6_frag, Frag, FRAG_FIRST, FRAG_LATER, FRAG_NONE},
};

const PASS: i32 = TC_ACT_UNSPEC;
const SHOT: i32 = TC_ACT_SHOT as i32;
const NS: u64 = 1_000_000_000;
const ETH_P_IPV6: u16 = 0x86dd;

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// What the L4 header of a packet is, for the masquerade.
const K_PORTS: u8 = 1;
const K_ECHO_REQUEST: u8 = 2;
const K_ECHO_REPLY: u8 = 3;
const K_ERROR: u8 = 4;
const K_OTHER: u8 = 5;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Fail {
    /// Leave the packet alone (see the failure policy above).
    Unparsed,
    /// No free port for a new flow: drop.
    NoPort,
}

/// Per-CPU working memory: addresses, keys and values would not fit the 512-byte stack twice over.
#[repr(C)]
pub struct Scratch {
    /// Outer source and destination.
    s: [u8; 16],
    d: [u8; 16],
    /// Embedded source and destination of an ICMPv6 error.
    is: [u8; 16],
    id: [u8; 16],
    /// The address being replaced.
    old: [u8; 16],
    key: Snat6Key,
    pkey: Snat6Key,
    /// The entry found (a copy) or being written.
    val: Snat6Entry,
    pval: Snat6Entry,
    /// The `MASQ6_FRAG` key and value of a fragment.
    fkey: Frag6Key,
    fval: Masq6Frag,
    l3: u32,
    l4off: u32,
    /// Offset of the embedded packet's L4 header (ICMPv6 errors).
    ioff: u32,
    sport: u16,
    dport: u16,
    isport: u16,
    idport: u16,
    proto: u8,
    kind: u8,
    tcp_flags: u8,
    iproto: u8,
    ikind: u8,
    /// ICMPv6 type and code of the packet (errors).
    icmp_type: u8,
    icmp_code: u8,
    _pad: [u8; 1],
}

#[inline(always)]
fn count(c: Masq6Counter) {
    if let Some(p) = MASQ6_STATS.get_ptr_mut(c as u32) {
        // SAFETY: this CPU's slot; no concurrent writer.
        unsafe { *p += 1 };
    }
}

/// Entry point of both programs.
#[inline(always)]
pub fn run(ctx: &TcContext, egress: bool) -> i32 {
    // SAFETY: the context pointer is valid for the program's lifetime.
    let protocol = unsafe { (*ctx.skb.skb).protocol };
    if protocol != u32::from(ETH_P_IPV6.to_be()) {
        return PASS;
    }
    let Some(cfg) = MASQ6_CONFIG.get_ptr(0) else {
        return PASS;
    };
    // SAFETY: array values stay valid while the program runs.
    let cfg = unsafe { &*cfg };
    if cfg.flags & Masq6Config::ENABLED == 0 {
        return PASS;
    }
    let Some(sc) = MASQ6_SCRATCH.get_ptr_mut(0) else {
        return PASS;
    };
    // SAFETY: this CPU's slot; TC programs do not nest on one CPU.
    let sc = unsafe { &mut *sc };
    sc.l3 = cfg.l2_len & 0x3f;
    let r = if egress {
        try_out(ctx, cfg, sc)
    } else {
        try_in(ctx, cfg, sc)
    };
    match r {
        Ok(action) => action,
        Err(Fail::Unparsed) => {
            count(Masq6Counter::Unparsed);
            PASS
        }
        Err(Fail::NoPort) => {
            count(Masq6Counter::NoPort);
            SHOT
        }
    }
}

/// Copies 16 bytes at `off` into `dst` (map memory).
#[inline(always)]
fn load16(ctx: &TcContext, off: u32, dst: &mut [u8; 16]) -> Result<(), Fail> {
    // SAFETY: `dst` is 16 writable bytes; the helper checks the packet bounds.
    let ret =
        unsafe { bpf_skb_load_bytes(ctx.skb.skb as *const _, off, dst.as_mut_ptr().cast(), 16) };
    if ret < 0 {
        return Err(Fail::Unparsed);
    }
    Ok(())
}

/// Writes the 16 bytes of `src` (map memory) at `off`. `outer`: an address of the outer IPv6
/// header, whose change the L4 checksum absorbs through `BPF_F_PSEUDO_HDR`. For such a write
/// `BPF_F_RECOMPUTE_CSUM` is passed: on a `CHECKSUM_COMPLETE` packet, `bpf_l4_csum_replace` with
/// `BPF_F_PSEUDO_HDR` (and without `BPF_F_IPV6`, which kernels before 6.16 refuse) takes the
/// address difference out of `skb->csum` as if an IPv4 header checksum had absorbed it; IPv6 has
/// none, and the recompute puts it back. Bytes inside an ICMPv6 error are balanced by the outer
/// checksum itself and must not touch `skb->csum`.
#[inline(always)]
fn store16(ctx: &TcContext, off: u32, src: &[u8; 16], outer: bool) -> Result<(), Fail> {
    let flags = if outer {
        u64::from(BPF_F_RECOMPUTE_CSUM)
    } else {
        0
    };
    // SAFETY: `src` is 16 readable bytes; the helper checks the packet bounds.
    let ret = unsafe { bpf_skb_store_bytes(ctx.skb.skb, off, src.as_ptr().cast(), 16, flags) };
    if ret < 0 {
        return Err(Fail::Unparsed);
    }
    Ok(())
}

#[inline(always)]
fn load2(ctx: &TcContext, off: u32) -> Result<[u8; 2], Fail> {
    ctx.load::<[u8; 2]>(off as usize)
        .map_err(|_| Fail::Unparsed)
}

#[inline(always)]
fn store2(ctx: &TcContext, off: u32, v: [u8; 2]) -> Result<(), Fail> {
    ctx.store(off as usize, &v, 0).map_err(|_| Fail::Unparsed)
}

/// A 16-bit word as the checksum arithmetic sees it: the bytes in memory order, loaded natively
/// (one's-complement sums are byte-order independent as long as loads and stores agree).
#[inline(always)]
fn word(b: [u8; 2]) -> u32 {
    u32::from(u16::from_ne_bytes(b))
}

/// The one's-complement difference `new - old` of two addresses, as a 32-bit partial sum.
#[inline(always)]
fn addr_diff(old: &[u8; 16], new: &[u8; 16]) -> u32 {
    let mut s: u32 = 0;
    let mut i = 0;
    while i < 16 {
        s += (!word([old[i], old[i + 1]])) & 0xffff;
        s += word([new[i], new[i + 1]]);
        i += 2;
    }
    s
}

/// The one's-complement difference of two 16-bit fields (memory order bytes).
#[inline(always)]
fn word_diff(old: [u8; 2], new: [u8; 2]) -> u32 {
    ((!word(old)) & 0xffff) + word(new)
}

#[inline(always)]
fn fold(mut s: u32) -> u32 {
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s & 0xffff
}

/// RFC 1624 eqn. 3: the checksum field after the covered data changed by `diff`.
#[inline(always)]
fn csum_update(old: [u8; 2], diff: u32) -> [u8; 2] {
    let hc = (!word(old)) & 0xffff;
    let r = !fold(hc + fold(diff)) & 0xffff;
    (r as u16).to_ne_bytes()
}

#[inline(always)]
fn l4_csum(ctx: &TcContext, off: u32, from: u64, to: u64, flags: u64) -> Result<(), Fail> {
    ctx.l4_csum_replace(off as usize, from, to, flags)
        .map_err(|_| Fail::Unparsed)
}

/// The `MASQ6_PREFIX` kind of the longest prefix holding `a` (0: none).
#[inline(always)]
fn prefix_kind(a: &[u8; 16]) -> u32 {
    let key = Key::new(128, *a);
    MASQ6_PREFIX.get(&key).map_or(0, |v: &Masq6Prefix| v.kind)
}

/// Walks the extension headers after the IPv6 header at `off` (next header `next`): the upper
/// protocol, its offset, and where the packet sits in a fragmented datagram (the walk stops at
/// the fragment header of a later fragment). More than four extension headers is `Unparsed`.
#[inline(always)]
fn walk(ctx: &TcContext, off: u32, next: u8) -> Result<(u8, u32, Frag), Fail> {
    let mut next = next;
    let mut off = off;
    let mut frag = Frag {
        pos: FRAG_NONE,
        proto: 0,
        id: 0,
    };
    for _ in 0..4 {
        match next {
            0 | 43 | 60 => {
                let h = load2(ctx, off)?;
                next = h[0];
                off += (u32::from(h[1]) + 1) * 8;
            }
            44 => {
                let h: [u8; 8] = ctx.load(off as usize).map_err(|_| Fail::Unparsed)?;
                next = h[0];
                off += 8;
                frag = ipv6_frag(&h);
                if frag.pos == FRAG_LATER {
                    return Ok((next, off, frag));
                }
            }
            51 => {
                let h = load2(ctx, off)?;
                next = h[0];
                off += (u32::from(h[1]) + 2) * 4;
            }
            _ => return Ok((next, off, frag)),
        }
    }
    match next {
        0 | 43 | 60 | 44 | 51 => Err(Fail::Unparsed),
        _ => Ok((next, off, frag)),
    }
}

/// Parses the L4 header at `sc.l4off` (protocol `sc.proto`) into `sc.kind`, ports, TCP flags.
#[inline(always)]
fn parse_l4(ctx: &TcContext, sc: &mut Scratch) -> Result<(), Fail> {
    let off = sc.l4off as usize;
    sc.tcp_flags = 0;
    sc.sport = 0;
    sc.dport = 0;
    sc.kind = K_OTHER;
    match sc.proto {
        proto::TCP => {
            let h: [u8; 18] = ctx.load(off).map_err(|_| Fail::Unparsed)?;
            sc.sport = u16::from_be_bytes([h[0], h[1]]);
            sc.dport = u16::from_be_bytes([h[2], h[3]]);
            sc.tcp_flags = h[13];
            sc.kind = K_PORTS;
        }
        proto::UDP => {
            let h: [u8; 8] = ctx.load(off).map_err(|_| Fail::Unparsed)?;
            sc.sport = u16::from_be_bytes([h[0], h[1]]);
            sc.dport = u16::from_be_bytes([h[2], h[3]]);
            sc.kind = K_PORTS;
        }
        proto::ICMPV6 => {
            let h: [u8; 8] = ctx.load(off).map_err(|_| Fail::Unparsed)?;
            let id = u16::from_be_bytes([h[4], h[5]]);
            sc.icmp_type = h[0];
            sc.icmp_code = h[1];
            match h[0] {
                128 => {
                    sc.kind = K_ECHO_REQUEST;
                    sc.sport = id;
                }
                129 => {
                    sc.kind = K_ECHO_REPLY;
                    sc.dport = id;
                }
                t if icmp::v6_error(t) => sc.kind = K_ERROR,
                _ => {}
            }
        }
        _ => {}
    }
    Ok(())
}

/// Offset of the checksum field of an L4 header at `off`.
#[inline(always)]
fn csum_off(proto: u8, off: u32) -> u32 {
    match proto {
        proto::TCP => off + 16,
        proto::UDP => off + 6,
        _ => off + 2,
    }
}

/// Extra `bpf_l4_csum_replace` flags: UDP's checksum 0 means "none" and a result of 0 is 0xffff.
#[inline(always)]
fn mangled(proto: u8) -> u64 {
    if proto == proto::UDP {
        u64::from(BPF_F_MARK_MANGLED_0)
    } else {
        0
    }
}

/// Refreshes an entry hit by a packet; `true` when its state or expiry changed (its partner is
/// then brought along).
#[inline(always)]
fn touch(e: &mut Snat6Entry, proto: u8, tcp_flags: u8, reply: bool, now: u64) -> bool {
    let mut f = e.flags;
    if proto == proto::TCP {
        if tcp_flags & (TCP_FIN | TCP_RST) != 0 {
            f |= Snat6Entry::CLOSING;
        } else if !reply
            && tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
            && f & Snat6Entry::CLOSING != 0
        {
            // The tuple is reused by a new connection.
            f &= !(Snat6Entry::CLOSING | Snat6Entry::SEEN_REPLY);
        }
    }
    if reply {
        f |= Snat6Entry::SEEN_REPLY;
    }
    let expires = now + lifetime::of(proto, f) * NS;
    if f != e.flags || expires > e.expires_ns + NS {
        e.flags = f;
        e.expires_ns = expires;
        return true;
    }
    false
}

/// Brings the partner of a refreshed entry (key `sc.pkey`, expected value `sc.pval`) to the same
/// state and expiry; recreates it when the LRU evicted it. `false`: the partner is another
/// flow's (the host's, or another address or port: the LRU evicted this flow's and another
/// flow claimed its key since), left alone.
#[inline(always)]
fn sync_partner(sc: &mut Scratch) -> bool {
    match SNAT6.get_ptr_mut(&sc.pkey) {
        Some(p) => {
            // SAFETY: pointer from a map lookup, valid while the program runs.
            let p = unsafe { &mut *p };
            if p.flags & Snat6Entry::HOST == 0
                && p.addr == sc.pval.addr
                && p.port() == sc.pval.port()
            {
                p.flags = sc.pval.flags;
                p.expires_ns = sc.pval.expires_ns;
                return true;
            }
            false
        }
        None => SNAT6
            .insert(&sc.pkey, &sc.pval, u64::from(BPF_NOEXIST))
            .is_ok(),
    }
}

#[inline(always)]
fn try_out(ctx: &TcContext, cfg: &Masq6Config, sc: &mut Scratch) -> Result<i32, Fail> {
    let l3 = sc.l3;
    let head: [u8; 8] = ctx.load(l3 as usize).map_err(|_| Fail::Unparsed)?;
    if head[0] >> 4 != 6 {
        return Err(Fail::Unparsed);
    }
    load16(ctx, l3 + 8, &mut sc.s)?;
    load16(ctx, l3 + 24, &mut sc.d)?;
    if prefix_kind(&sc.s) != Masq6Prefix::MASQUERADE {
        if sc.s == cfg.addr && cfg.flags & Masq6Config::RESERVE_HOST_PORTS != 0 {
            return reserve_host(ctx, cfg, sc, head[6]);
        }
        return Ok(PASS);
    }
    if prefix_kind(&sc.d) != 0 {
        return Ok(PASS);
    }
    let (p, l4off, frag) = walk(ctx, l3 + 40, head[6])?;
    if frag.pos == FRAG_LATER {
        return later_fragment(ctx, sc, &frag, true);
    }
    sc.proto = p;
    sc.l4off = l4off;
    parse_l4(ctx, sc)?;
    match sc.kind {
        K_PORTS | K_ECHO_REQUEST => {}
        K_ERROR => return out_error(ctx, cfg, sc),
        _ => return Ok(PASS),
    }
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    sc.key = Snat6Key::new(sc.s, sc.d, sc.sport, sc.dport, sc.proto, SNAT6_OUT);
    let mut hit = false;
    if let Some(e) = SNAT6.get_ptr_mut(&sc.key) {
        // SAFETY: pointer from a map lookup, valid while the program runs.
        let e = unsafe { &mut *e };
        if e.expires_ns >= now && e.addr == cfg.addr {
            hit = true;
            if touch(e, sc.proto, sc.tcp_flags, false, now) {
                sc.pval = Snat6Entry::new(sc.s, sc.sport, e.flags, e.expires_ns);
                sc.pkey = Snat6Key::new(sc.d, e.addr, sc.dport, e.port(), sc.proto, SNAT6_IN);
                // The replies of this translated tuple go to another flow now (its *in* entry
                // was evicted and the key claimed since): sending on it would hand this flow's
                // replies to that one (another container). A new mapping instead.
                hit = sync_partner(sc);
            }
            sc.val = *e;
        }
    }
    if !hit {
        if sc.proto == proto::TCP
            && (sc.tcp_flags & TCP_RST != 0
                || sc.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK)
        {
            // A reset or a SYN-ACK opens nothing: it answers a connection that came in.
            return Ok(PASS);
        }
        new_mapping(cfg, sc, now)?;
    }
    // Rewrite the source: address (pseudo-header), then the port or echo identifier.
    sc.old = sc.s;
    let port_off = if sc.kind == K_PORTS {
        sc.l4off
    } else {
        sc.l4off + 4
    };
    rewrite(ctx, sc, l3 + 8, port_off, sc.sport)?;
    if frag.pos == FRAG_FIRST {
        record_fragment(sc, &frag, SNAT6_OUT);
    }
    count(Masq6Counter::Out);
    Ok(PASS)
}

/// Records the address just written into the first fragment of a datagram (`sc.s → sc.d` as it
/// arrived) for its later fragments.
#[inline(always)]
fn record_fragment(sc: &mut Scratch, frag: &Frag, dir: u8) {
    sc.fkey = Frag6Key::new(sc.s, sc.d, frag.id, frag.proto);
    sc.fval = Masq6Frag {
        addr: sc.val.addr,
        dir,
        _pad: [0; 3],
    };
    let _ = MASQ6_FRAG.insert(&sc.fkey, &sc.fval, u64::from(BPF_ANY));
}

/// A later fragment (`sc.s → sc.d`): the address its first fragment got, as source (`egress`)
/// or destination. Only the address: the port and the L4 checksum are in the first fragment, and
/// the IPv6 header has no checksum.
#[inline(always)]
fn later_fragment(
    ctx: &TcContext,
    sc: &mut Scratch,
    frag: &Frag,
    egress: bool,
) -> Result<i32, Fail> {
    sc.fkey = Frag6Key::new(sc.s, sc.d, frag.id, frag.proto);
    let dir = if egress { SNAT6_OUT } else { SNAT6_IN };
    let found = match MASQ6_FRAG.get_ptr(&sc.fkey) {
        Some(v) => {
            // SAFETY: pointer from a map lookup, valid while the program runs.
            sc.fval = unsafe { *v };
            sc.fval.dir == dir
        }
        None => false,
    };
    if !found {
        // Out: a container's fragment the masquerade cannot place; in: the host's.
        return if egress {
            Err(Fail::Unparsed)
        } else {
            Ok(PASS)
        };
    }
    let off = if egress { sc.l3 + 8 } else { sc.l3 + 24 };
    store16(ctx, off, &sc.fval.addr, true)?;
    count(if egress {
        Masq6Counter::Out
    } else {
        Masq6Counter::In
    });
    Ok(PASS)
}

/// Writes `sc.val.addr` over `sc.old` at `addr_off` and `sc.val.port()` over `old_port` at
/// `port_off`, updating the L4 checksum of `sc.proto` at `sc.l4off`.
#[inline(always)]
fn rewrite(
    ctx: &TcContext,
    sc: &mut Scratch,
    addr_off: u32,
    port_off: u32,
    old_port: u16,
) -> Result<(), Fail> {
    let coff = csum_off(sc.proto, sc.l4off);
    let m = mangled(sc.proto);
    let diff = addr_diff(&sc.old, &sc.val.addr);
    l4_csum(
        ctx,
        coff,
        0,
        u64::from(diff),
        u64::from(BPF_F_PSEUDO_HDR) | m,
    )?;
    store16(ctx, addr_off, &sc.val.addr, true)?;
    let new_port = sc.val.port();
    if new_port != old_port {
        let o = old_port.to_be_bytes();
        let n = new_port.to_be_bytes();
        l4_csum(ctx, coff, u64::from(word(o)), u64::from(word(n)), 2 | m)?;
        store2(ctx, port_off, n)?;
    }
    Ok(())
}

/// Claims a translated port for the flow `sc.key` (container → remote) and writes both entries;
/// `sc.val` is left holding the *out* entry.
#[inline(always)]
fn new_mapping(cfg: &Masq6Config, sc: &mut Scratch, now: u64) -> Result<(), Fail> {
    let expires = now + lifetime::of(sc.proto, 0) * NS;
    // The *in* entry: replies go back to the container's address and port.
    sc.pval = Snat6Entry::new(sc.s, sc.sport, 0, expires);
    sc.pkey = Snat6Key::new(sc.d, cfg.addr, sc.dport, 0, sc.proto, SNAT6_IN);
    // SAFETY: plain helper call.
    let start = unsafe { bpf_get_prandom_u32() };
    let mut chosen: u32 = 0x10000;
    for i in 0..PROBES {
        let Some(cand) = probe_port(sc.sport, cfg.port_min, cfg.port_max, start, i) else {
            break;
        };
        sc.pkey.set_dport(cand);
        let claimed = match SNAT6.get_ptr(&sc.pkey) {
            None => SNAT6
                .insert(&sc.pkey, &sc.pval, u64::from(BPF_NOEXIST))
                .is_ok(),
            Some(e) => {
                // SAFETY: pointer from a map lookup, valid while the program runs.
                let e = unsafe { &*e };
                let mine =
                    e.flags & Snat6Entry::HOST == 0 && e.addr == sc.s && e.port() == sc.sport;
                (e.expires_ns < now || mine)
                    && SNAT6.insert(&sc.pkey, &sc.pval, u64::from(BPF_ANY)).is_ok()
            }
        };
        if claimed {
            chosen = u32::from(cand);
            break;
        }
    }
    if chosen > 0xffff {
        return Err(Fail::NoPort);
    }
    let port = chosen as u16;
    sc.val = Snat6Entry::new(cfg.addr, port, 0, expires);
    // The *out* entry last: a reply can only arrive once the packet has left.
    let _ = SNAT6.insert(&sc.key, &sc.val, u64::from(BPF_ANY));
    count(Masq6Counter::NewMapping);
    if port != sc.sport {
        count(Masq6Counter::PortRewritten);
    }
    Ok(())
}

/// The host's own flow (source = the uplink address): reserve its tuple as an *in* entry flagged
/// `HOST`, so no container flow is handed it and `masq6_in` leaves its replies alone.
#[inline(always)]
fn reserve_host(
    ctx: &TcContext,
    cfg: &Masq6Config,
    sc: &mut Scratch,
    next: u8,
) -> Result<i32, Fail> {
    let (p, l4off, frag) = walk(ctx, sc.l3 + 40, next)?;
    if frag.pos == FRAG_LATER {
        return Ok(PASS);
    }
    sc.proto = p;
    sc.l4off = l4off;
    parse_l4(ctx, sc)?;
    if sc.kind != K_PORTS && sc.kind != K_ECHO_REQUEST {
        return Ok(PASS);
    }
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    sc.pkey = Snat6Key::new(sc.d, cfg.addr, sc.dport, sc.sport, sc.proto, SNAT6_IN);
    // A live container flow holds the tuple (by chance, or on purpose: its own source port in
    // the host's ephemeral range, to a server the host talks to).
    let mut held = false;
    if let Some(e) = SNAT6.get_ptr_mut(&sc.pkey) {
        // SAFETY: pointer from a map lookup, valid while the program runs.
        let e = unsafe { &mut *e };
        if e.flags & Snat6Entry::HOST != 0 {
            touch(e, sc.proto, sc.tcp_flags, false, now);
            return Ok(PASS);
        }
        if e.expires_ns >= now {
            held = true;
            sc.val = *e;
        }
    }
    if sc.proto == proto::TCP && sc.tcp_flags & TCP_RST != 0 {
        return Ok(PASS);
    }
    if held {
        // The host's flow takes the tuple: its replies must never be translated to a
        // container. The container's *out* entry goes too (if it still maps to this tuple), so
        // its next packet gets a new mapping instead of going out on the host's tuple.
        count(Masq6Counter::HostConflict);
        sc.key = Snat6Key::new(
            sc.val.addr,
            sc.d,
            sc.val.port(),
            sc.dport,
            sc.proto,
            SNAT6_OUT,
        );
        if let Some(o) = SNAT6.get_ptr(&sc.key) {
            // SAFETY: pointer from a map lookup, valid while the program runs.
            let o = unsafe { &*o };
            if o.addr == cfg.addr && o.port() == sc.sport {
                let _ = SNAT6.remove(&sc.key);
            }
        }
    }
    let expires = now + lifetime::of(sc.proto, Snat6Entry::HOST) * NS;
    sc.pval = Snat6Entry::new(cfg.addr, sc.sport, Snat6Entry::HOST, expires);
    let _ = SNAT6.insert(&sc.pkey, &sc.pval, u64::from(BPF_ANY));
    Ok(PASS)
}

#[inline(always)]
fn try_in(ctx: &TcContext, cfg: &Masq6Config, sc: &mut Scratch) -> Result<i32, Fail> {
    let l3 = sc.l3;
    let head: [u8; 8] = ctx.load(l3 as usize).map_err(|_| Fail::Unparsed)?;
    if head[0] >> 4 != 6 {
        return Err(Fail::Unparsed);
    }
    load16(ctx, l3 + 24, &mut sc.d)?;
    if sc.d != cfg.addr {
        return Ok(PASS);
    }
    load16(ctx, l3 + 8, &mut sc.s)?;
    let (p, l4off, frag) = walk(ctx, l3 + 40, head[6])?;
    if frag.pos == FRAG_LATER {
        return later_fragment(ctx, sc, &frag, false);
    }
    sc.proto = p;
    sc.l4off = l4off;
    parse_l4(ctx, sc)?;
    match sc.kind {
        K_PORTS | K_ECHO_REPLY => {}
        K_ERROR => return in_error(ctx, cfg, sc),
        _ => return Ok(PASS),
    }
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    sc.key = Snat6Key::new(sc.s, sc.d, sc.sport, sc.dport, sc.proto, SNAT6_IN);
    let Some(e) = SNAT6.get_ptr_mut(&sc.key) else {
        return Ok(PASS);
    };
    // SAFETY: pointer from a map lookup, valid while the program runs.
    let e = unsafe { &mut *e };
    if e.expires_ns < now {
        return Ok(PASS);
    }
    if e.flags & Snat6Entry::HOST != 0 {
        touch(e, sc.proto, sc.tcp_flags, true, now);
        return Ok(PASS);
    }
    let changed = touch(e, sc.proto, sc.tcp_flags, true, now);
    sc.val = *e;
    if changed {
        sc.pval = Snat6Entry::new(cfg.addr, sc.dport, sc.val.flags, sc.val.expires_ns);
        sc.pkey = Snat6Key::new(
            sc.val.addr,
            sc.s,
            sc.val.port(),
            sc.sport,
            sc.proto,
            SNAT6_OUT,
        );
        sync_partner(sc);
    }
    sc.old = sc.d;
    let port_off = if sc.kind == K_PORTS {
        sc.l4off + 2
    } else {
        sc.l4off + 4
    };
    rewrite(ctx, sc, l3 + 24, port_off, sc.dport)?;
    if frag.pos == FRAG_FIRST {
        record_fragment(sc, &frag, SNAT6_IN);
    }
    count(Masq6Counter::In);
    Ok(PASS)
}

/// Parses the packet embedded in the ICMPv6 error at `sc.l4off`: addresses into `sc.is`/`sc.id`,
/// protocol, L4 offset, and ports as conntrack sees them (echo: identifier as the source port of
/// a request, the destination port of a reply). `Ok(false)`: not a packet the masquerade knows.
#[inline(always)]
fn parse_inner(ctx: &TcContext, sc: &mut Scratch) -> Result<bool, Fail> {
    let ip = sc.l4off + 8;
    let head: [u8; 8] = ctx.load(ip as usize).map_err(|_| Fail::Unparsed)?;
    if head[0] >> 4 != 6 {
        return Err(Fail::Unparsed);
    }
    load16(ctx, ip + 8, &mut sc.is)?;
    load16(ctx, ip + 24, &mut sc.id)?;
    let (p, ioff, frag) = walk(ctx, ip + 40, head[6])?;
    if frag.pos == FRAG_LATER {
        // A quoted later fragment has no ports to translate back.
        return Ok(false);
    }
    sc.iproto = p;
    sc.ioff = ioff;
    let h: [u8; 8] = ctx.load(ioff as usize).map_err(|_| Fail::Unparsed)?;
    let a = u16::from_be_bytes([h[0], h[1]]);
    let b = u16::from_be_bytes([h[2], h[3]]);
    let id = u16::from_be_bytes([h[4], h[5]]);
    sc.isport = 0;
    sc.idport = 0;
    match p {
        proto::TCP | proto::UDP => {
            sc.ikind = K_PORTS;
            sc.isport = a;
            sc.idport = b;
        }
        proto::ICMPV6 => match h[0] {
            128 => {
                sc.ikind = K_ECHO_REQUEST;
                sc.isport = id;
            }
            129 => {
                sc.ikind = K_ECHO_REPLY;
                sc.idport = id;
            }
            _ => return Ok(false),
        },
        _ => return Ok(false),
    }
    Ok(true)
}

/// Whether the ICMPv6 error in `sc` (quoted packet parsed) is tied to its quoted packet by
/// netpol-common's `icmp` rules, as the per-container programs require: outbound, it goes back to
/// the quoted source from the quoted destination; inbound, it quotes a packet the uplink address
/// sent (checked by the caller), a port unreachable comes from the quoted destination; at most
/// 1280 bytes. An error that is not is left untranslated (it stays the host's, or leaves with
/// the container's own source).
#[inline(always)]
fn tied(ctx: &TcContext, sc: &Scratch, outbound: bool) -> bool {
    let e = icmp::ErrorMsg {
        outbound,
        v6: true,
        ty: sc.icmp_type,
        code: sc.icmp_code,
        len: ctx.len().saturating_sub(sc.l3),
        local: true,
        src_is_quoted_dst: sc.s == sc.id,
        dst_is_quoted_src: sc.d == sc.is,
    };
    icmp::tied(&e)
}

/// An ICMPv6 error arriving for the uplink address about a packet a container sent (now carrying
/// the uplink address and translated port as its source).
#[inline(always)]
fn in_error(ctx: &TcContext, cfg: &Masq6Config, sc: &mut Scratch) -> Result<i32, Fail> {
    if !parse_inner(ctx, sc)? || sc.is != cfg.addr {
        return Ok(PASS);
    }
    if sc.ikind == K_ECHO_REPLY || !tied(ctx, sc, false) {
        return Ok(PASS);
    }
    // The reply tuple of the embedded packet is the *in* key of its flow.
    sc.key = Snat6Key::new(sc.id, sc.is, sc.idport, sc.isport, sc.iproto, SNAT6_IN);
    let Some(e) = SNAT6.get_ptr(&sc.key) else {
        return Ok(PASS);
    };
    // SAFETY: pointer from a map lookup, valid while the program runs.
    sc.val = unsafe { *e };
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    if sc.val.flags & Snat6Entry::HOST != 0 || sc.val.expires_ns < now {
        return Ok(PASS);
    }
    sc.old = sc.d;
    let inner_port_off = if sc.ikind == K_PORTS {
        sc.ioff
    } else {
        sc.ioff + 4
    };
    let isport = sc.isport;
    xlate_error(ctx, sc, sc.l3 + 24, sc.l4off + 16, inner_port_off, isport)?;
    count(Masq6Counter::IcmpError);
    Ok(PASS)
}

/// An ICMPv6 error a container sends about a packet it received through the masquerade
/// (embedded destination = the container, embedded source = the remote).
#[inline(always)]
fn out_error(ctx: &TcContext, cfg: &Masq6Config, sc: &mut Scratch) -> Result<i32, Fail> {
    if !parse_inner(ctx, sc)? || sc.id != sc.s {
        return Ok(PASS);
    }
    if sc.ikind == K_ECHO_REQUEST || !tied(ctx, sc, true) {
        return Ok(PASS);
    }
    sc.key = Snat6Key::new(sc.id, sc.is, sc.idport, sc.isport, sc.iproto, SNAT6_OUT);
    let Some(e) = SNAT6.get_ptr(&sc.key) else {
        return Ok(PASS);
    };
    // SAFETY: pointer from a map lookup, valid while the program runs.
    sc.val = unsafe { *e };
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    if sc.val.addr != cfg.addr || sc.val.expires_ns < now {
        return Ok(PASS);
    }
    sc.old = sc.s;
    let inner_port_off = if sc.ikind == K_PORTS {
        sc.ioff + 2
    } else {
        sc.ioff + 4
    };
    let idport = sc.idport;
    xlate_error(ctx, sc, sc.l3 + 8, sc.l4off + 32, inner_port_off, idport)?;
    count(Masq6Counter::IcmpError);
    Ok(PASS)
}

/// Rewrites an ICMPv6 error: `sc.old` becomes `sc.val.addr` in the outer header at `addr_off` and
/// in the embedded header at `inner_addr_off`; the embedded port or identifier at
/// `inner_port_off` goes from `old_port` to `sc.val.port()`; the embedded L4 checksum and the
/// outer ICMPv6 checksum follow.
#[inline(always)]
fn xlate_error(
    ctx: &TcContext,
    sc: &mut Scratch,
    addr_off: u32,
    inner_addr_off: u32,
    inner_port_off: u32,
    old_port: u16,
) -> Result<(), Fail> {
    let outer_csum = sc.l4off + 2;
    let adiff = addr_diff(&sc.old, &sc.val.addr);
    // The outer address is in the ICMPv6 pseudo-header.
    l4_csum(
        ctx,
        outer_csum,
        0,
        u64::from(adiff),
        u64::from(BPF_F_PSEUDO_HDR),
    )?;
    store16(ctx, addr_off, &sc.val.addr, true)?;

    // Every embedded byte changed is covered by the outer checksum.
    let mut body = adiff;
    store16(ctx, inner_addr_off, &sc.val.addr, false)?;
    let o = old_port.to_be_bytes();
    let n = sc.val.port().to_be_bytes();
    let pdiff = if o != n { word_diff(o, n) } else { 0 };
    if o != n {
        store2(ctx, inner_port_off, n)?;
        body += pdiff;
    }
    // The embedded L4 checksum covers its own pseudo-header (the address) and the port. It may
    // be cut off in a truncated quote: then there is nothing to fix.
    let icsum_off = csum_off(sc.iproto, sc.ioff);
    if let Ok(old) = load2(ctx, icsum_off) {
        let udp_none = sc.iproto == proto::UDP && old == [0, 0];
        if !udp_none {
            let mut new = csum_update(old, adiff + pdiff);
            if sc.iproto == proto::UDP && new == [0, 0] {
                new = [0xff, 0xff];
            }
            store2(ctx, icsum_off, new)?;
            body += word_diff(old, new);
        }
    }
    l4_csum(ctx, outer_csum, 0, u64::from(body), 0)
}
