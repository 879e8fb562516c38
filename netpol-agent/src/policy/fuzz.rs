//! A mutation fuzzer for the policy parser, with no engine to install: inputs from a committed
//! corpus (`tests/fuzz/corpus/policy/`), mutated by a seeded generator, parsed with
//! [`parse_str`](super::parse_str) and, when valid, compiled. Every input must give `Ok` or
//! ordinary errors — never a panic (which the parser turns into [`ErrorKind::Internal`]) — within
//! [`MAX_TIME`]. A fixed number of iterations runs in the unit tests; `cargo xtask fuzz policy`
//! runs longer and also watches heap use.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use super::{compile, parse_str, Endpoints, ErrorKind};
use crate::identity::{Labels, COMPOSE_PROJECT, COMPOSE_SERVICE};

/// Longest a parse (and compile) of one input may take.
pub const MAX_TIME: Duration = Duration::from_secs(1);
/// Mutated inputs are cut to this many bytes (limits are reached through repetition anyway).
const MAX_INPUT: usize = 256 << 10;

/// The committed corpus.
pub fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fuzz/corpus/policy")
}

/// Every file of `dir`, sorted by name: (name, bytes).
pub fn load_corpus(dir: &Path) -> std::io::Result<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        if e.file_type()?.is_file() {
            out.push((
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path())?,
            ));
        }
    }
    out.sort();
    Ok(out)
}

/// What one input did.
pub struct Sample<'a> {
    pub input: &'a str,
    pub took: Duration,
    pub valid: bool,
}

#[derive(Debug, Default)]
pub struct Report {
    pub iterations: u64,
    /// Inputs that parsed (and compiled).
    pub valid: u64,
    pub slowest: Duration,
    pub longest_input: usize,
}

/// An input that broke a property.
#[derive(Debug)]
pub struct Failure {
    pub iteration: u64,
    pub input: String,
    pub why: String,
}

/// Runs `iterations` mutated inputs (or until `deadline`), calling `observe` after each.
pub fn run(
    corpus: &[(String, Vec<u8>)],
    seed: u64,
    iterations: u64,
    deadline: Option<Instant>,
    observe: &mut dyn FnMut(&Sample) -> Result<(), String>,
) -> Result<Report, Failure> {
    assert!(!corpus.is_empty(), "empty corpus");
    let mut rng = Rng(seed.max(1));
    let endpoints = endpoints();
    let mut report = Report::default();
    for iteration in 0..iterations {
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        let base = &corpus[rng.below(corpus.len())].1;
        let mut input = base.clone();
        for _ in 0..1 + rng.below(8) {
            mutate(&mut rng, &mut input, corpus);
        }
        input.truncate(MAX_INPUT);
        let text = String::from_utf8_lossy(&input).into_owned();
        let fail = |why: String| Failure {
            iteration,
            input: text.clone(),
            why,
        };
        let t = Instant::now();
        let parsed = parse_str("fuzz.yaml", &text);
        let valid = match &parsed {
            Ok(policies) => match compile(policies, &endpoints) {
                Ok(c) => {
                    if let Err(why) = one_lookup_agrees(&c) {
                        return Err(fail(why));
                    }
                    true
                }
                Err(super::CompileError::TooManyEntries { .. }) => false,
                Err(e) => return Err(fail(format!("compile: {e}"))),
            },
            Err(errors) => {
                if let Some(e) = errors
                    .0
                    .iter()
                    .find(|e| matches!(e.kind, ErrorKind::Internal(_)))
                {
                    return Err(fail(format!("panic: {e}")));
                }
                let lines = text.lines().count() + 1;
                if let Some(e) = errors.0.iter().find(|e| e.line > lines || e.line == 0) {
                    return Err(fail(format!("error outside the text ({lines} lines): {e}")));
                }
                false
            }
        };
        let took = t.elapsed();
        if took > MAX_TIME {
            return Err(fail(format!("took {took:?}")));
        }
        observe(&Sample {
            input: &text,
            took,
            valid,
        })
        .map_err(fail)?;
        report.iterations += 1;
        report.valid += u64::from(valid);
        report.slowest = report.slowest.max(took);
        report.longest_input = report.longest_input.max(text.len());
    }
    Ok(report)
}

