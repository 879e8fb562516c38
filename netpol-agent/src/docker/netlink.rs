//! Netlink through the rust-netlink crates (`rtnetlink`, `netlink-packet-route`): link and
//! address dumps, in the host namespace or in a container's, host veth discovery built on them,
//! and a subscription to the host's link events ([`LinkWatcher`]).
//!
//! A container's host veth is found from inside its network namespace: each container interface's
//! `IFLA_LINK` is the ifindex of its veth peer, which Docker leaves in the host namespace. The
//! lookups run on one long-lived thread ([`super::veth_thread`]) that enters the container's
//! namespace only to make a netlink socket there and goes back before using it, so no other
//! code ever runs in the container's namespace. (Reading `/sys/class/net/*/iflink` after `setns`
//! would read the host's sysfs, which is why netlink is asked instead.) The host's own dumps run
//! in a thread of their own with a small runtime for the netlink connection, so they can be
//! called from anywhere (also from inside the agent's runtime).

use std::{
    fs::File,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    time::Duration,
};

use futures_util::{StreamExt, TryStreamExt};
use netlink_packet_core::NetlinkPayload;
use netlink_packet_route::{
    address::{AddressAttribute, AddressMessage},
    link::{InfoKind, LinkAttribute, LinkInfo as NlLinkInfo, LinkMessage},
    AddressFamily, RouteNetlinkMessage,
};
use netlink_sys::AsyncSocket;
use tokio::sync::mpsc;

use super::model::{MacAddr, VethLookup};

/// How long one dump may take before it counts as failed.
const DUMP_TIMEOUT: Duration = Duration::from_secs(5);
/// Receive buffer of the link event socket: a burst of container starts must not overflow it.
const EVENT_RCVBUF: usize = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("opening network namespace {path}: {source}")]
    OpenNetns { path: PathBuf, source: io::Error },
    #[error("entering network namespace {path}: {source}")]
    EnterNetns { path: PathBuf, source: io::Error },
    #[error("going back from network namespace {path}: {source}")]
    LeaveNetns { path: PathBuf, source: io::Error },
    #[error("netlink socket: {0}")]
    Socket(io::Error),
    #[error("netlink request failed: {0}")]
    Request(#[from] rtnetlink::Error),
    #[error("netlink dump took longer than {0:?}")]
    Timeout(Duration),
    #[error("the netlink thread panicked")]
    ThreadPanicked,
    #[error("starting the netlink thread: {0}")]
    Thread(io::Error),
}

/// One network interface, from an `RTM_GETLINK` dump or an `RTM_NEWLINK` event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkInfo {
    pub ifindex: u32,
    pub name: String,
    pub mac: Option<MacAddr>,
    /// `IFLA_LINK`: for a veth, its peer's ifindex (in the peer's namespace).
    pub link: Option<u32>,
    /// `IFLA_INFO_KIND` (`veth`, `bridge`, …).
    pub kind: Option<String>,
    /// `IFLA_MASTER`: the bridge (or other controller) the interface is a port of.
    pub master: Option<u32>,
    /// `IFLA_LINK_NETNSID`: for a veth whose peer is in another namespace, that namespace's id
    /// as the dumping namespace numbers it (`link` is an ifindex of that namespace).
    pub link_netnsid: Option<i32>,
}

impl LinkInfo {
    pub(super) fn from_message(m: &LinkMessage) -> Self {
        let mut link = LinkInfo {
            ifindex: m.header.index,
            name: String::new(),
            mac: None,
            link: None,
            kind: None,
            master: None,
            link_netnsid: None,
        };
        for attr in &m.attributes {
            match attr {
                LinkAttribute::IfName(n) => link.name = n.clone(),
                LinkAttribute::Address(a) => {
                    link.mac = <[u8; 6]>::try_from(a.as_slice()).ok().map(MacAddr)
                }
                LinkAttribute::Link(peer) => link.link = Some(*peer),
                LinkAttribute::Controller(m) => link.master = Some(*m).filter(|m| *m != 0),
                LinkAttribute::LinkNetNsId(id) => link.link_netnsid = Some(*id).filter(|i| *i >= 0),
                LinkAttribute::LinkInfo(infos) => {
                    for i in infos {
                        if let NlLinkInfo::Kind(k) = i {
                            link.kind = Some(match k {
                                InfoKind::Other(o) => o.clone(),
                                k => k.to_string(),
                            });
                        }
                    }
                }
                _ => {}
            }
        }
        link
    }
}

