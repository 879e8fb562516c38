//! The control socket: root-only (mode 0600 and a peer-credential check), one JSON request per
//! connection.

use std::{os::unix::fs::PermissionsExt, path::Path, sync::Arc};

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

pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let l = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
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
    w.write_all(&out).await
}
