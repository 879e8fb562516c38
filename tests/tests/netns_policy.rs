//! Namespace tier: real TCP over a Docker-like bridge, with the programs loaded by a separate
//! process (`netpol-netns-loader`) that exits, so every check here also proves that pinned programs
//! keep enforcing without their loader.
//!
//! Policy: "db accepts TCP 5432 from app1 and app2; app1 and app2 may not talk".

use std::{
    net::SocketAddr,
    path::Path,
    process::Command,
    sync::{
        atomic::{AtomicBool, AtomicU32, Ordering},
        Arc,
    },
    time::Duration,
};

use netpol_agent::datapath::{kernel::KernelDatapath, Datapath, MapSizes};
use netpol_common::{identity, proto, DropReason};
use netpol_tests::{
    netns::{
        echo_roundtrip, tcp_connect, tcp_open, udp_exchange, unique_tag, wait_for, Connect,
        DatapathPlan, EchoServer, Family, PinDir, PlanPolicy, Topology, UdpEchoServer,
    },
    require_root,
};

const APP1: u32 = 256;
const APP2: u32 = 257;
const DB: u32 = 258;
const PG: u16 = 5432;
const OTHER: u16 = 5433;
const WEB: u16 = 8080;

/// A denied SYN is dropped silently: the client gives up after this long.
const DENIED_TIMEOUT: Duration = Duration::from_millis(800);
/// An allowed connection must complete within this, even on a busy machine.
const ALLOWED_TIMEOUT: Duration = Duration::from_secs(5);

fn topology(name: &str) -> Topology {
    Topology::new(&unique_tag(name), &["app1", "app2", "db"])
}

/// Listeners on every port the checks use, so a failed connection is the policy, not a missing
/// server.
fn servers(t: &Topology) -> Vec<EchoServer> {
    vec![
        EchoServer::start(&t.container("db").ns, PG),
        EchoServer::start(&t.container("db").ns, OTHER),
        EchoServer::start(&t.container("app1").ns, WEB),
        EchoServer::start(&t.container("app2").ns, WEB),
    ]
}

/// The three containers with their identities, the gateway as `host`, db's ingress allowing app1
/// and app2 on TCP 5432, and app1's and app2's ingress enforced with nothing allowed.
fn plan(t: &Topology) -> DatapathPlan {
    let mut p = DatapathPlan::default();
    p.container(t.container("app1"), APP1, true, false);
    p.container(t.container("app2"), APP2, true, false);
    p.container(t.container("db"), DB, true, false);
    p.ipcache.push((t.gateway(Family::V4), 32, identity::HOST));
    p.ipcache.push((t.gateway(Family::V6), 128, identity::HOST));
    p.policy
        .push(PlanPolicy::allow_in(DB, APP1, proto::TCP, PG, 1));
    p.policy
        .push(PlanPolicy::allow_in(DB, APP2, proto::TCP, PG, 2));
    p
}

