//! Namespace tier, issue 8 holes 1, 4 and 8, with real packets over a Docker-like bridge and the
//! programs loaded by `netpol-netns-loader` (which exits: pinned programs enforce alone).
//!
//! - A container that gets a departed container's address does not inherit its flows.
//! - A packet that claims a container's address but comes from elsewhere (here: a neighbour
//!   routed in through the host, as from the uplink) is dropped; the real container still gets
//!   through, bridged or routed by the host.
//! - A flood of new flows does not evict an idle established connection, which then receives
//!   server-push data; conntrack capacity does not depend on the number of CPUs.

use std::{
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::Path,
    time::Duration,
};

use aya::maps::{HashMap, Map, MapData};
use netpol_agent::datapath::{kernel::KernelDatapath, Datapath, MapSizes};
use netpol_common::{
    ct::{CtEntry, CtKey4},
    event::FlowEvent,
    identity, maps, proto, DropReason,
};
use netpol_tests::{
    netns::{unique_tag, wait_for, DatapathPlan, Netns, PinDir, PlanPolicy, Topology},
    require_root,
};

const APP1: u32 = 256;
const APP2: u32 = 257;
const DB: u32 = 258;
const NEWCOMER: u32 = 300;
const PG: u16 = 5432;
const DNS: u16 = 5353;

const WAIT: Duration = Duration::from_millis(800);

/// Runs the loader as its own process, which exits; returns its summary line.
fn load(pins: &PinDir, t: &Topology, plan: &DatapathPlan) -> String {
    plan.load(
        Path::new(env!("CARGO_BIN_EXE_netpol-netns-loader")),
        pins,
        t,
    )
}

fn adopt(t: &Topology, pins: &Path) -> KernelDatapath {
    let _g = t.host.enter();
    KernelDatapath::open(pins, MapSizes::default()).expect("adopting the datapath")
}

fn drops(dp: &KernelDatapath, reason: DropReason) -> u64 {
    dp.drop_counters()
        .expect("reading drop counters")
        .get(&(reason as u8))
        .copied()
        .unwrap_or(0)
}

/// A UDP socket in `ns` bound to `addr`.
fn udp(ns: &Netns, addr: SocketAddr) -> UdpSocket {
    ns.run_in(move || {
        let s = UdpSocket::bind(addr).unwrap_or_else(|e| panic!("UDP bind {addr}: {e}"));
        s.set_read_timeout(Some(WAIT)).expect("read timeout");
        s
    })
}

/// The next datagram on `s` within the read timeout, with its sender.
fn recv(s: &UdpSocket) -> Option<(Vec<u8>, SocketAddr)> {
    let mut buf = [0u8; 512];
    s.recv_from(&mut buf)
        .ok()
        .map(|(n, a)| (buf[..n].to_vec(), a))
}

fn v4(t: &Topology, name: &str) -> Ipv4Addr {
    t.container(name).ipv4
}

