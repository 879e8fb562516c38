//! A client command whose reader goes away (`netpol-agent policy export ... | head -1`) ends
//! quietly, as Unix tools do: killed by SIGPIPE or exit 0, never a Rust panic message. No
//! privileges needed.

use std::{
    io::Read,
    os::unix::process::ExitStatusExt,
    process::{Command, Stdio},
};

const BIN: &str = env!("CARGO_BIN_EXE_netpol-agent");

#[test]
fn a_closed_stdout_pipe_ends_a_client_command_without_a_panic() {
    let dir = std::env::temp_dir().join(format!("netpol-cli-pipe-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("many.yaml");
    // Enough policies that the export is far larger than a pipe's buffer (64 KiB).
    let mut text = String::new();
    for i in 0..2000 {
        text.push_str(&format!(
            "---\napiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: p{i}}}\n\
             spec:\n  endpointSelector: {{matchLabels: {{app: a{i}}}}}\n  ingress:\n  \
             - fromEndpoints: [{{matchLabels: {{app: b{i}}}}}]\n    toPorts: [{{ports: [{{port: \"80\", protocol: TCP}}]}}]\n"
        ));
    }
    std::fs::write(&file, text).unwrap();

    let mut child = Command::new(BIN)
        .args(["policy", "export", "-n", "ns", "-f"])
        .arg(&file)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn netpol-agent");
    // Read one chunk, as `head -c` would, then close the read end.
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 256];
    let n = stdout.read(&mut first).expect("read the first bytes");
    assert!(n > 0, "the export printed nothing");
    drop(stdout);
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let status = child.wait().unwrap();
    let _ = std::fs::remove_dir_all(&dir);

    assert!(
        !stderr.contains("panicked") && !stderr.contains("Broken pipe"),
        "stderr: {stderr}"
    );
    assert!(
        status.signal() == Some(libc::SIGPIPE) || status.code() == Some(0),
        "status {status:?}, stderr: {stderr}"
    );
}
