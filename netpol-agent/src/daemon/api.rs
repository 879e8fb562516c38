//! The control protocol between the CLI and the daemon: one JSON request per line on the
//! root-only Unix socket, answered by one JSON response line (or, for `monitor`, a stream of event
//! lines until the client goes away).

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::Path,
};

use serde::{Deserialize, Serialize};

pub const DEFAULT_SOCKET: &str = "/run/netpol/agent.sock";

/// A policy file as the CLI read it: the path (for error messages) and its text.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SourceFile {
    pub path: String,
    pub text: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    PolicyImport {
        files: Vec<SourceFile>,
    },
    PolicyGet {
        name: Option<String>,
    },
    /// Deletes every named imported policy, or all of them; whole or nothing.
    PolicyDelete {
        names: Vec<String>,
        all: bool,
    },
    EndpointList,
    IdentityList,
    Status,
    /// Events that pass `filter` (empty: all); see `monitor_filter`.
    Monitor {
        #[serde(default)]
        filter: super::monitor_filter::MonitorFilter,
    },
    /// The policies in force as Kubernetes CiliumNetworkPolicies (YAML text).
    PolicyExport {
        namespace: String,
        names: Vec<String>,
    },
    /// Policies for the recorded flows (YAML text).
    PolicySuggest {
        project: Option<String>,
        since_secs: Option<u64>,
        format: crate::policy::suggest::SuggestFormat,
    },
    /// `policy trace FROM TO[:PORT[/PROTO]]` over the maps as they are now.
    PolicyTrace {
        from: String,
        to: String,
    },
    /// `policy matrix [--project P]` of the running containers.
    PolicyMatrix {
        project: Option<String>,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Response {
    Ok { data: serde_json::Value },
    Error { message: String },
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct EndpointRow {
    pub container: String,
    pub name: String,
    pub network: String,
    pub ifindex: Option<u32>,
    pub identity: Option<u32>,
    pub identity_name: String,
    pub ipv4: Option<String>,
    pub ipv6: Option<String>,
    pub ingress_enforced: bool,
    pub egress_enforced: bool,
    /// `enforced`, `unrestricted` (attached, no policy selects it), or `not enforceable: <why>`.
    pub state: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct IdentityRow {
    pub id: u32,
    pub name: String,
    pub labels: std::collections::BTreeMap<String, String>,
    pub containers: usize,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PolicyRow {
    pub name: String,
    /// `imported`, a file under the policy directory, or `labels of <container>`.
    pub source: String,
    /// The text in force (for a rejected file: its last valid version).
    pub text: String,
    /// Why the source is rejected as it is now (a file edited into an invalid state, a stored
    /// policy that no longer parses, labels with an error).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct MonitorEvent {
    /// `drop`, `flow` (a new flow policy allowed, or one in an unenforced direction) or `audit`
    /// (a new flow that policy would have dropped, let through by audit mode).
    pub kind: String,
    /// Drops and audits: the drop reason (`policy-denied`, `policy-deny-rule`, `spoofed-source`,
    /// …).
    pub reason: Option<String>,
    pub ifindex: u32,
    pub direction: String,
    pub protocol: String,
    pub src: String,
    pub dst: String,
    pub sport: u16,
    pub dport: u16,
    pub src_identity: u32,
    pub dst_identity: u32,
    pub src_name: String,
    pub dst_name: String,
    /// The container owning `ifindex`.
    pub endpoint: String,
    /// The rule that decided: the allow rule of a flow, the deny rule of a `policy-deny-rule`
    /// drop or audit, as `POLICY SECTION (SOURCE)` (`db ingress[0] (/etc/netpol/policies.d/db.yaml)`).
    pub rule: Option<String>,
    /// That rule's policy and section (`ingress[0]`, `specs[1].egressDeny[0]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub section: Option<String>,
    /// A `policy-denied` drop or audit: the policies that make the endpoint's direction default
    /// deny (empty when none is known: an endpoint not identified yet, or policy the agent
    /// could not read).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub default_deny_by: Vec<String>,
    /// A flow in a direction that no policy enforces for the endpoint (no rule decided it:
    /// the peer's side may still drop it).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub not_enforced: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the netpol agent at {socket}: {source} (is `netpol-agent run` running? the socket is root-only)")]
    Connect {
        socket: String,
        source: std::io::Error,
    },
    #[error("{socket} is served by uid {uid}, not by root: not the netpol agent (another user's socket at that path?); nothing was sent")]
    NotTheAgent { socket: String, uid: u32 },
    #[error("talking to the agent: {0}")]
    Io(#[from] std::io::Error),
    #[error("bad answer from the agent: {0}")]
    Decode(#[from] serde_json::Error),
    #[error("{0}")]
    Agent(String),
    #[error("the request is {0} bytes, more than the agent reads ({limit}): send fewer files at once", limit = crate::policy::limits::REQUEST_BYTES)]
    TooLarge(usize),
}

pub fn connect(socket: &Path, req: &Request) -> Result<BufReader<UnixStream>, ClientError> {
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    if line.len() > crate::policy::limits::REQUEST_BYTES {
        return Err(ClientError::TooLarge(line.len()));
    }
    let mut s = UnixStream::connect(socket).map_err(|source| ClientError::Connect {
        socket: socket.display().to_string(),
        source,
    })?;
    // The agent runs as root: a socket another user listens on (put at a path in a shared
    // directory while the agent was stopped) gets no policy and is not believed.
    let uid = server_uid(&s)?;
    // SAFETY: plain libc call.
    if uid != 0 && uid != unsafe { libc::geteuid() } {
        return Err(ClientError::NotTheAgent {
            socket: socket.display().to_string(),
            uid,
        });
    }
    s.write_all(&line)?;
    Ok(BufReader::new(s))
}

/// The uid of the process that listens on the other end (`SO_PEERCRED`).
fn server_uid(s: &UnixStream) -> std::io::Result<u32> {
    use std::os::fd::AsRawFd;
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writing and sized for SO_PEERCRED.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cred.uid)
}

/// Sends one request and returns the data of its answer.
pub fn call(socket: &Path, req: &Request) -> Result<serde_json::Value, ClientError> {
    let mut r = connect(socket, req)?;
    let mut line = String::new();
    r.read_line(&mut line)?;
    match serde_json::from_str::<Response>(&line)? {
        Response::Ok { data } => Ok(data),
        Response::Error { message } => Err(ClientError::Agent(message)),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    /// A socket at the agent's path that another user listens on gets no request: the client
    /// refuses before sending, and says so.
    #[test]
    fn a_socket_served_by_another_user_gets_no_request() {
        // SAFETY: plain libc call.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root (a listener of another uid)");
            return;
        }
        let dir = std::env::temp_dir().join(format!("netpol-api-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("mkdir");
        let path = dir.join("agent.sock");
        // Bound here, listened on by a child that became uid 65534 first (SO_PEERCRED names
        // whoever called listen()).
        let l = std::os::unix::net::UnixListener::bind(&path).expect("bind");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).expect("chmod");
        let fd = std::os::fd::AsRawFd::as_raw_fd(&l);
        let mut ready = [0i32; 2];
        let mut sent = [0i32; 2];
        // SAFETY: pipes for the child; after fork the child makes only raw system calls.
        unsafe {
            assert_eq!(libc::pipe(ready.as_mut_ptr()), 0);
            assert_eq!(libc::pipe(sent.as_mut_ptr()), 0);
        }
        // SAFETY: the child only makes raw system calls and _exits.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork");
        if pid == 0 {
            // SAFETY: see above. The child reports whether it listens as uid 65534, then how
            // many bytes its one client sent before closing.
            unsafe {
                let ok = libc::setgid(65534) == 0 && libc::setuid(65534) == 0;
                let ok = ok && libc::listen(fd, 4) == 0;
                let b = [u8::from(ok)];
                libc::write(ready[1], b.as_ptr().cast(), 1);
                if ok {
                    let c = libc::accept(fd, std::ptr::null_mut(), std::ptr::null_mut());
                    let mut buf = [0u8; 64];
                    let n = libc::read(c, buf.as_mut_ptr().cast(), buf.len());
                    libc::close(c);
                    let n = [n.clamp(0, 64) as u8];
                    libc::write(sent[1], n.as_ptr().cast(), 1);
                }
                libc::_exit(0);
            }
        }
        drop(l);
        let (mut b, mut n) = ([0u8; 1], [0u8; 1]);
        // SAFETY: reads into live buffers, then reaps the child.
        unsafe { libc::read(ready[0], b.as_mut_ptr().cast(), 1) };
        let answer = (b[0] == 1).then(|| call(&path, &Request::Status));
        // SAFETY: as above.
        unsafe {
            if b[0] == 1 {
                libc::read(sent[0], n.as_mut_ptr().cast(), 1);
            }
            libc::waitpid(pid, std::ptr::null_mut(), 0);
            for f in ready.into_iter().chain(sent) {
                libc::close(f);
            }
        }
        let answer = answer.expect("the child listened as uid 65534");
        assert_eq!(n[0], 0, "the client sent its request to uid 65534");
        let e = answer.expect_err("believed another user's socket");
        assert!(
            matches!(e, ClientError::NotTheAgent { uid: 65534, .. }),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).expect("clean up");
    }
}
