//! [`DockerWatcher`]: Docker's container list and event stream turned into [`DockerEvent`]s.
//!
//! Each session starts with a full [`DockerEvent::Snapshot`] and then follows the event stream,
//! replayed from the daemon's clock at the start of the session (`since`), so nothing that happens
//! while the snapshot is taken is lost. Every container event leads to a fresh `inspect`, and the
//! watcher only emits what changed relative to what it emitted before; events are therefore
//! idempotent, and quirks such as a `connect` before `start` or a doubled `disconnect` produce no
//! spurious or duplicated state. When the stream breaks or dockerd restarts the watcher emits
//! [`DockerEvent::Disconnected`], retries with exponential backoff, and starts over with a new
//! snapshot that the consumer uses to replace its state.

use std::{
    collections::{BTreeMap, BTreeSet},
    future::Future,
    path::PathBuf,
    sync::{Arc, RwLock},
    time::Duration,
};

use bollard::{
    models::{
        ContainerInspectResponse, EventMessage, EventMessageTypeEnum, ImageInspect,
        Network as BollardNetwork,
    },
    query_parameters::{EventsOptions, ListContainersOptions},
    Docker, API_DEFAULT_VERSION,
};
use futures_util::{stream::BoxStream, StreamExt};
use tokio::sync::mpsc;

use crate::identity::netpol_labels;

use super::{
    model::{
        container_from_inspect, image_id, network_from_docker, Container, Network, NetworkMode,
        VethLookup,
    },
    netlink::{NetlinkError, WantedInterface},
};

/// Default Docker socket.
pub const DEFAULT_SOCKET: &str = "/var/run/docker.sock";
/// Timeout of one Docker API request (not of the event stream).
const REQUEST_TIMEOUT_SECS: u64 = 30;
/// How often a running container whose veth is not (yet) visible is looked at again.
const VETH_RETRIES: u32 = 30;
const VETH_RETRY_DELAY: Duration = Duration::from_millis(10);
/// Images whose labels are remembered (the cache starts over beyond).
const IMAGE_CACHE: usize = 1024;
/// A session that lasted this long resets the reconnect backoff.
const STABLE_SESSION: Duration = Duration::from_secs(30);

/// What the watcher tells the rest of the agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DockerEvent {
    /// Full state after (re)connecting: replaces everything known before.
    Snapshot {
        containers: Vec<Container>,
        networks: Vec<Network>,
    },
    /// A running container appeared or changed (start, network connect/disconnect, rename).
    ContainerUp(Container),
    /// A container that was up is no longer running (die, stop, destroy).
    ContainerDown { id: String },
    /// The network list changed; the full new list.
    NetworksChanged(Vec<Network>),
    /// Docker is unreachable or its event stream broke; a `Snapshot` follows on reconnect.
    Disconnected(String),
    /// `event`, caused by a Docker event of this time (only from a watcher made
    /// [`DockerWatcher::with_event_times`]): the agent measures how long it took to apply it.
    At {
        time: std::time::SystemTime,
        event: Box<DockerEvent>,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error("connecting to Docker at {socket}: {source}")]
    Connect {
        socket: String,
        source: bollard::errors::Error,
    },
    #[error("Docker API {call}: {source}")]
    Api {
        call: &'static str,
        source: bollard::errors::Error,
    },
    #[error("Docker event stream: {0}")]
    Stream(bollard::errors::Error),
    #[error("Docker event stream ended")]
    StreamEnded,
}

/// Watcher configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DockerConfig {
    /// The daemon's Unix socket; `None` = `DOCKER_HOST` or [`DEFAULT_SOCKET`].
    pub socket: Option<PathBuf>,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

impl Default for DockerConfig {
    fn default() -> Self {
        Self {
            socket: None,
            backoff_min: Duration::from_millis(250),
            backoff_max: Duration::from_secs(15),
        }
    }
}

/// What a session learns from the daemon when it connects.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DaemonInfo {
    /// The daemon's clock (RFC 3339), used as `since` for the event stream.
    pub system_time: Option<String>,
    pub server_version: Option<String>,
}

