//! `netpol-agent run`: the daemon. It adopts (or loads) the datapath, restores identities and
//! policies from disk, follows Docker, serves the control socket and the monitor, and keeps the
//! maps reconciled with the desired state.
//!
//! Until Docker has answered once, the maps are left exactly as they are (after a restart they
//! hold the previous agent's state, which keeps enforcing); the first snapshot then reconciles.
//! Stopping the agent never detaches anything: pinned programs keep enforcing without it.

pub mod api;
pub mod flows;
pub mod heap;
pub mod masq;
pub mod metrics_server;
mod monitor;
pub mod monitor_filter;
pub mod nat6;
mod server;
pub mod state;

use std::{path::PathBuf, sync::Arc, time::Duration};

use clap::Args;
use tokio::sync::Mutex;
use tracing::{error, info, warn};

use crate::{
    datapath::{
        kernel::{AttachMode, KernelDatapath},
        Datapath, MapSizes,
    },
    docker::{DockerConfig, DockerWatcher},
    identity::LabelFilter,
    store::Store,
};

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Where maps and links are pinned (bpffs).
    #[arg(long, default_value = netpol_common::PIN_DIR)]
    pub pin_dir: PathBuf,
    /// Durable state (identities, imported policies).
    #[arg(long, default_value = Store::DEFAULT_DIR)]
    pub state_dir: PathBuf,
    /// Policy files loaded at start and re-read on change.
    #[arg(long, default_value = "/etc/netpol/policies.d")]
    pub policy_dir: PathBuf,
    /// Docker's socket (default: DOCKER_HOST or /var/run/docker.sock).
    #[arg(long)]
    pub docker_socket: Option<PathBuf>,
    /// Extra label keys to ignore when deriving identities (`*` at the end matches a prefix).
    #[arg(long = "ignore-label")]
    pub ignore_labels: Vec<String>,
    // Map sizes (`max_entries`), one flag per map (README, Command line). A map found pinned keeps
    // its size (warned): see `MapSizes::adopt_pinned`.
    /// `max_entries` of POLICY (compiled policy entries).
    #[arg(long, default_value_t = MapSizes::default().policy)]
    pub policy_entries: u32,
    /// `max_entries` of ENDPOINTS (container interfaces).
    #[arg(long, default_value_t = MapSizes::default().endpoints)]
    pub endpoint_entries: u32,
    /// `max_entries` of IPCACHE4 (and of IPCACHE6 unless --ipcache6-entries).
    #[arg(long, default_value_t = MapSizes::default().ipcache4)]
    pub ipcache_entries: u32,
    /// `max_entries` of IPCACHE6 [default: --ipcache-entries].
    #[arg(long)]
    pub ipcache6_entries: Option<u32>,
    /// `max_entries` of CT4, the established IPv4 flows.
    #[arg(long, default_value_t = MapSizes::default().ct4)]
    pub ct_entries: u32,
    /// `max_entries` of CT6 [default: a quarter of --ct-entries, at least 1024].
    #[arg(long)]
    pub ct6_entries: Option<u32>,
    /// `max_entries` of CT4_NEW, IPv4 flows not established yet [default: a quarter of
    /// --ct-entries, at least 1024].
    #[arg(long)]
    pub ct_new_entries: Option<u32>,
    /// `max_entries` of CT6_NEW [default: a quarter of CT6's, at least 1024].
    #[arg(long)]
    pub ct6_new_entries: Option<u32>,
    /// `max_entries` of FRAG4 (and of FRAG6 unless --frag6-entries): fragmented datagrams in flight.
    #[arg(long, default_value_t = MapSizes::default().frag4)]
    pub frag_entries: u32,
    /// `max_entries` of FRAG6 [default: --frag-entries].
    #[arg(long)]
    pub frag6_entries: Option<u32>,
    /// Size of the EVENTS ring buffer (drops and flows for `monitor`), in bytes: a power of two,
    /// at least 4096.
    #[arg(long, default_value_t = MapSizes::default().events, value_parser = parse_ring_bytes)]
    pub events_bytes: u32,
    /// `max_entries` of SNAT6, the masquerade's flows (two entries each).
    #[arg(long, default_value_t = MapSizes::default().snat6)]
    pub snat6_entries: u32,
    /// `max_entries` of MASQ6_FRAG [default: a quarter of --snat6-entries, at least 1024].
    #[arg(long)]
    pub masq6_frag_entries: Option<u32>,
    /// IPv6 masquerade of Docker's IPv6 networks on the uplink.
    #[arg(long, value_enum, default_value_t)]
    pub masq6: masq::Masq6Mode,
    /// The uplink (default: the interface of the default IPv6 route).
    #[arg(long)]
    pub masq6_uplink: Option<String>,
    /// Prefixes to masquerade, replacing the automatic choice (repeatable).
    #[arg(long = "masq6-prefix")]
    pub masq6_prefixes: Vec<crate::datapath::Cidr>,
    /// Source ports / echo identifiers handed out on collision.
    #[arg(long, default_value = "61000-65535", value_parser = masq::parse_ports)]
    pub masq6_ports: std::ops::RangeInclusive<u16>,
    /// How often the policy directory is checked for changes, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub policy_poll_ms: u64,
    /// Record every new flow for `policy suggest` (flow events stay on; see README "Suggesting
    /// policies"). Audited flows are recorded without it.
    #[arg(long)]
    pub record_flows: bool,
    /// Audit mode for every container: policy is computed and reported as usual, but nothing
    /// is dropped for policy reasons (each would-be drop is an AUDIT event, counted); spoofed,
    /// malformed and other non-policy drops stay on (README "Audit mode").
    #[arg(long)]
    pub audit: bool,
    /// How programs are attached to veths: `tcx` links, `netlink` (clsact filters), or `auto`
    /// (TCX if a probe attach succeeds).
    #[arg(long, value_enum, default_value_t)]
    pub attach: AttachArg,
    /// Serve Prometheus metrics at http://ADDR/metrics: a loopback `IP:PORT`
    /// (`127.0.0.1:9962`, `[::1]:9962`) or `unix:PATH`. Off by default.
    #[arg(long, value_name = "ADDR", value_parser = metrics_server::MetricsAddr::parse)]
    pub metrics: Option<metrics_server::MetricsAddr>,
    /// Drop, audit and flow events per second and CPU that the datapath hands to `monitor`
    /// and the flow recorder at most (a burst of as many, then that rate); the rest are counted
    /// (`status`: events_suppressed), and the drop and audit counters count every one.
    #[arg(long, value_name = "N", default_value_t = netpol_common::Config::EVENT_RATE_DEFAULT, value_parser = parse_event_rate)]
    pub event_rate: u32,
}

