//! Builds the eBPF programs (the `netpol-ebpf` crate, for the BPF target) and leaves the object at
//! `$OUT_DIR/netpol`, where `datapath/mod.rs` embeds it.
//!
//! The same steps as `aya_build::build_ebpf` (a nested `cargo build --release --target
//! bpfel-unknown-none -Z build-std=core` with BTF), with two differences:
//!
//! - One shared target dir, `<target>/bpf`, instead of one under each `OUT_DIR`. `OUT_DIR` differs
//!   for every feature set and profile netpol-agent is built with (the test suite builds it with
//!   and without netpol-common's `model` feature, and in release), and each one compiled `core`
//!   and the programs again: four times in a clean test run. Now the object is compiled once and
//!   every later build finds it fresh (cargo's own lock on that dir orders concurrent builds).
//! - Only compiler diagnostics become `cargo:warning` lines. aya-build forwards every line the
//!   nested cargo prints (`Compiling core …`, `Finished …`: 183 "warnings" in a clean build); here
//!   progress goes to the build script's stderr, which cargo shows only when the build fails.
//!
//! Every time the programs are actually compiled (not found fresh), a line is appended to
//! `<target>/bpf/compiles.log`; `scripts/test.sh` uses it to check the object is built once a run.

use std::{
    env,
    ffi::OsString,
    fs,
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{anyhow, bail, Context as _};
use cargo_metadata::{diagnostic::DiagnosticLevel, Message};

const EBPF_PACKAGE: &str = "netpol-ebpf";
const BPF_TARGET: &str = "bpfel-unknown-none";
/// The toolchain that builds the programs: stable, with `RUSTC_BOOTSTRAP=1` for `-Z build-std`.
const TOOLCHAIN: &str = "stable";

fn main() -> anyhow::Result<()> {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?);
    let workspace = manifest_dir
        .parent()
        .context("netpol-agent has no parent dir")?
        .to_owned();
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?);

    // Rebuild when the programs or what they are built from change. netpol-ebpf is not a
    // build-dependency (that compiled it for the host too, for nothing but change tracking).
    // Relative to this package's root, so that a target directory copied to another checkout
    // watches that checkout's sources, not the ones it was built from.
    for path in [
        "../netpol-ebpf",
        "../netpol-common",
        "../Cargo.toml",
        "../Cargo.lock",
    ] {
        println!("cargo:rerun-if-changed={path}");
    }
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    if matches!(env::var("AYA_BUILD_SKIP").as_deref(), Ok("1" | "true")) {
        // For tools that only need the userspace code to type-check (e.g. rust-analyzer setups).
        println!(
            "cargo:warning=AYA_BUILD_SKIP is set: the eBPF programs are not built or embedded"
        );
        fs::write(out_dir.join("netpol"), []).context("writing an empty object")?;
        return Ok(());
    }
    if env::var("CARGO_CFG_TARGET_ENDIAN").as_deref() != Ok("little") {
        bail!("netpol builds its programs for {BPF_TARGET} only (a little-endian host)");
    }

    let target_dir = cargo_target_dir(&out_dir).join("bpf");
    fs::create_dir_all(&target_dir)
        .with_context(|| format!("creating {}", target_dir.display()))?;

    let mut cmd = match which::which("rustup") {
        Ok(rustup) => {
            let mut cmd = Command::new(rustup);
            cmd.args(["run", TOOLCHAIN, "cargo"]);
            cmd
        }
        Err(_) => Command::new("cargo"),
    };
    cmd.current_dir(&workspace)
        .args(["build", "--package", EBPF_PACKAGE, "--bins", "--release"])
        .args(["--target", BPF_TARGET, "-Z", "build-std=core"])
        .arg("--message-format=json")
        .arg("--target-dir")
        .arg(&target_dir)
        .env("RUSTC_BOOTSTRAP", "1")
        .env("CARGO_ENCODED_RUSTFLAGS", rustflags())
        // The outer build's compiler and wrapper are for the host toolchain, not this one.
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("spawning {cmd:?}"))?;

    // The nested cargo's progress and rendered diagnostics: to our stderr, shown on failure.
    let stderr = child.stderr.take().context("no stderr pipe")?;
    let stderr = std::thread::spawn(move || {
        let mut err = std::io::stderr().lock();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = writeln!(err, "{line}");
        }
    });

    let stdout = child.stdout.take().context("no stdout pipe")?;
    let mut object = None;
    let mut compiled = false;
    for message in Message::parse_stream(BufReader::new(stdout)) {
        match message.context("the nested cargo printed invalid JSON")? {
            Message::CompilerArtifact(artifact) if artifact.target.name == "netpol" => {
                compiled |= !artifact.fresh;
                object = artifact.executable.map(|p| p.into_std_path_buf());
            }
            Message::CompilerMessage(msg) => {
                let text = msg.message.rendered.unwrap_or(msg.message.message);
                match msg.message.level {
                    // Warnings in the programs are real warnings: one cargo:warning a line.
                    DiagnosticLevel::Warning => {
                        for line in text.lines() {
                            println!("cargo:warning={line}");
                        }
                    }
                    // Errors and their notes: on stderr, which cargo shows with the failure.
                    _ => eprint!("{text}"),
                }
            }
            _ => {}
        }
    }
    let status = child
        .wait()
        .with_context(|| format!("waiting for {cmd:?}"))?;
    let _ = stderr.join();
    if !status.success() {
        bail!("building the eBPF programs failed ({status}); the nested cargo's output is above");
    }
    let object = object.ok_or_else(|| anyhow!("the nested cargo built no `netpol` object"))?;
    let dst = out_dir.join("netpol");
    fs::copy(&object, &dst)
        .with_context(|| format!("copying {} to {}", object.display(), dst.display()))?;

    if compiled {
        let log = target_dir.join("compiles.log");
        let line = format!(
            "{} {} {}\n",
            env::var("PROFILE").unwrap_or_default(),
            out_dir.display(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        );
        fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .and_then(|mut f| f.write_all(line.as_bytes()))
            .with_context(|| format!("appending to {}", log.display()))?;
    }
    Ok(())
}

/// The outer build's target dir: `OUT_DIR` is `<target>/[<triple>/]<profile>/build/<pkg>-<hash>/out`;
/// cargo marks the target dir's root with `CACHEDIR.TAG`.
fn cargo_target_dir(out_dir: &Path) -> PathBuf {
    let profile_dir = out_dir.ancestors().nth(3).unwrap_or(out_dir);
    profile_dir
        .ancestors()
        .skip(1)
        .find(|dir| dir.join("CACHEDIR.TAG").is_file())
        .or_else(|| profile_dir.parent())
        .unwrap_or(profile_dir)
        .to_owned()
}

/// What aya-build passes: the BPF target arch cfg the aya-ebpf crates expect, BTF debug info
/// (typed `bpftool map dump`), and `--btf` for bpf-linker. Fields separated by 0x1f.
fn rustflags() -> OsString {
    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_else(|_| "x86_64".into());
    let arch = if arch.starts_with("riscv64") {
        "riscv64".into()
    } else {
        arch
    };
    [
        format!("--cfg=bpf_target_arch=\"{arch}\""),
        "-Cdebuginfo=2".into(),
        "-Clink-arg=--btf".into(),
    ]
    .join("\x1f")
    .into()
}
