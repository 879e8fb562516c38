//! The aya-backed [`Datapath`]: loads the object once, pins every map and link under the pin
//! directory, and on a restart re-adopts them.
//!
//! Adoption: maps are opened from their pins (`EbpfLoader::map_pin_path`: an existing pin is reused,
//! a missing one is created and pinned), so their contents survive. The programs are loaded again
//! (a newer agent may bring newer code) and every pinned TCX link is switched to the new program
//! with `bpf_link_update`, which replaces the program atomically: there is no moment in which the
//! interface runs without a program. Pinned links keep the programs attached while no agent runs.
//!
//! Attachment order: TCX links are created first in the interface's chain
//! (`LinkOrder::first()`), so no earlier program can return OK and skip enforcement. On adoption
//! the chain is checked: if a program was put before ours meanwhile, a new link is attached first
//! and only then the old one is dropped (no moment without enforcement).
//!
//! The clsact fallback (kernels without TCX, or `--attach netlink`) uses one fixed filter per
//! direction ([`NL_PRIORITY`], [`NL_HANDLE`]): a restart replaces the program of that filter in
//! place (cls_bpf swaps it atomically) instead of adding a second one, and `detach` deletes it.
//!
//! Which of the two is used is decided by probing the kernel: a TCX attach on the loopback device
//! of a throwaway network namespace (see [`probe_tcx`]).
//!
//! Layout under the pin directory: `<MAP NAME>` for every map, `links/<ifindex>_from` and
//! `links/<ifindex>_to` for the two TCX links of a managed veth; in clsact mode the empty
//! directories `links/<ifindex>_from_tc` and `links/<ifindex>_to_tc` record the filters (bpffs
//! holds no plain files, and no names with a dot).
//!
//! Upgrades across a map layout change: a map whose layout changes gets a new name, so the new
//! programs never read an old pinned map. Maps pinned under a former name
//! (`netpol_common::maps::legacy`) are still used by the old programs until the links switch;
//! before switching, [`KernelDatapath::open`] copies what they hold into the new maps (ipcache
//! identities; conntrack entries, tied to the endpoint that holds their local address), so the
//! switch neither opens the ipcache to `world` nor breaks established flows. After the switch
//! the old pins are removed (the old programs, and with them the old maps, are gone). Entries
//! the old programs create between the copy and the switch are lost: such a flow is decided
//! again by policy (a denied packet never passes).

use std::{
    collections::BTreeSet,
    ffi::CStr,
    fs, io,
    net::IpAddr,
    path::{Path, PathBuf},
};

use aya::{
    maps::{
        lpm_trie::{Key, LpmTrie},
        Array, HashMap, Map, MapData, MapError, PerCpuArray, PerCpuHashMap,
    },
    programs::{
        links::{FdLink, PinnedLink},
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
        Link, LinkOrder, ProgramError, SchedClassifier, TcAttachType,
    },
    Ebpf, EbpfLoader,
};
use netpol_common::{
    ct::{CtDir, CtEntry, CtKey4, CtKey6},
    endpoint::Endpoint,
    epdrop::{self, EpDropKey},
    ipcache::RemoteInfo,
    maps,
    policy::{PolicyKey, PolicyValue},
    programs,
    stats::{EventStats, RuleStats, RuleStatsKey},
    Config, DropReason,
};
use tracing::{debug, info, warn};

use super::{
    Cidr, Datapath, DatapathError, DropCounters, MapSizes, MapState, PolicyEntryKey, RuleCounters,
    LXC_SIZED,
};

/// The masquerade's maps in the shared object (loaded, sized and pinned by `masq6`).
const MASQ6_MAPS: [&str; 5] = [
    maps::SNAT6,
    maps::MASQ6_CONFIG,
    maps::MASQ6_PREFIXES,
    netpol_common::nat::maps::MASQ6_STATS,
    netpol_common::nat::maps::MASQ6_FRAG,
];

/// `sizes` with the size of every map of `names` already pinned under `pin_dir` as it is
/// pinned ([`MapSizes::adopt_pinned`]); a difference from the configured size is logged.
pub(crate) fn adopt_pinned_sizes(
    pin_dir: &Path,
    sizes: MapSizes,
    names: &[&'static str],
) -> MapSizes {
    let (sizes, mismatches) = sizes.adopt_pinned(names, |name| {
        let path = pin_dir.join(name);
        if !path.exists() {
            return None;
        }
        match aya::maps::MapInfo::from_pin(&path) {
            Ok(info) => Some(info.max_entries()),
            Err(e) => {
                warn!(map = name, error = %e, "reading the size of a pinned map");
                None
            }
        }
    });
    for m in mismatches {
        warn!(
            map = m.map,
            pinned = m.pinned,
            configured = m.configured,
            "a pinned map keeps its size (its entries keep enforcing); the configured size applies once the map is created anew (after a reboot)"
        );
    }
    sizes
}

/// How the programs are attached to an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    /// TCX links (Linux ≥ 6.6), pinned, first in the chain: survive the agent, replaced atomically
    /// on restart.
    Tcx,
    /// clsact + cls_bpf filters through netlink: for kernels without TCX. One filter per direction
    /// at a fixed priority and handle; filters outlive the agent on their own, and a restart
    /// replaces their program in place.
    Netlink,
}

/// Priority of the clsact filters: 1 runs before any other priority.
pub const NL_PRIORITY: u16 = 1;
/// Handle of the clsact filters (`tc filter show` prints it as `handle 0x4e50`).
pub const NL_HANDLE: TcHandle = TcHandle::new(0, 0x4e50);

pub struct KernelDatapath {
    bpf: Ebpf,
    pin_dir: PathBuf,
    sizes: MapSizes,
    mode: AttachMode,
    /// Whether the maps were found pinned (an adoption) rather than created.
    adopted: bool,
}

fn map_err(map: &'static str) -> impl Fn(MapError) -> DatapathError {
    move |source| match &source {
        MapError::SyscallError(e)
            if matches!(
                e.io_error.raw_os_error(),
                Some(libc::E2BIG) | Some(libc::ENOSPC) | Some(libc::ENOMEM)
            ) =>
        {
            DatapathError::MapFull { map, max: 0 }
        }
        _ => DatapathError::Map { map, source },
    }
}

fn is_not_found(e: &MapError) -> bool {
    match e {
        MapError::KeyNotFound => true,
        MapError::SyscallError(s) => s.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

/// Mounts bpffs at `/sys/fs/bpf` when nothing is mounted there (these machines boot without it).
pub fn ensure_bpffs() -> Result<(), DatapathError> {
    let target = Path::new("/sys/fs/bpf");
    let mounts = fs::read_to_string("/proc/self/mounts")?;
    if mounts.lines().any(|l| {
        let mut f = l.split_whitespace();
        let _src = f.next();
        f.next() == Some("/sys/fs/bpf") && f.next() == Some("bpf")
    }) {
        return Ok(());
    }
    fs::create_dir_all(target)?;
    // SAFETY: valid NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(
            c"bpffs".as_ptr(),
            c"/sys/fs/bpf".as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(DatapathError::Bpffs(format!(
            "mount bpf on /sys/fs/bpf: {}",
            io::Error::last_os_error()
        )));
    }
    info!("mounted bpffs on /sys/fs/bpf");
    Ok(())
}

pub(crate) fn ifname(ifindex: u32) -> Result<String, DatapathError> {
    let mut buf = [0u8; libc::IF_NAMESIZE];
    // SAFETY: buf has IF_NAMESIZE bytes as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr().cast()) };
    if p.is_null() {
        return Err(DatapathError::NoSuchInterface(ifindex));
    }
    // SAFETY: if_indextoname wrote a NUL-terminated name into buf.
    let name = unsafe { CStr::from_ptr(buf.as_ptr().cast()) };
    Ok(name.to_string_lossy().into_owned())
}

fn side(prog: &str) -> &'static str {
    if prog == programs::FROM_CONTAINER {
        "from"
    } else {
        "to"
    }
}