#[test]
fn reused_address_does_not_inherit_flows() {
    if !require_root("reused_address_does_not_inherit_flows") {
        return;
    }
    let mut t = Topology::new(&unique_tag("nct-reuse"), &["app1", "db"]);
    let pins = PinDir::unique("nct-reuse");
    // db takes UDP 5353 from app1 and sends nothing of its own; app1 takes nothing in.
    let mut p = DatapathPlan::default();
    p.container(t.container("app1"), APP1, true, false);
    p.container(t.container("db"), DB, true, true);
    p.policy
        .push(PlanPolicy::allow_in(DB, APP1, proto::UDP, DNS, 1));
    load(&pins, &t, &p);

    let db_addr = SocketAddr::new(IpAddr::V4(v4(&t, "db")), DNS);
    let client = udp(&t.container("app1").ns, (v4(&t, "app1"), 0).into());
    client.connect(db_addr).expect("connect");
    let server = udp(&t.container("db").ns, db_addr);
    // Two exchanges: the flow is established at both ends (answered, then the opener again).
    for msg in [&b"query 1"[..], b"query 2"] {
        client.send(msg).expect("send");
        let (got, from) = recv(&server).expect("db receives app1's query");
        assert_eq!(got, msg);
        server.send_to(b"answer", from).expect("answer");
        let mut buf = [0u8; 64];
        let n = client.recv(&mut buf).expect("app1 receives db's answer");
        assert_eq!(&buf[..n], b"answer");
    }
    let app1_addr = client.local_addr().expect("local addr");
    drop(server);

    // db goes; a newcomer with another identity, which may neither send nor receive, gets its
    // address on a new veth at once.
    let newcomer = t.replace_container("db", "newcomer");
    let mut p = DatapathPlan::default();
    p.container(t.container("app1"), APP1, true, false);
    p.container(&newcomer, NEWCOMER, true, true);
    p.policy
        .push(PlanPolicy::allow_in(DB, APP1, proto::UDP, DNS, 1));
    load(&pins, &t, &p);
    let mut dp = adopt(&t, pins.path());
    let denied = drops(&dp, DropReason::PolicyDenied);

    // The newcomer answers on db's flow: app1 must not receive it.
    let impostor = udp(&newcomer.ns, db_addr);
    impostor.send_to(b"forged answer", app1_addr).expect("send");
    let mut buf = [0u8; 64];
    client.set_read_timeout(Some(WAIT)).expect("timeout");
    assert!(
        client.recv(&mut buf).is_err(),
        "app1 received the newcomer's datagram on the departed db's flow"
    );
    // app1 goes on with the flow: the newcomer must not receive it.
    client.send(b"query 3").expect("send");
    assert_eq!(
        recv(&impostor),
        None,
        "the newcomer received app1's datagram on the departed db's flow"
    );
    assert!(
        drops(&dp, DropReason::PolicyDenied) >= denied + 2,
        "both were decided by policy and denied"
    );

    // What the agent does when an endpoint goes: the entries with its address are removed
    // (db's own, and app1's towards db), in both tables.
    let db_ip = IpAddr::V4(v4(&t, "newcomer"));
    let removed = dp.flush_ct(&[db_ip].into()).expect("flush_ct");
    assert!(
        removed >= 2,
        "db's and app1's entries of the flow: {removed}"
    );
    for name in [maps::CT4, maps::CT4_NEW] {
        let m = MapData::from_pin(pins.path().join(name))
            .and_then(Map::from_map_data)
            .expect(name);
        let h: HashMap<_, CtKey4, CtEntry> = HashMap::try_from(&m).expect("hash");
        let left = h
            .keys()
            .flatten()
            .filter(|k| IpAddr::from(k.local) == db_ip || IpAddr::from(k.remote) == db_ip)
            .count();
        assert_eq!(
            left, 0,
            "{name} still holds entries of the departed address"
        );
    }
}

