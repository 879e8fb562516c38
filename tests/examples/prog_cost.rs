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

fn main() -> Result<(), ProgramError> {
    let mut bpf = EbpfLoader::new()
        .load(netpol_agent::datapath::EBPF_OBJECT)
        .expect("load");
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
            LpmTrie::try_from(bpf.map_mut("IPCACHE4").unwrap()).unwrap();
        c4.insert(&Key::new(32, b), RemoteInfo::new(257), 0)
            .unwrap();
        let mut c6: LpmTrie<_, [u8; 16], RemoteInfo> =
            LpmTrie::try_from(bpf.map_mut("IPCACHE6").unwrap()).unwrap();
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
    let prog: &SchedClassifier = bpf.program("from_container").unwrap().try_into()?;
    for (name, frame) in [("ipv4 tcp", &v4), ("ipv6 tcp", &v6)] {
        // The first run admits the flow (policy); the rest hit conntrack.
        let mut out = vec![0u8; frame.len() + 256];
        let r = prog.test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            repeat: 1,
            ..Default::default()
        })?;
        let mut out = vec![0u8; frame.len() + 256];
        let n = 2_000_000;
        let r2 = prog.test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            repeat: n,
            ..Default::default()
        })?;
        println!(
            "{name}: first run verdict {:#x}; established: {} ns/run (verdict {:#x})",
            r.return_value,
            r2.duration.as_nanos(),
            r2.return_value
        );
    }
    let drops: aya::maps::PerCpuArray<_, u64> =
        aya::maps::PerCpuArray::try_from(bpf.map("DROPS").unwrap()).unwrap();
    for i in 1..8u32 {
        let v: u64 = drops.get(&i, 0).unwrap().iter().sum();
        if v > 0 {
            println!("drops[{i}] = {v}");
        }
    }
    Ok(())
}