/// One interface address, from an `RTM_GETADDR` dump.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AddrInfo {
    pub ifindex: u32,
    pub addr: IpAddr,
    pub prefix_len: u8,
    /// IFA_BROADCAST: an IPv4 address's broadcast address when one was set explicitly.
    pub broadcast: Option<Ipv4Addr>,
}

impl AddrInfo {
    pub(super) fn from_message(m: &AddressMessage) -> Option<Self> {
        let (mut local, mut address, mut broadcast) = (None, None, None);
        for attr in &m.attributes {
            match attr {
                AddressAttribute::Local(a) => local = Some(*a),
                AddressAttribute::Address(a) => address = Some(*a),
                AddressAttribute::Broadcast(a) => broadcast = Some(*a),
                _ => {}
            }
        }
        // IFA_LOCAL is the interface's own address; IFA_ADDRESS is the peer's on point-to-point
        // links.
        local.or(address).map(|addr| AddrInfo {
            ifindex: m.header.index,
            addr,
            prefix_len: m.header.prefix_len,
            broadcast,
        })
    }
}

/// Links and addresses of one namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NamespaceView {
    pub links: Vec<LinkInfo>,
    pub addrs: Vec<AddrInfo>,
}

impl NamespaceView {
    /// Dumps links and addresses of the caller's network namespace.
    pub fn dump() -> Result<Self, NetlinkError> {
        Ok(in_thread(None)?.0)
    }
}

/// What to look for: one attachment of a container, by network id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WantedInterface {
    pub network_id: String,
    pub mac: Option<MacAddr>,
    pub addrs: Vec<IpAddr>,
}

/// Every address of the host's own namespace (the caller's), loopback included.
pub fn host_addresses() -> Result<Vec<IpAddr>, NetlinkError> {
    Ok(host_address_sets()?.0)
}

/// From one dump of the host's namespace: its addresses ([`host_addresses`]), and the
/// addresses its stack takes as sent to itself although no interface holds them, from wherever
/// the packet comes (a container's through its gateway included): each IPv4 address's
/// subnet-directed broadcast (computed, and IFA_BROADCAST when set) and each IPv6 address's
/// subnet-router anycast (joined while the host forwards, as it does for Docker).
pub fn host_address_sets() -> Result<(Vec<IpAddr>, Vec<IpAddr>), NetlinkError> {
    let (mut own, mut groups) = (Vec::new(), Vec::new());
    for a in NamespaceView::dump()?.addrs {
        own.push(a.addr);
        groups.extend(group_address(a.addr, a.prefix_len));
        groups.extend(a.broadcast.filter(|b| !b.is_unspecified()).map(IpAddr::V4));
    }
    for v in [&mut own, &mut groups] {
        v.sort();
        v.dedup();
    }
    Ok((own, groups))
}

/// The subnet-directed broadcast of an IPv4 prefix (shorter than /31: Linux adds none for /31
/// and /32) or the subnet-router anycast of an IPv6 prefix (shorter than /127), as the kernel
/// adds them for an address `addr/prefix_len`.
pub fn group_address(addr: IpAddr, prefix_len: u8) -> Option<IpAddr> {
    match addr {
        IpAddr::V4(a) if prefix_len < 31 => Some(IpAddr::V4(Ipv4Addr::from(
            u32::from(a) | (u32::MAX >> prefix_len),
        ))),
        IpAddr::V6(a) if prefix_len > 0 && prefix_len < 127 => Some(IpAddr::V6(Ipv6Addr::from(
            u128::from(a) & (u128::MAX << (128 - u32::from(prefix_len))),
        ))),
        _ => None,
    }
}

/// Dumps the links and addresses of the network namespace at `netns` (a file such as a container's
/// `SandboxKey` or `/run/netns/NAME`), together with the links of the caller's namespace, from a
/// dedicated thread that enters the namespace and then exits.
pub fn dump_namespace(netns: &Path) -> Result<(Vec<LinkInfo>, NamespaceView), NetlinkError> {
    let (host, inside) = in_thread(Some(netns.to_path_buf()))?;
    Ok((host.links, inside.unwrap_or_default()))
}

