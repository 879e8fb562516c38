//! Tier-3 test of host veth discovery: a real network namespace with a veth pair whose peer
//! stays in the host namespace, as Docker sets it up. Needs root; skips without it, except under
//! `CI=true`, where it fails.

use std::{net::IpAddr, path::PathBuf, process::Command};

use super::{discover_host_veths, netlink::NamespaceView, MacAddr, WantedInterface};

/// Same rule as `netpol_tests::require_root`, which this crate cannot depend on.
fn require_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
        panic!("{test}: needs root, and CI=true does not allow skipping a privileged tier");
    }
    eprintln!("SKIPPED {test}: needs root (run the test suite as root)");
    false
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A namespace `ns` holding `inner` (the "container" end), with `host` as the host end of the
/// pair. Dropping it deletes both, even when the test failed.
struct VethNs {
    ns: String,
    host: String,
}

impl VethNs {
    fn create(tag: &str) -> Self {
        let pid = std::process::id() % 100_000;
        let guard = VethNs {
            ns: format!("npd-{tag}-{pid}"),
            host: format!("npd{tag}{pid}h"),
        };
        let inner = format!("npd{tag}{pid}c");
        ip(&["netns", "add", &guard.ns]);
        ip(&[
            "link",
            "add",
            &guard.host,
            "type",
            "veth",
            "peer",
            "name",
            &inner,
        ]);
        ip(&["link", "set", &inner, "netns", &guard.ns]);
        ip(&["-n", &guard.ns, "link", "set", &inner, "name", "eth0"]);
        ip(&[
            "-n",
            &guard.ns,
            "link",
            "set",
            "eth0",
            "address",
            "02:42:0a:d5:00:02",
        ]);
        ip(&[
            "-n",
            &guard.ns,
            "addr",
            "add",
            "10.213.0.2/24",
            "dev",
            "eth0",
        ]);
        ip(&["-n", &guard.ns, "link", "set", "eth0", "up"]);
        ip(&["link", "set", &guard.host, "up"]);
        guard
    }

    fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.ns))
    }
}

impl Drop for VethNs {
    fn drop(&mut self) {
        // Deleting one end deletes the pair; both steps run whatever the other did.
        let _ = Command::new("ip")
            .args(["link", "del", &self.host])
            .output();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
    }
}

fn thread_netns() -> PathBuf {
    std::fs::read_link("/proc/thread-self/ns/net").expect("read own netns link")
}

#[test]
fn discovers_the_host_end_of_a_containers_veth() {
    if !require_root("discovers_the_host_end_of_a_containers_veth") {
        return;
    }
    let before = thread_netns();
    let env = VethNs::create("v");
    let host_ifindex = NamespaceView::dump()
        .expect("dump host links")
        .links
        .into_iter()
        .find(|l| l.name == env.host)
        .expect("host end in the host namespace")
        .ifindex;

    let addr: IpAddr = "10.213.0.2".parse().unwrap();
    let wanted = vec![
        WantedInterface {
            network_id: "by-mac".into(),
            mac: Some("02:42:0a:d5:00:02".parse::<MacAddr>().unwrap()),
            addrs: vec![],
        },
        WantedInterface {
            network_id: "by-addr".into(),
            mac: None,
            addrs: vec![addr],
        },
        WantedInterface {
            network_id: "absent".into(),
            mac: Some("02:42:0a:d5:00:99".parse::<MacAddr>().unwrap()),
            addrs: vec!["10.213.0.99".parse().unwrap()],
        },
    ];
    let found = discover_host_veths(&env.path(), &wanted).expect("discovery");
    assert_eq!(found["by-mac"], Ok(host_ifindex));
    assert_eq!(found["by-addr"], Ok(host_ifindex));
    assert!(found["absent"].is_err(), "{found:?}");
    // The namespace switch happened on a thread of its own.
    assert_eq!(thread_netns(), before);
}

fn host_ifindex(name: &str) -> u32 {
    NamespaceView::dump()
        .expect("dump host links")
        .links
        .into_iter()
        .find(|l| l.name == name)
        .expect("host end in the host namespace")
        .ifindex
}

fn by_mac() -> Vec<WantedInterface> {
    vec![WantedInterface {
        network_id: "n".into(),
        mac: Some("02:42:0a:d5:00:02".parse::<MacAddr>().unwrap()),
        addrs: vec![],
    }]
}

