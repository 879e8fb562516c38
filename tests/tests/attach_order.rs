//! Namespace tier: where netpol's programs sit among other programs on a veth, and what an agent
//! restart does to them (issue 8, hole 7).
//!
//! - TCX: another program that returns `TC_ACT_OK` (which ends the chain) must not run before
//!   netpol's, whether it was attached before netpol's (netpol attaches first) or put first later
//!   (a restart moves netpol's first again).
//! - clsact (`attach-mode netlink`, the fallback for kernels without TCX): restarts replace netpol's
//!   filter instead of adding one, and a detach removes it.
//!
//! Policy as in `netns_policy.rs`: db accepts TCP 5432 from app1; everything else to db is denied.

use std::{net::SocketAddr, path::Path, time::Duration};

use aya::programs::{SchedClassifier, TcAttachType};
use netpol_agent::datapath::kernel::KernelDatapath;
use netpol_common::{identity, proto};
use netpol_tests::{
    netns::{
        load_pass_all, tcp_connect, tcx_link_first, unique_tag, Connect, DatapathPlan, EchoServer,
        Family, PinDir, PlanPolicy, Topology, TCX_EGRESS,
    },
    require_root,
};

const APP1: u32 = 256;
const DB: u32 = 258;
const PG: u16 = 5432;
const OTHER: u16 = 5433;
const DENIED_TIMEOUT: Duration = Duration::from_millis(800);
const ALLOWED_TIMEOUT: Duration = Duration::from_secs(5);

fn plan(t: &Topology) -> DatapathPlan {
    let mut p = DatapathPlan::default();
    p.container(t.container("app1"), APP1, false, false);
    p.container(t.container("db"), DB, true, false);
    p.ipcache.push((t.gateway(Family::V4), 32, identity::HOST));
    p.policy
        .push(PlanPolicy::allow_in(DB, APP1, proto::TCP, PG, 1));
    p
}

/// Runs the loader as its own process, which exits; returns its summary line.
fn load(pins: &PinDir, t: &Topology, plan: &DatapathPlan) -> String {
    plan.load(
        Path::new(env!("CARGO_BIN_EXE_netpol-netns-loader")),
        pins,
        t,
    )
}

fn connect(t: &Topology, port: u16, timeout: Duration) -> Connect {
    let to = SocketAddr::new(t.container("db").addr(Family::V4), port);
    tcp_connect(&t.container("app1").ns, to, timeout)
}

fn expect_enforced(t: &Topology, when: &str) {
    assert_eq!(
        connect(t, PG, ALLOWED_TIMEOUT),
        Connect::Connected,
        "{when}: app1 -> db:{PG} is allowed"
    );
    let r = connect(t, OTHER, DENIED_TIMEOUT);
    assert_eq!(
        r,
        Connect::TimedOut,
        "{when}: app1 -> db:{OTHER} must be dropped"
    );
}

/// Names of the programs in the TCX egress chain of `ifname` in the host namespace, in order.
fn tcx_chain(t: &Topology, ifname: &str) -> Vec<String> {
    let ifname = ifname.to_owned();
    t.host.run_in(move || {
        let (_, progs) =
            SchedClassifier::query_tcx(&ifname, TcAttachType::Egress).expect("query TCX chain");
        progs
            .iter()
            .map(|p| p.name_as_str().unwrap_or("?").to_owned())
            .collect()
    })
}