/// Runs the dumps on a thread of its own: first the caller's namespace, then, if `netns` is given,
/// that namespace (the thread enters it and exits afterwards).
fn in_thread(
    netns: Option<PathBuf>,
) -> Result<(NamespaceView, Option<NamespaceView>), NetlinkError> {
    let handle = std::thread::Builder::new()
        .name("netpol-netlink".to_owned())
        .spawn(
            move || -> Result<(NamespaceView, Option<NamespaceView>), NetlinkError> {
                // Opened before anything else, so a missing namespace fails early.
                let file = match &netns {
                    Some(path) => {
                        Some(File::open(path).map_err(|source| NetlinkError::OpenNetns {
                            path: path.clone(),
                            source,
                        })?)
                    }
                    None => None,
                };
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_io()
                    .enable_time()
                    .build()
                    .map_err(NetlinkError::Thread)?;
                let host = rt.block_on(dump_current())?;
                let (Some(file), Some(path)) = (file, netns) else {
                    return Ok((host, None));
                };
                // SAFETY: `file` is an open namespace file; setns only changes this thread, which
                // runs nothing else and exits when this closure returns. The dump below opens its
                // socket after the switch, so it speaks to the container's namespace.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(NetlinkError::EnterNetns {
                        path,
                        source: io::Error::last_os_error(),
                    });
                }
                let inside = rt.block_on(dump_current())?;
                Ok((host, Some(inside)))
            },
        )
        .map_err(NetlinkError::Thread)?;
    handle.join().map_err(|_| NetlinkError::ThreadPanicked)?
}

/// Dumps links and addresses of the calling thread's namespace over a fresh rtnetlink connection.
async fn dump_current() -> Result<NamespaceView, NetlinkError> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(NetlinkError::Socket)?;
    let conn = tokio::spawn(conn);
    let dump = async {
        let links: Vec<LinkMessage> = handle.link().get().execute().try_collect().await?;
        let addrs: Vec<AddressMessage> = handle.address().get().execute().try_collect().await?;
        Ok::<_, rtnetlink::Error>(NamespaceView {
            links: links.iter().map(LinkInfo::from_message).collect(),
            addrs: addrs.iter().filter_map(AddrInfo::from_message).collect(),
        })
    };
    let r = tokio::time::timeout(DUMP_TIMEOUT, dump).await;
    conn.abort();
    Ok(r.map_err(|_| NetlinkError::Timeout(DUMP_TIMEOUT))??)
}

/// Finds the host veth of each wanted interface of the namespace at `netns`. An interface that is
/// missing or not a veth with a peer in the host namespace gets an `Err` with the reason.
///
/// Only the container's own namespace is dumped; of the host's links only the peers its
/// interfaces name are asked for, by index (a dump of every host link, once per started
/// container, made discovery grow with the number of containers). Runs on the lookup thread
/// ([`super::veth_thread`]) and waits for it: not for use inside the agent's runtime, which
/// awaits [`super::veth_thread::lookup`] instead.
pub fn discover_host_veths(
    netns: &Path,
    wanted: &[WantedInterface],
) -> Result<VethLookup, NetlinkError> {
    super::veth_thread::lookup_blocking(netns, wanted)
}

/// The matching half of [`discover_host_veths`], without system calls. `netnsid` is the id the
/// host's namespace gives the container's (`RTM_GETNSID`; `None` when it has none): a host link
/// is the container's veth only if its peer is in that namespace. Interface numbers are per
/// namespace, so a container that may make links (`CAP_NET_ADMIN`) can make a veth pair of its
/// own with the numbers of another container's pair; without the namespace check it would be
/// given that container's host veth.
pub fn match_host_veths(
    host_links: &[LinkInfo],
    inside: &NamespaceView,
    wanted: &[WantedInterface],
    netnsid: Option<i32>,
) -> VethLookup {
    wanted
        .iter()
        .map(|w| {
            (
                w.network_id.clone(),
                match_one(host_links, inside, w, netnsid),
            )
        })
        .collect()
}

fn match_one(
    host_links: &[LinkInfo],
    inside: &NamespaceView,
    w: &WantedInterface,
    netnsid: Option<i32>,
) -> Result<u32, String> {
    let by_mac = w
        .mac
        .and_then(|mac| inside.links.iter().find(|l| l.mac == Some(mac)));
    let by_addr = || {
        let a = inside.addrs.iter().find(|a| w.addrs.contains(&a.addr))?;
        inside.links.iter().find(|l| l.ifindex == a.ifindex)
    };
    let Some(link) = by_mac.or_else(by_addr) else {
        let mac = w
            .mac
            .map(|m| m.to_string())
            .unwrap_or_else(|| "-".to_owned());
        return Err(format!(
            "no interface in the container with MAC {mac} or its addresses"
        ));
    };
    let peer = match link.link {
        Some(peer) if peer != 0 && peer != link.ifindex => peer,
        _ => {
            return Err(format!(
                "container interface {} has no veth peer",
                link.name
            ))
        }
    };
    let Some(host) = host_links.iter().find(|h| h.ifindex == peer) else {
        return Err(format!(
            "peer ifindex {peer} of {} is not in the host namespace",
            link.name
        ));
    };
    // The host end of a veth names its peer in IFLA_LINK: the container interface.
    let kind_ok = host.kind.as_deref().is_none_or(|k| k == "veth");
    if !kind_ok || host.link != Some(link.ifindex) {
        return Err(format!(
            "host interface {} (ifindex {peer}) is not the veth peer of container interface {}",
            host.name, link.name
        ));
    }
    if netnsid.is_none() || host.link_netnsid != netnsid {
        return Err(format!(
            "host interface {} (ifindex {peer}) has its peer in another namespace than the \
             container's (namespace id {:?}, the container's {netnsid:?})",
            host.name, host.link_netnsid
        ));
    }
    Ok(peer)
}

