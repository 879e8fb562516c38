//! Tier 4 (issue 8 hole 6): a new container is policed from its first packet, before Docker
//! reports it and the agent identifies it.
//!
//! The agent follows the kernel's link events and attaches the programs, closed (identity
//! `unmanaged`, no address, both directions enforced), as soon as a veth joins a Docker bridge;
//! Docker's data then replaces that endpoint with the real one. The test starts containers whose
//! command (`netpol-first-packets`, copied into the image) acts the moment it runs:
//!
//! - an attacker, whose own policy denies all egress, sends UDP with a forged source (an allowed
//!   container's address) to a protected container, tries to connect to it, and sends plain UDP
//!   to an unprotected one: nothing of it arrives anywhere;
//! - a container without any policy connects to another one at once: it gets through promptly
//!   (its first SYN may be dropped while it is closed; TCP resends it after a second).

use std::{
    process::Output,
    time::{Duration, Instant},
};

use netpol_tests::{
    agent::Agent,
    docker::{DockerDaemon, DockerVersion},
    require_root,
};

const IMAGE: &str = "netpol-test/first-packets";
const NET: &str = "npfp";
const TCP_PORT: u16 = 7000;
const UDP_PORT: u16 = 7001;
const SINK_UDP: u16 = 7002;

netpol_tests::docker_tests!(first_packets_of_a_new_container_are_policed);

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_netpol-first-packets")
}

fn ok(what: &str, out: Output) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Removes the test's containers and network, whatever happened.
struct Cleanup<'a>(&'a DockerDaemon, Vec<String>);

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        for c in &self.1 {
            let _ = self.0.docker(&["rm", "-f", c]);
        }
        let _ = self.0.docker(&["network", "rm", NET]);
    }
}

fn run(d: &DockerDaemon, name: &str, role: &str, cmd: &[&str]) -> String {
    let mut args = vec![
        "run",
        "-d",
        "--name",
        name,
        "--network",
        NET,
        "-l",
        role,
        IMAGE,
    ];
    args.extend_from_slice(cmd);
    ok(&format!("docker run {name}"), d.docker(&args))
}

fn ip_of(d: &DockerDaemon, name: &str) -> String {
    let ip = d.inspect(
        name,
        &format!("{{{{.NetworkSettings.Networks.{NET}.IPAddress}}}}"),
    );
    assert!(!ip.is_empty(), "{name} has no address on {NET}");
    ip
}

fn logs(d: &DockerDaemon, name: &str) -> String {
    let out = d.docker(&["logs", name]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Waits for a container started with `--rm`-less `run -d` to exit; returns its output.
fn wait_exit(d: &DockerDaemon, name: &str) -> String {
    ok(&format!("docker wait {name}"), d.docker(&["wait", name]));
    logs(d, name)
}

const POLICIES: &str = r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: fp-db
spec:
  endpointSelector:
    matchLabels:
      role: db
  ingress:
    - fromEndpoints:
        - matchLabels:
            role: app
      toPorts:
        - ports:
            - port: "7000"
              protocol: TCP
            - port: "7001"
              protocol: UDP
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: fp-attacker
spec:
  endpointSelector:
    matchLabels:
      role: attacker
  egress:
    - {}
"#;

fn first_packets_of_a_new_container_are_policed(version: DockerVersion) {
    let test = version.test_name("first_packets_of_a_new_container_are_policed");
    if !require_root(&test) {
        return;
    }
    let d = DockerDaemon::start_version(version);
    d.image(IMAGE).binary(bin()).build();
    let agent = Agent::start(&d);
    std::fs::write(agent.policy_dir().join("first-packets.yaml"), POLICIES).expect("write policy");
    let mut cleanup = Cleanup(&d, Vec::new());
    ok("network create", d.docker(&["network", "create", NET]));
    let tcp = TCP_PORT.to_string();
    let (udp, sink_udp) = (UDP_PORT.to_string(), SINK_UDP.to_string());
    for (name, role) in [("npfp-db", "role=db"), ("npfp-sink", "role=sink")] {
        cleanup.1.push(name.to_owned());
        run(&d, name, role, &[bin(), "listen", &tcp, &udp, &sink_udp]);
    }
    cleanup.1.push("npfp-app".to_owned());
    run(&d, "npfp-app", "role=app", &["sleep", "600"]);
    let (db, sink, app) = (
        ip_of(&d, "npfp-db"),
        ip_of(&d, "npfp-sink"),
        ip_of(&d, "npfp-app"),
    );
    agent.wait_enforced(&[&d.inspect("npfp-db", "{{.Id}}")]);
    // The listener works and the policy lets app in.
    let control = ok(
        "app -> db",
        d.docker(&[
            "exec",
            "npfp-app",
            bin(),
            "connect",
            &format!("{db}:{tcp}"),
            "5000",
        ]),
    );
    assert!(
        control.starts_with("connected_after_ms="),
        "app -> db: {control}"
    );
    assert!(
        logs(&d, "npfp-db").contains(&format!("tcp {app}:")),
        "db saw app"
    );

    // The attacker acts from its first instant on, for 800 ms.
    cleanup.1.push("npfp-attacker".to_owned());
    run(
        &d,
        "npfp-attacker",
        "role=attacker",
        &[
            bin(),
            "attack",
            &db,
            &tcp,
            &udp,
            &app,
            &sink,
            &sink_udp,
            "800",
        ],
    );
    let attack = wait_exit(&d, "npfp-attacker");
    eprintln!("{test}: {}", attack.trim());
    assert!(
        attack.contains("attack spoofed=") && !attack.contains("spoofed=0 "),
        "the attacker could not send: {attack}"
    );
    assert!(
        attack.contains(" connected=0"),
        "attacker connected to db: {attack}"
    );
    let db_log = logs(&d, "npfp-db");
    let received: Vec<&str> = db_log
        .lines()
        .filter(|l| !l.starts_with(&format!("tcp {app}:")))
        .collect();
    assert!(
        received.is_empty(),
        "db received from the attacker (forged or its own address): {received:?}\nagent log:\n{}",
        agent.log_tail(30)
    );
    let sink_log = logs(&d, "npfp-sink");
    assert!(
        !sink_log.contains("udp "),
        "the deny-all-egress attacker's first packets reached sink: {sink_log}\nagent log:\n{}",
        agent.log_tail(30)
    );

    // A container under no policy talks at once: its connection is up promptly.
    cleanup.1.push("npfp-normal".to_owned());
    let started = Instant::now();
    run(
        &d,
        "npfp-normal",
        "role=normal",
        &[bin(), "connect", &format!("{sink}:{tcp}"), "10000"],
    );
    let normal = wait_exit(&d, "npfp-normal");
    eprintln!(
        "{test}: unrestricted newcomer: {} ({:?} from docker run to exit)",
        normal.trim(),
        started.elapsed()
    );
    let ms: u64 = normal
        .trim()
        .strip_prefix("connected_after_ms=")
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("the unrestricted newcomer did not connect: {normal}"));
    assert!(
        Duration::from_millis(ms) < Duration::from_secs(3),
        "the unrestricted newcomer took {ms} ms to connect"
    );
    drop(cleanup);
    drop(agent);
}