fn attach_type(prog: &str) -> TcAttachType {
    if prog == programs::FROM_CONTAINER {
        TcAttachType::Ingress
    } else {
        TcAttachType::Egress
    }
}

/// Deletes netpol's clsact filter for `prog` on `ifindex`. An interface or filter that is gone is
/// not an error.
fn remove_tc_filter(ifindex: u32, prog: &str) -> Result<(), String> {
    // A vanished interface took its filters with it.
    let Ok(ifname) = ifname(ifindex) else {
        return Ok(());
    };
    tc_remove_fixed(&ifname, attach_type(prog), NL_HANDLE)
}

/// Deletes the clsact filter at [`NL_PRIORITY`] and `handle` on `ifname`'s `ty` side. A filter
/// that is not there is not an error.
pub(crate) fn tc_remove_fixed(
    ifname: &str,
    ty: TcAttachType,
    handle: TcHandle,
) -> Result<(), String> {
    let gone = SchedClassifierLink::attached(ifname, ty, NL_PRIORITY, handle, None)
        .map_err(ProgramError::from)
        .and_then(Link::detach);
    match gone {
        Ok(()) => Ok(()),
        Err(ProgramError::NetlinkError(e))
            if matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ENODEV)) =>
        {
            Ok(())
        }
        Err(e) => Err(format!(
            "clsact filter handle {:#x} ({ty:?}) on {ifname}: {e}",
            u32::from(handle)
        )),
    }
}

/// Puts `prog` into the clsact filter at [`NL_PRIORITY`] and `handle` on `ifname`'s `ty` side:
/// replaces the program of an existing filter in place (cls_bpf swaps it atomically), or creates
/// the filter. The filter outlives this process.
pub(crate) fn tc_attach_fixed(
    prog: &mut SchedClassifier,
    ifname: &str,
    ty: TcAttachType,
    handle: TcHandle,
) -> Result<(), String> {
    // "Exclusivity flag on" means the qdisc is already there.
    let _ = tc::qdisc_add_clsact(ifname);
    let existing = SchedClassifierLink::attached(ifname, ty, NL_PRIORITY, handle, None)
        .map_err(|e| e.to_string())?;
    let id = match prog.attach_to_link(existing) {
        Ok(id) => id,
        // No such filter yet (or not replaceable): create it.
        Err(replace_err) => prog
            .attach_with_options(
                ifname,
                ty,
                TcAttachOptions::Netlink(NlOptions {
                    priority: NL_PRIORITY,
                    handle,
                    classid: None,
                }),
            )
            .map_err(|e| format!("{e} (replacing: {replace_err})"))?,
    };
    // Keep the filter when this process exits (dropping the link would delete it).
    std::mem::forget(prog.take_link(id).map_err(|e| e.to_string())?);
    Ok(())
}

/// Creates a TCX link of `prog` first in the `ty` chain of `ifname` and pins it at `path`.
pub(crate) fn tcx_attach_first_pinned(
    prog: &mut SchedClassifier,
    ifname: &str,
    ty: TcAttachType,
    path: &Path,
) -> Result<(), String> {
    let id = prog
        .attach_with_options(ifname, ty, TcAttachOptions::TcxOrder(LinkOrder::first()))
        .map_err(|e| e.to_string())?;
    let link = prog.take_link(id).map_err(|e| e.to_string())?;
    let fd: FdLink = link
        .try_into()
        .map_err(|e: aya::programs::links::LinkError| e.to_string())?;
    // Dropping `fd` without a pin would detach it again: the attach fails as a whole.
    fd.pin(path)
        .map_err(|e| format!("pinning at {}: {e}", path.display()))?;
    Ok(())
}

/// Whether the program of the link pinned at `path` is the first of the `ty` TCX chain of
/// `ifname`.
fn tcx_pinned_first(path: &Path, ifname: &str, ty: TcAttachType) -> Result<bool, String> {
    let pinned = PinnedLink::from_pin(path).map_err(|e| e.to_string())?;
    let prog_id = FdLink::from(pinned)
        .info()
        .map_err(|e| e.to_string())?
        .program_id();
    let (_, chain) = SchedClassifier::query_tcx(ifname, ty)
        .map_err(|e| format!("querying the TCX chain of {ifname}: {e}"))?;
    Ok(chain.first().is_some_and(|p| p.id() == prog_id))
}

/// Switches the TCX link pinned at `path` to `prog` (atomically).
fn tcx_update_pinned(prog: &mut SchedClassifier, path: &Path) -> Result<(), String> {
    let pinned = PinnedLink::from_pin(path).map_err(|e| e.to_string())?;
    let link: SchedClassifierLink = FdLink::from(pinned)
        .try_into()
        .map_err(|e: aya::programs::links::LinkError| e.to_string())?;
    let id = prog.attach_to_link(link).map_err(|e| e.to_string())?;
    // The pin keeps the link; our handle can go.
    let owned = prog.take_link(id).map_err(|e| e.to_string())?;
    drop(FdLink::try_from(owned).map_err(|e| e.to_string())?);
    Ok(())
}

/// Why [`tcx_adopt_pinned`] failed.
#[derive(Debug)]
pub(crate) enum TcxAdoptError {
    /// The pinned link, first in its chain, could not be switched to the new program.
    Update(String),
    /// The chain could not be read, or a new first link could not be made.
    Other(String),
}

impl std::fmt::Display for TcxAdoptError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Update(m) | Self::Other(m) => f.write_str(m),
        }
    }
}

/// Adopts the TCX link pinned at `path` for `prog`: if its program is first in the chain, the
/// link is switched to `prog`; otherwise a new link with `prog` is attached first and then
/// replaces the old pin (the old link, still running the previous program, goes with it), so
/// enforcement never stops. Returns whether the link was moved first. (A program can be in a
/// TCX chain only once, so the old link cannot be updated first.)
pub(crate) fn tcx_adopt_pinned(
    prog: &mut SchedClassifier,
    ifname: &str,
    ty: TcAttachType,
    path: &Path,
) -> Result<bool, TcxAdoptError> {
    if tcx_pinned_first(path, ifname, ty).map_err(TcxAdoptError::Other)? {
        tcx_update_pinned(prog, path).map_err(TcxAdoptError::Update)?;
        return Ok(false);
    }
    let file = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!("{file}_new"));
    let _ = fs::remove_file(&tmp);
    tcx_attach_first_pinned(prog, ifname, ty, &tmp).map_err(TcxAdoptError::Other)?;
    fs::rename(&tmp, path).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        TcxAdoptError::Other(format!(
            "replacing {} with the new first link: {e}",
            path.display()
        ))
    })?;
    Ok(true)
}

