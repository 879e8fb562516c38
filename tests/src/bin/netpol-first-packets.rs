//! A container's first packets, for the end-to-end test of issue 8 hole 6 (copied into a test
//! image; run as the container's command, so it starts sending the moment the container runs).
//!
//! - `listen TCP_PORT UDP_PORT...`: accepts TCP connections and receives UDP datagrams forever,
//!   printing `tcp <peer>` / `udp <peer>` for each (the test reads them from `docker logs`).
//! - `attack TARGET TCP_PORT UDP_PORT SPOOF_SRC SINK SINK_UDP_PORT MS`: for MS milliseconds from
//!   its start, sends UDP datagrams to TARGET:UDP_PORT with the forged source SPOOF_SRC (a raw
//!   socket, as `CAP_NET_RAW` allows in any Docker container), plain UDP datagrams to
//!   SINK:SINK_UDP_PORT, and tries TCP connections to TARGET:TCP_PORT; prints what it did.
//! - `connect ADDR:PORT MS`: tries to connect until it succeeds or MS milliseconds have passed;
//!   prints `connected_after_ms=N` or `not_connected`.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    process::ExitCode,
    time::{Duration, Instant},
};

fn out(line: &str) {
    let mut o = std::io::stdout().lock();
    let _ = writeln!(o, "{line}");
    let _ = o.flush();
}

fn listen(tcp: u16, udp: &[u16]) -> ! {
    let l = TcpListener::bind(("0.0.0.0", tcp)).expect("bind tcp");
    for &p in udp {
        let s = UdpSocket::bind(("0.0.0.0", p)).expect("bind udp");
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            loop {
                if let Ok((_, peer)) = s.recv_from(&mut buf) {
                    out(&format!("udp {peer} port {p}"));
                }
            }
        });
    }
    loop {
        if let Ok((mut c, peer)) = l.accept() {
            out(&format!("tcp {peer}"));
            let _ = c.write_all(b"hello\n");
            let mut buf = [0u8; 64];
            let _ = c.set_read_timeout(Some(Duration::from_millis(100)));
            let _ = c.read(&mut buf);
        }
    }
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for pair in data.chunks(2) {
        let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4 + UDP packet from `src` to `dst:port` (the UDP checksum is left 0: optional in IPv4).
fn udp_packet(src: Ipv4Addr, dst: Ipv4Addr, port: u16, payload: &[u8]) -> Vec<u8> {
    let total = 20 + 8 + payload.len();
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let c = checksum(&p[..20]);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p[20..22].copy_from_slice(&40000u16.to_be_bytes());
    p[22..24].copy_from_slice(&port.to_be_bytes());
    p[24..26].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    p[28..].copy_from_slice(payload);
    p
}

struct Raw(i32);

impl Raw {
    fn open() -> Raw {
        // SAFETY: plain socket(2); checked below.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
        assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        Raw(fd)
    }

    fn send(&self, pkt: &[u8], dst: Ipv4Addr) -> bool {
        // SAFETY: an all-zero sockaddr_in is valid; the fields are set below.
        let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        sa.sin_family = libc::AF_INET as libc::sa_family_t;
        sa.sin_addr.s_addr = u32::from_ne_bytes(dst.octets());
        // SAFETY: `pkt` and `sa` are valid for the lengths given.
        let n = unsafe {
            libc::sendto(
                self.0,
                pkt.as_ptr().cast(),
                pkt.len(),
                0,
                (&sa as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        n == pkt.len() as isize
    }
}

fn attack(args: &[String]) {
    let target: Ipv4Addr = args[0].parse().expect("target");
    let tcp: u16 = args[1].parse().expect("tcp port");
    let udp: u16 = args[2].parse().expect("udp port");
    let spoof: Ipv4Addr = args[3].parse().expect("spoofed source");
    let sink: Ipv4Addr = args[4].parse().expect("sink");
    let sink_udp: u16 = args[5].parse().expect("sink udp port");
    let run_for = Duration::from_millis(args[6].parse().expect("ms"));
    let start = Instant::now();
    let raw = Raw::open();
    let plain = UdpSocket::bind("0.0.0.0:0").expect("udp socket");
    let (mut spoofed, mut sent_plain, mut connected, mut tries) = (0, 0, 0, 0);
    while start.elapsed() < run_for {
        let n = spoofed + 1;
        if raw.send(
            &udp_packet(spoof, target, udp, format!("spoofed {n}").as_bytes()),
            target,
        ) {
            spoofed += 1;
        }
        if plain
            .send_to(b"first packets", SocketAddrV4::new(sink, sink_udp))
            .is_ok()
        {
            sent_plain += 1;
        }
        tries += 1;
        let to = SocketAddr::V4(SocketAddrV4::new(target, tcp));
        if TcpStream::connect_timeout(&to, Duration::from_millis(20)).is_ok() {
            connected += 1;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    out(&format!(
        "attack spoofed={spoofed} plain={sent_plain} tries={tries} connected={connected}"
    ));
}

fn connect(args: &[String]) {
    let to: SocketAddr = args[0].parse().expect("address");
    let deadline = Duration::from_millis(args[1].parse().expect("ms"));
    let start = Instant::now();
    while start.elapsed() < deadline {
        let left = deadline.saturating_sub(start.elapsed());
        if let Ok(mut s) = TcpStream::connect_timeout(&to, left.min(Duration::from_secs(3))) {
            let ms = start.elapsed().as_millis();
            let mut buf = [0u8; 6];
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let greeted = s.read_exact(&mut buf).is_ok();
            out(&format!("connected_after_ms={ms} greeted={greeted}"));
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    out("not_connected");
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("listen") if args.len() >= 3 => {
            let udp: Vec<u16> = args[2..].iter().map(|p| p.parse().expect("port")).collect();
            listen(args[1].parse().expect("port"), &udp)
        }
        Some("attack") if args.len() == 8 => attack(&args[1..]),
        Some("connect") if args.len() == 3 => connect(&args[1..]),
        _ => {
            eprintln!("usage: see the source (tests/src/bin/netpol-first-packets.rs)");
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}