#[test]
fn container_address_from_elsewhere_is_dropped_as_spoofed() {
    if !require_root("container_address_from_elsewhere_is_dropped_as_spoofed") {
        return;
    }
    let mut t = Topology::new(&unique_tag("nct-spoof"), &["app1", "db"]);
    let (outside, _uplink) = t.add_outside("nb");
    let pins = PinDir::unique("nct-spoof");
    // db takes UDP 5353 from app1 only.
    let mut p = DatapathPlan::default();
    p.container(t.container("app1"), APP1, false, false);
    p.container(t.container("db"), DB, true, false);
    p.policy
        .push(PlanPolicy::allow_in(DB, APP1, proto::UDP, DNS, 1));
    load(&pins, &t, &p);
    let dp = adopt(&t, pins.path());

    let db_addr = SocketAddr::new(IpAddr::V4(v4(&t, "db")), DNS);
    let server = udp(&t.container("db").ns, db_addr);
    let app1 = v4(&t, "app1");

    // The real app1, bridged: db gets it.
    let real = udp(&t.container("app1").ns, (app1, 0).into());
    real.send_to(b"bridged", db_addr).expect("send");
    let (got, from) = recv(&server).expect("db receives app1 over the bridge");
    assert_eq!(
        (got.as_slice(), from.ip()),
        (&b"bridged"[..], IpAddr::V4(app1))
    );

    // A neighbour routed in through the host, claiming app1's address.
    outside.run(&["ip", "addr", "add", &format!("{app1}/32"), "dev", "eth0"]);
    let forged = udp(&outside, (app1, 0).into());
    let spoofed = drops(&dp, DropReason::Spoofed);
    forged.send_to(b"forged", db_addr).expect("send");
    assert_eq!(
        recv(&server),
        None,
        "db received a packet with app1's address from outside the bridge"
    );
    assert_eq!(
        drops(&dp, DropReason::Spoofed),
        spoofed + 1,
        "dropped as spoofed"
    );

    // The real app1 routed by the host (through the gateway, in on the bridge): db gets it.
    let db = v4(&t, "db");
    t.container("app1").ns.run(&[
        "ip",
        "route",
        "add",
        &format!("{db}/32"),
        "via",
        "10.77.0.1",
    ]);
    real.send_to(b"routed", db_addr).expect("send");
    let (got, _) = recv(&server).expect("db receives app1 routed by the host");
    assert_eq!(got, b"routed");
}