/// Whether TCX links can be created: attaches `prog` to the loopback device of a network
/// namespace of its own (created for the probe on a thread that exits afterwards, so no interface
/// of the host is touched) and detaches it again. If no namespace can be created, asks the kernel
/// for the host loopback's TCX chain instead (read-only; a kernel without TCX rejects the query).
pub fn probe_tcx(prog: &mut SchedClassifier) -> Result<(), String> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: unshare only changes this thread, which does nothing else and exits.
                if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                    let e = io::Error::last_os_error();
                    return SchedClassifier::query_tcx("lo", TcAttachType::Ingress)
                        .map(|_| ())
                        .map_err(|q| format!("no probe namespace ({e}); TCX query on lo: {q}"));
                }
                let id = prog
                    .attach_with_options(
                        "lo",
                        TcAttachType::Ingress,
                        TcAttachOptions::TcxOrder(LinkOrder::first()),
                    )
                    .map_err(|e| format!("TCX attach in a probe namespace: {e}"))?;
                // The link detaches when dropped; the namespace goes with the thread.
                drop(prog.take_link(id));
                Ok(())
            })
            .join()
            .unwrap_or_else(|_| Err("the TCX probe thread panicked".to_owned()))
    })
}

impl KernelDatapath {
    /// Loads the programs and opens (or creates and pins) every map under `pin_dir`, then switches
    /// every pinned link to the freshly loaded programs.
    pub fn open(pin_dir: impl AsRef<Path>, sizes: MapSizes) -> Result<Self, DatapathError> {
        Self::open_with(pin_dir, sizes, None)
    }

    /// [`Self::open`] with the attach mode forced (`Some`) or probed (`None`).
    pub fn open_with(
        pin_dir: impl AsRef<Path>,
        sizes: MapSizes,
        mode: Option<AttachMode>,
    ) -> Result<Self, DatapathError> {
        let pin_dir = pin_dir.as_ref().to_path_buf();
        if pin_dir.starts_with("/sys/fs/bpf") {
            ensure_bpffs()?;
        }
        fs::create_dir_all(pin_dir.join("links"))?;
        let adopted = pin_dir.join(maps::POLICY).exists();
        let legacy: Vec<&'static str> = maps::legacy::ALL
            .iter()
            .copied()
            .filter(|m| pin_dir.join(m).exists())
            .collect();
        // Only the per-container programs' maps: the masquerade's (`SNAT6`, `MASQ6_*`, in the
        // same object but unused by these programs) are created and pinned by `masq6`, at one
        // entry here so that this copy costs nothing.
        let pins: Vec<(&'static str, PathBuf)> = maps::ALL
            .iter()
            .filter(|m| !MASQ6_MAPS.contains(m))
            .map(|m| (*m, pin_dir.join(m)))
            .collect();
        let sizes = adopt_pinned_sizes(&pin_dir, sizes, &LXC_SIZED);
        let mut loader = EbpfLoader::new();
        for (name, path) in &pins {
            loader.map_pin_path(name, path.as_path());
        }
        for (name, n) in sizes.of(&LXC_SIZED) {
            loader.map_max_entries(name, n);
        }
        // Follows ENDPOINTS (a pinned one keeps its size too: the kernel keeps the pinned map).
        loader.map_max_entries(
            maps::EP_DROPS,
            sizes.endpoints.saturating_mul(epdrop::PER_ENDPOINT),
        );
        for name in MASQ6_MAPS {
            loader.map_max_entries(name, 1);
        }
        let mut bpf = loader
            .load(super::EBPF_OBJECT)
            .map_err(|e| DatapathError::Load(e.to_string()))?;
        for name in [programs::FROM_CONTAINER, programs::TO_CONTAINER] {
            let prog: &mut SchedClassifier = bpf
                .program_mut(name)
                .ok_or_else(|| {
                    DatapathError::Load(format!("program {name} missing from the object"))
                })?
                .try_into()
                .map_err(|e: aya::programs::ProgramError| DatapathError::Load(e.to_string()))?;
            prog.load()
                .map_err(|e| DatapathError::Load(format!("{name}: {e}")))?;
        }
        let mode = match mode {
            Some(m) => m,
            None => {
                let prog: &mut SchedClassifier = bpf
                    .program_mut(programs::FROM_CONTAINER)
                    .and_then(|p| p.try_into().ok())
                    .ok_or_else(|| DatapathError::Load("from_container missing".into()))?;
                match probe_tcx(prog) {
                    Ok(()) => AttachMode::Tcx,
                    Err(why) => {
                        info!(%why, "TCX unavailable; attaching through clsact (netlink)");
                        AttachMode::Netlink
                    }
                }
            }
        };
        let mut dp = Self {
            bpf,
            pin_dir,
            sizes,
            mode,
            adopted,
        };
        if !legacy.is_empty() {
            let n = dp.migrate_legacy();
            info!(maps = ?legacy, entries = n, "copied maps of an older layout into the current ones");
        }
        // An older agent may have written the ipcache without moving its generation on, or one
        // died in the middle of a write: no conntrack entry's recorded remote is taken as
        // current before it is looked up again.
        dp.move_ipcache_gen(netpol_common::ipcache::write_ends)?;
        // Before the new programs take over the links: they find it from their first packet.
        dp.set_config_flag(Config::CT_IN_PLACE, STORES_IN_ORDER)?;
        dp.adopt_links()?;
        for m in &legacy {
            // The links run the new programs now: the old maps are unused.
            if let Err(e) = fs::remove_file(dp.pin_dir.join(m)) {
                warn!(map = m, error = %e, "removing the pin of an old map");
            }
        }
        info!(pin_dir = %dp.pin_dir.display(), adopted, ?mode, "datapath ready");
        Ok(dp)
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Whether pinned maps were found and reused.
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    pub fn mode(&self) -> AttachMode {
        self.mode
    }

    /// Gives other parts of the agent (masquerade, monitor) the loaded object.
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.bpf
    }

    fn link_path(&self, ifindex: u32, prog: &str) -> PathBuf {
        self.pin_dir
            .join("links")
            .join(format!("{ifindex}_{}", side(prog)))
    }

    /// The record of a clsact filter (an empty directory: bpffs holds no plain files).
    fn tc_path(&self, ifindex: u32, prog: &str) -> PathBuf {
        self.pin_dir
            .join("links")
            .join(format!("{ifindex}_{}_tc", side(prog)))
    }

    fn prog(&mut self, name: &str) -> Result<&mut SchedClassifier, DatapathError> {
        self.bpf
            .program_mut(name)
            .ok_or_else(|| DatapathError::Load(format!("program {name} missing")))?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| DatapathError::Load(e.to_string()))
    }

    /// Points every pinned link (or clsact filter) at the newly loaded programs; removes the
    /// records of interfaces that are gone. A TCX link that is no longer first is moved first.
    fn adopt_links(&mut self) -> Result<(), DatapathError> {
        for ifindex in self.attached()? {
            let Ok(ifname) = ifname(ifindex) else {
                // The interface went, and its links or filters with it.
                for name in [programs::FROM_CONTAINER, programs::TO_CONTAINER] {
                    let _ = fs::remove_file(self.link_path(ifindex, name));
                    let _ = fs::remove_dir(self.tc_path(ifindex, name));
                }
                continue;
            };
            for name in [programs::FROM_CONTAINER, programs::TO_CONTAINER] {
                // Both kinds, whatever the mode: an agent started with another `--attach`
                // still updates (and later detaches) what an earlier one attached.
                let r = self
                    .adopt_tcx(ifindex, &ifname, name)
                    .and_then(|()| self.adopt_tc(ifindex, &ifname, name));
                if let Err(e) = r {
                    warn!(ifindex, name, error = %e, "pinned attachment could not be adopted");
                }
            }
        }
        Ok(())
    }