/// Lookups run on one thread that enters a container's namespace only to make a socket there:
/// after lookups that succeed, that find nothing, and that fail entering (a file that is no
/// namespace), the thread is in the host's namespace, and it keeps answering.
#[test]
fn the_lookup_thread_is_back_in_the_host_namespace_after_every_lookup() {
    if !require_root("the_lookup_thread_is_back_in_the_host_namespace_after_every_lookup") {
        return;
    }
    let host = thread_netns();
    let env = VethNs::create("t");
    let veth = host_ifindex(&env.host);
    for _ in 0..3 {
        let found = discover_host_veths(&env.path(), &by_mac()).expect("discovery");
        assert_eq!(found["n"], Ok(veth));
        assert_eq!(super::veth_thread::thread_netns().expect("netns"), host);
        let not_a_netns = discover_host_veths(std::path::Path::new("/dev/null"), &by_mac());
        assert!(
            matches!(not_a_netns, Err(super::NetlinkError::EnterNetns { .. })),
            "{not_a_netns:?}"
        );
        assert_eq!(super::veth_thread::thread_netns().expect("netns"), host);
    }
}

/// A container that dies while its veth is looked up (its veth pair and namespace deleted
/// meanwhile) is either found with its own veth or not found: never given another interface;
/// and the lookup thread ends up in the host's namespace.
#[test]
fn a_container_that_dies_mid_lookup_is_found_right_or_not_at_all() {
    if !require_root("a_container_that_dies_mid_lookup_is_found_right_or_not_at_all") {
        return;
    }
    let host = thread_netns();
    let (mut found, mut missed) = (0, 0);
    for round in 0..12 {
        let env = VethNs::create("d");
        let veth = host_ifindex(&env.host);
        let (path, host_end, ns) = (env.path(), env.host.clone(), env.ns.clone());
        let killer = std::thread::spawn(move || {
            if round % 3 != 0 {
                std::thread::sleep(std::time::Duration::from_micros(300 * round));
            }
            let _ = Command::new("ip").args(["link", "del", &host_end]).output();
            let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        });
        match discover_host_veths(&path, &by_mac()) {
            Ok(r) => match &r["n"] {
                Ok(i) => {
                    assert_eq!(*i, veth, "round {round}: another interface");
                    found += 1;
                }
                Err(_) => missed += 1,
            },
            Err(_) => missed += 1,
        }
        killer.join().expect("killer");
        drop(env);
        assert_eq!(super::veth_thread::thread_netns().expect("netns"), host);
    }
    eprintln!("found {found}, not found {missed}");
    // And it still serves a live namespace.
    let env = VethNs::create("e");
    let found = discover_host_veths(&env.path(), &by_mac()).expect("discovery");
    assert_eq!(found["n"], Ok(host_ifindex(&env.host)));
}

/// Deletes a namespace made with `ip netns add` (and the links in it), also when the test failed.
struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// A container with `CAP_NET_ADMIN` cannot pass another container's host veth off as its own:
/// interface numbers are per namespace, so it can make a veth pair of its own whose ends have
/// the numbers of the victim's pair (its "eth0" the number of the victim's eth0, the peer the
/// number of the victim's host veth). The host veth must name the looked-up namespace as its
/// peer's, not just a peer of that number.
#[test]
fn a_container_cannot_claim_another_containers_veth_by_copying_its_numbers() {
    if !require_root("a_container_cannot_claim_another_containers_veth_by_copying_its_numbers") {
        return;
    }
    let victim = VethNs::create("x");
    let host_end = NamespaceView::dump()
        .expect("dump host links")
        .links
        .into_iter()
        .find(|l| l.name == victim.host)
        .expect("host end in the host namespace");
    let (veth, victim_eth0) = (host_end.ifindex, host_end.link.expect("peer index"));
    let attacker = Netns(format!("npd-y-{}", std::process::id() % 100_000));
    ip(&["netns", "add", &attacker.0]);
    let (eth0, peer) = (victim_eth0.to_string(), veth.to_string());
    ip(&[
        "-n",
        &attacker.0,
        "link",
        "add",
        "eth0",
        "index",
        &eth0,
        "address",
        "02:42:0a:d5:00:03",
        "type",
        "veth",
        "peer",
        "name",
        "p0",
        "index",
        &peer,
    ]);
    let wanted = vec![WantedInterface {
        network_id: "n".into(),
        mac: Some("02:42:0a:d5:00:03".parse::<MacAddr>().unwrap()),
        addrs: vec![],
    }];
    let path = PathBuf::from(format!("/run/netns/{}", attacker.0));
    let found = discover_host_veths(&path, &wanted).expect("discovery");
    assert!(
        found["n"].is_err(),
        "the attacker got the victim's veth {veth}: {found:?}"
    );
    // The victim is still found.
    let found = discover_host_veths(&victim.path(), &by_mac()).expect("discovery");
    assert_eq!(found["n"], Ok(veth));
}