#[test]
fn a_foreign_tcx_program_never_runs_before_netpols() {
    if !require_root("a_foreign_tcx_program_never_runs_before_netpols") {
        return;
    }
    let t = Topology::new(&unique_tag("tcxo"), &["app1", "db"]);
    let _servers = [
        EchoServer::start(&t.container("db").ns, PG),
        EchoServer::start(&t.container("db").ns, OTHER),
    ];
    let db = t.container("db").clone();
    let pass = load_pass_all();
    let pass2 = load_pass_all();
    // Another tool was there first.
    let early = {
        let (p, i) = (pass.try_clone().unwrap(), db.ifindex);
        t.host.run_in(move || tcx_link_first(&p, i, TCX_EGRESS))
    };
    assert_eq!(
        connect(&t, OTHER, ALLOWED_TIMEOUT),
        Connect::Connected,
        "no policy yet"
    );

    let pins = PinDir::unique("tcxo");
    let summary = load(&pins, &t, &plan(&t));
    assert!(summary.contains("mode=Tcx"), "{summary}");
    assert_eq!(tcx_chain(&t, &db.host_veth), ["to_container", "pass_all"]);
    expect_enforced(&t, "pass-all attached before netpol");

    // Another program is put first while netpol runs: it bypasses enforcement (nothing can stop
    // that) until the next agent start, which moves netpol's link first again.
    let late = {
        let (p, i) = (pass2.try_clone().unwrap(), db.ifindex);
        t.host.run_in(move || tcx_link_first(&p, i, TCX_EGRESS))
    };
    assert_eq!(tcx_chain(&t, &db.host_veth)[0], "pass_all");
    let summary = load(&pins, &t, &plan(&t));
    assert!(summary.starts_with("adopted=true"), "{summary}");
    assert_eq!(
        tcx_chain(&t, &db.host_veth),
        ["to_container", "pass_all", "pass_all"],
        "netpol's link moved first, the old one gone"
    );
    expect_enforced(&t, "pass-all put first, then the agent restarted");
    let links = std::fs::read_dir(pins.path().join("links"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&db.ifindex.to_string()))
        .count();
    assert_eq!(links, 2, "one pinned link per direction");
    drop((early, late));
}

/// `tc filter show` lines of netpol's filter on `ifname` (`ingress` or `egress`).
fn tc_filters(t: &Topology, ifname: &str, dir: &str) -> Vec<String> {
    let out = t.host.run(&["tc", "filter", "show", "dev", ifname, dir]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(" bpf ") && l.contains(" handle "))
        .map(str::to_owned)
        .collect()
}

#[test]
fn clsact_fallback_replaces_its_filter_on_restart_and_detaches_for_real() {
    if !require_root("clsact_fallback_replaces_its_filter_on_restart_and_detaches_for_real") {
        return;
    }
    let t = Topology::new(&unique_tag("tcnl"), &["app1", "db"]);
    let _servers = [
        EchoServer::start(&t.container("db").ns, PG),
        EchoServer::start(&t.container("db").ns, OTHER),
    ];
    let db = t.container("db").clone();
    let pins = PinDir::unique("tcnl");
    let mut p = plan(&t);
    p.attach_mode = Some("netlink".into());
    for round in 0..3 {
        let summary = load(&pins, &t, &p);
        assert!(summary.contains("mode=Netlink"), "{summary}");
        for dir in ["ingress", "egress"] {
            let f = tc_filters(&t, &db.host_veth, dir);
            assert_eq!(
                f.len(),
                1,
                "start {round}: exactly one filter on {dir}: {f:?}"
            );
            assert!(
                f[0].contains("pref 1 ") && f[0].contains("direct-action"),
                "{f:?}"
            );
        }
        expect_enforced(&t, &format!("clsact, start {round}"));
    }
    let mut detach = p.clone();
    detach.attach.clear();
    detach.detach = vec![db.ifindex, t.container("app1").ifindex];
    load(&pins, &t, &detach);
    for dir in ["ingress", "egress"] {
        let f = tc_filters(&t, &db.host_veth, dir);
        assert!(f.is_empty(), "detached: no filter left on {dir}: {f:?}");
    }
    assert_eq!(
        connect(&t, OTHER, ALLOWED_TIMEOUT),
        Connect::Connected,
        "detached"
    );
    // Attached again, then uninstalled (all pins removed): the filters go too.
    load(&pins, &t, &p);
    assert_eq!(tc_filters(&t, &db.host_veth, "egress").len(), 1);
    let dir = pins.path().to_path_buf();
    t.host
        .run_in(move || KernelDatapath::remove_pins(&dir))
        .expect("removing the pins");
    for dir in ["ingress", "egress"] {
        let f = tc_filters(&t, &db.host_veth, dir);
        assert!(f.is_empty(), "uninstalled: no filter left on {dir}: {f:?}");
    }
}