/// The kernel's lookup (one lookup after a deny or a `FINAL` allow) gives the verdict of both
/// lookups for every remote of the entries and every port at an edge of an entry's range (a
/// wildcard deny that overlaps an allow has an edge inside it, or contains it). Results of more
/// than 400 entries are not checked (the LPM here is a scan).
fn one_lookup_agrees(c: &super::Compiled) -> Result<(), String> {
    use netpol_common::{
        identity::{ANY, WORLD},
        policy::{decide, lookup, lookup_keys, PortBlock, PREFIX_ANY_PORT, PREFIX_ANY_PROTO},
        Direction,
    };
    if c.policy.len() > 400 {
        return Ok(());
    }
    let get = |k: &netpol_common::policy::PolicyKey| {
        netpol_common::lpm::policy(c.policy.iter().map(|(e, v)| (e.prefix_len, &e.key, *v)), k)
    };
    let mut probes = std::collections::BTreeSet::new();
    for e in c.policy.keys() {
        let k = &e.key;
        let protos: &[u8] = if e.prefix_len <= PREFIX_ANY_PROTO {
            &[6, 17, 1, 58, 47]
        } else {
            std::slice::from_ref(&k.proto)
        };
        let (first, last) = if e.prefix_len <= PREFIX_ANY_PORT {
            (0, u16::MAX)
        } else {
            let b = PortBlock {
                port: k.dport(),
                bits: (e.prefix_len - PREFIX_ANY_PORT).min(16) as u8,
            };
            (b.first(), b.last())
        };
        for &p in protos {
            for port in [first, last] {
                probes.insert((k.local, k.direction, p, port));
            }
        }
    }
    let mut remotes: std::collections::BTreeSet<u32> =
        c.policy.keys().map(|e| e.key.remote).collect();
    remotes.remove(&ANY);
    remotes.insert(WORLD);
    for &(local, dir, p, port) in &probes {
        let dir = Direction::from_u8(dir).unwrap_or(Direction::Ingress);
        for &remote in &remotes {
            let [a, b] = lookup_keys(local, remote, dir, p, port);
            let both = decide(get(&a), get(&b));
            let fast = lookup(local, remote, dir, p, port, get);
            if fast != both {
                return Err(format!(
                    "one lookup gave {fast:?}, both {both:?}: {local} <- {remote} {dir:?} {p}/{port}"
                ));
            }
        }
    }
    Ok(())
}

/// A few containers for compiles: two compose services and one with other labels.
fn endpoints() -> Endpoints {
    let labels = |pairs: &[(&str, &str)]| -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let mut e = Endpoints::new();
    e.insert(
        300,
        labels(&[(COMPOSE_PROJECT, "shop"), (COMPOSE_SERVICE, "db")]),
    );
    e.insert(
        301,
        labels(&[(COMPOSE_PROJECT, "shop"), (COMPOSE_SERVICE, "app1")]),
    );
    e.insert(302, labels(&[("app", "web"), ("tier", "front")]));
    e
}

/// Pieces of YAML and of policies that mutations insert.
const TOKENS: &[&str] = &[
    "- ",
    "\n",
    "\n  ",
    "\n    - ",
    ": ",
    ", ",
    "[",
    "]",
    "{",
    "}",
    "[]",
    "{}",
    "~",
    "null",
    "&a ",
    "*a",
    "&b ",
    "*b",
    "!!str ",
    "!!int ",
    "!x ",
    "? ",
    "|\n  ",
    ">\n  ",
    "'",
    "\"",
    "#",
    "---\n",
    "...\n",
    "%YAML 1.2\n",
    "\t",
    "\u{feff}",
    "\\u0000",
    "0",
    "0443",
    "65535",
    "65536",
    "-1",
    "true",
    "false",
    "0.0.0.0/0",
    "::/0",
    "10.0.0.0/8",
    "fd00::/8",
    "10.0.0.5",
    "fromEndpoints: ",
    "toEndpoints: ",
    "fromEntities: [world]",
    "toEntities: [all]",
    "fromCIDR: ",
    "toCIDRSet: ",
    "except: [10.1.0.0/16]",
    "toPorts: ",
    "ports: ",
    "port: ",
    "endPort: ",
    "protocol: TCP",
    "icmps: [{fields: [{type: 8}]}]",
    "matchLabels: ",
    "matchExpressions: [{key: a, operator: In, values: [b]}]",
    "endpointSelector: ",
    "enableDefaultDeny: {egress: true}",
    "ingress: ",
    "egressDeny: ",
    "specs: ",
    "spec: ",
    "metadata: {name: x}",
    "namespace: x",
    "any:",
    "reserved:host",
];