/// `run --attach`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AttachArg {
    #[default]
    Auto,
    Tcx,
    Netlink,
}

impl AttachArg {
    pub fn mode(self) -> Option<AttachMode> {
        match self {
            AttachArg::Auto => None,
            AttachArg::Tcx => Some(AttachMode::Tcx),
            AttachArg::Netlink => Some(AttachMode::Netlink),
        }
    }
}

impl RunArgs {
    pub fn sizes(&self) -> MapSizes {
        let quarter = |n: u32| (n / 4).max(1024);
        let ct6 = self.ct6_entries.unwrap_or(quarter(self.ct_entries));
        MapSizes {
            endpoints: self.endpoint_entries,
            ipcache4: self.ipcache_entries,
            ipcache6: self.ipcache6_entries.unwrap_or(self.ipcache_entries),
            policy: self.policy_entries,
            ct4: self.ct_entries,
            ct6,
            ct4_new: self.ct_new_entries.unwrap_or(quarter(self.ct_entries)),
            ct6_new: self.ct6_new_entries.unwrap_or(quarter(ct6)),
            frag4: self.frag_entries,
            frag6: self.frag6_entries.unwrap_or(self.frag_entries),
            events: self.events_bytes,
            snat6: self.snat6_entries,
            masq6_frag: self
                .masq6_frag_entries
                .unwrap_or(quarter(self.snat6_entries)),
        }
    }
}

/// The highest `--event-rate`: one event per microsecond and CPU (the token bucket's interval
/// is whole nanoseconds; far above what a ring buffer reader keeps up with).
pub const EVENT_RATE_MAX: u32 = 1_000_000;

/// `--event-rate`: events per second and CPU, 1 to [`EVENT_RATE_MAX`] (0 would mean the default
/// to the datapath: refused rather than silently read as 1000).
fn parse_event_rate(s: &str) -> Result<u32, String> {
    let n: u64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number of events per second and CPU"))?;
    if n == 0 || n > u64::from(EVENT_RATE_MAX) {
        return Err(format!(
            "{n} events per second and CPU is out of range: 1 to {EVENT_RATE_MAX}"
        ));
    }
    Ok(n as u32)
}

