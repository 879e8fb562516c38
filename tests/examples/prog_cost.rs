//! Average cost of one program run through BPF_PROG_TEST_RUN, for the common cases: a packet of
//! an established IPv4 / IPv6 TCP flow both ways (`repeat`), and the packets that open a flow,
//! each on a tuple of its own (one run each, the median): the SYN decided by policy, the SYN-ACK
//! answered from the new table, the handshake's last ACK (promotion to the established table);
//! on an endpoint that enforces both directions, on one that enforces neither, a SYN that
//! policy drops (what a flood costs), and a handshake that reopens a tuple whose established
//! entry is still there (a client reusing its port).
//! Run as root: `cargo run --release -p netpol-tests --example prog_cost [OBJ…]`;
//! `PEER_VETH=7 IPCACHE_EXTRA=2000` makes the peer a container behind a veth and the ipcache
//! as large as the datapath bench's. A single run is timed by the kernel around the program
//! alone, like `repeat`, but with cold caches between runs (the syscall and the next packet's
//! setup in between), as on a real new flow.

use aya::{
    maps::{lpm_trie::Key, HashMap, LpmTrie},
    programs::{ProgramError, SchedClassifier, TestRun, TestRunOptions},
    EbpfLoader,
};
use netpol_common::{endpoint::Endpoint, ipcache::RemoteInfo, policy::*, Direction};
use netpol_tests::packet::{self, TCP_ACK, TCP_SYN};

/// What is measured, in this order.
const CASES: [&str; 18] = [
    "ipv4 tcp established, from_container",
    "ipv4 tcp established reply, to_container",
    "ipv6 tcp established, from_container",
    "ipv6 tcp established reply, to_container",
    "ipv4 tcp SYN again (same tuple), from_container",
    "ipv6 tcp SYN again (same tuple), from_container",
    "ipv4 new flow: SYN, from_container",
    "ipv4 new flow: SYN-ACK, to_container",
    "ipv4 new flow: last ACK (promotion), from_container",
    "ipv4 new flow: SYN, to_container",
    "ipv6 new flow: SYN, from_container",
    "ipv6 new flow: last ACK (promotion), from_container",
    "ipv4 SYN denied by default deny, to_container",
    "unenforced: ipv4 tcp established, from_container",
    "unenforced: ipv4 tcp established reply, to_container",
    "unenforced: ipv4 new flow: SYN, from_container",
    "ipv4 reopened tuple: SYN over its established entry, from_container",
    "ipv4 reopened tuple: last ACK (promotion), from_container",
];

/// Fresh tuples per new-flow case and round.
const FRESH: u16 = 2000;

/// With object files as arguments, measures each of them in interleaved rounds and prints
/// medians (to compare two builds on a noisy machine); without, measures the built-in object.
fn main() -> Result<(), ProgramError> {
    let paths: Vec<String> = std::env::args().skip(1).collect();
    let objects: Vec<(String, Vec<u8>)> = if paths.is_empty() {
        vec![(
            "built-in".into(),
            netpol_agent::datapath::EBPF_OBJECT.to_vec(),
        )]
    } else {
        paths
            .iter()
            .map(|p| (p.clone(), std::fs::read(p).expect("read object")))
            .collect()
    };
    let rounds = if paths.is_empty() { 3 } else { 7 };
    let mut results: Vec<Vec<[u128; CASES.len()]>> = vec![Vec::new(); objects.len()];
    for _ in 0..rounds {
        for (i, (_, obj)) in objects.iter().enumerate() {
            results[i].push(measure(obj)?);
        }
    }
    let median = |i: usize, c: usize| {
        let mut v: Vec<u128> = results[i].iter().map(|r| r[c]).collect();
        v.sort_unstable();
        v[v.len() / 2]
    };
    if objects.len() == 1 {
        println!("{} (ns per run, median of {rounds} rounds):", objects[0].0);
        for (c, case) in CASES.iter().enumerate() {
            println!("  {case}: {}", median(0, c));
        }
        return Ok(());
    }
    println!("ns per run, median of {rounds} interleaved rounds:");
    for (i, (name, _)) in objects.iter().enumerate() {
        println!("  [{i}] {name}");
    }
    for (c, case) in CASES.iter().enumerate() {
        let v: Vec<String> = (0..objects.len())
            .map(|i| format!("{:>5}", median(i, c)))
            .collect();
        println!("  {case:<52} {}", v.join(" "));
    }
    Ok(())
}