/// A datagram from the host's own address that did not come from the host. db takes UDP only
/// from `host` (a healthcheck rule). A neighbour routed in through the host's uplink claims the
/// gateway's address, or another address of the host's: IPv6 has no martian-source check, so
/// the host forwards it to db as from the host; IPv4 drops a local source itself unless
/// `accept_local` is set, which lets it through too. netpol drops both as spoofed, and also
/// the gateway's address bridged from a port that netpol does not manage (no martian check
/// for bridged frames in either family); a managed container cannot send it at all
/// (`from_container`). The host's own datagrams and TCP connections still get through.
#[test]
fn host_address_from_outside_is_dropped_as_spoofed() {
    if !require_root("host_address_from_outside_is_dropped_as_spoofed") {
        return;
    }
    let mut t = Topology::new(&unique_tag("nct-host"), &["db", "app1", "rogue"]);
    let (outside, uplink) = t.add_outside("nh");
    // Another of the host's addresses, not on the link (as a host's public address on `lo`).
    let other: [IpAddr; 2] = [
        "198.51.100.1".parse().unwrap(),
        "2001:db8:3::1".parse().unwrap(),
    ];
    for a in other {
        t.host
            .run(&["ip", "addr", "add", &a.to_string(), "dev", "lo"]);
    }
    let db = t.container("db");
    let (app1, rogue) = (t.container("app1"), t.container("rogue"));
    let server = |a: IpAddr| udp(&db.ns, SocketAddr::new(a, DNS));
    let servers = [server(IpAddr::V4(db.ipv4)), server(IpAddr::V6(db.ipv6))];
    let to = |v6: bool| {
        SocketAddr::new(
            if v6 {
                IpAddr::V6(db.ipv6)
            } else {
                IpAddr::V4(db.ipv4)
            },
            DNS,
        )
    };
    let gateway = [IpAddr::V4(t.gateway4), IpAddr::V6(t.gateway6)];
    // Sends from `ns` with source `src` (made one of `ns`'s addresses, on `lo`; ARP keeps
    // naming the interface's own address), to db.
    let send_from = |ns: &Netns, src: IpAddr, what: &str| {
        let a = format!("{src}/{}", if src.is_ipv4() { 32 } else { 128 });
        let lo = ns.run(&["ip", "addr", "show", "dev", "lo"]);
        if !String::from_utf8_lossy(&lo.stdout).contains(&a) {
            ns.run(&["ip", "addr", "add", &a, "dev", "lo"]);
            ns.run(&["sysctl", "-qw", "net.ipv4.conf.all.arp_announce=2"]);
        }
        udp(ns, SocketAddr::new(src, 0))
            .send_to(what.as_bytes(), to(src.is_ipv6()))
            .expect("send");
    };
    // The next datagram db receives within `wait`, as (payload, source).
    let got_within = |v6: bool, wait: Duration| {
        let s = &servers[usize::from(v6)];
        s.set_read_timeout(Some(wait)).expect("read timeout");
        recv(s).map(|(p, from)| (String::from_utf8_lossy(&p).into_owned(), from.ip()))
    };
    let got = |v6: bool, _what: &str| got_within(v6, WAIT);

    // Without netpol: IPv6 from outside with the gateway's address reaches db as the host's;
    // IPv4 only with `accept_local` on the uplink.
    // The outside reaches db with its own addresses first (its new link can take a moment).
    for own in ["192.0.2.2", "2001:db8:2::2"] {
        let own: IpAddr = own.parse().unwrap();
        let s = udp(&outside, SocketAddr::new(own, 0));
        wait_for(
            "the outside namespace reaching db",
            Duration::from_secs(10),
            || {
                s.send_to(b"hello", to(own.is_ipv6())).expect("send");
                got_within(own.is_ipv6(), Duration::from_millis(100))
            },
        );
    }
    // Hellos that were queued behind neighbour discovery may still come: none is left unread.
    for v6 in [false, true] {
        while got_within(v6, Duration::from_millis(100)).is_some() {}
    }
    send_from(&outside, gateway[1], "v6 forged");
    assert_eq!(
        got(true, "v6"),
        Some(("v6 forged".into(), gateway[1])),
        "the attack needs no netpol bug to work"
    );
    send_from(&outside, gateway[0], "v4 forged");
    assert_eq!(
        got(false, "v4"),
        None,
        "Linux drops an IPv4 local source from outside"
    );
    let accept_local = |on: u8| {
        t.host.run(&[
            "sysctl",
            "-qw",
            &format!("net.ipv4.conf.up-nh.accept_local={on}"),
        ]);
    };
    accept_local(1);
    send_from(&outside, gateway[0], "v4 forged");
    assert_eq!(
        got(false, "v4"),
        Some(("v4 forged".into(), gateway[0])),
        "with accept_local it passes"
    );
    accept_local(0);

    // db takes UDP 5353 and TCP 5432 from `host` only; app1 is managed, not policed; rogue is
    // a port on the bridge that netpol does not manage.
    let pins = PinDir::unique("nct-host");
    let mut p = DatapathPlan::default();
    p.container(app1, APP1, false, false);
    p.container(db, DB, true, false);
    for a in gateway.into_iter().chain(other) {
        p.ipcache
            .push((a, if a.is_ipv4() { 32 } else { 128 }, identity::HOST));
    }
    p.policy
        .push(PlanPolicy::allow_in(DB, identity::HOST, proto::UDP, DNS, 1));
    p.policy
        .push(PlanPolicy::allow_in(DB, identity::HOST, proto::TCP, PG, 2));
    load(&pins, &t, &p);
    let dp = adopt(&t, pins.path());
    let _pg = push_server(
        &db.ns,
        SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), PG),
    );

    // Each forged datagram is one more `Spoofed` drop and never reaches db.
    let dropped = |from: &Netns, src: IpAddr, what: &str| {
        let before = drops(&dp, DropReason::Spoofed);
        send_from(from, src, what);
        wait_for(
            &format!("{what}: a Spoofed drop"),
            Duration::from_secs(5),
            || (drops(&dp, DropReason::Spoofed) > before).then_some(()),
        );
        assert_eq!(drops(&dp, DropReason::Spoofed), before + 1, "{what}");
        // Dropped: it cannot come any more (a short look, for anything else that came).
        let late = got_within(src.is_ipv6(), Duration::from_millis(50));
        assert_eq!(late, None, "{what} reached db");
    };
    dropped(&outside, gateway[1], "v6 gateway from outside");
    dropped(&outside, other[1], "v6 host address from outside");
    let before = drops(&dp, DropReason::Spoofed);
    send_from(&outside, gateway[0], "v4 forged");
    assert_eq!(
        got(false, "v4"),
        None,
        "Linux drops an IPv4 local source from outside"
    );
    assert_eq!(
        drops(&dp, DropReason::Spoofed),
        before,
        "dropped by Linux before netpol"
    );
    accept_local(1);
    dropped(
        &outside,
        gateway[0],
        "v4 gateway from outside (accept_local)",
    );
    dropped(
        &outside,
        other[0],
        "v4 host address from outside (accept_local)",
    );
    accept_local(0);
    for a in gateway {
        dropped(&rogue.ns, a, &format!("{a} bridged from an unmanaged port"));
        dropped(&app1.ns, a, &format!("{a} from a managed container"));
    }

    // The host itself: its datagrams (from the gateway's address, the one it picks for the
    // bridge, and from its other address) and a TCP connection pass.
    for a in gateway.into_iter().chain(other) {
        let what = format!("from the host's {a}");
        udp(&t.host, SocketAddr::new(a, 0))
            .send_to(what.as_bytes(), to(a.is_ipv6()))
            .expect("send");
        assert_eq!(got(a.is_ipv6(), &what), Some((what.clone(), a)), "{what}");
    }
    for f in [IpAddr::V4(db.ipv4), IpAddr::V6(db.ipv6)] {
        let c = netpol_tests::netns::tcp_connect(
            &t.host,
            SocketAddr::new(f, PG),
            Duration::from_secs(5),
        );
        assert_eq!(
            c,
            netpol_tests::netns::Connect::Connected,
            "the host -> db:{PG} over {f}"
        );
    }
    let _ = uplink;
}

