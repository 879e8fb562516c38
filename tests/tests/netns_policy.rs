//! Namespace tier: real TCP over a Docker-like bridge, with the programs loaded by a separate
//! process (`netpol-netns-loader`) that exits, so every check here also proves that pinned programs
//! keep enforcing without their loader.
//!
//! Policy: "db accepts TCP 5432 from app1 and app2; app1 and app2 may not talk".

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
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
    packet, require_root,
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
    plan.load(
        Path::new(env!("CARGO_BIN_EXE_netpol-netns-loader")),
        pins,
        t,
    )
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

    // The new process: adopts, and additionally lets app2 reach app1 on 8080. It asks for
    // other conntrack sizes: the pinned maps keep theirs (and their entries), no gap.
    let mut changed = plan(&t);
    changed
        .policy
        .push(PlanPolicy::allow_in(APP1, APP2, proto::TCP, WEB, 3));
    changed.replace_policy = true;
    changed.ct_entries = Some(8192);
    let summary = load(&pins, &t, &changed);
    assert!(
        summary.starts_with("adopted=true"),
        "second loader did not adopt: {summary}"
    );
    let defaults = MapSizes::default();
    assert!(
        summary.contains(&format!(
            "ct4_max={} ct6_new_max={}",
            defaults.ct4, defaults.ct6_new
        )),
        "the pinned conntrack maps keep their sizes: {summary}"
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

/// A UDP datagram `src:5000 → dst:port` carrying `payload`, checksummed (IPv6 requires it),
/// behind two VLAN-0 tags, as a container with `CAP_NET_RAW` can send it to `dst_mac`.
fn double_tagged_udp(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    src: IpAddr,
    dst: IpAddr,
    port: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mut l4 = packet::udp(5000, port, payload);
    let len = l4.len() as u16;
    // The pseudo-header: addresses, then IPv4's zero, protocol, length; IPv6's 32-bit length,
    // three zeros, next header.
    let (ethertype, mut pseudo, l3) = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut p = [s.octets(), d.octets()].concat();
            p.extend_from_slice(&[0, proto::UDP]);
            p.extend_from_slice(&len.to_be_bytes());
            (packet::ETH_P_IP, p, None)
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let mut p = [s.octets().to_vec(), d.octets().to_vec()].concat();
            p.extend_from_slice(&u32::from(len).to_be_bytes());
            p.extend_from_slice(&[0, 0, 0, proto::UDP]);
            (packet::ETH_P_IPV6, p, Some((s.octets(), d.octets())))
        }
        _ => panic!("mixed families"),
    };
    pseudo.extend_from_slice(&l4);
    let c = packet::checksum(&pseudo);
    l4[6..8].copy_from_slice(&if c == 0 { 0xffff } else { c }.to_be_bytes());
    let ip = match (l3, src, dst) {
        (Some((s, d)), _, _) => packet::ipv6_raw(s, d, proto::UDP, 64, &l4),
        (None, IpAddr::V4(s), IpAddr::V4(d)) => {
            packet::Ipv4::new(s.octets(), d.octets(), proto::UDP).build(&l4)
        }
        _ => unreachable!(),
    };
    let mut f = [dst_mac, src_mac].concat();
    for _ in 0..2 {
        f.extend_from_slice(&[0x81, 0x00, 0x00, 0x00]);
    }
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(&ip);
    f
}

fn mac(ns: &netpol_tests::netns::Netns, ifname: &str) -> [u8; 6] {
    let out = ns.run(&["cat", &format!("/sys/class/net/{ifname}/address")]);
    let s = String::from_utf8_lossy(&out.stdout);
    let b: Vec<u8> = s
        .trim()
        .split(':')
        .map(|x| u8::from_str_radix(x, 16).expect("MAC"))
        .collect();
    b.try_into().expect("6-byte MAC")
}

/// Sends one raw Ethernet frame out of `eth0` inside `ns`, as a container with `CAP_NET_RAW`
/// (Docker's default) can.
fn send_frame(ns: &netpol_tests::netns::Netns, frame: Vec<u8>) {
    ns.run_in(move || {
        // SAFETY: plain syscalls on a socket this closure opens and closes; `sll` and `frame`
        // outlive the calls that read them.
        unsafe {
            let idx = libc::if_nametoindex(c"eth0".as_ptr());
            assert!(idx != 0, "no eth0");
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
            assert!(fd >= 0, "AF_PACKET: {}", std::io::Error::last_os_error());
            let mut sll: libc::sockaddr_ll = std::mem::zeroed();
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_ifindex = idx as i32;
            sll.sll_halen = 6;
            sll.sll_addr[..6].copy_from_slice(&frame[..6]);
            let n = libc::sendto(
                fd,
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            );
            let err = std::io::Error::last_os_error();
            libc::close(fd);
            assert_eq!(n, frame.len() as isize, "sendto: {err}");
        }
    })
}