/// One run of `prog` over `frame`, `repeat` times; its average duration (ns). Panics unless the
/// program returned `expect` (a pass is TC_ACT_UNSPEC, a drop TC_ACT_SHOT): another verdict
/// would measure the wrong path. `LOOSE=1` in the environment turns the check off (to time an
/// experimental object with a piece cut out, which may drop what it should pass).
fn run_expect(
    prog: &SchedClassifier,
    frame: &[u8],
    repeat: u32,
    what: &str,
    expect: u32,
) -> Result<u128, ProgramError> {
    let mut out = vec![0u8; frame.len() + 256];
    // struct __sk_buff up to `ifindex` (offset 40; the endpoint is the loopback device, 1), and
    // `ingress_ifindex` at 36.
    let mut ctx = [0u8; 44];
    ctx[40..44].copy_from_slice(&1u32.to_ne_bytes());
    let veth = peer_veth();
    if let Some(v) = veth {
        ctx[36..40].copy_from_slice(&v.to_ne_bytes());
    }
    let r = prog.test_run(TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        ctx_in: veth.map(|_| &ctx[..]),
        repeat,
        ..Default::default()
    })?;
    if std::env::var_os("LOOSE").is_none() {
        assert_eq!(r.return_value, expect, "{what}: unexpected verdict");
    }
    Ok(r.duration.as_nanos())
}

fn run(
    prog: &SchedClassifier,
    frame: &[u8],
    repeat: u32,
    what: &str,
) -> Result<u128, ProgramError> {
    run_expect(prog, frame, repeat, what, u32::MAX)
}

/// `PEER_VETH=N`: the peer (B) is a container behind host veth N (bridge N + 1), and every
/// packet comes in through that veth (`ingress_ifindex`); unset, the peer is an address without
/// interfaces and packets have no ingress interface.
fn peer_veth() -> Option<u32> {
    std::env::var("PEER_VETH").ok().and_then(|v| v.parse().ok())
}