/// The Docker API calls the watcher makes; [`BollardApi`] in production, a fake in tests.
pub trait DockerApi: Send + Sync + 'static {
    /// (Re)connects; fails while the daemon is unreachable.
    fn connect(&self) -> impl Future<Output = Result<DaemonInfo, DockerError>> + Send;
    /// Ids of running containers.
    fn list_running(&self) -> impl Future<Output = Result<Vec<String>, DockerError>> + Send;
    /// `None` when the container no longer exists.
    fn inspect(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<Option<ContainerInspectResponse>, DockerError>> + Send;
    fn networks(&self) -> impl Future<Output = Result<Vec<BollardNetwork>, DockerError>> + Send;
    /// `None` when the image no longer exists.
    fn inspect_image(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<Option<ImageInspect>, DockerError>> + Send;
    /// Events from `since` (the daemon's time) on, then live.
    fn events(
        &self,
        since: Option<String>,
    ) -> BoxStream<'static, Result<EventMessage, DockerError>>;
}

/// Finds host veths inside a container's network namespace; [`NetlinkVeths`] in production.
pub trait VethResolver: Send + Sync + 'static {
    fn resolve(
        &self,
        netns: PathBuf,
        wanted: Vec<WantedInterface>,
    ) -> impl Future<Output = Result<VethLookup, NetlinkError>> + Send;
}

/// [`VethResolver`] through rtnetlink in the container's namespace, on the lookup thread (see
/// [`super::veth_thread`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct NetlinkVeths;

impl VethResolver for NetlinkVeths {
    async fn resolve(
        &self,
        netns: PathBuf,
        wanted: Vec<WantedInterface>,
    ) -> Result<VethLookup, NetlinkError> {
        super::veth_thread::lookup(netns, wanted).await
    }
}

/// [`DockerApi`] over bollard and the daemon's Unix socket.
pub struct BollardApi {
    socket: Option<PathBuf>,
    docker: RwLock<Option<Docker>>,
}

impl BollardApi {
    pub fn new(socket: Option<PathBuf>) -> Self {
        Self {
            socket,
            docker: RwLock::new(None),
        }
    }

    fn client(&self, call: &'static str) -> Result<Docker, DockerError> {
        let guard = match self.docker.read() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        guard.clone().ok_or(DockerError::Api {
            call,
            source: bollard::errors::Error::RequestTimeoutError,
        })
    }
}

impl DockerApi for BollardApi {
    async fn connect(&self) -> Result<DaemonInfo, DockerError> {
        let socket = self.socket.as_ref().map(|p| p.display().to_string());
        let docker = match &socket {
            Some(path) => {
                Docker::connect_with_socket(path, REQUEST_TIMEOUT_SECS, API_DEFAULT_VERSION)
            }
            None => Docker::connect_with_socket_defaults(),
        }
        .map_err(|source| DockerError::Connect {
            socket: socket.clone().unwrap_or_else(|| DEFAULT_SOCKET.to_owned()),
            source,
        })?;
        // Speak the daemon's API version when it is older than bollard's (Docker 20.10: 1.41).
        let docker = docker
            .negotiate_version()
            .await
            .map_err(|source| DockerError::Connect {
                socket: socket.clone().unwrap_or_else(|| DEFAULT_SOCKET.to_owned()),
                source,
            })?;
        let info = docker.info().await.map_err(|source| DockerError::Api {
            call: "info",
            source,
        })?;
        match self.docker.write() {
            Ok(mut g) => *g = Some(docker),
            Err(poisoned) => *poisoned.into_inner() = Some(docker),
        }
        Ok(DaemonInfo {
            system_time: info.system_time,
            server_version: info.server_version,
        })
    }

    async fn list_running(&self) -> Result<Vec<String>, DockerError> {
        let docker = self.client("list containers")?;
        let list = docker
            .list_containers(Some(ListContainersOptions {
                all: false,
                ..Default::default()
            }))
            .await
            .map_err(|source| DockerError::Api {
                call: "list containers",
                source,
            })?;
        Ok(list.into_iter().filter_map(|c| c.id).collect())
    }

    async fn inspect(&self, id: &str) -> Result<Option<ContainerInspectResponse>, DockerError> {
        let docker = self.client("inspect container")?;
        match docker.inspect_container(id, None).await {
            Ok(c) => Ok(Some(c)),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(None),
            Err(source) => Err(DockerError::Api {
                call: "inspect container",
                source,
            }),
        }
    }