/// `--events-bytes`: the kernel takes only a power of two that is a multiple of the page size.
fn parse_ring_bytes(s: &str) -> Result<u32, String> {
    let n: u32 = s.parse().map_err(|e| format!("{e}"))?;
    if n < 4096 || !n.is_power_of_two() {
        return Err(format!("{n} is not a power of two of at least 4096"));
    }
    Ok(n)
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("NETPOL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter)
        .try_init();
}

/// Tells systemd (`Type=notify`) that the datapath is loaded and the socket answers, so that
/// `docker.service`, ordered after us, starts containers only once enforcement is in place.
fn notify_ready() {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sock = match std::os::unix::net::UnixDatagram::unbound() {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "sd_notify");
            return;
        }
    };
    let bytes = path.as_encoded_bytes();
    let result = if let Some(abstract_name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(abstract_name)
            .and_then(|addr| sock.send_to_addr(b"READY=1", &addr))
    } else {
        sock.send_to(b"READY=1", std::path::Path::new(&path))
    };
    if let Err(e) = result {
        warn!(error = %e, "sd_notify");
    }
}

pub fn run(args: RunArgs, socket: PathBuf) -> anyhow::Result<()> {
    // One malloc arena for all threads (glibc gives each new thread an arena of its own, up to
    // 8 per core: the runtime's workers and the blocking tasks' threads would each keep theirs
    // resident). The agent's threads rarely allocate at once; its memory is what counts on a
    // small host. Before any thread starts.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets a tunable of the allocator; no other thread exists yet.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
    init_logging();
    // Two workers: Docker's events are read and inspected (and veths looked up) while the agent
    // reconciles the previous ones, instead of after. The second costs about 0.2 MB of RSS at
    // 500 containers (19.7 vs 19.9 MB idle, its stack and its share of the heap).
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run_async(args, socket))
}

