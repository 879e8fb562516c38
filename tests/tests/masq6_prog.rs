//! Tier 2: the IPv6 masquerade programs (`masq6_out`, `masq6_in`) through `BPF_PROG_TEST_RUN`.
//!
//! Each test loads its own unpinned copy of the object, configures `MASQ6_CONFIG` and
//! `MASQ6_PREFIX`, runs hand-made packets through the programs and checks the rewritten bytes.
//! Every checksum of a rewritten packet is verified by recomputing it from scratch here (outer
//! L4 over its pseudo-header, and for ICMPv6 errors the embedded packet's own L4 checksum too),
//! so an incremental update that is off by one bit fails the test.

use std::net::Ipv6Addr;

use aya::{
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, MapData, PerCpuArray},
    programs::{SchedClassifier, TestRun, TestRunOptions},
    Ebpf, EbpfLoader,
};
use netpol_agent::datapath::EBPF_OBJECT;
use netpol_common::{
    maps,
    nat::{
        self, Masq6Config, Masq6Counter, Masq6Prefix, Snat6Entry, Snat6Key, SNAT6_IN, SNAT6_OUT,
    },
    programs, proto,
};
use netpol_tests::require_root;

/// `TC_ACT_UNSPEC` (-1) as the kernel reports it.
const PASS: u32 = u32::MAX;
const SHOT: u32 = 2;

const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

fn ip(s: &str) -> [u8; 16] {
    s.parse::<Ipv6Addr>()
        .unwrap_or_else(|e| panic!("{s}: {e}"))
        .octets()
}

/// The uplink address, a masqueraded prefix, containers in it, remote hosts.
const UPLINK: &str = "2001:db8:1::2";
const ROUTER: &str = "2001:db8:1::1";
const PREFIX: &str = "fd00:42::";
const C1: &str = "fd00:42::2";
const C2: &str = "fd00:42::3";
const C3: &str = "fd00:42::4";
const SERVER: &str = "2001:db8:2::2";
const LOCAL_NET: &str = "fd00:99::";
const OTHER_NET: &str = "fd00:77::5";

// ---------------------------------------------------------------------------------------------
// Packets, with real checksums.

fn sum16(data: &[u8]) -> u32 {
    let mut s = 0u32;
    for c in data.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from_be_bytes([c[0], 0])
        };
        s += u32::from(w);
    }
    s
}

fn fold(mut s: u32) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

/// The L4 checksum of `l4` (its checksum field included as it is) over the IPv6 pseudo-header:
/// 0xffff (i.e. a folded sum of all ones) when the field is right.
fn l4_sum(src: &[u8], dst: &[u8], proto: u8, l4: &[u8]) -> u16 {
    let mut s = sum16(src) + sum16(dst);
    s += (l4.len() as u32 >> 16) + (l4.len() as u32 & 0xffff);
    s += u32::from(proto);
    s += sum16(l4);
    fold(s)
}

/// Fills in the checksum at `csum_at` of `l4`.
fn fill_csum(src: &[u8; 16], dst: &[u8; 16], proto: u8, l4: &mut [u8], csum_at: usize) {
    l4[csum_at] = 0;
    l4[csum_at + 1] = 0;
    let mut c = !l4_sum(src, dst, proto, l4);
    if proto == proto::UDP && c == 0 {
        c = 0xffff;
    }
    l4[csum_at..csum_at + 2].copy_from_slice(&c.to_be_bytes());
}

fn tcp(
    src: &[u8; 16],
    dst: &[u8; 16],
    sport: u16,
    dport: u16,
    flags: u8,
    payload: &[u8],
) -> Vec<u8> {
    let mut t = vec![0u8; 20];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = flags;
    t[14..16].copy_from_slice(&64240u16.to_be_bytes());
    t.extend_from_slice(payload);
    fill_csum(src, dst, proto::TCP, &mut t, 16);
    t
}

fn udp(src: &[u8; 16], dst: &[u8; 16], sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut u = vec![0u8; 8];
    u[0..2].copy_from_slice(&sport.to_be_bytes());
    u[2..4].copy_from_slice(&dport.to_be_bytes());
    u[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    u.extend_from_slice(payload);
    fill_csum(src, dst, proto::UDP, &mut u, 6);
    u
}

fn icmp6(src: &[u8; 16], dst: &[u8; 16], ty: u8, code: u8, word: u32, body: &[u8]) -> Vec<u8> {
    let mut m = vec![ty, code, 0, 0];
    m.extend_from_slice(&word.to_be_bytes());
    m.extend_from_slice(body);
    fill_csum(src, dst, proto::ICMPV6, &mut m, 2);
    m
}

fn echo(src: &[u8; 16], dst: &[u8; 16], request: bool, id: u16, seq: u16) -> Vec<u8> {
    let ty = if request { 128 } else { 129 };
    let word = (u32::from(id) << 16) | u32::from(seq);
    icmp6(src, dst, ty, 0, word, b"netpol masq6 ping")
}

fn ipv6(src: &[u8; 16], dst: &[u8; 16], next: u8, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0x60, 0, 0, 0];
    p.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    p.push(next);
    p.push(64);
    p.extend_from_slice(src);
    p.extend_from_slice(dst);
    p.extend_from_slice(payload);
    p
}

