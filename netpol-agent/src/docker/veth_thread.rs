//! Host veth discovery on one long-lived thread, with plain blocking rtnetlink sockets.
//!
//! A container's interfaces can only be asked for over a netlink socket made inside its network
//! namespace. The thread enters the container's namespace only to create that socket and
//! returns to its own (the host's, opened when it started) before it sends anything: the dumps
//! run from the host's namespace over the container's socket, and the host's links are asked for
//! over a socket of the host's that the thread keeps. So a lookup costs two `setns` calls and
//! three netlink round trips, not a new OS thread, a runtime and two connections as before.
//!
//! The thread never runs anything in a container's namespace but the `socket` call: if going
//! back fails, it answers that lookup with [`NetlinkError::LeaveNetns`] and exits, and the next
//! lookup starts a new thread. A container that dies mid-lookup is still answered correctly:
//! the namespace is held open by its file for the whole lookup, an interface that went is not
//! found, and a host link is only taken for the container's veth when it names the container's
//! interface, in the container's namespace, as its peer ([`super::netlink::match_host_veths`]);
//! the watcher then looks again or learns from Docker that the container is gone.

use std::{
    fs::File,
    io,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::{mpsc, Mutex, PoisonError},
    time::Duration,
};

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_route::{
    address::AddressMessage,
    link::LinkMessage,
    nsid::{NsidAttribute, NsidMessage},
    RouteNetlinkMessage,
};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

use super::{
    model::VethLookup,
    netlink::{match_host_veths, AddrInfo, LinkInfo, NamespaceView, NetlinkError, WantedInterface},
};

/// How long one netlink answer may take before the lookup counts as failed.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// Receive buffer of one `recv` (a dump part is at most a few pages).
const RECV_BUF: usize = 64 << 10;

/// A blocking `NETLINK_ROUTE` socket, in the namespace it was made in.
struct Rtnl {
    sock: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl Rtnl {
    fn open() -> Result<Self, NetlinkError> {
        let mut sock = Socket::new(NETLINK_ROUTE).map_err(NetlinkError::Socket)?;
        sock.bind_auto().map_err(NetlinkError::Socket)?;
        sock.connect(&SocketAddr::new(0, 0))
            .map_err(NetlinkError::Socket)?;
        let tv = libc::timeval {
            tv_sec: ANSWER_TIMEOUT.as_secs() as libc::time_t,
            tv_usec: 0,
        };
        // SAFETY: a valid socket and a timeval of the size given.
        let r = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(NetlinkError::Socket(io::Error::last_os_error()));
        }
        Ok(Self {
            sock,
            seq: 0,
            buf: Vec::with_capacity(RECV_BUF),
        })
    }

