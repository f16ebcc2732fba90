//! Loading the kernel programs and attaching them: tracepoints (global, filtered by netns in the
//! kernel) and tc classifiers (per interface, inside the interface's network namespace).

pub mod btf;
pub mod check;
pub mod leftovers;
pub mod nft_trace;

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf},
    programs::{
        BtfTracePoint, LinkOrder, SchedClassifier, TcAttachType,
        tc::{self, SchedClassifierLinkId, TcAttachOptions},
    },
};
use netprobe_common::{Filter, MAX_DROP_REASONS, counter};
use serde::Serialize;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use crate::{
    error::{Error, Result},
    netlink::{self, Link},
    netns::NetnsRef,
};
use btf::KernelBtf;

/// The kernel object, built by `build.rs` (aya-build) and embedded in the binary.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/netprobe"));

/// (program name in the object, BTF tracepoint it attaches to). All are required except the
/// [`OPTIONAL`] ones: each required one works on every kernel netprobe supports (5.8+ for
/// tp_btf with these signatures).
pub const TRACEPOINTS: &[(&str, &str)] = &[
    ("kfree_skb", "kfree_skb"),
    ("tcp_send_reset", "tcp_send_reset"),
    ("tcp_receive_reset", "tcp_receive_reset"),
    ("tcp_retransmit_skb", "tcp_retransmit_skb"),
    ("inet_sock_set_state", "inet_sock_set_state"),
    ("inet_sk_error_report", "inet_sk_error_report"),
    ("fib_table_lookup", "fib_table_lookup"),
];

/// Probes a session runs without when the kernel refuses them (reported, not fatal): failed
/// route lookups inside a namespace (connect() errors before any packet) are a detail.
pub const OPTIONAL: &[&str] = &["fib_table_lookup"];

/// Tracepoints only traces need: state changes are not failures, and `inet_sock_set_state`
/// fires about ten times per healthy connection.
const TRACE_ONLY: &[&str] = &["inet_sock_set_state"];

/// The always-on agent's tracepoints: [`TRACEPOINTS`] without the trace-only ones.
pub fn always_on_tracepoints() -> Vec<(&'static str, &'static str)> {
    TRACEPOINTS
        .iter()
        .copied()
        .filter(|(program, _)| !TRACE_ONLY.contains(program))
        .collect()
}

const TC_PROGRAMS: [(&str, TcAttachType); 2] = [
    ("tc_ingress", TcAttachType::Ingress),
    ("tc_egress", TcAttachType::Egress),
];

/// How a tc program was attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TcMode {
    /// bpf_link based (6.6+): dies with the process, never leaks.
    Tcx,
    /// clsact qdisc + netlink filter: survives a killed process, so it is detached explicitly.
    Clsact,
}

/// One interface netprobe watches.
#[derive(Debug, Clone, Serialize)]
pub struct TcAttachment {
    pub netns: u64,
    pub ifindex: u32,
    pub ifname: String,
    pub mode: TcMode,
}

pub struct Probes {
    ebpf: Ebpf,
    links: Vec<TcLink>,
    pub attachments: Vec<TcAttachment>,
}

/// One tc program attached to one interface: a tcx link holds an fd until it is detached.
struct TcLink {
    netns: NetnsRef,
    ifindex: u32,
    program: &'static str,
    id: SchedClassifierLinkId,
}

/// What became of a namespace offered to the kernel's namespace filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetnsAdmission {
    /// In the filter (now or already).
    Watched,
    /// The filter map is full (E2BIG): the namespace is not watched.
    MapFull,
}

/// Fault injection for the fault tests: `NETPROBE_FAULT_PROBE=<program>` loads that program
/// against `inet_sk_error_report`, a tracepoint with a single argument, so the kernel's verifier
/// really refuses a program that reads more (e.g. `kfree_skb`).
fn fault_target(program: &str, tp: &str) -> String {
    match std::env::var("NETPROBE_FAULT_PROBE") {
        Ok(p) if p == program => "inet_sk_error_report".into(),
        _ => tp.into(),
    }
}