    fn adopt_tcx(&mut self, ifindex: u32, ifname: &str, name: &str) -> Result<(), DatapathError> {
        let path = self.link_path(ifindex, name);
        if !path.exists() {
            return Ok(());
        }
        let perr = |message: String| DatapathError::Pin {
            path: path.display().to_string(),
            message,
        };
        let prog = self.prog(name)?;
        match tcx_adopt_pinned(prog, ifname, attach_type(name), &path) {
            Ok(false) => debug!(ifindex, name, "adopted pinned link"),
            Ok(true) => warn!(
                ifindex,
                name, "another TCX program ran before netpol's; moved netpol's first"
            ),
            Err(TcxAdoptError::Update(e)) => {
                warn!(ifindex, name, error = %e, "pinned link could not be updated; removing it");
                let _ = fs::remove_file(&path);
                return Err(perr(e));
            }
            Err(TcxAdoptError::Other(e)) => return Err(perr(e)),
        }
        Ok(())
    }

    fn adopt_tc(
        &mut self,
        ifindex: u32,
        ifname: &str,
        name: &'static str,
    ) -> Result<(), DatapathError> {
        if !self.tc_path(ifindex, name).exists() {
            return Ok(());
        }
        self.attach_tc(ifindex, ifname, name)?;
        debug!(ifindex, name, "adopted clsact filter");
        Ok(())
    }

    /// Creates a TCX link for `name` first in the chain of `ifname` and pins it at `path`.
    fn attach_tcx_pinned(
        &mut self,
        ifindex: u32,
        ifname: &str,
        name: &str,
        path: &Path,
    ) -> Result<(), DatapathError> {
        let prog = self.prog(name)?;
        tcx_attach_first_pinned(prog, ifname, attach_type(name), path).map_err(|e| {
            DatapathError::Attach {
                ifindex,
                message: format!("{name}: {e}"),
            }
        })
    }

    /// Puts `name` into the fixed clsact filter of `ifname`: replaces the program of an existing
    /// filter in place, or creates the filter.
    fn attach_tc(
        &mut self,
        ifindex: u32,
        ifname: &str,
        name: &'static str,
    ) -> Result<(), DatapathError> {
        let prog = self.prog(name)?;
        tc_attach_fixed(prog, ifname, attach_type(name), NL_HANDLE).map_err(|e| {
            DatapathError::Attach {
                ifindex,
                message: format!("{name}: {e}"),
            }
        })?;
        let record = self.tc_path(ifindex, name);
        fs::create_dir_all(&record).map_err(|e| DatapathError::Pin {
            path: record.display().to_string(),
            message: e.to_string(),
        })?;
        Ok(())
    }

    fn attach_one(
        &mut self,
        ifindex: u32,
        ifname: &str,
        name: &'static str,
    ) -> Result<(), DatapathError> {
        match self.mode {
            AttachMode::Tcx => {
                let path = self.link_path(ifindex, name);
                if path.exists() {
                    return Ok(());
                }
                self.attach_tcx_pinned(ifindex, ifname, name, &path)
            }
            AttachMode::Netlink => {
                if self.tc_path(ifindex, name).exists() {
                    return Ok(());
                }
                self.attach_tc(ifindex, ifname, name)
            }
        }
    }

    fn endpoints(&mut self) -> Result<HashMap<&mut MapData, u32, Endpoint>, DatapathError> {
        let m = self
            .bpf
            .map_mut(maps::ENDPOINTS)
            .ok_or_else(|| DatapathError::Load("ENDPOINTS missing".into()))?;
        HashMap::try_from(m).map_err(map_err(maps::ENDPOINTS))
    }

    fn map_ref(&self, name: &'static str) -> Result<&aya::maps::Map, DatapathError> {
        self.bpf
            .map(name)
            .ok_or_else(|| DatapathError::Load(format!("{name} missing")))
    }

    fn map_mut(&mut self, name: &'static str) -> Result<&mut aya::maps::Map, DatapathError> {
        self.bpf
            .map_mut(name)
            .ok_or_else(|| DatapathError::Load(format!("{name} missing")))
    }

    /// Removes the `EP_DROPS` counters of an endpoint that went, so that the map holds only live
    /// endpoints' keys. Counters only: a failure is logged, never a reconcile error.
    fn forget_drop_counters(&mut self, ifindex: u32) {
        let result = self.map_mut(maps::EP_DROPS).and_then(|m| {
            let mut m: PerCpuHashMap<_, EpDropKey, u64> =
                PerCpuHashMap::try_from(m).map_err(map_err(maps::EP_DROPS))?;
            let keys: Vec<EpDropKey> = m
                .keys()
                .filter_map(Result::ok)
                .filter(|k| k.ifindex == ifindex)
                .collect();
            for k in keys {
                match m.remove(&k) {
                    Err(e) if !is_not_found(&e) => return Err(map_err(maps::EP_DROPS)(e)),
                    _ => {}
                }
            }
            Ok(())
        });
        if let Err(e) = result {
            warn!(ifindex, error = %e, "removing the drop counters of a departed endpoint");
        }
    }

    fn upsert_trie(&mut self, cidr: Cidr, value: RemoteInfo) -> Result<(), DatapathError> {
        let r = if let Some(a) = v4(cidr.addr) {
            let mut m: LpmTrie<_, [u8; 4], RemoteInfo> =
                LpmTrie::try_from(self.map_mut(maps::IPCACHE4)?)
                    .map_err(map_err(maps::IPCACHE4))?;
            m.insert(&Key::new(u32::from(cidr.prefix_len), a), value, 0)
                .map_err(map_err(maps::IPCACHE4))
        } else if let Some(a) = v6(cidr.addr) {
            let mut m: LpmTrie<_, [u8; 16], RemoteInfo> =
                LpmTrie::try_from(self.map_mut(maps::IPCACHE6)?)
                    .map_err(map_err(maps::IPCACHE6))?;
            m.insert(&Key::new(u32::from(cidr.prefix_len), a), value, 0)
                .map_err(map_err(maps::IPCACHE6))
        } else {
            Ok(())
        };
        let (name, max) = if cidr.addr.is_ipv4() {
            (maps::IPCACHE4, self.sizes.ipcache4)
        } else {
            (maps::IPCACHE6, self.sizes.ipcache6)
        };
        r.map_err(|e| self.full(e, name, max))
    }

    fn delete_trie(&mut self, cidr: Cidr) -> Result<(), DatapathError> {
        let r = if let Some(a) = v4(cidr.addr) {
            let mut m: LpmTrie<_, [u8; 4], RemoteInfo> =
                LpmTrie::try_from(self.map_mut(maps::IPCACHE4)?)
                    .map_err(map_err(maps::IPCACHE4))?;
            m.remove(&Key::new(u32::from(cidr.prefix_len), a))
        } else if let Some(a) = v6(cidr.addr) {
            let mut m: LpmTrie<_, [u8; 16], RemoteInfo> =
                LpmTrie::try_from(self.map_mut(maps::IPCACHE6)?)
                    .map_err(map_err(maps::IPCACHE6))?;
            m.remove(&Key::new(u32::from(cidr.prefix_len), a))
        } else {
            Ok(())
        };
        match r {
            Err(e) if !is_not_found(&e) => Err(map_err(maps::IPCACHE4)(e)),
            _ => Ok(()),
        }
    }

