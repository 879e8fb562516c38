//! `run --metrics ADDR`: the Prometheus endpoint, `GET /metrics` over HTTP/1 on a loopback TCP
//! address or a Unix socket. Never on another address: the metrics name containers,
//! identities and what they were denied, which is not for the network.
//!
//! A scrape takes the agent's lock only to copy the endpoint names, then reads the pinned
//! maps on a blocking thread (`datapath::stats`), so it never stalls reconciling. Scrapes run
//! one at a time, at most every [`MIN_INTERVAL`], shared by the requests that wait for them
//! ([`Throttled`]): no number of clients can make the agent read its maps in a loop.
//!
//! # Who else can reach it, and what they must not be able to do
//! - **A web page, through the host's browser** (DNS rebinding: the attacker's name resolves
//!   to 127.0.0.1, so the page's scripts talk to this port as if it were the attacker's site,
//!   same-origin). The browser sends the attacker's name as `Host`, so only requests whose
//!   `Host` (and absolute URI, if any) is `localhost` or a loopback address literal are
//!   answered; others get 421. A request without `Host` gets 400. This holds on the Unix socket
//!   too: a TCP relay in front of it (`socat`) must not reopen the hole; a proxy in front sends
//!   `Host: localhost` (nginx's default for a Unix socket upstream).
//! - **Any local user, over loopback TCP** (slowloris: hold every connection slot while
//!   sending nothing, or reading nothing). A request's head must arrive within
//!   [`Limits::header_time`] of the connection's start or of the previous answer (so an idle
//!   keep-alive connection is closed then too) and fit in 8 KiB; a connection lives at most
//!   [`Limits::connection_time`]. When all [`Limits::connections`] slots are taken, a new
//!   connection takes the slot of the one that has waited longest for a request (or for its
//!   reader), so holding slots stops nobody: the attacker would have to open connections faster
//!   than a scraper sends its request line. A connection whose scrape is being computed is
//!   never closed for another.
//! - **The Unix socket's path**: bound in a private directory, made 0600 there and renamed into
//!   place, so it is never reachable with the umask's mode; what is at the path already must be
//!   a stale socket (nothing listening): a symlink, a file or a live socket is an error, never
//!   replaced. The directory (and every one above it) must be one that only root or the agent's
//!   user can change (sticky ones like `/tmp` included): in one that another user owns or may
//!   write to, they could swap the socket for their own once it is bound.

use std::{
    collections::HashMap,
    convert::Infallible,
    future::Future,
    io,
    net::SocketAddr,
    os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use http_body_util::Full;
use hyper::{
    body::{Bytes, Incoming},
    header, Method, Request, Response, StatusCode,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, UnixListener},
    sync::{Mutex, Notify},
};
use tracing::{debug, info, warn};

use super::state::Agent;
use crate::{
    datapath::stats::PinnedStats,
    metrics::{self, AgentView, Metrics},
};

/// Where the endpoint listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MetricsAddr {
    /// A loopback address and port (`127.0.0.1:9962`, `[::1]:9962`).
    Tcp(SocketAddr),
    /// `unix:/run/netpol/metrics.sock`.
    Unix(PathBuf),
}

impl std::fmt::Display for MetricsAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MetricsAddr::Tcp(a) => write!(f, "{a}"),
            MetricsAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl MetricsAddr {
    /// Parses `run --metrics`: a loopback `IP:PORT` or `unix:PATH`; anything else is refused.
    pub fn parse(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() || !path.starts_with('/') {
                return Err(format!(
                    "{s}: a Unix socket needs an absolute path (unix:/run/netpol/metrics.sock)"
                ));
            }
            return Ok(MetricsAddr::Unix(PathBuf::from(path)));
        }
        let addr: SocketAddr = s.parse().map_err(|_| {
            format!(
                "{s}: not IP:PORT or unix:PATH (e.g. 127.0.0.1:9962, [::1]:9962, unix:/run/netpol/metrics.sock)"
            )
        })?;
        if !addr.ip().is_loopback() {
            return Err(format!(
                "{s}: not a loopback address; the metrics name containers and policies, so they are served only on 127.0.0.0/8, ::1 or a Unix socket (put a proxy with authentication in front to scrape from elsewhere)"
            ));
        }
        Ok(MetricsAddr::Tcp(addr))
    }
}

pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

/// Binds the endpoint (at start: a failure stops the agent with the reason).
pub async fn bind(addr: &MetricsAddr) -> io::Result<Listener> {
    match addr {
        MetricsAddr::Tcp(a) => Ok(Listener::Tcp(TcpListener::bind(a).await?)),
        MetricsAddr::Unix(path) => Ok(Listener::Unix(bind_unix(path)?)),
    }
}