fn eth(payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2, 0x86, 0xdd];
    f.extend_from_slice(payload);
    f
}

fn frame(src: &str, dst: &str, next: u8, l4: impl Fn(&[u8; 16], &[u8; 16]) -> Vec<u8>) -> Vec<u8> {
    let (s, d) = (ip(src), ip(dst));
    eth(&ipv6(&s, &d, next, &l4(&s, &d)))
}

/// A parsed frame as the tests check it: addresses, L4 bytes.
struct Seen {
    src: [u8; 16],
    dst: [u8; 16],
    next: u8,
    l4: Vec<u8>,
}

impl Seen {
    fn parse(f: &[u8]) -> Self {
        assert!(f.len() >= 54, "short frame: {} bytes", f.len());
        assert_eq!(&f[12..14], &[0x86, 0xdd]);
        let ip6 = &f[14..];
        let plen = usize::from(u16::from_be_bytes([ip6[4], ip6[5]]));
        assert_eq!(ip6.len(), 40 + plen, "payload length");
        let mut src = [0; 16];
        let mut dst = [0; 16];
        src.copy_from_slice(&ip6[8..24]);
        dst.copy_from_slice(&ip6[24..40]);
        Self {
            src,
            dst,
            next: ip6[6],
            l4: ip6[40..].to_vec(),
        }
    }

    fn sport(&self) -> u16 {
        u16::from_be_bytes([self.l4[0], self.l4[1]])
    }

    fn dport(&self) -> u16 {
        u16::from_be_bytes([self.l4[2], self.l4[3]])
    }

    fn echo_id(&self) -> u16 {
        u16::from_be_bytes([self.l4[4], self.l4[5]])
    }

    /// Recomputes the L4 checksum and asserts the packet carries the right one.
    fn assert_csum(&self, what: &str) {
        assert_eq!(
            l4_sum(&self.src, &self.dst, self.next, &self.l4),
            0xffff,
            "{what}: the L4 checksum is wrong after translation"
        );
    }

    /// The packet embedded in an ICMPv6 error.
    fn inner(&self) -> Seen {
        assert!(matches!(self.l4[0], 1..=4), "not an ICMPv6 error");
        let ip6 = &self.l4[8..];
        let mut src = [0; 16];
        let mut dst = [0; 16];
        src.copy_from_slice(&ip6[8..24]);
        dst.copy_from_slice(&ip6[24..40]);
        Seen {
            src,
            dst,
            next: ip6[6],
            l4: ip6[40..].to_vec(),
        }
    }
}

fn a(s: &str) -> Ipv6Addr {
    s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
}

fn show(addr: &[u8; 16]) -> Ipv6Addr {
    Ipv6Addr::from(*addr)
}

// ---------------------------------------------------------------------------------------------
// The object under test.

struct Masq {
    ebpf: Ebpf,
}

impl Masq {
    fn load(port_min: u16, port_max: u16) -> Self {
        let mut loader = EbpfLoader::new();
        for (name, size) in [
            (maps::ENDPOINTS, 1),
            (maps::IPCACHE4, 1),
            (maps::IPCACHE6, 1),
            (maps::POLICY, 1),
            (maps::CT4, 1),
            (maps::CT6, 1),
            (maps::EVENTS, 4096),
            (maps::SNAT6, 1024),
        ] {
            loader.map_max_entries(name, size);
        }
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .unwrap_or_else(|e| panic!("loading the object: {e}"));
        for name in [programs::MASQ6_OUT, programs::MASQ6_IN] {
            let p: &mut SchedClassifier = ebpf
                .program_mut(name)
                .unwrap_or_else(|| panic!("no program {name}"))
                .try_into()
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            p.load().unwrap_or_else(|e| panic!("loading {name}: {e:?}"));
        }
        let mut m = Self { ebpf };
        let mut cfg: Array<&mut MapData, Masq6Config> = Array::try_from(
            m.ebpf
                .map_mut(maps::MASQ6_CONFIG)
                .unwrap_or_else(|| panic!("no MASQ6_CONFIG")),
        )
        .unwrap_or_else(|e| panic!("MASQ6_CONFIG: {e}"));
        cfg.set(
            0,
            Masq6Config {
                addr: ip(UPLINK),
                port_min,
                port_max,
                flags: Masq6Config::ENABLED | Masq6Config::RESERVE_HOST_PORTS,
                l2_len: 14,
                _pad: 0,
            },
            0,
        )
        .unwrap_or_else(|e| panic!("MASQ6_CONFIG: {e}"));
        m.prefix(PREFIX, 64, Masq6Prefix::MASQUERADE);
        m.prefix(LOCAL_NET, 64, Masq6Prefix::LOCAL);
        m
    }

    fn prefix(&mut self, p: &str, len: u32, kind: u32) {
        let mut t: LpmTrie<&mut MapData, [u8; 16], Masq6Prefix> = LpmTrie::try_from(
            self.ebpf
                .map_mut(maps::MASQ6_PREFIXES)
                .unwrap_or_else(|| panic!("no MASQ6_PREFIX")),
        )
        .unwrap_or_else(|e| panic!("MASQ6_PREFIX: {e}"));
        t.insert(&Key::new(len, ip(p)), Masq6Prefix { kind }, 0)
            .unwrap_or_else(|e| panic!("MASQ6_PREFIX: {e}"));
    }

