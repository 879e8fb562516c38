//! `IPCACHE4` / `IPCACHE6`: LPM tries from an address or prefix to a security identity.
//!
//! Keys are the LPM key of aya (`prefix_len: u32` then the address bytes in network order). The
//! agent fills them with every container address (/32, /128), the host's own addresses and Docker
//! gateways (`host`), the subnets of managed networks (`unmanaged`, so a container that is not
//! identified yet is never taken for `world`) and the CIDRs of policy rules (their own identities).
//! A miss is `world`.

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RemoteInfo {
    pub identity: u32,
    pub _pad: u32,
}

impl RemoteInfo {
    pub const fn new(identity: u32) -> Self {
        Self { identity, _pad: 0 }
    }
}
