//! The differential test of the per-container programs (issue 8): random cases ([`gen`]) run
//! through the real programs with `BPF_PROG_TEST_RUN` and through the reference model in
//! `netpol_common::model`; every packet's verdict, the drop event's cause (reason, identities,
//! rule) and the conntrack maps after it must agree.
//!
//! Used by `tests/tests/datapath_diff.rs` (a fixed seed set) and `cargo xtask fuzz datapath`
//! (random seeds for a while). A disagreement prints as a reproducible case: its seed, the maps,
//! every packet up to the one that disagreed in hex, expected against actual.

pub mod gen;
pub mod invariants;

use std::fmt::{self, Write as _};

use netpol_common::{
    ct::CtEntry,
    event::FlowEvent,
    frag::{Frag4Key, Frag6Key, FragL4},
    ipcache::RemoteInfo,
    maps,
    model::{CtKey, FragKey, Verdict, Why, World},
    Direction,
};

use crate::progtest::{private_netns_with_veths, Datapath, Prog, Sizes, PASS, SHOT};
pub use gen::{Case, Features, Via};
pub use invariants::Checks;

/// How far a conntrack expiry may be from the model's (the model reads the clock just before
/// the program does).
const EXPIRY_SLACK_NS: u64 = 250_000_000;

/// What a program run produced: its return value and the events it emitted, as
/// `(kind, reason, src_identity, dst_identity, rule)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub ret: u32,
    pub events: Vec<(u8, u8, u32, u32, u32)>,
}

impl Outcome {
    fn of(v: &Verdict) -> Self {
        match v {
            Verdict::Pass(_) => Self {
                ret: PASS,
                events: vec![],
            },
            Verdict::Drop(d) => Self {
                ret: SHOT,
                events: vec![(
                    FlowEvent::KIND_DROP,
                    d.reason as u8,
                    d.src_identity,
                    d.dst_identity,
                    d.rule,
                )],
            },
            Verdict::Audit(d) => Self {
                ret: PASS,
                events: vec![(
                    FlowEvent::KIND_AUDIT,
                    d.reason as u8,
                    d.src_identity,
                    d.dst_identity,
                    d.rule,
                )],
            },
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.ret {
            PASS => write!(f, "pass")?,
            SHOT => write!(f, "drop")?,
            r => write!(f, "return {r}")?,
        }
        for (kind, reason, src, dst, rule) in &self.events {
            let r = netpol_common::DropReason::from_u8(*reason).map_or("?", |r| r.as_str());
            write!(
                f,
                ", event kind {kind} reason {reason} ({r}) src {src} dst {dst} rule {rule}"
            )?;
        }
        Ok(())
    }
}

/// A packet on which the kernel and the model disagree, with all it takes to reproduce it.
#[derive(Debug)]
pub struct Disagreement {
    pub case: Case,
    pub ifindexes: Vec<u32>,
    /// The step that disagreed.
    pub step: usize,
    /// Earlier steps' outcomes (they agreed).
    pub before: Vec<Outcome>,
    pub expected: Outcome,
    /// Which check passed the packet in the model.
    pub why: Option<Why>,
    pub actual: Outcome,
    /// A violated property (first) and conntrack differences after the step (empty when only
    /// the verdict differs).
    pub ct: Vec<String>,
}

fn hex(b: &[u8]) -> String {
    b.iter()
        .fold(String::with_capacity(b.len() * 2), |mut s, x| {
            let _ = write!(s, "{x:02x}");
            s
        })
}

impl fmt::Display for Disagreement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.case;
        writeln!(
            f,
            "datapath disagreement in case seed {:#x} at step {} \
             (reproduce: cargo xtask fuzz datapath --seed {:#x} --seconds 0)",
            c.seed, self.step, c.seed
        )?;
        writeln!(
            f,
            "  conntrack in place (Config::CT_IN_PLACE): {}",
            c.world.ct_in_place
        )?;
        for (veth, ep) in &c.world.endpoints {
            writeln!(
                f,
                "  endpoint veth{veth} (ifindex {}): {ep:?}",
                self.ifindexes[*veth as usize]
            )?;
        }
        for (l, a, v) in &c.world.ipcache4 {
            writeln!(f, "  ipcache4 {a:?}/{l} → {v:?}")?;
        }
        for (l, a, v) in &c.world.ipcache6 {
            writeln!(f, "  ipcache6 {}/{l} → {v:?}", std::net::Ipv6Addr::from(*a))?;
        }
        for (l, k, v) in &c.world.policy {
            writeln!(
                f,
                "  policy /{l} local {} remote {} dir {} proto {} port {} → {}",
                k.local,
                k.remote,
                k.direction,
                k.proto,
                k.dport(),
                if v.is_deny() { "deny" } else { "allow" },
            )?;
            writeln!(f, "    rule {}", v.rule)?;
        }
        for ((k, e), off) in c.world.ct.iter().zip(&c.ct_offsets) {
            writeln!(
                f,
                "  conntrack {k:?} flags {} rule {} veth{} identity {} expires start{:+} s",
                e.flags,
                e.rule,
                e.ifindex,
                e.identity,
                off / 1_000_000_000
            )?;
        }
        for (i, s) in c.steps.iter().enumerate().take(self.step + 1) {
            let mark = if i == self.step { ">" } else { " " };
            let out = self
                .before
                .get(i)
                .map_or(String::new(), |o| format!(" → {o}"));
            writeln!(
                f,
                "{mark} {i:3} veth{} {:?} via {:?} {}{out}\n        {}",
                s.veth,
                s.dir,
                s.via,
                s.what,
                hex(&s.frame)
            )?;
        }
        match self.why {
            Some(w) => writeln!(f, "  expected (model): {} ({w:?})", self.expected)?,
            None => writeln!(f, "  expected (model): {}", self.expected)?,
        }
        writeln!(f, "  actual (kernel):  {}", self.actual)?;
        for d in &self.ct {
            writeln!(f, "  {d}")?;
        }
        Ok(())
    }
}