/// For the tests of the pre-6.6 path on newer kernels: `NETPROBE_TC_MODE=clsact` skips tcx.
fn tcx_allowed() -> bool {
    std::env::var("NETPROBE_TC_MODE").as_deref() != Ok("clsact")
}

/// Totals of the per-CPU counters.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Counters {
    /// Events that matched but found the ring buffer full.
    pub lost: u64,
    pub emitted: u64,
    /// Data retransmits of connections still making progress: counted, not events.
    pub retransmits_counted: u64,
    /// Drops that matched the filter, by reason number.
    pub drops_matched: Vec<(u32, u64)>,
    /// Every drop on the machine, by reason number.
    pub drops_all: Vec<(u32, u64)>,
}

/// In-kernel cost of one program. The kernel counts runs and run time only while its run-time
/// statistics are on ([`enable_run_time_stats`], or `sysctl kernel.bpf_stats_enabled=1`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ProgramStats {
    pub program: String,
    pub runs: u64,
    pub run_ns: u64,
}

/// The verifier's complexity limit: a program whose exploration reaches this many instructions
/// is refused ("BPF program is too large").
pub const VERIFIER_INSN_LIMIT: u32 = 1_000_000;

/// What the kernel's verifier went through to accept one program (`bpf_prog_info.verified_insns`,
/// 5.16+): the count [`VERIFIER_INSN_LIMIT`] applies to, so its headroom against refusal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VerifierCost {
    pub program: String,
    /// `None` on kernels that do not report it.
    pub verified_insns: Option<u32>,
}

/// Turns on the kernel's run-time statistics of BPF programs (system-wide: every program, not
/// only netprobe's) for as long as the returned fd is open. They cost two clock reads per run.
pub fn enable_run_time_stats() -> Result<OwnedFd> {
    aya::sys::enable_stats(aya::sys::Stats::RunTime).map_err(|e| {
        Error::io(
            "BPF_ENABLE_STATS (run-time statistics of BPF programs)",
            e.io_error,
        )
    })
}

/// `(run_cnt, run_time_ns)` of a BPF program's `/proc/<pid>/fdinfo/<fd>`.
pub fn parse_run_stats(fdinfo: &str) -> Option<(u64, u64)> {
    let field = |name: &str| {
        fdinfo
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse::<u64>().ok())
    };
    Some((field("run_cnt:")?, field("run_time_ns:")?))
}

impl Probes {
    /// Loads the object with the filter and the kernel's structure offsets. Programs are loaded
    /// (verified) individually by the attach calls, so a refusal names the program.
    pub fn load(kbtf: &KernelBtf, filter: Filter) -> Result<Self> {
        Self::load_with_ring(kbtf, filter, netprobe_common::RING_BYTES)
    }

    /// [`Probes::load`] with a ring buffer of `ring_bytes` (a power of two, at least a page).
    pub fn load_with_ring(kbtf: &KernelBtf, filter: Filter, ring_bytes: u32) -> Result<Self> {
        Self::load_sized(kbtf, filter, ring_bytes, netprobe_common::MAX_NETNS_FILTER)
    }

    /// [`Probes::load_with_ring`] with a namespace filter map of `netns_entries` entries (the
    /// node's namespace and its pods').
    pub fn load_sized(
        kbtf: &KernelBtf,
        filter: Filter,
        ring_bytes: u32,
        netns_entries: u32,
    ) -> Result<Self> {
        raise_memlock_rlimit();
        let offsets = kbtf.offsets()?;
        let route_offsets = kbtf.route_offsets()?;
        let conntrack_offsets = kbtf.conntrack_offsets();
        let ebpf = EbpfLoader::new()
            .btf(Some(kbtf.aya()))
            .map_max_entries("EVENTS", ring_bytes)
            .map_max_entries("NETNS_FILTER", netns_entries.max(1))
            .override_global("FILTER", &filter, true)
            .override_global("OFFSETS", &offsets, true)
            .override_global("ROUTE_OFFSETS", &route_offsets, true)
            .override_global("CONNTRACK_OFFSETS", &conntrack_offsets, true)
            .load(OBJECT)
            .map_err(Error::Load)?;
        Ok(Self {
            ebpf,
            links: Vec::new(),
            attachments: Vec::new(),
        })
    }

