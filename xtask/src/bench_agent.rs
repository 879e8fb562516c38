//! `cargo xtask bench agent`: how fast the agent reacts and how little it needs.
//!
//! A private dockerd (the test harness's `DockerDaemon`) and the release agent on a private pin
//! dir, state dir and socket. A policy selects every container of the bench project (ingress from
//! `host` only), so a container counts as enforced once its endpoint row says `enforced`.
//!
//! - **start → enforced**: for each of N containers, Docker's `State.StartedAt` (when the
//!   container's process started) to the first moment the control socket lists it as enforced,
//!   polled every 0.5 ms over the socket (no process spawns in the loop).
//! - **import → enforced**: `policy import` round trip; the daemon answers after the maps are
//!   written, so the round trip is import → enforced. Alternates two versions of a policy.
//! - **RSS idle**: `VmRSS` of the agent with 100 containers running, after the last change.
//! - **CPU idle**: agent CPU time over 10 s with nothing happening, as a share of one core.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use crate::stats::percentile;
use anyhow::{bail, Context, Result};
use netpol_agent::daemon::api::{call, EndpointRow, Request, SourceFile};
use netpol_tests::docker::DockerDaemon;

#[derive(clap::Args, Debug, Clone)]
pub struct Opts {
    /// Containers started one by one for start → enforced (the RSS figure uses 100 in all).
    #[arg(long, default_value_t = 60)]
    pub containers: usize,
    /// Policy imports measured.
    #[arg(long, default_value_t = 50)]
    pub imports: usize,
}

struct AgentProc {
    child: Child,
    pin_dir: PathBuf,
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = netpol_agent::datapath::kernel::KernelDatapath::remove_pins(&self.pin_dir);
    }
}