    async fn inspect_image(&self, id: &str) -> Result<Option<ImageInspect>, DockerError> {
        let docker = self.client("inspect image")?;
        match docker.inspect_image(id).await {
            Ok(i) => Ok(Some(i)),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(None),
            Err(source) => Err(DockerError::Api {
                call: "inspect image",
                source,
            }),
        }
    }

    async fn networks(&self) -> Result<Vec<BollardNetwork>, DockerError> {
        let docker = self.client("list networks")?;
        docker
            .list_networks(None)
            .await
            .map_err(|source| DockerError::Api {
                call: "list networks",
                source,
            })
    }

    fn events(
        &self,
        since: Option<String>,
    ) -> BoxStream<'static, Result<EventMessage, DockerError>> {
        let docker = match self.client("events") {
            Ok(d) => d,
            Err(e) => return futures_util::stream::once(async move { Err(e) }).boxed(),
        };
        let filters = std::collections::HashMap::from([(
            "type".to_owned(),
            vec!["container".to_owned(), "network".to_owned()],
        )]);
        let options = EventsOptions {
            since: since.as_deref().map(since_param),
            until: None,
            filters: Some(filters),
        };
        docker
            .events(Some(options))
            .map(|r| r.map_err(DockerError::Stream))
            .boxed()
    }
}

/// The `since` query parameter for the daemon's clock `system_time` (RFC 3339, as `GET /info`
/// reports it). Docker 20.10 only takes unix time there (`<seconds>[.<nanoseconds>]`; an RFC 3339
/// string is answered with a 500 `strconv.ParseInt` error), newer daemons take both, so unix time
/// it is. An unparsable clock falls back to the local clock minus a second (the daemon runs on
/// this host).
pub fn since_param(system_time: &str) -> String {
    match rfc3339_to_unix(system_time) {
        Some((secs, nanos)) => format!("{secs}.{nanos:09}"),
        None => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            format!("{}", now.as_secs().saturating_sub(1))
        }
    }
}

/// `2024-05-07T20:55:12.123456789Z` or `…+02:00` as (unix seconds, nanoseconds).
fn rfc3339_to_unix(s: &str) -> Option<(i64, u32)> {
    let num = |t: &str| -> Option<i64> {
        (!t.is_empty() && t.bytes().all(|b| b.is_ascii_digit())).then(|| t.parse().ok())?
    };
    let (date, rest) = s.split_once(['T', 't', ' '])?;
    let mut d = date.splitn(3, '-');
    let (y, mo, da) = (num(d.next()?)?, num(d.next()?)?, num(d.next()?)?);
    // The offset starts at the first 'Z', '+' or '-' after the time of day.
    let off_at = rest.find(['Z', 'z', '+', '-'])?;
    let (time, offset) = rest.split_at(off_at);
    let (hms, frac) = match time.split_once('.') {
        Some((hms, frac)) => (hms, frac),
        None => (time, ""),
    };
    let mut t = hms.splitn(3, ':');
    let (h, mi, se) = (num(t.next()?)?, num(t.next()?)?, num(t.next()?)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&da) || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    let nanos = if frac.is_empty() {
        0
    } else {
        let digits: String = frac.chars().take(9).collect();
        num(&digits)? as u32 * 10u32.pow(9 - digits.len() as u32)
    };
    let offset_secs = match offset {
        "Z" | "z" => 0,
        o => {
            let sign = if o.starts_with('-') { -1 } else { 1 };
            let (oh, om) = o[1..].split_once(':')?;
            sign * (num(oh)? * 3600 + num(om)? * 60)
        }
    };
    // Days from 1970-01-01 (H. Hinnant's days_from_civil).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + da - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + h * 3600 + mi * 60 + se - offset_secs, nanos))
}

/// What one Docker event asks the watcher to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Inspect the container again and emit what changed.
    Refresh(String),
    /// A network connect or disconnect: inspect again only a container known to be running. One
    /// that is not running yet gets a start event of its own, and inspecting it now would wait
    /// for its start to finish (Docker holds the container's lock meanwhile), holding up every
    /// event behind it, other containers' starts included.
    RefreshIfRunning(String),
    /// The container stopped running.
    Down(String),
    /// Re-read the network list.
    RefreshNetworks,
}