/// Statistics of a run.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub cases: u64,
    pub packets: u64,
    pub passed: u64,
    /// Passes by the model's reason.
    pub why: std::collections::BTreeMap<Why, u64>,
    /// Drops by `DropReason` number.
    pub dropped: Vec<u64>,
}

impl Stats {
    /// "N packets: N passed, N dropped (reason N, …)".
    pub fn summary(&self) -> String {
        let total: u64 = self.dropped.iter().sum();
        let why: Vec<String> = self.why.iter().map(|(w, n)| format!("{w:?} {n}")).collect();
        let mut s = format!(
            "{} packets: {} passed (model: {}), {total} dropped",
            self.packets,
            self.passed,
            why.join(", ")
        );
        let reasons: Vec<String> = self
            .dropped
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .map(|(r, n)| {
                let name = netpol_common::DropReason::from_u8(r as u8).map_or("?", |r| r.as_str());
                format!("{name} {n}")
            })
            .collect();
        if !reasons.is_empty() {
            s.push_str(&format!(" ({})", reasons.join(", ")));
        }
        s
    }
}

/// One loaded copy of the programs in a private network namespace with three endpoint veths and
/// a stand-in for the uplink.
pub struct Runner {
    dp: Datapath,
    /// The endpoints' veths.
    pub ifindexes: Vec<u32>,
    /// A device standing for the uplink (`ingress_ifindex` of packets from outside).
    pub uplink: u32,
    /// A device standing for the containers' bridge (`ingress_ifindex` of a container's packets
    /// that the host routed).
    pub bridge: u32,
    pub features: Features,
    /// Properties checked on every packet the kernel passes.
    pub checks: Checks,
}

impl Runner {
    /// Moves the calling thread into a new network namespace (see
    /// [`private_netns_with_veths`]) and loads the programs.
    pub fn new(features: Features) -> Self {
        let mut ifindexes = private_netns_with_veths(&[
            "npd-veth0",
            "npd-veth1",
            "npd-veth2",
            "npd-uplink",
            "npd-bridge",
        ]);
        let bridge = ifindexes.pop().unwrap();
        let uplink = ifindexes.pop().unwrap();
        let mut dp = Datapath::load(Sizes {
            ct: 4096,
            ..Sizes::default()
        });
        // Every drop's event is compared with the model's: no rate limit (a run emits thousands
        // a second, more than the default limit lets through).
        dp.config_with_rate(0, u32::MAX);
        Self {
            dp,
            ifindexes,
            uplink,
            bridge,
            features,
            checks: Checks::NOW,
        }
    }