    /// Moves `IPCACHE_GEN` to `next(g)` (netpol-common's `ipcache`): to an odd generation
    /// before every ipcache write (`write_begins`: no recorded remote is current in it, also if
    /// the agent dies before the write's end), to the next even one after it (`write_ends`: a
    /// packet that reads it sees what was written, and a conntrack entry that recorded its
    /// remote in an older one has it looked up again before it vouches for a source).
    ///
    /// Only on x86, whose ordering the scheme relies on: elsewhere (arm64) the generation stays
    /// 0, which no conntrack entry matches, so every packet to a container looks its source up
    /// as before the scheme (netpol-common's `ipcache`).
    fn move_ipcache_gen(&mut self, next: fn(u32) -> u32) -> Result<(), DatapathError> {
        let name = maps::IPCACHE_GEN;
        let mut arr: Array<_, u32> = Array::try_from(self.map_mut(name)?).map_err(map_err(name))?;
        let g = arr.get(&0, 0).map_err(map_err(name))?;
        arr.set(0, next_ipcache_gen(g, next), 0)
            .map_err(map_err(name))
    }

    /// Sets or clears `flag` in `CONFIG`, keeping the rest.
    fn set_config_flag(&mut self, flag: u32, on: bool) -> Result<(), DatapathError> {
        let mut arr: Array<_, Config> =
            Array::try_from(self.map_mut(maps::CONFIG)?).map_err(map_err(maps::CONFIG))?;
        let mut cfg = arr.get(&0, 0).map_err(map_err(maps::CONFIG))?;
        if on {
            cfg.flags |= flag;
        } else {
            cfg.flags &= !flag;
        }
        arr.set(0, cfg, 0).map_err(map_err(maps::CONFIG))
    }

    fn full(&self, e: DatapathError, map: &'static str, max: u32) -> DatapathError {
        match e {
            DatapathError::MapFull { .. } => DatapathError::MapFull { map, max },
            e => e,
        }
    }

    /// Copies the maps of the former layouts (`maps::legacy`) into the current ones: ipcache
    /// identities (no interfaces: reconcile writes them), and conntrack entries whose local
    /// address belongs to an endpoint, tied to that endpoint. Best effort: what cannot be read is
    /// reported and left out (its flows are decided by policy again). Returns the entries copied.
    fn migrate_legacy(&mut self) -> usize {
        let mut n = 0;
        let open = |name: &str| -> Option<Map> {
            let path = self.pin_dir.join(name);
            if !path.exists() {
                return None;
            }
            match MapData::from_pin(&path).and_then(Map::from_map_data) {
                Ok(m) => Some(m),
                Err(e) => {
                    warn!(map = name, error = %e, "old pinned map cannot be opened; not copied");
                    None
                }
            }
        };
        let old_c4 = open(maps::legacy::IPCACHE4);
        let old_c6 = open(maps::legacy::IPCACHE6);
        let old_ct4 = open(maps::legacy::CT4);
        let old_ct6 = open(maps::legacy::CT6);
        let v2: Vec<(Map, &'static str, bool)> = [
            (maps::legacy::CT4_V2, maps::CT4, false),
            (maps::legacy::CT4_NEW_V2, maps::CT4_NEW, false),
            (maps::legacy::CT6_V2, maps::CT6, true),
            (maps::legacy::CT6_NEW_V2, maps::CT6_NEW, true),
        ]
        .into_iter()
        .filter_map(|(old, new, v6)| open(old).map(|m| (m, new, v6)))
        .collect();
        let eps: Vec<(u32, Endpoint)> = self
            .endpoints()
            .map(|m| m.iter().flatten().collect())
            .unwrap_or_default();
        if let Some(m) = &old_c4 {
            n += self.copy_ipcache::<4>(m, maps::IPCACHE4);
        }
        if let Some(m) = &old_c6 {
            n += self.copy_ipcache::<16>(m, maps::IPCACHE6);
        }
        let c4 = old_c4
            .as_ref()
            .and_then(|m| LpmTrie::<_, [u8; 4], RemoteInfoV1>::try_from(m).ok());
        let c6 = old_c6
            .as_ref()
            .and_then(|m| LpmTrie::<_, [u8; 16], RemoteInfoV1>::try_from(m).ok());
        if let Some(m) = &old_ct4 {
            n += self.copy_ct::<OldCtKey4>(m, c4.as_ref(), &eps);
        }
        if let Some(m) = &old_ct6 {
            n += self.copy_ct::<OldCtKey6>(m, c6.as_ref(), &eps);
        }
        for (m, new, v6) in &v2 {
            n += if *v6 {
                self.copy_ct_v2::<OldCtKey6>(m, new)
            } else {
                self.copy_ct_v2::<OldCtKey4>(m, new)
            };
        }
        n
    }

    /// Copies a conntrack table of layout v2 (`CT4_V2`, `CT4_NEW`, …: keyed by the opening
    /// packet's tuple and the side that admitted it; the entries already name their endpoint)
    /// into its v3 table `new`: one key for both directions, the opening side in the entry.
    fn copy_ct_v2<K: LegacyCtKey>(&mut self, old: &Map, new: &'static str) -> usize {
        let entries: Vec<(K, CtEntry)> = match HashMap::<_, K, CtEntry>::try_from(old) {
            Ok(m) => m.iter().flatten().collect(),
            Err(e) => {
                warn!(map = new, error = %e, "old conntrack map not copied");
                return 0;
            }
        };
        let Some(mut m) = self
            .map_mut(new)
            .ok()
            .and_then(|m| HashMap::<_, K::Current, CtEntry>::try_from(m).ok())
        else {
            return 0;
        };
        let mut n = 0;
        for (k, mut e) in entries {
            let (key, dir) = k.current();
            e.dir = dir as u8;
            e.ipcache_gen = [0; 3];
            if m.insert(key, e, 0).is_ok() {
                n += 1;
            }
        }
        n
    }

    /// Copies the old conntrack map `old` into the current tables: entries whose local address
    /// is an endpoint's, tied to it; answered ones into the established table.
    fn copy_ct<K: LegacyCtKey>(
        &mut self,
        old: &Map,
        ipcache: Option<&LpmTrie<&MapData, K::Addr, RemoteInfoV1>>,
        eps: &[(u32, Endpoint)],
    ) -> usize {
        let entries: Vec<(K, CtEntryV1)> = match HashMap::<_, K, CtEntryV1>::try_from(old) {
            Ok(m) => m.iter().flatten().collect(),
            Err(e) => {
                warn!(map = K::NEW, error = %e, "old conntrack map not copied");
                return 0;
            }
        };
        let mut n = 0;
        for (k, v) in entries {
            let (local, remote) = k.local_remote();
            let Some((ifindex, ep)) = eps.iter().find(|(_, e)| K::holds(e, &local)) else {
                continue;
            };
            let rid = ipcache.and_then(|c| c.get(&Key::new(K::FULL, remote), 0).ok());
            let (key, dir) = k.current();
            let e = v.upgrade(*ifindex, ep.identity, rid, dir);
            let name = if e.flags & CtEntry::SEEN_REPLY != 0 {
                K::EST
            } else {
                K::NEW
            };
            let ok = self
                .map_mut(name)
                .ok()
                .and_then(|m| HashMap::<_, K::Current, CtEntry>::try_from(m).ok())
                .is_some_and(|mut m| m.insert(key, e, 0).is_ok());
            if ok {
                n += 1;
            }
        }
        n
    }

