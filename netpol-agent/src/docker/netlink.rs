//! A small rtnetlink client (raw `libc`): link and address dumps, in the host namespace or in a
//! container's, and host veth discovery built on them.
//!
//! A container's host veth is found from inside its network namespace: each container interface's
//! `IFLA_LINK` is the ifindex of its veth peer, which Docker leaves in the host namespace. The
//! namespace switch happens in a dedicated OS thread that exits afterwards, so no other code ever
//! runs in the container's namespace. (Reading `/sys/class/net/*/iflink` after `setns` would read
//! the host's sysfs, which is why netlink is asked instead.)

use std::{
    fs::File,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
    time::Duration,
};

use super::model::{MacAddr, VethLookup};

const NLMSG_HDR_LEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const RTM_NEWADDR: u16 = 20;
const RTM_GETADDR: u16 = 22;
const IFINFOMSG_LEN: usize = 16;
const IFADDRMSG_LEN: usize = 8;
const IFLA_ADDRESS: u16 = 1;
const IFLA_IFNAME: u16 = 3;
const IFLA_LINK: u16 = 5;
const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
/// Mask off `NLA_F_NESTED` / `NLA_F_NET_BYTEORDER` from attribute types.
const NLA_TYPE_MASK: u16 = 0x3fff;
const RECV_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("opening network namespace {path}: {source}")]
    OpenNetns { path: PathBuf, source: io::Error },
    #[error("entering network namespace {path}: {source}")]
    EnterNetns { path: PathBuf, source: io::Error },
    #[error("netlink socket: {0}")]
    Socket(io::Error),
    #[error("netlink send: {0}")]
    Send(io::Error),
    #[error("netlink receive: {0}")]
    Recv(io::Error),
    #[error("netlink request failed: {0}")]
    Kernel(io::Error),
    #[error("malformed netlink message: {0}")]
    Malformed(&'static str),
    #[error("the namespace discovery thread panicked")]
    ThreadPanicked,
    #[error("starting the namespace discovery thread: {0}")]
    Thread(io::Error),
}

/// One network interface, from an `RTM_GETLINK` dump.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkInfo {
    pub ifindex: u32,
    pub name: String,
    pub mac: Option<MacAddr>,
    /// `IFLA_LINK`: for a veth, its peer's ifindex (in the peer's namespace).
    pub link: Option<u32>,
    /// `IFLA_INFO_KIND` (`veth`, `bridge`, …).
    pub kind: Option<String>,
}

/// One interface address, from an `RTM_GETADDR` dump.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AddrInfo {
    pub ifindex: u32,
    pub addr: IpAddr,
    pub prefix_len: u8,
}

/// Links and addresses of one namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NamespaceView {
    pub links: Vec<LinkInfo>,
    pub addrs: Vec<AddrInfo>,
}

impl NamespaceView {
    /// Dumps links and addresses of the calling thread's network namespace.
    pub fn dump() -> Result<Self, NetlinkError> {
        let sock = Socket::open()?;
        Ok(Self {
            links: sock.dump_links()?,
            addrs: sock.dump_addrs()?,
        })
    }
}

/// What to look for: one attachment of a container, by network id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WantedInterface {
    pub network_id: String,
    pub mac: Option<MacAddr>,
    pub addrs: Vec<IpAddr>,
}

/// Every address of the host's own namespace (the calling thread's), loopback included.
pub fn host_addresses() -> Result<Vec<IpAddr>, NetlinkError> {
    let sock = Socket::open()?;
    let mut addrs: Vec<IpAddr> = sock.dump_addrs()?.into_iter().map(|a| a.addr).collect();
    addrs.sort();
    addrs.dedup();
    Ok(addrs)
}

/// Dumps the links and addresses of the network namespace at `netns` (a file such as a container's
/// `SandboxKey` or `/run/netns/NAME`), together with the links of the caller's namespace, from a
/// dedicated thread that enters the namespace and then exits.
pub fn dump_namespace(netns: &Path) -> Result<(Vec<LinkInfo>, NamespaceView), NetlinkError> {
    let path = netns.to_path_buf();
    let handle = std::thread::Builder::new()
        .name("netpol-netns".to_owned())
        .spawn(
            move || -> Result<(Vec<LinkInfo>, NamespaceView), NetlinkError> {
                let file = File::open(&path).map_err(|source| NetlinkError::OpenNetns {
                    path: path.clone(),
                    source,
                })?;
                let host_links = Socket::open()?.dump_links()?;
                // SAFETY: `file` is an open namespace file; setns only changes this thread, which
                // runs nothing else and exits when this closure returns.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(NetlinkError::EnterNetns {
                        path,
                        source: io::Error::last_os_error(),
                    });
                }
                Ok((host_links, NamespaceView::dump()?))
            },
        )
        .map_err(NetlinkError::Thread)?;
    handle.join().map_err(|_| NetlinkError::ThreadPanicked)?
}

