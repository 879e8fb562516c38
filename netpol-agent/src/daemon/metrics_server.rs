//! `run --metrics ADDR`: the Prometheus endpoint, `GET /metrics` over HTTP/1 on a loopback TCP
//! address or a Unix socket. Never on another address: the metrics name containers,
//! identities and what they were denied, which is not for the network.
//!
//! A scrape takes the agent's lock only to copy the endpoint names, then reads the pinned
//! maps on a blocking thread (`datapath::stats`), so it never stalls reconciling.

use std::{
    convert::Infallible, net::SocketAddr, os::unix::fs::PermissionsExt, path::PathBuf, sync::Arc,
    time::Duration,
};

use http_body_util::Full;
use hyper::{
    body::{Bytes, Incoming},
    header, Method, Request, Response, StatusCode,
};
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, UnixListener},
    sync::{Mutex, Semaphore},
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
pub async fn bind(addr: &MetricsAddr) -> std::io::Result<Listener> {
    match addr {
        MetricsAddr::Tcp(a) => Ok(Listener::Tcp(TcpListener::bind(a).await?)),
        MetricsAddr::Unix(path) => {
            match std::fs::remove_file(path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
            let l = UnixListener::bind(path)?;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
            Ok(Listener::Unix(l))
        }
    }
}

/// What a scrape needs.
#[derive(Clone)]
pub struct Scraper {
    pub agent: Arc<Mutex<Agent>>,
    pub stats: Arc<PinnedStats>,
    pub metrics: Metrics,
}

/// At most this many connections at once; a connection gets this long for its requests.
const CONNECTIONS: usize = 16;
const CONNECTION_TIME: Duration = Duration::from_secs(30);

pub async fn serve(listener: Listener, scraper: Scraper) {
    let slots = Arc::new(Semaphore::new(CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let accepted = match &listener {
            Listener::Tcp(l) => l.accept().await.map(|(s, _)| Conn::Tcp(s)),
            Listener::Unix(l) => l.accept().await.map(|(s, _)| Conn::Unix(s)),
        };
        match accepted {
            Ok(conn) => {
                let scraper = scraper.clone();
                tokio::spawn(async move {
                    match conn {
                        Conn::Tcp(s) => connection(s, scraper).await,
                        Conn::Unix(s) => connection(s, scraper).await,
                    }
                    drop(permit);
                });
            }
            Err(e) => {
                warn!(error = %e, "accepting a metrics connection");
                // Out of file descriptors and the like: do not spin.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

enum Conn {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

async fn connection<S>(stream: S, scraper: Scraper)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| {
        let scraper = scraper.clone();
        async move { Ok::<_, Infallible>(respond(req, &scraper).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), service);
    match tokio::time::timeout(CONNECTION_TIME, conn).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => debug!(error = %e, "metrics connection"),
        Err(_) => debug!("metrics connection timed out"),
    }
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

async fn respond(req: Request<Incoming>, scraper: &Scraper) -> Response<Full<Bytes>> {
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
    match scrape(scraper, openmetrics).await {
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
    tokio::spawn(serve(l, scraper));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
