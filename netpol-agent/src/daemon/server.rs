//! The control socket: root-only (mode 0600 and a peer-credential check), one JSON request per
//! connection.

use std::{os::unix::fs::DirBuilderExt, path::Path, sync::Arc};

use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::Mutex,
};
use tracing::{debug, warn};

use super::{
    api::{Request, Response},
    monitor::Monitor,
    state::Agent,
};

/// Binds the control socket: mode 0600 from its first moment, replacing only a stale socket
/// (see [`super::metrics_server::bind_unix`]: a symlink, a file or a socket another agent
/// listens on is an error). A missing directory is created with mode 0700; an existing one is
/// left as it is (`--socket /tmp/agent.sock` must not make `/tmp` 0700).
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
        }
    }
    super::metrics_server::bind_unix(path)
}

pub async fn serve(listener: UnixListener, agent: Arc<Mutex<Agent>>, monitor: Monitor) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let agent = agent.clone();
                let monitor = monitor.clone();
                tokio::spawn(async move {
                    if let Err(e) = handle(stream, agent, monitor).await {
                        debug!(error = %e, "control connection");
                    }
                });
            }
            Err(e) => warn!(error = %e, "accepting a control connection"),
        }
    }
}

fn ok<T: serde::Serialize>(v: T) -> Response {
    match serde_json::to_value(v) {
        Ok(data) => Response::Ok { data },
        Err(e) => Response::Error {
            message: e.to_string(),
        },
    }
}

fn err(e: impl std::fmt::Display) -> Response {
    Response::Error {
        message: e.to_string(),
    }
}

async fn handle(
    stream: UnixStream,
    agent: Arc<Mutex<Agent>>,
    monitor: Monitor,
) -> std::io::Result<()> {
    let root = stream.peer_cred().map(|c| c.uid() == 0).unwrap_or(false);
    let (r, mut w) = stream.into_split();
    let mut line = String::new();
    // Never buffer more than one request may hold.
    let limit = crate::policy::limits::REQUEST_BYTES;
    BufReader::new(r.take(limit as u64 + 1))
        .read_line(&mut line)
        .await?;
    let resp = if !root {
        err("the netpol agent only answers root")
    } else if line.len() > limit {
        err(format!(
            "request larger than {limit} bytes: nothing was changed (import fewer files at once)"
        ))
    } else {
        match serde_json::from_str::<Request>(&line) {
            Err(e) => err(format!("bad request: {e}")),
            Ok(Request::Monitor { filter }) => match filter.validate() {
                Ok(()) => return monitor.stream(w, filter).await,
                Err(e) => err(format!("monitor: {e}")),
            },
            Ok(req) => {
                if matches!(req, Request::PolicySuggest { .. }) {
                    monitor.check_flows().await;
                }
                let mut a = agent.lock().await;
                match req {
                    Request::PolicyImport { files } => a.import(&files).map_or_else(err, ok),
                    Request::PolicyGet { name } => {
                        a.policy_rows(name.as_deref()).map_or_else(err, ok)
                    }
                    Request::PolicyDelete { names, all } => {
                        a.delete(&names, all).map_or_else(err, ok)
                    }
                    Request::EndpointList => ok(a.endpoint_rows()),
                    Request::IdentityList => ok(a.identity_rows()),
                    Request::Status => ok(a.status()),
                    Request::PolicyExport { namespace, names } => {
                        crate::policy::export::export(&a.policies_in_force(), &namespace, &names)
                            .map_or_else(err, ok)
                    }
                    Request::PolicySuggest {
                        project,
                        since_secs,
                        format,
                    } => ok(monitor.with_flows(|t| {
                        super::flows::answer(&a, t, project.as_deref(), since_secs, format)
                    })),
                    Request::PolicyTrace { from, to } => a.trace(&from, &to).map_or_else(err, ok),
                    Request::PolicyMatrix { project } => {
                        a.matrix(project.as_deref()).map_or_else(err, ok)
                    }
                    Request::Monitor { .. } => unreachable!("handled above"),
                }
            }
        }
    };
    let mut out = serde_json::to_vec(&resp).unwrap_or_default();
    out.push(b'\n');
    let written = w.write_all(&out).await;
    super::heap::after_burst();
    written
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};

    use super::*;

    #[tokio::test]
    async fn control_socket_is_0600_and_leaves_an_existing_directory_alone() {
        let root = std::env::temp_dir().join(format!("netpol-ctl-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let mode = |p: &Path| {
            std::fs::symlink_metadata(p)
                .expect("stat")
                .permissions()
                .mode()
                & 0o7777
        };

        // A missing directory is created 0700.
        let sock = root.join("run/netpol/agent.sock");
        let l = bind(&sock).expect("bind");
        assert_eq!(mode(sock.parent().expect("dir")), 0o700);
        assert_eq!(mode(&sock), 0o600);
        assert!(std::fs::symlink_metadata(&sock)
            .expect("stat")
            .file_type()
            .is_socket());
        // A second agent does not take over the socket of a running one.
        assert!(bind(&sock).is_err(), "bound over a live control socket");
        drop(l);
        bind(&sock).expect("a stale socket is replaced");

        // An existing (shared) directory keeps its mode.
        let shared = root.join("shared");
        std::fs::create_dir_all(&shared).expect("mkdir");
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).expect("chmod");
        let _l = bind(&shared.join("agent.sock")).expect("bind in a shared directory");
        assert_eq!(mode(&shared), 0o1777);
        assert_eq!(mode(&shared.join("agent.sock")), 0o600);
        std::fs::remove_dir_all(&root).expect("clean up");
    }
}
