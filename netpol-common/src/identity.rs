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
/// First identity handed out for a label set.
pub const FIRST_LABEL: u32 = 256;

/// Name of a reserved identity, for tables and events.
pub const fn reserved_name(id: u32) -> Option<&'static str> {
    match id {
        ANY => Some("any"),
        HOST => Some("host"),
        WORLD => Some("world"),
        UNMANAGED => Some("unmanaged"),
        _ => None,
    }
}