    fn copy_ipcache<const N: usize>(&mut self, old: &Map, new: &'static str) -> usize
    where
        [u8; N]: aya::Pod,
    {
        let Ok(old) = LpmTrie::<_, [u8; N], RemoteInfoV1>::try_from(old) else {
            warn!(map = new, "old ipcache has an unexpected type; not copied");
            return 0;
        };
        let entries: Vec<_> = old.iter().flatten().collect();
        let Ok(m) = self.map_mut(new) else { return 0 };
        let Ok(mut m) = LpmTrie::<_, [u8; N], RemoteInfo>::try_from(m) else {
            return 0;
        };
        let mut n = 0;
        for (k, v) in entries {
            let key = Key::new(k.prefix_len(), k.data());
            if m.get(&key, 0).is_ok() {
                continue;
            }
            if m.insert(&key, RemoteInfo::new(v.identity), 0).is_ok() {
                n += 1;
            }
        }
        n
    }

    /// Removes every pin (maps and links) under `pin_dir`, and the clsact filters recorded there:
    /// programs detach when their last link goes. Used for uninstalling and by tests that
    /// simulate a reboot. Run it in the namespace of the interfaces.
    pub fn remove_pins(pin_dir: impl AsRef<Path>) -> Result<(), DatapathError> {
        let pin_dir = pin_dir.as_ref();
        if !pin_dir.exists() {
            return Ok(());
        }
        let mut errors = Vec::new();
        let remove = |p: &Path, errors: &mut Vec<String>| {
            let r = if p.is_dir() {
                fs::remove_dir(p)
            } else {
                fs::remove_file(p)
            };
            if let Err(err) = r {
                errors.push(format!("{}: {err}", p.display()));
            }
        };
        if let Ok(rd) = fs::read_dir(pin_dir.join("links")) {
            for e in rd.flatten() {
                // A clsact filter is not a pin: delete the filter its record stands for.
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some((ifindex, side)) =
                    name.strip_suffix("_tc").and_then(|n| n.split_once('_'))
                {
                    let prog = if side == "from" {
                        programs::FROM_CONTAINER
                    } else {
                        programs::TO_CONTAINER
                    };
                    if let Ok(ifindex) = ifindex.parse() {
                        if let Err(err) = remove_tc_filter(ifindex, prog) {
                            errors.push(err);
                        }
                    }
                }
                remove(&e.path(), &mut errors);
            }
        }
        for e in fs::read_dir(pin_dir)?.flatten() {
            remove(&e.path(), &mut errors);
        }
        if let Err(err) = fs::remove_dir(pin_dir) {
            errors.push(format!("{}: {err}", pin_dir.display()));
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(DatapathError::Pin {
                path: pin_dir.display().to_string(),
                message: errors.join("; "),
            })
        }
    }
}

/// The value of the `IPCACHE4` / `IPCACHE6` maps of the former layout.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct RemoteInfoV1 {
    identity: u32,
    _pad: u32,
}

/// The value of the `CT4` / `CT6` maps of the former layout.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct CtEntryV1 {
    expires_ns: u64,
    flags: u32,
    rule: u32,
}

// SAFETY: #[repr(C)], Copy, no implicit padding.
unsafe impl aya::Pod for RemoteInfoV1 {}
// SAFETY: as above.
unsafe impl aya::Pod for CtEntryV1 {}

impl CtEntryV1 {
    /// The current entry for this one, held by endpoint `ifindex` with `identity`. The old
    /// closing flag becomes closing (its lifetime already counts down). The remote's interfaces
    /// are not known: not checked for this entry.
    fn upgrade(
        &self,
        ifindex: u32,
        identity: u32,
        remote: Option<RemoteInfoV1>,
        dir: CtDir,
    ) -> CtEntry {
        let mut flags = self.flags & CtEntry::SEEN_REPLY;
        if self.flags & 2 != 0 {
            flags |= CtEntry::CLOSING;
        }
        CtEntry {
            expires_ns: self.expires_ns,
            flags,
            rule: self.rule,
            ifindex,
            identity,
            remote_identity: remote.map_or(netpol_common::identity::WORLD, |r| r.identity),
            remote_ifindex: 0,
            remote_bridge: 0,
            dir: dir as u8,
            ipcache_gen: [0; 3],
        }
    }
}

/// The conntrack key of layouts v1 and v2: the tuple of the packet that opened the flow and the
/// side that admitted it (`CtDir` as a byte).
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug)]
struct OldCtKey<A> {
    saddr: A,
    daddr: A,
    sport: [u8; 2],
    dport: [u8; 2],
    proto: u8,
    dir: u8,
    _pad: [u8; 2],
}

type OldCtKey4 = OldCtKey<[u8; 4]>;
type OldCtKey6 = OldCtKey<[u8; 16]>;

// SAFETY: #[repr(C)], Copy, no implicit padding (16 and 40 bytes).
unsafe impl aya::Pod for OldCtKey4 {}
// SAFETY: as above.
unsafe impl aya::Pod for OldCtKey6 {}

impl<A> OldCtKey<A> {
    fn opener(&self) -> (CtDir, netpol_common::Direction) {
        if self.dir == CtDir::Egress as u8 {
            (CtDir::Egress, netpol_common::Direction::Egress)
        } else {
            (CtDir::Ingress, netpol_common::Direction::Ingress)
        }
    }
}

/// What the copy of an old conntrack map needs of a key type.
trait LegacyCtKey: aya::Pod {
    type Addr: aya::Pod + PartialEq;
    /// The current key type.
    type Current: aya::Pod;
    const FULL: u32;
    const EST: &'static str;
    const NEW: &'static str;
    /// (local, remote) address.
    fn local_remote(&self) -> (Self::Addr, Self::Addr);
    /// Whether `a` is the endpoint's address of this family.
    fn holds(ep: &Endpoint, a: &Self::Addr) -> bool;
    /// The flow's current key and the side that opened it.
    fn current(&self) -> (Self::Current, CtDir);
}

fn local_remote<A: Copy>(dir: u8, saddr: A, daddr: A) -> (A, A) {
    if dir == CtDir::Egress as u8 {
        (saddr, daddr)
    } else {
        (daddr, saddr)
    }
}

impl LegacyCtKey for OldCtKey4 {
    type Addr = [u8; 4];
    type Current = CtKey4;
    const FULL: u32 = 32;
    const EST: &'static str = maps::CT4;
    const NEW: &'static str = maps::CT4_NEW;
    fn local_remote(&self) -> ([u8; 4], [u8; 4]) {
        local_remote(self.dir, self.saddr, self.daddr)
    }
    fn holds(ep: &Endpoint, a: &[u8; 4]) -> bool {
        ep.flags & Endpoint::HAS_IPV4 != 0 && ep.ipv4 == *a
    }
    fn current(&self) -> (CtKey4, CtDir) {
        let (opener, side) = self.opener();
        let (sp, dp) = (
            u16::from_be_bytes(self.sport),
            u16::from_be_bytes(self.dport),
        );
        let k = CtKey4::of_packet(self.saddr, self.daddr, sp, dp, self.proto, side);
        (k, opener)
    }
}