/// Finds the host veth of each wanted interface of the namespace at `netns`. An interface that is
/// missing or not a veth with a peer in the host namespace gets an `Err` with the reason.
pub fn discover_host_veths(
    netns: &Path,
    wanted: &[WantedInterface],
) -> Result<VethLookup, NetlinkError> {
    let (host_links, inside) = dump_namespace(netns)?;
    Ok(match_host_veths(&host_links, &inside, wanted))
}

/// The matching half of [`discover_host_veths`], without system calls.
pub fn match_host_veths(
    host_links: &[LinkInfo],
    inside: &NamespaceView,
    wanted: &[WantedInterface],
) -> VethLookup {
    wanted
        .iter()
        .map(|w| (w.network_id.clone(), match_one(host_links, inside, w)))
        .collect()
}

fn match_one(
    host_links: &[LinkInfo],
    inside: &NamespaceView,
    w: &WantedInterface,
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
    Ok(peer)
}

struct Socket {
    fd: OwnedFd,
    seq: std::cell::Cell<u32>,
}

impl Socket {
    fn open() -> Result<Self, NetlinkError> {
        // SAFETY: plain socket(2); the result is checked before use.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(NetlinkError::Socket(io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just returned by socket(2) and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let tv = libc::timeval {
            tv_sec: RECV_TIMEOUT.as_secs() as libc::time_t,
            tv_usec: 0,
        };
        // SAFETY: `tv` is a valid timeval for SO_RCVTIMEO and outlives the call.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(NetlinkError::Socket(io::Error::last_os_error()));
        }
        Ok(Self {
            fd,
            seq: std::cell::Cell::new(1),
        })
    }

    fn dump_links(&self) -> Result<Vec<LinkInfo>, NetlinkError> {
        let mut links = Vec::new();
        self.dump(RTM_GETLINK, &[0u8; IFINFOMSG_LEN], |ty, payload| {
            if ty == RTM_NEWLINK {
                links.push(parse_link(payload)?);
            }
            Ok(())
        })?;
        Ok(links)
    }

    fn dump_addrs(&self) -> Result<Vec<AddrInfo>, NetlinkError> {
        let mut addrs = Vec::new();
        self.dump(RTM_GETADDR, &[0u8; IFADDRMSG_LEN], |ty, payload| {
            if ty == RTM_NEWADDR {
                if let Some(a) = parse_addr(payload)? {
                    addrs.push(a);
                }
            }
            Ok(())
        })?;
        Ok(addrs)
    }

    /// Sends a dump request (`family` header zeroed = `AF_UNSPEC`) and feeds every reply message
    /// to `on_msg` until `NLMSG_DONE`.
    fn dump(
        &self,
        ty: u16,
        family_header: &[u8],
        mut on_msg: impl FnMut(u16, &[u8]) -> Result<(), NetlinkError>,
    ) -> Result<(), NetlinkError> {
        let seq = self.seq.get();
        self.seq.set(seq.wrapping_add(1));
        let len = NLMSG_HDR_LEN + family_header.len();
        let mut req = Vec::with_capacity(len);
        req.extend_from_slice(&(len as u32).to_ne_bytes());
        req.extend_from_slice(&ty.to_ne_bytes());
        req.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
        req.extend_from_slice(&seq.to_ne_bytes());
        req.extend_from_slice(&0u32.to_ne_bytes());
        req.extend_from_slice(family_header);
        // SAFETY: an all-zero sockaddr_nl is valid; the family is set below.
        let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: `req` and `kernel` are valid for the lengths passed.
        let sent = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                req.as_ptr().cast(),
                req.len(),
                0,
                (&kernel as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if sent < 0 {
            return Err(NetlinkError::Send(io::Error::last_os_error()));
        }
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            // SAFETY: `buf` is valid for writes of its length.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(NetlinkError::Recv(e));
            }
            let mut rest = buf
                .get(..n as usize)
                .ok_or(NetlinkError::Malformed("recv length"))?;
            while rest.len() >= NLMSG_HDR_LEN {
                let msg_len = read_u32(rest, 0)? as usize;
                let msg_ty = read_u16(rest, 4)?;
                let msg_seq = read_u32(rest, 8)?;
                if msg_len < NLMSG_HDR_LEN || msg_len > rest.len() {
                    return Err(NetlinkError::Malformed("message length"));
                }
                let payload = &rest[NLMSG_HDR_LEN..msg_len];
                if msg_seq == seq {
                    match msg_ty {
                        NLMSG_DONE => return Ok(()),
                        NLMSG_ERROR => {
                            let errno = read_u32(payload, 0)? as i32;
                            if errno != 0 {
                                return Err(NetlinkError::Kernel(io::Error::from_raw_os_error(
                                    -errno,
                                )));
                            }
                        }
                        _ => on_msg(msg_ty, payload)?,
                    }
                }
                rest = rest.get(align4(msg_len)..).unwrap_or(&[]);
            }
        }
    }
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn read_u16(b: &[u8], at: usize) -> Result<u16, NetlinkError> {
    b.get(at..at + 2)
        .and_then(|s| s.try_into().ok())
        .map(u16::from_ne_bytes)
        .ok_or(NetlinkError::Malformed("short u16"))
}