#[test]
fn a_missing_namespace_is_an_error() {
    let err = discover_host_veths(std::path::Path::new("/run/netns/npd-does-not-exist"), &[]);
    assert!(
        matches!(err, Err(super::NetlinkError::OpenNetns { .. })),
        "{err:?}"
    );
}

/// Removes the test container even when an assertion failed.
struct RemoveContainer {
    socket: String,
    name: String,
}

impl Drop for RemoveContainer {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .arg("-H")
            .arg(format!("unix://{}", self.socket))
            .args(["rm", "-f", &self.name])
            .output();
    }
}

async fn next(rx: &mut tokio::sync::mpsc::Receiver<super::DockerEvent>) -> super::DockerEvent {
    tokio::time::timeout(std::time::Duration::from_secs(10), rx.recv())
        .await
        .expect("no event within 10 s")
        .expect("watcher ended")
}

/// Tier 4, against a real dockerd: set `NETPOL_TEST_DOCKER_SOCKET` (a daemon's Unix socket) and
/// `NETPOL_TEST_DOCKER_IMAGE` (a local image with `sleep`). Skipped when they are not set.
#[tokio::test]
async fn live_dockerd_snapshot_events_and_veths() {
    let (Ok(socket), Ok(image)) = (
        std::env::var("NETPOL_TEST_DOCKER_SOCKET"),
        std::env::var("NETPOL_TEST_DOCKER_IMAGE"),
    ) else {
        eprintln!(
            "SKIPPED live_dockerd_snapshot_events_and_veths: NETPOL_TEST_DOCKER_SOCKET/IMAGE unset"
        );
        return;
    };
    if !require_root("live_dockerd_snapshot_events_and_veths") {
        return;
    }
    use super::{DockerConfig, DockerEvent, DockerWatcher};

    let host_links = NamespaceView::dump().expect("dump host links").links;
    let is_host_veth = |ifindex: u32| {
        host_links
            .iter()
            .any(|l| l.ifindex == ifindex && l.kind.as_deref() == Some("veth"))
    };
    let config = DockerConfig {
        socket: Some(PathBuf::from(&socket)),
        ..DockerConfig::default()
    };
    let (watcher, mut rx) = DockerWatcher::new(config, 16);
    let task = tokio::spawn(watcher.run());
    let DockerEvent::Snapshot {
        containers,
        networks,
    } = next(&mut rx).await
    else {
        panic!("expected a Snapshot first")
    };
    eprintln!(
        "snapshot: {} containers, {} networks",
        containers.len(),
        networks.len()
    );
    for c in &containers {
        for a in &c.networks {
            eprintln!(
                "  {} {} {:?} {:?} {:?}",
                c.name, a.network_name, a.ipv4, a.host_veth, a.enforceable
            );
            if a.enforceable.is_ok() {
                assert!(a.host_veth.is_some_and(is_host_veth), "{c:?}");
            }
        }
        if c.networks.is_empty() {
            eprintln!("  {} {:?}", c.name, c.enforceable());
        }
    }

    // A new container: exactly one ContainerUp with its host veth; removed: one ContainerDown.
    let name = format!("npd-live-{}", std::process::id());
    let docker = |args: &[&str]| {
        let out = Command::new("docker")
            .arg("-H")
            .arg(format!("unix://{socket}"))
            .args(args)
            .output()
            .expect("docker cli");
        assert!(
            out.status.success(),
            "docker {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let id = docker(&["run", "-d", "--name", &name, &image, "sleep", "600"]);
    let _cleanup = RemoveContainer {
        socket: socket.clone(),
        name: name.clone(),
    };
    let up = loop {
        match next(&mut rx).await {
            DockerEvent::ContainerUp(c) if c.id == id => break c,
            other => eprintln!("(other event: {other:?})"),
        }
    };
    assert_eq!(up.networks.len(), 1, "{up:?}");
    assert_eq!(up.networks[0].enforceable, Ok(()), "{up:?}");
    let veth = up.networks[0].host_veth.expect("host veth");
    let fresh = NamespaceView::dump().expect("dump host links").links;
    assert!(
        fresh
            .iter()
            .any(|l| l.ifindex == veth && l.kind.as_deref() == Some("veth")),
        "{veth}"
    );
    let removed = docker(&["rm", "-f", &id]);
    assert_eq!(removed, id);
    loop {
        match next(&mut rx).await {
            DockerEvent::ContainerDown { id: down } if down == id => break,
            other => eprintln!("(other event: {other:?})"),
        }
    }
    task.abort();
}

/// The link watcher reports a veth joining a bridge, with the bridge as its master, and its
/// removal. Runs in a namespace of its own (a thread that entered it), so no host interface is
/// involved.
#[test]
fn link_events_report_a_veth_joining_a_bridge() {
    if !require_root("link_events_report_a_veth_joining_a_bridge") {
        return;
    }
    let ns = format!("npd-le-{}", std::process::id() % 100_000);
    ip(&["netns", "add", &ns]);
    struct DelNs(String);
    impl Drop for DelNs {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
        }
    }
    let _del = DelNs(ns.clone());
    let path = PathBuf::from(format!("/run/netns/{ns}"));
    let (tx, mut rx) = tokio::sync::mpsc::channel(64);
    let watcher = std::thread::spawn(move || {
        let f = std::fs::File::open(&path).expect("open netns");
        use std::os::fd::AsRawFd;
        // SAFETY: this thread only runs the watcher and exits with it.
        assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(super::watch_links(tx));
    });
    let recv = |rx: &mut tokio::sync::mpsc::Receiver<super::LinkEvent>| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match rx.try_recv() {
                Ok(ev) => return ev,
                Err(tokio::sync::mpsc::error::TryRecvError::Empty) => {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "no link event in 10 s"
                    );
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                Err(e) => panic!("watcher ended: {e}"),
            }
        }
    };
    let super::LinkEvent::Snapshot(first) = recv(&mut rx) else {
        panic!("expected a snapshot first");
    };
    assert!(first.iter().any(|l| l.name == "lo"), "{first:?}");
    ip(&["-n", &ns, "link", "add", "br0", "type", "bridge"]);
    ip(&[
        "-n", &ns, "link", "add", "vh0", "type", "veth", "peer", "name", "vc0",
    ]);
    ip(&["-n", &ns, "link", "set", "vh0", "master", "br0"]);
    let mut bridge = None;
    let veth = loop {
        match recv(&mut rx) {
            super::LinkEvent::Changed(l) if l.name == "br0" => {
                assert_eq!(l.kind.as_deref(), Some("bridge"));
                bridge = Some(l.ifindex);
            }
            super::LinkEvent::Changed(l) if l.name == "vh0" && l.master.is_some() => {
                assert_eq!(l.kind.as_deref(), Some("veth"));
                assert_eq!(l.master, bridge, "{l:?}");
                break l.ifindex;
            }
            _ => {}
        }
    };
    ip(&["-n", &ns, "link", "del", "vh0"]);
    while recv(&mut rx) != super::LinkEvent::Removed(veth) {}
    drop(rx);
    // The watcher notices the closed channel with the next event.
    ip(&["-n", &ns, "link", "del", "br0"]);
    watcher.join().expect("watcher thread");
}