/// Maps one Docker event to what the watcher must do; `None` for events that change nothing
/// netpol cares about.
/// When Docker says an event happened (`timeNano`, else `time`).
fn event_time(ev: &EventMessage) -> Option<std::time::SystemTime> {
    let ns = match (ev.time_nano, ev.time) {
        (Some(ns), _) if ns > 0 => u64::try_from(ns).ok()?,
        (_, Some(s)) if s > 0 => u64::try_from(s).ok()?.checked_mul(1_000_000_000)?,
        _ => return None,
    };
    std::time::UNIX_EPOCH.checked_add(Duration::from_nanos(ns))
}

pub fn classify(ev: &EventMessage) -> Option<Action> {
    let action = ev.action.as_deref()?;
    // Some actions carry a suffix ("exec_start: sh", "health_status: healthy").
    let action = action.split(':').next().unwrap_or(action).trim();
    let actor = ev.actor.as_ref();
    let actor_id = actor.and_then(|a| a.id.clone()).filter(|s| !s.is_empty());
    match ev.typ {
        Some(EventMessageTypeEnum::CONTAINER) => match action {
            "start" | "restart" | "rename" | "unpause" => actor_id.map(Action::Refresh),
            "die" | "stop" | "destroy" => actor_id.map(Action::Down),
            _ => None,
        },
        Some(EventMessageTypeEnum::NETWORK) => match action {
            "connect" | "disconnect" => actor
                .and_then(|a| a.attributes.as_ref())
                .and_then(|attrs| attrs.get("container"))
                .filter(|s| !s.is_empty())
                .map(|c| Action::RefreshIfRunning(c.clone())),
            "create" | "destroy" | "remove" | "update" => Some(Action::RefreshNetworks),
            _ => None,
        },
        _ => None,
    }
}

/// Follows Docker; see the module documentation.
pub struct DockerWatcher<A = BollardApi, V = NetlinkVeths> {
    api: Arc<A>,
    veths: V,
    config: DockerConfig,
    tx: mpsc::Sender<DockerEvent>,
    containers: BTreeMap<String, Container>,
    networks: BTreeMap<String, Network>,
    /// Image id → its `netpol.*` labels (an image id names immutable content).
    images: BTreeMap<String, BTreeMap<String, String>>,
    /// Wrap what a Docker event causes in [`DockerEvent::At`].
    event_times: bool,
    /// The time of the Docker event being applied.
    event_time: Option<std::time::SystemTime>,
}

/// Why a session ended.
enum SessionEnd {
    /// The receiver is gone: stop watching.
    Closed,
    Failed(DockerError),
}

/// Sending failed: the receiver was dropped.
struct Closed;

impl DockerWatcher {
    /// A watcher of the daemon at `config.socket`, and the receiver of its events.
    pub fn new(config: DockerConfig, capacity: usize) -> (Self, mpsc::Receiver<DockerEvent>) {
        Self::with_api(
            BollardApi::new(config.socket.clone()),
            NetlinkVeths,
            config,
            capacity,
        )
    }
}

impl<A: DockerApi, V: VethResolver> DockerWatcher<A, V> {
    pub fn with_api(
        api: A,
        veths: V,
        config: DockerConfig,
        capacity: usize,
    ) -> (Self, mpsc::Receiver<DockerEvent>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let watcher = Self {
            api: Arc::new(api),
            veths,
            config,
            tx,
            containers: BTreeMap::new(),
            networks: BTreeMap::new(),
            images: BTreeMap::new(),
            event_times: false,
            event_time: None,
        };
        (watcher, rx)
    }

    /// Sends what each Docker event causes as [`DockerEvent::At`] its time.
    pub fn with_event_times(mut self) -> Self {
        self.event_times = true;
        self
    }

