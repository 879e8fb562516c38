//! Namespace tier: `netpol-agent teardown` stops enforcing. With the programs loaded and attached
//! as an agent leaves them (pinned TCX links on one container's veth, the clsact fallback's
//! filters on another's, each under its own pin directory), a denied connection is dropped;
//! after `teardown` (the real binary, in the host namespace) it connects as without netpol, the
//! programs are gone from the interfaces and nothing is left under the pin directory. It
//! refuses while an agent answers on the control socket, and changes nothing then.

use std::{
    net::SocketAddr,
    os::unix::net::UnixListener,
    path::Path,
    process::{Command, Output},
    time::Duration,
};

use aya::programs::{SchedClassifier, TcAttachType};
use netpol_common::{identity, proto};
use netpol_tests::{
    agent::agent_binary,
    netns::{
        tcp_connect, unique_tag, Connect, DatapathPlan, EchoServer, Family, PinDir, PlanPolicy,
        Topology,
    },
    require_root,
};

const APP1: u32 = 256;
const DB: u32 = 258;
const PG: u16 = 5432;
const OTHER: u16 = 5433;
const DENIED_TIMEOUT: Duration = Duration::from_millis(800);
const ALLOWED_TIMEOUT: Duration = Duration::from_secs(5);

/// `db` accepts only TCP 5432 from app1, attached with `mode` (`tcx` or `netlink`).
fn plan(t: &Topology, db: &str, mode: &str) -> DatapathPlan {
    let mut p = DatapathPlan::default();
    p.container(t.container("app1"), APP1, false, false);
    // Programs only on db's veth: app1 is not enforced.
    p.attach.clear();
    p.container(t.container(db), DB, true, false);
    p.ipcache.push((t.gateway(Family::V4), 32, identity::HOST));
    p.policy
        .push(PlanPolicy::allow_in(DB, APP1, proto::TCP, PG, 1));
    p.attach_mode = Some(mode.to_owned());
    p
}

fn connect(t: &Topology, db: &str, port: u16, timeout: Duration) -> Connect {
    let to = SocketAddr::new(t.container(db).addr(Family::V4), port);
    tcp_connect(&t.container("app1").ns, to, timeout)
}

/// `netpol-agent teardown` in the host namespace (nsenter: only the network namespace, so the
/// host's bpffs stays visible), with no settings file and the given control socket.
fn teardown(t: &Topology, pins: &PinDir, socket: &Path) -> Output {
    Command::new("nsenter")
        .arg(format!("--net={}", t.host.path().display()))
        .arg(agent_binary())
        .args(["--config", "/dev/null", "--socket"])
        .arg(socket)
        .arg("teardown")
        .arg("--pin-dir")
        .arg(pins.path())
        .output()
        .expect("spawn nsenter netpol-agent teardown")
}

/// Programs on `ifname` in the host namespace: the TCX chains of both directions and the
/// clsact filters (`tc filter show`), by name.
fn programs_on(t: &Topology, ifname: &str) -> Vec<String> {
    let name = ifname.to_owned();
    let mut out: Vec<String> = t.host.run_in(move || {
        [TcAttachType::Ingress, TcAttachType::Egress]
            .into_iter()
            .flat_map(|ty| {
                let (_, progs) = SchedClassifier::query_tcx(&name, ty).expect("query TCX chain");
                progs
                    .iter()
                    .map(|p| format!("tcx:{}", p.name_as_str().unwrap_or("?")))
                    .collect::<Vec<_>>()
            })
            .collect()
    });
    for dir in ["ingress", "egress"] {
        let o = t.host.run(&["tc", "filter", "show", "dev", ifname, dir]);
        out.extend(
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter(|l| l.contains("bpf"))
                .map(|l| format!("tc:{l}")),
        );
    }
    out
}

#[test]
fn teardown_detaches_everything_and_containers_are_reachable_again() {
    if !require_root("teardown_detaches_everything_and_containers_are_reachable_again") {
        return;
    }
    let t = Topology::new(&unique_tag("tdn"), &["app1", "db", "db2"]);
    let _servers = ["db", "db2"].map(|db| EchoServer::start(&t.container(db).ns, OTHER));
    let _pg = ["db", "db2"].map(|db| EchoServer::start(&t.container(db).ns, PG));
    let loader = Path::new(env!("CARGO_BIN_EXE_netpol-netns-loader"));
    let pins_tcx = PinDir::unique("tdn-tcx");
    let pins_tc = PinDir::unique("tdn-tc");
    let s = plan(&t, "db", "tcx").load(loader, &pins_tcx, &t);
    assert!(s.contains("mode=Tcx"), "{s}");
    let s = plan(&t, "db2", "netlink").load(loader, &pins_tc, &t);
    assert!(s.contains("mode=Netlink"), "{s}");
    for db in ["db", "db2"] {
        assert_eq!(
            connect(&t, db, PG, ALLOWED_TIMEOUT),
            Connect::Connected,
            "{db}:{PG} allowed"
        );
        assert_eq!(
            connect(&t, db, OTHER, DENIED_TIMEOUT),
            Connect::TimedOut,
            "{db}:{OTHER} denied before teardown"
        );
    }

    // An agent answering on the socket: refused, nothing touched.
    let dir = std::env::temp_dir().join(format!("{}-sock", t.tag));
    std::fs::create_dir_all(&dir).expect("mkdir");
    let sock = dir.join("agent.sock");
    let listener = UnixListener::bind(&sock).expect("bind a stand-in agent socket");
    let out = teardown(&t, &pins_tcx, &sock);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "refused: {stderr}");
    assert!(stderr.contains("an agent is running"), "{stderr}");
    assert!(pins_tcx.path().join("POLICY").exists(), "pins kept");
    assert_eq!(
        connect(&t, "db", OTHER, DENIED_TIMEOUT),
        Connect::TimedOut,
        "still enforced after a refused teardown"
    );
    drop(listener);
    let _ = std::fs::remove_dir_all(&dir);

    let none = Path::new("/nonexistent/netpol-test/agent.sock");
    for (db, pins, what) in [
        ("db", &pins_tcx, "2 TCX link(s) and 0 clsact"),
        ("db2", &pins_tc, "0 TCX link(s) and 2 clsact filter(s)"),
    ] {
        let veth = t.container(db).host_veth.clone();
        assert!(
            !programs_on(&t, &veth).is_empty(),
            "{db}: programs attached"
        );
        let out = teardown(&t, pins, none);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "teardown {db}: {}\n{stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        // One per direction, on db's veth.
        assert!(
            stdout.contains(what) && stdout.contains("on 1 interface(s)"),
            "{db}: {stdout}"
        );
        assert!(!pins.path().exists(), "{db}: pin directory removed");
        let left = programs_on(&t, &veth);
        assert!(left.is_empty(), "{db}: left on {veth}: {left:?}");
        assert_eq!(
            connect(&t, db, OTHER, ALLOWED_TIMEOUT),
            Connect::Connected,
            "{db}:{OTHER} reachable after teardown, as without netpol"
        );
        // Again: nothing to do, still success (package scripts run it unconditionally).
        let out = teardown(&t, pins, none);
        assert!(out.status.success(), "second teardown of {db}");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("nothing pinned"),
            "second teardown of {db}"
        );
    }
}
