//! The agent's Prometheus endpoint, from a test: scrape it (over its Unix socket), lint the
//! output with `promtool check metrics` (Debian's `prometheus` package, installed by
//! `scripts/setup.sh`), and read samples.

use std::{
    io::{Read, Write},
    os::unix::net::UnixStream,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

/// `GET /metrics` over the Unix socket at `path`; panics unless the answer is 200.
pub fn scrape_unix(path: &Path) -> String {
    let mut s = UnixStream::connect(path)
        .unwrap_or_else(|e| panic!("connect to the metrics socket {}: {e}", path.display()));
    s.set_read_timeout(Some(Duration::from_secs(30))).ok();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .expect("send the scrape request");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read the scrape answer");
    let raw = String::from_utf8(raw).expect("the scrape is UTF-8");
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP header in {raw:?}"));
    assert!(
        head.starts_with("HTTP/1.1 200"),
        "scrape answered {head:?}: {body}"
    );
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "not the Prometheus text format: {head}"
    );
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return dechunk(body);
    }
    body.to_owned()
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    loop {
        let (len, rest) = body.split_once("\r\n").expect("chunk size line");
        let len = usize::from_str_radix(len.trim(), 16).expect("chunk size");
        if len == 0 {
            return out;
        }
        out.push_str(&rest[..len]);
        body = &rest[len + 2..];
    }
}

/// `promtool`: where `scripts/setup.sh` unpacks it (`NETPOL_PROMTOOL_DIR`, by default
/// `/var/cache/netpol/prometheus`), else the one on `PATH`.
fn promtool() -> std::path::PathBuf {
    let dir = std::env::var_os("NETPOL_PROMTOOL_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| "/var/cache/netpol/prometheus".into());
    let unpacked = dir.join("usr/bin/promtool");
    if unpacked.is_file() {
        unpacked
    } else {
        "promtool".into()
    }
}

/// Runs `promtool check metrics` on `text`; panics with its findings if it finds anything.
pub fn promtool_check(text: &str) {
    let mut child = Command::new(promtool())
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("running promtool: {e} (scripts/setup.sh installs Debian's prometheus package)")
        });
    child
        .stdin
        .take()
        .expect("promtool stdin")
        .write_all(text.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("promtool");
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {}\n{}{}\non:\n{text}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Parses `k="v",…` (the label part of a sample line) with the exposition format's escapes.
fn labels(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek() == Some(&',') {
            chars.next();
        }
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() {
            return out;
        }
        assert_eq!(
            chars.next(),
            Some('"'),
            "label {key} without a quoted value"
        );
        let mut value = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some('n') => value.push('\n'),
                    Some(c) => value.push(c),
                    None => break,
                },
                '"' => break,
                c => value.push(c),
            }
        }
        out.push((key, value));
    }
}

/// Every sample of `name` whose labels include all of `want`, with its labels and value.
pub fn samples(text: &str, name: &str, want: &[(&str, &str)]) -> Vec<(Vec<(String, String)>, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, ls) = match series.split_once('{') {
                Some((n, rest)) => (n, labels(rest.strip_suffix('}')?)),
                None => (series, Vec::new()),
            };
            if n != name {
                return None;
            }
            let matches = want
                .iter()
                .all(|(k, v)| ls.iter().any(|(lk, lv)| lk == k && lv == v));
            if !matches {
                return None;
            }
            Some((ls, value.parse().ok()?))
        })
        .collect()
}

/// The sum of the samples of `name` whose labels include all of `want` (0 when there is none).
pub fn sum(text: &str, name: &str, want: &[(&str, &str)]) -> f64 {
    samples(text, name, want).iter().map(|(_, v)| v).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_match_by_label_subset() {
        let t = "# TYPE x_total counter\n\
                 x_total{container=\"a\",reason=\"r\\\"q\"} 3\n\
                 x_total{container=\"b\",reason=\"r\"} 4\n\
                 y 1\n";
        assert_eq!(sum(t, "x_total", &[("container", "a")]), 3.0);
        assert_eq!(sum(t, "x_total", &[("reason", "r\"q")]), 3.0);
        assert_eq!(sum(t, "x_total", &[]), 7.0);
        assert_eq!(sum(t, "y", &[]), 1.0);
        assert_eq!(sum(t, "x_total", &[("container", "c")]), 0.0);
        assert_eq!(dechunk("3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"), "abcde");
    }
}