    /// Sends `msg` and collects the answer: every part of a dump, or the one reply. A kernel
    /// error (no such link) is `Err`.
    fn request(
        &mut self,
        msg: RouteNetlinkMessage,
        dump: bool,
    ) -> Result<Vec<RouteNetlinkMessage>, NetlinkError> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let mut m =
            NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::InnerMessage(msg));
        m.header.flags = NLM_F_REQUEST | if dump { NLM_F_DUMP } else { 0 };
        m.header.sequence_number = seq;
        m.finalize();
        let mut out = vec![0; m.buffer_len()];
        m.serialize(&mut out);
        self.sock.send(&out, 0).map_err(NetlinkError::Socket)?;
        let mut answer = Vec::new();
        loop {
            self.buf.clear();
            let n = match self.sock.recv(&mut self.buf, 0) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Err(NetlinkError::Timeout(ANSWER_TIMEOUT))
                }
                Err(e) => return Err(NetlinkError::Socket(e)),
            };
            if n > self.buf.len() {
                return Err(NetlinkError::Socket(io::Error::other(
                    "netlink answer larger than the receive buffer",
                )));
            }
            let mut at = 0;
            while at < n {
                let part = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&self.buf[at..n])
                    .map_err(|e| NetlinkError::Socket(io::Error::other(e.to_string())))?;
                let len = part.header.length as usize;
                if len == 0 {
                    return Err(NetlinkError::Socket(io::Error::other(
                        "netlink message of length 0",
                    )));
                }
                at += (len + 3) & !3;
                if part.header.sequence_number != seq {
                    // The rest of an earlier request that timed out.
                    continue;
                }
                match part.payload {
                    NetlinkPayload::Done(_) => return Ok(answer),
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            Some(code) => Err(NetlinkError::Socket(io::Error::from_raw_os_error(
                                -code.get(),
                            ))),
                            None => Ok(answer),
                        }
                    }
                    NetlinkPayload::InnerMessage(m) => {
                        answer.push(m);
                        if !dump {
                            return Ok(answer);
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    /// Links and addresses of the socket's namespace.
    fn dump(&mut self) -> Result<NamespaceView, NetlinkError> {
        let links = self.request(RouteNetlinkMessage::GetLink(LinkMessage::default()), true)?;
        let addrs = self.request(
            RouteNetlinkMessage::GetAddress(AddressMessage::default()),
            true,
        )?;
        Ok(NamespaceView {
            links: links
                .iter()
                .filter_map(|m| match m {
                    RouteNetlinkMessage::NewLink(l) => Some(LinkInfo::from_message(l)),
                    _ => None,
                })
                .collect(),
            addrs: addrs
                .iter()
                .filter_map(|m| match m {
                    RouteNetlinkMessage::NewAddress(a) => AddrInfo::from_message(a),
                    _ => None,
                })
                .collect(),
        })
    }

    /// The link of the socket's namespace with this index, `None` if there is none.
    fn link(&mut self, index: u32) -> Result<Option<LinkInfo>, NetlinkError> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        match self.request(RouteNetlinkMessage::GetLink(m), false) {
            Ok(answer) => Ok(answer.iter().find_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(LinkInfo::from_message(l)),
                _ => None,
            })),
            Err(NetlinkError::Socket(e)) if e.raw_os_error() == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

impl Rtnl {
    /// The id the socket's namespace gives the namespace of `netns` (`RTM_GETNSID`), `None`
    /// when it has none.
    fn netnsid(&mut self, netns: &File) -> Result<Option<i32>, NetlinkError> {
        let mut m = NsidMessage::default();
        m.attributes
            .push(NsidAttribute::Fd(netns.as_raw_fd() as u32));
        let answer = self.request(RouteNetlinkMessage::GetNsId(m), false)?;
        Ok(answer
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewNsId(n) => Some(n),
                _ => None,
            })
            .flat_map(|n| n.attributes.iter())
            .find_map(|a| match a {
                NsidAttribute::Id(id) => Some(*id),
                _ => None,
            })
            .filter(|id| *id >= 0))
    }
}

/// What the thread is asked.
enum Job {
    Lookup {
        netns: PathBuf,
        wanted: Vec<WantedInterface>,
        reply: tokio::sync::oneshot::Sender<Result<VethLookup, NetlinkError>>,
    },
    /// The thread's own network namespace (`/proc/thread-self/ns/net`), for tests.
    #[cfg(test)]
    Netns(tokio::sync::oneshot::Sender<io::Result<PathBuf>>),
}

/// The thread's queue; `None` until the first lookup, and again once the thread has exited.
static THREAD: Mutex<Option<mpsc::Sender<Job>>> = Mutex::new(None);

fn submit(job: Job) -> Result<(), NetlinkError> {
    let mut thread = THREAD.lock().unwrap_or_else(PoisonError::into_inner);
    let job = match thread.as_ref() {
        Some(tx) => match tx.send(job) {
            Ok(()) => return Ok(()),
            // The thread exited: start another.
            Err(mpsc::SendError(job)) => job,
        },
        None => job,
    };
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("netpol-veths".to_owned())
        .spawn(move || serve(rx))
        .map_err(NetlinkError::Thread)?;
    tx.send(job).map_err(|_| NetlinkError::ThreadPanicked)?;
    *thread = Some(tx);
    Ok(())
}

/// Finds the host veth of each wanted interface of the namespace at `netns` (see
/// [`super::netlink::discover_host_veths`]), on the lookup thread.
pub async fn lookup(
    netns: PathBuf,
    wanted: Vec<WantedInterface>,
) -> Result<VethLookup, NetlinkError> {
    let (reply, rx) = tokio::sync::oneshot::channel();
    submit(Job::Lookup {
        netns,
        wanted,
        reply,
    })?;
    rx.await.map_err(|_| NetlinkError::ThreadPanicked)?
}