/// What the host namespace's link events say, in the kernel's order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkEvent {
    /// Every link of the host namespace, after (re)subscribing: replaces what was known.
    Snapshot(Vec<LinkInfo>),
    /// A link appeared or changed (`RTM_NEWLINK`: a new veth, a port joining a bridge, …).
    Changed(LinkInfo),
    /// A link went away (`RTM_DELLINK`).
    Removed(u32),
}

/// Follows the kernel's link events (`RTMGRP_LINK`) in the caller's (the host's) namespace and
/// sends them as [`LinkEvent`]s. The subscription is made before the snapshot dump, so no change
/// in between is lost (events older than the dump are replayed after it; applying them in order
/// converges to the kernel's state). When the connection breaks it starts over with a new
/// snapshot. Returns when the receiver is dropped.
pub async fn watch_links(tx: mpsc::Sender<LinkEvent>) {
    let mut reported = false;
    loop {
        match link_session(&tx).await {
            Ok(()) => return,
            Err(e) => {
                if !reported {
                    tracing::warn!(error = %e, "link events unavailable; retrying");
                    reported = true;
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = tx.closed() => return,
        }
    }
}

/// One subscription: `Ok` when the receiver is gone, `Err` when the connection broke.
async fn link_session(tx: &mpsc::Sender<LinkEvent>) -> Result<(), NetlinkError> {
    let (mut conn, handle, mut messages) =
        rtnetlink::new_multicast_connection(&[rtnetlink::MulticastGroup::Link])
            .map_err(NetlinkError::Socket)?;
    // Best effort: a bigger buffer makes an overflow during a burst of starts less likely.
    let _ = conn.socket_mut().socket_mut().set_rx_buf_sz(EVENT_RCVBUF);
    let conn = tokio::spawn(conn);
    let _abort = AbortOnDrop(conn);
    let links: Vec<LinkMessage> =
        tokio::time::timeout(DUMP_TIMEOUT, handle.link().get().execute().try_collect())
            .await
            .map_err(|_| NetlinkError::Timeout(DUMP_TIMEOUT))??;
    let snapshot = links.iter().map(LinkInfo::from_message).collect();
    if tx.send(LinkEvent::Snapshot(snapshot)).await.is_err() {
        return Ok(());
    }
    loop {
        let msg = tokio::select! {
            m = messages.next() => m,
            _ = tx.closed() => return Ok(()),
        };
        let Some((msg, _)) = msg else {
            return Err(NetlinkError::Socket(io::Error::other(
                "link event connection closed",
            )));
        };
        let ev = match msg.payload {
            // The bridge also sends RTM_NEWLINK / RTM_DELLINK of family AF_BRIDGE about its
            // ports (no IFLA_LINKINFO; a DELLINK when a port leaves the bridge, not when the
            // link goes): those are not link changes.
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(m))
            | NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(m))
                if m.header.interface_family == AddressFamily::Bridge =>
            {
                continue
            }
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(m)) => {
                LinkEvent::Changed(LinkInfo::from_message(&m))
            }
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(m)) => {
                LinkEvent::Removed(m.header.index)
            }
            _ => continue,
        };
        if tx.send(ev).await.is_err() {
            return Ok(());
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    #[test]
    fn group_addresses_are_the_kernels() {
        let g = |a: &str, len| group_address(a.parse().unwrap(), len).map(|a| a.to_string());
        assert_eq!(g("172.17.0.1", 16).as_deref(), Some("172.17.255.255"));
        assert_eq!(g("192.0.2.2", 24).as_deref(), Some("192.0.2.255"));
        assert_eq!(g("10.0.0.1", 30).as_deref(), Some("10.0.0.3"));
        assert_eq!(g("10.0.0.1", 31), None);
        assert_eq!(g("10.0.0.1", 32), None);
        assert_eq!(
            g("fd00:dead:beef::1", 64).as_deref(),
            Some("fd00:dead:beef::")
        );
        assert_eq!(g("2001:db8::1:2", 112).as_deref(), Some("2001:db8::1:0"));
        assert_eq!(g("fd00::1", 127), None);
        assert_eq!(g("::1", 128), None);
    }

    fn link(ifindex: u32, name: &str, mac: Option<[u8; 6]>, peer: Option<u32>) -> LinkInfo {
        LinkInfo {
            ifindex,
            name: name.to_owned(),
            mac: mac.map(MacAddr),
            link: peer,
            kind: Some("veth".to_owned()),
            master: None,
            link_netnsid: None,
        }
    }

    /// A host end whose peer is in the namespace the host numbers `netnsid`.
    fn host_end(ifindex: u32, name: &str, peer: u32, netnsid: i32) -> LinkInfo {
        LinkInfo {
            link_netnsid: Some(netnsid),
            ..link(ifindex, name, None, Some(peer))
        }
    }

    #[test]
    fn host_namespace_dump_sees_loopback() {
        let addrs = host_addresses().expect("dump host addresses");
        assert!(
            addrs.contains(&IpAddr::V4(Ipv4Addr::LOCALHOST)),
            "{addrs:?}"
        );
        // 127.0.0.1/8's broadcast, as the kernel's local table has it.
        let groups = host_address_sets().expect("dump host addresses").1;
        assert!(
            groups.contains(&IpAddr::V4(Ipv4Addr::new(127, 255, 255, 255))),
            "{groups:?}"
        );
        let view = NamespaceView::dump().expect("dump host links");
        assert!(
            view.links.iter().any(|l| l.name == "lo" && l.ifindex == 1),
            "{view:?}"
        );
    }

    #[test]
    fn matches_by_mac_then_by_address_and_checks_the_peer() {
        let mac = [2, 0x42, 172, 18, 0, 2];
        let inside = NamespaceView {
            links: vec![
                LinkInfo {
                    kind: None,
                    ..link(1, "lo", None, None)
                },
                link(40, "eth0", Some(mac), Some(41)),
                link(42, "eth1", Some([2, 0x42, 10, 0, 0, 5]), Some(43)),
                link(44, "eth2", Some([2, 0, 0, 0, 0, 9]), Some(99)),
                link(46, "eth3", Some([2, 0, 0, 0, 0, 10]), Some(47)),
            ],
            addrs: vec![AddrInfo {
                ifindex: 42,
                addr: "10.0.0.5".parse().unwrap(),
                prefix_len: 24,
                broadcast: None,
            }],
        };
        // The container's namespace is 7 to the host; veth3's peer is interface 46 of another
        // namespace (a container that made a pair with another one's numbers).
        let host = vec![
            host_end(41, "veth1", 40, 7),
            host_end(43, "veth2", 42, 7),
            host_end(47, "veth3", 46, 8),
        ];
        let wanted = vec![
            WantedInterface {
                network_id: "a".into(),
                mac: Some(MacAddr(mac)),
                addrs: vec![],
            },
            WantedInterface {
                network_id: "b".into(),
                mac: None,
                addrs: vec!["10.0.0.5".parse().unwrap()],
            },
            WantedInterface {
                network_id: "c".into(),
                mac: Some(MacAddr([2, 0, 0, 0, 0, 9])),
                addrs: vec![],
            },
            WantedInterface {
                network_id: "d".into(),
                mac: None,
                addrs: vec![],
            },
            WantedInterface {
                network_id: "e".into(),
                mac: Some(MacAddr([2, 0, 0, 0, 0, 10])),
                addrs: vec![],
            },
        ];
        let found = match_host_veths(&host, &inside, &wanted, Some(7));
        assert_eq!(found["a"], Ok(41));
        assert_eq!(found["b"], Ok(43));
        assert!(found["c"]
            .as_ref()
            .is_err_and(|e| e.contains("not in the host namespace")));
        assert!(found["d"].is_err());
        assert!(found["e"]
            .as_ref()
            .is_err_and(|e| e.contains("another namespace")));
        // Without the container's namespace id no host link is taken.
        let found = match_host_veths(&host, &inside, &wanted, None);
        assert!(found.values().all(|r| r.is_err()), "{found:?}");
    }
}