/// The host's address and link dumps hold while links and addresses come and go (other
/// containers starting and stopping): an interrupted dump is read again, not an error.
#[test]
fn dumps_hold_while_links_come_and_go() {
    if !require_root("dumps_hold_while_links_come_and_go") {
        return;
    }
    // A thread of its own in a private namespace: the dumps (made from threads it spawns, which
    // inherit its namespace) and the churning shell see only this namespace's links.
    std::thread::spawn(|| {
        // SAFETY: unshare only changes this thread's namespace; it runs nothing else.
        assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare");
        ip(&["link", "set", "lo", "up"]);
        let mut churn = Command::new("sh")
            .args([
                "-c",
                "while :; do ip link add npchurn type veth peer name npchurn1 && ip addr add 10.9.0.1/24 dev npchurn \
                 && ip link set npchurn up; ip link del npchurn; done",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start the churn");
        let mut failures = Vec::new();
        let mut seen = 0;
        for _ in 0..500 {
            if let Err(e) = super::netlink::host_addresses() {
                failures.push(e.to_string());
            }
            match NamespaceView::dump() {
                Ok(v) => seen += usize::from(v.links.iter().any(|l| l.name == "npchurn")),
                Err(e) => failures.push(e.to_string()),
            }
        }
        assert!(seen > 0, "the churning link was never seen: the churn did not run here");
        let _ = churn.kill();
        let _ = churn.wait();
        assert!(failures.is_empty(), "{} dumps failed: {:?}", failures.len(), &failures[..failures.len().min(5)]);
    })
    .join()
    .expect("test thread");
}