async fn run_async(args: RunArgs, socket: PathBuf) -> anyhow::Result<()> {
    // Checked before anything is touched: a bad pattern must not start a half-configured agent.
    let filter = LabelFilter::checked(args.ignore_labels.iter())?;
    let mut dp = KernelDatapath::open_with(&args.pin_dir, args.sizes(), args.attach.mode())?;
    // Written at every start: a restart without the flag goes back to the default.
    dp.set_event_rate(args.event_rate)?;
    let events = monitor::take_ring(&mut dp);
    let store = Store::new(&args.state_dir);
    let masq = masq::Masq::new(masq::MasqConfig {
        mode: args.masq6,
        uplink: args.masq6_uplink.clone(),
        prefixes: args.masq6_prefixes.clone(),
        ports: args.masq6_ports.clone(),
        pin_dir: args.pin_dir.clone(),
        snat6_entries: args.sizes().snat6,
        frag_entries: args.sizes().masq6_frag,
        attach: Some(dp.mode()),
    });
    let mut agent = state::Agent::new(Box::new(dp), store, filter, args.policy_dir.clone())?;
    let metrics = crate::metrics::Metrics::default();
    agent.set_metrics(metrics.clone());
    agent.set_masq(masq);
    agent.set_audit_all(args.audit);
    agent.set_background_saves(true);
    if args.audit {
        warn!("audit mode (--audit): policy drops are reported, not enforced, on every container");
    }
    agent.reload_policy_dir();
    let agent = Arc::new(Mutex::new(agent));

    let monitor = monitor::Monitor::new(agent.clone());
    if args.record_flows {
        monitor.record_flows().await;
    }
    match events {
        Ok(ring) => {
            monitor.spawn_reader(ring, crate::datapath::stats::PinnedCt::new(&args.pin_dir))
        }
        Err(e) => warn!(error = %e, "monitor unavailable"),
    }

    let listener = server::bind(&socket)?;
    tokio::spawn(server::serve(listener, agent.clone(), monitor.clone()));
    metrics_server::start(
        args.metrics.as_ref(),
        metrics_server::Scraper {
            agent: agent.clone(),
            stats: Arc::new(crate::datapath::stats::PinnedStats::new(&args.pin_dir)),
            metrics,
        },
    )
    .await?;

    // The host's link events: a new container's veth is policed as soon as it joins a Docker
    // bridge, before Docker reports the container.
    let (link_tx, mut link_rx) = tokio::sync::mpsc::channel(1024);
    tokio::spawn(crate::docker::watch_links(link_tx));
    let agent_links = agent.clone();
    tokio::spawn(async move {
        while let Some(ev) = link_rx.recv().await {
            let mut a = agent_links.lock().await;
            a.on_link(ev);
            // Whatever else queued meanwhile, under the same lock.
            while let Ok(ev) = link_rx.try_recv() {
                a.on_link(ev);
            }
            heap::after_burst();
        }
    });

    // Docker.
    let cfg = DockerConfig {
        socket: args.docker_socket.clone(),
        ..DockerConfig::default()
    };
    let (watcher, mut rx) = DockerWatcher::new(cfg, 256);
    tokio::spawn(watcher.with_event_times().run());

    let agent_docker = agent.clone();
    tokio::spawn(async move {
        while let Some(ev) = rx.recv().await {
            let mut a = agent_docker.lock().await;
            // Whatever else queued meanwhile (a burst of starts), in one reconcile.
            let mut batch = vec![ev];
            while let Ok(ev) = rx.try_recv() {
                batch.push(ev);
            }
            a.on_docker_batch(batch);
            heap::after_burst();
        }
    });

    // Policy directory: re-read on change.
    let agent_files = agent.clone();
    let poll = Duration::from_millis(args.policy_poll_ms.max(100));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(poll);
        loop {
            tick.tick().await;
            let mut a = agent_files.lock().await;
            if a.policy_dir_changed() {
                a.reload_policy_dir();
                a.sync_logged("policy directory changed");
                heap::after_burst();
            }
        }
    });

    // Freed memory back to the system after each burst (see heap::trim_after_bursts).
    tokio::spawn(heap::trim_after_bursts(
        Duration::from_secs(1),
        Duration::from_secs(10),
    ));

    info!(socket = %socket.display(), "netpol-agent running");
    notify_ready();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    info!("stopping; pinned programs keep enforcing");
    let _ = std::fs::remove_file(&socket);
    if let Err(e) = agent.lock().await.save() {
        error!(error = %e, "saving state");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use crate::{
        cli::{Cli, Command},
        datapath::MapSizes,
    };

    fn sizes(args: &[&str]) -> Result<MapSizes, clap::Error> {
        let cli = Cli::try_parse_from(["netpol-agent", "run"].iter().chain(args))?;
        match cli.command {
            Command::Run(a) => Ok(a.sizes()),
            other => panic!("parsed as {other:?}"),
        }
    }

    fn event_rate(args: &[&str]) -> Result<u32, String> {
        let cli = Cli::try_parse_from(["netpol-agent", "run"].iter().chain(args))
            .map_err(|e| e.to_string())?;
        match cli.command {
            Command::Run(a) => Ok(a.event_rate),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn event_rate_defaults_to_1000_and_refuses_what_the_datapath_cannot_take() {
        assert_eq!(event_rate(&[]), Ok(1000));
        assert_eq!(event_rate(&["--event-rate", "50"]), Ok(50));
        assert_eq!(event_rate(&["--event-rate", "1000000"]), Ok(1_000_000));
        for (bad, why) in [
            (
                "0",
                "0 events per second and CPU is out of range: 1 to 1000000",
            ),
            ("1000001", "out of range: 1 to 1000000"),
            ("-5", "is not a number of events per second and CPU"),
            ("fast", "\"fast\" is not a number"),
        ] {
            let e = event_rate(&[&format!("--event-rate={bad}")]).expect_err(bad);
            assert!(e.contains("--event-rate") && e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn map_size_flags_default_to_the_defaults_and_derive_the_rest() {
        assert_eq!(sizes(&[]).unwrap(), MapSizes::default());
        let s = sizes(&["--ct-entries", "8192", "--ipcache-entries", "512"]).unwrap();
        assert_eq!(
            (s.ct4, s.ct6, s.ct4_new, s.ct6_new),
            (8192, 2048, 2048, 1024)
        );
        assert_eq!((s.ipcache4, s.ipcache6), (512, 512));
        let s = sizes(&[
            "--ct6-entries",
            "40000",
            "--ct-new-entries",
            "3000",
            "--ipcache6-entries",
            "64",
            "--frag6-entries",
            "99",
            "--events-bytes",
            "65536",
            "--snat6-entries",
            "8000",
            "--masq6-frag-entries",
            "50",
            "--policy-entries",
            "10",
            "--endpoint-entries",
            "11",
        ])
        .unwrap();
        assert_eq!((s.ct6, s.ct6_new, s.ct4_new), (40000, 10000, 3000));
        assert_eq!((s.ipcache6, s.frag4, s.frag6), (64, 4096, 99));
        assert_eq!((s.events, s.snat6, s.masq6_frag), (65536, 8000, 50));
        assert_eq!((s.policy, s.endpoints), (10, 11));
    }

    #[test]
    fn the_ring_buffer_size_must_be_a_power_of_two_of_a_page_or_more() {
        assert!(sizes(&["--events-bytes", "100000"]).is_err());
        assert!(sizes(&["--events-bytes", "2048"]).is_err());
        assert_eq!(sizes(&["--events-bytes", "4096"]).unwrap().events, 4096);
    }
}
