fn main() {
    // Rebuild when the bpf-linker binary changes (a new LLVM).
    if let Ok(linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