/// Binds a Unix socket at `path` that has mode 0600 from its first moment (see the module
/// documentation): bound as `s` in a fresh directory of mode 0700 beside `path`, made 0600
/// there, renamed to `path`. Replaces only a stale socket; refuses anything else at `path`.
pub fn bind_unix(path: &Path) -> io::Result<UnixListener> {
    let refuse = |what: &str| {
        io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} {what}: refusing to replace it", path.display()),
        )
    };
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let Some(name) = path.file_name() else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{}: not a file name", path.display()),
        ));
    };
    // From here on the path has no symlink in it, and no other user can change what it names.
    let parent = crate::store::trusted_dir(parent).map_err(|e| match e.kind() {
        io::ErrorKind::PermissionDenied => io::Error::new(
            e.kind(),
            format!("{e}: another user could replace the socket there; use a directory only root can write to"),
        ),
        _ => e,
    })?;
    let path = &parent.join(name);
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => return Err(refuse("is a socket another process listens on")),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {} // stale: ours to replace
            Err(e) => return Err(e),
        },
        Ok(m) if m.file_type().is_symlink() => return Err(refuse("is a symbolic link")),
        Ok(_) => return Err(refuse("exists and is not a socket")),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let private = parent.join(format!(
        ".netpol-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::DirBuilder::new().mode(0o700).create(&private)?;
    let staged = private.join("s");
    let bound = (|| {
        // Inside a 0700 directory nobody else can reach the socket before its chmod.
        let l = UnixListener::bind(&staged)?;
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600))?;
        // rename() replaces the name at `path` itself; it never writes through a symlink.
        std::fs::rename(&staged, path)?;
        Ok(l)
    })();
    if bound.is_err() {
        let _ = std::fs::remove_file(&staged);
    }
    if let Err(e) = std::fs::remove_dir(&private) {
        warn!(dir = %private.display(), error = %e, "removing the metrics socket's staging directory");
    }
    bound
}

/// The metrics a scrape serves ([`Scraper`]; the server's tests plug in their own).
pub trait Scrape: Clone + Send + Sync + 'static {
    /// The text format, or OpenMetrics; an error is a 500 with its text.
    fn scrape(&self, openmetrics: bool) -> impl Future<Output = Result<String, String>> + Send;
}

/// What a scrape needs.
#[derive(Clone)]
pub struct Scraper {
    pub agent: Arc<Mutex<Agent>>,
    pub stats: Arc<PinnedStats>,
    pub metrics: Metrics,
}

impl Scrape for Scraper {
    async fn scrape(&self, openmetrics: bool) -> Result<String, String> {
        scrape(self, openmetrics).await
    }
}

/// Scrapes start at most this often.
pub const MIN_INTERVAL: Duration = Duration::from_millis(250);

/// [`Scrape`] one at a time and at most once per `interval`, with answers never older than the
/// request: a request that arrived before the running scrape started gets its answer; one
/// that arrived later waits for the next, which starts `interval` after the last one. So any
/// number of clients costs at most one scrape per `interval`, and a scrape still shows what
/// happened before it was asked for (see the module documentation).
#[derive(Clone)]
pub struct Throttled<S> {
    inner: S,
    interval: Duration,
    /// The last text and OpenMetrics answers.
    last: Arc<Mutex<[Option<Answer>; 2]>>,
}

/// A scrape's text, and when the scrape started.
type Answer = (Instant, String);

impl<S: Scrape> Throttled<S> {
    pub fn new(inner: S, interval: Duration) -> Self {
        Throttled {
            inner,
            interval,
            last: Arc::default(),
        }
    }
}

impl<S: Scrape> Scrape for Throttled<S> {
    async fn scrape(&self, openmetrics: bool) -> Result<String, String> {
        let asked = Instant::now();
        let mut last = self.last.lock().await;
        let slot = &mut last[usize::from(openmetrics)];
        if let Some((started, text)) = slot.as_ref() {
            if *started >= asked {
                return Ok(text.clone());
            }
            tokio::time::sleep_until((*started + self.interval).into()).await;
        }
        let started = Instant::now();
        // A failure is not kept: the next request tries again.
        let text = self.inner.scrape(openmetrics).await?;
        *slot = Some((started, text.clone()));
        Ok(text)
    }
}

/// How much of the agent one client can hold (see the module documentation).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections at once; a new one past them takes the slot of the one idle longest.
    pub connections: usize,
    /// From the connection's start, or the end of the previous answer, until the request's
    /// head has arrived.
    pub header_time: Duration,
    /// A connection's whole life.
    pub connection_time: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            connections: 32,
            header_time: Duration::from_secs(5),
            connection_time: Duration::from_secs(60),
        }
    }
}