    /// Generates and runs the case of `seed`.
    pub fn run_seed(&mut self, seed: u64, stats: &mut Stats) -> Result<(), Box<Disagreement>> {
        let case = Case::generate(seed, self.ifindexes.len(), self.features);
        self.run_case(&case, stats)
    }

    pub fn run_case(&mut self, case: &Case, stats: &mut Stats) -> Result<(), Box<Disagreement>> {
        let start = crate::progtest::now_ns();
        let mut model = case.world.clone();
        for (veth, _) in model.endpoints.iter_mut() {
            *veth = self.ifindexes[*veth as usize];
        }
        // ipcache and conntrack interfaces are `veth index + 1` (0: none) or the bridge.
        let iface = |v: u32| match v {
            0 => 0,
            gen::BRIDGE_SLOT => self.bridge,
            v => self.ifindexes[v as usize - 1],
        };
        // A host address (`ifindex` 0) keeps its `NO_IFINDEX`.
        let info_iface = |info: &mut RemoteInfo| {
            if info.ifindex != 0 {
                info.ifindex = iface(info.ifindex);
                info.bridge_ifindex = iface(info.bridge_ifindex);
            }
        };
        for (_, _, info) in model.ipcache4.iter_mut() {
            info_iface(info);
        }
        for (_, _, info) in model.ipcache6.iter_mut() {
            info_iface(info);
        }
        for ((_, e), off) in model.ct.iter_mut().zip(&case.ct_offsets) {
            e.expires_ns = start.saturating_add_signed(*off);
            // Held by the endpoint of that veth index.
            e.ifindex = self.ifindexes[e.ifindex as usize];
            e.remote_ifindex = iface(e.remote_ifindex);
            e.remote_bridge = iface(e.remote_bridge);
        }
        let dp = &mut self.dp;
        dp.clear();
        dp.set_ct_in_place(model.ct_in_place);
        for (ifindex, ep) in &model.endpoints {
            dp.endpoint(*ifindex, *ep);
        }
        for (l, a, id) in &model.ipcache4 {
            dp.ipcache4(*l, *a, *id);
        }
        for (l, a, id) in &model.ipcache6 {
            dp.ipcache6(*l, *a, *id);
        }
        for (l, k, v) in &model.policy {
            dp.policy(*l, *k, *v);
        }
        for (est, table) in [(true, &model.ct), (false, &model.ct_new)] {
            for (k, e) in table {
                match k {
                    CtKey::V4(k) => dp.set_ct4(*k, *e, est),
                    CtKey::V6(k) => dp.set_ct6(*k, *e, est),
                }
            }
        }
        stats.cases += 1;
        let mut before = Vec::new();
        for (i, s) in case.steps.iter().enumerate() {
            let ifindex = self.ifindexes[s.veth];
            let now = crate::progtest::now_ns();
            let via = match s.via {
                Via::Own => ifindex,
                Via::Veth(v) => self.ifindexes[v],
                Via::Uplink => self.uplink,
                Via::Bridge => self.bridge,
                Via::Host => 0,
            };
            let verdict = model.run_via(ifindex, via, s.dir, &s.frame, now);
            if let Verdict::Pass(why) = verdict {
                *stats.why.entry(why).or_default() += 1;
            }
            let expected = Outcome::of(&verdict);
            let prog = match s.dir {
                Direction::Egress => Prog::From,
                Direction::Ingress => Prog::To,
            };
            let ret = self.dp.run_via(prog, ifindex, via, &s.frame);
            let events = self
                .dp
                .events()
                .iter()
                .map(|e| (e.kind, e.reason, e.src_identity, e.dst_identity, e.rule))
                .collect();
            let actual = Outcome { ret, events };
            stats.packets += 1;
            match actual.events.first() {
                Some(e) if actual.ret == SHOT => {
                    let r = e.1 as usize;
                    if stats.dropped.len() <= r {
                        stats.dropped.resize(r + 1, 0);
                    }
                    stats.dropped[r] += 1;
                }
                _ => stats.passed += 1,
            }
            let mut ct = ct_differences(&model, &self.dp);
            ct.extend(frag_differences(&model, &self.dp));
            if actual.ret == PASS {
                if let Some(v) = invariants::violated(
                    &self.checks,
                    &model,
                    ifindex,
                    via,
                    s.dir,
                    &s.frame,
                    match verdict {
                        Verdict::Pass(w) => Some(w),
                        Verdict::Drop(_) => None,
                        Verdict::Audit(_) => Some(Why::Audited),
                    },
                ) {
                    ct.insert(0, format!("violates {v}"));
                }
            }
            if actual != expected || !ct.is_empty() {
                return Err(Box::new(Disagreement {
                    case: case.clone(),
                    ifindexes: self.ifindexes.clone(),
                    step: i,
                    before,
                    expected,
                    why: match verdict {
                        Verdict::Pass(w) => Some(w),
                        Verdict::Drop(_) => None,
                        Verdict::Audit(_) => Some(Why::Audited),
                    },
                    actual,
                    ct,
                }));
            }
            before.push(actual);
        }
        Ok(())
    }
}

