//! IPv6 masquerade on the uplink: `SNAT6`, `MASQ6_CONFIG`, `MASQ6_PREFIX`.
//!
//! A masqueraded flow has two `SNAT6` entries, written together when its first packet leaves:
//! - **out** (`dir = OUT`), keyed by the container's own tuple
//!   (container address, remote address, container port, remote port, protocol); its value is the
//!   uplink address and the translated port to write as source.
//! - **in** (`dir = IN`), keyed by the tuple a reply carries
//!   (remote address, uplink address, remote port, translated port, protocol); its value is the
//!   container address and port to write as destination.
//!
//! The *in* key is what must be unique: two flows may share a translated port as long as they talk
//! to different remote address/port pairs (endpoint-dependent mapping, as Linux's MASQUERADE).
//! ICMPv6 echo uses the identifier as the source "port" of a request and the destination "port"
//! of a reply, so a reply's key is the reversed request key (same convention as conntrack).
//! Entries carry their own expiry (`CLOCK_MONOTONIC` nanoseconds, `bpf_ktime_get_ns`); the LRU map
//! also evicts the least recently used pairs when it is full.
//!
//! The host's own flows through the uplink (source = the uplink address) get an *in* entry flagged
//! [`Snat6Entry::HOST`] and no *out* entry: it reserves their port so no container flow is given
//! the same tuple, and `masq6_in` lets their packets pass untouched.

/// Map names only this module uses (not part of `maps::ALL`).
pub mod maps {
    /// Per-CPU counters of the masquerade programs, indexed by [`super::Masq6Counter`].
    pub const MASQ6_STATS: &str = "MASQ6_STATS";
    /// Per-CPU working memory of the masquerade programs.
    pub const MASQ6_SCRATCH: &str = "MASQ6_SCRATCH";
    /// The translated address of fragmented datagrams (`crate::frag::Masq6Frag`), pinned.
    pub const MASQ6_FRAG: &str = "MASQ6_FRAG";
}

/// `Snat6Key::dir` of the entry written for the container's own direction.
pub const SNAT6_OUT: u8 = 0;
/// `Snat6Key::dir` of the entry matching replies arriving at the uplink address.
pub const SNAT6_IN: u8 = 1;

/// Lifetimes of `SNAT6` entries, in seconds.
pub mod lifetime {
    /// TCP before the first reply (SYN sent).
    pub const TCP_SYN: u64 = 60;
    /// TCP once both sides have spoken (RFC 5382: at least 2 h 4 min).
    pub const TCP_ESTABLISHED: u64 = 7440;
    /// TCP after a FIN or RST (covers TIME_WAIT's retransmissions).
    pub const TCP_CLOSING: u64 = 60;
    /// UDP (RFC 4787 asks for at least 2 minutes).
    pub const UDP: u64 = 120;
    /// ICMPv6 echo.
    pub const ICMP: u64 = 30;

    /// The lifetime of an entry of `proto` with the given [`super::Snat6Entry`] flags.
    #[inline(always)]
    pub const fn of(proto: u8, flags: u8) -> u64 {
        match proto {
            crate::proto::TCP => {
                if flags & super::Snat6Entry::CLOSING != 0 {
                    TCP_CLOSING
                } else if flags & super::Snat6Entry::SEEN_REPLY != 0 {
                    TCP_ESTABLISHED
                } else {
                    TCP_SYN
                }
            }
            crate::proto::UDP => UDP,
            _ => ICMP,
        }
    }
}

/// Key of `SNAT6`: one direction of a translated flow (see the module documentation).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Snat6Key {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// Network order.
    sport: [u8; 2],
    dport: [u8; 2],
    pub proto: u8,
    /// [`SNAT6_OUT`] or [`SNAT6_IN`].
    pub dir: u8,
    pub _pad: [u8; 2],
}

impl Snat6Key {
    #[inline(always)]
    pub const fn new(
        saddr: [u8; 16],
        daddr: [u8; 16],
        sport: u16,
        dport: u16,
        proto: u8,
        dir: u8,
    ) -> Self {
        Self {
            saddr,
            daddr,
            sport: sport.to_be_bytes(),
            dport: dport.to_be_bytes(),
            proto,
            dir,
            _pad: [0; 2],
        }
    }

    pub const fn sport(&self) -> u16 {
        u16::from_be_bytes(self.sport)
    }

    pub const fn dport(&self) -> u16 {
        u16::from_be_bytes(self.dport)
    }

    #[inline(always)]
    pub fn set_sport(&mut self, port: u16) {
        self.sport = port.to_be_bytes();
    }

    #[inline(always)]
    pub fn set_dport(&mut self, port: u16) {
        self.dport = port.to_be_bytes();
    }
}

/// Value of `SNAT6`: the address and port to write, and the flow's state and expiry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Snat6Entry {
    /// *out*: the uplink address; *in*: the container address.
    pub addr: [u8; 16],
    /// *out*: the translated port; *in*: the container's port. Network order.
    port: [u8; 2],
    /// `HOST`, `SEEN_REPLY`, `CLOSING`.
    pub flags: u8,
    pub _pad: [u8; 5],
    /// `CLOCK_MONOTONIC` nanoseconds after which the entry is free to be reused.
    pub expires_ns: u64,
}

impl Snat6Entry {
    /// A flow of the host itself (reservation only, never translated).
    pub const HOST: u8 = 1;
    /// A reply was seen (TCP: established).
    pub const SEEN_REPLY: u8 = 2;
    /// A FIN or RST was seen.
    pub const CLOSING: u8 = 4;

