//! Security identities. A container's identity is derived from its labels by the agent; these
//! numbers are reserved.

/// Wildcard in the policy map: matches any remote identity.
pub const ANY: u32 = 0;
/// The host itself (its own addresses, including Docker bridge gateways and `docker-proxy`).
pub const HOST: u32 = 1;
/// Anything that is neither a known container nor a host address.
pub const WORLD: u32 = 2;
/// A container on a managed network that the agent has not identified yet.
pub const UNMANAGED: u32 = 3;
/// Never in the ipcache: the remote a container's packet to a group or link-local address
/// (IPv4 multicast or broadcast, IPv6 multicast or link-local) is decided under, as it reaches
/// every container on the bridge and the host. Its `POLICY` entries are the denies of every
/// other remote of the same local identity (copied by the agent's compiler), its allows those
/// of the wildcard `ANY` (the second lookup): such a packet passes only what a rule allows
/// towards everyone and no deny of any peer covers.
pub const GROUP: u32 = 4;
/// First identity handed out for a label set.
pub const FIRST_LABEL: u32 = 256;
/// First identity of the range the policy compiler uses for CIDR prefixes (as Cilium's local
/// identity scope). Label identities stay below it.
pub const FIRST_CIDR: u32 = 1 << 24;

/// Whether `id` (an ipcache identity) is on this host: the host itself, a container, or a
/// managed subnet's `unmanaged`. `world` and CIDR identities are not. The datapath lets IPv6
/// neighbour discovery from a container go to a unicast address only when it is on this host.
#[inline(always)]
pub const fn on_host(id: u32) -> bool {
    id == HOST || id == UNMANAGED || (id >= FIRST_LABEL && id < FIRST_CIDR)
}

/// Name of a reserved identity, for tables and events.
pub const fn reserved_name(id: u32) -> Option<&'static str> {
    match id {
        ANY => Some("any"),
        HOST => Some("host"),
        WORLD => Some("world"),
        UNMANAGED => Some("unmanaged"),
        GROUP => Some("group"),
        _ => None,
    }
}
