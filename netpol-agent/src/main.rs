fn main() {
    println!("{}", netpol_agent::datapath::EBPF_OBJECT.len());
}
