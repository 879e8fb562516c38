//! Tier 4 harness check: a private dockerd runs containers (with `-p` and a user-defined network)
//! and leaves the host as it found it.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    thread,
    time::{Duration, Instant},
};

use netpol_tests::docker::{
    docker_chains, forward_policy, host_bridges, DaemonConfig, DockerDaemon, DockerVersion,
};

const IMAGE: &str = "netpol-test/busybox";

/// GET / through a published port, polling until the server in the container answers.
fn http_get(port: u16) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let reply = TcpStream::connect(("127.0.0.1", port))
            .ok()
            .and_then(|mut s| {
                s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
                s.write_all(b"GET / HTTP/1.0\r\n\r\n").ok()?;
                let mut reply = String::new();
                s.read_to_string(&mut reply).ok()?;
                Some(reply)
            });
        match reply {
            Some(r) if r.contains("200") => return r,
            _ if Instant::now() > deadline => panic!("no HTTP answer on 127.0.0.1:{port}"),
            _ => thread::sleep(Duration::from_millis(100)),
        }
    }
}

fn private_dockerd_runs_containers_and_cleans_up_after_itself(version: DockerVersion) {
    if !netpol_tests::require_root(
        &version.test_name("private_dockerd_runs_containers_and_cleans_up_after_itself"),
    ) {
        return;
    }
    // The bridges this daemon creates: docker0 and the user-defined network's br-<id>.
    let created: Vec<String>;
    {
        let mut docker = DockerDaemon::start_with(DaemonConfig {
            version,
            ipv6: true,
            ..Default::default()
        });
        // The daemon (and the CLI the harness runs) is the version asked for.
        let server =
            docker.docker_ok(&["version", "-f", "{{.Server.Version}} {{.Client.Version}}"]);
        let want = match version {
            DockerVersion::Docker20 => "20.10",
            DockerVersion::Docker28 => netpol_tests::docker::DOCKER28_VERSION,
        };
        if version == DockerVersion::Docker28 {
            assert!(
                server.split(' ').all(|v| v.starts_with(want)),
                "server and client {server:?}, not {want}"
            );
        } else if !server.starts_with(want) {
            eprintln!("note: the system's Docker is {server}, not {want}");
        }
        docker.build_busybox_image(IMAGE);
        assert_eq!(
            docker.docker_ok(&["run", "--rm", IMAGE, "echo", "hello"]),
            "hello"
        );

        // IPv6 on the default bridge.
        let v6 = docker.docker_ok(&["run", "--rm", IMAGE, "ip", "-6", "addr", "show", "eth0"]);
        assert!(
            v6.contains("fd00:dead::"),
            "no fd00:dead:: address in:\n{v6}"
        );

        // A published port (iptables DNAT, docker-proxy) on a user-defined network.
        let net = docker.docker_ok(&["network", "create", "harness-net"]);
        created = vec!["docker0".to_owned(), format!("br-{}", &net[..12])];
        let bridges = host_bridges();
        assert!(
            created.iter().all(|b| bridges.contains(b)),
            "no {created:?} among the host's bridges {bridges:?}"
        );
        docker.docker_ok(&[
            "run",
            "-d",
            "--stop-timeout",
            "1",
            "--name",
            "web",
            "--network",
            "harness-net",
            "-p",
            "127.0.0.1:18080:8080",
            IMAGE,
            "sh",
            "-c",
            "mkdir /www && echo netpol > /www/index.html && exec httpd -f -p 8080 -h /www",
        ]);
        let reply = http_get(18080);
        assert!(reply.contains("netpol"), "unexpected reply:\n{reply}");
        assert_eq!(docker.inspect("web", "{{.State.Running}}"), "true");

        // A restart keeps the data (image, network); the container was stopped with the daemon.
        docker.restart();
        assert_eq!(
            docker.docker_ok(&["run", "--rm", IMAGE, "echo", "again"]),
            "again"
        );
        assert_eq!(docker.inspect("web", "{{.State.Running}}"), "false");
    }
    let left: Vec<_> = host_bridges()
        .into_iter()
        .filter(|b| created.contains(b))
        .collect();
    assert!(left.is_empty(), "bridges left behind: {left:?}");
    for iptables in ["iptables", "ip6tables"] {
        assert_eq!(
            forward_policy(iptables),
            "ACCEPT",
            "{iptables} FORWARD policy"
        );
        for table in ["filter", "nat", "raw"] {
            let chains = docker_chains(iptables, table);
            assert!(
                chains.is_empty(),
                "{iptables} -t {table} still has {chains:?}"
            );
        }
    }
}

netpol_tests::docker_tests!(private_dockerd_runs_containers_and_cleans_up_after_itself);