    /// Runs `frame` through `masq6_out` (egress) or `masq6_in`: verdict and resulting frame.
    fn run(&self, egress: bool, frame: &[u8]) -> (u32, Vec<u8>) {
        let name = if egress {
            programs::MASQ6_OUT
        } else {
            programs::MASQ6_IN
        };
        let p: &SchedClassifier = self
            .ebpf
            .program(name)
            .unwrap_or_else(|| panic!("no program {name}"))
            .try_into()
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let mut out = vec![0u8; frame.len() + 256];
        let mut opts = TestRunOptions::default();
        opts.data_in = Some(frame);
        opts.data_out = Some(&mut out);
        let r = p
            .test_run(opts)
            .unwrap_or_else(|e| panic!("test run of {name}: {e:?}"));
        out.truncate(r.data_size_out as usize);
        (r.return_value, out)
    }

    fn out(&self, frame: &[u8]) -> Seen {
        let (v, f) = self.run(true, frame);
        assert_eq!(v, PASS, "masq6_out verdict");
        Seen::parse(&f)
    }

    fn inn(&self, frame: &[u8]) -> Seen {
        let (v, f) = self.run(false, frame);
        assert_eq!(v, PASS, "masq6_in verdict");
        Seen::parse(&f)
    }

    fn counter(&self, c: Masq6Counter) -> u64 {
        let m: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(
            self.ebpf
                .map(nat::maps::MASQ6_STATS)
                .unwrap_or_else(|| panic!("no MASQ6_STATS")),
        )
        .unwrap_or_else(|e| panic!("MASQ6_STATS: {e}"));
        m.get(&(c as u32), 0)
            .unwrap_or_else(|e| panic!("MASQ6_STATS: {e}"))
            .iter()
            .sum()
    }

    /// Writes (`Some`) or removes an `SNAT6` entry, as the LRU's eviction would.
    fn set_snat(&mut self, k: Snat6Key, v: Option<Snat6Entry>) {
        let mut m: HashMap<&mut MapData, Snat6Key, Snat6Entry> = HashMap::try_from(
            self.ebpf
                .map_mut(maps::SNAT6)
                .unwrap_or_else(|| panic!("no SNAT6")),
        )
        .unwrap_or_else(|e| panic!("SNAT6: {e}"));
        match v {
            Some(v) => m.insert(k, v, 0).unwrap_or_else(|e| panic!("SNAT6: {e}")),
            None => m.remove(&k).unwrap_or_else(|e| panic!("SNAT6: {e}")),
        }
    }

