//! `cargo xtask dist`: the release artifacts, built offline.
//!
//! - `netpol-agent_<version>_<arch>.deb`, made by cargo-deb from `[package.metadata.deb]` in
//!   netpol-agent/Cargo.toml: the release binary (its eBPF object built in) as
//!   `/usr/sbin/netpol-agent`, the systemd unit, `/etc/netpol/agent.conf` (a conffile), the
//!   maintainer scripts of `packaging/debian/` (directories, service, teardown on removal, purge),
//!   a man page and the README. lintian checks it; any error or warning that
//!   `packaging/debian/lintian-overrides` does not explain fails the build.
//! - `netpol-agent-image_<version>_<arch>.tar.gz`, the sidecar image for `docker load -i`,
//!   written by `packaging/sidecar/build.sh --tarball` without a Docker daemon.
//!
//! `--binary PATH` packages that binary instead of building the release one (the package
//! tests use the test build's agent, so the suite compiles no release build).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

#[derive(clap::Args)]
pub struct Opts {
    /// Output directory.
    #[arg(long, default_value = "target/dist")]
    out: PathBuf,
    /// The package's version (default: the crate's, with Debian revision 1).
    #[arg(long)]
    deb_version: Option<String>,
    /// Package this agent binary instead of building the release one.
    #[arg(long)]
    binary: Option<PathBuf>,
    /// Faster, weaker compression of the .deb.
    #[arg(long)]
    fast: bool,
    /// Skip the image archive.
    #[arg(long)]
    no_image: bool,
    /// Skip lintian.
    #[arg(long)]
    no_lintian: bool,
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("spawn {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn size(path: &Path) -> String {
    let n = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    format!("{:.1} MB", n as f64 / 1e6)
}

pub fn run_dist(o: Opts) -> Result<()> {
    let root = crate::workspace_root();
    let out = if o.out.is_absolute() {
        o.out.clone()
    } else {
        root.join(&o.out)
    };
    std::fs::create_dir_all(&out).with_context(|| format!("create {}", out.display()))?;
    if Command::new("cargo")
        .args(["deb", "--version"])
        .output()
        .map(|o| !o.status.success())
        .unwrap_or(true)
    {
        bail!("cargo-deb is not installed: run scripts/setup.sh --build");
    }

    // The binary, and the target directory cargo-deb takes `target/release/netpol-agent` from.
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let (binary, deb_target) = match &o.binary {
        Some(bin) => {
            // A staging target directory of its own: never overwrite target/release.
            let stage = out.join(".stage/target");
            let dest = stage.join("release/netpol-agent");
            std::fs::create_dir_all(dest.parent().expect("parent"))?;
            std::fs::copy(bin, &dest)
                .with_context(|| format!("copy {} to {}", bin.display(), dest.display()))?;
            (dest, stage)
        }
        None => {
            eprintln!("==> cargo build --release -p netpol-agent");
            let status = Command::new("cargo")
                .current_dir(&root)
                .args([
                    "build",
                    "--release",
                    "-p",
                    "netpol-agent",
                    "--bin",
                    "netpol-agent",
                ])
                .status()?;
            if !status.success() {
                bail!("cargo build --release -p netpol-agent failed");
            }
            (target_dir.join("release/netpol-agent"), target_dir)
        }
    };

    let mut deb = Command::new("cargo");
    deb.current_dir(&root)
        .env("CARGO_TARGET_DIR", &deb_target)
        .args(["deb", "-p", "netpol-agent", "--no-build", "-o"])
        .arg(&out);
    if let Some(v) = &o.deb_version {
        deb.args(["--deb-version", v]);
    }
    if o.fast {
        deb.arg("--fast");
    }
    let printed = run(&mut deb)?;
    let deb_path = printed
        .lines()
        .rev()
        .find(|l| l.trim_end().ends_with(".deb"))
        .map(|l| PathBuf::from(l.trim()))
        .context("cargo deb printed no .deb path")?;
    println!("{} ({})", deb_path.display(), size(&deb_path));

    if !o.no_lintian {
        if Command::new("lintian").arg("--version").output().is_err() {
            bail!("lintian is not installed (scripts/setup.sh --build installs it; --no-lintian skips it)");
        }
        let l = Command::new("lintian")
            .args(["--fail-on", "error,warning", "--info"])
            .arg(&deb_path)
            .output()?;
        let text = String::from_utf8_lossy(&l.stdout);
        let tags: Vec<&str> = text
            .lines()
            .filter(|l| l.len() > 2 && l.as_bytes()[1] == b':' && !l.starts_with("N:"))
            .collect();
        if !l.status.success() {
            bail!(
                "lintian found errors or warnings that packaging/debian/lintian-overrides does not explain:\n{text}{}",
                String::from_utf8_lossy(&l.stderr)
            );
        }
        if tags.is_empty() {
            println!("lintian: clean (tags explained in packaging/debian/lintian-overrides)");
        } else {
            println!("lintian:\n  {}", tags.join("\n  "));
        }
    }

    if !o.no_image {
        let arch = run(Command::new("dpkg").arg("--print-architecture"))?
            .trim()
            .to_owned();
        let version = env!("CARGO_PKG_VERSION");
        let image = out.join(format!("netpol-agent-image_{version}_{arch}.tar.gz"));
        let mut b = Command::new("bash");
        b.arg(root.join("packaging/sidecar/build.sh"))
            .arg("--tarball")
            .arg(&image)
            .arg(format!("netpol-agent:{version}"))
            .arg("netpol-agent:latest")
            .env("NETPOL_AGENT_BIN", &binary);
        run(&mut b)?;
        println!(
            "{} ({}): docker load -i {0}; the image is netpol-agent:{version} and :latest",
            image.display(),
            size(&image)
        );
    }
    Ok(())
}