/// The differences between a table of the model and the same map in the kernel, one line each
/// (`what` names the map); `differs` compares two values of one key.
fn differences<K: PartialEq + fmt::Debug, V: fmt::Debug>(
    what: &str,
    model: &[(K, V)],
    mut kernel: Vec<(K, V)>,
    differs: impl Fn(&V, &V) -> bool,
) -> Vec<String> {
    let mut out = Vec::new();
    for (k, want) in model {
        match kernel.iter().position(|(x, _)| x == k) {
            Some(i) => {
                let (_, got) = kernel.swap_remove(i);
                if differs(want, &got) {
                    out.push(format!("{what} {k:?}: model {want:?}, kernel {got:?}"));
                }
            }
            None => out.push(format!("{what} {k:?}: model {want:?}, kernel has none")),
        }
    }
    for (k, got) in kernel {
        out.push(format!("{what} {k:?}: model has none, kernel {got:?}"));
    }
    out
}

/// The differences between the model's fragment records and `FRAG4` / `FRAG6`.
fn frag_differences(model: &World, dp: &Datapath) -> Vec<String> {
    let kernel: Vec<(FragKey, FragL4)> = dp
        .dump::<Frag4Key, FragL4>(maps::FRAG4)
        .into_iter()
        .map(|(k, v)| (FragKey::V4(k), v))
        .chain(
            dp.dump::<Frag6Key, FragL4>(maps::FRAG6)
                .into_iter()
                .map(|(k, v)| (FragKey::V6(k), v)),
        )
        .collect();
    differences("fragment record", &model.frag, kernel, |a, b| a != b)
}

/// Conntrack entries agree on everything but the expiry, which may be off by the time between
/// the model's clock read and the program's, and the ipcache generation the datapath recorded
/// (a cache of what the ipcache said, which the model does not keep: it decides as if every
/// packet looked its remote up).
fn entry_differs(want: &CtEntry, got: &CtEntry) -> bool {
    CtEntry {
        expires_ns: 0,
        ipcache_gen: [0; 3],
        ..*want
    } != CtEntry {
        expires_ns: 0,
        ipcache_gen: [0; 3],
        ..*got
    } || want.expires_ns.abs_diff(got.expires_ns) > EXPIRY_SLACK_NS
}

/// The differences between the model's conntrack and the kernel's maps (both tables).
fn ct_differences(model: &World, dp: &Datapath) -> Vec<String> {
    let mut out = Vec::new();
    for (est, table, name) in [
        (true, &model.ct, "conntrack established"),
        (false, &model.ct_new, "conntrack new"),
    ] {
        let kernel: Vec<(CtKey, CtEntry)> = dp
            .ct4_all(est)
            .into_iter()
            .map(|(k, e)| (CtKey::V4(k), e))
            .chain(dp.ct6_all(est).into_iter().map(|(k, e)| (CtKey::V6(k), e)))
            .collect();
        out.extend(differences(name, table, kernel, entry_differs));
    }
    out
}