    /// Drop reasons (numbers of this kernel) counted but not emitted in failures-only mode, each
    /// with its [`netprobe_common::quiet`] mode.
    pub fn set_quiet_reasons(&mut self, reasons: &[(u32, u8)]) -> Result<()> {
        let map = self
            .ebpf
            .map_mut("QUIET_REASONS")
            .ok_or(Error::MapMissing {
                map: "QUIET_REASONS",
            })?;
        let mut arr: aya::maps::Array<_, u8> =
            aya::maps::Array::try_from(map).map_err(|source| Error::Map {
                map: "QUIET_REASONS",
                source,
            })?;
        for &(r, mode) in reasons {
            if r < netprobe_common::MAX_DROP_REASONS {
                arr.set(r, mode, 0).map_err(|source| Error::Map {
                    map: "QUIET_REASONS",
                    source,
                })?;
            }
        }
        Ok(())
    }

    /// Restricts tracepoint events to these namespaces (inode numbers).
    pub fn set_netns_filter(&mut self, inodes: &[u64]) -> Result<()> {
        let mut map = self.netns_filter()?;
        for &ino in inodes {
            map.insert(ino as u32, 1, 0).map_err(|source| Error::Map {
                map: "NETNS_FILTER",
                source,
            })?;
        }
        Ok(())
    }

    /// Adds one namespace to the filter; a full map is an answer, not an error (the caller
    /// keeps running without that namespace).
    pub fn watch_netns(&mut self, inode: u64) -> Result<NetnsAdmission> {
        match self.netns_filter()?.insert(inode as u32, 1, 0) {
            Ok(()) => Ok(NetnsAdmission::Watched),
            Err(e) if map_errno(&e) == Some(libc::E2BIG) => Ok(NetnsAdmission::MapFull),
            Err(source) => Err(Error::Map {
                map: "NETNS_FILTER",
                source,
            }),
        }
    }

    /// Takes a namespace out of the filter (one that is already out is fine).
    pub fn unwatch_netns(&mut self, inode: u64) -> Result<()> {
        match self.netns_filter()?.remove(&(inode as u32)) {
            Ok(()) => Ok(()),
            Err(e) if map_errno(&e) == Some(libc::ENOENT) => Ok(()),
            Err(source) => Err(Error::Map {
                map: "NETNS_FILTER",
                source,
            }),
        }
    }

    fn netns_filter(&mut self) -> Result<BpfHashMap<&mut MapData, u32, u8>> {
        let map = self.ebpf.map_mut("NETNS_FILTER").ok_or(Error::MapMissing {
            map: "NETNS_FILTER",
        })?;
        BpfHashMap::try_from(map).map_err(|source| Error::Map {
            map: "NETNS_FILTER",
            source,
        })
    }

    /// Loads and attaches every tracepoint program. Links live as long as `self`. A required
    /// one the kernel refuses fails the call; returns (program, reason) of each [`OPTIONAL`]
    /// one refused.
    pub fn attach_tracepoints(&mut self, btf: &aya::Btf) -> Result<Vec<(&'static str, String)>> {
        let mut missing = Vec::new();
        for &(program, tp) in TRACEPOINTS {
            match self.attach_tracepoint(btf, program, tp) {
                Err(e) if OPTIONAL.contains(&program) => missing.push((program, check::chain(&e))),
                r => r?,
            }
        }
        Ok(missing)
    }