fn read_u32(b: &[u8], at: usize) -> Result<u32, NetlinkError> {
    b.get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .map(u32::from_ne_bytes)
        .ok_or(NetlinkError::Malformed("short u32"))
}

/// Iterates over the `(type, value)` attributes in `b`.
fn attrs(mut b: &[u8]) -> impl Iterator<Item = Result<(u16, &[u8]), NetlinkError>> {
    std::iter::from_fn(move || {
        if b.len() < 4 {
            return None;
        }
        let parsed = (|| {
            let len = read_u16(b, 0)? as usize;
            let ty = read_u16(b, 2)? & NLA_TYPE_MASK;
            let value = b
                .get(4..len)
                .ok_or(NetlinkError::Malformed("attribute length"))?;
            Ok((len, ty, value))
        })();
        match parsed {
            Ok((len, ty, value)) => {
                b = b.get(align4(len)..).unwrap_or(&[]);
                Some(Ok((ty, value)))
            }
            Err(e) => {
                b = &[];
                Some(Err(e))
            }
        }
    })
}

fn cstr(v: &[u8]) -> String {
    let end = v.iter().position(|&c| c == 0).unwrap_or(v.len());
    String::from_utf8_lossy(&v[..end]).into_owned()
}

fn parse_link(payload: &[u8]) -> Result<LinkInfo, NetlinkError> {
    let ifindex = read_u32(payload, 4)?;
    let mut link = LinkInfo {
        ifindex,
        name: String::new(),
        mac: None,
        link: None,
        kind: None,
    };
    let rest = payload
        .get(IFINFOMSG_LEN..)
        .ok_or(NetlinkError::Malformed("ifinfomsg"))?;
    for attr in attrs(rest) {
        let (ty, v) = attr?;
        match ty {
            IFLA_IFNAME => link.name = cstr(v),
            IFLA_ADDRESS => {
                if let Ok(mac) = <[u8; 6]>::try_from(v) {
                    link.mac = Some(MacAddr(mac));
                }
            }
            IFLA_LINK => link.link = Some(read_u32(v, 0)?),
            IFLA_LINKINFO => {
                for inner in attrs(v) {
                    let (ity, iv) = inner?;
                    if ity == IFLA_INFO_KIND {
                        link.kind = Some(cstr(iv));
                    }
                }
            }
            _ => {}
        }
    }
    Ok(link)
}

fn parse_addr(payload: &[u8]) -> Result<Option<AddrInfo>, NetlinkError> {
    let family = *payload
        .first()
        .ok_or(NetlinkError::Malformed("ifaddrmsg"))?;
    let prefix_len = *payload.get(1).ok_or(NetlinkError::Malformed("ifaddrmsg"))?;
    let ifindex = read_u32(payload, 4)?;
    let rest = payload
        .get(IFADDRMSG_LEN..)
        .ok_or(NetlinkError::Malformed("ifaddrmsg"))?;
    let (mut local, mut address) = (None, None);
    for attr in attrs(rest) {
        let (ty, v) = attr?;
        let ip = match i32::from(family) {
            libc::AF_INET => <[u8; 4]>::try_from(v)
                .ok()
                .map(|b| IpAddr::V4(Ipv4Addr::from(b))),
            libc::AF_INET6 => <[u8; 16]>::try_from(v)
                .ok()
                .map(|b| IpAddr::V6(Ipv6Addr::from(b))),
            _ => None,
        };
        match ty {
            IFA_LOCAL => local = ip,
            IFA_ADDRESS => address = ip,
            _ => {}
        }
    }
    // IFA_LOCAL is the interface's own address; IFA_ADDRESS is the peer's on point-to-point links.
    Ok(local.or(address).map(|addr| AddrInfo {
        ifindex,
        addr,
        prefix_len,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(ifindex: u32, name: &str, mac: Option<[u8; 6]>, peer: Option<u32>) -> LinkInfo {
        LinkInfo {
            ifindex,
            name: name.to_owned(),
            mac: mac.map(MacAddr),
            link: peer,
            kind: Some("veth".to_owned()),
        }
    }

    #[test]
    fn host_namespace_dump_sees_loopback() {
        let addrs = host_addresses().expect("dump host addresses");
        assert!(
            addrs.contains(&IpAddr::V4(Ipv4Addr::LOCALHOST)),
            "{addrs:?}"
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
            ],
            addrs: vec![AddrInfo {
                ifindex: 42,
                addr: "10.0.0.5".parse().unwrap(),
                prefix_len: 24,
            }],
        };
        let host = vec![
            link(41, "veth1", None, Some(40)),
            link(43, "veth2", None, Some(42)),
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
        ];
        let found = match_host_veths(&host, &inside, &wanted);
        assert_eq!(found["a"], Ok(41));
        assert_eq!(found["b"], Ok(43));
        assert!(found["c"]
            .as_ref()
            .is_err_and(|e| e.contains("not in the host namespace")));
        assert!(found["d"].is_err());
    }
}