/// A request's head (request line and headers) must fit in this.
const HEADER_BYTES: usize = 8 * 1024;
const MAX_HEADERS: usize = 32;
/// hyper's smallest read buffer limit.
const BUFFER_BYTES: usize = 16 * 1024;

/// The open connections, and which of them wait for a request (evictable).
#[derive(Default)]
pub struct Slots {
    table: std::sync::Mutex<SlotTable>,
    /// A slot was freed or became idle.
    changed: Notify,
}

#[derive(Default)]
struct SlotTable {
    next: u64,
    open: HashMap<u64, Slot>,
}

struct Slot {
    /// `None` while a scrape is computed for it.
    idle_since: Option<Instant>,
    close: Arc<Notify>,
}

impl Slots {
    /// Connections open now.
    pub fn open(&self) -> usize {
        self.lock().open.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SlotTable> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A slot for a new connection, once there is one: free, or taken from the connection
    /// idle longest (told to close), or, while every connection's scrape is being computed,
    /// the first that finishes.
    async fn admit(&self, limit: usize) -> (u64, Arc<Notify>) {
        loop {
            let changed = self.changed.notified();
            {
                let mut t = self.lock();
                if t.open.len() >= limit {
                    let victim = t
                        .open
                        .iter()
                        .filter_map(|(id, s)| s.idle_since.map(|since| (since, *id)))
                        .min()
                        .map(|(_, id)| id);
                    if let Some(id) = victim {
                        if let Some(s) = t.open.remove(&id) {
                            debug!("metrics: closing the connection idle longest for a new one");
                            s.close.notify_one();
                        }
                    }
                }
                if t.open.len() < limit {
                    let id = t.next;
                    t.next += 1;
                    let close = Arc::new(Notify::new());
                    t.open.insert(
                        id,
                        Slot {
                            idle_since: Some(Instant::now()),
                            close: close.clone(),
                        },
                    );
                    return (id, close);
                }
            }
            changed.await;
        }
    }

    fn set_busy(&self, id: u64, busy: bool) {
        if let Some(s) = self.lock().open.get_mut(&id) {
            s.idle_since = if busy { None } else { Some(Instant::now()) };
        }
        if !busy {
            self.changed.notify_one();
        }
    }

    fn release(&self, id: u64) {
        self.lock().open.remove(&id);
        self.changed.notify_one();
    }
}

/// Frees a connection's slot however its task ends.
struct SlotGuard {
    slots: Arc<Slots>,
    id: u64,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.slots.release(self.id);
    }
}

/// Marks a connection busy while its scrape is computed.
struct Busy<'a>(&'a SlotGuard);

impl<'a> Busy<'a> {
    fn new(g: &'a SlotGuard) -> Self {
        g.slots.set_busy(g.id, true);
        Busy(g)
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.slots.set_busy(self.0.id, false);
    }
}

pub async fn serve(listener: Listener, scraper: impl Scrape) {
    serve_with(listener, scraper, Limits::default(), Arc::default()).await
}

/// [`serve`] with other limits, keeping its connections in `slots`.
pub async fn serve_with(
    listener: Listener,
    scraper: impl Scrape,
    limits: Limits,
    slots: Arc<Slots>,
) {
    loop {
        let accepted = match &listener {
            Listener::Tcp(l) => l.accept().await.map(|(s, _)| Conn::Tcp(s)),
            Listener::Unix(l) => l.accept().await.map(|(s, _)| Conn::Unix(s)),
        };
        let conn = match accepted {
            Ok(conn) => conn,
            Err(e) => {
                warn!(error = %e, "accepting a metrics connection");
                // Out of file descriptors and the like: do not spin.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (id, close) = slots.admit(limits.connections.max(1)).await;
        let guard = SlotGuard {
            slots: slots.clone(),
            id,
        };
        let scraper = scraper.clone();
        tokio::spawn(async move {
            let conn = async {
                match conn {
                    Conn::Tcp(s) => connection(s, scraper, &guard, limits).await,
                    Conn::Unix(s) => connection(s, scraper, &guard, limits).await,
                }
            };
            tokio::select! {
                () = conn => {}
                () = close.notified() => {}
            }
            drop(guard);
        });
    }
}

enum Conn {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

async fn connection<S>(stream: S, scraper: impl Scrape, guard: &SlotGuard, limits: Limits)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(|req| {
        let scraper = scraper.clone();
        async move {
            let _busy = Busy::new(guard);
            Ok::<_, Infallible>(respond(req, &scraper).await)
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_time)
        .max_header_size(HEADER_BYTES)
        .max_headers(MAX_HEADERS)
        .max_buf_size(BUFFER_BYTES)
        .serve_connection(TokioIo::new(stream), service);
    match tokio::time::timeout(limits.connection_time, conn).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => debug!(error = %e, "metrics connection"),
        Err(_) => debug!("metrics connection reached its time limit"),
    }
}

/// Whether `authority` (a `Host` header, or a request URI's authority) names this host's
/// loopback: `localhost` or a loopback address literal (`127.0.0.1`, `[::1]`), with or without
/// a port. A name that only resolves to loopback (an attacker's, rebinding) is not.
pub fn loopback_authority(authority: &str) -> bool {
    let (host, port) = match authority.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((v6, port)) => (v6, port),
            None => return false,
        },
        None => match authority.find(':') {
            Some(i) => authority.split_at(i),
            None => (authority, ""),
        },
    };
    let port_ok = port.is_empty()
        || port
            .strip_prefix(':')
            .is_some_and(|p| (1..=5).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()));
    let host_ok = if authority.starts_with('[') {
        host.parse::<std::net::Ipv6Addr>()
            .is_ok_and(|a| a.is_loopback())
    } else {
        host.eq_ignore_ascii_case("localhost")
            || host
                .parse::<std::net::Ipv4Addr>()
                .is_ok_and(|a| a.is_loopback())
    };
    port_ok && host_ok
}