impl LegacyCtKey for OldCtKey6 {
    type Addr = [u8; 16];
    type Current = CtKey6;
    const FULL: u32 = 128;
    const EST: &'static str = maps::CT6;
    const NEW: &'static str = maps::CT6_NEW;
    fn local_remote(&self) -> ([u8; 16], [u8; 16]) {
        local_remote(self.dir, self.saddr, self.daddr)
    }
    fn holds(ep: &Endpoint, a: &[u8; 16]) -> bool {
        ep.flags & Endpoint::HAS_IPV6 != 0 && ep.ipv6 == *a
    }
    fn current(&self) -> (CtKey6, CtDir) {
        let (opener, side) = self.opener();
        let (sp, dp) = (
            u16::from_be_bytes(self.sport),
            u16::from_be_bytes(self.dport),
        );
        let k = CtKey6::of_packet(self.saddr, self.daddr, sp, dp, self.proto, side);
        (k, opener)
    }
}

/// Removes the keys of the conntrack map `m` that `hit` selects; returns how many went.
fn flush_map<K: aya::Pod + Copy>(
    m: &mut Map,
    name: &'static str,
    hit: impl Fn(&K, &CtEntry) -> bool,
) -> Result<usize, DatapathError> {
    let mut h: HashMap<_, K, CtEntry> = HashMap::try_from(m).map_err(map_err(name))?;
    let keys: Vec<K> = h
        .iter()
        .flatten()
        .filter(|(k, v)| hit(k, v))
        .map(|(k, _)| k)
        .collect();
    let mut n = 0;
    for k in keys {
        match h.remove(&k) {
            Ok(()) => n += 1,
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(map_err(name)(e)),
        }
    }
    Ok(n)
}

fn v4(addr: IpAddr) -> Option<[u8; 4]> {
    match addr {
        IpAddr::V4(a) => Some(a.octets()),
        IpAddr::V6(_) => None,
    }
}

fn v6(addr: IpAddr) -> Option<[u8; 16]> {
    match addr {
        IpAddr::V6(a) => Some(a.octets()),
        IpAddr::V4(_) => None,
    }
}

impl Datapath for KernelDatapath {
    fn sizes(&self) -> MapSizes {
        self.sizes
    }

    fn upsert_endpoint(&mut self, ifindex: u32, ep: Endpoint) -> Result<(), DatapathError> {
        let max = self.sizes.endpoints;
        let r = self
            .endpoints()?
            .insert(ifindex, ep, 0)
            .map_err(map_err(maps::ENDPOINTS));
        r.map_err(|e| self.full(e, maps::ENDPOINTS, max))
    }

    fn delete_endpoint(&mut self, ifindex: u32) -> Result<(), DatapathError> {
        match self.endpoints()?.remove(&ifindex) {
            Err(e) if !is_not_found(&e) => Err(map_err(maps::ENDPOINTS)(e)),
            _ => {
                self.forget_drop_counters(ifindex);
                Ok(())
            }
        }
    }

    /// An odd generation, the trie, then the next even generation (also after a failed write:
    /// what failed may be half done). Killed or failing before the end, the generation stays
    /// odd: no recorded remote is current until the next write or start ends one.
    fn upsert_ipcache(&mut self, cidr: Cidr, value: RemoteInfo) -> Result<(), DatapathError> {
        self.move_ipcache_gen(netpol_common::ipcache::write_begins)?;
        let r = self.upsert_trie(cidr, value);
        self.move_ipcache_gen(netpol_common::ipcache::write_ends)?;
        r
    }

    /// An odd generation, the trie, then the next even generation.
    fn delete_ipcache(&mut self, cidr: Cidr) -> Result<(), DatapathError> {
        self.move_ipcache_gen(netpol_common::ipcache::write_begins)?;
        let r = self.delete_trie(cidr);
        self.move_ipcache_gen(netpol_common::ipcache::write_ends)?;
        r
    }

    fn upsert_policy(
        &mut self,
        key: PolicyEntryKey,
        value: PolicyValue,
    ) -> Result<(), DatapathError> {
        let max = self.sizes.policy;
        let mut m: LpmTrie<_, PolicyKey, PolicyValue> =
            LpmTrie::try_from(self.map_mut(maps::POLICY)?).map_err(map_err(maps::POLICY))?;
        let r = m
            .insert(&Key::new(key.prefix_len, key.key), value, 0)
            .map_err(map_err(maps::POLICY));
        r.map_err(|e| self.full(e, maps::POLICY, max))
    }

    fn delete_policy(&mut self, key: PolicyEntryKey) -> Result<(), DatapathError> {
        let mut m: LpmTrie<_, PolicyKey, PolicyValue> =
            LpmTrie::try_from(self.map_mut(maps::POLICY)?).map_err(map_err(maps::POLICY))?;
        match m.remove(&Key::new(key.prefix_len, key.key)) {
            Err(e) if !is_not_found(&e) => Err(map_err(maps::POLICY)(e)),
            _ => Ok(()),
        }
    }

    fn attach(&mut self, ifindex: u32) -> Result<(), DatapathError> {
        let name = ifname(ifindex)?;
        // Ingress side first: a container's egress is policed before anything is delivered to it.
        self.attach_one(ifindex, &name, programs::FROM_CONTAINER)?;
        self.attach_one(ifindex, &name, programs::TO_CONTAINER)
    }