/// A TCP server in `ns` that accepts one connection and keeps it, so a test can push data.
fn push_server(ns: &Netns, addr: SocketAddr) -> TcpListener {
    ns.run_in(move || TcpListener::bind(addr).unwrap_or_else(|e| panic!("listen {addr}: {e}")))
}

#[test]
fn flood_of_new_flows_does_not_evict_an_idle_connection() {
    if !require_root("flood_of_new_flows_does_not_evict_an_idle_connection") {
        return;
    }
    let t = Topology::new(&unique_tag("nct-flood"), &["app1", "app2", "db"]);
    let pins = PinDir::unique("nct-flood");
    // Small conntrack: 1024 established, 1024 new. app1 takes nothing in (db's push passes only
    // as a reply); db takes TCP 5432 from app1 and any UDP from app2; app2 is not policed.
    const CT: u32 = 1024;
    let mut p = DatapathPlan {
        ct_entries: Some(CT),
        ..DatapathPlan::default()
    };
    p.container(t.container("app1"), APP1, true, false);
    p.container(t.container("app2"), APP2, false, false);
    p.container(t.container("db"), DB, true, false);
    p.policy
        .push(PlanPolicy::allow_in(DB, APP1, proto::TCP, PG, 1));
    p.policy.push(PlanPolicy {
        prefix_len: netpol_common::policy::PREFIX_ANY_PORT,
        ..PlanPolicy::allow_in(DB, APP2, proto::UDP, 0, 2)
    });
    load(&pins, &t, &p);
    let _dp = adopt(&t, pins.path());

    // The maps have one LRU list each: capacity does not shrink with the number of CPUs.
    for name in [maps::CT4, maps::CT4_NEW] {
        let info = MapData::from_pin(pins.path().join(name))
            .and_then(|m| m.info())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(info.map_flags(), 0, "{name} has no per-CPU LRU split");
        assert_eq!(info.max_entries(), CT, "{name} size");
    }

    // An idle long-lived connection app1 → db.
    let db_addr = SocketAddr::new(IpAddr::V4(v4(&t, "db")), PG);
    let listener = push_server(&t.container("db").ns, db_addr);
    let app1_ns = t.container("app1").ns.clone();
    let mut client = app1_ns
        .run_in(move || TcpStream::connect_timeout(&db_addr, Duration::from_secs(5)))
        .expect("app1 connects to db");
    let (mut server, _) = listener.accept().expect("accept");
    client.write_all(b"hello").expect("write");
    let mut buf = [0u8; 5];
    server.read_exact(&mut buf).expect("db reads");

    // A spray of new flows at db, 24 times the new-flow table, two packets each (so that their
    // entries are referenced again, as the idle connection's were, and an LRU cannot tell them
    // apart by use alone).
    let flood = udp(&t.container("app2").ns, (v4(&t, "app2"), 0).into());
    let n = 24 * CT;
    for i in 0..n {
        let port = 10_000 + (i % 50_000) as u16;
        for _ in 0..2 {
            let _ = flood.send_to(b"x", SocketAddr::new(IpAddr::V4(v4(&t, "db")), port));
        }
    }
    // The flood really overflowed the new-flow table (the test is not vacuous) ...
    let new_entries = {
        let m = MapData::from_pin(pins.path().join(maps::CT4_NEW))
            .and_then(Map::from_map_data)
            .expect("CT4_NEW");
        let h: HashMap<_, CtKey4, CtEntry> = HashMap::try_from(&m).expect("hash");
        h.keys().count() as u32
    };
    assert!(
        new_entries <= CT && n > 2 * CT,
        "{n} new flows into {CT} entries ({new_entries} left)"
    );

    // ... and db's server push on the idle connection still reaches app1.
    server.write_all(b"server push").expect("push");
    client
        .set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    let mut got = [0u8; 11];
    client
        .read_exact(&mut got)
        .expect("app1 receives db's push after the flood");
    assert_eq!(&got, b"server push");
    // Nothing of the connection was dropped on the way (a retransmission would hide it). Only
    // TCP drops count: the namespaces' own IGMP reports to 224.0.0.22, sent at random moments
    // after their links come up, are dropped by the enforced endpoints as they should be.
    let events = MapData::from_pin(pins.path().join(maps::EVENTS))
        .and_then(Map::from_map_data)
        .expect("EVENTS");
    let mut rb = aya::maps::RingBuf::try_from(events).expect("EVENTS is a ring buffer");
    let mut tcp_drops = Vec::new();
    while let Some(item) = rb.next() {
        assert!(
            item.len() >= std::mem::size_of::<FlowEvent>(),
            "short event"
        );
        // SAFETY: the ring buffer holds `FlowEvent`s (checked length; read unaligned).
        let ev: FlowEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
        if ev.kind == FlowEvent::KIND_DROP && ev.proto == proto::TCP {
            tcp_drops.push(ev);
        }
    }
    assert!(
        tcp_drops.is_empty(),
        "packets of the connection were dropped: {tcp_drops:?}"
    );
}

