//! IPv6 masquerade on the uplink: `SNAT6`, `MASQ6_CONFIG`, `MASQ6_PREFIX`.
//! Filled in by the masquerade work; the layout is fixed here so both sides agree.

/// Key of `SNAT6`: one direction of a translated flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Snat6Key {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// Network order.
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    pub proto: u8,
    /// 0 = outbound (container → world, keyed by the original tuple),
    /// 1 = inbound (world → host, keyed by the translated reply tuple).
    pub dir: u8,
    pub _pad: [u8; 2],
}

/// Value of `SNAT6`: the address and port to write.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Snat6Entry {
    pub addr: [u8; 16],
    /// Network order.
    pub port: [u8; 2],
    pub _pad: [u8; 6],
    pub expires_ns: u64,
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
    /// 1 when masquerade is on.
    pub enabled: u32,
}