    /// Like [`Probes::attach_tracepoints`], but a probe the kernel refuses is reported, not
    /// fatal: returns (program, reason) of each one missing. Fails only if none attaches.
    pub fn attach_tracepoints_degradable(
        &mut self,
        btf: &aya::Btf,
        tracepoints: &[(&'static str, &str)],
    ) -> Result<Vec<(&'static str, String)>> {
        let mut missing = Vec::new();
        let mut last = None;
        for &(program, tp) in tracepoints {
            if let Err(e) = self.attach_tracepoint(btf, program, tp) {
                missing.push((program, check::chain(&e)));
                last = Some(e);
            }
        }
        match last {
            Some(e) if missing.len() == tracepoints.len() => Err(e),
            _ => Ok(missing),
        }
    }

    pub fn attach_tracepoint(
        &mut self,
        btf: &aya::Btf,
        program: &'static str,
        tp: &str,
    ) -> Result<()> {
        let prog: &mut BtfTracePoint = self
            .ebpf
            .program_mut(program)
            .ok_or(Error::ProgramMissing { program })?
            .try_into()
            .map_err(|source| Error::ProgramLoad { program, source })?;
        prog.load(&fault_target(program, tp), btf)
            .map_err(|source| Error::ProgramLoad { program, source })?;
        prog.attach().map_err(|source| Error::Attach {
            program,
            target: format!("tracepoint {tp}"),
            source,
        })?;
        Ok(())
    }

    /// Tries both tc attach modes on `lo` of a brand-new, private network namespace (a thread
    /// that unshared its own), so probing changes nothing on the machine.
    pub fn probe_tc_modes(&mut self) -> Result<(Result<()>, Result<()>)> {
        self.load_tc()?;
        let ebpf = &mut self.ebpf;
        let res = std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: unshare affects only this thread, which ends here.
                if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                    let e = std::io::Error::last_os_error();
                    return Err(Error::io("unshare(CLONE_NEWNET)", e));
                }
                let prog: &mut SchedClassifier = ebpf
                    .program_mut("tc_ingress")
                    .ok_or(Error::ProgramMissing {
                        program: "tc_ingress",
                    })?
                    .try_into()
                    .map_err(|source| Error::ProgramLoad {
                        program: "tc_ingress",
                        source,
                    })?;
                let mut try_mode = |opts: TcAttachOptions, target: &str| -> Result<()> {
                    let id = prog
                        .attach_with_options("lo", TcAttachType::Ingress, opts)
                        .map_err(|source| Error::Attach {
                            program: "tc_ingress",
                            target: target.to_string(),
                            source,
                        })?;
                    let _ = prog.detach(id);
                    Ok(())
                };
                let tcx = try_mode(TcAttachOptions::TcxOrder(LinkOrder::first()), "lo (tcx)");
                let _ = tc::qdisc_add_clsact("lo");
                let clsact = try_mode(TcAttachOptions::Netlink(Default::default()), "lo (clsact)");
                Ok((tcx, clsact))
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })?;
        Ok(res)
    }

    fn load_tc(&mut self) -> Result<()> {
        for (program, _) in TC_PROGRAMS {
            let prog: &mut SchedClassifier = self
                .ebpf
                .program_mut(program)
                .ok_or(Error::ProgramMissing { program })?
                .try_into()
                .map_err(|source| Error::ProgramLoad { program, source })?;
            if prog.fd().is_err() {
                prog.load()
                    .map_err(|source| Error::ProgramLoad { program, source })?;
            }
        }
        Ok(())
    }

    /// Attaches the tc programs (ingress and egress) to the interfaces of `netns` that `select`
    /// accepts, inside that namespace. tcx first (ordered first, so netprobe sees a packet
    /// before another program can drop it), clsact where tcx is not available.
    pub fn attach_tc(
        &mut self,
        netns: &NetnsRef,
        select: impl Fn(&Link) -> bool + Sync,
    ) -> Result<Vec<TcAttachment>> {
        self.load_tc()?;
        let ebpf = &mut self.ebpf;
        let (attached, links) = netns.run(|| -> Result<_> {
            let mut attached = Vec::new();
            let mut links = Vec::new();
            for link in netlink::links()?.into_iter().filter(|l| select(l)) {
                let mut mode = TcMode::Tcx;
                for (program, attach_type) in TC_PROGRAMS {
                    let prog: &mut SchedClassifier = ebpf
                        .program_mut(program)
                        .ok_or(Error::ProgramMissing { program })?
                        .try_into()
                        .map_err(|source| Error::ProgramLoad { program, source })?;
                    let target =
                        || format!("{} {attach_type:?} in netns {}", link.name, netns.name);
                    let tcx = if tcx_allowed() {
                        prog.attach_with_options(
                            &link.name,
                            attach_type,
                            TcAttachOptions::TcxOrder(LinkOrder::first()),
                        )
                        .ok()
                    } else {
                        None
                    };
                    let id = match tcx {
                        Some(id) => id,
                        None => {
                            // Kernels before 6.6: classic clsact qdisc + filter.
                            mode = TcMode::Clsact;
                            let _ = tc::qdisc_add_clsact(&link.name);
                            prog.attach_with_options(
                                &link.name,
                                attach_type,
                                TcAttachOptions::Netlink(Default::default()),
                            )
                            .map_err(|source| Error::Attach {
                                program,
                                target: target(),
                                source,
                            })?
                        }
                    };
                    links.push((link.index, program, id));
                }
                attached.push(TcAttachment {
                    netns: netns.inode,
                    ifindex: link.index,
                    ifname: link.name.clone(),
                    mode,
                });
            }
            Ok((attached, links))
        })??;
        self.links
            .extend(links.into_iter().map(|(ifindex, program, id)| TcLink {
                netns: netns.clone(),
                ifindex,
                program,
                id,
            }));
        self.attachments.extend(attached.iter().cloned());
        Ok(attached)
    }

    /// Detaches every tc program, each inside its namespace (a clsact filter would otherwise
    /// outlive netprobe). A namespace that vanished took its filters with it.
    pub fn detach_tc(&mut self) {
        let links = std::mem::take(&mut self.links);
        self.detach_links(links);
        self.attachments.clear();
    }

    /// Lets go of the programs of an interface that is gone (a deleted pod's veth): the kernel
    /// already detached them, but each tcx link keeps an fd (and kernel memory) until closed.
    /// Returns how many links were released.
    pub fn release_interface(&mut self, netns: u64, ifindex: u32) -> usize {
        let (gone, kept) = std::mem::take(&mut self.links)
            .into_iter()
            .partition(|l| l.netns.inode == netns && l.ifindex == ifindex);
        self.links = kept;
        self.attachments
            .retain(|a| !(a.netns == netns && a.ifindex == ifindex));
        let n = gone.len();
        self.detach_links(gone);
        n
    }

    /// Detaches `links`, each inside its namespace. aya forgets a link (and closes its fd) even
    /// when the kernel's detach fails, e.g. for an interface that no longer exists.
    fn detach_links(&mut self, links: Vec<TcLink>) {
        for l in links {
            let ebpf = &mut self.ebpf;
            let _ = l.netns.run(|| {
                if let Some(p) = ebpf.program_mut(l.program) {
                    let p: std::result::Result<&mut SchedClassifier, _> = p.try_into();
                    if let Ok(p) = p {
                        let _ = p.detach(l.id);
                    }
                }
            });
        }
    }

    /// tc links held now (each tcx link is an open fd).
    pub fn tc_links(&self) -> usize {
        self.links.len()
    }

    /// The event ring buffer (can be taken once).
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>> {
        let map = self
            .ebpf
            .take_map("EVENTS")
            .ok_or(Error::MapMissing { map: "EVENTS" })?;
        RingBuf::try_from(map).map_err(|source| Error::Map {
            map: "EVENTS",
            source,
        })
    }

    /// Runs and run time of each loaded program, by name, from its fdinfo (zero while the
    /// kernel's run-time statistics are off).
    pub fn program_stats(&self) -> Vec<ProgramStats> {
        let mut stats: Vec<ProgramStats> = self
            .ebpf
            .programs()
            .filter_map(|(name, p)| {
                let fd = p.fd().ok()?.as_fd().as_raw_fd();
                let text = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
                let (runs, run_ns) = parse_run_stats(&text)?;
                Some(ProgramStats {
                    program: name.to_string(),
                    runs,
                    run_ns,
                })
            })
            .collect();
        stats.sort_by(|a, b| a.program.cmp(&b.program));
        stats
    }

    /// The verifier's cost of each loaded program, by name.
    pub fn verifier_costs(&self) -> Result<Vec<VerifierCost>> {
        let names = TRACEPOINTS
            .iter()
            .map(|(program, _)| *program)
            .chain(TC_PROGRAMS.iter().map(|(program, _)| *program));
        let mut costs = Vec::new();
        for program in names {
            let Some(p) = self.ebpf.program(program) else {
                continue;
            };
            if p.fd().is_err() {
                continue;
            }
            let info = p
                .info()
                .map_err(|source| Error::ProgramLoad { program, source })?;
            costs.push(VerifierCost {
                program: program.to_string(),
                verified_insns: info.verified_instruction_count(),
            });
        }
        costs.sort_by(|a, b| a.program.cmp(&b.program));
        Ok(costs)
    }

    pub fn counters(&self) -> Result<Counters> {
        let sum = |map: &'static str, index: u32| -> Result<u64> {
            let m = self.ebpf.map(map).ok_or(Error::MapMissing { map })?;
            let arr: PerCpuArray<_, u64> =
                PerCpuArray::try_from(m).map_err(|source| Error::Map { map, source })?;
            let values = arr
                .get(&index, 0)
                .map_err(|source| Error::Map { map, source })?;
            Ok(values.iter().sum())
        };
        let by_reason = |map: &'static str| -> Result<Vec<(u32, u64)>> {
            let mut out = Vec::new();
            for r in 0..MAX_DROP_REASONS {
                let n = sum(map, r)?;
                if n > 0 {
                    out.push((r, n));
                }
            }
            Ok(out)
        };
        Ok(Counters {
            lost: sum("COUNTERS", counter::LOST)?,
            emitted: sum("COUNTERS", counter::EMITTED)?,
            retransmits_counted: sum("COUNTERS", counter::RETRANSMITS_COUNTED)?,
            drops_matched: by_reason("DROPS_MATCHED")?,
            drops_all: by_reason("DROPS_ALL")?,
        })
    }
}