/// Runs the loader as its own process, which exits; returns its summary line.
fn load(pins: &PinDir, t: &Topology, plan: &DatapathPlan) -> String {
    let name = pins
        .path()
        .file_name()
        .expect("pin dir name")
        .to_string_lossy();
    let file = std::env::temp_dir().join(format!("{name}.plan"));
    std::fs::write(&file, plan.to_text()).expect("writing the plan");
    let out = Command::new(env!("CARGO_BIN_EXE_netpol-netns-loader"))
        .arg(pins.path())
        .arg(&t.host.name)
        .arg(&file)
        .output()
        .expect("spawning netpol-netns-loader");
    let _ = std::fs::remove_file(&file);
    assert!(
        out.status.success(),
        "loader failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Opens (adopts) the pinned datapath in this process, from inside the host namespace.
fn adopt(t: &Topology, pins: &Path) -> KernelDatapath {
    let _g = t.host.enter();
    let dp = KernelDatapath::open(pins, MapSizes::default()).expect("adopting the datapath");
    assert!(dp.adopted(), "the pinned maps were not found");
    dp
}

fn to(t: &Topology, name: &str, f: Family, port: u16) -> SocketAddr {
    SocketAddr::new(t.container(name).addr(f), port)
}

fn expect_allowed(t: &Topology, from: &str, dst: &str, f: Family, port: u16) {
    let r = tcp_connect(&t.container(from).ns, to(t, dst, f, port), ALLOWED_TIMEOUT);
    assert_eq!(
        r,
        Connect::Connected,
        "{from} -> {dst}:{port} over {f:?} should be allowed"
    );
}

fn expect_blocked(t: &Topology, from: &str, dst: &str, f: Family, port: u16) {
    let r = tcp_connect(&t.container(from).ns, to(t, dst, f, port), DENIED_TIMEOUT);
    assert!(
        matches!(r, Connect::TimedOut),
        "{from} -> {dst}:{port} over {f:?} should be dropped by policy, got {r:?}"
    );
}

fn policy_denied(dp: &KernelDatapath) -> u64 {
    drops(dp, DropReason::PolicyDenied)
}

fn drops(dp: &KernelDatapath, reason: DropReason) -> u64 {
    dp.drop_counters()
        .expect("reading drop counters")
        .get(&(reason as u8))
        .copied()
        .unwrap_or(0)
}

#[test]
fn db_policy_over_ipv4_and_ipv6_survives_reload() {
    if !require_root("db_policy_over_ipv4_and_ipv6_survives_reload") {
        return;
    }
    let t = topology("npa");
    let pins = PinDir::unique("policy");
    let _servers = servers(&t);

    // Without the datapath everything connects: the listeners are there.
    for f in Family::BOTH {
        for (from, dst, port) in [
            ("app1", "app2", WEB),
            ("db", "app1", WEB),
            ("app1", "db", OTHER),
        ] {
            let r = tcp_connect(&t.container(from).ns, to(&t, dst, f, port), ALLOWED_TIMEOUT);
            assert_eq!(
                r,
                Connect::Connected,
                "{from} -> {dst}:{port} {f:?} before loading"
            );
        }
    }

    let summary = load(&pins, &t, &plan(&t));
    assert!(
        summary.starts_with("adopted=false"),
        "first load: {summary}"
    );
    let dp = adopt(&t, pins.path());
    let denied_before = policy_denied(&dp);

    for f in Family::BOTH {
        expect_allowed(&t, "app1", "db", f, PG);
        expect_allowed(&t, "app2", "db", f, PG);
        expect_blocked(&t, "app1", "db", f, OTHER);
        expect_blocked(&t, "app1", "app2", f, WEB);
        expect_blocked(&t, "app2", "app1", f, WEB);
        expect_blocked(&t, "db", "app1", f, WEB);
    }
    let denied_after = policy_denied(&dp);
    // 4 blocked connections per family, each at least its SYN dropped.
    assert!(
        denied_after >= denied_before + 8,
        "PolicyDenied rose from {denied_before} to {denied_after}, expected at least 8 more"
    );
    // The kernels' own neighbour discovery, MLD and addressing pass the anti-spoofing checks.
    let drops = dp.drop_counters().expect("reading drop counters");
    for r in [
        DropReason::NeighbourDiscovery,
        DropReason::Spoofed,
        DropReason::NotForEndpoint,
    ] {
        assert_eq!(
            drops.get(&(r as u8)).copied().unwrap_or(0),
            0,
            "{} drops of real traffic",
            r.as_str()
        );
    }

    // bpftool prints typed JSON: the policy key's fields by name.
    let out = Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(pins.path().join("POLICY"))
        .output()
        .expect("running bpftool");
    let json = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bpftool map dump failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for field in [
        "\"local\":",
        "\"remote\":",
        "\"direction\":",
        "\"proto\":",
        "\"rule\":",
    ] {
        assert!(
            json.contains(field),
            "bpftool POLICY dump lacks {field}: {json}"
        );
    }
    assert!(
        json.contains(&format!("\"remote\":{APP1}")),
        "no entry for app1: {json}"
    );

    // Established connections (IPv4 and IPv6) survive a policy reload: every POLICY entry deleted
    // and re-inserted, then a whole re-open of the datapath by another process.
    let mut sessions: Vec<_> = Family::BOTH
        .into_iter()
        .map(|f| {
            let mut s = tcp_open(
                &t.container("app1").ns,
                to(&t, "db", f, PG),
                ALLOWED_TIMEOUT,
            )
            .unwrap_or_else(|e| panic!("app1 -> db:{PG} {f:?}: {e:?}"));
            echo_roundtrip(&mut s, b"before reload", ALLOWED_TIMEOUT)
                .unwrap_or_else(|e| panic!("echo before reload {f:?}: {e}"));
            (f, s)
        })
        .collect();
    let mut dp = dp;
    let entries = dp.current().expect("reading the maps").policy;
    assert_eq!(entries.len(), 2, "policy entries: {entries:?}");
    for k in entries.keys() {
        dp.delete_policy(*k).expect("deleting a policy entry");
    }
    for (f, s) in &mut sessions {
        echo_roundtrip(s, b"while no policy", ALLOWED_TIMEOUT)
            .unwrap_or_else(|e| panic!("established {f:?} session broke with policy deleted: {e}"));
    }
    // The deletion is real: a new connection is refused meanwhile.
    expect_blocked(&t, "app1", "db", Family::V4, PG);
    for (k, v) in &entries {
        dp.upsert_policy(*k, *v)
            .expect("re-inserting a policy entry");
    }
    drop(dp);
    let summary = load(&pins, &t, &plan(&t));
    assert!(summary.starts_with("adopted=true"), "reload: {summary}");
    for (f, s) in &mut sessions {
        echo_roundtrip(s, b"after reload", ALLOWED_TIMEOUT)
            .unwrap_or_else(|e| panic!("established {f:?} session broke across reload: {e}"));
    }
    for f in Family::BOTH {
        expect_allowed(&t, "app1", "db", f, PG);
        expect_blocked(&t, "app2", "app1", f, WEB);
    }
}

/// The loader exits; the programs keep enforcing. A new process adopts the pins, changes the
/// policy, and while it does, probes never see a denied connection succeed or an allowed one fail.
#[test]
fn enforcement_outlives_loader_and_adoption_has_no_gap() {
    if !require_root("enforcement_outlives_loader_and_adoption_has_no_gap") {
        return;
    }
    let t = topology("npb");
    let pins = PinDir::unique("adopt");
    let _servers = servers(&t);

    let summary = load(&pins, &t, &plan(&t));
    assert!(
        summary.starts_with("adopted=false"),
        "first load: {summary}"
    );
    // The loader has exited: enforcement goes on.
    for f in Family::BOTH {
        expect_allowed(&t, "app1", "db", f, PG);
        expect_blocked(&t, "app2", "app1", f, WEB);
        expect_blocked(&t, "app1", "app2", f, WEB);
    }

    // Probes in both directions of the policy, running throughout the adoption.
    let stop = Arc::new(AtomicBool::new(false));
    let allowed_ok = Arc::new(AtomicU32::new(0));
    let denied_ok = Arc::new(AtomicU32::new(0));
    let mut probes = Vec::new();
    for f in Family::BOTH {
        let (ns, dst) = (t.container("app1").ns.clone(), to(&t, "db", f, PG));
        let (stop2, count) = (stop.clone(), allowed_ok.clone());
        probes.push(std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                let r = tcp_connect(&ns, dst, ALLOWED_TIMEOUT);
                if r != Connect::Connected {
                    return Err(format!(
                        "allowed app1 -> {dst} failed during adoption: {r:?}"
                    ));
                }
                count.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        }));
        let (ns, dst) = (t.container("app1").ns.clone(), to(&t, "app2", f, WEB));
        let (stop2, count) = (stop.clone(), denied_ok.clone());
        probes.push(std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                let r = tcp_connect(&ns, dst, Duration::from_millis(200));
                if r != Connect::TimedOut {
                    return Err(format!(
                        "denied app1 -> {dst} was not dropped during adoption: {r:?}"
                    ));
                }
                count.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        }));
    }
    // Let each probe run at least once before the adoption starts.
    wait_for("probes to start", Duration::from_secs(10), || {
        (allowed_ok.load(Ordering::Relaxed) >= 2 && denied_ok.load(Ordering::Relaxed) >= 2)
            .then_some(())
    });

    // The new process: adopts, and additionally lets app2 reach app1 on 8080.
    let mut changed = plan(&t);
    changed
        .policy
        .push(PlanPolicy::allow_in(APP1, APP2, proto::TCP, WEB, 3));
    changed.replace_policy = true;
    let summary = load(&pins, &t, &changed);
    assert!(
        summary.starts_with("adopted=true"),
        "second loader did not adopt: {summary}"
    );

    // Keep probing a little after the switch, then stop.
    let (a0, d0) = (
        allowed_ok.load(Ordering::Relaxed),
        denied_ok.load(Ordering::Relaxed),
    );
    wait_for("probes after adoption", Duration::from_secs(10), || {
        (allowed_ok.load(Ordering::Relaxed) >= a0 + 2
            && denied_ok.load(Ordering::Relaxed) >= d0 + 2)
            .then_some(())
    });
    stop.store(true, Ordering::Relaxed);
    for p in probes {
        if let Err(e) = p.join().expect("probe thread panicked") {
            panic!("{e}");
        }
    }

    // The change took effect; the rest of the policy still holds.
    for f in Family::BOTH {
        expect_allowed(&t, "app2", "app1", f, WEB);
        expect_blocked(&t, "app1", "app2", f, WEB);
        expect_allowed(&t, "app2", "db", f, PG);
        expect_blocked(&t, "db", "app1", f, WEB);
    }
}