/// Waits up to `timeout` for a datagram on `sock`; its payload and source.
fn recv_within(sock: &UdpSocket, timeout: Duration) -> Option<(Vec<u8>, SocketAddr)> {
    sock.set_read_timeout(Some(timeout)).expect("read timeout");
    let mut buf = [0u8; 2048];
    let (n, from) = sock.recv_from(&mut buf).ok()?;
    Some((buf[..n].to_vec(), from))
}

/// An unpoliced container (app2) sends, behind two VLAN-0 tags, a datagram claiming app1's
/// address to the gateway's MAC. The host's stack strips both tags and routes it onto the
/// bridge, where it enters db's veth through the bridge, as app1's own routed packets do: db
/// would take it for app1's. The kernel hands `from_container` such a frame with one tag still
/// in it, so anti-spoofing must not let it pass unread.
#[test]
fn double_vlan_tag_does_not_carry_a_forged_source() {
    if !require_root("double_vlan_tag_does_not_carry_a_forged_source") {
        return;
    }
    const PORT: u16 = 5355;
    let t = topology("npv");
    let h = &t.host;
    h.run(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    h.run(&["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"]);
    let (app1, app2, db) = (t.container("app1"), t.container("app2"), t.container("db"));
    let sock = db.ns.run_in(move || {
        UdpSocket::bind(SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, PORT)))
            .expect("UDP bind in db")
    });
    let gw_mac = mac(h, "br0");
    let app2_mac = mac(&app2.ns, "eth0");
    let forged = |f: Family| {
        double_tagged_udp(
            gw_mac,
            app2_mac,
            app1.addr(f),
            db.addr(f),
            PORT,
            b"forged by app2",
        )
    };
    // Without netpol the frame is what it claims: db receives it from app1's address.
    for f in Family::BOTH {
        send_frame(&app2.ns, forged(f));
        let got = recv_within(&sock, ALLOWED_TIMEOUT);
        assert_eq!(
            got.map(|(p, from)| (p, from.ip().to_canonical())),
            Some((b"forged by app2".to_vec(), app1.addr(f))),
            "over {f:?}, the host did not route the double-tagged frame: the test proves nothing"
        );
    }

    // db accepts app1 on the port; app1 and app2 are policed by no rule (not enforced).
    let pins = PinDir::unique("vlan");
    let mut p = DatapathPlan::default();
    p.container(app1, APP1, false, false);
    p.container(app2, APP2, false, false);
    p.container(db, DB, true, false);
    p.ipcache.push((t.gateway(Family::V4), 32, identity::HOST));
    p.ipcache.push((t.gateway(Family::V6), 128, identity::HOST));
    p.policy
        .push(PlanPolicy::allow_in(DB, APP1, proto::UDP, PORT, 1));
    load(&pins, &t, &p);
    let dp = adopt(&t, pins.path());
    for f in Family::BOTH {
        let before = drops(&dp, DropReason::VlanTagged);
        send_frame(&app2.ns, forged(f));
        let got = recv_within(&sock, DENIED_TIMEOUT);
        assert_eq!(
            got, None,
            "over {f:?}, app2's double-tagged datagram reached db as app1's"
        );
        assert_eq!(drops(&dp, DropReason::VlanTagged), before + 1, "over {f:?}");
        // app1's own datagram still passes: the drop was the tag, not the port.
        let a1 = app1.ns.clone();
        let to = SocketAddr::new(db.addr(f), PORT);
        a1.run_in(move || {
            let any: SocketAddr = if to.is_ipv4() {
                (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
            } else {
                (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
            };
            UdpSocket::bind(any)
                .and_then(|s| s.send_to(b"from app1", to))
                .expect("send from app1");
        });
        let got = recv_within(&sock, ALLOWED_TIMEOUT);
        assert_eq!(
            got.map(|(p, from)| (p, from.ip().to_canonical())),
            Some((b"from app1".to_vec(), app1.addr(f))),
            "over {f:?}, app1 -> db:{PORT}/udp should be allowed"
        );
    }
}

/// `run --event-rate` reaches the kernel: the datapath's `CONFIG` holds the rate, and switching
/// flow tracing (a monitor coming and going) keeps it.
#[test]
fn the_event_rate_is_written_to_the_pinned_config_and_kept() {
    if !require_root("the_event_rate_is_written_to_the_pinned_config_and_kept") {
        return;
    }
    use aya::maps::{Array, Map, MapData};
    use netpol_common::{maps, Config};
    let pins = PinDir::unique("evrate");
    let mut dp = KernelDatapath::open(pins.path(), MapSizes::default()).expect("open");
    let config = || {
        let m = MapData::from_pin(pins.path().join(maps::CONFIG))
            .and_then(Map::from_map_data)
            .expect("pinned CONFIG");
        let a: Array<_, Config> = Array::try_from(m).expect("an array");
        a.get(&0, 0).expect("entry 0")
    };
    // Conntrack reuses entries in place on x86 alone (`Config::CT_IN_PLACE`).
    let start = netpol_agent::datapath::kernel::start_flags();
    assert_eq!(
        start & Config::CT_IN_PLACE != 0,
        cfg!(any(target_arch = "x86_64", target_arch = "x86"))
    );
    assert_eq!(config().flags, start, "the flags a start sets");
    dp.set_event_rate(5).expect("set the rate");
    assert_eq!(config().events_per_sec(), 5);
    dp.set_trace_flows(true).expect("trace on");
    assert_eq!(config().flags, start | Config::TRACE_FLOWS);
    dp.set_trace_flows(false).expect("trace off");
    assert_eq!(
        config(),
        Config {
            flags: start,
            event_rate: 5
        }
    );
}

/// A container whose egress allows the world (here: UDP 9999) but not db cannot reach db by
/// broadcast (IPv4 255.255.255.255) or multicast (IPv6 all-nodes), which the bridge delivers to
/// every container, db's unpoliced ingress included; a rule for everyone (UDP 9998) lets such a
/// datagram out.
#[test]
fn broadcast_reaches_only_what_egress_allows_towards_everyone() {
    if !require_root("broadcast_reaches_only_what_egress_allows_towards_everyone") {
        return;
    }
    const WORLD_ONLY: u16 = 9999;
    const EVERYONE: u16 = 9998;
    let t = topology("npg");
    let pins = PinDir::unique("group");
    let mut p = DatapathPlan::default();
    p.container(t.container("app1"), APP1, false, true);
    p.container(t.container("db"), DB, false, false);
    p.policy.push(PlanPolicy::allow_out(
        APP1,
        identity::WORLD,
        proto::UDP,
        WORLD_ONLY,
        1,
    ));
    p.policy.push(PlanPolicy::allow_out(
        APP1,
        identity::ANY,
        proto::UDP,
        EVERYONE,
        2,
    ));
    load(&pins, &t, &p);
    let dp = adopt(&t, pins.path());
    let db = t.container("db").ns.clone();
    let app1 = t.container("app1").ns.clone();
    let eth0 = app1.ifindex("eth0");
    // From its own global address (a link-local source is neighbour discovery's only).
    let own6 = t.container("app1").ipv6;
    for f in Family::BOTH {
        for port in [WORLD_ONLY, EVERYONE] {
            let rx = db.run_in(move || {
                let any: IpAddr = match f {
                    Family::V4 => "0.0.0.0".parse().unwrap(),
                    Family::V6 => "::".parse().unwrap(),
                };
                UdpSocket::bind(SocketAddr::new(any, port)).expect("bind in db")
            });
            app1.run_in(move || {
                let (any, group): (SocketAddr, SocketAddr) = match f {
                    Family::V4 => (
                        "0.0.0.0:0".parse().unwrap(),
                        SocketAddr::new("255.255.255.255".parse().unwrap(), port),
                    ),
                    Family::V6 => (
                        SocketAddr::new(IpAddr::V6(own6), 0),
                        SocketAddr::V6(std::net::SocketAddrV6::new(
                            "ff02::1".parse().unwrap(),
                            port,
                            0,
                            eth0,
                        )),
                    ),
                };
                let s = UdpSocket::bind(any).expect("bind in app1");
                s.set_broadcast(true).expect("SO_BROADCAST");
                s.send_to(b"to everyone", group).expect("send");
            });
            let got = recv_within(&rx, DENIED_TIMEOUT).map(|(d, _)| d);
            if port == WORLD_ONLY {
                assert_eq!(
                    got, None,
                    "{f:?}: app1's world-only rule let a group datagram reach db"
                );
            } else {
                assert_eq!(
                    got.as_deref(),
                    Some(&b"to everyone"[..]),
                    "{f:?}: a rule for everyone should let the group datagram out"
                );
            }
        }
    }
    assert_eq!(policy_denied(&dp), 2, "one drop per family");
}
