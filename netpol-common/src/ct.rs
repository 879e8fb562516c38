//! `CT4` / `CT6`: connection tracking, LRU hashes.
//!
//! An entry is keyed by the tuple of the packet that opened the flow, as seen at the endpoint that
//! admitted it, plus the side that admitted it: [`CtDir::Egress`] when the container opened it
//! (`from_container`), [`CtDir::Ingress`] when it was delivered to the container
//! (`to_container`). A packet is part of an established flow when its own tuple is in the map with
//! the direction of the program that sees it, or when its reversed tuple is there with the other
//! direction (a reply). ICMP echo uses the identifier as source port of the request and
//! destination port of the reply, so a reply reverses onto its request.

/// Which program admitted a flow.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CtDir {
    Ingress = 0,
    Egress = 1,
}

/// 4-byte aligned (same layout): the datapath builds keys with word stores, not byte copies.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtKey4 {
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    sport: [u8; 2],
    dport: [u8; 2],
    pub proto: u8,
    pub dir: u8,
    pub _pad: [u8; 2],
}

impl CtKey4 {
    #[inline(always)]
    pub const fn new(
        saddr: [u8; 4],
        daddr: [u8; 4],
        sport: u16,
        dport: u16,
        proto: u8,
        dir: CtDir,
    ) -> Self {
        Self {
            saddr,
            daddr,
            sport: sport.to_be_bytes(),
            dport: dport.to_be_bytes(),
            proto,
            dir: dir as u8,
            _pad: [0; 2],
        }
    }

    /// The tuple of a reply, admitted by the other side.
    #[inline(always)]
    pub const fn reversed(&self, dir: CtDir) -> Self {
        Self {
            saddr: self.daddr,
            daddr: self.saddr,
            sport: self.dport,
            dport: self.sport,
            proto: self.proto,
            dir: dir as u8,
            _pad: [0; 2],
        }
    }

    pub const fn sport(&self) -> u16 {
        u16::from_be_bytes(self.sport)
    }

    pub const fn dport(&self) -> u16 {
        u16::from_be_bytes(self.dport)
    }
}

#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtKey6 {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    sport: [u8; 2],
    dport: [u8; 2],
    pub proto: u8,
    pub dir: u8,
    pub _pad: [u8; 2],
}

impl CtKey6 {
    #[inline(always)]
    pub const fn new(
        saddr: [u8; 16],
        daddr: [u8; 16],
        sport: u16,
        dport: u16,
        proto: u8,
        dir: CtDir,
    ) -> Self {
        Self {
            saddr,
            daddr,
            sport: sport.to_be_bytes(),
            dport: dport.to_be_bytes(),
            proto,
            dir: dir as u8,
            _pad: [0; 2],
        }
    }

    #[inline(always)]
    pub const fn reversed(&self, dir: CtDir) -> Self {
        Self {
            saddr: self.daddr,
            daddr: self.saddr,
            sport: self.dport,
            dport: self.sport,
            proto: self.proto,
            dir: dir as u8,
            _pad: [0; 2],
        }
    }

    pub const fn sport(&self) -> u16 {
        u16::from_be_bytes(self.sport)
    }

    pub const fn dport(&self) -> u16 {
        u16::from_be_bytes(self.dport)
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtEntry {
    /// `bpf_ktime_get_ns()` after which the entry is stale.
    pub expires_ns: u64,
    /// Bit set of `CtEntry::*` flags.
    pub flags: u32,
    /// The policy rule that admitted the flow (0 when the direction was not enforced).
    pub rule: u32,
}

impl CtEntry {
    /// A packet in the reply direction was seen.
    pub const SEEN_REPLY: u32 = 1 << 0;
    /// A FIN or RST was seen: the entry gets the short closing lifetime.
    pub const CLOSING: u32 = 1 << 1;
}

/// Lifetimes (seconds), as Cilium's defaults.
pub const LIFETIME_TCP_SYN: u64 = 60;
pub const LIFETIME_TCP: u64 = 21_600;
pub const LIFETIME_TCP_CLOSING: u64 = 10;
pub const LIFETIME_NON_TCP: u64 = 60;