/// A bridge floods a frame whose destination it has not learnt to every port. The copy that
/// reaches another container's veth must not open a conntrack hole: with db's port never learnt,
/// app1's SYNs to db:5433 also pass app2's veth, where ingress is not enforced, and must still be
/// dropped at db.
#[test]
fn flooded_frames_do_not_open_conntrack_holes() {
    if !require_root("flooded_frames_do_not_open_conntrack_holes") {
        return;
    }
    let t = topology("npc");
    let pins = PinDir::unique("flood");
    let _servers = servers(&t);
    let h = &t.host;
    let db_veth = t.container("db").host_veth.clone();
    h.run(&[
        "ip",
        "link",
        "set",
        &db_veth,
        "type",
        "bridge_slave",
        "learning",
        "off",
    ]);
    let mac = String::from_utf8_lossy(&h.run(&["bridge", "fdb", "show", "dev", &db_veth]).stdout)
        .lines()
        .filter(|l| !l.contains("permanent"))
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect::<Vec<_>>();
    for m in &mac {
        h.run(&["bridge", "fdb", "del", m, "dev", &db_veth, "master"]);
    }

    let mut p = plan(&t);
    for e in &mut p.endpoints {
        if e.ifindex == t.container("app2").ifindex {
            e.ingress = false;
        }
    }
    load(&pins, &t, &p);
    let dp = adopt(&t, pins.path());

    // What the bridge flooded to app2's port: delivered (tx_packets), or dropped by
    // to_container as not addressed to app2 (NotForEndpoint; db's own veth never counts it).
    let tx = || -> u64 {
        let path = format!(
            "/sys/class/net/{}/statistics/tx_packets",
            t.container("app2").host_veth
        );
        let sent: u64 = String::from_utf8_lossy(&h.run(&["cat", &path]).stdout)
            .trim()
            .parse()
            .expect("tx_packets");
        let not_for_app2 = dp
            .drop_counters()
            .expect("reading drop counters")
            .get(&(DropReason::NotForEndpoint as u8))
            .copied()
            .unwrap_or(0);
        sent + not_for_app2
    };
    for f in Family::BOTH {
        let before = tx();
        let r = tcp_connect(
            &t.container("app1").ns,
            to(&t, "db", f, OTHER),
            Duration::from_secs(3),
        );
        assert!(
            matches!(r, Connect::TimedOut),
            "app1 -> db:{OTHER} over {f:?} passed after its SYN was flooded past app2: {r:?}"
        );
        assert!(
            tx() >= before + 2,
            "the SYNs to db were not flooded to app2's port: the test proves nothing"
        );
        expect_allowed(&t, "app1", "db", f, PG);
    }
}