fn mutate(rng: &mut Rng, input: &mut Vec<u8>, corpus: &[(String, Vec<u8>)]) {
    let len = input.len();
    let at = rng.below(len + 1);
    match rng.below(7) {
        // Replace a byte.
        0 if len > 0 => {
            const BYTES: &[u8] = b"[]{}:,-&*!#|>'\"\n ~0123456789abcxyz/.\\\t?%@`";
            input[at.min(len - 1)] = BYTES[rng.below(BYTES.len())];
        }
        // Insert a token.
        1 | 2 => {
            let t = TOKENS[rng.below(TOKENS.len())].as_bytes();
            input.splice(at..at, t.iter().copied());
        }
        // Delete a range.
        3 if len > 0 => {
            let n = 1 + rng.below(16.min(len - at.min(len - 1)));
            let start = at.min(len - 1);
            input.drain(start..(start + n).min(len));
        }
        // Repeat a range, up to 256 times (reaches the nesting and count limits).
        4 if len > 0 => {
            let start = at.min(len - 1);
            let n = 1 + rng.below(32.min(len - start));
            let piece: Vec<u8> = input[start..start + n].to_vec();
            let most = if rng.below(4) == 0 { 256 } else { 4 };
            let times = 1 + rng.below(most);
            let mut rep = Vec::with_capacity(piece.len() * times);
            for _ in 0..times {
                rep.extend_from_slice(&piece);
            }
            input.splice(start..start, rep);
        }
        // Splice in a line of another corpus file.
        5 => {
            let other = &corpus[rng.below(corpus.len())].1;
            let lines: Vec<&[u8]> = other.split(|&b| b == b'\n').collect();
            let line = lines[rng.below(lines.len())];
            let at = input[..at]
                .iter()
                .rposition(|&b| b == b'\n')
                .map_or(0, |p| p + 1);
            input.splice(at..at, line.iter().copied().chain([b'\n']));
        }
        // Change indentation of a line.
        _ => {
            let at = input[..at]
                .iter()
                .rposition(|&b| b == b'\n')
                .map_or(0, |p| p + 1);
            if rng.below(2) == 0 {
                input.splice(at..at, *b"  ");
            } else if input.get(at) == Some(&b' ') {
                input.remove(at);
            }
        }
    }
}

/// xorshift64*: small, seeded, good enough to pick mutations (and random policies in
/// `incremental_tests`).
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform enough in `0..n` (`n` > 0; 0 gives 0).
    pub(crate) fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            return 0;
        }
        (self.next() % n as u64) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The README test command's share of fuzzing: a fixed seed and number of inputs.
    #[test]
    fn policy_parser_survives_mutated_inputs() {
        let corpus = load_corpus(&corpus_dir()).expect("corpus");
        assert!(corpus.len() >= 10, "corpus at {}", corpus_dir().display());
        let report = match run(&corpus, 0x6e70_6f6c, 3_000, None, &mut |_| Ok(())) {
            Ok(r) => r,
            Err(f) => panic!(
                "iteration {}: {}\n--- input ---\n{}",
                f.iteration, f.why, f.input
            ),
        };
        assert_eq!(report.iterations, 3_000);
        assert!(report.valid > 0, "some mutated inputs stay valid");
    }

    #[test]
    fn every_corpus_file_parses_or_fails_cleanly() {
        for (name, bytes) in load_corpus(&corpus_dir()).unwrap() {
            let text = String::from_utf8_lossy(&bytes);
            match parse_str(&name, &text) {
                Err(e) => assert!(
                    !e.0.iter().any(|e| matches!(e.kind, ErrorKind::Internal(_))),
                    "{e}"
                ),
                Ok(p) => {
                    if let Ok(c) = compile(&p, &endpoints()) {
                        if let Err(why) = one_lookup_agrees(&c) {
                            panic!("{name}: {why}");
                        }
                    }
                }
            }
        }
    }
}