/// The DNS-rebinding check: `None` when the request names this host's loopback, else the
/// answer.
fn misdirected(req: &Request<Incoming>) -> Option<Response<Full<Bytes>>> {
    let hosts: Vec<_> = req.headers().get_all(header::HOST).iter().collect();
    let host = match hosts.as_slice() {
        [one] => one.to_str().ok(),
        [] => {
            return Some(plain(
                StatusCode::BAD_REQUEST,
                "netpol-agent: a request without a Host header is refused\n".into(),
            ))
        }
        _ => None,
    };
    let uri_ok = req
        .uri()
        .authority()
        .is_none_or(|a| loopback_authority(a.as_str()));
    if host.is_some_and(loopback_authority) && uri_ok {
        return None;
    }
    debug!(host = ?host, uri = %req.uri(), "metrics: refused a request for another host name");
    Some(plain(
        StatusCode::MISDIRECTED_REQUEST,
        "netpol-agent: the metrics answer only to Host: localhost or a loopback address \
         (a proxy in front must send one)\n"
            .into(),
    ))
}

fn plain(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

async fn respond(req: Request<Incoming>, scraper: &impl Scrape) -> Response<Full<Bytes>> {
    if let Some(refused) = misdirected(&req) {
        return refused;
    }
    if req.uri().path() != "/metrics" {
        return plain(
            StatusCode::NOT_FOUND,
            "netpol-agent: the metrics are at /metrics\n".into(),
        );
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = plain(StatusCode::METHOD_NOT_ALLOWED, "GET /metrics\n".into());
        r.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    let openmetrics = metrics::wants_openmetrics(
        req.headers()
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok()),
    );
    match scraper.scrape(openmetrics).await {
        Ok(body) => {
            let mut r = Response::new(Full::new(Bytes::from(body)));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static(if openmetrics {
                    metrics::CONTENT_TYPE_OPENMETRICS
                } else {
                    metrics::CONTENT_TYPE_TEXT
                }),
            );
            r
        }
        Err(e) => {
            warn!(error = %e, "metrics scrape");
            plain(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("netpol-agent: reading the datapath's counters failed: {e}\n"),
            )
        }
    }
}

/// One scrape: the endpoint names under the agent's lock, then the maps off the async thread.
/// A failure to read the maps is an error (500), never counters that silently went missing.
pub async fn scrape(scraper: &Scraper, openmetrics: bool) -> Result<String, String> {
    let view: AgentView = scraper.agent.lock().await.metrics_view();
    let stats = scraper.stats.clone();
    let kernel = tokio::task::spawn_blocking(move || stats.read())
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    let reg = metrics::registry(&scraper.metrics, &view, Some(&kernel));
    Ok(metrics::encode(&reg, openmetrics))
}