/// A UDP datagram larger than the MTU (1500 on every veth here) crosses the bridge in fragments.
/// Between an allowed pair it arrives whole, and so does its echo (a reply, by conntrack);
/// between a denied pair nothing arrives: the first fragment is denied by policy, the later ones
/// have no first fragment to be decided by.
#[test]
fn large_udp_datagrams_arrive_whole_between_allowed_peers_only() {
    if !require_root("large_udp_datagrams_arrive_whole_between_allowed_peers_only") {
        return;
    }
    const DNS: u16 = 5353;
    let t = topology("npd");
    let pins = PinDir::unique("frag");
    let _udp = UdpEchoServer::start(&t.container("db").ns, DNS);
    let mut p = plan(&t);
    p.policy
        .push(PlanPolicy::allow_in(DB, APP1, proto::UDP, DNS, 3));
    load(&pins, &t, &p);
    let dp = adopt(&t, pins.path());
    let payload: Vec<u8> = (0..4000u32).map(|i| (i % 251) as u8).collect();
    for f in Family::BOTH {
        let frag_before = drops(&dp, DropReason::Fragment);
        let got = udp_exchange(
            &t.container("app1").ns,
            to(&t, "db", f, DNS),
            payload.clone(),
            ALLOWED_TIMEOUT,
        );
        assert!(
            got.as_deref() == Some(&payload[..]),
            "app1 -> db:{DNS}/udp over {f:?}: a 4000-byte datagram and its echo should arrive \
             whole, got {:?} bytes",
            got.map(|g| g.len())
        );
        assert_eq!(
            drops(&dp, DropReason::Fragment),
            frag_before,
            "a fragment of the allowed exchange over {f:?} was dropped"
        );
        let denied_before = policy_denied(&dp);
        let got = udp_exchange(
            &t.container("app2").ns,
            to(&t, "db", f, DNS),
            payload.clone(),
            DENIED_TIMEOUT,
        );
        assert_eq!(
            got.map(|g| g.len()),
            None,
            "app2 -> db:{DNS}/udp over {f:?} should be dropped"
        );
        // 4000 bytes are three fragments. app2's own veth (egress not enforced) passed the first
        // and recorded its ports, so db's decides the later ones by policy too.
        let dropped =
            policy_denied(&dp) - denied_before + drops(&dp, DropReason::Fragment) - frag_before;
        assert!(
            policy_denied(&dp) > denied_before && dropped >= 3,
            "app2 -> db:{DNS}/udp over {f:?}: {dropped} drops, want all three fragments"
        );
    }
}
