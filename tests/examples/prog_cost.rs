//! Average cost of one program run through BPF_PROG_TEST_RUN (`repeat`), for the common cases:
//! a packet of an established IPv4 / IPv6 TCP flow both ways, and a new flow decided by policy.
//! Run as root: `cargo run --release -p netpol-tests --example prog_cost`.

use aya::{
    maps::{lpm_trie::Key, HashMap, LpmTrie},
    programs::{ProgramError, SchedClassifier, TestRun, TestRunOptions},
    EbpfLoader,
};
use netpol_common::{endpoint::Endpoint, ipcache::RemoteInfo, policy::*, Direction};
use netpol_tests::packet;

/// What is measured, in this order: an established TCP packet of the side that opened the flow
/// (`from_container`) and its reply (`to_container`), IPv4 and IPv6, and a SYN that policy
/// admits (a new flow: the ipcache, two policy lookups and the conntrack insert).
const CASES: [&str; 6] = [
    "ipv4 tcp established, from_container",
    "ipv4 tcp established reply, to_container",
    "ipv6 tcp established, from_container",
    "ipv6 tcp established reply, to_container",
    "ipv4 tcp new flow (SYN), from_container",
    "ipv6 tcp new flow (SYN), from_container",
];

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
    let mut results: Vec<Vec<[u128; 6]>> = vec![Vec::new(); objects.len()];
    for _ in 0..rounds {
        for (i, (_, obj)) in objects.iter().enumerate() {
            results[i].push(measure(obj)?);
        }
    }
    for (i, (name, _)) in objects.iter().enumerate() {
        println!("{name} (ns per run, median of {rounds} rounds):");
        for (c, case) in CASES.iter().enumerate() {
            let mut v: Vec<u128> = results[i].iter().map(|r| r[c]).collect();
            v.sort_unstable();
            println!("  {case}: {}", v[v.len() / 2]);
        }
    }
    Ok(())
}

/// One run of `prog` over `frame`, `repeat` times; its average duration (ns). Panics unless the
/// program passed the packet (TC_ACT_UNSPEC): a drop would measure the wrong path.
fn run(
    prog: &SchedClassifier,
    frame: &[u8],
    repeat: u32,
    what: &str,
) -> Result<u128, ProgramError> {
    let mut out = vec![0u8; frame.len() + 256];
    let r = prog.test_run(TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        repeat,
        ..Default::default()
    })?;
    assert_eq!(r.return_value, u32::MAX, "{what} was not passed");
    Ok(r.duration.as_nanos())
}

fn measure(obj: &[u8]) -> Result<[u128; 6], ProgramError> {
    // The object's buffer may be unaligned; aya copies what it needs.
    let mut bpf = EbpfLoader::new().load(obj).expect("load");
    for n in ["from_container", "to_container"] {
        let p: &mut SchedClassifier = bpf.program_mut(n).unwrap().try_into()?;
        p.load()?;
    }
    let (a, b) = ([10, 0, 0, 1], [10, 0, 0, 2]);
    let a6 = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    let b6 = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
    {
        let mut eps: HashMap<_, u32, Endpoint> =
            HashMap::try_from(bpf.map_mut("ENDPOINTS").unwrap()).unwrap();
        eps.insert(
            1,
            Endpoint::new(256)
                .with_ipv4(a)
                .with_ipv6(a6)
                .enforce(true, true),
            0,
        )
        .unwrap();
    }
    {
        let mut c4: LpmTrie<_, [u8; 4], RemoteInfo> =
            LpmTrie::try_from(bpf.map_mut(netpol_common::maps::IPCACHE4).unwrap()).unwrap();
        c4.insert(&Key::new(32, b), RemoteInfo::new(257), 0)
            .unwrap();
        let mut c6: LpmTrie<_, [u8; 16], RemoteInfo> =
            LpmTrie::try_from(bpf.map_mut(netpol_common::maps::IPCACHE6).unwrap()).unwrap();
        c6.insert(&Key::new(128, b6), RemoteInfo::new(257), 0)
            .unwrap();
    }
    {
        let mut pol: LpmTrie<_, PolicyKey, PolicyValue> =
            LpmTrie::try_from(bpf.map_mut("POLICY").unwrap()).unwrap();
        for i in 0..10_000u32 {
            let k = PolicyKey::new(256, 1000 + i, Direction::Egress, 6, (i % 60000) as u16 + 1);
            pol.insert(&Key::new(FULL_PREFIX, k), PolicyValue::allow(i + 2), 0)
                .unwrap();
        }
        pol.insert(
            &Key::new(
                FULL_PREFIX,
                PolicyKey::new(256, 257, Direction::Egress, 6, 5432),
            ),
            PolicyValue::allow(1),
            0,
        )
        .unwrap();
    }
    let v4 = packet::ipv4(a, b, 6, &packet::tcp(40000, 5432, 0x10));
    let v6 = packet::ipv6(a6, b6, 6, &packet::tcp(40000, 5432, 0x10));
    let r4 = packet::ipv4(b, a, 6, &packet::tcp(5432, 40000, 0x10));
    let r6 = packet::ipv6(b6, a6, 6, &packet::tcp(5432, 40000, 0x10));
    let s4 = packet::ipv4(a, b, 6, &packet::tcp(40001, 5432, 0x02));
    let s6 = packet::ipv6(a6, b6, 6, &packet::tcp(40001, 5432, 0x02));
    let from: &SchedClassifier = bpf.program("from_container").unwrap().try_into()?;
    let to: &SchedClassifier = bpf.program("to_container").unwrap().try_into()?;
    let n = 500_000;
    let mut ns = [0u128; 6];
    for (j, (name, frame, reply)) in [("ipv4 tcp", &v4, &r4), ("ipv6 tcp", &v6, &r6)]
        .into_iter()
        .enumerate()
    {
        // The first run admits the flow (policy), a reply answers it, the next packet of the
        // opener establishes it (moves it to the established table); the rest hit conntrack
        // there.
        run(from, frame, 1, name)?;
        run(to, reply, 1, name)?;
        ns[2 * j] = run(from, frame, n, name)?;
        ns[2 * j + 1] = run(to, reply, n, name)?;
    }
    ns[4] = run(from, &s4, n, "ipv4 syn")?;
    ns[5] = run(from, &s6, n, "ipv6 syn")?;
    Ok(ns)
}