    /// Watches until the receiver is dropped.
    pub async fn run(mut self) {
        let mut backoff = self.config.backoff_min;
        let mut reported_down = false;
        loop {
            let mut snapshot_sent = false;
            let started = tokio::time::Instant::now();
            match self.session(&mut snapshot_sent).await {
                SessionEnd::Closed => return,
                SessionEnd::Failed(e) => {
                    self.containers.clear();
                    self.networks.clear();
                    if snapshot_sent {
                        // A new outage. Back off from the start only after a session that
                        // lasted: a stream that breaks right after each snapshot must not
                        // turn into a resync storm.
                        if started.elapsed() >= STABLE_SESSION {
                            backoff = self.config.backoff_min;
                        }
                        reported_down = false;
                    }
                    if !reported_down {
                        tracing::warn!(error = %e, "Docker unreachable; retrying");
                        if self
                            .tx
                            .send(DockerEvent::Disconnected(e.to_string()))
                            .await
                            .is_err()
                        {
                            return;
                        }
                        reported_down = true;
                    } else {
                        tracing::debug!(error = %e, ?backoff, "Docker still unreachable");
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = self.tx.closed() => return,
            }
            backoff = (backoff * 2).min(self.config.backoff_max);
        }
    }

    async fn session(&mut self, snapshot_sent: &mut bool) -> SessionEnd {
        let info = match self.api.connect().await {
            Ok(i) => i,
            Err(e) => return SessionEnd::Failed(e),
        };
        // Events from the daemon's "now" on: whatever happens while the snapshot is taken is
        // replayed afterwards, and handled idempotently.
        let mut events = self.api.events(info.system_time.clone());
        match self.snapshot().await {
            Ok(Ok(())) => {}
            Ok(Err(Closed)) => return SessionEnd::Closed,
            Err(e) => return SessionEnd::Failed(e),
        }
        *snapshot_sent = true;
        tracing::info!(
            containers = self.containers.len(),
            networks = self.networks.len(),
            version = info.server_version.as_deref().unwrap_or("?"),
            "Docker connected"
        );
        loop {
            let ev = tokio::select! {
                ev = events.next() => ev,
                _ = self.tx.closed() => return SessionEnd::Closed,
            };
            let ev = match ev {
                Some(Ok(ev)) => ev,
                Some(Err(e)) => return SessionEnd::Failed(e),
                None => return SessionEnd::Failed(DockerError::StreamEnded),
            };
            let Some(action) = classify(&ev) else {
                continue;
            };
            self.event_time = event_time(&ev);
            let lag_ms = |t: Option<std::time::SystemTime>| {
                t.and_then(|t| std::time::SystemTime::now().duration_since(t).ok())
                    .map(|d| d.as_secs_f64() * 1000.0)
            };
            tracing::debug!(
                ?action,
                received_after_ms = lag_ms(self.event_time),
                "Docker event"
            );
            let applied = self.apply(action).await;
            tracing::debug!(
                sent_after_ms = lag_ms(self.event_time),
                "Docker event handled"
            );
            self.event_time = None;
            match applied {
                Ok(Ok(())) => {}
                Ok(Err(Closed)) => return SessionEnd::Closed,
                Err(e) => return SessionEnd::Failed(e),
            }
        }
    }

    async fn snapshot(&mut self) -> Result<Result<(), Closed>, DockerError> {
        self.containers.clear();
        self.networks = self.load_networks().await?;
        for id in self.api.list_running().await? {
            if let Some(c) = self.load_container(&id).await? {
                if c.running {
                    self.containers.insert(c.id.clone(), c);
                }
            }
        }
        let ev = DockerEvent::Snapshot {
            containers: self.containers.values().cloned().collect(),
            networks: self.networks.values().cloned().collect(),
        };
        Ok(self.send(ev).await)
    }

    async fn apply(&mut self, action: Action) -> Result<Result<(), Closed>, DockerError> {
        match action {
            Action::RefreshNetworks => {
                let networks = self.load_networks().await?;
                if networks == self.networks {
                    return Ok(Ok(()));
                }
                self.networks = networks;
                Ok(self
                    .send(DockerEvent::NetworksChanged(
                        self.networks.values().cloned().collect(),
                    ))
                    .await)
            }
            Action::Down(id) => Ok(self.down(&id).await),
            Action::RefreshIfRunning(id) => {
                if self.known(&id).is_none() {
                    return Ok(Ok(()));
                }
                Box::pin(self.apply(Action::Refresh(id))).await
            }
            Action::Refresh(id) => match self.load_container(&id).await? {
                Some(c) if c.running => {
                    if self.containers.get(&c.id) == Some(&c) {
                        return Ok(Ok(()));
                    }
                    self.containers.insert(c.id.clone(), c.clone());
                    Ok(self.send(DockerEvent::ContainerUp(c)).await)
                }
                Some(c) => Ok(self.down(&c.id).await),
                None => Ok(self.down(&id).await),
            },
        }
    }

    /// The id of the running container `id` names (see [`find_known`]).
    fn known(&self, id: &str) -> Option<String> {
        find_known(
            self.containers
                .values()
                .map(|c| (c.id.as_str(), c.name.as_str())),
            id,
        )
        .map(str::to_owned)
    }

    async fn down(&mut self, id: &str) -> Result<(), Closed> {
        match self.known(id).and_then(|k| self.containers.remove(&k)) {
            Some(c) => self.send(DockerEvent::ContainerDown { id: c.id }).await,
            None => Ok(()),
        }
    }

    async fn send(&self, ev: DockerEvent) -> Result<(), Closed> {
        let ev = match self.event_time {
            Some(time) if self.event_times => DockerEvent::At {
                time,
                event: Box::new(ev),
            },
            _ => ev,
        };
        self.tx.send(ev).await.map_err(|_| Closed)
    }

    async fn load_networks(&self) -> Result<BTreeMap<String, Network>, DockerError> {
        let list = self.api.networks().await?;
        Ok(list
            .iter()
            .filter_map(network_from_docker)
            .map(|n| (n.id.clone(), n))
            .collect())
    }

    /// Inspects a container and looks up its host veths. `None` if it no longer exists.
    async fn load_container(&mut self, id: &str) -> Result<Option<Container>, DockerError> {
        let mut attempt = 0;
        let t0 = std::time::Instant::now();
        loop {
            let t_inspect = std::time::Instant::now();
            let Some(raw) = self.api.inspect(id).await? else {
                return Ok(None);
            };
            if references_unknown_network(&raw, &self.networks) {
                self.networks = self.load_networks().await?;
            }
            let Some(bare) = container_from_inspect(&raw, &self.networks, &VethLookup::new())
            else {
                return Ok(None);
            };
            let pid = raw.state.as_ref().and_then(|s| s.pid).filter(|p| *p > 0);
            let inspect_ms = t_inspect.elapsed().as_secs_f64() * 1000.0;
            let t_veth = std::time::Instant::now();
            let lookup = self.lookup_veths(&bare, pid).await;
            let veth_ms = t_veth.elapsed().as_secs_f64() * 1000.0;
            let Some(mut c) = container_from_inspect(&raw, &self.networks, &lookup) else {
                return Ok(None);
            };
            c.image_netpol_labels = self.image_netpol_labels(&raw, &c).await;
            let missing = c.running
                && c.networks.iter().any(|a| {
                    matches!(
                        a.enforceable,
                        Err(super::NotEnforceable::VethNotFound { .. })
                    )
                });
            attempt += 1;
            tracing::debug!(
                container = %c.name,
                attempt,
                inspect_ms,
                veth_ms,
                total_ms = t0.elapsed().as_secs_f64() * 1000.0,
                missing,
                "container inspected"
            );
            if !missing || attempt > VETH_RETRIES {
                if missing {
                    tracing::warn!(container = %c.name, "host veth not found");
                }
                return Ok(Some(c));
            }
            tokio::time::sleep(VETH_RETRY_DELAY).await;
        }
    }

    /// The `netpol.*` labels of `c`'s image (cached by image id), or why they cannot be known.
    /// Only looked up for a container with `netpol.*` labels.
    async fn image_netpol_labels(
        &mut self,
        raw: &ContainerInspectResponse,
        c: &Container,
    ) -> Result<BTreeMap<String, String>, String> {
        if netpol_labels(&c.labels).is_empty() {
            return Ok(BTreeMap::new());
        }
        let Some(id) = image_id(raw) else {
            return Err("Docker reports no image for the container".to_owned());
        };
        if let Some(labels) = self.images.get(id) {
            return Ok(labels.clone());
        }
        match self.api.inspect_image(id).await {
            Ok(Some(image)) => {
                let labels: BTreeMap<String, String> = image
                    .config
                    .and_then(|cfg| cfg.labels)
                    .unwrap_or_default()
                    .into_iter()
                    .collect();
                let labels = netpol_labels(&labels);
                if self.images.len() >= IMAGE_CACHE {
                    self.images.clear();
                }
                self.images.insert(id.to_owned(), labels.clone());
                Ok(labels)
            }
            Ok(None) => Err(format!("image {id} not found")),
            Err(e) => {
                tracing::warn!(container = %c.name, image = id, error = %e, "inspecting the image");
                Err(e.to_string())
            }
        }
    }

    /// `pid`: the container's main process, whose `/proc/<pid>/ns/net` stands in for the sandbox
    /// path when that path is not visible here (the agent in a sidecar container without
    /// Docker's netns directory mounted; it runs in the host's pid namespace).
    async fn lookup_veths(&self, c: &Container, pid: Option<i64>) -> VethLookup {
        let wanted: Vec<WantedInterface> = c
            .networks
            .iter()
            .filter(|a| a.driver.as_deref() == Some("bridge"))
            .map(|a| WantedInterface {
                network_id: a.network_id.clone(),
                mac: a.mac,
                addrs: a.addresses().collect(),
            })
            .collect();
        if !c.running
            || wanted.is_empty()
            || !matches!(
                c.network_mode,
                NetworkMode::Default | NetworkMode::Network(_)
            )
        {
            return VethLookup::new();
        }
        let fail_all = |why: String| -> VethLookup {
            wanted
                .iter()
                .map(|w| (w.network_id.clone(), Err(why.clone())))
                .collect()
        };
        let proc_ns = pid.map(|p| PathBuf::from(format!("/proc/{p}/ns/net")));
        let netns = match (c.sandbox_key.clone(), proc_ns) {
            (Some(k), Some(p)) if !k.exists() => p,
            (Some(k), _) => k,
            (None, Some(p)) => p,
            (None, None) => {
                return fail_all("container has no network namespace (SandboxKey)".to_owned())
            }
        };
        match self.veths.resolve(netns.clone(), wanted.clone()).await {
            Ok(found) => found,
            Err(e) => {
                tracing::warn!(container = %c.name, netns = %netns.display(), error = %e, "veth discovery failed");
                fail_all(e.to_string())
            }
        }
    }
}

/// Of the running containers `known` (id, name), the id that `id` names. Docker's events name
/// a container by its full id (64 hex digits): such an `id` is that container or none, even
/// when another is named with it (any 64 hex digits are a valid name). The die of one must
/// never take the other down, neither while the dead one is known nor after (its stop,
/// destroy and network disconnects follow its die). Anything else is an id prefix of 12 or
/// more digits that starts one id alone, else a name.
pub(super) fn find_known<'a>(
    known: impl Iterator<Item = (&'a str, &'a str)> + Clone,
    id: &str,
) -> Option<&'a str> {
    let ids = || known.clone().map(|(i, _)| i);
    if let Some(full) = ids().find(|i| *i == id) {
        return Some(full);
    }
    if id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut prefixed = ids().filter(|i| id.len() >= 12 && i.starts_with(id));
    match (prefixed.next(), prefixed.next()) {
        (Some(one), None) => Some(one),
        _ => known.clone().find(|(_, n)| *n == id).map(|(i, _)| i),
    }
}

fn references_unknown_network(
    raw: &ContainerInspectResponse,
    networks: &BTreeMap<String, Network>,
) -> bool {
    let known: BTreeSet<&str> = networks.keys().map(String::as_str).collect();
    raw.network_settings
        .as_ref()
        .and_then(|s| s.networks.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|(_, ep)| ep.network_id.as_deref())
        .any(|id| !id.is_empty() && !known.contains(id))
}

/// Compile-time check: the production watcher can be `tokio::spawn`ed.
#[allow(dead_code)]
fn assert_run_is_send(w: DockerWatcher) -> impl Send {
    w.run()
}