/// [`lookup`] for callers outside an async runtime.
pub fn lookup_blocking(
    netns: &Path,
    wanted: &[WantedInterface],
) -> Result<VethLookup, NetlinkError> {
    let (reply, rx) = tokio::sync::oneshot::channel();
    submit(Job::Lookup {
        netns: netns.to_path_buf(),
        wanted: wanted.to_vec(),
        reply,
    })?;
    rx.blocking_recv()
        .map_err(|_| NetlinkError::ThreadPanicked)?
}

/// The lookup thread's network namespace (started if it is not running).
#[cfg(test)]
pub fn thread_netns() -> io::Result<PathBuf> {
    let (reply, rx) = tokio::sync::oneshot::channel();
    submit(Job::Netns(reply)).map_err(io::Error::other)?;
    rx.blocking_recv().map_err(io::Error::other)?
}

const OWN_NETNS: &str = "/proc/thread-self/ns/net";

fn serve(jobs: mpsc::Receiver<Job>) {
    // The namespace to come back to: the one the thread was started in (the agent's).
    let home = File::open(OWN_NETNS);
    let mut host: Option<Rtnl> = None;
    while let Ok(job) = jobs.recv() {
        match job {
            Job::Lookup {
                netns,
                wanted,
                reply,
            } => {
                let r = match &home {
                    Ok(home) => lookup_from(home, &mut host, &netns, &wanted),
                    Err(e) => Err(NetlinkError::OpenNetns {
                        path: OWN_NETNS.into(),
                        source: io::Error::new(e.kind(), e.to_string()),
                    }),
                };
                let stuck = matches!(r, Err(NetlinkError::LeaveNetns { .. }));
                let _ = reply.send(r);
                if stuck {
                    // In a container's namespace: this thread must not do anything else.
                    return;
                }
            }
            #[cfg(test)]
            Job::Netns(reply) => {
                let _ = reply.send(std::fs::read_link(OWN_NETNS));
            }
        }
    }
}

fn lookup_from(
    home: &File,
    host: &mut Option<Rtnl>,
    netns: &Path,
    wanted: &[WantedInterface],
) -> Result<VethLookup, NetlinkError> {
    let file = File::open(netns).map_err(|source| NetlinkError::OpenNetns {
        path: netns.to_path_buf(),
        source,
    })?;
    let mut inside = socket_in(home, &file, netns)?;
    let view = inside.dump()?;
    drop(inside);
    let peers: std::collections::BTreeSet<u32> = view
        .links
        .iter()
        .filter_map(|l| l.link.filter(|p| *p != 0 && *p != l.ifindex))
        .collect();
    let mut host_links = Vec::new();
    let mut netnsid = None;
    if !peers.is_empty() {
        let sock = match host {
            Some(s) => s,
            None => host.insert(Rtnl::open()?),
        };
        let asked = (|| {
            for peer in peers {
                // Not a host link (gone, or in another namespace): `match_host_veths` says why.
                if let Some(l) = sock.link(peer)? {
                    host_links.push(l);
                }
            }
            // After the links: dumping a host veth gives its peer's namespace an id.
            sock.netnsid(&file)
        })();
        match asked {
            Ok(id) => netnsid = id,
            Err(e) => {
                // Start over with a new socket next time (a timed-out answer may still come).
                *host = None;
                return Err(e);
            }
        }
    }
    Ok(match_host_veths(&host_links, &view, wanted, netnsid))
}

/// A netlink socket in the namespace of `netns`, made by entering it and going back to `home`.
fn socket_in(home: &File, netns: &File, path: &Path) -> Result<Rtnl, NetlinkError> {
    // SAFETY: `netns` is an open file; setns changes only this thread's namespace, and the
    // thread goes back (below) before it does anything but make the socket.
    if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(NetlinkError::EnterNetns {
            path: path.to_path_buf(),
            source: io::Error::last_os_error(),
        });
    }
    let sock = Rtnl::open();
    // SAFETY: as above; `home` is the thread's own namespace, opened when it started.
    if unsafe { libc::setns(home.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(NetlinkError::LeaveNetns {
            path: path.to_path_buf(),
            source: io::Error::last_os_error(),
        });
    }
    sock
}
