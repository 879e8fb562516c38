//! The control socket: root-only (mode 0600 and a peer-credential check), one JSON request per
//! connection.

use std::{os::unix::fs::DirBuilderExt, path::Path, sync::Arc, time::Duration};

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

/// How long a client has to send its request line, and then to read its answer: one that
/// connects and sends nothing, or never reads (a hung script), must not hold a connection, a
/// file descriptor and its answer's memory for ever.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

pub async fn serve(listener: UnixListener, agent: Arc<Mutex<Agent>>, monitor: Monitor) {
    serve_with(listener, agent, monitor, REQUEST_TIMEOUT).await
}

/// [`serve`] with another [`REQUEST_TIMEOUT`] (tests).
async fn serve_with(
    listener: UnixListener,
    agent: Arc<Mutex<Agent>>,
    monitor: Monitor,
    timeout: Duration,
) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let agent = agent.clone();
                let monitor = monitor.clone();
                tokio::spawn(async move {
                    if let Err(e) = handle(stream, agent, monitor, timeout).await {
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
    timeout: Duration,
) -> std::io::Result<()> {
    let root = stream.peer_cred().map(|c| c.uid() == 0).unwrap_or(false);
    let (r, mut w) = stream.into_split();
    let mut line = String::new();
    // Never buffer more than one request may hold.
    let limit = crate::policy::limits::REQUEST_BYTES;
    let read = tokio::time::timeout(
        timeout,
        BufReader::new(r.take(limit as u64 + 1)).read_line(&mut line),
    )
    .await;
    let timed_out = match read {
        Ok(r) => r.map(|_| false)?,
        Err(_) => true,
    };
    let resp = if !root {
        err("the netpol agent only answers root")
    } else if timed_out {
        err(format!(
            "no request within {} s: nothing was changed",
            timeout.as_secs_f64()
        ))
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
    // A client that does not read its answer is given up as one that sends nothing is.
    let written = match tokio::time::timeout(timeout, w.write_all(&out)).await {
        Ok(written) => written,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!(
                "the client did not read its answer within {} s",
                timeout.as_secs_f64()
            ),
        )),
    };
    drop(out);
    super::heap::after_burst();
    written
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};

    use super::*;
    use crate::daemon::api::{call, Request};

    /// Hostile or broken clients of the control socket: one that connects and sends nothing,
    /// one that sends half a request and stalls, one that sends more than a request may hold,
    /// malformed JSON, one that goes away before its answer. None blocks another client, each
    /// gets an error and changes nothing, and a silent one is cut off after the timeout.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stalled_huge_and_malformed_clients_block_no_one_and_change_nothing() {
        use tokio::io::AsyncReadExt as _;
        let root = std::env::temp_dir().join(format!("netpol-ctl-hostile-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let a = fake_agent(&root);
        let agent = Arc::new(Mutex::new(a));
        let monitor = Monitor::new(agent.clone());
        let sock = root.join("agent.sock");
        let listener = bind(&sock).expect("bind");
        let timeout = Duration::from_millis(500);
        let server = tokio::spawn(serve_with(listener, agent.clone(), monitor, timeout));

        let mut silent = UnixStream::connect(&sock).await.expect("connect");
        let mut half = UnixStream::connect(&sock).await.expect("connect");
        half.write_all(br#"{"cmd":"sta"#).await.expect("write");
        // Others are answered meanwhile.
        let path = sock.clone();
        let status = tokio::task::spawn_blocking(move || call(&path, &Request::Status));
        within("status beside stalled clients", status)
            .await
            .expect("join")
            .expect("status answered");

        // More than a request may hold: an error, read no further than the limit.
        let mut huge = UnixStream::connect(&sock).await.expect("connect");
        let big = vec![b'a'; crate::policy::limits::REQUEST_BYTES + 4096];
        let (mut hr, mut hw) = huge.split();
        let (wrote, resp) = tokio::join!(hw.write_all(&big), answer_split(&mut hr));
        drop(wrote);
        assert!(
            matches!(&resp, Response::Error { message } if message.contains("larger than")),
            "{resp:?}"
        );

        // Malformed JSON, and a request for something unknown.
        for bad in [&b"{not json\n"[..], b"{\"cmd\":\"policy_wipe\"}\n", b"\n"] {
            let mut c = UnixStream::connect(&sock).await.expect("connect");
            c.write_all(bad).await.expect("write");
            let resp = answer(&mut c).await;
            assert!(
                matches!(&resp, Response::Error { message } if message.starts_with("bad request")),
                "{resp:?}"
            );
        }

        // A client gone before its answer: nothing breaks.
        let mut gone = UnixStream::connect(&sock).await.expect("connect");
        gone.write_all(b"{\"cmd\":\"policy_get\",\"name\":null}\n")
            .await
            .expect("write");
        drop(gone);

        // The silent and the stalled clients are cut off after the timeout, with an error.
        for c in [&mut silent, &mut half] {
            let resp = within("the timeout", answer(c)).await;
            assert!(
                matches!(&resp, Response::Error { message } if message.contains("no request within")),
                "{resp:?}"
            );
            let mut rest = Vec::new();
            c.read_to_end(&mut rest).await.expect("closed");
            assert!(rest.is_empty());
        }
        // Nothing changed, and the agent still answers.
        let path = sock.clone();
        let rows =
            tokio::task::spawn_blocking(move || call(&path, &Request::PolicyGet { name: None }))
                .await
                .expect("join")
                .expect("policy get");
        assert_eq!(rows, serde_json::json!([]));
        server.abort();
        std::fs::remove_dir_all(&root).expect("clean up");
    }

    /// A client that sends its request and never reads the answer (a hung script) holds its
    /// connection no longer than a silent one: an answer larger than the socket buffers is
    /// given up after the timeout and the connection closed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_that_never_reads_its_answer_is_cut_off() {
        let root = std::env::temp_dir().join(format!("netpol-ctl-noread-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let mut a = fake_agent(&root);
        // A policy whose text (a long comment) makes `policy get` answer some 900 kB.
        let text = format!(
            "# {}\napiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: big\nspec:\n  endpointSelector: {{}}\n  ingress: [{{}}]\n",
            "x".repeat(900_000)
        );
        a.import(&[crate::daemon::api::SourceFile {
            path: "big.yaml".into(),
            text,
        }])
        .expect("import");
        let agent = Arc::new(Mutex::new(a));
        let monitor = Monitor::new(agent.clone());
        let sock = root.join("agent.sock");
        let listener = bind(&sock).expect("bind");
        let server = tokio::spawn(serve_with(
            listener,
            agent.clone(),
            monitor,
            Duration::from_millis(500),
        ));
        let mut c = UnixStream::connect(&sock).await.expect("connect");
        c.write_all(b"{\"cmd\":\"policy_get\",\"name\":null}\n")
            .await
            .expect("write");
        // Without reading: the agent's end closes (poll reports the hang-up with the answer
        // still unread).
        let fd = std::os::fd::AsRawFd::as_raw_fd(&c);
        let revents = tokio::task::spawn_blocking(move || {
            let mut p = libc::pollfd {
                fd,
                events: libc::POLLRDHUP,
                revents: 0,
            };
            // SAFETY: one valid pollfd; `c` outlives the call (awaited below).
            unsafe { libc::poll(&mut p, 1, 5000) };
            p.revents
        })
        .await
        .expect("join");
        assert!(
            revents & (libc::POLLRDHUP | libc::POLLHUP) != 0,
            "the connection was still open 5 s after the timeout"
        );
        drop(c);
        server.abort();
        std::fs::remove_dir_all(&root).expect("clean up");
    }

    /// An agent on a fake datapath, its state and policy directory under `root`.
    fn fake_agent(root: &Path) -> Agent {
        std::fs::create_dir_all(root.join("policies.d")).expect("mkdir");
        Agent::new(
            Box::new(crate::datapath::fake::FakeDatapath::new(
                crate::datapath::MapSizes::default(),
            )),
            crate::store::Store::new(root.join("state")),
            crate::identity::LabelFilter::default(),
            root.join("policies.d"),
        )
        .expect("agent")
    }

    async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(5), f)
            .await
            .unwrap_or_else(|_| panic!("{what}: no answer within 5 s"))
    }

    async fn answer(s: &mut UnixStream) -> Response {
        let mut out = String::new();
        BufReader::new(s).read_line(&mut out).await.expect("read");
        serde_json::from_str(&out).expect("a response line")
    }

    async fn answer_split(r: &mut tokio::net::unix::ReadHalf<'_>) -> Response {
        let mut out = String::new();
        BufReader::new(r).read_line(&mut out).await.expect("read");
        serde_json::from_str(&out).expect("a response line")
    }

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