    #[inline(always)]
    pub const fn new(addr: [u8; 16], port: u16, flags: u8, expires_ns: u64) -> Self {
        Self {
            addr,
            port: port.to_be_bytes(),
            flags,
            _pad: [0; 5],
            expires_ns,
        }
    }

    pub const fn port(&self) -> u16 {
        u16::from_be_bytes(self.port)
    }
}

/// Single entry of `MASQ6_CONFIG`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Masq6Config {
    /// The uplink's global address that replaces container sources.
    pub addr: [u8; 16],
    /// Source ports/identifiers handed out on collision, host order, inclusive.
    pub port_min: u16,
    pub port_max: u16,
    /// `ENABLED`, `RESERVE_HOST_PORTS`.
    pub flags: u32,
    /// Length of the link-layer header on the uplink: 14 on Ethernet, 0 on raw-IP devices
    /// (WireGuard, tun).
    pub l2_len: u32,
    pub _pad: u32,
}

impl Masq6Config {
    /// Masquerade is on.
    pub const ENABLED: u32 = 1;
    /// Reserve the tuples of the host's own flows so container flows never take them.
    pub const RESERVE_HOST_PORTS: u32 = 2;
}

/// Value of the `MASQ6_PREFIX` LPM trie (key: an IPv6 prefix).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Masq6Prefix {
    /// [`Masq6Prefix::MASQUERADE`] or [`Masq6Prefix::LOCAL`].
    pub kind: u32,
}

impl Masq6Prefix {
    /// Sources in this prefix are masqueraded (a container network).
    pub const MASQUERADE: u32 = 1;
    /// Never translate traffic to this prefix (host addresses, other local networks).
    pub const LOCAL: u32 = 2;
}

/// Indexes of the `MASQ6_STATS` per-CPU counters.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Masq6Counter {
    /// Packets translated leaving the uplink.
    Out = 0,
    /// Packets translated arriving on the uplink.
    In = 1,
    /// ICMPv6 errors translated (either way).
    IcmpError = 2,
    /// New mappings.
    NewMapping = 3,
    /// New mappings that could not keep their original port.
    PortRewritten = 4,
    /// Packets dropped: no free port after probing the range.
    NoPort = 5,
    /// Host flows whose tuple a container flow already held: the host's flow takes it (its
    /// replies stay the host's) and the container flow loses its mapping.
    HostConflict = 6,
    /// Packets left alone because they could not be parsed (truncated, too many extension
    /// headers, non-initial fragments).
    Unparsed = 7,
}

impl Masq6Counter {
    pub const COUNT: u32 = 8;
    pub const ALL: [Masq6Counter; 8] = [
        Self::Out,
        Self::In,
        Self::IcmpError,
        Self::NewMapping,
        Self::PortRewritten,
        Self::NoPort,
        Self::HostConflict,
        Self::Unparsed,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Out => "translated-out",
            Self::In => "translated-in",
            Self::IcmpError => "icmp-errors",
            Self::NewMapping => "new-mappings",
            Self::PortRewritten => "ports-rewritten",
            Self::NoPort => "dropped-no-port",
            Self::HostConflict => "host-conflicts",
            Self::Unparsed => "unparsed",
        }
    }
}

/// Candidate translated port number `i` (0 = the original port, then `PROBES - 1` ports of the
/// range from a random start). `None` when the range is empty and `i > 0`.
#[inline(always)]
pub const fn probe_port(original: u16, min: u16, max: u16, start: u32, i: u32) -> Option<u16> {
    if i == 0 {
        return Some(original);
    }
    if min == 0 || max < min {
        return None;
    }
    let span = (max - min) as u32 + 1;
    Some(min + ((start.wrapping_add(i)) % span) as u16)
}

/// How many candidate ports a new mapping tries before the packet is dropped.
pub const PROBES: u32 = 16;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_starts_with_the_original_then_stays_in_range() {
        assert_eq!(probe_port(40000, 60000, 60009, 7, 0), Some(40000));
        for i in 1..PROBES {
            let p = probe_port(40000, 60000, 60009, u32::MAX - 3, i).unwrap_or(0);
            assert!((60000..=60009).contains(&p), "{p}");
        }
        assert_eq!(probe_port(40000, 0, 0, 1, 1), None);
        assert_eq!(probe_port(40000, 10, 9, 1, 1), None);
        assert_eq!(probe_port(1, 65535, 65535, 123, 3), Some(65535));
    }

    #[test]
    fn lifetimes_follow_tcp_state() {
        assert_eq!(lifetime::of(crate::proto::TCP, 0), lifetime::TCP_SYN);
        assert_eq!(
            lifetime::of(crate::proto::TCP, Snat6Entry::SEEN_REPLY),
            lifetime::TCP_ESTABLISHED
        );
        assert_eq!(
            lifetime::of(
                crate::proto::TCP,
                Snat6Entry::SEEN_REPLY | Snat6Entry::CLOSING
            ),
            lifetime::TCP_CLOSING
        );
        assert_eq!(lifetime::of(crate::proto::UDP, 0), lifetime::UDP);
        assert_eq!(lifetime::of(crate::proto::ICMPV6, 0), lifetime::ICMP);
    }

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(core::mem::size_of::<Snat6Key>(), 40);
        assert_eq!(core::mem::size_of::<Snat6Entry>(), 32);
        assert_eq!(core::mem::size_of::<Masq6Config>(), 32);
        assert_eq!(core::mem::size_of::<Masq6Prefix>(), 4);
    }
}
