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
    s.write_all(&line)?;
    Ok(BufReader::new(s))
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