impl Drop for Probes {
    fn drop(&mut self) {
        self.detach_tc();
    }
}

/// The errno of a failed map syscall, if it was one.
fn map_errno(e: &aya::maps::MapError) -> Option<i32> {
    match e {
        aya::maps::MapError::SyscallError(s) => s.io_error.raw_os_error(),
        _ => None,
    }
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK.
fn raise_memlock_rlimit() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall with a valid pointer.
    unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) };
}

/// Loading eBPF programs and building namespace labs needs root.
pub fn require_root() -> crate::error::Result<()> {
    // SAFETY: geteuid never fails.
    if unsafe { libc::geteuid() } != 0 {
        return Err(crate::error::Error::NotRoot);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_stats_come_from_a_programs_fdinfo() {
        // /proc/self/fdinfo of a loaded tc program on 6.18.
        let fdinfo = "pos:\t0\nflags:\t02000002\nmnt_id:\t16\nino:\t2072\n\
                      prog_type:\t3\nprog_jited:\t1\nprog_tag:\t9b1a3c5e7d0f2a4b\n\
                      memlock:\t4096\nprog_id:\t1183\nrun_time_ns:\t35877946\n\
                      run_cnt:\t420159\nrecursion_misses:\t0\nverified_insns:\t311\n";
        assert_eq!(parse_run_stats(fdinfo), Some((420159, 35877946)));
        // A map's fdinfo (or a kernel without the fields) has no run statistics.
        assert_eq!(parse_run_stats("pos:\t0\nmap_type:\t27\n"), None);
    }
}