/// Parses Docker's RFC 3339 timestamp with nanoseconds (UTC, `Z`) into seconds since the epoch.
fn parse_started_at(s: &str) -> Result<f64> {
    // 2026-11-22T21:07:26.123456789Z
    let s = s.trim().trim_end_matches('Z');
    let (date, time) = s.split_once('T').context("timestamp without T")?;
    let d: Vec<i64> = date
        .split('-')
        .map(|x| x.parse())
        .collect::<Result<_, _>>()?;
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let t: Vec<i64> = hms
        .split(':')
        .map(|x| x.parse())
        .collect::<Result<_, _>>()?;
    if d.len() != 3 || t.len() != 3 {
        bail!("bad timestamp {s}");
    }
    // Days from civil (Howard Hinnant's algorithm).
    let (y, m, day) = (if d[1] <= 2 { d[0] - 1 } else { d[0] }, d[1], d[2]);
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + t[0] * 3600 + t[1] * 60 + t[2];
    let frac: f64 = format!("0.{frac}").parse().unwrap_or(0.0);
    Ok(secs as f64 + frac)
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn rss_kib(pid: u32) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    s.lines()
        .find_map(|l| {
            l.strip_prefix("VmRSS:")
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .context("no VmRSS")
}

fn cpu_ticks(pid: u32) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = s.rsplit_once(')').context("stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Ok(f[11].parse::<u64>()? + f[12].parse::<u64>()?)
}

fn enforced(socket: &Path, name: &str) -> bool {
    call(socket, &Request::EndpointList)
        .ok()
        .and_then(|v| serde_json::from_value::<Vec<EndpointRow>>(v).ok())
        .is_some_and(|rows| rows.iter().any(|r| r.name == name && r.state == "enforced"))
}

const POLICY: &str = "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: bench
spec:
  endpointSelector:
    matchLabels:
      com.docker.compose.project: bench
  ingress:
    - fromEntities: [host]
      toPorts:
        - ports: [{port: \"PORT\", protocol: TCP}]
";

pub fn run(o: Opts) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("bench agent needs root");
    }
    let status = Command::new("cargo")
        .args(["build", "--release", "-p", "netpol-agent"])
        .status()?;
    if !status.success() {
        bail!("building the agent failed");
    }
    let target = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
    let bin = PathBuf::from(target).join("release/netpol-agent");
    let docker = DockerDaemon::start();
    docker.build_busybox_image("netpol-bench-box");
    docker.docker_ok(&["network", "create", "--subnet", "172.31.0.0/16", "benchnet"]);

    let tag = std::process::id();
    let work = std::env::temp_dir().join(format!("netpol-bench-agent-{tag}"));
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/netpol-bench-{tag}"));
    let socket = work.join("agent.sock");
    std::fs::create_dir_all(work.join("policies"))?;
    let child = Command::new(&bin)
        .arg("--socket")
        .arg(&socket)
        .arg("run")
        .arg("--pin-dir")
        .arg(&pin_dir)
        .arg("--state-dir")
        .arg(work.join("state"))
        .arg("--policy-dir")
        .arg(work.join("policies"))
        .arg("--docker-socket")
        .arg(docker.socket_path())
        .env("NETPOL_LOG", "warn")
        .stderr(Stdio::from(std::fs::File::create(work.join("agent.log"))?))
        .spawn()?;
    let agent = AgentProc { child, pin_dir };
    let pid = agent.child.id();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let up = call(&socket, &Request::Status)
            .ok()
            .and_then(|v| {
                v.get("docker")
                    .and_then(|d| d.as_str())
                    .map(|d| d.starts_with("connected"))
            })
            .unwrap_or(false);
        if up {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "agent did not connect to Docker: {}",
                std::fs::read_to_string(work.join("agent.log"))?
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let src = |port: u16| SourceFile {
        path: "bench.yaml".into(),
        text: POLICY.replace("PORT", &port.to_string()),
    };
    call(
        &socket,
        &Request::PolicyImport {
            files: vec![src(80)],
        },
    )
    .context("import")?;

    // Start → enforced.
    let mut start_ms = Vec::new();
    let total = o.containers.max(100);
    for i in 0..total {
        let name = format!("bench-{i}");
        let service = format!("com.docker.compose.service=s{i}");
        docker.docker_ok(&[
            "run",
            "-d",
            "--name",
            &name,
            "--network",
            "benchnet",
            "-l",
            "com.docker.compose.project=bench",
            "-l",
            &service,
            "netpol-bench-box",
            "sleep",
            "1000000",
        ]);
        if i >= o.containers {
            continue;
        }
        let t_end = loop {
            if enforced(&socket, &name) {
                break now();
            }
            std::thread::sleep(Duration::from_micros(500));
        };
        let started = parse_started_at(&docker.inspect(&name, "{{.State.StartedAt}}"))?;
        start_ms.push(((t_end - started) * 1000.0).max(0.0));
    }

    // Import → enforced.
    let mut import_ms = Vec::new();
    for i in 0..o.imports {
        let t0 = Instant::now();
        call(
            &socket,
            &Request::PolicyImport {
                files: vec![src(if i % 2 == 0 { 81 } else { 80 })],
            },
        )?;
        import_ms.push(t0.elapsed().as_secs_f64() * 1000.0);
    }

    // Idle: RSS and CPU with `total` containers.
    std::thread::sleep(Duration::from_secs(2));
    let rss = rss_kib(pid)?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let c0 = cpu_ticks(pid)?;
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(10));
    let cpu = (cpu_ticks(pid)? - c0) as f64 / hz / t0.elapsed().as_secs_f64() * 100.0;

    start_ms.sort_by(f64::total_cmp);
    import_ms.sort_by(f64::total_cmp);
    println!();
    println!("| measure | p50 | p99 | target |");
    println!("|---|---|---|---|");
    println!(
        "| container start → enforced ({} containers) | {:.1} ms | {:.1} ms | p99 < 100 ms |",
        start_ms.len(),
        percentile(&start_ms, 0.5),
        percentile(&start_ms, 0.99)
    );
    println!(
        "| policy import → enforced ({} imports, {} containers) | {:.1} ms | {:.1} ms | p99 < 100 ms |",
        import_ms.len(),
        total,
        percentile(&import_ms, 0.5),
        percentile(&import_ms, 0.99)
    );
    println!(
        "| agent RSS, idle, {total} containers | {:.1} MB | | < 15 MB |",
        rss as f64 / 1024.0
    );
    println!("| agent CPU, idle (10 s) | {cpu:.2} % of one core | | |");

    for i in 0..total {
        let _ = docker.docker(&["rm", "-f", &format!("bench-{i}")]);
    }
    let _ = docker.docker(&["network", "rm", "benchnet"]);
    drop(agent);
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_docker_timestamps() {
        let t = super::parse_started_at("1970-01-02T00:00:01.5Z").unwrap();
        assert!((t - 86_401.5).abs() < 1e-6);
        let t = super::parse_started_at("2026-11-22T21:07:26.000000000Z").unwrap();
        assert!((t - 1_795_381_646.0).abs() < 1.0, "{t}");
    }
}