/// `IPCACHE_EXTRA=N`: N more /32 identities in the ipcache trie (the datapath bench has 2,000).
fn ipcache_extra() -> u32 {
    std::env::var("IPCACHE_EXTRA")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn median(mut v: Vec<u128>) -> u128 {
    v.sort_unstable();
    v[v.len() / 2]
}

const A: [u8; 4] = [10, 0, 0, 1];
const B: [u8; 4] = [10, 0, 0, 2];
const A6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
const B6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
/// The endpoint's identity, the allowed peer's, a peer that nothing allows.
const LOCAL: u32 = 256;
const PEER: u32 = 257;
const STRANGER: u32 = 258;
const C: [u8; 4] = [10, 0, 0, 3];

fn set_endpoint(bpf: &mut aya::Ebpf, enforce: bool) {
    let mut eps: HashMap<_, u32, Endpoint> =
        HashMap::try_from(bpf.map_mut("ENDPOINTS").unwrap()).unwrap();
    // test_run runs the program on the loopback device: ifindex 1.
    eps.insert(
        1,
        Endpoint::new(LOCAL)
            .with_ipv4(A)
            .with_ipv6(A6)
            .enforce(enforce, enforce),
        0,
    )
    .unwrap();
}

fn measure(obj: &[u8]) -> Result<[u128; CASES.len()], ProgramError> {
    // The object's buffer may be unaligned; aya copies what it needs.
    let mut bpf = EbpfLoader::new().load(obj).expect("load");
    for n in ["from_container", "to_container"] {
        let p: &mut SchedClassifier = bpf.program_mut(n).unwrap().try_into()?;
        p.load()?;
    }
    set_endpoint(&mut bpf, true);
    let peer = match peer_veth() {
        Some(veth) => RemoteInfo::container(PEER, veth, veth + 1),
        None => RemoteInfo::new(PEER),
    };
    {
        let mut c4: LpmTrie<_, [u8; 4], RemoteInfo> =
            LpmTrie::try_from(bpf.map_mut(netpol_common::maps::IPCACHE4).unwrap()).unwrap();
        c4.insert(&Key::new(32, B), peer, 0).unwrap();
        c4.insert(&Key::new(32, C), RemoteInfo::new(STRANGER), 0)
            .unwrap();
        // As the datapath bench's ipcache: /32 identities that nothing measured has.
        for i in 0..ipcache_extra() {
            let a = [10, 99, (i / 250) as u8, (i % 250 + 1) as u8];
            c4.insert(&Key::new(32, a), RemoteInfo::new(2000 + i), 0)
                .unwrap();
        }
        let mut c6: LpmTrie<_, [u8; 16], RemoteInfo> =
            LpmTrie::try_from(bpf.map_mut(netpol_common::maps::IPCACHE6).unwrap()).unwrap();
        c6.insert(&Key::new(128, B6), peer, 0).unwrap();
    }
    // An object with an ipcache generation (netpol-common's `ipcache`) gets the agent's first
    // after its start (`write_ends(0)`, 2: an odd one is a write in progress, current for no
    // entry; an object from before odd generations takes any but 0).
    if let Some(m) = bpf.map_mut(netpol_common::maps::IPCACHE_GEN) {
        let mut m: aya::maps::Array<_, u32> = aya::maps::Array::try_from(m).unwrap();
        m.set(0, netpol_common::ipcache::write_ends(0), 0).unwrap();
    }
    // The `CONFIG` flags the agent starts with here (`Config::CT_IN_PLACE` on x86; an object
    // from before the flag ignores it). `NO_CT_IN_PLACE=1` clears it, to time the fallback.
    if let Some(m) = bpf.map_mut(netpol_common::maps::CONFIG) {
        let mut m: aya::maps::Array<_, netpol_common::Config> =
            aya::maps::Array::try_from(m).unwrap();
        let mut flags = netpol_agent::datapath::kernel::start_flags();
        if std::env::var_os("NO_CT_IN_PLACE").is_some() {
            flags &= !netpol_common::Config::CT_IN_PLACE;
        }
        m.set(
            0,
            netpol_common::Config {
                flags,
                event_rate: 0,
            },
            0,
        )
        .unwrap();
    }
    {
        // 10,000 entries that match nothing measured, and the allows of the measured flows, as
        // the agent's compiler writes them: no wildcard deny covers them.
        let mut pol: LpmTrie<_, PolicyKey, PolicyValue> =
            LpmTrie::try_from(bpf.map_mut("POLICY").unwrap()).unwrap();
        for i in 0..10_000u32 {
            let k = PolicyKey::new(
                LOCAL,
                1000 + i,
                Direction::Egress,
                6,
                (i % 60000) as u16 + 1,
            );
            pol.insert(&Key::new(FULL_PREFIX, k), PolicyValue::allow(i + 2), 0)
                .unwrap();
        }
        for dir in [Direction::Egress, Direction::Ingress] {
            let k = PolicyKey::new(LOCAL, PEER, dir, 6, 5432);
            pol.insert(&Key::new(FULL_PREFIX, k), final_allow(1), 0)
                .unwrap();
        }
    }
    let v4 = packet::ipv4(A, B, 6, &packet::tcp(40000, 5432, TCP_ACK));
    let v6 = packet::ipv6(A6, B6, 6, &packet::tcp(40000, 5432, TCP_ACK));
    let r4 = packet::ipv4(B, A, 6, &packet::tcp(5432, 40000, TCP_ACK));
    let r6 = packet::ipv6(B6, A6, 6, &packet::tcp(5432, 40000, TCP_ACK));
    let s4 = packet::ipv4(A, B, 6, &packet::tcp(40001, 5432, TCP_SYN));
    let s6 = packet::ipv6(A6, B6, 6, &packet::tcp(40001, 5432, TCP_SYN));
    let n = 500_000;
    let mut ns = [0u128; CASES.len()];
    {
        let from: &SchedClassifier = bpf.program("from_container").unwrap().try_into()?;
        let to: &SchedClassifier = bpf.program("to_container").unwrap().try_into()?;
        for (j, (name, frame, reply)) in [("ipv4 tcp", &v4, &r4), ("ipv6 tcp", &v6, &r6)]
            .into_iter()
            .enumerate()
        {
            // The first run admits the flow (policy), a reply answers it, the next packet of
            // the opener establishes it (moves it to the established table); the rest hit
            // conntrack there.
            run(from, frame, 1, name)?;
            run(to, reply, 1, name)?;
            ns[2 * j] = run(from, frame, n, name)?;
            ns[2 * j + 1] = run(to, reply, n, name)?;
        }
        ns[4] = run(from, &s4, n, "ipv4 syn")?;
        ns[5] = run(from, &s6, n, "ipv6 syn")?;
        let [syn, syn_ack, ack] = handshakes4(from, to, 10_000)?;
        ns[6] = syn;
        ns[7] = syn_ack;
        ns[8] = ack;
        let mut v = Vec::new();
        for i in 0..FRESH {
            let f = packet::ipv4(B, A, 6, &packet::tcp(10_000 + i, 5432, TCP_SYN));
            v.push(run(to, &f, 1, "ipv4 syn to_container")?);
        }
        ns[9] = median(v);
        let (mut syn, mut ack) = (Vec::new(), Vec::new());
        for i in 0..FRESH {
            let sp = 10_000 + i;
            let f = packet::ipv6(A6, B6, 6, &packet::tcp(sp, 5432, TCP_SYN));
            syn.push(run(from, &f, 1, "ipv6 syn")?);
            let f = packet::ipv6(B6, A6, 6, &packet::tcp(5432, sp, TCP_SYN | TCP_ACK));
            run(to, &f, 1, "ipv6 syn-ack")?;
            let f = packet::ipv6(A6, B6, 6, &packet::tcp(sp, 5432, TCP_ACK));
            ack.push(run(from, &f, 1, "ipv6 ack")?);
        }
        ns[10] = median(syn);
        ns[11] = median(ack);
        let mut v = Vec::new();
        for i in 0..FRESH {
            let f = packet::ipv4(C, A, 6, &packet::tcp(10_000 + i, 5432, TCP_SYN));
            v.push(run_expect(to, &f, 1, "denied syn", 2)?);
        }
        ns[12] = median(v);
        // The first handshakes' tuples again: each SYN finds its tuple's established entry,
        // and the promotion goes to the same key of the established table.
        let [syn, _, ack] = handshakes4(from, to, 10_000)?;
        ns[16] = syn;
        ns[17] = ack;
    }
    set_endpoint(&mut bpf, false);
    {
        let from: &SchedClassifier = bpf.program("from_container").unwrap().try_into()?;
        let to: &SchedClassifier = bpf.program("to_container").unwrap().try_into()?;
        let v = packet::ipv4(A, B, 6, &packet::tcp(30000, 80, TCP_ACK));
        let r = packet::ipv4(B, A, 6, &packet::tcp(80, 30000, TCP_ACK));
        let s = packet::ipv4(A, B, 6, &packet::tcp(30000, 80, TCP_SYN));
        let sa = packet::ipv4(B, A, 6, &packet::tcp(80, 30000, TCP_SYN | TCP_ACK));
        run(from, &s, 1, "unenforced syn")?;
        run(to, &sa, 1, "unenforced syn-ack")?;
        run(from, &v, 1, "unenforced ack")?;
        ns[13] = run(from, &v, n, "unenforced established")?;
        ns[14] = run(to, &r, n, "unenforced established reply")?;
        let mut syn = Vec::new();
        for i in 0..FRESH {
            let f = packet::ipv4(A, B, 6, &packet::tcp(20_000 + i, 80, TCP_SYN));
            syn.push(run(from, &f, 1, "unenforced syn")?);
        }
        ns[15] = median(syn);
    }
    Ok(ns)
}

/// `FRESH` IPv4 handshakes from the endpoint, each on a source port of its own from `first`: the
/// median of each step's single run.
fn handshakes4(
    from: &SchedClassifier,
    to: &SchedClassifier,
    first: u16,
) -> Result<[u128; 3], ProgramError> {
    let (mut syn, mut syn_ack, mut ack) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..FRESH {
        let sp = first + i;
        let f = packet::ipv4(A, B, 6, &packet::tcp(sp, 5432, TCP_SYN));
        syn.push(run(from, &f, 1, "ipv4 syn")?);
        let f = packet::ipv4(B, A, 6, &packet::tcp(5432, sp, TCP_SYN | TCP_ACK));
        syn_ack.push(run(to, &f, 1, "ipv4 syn-ack")?);
        let f = packet::ipv4(A, B, 6, &packet::tcp(sp, 5432, TCP_ACK));
        ack.push(run(from, &f, 1, "ipv4 ack")?);
    }
    Ok([median(syn), median(syn_ack), median(ack)])
}

/// An allow entry as the compiler writes one that no wildcard deny can override (an object from
/// before the flag ignores it).
fn final_allow(rule: u32) -> PolicyValue {
    PolicyValue::final_allow(rule)
}