/// `bpf(2)`, for maps of a former layout that no object of this build has.
fn bpf(cmd: libc::c_long, attr: &mut [u64; 16]) -> i64 {
    // SAFETY: attr is a zeroed, large enough `union bpf_attr` for the commands used here.
    unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            std::mem::size_of_val(attr),
        )
    }
}

/// Creates a map (`BPF_MAP_CREATE`) and pins it at `path`; returns its fd.
fn legacy_map(path: &Path, ty: u32, key: u32, value: u32, max: u32, flags: u32) -> i32 {
    let mut a = [0u64; 16];
    a[0] = u64::from(ty) | u64::from(key) << 32;
    a[1] = u64::from(value) | u64::from(max) << 32;
    a[2] = u64::from(flags);
    let fd = bpf(0, &mut a);
    assert!(
        fd >= 0,
        "BPF_MAP_CREATE: {}",
        std::io::Error::last_os_error()
    );
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("path");
    let mut a = [0u64; 16];
    a[0] = c.as_ptr() as u64;
    a[1] = fd as u64;
    assert_eq!(
        bpf(6, &mut a),
        0,
        "BPF_OBJ_PIN {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    fd as i32
}

fn legacy_put(fd: i32, key: &[u8], value: &[u8]) {
    let mut a = [0u64; 16];
    a[0] = fd as u64;
    a[1] = key.as_ptr() as u64;
    a[2] = value.as_ptr() as u64;
    assert_eq!(
        bpf(2, &mut a),
        0,
        "BPF_MAP_UPDATE_ELEM: {}",
        std::io::Error::last_os_error()
    );
}

/// An agent that finds the maps of the former conntrack and ipcache layouts pinned (`CT4`,
/// `IPCACHE4`; conntrack v2 `CT4_V2`) copies them into the current ones before its programs take
/// over, ties each v1 conntrack entry to the endpoint holding its local address, keys every
/// flow from its endpoint's side with the opening side in the entry (v3), and removes the old
/// pins.
#[test]
fn an_old_layout_is_copied_on_upgrade() {
    if !require_root("an_old_layout_is_copied_on_upgrade") {
        return;
    }
    use netpol_common::{ct::CtDir, endpoint::Endpoint, ipcache::RemoteInfo};
    /// A key of layouts v1 and v2: the opening packet's tuple and the side that admitted it.
    fn old_key(s: [u8; 4], d: [u8; 4], sport: u16, dport: u16, dir: CtDir) -> [u8; 16] {
        let mut k = [0u8; 16];
        k[0..4].copy_from_slice(&s);
        k[4..8].copy_from_slice(&d);
        k[8..10].copy_from_slice(&sport.to_be_bytes());
        k[10..12].copy_from_slice(&dport.to_be_bytes());
        k[12] = proto::TCP;
        k[13] = dir as u8;
        k
    }
    let pins = PinDir::unique("nct-upgrade");
    let (db, app1, ifindex) = ([10, 9, 0, 2], [10, 9, 0, 3], 4242);
    {
        let mut dp = KernelDatapath::open(pins.path(), MapSizes::default()).expect("open");
        dp.upsert_endpoint(ifindex, Endpoint::new(DB).with_ipv4(db))
            .expect("endpoint");
    }
    // The former layouts: CtEntry v1 { expires_ns, flags, rule }, RemoteInfo v1 { identity, _pad }.
    let ct = legacy_map(&pins.path().join("CT4"), 9, 16, 16, 1024, 0);
    let ipc = legacy_map(&pins.path().join("IPCACHE4"), 11, 8, 8, 64, 1);
    let kb = old_key(app1, db, 40000, PG, CtDir::Ingress);
    let key = CtKey4::new(db, app1, PG, 40000, proto::TCP);
    let mut v = Vec::new();
    v.extend_from_slice(&u64::MAX.to_ne_bytes());
    v.extend_from_slice(&1u32.to_ne_bytes()); // SEEN_REPLY
    v.extend_from_slice(&7u32.to_ne_bytes());
    legacy_put(ct, &kb, &v);
    let mut lk = 32u32.to_ne_bytes().to_vec();
    lk.extend_from_slice(&app1);
    let mut lv = APP1.to_ne_bytes().to_vec();
    lv.extend_from_slice(&[0; 4]);
    legacy_put(ipc, &lk, &lv);
    // Conntrack v2 (the current `CtEntry` without `dir`): db's own flow out to app1:80.
    let ct2 = legacy_map(&pins.path().join("CT4_V2"), 9, 16, 40, 1024, 0);
    let v2 = CtEntry {
        expires_ns: u64::MAX,
        flags: CtEntry::SEEN_REPLY,
        rule: 3,
        ifindex,
        identity: DB,
        remote_identity: APP1,
        ..CtEntry::default()
    };
    // SAFETY: CtEntry is 40 bytes of plain data.
    let vb: [u8; 40] = unsafe { std::mem::transmute(v2) };
    legacy_put(ct2, &old_key(db, app1, 41000, 80, CtDir::Egress), &vb);
    // SAFETY: our own fds; the pins keep the maps.
    unsafe {
        libc::close(ct);
        libc::close(ipc);
        libc::close(ct2);
    }

    let dp = KernelDatapath::open(pins.path(), MapSizes::default()).expect("reopen");
    for old in ["CT4", "IPCACHE4", "CT4_V2"] {
        assert!(!pins.path().join(old).exists(), "old pin {old} removed");
    }
    let m = MapData::from_pin(pins.path().join(maps::CT4))
        .and_then(Map::from_map_data)
        .expect("CT4_V3");
    let h: HashMap<_, CtKey4, CtEntry> = HashMap::try_from(&m).expect("hash");
    let e = h
        .get(&key, 0)
        .expect("the answered flow is in the established table");
    assert_eq!(
        (
            e.ifindex,
            e.identity,
            e.remote_identity,
            e.rule,
            e.flags,
            e.dir
        ),
        (
            ifindex,
            DB,
            APP1,
            7,
            CtEntry::SEEN_REPLY,
            CtDir::Ingress as u8
        )
    );
    let e2 = h
        .get(&CtKey4::new(db, app1, 41000, 80, proto::TCP), 0)
        .expect("the v2 flow, keyed from db's side");
    assert_eq!(
        e2,
        CtEntry {
            dir: CtDir::Egress as u8,
            ..v2
        }
    );
    let state = dp.current().expect("current");
    let cidr = "10.9.0.3/32".parse().expect("cidr");
    assert_eq!(state.ipcache.get(&cidr), Some(&RemoteInfo::new(APP1)));
}

/// Issue 11: `to_container` takes a conntrack entry's recorded remote as the ipcache's only while
/// the ipcache is in the generation the entry recorded (netpol-common `ipcache`). The agent moves
/// `IPCACHE_GEN` to an odd generation before every ipcache write and to the next even one after
/// it, a failed one too, and on to a new even one when it opens the datapath (an older agent may
/// have written the ipcache without moving it, or one died in the middle of a write), and never
/// back: a restart goes on from the pinned generation.
#[test]
fn every_ipcache_write_moves_the_generation_on() {
    if !require_root("every_ipcache_write_moves_the_generation_on") {
        return;
    }
    use aya::maps::Array;
    use netpol_agent::datapath::Cidr;
    use netpol_common::ipcache::RemoteInfo;
    fn gen(pins: &Path) -> u32 {
        let m = MapData::from_pin(pins.join(maps::IPCACHE_GEN))
            .and_then(Map::from_map_data)
            .expect("IPCACHE_GEN");
        let a: Array<_, u32> = Array::try_from(&m).expect("array");
        a.get(&0, 0).expect("generation")
    }
    let cidr = |s: &str| -> Cidr { s.parse().expect("cidr") };
    let pins = PinDir::unique("nct-gen");
    let first = {
        let mut dp = KernelDatapath::open(pins.path(), MapSizes::default()).expect("open");
        let g0 = gen(pins.path());
        assert_ne!(g0, 0, "a datapath starts in a generation no entry holds");
        assert_eq!(g0 % 2, 0, "and not in a write's");
        dp.upsert_ipcache(cidr("10.9.0.3/32"), RemoteInfo::container(APP1, 21, 9))
            .expect("upsert");
        assert_eq!(gen(pins.path()), g0 + 2, "after an upsert");
        dp.upsert_ipcache(cidr("10.9.0.0/24"), RemoteInfo::new(identity::UNMANAGED))
            .expect("upsert");
        dp.delete_ipcache(cidr("10.9.0.3/32")).expect("delete");
        assert_eq!(gen(pins.path()), g0 + 6, "after two upserts and a delete");
        gen(pins.path())
    };
    let _dp = KernelDatapath::open(pins.path(), MapSizes::default()).expect("adopt");
    assert_eq!(
        gen(pins.path()),
        first + 2,
        "an adoption goes on from the pinned generation"
    );
}