    fn detach(&mut self, ifindex: u32) -> Result<(), DatapathError> {
        let mut errors = Vec::new();
        for name in [programs::FROM_CONTAINER, programs::TO_CONTAINER] {
            let record = self.tc_path(ifindex, name);
            if record.exists() {
                if let Err(e) = remove_tc_filter(ifindex, name) {
                    errors.push(e);
                }
                if let Err(e) = fs::remove_dir(&record) {
                    errors.push(format!("{}: {e}", record.display()));
                }
            }
            let path = self.link_path(ifindex, name);
            if !path.exists() {
                continue;
            }
            // Dropping the last reference (the pin, then our fd) destroys the TCX link.
            match PinnedLink::from_pin(&path) {
                Ok(p) => {
                    if let Err(e) = p.unpin() {
                        errors.push(format!("{}: {e}", path.display()));
                    }
                }
                Err(e) => {
                    errors.push(format!("{}: {e}", path.display()));
                    let _ = fs::remove_file(&path);
                }
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(DatapathError::Attach {
                ifindex,
                message: errors.join("; "),
            })
        }
    }

    fn attached(&self) -> Result<Vec<u32>, DatapathError> {
        let mut out: Vec<u32> = fs::read_dir(self.pin_dir.join("links"))?
            .flatten()
            .filter_map(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.split('_').next())
                    .and_then(|n| n.parse().ok())
            })
            .collect();
        out.sort_unstable();
        out.dedup();
        Ok(out)
    }

    fn flush_ct(&mut self, addrs: &BTreeSet<IpAddr>) -> Result<usize, DatapathError> {
        let a4: BTreeSet<[u8; 4]> = addrs.iter().filter_map(|a| v4(*a)).collect();
        let a6: BTreeSet<[u8; 16]> = addrs.iter().filter_map(|a| v6(*a)).collect();
        let mut n = 0;
        if !a4.is_empty() {
            for name in [maps::CT4, maps::CT4_NEW] {
                n += flush_map::<CtKey4>(self.map_mut(name)?, name, |k, _| {
                    a4.contains(&k.local) || a4.contains(&k.remote)
                })?;
            }
        }
        if !a6.is_empty() {
            for name in [maps::CT6, maps::CT6_NEW] {
                n += flush_map::<CtKey6>(self.map_mut(name)?, name, |k, _| {
                    a6.contains(&k.local) || a6.contains(&k.remote)
                })?;
            }
        }
        Ok(n)
    }

    fn current(&self) -> Result<MapState, DatapathError> {
        let mut state = MapState::default();
        let eps: HashMap<_, u32, Endpoint> =
            HashMap::try_from(self.map_ref(maps::ENDPOINTS)?).map_err(map_err(maps::ENDPOINTS))?;
        for item in eps.iter() {
            let (k, v) = item.map_err(map_err(maps::ENDPOINTS))?;
            state.endpoints.insert(k, v);
        }
        let c4: LpmTrie<_, [u8; 4], RemoteInfo> =
            LpmTrie::try_from(self.map_ref(maps::IPCACHE4)?).map_err(map_err(maps::IPCACHE4))?;
        for item in c4.iter() {
            let (k, v) = item.map_err(map_err(maps::IPCACHE4))?;
            let cidr = Cidr {
                addr: IpAddr::from(k.data()),
                prefix_len: k.prefix_len() as u8,
            };
            state.ipcache.insert(cidr, v);
        }
        let c6: LpmTrie<_, [u8; 16], RemoteInfo> =
            LpmTrie::try_from(self.map_ref(maps::IPCACHE6)?).map_err(map_err(maps::IPCACHE6))?;
        for item in c6.iter() {
            let (k, v) = item.map_err(map_err(maps::IPCACHE6))?;
            let cidr = Cidr {
                addr: IpAddr::from(k.data()),
                prefix_len: k.prefix_len() as u8,
            };
            state.ipcache.insert(cidr, v);
        }
        let pol: LpmTrie<_, PolicyKey, PolicyValue> =
            LpmTrie::try_from(self.map_ref(maps::POLICY)?).map_err(map_err(maps::POLICY))?;
        for item in pol.iter() {
            let (k, v) = item.map_err(map_err(maps::POLICY))?;
            state.policy.insert(
                PolicyEntryKey {
                    key: k.data(),
                    prefix_len: k.prefix_len(),
                },
                v,
            );
        }
        Ok(state)
    }

    fn drop_counters(&self) -> Result<DropCounters, DatapathError> {
        let arr: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.map_ref(maps::DROPS)?).map_err(map_err(maps::DROPS))?;
        let mut out = DropCounters::new();
        for r in DropReason::ALL {
            let values = arr.get(&(r as u32), 0).map_err(map_err(maps::DROPS))?;
            out.insert(r as u8, values.iter().sum());
        }
        Ok(out)
    }

    fn audit_counters(&self) -> Result<DropCounters, DatapathError> {
        let arr: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.map_ref(maps::AUDITS)?).map_err(map_err(maps::AUDITS))?;
        let mut out = DropCounters::new();
        for r in [DropReason::PolicyDenied, DropReason::PolicyDeny] {
            let values = arr.get(&(r as u32), 0).map_err(map_err(maps::AUDITS))?;
            out.insert(r as u8, values.iter().sum());
        }
        Ok(out)
    }

    fn rule_counters(&self) -> Result<RuleCounters, DatapathError> {
        let m: PerCpuHashMap<_, RuleStatsKey, RuleStats> =
            PerCpuHashMap::try_from(self.map_ref(maps::RULE_STATS)?)
                .map_err(map_err(maps::RULE_STATS))?;
        let mut out = RuleCounters::new();
        for item in m.iter() {
            let (k, per_cpu) = item.map_err(map_err(maps::RULE_STATS))?;
            let sum = out.entry(k).or_default();
            for v in per_cpu.iter() {
                sum.allowed += v.allowed;
                sum.denied += v.denied;
                sum.audited += v.audited;
            }
        }
        Ok(out)
    }

    fn prune_rule_counters(&mut self, keep: &dyn Fn(u32) -> bool) -> Result<usize, DatapathError> {
        let mut m: PerCpuHashMap<_, RuleStatsKey, RuleStats> =
            PerCpuHashMap::try_from(self.map_mut(maps::RULE_STATS)?)
                .map_err(map_err(maps::RULE_STATS))?;
        let gone: Vec<RuleStatsKey> = m
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.rule != 0 && !keep(k.rule))
            .collect();
        let mut n = 0;
        for k in gone {
            match m.remove(&k) {
                Ok(()) => n += 1,
                // Evicted (LRU) meanwhile.
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(map_err(maps::RULE_STATS)(e)),
            }
        }
        Ok(n)
    }

    fn event_stats(&self) -> Result<EventStats, DatapathError> {
        let arr: PerCpuArray<_, EventStats> =
            PerCpuArray::try_from(self.map_ref(maps::EVENT_STATS)?)
                .map_err(map_err(maps::EVENT_STATS))?;
        let mut out = EventStats::default();
        for v in arr.get(&0, 0).map_err(map_err(maps::EVENT_STATS))?.iter() {
            out.tat_ns = out.tat_ns.max(v.tat_ns);
            out.suppressed_drops += v.suppressed_drops;
            out.suppressed_flows += v.suppressed_flows;
            out.suppressed_audits += v.suppressed_audits;
            out.ring_full += v.ring_full;
        }
        Ok(out)
    }

    fn set_trace_flows(&mut self, on: bool) -> Result<(), DatapathError> {
        self.set_config_flag(Config::TRACE_FLOWS, on)
    }

    fn set_event_rate(&mut self, rate: u32) -> Result<(), DatapathError> {
        let mut arr: Array<_, Config> =
            Array::try_from(self.map_mut(maps::CONFIG)?).map_err(map_err(maps::CONFIG))?;
        let mut cfg = arr.get(&0, 0).map_err(map_err(maps::CONFIG))?;
        cfg.event_rate = rate;
        arr.set(0, cfg, 0).map_err(map_err(maps::CONFIG))
    }
}

/// `next(g)`, the generation after `g` (`write_begins` or `write_ends`); always 0 where the
/// ordering the generation relies on (x86's) is not guaranteed: conntrack entries then never
/// vouch for a source without a lookup.
fn next_ipcache_gen(g: u32, next: fn(u32) -> u32) -> u32 {
    if STORES_IN_ORDER {
        next(g)
    } else {
        0
    }
}

/// Whether this CPU makes one CPU's stores visible to the others in program order, and does not
/// reorder loads with loads (x86's TSO), which the ipcache generation and conntrack's in-place
/// reuse of entries (`Config::CT_IN_PLACE`) rely on. Elsewhere (arm64) both stay off: the
/// generation stays 0 and conntrack deletes and inserts.
pub const STORES_IN_ORDER: bool = cfg!(any(target_arch = "x86_64", target_arch = "x86"));

/// The `CONFIG` flags this agent sets at start, besides the monitor's `TRACE_FLOWS`: what the
/// program tests and benchmarks load with to run as the agent does here.
pub const fn start_flags() -> u32 {
    if STORES_IN_ORDER {
        Config::CT_IN_PLACE
    } else {
        0
    }
}
