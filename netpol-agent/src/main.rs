fn main() {
    let obj = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/netpol"));
    let mut bpf = aya::EbpfLoader::new().load(obj).expect("load");
    for name in ["from_container", "to_container"] {
        let p: &mut aya::programs::SchedClassifier =
            bpf.program_mut(name).unwrap().try_into().unwrap();
        match p.load() {
            Ok(()) => println!("{name} ok"),
            Err(e) => {
                println!("{name}: {e:?}");
            }
        }
    }
}
