//! A minimal HTTP/1.1 server for the connections-per-second benchmark (`cargo xtask bench
//! datapath`): answers every request with a 2-byte body and closes the connection.
//!
//! `netpol-bench-http <listen addr:port> [threads]`

use std::{
    io::{Read, Write},
    net::TcpListener,
    process::ExitCode,
};

const RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok";

fn serve(listener: &TcpListener) {
    let mut buf = [0u8; 2048];
    loop {
        let Ok((mut s, _)) = listener.accept() else {
            continue;
        };
        let _ = s.set_nodelay(true);
        let mut seen = 0;
        // Read until the end of the request head (or the client gives up).
        loop {
            match s.read(&mut buf[seen..]) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    seen += n;
                    if buf[..seen].windows(4).any(|w| w == b"\r\n\r\n") {
                        let _ = s.write_all(RESPONSE);
                        break;
                    }
                    if seen == buf.len() {
                        break;
                    }
                }
            }
        }
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let Some(addr) = args.get(1) else {
        eprintln!("usage: netpol-bench-http <addr:port> [threads]");
        return ExitCode::FAILURE;
    };
    let threads: usize = args.get(2).and_then(|t| t.parse().ok()).unwrap_or(2);
    let listener = match TcpListener::bind(addr.as_str()) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("netpol-bench-http: listen on {addr}: {e}");
            return ExitCode::FAILURE;
        }
    };
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| serve(&listener));
        }
    });
    ExitCode::SUCCESS
}