/// Starts the endpoint if `--metrics` asked for it.
pub async fn start(addr: Option<&MetricsAddr>, scraper: Scraper) -> anyhow::Result<()> {
    let Some(addr) = addr else {
        return Ok(());
    };
    let l = bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("--metrics {addr}: {e}"))?;
    info!(%addr, "metrics at http://{addr}/metrics");
    tokio::spawn(serve(l, Throttled::new(scraper, MIN_INTERVAL)));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[derive(Clone)]
    struct Fake(Arc<String>);

    impl Scrape for Fake {
        async fn scrape(&self, _openmetrics: bool) -> Result<String, String> {
            Ok((*self.0).clone())
        }
    }

    async fn start_tcp(body: &str, limits: Limits) -> (SocketAddr, Arc<Slots>) {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("local_addr");
        let slots = Arc::<Slots>::default();
        tokio::spawn(serve_with(
            Listener::Tcp(l),
            Fake(Arc::new(body.to_owned())),
            limits,
            slots.clone(),
        ));
        (addr, slots)
    }

    /// Sends `req` and reads until the server closes (at most 20 s).
    async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, req: &str) -> String {
        s.write_all(req.as_bytes()).await.expect("send");
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut out))
            .await
            .expect("the server answered and closed within 20 s")
            .expect("read");
        String::from_utf8_lossy(&out).into_owned()
    }

    async fn get(addr: SocketAddr, host: Option<&str>) -> String {
        let host = host.map(|h| format!("Host: {h}\r\n")).unwrap_or_default();
        let s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        exchange(
            s,
            &format!("GET /metrics HTTP/1.1\r\n{host}Connection: close\r\n\r\n"),
        )
        .await
    }

    fn status(answer: &str) -> &str {
        answer.split(' ').nth(1).unwrap_or(answer)
    }

    /// Whether the server closed `s` within 10 s (EOF or a reset, after any answer it sent).
    async fn closed_by_server(s: &mut tokio::net::TcpStream) -> bool {
        let mut buf = vec![0; 64 * 1024];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
                Err(_) => return false,
            }
        }
    }

    #[test]
    fn only_localhost_and_loopback_literals_are_this_host() {
        for ok in [
            "localhost",
            "LocalHost:9962",
            "127.0.0.1",
            "127.0.0.1:9962",
            "127.1.2.3:80",
            "[::1]",
            "[::1]:9962",
        ] {
            assert!(loopback_authority(ok), "{ok} refused");
        }
        for bad in [
            "",
            "evil.example",
            "evil.example:9962",
            "localhost.evil.example",
            "127.0.0.1.evil.example",
            "127.0.0.1.nip.io:9962",
            "localhost:",
            "localhost:99a",
            "localhost:123456",
            "localhost:9962:1",
            "2130706433",
            "0x7f.0.0.1",
            "10.0.0.1:9962",
            "[::ffff:127.0.0.1]:9962",
            "[::1",
            "::1",
            "[::1]x",
            "[evil.example]",
            // Reviewed variants: a trailing dot, userinfo, a list, an IPv6 zone, whitespace.
            "localhost.",
            "localhost.:9962",
            "localhost@evil.example",
            "evil.example@localhost",
            "localhost:9962, evil.example",
            "[::1%lo]:9962",
            "[::1]:9962.evil.example",
            " localhost",
            "127.0.0.1 ",
        ] {
            assert!(!loopback_authority(bad), "{bad} accepted");
        }
    }

    /// DNS rebinding: a page of the attacker's domain, resolved to 127.0.0.1, reaches the port
    /// with its own name as Host: refused, on TCP and on the Unix socket alike.
    #[tokio::test]
    async fn answers_only_requests_that_name_localhost() {
        let (addr, _) = start_tcp("netpol_build_info 1\n", Limits::default()).await;
        let port = addr.port();
        for host in [
            format!("127.0.0.1:{port}"),
            format!("localhost:{port}"),
            "LOCALHOST".to_owned(),
        ] {
            let a = get(addr, Some(&host)).await;
            assert_eq!(status(&a), "200", "Host: {host}: {a}");
            assert!(a.ends_with("netpol_build_info 1\n"), "{a}");
        }
        for host in [
            format!("evil.example:{port}"),
            format!("localhost.evil.example:{port}"),
            format!("127.0.0.1.evil.example:{port}"),
        ] {
            let a = get(addr, Some(&host)).await;
            assert_eq!(status(&a), "421", "Host: {host}: {a}");
            assert!(!a.contains("netpol_build_info"), "{a}");
        }
        let a = get(addr, None).await;
        assert_eq!(status(&a), "400", "no Host: {a}");
        for req in [
            "GET /metrics HTTP/1.0\r\n\r\n".to_owned(),
            "GET /metrics HTTP/1.1\r\nHost: localhost\r\nHost: evil.example\r\nConnection: close\r\n\r\n".to_owned(),
            "GET http://evil.example/metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".to_owned(),
            "GET http://localhost@evil.example/metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".to_owned(),
            format!("GET http://evil.example:{port}/metrics HTTP/1.1\r\nHost: [::1]:{port}\r\nConnection: close\r\n\r\n"),
            format!("GET /metrics HTTP/1.1\r\nHost: localhost.:{port}\r\nConnection: close\r\n\r\n"),
            "GET /metrics HTTP/1.0\r\nHost: evil.example\r\n\r\n".to_owned(),
            "CONNECT evil.example:80 HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".to_owned(),
        ] {
            let s = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let a = exchange(s, &req).await;
            assert!(
                matches!(status(&a), "400" | "421") && !a.contains("netpol_build_info"),
                "{req:?}: {a}"
            );
        }
        let s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let a = exchange(
            s,
            &format!("GET http://127.0.0.1:{port}/metrics HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"),
        )
        .await;
        assert_eq!(status(&a), "200", "absolute URI of loopback: {a}");
        for req in [
            format!("GET /metrics HTTP/1.1\r\nHost: [::1]:{port}\r\nConnection: close\r\n\r\n"),
            format!("GET http://[::1]:{port}/metrics HTTP/1.1\r\nHost: [::1]:{port}\r\nConnection: close\r\n\r\n"),
            "GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n".to_owned(),
        ] {
            let s = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let a = exchange(s, &req).await;
            assert_eq!(status(&a), "200", "{req:?}: {a}");
        }
    }

    /// Slowloris: clients that hold every slot — sending their request's head slowly, or not
    /// reading a (large) answer — do not keep a scrape out. The head timeout is a minute here,
    /// so the scrape gets in by taking the slot of one of them, not because they timed out.
    #[tokio::test]
    async fn slow_clients_holding_every_slot_do_not_keep_a_scrape_out() {
        let body = "x".repeat(8 << 20);
        let limits = Limits {
            connections: 6,
            header_time: Duration::from_secs(60),
            connection_time: Duration::from_secs(120),
        };
        let (addr, slots) = start_tcp(&body, limits).await;
        let mut held = Vec::new();
        for i in 0..limits.connections {
            let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
            if i % 2 == 0 {
                // Half a head, then nothing.
                s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n")
                    .await
                    .expect("send");
            } else {
                // A whole request, and its 8 MiB answer never read.
                s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
                    .await
                    .expect("send");
                tokio::time::timeout(Duration::from_secs(10), s.readable())
                    .await
                    .expect("the slow reader's answer started within 10 s")
                    .expect("readable");
            }
            held.push(s);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while slots.open() < limits.connections {
            assert!(
                Instant::now() < deadline,
                "the slow clients hold {} slots",
                slots.open()
            );
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let started = Instant::now();
        let a = get(addr, Some("localhost")).await;
        assert_eq!(status(&a), "200", "{}", &a[..a.len().min(200)]);
        assert!(a.ends_with(&body), "the scrape's answer is incomplete");
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the scrape took {:?}",
            started.elapsed()
        );
        assert!(slots.open() <= limits.connections);
    }

    /// A client that sends nothing, or its head a byte at a time, or nothing after an answer
    /// (keep-alive), is closed after the head timeout; a head over 8 KiB is refused.
    #[tokio::test]
    async fn idle_slow_and_oversized_heads_are_cut_off() {
        let limits = Limits {
            connections: 8,
            header_time: Duration::from_millis(500),
            connection_time: Duration::from_secs(60),
        };
        let (addr, slots) = start_tcp("netpol_build_info 1\n", limits).await;

        let mut silent = tokio::net::TcpStream::connect(addr).await.expect("connect");
        assert!(
            closed_by_server(&mut silent).await,
            "a silent client was not closed"
        );

        let trickle = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (mut rd, mut wr) = trickle.into_split();
        let started = Instant::now();
        let writer = tokio::spawn(async move {
            for b in b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nX-Slow: "
                .iter()
                .cycle()
                .take(400)
            {
                if wr.write_all(&[*b]).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        let mut buf = [0; 1024];
        let closed = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match rd.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(
            closed.is_ok(),
            "a head sent a byte every 50 ms was not cut off"
        );
        assert!(started.elapsed() < Duration::from_secs(10));
        writer.abort();

        let mut kept = tokio::net::TcpStream::connect(addr).await.expect("connect");
        kept.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .expect("send");
        let mut answer = Vec::new();
        while !answer.ends_with(b"netpol_build_info 1\n") {
            let n = tokio::time::timeout(Duration::from_secs(10), kept.read(&mut buf))
                .await
                .expect("an answer within 10 s")
                .expect("read");
            assert!(n > 0, "closed before answering");
            answer.extend_from_slice(&buf[..n]);
        }
        assert!(answer.starts_with(b"HTTP/1.1 200"));
        assert!(
            closed_by_server(&mut kept).await,
            "an idle keep-alive connection was not closed"
        );

        let big = format!(
            "GET /metrics HTTP/1.1\r\nHost: localhost\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
            "a".repeat(HEADER_BYTES)
        );
        // The server stops reading at the limit, answers 431 and closes; closing with the rest
        // of the request unread resets the connection, which may reach the client first.
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let _ = s.write_all(big.as_bytes()).await;
        let mut got = Vec::new();
        match tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut got)).await {
            Ok(Ok(_)) => assert_eq!(status(&String::from_utf8_lossy(&got)), "431"),
            Ok(Err(e)) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}"),
            Err(_) => panic!("an oversized head was neither refused nor cut off in 20 s"),
        }
        let many = format!(
            "GET /metrics HTTP/1.1\r\nHost: localhost\r\n{}Connection: close\r\n\r\n",
            (0..MAX_HEADERS)
                .map(|i| format!("X-{i}: 1\r\n"))
                .collect::<String>()
        );
        let s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        assert_eq!(status(&exchange(s, &many).await), "431");

        assert_eq!(status(&get(addr, Some("localhost")).await), "200");
        let deadline = Instant::now() + Duration::from_secs(10);
        while slots.open() > 0 {
            assert!(
                Instant::now() < deadline,
                "{} connections left open",
                slots.open()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// A directory another user can write to (owned by them, or writable by others without the
    /// sticky bit, there or further up, or reached through a symlink to one) lets that user
    /// replace the socket after it was bound, and clients (`policy import` as root) then talk
    /// to theirs: refused, nothing created there. A sticky shared directory (`/tmp`) is fine.
    #[tokio::test]
    async fn a_socket_directory_another_user_can_write_to_is_refused() {
        let dir = scratch_dir("untrusted");
        let open = dir.join("open");
        std::fs::create_dir(&open).expect("mkdir");
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        let deeper = open.join("sub");
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&deeper)
            .expect("mkdir");
        let link = dir.join("link");
        std::os::unix::fs::symlink(&open, &link).expect("symlink");
        let mut refused = vec![
            open.join("metrics.sock"),
            deeper.join("metrics.sock"),
            link.join("metrics.sock"),
        ];
        // SAFETY: plain libc calls on a path we made.
        if unsafe { libc::geteuid() } == 0 {
            let theirs = dir.join("theirs");
            std::fs::create_dir(&theirs).expect("mkdir");
            std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).expect("chown");
            std::fs::set_permissions(&theirs, std::fs::Permissions::from_mode(0o755))
                .expect("chmod");
            refused.push(theirs.join("metrics.sock"));
        }
        for path in &refused {
            let e = bind_unix(path).expect_err(&format!("bound {}", path.display()));
            assert_eq!(
                e.kind(),
                io::ErrorKind::PermissionDenied,
                "{}: {e}",
                path.display()
            );
            let entries: Vec<_> = std::fs::read_dir(path.parent().expect("parent"))
                .expect("read_dir")
                .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
                .filter(|n| n != "sub")
                .collect();
            assert!(entries.is_empty(), "{}: left {entries:?}", path.display());
        }
        let shared = dir.join("shared");
        std::fs::create_dir(&shared).expect("mkdir");
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).expect("chmod");
        let _l = bind_unix(&shared.join("metrics.sock")).expect("a sticky shared directory");
        std::fs::remove_dir_all(&dir).expect("clean up");
    }

    /// Counts its scrapes and how many ran at once.
    #[derive(Clone, Default)]
    struct Counting {
        calls: Arc<std::sync::atomic::AtomicUsize>,
        running: Arc<std::sync::atomic::AtomicUsize>,
        most: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl Scrape for Counting {
        async fn scrape(&self, _openmetrics: bool) -> Result<String, String> {
            use std::sync::atomic::Ordering::SeqCst;
            let n = self.calls.fetch_add(1, SeqCst) + 1;
            let now = self.running.fetch_add(1, SeqCst) + 1;
            self.most.fetch_max(now, SeqCst);
            tokio::time::sleep(Duration::from_millis(20)).await;
            self.running.fetch_sub(1, SeqCst);
            Ok(format!("scrape {n}\n"))
        }
    }

    /// Requests at once share scrapes, which never run concurrently nor more often than the
    /// interval, and never answer with a scrape that started before the request.
    #[tokio::test]
    async fn concurrent_requests_share_scrapes_that_are_never_older_than_the_request() {
        use std::sync::atomic::Ordering::SeqCst;
        let counting = Counting::default();
        let interval = Duration::from_millis(200);
        let t = Throttled::new(counting.clone(), interval);
        let started = Instant::now();
        // The first starts a scrape at once; the 19 others, asked while it runs, share the
        // next one, which starts an interval after it.
        let answers = futures_util::future::join_all((0..20).map(|_| t.scrape(false))).await;
        assert_eq!(answers[0], Ok("scrape 1\n".to_owned()));
        for a in &answers[1..] {
            assert_eq!(a, &Ok("scrape 2\n".to_owned()));
        }
        assert!(started.elapsed() >= interval, "{:?}", started.elapsed());
        assert_eq!(counting.most.load(SeqCst), 1, "scrapes ran concurrently");
        // Asked after the last scrape: a new one.
        assert_eq!(t.scrape(false).await, Ok("scrape 3\n".to_owned()));
        assert_eq!(t.scrape(true).await, Ok("scrape 4\n".to_owned()));
        assert_eq!(counting.calls.load(SeqCst), 4);

        // Through the server: every client answered.
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("local_addr");
        tokio::spawn(serve(Listener::Tcp(l), t.clone()));
        let answers =
            futures_util::future::join_all((0..10).map(|_| get(addr, Some("localhost")))).await;
        for a in &answers {
            assert_eq!(status(a), "200", "{a}");
        }
        assert!(counting.calls.load(SeqCst) <= 4 + 10);
        assert_eq!(counting.most.load(SeqCst), 1, "scrapes ran concurrently");
    }

    fn scratch_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("netpol-metrics-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("scratch dir");
        d
    }

    /// The socket is 0600 when it appears, nothing of the staging is left, a stale socket is
    /// replaced, and a live socket, a symlink, a file or a missing directory are errors that
    /// leave what is there alone.
    #[tokio::test]
    async fn unix_socket_is_root_only_and_replaces_only_a_stale_socket() {
        let dir = scratch_dir("unix");
        let path = dir.join("metrics.sock");
        let l = bind_unix(&path).expect("bind");
        let m = std::fs::symlink_metadata(&path).expect("socket");
        assert!(m.file_type().is_socket());
        assert_eq!(m.permissions().mode() & 0o7777, 0o600);
        let left: Vec<_> = std::fs::read_dir(&dir)
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(left, ["metrics.sock"], "staging left behind");

        let e = bind_unix(&path).expect_err("bound over a live socket");
        assert!(e.to_string().contains("another process listens"), "{e}");
        tokio::spawn(serve_with(
            Listener::Unix(l),
            Fake(Arc::new("netpol_build_info 1\n".into())),
            Limits::default(),
            Arc::default(),
        ));
        let s = tokio::net::UnixStream::connect(&path)
            .await
            .expect("connect");
        let a = exchange(
            s,
            "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert_eq!(status(&a), "200", "{a}");
        let s = tokio::net::UnixStream::connect(&path)
            .await
            .expect("connect");
        let a = exchange(
            s,
            "GET /metrics HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert_eq!(status(&a), "421", "{a}");

        // A stale socket (its listener gone) is replaced.
        let stale = dir.join("stale.sock");
        drop(std::os::unix::net::UnixListener::bind(&stale).expect("bind stale"));
        let _l2 = bind_unix(&stale).expect("replace a stale socket");
        assert_eq!(
            std::fs::symlink_metadata(&stale)
                .expect("socket")
                .permissions()
                .mode()
                & 0o7777,
            0o600
        );

        let target = dir.join("precious");
        std::fs::write(&target, "keep").expect("write");
        let link = dir.join("link.sock");
        std::os::unix::fs::symlink(&target, &link).expect("symlink");
        let e = bind_unix(&link).expect_err("replaced a symlink");
        assert!(e.to_string().contains("symbolic link"), "{e}");
        assert!(std::fs::symlink_metadata(&link)
            .expect("link")
            .file_type()
            .is_symlink());
        let e = bind_unix(&target).expect_err("replaced a file");
        assert!(e.to_string().contains("not a socket"), "{e}");
        assert_eq!(std::fs::read_to_string(&target).expect("read"), "keep");
        let e = bind_unix(&dir.join("missing/metrics.sock")).expect_err("no directory");
        assert_eq!(e.kind(), io::ErrorKind::NotFound);

        let left: Vec<_> = std::fs::read_dir(&dir)
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".netpol"))
            .collect();
        assert!(left.is_empty(), "staging left behind: {left:?}");
        std::fs::remove_dir_all(&dir).expect("clean up");
    }

    #[test]
    fn only_loopback_or_a_unix_socket() {
        assert_eq!(
            MetricsAddr::parse("127.0.0.1:9962"),
            Ok(MetricsAddr::Tcp("127.0.0.1:9962".parse().unwrap()))
        );
        assert!(MetricsAddr::parse("127.1.2.3:9962").is_ok());
        assert!(MetricsAddr::parse("[::1]:9962").is_ok());
        assert_eq!(
            MetricsAddr::parse("unix:/run/netpol/metrics.sock"),
            Ok(MetricsAddr::Unix("/run/netpol/metrics.sock".into()))
        );
        for bad in [
            "0.0.0.0:9962",
            "[::]:9962",
            "10.0.0.1:9962",
            "[2001:db8::1]:9962",
            "[::ffff:127.0.0.1]:9962",
        ] {
            let e = MetricsAddr::parse(bad).unwrap_err();
            assert!(e.contains("not a loopback address"), "{bad}: {e}");
        }
        for bad in ["localhost:9962", "9962", "unix:", "unix:relative.sock", ""] {
            assert!(MetricsAddr::parse(bad).is_err(), "{bad} accepted");
        }
    }
}