    fn snat(&self) -> Vec<(Snat6Key, Snat6Entry)> {
        let m: HashMap<&MapData, Snat6Key, Snat6Entry> = HashMap::try_from(
            self.ebpf
                .map(maps::SNAT6)
                .unwrap_or_else(|| panic!("no SNAT6")),
        )
        .unwrap_or_else(|e| panic!("SNAT6: {e}"));
        m.iter()
            .map(|r| r.unwrap_or_else(|e| panic!("SNAT6: {e}")))
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------

#[test]
fn tcp_source_is_rewritten_and_replies_come_back() {
    if !require_root("masq6_prog::tcp_source_is_rewritten_and_replies_come_back") {
        return;
    }
    let m = Masq::load(61000, 61009);
    let syn = frame(C1, SERVER, proto::TCP, |s, d| {
        tcp(s, d, 40000, 80, TCP_SYN, b"")
    });
    let o = m.out(&syn);
    assert_eq!(show(&o.src), a(UPLINK), "source becomes the uplink address");
    assert_eq!(show(&o.dst), a(SERVER), "destination untouched");
    assert_eq!(o.sport(), 40000, "a free original port is kept");
    assert_eq!(o.dport(), 80);
    o.assert_csum("outbound SYN");

    // Both entries of the flow.
    let snat = m.snat();
    let out_k = Snat6Key::new(ip(C1), ip(SERVER), 40000, 80, proto::TCP, SNAT6_OUT);
    let in_k = Snat6Key::new(ip(SERVER), ip(UPLINK), 80, 40000, proto::TCP, SNAT6_IN);
    let out_v = snat.iter().find(|(k, _)| *k == out_k).map(|(_, v)| *v);
    let in_v = snat.iter().find(|(k, _)| *k == in_k).map(|(_, v)| *v);
    let out_v = out_v.unwrap_or_else(|| panic!("no out entry in {snat:?}"));
    let in_v = in_v.unwrap_or_else(|| panic!("no in entry in {snat:?}"));
    assert_eq!((out_v.addr, out_v.port()), (ip(UPLINK), 40000));
    assert_eq!((in_v.addr, in_v.port()), (ip(C1), 40000));
    assert!(out_v.expires_ns > 0 && in_v.flags & Snat6Entry::SEEN_REPLY == 0);

    // The SYN-ACK, with a payload so the checksum covers more than the header.
    let synack = frame(SERVER, UPLINK, proto::TCP, |s, d| {
        tcp(s, d, 80, 40000, TCP_SYN | TCP_ACK, b"hello from the server")
    });
    let r = m.inn(&synack);
    assert_eq!(show(&r.dst), a(C1), "reply goes back to the container");
    assert_eq!(show(&r.src), a(SERVER));
    assert_eq!(r.dport(), 40000);
    r.assert_csum("inbound SYN-ACK");
    let in_v = m
        .snat()
        .into_iter()
        .find(|(k, _)| *k == in_k)
        .map(|(_, v)| v)
        .unwrap_or_else(|| panic!("in entry gone"));
    assert!(
        in_v.flags & Snat6Entry::SEEN_REPLY != 0,
        "the reply is recorded"
    );

    // The ACK of the established flow uses the same mapping.
    let ack = frame(C1, SERVER, proto::TCP, |s, d| {
        tcp(s, d, 40000, 80, TCP_ACK, b"GET /")
    });
    let o = m.out(&ack);
    assert_eq!((show(&o.src), o.sport()), (a(UPLINK), 40000));
    o.assert_csum("outbound ACK");
    assert_eq!(m.counter(Masq6Counter::NewMapping), 1);
    assert_eq!(m.counter(Masq6Counter::Out), 2);
    assert_eq!(m.counter(Masq6Counter::In), 1);
}

#[test]
fn colliding_source_ports_get_a_port_from_the_range() {
    if !require_root("masq6_prog::colliding_source_ports_get_a_port_from_the_range") {
        return;
    }
    let m = Masq::load(61000, 61009);
    let o1 = m.out(&frame(C1, SERVER, proto::TCP, |s, d| {
        tcp(s, d, 40000, 443, TCP_SYN, b"")
    }));
    assert_eq!(o1.sport(), 40000);
    // Another container, same source port, same server and port: the tuple is taken.
    let o2 = m.out(&frame(C2, SERVER, proto::TCP, |s, d| {
        tcp(s, d, 40000, 443, TCP_SYN, b"")
    }));
    assert_eq!(show(&o2.src), a(UPLINK));
    let p2 = o2.sport();
    assert!(
        (61000..=61009).contains(&p2),
        "collision: port {p2} not from the range"
    );
    o2.assert_csum("rewritten port");
    // Same source port to another server port: no collision, no rewrite (endpoint-dependent).
    let o3 = m.out(&frame(C2, SERVER, proto::TCP, |s, d| {
        tcp(s, d, 40000, 8443, TCP_SYN, b"")
    }));
    assert_eq!(o3.sport(), 40000);
    assert_eq!(m.counter(Masq6Counter::PortRewritten), 1);

    // Replies reach the right container with the right port.
    let r1 = m.inn(&frame(SERVER, UPLINK, proto::TCP, |s, d| {
        tcp(s, d, 443, 40000, TCP_SYN | TCP_ACK, b"")
    }));
    assert_eq!((show(&r1.dst), r1.dport()), (a(C1), 40000));
    r1.assert_csum("reply to C1");
    let r2 = m.inn(&frame(SERVER, UPLINK, proto::TCP, |s, d| {
        tcp(s, d, 443, p2, TCP_SYN | TCP_ACK, b"x")
    }));
    assert_eq!((show(&r2.dst), r2.dport()), (a(C2), 40000));
    r2.assert_csum("reply to C2");
    // The second container's later packets keep their translated port.
    let o2b = m.out(&frame(C2, SERVER, proto::TCP, |s, d| {
        tcp(s, d, 40000, 443, TCP_ACK, b"y")
    }));
    assert_eq!(o2b.sport(), p2);
    o2b.assert_csum("established, rewritten port");
}

#[test]
fn an_exhausted_range_drops_and_counts() {
    if !require_root("masq6_prog::an_exhausted_range_drops_and_counts") {
        return;
    }
    let m = Masq::load(61000, 61000);
    let pkt = |c: &str| frame(c, SERVER, proto::UDP, |s, d| udp(s, d, 5353, 53, b"q"));
    assert_eq!(m.out(&pkt(C1)).sport(), 5353);
    assert_eq!(m.out(&pkt(C2)).sport(), 61000);
    let (verdict, _) = m.run(true, &pkt(C3));
    assert_eq!(verdict, SHOT, "no free port: dropped");
    assert_eq!(m.counter(Masq6Counter::NoPort), 1);
}

#[test]
fn udp_and_echo_are_translated_with_checksums() {
    if !require_root("masq6_prog::udp_and_echo_are_translated_with_checksums") {
        return;
    }
    let m = Masq::load(61000, 61009);
    let q = m.out(&frame(C1, SERVER, proto::UDP, |s, d| {
        udp(s, d, 33000, 53, b"a question")
    }));
    assert_eq!((show(&q.src), q.sport()), (a(UPLINK), 33000));
    q.assert_csum("UDP out");
    let r = m.inn(&frame(SERVER, UPLINK, proto::UDP, |s, d| {
        udp(s, d, 53, 33000, b"an answer!")
    }));
    assert_eq!((show(&r.dst), r.dport()), (a(C1), 33000));
    r.assert_csum("UDP in");

    // Echo: identifiers play the part of ports.
    let e1 = m.out(&frame(C1, SERVER, proto::ICMPV6, |s, d| {
        echo(s, d, true, 7, 1)
    }));
    assert_eq!((show(&e1.src), e1.echo_id()), (a(UPLINK), 7));
    e1.assert_csum("echo request C1");
    let e2 = m.out(&frame(C2, SERVER, proto::ICMPV6, |s, d| {
        echo(s, d, true, 7, 1)
    }));
    let id2 = e2.echo_id();
    assert!(
        (61000..=61009).contains(&id2),
        "identifier {id2} not from the range"
    );
    e2.assert_csum("echo request C2, new identifier");
    let r2 = m.inn(&frame(SERVER, UPLINK, proto::ICMPV6, |s, d| {
        echo(s, d, false, id2, 1)
    }));
    assert_eq!((show(&r2.dst), r2.echo_id()), (a(C2), 7));
    r2.assert_csum("echo reply to C2");
    let r1 = m.inn(&frame(SERVER, UPLINK, proto::ICMPV6, |s, d| {
        echo(s, d, false, 7, 1)
    }));
    assert_eq!((show(&r1.dst), r1.echo_id()), (a(C1), 7));
    r1.assert_csum("echo reply to C1");
}

#[test]
fn icmp_errors_are_translated_with_the_embedded_packet() {
    if !require_root("masq6_prog::icmp_errors_are_translated_with_the_embedded_packet") {
        return;
    }
    let m = Masq::load(61000, 61009);
    // C1 holds 40000 → SERVER:80; C2's flow gets a port from the range.
    m.out(&frame(C1, SERVER, proto::TCP, |s, d| {
        tcp(s, d, 40000, 80, TCP_SYN, b"")
    }));
    let o = m.out(&frame(C2, SERVER, proto::TCP, |s, d| {
        tcp(s, d, 40000, 80, TCP_ACK, b"a large segment")
    }));
    let p2 = o.sport();
    assert_ne!(p2, 40000);

    // A router reports "packet too big" about C2's translated segment, quoting it whole.
    let quoted = {
        let (s, d) = (ip(UPLINK), ip(SERVER));
        ipv6(
            &s,
            &d,
            proto::TCP,
            &tcp(&s, &d, p2, 80, TCP_ACK, b"a large segment"),
        )
    };
    let ptb = frame(ROUTER, UPLINK, proto::ICMPV6, |s, d| {
        icmp6(s, d, 2, 0, 1280, &quoted)
    });
    let t = m.inn(&ptb);
    assert_eq!(show(&t.dst), a(C2), "the error goes to the container");
    assert_eq!(show(&t.src), a(ROUTER));
    assert_eq!(t.l4[0], 2);
    assert_eq!(
        u32::from_be_bytes([t.l4[4], t.l4[5], t.l4[6], t.l4[7]]),
        1280,
        "MTU kept"
    );
    t.assert_csum("outer ICMPv6 of packet-too-big");
    let inner = t.inner();
    assert_eq!(show(&inner.src), a(C2), "embedded source translated back");
    assert_eq!(show(&inner.dst), a(SERVER));
    assert_eq!((inner.sport(), inner.dport()), (40000, 80));
    inner.assert_csum("embedded TCP segment");

    // Time exceeded about an echo request, quoting only the first 8 bytes of ICMPv6.
    let e = m.out(&frame(C2, SERVER, proto::ICMPV6, |s, d| {
        echo(s, d, true, 9, 1)
    }));
    let id = e.echo_id();
    let quoted = {
        let (s, d) = (ip(UPLINK), ip(SERVER));
        ipv6(&s, &d, proto::ICMPV6, &echo(&s, &d, true, id, 1))
    };
    let te = frame(ROUTER, UPLINK, proto::ICMPV6, |s, d| {
        icmp6(s, d, 3, 0, 0, &quoted)
    });
    let t = m.inn(&te);
    assert_eq!(show(&t.dst), a(C2));
    t.assert_csum("outer ICMPv6 of time-exceeded");
    let inner = t.inner();
    assert_eq!((show(&inner.src), inner.echo_id()), (a(C2), 9));
    inner.assert_csum("embedded echo request");

    // The other way: C1 reports "port unreachable" about a UDP reply it received.
    let q = m.out(&frame(C2, SERVER, proto::UDP, |s, d| {
        udp(s, d, 40000, 53, b"q")
    }));
    assert_eq!(q.sport(), 40000);
    let qc1 = m.out(&frame(C1, SERVER, proto::UDP, |s, d| {
        udp(s, d, 40000, 53, b"q")
    }));
    let pu = qc1.sport();
    assert_ne!(pu, 40000);
    let quoted = {
        let (s, d) = (ip(SERVER), ip(C1));
        ipv6(&s, &d, proto::UDP, &udp(&s, &d, 53, 40000, b"late answer"))
    };
    let unreach = frame(C1, SERVER, proto::ICMPV6, |s, d| {
        icmp6(s, d, 1, 4, 0, &quoted)
    });
    let t = m.out(&unreach);
    assert_eq!(
        show(&t.src),
        a(UPLINK),
        "the error leaves from the uplink address"
    );
    t.assert_csum("outer ICMPv6 of port-unreachable");
    let inner = t.inner();
    assert_eq!((show(&inner.dst), inner.dport()), (a(UPLINK), pu));
    assert_eq!((show(&inner.src), inner.sport()), (a(SERVER), 53));
    inner.assert_csum("embedded UDP datagram");
    assert_eq!(m.counter(Masq6Counter::IcmpError), 3);
}

#[test]
fn local_and_unconfigured_traffic_is_left_alone() {
    if !require_root("masq6_prog::local_and_unconfigured_traffic_is_left_alone") {
        return;
    }
    let m = Masq::load(61000, 61009);
    let cases = [
        (
            "container to container",
            frame(C1, C2, proto::TCP, |s, d| tcp(s, d, 1, 2, TCP_SYN, b"")),
        ),
        (
            "to a local prefix",
            frame(C1, "fd00:99::1", proto::UDP, |s, d| udp(s, d, 1, 2, b"")),
        ),
        (
            "unconfigured prefix",
            frame(OTHER_NET, SERVER, proto::UDP, |s, d| udp(s, d, 1, 2, b"")),
        ),
    ];
    for (what, f) in &cases {
        let (v, out) = m.run(true, f);
        assert_eq!(v, PASS, "{what}");
        assert_eq!(&out, f, "{what}: bytes changed");
    }
    // Inbound to the uplink address without a mapping: the host's.
    let f = frame(SERVER, UPLINK, proto::TCP, |s, d| {
        tcp(s, d, 80, 22, TCP_SYN, b"")
    });
    let (v, out) = m.run(false, &f);
    assert_eq!((v, &out), (PASS, &f));
    // Inbound to another address.
    let f = frame(SERVER, C1, proto::TCP, |s, d| {
        tcp(s, d, 80, 40000, TCP_ACK, b"")
    });
    let (v, out) = m.run(false, &f);
    assert_eq!((v, &out), (PASS, &f));
    assert!(m.snat().is_empty(), "nothing was mapped: {:?}", m.snat());
}

#[test]
fn host_flows_are_reserved_and_never_translated() {
    if !require_root("masq6_prog::host_flows_are_reserved_and_never_translated") {
        return;
    }
    let m = Masq::load(61000, 61009);
    // The host opens UPLINK:45000 → SERVER:80 first.
    let h = frame(UPLINK, SERVER, proto::TCP, |s, d| {
        tcp(s, d, 45000, 80, TCP_SYN, b"")
    });
    let (v, out) = m.run(true, &h);
    assert_eq!((v, &out), (PASS, &h), "host packet untouched");
    // A container picks the same port to the same server: it must not get the host's tuple.
    let o = m.out(&frame(C1, SERVER, proto::TCP, |s, d| {
        tcp(s, d, 45000, 80, TCP_SYN, b"")
    }));
    assert_ne!(o.sport(), 45000, "container flow took the host's tuple");
    o.assert_csum("container flow beside a host flow");
    // The host's replies stay the host's.
    let r = frame(SERVER, UPLINK, proto::TCP, |s, d| {
        tcp(s, d, 80, 45000, TCP_SYN | TCP_ACK, b"")
    });
    let (v, out) = m.run(false, &r);
    assert_eq!((v, &out), (PASS, &r), "host reply untouched");
}

/// A container that holds a tuple first (here on purpose: its own source port in the host's
/// ephemeral range, to the server the host talks to) loses it to the host's flow: the host's
/// replies are never translated to the container, and the container's flow gets a new mapping.
#[test]
fn a_host_flow_takes_its_tuple_from_a_container_flow() {
    if !require_root("masq6_prog::a_host_flow_takes_its_tuple_from_a_container_flow") {
        return;
    }
    let m = Masq::load(61000, 61009);
    for (proto, host_port) in [(proto::TCP, 45000), (proto::UDP, 45001)] {
        let l4 = |sport: u16, dport: u16, syn: bool| {
            move |s: &[u8; 16], d: &[u8; 16]| {
                if proto == proto::TCP {
                    tcp(s, d, sport, dport, if syn { TCP_SYN } else { TCP_ACK }, b"")
                } else {
                    udp(s, d, sport, dport, b"x")
                }
            }
        };
        let o = m.out(&frame(C1, SERVER, proto, l4(host_port, 80, true)));
        assert_eq!((o.src, o.sport()), (ip(UPLINK), host_port), "{proto}");
        // The host opens UPLINK:host_port → SERVER:80: it reserves its tuple.
        let h = frame(UPLINK, SERVER, proto, l4(host_port, 80, true));
        let (v, out) = m.run(true, &h);
        assert_eq!((v, &out), (PASS, &h), "{proto}: host packet untouched");
        let r = frame(SERVER, UPLINK, proto, l4(80, host_port, false));
        let (v, out) = m.run(false, &r);
        assert_eq!(
            (v, &out),
            (PASS, &r),
            "{proto}: the host's reply went to the container"
        );
        // The container's next packet is not sent on the host's tuple.
        let o = m.out(&frame(C1, SERVER, proto, l4(host_port, 80, false)));
        assert_eq!(o.src, ip(UPLINK));
        assert_ne!(
            o.sport(),
            host_port,
            "{proto}: the container kept the host's tuple"
        );
        o.assert_csum("the container flow's new mapping");
    }
    assert_eq!(m.counter(Masq6Counter::HostConflict), 2);
}

/// When the LRU evicted a flow's *in* entry and another container's flow claimed the key (its
/// own source port, free again), the first flow's next refresh finds its partner foreign and
/// takes a new mapping: it does not go on sending on a tuple whose replies go to the other
/// container.
#[test]
fn a_flow_whose_reply_tuple_another_flow_claimed_is_mapped_anew() {
    if !require_root("masq6_prog::a_flow_whose_reply_tuple_another_flow_claimed_is_mapped_anew") {
        return;
    }
    let mut m = Masq::load(61000, 61009);
    let q = |src: &str| frame(src, SERVER, proto::UDP, |s, d| udp(s, d, 5000, 53, b"q"));
    assert_eq!(m.out(&q(C1)).sport(), 5000);
    let in_key = Snat6Key::new(ip(SERVER), ip(UPLINK), 53, 5000, proto::UDP, nat::SNAT6_IN);
    m.set_snat(in_key, None);
    assert_eq!(m.out(&q(C2)).sport(), 5000, "c2 claims the evicted key");
    // c1's out entry comes up for its refresh (a second has passed).
    let out_key = Snat6Key::new(ip(C1), ip(SERVER), 5000, 53, proto::UDP, nat::SNAT6_OUT);
    let (_, mut e) = m
        .snat()
        .into_iter()
        .find(|(k, _)| *k == out_key)
        .expect("c1's out entry");
    e.expires_ns -= 10_000_000_000;
    m.set_snat(out_key, Some(e));
    let o = m.out(&q(C1));
    assert_ne!(o.sport(), 5000, "c1 kept sending on c2's reply tuple");
    o.assert_csum("c1's new mapping");
    // Replies to each go to their own flow.
    let reply = |port: u16| frame(SERVER, UPLINK, proto::UDP, |s, d| udp(s, d, 53, port, b"a"));
    assert_eq!(m.inn(&reply(5000)).dst, ip(C2));
    assert_eq!(m.inn(&reply(o.sport())).dst, ip(C1));
}

/// A UDP datagram `src → dst` (real checksum) cut into IPv6 fragments of `chunk` bytes (a multiple
/// of 8) with identification `id`: the frames, first fragment first.
#[allow(clippy::too_many_arguments)]
fn udp_fragments(
    src: &str,
    dst: &str,
    sport: u16,
    dport: u16,
    payload: &[u8],
    id: u32,
    chunk: usize,
) -> Vec<Vec<u8>> {
    let (s, d) = (ip(src), ip(dst));
    let l4 = udp(&s, &d, sport, dport, payload);
    l4.chunks(chunk)
        .enumerate()
        .map(|(i, c)| {
            let off = i * chunk;
            let more = off + c.len() < l4.len();
            let mut fh = vec![proto::UDP, 0];
            fh.extend_from_slice(&((((off / 8) as u16) << 3) | u16::from(more)).to_be_bytes());
            fh.extend_from_slice(&id.to_be_bytes());
            fh.extend_from_slice(c);
            eth(&ipv6(&s, &d, 44, &fh))
        })
        .collect()
}

/// Reassembles fragments as a receiver would: the datagram's addresses (every fragment must carry
/// the same) and its L4 bytes.
fn reassemble(frames: &[Vec<u8>]) -> Seen {
    let mut r: Option<Seen> = None;
    for (i, f) in frames.iter().enumerate() {
        let ip6 = &f[14..];
        assert_eq!(ip6[6], 44, "fragment {i} has no fragment header");
        let (mut src, mut dst) = ([0; 16], [0; 16]);
        src.copy_from_slice(&ip6[8..24]);
        dst.copy_from_slice(&ip6[24..40]);
        let fh = &ip6[40..48];
        let off = usize::from(u16::from_be_bytes([fh[2], fh[3]]) >> 3) * 8;
        let s = r.get_or_insert_with(|| Seen {
            src,
            dst,
            next: fh[0],
            l4: Vec::new(),
        });
        assert_eq!(
            (show(&s.src), show(&s.dst)),
            (show(&src), show(&dst)),
            "fragment {i} carries other addresses than the first"
        );
        assert_eq!(off, s.l4.len(), "fragment {i} offset");
        s.l4.extend_from_slice(&ip6[48..]);
    }
    r.expect("no fragments")
}

#[test]
fn fragmented_datagrams_are_translated_whole() {
    if !require_root("masq6_prog::fragmented_datagrams_are_translated_whole") {
        return;
    }
    let m = Masq::load(61000, 61009);
    // C1 holds 33000 → SERVER:53, so C2's datagram from the same port gets another one: the first
    // fragment's port and checksum change, not only the address.
    m.out(&frame(C1, SERVER, proto::UDP, |s, d| {
        udp(s, d, 33000, 53, b"q")
    }));
    let payload: Vec<u8> = (0..3000u32).map(|i| (i * 7) as u8).collect();
    let query = udp_fragments(C2, SERVER, 33000, 53, &payload, 0x0102_0304, 1232);
    assert_eq!(query.len(), 3);

    // A later fragment before its first: nothing to go by, it passes untouched (and is counted).
    let (v, f) = m.run(true, &query[1]);
    assert_eq!((v, &f), (PASS, &query[1]), "out of order: untouched");
    assert_eq!(m.counter(Masq6Counter::Unparsed), 1);

    let out: Vec<Vec<u8>> = query
        .iter()
        .map(|f| {
            let (v, o) = m.run(true, f);
            assert_eq!(v, PASS);
            o
        })
        .collect();
    let q = reassemble(&out);
    assert_eq!((show(&q.src), show(&q.dst)), (a(UPLINK), a(SERVER)));
    let port = q.sport();
    assert!(
        (61000..=61009).contains(&port),
        "port {port} not from the range"
    );
    assert_eq!(q.dport(), 53);
    q.assert_csum("the reassembled datagram out");
    assert_eq!(&q.l4[8..], &payload[..], "payload");

    // The answer, fragmented by the server, goes back to C2 whole.
    let answer = udp_fragments(SERVER, UPLINK, 53, port, &payload, 0x0a0b_0c0d, 1232);
    let back: Vec<Vec<u8>> = answer
        .iter()
        .map(|f| {
            let (v, o) = m.run(false, f);
            assert_eq!(v, PASS);
            o
        })
        .collect();
    let r = reassemble(&back);
    assert_eq!((show(&r.src), show(&r.dst)), (a(SERVER), a(C2)));
    assert_eq!((r.sport(), r.dport()), (53, 33000));
    r.assert_csum("the reassembled datagram in");
    assert_eq!(&r.l4[8..], &payload[..]);

    // The identification alone does not place a fragment: the same one from another source, or
    // to another destination, is left alone.
    let stray_in = udp_fragments(OTHER_NET, UPLINK, 53, port, &payload, 0x0a0b_0c0d, 1232);
    let (v, f) = m.run(false, &stray_in[1]);
    assert_eq!(
        (v, &f),
        (PASS, &stray_in[1]),
        "another source, same id: untouched"
    );
    let stray_out = udp_fragments(C1, SERVER, 33000, 53, &payload, 0x0102_0304, 1232);
    let (v, f) = m.run(true, &stray_out[1]);
    assert_eq!(
        (v, &f),
        (PASS, &stray_out[1]),
        "another container, same id: untouched"
    );
    assert_eq!(m.counter(Masq6Counter::Out), 1 + 3);
    assert_eq!(m.counter(Masq6Counter::In), 3);
}

#[test]
fn icmp_errors_are_translated_only_when_tied_to_their_flow() {
    if !require_root("masq6_prog::icmp_errors_are_translated_only_when_tied_to_their_flow") {
        return;
    }
    let m = Masq::load(61000, 61009);
    let q = m.out(&frame(C1, SERVER, proto::UDP, |s, d| {
        udp(s, d, 40000, 53, b"q")
    }));
    let p = q.sport();
    // The quoted datagram as it left the uplink, with `pad` bytes of payload.
    let quoted = |pad: usize| {
        let (s, d) = (ip(UPLINK), ip(SERVER));
        ipv6(&s, &d, proto::UDP, &udp(&s, &d, p, 53, &vec![b'x'; pad]))
    };
    let error = |from: &str, ty: u8, code: u8, pad: usize| {
        frame(from, UPLINK, proto::ICMPV6, move |s, d| {
            icmp6(s, d, ty, code, 1280, &quoted(pad))
        })
    };
    let untouched = |what: &str, f: &[u8]| {
        let (v, out) = m.run(false, f);
        assert_eq!(
            (v, out.as_slice()),
            (PASS, f),
            "{what}: must stay the host's"
        );
    };
    // Port unreachable: only the quoted destination sends it.
    untouched("port unreachable from a router", &error(ROUTER, 1, 4, 1));
    let t = m.inn(&error(SERVER, 1, 4, 1));
    assert_eq!(show(&t.dst), a(C1), "port unreachable from the server");
    t.assert_csum("port unreachable from the server");
    // A path error from a router, up to 1280 bytes.
    let fill = 1280 - 40 - 8 - 40 - 8;
    let t = m.inn(&error(ROUTER, 2, 0, fill));
    assert_eq!(show(&t.dst), a(C1), "packet too big of 1280 bytes");
    t.assert_csum("packet too big of 1280 bytes");
    untouched("an error of 1281 bytes", &error(ROUTER, 2, 0, fill + 1));
    assert_eq!(m.counter(Masq6Counter::IcmpError), 2);

    // Outbound: the container's error must go back to the quoted packet's source.
    let unreach = |to: &str| {
        frame(C1, to, proto::ICMPV6, |s, d| {
            let (qs, qd) = (ip(SERVER), ip(C1));
            icmp6(
                s,
                d,
                1,
                4,
                0,
                &ipv6(&qs, &qd, proto::UDP, &udp(&qs, &qd, 53, 40000, b"late")),
            )
        })
    };
    let f = unreach("2001:db8:3::3");
    let (v, out) = m.run(true, &f);
    assert_eq!(
        (v, out.as_slice()),
        (PASS, f.as_slice()),
        "an error about the server's packet sent to a third host is not translated"
    );
    let t = m.out(&unreach(SERVER));
    assert_eq!(show(&t.src), a(UPLINK), "the error to the server is");
    t.assert_csum("port unreachable to the server");
    assert_eq!(m.counter(Masq6Counter::IcmpError), 3);
}
