//! Average cost of one program run through BPF_PROG_TEST_RUN (`repeat`), for the common cases:
//! a packet of an established IPv4 / IPv6 TCP flow, and a new flow decided by policy.
//! Run as root: `cargo run --release -p netpol-tests --example prog_cost`.

use aya::{
    maps::{lpm_trie::Key, HashMap, LpmTrie},
    programs::{ProgramError, SchedClassifier, TestRun, TestRunOptions},
    EbpfLoader,
};
use netpol_common::{endpoint::Endpoint, ipcache::RemoteInfo, policy::*, Direction};
use netpol_tests::packet;

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
    let rounds = if paths.is_empty() { 1 } else { 7 };
    let mut results: Vec<Vec<(u128, u128)>> = vec![Vec::new(); objects.len()];
    for _ in 0..rounds {
        for (i, (_, obj)) in objects.iter().enumerate() {
            results[i].push(measure(obj)?);
        }
    }
    for (i, (name, _)) in objects.iter().enumerate() {
        let mut v4: Vec<u128> = results[i].iter().map(|r| r.0).collect();
        let mut v6: Vec<u128> = results[i].iter().map(|r| r.1).collect();
        v4.sort_unstable();
        v6.sort_unstable();
        println!(
            "{name}: established ipv4 tcp {} ns/run, ipv6 tcp {} ns/run (median of {rounds})",
            v4[v4.len() / 2],
            v6[v6.len() / 2]
        );
    }
    Ok(())
}

fn measure(obj: &[u8]) -> Result<(u128, u128), ProgramError> {
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
    let prog: &SchedClassifier = bpf.program("from_container").unwrap().try_into()?;
    let to: &SchedClassifier = bpf.program("to_container").unwrap().try_into()?;
    let mut ns = [0u128; 2];
    for (j, (name, frame, reply)) in [("ipv4 tcp", &v4, &r4), ("ipv6 tcp", &v6, &r6)]
        .into_iter()
        .enumerate()
    {
        // The first run admits the flow (policy), a reply answers it, the next packet of the
        // opener establishes it (moves it to the established table); the rest hit conntrack
        // there.
        let mut out = vec![0u8; frame.len() + 256];
        let r = prog.test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            repeat: 1,
            ..Default::default()
        })?;
        let mut out = vec![0u8; reply.len() + 256];
        let rr = to.test_run(TestRunOptions {
            data_in: Some(reply),
            data_out: Some(&mut out),
            repeat: 1,
            ..Default::default()
        })?;
        assert_eq!(
            rr.return_value,
            u32::MAX,
            "{name}: the reply was not passed"
        );
        let mut out = vec![0u8; frame.len() + 256];
        let n = 1_000_000;
        let r2 = prog.test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            repeat: n,
            ..Default::default()
        })?;
        // Both runs must pass (TC_ACT_UNSPEC): a drop would measure the wrong path.
        assert_eq!(
            (r.return_value, r2.return_value),
            (u32::MAX, u32::MAX),
            "{name} was not passed"
        );
        ns[j] = r2.duration.as_nanos();
    }
    Ok((ns[0], ns[1]))
}
