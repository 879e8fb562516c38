//! Docker as a stream of domain events, and host veth discovery.
//!
//! - [`model`]: [`Container`], [`Attachment`], [`Network`] and why an attachment may not be
//!   enforceable ([`NotEnforceable`]), mapped from `docker inspect` data.
//! - [`watcher`]: [`DockerWatcher`], which lists containers and networks, follows the event
//!   stream and emits [`DockerEvent`]s on a channel, resynchronising with a full snapshot after
//!   every reconnect.
//! - [`netlink`]: rtnetlink (the rust-netlink crates): the host veth of each container interface
//!   (from inside the container's network namespace), [`host_addresses`], and the host's link
//!   events ([`watch_links`]), which let the agent police a new container's veth the moment it
//!   joins a Docker bridge.

pub mod model;
pub mod netlink;
mod veth_thread;
pub mod watcher;

#[cfg(test)]
mod privileged_tests;
#[cfg(test)]
mod tests;

pub use model::{Attachment, Container, MacAddr, Network, NetworkMode, NotEnforceable, VethLookup};
pub use netlink::{
    discover_host_veths, group_address, host_address_sets, host_addresses, watch_links, LinkEvent,
    LinkInfo, NetlinkError, WantedInterface,
};
pub use watcher::{
    BollardApi, DaemonInfo, DockerApi, DockerConfig, DockerError, DockerEvent, DockerWatcher,
    NetlinkVeths, VethResolver,
};
